//! The STEM gateway client against a Rust gateway over the simulators on loopback: every
//! method round trip gives what the simulator gives in process, every injected fault gives its
//! documented error within the deadline followed by a `make_safe` over a fresh connection, and
//! a full StemAutofocus-v2 episode through the gateway equals the one on the simulator.
//! The last test drives the Python reference gateway when the `scopegym` package with
//! `StemSim` is importable, and skips with a printed reason otherwise.

#[path = "support/stem_server.rs"]
mod stem_server;

use scopegym_drivers::error::DRIVER_PREFIX;
use scopegym_drivers::stem_gateway::codes;
use scopegym_drivers::{DriverError, HasSafeHandle, StemGatewayClient, StemGatewayOptions};
use scopegym_envs::level::Difficulty;
use scopegym_envs::tasks::stem_autofocus::{Config as AutofocusConfig, StemAutofocus};
use scopegym_envs::tasks::stem_eels_explore::Config as EelsConfig;
use scopegym_envs::tasks::{NewEpisode, TaskConfig};
use scopegym_envs::{Env, Info, TaskEnv};
use scopegym_physics::PhysicsError;
use scopegym_physics::instrument::{ScanSettings, StemInstrument};
use scopegym_physics::stem::StemSimulator;
use scopegym_physics::stem::lattice::LatticeSimulator;
use scopegym_physics::stem::optics::Aberrations;
use std::time::{Duration, Instant};
use stem_server::{Fault, Server, serve};

fn opts(timeout_ms: u64) -> StemGatewayOptions {
    StemGatewayOptions {
        timeout: Duration::from_millis(timeout_ms),
        acquisition_margin: Duration::from_millis(timeout_ms),
        ..StemGatewayOptions::default()
    }
}

/// A small full simulator (the EELS task's instrument, with a 16² overview).
fn eels_sim() -> StemSimulator {
    let mut cfg = EelsConfig::at_level(Difficulty::Easy);
    cfg.pixels = 16;
    let mut s = StemSimulator::new(cfg.instrument_config(), 0).unwrap();
    s.set_region(cfg.split.region());
    s
}

fn lattice_server() -> (Server, StemGatewayClient) {
    let cfg = AutofocusConfig::default();
    let sim = LatticeSimulator::new(cfg.instrument.clone(), 0).unwrap();
    let server = serve(sim);
    let client = StemGatewayClient::connect(&server.address(), opts(2000)).unwrap();
    (server, client)
}

