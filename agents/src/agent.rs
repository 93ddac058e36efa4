//! The [`Agent`] trait every baseline implements, and [`run_episode`], which plays one episode
//! of an agent on an environment and records what a benchmark reports.
//!
//! An agent sees only what the environment returns: observations, rewards and the flags.
//! Ground truth in `info` (`is_success`, `regret`, ...) is recorded by the harness for scoring
//! and never handed to [`Agent::act`]; [`Agent::observe`] gets the step without its `info`.

use crate::error::{AgentError, Result};
use scopegym_envs::{Env, InfoValue, Value};
use serde::{Deserialize, Serialize};

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

/// What an agent shows an operator about its next choice (the `scopegym serve` dashboard).
/// Built from what the agent knows (observations and rewards), never from ground truth.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Insight {
    /// The proposed point as fractions (row, column) of the task's grid, which spans the
    /// frame, where the action is a grid cell (cell centres: `(i + 0.5) / g`).
    pub point: Option<[f64; 2]>,
    /// Posterior and acquisition maps over the candidate grid (BO and DKL grid agents).
    pub maps: Option<GridMaps>,
    /// The embedding of the measured points, `[e₀, e₁, measured value]` (DKL: the network's
    /// features of each measured point's input, projected to 2-D; the value in the units the
    /// observation reports it), one row per measured point.
    pub scatter: Vec<[f64; 3]>,
    /// What the two embedding axes of `scatter` are (e.g. `["z0", "z1"]`, `["PC1", "PC2"]`);
    /// empty without a scatter.
    pub scatter_axes: Vec<String>,
    /// The probabilities of the actions of a Discrete action space (RL agents: the softmax of
    /// the policy's logits for the observation [`Agent::act`] saw last); entry `i` is action
    /// `start + i`. Empty otherwise.
    pub action_probs: Vec<f64>,
    /// The mean of a Gaussian policy on a Box action space, per action component, in the
    /// action's own units (unclipped; the deterministic action is this mean clipped into the
    /// bounds). Empty otherwise.
    pub action_mean: Vec<f64>,
    /// The standard deviation of the Gaussian policy, per action component, in the action's
    /// units (empty where the policy has none, e.g. a TorchScript policy).
    pub action_sd: Vec<f64>,
    /// The bounds `[low, high]` of each Box action component (for drawing `action_mean`).
    pub action_bounds: Vec<[f64; 2]>,
    /// The critic's value estimate `V(obs)` of the observation [`Agent::act`] saw last, in
    /// units of the task's reward (a discounted return); `None` without a critic.
    pub value: Option<f64>,
    /// The settings [`Agent::set_control`] takes, with their current values.
    pub controls: serde_json::Value,
}

/// Maps over a `rows × cols` grid of candidates, row-major; non-finite entries (a cell that is
/// measured, vetoed or off-limits for the acquisition) serialize as `null`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GridMaps {
    /// Grid rows.
    pub rows: usize,
    /// Grid columns.
    pub cols: usize,
    /// The posterior mean of the modelled quantity, in its units.
    pub mean: Vec<f64>,
    /// The posterior standard deviation, in the same units.
    pub sd: Vec<f64>,
    /// The acquisition score (−∞, `null` in JSON, where the cell may not be chosen).
    pub acquisition: Vec<f64>,
    /// The cells the operator vetoed or marked off-limits.
    pub forbidden: Vec<bool>,
}

/// A rectangle of grid cells, both ends included (cell indices, row `rows[0]..=rows[1]`,
/// column `cols[0]..=cols[1]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// First and last row.
    pub rows: [usize; 2],
    /// First and last column.
    pub cols: [usize; 2],
}

impl Region {
    /// The cells (row-major indices `r · g + c`) of the region on a `g × g` grid; an error
    /// naming `off_limits.rows` or `off_limits.cols` where the region is not on the grid.
    pub fn cells(&self, g: usize) -> Result<Vec<usize>> {
        for (field, [a, b]) in [
            ("off_limits.rows", self.rows),
            ("off_limits.cols", self.cols),
        ] {
            if a > b || b >= g {
                return Err(AgentError::arg(
                    field,
                    format!("[{a}, {b}] must be first ≤ last < {g}"),
                ));
            }
        }
        Ok((self.rows[0]..=self.rows[1])
            .flat_map(|r| (self.cols[0]..=self.cols[1]).map(move |c| r * g + c))
            .collect())
    }
}

