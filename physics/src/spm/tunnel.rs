//! STM tunnelling current, bias-dependent apparent heights and feedback on the log current
//! (DESIGN.md §5, STM). Opt-in: nothing here runs unless `[tunneling] enabled = true`.
//!
//! # Model
//!
//! - Current through a vacuum gap `d` (m) at sample bias `V` (V), over a feature of relative
//!   local density of states `ρ(V)` (1 on the bare substrate), in the planar-barrier (Simmons /
//!   Tersoff-Hamann low-bias) form
//!   `I(d, V) = G₀ · V · ρ(V) · exp(−2κd)`, with `G₀ = 2e²/h` (the conductance quantum, the
//!   current prefactor at contact, `d = 0`) and the decay constant
//!   `κ = √(2 m_e φ)/ħ` of the work function `φ`. At `φ = 4.5 eV`, `κ = 10.87 nm⁻¹`
//!   (`κ = 0.5123 Å⁻¹·√(φ/eV)`, C. J. Chen, *Introduction to Scanning Tunneling Microscopy*,
//!   §1.2): the current falls by `e²` per `1/κ` and by a decade per `ln 10/(2κ) = 0.106 nm`.
//! - Apparent height: at constant current the tip follows `h_geom + ln ρ(V)/(2κ)`, so a
//!   feature's contrast depends on the bias through its LDOS term ([`apparent_height`]).
//! - Adatom LDOS ([`AdatomResonance`]): a Lorentzian resonance of strength `A` at energy `E_r`
//!   (eV, relative to the Fermi level), width `Γ`, on a flat substrate LDOS. The current
//!   integrates the states between the Fermi level and `eV`, so the relative LDOS at bias `V` is
//!   `ρ(V) = 1 + (A/V)·∫₀^V Γ²/((E − E_r)² + Γ²) dE
//!         = 1 + A·(Γ/V)·[atan((V − E_r)/Γ) + atan(E_r/Γ)]` (limit `1 + A Γ²/(E_r² + Γ²)` at
//!   `V → 0`). A resonance above the Fermi level makes the adatom look taller at positive
//!   bias near `E_r` than at small bias; far from the resonance the contrast fades as `1/V`.
//! - Feedback on the log current: the controller sees `ε = ln(I/I_set)`. With the tip at
//!   set-point height `z` over apparent height `h` the gap is `d_set + z − h`, so
//!   `ε = 2κ(h − z)`: `ε/(2κ)` is exactly the height error `e` of
//!   [`super::feedback::ZFeedback`]. A Nanonis-style controller, `Δz = P·Δε + I·T·ε` with `P`
//!   in m and `I` in m/s per unit log current, is therefore the height-unit PI law with
//!   `K_p = 2κ·P`, `K_i = 2κ·I` ([`height_gains`], [`log_current_gains`]). A current amplifier
//!   with a floor `I_floor` (the smallest current it reads) saturates the error at
//!   `ε = ln(I_floor/I_set)`, the height-unit saturation `c = ln(I_set/I_floor)/(2κ)`
//!   ([`saturation_from_floor`]). `gain_units = "log_current"` makes the simulator take and
//!   report its gains as `P`, `I` (as a Nanonis driver passes them) and `current_floor` sets the
//!   loop's saturation from the floor ([`TunnelingConfig::loop_feedback`]).
//! - Current noise ([`CurrentNoise`]): white with density `S_I` (A/√Hz) plus optional 1/f noise
//!   of density `S_1/√f` (A/√Hz at 1 Hz), drawn per controller sample at rate `f_s`. A white
//!   sample has r.m.s. `σ_I = S_I·√(f_s/2)`; it enters the log-current error as
//!   `ln(1 + δI/I_set)`, r.m.s. `σ_ε = σ_I/I_set` for small noise, i.e. `σ_ε/(2κ)` in height.

use crate::constants::{ELECTRON_MASS, ELEMENTARY_CHARGE, PLANCK};
use crate::error::{PhysicsError, Result, check_range};
use crate::param::Param;
use crate::param::dims::{Current, Energy, Unitless};
use crate::rng::{SimRng, normal};
use crate::spm::feedback::FeedbackConfig;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use std::ops::Bound::{Excluded, Included};

