//! AFM operation: contact or tapping (amplitude modulation), the cantilever's amplitude and
//! phase in tapping, and the tip's load in either (for load-dependent wear, [`super::tip`]).
//!
//! # Model
//!
//! **Contact** (the default, the AFM and PFM modes as they were): the tip presses with
//! `contact_force` (the deflection set point times the cantilever stiffness).
//!
//! **Tapping**: the cantilever (spring constant `k`, quality factor `Q`, resonance `ω₀`) is
//! driven at `ω` with free amplitude `A₀`; the feedback holds the amplitude at the set point
//! `A_sp = r·A₀`. The simulator keeps its z loop on the gap (the tracking error `e = h − z`
//! is the error signal, [`super::feedback`]) and maps the gap error `z − h = −e` onto
//! amplitude in the regime where the amplitude is proportional to the gap (`dA/dz = 1`, the
//! tip taps the surface at the lower turning point of its swing):
//!
//! `A = clamp(A_sp − e, 0, A₀)`.
//!
//! The phase lag `φ` of the response behind the drive follows from the energy balance of the
//! driven cantilever (Cleveland, Anczykowski, Schmid & Elings, Appl. Phys. Lett. 72, 2613
//! (1998), eq. 3):
//!
//! `sin φ = (ω/ω₀)(A/A₀) + Q·E_dis/(π k A A₀)`,
//!
//! `E_dis` the energy the tip-sample interaction dissipates per tap. Conservative contact at
//! resonance gives `φ = asin(A/A₀)`; dissipation shifts it. We report the repulsive branch,
//! `φ ∈ [0°, 90°]` (90° free, lower when tapping); a right side above 1 (or `A = 0`) reads 90°.
//! `E_dis` is a per-material map: `dissipation_substrate` on the substrate,
//! `dissipation_feature` on the surface's features (particles, [`super::surface`]), sampled
//! bilinearly at the tip's position on the sample.
//!
//! **Losing the surface.** The amplitude cannot exceed `A₀`: once the surface falls away by
//! more than the amplitude reserve `(1 − r)·A₀` the cantilever swings freely and the error
//! signal saturates. The loop then runs with the lost-contact saturation (`feedback.saturation`,
//! [`super::feedback`]) lowered to that reserve, so a gentle set point (`r` near 1) parachutes
//! behind tall features: the trade-off against the load below.
//!
//! **Mean force in tapping.** Projecting the equation of motion on the response
//! `x = A cos(ωt − φ)` at resonance (`ω = ω₀`, drive force `k A₀/Q`) gives the virial
//! `⟨F_ts x⟩ = −k A A₀ cos φ/(2Q)`. For a repulsive contact that acts only near the lower
//! turning point (`x ≈ −A`), `⟨F_ts x⟩ ≈ −A ⟨F_ts⟩`, so the mean tip-sample force is
//!
//! `F̄ = k A₀ cos φ/(2Q) = (k A₀/(2Q))·√(1 − r²)` (conservative, at the set point),
//!
//! which grows as the set point ratio `r` falls: harder tapping, more wear. The simulator uses
//! it as the load of [`crate::spm::tip::TipState::wear_archard`] in tapping.
//!
//! ```
//! use scopegym_physics::spm::tapping::{mean_tapping_force, phase};
//! // Conservative, at resonance: sin φ = A/A₀.
//! let phi = phase(10e-9, 20e-9, 1.0, 400.0, 40.0, 0.0);
//! assert!((phi - 30f64.to_radians()).abs() < 1e-12);
//! // k A₀/(2Q) √(1 − r²) for k = 40 N/m, A₀ = 20 nm, Q = 400, r = 0.6.
//! let f = mean_tapping_force(40.0, 20e-9, 400.0, 0.6);
//! assert!((f - 0.8e-9).abs() < 1e-21);
//! ```

use crate::error::{Result, check_range};
use crate::param::Param;
use crate::param::dims::{Energy, Length, Unitless};
use crate::spm::feedback::FeedbackConfig;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use std::ops::Bound::{Excluded, Included};

/// One electronvolt, J.
const EV: f64 = 1.602_176_634e-19;

/// How the AFM keeps the tip on the surface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfmOperation {
    /// Contact mode: deflection feedback at `contact_force`.
    #[default]
    Contact,
    /// Tapping (amplitude-modulation) mode: amplitude feedback, amplitude and phase channels.
    Tapping,
}

