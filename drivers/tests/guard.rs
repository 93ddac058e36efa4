//! The guard on the simulators, through a recording test double: refusals are not forwarded and
//! are logged, in-limit commands pass through unchanged, dry run sends nothing, the audit log is
//! JSON lines, and (property tests) nothing outside the limits ever reaches the instrument.

mod common;

use common::{Broken, Fwd, Recorder, Sink};
use proptest::prelude::*;
use scopegym_drivers::error::guard_refusal;
use scopegym_drivers::guard::aberration_steps;
use scopegym_drivers::{AuditLog, Check, Guarded, Limits, SpmCommand, StemCommand};
use scopegym_physics::PhysicsError;
use scopegym_physics::constants::ELEMENTARY_CHARGE;
use scopegym_physics::instrument::{
    BiasWriting, LateralManipulation, PointSpectroscopy, ScanSettings, SpmInstrument, SpmMode,
    StemInstrument, TipConditioning,
};
use scopegym_physics::param::Param;
use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
use scopegym_physics::spm::tip::Conditioning;
use scopegym_physics::stem::{StemConfig, StemSimulator};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const NM: f64 = 1e-9;

fn spm_sim(mode: SpmMode, seed: u64) -> SpmSimulator {
    let mut c = SpmConfig {
        mode,
        ..SpmConfig::default()
    };
    c.scan.pixels = [16, 16];
    c.scan.size = Param::fixed(100.0 * NM);
    c.sample.pixels = 128;
    SpmSimulator::new(c, seed).unwrap()
}

fn stem_sim(seed: u64) -> StemSimulator {
    let mut c = StemConfig::default();
    c.scan.pixels = [16, 16];
    StemSimulator::new(c, seed).unwrap()
}

fn spm_scan(center: [f64; 2], size: f64) -> ScanSettings {
    ScanSettings {
        rows: 16,
        cols: 16,
        pixel_size: size / 16.0,
        dwell_time: 1e-3,
        flyback_time: 0.0,
        center,
    }
}

fn example_limits() -> Limits {
    Limits::from_file(concat!(env!("CARGO_MANIFEST_DIR"), "/limits.example.toml")).unwrap()
}

type Log = Arc<Mutex<Vec<Fwd>>>;

fn guarded<I>(inst: I, limits: Limits) -> (Guarded<Recorder<I>>, Log, Sink) {
    let (rec, log) = Recorder::new(inst);
    let sink = Sink::default();
    let g = Guarded::new(rec, limits)
        .unwrap()
        .with_audit(AuditLog::new(sink.clone()));
    (g, log, sink)
}

fn expect_refused(r: Result<impl std::fmt::Debug, PhysicsError>, limit: &str) {
    let e = r.expect_err("must be refused");
    assert_eq!(guard_refusal(&e), Some(limit), "{e}");
}

/// The audit lines that record a refusal by `limit`.
fn refused_lines(sink: &Sink, limit: &str) -> usize {
    sink.lines()
        .iter()
        .filter(|l| l["result"] == "refused" && l["limit"] == limit)
        .count()
}

