//! The simulated scanning transmission electron microscope (DESIGN.md §4).

pub mod aberration_drift;
pub mod coherent;
pub mod damage;
pub mod dopant;
pub mod eels;
pub mod equivalent;
pub mod fft2;
pub mod haadf;
pub mod lattice;
pub mod optics;
pub mod probe;
pub mod scan;
pub mod settings;
pub mod sim;
pub mod specimen;

pub use sim::{BeamConfig, DamageReport, StemConfig, StemSimulator};
