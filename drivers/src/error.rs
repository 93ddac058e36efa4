//! The error type of the drivers crate, and how it crosses the instrument traits.
//!
//! # Refusals through the instrument traits
//!
//! The instrument traits of `scopegym-physics` return [`PhysicsError`], and a
//! [`Guarded`](crate::guard::Guarded) instrument must implement the same traits so that an
//! environment cannot tell it from the bare instrument. `PhysicsError` already has a
//! [`PhysicsError::Refused`] variant (`operation`, `reason`), which simulators use for operations
//! refused in the current state, so no new physics variant is needed: a guard refusal converts
//! into a `PhysicsError::Refused` whose `operation` is the command and whose `reason` reads
//! ``guard: limit `spm.bias_window`: bias 100 V is outside [-10 V, 10 V]``.
//! The fixed prefix ([`REFUSAL_PREFIX`]) tells a guard refusal from a simulator's own refusal;
//! [`guard_refusal`] recovers the limit's name from a `PhysicsError`, and
//! [`Guarded::last_refusal`](crate::guard::Guarded::last_refusal) keeps the structured
//! [`Refusal`] of the latest refused command. Driver failures that are not refusals (a timeout,
//! an I/O error of the audit log) convert into `PhysicsError::Refused` with the prefix
//! [`DRIVER_PREFIX`], so the environment stops instead of carrying on after an unlogged command.

use scopegym_physics::PhysicsError;
use thiserror::Error;

/// Start of the `reason` of a [`PhysicsError::Refused`] made from a guard refusal.
pub const REFUSAL_PREFIX: &str = scopegym_physics::error::GUARD_REFUSAL_PREFIX;

/// Start of the `reason` of a [`PhysicsError::Refused`] made from a driver failure (timeout, I/O).
pub const DRIVER_PREFIX: &str = "driver: ";

/// A command the guard refused, structured (see [`DriverError::Refused`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The limit that refused it, as named in `limits.toml`, e.g. `spm.bias_window`.
    pub limit: String,
    /// The command, e.g. `set_bias`.
    pub command: String,
    /// The offending values and the limit's values, with units.
    pub reason: String,
}

/// The kinds of [`DriverError::Fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// No complete reply before the deadline.
    Timeout,
    /// Connecting failed, or the peer closed or reset the connection.
    Connection,
    /// Malformed header or body (garbage name, wrong command, bad padding, short body).
    Protocol,
    /// The reply header announced a body larger than the configured cap.
    BodyTooLarge,
    /// The instrument answered with a non-zero error status.
    ErrorReply,
    /// The Z controller reported a safe-tip event.
    SafeTip,
}

impl FaultKind {
    /// Lower-case name, e.g. `"timeout"`, `"safe-tip event"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connection => "connection lost",
            Self::Protocol => "protocol error",
            Self::BodyTooLarge => "reply body too large",
            Self::ErrorReply => "error reply",
            Self::SafeTip => "safe-tip event",
        }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that can go wrong in `scopegym-drivers`.
