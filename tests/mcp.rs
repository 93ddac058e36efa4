//! `scopegym mcp` through the official MCP client (rmcp, child-process stdio transport): the
//! tools list, scripted episodes that must equal the native environment's for the same seed and
//! actions, tool errors (not a dead server) for malformed and out-of-limit calls, the record.

use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock};
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt};
use scopegym_agents::bench::run::{BuildInfo, RunResults, episode_seed};
use scopegym_agents::bench::suite::{Selection, SuiteFile, plan};
use scopegym_envs::space::Value;
use serde_json::{Value as Json, json};
use std::path::Path;

type Client = RunningService<RoleClient, ()>;

/// The suite's task config for `id` (what the server uses), with `extra` merged over it.
fn suite_config(id: &str, extra: &[(&str, toml::Value)]) -> toml::Value {
    let sel = Selection {
        budget: "full".into(),
        agents: Vec::new(),
        tasks: vec![id.into()],
        seeds: None,
    };
    let jobs = plan(&SuiteFile::embedded(), &sel, &BuildInfo::default()).unwrap();
    let mut t = match jobs[0].spec.env_table(&jobs[0].spec.split).unwrap() {
        toml::Value::Table(t) => t,
        _ => unreachable!(),
    };
    for (k, v) in extra {
        t.insert((*k).into(), v.clone());
    }
    toml::Value::Table(t)
}

async fn serve(id: &str, seed: u64, record: &Path, extra: &[&str]) -> Client {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_scopegym"));
    cmd.args(["mcp", "--task", id, "--seed", &seed.to_string(), "--record"])
        .arg(record)
        .args(extra);
    let transport = TokioChildProcess::new(cmd).unwrap();
    ().serve(transport).await.unwrap()
}

async fn call(c: &Client, name: &str, args: Json) -> CallToolResult {
    let Json::Object(args) = args else {
        panic!("arguments must be an object")
    };
    c.call_tool(CallToolRequestParams::new(name.to_owned()).with_arguments(args))
        .await
        .unwrap_or_else(|e| panic!("{name}: protocol error {e}"))
}

fn ok(r: &CallToolResult, what: &str) -> Json {
    assert_ne!(r.is_error, Some(true), "{what}: {:?}", r.content);
    r.structured_content.clone().expect("structured content")
}

fn error_text(r: &CallToolResult, what: &str) -> String {
    assert_eq!(
        r.is_error,
        Some(true),
        "{what} should fail: {:?}",
        r.content
    );
    match &r.content[0] {
        ContentBlock::Text(t) => t.text.clone(),
        c => panic!("{what}: expected text, got {c:?}"),
    }
}

fn has_png(r: &CallToolResult) -> bool {
    r.content
        .iter()
        .any(|c| matches!(c, ContentBlock::Image(i) if i.mime_type == "image/png"))
}

/// The observation the server returned, as the native env's flat Box value.
fn obs(j: &Json) -> Value {
    let a = j["observation"].as_array().expect("observation array");
    Value::Box(a.iter().map(|x| x.as_f64().unwrap() as f32).collect())
}

fn action_json(a: &Value) -> Json {
    match a {
        Value::Discrete(d) => json!(d),
        Value::Box(x) => json!(x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()),
        v => panic!("unexpected action {v:?}"),
    }
}

/// Runs one episode of `steps` heuristic actions through the server and the native env side by
/// side; returns the native return and steps.
async fn episode_matches(
    c: &Client,
    id: &str,
    config: &toml::Value,
    seed: u64,
    steps: usize,
) -> (f64, usize, bool) {
    let mut native = scopegym_envs::registry::make(id, Some(config)).unwrap();
    let (mut o, _) = native.reset(Some(seed)).unwrap();
    let r = call(c, "reset", json!({"include_observation": true})).await;
    let j = ok(&r, "reset");
    assert!(has_png(&r), "reset returns a PNG");
    assert_eq!(j["seed"], json!(seed), "{id}: the suite's episode seed");
    assert_eq!(obs(&j), o, "{id}: reset observation");
    let (mut ret, mut n, mut done) = (0.0, 0, false);
    for t in 0..steps {
        let a = native.heuristic_action(&o);
        let s = native.step(&a).unwrap();
        let r = call(
            c,
            "step",
            json!({"action": action_json(&a), "include_observation": true}),
        )
        .await;
        let j = ok(&r, "step");
        assert!(j.get("refused").is_none(), "{id} step {t}: {j}");
        assert_eq!(
            j["reward"].as_f64().unwrap(),
            s.reward,
            "{id} step {t}: reward"
        );
        assert_eq!(obs(&j), s.obs, "{id} step {t}: observation");
        assert_eq!(j["terminated"], json!(s.terminated), "{id} step {t}");
        assert_eq!(j["truncated"], json!(s.truncated), "{id} step {t}");
        ret += s.reward;
        n += 1;
        o = s.obs;
        if s.terminated || s.truncated {
            done = true;
            break;
        }
    }
    (ret, n, done)
}

