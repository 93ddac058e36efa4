//! Checks of the SPM tip-dilation kernel (issue 4): the fast paths equal the brute-force
//! definition on random surfaces and tips, an apex-only tip leaves the surface unchanged, the
//! image never lies below the surface, the paraboloid fast path equals the general path, a double
//! tip images a spike twice, and a reused workspace allocates nothing.
#![allow(unsafe_code)] // the per-thread counting allocator needs `unsafe impl GlobalAlloc`

use ndarray::{Array2, ArrayView2, s};
use proptest::prelude::*;
use rand::Rng;
use scopegym_physics::rng::seeded;
use scopegym_physics::spm::dilation::{Dilator, Tip, dilate, dilate_brute_force};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

// ---------------------------------------------------------------------------------------------
// Allocation counting, per thread so that concurrently running tests do not interfere.

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn count_one() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> usize {
    ALLOCS.with(Cell::get)
}

// ---------------------------------------------------------------------------------------------
// Helpers.

const NM: f64 = 1e-9;

/// A random surface: uniform heights in `[offset, offset + relief)` (m).
fn random_surface(rows: usize, cols: usize, relief: f64, offset: f64, seed: u64) -> Array2<f32> {
    let mut rng = seeded(seed);
    Array2::from_shape_fn((rows, cols), |_| {
        (offset + relief * rng.random::<f64>()) as f32
    })
}

/// A random general tip: heights in `[-depth, 0]`, a fraction `holes` of them `-∞`, apex 0.
fn random_tip(side: usize, depth: f64, holes: f64, seed: u64) -> Tip {
    let mut rng = seeded(seed);
    let mut h: Vec<f32> = (0..side * side)
        .map(|_| {
            if rng.random::<f64>() < holes {
                f32::NEG_INFINITY
            } else {
                (-depth * rng.random::<f64>()) as f32
            }
        })
        .collect();
    h[side * side / 2] = 0.0;
    Tip::from_heights(side, NM, h).expect("valid random tip")
}

fn general(surface: ArrayView2<'_, f32>, tip: &Tip) -> Array2<f32> {
    let mut out = Array2::zeros(surface.dim());
    Dilator::new()
        .dilate_general(surface, tip, out.view_mut())
        .expect("shapes match");
    out
}

fn separable(surface: ArrayView2<'_, f32>, tip: &Tip) -> Array2<f32> {
    let mut out = Array2::zeros(surface.dim());
    Dilator::new()
        .dilate_separable(surface, tip, out.view_mut())
        .expect("separable tip, shapes match");
    out
}

/// Largest absolute difference, and the scale that f32 rounding is relative to.
fn max_diff(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    assert_eq!(a.dim(), b.dim());
    a.iter()
        .zip(b.iter())
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs())
        .fold(0.0, f64::max)
}

fn scale(surface: &Array2<f32>, tip: &Tip) -> f64 {
    let s = surface
        .iter()
        .map(|v| f64::from(v.abs()))
        .fold(0.0, f64::max);
    let t = tip
        .heights()
        .iter()
        .filter(|v| v.is_finite())
        .map(|v| f64::from(v.abs()))
        .fold(0.0, f64::max);
    s + t
}

/// The separable path agrees with the general path and the brute force to f32 rounding.
fn assert_rounding_close(a: &Array2<f32>, b: &Array2<f32>, scale: f64, what: &str) {
    let d = max_diff(a, b);
    assert!(
        d <= 1e-6 * scale,
        "{what}: max |diff| {d:e} for scale {scale:e}"
    );
}

fn odd_side(max_half: usize) -> impl Strategy<Value = usize> {
    (0..=max_half).prop_map(|h| 2 * h + 1)
}

/// The tests, in a module named so that `cargo test -p scopegym-physics spm` selects them.
mod spm {
    use super::*;

    // ---------------------------------------------------------------------------------------------
    // Properties.

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// The general path equals the definition exactly, for non-square images, tips larger than
        /// the image, tips with holes, and surfaces whose relief makes some entries skippable.
        #[test]
        fn general_path_equals_brute_force(
            rows in 1usize..40, cols in 1usize..90, side in odd_side(9),
            relief in prop_oneof![Just(0.0), 0.1e-9f64..20e-9], offset in -50e-9f64..50e-9,
            depth in 0.1e-9f64..30e-9, holes in prop_oneof![Just(0.0), 0.0f64..0.6],
            seed in any::<u64>(),
        ) {
            let surface = random_surface(rows, cols, relief, offset, seed);
            let tip = random_tip(side, depth, holes, seed ^ 0x5eed);
            let fast = general(surface.view(), &tip);
            let reference = dilate_brute_force(surface.view(), &tip);
            prop_assert_eq!(&fast, &reference);
            // `dilate` takes the same path for a tip without separable parts.
            prop_assert_eq!(&dilate(surface.view(), &tip), &reference);
        }

