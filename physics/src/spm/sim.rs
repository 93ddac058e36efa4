//! The simulated scanning probe microscope: a surface under a tip that wears, scanned line by
//! line with trace and retrace by a PI z-feedback on an imperfect scanner.
//!
//! One simulator serves the three modes of DESIGN.md §5:
//! - **AFM** (contact): the height channel is the z-piezo signal of the feedback tracking the
//!   surface dilated by the tip; the error channel is the deflection error (height units).
//! - **STM** (constant current): the surface is the apparent-height map of an Ag(111) terrace
//!   with adatoms ([`super::adatoms`]); lateral manipulation moves the adatoms; bias pulses and
//!   dips condition the tip.
//! - **PFM**: contact AFM over a ferroelectric film ([`super::ferro`]) whose polarization grid
//!   coincides with the sample grid; amplitude and phase channels, bias-pulse writing and
//!   switching spectroscopy.
//!
//! The sample is a square grid of `sample.pixels²` cells spanning `sample.size`, centred on the
//! origin of the sample frame. The scanner's drift moves the sample relative to the lab frame
//! (instrument coordinates, [`crate::instrument`]). Per line: the scanner gives the positions
//! each pixel actually visits on the sample (drift, creep, hysteresis), the tip-dilated surface
//! is interpolated there, the PI loop tracks it (trace, then retrace), and height noise (white,
//! 1/f, line offsets, plus the extra noise and glitches of an adsorbate on the tip) is added.
//! Contact wears the tip; a tracking error beyond `sample.crash_threshold` is a crash; the tip
//! can change spontaneously while scanning. A changed tip re-images the rest of the frame.
//!
//! ```
//! use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
//! use scopegym_physics::instrument::SpmInstrument;
//! let mut cfg = SpmConfig::default();
//! cfg.sample.pixels = 64;
//! cfg.scan.pixels = [32, 32];
//! cfg.scan.size = 0.5e-6.into();
//! let mut sim = SpmSimulator::new(cfg, 7).unwrap();
//! let frame = sim.acquire_frame().unwrap();
//! assert_eq!(frame.main().name, "height");
//! assert_eq!(frame.main().image.dim(), (32, 32));
//! assert!(frame.main().image.iter().all(|v| v.is_finite()));
//! ```

use crate::error::{PhysicsError, Result};
use crate::instrument::{
    BiasWriting, Channel, InstrumentInfo, InstrumentKind, LateralManipulation, PointSpectroscopy,
    ScanSettings, SpmFrame, SpmFrameMeta, SpmInstrument, SpmMode, TipConditioning,
};
use crate::param::dims::{Angle, Frequency, Length, Time, Unitless, Voltage};
use crate::param::{Param, Randomizer, Region};
use crate::rng::{SimRng, derive_seed, normal, seeded};
use crate::spm::adatoms::{AdatomConfig, bumps, corrugation, place_adatoms};
use crate::spm::dilation::{Dilator, Tip};
use crate::spm::feedback::{FeedbackConfig, ZFeedback};
use crate::spm::ferro::{FerroConfig, FerroFilm, pfm_response, pfm_signal, smooth_periodic};
use crate::spm::manipulation::{ManipulationConfig, Outcome, lateral_manipulation};
use crate::spm::scanner::{Scanner, ScannerConfig};
use crate::spm::surface::{SurfaceConfig, generate};
use crate::spm::tip::{Conditioning, TipConfig, TipState};
use ndarray::{Array2, ArrayView2};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The sample grid (`[sample]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleConfig {
    /// Side of the square sample area the scanner can reach, m. Default 1 µm.
    pub size: Param<Length>,
    /// Cells per side of the sample grid (surface, polarization). Default 256.
    pub pixels: usize,
    /// Tracking error beyond which the tip is taken to have crashed into the surface, m.
    /// Default 2 nm.
    pub crash_threshold: Param<Length>,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            size: Param::fixed(1e-6),
            pixels: 256,
            crash_threshold: Param::fixed(2e-9),
        }
    }
}

/// The raster scan at reset (`[scan]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpmScanConfig {
    /// `[rows, cols]` of a frame. Default `[256, 256]`.
    pub pixels: [usize; 2],
    /// Width of the (square-pixel) scan field, m. Default 1 µm.
    pub size: Param<Length>,
    /// Lines per second (a line is a trace and a retrace), Hz. Default 0.5.
    pub line_rate: Param<Frequency>,
    /// Centre of the scan field in lab coordinates `[x, y]`, m. Default `[0, 0]`.
    pub center: [Param<Length>; 2],
}

impl Default for SpmScanConfig {
    fn default() -> Self {
        Self {
            pixels: [256, 256],
            size: Param::fixed(1e-6),
            line_rate: Param::fixed(0.5),
            center: [Param::fixed(0.0), Param::fixed(0.0)],
        }
    }
}

/// Piezoresponse imaging, writing and spectroscopy (`[pfm]`).
///
/// The film's reduced TDGL units are tied to the lab by `field_per_volt` (reduced field at the
/// tip apex per volt of tip bias) and `time_unit` (seconds per reduced time unit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PfmConfig {
    /// Reduced field at the tip apex per volt, 1/V. Default 0.25.
    pub field_per_volt: Param<Unitless>,
    /// Built-in bias between tip and film, V: the film feels `bias + bias_offset` (contact
    /// potential, surface charge, imprint), which shifts switching loops along the bias axis by
    /// `-bias_offset`. Default 0.
    pub bias_offset: Param<Voltage>,
    /// Lorentzian half width of the tip field, m. Default 50 nm.
    pub tip_width: Param<Length>,
    /// Seconds per reduced TDGL time unit, s. Default 1 ms.
    pub time_unit: Param<Time>,
    /// Time at each point of a spectroscopy waveform, s. Default 5 ms.
    pub point_time: Param<Time>,
    /// Standard deviation of the Gaussian imaging transfer function, m. Default 10 nm.
    pub transfer_sigma: Param<Length>,
    /// Amplitude per unit polarization, arbitrary units. Default 1.
    pub gain: Param<Unitless>,
    /// Amplitude noise r.m.s., arbitrary units. Default 0.03.
    pub amplitude_noise: Param<Unitless>,
    /// Phase noise r.m.s., rad. Default 5°.
    pub phase_noise: Param<Angle>,
    /// Reduced time the film relaxes at zero field after it is built, before the first frame.
    /// Default 2.
    pub settle_time: Param<Unitless>,
    /// Typical size of the as-grown domains, m (the correlation length of the random initial
    /// polarization). Default 100 nm.
    pub domain_size: Param<Length>,
    /// Fraction of the film polarized up as grown, 0..1. Default 0.5.
    pub up_fraction: Param<Unitless>,
    /// Amplitude of the switching-spectroscopy triangle waveform 0 → +A → 0 → -A → 0, V.
    /// Default 8.5 V (as in the BEPS data of the shared folder).
    pub loop_amplitude: Param<Voltage>,
    /// Points per waveform cycle. Default 64.
    pub loop_points: usize,
    /// Waveform cycles (the last one is the steady loop). Default 2.
    pub loop_cycles: usize,
}

