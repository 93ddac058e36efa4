//! `scopegym/StemAutofocus-v2`: correct defocus and two-fold astigmatism of a STEM probe from
//! the images alone, and say when it is done (anchor: CEOS / SmartTuning autofocus).
//!
//! Each episode starts from random defocus C10 and astigmatism (C12a, C12b) drawn from the seed
//! (within the split's bands) and set through the corrector (`set_aberrations`), and acquires a
//! *reference frame* at the nominal dwell `dwell_time`. Each step applies the action's changes
//! relative to the corrector's setting and acquires one HAADF frame at the dwell the agent
//! chose, or, when the agent declares focus reached, acquires a *verification frame* at the
//! nominal dwell and ends the episode.
//!
//! - **Observation** (Box, `pixels`², default 64²): the frame divided by its mean, clipped to
//!   `[0, obs_max]` (default 12: the brightest columns of a focused MoS₂ frame reach about 5
//!   times the mean; short dwells add shot noise). The absolute count scale (current, gain) is removed.
//! - **Action** (Box, 5, each in `[-1, 1]`): `[ΔC10, ΔC12a, ΔC12b, done, dwell]`. The changes
//!   are `a · max_step` (Cartesian astigmatism `(C12a, C12b) = C12 (cos 2φ12, sin 2φ12)`),
//!   added to the corrector's setting. `done > 0` declares focus reached: the changes of that
//!   step are not applied, the verification frame is taken and the episode terminates. The
//!   dwell per pixel of the step's frame is log-uniform over `dwell_range`:
//!   `dwell_range[0] · (dwell_range[1] / dwell_range[0])^((a + 1)/2)` (short dwells are cheap
//!   but give noisy frames).
//! - **Reward**: every frame costs `dose_weight · D`, with `D` its dose in e⁻/Å², which grows
//!   with the chosen dwell. At `done` the image quality is paid:
//!   `quality_weight · ln(S_v / S_0)`, `S` the sharpness [`normalized_variance`] of the
//!   verification frame (`S_v`) and of the reference frame (`S_0`): the classic autofocus
//!   criterion `var(I)/mean(I)²`, which peaks when the probe is sharpest because the atomic
//!   columns then have the most contrast; both frames have the nominal dwell, so their shot
//!   noise adds the same `≈ 1/counts` to `S`; floored at `sharpness_floor`. A fresh frame
//!   judges the declared setting, so no past frame's luck (winner's curse) is paid, and
//!   declaring done at once earns `≈ 0` minus two frames. Without `done` no quality is paid.
//! - **Termination**: `done`. The step limit (`max_steps`) truncates.
//! - **Success** (`info["is_success"]`, ground truth): at the `done` step, the residual
//!   aberration phase `max |χ(θ)|` over the aperture (`θ ≤ α`, all aberrations in force,
//!   from the true aberrations) is below π/4. Every other step, and a truncated episode, is
//!   not a success (a focus never declared does not count); `info["focused"]` reports the
//!   criterion at every step.
//! - **Info** (never in the observation): `residual_chi` (rad), `c10`, `c12a`, `c12b` (true
//!   values, m), `focused`, `sharpness` (this frame's `S`), `reference_sharpness` (`S_0`),
//!   `dose` (e⁻/Å²), `dwell` (s), `done`, `success`, and the randomized scenario values
//!   (`param.*`). The truth comes from [`ProbeTruth`]; on a real instrument it is unknown and
//!   `is_success` is false.
//! - **Heuristic**: the classic autofocus on the observed sharpness, every frame at the nominal
//!   dwell. First a through-focus series: C10 in steps of `max_step` down to `−c10_range` and
//!   up to `+c10_range` (far from focus the sharpness is flat and not monotonic, so a local
//!   search alone can stall there), then to the sharpest position. Then a coordinate search:
//!   step one coefficient (half a step at first) while the sharpness improves; when it worsens,
//!   go back to the best setting and try the other direction, then the next coefficient; halve
//!   the steps after each round. When the step falls below `heuristic_min_step` (or two steps
//!   are left) it returns to the best setting and declares done.
//!
//! # Levels (defaults of the randomized ranges; every range is split train/test)
//!
//! | parameter | easy | medium | hard |
//! |---|---|---|---|
//! | initial defocus C10 | ±4 nm | ±6 nm | ±10 nm |
//! | initial astigmatism C12 | 0-2 nm | 0-4 nm | 0-6 nm |
//! | specimen rotation | U[0, 60°) | U[0, 60°) | U[0, 60°) |
//! | probe current | 100 pA | 60-150 pA | 30-200 pA |
//! | HAADF exponent | 1.7 | 1.55-1.85 | 1.4-2.0 |
//! | detector gain / offset / read noise | 1 / 0 / 0 | 0.8-1.25 / 0-2 / 0 | 0.5-2 / 0-10 / 0-3 |
//! | source size (σ) | 0.35 Å | 0.3-0.45 Å | 0.25-0.6 Å |
//! | drift speed (random direction) | 0 | 0-0.5 nm/min | 0-2 nm/min |
//! | residual C30 | 123 nm | 123 nm | 50 nm-1 µm |
//!
//! # Fidelity
//!
//! `fidelity = "fast"` (the default) runs [`LatticeSimulator`], which images the perfect
//! crystal by Fourier synthesis: the same incoherent HAADF model, probe (every aberration,
//! aperture, chromatic spread) and source blur as [`StemSimulator`], without the padded-grid
//! convolution, so a step costs tens of microseconds; pixels expecting 10 counts or more draw
//! their shot noise from the rounded Cornish-Fisher approximation of the Poisson distribution
//! ([`FAST_SHOT_NOISE_APPROX_FROM`]: total variation distance below 0.004, the mean exact and
//! the variance within 0.3 %). `fidelity = "full"` runs
//! [`StemSimulator`] on the same configuration (a periodic specimen splatted and convolved on
//! the scan grid, with scan distortions and damage where the config enables them). The task is
//! generic over [`StemInstrument`]: [`StemAutofocus::new`] runs it on either or on a real
//! instrument.

