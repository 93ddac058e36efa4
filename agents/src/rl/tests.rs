//! Tests of the RL agents: control checks on tiny envs written here, StemDopantSteer against
//! the floors, checkpoints, TorchScript export and a policy scripted in Python.

use super::*;
use crate::agent::{Agent, TrainSpec, run_episode};
use scopegym_envs::env::{RgbImage, Step};
use scopegym_envs::rng::{SimRng, seeded};
use scopegym_envs::{Env, Info, Space, Value};
use std::time::Instant;

/// A point mass on a line: `x ∈ [-2, 2]` starts uniform in `±[1, 2]`, the action `a ∈ [-1,
/// 1]` moves it by `0.25 a`; reaching `|x| < 0.15` pays +1 and terminates, every other step
/// costs 0.02; 60 steps truncate. The best return is about 1 − 0.02 · 7 ≈ 0.86.
#[derive(Debug)]
struct PointMass {
    obs: Space,
    act: Space,
    x: f32,
    t: usize,
    rng: SimRng,
}

impl PointMass {
    fn boxed() -> Box<dyn Env> {
        Box::new(Self {
            obs: Space::uniform_box(&[1], -2.0, 2.0),
            act: Space::uniform_box(&[1], -1.0, 1.0),
            x: 0.0,
            t: 0,
            rng: seeded(0),
        })
    }
}

impl Env for PointMass {
    fn id(&self) -> &str {
        "test/PointMass-v1"
    }
    fn observation_space(&self) -> &Space {
        &self.obs
    }
    fn action_space(&self) -> &Space {
        &self.act
    }
    fn max_episode_steps(&self) -> usize {
        60
    }
    fn reset(&mut self, seed: Option<u64>) -> scopegym_envs::Result<(Value, Info)> {
        use rand::Rng;
        if let Some(s) = seed {
            self.rng = seeded(s);
        }
        let m: f32 = self.rng.random_range(1.0..2.0);
        self.x = if self.rng.random::<bool>() { m } else { -m };
        self.t = 0;
        Ok((Value::Box(vec![self.x]), Info::new()))
    }
    fn step(&mut self, action: &Value) -> scopegym_envs::Result<Step> {
        let a = action.as_box().unwrap()[0];
        self.x = (self.x + 0.25 * a).clamp(-2.0, 2.0);
        self.t += 1;
        let done = self.x.abs() < 0.15;
        Ok(Step {
            obs: Value::Box(vec![self.x]),
            reward: if done { 1.0 } else { -0.02 },
            terminated: done,
            truncated: !done && self.t >= 60,
            info: Info::new(),
        })
    }
    fn render(&self) -> RgbImage {
        RgbImage::from_grey(&[0.0], 1, 1)
    }
    fn heuristic_action(&mut self, obs: &Value) -> Value {
        Value::Box(vec![(-4.0 * obs.as_box().unwrap()[0]).clamp(-1.0, 1.0)])
    }
}

/// A corridor of cells 0..=8, starting at 0; actions 0 (left), 1 (stay), 2 (right); cell 8
/// pays +1 and terminates, every other step costs 0.01; 40 steps truncate. The observation is
/// the cell. The best return is 1 − 0.01 · 7 = 0.93; a random walk rarely gets there.
#[derive(Debug)]
struct Corridor {
    obs: Space,
    act: Space,
    x: i64,
    t: usize,
}

impl Corridor {
    fn boxed() -> Box<dyn Env> {
        Box::new(Self {
            obs: Space::uniform_box(&[1], 0.0, 8.0),
            act: Space::Discrete { n: 3, start: 0 },
            x: 0,
            t: 0,
        })
    }
}

impl Env for Corridor {
    fn id(&self) -> &str {
        "test/Corridor-v1"
    }
    fn observation_space(&self) -> &Space {
        &self.obs
    }
    fn action_space(&self) -> &Space {
        &self.act
    }
    fn max_episode_steps(&self) -> usize {
        40
    }
    fn reset(&mut self, _seed: Option<u64>) -> scopegym_envs::Result<(Value, Info)> {
        self.x = 0;
        self.t = 0;
        Ok((Value::Box(vec![0.0]), Info::new()))
    }
    fn step(&mut self, action: &Value) -> scopegym_envs::Result<Step> {
        self.x = (self.x + action.as_discrete().unwrap() - 1).clamp(0, 8);
        self.t += 1;
        let done = self.x == 8;
        Ok(Step {
            obs: Value::Box(vec![self.x as f32]),
            reward: if done { 1.0 } else { -0.01 },
            terminated: done,
            truncated: !done && self.t >= 40,
            info: Info::new(),
        })
    }
    fn render(&self) -> RgbImage {
        RgbImage::from_grey(&[0.0], 1, 1)
    }
    fn heuristic_action(&mut self, _obs: &Value) -> Value {
        Value::Discrete(2)
    }
}

fn envs(make: fn() -> Box<dyn Env>, n: usize) -> Vec<Box<dyn Env>> {
    (0..n).map(|_| make()).collect()
}

/// Mean return of `agent` over episodes from `seeds`.
fn mean_return(env: &mut dyn Env, agent: &mut dyn Agent, seeds: std::ops::Range<u64>) -> f64 {
    let n = seeds.end - seeds.start;
    seeds
        .map(|s| run_episode(env, agent, s).unwrap().ret)
        .sum::<f64>()
        / n as f64
}

fn random_return(env: &mut dyn Env, seeds: std::ops::Range<u64>) -> f64 {
    let mut r = crate::floors::RandomAgent::default();
    mean_return(env, &mut r, seeds)
}

