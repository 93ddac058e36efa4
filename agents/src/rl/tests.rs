//! Tests of the RL agents: control checks on tiny envs written here, StemDopantSteer against
//! the floors, checkpoints, TorchScript export and a policy scripted in Python.

use super::*;
use crate::agent::{Agent, run_episode};
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
    assert!(rf >= random + 0.5 && rf >= 0.3, "reinforce {rf:.3}, random {random:.3}");
}
