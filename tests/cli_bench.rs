//! `scopegym run`, `run --compare` and `suite` end to end: the files they write hold the
//! documented fields, agree with an independent evaluation, and the figures are valid PNGs.

use scopegym::envs::evaluate::{Policy, evaluate};
use scopegym::envs::registry::make;
use std::path::Path;
use std::time::Instant;

mod common;
use common::{ok, run};

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Decodes the PNG and checks that it is not blank (several colours drawn).
fn assert_png(path: &Path, min_width: u32) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    assert!(
        img.width() >= min_width && img.height() >= 300,
        "{:?}",
        img.dimensions()
    );
    let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    println!(
        "{}: {:?}, {} colours",
        path.display(),
        img.dimensions(),
        colours.len()
    );
    assert!(colours.len() > 20, "{} looks blank", path.display());
}

#[test]
fn run_writes_results_and_curves_and_compare_overlays() {
    let dir = tempfile::tempdir().unwrap();
    let id = "scopegym/StemEelsExplore-v2";
    let t = Instant::now();
    let mut outs = Vec::new();
    for agent in ["heuristic", "random"] {
        let out = dir.path().join(agent);
        let text = ok(&run(&[
            "run",
            id,
            "--agent",
            agent,
            "--seeds",
            "2",
            "--episodes",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]));
        assert!(text.contains("mean return"), "{text}");
        outs.push(out);
    }
    println!("two runs in {:.2} s", t.elapsed().as_secs_f64());
    let r = json(&outs[0].join("results.json"));
    assert_eq!(r["env_id"], id);
    assert_eq!(r["agent"], "heuristic");
    assert_eq!(r["seeds"], serde_json::json!([0, 1]));
    let per_seed = r["per_seed"].as_array().unwrap();
    assert_eq!(per_seed.len(), 2);
    for key in ["seed", "return_mean", "success_rate", "steps"] {
        assert!(!per_seed[1][key].is_null(), "per_seed.{key}");
    }
    for key in ["return_mean", "return_ci95", "success_rate"] {
        assert!(r["summary"][key].is_number(), "summary.{key}");
    }
    let p = &r["provenance"];
    assert_eq!(p["version"], scopegym::VERSION);
    assert_eq!(p["commit"], scopegym::GIT_COMMIT);
    assert_eq!(p["env_config"]["split"], "test");
    assert_eq!(p["env_config"]["difficulty"], "medium");
    assert_eq!(p["budget"]["episodes"], 2);
    // The explore task reports regret: kept per step for the curves.
    assert_eq!(
        per_seed[0]["episodes"][0]["regret"]
            .as_array()
            .unwrap()
            .len(),
        100
    );
    // Seed 1's returns equal the envs crate's own evaluation on episode seeds 1000000, 1000001.
    let mut env = make(
        id,
        Some(&toml::from_str("split = \"test\"\ndifficulty = \"medium\"").unwrap()),
    )
    .unwrap();
    let s = evaluate(env.as_mut(), &Policy::Heuristic, 1_000_000..1_000_002).unwrap();
    let got = per_seed[1]["return_mean"].as_f64().unwrap();
    assert!(
        (got - s.mean_return).abs() < 1e-9,
        "{got} vs {}",
        s.mean_return
    );
    assert_png(&outs[0].join("curves.png"), 1000);

    let cmp = dir.path().join("cmp");
    let text = ok(&run(&[
        "run",
        "--compare",
        outs[0].to_str().unwrap(),
        outs[1].to_str().unwrap(),
        "--out",
        cmp.to_str().unwrap(),
    ]));
    assert!(
        text.contains("heuristic") && text.contains("random"),
        "{text}"
    );
    assert_png(&cmp.join("compare.png"), 1000);
}