impl Default for PfmConfig {
    fn default() -> Self {
        Self {
            field_per_volt: Param::fixed(0.25),
            bias_offset: Param::fixed(0.0),
            tip_width: Param::fixed(50e-9),
            time_unit: Param::fixed(1e-3),
            point_time: Param::fixed(5e-3),
            transfer_sigma: Param::fixed(10e-9),
            gain: Param::fixed(1.0),
            amplitude_noise: Param::fixed(0.03),
            phase_noise: Param::fixed(5f64.to_radians()),
            settle_time: Param::fixed(2.0),
            domain_size: Param::fixed(100e-9),
            up_fraction: Param::fixed(0.5),
            loop_amplitude: Param::fixed(8.5),
            loop_points: 64,
            loop_cycles: 2,
        }
    }
}

impl PfmConfig {
    /// Checks ranges; `prefix` is prepended to field names in errors.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let checks: [(&str, f64, f64, f64); 12] = [
            ("bias_offset", self.bias_offset.get(), -100.0, 100.0),
            ("domain_size", self.domain_size.get(), 0.0, 1e-3),
            ("up_fraction", self.up_fraction.get(), 0.0, 1.0),
            ("field_per_volt", self.field_per_volt.get(), 1e-6, 100.0),
            ("tip_width", self.tip_width.get(), 1e-10, 1e-6),
            ("time_unit", self.time_unit.get(), 1e-9, 10.0),
            ("point_time", self.point_time.get(), 1e-6, 10.0),
            ("transfer_sigma", self.transfer_sigma.get(), 0.0, 1e-6),
            ("gain", self.gain.get(), 0.0, 1e6),
            ("amplitude_noise", self.amplitude_noise.get(), 0.0, 1e6),
            (
                "phase_noise",
                self.phase_noise.get(),
                0.0,
                std::f64::consts::PI,
            ),
            ("settle_time", self.settle_time.get(), 0.0, 1e4),
        ];
        for (name, v, lo, hi) in checks {
            if !(v.is_finite() && (lo..=hi).contains(&v)) {
                return Err(PhysicsError::param(
                    format!("{prefix}{name}"),
                    format!("must be in [{lo:e}, {hi:e}], got {v}"),
                ));
            }
        }
        let a = self.loop_amplitude.get();
        if !(a.is_finite() && a > 0.0 && a <= 100.0) {
            return Err(PhysicsError::param(
                format!("{prefix}loop_amplitude"),
                format!("must be in (0, 100] V, got {a}"),
            ));
        }
        if !(4..=10_000).contains(&self.loop_points) {
            return Err(PhysicsError::param(
                format!("{prefix}loop_points"),
                format!("must be 4..=10000, got {}", self.loop_points),
            ));
        }
        if !(1..=100).contains(&self.loop_cycles) {
            return Err(PhysicsError::param(
                format!("{prefix}loop_cycles"),
                format!("must be 1..=100, got {}", self.loop_cycles),
            ));
        }
        Ok(())
    }
}

/// Everything that defines a simulated SPM session (one scenario).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpmConfig {
    /// Imaging mode. Default AFM (a scenario sets it from `instrument`).
    pub mode: SpmMode,
    /// Sample bias at reset, V. Default 0.1 V.
    pub bias: Param<Voltage>,
    /// Largest bias magnitude the instrument applies, V. Default 10 V.
    pub max_bias: Param<Voltage>,
    /// The sample grid.
    pub sample: SampleConfig,
    /// The raster scan.
    pub scan: SpmScanConfig,
    /// Topography (AFM, PFM; under the adatoms in STM).
    pub surface: SurfaceConfig,
    /// Adatoms (STM).
    pub adatoms: AdatomConfig,
    /// The tip and its evolution.
    pub tip: TipConfig,
    /// The z feedback.
    pub feedback: FeedbackConfig,
    /// Drift, creep, hysteresis and noise of the scanner.
    pub scanner: ScannerConfig,
    /// The ferroelectric film (PFM).
    pub ferroelectric: FerroConfig,
    /// PFM imaging, writing and spectroscopy.
    pub pfm: PfmConfig,
    /// STM lateral manipulation.
    pub manipulation: ManipulationConfig,
}

impl Default for SpmConfig {
    fn default() -> Self {
        Self {
            mode: SpmMode::Afm,
            bias: Param::fixed(0.1),
            max_bias: Param::fixed(10.0),
            sample: SampleConfig::default(),
            scan: SpmScanConfig::default(),
            surface: SurfaceConfig::default(),
            adatoms: AdatomConfig::default(),
            tip: TipConfig::default(),
            feedback: FeedbackConfig::default(),
            scanner: ScannerConfig::default(),
            ferroelectric: FerroConfig::default(),
            pfm: PfmConfig::default(),
            manipulation: ManipulationConfig::default(),
        }
    }
}

