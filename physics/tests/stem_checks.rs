//! Checks of the STEM simulator against the formulas and numbers of DESIGN.md §4.

use scopegym_physics::instrument::StemInstrument;
use scopegym_physics::param::Param;
use scopegym_physics::stem::haadf::{DetectorConfig, HaadfRenderer};
use scopegym_physics::stem::optics::{
    Aberrations, ProbeCalculator, ProbeSpec, electron_wavelength,
};
use scopegym_physics::stem::specimen::{
    Atom, ContaminationConfig, Crystal, Specimen, SpecimenConfig,
};
use scopegym_physics::stem::{StemConfig, StemSimulator};

fn unaberrated(energy: f64, alpha: f64) -> ProbeSpec {
    ProbeSpec {
        energy,
        alpha,
        aberrations: Aberrations::default(),
        cc: 0.0,
        energy_spread: 0.0,
    }
}

/// Full width at half maximum along the x axis through the centre of an `n × n` image.
fn fwhm_x(img: &[f64], n: usize, dx: f64) -> f64 {
    let c = n / 2;
    let row = &img[c * n..(c + 1) * n];
    let peak = row[c];
    let half = 0.5 * peak;
    let cross = |dir: i64| -> f64 {
        let mut i = c as i64;
        loop {
            let j = i + dir;
            let (a, b) = (row[i as usize], row[j as usize]);
            if b < half {
                // Linear interpolation between i and j.
                let t = (a - half) / (a - b);
                return (i as f64 + t * dir as f64 - c as f64).abs();
            }
            i = j;
        }
    };
    (cross(1) + cross(-1)) * dx
}

#[test]
fn unaberrated_probe_has_the_airy_width_and_unit_sum() {
    for &(e, alpha) in &[(60e3, 30e-3), (200e3, 25e-3)] {
        let spec = unaberrated(e, alpha);
        let lambda = electron_wavelength(e);
        let dx = lambda / alpha / 40.0;
        let n = 512;
        let mut pc = ProbeCalculator::new();
        pc.fine_intensity(&spec, n, dx);
        let sum: f64 = pc.intensity().iter().sum();
        assert!((sum - 1.0).abs() < 1e-9, "sum {sum}");
        let w = fwhm_x(pc.intensity(), n, dx);
        let airy = 0.51 * lambda / alpha;
        assert!(
            (w / airy - 1.0).abs() < 0.05,
            "E={e}: FWHM {w:e} vs Airy {airy:e}"
        );
    }
}

#[test]
fn defocus_broadens_the_probe_and_the_binned_kernel_sums_to_one() {
    let mut spec = unaberrated(60e3, 30e-3);
    let lambda = electron_wavelength(60e3);
    let dx = lambda / 30e-3 / 40.0;
    let n = 512;
    let mut pc = ProbeCalculator::new();
    pc.fine_intensity(&spec, n, dx);
    let peak0 = pc.intensity()[(n / 2) * n + n / 2];
    let w0 = fwhm_x(pc.intensity(), n, dx);
    spec.aberrations.c10 = 5e-9;
    pc.fine_intensity(&spec, n, dx);
    let peak1 = pc.intensity()[(n / 2) * n + n / 2];
    let w1 = fwhm_x(pc.intensity(), n, dx);
    assert!(peak1 < 0.7 * peak0, "peak {peak0} -> {peak1}");
    assert!(w1 > w0, "FWHM {w0} -> {w1}");
    let mut k = Vec::new();
    let side = pc.binned_probe(&spec, 0.2e-10, 5e-9, &mut k);
    assert_eq!(k.len(), side * side);
    assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-9);
}