#[tokio::test(flavor = "current_thread")]
async fn mcp_episodes_equal_the_native_env_and_bad_calls_are_tool_errors() {
    let dir = tempfile::tempdir().unwrap();
    let env_cfg = dir.path().join("short.toml");
    std::fs::write(&env_cfg, "max_steps = 4\n").unwrap();
    let cases = [
        ("scopegym/SpmTipConditioning-v2", 3_u64, false),
        ("scopegym/StemAutofocus-v2", 5, true),
    ];
    for (id, run_seed, short) in cases {
        let rec = dir.path().join(id.rsplit('/').next().unwrap());
        let extra: Vec<&str> = if short {
            vec!["--env-config", env_cfg.to_str().unwrap()]
        } else {
            Vec::new()
        };
        let c = serve(id, run_seed, &rec, &extra).await;

        let names: Vec<String> = c
            .list_all_tools()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        for want in [
            "list_tasks",
            "reset",
            "step",
            "episode_score",
            "instrument_status",
            "acquire_frame",
            "move_probe",
            "point_spectroscopy",
            "make_safe",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{id}: no {want} in {names:?}"
            );
        }

        let config = if short {
            suite_config(id, &[("max_steps", toml::Value::Integer(4))])
        } else {
            suite_config(id, &[])
        };
        // Episode 0: 5 scripted steps (4 and truncation for the short config).
        let (ret0, n0, done0) =
            episode_matches(&c, id, &config, episode_seed(run_seed, 0), 5).await;
        // The short config (max_steps = 4) ends the episode by step 4 at the latest.
        assert!(
            if short { done0 && n0 <= 4 } else { n0 == 5 },
            "{id}: {n0} steps"
        );
        let score = ok(&call(&c, "episode_score", json!({})).await, "score");
        assert_eq!(score["return"].as_f64().unwrap(), ret0, "{id}: score");
        assert_eq!(score["steps"], json!(n0));

        // Malformed and out-of-limit calls: tool errors naming the field.
        if !short {
            let bad_nan = call(&c, "step", json!({"action": f64::NAN})).await;
            let e = error_text(&bad_nan, "NaN action");
            assert!(e.contains("action"), "{e}");
            let e = error_text(
                &call(&c, "step", json!({"action": [1, 2]})).await,
                "wrong-shape action",
            );
            assert!(e.contains("action") && e.contains("integer"), "{e}");
        } else {
            let e = error_text(
                &call(&c, "step", json!({"action": [0.1, null, 0.0]})).await,
                "NaN action",
            );
            assert!(e.contains("action[1]") && e.contains("finite"), "{e}");
            let e = error_text(
                &call(&c, "step", json!({"action": [0.1, 0.2]})).await,
                "wrong-shape action",
            );
            assert!(e.contains("action") && e.contains("shape"), "{e}");
        }
        let e = error_text(
            &call(&c, "reset", json!({"task": "scopegym/NoSuchTask-v1"})).await,
            "unknown task",
        );
        assert!(e.contains("task") && e.contains("NoSuchTask"), "{e}");
        let e = error_text(
            &call(&c, "move_probe", json!({"x_m": 1.0, "y_m": 0.0})).await,
            "out-of-limit move",
        );
        // SPM: the guard's scanner range; STEM: the simulator's deflection range.
        assert!(
            e.contains("limit `spm.scanner_range") || e.contains("position"),
            "{e}"
        );
        let (tool, args, limit) = if short {
            (
                "set_defocus",
                json!({"defocus_m": 1.0}),
                "stem.aberration_step_max.c10",
            )
        } else {
            ("set_bias", json!({"bias_v": 100.0}), "spm.bias_window")
        };
        let e = error_text(&call(&c, tool, args).await, "out-of-limit command");
        assert!(e.contains(limit), "{e}");
        let e = error_text(
            &call(&c, "move_probe", json!({"x_m": 0.0})).await,
            "missing y_m",
        );
        assert!(e.contains("y_m"), "{e}");
        let e = error_text(&call(&c, "no_such_tool", json!({})).await, "unknown tool");
        assert!(e.contains("no_such_tool"), "{e}");

        // Still serving: a frame from the instrument, then episode 1 with the next suite seed.
        let r = call(&c, "acquire_frame", json!({})).await;
        let f = ok(&r, "acquire_frame");
        assert!(has_png(&r) && f["rows"].as_u64().unwrap() > 0, "{f}");
        ok(
            &call(&c, "instrument_status", json!({})).await,
            "instrument_status",
        );
        let (ret1, n1, _) = episode_matches(&c, id, &config, episode_seed(run_seed, 1), 2).await;
        // A new episode scores the one in progress.
        let j = ok(&call(&c, "reset", json!({"seed": 77})).await, "reset");
        assert_eq!(j["seed"], json!(77));

        // The record: every call, and both episodes scored in results.json.
        let calls = std::fs::read_to_string(rec.join("calls.jsonl")).unwrap();
        let lines: Vec<Json> = calls
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(lines.iter().any(|l| l["tool"] == "step" && l["ok"] == true));
        assert!(
            lines
                .iter()
                .any(|l| l["tool"] == "move_probe" && l["ok"] == false)
        );
        let res: RunResults =
            serde_json::from_str(&std::fs::read_to_string(rec.join("results.json")).unwrap())
                .unwrap();
        assert_eq!(res.agent, "llm");
        assert_eq!(res.env_id, id);
        let eps = &res.per_seed[0].episodes;
        assert_eq!(eps.len(), 2, "{id}: both episodes scored");
        assert_eq!((eps[0].ret, eps[0].steps), (ret0, n0));
        assert_eq!((eps[1].ret, eps[1].steps), (ret1, n1));
        assert_eq!(eps[1].seed, episode_seed(run_seed, 1));
        assert!(rec.join("audit.jsonl").exists(), "the guard's audit log");
        c.cancel().await.unwrap();
    }
}

