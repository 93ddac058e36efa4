//! Errors of the command-line program.

use std::path::PathBuf;
use thiserror::Error;

/// What can go wrong in the CLI. Input errors exit with code 2, the rest with 1.
#[derive(Debug, Error)]
pub enum CliError {
    /// A scenario file is malformed or holds an invalid value.
    #[error("{file}: {key}{message}")]
    Scenario {
        /// The scenario file.
        file: PathBuf,
        /// The offending key, formatted as "key `a.b`: " (empty when not known).
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// A command-line argument is invalid.
    #[error("argument {argument}: {message}")]
    Argument {
        /// The argument's name.
        argument: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Writing an HDF5 file failed.
    #[error("{path}: HDF5: {message}")]
    Hdf5 {
        /// The file.
        path: PathBuf,
        /// The HDF5 library's message.
        message: String,
    },
    /// The simulation refused an operation.
    #[error(transparent)]
    Physics(#[from] scopegym_physics::PhysicsError),
    /// An environment could not be built or stepped.
    #[error(transparent)]
    Env(#[from] scopegym_envs::EnvError),
    /// An agent could not be built, trained or run.
    #[error(transparent)]
    Agent(#[from] scopegym_agents::AgentError),
    /// Running on Ray failed (no Python with Ray, or jobs that did not finish).
    #[error("--ray: {message}")]
    Ray {
        /// What failed and what to do.
        message: String,
    },
    /// A driver could not be opened, or its limits read.
    #[error(transparent)]
    Driver(#[from] scopegym_drivers::DriverError),
}

impl CliError {
    /// The process exit code for this error: 2 for bad input, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Scenario { .. } | Self::Argument { .. } => 2,
            Self::Physics(
                scopegym_physics::PhysicsError::InvalidParameter { .. }
                | scopegym_physics::PhysicsError::InvalidQuantity { .. },
            ) => 2,
            Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => 2,
            Self::Env(e) => env_exit_code(e),
            Self::Driver(e) => {
                use scopegym_drivers::DriverError as D;
                match e {
                    D::InvalidUrl { .. } | D::InvalidLimits { .. } => 2,
                    D::Env(env) => env_exit_code(env),
                    _ => 1,
                }
            }
            Self::Agent(e) => {
                use scopegym_agents::AgentError as A;
                match e {
                    A::InvalidConfig { .. }
                    | A::InvalidArgument { .. }
                    | A::UnknownAgent { .. }
                    | A::Unsupported { .. }
                    | A::MissingFeature { .. } => 2,
                    A::Env(env) => env_exit_code(env),
                    _ => 1,
                }
            }
            _ => 1,
        }
    }
}

fn env_exit_code(e: &scopegym_envs::EnvError) -> i32 {
    use scopegym_envs::EnvError as E;
    match e {
        E::InvalidConfig { .. }
        | E::UnknownTask { .. }
        | E::InvalidAction { .. }
        | E::InvalidArgument { .. } => 2,
        _ => 1,
    }
}

impl From<scopegym_envs::record::RecordError> for CliError {
    fn from(e: scopegym_envs::record::RecordError) -> Self {
        use scopegym_envs::record::RecordError;
        match e {
            RecordError::Exists(dir) => Self::Argument {
                argument: "--out".into(),
                message: format!("{} already holds a dataset", dir.display()),
            },
            RecordError::Episode(message) => Self::Argument {
                argument: "episode".into(),
                message,
            },
            RecordError::Io { path, source } => Self::Io { path, source },
            RecordError::Hdf5 { path, message } => Self::Hdf5 { path, message },
        }
    }
}
