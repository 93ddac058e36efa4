//! `scopegym serve` as a child process on port 0: the HTTP API (state, pause/resume, veto,
//! controls, off-limits), clear 4xx errors for bad controls (the server stays up), the veto
//! and region honoured, the intervention record, and replay equality.

use serde_json::{Value as Json, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TASK: &str = "scopegym/StemEelsExplore-v2";
const BUDGET: usize = 14;

/// Kills the server if a test fails before it exits.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(out: &Path, extra: &[&str]) -> (Server, String) {
    let cfg = out.with_extension("toml");
    std::fs::write(&cfg, format!("budget = {BUDGET}\n")).unwrap();
    // The example limits' dose budget (1e4 e/Å² per nm²) refuses a spectrum within a few
    // steps and ends the episode: this test is about the dashboard, not the guard.
    let limits = out.with_extension("limits.toml");
    std::fs::write(&limits, "[stem]\ndose_budget = \"1e9 e/Å^2\"\n").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scopegym"));
    cmd.args(["serve", TASK, "--agent", "bo", "--port", "0", "--seed", "3"])
        .arg("--out")
        .arg(out)
        .arg("--env-config")
        .arg(&cfg)
        .arg("--limits")
        .arg(&limits)
        .args(["--exit"])
        .args(extra);
    spawn(cmd)
}

/// Starts the server and reads its address from the first line of its stdout.
fn spawn(mut cmd: Command) -> (Server, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("http://")
        .and_then(|s| s.strip_suffix('/'))
        .unwrap_or_else(|| panic!("no URL on stdout: {line:?}"))
        .to_owned();
    (Server(child), addr)
}

/// One HTTP/1.1 request; the status and the body.
fn http(addr: &str, method: &str, path: &str, body: Option<Json>) -> (u16, Json) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(rest).unwrap_or(Json::Null))
}