/// AFM operation (`[afm]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AfmConfig {
    /// `"contact"` or `"tapping"` (AFM mode only). Default `"contact"`.
    pub mode: AfmOperation,
    /// Load of the tip in contact mode (and PFM), N, in `(0, 1e-6]`. Default 10 nN.
    pub contact_force: Param<Unitless>,
    /// Free oscillation amplitude `A₀`, m, in `(0, 1 µm]`. Default 20 nm.
    pub free_amplitude: Param<Length>,
    /// Amplitude set point ratio `r = A_sp/A₀`, in `(0, 1)`. Default 0.7.
    pub setpoint_ratio: Param<Unitless>,
    /// Drive frequency over the resonance frequency, `ω/ω₀`, in `(0, 2]`. Default 1.
    pub drive_ratio: Param<Unitless>,
    /// Quality factor `Q` of the cantilever, in `[1, 1e5]`. Default 400.
    pub quality_factor: Param<Unitless>,
    /// Spring constant `k` of the cantilever, N/m, in `[1e-3, 1e3]`. Default 40 N/m.
    pub spring_constant: Param<Unitless>,
    /// Energy dissipated per tap on the substrate, eV, in `[0, 1e6]`. Default 2 eV.
    pub dissipation_substrate: Param<Energy>,
    /// Energy dissipated per tap on the surface's features (particles), eV, in `[0, 1e6]`.
    /// Default 20 eV.
    pub dissipation_feature: Param<Energy>,
}

impl Default for AfmConfig {
    fn default() -> Self {
        Self {
            mode: AfmOperation::Contact,
            contact_force: Param::fixed(10e-9),
            free_amplitude: Param::fixed(20e-9),
            setpoint_ratio: Param::fixed(0.7),
            drive_ratio: Param::fixed(1.0),
            quality_factor: Param::fixed(400.0),
            spring_constant: Param::fixed(40.0),
            dissipation_substrate: Param::fixed(2.0),
            dissipation_feature: Param::fixed(20.0),
        }
    }
}

impl AfmConfig {
    /// Checks ranges (NaN is rejected); `prefix` names the section, e.g. `"afm."`.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let f = |name: &str| format!("{prefix}{name}");
        let above_zero = |hi: f64| (Excluded(0.0), Included(hi));
        check_range(
            &f("contact_force"),
            self.contact_force.get(),
            above_zero(1e-6),
            "N",
        )?;
        check_range(
            &f("free_amplitude"),
            self.free_amplitude.get(),
            above_zero(1e-6),
            "m",
        )?;
        let r = self.setpoint_ratio.get();
        check_range(&f("setpoint_ratio"), r, (Excluded(0.0), Excluded(1.0)), "")?;
        check_range(
            &f("drive_ratio"),
            self.drive_ratio.get(),
            above_zero(2.0),
            "",
        )?;
        check_range(
            &f("quality_factor"),
            self.quality_factor.get(),
            1.0..=1e5,
            "",
        )?;
        check_range(
            &f("spring_constant"),
            self.spring_constant.get(),
            1e-3..=1e3,
            "N/m",
        )?;
        for (name, e) in [
            ("dissipation_substrate", self.dissipation_substrate.get()),
            ("dissipation_feature", self.dissipation_feature.get()),
        ] {
            check_range(&f(name), e, 0.0..=1e6, "eV")?;
        }
        Ok(())
    }

    /// The feedback settings the loop runs with: `feedback` itself in contact; in tapping its
    /// lost-contact saturation becomes `min(saturation, (1 − r)·A₀)`, the amplitude reserve
    /// (module docs).
    pub fn feedback(&self, feedback: &FeedbackConfig) -> FeedbackConfig {
        let mut f = feedback.clone();
        if self.is_tapping() {
            let reserve = (1.0 - self.setpoint_ratio.get()) * self.free_amplitude.get();
            if reserve < f.saturation.get() {
                f.saturation = Param::fixed(reserve);
            }
        }
        f
    }

    /// Whether the AFM taps.
    pub fn is_tapping(&self) -> bool {
        self.mode == AfmOperation::Tapping
    }

    /// The amplitude set point `A_sp = r·A₀`, m.
    pub fn setpoint_amplitude(&self) -> f64 {
        self.setpoint_ratio.get() * self.free_amplitude.get()
    }

    /// The tip's mean load, N: `contact_force` in contact, [`mean_tapping_force`] at the set
    /// point in tapping.
    pub fn load(&self) -> f64 {
        match self.mode {
            AfmOperation::Contact => self.contact_force.get(),
            AfmOperation::Tapping => mean_tapping_force(
                self.spring_constant.get(),
                self.free_amplitude.get(),
                self.quality_factor.get(),
                self.setpoint_ratio.get(),
            ),
        }
    }

    /// The cantilever's amplitude (m) and phase lag (rad) at a pixel whose mean tracking error
    /// is `error` (`h − z`, m) and whose tip-sample interaction dissipates `e_dis` eV per tap:
    /// [`amplitude`] and [`phase`].
    pub fn signals(&self, error: f64, e_dis: f64) -> (f64, f64) {
        let a0 = self.free_amplitude.get();
        let a = amplitude(self.setpoint_amplitude(), a0, error);
        let phi = phase(
            a,
            a0,
            self.drive_ratio.get(),
            self.quality_factor.get(),
            self.spring_constant.get(),
            e_dis,
        );
        (a, phi)
    }
}