/// The binned probe kernel (and its side) at 60 kV and 30 mrad with the default C30 and C50 and
/// defocus `c10` (m), on pixels of `dx` (m), at most `max_side` pixels across.
fn binned_kernel(c10: f64, dx: f64, max_side: usize) -> (Vec<f64>, usize) {
    let spec = ProbeSpec {
        aberrations: Aberrations {
            c10,
            c30: 123e-9,
            c50: 0.55e-3,
            ..Default::default()
        },
        ..unaberrated(60e3, 30e-3)
    };
    let mut kernel = Vec::new();
    let side = ProbeCalculator::new().binned_probe(&spec, dx, max_side as f64 * dx, &mut kernel);
    (kernel, side)
}

#[test]
fn si_over_c_column_ratio_is_z_ratio_to_the_n() {
    let det = DetectorConfig::default();
    let n = det.haadf_exponent.get();
    let sigma = det.cross_sections();
    let dx = 0.2e-10;
    let (kernel, side) = binned_kernel(0.0, dx, 128);
    let mut r = HaadfRenderer::default();
    r.set_probe(&kernel, side, 128, 128, dx, 0.35e-10);
    // Two isolated atoms 2 nm apart, both exactly on pixel centres (same sampling of the probe).
    let g = r.geometry().unwrap();
    let px = |j: usize| (j as f64 + 0.5 - 64.0) * dx;
    let atoms = [
        Atom {
            x: px(34),
            y: px(64),
            height: 0.0,
            z: 6,
        },
        Atom {
            x: px(94),
            y: px(64),
            height: 0.0,
            z: 14,
        },
    ];
    let specimen = Specimen {
        atoms: atoms.to_vec(),
        cell: None,
    };
    r.render_ideal(&specimen, &sigma, 2500.0, [0.0, 0.0], [0.0, 0.0])
        .unwrap();
    let at = |j: usize, i: usize| f64::from(r.ideal[(i + g.margin) * g.pcols + j + g.margin]);
    let (c, si) = (at(34, 64), at(94, 64));
    let expected = (14.0f64 / 6.0).powf(n);
    assert!(
        (si / c / expected - 1.0).abs() < 0.05,
        "ratio {} vs {expected}",
        si / c
    );
    // Expected counts on a carbon atom: N σ_C P(0) with P from the kernel (order 10 counts).
    assert!(c > 1.0 && c < 100.0, "{c}");
}

/// A drift applied to the spectrum of the last render (`shift_ideal`) equals a fresh render at
/// the drifted position: to FFT rounding for a whole-pixel shift (the bilinear splat then moves
/// exactly); for half a pixel within 3.5 % of the peak, the blur of the fresh render's bilinear
/// splat, which spreads an atom half a pixel off a pixel centre over two (the phase ramp shifts
/// without blur). Shifts past a pixel are refused.
#[test]
fn spectral_shift_of_the_ideal_image_matches_a_fresh_render() {
    let det = DetectorConfig::default();
    let sigma = det.cross_sections();
    let dx = 0.2e-10;
    let (kernel, side) = binned_kernel(2e-9, dx, 64);
    let specimen = SpecimenConfig {
        crystal: Crystal::Graphene,
        ..Default::default()
    }
    .build([2.4e-9, 2.4e-9], &mut scopegym_physics::rng::seeded(3))
    .unwrap();
    let crop = |r: &HaadfRenderer| -> Vec<f64> {
        let g = r.geometry().unwrap();
        (0..g.rows)
            .flat_map(|i| (0..g.cols).map(move |j| (i + g.margin) * g.pcols + j + g.margin))
            .map(|k| f64::from(r.ideal[k]))
            .collect()
    };
    let mut r = HaadfRenderer::default();
    r.set_probe(&kernel, side, 64, 64, dx, 0.35e-10);
    let mut fresh = HaadfRenderer::default();
    fresh.set_probe(&kernel, side, 64, 64, dx, 0.35e-10);
    assert!(
        !r.shift_ideal([0.0, 0.0]),
        "no spectrum before the first render"
    );
    r.render_ideal(&specimen, &sigma, 2500.0, [0.0, 0.0], [0.0, 0.0])
        .unwrap();
    for (d, tol) in [([dx, -dx], 1e-4), ([0.5 * dx, 0.25 * dx], 0.035)] {
        assert!(r.shift_ideal(d));
        fresh
            .render_ideal(&specimen, &sigma, 2500.0, d, [0.0, 0.0])
            .unwrap();
        let (a, b) = (crop(&r), crop(&fresh));
        let peak = b.iter().copied().fold(0.0, f64::max);
        let dev = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            peak > 1.0 && dev < tol * peak,
            "shift {d:?}: {dev} of {peak}"
        );
    }
    assert!(
        !r.shift_ideal([1.5 * dx, 0.0]),
        "a shift past a pixel is refused"
    );
}

