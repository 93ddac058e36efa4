//! `scopegym/SpmTipConditioning-v1`: condition an STM tip with bias pulses and dips until it
//! images adatoms sharply (anchor: DeepSPM).
//!
//! The instrument images Ag(111) with Ag adatoms at constant current. Episodes start from a
//! randomized tip (by default a blunt apex, often double and often carrying an adsorbate). Each
//! step applies one action and scans one small frame (`pixels²`) through the instrument traits
//! only.
//!
//! - **Observation** (Box, `pixels × pixels`): the trace height, each line levelled by its
//!   median, in units of `height_unit` (default 0.1 nm, about one adatom), clipped to
//!   `±obs_clip`.
//! - **Action** (Discrete(14)): 0 stall (rescan as is); 1–6 the six DeepSPM pulses (±2.5, ±4,
//!   ±8 V, 200 ms) and 7–12 the six DeepSPM dips (0.8–5 nm at 20 mV, 200 ms), in the order of
//!   `Conditioning::deepspm_actions()`; 13 move the scan to a new random area.
//! - **Reward**: `-1` per step, `-wear_weight · s` for a conditioning action of strength `s ∈
//!   (0, 2]` (`Conditioning::strength`: stronger pulses and deeper dips wear the tip more), and
//!   `+success_bonus` when the tip is judged good.
//! - **Success** (terminates): the tip is judged good *from the images*, so the judgement works
//!   on a real instrument: the frame taken after a stall or a move (no conditioning in between)
//!   and the frame before it both look good: `feature_sharpness ≥ sharp_threshold` and pixel
//!   roughness (r.m.s. of the frame minus its 3×3 median) `≤ noise_threshold`. Calibrated on
//!   the simulator's defaults (32² frames of 0.15 nm pixels over adatoms): clean single tips of
//!   0.4–0.55 nm score 0.57–0.60 per pixel on fresh areas and ≈ 0.49–0.58 along episodes, 1 nm
//!   tips 0.55–0.57, 2 nm 0.47–0.52, 4 nm 0.37–0.48, shallow double tips 0.54–0.58; an adsorbate
//!   raises the roughness from ≈ 0.04 to ≈ 0.2. The area imaged changes the statistic about as
//!   much as a 1 nm change of the tip, so the judgement is a noisy proxy of `tip_good` (compare
//!   `judged_good` with `tip_good` in `info`).
//! - **Info** (never in the observation): `tip_good` (`tip_state().is_good`), `tip_quality`,
//!   `tip_radius` (effective radius, m), `tip_double`, `tip_adsorbate`, `sharpness` and
//!   `blob_width` (observed statistics, see [`FrameStats`]), `judged_good`, and the randomized scenario values (`param.*`).
//! - **Heuristic**: the operator's rule of thumb on the image: looks good → stall (rescan to
//!   confirm); nothing resolved (3×3-median range below 0.3 units) → move to a new area; noisy
//!   or streaky (an adsorbate) → a −4 V pulse; otherwise blurred or doubled → a 2 nm dip.

use crate::env::{Info, InfoValue, RgbImage, Task, TaskStep};
use crate::error::{EnvError, Result};
use crate::level::{Difficulty, Split};
use crate::space::{Space, Value};
use crate::tasks::{NewEpisode, TaskConfig, check_nonnegative, check_positive, config_from_toml};
use rand::Rng;
use scopegym_physics::instrument::{ScanSettings, SpmInstrument, SpmMode, TipConditioning};
use scopegym_physics::param::Param;
use scopegym_physics::rng::{SimRng, seeded};
use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
use scopegym_physics::spm::surface::SurfaceKind;
use scopegym_physics::spm::tip::{Conditioning, feature_sharpness, median_filter_3x3};
use serde::{Deserialize, Serialize};

