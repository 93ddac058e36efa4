//! Depth of focus and specimen tilt (issue 15 §2, `[depth_of_focus]`, `specimen.tilt`): atoms at
//! different heights are imaged with the probe defocused by their height (C10 + h), exactly the
//! sum of single-depth renders at the matching defocus; the on-axis intensity of an
//! aberration-free probe falls to half at ±0.886 λ/α² (depth of field 1.77 λ/α²), in frames and
//! in point exposures, whose counts equal the frame's; a tilt moves an atom at height h by
//! h·tan θ in projection.

use scopegym_physics::instrument::StemInstrument;
use scopegym_physics::param::Param;
use scopegym_physics::stem::optics::electron_wavelength;
use scopegym_physics::stem::specimen::{Atom, Crystal, Specimen, SpecimenConfig};
use scopegym_physics::stem::{StemConfig, StemSimulator};

/// Noiseless, no drift or damage, `n²` pixels of `dx` (m).
fn quiet(n: usize, dx: f64) -> StemConfig {
    let mut cfg = StemConfig::default().without_scan_distortions();
    cfg.scan.pixels = [n, n];
    cfg.scan.pixel_size = Param::fixed(dx);
    cfg.detector.shot_noise = false;
    cfg.damage.sputtering = false;
    cfg.damage.dopant_hops = false;
    cfg
}

/// The noiseless frame of a finite specimen of `atoms` (Z = 79).
fn image(cfg: &StemConfig, atoms: &[[f64; 3]]) -> Vec<f32> {
    let mut sim = with_atoms(cfg, atoms);
    sim.acquire_frame().unwrap();
    sim.last_noiseless().iter().copied().collect()
}

/// Two gold atoms 1.6 nm apart at heights 0 and 10 nm under C10 = −10 nm: the deeper one is in
/// focus (C10 + h = 0) and sharp; the frame is the sum of the single-atom frames without depth
/// of focus at C10 = −10 nm and at 0 (to f32 rounding).
#[test]
fn a_deeper_atom_is_imaged_at_its_own_defocus() {
    let (n, dx) = (128, 0.2e-10);
    let mut cfg = quiet(n, dx);
    cfg.optics.c10 = Param::fixed(-10e-9);
    let (a, b) = ([-0.8e-9, 0.0, 0.0], [0.8e-9, 0.0, 10e-9]);
    let mut depth = cfg.clone();
    depth.depth_of_focus.enabled = true;
    let both = image(&depth, &[a, b]);
    let first = image(&cfg, &[a]);
    let mut focused = cfg.clone();
    focused.optics.c10 = Param::fixed(0.0);
    let second = image(&focused, &[b]);
    let max = both.iter().fold(0.0f32, |m, &v| m.max(v));
    for (k, ((v, p), q)) in both.iter().zip(&first).zip(&second).enumerate() {
        assert!(
            (v - (p + q)).abs() <= 1e-4 * max,
            "pixel {k}: {v} vs {p} + {q}"
        );
    }
    // Pixels of the atoms: x = ±0.8 nm at the frame centre row.
    let at = |x: f64| {
        let c = (x / dx + 0.5 * (n as f64 - 1.0)).round() as usize;
        both[(n / 2) * n + c].max(both[(n / 2 - 1) * n + c])
    };
    println!(
        "peaks: in focus {} vs defocused {}",
        at(0.8e-9),
        at(-0.8e-9)
    );
    assert!(
        at(0.8e-9) > 3.0 * at(-0.8e-9),
        "{} vs {}",
        at(0.8e-9),
        at(-0.8e-9)
    );
    // Without depth of focus both atoms are blurred alike.
    let flat = image(&cfg, &[a, b]);
    let at_flat = |x: f64| {
        let c = (x / dx + 0.5 * (n as f64 - 1.0)).round() as usize;
        flat[(n / 2) * n + c].max(flat[(n / 2 - 1) * n + c])
    };
    assert!((at_flat(0.8e-9) / at_flat(-0.8e-9) - 1.0).abs() < 0.05);
}

/// Atoms all at one height: depth of focus changes nothing (to rounding).
#[test]
fn a_flat_specimen_is_unchanged_by_depth_of_focus() {
    let mut cfg = quiet(48, 0.2e-10);
    let plain = {
        let mut sim = StemSimulator::new(cfg.clone(), 2).unwrap();
        sim.acquire_frame().unwrap();
        sim.last_noiseless().to_owned()
    };
    cfg.depth_of_focus.enabled = true;
    let mut sim = StemSimulator::new(cfg, 2).unwrap();
    sim.acquire_frame().unwrap();
    let depth = sim.last_noiseless().to_owned();
    let max = plain.iter().fold(0.0f32, |m, &v| m.max(v));
    for (p, d) in plain.iter().zip(&depth) {
        assert!((p - d).abs() <= 1e-6 * max, "{p} vs {d}");
    }
}

