//! Tips that wear, pick things up and are conditioned (DESIGN.md §5, DeepSPM's action set).
//!
//! The tip is a hidden state, a [`TipState`]: a paraboloid apex of radius `R`, optionally
//! blunted to a flat disc of radius `a`, optionally with a second apex (a double tip) and
//! optionally carrying an adsorbate. The images reveal it through the dilation kernel built by
//! [`TipState::kernel`] (imaging is `img(x) = max_u [ s(x-u) + t(u) ]`, see
//! [`dilation`](super::dilation)), through the extra noise ([`TipState::noise_factor`]) and the
//! per-line glitches ([`TipState::glitch_probability`]) an adsorbate causes.
//!
//! The model lives in one file per concept, all re-exported here:
//!
//! - [`config`]: the tip model's settings, [`TipConfig`] (`[tip]`).
//! - [`state`]: the state itself, [`TipState`] with its [`SecondApex`] and [`Adsorbate`], and
//!   what it tells about imaging: [`TipState::quality`], [`TipState::is_good`], noise and glitch
//!   factors.
//! - [`kernel`]: the dilation kernel the state images with ([`TipState::kernel`],
//!   [`TipState::kernel_side`]).
//! - [`wear`]: the slow, never-sharpening changes: wear in contact, crashes, spontaneous
//!   pick-ups.
//! - [`conditioning`]: DeepSPM's pulses and dips ([`Conditioning`]) and the probability model of
//!   their [`Outcome`].
//! - [`sharpness`](mod@sharpness): image statistics that reveal the tip to a policy
//!   ([`sharpness`](fn@sharpness), [`feature_sharpness`]) and the 3×3 median filter they use.
//!
//! ```
//! use ndarray::Array2;
//! use scopegym_physics::rng::seeded;
//! use scopegym_physics::spm::dilation::dilate;
//! use scopegym_physics::spm::tip::{Conditioning, Outcome, TipConfig, TipState, sharpness};
//!
//! let cfg = TipConfig::default();
//! let mut rng = seeded(3);
//! let mut tip = TipState::new(&cfg, &mut rng).unwrap(); // R = 10 nm: not good yet
//! assert!(!tip.is_good(&cfg));
//! // A surface with one 1 nm bump, 0.25 nm pixels.
//! let pixel = 0.25e-9;
//! let surface = Array2::from_shape_fn((64, 64), |(i, j)| {
//!     let r2 = ((i as f64 - 32.0).powi(2) + (j as f64 - 32.0).powi(2)) * pixel * pixel;
//!     (1e-9 * (-r2 / (2.0 * 0.3e-9f64.powi(2))).exp()) as f32
//! });
//! let image = |t: &TipState| {
//!     let kernel = t.kernel(pixel, t.kernel_side(pixel, 1e-9)).unwrap();
//!     sharpness(dilate(surface.view(), &kernel).view())
//! };
//! let before = image(&tip);
//! // Dip until something happens.
//! let dip = Conditioning::dip(5e-9);
//! let outcome = loop {
//!     match tip.condition(&dip, &cfg, &mut rng).unwrap() {
//!         Outcome::Unchanged => continue,
//!         other => break other,
//!     }
//! };
//! match outcome {
//!     Outcome::Sharpened => assert!(image(&tip) > before),
//!     _ => assert!(image(&tip) < before),
//! }
//! ```

pub mod conditioning;
pub mod config;
pub mod kernel;
pub mod sharpness;
pub mod state;
pub mod wear;

pub use conditioning::{
    Conditioning, DEEPSPM_DIP_BIAS, DEEPSPM_DIPS, DEEPSPM_DURATION, DEEPSPM_PULSES, Outcome,
};
pub use config::{TipConfig, WearModel};
pub use kernel::MAX_KERNEL_SIDE;
pub use sharpness::{feature_sharpness, median_filter_3x3, median9, sharpness};
pub use state::{Adsorbate, SecondApex, TipState};

use crate::error::{PhysicsError, Result};
use crate::rng::{SimRng, uniform};

/// Largest length of a state (radius, flat radius), m.
const MAX_STATE_LENGTH: f64 = 1e-3;
/// Smallest apex radius of a state, m.
const MIN_STATE_RADIUS: f64 = 1e-12;
/// Largest second-apex offset or depth and adsorbate blur, m.
const MAX_FEATURE: f64 = 1e-6;

fn check_arg(name: &str, v: f64, lo: f64, hi: f64, unit: &str) -> Result<()> {
    if v >= lo && v <= hi {
        Ok(())
    } else {
        Err(PhysicsError::arg(
            name,
            format!("must be in [{lo}, {hi}] {unit}, got {v}"),
        ))
    }
}

/// A draw from `U(0.5, 1.5)`.
fn jitter(rng: &mut SimRng) -> f64 {
    0.5 + uniform(rng)
}

#[cfg(test)]
mod tests;
