//! Tips that wear, pick things up and are conditioned (DESIGN.md §5, DeepSPM's action set).
//!
//! The tip is a hidden state, a [`TipState`]: a paraboloid apex of radius `R`, optionally
//! blunted to a flat disc of radius `a`, optionally with a second apex (a double tip) and
//! optionally carrying an adsorbate. The images reveal it through the dilation kernel built by
//! [`TipState::kernel`] (imaging is `img(x) = max_u [ s(x-u) + t(u) ]`, see
//! [`dilation`](super::dilation)), through the extra noise ([`TipState::noise_factor`]) and the
//! per-line glitches ([`TipState::glitch_probability`]) an adsorbate causes.
//!
//! # The kernel
//!
//! With the kernel radius `R_k = R + b` (`b` the adsorbate's blur, 0 without one):
//! `t(u) = max( -(|u| - a)₊²/(2R_k), -dz - (|u - d|  - a)₊²/(2R_k) )`, the second term only for
//! a double tip (second apex at offset `d`, `dz ≥ 0` below the main one in `t`: a feature at `p`
//! is imaged again, `dz` lower, at `p + d`). Without flat and double it is
//! [`Tip::paraboloid`], with a double and no flat [`Tip::double`], with a flat [`Tip::worn`] (the
//! flat disc swept by the paraboloids on the pixel grid; all three image fast).
//!
//! # Slow changes (never decrease `R`)
//!
//! - [`TipState::wear`]: `R += wear_rate · L · u`, `L` the tip travel in contact (m), `u ~ U(0.5,
//!   1.5)`. The default `wear_rate = 1e-7` grows `R` by ≈ 5 nm over 100 frames of 256 lines of
//!   1 µm, trace and retrace (`L = 100·256·2·1 µm = 5.1 cm`).
//! - [`TipState::crash`] into the surface by `δ`: `R += crash_growth · δ · u`, the apex is
//!   flattened to `a ≥ crash_flattening · √(2Rδ)` (the contact radius of a paraboloid pressed
//!   `δ` deep), and with probability `double_probability` a second apex forms.
//! - [`TipState::spontaneous`] while scanning for `T`: `k ~ Poisson(adsorbate_rate · T)` pick-ups
//!   ([`TipState::pick_up`]); each makes a second apex with probability `double_probability`,
//!   else an adsorbate. A manipulated adatom the tip picks up is one more pick-up.
//! - Conditioning wear: every conditioning action, whatever its outcome, then grows `R` by
//!   `conditioning_wear · s · u` (`s` its strength, `u ~ U(0.5, 1.5)`; default 0, off), so a
//!   tip conditioned again and again blunts even when each action sharpens it.
//!
//! Growth is capped: neither `R` nor the flat radius grows past `max_radius`.
//!
//! # Conditioning (the probability model)
//!
//! An action has a strength `s` (capped at 2), with `τ` its duration:
//!
//! | action | strength `s` |
//! |---|---|
//! | bias pulse `V` | `(|V| / 8 V) · (τ / 0.2 s)^¼` (the sign does not matter here) |
//! | dip of depth `δ` | `(δ / 5 nm) · (τ / 0.2 s)^¼` (the dip's bias does not matter here) |
//!
//! The tip's defects: the blunt apex with need `n_b = 1 - exp(-2(R_eff - R_good)₊ / R_good)`,
//! where `R_eff = R + a + b`, the double tip `D ∈ {0, 1}` and the adsorbate `A ∈ {0, 1}`. Each
//! action type works on each defect with an efficacy `e`:
//!
//! | defect | pulse | dip |
//! |---|---|---|
//! | blunt apex (`e_b`) | 0.5 | 1.0 |
//! | double tip (`e_d`) | 0.4 | 0.9 |
//! | adsorbate (`e_a`) | 0.9 | 0.4 |
//!
//! The action's need is `n = max(e_b·n_b, e_d·D, e_a·A) ∈ [0, 1]` and the room left to sharpen
//! `r = clamp((R_eff - R_min)/(R_good - R_min), 0, 1)`. With `g(s) = 1 - exp(-s/s_c)`:
//!
//! - `P(Sharpened) = p_max · g(s) · (ε·r + (1 - ε)·n)`,
//! - `P(Worsened)  = g(s) · (w₀ + w₁·s) · (1 - n/2)`,
//! - `P(Unchanged) = 1 - P(Sharpened) - P(Worsened)` (both scaled down together if their sum
//!   exceeds 1, which the defaults never do),
//!
//! with `p_max = sharpen_max` (0.6, at most 0.95: no action always works), `ε =
//! residual_improve` (0.15), `w₀ = worsen_base` (0.2), `w₁ = worsen_slope` (0.2) and `s_c =
//! strength_scale` (0.3). A bad tip (large `n`) improves more often, and worsens less often,
//! than a good one; stronger actions change more often and, through `w₁·s`, worsen more. A good
//! tip (`n = 0`) has `P(Sharpened) ≤ 0.09·g < 0.2·g ≤ P(Worsened)` with the defaults: it is
//! likelier to get worse than better. Example (defaults): a clean tip of `R = 30 nm` dipped
//! 5 nm for 200 ms (`s = 1`, `g = 0.964`, `n_b = n ≈ 1`) sharpens with 0.579,
//! worsens with 0.193.
//!
//! What happens:
//!
//! - Sharpened: the apex is reshaped, `R ← R_min + (R - R_min)·exp(-k)` and `a ← a·exp(-k)` with
//!   `k = sharpen_rate · s · e_b` (`sharpen_rate` 2.5). If the tip has a double and/or an
//!   adsorbate, one of them (picked with probability ∝ its efficacy) is removed, and the other
//!   with probability equal to its efficacy. A Sharpened event therefore always improves the
//!   tip (it has probability 0 for the ideal tip), before the conditioning wear (above), which
//!   every action adds whatever its outcome.
//! - Worsened: `R ← R·(1 + worsen_growth · s · u)`, `u ~ U(0.5, 1.5)` (`worsen_growth` 0.5); a dip
//!   also flattens the apex (probability 0.5) to `a ≥ crash_flattening · √(2Rδ) · u`; a second
//!   apex forms (if there is none) with probability `double_probability` (dips) or half that
//!   (pulses); an adsorbate is picked up (if there is none) with probability 0.4 (pulses) or 0.2
//!   (dips).
//!
//! Repeated conditioning of a bad tip reaches a good one: in the tests a blunt (30 nm, 3 nm flat),
//! double tip with an adsorbate becomes good within 40 blind alternating −4 V pulses and 2 nm
//! dips in more than 90% of the trials (≈ 18 actions on average), and within 20 dips of 5 nm in
//! more than 98% (≈ 4 actions). Weaker or ill-suited actions take longer.
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

use super::dilation::{MAX_TIP_SIDE, Tip};
use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::{Frequency, Length, Unitless};
use crate::rng::{SimRng, poisson, uniform};
use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

/// DeepSPM's bias pulses, V (each 200 ms).
pub const DEEPSPM_PULSES: [f64; 6] = [2.5, -2.5, 4.0, -4.0, 8.0, -8.0];
/// DeepSPM-style dip depths, m (each 200 ms at 20 mV), spanning the published 0.8-5 nm; the
/// intermediate depths are this crate's choice.
pub const DEEPSPM_DIPS: [f64; 6] = [0.8e-9, 1.0e-9, 1.5e-9, 2.0e-9, 3.0e-9, 5.0e-9];
/// Duration of DeepSPM's pulses and dips, s.
pub const DEEPSPM_DURATION: f64 = 0.2;
/// Bias during DeepSPM's dips, V.
pub const DEEPSPM_DIP_BIAS: f64 = 0.02;
/// The largest kernel side [`TipState::kernel_side`] returns, pixels.
pub const MAX_KERNEL_SIDE: usize = 127;

/// Largest pulse bias magnitude, V.
const MAX_PULSE_BIAS: f64 = 10.0;
/// Largest dip bias magnitude, V.
const MAX_DIP_BIAS: f64 = 1.0;
/// Largest dip depth, m.
const MAX_DIP_DEPTH: f64 = 10e-9;
/// Largest action duration, s.
const MAX_DURATION: f64 = 10.0;
/// Largest action strength.
const MAX_STRENGTH: f64 = 2.0;
/// Largest pixel accepted by [`TipState::kernel`], m.
const MAX_PIXEL: f64 = 1e-4;
/// Largest length of a state (radius, flat radius), m.
const MAX_STATE_LENGTH: f64 = 1e-3;
/// Smallest apex radius of a state, m.
const MIN_STATE_RADIUS: f64 = 1e-12;
/// Largest second-apex offset or depth and adsorbate blur, m.
const MAX_FEATURE: f64 = 1e-6;

/// Efficacy of a pulse and a dip on a blunt apex.
const EFF_BLUNT: [f64; 2] = [0.5, 1.0];
/// Efficacy of a pulse and a dip on a double tip.
const EFF_DOUBLE: [f64; 2] = [0.4, 0.9];
/// Efficacy of a pulse and a dip on an adsorbate.
const EFF_ADSORBATE: [f64; 2] = [0.9, 0.4];
/// Probability that a worsening pulse / dip picks up an adsorbate.
const WORSEN_ADSORBATE: [f64; 2] = [0.4, 0.2];
/// Factor on `double_probability` for a worsening pulse / dip.
const WORSEN_DOUBLE: [f64; 2] = [0.5, 1.0];
/// Probability that a worsening dip flattens the apex.
const WORSEN_FLATTEN: f64 = 0.5;
/// Depth scale of a double tip's penalty in [`TipState::quality`], m.
const DOUBLE_DEPTH_SCALE: f64 = 1e-9;
/// Quality factor of a tip carrying an adsorbate.
const ADSORBATE_QUALITY: f64 = 0.7;
/// Most pick-ups applied in one [`TipState::spontaneous`] call.
const MAX_PICKUPS: u32 = 16;