use crate::env::{Env, Info, InfoValue, RgbImage, Task, TaskEnv, TaskStep};
use crate::error::{EnvError, Result};
use crate::level::{Difficulty, Split};
use crate::space::{Space, Value};
use crate::tasks::{Fidelity, NewEpisode, TaskConfig, check_nonnegative, config_from_toml};
use scopegym_physics::instrument::{ScanSettings, StemInstrument};
use scopegym_physics::param::Param;
use scopegym_physics::rng::{derive_seed, seeded};
use scopegym_physics::stem::StemConfig;
use scopegym_physics::stem::StemSimulator;
use scopegym_physics::stem::lattice::LatticeSimulator;
use scopegym_physics::stem::optics::{Aberrations, electron_wavelength};
use scopegym_physics::stem::specimen::Crystal;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// Ground truth about the probe, for `info` (the simulator knows it; a real instrument's
/// corrector reports its setting, not the residual aberrations): the defaults mean "unknown".
pub trait ProbeTruth {
    /// The true coherent aberrations in force.
    fn true_aberrations(&self) -> Option<Aberrations> {
        None
    }
    /// The true convergence semi-angle α, rad.
    fn true_convergence_angle(&self) -> Option<f64> {
        None
    }
}

impl ProbeTruth for LatticeSimulator {
    fn true_aberrations(&self) -> Option<Aberrations> {
        Some(self.aberrations())
    }
    fn true_convergence_angle(&self) -> Option<f64> {
        Some(self.config().optics.convergence_angle.get())
    }
}

impl ProbeTruth for StemSimulator {
    fn true_aberrations(&self) -> Option<Aberrations> {
        Some(self.aberrations())
    }
    fn true_convergence_angle(&self) -> Option<f64> {
        Some(self.config().optics.convergence_angle.get())
    }
}

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
    /// Which simulator runs the instrument: `"fast"` ([`LatticeSimulator`]: a perfect,
    /// unbounded crystal; constant drift at most) or `"full"` ([`StemSimulator`]). Default
    /// `"fast"`.
    pub fidelity: Fidelity,
    /// The simulated instrument. Default: 60 kV, 30 mrad, monolayer MoS₂ at a random rotation, the
    /// level's ranges (module docs).
    pub instrument: StemConfig,
    /// Frame side, pixels. Default 64.
    pub pixels: usize,
    /// Pixel size, m. Default 0.25 Å.
    pub pixel_size: f64,
    /// Nominal dwell time per pixel (reference and verification frames; the heuristic's), s.
    /// Default 2 µs.
    pub dwell_time: f64,
    /// Shortest and longest dwell per pixel the agent may choose for a step's frame, s.
    /// Default 0.5 and 8 µs.
    pub dwell_range: [f64; 2],
    /// Steps per episode. Default 40.
    pub max_steps: usize,
    /// Largest change of each coefficient per step, m. Default 2 nm.
    pub max_step: f64,
    /// Initial defocus drawn uniformly in `±c10_range`, m. Default (medium) 6 nm.
    pub c10_range: f64,
    /// Initial astigmatism magnitude drawn uniformly in `[0, c12_range]` (random azimuth), m.
    /// Default (medium) 4 nm.
    pub c12_range: f64,
    /// Reward cost per e⁻/Å² of frame dose. Default 2.5e-7 (0.005 for a 64² frame of 0.25 Å
    /// pixels at 2 µs and 100 pA: 2·10⁴ e⁻/Å²).
    pub dose_weight: f64,
    /// Reward per unit of `ln(S_v / S_0)` at `done`. Default 3 (focusing from the medium
    /// level's typical start, `ln(S_v / S_0) ≈ 1`, then pays about 3).
    pub quality_weight: f64,
    /// Floor of the sharpness in the logarithm (dimensionless). Default 1e-3.
    pub sharpness_floor: f64,
    /// Upper bound of the normalized image (frame over its mean). Default 12.
    pub obs_max: f64,
    /// The heuristic declares done when its search step falls below this, m. Default 0.3 nm.
    pub heuristic_min_step: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self::at_level(Difficulty::Medium)
    }
}

