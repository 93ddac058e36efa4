//! `scopegym/AfmFeedbackTuning-v1`: tune the z-feedback of an AFM (P, I, scan speed) so it
//! tracks a rough surface accurately and fast (anchor: BO tuning of SPM feedback, spmsimu).
//!
//! Each step applies the action's gains and line rate and scans `lines` lines of `cols` pixels,
//! trace and retrace, over the same area, through the instrument traits only.
//!
//! - **Observation** (Box, 7): `[P, log10 I, line rate (Hz), r.m.s. error (nm), r.m.s.
//!   trace-retrace difference (nm), fraction of sign changes of the error between
//!   neighbouring pixels, mean error (nm)]`, all computed from the recorded channels (works on
//!   a real instrument).
//! - **Action** (Box, 3): `[P ∈ [0, p_max], log10 I ∈ [log_i_min, log_i_max], line rate ∈
//!   [rate_min, rate_max] Hz]`, absolute settings.
//! - **Reward**: `-(e_rms + d_rms) - time_weight / rate`, errors in nm capped at
//!   `error_cap` each, plus `success_bonus` on success. Faster scanning costs less time but
//!   tracks worse; an unstable loop (`P + I/f_s ≥ 2(1 - P)` for the simulator's loop) oscillates
//!   and is punished through the error.
//! - **Success** (terminates): `e_rms < success_error` at `rate ≥ success_rate`.
//! - **Info** (never in the observation): `stable` (whether the chosen gains give a stable
//!   discrete loop, from the poles), the randomized scenario values (`param.*`).
//! - **Heuristic**: the microscopist's tuning by hand, a coordinate search on what the screen
//!   shows: with P at 0.2, raise I in steps while the cost `e_rms + d_rms + time_weight/rate`
//!   (all observed) improves; when it worsens go back to the best setting and try the other
//!   direction, then tune the line rate the same way, halving the steps each round.

use crate::env::{Info, InfoValue, RgbImage, Task, TaskStep};
use crate::error::{EnvError, Result};
use crate::level::{Difficulty, Split};
use crate::space::{Space, Value};
use crate::tasks::{NewEpisode, TaskConfig, check_nonnegative, config_from_toml};
use scopegym_physics::instrument::{ScanSettings, SpmInstrument};
use scopegym_physics::param::Param;
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
    /// The simulated instrument (AFM mode).
    pub instrument: SpmConfig,
    /// Lines scanned per step. Default 8.
    pub lines: usize,
    /// Pixels per line. Default 128.
    pub cols: usize,
    /// Field of view per line, m. Default 1 µm.
    pub field: f64,
    /// Steps per episode. Default 30.
    pub max_steps: usize,
    /// Largest proportional gain. Default 0.8.
    pub p_max: f64,
    /// Smallest and largest log10 of the integral gain (1/s). Default 1 and 3.5.
    pub log_i_range: [f64; 2],
    /// Slowest and fastest line rate, Hz. Default 0.25 and 8.
    pub rate_range: [f64; 2],
    /// Reward cost per second of line time. Default 0.5.
    pub time_weight: f64,
    /// Cap of each error term in the reward, nm. Default 50.
    pub error_cap: f64,
    /// Success: r.m.s. error below this, nm. Default 0.3.
    pub success_error: f64,
    /// Success: at a line rate of at least this, Hz. Default 2.
    pub success_rate: f64,
    /// Reward added on success. Default 10.
    pub success_bonus: f64,
}