/// Tip model settings (`[tip]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TipConfig {
    /// Apex radius of a new tip, m. Default 10 nm.
    pub initial_radius: Param<Length>,
    /// Sharpest apex radius conditioning can reach, m. Default 2 nm.
    pub min_radius: Param<Length>,
    /// A tip is good when its effective radius is at most this (and it is single and clean), m.
    /// Default 3 nm (1.5 × `min_radius`).
    pub good_radius: Param<Length>,
    /// Largest apex radius (growth is capped here), m. Default 100 nm.
    pub max_radius: Param<Length>,
    /// Probability that a new tip is double. Default 0.
    pub initial_double_probability: Param<Unitless>,
    /// Probability that a new tip carries an adsorbate. Default 0.
    pub initial_adsorbate_probability: Param<Unitless>,
    /// Apex radius growth per metre of tip travel in contact, m/m. Default 1e-7 (≈ 5 nm per
    /// 100 frames of 256 lines of 1 µm, trace and retrace).
    pub wear_rate: Param<Unitless>,
    /// Apex radius growth per metre of crash depth, m/m (times a `U(0.5, 1.5)` factor).
    /// Default 2.
    pub crash_growth: Param<Unitless>,
    /// Flat radius left by a crash of depth `δ`, as a fraction of the contact radius `√(2Rδ)`.
    /// Default 0.3.
    pub crash_flattening: Param<Unitless>,
    /// Rate of adsorbate pick-ups while scanning, 1/s. Default 2e-4 (one per ≈ 80 min).
    pub adsorbate_rate: Param<Frequency>,
    /// Probability that a crash or a pick-up forms a double tip (and, for a worsening dip, that
    /// it does; half this for a worsening pulse). Default 0.3.
    pub double_probability: Param<Unitless>,
    /// Largest lateral offset of a second apex, m (drawn in `[0.5, 1] ×` this, any direction).
    /// Default 2 nm.
    pub double_offset: Param<Length>,
    /// Largest depth of a second apex below the main one, m (drawn in `[0, 1] ×` this).
    /// Default 0.3 nm.
    pub double_dz: Param<Length>,
    /// Extra kernel radius an adsorbate causes (it smears features), m. Default 1 nm.
    pub adsorbate_blur: Param<Length>,
    /// Factor (≥ 1) on the image noise while an adsorbate is on the tip. Default 2.5.
    pub adsorbate_noise: Param<Unitless>,
    /// Probability per scan line of a glitch (streak) while an adsorbate is on the tip.
    /// Default 0.05.
    pub adsorbate_glitch: Param<Unitless>,
    /// `p_max`: the largest probability of a Sharpened outcome (≤ 0.95). Default 0.6.
    pub sharpen_max: Param<Unitless>,
    /// `ε`: share of the sharpening probability that a tip without defects keeps (scaled by its
    /// room to sharpen). Default 0.15.
    pub residual_improve: Param<Unitless>,
    /// `w₀`: worsening probability per unit of `g(s)`, at zero strength. Default 0.2.
    pub worsen_base: Param<Unitless>,
    /// `w₁`: increase of the worsening probability per unit strength (per unit `g(s)`).
    /// Default 0.2.
    pub worsen_slope: Param<Unitless>,
    /// `s_c`: strength scale of `g(s) = 1 - exp(-s/s_c)`. Default 0.3.
    pub strength_scale: Param<Unitless>,
    /// Exponent per unit strength of the apex reshaping when sharpened. Default 2.5.
    pub sharpen_rate: Param<Unitless>,
    /// Relative radius growth per unit strength when worsened (times `U(0.5, 1.5)`).
    /// Default 0.5.
    pub worsen_growth: Param<Unitless>,
    /// Wear of every conditioning action, whatever its outcome: apex radius growth per unit
    /// strength, m (times `U(0.5, 1.5)`; a dip indents the apex, a pulse melts and reshapes it).
    /// Default 0 (off; the STM tasks switch it on).
    pub conditioning_wear: Param<Length>,
}

impl Default for TipConfig {
    fn default() -> Self {
        Self {
            initial_radius: Param::fixed(10e-9),
            min_radius: Param::fixed(2e-9),
            good_radius: Param::fixed(3e-9),
            max_radius: Param::fixed(100e-9),
            initial_double_probability: Param::fixed(0.0),
            initial_adsorbate_probability: Param::fixed(0.0),
            wear_rate: Param::fixed(1e-7),
            crash_growth: Param::fixed(2.0),
            crash_flattening: Param::fixed(0.3),
            adsorbate_rate: Param::fixed(2e-4),
            double_probability: Param::fixed(0.3),
            double_offset: Param::fixed(2e-9),
            double_dz: Param::fixed(0.3e-9),
            adsorbate_blur: Param::fixed(1e-9),
            adsorbate_noise: Param::fixed(2.5),
            adsorbate_glitch: Param::fixed(0.05),
            sharpen_max: Param::fixed(0.6),
            residual_improve: Param::fixed(0.15),
            worsen_base: Param::fixed(0.2),
            worsen_slope: Param::fixed(0.2),
            strength_scale: Param::fixed(0.3),
            sharpen_rate: Param::fixed(2.5),
            worsen_growth: Param::fixed(0.5),
            conditioning_wear: Param::fixed(0.0),
        }
    }
}

impl TipConfig {
    /// Checks ranges; `prefix` names the section (e.g. `"tip."`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let range = |n: &str, v: f64, lo: f64, hi: f64| {
            if v >= lo && v <= hi {
                Ok(())
            } else {
                Err(PhysicsError::param(
                    format!("{prefix}{n}"),
                    format!("must be in [{lo}, {hi}], got {v}"),
                ))
            }
        };
        let (r0, rmin, rgood, rmax) = (
            self.initial_radius.get(),
            self.min_radius.get(),
            self.good_radius.get(),
            self.max_radius.get(),
        );
        range("min_radius", rmin, MIN_STATE_RADIUS, MAX_STATE_LENGTH)?;
        range("good_radius", rgood, rmin, MAX_STATE_LENGTH)?;
        range("max_radius", rmax, rgood, MAX_STATE_LENGTH)?;
        range("initial_radius", r0, rmin, rmax)?;
        for (n, v) in [
            (
                "initial_double_probability",
                &self.initial_double_probability,
            ),
            (
                "initial_adsorbate_probability",
                &self.initial_adsorbate_probability,
            ),
            ("double_probability", &self.double_probability),
            ("adsorbate_glitch", &self.adsorbate_glitch),
            ("residual_improve", &self.residual_improve),
            ("worsen_base", &self.worsen_base),
            ("worsen_slope", &self.worsen_slope),
        ] {
            range(n, v.get(), 0.0, 1.0)?;
        }
        range("sharpen_max", self.sharpen_max.get(), 0.0, 0.95)?;
        range("wear_rate", self.wear_rate.get(), 0.0, 1e-3)?;
        range("crash_growth", self.crash_growth.get(), 0.0, 100.0)?;
        range("crash_flattening", self.crash_flattening.get(), 0.0, 10.0)?;
        range("adsorbate_rate", self.adsorbate_rate.get(), 0.0, 1e3)?;
        range("double_offset", self.double_offset.get(), 0.0, MAX_FEATURE)?;
        range("double_dz", self.double_dz.get(), 0.0, MAX_FEATURE)?;
        range(
            "adsorbate_blur",
            self.adsorbate_blur.get(),
            0.0,
            MAX_FEATURE,
        )?;
        range("adsorbate_noise", self.adsorbate_noise.get(), 1.0, 100.0)?;
        range("strength_scale", self.strength_scale.get(), 1e-3, 10.0)?;
        range("sharpen_rate", self.sharpen_rate.get(), 0.0, 20.0)?;
        range("worsen_growth", self.worsen_growth.get(), 0.0, 10.0)?;
        range(
            "conditioning_wear",
            self.conditioning_wear.get(),
            0.0,
            MAX_FEATURE,
        )?;
        Ok(())
    }
}

/// A tip conditioning action (DeepSPM's action set, see [`Conditioning::deepspm_actions`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Conditioning {
    /// A bias pulse at the tip's position.
    Pulse {
        /// Pulse bias, V: `0 < |bias| ≤ 10 V`.
        bias: f64,
        /// Pulse duration, s: `(0, 10]`.
        duration: f64,
    },
    /// A controlled dip (poke) of the tip into the surface.
    Dip {
        /// How far the tip is pushed below its imaging height, m: `(0, 10 nm]`.
        depth: f64,
        /// Bias during the dip, V: `|bias| ≤ 1 V`.
        bias: f64,
        /// Dip duration, s: `(0, 10]`.
        duration: f64,
    },
}

impl Conditioning {
    /// A DeepSPM-style pulse of `bias` (V) for 200 ms.
    pub fn pulse(bias: f64) -> Self {
        Self::Pulse {
            bias,
            duration: DEEPSPM_DURATION,
        }
    }

    /// A DeepSPM-style dip of `depth` (m) at 20 mV for 200 ms.
    pub fn dip(depth: f64) -> Self {
        Self::Dip {
            depth,
            bias: DEEPSPM_DIP_BIAS,
            duration: DEEPSPM_DURATION,
        }
    }

    /// DeepSPM's twelve actions: the six pulses of [`DEEPSPM_PULSES`], then the six dips of
    /// [`DEEPSPM_DIPS`].
    pub fn deepspm_actions() -> [Self; 12] {
        std::array::from_fn(|k| {
            if k < 6 {
                Self::pulse(DEEPSPM_PULSES[k])
            } else {
                Self::dip(DEEPSPM_DIPS[k - 6])
            }
        })
    }

    /// Checks the arguments; the error names the offending one (`bias`, `depth`, `duration`).
    pub fn validate(&self) -> Result<()> {
        let duration = match *self {
            Self::Pulse { bias, duration } => {
                if !(bias.is_finite() && bias != 0.0 && bias.abs() <= MAX_PULSE_BIAS) {
                    return Err(PhysicsError::arg(
                        "bias",
                        format!("a pulse needs 0 < |bias| <= {MAX_PULSE_BIAS} V, got {bias}"),
                    ));
                }
                duration
            }
            Self::Dip {
                depth,
                bias,
                duration,
            } => {
                if !(depth > 0.0 && depth <= MAX_DIP_DEPTH) {
                    return Err(PhysicsError::arg(
                        "depth",
                        format!("a dip needs a depth in (0, 10 nm], got {depth} m"),
                    ));
                }
                if !(bias.is_finite() && bias.abs() <= MAX_DIP_BIAS) {
                    return Err(PhysicsError::arg(
                        "bias",
                        format!("a dip needs |bias| <= {MAX_DIP_BIAS} V, got {bias}"),
                    ));
                }
                duration
            }
        };
        if !(duration > 0.0 && duration <= MAX_DURATION) {
            return Err(PhysicsError::arg(
                "duration",
                format!("must be in (0, {MAX_DURATION}] s, got {duration}"),
            ));
        }
        Ok(())
    }

