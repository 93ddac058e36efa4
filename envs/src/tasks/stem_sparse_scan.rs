//! `scopegym/StemSparseScan-v1`: image a heterogeneous field by scanning only some of its tiles,
//! choosing each next tile from what has been measured so far (anchor: adaptive-scan RL, sparse
//! sampling in STEM to limit dose).
//!
//! The target field is `pixels × pixels` (default 64², 1 Å pixels: 6.4 nm of graphene with
//! amorphous carbon contamination patches and Si dopants, at a random rotation) divided into
//! tiles of `tile = [rows, cols]` pixels (default 8 × 16: 8 × 4 = 32 tiles). Each step scans one
//! tile on the instrument (`configure_scan` with the tile's centre, `acquire_frame`): every tile
//! has the same scan grid, so the simulator computes the probe kernel once and a step only
//! renders the tile. A scanned tile equals the crop of a full frame of the field (the kernel,
//! 16 × 16 pixels at 1 Å, fits a tile, and the frame margin covers it). This is why tiles are
//! 8 × 16 rather than 8 × 8: the simulator's frame renderer needs 16 pixels on one side, and a
//! smaller tile would truncate the probe's tails (the pixel size is 1 Å for the same reason: the
//! whole probe, out to 3λ/α ≈ 5 Å, must fit a tile).
//!
//! - **Observation** (Dict): `image`, the measured signal (`(pixels, pixels)`, detected
//!   electrons per 1000 incident, i.e. `1000 · counts / (I·t_dwell/e)`, the mean over the scans
//!   of a pixel, clipped to `[0, 1000]`, 0 where unmeasured); `mask`, the number of scans of each
//!   pixel (`(pixels, pixels)`, 0 = unmeasured, 1 after one scan, up to `budget`).
//! - **Action** (Discrete, number of tiles): the tile `row · tiles_per_row + column` to scan next.
//!   Scanning a tile again is allowed: the scans are averaged (less shot noise, more dose).
//! - **Reconstruction** (from the observation): measured pixels keep their mean counts; an
//!   unmeasured tile is predicted as the inverse-square-distance weighted mean of the measured
//!   tiles' mean counts (0 before any tile is measured).
//! - **Reward**: `reward_scale · G − dose_weight · D`, with `G = (E_before − E_after) / (N m²)`
//!   the estimated drop of the squared reconstruction error on the scanned tile, from counts
//!   only, with Poisson statistics (variance = mean): for a new tile with counts `y` and
//!   prediction `ŷ`, `E_before = Σ (y − ŷ)² − Σ y` (an unbiased estimate of `Σ (x − ŷ)²`, `x`
//!   the noiseless signal) and `E_after = Σ y` (the shot noise left); for a tile already scanned
//!   `k` times with mean `ȳ`, `E_before = Σ ȳ/k` and `E_after = Σ ȳ'/(k+1)`. `N` is the number of
//!   field pixels and `m` the mean counts of all measured pixels (so `G` is a relative MSE);
//!   `D` is the step's dose averaged over the field, e⁻/Å².
//! - **Termination**: the budget (`round(budget_fraction · tiles)` scans) is spent (terminal:
//!   no time limit is involved).
//! - **Info** (never in the observation): `recon_error`, the true relative squared error of the
//!   reconstruction `Σ (x − ŷ)² / Σ x²` over the field against the noiseless full frame (the
//!   simulator renders it at reset without exposing the specimen), `true_gain` (its drop in
//!   this step), `estimated_gain` (`G`), `dose` (field-averaged cumulative dose, e⁻/Å²),
//!   `new_tile` (whether the tile had not been scanned before), and the randomized scenario
//!   values (`param.*`).
//! - **Heuristic** (the expert's rule of thumb, from the observation): never rescan; scan the
//!   unmeasured tile with the largest expected surprise, scored as the pixel variance inside
//!   the measured tiles plus the spread of their means around the tile's prediction (both
//!   weighted as the prediction is, by inverse squared distance), plus the variance of all
//!   measured tile means times `1 − exp(−d/ℓ)` (`d` the distance to the nearest measured tile,
//!   `ℓ` two tiles): structured, heterogeneous neighbourhoods first, far-away ground next. The
//!   first tile is the central one.
//! - **Render**: the reconstruction (unscanned tiles tinted blue, showing their prediction)
//!   beside the noiseless field when the truth is known.

