//! `scopegym/PfmSpectroscopyExplore-v1`: choose where to measure switching-spectroscopy loops
//! on a ferroelectric film to find the largest loop within a budget of measurements (anchor:
//! GPax/AEcroscopy active learning over BEPS maps).
//!
//! The area is divided into a `grid × grid` lattice of measurement points. Each step measures
//! one loop (the triangle waveform 0 → +A → 0 → -A → 0 V) at the chosen point and summarizes
//! it by its normalized loop area `|∮ R dV| / ((V_max - V_min)·R_span)` in `[0, 1]` (`R_span`
//! the response range: 2 for the simulator's mean polarization, the data range for recorded
//! loops), computed from the measured loop only.
//!
//! - **Observation** (Dict): `image`, a PFM image of the area taken at reset (`(pixels,
//!   pixels)`, float in `[0, 1]`, up domains bright; in real-data mode the recorded response at
//!   the first bias point, min-max scaled); `loops`, the normalized loop area measured at each
//!   grid point (`(grid, grid)`, 0 where unmeasured); `measured`, the mask of measured points
//!   (`(grid, grid)`, uint8 0/1).
//! - **Action** (Discrete, `grid²`): the point `row · grid + column`.
//! - **Reward**: regret style, `reward_scale · (best_t - best_{t-1})` with `best_t` the
//!   largest loop area measured so far (`best_0 = 0`): the return is `reward_scale` times the
//!   best loop found.
//! - **Episode**: `budget` measurements (truncation); no terminal state.
//! - **Info** (never in the observation): `area` and the coercive biases `v_up`, `v_down` of
//!   the loop just measured (each left out when the loop does not switch), `best`, and where the source knows it `true_best` (the largest
//!   loop area over the grid: the simulator measures every point on a fresh copy of the
//!   episode's film at reset; recorded data are read off) and `regret = true_best - best`.
//! - **Real data**: `real_data = "<path>"` serves the loops of an NSID HDF5 BEPS file
//!   (`Channel_000/generic/generic`, shape `(X, Y, bias)`, bias in `Channel_000/generic/Voltage`)
//!   instead of simulating them; the grid points sample the recorded pixels.
//! - **Heuristic**: coarse to fine: first the points of a coarse lattice (every
//!   `ceil(grid/3)`-th point), then the unmeasured point nearest the best loop found so far.

use crate::env::{Info, InfoValue, RgbImage, Task, TaskStep};
use crate::error::{EnvError, Result};
use crate::level::{Difficulty, Split};
use crate::space::{Dtype, Space, Value};
use crate::tasks::{NewEpisode, TaskConfig, config_from_toml};
use scopegym_physics::instrument::{PointSpectroscopy, ScanSettings, SpmInstrument, SpmMode};
use scopegym_physics::param::Param;
use scopegym_physics::spm::ferro::{loop_coercive, triangle_waveform};
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
    /// The simulated instrument (PFM mode; 64² sample grid over 1 µm).
    pub instrument: SpmConfig,
    /// Recorded loops to serve instead of simulating (path of an NSID HDF5 BEPS file).
    pub real_data: Option<String>,
    /// Measurement points per side. Default 6.
    pub grid: usize,
    /// Pixels per side of the image. Default 16.
    pub pixels: usize,
    /// Side of the explored (square) area, m (simulator). Default 1 µm.
    pub field: f64,
    /// Measurements per episode. Default 10.
    pub budget: usize,
    /// Amplitude of the simulated triangle waveform, V. Default 8.5.
    pub loop_amplitude: f64,
    /// Points of the simulated waveform. Default 24.
    pub loop_points: usize,
    /// Reward per unit of normalized loop area gained. Default 10.
    pub reward_scale: f64,
    /// Whether to compute `true_best` at reset (simulator: one extra loop per grid point).
    /// Default true.
    pub truth: bool,
}

