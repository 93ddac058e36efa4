//! Reinforcement learning on libtorch (feature `torch`): [`PpoAgent`] (CleanRL's PPO),
//! [`ReinforceAgent`] (REINFORCE with a learned value baseline), and [`TorchScriptAgent`]
//! (runs any TorchScript policy, e.g. one exported by [`PpoAgent::export_torchscript`] or
//! trained in Python with PyTorch).
//!
//! ```
//! use scopegym_agents::{Agent, TrainSpec, registry, run_episode};
//! let id = "scopegym/StemDopantSteer-v1";
//! let mut env = scopegym_envs::registry::make(id, None).unwrap();
//! let cfg: toml::Value = toml::from_str("num_envs = 2\nnum_steps = 16").unwrap();
//! let mut ppo = registry::make("ppo", env.as_ref(), Some(&cfg), 0).unwrap();
//! let spec = TrainSpec { env_id: id, env_config: None, steps: 64, seed: 0 };
//! let mut done = 0;
//! ppo.train(&spec, &mut |s| done = s).unwrap();
//! assert_eq!(done, 64);
//! let rec = run_episode(env.as_mut(), ppo.as_mut(), 1).unwrap();
//! assert!(rec.steps >= 1);
//! ```
//!
//! # Observations
//!
//! Every observation is flattened in the space's order (Dict: keys in order), as
//! [`scopegym_envs::vector::flatten_into`] does, and normalized elementwise by the Box bounds
//! into `[-1, 1]`: `x' = 2 (x − low) / (high − low) − 1` (an element with `high ≤ low` or an
//! infinite bound is passed through unchanged). The [`net::ObsLayout`] then splits it:
//!
//! - 1-D Boxes (and Discrete, MultiDiscrete, MultiBinary values, as numbers) go to the MLP
//!   heads as they are;
//! - 2-D Boxes of at least 8 × 8 (images) go through a small CNN each (one input channel):
//!   from 36 × 36 up the Nature-CNN (conv 32 8×8/4, 64 4×4/2, 64 3×3/1, ReLU, linear 512,
//!   ReLU), below a smaller one (conv 16 3×3/2, 32 3×3/2, ReLU, linear 128, ReLU);
//!   smaller 2-D Boxes are flattened;
//! - Boxes of 3 or more dimensions inside a Dict (the `patches` stack of the explore tasks:
//!   thousands of patches) are skipped: the heads never see them (their information is in the
//!   `overview` image and the maps). A top-level Box of 3 or more dimensions is flattened.
//!
//! The features (the 1-D parts and the CNN outputs, concatenated) feed an actor and a critic,
//! each a 64-64 tanh MLP (CleanRL's defaults), orthogonally initialized (gain √2 hidden, 0.01
//! policy head, 1.0 value head, zero biases); CNNs with gain √2.
//!
//! # Actions
//!
//! Discrete: a categorical over the logits. Box: a diagonal Gaussian with a state-independent
//! learned log standard deviation (initially 0, or PPO's `init_log_std`); samples are unclipped in the rollout buffer
//! (their log-probabilities) and clipped to the bounds when sent to the env, as CleanRL does.
//! Evaluation ([`crate::Agent::act`]) is deterministic by default (`deterministic_eval`): the
//! most probable action or the Gaussian mean, clipped.
//!
//! # Reproducibility
//!
//! Initialization uses libtorch's generator, seeded under a process-wide lock; action
//! sampling and minibatch shuffling use our seeded generators; libtorch runs on one thread
//! (`tch::set_num_threads(1)`). The same seed gives the same training run.

pub(crate) mod common;
pub mod net;
pub mod ppo;
pub mod reinforce;
pub mod torchscript;

#[cfg(test)]
mod tests;

pub use net::{ActionKind, ActorCritic, NetSpec, ObsLayout};
pub use ppo::{PpoAgent, PpoConfig};
pub use reinforce::{ReinforceAgent, ReinforceConfig};
pub use torchscript::{TorchScriptAgent, TorchScriptConfig};

pub(crate) use crate::error::parse_config;
