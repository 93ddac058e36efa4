//! A task on a driver URL, behind the guard: refusals end the episode with `info["refused"]`,
//! the audit log records every command and each new episode, and the watchdog stops a policy
//! that went quiet.

use scopegym_drivers::Limits;
use scopegym_drivers::connect::{DeployOptions, DriverUrl, make_env};
use scopegym_envs::env::{Env, InfoValue};
use scopegym_envs::space::Value;
use std::time::Duration;

const WRITING: &str = "scopegym/PfmDomainWriting-v1";

fn info_str<'a>(info: &'a scopegym_envs::Info, key: &str) -> Option<&'a str> {
    match info.get(key) {
        Some(InfoValue::Str(s)) => Some(s),
        _ => None,
    }
}

fn limits(toml: &str) -> Limits {
    Limits::from_toml_str(toml).unwrap()
}

/// A pulse action at the field's centre: bias `u` of the task's ±15 V range, 1 ms.
fn pulse(u: f32) -> Value {
    Value::Box(vec![0.0, 0.0, u, -1.0])
}

#[test]
fn a_refused_pulse_ends_the_episode_with_the_reason_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let opts = DeployOptions {
        limits: limits("[spm]\npulse_bias_max = \"4 V\"\nscanner_range = [\"10 µm\", \"10 µm\"]"),
        audit: Some(log.clone()),
        ..DeployOptions::default()
    };
    let mut env = make_env(WRITING, &"sim".parse().unwrap(), opts).unwrap();
    let (obs0, info0) = env.reset(Some(3)).unwrap();
    assert!(!info0.contains_key("refused"));
    // 0.2 of 15 V = 3 V: within the 4 V limit, applied.
    let ok = env.step(&pulse(0.2)).unwrap();
    assert!(!ok.info.contains_key("refused"), "{:?}", ok.info);
    // 0.5 of 15 V = 7.5 V: below the task's 10 V breakdown, above the 4 V limit: refused.
    let s = env.step(&pulse(0.5)).unwrap();
    assert!(s.terminated && !s.truncated);
    assert_eq!(s.reward, 0.0);
    assert_eq!(s.info.get("refused"), Some(&InfoValue::Bool(true)));
    assert_eq!(s.info.get("is_success"), Some(&InfoValue::Bool(false)));
    assert_eq!(
        info_str(&s.info, "refused_limit"),
        Some("spm.pulse_bias_max")
    );
    let reason = info_str(&s.info, "refused_reason").unwrap();
    assert!(
        reason.contains("7.5 V") && reason.contains("4 V"),
        "{reason}"
    );
    assert_eq!(
        s.obs, ok.obs,
        "a refused step returns the previous observation"
    );
    assert_ne!(s.obs, obs0);
    // The episode is over: stepping again is an error, not another pulse.
    assert!(env.step(&pulse(0.1)).is_err());
    drop(env);

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = &lines[0];
    assert_eq!(first["command"], "new_episode");
    assert_eq!(first["args"]["fresh_specimen"], true);
    let pulses: Vec<_> = lines
        .iter()
        .filter(|l| l["command"] == "bias_pulse")
        .collect();
    assert_eq!(pulses.len(), 2, "{lines:#?}");
    assert_eq!(pulses[0]["result"], "ok");
    assert_eq!(pulses[1]["result"], "refused");
    assert_eq!(pulses[1]["limit"], "spm.pulse_bias_max");
}

#[test]
fn a_refused_step_into_leaves_the_callers_observation() {
    let opts = || DeployOptions {
        limits: limits("[spm]\npulse_bias_max = \"4 V\"\nscanner_range = [\"10 µm\", \"10 µm\"]"),
        ..DeployOptions::default()
    };
    let mut env = make_env(WRITING, &"sim".parse().unwrap(), opts()).unwrap();
    let (mut obs, _) = env.reset(Some(3)).unwrap();
    let obs0 = obs.clone();
    let ok = env.step_into(&pulse(0.2), &mut obs).unwrap();
    assert!(!ok.info.contains_key("refused"), "{:?}", ok.info);
    assert_ne!(
        obs, obs0,
        "the step's observation went into the caller's buffer"
    );
    let after_ok = obs.clone();
    let s = env.step_into(&pulse(0.5), &mut obs).unwrap();
    assert_eq!(s.info.get("refused"), Some(&InfoValue::Bool(true)));
    assert!(s.terminated);
    assert_eq!(
        obs, after_ok,
        "a refused step leaves the previous observation"
    );
    // A plain step refused after step_into handed the observation out: a clear error, not an
    // empty or stale observation.
    let mut env = make_env(WRITING, &"sim".parse().unwrap(), opts()).unwrap();
    let (mut obs, _) = env.reset(Some(3)).unwrap();
    env.step_into(&pulse(0.2), &mut obs).unwrap();
    let e = env.step(&pulse(0.5)).unwrap_err().to_string();
    assert!(e.contains("step_into"), "{e}");
}