use crate::env::{Info, InfoValue, RgbImage, Task, TaskStep};
use crate::error::{EnvError, Result};
use crate::level::{Difficulty, Split};
use crate::space::{Space, Value};
use crate::tasks::{NewEpisode, TaskConfig, check_nonnegative, config_from_toml};
use scopegym_physics::constants::ELEMENTARY_CHARGE;
use scopegym_physics::instrument::{ScanSettings, StemInstrument};
use scopegym_physics::param::Param;
use scopegym_physics::stem::haadf::HaadfRenderer;
use scopegym_physics::stem::specimen::{ContaminationConfig, DopantConfig};
use scopegym_physics::stem::{StemConfig, StemSimulator};
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
    /// The simulated instrument. Default: 60 kV, 30 mrad, 100 pA; an 8 nm square of graphene at
    /// a random rotation with 6 Si dopants at random sites and amorphous carbon patches
    /// (coverage 10-35 %, radius 0.4-1 nm, 0.5-1.5 atoms/Å², i.e. about 0.5-1.5 nm of
    /// amorphous carbon); no drift or scan noise; no sputtering (the field's
    /// ground truth stays fixed; knock-on in graphene at 60 kV is negligible anyway). Its scan
    /// grid is replaced by the tile's ([`Config::instrument_config`]).
    pub instrument: StemConfig,
    /// Field side, pixels. Default 64.
    pub pixels: usize,
    /// Tile size `[rows, cols]`, pixels; must divide `pixels`. The simulator needs at least 8
    /// per side and 16 on one side. Default `[8, 16]`.
    pub tile: [usize; 2],
    /// Pixel size, m. Default 1 Å.
    pub pixel_size: f64,
    /// Dwell time per pixel, s. Default 8 µs (5000 e⁻ per pixel at 100 pA).
    pub dwell_time: f64,
    /// Fraction of the tiles that may be scanned (the budget, in scans). Default 0.25.
    pub budget_fraction: f64,
    /// Reward per unit of relative squared-error drop. Default 100.
    pub reward_scale: f64,
    /// Reward cost per e⁻/Å² of field-averaged dose. Default 1e-4.
    pub dose_weight: f64,
    /// Whether to render the noiseless field at reset for `recon_error` (simulator). Default true.
    pub truth: bool,
}