#[test]
fn out_of_limit_spm_commands_are_refused_unsent_and_logged() {
    let (mut g, log, sink) = guarded(spm_sim(SpmMode::Stm, 1), Limits::default());
    assert_eq!(
        g.set_bias(100.0).unwrap_err().to_string(),
        "operation `set_bias` refused: guard: limit `spm.bias_window`: \
         bias 100 V is outside [-10 V, 10 V]"
    );
    expect_refused(g.set_bias(f64::NAN), "spm.bias_window");
    expect_refused(
        g.condition_tip(&Conditioning::Pulse {
            bias: 2.5,
            duration: 10.0,
        }),
        "spm.pulse_width_max",
    );
    expect_refused(
        g.condition_tip(&Conditioning::Pulse {
            bias: 50.0,
            duration: 0.1,
        }),
        "spm.pulse_bias_max",
    );
    expect_refused(
        g.condition_tip(&Conditioning::dip(20.0 * NM)),
        "spm.dip_depth_max",
    );
    // A 100 nm frame whose right edge reaches 0.5 µm: outside 95 % of the 1 µm range.
    expect_refused(
        g.configure_scan(&spm_scan([450.0 * NM, 0.0], 100.0 * NM)),
        "spm.scan_area_fraction",
    );
    expect_refused(g.move_probe([480.0 * NM, 0.0]), "spm.scan_area_fraction");
    expect_refused(
        g.manipulate([0.0; 2], [1.0 * NM, 0.0], 0.01, 1.0),
        "spm.setpoint_range",
    );
    assert!(log.lock().unwrap().is_empty(), "{:?}", log.lock().unwrap());
    assert_eq!(g.forwarded(), 0);
    for (limit, n) in [
        ("spm.bias_window", 2),
        ("spm.pulse_width_max", 1),
        ("spm.pulse_bias_max", 1),
        ("spm.dip_depth_max", 1),
        ("spm.scan_area_fraction", 2),
        ("spm.setpoint_range", 1),
    ] {
        assert_eq!(refused_lines(&sink, limit), n, "{limit}");
    }
    let first = &sink.lines()[0];
    assert_eq!(first["command"], "set_bias");
    assert_eq!(first["args"]["bias"], "100 V");
    assert!(first["message"].as_str().unwrap().contains("[-10 V, 10 V]"));

    let (mut g, log, sink) = guarded(spm_sim(SpmMode::Pfm, 1), Limits::default());
    expect_refused(g.bias_pulse([0.0; 2], 2.0, 10.0), "spm.pulse_width_max");
    expect_refused(g.bias_pulse([0.0; 2], 100.0, 0.1), "spm.pulse_bias_max");
    expect_refused(
        g.bias_pulse([490.0 * NM, 0.0], 2.0, 0.1),
        "spm.scan_area_fraction",
    );
    expect_refused(
        g.point_spectroscopy([0.0; 2], &[0.0, 5.0, 20.0]),
        "spm.bias_window",
    );
    assert!(log.lock().unwrap().is_empty());
    assert_eq!(sink.lines().len(), 4);
    assert_eq!(g.last_refusal().unwrap().limit, "spm.bias_window");
    assert!(g.last_refusal().unwrap().reason.contains("waveform[2]"));
}

#[test]
fn out_of_limit_stem_commands_are_refused_unsent_and_logged() {
    let sim = stem_sim(3);
    let s = sim.scan_settings();
    let frame_dose = sim.beam_current() * s.dwell_time / ELEMENTARY_CHARGE / s.pixel_size.powi(2);
    let mut limits = Limits::default();
    limits.stem.dose_budget = 1.5 * frame_dose;
    let (mut g, log, sink) = guarded(sim, limits);

    // Dose: the first frame fits the budget, the second would not.
    let meta = g.acquire_frame().unwrap().meta;
    assert!((meta.dose - frame_dose).abs() <= 1e-9 * frame_dose);
    expect_refused(g.acquire_frame(), "stem.dose_budget");
    // A point in the already exposed region would exceed it too.
    expect_refused(g.acquire_point(1e-2), "stem.dose_budget");
    assert!(g.dose_map().max_dose() <= 1.5 * frame_dose);

    // Aberrations: 1 µm of defocus at once, or turning 20 nm of C12 by 90° (a 40 nm step).
    let mut a = g.aberrations();
    a.c10 += 1e-6;
    expect_refused(g.set_aberrations(&a), "stem.aberration_step_max.c10");
    let mut a = g.aberrations();
    a.c12 = 20.0 * NM;
    a.phi12 = std::f64::consts::FRAC_PI_2;
    expect_refused(g.set_aberrations(&a), "stem.aberration_step_max.c12");

    // Frame time: 256 × 256 px at 1 ms.
    let mut slow = s;
    slow.rows = 256;
    slow.cols = 256;
    slow.dwell_time = 1e-3;
    expect_refused(g.configure_scan(&slow), "stem.max_frame_time");
    expect_refused(g.acquire_spectrum(5.0), "stem.max_exposure");

    let fwd = log.lock().unwrap().clone();
    let frames = fwd
        .iter()
        .filter(|f| matches!(f, Fwd::AcquireFrame(..)))
        .count();
    assert_eq!(frames, 1, "{fwd:?}");
    assert!(
        fwd.iter()
            .all(|f| matches!(f, Fwd::AcquireFrame(..) | Fwd::SetBlanked(_))),
        "{fwd:?}"
    );
    assert_eq!(refused_lines(&sink, "stem.dose_budget"), 2);
    assert_eq!(refused_lines(&sink, "stem.aberration_step_max.c10"), 1);
    assert_eq!(refused_lines(&sink, "stem.aberration_step_max.c12"), 1);
    assert_eq!(refused_lines(&sink, "stem.max_frame_time"), 1);
    assert_eq!(refused_lines(&sink, "stem.max_exposure"), 1);
}