#[test]
fn run_records_the_resolved_agent_config() {
    // `--config` sets one field; results.json records every field, defaults filled in.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bo.toml");
    std::fs::write(&cfg, "xi = 0.01\nacquisition = \"ucb\"\n").unwrap();
    let out = dir.path().join("bo");
    ok(&run(&[
        "run",
        "scopegym/StemAutofocus-v2",
        "--agent",
        "bo",
        "--seeds",
        "1",
        "--episodes",
        "1",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let r = json(&out.join("results.json"));
    let a = &r["provenance"]["agent_config"];
    assert_eq!(a["xi"], 0.01);
    assert_eq!(a["acquisition"]["ucb"]["beta"], 4.0, "{a}");
    assert_eq!(a["kernel"], "matern52");
    assert_eq!(a["candidates"], 1000);
    // Agents without settings record null.
    let out = dir.path().join("random");
    ok(&run(&[
        "run",
        "scopegym/StemAutofocus-v2",
        "--agent",
        "random",
        "--seeds",
        "1",
        "--episodes",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(json(&out.join("results.json"))["provenance"]["agent_config"].is_null());
}

#[test]
fn run_rejects_bad_input_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "run",
                "scopegym/StemSparseScan-v2",
                "--agent",
                "nope",
                "--out",
                o,
            ],
            "unknown agent",
        ),
        (
            vec!["run", "scopegym/Nope-v1", "--agent", "random", "--out", o],
            "Nope",
        ),
        (
            vec![
                "run",
                "scopegym/StemSparseScan-v2",
                "--agent",
                "random",
                "--seeds",
                "0",
                "--out",
                o,
            ],
            "--seeds",
        ),
        (vec!["suite", "--budget", "huge", "--out", o], "huge"),
        (
            vec!["suite", "--tasks", "NoSuchTask", "--out", o],
            "NoSuchTask",
        ),
    ] {
        let r = run(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn suite_small_on_two_tasks_writes_scores_and_figure() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("suite");
    let t = Instant::now();
    let r = run(&[
        "suite",
        "--budget",
        "small",
        "--tasks",
        "StemSparseScan,AfmFeedbackTuning",
        "--out",
        out.to_str().unwrap(),
    ]);
    let text = ok(&r);
    let err = String::from_utf8_lossy(&r.stderr);
    println!(
        "suite on 2 tasks in {:.2} s\n{text}",
        t.elapsed().as_secs_f64()
    );
    assert!(text.contains("IQM"), "{text}");
    let s = json(&out.join("suite.json"));
    assert_eq!(s["suite"]["version"], 2);
    assert_eq!(s["suite"]["budget"], "small");
    assert_eq!(s["suite"]["split"], "test");
    assert_eq!(s["provenance"]["commit"], scopegym::GIT_COMMIT);
    let tasks = s["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    for t in tasks {
        let agents: Vec<&str> = t["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["agent"].as_str().unwrap())
            .collect();
        assert_eq!(&agents[..2], ["random", "heuristic"]);
        let seeds = t["agents"][0]["results"]["per_seed"].as_array().unwrap();
        assert_eq!(seeds.len(), 5);
    }
    let agg = s["aggregate"].as_array().unwrap();
    for a in agg {
        let iqm = a["iqm"].as_f64().unwrap();
        let ci = a["iqm_ci"].as_array().unwrap();
        let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
        assert!(lo <= hi && a["profile"].as_array().unwrap().len() == 61);
        println!("{}: IQM {iqm:.3} [{lo:.3}, {hi:.3}]", a["agent"]);
    }
    // Agents the suite lists that this build lacks are reported, never silently dropped.
    for sk in s["skipped"].as_array().unwrap() {
        let (agent, task) = (sk["agent"].as_str().unwrap(), sk["task"].as_str().unwrap());
        assert!(
            err.contains(&format!("skipping {agent} on {task}")),
            "{err}"
        );
        assert!(!sk["reason"].as_str().unwrap().is_empty());
    }
    assert_png(&out.join("suite.png"), 1000);
}
