//! # scopegym
//!
//! A simulation engine and reinforcement-learning gym for microscopy. This crate is the
//! command-line program `scopegym` and re-exports the workspace crates:
//!
//! - [`physics`]: the simulated instruments (`scopegym-physics`).
//! - [`envs`]: the environments and tasks (`scopegym-envs`).
//! - [`agents`]: the agents and the benchmark protocol (`scopegym-agents`).
//!
//! The library part holds what the CLI needs and tests reuse: scenario loading ([`scenario`]),
//! and output writers ([`output`]).

#![deny(missing_docs)]

pub use scopegym_agents as agents;
pub use scopegym_drivers as drivers;
pub use scopegym_envs as envs;
pub use scopegym_physics as physics;

pub mod error;
pub mod output;
pub mod record;
pub mod scenario;

pub use error::CliError;

/// The scopegym version (from Cargo).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit this binary was built from, empty when unknown.
pub const GIT_COMMIT: &str = env!("SCOPEGYM_GIT_COMMIT");