impl SpmConfig {
    /// This config with drift, creep, hysteresis and noise switched off (for calibration and
    /// tests).
    pub fn without_scanner_imperfections(mut self) -> Self {
        let s = &mut self.scanner;
        s.drift_initial = Param::fixed(0.0);
        s.drift_settled = Param::fixed(0.0);
        s.drift_diffusivity = Param::fixed(0.0);
        s.creep_fraction = Param::fixed(0.0);
        s.hysteresis = Param::fixed(0.0);
        s.white_noise = Param::fixed(0.0);
        s.pink_noise = Param::fixed(0.0);
        s.line_offset = Param::fixed(0.0);
        self
    }

    /// Validates every section, naming the offending field (`scan.size`, `tip.radius`, ...).
    pub fn validate(&self) -> Result<()> {
        let mb = self.max_bias.get();
        if !(mb.is_finite() && mb > 0.0 && mb <= 100.0) {
            return Err(PhysicsError::param(
                "max_bias",
                format!("must be in (0, 100] V, got {mb}"),
            ));
        }
        let b = self.bias.get();
        if !(b.is_finite() && b.abs() <= mb) {
            return Err(PhysicsError::param(
                "bias",
                format!("must be within ±max_bias = {mb} V, got {b}"),
            ));
        }
        let size = self.sample.size.get();
        if !(size.is_finite() && size > 0.0 && size <= 1e-3) {
            return Err(PhysicsError::param(
                "sample.size",
                format!("must be in (0, 1 mm], got {size} m"),
            ));
        }
        if !(8..=4096).contains(&self.sample.pixels) {
            return Err(PhysicsError::param(
                "sample.pixels",
                format!("must be 8..=4096, got {}", self.sample.pixels),
            ));
        }
        let ct = self.sample.crash_threshold.get();
        if !(ct.is_finite() && ct > 0.0) {
            return Err(PhysicsError::param(
                "sample.crash_threshold",
                format!("must be positive, got {ct} m"),
            ));
        }
        let [r, c] = self.scan.pixels;
        if !(2..=4096).contains(&r) || !(2..=4096).contains(&c) {
            return Err(PhysicsError::param(
                "scan.pixels",
                format!("each must be 2..=4096, got {:?}", self.scan.pixels),
            ));
        }
        let fov = self.scan.size.get();
        if !(fov.is_finite() && fov > 0.0) {
            return Err(PhysicsError::param(
                "scan.size",
                format!("must be positive, got {fov} m"),
            ));
        }
        let fov_y = fov * r as f64 / c as f64;
        for (k, (name, extent)) in [("scan.center[0]", fov), ("scan.center[1]", fov_y)]
            .into_iter()
            .enumerate()
        {
            let ck = self.scan.center[k].get();
            if !(ck.is_finite() && ck.abs() + 0.5 * extent <= 0.5 * size * (1.0 + 1e-9)) {
                return Err(PhysicsError::param(
                    name,
                    format!(
                        "the scan field ({extent:e} m wide at {ck:e} m) must lie inside the sample (sample.size = {size:e} m)"
                    ),
                ));
            }
        }
        let lr = self.scan.line_rate.get();
        if !(lr.is_finite() && lr > 0.0 && lr <= 1000.0) {
            return Err(PhysicsError::param(
                "scan.line_rate",
                format!("must be in (0, 1000] Hz, got {lr}"),
            ));
        }
        self.surface.validate("surface.")?;
        self.adatoms.validate("adatoms.")?;
        self.tip.validate("tip.")?;
        self.feedback.validate("feedback.")?;
        self.scanner.validate("scanner.")?;
        self.ferroelectric.validate("ferroelectric.")?;
        self.pfm.validate("pfm.")?;
        self.manipulation.validate("manipulation.")?;
        Ok(())
    }
}

/// Largest change of the imaging kernel that gradual wear may make before the image is
/// recomputed, m (below the default white noise of 20 pm).
pub const KERNEL_TOLERANCE: f64 = 10e-12;

/// Tip speed during a lateral manipulation, m/s (sets how much clock time a drag takes).
const MANIPULATION_SPEED: f64 = 1e-9;

/// A simulated SPM session.
#[derive(Debug)]
pub struct SpmSimulator {
    template: Randomizer<SpmConfig>,
    /// This episode's drawn parameters, by dotted config key (SI units).
    drawn: Vec<(String, f64)>,
    region: Region,
    cfg: SpmConfig,
    seed: u64,
    rng_noise: SimRng,
    rng_scan: SimRng,
    rng_tip: SimRng,
    rng_sample: SimRng,
    /// Sample grid cell size, m.
    cell: f64,
    /// The topography without adatoms, m.
    base_topography: Array2<f32>,
    /// `base_topography` plus the adatom terrace's corrugation (computed once per sample).
    terrace: Array2<f32>,
    /// The true surface the tip meets (topography plus adatoms), m.
    truth: Array2<f32>,
    /// The truth dilated by the tip: what a perfect feedback would record, m.
    dilated: Array2<f32>,
    dilated_valid: bool,
    tip: TipState,
    kernel: Tip,
    dilator: Dilator,
    feedback: ZFeedback,
    scanner: Scanner,
    film: Option<FerroFilm>,
    adatoms: Vec<[f64; 2]>,
    scan: ScanSettings,
    clock: f64,
    frames: u64,
    probe: [f64; 2],
    bias: f64,
    withdrawn: bool,
    channels: Vec<Channel>,
    noiseless: Array2<f32>,
    xs: Vec<f64>,
    ys: Vec<f64>,
    profile: Vec<f32>,
    zbuf: Vec<f32>,
    ebuf: Vec<f32>,
    tip_events: u64,
}

fn channel(name: &str, units: &str, quantity: &str, shape: (usize, usize)) -> Channel {
    Channel {
        name: name.into(),
        units: units.into(),
        quantity: quantity.into(),
        image: Array2::zeros(shape),
    }
}

