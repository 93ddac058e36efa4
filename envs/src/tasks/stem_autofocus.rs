//! `scopegym/StemAutofocus-v1`: correct defocus and two-fold astigmatism of a STEM probe from
//! the images alone (anchor: CEOS / SmartTuning autofocus).
//!
//! Each episode starts from random defocus C10 and astigmatism (C12a, C12b) drawn from the seed
//! and set through the corrector (`set_aberrations`); each step applies the action's changes
//! and acquires one HAADF frame.
//!
//! - **Observation** (Box, 64 × 64 by default): the HAADF frame divided by its mean, clipped to
//!   `[0, 20]` (works on a real instrument; the absolute count scale is removed).
//! - **Action** (Box, 3, nm): `[ΔC10, ΔC12a, ΔC12b]`, each in `±max_step`, added to the
//!   aberrations in force (Cartesian astigmatism `(C12a, C12b) = C12 (cos 2φ12, sin 2φ12)`).
//! - **Reward**: `ln(S_t / S_{t−1}) − dose_weight · D`, with `S` the image sharpness
//!   [`normalized_variance`] of the frame (from the image only: the classic autofocus
//!   criterion `var(I)/mean(I)²`, which peaks when the probe is sharpest because the atomic
//!   columns then have the most contrast), floored at 0.01, and `D` the frame's dose in e⁻/Å².
//!   The sharpness gains telescope to `ln(S_final / S_0)`. `success_bonus` is added on
//!   success. (Shot noise adds a constant `≈ 1/counts` to `S`, the same for every frame.)
//! - **Success** (terminates): the residual aberration phase `max |χ(θ)|` over the aperture
//!   (`θ ≤ α`, α the configured convergence angle, all aberrations in force, computed from the
//!   true aberrations) is below π/4.
//! - **Info** (never in the observation): `residual_chi` (rad), `c10`, `c12a`, `c12b` (true
//!   values, m), `sharpness`, `success`, and the randomized scenario values (`param.*`).
//! - **Heuristic**: the classic autofocus, a coordinate search on the observed sharpness: step
//!   one coefficient while the sharpness improves; when it worsens, go back to the best setting
//!   and try the other direction, then the next coefficient; halve the steps after each round.
//!
//! The registered task runs on [`LatticeSimulator`], which images the perfect crystal by Fourier
//! synthesis: the same incoherent HAADF model, probe (every aberration, aperture, chromatic
//! spread) and source blur as [`StemSimulator`], without the padded-grid convolution, so a step
//! costs tens of microseconds. The task is generic over [`StemInstrument`]: [`StemAutofocus::new`]
//! runs it on the full simulator (defects, scan distortions, damage) or a real instrument.

use crate::env::{Info, InfoValue, RgbImage, Task, TaskStep};
use crate::error::{EnvError, Result};
use crate::level::{Difficulty, Split};
use crate::space::{Space, Value};
use crate::tasks::{NewEpisode, TaskConfig, check_nonnegative, config_from_toml};
use rand::Rng;
use scopegym_physics::instrument::{ScanSettings, StemInstrument};
use scopegym_physics::param::Param;
use scopegym_physics::rng::{derive_seed, seeded};
use scopegym_physics::stem::StemConfig;
#[cfg(doc)]
use scopegym_physics::stem::StemSimulator;
use scopegym_physics::stem::lattice::LatticeSimulator;
use scopegym_physics::stem::optics::{Aberrations, electron_wavelength};
use scopegym_physics::stem::specimen::Crystal;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// Task settings (`config = {...}` or a scenario's `[task]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Difficulty level (`"easy"`, `"medium"`, `"hard"`): picks the defaults of the
    /// domain-randomization ranges (module docs). Default `"medium"`.
    pub difficulty: Difficulty,
    /// Parameter split (`"train"`, or the held-out `"test"`): which bands of every randomized
    /// range episodes draw from ([`crate::level`]). Default `"train"`.
    pub split: Split,
    /// The simulated instrument ([`LatticeSimulator`]: a perfect, unbounded crystal; constant
    /// drift at most). Default: 60 kV, 30 mrad, 100 pA, monolayer MoS₂ at a random rotation, no
    /// drift or scan noise.
    pub instrument: StemConfig,
    /// Frame side, pixels. Default 64.
    pub pixels: usize,
    /// Pixel size, m. Default 0.25 Å.
    pub pixel_size: f64,
    /// Dwell time per pixel, s. Default 2 µs.
    pub dwell_time: f64,
    /// Steps per episode. Default 40.
    pub max_steps: usize,
    /// Largest change of each coefficient per step, m. Default 2 nm.
    pub max_step: f64,
    /// Initial defocus drawn uniformly in `±c10_range`, m. Default 6 nm.
    pub c10_range: f64,
    /// Initial astigmatism magnitude drawn uniformly in `[0, c12_range]` (random azimuth), m.
    /// Default 4 nm.
    pub c12_range: f64,
    /// Reward cost per e⁻/Å² of frame dose. Default 1e-6.
    pub dose_weight: f64,
    /// Reward added on success. Default 1.
    pub success_bonus: f64,
}

