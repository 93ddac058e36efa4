//! [`TorchScriptAgent`]: runs any TorchScript policy (`--agent torchscript`, config
//! `policy = "file.pt"`).
//!
//! The module's contract: `forward(obs)` with `obs` a float32 tensor `[1, obs_len]`, the
//! observation flattened in the space's order (Dict: keys in order) and, with `normalize =
//! true` (the default), normalized by the Box bounds into `[-1, 1]` as [`crate::rl`]
//! describes; it returns a tensor whose elements are
//!
//! - for a Discrete action space of `n` values: `n` logits (or scores; the largest wins), or
//!   one number, the index from 0 (rounded and clipped into range);
//! - for a Box action space: the action (clipped into the bounds).
//!
//! Policies exported by [`super::PpoAgent::export_torchscript`] follow it (logits, or the
//! Gaussian mean).

use super::net::{ActionKind, ObsLayout, argmax};
use crate::agent::Agent;
use crate::error::{AgentError, Result};
use scopegym_envs::{Env, Value};
use serde::{Deserialize, Serialize};
use tch::{CModule, Tensor};

/// The TorchScript agent's settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TorchScriptConfig {
    /// The TorchScript file (`torch.jit.save`). Required.
    pub policy: String,
    /// Feed observations raw (false) instead of normalized into `[-1, 1]`. Default: normalized.
    pub raw_observations: bool,
}

/// Runs a TorchScript policy.
#[derive(Debug)]
pub struct TorchScriptAgent {
    module: CModule,
    layout: ObsLayout,
    action: ActionKind,
    raw: bool,
    buf: Vec<f32>,
    cfg: TorchScriptConfig,
    /// The module's output for the observation acted on last.
    last: Vec<f32>,
}

impl TorchScriptAgent {
    /// Loads `cfg.policy` for `env`'s spaces.
    pub fn new(env: &dyn Env, cfg: &TorchScriptConfig) -> Result<Self> {
        if cfg.policy.is_empty() {
            return Err(AgentError::config(
                "policy",
                "the TorchScript file is required",
            ));
        }
        tch::set_num_threads(1);
        let module = CModule::load(&cfg.policy).map_err(|e| AgentError::Io {
            path: cfg.policy.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            module,
            layout: ObsLayout::new(env.observation_space())?,
            action: ActionKind::new(env.action_space())?,
            raw: cfg.raw_observations,
            buf: Vec::new(),
            cfg: cfg.clone(),
            last: Vec::new(),
        })
    }

    /// From a TOML config.
    pub fn from_toml(env: &dyn Env, config: Option<&toml::Value>) -> Result<Self> {
        Self::new(env, &super::parse_config(config)?)
    }

    /// The module's raw output for `obs`.
    pub fn forward(&mut self, obs: &Value) -> Result<Vec<f32>> {
        self.buf.resize(self.layout.len, 0.0);
        let n = scopegym_envs::vector::flatten_into(obs, &mut self.buf);
        if n != self.layout.len {
            return Err(AgentError::arg("obs", "observation does not fit the space"));
        }
        if !self.raw {
            self.layout.normalize_in_place(&mut self.buf);
        }
        let x = Tensor::from_slice(&self.buf).view([1, self.layout.len as i64]);
        let y = tch::no_grad(|| self.module.forward_ts(&[x]))?;
        super::common::to_vec(&y)
    }
}

impl Agent for TorchScriptAgent {
    fn name(&self) -> &str {
        "torchscript"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).unwrap_or_default()
    }

    fn begin_episode(&mut self, _env: &dyn Env, _obs: &Value, _seed: u64) -> Result<()> {
        self.last.clear();
        Ok(())
    }

    /// What the module gave for the observation [`Agent::act`] saw last: on a Discrete space
    /// with one output per action, their softmax (the outputs read as logits, as a policy
    /// exported by PPO gives them); on a Box space, the action it gave (`action_mean`,
    /// unclipped, no spread). No value: the module has no critic.
    fn insight(&self) -> Option<crate::agent::Insight> {
        let mut ins = crate::agent::Insight::default();
        match &self.action {
            ActionKind::Discrete { n, .. } if self.last.len() == *n as usize && *n > 1 => {
                ins.action_probs = super::common::softmax(&self.last);
            }
            ActionKind::Gaussian { low, high } if self.last.len() == low.len() => {
                ins.action_mean = self.last.iter().map(|&v| f64::from(v)).collect();
                ins.action_bounds = low
                    .iter()
                    .zip(high)
                    .map(|(&l, &h)| [f64::from(l), f64::from(h)])
                    .collect();
            }
            _ => {}
        }
        Some(ins)
    }

    fn act(&mut self, _env: &mut dyn Env, obs: &Value) -> Result<Value> {
        self.last.clear();
        let y = self.forward(obs)?;
        if y.iter().any(|v| v.is_nan()) {
            return Err(AgentError::numerical("torchscript policy", "NaN output"));
        }
        self.last.clone_from(&y);
        match &self.action {
            ActionKind::Discrete { n, start } => {
                let k = if y.len() == *n as usize && *n > 1 {
                    argmax(&y) as i64
                } else if y.len() == 1 {
                    (y[0].round() as i64).clamp(0, n - 1)
                } else {
                    return Err(AgentError::arg(
                        "policy",
                        format!(
                            "output has {} elements; expected {n} logits or 1 index",
                            y.len()
                        ),
                    ));
                };
                Ok(Value::Discrete(k + start))
            }
            ActionKind::Gaussian { low, .. } => {
                if y.len() != low.len() {
                    return Err(AgentError::arg(
                        "policy",
                        format!("output has {} elements; expected {}", y.len(), low.len()),
                    ));
                }
                Ok(self.action.to_value(&y))
            }
        }
    }
}