/// Bilinear interpolation of `grid` (cell size `cell`, centred on the origin) at `(x, y)` m;
/// positions outside the grid take the nearest edge value.
fn bilinear(grid: ArrayView2<'_, f32>, cell: f64, x: f64, y: f64) -> f32 {
    let (ny, nx) = grid.dim();
    let u = (x / cell + 0.5 * nx as f64 - 0.5).clamp(0.0, (nx - 1) as f64);
    let v = (y / cell + 0.5 * ny as f64 - 0.5).clamp(0.0, (ny - 1) as f64);
    let (j0, i0) = (u.floor() as usize, v.floor() as usize);
    let (j1, i1) = ((j0 + 1).min(nx - 1), (i0 + 1).min(ny - 1));
    let (fu, fv) = ((u - j0 as f64) as f32, (v - i0 as f64) as f32);
    let top = grid[[i0, j0]] * (1.0 - fu) + grid[[i0, j1]] * fu;
    let bottom = grid[[i1, j0]] * (1.0 - fu) + grid[[i1, j1]] * fu;
    top * (1.0 - fv) + bottom * fv
}

/// [`bilinear`] for an `f64` grid.
fn bilinear_f64(grid: ArrayView2<'_, f64>, cell: f64, x: f64, y: f64) -> f32 {
    let (ny, nx) = grid.dim();
    let u = (x / cell + 0.5 * nx as f64 - 0.5).clamp(0.0, (nx - 1) as f64);
    let v = (y / cell + 0.5 * ny as f64 - 0.5).clamp(0.0, (ny - 1) as f64);
    let (j0, i0) = (u.floor() as usize, v.floor() as usize);
    let (j1, i1) = ((j0 + 1).min(nx - 1), (i0 + 1).min(ny - 1));
    let (fu, fv) = (u - j0 as f64, v - i0 as f64);
    let top = grid[[i0, j0]] * (1.0 - fu) + grid[[i0, j1]] * fu;
    let bottom = grid[[i1, j0]] * (1.0 - fu) + grid[[i1, j1]] * fu;
    (top * (1.0 - fv) + bottom * fv) as f32
}

impl SpmSimulator {
    /// Builds a simulator: resolves distributions in `config` with `seed`, validates, builds the
    /// sample, tip and scanner. The same config and seed give the same session, bit for bit.
    pub fn new(config: SpmConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let template = Randomizer::new(config)?;
        template.check_support(SpmConfig::validate)?;
        let (cfg, drawn) = template.draw_valid(
            &mut seeded(derive_seed(seed, "params")),
            Region::All,
            SpmConfig::validate,
        )?;
        let mut rng_scan = seeded(derive_seed(seed, "scan"));
        let scanner = Scanner::new(&cfg.scanner, &mut rng_scan)?;
        let feedback = ZFeedback::new(&cfg.feedback)?;
        let tip = TipState::new(&cfg.tip, &mut seeded(derive_seed(seed, "tip_init")))?;
        let mut sim = Self {
            template,
            drawn,
            region: Region::All,
            seed,
            rng_noise: seeded(derive_seed(seed, "noise")),
            rng_scan,
            rng_tip: seeded(derive_seed(seed, "tip")),
            rng_sample: seeded(derive_seed(seed, "sample")),
            cell: 1.0,
            base_topography: Array2::zeros((1, 1)),
            terrace: Array2::zeros((1, 1)),
            truth: Array2::zeros((1, 1)),
            dilated: Array2::zeros((1, 1)),
            dilated_valid: false,
            kernel: Tip::point(1, 1.0)?,
            tip,
            dilator: Dilator::new(),
            feedback,
            scanner,
            film: None,
            adatoms: Vec::new(),
            scan: Self::scan_from(&cfg),
            clock: 0.0,
            frames: 0,
            probe: [0.0, 0.0],
            bias: cfg.bias.get(),
            withdrawn: false,
            channels: Vec::new(),
            noiseless: Array2::zeros((1, 1)),
            xs: Vec::new(),
            ys: Vec::new(),
            profile: Vec::new(),
            zbuf: Vec::new(),
            ebuf: Vec::new(),
            tip_events: 0,
            cfg,
        };
        sim.reset(seed)?;
        Ok(sim)
    }

    fn scan_from(cfg: &SpmConfig) -> ScanSettings {
        let [rows, cols] = cfg.scan.pixels;
        ScanSettings {
            rows,
            cols,
            pixel_size: cfg.scan.size.get() / cols as f64,
            dwell_time: 1.0 / (2.0 * cfg.scan.line_rate.get() * cols as f64),
            flyback_time: 0.0,
            center: [cfg.scan.center[0].get(), cfg.scan.center[1].get()],
        }
    }