#[test]
fn in_limit_spm_commands_pass_through_unchanged() {
    for mode in [SpmMode::Pfm, SpmMode::Stm] {
        let mut bare = spm_sim(mode, 7);
        let (mut g, _, sink) = guarded(spm_sim(mode, 7), Limits::default());
        let s = spm_scan([100.0 * NM, -50.0 * NM], 200.0 * NM);
        assert_eq!(
            bare.configure_scan(&s).unwrap(),
            g.configure_scan(&s).unwrap()
        );
        assert_eq!(bare.set_bias(2.0).unwrap(), g.set_bias(2.0).unwrap());
        assert_eq!(bare.bias(), g.bias());
        if mode == SpmMode::Pfm {
            let p = [60.0 * NM, -40.0 * NM];
            bare.bias_pulse(p, 5.0, 0.1).unwrap();
            g.bias_pulse(p, 5.0, 0.1).unwrap();
            let w = [0.0, 2.0, 4.0, 2.0, 0.0, -2.0, -4.0];
            assert_eq!(
                bare.point_spectroscopy(p, &w).unwrap(),
                g.point_spectroscopy(p, &w).unwrap()
            );
        } else {
            for a in [Conditioning::pulse(4.0), Conditioning::dip(1.0 * NM)] {
                bare.condition_tip(&a).unwrap();
                g.condition_tip(&a).unwrap();
            }
            let (a, b) = ([90.0 * NM, -50.0 * NM], [95.0 * NM, -50.0 * NM]);
            assert_eq!(
                bare.manipulate(a, b, 0.01, 1e-6).unwrap(),
                g.manipulate(a, b, 0.01, 1e-6).unwrap()
            );
        }
        for _ in 0..2 {
            let fb = bare.acquire_frame().unwrap();
            let (channels, meta) = (fb.channels.to_vec(), fb.meta);
            let fg = g.acquire_frame().unwrap();
            assert_eq!(fg.meta, meta);
            assert_eq!(fg.channels, &channels[..]);
        }
        assert_eq!(bare.clock(), g.clock());
        assert!(sink.lines().iter().all(|l| l["result"] == "ok"));
    }
}

#[test]
fn in_limit_stem_commands_pass_through_unchanged() {
    let mut limits = Limits::default();
    limits.stem.dose_budget = 1e8 / 1e-20;
    let mut bare = stem_sim(11);
    let (mut g, log, sink) = guarded(stem_sim(11), limits);
    let mut s = bare.scan_settings();
    s.center = [0.1 * NM, -0.1 * NM];
    assert_eq!(
        bare.configure_scan(&s).unwrap(),
        g.configure_scan(&s).unwrap()
    );
    for _ in 0..2 {
        let (a, ma) = {
            let f = bare.acquire_frame().unwrap();
            (f.image.to_owned(), f.meta)
        };
        let f = g.acquire_frame().unwrap();
        assert_eq!(f.meta, ma);
        assert_eq!(f.image, a.view());
    }
    let p = [0.05 * NM, 0.02 * NM];
    bare.move_probe(p).unwrap();
    g.move_probe(p).unwrap();
    assert_eq!(
        bare.acquire_point(1e-3).unwrap(),
        g.acquire_point(1e-3).unwrap()
    );
    let (e, c) = {
        let sp = bare.acquire_spectrum(1e-2).unwrap();
        (sp.energy.to_vec(), sp.counts.to_vec())
    };
    let sp = g.acquire_spectrum(1e-2).unwrap();
    assert_eq!((sp.energy, sp.counts), (&e[..], &c[..]));
    let mut a = bare.aberrations();
    a.c10 += 2.0 * NM;
    assert_eq!(
        bare.set_aberrations(&a).unwrap(),
        g.set_aberrations(&a).unwrap()
    );
    let img = bare.acquire_frame().unwrap().image.to_owned();
    assert_eq!(g.acquire_frame().unwrap().image, img.view());
    assert_eq!(bare.clock(), g.clock());
    // The bare simulator's beam was never blanked; behind the guard it is, between
    // acquisitions, and the caller still sees it unblanked.
    assert!(!g.is_blanked() && g.inner().inner.is_blanked());
    assert!(log.lock().unwrap().contains(&Fwd::SetBlanked(true)));
    assert!(sink.lines().iter().all(|l| l["result"] == "ok"));
}

