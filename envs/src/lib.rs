//! scopegym environments: the step/reset API with Gymnasium 1.x semantics, spaces, the task
//! registry, a parallel vector env, and the microscopy tasks of DESIGN.md §6, each generic over
//! the instrument traits of `scopegym-physics` (so a task runs on the simulator and on a real
//! driver alike).
//!
//! - [`space`]: Box, Discrete, MultiDiscrete, MultiBinary, Dict; sampling, `contains`, JSON.
//! - [`env`]: the [`env::Env`] trait, the [`env::Task`] trait a task implements, and
//!   [`env::TaskEnv`], which adds time limits, done-masking, action checks and seeding.
//! - [`vector`]: N envs stepped in parallel into contiguous buffers, with autoreset modes.
//! - [`record`]: Minari-compatible datasets of recorded episodes.
//! - [`registry`]: `scopegym/<Name>-v1` ids.
//! - [`audit`]: [`audit::Blind`], an instrument wrapper that records every command and hides
//!   ground truth, as a real driver does (the sim-to-real checks).
//! - [`evaluate`]: scoring policies over seeds (floors, degenerate policies).
//! - [`level`]: the `difficulty` and `split` options every task takes.
//! - [`nsid`]: reading recorded data stored as NSID HDF5 (pycroscopy / sidpy).
//! - [`tasks`]: the tasks.
#![deny(missing_docs)]

pub mod audit;
pub mod env;
pub mod error;
pub mod evaluate;
pub mod level;
pub mod nsid;
pub mod record;
pub mod registry;
pub mod space;
pub mod tasks;
pub mod vector;

pub use env::{Env, Info, InfoValue, RgbImage, Step, Task, TaskEnv};
pub use error::{EnvError, Result};
pub use space::{Space, Value};

/// Seeded random numbers (the physics crate's portable `Pcg64Mcg`).
pub mod rng {
    pub use scopegym_physics::rng::{SimRng, seeded};
}