    /// Starts a new session with `seed`: redraws randomized parameters, rebuilds the sample, the
    /// tip, the film and the scanner; zeroes the clock and frame counter.
    pub fn reset(&mut self, seed: u64) -> Result<()> {
        let (cfg, drawn) = self.template.draw_valid(
            &mut seeded(derive_seed(seed, "params")),
            self.region,
            SpmConfig::validate,
        )?;
        self.seed = seed;
        self.rng_noise = seeded(derive_seed(seed, "noise"));
        self.rng_scan = seeded(derive_seed(seed, "scan"));
        self.rng_tip = seeded(derive_seed(seed, "tip"));
        self.rng_sample = seeded(derive_seed(seed, "sample"));
        self.scanner = Scanner::new(&cfg.scanner, &mut self.rng_scan)?;
        self.feedback = ZFeedback::new(&cfg.feedback)?;
        self.tip = TipState::new(&cfg.tip, &mut seeded(derive_seed(seed, "tip_init")))?;
        let n = cfg.sample.pixels;
        self.cell = cfg.sample.size.get() / n as f64;
        let mut rng_surface = seeded(derive_seed(seed, "surface"));
        let topo = generate(&cfg.surface, [n, n], self.cell, &mut rng_surface)?;
        let half = 0.5 * cfg.sample.size.get();
        self.adatoms = if cfg.mode == SpmMode::Stm {
            place_adatoms(
                &cfg.adatoms,
                [half, half],
                &mut seeded(derive_seed(seed, "adatoms")),
            )?
        } else {
            Vec::new()
        };
        self.film = if cfg.mode == SpmMode::Pfm {
            let mut film = FerroFilm::new(&cfg.ferroelectric, [n, n], derive_seed(seed, "film"))?;
            // As grown: smooth random polarization (correlation length `domain_size`),
            // thresholded so `up_fraction` of the film points up, relaxed into domains.
            let mut rng = seeded(derive_seed(seed, "film_init"));
            let noise: Vec<f64> = (0..n * n).map(|_| normal(&mut rng)).collect();
            let smooth =
                smooth_periodic(&noise, [n, n], 0.5 * cfg.pfm.domain_size.get() / self.cell);
            let mut sorted = smooth.clone();
            sorted.sort_by(f64::total_cmp);
            let up = cfg.pfm.up_fraction.get();
            let k = (((1.0 - up) * (n * n) as f64) as usize).min(n * n - 1);
            let threshold = if up >= 1.0 {
                f64::NEG_INFINITY
            } else {
                sorted[k]
            };
            for (v, &g) in film.polarization_mut().iter_mut().zip(&smooth) {
                *v = if g > threshold { 1.0 } else { -1.0 };
            }
            let steps = (cfg.pfm.settle_time.get() / cfg.ferroelectric.dt.get()).round() as usize;
            film.relax(steps, 0.0);
            Some(film)
        } else {
            None
        };
        self.cfg = cfg;
        self.drawn = drawn;
        let n = self.cfg.sample.pixels;
        self.terrace = if self.adatoms.is_empty() {
            Array2::zeros((1, 1))
        } else {
            &topo + &corrugation(&self.cfg.adatoms, [n, n], self.cell)?
        };
        self.base_topography = topo;
        self.rebuild_truth()?;
        self.rebuild_kernel()?;
        self.scan = Self::scan_from(&self.cfg);
        self.clock = 0.0;
        self.frames = 0;
        self.probe = self.scan.center;
        self.bias = self.cfg.bias.get();
        self.withdrawn = false;
        self.tip_events = 0;
        self.alloc_channels();
        Ok(())
    }

    fn rebuild_truth(&mut self) -> Result<()> {
        let n = self.cfg.sample.pixels;
        self.truth = if self.adatoms.is_empty() {
            self.base_topography.clone()
        } else {
            &self.terrace + &bumps(&self.cfg.adatoms, &self.adatoms, [n, n], self.cell)?
        };
        self.dilated_valid = false;
        Ok(())
    }

    /// Kernel side for the current tip over the relief of the true surface.
    fn kernel_side(&self) -> usize {
        let (lo, hi) = self
            .truth
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let depth = f64::from(hi - lo).max(self.cell);
        self.tip.kernel_side(self.cell, depth)
    }

    fn rebuild_kernel(&mut self) -> Result<()> {
        self.kernel = self.tip.kernel(self.cell, self.kernel_side())?;
        self.dilated_valid = false;
        Ok(())
    }

    /// After gradual wear: refreshes the imaging kernel only when the tip's kernel differs
    /// from the one in use by more than [`KERNEL_TOLERANCE`] somewhere (the hidden state
    /// accumulates every change; the image follows once it is visible).
    fn refresh_kernel(&mut self) -> Result<()> {
        let side = self.kernel.side();
        let candidate = self.tip.kernel(self.cell, side)?;
        let moved = candidate
            .heights()
            .iter()
            .zip(self.kernel.heights())
            .any(|(a, b)| f64::from((a - b).abs()) > KERNEL_TOLERANCE);
        if moved {
            // The candidate is the new kernel unless the side grew with the radius.
            let new_side = self.kernel_side();
            self.kernel = if new_side == side {
                candidate
            } else {
                self.tip.kernel(self.cell, new_side)?
            };
            self.dilated_valid = false;
        }
        Ok(())
    }

    fn ensure_dilated(&mut self) -> Result<()> {
        if !self.dilated_valid {
            if self.dilated.dim() != self.truth.dim() {
                self.dilated = Array2::zeros(self.truth.dim());
            }
            self.dilator
                .dilate(self.truth.view(), &self.kernel, self.dilated.view_mut())?;
            self.dilated_valid = true;
        }
        Ok(())
    }

    fn alloc_channels(&mut self) {
        let shape = (self.scan.rows, self.scan.cols);
        let mut ch = Vec::new();
        if self.cfg.mode == SpmMode::Pfm {
            ch.push(channel("phase", "deg", "PFM phase", shape));
            ch.push(channel("amplitude", "a.u.", "PFM amplitude", shape));
        }
        ch.push(channel("height", "m", "topography (z piezo), trace", shape));
        ch.push(channel(
            "height_retrace",
            "m",
            "topography (z piezo), retrace",
            shape,
        ));
        ch.push(channel(
            "error",
            "m",
            if self.cfg.mode == SpmMode::Stm {
                "feedback error (current error as gap change), trace"
            } else {
                "feedback error (deflection), trace"
            },
            shape,
        ));
        self.channels = ch;
        self.noiseless = Array2::zeros(shape);
        let c = self.scan.cols;
        self.xs.resize(c, 0.0);
        self.ys.resize(c, 0.0);
        self.profile.resize(c, 0.0);
        self.zbuf.resize(c, 0.0);
        self.ebuf.resize(c, 0.0);
    }

    /// The resolved configuration (every distribution replaced by its drawn value).
    pub fn config(&self) -> &SpmConfig {
        &self.cfg
    }

    /// The configuration as given, distributions included.
    pub fn template(&self) -> &SpmConfig {
        self.template.template()
    }

    /// The randomized parameters of this episode and their drawn values (SI units), by dotted
    /// config key (`scanner.drift_settled`, `specimen.rotation`, ...).
    pub fn randomized(&self) -> &[(String, f64)] {
        &self.drawn
    }

    /// Draws every later episode's randomized parameters from `region` of their distributions
    /// (held-out evaluation ranges); takes effect at the next reset.
    pub fn set_region(&mut self, region: Region) {
        self.region = region;
    }

