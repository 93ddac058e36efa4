//! The simulated scanning probe microscope: a surface under a tip that wears, scanned line by
//! line with trace and retrace by a PI z-feedback on an imperfect scanner.
//!
//! One simulator serves the three modes of DESIGN.md §5:
//! - **AFM** (contact): the height channel is the z-piezo signal of the feedback tracking the
//!   surface dilated by the tip; the error channel is the deflection error (height units).
//!   With `afm.mode = "tapping"` ([`super::tapping`]) the feedback holds the cantilever's
//!   amplitude instead, and two more channels follow the error: `amplitude` (m) and `phase`
//!   (deg, the lag behind the drive, from the energy dissipated per tap).
//! - **STM** (constant current): the surface is the apparent-height map of an Ag(111) terrace
//!   with adatoms ([`super::adatoms`]); lateral manipulation moves the adatoms (its trace is the
//!   tip height recorded while dragging; an adatom the tip picks up changes the tip, one lost
//!   to a random site lies there); bias pulses and dips condition the tip.
//! - **PFM**: contact AFM over a ferroelectric film ([`super::ferro`]) whose polarization grid
//!   coincides with the sample grid; amplitude and phase channels, bias-pulse writing and
//!   switching spectroscopy.
//!
//! The sample is a square grid of `sample.pixels²` cells spanning `sample.size`, centred on the
//! origin of the sample frame. The grid is one period of an endless periodic sample
//! ([`super::surface`]: surfaces, adatoms and the film are all periodic; terraces up to a
//! constant rise per period), so a drift or offset that carries the scan past the grid's edge
//! images the sample continued, never a repeated edge value. The scanner's drift moves the
//! sample relative to the lab frame (instrument coordinates, [`crate::instrument`]). Per line:
//! the scanner gives the positions each pixel actually visits on the sample (drift, creep,
//! hysteresis), the tip-dilated surface (dilated periodically: the tip meets the sample across
//! the grid's edge) is interpolated there ([`bilinear`], the crate's one bilinear sampler), the
//! PI loop tracks it plus the scanner's height errors and detector noise (plane tilt, bow, z
//! drift; all opt-in) (trace, then retrace), and height noise (white, 1/f, line offsets, plus the
//! extra noise and glitches of an adsorbate on the tip) is added. Contact wears the tip (at a
//! rate, or by Archard's law at the AFM's load: `tip.wear_model`); a
//! tracking error beyond `sample.crash_threshold` is a crash; the tip can change spontaneously
//! while scanning. A changed tip re-images the rest of the frame.
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
use crate::spm::adatoms::{AdatomConfig, BumpPatch, bumps, corrugation, place_adatoms};
use crate::spm::dilation::{Dilator, Tip};
use crate::spm::feedback::{FeedbackConfig, LineStats, ZFeedback};
use crate::spm::ferro::{
    FerroConfig, FerroFilm, LightSwitching, LightTdgl, TipProtocol, pfm_response, pfm_signal,
    smooth_periodic,
};
use crate::spm::manipulation::{DragEvent, ManipulationConfig, Outcome, drag};
use crate::spm::scanner::{Scanner, ScannerConfig};
use crate::spm::surface::{
    SurfaceConfig, bilinear, bilinear_into, bilinear_nodes, generate, pad_periodic,
    pad_periodic_rows, periodic_node,
};
use crate::spm::tapping::AfmConfig;
use crate::spm::tip::{Conditioning, TipConfig, TipState, WearModel};
use crate::spm::tunnel::{
    CurrentNoise, GainUnits, TunnelingConfig, height_gains, log_current_gains,
};
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
    /// Whether a PFM frame also records the topography channels (`height`, `height_retrace`,
    /// `error`) through the z feedback. `false`: the frame has the `phase` and `amplitude`
    /// channels only, imaged at the same drifted positions with the same noise (they do not
    /// read the feedback), and the loop, the tip dilation and the tip's evolution along the
    /// passes (which only the topography sees) are not run. Default `true`.
    pub topography: bool,
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
            topography: true,
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

/// Which models the simulator runs (`fidelity`).
///
/// `Full` (the default) runs every model as documented in the module docs. `Fast` keeps every
/// model and every parameter but takes two shortcuts that leave the statistics of the images
/// as they were (the SPM tasks of `scopegym-envs` compare the two in their tests):
///
/// - the 1/f height noise is summed from 9 AR(1) processes a factor 4.2 apart in corner
///   frequency instead of 18 a factor 2 apart ([`Scanner::with_pink_components`]): the same
///   variance and band, half the normal draws per pixel; and those whose correlation from one
///   pixel to the next is below `e^{−2}` ≈ 0.14 are drawn as white noise of their variance
///   ([`Scanner::set_white_decay`]); the processes with a node every pixel, the white noise
///   and an adsorbate's extra white noise are drawn together as one Gaussian process with
///   their summed covariance, one normal draw per pixel ([`Scanner::set_single_innovation`],
///   [`Scanner::add_line_noise_with_white`]); the slower processes (linear between their
///   nodes) are summed in one pass, one `f32` rounding per pixel instead of one per process
///   (the same draws);
/// - a changed tip re-images the sample with the periodic dilation at once (exact up to the
///   grid's edge), instead of first the interior dilation and then, when a scan reaches the
///   edge band, the periodic one: the image values are the same, one dilation is saved;
/// - the z feedback evaluates runs of controller samples in closed form where no limit acts
///   ([`ZFeedback::set_closed_form`]): the same values up to rounding; below 6 samples per
///   pixel it runs a line in one pass without the per-piece set-up where no limit acts (bit
///   for bit the sample loop);
/// - the deterministic drift and the creep are evaluated every few pixels of a line and
///   interpolated linearly in between ([`Scanner::set_interpolated_drift`]): positions within
///   [`crate::spm::scanner::DRIFT_NODE_TOLERANCE`] (10⁻³) of a pixel of the exact ones;
/// - a changed image is dilated lazily, only over a window around the frame being scanned
///   (the same values there) when the frame covers part of the sample; anything else that
///   reads the image (manipulation) gets the whole grid; the periodic dilations compute only
///   the cells they keep, not the padding band ([`Dilator::dilate_valid`], the same values);
/// - PFM: the film's TDGL equation is integrated with a time step 2.5 times longer (at most
///   0.7 of the explicit scheme's stability limit; its fixed points, the states a pulse
///   leaves, are the equation's whatever the step), under the tip only where the field reaches
///   0.1 (reduced; a coercive field is 0.87) plus 4 cells, and only until the film has settled
///   ([`SpmSimulator::tip_protocol`], [`LightTdgl`]). The statistics of written domains and
///   switching loops stay within the tolerances the PFM tasks test.
///
/// The random streams differ from `Full`, so the same seed gives a different (equally likely)
/// session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpmFidelity {
    /// Every model as documented.
    #[default]
    Full,
    /// The cheaper stages above.
    Fast,
}

/// The fast model's lazily dilated window ([`SpmSimulator::dilate_scan_window`]): nodes added
/// on every side of the frame's extent (for drift during the frame) ...
const SCAN_WINDOW_MARGIN: f64 = 3.0;
/// ... and the largest fraction of the grid's area it covers (beyond it, the whole grid).
const SCAN_WINDOW_MAX_AREA: f64 = 0.8;

/// Number of 1/f processes in the fast model.
const FAST_PINK_COMPONENTS: usize = 9;
/// The fast model draws 1/f processes that decay by more than this per pixel as white noise
/// ([`Scanner::set_white_decay`]).
const FAST_WHITE_DECAY: f64 = 2.0;

/// The fast model's film time step: `FAST_DT_FACTOR` times the configured one, at most
/// `FAST_DT_STABILITY` of the explicit scheme's stability limit.
const FAST_DT_FACTOR: f64 = 2.5;
const FAST_DT_STABILITY: f64 = 0.7;

/// The fast model's film integration window reaches where the tip field is at least this
/// (reduced field units, against the coercive field 0.87 of the default Landau coefficients)
/// ...
const FAST_REACH_LEVEL: f64 = 0.1;
/// ... plus this many cells.
const FAST_WINDOW_MARGIN: f64 = 4.0;
/// The fast model stops integrating the film under one field once no cell changed by this
/// much in a step.
const FAST_SETTLED: f32 = 1e-5;

/// The light switching model's constants ([`FerroFilm::switch_pulse`]), fitted to the TDGL
/// integration (test `light_switching_writes_the_domains_of_the_tdgl` in [`super::ferro`]).
/// Selected by [`SpmFidelity::Fast`] for every bias pulse. `wall_smoothing` (1.5 cells) is
/// fitted so that the domain-writing task's phase images carry the TDGL's power at high
/// spatial frequencies (without it, about a third more: rougher walls).
pub const FAST_SWITCHING: LightSwitching = LightSwitching {
    nucleation_gradient: 1.4,
    nucleation_time: 0.5,
    curvature: 1.0,
    depinning: 0.04,
    mobility: 1.0,
    reach_level: 0.1,
    wall_smoothing: 1.5,
};

/// The film's time step: `ferroelectric.dt`, or in the fast model [`FAST_DT_FACTOR`] times
/// it, at most [`FAST_DT_STABILITY`] of the stability limit.
fn film_dt(cfg: &SpmConfig) -> f64 {
    let f = &cfg.ferroelectric;
    match cfg.fidelity {
        SpmFidelity::Full => f.dt.get(),
        SpmFidelity::Fast => {
            (FAST_DT_FACTOR * f.dt.get()).min(FAST_DT_STABILITY * f.stable_dt_limit())
        }
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
    /// Which models run ([`SpmFidelity`]). Default `"full"`.
    pub fidelity: SpmFidelity,
    /// STM tunnelling current, log-current feedback noise and bias-dependent adatom contrast
    /// ([`crate::spm::tunnel`]). Off by default.
    pub tunneling: TunnelingConfig,
    /// AFM operation: contact (default) or tapping, and the tip's load
    /// ([`crate::spm::tapping`]).
    pub afm: AfmConfig,
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
            fidelity: SpmFidelity::Full,
            tunneling: TunnelingConfig::default(),
            afm: AfmConfig::default(),
        }
    }
}