impl Default for Config {
    fn default() -> Self {
        let mut instrument = StemConfig::default().without_scan_distortions();
        let s = &mut instrument.specimen;
        s.rotation = Param::Uniform(0.0, std::f64::consts::FRAC_PI_3, Default::default());
        s.size = [Param::fixed(8e-9), Param::fixed(8e-9)];
        s.dopants = vec![DopantConfig {
            count: 6,
            placement: "random".into(),
            ..Default::default()
        }];
        s.contamination = Some(ContaminationConfig {
            coverage: Param::Uniform(0.1, 0.35, Default::default()),
            patch_radius: Param::Uniform(0.4e-9, 1e-9, Default::default()),
            density: Param::Uniform(0.5e20, 1.5e20, Default::default()),
            ..Default::default()
        });
        instrument.damage.sputtering = false;
        Self {
            difficulty: Difficulty::Medium,
            split: Split::Train,
            instrument,
            pixels: 64,
            tile: [8, 16],
            pixel_size: 1e-10,
            dwell_time: 8e-6,
            budget_fraction: 0.25,
            reward_scale: 100.0,
            dose_weight: 1e-4,
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
        if !(16..=512).contains(&self.pixels) {
            return bad("pixels", format!("must be 16..=512, got {}", self.pixels));
        }
        let [tr, tc] = self.tile;
        if tr < 8 || tc < 8 || tr.max(tc) < 16 {
            return bad(
                "tile",
                format!(
                    "each side must be ≥ 8 and one side ≥ 16, got {:?}",
                    self.tile
                ),
            );
        }
        if self.pixels % tr != 0 || self.pixels % tc != 0 {
            return bad(
                "tile",
                format!("must divide pixels ({}), got {:?}", self.pixels, self.tile),
            );
        }
        if !(self.pixel_size > 0.0 && self.pixel_size <= 1e-8) {
            return bad(
                "pixel_size",
                format!("must be in (0, 10 nm], got {} m", self.pixel_size),
            );
        }
        if !(self.dwell_time > 0.0 && self.dwell_time <= 1e-3) {
            return bad(
                "dwell_time",
                format!("must be in (0, 1 ms], got {} s", self.dwell_time),
            );
        }
        if !(self.budget_fraction > 0.0 && self.budget_fraction <= 4.0) {
            return bad(
                "budget_fraction",
                format!("must be in (0, 4], got {}", self.budget_fraction),
            );
        }
        check_nonnegative(&[
            ("reward_scale", self.reward_scale),
            ("dose_weight", self.dose_weight),
        ])?;
        Ok(())
    }

    /// The instrument config with its scan grid set to a tile (`tile`, `pixel_size`,
    /// `dwell_time`), so that resets keep the probe kernel the tiles use.
    pub fn instrument_config(&self) -> StemConfig {
        let mut c = self.instrument.clone();
        c.scan.pixels = self.tile;
        c.scan.pixel_size = Param::fixed(self.pixel_size);
        c.scan.dwell_time = Param::fixed(self.dwell_time);
        c.scan.dose = None;
        c
    }

    /// Tiles per column and per row of the field.
    pub fn tile_grid(&self) -> [usize; 2] {
        [self.pixels / self.tile[0], self.pixels / self.tile[1]]
    }

    /// The scan budget: `round(budget_fraction · tiles)`, at least 1.
    pub fn budget(&self) -> usize {
        let [a, b] = self.tile_grid();
        ((self.budget_fraction * (a * b) as f64).round() as usize).max(1)
    }
}

/// Buffers for rendering the noiseless field (ground truth).
#[derive(Debug, Default)]
pub struct TruthScratch {
    renderer: HaadfRenderer,
    /// The probe kernel and frame geometry installed in the renderer.
    key: Option<(Vec<f64>, usize, usize, u64, u64)>,
}

/// The noiseless field: ground truth a simulator can give without exposing the specimen.
pub trait FieldTruth {
    /// Writes the expected (noiseless) counts of a frame with `settings` into `out`
    /// (`rows × cols`, row-major), imaged with the probe of the scan grid in force; returns
    /// false where the truth is unknown (a real instrument).
    fn noiseless_field(
        &mut self,
        settings: &ScanSettings,
        scratch: &mut TruthScratch,
        out: &mut Vec<f64>,
    ) -> bool;
}

impl FieldTruth for StemSimulator {
    fn noiseless_field(
        &mut self,
        s: &ScanSettings,
        scratch: &mut TruthScratch,
        out: &mut Vec<f64>,
    ) -> bool {
        let src = self.config().optics.source_size.get();
        let (side, kernel) = self.probe_kernel();
        let key = (
            kernel.to_vec(),
            side,
            s.rows * 4096 + s.cols,
            s.pixel_size.to_bits(),
            src.to_bits(),
        );
        if scratch.key.as_ref() != Some(&key) {
            scratch
                .renderer
                .set_probe(kernel, side, s.rows, s.cols, s.pixel_size, src);
            scratch.key = Some(key);
        }
        let det = &self.config().detector;
        let sigma = det.cross_sections();
        let (gain, offset) = (det.gain.get(), det.offset.get());
        let epp = self.beam_current() * s.dwell_time / ELEMENTARY_CHARGE;
        let shift = self.drift_offset();
        let r = &mut scratch.renderer;
        if r.render_ideal(&self.specimen().atoms, &sigma, epp, shift, s.center)
            .is_err()
        {
            return false;
        }
        let Some(g) = r.geometry() else { return false };
        out.clear();
        for i in 0..s.rows {
            let row = (i + g.margin) * g.pcols + g.margin;
            out.extend(
                r.ideal[row..row + s.cols]
                    .iter()
                    .map(|&v| gain * f64::from(v) + offset),
            );
        }
        true
    }
}

/// The task over any STEM instrument `I` that may know the noiseless field.
#[derive(Debug)]
pub struct StemSparseScan<I> {
    cfg: Config,
    inst: I,
    /// Sum of the counts of every scan, per pixel.
    sum: Vec<f64>,
    /// Scans per pixel.
    scans: Vec<u32>,
    /// Mean counts per tile (valid where scanned).
    tile_mean: Vec<f64>,
    tile_scans: Vec<u32>,
    truth: Option<Vec<f64>>,
    /// Per tile: `Σ x` and `Σ x²` of the noiseless field, and the true squared error of the
    /// scanned tiles' mean counts.
    truth_s1: Vec<f64>,
    truth_s2: Vec<f64>,
    tile_err: Vec<f64>,
    truth_norm: f64,
    truth_err: f64,
    scratch: TruthScratch,
    electrons_per_pixel: f64,
    steps: usize,
    dose: f64,
    obs_image: Vec<f32>,
    obs_mask: Vec<f32>,
}

impl StemSparseScan<StemSimulator> {
    /// The task on the simulator, from an optional TOML config.
    pub fn from_config(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Config = config_from_toml(config)?;
        cfg.validate()?;
        let inst = StemSimulator::new(cfg.instrument_config(), 0)?;
        Ok(Self::new(cfg, inst))
    }
}

/// Upper bound of the observed signal, detected electrons per 1000 incident.
const IMG_MAX: f32 = 1000.0;

/// Inverse-square-distance prediction of tile `u` from the scanned tiles' means:
/// `(prediction, weighted spread of the means around it, distance to the nearest scanned tile)`
/// in counts, counts² and pixels; `None` when no tile is scanned.
fn predict(
    u: usize,
    grid: [usize; 2],
    tile: [usize; 2],
    means: impl Iterator<Item = (usize, f64)> + Clone,
) -> Option<(f64, f64, f64)> {
    let (ur, uc) = (u / grid[1], u % grid[1]);
    let (mut sw, mut swm, mut dmin) = (0.0, 0.0, f64::INFINITY);
    let dist2 = |t: usize| {
        let dy = (t / grid[1]) as f64 - ur as f64;
        let dx = (t % grid[1]) as f64 - uc as f64;
        (dy * tile[0] as f64).powi(2) + (dx * tile[1] as f64).powi(2)
    };
    for (t, m) in means.clone() {
        let d2 = dist2(t).max(1.0);
        let w = 1.0 / d2;
        sw += w;
        swm += w * m;
        dmin = dmin.min(d2.sqrt());
    }
    if sw == 0.0 {
        return None;
    }
    let pred = swm / sw;
    let spread = means
        .map(|(t, m)| (m - pred).powi(2) / dist2(t).max(1.0))
        .sum::<f64>()
        / sw;
    Some((pred, spread, dmin))
}

impl<I: StemInstrument + FieldTruth + NewEpisode + Send> StemSparseScan<I> {
    /// The task on `inst` with `cfg`.
    pub fn new(cfg: Config, mut inst: I) -> Self {
        inst.set_region(cfg.split.region());
        let n = cfg.pixels * cfg.pixels;
        let [a, b] = cfg.tile_grid();
        Self {
            sum: vec![0.0; n],
            scans: vec![0; n],
            tile_mean: vec![0.0; a * b],
            tile_scans: vec![0; a * b],
            truth: None,
            truth_s1: vec![0.0; a * b],
            truth_s2: vec![0.0; a * b],
            tile_err: vec![0.0; a * b],
            truth_norm: 0.0,
            truth_err: 0.0,
            scratch: TruthScratch::default(),
            electrons_per_pixel: 0.0,
            steps: 0,
            dose: 0.0,
            obs_image: vec![0.0; n],
            obs_mask: vec![0.0; n],
            cfg,
            inst,
        }
    }