    /// The seed of the current session.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Ground truth: the true surface on the sample grid (row = y), m.
    pub fn truth_surface(&self) -> ArrayView2<'_, f32> {
        self.truth.view()
    }

    /// Sample grid cell size, m.
    pub fn cell_size(&self) -> f64 {
        self.cell
    }

    /// Ground truth: the hidden tip state.
    pub fn tip_state(&self) -> &TipState {
        &self.tip
    }

    /// Replaces the hidden tip state (for experiments and tests).
    pub fn set_tip_state(&mut self, tip: TipState) -> Result<()> {
        self.tip = tip;
        self.rebuild_kernel()
    }

    /// Ground truth: the imaging kernel of the current tip (heights ≤ 0, apex 0), m.
    pub fn tip_kernel(&self) -> &Tip {
        &self.kernel
    }

    /// Number of abrupt tip changes (conditioning, crash, pick-up) this session; gradual wear
    /// is not counted.
    pub fn tip_events(&self) -> u64 {
        self.tip_events
    }

    /// Ground truth: the film (PFM mode).
    pub fn film(&self) -> Option<&FerroFilm> {
        self.film.as_ref()
    }

    /// Ground truth: adatom positions on the sample (sample frame, m).
    pub fn adatoms(&self) -> &[[f64; 2]] {
        &self.adatoms
    }

    /// The sample's displacement relative to the lab (drift), m.
    pub fn drift(&self) -> [f64; 2] {
        self.scanner.drift()
    }

    /// Lab position → sample-frame position, m.
    pub fn lab_to_sample(&self, p: [f64; 2]) -> [f64; 2] {
        let d = self.scanner.drift();
        [p[0] - d[0], p[1] - d[1]]
    }

    /// Sample-frame position → lab position, m.
    pub fn sample_to_lab(&self, p: [f64; 2]) -> [f64; 2] {
        let d = self.scanner.drift();
        [p[0] + d[0], p[1] + d[1]]
    }

    /// The last frame's main channel without noise: AFM/STM the tip-dilated surface at the
    /// positions scanned, before feedback error and noise (m); PFM the phase of the noiseless
    /// piezoresponse there (0° or 180°).
    pub fn last_noiseless(&self) -> ArrayView2<'_, f32> {
        self.noiseless.view()
    }

    /// Sample position (m) → fractional film cell `(x, y)`.
    fn cell_coords(&self, p: [f64; 2]) -> (f64, f64) {
        let n = self.cfg.sample.pixels as f64;
        (
            p[0] / self.cell + 0.5 * n - 0.5,
            p[1] / self.cell + 0.5 * n - 0.5,
        )
    }

    fn check_point(&self, name: &str, p: [f64; 2]) -> Result<()> {
        let half = 0.5 * self.cfg.sample.size.get();
        if !(p.iter().all(|v| v.is_finite() && v.abs() <= half)) {
            return Err(PhysicsError::arg(
                name,
                format!("must be finite and within the scanner range ±{half:e} m, got {p:?}"),
            ));
        }
        Ok(())
    }

    fn check_bias(&self, bias: f64) -> Result<()> {
        let mb = self.cfg.max_bias.get();
        if !(bias.is_finite() && bias.abs() <= mb) {
            return Err(PhysicsError::arg(
                "bias",
                format!("must be finite and within ±{mb} V, got {bias}"),
            ));
        }
        Ok(())
    }

    fn engaged(&self, what: &str) -> Result<()> {
        if self.withdrawn {
            return Err(PhysicsError::Refused {
                operation: what.into(),
                reason: "the tip is withdrawn".into(),
            });
        }
        Ok(())
    }

    fn tip_changed(&mut self, before: &TipState) -> Result<()> {
        if &self.tip != before {
            self.tip_events += 1;
            self.rebuild_kernel()?;
        }
        Ok(())
    }

    fn scan_frame(&mut self) -> Result<SpmFrameMeta> {
        let s = self.scan;
        let (rows, cols) = (s.rows, s.cols);
        let t_start = self.clock;
        let dwell = s.dwell_time;
        let line_time = 2.0 * cols as f64 * dwell + s.flyback_time;
        let contact = self.cfg.mode != SpmMode::Stm;
        let pfm = self
            .film
            .as_ref()
            .map(|film| pfm_response(film, self.cfg.pfm.transfer_sigma.get() / self.cell));
        let (gain, amp_noise, phase_noise) = (
            self.cfg.pfm.gain.get(),
            self.cfg.pfm.amplitude_noise.get(),
            self.cfg.pfm.phase_noise.get().to_degrees(),
        );
        let i_height = if pfm.is_some() { 2 } else { 0 };
        let white = self.cfg.scanner.white_noise.get();
        let crash = self.cfg.sample.crash_threshold.get();
        let mut engaged = false;
        for r in 0..rows {
            self.ensure_dilated()?;
            let t_line = self.clock;
            for (pass, reverse) in [(0usize, false), (1, true)] {
                let t0 = t_line + pass as f64 * cols as f64 * dwell;
                self.scanner.line_positions(
                    &s,
                    r,
                    t0,
                    reverse,
                    &mut self.rng_scan,
                    &mut self.xs,
                    &mut self.ys,
                )?;
                for j in 0..cols {
                    self.profile[j] =
                        bilinear(self.dilated.view(), self.cell, self.xs[j], self.ys[j]);
                }
                if !engaged {
                    let first = if reverse {
                        self.profile[cols - 1]
                    } else {
                        self.profile[0]
                    };
                    self.feedback.engage(f64::from(first));
                    engaged = true;
                }
                let stats = self.feedback.scan_line(
                    &self.profile,
                    dwell,
                    reverse,
                    &mut self.zbuf,
                    &mut self.ebuf,
                )?;
                self.scanner
                    .add_line_noise(&mut self.zbuf, dwell, reverse, &mut self.rng_noise);
                // An adsorbate on the tip: extra noise and streaks where the tip state flips.
                let extra = (self.tip.noise_factor() - 1.0).max(0.0) * white.max(5e-12);
                if extra > 0.0 {
                    for z in self.zbuf.iter_mut() {
                        *z += (extra * normal(&mut self.rng_noise)) as f32;
                    }
                }
                if self.rng_noise.random::<f64>() < self.tip.glitch_probability() {
                    let from = self.rng_noise.random_range(0..cols);
                    let jump = (0.5 + self.rng_noise.random::<f64>())
                        * 0.1e-9
                        * if self.rng_noise.random::<bool>() {
                            1.0
                        } else {
                            -1.0
                        };
                    let range = if reverse { 0..from + 1 } else { from..cols };
                    for z in &mut self.zbuf[range] {
                        *z += jump as f32;
                    }
                }
                let row_h = if reverse { i_height + 1 } else { i_height };
                self.channels[row_h]
                    .image
                    .row_mut(r)
                    .iter_mut()
                    .zip(&self.zbuf)
                    .for_each(|(d, v)| *d = *v);
                if !reverse {
                    let ie = i_height + 2;
                    self.channels[ie]
                        .image
                        .row_mut(r)
                        .iter_mut()
                        .zip(&self.ebuf)
                        .for_each(|(d, v)| *d = *v);
                    if let Some(resp) = &pfm {
                        // The main channel is the phase: its noiseless value is 0° or 180°.
                        for j in 0..cols {
                            let v = f64::from(bilinear_f64(
                                resp.view(),
                                self.cell,
                                self.xs[j],
                                self.ys[j],
                            ));
                            let (a, ph) =
                                pfm_signal(v, gain, amp_noise, phase_noise, &mut self.rng_noise);
                            self.channels[0].image[[r, j]] = ph;
                            self.channels[1].image[[r, j]] = a;
                            self.noiseless[[r, j]] = if v >= 0.0 { 0.0 } else { 180.0 };
                        }
                    } else {
                        self.noiseless
                            .row_mut(r)
                            .iter_mut()
                            .zip(&self.profile)
                            .for_each(|(d, v)| *d = *v);
                    }
                }
                // Tip evolution along this pass: gradual wear first (the image follows once the
                // kernel changed visibly), then abrupt changes.
                if contact {
                    let r0 = self.tip.radius();
                    self.tip
                        .wear(cols as f64 * s.pixel_size, &self.cfg.tip, &mut self.rng_tip)?;
                    if self.tip.radius() != r0 {
                        self.refresh_kernel()?;
                    }
                }
                let before = self.tip.clone();
                if stats.max_abs_error > crash {
                    self.tip.crash(
                        stats.max_abs_error - crash,
                        &self.cfg.tip,
                        &mut self.rng_tip,
                    )?;
                }
                self.tip
                    .spontaneous(cols as f64 * dwell, &self.cfg.tip, &mut self.rng_tip)?;
                self.tip_changed(&before)?;
            }
            self.clock = t_line + line_time;
            self.scanner.advance(self.clock, &mut self.rng_scan);
        }
        let meta = SpmFrameMeta {
            index: self.frames,
            t_start,
            duration: self.clock - t_start,
        };
        self.frames += 1;
        Ok(meta)
    }

    fn film_point(&self, p_lab: [f64; 2]) -> Result<(f64, f64, f64, usize)> {
        let p = self.lab_to_sample(p_lab);
        let (x, y) = self.cell_coords(p);
        let width = self.cfg.pfm.tip_width.get() / self.cell;
        let half = ((4.0 * width).ceil() as usize).max(12);
        Ok((x, y, width, half))
    }

    fn reduced_steps(&self, duration: f64) -> usize {
        let t = duration / self.cfg.pfm.time_unit.get();
        (t / self.cfg.ferroelectric.dt.get()).round().max(1.0) as usize
    }
}

