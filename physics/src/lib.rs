//! # scopegym-physics
//!
//! Simulated microscopes for the scopegym gym: image formation, drift, noise, damage and
//! specimen dynamics, with no notion of reinforcement learning and no I/O.
//!
//! - [`stem`]: the scanning transmission electron microscope (aberrated probe with the
//!   non-round aberrations up to fifth order, HAADF imaging, opt-in Ronchigram and BF/ABF
//!   signals, aberrations and defocus that drift between and within frames, depth of focus,
//!   scan distortions, beam-current fluctuation, contamination build-up, knock-on
//!   damage with lower thresholds at edges and vacancies, dopant hops, EELS with collection-angle
//!   and beam-energy dependent cross-sections), with three simulators
//!   (full, light dopant, lattice) sharing one scan-settings check ([`stem::settings`]) and one
//!   probe model ([`stem::probe`]).
//! - [`spm`]: the scanning probe microscope in AFM (contact), STM (constant current) and PFM
//!   modes: periodic procedural surfaces, Ag(111) adatoms and a ferroelectric film; imaging by
//!   grey-scale dilation with a tip that wears, crashes, picks up adsorbates or a second apex
//!   and is conditioned by pulses and dips; a PI z-feedback scanning trace and retrace on a
//!   scanner with drift, creep, hysteresis and height noise; lateral atom manipulation, PFM
//!   bias writing and switching spectroscopy.
//! - [`instrument`]: the traits environments use, implemented by the simulators here and by the
//!   real-instrument drivers.
//! - [`units`] and [`param`]: quantities with units (`"1.42 Å"`) and domain-randomized
//!   parameters (`{ uniform = [lo, hi] }`).
//! - [`rng`]: portable seeded generators and fast samplers.
//! - [`constants`] (physical constants and the one copy of the FWHM factors) and
//!   [`quadrature`] (the one source of Gauss-Hermite nodes).
//!
//! All quantities are SI (energies in eV).

#![deny(missing_docs)]

pub mod constants;
pub mod error;
pub mod instrument;
pub mod param;
pub mod quadrature;
pub mod rng;
pub mod spm;
pub mod stem;
pub mod units;

pub use error::{PhysicsError, Result};
