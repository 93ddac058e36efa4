//! # scopegym-drivers
//!
//! Real instruments behind the same traits as the simulators (DESIGN.md §10), and the safety
//! layer every instrument, simulated or real, runs behind:
//!
//! - [`guard`]: [`Guarded`], which enforces [`Limits`] before a command leaves, with a dry-run
//!   mode and an append-only [`AuditLog`]; [`Check`] tells whether a command would pass.
//! - [`limits`]: the limits, read from a `limits.toml` with units (`limits.example.toml` in
//!   this crate is a conservative start).
//! - [`command`]: commands as values, for checking and logging.
//! - [`audit`]: the JSON-lines audit log.
//! - [`nanonis`]: the Nanonis SPM client ([`nanonis::NanonisClient`]) and a fake Nanonis
//!   server backed by the simulator ([`nanonis::FakeNanonis`]).
//! - [`stem_gateway`]: [`StemGatewayClient`], a STEM behind a gateway speaking the protocol of
//!   `drivers/STEM_GATEWAY.md` (the reference gateway is `drivers/python/stem_gateway.py`).
//! - [`error`]: [`DriverError`], and how a refusal crosses the physics traits.
//! - [`replay`]: [`ReplaySpm`], recorded NSID HDF5 data served through the SPM traits
//!   (driver URL `replay:FILE`).
//!
//! All quantities are SI.
//!
//! ```
//! use scopegym_drivers::{Guarded, Limits};
//! use scopegym_physics::instrument::SpmInstrument;
//! use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
//!
//! let sim = SpmSimulator::new(SpmConfig::default(), 0).unwrap();
//! let mut g = Guarded::new(sim, Limits::default()).unwrap();
//! assert!(g.set_bias(100.0).is_err()); // outside the default ±10 V window: never sent
//! assert_eq!(g.forwarded(), 0);
//! assert_eq!(g.last_refusal().unwrap().limit, "spm.bias_window");
//! ```

#![deny(missing_docs)]

pub mod audit;
pub mod command;
pub mod connect;
pub mod episode;
pub mod error;
pub mod guard;
pub mod limits;
pub mod nanonis;
pub mod replay;
pub mod stem_gateway;
pub mod watchdog;

pub use audit::AuditLog;
pub use command::{SpmCommand, StemCommand};
pub use error::{DriverError, Refusal, Result};
pub use guard::{Check, Guarded};
pub use limits::Limits;
pub use replay::{ReplayOptions, ReplaySpm};
pub use stem_gateway::{StemGatewayClient, StemGatewayOptions};
pub use watchdog::{HasSafeHandle, SafeHandle, Watchdog};