impl Default for Config {
    fn default() -> Self {
        let mut instrument = SpmConfig::default();
        instrument.sample.pixels = 256;
        instrument.surface.kind = SurfaceKind::Particles;
        instrument.surface.particle_radius = Param::Uniform(5e-9, 15e-9, Default::default());
        instrument.scan.pixels = [8, 128];
        instrument.tip.wear_rate = Param::fixed(0.0);
        instrument.sample.crash_threshold = Param::fixed(1e-6);
        Self {
            difficulty: Difficulty::Medium,
            split: Split::Train,
            instrument,
            lines: 8,
            cols: 128,
            field: 1e-6,
            max_steps: 30,
            p_max: 0.8,
            log_i_range: [1.0, 3.5],
            rate_range: [0.25, 8.0],
            time_weight: 0.5,
            error_cap: 50.0,
            success_error: 0.3,
            success_rate: 2.0,
            success_bonus: 10.0,
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
        if !(1..=1024).contains(&self.lines) {
            return bad("lines", format!("must be 1..=1024, got {}", self.lines));
        }
        if !(8..=4096).contains(&self.cols) {
            return bad("cols", format!("must be 8..=4096, got {}", self.cols));
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
        if !(self.p_max > 0.0 && self.p_max < 1.0) {
            return bad("p_max", format!("must be in (0, 1), got {}", self.p_max));
        }
        let [a, b] = self.log_i_range;
        if !(a.is_finite() && b.is_finite() && a < b && b <= 7.0) {
            return bad(
                "log_i_range",
                format!("must be increasing and ≤ 7, got {:?}", self.log_i_range),
            );
        }
        let [a, b] = self.rate_range;
        if !(a > 0.0 && a < b && b <= 1000.0) {
            return bad(
                "rate_range",
                format!(
                    "must be increasing within (0, 1000] Hz, got {:?}",
                    self.rate_range
                ),
            );
        }
        check_nonnegative(&[
            ("time_weight", self.time_weight),
            ("error_cap", self.error_cap),
            ("success_error", self.success_error),
            ("success_rate", self.success_rate),
            ("success_bonus", self.success_bonus),
        ])?;
        Ok(())
    }
}

/// The task over any SPM instrument `I`.
#[derive(Debug)]
pub struct AfmFeedbackTuning<I> {
    cfg: Config,
    inst: I,
    last_height: Vec<f32>,
    last_obs: [f32; 7],
    search: Search,
}

/// The heuristic's coordinate-search state.
#[derive(Debug, Clone, Copy)]
struct Search {
    /// Best observed cost and the setting `(log10 I, rate)` that gave it.
    best: Option<(f64, [f64; 2])>,
    /// Coordinate being tuned (0: log10 I, 1: log10 rate) and its direction and step.
    coord: usize,
    dir: f64,
    step: f64,
    flips: u32,
}

impl Default for Search {
    fn default() -> Self {
        Self {
            best: None,
            coord: 0,
            dir: 1.0,
            step: 0.4,
            flips: 0,
        }
    }
}

impl AfmFeedbackTuning<SpmSimulator> {
    /// The task on the simulator, from an optional TOML config.
    pub fn from_config(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Config = config_from_toml(config)?;
        cfg.validate()?;
        let inst = SpmSimulator::new(cfg.instrument.clone(), 0)?;
        Ok(Self::new(cfg, inst))
    }
}

impl<I: SpmInstrument + NewEpisode + Send> AfmFeedbackTuning<I> {
    /// The task on `inst` with `cfg`.
    pub fn new(cfg: Config, mut inst: I) -> Self {
        inst.set_region(cfg.split.region());
        Self {
            last_height: vec![0.0; cfg.lines * cfg.cols],
            cfg,
            inst,
            last_obs: [0.0; 7],
            search: Search::default(),
        }
    }

    fn measure(&mut self) -> Result<[f32; 7]> {
        let (p, i) = self.inst.feedback_gains();
        let s = self.inst.scan_settings();
        let rate = 1.0 / (2.0 * s.cols as f64 * s.dwell_time + s.flyback_time);
        let f = self.inst.acquire_frame()?;
        let get = |name: &str| {
            f.channel(name)
                .ok_or_else(|| EnvError::config("instrument", format!("no {name} channel")))
        };
        let (h, hr, e) = (get("height")?, get("height_retrace")?, get("error")?);
        let n = e.image.len() as f64;
        let rms = (e.image.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n).sqrt();
        let mean = e.image.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let diff = (h
            .image
            .iter()
            .zip(hr.image.iter())
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        let mut changes = 0usize;
        let mut pairs = 0usize;
        for row in e.image.rows() {
            for w in row.as_slice().unwrap_or(&[]).windows(2) {
                pairs += 1;
                if (w[0] > 0.0) != (w[1] > 0.0) {
                    changes += 1;
                }
            }
        }
        self.last_height.clear();
        self.last_height.extend(h.image.iter());
        Ok([
            p as f32,
            i.max(1e-9).log10() as f32,
            rate as f32,
            (rms * 1e9).min(1e6) as f32,
            (diff * 1e9).min(1e6) as f32,
            changes as f32 / pairs.max(1) as f32,
            (mean * 1e9).clamp(-1e6, 1e6) as f32,
        ])
    }

    fn settings(&self, rate: f64) -> ScanSettings {
        let c = self.cfg.cols;
        ScanSettings {
            rows: self.cfg.lines,
            cols: c,
            pixel_size: self.cfg.field / c as f64,
            dwell_time: 1.0 / (2.0 * rate * c as f64),
            flyback_time: 0.0,
            center: [0.0, 0.0],
        }
    }
}

impl<I: SpmInstrument + NewEpisode + Send> Task for AfmFeedbackTuning<I> {
    fn observation_space(&self) -> Space {
        let c = &self.cfg;
        Space::bounded_box(
            vec![
                0.0,
                c.log_i_range[0] as f32,
                c.rate_range[0] as f32,
                0.0,
                0.0,
                0.0,
                -1e6,
            ],
            vec![
                c.p_max as f32,
                c.log_i_range[1] as f32,
                c.rate_range[1] as f32,
                1e6,
                1e6,
                1.0,
                1e6,
            ],
        )
    }

    fn action_space(&self) -> Space {
        let c = &self.cfg;
        Space::bounded_box(
            vec![0.0, c.log_i_range[0] as f32, c.rate_range[0] as f32],
            vec![
                c.p_max as f32,
                c.log_i_range[1] as f32,
                c.rate_range[1] as f32,
            ],
        )
    }

    fn max_episode_steps(&self) -> usize {
        self.cfg.max_steps
    }

    fn reset(&mut self, seed: u64, info: &mut Info) -> Result<Value> {
        self.inst.new_episode(seed, info)?;
        self.search = Search::default();
        // Start from a cautious setting: low gains, slow scan.
        let start_i = 10f64.powf(self.cfg.log_i_range[0] + 0.5);
        self.inst.set_feedback_gains(0.05, start_i)?;
        let s = self.settings(self.cfg.rate_range[0].max(0.5).min(self.cfg.rate_range[1]));
        self.inst.configure_scan(&s)?;
        let obs = self.measure()?;
        self.last_obs = obs;
        Ok(Value::Box(obs.to_vec()))
    }

    fn step(&mut self, action: &Value, info: &mut Info) -> Result<TaskStep> {
        let a = action
            .as_box()
            .ok_or_else(|| EnvError::action("action", "expected a Box value"))?;
        let (p, log_i, rate) = (f64::from(a[0]), f64::from(a[1]), f64::from(a[2]));
        let i = 10f64.powf(log_i);
        self.inst.set_feedback_gains(p, i)?;
        self.inst.configure_scan(&self.settings(rate))?;
        let obs = self.measure()?;
        self.last_obs = obs;
        let c = &self.cfg;
        let (err, diff) = (
            f64::from(obs[3]).min(c.error_cap),
            f64::from(obs[4]).min(c.error_cap),
        );
        let success = f64::from(obs[3]) < c.success_error && rate >= c.success_rate;
        let mut reward = -(err + diff) - c.time_weight / rate;
        if success {
            reward += c.success_bonus;
        }
        // Ground truth for analysis: stability of the discrete loop at the simulator's 2 kHz.
        let t = 1.0 / 2000.0;
        info.insert(
            "stable".into(),
            InfoValue::Bool(p < 1.0 && i * t > 0.0 && i * t < 2.0 * (1.0 - p)),
        );
        info.insert("success".into(), InfoValue::Bool(success));
        Ok(TaskStep {
            obs: Value::Box(obs.to_vec()),
            reward,
            terminated: success,
            success,
        })
    }

    fn render(&self) -> RgbImage {
        RgbImage::from_grey(&self.last_height, self.cfg.lines, self.cfg.cols)
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        let o = obs.as_box().unwrap_or(&[0.0; 7]);
        let c = &self.cfg;
        let now = [f64::from(o[1]), f64::from(o[2]).max(1e-3).log10()];
        let cost = f64::from(o[3]) + f64::from(o[4]) + c.time_weight / f64::from(o[2]).max(1e-3);
        let s = &mut self.search;
        match s.best {
            Some((best, _)) if cost >= best => {
                // Worse: back to the best setting, try the other direction or coordinate.
                s.dir = -s.dir;
                s.flips += 1;
                if s.flips >= 2 {
                    s.flips = 0;
                    s.coord = 1 - s.coord;
                    if s.coord == 0 {
                        s.step *= 0.5;
                    }
                }
            }
            _ => {
                s.best = Some((cost, now));
                s.flips = 0;
            }
        }
        let mut next = s.best.map_or(now, |b| b.1);
        next[s.coord] += s.dir * s.step;
        Value::Box(vec![
            0.2f32.min(c.p_max as f32),
            next[0].clamp(c.log_i_range[0], c.log_i_range[1]) as f32,
            10f64.powf(next[1]).clamp(c.rate_range[0], c.rate_range[1]) as f32,
        ])
    }
}
