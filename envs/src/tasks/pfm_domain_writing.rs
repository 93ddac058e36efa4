//! `scopegym/PfmDomainWriting-v1`: write a target domain pattern into a ferroelectric film with
//! tip bias pulses, checking the result in the PFM phase image (anchor: AEcroscopy writing).
//!
//! The film starts polarized down (phase 180°). Each step applies one bias pulse at the chosen
//! position, then scans a `pixels²` PFM frame over the field. A positive pulse writes an up
//! domain (phase 0°), a negative one erases.
//!
//! - **Observation** (Dict): `phase`, the PFM phase frame as a uint8 image `(pixels, pixels)`
//!   mapped by `255·(1 + cos φ)/2` (up domains bright), and `target`, the pattern to write,
//!   a binary uint8 image of the same shape (1 = write up).
//! - **Action** (Box, 4): `[x, y, bias, log10 duration]`: the tip position normalized to the
//!   field (`-1..1` each, x along the fast axis, y along the rows), the pulse amplitude in V
//!   (`bias_range`) and the pulse duration as log10 of seconds (`log_duration_range`).
//! - **Reward**: `iou_scale · (IoU_t - IoU_{t-1})`, with IoU between the observed written mask
//!   (phase pixels brighter than 127) and the target; so the return is the IoU gained. A pulse
//!   with `|bias| > breakdown` is not applied: it ends the episode with `-breakdown_penalty`
//!   (dielectric breakdown would destroy the film). `success_bonus` on success.
//! - **Success** (terminates): observed IoU ≥ `success_iou`.
//! - **Info** (never in the observation): `iou` (observed), `true_iou` (from the film's true
//!   polarization at the frame's pixels, where the instrument can tell it), `breakdown`,
//!   `success`, `target_shape` and the randomized scenario values (`param.*`).
//! - **Heuristic**: among target pixels not yet written, put the tip at the pixel whose disc of
//!   the expected domain radius covers the most unwritten target pixels minus the pixels
//!   outside the target, and pulse at a moderate bias (`heuristic_bias`, `heuristic_log_duration`).

use crate::env::{Info, InfoValue, RgbImage, Task, TaskStep};
use crate::error::{EnvError, Result};
use crate::level::{Difficulty, Split};
use crate::space::{Dtype, Space, Value};
use crate::tasks::{NewEpisode, TaskConfig, check_nonnegative, config_from_toml};
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
    /// The simulated instrument (PFM mode; 64² sample grid over 0.5 µm, film poled down).
    pub instrument: SpmConfig,
    /// Pixels per side of the phase frame and the target. Default 32.
    pub pixels: usize,
    /// Side of the (square) field written and imaged, m. Default 0.5 µm.
    pub field: f64,
    /// Steps per episode. Default 25.
    pub max_steps: usize,
    /// Lowest and highest pulse bias the action allows, V. Default ±15 V: beyond the
    /// breakdown limit, so an agent must learn to stay below it.
    pub bias_range: [f64; 2],
    /// Pulses with a larger magnitude break the film down, V. Default 12.
    pub breakdown: f64,
    /// Shortest and longest pulse, log10 s. Default -3 and -1.5.
    pub log_duration_range: [f64; 2],
    /// Reward per unit of IoU gained. Default 10.
    pub iou_scale: f64,
    /// Reward lost on breakdown. Default 5.
    pub breakdown_penalty: f64,
    /// Success: observed IoU at least this. Default 0.75.
    pub success_iou: f64,
    /// Reward added on success. Default 2.
    pub success_bonus: f64,
    /// The heuristic's pulse bias, V. Default 6.
    pub heuristic_bias: f64,
    /// The heuristic's pulse duration, log10 s. Default -2.5.
    pub heuristic_log_duration: f64,
    /// The heuristic's expected domain radius, pixels. Default 3.
    pub heuristic_radius: f64,
}

