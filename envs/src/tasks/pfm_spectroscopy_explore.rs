//! `scopegym/PfmSpectroscopyExplore-v1`: choose where to measure switching-spectroscopy loops
//! on a ferroelectric film to find the point with the largest loop within a budget of
//! measurements (anchor: GPax/AEcroscopy active learning over BEPS maps).
//!
//! The area (default 2 µm, as the shared PbTiO₃ BEPS map) is divided into a `grid × grid`
//! lattice of measurement points (default 32², 62.5 nm apart; the recorded map is 50² at 40
//! nm). Each step measures one loop at the chosen point: a poling half cycle 0 → -A → 0
//! (`prepole_points`, so every loop starts from the same state, as the discarded first cycle
//! of a BEPS measurement), then the triangle 0 → +A → 0 → -A → 0 V (default 8.5 V in 24
//! points), summarized by its normalized loop area `|∮ R dV| / ((V_max - V_min)·R_span)` in
//! `[0, 1]` ([`despiked_loop_area`]: after a 3-point running median of the response, which
//! removes the single-point glitches of recorded loops), computed from the measured loop only
//! (`R_span`, the response range, is the config field `response_span`: by default 2 for the
//! simulator's reduced polarization in `[-1, 1]`, and for a recorded file the 99th percentile
//! over its loops of each despiked loop's range). On the simulated film (64² cells of 31 nm, relaxed
//! for 60 reduced time units at reset) loops open near domain walls and stay nearly closed
//! inside large domains, so the overview predicts where to look (structure → property, what
//! deep-kernel learning exploits).
//!
//! **History**: a loop writes a domain at its point and moves walls around it, which changes
//! the loops measured next to it and at the point itself (a loop measured again opens further:
//! the wake-up of a ferroelectric). Measured on the test split with random probing, a loop
//! within 1-4 grid spacings of earlier loops differs from the as-grown film's by 0.06-0.09
//! r.m.s., heavy-tailed (up to 0.6: a loop that opens only because of a wall an earlier loop
//! wrote, a "phantom"), 0.03 at 5 spacings and almost never beyond. Phantoms read as large as
//! the real large loops, so a score that counted them would pay for writing walls. Hence the
//! instrument-side rule a BEPS experiment follows: **only a loop measured on as-grown film
//! counts**, i.e. with no earlier loop within `history_radius` (default 250 nm, 4 spacings),
//! the point itself included. Other loops are observed (`measured_value`) but neither enter
//! the estimate nor earn reward. The rule uses the measurement log only; success is judged on
//! the fresh film.
//!
//! - **Posterior** ([`CellPosterior`], computed from the measured areas only): each point's
//!   area is an unknown mean with the prior `N(prior_mean, prior_sd²)`, each loop a measurement
//!   of it with the noise `noise_sd` (its repeatability; the three are config fields in area
//!   units, defaults measured on the simulator at medium), counted loops only (see History).
//!   The *recommended* point is the measured point with the largest posterior mean; the
//!   *score* `S` is that posterior mean (`S₀ = prior_mean`).
//! - **Reward**: `reward_scale · (S_t − S_{t−1})`: the return is `reward_scale · (S_T −
//!   prior_mean)`. The first loop earns only what its point's estimate exceeds the prior mean
//!   by, a single lucky reading is shrunk toward the prior, and a loop that does not count
//!   earns nothing. (With `history_radius = 0`, or on recorded loops, every loop counts and
//!   re-measuring a point moves its estimate toward its mean reading.)
//! - **Observation** (Dict, keys safe for torch `ModuleDict`): `overview`, a PFM image of the
//!   area taken at reset (`(pixels, pixels)` in `[0, 1]`, `(1 + cos phase)/2`: up domains
//!   bright; in real-data mode the recorded response at the first bias point, min-max scaled);
//!   `patches`, the `patch × patch` pixels of the overview centred on each point (`(grid²,
//!   patch, patch)`, 0 outside the image; left out when `patch = 0`); `measured_value`, the
//!   mean area measured at each point (`(grid, grid)`, 0 where unmeasured); `measured_count`,
//!   the loops measured at each point over the budget (`(grid, grid)`, `[0, 1]`); `pristine`,
//!   1 where a loop measured now would count (no loop within `history_radius` so far), else 0
//!   (`(grid, grid)`); `last_loop`,
//!   the last loop's response scaled to `[-1, 1]` by `R_span` (`(loop points,)`, 0 before the
//!   first). With the defaults that is 22.6 k floats; the 4-pixel patch (125 nm) spans the
//!   point's cell and half of each neighbour's, about the domain a loop writes.
//! - **Action** (Discrete, `grid²`): the point `row · grid + column`.
//! - **Episode**: `budget` loops (truncation, default 100); no terminal state.
//! - **Success** (`info["is_success"]`, every step, from ground truth): the true loop area of
//!   the recommended point is within `success_tolerance` (default 5 %) of the largest:
//!   `regret ≤ success_tolerance · true_best` (areas have a natural zero: a loop that does not
//!   open; they saturate near 0.6-0.75 where the tip switches its whole footprint, and 5 %
//!   admits about 1-3 % of the grid).
//! - **Info** (never in the observation): `area` and the coercive biases `v_up`, `v_down` of
//!   the loop just measured (each left out when the loop does not switch), `posterior_best`
//!   (`S`), `recommended`; where the source knows it, `true_best`, `true_recommended` (the loop
//!   area of the recommended point on the episode's fresh film) and `regret`
//!   (`true_best − true_recommended`).
//! - **Ground truth** (`truth`): the simulator snapshots the film at reset and measures loops on
//!   copies of it ([`LoopOracle`], the simulator's own spectroscopy, bit for bit). `"search"`
//!   (default) measures every second point of every second row, then the 5 × 5 neighbourhoods
//!   of the 16 largest (about 500 loops at 32², in parallel), and every recommended point when
//!   it is first recommended; `true_best` is the largest area so measured (equal to the
//!   exhaustive maximum on every episode checked by the test
//!   `truth_search_finds_the_exhaustive_maximum`: large loops come in bands along domain walls
//!   several points wide). `"exhaustive"` measures every point; `"off"` none. Recorded data are
//!   read off exactly.
//! - **Real data**: `real_data = "<path>"` serves the loops of an NSID HDF5 BEPS file
//!   (`Channel_000/generic/generic`, shape `(X, Y, bias)`, bias in `Channel_000/generic/Voltage`)
//!   instead of simulating them: the grid is the recorded one (50² for the shared file; `grid`
//!   and `pixels` are then ignored) and every recorded pixel is a point. The posterior's
//!   defaults are the simulator's; the shared file's areas (with its default `R_span`) have
//!   mean 0.01 and spread 0.03, and a recorded loop reads the same every time: set
//!   `prior_mean = 0.01`, `prior_sd = 0.03`, `noise_sd = 0.005` for it.
//! - **Heuristic**: first a coarse lattice (3 × 3 points); then the pristine unmeasured point
//!   with the largest upper confidence bound of two cheap models fitted to the measured areas:
//!   a structure model (loops open near domain walls: the mean area measured at each distance
//!   from the nearest wall of the overview) as the prior of a spatial kernel regression; over
//!   the last quarter of the budget, or once no pristine point is left, re-measure the counted
//!   point with the largest upper confidence bound of its mean (which counts only where every
//!   loop does).
//!
//! **Domain randomization** (each level's defaults; every range is split into train/test
//! bands; scanner drift is off so the measurement points stay where the ground truth was
//! taken):
//!
//! | parameter | easy | medium | hard |
//! |---|---|---|---|
//! | random-field disorder (r.m.s., reduced field; E_c = 0.87) | 0.25-0.35 | 0.2-0.4 | 0.15-0.5 |
//! | its correlation length (film cells of 15.6 nm) | 10 | 8-12 | 6-14 |
//! | pinning-site fraction | 0.02-0.05 | 0.02-0.1 | 0.05-0.2 |
//! | imprint (reduced field) | 0 | ±0.1 | ±0.2 |
//! | tip-film bias offset (shifts loops) | 0 V | ±0.5 V | ±1.5 V |
//! | tip field per volt (reduced/V) | 0.25 | 0.22-0.28 | 0.2-0.3 |
//! | tip field half width | 30 nm | 25-35 nm | 22-40 nm |
//! | settle time of the as-grown film (reduced units) | 60 | 60 | 60 |
//! | as-grown domain size; up fraction | 200-400 nm; 0.3-0.7 | 200-400 nm; 0.3-0.7 | 150-500 nm; 0.2-0.8 |
//! | PFM image amplitude noise; phase noise | 0.03; 5° | 0.02-0.06; 3-10° | 0.05-0.15; 5-20° |
//!
//! **Fidelity**: `fidelity = "full"` (the default) runs [`SpmSimulator`] as documented;
//! `fidelity = "fast"` runs its cheaper stages
//! ([`SpmFidelity::Fast`](scopegym_physics::spm::sim::SpmFidelity::Fast)): the same TDGL film,
//! with a time step 0.7 of the explicit scheme's stability limit (against 0.04), integrated
//! under the tip only where the waveform's peak field reaches 0.1 (reduced) plus 4 cells and
//! until the film settles; the overview frame without the topography channels and the z feedback
//! (`pfm.topography` off: the same PFM phase and amplitude model at the same drifted
//! positions); the ground truth uses the same model ([`LoopOracle`] replays the
//! simulator's spectroscopy bit for bit at either fidelity). The test
//! `fast_and_full_observe_the_same_statistics` compares loop areas, coercive biases, rewards,
//! the true best area and the overview images under both.
//!
//! The simulated loops carry no read-out noise of their own (the instrument's
//! `point_spectroscopy` returns the film's mean polarization under the tip); their variation
//! comes from the film's history under earlier loops.