impl SpmConfig {
    /// This config with drift, creep, hysteresis, noise and the height errors (tilt, bow, z
    /// drift, detector noise) switched off (for calibration and tests).
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
        s.tilt = [Param::fixed(0.0), Param::fixed(0.0)];
        s.bow_curvature = Param::fixed(0.0);
        s.z_drift = Param::fixed(0.0);
        s.z_drift_diffusivity = Param::fixed(0.0);
        s.detector_noise = Param::fixed(0.0);
        s.detector_pink_noise = Param::fixed(0.0);
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
        self.tunneling.validate("tunneling.")?;
        self.afm.validate("afm.")?;
        if self.afm.is_tapping() && self.mode != SpmMode::Afm {
            return Err(PhysicsError::param(
                "afm.mode",
                format!(
                    "tapping needs the AFM mode, got mode = \"{}\"",
                    self.mode.name()
                ),
            ));
        }
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
    /// Detector noise before the loop (its own stream: switching it on leaves the others).
    rng_detector: SimRng,
    /// Sample grid cell size, m.
    cell: f64,
    /// The topography without adatoms, m.
    base_topography: Array2<f32>,
    /// Height the periodic sample gains per period along x and y (terraces), m.
    rise: [f64; 2],
    /// STM with adatoms: `base_topography` plus the terrace's atomic corrugation (computed once
    /// per sample).
    terrace: Option<Array2<f32>>,
    /// The terrace's atomic corrugation last computed and what it depends on (lattice
    /// constant, corrugation, cell, grid side), reused by a reset with the same ones (the same
    /// values; the settings were validated with the config).
    corrugation: Option<([f64; 3], usize, Array2<f32>)>,
    /// The true surface the tip meets (topography plus adatoms), m.
    truth: Array2<f32>,
    /// Tapping mode: the surface's material map (1 on features, 0 on the substrate,
    /// [`crate::spm::surface::Surface::feature`]) for the dissipation per tap.
    feature: Option<Array2<f32>>,
    /// The truth dilated by the tip: what a perfect feedback would record, m.
    dilated: Array2<f32>,
    dilated_valid: bool,
    /// Whether `dilated` is exact up to the grid's edge (the periodic dilation), not only at
    /// least the kernel's half width inside it.
    dilated_edges: bool,
    /// The fast model's scans: `Some([i0, i1, j0, j1])` while `dilated` is exact only on the
    /// nodes `i0..i1 × j0..j1` (a window around the frame, [`Self::dilate_scan_window`]);
    /// `None` when it is exact everywhere [`Self::dilated_edges`] says.
    dilated_window: Option<[usize; 4]>,
    /// The truth extended periodically by the kernel's half width (scratch).
    padded: Array2<f32>,
    /// Scratch for a drag: its events, and a block of the truth and of its dilation.
    drag_events: Vec<DragEvent>,
    block: Array2<f32>,
    block_dilated: Array2<f32>,
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
    /// The heights the feedback loop is handed when the scanner adds height errors or detector
    /// noise before the loop ([`Self::loop_input`]), m.
    loop_profile: Vec<f32>,
    zbuf: Vec<f32>,
    ebuf: Vec<f32>,
    tip_events: u64,
    /// STM with `tunneling.enabled`: the current noise, its own random stream, the per-sample
    /// noise of a pass (m) and the adatoms' apparent height at the reset bias (m).
    tunnel: Option<TunnelState>,
}

/// The tunnelling model's state ([`SpmConfig::tunneling`], STM only).
#[derive(Debug)]
struct TunnelState {
    noise: CurrentNoise,
    rng: SimRng,
    buf: Vec<f64>,
    kappa: f64,
    i_set: f64,
    adatom_height: f64,
}