        /// The same on spiky surfaces (a flat, slightly noisy base with a few tall features), where
    /// the general path skips most runs of taps chunk by chunk.
    #[test]
    fn general_path_equals_brute_force_on_spiky_surfaces(
        rows in 1usize..50, cols in 30usize..140, side in odd_side(12),
        spikes in 0usize..6, height in 1e-9f64..40e-9, noise in 0.0f64..0.5e-9,
        depth in 0.5e-9f64..40e-9, seed in any::<u64>(),
    ) {
        let mut surface = random_surface(rows, cols, noise, 1e-9, seed);
        let mut rng = seeded(seed ^ 0xabc);
        for _ in 0..spikes {
            let (y, x) = (rng.random_range(0..rows), rng.random_range(0..cols));
            surface[[y, x]] += (height * rng.random::<f64>()) as f32;
        }
        let tips = [
            random_tip(side, depth, 0.1, seed),
            Tip::double(depth.max(1e-9), NM, side, [2e-9, -1e-9], 0.3e-9).unwrap(),
            Tip::blunted(5e-9, 1.5e-9, NM, side).unwrap(),
        ];
        for tip in &tips {
            prop_assert_eq!(&general(surface.view(), tip), &dilate_brute_force(surface.view(), tip));
        }
    }

    /// An apex-only tip images the surface unchanged, through both paths.
        #[test]
        fn point_tip_is_the_identity(
            rows in 1usize..40, cols in 1usize..90, side in odd_side(12),
            relief in 0.0f64..20e-9, seed in any::<u64>(),
        ) {
            let surface = random_surface(rows, cols, relief, -3e-9, seed);
            let tip = Tip::point(side, NM).unwrap();
            prop_assert_eq!(&separable(surface.view(), &tip), &surface);
            prop_assert_eq!(&general(surface.view(), &tip), &surface);
        }

        /// The imaged height is never below the true surface (t(0) = 0), for every tip kind.
        #[test]
        fn image_is_never_below_the_surface(
            rows in 1usize..48, cols in 1usize..80, side in odd_side(10),
            radius in 1e-9f64..50e-9, relief in 0.0f64..20e-9,
            dx in -6e-9f64..6e-9, dy in -6e-9f64..6e-9, dz in 0.0f64..3e-9, flat in 0.0f64..4e-9,
            seed in any::<u64>(),
        ) {
            let surface = random_surface(rows, cols, relief, 1e-9, seed);
            let tips = [
                Tip::paraboloid(radius, NM, side).unwrap(),
                Tip::double(radius, NM, side, [dx, dy], dz).unwrap(),
                Tip::blunted(radius, flat, NM, side).unwrap(),
                random_tip(side, relief + 1e-9, 0.3, seed),
            ];
            for tip in &tips {
                for img in [dilate(surface.view(), tip), general(surface.view(), tip)] {
                    prop_assert!(img.iter().zip(surface.iter()).all(|(i, s)| i >= s));
                    prop_assert!(img.iter().all(|v| v.is_finite()));
                }
            }
        }

        /// The separable paraboloid path equals the general path and the brute force to rounding,
        /// with surfaces flat enough for the skipping of deep entries to matter and rough enough
        /// for every entry to count.
        #[test]
        fn paraboloid_fast_path_equals_general_and_brute_force(
            rows in 1usize..48, cols in 1usize..100, side in odd_side(12),
            radius in 0.5e-9f64..60e-9, pixel in 0.2e-9f64..3e-9,
            relief in prop_oneof![Just(0.0), 0.01e-9f64..30e-9], offset in -20e-9f64..20e-9,
            seed in any::<u64>(),
        ) {
            let surface = random_surface(rows, cols, relief, offset, seed);
            let tip = Tip::paraboloid(radius, pixel, side).unwrap();
            prop_assert!(tip.is_separable());
            let fast = separable(surface.view(), &tip);
            let via_general = general(surface.view(), &tip);
            let reference = dilate_brute_force(surface.view(), &tip);
            prop_assert_eq!(&via_general, &reference);
            let sc = scale(&surface, &tip);
            assert_rounding_close(&fast, &via_general, sc, "paraboloid separable vs general");
            prop_assert!(fast.iter().zip(surface.iter()).all(|(i, s)| i >= s));
        }

