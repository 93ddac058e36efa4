//! `scopegym/PfmDomainWriting-v1`: write a target domain pattern into a ferroelectric film with
//! tip bias pulses, checking the result in the PFM phase image (anchor: AEcroscopy writing).
//!
//! The film starts polarized down (phase 180°). Each step applies one bias pulse at the chosen
//! position, then scans a `pixels²` PFM frame over the field. A positive pulse writes an up
//! domain (phase 0°), a negative one erases. Every episode draws a new film and tip (the
//! level's table below): film disorder (random field, its correlation, pinning sites), imprint
//! (the built-in bias that shifts switching), the tip's field (width and coupling per volt)
//! and the imaging noise; so the bias and duration that write a domain of a given size change
//! from episode to episode and must be found from the images.
//!
//! - **Observation** (Dict): `phase`, the PFM phase frame as a uint8 image `(pixels, pixels)`
//!   mapped by `255·(1 + cos φ)/2` (up domains bright), and `target`, the pattern to write,
//!   a binary uint8 image of the same shape (1 = write up). Targets: a square (side 30-50 % of
//!   the field), a line (50-70 % long, 24 % wide, any angle) or a ring (outer radius 30-38 %,
//!   22 % wide), placed near the centre; features at least about two written domains wide.
//! - **Action** (Box, 4, each in `[-1, 1]`): `[x, y, bias, duration]`: the tip position
//!   normalized to the field (x along the fast axis, y along the rows), the pulse amplitude
//!   mapped linearly onto `bias_range` (V; default ±15 V, beyond the breakdown limit, so an
//!   agent must learn to stay below it; 0 V at the action 0 for a symmetric range) and the pulse duration mapped
//!   linearly onto `log_duration_range` (log10 s).
//! - **Reward**: `iou_scale · (IoU_t - IoU_{t-1})`, with IoU between the observed written mask
//!   (phase pixels brighter than 127) and the target; so the return is the IoU gained (the
//!   difference of one measured quantity: no best-so-far, nothing for noise to farm). A pulse
//!   with `|bias| > breakdown` is not applied: it ends the episode with `-breakdown_penalty`
//!   (dielectric breakdown would destroy the film). `success_bonus` when the episode ends by
//!   reaching `done_iou`.
//! - **Termination** (measured): the observed IoU reaches `done_iou` (default 0.75, a margin
//!   over `success_iou` for the blur and noise of the phase image), or breakdown. Truncation
//!   at `max_steps`.
//! - **Success** (`info["is_success"]`, from the truth where the simulator knows it): the true
//!   IoU, from the film's polarization at the frame's pixels, at least `success_iou` (default
//!   0.7). A breakdown never succeeds.
//! - **Info** (never in the observation): `iou` (observed), `true_iou`, `breakdown`, `success`
//!   (the observed criterion), `target_shape` and the randomized scenario values (`param.*`).
//! - **Heuristic** (from the observation): each step, the pulse that fixes the most pixels of
//!   a disc of `heuristic_radius` pixels: writing where the target is still down, or erasing
//!   where the film is up outside the target (only when that fixes `4` pixels more than any
//!   write, and never again once an erase has lowered the observed IoU); each pixel of the disc
//!   counts +1 when it would become right and −1 when it would become wrong. The bias starts
//!   at `heuristic_bias` (erasing at half of it) and follows what the last pulse did: ×1.15
//!   when it flipped under half of the disc's flippable pixels (writes only), ×0.85 when it
//!   flipped over 1.3 times as many (an oversized domain), always below the breakdown. Duration
//!   `heuristic_log_duration`.
//!
//! # Fidelity
//!
//! `fidelity = "full"` (the default) runs [`SpmSimulator`] as documented; `fidelity = "fast"`
//! runs its cheaper stages ([`SpmFidelity::Fast`](scopegym_physics::spm::sim::SpmFidelity::Fast)):
//! the same film, but a bias pulse runs the light switching model
//! ([`FerroFilm::switch_pulse`](scopegym_physics::spm::ferro::FerroFilm::switch_pulse) with
//! [`FAST_SWITCHING`](scopegym_physics::spm::sim::FAST_SWITCHING): nucleation where the tip
//! field beats the coercive threshold, walls moving at the closed-form TDGL front speed over
//! the cells where the field reaches 0.1 (reduced), one area-conserving smoothing step for the
//! walls' line tension, then the zero-field TDGL relaxation) with a 2.5× longer time step;
//! frames without
//! the topography channels, so without the z feedback and tip dilation (`pfm.topography` off:
//! the same PFM phase and amplitude model at the same drifted positions, the only channels
//! the task reads). Same spaces, reward and info. The test
//! `fast_and_full_observe_the_same_statistics` compares the written domain's area (mean and
//! spread over seeds) for four pulses, and the heuristic's rewards, observed IoU and phase
//! images (means, variances and power spectra) under both.
//!
//! Domain-randomization ranges per level (`difficulty`; the split draws disjoint bands of
//! each, [`crate::level`], and of the targets' placement and size):
//!
//! | parameter | easy | medium | hard |
//! |---|---|---|---|
//! | imprint (`pfm.bias_offset`), V | ±0.5 | ±1 | ±2 |
//! | tip field width, nm | 40-60 | 35-70 | 25-90 |
//! | field per volt at the apex (reduced, 1/V) | 0.23-0.27 | 0.2-0.3 | 0.17-0.33 |
//! | random field (r.m.s., reduced) | 0.05-0.1 | 0.05-0.2 | 0.1-0.3 |
//! | random-field correlation, cells | 0-1 | 0-2 | 0-4 |
//! | pinning-site fraction | 0.02-0.05 | 0.02-0.1 | 0.05-0.2 |
//! | phase noise, ° | 2-6 | 2-12 | 5-25 |
//! | amplitude noise | 0.02-0.04 | 0.02-0.06 | 0.03-0.15 |