#[test]
fn the_same_pulse_passes_under_wider_limits() {
    let opts = DeployOptions {
        limits: limits("[spm]\npulse_bias_max = \"9 V\"\nscanner_range = [\"10 µm\", \"10 µm\"]"),
        ..DeployOptions::default()
    };
    let mut env = make_env(WRITING, &DriverUrl::Sim, opts).unwrap();
    env.reset(Some(3)).unwrap();
    let s = env.step(&pulse(0.5)).unwrap();
    assert!(!s.info.contains_key("refused"), "{:?}", s.info);
}

#[test]
fn the_watchdog_stops_a_policy_that_went_quiet() {
    let opts = DeployOptions {
        limits: limits("[spm]\nscanner_range = [\"10 µm\", \"10 µm\"]"),
        watchdog: Some(Duration::from_millis(100)),
        ..DeployOptions::default()
    };
    let mut env = make_env(WRITING, &DriverUrl::Sim, opts).unwrap();
    env.reset(Some(1)).unwrap();
    // A step that takes longer than the timeout is not a quiet policy: the call pauses it.
    let s = env.step(&pulse(0.1)).unwrap();
    assert!(!s.info.contains_key("refused"), "{:?}", s.info);
    assert!(!env.watchdog_fired());
    std::thread::sleep(Duration::from_millis(600));
    assert!(env.watchdog_fired());
    let s = env.step(&pulse(0.1)).unwrap();
    assert!(s.terminated);
    assert_eq!(info_str(&s.info, "refused_limit"), Some("watchdog"));
    // A new episode on a simulator starts on a fresh specimen: the guard re-arms.
    env.reset(Some(2)).unwrap();
    let s = env.step(&pulse(0.1)).unwrap();
    assert!(!s.info.contains_key("refused"), "{:?}", s.info);
    env.close().unwrap();
}

#[test]
fn driver_urls_parse_and_bad_ones_are_named() {
    assert_eq!("sim".parse::<DriverUrl>().unwrap(), DriverUrl::Sim);
    assert_eq!(
        "nanonis://127.0.0.1:6501".parse::<DriverUrl>().unwrap(),
        DriverUrl::Nanonis("127.0.0.1:6501".into())
    );
    assert_eq!(
        "stem-gateway://lab-pc:7000".parse::<DriverUrl>().unwrap(),
        DriverUrl::StemGateway("lab-pc:7000".into())
    );
    assert_eq!(
        "replay:/data/x.h5".parse::<DriverUrl>().unwrap(),
        DriverUrl::Replay("/data/x.h5".into())
    );
    for bad in [
        "",
        "nanonis://host",
        "nanonis://host:0",
        "nanonis://:80",
        "replay:",
        "http://x:1",
    ] {
        let e = bad.parse::<DriverUrl>().unwrap_err().to_string();
        assert!(e.contains("driver `"), "{bad}: {e}");
    }
    for url in ["sim", "nanonis://h:1", "stem-gateway://h:2", "replay:f.h5"] {
        assert_eq!(url.parse::<DriverUrl>().unwrap().to_string(), url);
    }
    let e = make_env(
        "scopegym/Nope-v1",
        &DriverUrl::Sim,
        DeployOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("Nope"), "{e}");
    let bad_cfg = DeployOptions {
        config: Some(toml::from_str("max_steps = 0").unwrap()),
        ..DeployOptions::default()
    };
    let e = make_env(WRITING, &DriverUrl::Sim, bad_cfg).unwrap_err();
    assert!(e.to_string().contains("max_steps"), "{e}");
}