        /// The double tip's two separable parts give the general path's image to rounding.
        #[test]
        fn double_tip_parts_equal_general(
            rows in 1usize..40, cols in 1usize..70, side in odd_side(9),
            radius in 1e-9f64..30e-9, relief in 0.0f64..15e-9,
            dx in -8e-9f64..8e-9, dy in -8e-9f64..8e-9, dz in 0.0f64..4e-9,
            seed in any::<u64>(),
        ) {
            let surface = random_surface(rows, cols, relief, 0.0, seed);
            let tip = Tip::double(radius, NM, side, [dx, dy], dz).unwrap();
            prop_assert_eq!(tip.parts().len(), 2);
            let fast = dilate(surface.view(), &tip);
            let via_general = general(surface.view(), &tip);
            prop_assert_eq!(&via_general, &dilate_brute_force(surface.view(), &tip));
            assert_rounding_close(&fast, &via_general, scale(&surface, &tip), "double tip parts vs general");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A worn tip (flat disc swept by one or two paraboloids): the disc filter then the
        /// separable passes give the brute force's image to rounding, near the edges too (surfaces
        /// smaller than the disc included), into a non-contiguous output as well.
        #[test]
        fn worn_tip_equals_brute_force(
            rows in 1usize..40, cols in 1usize..70, half in 0usize..10,
            radius in 1e-9f64..30e-9, flat in 0.0f64..4e-9, pixel in 0.3e-9f64..1.5e-9,
            relief in prop_oneof![Just(0.0), 0.01e-9f64..15e-9],
            double in any::<bool>(), dx in -4e-9f64..4e-9, dz in 0.0f64..2e-9,
            seed in any::<u64>(),
        ) {
            let r = (flat / pixel * (1.0 + 1e-9)).floor() as usize;
            let side = 2 * (half + r) + 1;
            let surface = random_surface(rows, cols, relief, 1e-9, seed);
            let second = double.then_some(([dx, -0.5 * dx], dz));
            let tip = Tip::worn(radius, flat, pixel, side, second).unwrap();
            prop_assert!(tip.is_separable());
            let fast = dilate(surface.view(), &tip);
            let reference = dilate_brute_force(surface.view(), &tip);
            prop_assert_eq!(&general(surface.view(), &tip), &reference);
            assert_rounding_close(&fast, &reference, scale(&surface, &tip), "worn tip vs brute force");
            prop_assert!(fast.iter().zip(surface.iter()).all(|(i, s)| i >= s));
            // Into a transposed (non-contiguous) view.
            let mut t = Array2::<f32>::zeros((cols, rows));
            Dilator::new().dilate(surface.view(), &tip, t.view_mut().reversed_axes()).unwrap();
            prop_assert_eq!(&t.t().to_owned(), &fast);
        }
    }

    /// On the grid, the worn tip is the continuous blunted tip `-(|u| - a)²/2R` to within the
    /// paraboloid's drop over one pixel diagonal, never above it, and equal on the flat disc.
    #[test]
    fn worn_tip_is_the_blunted_tip_on_the_grid() {
        for (radius, flat, pixel, side) in [(5e-9, 1.5e-9, NM, 15), (20e-9, 2.2e-9, 0.4e-9, 41)] {
            let worn = Tip::worn(radius, flat, pixel, side, None).unwrap();
            let blunt = Tip::blunted(radius, flat, pixel, side).unwrap();
            let c = (side / 2) as f64;
            for i in 0..side {
                for j in 0..side {
                    let (w, b) = (f64::from(worn.height(i, j)), f64::from(blunt.height(i, j)));
                    let d = ((i as f64 - c).powi(2) + (j as f64 - c).powi(2)).sqrt() * pixel;
                    if w == f64::NEG_INFINITY {
                        // Outside the inner window swept by the disc (the window's rounded-off
                        // corners): deeper than the inner window's edge.
                        let edge = (c - (flat / pixel).floor()) * pixel;
                        assert!(b < -edge * edge / (2.0 * radius), "({i}, {j}): blunted {b}");
                        continue;
                    }
                    // At most what the paraboloid drops over 1.5 more pixels below the blunted tip.
                    let floor = -((d - flat).max(0.0) + 1.5 * pixel).powi(2) / (2.0 * radius);
                    assert!(w <= b + 1e-15, "({i}, {j}): worn {w} above blunted {b}");
                    assert!(w >= floor - 1e-15, "({i}, {j}): worn {w} vs blunted {b}");
                    if d <= flat {
                        assert_eq!(w, 0.0, "({i}, {j}) lies on the flat disc");
                    }
                }
            }
        }
        // A disc wider than the window is clipped to it: flat on the clipped disc (the 5 × 5
        // window's square within 3 nm of the apex), the brute force's image still.
        let clipped = Tip::worn(5e-9, 3e-9, NM, 5, None).unwrap();
        assert!(clipped.heights().iter().all(|&h| h == 0.0));
        let surface = random_surface(9, 11, 4e-9, 0.0, 5);
        assert_rounding_close(
            &dilate(surface.view(), &clipped),
            &dilate_brute_force(surface.view(), &clipped),
            scale(&surface, &clipped),
            "clipped worn tip",
        );
    }