impl TaskConfig for Config {
    fn at_level(d: Difficulty) -> Self {
        let mut instrument = StemConfig::default().without_scan_distortions();
        let s = &mut instrument.specimen;
        s.crystal = Crystal::Mos2;
        s.rotation = Param::uniform(0.0, std::f64::consts::FRAC_PI_3);
        instrument.scan.pixels = [64, 64];
        instrument.scan.pixel_size = Param::fixed(0.25e-10);
        instrument.damage.sputtering = false;
        instrument.beam.current = d.pick(
            Param::fixed(100e-12),
            Param::uniform(60e-12, 150e-12),
            Param::uniform(30e-12, 200e-12),
        );
        let det = &mut instrument.detector;
        det.haadf_exponent = d.pick(
            Param::fixed(1.7),
            Param::uniform(1.55, 1.85),
            Param::uniform(1.4, 2.0),
        );
        det.gain = d.pick(
            Param::fixed(1.0),
            Param::uniform(0.8, 1.25),
            Param::uniform(0.5, 2.0),
        );
        det.offset = d.pick(
            Param::fixed(0.0),
            Param::uniform(0.0, 2.0),
            Param::uniform(0.0, 10.0),
        );
        // Read noise is negligible beside the shot noise of a typical HAADF detector (and costs
        // a normal draw per pixel): only the hard level has it.
        det.read_noise = d.pick(
            Param::fixed(0.0),
            Param::fixed(0.0),
            Param::uniform(0.0, 3.0),
        );
        let o = &mut instrument.optics;
        o.source_size = d.pick(
            Param::fixed(0.35e-10),
            Param::uniform(0.3e-10, 0.45e-10),
            Param::uniform(0.25e-10, 0.6e-10),
        );
        o.c30 = d.pick(
            Param::fixed(123e-9),
            Param::fixed(123e-9),
            Param::uniform(50e-9, 1e-6),
        );
        let per_min = 1e-9 / 60.0;
        instrument.drift.speed = d.pick(
            Param::fixed(0.0),
            Param::uniform(0.0, 0.5 * per_min),
            Param::uniform(0.0, 2.0 * per_min),
        );
        instrument.drift.direction = Param::uniform(0.0, 2.0 * PI);
        Self {
            difficulty: d,
            split: Split::Train,
            fidelity: Fidelity::Fast,
            instrument,
            pixels: 64,
            pixel_size: 0.25e-10,
            dwell_time: 2e-6,
            dwell_range: [0.5e-6, 8e-6],
            max_steps: 40,
            max_step: 2e-9,
            c10_range: d.pick(4e-9, 6e-9, 10e-9),
            c12_range: d.pick(2e-9, 4e-9, 6e-9),
            dose_weight: 2.5e-7,
            quality_weight: 3.0,
            sharpness_floor: 1e-3,
            obs_max: 12.0,
            heuristic_min_step: 0.3e-9,
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
        let [a, b] = self.dwell_range;
        if !(a > 0.0 && a <= b && b <= 1e-3) {
            return bad(
                "dwell_range",
                format!("must be increasing within (0, 1 ms], got {:?} s", [a, b]),
            );
        }
        if self.max_steps == 0 {
            return bad("max_steps", "must be at least 1".into());
        }
        for (f, v) in [
            ("max_step", self.max_step),
            ("c10_range", self.c10_range),
            ("c12_range", self.c12_range),
            ("heuristic_min_step", self.heuristic_min_step),
        ] {
            if !(v.is_finite() && (0.0..=1e-6).contains(&v)) {
                return bad(f, format!("must be in [0, 1 µm], got {v} m"));
            }
        }
        if self.max_step <= 0.0 {
            return bad("max_step", "must be > 0".into());
        }
        if !(self.sharpness_floor > 0.0 && self.sharpness_floor.is_finite()) {
            return bad(
                "sharpness_floor",
                format!("must be finite and > 0, got {}", self.sharpness_floor),
            );
        }
        if !(self.obs_max > 1.0 && self.obs_max <= 1e4) {
            return bad(
                "obs_max",
                format!("must be in (1, 1e4], got {}", self.obs_max),
            );
        }
        check_nonnegative(&[
            ("dose_weight", self.dose_weight),
            ("quality_weight", self.quality_weight),
        ])?;
        Ok(())
    }

    /// The dwell (s) of the normalized action component `a ∈ [-1, 1]`.
    fn dwell_of(&self, a: f64) -> f64 {
        let [lo, hi] = self.dwell_range;
        lo * (hi / lo).powf(0.5 * (a.clamp(-1.0, 1.0) + 1.0))
    }

    /// The normalized action component of the dwell `t` (s).
    fn action_of_dwell(&self, t: f64) -> f64 {
        let [lo, hi] = self.dwell_range;
        if hi > lo {
            (2.0 * (t / lo).ln() / (hi / lo).ln() - 1.0).clamp(-1.0, 1.0)
        } else {
            0.0
        }
    }
}

/// Largest |χ| (rad) of `ab` over the aperture `θ ≤ alpha` at wavelength `lambda`. With only
/// defocus and two-fold astigmatism, `χ = (π θ²/λ)(C10 + C12 cos 2(φ − φ12))` peaks at the
/// aperture edge: exactly `(π α²/λ)(|C10| + |C12|)`; otherwise the largest value on a polar grid
/// of 24 radii × 48 azimuths.
pub fn residual_chi(ab: &Aberrations, lambda: f64, alpha: f64) -> f64 {
    if ab.c21 == 0.0 && ab.c23 == 0.0 && ab.c30 == 0.0 && ab.c50 == 0.0 {
        return PI * alpha * alpha / lambda * (ab.c10.abs() + ab.c12.abs());
    }
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

/// Largest number of defocus steps on either side of the start that the heuristic sweeps.
const MAX_SWEEP: usize = 16;

/// What the heuristic is doing.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Through-focus series: C10 in whole steps down to `-half`, then up to `+half`
    /// (direction −1 or +1).
    Sweep(i32),
    /// Moving to `target` (observations ignored on the way).
    Travel,
    /// Coordinate search around the best setting.
    Search,
    /// Back at the best setting: declare done.
    Finishing,
}

/// The heuristic's state (settings relative to the episode start, in units of `max_step`).
#[derive(Debug, Clone, Copy)]
struct Search {
    phase: Phase,
    now: [f64; 3],
    target: [f64; 3],
    /// Defocus steps on either side of the start in the sweep.
    half: i32,
    /// Per sweep position: the sum of the sharpness measured there and the count.
    bins: [(f64, u32); 2 * MAX_SWEEP + 1],
    best: Option<(f64, [f64; 3])>,
    coord: usize,
    dir: f64,
    step: f64,
    flips: u32,
    calls: usize,
}

impl Search {
    /// A fresh search sweeping `half` steps either side of the start.
    fn new(half: usize) -> Self {
        let half = half.min(MAX_SWEEP) as i32;
        Self {
            phase: if half > 0 {
                Phase::Sweep(-1)
            } else {
                Phase::Search
            },
            now: [0.0; 3],
            target: [0.0; 3],
            half,
            bins: [(0.0, 0); 2 * MAX_SWEEP + 1],
            best: None,
            coord: 0,
            dir: 1.0,
            step: if half > 0 { 0.5 } else { 1.0 },
            flips: 0,
            calls: 0,
        }
    }

