//! The simulated STEM: a specimen under an aberrated probe, with drift, noise and damage.
//!
//! ```
//! use scopegym_physics::stem::{StemConfig, StemSimulator};
//! use scopegym_physics::instrument::StemInstrument;
//! let mut cfg = StemConfig::default();
//! cfg.scan.pixels = [64, 64];
//! let mut sim = StemSimulator::new(cfg, 42).unwrap();
//! let frame = sim.acquire_frame().unwrap();
//! assert_eq!(frame.image.dim(), (64, 64));
//! assert!(frame.image.iter().all(|v| v.is_finite() && *v >= 0.0));
//! ```

use crate::constants::ELEMENTARY_CHARGE;
use crate::error::{PhysicsError, Result};
use crate::instrument::{
    Frame, FrameMeta, InstrumentInfo, InstrumentKind, ScanSettings, Spectrum, StemInstrument,
};
use crate::param::dims::{Current, Length, Time, Unitless};
use crate::param::{Param, Randomizer, Region};
use crate::rng::{PoissonScratch, SimRng, derive_seed, poisson, seeded};
use crate::stem::aberration_drift::{AberrationDrift, AberrationDriftConfig, MAX_FRAME_PROBES};
use crate::stem::coherent::{AnnularDetector, CoherentGrid};
use crate::stem::damage::{
    CoordinationCache, CurrentFluctuation, DamageConfig, DoseMap, Hop, HopModel, HopPairs, KnockOn,
    Raster, RasterPath, sputter_with,
};
use crate::stem::eels::{EelsConfig, EelsModel, SampleScratch};
use crate::stem::haadf::{DetectorConfig, FrameGeometry, HaadfRenderer};
use crate::stem::optics::{Aberrations, OpticsConfig, ProbeCalculator, ProbeSpec};
use crate::stem::probe::ProbeModel;
use crate::stem::scan::{
    Distortion, DriftConfig, DriftState, MAX_DISTORTION_PIXELS, ScanConfig, ScanDistortion,
    ScanNoiseConfig,
};
use crate::stem::settings::{DEFLECTION_RANGE, check_scan_settings};
use crate::stem::specimen::{Atom, AtomIndex, Specimen, SpecimenConfig, Supercell};
use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

/// Beam settings (`[beam]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BeamConfig {
    /// Probe current, A. Default 100 pA.
    pub current: Param<Current>,
    /// Relative r.m.s. fluctuation of the current (emission noise of the gun), dimensionless:
    /// each pixel's (and each point exposure's) dose is multiplied by a positive factor of mean
    /// 1 and this r.m.s., correlated over [`Self::current_correlation_time`]
    /// ([`CurrentFluctuation`]). Default 0 (off); a cold FEG's emission fluctuates by a few %
    /// over ms to s (flicker), a Schottky source's by under 1 %. Frames' dose map and damage use
    /// the mean current.
    pub current_fluctuation: Param<Unitless>,
    /// Correlation time of the current fluctuation, s. Default 1 ms.
    pub current_correlation_time: Param<Time>,
}

impl Default for BeamConfig {
    fn default() -> Self {
        Self {
            current: Param::fixed(100e-12),
            current_fluctuation: Param::fixed(0.0),
            current_correlation_time: Param::fixed(1e-3),
        }
    }
}

/// Depth of focus (`[depth_of_focus]`): frames image each atom with the probe defocused by its
/// height. Default: off (every atom sees the probe at C10).
///
/// C10 is the defocus at the specimen's mid-plane (height 0); an atom at height h (further along
/// the beam) sees `C10 + h` (Krivanek's sign: positive C10 is overfocus, the crossover before
/// the specimen; free-space propagation by h adds h to C10). Atoms are grouped by height into
/// slices of `slice_thickness` (from the lowest atom up), and each occupied slice is imaged with
/// the probe at the defocus of its atoms' mean height, so single atoms and flat layers are
/// exact; a column through a thick crystal is the sum of its slices' probes, which sets the
/// depth of field ≈ 1.77 λ/α² (Born & Wolf §8.8: the on-axis intensity of an aberration-free
/// probe, `[sin x / x]²` with `x = π Δf α² / (2λ)`, falls to half at Δf = ±0.886 λ/α²). Point
/// exposures (counts, the EELS composition and the knock-on dose) see each atom through its
/// slice's probe too, with the frames' source blur; the contamination signal and the dose map
/// use the probe at C10. The probes are recomputed when the aberrations or the set of slice
/// heights change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DepthOfFocusConfig {
    /// Whether frames image each atom at the defocus of its height. Default false.
    pub enabled: bool,
    /// Thickness of the depth slices, m. Default 0.5 nm.
    pub slice_thickness: Param<Length>,
}

impl Default for DepthOfFocusConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            slice_thickness: Param::fixed(0.5e-9),
        }
    }
}

/// Everything that defines a simulated STEM session: one scenario's instrument and specimen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct StemConfig {
    /// The specimen.
    pub specimen: SpecimenConfig,
    /// Probe-forming optics.
    pub optics: OpticsConfig,
    /// Beam current.
    pub beam: BeamConfig,
    /// Raster scan.
    pub scan: ScanConfig,
    /// HAADF detector.
    pub detector: DetectorConfig,
    /// Sample drift.
    pub drift: DriftConfig,
    /// Scan noise.
    pub scan_noise: ScanNoiseConfig,
    /// Scan-system distortions (rotation, shear, scale errors, flyback lag). Default: none.
    pub scan_distortion: ScanDistortion,
    /// Beam damage.
    pub damage: DamageConfig,
    /// EELS spectrometer.
    pub eels: EelsConfig,
    /// Drift of the aberrations and defocus in time. Default: none.
    pub aberration_drift: AberrationDriftConfig,
    /// Depth of focus from the atoms' heights. Default: off.
    pub depth_of_focus: DepthOfFocusConfig,
}

/// An opt-in effect of the full simulator (off by default), which the light lattice model
/// cannot represent and which takes frames off their plain render-and-count path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptInEffect {
    /// Scan rotation, shear, scale errors or flyback lag ([`ScanDistortion`]).
    ScanDistortion,
    /// Contamination build-up under the beam ([`DamageConfig::contamination_rate`]).
    Contamination,
    /// Beam-current fluctuation ([`BeamConfig::current_fluctuation`]).
    CurrentFluctuation,
    /// Each atom imaged at its own defocus ([`DepthOfFocusConfig`]).
    DepthOfFocus,
    /// A tilted specimen ([`SpecimenConfig::tilt`]).
    Tilt,
    /// Aberrations that drift in time ([`AberrationDriftConfig`]).
    AberrationDrift,
}

impl OptInEffect {
    /// The config field that switches it on.
    pub fn field(self) -> &'static str {
        match self {
            Self::ScanDistortion => "scan_distortion",
            Self::Contamination => "damage.contamination_rate",
            Self::CurrentFluctuation => "beam.current_fluctuation",
            Self::DepthOfFocus => "depth_of_focus.enabled",
            Self::Tilt => "specimen.tilt",
            Self::AberrationDrift => "aberration_drift",
        }
    }

    /// What "off" means for it.
    pub fn off(self) -> &'static str {
        match self {
            Self::ScanDistortion => "no scan distortions (identity here)",
            Self::Contamination => "no contamination build-up (0 here)",
            Self::CurrentFluctuation => "a steady beam current (0 here)",
            Self::DepthOfFocus => "one defocus for all atoms (false here)",
            Self::Tilt => "no tilt (0 here)",
            Self::AberrationDrift => "static aberrations (no drift here)",
        }
    }

    /// Whether it changes the electrons a pixel receives (the frame then records through
    /// the per-pixel beam path instead of the plain one).
    pub fn acts_on_the_beam(self) -> bool {
        matches!(self, Self::Contamination | Self::CurrentFluctuation)
    }
}

impl StemConfig {
    /// This config with drift, line jitter, scan noise, mains pickup and scan-system distortions
    /// switched off: frames are then the probe-convolved specimen plus shot noise only (for
    /// calibration and tests).
    pub fn without_scan_distortions(mut self) -> Self {
        self.scan_distortion = ScanDistortion::default();
        self.drift.speed = Param::fixed(0.0);
        self.drift.diffusivity = Param::fixed(0.0);
        self.scan_noise.jitter_pixels = Param::fixed(0.0);
        self.scan_noise.rms = Param::fixed(0.0);
        self.scan_noise.mains_amplitude = Param::fixed(0.0);
        self
    }

    /// The opt-in effects this config switches on. A distribution counts as on unless it is
    /// fixed at zero: one centred on zero still draws the effect.
    pub fn opt_in_effects(&self) -> Vec<OptInEffect> {
        fn on<D: crate::param::Dim>(p: &Param<D>) -> bool {
            p.get() != 0.0 || !p.is_fixed()
        }
        let d = &self.scan_distortion;
        let distorted =
            on(&d.rotation) || on(&d.shear) || on(&d.flyback_amplitude) || d.scale.iter().any(on);
        [
            (OptInEffect::ScanDistortion, distorted),
            (
                OptInEffect::Contamination,
                on(&self.damage.contamination_rate),
            ),
            (
                OptInEffect::CurrentFluctuation,
                on(&self.beam.current_fluctuation),
            ),
            (OptInEffect::DepthOfFocus, self.depth_of_focus.enabled),
            (OptInEffect::Tilt, self.specimen.tilt.iter().any(on)),
            (OptInEffect::AberrationDrift, {
                let ad = &self.aberration_drift;
                ad.is_on() || !ad.c10_diffusivity.is_fixed() || !ad.c12_diffusivity.is_fixed()
            }),
        ]
        .into_iter()
        .filter_map(|(e, is_on)| is_on.then_some(e))
        .collect()
    }

