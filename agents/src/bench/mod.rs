//! The benchmark protocol: running agents on tasks over seeds ([`run`]), one seed at a time as
//! saved jobs ([`jobs`]), the versioned suite
//! and its scoring ([`suite`]), and the statistics both report ([`stats`]).

pub mod jobs;
pub mod run;
pub mod stats;
pub mod suite;

pub use run::{BuildInfo, RunProgress, RunResults, RunSpec, run_agent};
pub use suite::{SuiteFile, SuiteResults, run_suite};