    /// The move (each coefficient's change within ±1) from `now` toward `next`, applied.
    fn move_to(&mut self, next: [f64; 3], dwell: f32) -> Value {
        let mut act = [0.0f32, 0.0, 0.0, -1.0, dwell];
        for k in 0..3 {
            let d = (next[k] - self.now[k]).clamp(-1.0, 1.0);
            act[k] = d as f32;
            self.now[k] += d;
        }
        Value::Box(act.to_vec())
    }
}

/// The heuristic's through-focus half-range in steps: the initial defocus range over the
/// largest step, rounded up.
fn sweep_steps(cfg: &Config) -> usize {
    (cfg.c10_range / cfg.max_step).ceil() as usize
}

/// The task over any STEM instrument `I`.
#[derive(Debug)]
pub struct StemAutofocus<I> {
    cfg: Config,
    inst: I,
    last: Vec<f32>,
    /// The reference frame's sharpness `S_0`.
    reference: f64,
    search: Search,
    scan: ScanSettings,
}

impl StemAutofocus<LatticeSimulator> {
    /// The task on the lattice model (`fidelity = "fast"`), from an optional TOML config
    /// (whatever its `fidelity` says; [`make_env`] picks the simulator by it).
    pub fn from_config(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Config = config_from_toml(config)?;
        cfg.validate()?;
        let inst = simulator(&cfg, 0).map_err(|e| EnvError::config("instrument", e.to_string()))?;
        Ok(Self::new(cfg, inst))
    }
}

/// Expected counts per pixel from which the fast model draws shot noise from the rounded
/// Cornish-Fisher approximation of the Poisson distribution (see
/// [`LatticeSimulator::set_shot_noise_approx_from`]): the lowest the approximation allows.
pub const FAST_SHOT_NOISE_APPROX_FROM: f64 = 10.0;

/// The fast model of `cfg`'s instrument, seeded with `seed`, as the task runs it: the lattice
/// simulator with approximate shot noise. Whoever serves the task on the simulator (the MCP
/// server, deployments, the Python instrument) builds it here.
pub fn simulator(cfg: &Config, seed: u64) -> scopegym_physics::Result<LatticeSimulator> {
    let mut sim = LatticeSimulator::new(cfg.instrument.clone(), seed)?;
    sim.set_shot_noise_approx_from(FAST_SHOT_NOISE_APPROX_FROM);
    Ok(sim)
}

/// The registered environment: the task on the simulator its `fidelity` names.
pub fn make_env(id: &'static str, config: Option<&toml::Value>) -> Result<Box<dyn Env>> {
    let cfg: Config = config_from_toml(config)?;
    cfg.validate()?;
    let inst = |e: scopegym_physics::PhysicsError| EnvError::config("instrument", e.to_string());
    Ok(match cfg.fidelity {
        Fidelity::Fast => {
            let sim = simulator(&cfg, 0).map_err(inst)?;
            Box::new(TaskEnv::new(id, StemAutofocus::new(cfg, sim)))
        }
        Fidelity::Full => {
            let sim = StemSimulator::new(cfg.instrument.clone(), 0).map_err(inst)?;
            Box::new(TaskEnv::new(id, StemAutofocus::new(cfg, sim)))
        }
    })
}

impl<I: StemInstrument + ProbeTruth + NewEpisode + Send> StemAutofocus<I> {
    /// The task on `inst` with `cfg`.
    pub fn new(cfg: Config, mut inst: I) -> Self {
        inst.set_region(cfg.split.region());
        let scan = ScanSettings {
            rows: cfg.pixels,
            cols: cfg.pixels,
            pixel_size: cfg.pixel_size,
            dwell_time: cfg.dwell_time,
            flyback_time: 0.0,
            center: [0.0, 0.0],
        };
        Self {
            last: vec![0.0; cfg.pixels * cfg.pixels],
            search: Search::new(0),
            cfg,
            inst,
            reference: 1.0,
            scan,
        }
    }

