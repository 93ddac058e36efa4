//! `scopegym/StemEelsExplore-v1`: choose where to park the probe for EELS to find the strongest
//! Si-L₂,₃ signal within a budget of spectra (anchor: DTMicroscope deep-kernel-learning
//! exploration, structure image → spectral property).
//!
//! The specimen is graphene with a few substitutional Si dopants at random sites (default 5 on a
//! 4.4 nm square, about 2.6 inside the 3.2 nm field). At reset the instrument takes a HAADF
//! overview of the field (default 64², 0.5 Å pixels); the field is divided into a
//! `grid × grid` lattice of cells (default 16², 2 Å) whose centres are the candidate probe
//! positions. Each step moves the probe to the chosen cell's centre (`move_probe`) and acquires
//! a spectrum (`acquire_spectrum`) with the spectrometer set to the Si-L₂,₃ window (default
//! 60-188 eV, 256 channels of 0.5 eV: the zero-loss peak is off the camera, as for core-loss
//! work). The Si-L edge comes from the Si atoms under the probe, so the signal falls off within
//! about an ångström of a dopant.
//!
//! - **Scalarization** (from the spectrum alone, as microscopists quantify an edge): a power
//!   law `A·E^-r` fitted by weighted least squares to `ln counts` over the pre-edge window
//!   (`pre_edge`, default 80-97 eV, weights = counts, the Poisson inverse variance of
//!   `ln counts`), extrapolated under the signal window (`signal`, default 99-129 eV) and
//!   subtracted; the value is the background-subtracted integral per 10⁴ incident electrons
//!   (`I·t/e`). With the defaults a Si atom under the probe scores about 6 and an edge-free
//!   spectrum about 0.65 (the multiple-plasmon tails bend the background slightly away from a
//!   pure power law; the ground truth applies the same scalarization, so this offset is part
//!   of both), with a shot-noise spread of about 0.4 per spectrum.
//! - **Observation** (Dict): `overview`, the HAADF frame divided by its mean, clipped to
//!   `[0, 20]`; `values`, the mean scalarized value measured at each cell (`(grid, grid)`, 0
//!   where unmeasured, clipped to `±1000`); `mask`, the number of spectra taken at each cell
//!   (`(grid, grid)`, 0 to `budget`); `spectrum`, the last spectrum binned to 64 channels, each
//!   bin's share of the counts times 64 (mean 1, clipped to `[0, 64]`; 0 before the first).
//! - **Action** (Discrete, `grid²`): the cell `row · grid + column`.
//! - **Reward**: `reward_scale · (best_t − best_{t−1})`, `best_t` the largest mean value over
//!   the measured cells (`best_0 = 0`, floored at 0): the return is `reward_scale · best_T`, the
//!   negative simple regret up to the constant `true_best`. Averaging repeated spectra of a
//!   cell keeps noise from being farmed by re-measuring.
//! - **Episode**: `budget` spectra (truncation); no terminal state.
//! - **Info** (never in the observation): `value` (this step's scalarized value), `best`,
//!   `true_value` (the noiseless scalarized value at the cell: the same scalarization of the
//!   expected spectrum), `true_best` (the largest over the grid, computed at reset from the
//!   specimen), `regret` (`true_best` minus the true value of the cell with the best measured
//!   mean), `dose` (electrons delivered by this spectrum), and the randomized scenario values
//!   (`param.*`).
//! - **Heuristic** (Z-contrast: Si is brighter than C, HAADF ∝ Z^1.7): probe the unmeasured
//!   cell holding the brightest spot of the overview (the largest sum over a 2 × 2 pixel block
//!   within the cell), brightest first.
//! - **Render**: the overview, measured cells tinted from blue (no edge) to red (the strongest
//!   value so far), the cell with the best mean outlined in yellow.