#[test]
fn ppo_solves_the_continuous_point_mass() {
    // Budget: 30 000 steps (about 30 PPO iterations of 8 × 128). Threshold: mean evaluation
    // return ≥ 0.7 over 20 episodes (best ≈ 0.86; random walks score below 0).
    let mut agent = PpoAgent::new(
        NetSpec::for_env(PointMass::boxed().as_ref()).unwrap(),
        PpoConfig::default(),
        1,
    )
    .unwrap();
    let t0 = Instant::now();
    let curve = agent
        .train_envs(envs(PointMass::boxed, 8), 30_000, 1, &mut |_| {})
        .unwrap();
    let mut env = PointMass::boxed();
    let ppo = mean_return(env.as_mut(), &mut agent, 100..120);
    let random = random_return(env.as_mut(), 100..120);
    println!(
        "point mass: ppo {ppo:.3}, random {random:.3}, curve first {:.3} last {:.3}, {:.1} s",
        curve[0].value,
        curve.last().unwrap().value,
        t0.elapsed().as_secs_f64()
    );
    assert!(ppo >= 0.7, "ppo {ppo:.3} < 0.7 (random {random:.3})");
}

#[test]
fn ppo_solves_the_discrete_corridor() {
    // Budget: 20 000 steps. Threshold: the deterministic policy reaches the end in at most
    // 15 steps (return ≥ 0.86; best 0.93), where random scores below 0.
    let mut agent = PpoAgent::new(
        NetSpec::for_env(Corridor::boxed().as_ref()).unwrap(),
        PpoConfig::default(),
        2,
    )
    .unwrap();
    let t0 = Instant::now();
    agent
        .train_envs(envs(Corridor::boxed, 8), 20_000, 2, &mut |_| {})
        .unwrap();
    let mut env = Corridor::boxed();
    let ppo = mean_return(env.as_mut(), &mut agent, 0..5);
    let random = random_return(env.as_mut(), 0..50);
    println!(
        "corridor: ppo {ppo:.3}, random {random:.3}, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(ppo >= 0.86, "ppo {ppo:.3} < 0.86 (random {random:.3})");
}

#[test]
fn reinforce_beats_random_on_the_point_mass() {
    // Budget: 40 000 steps. Margin: mean evaluation return over 20 episodes ≥ random + 0.5
    // and ≥ 0.3.
    let mut agent = ReinforceAgent::new(
        NetSpec::for_env(PointMass::boxed().as_ref()).unwrap(),
        ReinforceConfig::default(),
        3,
    )
    .unwrap();
    let t0 = Instant::now();
    agent
        .train_envs(envs(PointMass::boxed, 8), 40_000, 3, &mut |_| {})
        .unwrap();
    let mut env = PointMass::boxed();
    let rf = mean_return(env.as_mut(), &mut agent, 100..120);
    let random = random_return(env.as_mut(), 100..120);
    println!(
        "point mass: reinforce {rf:.3}, random {random:.3}, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        rf >= random + 0.5 && rf >= 0.3,
        "reinforce {rf:.3}, random {random:.3}"
    );
}

/// PPO on StemDopantSteer-v1 (medium) trained on the train split for `steps`, then scored
/// deterministically on `seeds` of the test split beside the floors on the same seeds:
/// `(ppo, ppo success rate, random, heuristic)` (mean returns).
fn dopant_ppo(
    steps: u64,
    seed: u64,
    seeds: std::ops::Range<u64>,
    cfg: PpoConfig,
) -> (f64, f64, f64, f64) {
    use scopegym_envs::evaluate::{Policy, evaluate};
    let id = "scopegym/StemDopantSteer-v1";
    let lvl = std::env::var("LEVEL").unwrap_or_else(|_| "medium".into());
    let train: toml::Value =
        toml::from_str(&format!("split = \"train\"\ndifficulty = \"{lvl}\"")).unwrap();
    let test: toml::Value =
        toml::from_str(&format!("split = \"test\"\ndifficulty = \"{lvl}\"")).unwrap();
    let mut env = scopegym_envs::registry::make(id, Some(&test)).unwrap();
    let mut agent = PpoAgent::new(NetSpec::for_env(env.as_ref()).unwrap(), cfg, seed).unwrap();
    let t0 = Instant::now();
    let curve = agent
        .train(
            &TrainSpec {
                env_id: id,
                env_config: Some(&train),
                steps,
                seed,
            },
            &mut |_| {},
        )
        .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let recs: Vec<_> = seeds
        .clone()
        .map(|s| run_episode(env.as_mut(), &mut agent, s).unwrap())
        .collect();
    let ppo = recs.iter().map(|r| r.ret).sum::<f64>() / recs.len() as f64;
    let succ = recs.iter().filter(|r| r.success).count() as f64 / recs.len() as f64;
    let len = recs.iter().map(|r| r.steps).sum::<usize>() as f64 / recs.len() as f64;
    println!(
        "ppo return {ppo:.3}, success {succ:.2}, mean length {len:.1}; first actions {:?}",
        {
            let (o, _) = env.reset(Some(seeds.start)).unwrap();
            agent.act(env.as_mut(), &o).unwrap()
        }
    );
    if std::env::var("DIAG").is_ok() {
        let ls = agent
            .net()
            .log_std()
            .map(|l| Vec::<f32>::try_from(&l.detach()).unwrap());
        println!("log_std {ls:?}");
        for s in 0..4 {
            let (o, _) = env.reset(Some(seeds.start + s)).unwrap();
            let a = agent.act(env.as_mut(), &o).unwrap();
            let h = env.heuristic_action(&o);
            println!("obs {:?}\n  ppo {a:?} heuristic {h:?}", o.as_box().unwrap());
        }
    }
    let random = evaluate(env.as_mut(), &Policy::Random, seeds.clone()).unwrap();
    let heur = evaluate(env.as_mut(), &Policy::Heuristic, seeds.clone()).unwrap();
    let pts: Vec<String> = curve
        .iter()
        .step_by((curve.len() / 10).max(1))
        .map(|p| format!("{}:{:.2}", p.step, p.value))
        .collect();
    println!(
        "StemDopantSteer-v1: {steps} steps in {secs:.1} s ({:.0} steps/s, stats {:?}); test \
         split: ppo {ppo:.3}, random {:.3} (success {:.2}), heuristic {:.3} (success {:.2}); curve {}",
        steps as f64 / secs,
        agent.stats,
        random.mean_return,
        random.success_rate,
        heur.mean_return,
        heur.success_rate,
        pts.join(" ")
    );
    if let Ok((_, deg)) = scopegym_envs::evaluate::degenerate_scores(env.as_mut(), seeds, 2) {
        let d: Vec<String> = deg
            .iter()
            .map(|(n, s)| format!("{n} {:.3}/{:.2}", s.mean_return, s.success_rate))
            .collect();
        println!(
            "floors and degenerate policies (return/success): {}",
            d.join(", ")
        );
    }
    (ppo, succ, random.mean_return, heur.mean_return)
}

/// PPO's training procedure for StemDopantSteer-v1 (the defaults are CleanRL's, which learn
/// the degenerate "shortest dwell, never hop" policy): three changes, each necessary
/// (measured: without any one of them, 300 k steps on seeds 0-1 end at the degenerate return
/// ≈ 0.19 with success 0):
///
/// - a curriculum on the train split: the first 20 % of the steps with goals one bond away
///   (`goal_distance = [1.4, 1.6] Å`: a single hop toward the goal pays the success reward, so
///   a long dwell beside the right neighbour is worth its time cost), then up to 80 % with
///   goals 1-3.5 bonds away (`[1.4, 5] Å`, the near goals kept), then the evaluated setting;
/// - `init_log_std = -1` (σ ≈ 0.37 instead of 1): the hop rate peaks 0.85 Å from the dopant
///   toward a neighbour within ±0.35 Å, i.e. ±0.29 in action units; with σ = 1 even the
///   heuristic's mean action scores −0.67 (diagnostics: `explore_dopant_scripted`), so
///   the shortest dwell is the best thing a σ = 1 policy can do;
/// - `learning_rate = 1e-3`: the goal vector enters the network normalized by the
///   observation bound (±7 bonds), so the offset toward the goal needs weights ~5× the
///   input; at 2.5e-4 the one-hop stage is not learned in the budget.
fn dopant_training() -> PpoConfig {
    toml::from_str(
        r#"
        learning_rate = 1e-3
        init_log_std = -1.0
        curriculum = [
            { until = 0.2, env_config = { goal_distance = [1.4e-10, 1.6e-10] } },
            { until = 0.8, env_config = { goal_distance = [1.4e-10, 5e-10] } },
        ]
        "#,
    )
    .unwrap()
}

#[test]
fn ppo_beats_random_on_stem_dopant_steer() {
    // Budget: 500 000 env steps of PPO with the curriculum of `dopant_training` (about 19 s
    // here in the dev profile, alone on a core), trained on the train split (medium), scored
    // deterministically on 30 seeds of the test split beside random and the heuristic on the
    // same seeds. Measured over training seeds 0-7 (return / success): 0.739/0.83 (seed 0,
    // the one tested: training is deterministic per seed), 0.667/0.90, 0.686/0.87,
    // 0.636/0.73, 0.726/0.90, 0.596/0.80, 0.691/0.87, 0.676/0.83; mean 0.677/0.84. Floors on the same seeds: random
    // −1.080/0.00, heuristic 1.085/1.00, the degenerate low-corner constant 0.178/0.00 (what
    // PPO with the defaults learns). So PPO closes 77-84 % of the random → heuristic gap and
    // steers the dopant to the goal in most episodes, more slowly than the heuristic.
    // Margins (below the worst seed): success ≥ 0.5, return ≥ 0.45 (degenerate + 0.27), gap
    // closed ≥ 70 %.
    let (ppo, succ, random, heur) = dopant_ppo(500_000, 0, 0..30, dopant_training());
    let closed = (ppo - random) / (heur - random);
    println!("gap closed: {:.0} %", 100.0 * closed);
    assert!(succ >= 0.5, "ppo success {succ:.2}");
    assert!(ppo >= 0.45, "ppo {ppo:.3} (degenerate low corner 0.178)");
    assert!(ppo > random + 0.8, "ppo {ppo:.3}, random {random:.3}");
    assert!(closed >= 0.7, "ppo closes {closed:.2} of the gap");
}

#[test]
#[ignore = "exploration of budgets: STEPS=... cargo nextest run --run-ignored only"]
fn explore_dopant_budget() {
    let steps = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let cfg: PpoConfig = toml::from_str(&std::env::var("CFG").unwrap_or_default()).unwrap();
    let seed = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    dopant_ppo(steps, seed, 0..30, cfg);
}

/// An env counting the steps taken on it (for the curriculum's stage switching).
struct Counting {
    inner: Box<dyn Env>,
    steps: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for Counting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counting")
    }
}

