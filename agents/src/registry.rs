//! The agents by name, as `scopegym run --agent` takes them: one line each.
//!
//! ```
//! use scopegym_agents::registry;
//! let env = scopegym_envs::registry::make("scopegym/StemSparseScan-v2", None).unwrap();
//! let agent = registry::make("raster", env.as_ref(), None, 0).unwrap();
//! assert_eq!(agent.name(), "raster");
//! assert!(registry::make("nope", env.as_ref(), None, 0).is_err());
//! ```

use crate::agent::Agent;
use crate::bo_agent::BoAgent;
use crate::error::{AgentError, Result};
use crate::floors::{HeuristicAgent, RandomAgent, RasterAgent};
use scopegym_envs::Env;

/// Builds an agent for `env` from its config (TOML table; `None` for the defaults) and seed.
pub type MakeAgentFn = fn(&dyn Env, Option<&toml::Value>, u64) -> Result<Box<dyn Agent>>;

/// A registered agent.
#[derive(Debug, Clone, Copy)]
pub struct AgentSpec {
    /// The name, as `--agent` spells it.
    pub name: &'static str,
    /// One line on what it does.
    pub description: &'static str,
    /// Whether it learns across episodes before evaluation ([`Agent::train`]).
    pub learns: bool,
    /// Builds it.
    pub make: MakeAgentFn,
}

fn no_config(name: &str, config: Option<&toml::Value>) -> Result<()> {
    match config {
        Some(toml::Value::Table(t)) if !t.is_empty() => Err(AgentError::config(
            t.keys().next().map(String::as_str).unwrap_or(""),
            format!("the {name} agent takes no settings"),
        )),
        _ => Ok(()),
    }
}

/// The error of a neural agent in a build without the `torch` feature.
#[cfg(not(feature = "torch"))]
fn missing_torch(agent: &str) -> AgentError {
    AgentError::MissingFeature {
        agent: agent.into(),
        feature: "torch".into(),
    }
}

/// Every agent, one line each.
#[rustfmt::skip]
pub const AGENTS: &[AgentSpec] = &[
    AgentSpec { name: "random", description: "uniform random actions", learns: false, make: |_, c, _| { no_config("random", c)?; Ok(Box::new(RandomAgent::default())) } },
    AgentSpec { name: "raster", description: "raster (grid) sampling of the action space", learns: false, make: |_, c, _| { no_config("raster", c)?; Ok(Box::new(RasterAgent::default())) } },
    AgentSpec { name: "heuristic", description: "the task's expert rule of thumb", learns: false, make: |_, c, _| { no_config("heuristic", c)?; Ok(Box::new(HeuristicAgent)) } },
    AgentSpec { name: "bo", description: "GP Bayesian optimization (constant mean) of grid points or instrument settings", learns: false, make: |_, c, s| Ok(Box::new(BoAgent::from_toml(c, false, s)?)) },
    AgentSpec { name: "sgp", description: "structured GP: BO whose GP mean is a physical peak model of the settings", learns: false, make: |_, c, s| Ok(Box::new(BoAgent::from_toml(c, true, s)?)) },
    #[cfg(feature = "torch")] AgentSpec { name: "dkl", description: "deep kernel learning (MLP on image patches under an RBF GP) for the explore tasks", learns: false, make: crate::dkl::DklAgent::make },
    #[cfg(not(feature = "torch"))] AgentSpec { name: "dkl", description: "deep kernel learning (needs feature torch)", learns: false, make: |_, _, _| Err(missing_torch("dkl")) },
    #[cfg(feature = "torch")]
    AgentSpec { name: "ppo", description: "PPO with CleanRL's defaults (libtorch)", learns: true, make: |e, c, s| Ok(Box::new(crate::rl::PpoAgent::from_toml(e, c, s)?)) },
    #[cfg(not(feature = "torch"))]
    AgentSpec { name: "ppo", description: "PPO with CleanRL's defaults (needs feature torch)", learns: true, make: |_, _, _| Err(missing_torch("ppo")) },
    #[cfg(feature = "torch")]
    AgentSpec { name: "reinforce", description: "REINFORCE with a learned value baseline (libtorch)", learns: true, make: |e, c, s| Ok(Box::new(crate::rl::ReinforceAgent::from_toml(e, c, s)?)) },
    #[cfg(not(feature = "torch"))]
    AgentSpec { name: "reinforce", description: "REINFORCE with a learned value baseline (needs feature torch)", learns: true, make: |_, _, _| Err(missing_torch("reinforce")) },
    #[cfg(feature = "torch")]
    AgentSpec { name: "torchscript", description: "a TorchScript policy file (config: policy = \"file.pt\")", learns: false, make: |e, c, _| Ok(Box::new(crate::rl::TorchScriptAgent::from_toml(e, c)?)) },
    #[cfg(not(feature = "torch"))]
    AgentSpec { name: "torchscript", description: "a TorchScript policy file (needs feature torch)", learns: false, make: |_, _, _| Err(missing_torch("torchscript")) },
];

/// The registered names.
pub fn names() -> Vec<&'static str> {
    AGENTS.iter().map(|a| a.name).collect()
}

/// The spec of `name`.
pub fn spec(name: &str) -> Result<&'static AgentSpec> {
    AGENTS
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| AgentError::UnknownAgent {
            name: name.into(),
            known: names().join(", "),
        })
}

/// Builds the agent `name` for `env`.
pub fn make(
    name: &str,
    env: &dyn Env,
    config: Option<&toml::Value>,
    seed: u64,
) -> Result<Box<dyn Agent>> {
    (spec(name)?.make)(env, config, seed)
}

/// Loads agent `name` from a checkpoint written by [`Agent::save`] (`<dir>/<name>.safetensors`)
/// for `env`, checking that its network fits `env`'s spaces. Only agents that learn across
/// episodes have checkpoints (ppo, reinforce).
pub fn load(name: &str, path: &std::path::Path, env: &dyn Env) -> Result<Box<dyn Agent>> {
    spec(name)?;
    #[cfg(not(feature = "torch"))]
    let _ = path;
    match name {
        #[cfg(feature = "torch")]
        "ppo" => {
            let a = crate::rl::PpoAgent::load(path)?;
            crate::rl::common::check_fits(&a.net().spec, env, path)?;
            Ok(Box::new(a))
        }
        #[cfg(feature = "torch")]
        "reinforce" => {
            let a = crate::rl::ReinforceAgent::load(path)?;
            crate::rl::common::check_fits(&a.net().spec, env, path)?;
            Ok(Box::new(a))
        }
        #[cfg(not(feature = "torch"))]
        "ppo" | "reinforce" => Err(missing_torch(name)),
        _ => Err(AgentError::Unsupported {
            agent: name.into(),
            task: env.id().into(),
            reason: "this agent has no checkpoints (only ppo and reinforce do)".into(),
        }),
    }
}

#[cfg(all(test, not(feature = "torch")))]
mod tests {
    #[test]
    fn neural_agents_need_the_torch_feature() {
        let env = scopegym_envs::registry::make("scopegym/StemDopantSteer-v1", None).unwrap();
        for name in ["ppo", "reinforce", "torchscript"] {
            let e = super::make(name, env.as_ref(), None, 0).err().unwrap();
            assert!(
                matches!(&e, crate::AgentError::MissingFeature { agent, feature } if agent == name && feature == "torch"),
                "{name}: {e}"
            );
        }
    }
}
