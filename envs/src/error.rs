//! Errors of the environment engine.

use thiserror::Error;

/// What can go wrong when building or stepping an environment.
#[derive(Debug, Error)]
pub enum EnvError {
    /// An action is not in the action space (NaN/inf, wrong shape, out-of-range discrete value).
    #[error("invalid action: {field}: {reason}")]
    InvalidAction {
        /// The offending part of the action (`action`, `action[3]`, `action.bias`, ...).
        field: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// A task configuration holds an unknown key or an out-of-range value.
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig {
        /// The offending key, e.g. `max_steps` or `instrument.scan.size`.
        field: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// No task is registered under this id.
    #[error("unknown task id {id:?}; registered: {known}")]
    UnknownTask {
        /// The id asked for.
        id: String,
        /// The registered ids, comma-separated.
        known: String,
    },
    /// The id names a retired version of a task: its dynamics, reward or spaces changed and the
    /// task now lives under a new `-vN` id.
    #[error("task id {id:?} is retired: use {replacement:?} ({why})")]
    RetiredTask {
        /// The id asked for.
        id: String,
        /// The id of the current version.
        replacement: String,
        /// What changed.
        why: String,
    },
    /// `step` was called before `reset` or after the episode ended without a reset.
    #[error("{0}")]
    NeedsReset(String),
    /// An argument of an engine call is out of range (number of envs, mask length, ...).
    #[error("invalid argument {name}: {reason}")]
    InvalidArgument {
        /// The argument.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The instrument (simulated or real) refused or failed.
    #[error(transparent)]
    Physics(#[from] scopegym_physics::PhysicsError),
}

impl EnvError {
    /// An [`EnvError::InvalidAction`].
    pub fn action(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidAction {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An [`EnvError::InvalidConfig`].
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An [`EnvError::InvalidArgument`].
    pub fn arg(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

/// Result with [`EnvError`].
pub type Result<T> = std::result::Result<T, EnvError>;
