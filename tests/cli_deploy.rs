//! `scopegym deploy` end to end against the fake Nanonis server (the simulator behind the
//! Nanonis TCP protocol): the heuristic and a PPO policy (its TorchScript export and its
//! checkpoint) run full episodes over TCP, refusals stop commands before they reach the
//! server, and every command lands in the audit log.

use scopegym_drivers::nanonis::FakeNanonis;
use scopegym_envs::tasks::TaskConfig;
use scopegym_envs::tasks::pfm_domain_writing::Config;
use std::path::Path;

mod common;
use common::{ok, run};

const TASK: &str = "scopegym/PfmDomainWriting-v1";

/// Limits wide enough for the task's heuristic (pulses up to 9 V, 100 ms) on a 10 µm scanner.
const WIDE: &str = "[spm]\nbias_window = [\"-10 V\", \"10 V\"]\npulse_bias_max = \"9 V\"\n\
                    pulse_width_max = \"100 ms\"\nscanner_range = [\"10 µm\", \"10 µm\"]\n";

fn fake() -> FakeNanonis {
    let cfg = Config::at_level(Default::default());
    FakeNanonis::from_config(cfg.instrument.clone(), cfg.split.region()).unwrap()
}

fn audit(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn deploy(url: &str, limits: &Path, log: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "deploy",
        TASK,
        "--driver",
        url,
        "--limits",
        limits.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = ok(&run(&args));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn the_heuristic_runs_over_tcp_and_refusals_never_reach_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (wide, strict) = (dir.path().join("wide.toml"), dir.path().join("strict.toml"));
    std::fs::write(&wide, WIDE).unwrap();
    std::fs::write(&strict, WIDE.replace("\"9 V\"", "\"1 V\"")).unwrap();
    let server = fake();
    let url = server.url();

    let log = dir.path().join("audit.jsonl");
    let r = deploy(
        &url,
        &wide,
        &log,
        &["--agent", "heuristic", "--episodes", "2"],
    );
    println!("{r}");
    let eps = r["episodes"].as_array().unwrap();
    assert_eq!(eps.len(), 2);
    for e in eps {
        assert!(e["steps"].as_u64().unwrap() >= 1);
        assert!(e["refused"].is_null(), "{e}");
    }
    let sent = server.log();
    let pulses = sent.iter().filter(|c| c.name == "Bias.Pulse").count();
    let steps: u64 = eps.iter().map(|e| e["steps"].as_u64().unwrap()).sum();
    assert_eq!(pulses as u64, steps, "one pulse per step over TCP");
    let lines = audit(&log);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["command"] == "bias_pulse")
            .count() as u64,
        steps
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["command"] == "new_episode")
            .count(),
        2
    );
    // `deploy` ends by making the instrument safe: the tip was withdrawn.
    assert!(sent.iter().any(|c| c.name == "ZCtrl.Withdraw"), "{sent:?}");

    // Under a 1 V pulse limit the heuristic's first pulse is refused before it is sent. (The
    // tip stays withdrawn after a run: an operator re-approaches it, here a fresh sample.)
    server.reset(1).unwrap();
    server.clear_log();
    let log2 = dir.path().join("strict.jsonl");
    let r = deploy(&url, &strict, &log2, &["--agent", "heuristic"]);
    let e = &r["episodes"][0];
    assert_eq!(e["steps"], 1);
    assert!(
        e["refused"]
            .as_str()
            .unwrap()
            .contains("spm.pulse_bias_max"),
        "{e}"
    );
    assert!(
        !server.log().iter().any(|c| c.name == "Bias.Pulse"),
        "a refused pulse reached the server"
    );
    let refused: Vec<_> = audit(&log2)
        .into_iter()
        .filter(|l| l["result"] == "refused")
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["limit"], "spm.pulse_bias_max");
}