/// The instrument tools of an SPM task run the task's own model at the task's fidelity: at
/// `fidelity = "fast"` a PFM task's frames come without the topography channels (the task's
/// fast model), and equal those of the task's simulator for the same seed.
#[tokio::test(flavor = "current_thread")]
async fn instrument_tools_run_the_tasks_model_at_its_fidelity() {
    use scopegym_envs::tasks::{config_from_toml, pfm_domain_writing as pdw};
    use scopegym_physics::instrument::SpmInstrument;
    let dir = tempfile::tempdir().unwrap();
    let fast = dir.path().join("fast.toml");
    std::fs::write(&fast, "fidelity = \"fast\"\n").unwrap();
    let id = "scopegym/PfmDomainWriting-v1";
    let c = serve(
        id,
        9,
        &dir.path().join("rec"),
        &["--env-config", fast.to_str().unwrap()],
    )
    .await;
    let f = ok(&call(&c, "acquire_frame", json!({})).await, "acquire_frame");
    c.cancel().await.unwrap();

    let table = suite_config(id, &[("fidelity", toml::Value::String("fast".into()))]);
    let cfg: pdw::Config = config_from_toml(Some(&table)).unwrap();
    let mut sim = pdw::simulator(&cfg, 9).unwrap();
    let frame = sim.acquire_frame().unwrap();
    let names: Vec<&str> = frame.channels.iter().map(|c| c.name.as_str()).collect();
    assert!(!names.iter().any(|n| n.contains("topo")), "{names:?}");
    assert_eq!(f["channels"], json!(names), "{f}");
    let img = &frame.main().image;
    let mean = img.iter().map(|&v| f64::from(v)).sum::<f64>() / img.len() as f64;
    assert_eq!(f["rows"], json!(img.nrows()));
    let served = f["mean"].as_f64().unwrap();
    assert!(
        (served - mean).abs() <= 1e-9 * mean.abs().max(1e-300),
        "{served} != {mean}"
    );
}