    fn n_tiles(&self) -> usize {
        let [a, b] = self.cfg.tile_grid();
        a * b
    }

    /// Scan settings of tile `t`.
    fn tile_scan(&self, t: usize) -> ScanSettings {
        let c = &self.cfg;
        let [_, gc] = c.tile_grid();
        let [tr, tc] = c.tile;
        let (r0, c0) = ((t / gc) * tr, (t % gc) * tc);
        let half = 0.5 * c.pixels as f64;
        ScanSettings {
            rows: tr,
            cols: tc,
            pixel_size: c.pixel_size,
            dwell_time: c.dwell_time,
            flyback_time: 0.0,
            center: [
                (c0 as f64 + 0.5 * tc as f64 - half) * c.pixel_size,
                (r0 as f64 + 0.5 * tr as f64 - half) * c.pixel_size,
            ],
        }
    }

    /// Pixel index range of tile `t`: `(first row, first column)`.
    fn tile_origin(&self, t: usize) -> (usize, usize) {
        let [_, gc] = self.cfg.tile_grid();
        ((t / gc) * self.cfg.tile[0], (t % gc) * self.cfg.tile[1])
    }

    fn scanned_means(&self) -> impl Iterator<Item = (usize, f64)> + Clone + '_ {
        self.tile_mean
            .iter()
            .zip(&self.tile_scans)
            .enumerate()
            .filter(|(_, (_, k))| **k > 0)
            .map(|(t, (m, _))| (t, *m))
    }

    /// The reconstruction (counts per pixel): scanned pixels keep their mean counts, unscanned
    /// tiles their prediction.
    pub fn reconstruction(&self) -> Vec<f64> {
        let grid = self.cfg.tile_grid();
        let tile = self.cfg.tile;
        let p = self.cfg.pixels;
        let mut recon = vec![0.0; p * p];
        for t in 0..self.n_tiles() {
            let (r0, c0) = self.tile_origin(t);
            let pred = if self.tile_scans[t] > 0 {
                None
            } else {
                Some(predict(t, grid, tile, self.scanned_means()).map_or(0.0, |x| x.0))
            };
            for i in r0..r0 + tile[0] {
                for j in c0..c0 + tile[1] {
                    let k = i * p + j;
                    recon[k] = pred.unwrap_or(self.sum[k] / f64::from(self.scans[k].max(1)));
                }
            }
        }
        recon
    }

