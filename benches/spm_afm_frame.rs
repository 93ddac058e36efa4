//! Criterion benchmark: one 256 × 256 AFM frame (trace and retrace of every line through the
//! 2 kHz PI loop, drift, creep, hysteresis and noise) with a 25 × 25-pixel tip (DESIGN.md §5,
//! §11).
//!
//! - `spm_afm_frame_256/cached_tip`: the tip-dilated surface is cached (the tip did not change);
//!   the frame is the scanner, the PI loop over ~1 M controller samples, and the noise.
//! - `spm_afm_frame_256/new_double_tip`: the tip changed before the frame (a double tip, general
//!   25 × 25 dilation of the 256² sample, then the frame).
//!
//! The sample is 256 nm of particles (radius 6.2 nm) on terraces, 1 nm per cell; the tip has
//! R = 10 nm, which over that relief is a 25 × 25-pixel kernel.

use criterion::{Criterion, criterion_group, criterion_main};
use scopegym_physics::instrument::SpmInstrument;
use scopegym_physics::param::Param;
use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
use scopegym_physics::spm::surface::SurfaceKind;
use scopegym_physics::spm::tip::{SecondApex, TipState};
use std::hint::black_box;
use std::time::Duration;

fn afm() -> SpmSimulator {
    let mut c = SpmConfig::default();
    c.sample.size = Param::fixed(256e-9);
    c.sample.pixels = 256;
    c.scan.size = Param::fixed(256e-9);
    c.scan.pixels = [256, 256];
    c.surface.kind = SurfaceKind::Particles;
    c.surface.particle_radius = Param::fixed(6.2e-9);
    c.tip.initial_radius = Param::fixed(10e-9);
    c.tip.wear_rate = Param::fixed(0.0);
    c.tip.adsorbate_rate = Param::fixed(0.0);
    c.tip.initial_double_probability = Param::fixed(0.0);
    c.tip.initial_adsorbate_probability = Param::fixed(0.0);
    c.sample.crash_threshold = Param::fixed(1e-6);
    SpmSimulator::new(c, 1).expect("valid config")
}

fn frame(c: &mut Criterion) {
    let mut sim = afm();
    let single = TipState::sharp(10e-9).unwrap();
    let double = single
        .clone()
        .with_second_apex(Some(SecondApex {
            offset: [6e-9, -4e-9],
            dz: 1e-9,
        }))
        .unwrap();
    sim.set_tip_state(single.clone()).unwrap();
    eprintln!(
        "spm_afm_frame: tip kernel {} x {} px",
        sim.tip_kernel().side(),
        sim.tip_kernel().side()
    );
    let mut g = c.benchmark_group("spm_afm_frame_256");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function("cached_tip", |b| {
        b.iter(|| black_box(sim.acquire_frame().unwrap().main().image[[128, 128]]))
    });
    let mut k = 0u64;
    g.bench_function("new_double_tip", |b| {
        b.iter(|| {
            k += 1;
            let t = if k.is_multiple_of(2) {
                &single
            } else {
                &double
            };
            sim.set_tip_state(t.clone()).unwrap();
            black_box(sim.acquire_frame().unwrap().main().image[[128, 128]])
        })
    });
    g.finish();
}

criterion_group!(benches, frame);
criterion_main!(benches);