/// The quiet set-up of [`quiet`] with an aberration-free probe (C30 = C50 = 0 at the default
/// C10 = 0, no source or chromatic blur) and depth of focus on: the closed form's conditions.
fn aberration_free_with_depth(n: usize, dx: f64) -> StemConfig {
    let mut cfg = quiet(n, dx);
    cfg.optics.c30 = Param::fixed(0.0);
    cfg.optics.c50 = Param::fixed(0.0);
    cfg.optics.source_size = Param::fixed(0.0);
    cfg.optics.energy_spread = Param::fixed(0.0);
    cfg.depth_of_focus.enabled = true;
    cfg
}

/// Born & Wolf §8.8: the on-axis intensity of an aberration-free probe of semi-angle α at defocus
/// Δf is I₀ [sin(x)/x]², x = π Δf α² / (2λ): half at Δf = ±0.886 λ/α², the depth of field
/// 1.77 λ/α². An atom at height ±0.886 λ/α² under C10 = 0 (no C30, C50, source or chromatic
/// blur; 256² pixels of 0.05 Å, a probe grid wide enough for the defocused probe's tails)
/// peaks at half the in-focus atom's peak within 3 % (measured 0.497).
#[test]
fn depth_of_field_is_the_closed_form() {
    let cfg = aberration_free_with_depth(256, 0.05e-10);
    let lambda = electron_wavelength(cfg.optics.energy.get());
    let alpha = cfg.optics.convergence_angle.get();
    let x: f64 = 1.391_557_4; // sin(x)/x = 1/√2
    assert!((x.sin() / x - 0.5f64.sqrt()).abs() < 1e-7);
    let half = 2.0 * x * lambda / (std::f64::consts::PI * alpha * alpha);
    assert!((half / (lambda / (alpha * alpha)) - 0.886).abs() < 1e-3);
    let peak = |h: f64| {
        image(&cfg, &[[0.0, 0.0, h]])
            .iter()
            .fold(0.0f32, |m, &v| m.max(v)) as f64
    };
    let focus = peak(0.0);
    for h in [half, -half] {
        let r = peak(h) / focus;
        println!("h = {h} m: peak ratio {r}");
        assert!((r - 0.5).abs() < 0.03 * 0.5, "h = {h}: peak ratio {r}");
    }
}

/// A tilt θ moves every atom of a built crystal by h·tan θ in projection (in the periodic cell),
/// and the image of an atom at h = 5 nm tilted by (0.02, −0.01) rad moves by h·tan θ: 5.0007 and
/// −2.5001 pixels of 0.2 Å, measured (intensity centroid) within 1 % of a pixel.
#[test]
fn tilt_moves_atoms_by_height_times_tan_theta() {
    let mut sc = SpecimenConfig {
        crystal: Crystal::Fcc110,
        thickness: 3,
        ..Default::default()
    };
    let plain = sc
        .build([2e-9, 2e-9], &mut scopegym_physics::rng::seeded(0))
        .unwrap();
    let tilt = [0.03, -0.02];
    sc.tilt = tilt.map(Param::fixed);
    let tilted = sc
        .build([2e-9, 2e-9], &mut scopegym_physics::rng::seeded(0))
        .unwrap();
    let cell = plain.cell.unwrap();
    assert_eq!(plain.atoms.len(), tilted.atoms.len());
    assert!(plain.atoms.iter().any(|a| a.height.abs() > 1e-10));
    for (p, t) in plain.atoms.iter().zip(&tilted.atoms) {
        let want = cell.wrap([
            p.x + p.height * tilt[0].tan(),
            p.y + p.height * tilt[1].tan(),
        ]);
        assert!((t.x - want[0]).abs() < 1e-20 && (t.y - want[1]).abs() < 1e-20);
        assert_eq!(t.height, p.height);
    }

    let (n, dx) = (96, 0.2e-10);
    let cfg = quiet(n, dx);
    let h = 5e-9;
    let theta = [0.02, -0.01];
    let centroid = |img: &[f32]| {
        let (mut s, mut sx, mut sy) = (0.0, 0.0, 0.0);
        for (k, &v) in img.iter().enumerate() {
            let v = f64::from(v);
            s += v;
            sx += v * (k % n) as f64;
            sy += v * (k / n) as f64;
        }
        [sx / s, sy / s]
    };
    let mut s = Specimen {
        atoms: vec![Atom {
            x: -0.3e-10,
            y: 0.2e-10,
            height: h,
            z: 79,
        }],
        cell: None,
    };
    let before = centroid(&image(&cfg, &[[s.atoms[0].x, s.atoms[0].y, h]]));
    s.tilt(theta);
    let after = centroid(&image(&cfg, &[[s.atoms[0].x, s.atoms[0].y, h]]));
    for k in 0..2 {
        let want = h * theta[k].tan() / dx;
        let got = after[k] - before[k];
        println!("axis {k}: moved {got} px, h tan θ = {want} px");
        assert!(
            (got - want).abs() < 0.01,
            "axis {k}: moved {got} px, h tan θ = {want} px"
        );
    }
}