    /// Validates every section, naming the offending field (`optics.convergence_angle`, ...).
    pub fn validate(&self) -> Result<()> {
        self.specimen.validate("specimen.")?;
        self.optics.validate("optics.")?;
        let i = self.beam.current.get();
        if !(i > 0.0 && i <= 1e-6) {
            return Err(PhysicsError::param(
                "beam.current",
                format!("must be in (0, 1 µA], got {i} A"),
            ));
        }
        let r = self.beam.current_fluctuation.get();
        if !(0.0..=1.0).contains(&r) {
            return Err(PhysicsError::param(
                "beam.current_fluctuation",
                format!("must be in [0, 1], got {r}"),
            ));
        }
        let tau = self.beam.current_correlation_time.get();
        if !(tau > 0.0 && tau.is_finite()) {
            return Err(PhysicsError::param(
                "beam.current_correlation_time",
                format!("must be a positive time, got {tau} s"),
            ));
        }
        self.scan.validate("scan.")?;
        self.detector.validate("detector.")?;
        self.drift.validate("drift.")?;
        self.scan_noise.validate("scan_noise.")?;
        self.scan_distortion.validate("scan_distortion.")?;
        check_distortion(
            &self.scan_distortion,
            self.scan.pixels[0],
            self.scan.pixels[1],
            self.scan.pixel_size.get(),
        )?;
        self.damage.validate("damage.")?;
        self.eels.validate("eels.")?;
        self.aberration_drift.validate("aberration_drift.")?;
        let s = self.depth_of_focus.slice_thickness.get();
        if !(1e-12..=1e-6).contains(&s) {
            return Err(PhysicsError::param(
                "depth_of_focus.slice_thickness",
                format!("must be 1 pm to 1 µm, got {s} m"),
            ));
        }
        Ok(())
    }
}

/// What happened to the specimen in the last exposure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DamageReport {
    /// Atoms removed by knock-on (specimen coordinates).
    pub sputtered: Vec<Atom>,
    /// Dopant hops (under a parked beam or while a frame is scanned).
    pub hops: Vec<Hop>,
}

/// The simulated STEM. Implements [`StemInstrument`].
#[derive(Debug)]
pub struct StemSimulator {
    template: Randomizer<StemConfig>,
    /// This episode's drawn parameters, by dotted config key (SI units).
    drawn: Vec<(String, f64)>,
    region: Region,
    cfg: StemConfig,
    seed: u64,
    rng_noise: SimRng,
    rng_scan: SimRng,
    rng_damage: SimRng,
    specimen: Specimen,
    /// The aberrations the corrector is set to (what the instrument reports).
    aberrations: Aberrations,
    /// The aberrations the probe is built with: `aberrations` plus the drift at the time the
    /// probe last followed it ([`AberrationDrift`]); equal to `aberrations` without drift.
    probe_ab: Aberrations,
    ab_drift: AberrationDrift,
    rng_optics: SimRng,
    /// Incremented whenever the probe is rebuilt (keys the depth slices' probes).
    probe_generation: u64,
    /// Depth slices: the slice of each atom, and the key (probe generation, slices' mean
    /// heights' bits) their installed probes were built for.
    slice_of: Vec<usize>,
    slice_key: Option<(u64, Vec<u64>)>,
    /// The slicing for point exposures: the lowest atom height (m), the slice thickness (m)
    /// and the occupied slice numbers in height order (an atom's slice from its height).
    slice_lo: f64,
    slice_thick: f64,
    slice_occupied: Vec<usize>,
    /// Each slice's binned probe (values, side) and effective probe (with the source blur,
    /// computed when a point exposure needs it: `slice_eff_valid`).
    slice_raw: Vec<(Vec<f64>, usize)>,
    slice_eff: Vec<(Vec<f64>, usize)>,
    slice_eff_valid: bool,
    scan: ScanSettings,
    probe_calc: ProbeCalculator,
    kernel: Vec<f64>,
    kernel_side: usize,
    /// The effective probe of point exposures (the kernel with the frames' source blur).
    eff_kernel: Vec<f64>,
    eff_side: usize,
    /// Whether `eff_kernel` needs recomputing (the probe changed since).
    eff_dirty: bool,
    probe_sigma: f64,
    probe_dirty: bool,
    /// Whether the renderer's ideal image matches the specimen, probe and scan geometry.
    ideal_valid: bool,
    /// Bucket grid of the specimen's atoms for frames and point exposures (rebuilt when atoms
    /// are added, removed or moved; a hop only swaps elements).
    atom_index: AtomIndex,
    index_valid: bool,
    /// Scratch: the atoms near a point exposure.
    index_scratch: Vec<u32>,
    /// The drift offset the ideal image was rendered with, m.
    ideal_shift: [f64; 2],
    /// Electrons per pixel the ideal image was rendered with.
    rendered_electrons: f64,
    renderer: HaadfRenderer,
    /// Tile frames from a prerendered field ([`Self::set_tile_field`]; opt-in, off by default).
    field: Option<TileField>,
    field_renderer: HaadfRenderer,
    dist: Distortion,
    drift: DriftState,
    dose_map: DoseMap,
    /// Frame footprints and point exposures not yet added to `dose_map`, in order. The bins
    /// are read only by contamination (frames and point exposures with a growth rate) and
    /// callers of [`Self::dose_map`], so exposures defer their dose until then
    /// ([`Self::flush_dose`]: the same additions in the same order, so the same bins bit for
    /// bit).
    pending_dose: Vec<PendingDose>,
    clock: f64,
    probe_pos: [f64; 2],
    blanked: bool,
    frames: u64,
    sigma_haadf: [f64; 93],
    knock: KnockOn,
    /// Bonded-neighbour counts of the specimen, kept while it is unchanged.
    bonds: CoordinationCache,
    any_knock: bool,
    /// The current's fluctuation and the time of its last draw, s.
    fluct: CurrentFluctuation,
    fluct_time: f64,
    /// Per-pixel dose factors of the last frame (reused).
    fluct_buf: Vec<f32>,
    poisson: PoissonScratch,
    hop: HopModel,
    /// The specimen's dopant-host pairs for frames' hops (invalidated with the tile field:
    /// whenever the specimen or the hop model changes).
    hop_pairs: HopPairs,
    eels: EelsModel,
    /// Spectrum channels expecting at least this many counts are drawn from the normal
    /// approximation ([`Self::set_eels_normal_above`]); infinite (exact draws) by default.
    eels_normal_above: f64,
    /// Buffers of the batched spectrum draws (with [`Self::set_eels_normal_above`]).
    eels_scratch: SampleScratch,
    spectrum: Vec<f32>,
    composition: Vec<(u8, f64)>,
    last_damage: DamageReport,
}

