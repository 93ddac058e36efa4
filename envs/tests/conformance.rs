//! The conformance suite every registered task passes (issue: Step 3), plus the
//! heuristic-beats-random check with the margin each task states.

use scopegym_envs::EnvError;
use scopegym_envs::env::{Env, InfoValue};
use scopegym_envs::registry::{TASKS, make};
use scopegym_envs::rng::seeded;
use scopegym_envs::space::Value;
use scopegym_envs::vector::{AutoReset, VectorEnv};

/// One episode with seeded random actions: (observations, rewards, terminated, truncated).
fn episode(env: &mut dyn Env, seed: u64) -> (Vec<Value>, Vec<f64>, bool, bool) {
    let (obs, _) = env.reset(Some(seed)).unwrap();
    assert!(
        env.observation_space().contains(&obs),
        "{}: reset obs outside its space",
        env.id()
    );
    let mut rng = seeded(seed ^ 0xabc);
    let mut all = vec![obs];
    let mut rewards = Vec::new();
    loop {
        let a = env.action_space().sample(&mut rng);
        let s = env.step(&a).unwrap();
        assert!(
            env.observation_space().contains(&s.obs),
            "{}: obs outside its space: {:?}",
            env.id(),
            s.obs
        );
        assert!(s.reward.is_finite(), "{}: reward {}", env.id(), s.reward);
        assert!(
            matches!(s.info.get("is_success"), Some(InfoValue::Bool(_))),
            "{}: no info[\"is_success\"]",
            env.id()
        );
        all.push(s.obs);
        rewards.push(s.reward);
        if s.terminated || s.truncated {
            assert!(rewards.len() <= env.max_episode_steps());
            return (all, rewards, s.terminated, s.truncated);
        }
    }
}

#[test]
fn every_task_is_deterministic_contained_and_renders() {
    for spec in TASKS {
        let mut env = make(spec.id, None).unwrap();
        let a = episode(env.as_mut(), 7);
        let b = episode(make(spec.id, None).unwrap().as_mut(), 7);
        assert_eq!(a, b, "{}: same seed, different trajectory", spec.id);
        let c = episode(env.as_mut(), 8);
        assert_ne!(a.0, c.0, "{}: different seeds, same observations", spec.id);
        let img = env.render();
        assert!(img.width > 0 && img.height > 0, "{}", spec.id);
        assert_eq!(img.data.len(), img.width * img.height * 3, "{}", spec.id);
    }
}

#[test]
fn every_task_randomizes_by_default_and_its_splits_draw_apart() {
    let cfg =
        |split: &str| -> toml::Value { toml::from_str(&format!("split = \"{split}\"")).unwrap() };
    for spec in TASKS {
        let mut train = make(spec.id, Some(&cfg("train"))).unwrap();
        let mut test = make(spec.id, Some(&cfg("test"))).unwrap();
        for seed in 0..3 {
            let (_, a) = train.reset(Some(seed)).unwrap();
            let (_, b) = test.reset(Some(seed)).unwrap();
            let params = |i: &scopegym_envs::Info| {
                i.iter()
                    .filter(|(k, _)| k.starts_with("param."))
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect::<Vec<_>>()
            };
            let (pa, pb) = (params(&a), params(&b));
            assert!(
                pa.len() >= 2,
                "{}: randomizes {} parameters by default: {pa:?}",
                spec.id,
                pa.len()
            );
            assert_eq!(pa.len(), pb.len(), "{}", spec.id);
            for ((k, va), (_, vb)) in pa.iter().zip(&pb) {
                assert_ne!(va, vb, "{} seed {seed}: {k} equal on both splits", spec.id);
            }
        }
    }
}

#[test]
fn difficulty_levels_are_valid_configs_and_unknown_levels_are_errors() {
    for spec in TASKS {
        for level in ["easy", "medium", "hard"] {
            let c: toml::Value = toml::from_str(&format!("difficulty = \"{level}\"")).unwrap();
            let mut env =
                make(spec.id, Some(&c)).unwrap_or_else(|e| panic!("{} {level}: {e}", spec.id));
            env.reset(Some(1)).unwrap();
        }
        let c: toml::Value = toml::from_str("difficulty = \"extreme\"").unwrap();
        let e = match make(spec.id, Some(&c)) {
            Ok(_) => panic!("{}: accepted difficulty = \"extreme\"", spec.id),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("difficulty"), "{}: {e}", spec.id);
    }
}

