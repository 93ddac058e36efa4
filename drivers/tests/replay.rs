//! The replay driver on the shared real-instrument recordings (`../shared/data`, or the folder
//! in `SCOPEGYM_DATA` / `SCOPEGYM_DATA_DIR`): tasks run on it, and what it serves matches the
//! raw HDF5 numbers, read here independently with the `hdf5` crate. Each test prints SKIPPED
//! and passes when the data are missing.

use scopegym_drivers::DriverError;
use scopegym_drivers::replay::{REPLAY_PREFIX, ReplayOptions, ReplaySpm};
use scopegym_envs::env::{Env, Info, InfoValue, TaskEnv};
use scopegym_envs::level::Difficulty;
use scopegym_envs::space::Value;
use scopegym_envs::tasks::NewEpisode;
use scopegym_envs::tasks::TaskConfig;
use scopegym_envs::tasks::afm_feedback_tuning::{self, AfmFeedbackTuning};
use scopegym_envs::tasks::pfm_spectroscopy_explore::{
    self as pse, PfmSpectroscopyExplore, despiked_loop_area, poled_waveform,
};
use scopegym_physics::PhysicsError;
use scopegym_physics::instrument::{
    Channel, InstrumentInfo, PointSpectroscopy, ScanSettings, SpmFrame, SpmInstrument, SpmMode,
};
use scopegym_physics::spm::ferro::{loop_coercive, triangle_waveform};
use std::path::PathBuf;

#[path = "support/data.rs"]
mod data;
use data::data;
use std::sync::{Arc, Mutex};

/// A dataset of `file`, read raw as f64, with its shape.
fn raw(file: &PathBuf, dataset: &str) -> (Vec<f64>, Vec<usize>) {
    let f = hdf5::File::open(file).unwrap();
    let d = f.dataset(dataset).unwrap();
    (d.read_raw::<f64>().unwrap(), d.shape())
}

const BEPS: &str = "beps_pto_50x50.h5";
const SCAN: &str = "pto_funakubo_0001.h5";

/// The raw BEPS map: responses `(x, y, bias)` and the bias sweep.
fn raw_beps(file: &PathBuf) -> (Vec<f64>, Vec<f64>) {
    let (d, shape) = raw(file, "Channel_000/generic/generic");
    assert_eq!(shape, [50, 50, 64]);
    let (v, _) = raw(file, "Channel_000/generic/Voltage");
    (d, v)
}

fn raw_loop(d: &[f64], x: usize, y: usize) -> &[f64] {
    &d[(x * 50 + y) * 64..(x * 50 + y + 1) * 64]
}