/// Second moment `Σ k(x, y) ((x − c)² + (y − c)²)` of a `s × s` kernel about `c = s/2`, over
/// four interleaved partial sums (vectorizable).
fn second_moment(k: &[f64], s: usize) -> f64 {
    let c = (s / 2) as f64;
    let mut acc = [0.0f64; 4];
    for (y, row) in k.chunks_exact(s).enumerate() {
        let dy2 = (y as f64 - c).powi(2);
        let quads = row.chunks_exact(4);
        let rest = quads.remainder();
        let mut x = 0.0;
        for q in quads {
            for (j, (a, &v)) in acc.iter_mut().zip(q).enumerate() {
                let d = x + j as f64 - c;
                *a += v * (d * d + dy2);
            }
            x += 4.0;
        }
        for (j, (a, &v)) in acc.iter_mut().zip(rest).enumerate() {
            let d = x + j as f64 - c;
            *a += v * (d * d + dy2);
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// Probe intensity per area (1/m²) at offset `(ox, oy)` (m) from a binned kernel `k` of `s × s`
/// pixels of size `px`, bilinear; 0 outside it.
fn kernel_density(k: &[f64], s: usize, px: f64, ox: f64, oy: f64) -> f64 {
    let u = ox / px + (s / 2) as f64;
    let v = oy / px + (s / 2) as f64;
    if !(u >= 0.0 && v >= 0.0 && u < (s - 1) as f64 && v < (s - 1) as f64) {
        return 0.0;
    }
    let (j, i) = (u as usize, v as usize);
    let (fx, fy) = (u - j as f64, v - i as f64);
    let val = (k[i * s + j] * (1.0 - fx) + k[i * s + j + 1] * fx) * (1.0 - fy)
        + (k[(i + 1) * s + j] * (1.0 - fx) + k[(i + 1) * s + j + 1] * fx) * fy;
    val / (px * px)
}

/// Drift (pixels) after which the cached ideal image is re-rendered rather than shifted.
const RERENDER_DRIFT: f64 = 0.1;

/// Drift (pixels) after which a prerendered tile field ([`StemSimulator::set_tile_field`]) is
/// rendered again rather than resampled.
const FIELD_RERENDER_DRIFT: f64 = 0.5;

/// A prerendered field that tile frames are cut from ([`StemSimulator::set_tile_field`]).
#[derive(Debug, Clone)]
struct TileField {
    /// The field's scan grid (its rows, columns and centre; the pixel size of the tiles).
    scan: ScanSettings,
    /// What the rendered ideal image was made with: probe generation, electrons per pixel and
    /// drift offset (m); `None` until rendered or after the specimen changed.
    rendered: Option<(u64, f64, [f64; 2])>,
    /// The probe generation installed in the field's renderer.
    installed: Option<u64>,
}

/// Bond length used to find a dopant's neighbours, m (graphene C-C 1.42 Å plus tolerance).
const HOP_BOND: f64 = 1.7e-10;

/// Bucket side of the atom index, m (a few atoms per bucket in graphene).
const INDEX_BUCKET: f64 = 4e-10;

/// Deferred exposures ([`StemSimulator::flush_dose`]) kept at most (12 kB, reserved once, so
/// that exposures allocate nothing).
const MAX_PENDING_DOSE: usize = 256;

/// An exposure whose dose is not yet in the dose map ([`StemSimulator::flush_dose`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum PendingDose {
    /// A frame's footprint `[x0, x1, y0, y1, dose]` ([`DoseMap::add_rect`]; m, e⁻/m²).
    Rect([f64; 5]),
    /// A point exposure `[x, y, sigma, electrons]` ([`DoseMap::add_gaussian`]; m, m).
    Gaussian([f64; 4]),
}

/// Added to the frame's diagonal for the side of an auto-sized specimen cell, m.
const AUTO_CELL_MARGIN: f64 = 2e-9;

impl StemSimulator {
    /// Builds a simulator: resolves distributions in `config` with `seed`, validates, builds the
    /// specimen. The same config and seed give the same session, bit for bit.
    pub fn new(config: StemConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let template = Randomizer::new(config)?;
        template.check_support(StemConfig::validate)?;
        let (cfg, drawn) = template.draw_valid(
            &mut seeded(derive_seed(seed, "params")),
            Region::All,
            StemConfig::validate,
        )?;
        let mut eels = EelsModel::new(&cfg.eels)?;
        eels.set_beam_energy(cfg.optics.energy.get());
        let mut sim = Self {
            template,
            drawn,
            region: Region::All,
            scan: Self::scan_from(&cfg),
            aberrations: cfg.optics.aberrations(),
            probe_ab: cfg.optics.aberrations(),
            ab_drift: AberrationDrift::new(&cfg.aberration_drift),
            rng_optics: seeded(derive_seed(seed, "aberration_drift")),
            probe_generation: 0,
            slice_of: Vec::new(),
            slice_key: None,
            slice_lo: 0.0,
            slice_thick: 1.0,
            slice_occupied: Vec::new(),
            slice_raw: Vec::new(),
            slice_eff: Vec::new(),
            slice_eff_valid: false,
            sigma_haadf: cfg.detector.cross_sections(),
            knock: cfg.damage.knock_on(cfg.optics.energy.get()),
            bonds: CoordinationCache::default(),
            any_knock: false,
            fluct: CurrentFluctuation::new(0.0, 1.0),
            fluct_time: 0.0,
            fluct_buf: Vec::new(),
            poisson: PoissonScratch::default(),
            hop: HopModel::from_config(&cfg.damage),
            hop_pairs: HopPairs::default(),
            drift: DriftState::new(&cfg.drift),
            dose_map: DoseMap::new(Supercell::new([1e-9, 1e-9], 0.0), 1e-10),
            pending_dose: Vec::with_capacity(MAX_PENDING_DOSE),
            spectrum: vec![0.0; eels.energy_axis().len()],
            eels,
            eels_normal_above: f64::INFINITY,
            eels_scratch: SampleScratch::default(),
            cfg,
            seed,
            rng_noise: seeded(derive_seed(seed, "noise")),
            rng_scan: seeded(derive_seed(seed, "scan")),
            rng_damage: seeded(derive_seed(seed, "damage")),
            specimen: Specimen::default(),
            probe_calc: ProbeCalculator::new(),
            kernel: Vec::new(),
            kernel_side: 0,
            eff_kernel: Vec::new(),
            eff_side: 0,
            eff_dirty: true,
            probe_sigma: 0.0,
            probe_dirty: true,
            ideal_valid: false,
            atom_index: AtomIndex::default(),
            index_valid: false,
            index_scratch: Vec::new(),
            ideal_shift: [0.0, 0.0],
            rendered_electrons: 0.0,
            renderer: HaadfRenderer::default(),
            field: None,
            field_renderer: HaadfRenderer::default(),
            dist: Distortion::default(),
            clock: 0.0,
            probe_pos: [0.0, 0.0],
            blanked: false,
            frames: 0,
            composition: Vec::new(),
            last_damage: DamageReport::default(),
        };
        sim.reset(seed)?;
        Ok(sim)
    }

    /// The scan settings a (resolved) configuration asks for.
    pub(crate) fn scan_from(cfg: &StemConfig) -> ScanSettings {
        let s = &cfg.scan;
        let dx = s.pixel_size.get();
        let dwell = match &s.dose {
            Some(d) => d.get() * dx * dx * ELEMENTARY_CHARGE / cfg.beam.current.get(),
            None => s.dwell_time.get(),
        };
        ScanSettings {
            rows: s.pixels[0],
            cols: s.pixels[1],
            pixel_size: dx,
            dwell_time: dwell,
            flyback_time: s.flyback_time.get(),
            center: [s.center[0].get(), s.center[1].get()],
        }
    }

    /// Starts a new session with `seed`: redraws randomized parameters, rebuilds the specimen,
    /// zeroes the clock, drift, dose map and frame counter. Buffers are kept.
    pub fn reset(&mut self, seed: u64) -> Result<()> {
        let (cfg, drawn) = self.template.draw_valid(
            &mut seeded(derive_seed(seed, "params")),
            self.region,
            StemConfig::validate,
        )?;
        if cfg.eels != self.cfg.eels {
            self.eels = EelsModel::new(&cfg.eels)?;
            self.spectrum = vec![0.0; self.eels.energy_axis().len()];
        }
        self.eels.set_beam_energy(cfg.optics.energy.get());
        self.seed = seed;
        self.rng_noise = seeded(derive_seed(seed, "noise"));
        self.rng_scan = seeded(derive_seed(seed, "scan"));
        self.rng_damage = seeded(derive_seed(seed, "damage"));
        let old = self.scan;
        self.scan = Self::scan_from(&cfg);
        // The probe kernel is sampled on the scan grid: a grid changed by `configure_scan`
        // before this reset needs it again.
        if (old.rows, old.cols, old.pixel_size)
            != (self.scan.rows, self.scan.cols, self.scan.pixel_size)
        {
            self.probe_dirty = true;
        }
        let new_ab = cfg.optics.aberrations();
        if new_ab != self.aberrations || new_ab != self.probe_ab || cfg.optics != self.cfg.optics {
            self.probe_dirty = true;
        }
        self.aberrations = new_ab;
        self.probe_ab = new_ab;
        self.ab_drift = AberrationDrift::new(&cfg.aberration_drift);
        self.rng_optics = seeded(derive_seed(seed, "aberration_drift"));
        self.sigma_haadf = cfg.detector.cross_sections();
        self.knock = cfg.damage.knock_on(cfg.optics.energy.get());
        self.any_knock = cfg.damage.sputtering && self.knock.any();
        self.fluct = CurrentFluctuation::new(
            cfg.beam.current_fluctuation.get(),
            cfg.beam.current_correlation_time.get(),
        );
        self.fluct_time = 0.0;
        self.hop = HopModel::from_config(&cfg.damage);
        self.drift = DriftState::new(&cfg.drift);
        // Specimen: a periodic cell of the configured size, or by default one whose shortest
        // period exceeds the frame's diagonal plus 2 nm, so that no frame of the configured
        // scan shows an atom twice (a larger frame set later shows the tiling).
        let size = cfg.specimen.size.each_ref().map(|s| s.get());
        let size = if size.iter().all(|s| *s > 0.0) {
            size
        } else {
            let fov = self.scan.field_of_view();
            let auto = fov[0].hypot(fov[1]) + AUTO_CELL_MARGIN;
            size.map(|s| if s > 0.0 { s } else { auto })
        };
        self.specimen = cfg
            .specimen
            .build(size, &mut seeded(derive_seed(seed, "specimen")))?;
        let period = self
            .specimen
            .cell
            .unwrap_or_else(|| Supercell::new(size, 0.0));
        self.dose_map = DoseMap::new(period, cfg.damage.dose_map_cell.get());
        self.pending_dose.clear();
        self.cfg = cfg;
        self.drawn = drawn;
        self.ideal_valid = false;
        self.invalidate_field();
        self.index_valid = false;
        self.clock = 0.0;
        self.frames = 0;
        self.probe_pos = [0.0, 0.0];
        self.blanked = false;
        self.last_damage = DamageReport::default();
        Ok(())
    }

    /// The resolved configuration (every distribution replaced by its drawn value).
    pub fn config(&self) -> &StemConfig {
        &self.cfg
    }

    /// The configuration as given, distributions included.
    pub fn template(&self) -> &StemConfig {
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

    /// Ground truth: the specimen in specimen coordinates (lab = specimen + [`Self::drift_offset`]).
    /// It is periodic: the atoms fill one cell ([`Specimen::cell`]) that repeats over the plane,
    /// so the atoms under a scan far from the origin (or after a long drift) are images of the
    /// listed ones; [`Specimen::image_near`] and [`Specimen::separation`] give positions and
    /// distances in the scan's frame of reference.
    pub fn specimen(&self) -> &Specimen {
        &self.specimen
    }

    /// Mutable access to the specimen, for tasks that set up or manipulate it directly
    /// (simulation only: a real instrument has no such handle).
    pub fn specimen_mut(&mut self) -> &mut Specimen {
        self.ideal_valid = false;
        self.invalidate_field();
        self.index_valid = false;
        &mut self.specimen
    }

    /// The specimen ([`Self::specimen`]) with a bucket grid of its atoms as they are, to find
    /// the atoms near a window ([`AtomIndex::candidates`]) without testing every atom.
    pub fn indexed_specimen(&mut self) -> (&Specimen, &AtomIndex) {
        self.ensure_index();
        (&self.specimen, &self.atom_index)
    }

    /// Ground truth: the specimen's current displacement relative to the lab, m.
    pub fn drift_offset(&self) -> [f64; 2] {
        self.drift.offset
    }

    /// Ground truth: the drift state (velocity, random walk).
    pub fn drift(&self) -> &DriftState {
        &self.drift
    }

    /// The cumulative dose map (specimen coordinates, periodic on the specimen's cell).
    pub fn dose_map(&mut self) -> &DoseMap {
        self.flush_dose();
        &self.dose_map
    }

    /// Adds the deferred exposures to the dose map, in order.
    fn flush_dose(&mut self) {
        for p in &self.pending_dose {
            match *p {
                PendingDose::Rect([x0, x1, y0, y1, dose]) => {
                    self.dose_map.add_rect(x0, x1, y0, y1, dose)
                }
                PendingDose::Gaussian([x, y, sigma, electrons]) => {
                    self.dose_map.add_gaussian(x, y, sigma, electrons)
                }
            }
        }
        self.pending_dose.clear();
    }

    /// Defers an exposure's dose ([`Self::flush_dose`]), adding every deferred one when
    /// [`MAX_PENDING_DOSE`] are waiting.
    fn defer_dose(&mut self, p: PendingDose) {
        self.pending_dose.push(p);
        if self.pending_dose.len() >= MAX_PENDING_DOSE {
            self.flush_dose();
        }
    }

    /// What the last exposure did to the specimen.
    pub fn last_damage(&self) -> &DamageReport {
        &self.last_damage
    }

    /// The last frame's expected values (noiseless, along the distorted scan path).
    pub fn last_noiseless(&self) -> ArrayView2<'_, f32> {
        ArrayView2::from_shape(
            (self.scan.rows, self.scan.cols),
            &self.renderer.noiseless[..self.scan.rows * self.scan.cols],
        )
        .expect("buffer sized to the scan")
    }

    /// The binned probe intensity on the image grid (side, values summing to 1), computing it if
    /// needed.
    pub fn probe_kernel(&mut self) -> (usize, &[f64]) {
        self.ensure_probe();
        (self.kernel_side, &self.kernel)
    }

    /// The probe's specification in force.
    pub fn probe_spec(&self) -> ProbeSpec {
        self.cfg.optics.probe_spec(self.probe_ab)
    }

    /// The probe in force (coherent part and source blur), as the shared
    /// [`ProbeModel`] of the three STEM simulators.
    pub fn probe_model(&self) -> ProbeModel {
        ProbeModel::new(&self.cfg.optics, self.probe_ab)
    }

    /// The aberrations in force (ground truth): the corrector setting
    /// ([`StemInstrument::aberrations`]) plus the drift ([`AberrationDriftConfig`]) at the start
    /// of the last exposure. Equal to the setting without drift.
    pub fn aberrations_in_force(&self) -> Aberrations {
        self.probe_ab
    }

    /// Moves the probe's aberrations to the setting plus the drift at the current clock
    /// (quantized to the drift's update interval); the probe is rebuilt if they changed.
    fn follow_aberration_drift(&mut self) {
        if !self.ab_drift.is_on() {
            return;
        }
        let t = self.ab_drift.quantized(self.clock);
        let a = self.ab_drift.at(&self.aberrations, t, &mut self.rng_optics);
        if a != self.probe_ab {
            self.probe_ab = a;
            self.probe_dirty = true;
        }
    }

    /// Indices of the specimen's atoms within `radius` (m) of atom `i`, as
    /// [`Specimen::neighbors`] finds them (same order), through the atom index when it is up to
    /// date (ground truth, for scoring: a real instrument has no such handle).
    pub fn specimen_neighbors(&self, i: usize, radius: f64) -> Vec<usize> {
        let index = self.index_valid.then_some(&self.atom_index);
        self.specimen.neighbors_indexed(index, i, radius)
    }

    /// Recomputes the probe if the optics or scan geometry changed.
    pub fn ensure_probe(&mut self) {
        if !self.probe_dirty {
            return;
        }
        let model = self.probe_model();
        let dx = self.scan.pixel_size;
        let max_extent = dx * (self.scan.rows.max(self.scan.cols)) as f64;
        self.kernel_side = model.binned(&mut self.probe_calc, dx, max_extent, &mut self.kernel);
        // Second moment of the kernel, for spreading point doses.
        let s = self.kernel_side;
        let m2 = second_moment(&self.kernel, s);
        let src = model.source_sigma;
        self.probe_sigma = ((0.5 * m2).sqrt() * dx).hypot(src);
        self.renderer
            .set_probe(&self.kernel, s, self.scan.rows, self.scan.cols, dx, src);
        self.probe_dirty = false;
        self.eff_dirty = true;
        self.ideal_valid = false;
        self.probe_generation += 1;
    }

    /// Whether a frame uses the atom index (brought up to date). A rebuild is a pass over every
    /// atom, so a stale index is rebuilt only when the frame sees under a quarter of a periodic
    /// specimen's cell (an auto-sized cell is barely larger than the frame, and its index would
    /// be rebuilt after every edit of the atoms for nothing).
    fn frame_index(&mut self) -> bool {
        let fov = self.scan.field_of_view();
        self.index_for(fov)
    }

    /// Whether a grid of `[w, h]` (m) is rendered through the atom index, as [`Self::frame_index`]
    /// decides for the frame: the index is used when it is current, or when the grid covers
    /// under a quarter of the specimen's cell (then it is rebuilt if stale).
    fn index_for(&mut self, [w, h]: [f64; 2]) -> bool {
        let pays = match &self.specimen.cell {
            Some(c) => 4.0 * w * h < c.area(),
            None => true,
        };
        let current = self.index_valid && self.atom_index.covers(self.specimen.atoms.len());
        if current || pays {
            self.ensure_index();
        }
        current || pays
    }

    /// Builds the atom index if the atoms changed since it was built.
    fn ensure_index(&mut self) {
        if !self.index_valid || !self.atom_index.covers(self.specimen.atoms.len()) {
            self.atom_index.rebuild(&self.specimen, INDEX_BUCKET);
            self.index_valid = true;
        }
    }

    /// Depth of focus: groups the atoms into slices by height and installs each occupied
    /// slice's probe (at C10 plus its atoms' mean height) when the probe or the slices changed
    /// ([`DepthOfFocusConfig`]). The renderer's grid is widened to the largest kernel.
    fn prepare_depth_slices(&mut self) -> Result<()> {
        let thick = self.cfg.depth_of_focus.slice_thickness.get();
        let atoms = &self.specimen.atoms;
        let lo = atoms.iter().map(|a| a.height).fold(f64::INFINITY, f64::min);
        let raw: Vec<usize> = atoms
            .iter()
            .map(|a| ((a.height - lo) / thick).floor() as usize)
            .collect();
        // Occupied slices in height order, their atoms' mean heights.
        let mut occupied: Vec<usize> = raw.clone();
        occupied.sort_unstable();
        occupied.dedup();
        let mut sums = vec![(0.0f64, 0usize); occupied.len()];
        self.slice_of.clear();
        for (a, r) in atoms.iter().zip(&raw) {
            let k = occupied.binary_search(r).expect("listed above");
            sums[k].0 += a.height;
            sums[k].1 += 1;
            self.slice_of.push(k);
        }
        let heights: Vec<f64> = sums.iter().map(|(s, n)| s / *n as f64).collect();
        (self.slice_lo, self.slice_thick) = (lo, thick);
        self.slice_occupied = occupied;
        let key = (
            self.probe_generation,
            heights.iter().map(|h| h.to_bits()).collect(),
        );
        if self.slice_key.as_ref() == Some(&key) {
            return Ok(());
        }
        let dx = self.scan.pixel_size;
        let max_extent = dx * (self.scan.rows.max(self.scan.cols)) as f64;
        let mut kernels = Vec::with_capacity(heights.len());
        let mut side = self.kernel_side;
        for h in &heights {
            let mut ab = self.probe_ab;
            ab.c10 += h;
            let model = ProbeModel::new(&self.cfg.optics, ab);
            let mut k = Vec::new();
            let s = model.binned(&mut self.probe_calc, dx, max_extent, &mut k);
            side = side.max(s);
            kernels.push((k, s));
        }
        let src = self.probe_model().source_sigma;
        let padded = |k: &[f64], s: usize| pad_kernel(k, s, side);
        self.renderer.set_probe(
            &padded(&self.kernel, self.kernel_side),
            side,
            self.scan.rows,
            self.scan.cols,
            dx,
            src,
        );
        let padded_kernels: Vec<Vec<f64>> = kernels.iter().map(|(k, s)| padded(k, *s)).collect();
        self.renderer.set_slice_probes(&padded_kernels, side)?;
        self.slice_raw = kernels;
        self.slice_eff_valid = false;
        self.slice_key = Some(key);
        self.ideal_valid = false;
        Ok(())
    }

    /// Depth of focus for point exposures: the depth slices ([`Self::prepare_depth_slices`])
    /// and each slice's effective probe (its binned probe with the frames' source blur), so a
    /// point sees each atom through the probe at the defocus of its slice, as frames do.
    fn prepare_point_slices(&mut self) -> Result<()> {
        self.prepare_depth_slices()?;
        if !self.slice_eff_valid {
            let src = self.probe_model().source_sigma;
            self.slice_eff = self
                .slice_raw
                .iter()
                .map(|(k, side)| {
                    let mut out = Vec::new();
                    let s = self.renderer.effective_probe(k, *side, src, &mut out);
                    (out, s)
                })
                .collect();
            self.slice_eff_valid = true;
        }
        Ok(())
    }

    /// The effective probe every exposure sees, on the image grid (side, values summing to 1,
    /// centred at side/2): the binned probe intensity (chromatic spread included) convolved
    /// with the Gaussian source blur as the frames apply it. Point exposures use it for their
    /// counts, EELS composition and knock-on dose. Computed when first needed after a probe
    /// change.
    pub fn effective_probe(&mut self) -> (usize, &[f64]) {
        self.ensure_probe();
        if self.eff_dirty {
            let src = self.probe_model().source_sigma;
            self.eff_side = self.renderer.effective_probe(
                &self.kernel,
                self.kernel_side,
                src,
                &mut self.eff_kernel,
            );
            self.eff_dirty = false;
        }
        (self.eff_side, &self.eff_kernel)
    }

    /// Thickness of the contamination deposit at specimen position `(x, y)` (m): the growth
    /// rate ([`DamageConfig::contamination_rate`]) times the dose delivered there so far
    /// ([`Self::dose_map`]), m.
    pub fn contamination_thickness(&mut self, x: f64, y: f64) -> f64 {
        self.flush_dose();
        self.cfg.damage.contamination_rate.get() * self.dose_map.at(x, y)
    }

    /// Expected HAADF counts per electron from the contamination deposited by `dose` (e⁻/m²):
    /// its areal atom density `ρ·rate·dose` times the deposit element's cross-section.
    fn contamination_signal(&self, dose: f64) -> f64 {
        let rate = self.cfg.damage.contamination_rate.get();
        if rate <= 0.0 {
            return 0.0;
        }
        let z =
            crate::constants::atomic_number(&self.cfg.damage.contamination_element).unwrap_or(6);
        let density = self.cfg.damage.contamination_density.get();
        self.sigma_haadf[z as usize] * density * rate * dose
    }

    /// Records a frame with a fluctuating current and/or a contamination deposit: the expected
    /// counts along the scan path (recorded with an ideal detector) plus the deposit's
    /// background at each pixel's specimen position (dose map as the scan begins), each pixel
    /// times its current factor (an AR(1) in the pixel times), then counted by the detector.
    fn record_with_beam_effects(&mut self, epp: f64, shift: [f64; 2]) {
        let bare = DetectorConfig {
            shot_noise: false,
            gain: Param::fixed(1.0),
            offset: Param::fixed(0.0),
            read_noise: Param::fixed(0.0),
            salt_probability: Param::fixed(0.0),
            ..self.cfg.detector.clone()
        };
        self.renderer.record(&self.dist, &bare, &mut self.rng_noise);
        self.beam_effects_and_count(epp, shift);
    }

    /// The beam effects over a frame whose expected counts are in the renderer's `noiseless`
    /// (before the detector): current fluctuation and the contamination background, then the
    /// detector's counts, read noise and salt.
    fn beam_effects_and_count(&mut self, epp: f64, shift: [f64; 2]) {
        let sc = self.scan;
        let (rows, cols) = (sc.rows, sc.cols);
        let n = rows * cols;
        self.fluct_buf.clear();
        self.fluct_buf.resize(n, 1.0);
        if self.fluct.is_on() {
            let t0 = self.clock;
            let line = cols as f64 * sc.dwell_time + sc.flyback_time;
            for (k, f) in self.fluct_buf.iter_mut().enumerate() {
                let t = t0 + (k / cols) as f64 * line + (k % cols) as f64 * sc.dwell_time;
                *f = self.fluct.next(t - self.fluct_time, &mut self.rng_noise) as f32;
                self.fluct_time = t;
            }
        }
        let per_dose = self.contamination_signal(1.0) * epp;
        if per_dose > 0.0 {
            self.flush_dose();
        }
        let dx = sc.pixel_size;
        for i in 0..rows {
            let y = sc.center[1] + (i as f64 - 0.5 * (rows as f64 - 1.0)) * dx - shift[1];
            let lam = &mut self.renderer.noiseless[i * cols..(i + 1) * cols];
            for (j, (l, f)) in lam
                .iter_mut()
                .zip(&self.fluct_buf[i * cols..(i + 1) * cols])
                .enumerate()
            {
                let bg = if per_dose > 0.0 {
                    let x = sc.center[0] + (j as f64 - 0.5 * (cols as f64 - 1.0)) * dx - shift[0];
                    (per_dose * self.dose_map.at(x, y)) as f32
                } else {
                    0.0
                };
                *l = (*l + bg) * f;
            }
            self.cfg.detector.count(
                &mut self.rng_noise,
                &mut self.renderer.noiseless[i * cols..(i + 1) * cols],
                &mut self.renderer.frame[i * cols..(i + 1) * cols],
                &mut self.poisson,
            );
        }
        self.cfg
            .detector
            .add_read_noise_and_salt(&mut self.rng_noise, &mut self.renderer.frame[..n]);
    }

    fn electrons(&self, time: f64) -> f64 {
        self.cfg.beam.current.get() * time / ELEMENTARY_CHARGE
    }

    /// The Ronchigram at the parked probe position (opt-in; no task uses it yet): the coherent
    /// probe of the aberrations in force (monochromatic, no source blur) through the specimen as
    /// a weak-phase object, on `grid` centred on the probe; see [`crate::stem::coherent`].
    /// Row-major `n × n`, summing to 1, θ = 0 at pixel `(n/2, n/2)`, pixels of
    /// [`CoherentGrid::angular_pixel`]. A computation, not an exposure: no time passes and no
    /// dose is given.
    pub fn ronchigram(&self, grid: &CoherentGrid) -> Result<Vec<f64>> {
        self.check_beam("ronchigram")?;
        let spec = self.probe_spec();
        grid.validate(&spec)?;
        let p = self.probe_pos;
        let d = self.drift.offset;
        let half = 0.5 * grid.n as f64 * grid.dx;
        let window = self
            .specimen
            .window([d[0] - p[0], d[1] - p[1]], [half, half]);
        let mut atoms = Vec::new();
        for a in &self.specimen.atoms {
            window.for_each_image([a.x, a.y], |q| atoms.push((q, a.z)));
        }
        let t = grid.transmission(atoms, spec.energy);
        grid.ronchigram(&spec, &t)
    }

    /// The fractions of the beam that bright-field, annular bright-field (or any round)
    /// `detectors` collect with the probe parked where it is: sums of [`Self::ronchigram`] over
    /// each detector's annulus (opt-in, noiseless expectations; a real detector records
    /// `I·t/e` times this).
    pub fn coherent_signals(
        &self,
        grid: &CoherentGrid,
        detectors: &[AnnularDetector],
    ) -> Result<Vec<f64>> {
        let energy = self.cfg.optics.energy.get();
        for (k, d) in detectors.iter().enumerate() {
            d.validate(&format!("detectors[{k}]"), grid.max_angle(energy))?;
        }
        let r = self.ronchigram(grid)?;
        Ok(detectors
            .iter()
            .map(|d| grid.detector_signal(&r, energy, d))
            .collect())
    }

    fn check_beam(&self, op: &str) -> Result<()> {
        if self.blanked {
            return Err(PhysicsError::Refused {
                operation: op.into(),
                reason: "the beam is blanked".into(),
            });
        }
        Ok(())
    }

    /// Acquires a spectrum image: an EELS spectrum at each point of a `rows × cols` grid with step
    /// `step` (m) centred on the scan centre; returns `(rows, cols, channels)` counts.
    pub fn spectrum_image(
        &mut self,
        rows: usize,
        cols: usize,
        step: f64,
        exposure: f64,
    ) -> Result<ndarray::Array3<f32>> {
        if rows == 0 || cols == 0 || !(step > 0.0 && step.is_finite()) {
            return Err(PhysicsError::arg(
                "spectrum_image",
                "rows, cols must be > 0 and step a positive length",
            ));
        }
        let nch = self.eels.energy_axis().len();
        let mut out = ndarray::Array3::zeros((rows, cols, nch));
        let c = self.scan.center;
        for i in 0..rows {
            for j in 0..cols {
                let x = c[0] + (j as f64 - 0.5 * (cols as f64 - 1.0)) * step;
                let y = c[1] + (i as f64 - 0.5 * (rows as f64 - 1.0)) * step;
                self.move_probe([x, y])?;
                let s = self.acquire_spectrum(exposure)?;
                out.slice_mut(ndarray::s![i, j, ..])
                    .assign(&ndarray::ArrayView1::from(s.counts));
            }
        }
        Ok(out)
    }

    /// Point exposure shared by `acquire_point` and `acquire_spectrum`: dose, sputtering, hops,
    /// drift and clock. Returns the expected HAADF counts at the probe. Counts, composition and
    /// knock-on dose all use the effective probe of the frames ([`Self::effective_probe`]), so a
    /// point's expected counts equal the noiseless frame's at the same position.
    ///
    /// With `spectrum_only`, only what a spectrum needs: the composition of the elements the
    /// EELS model has an edge of (the others add nothing to its spectrum; each element's sum
    /// is over the same atoms in the same order, so bit for bit the same), no HAADF counts
    /// (0 is returned).
    fn expose_point(&mut self, time: f64, spectrum_only: bool) -> Result<f64> {
        self.follow_aberration_drift();
        self.effective_probe();
        let depth = self.cfg.depth_of_focus.enabled && !self.specimen.atoms.is_empty();
        if depth {
            self.prepare_point_slices()?;
        }
        // A fluctuating current: one factor for the exposure, correlated with the last draw.
        let f = if self.fluct.is_on() {
            let f = self
                .fluct
                .next(self.clock - self.fluct_time, &mut self.rng_noise);
            self.fluct_time = self.clock;
            f
        } else {
            1.0
        };
        let current = self.cfg.beam.current.get() * f;
        let n_e = self.electrons(time) * f;
        let d = self.drift.offset;
        let b = [self.probe_pos[0] - d[0], self.probe_pos[1] - d[1]];
        // Expected HAADF signal and the composition under the probe, over every image of
        // each atom within the kernel's reach (periodic specimen).
        let mut signal = 0.0;
        self.composition.clear();
        // With depth of focus, each atom is seen through its slice's effective probe.
        let widest = if depth {
            self.slice_eff.iter().map(|e| e.1).max().unwrap_or(0)
        } else {
            0
        };
        let reach = self.eff_side.max(widest) as f64 * 0.5 * self.scan.pixel_size;
        let window = self.specimen.window([-b[0], -b[1]], [reach, reach]);
        self.ensure_index();
        // The atoms near the probe, in atom order (the same sums as over every atom).
        let indexed = self.atom_index.candidates(&window, &mut self.index_scratch);
        let slices = depth.then_some((&self.slice_of[..], &self.slice_eff[..]));
        let (kernel, side, px) = (&self.eff_kernel, self.eff_side, self.scan.pixel_size);
        let (sigma_haadf, composition) = (&self.sigma_haadf, &mut self.composition);
        let atoms = &self.specimen.atoms;
        // The elements whose atoms are visited.
        let mut wanted = [true; 256];
        if spectrum_only {
            wanted = [false; 256];
            for (_, z, _) in self.eels.edge_probabilities() {
                wanted[usize::from(z)] = true;
            }
        }
        let mut visit = |i: usize, a: &Atom| {
            if !wanted[usize::from(a.z)] {
                return;
            }
            let (kernel, side) = match slices {
                Some((of, eff)) => (&eff[of[i]].0, eff[of[i]].1),
                None => (kernel, side),
            };
            window.for_each_image([a.x, a.y], |[ox, oy]| {
                let p = kernel_density(kernel, side, px, ox, oy);
                if p <= 0.0 {
                    return;
                }
                signal += sigma_haadf[a.z as usize] * p;
                // Effective atoms under the probe: P × 1 Å².
                let w = p * 1e-20;
                match composition.iter_mut().find(|c| c.0 == a.z) {
                    Some(c) => c.1 += w,
                    None => composition.push((a.z, w)),
                }
            });
        };
        if indexed {
            for &i in &self.index_scratch {
                visit(i as usize, &atoms[i as usize]);
            }
        } else {
            for (i, a) in atoms.iter().enumerate() {
                visit(i, a);
            }
        }
        // The contamination deposited so far adds its atoms' signal (none without a growth
        // rate: the dose map is then not read).
        if !spectrum_only {
            let deposited = if self.cfg.damage.contamination_rate.get() > 0.0 {
                self.flush_dose();
                self.dose_map.at(b[0], b[1])
            } else {
                0.0
            };
            signal += self.contamination_signal(deposited);
        }
        self.defer_dose(PendingDose::Gaussian([b[0], b[1], self.probe_sigma, n_e]));
        let mut report = DamageReport::default();
        if self.any_knock {
            let kernel_reach = reach;
            // Split borrows: the kernel is read while the specimen is modified.
            let (kernel, side, px) = (&self.eff_kernel, self.eff_side, self.scan.pixel_size);
            let window = self
                .specimen
                .window([-b[0], -b[1]], [kernel_reach, kernel_reach]);
            // With depth of focus, the kernel of the atom's slice (found from its height).
            let (lo, thick, occupied, eff) = (
                self.slice_lo,
                self.slice_thick,
                &self.slice_occupied,
                &self.slice_eff,
            );
            let probe = |a: &Atom| -> f64 {
                let slice = depth
                    .then(|| occupied.binary_search(&(((a.height - lo) / thick).floor() as usize)))
                    .and_then(|r| r.ok());
                let (kernel, side) = match slice {
                    Some(k) => (&eff[k].0, eff[k].1),
                    None => (kernel, side),
                };
                let mut dose = 0.0;
                window.for_each_image([a.x, a.y], |[ox, oy]| {
                    dose += n_e * kernel_density(kernel, side, px, ox, oy);
                });
                dose
            };
            let bonds = self.bonds.get(&self.knock, &self.specimen);
            report.sputtered = sputter_with(
                &mut self.specimen,
                self.knock.sigma_of(bonds),
                &mut self.rng_damage,
                probe,
            );
        }
        if self.cfg.damage.dopant_hops {
            if !report.sputtered.is_empty() {
                self.index_valid = false;
            }
            self.ensure_index();
            report.hops = self.hop.dwell(
                &mut self.specimen,
                b,
                current,
                time,
                HOP_BOND,
                Some(&self.atom_index),
                &mut self.rng_damage,
            );
        }
        if !report.sputtered.is_empty() || !report.hops.is_empty() {
            self.ideal_valid = false;
            self.invalidate_field();
        }
        if !report.sputtered.is_empty() {
            self.index_valid = false;
        }
        self.last_damage = report;
        self.drift.advance(time, &mut self.rng_scan);
        self.clock += time;
        // Tiny negative tails of the band-limited source blur, as the frames clamp them.
        Ok((signal * n_e).max(0.0))
    }
}

/// `kernel` (`side × side`, centred at `side/2`) zero-padded to `to × to` (centred at `to/2`).
fn pad_kernel(kernel: &[f64], side: usize, to: usize) -> Vec<f64> {
    if side == to {
        return kernel.to_vec();
    }
    let off = to / 2 - side / 2;
    let mut out = vec![0.0; to * to];
    for (i, row) in kernel.chunks_exact(side).enumerate() {
        out[(i + off) * to + off..(i + off) * to + off + side].copy_from_slice(row);
    }
    out
}

/// Beam position of every pixel of the scan `sc` (row-major, m) under the scan distortion `sd`,
/// the frame centred on `centre` (specimen coordinates): the nominal position plus
/// [`ScanDistortion::displacement`] at the pixel's time in its line, as [`Distortion::distort`]
/// places the image's pixels.
fn distorted_positions(sd: &ScanDistortion, sc: &ScanSettings, centre: [f64; 2]) -> Vec<[f64; 2]> {
    let dx = sc.pixel_size;
    let (hx, hy) = (
        0.5 * (sc.cols as f64 - 1.0) * dx,
        0.5 * (sc.rows as f64 - 1.0) * dx,
    );
    let mut out = Vec::with_capacity(sc.rows * sc.cols);
    for i in 0..sc.rows {
        let y = i as f64 * dx - hy;
        for j in 0..sc.cols {
            let r = [j as f64 * dx - hx, y];
            let d = sd.displacement(r, j as f64 * sc.dwell_time);
            out.push([centre[0] + r[0] + d[0], centre[1] + r[1] + d[1]]);
        }
    }
    out
}

/// Adds a frame's dose (`epp` electrons per pixel) to `map` over the footprint of the scan `sc`
/// distorted by `sd`, the frame centred on `centre` (specimen coordinates). Each pixel's cell
/// (its nominal square, pixel edges mapped like pixel centres, the flyback lag taken at each
/// edge's time, not before the line start) is a parallelogram; columns are grouped in bands of
/// equal lag across all rows (the lag depends only on the time in the line) so the footprint is
/// a few convex quadrilaterals, each receiving its pixels' electrons uniformly. Bands are
/// `τ / (4 dwell)` columns wide (at least 1) while the lag lasts (20 τ), then one band; without
/// a lag, one parallelogram. The electrons added are exactly `epp · rows · cols`.
fn add_distorted_dose(
    map: &mut DoseMap,
    sd: &ScanDistortion,
    sc: &ScanSettings,
    centre: [f64; 2],
    epp: f64,
) {
    for (quad, dose) in distorted_footprint(sd, sc, centre, epp) {
        map.add_quad(quad, dose);
    }
}

/// The footprint of a distorted frame (see [`add_distorted_dose`]): quadrilaterals (corners
/// in order, specimen coordinates, m) that tile it, each with the areal dose it receives
/// (electrons/m²).
fn distorted_footprint(
    sd: &ScanDistortion,
    sc: &ScanSettings,
    centre: [f64; 2],
    epp: f64,
) -> Vec<([[f64; 2]; 4], f64)> {
    let (rows, cols, dx, dwell) = (sc.rows, sc.cols, sc.pixel_size, sc.dwell_time);
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    let (hx, hy) = (0.5 * cols as f64 * dx, 0.5 * rows as f64 * dx);
    // Lab position of the pixel-cell corner at column edge `e` (0..=cols) and row edge `y`.
    let corner = |e: usize, y: f64| {
        let r = [e as f64 * dx - hx, y];
        let t = (e as f64 - 0.5).max(0.0) * dwell;
        let d = sd.displacement(r, t);
        [centre[0] + r[0] + d[0], centre[1] + r[1] + d[1]]
    };
    let mut edges = vec![0usize];
    if sd.flyback_amplitude.get() != 0.0 {
        let tau = sd.flyback_time_constant.get();
        let band = ((tau / (4.0 * dwell)).floor() as usize).max(1);
        let lasting = ((20.0 * tau / dwell).ceil() as usize).min(cols);
        let mut e = band;
        while e < lasting {
            edges.push(e);
            e += band;
        }
    }
    edges.push(cols);
    edges
        .windows(2)
        .map(|w| {
            let (a, b) = (w[0], w[1]);
            let quad = [corner(a, -hy), corner(b, -hy), corner(b, hy), corner(a, hy)];
            let area2: f64 = (0..4)
                .map(|k| {
                    let (p, q) = (quad[k], quad[(k + 1) % 4]);
                    p[0] * q[1] - q[0] * p[1]
                })
                .sum();
            let electrons = epp * ((b - a) * rows) as f64;
            (quad, electrons / (0.5 * area2.abs()))
        })
        .collect()
}

/// Whether `p` lies inside the quadrilateral `quad` (corners in order; even-odd rule, so any
/// simple quadrilateral works).
fn inside_quad(quad: &[[f64; 2]; 4], p: [f64; 2]) -> bool {
    let mut inside = false;
    for k in 0..4 {
        let (a, b) = (quad[k], quad[(k + 1) % 4]);
        if (a[1] > p[1]) != (b[1] > p[1]) {
            let x = a[0] + (p[1] - a[1]) * (b[0] - a[0]) / (b[1] - a[1]);
            if p[0] < x {
                inside = !inside;
            }
        }
    }
    inside
}

/// Checks that the scan distortion `sd` keeps every pixel of a `rows × cols` frame of pixels
/// `pixel_size` (m) within [`MAX_DISTORTION_PIXELS`] of its nominal position.
fn check_distortion(sd: &ScanDistortion, rows: usize, cols: usize, pixel_size: f64) -> Result<()> {
    if sd.is_identity() {
        return Ok(());
    }
    let d = sd.max_displacement(rows, cols, pixel_size) / pixel_size;
    if !(d <= MAX_DISTORTION_PIXELS) {
        return Err(PhysicsError::param(
            "scan_distortion",
            format!(
                "displaces pixels of a {rows}×{cols} frame by up to {d:.2} pixels; at most \
                 {MAX_DISTORTION_PIXELS} are rendered"
            ),
        ));
    }
    Ok(())
}

impl StemSimulator {
    /// Tile frames (opt-in, the `fidelity = "fast"` of tasks that scan tiles of one field):
    /// with `Some(field)`, the ideal image of the whole `field` (its rows, columns and centre;
    /// the pixel size and probe of the scan grid in force when it is rendered) is rendered once,
    /// and every later frame whose padded grid lies inside it, on the same pixel lattice, with
    /// the same probe and electrons per pixel, copies its window instead of rendering (a splat
    /// and two FFTs per frame). The field is rendered again when the specimen changes (hops,
    /// sputtering, a new episode), the probe or the dose per pixel changes, or the specimen
    /// drifted by more than half a pixel since; a smaller drift is applied by the frame's
    /// bilinear resampling, as full frames do below 0.1 pixel. A window equals a frame's own
    /// render up to the circular convolution's wrap-around on the frame's smaller padded grid
    /// (under 1e-3 of the peak with the default optics). `None` (the default) renders every
    /// frame itself.
    pub fn set_tile_field(&mut self, field: Option<ScanSettings>) {
        self.field = field.map(|scan| TileField {
            scan,
            rendered: None,
            installed: None,
        });
    }

    /// Spectra (opt-in, the `fidelity = "fast"` of EELS tasks): channels expecting at least
    /// `counts` are drawn from the normal approximation of the Poisson distribution, the
    /// others exactly but batched ([`EelsModel::sample_batched`]: the same distribution, other
    /// random numbers); `f64::INFINITY` (the default) draws every channel exactly, one at a
    /// time ([`EelsModel::sample`]). A NaN or a value below 1 is taken as infinite.
    pub fn set_eels_normal_above(&mut self, counts: f64) {
        self.eels_normal_above = if counts >= 1.0 { counts } else { f64::INFINITY };
    }

    /// The field of [`Self::set_tile_field`], if set.
    pub fn tile_field(&self) -> Option<ScanSettings> {
        self.field.as_ref().map(|f| f.scan)
    }

    /// The specimen (or the hop model, at a reset) changed: the tile field must be rendered
    /// again and the hop pairs listed again.
    fn invalidate_field(&mut self) {
        self.hop_pairs.invalidate();
        if let Some(f) = &mut self.field {
            f.rendered = None;
        }
    }

    /// Renders the tile field if it is stale for a frame with `epp` electrons per pixel and
    /// drift `shift`; false without a field or a probe.
    fn ensure_field(&mut self, epp: f64, shift: [f64; 2]) -> Result<bool> {
        self.ensure_probe();
        let Some(field) = &self.field else {
            return Ok(false);
        };
        let fs = field.scan;
        let dx = self.scan.pixel_size;
        let fresh = field.rendered.is_some_and(|(pg, e, s)| {
            pg == self.probe_generation
                && e == epp
                && (shift[0] - s[0]).abs().max((shift[1] - s[1]).abs()) <= FIELD_RERENDER_DRIFT * dx
        });
        if fresh {
            return Ok(true);
        }
        let src = self.probe_model().source_sigma;
        let want = FrameGeometry::new(fs.rows, fs.cols, dx, self.kernel_side);
        let r = &mut self.field_renderer;
        // A new probe (generation) or grid: install it.
        let installed =
            field.installed == Some(self.probe_generation) && r.geometry() == Some(want);
        if !installed {
            r.set_probe(&self.kernel, self.kernel_side, fs.rows, fs.cols, dx, src);
        }
        // The field's grid may be larger than a quarter of a small cell: decide as frames do.
        let use_index = self.index_for([fs.cols as f64 * dx, fs.rows as f64 * dx]);
        let index = use_index.then_some(&self.atom_index);
        self.field_renderer.render_ideal_indexed(
            &self.specimen,
            index,
            &self.sigma_haadf,
            epp,
            shift,
            fs.center,
        )?;
        if let Some(f) = &mut self.field {
            f.rendered = Some((self.probe_generation, epp, shift));
            f.installed = Some(self.probe_generation);
        }
        Ok(true)
    }

    /// Loads the frame's ideal image from the tile field when the frame lies inside it on its
    /// pixel lattice; false (nothing loaded) otherwise.
    fn frame_from_field(&mut self, epp: f64, shift: [f64; 2]) -> Result<bool> {
        if !self.ensure_field(epp, shift)? {
            return Ok(false);
        }
        let (Some(field), Some(fg)) = (&self.field, self.field_renderer.geometry()) else {
            return Ok(false);
        };
        let sc = self.scan;
        let fs = field.scan;
        // The frame's first pixel, in field pixels from the field's first.
        let off = |c: f64, fc: f64, n: usize, fnn: usize| {
            (c - fc) / sc.pixel_size + 0.5 * (fnn as f64 - n as f64)
        };
        let (oc, or) = (
            off(sc.center[0], fs.center[0], sc.cols, fs.cols),
            off(sc.center[1], fs.center[1], sc.rows, fs.rows),
        );
        let lattice = |o: f64| o >= -1e-6 && (o - o.round()).abs() < 1e-6;
        if !(lattice(oc) && lattice(or)) {
            return Ok(false);
        }
        let Some(rendered_shift) = field.rendered.map(|r| r.2) else {
            return Ok(false);
        };
        let loaded = self.renderer.load_ideal_window(
            &self.field_renderer.ideal,
            &fg,
            or.round() as usize,
            oc.round() as usize,
        );
        if loaded {
            self.ideal_shift = rendered_shift;
        }
        Ok(loaded)
    }

    /// The noiseless field of [`Self::set_tile_field`] (rendered if stale) as a frame would
    /// see it without scan distortions: expected counts times the detector gain plus its
    /// offset, `rows × cols` row-major, at the current drift and with the probe of the scan
    /// grid in force; false without a field.
    pub fn tile_field_noiseless(&mut self, out: &mut Vec<f64>) -> Result<bool> {
        let epp = self.electrons(self.scan.dwell_time);
        let shift = self.drift.offset;
        if !self.ensure_field(epp, shift)? {
            return Ok(false);
        }
        let Some(g) = self.field_renderer.geometry() else {
            return Ok(false);
        };
        let det = &self.cfg.detector;
        let (gain, offset) = (det.gain.get(), det.offset.get());
        out.clear();
        for i in 0..g.rows {
            let row = (i + g.margin) * g.pcols + g.margin;
            out.extend(
                self.field_renderer.ideal[row..row + g.cols]
                    .iter()
                    .map(|&v| gain * f64::from(v) + offset),
            );
        }
        Ok(true)
    }

    /// The frame: the ideal image (re-formed when needed), resampled along the distorted
    /// scan path and counted.
    fn full_frame(&mut self, epp: f64, shift: [f64; 2], depth: bool) -> Result<()> {
        let sc = self.scan;
        // The ideal image depends on the specimen, the probe and the geometry; a rigid drift is
        // applied when resampling, so it is re-formed only when the specimen drifted by more
        // than `RERENDER_DRIFT` pixels since (bilinear resampling of the cached image at such a
        // small offset differs from a re-render by well under 1 % of the peak). A drift of up to
        // a pixel from the last splat is applied as a phase ramp to its spectrum.
        let moved = (shift[0] - self.ideal_shift[0])
            .abs()
            .max((shift[1] - self.ideal_shift[1]).abs());
        let stale = !self.ideal_valid || epp != self.rendered_electrons;
        if !depth && self.field.is_some() && self.frame_from_field(epp, shift)? {
            // Cut from the prerendered field (`set_tile_field`): the ideal image is the
            // field's window, rendered at the field's drift offset.
            self.ideal_valid = false;
        } else if stale || moved > RERENDER_DRIFT * sc.pixel_size {
            if stale || !self.renderer.shift_ideal(shift) {
                self.render_ideal(epp, shift, depth)?;
            }
            self.ideal_shift = shift;
            self.rendered_electrons = epp;
            self.ideal_valid = true;
        }
        self.scan_path(self.ideal_shift);
        if self.beam_effects_on() {
            self.record_with_beam_effects(epp, shift);
        } else {
            self.renderer
                .record(&self.dist, &self.cfg.detector, &mut self.rng_noise);
        }
        Ok(())
    }

    /// The positions the next frame's pixels visit (drift from the clock on, scan noise, scan
    /// distortions) on an ideal image rendered with the specimen shifted by `shift` (m).
    fn scan_path(&mut self, shift: [f64; 2]) {
        let sc = self.scan;
        self.dist.generate(
            &self.cfg.scan_noise,
            sc.rows,
            sc.cols,
            sc.dwell_time,
            sc.flyback_time,
            self.clock,
            shift,
            &mut self.drift,
            &mut self.rng_scan,
        );
        self.dist.distort(
            &self.cfg.scan_distortion,
            sc.rows,
            sc.cols,
            sc.pixel_size,
            sc.dwell_time,
        );
    }

    /// Renders the ideal image of the frame (`epp` electrons per pixel, specimen shifted by
    /// `shift`, m) with the current probe: through the depth slices' probes with `depth`.
    fn render_ideal(&mut self, epp: f64, shift: [f64; 2], depth: bool) -> Result<()> {
        let center = self.scan.center;
        if depth {
            self.renderer.render_ideal_sliced(
                &self.specimen,
                &self.sigma_haadf,
                epp,
                shift,
                center,
                &self.slice_of,
            )
        } else {
            let index = self.frame_index();
            self.renderer.render_ideal_indexed(
                &self.specimen,
                index.then_some(&self.atom_index),
                &self.sigma_haadf,
                epp,
                shift,
                center,
            )
        }
    }

    /// The parts of the next frame imaged by one probe when the aberration drift is followed
    /// within frames (`aberration_drift.within_frame`): the first row of each and the time
    /// (s, floored to the update interval) whose aberrations image it. Empty otherwise.
    fn frame_probe_parts(&self) -> Result<Vec<(usize, f64)>> {
        if !(self.cfg.aberration_drift.within_frame && self.ab_drift.is_on()) {
            return Ok(Vec::new());
        }
        let sc = self.scan;
        let line = sc.cols as f64 * sc.dwell_time + sc.flyback_time;
        let mut parts: Vec<(usize, f64)> = Vec::new();
        for r in 0..sc.rows {
            let t = self.ab_drift.quantized(self.clock + r as f64 * line);
            if parts.last().is_none_or(|p| p.1 != t) {
                parts.push((r, t));
            }
        }
        if parts.len() > MAX_FRAME_PROBES {
            return Err(PhysicsError::param(
                "aberration_drift.update_interval",
                format!(
                    "a frame of {:.3} s would be imaged by {} probes at {} s each; at most \
                     {MAX_FRAME_PROBES}: raise the interval or shorten the frame",
                    sc.rows as f64 * line,
                    parts.len(),
                    self.cfg.aberration_drift.update_interval.get()
                ),
            ));
        }
        Ok(parts)
    }

    /// A frame whose rows follow the aberration drift (`parts` from
    /// [`Self::frame_probe_parts`]): the scan path as for one probe, then per part the probe
    /// of its aberrations, its ideal image and its rows' expected counts, then the detector
    /// over the whole frame (the same draws, in the same order, as with one probe).
    fn frame_with_drifting_probe(
        &mut self,
        epp: f64,
        shift: [f64; 2],
        depth: bool,
        parts: &[(usize, f64)],
    ) -> Result<()> {
        let rows = self.scan.rows;
        self.scan_path(shift);
        for (k, &(r0, t)) in parts.iter().enumerate() {
            let r1 = parts.get(k + 1).map_or(rows, |p| p.0);
            let a = self.ab_drift.at(&self.aberrations, t, &mut self.rng_optics);
            if a != self.probe_ab {
                self.probe_ab = a;
                self.probe_dirty = true;
            }
            self.ensure_probe();
            if depth {
                self.prepare_depth_slices()?;
            }
            self.render_ideal(epp, shift, depth)?;
            self.renderer.expect_rows(&self.dist, r0..r1);
        }
        self.ideal_shift = shift;
        self.rendered_electrons = epp;
        self.ideal_valid = true;
        if self.beam_effects_on() {
            self.beam_effects_and_count(epp, shift);
        } else {
            self.renderer
                .count_rows(&self.cfg.detector, &mut self.rng_noise);
        }
        Ok(())
    }

    /// Whether an opt-in effect acts on the beam during a frame (then
    /// [`Self::beam_effects_and_count`] draws the frame).
    fn beam_effects_on(&self) -> bool {
        self.cfg
            .opt_in_effects()
            .iter()
            .any(|e| e.acts_on_the_beam())
    }

    /// Dose, damage, clock and the frame after its image is recorded (both fidelities).
    fn finish_frame(&mut self, epp: f64, shift: [f64; 2]) -> Result<Frame<'_>> {
        let sc = self.scan;
        let t0 = self.clock;
        // Dose over the scanned area, in specimen coordinates at the frame start.
        let dose = epp / (sc.pixel_size * sc.pixel_size);
        let [w, h] = sc.field_of_view();
        let (x0, y0) = (
            sc.center[0] - 0.5 * w - shift[0],
            sc.center[1] - 0.5 * h - shift[1],
        );
        if self.cfg.scan_distortion.is_identity() {
            self.defer_dose(PendingDose::Rect([x0, x0 + w, y0, y0 + h, dose]));
        } else {
            self.flush_dose();
            let centre = [x0 + 0.5 * w, y0 + 0.5 * h];
            add_distorted_dose(
                &mut self.dose_map,
                &self.cfg.scan_distortion,
                &sc,
                centre,
                epp,
            );
        }
        // The frame shows the specimen as it was when the scan began; what the scan did to it
        // (sputtering, hops: `last_damage`) shows from the next exposure on.
        let mut report = DamageReport::default();
        if self.any_knock {
            // Each image of an atom inside the scanned footprint receives the frame's dose
            // there: the rectangle, or the distorted scan's pieces (as the dose map).
            let (cx, cy) = (x0 + 0.5 * w, y0 + 0.5 * h);
            let bonds = self.bonds.get(&self.knock, &self.specimen);
            let sigma = self.knock.sigma_of(bonds);
            report.sputtered = if self.cfg.scan_distortion.is_identity() {
                let window = self.specimen.window([-cx, -cy], [0.5 * w, 0.5 * h]);
                sputter_with(&mut self.specimen, sigma, &mut self.rng_damage, |a| {
                    let mut images = 0.0;
                    window.for_each_image([a.x, a.y], |_| images += 1.0);
                    images * dose
                })
            } else {
                let pieces: Vec<_> =
                    distorted_footprint(&self.cfg.scan_distortion, &sc, [cx, cy], epp)
                        .into_iter()
                        .map(|(quad, d)| {
                            let lo = quad
                                .iter()
                                .fold([f64::INFINITY; 2], |m, q| [m[0].min(q[0]), m[1].min(q[1])]);
                            let hi = quad.iter().fold([f64::NEG_INFINITY; 2], |m, q| {
                                [m[0].max(q[0]), m[1].max(q[1])]
                            });
                            let c = [0.5 * (lo[0] + hi[0]), 0.5 * (lo[1] + hi[1])];
                            let half = [0.5 * (hi[0] - lo[0]), 0.5 * (hi[1] - lo[1])];
                            // Corners relative to the window's centre, as its images are.
                            let rel = quad.map(|q| [q[0] - c[0], q[1] - c[1]]);
                            (self.specimen.window([-c[0], -c[1]], half), rel, d)
                        })
                        .collect();
                sputter_with(&mut self.specimen, sigma, &mut self.rng_damage, |a| {
                    let mut total = 0.0;
                    for (window, quad, d) in &pieces {
                        let mut images = 0.0;
                        window.for_each_image([a.x, a.y], |q| {
                            if inside_quad(quad, q) {
                                images += 1.0;
                            }
                        });
                        total += images * d;
                    }
                    total
                })
            };
        }
        // Beam-driven hops while the frame is scanned, pixel by pixel in time order (the
        // specimen as placed at the frame start, like the dose).
        if self.cfg.damage.dopant_hops {
            // The raster moved by the period that brings its centre into the specimen's cell
            // (periodic specimen: the dopants are stored in one cell).
            let origin = [x0 + 0.5 * sc.pixel_size, y0 + 0.5 * sc.pixel_size];
            let half = [
                0.5 * (sc.cols as f64 - 1.0) * sc.pixel_size,
                0.5 * (sc.rows as f64 - 1.0) * sc.pixel_size,
            ];
            let centre = [origin[0] + half[0], origin[1] + half[1]];
            let home = self.specimen.image_near(centre, [0.0, 0.0]);
            let sd = &self.cfg.scan_distortion;
            if sd.is_identity() {
                let raster = Raster {
                    origin: [home[0] - half[0], home[1] - half[1]],
                    pixel_size: sc.pixel_size,
                    rows: sc.rows,
                    cols: sc.cols,
                    dwell: sc.dwell_time,
                    flyback: sc.flyback_time,
                };
                report.hops = self.hop.raster_cached(
                    &mut self.specimen,
                    &raster,
                    self.cfg.beam.current.get(),
                    HOP_BOND,
                    &mut self.hop_pairs,
                    &mut self.rng_damage,
                );
            } else {
                // The beam where the distorted scan puts it (the image's pixel positions).
                let positions = distorted_positions(sd, &sc, home);
                let path = RasterPath {
                    positions: &positions,
                    cols: sc.cols,
                    dwell: sc.dwell_time,
                    flyback: sc.flyback_time,
                };
                report.hops = self.hop.raster_path(
                    &mut self.specimen,
                    &path,
                    self.cfg.beam.current.get(),
                    HOP_BOND,
                    &mut self.rng_damage,
                );
            }
        }
        if !report.sputtered.is_empty() || !report.hops.is_empty() {
            self.ideal_valid = false;
            self.invalidate_field();
        }
        if !report.sputtered.is_empty() {
            self.index_valid = false;
        }
        self.last_damage = report;
        self.clock = t0 + sc.frame_time();
        let meta = FrameMeta {
            index: self.frames,
            t_start: t0,
            duration: sc.frame_time(),
            electrons_per_pixel: epp,
            dose,
        };
        self.frames += 1;
        let image = ArrayView2::from_shape(
            (sc.rows, sc.cols),
            &self.renderer.frame[..sc.rows * sc.cols],
        )
        .expect("buffer sized to the scan");
        Ok(Frame { image, meta })
    }
}

impl StemInstrument for StemSimulator {
    fn info(&self) -> InstrumentInfo {
        InstrumentInfo {
            name: "scopegym STEM simulator".into(),
            kind: InstrumentKind::Stem,
            simulated: true,
        }
    }

    fn clock(&self) -> f64 {
        self.clock
    }

    fn beam_energy(&self) -> f64 {
        self.cfg.optics.energy.get()
    }

    fn beam_current(&self) -> f64 {
        self.cfg.beam.current.get()
    }

    fn scan_settings(&self) -> ScanSettings {
        self.scan
    }

    fn configure_scan(&mut self, request: &ScanSettings) -> Result<ScanSettings> {
        check_scan_settings(request, DEFLECTION_RANGE, "scan.")?;
        check_distortion(
            &self.cfg.scan_distortion,
            request.rows,
            request.cols,
            request.pixel_size,
        )?;
        if (request.rows, request.cols, request.pixel_size)
            != (self.scan.rows, self.scan.cols, self.scan.pixel_size)
        {
            self.probe_dirty = true;
        }
        if request.center != self.scan.center {
            self.ideal_valid = false;
        }
        self.scan = *request;
        Ok(self.scan)
    }

    fn acquire_frame(&mut self) -> Result<Frame<'_>> {
        self.check_beam("acquire_frame")?;
        let parts = self.frame_probe_parts()?;
        self.follow_aberration_drift();
        self.ensure_probe();
        let depth = self.cfg.depth_of_focus.enabled && !self.specimen.atoms.is_empty();
        if depth {
            self.prepare_depth_slices()?;
        }
        let sc = self.scan;
        let epp = self.electrons(sc.dwell_time);
        let shift = self.drift.offset;
        if parts.len() > 1 {
            self.frame_with_drifting_probe(epp, shift, depth, &parts)?;
        } else {
            self.full_frame(epp, shift, depth)?;
        }
        self.finish_frame(epp, shift)
    }

    fn probe_position(&self) -> [f64; 2] {
        self.probe_pos
    }

    fn move_probe(&mut self, position: [f64; 2]) -> Result<()> {
        if !(position[0].is_finite() && position[1].is_finite()) {
            return Err(PhysicsError::arg("position", "must be finite"));
        }
        let [w, h] = self.scan.field_of_view();
        let c = self.scan.center;
        // Positions are allowed anywhere within twice the field of view (the scan coils' range).
        if (position[0] - c[0]).abs() > w || (position[1] - c[1]).abs() > h {
            return Err(PhysicsError::Refused {
                operation: "move_probe".into(),
                reason: format!("position {position:?} m is outside the deflection range"),
            });
        }
        self.probe_pos = position;
        Ok(())
    }

    fn acquire_point(&mut self, dwell_time: f64) -> Result<f64> {
        self.check_beam("acquire_point")?;
        if !(dwell_time > 0.0 && dwell_time <= 1000.0) {
            return Err(PhysicsError::arg(
                "dwell_time",
                format!("must be in (0, 1000] s, got {dwell_time}"),
            ));
        }
        let expected = self.expose_point(dwell_time, false)?;
        let gain = self.cfg.detector.gain.get();
        let counts = if self.cfg.detector.shot_noise {
            poisson(&mut self.rng_noise, expected)
        } else {
            expected
        };
        Ok(gain * counts + self.cfg.detector.offset.get())
    }

    fn acquire_spectrum(&mut self, exposure: f64) -> Result<Spectrum<'_>> {
        self.check_beam("acquire_spectrum")?;
        if !(exposure > 0.0 && exposure <= 1000.0) {
            return Err(PhysicsError::arg(
                "exposure",
                format!("must be in (0, 1000] s, got {exposure}"),
            ));
        }
        self.expose_point(exposure, true)?;
        let n_e = self.electrons(exposure);
        if self.eels_normal_above.is_finite() {
            self.eels.sample_batched(
                &self.composition,
                n_e,
                self.eels_normal_above,
                &mut self.rng_noise,
                &mut self.eels_scratch,
                &mut self.spectrum,
            );
        } else {
            self.eels.sample(
                &self.composition,
                n_e,
                &mut self.rng_noise,
                &mut self.spectrum,
            );
        }
        Ok(Spectrum {
            energy: self.eels.energy_axis(),
            counts: &self.spectrum,
        })
    }

    fn aberrations(&self) -> Aberrations {
        self.aberrations
    }

    fn set_aberrations(&mut self, aberrations: &Aberrations) -> Result<Aberrations> {
        aberrations.validate("aberrations.")?;
        if *aberrations != self.aberrations {
            self.aberrations = *aberrations;
            if self.ab_drift.is_on() {
                self.follow_aberration_drift();
            } else {
                self.probe_ab = *aberrations;
                self.probe_dirty = true;
            }
        }
        Ok(self.aberrations)
    }

    fn set_blanked(&mut self, blanked: bool) -> Result<()> {
        self.blanked = blanked;
        Ok(())
    }

    fn is_blanked(&self) -> bool {
        self.blanked
    }
}