use crate::env::{Info, InfoValue, RgbImage, Task, TaskStep};
use crate::error::{EnvError, Result};
use crate::level::{Difficulty, Split};
use crate::space::{Space, Value};
use crate::tasks::{NewEpisode, TaskConfig, config_from_toml};
use scopegym_physics::constants::ELEMENTARY_CHARGE;
use scopegym_physics::instrument::{ScanSettings, StemInstrument};
use scopegym_physics::param::Param;
use scopegym_physics::stem::eels::{EDGES, EelsConfig, EelsModel};
use scopegym_physics::stem::specimen::DopantConfig;
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
    /// The simulated instrument. Default: 60 kV, 30 mrad, 100 pA; a 4.4 nm square of graphene
    /// at a random rotation with 5 Si dopants at random sites; no drift or scan noise; no
    /// sputtering (below threshold at 60 kV); beam-driven dopant hops on; the spectrometer at
    /// 60-188 eV (256 channels of 0.5 eV). Its scan grid is replaced by the overview's
    /// ([`Config::instrument_config`]).
    pub instrument: StemConfig,
    /// Overview side, pixels. Default 64.
    pub pixels: usize,
    /// Overview pixel size, m. Default 0.5 Å.
    pub pixel_size: f64,
    /// Overview dwell time per pixel, s. Default 8 µs (5000 e⁻ per pixel at 100 pA, 2·10⁴ e⁻/Å²).
    pub dwell_time: f64,
    /// Candidate cells per side; must divide `pixels`. Default 16.
    pub grid: usize,
    /// Spectrum exposure, s. Default 10 ms.
    pub exposure: f64,
    /// Spectra per episode. Default 16.
    pub budget: usize,
    /// Pre-edge (background fit) window `[from, to]`, eV. Default 80-97 eV.
    pub pre_edge: [f64; 2],
    /// Signal (integration) window `[from, to]`, eV. Default 99-129 eV (Si-L₂,₃).
    pub signal: [f64; 2],
    /// Reward per unit of best value gained. Default 1.
    pub reward_scale: f64,
}