/// Number of actions: stall, 6 pulses, 6 dips, move.
pub const N_ACTIONS: usize = 14;
/// The stall (rescan) action.
pub const STALL: i64 = 0;
/// The move-to-a-new-area action.
pub const MOVE: i64 = 13;
/// The heuristic's pulse (−4 V, index 4).
const HEURISTIC_PULSE: i64 = 4;
/// The heuristic's dip (2 nm, index 10).
const HEURISTIC_DIP: i64 = 10;

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
    /// The simulated instrument (STM mode).
    pub instrument: SpmConfig,
    /// Pixels per side of a frame. Default 32.
    pub pixels: usize,
    /// Field of view, m. Default 4.8 nm.
    pub field: f64,
    /// Line rate, Hz. Default 10.
    pub line_rate: f64,
    /// Steps per episode. Default 40.
    pub max_steps: usize,
    /// Observation height unit, m. Default 0.1 nm.
    pub height_unit: f64,
    /// Observation clip, in height units. Default 10.
    pub obs_clip: f64,
    /// `feature_sharpness` (1/pixel) from which a frame counts as sharp. Default 0.53.
    pub sharp_threshold: f64,
    /// Largest pixel roughness (r.m.s. of the frame minus its 3×3 median, height units) of a
    /// sharp frame: above it the frame is noisy or streaky (an adsorbate). Default 0.1.
    pub noise_threshold: f64,
    /// Reward cost per unit action strength. Default 0.5.
    pub wear_weight: f64,
    /// Reward when the tip is judged good. Default 10.
    pub success_bonus: f64,
}

