//! The [`Agent`] trait every baseline implements, and [`run_episode`], which plays one episode
//! of an agent on an environment and records what a benchmark reports.
//!
//! An agent sees only what the environment returns: observations, rewards and the flags.
//! Ground truth in `info` (`is_success`, `regret`, ...) is recorded by the harness for scoring
//! and never handed to [`Agent::act`]; [`Agent::observe`] gets the step without its `info`.

use crate::error::Result;
use scopegym_envs::{Env, InfoValue, Value};

/// What a learning agent trains on.
#[derive(Debug, Clone)]
pub struct TrainSpec<'a> {
    /// The task id.
    pub env_id: &'a str,
    /// The task config (TOML table) training uses, with its `difficulty` and `split` (the
    /// harness sets `split = "train"`).
    pub env_config: Option<&'a toml::Value>,
    /// Environment steps to train for.
    pub steps: u64,
    /// Seed of the agent (network initialization, exploration) and of the training envs.
    pub seed: u64,
}

/// One point of a learning curve.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CurvePoint {
    /// Environment steps done so far.
    pub step: u64,
    /// Mean undiscounted return of the episodes that ended since the previous point.
    pub value: f64,
}

/// A baseline agent.
///
/// The harness calls, per seed: [`Agent::train`] once (learning agents train; the others do
/// nothing), then per evaluation episode [`Agent::begin_episode`], and [`Agent::act`] and
/// [`Agent::observe`] at every step.
pub trait Agent: Send {
    /// The name, as `scopegym run --agent` spells it.
    fn name(&self) -> &str;

    /// The settings the agent runs with, every default filled in (what `results.json` records
    /// as the resolved agent config); `null` for agents without settings.
    fn config(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Trains (reinforcement-learning agents) and returns the learning curve. `progress` is
    /// called with the environment steps done so far. The default trains nothing.
    fn train(
        &mut self,
        spec: &TrainSpec<'_>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<CurvePoint>> {
        let _ = (spec, progress);
        Ok(Vec::new())
    }

    /// Starts an episode whose first observation is `obs`; `seed` is the episode's seed.
    fn begin_episode(&mut self, env: &dyn Env, obs: &Value, seed: u64) -> Result<()>;

    /// The action for `obs`. `env` is handed over for the task's heuristic
    /// ([`Env::heuristic_action`], which reads the observation only) and the spaces.
    fn act(&mut self, env: &mut dyn Env, obs: &Value) -> Result<Value>;

    /// The outcome of the last action: its reward and the next observation.
    fn observe(&mut self, action: &Value, reward: f64, next_obs: &Value) -> Result<()> {
        let _ = (action, reward, next_obs);
        Ok(())
    }

    /// Saves what the agent learned into the folder `dir` (a checkpoint that
    /// [`crate::registry::load`] reads back, and a TorchScript export where the agent has a
    /// network) and returns the files written. The default (agents that learn nothing across
    /// episodes) writes nothing.
    fn save(&self, dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
        let _ = dir;
        Ok(Vec::new())
    }
}

/// What one episode gave.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpisodeRecord {
    /// The episode's seed.
    pub seed: u64,
    /// Undiscounted return.
    pub ret: f64,
    /// `info["is_success"]` of the last step.
    pub success: bool,
    /// Steps taken.
    pub steps: usize,
    /// The reward of every step.
    pub rewards: Vec<f64>,
    /// `info["regret"]` of every step, where the task reports it (the explore tasks); empty
    /// otherwise.
    pub regret: Vec<f64>,
}

/// Plays one episode of `agent` on `env` from `seed`.
pub fn run_episode(env: &mut dyn Env, agent: &mut dyn Agent, seed: u64) -> Result<EpisodeRecord> {
    let (mut obs, _) = env.reset(Some(seed))?;
    agent.begin_episode(env, &obs, seed)?;
    let mut rec = EpisodeRecord {
        seed,
        ret: 0.0,
        success: false,
        steps: 0,
        rewards: Vec::new(),
        regret: Vec::new(),
    };
    loop {
        let action = agent.act(env, &obs)?;
        let s = env.step(&action)?;
        agent.observe(&action, s.reward, &s.obs)?;
        rec.ret += s.reward;
        rec.steps += 1;
        rec.rewards.push(s.reward);
        if let Some(InfoValue::F64(r)) = s.info.get("regret") {
            rec.regret.push(*r);
        }
        obs = s.obs;
        if s.terminated || s.truncated {
            rec.success = s.info.get("is_success") == Some(&InfoValue::Bool(true));
            return Ok(rec);
        }
    }
}