/// Waits for the server to exit after its run (it was started with --exit).
fn finish(mut s: Server) {
    let t0 = Instant::now();
    loop {
        if let Some(st) = s.0.try_wait().unwrap() {
            assert!(st.success(), "serve exited with {st}");
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "serve did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lines(p: &Path) -> Vec<Json> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn actions(out: &Path) -> Vec<i64> {
    lines(&out.join("steps.jsonl"))
        .iter()
        .map(|l| l["action"].as_i64().unwrap())
        .collect()
}

fn results(out: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap()
}

#[test]
fn api_interventions_are_honoured_recorded_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let (server, addr) = start(&live, &["--start-paused"]);

    // The page and its script are served; the state shows the paused proposal and the frame.
    let (code, _) = http(&addr, "GET", "/", None);
    assert_eq!(code, 200);
    // The worker resets and proposes the first cell, then waits (started paused).
    let t0 = Instant::now();
    let s = loop {
        let (code, s) = http(&addr, "GET", "/api/state", None);
        assert_eq!(code, 200);
        if !s["proposed"].is_null() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no proposal: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s["paused"], true);
    assert_eq!(s["step"], 0);
    let keys: Vec<&str> = s["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["overview", "measured_value", "measured_count"]);
    assert!(
        s["frames"][0]["png"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,")
    );
    let first = s["proposed"].as_i64().expect("a proposed cell");
    assert_eq!(s["insight"]["maps"]["rows"], 32);
    assert_eq!(s["insight"]["controls"]["acquisition"], "logei");

    // Veto: the agent proposes another cell.
    let (code, v) = http(&addr, "POST", "/api/veto", None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["intervention"]["value"]["action"], first);
    let (_, s) = http(&addr, "GET", "/api/state", None);
    let second = s["proposed"].as_i64().unwrap();
    assert_ne!(second, first);

    // Bad controls: 400 naming the field; the server stays up and the run is unchanged.
    for (body, field) in [
        (json!({"name": "beta", "value": "high"}), "beta"),
        (json!({"name": "beta", "value": -2.0}), "beta"),
        (json!({"name": "gamma", "value": 1.0}), "gamma"),
        (json!({"value": 1.0}), "name"),
    ] {
        let (code, e) = http(&addr, "POST", "/api/control", Some(body));
        assert_eq!(code, 400, "{e}");
        assert!(e["error"].as_str().unwrap().contains(field), "{e}");
    }
    let (code, e) = http(
        &addr,
        "POST",
        "/api/off_limits",
        Some(json!({"rows": [5, 99], "cols": [0, 1]})),
    );
    assert_eq!(code, 400);
    assert!(
        e["error"].as_str().unwrap().contains("off_limits.rows"),
        "{e}"
    );
    let (code, s) = http(&addr, "GET", "/api/state", None);
    assert_eq!(code, 200);
    assert_eq!(s["proposed"], second);
    assert!(s["interventions"].as_array().unwrap().len() == 1);

    // β and an off-limits band of rows 0..=3, then resume.
    let (code, v) = http(
        &addr,
        "POST",
        "/api/control",
        Some(json!({"name": "beta", "value": 2.5})),
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = http(
        &addr,
        "POST",
        "/api/off_limits",
        Some(json!({"rows": [0, 3], "cols": [0, 31]})),
    );
    assert_eq!(code, 200, "{v}");
    let (_, s) = http(&addr, "GET", "/api/state", None);
    assert_eq!(s["insight"]["controls"]["acquisition"], "ucb");
    assert_eq!(s["insight"]["controls"]["beta"], 2.5);
    assert_eq!(s["step"], 0, "paused: no step taken");
    let proposed_at_resume = s["proposed"].as_i64().unwrap();
    let (code, _) = http(&addr, "POST", "/api/resume", None);
    assert_eq!(code, 200);
    finish(server);

    // The record: four interventions at step 0, with their values, in both files.
    let rec = lines(&live.join("interventions.jsonl"));
    let kinds: Vec<&str> = rec.iter().map(|i| i["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["veto", "set_control", "off_limits", "resume"]);
    assert!(
        rec.iter()
            .all(|i| i["step"] == 0 && i["t"].as_f64().unwrap() > 1.0e9)
    );
    assert_eq!(rec[0]["value"]["action"], first);
    assert_eq!(rec[1]["value"], json!({"name": "beta", "value": 2.5}));
    assert_eq!(rec[2]["value"], json!({"rows": [0, 3], "cols": [0, 31]}));
    let r = results(&live);
    assert_eq!(r["interventions"], Json::Array(rec.clone()));
    assert_eq!(
        r["provenance"]["agent_config"]["interventions"],
        Json::Array(rec)
    );
    assert_eq!(
        r["provenance"]["agent_config"]["config"]["acquisition"]["ucb"]["beta"],
        2.5
    );
    let ep = &r["per_seed"][0]["episodes"][0];
    assert_eq!(ep["steps"], BUDGET);

    // Honoured: the vetoed cell and the rows 0..=3 are never measured.
    let taken = actions(&live);
    assert_eq!(taken.len(), BUDGET);
    assert_eq!(taken[0], proposed_at_resume);
    for &k in &taken {
        assert_ne!(k, first, "the vetoed cell was measured");
        assert!(k >= 4 * 32, "cell {k} lies in the off-limits rows 0..=3");
    }

    // Replay: the same interventions at the same steps give the same run, bit for bit.
    let again = dir.path().join("replay");
    let (server, _) = start(
        &again,
        &[
            "--replay",
            live.join("interventions.jsonl").to_str().unwrap(),
        ],
    );
    finish(server);
    assert_eq!(actions(&again), taken);
    let r2 = results(&again);
    assert_eq!(r2["per_seed"][0]["episodes"], r["per_seed"][0]["episodes"]);
    let replayed = lines(&again.join("interventions.jsonl"));
    assert_eq!(
        replayed.len(),
        3,
        "vetoes, regions and controls; not the resume"
    );
    assert!(replayed.iter().all(|i| i["replayed"] == true));

    // Without the interventions the agent measures the vetoed cell first (the test can fail).
    let plain = dir.path().join("plain");
    let (server, _) = start(&plain, &[]);
    finish(server);
    assert_eq!(actions(&plain)[0], first);
}

#[test]
fn bad_replay_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"kind\": \"veto\"}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_scopegym"))
        .args([
            "serve", TASK, "--agent", "bo", "--port", "0", "--exit", "--replay",
        ])
        .arg(&bad)
        .arg("--out")
        .arg(dir.path().join("o"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--replay") && err.contains("bad.jsonl:1"),
        "{err}"
    );
}

/// Polls the state until the run is done (a server without `--exit` keeps serving it).
#[cfg(feature = "torch")]
fn wait_done(addr: &str) -> Json {
    let t0 = Instant::now();
    loop {
        let (code, s) = http(addr, "GET", "/api/state", None);
        assert_eq!(code, 200);
        if s["done"] == true {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "the run did not finish: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent's feature space on the page's state: a DKL run shows its maps and the embedding
/// scatter of the measured points; a PPO run (a checkpoint of one short training iteration on
/// PfmDomainWriting, Box actions) the Gaussian's mean and sd per action component and the
/// critic's value at every step, equal to the checkpoint's own critic on the first observation.
#[cfg(feature = "torch")]
#[test]
fn dkl_and_ppo_runs_show_their_feature_space() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);

    // DKL on StemEelsExplore: 8 measurements, the model from the 3rd.
    let budget = 8;
    std::fs::write(p("eels.toml"), format!("budget = {budget}\n")).unwrap();
    std::fs::write(p("stem.toml"), "[stem]\ndose_budget = \"1e9 e/Å^2\"\n").unwrap();
    std::fs::write(
        p("dkl.toml"),
        "n_initial = 3\nhidden = 16\nepochs_initial = 30\nepochs_step = 5\n",
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scopegym"));
    cmd.args([
        "serve", TASK, "--agent", "dkl", "--port", "0", "--seed", "2",
    ])
    .arg("--out")
    .arg(p("dkl"))
    .arg("--env-config")
    .arg(p("eels.toml"))
    .arg("--config")
    .arg(p("dkl.toml"))
    .arg("--limits")
    .arg(p("stem.toml"));
    let (server, addr) = spawn(cmd);
    let s = wait_done(&addr);
    drop(server);
    assert!(s["error"].is_null(), "{}", s["error"]);
    assert_eq!(s["curve"].as_array().unwrap().len(), budget);
    let ins = &s["insight"];
    // The last proposal was made with budget − 1 cells measured: one row each.
    let scatter = ins["scatter"].as_array().unwrap();
    assert_eq!(scatter.len(), budget - 1, "{ins}");
    for row in scatter {
        let r = row.as_array().unwrap();
        assert_eq!(r.len(), 3);
        assert!(
            r.iter().all(|v| v.as_f64().is_some_and(f64::is_finite)),
            "{row}"
        );
    }
    assert_eq!(ins["scatter_axes"], json!(["z0", "z1"]));
    let maps = &ins["maps"];
    assert_eq!(maps["rows"], 32);
    let count = |k: &str| {
        maps[k]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v.is_number())
            .count()
    };
    assert_eq!(count("mean"), 32 * 32);
    assert_eq!(count("sd"), 32 * 32);
    assert_eq!(count("acquisition"), 32 * 32 - (budget - 1));
    assert!(ins["point"].is_array());
    assert!(ins["value"].is_null() && ins["action_probs"] == json!([]));

    // PPO: one training iteration (2 envs × 16 steps), then served from its checkpoint.
    let task = "scopegym/PfmDomainWriting-v1";
    std::fs::write(
        p("ppo.toml"),
        "num_envs = 2\nnum_steps = 16\nnum_minibatches = 2\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_scopegym"))
        .args([
            "run", task, "--agent", "ppo", "--steps", "32", "--seeds", "1",
        ])
        .args(["--episodes", "1", "--config"])
        .arg(p("ppo.toml"))
        .arg("--out")
        .arg(p("train"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let ck = p("train/checkpoints/seed0/ppo.safetensors");
    // Pulses within the limits' 9 V; a short episode.
    std::fs::write(p("pfm.toml"), "max_steps = 5\nbias_range = [-8.0, 8.0]\n").unwrap();
    std::fs::write(
        p("wide.toml"),
        "[spm]\nbias_window = [\"-10 V\", \"10 V\"]\npulse_bias_max = \"9 V\"\n\
         pulse_width_max = \"100 ms\"\nscanner_range = [\"10 µm\", \"10 µm\"]\n",
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scopegym"));
    cmd.args([
        "serve", task, "--agent", "ppo", "--port", "0", "--seed", "4",
    ])
    .arg("--checkpoint")
    .arg(&ck)
    .arg("--out")
    .arg(p("ppo"))
    .arg("--env-config")
    .arg(p("pfm.toml"))
    .arg("--limits")
    .arg(p("wide.toml"));
    let (server, addr) = spawn(cmd);
    let s = wait_done(&addr);
    drop(server);
    assert!(s["error"].is_null(), "{}", s["error"]);
    let curve = s["curve"].as_array().unwrap();
    assert!(!curve.is_empty());
    let values: Vec<f64> = curve.iter().map(|c| c["value"].as_f64().unwrap()).collect();
    assert!(values.iter().all(|v| v.is_finite()), "{values:?}");
    let ins = &s["insight"];
    let dims = |k: &str| ins[k].as_array().unwrap().len();
    assert!(dims("action_mean") >= 1);
    assert_eq!(dims("action_sd"), dims("action_mean"));
    assert_eq!(dims("action_bounds"), dims("action_mean"));
    assert!(
        ins["action_sd"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_f64().unwrap() > 0.0)
    );
    assert!(ins["value"].as_f64().unwrap().is_finite());
    assert_eq!(ins["action_probs"], json!([]));
    assert_eq!(ins["scatter"], json!([]));
    // The first step's value is the checkpoint's critic on the first observation.
    let cfg: toml::Value = toml::from_str(
        "max_steps = 5\nbias_range = [-8.0, 8.0]\ndifficulty = \"medium\"\nsplit = \"test\"\n",
    )
    .unwrap();
    let mut env = scopegym_envs::registry::make(task, Some(&cfg)).unwrap();
    let mut agent = scopegym_agents::registry::load("ppo", &ck, env.as_ref()).unwrap();
    let seed = 4 * 1_000_000;
    let (obs, _) = env.reset(Some(seed)).unwrap();
    agent.begin_episode(env.as_ref(), &obs, seed).unwrap();
    agent.act(env.as_mut(), &obs).unwrap();
    let v0 = agent.insight().unwrap().value.unwrap();
    assert!(
        (v0 - values[0]).abs() <= 1e-9 * v0.abs().max(1.0),
        "{v0} vs {}",
        values[0]
    );
}