    // ---------------------------------------------------------------------------------------------
    // Examples.

    /// Local maxima above `floor` (strictly above their 8 neighbours' maximum or equal to it), as
    /// (row, col, height), highest first.
    fn peaks(img: &Array2<f32>, floor: f32) -> Vec<(usize, usize, f32)> {
        let (r, c) = img.dim();
        let mut out = Vec::new();
        for y in 1..r - 1 {
            for x in 1..c - 1 {
                let v = img[[y, x]];
                let nb = img
                    .slice(s![y - 1..=y + 1, x - 1..=x + 1])
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                if v > floor && v >= nb {
                    out.push((y, x, v));
                }
            }
        }
        out.sort_by(|a, b| b.2.total_cmp(&a.2));
        out
    }

    #[test]
    fn double_tip_images_a_spike_twice() {
        // A 4 nm spike on a flat 64 × 64 surface at 1 nm per pixel; a sharp double tip whose second
        // apex sits at (dx, dy) = (5, -3) nm, 1 nm higher.
        let mut surface = Array2::<f32>::zeros((64, 64));
        surface[[30, 30]] = 4e-9;
        let tip = Tip::double(2e-9, NM, 21, [5e-9, -3e-9], 1e-9).unwrap();
        for img in [dilate(surface.view(), &tip), general(surface.view(), &tip)] {
            let p = peaks(&img, 0.5e-9);
            assert_eq!(p.len(), 2, "two peaks expected, got {p:?}");
            assert_eq!((p[0].0, p[0].1), (30, 30));
            assert!((f64::from(p[0].2) - 4e-9).abs() < 1e-15);
            // The ghost: shifted by the tip offset (x + 5, y - 3), 1 nm lower.
            assert_eq!((p[1].0, p[1].1), (27, 35));
            assert!((f64::from(p[1].2) - 3e-9).abs() < 1e-15, "{}", p[1].2);
        }
        // A single paraboloid images it once.
        let single = Tip::paraboloid(2e-9, NM, 21).unwrap();
        assert_eq!(peaks(&dilate(surface.view(), &single), 0.5e-9).len(), 1);
    }

    #[test]
    fn paraboloid_spike_image_is_the_inverted_tip() {
        let mut surface = Array2::<f32>::zeros((41, 41));
        surface[[20, 20]] = 10e-9;
        let (radius, side) = (5e-9, 21);
        let tip = Tip::paraboloid(radius, NM, side).unwrap();
        let img = dilate(surface.view(), &tip);
        for y in 10..=30 {
            for x in 10..=30 {
                let d2 = ((y as f64 - 20.0).powi(2) + (x as f64 - 20.0).powi(2)) * NM * NM;
                let expected = (10e-9 - d2 / (2.0 * radius)).max(0.0);
                assert!(
                    (f64::from(img[[y, x]]) - expected).abs() < 1e-15,
                    "({y}, {x}): {} vs {expected}",
                    img[[y, x]]
                );
            }
        }
    }

    #[test]
    fn a_window_as_deep_as_the_relief_hides_the_truncation() {
        let (radius, pixel, relief) = (8e-9, 0.7e-9, 6e-9);
        let surface = random_surface(50, 61, relief, 2e-9, 3);
        let side = Tip::paraboloid_side(radius, pixel, relief).unwrap();
        let small = Tip::paraboloid(radius, pixel, side).unwrap();
        let large = Tip::paraboloid(radius, pixel, side + 20).unwrap();
        let a = dilate(surface.view(), &small);
        assert_eq!(a, dilate(surface.view(), &large));
        assert_eq!(
            dilate_brute_force(surface.view(), &small),
            dilate_brute_force(surface.view(), &large)
        );
        // A spike taller than the window is deep shows the truncation.
        let mut spike = Array2::<f32>::zeros((60, 60));
        spike[[30, 30]] = (relief + 1e-9) as f32;
        assert_ne!(dilate(spike.view(), &small), dilate(spike.view(), &large));
    }

