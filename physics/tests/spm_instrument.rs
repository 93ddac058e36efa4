//! The simulated SPM through its instrument traits (DESIGN.md §5, §10): conditioning changes
//! later images, writing grows domains, manipulation moves adatoms, feedback lag shows between
//! trace and retrace, refusals and errors, and invariants under random operation sequences.

use ndarray::Array2;
use proptest::prelude::*;
use scopegym_physics::PhysicsError;
use scopegym_physics::instrument::{
    BiasWriting, LateralManipulation, PointSpectroscopy, SpmInstrument, SpmMode, TipConditioning,
};
use scopegym_physics::param::Param;
use scopegym_physics::spm::adatoms::AdatomConfig;
use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
use scopegym_physics::spm::surface::SurfaceKind;
use scopegym_physics::spm::tip::{
    Conditioning, SecondApex, TipState, feature_sharpness as sharpness,
};

/// A quiet STM: 10 nm of Ag(111) with 8 adatoms, no scanner imperfections.
fn stm() -> SpmConfig {
    let mut c = SpmConfig::default().without_scanner_imperfections();
    c.mode = SpmMode::Stm;
    c.sample.size = Param::fixed(12e-9);
    c.sample.pixels = 96;
    c.sample.crash_threshold = Param::fixed(0.5e-9);
    c.scan.pixels = [64, 64];
    c.scan.size = Param::fixed(10e-9);
    c.scan.line_rate = Param::fixed(4.0);
    c.surface.kind = SurfaceKind::Flat;
    c.surface.roughness = Param::fixed(0.0);
    c.adatoms = AdatomConfig {
        count: 8,
        ..Default::default()
    };
    c.tip.initial_radius = Param::fixed(0.5e-9);
    c.tip.min_radius = Param::fixed(0.3e-9);
    c.tip.good_radius = Param::fixed(0.6e-9);
    c.tip.max_radius = Param::fixed(5e-9);
    c.tip.initial_double_probability = Param::fixed(0.0);
    c.tip.initial_adsorbate_probability = Param::fixed(0.0);
    c.tip.adsorbate_rate = Param::fixed(0.0);
    c.tip.wear_rate = Param::fixed(0.0);
    c
}

fn image(sim: &mut SpmSimulator) -> Array2<f32> {
    sim.acquire_frame().unwrap().main().image.clone()
}

#[test]
fn conditioning_changes_later_images() {
    // Start from bad tips (blunt, double) and condition them with DeepSPM's actions, imaging
    // after every action. Each time the hidden tip gets better (quality up) the next image is
    // sharper than the one before; each time it gets worse, blurrier.
    let mut cfg = stm();
    // Only conditioning changes the tip here (no crash mid-frame).
    cfg.sample.crash_threshold = Param::fixed(10e-9);
    let actions = Conditioning::deepspm_actions();
    let (mut better, mut worse) = (0, 0);
    for seed in 0..6u64 {
        let mut sim = SpmSimulator::new(cfg.clone(), seed).unwrap();
        let bad = TipState::sharp(1.2e-9)
            .unwrap()
            .with_second_apex(Some(SecondApex {
                offset: [0.8e-9, 0.3e-9],
                dz: 0.05e-9,
            }))
            .unwrap();
        sim.set_tip_state(bad).unwrap();
        let mut prev = sharpness(image(&mut sim).view());
        for k in 0..16 {
            let t0 = sim.tip_state().clone();
            let q0 = t0.quality(&cfg.tip);
            sim.condition_tip(&actions[(seed as usize * 5 + k * 7) % 12])
                .unwrap();
            let q1 = sim.tip_state().quality(&cfg.tip);
            let now = sharpness(image(&mut sim).view());
            if q1 > q0 {
                better += 1;
                assert!(
                    now > prev,
                    "tip improved ({q0:.3} -> {q1:.3}) but sharpness {prev:.3} -> {now:.3}"
                );
            } else if q1 < q0 {
                worse += 1;
                assert!(
                    now < prev,
                    "tip worsened ({q0:.3} -> {q1:.3}) to {:?} but sharpness {prev:.3} -> {now:.3}",
                    sim.tip_state()
                );
            } else if sim.tip_state() == &t0 && !t0.has_adsorbate() {
                // (An adsorbate adds fresh noise to every frame.)
                assert_eq!(
                    now, prev,
                    "unchanged tip {t0:?}, unchanged image (seed {seed}, action {k})"
                );
            }
            prev = now;
        }
    }
    println!("{better} improvements and {worse} worsenings, each seen in the next image");
    assert!(
        better >= 5 && worse >= 5,
        "{better} improvements, {worse} worsenings"
    );
}