use crate::env::{Info, InfoValue, RgbImage, Task, TaskStep};
use crate::error::{EnvError, Result};
use crate::level::{Difficulty, Split};
use crate::space::{Dtype, Space, Value};
use crate::tasks::{
    Fidelity, NewEpisode, TaskConfig, check_nonnegative, config_from_toml, pfm_simulator,
};
use rand::Rng;
use scopegym_physics::instrument::{BiasWriting, ScanSettings, SpmInstrument, SpmMode};
use scopegym_physics::param::Param;
use scopegym_physics::rng::{derive_seed, seeded};
use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
use scopegym_physics::spm::surface::SurfaceKind;
use serde::{Deserialize, Serialize};

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
    /// Which SPM model runs (`"fast"` or `"full"`, [`Fidelity`]; it sets
    /// `instrument.fidelity`). Default `"full"`: the fast model matches the statistics the task
    /// observes only within the tolerances its test `fast_and_full_observe_the_same_statistics`
    /// states.
    pub fidelity: Fidelity,
    /// The simulated instrument (PFM mode; 64² sample grid over 0.5 µm, film poled down).
    pub instrument: SpmConfig,
    /// Pixels per side of the phase frame and the target. Default 32.
    pub pixels: usize,
    /// Side of the (square) field written and imaged, m. Default 0.5 µm.
    pub field: f64,
    /// Steps per episode. Default 25.
    pub max_steps: usize,
    /// Lowest and highest pulse bias, V, onto which the action's `[-1, 1]` maps. Default
    /// ±15 V: beyond the breakdown limit, so an agent must learn to stay below it.
    pub bias_range: [f64; 2],
    /// Pulses with a larger magnitude break the film down, V. Default 12.
    pub breakdown: f64,
    /// Shortest and longest pulse, log10 s, onto which the action's `[-1, 1]` maps. Default -3
    /// and -1.5.
    pub log_duration_range: [f64; 2],
    /// Reward per unit of IoU gained. Default 10.
    pub iou_scale: f64,
    /// Reward lost on breakdown. Default 5.
    pub breakdown_penalty: f64,
    /// Success (`info["is_success"]`): the true IoU at least this. Default 0.7.
    pub success_iou: f64,
    /// The episode terminates (the pattern is taken as written) when the observed IoU reaches
    /// this: a margin over `success_iou` for the blur and noise of the phase image. Default
    /// 0.75.
    pub done_iou: f64,
    /// Reward added when the episode ends by reaching `done_iou`. Default 2.
    pub success_bonus: f64,
    /// The heuristic's starting pulse bias, V (it adapts from the images). Default 6.
    pub heuristic_bias: f64,
    /// The heuristic's pulse duration, log10 s. Default -2.5.
    pub heuristic_log_duration: f64,
    /// The heuristic's expected domain radius, pixels. Default 3.
    pub heuristic_radius: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self::at_level(Difficulty::Medium)
    }
}