#[test]
fn real_instruments_need_a_limits_file_and_bad_urls_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.jsonl");
    let out = run(&[
        "deploy",
        TASK,
        "--driver",
        "nanonis://127.0.0.1:9",
        "--agent",
        "heuristic",
        "--log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits"));
    let out = run(&[
        "deploy",
        TASK,
        "--driver",
        "nanonis:/x",
        "--agent",
        "heuristic",
        "--log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nanonis:/x"));
    // An SPM controller cannot run a STEM task.
    let out = run(&[
        "deploy",
        "scopegym/StemAutofocus-v2",
        "--driver",
        "nanonis://127.0.0.1:9",
        "--limits",
        "drivers/limits.example.toml",
        "--agent",
        "heuristic",
        "--log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot run"));
}

#[cfg(feature = "torch")]
#[test]
fn a_ppo_policy_runs_over_tcp_from_its_torchscript_export_and_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let wide = dir.path().join("wide.toml");
    std::fs::write(&wide, WIDE).unwrap();
    let train = dir.path().join("train");
    // A short training run (one PPO iteration of 8 × 32 steps) that saves its policy.
    let cfg = dir.path().join("ppo.toml");
    std::fs::write(&cfg, "num_steps = 32\n").unwrap();
    ok(&run(&[
        "run",
        TASK,
        "--agent",
        "ppo",
        "--steps",
        "256",
        "--seeds",
        "1",
        "--episodes",
        "1",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        train.to_str().unwrap(),
    ]));
    let ck = train.join("checkpoints/seed0");
    let pt = ck.join("ppo.pt");
    let st = ck.join("ppo.safetensors");
    assert!(pt.is_file() && st.is_file());

    let server = fake();
    let url = server.url();
    let (log, log_b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let a = deploy(&url, &wide, &log, &["--policy", pt.to_str().unwrap()]);
    server.reset(0).unwrap(); // the same sample again, tip re-approached
    let b = deploy(
        &url,
        &wide,
        &log_b,
        &["--agent", "ppo", "--checkpoint", st.to_str().unwrap()],
    );
    println!("{a}\n{b}");
    for r in [&a, &b] {
        let e = &r["episodes"][0];
        let steps = e["steps"].as_u64().unwrap();
        assert!(steps >= 1);
        if e["refused"].is_null() {
            assert!(e["terminated"].as_bool().unwrap() || steps == 25, "{e}");
        }
    }
    // The exported policy is the checkpoint's deterministic policy: the same episode.
    assert_eq!(a["episodes"][0]["steps"], b["episodes"][0]["steps"]);
    let (ra, rb) = (
        a["episodes"][0]["return"].as_f64().unwrap(),
        b["episodes"][0]["return"].as_f64().unwrap(),
    );
    assert!((ra - rb).abs() < 1e-3, "{ra} vs {rb}");
    // ... the same pulses, up to f32 rounding of the traced network.
    let pulses = |p: &Path| -> Vec<(f64, f64)> {
        audit(p)
            .iter()
            .filter(|l| l["command"] == "bias_pulse")
            .map(|l| {
                let v = |k: &str| {
                    let s = l["args"][k].as_str().unwrap();
                    s.split(' ').next().unwrap().parse::<f64>().unwrap()
                };
                (v("bias"), v("duration"))
            })
            .collect()
    };
    let (pa, pb) = (pulses(&log), pulses(&log_b));
    assert_eq!(pa.len(), pb.len());
    assert!(!pa.is_empty());
    for (x, y) in pa.iter().zip(&pb) {
        assert!(
            (x.0 - y.0).abs() < 1e-3 && (x.1 / y.1 - 1.0).abs() < 1e-3,
            "{x:?} vs {y:?}"
        );
    }
    assert!(server.log().iter().any(|c| c.name == "Bias.Pulse"));
    // A checkpoint of another task does not fit.
    let out = run(&[
        "deploy",
        "scopegym/SpmTipConditioning-v2",
        "--driver",
        "sim",
        "--agent",
        "ppo",
        "--checkpoint",
        st.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not fit"));
}