fn quiet_config(pixels: usize) -> StemConfig {
    let mut cfg = StemConfig::default().without_scan_distortions();
    cfg.scan.pixels = [pixels, pixels];
    cfg
}

#[test]
fn noisy_counts_average_to_the_noiseless_expectation() {
    let mut sim = StemSimulator::new(quiet_config(128), 5).unwrap();
    let f = sim.acquire_frame().unwrap().image.to_owned();
    let nl = sim.last_noiseless();
    let sum_noisy: f64 = f.iter().map(|&v| f64::from(v)).sum();
    let sum_exp: f64 = nl.iter().map(|&v| f64::from(v)).sum();
    // Poisson: the variance of the sum equals the sum of the means.
    let sd = sum_exp.sqrt();
    assert!(
        (sum_noisy - sum_exp).abs() < 4.0 * sd,
        "{sum_noisy} vs {sum_exp} ± {sd}"
    );
    assert!(sum_exp > 1e4);
    // Per-pixel variance also matches the mean (Poisson), pooled over bright and dark pixels.
    let resid: f64 = f
        .iter()
        .zip(nl.iter())
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    assert!(
        (resid / sum_exp - 1.0).abs() < 0.05,
        "variance/mean = {}",
        resid / sum_exp
    );
}

/// Integer-pixel + Gaussian three-point sub-pixel shift of `b` relative to `a` by brute-force
/// correlation of the mean-subtracted images over a window of ±`max` pixels.
fn measure_shift(a: &[f32], b: &[f32], n: usize, max: i64) -> (f64, f64) {
    let mean = |x: &[f32]| x.iter().map(|&v| f64::from(v)).sum::<f64>() / x.len() as f64;
    let (ma, mb) = (mean(a), mean(b));
    let a: Vec<f32> = a.iter().map(|&v| (f64::from(v) - ma) as f32).collect();
    let b: Vec<f32> = b.iter().map(|&v| (f64::from(v) - mb) as f32).collect();
    let corr = |sx: i64, sy: i64| -> f64 {
        let mut s = 0.0;
        let m = max as usize;
        for i in m..n - m {
            for j in m..n - m {
                let bi = (i as i64 + sy) as usize;
                let bj = (j as i64 + sx) as usize;
                s += f64::from(a[i * n + j]) * f64::from(b[bi * n + bj]);
            }
        }
        s
    };
    let mut best = (0, 0, f64::MIN);
    for sy in -max + 1..max {
        for sx in -max + 1..max {
            let c = corr(sx, sy);
            if c > best.2 {
                best = (sx, sy, c);
            }
        }
    }
    let (bx, by, c0) = best;
    let sub = |m: f64, p: f64| {
        let (lm, l0, lp) = (m.max(1e-300).ln(), c0.ln(), p.max(1e-300).ln());
        0.5 * (lm - lp) / (lm - 2.0 * l0 + lp)
    };
    let dx = bx as f64 + sub(corr(bx - 1, by), corr(bx + 1, by));
    let dy = by as f64 + sub(corr(bx, by - 1), corr(bx, by + 1));
    (dx, dy)
}

