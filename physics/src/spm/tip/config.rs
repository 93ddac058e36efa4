//! The tip model's settings ([`TipConfig`], the `[tip]` table of a scenario).

use super::{MAX_FEATURE, MAX_STATE_LENGTH, MIN_STATE_RADIUS};
use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::{Frequency, Length, Unitless};
use serde::{Deserialize, Serialize};

/// How scanning in contact wears the apex ([`TipState::wear`](super::TipState::wear),
/// [`TipState::wear_archard`](super::TipState::wear_archard)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WearModel {
    /// The apex radius grows by `wear_rate` per metre of travel, whatever the load.
    #[default]
    Rate,
    /// Archard's law: the volume `k_w F s / H` worn over a travel `s` at load `F` truncates
    /// the paraboloid apex into a flat.
    Archard,
}

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
    /// How scanning wears the apex: `"rate"` (the default: `wear_rate`, load-independent) or
    /// `"archard"` (load-dependent: `wear_coefficient`, `hardness` and the AFM's load).
    pub wear_model: WearModel,
    /// Archard wear coefficient `k_w` (dimensionless), in `[0, 1]`. Default 1e-6.
    pub wear_coefficient: Param<Unitless>,
    /// Hardness `H` of the tip's apex, Pa, in `[1e6, 1e12]`. Default 10 GPa (silicon).
    pub hardness: Param<Unitless>,
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
            wear_model: WearModel::Rate,
            wear_coefficient: Param::fixed(1e-6),
            hardness: Param::fixed(10e9),
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
        range("wear_coefficient", self.wear_coefficient.get(), 0.0, 1.0)?;
        range("hardness", self.hardness.get(), 1e6, 1e12)?;
        Ok(())
    }
}
