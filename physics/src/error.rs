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

/// Checks that a configuration value lies in `range` (NaN never does): otherwise
/// [`PhysicsError::InvalidParameter`] naming `field`, the range with its `unit` (SI; empty for
/// a ratio) and the value. Open lower ends come as `(Bound::Excluded(lo), Bound::Included(hi))`.
///
/// ```
/// use std::ops::Bound::{Excluded, Included};
/// use scopegym_physics::error::check_range;
/// assert!(check_range("afm.quality_factor", 50.0, 1.0..=1e5, "").is_ok());
/// let e = check_range("afm.contact_force", 0.0, (Excluded(0.0), Included(1e-6)), "N");
/// assert_eq!(
///     e.unwrap_err().to_string(),
///     "invalid value for `afm.contact_force`: must be in (0, 1e-6] N, got 0"
/// );
/// assert!(check_range("x", f64::NAN, .., "m").is_err());
/// ```
pub fn check_range(
    field: &str,
    value: f64,
    range: impl std::ops::RangeBounds<f64>,
    unit: &str,
) -> Result<()> {
    use std::ops::Bound;
    if !value.is_nan() && range.contains(&value) {
        return Ok(());
    }
    let num = |v: f64| {
        if v == 0.0 || (1e-3..1e4).contains(&v.abs()) {
            format!("{v}")
        } else {
            format!("{v:e}")
        }
    };
    let lo = match range.start_bound() {
        Bound::Included(v) => format!("[{}", num(*v)),
        Bound::Excluded(v) => format!("({}", num(*v)),
        Bound::Unbounded => "(-inf".to_string(),
    };
    let hi = match range.end_bound() {
        Bound::Included(v) => format!("{}]", num(*v)),
        Bound::Excluded(v) => format!("{})", num(*v)),
        Bound::Unbounded => "inf)".to_string(),
    };
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    Err(PhysicsError::param(
        field,
        format!("must be in {lo}, {hi}{unit}, got {value}"),
    ))
}

/// Result alias of the physics crate.
pub type Result<T, E = PhysicsError> = std::result::Result<T, E>;