impl Env for Counting {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn observation_space(&self) -> &Space {
        self.inner.observation_space()
    }
    fn action_space(&self) -> &Space {
        self.inner.action_space()
    }
    fn max_episode_steps(&self) -> usize {
        self.inner.max_episode_steps()
    }
    fn reset(&mut self, seed: Option<u64>) -> scopegym_envs::Result<(Value, Info)> {
        self.inner.reset(seed)
    }
    fn step(&mut self, action: &Value) -> scopegym_envs::Result<Step> {
        self.steps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.step(action)
    }
    fn render(&self) -> RgbImage {
        self.inner.render()
    }
    fn heuristic_action(&mut self, obs: &Value) -> Value {
        self.inner.heuristic_action(obs)
    }
}

/// The point mass, whose reset fails for even seeds (all seeds when `always`).
#[derive(Debug)]
struct FlakyReset {
    inner: PointMass,
    always: bool,
}

impl Env for FlakyReset {
    fn id(&self) -> &str {
        "test/FlakyReset-v1"
    }
    fn observation_space(&self) -> &Space {
        self.inner.observation_space()
    }
    fn action_space(&self) -> &Space {
        self.inner.action_space()
    }
    fn max_episode_steps(&self) -> usize {
        self.inner.max_episode_steps()
    }
    fn reset(&mut self, seed: Option<u64>) -> scopegym_envs::Result<(Value, Info)> {
        if self.always || seed.is_some_and(|s| s % 2 == 0) {
            return Err(scopegym_envs::EnvError::config(
                "seed",
                "no episode for this seed",
            ));
        }
        self.inner.reset(seed)
    }
    fn step(&mut self, action: &Value) -> scopegym_envs::Result<Step> {
        self.inner.step(action)
    }
    fn render(&self) -> RgbImage {
        self.inner.render()
    }
    fn heuristic_action(&mut self, obs: &Value) -> Value {
        self.inner.heuristic_action(obs)
    }
}