#[test]
fn trace_and_retrace_differ_by_the_feedback_lag_at_steps() {
    let mut c = SpmConfig::default().without_scanner_imperfections();
    c.sample.pixels = 128;
    c.sample.size = Param::fixed(1e-6);
    c.scan.pixels = [16, 128];
    c.scan.size = Param::fixed(1e-6);
    c.surface.kind = SurfaceKind::Terraces;
    c.surface.step_direction = Param::fixed(std::f64::consts::FRAC_PI_2 * 0.0);
    c.surface.roughness = Param::fixed(0.0);
    c.tip.wear_rate = Param::fixed(0.0);
    let mut sim = SpmSimulator::new(c, 1).unwrap();
    let f = sim.acquire_frame().unwrap();
    let (t, r) = (
        f.channel("height").unwrap().image.clone(),
        f.channel("height_retrace").unwrap().image.clone(),
    );
    let ideal = sim.last_noiseless().to_owned();
    // Away from the steps both follow the surface; at the steps the trace lags to the right and
    // the retrace to the left, so they differ by the step height over about v/Ki.
    let diff: f64 = t
        .iter()
        .zip(r.iter())
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0.0, f64::max);
    let err_trace: f64 = t
        .iter()
        .zip(ideal.iter())
        .map(|(a, b)| f64::from((a - b).abs()))
        .sum::<f64>()
        / t.len() as f64;
    println!("max |trace - retrace| = {diff:.3e} m, mean |trace - ideal| = {err_trace:.3e} m");
    assert!(
        diff > 0.1e-9,
        "trace and retrace should differ at 0.39 nm steps: {diff}"
    );
    assert!(err_trace < 0.1e-9, "tracking error too large: {err_trace}");
}

fn up_cells(sim: &SpmSimulator) -> usize {
    sim.film()
        .unwrap()
        .polarization()
        .iter()
        .filter(|&&p| p > 0.0)
        .count()
}

#[test]
fn bias_pulses_write_domains_that_grow_with_amplitude_and_duration() {
    let mut c = SpmConfig::default().without_scanner_imperfections();
    c.mode = SpmMode::Pfm;
    c.sample.pixels = 96;
    c.sample.size = Param::fixed(1e-6);
    c.scan.pixels = [32, 32];
    c.scan.size = Param::fixed(1e-6);
    c.pfm.up_fraction = Param::fixed(0.0);
    c.pfm.field_per_volt = Param::fixed(0.29);
    let written = |bias: f64, duration: f64| {
        let mut sim = SpmSimulator::new(c.clone(), 4).unwrap();
        let before = up_cells(&sim);
        sim.bias_pulse([0.0, 0.0], bias, duration).unwrap();
        up_cells(&sim) - before
    };
    let by_amp: Vec<usize> = [6.0, 8.0, 10.0].iter().map(|&v| written(v, 0.01)).collect();
    let by_time: Vec<usize> = [0.001, 0.01, 0.1]
        .iter()
        .map(|&t| written(8.0, t))
        .collect();
    println!(
        "written cells by amplitude 6/8/10 V: {by_amp:?}; by duration 1/10/100 ms: {by_time:?}"
    );
    assert!(by_amp[0] < by_amp[1] && by_amp[1] < by_amp[2], "{by_amp:?}");
    assert!(
        by_time[0] < by_time[1] && by_time[1] < by_time[2],
        "{by_time:?}"
    );
    // A written domain shows in the next PFM phase image.
    let mut sim = SpmSimulator::new(c.clone(), 4).unwrap();
    let p0 = sim.acquire_frame().unwrap().main().image.clone();
    sim.bias_pulse([0.0, 0.0], 10.0, 0.05).unwrap();
    let p1 = sim.acquire_frame().unwrap().main().image.clone();
    let flipped = p0
        .iter()
        .zip(p1.iter())
        .filter(|(a, b)| (*a - *b).abs() > 90.0)
        .count();
    assert!(
        flipped >= 4,
        "the written domain is visible: {flipped} pixels flipped"
    );
}

#[test]
fn manipulation_moves_adatoms_and_follows_conductance() {
    let cfg = stm();
    let trials = 40;
    let mut moved = [0usize; 2];
    for (k, g) in [0.05e-6, 5e-6].into_iter().enumerate() {
        for seed in 0..trials {
            let mut sim = SpmSimulator::new(cfg.clone(), seed).unwrap();
            let a = sim.adatoms()[0];
            let start = sim.sample_to_lab(a);
            let end = [start[0] + 1e-9, start[1]];
            let trace = sim.manipulate(start, end, 0.005, g).unwrap();
            assert!(trace.iter().all(|z| z.is_finite()));
            if sim.adatoms().iter().all(|b| b != &a) {
                moved[k] += 1;
            }
        }
    }
    println!(
        "adatom moved in {} / {} drags at low and high conductance",
        moved[0], moved[1]
    );
    assert!(moved[1] > moved[0] + trials as usize / 5, "{moved:?}");
}

