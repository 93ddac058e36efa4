//! Errors of the agents.

use thiserror::Error;

/// What can go wrong when building, training or running an agent.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The environment failed (bad action, instrument error, unknown task id).
    #[error(transparent)]
    Env(#[from] scopegym_envs::EnvError),
    /// An agent configuration holds an unknown key or an out-of-range value.
    #[error("invalid agent config: {field}: {reason}")]
    InvalidConfig {
        /// The offending key, e.g. `n_initial` or `acquisition`.
        field: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// An argument is out of range (bounds, data shapes, budgets).
    #[error("invalid argument {name}: {reason}")]
    InvalidArgument {
        /// The argument.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// No agent is registered under this name.
    #[error("unknown agent {name:?}; known: {known}")]
    UnknownAgent {
        /// The name asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// The agent cannot act on this task (its spaces do not fit the agent).
    #[error("agent {agent} does not apply to {task}: {reason}")]
    Unsupported {
        /// The agent.
        agent: String,
        /// The task id.
        task: String,
        /// Why.
        reason: String,
    },
    /// A numerical failure the agent could not recover from (a matrix that stays singular with
    /// the largest jitter, a non-finite objective).
    #[error("numerical failure in {context}: {reason}")]
    Numerical {
        /// Where.
        context: String,
        /// What.
        reason: String,
    },
    /// The agent was built without a feature it needs.
    #[error("agent {agent} needs scopegym built with the `{feature}` feature")]
    MissingFeature {
        /// The agent.
        agent: String,
        /// The cargo feature.
        feature: String,
    },
    /// libtorch failed (feature `torch`).
    #[error("torch: {0}")]
    Torch(String),
    /// Reading or writing a checkpoint or policy failed.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
}

impl AgentError {
    /// An [`AgentError::InvalidConfig`].
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An [`AgentError::InvalidArgument`].
    pub fn arg(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            name: name.into(),
            reason: reason.into(),
        }
    }

    /// An [`AgentError::Numerical`].
    pub fn numerical(context: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Numerical {
            context: context.into(),
            reason: reason.into(),
        }
    }
}

#[cfg(feature = "torch")]
impl From<tch::TchError> for AgentError {
    fn from(e: tch::TchError) -> Self {
        Self::Torch(e.to_string())
    }
}

/// Result with [`AgentError`].
pub type Result<T> = std::result::Result<T, AgentError>;

/// Parses an agent config (a TOML table; `None` for the defaults), naming the offending
/// field on error.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned + Default>(
    config: Option<&toml::Value>,
) -> Result<T> {
    let Some(v) = config else {
        return Ok(T::default());
    };
    serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "config".into() } else { path };
        AgentError::config(field, e.into_inner().to_string())
    })
}