#[test]
fn failed_training_resets_are_retried_with_other_seeds() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let point = || PointMass {
        obs: Space::uniform_box(&[1], -2.0, 2.0),
        act: Space::uniform_box(&[1], -1.0, 1.0),
        x: 0.0,
        t: 0,
        rng: seeded(0),
    };
    let n = Arc::new(AtomicU64::new(0));
    let flaky = |always| {
        Box::new(FlakyReset {
            inner: point(),
            always,
        }) as Box<dyn Env>
    };
    let mut e = common::RetryReset::wrap(flaky(false), 3, n.clone());
    e.reset(Some(1)).unwrap();
    assert_eq!(n.load(Ordering::Relaxed), 0);
    let failed = (0..20).filter(|s| s % 2 == 0).count() as u64;
    for s in 0..20 {
        e.reset(Some(s)).unwrap();
    }
    assert!(n.load(Ordering::Relaxed) >= failed);
    let mut e = common::RetryReset::wrap(flaky(true), 3, n.clone());
    assert!(e.reset(Some(1)).is_err());
    // PPO trains through a flaky env and counts the retries.
    let mut agent = PpoAgent::new(
        NetSpec::for_env(PointMass::boxed().as_ref()).unwrap(),
        PpoConfig {
            num_envs: 2,
            num_steps: 64,
            ..PpoConfig::default()
        },
        0,
    )
    .unwrap();
    agent
        .train_envs(vec![flaky(false), flaky(false)], 1024, 0, &mut |_| {})
        .unwrap();
    assert!(agent.stats.reset_failures > 0);
}

#[test]
fn training_stages_switch_envs_at_their_fractions() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let cfg = PpoConfig {
        num_envs: 2,
        num_steps: 16,
        ..PpoConfig::default()
    };
    let counters: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let stage = |k: usize| -> Vec<Box<dyn Env>> {
        (0..2)
            .map(|_| {
                Box::new(Counting {
                    inner: PointMass::boxed(),
                    steps: counters[k].clone(),
                }) as Box<dyn Env>
            })
            .collect()
    };
    let mut agent = PpoAgent::new(
        NetSpec::for_env(PointMass::boxed().as_ref()).unwrap(),
        cfg.clone(),
        0,
    )
    .unwrap();
    // 10 iterations of 32 steps: stage 0 up to 0.25 (iterations 0-2, rounded from 2.5),
    // stage 1 up to 0.5 (3-4), the last stage the rest (5-9), whatever its `until`.
    let stages = vec![(0.25, stage(0)), (0.5, stage(1)), (0.7, stage(2))];
    agent.train_stages(stages, 320, 0, &mut |_| {}).unwrap();
    let got: Vec<usize> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(got, vec![3 * 32, 2 * 32, 5 * 32]);
    // A stage with other spaces is refused.
    let mut agent = PpoAgent::new(
        NetSpec::for_env(PointMass::boxed().as_ref()).unwrap(),
        cfg,
        0,
    )
    .unwrap();
    let e = agent
        .train_stages(
            vec![
                (0.5, envs(PointMass::boxed, 2)),
                (1.0, envs(Corridor::boxed, 2)),
            ],
            320,
            0,
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("curriculum"), "{e}");
}