fn channel(name: &str, units: &str, quantity: &str, shape: (usize, usize)) -> Channel {
    Channel {
        name: name.into(),
        units: units.into(),
        quantity: quantity.into(),
        image: Array2::zeros(shape),
    }
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
        let feedback = ZFeedback::new(&cfg.afm.feedback(&cfg.feedback))?;
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
            rng_detector: seeded(derive_seed(seed, "detector")),
            cell: 1.0,
            base_topography: Array2::zeros((1, 1)),
            rise: [0.0, 0.0],
            terrace: None,
            truth: Array2::zeros((1, 1)),
            feature: None,
            dilated: Array2::zeros((1, 1)),
            dilated_valid: false,
            dilated_edges: false,
            dilated_window: None,
            corrugation: None,
            padded: Array2::zeros((1, 1)),
            drag_events: Vec::new(),
            block: Array2::zeros((1, 1)),
            block_dilated: Array2::zeros((1, 1)),
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
            loop_profile: Vec::new(),
            zbuf: Vec::new(),
            ebuf: Vec::new(),
            tip_events: 0,
            tunnel: None,
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
        self.rng_detector = seeded(derive_seed(seed, "detector"));
        self.scanner = match cfg.fidelity {
            SpmFidelity::Full => Scanner::new(&cfg.scanner, &mut self.rng_scan)?,
            SpmFidelity::Fast => Scanner::with_pink_components(
                &cfg.scanner,
                FAST_PINK_COMPONENTS,
                &mut self.rng_scan,
            )?,
        };
        self.feedback = ZFeedback::new(&Self::loop_settings(&cfg)?)?;
        self.feedback
            .set_closed_form(cfg.fidelity == SpmFidelity::Fast);
        self.scanner
            .set_interpolated_drift(cfg.fidelity == SpmFidelity::Fast);
        if cfg.fidelity == SpmFidelity::Fast {
            self.scanner.set_white_decay(FAST_WHITE_DECAY)?;
            self.scanner.set_single_innovation(true);
        }
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
            let up = cfg.pfm.up_fraction.get();
            if up <= 0.0 || up >= 1.0 {
                // Poled: the threshold below would leave every cell down (up) whatever the
                // random polarization.
                film.fill(if up >= 1.0 { 1.0 } else { -1.0 });
            } else {
                let mut rng = seeded(derive_seed(seed, "film_init"));
                let noise: Vec<f64> = (0..n * n).map(|_| normal(&mut rng)).collect();
                let smooth =
                    smooth_periodic(&noise, [n, n], 0.5 * cfg.pfm.domain_size.get() / self.cell);
                let mut sorted = smooth.clone();
                sorted.sort_by(f64::total_cmp);
                let k = (((1.0 - up) * (n * n) as f64) as usize).min(n * n - 1);
                let threshold = sorted[k];
                for (v, &g) in film.polarization_mut().iter_mut().zip(&smooth) {
                    *v = if g > threshold { 1.0 } else { -1.0 };
                }
            }
            let dt = film_dt(&cfg);
            film.set_time_step(dt)?;
            let steps = (cfg.pfm.settle_time.get() / dt).round() as usize;
            match cfg.fidelity {
                SpmFidelity::Full => film.relax(steps, 0.0),
                SpmFidelity::Fast => {
                    film.set_uniform_field(0.0);
                    film.run_settling(steps, FAST_SETTLED);
                }
            }
            Some(film)
        } else {
            None
        };
        self.cfg = cfg;
        self.drawn = drawn;
        self.tunnel = self.tunnel_state(seed);
        let n = self.cfg.sample.pixels;
        self.terrace = if self.adatoms.is_empty() {
            None
        } else {
            let ad = &self.cfg.adatoms;
            let key = [ad.lattice_constant.get(), ad.corrugation.get(), self.cell];
            if !matches!(&self.corrugation, Some((k, m, _)) if *k == key && *m == n) {
                let h = corrugation(ad, [n, n], self.cell)?;
                self.corrugation = Some((key, n, h));
            }
            let h = &self.corrugation.as_ref().expect("computed above").2;
            Some(&topo.heights + h)
        };
        self.feature = if self.cfg.afm.is_tapping() {
            Some(topo.feature)
        } else {
            None
        };
        self.base_topography = topo.heights;
        self.rise = topo.rise;
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

    /// The feedback settings the loop runs with: `[feedback]` as the AFM mode maps it
    /// ([`crate::spm::tapping::AfmConfig::feedback`]), and with tunnelling on, in height units
    /// with the current floor's saturation ([`TunnelingConfig::loop_feedback`]).
    fn loop_settings(cfg: &SpmConfig) -> Result<FeedbackConfig> {
        let fb = cfg.afm.feedback(&cfg.feedback);
        if cfg.tunneling.enabled && cfg.mode == SpmMode::Stm {
            cfg.tunneling.loop_feedback(&fb)
        } else {
            Ok(fb)
        }
    }

    /// The gains in the units the instrument speaks (`tunneling.gain_units`), from or to the
    /// loop's height units: `to_loop` converts `(P, I)` for the loop, else back.
    fn convert_gains(&self, p: f64, i: f64, to_loop: bool) -> (f64, f64) {
        match &self.tunnel {
            Some(t) if self.cfg.tunneling.gain_units == GainUnits::LogCurrent => {
                if to_loop {
                    height_gains(p, i, t.kappa)
                } else {
                    log_current_gains(p, i, t.kappa)
                }
            }
            _ => (p, i),
        }
    }

    /// The tunnelling state for this session's config, `None` unless STM with
    /// `tunneling.enabled` (its random stream is its own: the others draw as without it).
    fn tunnel_state(&self, seed: u64) -> Option<TunnelState> {
        let t = &self.cfg.tunneling;
        if !(t.enabled && self.cfg.mode == SpmMode::Stm) {
            return None;
        }
        let mut rng = seeded(derive_seed(seed, "current"));
        let noise = CurrentNoise::new(
            t.current_noise.get(),
            t.current_pink_noise.get(),
            1.0 / self.feedback.period(),
            &mut rng,
        );
        Some(TunnelState {
            noise,
            rng,
            buf: Vec::new(),
            kappa: t.kappa(),
            i_set: t.setpoint_current.get(),
            adatom_height: self.cfg.adatoms.apparent_height.get(),
        })
    }

    /// With tunnelling on, the adatoms' apparent height at bias `bias`: their configured
    /// height (the apparent height at the reset bias `V₀`) plus
    /// `[ln ρ(V) − ln ρ(V₀)]/(2κ)` of the resonance ([`crate::spm::tunnel::AdatomResonance`]),
    /// at least 0; the truth is rebuilt when it changes.
    fn apply_bias_contrast(&mut self, bias: f64) -> Result<()> {
        let Some(t) = &self.tunnel else {
            return Ok(());
        };
        let res = self.cfg.tunneling.resonance();
        let v0 = self.cfg.bias.get();
        let shift = res.apparent_height(bias, t.kappa) - res.apparent_height(v0, t.kappa);
        let h = (t.adatom_height + shift).max(0.0);
        if h != self.cfg.adatoms.apparent_height.get() {
            self.cfg.adatoms.apparent_height = Param::fixed(h);
            self.rebuild_truth()?;
            self.rebuild_kernel()?;
        }
        Ok(())
    }

    /// Stage 3 of a pass: the PI z-feedback tracks the loop's input (`loop_profile` when
    /// `looped`, else `profile`; [`ZFeedback::scan_line`]); with tunnelling on, each controller
    /// sample's error also reads the current noise as a gap change, `ln(1 + δI/I_set)/(2κ)` ([`ZFeedback::scan_line_noisy`]).
    fn track_pass(&mut self, reverse: bool, looped: bool) -> Result<LineStats> {
        let input = if looped {
            &self.loop_profile
        } else {
            &self.profile
        };
        let dwell = self.scan.dwell_time;
        match self.tunnel.as_mut() {
            None => self
                .feedback
                .scan_line(input, dwell, reverse, &mut self.zbuf, &mut self.ebuf),
            Some(t) => {
                let m = self.feedback.line_samples(input.len(), dwell);
                t.buf.resize(m, 0.0);
                t.noise
                    .fill_height_noise(t.i_set, t.kappa, &mut t.buf, &mut t.rng);
                self.feedback.scan_line_noisy(
                    input,
                    dwell,
                    reverse,
                    &t.buf,
                    &mut self.zbuf,
                    &mut self.ebuf,
                )
            }
        }
    }

    /// With tunnelling on, row `r` of the `current` channel (the last): per pixel
    /// `I_set·exp(2κ·e)` of the pixel's mean error `e` (m), A.
    fn record_current(&mut self, r: usize) {
        if let Some(t) = &self.tunnel {
            let ch = self.channels.len() - 1;
            for (d, &e) in self.channels[ch]
                .image
                .row_mut(r)
                .iter_mut()
                .zip(&self.ebuf)
            {
                *d = (t.i_set * (2.0 * t.kappa * f64::from(e)).exp()) as f32;
            }
        }
    }

    fn rebuild_truth(&mut self) -> Result<()> {
        let n = self.cfg.sample.pixels;
        let under = self.terrace.as_ref().unwrap_or(&self.base_topography);
        self.truth = if self.adatoms.is_empty() {
            under.clone()
        } else {
            under + &bumps(&self.cfg.adatoms, &self.adatoms, [n, n], self.cell)?
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

    /// Dilates the truth by the tip where the kernel stays inside the grid: exact on every
    /// cell at least the kernel's half width from the edge ([`Self::dilate_to_edges`] finishes
    /// the band along the edge when a scan reaches it).
    fn ensure_dilated(&mut self) -> Result<()> {
        if self.dilated_window.is_some() {
            // Exact only around the last scan: the whole grid now.
            return self.dilate_to_edges();
        }
        if !self.dilated_valid && self.cfg.fidelity == SpmFidelity::Fast {
            // The fast model dilates periodically at once (the same values, one pass).
            return self.dilate_to_edges();
        }
        if !self.dilated_valid {
            let (ny, nx) = self.truth.dim();
            if self.dilated.dim() != (ny, nx) {
                self.dilated = Array2::zeros((ny, nx));
            }
            self.dilator
                .dilate(self.truth.view(), &self.kernel, self.dilated.view_mut())?;
            self.dilated_valid = true;
            self.dilated_edges = self.kernel.half_width() == 0;
        }
        Ok(())
    }

    /// Before each line of a frame: [`Self::ensure_dilated`], except in the fast model, where
    /// a changed image is dilated lazily, only over the window the scan reads
    /// ([`Self::dilate_scan_window`], from [`Self::pass_positions`]): the same values there, a
    /// fraction of the work when the frame covers a part of the sample.
    fn ensure_dilated_for_scan(&mut self) -> Result<()> {
        if self.cfg.fidelity != SpmFidelity::Fast {
            return self.ensure_dilated();
        }
        if !self.dilated_valid {
            let (ny, nx) = self.truth.dim();
            if self.dilated.dim() != (ny, nx) {
                self.dilated = Array2::zeros((ny, nx));
            }
            self.dilated_valid = true;
            self.dilated_edges = true;
            self.dilated_window = Some([0, 0, 0, 0]);
        }
        Ok(())
    }

    /// The fast model's scans: makes `dilated` exact on the nodes that bilinear sampling at the
    /// pass positions `xs`, `ys` (line `r` of the frame) reads, if the current window does not
    /// hold them: the periodic dilation (as [`Self::dilate_to_edges`], the same values)
    /// computed only on a window over the whole frame (the pass's extent along x, and along y
    /// stretched by the frame's remaining lines each way) plus [`SCAN_WINDOW_MARGIN`] nodes.
    /// Falls back to the whole grid when the window would wrap around the grid's edge or
    /// cover most of it.
    fn dilate_scan_window(&mut self, r: usize) -> Result<()> {
        let Some(w) = self.dilated_window else {
            return Ok(());
        };
        let n = self.cfg.sample.pixels;
        let node = |x: f64| (x / self.cell + 0.5 * n as f64 - 0.5).floor();
        let range = |v: &[f64]| {
            v.iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)))
        };
        let ((x0, x1), (y0, y1)) = (range(&self.xs), range(&self.ys));
        // Nodes read: floor(u) and floor(u) + 1.
        let (j0, j1, i0, i1) = (node(x0), node(x1) + 2.0, node(y0), node(y1) + 2.0);
        let inside = |lo: f64, hi: f64, a: usize, b: usize| lo >= a as f64 && hi <= b as f64;
        if inside(i0, i1, w[0], w[1]) && inside(j0, j1, w[2], w[3]) {
            return Ok(());
        }
        let s = self.scan;
        let lines = s.pixel_size / self.cell;
        let m = SCAN_WINDOW_MARGIN;
        let (i0, i1) = (
            i0 - (r as f64 * lines).ceil() - m,
            i1 + ((s.rows - 1 - r) as f64 * lines).ceil() + m,
        );
        let (j0, j1) = (j0 - m, j1 + m);
        let h = self.kernel.half_width();
        let nf = n as f64;
        let fits = i0 >= 0.0 && j0 >= 0.0 && i1 <= nf && j1 <= nf;
        if h == 0 || !fits || (i1 - i0) * (j1 - j0) > SCAN_WINDOW_MAX_AREA * nf * nf {
            return self.dilate_to_edges();
        }
        let (i0, i1, j0, j1) = (i0 as usize, i1 as usize, j0 as usize, j1 as usize);
        let shape = (n + 2 * h, n + 2 * h);
        if self.padded.dim() != shape {
            self.padded = Array2::zeros(shape);
        }
        // Node i sits at padded row i + h: nodes i0..i1 need rows i0..i1 + 2h (only those are
        // padded), and are the interior of that block ([`Dilator::dilate_valid`]: the band is
        // not computed).
        pad_periodic_rows(
            self.truth.view(),
            self.rise,
            h,
            self.padded.view_mut(),
            i0..i1 + 2 * h,
        )?;
        self.dilator.dilate_valid(
            self.padded
                .slice(ndarray::s![i0..i1 + 2 * h, j0..j1 + 2 * h]),
            &self.kernel,
            self.dilated.slice_mut(ndarray::s![i0..i1, j0..j1]),
        )?;
        self.dilated_window = Some([i0, i1, j0, j1]);
        Ok(())
    }

    /// Whether sampling the image anywhere in the box `[lo, hi]` (sample frame, m) reads a node
    /// within the kernel's half width of the grid's edge (or past it).
    fn reaches_edge_band(&self, lo: [f64; 2], hi: [f64; 2]) -> bool {
        let n = self.cfg.sample.pixels as f64;
        let h = self.kernel.half_width() as f64;
        let u = |x: f64| x / self.cell + 0.5 * n - 0.5;
        // Nodes floor(u) and floor(u) + 1 must lie in [h, n − 1 − h].
        !(u(lo[0]) >= h && u(lo[1]) >= h && u(hi[0]) < n - 1.0 - h && u(hi[1]) < n - 1.0 - h)
    }

    /// Makes the valid image exact up to the grid's edge when sampling the box `[lo, hi]`
    /// (sample frame, m) needs it: the periodic dilation (the truth extended by the kernel's
    /// half width with its periodic continuation, dilated, the grid's part kept), so that cells
    /// near the edge see the tip meet the sample across it.
    fn dilate_to_edges_over(&mut self, lo: [f64; 2], hi: [f64; 2]) -> Result<()> {
        if self.dilated_valid && !self.dilated_edges && self.reaches_edge_band(lo, hi) {
            self.dilate_to_edges()?;
        }
        Ok(())
    }

    /// The periodic dilation of the truth over the whole grid (see
    /// [`Self::dilate_to_edges_over`]).
    fn dilate_to_edges(&mut self) -> Result<()> {
        let (ny, nx) = self.truth.dim();
        if self.dilated.dim() != (ny, nx) {
            self.dilated = Array2::zeros((ny, nx));
        }
        let h = self.kernel.half_width();
        if h == 0 {
            self.dilator
                .dilate(self.truth.view(), &self.kernel, self.dilated.view_mut())?;
        } else {
            let shape = (ny + 2 * h, nx + 2 * h);
            if self.padded.dim() != shape {
                self.padded = Array2::zeros(shape);
            }
            pad_periodic(self.truth.view(), self.rise, h, self.padded.view_mut())?;
            // The interior only: the values `dilate` gives there, bit for bit
            // ([`Dilator::dilate_valid`]), without the discarded band.
            self.dilator
                .dilate_valid(self.padded.view(), &self.kernel, self.dilated.view_mut())?;
        }
        self.dilated_valid = true;
        self.dilated_edges = true;
        self.dilated_window = None;
        Ok(())
    }

    fn alloc_channels(&mut self) {
        let shape = (self.scan.rows, self.scan.cols);
        let mut ch = Vec::new();
        if self.cfg.mode == SpmMode::Pfm {
            ch.push(channel("phase", "deg", "PFM phase", shape));
            ch.push(channel("amplitude", "a.u.", "PFM amplitude", shape));
        }
        if !self.records_topography() {
            self.channels = ch;
            self.noiseless = Array2::zeros(shape);
            let c = self.scan.cols;
            self.xs.resize(c, 0.0);
            self.ys.resize(c, 0.0);
            return;
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
        if self.tunnel.is_some() {
            ch.push(channel(
                "current",
                "A",
                "tunnelling current (from the log-current error), trace",
                shape,
            ));
        }
        if self.cfg.mode == SpmMode::Afm && self.cfg.afm.is_tapping() {
            ch.push(channel(
                "amplitude",
                "m",
                "cantilever amplitude (tapping), trace",
                shape,
            ));
            ch.push(channel(
                "phase",
                "deg",
                "cantilever phase lag behind the drive (tapping), trace",
                shape,
            ));
        }
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

    /// Scans one frame, line by line, as a pipeline of named stages per pass (trace, then
    /// retrace):
    ///
    /// 1. [`Self::pass_positions`]: where each pixel of the pass really is on the sample.
    /// 2. [`Self::sample_dilated_profile`]: the tip-dilated surface there (what a perfect
    ///    feedback would record); [`Self::loop_input`] adds what the loop sees besides it
    ///    (plane tilt, scanner bow, z drift, detector noise; opt-in); the first pass of the
    ///    frame engages the feedback on it.
    /// 3. [`Self::track_pass`]: the PI z-feedback tracks the loop's input.
    /// 4. [`Self::add_pass_noise`]: scanner noise, and an adsorbate's extra noise and glitch.
    /// 5. [`Self::record_pass`]: the height, error, PFM and noiseless channels.
    /// 6. [`Self::evolve_tip_over_pass`]: wear, crashes and spontaneous pick-ups, which re-image
    ///    the rest of the frame when they change the kernel.
    ///
    /// The random streams are drawn in this order, pass after pass, so a seed gives one frame.
    fn scan_frame(&mut self) -> Result<SpmFrameMeta> {
        let s = self.scan;
        let t_start = self.clock;
        let line_time = 2.0 * s.cols as f64 * s.dwell_time + s.flyback_time;
        // The film does not change during a frame: its PFM response is computed once.
        let pfm = self
            .film
            .as_ref()
            .map(|film| pfm_response(film, self.cfg.pfm.transfer_sigma.get() / self.cell));
        if let (Some(resp), false) = (pfm.as_ref(), self.records_topography()) {
            // PFM channels only: the scanner's positions of both passes (its state and streams
            // advance as in a full frame), the trace imaged.
            for r in 0..s.rows {
                let t_line = self.clock;
                for (pass, reverse) in [(0usize, false), (1, true)] {
                    let t0 = t_line + pass as f64 * s.cols as f64 * s.dwell_time;
                    self.scanner.line_positions(
                        &s,
                        r,
                        t0,
                        reverse,
                        &mut self.rng_scan,
                        &mut self.xs,
                        &mut self.ys,
                    )?;
                    if !reverse {
                        self.record_pfm_row(r, resp);
                    }
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
            return Ok(meta);
        }
        let mut engaged = false;
        for r in 0..s.rows {
            self.ensure_dilated_for_scan()?;
            let t_line = self.clock;
            for (pass, reverse) in [(0usize, false), (1, true)] {
                let t0 = t_line + pass as f64 * s.cols as f64 * s.dwell_time;
                self.pass_positions(r, t0, reverse)?;
                self.sample_dilated_profile();
                let looped = self.loop_input(r, t0, reverse)?;
                let input = if looped {
                    &self.loop_profile
                } else {
                    &self.profile
                };
                if !engaged {
                    // The loop starts settled on the first pixel the frame visits.
                    let first = if reverse { input[s.cols - 1] } else { input[0] };
                    self.feedback.engage(f64::from(first));
                    engaged = true;
                }
                let stats = self.track_pass(reverse, looped)?;
                self.add_pass_noise(reverse);
                self.record_pass(r, reverse, pfm.as_ref());
                self.record_tapping(r, reverse);
                if !reverse {
                    self.record_current(r);
                }
                self.evolve_tip_over_pass(&stats)?;
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

    /// Stage 1 of a pass: the sample positions (m, into `xs`, `ys`) the scanner's pixels of line
    /// `r` visit from time `t0` (drift, creep, hysteresis: [`Scanner::line_positions`]), and the
    /// periodic dilation up to the grid's edge if they reach its band.
    fn pass_positions(&mut self, r: usize, t0: f64, reverse: bool) -> Result<()> {
        let s = self.scan;
        self.scanner.line_positions(
            &s,
            r,
            t0,
            reverse,
            &mut self.rng_scan,
            &mut self.xs,
            &mut self.ys,
        )?;
        if self.dilated_window.is_some() {
            self.dilate_scan_window(r)?;
        } else if !self.dilated_edges {
            let range = |v: &[f64]| {
                v.iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)))
            };
            let ((x0, x1), (y0, y1)) = (range(&self.xs), range(&self.ys));
            self.dilate_to_edges_over([x0, y0], [x1, y1])?;
        }
        Ok(())
    }

    /// Stage 2 of a pass: the tip-dilated surface (m) at the pass's positions, into `profile`,
    /// by the crate's one bilinear sampler over the periodic sample.
    fn sample_dilated_profile(&mut self) {
        bilinear_into(
            self.dilated.view(),
            self.cell,
            self.rise,
            &self.xs,
            &self.ys,
            &mut self.profile,
        );
    }

    /// Stage 2b of a pass, before the loop: when the scanner adds height errors (plane tilt,
    /// bow, z drift: [`Scanner::add_line_z_errors`]) or detector noise
    /// ([`Scanner::add_detector_noise`], drawn from its own stream), writes the profile plus
    /// them into `loop_profile` and returns `true`: the loop tracks them, so they reach the
    /// height channel shaped by its transfer function. Otherwise returns `false` and the loop is
    /// handed `profile` itself. The noiseless channel stays the tip-dilated surface.
    fn loop_input(&mut self, r: usize, t0: f64, reverse: bool) -> Result<bool> {
        let z_errors = self.scanner.has_z_errors();
        let detector = self.scanner.has_detector_noise();
        if !(z_errors || detector) {
            return Ok(false);
        }
        self.loop_profile.clear();
        self.loop_profile.extend_from_slice(&self.profile);
        if z_errors {
            self.scanner.add_line_z_errors(
                &self.scan,
                r,
                t0,
                reverse,
                &self.xs,
                &self.ys,
                &mut self.loop_profile,
            )?;
        }
        if detector {
            self.scanner.add_detector_noise(
                &mut self.loop_profile,
                self.scan.dwell_time,
                reverse,
                &mut self.rng_detector,
            );
        }
        Ok(true)
    }

    /// Stage 4 of a pass: height noise on the recorded line `zbuf` (m). The scanner's white,
    /// 1/f and line-offset noise ([`Scanner::add_line_noise`]); with an adsorbate on the tip,
    /// extra white noise of `(noise_factor − 1) · max(white_noise, 5 pm)` per pixel, and with
    /// probability `glitch_probability` a glitch: the tip state flips at a random pixel and the
    /// rest of the pass (in scan direction) jumps by `±U(0.5, 1.5) · 0.1 nm`, a streak.
    fn add_pass_noise(&mut self, reverse: bool) {
        let cols = self.scan.cols;
        let dwell = self.scan.dwell_time;
        let white = self.cfg.scanner.white_noise.get();
        let extra = (self.tip.noise_factor() - 1.0).max(0.0) * white.max(5e-12);
        if self.cfg.fidelity == SpmFidelity::Fast {
            // One draw per pixel for both white noises (the same distribution).
            self.scanner.add_line_noise_with_white(
                &mut self.zbuf,
                dwell,
                reverse,
                extra,
                &mut self.rng_noise,
            );
        } else {
            self.scanner
                .add_line_noise(&mut self.zbuf, dwell, reverse, &mut self.rng_noise);
            if extra > 0.0 {
                for z in self.zbuf.iter_mut() {
                    *z += (extra * normal(&mut self.rng_noise)) as f32;
                }
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
    }

    /// Stage 5 of a pass: writes row `r` of the channels. Both passes record the height (trace
    /// or retrace); the trace also records the feedback error and the noiseless reference: the
    /// dilated profile, or in PFM mode (`pfm`, the film's response map, [`pfm_response`]) the
    /// domain phase (0° or 180°), with the phase and amplitude channels from [`pfm_signal`].
    fn record_pass(&mut self, r: usize, reverse: bool, pfm: Option<&Array2<f64>>) {
        let i_height = if pfm.is_some() { 2 } else { 0 };
        let row_h = if reverse { i_height + 1 } else { i_height };
        self.channels[row_h]
            .image
            .row_mut(r)
            .iter_mut()
            .zip(&self.zbuf)
            .for_each(|(d, v)| *d = *v);
        if reverse {
            return;
        }
        self.channels[i_height + 2]
            .image
            .row_mut(r)
            .iter_mut()
            .zip(&self.ebuf)
            .for_each(|(d, v)| *d = *v);
        if let Some(resp) = pfm {
            self.record_pfm_row(r, resp);
        } else {
            self.noiseless
                .row_mut(r)
                .iter_mut()
                .zip(&self.profile)
                .for_each(|(d, v)| *d = *v);
        }
    }

    /// Row `r` of the PFM phase and amplitude channels ([`pfm_signal`] of the response map
    /// `resp` at the pass's positions) and of the noiseless phase (0° or 180°).
    fn record_pfm_row(&mut self, r: usize, resp: &Array2<f64>) {
        let (gain, amp_noise, phase_noise) = (
            self.cfg.pfm.gain.get(),
            self.cfg.pfm.amplitude_noise.get(),
            self.cfg.pfm.phase_noise.get().to_degrees(),
        );
        // The main channel is the phase: its noiseless value is 0° or 180°.
        for j in 0..self.scan.cols {
            // The film is periodic without rise.
            let v = bilinear(resp.view(), self.cell, [0.0, 0.0], self.xs[j], self.ys[j]) as f32;
            let v = f64::from(v);
            let (a, ph) = pfm_signal(v, gain, amp_noise, phase_noise, &mut self.rng_noise);
            self.channels[0].image[[r, j]] = ph;
            self.channels[1].image[[r, j]] = a;
            self.noiseless[[r, j]] = if v >= 0.0 { 0.0 } else { 180.0 };
        }
    }

    /// Whether frames record the topography channels: always outside PFM mode, in PFM mode
    /// unless `pfm.topography` is off.
    fn records_topography(&self) -> bool {
        self.film.is_none() || self.cfg.pfm.topography
    }

    /// Stage 5b of a pass, tapping mode only (AFM): the trace's amplitude and phase channels
    /// from the pixel's mean tracking error and the dissipation per tap of the material under
    /// the tip (the feature map sampled bilinearly at its position, between
    /// `dissipation_substrate` and `dissipation_feature`), by [`AfmConfig::signals`].
    fn record_tapping(&mut self, r: usize, reverse: bool) {
        let Some(feature) = self.feature.as_ref() else {
            return;
        };
        if reverse || self.channels.len() < 5 {
            return;
        }
        let afm = &self.cfg.afm;
        let (e_sub, e_feat) = (
            afm.dissipation_substrate.get(),
            afm.dissipation_feature.get(),
        );
        for j in 0..self.scan.cols {
            let m = bilinear(
                feature.view(),
                self.cell,
                [0.0, 0.0],
                self.xs[j],
                self.ys[j],
            );
            let e_dis = e_sub + (e_feat - e_sub) * m;
            let (a, phi) = afm.signals(f64::from(self.ebuf[j]), e_dis);
            self.channels[3].image[[r, j]] = a as f32;
            self.channels[4].image[[r, j]] = phi.to_degrees() as f32;
        }
    }

    /// Stage 6 of a pass: the tip evolves along it. Gradual wear first, in contact modes
    /// ([`TipState::wear`] over the pass's length; the image follows once the kernel changed
    /// visibly, [`Self::refresh_kernel`]), then abrupt changes: a crash by the part of the
    /// pass's largest tracking error beyond `sample.crash_threshold` ([`TipState::crash`]) and
    /// spontaneous pick-ups over the pass's time ([`TipState::spontaneous`]); a changed tip
    /// rebuilds the kernel for the rest of the frame.
    fn evolve_tip_over_pass(&mut self, stats: &LineStats) -> Result<()> {
        let s = self.scan;
        if self.cfg.mode != SpmMode::Stm {
            self.wear_over_pass()?;
        }
        let before = self.tip.clone();
        let crash = self.cfg.sample.crash_threshold.get();
        if stats.max_abs_error > crash {
            self.tip.crash(
                stats.max_abs_error - crash,
                &self.cfg.tip,
                &mut self.rng_tip,
            )?;
        }
        self.tip.spontaneous(
            s.cols as f64 * s.dwell_time,
            &self.cfg.tip,
            &mut self.rng_tip,
        )?;
        self.tip_changed(&before)
    }

    /// Gradual wear over one pass in a contact mode: `wear_model = "rate"`
    /// ([`TipState::wear`]) or `"archard"` ([`TipState::wear_archard`] at the AFM's load,
    /// [`AfmConfig::load`]: `contact_force`, or the mean tapping force at the set point); the
    /// image follows once the kernel changed visibly ([`Self::refresh_kernel`]).
    fn wear_over_pass(&mut self) -> Result<()> {
        let s = self.scan;
        let travel = s.cols as f64 * s.pixel_size;
        let (r0, a0) = (self.tip.radius(), self.tip.flat_radius());
        match self.cfg.tip.wear_model {
            WearModel::Rate => self.tip.wear(travel, &self.cfg.tip, &mut self.rng_tip)?,
            WearModel::Archard => {
                self.tip
                    .wear_archard(self.cfg.afm.load(), travel, &self.cfg.tip)?;
            }
        }
        if self.tip.radius() != r0 || self.tip.flat_radius() != a0 {
            self.refresh_kernel()?;
        }
        Ok(())
    }

    /// The film cell `(x, y)` under the lab position `p_lab`.
    fn film_point(&self, p_lab: [f64; 2]) -> (f64, f64) {
        self.cell_coords(self.lab_to_sample(p_lab))
    }

    /// How the tip writes and probes the film (`None` outside PFM mode): the Lorentzian field
    /// of `pfm.tip_width` in cells, integrated in a window of `max(4·width, 12)` cells around
    /// the tip; in the fast model ([`SpmFidelity::Fast`]) the light integration
    /// ([`LightTdgl`]: the window fitted to where the field exceeds [`FAST_REACH_LEVEL`], an
    /// early stop once the film has settled) and, for bias pulses, the light switching model
    /// ([`FAST_SWITCHING`]).
    pub fn tip_protocol(&self) -> Option<TipProtocol> {
        self.film.as_ref()?;
        let width = self.cfg.pfm.tip_width.get() / self.cell;
        Some(TipProtocol {
            width,
            half: ((4.0 * width).ceil() as usize).max(12),
            field_per_volt: self.cfg.pfm.field_per_volt.get(),
            bias_offset: self.cfg.pfm.bias_offset.get(),
            light: (self.cfg.fidelity == SpmFidelity::Fast).then_some(LightTdgl {
                reach_level: FAST_REACH_LEVEL,
                margin: FAST_WINDOW_MARGIN,
                tol: FAST_SETTLED,
            }),
            switching: (self.cfg.fidelity == SpmFidelity::Fast).then_some(FAST_SWITCHING),
        })
    }

    /// Time steps of the film's explicit scheme in `duration` s (at least 1).
    pub fn reduced_steps(&self, duration: f64) -> usize {
        let t = duration / self.cfg.pfm.time_unit.get();
        (t / film_dt(&self.cfg)).round().max(1.0) as usize
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
        self.apply_bias_contrast(bias)?;
        self.bias = bias;
        Ok(bias)
    }

    fn feedback_gains(&self) -> (f64, f64) {
        let (kp, ki) = self.feedback.gains();
        self.convert_gains(kp, ki, false)
    }

    fn set_feedback_gains(&mut self, p_gain: f64, i_gain: f64) -> Result<(f64, f64)> {
        let (kp, ki) = self.convert_gains(p_gain, i_gain, true);
        self.feedback.set_gains(kp, ki)?;
        Ok(self.feedback_gains())
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
        let (x, y) = self.film_point(position);
        let tip = self.tip_protocol().expect("checked above");
        let steps = self.reduced_steps(duration);
        // Then a brief relaxation at zero field so that unstable nuclei shrink back.
        let relax = self.reduced_steps(0.1 * duration).min(steps);
        let film = self.film.as_mut().expect("checked above");
        film.tip_pulse(x, y, bias, steps, relax, &tip);
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
        let (x, y) = self.film_point(position);
        let tip = self.tip_protocol().expect("checked above");
        let steps = self.reduced_steps(self.cfg.pfm.point_time.get());
        let film = self.film.as_mut().expect("checked above");
        let out = film.tip_spectroscopy(x, y, waveform, steps, &tip);
        film.set_uniform_field(0.0);
        self.probe = position;
        self.clock += waveform.len() as f64 * self.cfg.pfm.point_time.get();
        self.scanner.advance(self.clock, &mut self.rng_scan);
        Ok(out)
    }
}

impl LateralManipulation for SpmSimulator {
    /// Drags the adatom nearest `start` (within twice the interaction range, on the periodic
    /// sample) along the path ([`drag`]) and returns the tip height (m) at points every quarter
    /// cell along the path, recorded while dragging: each point sees the adatom where it is when
    /// the tip passes there (at its start site before the first hop, at each new site after a
    /// hop, gone once the tip has picked it up, imaged with the changed tip from then on), so
    /// hops show as steps in the trace where they happen. A picked-up adatom changes the tip
    /// ([`TipState::pick_up`]); a scattered one lies on its new site.
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
            .map(|(i, &a)| {
                let a = self.image_near(a, s);
                (i, a, (a[0] - s[0]).hypot(a[1] - s[1]))
            })
            .filter(|&(_, _, d)| d <= reach)
            .min_by(|a, b| a.2.total_cmp(&b.2));
        let len = (e[0] - s[0]).hypot(e[1] - s[1]);
        let n = ((len / (0.25 * self.cell)).ceil() as usize).clamp(2, 10_000);
        let point = |k: usize| {
            let t = k as f64 / (n - 1) as f64;
            (t, [s[0] + t * (e[0] - s[0]), s[1] + t * (e[1] - s[1])])
        };
        let trace = if let Some((i, atom, _)) = nearest {
            let mut events = std::mem::take(&mut self.drag_events);
            let out = drag(
                &self.cfg.manipulation,
                atom,
                s,
                e,
                bias,
                g,
                &mut self.rng_sample,
                &mut events,
            );
            let trace = out.and_then(|out| self.drag_trace(i, atom, out, &events, n, point));
            self.drag_events = events;
            trace?
        } else {
            // Still validate the arguments the way a real drag would.
            drag(
                &self.cfg.manipulation,
                s,
                s,
                s,
                bias,
                g,
                &mut seeded(0),
                &mut Vec::new(),
            )?;
            self.ensure_dilated()?;
            self.dilate_to_edges_over(
                [s[0].min(e[0]), s[1].min(e[1])],
                [s[0].max(e[0]), s[1].max(e[1])],
            )?;
            (0..n)
                .map(|k| {
                    let p = point(k).1;
                    bilinear(self.dilated.view(), self.cell, self.rise, p[0], p[1])
                })
                .collect()
        };
        self.probe = end;
        self.clock += len / MANIPULATION_SPEED;
        self.scanner.advance(self.clock, &mut self.rng_scan);
        Ok(trace)
    }
}

/// The cells of a bump window (`side²` cells from `(row0, col0)`, any integers) and all their
/// periodic images on a grid of `shape` that fall in `region` (`[rows, cols]`, inclusive
/// ranges): calls `f(k, r, c, period)` with `k` the window's row-major cell index, `(r, c)` the
/// cell's position in the region and `period = [py, px]` the periods between the image and the
/// grid (the image of grid cell `(i, j)` is `(i + py·rows, j + px·cols)`).
fn for_window_images(
    row0: i64,
    col0: i64,
    side: usize,
    shape: [usize; 2],
    region: [[i64; 2]; 2],
    mut f: impl FnMut(usize, usize, usize, [i64; 2]),
) {
    let (ny, nx) = (shape[0] as i64, shape[1] as i64);
    let [[r_lo, r_hi], [c_lo, c_hi]] = region;
    // The images x + k·n of the cells x of a window axis inside [lo, hi]:
    // ceil((lo − x)/n) ≤ k ≤ floor((hi − x)/n). Each as (window index, region index, period).
    let images = |first: i64, n: i64, lo: i64, hi: i64| -> Vec<(usize, usize, i64)> {
        let mut out = Vec::new();
        for d in 0..side {
            let x = first + d as i64;
            for k in -(x - lo).div_euclid(n)..=(hi - x).div_euclid(n) {
                let at = x + k * n;
                out.push((d, (at - lo) as usize, at.div_euclid(n)));
            }
        }
        out
    };
    let cols = images(col0, nx, c_lo, c_hi);
    if cols.is_empty() {
        return;
    }
    for (di, r, py) in images(row0, ny, r_lo, r_hi) {
        for &(dj, c, px) in &cols {
            f(di * side + dj, r, c, [py, px]);
        }
    }
}

/// The surface near a drag's path, for its trace: on a region of the periodic sample (any
/// integer cells) around the path, the truth without the dragged adatom (`base`), the surface
/// under the adatoms (`under`), and `field`, the truth with the dragged adatom's bump at its
/// current site (the maximum of `base` and `under + bump`, as [`bumps`] combines bumps). The
/// trace's nodes are the brute-force dilation of `field` by the tip, equal (up to the order of
/// `f32` roundings) to the image of that surface.
#[derive(Debug)]
struct DragField {
    /// Rows and columns of the region, inclusive.
    region: [[i64; 2]; 2],
    width: usize,
    base: Vec<f32>,
    under: Vec<f32>,
    field: Vec<f32>,
}

impl DragField {
    fn new(region: [[i64; 2]; 2]) -> Self {
        let [[r_lo, r_hi], [c_lo, c_hi]] = region;
        let (h, w) = ((r_hi - r_lo + 1) as usize, (c_hi - c_lo + 1) as usize);
        Self {
            region,
            width: w,
            base: vec![0.0; h * w],
            under: vec![0.0; h * w],
            field: vec![0.0; h * w],
        }
    }

    /// Fills `dst` with the periodic grid `g` (rise `rise`) over the region.
    fn fill(&mut self, which: usize, g: ArrayView2<'_, f32>, rise: [f64; 2]) {
        let [[r_lo, _], [c_lo, _]] = self.region;
        let w = self.width;
        let dst = if which == 0 {
            &mut self.base
        } else {
            &mut self.under
        };
        for (k, v) in dst.iter_mut().enumerate() {
            let (r, c) = ((k / w) as i64, (k % w) as i64);
            *v = periodic_node(g, rise, r_lo + r, c_lo + c) as f32;
        }
    }

    /// `field` with the bump `patch` (on the grid of `shape`) on `base`.
    fn place(&mut self, patch: Option<&BumpPatch>, shape: [usize; 2]) {
        self.field.copy_from_slice(&self.base);
        if let Some(p) = patch {
            let w = self.width;
            let (field, under) = (&mut self.field, &self.under);
            for_window_images(p.row0, p.col0, p.side, shape, self.region, |k, r, c, _| {
                let at = r * w + c;
                let v = under[at] + p.values[k];
                if v > field[at] {
                    field[at] = v;
                }
            });
        }
    }

    /// The brute-force dilation of `field` by `kernel` at grid node `(i, j)` (its sources must
    /// lie in the region), m.
    fn node(&self, kernel: &Tip, i: i64, j: i64) -> f64 {
        let side = kernel.side();
        let c = (side / 2) as i64;
        let heights = kernel.heights();
        let [[r_lo, _], [c_lo, _]] = self.region;
        let mut best = f32::NEG_INFINITY;
        for ti in 0..side {
            let r = (i + c - ti as i64 - r_lo) as usize;
            let row = &self.field[r * self.width..(r + 1) * self.width];
            let c0 = (j + c - c_lo) as usize;
            for (tj, &t) in heights[ti * side..(ti + 1) * side].iter().enumerate() {
                let v = row[c0 - tj] + t;
                if v > best {
                    best = v;
                }
            }
        }
        f64::from(best)
    }
}

impl SpmSimulator {
    /// The periodic image of sample position `p` (m) nearest `near` (m).
    fn image_near(&self, p: [f64; 2], near: [f64; 2]) -> [f64; 2] {
        let l = self.cfg.sample.pixels as f64 * self.cell;
        [
            p[0] + l * ((near[0] - p[0]) / l).round(),
            p[1] + l * ((near[1] - p[1]) / l).round(),
        ]
    }

    /// The periodic image of sample position `p` (m) on the sample grid, `[-L/2, L/2]`.
    fn on_grid(&self, p: [f64; 2]) -> [f64; 2] {
        self.image_near(p, [0.0, 0.0])
    }

    /// The truth without adatom `i` on the cells of `patch` (its bump window; wrapped cells,
    /// row-major): the surface under the adatoms plus the other adatoms' bumps there.
    fn without_adatom(&self, i: usize, patch: &BumpPatch) -> Result<Vec<f32>> {
        let n = self.cfg.sample.pixels;
        let shape = [n, n];
        let under = self.terrace.as_ref().unwrap_or(&self.base_topography);
        let side = patch.side;
        let mut bump = vec![0.0f32; side * side];
        // The other adatoms whose windows can reach this one (minimum-image distance).
        let centre = [
            (patch.col0 as f64 + 0.5 * side as f64 - 0.5 * n as f64) * self.cell,
            (patch.row0 as f64 + 0.5 * side as f64 - 0.5 * n as f64) * self.cell,
        ];
        let reach = (side as f64 + 1.0) * self.cell;
        for (k, &a) in self.adatoms.iter().enumerate() {
            let q = self.image_near(a, centre);
            if k == i || (q[0] - centre[0]).abs() > reach || (q[1] - centre[1]).abs() > reach {
                continue;
            }
            let other = BumpPatch::new(&self.cfg.adatoms, a, shape, self.cell)?;
            for (k, b) in bump.iter_mut().enumerate() {
                let (r, c) = (
                    patch.row0 + (k / side) as i64,
                    patch.col0 + (k % side) as i64,
                );
                if let Some(v) = other.get_periodic(r, c, shape) {
                    *b = b.max(v);
                }
            }
        }
        let (rows, cols) = self.window_cells(patch);
        Ok(rows
            .iter()
            .flat_map(|&r| cols.iter().map(move |&c| (r, c)))
            .zip(&bump)
            .map(|((r, c), &b)| under[[r, c]] + b)
            .collect())
    }

    /// The grid rows and columns (wrapped) of the cells of `patch`'s window.
    fn window_cells(&self, patch: &BumpPatch) -> (Vec<usize>, Vec<usize>) {
        let ni = self.cfg.sample.pixels as i64;
        let wrap = |first: i64| -> Vec<usize> {
            (0..patch.side as i64)
                .map(|d| (first + d).rem_euclid(ni) as usize)
                .collect()
        };
        (wrap(patch.row0), wrap(patch.col0))
    }

    /// Writes `values` (the truth on the cells of `patch`'s window, wrapped, row-major) into the
    /// truth.
    fn write_window(&mut self, patch: &BumpPatch, values: &[f32]) {
        let (rows, cols) = self.window_cells(patch);
        for (&r, line) in rows.iter().zip(values.chunks(patch.side)) {
            for (&c, &v) in cols.iter().zip(line) {
                self.truth[[r, c]] = v;
            }
        }
    }

    /// Raises the truth by the bump `patch` (the higher of the two, as [`bumps`] does).
    fn add_bump(&mut self, patch: &BumpPatch) {
        let (rows, cols) = self.window_cells(patch);
        let under = self.terrace.as_ref().unwrap_or(&self.base_topography);
        for (&r, line) in rows.iter().zip(patch.values.chunks(patch.side)) {
            for (&c, &b) in cols.iter().zip(line) {
                let v = under[[r, c]] + b;
                let t = &mut self.truth[[r, c]];
                if v > *t {
                    *t = v;
                }
            }
        }
    }

    /// After the truth changed only on the windows of `patches`: recomputes the (valid) image
    /// on the nodes that see them, by dilating a block of the periodic truth around their
    /// bounding box (the dilation is local: the same values as a full dilation there). Falls
    /// back to a full dilation when the block would not be smaller than the grid.
    fn redilate_windows(&mut self, patches: &[&BumpPatch]) -> Result<()> {
        let Some(first) = patches.first() else {
            return Ok(());
        };
        let (mut lo, mut hi) = ([first.row0, first.col0], [first.row0, first.col0]);
        for p in patches {
            let last = p.side as i64 - 1;
            lo = [lo[0].min(p.row0), lo[1].min(p.col0)];
            hi = [hi[0].max(p.row0 + last), hi[1].max(p.col0 + last)];
        }
        let n = self.cfg.sample.pixels;
        let h = self.kernel.half_width();
        let side = [
            (hi[0] - lo[0]) as usize + 1 + 2 * h,
            (hi[1] - lo[1]) as usize + 1 + 2 * h,
        ];
        let src = [side[0] + 2 * h, side[1] + 2 * h];
        if !self.dilated_valid {
            return self.ensure_dilated();
        }
        if src[0] >= n || src[1] >= n {
            // Redo it all, as exact near the edge as before.
            if self.dilated_edges {
                return self.dilate_to_edges();
            }
            self.dilated_valid = false;
            return self.ensure_dilated();
        }
        let (r0, c0) = (lo[0] - h as i64, lo[1] - h as i64);
        if self.block.dim() != (src[0], src[1]) {
            self.block = Array2::zeros((src[0], src[1]));
            self.block_dilated = Array2::zeros((src[0], src[1]));
        }
        // Grid index and period of each block row and column.
        let ni = n as i64;
        let axis = |first: i64, len: usize| -> Vec<(usize, i64)> {
            (first..first + len as i64)
                .map(|k| (k.rem_euclid(ni) as usize, k.div_euclid(ni)))
                .collect()
        };
        let (rows, cols) = (axis(r0 - h as i64, src[0]), axis(c0 - h as i64, src[1]));
        let rise = self.rise;
        let shift = |py: i64, px: i64| px as f64 * rise[0] + py as f64 * rise[1];
        for (mut out, &(i, py)) in self.block.rows_mut().into_iter().zip(&rows) {
            let line = self.truth.row(i);
            for (v, &(j, px)) in out.iter_mut().zip(&cols) {
                *v = if py == 0 && px == 0 {
                    line[j]
                } else {
                    (f64::from(line[j]) + shift(py, px)) as f32
                };
            }
        }
        self.dilator.dilate(
            self.block.view(),
            &self.kernel,
            self.block_dilated.view_mut(),
        )?;
        for (a, &(i, py)) in rows[h..h + side[0]].iter().enumerate() {
            let line = self.block_dilated.row(a + h);
            let mut out = self.dilated.row_mut(i);
            for (b, &(j, px)) in cols[h..h + side[1]].iter().enumerate() {
                let v = line[b + h];
                out[j] = if py == 0 && px == 0 {
                    v
                } else {
                    (f64::from(v) - shift(py, px)) as f32
                };
            }
        }
        Ok(())
    }

    /// The [`DragField`] of a drag from `p0` to `p1` (sample frame, m) of the adatom whose bump
    /// is `start`, `without` the truth without it on that bump's window ([`Self::without_adatom`]):
    /// its region holds every node the trace interpolates, widened by the kernel's half width.
    fn drag_field(
        &self,
        start: &BumpPatch,
        without: &[f32],
        p0: [f64; 2],
        p1: [f64; 2],
    ) -> DragField {
        let grid = self.cfg.sample.pixels;
        let c = self.kernel.half_width() as i64;
        let node_of = |x: f64| (x / self.cell + 0.5 * grid as f64 - 0.5).floor() as i64;
        let rows = [
            node_of(p0[1]).min(node_of(p1[1])),
            node_of(p0[1]).max(node_of(p1[1])),
        ];
        let cols = [
            node_of(p0[0]).min(node_of(p1[0])),
            node_of(p0[0]).max(node_of(p1[0])),
        ];
        let region = [
            [rows[0] - c, rows[1] + 1 + c],
            [cols[0] - c, cols[1] + 1 + c],
        ];
        let mut field = DragField::new(region);
        let under = self.terrace.as_ref().unwrap_or(&self.base_topography);
        field.fill(0, self.truth.view(), self.rise);
        field.fill(1, under.view(), self.rise);
        let (w, rise) = (field.width, self.rise);
        let base = &mut field.base;
        for_window_images(
            start.row0,
            start.col0,
            start.side,
            [grid, grid],
            region,
            |k, r, c, period| {
                let shift = period[1] as f64 * rise[0] + period[0] as f64 * rise[1];
                base[r * w + c] = (f64::from(without[k]) + shift) as f32;
            },
        );
        field
    }

    /// Applies a drag of adatom `i` (at `atom`, its image near the path) that ended in `out`
    /// with `events`, and records the trace at the `n` points `point(k) = (fraction, position)`
    /// (see [`LateralManipulation::manipulate`]).
    fn drag_trace(
        &mut self,
        i: usize,
        atom: [f64; 2],
        out: Outcome,
        events: &[DragEvent],
        n: usize,
        point: impl Fn(usize) -> (f64, [f64; 2]),
    ) -> Result<Vec<f64>> {
        let grid = self.cfg.sample.pixels;
        let shape = [grid, grid];
        // The image before the drag (usually still valid from the last frame), updated around
        // the adatom's start and end sites afterwards.
        self.ensure_dilated()?;
        let start = BumpPatch::new(&self.cfg.adatoms, atom, shape, self.cell)?;
        let without = self.without_adatom(i, &start)?;
        let mut field = self.drag_field(&start, &without, point(0).1, point(n - 1).1);
        let mut bump = Some(start.clone());
        field.place(bump.as_ref(), shape);
        // The nodes of the last cells sampled (consecutive points mostly share a cell).
        let mut cache: Vec<((i64, i64), f64)> = Vec::with_capacity(8);
        let mut next = 0;
        let mut trace = Vec::with_capacity(n);
        for k in 0..n {
            let (t, p) = point(k);
            while next < events.len() && events[next].at <= t {
                match (events[next].to, bump.as_mut()) {
                    (Some(q), Some(b)) => {
                        b.set(&self.cfg.adatoms, q, shape, self.cell)?;
                        field.place(Some(b), shape);
                    }
                    _ => {
                        // Picked up: off the surface, onto the tip; imaged with the new tip.
                        bump = None;
                        self.write_window(&start, &without);
                        self.redilate_windows(&[&start])?;
                        let before = self.tip.clone();
                        self.tip.pick_up(&self.cfg.tip, &mut self.rng_tip);
                        self.tip_changed(&before)?;
                        self.ensure_dilated()?;
                        let (a, b) = (point(0).1, point(n - 1).1);
                        self.dilate_to_edges_over(
                            [a[0].min(b[0]), a[1].min(b[1])],
                            [a[0].max(b[0]), a[1].max(b[1])],
                        )?;
                    }
                }
                cache.clear();
                next += 1;
            }
            let v = if bump.is_some() {
                let kernel = &self.kernel;
                bilinear_nodes(shape, self.cell, p[0], p[1], |ni, nj| {
                    if let Some(&(_, v)) = cache.iter().find(|(key, _)| *key == (ni, nj)) {
                        return v;
                    }
                    let v = field.node(kernel, ni, nj);
                    if cache.len() == 8 {
                        cache.remove(0);
                    }
                    cache.push(((ni, nj), v));
                    v
                })
            } else {
                bilinear(self.dilated.view(), self.cell, self.rise, p[0], p[1])
            };
            trace.push(v);
        }
        match out {
            Outcome::Moved(q) | Outcome::Scattered(q) => {
                self.write_window(&start, &without);
                let q = self.on_grid(q);
                let end = BumpPatch::new(&self.cfg.adatoms, q, shape, self.cell)?;
                self.add_bump(&end);
                self.adatoms[i] = q;
                // One block when the two windows overlap much, else one each.
                let overlap = |a: i64, b: i64| (end.side as i64 - (a - b).abs()).max(0);
                let shared = overlap(start.row0, end.row0) * overlap(start.col0, end.col0);
                if 2 * shared >= (end.side * end.side) as i64 {
                    self.redilate_windows(&[&start, &end])?;
                } else {
                    self.redilate_windows(&[&start])?;
                    self.redilate_windows(&[&end])?;
                }
            }
            Outcome::PickedUp => {
                self.adatoms.remove(i);
            }
        }
        Ok(trace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spm::dilation::dilate_brute_force;
    use crate::spm::surface::SurfaceKind;
    use crate::spm::tip::SecondApex;

    /// `tiles × tiles` periodic copies of `g` (rise `rise` per period), the middle one at
    /// `(tiles/2, tiles/2)`.
    fn tiled(g: ArrayView2<'_, f32>, rise: [f64; 2], tiles: usize) -> Array2<f32> {
        let (ny, nx) = g.dim();
        let o = (tiles / 2) as i64;
        Array2::from_shape_fn((ny * tiles, nx * tiles), |(i, j)| {
            periodic_node(g, rise, i as i64 - o * ny as i64, j as i64 - o * nx as i64) as f32
        })
    }

    /// `pfm.topography = false`: the frame has the phase and amplitude channels only, and
    /// without PFM noise they equal the full frame's bit for bit (the same drifted positions,
    /// the loop skipped), at either fidelity, with drift, creep and hysteresis on; the noiseless
    /// phase too. With the noise on, the phase keeps its spread (`phase_noise`, 5°, within 10 %).
    #[test]
    fn pfm_frame_without_topography_images_the_same_pfm_channels() {
        for fidelity in [SpmFidelity::Full, SpmFidelity::Fast] {
            let mut c = SpmConfig {
                mode: SpmMode::Pfm,
                fidelity,
                ..Default::default()
            };
            c.sample.pixels = 64;
            c.scan.pixels = [24, 24];
            c.pfm.amplitude_noise = Param::fixed(0.0);
            c.pfm.phase_noise = Param::fixed(0.0);
            let frame = |topography: bool, c: &SpmConfig| {
                let mut c = c.clone();
                c.pfm.topography = topography;
                let mut sim = SpmSimulator::new(c, 7).unwrap();
                let f = sim.acquire_frame().unwrap();
                let names: Vec<String> = f.channels.iter().map(|ch| ch.name.clone()).collect();
                let bits = |n: &str| -> Vec<u32> {
                    f.channel(n)
                        .unwrap()
                        .image
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                let (ph, amp) = (bits("phase"), bits("amplitude"));
                let clean: Vec<u32> = sim.last_noiseless().iter().map(|v| v.to_bits()).collect();
                (names, ph, amp, clean)
            };
            let (n_on, ph_on, amp_on, cl_on) = frame(true, &c);
            let (n_off, ph_off, amp_off, cl_off) = frame(false, &c);
            assert_eq!(n_on.len(), 5);
            assert_eq!(n_off, ["phase", "amplitude"]);
            assert!(ph_on == ph_off && amp_on == amp_off && cl_on == cl_off);
            assert!(ph_off.iter().any(|&b| f32::from_bits(b) == 180.0));
            assert!(ph_off.iter().any(|&b| f32::from_bits(b) == 0.0));
            // The noise model is untouched: the phase's spread about 0° / 180° is phase_noise.
            c.pfm.phase_noise = Param::fixed(5f64.to_radians());
            c.pfm.topography = false;
            let mut sim = SpmSimulator::new(c, 7).unwrap();
            let f = sim.acquire_frame().unwrap();
            let ph: Vec<f64> = f
                .channel("phase")
                .unwrap()
                .image
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let clean = sim.last_noiseless();
            let rms = (ph
                .iter()
                .zip(clean.iter())
                .map(|(p, &q)| (p - f64::from(q)).powi(2))
                .sum::<f64>()
                / ph.len() as f64)
                .sqrt();
            assert!((rms - 5.0).abs() < 0.5, "phase noise {rms}°");
        }
    }

    /// The dilation is periodic: the simulator's image of the truth equals the brute-force
    /// dilation of the truth tiled 3 × 3 (the sample continued on every side), middle tile, for
    /// terraces with particles (a rise per period) and a large double tip whose kernel reaches
    /// far across the edge.
    #[test]
    fn dilation_sees_the_sample_across_the_edge() {
        let mut c = SpmConfig::default().without_scanner_imperfections();
        c.sample.pixels = 40;
        c.sample.size = Param::fixed(0.2e-6);
        c.scan.pixels = [8, 8];
        c.scan.size = Param::fixed(0.1e-6);
        c.surface.kind = SurfaceKind::Mixed;
        c.surface.particle_density = Param::fixed(1e15);
        c.surface.terrace_width = Param::fixed(30e-9);
        let mut sim = SpmSimulator::new(c, 5).unwrap();
        let tip = TipState::sharp(20e-9)
            .unwrap()
            .with_second_apex(Some(SecondApex {
                offset: [12e-9, -7e-9],
                dz: 0.5e-9,
            }))
            .unwrap();
        sim.set_tip_state(tip).unwrap();
        sim.ensure_dilated().unwrap();
        sim.dilate_to_edges().unwrap();
        let h = sim.kernel.half_width();
        assert!(h >= 4, "the kernel reaches {h} cells across the edge");
        assert!(sim.rise[0] != 0.0 || sim.rise[1] != 0.0);
        let reference =
            dilate_brute_force(tiled(sim.truth.view(), sim.rise, 3).view(), &sim.kernel);
        let n = 40;
        let mid = reference.slice(ndarray::s![n..2 * n, n..2 * n]);
        let worst = mid
            .iter()
            .zip(sim.dilated.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-15, "largest difference {worst:e} m");
    }

    /// Without noise the fast model images exactly what the full one does: its one periodic
    /// dilation per tip change gives the image values the full model's interior-then-periodic
    /// dilation gives (a scan reaching the edge band, after two tip changes), and the 1/f
    /// bank it thins is silent.
    #[test]
    fn fast_model_without_noise_images_exactly_what_the_full_one_does() {
        let frames = |fidelity: SpmFidelity| {
            let mut c = SpmConfig::default().without_scanner_imperfections();
            c.fidelity = fidelity;
            c.sample.pixels = 40;
            c.sample.size = Param::fixed(0.2e-6);
            c.scan.pixels = [8, 8];
            c.scan.size = Param::fixed(0.18e-6);
            c.surface.kind = SurfaceKind::Mixed;
            c.surface.particle_density = Param::fixed(1e15);
            let mut sim = SpmSimulator::new(c, 5).unwrap();
            let mut out = Vec::new();
            for r in [10e-9, 25e-9] {
                sim.set_tip_state(TipState::sharp(r).unwrap()).unwrap();
                out.push(sim.acquire_frame().unwrap().main().image.clone());
            }
            out
        };
        assert_eq!(frames(SpmFidelity::Fast), frames(SpmFidelity::Full));
    }

    /// The fast model's lazy window (a frame over part of the sample dilates only around it,
    /// [`SpmSimulator::dilate_scan_window`]) images exactly what the full model does without
    /// noise, over three tips (sharp, blunt, double) and a scan moved between frames; the window
    /// is in use (smaller than the grid) after each frame.
    #[test]
    fn fast_model_window_images_exactly_what_the_full_one_does() {
        let frames = |fidelity: SpmFidelity| {
            let mut c = SpmConfig::default().without_scanner_imperfections();
            c.fidelity = fidelity;
            c.sample.pixels = 48;
            c.sample.size = Param::fixed(0.24e-6);
            c.scan.pixels = [12, 12];
            c.scan.size = Param::fixed(0.08e-6);
            c.surface.kind = SurfaceKind::Mixed;
            c.surface.particle_density = Param::fixed(1e15);
            c.surface.terrace_width = Param::fixed(30e-9);
            let mut sim = SpmSimulator::new(c, 9).unwrap();
            let double = TipState::sharp(15e-9)
                .unwrap()
                .with_second_apex(Some(SecondApex {
                    offset: [9e-9, -5e-9],
                    dz: 0.4e-9,
                }))
                .unwrap();
            let tips = [
                TipState::sharp(8e-9).unwrap(),
                TipState::sharp(30e-9).unwrap(),
                double,
            ];
            let mut out = Vec::new();
            for (k, tip) in tips.into_iter().enumerate() {
                sim.set_tip_state(tip).unwrap();
                let mut s = sim.scan_settings();
                s.center = [(k as f64 - 1.0) * 30e-9, (1.0 - k as f64) * 20e-9];
                sim.configure_scan(&s).unwrap();
                out.push(sim.acquire_frame().unwrap().main().image.clone());
                if fidelity == SpmFidelity::Fast {
                    let [i0, i1, j0, j1] = sim.dilated_window.expect("a window");
                    assert!(
                        (i1 - i0) * (j1 - j0) < 48 * 48 / 2,
                        "window {:?}",
                        [i0, i1, j0, j1]
                    );
                }
            }
            out
        };
        assert_eq!(frames(SpmFidelity::Fast), frames(SpmFidelity::Full));
    }

    /// The manipulation trace's nodes (the brute-force dilation of the truth with the dragged
    /// adatom's bump moved) equal the image rendered and dilated in full with the adatom at its
    /// new site, at every node the trace can use, for adatoms inside the grid and across its edge
    /// (the sample periodic), beside another adatom, with a sharp and with a double tip; and the
    /// truth and image updated locally after the drag equal the full render and dilation.
    #[test]
    fn dragged_adatom_nodes_equal_the_full_image() {
        let mut c = SpmConfig::default().without_scanner_imperfections();
        c.mode = SpmMode::Stm;
        c.sample.size = Param::fixed(6e-9);
        c.sample.pixels = 60;
        c.scan.pixels = [16, 16];
        c.scan.size = Param::fixed(3e-9);
        c.surface.kind = SurfaceKind::Flat;
        c.surface.roughness = Param::fixed(2e-12);
        c.adatoms.count = 2;
        c.adatoms.corrugation = Param::fixed(5e-12);
        let mut sim = SpmSimulator::new(c, 2).unwrap();
        let double = TipState::sharp(0.8e-9)
            .unwrap()
            .with_second_apex(Some(SecondApex {
                offset: [0.4e-9, 0.2e-9],
                dz: 0.03e-9,
            }))
            .unwrap();
        let shape = [60, 60];
        let near_other = {
            let o = sim.adatoms[0];
            [o[0] + 0.4e-9, o[1] - 0.3e-9]
        };
        for tip in [TipState::sharp(0.4e-9).unwrap(), double] {
            sim.set_tip_state(tip).unwrap();
            // (from, to, path start, path end); the path may run past the grid's edge.
            for (from, to, p0, p1) in [
                (
                    [0.3e-9, -0.7e-9],
                    [0.6e-9, -0.5e-9],
                    [0.2e-9, -0.7e-9],
                    [1.1e-9, -0.4e-9],
                ),
                (
                    [2.9e-9, -2.9e-9],
                    [3.2e-9, -3.1e-9],
                    [2.7e-9, -2.8e-9],
                    [3.6e-9, -3.3e-9],
                ),
                (
                    near_other,
                    [near_other[0] - 0.3e-9, near_other[1]],
                    near_other,
                    [near_other[0] - 0.8e-9, near_other[1]],
                ),
            ] {
                sim.adatoms.push(from);
                let i = sim.adatoms.len() - 1;
                sim.rebuild_truth().unwrap();
                let start = BumpPatch::new(&sim.cfg.adatoms, from, shape, sim.cell).unwrap();
                let without = sim.without_adatom(i, &start).unwrap();
                let mut field = sim.drag_field(&start, &without, p0, p1);
                let moved = BumpPatch::new(&sim.cfg.adatoms, to, shape, sim.cell).unwrap();
                field.place(Some(&moved), shape);
                sim.adatoms[i] = to;
                sim.rebuild_truth().unwrap();
                sim.ensure_dilated().unwrap();
                sim.dilate_to_edges().unwrap();
                let h = sim.kernel.half_width() as i64;
                let [[r_lo, r_hi], [c_lo, c_hi]] = field.region;
                let mut worst = 0.0f64;
                for ni in r_lo + h..=r_hi - h {
                    for nj in c_lo + h..=c_hi - h {
                        let full = periodic_node(sim.dilated.view(), sim.rise, ni, nj);
                        worst = worst.max((field.node(&sim.kernel, ni, nj) - full).abs());
                    }
                }
                assert!(
                    worst < 1e-15,
                    "{from:?} -> {to:?}: largest difference {worst:e} m"
                );
                // The truth kept by local updates equals the full render.
                sim.adatoms[i] = from;
                sim.rebuild_truth().unwrap();
                sim.ensure_dilated().unwrap();
                sim.dilate_to_edges().unwrap();
                sim.write_window(&start, &without);
                sim.add_bump(&moved);
                sim.redilate_windows(&[&start, &moved]).unwrap();
                let (local, local_image) = (sim.truth.clone(), sim.dilated.clone());
                sim.adatoms[i] = to;
                sim.rebuild_truth().unwrap();
                sim.ensure_dilated().unwrap();
                sim.dilate_to_edges().unwrap();
                assert_eq!(local, sim.truth);
                let worst = local_image
                    .iter()
                    .zip(sim.dilated.iter())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(worst < 1e-15, "locally updated image off by {worst:e} m");
                sim.adatoms.pop();
                sim.rebuild_truth().unwrap();
            }
        }
    }

    /// With `gain_units = "log_current"` the gains are a Nanonis Z-controller's P (m) and I
    /// (m/s) per unit ln I, acting as `K_p = 2κP`, `K_i = 2κI` (κ = 10.868 nm⁻¹ at 4.5 eV):
    /// the same frames as the height-unit gains they map to, in the config and when set.
    #[test]
    fn log_current_gains_act_as_two_kappa_times_the_height_gains() {
        let kappa = 10.868e9;
        let base = |units: GainUnits, p: f64, i: f64| {
            let mut c = stm_tunnel(true, 3);
            c.tunneling.current_noise = Param::fixed(0.0);
            c.tunneling.gain_units = units;
            c.feedback.p_gain = Param::fixed(p);
            c.feedback.i_gain = Param::fixed(i);
            SpmSimulator::new(c, 6).unwrap()
        };
        let mut h = base(GainUnits::Height, 0.1, 300.0);
        let mut n = base(
            GainUnits::LogCurrent,
            0.1 / (2.0 * kappa),
            300.0 / (2.0 * kappa),
        );
        let (p, i) = n.feedback_gains();
        assert!((p * 2.0 * kappa / 0.1 - 1.0).abs() < 1e-4, "P {p:e} m");
        assert!((i * 2.0 * kappa / 300.0 - 1.0).abs() < 1e-4, "I {i:e} m/s");
        let close = |a: &mut SpmSimulator, b: &mut SpmSimulator| {
            let (fa, fb) = (a.acquire_frame().unwrap(), b.acquire_frame().unwrap());
            let (za, zb) = (&fa.main().image, &fb.main().image);
            let relief = za.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let worst = za
                .iter()
                .zip(zb)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(
                relief > 1e-11 && worst <= 2e-4 * relief,
                "{worst:e} of {relief:e} m"
            );
        };
        close(&mut h, &mut n);
        // Set through the instrument: P = 4.6 pm, I = 13.8 nm/s per unit ln I.
        let (p, i) = n.set_feedback_gains(4.6e-12, 13.8e-9).unwrap();
        assert!((p / 4.6e-12 - 1.0).abs() < 1e-12 && (i / 13.8e-9 - 1.0).abs() < 1e-12);
        h.set_feedback_gains(2.0 * kappa * 4.6e-12, 2.0 * kappa * 13.8e-9)
            .unwrap();
        close(&mut h, &mut n);
        // Gains that map beyond the loop's range are refused, naming the setting.
        let mut c = stm_tunnel(true, 0);
        c.tunneling.gain_units = GainUnits::LogCurrent;
        c.feedback.p_gain = Param::fixed(1e-9); // K_p = 21.7 > 10
        let e = SpmSimulator::new(c, 1).unwrap_err().to_string();
        assert!(e.contains("tunneling.gain_units"), "{e}");
    }

    /// A current floor `I_floor` saturates the error at `ln(I_floor/I_set)`: the loop runs as
    /// with `[feedback] saturation = ln(I_set/I_floor)/(2κ)`, and no pixel's error reads
    /// below it, while without the floor the same scan reads deeper errors.
    #[test]
    fn current_floor_saturates_the_error_at_its_closed_form() {
        let kappa: f64 = 10.868e9;
        let (i_set, c_sat): (f64, f64) = (100e-12, 0.02e-9);
        let floor = i_set * (-2.0 * kappa * c_sat).exp(); // 64.7 pA
        let session = |floor: f64, saturation: f64| {
            let mut c = stm_tunnel(true, 6);
            c.tunneling.current_noise = Param::fixed(0.0);
            c.tunneling.current_floor = Param::fixed(floor);
            c.feedback.saturation = Param::fixed(saturation);
            c.feedback.i_gain = Param::fixed(60.0);
            c.scan.line_rate = Param::fixed(20.0);
            let mut sim = SpmSimulator::new(c, 2).unwrap();
            let f = sim.acquire_frame().unwrap();
            (
                f.main().image.clone(),
                f.channel("error").unwrap().image.clone(),
            )
        };
        let (z_floor, e_floor) = session(floor, 5e-9);
        let (z_sat, e_sat) = session(0.0, c_sat);
        let (_, e_free) = session(0.0, 5e-9);
        let low = |e: &Array2<f32>| e.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let lowest = low(&e_floor);
        assert!(f64::from(lowest) >= -c_sat * (1.0 + 1e-4), "{lowest:e} m");
        assert!(
            f64::from(low(&e_free)) < -1.5 * c_sat,
            "{:e} m",
            low(&e_free)
        );
        let diff = |a: &Array2<f32>, b: &Array2<f32>| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max)
        };
        assert!(
            diff(&z_floor, &z_sat) < 1e-14,
            "{:e}",
            diff(&z_floor, &z_sat)
        );
        assert!(diff(&e_floor, &e_sat) < 1e-14);
        // A floor at or above the set point is refused, naming the field.
        let mut c = stm_tunnel(true, 0);
        c.tunneling.current_floor = Param::fixed(i_set);
        let e = SpmSimulator::new(c, 1).unwrap_err().to_string();
        assert!(e.contains("tunneling.current_floor"), "{e}");
    }

    /// A small STM session with the scanner's imperfections off and `tunneling.enabled` as
    /// given.
    fn stm_tunnel(enabled: bool, adatoms: usize) -> SpmConfig {
        let mut c = SpmConfig::default().without_scanner_imperfections();
        c.mode = SpmMode::Stm;
        c.sample.size = Param::fixed(8e-9);
        c.sample.pixels = 64;
        c.scan.pixels = [32, 32];
        c.scan.size = Param::fixed(8e-9);
        c.surface.kind = SurfaceKind::Flat;
        c.surface.roughness = Param::fixed(0.0);
        c.adatoms.count = adatoms;
        c.tunneling.enabled = enabled;
        c
    }

    /// Every channel of the next frame, by name, as the bits of its values.
    fn frame_bits(sim: &mut SpmSimulator) -> Vec<(String, Vec<u32>)> {
        let frame = sim.acquire_frame().unwrap();
        frame
            .channels
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    c.image.iter().map(|v| v.to_bits()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn tunneling_off_leaves_every_frame_bit_identical() {
        let base = stm_tunnel(false, 2);
        let mut other = base.clone();
        other.tunneling.current_noise = Param::fixed(1e-12);
        other.tunneling.work_function = Param::fixed(3.0);
        other.tunneling.resonance_strength = Param::fixed(100.0);
        let (mut a, mut b) = (
            SpmSimulator::new(base, 4).unwrap(),
            SpmSimulator::new(other, 4).unwrap(),
        );
        for bias in [0.1, 0.7] {
            a.set_bias(bias).unwrap();
            b.set_bias(bias).unwrap();
            let fa = frame_bits(&mut a);
            let fb = frame_bits(&mut b);
            assert_eq!(fa, fb);
            assert!(fa.iter().all(|(n, _)| n != "current"));
        }
    }

    #[test]
    fn current_noise_reaches_the_error_and_current_channels_as_predicted() {
        // Flat terrace, a near-frozen loop (K_p = 0, K_i = 1/s): each pixel's error is the
        // mean of its samples' noise, r.m.s. σ_ε/√s in log current with σ_ε = σ_I/I_set,
        // σ_I = S_I √(f_s/2), s samples per pixel.
        let mut c = stm_tunnel(true, 0);
        let s_i = 100e-15;
        c.tunneling.current_noise = Param::fixed(s_i);
        let mut sim = SpmSimulator::new(c, 9).unwrap();
        sim.set_feedback_gains(0.0, 1.0).unwrap();
        let (i_set, kappa) = (100e-12, sim.config().tunneling.kappa());
        let fs = 1.0 / sim.feedback.period();
        let spp = sim.scan_settings().dwell_time * fs;
        let frame = sim.acquire_frame().unwrap();
        let err = &frame.channel("error").unwrap().image;
        let cur = &frame.channel("current").unwrap().image;
        let n = err.len() as f64;
        let mean = err.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let rms_ln = (err
            .iter()
            .map(|&v| (2.0 * kappa * (f64::from(v) - mean)).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        let want = s_i * (fs / 2.0).sqrt() / i_set / spp.sqrt();
        assert!(
            (rms_ln / want - 1.0).abs() < 0.08,
            "{rms_ln} vs {want} (s = {spp})"
        );
        // The current channel reads I_set·exp(ln-error): its log has the same spread.
        let lc: Vec<f64> = cur.iter().map(|&v| (f64::from(v) / i_set).ln()).collect();
        let lm = lc.iter().sum::<f64>() / n;
        let lrms = (lc.iter().map(|v| (v - lm).powi(2)).sum::<f64>() / n).sqrt();
        assert!((lrms / rms_ln - 1.0).abs() < 1e-3, "{lrms} vs {rms_ln}");
        assert!(
            cur.iter()
                .all(|&v| v > 0.0 && (f64::from(v) / i_set - 1.0).abs() < 0.2)
        );
    }

    #[test]
    fn bias_changes_the_adatom_contrast_by_its_ldos_term() {
        let mut c = stm_tunnel(true, 1);
        c.adatoms.corrugation = Param::fixed(0.0);
        let mut sim = SpmSimulator::new(c, 3).unwrap();
        let kappa = sim.config().tunneling.kappa();
        let res = sim.config().tunneling.resonance();
        let h0 = sim.config().adatoms.apparent_height.get();
        let relief = |sim: &SpmSimulator| {
            let t = sim.truth_surface();
            let (lo, hi) = t
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            f64::from(hi - lo)
        };
        let r0 = relief(&sim);
        // Near the resonance (0.5 eV) the adatom looks taller by ln(ρ(0.6)/ρ(0.1))/(2κ).
        sim.set_bias(0.6).unwrap();
        let shift = (res.ldos(0.6) / res.ldos(0.1)).ln() / (2.0 * kappa);
        assert!(shift > 10e-12, "{shift:e}");
        let h1 = sim.config().adatoms.apparent_height.get();
        assert!((h1 - (h0 + shift)).abs() < 1e-18, "{h1:e}");
        // The imaged relief scales with the apparent height.
        let r1 = relief(&sim);
        assert!(
            (r1 / r0 - h1 / h0).abs() < 1e-4 * (h1 / h0),
            "{r0:e} {r1:e}"
        );
        sim.set_bias(0.1).unwrap();
        assert_eq!(relief(&sim), r0);
        // Off: the bias leaves the surface alone.
        let mut off = SpmSimulator::new(stm_tunnel(false, 1), 3).unwrap();
        let r_off = relief(&off);
        off.set_bias(0.6).unwrap();
        assert_eq!(relief(&off), r_off);
    }
}