impl Default for Config {
    fn default() -> Self {
        let mut instrument = StemConfig::default().without_scan_distortions();
        let s = &mut instrument.specimen;
        s.crystal = Crystal::Mos2;
        s.rotation = Param::Uniform(0.0, std::f64::consts::FRAC_PI_3, Default::default());
        instrument.scan.pixels = [64, 64];
        instrument.scan.pixel_size = Param::fixed(0.25e-10);
        instrument.damage.sputtering = false;
        Self {
            difficulty: Difficulty::Medium,
            split: Split::Train,
            instrument,
            pixels: 64,
            pixel_size: 0.25e-10,
            dwell_time: 2e-6,
            max_steps: 40,
            max_step: 2e-9,
            c10_range: 6e-9,
            c12_range: 4e-9,
            dose_weight: 1e-6,
            success_bonus: 1.0,
        }
    }
}

impl TaskConfig for Config {
    fn at_level(difficulty: Difficulty) -> Self {
        Self {
            difficulty,
            ..Self::default()
        }
    }
}

impl Config {
    /// Checks ranges, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.instrument
            .validate()
            .map_err(|e| EnvError::config("instrument", e.to_string()))?;
        let bad = |f: &str, r: String| Err(EnvError::config(f, r));
        if !(8..=512).contains(&self.pixels) {
            return bad("pixels", format!("must be 8..=512, got {}", self.pixels));
        }
        if !(self.pixel_size > 0.0 && self.pixel_size <= 1e-9) {
            return bad(
                "pixel_size",
                format!("must be in (0, 1 nm], got {} m", self.pixel_size),
            );
        }
        if !(self.dwell_time > 0.0 && self.dwell_time <= 1e-3) {
            return bad(
                "dwell_time",
                format!("must be in (0, 1 ms], got {} s", self.dwell_time),
            );
        }
        if self.max_steps == 0 {
            return bad("max_steps", "must be at least 1".into());
        }
        for (f, v) in [
            ("max_step", self.max_step),
            ("c10_range", self.c10_range),
            ("c12_range", self.c12_range),
        ] {
            if !(v.is_finite() && (0.0..=1e-6).contains(&v)) {
                return bad(f, format!("must be in [0, 1 µm], got {v} m"));
            }
        }
        if self.max_step <= 0.0 {
            return bad("max_step", "must be > 0".into());
        }
        check_nonnegative(&[
            ("dose_weight", self.dose_weight),
            ("success_bonus", self.success_bonus),
        ])?;
        Ok(())
    }
}

/// Largest |χ| (rad) of `ab` over the aperture `θ ≤ alpha` at wavelength `lambda`, on a polar
/// grid of 24 radii × 48 azimuths.
pub fn residual_chi(ab: &Aberrations, lambda: f64, alpha: f64) -> f64 {
    let c = ab.cartesian(lambda);
    // The 48 directions, computed once (not once per radius).
    let dirs: [(f64, f64); 48] = std::array::from_fn(|j| {
        let (s, c) = (2.0 * PI * j as f64 / 48.0).sin_cos();
        (c, s)
    });
    let mut worst = 0.0f64;
    let mut vals = [0.0f64; 48];
    for i in 1..=24 {
        let t = alpha * i as f64 / 24.0;
        // Evaluated into an array first, so the evaluations vectorize; then the maximum.
        for (v, &(cs, sn)) in vals.iter_mut().zip(&dirs) {
            *v = c.chi(t * cs, t * sn).abs();
        }
        worst = vals.iter().fold(worst, |w, &v| w.max(v));
    }
    worst
}

/// Normalized variance `var(x)/mean(x)²` of `values` (0 for an empty, non-positive-mean or
/// non-finite input): the image-contrast sharpness of autofocus.
pub fn normalized_variance(values: &[f32]) -> f64 {
    let n = values.len() as f64;
    if values.is_empty() {
        return 0.0;
    }
    let mean = sum_by(values, f64::from) / n;
    let var = sum_by(values, |v| (f64::from(v) - mean).powi(2)) / n;
    let s = var / (mean * mean);
    if mean > 0.0 && s.is_finite() { s } else { 0.0 }
}