impl Default for Config {
    fn default() -> Self {
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
        instrument.pfm.up_fraction = Param::fixed(0.0);
        instrument.pfm.phase_noise =
            Param::Uniform(2f64.to_radians(), 10f64.to_radians(), Default::default());
        Self {
            difficulty: Difficulty::Medium,
            split: Split::Train,
            instrument,
            pixels: 32,
            field: 0.5e-6,
            max_steps: 25,
            bias_range: [-15.0, 15.0],
            breakdown: 12.0,
            log_duration_range: [-3.0, -1.5],
            iou_scale: 10.0,
            breakdown_penalty: 5.0,
            success_iou: 0.75,
            success_bonus: 2.0,
            heuristic_bias: 6.0,
            heuristic_log_duration: -2.5,
            heuristic_radius: 3.0,
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
        if !(0.0..=1.0).contains(&self.success_iou) {
            return bad(
                "success_iou",
                format!("must be in [0, 1], got {}", self.success_iou),
            );
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

/// The target shapes.
const SHAPES: [&str; 3] = ["square", "line", "ring"];

/// A binary target pattern of `shape` (index into [`SHAPES`]) on an `n × n` grid, placed and
/// sized from `rng`.
fn target_pattern<R: Rng>(shape: usize, n: usize, rng: &mut R) -> Vec<u8> {
    let nf = n as f64;
    let mut t = vec![0u8; n * n];
    let jitter = |rng: &mut R, span: f64| (rng.random::<f64>() - 0.5) * span;
    let (cx, cy) = (
        0.5 * (nf - 1.0) + jitter(rng, 0.2 * nf),
        0.5 * (nf - 1.0) + jitter(rng, 0.2 * nf),
    );
    match shape {
        0 => {
            let half = nf * (0.15 + 0.1 * rng.random::<f64>());
            for i in 0..n {
                for j in 0..n {
                    if (i as f64 - cy).abs() <= half && (j as f64 - cx).abs() <= half {
                        t[i * n + j] = 1;
                    }
                }
            }
        }
        1 => {
            let angle = rng.random::<f64>() * std::f64::consts::PI;
            let (dx, dy) = (angle.cos(), angle.sin());
            let half_len = nf * (0.25 + 0.1 * rng.random::<f64>());
            let half_width = nf * 0.07;
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
            let outer = nf * (0.25 + 0.08 * rng.random::<f64>());
            let inner = outer - nf * 0.14;
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
}

impl PfmDomainWriting<SpmSimulator> {
    /// The task on the simulator, from an optional TOML config.
    pub fn from_config(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Config = config_from_toml(config)?;
        cfg.validate()?;
        let inst = SpmSimulator::new(cfg.instrument.clone(), 0)?;
        Ok(Self::new(cfg, inst))
    }
}

impl<I: SpmInstrument + BiasWriting + PolarizationTruth + NewEpisode + Send> PfmDomainWriting<I> {
    /// The task on `inst` with `cfg`.
    pub fn new(cfg: Config, mut inst: I) -> Self {
        inst.set_region(cfg.split.region());
        let n = cfg.pixels;
        Self {
            cfg,
            inst,
            target: vec![0; n * n],
            phase: vec![0.0; n * n],
            iou: 0.0,
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

    fn truth(&self, info: &mut Info) {
        if let Some(up) = self.inst.true_up(&self.settings()) {
            let v = iou(up.into_iter(), self.target.iter().map(|&t| t == 1));
            info.insert("true_iou".into(), InfoValue::F64(v));
        }
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
        let c = &self.cfg;
        Space::bounded_box(
            vec![
                -1.0,
                -1.0,
                c.bias_range[0] as f32,
                c.log_duration_range[0] as f32,
            ],
            vec![
                1.0,
                1.0,
                c.bias_range[1] as f32,
                c.log_duration_range[1] as f32,
            ],
        )
    }

    fn max_episode_steps(&self) -> usize {
        self.cfg.max_steps
    }

    fn reset(&mut self, seed: u64, info: &mut Info) -> Result<Value> {
        self.inst.new_episode(seed, info)?;
        let mut rng = seeded(derive_seed(seed, "target"));
        let shape = rng.random_range(0..SHAPES.len());
        self.target = target_pattern(shape, self.cfg.pixels, &mut rng);
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
            f64::from(a[0]),
            f64::from(a[1]),
            f64::from(a[2]),
            f64::from(a[3]),
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
        let pos = [x.clamp(-1.0, 1.0) * half, y.clamp(-1.0, 1.0) * half];
        self.inst.bias_pulse(pos, bias, 10f64.powf(log_t))?;
        self.image()?;
        let now = self.observed_iou();
        let c = &self.cfg;
        let success = now >= c.success_iou;
        let mut reward = c.iou_scale * (now - self.iou);
        if success {
            reward += c.success_bonus;
        }
        self.iou = now;
        info.insert("breakdown".into(), InfoValue::Bool(false));
        info.insert("success".into(), InfoValue::Bool(success));
        info.insert("iou".into(), InfoValue::F64(now));
        self.truth(info);
        Ok(TaskStep {
            obs: self.obs(),
            reward,
            terminated: success,
            success,
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
        let (Some(phase), Some(target)) = (
            obs.get("phase").and_then(Value::as_box),
            obs.get("target").and_then(Value::as_box),
        ) else {
            return Value::Box(vec![0.0, 0.0, 0.0, c.log_duration_range[0] as f32]);
        };
        if phase.len() != n * n || target.len() != n * n {
            return Value::Box(vec![0.0, 0.0, 0.0, c.log_duration_range[0] as f32]);
        }
        let r = c.heuristic_radius;
        let ri = r.ceil() as i64;
        let mut best: Option<(f64, usize, usize)> = None;
        for i in 0..n {
            for j in 0..n {
                let k = i * n + j;
                if target[k] < 0.5 || phase[k] > 127.0 {
                    continue;
                }
                let mut score = 0.0;
                for di in -ri..=ri {
                    for dj in -ri..=ri {
                        if ((di * di + dj * dj) as f64) > r * r {
                            continue;
                        }
                        let (ii, jj) = (i as i64 + di, j as i64 + dj);
                        if ii < 0 || jj < 0 || ii >= n as i64 || jj >= n as i64 {
                            score -= 1.0;
                            continue;
                        }
                        let kk = ii as usize * n + jj as usize;
                        if target[kk] < 0.5 {
                            score -= 1.0;
                        } else if phase[kk] <= 127.0 {
                            score += 1.0;
                        }
                    }
                }
                if best.is_none_or(|b| score > b.0) {
                    best = Some((score, i, j));
                }
            }
        }
        let Some((_, i, j)) = best else {
            // Nothing left to write: a harmless pulse too weak to switch.
            return Value::Box(vec![0.0, 0.0, 0.0, c.log_duration_range[0] as f32]);
        };
        let to_norm = |k: usize| ((2.0 * k as f64 + 1.0) / n as f64 - 1.0) as f32;
        Value::Box(vec![
            to_norm(j),
            to_norm(i),
            c.heuristic_bias as f32,
            c.heuristic_log_duration as f32,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Env, TaskEnv};

    fn env() -> TaskEnv<PfmDomainWriting<SpmSimulator>> {
        TaskEnv::new("t", PfmDomainWriting::from_config(None).unwrap())
    }

    #[test]
    fn a_pulse_writes_an_up_domain_where_the_tip_is() {
        let mut e = env();
        e.reset(Some(1)).unwrap();
        for (bias, logt) in [(4.0, -2.5), (6.0, -2.5), (8.0, -2.5), (6.0, -1.5)] {
            let mut e = env();
            e.reset(Some(1)).unwrap();
            let s = e.step(&Value::Box(vec![0.5, -0.5, bias, logt])).unwrap();
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
        let s = e.step(&Value::Box(vec![0.0, 0.0, -13.0, -2.0])).unwrap();
        assert!(s.terminated);
        assert_eq!(s.reward, -5.0);
        assert_eq!(s.info.get("breakdown"), Some(&InfoValue::Bool(true)));
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
        let v: toml::Value = toml::from_str("breakdown = -1.0").unwrap();
        let err = PfmDomainWriting::from_config(Some(&v))
            .unwrap_err()
            .to_string();
        assert!(err.contains("breakdown"), "{err}");
    }
}