#[test]
fn lattice_displacement_between_frames_matches_the_drift_velocity() {
    let mut cfg = quiet_config(96);
    // An aperiodic specimen, so that the correlation peak is unique.
    cfg.specimen = SpecimenConfig {
        crystal: Crystal::None,
        contamination: Some(ContaminationConfig {
            coverage: Param::fixed(0.999),
            density: Param::fixed(0.05e20),
            ..Default::default()
        }),
        ..Default::default()
    };
    cfg.detector.shot_noise = false;
    let speed = 2e-9; // m/s
    let dir: f64 = 0.6;
    cfg.drift.speed = Param::fixed(speed);
    cfg.drift.direction = Param::fixed(dir);
    let mut sim = StemSimulator::new(cfg, 9).unwrap();
    let f0 = sim.acquire_frame().unwrap();
    let t0 = f0.meta.t_start;
    let a = f0.image.to_owned();
    sim.acquire_frame().unwrap();
    let f2 = sim.acquire_frame().unwrap();
    let dt = f2.meta.t_start - t0;
    let b = f2.image.to_owned();
    let (sx, sy) = measure_shift(a.as_slice().unwrap(), b.as_slice().unwrap(), 96, 12);
    let sc = sim.scan_settings();
    let px = sc.pixel_size;
    // A feature displaced by (Δj, Δi) pixels is also scanned later by Δi lines and Δj dwells,
    // during which it drifts further: Δ·px = v·T with T = dt + Δi·line + Δj·dwell, so
    // T = dt / (1 − (v_y·line + v_x·dwell)/px).
    let (vx, vy) = (speed * dir.cos(), speed * dir.sin());
    let line = sc.cols as f64 * sc.dwell_time + sc.flyback_time;
    let t = dt / (1.0 - (vy * line + vx * sc.dwell_time) / px);
    let (ex, ey) = (vx * t / px, vy * t / px);
    assert!(ex > 3.0, "test needs a visible shift, got {ex}");
    assert!(
        (sx - ex).abs() < 0.3 && (sy - ey).abs() < 0.3,
        "measured ({sx:.2}, {sy:.2}) px, expected ({ex:.2}, {ey:.2}) px"
    );
    // The drift state persisted across frames: its offset equals v·t at the clock.
    let off = sim.drift_offset();
    assert!((off[0] - speed * dir.cos() * sim.clock()).abs() < 1e-15);
}

#[test]
fn aberration_change_recomputes_the_probe_and_blurs_the_image() {
    let mut cfg = quiet_config(64);
    cfg.detector.shot_noise = false;
    let mut sim = StemSimulator::new(cfg, 1).unwrap();
    let sharp = sim.acquire_frame().unwrap().image.to_owned();
    let mut ab = sim.aberrations();
    ab.c10 = 8e-9;
    sim.set_aberrations(&ab).unwrap();
    let blurred = sim.acquire_frame().unwrap().image.to_owned();
    let var = |x: &ndarray::Array2<f32>| {
        let m = x.mean().unwrap();
        x.iter().map(|v| (v - m).powi(2)).sum::<f32>() / x.len() as f32
    };
    assert!(
        var(&blurred) < 0.5 * var(&sharp),
        "{} vs {}",
        var(&blurred),
        var(&sharp)
    );
}

#[test]
fn blanked_beam_refuses_acquisition_and_bad_arguments_are_errors() {
    let mut sim = StemSimulator::new(quiet_config(32), 1).unwrap();
    sim.make_safe().unwrap();
    assert!(sim.acquire_frame().is_err());
    sim.set_blanked(false).unwrap();
    assert!(sim.move_probe([f64::NAN, 0.0]).is_err());
    assert!(sim.acquire_point(-1.0).is_err());
    assert!(sim.acquire_point(f64::NAN).is_err());
    let bad = Aberrations {
        c10: f64::INFINITY,
        ..Default::default()
    };
    assert!(sim.set_aberrations(&bad).is_err());
    let mut cfg = quiet_config(32);
    cfg.optics.convergence_angle = Param::fixed(-0.01);
    let e = StemSimulator::new(cfg, 0).unwrap_err().to_string();
    assert!(e.contains("optics.convergence_angle"), "{e}");
}