/// A simulator of `cfg` whose specimen is `atoms` (Z = 79).
fn with_atoms(cfg: &StemConfig, atoms: &[[f64; 3]]) -> StemSimulator {
    let mut sim = StemSimulator::new(cfg.clone(), 0).unwrap();
    *sim.specimen_mut() = Specimen {
        atoms: atoms
            .iter()
            .map(|&[x, y, height]| Atom {
                x,
                y,
                height,
                z: 79,
            })
            .collect(),
        cell: None,
    };
    sim
}

/// Point exposures see each atom at the defocus of its height too: the on-axis closed form of
/// `depth_of_field_is_the_closed_form` holds for the expected point counts on the atom (half
/// at ±0.886 λ/α², within 3 %), measured above the counts of an empty specimen.
#[test]
fn point_exposures_have_the_same_depth_of_field() {
    let mut cfg = aberration_free_with_depth(256, 0.05e-10);
    let lambda = electron_wavelength(cfg.optics.energy.get());
    let alpha = cfg.optics.convergence_angle.get();
    let half = 0.886 * lambda / (alpha * alpha);
    let dwell = 1e-3;
    let empty = with_atoms(&cfg, &[]).acquire_point(dwell).unwrap();
    let point = |h: f64| {
        with_atoms(&cfg, &[[0.0, 0.0, h]])
            .acquire_point(dwell)
            .unwrap()
            - empty
    };
    let focus = point(0.0);
    assert!(focus > 0.0);
    for h in [half, -half] {
        let r = point(h) / focus;
        println!("h = {h} m: point ratio {r}");
        assert!((r - 0.5).abs() < 0.03 * 0.5, "h = {h}: point ratio {r}");
    }
    // Without depth of focus the height does not matter.
    cfg.depth_of_focus.enabled = false;
    let flat = with_atoms(&cfg, &[[0.0, 0.0, half]])
        .acquire_point(dwell)
        .unwrap()
        - empty;
    assert!((flat / focus - 1.0).abs() < 1e-9, "{flat} vs {focus}");
}

/// The point counts equal the noiseless frame's at the same positions with depth of focus on:
/// two gold atoms at heights 0 and 10 nm under C10 = −10 nm (one defocused, one in focus),
/// within 1.5 % of the pixel's value (floored at 5 % of the frame's maximum) on a grid of
/// pixels around both.
#[test]
fn point_counts_equal_the_frame_counts_with_depth_of_focus() {
    let (n, dx) = (64, 0.4e-10);
    let mut cfg = quiet(n, dx);
    cfg.optics.c10 = Param::fixed(-10e-9);
    cfg.depth_of_focus.enabled = true;
    let mut sim = with_atoms(&cfg, &[[-0.4e-9, 0.0, 0.0], [0.4e-9, 0.0, 10e-9]]);
    sim.acquire_frame().unwrap();
    let frame = sim.last_noiseless().to_owned();
    let sc = sim.scan_settings();
    let max = frame.iter().fold(0.0f32, |m, &v| m.max(v)) as f64;
    let mut worst = 0.0f64;
    for r in (n / 2 - 8..n / 2 + 8).step_by(2) {
        for c in (n / 2 - 16..n / 2 + 16).step_by(2) {
            let x = sc.center[0] + (c as f64 - 0.5 * (n as f64 - 1.0)) * dx;
            let y = sc.center[1] + (r as f64 - 0.5 * (n as f64 - 1.0)) * dx;
            sim.move_probe([x, y]).unwrap();
            let point = sim.acquire_point(sc.dwell_time).unwrap();
            let f = f64::from(frame[[r, c]]);
            worst = worst.max((point - f).abs() / f.max(0.05 * max));
        }
    }
    println!("worst relative difference {worst}");
    assert!(worst < 0.015, "worst relative difference {worst}");
}