impl Default for Config {
    fn default() -> Self {
        let mut instrument = SpmConfig::default().without_scanner_imperfections();
        instrument.mode = SpmMode::Pfm;
        instrument.sample.size = Param::fixed(1e-6);
        instrument.sample.pixels = 64;
        instrument.sample.crash_threshold = Param::fixed(1e-6);
        instrument.scan.pixels = [16, 16];
        instrument.scan.size = Param::fixed(1e-6);
        instrument.scan.line_rate = Param::fixed(2.0);
        instrument.surface.kind = SurfaceKind::Flat;
        instrument.tip.wear_rate = Param::fixed(0.0);
        instrument.pfm.point_time = Param::fixed(0.5e-3);
        instrument.pfm.domain_size = Param::Uniform(200e-9, 400e-9, Default::default());
        instrument.pfm.up_fraction = Param::Uniform(0.3, 0.7, Default::default());
        instrument.ferroelectric.random_field = Param::Uniform(0.2, 0.4, Default::default());
        // Disorder correlated over ~150 nm (10 cells), a little less than the grid spacing, so
        // loop properties vary smoothly and the neighbourhood of a good loop is worth probing.
        instrument.ferroelectric.random_field_correlation = Param::fixed(10.0);
        instrument.ferroelectric.pinning_fraction = Param::Uniform(0.02, 0.1, Default::default());
        Self {
            difficulty: Difficulty::Medium,
            split: Split::Train,
            instrument,
            real_data: None,
            grid: 6,
            pixels: 16,
            field: 1e-6,
            budget: 10,
            loop_amplitude: 8.5,
            loop_points: 24,
            reward_scale: 10.0,
            truth: true,
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
        if !(2..=64).contains(&self.grid) {
            return bad("grid", format!("must be 2..=64, got {}", self.grid));
        }
        if !(4..=256).contains(&self.pixels) {
            return bad("pixels", format!("must be 4..=256, got {}", self.pixels));
        }
        if !(self.field > 0.0 && self.field <= self.instrument.sample.size.get()) {
            return bad(
                "field",
                format!("must be in (0, instrument.sample.size], got {}", self.field),
            );
        }
        if self.budget == 0 {
            return bad("budget", "must be at least 1".into());
        }
        let a = self.loop_amplitude;
        if !(a > 0.0 && a <= self.instrument.max_bias.get()) {
            return bad(
                "loop_amplitude",
                format!("must be in (0, instrument.max_bias], got {a}"),
            );
        }
        if !(4..=1000).contains(&self.loop_points) {
            return bad(
                "loop_points",
                format!("must be 4..=1000, got {}", self.loop_points),
            );
        }
        if !(self.reward_scale.is_finite() && self.reward_scale > 0.0) {
            return bad(
                "reward_scale",
                format!("must be finite and positive, got {}", self.reward_scale),
            );
        }
        Ok(())
    }
}

/// Normalized loop area `|∮ R dV| / ((V_max - V_min)·span)` of a closed loop (shoelace), in
/// `[0, 1]` for responses within a range `span`; 0 for degenerate input.
pub fn loop_area(bias: &[f64], response: &[f64], span: f64) -> f64 {
    let n = bias.len().min(response.len());
    if n < 3 {
        return 0.0;
    }
    let mut twice = 0.0;
    for k in 0..n {
        let l = (k + 1) % n;
        twice += bias[k] * response[l] - bias[l] * response[k];
    }
    let (lo, hi) = bias[..n]
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let norm = (hi - lo) * span;
    let a = 0.5 * twice.abs() / norm;
    if a.is_finite() {
        a.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// Loops recorded on a real instrument (BEPS).
#[derive(Debug, Clone)]
pub struct RecordedLoops {
    /// `[nx, ny]` pixels.
    pub shape: [usize; 2],
    /// The bias waveform, V.
    pub bias: Vec<f64>,
    /// Responses, `(x, y, bias)` row-major.
    pub data: Vec<f64>,
    /// Response range over the whole file (for normalization).
    pub span: f64,
}

impl RecordedLoops {
    /// Reads `Channel_000/generic/generic` and its `Voltage` scale from an NSID HDF5 file.
    pub fn open(path: &str) -> Result<Self> {
        let err = |e: hdf5::Error| EnvError::config("real_data", format!("{path}: {e}"));
        let file = hdf5::File::open(path).map_err(err)?;
        let ds = file.dataset("Channel_000/generic/generic").map_err(err)?;
        let shape = ds.shape();
        if shape.len() != 3 || shape.contains(&0) {
            return Err(EnvError::config(
                "real_data",
                format!("{path}: expected a 3-D (x, y, bias) dataset, got shape {shape:?}"),
            ));
        }
        let data: Vec<f64> = ds.read_raw().map_err(err)?;
        let bias: Vec<f64> = file
            .dataset("Channel_000/generic/Voltage")
            .and_then(|d| d.read_raw())
            .map_err(err)?;
        if bias.len() != shape[2] || data.len() != shape.iter().product::<usize>() {
            return Err(EnvError::config(
                "real_data",
                format!("{path}: bias axis of {} for shape {shape:?}", bias.len()),
            ));
        }
        if data.iter().chain(&bias).any(|v| !v.is_finite()) {
            return Err(EnvError::config(
                "real_data",
                format!("{path}: non-finite values"),
            ));
        }
        let (lo, hi) = data
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        Ok(Self {
            shape: [shape[0], shape[1]],
            bias,
            data,
            span: (hi - lo).max(1e-30),
        })
    }

    /// The loop at pixel `(x, y)`.
    pub fn loop_at(&self, x: usize, y: usize) -> &[f64] {
        let m = self.bias.len();
        let k = (x * self.shape[1] + y) * m;
        &self.data[k..k + m]
    }
}

/// Where loops come from.
#[derive(Debug)]
enum Source<I> {
    Instrument(I),
    Recorded(RecordedLoops),
}

/// Ground truth of loops where the instrument can tell it (simulators): the normalized loop
/// area at each lab position, measured on a fresh copy of the current episode's sample.
pub trait LoopTruth {
    /// Loop areas at `positions` (lab, m) under `waveform` (V), or `None` when unknown.
    fn true_loop_areas(&self, positions: &[[f64; 2]], waveform: &[f64]) -> Option<Vec<f64>>;
}

impl LoopTruth for SpmSimulator {
    fn true_loop_areas(&self, positions: &[[f64; 2]], waveform: &[f64]) -> Option<Vec<f64>> {
        let mut copy = SpmSimulator::new(self.template().clone(), self.seed()).ok()?;
        positions
            .iter()
            .map(|&p| {
                copy.point_spectroscopy(p, waveform)
                    .ok()
                    .map(|r| loop_area(waveform, &r, 2.0))
            })
            .collect()
    }
}

/// The task over any PFM instrument `I` with point spectroscopy, or over recorded loops.
#[derive(Debug)]
pub struct PfmSpectroscopyExplore<I> {
    cfg: Config,
    source: Source<I>,
    image: Vec<f32>,
    areas: Vec<f32>,
    measured: Vec<bool>,
    best: f64,
    true_best: Option<f64>,
}

impl PfmSpectroscopyExplore<SpmSimulator> {
    /// The task on the simulator, or on recorded loops when `real_data` is set, from an optional
    /// TOML config.
    pub fn from_config(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Config = config_from_toml(config)?;
        cfg.validate()?;
        let source = match &cfg.real_data {
            Some(path) => Source::Recorded(RecordedLoops::open(path)?),
            None => Source::Instrument(SpmSimulator::new(cfg.instrument.clone(), 0)?),
        };
        Ok(Self::with_source(cfg, source))
    }
}

impl<I: SpmInstrument + PointSpectroscopy + LoopTruth + NewEpisode + Send>
    PfmSpectroscopyExplore<I>
{
    /// The task on `inst` with `cfg` (`cfg.real_data` is ignored).
    pub fn new(cfg: Config, mut inst: I) -> Self {
        inst.set_region(cfg.split.region());
        Self::with_source(cfg, Source::Instrument(inst))
    }

    fn with_source(cfg: Config, source: Source<I>) -> Self {
        let (g, p) = (cfg.grid, cfg.pixels);
        Self {
            cfg,
            source,
            image: vec![0.0; p * p],
            areas: vec![0.0; g * g],
            measured: vec![false; g * g],
            best: 0.0,
            true_best: None,
        }
    }

    fn waveform(&self) -> Vec<f64> {
        triangle_waveform(self.cfg.loop_amplitude, self.cfg.loop_points)
    }

    /// Lab position of grid point `k`, m.
    fn position(&self, k: usize) -> [f64; 2] {
        let g = self.cfg.grid;
        let at = |i: usize| ((i as f64 + 0.5) / g as f64 - 0.5) * self.cfg.field;
        [at(k % g), at(k / g)]
    }

    /// Recorded pixel `(x, y)` of grid point `k`.
    fn pixel(shape: [usize; 2], g: usize, k: usize) -> (usize, usize) {
        let at =
            |i: usize, n: usize| (((i as f64 + 0.5) * n as f64 / g as f64) as usize).min(n - 1);
        (at(k % g, shape[0]), at(k / g, shape[1]))
    }

    /// Measures grid point `k`: (bias, response, area).
    fn measure(&mut self, k: usize) -> Result<(Vec<f64>, Vec<f64>, f64)> {
        let g = self.cfg.grid;
        match &mut self.source {
            Source::Instrument(_) => {
                let w = self.waveform();
                let pos = self.position(k);
                let Source::Instrument(inst) = &mut self.source else {
                    unreachable!("matched above")
                };
                let r = inst.point_spectroscopy(pos, &w)?;
                let a = loop_area(&w, &r, 2.0);
                Ok((w, r, a))
            }
            Source::Recorded(rec) => {
                let (x, y) = Self::pixel(rec.shape, g, k);
                let r = rec.loop_at(x, y).to_vec();
                let a = loop_area(&rec.bias, &r, rec.span);
                Ok((rec.bias.clone(), r, a))
            }
        }
    }

    fn obs(&self) -> Value {
        Value::Dict(vec![
            ("image".into(), Value::Box(self.image.clone())),
            ("loops".into(), Value::Box(self.areas.clone())),
            (
                "measured".into(),
                Value::Box(
                    self.measured
                        .iter()
                        .map(|&m| f32::from(u8::from(m)))
                        .collect(),
                ),
            ),
        ])
    }
}

impl<I: SpmInstrument + PointSpectroscopy + LoopTruth + NewEpisode + Send> Task
    for PfmSpectroscopyExplore<I>
{
    fn observation_space(&self) -> Space {
        let (g, p) = (self.cfg.grid, self.cfg.pixels);
        Space::Dict(vec![
            ("image".into(), Space::uniform_box(&[p, p], 0.0, 1.0)),
            ("loops".into(), Space::uniform_box(&[g, g], 0.0, 1.0)),
            (
                "measured".into(),
                Space::Box {
                    shape: vec![g, g],
                    low: vec![0.0; g * g],
                    high: vec![1.0; g * g],
                    dtype: Dtype::U8,
                },
            ),
        ])
    }

    fn action_space(&self) -> Space {
        Space::Discrete {
            n: (self.cfg.grid * self.cfg.grid) as i64,
            start: 0,
        }
    }

    fn max_episode_steps(&self) -> usize {
        self.cfg.budget
    }

    fn reset(&mut self, seed: u64, info: &mut Info) -> Result<Value> {
        let (g, p) = (self.cfg.grid, self.cfg.pixels);
        self.areas = vec![0.0; g * g];
        self.measured = vec![false; g * g];
        self.best = 0.0;
        self.true_best = None;
        let positions: Vec<[f64; 2]> = (0..g * g).map(|k| self.position(k)).collect();
        let waveform = self.waveform();
        let field = self.cfg.field;
        let truth = self.cfg.truth;
        match &mut self.source {
            Source::Instrument(inst) => {
                inst.new_episode(seed, info)?;
                if truth {
                    self.true_best = inst
                        .true_loop_areas(&positions, &waveform)
                        .map(|v| v.into_iter().fold(0.0, f64::max));
                }
                inst.configure_scan(&ScanSettings {
                    rows: p,
                    cols: p,
                    pixel_size: field / p as f64,
                    dwell_time: 1.0 / (2.0 * 2.0 * p as f64),
                    flyback_time: 0.0,
                    center: [0.0, 0.0],
                })?;
                let f = inst.acquire_frame()?;
                let ph = f
                    .channel("phase")
                    .ok_or_else(|| EnvError::config("instrument", "no phase channel (PFM mode)"))?;
                self.image = ph
                    .image
                    .iter()
                    .map(|&d| (0.5 * (1.0 + f64::from(d).to_radians().cos())) as f32)
                    .collect();
            }
            Source::Recorded(rec) => {
                // Recorded loops are fixed: the seed only feeds the episode bookkeeping.
                info.insert("real_data".into(), InfoValue::Bool(true));
                let [nx, ny] = rec.shape;
                let first: Vec<f64> = (0..p * p)
                    .map(|k| {
                        let (i, j) = (k / p, k % p);
                        let x = ((j as f64 + 0.5) * nx as f64 / p as f64) as usize;
                        let y = ((i as f64 + 0.5) * ny as f64 / p as f64) as usize;
                        rec.loop_at(x.min(nx - 1), y.min(ny - 1))[0]
                    })
                    .collect();
                let (lo, hi) = first
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let span = if hi > lo { hi - lo } else { 1.0 };
                self.image = first.iter().map(|v| ((v - lo) / span) as f32).collect();
                if truth {
                    self.true_best = Some((0..g * g).fold(0.0, |m, k| {
                        let (x, y) = Self::pixel(rec.shape, g, k);
                        m.max(loop_area(&rec.bias, rec.loop_at(x, y), rec.span))
                    }));
                }
            }
        }
        if let Some(t) = self.true_best {
            info.insert("true_best".into(), InfoValue::F64(t));
        }
        Ok(self.obs())
    }

    fn step(&mut self, action: &Value, info: &mut Info) -> Result<TaskStep> {
        let n = (self.cfg.grid * self.cfg.grid) as i64;
        let k = action
            .as_discrete()
            .filter(|k| (0..n).contains(k))
            .ok_or_else(|| EnvError::action("action", format!("expected a point in 0..{n}")))?
            as usize;
        let (bias, resp, area) = self.measure(k)?;
        self.areas[k] = area as f32;
        self.measured[k] = true;
        let before = self.best;
        self.best = self.best.max(area);
        let (up, down) = loop_coercive(&bias, &resp);
        info.insert("area".into(), InfoValue::F64(area));
        // A loop that does not switch has no coercive bias: the key is left out (NaN would
        // make equal infos compare unequal).
        if let Some(up) = up {
            info.insert("v_up".into(), InfoValue::F64(up));
        }
        if let Some(down) = down {
            info.insert("v_down".into(), InfoValue::F64(down));
        }
        info.insert("best".into(), InfoValue::F64(self.best));
        if let Some(t) = self.true_best {
            info.insert("true_best".into(), InfoValue::F64(t));
            info.insert("regret".into(), InfoValue::F64((t - self.best).max(0.0)));
        }
        Ok(TaskStep {
            obs: self.obs(),
            reward: self.cfg.reward_scale * (self.best - before),
            terminated: false,
            success: false,
        })
    }

    fn render(&self) -> RgbImage {
        // The image, with measured points tinted by their loop area (red = large).
        let p = self.cfg.pixels;
        let g = self.cfg.grid;
        let mut img = RgbImage::from_grey(&self.image, p, p);
        for k in 0..g * g {
            if !self.measured[k] {
                continue;
            }
            let (i, j) = ((k / g) * p / g + p / (2 * g), (k % g) * p / g + p / (2 * g));
            let o = 3 * (i.min(p - 1) * p + j.min(p - 1));
            let a = (self.areas[k].clamp(0.0, 1.0) * 255.0) as u8;
            img.data[o..o + 3].copy_from_slice(&[a.max(64), 0, 255 - a]);
        }
        img
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        let g = self.cfg.grid;
        let (Some(loops), Some(measured)) = (
            obs.get("loops").and_then(Value::as_box),
            obs.get("measured").and_then(Value::as_box),
        ) else {
            return Value::Discrete(0);
        };
        if loops.len() != g * g || measured.len() != g * g {
            return Value::Discrete(0);
        }
        // Coarse lattice first.
        let stride = g.div_ceil(3).max(1);
        let off = stride / 2;
        for i in (off..g).step_by(stride) {
            for j in (off..g).step_by(stride) {
                if measured[i * g + j] < 0.5 {
                    return Value::Discrete((i * g + j) as i64);
                }
            }
        }
        // Then the unmeasured point nearest the best one.
        let best = (0..g * g)
            .filter(|&k| measured[k] > 0.5)
            .max_by(|&a, &b| loops[a].total_cmp(&loops[b]).then(b.cmp(&a)))
            .unwrap_or(0);
        let (bi, bj) = ((best / g) as i64, (best % g) as i64);
        let next = (0..g * g)
            .filter(|&k| measured[k] < 0.5)
            .min_by_key(|&k| {
                let (i, j) = ((k / g) as i64, (k % g) as i64);
                ((i - bi).pow(2) + (j - bj).pow(2), k)
            })
            .unwrap_or(best);
        Value::Discrete(next as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Env, TaskEnv};
    use std::path::{Path, PathBuf};

    fn data_file() -> Option<PathBuf> {
        let dir = std::env::var_os("SCOPEGYM_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
        let f = dir.join("beps_pto_50x50.h5");
        if f.is_file() {
            Some(f)
        } else {
            eprintln!(
                "SKIPPED: real BEPS data {} not found (set SCOPEGYM_DATA_DIR)",
                f.display()
            );
            None
        }
    }

    #[test]
    fn loop_area_of_a_square_loop() {
        let v = [0.0, 1.0, 1.0, 0.0];
        let r = [-1.0, -1.0, 1.0, 1.0];
        assert!((loop_area(&v, &r, 2.0) - 1.0).abs() < 1e-12);
        assert_eq!(loop_area(&v[..2], &r[..2], 2.0), 0.0);
    }

    #[test]
    fn simulated_loops_switch_and_regret_is_reported() {
        let mut e = TaskEnv::new("t", PfmSpectroscopyExplore::from_config(None).unwrap());
        let (_, info) = e.reset(Some(3)).unwrap();
        let Some(InfoValue::F64(t)) = info.get("true_best") else {
            panic!("no true_best")
        };
        let mut areas = Vec::new();
        for k in 0..6 {
            let s = e.step(&Value::Discrete(k * 7)).unwrap();
            let Some(InfoValue::F64(a)) = s.info.get("area") else {
                panic!()
            };
            areas.push(*a);
            assert!(matches!(s.info.get("regret"), Some(InfoValue::F64(r)) if *r >= 0.0));
        }
        println!("true best {t:.3}, areas {areas:?}");
        assert!(*t > 0.05 && areas.iter().all(|a| (0.0..=1.0).contains(a)));
        assert!(areas.iter().any(|&a| a > 0.05), "loops should open");
    }

    #[test]
    fn real_data_mode_serves_recorded_loops() {
        let Some(f) = data_file() else { return };
        let cfg: toml::Value =
            toml::from_str(&format!("real_data = {:?}", f.display().to_string())).unwrap();
        let mut e = TaskEnv::new(
            "t",
            PfmSpectroscopyExplore::from_config(Some(&cfg)).unwrap(),
        );
        let o = e.reset(Some(0)).unwrap().0;
        assert!(e.observation_space().contains(&o));
        let mut ret = [0.0; 2];
        for (h, r) in ret.iter_mut().enumerate() {
            for seed in 0..5u64 {
                let (mut obs, info) = e.reset(Some(seed)).unwrap();
                assert!(matches!(info.get("true_best"), Some(InfoValue::F64(t)) if *t > 0.0));
                let mut rng = crate::rng::seeded(seed);
                loop {
                    let a = if h == 0 {
                        e.heuristic_action(&obs)
                    } else {
                        e.action_space().sample(&mut rng)
                    };
                    let s = e.step(&a).unwrap();
                    *r += s.reward / 5.0;
                    obs = s.obs;
                    if s.truncated {
                        break;
                    }
                }
            }
        }
        println!("real data: heuristic {:.3}, random {:.3}", ret[0], ret[1]);
        let bad: toml::Value = toml::from_str("real_data = \"/nonexistent.h5\"").unwrap();
        let err = PfmSpectroscopyExplore::from_config(Some(&bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("real_data"), "{err}");
    }
}