    /// The true squared error of the reconstruction against the noiseless field (0 without
    /// truth), from the per-tile sums: `Σ (x − ŷ)² = Σ x² − 2ŷ Σ x + n ŷ²` on an unscanned tile.
    fn truth_error(&self) -> f64 {
        if self.truth.is_none() {
            return 0.0;
        }
        let grid = self.cfg.tile_grid();
        let tile = self.cfg.tile;
        let n = (tile[0] * tile[1]) as f64;
        (0..self.n_tiles())
            .map(|t| {
                if self.tile_scans[t] > 0 {
                    self.tile_err[t]
                } else {
                    let y = predict(t, grid, tile, self.scanned_means()).map_or(0.0, |x| x.0);
                    (self.truth_s2[t] - 2.0 * y * self.truth_s1[t] + n * y * y).max(0.0)
                }
            })
            .sum()
    }

    /// Writes tile `t` of the observation from the scan sums.
    fn observe_tile(&mut self, t: usize) {
        let scale = if self.electrons_per_pixel > 0.0 {
            1e3 / self.electrons_per_pixel
        } else {
            0.0
        };
        let (r0, c0) = self.tile_origin(t);
        let p = self.cfg.pixels;
        for i in r0..r0 + self.cfg.tile[0] {
            for k in i * p + c0..i * p + c0 + self.cfg.tile[1] {
                let n = self.scans[k];
                self.obs_mask[k] = n as f32;
                self.obs_image[k] = if n > 0 {
                    let v = (self.sum[k] / f64::from(n) * scale) as f32;
                    if v.is_finite() {
                        v.clamp(0.0, IMG_MAX)
                    } else {
                        0.0
                    }
                } else {
                    0.0
                };
            }
        }
    }

    fn observation(&self) -> Value {
        Value::Dict(vec![
            ("image".into(), Value::Box(self.obs_image.clone())),
            ("mask".into(), Value::Box(self.obs_mask.clone())),
        ])
    }

    fn truth_info(&self, info: &mut Info) {
        if self.truth.is_some() && self.truth_norm > 0.0 {
            info.insert(
                "recon_error".into(),
                InfoValue::F64(self.truth_err / self.truth_norm),
            );
        }
        info.insert("dose".into(), InfoValue::F64(self.dose));
    }
}

impl<I: StemInstrument + FieldTruth + NewEpisode + Send> Task for StemSparseScan<I> {
    fn observation_space(&self) -> Space {
        let p = self.cfg.pixels;
        Space::Dict(vec![
            ("image".into(), Space::uniform_box(&[p, p], 0.0, IMG_MAX)),
            (
                "mask".into(),
                Space::uniform_box(&[p, p], 0.0, self.cfg.budget() as f32),
            ),
        ])
    }

    fn action_space(&self) -> Space {
        Space::Discrete {
            n: self.n_tiles() as i64,
            start: 0,
        }
    }

    fn max_episode_steps(&self) -> usize {
        self.cfg.budget()
    }

    fn reset(&mut self, seed: u64, info: &mut Info) -> Result<Value> {
        self.inst.new_episode(seed, info)?;
        self.inst.set_blanked(false)?;
        self.sum.fill(0.0);
        self.scans.fill(0);
        self.tile_mean.fill(0.0);
        self.tile_scans.fill(0);
        self.tile_err.fill(0.0);
        self.obs_image.fill(0.0);
        self.obs_mask.fill(0.0);
        self.steps = 0;
        self.dose = 0.0;
        // Set the tile scan grid (the probe kernel is computed for it), then the truth with it.
        let s = self.tile_scan(0);
        let accepted = self.inst.configure_scan(&s)?;
        self.electrons_per_pixel =
            self.inst.beam_current() * accepted.dwell_time / ELEMENTARY_CHARGE;
        self.truth = None;
        if self.cfg.truth {
            let p = self.cfg.pixels;
            let field = ScanSettings {
                rows: p,
                cols: p,
                center: [0.0, 0.0],
                ..accepted
            };
            let mut buf = Vec::with_capacity(p * p);
            if self
                .inst
                .noiseless_field(&field, &mut self.scratch, &mut buf)
            {
                self.truth_norm = buf.iter().map(|v| v * v).sum();
                for t in 0..self.n_tiles() {
                    let (r0, c0) = self.tile_origin(t);
                    let (mut s1, mut s2) = (0.0, 0.0);
                    for i in r0..r0 + self.cfg.tile[0] {
                        for &x in &buf[i * p + c0..i * p + c0 + self.cfg.tile[1]] {
                            s1 += x;
                            s2 += x * x;
                        }
                    }
                    self.truth_s1[t] = s1;
                    self.truth_s2[t] = s2;
                }
                self.truth = Some(buf);
            }
        }
        self.truth_err = self.truth_error();
        self.truth_info(info);
        Ok(self.observation())
    }

