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

/// Rewrites the JSON file at `path` with `edit` applied.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v = json(path);
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The suite agent `agent`'s entry on task `t` of a suite.json.
fn on_task<'a>(t: &'a serde_json::Value, agent: &str) -> Option<&'a serde_json::Value> {
    t["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == agent)
}

#[test]
fn suite_scores_outside_results_beside_its_agents_and_refuses_other_scenarios() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let out = p("suite");
    let o = out.to_str().unwrap();
    // Outside runs of raster on StemAutofocus: the suite's scenarios (run seed 0, the small
    // budget's 4 episodes), and two that are not (3 episodes; run seeds 0 and 1).
    let id = "scopegym/StemAutofocus-v2";
    for (name, seeds, episodes) in [("same", "1", "4"), ("fewer", "1", "3"), ("two", "2", "4")] {
        ok(&run(&[
            "run",
            id,
            "--agent",
            "raster",
            "--seeds",
            seeds,
            "--episodes",
            episodes,
            "--out",
            p(name).to_str().unwrap(),
        ]));
    }
    let same = p("same").join("results.json");
    let suite = |extra: &[&str]| {
        let mut args = vec![
            "suite",
            "--budget",
            "small",
            "--tasks",
            "StemAutofocus,StemSparseScan",
            "--agents",
            "raster",
            "--seeds",
            "1",
            "--out",
            o,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    // Named as a suite agent: refused, naming the file.
    let r = suite(&["--add-results", same.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains(same.to_str().unwrap()) && err.contains("\"raster\""),
        "{err}"
    );
    edit_json(&same, |v| v["agent"] = "outside".into());
    // Other scenarios: refused, naming the file and the mismatch.
    for (name, agent, needle) in [
        (
            "fewer",
            "fewer",
            "episode seeds [0, 1, 2], but the suite's are [0, 1, 2, 3]",
        ),
        ("two", "two", "run seeds [0, 1], but the suite ran [0]"),
    ] {
        let f = p(name).join("results.json");
        edit_json(&f, |v| v["agent"] = agent.into());
        let r = suite(&["--add-results", p(name).to_str().unwrap()]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{err}");
        assert!(
            err.contains(f.to_str().unwrap()) && err.contains(needle),
            "{name}: {err}"
        );
    }
    // Another difficulty or a task the suite did not run: refused.
    let hard = p("hard.json");
    std::fs::copy(&same, &hard).unwrap();
    edit_json(&hard, |v| {
        v["agent"] = "hard".into();
        v["provenance"]["env_config"]["difficulty"] = "hard".into();
    });
    let other = p("other.json");
    std::fs::copy(&same, &other).unwrap();
    edit_json(&other, |v| {
        v["agent"] = "other".into();
        v["env_id"] = "scopegym/StemEelsExplore-v2".into();
    });
    for (f, needle) in [
        (&hard, "difficulty = \"hard\" (suite: \"medium\")"),
        (
            &other,
            "task scopegym/StemEelsExplore-v2 is not in this suite run (it runs: scopegym/StemAutofocus-v2, scopegym/StemSparseScan-v2)",
        ),
    ] {
        let r = suite(&["--add-results", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{err}");
        assert!(
            err.contains(f.to_str().unwrap()) && err.contains(needle),
            "{err}"
        );
    }

    // The suite's scenarios: an `outside` row beside the suite's agents.
    let r = suite(&["--add-results", same.to_str().unwrap()]);
    let text = ok(&r);
    println!("{text}");
    let s = json(&out.join("suite.json"));
    let t = s["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap();
    let mean = |a: &serde_json::Value| {
        let ps = a["results"]["per_seed"].as_array().unwrap();
        ps.iter()
            .map(|x| x["return_mean"].as_f64().unwrap())
            .sum::<f64>()
            / ps.len() as f64
    };
    let lo = mean(on_task(t, "random").unwrap());
    let hi = mean(on_task(t, "heuristic").unwrap());
    let raw = json(&same)["per_seed"][0]["return_mean"].as_f64().unwrap();
    let want = (raw - lo) / (hi - lo);
    let got = on_task(t, "outside").unwrap();
    let norm = got["normalized"][0].as_f64().unwrap();
    println!("outside: return {raw}, random {lo}, heuristic {hi}: normalized {norm} (want {want})");
    assert!(
        (norm - want).abs() <= 1e-12 * want.abs().max(1.0),
        "{norm} vs {want}"
    );
    // The same agent on the same scenarios scores exactly as the suite's own raster.
    assert_eq!(
        got["normalized"],
        on_task(t, "raster").unwrap()["normalized"]
    );
    // It covers 1 of the 2 tasks: "-" in the other's column, and every agent's aggregate
    // over that one task beside its own.
    let sparse = s["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] != id)
        .unwrap();
    assert!(on_task(sparse, "outside").is_none());
    let line = text
        .lines()
        .find(|l| l.starts_with("StemSparseScan"))
        .unwrap();
    assert!(line.trim_end().ends_with('-'), "{line}");
    let agg = s["aggregate"].as_array().unwrap();
    let outside = agg.iter().find(|a| a["agent"] == "outside").unwrap();
    assert_eq!(outside["tasks"], serde_json::json!([id]));
    assert_eq!(outside["runs"], 1);
    assert_eq!(outside["iqm"].as_f64().unwrap(), norm);
    let ext = &s["external"][0];
    assert_eq!(ext["agent"], "outside");
    assert_eq!(ext["files"], serde_json::json!([same.to_str().unwrap()]));
    let same_tasks = ext["same_tasks"].as_array().unwrap();
    let raster_1 = same_tasks.iter().find(|a| a["agent"] == "raster").unwrap();
    assert_eq!(raster_1["tasks"], serde_json::json!([id]));
    assert_eq!(raster_1["iqm"].as_f64().unwrap(), norm);
    let heur_1 = same_tasks
        .iter()
        .find(|a| a["agent"] == "heuristic")
        .unwrap();
    assert!((heur_1["iqm"].as_f64().unwrap() - 1.0).abs() < 1e-12);
    assert!(text.contains("outside covers 1 of 2 tasks"), "{text}");
    assert!(text.contains("1/2"), "{text}");
    // The suite's jobs were reused on the reruns.
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("reusing 6 of 6"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}