#[derive(Debug, Error)]
pub enum DriverError {
    /// A command was refused by a configured limit before it was sent.
    #[error("`{command}` refused by limit `{limit}`: {reason}")]
    Refused {
        /// The limit, as named in `limits.toml`, e.g. `spm.bias_window`.
        limit: String,
        /// The command, e.g. `set_bias`.
        command: String,
        /// The offending values and the limit's values, with units.
        reason: String,
    },
    /// A `limits.toml` field is missing, malformed or out of range.
    #[error("invalid limits: `{field}`: {reason}")]
    InvalidLimits {
        /// Dotted path of the field, e.g. `spm.bias_window`.
        field: String,
        /// What was expected.
        reason: String,
    },
    /// A call to the instrument did not complete in time.
    #[error("`{command}` timed out after {seconds} s")]
    Timeout {
        /// The command.
        command: String,
        /// The time waited, s.
        seconds: f64,
    },
    /// Reading the limits or writing the audit log failed.
    #[error("I/O error ({context}): {source}")]
    Io {
        /// What was being read or written.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A network instrument failed mid-command (timeout, dropped connection, malformed or
    /// oversized reply, error reply, safe-tip event); the driver attempted `make_safe` (tip
    /// withdrawn over a fresh connection) before returning this, and `safe` says how that went.
    #[error("`{command}`: {kind}: {detail}; make_safe: {safe}")]
    Fault {
        /// The command that failed, e.g. `Scan.Action`.
        command: String,
        /// What kind of fault.
        kind: FaultKind,
        /// What exactly happened, with the values seen.
        detail: String,
        /// The outcome of the `make_safe` attempt that followed.
        safe: String,
    },
    /// A recording (replay driver) is missing a dataset or attribute, is malformed, or holds
    /// nothing the driver can serve.
    #[error("recording {file}: {}{reason}", if object.is_empty() { String::new() } else { format!("`{object}`: ") })]
    Recording {
        /// The file, as given.
        file: String,
        /// The HDF5 object (dataset path, or `dataset@attribute`), or `""` for the file.
        object: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// A driver option is out of range.
    #[error("invalid option `{field}`: {reason}")]
    InvalidOptions {
        /// The option's name.
        field: String,
        /// What was expected.
        reason: String,
    },
    /// Connecting to an instrument server failed, or its connection broke or was closed after
    /// an earlier fault.
    #[error("connection to {endpoint} failed ({context}): {reason}")]
    Connection {
        /// The server, e.g. `stem-gateway://127.0.0.1:7001`.
        endpoint: String,
        /// What was being done: `connect`, or the command.
        context: String,
        /// What went wrong.
        reason: String,
    },
    /// The server sent bytes that break the protocol (truncated message, declared size over the
    /// limit, malformed header, wrong reply id, missing attachment).
    #[error("`{command}`: protocol error: {reason}")]
    Protocol {
        /// The command whose reply broke the protocol.
        command: String,
        /// What was wrong.
        reason: String,
    },
    /// The server answered a command with an error reply.
    #[error("`{command}`: gateway error {code} ({}): {message}", crate::stem_gateway::codes::name(*code))]
    Gateway {
        /// The command.
        command: String,
        /// The error code (see `drivers/STEM_GATEWAY.md`).
        code: i64,
        /// The server's message.
        message: String,
    },
    /// The instrument (simulated or real) returned an error.
    #[error(transparent)]
    Instrument(#[from] PhysicsError),
    /// A driver URL could not be understood or does not fit the task.
    #[error("driver `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What was expected.
        reason: String,
    },
    /// The task could not be built or run (unknown id, bad config, ...).
    #[error(transparent)]
    Env(Box<scopegym_envs::EnvError>),
}

impl From<scopegym_envs::nsid::NsidError> for DriverError {
    fn from(e: scopegym_envs::nsid::NsidError) -> Self {
        Self::Recording {
            file: e.file,
            object: e.object,
            reason: e.reason,
        }
    }
}

impl DriverError {
    /// A [`DriverError::Refused`].
    pub fn refused(
        limit: impl Into<String>,
        command: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Refused {
            limit: limit.into(),
            command: command.into(),
            reason: reason.into(),
        }
    }

    /// A [`DriverError::InvalidLimits`].
    pub fn limits(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidLimits {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The structured refusal, if this is one.
    pub fn as_refusal(&self) -> Option<Refusal> {
        match self {
            Self::Refused {
                limit,
                command,
                reason,
            } => Some(Refusal {
                limit: limit.clone(),
                command: command.clone(),
                reason: reason.clone(),
            }),
            _ => None,
        }
    }
}

impl From<DriverError> for PhysicsError {
    fn from(e: DriverError) -> Self {
        match e {
            DriverError::Refused {
                limit,
                command,
                reason,
            } => PhysicsError::Refused {
                operation: command,
                reason: format!("{REFUSAL_PREFIX}{limit}`: {reason}"),
            },
            DriverError::InvalidLimits { field, reason } => PhysicsError::InvalidParameter {
                field: format!("limits.{field}"),
                reason,
            },
            DriverError::Timeout { command, seconds } => PhysicsError::Refused {
                operation: command,
                reason: format!("{DRIVER_PREFIX}timed out after {seconds} s"),
            },
            DriverError::Io { context, source } => PhysicsError::Refused {
                operation: context,
                reason: format!("{DRIVER_PREFIX}I/O error: {source}"),
            },
            DriverError::Fault {
                command,
                kind,
                detail,
                safe,
            } => PhysicsError::Refused {
                operation: command,
                reason: format!("{DRIVER_PREFIX}{kind}: {detail}; make_safe: {safe}"),
            },
            e @ DriverError::Recording { .. } => PhysicsError::Refused {
                operation: "replay".into(),
                reason: format!("{DRIVER_PREFIX}{e}"),
            },
            DriverError::InvalidOptions { field, reason } => PhysicsError::InvalidParameter {
                field: format!("driver.{field}"),
                reason,
            },
            DriverError::Connection {
                endpoint,
                context,
                reason,
            } => PhysicsError::Refused {
                operation: context,
                reason: format!("{DRIVER_PREFIX}connection to {endpoint} failed: {reason}"),
            },
            DriverError::Protocol { command, reason } => PhysicsError::Refused {
                operation: command,
                reason: format!("{DRIVER_PREFIX}protocol error: {reason}"),
            },
            DriverError::Gateway {
                command,
                code,
                message,
            } => PhysicsError::Refused {
                operation: command,
                reason: format!(
                    "{DRIVER_PREFIX}gateway error {code} ({}): {message}",
                    crate::stem_gateway::codes::name(code)
                ),
            },
            DriverError::Instrument(p) => p,
            DriverError::InvalidUrl { url, reason } => PhysicsError::InvalidParameter {
                field: "driver".into(),
                reason: format!("`{url}`: {reason}"),
            },
            DriverError::Env(e) => match *e {
                scopegym_envs::EnvError::Physics(p) => p,
                other => PhysicsError::InvalidArgument {
                    argument: "task".into(),
                    reason: other.to_string(),
                },
            },
        }
    }
}

/// The limit's name if `e` is a guard refusal (made by converting a [`DriverError::Refused`]),
/// `None` for every other error, including an instrument's own refusals.
///
/// ```
/// use scopegym_drivers::error::{guard_refusal, DriverError};
/// use scopegym_physics::PhysicsError;
/// let e: PhysicsError = DriverError::refused("spm.bias_window", "set_bias", "100 V").into();
/// assert_eq!(guard_refusal(&e), Some("spm.bias_window"));
/// assert_eq!(guard_refusal(&PhysicsError::arg("x", "bad")), None);
/// ```
pub fn guard_refusal(e: &PhysicsError) -> Option<&str> {
    e.guard_limit()
}

/// Result with [`DriverError`].
pub type Result<T, E = DriverError> = std::result::Result<T, E>;