    /// Acquires a frame with `dwell` s per pixel; stores the normalized image and returns
    /// (sharpness, dose in e⁻/Å²).
    fn acquire(&mut self, dwell: f64) -> Result<(f64, f64)> {
        if self.scan.dwell_time != dwell {
            self.scan.dwell_time = dwell;
            self.scan = self.inst.configure_scan(&self.scan)?;
        }
        let obs_max = self.cfg.obs_max as f32;
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
                x.clamp(0.0, obs_max)
            } else {
                0.0
            }
        }));
        // The sharpness of the normalized image equals the raw frame's (up to the clipping).
        let s = normalized_variance(&self.last);
        Ok((s.max(self.cfg.sharpness_floor), dose))
    }

    /// Writes the true aberrations to `info`; returns the residual χ (rad), NaN when unknown.
    fn truth(&self, info: &mut Info) -> f64 {
        let (Some(ab), Some(alpha)) = (
            self.inst.true_aberrations(),
            self.inst.true_convergence_angle(),
        ) else {
            return f64::NAN;
        };
        let lambda = electron_wavelength(self.inst.beam_energy());
        let chi = residual_chi(&ab, lambda, alpha);
        let (a, b) = ab.c12_cartesian();
        info.insert("residual_chi".into(), InfoValue::F64(chi));
        info.insert("c10".into(), InfoValue::F64(ab.c10));
        info.insert("c12a".into(), InfoValue::F64(a));
        info.insert("c12b".into(), InfoValue::F64(b));
        info.insert("focused".into(), InfoValue::Bool(chi < PI / 4.0));
        chi
    }
}

impl<I: StemInstrument + ProbeTruth + NewEpisode + Send> Task for StemAutofocus<I> {
    fn observation_space(&self) -> Space {
        Space::uniform_box(
            &[self.cfg.pixels, self.cfg.pixels],
            0.0,
            self.cfg.obs_max as f32,
        )
    }

    fn action_space(&self) -> Space {
        Space::uniform_box(&[5], -1.0, 1.0)
    }

    fn max_episode_steps(&self) -> usize {
        self.cfg.max_steps
    }

    fn reset(&mut self, seed: u64, info: &mut Info) -> Result<Value> {
        self.inst.new_episode(seed, info)?;
        self.inst.set_blanked(false)?;
        self.search = Search::new(sweep_steps(&self.cfg));
        let c = &self.cfg;
        self.scan = ScanSettings {
            rows: c.pixels,
            cols: c.pixels,
            pixel_size: c.pixel_size,
            dwell_time: c.dwell_time,
            flyback_time: 0.0,
            center: [0.0, 0.0],
        };
        self.scan = self.inst.configure_scan(&self.scan)?;
        let mut rng = seeded(derive_seed(seed, "aberrations"));
        let split = c.split;
        let mut ab = self.inst.aberrations();
        ab.c10 = split.uniform(&mut rng, -c.c10_range, c.c10_range);
        ab.c12 = split.uniform(&mut rng, 0.0, c.c12_range);
        ab.phi12 = split.uniform(&mut rng, 0.0, PI);
        self.inst.set_aberrations(&ab)?;
        let (sharp, dose) = self.acquire(self.cfg.dwell_time)?;
        self.reference = sharp;
        self.truth(info);
        info.insert("sharpness".into(), InfoValue::F64(sharp));
        info.insert("dose".into(), InfoValue::F64(dose));
        Ok(Value::Box(self.last.clone()))
    }