use crate::env::{Info, InfoValue, RgbImage, Task, TaskStep};
use crate::error::{EnvError, Result};
use crate::level::{Difficulty, Split};
use crate::space::{Space, Value};
use crate::tasks::stem_eels_explore::{CellPosterior, cell_patches, check_posterior, f, u};
use crate::tasks::{Fidelity, NewEpisode, TaskConfig, config_from_toml, pfm_simulator};
use rayon::prelude::*;
use scopegym_physics::instrument::{PointSpectroscopy, ScanSettings, SpmInstrument, SpmMode};
use scopegym_physics::spm::ferro::{FerroFilm, TipProtocol, loop_coercive, triangle_waveform};
use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
use scopegym_physics::spm::surface::SurfaceKind;
use serde::{Deserialize, Serialize};

/// How much ground truth to compute (simulator).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TruthMode {
    /// A coarse lattice and the neighbourhoods of its best points, plus every recommended point
    /// (module docs).
    #[default]
    Search,
    /// Every grid point.
    Exhaustive,
    /// None (no `regret`, `is_success` always false).
    Off,
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
    /// Which SPM model runs (`"fast"` or `"full"`, [`Fidelity`]; it sets
    /// `instrument.fidelity`). Default `"full"`: the fast model matches the statistics the task
    /// observes only within the tolerances its test `fast_and_full_observe_the_same_statistics`
    /// states.
    pub fidelity: Fidelity,
    /// The simulated instrument (PFM mode; a 64² film over 1 µm, randomized per level).
    pub instrument: SpmConfig,
    /// Recorded loops to serve instead of simulating (path of an NSID HDF5 BEPS file).
    pub real_data: Option<String>,
    /// Measurement points per side (simulator). Default 32.
    pub grid: usize,
    /// Pixels per side of the overview image (simulator). Default 64.
    pub pixels: usize,
    /// Side of the overview patch observed per point, pixels (0: no `patches` key). Default 4.
    pub patch: usize,
    /// Side of the explored (square) area, m (simulator). Default 1 µm.
    pub field: f64,
    /// Measurements per episode. Default 100.
    pub budget: usize,
    /// Amplitude of the simulated triangle waveform, V. Default 8.5.
    pub loop_amplitude: f64,
    /// Points of the simulated waveform. Default 24.
    pub loop_points: usize,
    /// Points of the poling half cycle 0 → -A → 0 applied before each simulated loop, so that
    /// every loop starts from the same (down) state, as the first, discarded cycle of a BEPS
    /// measurement (0: none; the loop then depends on the as-grown polarity under the tip).
    /// Its responses are not part of the loop. Default 6.
    pub prepole_points: usize,
    /// The response range `R_span` that normalizes loop areas, in response units (simulator:
    /// reduced polarization; recorded data: the file's units). Default: 2 for the simulator,
    /// the 99th percentile of the (despiked) recorded loops' ranges.
    pub response_span: Option<f64>,
    /// Prior mean of a point's loop area, area units. Default 0.07 (the mean area over the
    /// grid at medium: most points, inside domains, barely open a loop).
    pub prior_mean: f64,
    /// Prior standard deviation of a point's loop area. Default 0.16 (the spread at medium).
    pub prior_sd: f64,
    /// Standard deviation of one counted loop's area around the fresh film's at its point, area
    /// units. Default 0.1: the history the radius leaves (0.03-0.09 r.m.s. at 4-5 spacings from
    /// earlier loops, heavy-tailed; module docs); a real instrument sets its repeatability.
    pub noise_sd: f64,
    /// Success when the recommended point's true regret is at most this fraction of the true
    /// best area. Default 0.05 (the areas saturate near 0.6-0.75 where loops switch fully: 10 %
    /// admits up to 8 % of the grid at medium, so random probing would often pass).
    pub success_tolerance: f64,
    /// Reward per unit of posterior loop area gained. Default 10.
    pub reward_scale: f64,
    /// History radius, m: a loop counts toward the estimate (and the recommendation) only if
    /// no loop at another point within this distance came before it, i.e. the film there was
    /// as grown. Default 320 nm (five spacings of the default grid: the simulated film changes
    /// within that distance of a loop, module docs); 0 counts every loop. Ignored for recorded
    /// loops, which have no history.
    pub history_radius: f64,
    /// Ground truth to compute (`"search"`, `"exhaustive"` or `"off"`; module docs). Default
    /// `"search"`.
    pub truth: TruthMode,
}

/// The instrument at a difficulty level (module docs).
fn instrument_at(d: Difficulty) -> SpmConfig {
    let mut ins = SpmConfig::default().without_scanner_imperfections();
    ins.mode = SpmMode::Pfm;
    // A 2 µm film (as the shared BEPS map) of 64² cells (31 nm).
    ins.sample.size = f(2e-6);
    ins.sample.pixels = 64;
    ins.sample.crash_threshold = f(1e-6);
    ins.scan.pixels = [64, 64];
    ins.scan.size = f(2e-6);
    ins.scan.line_rate = f(2.0);
    ins.surface.kind = SurfaceKind::Flat;
    ins.tip.wear_rate = f(0.0);
    let p = &mut ins.pfm;
    p.point_time = f(0.5e-3);
    // The as-grown film relaxes for 60 reduced time units at reset (the simulator's default 2
    // leaves it coarsening): a loop then changes the film only where the tip switches it, so
    // later loops nearby read what a fresh film would (within 0.04 r.m.s. at medium, against
    // 0.22 with a 2-unit settle, whose domains keep moving wherever a loop runs).
    p.settle_time = f(60.0);
    p.domain_size = d.pick(u(200e-9, 400e-9), u(200e-9, 400e-9), u(150e-9, 500e-9));
    p.up_fraction = d.pick(u(0.3, 0.7), u(0.3, 0.7), u(0.2, 0.8));
    p.bias_offset = d.pick(f(0.0), u(-0.5, 0.5), u(-1.5, 1.5));
    p.field_per_volt = d.pick(f(0.25), u(0.22, 0.28), u(0.2, 0.3));
    // (The simulator's spectroscopy window is ±12 film cells up to a 3-cell (94 nm) tip width
    // and grows beyond: the cost of a loop is fixed over these ranges.)
    p.tip_width = d.pick(f(30e-9), u(25e-9, 35e-9), u(22e-9, 40e-9));
    p.amplitude_noise = d.pick(f(0.03), u(0.02, 0.06), u(0.05, 0.15));
    p.phase_noise = d.pick(
        f(5f64.to_radians()),
        u(3f64.to_radians(), 10f64.to_radians()),
        u(5f64.to_radians(), 20f64.to_radians()),
    );
    let fe = &mut ins.ferroelectric;
    // Time step 0.04 (stable below 0.074 for these coefficients): loop areas within 0.015 of
    // dt = 0.02's at half the cost.
    fe.dt = f(0.04);
    fe.random_field = d.pick(u(0.25, 0.35), u(0.2, 0.4), u(0.15, 0.5));
    // Disorder correlated over ~150 nm (10 cells), a few grid spacings, so loop properties vary
    // smoothly and the neighbourhood of a good loop is worth probing.
    fe.random_field_correlation = d.pick(f(10.0), u(8.0, 12.0), u(6.0, 14.0));
    fe.pinning_fraction = d.pick(u(0.02, 0.05), u(0.02, 0.1), u(0.05, 0.2));
    fe.imprint = d.pick(f(0.0), u(-0.1, 0.1), u(-0.2, 0.2));
    ins
}

impl Default for Config {
    fn default() -> Self {
        Self::at_level(Difficulty::Medium)
    }
}