#[test]
fn same_seed_same_frames_different_seed_different_frames() {
    let cfg = StemConfig {
        scan: scopegym_physics::stem::scan::ScanConfig {
            pixels: [48, 48],
            ..Default::default()
        },
        ..Default::default()
    };
    let run = |seed| {
        let mut sim = StemSimulator::new(cfg.clone(), seed).unwrap();
        let a = sim.acquire_frame().unwrap().image.to_owned();
        let b = sim.acquire_frame().unwrap().image.to_owned();
        (a, b)
    };
    let (a1, b1) = run(3);
    let (a2, b2) = run(3);
    let (a3, _) = run(4);
    assert_eq!(a1, a2);
    assert_eq!(b1, b2);
    assert_ne!(a1, a3);
}

#[test]
fn dopant_hops_under_a_parked_beam_at_the_putting_dune_rate() {
    let mut cfg = quiet_config(64);
    cfg.specimen.dopants = vec![Default::default()];
    let mut sim = StemSimulator::new(cfg, 11).unwrap();
    let si = sim.specimen().indices_of(14)[0];
    let s = sim.specimen().atoms[si];
    let nb = sim.specimen().neighbors(si, 1.6e-10);
    let q = sim.specimen().atoms[nb[0]];
    let len = (q.x - s.x).hypot(q.y - s.y);
    let beam = [
        s.x + 0.85e-10 * (q.x - s.x) / len,
        s.y + 0.85e-10 * (q.y - s.y) / len,
    ];
    // Mean time to the first hop at the peak is 3/ln2 s plus small side rates: over many 1.5 s
    // dwells, the first hop comes after about 3 dwells.
    let mut waits = Vec::new();
    for seed in 0..60 {
        sim.reset(seed).unwrap();
        let mut n = 0;
        loop {
            n += 1;
            sim.move_probe(beam).unwrap();
            sim.acquire_point(1.5).unwrap();
            if !sim.last_damage().hops.is_empty() || n > 50 {
                break;
            }
        }
        waits.push(f64::from(n) * 1.5);
    }
    let mean = waits.iter().sum::<f64>() / waits.len() as f64;
    // Exponential with rate ≈ ln2/3 (+ small rates toward the other two neighbours), discretized.
    assert!(mean > 2.5 && mean < 7.5, "mean wait {mean} s");
}

#[test]
fn eels_shows_the_edges_of_the_atoms_under_the_probe() {
    let mut cfg = quiet_config(64);
    cfg.specimen.dopants = vec![Default::default()];
    // Monolayer graphene: t/λ ≈ 0.3 nm / ~100 nm.
    cfg.eels.thickness_ratio = Param::fixed(0.005);
    let mut sim = StemSimulator::new(cfg, 2).unwrap();
    let si = sim.specimen().indices_of(14)[0];
    let a = sim.specimen().atoms[si];
    // A carbon atom about 1 nm from the dopant.
    let c_idx = (0..sim.specimen().atoms.len())
        .filter(|&i| sim.specimen().atoms[i].z == 6)
        .min_by(|&i, &j| {
            let d = |k: usize| {
                ((sim.specimen().atoms[k].x - a.x).hypot(sim.specimen().atoms[k].y - a.y) - 1e-9)
                    .abs()
            };
            d(i).total_cmp(&d(j))
        })
        .unwrap();
    let carbon = sim.specimen().atoms[c_idx];
    let mut measure = |x: f64, y: f64| {
        let d = sim.drift_offset();
        sim.move_probe([x + d[0], y + d[1]]).unwrap();
        let spec = sim.acquire_spectrum(0.5).unwrap();
        let (e, c) = (spec.energy.to_vec(), spec.counts.to_vec());
        assert!(c.iter().all(|v| v.is_finite() && *v >= 0.0));
        move |lo: f64, hi: f64| -> f64 {
            e.iter()
                .zip(&c)
                .filter(|(x, _)| **x >= lo && **x < hi)
                .map(|(_, v)| f64::from(*v))
                .sum::<f64>()
        }
    };
    let on_si = measure(a.x, a.y);
    let on_c = measure(carbon.x, carbon.y);
    // Si-L2,3 (99 eV) jumps on the dopant, not on a carbon atom 1 nm away.
    assert!(
        on_si(100.0, 110.0) > 1.5 * on_si(88.0, 98.0),
        "Si-L on Si: {} vs {}",
        on_si(100.0, 110.0),
        on_si(88.0, 98.0)
    );
    let (b, ab) = (on_c(88.0, 98.0), on_c(100.0, 110.0));
    assert!(ab < b + 5.0 * b.sqrt() + 5.0, "Si-L on C: {ab} vs {b}");
    // C-K (284 eV) jumps on the carbon atom.
    assert!(
        on_c(286.0, 296.0) > 1.5 * on_c(272.0, 282.0),
        "C-K on C: {} vs {}",
        on_c(286.0, 296.0),
        on_c(272.0, 282.0)
    );
    // No oxygen in graphene: no jump at O-K (532 eV) beyond noise.
    let (below, above) = (on_c(515.0, 530.0), on_c(534.0, 549.0));
    assert!(
        above < below + 5.0 * below.sqrt() + 5.0,
        "O-K: {above} vs {below}"
    );
}