#[test]
fn curriculum_configs_are_parsed_validated_and_applied_to_the_task() {
    let text =
        "curriculum = [{ until = 0.3, env_config = { goal_distance = [1.4e-10, 1.6e-10] } }]";
    let cfg: PpoConfig = toml::from_str(text).unwrap();
    assert_eq!(cfg.curriculum.len(), 1);
    assert_eq!(cfg.curriculum[0].until, 0.3);
    assert!(cfg.validate().is_ok());
    assert!(PpoConfig::default().curriculum.is_empty());
    for bad in [
        "curriculum = [{ until = 0.0, env_config = {} }]",
        "curriculum = [{ until = 1.5, env_config = {} }]",
        "curriculum = [{ until = 0.5, env_config = {} }, { until = 0.4, env_config = {} }]",
    ] {
        let c: PpoConfig = toml::from_str(bad).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("curriculum"), "{bad}: {e}");
    }
    // Agent::train builds each stage's envs from the task's config with the stage's settings
    // merged over it: the task validates them (naming its field) ...
    let id = "scopegym/StemDopantSteer-v1";
    let env = scopegym_envs::registry::make(id, None).unwrap();
    let small = "num_envs = 2\nnum_steps = 8\n";
    let c: toml::Value = toml::from_str(&format!(
        "{small}curriculum = [{{ until = 0.5, env_config = {{ goal_distance = [5e-10, 1e-10] }} }}]"
    ))
    .unwrap();
    let mut agent = crate::registry::make("ppo", env.as_ref(), Some(&c), 0).unwrap();
    let train: toml::Value = toml::from_str("split = \"train\"").unwrap();
    let spec = TrainSpec {
        env_id: id,
        env_config: Some(&train),
        steps: 32,
        seed: 0,
    };
    let e = agent.train(&spec, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("goal_distance"), "{e}");
    // ... and a stage whose observation bounds differ (they follow the largest goal distance)
    // trains, its observations normalized as the evaluated task's.
    let c: toml::Value = toml::from_str(&format!(
        "{small}curriculum = [{{ until = 0.5, env_config = {{ goal_distance = [1.4e-10, 1.6e-10] }} }}]"
    ))
    .unwrap();
    let near = scopegym_envs::registry::make(
        id,
        Some(&toml::from_str("goal_distance = [1.4e-10, 1.6e-10]").unwrap()),
    )
    .unwrap();
    assert_ne!(
        NetSpec::for_env(near.as_ref()).unwrap(),
        NetSpec::for_env(env.as_ref()).unwrap()
    );
    let mut agent = PpoAgent::from_toml(env.as_ref(), Some(&c), 0).unwrap();
    agent.train(&spec, &mut |_| {}).unwrap();
    assert_eq!(agent.net().spec, NetSpec::for_env(env.as_ref()).unwrap());
}