impl TaskConfig for Config {
    fn at_level(difficulty: Difficulty) -> Self {
        Self {
            difficulty,
            split: Split::Train,
            fidelity: Fidelity::Full,
            instrument: instrument_at(difficulty),
            real_data: None,
            grid: 32,
            pixels: 64,
            patch: 4,
            field: 2e-6,
            budget: 100,
            loop_amplitude: 8.5,
            loop_points: 24,
            prepole_points: 6,
            response_span: None,
            prior_mean: 0.07,
            prior_sd: 0.16,
            noise_sd: 0.1,
            success_tolerance: 0.05,
            reward_scale: 10.0,
            history_radius: 250e-9,
            truth: TruthMode::Search,
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
        if !(2..=128).contains(&self.grid) {
            return bad("grid", format!("must be 2..=128, got {}", self.grid));
        }
        if !(4..=512).contains(&self.pixels) {
            return bad("pixels", format!("must be 4..=512, got {}", self.pixels));
        }
        if self.patch > 32 || self.patch > self.pixels {
            return bad(
                "patch",
                format!("must be 0..=min(32, pixels), got {}", self.patch),
            );
        }
        if !(self.field > 0.0 && self.field <= self.instrument.sample.size.get()) {
            return bad(
                "field",
                format!("must be in (0, instrument.sample.size], got {}", self.field),
            );
        }
        if !(1..=100_000).contains(&self.budget) {
            return bad("budget", format!("must be 1..=100000, got {}", self.budget));
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
        if self.prepole_points > 1000 {
            return bad(
                "prepole_points",
                format!("must be 0..=1000, got {}", self.prepole_points),
            );
        }
        if let Some(s) = self.response_span.filter(|s| !(s.is_finite() && *s > 0.0)) {
            return bad(
                "response_span",
                format!("must be finite and positive, got {s}"),
            );
        }
        check_posterior(self.prior_mean, self.prior_sd, self.noise_sd)?;
        if !(self.history_radius.is_finite() && self.history_radius >= 0.0) {
            return bad(
                "history_radius",
                format!("must be finite and ≥ 0 m, got {}", self.history_radius),
            );
        }
        if !(self.success_tolerance.is_finite() && self.success_tolerance >= 0.0) {
            return bad(
                "success_tolerance",
                format!("must be finite and ≥ 0, got {}", self.success_tolerance),
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

/// Response `k` of a closed loop after a 3-point running median (circular): single-point
/// glitches removed, monotone runs kept.
fn despiked(r: &[f64], k: usize) -> f64 {
    let n = r.len();
    let (a, b, c) = (r[(k + n - 1) % n], r[k], r[(k + 1) % n]);
    a.max(b).min(a.min(b).max(c))
}

/// [`loop_area`] of the loop after a 3-point running median of the response (as BEPS analysis
/// removes single-point glitches before fitting). Allocates nothing.
pub fn despiked_loop_area(bias: &[f64], response: &[f64], span: f64) -> f64 {
    let n = bias.len().min(response.len());
    if n < 3 {
        return 0.0;
    }
    let r = &response[..n];
    let mut twice = 0.0;
    for k in 0..n {
        let l = (k + 1) % n;
        twice += bias[k] * despiked(r, l) - bias[l] * despiked(r, k);
    }
    let (lo, hi) = bias[..n]
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let a = 0.5 * twice.abs() / ((hi - lo) * span);
    if a.is_finite() {
        a.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// A file of the shared real-instrument data: `$SCOPEGYM_DATA_DIR/<name>`, else
/// `shared/data/<name>` in the nearest folder at or above `start` that has one (a checkout's
/// sibling `../shared/data`). `None`, with a `SKIPPED` line on stderr for the tests that need
/// it, when there is no such file.
pub fn find_shared_data(name: &str, start: &std::path::Path) -> Option<std::path::PathBuf> {
    let found = match std::env::var_os("SCOPEGYM_DATA_DIR") {
        Some(d) => Some(std::path::PathBuf::from(d).join(name)),
        None => start
            .ancestors()
            .map(|a| a.join("shared/data").join(name))
            .find(|f| f.is_file()),
    }
    .filter(|f| f.is_file());
    if found.is_none() {
        eprintln!("SKIPPED: real data {name} not found (set SCOPEGYM_DATA_DIR)");
    }
    found
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
    /// The 99th percentile over loops of each loop's range after a 3-point running median (the
    /// default `R_span`).
    pub span: f64,
    /// The median over loops of each loop's midpoint (likewise).
    pub centre: f64,
}

impl RecordedLoops {
    /// Reads the BEPS map of an NSID HDF5 file: its first main dataset with two spatial axes and
    /// one spectral axis in volts ([`crate::nsid`]; `Channel_000/generic/generic` with its
    /// `Voltage` scale in the shared file).
    pub fn open(path: &str) -> Result<Self> {
        let err = |e: String| EnvError::config("real_data", e);
        let sets = crate::nsid::read_main_datasets(std::path::Path::new(path))
            .map_err(|e| err(e.to_string()))?;
        let ds = sets.iter().find(|d| Self::is_beps(d)).ok_or_else(|| {
            err(format!(
                "{path}: no main dataset with two spatial axes and one spectral axis in V \
                     (found {})",
                sets.iter()
                    .map(|d| format!("`{}` {:?}", d.path, d.shape))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        Self::from_dataset(ds).map_err(|e| err(format!("{path}: {e}")))
    }

    /// Whether `d` is a BEPS map: two spatial axes and one spectral axis in volts.
    pub fn is_beps(d: &crate::nsid::MainDataset) -> bool {
        use crate::nsid::DimensionType as T;
        let spectral = d.axes_of(T::Spectral);
        d.shape.len() == 3
            && d.axes_of(T::Spatial).len() == 2
            && spectral.len() == 1
            && d.axes[spectral[0]].units.trim() == "V"
    }

    /// The loops of a BEPS main dataset ([`Self::is_beps`]), reordered to `(x, y, bias)`: `x`
    /// is the spatial axis named `x` (any case), else the first spatial axis.
    pub fn from_dataset(d: &crate::nsid::MainDataset) -> std::result::Result<Self, String> {
        use crate::nsid::DimensionType as T;
        if !Self::is_beps(d) {
            return Err(format!(
                "`{}`: expected two spatial axes and one spectral axis in V, got shape {:?}",
                d.path, d.shape
            ));
        }
        let sp = d.axes_of(T::Spatial);
        let (ax, ay) = if d.axes[sp[1]].name.eq_ignore_ascii_case("x") {
            (sp[1], sp[0])
        } else {
            (sp[0], sp[1])
        };
        let ab = d.axes_of(T::Spectral)[0];
        let shape = &d.shape;
        if shape.contains(&0) {
            return Err(format!("`{}`: empty shape {shape:?}", d.path));
        }
        let (nx, ny, m) = (shape[ax], shape[ay], shape[ab]);
        let strides = [shape[1] * shape[2], shape[2], 1];
        let mut data = Vec::with_capacity(nx * ny * m);
        for x in 0..nx {
            for y in 0..ny {
                for b in 0..m {
                    data.push(d.data[x * strides[ax] + y * strides[ay] + b * strides[ab]]);
                }
            }
        }
        let bias = d.axes[ab].values.clone();
        // Robust scales (recorded loops carry single-point glitches a hundred times the
        // loops' size, and the despiked loops' ranges still spread over four decades): the
        // 99th percentile over loops of each despiked loop's range, the median midpoint.
        let (mut ranges, mut mids): (Vec<f64>, Vec<f64>) = data
            .chunks_exact(m)
            .map(|l| {
                let (lo, hi) = (0..m)
                    .map(|k| despiked(l, k))
                    .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
                (hi - lo, 0.5 * (hi + lo))
            })
            .unzip();
        let quantile = |v: &mut Vec<f64>, q: f64| {
            v.sort_by(f64::total_cmp);
            v[((v.len() - 1) as f64 * q).round() as usize]
        };
        Ok(Self {
            shape: [nx, ny],
            bias,
            data,
            span: quantile(&mut ranges, 0.99).max(1e-30),
            centre: quantile(&mut mids, 0.5),
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

/// The simulator's ground truth of loops: the film as it was at the start of the episode and
/// the spectroscopy settings, so that the loop at any point can be measured on a fresh copy,
/// exactly as [`SpmSimulator`]'s `point_spectroscopy` would have measured it there first.
#[derive(Debug, Clone)]
pub struct LoopOracle {
    film: FerroFilm,
    /// Film cell size, m, and cells per side.
    cell: f64,
    cells: f64,
    /// Sample displacement at the snapshot (drift), m.
    drift: [f64; 2],
    /// How the tip probes the film, and TDGL steps per waveform point.
    tip: TipProtocol,
    steps: usize,
}

impl LoopOracle {
    /// A snapshot of `sim`'s film and spectroscopy settings (`None` outside PFM mode).
    pub fn from_simulator(sim: &SpmSimulator) -> Option<Self> {
        let film = sim.film()?.clone();
        let c = sim.config();
        // The simulator's rules (its tip protocol and time steps), checked bit for bit
        // against its `point_spectroscopy` in this module's tests.
        Some(Self {
            film,
            cell: sim.cell_size(),
            cells: c.sample.pixels as f64,
            drift: sim.drift(),
            tip: sim.tip_protocol()?,
            steps: sim.reduced_steps(c.pfm.point_time.get()),
        })
    }

    /// The loop (response per waveform point) at lab position `p` (m) under `waveform` (V), on
    /// a fresh copy of the film.
    pub fn response(&self, p: [f64; 2], waveform: &[f64]) -> Vec<f64> {
        let mut film = self.film.clone();
        let s = [p[0] - self.drift[0], p[1] - self.drift[1]];
        let x = s[0] / self.cell + 0.5 * self.cells - 0.5;
        let y = s[1] / self.cell + 0.5 * self.cells - 0.5;
        film.tip_spectroscopy(x, y, waveform, self.steps, &self.tip)
    }

    /// Normalized loop areas ([`loop_area`] with `span`, over the waveform from `loop_start`)
    /// at `positions`, each on a fresh copy: in parallel on rayon's global pool for a lone env,
    /// in order on the calling thread inside a vector env (which shares the envs among the
    /// threads it was given: `--threads 1` means one). The areas are the same either way.
    pub fn areas(
        &self,
        positions: &[[f64; 2]],
        waveform: &[f64],
        loop_start: usize,
        span: f64,
    ) -> Vec<f64> {
        let s = loop_start.min(waveform.len());
        let area = |&p: &[f64; 2]| {
            despiked_loop_area(&waveform[s..], &self.response(p, waveform)[s..], span)
        };
        if crate::vector::in_vector_env() {
            positions.iter().map(area).collect()
        } else {
            positions.par_iter().map(area).collect()
        }
    }
}

/// Ground truth of loops where the instrument can tell it (simulators).
pub trait LoopTruth {
    /// A snapshot of the current episode's film (taken right after `new_episode`, before any
    /// loop), or `None` where the truth is unknown (a real instrument: the default).
    fn loop_oracle(&self) -> Option<LoopOracle> {
        None
    }
}

impl LoopTruth for SpmSimulator {
    fn loop_oracle(&self) -> Option<LoopOracle> {
        LoopOracle::from_simulator(self)
    }
}

/// The simulated waveform: a poling half cycle 0 → -A → 0 in `prepole` points (the first at
/// `-A/h`, up to `-A`, back toward 0), then the loop 0 → +A → 0 → -A → 0 in `points` points.
pub fn poled_waveform(amplitude: f64, points: usize, prepole: usize) -> Vec<f64> {
    let h = prepole.div_ceil(2) as f64;
    let mut w: Vec<f64> = (0..prepole)
        .map(|i| {
            let i = i.min(prepole - 1 - i) as f64 + 1.0;
            -amplitude * i / h
        })
        .collect();
    w.extend(triangle_waveform(amplitude, points));
    w
}

/// Length scale of the heuristic's kernel regression, grid spacings.
const HEURISTIC_LENGTH: f64 = 1.5;
/// Weight of the heuristic's uncertainty bonus.
const HEURISTIC_KAPPA: f64 = 0.5;

/// Distance bins (grid spacings from a domain wall) of the heuristic's structure model.
const WALL_BINS: usize = 9;

/// Distance (pixels, chamfer 3-4 approximation of the Euclidean) from each pixel of a `p × p`
/// image to the nearest domain wall: a pixel with a 4-neighbour on the other side of 0.5. An
/// image without walls reads `2p` everywhere.
fn wall_distance(img: &[f32], p: usize) -> Vec<f64> {
    let up = |k: usize| img[k] > 0.5;
    let far = 6.0 * p as f64;
    let mut d: Vec<f64> = (0..p * p)
        .map(|k| {
            let (i, j) = (k / p, k % p);
            let wall = (i > 0 && up(k - p) != up(k))
                || (i + 1 < p && up(k + p) != up(k))
                || (j > 0 && up(k - 1) != up(k))
                || (j + 1 < p && up(k + 1) != up(k));
            if wall { 0.0 } else { far }
        })
        .collect();
    let steps = [
        (0i64, -1i64, 3.0),
        (-1, -1, 4.0),
        (-1, 0, 3.0),
        (-1, 1, 4.0),
    ];
    for pass in 0..2 {
        for t in 0..p * p {
            let k = if pass == 0 { t } else { p * p - 1 - t };
            let (i, j) = ((k / p) as i64, (k % p) as i64);
            for &(di, dj, w) in &steps {
                let (di, dj) = if pass == 0 { (di, dj) } else { (-di, -dj) };
                let (ni, nj) = (i + di, j + dj);
                if (0..p as i64).contains(&ni) && (0..p as i64).contains(&nj) {
                    let v = d[ni as usize * p + nj as usize] + w;
                    if v < d[k] {
                        d[k] = v;
                    }
                }
            }
        }
    }
    d.iter().map(|v| (v / 3.0).min(2.0 * p as f64)).collect()
}

/// Upper bound of the `last_loop` entries' magnitude.
const LOOP_MAX: f32 = 1.0;

/// The task over any PFM instrument `I` with point spectroscopy, or over recorded loops.
#[derive(Debug)]
pub struct PfmSpectroscopyExplore<I> {
    cfg: Config,
    source: Source<I>,
    /// Points per side and overview pixels per side (the recorded grid in real-data mode).
    grid: usize,
    pixels: usize,
    /// The applied waveform (poling points, then the loop) and where the loop starts.
    waveform: Vec<f64>,
    loop_start: usize,
    /// `R_span` and the response's centre (for `last_loop`).
    span: f64,
    centre: f64,
    overview: Vec<f32>,
    patches: Vec<f32>,
    post: CellPosterior,
    measured_value: Vec<f32>,
    measured_count: Vec<f32>,
    /// 1 where a loop measured now would count toward the estimate (no loop at another point
    /// within `history_radius` so far), else 0.
    pristine: Vec<f32>,
    /// The history radius in grid spacings (0: off), and every loop's sum and count (the
    /// observation's `measured_value`, counted or not).
    history: f64,
    read_sum: Vec<f64>,
    read_count: Vec<u32>,
    last_loop: Vec<f32>,
    score: f64,
    oracle: Option<LoopOracle>,
    /// True areas known so far (NaN: not computed).
    truth: Vec<f64>,
    true_best: Option<f64>,
}

/// The model of `cfg`'s instrument at its `fidelity`, seeded with `seed`, as the task runs it.
/// Whoever serves the task on the simulator (the MCP server, deployments) builds it here.
pub fn simulator(cfg: &Config, seed: u64) -> scopegym_physics::Result<SpmSimulator> {
    pfm_simulator(&cfg.instrument, cfg.fidelity, seed)
}

impl PfmSpectroscopyExplore<SpmSimulator> {
    /// The task on the simulator, or on recorded loops when `real_data` is set, from an optional
    /// TOML config.
    pub fn from_config(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Config = config_from_toml(config)?;
        cfg.validate()?;
        let source = match &cfg.real_data {
            Some(path) => Source::Recorded(RecordedLoops::open(path)?),
            None => {
                let mut sim = simulator(&cfg, 0)?;
                sim.set_region(cfg.split.region());
                Source::Instrument(sim)
            }
        };
        Self::with_source(cfg, source)
    }
}

impl<I: SpmInstrument + PointSpectroscopy + LoopTruth + NewEpisode + Send>
    PfmSpectroscopyExplore<I>
{
    /// The task on `inst` with `cfg` (`cfg.real_data` is ignored).
    pub fn new(cfg: Config, mut inst: I) -> Self {
        inst.set_region(cfg.split.region());
        Self::with_source(cfg, Source::Instrument(inst)).expect("a simulator source is valid")
    }

    fn with_source(cfg: Config, source: Source<I>) -> Result<Self> {
        let (grid, pixels, waveform, span, centre) = match &source {
            Source::Instrument(_) => (
                cfg.grid,
                cfg.pixels,
                poled_waveform(cfg.loop_amplitude, cfg.loop_points, cfg.prepole_points),
                cfg.response_span.unwrap_or(2.0),
                0.0,
            ),
            Source::Recorded(rec) => {
                let [nx, ny] = rec.shape;
                if nx != ny || nx < 2 {
                    return Err(EnvError::config(
                        "real_data",
                        format!("needs a square grid of at least 2 × 2 points, got {nx} × {ny}"),
                    ));
                }
                (
                    nx,
                    nx,
                    rec.bias.clone(),
                    cfg.response_span.unwrap_or(rec.span),
                    rec.centre,
                )
            }
        };
        let n = grid * grid;
        let loop_start = match &source {
            Source::Instrument(_) => cfg.prepole_points,
            Source::Recorded(_) => 0,
        };
        Ok(Self {
            post: CellPosterior::new(n, cfg.prior_mean, cfg.prior_sd, cfg.noise_sd),
            overview: vec![0.0; pixels * pixels],
            patches: vec![0.0; n * cfg.patch * cfg.patch],
            measured_value: vec![0.0; n],
            measured_count: vec![0.0; n],
            pristine: vec![1.0; n],
            history: match &source {
                Source::Instrument(_) => cfg.history_radius / (cfg.field / grid as f64),
                Source::Recorded(_) => 0.0,
            },
            read_sum: vec![0.0; n],
            read_count: vec![0; n],
            last_loop: vec![0.0; waveform.len() - loop_start],
            loop_start,
            score: cfg.prior_mean,
            oracle: None,
            truth: vec![f64::NAN; n],
            true_best: None,
            grid,
            pixels,
            waveform,
            span,
            centre,
            cfg,
            source,
        })
    }

    /// Marks `k` and the points within the history radius of it as no longer pristine.
    fn mark_history(&mut self, k: usize) {
        let (g, r) = (self.grid, self.history);
        if r <= 0.0 {
            return;
        }
        self.pristine[k] = 0.0;
        let (ki, kj) = ((k / g) as i64, (k % g) as i64);
        let reach = r.floor() as i64;
        for i in (ki - reach).max(0)..=(ki + reach).min(g as i64 - 1) {
            for j in (kj - reach).max(0)..=(kj + reach).min(g as i64 - 1) {
                let d2 = ((i - ki).pow(2) + (j - kj).pow(2)) as f64;
                if d2 > 0.0 && d2 <= r * r {
                    self.pristine[i as usize * g + j as usize] = 0.0;
                }
            }
        }
    }

    /// Lab position of grid point `k`, m.
    fn position(&self, k: usize) -> [f64; 2] {
        let g = self.grid;
        let at = |i: usize| ((i as f64 + 0.5) / g as f64 - 0.5) * self.cfg.field;
        [at(k % g), at(k / g)]
    }

    /// Measures grid point `k`: (response, area). The response is that of the instrument, or
    /// the recorded loop of pixel `(x, y) = (k % grid, k / grid)`.
    fn measure(&mut self, k: usize) -> Result<(Vec<f64>, f64)> {
        let pos = self.position(k);
        let r = match &mut self.source {
            Source::Instrument(inst) => inst.point_spectroscopy(pos, &self.waveform)?,
            Source::Recorded(rec) => rec.loop_at(k % self.grid, k / self.grid).to_vec(),
        };
        let s = self.loop_start.min(r.len());
        let a = despiked_loop_area(&self.waveform[s..], &r[s..], self.span);
        Ok((r, a))
    }

    /// Computes the true areas of the points `ks` not known yet (simulator oracle).
    fn compute_truth(&mut self, ks: &[usize]) {
        let Some(oracle) = &self.oracle else {
            return;
        };
        let todo: Vec<usize> = ks
            .iter()
            .copied()
            .filter(|&k| self.truth[k].is_nan())
            .collect();
        let pos: Vec<[f64; 2]> = todo.iter().map(|&k| self.position(k)).collect();
        let areas = oracle.areas(&pos, &self.waveform, self.loop_start, self.span);
        for (k, a) in todo.into_iter().zip(areas) {
            self.truth[k] = a;
            self.true_best = Some(self.true_best.map_or(a, |b| b.max(a)));
        }
    }

    /// The simulator's ground truth at reset ([`TruthMode`]).
    fn initial_truth(&mut self) {
        let g = self.grid;
        let all: Vec<usize> = match self.cfg.truth {
            TruthMode::Off => return,
            TruthMode::Exhaustive => (0..g * g).collect(),
            TruthMode::Search => (0..g * g)
                .filter(|&k| (k / g) % 2 == 0 && (k % g) % 2 == 0)
                .collect(),
        };
        self.compute_truth(&all);
        if self.cfg.truth == TruthMode::Search {
            // The 5 × 5 neighbourhoods of the 16 largest coarse points.
            let mut coarse = all;
            coarse.sort_by(|&a, &b| self.truth[b].total_cmp(&self.truth[a]).then(a.cmp(&b)));
            let mut near = Vec::new();
            for &c in coarse.iter().take(16) {
                let (ci, cj) = ((c / g) as i64, (c % g) as i64);
                for di in -2..=2 {
                    for dj in -2..=2 {
                        let (i, j) = (ci + di, cj + dj);
                        if (0..g as i64).contains(&i) && (0..g as i64).contains(&j) {
                            near.push(i as usize * g + j as usize);
                        }
                    }
                }
            }
            near.sort_unstable();
            near.dedup();
            self.compute_truth(&near);
        }
    }

    /// Ground-truth entries of `info` for the current recommendation; whether it succeeds.
    fn truth_info(&mut self, info: &mut Info) -> bool {
        if let Some(r) = self.post.recommended() {
            self.compute_truth(&[r]);
        }
        let Some(best) = self.true_best else {
            return false;
        };
        info.insert("true_best".into(), InfoValue::F64(best));
        let Some(t) = self
            .post
            .recommended()
            .map(|r| self.truth[r])
            .filter(|t| !t.is_nan())
        else {
            return false;
        };
        let regret = (best - t).max(0.0);
        info.insert("true_recommended".into(), InfoValue::F64(t));
        info.insert("regret".into(), InfoValue::F64(regret));
        regret <= self.cfg.success_tolerance * best
    }

    fn obs(&self) -> Value {
        let mut d = Vec::with_capacity(6);
        d.push(("overview".into(), Value::Box(self.overview.clone())));
        if self.cfg.patch > 0 {
            d.push(("patches".into(), Value::Box(self.patches.clone())));
        }
        d.push((
            "measured_value".into(),
            Value::Box(self.measured_value.clone()),
        ));
        d.push((
            "measured_count".into(),
            Value::Box(self.measured_count.clone()),
        ));
        d.push(("pristine".into(), Value::Box(self.pristine.clone())));
        d.push(("last_loop".into(), Value::Box(self.last_loop.clone())));
        Value::Dict(d)
    }
}

impl<I: SpmInstrument + PointSpectroscopy + LoopTruth + NewEpisode + Send> Task
    for PfmSpectroscopyExplore<I>
{
    fn observation_space(&self) -> Space {
        let (g, p, s) = (self.grid, self.pixels, self.cfg.patch);
        let mut d = vec![("overview".into(), Space::uniform_box(&[p, p], 0.0, 1.0))];
        if s > 0 {
            d.push((
                "patches".into(),
                Space::uniform_box(&[g * g, s, s], 0.0, 1.0),
            ));
        }
        d.extend([
            (
                "measured_value".into(),
                Space::uniform_box(&[g, g], 0.0, 1.0),
            ),
            (
                "measured_count".into(),
                Space::uniform_box(&[g, g], 0.0, 1.0),
            ),
            ("pristine".into(), Space::uniform_box(&[g, g], 0.0, 1.0)),
            (
                "last_loop".into(),
                Space::uniform_box(&[self.last_loop.len()], -LOOP_MAX, LOOP_MAX),
            ),
        ]);
        Space::Dict(d)
    }

    fn action_space(&self) -> Space {
        Space::Discrete {
            n: (self.grid * self.grid) as i64,
            start: 0,
        }
    }

    fn max_episode_steps(&self) -> usize {
        self.cfg.budget
    }

    fn reset(&mut self, seed: u64, info: &mut Info) -> Result<Value> {
        let (g, p) = (self.grid, self.pixels);
        self.post.clear();
        self.score = self.cfg.prior_mean;
        self.measured_value.fill(0.0);
        self.measured_count.fill(0.0);
        self.pristine.fill(1.0);
        self.read_sum.fill(0.0);
        self.read_count.fill(0);
        self.last_loop.fill(0.0);
        self.truth.fill(f64::NAN);
        self.true_best = None;
        self.oracle = None;
        let field = self.cfg.field;
        let truth = self.cfg.truth != TruthMode::Off;
        match &mut self.source {
            Source::Instrument(inst) => {
                inst.new_episode(seed, info)?;
                if truth {
                    self.oracle = inst.loop_oracle();
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
                self.overview.clear();
                self.overview.extend(ph.image.iter().map(|&d| {
                    let v = (0.5 * (1.0 + f64::from(d).to_radians().cos())) as f32;
                    if v.is_finite() {
                        v.clamp(0.0, 1.0)
                    } else {
                        0.0
                    }
                }));
            }
            Source::Recorded(rec) => {
                // Recorded loops are fixed: the seed only feeds the episode bookkeeping.
                info.insert("real_data".into(), InfoValue::Bool(true));
                let first: Vec<f64> = (0..p * p).map(|k| rec.loop_at(k % p, k / p)[0]).collect();
                let (lo, hi) = first
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let span = if hi > lo { hi - lo } else { 1.0 };
                self.overview.clear();
                self.overview.extend(
                    first
                        .iter()
                        .map(|v| ((v - lo) / span).clamp(0.0, 1.0) as f32),
                );
                if truth {
                    for k in 0..g * g {
                        self.truth[k] =
                            despiked_loop_area(&rec.bias, rec.loop_at(k % g, k / g), self.span);
                    }
                    self.true_best = Some(self.truth.iter().copied().fold(0.0, f64::max));
                }
            }
        }
        cell_patches(&self.overview, p, g, self.cfg.patch, &mut self.patches);
        self.initial_truth();
        self.truth_info(info);
        Ok(self.obs())
    }

    fn step(&mut self, action: &Value, info: &mut Info) -> Result<TaskStep> {
        let n = (self.grid * self.grid) as i64;
        let k = action
            .as_discrete()
            .filter(|k| (0..n).contains(k))
            .ok_or_else(|| EnvError::action("action", format!("expected a point in 0..{n}")))?
            as usize;
        let (resp, area) = self.measure(k)?;
        let half = 0.5 * self.span;
        let ls = self.loop_start.min(resp.len());
        for (o, &r) in self.last_loop.iter_mut().zip(&resp[ls..]) {
            let v = ((r - self.centre) / half) as f32;
            *o = if v.is_finite() {
                v.clamp(-LOOP_MAX, LOOP_MAX)
            } else {
                0.0
            };
        }
        // Only a loop on as-grown film counts; then the film within the history radius of k,
        // k included, is no longer as grown (a loop's own written walls open its next loops
        // further: the wake-up of a ferroelectric).
        let counted = self.pristine[k] > 0.5;
        if counted {
            self.post.add(k, area);
        }
        self.mark_history(k);
        if area.is_finite() {
            self.read_sum[k] += area;
            self.read_count[k] += 1;
        }
        let c = self.read_count[k];
        self.measured_value[k] = if c > 0 {
            ((self.read_sum[k] / f64::from(c)) as f32).clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.measured_count[k] = (c as f32 / self.cfg.budget as f32).min(1.0);
        let score = self.post.score();
        let reward = self.cfg.reward_scale * (score - self.score);
        self.score = score;
        let (up, down) = loop_coercive(&self.waveform[ls..], &resp[ls..]);
        info.insert("area".into(), InfoValue::F64(area));
        info.insert("counted".into(), InfoValue::Bool(counted));
        // A loop that does not switch has no coercive bias: the key is left out (NaN would
        // make equal infos compare unequal).
        if let Some(up) = up {
            info.insert("v_up".into(), InfoValue::F64(up));
        }
        if let Some(down) = down {
            info.insert("v_down".into(), InfoValue::F64(down));
        }
        info.insert("posterior_best".into(), InfoValue::F64(score));
        if let Some(r) = self.post.recommended() {
            info.insert("recommended".into(), InfoValue::I64(r as i64));
        }
        let success = self.truth_info(info);
        Ok(TaskStep {
            obs: self.obs(),
            reward: if reward.is_finite() { reward } else { 0.0 },
            terminated: false,
            success,
        })
    }

    fn render(&self) -> RgbImage {
        // The overview, with measured points tinted by their loop area (red = large) and the
        // recommended point in yellow.
        let (p, g) = (self.pixels, self.grid);
        let mut img = RgbImage::from_grey(&self.overview, p, p);
        let rec = self.post.recommended();
        for k in 0..g * g {
            if self.post.count(k) == 0 {
                continue;
            }
            let (i, j) = ((k / g) * p / g + p / (2 * g), (k % g) * p / g + p / (2 * g));
            let o = 3 * (i.min(p - 1) * p + j.min(p - 1));
            let a = (self.measured_value[k].clamp(0.0, 1.0) * 255.0) as u8;
            let c = if Some(k) == rec {
                [255, 255, 0]
            } else {
                [a.max(64), 0, 255 - a]
            };
            img.data[o..o + 3].copy_from_slice(&c);
        }
        img
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        let (g, budget) = (self.grid, self.cfg.budget);
        let (Some(value), Some(count)) = (
            obs.get("measured_value").and_then(Value::as_box),
            obs.get("measured_count").and_then(Value::as_box),
        ) else {
            return Value::Discrete(0);
        };
        if value.len() != g * g || count.len() != g * g {
            return Value::Discrete(0);
        }
        let n: Vec<u32> = count
            .iter()
            .map(|&c| (f64::from(c) * budget as f64).round() as u32)
            .collect();
        // Which loops would count (no history nearby); all of them without the key.
        let pristine: Vec<bool> = match obs.get("pristine").and_then(Value::as_box) {
            Some(p) if p.len() == g * g => p.iter().map(|&v| v > 0.5).collect(),
            _ => vec![true; g * g],
        };
        // Confirm: re-measure the counted point with the largest upper confidence bound of its
        // mean (two noise standard errors above it), over the last quarter of the budget or
        // once no point is left whose loop would count.
        let confirm = || {
            let se = self.cfg.noise_sd;
            (0..g * g)
                .filter(|&k| n[k] > 0 && pristine[k])
                .map(|k| (f64::from(value[k]) + 2.0 * se / f64::from(n[k]).sqrt(), k))
                .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)))
                .map(|(_, k)| Value::Discrete(k as i64))
        };
        let taken: u32 = n.iter().sum();
        let fresh_left = (0..g * g).any(|k| n[k] == 0 && pristine[k]);
        if taken as usize >= budget - budget / 4 || !fresh_left {
            if let Some(a) = confirm() {
                return a;
            }
        }
        // A coarse lattice first (3 × 3 points), to start the models.
        let stride = ((g as f64 / 3.0).round() as usize).max(1);
        let off = stride / 2;
        for i in (off..g).step_by(stride) {
            for j in (off..g).step_by(stride) {
                if n[i * g + j] == 0 && pristine[i * g + j] {
                    return Value::Discrete((i * g + j) as i64);
                }
            }
        }
        // Then an upper confidence bound from two cheap models of the area: a structure model
        // (loops open near domain walls: the mean area measured so far at each distance from
        // the nearest wall in the overview, in grid spacings) as the prior of a spatial one
        // (Gaussian-weighted measured areas within a few spacings).
        let Some(ov) = obs.get("overview").and_then(Value::as_box) else {
            return Value::Discrete(0);
        };
        let p = self.pixels;
        if ov.len() != p * p {
            return Value::Discrete(0);
        }
        let dist = wall_distance(ov, p);
        let cell = p as f64 / g as f64;
        let bin = |k: usize| {
            let (i, j) = (k / g, k % g);
            let (pi, pj) = (
                (((i as f64 + 0.5) * cell) as usize).min(p - 1),
                (((j as f64 + 0.5) * cell) as usize).min(p - 1),
            );
            let d = ((dist[pi * p + pj] / cell).round() as usize).min(WALL_BINS - 1);
            // Separate bins for the up and the down side of a wall.
            if ov[pi * p + pj] > 0.5 {
                d
            } else {
                WALL_BINS + d
            }
        };
        let (m0, s0) = (self.cfg.prior_mean, self.cfg.prior_sd);
        let (mut bsum, mut bn) = ([0.0f64; 2 * WALL_BINS], [0.0f64; 2 * WALL_BINS]);
        let mut measured = Vec::new();
        for k in (0..g * g).filter(|&k| n[k] > 0) {
            let y = f64::from(value[k]);
            bsum[bin(k)] += y;
            bn[bin(k)] += 1.0;
            measured.push(((k / g) as f64, (k % g) as f64, y));
        }
        let inv = 1.0 / (2.0 * HEURISTIC_LENGTH * HEURISTIC_LENGTH);
        let w0 = 0.3;
        let next = (0..g * g)
            .filter(|&k| n[k] == 0 && (pristine[k] || !fresh_left))
            .map(|k| {
                let b = bin(k);
                let prior = (bsum[b] + 2.0 * m0) / (bn[b] + 2.0);
                let (i, j) = ((k / g) as f64, (k % g) as f64);
                let (mut sw, mut swy) = (w0, w0 * prior);
                for &(mi, mj, y) in &measured {
                    let w = (-((mi - i).powi(2) + (mj - j).powi(2)) * inv).exp();
                    sw += w;
                    swy += w * y;
                }
                (swy / sw + HEURISTIC_KAPPA * s0 * (w0 / sw).sqrt(), k)
            })
            .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)))
            .map_or(0, |(_, k)| k);
        Value::Discrete(next as i64)
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
    use crate::tasks::testing::{assert_config_errors_name_fields, info_f64 as fv};
    use std::path::PathBuf;

    fn data_file() -> Option<PathBuf> {
        find_shared_data(
            "beps_pto_50x50.h5",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
        )
    }

    fn env(extra: &str) -> TaskEnv<PfmSpectroscopyExplore<SpmSimulator>> {
        let cfg: toml::Value = toml::from_str(extra).unwrap();
        TaskEnv::new(
            "t",
            PfmSpectroscopyExplore::from_config(Some(&cfg)).unwrap(),
        )
    }

    #[test]
    fn bad_config_names_the_field() {
        assert_config_errors_name_fields(
            PfmSpectroscopyExplore::from_config,
            &[
                ("grid = 1", "grid"),
                ("patch = 40", "patch"),
                ("budget = 0", "budget"),
                ("loop_points = 2", "loop_points"),
                ("prepole_points = 5000", "prepole_points"),
                ("response_span = 0.0", "response_span"),
                ("prior_sd = 0.0", "prior_sd"),
                ("noise_sd = -0.1", "noise_sd"),
                ("history_radius = -1e-9", "history_radius"),
                ("success_tolerance = -1.0", "success_tolerance"),
                ("truth = \"sometimes\"", "truth"),
                ("field = 1.0", "field"),
                ("nope = 1", "nope"),
            ],
        );
    }

    #[test]
    fn loop_area_and_the_poled_waveform() {
        let v = [0.0, 1.0, 1.0, 0.0];
        let r = [-1.0, -1.0, 1.0, 1.0];
        assert!((loop_area(&v, &r, 2.0) - 1.0).abs() < 1e-12);
        assert_eq!(loop_area(&v[..2], &r[..2], 2.0), 0.0);
        // A glitch a hundred times the loop's size does not count.
        let mut glitch = r;
        glitch[1] = 100.0;
        let (v8, r8) = (
            [0.0, 1.0, 1.0, 1.0, 0.0, 0.0],
            [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0],
        );
        let mut g8 = r8;
        g8[1] = -50.0;
        assert_eq!(
            despiked_loop_area(&v8, &g8, 2.0),
            despiked_loop_area(&v8, &r8, 2.0)
        );
        assert!(despiked_loop_area(&v8, &r8, 2.0) > 0.4);
        assert!(loop_area(&v, &glitch, 2.0) > 1.0 - 1e-12);
        let w = poled_waveform(6.0, 8, 4);
        assert_eq!(&w[..4], &[-3.0, -6.0, -6.0, -3.0]);
        assert_eq!(&w[4..], &triangle_waveform(6.0, 8)[..]);
        assert_eq!(poled_waveform(6.0, 8, 0), triangle_waveform(6.0, 8));
    }

    #[test]
    fn oracle_is_the_simulators_own_spectroscopy_bit_for_bit() {
        // The oracle replays SpmSimulator::point_spectroscopy on a copy of the film: the same
        // responses, bit for bit, as the simulator's first loop at each point, at every level
        // (tip widths and bias offsets are randomized).
        // Both fidelities.
        for (level, fidelity) in [
            (Difficulty::Easy, Fidelity::Full),
            (Difficulty::Hard, Fidelity::Full),
            (Difficulty::Medium, Fidelity::Fast),
            (Difficulty::Hard, Fidelity::Fast),
        ] {
            let cfg = Config::at_level(level);
            let w = poled_waveform(cfg.loop_amplitude, cfg.loop_points, cfg.prepole_points);
            let mut sim = crate::tasks::pfm_simulator(&cfg.instrument, fidelity, 0).unwrap();
            for (seed, p) in [
                (3u64, [0.0, 0.0]),
                (4, [-0.61e-6, 0.37e-6]),
                (5, [0.9e-6, -0.9e-6]),
            ] {
                sim.reset(seed).unwrap();
                let oracle = sim.loop_oracle().unwrap();
                let expected = oracle.response(p, &w);
                assert_eq!(
                    sim.point_spectroscopy(p, &w).unwrap(),
                    expected,
                    "{level:?} {seed}"
                );
            }
        }
    }

    #[test]
    fn truth_search_finds_the_exhaustive_maximum() {
        // 4 medium and 4 hard episodes: the search's best equals the maximum over every point.
        for (level, seeds) in [("medium", 0..4u64), ("hard", 10..14)] {
            let mut full = env(&format!("difficulty = \"{level}\"\ntruth = \"exhaustive\""));
            let mut fast = env(&format!("difficulty = \"{level}\""));
            for seed in seeds {
                let a = fv(&full.reset(Some(seed)).unwrap().1, "true_best");
                let b = fv(&fast.reset(Some(seed)).unwrap().1, "true_best");
                let computed = fast.task().truth.iter().filter(|v| !v.is_nan()).count();
                println!(
                    "{level} seed {seed}: exhaustive {a:.4}, search {b:.4} ({computed} loops)"
                );
                assert_eq!(a, b, "{level} seed {seed}");
                assert!(computed < 700);
            }
        }
    }

    #[test]
    fn only_loops_on_as_grown_film_count() {
        // History radius 250 nm = 4 spacings of 62.5 nm. A loop at (10, 10) makes its point and
        // every point within 4 spacings non-pristine; a loop there then earns nothing and does
        // not enter the estimate, but shows in `measured_value`.
        let mut e = env("truth = \"off\"");
        e.reset(Some(3)).unwrap();
        let k = 10 * 32 + 10;
        let s = e.step(&Value::Discrete(k)).unwrap();
        assert_eq!(s.info.get("counted"), Some(&InfoValue::Bool(true)));
        let best = fv(&s.info, "posterior_best");
        let pristine = s
            .obs
            .get("pristine")
            .and_then(Value::as_box)
            .unwrap()
            .to_vec();
        for i in 0..32i64 {
            for j in 0..32i64 {
                let d2 = (i - 10).pow(2) + (j - 10).pow(2);
                let want = if d2 <= 16 { 0.0 } else { 1.0 };
                assert_eq!(pristine[(i * 32 + j) as usize], want, "({i}, {j})");
            }
        }
        for near in [k, 10 * 32 + 14, 13 * 32 + 12] {
            let s = e.step(&Value::Discrete(near)).unwrap();
            assert_eq!(s.info.get("counted"), Some(&InfoValue::Bool(false)));
            assert_eq!((s.reward, fv(&s.info, "posterior_best")), (0.0, best));
            let mv = s.obs.get("measured_value").and_then(Value::as_box).unwrap();
            if near != k {
                let a = fv(&s.info, "area").clamp(0.0, 1.0);
                assert!((f64::from(mv[near as usize]) - a).abs() < 1e-6, "{a}");
            }
        }
        // Six spacings above the first loop (and over four from the others): as grown, counted.
        let s = e.step(&Value::Discrete(4 * 32 + 10)).unwrap();
        assert_eq!(s.info.get("counted"), Some(&InfoValue::Bool(true)));
        // With the radius at 0 every loop counts.
        let mut e = env("truth = \"off\"\nhistory_radius = 0.0");
        e.reset(Some(3)).unwrap();
        for _ in 0..3 {
            let s = e.step(&Value::Discrete(k)).unwrap();
            assert_eq!(s.info.get("counted"), Some(&InfoValue::Bool(true)));
        }
    }

    #[test]
    fn observation_keys_patches_and_bounds() {
        let mut e = env("");
        let (obs, info) = e.reset(Some(1)).unwrap();
        let Value::Dict(d) = &obs else { panic!() };
        let keys: Vec<&str> = d.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "overview",
                "patches",
                "measured_value",
                "measured_count",
                "pristine",
                "last_loop"
            ]
        );
        assert!(e.observation_space().contains(&obs));
        assert!(fv(&info, "true_best") > 0.3);
        let ov = obs.get("overview").and_then(Value::as_box).unwrap();
        let pa = obs.get("patches").and_then(Value::as_box).unwrap();
        // Point (row 7, column 3): pixels rows 13..17, columns 5..9 (2 pixels per point).
        let k = 7 * 32 + 3;
        for i in 0..4 {
            for j in 0..4 {
                assert_eq!(pa[k * 16 + i * 4 + j], ov[(13 + i) * 64 + 5 + j]);
            }
        }
        let mut areas = Vec::new();
        for k in [0, 7 * 32 + 3, 500, 500] {
            let s = e.step(&Value::Discrete(k)).unwrap();
            assert!(e.observation_space().contains(&s.obs));
            areas.push(fv(&s.info, "area"));
            assert!(s.info.contains_key("regret") && s.info.contains_key("recommended"));
            let ll = s.obs.get("last_loop").and_then(Value::as_box).unwrap();
            assert_eq!(ll.len(), 24);
        }
        println!("areas {areas:?}");
        assert!(areas.iter().all(|a| (0.0..=1.0).contains(a)));
    }

    #[test]
    fn no_degenerate_policy_comes_close() {
        // 20 seeds at medium (train split) on a reduced map: 16² points 125 nm apart, 25 loops
        // (a tenth of the points, as the default's 100 of 1024) of 16 points after 4 poling
        // points (the default's ground truth and 100 loops for 18 policies × 20 episodes would
        // take minutes in the test profile); the heuristic against 16 constant points spread
        // over the grid (margins: return 1.5 reward units, success rate 0.1) and random probing
        // (margin: return 0.5). Random probing's success rate is not held below the
        // heuristic's here: on this small map it measures a tenth of the points, and large
        // loops line every domain wall (at the default scale, on the test split, the heuristic
        // succeeds 0.25 against random's 0.0: `heuristic_beats_random_on_the_test_split`).
        let mut e = env("grid = 16\nbudget = 25\nloop_points = 16\nprepole_points = 4");
        let (h, others) = degenerate_scores(&mut e, 0..20, 16).unwrap();
        let (random, constants): (Vec<_>, Vec<_>) =
            others.into_iter().partition(|(name, _)| name == "random");
        assert_no_degenerate_wins("PfmSpectroscopyExplore-v1", &h, &constants, 1.5, 0.1);
        let r = &random[0].1;
        println!(
            "random: return {:.3} ± {:.3}, success {:.2}",
            r.mean_return, r.return_ci95, r.success_rate
        );
        assert!(r.mean_return < h.mean_return - 0.5);
    }

    #[test]
    fn heuristic_beats_random_on_the_test_split() {
        // 40 held-out episodes at medium (default grid, budget and history radius): the
        // heuristic, which spreads its loops over as-grown film, against random probing, whose
        // loops mostly land near earlier ones and do not count.
        let mut e = env("split = \"test\"");
        let (_, _) =
            assert_heuristic_beats_random("PfmSpectroscopyExplore-v1", &mut e, 0..40, 0.2, 0.05);
    }

    #[test]
    fn first_loop_and_repeated_loops_are_not_paid_by_design() {
        // Over 40 episodes the first loop at a random point earns about nothing on average (the
        // prior mean is the mean area; the v0 reward paid the whole area, 1.1 on average), and
        // re-measuring one point 20 times earns what that point's estimate exceeds the prior
        // mean by, not a gain per loop. (The areas are skewed: most points barely open a loop,
        // so the 40-episode mean has a standard error near 0.35 reward units.)
        let mut e = env("budget = 20\ntruth = \"off\"");
        let (mut first, mut repeat, mut area) = (0.0, 0.0, 0.0);
        let n = 40;
        for seed in 0..n {
            e.reset(Some(seed)).unwrap();
            let a = e.action_space().sample(&mut crate::rng::seeded(seed));
            let s = e.step(&a).unwrap();
            first += s.reward / n as f64;
            area += fv(&s.info, "area") / n as f64;
            let mut ret = s.reward;
            for _ in 1..20 {
                ret += e.step(&a).unwrap().reward;
            }
            let cfg = &e.task().cfg;
            let exp = cfg.reward_scale * (e.task().post.score() - cfg.prior_mean);
            assert!((ret - exp).abs() < 1e-9, "{ret} vs {exp}");
            repeat += ret / n as f64;
        }
        println!("first loop {first:.3} (mean area {area:.3}), 20 loops at one point {repeat:.3}");
        assert!(first.abs() < 0.8 && repeat.abs() < 0.8, "{first} {repeat}");
    }

    #[test]
    fn real_data_mode_serves_the_full_recorded_map() {
        let Some(f) = data_file() else { return };
        // With the posterior calibrations the module docs give for the shared file.
        let cfg: toml::Value = toml::from_str(&format!(
            "real_data = {:?}\nprior_mean = 0.01\nprior_sd = 0.03\nnoise_sd = 0.005",
            f.display().to_string()
        ))
        .unwrap();
        let mut e = TaskEnv::new(
            "t",
            PfmSpectroscopyExplore::from_config(Some(&cfg)).unwrap(),
        );
        assert_eq!(e.action_space(), &Space::Discrete { n: 2500, start: 0 });
        let (o, info) = e.reset(Some(0)).unwrap();
        assert!(e.observation_space().contains(&o));
        let tb = fv(&info, "true_best");
        // Every recorded loop is a point; the truth is read off the file.
        let areas = &e.task().truth;
        let n = areas.len() as f64;
        let m = areas.iter().sum::<f64>() / n;
        let sd = (areas.iter().map(|a| (a - m).powi(2)).sum::<f64>() / n).sqrt();
        println!("real data: best area {tb:.3}, mean {m:.3}, sd {sd:.3}");
        assert!(tb > 0.0 && areas.iter().all(|a| (0.0..=1.0).contains(a)));
        let h = evaluate(&mut e, &Policy::Heuristic, 0..1).unwrap();
        let r = evaluate(&mut e, &Policy::Random, 0..5).unwrap();
        println!(
            "real data: heuristic return {:.3} success {:.2}; random {:.3} success {:.2}",
            h.mean_return, h.success_rate, r.mean_return, r.success_rate
        );
        let bad: toml::Value = toml::from_str("real_data = \"/nonexistent.h5\"").unwrap();
        let err = PfmSpectroscopyExplore::from_config(Some(&bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("real_data"), "{err}");
    }

    /// The fast model (`fidelity = "fast"`) against the full one, on seeds 0..6: loops at 16
    /// points 8 spacings apart (each on as-grown film): the mean and spread of their areas, the
    /// mean coercive biases of the loops that switch, the mean reward; the true best area of
    /// the episode (the truth search); and the statistics of the overview images (mean,
    /// variance, power in three bands of spatial frequency). Measured: areas, reward and true
    /// best within 3 %, image statistics within 0.2 %, coercive biases within 0.45 V (the
    /// waveform's step is 1.42 V). Tolerances: 25 %, and 0.6 V for the coercive biases.
    #[test]
    fn fast_and_full_observe_the_same_statistics() {
        use crate::tasks::testing::{image_statistics, relative_differences, roll_out};
        let points: Vec<i64> = [4, 12, 20, 28]
            .iter()
            .flat_map(|&i| [4, 12, 20, 28].map(|j| i * 32 + j))
            .collect();
        let run = |fidelity: &str| {
            let mut e = env(&format!("fidelity = \"{fidelity}\""));
            let (mut areas, mut ups, mut downs, mut rewards) = (vec![], vec![], vec![], vec![]);
            let (mut best, mut images) = (vec![], vec![]);
            roll_out(
                &mut e,
                0..6,
                points.len(),
                |_, k, _| Value::Discrete(points[k]),
                |_, obs, s| match s {
                    None => {
                        let ov = obs.get("overview").and_then(Value::as_box).unwrap();
                        images.push(ov.to_vec());
                    }
                    Some(s) => {
                        areas.push(fv(&s.info, "area"));
                        rewards.push(s.reward);
                        best.push(fv(&s.info, "true_best"));
                        if let Some(InfoValue::F64(v)) = s.info.get("v_up") {
                            ups.push(*v);
                        }
                        if let Some(InfoValue::F64(v)) = s.info.get("v_down") {
                            downs.push(*v);
                        }
                    }
                },
            );
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let sd = |v: &[f64]| {
                let m = mean(v);
                (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
            };
            (
                [mean(&areas), sd(&areas), mean(&rewards), mean(&best)],
                [mean(&ups), mean(&downs)],
                image_statistics(&images, 64),
            )
        };
        let ((s_fast, v_fast, i_fast), (s_full, v_full, i_full)) = (run("fast"), run("full"));
        let (rs, ri) = (
            relative_differences(&s_fast, &s_full),
            relative_differences(&i_fast, &i_full),
        );
        eprintln!(
            "fast {s_fast:?} {v_fast:?} {i_fast:?}\nfull {s_full:?} {v_full:?} {i_full:?}\n\
             relative {rs:?} {ri:?}"
        );
        for (k, r) in rs.iter().chain(&ri).enumerate() {
            assert!(*r < 0.25, "statistic {k}: relative difference {r}");
        }
        for k in 0..2 {
            assert!(
                (v_fast[k] - v_full[k]).abs() < 0.6,
                "coercive bias {k}: {} vs {} V",
                v_fast[k],
                v_full[k]
            );
        }
    }
}