    fn step(&mut self, action: &Value, info: &mut Info) -> Result<TaskStep> {
        let t = action
            .as_discrete()
            .ok_or_else(|| EnvError::action("action", "expected a Discrete value"))?;
        let n_tiles = self.n_tiles();
        let t = usize::try_from(t)
            .ok()
            .filter(|&t| t < n_tiles)
            .ok_or_else(|| EnvError::action("action", format!("tile must be 0..{n_tiles}")))?;
        let s = self.tile_scan(t);
        self.inst.configure_scan(&s)?;
        let (r0, c0) = self.tile_origin(t);
        let [tr, tc] = self.cfg.tile;
        let p = self.cfg.pixels;
        let k_old = self.tile_scans[t];
        let pred = predict(t, self.cfg.tile_grid(), self.cfg.tile, self.scanned_means())
            .map_or(0.0, |x| x.0);
        let (mut before, mut after, mut total) = (0.0, 0.0, 0.0);
        let electrons;
        {
            let f = self.inst.acquire_frame()?;
            electrons = f.meta.electrons_per_pixel;
            for i in 0..tr {
                for j in 0..tc {
                    let y = f64::from(f.image.get((i, j)).copied().unwrap_or(0.0));
                    let y = if y.is_finite() { y.max(0.0) } else { 0.0 };
                    let k = (r0 + i) * p + c0 + j;
                    if k_old == 0 {
                        before += (y - pred).powi(2) - y;
                        after += y;
                    } else {
                        let n = f64::from(self.scans[k]);
                        let old = self.sum[k] / n;
                        let new = (self.sum[k] + y) / (n + 1.0);
                        before += old / n;
                        after += new / (n + 1.0);
                    }
                    self.sum[k] += y;
                    self.scans[k] += 1;
                    total += self.sum[k] / f64::from(self.scans[k]);
                }
            }
        }
        self.tile_scans[t] = k_old + 1;
        self.tile_mean[t] = total / (tr * tc) as f64;
        if let Some(x) = &self.truth {
            let mut e = 0.0;
            for i in r0..r0 + tr {
                let row = i * p + c0..i * p + c0 + tc;
                e += x[row.clone()]
                    .iter()
                    .zip(&self.sum[row.clone()])
                    .zip(&self.scans[row])
                    .map(|((x, s), n)| (x - s / f64::from(*n)).powi(2))
                    .sum::<f64>();
            }
            self.tile_err[t] = e;
        }
        // Mean counts over every measured pixel.
        let (mut msum, mut mn) = (0.0, 0usize);
        for (m, k) in self.tile_mean.iter().zip(&self.tile_scans) {
            if *k > 0 {
                msum += m;
                mn += 1;
            }
        }
        let m = if mn > 0 { msum / mn as f64 } else { 0.0 };
        let norm = (p * p) as f64 * m * m;
        let gain = if norm > 0.0 {
            (before - after) / norm
        } else {
            0.0
        };
        // Field-averaged dose of this scan, e⁻/Å².
        let px2 = self.cfg.pixel_size * self.cfg.pixel_size * 1e20;
        let d = electrons * (tr * tc) as f64 / ((p * p) as f64 * px2);
        self.dose += d;
        self.electrons_per_pixel = electrons;
        self.steps += 1;
        let old_err = self.truth_err;
        self.truth_err = self.truth_error();
        self.observe_tile(t);
        if self.truth.is_some() && self.truth_norm > 0.0 {
            info.insert(
                "true_gain".into(),
                InfoValue::F64((old_err - self.truth_err) / self.truth_norm),
            );
        }
        info.insert("estimated_gain".into(), InfoValue::F64(gain));
        info.insert("new_tile".into(), InfoValue::Bool(k_old == 0));
        self.truth_info(info);
        let reward = self.cfg.reward_scale * gain - self.cfg.dose_weight * d;
        Ok(TaskStep {
            obs: self.observation(),
            reward: if reward.is_finite() { reward } else { 0.0 },
            terminated: self.steps >= self.cfg.budget(),
            success: false,
        })
    }