#[test]
fn every_method_round_trips_and_matches_the_simulator() {
    let server = serve(eels_sim());
    let mut c = StemGatewayClient::connect(&server.address(), opts(5000)).unwrap();
    let mut d = eels_sim();
    let (mut ic, mut id) = (Info::new(), Info::new());
    c.new_episode(7, &mut ic).unwrap();
    d.new_episode(7, &mut id).unwrap();
    assert!(!id.is_empty());
    assert_eq!(ic, id, "start_episode reports the randomized parameters");

    assert_eq!(c.info().name, d.info().name);
    assert!(c.info().simulated);
    assert_eq!(c.clock(), d.clock());
    assert_eq!(c.beam_energy(), d.beam_energy());
    assert_eq!(c.beam_current(), d.beam_current());
    assert_eq!(c.scan_settings(), d.scan_settings());
    assert_eq!(c.is_blanked(), d.is_blanked());
    c.status().unwrap();

    c.set_blanked(false).unwrap();
    d.set_blanked(false).unwrap();
    assert!(!c.is_blanked());
    let req = ScanSettings {
        rows: 12,
        cols: 16,
        dwell_time: 3e-6,
        ..d.scan_settings()
    };
    assert_eq!(
        c.configure_scan(&req).unwrap(),
        d.configure_scan(&req).unwrap()
    );
    assert_eq!(c.scan_settings(), req);

    // Every one of the 25 coefficients non-zero (C32 … C56 included) survives the wire.
    let mut v = d.aberrations().values();
    for (i, (x, name)) in v.iter_mut().zip(Aberrations::NAMES).enumerate() {
        *x = if name.starts_with("phi") {
            0.05 * (i as f64 + 1.0)
        } else {
            0.5e-9 * (i as f64 + 1.0)
        };
    }
    let ab = Aberrations::from_values(v);
    assert_eq!(
        c.set_aberrations(&ab).unwrap(),
        d.set_aberrations(&ab).unwrap()
    );
    assert_eq!(c.aberrations(), ab);
    assert_eq!(c.aberrations(), d.aberrations());

    {
        let fc = c.acquire_frame().unwrap();
        let fd = d.acquire_frame().unwrap();
        assert_eq!(fc.image.dim(), (12, 16));
        assert_eq!(fc.image, fd.image);
        assert_eq!(fc.meta, fd.meta);
    }
    c.move_probe([1e-10, -2e-10]).unwrap();
    d.move_probe([1e-10, -2e-10]).unwrap();
    assert_eq!(c.probe_position(), [1e-10, -2e-10]);
    assert_eq!(
        c.acquire_point(1e-5).unwrap(),
        d.acquire_point(1e-5).unwrap()
    );
    {
        let sc = c.acquire_spectrum(1e-3).unwrap();
        let sd = d.acquire_spectrum(1e-3).unwrap();
        assert!(!sc.energy.is_empty());
        assert_eq!(sc.energy, sd.energy);
        assert_eq!(sc.counts, sd.counts);
    }
    assert_eq!(c.clock(), d.clock());
    c.make_safe().unwrap();
    assert!(c.is_blanked());
    // Refused while blanked: the simulator's refusal, as a gateway error.
    let e = c.acquire_frame().unwrap_err();
    match &e {
        PhysicsError::Refused { reason, .. } => {
            assert!(reason.starts_with(DRIVER_PREFIX), "{reason}");
            assert!(reason.contains("-32000 (refused)"), "{reason}");
        }
        e => panic!("{e}"),
    }
    // The safe handle works on its own connection.
    let before = server.shared.make_safe_count();
    c.safe_handle().make_safe().unwrap();
    assert_eq!(server.shared.make_safe_count(), before + 1);
    assert!(
        c.safe_handle()
            .describe()
            .starts_with("stem-gateway://127.0.0.1:")
    );
    // No make_safe on the policy's connection besides the explicit one.
    let log = server.shared.log.lock().unwrap();
    assert_eq!(log.make_safe.iter().filter(|&&n| n == 0).count(), 1);
}

/// Injects `fault` on `method`, calls it through `call`, and checks the error, the time it took
/// and the `make_safe` over a fresh connection.
fn check_fault(
    method: &str,
    fault: Fault,
    want: &str,
    call: fn(&mut StemGatewayClient) -> Result<(), PhysicsError>,
    closes: bool,
) {
    let (server, mut c) = lattice_server();
    c.set_blanked(false).unwrap();
    let conns = server.shared.connections();
    server.shared.inject(method, fault.clone());
    let t = Instant::now();
    let e = call(&mut c).unwrap_err();
    let took = t.elapsed();
    // The client's deadline is 2 s (+2 s margin for acquisitions); the fault must be reported
    // well within the longest deadline plus the make_safe.
    assert!(took < Duration::from_secs(7), "{fault:?}: took {took:?}");
    let PhysicsError::Refused { reason, .. } = &e else {
        panic!("{fault:?}: {e}")
    };
    assert!(reason.starts_with(DRIVER_PREFIX), "{fault:?}: {reason}");
    assert!(reason.contains(want), "{fault:?}: {reason} lacks {want:?}");
    assert_eq!(c.make_safe_attempts(), 1, "{fault:?}");
    let log = server.shared.log.lock().unwrap();
    assert_eq!(
        log.make_safe.len(),
        1,
        "{fault:?}: the gateway saw no make_safe"
    );
    assert!(
        log.make_safe[0] >= conns,
        "{fault:?}: make_safe came over the old connection"
    );
    drop(log);
    assert_eq!(c.is_closed(), closes, "{fault:?}");
    // Only a fault on the policy connection closes it; later calls fail at once then.
    let next = c.set_blanked(false);
    assert_eq!(next.is_err(), closes, "{fault:?}: {next:?}");
    if closes {
        let e = next.unwrap_err().to_string();
        assert!(e.contains("closed after an earlier fault"), "{e}");
    }
}