#[path = "../drivers/tests/support/stem_server.rs"]
mod stem_server;

/// Limits wide enough for the instrument tools' calls below.
const WIDE_SPM: &str = "[spm]\nbias_window = [\"-10 V\", \"10 V\"]\npulse_bias_max = \"9 V\"\n\
                        pulse_width_max = \"100 ms\"\nscanner_range = [\"10 µm\", \"10 µm\"]\n";

#[tokio::test(flavor = "current_thread")]
async fn instrument_tools_drive_a_nanonis_controller_through_the_guard() {
    use scopegym_drivers::nanonis::FakeNanonis;
    use scopegym_envs::tasks::TaskConfig;
    use scopegym_envs::tasks::pfm_domain_writing::Config;
    use scopegym_physics::instrument::SpmInstrument;

    let id = "scopegym/PfmDomainWriting-v1";
    let cfg = Config::at_level(Default::default());
    let server = FakeNanonis::from_config(cfg.instrument.clone(), cfg.split.region()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let limits = dir.path().join("limits.toml");
    std::fs::write(&limits, WIDE_SPM).unwrap();
    let rec = dir.path().join("rec");
    let url = server.url();
    let c = serve(
        id,
        0,
        &rec,
        &["--driver", &url, "--limits", limits.to_str().unwrap()],
    )
    .await;

    // The tools reach the controller, not a simulator of the CLI's own.
    let s = ok(&call(&c, "instrument_status", json!({})).await, "status");
    assert_eq!(s["simulated"], json!(false), "{s}");
    assert!(s["instrument"].as_str().unwrap().contains("Nanonis"), "{s}");
    assert_eq!(
        server.connections(),
        2,
        "the task's connection and the tools' own"
    );

    let b = ok(
        &call(&c, "set_bias", json!({"bias_v": 2.5})).await,
        "set_bias",
    );
    assert_eq!(b["bias_v"].as_f64().unwrap(), 2.5);
    assert_eq!(server.with_sim(|s| s.bias()), 2.5, "the controller's bias");
    // Out of the limits: refused by the guard, never sent.
    let e = error_text(
        &call(&c, "set_bias", json!({"bias_v": 50.0})).await,
        "bias beyond the window",
    );
    assert!(e.contains("spm.bias_window"), "{e}");
    assert_eq!(server.with_sim(|s| s.bias()), 2.5, "the refused bias");
    let e = error_text(
        &call(&c, "move_probe", json!({"x_m": 1e-3, "y_m": 0.0})).await,
        "move beyond the scanner",
    );
    assert!(e.contains("spm.scan_area_fraction"), "{e}");

    // A frame over TCP, the size the controller scans.
    let r = call(&c, "acquire_frame", json!({"rows": 16, "cols": 16})).await;
    let f = ok(&r, "acquire_frame");
    assert!(has_png(&r), "{f}");
    assert_eq!(
        (f["rows"].as_u64(), f["cols"].as_u64()),
        (Some(16), Some(16))
    );
    assert_eq!(server.with_sim(|s| s.scan_settings().rows), 16);

    // make_safe withdraws the controller's tip.
    assert!(!server.with_sim(|s| s.is_withdrawn()));
    ok(&call(&c, "make_safe", json!({})).await, "make_safe");
    assert!(
        server.with_sim(|s| s.is_withdrawn()),
        "withdrawn by make_safe"
    );

    // Every command of the tools is in the guard's audit log, the refusals too.
    let audit = std::fs::read_to_string(rec.join("audit.jsonl")).unwrap();
    assert!(audit.contains("set_bias"), "{audit}");
    assert!(audit.contains("spm.bias_window"), "the refusal is audited");
    c.cancel().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn instrument_tools_drive_a_stem_gateway_through_the_guard() {
    use scopegym_envs::tasks::TaskConfig;
    use scopegym_envs::tasks::stem_autofocus::Config;
    use scopegym_physics::stem::lattice::LatticeSimulator;

    let id = "scopegym/StemAutofocus-v2";
    let cfg = Config::at_level(Default::default());
    let server = stem_server::serve(LatticeSimulator::new(cfg.instrument.clone(), 0).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let limits = dir.path().join("limits.toml");
    std::fs::write(
        &limits,
        "[stem]\ndose_budget = \"1e30 e/Å^2\"\nmax_frame_time = \"1000 s\"\n",
    )
    .unwrap();
    let rec = dir.path().join("rec");
    let url = format!("stem-gateway://{}", server.address());
    let c = serve(
        id,
        0,
        &rec,
        &["--driver", &url, "--limits", limits.to_str().unwrap()],
    )
    .await;
    let methods = || server.shared.log.lock().unwrap().methods.clone();

    let s = ok(&call(&c, "instrument_status", json!({})).await, "status");
    let c10 = s["defocus_c10_m"].as_f64().unwrap();
    assert_eq!(
        server.shared.connections(),
        2,
        "the task's and the tools' own"
    );

    // A small defocus step reaches the gateway; a large one is refused before it.
    let d = ok(
        &call(&c, "set_defocus", json!({"defocus_m": c10 + 5e-9})).await,
        "set_defocus",
    );
    assert!((d["defocus_c10_m"].as_f64().unwrap() - (c10 + 5e-9)).abs() < 1e-12);
    let sent = methods().iter().filter(|m| *m == "set_aberrations").count();
    assert_eq!(sent, 1, "{:?}", methods());
    let e = error_text(
        &call(&c, "set_defocus", json!({"defocus_m": 1.0})).await,
        "defocus step beyond the limit",
    );
    assert!(e.contains("stem.aberration_step_max.c10"), "{e}");
    let after = methods().iter().filter(|m| *m == "set_aberrations").count();
    assert_eq!(after, 1, "the refused step never reached the gateway");

    let r = call(&c, "acquire_frame", json!({})).await;
    let f = ok(&r, "acquire_frame");
    assert!(has_png(&r) && f["rows"].as_u64().unwrap() > 0, "{f}");
    assert!(methods().iter().any(|m| m == "acquire_frame"));
    let before = server.shared.make_safe_count();
    ok(&call(&c, "make_safe", json!({})).await, "make_safe");
    assert_eq!(server.shared.make_safe_count(), before + 1);
    c.cancel().await.unwrap();
}

/// Runs `scopegym` with `args` (stdin closed) and returns its exit code and stderr.
fn cli(args: &[&str]) -> (Option<i32>, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_scopegym"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn read_json(path: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The mean of the per-seed scores of `agent` on the only task of a suite.json.
fn suite_mean(s: &Json, agent: &str) -> f64 {
    let a = s["tasks"][0]["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == agent)
        .unwrap_or_else(|| panic!("no {agent} in the suite"));
    let ps = a["results"]["per_seed"].as_array().unwrap();
    ps.iter()
        .map(|x| x["return_mean"].as_f64().unwrap())
        .sum::<f64>()
        / ps.len() as f64
}

/// A tiny suite (StemAutofocus, the small budget's run seed 0 and its 4 episodes) gives the
/// references; `scopegym mcp --reference` normalizes each episode with them, and the recorded
/// results.json of a scripted session on the suite's seeds goes into the suite's table as an
/// `llm` row with the same normalization.
#[tokio::test(flavor = "current_thread")]
async fn mcp_scores_normalize_with_the_suite_and_the_record_joins_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let id = "scopegym/StemAutofocus-v2";
    let out = dir.path().join("suite");
    let o = out.to_str().unwrap();
    let base = [
        "suite",
        "--budget",
        "small",
        "--tasks",
        "StemAutofocus",
        "--seeds",
        "1",
        "--agents",
        "heuristic",
        "--out",
        o,
    ];
    let (code, _, err) = cli(&base);
    assert_eq!(code, Some(0), "{err}");
    let suite_json = out.join("suite.json");
    let s = read_json(&suite_json);
    let (lo, hi) = (suite_mean(&s, "random"), suite_mean(&s, "heuristic"));
    println!("references of {id}: random {lo}, heuristic {hi}");
    assert!(hi > lo, "the heuristic beats random");

    // A session on the suite's scenarios, its 4 episodes played by the heuristic. The default
    // limits' dose budget (1e5 e/Å² per nm² cell) refuses the heuristic's 6th frame, which ends
    // the episode: a budget the suite's agents do not have, so it is raised here.
    let rec = dir.path().join("llm");
    let limits = dir.path().join("limits.toml");
    std::fs::write(&limits, "[stem]\ndose_budget = \"1e12 e/Å^2\"\n").unwrap();
    let c = serve(
        id,
        0,
        &rec,
        &[
            "--budget",
            "small",
            "--limits",
            limits.to_str().unwrap(),
            "--reference",
            suite_json.to_str().unwrap(),
        ],
    )
    .await;
    let config = suite_config(id, &[]);
    let mut rets = Vec::new();
    for i in 0..4 {
        let (ret, n, done) = episode_matches(&c, id, &config, episode_seed(0, i), 1000).await;
        assert!(done, "episode {i} ended ({n} steps)");
        let sc = ok(&call(&c, "episode_score", json!({})).await, "score");
        let want = (ret - lo) / (hi - lo);
        let got = sc["normalized_score"].as_f64().unwrap();
        println!("episode {i}: return {ret}, {n} steps, normalized {got} (want {want})");
        assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "{sc}");
        assert_eq!(sc["normalization"]["random"].as_f64().unwrap(), lo);
        assert_eq!(sc["normalization"]["heuristic"].as_f64().unwrap(), hi);
        rets.push(ret);
    }
    c.cancel().await.unwrap();

    // The record joins the suite: an `llm` row normalized with the same references. The
    // session played the heuristic's actions, so its score is the heuristic's: exactly 1.
    let mut args = base.to_vec();
    let results = rec.join("results.json");
    args.extend(["--add-results", results.to_str().unwrap()]);
    let (code, table, err) = cli(&args);
    assert_eq!(code, Some(0), "{err}");
    println!("{table}");
    let s = read_json(&suite_json);
    let mean = rets.iter().sum::<f64>() / rets.len() as f64;
    let llm = s["tasks"][0]["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == "llm")
        .expect("an llm row");
    let norm = llm["normalized"][0].as_f64().unwrap();
    let want = (mean - lo) / (hi - lo);
    println!("llm: mean return {mean}, normalized {norm} (want {want})");
    assert!((norm - want).abs() <= 1e-12, "{norm} vs {want}");
    assert!((norm - 1.0).abs() <= 1e-12, "{norm}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("llm ") && l.contains("1/1")),
        "{table}"
    );
    // The record says the episodes ran through the guard, with its limits (1e12 e/Å² is
    // 1e32 e/m²) and no refused step; the suite names that beside the row.
    let guard = &read_json(&results)["provenance"]["agent_config"]["guard"];
    assert_eq!(guard["driver"], json!("sim"), "{guard}");
    let budget = guard["limits"]["stem"]["dose_budget"].as_f64().unwrap();
    assert!((budget / 1e32 - 1.0).abs() < 1e-9, "{guard}");
    assert_eq!(guard["refused_steps"], json!(0), "{guard}");
    let notes = &s["external"][0]["notes"];
    assert_eq!(notes.as_array().map(Vec::len), Some(1), "{notes}");
    let note = notes[0].as_str().unwrap();
    assert!(
        note.contains("safety guard on sim") && note.contains("0 refused step"),
        "{note}"
    );
    assert!(table.contains(note), "{table}");

    // A suite.json without the task: --reference is refused before serving.
    let mut other = s.clone();
    other["tasks"][0]["id"] = json!("scopegym/StemSparseScan-v2");
    let bad = dir.path().join("other.json");
    std::fs::write(&bad, other.to_string()).unwrap();
    let (code, _, err) = cli(&["mcp", "--task", id, "--reference", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--reference") && err.contains("has no results for") && err.contains(id),
        "{err}"
    );
}