/// The conductance quantum `G₀ = 2e²/h`, S.
pub const CONDUCTANCE_QUANTUM: f64 = 2.0 * ELEMENTARY_CHARGE * ELEMENTARY_CHARGE / PLANCK;

/// Tunnelling settings (`[tunneling]`). Off by default: then the STM images the apparent-height
/// map directly and every frame is as without this section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TunnelingConfig {
    /// Whether the STM feedback runs on the log tunnelling current (adds the `current` channel
    /// and current noise). Default false.
    pub enabled: bool,
    /// Work function `φ`, eV, in `[0.5, 10]`. Default 4.5 eV (κ = 10.87 nm⁻¹).
    pub work_function: Param<Energy>,
    /// Current set-point `I_set`, A, in `(0, 1 µA]`. Default 100 pA.
    pub setpoint_current: Param<Current>,
    /// White current noise density `S_I`, A/√Hz, in `[0, 1 nA/√Hz]`. Default 20 fA/√Hz.
    pub current_noise: Param<Current>,
    /// 1/f current noise density at 1 Hz `S_1`, A/√Hz, in `[0, 1 nA/√Hz]`. Default 0.
    pub current_pink_noise: Param<Current>,
    /// Adatom resonance energy `E_r` relative to the Fermi level, eV, in `[−5, 5]`.
    /// Default 0.5 eV.
    pub resonance_energy: Param<Energy>,
    /// Adatom resonance half width `Γ`, eV, in `[0.01, 5]`. Default 0.2 eV.
    pub resonance_width: Param<Energy>,
    /// Adatom resonance strength `A` (relative LDOS at its peak), dimensionless, in
    /// `[0, 1e4]`. Default 20.
    pub resonance_strength: Param<Unitless>,
    /// Units of the feedback gains (`[feedback] p_gain`, `i_gain` and the instrument's
    /// `feedback_gains`/`set_feedback_gains`) while tunnelling is on. Default `"height"`.
    pub gain_units: GainUnits,
    /// Floor `I_floor` of the current amplifier, A, in `[0, I_set)`: the error never reads
    /// below `ln(I_floor/I_set)`, the loop's saturation becomes
    /// `c = ln(I_set/I_floor)/(2κ)` (replacing `[feedback] saturation`). Default 0: no floor,
    /// `[feedback] saturation` applies.
    pub current_floor: Param<Current>,
}

/// Units of the z-feedback gains of an STM with tunnelling on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GainUnits {
    /// The height-unit PI law of [`super::feedback::ZFeedback`]: `K_p` dimensionless, `K_i`
    /// in 1/s.
    #[default]
    Height,
    /// A Nanonis-style Z-controller on the log current: `P` in m and `I` in m/s per unit
    /// `ln(I/I_set)`, acting as `K_p = 2κP`, `K_i = 2κI` ([`height_gains`]).
    LogCurrent,
}

impl Default for TunnelingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            work_function: Param::fixed(4.5),
            setpoint_current: Param::fixed(100e-12),
            current_noise: Param::fixed(20e-15),
            current_pink_noise: Param::fixed(0.0),
            resonance_energy: Param::fixed(0.5),
            resonance_width: Param::fixed(0.2),
            resonance_strength: Param::fixed(20.0),
            gain_units: GainUnits::Height,
            current_floor: Param::fixed(0.0),
        }
    }
}

