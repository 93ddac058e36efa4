//! The simulated scanning probe microscope (AFM, STM, PFM; DESIGN.md §5).
//!
//! The simulator grows here piece by piece: surfaces, tips that wear and are conditioned,
//! feedback scanning, atom manipulation and ferroelectric films. What exists so far:
//!
//! - [`dilation`]: tip height maps and the imaging kernel, the grey-scale dilation of the
//!   surface by the (reflected) tip, `img(x) = max_u [ s(x-u) + t(u) ]`, with a general path for
//!   any tip shape and an exact separable fast path for paraboloid tips.
//! - [`ferro`]: a ferroelectric film, polarization under time-dependent Ginzburg-Landau
//!   dynamics with disorder, imprint and a tip field.
//! - [`manipulation`]: STM lateral manipulation of an Ag adatom between Ag(111) hollow sites.
//! - [`surface`]: procedural surfaces (terraces with atomic steps, particles, grains, rough films).

pub mod dilation;
pub mod ferro;
pub mod manipulation;
pub mod surface;