/// The amplitude (m) at the tracking error `error = h − z` (m): `clamp(A_sp − error, 0, A₀)`
/// (amplitude ∝ gap, `dA/dz = 1`). A NaN error reads `A_sp`.
pub fn amplitude(setpoint: f64, free: f64, error: f64) -> f64 {
    let a = setpoint - error;
    if a.is_nan() {
        setpoint
    } else {
        a.clamp(0.0, free)
    }
}

/// The phase lag (rad, in `[0, π/2]`) of a tapping cantilever of amplitude `a` (m), free
/// amplitude `a0` (m), drive ratio `ω/ω₀`, quality factor `q`, spring constant `k` (N/m), with
/// `e_dis` eV dissipated per tap: `asin((ω/ω₀)(A/A₀) + Q E_dis/(π k A A₀))` (Cleveland et al.
/// 1998), the right side clamped to `[0, 1]` (`A = 0` reads π/2).
pub fn phase(a: f64, a0: f64, drive_ratio: f64, q: f64, k: f64, e_dis: f64) -> f64 {
    let conservative = drive_ratio * a / a0;
    let s = if e_dis == 0.0 {
        conservative
    } else if a > 0.0 {
        conservative + q * e_dis * EV / (PI * k * a * a0)
    } else {
        1.0
    };
    if s.is_nan() {
        return 0.5 * PI;
    }
    s.clamp(0.0, 1.0).asin()
}