    fn render(&self) -> RgbImage {
        // Left: the reconstruction (unscanned tiles tinted blue); right: the noiseless field
        // when known.
        let p = self.cfg.pixels;
        let panels = if self.truth.is_some() { 2 } else { 1 };
        let width = p * panels + (panels - 1) * 2;
        let mut data = vec![255u8; width * p * 3];
        let range = |v: &[f64]| {
            let (lo, hi) = v
                .iter()
                .filter(|x| x.is_finite())
                .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            (lo, if hi > lo { hi - lo } else { 1.0 })
        };
        let grey = |v: f64, (lo, span): (f64, f64)| {
            (((v - lo) / span).clamp(0.0, 1.0) * 255.0).round() as u8
        };
        let recon = self.reconstruction();
        let rr = match &self.truth {
            Some(x) => range(x),
            None => range(&recon),
        };
        for i in 0..p {
            for j in 0..p {
                let k = i * p + j;
                let g = grey(recon[k], rr);
                let px = if self.scans[k] > 0 {
                    [g, g, g]
                } else {
                    [g / 2, g / 2, 64 + g / 2]
                };
                let o = (i * width + j) * 3;
                data[o..o + 3].copy_from_slice(&px);
                if let Some(x) = &self.truth {
                    let g = grey(x[k], rr);
                    let o = (i * width + p + 2 + j) * 3;
                    data[o..o + 3].copy_from_slice(&[g, g, g]);
                }
            }
        }
        RgbImage {
            width,
            height: p,
            data,
        }
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        let (Some(img), Some(mask)) = (
            obs.get("image").and_then(Value::as_box),
            obs.get("mask").and_then(Value::as_box),
        ) else {
            return Value::Discrete(0);
        };
        let grid = self.cfg.tile_grid();
        let tile = self.cfg.tile;
        let p = self.cfg.pixels;
        if img.len() != p * p || mask.len() != p * p {
            return Value::Discrete(0);
        }
        let n = grid[0] * grid[1];
        // Tile means from the observation.
        let mut means = Vec::with_capacity(n);
        let mut vars = vec![0.0; n];
        for (t, var_t) in vars.iter_mut().enumerate() {
            let (r0, c0) = ((t / grid[1]) * tile[0], (t % grid[1]) * tile[1]);
            if mask[r0 * p + c0] > 0.0 {
                let (mut s, mut s2) = (0.0, 0.0);
                for i in r0..r0 + tile[0] {
                    for &v in &img[i * p + c0..i * p + c0 + tile[1]] {
                        s += f64::from(v);
                        s2 += f64::from(v) * f64::from(v);
                    }
                }
                let nn = (tile[0] * tile[1]) as f64;
                means.push((t, s / nn));
                *var_t = s2 / nn - (s / nn).powi(2);
            }
        }
        if means.is_empty() {
            // The central tile.
            return Value::Discrete(((grid[0] / 2) * grid[1] + grid[1] / 2) as i64);
        }
        let mu = means.iter().map(|m| m.1).sum::<f64>() / means.len() as f64;
        let var = means.iter().map(|m| (m.1 - mu).powi(2)).sum::<f64>() / means.len() as f64;
        let ell = 2.0 * tile[0].max(tile[1]) as f64;
        let mut best = (f64::NEG_INFINITY, 0usize);
        for t in 0..n {
            if means.iter().any(|m| m.0 == t) {
                continue;
            }
            let Some((_, spread, d)) = predict(t, grid, tile, means.iter().copied()) else {
                continue;
            };
            let (ur, uc) = (t / grid[1], t % grid[1]);
            let (mut sw, mut swv) = (0.0, 0.0);
            for &(i, _) in &means {
                let dy = ((i / grid[1]) as f64 - ur as f64) * tile[0] as f64;
                let dx = ((i % grid[1]) as f64 - uc as f64) * tile[1] as f64;
                let w = 1.0 / (dy * dy + dx * dx).max(1.0);
                sw += w;
                swv += w * vars[i];
            }
            let vloc = swv / sw;
            // Expected surprise: the structure inside neighbouring tiles, how much their means
            // disagree around the prediction, and how far the nearest measurement is.
            let score = vloc + spread + var * (1.0 - (-d / ell).exp());
            if score > best.0 {
                best = (score, t);
            }
        }
        Value::Discrete(best.1 as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Env, TaskEnv};
    use rand::Rng;
    use scopegym_physics::rng::seeded;

    use crate::tasks::testing::{assert_config_errors_name_fields, info_f64 as f};

    #[test]
    fn bad_config_names_the_field() {
        assert_config_errors_name_fields(
            StemSparseScan::from_config,
            &[
                ("tile = [8, 12]", "tile"),
                ("tile = [8, 8]", "tile"),
                ("pixels = 4", "pixels"),
                ("budget_fraction = 0.0", "budget_fraction"),
                ("dose_weight = -1.0", "dose_weight"),
                ("nope = 1", "nope"),
            ],
        );
    }

    #[test]
    fn a_tile_is_the_crop_of_the_noiseless_field() {
        let mut task = StemSparseScan::from_config(None).unwrap();
        let mut info = Info::new();
        task.reset(3, &mut info).unwrap();
        let truth = task.truth.clone().unwrap();
        let t = 13;
        task.step(&Value::Discrete(t as i64), &mut info).unwrap();
        let (r0, c0) = task.tile_origin(t);
        let tile = task.inst.last_noiseless().to_owned();
        let p = task.cfg.pixels;
        let peak = truth.iter().cloned().fold(0.0, f64::max);
        for ((i, j), &v) in tile.indexed_iter() {
            let x = truth[(r0 + i) * p + c0 + j];
            assert!(
                (f64::from(v) - x).abs() < 1e-3 * peak,
                "({i},{j}): tile {v} vs field {x}"
            );
        }
        // The per-tile bookkeeping of the true error equals the error of the reconstruction.
        task.step(&Value::Discrete(2), &mut info).unwrap();
        task.step(&Value::Discrete(13), &mut info).unwrap();
        let direct: f64 = task
            .reconstruction()
            .iter()
            .zip(&truth)
            .map(|(a, b)| (a - b).powi(2))
            .sum();
        assert!(
            (direct - task.truth_err).abs() < 1e-9 * direct,
            "{direct} vs {}",
            task.truth_err
        );
    }

    #[test]
    fn surprise_minus_shot_noise_estimates_the_true_error() {
        // For Poisson counts y of mean x: E[Σ (y − ŷ)² − Σ y] = Σ (x − ŷ)². Over many tiles and
        // seeds the estimate from counts matches the error computed from the noiseless field.
        let mut task = StemSparseScan::from_config(None).unwrap();
        let mut info = Info::new();
        let (mut est, mut tru) = (0.0, 0.0);
        let mut rng = seeded(5);
        for seed in 0..6 {
            task.reset(seed, &mut info).unwrap();
            for _ in 0..task.cfg.budget() {
                let t = rng.random_range(0..task.n_tiles());
                if task.tile_scans[t] > 0 {
                    continue;
                }
                let pred = task.reconstruction()[{
                    let (r0, c0) = task.tile_origin(t);
                    r0 * task.cfg.pixels + c0
                }];
                let truth = task.truth.clone().unwrap();
                task.step(&Value::Discrete(t as i64), &mut info).unwrap();
                let (r0, c0) = task.tile_origin(t);
                let p = task.cfg.pixels;
                for i in r0..r0 + task.cfg.tile[0] {
                    for j in c0..c0 + task.cfg.tile[1] {
                        let y = task.sum[i * p + j];
                        est += (y - pred).powi(2) - y;
                        tru += (truth[i * p + j] - pred).powi(2);
                    }
                }
            }
        }
        let rel = (est - tru).abs() / tru;
        println!("estimated {est:.4e}, true {tru:.4e}, relative difference {rel:.4}");
        assert!(rel < 0.05, "{est} vs {tru}");
    }

    #[test]
    fn heuristic_scans_new_tiles_and_beats_random_on_truth() {
        let mut env = TaskEnv::new("t", StemSparseScan::from_config(None).unwrap());
        let (mut h_err, mut r_err) = (0.0, 0.0);
        for seed in 0..8 {
            let (mut obs, _) = env.reset(Some(seed)).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            loop {
                let a = env.heuristic_action(&obs);
                assert!(seen.insert(a.as_discrete().unwrap()), "rescanned {a:?}");
                let s = env.step(&a).unwrap();
                obs = s.obs;
                if s.terminated || s.truncated {
                    assert!(s.terminated);
                    h_err += f(&s.info, "recon_error");
                    break;
                }
            }
            env.reset(Some(seed)).unwrap();
            let mut rng = seeded(seed + 99);
            loop {
                let a = env.action_space().sample(&mut rng);
                let s = env.step(&a).unwrap();
                if s.terminated || s.truncated {
                    r_err += f(&s.info, "recon_error");
                    break;
                }
            }
        }
        println!("final recon_error: heuristic {h_err:.4}, random {r_err:.4}");
        assert!(h_err < r_err, "{h_err} vs {r_err}");
    }
}