impl TunnelingConfig {
    /// Checks ranges (NaN is rejected); `prefix` names the section, e.g. `"tunneling."`.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let f = |name: &str| format!("{prefix}{name}");
        check_range(
            &f("work_function"),
            self.work_function.get(),
            0.5..=10.0,
            "eV",
        )?;
        let i_set = self.setpoint_current.get();
        check_range(
            &f("setpoint_current"),
            i_set,
            (Excluded(0.0), Included(1e-6)),
            "A",
        )?;
        check_range(
            &f("current_noise"),
            self.current_noise.get(),
            0.0..=1e-9,
            "A/√Hz",
        )?;
        let pink = self.current_pink_noise.get();
        check_range(&f("current_pink_noise"), pink, 0.0..=1e-9, "A/√Hz")?;
        check_range(
            &f("resonance_energy"),
            self.resonance_energy.get(),
            -5.0..=5.0,
            "eV",
        )?;
        check_range(
            &f("resonance_width"),
            self.resonance_width.get(),
            0.01..=5.0,
            "eV",
        )?;
        let strength = self.resonance_strength.get();
        check_range(&f("resonance_strength"), strength, 0.0..=1e4, "")?;
        check_range(
            &f("current_floor"),
            self.current_floor.get(),
            0.0..i_set,
            "A",
        )
    }

    /// The height-unit feedback settings the loop runs with while tunnelling is on: `fb` with
    /// its gains converted from `gain_units` and, with a `current_floor`, the floor's
    /// saturation. Errors name the field whose value gives an out-of-range loop setting.
    pub fn loop_feedback(&self, fb: &FeedbackConfig) -> Result<FeedbackConfig> {
        let mut out = fb.clone();
        let kappa = self.kappa();
        if self.gain_units == GainUnits::LogCurrent {
            let (kp, ki) = height_gains(fb.p_gain.get(), fb.i_gain.get(), kappa);
            out.p_gain = Param::fixed(kp);
            out.i_gain = Param::fixed(ki);
        }
        let floor = self.current_floor.get();
        if floor > 0.0 {
            let c = saturation_from_floor(self.setpoint_current.get(), floor, kappa);
            out.saturation = Param::fixed(c);
        }
        out.validate("feedback.").map_err(|e| {
            PhysicsError::param(
                "tunneling.gain_units, tunneling.current_floor",
                format!("give a loop setting out of range: {e}"),
            )
        })?;
        Ok(out)
    }

    /// The adatom resonance of this config.
    pub fn resonance(&self) -> AdatomResonance {
        AdatomResonance {
            energy: self.resonance_energy.get(),
            width: self.resonance_width.get(),
            strength: self.resonance_strength.get(),
        }
    }

    /// The decay constant κ of this config's work function, 1/m.
    pub fn kappa(&self) -> f64 {
        kappa(self.work_function.get())
    }
}

/// The decay constant `κ = √(2 m_e φ)/ħ` (1/m) of the work function `φ` (eV).
pub fn kappa(work_function_ev: f64) -> f64 {
    let hbar = PLANCK / (2.0 * PI);
    (2.0 * ELECTRON_MASS * work_function_ev * ELEMENTARY_CHARGE).sqrt() / hbar
}

/// Tunnelling current `I = G₀·V·ρ·exp(−2κd)`, A, through gap `gap` (m) at bias `bias` (V) over
/// relative LDOS `ldos`, with decay constant `kappa` (1/m).
pub fn current(gap: f64, bias: f64, ldos: f64, kappa: f64) -> f64 {
    CONDUCTANCE_QUANTUM * bias * ldos * (-2.0 * kappa * gap).exp()
}

/// The gap (m) at which the current is `i_set` (A) at bias `bias` (V) over relative LDOS
/// `ldos`: the inverse of [`current`]; `None` unless `i_set/(G₀ V ρ)` is positive.
pub fn gap_for_current(i_set: f64, bias: f64, ldos: f64, kappa: f64) -> Option<f64> {
    let g = i_set / (CONDUCTANCE_QUANTUM * bias * ldos);
    (g > 0.0 && g.is_finite()).then(|| -g.ln() / (2.0 * kappa))
}

/// Apparent-height change (m) of a feature of relative LDOS `ldos` at constant current:
/// `ln ρ/(2κ)`.
pub fn apparent_height(ldos: f64, kappa: f64) -> f64 {
    ldos.ln() / (2.0 * kappa)
}

/// A Lorentzian adatom resonance on a flat substrate LDOS (module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdatomResonance {
    /// Resonance energy `E_r` relative to the Fermi level, eV.
    pub energy: f64,
    /// Half width `Γ`, eV.
    pub width: f64,
    /// Strength `A`: the relative LDOS at the peak.
    pub strength: f64,
}

