//! Minari-compatible datasets of recorded episodes (DESIGN.md §8): the engine's
//! [`scopegym_envs::record`], shared with the Python package.

pub use scopegym_envs::record::{Episode, RecordError, Recorder};