#[test]
fn init_log_std_sets_the_gaussian_spread() {
    let env = PointMass::boxed();
    let spec = NetSpec::for_env(env.as_ref()).unwrap();
    for v in [0.0, -1.0] {
        let cfg = PpoConfig {
            init_log_std: v,
            ..PpoConfig::default()
        };
        let a = PpoAgent::new(spec.clone(), cfg, 0).unwrap();
        let ls = Vec::<f32>::try_from(a.net().log_std().unwrap()).unwrap();
        assert_eq!(ls, vec![v as f32]);
    }
    let c: PpoConfig = toml::from_str("init_log_std = 9.0").unwrap();
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("init_log_std")
    );
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("scopegym-rl-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Observations spread over the point mass's range.
fn line_obs() -> Vec<Value> {
    (0..41)
        .map(|k| Value::Box(vec![-2.0 + 0.1 * k as f32]))
        .collect()
}

fn actions(agent: &mut dyn Agent, env: &mut dyn Env, obs: &[Value]) -> Vec<Value> {
    obs.iter().map(|o| agent.act(env, o).unwrap()).collect()
}

#[test]
fn checkpoints_reload_to_identical_actions() {
    let mut env = PointMass::boxed();
    let spec = NetSpec::for_env(env.as_ref()).unwrap();
    let mut agent = PpoAgent::new(spec.clone(), PpoConfig::default(), 5).unwrap();
    agent
        .train_envs(envs(PointMass::boxed, 8), 4096, 5, &mut |_| {})
        .unwrap();
    let obs = line_obs();
    let want = actions(&mut agent, env.as_mut(), &obs);
    for name in ["ppo.safetensors", "ppo.ot"] {
        let path = tmp(name);
        agent.save(&path).unwrap();
        let mut back = PpoAgent::load(&path).unwrap();
        assert_eq!(back.config(), agent.config());
        assert_eq!(actions(&mut back, env.as_mut(), &obs), want, "{name}");
    }
    // An untrained agent acts differently, so the comparison above can fail.
    let mut fresh = PpoAgent::new(spec.clone(), PpoConfig::default(), 5).unwrap();
    assert_ne!(actions(&mut fresh, env.as_mut(), &obs), want);
    // REINFORCE too; and a PPO checkpoint is not a REINFORCE one.
    let mut rf = ReinforceAgent::new(spec, ReinforceConfig::default(), 6).unwrap();
    rf.train_envs(envs(PointMass::boxed, 8), 2048, 6, &mut |_| {})
        .unwrap();
    let path = tmp("rf.safetensors");
    rf.save(&path).unwrap();
    let mut back = ReinforceAgent::load(&path).unwrap();
    let w = actions(&mut rf, env.as_mut(), &obs);
    assert_eq!(actions(&mut back, env.as_mut(), &obs), w);
    let e = PpoAgent::load(&path).unwrap_err().to_string();
    assert!(e.contains("reinforce"), "{e}");
    assert!(PpoAgent::load(tmp("missing.ot")).is_err());
}

#[test]
fn training_is_deterministic_per_seed() {
    let run = |seed: u64| {
        let env = Corridor::boxed();
        let mut a = PpoAgent::new(
            NetSpec::for_env(env.as_ref()).unwrap(),
            PpoConfig::default(),
            seed,
        )
        .unwrap();
        let c = a
            .train_envs(envs(Corridor::boxed, 8), 3 * 1024, seed, &mut |_| {})
            .unwrap();
        let w: Vec<f32> =
            Vec::<f32>::try_from(&a.net().vs.trainable_variables()[0].flatten(0, -1)).unwrap();
        (c, w)
    };
    let (a, b, c) = (run(9), run(9), run(10));
    assert_eq!(a, b);
    assert_ne!(a.1, c.1);
}

#[test]
fn exported_torchscript_policies_act_like_the_agents() {
    for (make, name) in [
        (PointMass::boxed as fn() -> Box<dyn Env>, "point.pt"),
        (Corridor::boxed, "corridor.pt"),
    ] {
        let mut env = make();
        let mut agent = PpoAgent::new(
            NetSpec::for_env(env.as_ref()).unwrap(),
            PpoConfig::default(),
            7,
        )
        .unwrap();
        agent
            .train_envs(envs(make, 8), 4096, 7, &mut |_| {})
            .unwrap();
        let path = tmp(name);
        agent.export_torchscript(&path).unwrap();
        let cfg: toml::Value =
            toml::from_str(&format!("policy = {:?}", path.display().to_string())).unwrap();
        let mut ts = crate::registry::make("torchscript", env.as_ref(), Some(&cfg), 0).unwrap();
        let obs: Vec<Value> = if name == "corridor.pt" {
            (0..9).map(|k| Value::Box(vec![k as f32])).collect()
        } else {
            line_obs()
        };
        let want = actions(&mut agent, env.as_mut(), &obs);
        assert_eq!(actions(ts.as_mut(), env.as_mut(), &obs), want, "{name}");
        let a = run_episode(env.as_mut(), ts.as_mut(), 3).unwrap();
        let b = run_episode(env.as_mut(), &mut agent, 3).unwrap();
        assert_eq!(a, b, "{name}");
    }
    let bad: toml::Value = toml::from_str("policy = \"/nonexistent/p.pt\"").unwrap();
    let env = PointMass::boxed();
    assert!(crate::registry::make("torchscript", env.as_ref(), Some(&bad), 0).is_err());
    let e = crate::registry::make("torchscript", env.as_ref(), None, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("policy"), "{e}");
}

#[test]
fn a_policy_scripted_in_python_runs_in_rust() {
    // A steering rule written in PyTorch and compiled with torch.jit.script: beam offset
    // toward the goal, tanh(−3 · (dopant − goal)) (normalized observation), shortest dwell.
    let python = std::env::var("SCOPEGYM_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| "python3".into());
    let path = tmp("py_policy.pt");
    let script = r#"
import sys, torch
class Steer(torch.nn.Module):
    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(-3.0 * obs[:, 0:2])
        dwell = torch.full((obs.shape[0], 1), -0.5)
        return torch.cat([x, dwell], dim=1)
torch.jit.script(Steer()).save(sys.argv[1])
"#;
    let has_torch = std::process::Command::new(&python)
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_torch {
        println!("skipped: {python} has no PyTorch");
        return;
    }
    // TorchScript compiles from source files, so the script goes into one.
    let file = tmp("py_policy.py");
    std::fs::write(&file, script).unwrap();
    let out = std::process::Command::new(&python)
        .args([file.display().to_string(), path.display().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripting failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = "scopegym/StemDopantSteer-v1";
    let mut env = scopegym_envs::registry::make(id, None).unwrap();
    let cfg: toml::Value =
        toml::from_str(&format!("policy = {:?}", path.display().to_string())).unwrap();
    let mut agent = crate::registry::make("torchscript", env.as_ref(), Some(&cfg), 0).unwrap();
    let layout = ObsLayout::new(env.observation_space()).unwrap();
    for seed in 0..3 {
        let (obs, _) = env.reset(Some(seed)).unwrap();
        let mut x = vec![0.0; layout.len];
        layout.normalize_into(&obs, &mut x).unwrap();
        let a = agent.act(env.as_mut(), &obs).unwrap();
        let want = [(-3.0 * x[0]).tanh(), (-3.0 * x[1]).tanh(), -0.5];
        let got = a.as_box().unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "seed {seed}: {got:?} vs {want:?}");
        }
        let rec = run_episode(env.as_mut(), agent.as_mut(), seed).unwrap();
        println!(
            "python policy, seed {seed}: return {:.3} in {} steps",
            rec.ret, rec.steps
        );
        assert!(rec.steps >= 1 && rec.ret.is_finite());
    }
}

#[test]
fn configs_are_validated_naming_the_field() {
    let env = PointMass::boxed();
    for (text, field) in [
        ("num_envs = 0", "num_envs"),
        ("learning_rate = -1.0", "learning_rate"),
        ("gamma = 1.5", "gamma"),
        ("nope = 1", "nope"),
        ("num_minibatches = 0", "num_minibatches"),
    ] {
        let c: toml::Value = toml::from_str(text).unwrap();
        let e = crate::registry::make("ppo", env.as_ref(), Some(&c), 0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(field), "{text}: {e}");
    }
    let c: toml::Value = toml::from_str("batch_steps = 0").unwrap();
    let e = crate::registry::make("reinforce", env.as_ref(), Some(&c), 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("batch_steps"), "{e}");
    assert!(crate::registry::make("ppo", env.as_ref(), None, 0).is_ok());
}

#[test]
fn layouts_cover_every_task() {
    // Every registered task gets a network: images through CNNs, the explore tasks' 3-D
    // patch stacks skipped; a forward pass gives finite outputs of the right shape.
    for spec in scopegym_envs::registry::TASKS {
        let env = scopegym_envs::registry::make(spec.id, None).unwrap();
        let ns = NetSpec::for_env(env.as_ref()).unwrap();
        let kinds: Vec<String> = ns
            .obs
            .parts
            .iter()
            .map(|(k, p)| match p {
                net::Part::Vector { len, .. } => format!("{k}:vec{len}"),
                net::Part::Image { height, width, .. } => format!("{k}:img{height}x{width}"),
                net::Part::Skipped { len, .. } => format!("{k}:skip{len}"),
            })
            .collect();
        println!("{}: {}", spec.id, kinds.join(" "));
        let mut agent = PpoAgent::new(ns.clone(), PpoConfig::default(), 0).unwrap();
        let mut env = env;
        let (obs, _) = env.reset(Some(0)).unwrap();
        let a = agent.act(env.as_mut(), &obs).unwrap();
        assert!(env.action_space().contains(&a), "{}: {a:?}", spec.id);
        assert!(ns.obs.scale.iter().all(|s| s.is_finite()));
    }
}

#[test]
fn ppo_and_reinforce_train_through_the_cnn_on_an_image_task() {
    // One short PPO iteration and one REINFORCE update on SpmTipConditioning (32 × 32 image,
    // Discrete actions): the CNN's weights change and stay finite.
    let id = "scopegym/SpmTipConditioning-v2";
    let env = scopegym_envs::registry::make(id, None).unwrap();
    let ns = NetSpec::for_env(env.as_ref()).unwrap();
    let cfg = PpoConfig {
        num_envs: 2,
        num_steps: 8,
        ..PpoConfig::default()
    };
    let mut agent = PpoAgent::new(ns.clone(), cfg, 0).unwrap();
    let cnn_w = |vs: &tch::nn::VarStore| -> Vec<f32> {
        let v = vs.variables();
        Vec::<f32>::try_from(&v["cnn0.c1.weight"].flatten(0, -1)).unwrap()
    };
    let before = cnn_w(&agent.net().vs);
    let spec = TrainSpec {
        env_id: id,
        env_config: None,
        steps: 16,
        seed: 0,
    };
    agent.train(&spec, &mut |_| {}).unwrap();
    let after = cnn_w(&agent.net().vs);
    assert_ne!(before, after);
    assert!(after.iter().all(|v| v.is_finite()));
    let rcfg = ReinforceConfig {
        num_envs: 2,
        batch_steps: 1,
        ..ReinforceConfig::default()
    };
    let mut rf = ReinforceAgent::new(ns, rcfg, 0).unwrap();
    let before = cnn_w(&rf.net().vs);
    let max = env.max_episode_steps() as u64;
    rf.train(
        &TrainSpec {
            steps: 2 * max + 2,
            ..spec
        },
        &mut |_| {},
    )
    .unwrap();
    assert_ne!(before, cnn_w(&rf.net().vs));
}

#[test]
#[ignore = "diagnostics of StemDopantSteer-v1's scripted policies: --run-ignored only"]
fn explore_dopant_scripted() {
    use rand::Rng;
    let id = "scopegym/StemDopantSteer-v1";
    let test: toml::Value = toml::from_str("split = \"test\"").unwrap();
    let mut env = scopegym_envs::registry::make(id, Some(&test)).unwrap();
    let dw = |t: f64| (2.0 * (t / 0.1f64).ln() / 50f64.ln() - 1.0) as f32;
    type Pol<'a> = Box<dyn FnMut(&mut dyn Env, &[f32], &mut SimRng) -> Vec<f32> + 'a>;
    let heur = |dwell: f64, noise: f32| -> Pol<'static> {
        Box::new(move |e: &mut dyn Env, o: &[f32], r: &mut SimRng| {
            let h = e.heuristic_action(&Value::Box(o.to_vec()));
            let mut a = h.as_box().unwrap().to_vec();
            for x in &mut a[..2] {
                let n: f32 = r.sample(rand_distr::StandardNormal);
                *x = (*x + noise * n).clamp(-1.0, 1.0);
            }
            a[2] = dw(dwell);
            a
        })
    };
    let goal_dir = |dwell: f64| -> Pol<'static> {
        Box::new(move |_e: &mut dyn Env, o: &[f32], _r: &mut SimRng| {
            let l = o[0].hypot(o[1]).max(1e-6);
            vec![-0.71 * o[0] / l, -0.71 * o[1] / l, dw(dwell)]
        })
    };
    let random_off = |dwell: f64| -> Pol<'static> {
        Box::new(move |_e: &mut dyn Env, _o: &[f32], r: &mut SimRng| {
            vec![
                r.random_range(-1.0..1.0),
                r.random_range(-1.0..1.0),
                dw(dwell),
            ]
        })
    };
    let mut pols: Vec<(String, Pol)> = Vec::new();
    for d in [0.1, 0.3, 1.0, 2.0, 5.0] {
        pols.push((format!("heuristic dwell {d}"), heur(d, 0.0)));
    }
    for n in [0.2, 0.5, 1.0] {
        pols.push((format!("heuristic+noise {n} dwell 2"), heur(2.0, n)));
    }
    for d in [0.3, 1.0, 2.0] {
        pols.push((format!("goal direction dwell {d}"), goal_dir(d)));
        pols.push((format!("random offset dwell {d}"), random_off(d)));
    }
    for (name, mut p) in pols {
        let (mut ret, mut succ, mut len, mut lost) = (0.0, 0, 0, 0);
        let mut rng = seeded(11);
        for seed in 0..30 {
            let (mut obs, _) = env.reset(Some(seed)).unwrap();
            loop {
                let o = obs.as_box().unwrap().to_vec();
                let a = p(env.as_mut(), &o, &mut rng);
                let s = env.step(&Value::Box(a)).unwrap();
                ret += s.reward;
                len += 1;
                obs = s.obs;
                if s.terminated || s.truncated {
                    if s.info.get("is_success") == Some(&scopegym_envs::InfoValue::Bool(true)) {
                        succ += 1;
                    }
                    if s.info.get("measured_lost") == Some(&scopegym_envs::InfoValue::Bool(true)) {
                        lost += 1;
                    }
                    break;
                }
            }
        }
        println!(
            "{name:>32}: return {:.3}, success {:.2}, lost {:.2}, length {:.1}",
            ret / 30.0,
            succ as f64 / 30.0,
            lost as f64 / 30.0,
            len as f64 / 30.0
        );
    }
}