impl AdatomResonance {
    /// The relative LDOS the current integrates at bias `bias` (V):
    /// `1 + A·(Γ/V)·[atan((V − E_r)/Γ) + atan(E_r/Γ)]`, its limit `1 + AΓ²/(E_r² + Γ²)` at
    /// zero bias.
    pub fn ldos(&self, bias: f64) -> f64 {
        let (e, g, a) = (self.energy, self.width, self.strength);
        if bias.abs() < 1e-9 * g {
            return 1.0 + a * g * g / (e * e + g * g);
        }
        1.0 + a * (g / bias) * (((bias - e) / g).atan() + (e / g).atan())
    }

    /// The adatom's apparent height above its geometric height at bias `bias` (V), m:
    /// `ln ρ(V)/(2κ)`.
    pub fn apparent_height(&self, bias: f64, kappa: f64) -> f64 {
        apparent_height(self.ldos(bias), kappa)
    }
}

/// The height-unit PI gains `(K_p, K_i)` (dimensionless, 1/s) of a log-current controller with
/// gains `p` (m per unit ln I) and `i` (m/s per unit ln I): `K_p = 2κp`, `K_i = 2κi`.
pub fn height_gains(p: f64, i: f64, kappa: f64) -> (f64, f64) {
    (2.0 * kappa * p, 2.0 * kappa * i)
}

/// The inverse of [`height_gains`]: `(p, i) = (K_p, K_i)/(2κ)`, in m and m/s per unit ln I.
pub fn log_current_gains(kp: f64, ki: f64, kappa: f64) -> (f64, f64) {
    (kp / (2.0 * kappa), ki / (2.0 * kappa))
}

/// The height-unit saturation `c = ln(I_set/I_floor)/(2κ)` (m) of a current amplifier that
/// reads nothing below `floor` (A) at set-point `i_set` (A).
pub fn saturation_from_floor(i_set: f64, floor: f64, kappa: f64) -> f64 {
    (i_set / floor).ln() / (2.0 * kappa)
}

/// Lowest corner frequency of the 1/f current noise, Hz (the highest is the Nyquist
/// frequency `f_s/2`).
const PINK_LOW: f64 = 0.01;
/// Number of AR(1) processes summed for the 1/f noise (corners a factor 2.15 apart at 2 kHz).
const PINK_PROCESSES: usize = 16;

/// Current noise drawn per controller sample: white plus optional 1/f (module docs).
///
/// The 1/f part sums `N` AR(1) (Lorentzian) processes with corners `f_k` spaced by the ratio
/// `r` from [`PINK_LOW`] to `f_s/2`, each of variance `S_1² ln r`: their summed one-sided
/// spectrum is `≈ S_1²/f` between the corners.
#[derive(Debug, Clone)]
pub struct CurrentNoise {
    white_sd: f64,
    /// Per process: (decay per sample, innovation sd, value).
    pink: Vec<(f64, f64, f64)>,
}