/// The typed error of `status` with `fault` injected (after connecting, which calls `status`).
fn status_error(fault: Fault) -> DriverError {
    let (server, c) = lattice_server();
    server.shared.inject("status", fault);
    c.status().unwrap_err()
}

fn frame(c: &mut StemGatewayClient) -> Result<(), PhysicsError> {
    c.acquire_frame().map(|_| ())
}

fn set_blanked(c: &mut StemGatewayClient) -> Result<(), PhysicsError> {
    c.set_blanked(true)
}

#[test]
fn a_slow_gateway_times_out_and_closes_the_connection() {
    check_fault(
        "acquire_frame",
        Fault::Delay(Duration::from_secs(6)),
        "timed out after 2.",
        frame,
        true,
    );
    let t = Instant::now();
    let e = status_error(Fault::Delay(Duration::from_secs(4)));
    assert!(
        matches!(e, DriverError::Timeout { ref command, seconds } if command == "status" && seconds == 2.0),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(4));
}

#[test]
fn a_truncated_reply_is_a_protocol_error() {
    check_fault("acquire_frame", Fault::Truncate, "truncated", frame, true);
    let e = status_error(Fault::Truncate);
    assert!(
        matches!(&e, DriverError::Protocol { reason, .. } if reason.contains("truncated")),
        "{e}"
    );
}

#[test]
fn oversized_declared_lengths_are_refused_without_reading() {
    check_fault("acquire_frame", Fault::HugeHeader, "too large", frame, true);
    check_fault(
        "acquire_frame",
        Fault::HugeAttachment,
        "too large",
        frame,
        true,
    );
    for f in [Fault::HugeHeader, Fault::HugeAttachment] {
        let t = Instant::now();
        let e = status_error(f.clone());
        assert!(
            matches!(&e, DriverError::Protocol { reason, .. } if reason.contains("too large")),
            "{f:?}: {e}"
        );
        // Refused from the declaration, not after waiting for bytes that never come.
        assert!(t.elapsed() < Duration::from_secs(1), "{f:?}");
    }
}

#[test]
fn garbage_and_wrong_ids_are_protocol_errors() {
    check_fault("set_blanked", Fault::Garbage, "not JSON", set_blanked, true);
    check_fault("set_blanked", Fault::WrongId, "reply id", set_blanked, true);
    for (f, want) in [(Fault::Garbage, "not JSON"), (Fault::WrongId, "reply id")] {
        let e = status_error(f.clone());
        assert!(
            matches!(&e, DriverError::Protocol { reason, .. } if reason.contains(want)),
            "{f:?}: {e}"
        );
    }
}

#[test]
fn an_error_reply_is_a_gateway_error_and_keeps_the_connection() {
    check_fault(
        "acquire_frame",
        Fault::ErrorReply(codes::INSTRUMENT_FAULT, "HAADF detector saturated".into()),
        "gateway error -32003 (instrument fault): HAADF detector saturated",
        frame,
        false,
    );
    let e = status_error(Fault::ErrorReply(
        codes::INSTRUMENT_FAULT,
        "vacuum interlock".into(),
    ));
    assert!(
        matches!(&e, DriverError::Gateway { code, message, .. } if *code == codes::INSTRUMENT_FAULT && message == "vacuum interlock"),
        "{e}"
    );
    let p: PhysicsError = e.into();
    assert!(
        p.to_string()
            .contains("-32003 (instrument fault): vacuum interlock"),
        "{p}"
    );
}