    /// The action's strength `s ∈ (0, 2]`: `|V|/8 V` for pulses, `δ/5 nm` for dips, times
    /// `(τ/0.2 s)^¼`, capped at 2. Errors as [`Conditioning::validate`].
    pub fn strength(&self) -> Result<f64> {
        self.validate()?;
        let (base, duration) = match *self {
            Self::Pulse { bias, duration } => (bias.abs() / 8.0, duration),
            Self::Dip {
                depth, duration, ..
            } => (depth / 5e-9, duration),
        };
        Ok((base * (duration / DEEPSPM_DURATION).powf(0.25)).min(MAX_STRENGTH))
    }

    /// 0 for pulses, 1 for dips (the column of the efficacy tables).
    fn column(&self) -> usize {
        match self {
            Self::Pulse { .. } => 0,
            Self::Dip { .. } => 1,
        }
    }
}

/// What a conditioning action did to the tip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The tip improved: smaller apex, and possibly a double tip or adsorbate removed.
    Sharpened,
    /// Nothing changed.
    Unchanged,
    /// The tip got worse: larger apex, and possibly blunted, doubled or contaminated.
    Worsened,
}

/// A second apex (double tip).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecondApex {
    /// Offset `d = [dx, dy]` of the second apex in the kernel `t`, m (`x` along columns, `y`
    /// along rows): a feature at `p` is imaged again at `p + d`. `|dx|, |dy| ≤ 1 µm`.
    pub offset: [f64; 2],
    /// How far the second apex lies below the main one (in `t`), m, `0 ≤ dz ≤ 1 µm`.
    pub dz: f64,
}

/// An adsorbate on the tip: it smears features and makes the images noisy and streaky.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adsorbate {
    /// Extra kernel radius, m, in `[0, 1 µm]`.
    pub blur: f64,
    /// Factor on the image noise, in `[1, 100]`.
    pub noise_factor: f64,
    /// Probability per scan line of a glitch, in `[0, 1]`.
    pub glitch_probability: f64,
}

impl Adsorbate {
    /// The adsorbate a [`TipConfig`] describes.
    pub fn from_config(cfg: &TipConfig) -> Self {
        Self {
            blur: cfg.adsorbate_blur.get(),
            noise_factor: cfg.adsorbate_noise.get(),
            glitch_probability: cfg.adsorbate_glitch.get(),
        }
    }
}

/// The hidden state of the tip. Built by [`TipState::new`] or [`TipState::sharp`] and the
/// `with_*` builders, which validate; changed by wear, crashes, pick-ups and conditioning.
#[derive(Debug, Clone, PartialEq)]
pub struct TipState {
    radius: f64,
    flat_radius: f64,
    second: Option<SecondApex>,
    adsorbate: Option<Adsorbate>,
}

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

impl TipState {
    /// A new tip from `cfg` (validated): radius `initial_radius`, double with probability
    /// `initial_double_probability`, carrying an adsorbate with probability
    /// `initial_adsorbate_probability`.
    pub fn new(cfg: &TipConfig, rng: &mut SimRng) -> Result<Self> {
        cfg.validate("tip.")?;
        let mut s = Self::sharp(cfg.initial_radius.get())?;
        let (u_double, u_ads) = (uniform(rng), uniform(rng));
        if u_double < cfg.initial_double_probability.get() {
            s.second = Some(draw_second(cfg, rng));
        }
        if u_ads < cfg.initial_adsorbate_probability.get() {
            s.adsorbate = Some(Adsorbate::from_config(cfg));
        }
        Ok(s)
    }

    /// A single clean paraboloid tip of apex radius `radius` (m, in `[1e-12, 1e-3]`).
    pub fn sharp(radius: f64) -> Result<Self> {
        check_arg("radius", radius, MIN_STATE_RADIUS, MAX_STATE_LENGTH, "m")?;
        Ok(Self {
            radius,
            flat_radius: 0.0,
            second: None,
            adsorbate: None,
        })
    }

    /// The same tip blunted to a flat apex of radius `flat_radius` (m, in `[0, 1e-3]`).
    pub fn with_flat_radius(mut self, flat_radius: f64) -> Result<Self> {
        check_arg("flat_radius", flat_radius, 0.0, MAX_STATE_LENGTH, "m")?;
        self.flat_radius = flat_radius;
        Ok(self)
    }

    /// The same tip with a second apex (`None`: single).
    pub fn with_second_apex(mut self, second: Option<SecondApex>) -> Result<Self> {
        if let Some(d) = second {
            check_arg("offset", d.offset[0], -MAX_FEATURE, MAX_FEATURE, "m")?;
            check_arg("offset", d.offset[1], -MAX_FEATURE, MAX_FEATURE, "m")?;
            check_arg("dz", d.dz, 0.0, MAX_FEATURE, "m")?;
        }
        self.second = second;
        Ok(self)
    }

    /// The same tip carrying `adsorbate` (`None`: clean).
    pub fn with_adsorbate(mut self, adsorbate: Option<Adsorbate>) -> Result<Self> {
        if let Some(a) = adsorbate {
            check_arg("blur", a.blur, 0.0, MAX_FEATURE, "m")?;
            check_arg("noise_factor", a.noise_factor, 1.0, 100.0, "")?;
            check_arg("glitch_probability", a.glitch_probability, 0.0, 1.0, "")?;
        }
        self.adsorbate = adsorbate;
        Ok(self)
    }

    /// Apex radius `R`, m.
    pub fn radius(&self) -> f64 {
        self.radius
    }

    /// Radius `a` of the flat (blunted) apex, m (0: none).
    pub fn flat_radius(&self) -> f64 {
        self.flat_radius
    }

    /// The second apex, if the tip is double.
    pub fn second_apex(&self) -> Option<SecondApex> {
        self.second
    }

    /// The adsorbate, if any.
    pub fn adsorbate(&self) -> Option<Adsorbate> {
        self.adsorbate
    }

    /// Whether the tip is double.
    pub fn is_double(&self) -> bool {
        self.second.is_some()
    }

    /// Whether an adsorbate sits on the tip.
    pub fn has_adsorbate(&self) -> bool {
        self.adsorbate.is_some()
    }

    /// The kernel's paraboloid radius `R_k = R + b` (`b` the adsorbate's blur), m.
    pub fn kernel_radius(&self) -> f64 {
        self.radius + self.adsorbate.map_or(0.0, |a| a.blur)
    }

    /// The effective radius `R_eff = R + a + b`, m: how wide the tip images a point.
    pub fn effective_radius(&self) -> f64 {
        self.kernel_radius() + self.flat_radius
    }

    /// Factor (≥ 1) on the image noise: the adsorbate's, 1 without one.
    pub fn noise_factor(&self) -> f64 {
        self.adsorbate.map_or(1.0, |a| a.noise_factor)
    }

    /// Probability per scan line that the simulator adds a glitch (a streak): the adsorbate's,
    /// 0 without one.
    pub fn glitch_probability(&self) -> f64 {
        self.adsorbate.map_or(0.0, |a| a.glitch_probability)
    }

    /// Tip quality in `[0, 1]` (1 = ideal): `q_R · q_D · q_A` with
    /// `q_R = clamp(ln(R_max/R_eff) / ln(R_max/R_min), 0, 1)`, `q_D = 1 - 0.5·exp(-dz/1 nm)`
    /// for a double tip (1 otherwise) and `q_A = 0.7` with an adsorbate (1 otherwise).
    pub fn quality(&self, cfg: &TipConfig) -> f64 {
        let (rmin, rmax) = (cfg.min_radius.get(), cfg.max_radius.get());
        let q_r = if rmax > rmin {
            ((rmax / self.effective_radius()).ln() / (rmax / rmin).ln()).clamp(0.0, 1.0)
        } else if self.effective_radius() <= rmin {
            1.0
        } else {
            0.0
        };
        let q_d = self
            .second
            .map_or(1.0, |d| 1.0 - 0.5 * (-d.dz / DOUBLE_DEPTH_SCALE).exp());
        let q_a = if self.has_adsorbate() {
            ADSORBATE_QUALITY
        } else {
            1.0
        };
        let q = q_r * q_d * q_a;
        if q.is_nan() { 0.0 } else { q }
    }

    /// Whether the tip is good: single, clean, and `R_eff ≤ good_radius`.
    pub fn is_good(&self, cfg: &TipConfig) -> bool {
        self.second.is_none()
            && self.adsorbate.is_none()
            && self.effective_radius() <= cfg.good_radius.get()
    }

    /// `[P(Sharpened), P(Unchanged), P(Worsened)]` of `action` on this tip (the model in the
    /// module docs). Errors if the action's arguments are out of range.
    pub fn probabilities(&self, action: &Conditioning, cfg: &TipConfig) -> Result<[f64; 3]> {
        let s = action.strength()?;
        let col = action.column();
        let n = self.need(col, cfg);
        let r = self.room(cfg);
        let g = 1.0 - (-s / cfg.strength_scale.get()).exp();
        let eps = cfg.residual_improve.get();
        let mut p_s = cfg.sharpen_max.get() * g * (eps * r + (1.0 - eps) * n);
        let mut p_w = g * (cfg.worsen_base.get() + cfg.worsen_slope.get() * s) * (1.0 - 0.5 * n);
        p_s = if p_s.is_finite() { p_s.max(0.0) } else { 0.0 };
        p_w = if p_w.is_finite() { p_w.max(0.0) } else { 0.0 };
        let sum = p_s + p_w;
        if sum > 1.0 {
            p_s /= sum;
            p_w /= sum;
        }
        Ok([p_s, (1.0 - p_s - p_w).max(0.0), p_w])
    }

    /// The blunt apex's need `n_b = 1 - exp(-2(R_eff - R_good)₊ / R_good)`.
    fn blunt_need(&self, cfg: &TipConfig) -> f64 {
        let good = cfg.good_radius.get();
        let excess = (self.effective_radius() - good).max(0.0);
        let n = 1.0 - (-2.0 * excess / good).exp();
        if n.is_finite() { n } else { 0.0 }
    }

    /// The action's need `n = max(e_b·n_b, e_d·D, e_a·A)`.
    fn need(&self, col: usize, cfg: &TipConfig) -> f64 {
        let d = if self.is_double() {
            EFF_DOUBLE[col]
        } else {
            0.0
        };
        let a = if self.has_adsorbate() {
            EFF_ADSORBATE[col]
        } else {
            0.0
        };
        (EFF_BLUNT[col] * self.blunt_need(cfg)).max(d).max(a)
    }

    /// Room to sharpen `r = clamp((R_eff - R_min)/(R_good - R_min), 0, 1)`.
    fn room(&self, cfg: &TipConfig) -> f64 {
        let (rmin, good) = (cfg.min_radius.get(), cfg.good_radius.get());
        let excess = self.effective_radius() - rmin;
        if !(excess > 0.0) {
            return 0.0;
        }
        if good > rmin {
            (excess / (good - rmin)).min(1.0)
        } else {
            1.0
        }
    }

