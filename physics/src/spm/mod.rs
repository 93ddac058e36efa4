//! The simulated scanning probe microscope (AFM, STM, PFM; DESIGN.md §5).
//!
//! What the simulator ([`sim::SpmSimulator`]) models, per frame and per action:
//!
//! - the sample: one period of an endless periodic surface (terraces, particles, grains, rough
//!   films), STM terraces with adatoms, or a ferroelectric film with its domains;
//! - imaging: the surface dilated by the hidden tip (paraboloid, blunted, double, with an
//!   adsorbate), sampled where the scanner's pixels really are (drift, creep, hysteresis) and
//!   tracked by a discrete PI z-feedback, trace and retrace (tracking error, z-speed limit,
//!   parachuting), with white, 1/f and line-offset height noise and an adsorbate's extra noise
//!   and glitches; PFM amplitude and phase from the film's polarization;
//! - the tip's life: wear in contact, crashes when the tracking error exceeds a threshold,
//!   spontaneous pick-ups, and DeepSPM's conditioning pulses and dips with a stated
//!   probability model;
//! - actions on the sample: STM lateral manipulation of adatoms, PFM bias pulses that write
//!   domains (Ginzburg-Landau dynamics) and switching spectroscopy.
//!
//! The modules:
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
//! - [`tapping`]: AFM contact or tapping operation: the cantilever's amplitude and phase
//!   (Cleveland et al.'s energy balance) and the tip's load.
//! - [`tip`]: the hidden tip state (apex radius, blunting, double tip, adsorbate), one file per
//!   concept: its settings, the state, its dilation kernel, wear and pick-ups, DeepSPM's
//!   conditioning pulses and dips, and the image sharpness statistics.
//! - [`tunnel`]: STM tunnelling current `I ∝ V ρ(V) exp(−2κd)`, bias-dependent apparent
//!   heights, log-current feedback gains and current noise (opt-in, `[tunneling]`).

pub mod adatoms;
pub mod dilation;
pub mod feedback;
pub mod ferro;
pub mod manipulation;
pub mod scanner;
pub mod sim;
pub mod surface;
pub mod tapping;
pub mod tip;
pub mod tunnel;

#[cfg(test)]
mod imperfection_tests;