#[test]
fn the_beam_is_blanked_outside_acquisitions() {
    let (mut g, log, _) = guarded(stem_sim(5), Limits::default());
    g.set_blanked(false).unwrap();
    assert!(!g.is_blanked());
    assert!(
        g.inner().inner.is_blanked(),
        "unblanking waits for an acquisition"
    );
    g.acquire_frame().unwrap();
    assert!(g.inner().inner.is_blanked());
    assert_eq!(
        log.lock().unwrap().as_slice(),
        &[
            Fwd::SetBlanked(true),
            Fwd::SetBlanked(false),
            Fwd::AcquireFrame(g.scan_settings(), g.beam_current()),
            Fwd::SetBlanked(true),
        ]
    );
    // Asked blanked, an acquisition fails as on the bare instrument, and delivers no dose.
    g.set_blanked(true).unwrap();
    let before = g.dose_map().max_dose();
    let sent = log.lock().unwrap().len();
    let e = g.acquire_point(1e-3).unwrap_err();
    assert_eq!(
        log.lock().unwrap().len(),
        sent,
        "not sent with the beam blanked"
    );
    assert!(e.to_string().contains("blanked"), "{e}");
    assert_eq!(guard_refusal(&e), None);
    assert_eq!(g.dose_map().max_dose(), before);
    // Without blank management the guard forwards blanking as asked.
    let mut limits = Limits::default();
    limits.stem.blank_outside_acquisition = false;
    let (mut g, log, _) = guarded(stem_sim(5), limits);
    g.acquire_frame().unwrap();
    assert!(!g.inner().inner.is_blanked());
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[test]
fn dry_run_sends_nothing_that_changes_state() {
    let (g, log, sink) = guarded(spm_sim(SpmMode::Pfm, 2), Limits::default());
    let mut g = g.dry_run(true);
    let bias0 = g.bias();
    let s = spm_scan([0.0; 2], 100.0 * NM);
    assert_eq!(g.configure_scan(&s).unwrap(), s);
    assert_eq!(g.set_bias(3.0).unwrap(), 3.0);
    assert_eq!(g.bias(), bias0, "getters read the real instrument");
    g.move_probe([1.0 * NM, 0.0]).unwrap();
    g.bias_pulse([0.0; 2], 4.0, 0.1).unwrap();
    assert_eq!(
        g.point_spectroscopy([0.0; 2], &[1.0, 2.0]).unwrap(),
        vec![0.0; 2]
    );
    assert_eq!(g.set_feedback_gains(1.0, 2.0).unwrap(), (1.0, 2.0));
    g.set_withdrawn(true).unwrap();
    let f = g.acquire_frame().unwrap();
    assert!(f.channels.iter().all(|c| c.image.iter().all(|v| *v == 0.0)));
    g.make_safe().unwrap();
    expect_refused(g.set_bias(100.0), "spm.bias_window");
    assert!(log.lock().unwrap().is_empty());
    assert_eq!(g.forwarded(), 0);
    assert!(!g.is_withdrawn());
    let lines = sink.lines();
    assert_eq!(lines.len(), 10);
    assert_eq!(lines.iter().filter(|l| l["result"] == "dry_run").count(), 9);

    let (g, log, _) = guarded(stem_sim(2), Limits::default());
    let mut g = g.dry_run(true);
    g.set_blanked(false).unwrap();
    assert_eq!(g.acquire_frame().unwrap().meta.dose, 0.0);
    assert_eq!(g.acquire_point(1e-3).unwrap(), 0.0);
    assert!(g.acquire_spectrum(1e-3).unwrap().counts.is_empty());
    let mut a = g.aberrations();
    a.c10 += 1.0 * NM;
    assert_eq!(g.set_aberrations(&a).unwrap(), a);
    g.make_safe().unwrap();
    assert!(log.lock().unwrap().is_empty());
    assert_eq!(g.dose_map().max_dose(), 0.0);
}

#[test]
fn audit_log_is_json_lines_appended_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    for round in 0..2 {
        let mut g = Guarded::new(stem_sim(4), Limits::default())
            .unwrap()
            .with_audit(AuditLog::append_file(&path).unwrap());
        g.set_blanked(false).unwrap();
        g.acquire_frame().unwrap();
        // The simulator refuses positions outside its deflection range: an instrument error.
        assert!(g.move_probe([1.0, 1.0]).is_err());
        let mut a = g.aberrations();
        a.c10 += 1e-3;
        expect_refused(g.set_aberrations(&a), "stem.aberration_step_max.c10");
        g.make_safe().unwrap();
        assert_eq!(g.audit().lines_written(), 5, "round {round}");
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    let results: Vec<&str> = lines[..5]
        .iter()
        .map(|l| l["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["ok", "ok", "error", "refused", "ok"]);
    for (k, l) in lines.iter().enumerate() {
        assert!(l["time"].as_f64().unwrap() > 1.6e9, "{l}");
        assert_eq!(l["seq"].as_u64().unwrap(), (k % 5) as u64);
        assert!(l["command"].is_string() && l["args"].is_object() && l["message"].is_string());
    }
    assert_eq!(lines[2]["args"]["position"][0], "1 m");
    assert_eq!(lines[3]["limit"], "stem.aberration_step_max.c10");
    assert_eq!(lines[4]["command"], "make_safe");
    assert_eq!(lines[1]["command"], "acquire_frame");
}

#[test]
fn make_safe_is_always_allowed_even_when_the_log_fails() {
    let (rec, log) = Recorder::new(spm_sim(SpmMode::Afm, 3));
    let mut g = Guarded::new(rec, Limits::default())
        .unwrap()
        .with_audit(AuditLog::new(Broken));
    // Sent, but unlogged: the call fails and the log latches.
    let e = g.set_bias(1.0).unwrap_err();
    assert!(e.to_string().contains("driver: I/O error"), "{e}");
    assert!(g.audit().failure().is_some());
    let n = log.lock().unwrap().len();
    expect_refused(g.set_bias(0.5), "audit");
    assert_eq!(log.lock().unwrap().len(), n, "nothing is sent unlogged");
    g.make_safe().unwrap();
    assert_eq!(log.lock().unwrap().last(), Some(&Fwd::MakeSafe));
    assert!(g.is_withdrawn());
}

#[test]
fn a_crash_aborts_the_frame_and_withdraws_the_tip() {
    let mut limits = Limits::default();
    limits.spm.abort_corrugation = 1e-15;
    let (mut g, log, sink) = guarded(spm_sim(SpmMode::Afm, 9), limits);
    expect_refused(g.acquire_frame(), "spm.abort_corrugation");
    assert_eq!(
        log.lock().unwrap().last(),
        Some(&Fwd::MakeSafe),
        "{:?}",
        log.lock().unwrap()
    );
    assert!(g.is_withdrawn());
    assert_eq!(refused_lines(&sink, "spm.abort_corrugation"), 1);
    // Tripped: nothing but withdrawing passes until the guard is re-armed.
    let sent = log.lock().unwrap().len();
    expect_refused(g.set_withdrawn(false), "spm.tripped");
    expect_refused(g.acquire_frame(), "spm.tripped");
    g.set_withdrawn(true).unwrap();
    g.make_safe().unwrap();
    assert_eq!(log.lock().unwrap().len(), sent + 2);
    assert_eq!(g.tripped().unwrap().limit, "spm.abort_corrugation");
    g.clear_trip();
    g.set_withdrawn(false).unwrap();
    assert!(!g.is_withdrawn());

    let mut limits = Limits::default();
    limits.spm.z_range = [1.0, 2.0];
    let (mut g, _, _) = guarded(spm_sim(SpmMode::Afm, 9), limits);
    expect_refused(g.acquire_frame(), "spm.z_range");
    assert!(g.is_withdrawn());
}

#[test]
fn check_is_pure_and_agrees_with_the_guard() {
    let (g, log, sink) = guarded(spm_sim(SpmMode::Stm, 1), Limits::default());
    assert!(g.check(&SpmCommand::SetBias(1.0)).is_ok());
    let e = g.check(&SpmCommand::SetBias(100.0)).unwrap_err();
    assert_eq!(e.as_refusal().unwrap().limit, "spm.bias_window");
    assert!(g.check(&SpmCommand::MakeSafe).is_ok());
    assert!(log.lock().unwrap().is_empty() && sink.lines().is_empty());
    assert!(g.last_refusal().is_none());

    let (mut g, log, sink) = guarded(stem_sim(1), Limits::default());
    let mut a = g.aberrations();
    a.c30 += 1e-3;
    assert!(g.check(&StemCommand::SetAberrations(a)).is_err());
    assert!(g.check(&StemCommand::AcquireFrame).is_ok());
    assert!(g.check(&StemCommand::AcquirePoint(10.0)).is_err());
    assert!(log.lock().unwrap().is_empty() && sink.lines().is_empty());
    assert_eq!(g.dose_map().max_dose(), 0.0);
    let e = g.set_aberrations(&a).unwrap_err();
    assert_eq!(guard_refusal(&e), Some("stem.aberration_step_max.c30"));
    let r = g.take_refusal().unwrap();
    assert_eq!(
        (r.limit.as_str(), r.command.as_str()),
        ("stem.aberration_step_max.c30", "set_aberrations")
    );
    assert!(g.take_refusal().is_none());
}

#[test]
fn guarded_simulators_can_run_in_environments() {
    // Environments need `Send` instruments (vector envs step them on a thread pool).
    fn send<T: Send>() {}
    send::<Guarded<SpmSimulator>>();
    send::<Guarded<StemSimulator>>();
}

#[test]
fn aberration_steps_measure_azimuthal_coefficients_as_vectors() {
    use scopegym_physics::stem::optics::Aberrations;
    let a = Aberrations {
        c12: 10.0 * NM,
        ..Aberrations::default()
    };
    let b = Aberrations {
        c12: 10.0 * NM,
        phi12: std::f64::consts::FRAC_PI_2, // C12 turned by 90°: its vector flips
        ..Aberrations::default()
    };
    let steps = aberration_steps(&a, &b);
    assert_eq!(steps[1].0, "c12");
    assert!((steps[1].1 - 20.0 * NM).abs() < 1e-15);
    assert!(steps.iter().filter(|s| s.0 != "c12").all(|s| s.1 == 0.0));
    // Four-fold C34 turned by π/4 flips its vector too; the step names it.
    let a = Aberrations {
        c34: 3e-6,
        ..Aberrations::default()
    };
    let b = Aberrations {
        phi34: std::f64::consts::FRAC_PI_4,
        ..a
    };
    let steps = aberration_steps(&a, &b);
    // The limits list the same coefficients in the same order.
    let names = Limits::default()
        .stem
        .aberration_step_max
        .by_name()
        .map(|n| n.0);
    assert_eq!(steps.map(|s| s.0), names);
    let c34 = steps.iter().find(|s| s.0 == "c34").unwrap();
    assert!((c34.1 - 6e-6).abs() < 1e-18, "{c34:?}");
    assert!(steps.iter().filter(|s| s.0 != "c34").all(|s| s.1 == 0.0));
}

/// A step in a higher-order coefficient beyond its limit is refused by name like the others
/// (a corrector's C5 terms are as dangerous to jump as its C3).
#[test]
fn higher_order_aberration_steps_are_limited() {
    use scopegym_physics::stem::optics::Aberrations;
    let limits = Limits::from_toml_str("[stem.aberration_step_max]\nc56 = \"100 µm\"\n").unwrap();
    let mut g = Guarded::new(stem_sim(4), limits).unwrap();
    let now = g.aberrations();
    let big = Aberrations {
        c56: now.c56 + 200e-6,
        ..now
    };
    expect_refused(g.set_aberrations(&big), "stem.aberration_step_max.c56");
    let small = Aberrations {
        c56: now.c56 + 50e-6,
        ..now
    };
    assert!(g.set_aberrations(&small).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum SpmOp {
    Bias(f64),
    Pulse(f64, f64),
    Dip(f64, f64, f64),
    Move([f64; 2]),
    Scan([f64; 2], f64),
    Frame,
    Write([f64; 2], f64, f64),
    Spectro([f64; 2], Vec<f64>),
    Drag([f64; 2], [f64; 2], f64, f64),
}

fn spm_op() -> impl Strategy<Value = SpmOp> {
    let pos = || [-600e-9..600e-9f64, -600e-9..600e-9f64];
    prop_oneof![
        (-30.0..30.0f64).prop_map(SpmOp::Bias),
        (-12.0..12.0f64, 0.0..2.0f64).prop_map(|(b, t)| SpmOp::Pulse(b, t)),
        (0.0..6e-9f64, -3.0..3.0f64, 0.0..0.5f64).prop_map(|(d, b, t)| SpmOp::Dip(d, b, t)),
        pos().prop_map(SpmOp::Move),
        (pos(), 10e-9..300e-9f64).prop_map(|(c, s)| SpmOp::Scan(c, s)),
        Just(SpmOp::Frame),
        (pos(), -12.0..12.0f64, 0.0..0.5f64).prop_map(|(p, b, t)| SpmOp::Write(p, b, t)),
        (pos(), prop::collection::vec(-4.0..4.0f64, 1..6)).prop_map(|(p, w)| SpmOp::Spectro(p, w)),
        (pos(), pos(), -3.0..3.0f64, -6.0..-4.0f64).prop_map(|(a, b, v, g)| SpmOp::Drag(
            a,
            b,
            v,
            10f64.powf(g)
        )),
    ]
}

/// Whether a forwarded SPM call is inside `l` (checked independently of the guard).
fn spm_within(l: &Limits, f: &Fwd) -> bool {
    let s = &l.spm;
    let h = [
        0.5 * s.scan_area_fraction * s.scanner_range[0],
        0.5 * s.scan_area_fraction * s.scanner_range[1],
    ];
    let inside = |p: &[f64; 2]| p[0].abs() <= h[0] && p[1].abs() <= h[1];
    let window = |b: f64| b >= s.bias_window[0] && b <= s.bias_window[1];
    let pulse = |b: f64, t: f64| b.abs() <= s.pulse_bias_max && t > 0.0 && t <= s.pulse_width_max;
    match f {
        Fwd::SetBias(b) => window(*b),
        Fwd::ConditionTip(Conditioning::Pulse { bias, duration }) => pulse(*bias, *duration),
        Fwd::ConditionTip(Conditioning::Dip {
            depth,
            bias,
            duration,
        }) => {
            *depth > 0.0
                && *depth <= s.dip_depth_max
                && window(*bias)
                && *duration > 0.0
                && *duration <= s.pulse_width_max
        }
        Fwd::MoveProbe(p) => inside(p),
        Fwd::ConfigureScan(r) | Fwd::AcquireFrame(r, _) => {
            let [w, hh] = r.field_of_view();
            r.center[0].abs() + 0.5 * w <= h[0] && r.center[1].abs() + 0.5 * hh <= h[1]
        }
        Fwd::BiasPulse(p, b, t) => inside(p) && pulse(*b, *t),
        Fwd::PointSpectroscopy(p, w) => inside(p) && w.iter().all(|b| window(*b)),
        Fwd::Manipulate(a, b, v, g) => {
            inside(a)
                && inside(b)
                && window(*v)
                && *g >= s.setpoint_range[0]
                && *g <= s.setpoint_range[1]
        }
        Fwd::SetGains(..) | Fwd::SetWithdrawn(_) | Fwd::MakeSafe => true,
        _ => false,
    }
}

#[derive(Debug, Clone)]
enum StemOp {
    Scan([f64; 2], f64, f64, usize),
    Frame,
    Move([f64; 2]),
    Point(f64),
    Spectrum(f64),
    Blank(bool),
}

fn stem_op() -> impl Strategy<Value = StemOp> {
    let pos = || [-3e-9..3e-9f64, -3e-9..3e-9f64];
    prop_oneof![
        2 => (pos(), -11.0..-10.0f64, -6.5..-4.5f64, 4..16usize)
            .prop_map(|(c, px, dw, n)| StemOp::Scan(c, 10f64.powf(px), 10f64.powf(dw), n)),
        4 => Just(StemOp::Frame),
        2 => pos().prop_map(StemOp::Move),
        3 => (-5.5..-3.0f64).prop_map(|t| StemOp::Point(10f64.powf(t))),
        1 => (-5.0..0.5f64).prop_map(|t| StemOp::Spectrum(10f64.powf(t))),
        1 => prop::bool::weighted(0.2).prop_map(StemOp::Blank),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever the policy asks, nothing outside the limits reaches an SPM.
    #[test]
    fn spm_guard_never_forwards_outside_the_limits(
        ops in prop::collection::vec(spm_op(), 1..16),
        stm in any::<bool>(),
    ) {
        let limits = example_limits();
        let mode = if stm { SpmMode::Stm } else { SpmMode::Pfm };
        let (mut g, log, sink) = guarded(spm_sim(mode, 5), limits.clone());
        for op in &ops {
            // Errors (refusals, or the simulator's own) are fine; what was sent is checked below.
            let _ = match op {
                SpmOp::Bias(b) => g.set_bias(*b).map(|_| ()),
                SpmOp::Pulse(b, t) => g.condition_tip(&Conditioning::Pulse { bias: *b, duration: *t }),
                SpmOp::Dip(d, b, t) => g.condition_tip(&Conditioning::Dip { depth: *d, bias: *b, duration: *t }),
                SpmOp::Move(p) => g.move_probe(*p),
                SpmOp::Scan(c, s) => g.configure_scan(&spm_scan(*c, *s)).map(|_| ()),
                SpmOp::Frame => g.acquire_frame().map(|_| ()),
                SpmOp::Write(p, b, t) => g.bias_pulse(*p, *b, *t),
                SpmOp::Spectro(p, w) => g.point_spectroscopy(*p, w).map(|_| ()),
                SpmOp::Drag(a, b, v, c) => g.manipulate(*a, *b, *v, *c).map(|_| ()),
            };
        }
        for f in log.lock().unwrap().iter() {
            prop_assert!(spm_within(&limits, f), "forwarded outside the limits: {f:?}");
        }
        prop_assert!(sink.lines().len() >= ops.len());
    }

    /// Whatever the policy asks, no region of the specimen gets more than the dose budget.
    #[test]
    fn stem_cumulative_dose_never_exceeds_the_budget(
        ops in prop::collection::vec(stem_op(), 1..40),
    ) {
        let mut limits = example_limits();
        limits.stem.max_exposure = 2.0;
        limits.stem.dose_budget = 1e3 / 1e-20;
        let (budget, cell) = (limits.stem.dose_budget, limits.stem.dose_cell);
        let (mut g, log, _) = guarded(stem_sim(8), limits);
        for op in &ops {
            let _ = match op {
                StemOp::Scan(c, px, dw, n) => g
                    .configure_scan(&ScanSettings {
                        rows: *n,
                        cols: *n,
                        pixel_size: *px,
                        dwell_time: *dw,
                        flyback_time: 0.0,
                        center: *c,
                    })
                    .map(|_| ()),
                StemOp::Frame => g.acquire_frame().map(|_| ()),
                StemOp::Move(p) => g.move_probe(*p),
                StemOp::Point(t) => g.acquire_point(*t).map(|_| ()),
                StemOp::Spectrum(t) => g.acquire_spectrum(*t).map(|_| ()),
                StemOp::Blank(b) => g.set_blanked(*b),
            };
        }
        // The dose of every forwarded acquisition, recomputed from what was sent (every cell a
        // frame touches gets the frame's full dose: an upper bound).
        let mut dose: HashMap<(i64, i64), f64> = HashMap::new();
        let idx = |v: f64| (v / cell).floor() as i64;
        for f in log.lock().unwrap().iter() {
            match f {
                Fwd::AcquireFrame(s, i) => {
                    let d = i * s.dwell_time / ELEMENTARY_CHARGE / s.pixel_size.powi(2);
                    let [w, h] = s.field_of_view();
                    let (x0, x1) = (s.center[0] - 0.5 * w, s.center[0] + 0.5 * w);
                    let (y0, y1) = (s.center[1] - 0.5 * h, s.center[1] + 0.5 * h);
                    for ix in idx(x0)..=((x1 / cell).ceil() as i64 - 1).max(idx(x0)) {
                        for iy in idx(y0)..=((y1 / cell).ceil() as i64 - 1).max(idx(y0)) {
                            *dose.entry((ix, iy)).or_default() += d;
                        }
                    }
                }
                Fwd::AcquirePoint(t, p, i) | Fwd::AcquireSpectrum(t, p, i) => {
                    *dose.entry((idx(p[0]), idx(p[1]))).or_default() +=
                        i * t / ELEMENTARY_CHARGE / (cell * cell);
                }
                _ => {}
            }
        }
        for (c, d) in &dose {
            prop_assert!(*d <= budget * (1.0 + 1e-12), "cell {c:?}: {d:e} > {budget:e}");
        }
        prop_assert!(g.dose_map().max_dose() <= budget);
        // Refusals by the budget happen and are the only way the guard held acquisitions back.
        if let Some(r) = g.last_refusal() {
            prop_assert!(r.limit.starts_with("stem."), "{r:?}");
        }
    }
}