impl Default for Config {
    fn default() -> Self {
        let mut inst = SpmConfig {
            mode: SpmMode::Stm,
            ..SpmConfig::default()
        };
        inst.bias = Param::fixed(0.1);
        inst.sample.size = Param::fixed(8e-9);
        inst.sample.pixels = 100;
        inst.sample.crash_threshold = Param::fixed(0.5e-9);
        inst.scan.pixels = [32, 32];
        inst.scan.size = Param::fixed(4.8e-9);
        inst.scan.line_rate = Param::fixed(10.0);
        inst.surface.kind = SurfaceKind::Flat;
        inst.surface.roughness = Param::fixed(0.0);
        inst.adatoms.count = 14;
        inst.adatoms.min_separation = Param::fixed(1.2e-9);
        inst.adatoms.margin = Param::fixed(0.3e-9);
        let t = &mut inst.tip;
        t.initial_radius = Param::LogUniform(0.5e-9, 4e-9, Default::default());
        t.min_radius = Param::fixed(0.3e-9);
        t.good_radius = Param::fixed(0.6e-9);
        t.max_radius = Param::fixed(5e-9);
        t.initial_double_probability = Param::fixed(0.4);
        t.initial_adsorbate_probability = Param::fixed(0.4);
        t.wear_rate = Param::fixed(0.0);
        t.double_offset = Param::fixed(1e-9);
        t.double_dz = Param::fixed(0.04e-9);
        t.adsorbate_blur = Param::fixed(0.3e-9);
        t.adsorbate_noise = Param::fixed(4.0);
        t.adsorbate_glitch = Param::fixed(0.15);
        let f = &mut inst.feedback;
        f.p_gain = Param::fixed(0.1);
        f.i_gain = Param::fixed(300.0);
        f.z_speed_limit = Param::fixed(100e-9);
        let s = &mut inst.scanner;
        s.drift_initial = Param::fixed(0.05e-9 / 60.0);
        s.drift_settled = Param::fixed(0.01e-9 / 60.0);
        s.white_noise = Param::fixed(2e-12);
        s.pink_noise = Param::fixed(3e-12);
        s.line_offset = Param::fixed(2e-12);
        Self {
            difficulty: Difficulty::Medium,
            split: Split::Train,
            instrument: inst,
            pixels: 32,
            field: 4.8e-9,
            line_rate: 10.0,
            max_steps: 40,
            height_unit: 0.1e-9,
            obs_clip: 10.0,
            sharp_threshold: 0.53,
            noise_threshold: 0.1,
            wear_weight: 0.5,
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
        if self.instrument.mode != SpmMode::Stm {
            return bad("instrument.mode", "must be \"stm\"".into());
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
        if !(self.line_rate > 0.0 && self.line_rate <= 1000.0) {
            return bad(
                "line_rate",
                format!("must be in (0, 1000] Hz, got {}", self.line_rate),
            );
        }
        if self.max_steps == 0 {
            return bad("max_steps", "must be at least 1".into());
        }
        check_positive(&[
            ("height_unit", self.height_unit),
            ("obs_clip", self.obs_clip),
            ("sharp_threshold", self.sharp_threshold),
            ("noise_threshold", self.noise_threshold),
        ])?;
        check_nonnegative(&[
            ("wear_weight", self.wear_weight),
            ("success_bonus", self.success_bonus),
        ])?;
        Ok(())
    }
}

/// What the heuristic reads off an observed frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameStats {
    /// `feature_sharpness`, 1/pixel.
    pub sharpness: f64,
    /// Height range of the 3×3-median-filtered frame (features resolved above the noise), in
    /// height units.
    pub feature_range: f64,
    /// R.m.s. of the frame minus its 3×3 median (pixel noise and streaks), in height units.
    pub roughness: f64,
    /// Mean apparent diameter of the isolated blobs (adatoms) of the median-filtered frame,
    /// pixels: `2√(A/π)`, `A` the area above half the blob's peak; 0 without blobs.
    pub blob_width: f64,
}

/// Statistics of a levelled `n × n` frame (row-major).
pub fn frame_stats(img: &[f32], n: usize) -> FrameStats {
    if n < 3 || img.len() != n * n {
        return FrameStats {
            sharpness: 0.0,
            feature_range: 0.0,
            roughness: 0.0,
            blob_width: 0.0,
        };
    }
    let view = ndarray::ArrayView2::from_shape((n, n), img).ok();
    let sharpness = view.map_or(0.0, feature_sharpness);
    let mut med = vec![0.0f32; n * n];
    median_filter_3x3(img, n, &mut med);
    let mut lo = f64::MAX;
    let mut hi = f64::MIN;
    let mut sq = 0.0;
    for (&v, &m) in img.iter().zip(&med) {
        let m = f64::from(m);
        lo = lo.min(m);
        hi = hi.max(m);
        sq += (f64::from(v) - m).powi(2);
    }
    // Blobs: strict maxima over a 7×7 window, at least 0.4 units high and 3 pixels from the
    // edge; their area above half the peak within 5 pixels.
    let (mut widths, mut count) = (0.0, 0usize);
    for i in 3..n - 3 {
        for j in 3..n - 3 {
            let v = med[i * n + j];
            if v < 0.4 {
                continue;
            }
            let mut is_max = true;
            for di in i - 3..=i + 3 {
                for dj in j - 3..=j + 3 {
                    if (di, dj) != (i, j) && med[di * n + dj] >= v {
                        is_max = false;
                    }
                }
            }
            if !is_max {
                continue;
            }
            let mut area = 0usize;
            for di in i.saturating_sub(5)..(i + 6).min(n) {
                for dj in j.saturating_sub(5)..(j + 6).min(n) {
                    let r2 = (di as f64 - i as f64).powi(2) + (dj as f64 - j as f64).powi(2);
                    if r2 <= 25.0 && med[di * n + dj] >= 0.5 * v {
                        area += 1;
                    }
                }
            }
            widths += 2.0 * (area as f64 / std::f64::consts::PI).sqrt();
            count += 1;
        }
    }
    FrameStats {
        blob_width: if count > 0 {
            widths / count as f64
        } else {
            0.0
        },
        sharpness,
        feature_range: hi - lo,
        roughness: (sq / (n * n) as f64).sqrt(),
    }
}

/// The task over any STM instrument `I` that conditions its tip.
#[derive(Debug)]
pub struct SpmTipConditioning<I> {
    cfg: Config,
    inst: I,
    rng: SimRng,
    last: Vec<f32>,
    last_sharp: bool,
}

impl SpmTipConditioning<SpmSimulator> {
    /// The task on the simulator, from an optional TOML config.
    pub fn from_config(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Config = config_from_toml(config)?;
        cfg.validate()?;
        let inst = SpmSimulator::new(cfg.instrument.clone(), 0)?;
        Ok(Self::new(cfg, inst))
    }
}

/// Ground truth about the tip, for `info` (the simulator knows it, a real driver does not).
pub trait TipTruth {
    /// Records the true tip state in `info` (a real instrument records nothing).
    fn record_tip(&self, _info: &mut Info) {}
}

impl TipTruth for SpmSimulator {
    fn record_tip(&self, info: &mut Info) {
        let (tip, cfg) = (self.tip_state(), &self.config().tip);
        info.insert("tip_good".into(), InfoValue::Bool(tip.is_good(cfg)));
        info.insert("tip_quality".into(), InfoValue::F64(tip.quality(cfg)));
        info.insert("tip_radius".into(), InfoValue::F64(tip.effective_radius()));
        info.insert("tip_double".into(), InfoValue::Bool(tip.is_double()));
        info.insert("tip_adsorbate".into(), InfoValue::Bool(tip.has_adsorbate()));
    }
}

impl<I: SpmInstrument + TipConditioning + TipTruth + NewEpisode + Send> SpmTipConditioning<I> {
    /// The task on `inst` with `cfg`.
    pub fn new(cfg: Config, mut inst: I) -> Self {
        inst.set_region(cfg.split.region());
        Self {
            last: vec![0.0; cfg.pixels * cfg.pixels],
            cfg,
            inst,
            rng: seeded(0),
            last_sharp: false,
        }
    }