    /// Applies a conditioning action: draws the outcome from
    /// [`TipState::probabilities`] and changes the tip accordingly (see the module docs).
    /// Errors, leaving the tip unchanged, if the action's arguments are out of range.
    pub fn condition(
        &mut self,
        action: &Conditioning,
        cfg: &TipConfig,
        rng: &mut SimRng,
    ) -> Result<Outcome> {
        let [p_s, _, p_w] = self.probabilities(action, cfg)?;
        let s = action.strength()?;
        let col = action.column();
        let u = uniform(rng);
        let outcome = if u < p_s {
            self.sharpen(s, col, cfg, rng);
            Outcome::Sharpened
        } else if u < p_s + p_w {
            self.worsen(action, s, col, cfg, rng);
            Outcome::Worsened
        } else {
            Outcome::Unchanged
        };
        // Wear of the action itself (drawn only when on, so the default stream is unchanged).
        let wear = cfg.conditioning_wear.get();
        if wear > 0.0 {
            let u = jitter(rng);
            self.grow_radius(self.radius + wear * s * u, cfg);
        }
        Ok(outcome)
    }

    fn sharpen(&mut self, s: f64, col: usize, cfg: &TipConfig, rng: &mut SimRng) {
        let rmin = cfg.min_radius.get();
        let shrink = (-cfg.sharpen_rate.get() * s * EFF_BLUNT[col]).exp();
        let target = rmin + (self.radius - rmin) * shrink;
        if target < self.radius {
            self.radius = target;
        }
        self.flat_radius *= shrink;
        let (e_d, e_a) = (EFF_DOUBLE[col], EFF_ADSORBATE[col]);
        let (u_pick, u_other) = (uniform(rng), uniform(rng));
        match (self.second.is_some(), self.adsorbate.is_some()) {
            (true, true) => {
                // One goes for sure (picked ∝ efficacy), the other with its efficacy.
                if u_pick < e_d / (e_d + e_a) {
                    self.second = None;
                    if u_other < e_a {
                        self.adsorbate = None;
                    }
                } else {
                    self.adsorbate = None;
                    if u_other < e_d {
                        self.second = None;
                    }
                }
            }
            (true, false) => self.second = None,
            (false, true) => self.adsorbate = None,
            (false, false) => {}
        }
    }

    fn worsen(
        &mut self,
        action: &Conditioning,
        s: f64,
        col: usize,
        cfg: &TipConfig,
        rng: &mut SimRng,
    ) {
        let (u_grow, u_flat, u_flat_size, u_double, u_ads) = (
            jitter(rng),
            uniform(rng),
            jitter(rng),
            uniform(rng),
            uniform(rng),
        );
        let r_old = self.radius;
        self.grow_radius(r_old * (1.0 + cfg.worsen_growth.get() * s * u_grow), cfg);
        if let Conditioning::Dip { depth, .. } = *action {
            if u_flat < WORSEN_FLATTEN {
                let a = cfg.crash_flattening.get() * (2.0 * r_old * depth).sqrt() * u_flat_size;
                self.grow_flat(a, cfg);
            }
        }
        if self.second.is_none() && u_double < cfg.double_probability.get() * WORSEN_DOUBLE[col] {
            self.second = Some(draw_second(cfg, rng));
        }
        if self.adsorbate.is_none() && u_ads < WORSEN_ADSORBATE[col] {
            self.adsorbate = Some(Adsorbate::from_config(cfg));
        }
    }

    /// Sets `R` to `new` capped at `max_radius`, never decreasing it (NaN leaves it).
    fn grow_radius(&mut self, new: f64, cfg: &TipConfig) {
        let capped = new.min(cfg.max_radius.get());
        if capped > self.radius {
            self.radius = capped;
        }
    }

    /// Sets the flat radius to `new` capped at `max_radius`, never decreasing it.
    fn grow_flat(&mut self, new: f64, cfg: &TipConfig) {
        let capped = new.min(cfg.max_radius.get());
        if capped > self.flat_radius {
            self.flat_radius = capped;
        }
    }

    /// Wear from `contact_travel` (m, ≥ 0) of tip travel in contact:
    /// `R += wear_rate · L · u`, `u ~ U(0.5, 1.5)`, capped at `max_radius`.
    pub fn wear(&mut self, contact_travel: f64, cfg: &TipConfig, rng: &mut SimRng) -> Result<()> {
        if !(contact_travel >= 0.0 && contact_travel.is_finite()) {
            return Err(PhysicsError::arg(
                "contact_travel",
                format!("must be a finite length >= 0 m, got {contact_travel}"),
            ));
        }
        let u = jitter(rng);
        self.grow_radius(self.radius + cfg.wear_rate.get() * contact_travel * u, cfg);
        Ok(())
    }

    /// A crash `depth` (m, ≥ 0) into the surface: `R += crash_growth · δ · u`, the apex flattened
    /// to `a ≥ crash_flattening · √(2Rδ)`, and a second apex with probability
    /// `double_probability` (if there is none). A zero depth changes nothing.
    pub fn crash(&mut self, depth: f64, cfg: &TipConfig, rng: &mut SimRng) -> Result<()> {
        if !(depth >= 0.0 && depth.is_finite()) {
            return Err(PhysicsError::arg(
                "depth",
                format!("must be a finite length >= 0 m, got {depth}"),
            ));
        }
        if depth == 0.0 {
            return Ok(());
        }
        let (u, u_double) = (jitter(rng), uniform(rng));
        let r_old = self.radius;
        self.grow_radius(r_old + cfg.crash_growth.get() * depth * u, cfg);
        self.grow_flat(
            cfg.crash_flattening.get() * (2.0 * r_old * depth).sqrt(),
            cfg,
        );
        if self.second.is_none() && u_double < cfg.double_probability.get() {
            self.second = Some(draw_second(cfg, rng));
        }
        Ok(())
    }

    /// Spontaneous changes while scanning for `scan_time` (s, ≥ 0): `k ~ Poisson(adsorbate_rate
    /// · T)` pick-ups (at most 16 applied), each forming a second apex with probability
    /// `double_probability` and otherwise an adsorbate (nothing if the tip already has that
    /// defect). The apex radius does not change.
    pub fn spontaneous(&mut self, scan_time: f64, cfg: &TipConfig, rng: &mut SimRng) -> Result<()> {
        if !(scan_time >= 0.0 && scan_time.is_finite()) {
            return Err(PhysicsError::arg(
                "scan_time",
                format!("must be a finite time >= 0 s, got {scan_time}"),
            ));
        }
        let k =
            poisson(rng, cfg.adsorbate_rate.get() * scan_time).min(f64::from(MAX_PICKUPS)) as u32;
        for _ in 0..k {
            self.pick_up(cfg, rng);
        }
        Ok(())
    }

    /// One pick-up of material by the apex (a contaminant while scanning, an adatom the tip
    /// takes during a manipulation): with probability `double_probability` it forms a second
    /// apex (a double tip), otherwise it sits on the apex as an adsorbate ([`Adsorbate`]: the
    /// kernel radius grows by `adsorbate_blur`, the images get `adsorbate_noise` times noisier
    /// and streaky). Nothing changes if the tip already has that defect.
    pub fn pick_up(&mut self, cfg: &TipConfig, rng: &mut SimRng) {
        if uniform(rng) < cfg.double_probability.get() {
            if self.second.is_none() {
                self.second = Some(draw_second(cfg, rng));
            }
        } else if self.adsorbate.is_none() {
            self.adsorbate = Some(Adsorbate::from_config(cfg));
        }
    }

    /// A good kernel side (pixels, odd, at most [`MAX_KERNEL_SIDE`]) for imaging a surface of
    /// relief `depth` (m) on a `pixel` (m) grid: the half-width `⌈√(2R_k·depth)/pixel⌉ +
    /// ⌈a/pixel⌉ + ⌈max(|dx|, |dy|)/pixel⌉` (the last for a double tip), so that the kernel's
    /// edge lies at least `depth` below each apex. A non-positive or non-finite `pixel` gives 1;
    /// a negative or NaN `depth` counts as 0.
    pub fn kernel_side(&self, pixel: f64, depth: f64) -> usize {
        if !(pixel > 0.0 && pixel.is_finite()) {
            return 1;
        }
        let depth = if depth > 0.0 { depth } else { 0.0 };
        let cap = (MAX_KERNEL_SIDE / 2) as f64;
        let cells = |len: f64| (len / pixel * (1.0 - 1e-12)).ceil().max(0.0);
        let mut half = cells((2.0 * self.kernel_radius() * depth).sqrt()) + cells(self.flat_radius);
        if let Some(d) = self.second {
            half += cells(d.offset[0].abs().max(d.offset[1].abs()));
        }
        let half = if half.is_nan() { cap } else { half.min(cap) };
        2 * half as usize + 1
    }

    /// The dilation kernel `t` on a `pixel` grid (m, in `(0, 1e-4]`) of `side × side` pixels
    /// (odd, at most [`MAX_TIP_SIDE`]): apex at 0, heights ≤ 0 (see the module docs). A blunted
    /// apex is [`Tip::worn`]: the flat disc swept by the paraboloid(s) on the grid, `-∞` in the
    /// window's corners that the sweep does not reach (deeper than the window's edge).
    pub fn kernel(&self, pixel: f64, side: usize) -> Result<Tip> {
        if !(pixel > 0.0 && pixel <= MAX_PIXEL) {
            return Err(PhysicsError::arg(
                "pixel",
                format!("must be in (0, {MAX_PIXEL}] m, got {pixel}"),
            ));
        }
        if side % 2 == 0 || side > MAX_TIP_SIDE {
            return Err(PhysicsError::arg(
                "side",
                format!("must be odd and at most {MAX_TIP_SIDE}, got {side}"),
            ));
        }
        let rk = self.kernel_radius();
        let a = self.flat_radius;
        match (a > 0.0, self.second) {
            (false, None) => Tip::paraboloid(rk, pixel, side),
            (false, Some(d)) => Tip::double(rk, pixel, side, d.offset, d.dz),
            (true, second) => Tip::worn(rk, a, pixel, side, second.map(|d| (d.offset, d.dz))),
        }
    }
}