#[test]
fn stepping_rules_follow_gymnasium() {
    for spec in TASKS {
        let mut env = make(spec.id, None).unwrap();
        let a = env.action_space().sample(&mut seeded(1));
        assert!(
            matches!(env.step(&a), Err(EnvError::NeedsReset(_))),
            "{}",
            spec.id
        );
        env.reset(Some(3)).unwrap();
        // NaN and wrong shapes are errors naming the action.
        if let Value::Box(v) = &a {
            let mut nan = v.clone();
            nan[0] = f32::NAN;
            let e = env.step(&Value::Box(nan)).unwrap_err().to_string();
            assert!(e.contains("action[0]"), "{}: {e}", spec.id);
            let e = env
                .step(&Value::Box(vec![0.0; v.len() + 1]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("expected shape"), "{}: {e}", spec.id);
            // Out of bounds: clipped, and said in info.
            let big = Value::Box(vec![1e9; v.len()]);
            let s = env.step(&big).unwrap();
            assert_eq!(
                s.info.get("action_clipped"),
                Some(&InfoValue::Bool(true)),
                "{}",
                spec.id
            );
        }
        // (A full-scale action may have ended the episode, e.g. by dielectric breakdown.)
        env.reset(Some(4)).unwrap();
        // Run to the end, then stepping again is an error until reset.
        loop {
            let s = env.step(&a).unwrap();
            if s.terminated || s.truncated {
                break;
            }
        }
        assert!(
            matches!(env.step(&a), Err(EnvError::NeedsReset(_))),
            "{}",
            spec.id
        );
        env.reset(None).unwrap();
        env.step(&a).unwrap();
    }
}

fn random_actions(env: &dyn Env, n: usize, seed: u64) -> Vec<Vec<Value>> {
    let mut rngs: Vec<_> = (0..n).map(|i| seeded(seed + i as u64)).collect();
    (0..env.max_episode_steps() + 3)
        .map(|_| {
            rngs.iter_mut()
                .map(|r| env.action_space().sample(r))
                .collect()
        })
        .collect()
}

#[test]
fn vector_env_equals_single_envs_and_is_thread_count_independent() {
    for spec in TASKS {
        let n = 4;
        let probe = make(spec.id, None).unwrap();
        let actions = random_actions(probe.as_ref(), n, 11);
        let run_with = |threads: usize, flat: bool| {
            let envs = (0..n).map(|_| make(spec.id, None).unwrap()).collect();
            let mut v = VectorEnv::new(envs, AutoReset::NextStep, threads).unwrap();
            let alen = v.action_len();
            v.reset(Some(100)).unwrap();
            let mut out = vec![(
                v.observations().to_vec(),
                vec![0.0; n],
                vec![false; n],
                vec![false; n],
            )];
            for a in &actions {
                if flat {
                    // The flattened form NumPy hands over.
                    let mut buf = vec![0.0f32; n * alen];
                    for (i, ai) in a.iter().enumerate() {
                        scopegym_envs::vector::flatten_into(ai, &mut buf[i * alen..]);
                    }
                    v.step_flat(&buf).unwrap();
                } else {
                    v.step(a).unwrap();
                }
                out.push((
                    v.observations().to_vec(),
                    v.rewards().to_vec(),
                    v.terminated().to_vec(),
                    v.truncated().to_vec(),
                ));
            }
            out
        };
        let run = |threads| run_with(threads, false);
        let one = run(1);
        assert_eq!(one, run(2), "{}: 1 thread != 2 threads", spec.id);
        assert_eq!(one, run_with(2, true), "{}: step_flat != step", spec.id);
        // By hand: env i seeded 100 + i, NEXT_STEP autoreset.
        let mut singles: Vec<_> = (0..n).map(|_| make(spec.id, None).unwrap()).collect();
        let len = probe.observation_space().flat_len();
        let mut done = vec![false; n];
        let mut flat = vec![0.0f32; len];
        for (i, e) in singles.iter_mut().enumerate() {
            let (o, _) = e.reset(Some(100 + i as u64)).unwrap();
            scopegym_envs::vector::flatten_into(&o, &mut flat);
            assert_eq!(&one[0].0[i * len..(i + 1) * len], &flat[..], "{}", spec.id);
        }
        for (t, a) in actions.iter().enumerate() {
            for (i, e) in singles.iter_mut().enumerate() {
                let (o, r, term, trunc) = if done[i] {
                    done[i] = false;
                    (e.reset(None).unwrap().0, 0.0, false, false)
                } else {
                    let s = e.step(&a[i]).unwrap();
                    done[i] = s.terminated || s.truncated;
                    (s.obs, s.reward, s.terminated, s.truncated)
                };
                scopegym_envs::vector::flatten_into(&o, &mut flat);
                let got = &one[t + 1];
                assert_eq!(
                    &got.0[i * len..(i + 1) * len],
                    &flat[..],
                    "{} step {t} env {i}",
                    spec.id
                );
                assert_eq!(
                    (got.1[i], got.2[i], got.3[i]),
                    (r, term, trunc),
                    "{} step {t} env {i}",
                    spec.id
                );
            }
        }
    }
}

#[test]
fn same_step_and_disabled_autoreset() {
    for spec in TASKS {
        let n = 2;
        let probe = make(spec.id, None).unwrap();
        let actions = random_actions(probe.as_ref(), n, 5);
        let envs = (0..n).map(|_| make(spec.id, None).unwrap()).collect();
        let mut v = VectorEnv::new(envs, AutoReset::SameStep, 1).unwrap();
        v.reset(Some(1)).unwrap();
        let mut saw_final = false;
        for a in &actions {
            v.step(a).unwrap();
            for (i, info) in v.infos().iter().enumerate() {
                if v.terminated()[i] || v.truncated()[i] {
                    assert!(info.contains_key("final_obs"), "{}", spec.id);
                    saw_final = true;
                }
            }
        }
        assert!(saw_final, "{}: no episode ended", spec.id);
        let envs = (0..n).map(|_| make(spec.id, None).unwrap()).collect();
        let mut v = VectorEnv::new(envs, AutoReset::Disabled, 1).unwrap();
        v.reset(Some(1)).unwrap();
        let mut ended = false;
        for a in &actions {
            match v.step(a) {
                Ok(()) => {}
                Err(EnvError::NeedsReset(_)) => {
                    ended = true;
                    let mask: Vec<bool> = (0..n)
                        .map(|i| v.terminated()[i] || v.truncated()[i])
                        .collect();
                    v.reset_mask(None, &mask).unwrap();
                    break;
                }
                Err(e) => panic!("{}: {e}", spec.id),
            }
        }
        assert!(
            ended,
            "{}: stepping past the end must fail without autoreset",
            spec.id
        );
        assert!(v.reset_mask(None, &[true]).is_err());
    }
}

/// Mean return over `seeds` episodes of the heuristic or of random actions.
fn mean_return(id: &str, seeds: std::ops::Range<u64>, heuristic: bool) -> f64 {
    let mut env = make(id, None).unwrap();
    let mut total = 0.0;
    let n = seeds.end - seeds.start;
    for seed in seeds {
        let (mut obs, _) = env.reset(Some(seed)).unwrap();
        let mut rng = seeded(seed + 1000);
        loop {
            let a = if heuristic {
                env.heuristic_action(&obs)
            } else {
                env.action_space().sample(&mut rng)
            };
            let s = env.step(&a).unwrap();
            total += s.reward;
            obs = s.obs;
            if s.terminated || s.truncated {
                break;
            }
        }
    }
    total / n as f64
}

#[test]
fn heuristics_beat_random() {
    // Margins per task: the heuristic's mean return over 20 seeds exceeds random's by at least
    // this much.
    let margins = [
        ("scopegym/AfmFeedbackTuning-v2", 20.0),
        ("scopegym/PfmDomainWriting-v1", 5.0),
        ("scopegym/PfmSpectroscopyExplore-v1", 0.3),
        ("scopegym/SpmTipConditioning-v2", 6.0),
        ("scopegym/SpmAtomManipulation-v2", 15.0),
        ("scopegym/StemAutofocus-v2", 2.0),
        ("scopegym/StemDopantSteer-v1", 1.0),
        ("scopegym/StemEelsExplore-v2", 0.6),
        ("scopegym/StemSparseScan-v2", 0.5),
    ];
    for (id, margin) in margins {
        let (h, r) = (mean_return(id, 0..20, true), mean_return(id, 0..20, false));
        println!("{id}: heuristic {h:.2}, random {r:.2} (margin {margin})");
        assert!(h > r + margin, "{id}: heuristic {h} vs random {r}");
    }
    assert_eq!(margins.len(), TASKS.len(), "every task states its margin");
}
