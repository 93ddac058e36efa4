//! The error type of the physics crate.

use thiserror::Error;

/// Everything that can go wrong in `scopegym-physics`.
///
/// Each variant names the offending field or operation so that a user can fix the input
/// without reading the source.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PhysicsError {
    /// A configuration field holds a value outside its allowed range.
    #[error("invalid value for `{field}`: {reason}")]
    InvalidParameter {
        /// Dotted path of the field, e.g. `optics.convergence_angle`.
        field: String,
        /// What was expected.
        reason: String,
    },
    /// A quantity string such as `"1.42 Å"` could not be parsed or has the wrong dimension.
    #[error("invalid quantity {input:?}: {reason}")]
    InvalidQuantity {
        /// The text as written.
        input: String,
        /// What went wrong and what was expected.
        reason: String,
    },
    /// An argument passed to an instrument operation is out of range (e.g. NaN position).
    #[error("invalid argument `{argument}`: {reason}")]
    InvalidArgument {
        /// The argument's name.
        argument: String,
        /// What was expected.
        reason: String,
    },
    /// The operation is refused in the instrument's current state (e.g. acquiring with a blanked beam
    /// is fine, but moving the probe outside the field of view is not).
    #[error("operation `{operation}` refused: {reason}")]
    Refused {
        /// The operation's name.
        operation: String,
        /// Why it was refused.
        reason: String,
    },
}

/// Start of the `reason` of a [`PhysicsError::Refused`] made by a safety guard (the
/// `scopegym-drivers` crate's `Guarded`): ``guard: limit `spm.bias_window`: ...``. An
/// environment turns such a refusal into a documented outcome (the episode ends with
/// `info["refused"]`) instead of an error.
pub const GUARD_REFUSAL_PREFIX: &str = "guard: limit `";

impl PhysicsError {
    /// The limit's name if this is a safety-guard refusal (its reason starts with
    /// [`GUARD_REFUSAL_PREFIX`]), `None` for every other error, an instrument's own refusals
    /// included.
    ///
    /// ```
    /// use scopegym_physics::PhysicsError;
    /// let e = PhysicsError::Refused {
    ///     operation: "set_bias".into(),
    ///     reason: "guard: limit `spm.bias_window`: bias 100 V is outside [-10 V, 10 V]".into(),
    /// };
    /// assert_eq!(e.guard_limit(), Some("spm.bias_window"));
    /// assert_eq!(PhysicsError::arg("x", "bad").guard_limit(), None);
    /// ```
    pub fn guard_limit(&self) -> Option<&str> {
        match self {
            Self::Refused { reason, .. } => reason
                .strip_prefix(GUARD_REFUSAL_PREFIX)?
                .split_once('`')
                .map(|(limit, _)| limit),
            _ => None,
        }
    }

    /// Shorthand for [`PhysicsError::InvalidParameter`].
    pub fn param(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidParameter {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`PhysicsError::InvalidArgument`].
    pub fn arg(argument: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            argument: argument.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias of the physics crate.
pub type Result<T, E = PhysicsError> = std::result::Result<T, E>;