/// A random second apex: offset `[0.5, 1] × double_offset` in a uniform direction, depth
/// `[0, 1] × double_dz`.
fn draw_second(cfg: &TipConfig, rng: &mut SimRng) -> SecondApex {
    let (u_r, u_phi, u_z) = (uniform(rng), uniform(rng), uniform(rng));
    let r = cfg.double_offset.get() * (0.5 + 0.5 * u_r);
    let phi = std::f64::consts::TAU * u_phi;
    SecondApex {
        offset: [r * phi.cos(), r * phi.sin()],
        dz: cfg.double_dz.get() * u_z,
    }
}

/// 3×3 median filter of a row-major image `cols` wide (edges repeat the border pixels) into
/// `out` (the same size). Each median comes from a fixed network of 19 compare-exchanges, so
/// values must be ordered (finite floats).
pub fn median_filter_3x3<T: Copy + PartialOrd>(img: &[T], cols: usize, out: &mut [T]) {
    if cols == 0 {
        return;
    }
    let rows = img.len() / cols;
    for i in 0..rows {
        let rs = [i.saturating_sub(1), i, (i + 1).min(rows - 1)];
        for j in 0..cols {
            let cs = [j.saturating_sub(1), j, (j + 1).min(cols - 1)];
            let w: [T; 9] = std::array::from_fn(|k| img[rs[k / 3] * cols + cs[k % 3]]);
            out[i * cols + j] = median9(w);
        }
    }
}

/// The median of nine ordered values by a fixed network of 19 compare-exchanges (on locals, so
/// it compiles to branch-free min/max selects).
#[inline]
pub fn median9<T: Copy + PartialOrd>(p: [T; 9]) -> T {
    #[inline(always)]
    fn cx<T: Copy + PartialOrd>(a: &mut T, b: &mut T) {
        let (x, y) = (*a, *b);
        let swap = x > y;
        *a = if swap { y } else { x };
        *b = if swap { x } else { y };
    }
    let [
        mut p0,
        mut p1,
        mut p2,
        mut p3,
        mut p4,
        mut p5,
        mut p6,
        mut p7,
        mut p8,
    ] = p;
    cx(&mut p1, &mut p2);
    cx(&mut p4, &mut p5);
    cx(&mut p7, &mut p8);
    cx(&mut p0, &mut p1);
    cx(&mut p3, &mut p4);
    cx(&mut p6, &mut p7);
    cx(&mut p1, &mut p2);
    cx(&mut p4, &mut p5);
    cx(&mut p7, &mut p8);
    cx(&mut p0, &mut p3);
    cx(&mut p5, &mut p8);
    cx(&mut p4, &mut p7);
    cx(&mut p3, &mut p6);
    cx(&mut p1, &mut p4);
    cx(&mut p2, &mut p5);
    cx(&mut p4, &mut p7);
    cx(&mut p4, &mut p2);
    cx(&mut p6, &mut p4);
    cx(&mut p4, &mut p2);
    let _ = (p0, p1, p3, p5, p6, p7, p8);
    p4
}

/// A noise-robust sharpness statistic: the inverse apparent feature width, in 1/pixel,
/// estimated from the image autocorrelation at lags 1 and 2 (never lag 0, where white noise
/// lives). Each row is first levelled by its median (standard SPM line flattening, which also
/// removes line offsets), then the image passes a 3×3 median filter (which removes
/// single-line glitches and most white noise). For features with a Gaussian autocorrelation `C(l) ∝ exp(-l²/4σ²)`,
/// `ln(C(1)/C(2)) = 3/(4σ²)`, so each axis gives `1/σ = sqrt(4 ln(C(1)/C(2)) / 3)`; the result
/// is the mean over the fast and slow axes (a double tip broadens the autocorrelation along its
/// offset). Blunter, doubled or blurred tips give smaller values; white noise and line offsets
/// do not raise it, and noise correlated along a line (glitches) lowers it. An axis whose
/// neighbour correlation `C(1)/C(0)` in the unfiltered levelled image is below 0.1 (nothing
/// resolved above the noise) contributes 0, and `C(2)` is floored at `C(1)/100`, so the value lies in `[0, 2.48]`.
/// Images smaller than 3×3 or with non-finite values give 0.
pub fn feature_sharpness(image: ArrayView2<'_, f32>) -> f64 {
    let (rows, cols) = image.dim();
    if rows < 3 || cols < 3 || image.iter().any(|v| !v.is_finite()) {
        return 0.0;
    }
    let mut lev = ndarray::Array2::<f64>::zeros((rows, cols));
    let mut buf: Vec<f64> = Vec::with_capacity(cols);
    for (i, row) in image.rows().into_iter().enumerate() {
        buf.clear();
        buf.extend(row.iter().map(|&v| f64::from(v)));
        let (_, &mut med, _) = buf.select_nth_unstable_by(cols / 2, f64::total_cmp);
        for (j, &v) in row.iter().enumerate() {
            lev[[i, j]] = f64::from(v) - med;
        }
    }
    // A 3×3 median removes single-line glitches and most white noise, keeps features wider
    // than a pixel.
    let mut med = ndarray::Array2::<f64>::zeros((rows, cols));
    median_filter_3x3(
        lev.as_slice().expect("standard layout"),
        cols,
        med.as_slice_mut().expect("standard layout"),
    );
    let centred = |mut a: ndarray::Array2<f64>| {
        let mean = a.mean().unwrap_or(0.0);
        a.mapv_inplace(|v| v - mean);
        a
    };
    let (raw, med) = (centred(lev), centred(med));
    let acf = |a: &ndarray::Array2<f64>, di: usize, dj: usize| -> f64 {
        let mut sum = 0.0;
        for i in 0..rows - di {
            for j in 0..cols - dj {
                sum += a[[i, j]] * a[[i + di, j + dj]];
            }
        }
        sum / ((rows - di) * (cols - dj)) as f64
    };
    // The gate uses the unfiltered image (the median filter itself correlates noise).
    let c0 = acf(&raw, 0, 0);
    let axis = |di: usize, dj: usize| -> f64 {
        if !(c0 > 0.0 && acf(&raw, di, dj) > 0.1 * c0) {
            return 0.0;
        }
        let (c1, c2) = (acf(&med, di, dj), acf(&med, 2 * di, 2 * dj));
        if !(c1 > 0.0) {
            return 0.0;
        }
        let ratio = c1 / c2.max(0.01 * c1);
        (4.0 * ratio.ln().max(0.0) / 3.0).sqrt()
    };
    0.5 * (axis(0, 1) + axis(1, 0))
}

