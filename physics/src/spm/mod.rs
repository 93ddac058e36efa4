//! The simulated scanning probe microscope (AFM, STM, PFM; DESIGN.md §5).
//!
//! The simulator grows here piece by piece: surfaces, tips that wear and are conditioned,
//! feedback scanning, atom manipulation and ferroelectric films. What exists so far:
//!
//! - [`adatoms`]: Ag(111) terraces with adatoms, the apparent-height map a constant-current STM
//!   images.
//! - [`dilation`]: tip height maps and the imaging kernel, the grey-scale dilation of the
//!   surface by the (reflected) tip, `img(x) = max_u [ s(x-u) + t(u) ]`, with a general path for
//!   any tip shape and an exact separable fast path for paraboloid tips.
//! - [`feedback`]: the discrete PI z-feedback that scans a line over the tip-dilated surface:
//!   tracking error, z-speed limit, parachuting, trace/retrace lag.
//! - [`ferro`]: a ferroelectric film, polarization under time-dependent Ginzburg-Landau
//!   dynamics with disorder, imprint and a tip field.
//! - [`manipulation`]: STM lateral manipulation of an Ag adatom between Ag(111) hollow sites:
//!   hops along the tip path, loss to the tip (pick-up) or to a random site.
//! - [`scanner`]: scanner imperfections: settling thermal drift, piezo creep after offset jumps,
//!   fast-axis hysteresis, and white, 1/f and line-offset height noise.
//! - [`sim`]: the simulated SPM ([`sim::SpmSimulator`]): AFM, STM and PFM modes behind
//!   [`crate::instrument::SpmInstrument`] and its capability traits.
//! - [`surface`]: procedural surfaces (terraces with atomic steps, particles, grains, rough films),
//!   each one period of an endless periodic sample (terraces up to a constant rise per period),
//!   and the crate's one bilinear sampler, which continues a grid periodically past its edge.
//! - [`tip`]: the hidden tip state (apex radius, blunting, double tip, adsorbate) that wears,
//!   picks things up and is conditioned by DeepSPM's pulses and dips; its dilation kernel, and an
//!   image sharpness statistic.

pub mod adatoms;
pub mod dilation;
pub mod feedback;
pub mod ferro;
pub mod manipulation;
pub mod scanner;
pub mod sim;
pub mod surface;
pub mod tip;