impl CurrentNoise {
    /// Noise of white density `white` and 1/f density `pink` at 1 Hz (both A/√Hz) sampled at
    /// `sample_rate` (Hz); the 1/f processes start in their stationary state drawn from `rng`.
    pub fn new(white: f64, pink: f64, sample_rate: f64, rng: &mut SimRng) -> Self {
        let (lo, hi) = (PINK_LOW, (0.5 * sample_rate).max(2.0 * PINK_LOW));
        let ratio = (hi / lo).powf(1.0 / (PINK_PROCESSES - 1) as f64);
        let var = pink * pink * ratio.ln();
        let pink = if pink > 0.0 {
            (0..PINK_PROCESSES)
                .map(|k| {
                    let fc = lo * ratio.powi(k as i32);
                    let rho = (-2.0 * PI * fc / sample_rate).exp();
                    let sd = var.sqrt();
                    (rho, sd * (1.0 - rho * rho).sqrt(), sd * normal(rng))
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            white_sd: white * (0.5 * sample_rate).sqrt(),
            pink,
        }
    }

    /// The r.m.s. of one white sample, `S_I·√(f_s/2)`, A.
    pub fn white_rms(&self) -> f64 {
        self.white_sd
    }

    /// The next sample's current noise, A.
    pub fn sample(&mut self, rng: &mut SimRng) -> f64 {
        let mut v = self.white_sd * normal(rng);
        for p in &mut self.pink {
            p.2 = p.0 * p.2 + p.1 * normal(rng);
            v += p.2;
        }
        v
    }

    /// Fills `out` with the log-current error of the noise at set-point `i_set` in height units
    /// (m): `ln(1 + δI/I_set)/(2κ)`, each current clamped above `−I_set` by a tiny margin
    /// (an amplifier reads no negative log).
    pub fn fill_height_noise(&mut self, i_set: f64, kappa: f64, out: &mut [f64], rng: &mut SimRng) {
        let k2 = 2.0 * kappa;
        for o in out.iter_mut() {
            let x = (self.sample(rng) / i_set).max(-1.0 + 1e-6);
            *o = x.ln_1p() / k2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;
    use crate::spm::feedback::{FeedbackConfig, ZFeedback};

    const K45: f64 = 1.0868e10;

    #[test]
    fn kappa_matches_the_textbook_value_and_the_current_decays_a_decade_per_0_106_nm() {
        // κ = 0.5123 Å⁻¹ √(φ/eV) (Chen, §1.2).
        for phi in [1.0, 3.0, 4.5, 5.3] {
            let k = kappa(phi);
            let want = 0.5123e10 * f64::sqrt(phi);
            assert!((k / want - 1.0).abs() < 2e-4, "φ {phi}: {k:e} vs {want:e}");
        }
        let k = kappa(4.5);
        assert!((k / K45 - 1.0).abs() < 1e-3, "{k:e}");
        // e² per 1/κ.
        let r = current(0.5e-9, 0.1, 1.0, k) / current(0.5e-9 + 1.0 / k, 0.1, 1.0, k);
        assert!((r - std::f64::consts::E.powi(2)).abs() < 1e-9, "{r}");
        // A decade per 0.1059 nm at 4.5 eV.
        let decade = 10f64.ln() / (2.0 * k);
        assert!((decade - 0.1059e-9).abs() < 0.0005e-9, "{decade:e}");
        let r = current(0.6e-9, 0.1, 1.0, k) / current(0.6e-9 + 0.1059e-9, 0.1, 1.0, k);
        assert!((r - 10.0).abs() < 0.01, "{r}");
        // At contact the conductance is G₀ = 7.748e-5 S.
        assert!((current(0.0, 0.01, 1.0, k) / 0.01 - 7.748_091_7e-5).abs() < 1e-12);
        // 100 pA at 0.1 V: a gap of ln(G₀ V/I)/(2κ) ≈ 0.518 nm.
        let d = gap_for_current(100e-12, 0.1, 1.0, k).unwrap();
        assert!((d - 0.518e-9).abs() < 0.002e-9, "{d:e}");
        assert!((current(d, 0.1, 1.0, k) / 100e-12 - 1.0).abs() < 1e-12);
        assert!(gap_for_current(100e-12, -0.1, 1.0, k).is_none());
    }

    #[test]
    fn apparent_height_of_the_adatom_follows_its_integrated_ldos() {
        let res = AdatomResonance {
            energy: 0.5,
            width: 0.2,
            strength: 20.0,
        };
        let k = kappa(4.5);
        // The closed form against a midpoint-rule integral of the Lorentzian.
        for v in [-1.5, -0.3, 0.05, 0.4, 0.5, 0.8, 2.0] {
            let n = 200_000;
            let h = v / n as f64;
            let integral: f64 = (0..n)
                .map(|i| {
                    let e = (i as f64 + 0.5) * h;
                    0.04 / ((e - 0.5) * (e - 0.5) + 0.04)
                })
                .sum::<f64>()
                * h;
            let want = 1.0 + 20.0 * integral / v;
            assert!((res.ldos(v) / want - 1.0).abs() < 1e-8, "V {v}");
        }
        // Zero-bias limit: 1 + A Γ²/(E_r² + Γ²) = 1 + 20·0.04/0.29.
        assert!((res.ldos(0.0) - (1.0 + 20.0 * 0.04 / 0.29)).abs() < 1e-12);
        assert!((res.ldos(1e-6) - res.ldos(0.0)).abs() < 1e-4);
        // Contrast depends on bias: taller near the resonance than at small or negative bias,
        // by ln(ρ₁/ρ₂)/(2κ).
        let (h_low, h_res, h_neg) = (
            res.apparent_height(0.05, k),
            res.apparent_height(0.6, k),
            res.apparent_height(-0.6, k),
        );
        assert!(h_res > h_low && h_low > h_neg && h_neg > 0.0);
        let want = (res.ldos(0.6) / res.ldos(0.05)).ln() / (2.0 * k);
        assert!((h_res - h_low - want).abs() < 1e-18);
        // ρ = e (the LDOS one e-fold up) is 1/(2κ) = 46 pm taller.
        assert!((apparent_height(std::f64::consts::E, k) - 0.5 / k).abs() < 1e-20);
    }

    /// A log-current PI loop written out with the exponential current: the tip at set-point
    /// height `z` over apparent height `h` sits at the gap `d_set + z − h`, the amplifier reads
    /// at least `floor`, `ε = ln(I/I_set)`, `z += P·(ε − ε_prev) + I·T·ε`.
    fn log_current_loop(
        heights: &[f64],
        (p, i): (f64, f64),
        t: f64,
        floor: f64,
        k: f64,
    ) -> Vec<(f64, f64)> {
        let (i_set, bias) = (100e-12, 0.1);
        let d_set = gap_for_current(i_set, bias, 1.0, k).unwrap();
        let (mut z, mut eps_prev) = (0.0, 0.0);
        let mut out = Vec::new();
        for &h in heights {
            let cur = current(d_set + z - h, bias, 1.0, k).max(floor);
            let eps = (cur / i_set).ln();
            out.push((z, eps));
            z += p * (eps - eps_prev) + i * t * eps;
            eps_prev = eps;
        }
        out
    }

    #[test]
    fn log_current_gains_map_onto_the_height_pi_gains() {
        let k = kappa(4.5);
        // Nanonis-style gains: P = 4.6 pm, I = 13.8 nm/s per unit ln I.
        let (p, i) = (4.6e-12, 13.8e-9);
        let (kp, ki) = height_gains(p, i, k);
        assert!((kp - 2.0 * K45 * p).abs() < 1e-3 * kp && (ki - 2.0 * K45 * i).abs() < 1e-3 * ki);
        let back = log_current_gains(kp, ki, k);
        assert!((back.0 - p).abs() < 1e-24 && (back.1 - i).abs() < 1e-21);
        // Steps of 0.2 nm (in contact: the current never reaches the floor) and of 2 nm down
        // (the current falls below a 1 pA floor, the error saturates at ln(1 pA/100 pA)).
        let floor = 1e-12;
        let c = saturation_from_floor(100e-12, floor, k);
        assert!((c - (100f64).ln() / (2.0 * k)).abs() < 1e-22 && (c - 0.2119e-9).abs() < 1e-12);
        let heights: Vec<f64> = (0..600)
            .map(|j| match j {
                0..100 => 0.0,
                100..300 => 0.2e-9,
                _ => -1.8e-9,
            })
            .collect();
        let cfg = FeedbackConfig {
            p_gain: Param::fixed(kp),
            i_gain: Param::fixed(ki),
            saturation: Param::fixed(c),
            z_speed_limit: Param::fixed(1.0),
            ..FeedbackConfig::default()
        };
        let mut fb = ZFeedback::new(&cfg).unwrap();
        fb.engage(0.0);
        let t = fb.period();
        let explicit = log_current_loop(&heights, (p, i), t, floor, k);
        let mut saturated = 0;
        for (j, (&h, &(z, eps))) in heights.iter().zip(&explicit).enumerate() {
            let (zf, e) = fb.step(h).unwrap();
            // ε = 2κ e and the same z, to rounding.
            assert!((z - zf).abs() < 1e-20, "{j}: {z:e} vs {zf:e}");
            assert!(
                (eps - 2.0 * k * e).abs() < 1e-9,
                "{j}: {eps} vs {}",
                2.0 * k * e
            );
            saturated += usize::from(e <= -c * (1.0 - 1e-9));
        }
        assert!(
            saturated > 10,
            "the 2 nm drop loses the current: {saturated}"
        );
    }

    #[test]
    fn white_current_noise_gives_the_predicted_log_current_rms() {
        let k = kappa(4.5);
        let (i_set, s_i, fs) = (100e-12, 50e-15, 2e3);
        let mut rng = seeded(3);
        let mut noise = CurrentNoise::new(s_i, 0.0, fs, &mut rng);
        // σ_I = S_I √(f_s/2) = 1.58 pA, σ_ε = σ_I/I_set = 0.0158.
        let sigma_i = s_i * (fs / 2.0).sqrt();
        assert!((noise.white_rms() - sigma_i).abs() < 1e-24);
        let n = 200_000;
        let mut h = vec![0.0; n];
        noise.fill_height_noise(i_set, k, &mut h, &mut rng);
        let ms = h.iter().map(|x| (2.0 * k * x).powi(2)).sum::<f64>() / n as f64;
        let want = sigma_i / i_set;
        // Small noise: ln(1 + x) ≈ x, relative error ≈ σ_ε²; statistics ≈ 1/√(2n) = 0.16 %.
        assert!(
            (ms.sqrt() / want - 1.0).abs() < 0.01,
            "{} vs {want}",
            ms.sqrt()
        );
    }

    #[test]
    fn pink_current_noise_has_a_one_over_f_spectrum() {
        // Periodogram averaged over segments: the power per band falls ∝ 1/f, so the band
        // power between f and 2f is S_1² ln 2 whatever f.
        let (s1, fs) = (1e-13, 2e3);
        let mut rng = seeded(5);
        let mut noise = CurrentNoise::new(0.0, s1, fs, &mut rng);
        let seg = 4096;
        let segs = 48;
        let df = fs / seg as f64;
        let bands = [5.0, 20.0, 80.0];
        let in_band = |b: usize| {
            bands
                .iter()
                .any(|&f| (f..2.0 * f).contains(&(b as f64 * df)))
        };
        let mut psd = vec![0.0; seg / 2];
        for _ in 0..segs {
            let x: Vec<f64> = (0..seg).map(|_| noise.sample(&mut rng)).collect();
            let mean = x.iter().sum::<f64>() / seg as f64;
            for (b, p) in psd.iter_mut().enumerate().filter(|(b, _)| in_band(*b)) {
                let w = 2.0 * PI * b as f64 / seg as f64;
                let (mut re, mut im) = (0.0, 0.0);
                for (t, v) in x.iter().enumerate() {
                    let hann = 0.5 - 0.5 * (2.0 * PI * t as f64 / seg as f64).cos();
                    re += hann * (v - mean) * (w * t as f64).cos();
                    im += hann * (v - mean) * (w * t as f64).sin();
                }
                // One-sided PSD with the Hann window's power 3/8.
                *p += 2.0 * (re * re + im * im) / (fs * seg as f64 * 0.375) / segs as f64;
            }
        }
        for f in bands {
            let band: f64 = (1..seg / 2)
                .filter(|&b| (f..2.0 * f).contains(&(b as f64 * df)))
                .map(|b| psd[b] * df)
                .sum();
            let want = s1 * s1 * 2f64.ln();
            assert!(
                (band / want - 1.0).abs() < 0.25,
                "{f} Hz: {band:e} vs {want:e}"
            );
        }
    }

    #[test]
    fn config_defaults_off_and_validates() {
        let d = TunnelingConfig::default();
        assert!(!d.enabled);
        d.validate("tunneling.").unwrap();
        assert!((d.kappa() / K45 - 1.0).abs() < 1e-3);
        let bad = TunnelingConfig {
            setpoint_current: Param::fixed(0.0),
            ..d.clone()
        };
        let msg = bad.validate("tunneling.").unwrap_err().to_string();
        assert!(msg.contains("tunneling.setpoint_current"), "{msg}");
        let bad = TunnelingConfig {
            work_function: Param::fixed(f64::NAN),
            ..d.clone()
        };
        assert!(bad.validate("tunneling.").is_err());
        let cfg: TunnelingConfig = toml::from_str(
            "enabled = true\nsetpoint_current = \"50 pA\"\nwork_function = \"4 eV\"",
        )
        .unwrap();
        assert!(cfg.enabled && (cfg.setpoint_current.get() - 50e-12).abs() < 1e-24);
        assert!(toml::from_str::<TunnelingConfig>("current = 1").is_err());
    }
}
