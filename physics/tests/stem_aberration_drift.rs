//! Aberrations that drift in time (issue 15 §2, `[aberration_drift]`): the defocus follows
//! `C10(t) = C10₀ + r t` exactly at the start of every frame and point exposure, a later frame
//! equals the frame of a static instrument at the closed-form defocus (and is blurrier), the
//! random walk is deterministic per seed, a drift that is off leaves frames bit for bit, and
//! with `within_frame` each part of a frame equals the static frame at its own defocus.

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

/// With `within_frame`, each row is imaged with the aberrations at its start floored to the
/// update interval: the rows of each part of a frame equal (to rounding) the same rows of a
/// static instrument at the closed-form defocus C10₀ + r t_k of that part, and the last part
/// differs visibly from the frame-start probe's image.
#[test]
fn within_a_frame_each_part_is_the_static_frame_at_its_defocus() {
    let n = 48;
    let base = quiet(n);
    let c0 = base.optics.c10.get();
    let settings = StemSimulator::new(base.clone(), 1).unwrap().scan_settings();
    let (frame_time, line) = (
        settings.frame_time(),
        settings.cols as f64 * settings.dwell_time + settings.flyback_time,
    );
    // 8 nm of defocus over the frame, followed every quarter of it.
    let r = 8e-9 / frame_time;
    let interval = frame_time / 4.0;
    let mut cfg = base.clone();
    cfg.aberration_drift.rates.c10 = r;
    cfg.aberration_drift.update_interval = Param::fixed(interval);
    cfg.aberration_drift.within_frame = true;
    let mut sim = StemSimulator::new(cfg, 1).unwrap();
    sim.acquire_frame().unwrap();
    let got = sim.last_noiseless().to_owned();
    let static_frame = |c10: f64| {
        let mut fixed = base.clone();
        fixed.optics.c10 = Param::fixed(c10);
        let mut s = StemSimulator::new(fixed, 1).unwrap();
        s.acquire_frame().unwrap();
        s.last_noiseless().to_owned()
    };
    let start = static_frame(c0);
    let max = start.iter().fold(0.0f32, |m, &v| m.max(v));
    let (mut parts, mut worst) = (0, 0.0f32);
    let mut row = 0;
    while row < n {
        let tq = ((row as f64 * line) / interval).floor() * interval;
        let end = (row..n)
            .find(|&k| ((k as f64 * line) / interval).floor() * interval != tq)
            .unwrap_or(n);
        let want = static_frame(c0 + r * tq);
        for i in row..end {
            for j in 0..n {
                let (a, b) = (got[[i, j]], want[[i, j]]);
                assert!((a - b).abs() <= 1e-6 * max, "row {i} col {j}: {a} vs {b}");
                worst = worst.max((a - b).abs() / max);
            }
        }
        parts += 1;
        row = end;
    }
    assert!(parts >= 4, "{parts} parts");
    let last = n - 1;
    let gap = (0..n)
        .map(|j| (got[[last, j]] - start[[last, j]]).abs())
        .fold(0.0f32, f32::max);
    println!(
        "{parts} parts: worst gap to the static frames {worst:e} of the peak; last row vs the \
         frame-start probe {}",
        gap / max
    );
    assert!(
        gap > 0.05 * max,
        "the last row barely changed: {gap} of {max}"
    );
    // The frame-start probe is the one in force at the start, and the last part's after it.
    assert_eq!(
        sim.aberrations_in_force().c10,
        c0 + r * (((last as f64 * line) / interval).floor() * interval)
    );
}

/// `within_frame` needs an update interval, and a frame may be imaged by at most 64 probes;
/// a frame inside one interval is bit for bit the frame without `within_frame` (shot noise on).
#[test]
fn within_frame_checks_its_interval_and_changes_nothing_within_one() {
    let mut cfg = quiet(16);
    cfg.aberration_drift.rates.c10 = 1e-7;
    cfg.aberration_drift.within_frame = true;
    let e = StemSimulator::new(cfg.clone(), 1).unwrap_err().to_string();
    assert!(e.contains("aberration_drift.update_interval"), "{e}");
    // 128 rows over 100 intervals: 100 probes.
    let mut many = cfg.clone();
    many.scan.pixels = [128, 128];
    let frame_time = StemSimulator::new(quiet(128), 1)
        .unwrap()
        .scan_settings()
        .frame_time();
    many.aberration_drift.update_interval = Param::fixed(frame_time / 100.0);
    let mut sim = StemSimulator::new(many, 1).unwrap();
    let e = sim.acquire_frame().unwrap_err().to_string();
    assert!(
        e.contains("aberration_drift.update_interval") && e.contains("100 probes"),
        "{e}"
    );
    // One interval longer than every frame (and frames that start on its multiples).
    cfg.detector.shot_noise = true;
    cfg.aberration_drift.update_interval = Param::fixed(1e3);
    let frames = |within: bool| {
        let mut c = cfg.clone();
        c.aberration_drift.within_frame = within;
        let mut sim = StemSimulator::new(c, 7).unwrap();
        (0..2)
            .flat_map(|_| {
                sim.acquire_frame()
                    .unwrap()
                    .image
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(frames(true), frames(false));
}
