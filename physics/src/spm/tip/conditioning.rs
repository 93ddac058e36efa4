//! Conditioning: DeepSPM's bias pulses and dips, and the probability model of what they do
//! to a [`TipState`].
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

use super::state::draw_second;
use super::{Adsorbate, TipConfig, TipState, jitter};
use crate::error::{PhysicsError, Result};
use crate::rng::{SimRng, uniform};
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

impl TipState {
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
}