/// `Σ f(v)` over `values` with eight partial sums (so the additions need not wait for each
/// other).
fn sum_by(values: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += f(c[k]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The heuristic's coordinate-search state (settings relative to the episode start, nm).
#[derive(Debug, Clone, Copy)]
struct Search {
    now: [f64; 3],
    best: Option<(f64, [f64; 3])>,
    coord: usize,
    dir: f64,
    step: f64,
    flips: u32,
}

impl Search {
    fn new(step: f64) -> Self {
        Self {
            now: [0.0; 3],
            best: None,
            coord: 0,
            dir: 1.0,
            step,
            flips: 0,
        }
    }
}

/// The task over any STEM instrument `I`.
#[derive(Debug)]
pub struct StemAutofocus<I> {
    cfg: Config,
    inst: I,
    last: Vec<f32>,
    sharpness: f64,
    search: Search,
}

impl StemAutofocus<LatticeSimulator> {
    /// The task on the lattice model, from an optional TOML config.
    pub fn from_config(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Config = config_from_toml(config)?;
        cfg.validate()?;
        let inst = LatticeSimulator::new(cfg.instrument.clone(), 0)
            .map_err(|e| EnvError::config("instrument", e.to_string()))?;
        Ok(Self::new(cfg, inst))
    }
}

/// Upper bound of the normalized image.
const OBS_MAX: f32 = 20.0;
/// Floor of the sharpness in the reward's logarithm.
const S_FLOOR: f64 = 0.01;

impl<I: StemInstrument + NewEpisode + Send> StemAutofocus<I> {
    /// The task on `inst` with `cfg`.
    pub fn new(cfg: Config, mut inst: I) -> Self {
        inst.set_region(cfg.split.region());
        Self {
            last: vec![0.0; cfg.pixels * cfg.pixels],
            search: Search::new(cfg.max_step * 1e9),
            cfg,
            inst,
            sharpness: S_FLOOR,
        }
    }

    /// Acquires a frame; stores the normalized image and returns (sharpness, dose in e⁻/Å²).
    fn acquire(&mut self) -> Result<(f64, f64)> {
        let f = self.inst.acquire_frame()?;
        let dose = f.meta.dose * 1e-20;
        let n = f.image.len().max(1) as f64;
        // A real driver may hand over a non-contiguous view; the simulators' are contiguous.
        let owned;
        let img = match f.image.as_slice() {
            Some(s) => s,
            None => {
                owned = f.image.iter().copied().collect::<Vec<f32>>();
                &owned
            }
        };
        let mean = sum_by(img, f64::from) / n;
        let scale = if mean > 0.0 && mean.is_finite() {
            (1.0 / mean) as f32
        } else {
            0.0
        };
        self.last.clear();
        self.last.extend(img.iter().map(|&v| {
            let x = v * scale;
            if x.is_finite() {
                x.clamp(0.0, OBS_MAX)
            } else {
                0.0
            }
        }));
        // The sharpness of the normalized image equals the raw frame's (up to the clipping).
        let s = normalized_variance(&self.last);
        Ok((s.max(S_FLOOR), dose))
    }

    fn truth(&self, info: &mut Info) -> bool {
        let ab = self.inst.aberrations();
        let lambda = electron_wavelength(self.inst.beam_energy());
        let alpha = self.cfg.instrument.optics.convergence_angle.get();
        let chi = residual_chi(&ab, lambda, alpha);
        let (a, b) = ab.c12_cartesian();
        info.insert("residual_chi".into(), InfoValue::F64(chi));
        info.insert("c10".into(), InfoValue::F64(ab.c10));
        info.insert("c12a".into(), InfoValue::F64(a));
        info.insert("c12b".into(), InfoValue::F64(b));
        info.insert("sharpness".into(), InfoValue::F64(self.sharpness));
        chi < PI / 4.0
    }
}

impl<I: StemInstrument + NewEpisode + Send> Task for StemAutofocus<I> {
    fn observation_space(&self) -> Space {
        Space::uniform_box(&[self.cfg.pixels, self.cfg.pixels], 0.0, OBS_MAX)
    }

    fn action_space(&self) -> Space {
        let m = (self.cfg.max_step * 1e9) as f32;
        Space::uniform_box(&[3], -m, m)
    }

    fn max_episode_steps(&self) -> usize {
        self.cfg.max_steps
    }

    fn reset(&mut self, seed: u64, info: &mut Info) -> Result<Value> {
        self.inst.new_episode(seed, info)?;
        self.inst.set_blanked(false)?;
        self.search = Search::new(self.cfg.max_step * 1e9);
        let c = &self.cfg;
        let s = ScanSettings {
            rows: c.pixels,
            cols: c.pixels,
            pixel_size: c.pixel_size,
            dwell_time: c.dwell_time,
            flyback_time: 0.0,
            center: [0.0, 0.0],
        };
        self.inst.configure_scan(&s)?;
        let mut rng = seeded(derive_seed(seed, "aberrations"));
        let mut ab = self.inst.aberrations();
        ab.c10 = c.c10_range * (2.0 * rng.random::<f64>() - 1.0);
        let mag = c.c12_range * rng.random::<f64>();
        let phi = PI * rng.random::<f64>();
        ab.c12 = mag;
        ab.phi12 = phi;
        self.inst.set_aberrations(&ab)?;
        let (sharp, _) = self.acquire()?;
        self.sharpness = sharp;
        self.truth(info);
        Ok(Value::Box(self.last.clone()))
    }

    fn step(&mut self, action: &Value, info: &mut Info) -> Result<TaskStep> {
        let a = action
            .as_box()
            .ok_or_else(|| EnvError::action("action", "expected a Box value"))?;
        let d = |k: usize| f64::from(a.get(k).copied().unwrap_or(0.0)) * 1e-9;
        let mut ab = self.inst.aberrations();
        ab.c10 += d(0);
        let (ca, cb) = ab.c12_cartesian();
        ab.set_c12_cartesian(ca + d(1), cb + d(2));
        self.inst.set_aberrations(&ab)?;
        let (sharp, dose) = self.acquire()?;
        let mut reward = (sharp / self.sharpness).ln() - self.cfg.dose_weight * dose;
        self.sharpness = sharp;
        let success = self.truth(info);
        if success {
            reward += self.cfg.success_bonus;
        }
        info.insert("success".into(), InfoValue::Bool(success));
        Ok(TaskStep {
            obs: Value::Box(self.last.clone()),
            reward,
            terminated: success,
            success,
        })
    }

    fn render(&self) -> RgbImage {
        RgbImage::from_grey(&self.last, self.cfg.pixels, self.cfg.pixels)
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        let s_now = obs.as_box().map_or(0.0, normalized_variance);
        let m = self.cfg.max_step * 1e9;
        let s = &mut self.search;
        match s.best {
            Some((best, _)) if s_now <= best => {
                // Worse: back to the best setting, other direction, then the next coefficient.
                s.dir = -s.dir;
                s.flips += 1;
                if s.flips >= 2 {
                    s.flips = 0;
                    s.coord = (s.coord + 1) % 3;
                    if s.coord == 0 {
                        s.step *= 0.5;
                    }
                }
            }
            _ => {
                s.best = Some((s_now, s.now));
                s.flips = 0;
            }
        }
        let mut next = s.best.map_or(s.now, |b| b.1);
        next[s.coord] += s.dir * s.step;
        let mut act = [0.0f32; 3];
        for k in 0..3 {
            let d = (next[k] - s.now[k]).clamp(-m, m);
            act[k] = d as f32;
            s.now[k] += d;
        }
        Value::Box(act.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Env, TaskEnv};
    use scopegym_physics::stem::StemSimulator;

    #[test]
    fn heuristic_focuses() {
        let mut env = TaskEnv::new("t", StemAutofocus::from_config(None).unwrap());
        let successes = crate::tasks::testing::heuristic_successes(&mut env, 0..5);
        println!("heuristic: {successes}/5 successes");
        assert!(successes >= 3, "{successes}");
    }

    #[test]
    fn runs_on_the_full_simulator() {
        // The task is generic: on the full simulator (a finite 2.6 nm flake, splatted and
        // convolved) the heuristic focuses as well.
        let mut cfg = Config::default();
        let s = &mut cfg.instrument.specimen;
        s.size = [Param::fixed(2.6e-9), Param::fixed(2.6e-9)];
        let inst = StemSimulator::new(cfg.instrument.clone(), 0).unwrap();
        let mut env = TaskEnv::new("t", StemAutofocus::new(cfg, inst));
        let (mut obs, info) = env.reset(Some(3)).unwrap();
        let chi0 = crate::tasks::testing::info_f64(&info, "residual_chi");
        let mut chi = chi0;
        for _ in 0..20 {
            let a = env.heuristic_action(&obs);
            let s = env.step(&a).unwrap();
            obs = s.obs;
            chi = crate::tasks::testing::info_f64(&s.info, "residual_chi");
            if s.terminated {
                break;
            }
        }
        assert!(chi < 0.5 * chi0, "residual χ {chi0} → {chi}");
    }

    #[test]
    fn residual_chi_of_pure_defocus() {
        // χ = π C10 θ² / λ at the aperture edge.
        let ab = Aberrations {
            c10: 1e-9,
            ..Default::default()
        };
        let lambda = electron_wavelength(60e3);
        let chi = residual_chi(&ab, lambda, 30e-3);
        let want = PI * 1e-9 * 9e-4 / lambda;
        assert!((chi - want).abs() < 1e-9 * want, "{chi} vs {want}");
    }

    #[test]
    fn bad_config_names_the_field() {
        let c: toml::Value = toml::from_str("pixels = 2").unwrap();
        let e = StemAutofocus::from_config(Some(&c))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pixels"), "{e}");
    }
}