/// An image sharpness statistic from the observation alone: the mean squared difference of
/// neighbouring pixels (along rows and along columns, summed) over the image variance,
/// `(⟨(∂ₓI)²⟩ + ⟨(∂ᵧI)²⟩) / var(I)`, in 1/pixel². It is invariant to the height scale and offset,
/// grows as features get narrower (for features of width `w` pixels it scales like `1/w²`), and
/// lies in `[0, 8]` up to edge effects (8 for a checkerboard). A flat image, an image with
/// fewer than two pixels, or one with non-finite values gives 0.
///
/// Limits: noise raises it (white noise alone gives ≈ 4), so compare images of similar noise;
/// and a very flat apex that images sparse features as plateaus covering most of the field, with
/// steep edges, can score as high as a sharper tip. A kernel truncated at [`MAX_KERNEL_SIDE`]
/// has the same effect (vertical sides), so choose the pixel so that [`TipState::kernel_side`]
/// stays below the cap.
pub fn sharpness(image: ArrayView2<'_, f32>) -> f64 {
    let (rows, cols) = image.dim();
    let n = rows * cols;
    if n < 2 || image.iter().any(|v| !v.is_finite()) {
        return 0.0;
    }
    let mean = image.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    let var = image
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n as f64;
    if !(var > 0.0) {
        return 0.0;
    }
    let mut energy = 0.0;
    if cols > 1 {
        let mut sum = 0.0;
        for row in image.rows() {
            for w in 0..cols - 1 {
                sum += (f64::from(row[w + 1]) - f64::from(row[w])).powi(2);
            }
        }
        energy += sum / (rows * (cols - 1)) as f64;
    }
    if rows > 1 {
        let mut sum = 0.0;
        for i in 0..rows - 1 {
            for (a, b) in image.row(i).iter().zip(image.row(i + 1).iter()) {
                sum += (f64::from(*b) - f64::from(*a)).powi(2);
            }
        }
        energy += sum / ((rows - 1) * cols) as f64;
    }
    let out = energy / var;
    if out.is_finite() { out } else { 0.0 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_median_network_equals_the_middle_of_the_sorted_values() {
        use rand::Rng;
        let mut rng = crate::rng::seeded(4);
        for _ in 0..20_000 {
            // Few distinct values, so ties are common too.
            let w: [f32; 9] = std::array::from_fn(|_| (rng.random::<u32>() % 7) as f32 - 3.0);
            let mut s = w;
            s.sort_by(f32::total_cmp);
            assert_eq!(super::median9(w), s[4], "{w:?}");
            let w: [f64; 9] = std::array::from_fn(|_| rng.random::<f64>());
            let mut s = w;
            s.sort_by(f64::total_cmp);
            assert_eq!(super::median9(w), s[4], "{w:?}");
        }
    }

    #[test]
    fn feature_sharpness_measures_width_and_ignores_white_noise() {
        use crate::rng::{normal, seeded};
        // Gaussian bumps of standard deviation w px, 24 px apart: C(l) ∝ exp(-l²/4w²), so the
        // statistic is 1/w.
        let bumps = |w: f64, noise: f64, seed: u64| {
            let mut rng = seeded(seed);
            let n = 128;
            ndarray::Array2::from_shape_fn((n, n), |(i, j)| {
                let mut h = 0.0;
                for ci in (8..n).step_by(24) {
                    for cj in (8..n).step_by(24) {
                        let d2 = ((i as f64 - ci as f64).powi(2) + (j as f64 - cj as f64).powi(2))
                            / (2.0 * w * w);
                        h += (-d2).exp();
                    }
                }
                (h + noise * normal(&mut rng)) as f32
            })
        };
        // (Row levelling and mean removal bias wide features up a little.)
        let mut last = f64::INFINITY;
        for w in [1.5, 2.5, 4.0] {
            let s = feature_sharpness(bumps(w, 0.0, 1).view());
            let expect = 1.0 / w;
            assert!((s / expect - 1.0).abs() < 0.25, "w {w}: {s} vs {expect}");
            assert!(s < last);
            last = s;
        }
        let (clean, noisy) = (
            feature_sharpness(bumps(2.5, 0.0, 1).view()),
            feature_sharpness(bumps(2.5, 0.1, 2).view()),
        );
        assert!((noisy / clean - 1.0).abs() < 0.15, "{clean} vs {noisy}");
        // Pure white noise has no features; a flat image gives 0.
        let mut rng = seeded(3);
        let white = ndarray::Array2::from_shape_fn((64, 64), |_| normal(&mut rng) as f32);
        assert!(feature_sharpness(white.view()) < 0.3 * clean);
        assert_eq!(
            feature_sharpness(ndarray::Array2::<f32>::zeros((8, 8)).view()),
            0.0
        );
    }

    use super::*;
    use crate::rng::seeded;
    use crate::spm::dilation::dilate;
    use ndarray::Array2;
    use proptest::prelude::*;

    const NM: f64 = 1e-9;

    /// Sparse Gaussian bumps (σ 0.3 nm, 0.3-1 nm tall) on a flat background, 0.25 nm pixels.
    fn bumps(n: usize, count: usize, seed: u64) -> (Array2<f32>, f64) {
        let pixel = 0.25 * NM;
        let mut rng = seeded(seed);
        let sites: Vec<(f64, f64, f64)> = (0..count)
            .map(|_| {
                (
                    uniform(&mut rng) * n as f64,
                    uniform(&mut rng) * n as f64,
                    (0.3 + 0.7 * uniform(&mut rng)) * NM,
                )
            })
            .collect();
        let sigma = 0.3 * NM;
        let s = Array2::from_shape_fn((n, n), |(i, j)| {
            let mut h = 0.0f64;
            for &(y, x, a) in &sites {
                let r2 = ((i as f64 - y).powi(2) + (j as f64 - x).powi(2)) * pixel * pixel;
                h = h.max(a * (-r2 / (2.0 * sigma * sigma)).exp());
            }
            h as f32
        });
        (s, pixel)
    }

    fn image_sharpness(surface: &Array2<f32>, pixel: f64, tip: &TipState) -> f64 {
        let relief = f64::from(surface.iter().cloned().fold(f32::MIN, f32::max));
        let kernel = tip.kernel(pixel, tip.kernel_side(pixel, relief)).unwrap();
        sharpness(dilate(surface.view(), &kernel).view())
    }

    fn field(e: PhysicsError) -> String {
        match e {
            PhysicsError::InvalidParameter { field, .. } => field,
            PhysicsError::InvalidArgument { argument, .. } => argument,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn sharpness_is_scale_invariant_and_falls_with_feature_width() {
        // Flat image: 0, finite.
        assert_eq!(sharpness(Array2::<f32>::from_elem((8, 8), 3.0).view()), 0.0);
        assert_eq!(sharpness(Array2::<f32>::zeros((1, 1)).view()), 0.0);
        // Checkerboard: every neighbour differs by 2σ → 4 + 4 over σ² = 1.
        let cb =
            Array2::from_shape_fn((16, 16), |(i, j)| if (i + j) % 2 == 0 { 1.0 } else { -1.0 });
        assert!((sharpness(cb.view()) - 8.0).abs() < 1e-12);
        // A sinusoid along x with period P pixels: ⟨(ΔI)²⟩/var = 2(1 - cos(2π/P)).
        for p in [8.0f64, 16.0, 32.0] {
            let img = Array2::from_shape_fn((4, 64), |(_, j)| {
                (std::f64::consts::TAU * j as f64 / p).sin() as f32
            });
            let expected = 2.0 * (1.0 - (std::f64::consts::TAU / p).cos());
            let got = sharpness(img.view());
            assert!(
                (got - expected).abs() < 0.02 * expected,
                "P={p}: {got} vs {expected}"
            );
            let scaled = img.mapv(|v| 7.0 * v - 2.0);
            assert!((sharpness(scaled.view()) - got).abs() < 1e-5 * got);
        }
        let mut nan = Array2::<f32>::zeros((4, 4));
        nan[[1, 1]] = f32::NAN;
        assert_eq!(sharpness(nan.view()), 0.0);
    }

    #[test]
    fn blunter_tips_give_lower_sharpness() {
        let (surface, pixel) = bumps(64, 8, 5);
        let by_radius: Vec<f64> = [2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
            .iter()
            .map(|&r| image_sharpness(&surface, pixel, &TipState::sharp(r * NM).unwrap()))
            .collect();
        let by_flat: Vec<f64> = [0.0, 0.5, 1.0, 2.0]
            .iter()
            .map(|&a| {
                let tip = TipState::sharp(4.0 * NM)
                    .unwrap()
                    .with_flat_radius(a * NM)
                    .unwrap();
                image_sharpness(&surface, pixel, &tip)
            })
            .collect();
        println!("sharpness by R {by_radius:?}, by flat radius {by_flat:?}");
        // (Much flatter apexes image the sparse bumps as plateaus that cover most of the field,
        // with edges as steep as the sharp tip's: the statistic cannot see that, see `sharpness`.)
        assert!(by_radius.windows(2).all(|w| w[1] < w[0]), "{by_radius:?}");
        assert!(by_flat.windows(2).all(|w| w[1] < w[0]), "{by_flat:?}");
    }

    #[test]
    fn conditioning_changes_later_images() {
        // Margin: every Sharpened event raises the image sharpness by more than 3 %, every
        // Worsened event lowers it by more than 3 %.
        const MARGIN: f64 = 0.03;
        let (surface, pixel) = bumps(64, 8, 5);
        let cfg = TipConfig::default();
        let starts = [
            TipState::sharp(12.0 * NM).unwrap(),
            TipState::sharp(6.0 * NM)
                .unwrap()
                .with_second_apex(Some(SecondApex {
                    offset: [1.5 * NM, -0.5 * NM],
                    dz: 0.1 * NM,
                }))
                .unwrap(),
            TipState::sharp(5.0 * NM)
                .unwrap()
                .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
                .unwrap(),
            TipState::sharp(4.0 * NM)
                .unwrap()
                .with_flat_radius(1.0 * NM)
                .unwrap(),
        ];
        let (mut sharpened, mut worsened) = (0, 0);
        let mut smallest_gain = f64::INFINITY;
        let mut smallest_loss = f64::INFINITY;
        for (k, start) in starts.iter().enumerate() {
            let before = image_sharpness(&surface, pixel, start);
            for (a, action) in Conditioning::deepspm_actions().iter().enumerate() {
                let mut rng = seeded(1000 * k as u64 + a as u64);
                let (mut found_s, mut found_w) = (0, 0);
                for _ in 0..60 {
                    if found_s >= 2 && found_w >= 2 {
                        break;
                    }
                    let mut tip = start.clone();
                    match tip.condition(action, &cfg, &mut rng).unwrap() {
                        Outcome::Unchanged => assert_eq!(&tip, start),
                        Outcome::Sharpened if found_s < 2 => {
                            found_s += 1;
                            let after = image_sharpness(&surface, pixel, &tip);
                            smallest_gain = smallest_gain.min(after / before - 1.0);
                            assert!(
                                after > before * (1.0 + MARGIN),
                                "start {k}, {action:?}: sharpened {before} -> {after} ({tip:?})"
                            );
                        }
                        Outcome::Worsened if found_w < 2 => {
                            found_w += 1;
                            let after = image_sharpness(&surface, pixel, &tip);
                            smallest_loss = smallest_loss.min(1.0 - after / before);
                            assert!(
                                after < before * (1.0 - MARGIN),
                                "start {k}, {action:?}: worsened {before} -> {after} ({tip:?})"
                            );
                        }
                        _ => {}
                    }
                }
                sharpened += found_s;
                worsened += found_w;
            }
        }
        println!(
            "{sharpened} sharpened (smallest gain {smallest_gain:.3}), {worsened} worsened \
             (smallest loss {smallest_loss:.3})"
        );
        assert!(sharpened >= 60 && worsened >= 60, "{sharpened} {worsened}");
    }

    #[test]
    fn a_double_tip_images_one_bump_twice() {
        let pixel = 0.25 * NM;
        let n = 64;
        let sigma = 0.3 * NM;
        let surface = Array2::from_shape_fn((n, n), |(i, j)| {
            let r2 = ((i as f64 - 32.0).powi(2) + (j as f64 - 32.0).powi(2)) * pixel * pixel;
            (1.0 * NM * (-r2 / (2.0 * sigma * sigma)).exp()) as f32
        });
        // Ghost 3 nm (12 px) along +x and 1 nm (4 px) along +y, 0.2 nm lower.
        let d = SecondApex {
            offset: [3.0 * NM, 1.0 * NM],
            dz: 0.2 * NM,
        };
        let single = TipState::sharp(3.0 * NM).unwrap();
        let double = single.clone().with_second_apex(Some(d)).unwrap();
        for tip in [&double, &double.clone().with_flat_radius(0.2 * NM).unwrap()] {
            let side = tip.kernel_side(pixel, 1.0 * NM);
            let img = dilate(surface.view(), &tip.kernel(pixel, side).unwrap());
            let (peak, ghost, mid) = (img[[32, 32]], img[[36, 44]], img[[34, 38]]);
            // The ghost is a second local maximum, `dz` below the peak, with a valley between.
            assert!((f64::from(peak) - 1.0 * NM).abs() < 1e-12);
            assert!((f64::from(ghost) - 0.8 * NM).abs() < 0.01 * NM, "{ghost}");
            assert!(mid < ghost - 0.1 * NM as f32, "{mid} {ghost}");
            for (di, dj) in [(-1i64, 0i64), (1, 0), (0, -1), (0, 1)] {
                let v = img[[(36 + di) as usize, (44 + dj) as usize]];
                assert!(v < ghost, "ghost is not a local maximum");
            }
        }
        // The single tip images the bump once: nothing tall at the ghost position.
        let side = single.kernel_side(pixel, 1.0 * NM);
        let img = dilate(surface.view(), &single.kernel(pixel, side).unwrap());
        assert!(f64::from(img[[36, 44]]) < 0.2 * NM, "{}", img[[36, 44]]);
    }

    #[test]
    fn probabilities_follow_the_stated_formula_and_the_frequencies_match() {
        let cfg = TipConfig::default();
        // The worked example of the module docs: clean R = 30 nm, dip 5 nm, 200 ms.
        let tip = TipState::sharp(30.0 * NM).unwrap();
        let [ps, pu, pw] = tip
            .probabilities(&Conditioning::dip(5.0 * NM), &cfg)
            .unwrap();
        let g = 1.0 - (-1.0f64 / 0.3).exp();
        let nb = 1.0 - (-54.0f64 / 3.0).exp();
        assert!((ps - 0.6 * g * (0.15 + 0.85 * nb)).abs() < 1e-12);
        assert!((pw - g * 0.4 * (1.0 - 0.5 * nb)).abs() < 1e-12);
        assert!((ps - 0.579).abs() < 1e-3 && (pw - 0.193).abs() < 1e-3);
        assert!((ps + pu + pw - 1.0).abs() < 1e-12);
        // A pulse of 4 V on a tip at R_min with an adsorbate: s = 0.5, n = 0.9,
        // R_eff = 3 nm = R_good so r = 1.
        let ads = TipState::sharp(2.0 * NM)
            .unwrap()
            .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
            .unwrap();
        let action = Conditioning::pulse(-4.0);
        let [ps, _, pw] = ads.probabilities(&action, &cfg).unwrap();
        let g = 1.0 - (-0.5f64 / 0.3).exp();
        assert!((ps - 0.6 * g * (0.15 + 0.85 * 0.9)).abs() < 1e-12);
        assert!((pw - g * 0.3 * 0.55).abs() < 1e-12);
        // Monte Carlo frequencies within 4.5 binomial standard deviations.
        let mut rng = seeded(77);
        let n = 20_000;
        let (mut ns, mut nw) = (0usize, 0usize);
        for _ in 0..n {
            match ads.clone().condition(&action, &cfg, &mut rng).unwrap() {
                Outcome::Sharpened => ns += 1,
                Outcome::Worsened => nw += 1,
                Outcome::Unchanged => {}
            }
        }
        for (count, p) in [(ns, ps), (nw, pw)] {
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            let f = count as f64 / n as f64;
            assert!((f - p).abs() < 4.5 * sd, "frequency {f} vs {p}");
        }
        // The ideal tip cannot be sharpened; no action always works.
        let ideal = TipState::sharp(2.0 * NM).unwrap();
        let worst = TipState::sharp(100.0 * NM)
            .unwrap()
            .with_second_apex(Some(SecondApex {
                offset: [1.0 * NM, 0.0],
                dz: 0.0,
            }))
            .unwrap()
            .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
            .unwrap();
        for action in Conditioning::deepspm_actions().iter().chain(&[
            Conditioning::Pulse {
                bias: 10.0,
                duration: 10.0,
            },
            Conditioning::Dip {
                depth: 10.0 * NM,
                bias: 0.0,
                duration: 10.0,
            },
        ]) {
            assert_eq!(ideal.probabilities(action, &cfg).unwrap()[0], 0.0);
            let p = worst.probabilities(action, &cfg).unwrap();
            assert!(p[0] <= 0.6 && p[2] > 0.0, "{action:?}: {p:?}");
        }
    }

    #[test]
    fn bad_tips_improve_more_often_and_good_tips_worsen_more_often() {
        let cfg = TipConfig::default();
        let good = TipState::sharp(2.5 * NM).unwrap();
        assert!(good.is_good(&cfg));
        let bad = [
            TipState::sharp(20.0 * NM).unwrap(),
            TipState::sharp(2.5 * NM)
                .unwrap()
                .with_second_apex(Some(SecondApex {
                    offset: [1.0 * NM, 1.0 * NM],
                    dz: 0.1 * NM,
                }))
                .unwrap(),
            TipState::sharp(2.5 * NM)
                .unwrap()
                .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
                .unwrap(),
        ];
        let n = 4000;
        let freq = |tip: &TipState, action: &Conditioning, seed: u64| {
            let mut rng = seeded(seed);
            let mut c = [0usize; 3];
            for _ in 0..n {
                let k = match tip.clone().condition(action, &cfg, &mut rng).unwrap() {
                    Outcome::Sharpened => 0,
                    Outcome::Unchanged => 1,
                    Outcome::Worsened => 2,
                };
                c[k] += 1;
            }
            c.map(|v| v as f64 / n as f64)
        };
        for (a, action) in Conditioning::deepspm_actions().iter().enumerate() {
            let g = freq(&good, action, a as u64);
            assert!(g[2] > g[0], "{action:?}: good tip {g:?}");
            for (b, tip) in bad.iter().enumerate() {
                assert!(!tip.is_good(&cfg));
                let f = freq(tip, action, 100 + 10 * a as u64 + b as u64);
                assert!(f[0] > g[0], "{action:?}, bad tip {b}: {f:?} vs good {g:?}");
            }
        }
        // Pulses remove adsorbates better than dips; dips fix double tips better than pulses.
        let p = |t: &TipState, a: Conditioning| t.probabilities(&a, &cfg).unwrap()[0];
        assert!(p(&bad[2], Conditioning::pulse(4.0)) > p(&bad[2], Conditioning::dip(2.0 * NM)));
        assert!(p(&bad[1], Conditioning::dip(2.0 * NM)) > p(&bad[1], Conditioning::pulse(4.0)));
        // Stronger actions change the tip more often.
        let change = |a: Conditioning| 1.0 - good.probabilities(&a, &cfg).unwrap()[1];
        assert!(change(Conditioning::pulse(8.0)) > change(Conditioning::pulse(2.5)));
        assert!(change(Conditioning::dip(5.0 * NM)) > change(Conditioning::dip(0.8 * NM)));
    }

    #[test]
    fn repeated_conditioning_turns_a_bad_tip_good() {
        let cfg = TipConfig::default();
        let start = TipState::sharp(30.0 * NM)
            .unwrap()
            .with_flat_radius(3.0 * NM)
            .unwrap()
            .with_second_apex(Some(SecondApex {
                offset: [2.0 * NM, 0.0],
                dz: 0.1 * NM,
            }))
            .unwrap()
            .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
            .unwrap();
        // Blind policies, stopping once the tip is good: alternate a −4 V pulse and a 2 nm dip
        // (at most 40 actions), or dip 5 nm (at most 20).
        let alternate = [Conditioning::pulse(-4.0), Conditioning::dip(2.0 * NM)];
        let strong = [Conditioning::dip(5.0 * NM)];
        for (policy, max_steps, min_rate) in [(&alternate[..], 40, 0.9), (&strong[..], 20, 0.98)] {
            let trials = 1000;
            let mut rng = seeded(21);
            let (mut good, mut steps_total) = (0, 0);
            let mut q_sum = 0.0;
            for _ in 0..trials {
                let mut tip = start.clone();
                for step in 0..max_steps {
                    tip.condition(&policy[step % policy.len()], &cfg, &mut rng)
                        .unwrap();
                    if tip.is_good(&cfg) {
                        good += 1;
                        steps_total += step + 1;
                        break;
                    }
                }
                q_sum += tip.quality(&cfg);
            }
            let rate = good as f64 / trials as f64;
            println!(
                "{policy:?}: good within {max_steps} actions: {rate}, mean steps {}",
                steps_total as f64 / good.max(1) as f64
            );
            assert!(rate > min_rate, "{rate}");
            assert!(q_sum / trials as f64 > 3.0 * start.quality(&cfg));
        }
    }

    #[test]
    fn wear_crash_and_pickups_follow_their_formulas() {
        let cfg = TipConfig::default();
        let mut rng = seeded(4);
        // 100 frames of 256 lines of 1 µm, trace and retrace, in one call per line.
        let mut tip = TipState::sharp(10.0 * NM).unwrap();
        for _ in 0..100 * 256 {
            tip.wear(2e-6, &cfg, &mut rng).unwrap();
        }
        let grown = tip.radius() - 10.0 * NM;
        // Mean 1e-7 · 5.12 cm = 5.12 nm; the U(0.5, 1.5) factors average out (sd 0.3 %).
        assert!((grown - 5.12 * NM).abs() < 0.05 * NM, "{grown}");
        // A 2 nm crash: R grows by 2·2 nm·u ∈ [2, 6] nm, flat = 0.3·√(2·10 nm·2 nm).
        let mut tip = TipState::sharp(10.0 * NM).unwrap();
        tip.crash(2.0 * NM, &cfg, &mut rng).unwrap();
        let dr = tip.radius() - 10.0 * NM;
        assert!((2.0 * NM..=6.0 * NM).contains(&dr), "{dr}");
        assert!((tip.flat_radius() - 0.3 * (40.0f64).sqrt() * NM).abs() < 1e-15);
        // Pick-ups: P(no event in T) = exp(-rate·T).
        let t = 3600.0;
        let n = 4000;
        let untouched = (0..n)
            .filter(|_| {
                let mut tip = TipState::sharp(3.0 * NM).unwrap();
                tip.spontaneous(t, &cfg, &mut rng).unwrap();
                tip == TipState::sharp(3.0 * NM).unwrap()
            })
            .count() as f64
            / n as f64;
        let p0 = (-2e-4 * t).exp();
        assert!((untouched - p0).abs() < 4.5 * (p0 * (1.0 - p0) / n as f64).sqrt());
        // Errors name the argument; a bad call changes nothing.
        let before = tip.clone();
        assert_eq!(
            field(tip.wear(-1.0, &cfg, &mut rng).unwrap_err()),
            "contact_travel"
        );
        assert_eq!(
            field(tip.crash(f64::NAN, &cfg, &mut rng).unwrap_err()),
            "depth"
        );
        assert_eq!(
            field(tip.spontaneous(f64::INFINITY, &cfg, &mut rng).unwrap_err()),
            "scan_time"
        );
        assert_eq!(tip, before);
    }

    #[test]
    fn quality_and_noise_reflect_the_state() {
        let cfg = TipConfig::default();
        let ideal = TipState::sharp(2.0 * NM).unwrap();
        assert_eq!(ideal.quality(&cfg), 1.0);
        assert_eq!(ideal.noise_factor(), 1.0);
        assert_eq!(ideal.glitch_probability(), 0.0);
        let blunt = TipState::sharp(20.0 * NM).unwrap();
        // ln(100/20)/ln(100/2).
        assert!((blunt.quality(&cfg) - 5f64.ln() / 50f64.ln()).abs() < 1e-12);
        assert_eq!(TipState::sharp(100.0 * NM).unwrap().quality(&cfg), 0.0);
        let ads = ideal
            .clone()
            .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
            .unwrap();
        assert_eq!(ads.noise_factor(), 2.5);
        assert_eq!(ads.glitch_probability(), 0.05);
        assert!(ads.quality(&cfg) < 0.7 && !ads.is_good(&cfg));
        let dbl = ideal
            .clone()
            .with_second_apex(Some(SecondApex {
                offset: [1.0 * NM, 0.0],
                dz: 0.0,
            }))
            .unwrap();
        assert!((dbl.quality(&cfg) - 0.5).abs() < 1e-12 && !dbl.is_good(&cfg));
        assert!(ideal.is_good(&cfg) && TipState::sharp(2.99 * NM).unwrap().is_good(&cfg));
        assert!(!TipState::sharp(3.1 * NM).unwrap().is_good(&cfg));
    }

    #[test]
    fn kernels_have_the_stated_shape() {
        let pixel = 0.5 * NM;
        // Paraboloid of radius R + blur with an adsorbate.
        let cfg = TipConfig::default();
        let tip = TipState::sharp(4.0 * NM)
            .unwrap()
            .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
            .unwrap();
        let k = tip.kernel(pixel, 9).unwrap();
        assert!(k.is_separable());
        let expected = -(2.0 * NM).powi(2) / (2.0 * 5.0 * NM);
        assert!((f64::from(k.height(4, 8)) - expected).abs() < 1e-6 * expected.abs());
        // Blunted: flat within a, parabolic beyond.
        let tip = TipState::sharp(4.0 * NM)
            .unwrap()
            .with_flat_radius(1.0 * NM)
            .unwrap();
        let k = tip.kernel(pixel, 11).unwrap();
        assert_eq!(k.height(5, 7), 0.0);
        let expected = -(1.5 * NM).powi(2) / (8.0 * NM);
        assert!((f64::from(k.height(5, 10)) - expected).abs() < 1e-6 * expected.abs());
        // kernel_side: R_k = 4 nm, relief 2 nm → √16 nm = 4 nm = 8 px, + 2 px of flat.
        assert_eq!(tip.kernel_side(pixel, 2.0 * NM), 2 * 10 + 1);
        assert_eq!(
            TipState::sharp(1e-6).unwrap().kernel_side(pixel, 1e-6),
            MAX_KERNEL_SIDE
        );
        assert_eq!(tip.kernel_side(f64::NAN, 1.0), 1);
        // Errors name the argument.
        assert_eq!(field(tip.kernel(0.0, 5).unwrap_err()), "pixel");
        assert_eq!(field(tip.kernel(pixel, 4).unwrap_err()), "side");
    }

    #[test]
    fn invalid_config_and_actions_name_the_field() {
        let cfg = TipConfig::default();
        cfg.validate("tip.").unwrap();
        let bad = |f: fn(&mut TipConfig)| {
            let mut c = TipConfig::default();
            f(&mut c);
            field(c.validate("tip.").unwrap_err())
        };
        assert_eq!(
            bad(|c| c.min_radius = Param::fixed(f64::NAN)),
            "tip.min_radius"
        );
        assert_eq!(
            bad(|c| c.good_radius = Param::fixed(1e-9)),
            "tip.good_radius"
        );
        assert_eq!(
            bad(|c| c.max_radius = Param::fixed(2.5e-9)),
            "tip.max_radius"
        );
        assert_eq!(
            bad(|c| c.initial_radius = Param::fixed(1e-6)),
            "tip.initial_radius"
        );
        assert_eq!(
            bad(|c| c.sharpen_max = Param::fixed(1.0)),
            "tip.sharpen_max"
        );
        assert_eq!(bad(|c| c.wear_rate = Param::fixed(-1.0)), "tip.wear_rate");
        assert_eq!(
            bad(|c| c.adsorbate_noise = Param::fixed(0.5)),
            "tip.adsorbate_noise"
        );
        assert_eq!(
            bad(|c| c.double_probability = Param::fixed(1.5)),
            "tip.double_probability"
        );
        assert_eq!(
            bad(|c| c.strength_scale = Param::fixed(0.0)),
            "tip.strength_scale"
        );
        // Unknown keys are rejected; distributions resolve.
        assert!(toml::from_str::<TipConfig>("radius = 1e-9").is_err());
        let c: TipConfig =
            toml::from_str(r#"initial_radius = { uniform = ["5 nm", "50 nm"] }"#).unwrap();
        let r = crate::param::resolve(&c, &mut seeded(1)).unwrap();
        assert!((5e-9..=50e-9).contains(&r.initial_radius.get()));
        // Actions.
        let tip = TipState::sharp(5.0 * NM).unwrap();
        let mut t = tip.clone();
        let mut rng = seeded(0);
        for (a, name) in [
            (Conditioning::pulse(0.0), "bias"),
            (Conditioning::pulse(f64::NAN), "bias"),
            (Conditioning::pulse(11.0), "bias"),
            (Conditioning::dip(0.0), "depth"),
            (Conditioning::dip(11.0 * NM), "depth"),
            (
                Conditioning::Dip {
                    depth: 1.0 * NM,
                    bias: 2.0,
                    duration: 0.2,
                },
                "bias",
            ),
            (
                Conditioning::Pulse {
                    bias: 4.0,
                    duration: 0.0,
                },
                "duration",
            ),
        ] {
            assert_eq!(field(t.condition(&a, &cfg, &mut rng).unwrap_err()), name);
        }
        assert_eq!(t, tip);
        // State builders.
        assert_eq!(field(TipState::sharp(0.0).unwrap_err()), "radius");
        assert_eq!(
            field(tip.clone().with_flat_radius(-1.0).unwrap_err()),
            "flat_radius"
        );
        assert_eq!(
            field(
                tip.with_second_apex(Some(SecondApex {
                    offset: [0.0, 0.0],
                    dz: -1.0
                }))
                .unwrap_err()
            ),
            "dz"
        );
        // Strengths.
        assert_eq!(Conditioning::pulse(-8.0).strength().unwrap(), 1.0);
        assert!((Conditioning::dip(0.8 * NM).strength().unwrap() - 0.16).abs() < 1e-12);
    }

    #[test]
    fn conditioning_wear_grows_the_apex_whatever_the_outcome() {
        use crate::rng::seeded;
        // Off by default: the same draws as before the option existed.
        let base = TipConfig::default();
        let worn = TipConfig {
            conditioning_wear: Param::fixed(0.1 * NM),
            sharpen_max: Param::fixed(0.0),
            worsen_base: Param::fixed(0.0),
            worsen_slope: Param::fixed(0.0),
            ..Default::default()
        };
        let dip = Conditioning::dip(5.0 * NM);
        let mut t = TipState::sharp(3.0 * NM).unwrap();
        let mut rng = seeded(1);
        for _ in 0..10 {
            // Nothing but wear can happen: R grows by 0.05..0.15 nm per unit-strength action.
            let r0 = t.radius();
            assert_eq!(
                t.condition(&dip, &worn, &mut rng).unwrap(),
                Outcome::Unchanged
            );
            let dr = t.radius() - r0;
            assert!((0.05 * NM..=0.15 * NM).contains(&dr), "{dr:e}");
        }
        let mut t = TipState::sharp(3.0 * NM).unwrap();
        let quiet = TipConfig {
            sharpen_max: Param::fixed(0.0),
            worsen_base: Param::fixed(0.0),
            worsen_slope: Param::fixed(0.0),
            ..base.clone()
        };
        t.condition(&dip, &quiet, &mut rng).unwrap();
        assert_eq!(t.radius(), 3.0 * NM);
        let bad = TipConfig {
            conditioning_wear: Param::fixed(-1.0),
            ..base
        };
        assert!(
            bad.validate("tip.")
                .unwrap_err()
                .to_string()
                .contains("tip.conditioning_wear")
        );
    }

    #[test]
    fn same_seed_same_trajectory() {
        let cfg = TipConfig {
            initial_double_probability: Param::fixed(0.5),
            initial_adsorbate_probability: Param::fixed(0.5),
            ..Default::default()
        };
        let run = |seed: u64| {
            let mut rng = seeded(seed);
            let mut tip = TipState::new(&cfg, &mut rng).unwrap();
            let mut log = Vec::new();
            for (k, a) in Conditioning::deepspm_actions()
                .iter()
                .cycle()
                .take(60)
                .enumerate()
            {
                log.push(tip.condition(a, &cfg, &mut rng).unwrap());
                tip.wear(1e-3, &cfg, &mut rng).unwrap();
                if k % 7 == 0 {
                    tip.crash(0.5 * NM, &cfg, &mut rng).unwrap();
                }
                tip.spontaneous(600.0, &cfg, &mut rng).unwrap();
            }
            (tip, log)
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Wear(f64),
        Crash(f64),
        Spontaneous(f64),
        Condition(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0.0f64..1.0).prop_map(Op::Wear),
            (0.0f64..20e-9).prop_map(Op::Crash),
            (0.0f64..1e5).prop_map(Op::Spontaneous),
            (0usize..12).prop_map(Op::Condition),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn radius_stays_in_range_and_kernels_are_valid(
            seed in any::<u64>(),
            r0 in 2e-9f64..100e-9,
            ops in proptest::collection::vec(op(), 1..40),
            pixel in 0.05e-9f64..2e-9,
        ) {
            let cfg = TipConfig {
                initial_radius: Param::fixed(r0),
                initial_double_probability: Param::fixed(0.3),
                initial_adsorbate_probability: Param::fixed(0.3),
                ..Default::default()
            };
            let (rmin, rmax) = (cfg.min_radius.get(), cfg.max_radius.get());
            let mut rng = seeded(seed);
            let mut tip = TipState::new(&cfg, &mut rng).unwrap();
            let actions = Conditioning::deepspm_actions();
            for o in &ops {
                let before = tip.radius();
                match *o {
                    Op::Wear(l) => tip.wear(l, &cfg, &mut rng).unwrap(),
                    Op::Crash(d) => tip.crash(d, &cfg, &mut rng).unwrap(),
                    Op::Spontaneous(t) => tip.spontaneous(t, &cfg, &mut rng).unwrap(),
                    Op::Condition(a) => {
                        tip.condition(&actions[a], &cfg, &mut rng).unwrap();
                    }
                }
                if !matches!(o, Op::Condition(_)) {
                    prop_assert!(tip.radius() >= before, "{o:?} shrank R");
                }
                prop_assert!(tip.radius() >= rmin && tip.radius() <= rmax, "R = {}", tip.radius());
                let q = tip.quality(&cfg);
                prop_assert!((0.0..=1.0).contains(&q));
                let side = tip.kernel_side(pixel, 2e-9);
                prop_assert!(side % 2 == 1 && side <= MAX_KERNEL_SIDE);
                let k = tip.kernel(pixel, side).unwrap();
                let c = side / 2;
                prop_assert_eq!(k.height(c, c), 0.0);
                // Finite wherever the paraboloid's window reaches (−∞ only in the corners a
                // worn tip's flat disc does not sweep), never above the apex.
                prop_assert!(k.heights().iter().all(|h| !h.is_nan() && *h <= 0.0));
                prop_assert!((0..side).all(|j| k.height(c, j).is_finite() && k.height(j, c).is_finite()));
            }
        }
    }
}