#[test]
fn a_getter_fault_is_reported_by_the_next_call() {
    let (server, mut c) = lattice_server();
    let before = c.clock();
    server.shared.inject(
        "clock",
        Fault::ErrorReply(codes::INTERNAL_ERROR, "oops".into()),
    );
    assert_eq!(c.clock(), before, "a failed getter returns the last value");
    assert_eq!(server.shared.make_safe_count(), 1);
    let e = c.set_blanked(false).unwrap_err();
    assert!(e.to_string().contains("oops"), "{e}");
    // Reported once; the connection is still usable.
    c.set_blanked(false).unwrap();
}

#[test]
fn unsupported_start_episode_is_a_no_op() {
    let (server, mut c) = lattice_server();
    server.shared.inject(
        "start_episode",
        Fault::ErrorReply(codes::UNSUPPORTED, "no stage".into()),
    );
    let mut info = Info::new();
    c.new_episode(3, &mut info).unwrap();
    assert!(info.is_empty());
    assert_eq!(server.shared.make_safe_count(), 0);
    // Any other error is a fault.
    server.shared.inject(
        "start_episode",
        Fault::ErrorReply(codes::INSTRUMENT_FAULT, "stage stuck".into()),
    );
    let e = c.new_episode(3, &mut info).unwrap_err();
    assert!(e.to_string().contains("stage stuck"), "{e}");
    assert_eq!(server.shared.make_safe_count(), 1);
}