    fn step(&mut self, action: &Value, info: &mut Info) -> Result<TaskStep> {
        let a = action
            .as_box()
            .ok_or_else(|| EnvError::action("action", "expected a Box value"))?;
        let ax = |k: usize| f64::from(a.get(k).copied().unwrap_or(0.0)).clamp(-1.0, 1.0);
        let done = ax(3) > 0.0;
        let dwell = if done {
            self.cfg.dwell_time
        } else {
            let d = |k: usize| ax(k) * self.cfg.max_step;
            let mut ab = self.inst.aberrations();
            ab.c10 += d(0);
            let (ca, cb) = ab.c12_cartesian();
            ab.set_c12_cartesian(ca + d(1), cb + d(2));
            self.inst.set_aberrations(&ab)?;
            self.cfg.dwell_of(ax(4))
        };
        let (sharp, dose) = self.acquire(dwell)?;
        let mut reward = -self.cfg.dose_weight * dose;
        if done {
            reward += self.cfg.quality_weight * (sharp / self.reference).ln();
        }
        let chi = self.truth(info);
        let success = done && chi < PI / 4.0;
        info.insert("sharpness".into(), InfoValue::F64(sharp));
        info.insert("reference_sharpness".into(), InfoValue::F64(self.reference));
        info.insert("dose".into(), InfoValue::F64(dose));
        info.insert("dwell".into(), InfoValue::F64(dwell));
        info.insert("done".into(), InfoValue::Bool(done));
        info.insert("success".into(), InfoValue::Bool(success));
        Ok(TaskStep {
            obs: Value::Box(self.last.clone()),
            reward,
            terminated: done,
            success,
        })
    }