fn refusal_reason(e: &PhysicsError) -> &str {
    match e {
        PhysicsError::Refused { reason, .. } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The task's config for a recorded BEPS map (module docs of the driver).
fn beps_config(span: f64, loop_points: usize, budget: usize) -> pse::Config {
    let mut c = pse::Config::at_level(Difficulty::Medium);
    c.grid = 50;
    c.field = 2e-6;
    c.pixels = 50;
    c.loop_points = loop_points;
    c.budget = budget;
    c.history_radius = 0.0;
    c.response_span = Some(span);
    c.prior_mean = 0.01;
    c.prior_sd = 0.03;
    c.noise_sd = 0.005;
    c.truth = pse::TruthMode::Off;
    c
}

#[test]
fn pfm_spectroscopy_explore_runs_on_the_recorded_beps_map() {
    let Some(f) = data(BEPS) else { return };
    let (d, v) = raw_beps(&f);
    let replay = ReplaySpm::open(&f, ReplayOptions::default()).unwrap();
    assert!(replay.serves_spectroscopy());
    assert_eq!(replay.mode(), SpmMode::Pfm);
    assert!(!replay.info().simulated);
    let span = replay.recorded_loops().unwrap().span;
    // 64 loop points: the recorded sweep itself, so every served loop must be the raw loop.
    let cfg = beps_config(span, 64, 40);
    let mut env = TaskEnv::new(
        "scopegym/PfmSpectroscopyExplore-v1",
        PfmSpectroscopyExplore::new(cfg, replay),
    );
    let half = 0.5 * span;
    let mut steps = 0;
    for (episode, heuristic) in [(0u64, true), (1, false)] {
        let (mut obs, info) = env.reset(Some(episode)).unwrap();
        assert_eq!(info.get("real_data"), Some(&InfoValue::Bool(true)));
        assert!(env.observation_space().contains(&obs));
        let ov = obs.get("overview").and_then(Value::as_box).unwrap();
        assert!(ov.iter().any(|&p| p > 0.5) && ov.iter().any(|&p| p < 0.5));
        let mut rng = scopegym_envs::rng::seeded(episode);
        loop {
            let a = if heuristic {
                env.heuristic_action(&obs)
            } else {
                env.action_space().sample(&mut rng)
            };
            let k = a.as_discrete().unwrap() as usize;
            let s = env.step(&a).unwrap();
            steps += 1;
            // Point k is pixel (x, y) = (k % 50, k / 50) of the recorded map.
            let r = raw_loop(&d, k % 50, k / 50);
            let ll = s.obs.get("last_loop").and_then(Value::as_box).unwrap();
            assert_eq!(ll.len(), 64);
            for (j, (&got, &want)) in ll.iter().zip(r).enumerate() {
                let want = (want / half).clamp(-1.0, 1.0) as f32;
                assert!(
                    (got - want).abs() <= 1e-6,
                    "point {k}, bias {j}: {got} vs {want}"
                );
            }
            let area = match s.info.get("area") {
                Some(InfoValue::F64(a)) => *a,
                other => panic!("area: {other:?}"),
            };
            let want = despiked_loop_area(&v, r, span);
            assert!(
                (area - want).abs() < 1e-9,
                "point {k}: area {area} vs {want}"
            );
            obs = s.obs;
            if s.terminated || s.truncated {
                assert!(s.truncated && !s.terminated);
                break;
            }
        }
    }
    assert_eq!(steps, 80);
}

#[test]
fn served_loops_have_the_films_coercive_voltages() {
    // The task's default waveform (a poling half cycle, then 0 → 8.5 → 0 → -8.5 → 0 V in 24
    // points, 2.67 recorded steps apart) at every recorded point: interpolated along the
    // branches, the loops keep the imprinted film's coercive voltages (data README: about
    // +4.6 V and -2.9 V).
    let Some(f) = data(BEPS) else { return };
    let (d, _) = raw_beps(&f);
    let mut r = ReplaySpm::open(&f, ReplayOptions::default()).unwrap();
    let (gx, gy) = r.loop_grid().unwrap();
    let w = poled_waveform(8.5, 24, 6);
    let tri = triangle_waveform(8.5, 24);
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for x in 0..50 {
        for y in 0..50 {
            let p = [gx.first + x as f64 * gx.step, gy.first + y as f64 * gy.step];
            let l = r.point_spectroscopy(p, &w).unwrap();
            let l = &l[6..];
            // Biases the recording has: 0, ±4.25, ±8.5 V read the recorded numbers; 1.4167 V
            // rising lies 2/3 of the way from recorded point 2 to 3.
            let raw = raw_loop(&d, x, y);
            for (k, j) in [
                (0, 0),
                (3, 8),
                (6, 16),
                (9, 24),
                (12, 32),
                (15, 40),
                (18, 48),
                (21, 56),
            ] {
                assert!((l[k] - raw[j]).abs() < 1e-12, "({x}, {y}) point {k}");
            }
            let hand = raw[2] + (raw[3] - raw[2]) * 2.0 / 3.0;
            assert!((l[1] - hand).abs() < 1e-12 * (1.0 + hand.abs()));
            let (u, dn) = loop_coercive(&tri, l);
            up.extend(u);
            down.extend(dn);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mu, md) = (mean(&up), mean(&down));
    println!(
        "served loops: v_up {mu:.2} V ({} loops), v_down {md:.2} V ({} loops)",
        up.len(),
        down.len()
    );
    assert!(up.len() > 1500 && down.len() > 1500);
    assert!((mu - 4.6).abs() < 0.8, "v_up {mu}");
    assert!((md + 2.9).abs() < 1.0, "v_down {md}");
    // Imprinted: the loop's centre sits well to the positive side.
    assert!(0.5 * (mu + md) > 0.8);
}

/// Frames served, each with the settings it was scanned with.
type Served = Arc<Mutex<Vec<(ScanSettings, Vec<Channel>)>>>;

/// A [`ReplaySpm`] that keeps a copy of every frame it serves, with its settings.
#[derive(Debug)]
struct Spy {
    inner: ReplaySpm,
    frames: Served,
}

impl SpmInstrument for Spy {
    fn info(&self) -> InstrumentInfo {
        self.inner.info()
    }
    fn mode(&self) -> SpmMode {
        self.inner.mode()
    }
    fn clock(&self) -> f64 {
        self.inner.clock()
    }
    fn scan_settings(&self) -> ScanSettings {
        self.inner.scan_settings()
    }
    fn configure_scan(&mut self, r: &ScanSettings) -> scopegym_physics::Result<ScanSettings> {
        self.inner.configure_scan(r)
    }
    fn acquire_frame(&mut self) -> scopegym_physics::Result<SpmFrame<'_>> {
        let s = self.inner.scan_settings();
        let f = self.inner.acquire_frame()?;
        self.frames.lock().unwrap().push((s, f.channels.to_vec()));
        Ok(f)
    }
    fn probe_position(&self) -> [f64; 2] {
        self.inner.probe_position()
    }
    fn move_probe(&mut self, p: [f64; 2]) -> scopegym_physics::Result<()> {
        self.inner.move_probe(p)
    }
    fn bias(&self) -> f64 {
        self.inner.bias()
    }
    fn set_bias(&mut self, b: f64) -> scopegym_physics::Result<f64> {
        self.inner.set_bias(b)
    }
    fn feedback_gains(&self) -> (f64, f64) {
        self.inner.feedback_gains()
    }
    fn set_feedback_gains(&mut self, p: f64, i: f64) -> scopegym_physics::Result<(f64, f64)> {
        self.inner.set_feedback_gains(p, i)
    }
    fn is_withdrawn(&self) -> bool {
        self.inner.is_withdrawn()
    }
    fn set_withdrawn(&mut self, w: bool) -> scopegym_physics::Result<()> {
        self.inner.set_withdrawn(w)
    }
}

impl NewEpisode for Spy {
    fn new_episode(&mut self, seed: u64, info: &mut Info) -> scopegym_envs::Result<()> {
        self.inner.new_episode(seed, info)
    }
}

impl afm_feedback_tuning::LoopTruth for Spy {}

/// The raw 256 × 256 image of channel `c` of the scan, indexed `[x][y]`, and its x scale.
fn raw_scan(f: &PathBuf, c: usize) -> (Vec<f64>, Vec<f64>) {
    let (img, shape) = raw(
        f,
        &format!("Measurement_000/Channel_{c}/Channel_{c}/Channel_{c}"),
    );
    assert_eq!(shape, [256, 256]);
    let (x, _) = raw(f, &format!("Measurement_000/Channel_{c}/Channel_{c}/x"));
    (img, x)
}

/// Bilinear sample (the test's own) of a raw `[x][y]` 256² image at lab (x, y), the lab
/// origin at the centre of the pixel centres 0 .. 1 µm.
fn raw_at(img: &[f64], step: f64, x: f64, y: f64) -> f64 {
    let u = ((x + 0.5e-6) / step).clamp(0.0, 255.0);
    let v = ((y + 0.5e-6) / step).clamp(0.0, 255.0);
    let (i, j) = ((u.floor() as usize).min(254), (v.floor() as usize).min(254));
    let (a, b) = (u - i as f64, v - j as f64);
    let p = |i: usize, j: usize| img[i * 256 + j];
    (p(i, j) * (1.0 - a) + p(i + 1, j) * a) * (1.0 - b)
        + (p(i, j + 1) * (1.0 - a) + p(i + 1, j + 1) * a) * b
}

#[test]
fn afm_feedback_tuning_renders_frames_of_the_recorded_scan() {
    let Some(f) = data(SCAN) else { return };
    let (height, xs) = raw_scan(&f, 0);
    let step = xs[1] - xs[0];
    let replay = ReplaySpm::open(&f, ReplayOptions::default()).unwrap();
    assert_eq!(replay.mode(), SpmMode::Pfm);
    assert_eq!(
        &replay.channel_names()[..5],
        ["phase", "amplitude", "height", "height_retrace", "error"]
    );
    // The phase channel's axes are labelled `deg` in the file: tolerated, and noted.
    assert!(
        replay
            .notes()
            .iter()
            .any(|n| n.contains("Channel_3") && n.contains("deg"))
    );
    let frames = Arc::new(Mutex::new(Vec::new()));
    let spy = Spy {
        inner: replay,
        frames: frames.clone(),
    };
    let mut cfg = afm_feedback_tuning::Config::at_level(Difficulty::Medium);
    // Scan areas of 100-500 nm anywhere on the 1 µm recording.
    cfg.instrument.sample.size = 1e-6.into();
    cfg.field_range = [0.1e-6, 0.5e-6];
    cfg.max_steps = 10;
    cfg.validate().unwrap();
    let mut env = TaskEnv::new(
        "scopegym/AfmFeedbackTuning-v2",
        AfmFeedbackTuning::new(cfg, spy),
    );
    for seed in 0..2 {
        let (mut obs, _) = env.reset(Some(seed)).unwrap();
        loop {
            let a = env.heuristic_action(&obs);
            let s = env.step(&a).unwrap();
            assert!(env.observation_space().contains(&s.obs));
            // Trace and retrace are the same recorded retrace: no difference.
            match s.info.get("retrace_difference") {
                Some(InfoValue::F64(d)) => assert!(*d < 1e-9, "{d}"),
                other => panic!("retrace_difference: {other:?}"),
            }
            obs = s.obs;
            if s.truncated {
                break;
            }
        }
        let img = env.render();
        let (lo, hi) = img
            .data
            .iter()
            .fold((255u8, 0u8), |(a, b), &p| (a.min(p), b.max(p)));
        assert!(hi > lo + 50, "rendered frame is flat: {lo}..{hi}");
    }
    // Every frame's height pixels against the raw recording (the test's own bilinear).
    let frames = frames.lock().unwrap();
    assert_eq!(frames.len(), 2 * 11);
    let mut worst = 0.0f64;
    for (s, chans) in frames.iter() {
        let h = chans.iter().find(|c| c.name == "height").unwrap();
        assert_eq!(h.units, "m");
        for i in 0..s.rows {
            for j in 0..s.cols {
                let x = s.center[0] + (j as f64 - 0.5 * (s.cols as f64 - 1.0)) * s.pixel_size;
                let y = s.center[1] + (i as f64 - 0.5 * (s.rows as f64 - 1.0)) * s.pixel_size;
                let want = raw_at(&height, step, x, y);
                worst = worst.max((f64::from(h.image[[i, j]]) - want).abs());
            }
        }
    }
    // f32 resolution of heights near 0.6 µm: 6e-14 m.
    assert!(worst < 2e-13, "worst height difference {worst:e} m");
}

#[test]
fn frames_on_recorded_pixel_centres_are_the_raw_pixels() {
    let Some(f) = data(SCAN) else { return };
    let mut r = ReplaySpm::open(&f, ReplayOptions::default()).unwrap();
    let (gx, _) = r.frame_grid();
    let step = gx.step;
    // A 16 × 8 frame at the recorded pixel size whose first pixel is recorded pixel
    // (x 37, y 201).
    let (x0, y0) = (37usize, 201usize);
    let s = ScanSettings {
        rows: 8,
        cols: 16,
        pixel_size: step,
        dwell_time: 1e-3,
        flyback_time: 0.0,
        center: [
            -0.5e-6 + (x0 as f64 + 7.5) * step,
            -0.5e-6 + (y0 as f64 + 3.5) * step,
        ],
    };
    assert_eq!(r.configure_scan(&s).unwrap(), s);
    let t0 = r.clock();
    let frame = r.acquire_frame().unwrap();
    assert!((frame.meta.duration - 8.0 * 32.0 * 1e-3).abs() < 1e-12);
    let raws: Vec<Vec<f64>> = (0..4).map(|c| raw_scan(&f, c).0).collect();
    let deflection_median = {
        let mut v = raws[2].clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (name, c, offset) in [
        ("height", 0, 0.0),
        ("height_retrace", 0, 0.0),
        ("amplitude", 1, 0.0),
        ("deflection_retrace", 2, 0.0),
        ("error", 2, deflection_median),
        ("phase", 3, 0.0),
    ] {
        let ch = frame.channel(name).unwrap();
        for i in 0..8 {
            for j in 0..16 {
                let want = raws[c][(x0 + j) * 256 + y0 + i] - offset;
                let got = f64::from(ch.image[[i, j]]);
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1e-12),
                    "{name} [{i}, {j}]: {got} vs {want}"
                );
            }
        }
    }
    assert_eq!(frame.channel("phase").unwrap().units, "deg");
    assert!((r.clock() - t0 - 0.256).abs() < 1e-12);
    // Half a recorded pixel to the right: the mean of two recorded neighbours (by hand).
    let mut s2 = s;
    s2.center[0] += 0.5 * step;
    r.configure_scan(&s2).unwrap();
    let frame = r.acquire_frame().unwrap();
    let h = frame.channel("height").unwrap();
    let (a, b) = (
        raws[0][(x0 + 3) * 256 + y0 + 2],
        raws[0][(x0 + 4) * 256 + y0 + 2],
    );
    let got = f64::from(h.image[[2, 3]]);
    assert!(
        (got - 0.5 * (a + b)).abs() < 1e-13,
        "{got} vs {}",
        0.5 * (a + b)
    );
}

#[test]
fn spectroscopy_only_frames_show_the_as_grown_state() {
    let Some(f) = data(BEPS) else { return };
    let (d, _) = raw_beps(&f);
    let mut r = ReplaySpm::open(&f, ReplayOptions::default()).unwrap();
    assert_eq!(r.channel_names(), ["phase", "amplitude", "response"]);
    let centre = r.recorded_loops().unwrap().centre;
    assert_eq!(r.default_scan().rows, 50);
    let frame = r.acquire_frame().unwrap();
    let (ph, resp) = (
        frame.channel("phase").unwrap(),
        frame.channel("response").unwrap(),
    );
    for (x, y) in [(0, 0), (13, 41), (49, 49), (25, 7)] {
        let want = raw_loop(&d, x, y)[0];
        assert!((f64::from(resp.image[[y, x]]) - want).abs() < 1e-9);
        let p = if want >= centre { 0.0 } else { 180.0 };
        assert_eq!(f64::from(ph.image[[y, x]]), p);
    }
}

#[test]
fn out_of_range_requests_are_refused_with_the_documented_error() {
    let Some(f) = data(BEPS) else { return };
    let name = f.display().to_string();
    let mut r = ReplaySpm::open(&f, ReplayOptions::default()).unwrap();
    let before = r.scan_settings();
    // A 3 µm frame on the 2 µm map (cover ±1.0204 µm).
    let big = ScanSettings {
        rows: 30,
        cols: 30,
        pixel_size: 0.1e-6,
        ..before
    };
    let e = r.configure_scan(&big).unwrap_err();
    let reason = refusal_reason(&e);
    assert!(reason.starts_with(REPLAY_PREFIX), "{reason}");
    assert!(
        reason.contains(&name) && reason.contains("covers x ["),
        "{reason}"
    );
    assert_eq!(r.scan_settings(), before);
    // A small frame off to the side.
    let off = ScanSettings {
        rows: 4,
        cols: 4,
        pixel_size: 10e-9,
        center: [1.01e-6, 0.0],
        ..before
    };
    assert!(r.configure_scan(&off).is_err());
    let inside = ScanSettings {
        center: [0.98e-6, 0.0],
        ..off
    };
    assert!(r.configure_scan(&inside).is_ok());
    // Loops: a position off the map, a bias beyond the recorded sweep, a minor loop.
    let w = triangle_waveform(8.5, 24);
    let e = r.point_spectroscopy([0.0, 1.1e-6], &w).unwrap_err();
    assert!(refusal_reason(&e).contains("requested position"), "{e}");
    let e = r
        .point_spectroscopy([0.0, 0.0], &triangle_waveform(10.0, 24))
        .unwrap_err();
    let reason = refusal_reason(&e);
    assert!(
        reason.contains("outside the recorded sweep [-8.5 V, 8.5 V]"),
        "{reason}"
    );
    assert!(reason.contains(&name), "{reason}");
    let minor = triangle_waveform(4.0, 24);
    let e = r.point_spectroscopy([0.0, 0.0], &minor).unwrap_err();
    assert!(refusal_reason(&e).contains("minor loop"), "{e}");
    let e = r.point_spectroscopy([0.0, 0.0], &[0.0, 0.0]).unwrap_err();
    assert!(refusal_reason(&e).contains("selects no branch"), "{e}");
    assert!(r.point_spectroscopy([0.0, 0.0], &[f64::NAN]).is_err());
    // With the option, a minor loop is served from the major loop's branches.
    let mut lenient = ReplaySpm::open(
        &f,
        ReplayOptions {
            allow_minor_loops: true,
            ..ReplayOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        lenient
            .point_spectroscopy([0.0, 0.0], &minor)
            .unwrap()
            .len(),
        24
    );
    // Withdrawn: refused, as on the simulator.
    r.set_withdrawn(true).unwrap();
    assert!(r.acquire_frame().is_err() && r.point_spectroscopy([0.0, 0.0], &w).is_err());
    // A new episode re-engages and resets the clock; the recording is unchanged.
    let mut info = Info::new();
    r.new_episode(3, &mut info).unwrap();
    assert!(!r.is_withdrawn() && r.clock() == 0.0);
    assert_eq!(r.point_spectroscopy([0.0, 0.0], &w).unwrap().len(), 24);
    assert!((r.clock() - 24.0 * 5e-3).abs() < 1e-12);
    // Through a task: a scan field beyond the recording ends reset with the refusal.
    let Some(scan) = data(SCAN) else { return };
    let mut cfg = afm_feedback_tuning::Config::at_level(Difficulty::Medium);
    cfg.instrument.sample.size = 3e-6.into();
    cfg.field_range = [2e-6, 2.5e-6];
    let replay = ReplaySpm::open(&scan, ReplayOptions::default()).unwrap();
    let mut env = TaskEnv::new("t", AfmFeedbackTuning::new(cfg, replay));
    let e = env.reset(Some(0)).unwrap_err().to_string();
    assert!(e.contains(REPLAY_PREFIX) && e.contains("covers x"), "{e}");
}

#[test]
fn unreadable_recordings_name_the_file_and_the_object() {
    let e = ReplaySpm::open("/nonexistent/rec.h5", ReplayOptions::default()).unwrap_err();
    assert!(matches!(e, DriverError::Recording { .. }));
    assert!(e.to_string().contains("/nonexistent/rec.h5"), "{e}");
    let e = ReplaySpm::open(
        "/nonexistent/rec.h5",
        ReplayOptions {
            spectroscopy_point_time: 0.0,
            ..ReplayOptions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("spectroscopy_point_time"), "{e}");
    // Hand-made NSID files, each missing one piece.
    use hdf5::types::VarLenUnicode;
    let dir = tempfile::tempdir().unwrap();
    let s = |t: &str| -> VarLenUnicode { t.parse().unwrap() };
    let write = |name: &str, with_scale: bool, with_units: bool| -> PathBuf {
        let p = dir.path().join(name);
        let f = hdf5::File::create(&p).unwrap();
        let g = f.create_group("Measurement_000").unwrap();
        let d = g
            .new_dataset::<f64>()
            .shape((4, 4))
            .create("Channel_0")
            .unwrap();
        d.write_raw(&[0.0f64; 16]).unwrap();
        d.new_attr::<VarLenUnicode>()
            .shape(())
            .create("quantity")
            .unwrap()
            .write_scalar(&s("Height"))
            .unwrap();
        if with_units {
            d.new_attr::<VarLenUnicode>()
                .shape(())
                .create("units")
                .unwrap()
                .write_scalar(&s("m"))
                .unwrap();
        }
        d.new_attr::<VarLenUnicode>()
            .shape(2)
            .create("DIMENSION_LABELS")
            .unwrap()
            .write(&[s("x"), s("y")])
            .unwrap();
        for axis in ["x", "y"] {
            if axis == "y" && !with_scale {
                continue;
            }
            let a = g.new_dataset::<f64>().shape(4).create(axis).unwrap();
            a.write_raw(&[0.0, 1e-9, 2e-9, 3e-9]).unwrap();
            for (k, v) in [
                ("dimension_type", "SPATIAL"),
                ("units", "m"),
                ("quantity", axis),
            ] {
                a.new_attr::<VarLenUnicode>()
                    .shape(())
                    .create(k)
                    .unwrap()
                    .write_scalar(&s(v))
                    .unwrap();
            }
        }
        p
    };
    let ok = write("ok.h5", true, true);
    let r = ReplaySpm::open(&ok, ReplayOptions::default()).unwrap();
    assert_eq!(r.mode(), SpmMode::Afm);
    assert!(!r.serves_spectroscopy());
    let no_scale = write("no_scale.h5", false, true);
    let e = ReplaySpm::open(&no_scale, ReplayOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no_scale.h5") && e.contains("/Measurement_000/y"),
        "{e}"
    );
    let no_units = write("no_units.h5", true, false);
    let e = ReplaySpm::open(&no_units, ReplayOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no_units.h5") && e.contains("Channel_0@units"),
        "{e}"
    );
    // A scan file has no loops: refused, naming the file.
    let mut r = r;
    let e = r.point_spectroscopy([0.0, 0.0], &[1.0]).unwrap_err();
    assert!(refusal_reason(&e).contains("holds no spectroscopy"), "{e}");
}
