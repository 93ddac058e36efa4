//! Aberrations that drift in time (issue 15 §2, `[aberration_drift]`): the defocus follows
//! `C10(t) = C10₀ + r t` exactly at the start of every frame and point exposure, a later frame
//! equals the frame of a static instrument at the closed-form defocus (and is blurrier), the
//! random walk is deterministic per seed, and a drift that is off leaves frames bit for bit.

use scopegym_physics::instrument::StemInstrument;
use scopegym_physics::param::Param;
use scopegym_physics::stem::{StemConfig, StemSimulator};

/// Noiseless graphene, no scan distortions or damage, `n²` pixels.
fn quiet(n: usize) -> StemConfig {
    let mut cfg = StemConfig::default().without_scan_distortions();
    cfg.scan.pixels = [n, n];
    cfg.detector.shot_noise = false;
    cfg.damage.sputtering = false;
    cfg.damage.dopant_hops = false;
    cfg
}

#[test]
fn linear_defocus_drift_is_exact_at_every_exposure_start() {
    let mut cfg = quiet(16);
    let (c0, r) = (cfg.optics.c10.get(), 2.5e-7);
    cfg.aberration_drift.rates.c10 = r;
    cfg.aberration_drift.rates.phi12 = 0.1;
    let mut sim = StemSimulator::new(cfg, 3).unwrap();
    sim.set_blanked(false).unwrap();
    for k in 0..4 {
        let t = sim.acquire_frame().unwrap().meta.t_start;
        assert!(k == 0 || t > 0.0);
        let a = sim.aberrations_in_force();
        assert_eq!(a.c10, c0 + r * t, "frame {k}");
        assert_eq!(a.phi12, 0.1 * t);
        // The instrument reports the corrector's setting, not the drift.
        assert_eq!(sim.aberrations().c10, c0);
    }
    let t = sim.clock();
    sim.acquire_point(1e-3).unwrap();
    assert_eq!(sim.aberrations_in_force().c10, c0 + r * t);
    // A new setting: the drift goes on from it.
    let mut set = sim.aberrations();
    set.c10 = 7e-9;
    sim.set_aberrations(&set).unwrap();
    let t = sim.acquire_frame().unwrap().meta.t_start;
    assert_eq!(sim.aberrations_in_force().c10, 7e-9 + r * t);
    // With an update interval, the probe follows the drift at the floored time.
    let mut cfg = quiet(16);
    cfg.aberration_drift.rates.c10 = r;
    cfg.aberration_drift.update_interval = Param::fixed(0.01);
    let mut sim = StemSimulator::new(cfg, 3).unwrap();
    for _ in 0..6 {
        let t = sim.acquire_frame().unwrap().meta.t_start;
        let tq = (t / 0.01).floor() * 0.01;
        assert_eq!(sim.aberrations_in_force().c10, c0 + r * tq);
    }
}

/// The frame that starts at t equals (to rounding) the frame of an instrument without drift set
/// to the closed-form defocus C10₀ + r t, and its atoms' peaks are lower than the first frame's.
#[test]
fn a_later_frame_is_the_static_frame_at_the_predicted_defocus() {
    let n = 48;
    let base = quiet(n);
    let c0 = base.optics.c10.get();
    let mut cfg = base.clone();
    let frame_time = StemSimulator::new(cfg.clone(), 1)
        .unwrap()
        .scan_settings()
        .frame_time();
    // 6 nm of defocus per frame.
    let r = 6e-9 / frame_time;
    cfg.aberration_drift.rates.c10 = r;
    let mut sim = StemSimulator::new(cfg, 1).unwrap();
    sim.acquire_frame().unwrap();
    let first = sim.last_noiseless().to_owned();
    let t = sim.acquire_frame().unwrap().meta.t_start;
    let later = sim.last_noiseless().to_owned();
    let mut fixed = base.clone();
    fixed.optics.c10 = Param::fixed(c0 + r * t);
    let mut reference = StemSimulator::new(fixed, 1).unwrap();
    reference.acquire_frame().unwrap();
    let want = reference.last_noiseless().to_owned();
    let max = want.iter().fold(0.0f32, |m, &v| m.max(v));
    for (a, b) in later.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-6 * max, "{a} vs {b}");
    }
    let peak = |img: &ndarray::Array2<f32>| img.iter().fold(0.0f32, |m, &v| m.max(v));
    println!(
        "defocus {} nm: peak {} vs {} in focus",
        (r * t) * 1e9,
        peak(&later),
        peak(&first)
    );
    assert!(
        peak(&later) < 0.9 * peak(&first),
        "defocused by {} nm: peak {} vs {}",
        (r * t) * 1e9,
        peak(&later),
        peak(&first)
    );
}

#[test]
fn the_random_walk_is_deterministic_per_seed_and_off_is_bit_identical() {
    let frames = |cfg: StemConfig, seed: u64| {
        let mut sim = StemSimulator::new(cfg, seed).unwrap();
        let mut out = Vec::new();
        for _ in 0..3 {
            out.extend(sim.acquire_frame().unwrap().image.iter().copied());
        }
        (out, sim.aberrations_in_force())
    };
    let mut walk = StemConfig::default();
    walk.scan.pixels = [24, 24];
    let plain = walk.clone();
    walk.aberration_drift.c10_diffusivity = Param::fixed(1e-15);
    walk.aberration_drift.c12_diffusivity = Param::fixed(1e-15);
    let (a, aa) = frames(walk.clone(), 4);
    let (b, ab) = frames(walk.clone(), 4);
    assert_eq!(a, b);
    assert_eq!(aa, ab);
    let (c, ac) = frames(walk, 5);
    assert_ne!(aa, ac);
    assert_ne!(a, c);
    // Off (zero rates and diffusivities, another update interval): bit for bit the default.
    let mut off = plain.clone();
    off.aberration_drift.update_interval = Param::fixed(0.5);
    let (p, _) = frames(plain, 4);
    let (q, _) = frames(off, 4);
    assert!(p.iter().zip(&q).all(|(x, y)| x.to_bits() == y.to_bits()));
}