    fn render(&self) -> RgbImage {
        RgbImage::from_grey(&self.last, self.cfg.pixels, self.cfg.pixels)
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        let s_now = obs.as_box().map_or(0.0, normalized_variance);
        let dwell = self.cfg.action_of_dwell(self.cfg.dwell_time) as f32;
        let min_step = self.cfg.heuristic_min_step / self.cfg.max_step;
        let left = self.cfg.max_steps.saturating_sub(self.search.calls);
        let s = &mut self.search;
        s.calls += 1;
        let done = Value::Box(vec![0.0, 0.0, 0.0, 1.0, dwell]);
        if let Phase::Sweep(dir) = s.phase {
            // A through-focus series: each position's sharpness (averaged where measured
            // twice), then to the best position.
            let k = s.now[0].round() as i32;
            let bin = &mut s.bins[(k + s.half) as usize];
            bin.0 += s_now;
            bin.1 += 1;
            let next = match dir {
                -1 if k > -s.half => Some(k - 1),
                -1 => {
                    s.phase = Phase::Sweep(1);
                    Some(k + 1)
                }
                _ if k < s.half => Some(k + 1),
                _ => None,
            };
            match next {
                Some(k) if left > 2 * s.half as usize + 4 => {
                    return s.move_to([f64::from(k), 0.0, 0.0], dwell);
                }
                _ => {
                    let mean = |b: &(f64, u32)| {
                        if b.1 > 0 {
                            b.0 / f64::from(b.1)
                        } else {
                            f64::NEG_INFINITY
                        }
                    };
                    let best = (0..s.bins.len())
                        .max_by(|&a, &b| mean(&s.bins[a]).total_cmp(&mean(&s.bins[b])))
                        .unwrap_or(0) as i32
                        - s.half;
                    s.target = [f64::from(best), 0.0, 0.0];
                    s.phase = Phase::Travel;
                }
            }
        }
        if s.phase == Phase::Travel {
            if s.now != s.target {
                let t = s.target;
                return s.move_to(t, dwell);
            }
            s.phase = Phase::Search;
        }
        if s.phase == Phase::Finishing {
            return done;
        }
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
        let best = s.best.map_or(s.now, |b| b.1);
        let mut next = best;
        if s.step < min_step || left <= 2 {
            // Finish: back to the best setting, then declare done.
            if best == s.now {
                return done;
            }
            s.phase = Phase::Finishing;
        } else {
            next[s.coord] += s.dir * s.step;
        }
        s.move_to(next, dwell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Env, TaskEnv};
    use crate::evaluate::{
        Policy, assert_heuristic_beats_random, assert_no_degenerate_wins, degenerate_scores,
        evaluate,
    };

    fn env(extra: &str) -> TaskEnv<StemAutofocus<LatticeSimulator>> {
        let c: toml::Value = toml::from_str(extra).unwrap();
        TaskEnv::new("t", StemAutofocus::from_config(Some(&c)).unwrap())
    }

    #[test]
    fn heuristic_focuses() {
        let mut env = env("");
        let successes = crate::tasks::testing::heuristic_successes(&mut env, 0..10);
        println!("heuristic: {successes}/10 successes");
        assert!(successes >= 7, "{successes}");
    }

    /// Power of `img` (`n × n`, mean removed) in `bands` radial bands of spatial frequency up
    /// to Nyquist, each normalized by the total: a separable DFT (the test's own).
    fn radial_spectrum(img: &[f32], n: usize, bands: usize) -> Vec<f64> {
        let mean = img.iter().map(|&x| f64::from(x)).sum::<f64>() / img.len() as f64;
        let tw: Vec<(f64, f64)> = (0..n)
            .map(|k| {
                let a = -2.0 * PI * k as f64 / n as f64;
                (a.cos(), a.sin())
            })
            .collect();
        // Rows, then columns.
        let mut rows = vec![(0.0, 0.0); n * n];
        for r in 0..n {
            for k in 0..n {
                let (mut re, mut im) = (0.0, 0.0);
                for c in 0..n {
                    let x = f64::from(img[r * n + c]) - mean;
                    let (cr, ci) = tw[(k * c) % n];
                    re += x * cr;
                    im += x * ci;
                }
                rows[r * n + k] = (re, im);
            }
        }
        let mut power = vec![0.0; bands];
        for kx in 0..n {
            for ky in 0..n {
                let (mut re, mut im) = (0.0, 0.0);
                for r in 0..n {
                    let (xr, xi) = rows[r * n + kx];
                    let (cr, ci) = tw[(ky * r) % n];
                    re += xr * cr - xi * ci;
                    im += xr * ci + xi * cr;
                }
                let fx = kx.min(n - kx) as f64;
                let fy = ky.min(n - ky) as f64;
                let f = (fx * fx + fy * fy).sqrt() / (n as f64 / 2.0);
                if f > 0.0 && f < 1.0 {
                    power[((f * bands as f64) as usize).min(bands - 1)] += re * re + im * im;
                }
            }
        }
        let total: f64 = power.iter().sum();
        power.iter().map(|p| p / total).collect()
    }

    #[test]
    fn fast_and_full_observe_the_same_statistics() {
        // What the task observes, per seed: the frame's sharpness S = var/mean² and the
        // fraction of its power in four radial frequency bands.
        let fidelity = |f: &str| {
            let c: toml::Value = toml::from_str(&format!("fidelity = \"{f}\"")).unwrap();
            make_env("t", Some(&c)).unwrap()
        };
        let (mut fast, mut full) = (fidelity("fast"), fidelity("full"));
        for seed in 0..6 {
            let (of, inf) = fast.reset(Some(seed)).unwrap();
            let (ou, inu) = full.reset(Some(seed)).unwrap();
            let (Value::Box(a), Value::Box(b)) = (&of, &ou) else {
                panic!("box observations")
            };
            let sf = crate::tasks::testing::info_f64(&inf, "sharpness");
            let su = crate::tasks::testing::info_f64(&inu, "sharpness");
            let pf = radial_spectrum(a, 64, 4);
            let pu = radial_spectrum(b, 64, 4);
            println!("seed {seed}: S fast {sf:.4} full {su:.4}; bands fast {pf:.3?} full {pu:.3?}");
            // Same scenario (the two simulators draw the same parameters from the seed), so the
            // same frame up to shot noise and the full model's bilinear splat, which spreads
            // each column over up to 2 × 2 pixels and lowers the contrast by a few per cent
            // (measured: S 4-8 % lower, band fractions within 0.02).
            assert!(
                (su / sf - 1.0).abs() < 0.12,
                "seed {seed}: sharpness {sf} vs {su}"
            );
            for (k, (x, y)) in pf.iter().zip(&pu).enumerate() {
                assert!((x - y).abs() < 0.035, "seed {seed}: band {k}: {x} vs {y}");
            }
            let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
            assert!((mean(a) - mean(b)).abs() < 0.01, "normalized means");
        }
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
        for _ in 0..40 {
            let a = env.heuristic_action(&obs);
            let s = env.step(&a).unwrap();
            obs = s.obs;
            chi = crate::tasks::testing::info_f64(&s.info, "residual_chi");
            if s.terminated || s.truncated {
                break;
            }
        }
        assert!(chi < 0.5 * chi0, "residual χ {chi0} → {chi}");
    }

    #[test]
    fn residual_chi_closed_form_equals_the_grid_maximum() {
        // Defocus and astigmatism only: the closed form against the polar grid (which samples
        // the edge at φ12 and φ12 + π/2 for these azimuths), and with a little coma the grid.
        let lambda = electron_wavelength(60e3);
        for (c10, c12, phi) in [
            (2e-9, 1e-9, 0.0),
            (-3e-9, 2e-9, PI / 4.0),
            (1e-9, 3e-9, PI / 2.0),
        ] {
            let ab = Aberrations {
                c10,
                c12,
                phi12: phi,
                ..Default::default()
            };
            let closed = residual_chi(&ab, lambda, 30e-3);
            let with_coma = residual_chi(&Aberrations { c21: 1e-13, ..ab }, lambda, 30e-3);
            assert!(
                (closed - with_coma).abs() < 1e-5 * closed,
                "{closed} vs {with_coma}"
            );
        }
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
        crate::tasks::testing::assert_config_errors_name_fields(
            StemAutofocus::from_config,
            &[
                ("pixels = 2", "pixels"),
                ("dwell_range = [4e-6, 1e-6]", "dwell_range"),
                ("obs_max = 0.5", "obs_max"),
                ("sharpness_floor = 0.0", "sharpness_floor"),
                ("quality_weight = -1.0", "quality_weight"),
            ],
        );
    }

    #[test]
    fn degenerate_policies_do_not_come_close_to_the_heuristic() {
        // 20 seeds at medium on the train split: random, zero (no change, never done), the low
        // corner (never done, shortest dwell), the high corner (done at once: giving up), the
        // centre and a constant random action, against the heuristic. Margins: 1.0 in mean
        // return, 0.5 in success rate.
        let mut env = env("");
        let (h, others) = degenerate_scores(&mut env, 0..20, 0).unwrap();
        assert_no_degenerate_wins("StemAutofocus-v2", &h, &others, 1.0, 0.5);
        assert!(
            h.success_rate >= 0.8,
            "heuristic success {}",
            h.success_rate
        );
        // Giving up (done at the first step, whatever else the action says) never pays.
        let give_up = Value::Box(vec![0.3, -0.2, 0.1, 1.0, 0.0]);
        let g = evaluate(&mut env, &Policy::Constant(give_up), 0..20).unwrap();
        println!(
            "give up: return {:.3} ± {:.3}, success {:.2}",
            g.mean_return, g.return_ci95, g.success_rate
        );
        assert!(g.mean_return < 0.1 && g.mean_return < h.mean_return - 1.0);
        assert!(g.success_rate < h.success_rate - 0.5);
    }

    #[test]
    fn heuristic_beats_random_on_the_test_split() {
        // Held-out parameters (split = "test"), medium, 20 seeds: the heuristic's success rate
        // exceeds random's by at least 0.6 and its mean return by at least 1.0.
        let mut e = env("split = \"test\"");
        assert_heuristic_beats_random("StemAutofocus-v2", &mut e, 0..20, 1.0, 0.6);
    }

    #[test]
    fn every_level_is_focused_by_the_heuristic_and_the_bound_is_tight() {
        // 20 episodes per level; the observation bound clips few pixels of the declared frame
        // (and the largest value is a sizeable fraction of the bound).
        for (level, min) in [("easy", 18), ("medium", 16), ("hard", 12)] {
            let mut e = env(&format!("difficulty = \"{level}\""));
            let (mut n, mut clipped, mut pixels, mut top) = (0, 0usize, 0usize, 0.0f32);
            for seed in 0..20 {
                let (mut obs, _) = e.reset(Some(seed)).unwrap();
                loop {
                    let a = e.heuristic_action(&obs);
                    let s = e.step(&a).unwrap();
                    obs = s.obs;
                    if s.terminated || s.truncated {
                        n += usize::from(s.info.get("is_success") == Some(&InfoValue::Bool(true)));
                        let o = obs.as_box().unwrap();
                        clipped += o.iter().filter(|&&v| v >= 12.0).count();
                        pixels += o.len();
                        top = o.iter().fold(top, |m, &v| m.max(v));
                        break;
                    }
                }
            }
            let frac = clipped as f64 / pixels as f64;
            println!("{level}: heuristic {n}/20, clipped {frac:.5}, largest {top:.2}");
            assert!(n >= min, "{level}: {n}/20");
            assert!(
                frac < 1e-3 && top > 4.0,
                "{level}: clipped {frac}, largest {top}"
            );
        }
    }

    #[test]
    fn observations_and_rewards_use_no_ground_truth() {
        // The same episodes on the simulator and on the simulator seen through the instrument
        // trait alone: bit-identical observations, rewards and terminations (only `info`
        // differs: no truth, so never `is_success`).
        let cfg = Config {
            max_steps: 12,
            ..Config::default()
        };
        let sim = || LatticeSimulator::new(cfg.instrument.clone(), 0).unwrap();
        let mut a = TaskEnv::new("a", StemAutofocus::new(cfg.clone(), sim()));
        let mut b = TaskEnv::new(
            "b",
            StemAutofocus::new(cfg.clone(), crate::audit::Blind::new(sim())),
        );
        let mut rng = scopegym_physics::rng::seeded(7);
        let mut steps = 0;
        for seed in 0..4 {
            let (mut oa, _) = a.reset(Some(seed)).unwrap();
            let (ob, _) = b.reset(Some(seed)).unwrap();
            assert_eq!(oa, ob);
            loop {
                let act = if seed % 2 == 0 {
                    let h = a.heuristic_action(&oa);
                    assert_eq!(h, b.heuristic_action(&oa));
                    h
                } else {
                    let mut v = a.action_space().sample(&mut rng);
                    if let Value::Box(x) = &mut v {
                        x[3] = -x[3].abs(); // keep going: exercise the dwell choice
                    }
                    v
                };
                let (sa, sb) = (a.step(&act).unwrap(), b.step(&act).unwrap());
                assert_eq!(sa.obs, sb.obs);
                assert_eq!(sa.reward.to_bits(), sb.reward.to_bits());
                assert_eq!((sa.terminated, sa.truncated), (sb.terminated, sb.truncated));
                assert_eq!(sb.info.get("is_success"), Some(&InfoValue::Bool(false)));
                steps += 1;
                oa = sa.obs;
                if sa.terminated || sa.truncated {
                    break;
                }
            }
        }
        assert!(steps >= 30, "{steps}");
    }
}