#[test]
fn a_silent_server_cannot_hang_connect() {
    let addr = stem_server::silent();
    let t = Instant::now();
    let e = StemGatewayClient::connect(&addr.to_string(), opts(300)).unwrap_err();
    assert!(
        matches!(e, DriverError::Timeout { ref command, .. } if command == "info"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// A StemAutofocus-v2 episode over `inst`, driven by the task's heuristic: observations,
/// rewards and flags of every step.
fn autofocus_episode<I>(inst: I, seed: u64) -> Vec<(Vec<f32>, f64, bool, bool)>
where
    I: StemInstrument + scopegym_envs::tasks::stem_autofocus::ProbeTruth + NewEpisode + Send,
{
    let cfg = AutofocusConfig::default();
    let mut env = TaskEnv::new("scopegym/StemAutofocus-v2", StemAutofocus::new(cfg, inst));
    let (mut obs, _) = env.reset(Some(seed)).unwrap();
    let mut out = vec![(obs.as_box().unwrap().to_vec(), 0.0, false, false)];
    loop {
        let a = env.heuristic_action(&obs);
        let s = env.step(&a).unwrap();
        out.push((
            s.obs.as_box().unwrap().to_vec(),
            s.reward,
            s.terminated,
            s.truncated,
        ));
        if s.terminated || s.truncated {
            return out;
        }
        obs = s.obs;
    }
}

#[test]
fn an_autofocus_episode_through_the_gateway_equals_the_simulator() {
    let cfg = AutofocusConfig::default();
    let mut served = LatticeSimulator::new(cfg.instrument.clone(), 0).unwrap();
    served.set_region(cfg.split.region());
    let server = serve(served);
    // StemAutofocus::new sets the split's region on its instrument; behind a gateway the
    // server's simulator is configured with it instead (as the Python gateway does).
    let mut direct = LatticeSimulator::new(cfg.instrument.clone(), 0).unwrap();
    direct.set_region(cfg.split.region());
    let client = StemGatewayClient::connect(&server.address(), opts(5000)).unwrap();
    let remote = autofocus_episode(client, 11);
    let local = autofocus_episode(direct, 11);
    assert!(remote.len() > 3, "{} steps", remote.len());
    for (k, (r, l)) in remote.iter().zip(&local).enumerate() {
        assert_eq!(r, l, "step {k}");
    }
    assert_eq!(remote.len(), local.len());
    assert!(server.shared.make_safe_count() == 0);
}

/// The Python reference gateway, when the package with `StemSim` is importable.
#[test]
fn the_python_gateway_serves_an_episode() {
    let python = std::env::var("SCOPEGYM_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python)
        .args([
            "-c",
            "import scopegym, scopegym._native as n; n.StemSim; \
             assert 'scopegym/StemAutofocus-v2' in scopegym.task_ids()",
        ])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => {
            println!(
                "SKIPPED: `{python}` has no scopegym package of this version (with StemSim \
                 and StemAutofocus-v2): build and install it (scripts/test.sh does) or set \
                 SCOPEGYM_PYTHON to run this test"
            );
            return;
        }
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/stem_gateway.py");
    let mut child = std::process::Command::new(&python)
        .args([script, "--task", "scopegym/StemAutofocus-v2", "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first stdout line is the port; never wait for it forever.
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut line = String::new();
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let Ok(port) = line.trim().parse::<u16>() else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the gateway's first line is not a port: {line:?}");
    };
    let result = std::panic::catch_unwind(|| {
        let client =
            StemGatewayClient::connect(&format!("127.0.0.1:{port}"), opts(10_000)).unwrap();
        // The Python gateway serves the task's simulator (with its fast-fidelity settings).
        let cfg = AutofocusConfig::default();
        let mut direct = scopegym_envs::tasks::stem_autofocus::simulator(&cfg, 0).unwrap();
        direct.set_region(cfg.split.region());
        let remote = autofocus_episode(client, 5);
        let local = autofocus_episode(direct, 5);
        assert_eq!(remote, local);
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn out_of_limit_stem_commands_never_reach_the_gateway() {
    use scopegym_drivers::{AuditLog, Guarded, Limits};
    let (server, mut client) = lattice_server();
    client.set_blanked(false).unwrap();
    let s = client.scan_settings();
    // The dose of one frame with the gateway's settings, measured on the gateway itself.
    let frame_dose = client.acquire_frame().unwrap().meta.dose;
    assert!(frame_dose > 0.0);
    let mut limits = Limits::default();
    limits.stem.dose_budget = 1.5 * frame_dose;
    limits.stem.dose_cell = 10.0 * s.field_of_view()[0];
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut g = Guarded::new(client, limits)
        .unwrap()
        .with_audit(AuditLog::append_file(&audit).unwrap());
    let seen = |server: &Server| server.shared.log.lock().unwrap().methods.clone();
    let before = seen(&server);

    // The first frame fits the budget; the second would exceed it and is never sent.
    g.acquire_frame().unwrap();
    let refused = |r: Result<(), PhysicsError>, limit: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.guard_limit(), Some(limit), "{e}");
    };
    refused(g.acquire_frame().map(|_| ()), "stem.dose_budget");
    // A 1 µm defocus step, a 256² frame at 1 ms per pixel, a 10 s spectrum.
    let mut a = g.aberrations();
    a.c10 += 1e-6;
    refused(
        g.set_aberrations(&a).map(|_| ()),
        "stem.aberration_step_max.c10",
    );
    let slow = ScanSettings {
        rows: 256,
        cols: 256,
        dwell_time: 1e-3,
        ..s
    };
    refused(g.configure_scan(&slow).map(|_| ()), "stem.max_frame_time");
    refused(g.acquire_spectrum(10.0).map(|_| ()), "stem.max_exposure");

    let after = seen(&server);
    let sent: Vec<&String> = after[before.len()..].iter().collect();
    println!("sent after the limits were set: {sent:?}");
    assert_eq!(sent.iter().filter(|m| **m == "acquire_frame").count(), 1);
    for m in ["set_aberrations", "configure_scan", "acquire_spectrum"] {
        assert!(!sent.iter().any(|x| *x == m), "{m} reached the gateway");
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let limits: Vec<&str> = lines
        .iter()
        .filter(|l| l["result"] == "refused")
        .map(|l| l["limit"].as_str().unwrap())
        .collect();
    assert_eq!(
        limits,
        [
            "stem.dose_budget",
            "stem.aberration_step_max.c10",
            "stem.max_frame_time",
            "stem.max_exposure"
        ]
    );
}