impl TaskConfig for Config {
    fn at_level(difficulty: Difficulty) -> Self {
        let d = difficulty;
        let mut instrument = SpmConfig::default().without_scanner_imperfections();
        instrument.mode = SpmMode::Pfm;
        instrument.max_bias = Param::fixed(20.0);
        instrument.sample.size = Param::fixed(0.5e-6);
        instrument.sample.pixels = 64;
        instrument.sample.crash_threshold = Param::fixed(1e-6);
        instrument.scan.pixels = [32, 32];
        instrument.scan.size = Param::fixed(0.5e-6);
        instrument.scan.line_rate = Param::fixed(2.0);
        instrument.surface.kind = SurfaceKind::Flat;
        instrument.tip.wear_rate = Param::fixed(0.0);
        let pfm = &mut instrument.pfm;
        pfm.up_fraction = Param::fixed(0.0);
        let (pn_lo, pn_hi): (f64, f64) = d.pick((2.0, 6.0), (2.0, 12.0), (5.0, 25.0));
        pfm.phase_noise = Param::uniform(pn_lo.to_radians(), pn_hi.to_radians());
        pfm.amplitude_noise = d.pick(
            Param::uniform(0.02, 0.04),
            Param::uniform(0.02, 0.06),
            Param::uniform(0.03, 0.15),
        );
        // Imprint (built-in bias) and the tip's field: width and coupling.
        pfm.bias_offset = d.pick(
            Param::uniform(-0.5, 0.5),
            Param::uniform(-1.0, 1.0),
            Param::uniform(-2.0, 2.0),
        );
        pfm.tip_width = d.pick(
            Param::uniform(40e-9, 60e-9),
            Param::uniform(35e-9, 70e-9),
            Param::uniform(25e-9, 90e-9),
        );
        pfm.field_per_volt = d.pick(
            Param::uniform(0.23, 0.27),
            Param::uniform(0.2, 0.3),
            Param::uniform(0.17, 0.33),
        );
        // Film disorder: the frozen random field, its correlation and the pinning sites.
        let f = &mut instrument.ferroelectric;
        f.random_field = d.pick(
            Param::uniform(0.05, 0.1),
            Param::uniform(0.05, 0.2),
            Param::uniform(0.1, 0.3),
        );
        f.random_field_correlation = d.pick(
            Param::uniform(0.0, 1.0),
            Param::uniform(0.0, 2.0),
            Param::uniform(0.0, 4.0),
        );
        f.pinning_fraction = d.pick(
            Param::uniform(0.02, 0.05),
            Param::uniform(0.02, 0.1),
            Param::uniform(0.05, 0.2),
        );
        Self {
            difficulty,
            split: Split::Train,
            fidelity: Fidelity::Full,
            instrument,
            pixels: 32,
            field: 0.5e-6,
            max_steps: 25,
            bias_range: [-15.0, 15.0],
            breakdown: 12.0,
            log_duration_range: [-3.0, -1.5],
            iou_scale: 10.0,
            breakdown_penalty: 5.0,
            success_iou: 0.7,
            done_iou: 0.75,
            success_bonus: 2.0,
            heuristic_bias: 6.0,
            heuristic_log_duration: -2.5,
            heuristic_radius: 3.0,
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
        if self.instrument.mode != SpmMode::Pfm {
            return bad("instrument.mode", "must be \"pfm\"".into());
        }
        if !(8..=256).contains(&self.pixels) {
            return bad("pixels", format!("must be 8..=256, got {}", self.pixels));
        }
        if !(self.field > 0.0 && self.field <= self.instrument.sample.size.get()) {
            return bad(
                "field",
                format!("must be in (0, instrument.sample.size], got {}", self.field),
            );
        }
        if self.max_steps == 0 {
            return bad("max_steps", "must be at least 1".into());
        }
        let [lo, hi] = self.bias_range;
        let mb = self.instrument.max_bias.get();
        if !(lo < hi && lo >= -mb && hi <= mb) {
            return bad(
                "bias_range",
                format!(
                    "must be increasing within ±instrument.max_bias, got {:?}",
                    self.bias_range
                ),
            );
        }
        if !(self.breakdown > 0.0 && self.breakdown.is_finite()) {
            return bad(
                "breakdown",
                format!("must be positive, got {}", self.breakdown),
            );
        }
        let [a, b] = self.log_duration_range;
        if !(a.is_finite() && b.is_finite() && a < b && b <= 1.0 && a >= -6.0) {
            return bad(
                "log_duration_range",
                format!(
                    "must be increasing within [-6, 1], got {:?}",
                    self.log_duration_range
                ),
            );
        }
        for (name, v) in [
            ("success_iou", self.success_iou),
            ("done_iou", self.done_iou),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(name, format!("must be in [0, 1], got {v}"));
            }
        }
        check_nonnegative(&[
            ("iou_scale", self.iou_scale),
            ("breakdown_penalty", self.breakdown_penalty),
            ("success_bonus", self.success_bonus),
            ("heuristic_radius", self.heuristic_radius),
        ])?;
        if !(lo..=hi).contains(&self.heuristic_bias) {
            return bad(
                "heuristic_bias",
                format!("must be within bias_range, got {}", self.heuristic_bias),
            );
        }
        if !(a..=b).contains(&self.heuristic_log_duration) {
            return bad(
                "heuristic_log_duration",
                format!(
                    "must be within log_duration_range, got {}",
                    self.heuristic_log_duration
                ),
            );
        }
        Ok(())
    }
}

/// Ground truth of the film's polarization where the instrument knows it (simulators); a real
/// instrument returns `None`.
pub trait PolarizationTruth {
    /// Whether the true polarization points up at each pixel of a frame taken with `scan`
    /// (row-major), or `None` when unknown.
    fn true_up(&self, scan: &ScanSettings) -> Option<Vec<bool>>;
}

impl PolarizationTruth for SpmSimulator {
    fn true_up(&self, scan: &ScanSettings) -> Option<Vec<bool>> {
        let film = self.film()?;
        let p = film.polarization();
        let (ny, nx) = p.dim();
        let cell = self.cell_size();
        let mut out = Vec::with_capacity(scan.rows * scan.cols);
        for r in 0..scan.rows {
            for c in 0..scan.cols {
                let lab = [
                    scan.center[0] + (c as f64 - 0.5 * (scan.cols as f64 - 1.0)) * scan.pixel_size,
                    scan.center[1] + (r as f64 - 0.5 * (scan.rows as f64 - 1.0)) * scan.pixel_size,
                ];
                let s = self.lab_to_sample(lab);
                let j = (s[0] / cell + 0.5 * nx as f64)
                    .floor()
                    .clamp(0.0, (nx - 1) as f64);
                let i = (s[1] / cell + 0.5 * ny as f64)
                    .floor()
                    .clamp(0.0, (ny - 1) as f64);
                out.push(p[[i as usize, j as usize]] > 0.0);
            }
        }
        Some(out)
    }
}

/// Net pixels an erasing pulse must fix before the heuristic prefers it to writing.
const HEURISTIC_ERASE_SCORE: f64 = 4.0;

/// The target shapes.
const SHAPES: [&str; 3] = ["square", "line", "ring"];