#[test]
fn every_task_runs_on_the_guarded_simulator_as_on_the_bare_one() {
    // Under generous limits the guard changes nothing: same observations and rewards.
    let wide = "[spm]\nbias_window = [\"-20 V\", \"20 V\"]\nbias_slew_max = \"1e9 V/s\"\n\
                pulse_bias_max = \"20 V\"\npulse_width_max = \"10 s\"\n\
                setpoint_range = [\"1e-12 A/V\", \"1 A/V\"]\ndip_depth_max = \"100 nm\"\n\
                z_range = [\"-1 mm\", \"1 mm\"]\nscanner_range = [\"1 mm\", \"1 mm\"]\n\
                abort_corrugation = \"1 mm\"\n\
                [stem]\ndose_budget = \"1e30 e/Å^2\"\nmax_frame_time = \"1000 s\"\n\
                max_exposure = \"1000 s\"\nblank_outside_acquisition = false\n\
                [stem.aberration_step_max]\nc10 = \"1 m\"\nc12 = \"1 m\"\nc21 = \"1 m\"\n\
                c23 = \"1 m\"\nc30 = \"1 m\"\nc50 = \"1 m\"";
    for id in scopegym_envs::registry::ids() {
        let mut bare = scopegym_envs::registry::make(id, None).unwrap();
        let opts = DeployOptions {
            limits: limits(wide),
            ..DeployOptions::default()
        };
        let mut guarded = make_env(id, &DriverUrl::Sim, opts).unwrap();
        let (a, _) = bare.reset(Some(5)).unwrap();
        let (b, _) = guarded.reset(Some(5)).unwrap();
        assert_eq!(a, b, "{id}: reset");
        let mut obs = a;
        for t in 0..3 {
            let act = bare.heuristic_action(&obs);
            let x = bare.step(&act).unwrap();
            let y = guarded.step(&act).unwrap();
            assert!(
                !y.info.contains_key("refused"),
                "{id} step {t}: {:?}",
                y.info
            );
            assert_eq!(x.obs, y.obs, "{id} step {t}");
            assert_eq!(x.reward, y.reward, "{id} step {t}");
            assert_eq!(x.terminated, y.terminated, "{id} step {t}");
            if x.terminated || x.truncated {
                break;
            }
            obs = x.obs;
        }
    }
}

#[path = "support/data.rs"]
mod data;

#[test]
fn recorded_loops_serve_a_spectroscopy_episode_through_the_guard() {
    let Some(file) = data::data("beps_pto_50x50.h5") else {
        return;
    };
    // The recorded map: 50² points over 2 µm, one loop per point (the driver's module docs).
    let span = scopegym_drivers::ReplaySpm::open(&file, Default::default())
        .unwrap()
        .recorded_loops()
        .unwrap()
        .span;
    let config: toml::Value = toml::from_str(&format!(
        "grid = 50\nfield = 2e-6\npixels = 50\nhistory_radius = 0.0\nresponse_span = {span}\n\
         prior_mean = 0.01\nprior_sd = 0.03\nnoise_sd = 0.005\nbudget = 12\n"
    ))
    .unwrap();
    let url = DriverUrl::Replay(file.clone());
    let tight = DeployOptions {
        config: Some(config.clone()),
        ..DeployOptions::default()
    };
    // The default limits' 1 µm scanner cannot hold the recorded 2 µm field: refused at reset.
    let e = make_env("scopegym/PfmSpectroscopyExplore-v1", &url, tight)
        .unwrap()
        .reset(Some(0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("spm.scan_area_fraction"), "{e}");
    let opts = DeployOptions {
        config: Some(config),
        limits: limits(
            "[spm]\nbias_window = [\"-10 V\", \"10 V\"]\nscanner_range = [\"10 µm\", \"10 µm\"]",
        ),
        ..DeployOptions::default()
    };
    let mut env = make_env("scopegym/PfmSpectroscopyExplore-v1", &url, opts).unwrap();
    let (mut obs, info) = env.reset(Some(0)).unwrap();
    assert_eq!(
        info.get("real_data"),
        Some(&InfoValue::Bool(true)),
        "{info:?}"
    );
    let mut steps = 0;
    loop {
        let a = env.heuristic_action(&obs);
        let s = env.step(&a).unwrap();
        assert!(!s.info.contains_key("refused"), "{:?}", s.info);
        steps += 1;
        obs = s.obs;
        if s.terminated || s.truncated {
            break;
        }
    }
    assert_eq!(steps, 12);
    // A recording runs only the tasks it can serve.
    let e = make_env(
        "scopegym/PfmDomainWriting-v1",
        &url,
        DeployOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot run"), "{e}");
}

#[test]
fn a_dry_run_checks_and_logs_every_command_and_sends_none() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dry.jsonl");
    for id in [WRITING, "scopegym/StemAutofocus-v2"] {
        let opts = DeployOptions {
            limits: limits("[spm]\nscanner_range = [\"10 µm\", \"10 µm\"]"),
            dry_run: true,
            audit: Some(log.clone()),
            ..DeployOptions::default()
        };
        let mut env = make_env(id, &DriverUrl::Sim, opts).unwrap();
        // The placeholder frames carry the channels the task reads (PFM phase, ...).
        let (obs, _) = env.reset(Some(0)).unwrap();
        let a = env.heuristic_action(&obs);
        let s = env.step(&a).unwrap();
        assert!(!s.info.contains_key("refused"), "{id}: {:?}", s.info);
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 4);
    for l in &lines {
        let expected = if l["command"] == "new_episode" {
            "ok"
        } else {
            "dry_run"
        };
        assert_eq!(l["result"], expected, "{l}");
    }
    assert!(lines.iter().any(|l| l["command"] == "bias_pulse"));
    assert!(lines.iter().any(|l| l["command"] == "set_aberrations"));
}