    fn settings(&self, center: [f64; 2]) -> ScanSettings {
        let n = self.cfg.pixels;
        ScanSettings {
            rows: n,
            cols: n,
            pixel_size: self.cfg.field / n as f64,
            dwell_time: 1.0 / (2.0 * self.cfg.line_rate * n as f64),
            flyback_time: 0.0,
            center,
        }
    }

    /// Scans a frame into `self.last` (levelled, in height units, clipped).
    fn scan(&mut self) -> Result<()> {
        let f = self.inst.acquire_frame()?;
        let h = f
            .channel("height")
            .ok_or_else(|| EnvError::config("instrument", "no height channel"))?;
        let unit = self.cfg.height_unit;
        let clip = self.cfg.obs_clip as f32;
        self.last.clear();
        let mut buf = Vec::new();
        for row in h.image.rows() {
            buf.clear();
            buf.extend(row.iter().copied());
            buf.sort_by(f32::total_cmp);
            let med = buf.get(buf.len() / 2).copied().unwrap_or(0.0);
            for &v in row {
                let x = (f64::from(v - med) / unit) as f32;
                self.last.push(if x.is_finite() {
                    x.clamp(-clip, clip)
                } else {
                    0.0
                });
            }
        }
        Ok(())
    }

    /// Whether a frame looks like a good tip's: sharp and not noisy.
    fn looks_good(&self, st: &FrameStats) -> bool {
        st.sharpness >= self.cfg.sharp_threshold && st.roughness <= self.cfg.noise_threshold
    }