/// A binary target pattern of `shape` (index into [`SHAPES`]) on an `n × n` grid, placed and
/// sized from `rng` within the split's bands.
fn target_pattern<R: Rng>(shape: usize, n: usize, split: Split, rng: &mut R) -> Vec<u8> {
    let nf = n as f64;
    let mut t = vec![0u8; n * n];
    let jitter = |rng: &mut R, span: f64| split.uniform(rng, -0.5, 0.5) * span;
    let (cx, cy) = (
        0.5 * (nf - 1.0) + jitter(rng, 0.2 * nf),
        0.5 * (nf - 1.0) + jitter(rng, 0.2 * nf),
    );
    match shape {
        0 => {
            let half = nf * split.uniform(rng, 0.15, 0.25);
            for i in 0..n {
                for j in 0..n {
                    if (i as f64 - cy).abs() <= half && (j as f64 - cx).abs() <= half {
                        t[i * n + j] = 1;
                    }
                }
            }
        }
        1 => {
            let angle = split.uniform(rng, 0.0, std::f64::consts::PI);
            let (dx, dy) = (angle.cos(), angle.sin());
            let half_len = nf * split.uniform(rng, 0.25, 0.35);
            let half_width = nf * 0.12;
            for i in 0..n {
                for j in 0..n {
                    let (x, y) = (j as f64 - cx, i as f64 - cy);
                    let along = x * dx + y * dy;
                    let across = -x * dy + y * dx;
                    if along.abs() <= half_len && across.abs() <= half_width {
                        t[i * n + j] = 1;
                    }
                }
            }
        }
        _ => {
            let outer = nf * split.uniform(rng, 0.3, 0.38);
            let inner = outer - nf * 0.22;
            for i in 0..n {
                for j in 0..n {
                    let r = (j as f64 - cx).hypot(i as f64 - cy);
                    if r <= outer && r >= inner {
                        t[i * n + j] = 1;
                    }
                }
            }
        }
    }
    t
}

/// `[-1, 1]` → `[lo, hi]`, linearly (clamped).
fn from_unit(a: f32, [lo, hi]: [f64; 2]) -> f64 {
    lo + 0.5 * (f64::from(a).clamp(-1.0, 1.0) + 1.0) * (hi - lo)
}

/// `[lo, hi]` → `[-1, 1]`, linearly.
fn to_unit(v: f64, [lo, hi]: [f64; 2]) -> f32 {
    (2.0 * (v - lo) / (hi - lo) - 1.0).clamp(-1.0, 1.0) as f32
}