    #[test]
    fn flat_surfaces_stay_flat() {
        let surface = Array2::<f32>::from_elem((30, 45), 2.5e-9);
        for tip in [
            Tip::paraboloid(10e-9, NM, 15).unwrap(),
            Tip::double(10e-9, NM, 15, [3e-9, 2e-9], 0.0).unwrap(),
            Tip::blunted(10e-9, 2e-9, NM, 15).unwrap(),
        ] {
            assert_eq!(dilate(surface.view(), &tip), surface);
            assert_eq!(general(surface.view(), &tip), surface);
        }
    }

    #[test]
    fn non_contiguous_views_work() {
        let surface = random_surface(37, 53, 8e-9, 0.0, 9);
        let t_view = surface.t();
        for tip in [
            Tip::paraboloid(6e-9, NM, 11).unwrap(),
            random_tip(9, 8e-9, 0.2, 4),
        ] {
            let reference = dilate_brute_force(t_view, &tip);
            // A transposed input and an output that is every other column of a wider array.
            let mut wide = Array2::<f32>::zeros((53, 74));
            let mut d = Dilator::new();
            d.dilate(t_view, &tip, wide.slice_mut(s![.., ..;2]))
                .unwrap();
            let got = wide.slice(s![.., ..;2]).to_owned();
            assert_rounding_close(&got, &reference, scale(&surface, &tip), "strided");
            d.dilate_general(t_view, &tip, wide.slice_mut(s![.., ..;2]))
                .unwrap();
            assert_eq!(wide.slice(s![.., ..;2]), reference);
        }
    }

    #[test]
    fn shape_mismatch_and_missing_parts_are_errors() {
        let surface = Array2::<f32>::zeros((8, 9));
        let mut out = Array2::<f32>::zeros((9, 8));
        let mut d = Dilator::new();
        let tip = Tip::paraboloid(5e-9, NM, 5).unwrap();
        assert!(d.dilate(surface.view(), &tip, out.view_mut()).is_err());
        assert!(
            d.dilate_general(surface.view(), &tip, out.view_mut())
                .is_err()
        );
        let blunt = Tip::blunted(5e-9, 1e-9, NM, 5).unwrap();
        let mut ok = Array2::<f32>::zeros((8, 9));
        assert!(
            d.dilate_separable(surface.view(), &blunt, ok.view_mut())
                .is_err()
        );
        // Empty surfaces are fine.
        let empty = Array2::<f32>::zeros((0, 5));
        assert_eq!(dilate(empty.view(), &tip).dim(), (0, 5));
    }

    #[test]
    fn a_reused_dilator_gives_fresh_results_and_does_not_allocate() {
        let mut d = Dilator::new();
        let big = random_surface(96, 130, 10e-9, 0.0, 1);
        let small = random_surface(17, 23, 10e-9, 0.0, 2);
        let tips = [
            Tip::paraboloid(10e-9, NM, 25).unwrap(),
            Tip::double(10e-9, NM, 25, [6e-9, -4e-9], 1e-9).unwrap(),
            random_tip(25, 12e-9, 0.1, 7),
            Tip::worn(10e-9, 2.5e-9, NM, 25, Some(([3e-9, 1e-9], 0.5e-9))).unwrap(),
        ];
        let mut out_big = Array2::<f32>::zeros(big.dim());
        let mut out_small = Array2::<f32>::zeros(small.dim());
        // Warm up on the largest frame, then alternate sizes and tips: the same results as a fresh
        // workspace, and no allocation.
        for tip in &tips {
            d.dilate(big.view(), tip, out_big.view_mut()).unwrap();
            d.dilate_general(big.view(), tip, out_big.view_mut())
                .unwrap();
        }
        let expected: Vec<(Array2<f32>, Array2<f32>)> = tips
            .iter()
            .map(|t| (dilate(big.view(), t), dilate(small.view(), t)))
            .collect();
        let before = allocations();
        for _ in 0..2 {
            for (tip, (eb, es)) in tips.iter().zip(&expected) {
                d.dilate(small.view(), tip, out_small.view_mut()).unwrap();
                assert!(out_small == *es);
                d.dilate(big.view(), tip, out_big.view_mut()).unwrap();
                assert!(out_big == *eb);
                d.dilate_general(big.view(), tip, out_big.view_mut())
                    .unwrap();
            }
        }
        let after = allocations();
        assert_eq!(after - before, 0, "allocations with a warm workspace");
        // A control: the counter sees allocations on this thread.
        let v: Vec<u8> = Vec::with_capacity(16);
        assert!(allocations() > after);
        drop(v);
    }
}
