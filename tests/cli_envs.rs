//! `scopegym list`, `bench`, `render` and `record` end to end; the recorded dataset reads back
//! into what the environment produced, and survives the process being killed.

use scopegym::envs::registry::{TASKS, make};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const ID: &str = "scopegym/AfmFeedbackTuning-v2";

mod common;
use common::{ok, run};

#[test]
fn a_closed_stdout_ends_quietly() {
    // `scopegym list | head -1`: the reader closes the pipe before the program writes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_scopegym"))
        .args(["list", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.status.success() || out.status.code() == Some(141),
        "{:?}: {err}",
        out.status
    );
}

#[test]
fn list_names_every_task_with_its_spaces() {
    let text = ok(&run(&["list"]));
    let json: serde_json::Value = serde_json::from_str(&ok(&run(&["list", "--json"]))).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), TASKS.len());
    for (row, t) in rows.iter().zip(TASKS) {
        assert_eq!(row["id"], t.id);
        assert!(text.contains(t.id));
        assert!(row["observation_space"]["type"].is_string());
        assert!(row["action_space"]["type"].is_string());
        assert!(row["max_episode_steps"].as_u64().unwrap() > 0);
    }
}

#[test]
fn floors_score_random_and_heuristic_on_the_test_split() {
    let steer = "scopegym/StemDopantSteer-v1";
    let out = ok(&run(&["floors", steer, "--seeds", "6", "--json"]));
    let rows: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let row = &rows.as_array().unwrap()[0];
    assert_eq!(row["id"], steer);
    assert_eq!(
        (row["split"].as_str(), row["seeds"].as_u64()),
        (Some("test"), Some(6))
    );
    for p in ["random", "heuristic"] {
        let s = &row[p];
        assert_eq!(s["episodes"].as_u64(), Some(6));
        assert_eq!(s["returns"].as_array().map(Vec::len), Some(6));
        let rate = s["success_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&rate), "{p}: {rate}");
    }
    // The same numbers as scoring in-process with the same config and seeds.
    let cfg: toml::Value = toml::from_str("split = \"test\"").unwrap();
    let mut env = make(steer, Some(&cfg)).unwrap();
    let h = scopegym::envs::evaluate::evaluate(
        env.as_mut(),
        &scopegym::envs::evaluate::Policy::Heuristic,
        0..6,
    )
    .unwrap();
    assert_eq!(
        row["heuristic"]["mean_return"].as_f64(),
        Some(h.mean_return)
    );
    let text = ok(&run(&["floors", steer, "--seeds", "2"]));
    assert!(text.contains(steer) && text.contains("heuristic"), "{text}");
    let bad = run(&["floors", steer, "--split", "validation"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("split"));
}

#[test]
fn bench_prints_the_documented_json() {
    // One fidelity asked for: one JSON object (every task has the knob now).
    let plain = "scopegym/StemEelsExplore-v2";
    let out = ok(&run(&[
        "bench",
        plain,
        "--fidelity",
        "full",
        "--num-envs",
        "3",
        "--threads",
        "2",
        "--steps",
        "4",
        "--json",
    ]));
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["env_id"], plain);
    assert_eq!(
        (
            j["num_envs"].as_u64(),
            j["threads"].as_u64(),
            j["steps"].as_u64()
        ),
        (Some(3), Some(2), Some(4))
    );
    let (s, sps) = (
        j["seconds"].as_f64().unwrap(),
        j["steps_per_second"].as_f64().unwrap(),
    );
    assert!(s > 0.0 && (sps - 12.0 / s).abs() < 1e-6 * sps);
    // At most one ended episode per env and step.
    assert!(j["episodes"].as_u64().is_some_and(|e| e <= 12), "{j}");
    assert_eq!(j["fidelity"], "full");
    // A task with the fidelity knob is timed at both, a JSON line each.
    let af = "scopegym/StemAutofocus-v2";
    let af_bench = |extra: &[&str]| {
        let args = [
            &["bench", af, "--num-envs", "2", "--steps", "2", "--json"],
            extra,
        ]
        .concat();
        ok(&run(&args))
    };
    let out = af_bench(&[]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<_> = lines
        .iter()
        .map(|j| j["fidelity"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fast", "full"]);
    let one = af_bench(&["--fidelity", "full"]);
    assert_eq!(one.lines().count(), 1);
    // An env config: its fidelity is timed alone, `--fidelity` overrides it, and its other
    // settings reach the task (a bad value fails with the task's error).
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("env.toml");
    std::fs::write(&cfg, "fidelity = \"full\"\nmax_steps = 3\n").unwrap();
    let cfg_arg = cfg.to_str().unwrap();
    let fid = |out: &str| -> Vec<String> {
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["fidelity"].to_string())
            .collect()
    };
    assert_eq!(fid(&af_bench(&["--env-config", cfg_arg])), ["\"full\""]);
    assert_eq!(
        fid(&af_bench(&["--env-config", cfg_arg, "--fidelity", "fast"])),
        ["\"fast\""]
    );
    std::fs::write(&cfg, "max_steps = 0\n").unwrap();
    let bad_cfg = run(&["bench", af, "--env-config", cfg_arg]);
    assert_eq!(bad_cfg.status.code(), Some(2), "{bad_cfg:?}");
    assert!(String::from_utf8_lossy(&bad_cfg.stderr).contains("max_steps"));
    std::fs::write(&cfg, "fidelity = 3\n").unwrap();
    let bad_fid = run(&["bench", af, "--env-config", cfg_arg]);
    assert_eq!(bad_fid.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_fid.stderr).contains("fidelity"));
    let bad_fidelity = run(&["bench", plain, "--fidelity", "medium"]);
    assert_eq!(bad_fidelity.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_fidelity.stderr).contains("fidelity"));
    let bad = run(&["bench", "scopegym/Nope-v1"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown task id"));
    assert_eq!(
        run(&["bench", ID, "--num-envs", "0"]).status.code(),
        Some(2)
    );
}

#[test]
fn render_writes_an_rgb_png() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("r.png");
    ok(&run(&[
        "render",
        ID,
        "--seed",
        "3",
        "--out",
        png.to_str().unwrap(),
    ]));
    let img = image::open(&png).unwrap();
    assert_eq!(img.color(), image::ColorType::Rgb8);
    assert!(img.width() > 0 && img.height() > 0);
}

fn read_f32(g: &hdf5::Group, name: &str) -> Vec<f32> {
    g.dataset(name).unwrap().read_raw::<f32>().unwrap()
}

#[test]
fn recorded_dataset_reads_back_into_what_was_produced() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    ok(&run(&[
        "record",
        ID,
        "--agent",
        "heuristic",
        "--episodes",
        "2",
        "--seed",
        "40",
        "--out",
        out.to_str().unwrap(),
    ]));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("data/metadata.json")).unwrap())
            .unwrap();
    assert_eq!(meta["total_episodes"], 2);
    assert_eq!(meta["data_format"], "hdf5");
    assert_eq!(meta["env_id"], ID);
    assert!(
        meta["observation_space"]
            .as_str()
            .unwrap()
            .contains("\"Box\"")
    );
    let f = hdf5::File::open(out.join("data/main_data.hdf5")).unwrap();
    // Replay the same episodes in-process and compare.
    let mut env = make(ID, None).unwrap();
    let mut total = 0;
    for i in 0..2u64 {
        let g = f.group(&format!("episode_{i}")).unwrap();
        assert_eq!(
            g.attr("seed").unwrap().read_scalar::<i64>().unwrap(),
            40 + i as i64
        );
        let (mut obs, _) = env.reset(Some(40 + i)).unwrap();
        let mut want_obs: Vec<f32> = obs.as_box().unwrap().to_vec();
        let (mut want_act, mut want_rew) = (Vec::new(), Vec::new());
        let mut flags = Vec::new();
        loop {
            let a = env.heuristic_action(&obs);
            let s = env.step(&a).unwrap();
            want_act.extend_from_slice(a.as_box().unwrap());
            want_rew.push(s.reward);
            flags.push((s.terminated, s.truncated));
            want_obs.extend_from_slice(s.obs.as_box().unwrap());
            obs = s.obs;
            if s.terminated || s.truncated {
                break;
            }
        }
        let t = want_rew.len();
        total += t;
        assert_eq!(
            g.attr("total_steps").unwrap().read_scalar::<i64>().unwrap(),
            t as i64
        );
        assert_eq!(read_f32(&g, "observations"), want_obs);
        assert_eq!(read_f32(&g, "actions"), want_act);
        assert_eq!(
            g.dataset("rewards").unwrap().read_raw::<f64>().unwrap(),
            want_rew
        );
        let term = g
            .dataset("terminations")
            .unwrap()
            .read_raw::<bool>()
            .unwrap();
        let trunc = g
            .dataset("truncations")
            .unwrap()
            .read_raw::<bool>()
            .unwrap();
        assert_eq!(term.into_iter().zip(trunc).collect::<Vec<_>>(), flags);
        let obs_len = env.observation_space().flat_len();
        assert_eq!(
            g.dataset("observations").unwrap().shape(),
            vec![t + 1, obs_len]
        );
    }
    assert_eq!(meta["total_steps"], total);
    // Recording into an existing dataset is refused.
    let again = run(&[
        "record",
        ID,
        "--episodes",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(2));
}

#[test]
fn killed_recording_keeps_every_finished_episode() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let mut child = Command::new(env!("CARGO_BIN_EXE_scopegym"))
        .args([
            "record",
            ID,
            "--episodes",
            "100000",
            "--out",
            out.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let meta_path = out.join("data/metadata.json");
    let start = Instant::now();
    let episodes = |p: &Path| -> u64 {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|m| m["total_episodes"].as_u64())
            .unwrap_or(0)
    };
    while episodes(&meta_path) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "recording too slow"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let n = episodes(&meta_path);
    let f = hdf5::File::open(out.join("data/main_data.hdf5")).expect("still a valid HDF5 file");
    for i in 0..n {
        let g = f
            .group(&format!("episode_{i}"))
            .expect("every finished episode is there");
        let t = g.attr("total_steps").unwrap().read_scalar::<i64>().unwrap() as usize;
        assert_eq!(
            g.dataset("rewards")
                .unwrap()
                .read_raw::<f64>()
                .unwrap()
                .len(),
            t
        );
        assert_eq!(g.dataset("observations").unwrap().shape()[0], t + 1);
    }
}
