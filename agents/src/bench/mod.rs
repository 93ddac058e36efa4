//! The benchmark protocol: running agents on tasks over seeds ([`run`]), the versioned suite
//! and its scoring ([`suite`]), and the statistics both report ([`stats`]).

pub mod run;
pub mod stats;
pub mod suite;

pub use run::{BuildInfo, RunProgress, RunResults, RunSpec, run_agent};
pub use suite::{SuiteFile, SuiteResults, run_suite};