    fn new_area(&mut self) -> [f64; 2] {
        let lim = 0.5 * (self.cfg.instrument.sample.size.get() - self.cfg.field);
        [
            (2.0 * self.rng.random::<f64>() - 1.0) * lim,
            (2.0 * self.rng.random::<f64>() - 1.0) * lim,
        ]
    }
}

impl<I: SpmInstrument + TipConditioning + TipTruth + NewEpisode + Send> Task
    for SpmTipConditioning<I>
{
    fn observation_space(&self) -> Space {
        let c = self.cfg.obs_clip as f32;
        Space::uniform_box(&[self.cfg.pixels, self.cfg.pixels], -c, c)
    }

    fn action_space(&self) -> Space {
        Space::Discrete {
            n: N_ACTIONS as i64,
            start: 0,
        }
    }

    fn max_episode_steps(&self) -> usize {
        self.cfg.max_steps
    }

    fn reset(&mut self, seed: u64, info: &mut Info) -> Result<Value> {
        self.inst.new_episode(seed, info)?;
        self.rng = seeded(seed ^ 0x7469_7063_6f6e_6400);
        let c = self.new_area();
        self.inst.configure_scan(&self.settings(c))?;
        self.scan()?;
        let st = frame_stats(&self.last, self.cfg.pixels);
        self.last_sharp = self.looks_good(&st);
        info.insert("sharpness".into(), InfoValue::F64(st.sharpness));
        self.inst.record_tip(info);
        Ok(Value::Box(self.last.clone()))
    }

    fn step(&mut self, action: &Value, info: &mut Info) -> Result<TaskStep> {
        let a = action
            .as_discrete()
            .ok_or_else(|| EnvError::action("action", "expected a Discrete value"))?;
        let mut reward = -1.0;
        let touched = match a {
            STALL => false,
            MOVE => {
                let c = self.new_area();
                self.inst.configure_scan(&self.settings(c))?;
                false
            }
            k if (1..=12).contains(&k) => {
                let act = Conditioning::deepspm_actions()[(k - 1) as usize];
                reward -= self.cfg.wear_weight * act.strength()?;
                self.inst.condition_tip(&act)?;
                true
            }
            k => {
                return Err(EnvError::action(
                    "action",
                    format!("must be 0..{N_ACTIONS}, got {k}"),
                ));
            }
        };
        self.scan()?;
        let st = frame_stats(&self.last, self.cfg.pixels);
        let sharp = self.looks_good(&st);
        let judged_good = sharp && self.last_sharp && !touched;
        self.last_sharp = sharp;
        if judged_good {
            reward += self.cfg.success_bonus;
        }
        info.insert("sharpness".into(), InfoValue::F64(st.sharpness));
        info.insert("blob_width".into(), InfoValue::F64(st.blob_width));
        info.insert("judged_good".into(), InfoValue::Bool(judged_good));
        self.inst.record_tip(info);
        Ok(TaskStep {
            obs: Value::Box(self.last.clone()),
            reward,
            terminated: judged_good,
            success: judged_good,
        })
    }

    fn render(&self) -> RgbImage {
        RgbImage::from_grey(&self.last, self.cfg.pixels, self.cfg.pixels)
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        let n = self.cfg.pixels;
        let st = obs
            .as_box()
            .map_or_else(|| frame_stats(&[], n), |o| frame_stats(o, n));
        let a = if self.looks_good(&st) {
            STALL
        } else if st.feature_range < 0.3 {
            MOVE
        } else if st.roughness > self.cfg.noise_threshold {
            HEURISTIC_PULSE
        } else {
            HEURISTIC_DIP
        };
        Value::Discrete(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scopegym_physics::spm::tip::TipState;

    /// Calibration: sharpness and the heuristic's statistics for good and bad tips (printed), on
    /// the reset areas of seeds 0..6.
    #[test]
    fn sharpness_separates_good_from_bad_tips() {
        let cfg = Config::default();
        let mut task = SpmTipConditioning::from_config(None).unwrap();
        let tc = cfg.instrument.tip.clone();
        let tips: Vec<(&str, TipState, bool)> = vec![
            ("good 0.4", TipState::sharp(0.4e-9).unwrap(), true),
            ("good 0.55", TipState::sharp(0.55e-9).unwrap(), true),
            ("blunt 1", TipState::sharp(1e-9).unwrap(), false),
            ("blunt 2", TipState::sharp(2e-9).unwrap(), false),
            ("blunt 4", TipState::sharp(4e-9).unwrap(), false),
            (
                "double",
                TipState::sharp(0.4e-9)
                    .unwrap()
                    .with_second_apex(Some(scopegym_physics::spm::tip::SecondApex {
                        offset: [0.6e-9, 0.3e-9],
                        dz: 0.02e-9,
                    }))
                    .unwrap(),
                false,
            ),
            (
                "adsorbate",
                TipState::sharp(0.4e-9)
                    .unwrap()
                    .with_adsorbate(Some(scopegym_physics::spm::tip::Adsorbate::from_config(
                        &tc,
                    )))
                    .unwrap(),
                false,
            ),
        ];
        for (name, tip, good) in tips {
            let mut s = Vec::new();
            for seed in 0..6 {
                let mut info = Info::new();
                task.reset(seed, &mut info).unwrap();
                task.inst.set_tip_state(tip.clone()).unwrap();
                task.scan().unwrap();
                let st = frame_stats(&task.last, cfg.pixels);
                s.push((st.sharpness, st.blob_width, st.roughness));
            }
            println!("{name} ({good}): {s:.2?}");
            let mean_sharp = s.iter().map(|v| v.0).sum::<f64>() / s.len() as f64;
            let max_rough = s.iter().map(|v| v.2).fold(0.0, f64::max);
            let min_rough = s.iter().map(|v| v.2).fold(f64::MAX, f64::min);
            if good {
                assert!(mean_sharp >= cfg.sharp_threshold, "{name}: {mean_sharp}");
            }
            if name.starts_with("blunt 2") || name.starts_with("blunt 4") {
                assert!(mean_sharp < cfg.sharp_threshold, "{name}: {mean_sharp}");
            }
            if name == "adsorbate" {
                assert!(min_rough > cfg.noise_threshold, "{name}: {min_rough}");
            } else {
                assert!(max_rough < cfg.noise_threshold, "{name}: {max_rough}");
            }
        }
    }

    #[test]
    fn bad_config_names_the_field() {
        let v: toml::Value = toml::from_str("sharp_threshold = -1.0").unwrap();
        let e = SpmTipConditioning::from_config(Some(&v)).unwrap_err();
        assert!(e.to_string().contains("sharp_threshold"), "{e}");
    }
}