impl SpmInstrument for SpmSimulator {
    fn info(&self) -> InstrumentInfo {
        InstrumentInfo {
            name: format!("scopegym {} simulator", self.cfg.mode.name().to_uppercase()),
            kind: InstrumentKind::Spm,
            simulated: true,
        }
    }

    fn mode(&self) -> SpmMode {
        self.cfg.mode
    }

    fn clock(&self) -> f64 {
        self.clock
    }

    fn scan_settings(&self) -> ScanSettings {
        self.scan
    }

    fn configure_scan(&mut self, request: &ScanSettings) -> Result<ScanSettings> {
        let r = request;
        r.check_spm_request()?;
        let size = self.cfg.sample.size.get();
        let mut acc = *r;
        // The field must fit in the scanner range: shrink the pixel, then clamp the centre.
        let widest = r.rows.max(r.cols) as f64;
        acc.pixel_size = r.pixel_size.min(size / widest);
        let fov = acc.field_of_view();
        for (k, extent) in fov.iter().enumerate() {
            let lim = 0.5 * (size - extent);
            acc.center[k] = r.center[k].clamp(-lim, lim);
        }
        if acc.center != self.scan.center {
            self.scanner
                .move_center(self.scan.center, acc.center, self.clock);
        }
        let resized = acc.rows != self.scan.rows || acc.cols != self.scan.cols;
        self.scan = acc;
        if resized {
            self.alloc_channels();
        }
        Ok(acc)
    }

    fn acquire_frame(&mut self) -> Result<SpmFrame<'_>> {
        self.engaged("acquire_frame")?;
        let meta = self.scan_frame()?;
        Ok(SpmFrame {
            channels: &self.channels,
            meta,
        })
    }

    fn probe_position(&self) -> [f64; 2] {
        self.probe
    }

    fn move_probe(&mut self, position: [f64; 2]) -> Result<()> {
        self.check_point("position", position)?;
        self.probe = position;
        Ok(())
    }

    fn bias(&self) -> f64 {
        self.bias
    }

    fn set_bias(&mut self, bias: f64) -> Result<f64> {
        self.check_bias(bias)?;
        self.bias = bias;
        Ok(bias)
    }

    fn feedback_gains(&self) -> (f64, f64) {
        self.feedback.gains()
    }

    fn set_feedback_gains(&mut self, p_gain: f64, i_gain: f64) -> Result<(f64, f64)> {
        self.feedback.set_gains(p_gain, i_gain)?;
        Ok(self.feedback.gains())
    }

    fn is_withdrawn(&self) -> bool {
        self.withdrawn
    }

    fn set_withdrawn(&mut self, withdrawn: bool) -> Result<()> {
        self.withdrawn = withdrawn;
        Ok(())
    }
}