/// The mean tip-sample force of tapping at resonance, N: `k A₀ √(1 − r²)/(2Q)` for spring
/// constant `k` (N/m), free amplitude `A₀` (m), quality factor `Q` and set point ratio `r`
/// (module docs: the virial with the force at the lower turning point, conservative contact).
pub fn mean_tapping_force(k: f64, a0: f64, q: f64, r: f64) -> f64 {
    k * a0 * (1.0 - r * r).max(0.0).sqrt() / (2.0 * q)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::instrument::SpmInstrument;
    use crate::spm::sim::{SpmConfig, SpmSimulator};
    use crate::spm::surface::SurfaceKind;
    use crate::spm::tip::WearModel;

    /// A noiseless tapping AFM over particles, no tip changes but wear.
    fn tapping(r: f64) -> SpmConfig {
        let mut c = SpmConfig::default().without_scanner_imperfections();
        c.afm.mode = AfmOperation::Tapping;
        c.afm.setpoint_ratio = Param::fixed(r);
        c.sample.pixels = 64;
        c.sample.size = Param::fixed(0.5e-6);
        c.sample.crash_threshold = Param::fixed(1e-6);
        c.scan.pixels = [32, 64];
        c.scan.size = Param::fixed(0.4e-6);
        c.scan.line_rate = Param::fixed(1.0);
        c.surface.kind = SurfaceKind::Particles;
        c.surface.particle_density = Param::fixed(4e13);
        c.surface.roughness = Param::fixed(0.0);
        c.tip.adsorbate_rate = Param::fixed(0.0);
        c
    }

    /// The channels of one frame: height, error, amplitude, phase (deg), and the noiseless
    /// reference.
    fn channels(c: SpmConfig, seed: u64) -> Vec<ndarray::Array2<f32>> {
        let mut sim = SpmSimulator::new(c, seed).unwrap();
        let f = sim.acquire_frame().unwrap();
        let names: Vec<&str> = f.channels.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["height", "height_retrace", "error", "amplitude", "phase"]
        );
        let mut out: Vec<_> = [0, 2, 3, 4]
            .iter()
            .map(|&i| f.channels[i].image.clone())
            .collect();
        out.push(sim.last_noiseless().to_owned());
        out
    }

    /// Tapping's channels: the amplitude is `clamp(A_sp − e, 0, A₀)` of the error channel; a
    /// conservative interaction (no dissipation, at resonance) gives `φ = asin(A/A₀)` at every
    /// pixel; with dissipation the shift `sin φ − A/A₀` is `Q E/(π k A A₀)` with `E` the
    /// substrate's 2 eV off the particles and the particles' 20 eV on them.
    #[test]
    fn tapping_amplitude_and_phase_follow_the_energy_balance() {
        let mut c = tapping(0.7);
        c.afm.dissipation_substrate = Param::fixed(0.0);
        c.afm.dissipation_feature = Param::fixed(0.0);
        let ch = channels(c, 2);
        let (err, amp, ph) = (&ch[1], &ch[2], &ch[3]);
        let (a0, asp) = (20e-9, 14e-9);
        let mut worst = (0.0f64, 0.0f64);
        for ((e, a), p) in err.iter().zip(amp).zip(ph) {
            let expected_a = (asp - f64::from(*e)).clamp(0.0, a0);
            worst.0 = worst.0.max((f64::from(*a) - expected_a).abs());
            let expected_p = (f64::from(*a) / a0).asin().to_degrees();
            worst.1 = worst.1.max((f64::from(*p) - expected_p).abs());
        }
        println!("worst amplitude {:e} m, phase {:e} deg", worst.0, worst.1);
        assert!(worst.0 < 1e-7 * a0, "amplitude off by {:e} m", worst.0);
        assert!(worst.1 < 1e-5, "phase off asin(A/A₀) by {:e}°", worst.1);
        // Some pixels tap harder than the set point, some lighter (the loop's error).
        assert!(amp.iter().any(|&a| f64::from(a) < asp - 1e-11));
        assert!(amp.iter().any(|&a| f64::from(a) > asp + 1e-11));

        let c = tapping(0.7);
        let ch = channels(c, 2);
        let (amp, ph) = (&ch[2], &ch[3]);
        let (q, k, ev) = (400.0, 40.0, 1.602_176_634e-19);
        let implied: Vec<f64> = amp
            .iter()
            .zip(ph)
            .filter(|(a, p)| f64::from(**a) < 0.99 * a0 && f64::from(**p) < 89.9)
            .map(|(a, p)| {
                let (a, p) = (f64::from(*a), f64::from(*p).to_radians());
                (p.sin() - a / a0) * PI * k * a * a0 / (q * ev)
            })
            .collect();
        let (lo, hi) = implied
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        println!("implied dissipation in [{lo}, {hi}] eV");
        let near = |v: f64, e: f64| (v - e).abs() < 2e-3 * e;
        let on_substrate = implied.iter().filter(|&&v| near(v, 2.0)).count();
        let on_particles = implied.iter().filter(|&&v| near(v, 20.0)).count();
        assert!(
            implied.iter().all(|&v| v > 2.0 - 4e-3 && v < 20.0 + 4e-2),
            "dissipation outside [2, 20] eV"
        );
        assert!(
            on_substrate > implied.len() / 2 && on_particles >= 5,
            "{on_substrate} pixels at 2 eV, {on_particles} at 20 eV of {}",
            implied.len()
        );
    }

    /// The trade-off: harder tapping (r = 0.5) wears the tip faster, by the ratio of the mean
    /// forces `√(1 − 0.5²)/√(1 − 0.97²)`, while gentle tapping (r = 0.97) has only a 0.6 nm
    /// amplitude reserve, loses the surface behind the particles and images them worse (its
    /// r.m.s. deviation from the noiseless image more than 1.5 times larger; measured ≈ 2.2).
    #[test]
    fn harder_tapping_wears_more_and_gentle_tapping_images_worse() {
        let run = |r: f64| {
            let mut c = tapping(r);
            c.scan.line_rate = Param::fixed(2.0);
            c.tip.wear_model = WearModel::Archard;
            let mut sim = SpmSimulator::new(c, 3).unwrap();
            let f = sim.acquire_frame().unwrap();
            let h = f.channels[0].image.clone();
            let err = h
                .iter()
                .zip(sim.last_noiseless().iter())
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>()
                / h.len() as f64;
            (sim.tip_state().truncated_volume(), err.sqrt())
        };
        let (v_hard, err_hard) = run(0.5);
        let (v_gentle, err_gentle) = run(0.97);
        let ratio = v_hard / v_gentle;
        println!("volumes {v_hard:e} {v_gentle:e} m³, errors {err_hard:e} {err_gentle:e} m");
        let expected = (0.75f64 / (1.0 - 0.97f64 * 0.97)).sqrt();
        assert!(
            (ratio / expected - 1.0).abs() < 1e-9,
            "worn volume ratio {ratio}, expected {expected}"
        );
        assert!(
            err_gentle > 1.5 * err_hard,
            "image error gentle {err_gentle:e} m vs hard {err_hard:e} m"
        );
    }

    /// Archard wear over a frame in contact: the worn volume is `k_w F s / H` summed over every
    /// pass (`s` = the line's length, trace and retrace), and doubling the load doubles it.
    #[test]
    fn doubling_the_contact_load_doubles_the_worn_volume() {
        let run = |force: f64| {
            let mut c = tapping(0.7);
            c.afm.mode = AfmOperation::Contact;
            c.afm.contact_force = Param::fixed(force);
            c.tip.wear_model = WearModel::Archard;
            c.tip.wear_coefficient = Param::fixed(1e-4);
            let mut sim = SpmSimulator::new(c, 4).unwrap();
            sim.acquire_frame().unwrap();
            sim.tip_state().truncated_volume()
        };
        let (v1, v2) = (run(10e-9), run(20e-9));
        println!("worn {v1:e} and {v2:e} m³");
        // 32 lines, trace and retrace, 0.4 µm each: s = 25.6 µm.
        let expected = 1e-4 * 10e-9 * 32.0 * 2.0 * 0.4e-6 / 10e9;
        assert!(
            (v1 / expected - 1.0).abs() < 1e-9,
            "worn {v1:e} m³, Archard {expected:e} m³"
        );
        assert!((v2 / v1 - 2.0).abs() < 1e-9, "ratio {}", v2 / v1);
    }

    #[test]
    fn defaults_validate_and_bad_values_name_the_field() {
        AfmConfig::default().validate("afm.").unwrap();
        for (name, cfg) in [
            (
                "afm.setpoint_ratio",
                AfmConfig {
                    setpoint_ratio: Param::fixed(1.0),
                    ..Default::default()
                },
            ),
            (
                "afm.free_amplitude",
                AfmConfig {
                    free_amplitude: Param::fixed(f64::NAN),
                    ..Default::default()
                },
            ),
            (
                "afm.contact_force",
                AfmConfig {
                    contact_force: Param::fixed(0.0),
                    ..Default::default()
                },
            ),
            (
                "afm.dissipation_feature",
                AfmConfig {
                    dissipation_feature: Param::fixed(-1.0),
                    ..Default::default()
                },
            ),
        ] {
            let e = cfg.validate("afm.").unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    /// Cleveland et al.'s relation, evaluated by hand: Q = 400, k = 40 N/m, A₀ = 20 nm,
    /// A = 14 nm, E = 10 eV: `Q E/(π k A A₀) = 400·1.602e-18/(π·40·14e-9·20e-9) = 0.0182`, so
    /// `sin φ = 0.7182`; conservative `sin φ = 0.7`; off resonance `ω/ω₀ = 0.9` scales the
    /// conservative part.
    #[test]
    fn phase_follows_the_energy_balance() {
        let (a0, a) = (20e-9, 14e-9);
        let cons = phase(a, a0, 1.0, 400.0, 40.0, 0.0);
        assert_eq!(cons, 0.7f64.asin());
        let shift = 400.0 * 10.0 * 1.602_176_634e-19 / (PI * 40.0 * 14e-9 * 20e-9);
        assert!((shift - 0.018_21).abs() < 1e-5, "{shift}");
        let diss = phase(a, a0, 1.0, 400.0, 40.0, 10.0);
        assert!((diss.sin() - (0.7 + shift)).abs() < 1e-12);
        let off = phase(a, a0, 0.9, 400.0, 40.0, 0.0);
        assert!((off.sin() - 0.63).abs() < 1e-12);
        // Free oscillation at resonance: 90°; the edges never give NaN.
        assert_eq!(phase(a0, a0, 1.0, 400.0, 40.0, 0.0), 0.5 * PI);
        assert_eq!(phase(0.0, a0, 1.0, 400.0, 40.0, 10.0), 0.5 * PI);
        assert_eq!(phase(a0, a0, 1.0, 400.0, 40.0, 1e6), 0.5 * PI);
        assert_eq!(amplitude(14e-9, a0, 2e-9), 12e-9);
        assert_eq!(amplitude(14e-9, a0, -10e-9), a0);
        assert_eq!(amplitude(14e-9, a0, 30e-9), 0.0);
        assert_eq!(amplitude(14e-9, a0, f64::NAN), 14e-9);
    }

    /// A driven, damped cantilever (`ẍ + (ω₀/Q) ẋ + ω₀² x = (ω₀²/k)(F₀ cos ω₀t + F_ts)`,
    /// `F₀ = k A₀/Q`) tapping a stiff, conservative wall, integrated to steady state (RK4):
    /// its amplitude and phase obey `sin φ = A/A₀`, and its mean wall force is
    /// `k A₀ cos φ/(2Q)`, the formula [`mean_tapping_force`] evaluates at the set point.
    #[test]
    fn mean_force_and_phase_match_a_tapping_oscillator() {
        let (k, q, a0) = (40.0, 50.0, 20e-9);
        let w0 = 1.0f64; // time in units of 1/ω₀
        for wall in [-12e-9, -16e-9] {
            let k_wall = 400.0 * k;
            let f_ts = |x: f64| if x < wall { k_wall * (wall - x) } else { 0.0 };
            let acc = |t: f64, x: f64, v: f64| {
                let f = k * a0 / q * (w0 * t).cos() + f_ts(x);
                -w0 / q * v - w0 * w0 * x + w0 * w0 * f / k
            };
            let steps_per_cycle = 2000usize;
            let h = 2.0 * PI / steps_per_cycle as f64;
            let (mut t, mut x, mut v) = (0.0f64, 0.0f64, 0.0f64);
            let (settle, measure) = (6 * q as usize, 20usize);
            let (mut sc, mut ss, mut sf) = (0.0, 0.0, 0.0);
            for cycle in 0..settle + measure {
                for _ in 0..steps_per_cycle {
                    if cycle >= settle {
                        sc += x * t.cos();
                        ss += x * t.sin();
                        sf += f_ts(x);
                    }
                    let (k1x, k1v) = (v, acc(t, x, v));
                    let (k2x, k2v) = (
                        v + 0.5 * h * k1v,
                        acc(t + 0.5 * h, x + 0.5 * h * k1x, v + 0.5 * h * k1v),
                    );
                    let (k3x, k3v) = (
                        v + 0.5 * h * k2v,
                        acc(t + 0.5 * h, x + 0.5 * h * k2x, v + 0.5 * h * k2v),
                    );
                    let (k4x, k4v) = (v + h * k3v, acc(t + h, x + h * k3x, v + h * k3v));
                    x += h / 6.0 * (k1x + 2.0 * k2x + 2.0 * k3x + k4x);
                    v += h / 6.0 * (k1v + 2.0 * k2v + 2.0 * k3v + k4v);
                    t += h;
                }
            }
            let n = (measure * steps_per_cycle) as f64;
            // x ≈ A cos(t − φ) = A cos φ cos t + A sin φ sin t.
            let (c, s) = (2.0 * sc / n, 2.0 * ss / n);
            let a = c.hypot(s);
            let phi = s.atan2(c);
            let mean_f = sf / n;
            let r = a / a0;
            println!(
                "wall {wall:e}: A/A₀ {r}, sin φ {}, mean force {mean_f:e} N, formula {:e} N",
                phi.sin(),
                mean_tapping_force(k, a0, q, r)
            );
            assert!(
                (phi.sin() - r).abs() < 2e-3,
                "wall {wall:e}: sin φ = {}, A/A₀ = {r}",
                phi.sin()
            );
            let expected = mean_tapping_force(k, a0, q, r);
            assert!(
                ((mean_f - expected) / expected).abs() < 0.01,
                "wall {wall:e}: mean force {mean_f:e} N, formula {expected:e} N (A/A₀ = {r})"
            );
        }
    }
}