impl Default for Config {
    fn default() -> Self {
        let mut instrument = StemConfig::default().without_scan_distortions();
        let s = &mut instrument.specimen;
        s.rotation = Param::Uniform(0.0, std::f64::consts::FRAC_PI_3, Default::default());
        s.size = [Param::fixed(4.4e-9), Param::fixed(4.4e-9)];
        s.dopants = vec![DopantConfig {
            count: 5,
            placement: "random".into(),
            ..Default::default()
        }];
        instrument.damage.sputtering = false;
        instrument.eels = EelsConfig {
            channels: 256,
            energy_offset: Param::fixed(60.0),
            dispersion: Param::fixed(0.5),
            ..Default::default()
        };
        Self {
            difficulty: Difficulty::Medium,
            split: Split::Train,
            instrument,
            pixels: 64,
            pixel_size: 0.5e-10,
            dwell_time: 8e-6,
            grid: 16,
            exposure: 0.01,
            budget: 16,
            pre_edge: [80.0, 97.0],
            signal: [99.0, 129.0],
            reward_scale: 1.0,
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
    /// The instrument config with its scan grid set to the overview (`pixels`, `pixel_size`,
    /// `dwell_time`), so that resets keep the probe kernel the spectra use.
    pub fn instrument_config(&self) -> StemConfig {
        let mut c = self.instrument.clone();
        c.scan.pixels = [self.pixels, self.pixels];
        c.scan.pixel_size = Param::fixed(self.pixel_size);
        c.scan.dwell_time = Param::fixed(self.dwell_time);
        c.scan.dose = None;
        c
    }

    /// Checks ranges, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.instrument
            .validate()
            .map_err(|e| EnvError::config("instrument", e.to_string()))?;
        let bad = |f: &str, r: String| Err(EnvError::config(f, r));
        if !(16..=512).contains(&self.pixels) {
            // (The simulator's frame renderer needs at least 16 pixels.)
            return bad("pixels", format!("must be 16..=512, got {}", self.pixels));
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
        if !(2..=self.pixels).contains(&self.grid) || self.pixels % self.grid != 0 {
            return bad(
                "grid",
                format!(
                    "must be 2..=pixels and divide pixels ({}), got {}",
                    self.pixels, self.grid
                ),
            );
        }
        if !(self.exposure > 0.0 && self.exposure <= 1000.0) {
            return bad(
                "exposure",
                format!("must be in (0, 1000] s, got {}", self.exposure),
            );
        }
        if self.budget == 0 {
            return bad("budget", "must be at least 1".into());
        }
        for (f, [a, b]) in [("pre_edge", self.pre_edge), ("signal", self.signal)] {
            if !(a.is_finite() && b.is_finite() && 0.0 < a && a < b) {
                return bad(
                    f,
                    format!("must be an increasing window of positive losses, got [{a}, {b}] eV"),
                );
            }
        }
        if self.pre_edge[1] > self.signal[0] {
            return bad(
                "pre_edge",
                format!(
                    "must end at or below the signal window's start ({} eV), got {} eV",
                    self.signal[0], self.pre_edge[1]
                ),
            );
        }
        if !(self.reward_scale.is_finite() && self.reward_scale >= 0.0) {
            return bad(
                "reward_scale",
                format!("must be finite and ≥ 0, got {}", self.reward_scale),
            );
        }
        Ok(())
    }
}

/// Background-subtracted edge integral of a spectrum: a power law `A·E^-r` fitted to
/// `ln counts` over `pre_edge` (weighted least squares, weights = counts), extrapolated under
/// `signal` and subtracted, summed over the channels whose centre lies in `signal`. Channels
/// with no counts are left out of the fit; with fewer than 3 usable channels the background is
/// 0. Returns counts.
pub fn edge_integral(energy: &[f64], counts: &[f64], pre_edge: [f64; 2], signal: [f64; 2]) -> f64 {
    let (mut sw, mut sx, mut sy, mut sxx, mut sxy, mut n) = (0.0, 0.0, 0.0, 0.0, 0.0, 0);
    for (&e, &c) in energy.iter().zip(counts) {
        if e >= pre_edge[0] && e <= pre_edge[1] && c > 0.0 && e > 0.0 {
            let (x, y, w) = (e.ln(), c.ln(), c);
            sw += w;
            sx += w * x;
            sy += w * y;
            sxx += w * x * x;
            sxy += w * x * y;
            n += 1;
        }
    }
    let det = sw * sxx - sx * sx;
    let fit = (n >= 3 && det > 0.0 && det.is_finite()).then(|| {
        let slope = (sw * sxy - sx * sy) / det;
        let icept = (sy - slope * sx) / sw;
        (icept, slope)
    });
    energy
        .iter()
        .zip(counts)
        .filter(|(e, _)| **e >= signal[0] && **e <= signal[1])
        .map(|(&e, &c)| {
            let bg = fit.map_or(0.0, |(a, b)| (a + b * e.ln()).exp());
            c - bg
        })
        .sum()
}

/// Buffers for the noiseless spectra (ground truth).
#[derive(Debug, Default)]
pub struct SpectrumScratch {
    model: Option<(EelsConfig, EelsModel)>,
    composition: Vec<(u8, f64)>,
    kernel: Vec<f64>,
}

/// The noiseless spectra: ground truth a simulator can give without exposing the specimen.
pub trait SpectrumTruth {
    /// For each lab position (m) of `positions`, writes `value(expected spectrum)` for an
    /// exposure of `exposure` s at that position into `out`; `value` receives the energy axis
    /// (eV) and expected counts per channel. Positions without any atom whose element has an
    /// edge in `window` (eV) under the probe share the value of the edge-free spectrum. Returns
    /// false where the truth is unknown (a real instrument).
    fn expected_values(
        &mut self,
        positions: &[[f64; 2]],
        exposure: f64,
        window: [f64; 2],
        value: &dyn Fn(&[f64], &[f64]) -> f64,
        scratch: &mut SpectrumScratch,
        out: &mut Vec<f64>,
    ) -> bool;
}

/// Probe intensity per area (1/m²) at offset `(ox, oy)` (m) from a binned kernel of side `s`
/// and pixel `px`, bilinear (the simulator's own rule); 0 outside it.
fn kernel_density(k: &[f64], s: usize, px: f64, ox: f64, oy: f64) -> f64 {
    let u = ox / px + (s / 2) as f64;
    let v = oy / px + (s / 2) as f64;
    if s < 2 || !(u >= 0.0 && v >= 0.0 && u < (s - 1) as f64 && v < (s - 1) as f64) {
        return 0.0;
    }
    let (j, i) = (u as usize, v as usize);
    let (fx, fy) = (u - j as f64, v - i as f64);
    let val = (k[i * s + j] * (1.0 - fx) + k[i * s + j + 1] * fx) * (1.0 - fy)
        + (k[(i + 1) * s + j] * (1.0 - fx) + k[(i + 1) * s + j + 1] * fx) * fy;
    val / (px * px)
}

impl SpectrumTruth for StemSimulator {
    fn expected_values(
        &mut self,
        positions: &[[f64; 2]],
        exposure: f64,
        window: [f64; 2],
        value: &dyn Fn(&[f64], &[f64]) -> f64,
        scratch: &mut SpectrumScratch,
        out: &mut Vec<f64>,
    ) -> bool {
        let eels = &self.config().eels;
        if scratch.model.as_ref().map(|m| &m.0) != Some(eels) {
            match EelsModel::new(eels) {
                Ok(m) => scratch.model = Some((eels.clone(), m)),
                Err(_) => return false,
            }
        }
        let px = self.scan_settings().pixel_size;
        let (side, k) = self.probe_kernel();
        scratch.kernel.clear();
        scratch.kernel.extend_from_slice(k);
        let Some((_, model)) = &scratch.model else {
            return false;
        };
        let n_e = self.beam_current() * exposure / ELEMENTARY_CHARGE;
        let d = self.drift_offset();
        let reach = side as f64 * 0.5 * px;
        // Elements with an edge in the window, and the atoms of those elements.
        let mut has_edge = [false; 256];
        for e in EDGES {
            if e.onset >= window[0] - 20.0 && e.onset <= window[1] {
                has_edge[usize::from(e.z)] = true;
            }
        }
        let atoms = &self.specimen().atoms;
        let edge_atoms: Vec<[f64; 2]> = atoms
            .iter()
            .filter(|a| has_edge[usize::from(a.z)])
            .map(|a| [a.x, a.y])
            .collect();
        let mut spec = vec![0.0; model.energy_axis().len()];
        model.expected(&[], n_e, &mut spec);
        let plain = value(model.energy_axis(), &spec);
        out.clear();
        for p in positions {
            let b = [p[0] - d[0], p[1] - d[1]];
            // Without an edge atom under the probe the spectrum is the edge-free one.
            let near = edge_atoms.iter().any(|e| {
                let (ox, oy) = (e[0] - b[0], e[1] - b[1]);
                ox.abs() <= reach
                    && oy.abs() <= reach
                    && kernel_density(&scratch.kernel, side, px, ox, oy) > 0.0
            });
            if !near {
                out.push(plain);
                continue;
            }
            scratch.composition.clear();
            for a in atoms {
                let (ox, oy) = (a.x - b[0], a.y - b[1]);
                if ox.abs() > reach || oy.abs() > reach {
                    continue;
                }
                let w = kernel_density(&scratch.kernel, side, px, ox, oy) * 1e-20;
                if w <= 0.0 {
                    continue;
                }
                match scratch.composition.iter_mut().find(|c| c.0 == a.z) {
                    Some(c) => c.1 += w,
                    None => scratch.composition.push((a.z, w)),
                }
            }
            model.expected(&scratch.composition, n_e, &mut spec);
            out.push(value(model.energy_axis(), &spec));
        }
        true
    }
}

/// The task over any STEM instrument `I` that may know the expected spectra.
#[derive(Debug)]
pub struct StemEelsExplore<I> {
    cfg: Config,
    inst: I,
    overview: Vec<f32>,
    /// Sum of the values measured at each cell.
    sum: Vec<f64>,
    count: Vec<u32>,
    values: Vec<f32>,
    mask: Vec<f32>,
    spectrum: Vec<f32>,
    energy: Vec<f64>,
    counts: Vec<f64>,
    best: f64,
    truth: Option<Vec<f64>>,
    true_best: f64,
    scratch: SpectrumScratch,
}

impl StemEelsExplore<StemSimulator> {
    /// The task on the simulator, from an optional TOML config.
    pub fn from_config(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Config = config_from_toml(config)?;
        cfg.validate()?;
        let inst = StemSimulator::new(cfg.instrument_config(), 0)?;
        Ok(Self::new(cfg, inst))
    }
}

/// Upper bound of the normalized overview.
const OVERVIEW_MAX: f32 = 20.0;
/// Bound of the observed values.
const VALUE_MAX: f32 = 1000.0;
/// Channels of the binned spectrum.
const BINS: usize = 64;

impl<I: StemInstrument + SpectrumTruth + NewEpisode + Send> StemEelsExplore<I> {
    /// The task on `inst` with `cfg`.
    pub fn new(cfg: Config, mut inst: I) -> Self {
        inst.set_region(cfg.split.region());
        let (g, p) = (cfg.grid, cfg.pixels);
        Self {
            overview: vec![0.0; p * p],
            sum: vec![0.0; g * g],
            count: vec![0; g * g],
            values: vec![0.0; g * g],
            mask: vec![0.0; g * g],
            spectrum: vec![0.0; BINS],
            energy: Vec::new(),
            counts: Vec::new(),
            best: 0.0,
            truth: None,
            true_best: 0.0,
            scratch: SpectrumScratch::default(),
            cfg,
            inst,
        }
    }

    /// Lab position (m) of the centre of cell `k`.
    pub fn position(&self, k: usize) -> [f64; 2] {
        let g = self.cfg.grid;
        let side = self.cfg.pixels as f64 * self.cfg.pixel_size;
        let (r, c) = (k / g, k % g);
        [
            ((c as f64 + 0.5) / g as f64 - 0.5) * side,
            ((r as f64 + 0.5) / g as f64 - 0.5) * side,
        ]
    }

    /// The scalarized value of a spectrum: the background-subtracted edge integral per 10⁴
    /// incident electrons.
    fn scalarize(&self, energy: &[f64], counts: &[f64]) -> f64 {
        let n_e = self.inst.beam_current() * self.cfg.exposure / ELEMENTARY_CHARGE;
        let v = edge_integral(energy, counts, self.cfg.pre_edge, self.cfg.signal) * 1e4 / n_e;
        if v.is_finite() { v } else { 0.0 }
    }

    fn observation(&self) -> Value {
        Value::Dict(vec![
            ("overview".into(), Value::Box(self.overview.clone())),
            ("values".into(), Value::Box(self.values.clone())),
            ("mask".into(), Value::Box(self.mask.clone())),
            ("spectrum".into(), Value::Box(self.spectrum.clone())),
        ])
    }

    /// The cell with the best measured mean, if any.
    fn best_cell(&self) -> Option<usize> {
        (0..self.count.len())
            .filter(|&k| self.count[k] > 0)
            .max_by(|&a, &b| {
                let (va, vb) = (
                    self.sum[a] / f64::from(self.count[a]),
                    self.sum[b] / f64::from(self.count[b]),
                );
                va.total_cmp(&vb)
            })
    }
}

impl<I: StemInstrument + SpectrumTruth + NewEpisode + Send> Task for StemEelsExplore<I> {
    fn observation_space(&self) -> Space {
        let (g, p) = (self.cfg.grid, self.cfg.pixels);
        Space::Dict(vec![
            (
                "overview".into(),
                Space::uniform_box(&[p, p], 0.0, OVERVIEW_MAX),
            ),
            (
                "values".into(),
                Space::uniform_box(&[g, g], -VALUE_MAX, VALUE_MAX),
            ),
            (
                "mask".into(),
                Space::uniform_box(&[g, g], 0.0, self.cfg.budget as f32),
            ),
            (
                "spectrum".into(),
                Space::uniform_box(&[BINS], 0.0, BINS as f32),
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
        self.inst.new_episode(seed, info)?;
        self.inst.set_blanked(false)?;
        self.sum.fill(0.0);
        self.count.fill(0);
        self.values.fill(0.0);
        self.mask.fill(0.0);
        self.spectrum.fill(0.0);
        self.best = 0.0;
        let c = &self.cfg;
        self.inst.configure_scan(&ScanSettings {
            rows: c.pixels,
            cols: c.pixels,
            pixel_size: c.pixel_size,
            dwell_time: c.dwell_time,
            flyback_time: 0.0,
            center: [0.0, 0.0],
        })?;
        {
            let f = self.inst.acquire_frame()?;
            let n = f.image.len().max(1) as f64;
            let mean = f.image.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let scale = if mean > 0.0 && mean.is_finite() {
                (1.0 / mean) as f32
            } else {
                0.0
            };
            self.overview.clear();
            self.overview.extend(f.image.iter().map(|&v| {
                let x = v * scale;
                if x.is_finite() {
                    x.clamp(0.0, OVERVIEW_MAX)
                } else {
                    0.0
                }
            }));
        }
        // Ground truth: the noiseless value at every cell.
        let positions: Vec<[f64; 2]> = (0..c.grid * c.grid).map(|k| self.position(k)).collect();
        let (exposure, pre, sig) = (c.exposure, c.pre_edge, c.signal);
        let n_e = self.inst.beam_current() * exposure / ELEMENTARY_CHARGE;
        let value = move |e: &[f64], s: &[f64]| edge_integral(e, s, pre, sig) * 1e4 / n_e;
        let mut out = Vec::with_capacity(positions.len());
        self.truth = self
            .inst
            .expected_values(
                &positions,
                exposure,
                [pre[0], sig[1]],
                &value,
                &mut self.scratch,
                &mut out,
            )
            .then_some(out);
        self.true_best = self
            .truth
            .as_ref()
            .map_or(0.0, |t| t.iter().copied().fold(f64::NEG_INFINITY, f64::max));
        if self.truth.is_some() {
            info.insert("true_best".into(), InfoValue::F64(self.true_best));
        }
        Ok(self.observation())
    }

    fn step(&mut self, action: &Value, info: &mut Info) -> Result<TaskStep> {
        let k = action
            .as_discrete()
            .ok_or_else(|| EnvError::action("action", "expected a Discrete value"))?;
        let n = self.cfg.grid * self.cfg.grid;
        let k = usize::try_from(k)
            .ok()
            .filter(|&k| k < n)
            .ok_or_else(|| EnvError::action("action", format!("cell must be 0..{n}")))?;
        self.inst.move_probe(self.position(k))?;
        {
            let s = self.inst.acquire_spectrum(self.cfg.exposure)?;
            self.counts.clear();
            self.counts.extend(s.counts.iter().map(|&v| {
                let v = f64::from(v);
                if v.is_finite() { v.max(0.0) } else { 0.0 }
            }));
            self.energy.clear();
            self.energy.extend_from_slice(s.energy);
        }
        let v = self.scalarize(&self.energy, &self.counts);
        // The binned spectrum: each bin's share of the counts, times BINS.
        let total: f64 = self.counts.iter().sum();
        let per = self.counts.len().div_ceil(BINS).max(1);
        for (b, o) in self.spectrum.iter_mut().enumerate() {
            let s: f64 = self.counts.iter().skip(b * per).take(per).sum();
            let x = if total > 0.0 {
                (s / total * BINS as f64) as f32
            } else {
                0.0
            };
            *o = if x.is_finite() {
                x.clamp(0.0, BINS as f32)
            } else {
                0.0
            };
        }
        self.sum[k] += v;
        self.count[k] += 1;
        let mean = self.sum[k] / f64::from(self.count[k]);
        self.values[k] = (mean as f32).clamp(-VALUE_MAX, VALUE_MAX);
        self.mask[k] = self.count[k] as f32;
        let best = self
            .best_cell()
            .map_or(0.0, |b| self.sum[b] / f64::from(self.count[b]))
            .max(0.0);
        let reward = self.cfg.reward_scale * (best - self.best);
        self.best = best;
        info.insert("value".into(), InfoValue::F64(v));
        info.insert("best".into(), InfoValue::F64(best));
        info.insert(
            "dose".into(),
            InfoValue::F64(self.inst.beam_current() * self.cfg.exposure / ELEMENTARY_CHARGE),
        );
        if let Some(t) = &self.truth {
            info.insert("true_value".into(), InfoValue::F64(t[k]));
            info.insert("true_best".into(), InfoValue::F64(self.true_best));
            let found = self.best_cell().map_or(f64::NEG_INFINITY, |b| t[b]);
            let regret = if found.is_finite() {
                self.true_best - found
            } else {
                self.true_best
            };
            info.insert("regret".into(), InfoValue::F64(regret));
        }
        Ok(TaskStep {
            obs: self.observation(),
            reward: if reward.is_finite() { reward } else { 0.0 },
            terminated: false,
            success: false,
        })
    }

    fn render(&self) -> RgbImage {
        // The overview in grey; measured cells tinted by their value (red = strongest, blue =
        // none), the cell with the best mean outlined in yellow.
        let mut img = RgbImage::from_grey(&self.overview, self.cfg.pixels, self.cfg.pixels);
        let (g, p) = (self.cfg.grid, self.cfg.pixels);
        let cell = p / g;
        let vmax = self
            .values
            .iter()
            .zip(&self.mask)
            .filter(|(_, m)| **m > 0.0)
            .fold(0.0f32, |a, (v, _)| a.max(*v));
        let best = self.best_cell();
        for k in 0..g * g {
            if self.count[k] == 0 {
                continue;
            }
            let t = if vmax > 0.0 {
                (self.values[k] / vmax).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let tint = [255.0 * t, 64.0, 255.0 * (1.0 - t)];
            let (r0, c0) = ((k / g) * cell, (k % g) * cell);
            for i in r0..r0 + cell {
                for j in c0..c0 + cell {
                    let o = (i * p + j) * 3;
                    let edge = i == r0 || j == c0 || i == r0 + cell - 1 || j == c0 + cell - 1;
                    for ch in 0..3 {
                        let base = f32::from(img.data[o + ch]);
                        img.data[o + ch] = if Some(k) == best && edge {
                            [255u8, 255, 0][ch]
                        } else {
                            (0.5 * base + 0.5 * tint[ch]) as u8
                        };
                    }
                }
            }
        }
        img
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        let (Some(ov), Some(mask)) = (
            obs.get("overview").and_then(Value::as_box),
            obs.get("mask").and_then(Value::as_box),
        ) else {
            return Value::Discrete(0);
        };
        let (g, p) = (self.cfg.grid, self.cfg.pixels);
        if ov.len() != p * p || mask.len() != g * g {
            return Value::Discrete(0);
        }
        let cell = p / g;
        let mut best = (f32::NEG_INFINITY, 0usize);
        for (k, &m) in mask.iter().enumerate() {
            if m > 0.0 {
                continue;
            }
            // The brightest 2 × 2 pixel block of the cell (a dopant anywhere in it).
            let (r0, c0) = ((k / g) * cell, (k % g) * cell);
            let mut s = f32::NEG_INFINITY;
            for i in r0..r0 + cell {
                for j in c0..c0 + cell {
                    let (i1, j1) = ((i + 1).min(p - 1), (j + 1).min(p - 1));
                    s = s.max(ov[i * p + j] + ov[i * p + j1] + ov[i1 * p + j] + ov[i1 * p + j1]);
                }
            }
            if s > best.0 {
                best = (s, k);
            }
        }
        Value::Discrete(best.1 as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Env, TaskEnv};

    use crate::tasks::testing::{assert_config_errors_name_fields, info_f64 as f};

    #[test]
    fn bad_config_names_the_field() {
        assert_config_errors_name_fields(
            StemEelsExplore::from_config,
            &[
                ("grid = 7", "grid"),
                ("pixels = 8", "pixels"),
                ("exposure = 0.0", "exposure"),
                ("budget = 0", "budget"),
                ("signal = [130.0, 99.0]", "signal"),
                ("pre_edge = [80.0, 110.0]", "pre_edge"),
                ("nope = 1", "nope"),
            ],
        );
    }

    #[test]
    fn edge_integral_recovers_an_edge_on_a_power_law() {
        // Background 1e6·E^-3 plus a step of 50 counts per channel from 99 eV: over 99-129 eV
        // (61 channels of 0.5 eV) the integral is 61 · 50 = 3050, whatever the background.
        let e: Vec<f64> = (0..256).map(|i| 60.0 + 0.5 * f64::from(i)).collect();
        let c: Vec<f64> = e
            .iter()
            .map(|&x| 1e9 * x.powi(-3) + if x >= 99.0 { 50.0 } else { 0.0 })
            .collect();
        let v = edge_integral(&e, &c, [80.0, 97.0], [99.0, 129.0]);
        assert!((v - 3050.0).abs() < 1.0, "{v}");
    }

    #[test]
    fn truth_matches_the_measured_mean() {
        // The expected value at a cell (from the specimen) agrees with the mean of many noisy
        // spectra there: at the true best cell and at an empty one.
        // Dopant hops would move the truth: switched off for this check.
        let mut cfg = Config::default();
        cfg.instrument.damage.dopant_hops = false;
        let inst = StemSimulator::new(cfg.instrument_config(), 0).unwrap();
        let mut task = StemEelsExplore::new(cfg, inst);
        let mut info = Info::new();
        task.reset(4, &mut info).unwrap();
        let truth = task.truth.clone().unwrap();
        let kbest = (0..truth.len())
            .max_by(|&a, &b| truth[a].total_cmp(&truth[b]))
            .unwrap();
        let kmin = (0..truth.len())
            .min_by(|&a, &b| truth[a].total_cmp(&truth[b]))
            .unwrap();
        for k in [kbest, kmin] {
            let n = 100;
            let v: Vec<f64> = (0..n)
                .map(|_| {
                    task.step(&Value::Discrete(k as i64), &mut info).unwrap();
                    f(&info, "value")
                })
                .collect();
            let mean = v.iter().sum::<f64>() / n as f64;
            let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
            println!(
                "cell {k}: truth {:.3}, measured {mean:.3} ± {sd:.3}",
                truth[k]
            );
            // Shot noise, and the small bias of a log-space fit to Poisson counts.
            assert!(
                (mean - truth[k]).abs() < 4.0 * sd / (n as f64).sqrt() + 0.03 * truth[kbest],
                "cell {k}: {mean} vs {}",
                truth[k]
            );
        }
        assert!(
            truth[kbest] > 2.0 * truth[kmin],
            "{} vs {}",
            truth[kbest],
            truth[kmin]
        );
    }

    #[test]
    fn heuristic_finds_a_dopant() {
        let mut env = TaskEnv::new("t", StemEelsExplore::from_config(None).unwrap());
        let mut low_regret = 0;
        for seed in 0..10 {
            let (mut obs, info) = env.reset(Some(seed)).unwrap();
            let tb = f(&info, "true_best");
            loop {
                let a = env.heuristic_action(&obs);
                let s = env.step(&a).unwrap();
                obs = s.obs;
                if s.terminated || s.truncated {
                    let r = f(&s.info, "regret");
                    println!("seed {seed}: true best {tb:.3}, regret {r:.3}");
                    if r < 0.25 * tb {
                        low_regret += 1;
                    }
                    break;
                }
            }
        }
        assert!(low_regret >= 8, "{low_regret}/10");
    }
}