#[test]
fn refusals_and_bad_arguments_are_errors() {
    let mut sim = SpmSimulator::new(stm(), 1).unwrap();
    sim.make_safe().unwrap();
    sim.make_safe().unwrap();
    assert!(matches!(
        sim.acquire_frame(),
        Err(PhysicsError::Refused { .. })
    ));
    sim.set_withdrawn(false).unwrap();
    let e = sim.set_bias(f64::NAN).unwrap_err().to_string();
    assert!(e.contains("bias"), "{e}");
    let e = sim.move_probe([1.0, 0.0]).unwrap_err().to_string();
    assert!(e.contains("position"), "{e}");
    assert!(matches!(
        sim.bias_pulse([0.0, 0.0], 1.0, 0.1),
        Err(PhysicsError::Refused { .. })
    ));
    assert!(matches!(
        sim.point_spectroscopy([0.0, 0.0], &[1.0]),
        Err(PhysicsError::Refused { .. })
    ));
    let e = sim
        .manipulate([0.0, 0.0], [1e-9, 0.0], 0.1, 1e-6)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bias"), "{e}");
    let e = sim
        .set_feedback_gains(f64::NAN, 100.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("p_gain"), "{e}");
    let mut bad = stm();
    bad.scan.size = Param::fixed(20e-9);
    let e = SpmSimulator::new(bad, 1).unwrap_err().to_string();
    assert!(e.contains("scan.center"), "{e}");
    // configure_scan keeps the field inside the scanner range.
    let s = sim.scan_settings();
    let mut req = s;
    req.center = [1.0, -1.0];
    let acc = sim.configure_scan(&req).unwrap();
    let half = 6e-9;
    assert!(acc.center[0] + 0.5 * acc.field_of_view()[0] <= half * (1.0 + 1e-9));
    assert!(acc.center[1] - 0.5 * acc.field_of_view()[1] >= -half * (1.0 + 1e-9));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Random sequences of frames, pulses, conditioning and manipulation keep every value
    /// finite and the polarization in [-1, 1]; only conditioning makes the tip sharper.
    #[test]
    fn random_operations_keep_invariants(
        seed in 0u64..1000,
        ops in proptest::collection::vec((0u8..4, -1.0f64..1.0, -1.0f64..1.0, 0.0f64..1.0), 1..6),
    ) {
        for mode in [SpmMode::Afm, SpmMode::Pfm, SpmMode::Stm] {
            let mut c = if mode == SpmMode::Stm { stm() } else { SpmConfig::default() };
            c.mode = mode;
            c.sample.pixels = 48;
            c.scan.pixels = [12, 12];
            if mode != SpmMode::Stm {
                c.scan.size = Param::fixed(0.5e-6);
            }
            let mut sim = SpmSimulator::new(c, seed).unwrap();
            let half = 0.4 * sim.config().sample.size.get();
            for &(op, x, y, v) in &ops {
                let r_before = sim.tip_state().radius();
                let p = [x * half, y * half];
                let conditioned = match op {
                    0 => {
                        let f = sim.acquire_frame().unwrap();
                        for ch in f.channels {
                            prop_assert!(ch.image.iter().all(|z| z.is_finite()), "{} not finite", ch.name);
                        }
                        false
                    }
                    1 if mode == SpmMode::Pfm => {
                        sim.bias_pulse(p, (v - 0.5) * 20.0, 0.001 + 0.01 * v).unwrap();
                        false
                    }
                    2 => {
                        sim.condition_tip(&Conditioning::pulse(if v > 0.5 { 4.0 } else { -2.5 })).unwrap();
                        true
                    }
                    3 if mode == SpmMode::Stm => {
                        let trace = sim.manipulate(p, [p[0] + 1e-9 * v, p[1]], 0.01 * v, 1e-6 + 4e-6 * v).unwrap();
                        prop_assert!(trace.iter().all(|z| z.is_finite()));
                        false
                    }
                    _ => false,
                };
                if !conditioned {
                    prop_assert!(sim.tip_state().radius() >= r_before);
                }
                if let Some(film) = sim.film() {
                    prop_assert!(film.polarization().iter().all(|p| (-1.0..=1.0).contains(p)));
                }
            }
        }
    }
}

#[test]
fn wear_blunts_the_tip_and_later_images() {
    let mut c = SpmConfig::default().without_scanner_imperfections();
    c.sample.pixels = 96;
    c.sample.size = Param::fixed(0.4e-6);
    c.scan.pixels = [48, 48];
    c.scan.size = Param::fixed(0.4e-6);
    c.surface.kind = SurfaceKind::Particles;
    c.surface.particle_radius = Param::fixed(6e-9);
    c.tip.initial_radius = Param::fixed(5e-9);
    c.tip.min_radius = Param::fixed(2e-9);
    c.tip.wear_rate = Param::fixed(1e-3); // fast wear: ~0.4 nm per line pass
    c.tip.adsorbate_rate = Param::fixed(0.0);
    c.sample.crash_threshold = Param::fixed(1e-6);
    let mut sim = SpmSimulator::new(c, 2).unwrap();
    let first = sharpness(image(&mut sim).view());
    let r1 = sim.tip_state().radius();
    for _ in 0..3 {
        image(&mut sim);
    }
    let last = sharpness(image(&mut sim).view());
    let r2 = sim.tip_state().radius();
    println!("wear: R {r1:.2e} -> {r2:.2e} m, sharpness {first:.3} -> {last:.3}");
    assert!(r2 > 2.0 * r1, "the tip wore: {r1} -> {r2}");
    assert!(
        last < first,
        "a worn tip images blurrier: {first} -> {last}"
    );
}