/// An operator's change of an acquisition setting ([`Agent::set_control`] of the grid agents):
/// `acquisition` (a name [`crate::acquisition::Acquisition::parse`] takes; `ucb` keeps the
/// current β), `beta` (UCB's β ≥ 0; switches to UCB) or `xi` (ξ of EI, LogEI, PI). Returns the
/// new `(acquisition, ξ)` for the agent's own validation; errors name the control (`known`
/// lists the acquisition names the agent takes).
pub fn acquisition_control(
    agent: &str,
    name: &str,
    value: &serde_json::Value,
    (acquisition, xi): (crate::acquisition::Acquisition, f64),
    known: &str,
) -> Result<(crate::acquisition::Acquisition, f64)> {
    use crate::acquisition::Acquisition;
    match name {
        "acquisition" => {
            let s = value
                .as_str()
                .ok_or_else(|| AgentError::config("acquisition", "must be a name (string)"))?;
            let a = Acquisition::parse(s).ok_or_else(|| {
                AgentError::config("acquisition", format!("unknown {s:?}; known: {known}"))
            })?;
            let a = match (a, acquisition) {
                (Acquisition::Ucb { .. }, Acquisition::Ucb { beta }) => Acquisition::Ucb { beta },
                (a, _) => a,
            };
            Ok((a, xi))
        }
        "beta" => {
            let beta = value
                .as_f64()
                .ok_or_else(|| AgentError::config("beta", "must be a number"))?;
            if !(beta.is_finite() && beta >= 0.0) {
                return Err(AgentError::config("beta", "must be finite and >= 0"));
            }
            Ok((Acquisition::Ucb { beta }, xi))
        }
        "xi" => {
            let xi = value
                .as_f64()
                .ok_or_else(|| AgentError::config("xi", "must be a number"))?;
            Ok((acquisition, xi))
        }
        _ => Err(AgentError::config(
            name,
            format!("the {agent} agent has no control {name:?}; it has acquisition, beta, xi"),
        )),
    }
}

/// The acquisition settings a grid agent shows the operator ([`Insight::controls`]):
/// `{"acquisition": name, "xi": ξ}`, plus `"beta"` for UCB. The names are the ones
/// [`acquisition_control`] takes back.
pub fn acquisition_controls(
    acquisition: crate::acquisition::Acquisition,
    xi: f64,
) -> serde_json::Value {
    let mut controls = serde_json::json!({ "acquisition": acquisition.name(), "xi": xi });
    if let crate::acquisition::Acquisition::Ucb { beta } = acquisition {
        controls["beta"] = serde_json::json!(beta);
    }
    controls
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

    /// What the agent shows an operator about the action [`Agent::act`] returned last. The
    /// default shows nothing.
    fn insight(&self) -> Option<Insight> {
        None
    }

    /// Changes a setting mid-run (an operator's intervention: the acquisition function, β,
    /// ξ, ...). The default has none; an unknown name or a bad value is an error naming it.
    fn set_control(&mut self, name: &str, value: &serde_json::Value) -> Result<()> {
        let _ = value;
        Err(AgentError::config(
            name,
            format!("the {} agent has no control {name:?}", self.name()),
        ))
    }

    /// Vetoes `action`, the action [`Agent::act`] returned last: the agent must not propose
    /// it again (the harness then calls [`Agent::act`] again for the same observation). The
    /// default cannot take a veto.
    fn veto(&mut self, action: &Value) -> Result<()> {
        let _ = action;
        Err(AgentError::arg(
            "veto",
            format!("the {} agent cannot take a veto", self.name()),
        ))
    }

    /// Marks the grid cells of `region` off-limits: the agent must not propose them. The
    /// default has no grid.
    fn forbid(&mut self, region: &Region) -> Result<()> {
        let _ = region;
        Err(AgentError::arg(
            "off_limits",
            format!("the {} agent does not choose grid cells", self.name()),
        ))
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
