//! scopegym agents: the baselines that make the tasks a benchmark (DESIGN.md §9).
//!
//! - [`agent`]: the [`Agent`] trait and [`agent::run_episode`].
//! - [`floors`]: random, raster and heuristic.
//! - [`acquisition`]: EI, LogEI, UCB, PI, maximum uncertainty, Thompson sampling.
//! - [`gp`]: exact Gaussian process regression.
//! - [`bo`]: Bayesian optimization of black-box functions (ask/tell, `minimize`).
//! - [`bo_agent`]: Bayesian optimization on the tasks (`bo`, `sgp`).
//! - `dkl` (feature `torch`): deep kernel learning for the explore tasks.
//! - [`registry`]: the agents by name.
//! - `rl` (feature `torch`): PPO, REINFORCE with a baseline, TorchScript policies.
//! - [`bench`]: the benchmark protocol: runs over seeds, the suite, its scores.
#![deny(missing_docs)]

pub mod acquisition;
pub mod agent;
pub mod bench;
pub mod bo;
pub mod bo_agent;
#[cfg(feature = "torch")]
pub mod dkl;
pub mod error;
pub mod floors;
pub mod gp;
pub mod registry;
#[cfg(feature = "torch")]
pub mod rl;

pub use agent::{Agent, CurvePoint, EpisodeRecord, TrainSpec, run_episode};
pub use error::{AgentError, Result};

#[cfg(all(test, feature = "torch"))]
mod torch_smoke {
    #[test]
    fn libtorch_links_and_computes() {
        let t = tch::Tensor::from_slice(&[1.0f64, 2.0, 3.0]);
        assert_eq!(t.sum(tch::Kind::Double).double_value(&[]), 6.0);
    }
}