#[test]
fn spectrum_image_maps_the_dopant() {
    let mut cfg = quiet_config(64);
    cfg.specimen.dopants = vec![Default::default()];
    cfg.eels.thickness_ratio = Param::fixed(0.005);
    let mut sim = StemSimulator::new(cfg, 4).unwrap();
    let si = sim.specimen().atoms[sim.specimen().indices_of(14)[0]];
    // Centre the 9×9 map (0.5 Å steps) on the dopant.
    let mut scan = sim.scan_settings();
    let d = sim.drift_offset();
    scan.center = [si.x + d[0], si.y + d[1]];
    sim.configure_scan(&scan).unwrap();
    let cube = sim.spectrum_image(9, 9, 0.5e-10, 0.05).unwrap();
    let energy = sim.probe_spec().energy;
    assert!(energy > 0.0);
    assert_eq!(cube.dim().0, 9);
    assert_eq!(cube.dim().1, 9);
    // Si-L2,3 signal (100-130 eV window index range from the default axis: -10 eV + 0.5 eV/ch).
    let ch = |e: f64| ((e + 10.0) / 0.5) as usize;
    let si_signal =
        |i: usize, j: usize| -> f32 { (ch(100.0)..ch(130.0)).map(|k| cube[[i, j, k]]).sum() };
    let centre = si_signal(4, 4);
    let corner = si_signal(0, 0);
    assert!(
        centre > 1.5 * corner,
        "Si-L at the dopant {centre} vs 2.8 Å away {corner}"
    );
}

#[test]
fn small_frames_and_a_grid_changed_before_reset_acquire_without_panicking() {
    // Regressions: frames under 16 pixels a side (8 is the smallest accepted) panicked in the frame geometry, and a scan grid
    // changed by configure_scan and then reset kept the old grid's probe kernel.
    let mut sim = StemSimulator::new(quiet_config(64), 3).unwrap();
    let mut small = sim.scan_settings();
    for (rows, cols) in [(8, 8), (8, 12), (15, 9)] {
        small.rows = rows;
        small.cols = cols;
        sim.configure_scan(&small).unwrap();
        let f = sim.acquire_frame().unwrap();
        assert_eq!(f.image.dim(), (rows, cols));
        assert!(f.image.iter().all(|v| v.is_finite() && *v >= 0.0));
    }
    sim.reset(4).unwrap();
    let f = sim.acquire_frame().unwrap();
    assert_eq!(f.image.dim(), (64, 64));
    assert!(f.image.iter().all(|v| v.is_finite() && *v >= 0.0));
}
