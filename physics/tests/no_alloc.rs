//! A reused simulator allocates nothing per frame after the first.
#![allow(unsafe_code)] // a counting global allocator needs `unsafe impl GlobalAlloc`

use scopegym_physics::instrument::StemInstrument;
use scopegym_physics::stem::{StemConfig, StemSimulator};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn frames_after_the_first_do_not_allocate() {
    let mut cfg = StemConfig::default();
    cfg.scan.pixels = [128, 128];
    cfg.specimen.dopants = vec![Default::default()];
    let mut sim = StemSimulator::new(cfg, 1).unwrap();
    sim.acquire_frame().unwrap();
    let before = ALLOCS.load(Ordering::Relaxed);
    let mut total = 0.0f64;
    for _ in 0..5 {
        let f = sim.acquire_frame().unwrap();
        total += f64::from(f.image[[64, 64]]);
    }
    let after = ALLOCS.load(Ordering::Relaxed);
    assert!(total.is_finite());
    assert_eq!(after - before, 0, "allocations during 5 frames");
    // A control: the counter does see allocations.
    let v: Vec<u8> = Vec::with_capacity(10);
    assert!(ALLOCS.load(Ordering::Relaxed) > after);
    drop(v);
}