/// Intersection over union of two masks (1 when both are empty).
fn iou(a: impl Iterator<Item = bool>, b: impl Iterator<Item = bool>) -> f64 {
    let (mut inter, mut union) = (0usize, 0usize);
    for (x, y) in a.zip(b) {
        inter += usize::from(x && y);
        union += usize::from(x || y);
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// The task over any PFM instrument `I` that writes with bias pulses.
#[derive(Debug)]
pub struct PfmDomainWriting<I> {
    cfg: Config,
    inst: I,
    target: Vec<u8>,
    phase: Vec<f32>,
    iou: f64,
    /// The heuristic's memory: its last pulse (pixel row and column, whether it erased) with
    /// the phase image before it, and its current writing and erasing bias magnitudes, V.
    h_last: Option<(usize, usize, bool)>,
    h_before: Vec<f32>,
    h_bias: [f64; 2],
    /// Whether an erasing pulse made the observed IoU worse this episode (no more erasing).
    h_no_erase: bool,
}

/// The model of `cfg`'s instrument at its `fidelity`, seeded with `seed`, as the task runs it.
/// Whoever serves the task on the simulator (the MCP server, deployments) builds it here.
pub fn simulator(cfg: &Config, seed: u64) -> scopegym_physics::Result<SpmSimulator> {
    pfm_simulator(&cfg.instrument, cfg.fidelity, seed)
}

impl PfmDomainWriting<SpmSimulator> {
    /// The task on the simulator, from an optional TOML config.
    pub fn from_config(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Config = config_from_toml(config)?;
        cfg.validate()?;
        let inst = simulator(&cfg, 0)?;
        Ok(Self::new(cfg, inst))
    }
}

impl<I: SpmInstrument + BiasWriting + PolarizationTruth + NewEpisode + Send> PfmDomainWriting<I> {
    /// The task on `inst` with `cfg`.
    pub fn new(cfg: Config, mut inst: I) -> Self {
        inst.set_region(cfg.split.region());
        let n = cfg.pixels;
        Self {
            inst,
            target: vec![0; n * n],
            phase: vec![0.0; n * n],
            iou: 0.0,
            h_last: None,
            h_before: vec![0.0; n * n],
            h_bias: [0.0; 2],
            h_no_erase: false,
            cfg,
        }
    }

    fn settings(&self) -> ScanSettings {
        let n = self.cfg.pixels;
        ScanSettings {
            rows: n,
            cols: n,
            pixel_size: self.cfg.field / n as f64,
            dwell_time: 1.0 / (2.0 * 2.0 * n as f64),
            flyback_time: 0.0,
            center: [0.0, 0.0],
        }
    }

    /// Scans a frame; stores the phase image mapped to 0..255.
    fn image(&mut self) -> Result<()> {
        let f = self.inst.acquire_frame()?;
        let ph = f
            .channel("phase")
            .ok_or_else(|| EnvError::config("instrument", "no phase channel (PFM mode)"))?;
        self.phase.clear();
        self.phase.extend(
            ph.image
                .iter()
                .map(|&d| (255.0 * 0.5 * (1.0 + f64::from(d).to_radians().cos())).round() as f32),
        );
        Ok(())
    }

    fn observed_iou(&self) -> f64 {
        iou(
            self.phase.iter().map(|&v| v > 127.0),
            self.target.iter().map(|&t| t == 1),
        )
    }

    fn obs(&self) -> Value {
        Value::Dict(vec![
            ("phase".into(), Value::Box(self.phase.clone())),
            (
                "target".into(),
                Value::Box(self.target.iter().map(|&t| f32::from(t)).collect()),
            ),
        ])
    }

    /// Records the true IoU in `info` where the instrument knows the polarization; returns it.
    fn truth(&self, info: &mut Info) -> Option<f64> {
        let up = self.inst.true_up(&self.settings())?;
        let v = iou(up.into_iter(), self.target.iter().map(|&t| t == 1));
        info.insert("true_iou".into(), InfoValue::F64(v));
        Some(v)
    }
}

impl<I: SpmInstrument + BiasWriting + PolarizationTruth + NewEpisode + Send> Task
    for PfmDomainWriting<I>
{
    fn observation_space(&self) -> Space {
        let n = self.cfg.pixels;
        Space::Dict(vec![
            ("phase".into(), Space::image(&[n, n])),
            (
                "target".into(),
                Space::Box {
                    shape: vec![n, n],
                    low: vec![0.0; n * n],
                    high: vec![1.0; n * n],
                    dtype: Dtype::U8,
                },
            ),
        ])
    }

    fn action_space(&self) -> Space {
        Space::bounded_box(vec![-1.0; 4], vec![1.0; 4])
    }

    fn max_episode_steps(&self) -> usize {
        self.cfg.max_steps
    }

    fn reset(&mut self, seed: u64, info: &mut Info) -> Result<Value> {
        self.inst.new_episode(seed, info)?;
        let mut rng = seeded(derive_seed(seed, "target"));
        let split = self.cfg.split;
        let shape =
            (split.uniform(&mut rng, 0.0, SHAPES.len() as f64) as usize).min(SHAPES.len() - 1);
        self.target = target_pattern(shape, self.cfg.pixels, split, &mut rng);
        self.h_last = None;
        self.h_bias = [self.cfg.heuristic_bias, 0.5 * self.cfg.heuristic_bias];
        self.h_no_erase = false;
        let s = self.settings();
        self.inst.configure_scan(&s)?;
        self.image()?;
        self.iou = self.observed_iou();
        info.insert("target_shape".into(), InfoValue::Str(SHAPES[shape].into()));
        info.insert("iou".into(), InfoValue::F64(self.iou));
        self.truth(info);
        Ok(self.obs())
    }

    fn step(&mut self, action: &Value, info: &mut Info) -> Result<TaskStep> {
        let a = action
            .as_box()
            .filter(|a| a.len() == 4)
            .ok_or_else(|| EnvError::action("action", "expected a Box value of 4"))?;
        let c = &self.cfg;
        let (x, y, bias, log_t) = (
            f64::from(a[0]).clamp(-1.0, 1.0),
            f64::from(a[1]).clamp(-1.0, 1.0),
            from_unit(a[2], c.bias_range),
            from_unit(a[3], c.log_duration_range),
        );
        if bias.abs() > c.breakdown {
            info.insert("breakdown".into(), InfoValue::Bool(true));
            info.insert("iou".into(), InfoValue::F64(self.iou));
            self.truth(info);
            return Ok(TaskStep {
                obs: self.obs(),
                reward: -c.breakdown_penalty,
                terminated: true,
                success: false,
            });
        }
        let half = 0.5 * c.field;
        let pos = [x * half, y * half];
        self.inst.bias_pulse(pos, bias, 10f64.powf(log_t))?;
        self.image()?;
        let now = self.observed_iou();
        let c = &self.cfg;
        // Termination uses the observed IoU (what the instrument measures); is_success the true
        // one, where the simulator knows it.
        let done = now >= c.done_iou;
        let mut reward = c.iou_scale * (now - self.iou);
        if done {
            reward += c.success_bonus;
        }
        self.iou = now;
        info.insert("breakdown".into(), InfoValue::Bool(false));
        info.insert("success".into(), InfoValue::Bool(done));
        info.insert("iou".into(), InfoValue::F64(now));
        let true_iou = self.truth(info);
        Ok(TaskStep {
            obs: self.obs(),
            reward,
            terminated: done,
            success: true_iou.is_some_and(|v| v >= self.cfg.success_iou),
        })
    }

    fn render(&self) -> RgbImage {
        let n = self.cfg.pixels;
        let mut img = RgbImage::from_grey(&self.phase, n, n);
        // The target's outline in red.
        for i in 0..n {
            for j in 0..n {
                let t = self.target[i * n + j];
                let edge = t == 1
                    && [(0, 1), (2, 1), (1, 0), (1, 2)].iter().any(|&(di, dj)| {
                        let (ii, jj) = (i + di, j + dj);
                        ii < 1
                            || jj < 1
                            || ii > n
                            || jj > n
                            || self.target[(ii - 1) * n + jj - 1] == 0
                    });
                if edge {
                    img.data[3 * (i * n + j)..3 * (i * n + j) + 3].copy_from_slice(&[255, 0, 0]);
                }
            }
        }
        img
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        let c = &self.cfg;
        let n = c.pixels;
        let harmless = Value::Box(vec![0.0, 0.0, to_unit(0.0, c.bias_range), -1.0]);
        let (Some(phase), Some(target)) = (
            obs.get("phase").and_then(Value::as_box),
            obs.get("target").and_then(Value::as_box),
        ) else {
            return harmless;
        };
        if phase.len() != n * n || target.len() != n * n {
            return harmless;
        }
        let r = c.heuristic_radius;
        let ri = r.ceil() as i64;
        let disc = |i: usize, j: usize| {
            (-ri..=ri)
                .flat_map(move |di| (-ri..=ri).map(move |dj| (di, dj)))
                .filter_map(move |(di, dj)| {
                    let (ii, jj) = (i as i64 + di, j as i64 + dj);
                    ((di * di + dj * dj) as f64 <= r * r).then_some((ii, jj))
                })
        };
        let inside = |ii: i64, jj: i64| ii >= 0 && jj >= 0 && ii < n as i64 && jj < n as i64;
        let up = |k: usize| phase[k] > 127.0;
        // Feedback on the bias from what the last pulse did: the pixels of its disc that could
        // flip (down before a write, up before an erase) against those that flipped within
        // twice the radius (an oversized domain shows there).
        if let Some((i0, j0, erase)) = self.h_last {
            let was_up = |k: usize| self.h_before[k] > 127.0;
            let (mut could, mut flipped) = (0usize, 0usize);
            for (ii, jj) in disc(i0, j0) {
                if inside(ii, jj) {
                    could += usize::from(was_up(ii as usize * n + jj as usize) == erase);
                }
            }
            let w = 2 * ri;
            for ii in (i0 as i64 - w).max(0)..=(i0 as i64 + w).min(n as i64 - 1) {
                for jj in (j0 as i64 - w).max(0)..=(j0 as i64 + w).min(n as i64 - 1) {
                    let k = ii as usize * n + jj as usize;
                    flipped += usize::from(was_up(k) == erase && up(k) != erase);
                }
            }
            // An erase that lowered the observed IoU: the film does not take erasing well.
            let iou_of = |img: &[f32]| {
                iou(
                    img.iter().map(|&v| v > 127.0),
                    target.iter().map(|&t| t >= 0.5),
                )
            };
            if erase && iou_of(phase) < iou_of(&self.h_before) {
                self.h_no_erase = true;
            }
            if could >= 5 {
                let ratio = flipped as f64 / could as f64;
                let max_bias = (c.breakdown - 0.5)
                    .min(c.bias_range[1])
                    .min(-c.bias_range[0]);
                let b = &mut self.h_bias[usize::from(erase)];
                // An erase that misses is not strengthened: a strong negative pulse can wipe a
                // whole written domain.
                if ratio < 0.5 && !erase {
                    *b = (*b * 1.15).min(max_bias);
                } else if ratio > 1.3 {
                    *b = (*b * 0.85).max(1.0);
                }
            }
        }
        // The pulse that fixes the most pixels: writing where the target is still down, or
        // erasing where the film is up outside the target; each pixel of the disc counts +1
        // when it would become right and −1 when it would become wrong (or lies off the field).
        let mut best: Option<(f64, usize, usize, bool)> = None;
        for i in 0..n {
            for j in 0..n {
                let k = i * n + j;
                let want = target[k] >= 0.5;
                if want == up(k) {
                    continue;
                }
                let erase = !want;
                if erase && self.h_no_erase {
                    continue;
                }
                let mut score = 0.0;
                for (ii, jj) in disc(i, j) {
                    if !inside(ii, jj) {
                        score -= 1.0;
                        continue;
                    }
                    let kk = ii as usize * n + jj as usize;
                    let (w, u) = (target[kk] >= 0.5, up(kk));
                    // After the pulse the pixel is up for a write, down for an erase.
                    let after = !erase;
                    if u != after {
                        score += if w == after { 1.0 } else { -1.0 };
                    }
                }
                // Erasing only where it clearly pays (HEURISTIC_ERASE_SCORE pixels net).
                let score = if erase {
                    score - HEURISTIC_ERASE_SCORE
                } else {
                    score
                };
                if best.is_none_or(|b| score > b.0) {
                    best = Some((score, i, j, erase));
                }
            }
        }
        let Some((_, i, j, erase)) = best.filter(|b| b.0 > 0.0) else {
            // Nothing worth a pulse: a harmless one too weak to switch.
            self.h_last = None;
            return harmless;
        };
        self.h_last = Some((i, j, erase));
        self.h_before.clear();
        self.h_before.extend_from_slice(phase);
        let bias = if erase {
            -self.h_bias[1]
        } else {
            self.h_bias[0]
        };
        let to_norm = |k: usize| ((2.0 * k as f64 + 1.0) / n as f64 - 1.0) as f32;
        Value::Box(vec![
            to_norm(j),
            to_norm(i),
            to_unit(bias, c.bias_range),
            to_unit(c.heuristic_log_duration, c.log_duration_range),
        ])
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

    fn env() -> TaskEnv<PfmDomainWriting<SpmSimulator>> {
        TaskEnv::new("t", PfmDomainWriting::from_config(None).unwrap())
    }

    fn env_with(toml: &str) -> TaskEnv<PfmDomainWriting<SpmSimulator>> {
        let v: toml::Value = toml::from_str(toml).unwrap();
        TaskEnv::new("t", PfmDomainWriting::from_config(Some(&v)).unwrap())
    }

    /// The normalized action of a pulse at `(x, y)` with `bias` V for `10^log_t` s.
    fn pulse(x: f32, y: f32, bias: f64, log_t: f64) -> Value {
        let c = Config::default();
        Value::Box(vec![
            x,
            y,
            to_unit(bias, c.bias_range),
            to_unit(log_t, c.log_duration_range),
        ])
    }

    #[test]
    fn a_pulse_writes_an_up_domain_where_the_tip_is() {
        for (bias, logt) in [(4.0, -2.5), (6.0, -2.5), (8.0, -2.5), (6.0, -1.5)] {
            let mut e = env();
            e.reset(Some(1)).unwrap();
            let s = e.step(&pulse(0.5, -0.5, bias, logt)).unwrap();
            let ph = s.obs.get("phase").unwrap().as_box().unwrap().to_vec();
            let n = 32;
            let written: Vec<(usize, usize)> = (0..n * n)
                .filter(|&k| ph[k] > 127.0)
                .map(|k| (k / n, k % n))
                .collect();
            println!(
                "bias {bias} V, 10^{logt} s: {} pixels written",
                written.len()
            );
            if bias >= 6.0 {
                assert!(!written.is_empty());
                // x = +0.5 → column 24, y = -0.5 → row 8.
                let (mi, mj) = written
                    .iter()
                    .fold((0.0, 0.0), |a, &(i, j)| (a.0 + i as f64, a.1 + j as f64));
                let m = written.len() as f64;
                assert!((mi / m - 7.5).abs() < 2.5 && (mj / m - 23.5).abs() < 2.5);
            }
        }
    }

    #[test]
    fn breakdown_ends_the_episode_with_the_penalty() {
        let mut e = env();
        e.reset(Some(2)).unwrap();
        let s = e.step(&pulse(0.0, 0.0, -13.0, -2.0)).unwrap();
        assert!(s.terminated);
        assert_eq!(s.reward, -5.0);
        assert_eq!(s.info.get("breakdown"), Some(&InfoValue::Bool(true)));
        assert_eq!(s.info.get("is_success"), Some(&InfoValue::Bool(false)));
    }

    #[test]
    fn targets_cover_every_shape_and_bad_config_names_the_field() {
        let mut shapes = std::collections::BTreeSet::new();
        let mut e = env();
        for seed in 0..12 {
            let (_, info) = e.reset(Some(seed)).unwrap();
            if let Some(InfoValue::Str(s)) = info.get("target_shape") {
                shapes.insert(s.clone());
            }
            assert!(matches!(info.get("true_iou"), Some(InfoValue::F64(_))));
        }
        assert_eq!(shapes.len(), 3);
        crate::tasks::testing::assert_config_errors_name_fields(
            PfmDomainWriting::from_config,
            &[
                ("breakdown = -1.0", "breakdown"),
                ("done_iou = 1.5", "done_iou"),
                ("bias_range = [5.0, -5.0]", "bias_range"),
                ("nope = 1", "nope"),
            ],
        );
    }

    #[test]
    fn success_is_the_true_iou_and_termination_the_observed_one() {
        let mut e = env();
        let c = Config::default();
        let mut ended_by_observation = 0;
        for seed in 0..6 {
            let (mut obs, _) = e.reset(Some(seed)).unwrap();
            loop {
                let a = e.heuristic_action(&obs);
                let s = e.step(&a).unwrap();
                let f = |k: &str| match s.info.get(k) {
                    Some(InfoValue::F64(v)) => *v,
                    other => panic!("{k}: {other:?}"),
                };
                let (iou, true_iou) = (f("iou"), f("true_iou"));
                assert_eq!(
                    s.info.get("is_success"),
                    Some(&InfoValue::Bool(true_iou >= c.success_iou))
                );
                assert_eq!(s.terminated, iou >= c.done_iou);
                ended_by_observation += usize::from(s.terminated);
                obs = s.obs;
                if s.terminated || s.truncated {
                    break;
                }
            }
        }
        assert!(ended_by_observation > 0);
    }

    #[test]
    fn degenerate_policies_do_not_come_close() {
        // 20 seeds, the default config. The Box degenerates: zero and centre (no pulse: the
        // zero bias), the corners (±15 V: breakdown at once), a constant random pulse at one
        // place (one domain, rewritten), and random actions.
        let mut e = env();
        let (h, others) = degenerate_scores(&mut e, 0..20, 16).unwrap();
        assert_no_degenerate_wins("PfmDomainWriting", &h, &others, 4.0, 0.5);
    }

    #[test]
    fn heuristic_beats_random_on_the_test_split() {
        // Held-out parameters (split = "test") at medium, 20 seeds: the heuristic's mean return
        // exceeds random's by more than 5.0, its success rate by at least 0.5.
        let mut e = env_with("split = \"test\"");
        assert_heuristic_beats_random("PfmDomainWriting-v1", &mut e, 0..20, 5.0, 0.5);
    }

    #[test]
    fn levels_set_the_ranges() {
        let (easy, hard) = (
            Config::at_level(Difficulty::Easy),
            Config::at_level(Difficulty::Hard),
        );
        assert_eq!(Config::at_level(Difficulty::Medium), Config::default());
        assert_ne!(
            easy.instrument.pfm.bias_offset,
            hard.instrument.pfm.bias_offset
        );
        for level in ["easy", "hard"] {
            let mut e = env_with(&format!("difficulty = \"{level}\""));
            let h = evaluate(&mut e, &Policy::Heuristic, 0..10).unwrap();
            println!(
                "{level}: heuristic success {:.2} return {:.2}",
                h.success_rate, h.mean_return
            );
            assert!(h.mean_return > 3.0, "{level}: {}", h.mean_return);
        }
    }

    /// Hash of the observations and rewards of a seeded rollout (pulses of a fixed cycle).
    fn rollout_hash(toml: &str) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut e = env_with(toml);
        crate::tasks::testing::roll_out(
            &mut e,
            3..5,
            4,
            |_, k, _| {
                pulse(
                    [0.3, -0.4, 0.0, 0.5][k],
                    [0.0, 0.4, -0.5, 0.2][k],
                    7.0,
                    -2.5,
                )
            },
            |_, obs, s| {
                for key in ["phase", "target"] {
                    for v in obs.get(key).unwrap().as_box().unwrap() {
                        v.to_bits().hash(&mut h);
                    }
                }
                if let Some(s) = s {
                    s.reward.to_bits().hash(&mut h);
                }
            },
        );
        h.finish()
    }

    #[test]
    fn fast_runs_are_deterministic_per_seed_and_differ_from_full() {
        let fast = rollout_hash("fidelity = \"fast\"");
        assert_eq!(fast, rollout_hash("fidelity = \"fast\""));
        assert_ne!(fast, rollout_hash(""));
    }

    /// The fast model (`fidelity = "fast"`) against the full one. (1) The written domain: one
    /// pulse at the centre of a fresh film, at 5, 7 and 9 V for 10^-2.5 s and at 7 V for
    /// 10^-1.5 s, on seeds 0..8: the mean written area (phase pixels above 127) per pulse and
    /// its spread over seeds (measured: means within 1 pixel of 12-306, spreads within 0.4).
    /// (2) The heuristic's episodes on seeds 0..12: the mean and variance of the reward and of
    /// the observed IoU per step, and the statistics of the phase images (mean, variance,
    /// power in three bands of spatial frequency, [`crate::tasks::testing::image_statistics`]);
    /// the closed loop makes the episodes diverge, so these agree less closely (measured: the
    /// reward's mean within 9 % and variance within 15 %, the IoU's within 5 %, the image
    /// statistics within 0.6 %). Tolerance 25 %.
    #[test]
    fn fast_and_full_observe_the_same_statistics() {
        use crate::tasks::testing::{image_statistics, info_f64, relative_differences, roll_out};
        let pulses = [(5.0, -2.5), (7.0, -2.5), (9.0, -2.5), (7.0, -1.5)];
        let area = |fidelity: &str| -> Vec<[f64; 2]> {
            let mut e = env_with(&format!("fidelity = \"{fidelity}\""));
            pulses
                .iter()
                .map(|&(b, t)| {
                    let a: Vec<f64> = (0..8)
                        .map(|seed| {
                            e.reset(Some(seed)).unwrap();
                            let s = e.step(&pulse(0.0, 0.0, b, t)).unwrap();
                            let ph = s.obs.get("phase").unwrap().as_box().unwrap().to_vec();
                            ph.iter().filter(|&&v| v > 127.0).count() as f64
                        })
                        .collect();
                    let m = a.iter().sum::<f64>() / a.len() as f64;
                    let sd =
                        (a.iter().map(|v| (v - m).powi(2)).sum::<f64>() / a.len() as f64).sqrt();
                    [m, sd]
                })
                .collect()
        };
        let (a_fast, a_full) = (area("fast"), area("full"));
        eprintln!("written area [mean, sd] fast {a_fast:?}\nfull {a_full:?}");
        for (k, (f, u)) in a_fast.iter().zip(&a_full).enumerate() {
            // The mean area within 15 % (+2 pixels), its spread within 3 pixels.
            assert!(
                (f[0] - u[0]).abs() <= 0.15 * u[0] + 2.0,
                "pulse {k}: mean area {} vs {}",
                f[0],
                u[0]
            );
            assert!(
                (f[1] - u[1]).abs() <= 3.0,
                "pulse {k}: spread {} vs {}",
                f[1],
                u[1]
            );
        }
        let run = |fidelity: &str| {
            let mut e = env_with(&format!("fidelity = \"{fidelity}\""));
            let (mut xs, mut images) = (Vec::<[f64; 2]>::new(), Vec::new());
            roll_out(
                &mut e,
                0..12,
                25,
                |e, _, obs| e.heuristic_action(obs),
                |_, obs, s| {
                    let ph = obs.get("phase").unwrap().as_box().unwrap();
                    images.push(ph.iter().map(|v| v / 255.0).collect::<Vec<f32>>());
                    if let Some(s) = s {
                        xs.push([s.reward, info_f64(&s.info, "iou")]);
                    }
                },
            );
            let m = xs.len() as f64;
            let mean: [f64; 2] = std::array::from_fn(|k| xs.iter().map(|x| x[k]).sum::<f64>() / m);
            let var: [f64; 2] = std::array::from_fn(|k| {
                xs.iter().map(|x| (x[k] - mean[k]).powi(2)).sum::<f64>() / m
            });
            (mean, var, image_statistics(&images, 32))
        };
        let ((m_fast, v_fast, i_fast), (m_full, v_full, i_full)) = (run("fast"), run("full"));
        let (rm, rv, ri) = (
            relative_differences(&m_fast, &m_full),
            relative_differences(&v_fast, &v_full),
            relative_differences(&i_fast, &i_full),
        );
        eprintln!(
            "fast {m_fast:?} {v_fast:?} {i_fast:?}\nfull {m_full:?} {v_full:?} {i_full:?}\n\
             relative {rm:?} {rv:?} {ri:?}"
        );
        for (k, r) in rm.iter().chain(&rv).chain(&ri).enumerate() {
            assert!(*r < 0.25, "statistic {k}: relative difference {r}");
        }
    }
}