impl TipConditioning for SpmSimulator {
    fn condition_tip(&mut self, action: &Conditioning) -> Result<()> {
        self.engaged("condition_tip")?;
        let before = self.tip.clone();
        self.tip
            .condition(action, &self.cfg.tip, &mut self.rng_tip)?;
        self.clock += match action {
            Conditioning::Pulse { duration, .. } | Conditioning::Dip { duration, .. } => *duration,
        };
        self.scanner.advance(self.clock, &mut self.rng_scan);
        self.tip_changed(&before)
    }
}

impl BiasWriting for SpmSimulator {
    fn bias_pulse(&mut self, position: [f64; 2], bias: f64, duration: f64) -> Result<()> {
        self.engaged("bias_pulse")?;
        self.check_point("position", position)?;
        self.check_bias(bias)?;
        if !(duration.is_finite() && duration > 0.0 && duration <= 10.0) {
            return Err(PhysicsError::arg(
                "duration",
                format!("must be in (0, 10] s, got {duration}"),
            ));
        }
        if self.film.is_none() {
            return Err(PhysicsError::Refused {
                operation: "bias_pulse".into(),
                reason: "it needs a ferroelectric film (PFM mode)".into(),
            });
        }
        let (x, y, width, half) = self.film_point(position)?;
        let steps = self.reduced_steps(duration);
        let relax = self.reduced_steps(0.1 * duration).min(steps);
        let k = self.cfg.pfm.field_per_volt.get();
        let film = self.film.as_mut().expect("checked above");
        let v = bias + self.cfg.pfm.bias_offset.get();
        film.set_tip_field(x, y, v * k, width);
        film.run_window(steps, x, y, half);
        // Relax briefly at zero field so unstable nuclei shrink back.
        film.set_uniform_field(0.0);
        film.run_window(relax, x, y, half);
        self.probe = position;
        self.clock += duration;
        self.scanner.advance(self.clock, &mut self.rng_scan);
        Ok(())
    }
}

impl PointSpectroscopy for SpmSimulator {
    fn point_spectroscopy(&mut self, position: [f64; 2], waveform: &[f64]) -> Result<Vec<f64>> {
        self.engaged("point_spectroscopy")?;
        self.check_point("position", position)?;
        if waveform.is_empty() || waveform.len() > 100_000 {
            return Err(PhysicsError::arg(
                "waveform",
                format!("needs 1..=100000 points, got {}", waveform.len()),
            ));
        }
        for &v in waveform {
            self.check_bias(v)?;
        }
        if self.film.is_none() {
            return Err(PhysicsError::Refused {
                operation: "point_spectroscopy".into(),
                reason: "switching spectroscopy needs PFM mode".into(),
            });
        }
        let (x, y, width, half) = self.film_point(position)?;
        let steps = self.reduced_steps(self.cfg.pfm.point_time.get());
        let k = self.cfg.pfm.field_per_volt.get();
        let offset = self.cfg.pfm.bias_offset.get();
        let film = self.film.as_mut().expect("checked above");
        let mut out = Vec::with_capacity(waveform.len());
        for &v in waveform {
            film.set_tip_field(x, y, (v + offset) * k, width);
            film.run_window(steps, x, y, half);
            out.push(film.local_response(x, y, width));
        }
        film.set_uniform_field(0.0);
        self.probe = position;
        self.clock += waveform.len() as f64 * self.cfg.pfm.point_time.get();
        self.scanner.advance(self.clock, &mut self.rng_scan);
        Ok(out)
    }
}

impl LateralManipulation for SpmSimulator {
    fn manipulate(
        &mut self,
        start: [f64; 2],
        end: [f64; 2],
        bias: f64,
        conductance: f64,
    ) -> Result<Vec<f64>> {
        self.engaged("manipulate")?;
        self.check_point("start", start)?;
        self.check_point("end", end)?;
        if self.cfg.mode != SpmMode::Stm {
            return Err(PhysicsError::Refused {
                operation: "manipulate".into(),
                reason: "lateral manipulation needs STM mode".into(),
            });
        }
        // nA/mV = µS.
        let g = conductance * 1e6;
        let (s, e) = (self.lab_to_sample(start), self.lab_to_sample(end));
        let reach = 2.0 * self.cfg.manipulation.interaction_range.get();
        let nearest = self
            .adatoms
            .iter()
            .enumerate()
            .map(|(i, a)| (i, (a[0] - s[0]).hypot(a[1] - s[1])))
            .filter(|&(_, d)| d <= reach)
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((i, _)) = nearest {
            let out = lateral_manipulation(
                &self.cfg.manipulation,
                self.adatoms[i],
                s,
                e,
                bias,
                g,
                &mut self.rng_sample,
            )?;
            match out {
                Outcome::Moved(p) => self.adatoms[i] = p,
                Outcome::Lost => {
                    self.adatoms.remove(i);
                }
            }
            self.rebuild_truth()?;
        } else {
            // Still validate the arguments the way a real drag would.
            lateral_manipulation(&self.cfg.manipulation, s, s, s, bias, g, &mut seeded(0))?;
        }
        self.ensure_dilated()?;
        let len = (e[0] - s[0]).hypot(e[1] - s[1]);
        let n = ((len / (0.25 * self.cell)).ceil() as usize).clamp(2, 10_000);
        let trace = (0..n)
            .map(|k| {
                let t = k as f64 / (n - 1) as f64;
                let p = [s[0] + t * (e[0] - s[0]), s[1] + t * (e[1] - s[1])];
                f64::from(bilinear(self.dilated.view(), self.cell, p[0], p[1]))
            })
            .collect();
        self.probe = end;
        self.clock += len / MANIPULATION_SPEED;
        self.scanner.advance(self.clock, &mut self.rng_scan);
        Ok(trace)
    }
}