#[test]
#[ignore = "diagnostics: reset failures of StemDopantSteer-v1 over many seeds"]
fn explore_dopant_resets() {
    let id = "scopegym/StemDopantSteer-v1";
    let train: toml::Value = toml::from_str("split = \"train\"").unwrap();
    let mut env = scopegym_envs::registry::make(id, Some(&train)).unwrap();
    let mut bad = Vec::new();
    for seed in 0..20_000u64 {
        if let Err(e) = env.reset(Some(seed)) {
            bad.push((seed, e.to_string()));
        }
    }
    println!(
        "{} of 20000 resets failed: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

/// The operator's view of a policy ([`Agent::insight`]): on the discrete corridor the action
/// probabilities sum to 1 and the deterministic action is their argmax; on the continuous
/// point mass the deterministic action is the Gaussian mean clipped, the sd its exp(log std);
/// the value is the critic's forward on the same observation; a TorchScript export gives the
/// same probabilities and no value.
#[test]
fn insight_shows_the_action_distribution_and_the_critics_value() {
    let critic = |net: &ActorCritic, obs: &Value| -> f64 {
        let mut x = vec![0.0; net.spec.obs.len];
        net.spec.obs.normalize_into(obs, &mut x).unwrap();
        let t = tch::Tensor::from_slice(&x).view([1, x.len() as i64]);
        f64::from(common::to_vec(&tch::no_grad(|| net.value(&t))).unwrap()[0])
    };
    // Discrete: after one short training iteration, probabilities are no longer uniform.
    let mut env = Corridor::boxed();
    let mut agent = PpoAgent::new(
        NetSpec::for_env(env.as_ref()).unwrap(),
        PpoConfig::default(),
        3,
    )
    .unwrap();
    agent
        .train_envs(envs(Corridor::boxed, 8), 2048, 3, &mut |_| {})
        .unwrap();
    assert!(
        agent.insight().unwrap().value.is_none(),
        "nothing acted on yet"
    );
    let path = tmp("insight.pt");
    agent.export_torchscript(&path).unwrap();
    let cfg: toml::Value =
        toml::from_str(&format!("policy = {:?}", path.display().to_string())).unwrap();
    let mut ts = crate::registry::make("torchscript", env.as_ref(), Some(&cfg), 0).unwrap();
    let mut spread = 0.0f64;
    for k in 0..9 {
        let obs = Value::Box(vec![k as f32]);
        let a = agent
            .act(env.as_mut(), &obs)
            .unwrap()
            .as_discrete()
            .unwrap();
        let ins = agent.insight().unwrap();
        let p = &ins.action_probs;
        assert_eq!(p.len(), 3);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{p:?}");
        assert!(p.iter().all(|&v| v > 0.0));
        let best = (0..3).max_by(|&i, &j| p[i].total_cmp(&p[j])).unwrap();
        assert_eq!(a as usize, best, "cell {k}: {p:?}");
        let v = ins.value.unwrap();
        assert!(
            (v - critic(agent.net(), &obs)).abs() < 1e-6,
            "cell {k}: {v}"
        );
        assert!(ins.action_mean.is_empty() && ins.action_sd.is_empty());
        spread = spread.max(p[best] - 1.0 / 3.0);
        ts.act(env.as_mut(), &obs).unwrap();
        let t = ts.insight().unwrap();
        assert!(t.value.is_none());
        for (x, y) in t.action_probs.iter().zip(p) {
            assert!((x - y).abs() < 1e-5, "{:?} vs {p:?}", t.action_probs);
        }
    }
    println!("corridor: largest excess of the top probability over 1/3: {spread:.4}");
    assert!(spread > 0.01, "training moved no probability ({spread})");

    // Box: the deterministic action is the mean clipped into [-1, 1].
    let mut env = PointMass::boxed();
    let mut agent = PpoAgent::new(
        NetSpec::for_env(env.as_ref()).unwrap(),
        PpoConfig::default(),
        4,
    )
    .unwrap();
    agent
        .train_envs(envs(PointMass::boxed, 8), 1024, 4, &mut |_| {})
        .unwrap();
    let sd = agent.net().log_std().unwrap().double_value(&[0]).exp();
    for obs in line_obs() {
        let a = agent.act(env.as_mut(), &obs).unwrap();
        let ins = agent.insight().unwrap();
        assert_eq!(ins.action_mean.len(), 1);
        assert!(ins.action_probs.is_empty());
        assert_eq!(ins.action_bounds, [[-1.0, 1.0]]);
        let mean = ins.action_mean[0];
        assert_eq!(f64::from(a.as_box().unwrap()[0]), mean.clamp(-1.0, 1.0));
        assert!((ins.action_sd[0] - sd).abs() < 1e-6 * sd);
        let v = ins.value.unwrap();
        assert!((v - critic(agent.net(), &obs)).abs() < 1e-6, "{v}");
    }
    // REINFORCE has a critic too.
    let mut rf = ReinforceAgent::new(
        NetSpec::for_env(env.as_ref()).unwrap(),
        ReinforceConfig::default(),
        5,
    )
    .unwrap();
    let obs = Value::Box(vec![0.7]);
    rf.act(env.as_mut(), &obs).unwrap();
    let v = rf.insight().unwrap().value.unwrap();
    assert!((v - critic(rf.net(), &obs)).abs() < 1e-6);
}
