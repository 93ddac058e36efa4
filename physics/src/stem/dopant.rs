//! A light STEM model for steering one substitutional dopant through graphene.
//!
//! [`StemSimulator`](crate::stem::StemSimulator) renders a finite specimen with the full probe,
//! scan distortions and damage. Steering a single Si dopant needs far less: where the dopant
//! sits on the honeycomb lattice, where the beam is parked, and the beam-driven hop chain. This
//! model keeps exactly that physics, so a step costs a fraction of a microsecond:
//!
//! - **Lattice**: an unbounded graphene sheet (lattice constant `a`, C-C bond `a/√3`), rotated
//!   by `rotation`, with the dopant on a lattice site. Sites are computed from integer indices,
//!   never stored. The sheet drifts at a constant velocity: lab = specimen + `drift_velocity`·t.
//! - **Hops** (putting-dune, DESIGN.md §4): a continuous-time Markov chain with the rate toward
//!   each of the dopant's three C neighbours given by [`HopModel::rate`] (Gaussian in the beam
//!   offset, centred `hop_offset` from the dopant toward the neighbour, variance `hop_variance`,
//!   peak `hop_peak_rate` at `hop_reference_current`, linear in current). Exponential event
//!   times; the successor drawn by rate. During a point dwell the beam is fixed; within one
//!   dwell the drift of the sheet (≲ 0.03 Å per 2 s at 1 nm/min) is neglected.
//! - **Knock-on loss** of the dopant: a competing event of rate `σ_d(E) · (I/e) · ρ(b − d)`,
//!   with the smooth thermal cross-section [`knock_on_cross_section`] for the dopant's
//!   displacement energy and `ρ` the probe's intensity per area (a Gaussian). At 60 kV the
//!   maximum transfer to ²⁸Si is 5 eV, far below its 15 eV displacement energy, so the dopant
//!   is practically never lost; at 300 kV it is.
//! - **Probe**: the shared [`ProbeModel`] of the STEM simulators with the source blur that
//!   gives an in-focus intensity FWHM of `probe_fwhm` ([`ProbeModel::from_focused_fwhm`]; a
//!   `probe_fwhm` below the Airy FWHM `0.514 λ/α` gives the Airy probe), in its light form: a
//!   round Gaussian widened by the geometric blur of the aberrated cone,
//!   `σ² = σ₀² + α²(C10² + C12²)/4` (a uniform disc of radius `α·C` has variance `(α·C)²/4`
//!   per axis; [`ProbeModel::gaussian_sigma`]).
//! - **Images** (`acquire_frame`, `acquire_point`): HAADF counts `n_e · Σ_atoms σ_Z ρ(x − x_a)`
//!   with `σ_Z = σ_C (Z/6)^n` (`DetectorConfig`-like `haadf_exponent`,
//!   `carbon_cross_section`), Poisson shot noise, then `detector_gain`, `detector_offset` and
//!   Gaussian `read_noise`. While a frame is scanned the hop chain runs with the
//!   raster-averaged rates `Σ_pixels t_dwell · rate(pixel) / t_frame`, so a frame's dose drives
//!   hops (and knock-on) like a parked beam's. Every rate and every column's image is a
//!   Gaussian in the beam position, so both are computed separably: a rate's raster sum is the
//!   product of a sum along x and one along y, and a column adds the outer product of its
//!   factors along x and y (cut 3.5 σ out along each axis; points use a 4.5 σ disc), each
//!   factor row by a recurrence with two exponentials. A small window (10² pixels around the
//!   dopant) costs a few microseconds.
//!
//! It implements [`StemInstrument`] like the full simulator (no EELS: `acquire_spectrum` is
//! refused). The dopant's true position is ground truth ([`DopantSimulator::dopant`]).

use crate::constants::{AMU, ATOMIC_MASS_U, BOLTZMANN, ELEMENTARY_CHARGE};
use crate::error::{PhysicsError, Result};
use crate::instrument::{
    Frame, FrameMeta, InstrumentInfo, InstrumentKind, ScanSettings, Spectrum, StemInstrument,
};
use crate::param::dims::{Angle, Area, Current, Energy, Frequency, Length, Temperature, Time};
use crate::param::dims::{Unitless, Velocity};
use crate::param::{MAX_REDRAWS, Param, Region, redraws_exhausted, support_ends, support_error};
use crate::rng::{PoissonScratch, SimRng, derive_seed, normal, poisson, poisson_fill, seeded};
use crate::stem::damage::{HopModel, knock_on_cross_section};
use crate::stem::optics::Aberrations;
use crate::stem::probe::ProbeModel;
use crate::stem::settings::check_scan_settings;
use ndarray::Array2;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// Number of (possibly randomized) physical parameters of [`DopantSimConfig`].
const NPARAMS: usize = 22;

/// Settings of the light dopant model (`instrument = {...}` of `StemDopantSteer`). Every
/// physical parameter may be a distribution, redrawn at each reset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DopantSimConfig {
    /// Beam (kinetic) energy, eV. Default 60 keV.
    pub energy: Param<Energy>,
    /// Probe current, A. Default 100 pA.
    pub current: Param<Current>,
    /// Convergence semi-angle α, rad (geometric blur under defocus). Default 30 mrad.
    pub convergence_angle: Param<Angle>,
    /// Intensity FWHM of the focused probe, m. Default 1.1 Å.
    pub probe_fwhm: Param<Length>,
    /// Graphene lattice constant, m. Default 2.46 Å (C-C 1.42 Å).
    pub lattice_constant: Param<Length>,
    /// Rotation of the lattice in the lab frame, rad. Default uniform in [0, π/3).
    pub rotation: Param<Angle>,
    /// Atomic number of the dopant. Default 14 (Si).
    pub dopant_z: u8,
    /// Peak hop rate toward one neighbour at `hop_reference_current`, 1/s. Default ln2/3 ≈ 0.231.
    pub hop_peak_rate: Param<Frequency>,
    /// Current at which the hop rate equals `hop_peak_rate`, A. Default 100 pA.
    pub hop_reference_current: Param<Current>,
    /// Distance from the dopant to the rate maximum, toward the neighbour, m. Default 0.85 Å.
    pub hop_offset: Param<Length>,
    /// Variance of the Gaussian rate profile, m². Default 0.1 Å².
    pub hop_variance: Param<Area>,
    /// Whether the dopant can be sputtered (knock-on). Default true.
    pub sputtering: bool,
    /// Displacement energy of the dopant, eV. Default 15 eV (Si in graphene).
    pub displacement_energy: Param<Energy>,
    /// Specimen temperature (thermal vibrations smooth the knock-on threshold), K. Default 300 K.
    pub temperature: Param<Temperature>,
    /// Drift velocity of the sheet in the lab frame `[vx, vy]`, m/s. Default 0.
    pub drift_velocity: [Param<Velocity>; 2],
    /// Exponent n of the Z^n HAADF contrast. Default 1.7.
    pub haadf_exponent: Param<Unitless>,
    /// HAADF cross-section of one carbon atom, m². Default 5e-23 m².
    pub carbon_cross_section: Param<Area>,
    /// Whether counts are Poisson-sampled. Default true.
    pub shot_noise: bool,
    /// Detector output units per detected electron. Default 1.
    pub detector_gain: Param<Unitless>,
    /// Constant added to every recorded pixel or point, output units. Default 0.
    pub detector_offset: Param<Unitless>,
    /// Gaussian read noise per recorded pixel or point, standard deviation in output units.
    /// Default 0.
    pub read_noise: Param<Unitless>,
    /// Frame pixels `[rows, cols]`. Default 64 × 64.
    pub pixels: [usize; 2],
    /// Pixel size of frames, m. Default 0.2 Å.
    pub pixel_size: Param<Length>,
    /// Dwell time per pixel of frames, s. Default 4 µs.
    pub dwell_time: Param<Time>,
    /// Flyback time per line, s. Default 0.
    pub flyback_time: Param<Time>,
    /// Half-width of the beam deflection range around the origin, m. Default 5 nm.
    pub deflection_range: f64,
}

impl Default for DopantSimConfig {
    fn default() -> Self {
        Self {
            energy: Param::fixed(60e3),
            current: Param::fixed(100e-12),
            convergence_angle: Param::fixed(30e-3),
            probe_fwhm: Param::fixed(1.1e-10),
            lattice_constant: Param::fixed(2.46e-10),
            rotation: Param::uniform(0.0, PI / 3.0),
            dopant_z: 14,
            hop_peak_rate: Param::fixed(std::f64::consts::LN_2 / 3.0),
            hop_reference_current: Param::fixed(100e-12),
            hop_offset: Param::fixed(0.85e-10),
            hop_variance: Param::fixed(0.1e-20),
            sputtering: true,
            displacement_energy: Param::fixed(15.0),
            temperature: Param::fixed(300.0),
            drift_velocity: [Param::fixed(0.0), Param::fixed(0.0)],
            haadf_exponent: Param::fixed(1.7),
            carbon_cross_section: Param::fixed(5e-23),
            shot_noise: true,
            detector_gain: Param::fixed(1.0),
            detector_offset: Param::fixed(0.0),
            read_noise: Param::fixed(0.0),
            pixels: [64, 64],
            pixel_size: Param::fixed(0.2e-10),
            dwell_time: Param::fixed(4e-6),
            flyback_time: Param::fixed(0.0),
            deflection_range: 5e-9,
        }
    }
}

/// The drawn values of one episode, SI units.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Drawn {
    energy: f64,
    current: f64,
    alpha: f64,
    fwhm: f64,
    a: f64,
    rotation: f64,
    hop: [f64; 4],
    e_d: f64,
    temperature: f64,
    drift: [f64; 2],
    exponent: f64,
    sigma_c: f64,
    pixel_size: f64,
    dwell: f64,
    flyback: f64,
    gain: f64,
    offset: f64,
    read_noise: f64,
}

impl DopantSimConfig {
    /// The parameters in draw order: dotted name and distribution (units dropped: draws only
    /// need the numbers).
    fn params(&self) -> [(&'static str, Param<Unitless>); NPARAMS] {
        fn p<D: crate::param::Dim>(x: &Param<D>) -> Param<Unitless> {
            match *x {
                Param::Fixed(v, _) => Param::fixed(v),
                Param::Uniform(a, b, _) => Param::uniform(a, b),
                Param::Normal(a, b, _) => Param::Normal(a, b, Default::default()),
                Param::LogUniform(a, b, _) => Param::LogUniform(a, b, Default::default()),
            }
        }
        macro_rules! list {
            ($($name:literal => $e:expr),* $(,)?) => {
                [$(($name, p(&$e))),*]
            };
        }
        list![
            "energy" => self.energy,
            "current" => self.current,
            "convergence_angle" => self.convergence_angle,
            "probe_fwhm" => self.probe_fwhm,
            "lattice_constant" => self.lattice_constant,
            "rotation" => self.rotation,
            "hop_peak_rate" => self.hop_peak_rate,
            "hop_reference_current" => self.hop_reference_current,
            "hop_offset" => self.hop_offset,
            "hop_variance" => self.hop_variance,
            "displacement_energy" => self.displacement_energy,
            "temperature" => self.temperature,
            "drift_velocity[0]" => self.drift_velocity[0],
            "drift_velocity[1]" => self.drift_velocity[1],
            "haadf_exponent" => self.haadf_exponent,
            "carbon_cross_section" => self.carbon_cross_section,
            "pixel_size" => self.pixel_size,
            "dwell_time" => self.dwell_time,
            "flyback_time" => self.flyback_time,
            "detector_gain" => self.detector_gain,
            "detector_offset" => self.detector_offset,
            "read_noise" => self.read_noise,
        ]
    }

    /// Draws every parameter (fixed ones give their value) until the drawn values pass
    /// [`Self::check`], continuing the same generator (the distributions are truncated to the
    /// valid ranges); fails after [`MAX_REDRAWS`] invalid draws in a row.
    fn draw(&self, rng: &mut SimRng, region: Region) -> Result<(Drawn, [f64; NPARAMS])> {
        let params = self.params();
        let mut last = None;
        for _ in 0..MAX_REDRAWS {
            let mut v = [0.0; NPARAMS];
            for (k, (_, dist)) in params.iter().enumerate() {
                v[k] = dist.sample_in(rng, region);
            }
            match self.check(v) {
                Ok(d) => return Ok((d, v)),
                Err(e) => last = Some(e),
            }
        }
        Err(redraws_exhausted(last.expect("MAX_REDRAWS > 0")))
    }

    /// Checks the whole support of every distribution, not just its centre: each parameter in
    /// turn at each end of its support (uniform and log-uniform: `lo` and `hi`; normal:
    /// `mean ± 2 sd`, beyond which [`Self::draw`] redraws), the others at their centres.
    fn check_support(&self) -> Result<()> {
        let params = self.params();
        let centre: [f64; NPARAMS] = std::array::from_fn(|k| params[k].1.get());
        self.check(centre)?;
        for (k, (name, dist)) in params.iter().enumerate() {
            let (Some(kind), lo, hi) = dist.kind() else {
                continue;
            };
            for end in support_ends(kind, lo, hi) {
                let mut v = centre;
                v[k] = end;
                if let Err(e) = self.check(v) {
                    return Err(support_error(*name, (kind, lo, hi), end, &e));
                }
            }
        }
        Ok(())
    }

    /// The drawn values as a [`Drawn`], or an error naming the first one out of range (the
    /// frame settings by the shared STEM scan check,
    /// [`check_scan_settings`](crate::stem::settings::check_scan_settings)).
    fn check(&self, v: [f64; NPARAMS]) -> Result<Drawn> {
        let d = Drawn {
            energy: v[0],
            current: v[1],
            alpha: v[2],
            fwhm: v[3],
            a: v[4],
            rotation: v[5],
            hop: [v[6], v[7], v[8], v[9]],
            e_d: v[10],
            temperature: v[11],
            drift: [v[12], v[13]],
            exponent: v[14],
            sigma_c: v[15],
            pixel_size: v[16],
            dwell: v[17],
            flyback: v[18],
            gain: v[19],
            offset: v[20],
            read_noise: v[21],
        };
        let checks: [(&str, f64, f64, f64); 17] = [
            ("energy", d.energy, 1e3, 1e6),
            ("current", d.current, 0.0, 1e-6),
            ("convergence_angle", d.alpha, 1e-4, 0.2),
            ("probe_fwhm", d.fwhm, 0.1e-10, 10e-10),
            ("lattice_constant", d.a, 1e-10, 5e-10),
            ("rotation", d.rotation, -10.0, 10.0),
            ("hop_peak_rate", d.hop[0], 0.0, 1e6),
            ("hop_reference_current", d.hop[1], 1e-15, 1e-6),
            ("hop_offset", d.hop[2], 0.0, 5e-10),
            ("hop_variance", d.hop[3], 1e-24, 1e-18),
            ("displacement_energy", d.e_d, 0.1, 1e3),
            ("temperature", d.temperature, 0.0, 3000.0),
            ("haadf_exponent", d.exponent, 0.0, 3.0),
            ("carbon_cross_section", d.sigma_c, 0.0, 1e-18),
            ("detector_gain", d.gain, 1e-6, 1e9),
            ("detector_offset", d.offset, -1e9, 1e9),
            ("read_noise", d.read_noise, 0.0, 1e9),
        ];
        for (name, x, lo, hi) in checks {
            if !(x.is_finite() && x >= lo && x <= hi) {
                return Err(PhysicsError::param(
                    name,
                    format!("must lie in [{lo:e}, {hi:e}] (SI units), got {x:e}"),
                ));
            }
        }
        let frame = ScanSettings {
            rows: self.pixels[0],
            cols: self.pixels[1],
            pixel_size: d.pixel_size,
            dwell_time: d.dwell,
            flyback_time: d.flyback,
            center: [0.0; 2],
        };
        check_scan_settings(&frame, self.deflection_range, "")?;
        for (k, x) in d.drift.iter().enumerate() {
            if !(x.is_finite() && x.abs() <= 1e-6) {
                return Err(PhysicsError::param(
                    format!("drift_velocity[{k}]"),
                    format!("must lie within ±1 µm/s, got {x:e} m/s"),
                ));
            }
        }
        Ok(d)
    }

    /// Checks the settings (and one draw of every distribution).
    pub fn validate(&self) -> Result<()> {
        if !(1..=92).contains(&self.dopant_z) {
            return Err(PhysicsError::param(
                "dopant_z",
                format!("must be an atomic number 1-92, got {}", self.dopant_z),
            ));
        }
        if !(self.deflection_range > 0.0 && self.deflection_range <= 1e-6) {
            return Err(PhysicsError::param(
                "deflection_range",
                format!("must be in (0, 1 µm], got {} m", self.deflection_range),
            ));
        }
        self.check_support()
    }
}

/// A lattice site: cell indices and sublattice (0 = A, 1 = B).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Site {
    i: i64,
    j: i64,
    sub: u8,
}

/// The light dopant model as a STEM instrument. See the module docs.
#[derive(Debug, Clone)]
pub struct DopantSimulator {
    template: DopantSimConfig,
    region: Region,
    p: Drawn,
    values: [f64; NPARAMS],
    hop: HopModel,
    /// Lattice vectors a1, a2 and the A→B basis offset δ, specimen frame, m.
    a1: [f64; 2],
    a2: [f64; 2],
    delta: [f64; 2],
    site: Site,
    present: bool,
    hops: u64,
    sigma_knock: f64,
    sigma_z: [f64; 2],
    probe_sigma: f64,
    clock: f64,
    probe: [f64; 2],
    blanked: bool,
    aberrations: Aberrations,
    scan: ScanSettings,
    frame: Array2<f32>,
    frames: u64,
    rng_hop: SimRng,
    rng_noise: SimRng,
    /// Frame scratch: expected counts, and the Gaussian factors of one column along x and y.
    lam: Vec<f32>,
    gx: Vec<f32>,
    gy: Vec<f32>,
    poisson: PoissonScratch,
}

impl DopantSimulator {
    /// A simulator drawing its episode from `seed`.
    pub fn new(config: DopantSimConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut s = Self {
            p: Drawn::default(),
            values: [0.0; NPARAMS],
            hop: HopModel {
                peak_rate: 0.0,
                reference_current: 1.0,
                offset: 0.0,
                variance: 1.0,
                dopant_z: config.dopant_z,
                host_z: 6,
            },
            a1: [0.0; 2],
            a2: [0.0; 2],
            delta: [0.0; 2],
            site: Site::default(),
            present: true,
            hops: 0,
            sigma_knock: 0.0,
            sigma_z: [0.0; 2],
            probe_sigma: 1e-10,
            clock: 0.0,
            probe: [0.0; 2],
            blanked: false,
            aberrations: Aberrations::default(),
            scan: ScanSettings {
                rows: config.pixels[0],
                cols: config.pixels[1],
                pixel_size: 0.0,
                dwell_time: 0.0,
                flyback_time: 0.0,
                center: [0.0; 2],
            },
            frame: Array2::zeros((config.pixels[0], config.pixels[1])),
            frames: 0,
            rng_hop: seeded(0),
            rng_noise: seeded(0),
            lam: Vec::new(),
            gx: Vec::new(),
            gy: Vec::new(),
            poisson: PoissonScratch::default(),
            template: config,
            region: Region::All,
        };
        s.reset(seed)?;
        Ok(s)
    }

    /// Starts a new episode: redraws the randomized parameters from `seed`, puts the dopant on
    /// the A site at the origin, the beam there, the clock at 0, the aberrations at zero.
    pub fn reset(&mut self, seed: u64) -> Result<()> {
        let (p, values) = self
            .template
            .draw(&mut seeded(derive_seed(seed, "params")), self.region)?;
        self.p = p;
        self.values = values;
        self.hop = HopModel {
            peak_rate: p.hop[0],
            reference_current: p.hop[1],
            offset: p.hop[2],
            variance: p.hop[3],
            dopant_z: self.template.dopant_z,
            host_z: 6,
        };
        let (s, c) = p.rotation.sin_cos();
        let (s60, c60) = (p.rotation + PI / 3.0).sin_cos();
        self.a1 = [p.a * c, p.a * s];
        self.a2 = [p.a * c60, p.a * s60];
        self.delta = [
            (self.a1[0] + self.a2[0]) / 3.0,
            (self.a1[1] + self.a2[1]) / 3.0,
        ];
        self.site = Site::default();
        self.present = true;
        self.hops = 0;
        let z = self.template.dopant_z;
        let m = ATOMIC_MASS_U[z as usize];
        let v_rms = (BOLTZMANN * p.temperature / (m * AMU)).sqrt();
        self.sigma_knock = if self.template.sputtering {
            knock_on_cross_section(p.energy, z, m, p.e_d, v_rms)
        } else {
            0.0
        };
        self.sigma_z = [p.sigma_c, p.sigma_c * (f64::from(z) / 6.0).powf(p.exponent)];
        self.clock = 0.0;
        self.probe = [0.0; 2];
        self.blanked = false;
        self.aberrations = Aberrations::default();
        self.update_probe();
        self.scan = ScanSettings {
            rows: self.template.pixels[0],
            cols: self.template.pixels[1],
            pixel_size: p.pixel_size,
            dwell_time: p.dwell,
            flyback_time: p.flyback,
            center: [0.0; 2],
        };
        self.frame = Array2::zeros((self.scan.rows, self.scan.cols));
        self.frames = 0;
        self.rng_hop = seeded(derive_seed(seed, "hops"));
        self.rng_noise = seeded(derive_seed(seed, "noise"));
        Ok(())
    }

    /// The configuration as given (with its distributions).
    pub fn template(&self) -> &DopantSimConfig {
        &self.template
    }

    /// Draws every later episode's randomized parameters from `region` of their distributions
    /// (held-out evaluation ranges); takes effect at the next reset.
    pub fn set_region(&mut self, region: Region) {
        self.region = region;
    }

    /// The randomized parameters of this episode and their drawn values (SI units).
    pub fn randomized(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        self.template
            .params()
            .into_iter()
            .zip(self.values)
            .filter(|((_, dist), _)| !dist.is_fixed())
            .map(|((name, _), v)| (name, v))
    }

    /// The probe in force: the shared model with this episode's energy, angle and focused FWHM
    /// and the aberrations set.
    pub fn probe_model(&self) -> ProbeModel {
        let p = &self.p;
        ProbeModel::from_focused_fwhm(p.energy, p.alpha, p.fwhm, self.aberrations)
    }

    fn update_probe(&mut self) {
        self.probe_sigma = self.probe_model().gaussian_sigma();
    }

    /// Lab offset of the sheet (drift), m.
    fn drift(&self) -> [f64; 2] {
        [self.p.drift[0] * self.clock, self.p.drift[1] * self.clock]
    }

    /// Specimen position of a site, m.
    fn pos(&self, s: Site) -> [f64; 2] {
        let (i, j, b) = (s.i as f64, s.j as f64, f64::from(s.sub));
        [
            i * self.a1[0] + j * self.a2[0] + b * self.delta[0],
            i * self.a1[1] + j * self.a2[1] + b * self.delta[1],
        ]
    }

    /// The three bonded neighbours of a site.
    fn neighbours(s: Site) -> [Site; 3] {
        let (i, j) = (s.i, s.j);
        if s.sub == 0 {
            [(i, j), (i - 1, j), (i, j - 1)].map(|(i, j)| Site { i, j, sub: 1 })
        } else {
            [(i, j), (i + 1, j), (i, j + 1)].map(|(i, j)| Site { i, j, sub: 0 })
        }
    }

    fn to_lab(&self, p: [f64; 2]) -> [f64; 2] {
        let d = self.drift();
        [p[0] + d[0], p[1] + d[1]]
    }

    /// The dopant's lab position (m), or `None` once it was sputtered.
    pub fn dopant(&self) -> Option<[f64; 2]> {
        self.present.then(|| self.to_lab(self.pos(self.site)))
    }

    /// Lab positions (m) of the dopant's three bonded C neighbours.
    pub fn dopant_neighbours(&self) -> [[f64; 2]; 3] {
        Self::neighbours(self.site).map(|n| self.to_lab(self.pos(n)))
    }

    /// Hops since the reset.
    pub fn hops(&self) -> u64 {
        self.hops
    }

    /// The probe's Gaussian σ, m.
    pub fn probe_sigma(&self) -> f64 {
        self.probe_sigma
    }

    /// Knock-on cross-section of the dopant this episode, m².
    pub fn dopant_cross_section(&self) -> f64 {
        self.sigma_knock
    }

    /// Lab positions (m) of the C sites within `radius` (m) of `center` (lab, m), written to
    /// `out` (the dopant's site excluded).
    pub fn host_sites(&self, center: [f64; 2], radius: f64, out: &mut Vec<[f64; 2]>) {
        out.clear();
        let d = self.drift();
        let c = [center[0] - d[0], center[1] - d[1]];
        self.for_sites_near(c, radius, |s, p| {
            if !(self.present && s == self.site) {
                out.push([p[0] + d[0], p[1] + d[1]]);
            }
        });
    }

    /// Probe intensity per area (1/m²) at offset `r2` (squared distance, m²) from its centre.
    fn density(&self, r2: f64) -> f64 {
        let v = self.probe_sigma * self.probe_sigma;
        (-0.5 * r2 / v).exp() / (2.0 * PI * v)
    }

    /// Runs the hop chain for `duration` s with constant rates from `rates(dopant, neighbours)`
    /// (`[hop toward each neighbour, loss]`, 1/s), recomputed after every hop.
    fn run_chain(
        &mut self,
        duration: f64,
        rates: impl Fn(&Self, [f64; 2], [[f64; 2]; 3]) -> [f64; 4],
    ) {
        let mut t = 0.0;
        while self.present {
            let d = self.pos(self.site);
            let nb = Self::neighbours(self.site);
            let r = rates(self, d, nb.map(|n| self.pos(n)));
            let total: f64 = r.iter().sum();
            if total <= 0.0 {
                break;
            }
            let u: f64 = self.rng_hop.random();
            t += -(1.0 - u).ln() / total;
            if t >= duration {
                break;
            }
            let mut pick = self.rng_hop.random::<f64>() * total;
            let mut k = 3;
            for (m, &x) in r.iter().enumerate() {
                if pick < x {
                    k = m;
                    break;
                }
                pick -= x;
            }
            if k == 3 {
                self.present = false;
            } else {
                self.site = nb[k];
                self.hops += 1;
            }
        }
    }

    /// Rates with the beam parked at specimen position `b`.
    fn parked_rates(&self, b: [f64; 2], d: [f64; 2], nb: [[f64; 2]; 3]) -> [f64; 4] {
        let i = self.p.current;
        let loss = self.sigma_knock
            * (i / ELEMENTARY_CHARGE)
            * self.density((b[0] - d[0]).powi(2) + (b[1] - d[1]).powi(2));
        [
            self.hop.rate(d, nb[0], b, i),
            self.hop.rate(d, nb[1], b, i),
            self.hop.rate(d, nb[2], b, i),
            loss,
        ]
    }

    /// Expected HAADF counts with the probe at specimen position `b` and `n_e` electrons.
    fn expected_counts(&self, b: [f64; 2], n_e: f64) -> f64 {
        // Within 4.5 σ: the tails beyond hold exp(-10) of a column's peak.
        let reach = 4.5 * self.probe_sigma;
        let mut sum = 0.0;
        self.for_sites_near(b, reach, |s, p| {
            let r2 = (p[0] - b[0]).powi(2) + (p[1] - b[1]).powi(2);
            sum += self.sigma_of(s) * self.density(r2);
        });
        n_e * sum
    }

    fn sigma_of(&self, s: Site) -> f64 {
        if s == self.site {
            if self.present { self.sigma_z[1] } else { 0.0 }
        } else {
            self.sigma_z[0]
        }
    }

    /// Calls `f(site, specimen position)` for every site within `reach` (m) of `c` (specimen).
    fn for_sites_near(&self, c: [f64; 2], reach: f64, mut f: impl FnMut(Site, [f64; 2])) {
        let det = self.a1[0] * self.a2[1] - self.a1[1] * self.a2[0];
        let fi = (c[0] * self.a2[1] - c[1] * self.a2[0]) / det;
        let fj = (self.a1[0] * c[1] - self.a1[1] * c[0]) / det;
        // A lab offset r changes a cell index by at most r / (a·sin 60°); plus rounding of the
        // centre (½) and the basis offset (⅓).
        let n = (reach / (self.p.a * 0.866_025_403_784_438_6) + 0.9).ceil() as i64;
        let (ci, cj) = (fi.round() as i64, fj.round() as i64);
        for i in ci - n..=ci + n {
            for j in cj - n..=cj + n {
                for sub in 0..2 {
                    let s = Site { i, j, sub };
                    let p = self.pos(s);
                    if (p[0] - c[0]).powi(2) + (p[1] - c[1]).powi(2) <= reach * reach {
                        f(s, p);
                    }
                }
            }
        }
    }

    /// The raster-averaged rates (`[hop toward each neighbour, loss]`, 1/s) of a frame whose
    /// pixel (0, 0) sits at specimen position `origin`, each pixel holding the beam for `share`
    /// of the frame time.
    fn raster_rates(
        &self,
        d: [f64; 2],
        nb: [[f64; 2]; 3],
        origin: [f64; 2],
        sc: &ScanSettings,
        share: f64,
    ) -> [f64; 4] {
        let (dx, i) = (sc.pixel_size, self.p.current);
        let mut out = [0.0; 4];
        let hv = self.hop.variance;
        let reach = 8.0 * hv.sqrt();
        let peak = self.hop.peak_rate * (i / self.hop.reference_current);
        for (o, n) in out.iter_mut().zip(nb) {
            let (ux, uy) = (n[0] - d[0], n[1] - d[1]);
            let len = (ux * ux + uy * uy).sqrt();
            if len == 0.0 {
                continue;
            }
            let mu = [
                d[0] + self.hop.offset * ux / len,
                d[1] + self.hop.offset * uy / len,
            ];
            let sx = gauss_sum(origin[0], dx, sc.cols, mu[0], hv, reach);
            if sx > 0.0 {
                let sy = gauss_sum(origin[1], dx, sc.rows, mu[1], hv, reach);
                *o = peak * sx * sy * share;
            }
        }
        if self.sigma_knock > 0.0 {
            let v = self.probe_sigma * self.probe_sigma;
            let reach = 8.0 * self.probe_sigma;
            let sx = gauss_sum(origin[0], dx, sc.cols, d[0], v, reach);
            let sy = gauss_sum(origin[1], dx, sc.rows, d[1], v, reach);
            out[3] = self.sigma_knock * (i / ELEMENTARY_CHARGE) * sx * sy / (2.0 * PI * v) * share;
        }
        out
    }

    /// Fills `lam` with the expected HAADF counts of the scan (`n_e` electrons per pixel, pixel
    /// (0, 0) at specimen position `origin`): every site within reach of the frame adds its
    /// column's Gaussian as the product of its factors along x and y (the probe intensity is a
    /// round Gaussian), cut 3.5 σ from the column along each axis (the tails beyond hold 0.2 %
    /// of a column's peak, far below the shot noise of a pixel at any practical dose).
    fn expected_frame(&mut self, n_e: f64, origin: [f64; 2]) {
        let sc = self.scan;
        let (rows, cols, dx) = (sc.rows, sc.cols, sc.pixel_size);
        let (mut lam, mut gx, mut gy) = (
            std::mem::take(&mut self.lam),
            std::mem::take(&mut self.gx),
            std::mem::take(&mut self.gy),
        );
        lam.clear();
        lam.resize(rows * cols, 0.0);
        gx.resize(cols, 0.0);
        gy.resize(rows, 0.0);
        let v = self.probe_sigma * self.probe_sigma;
        let reach = 3.5 * self.probe_sigma;
        let norm = n_e / (2.0 * PI * v);
        let m2 = exp_fast(-dx * dx / v);
        let half = [
            0.5 * (cols as f64 - 1.0) * dx,
            0.5 * (rows as f64 - 1.0) * dx,
        ];
        let centre = [origin[0] + half[0], origin[1] + half[1]];
        let radius = half[0].hypot(half[1]) + reach;
        self.for_sites_near(centre, radius, |s, p| {
            let w = self.sigma_of(s) * norm;
            if w == 0.0 {
                return;
            }
            let Some((c0, c1)) = gauss_samples(origin[0], dx, cols, p[0], v, reach, m2, &mut gx)
            else {
                return;
            };
            let Some((r0, r1)) = gauss_samples(origin[1], dx, rows, p[1], v, reach, m2, &mut gy)
            else {
                return;
            };
            let gxs = &gx[c0..=c1];
            for r in r0..=r1 {
                let wy = (w * f64::from(gy[r])) as f32;
                let row = &mut lam[r * cols + c0..=r * cols + c1];
                for (o, &g) in row.iter_mut().zip(gxs) {
                    *o += wy * g;
                }
            }
        });
        self.lam = lam;
        self.gx = gx;
        self.gy = gy;
    }

    /// Records the expected counts `lam` into `out`: Poisson counts (or the expectation without
    /// shot noise), detector gain and offset, Gaussian read noise.
    fn record(&mut self, out: &mut [f32]) {
        if self.template.shot_noise {
            poisson_fill(&mut self.rng_noise, &self.lam, out, &mut self.poisson);
        } else {
            out.copy_from_slice(&self.lam);
        }
        let (gain, offset) = (self.p.gain as f32, self.p.offset as f32);
        if gain != 1.0 || offset != 0.0 {
            for o in out.iter_mut() {
                *o = gain * *o + offset;
            }
        }
        if self.p.read_noise > 0.0 {
            for o in out.iter_mut() {
                *o += (self.p.read_noise * normal(&mut self.rng_noise)) as f32;
            }
        }
    }

    /// Lab displacement of the sheet by drift since the reset, m (lab = specimen + this).
    pub fn drift_offset(&self) -> [f64; 2] {
        self.drift()
    }

    /// Lab position (m) of the lattice site (host or dopant) nearest the lab position `p`.
    pub fn nearest_site(&self, p: [f64; 2]) -> [f64; 2] {
        let d = self.drift();
        let c = [p[0] - d[0], p[1] - d[1]];
        let mut best = (f64::INFINITY, [0.0; 2]);
        // Within one bond of any point lies a site.
        self.for_sites_near(c, self.p.a, |_, q| {
            let r2 = (q[0] - c[0]).powi(2) + (q[1] - c[1]).powi(2);
            if r2 < best.0 {
                best = (r2, q);
            }
        });
        [best.1[0] + d[0], best.1[1] + d[1]]
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
}

/// `e^x` for `|x| ≤ 700` (relative error below 2e-10; beyond the range the result saturates
/// but stays finite): `2^t` with `t = x·log₂e` split into the nearest integer and a fraction in
/// [-½, ½], the fraction's power by a degree-9 Taylor series. No library call: the frame
/// renderer evaluates a few per atom.
#[inline]
fn exp_fast(x: f64) -> f64 {
    /// 1.5 · 2⁵²: adding it rounds a double of magnitude below 2⁵¹ to an integer.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let t = x.clamp(-700.0, 700.0) * std::f64::consts::LOG2_E;
    let shifted = t + ROUND;
    let n = shifted - ROUND;
    let k = shifted.to_bits() as i64 - ROUND.to_bits() as i64;
    let f = (t - n) * std::f64::consts::LN_2;
    let mut p = 1.0 / 362_880.0;
    for c in [
        1.0 / 40_320.0,
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * f + c;
    }
    p * f64::from_bits(((k + 1023) as u64) << 52)
}

/// The index range `[lo, hi]` of the samples `x0 + k·dx` (`k < n`) within `reach` of `m`, if
/// any (floor and ceiling by integer casts: the samples of a frame are few).
#[inline]
fn sample_range(x0: f64, dx: f64, n: usize, m: f64, reach: f64) -> Option<(usize, usize)> {
    let a = (m - reach - x0) / dx;
    let b = (m + reach - x0) / dx;
    if !(b >= 0.0 && a <= n as f64 - 1.0) {
        return None;
    }
    // a ≤ n − 1 and b ≥ 0 here, so the casts are in range; ceil(a) for a > −1, floor(b).
    let lo = if a <= 0.0 {
        0
    } else {
        let t = a as usize;
        t + usize::from((t as f64) < a)
    };
    let hi = (b as usize).min(n - 1);
    (lo <= hi).then_some((lo, hi))
}

/// Writes `exp(-(x0 + k·dx - m)²/(2v))` into `out[k]` for the `k < n` whose sample lies within
/// `reach` of `m`, by a recurrence (two exponentials per call, with `m2 = exp(-dx²/v)` given),
/// and returns that range of `k` (`None` when no sample is within reach).
#[allow(clippy::too_many_arguments)]
fn gauss_samples(
    x0: f64,
    dx: f64,
    n: usize,
    m: f64,
    v: f64,
    reach: f64,
    m2: f64,
    out: &mut [f32],
) -> Option<(usize, usize)> {
    let (lo, hi) = sample_range(x0, dx, n, m, reach)?;
    let u = x0 + lo as f64 * dx - m;
    // g(k+1)/g(k) = exp(-(2u_k dx + dx²)/2v), itself multiplied by exp(-dx²/v) per step.
    let mut g = exp_fast(-0.5 * u * u / v);
    let mut q = exp_fast(-(2.0 * u * dx + dx * dx) / (2.0 * v));
    for o in &mut out[lo..=hi] {
        *o = g as f32;
        g *= q;
        q *= m2;
    }
    Some((lo, hi))
}

/// `Σ_k exp(-(x0 + k·dx - m)²/(2v))` over `k < n`, the samples beyond `reach` of `m` left out.
fn gauss_sum(x0: f64, dx: f64, n: usize, m: f64, v: f64, reach: f64) -> f64 {
    let Some((lo, hi)) = sample_range(x0, dx, n, m, reach) else {
        return 0.0;
    };
    let u = x0 + lo as f64 * dx - m;
    let mut g = exp_fast(-0.5 * u * u / v);
    let mut q = exp_fast(-(2.0 * u * dx + dx * dx) / (2.0 * v));
    let m2 = exp_fast(-dx * dx / v);
    let mut sum = 0.0;
    for _ in lo..=hi {
        sum += g;
        g *= q;
        q *= m2;
    }
    sum
}

impl StemInstrument for DopantSimulator {
    fn info(&self) -> InstrumentInfo {
        InstrumentInfo {
            name: "scopegym STEM dopant-lattice model".into(),
            kind: InstrumentKind::Stem,
            simulated: true,
        }
    }

    fn clock(&self) -> f64 {
        self.clock
    }

    fn beam_energy(&self) -> f64 {
        self.p.energy
    }

    fn beam_current(&self) -> f64 {
        self.p.current
    }

    fn scan_settings(&self) -> ScanSettings {
        self.scan
    }

    fn configure_scan(&mut self, request: &ScanSettings) -> Result<ScanSettings> {
        let r = request;
        check_scan_settings(r, self.template.deflection_range, "scan.")?;
        if (r.rows, r.cols) != self.frame.dim() {
            self.frame = Array2::zeros((r.rows, r.cols));
        }
        self.scan = *r;
        Ok(self.scan)
    }

    fn acquire_frame(&mut self) -> Result<Frame<'_>> {
        self.check_beam("acquire_frame")?;
        let sc = self.scan;
        let n_e = self.p.current * sc.dwell_time / ELEMENTARY_CHARGE;
        let t_start = self.clock;
        let duration = sc.frame_time();
        // Specimen position of pixel (0, 0) (lab = specimen + drift at the frame start); pixel
        // (r, c) sits at origin + (c, r)·pixel_size.
        let d0 = self.drift();
        let origin = [
            sc.center[0] - 0.5 * (sc.cols as f64 - 1.0) * sc.pixel_size - d0[0],
            sc.center[1] - 0.5 * (sc.rows as f64 - 1.0) * sc.pixel_size - d0[1],
        ];
        if duration > 0.0 {
            // Hops while scanning: the raster-averaged rates `Σ_pixels t_dwell·rate / t_frame`.
            // Every rate is a Gaussian in the beam position, so its sum over the raster is the
            // product of a sum along x and a sum along y.
            let share = sc.dwell_time / duration;
            self.run_chain(duration, |me, d, nb| {
                me.raster_rates(d, nb, origin, &sc, share)
            });
        }
        // The image of the final configuration.
        self.expected_frame(n_e, origin);
        let mut img = std::mem::take(&mut self.frame);
        if let Some(out) = img.as_slice_mut() {
            self.record(out);
        }
        self.frame = img;
        self.clock += duration;
        let meta = FrameMeta {
            index: self.frames,
            t_start,
            duration,
            electrons_per_pixel: n_e,
            dose: n_e / (sc.pixel_size * sc.pixel_size),
        };
        self.frames += 1;
        Ok(Frame {
            image: self.frame.view(),
            meta,
        })
    }

    fn probe_position(&self) -> [f64; 2] {
        self.probe
    }

    fn move_probe(&mut self, position: [f64; 2]) -> Result<()> {
        let r = self.template.deflection_range;
        if !position.iter().all(|v| v.is_finite() && v.abs() <= r) {
            return Err(PhysicsError::arg(
                "position",
                format!("must be finite and within ±{r} m, got {position:?}"),
            ));
        }
        self.probe = position;
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
        let dr = self.drift();
        let b = [self.probe[0] - dr[0], self.probe[1] - dr[1]];
        self.run_chain(dwell_time, |me, d, nb| me.parked_rates(b, d, nb));
        let n_e = self.p.current * dwell_time / ELEMENTARY_CHARGE;
        let lam = self.expected_counts(b, n_e);
        self.clock += dwell_time;
        let counts = if self.template.shot_noise {
            poisson(&mut self.rng_noise, lam)
        } else {
            lam
        };
        let mut signal = self.p.gain * counts + self.p.offset;
        if self.p.read_noise > 0.0 {
            signal += self.p.read_noise * normal(&mut self.rng_noise);
        }
        Ok(signal)
    }

    fn acquire_spectrum(&mut self, _exposure: f64) -> Result<Spectrum<'_>> {
        Err(PhysicsError::Refused {
            operation: "acquire_spectrum".into(),
            reason: "the dopant-lattice model has no EELS; use StemSimulator".into(),
        })
    }

    fn aberrations(&self) -> Aberrations {
        self.aberrations
    }

    fn set_aberrations(&mut self, aberrations: &Aberrations) -> Result<Aberrations> {
        aberrations.validate("aberrations.")?;
        self.aberrations = *aberrations;
        self.update_probe();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stem::damage::max_transfer;

    fn quiet(cfg: DopantSimConfig) -> DopantSimulator {
        DopantSimulator::new(cfg, 1).unwrap()
    }

    #[test]
    fn lattice_geometry_is_graphene() {
        let s = quiet(DopantSimConfig::default());
        let d = s.dopant().unwrap();
        assert_eq!(d, [0.0, 0.0]);
        let nb = s.dopant_neighbours();
        for n in nb {
            let r = n[0].hypot(n[1]);
            assert!((r / 1.4203e-10 - 1.0).abs() < 1e-3, "bond {r}");
        }
        // 120° apart.
        for k in 0..3 {
            let (a, b) = (nb[k], nb[(k + 1) % 3]);
            let cos = (a[0] * b[0] + a[1] * b[1]) / (a[0].hypot(a[1]) * b[0].hypot(b[1]));
            assert!((cos + 0.5).abs() < 1e-9, "{cos}");
        }
        // Areal density of graphene: 2 atoms per (√3/2)a² = 0.3818 Å⁻²; a 2 nm disc holds
        // π·20²·0.3818 ≈ 480 sites (minus the dopant's).
        let mut out = Vec::new();
        s.host_sites([0.0, 0.0], 2e-9, &mut out);
        let expect = PI * 400.0 * 2.0 / (3f64.sqrt() / 2.0 * 2.46f64.powi(2)) - 1.0;
        assert!(
            (out.len() as f64 / expect - 1.0).abs() < 0.03,
            "{} vs {expect}",
            out.len()
        );
    }

    #[test]
    fn parked_beam_hops_toward_the_neighbour_at_the_putting_dune_rate() {
        // Beam 0.85 Å from the Si toward neighbour 0: rate ln2/3 per second toward it (the
        // other two neighbours' maxima are 1.47 Å away: exp(-0.5·2.17/0.1) ≈ 2e-5 of the peak).
        // P(hop within 1.5 s) = 1 - exp(-0.231·1.5) = 0.293.
        let mut sim = quiet(DopantSimConfig::default());
        let n = 4000;
        let mut hopped = 0;
        let mut elsewhere = 0;
        for seed in 0..n {
            sim.reset(seed).unwrap();
            let nb = sim.dopant_neighbours();
            let u = [nb[0][0] / 1.42e-10, nb[0][1] / 1.42e-10];
            sim.move_probe([0.85e-10 * u[0], 0.85e-10 * u[1]]).unwrap();
            sim.acquire_point(1.5).unwrap();
            hopped += usize::from(sim.hops() > 0);
            // The beam now sits 0.57 Å from a hopped Si toward its old site, so it may hop
            // back; but it ends on the origin or on neighbour 0, never elsewhere.
            let d = sim.dopant().unwrap();
            let at = |q: [f64; 2]| (d[0] - q[0]).hypot(d[1] - q[1]) < 1e-12;
            elsewhere += usize::from(!at([0.0, 0.0]) && !at(nb[0]));
        }
        let p = hopped as f64 / n as f64;
        let expect = 1.0 - (-(std::f64::consts::LN_2 / 3.0) * 1.5).exp();
        let sd = (expect * (1.0 - expect) / n as f64).sqrt();
        assert!((p - expect).abs() < 4.0 * sd, "{p} vs {expect}");
        assert!(elsewhere <= n as usize / 200, "{elsewhere}");
    }

    #[test]
    fn hop_rate_scales_linearly_with_current() {
        let cfg = DopantSimConfig {
            current: Param::fixed(400e-12),
            ..Default::default()
        };
        let mut sim = quiet(cfg);
        let n = 3000;
        let mut hopped = 0;
        for seed in 0..n {
            sim.reset(seed).unwrap();
            let nb = sim.dopant_neighbours();
            let u = [nb[1][0] / 1.42e-10, nb[1][1] / 1.42e-10];
            sim.move_probe([0.85e-10 * u[0], 0.85e-10 * u[1]]).unwrap();
            sim.acquire_point(0.5).unwrap();
            hopped += usize::from(sim.hops() > 0);
        }
        let p = hopped as f64 / n as f64;
        let expect = 1.0 - (-4.0 * std::f64::consts::LN_2 / 3.0 * 0.5).exp();
        let sd = (expect * (1.0 - expect) / n as f64).sqrt();
        assert!((p - expect).abs() < 4.0 * sd, "{p} vs {expect}");
    }

    #[test]
    fn knock_on_loss_follows_the_cross_section() {
        // 60 kV: T_max(²⁸Si) ≈ 5 eV ≪ 15 eV: never lost. 300 kV: T_max ≈ 30 eV, lost with
        // probability 1 - exp(-σ·n_e·ρ(0)) with the beam on the dopant.
        assert!(max_transfer(60e3, ATOMIC_MASS_U[14]) < 5.1);
        let mut sim = quiet(DopantSimConfig::default());
        sim.acquire_point(100.0).unwrap();
        assert!(sim.dopant().is_some());
        assert!(sim.dopant_cross_section() < 1e-40);

        let cfg = DopantSimConfig {
            energy: Param::fixed(300e3),
            hop_peak_rate: Param::fixed(0.0),
            ..Default::default()
        };
        let mut sim = quiet(cfg);
        let sigma = sim.dopant_cross_section();
        assert!(sigma > 1e-30, "{sigma}");
        // Loss rate with the beam on the dopant: σ·(I/e)·ρ(0), ρ(0) = 1/(2πσ_p²); dwell for a
        // mean of 0.5 events.
        let rate = sigma * 100e-12 / ELEMENTARY_CHARGE / (2.0 * PI * sim.probe_sigma().powi(2));
        let dwell = 0.5 / rate;
        assert!(dwell <= 1000.0, "{dwell}");
        let expect = 1.0 - (-0.5f64).exp();
        let n = 3000;
        let mut lost = 0;
        for seed in 0..n {
            sim.reset(seed).unwrap();
            sim.acquire_point(dwell).unwrap();
            lost += usize::from(sim.dopant().is_none());
        }
        let p = lost as f64 / n as f64;
        let sd = (expect * (1.0 - expect) / n as f64).sqrt();
        assert!((p - expect).abs() < 4.0 * sd, "{p} vs {expect}");
    }

    #[test]
    fn haadf_contrast_is_z_to_the_n_and_drift_moves_the_lattice() {
        let cfg = DopantSimConfig {
            shot_noise: false,
            rotation: Param::fixed(0.0),
            drift_velocity: [Param::fixed(1e-11), Param::fixed(-0.5e-11)],
            ..Default::default()
        };
        let mut sim = quiet(cfg);
        let si = sim.dopant().unwrap();
        // A carbon whose neighbours are all carbon.
        let mut far = Vec::new();
        sim.host_sites(si, 6e-10, &mut far);
        let c = *far.iter().find(|p| p[0].hypot(p[1]) > 4e-10).unwrap();
        sim.move_probe(si).unwrap();
        let a = sim.acquire_point(1e-6).unwrap();
        let t = sim.clock();
        let shift = [1e-11 * t, -0.5e-11 * t];
        sim.move_probe([c[0] + shift[0], c[1] + shift[1]]).unwrap();
        let b = sim.acquire_point(1e-6).unwrap();
        // Si/C = (14/6)^1.7 = 4.22; each column also gets its three neighbours' tails
        // (exp(-1.42²/2σ²) ≈ 1 % each), within 5 %.
        let ratio = a / b;
        assert!(
            (ratio / (14.0f64 / 6.0).powf(1.7) - 1.0).abs() < 0.05,
            "{ratio}"
        );
        // After 10 s the dopant has moved with the sheet.
        sim.set_blanked(true).unwrap();
        sim.clock += 10.0;
        let d = sim.dopant().unwrap();
        let t = sim.clock();
        assert!(
            (d[0] - si[0] - 1e-11 * t).abs() < 1e-15 && (d[1] - si[1] + 0.5e-11 * t).abs() < 1e-15
        );
    }

    #[test]
    fn frames_show_the_dopant_brightest_and_are_reproducible() {
        let mut sim = quiet(DopantSimConfig::default());
        let f = sim.acquire_frame().unwrap().image.to_owned();
        assert_eq!(f.dim(), (64, 64));
        assert!(f.iter().all(|v| v.is_finite() && *v >= 0.0));
        // The brightest 3×3 block is at the centre (the dopant at the origin).
        let mut best = (0.0, 0, 0);
        for r in 1..63 {
            for c in 1..63 {
                let s: f32 = (0..3)
                    .flat_map(|i| (0..3).map(move |j| (i, j)))
                    .map(|(i, j)| f[[r + i - 1, c + j - 1]])
                    .sum();
                if s > best.0 {
                    best = (s, r, c);
                }
            }
        }
        assert!(
            (best.1 as i64 - 32).abs() <= 3 && (best.2 as i64 - 32).abs() <= 3,
            "{best:?}"
        );
        let mut again = quiet(DopantSimConfig::default());
        assert_eq!(again.acquire_frame().unwrap().image.to_owned(), f);
        assert!(sim.acquire_spectrum(1.0).is_err());
    }

    #[test]
    fn fast_exponential_is_accurate() {
        let mut worst = 0.0f64;
        for k in -70_000..=70_000 {
            let x = k as f64 * 1e-2;
            worst = worst.max((exp_fast(x) / x.exp() - 1.0).abs());
        }
        assert!(worst < 2e-10, "{worst}");
        assert!(exp_fast(-1e300) >= 0.0 && exp_fast(1e300).is_finite());
        assert_eq!(sample_range(0.0, 1.0, 10, 4.2, 1.5), Some((3, 5)));
        assert_eq!(sample_range(0.0, 1.0, 10, -3.0, 1.5), None);
        assert_eq!(sample_range(0.0, 1.0, 10, 10.0, 1.5), Some((9, 9)));
        assert_eq!(sample_range(0.0, 1.0, 10, f64::NAN, 1.5), None);
    }

    #[test]
    fn separable_frames_and_raster_rates_match_pixel_sums() {
        // A small window off the origin, no shot noise, gain and offset: each pixel is the
        // point expectation; the raster-averaged rates are the pixel sums of the parked rates.
        let cfg = DopantSimConfig {
            shot_noise: false,
            detector_gain: Param::fixed(2.0),
            detector_offset: Param::fixed(3.0),
            energy: Param::fixed(300e3),
            ..Default::default()
        };
        let mut sim = quiet(cfg);
        let s = ScanSettings {
            rows: 11,
            cols: 13,
            pixel_size: 0.37e-10,
            dwell_time: 2e-6,
            flyback_time: 1e-5,
            center: [0.3e-10, -0.2e-10],
        };
        sim.configure_scan(&s).unwrap();
        let n_e = sim.p.current * s.dwell_time / ELEMENTARY_CHARGE;
        let origin = [
            s.center[0] - 6.0 * s.pixel_size,
            s.center[1] - 5.0 * s.pixel_size,
        ];
        let d = sim.pos(sim.site);
        let nb = DopantSimulator::neighbours(sim.site).map(|n| sim.pos(n));
        let share = s.dwell_time / s.frame_time();
        let fast = sim.raster_rates(d, nb, origin, &s, share);
        let mut slow = [0.0; 4];
        for r in 0..s.rows {
            for c in 0..s.cols {
                let b = [
                    origin[0] + c as f64 * s.pixel_size,
                    origin[1] + r as f64 * s.pixel_size,
                ];
                let x = sim.parked_rates(b, d, nb);
                for k in 0..4 {
                    slow[k] += x[k] * share;
                }
            }
        }
        for k in 0..4 {
            assert!(
                slow[k] > 0.0 && (fast[k] / slow[k] - 1.0).abs() < 1e-9,
                "{fast:?} {slow:?}"
            );
        }
        let f = sim.acquire_frame().unwrap().image.to_owned();
        let want = Array2::from_shape_fn((s.rows, s.cols), |(r, c)| {
            let b = [
                origin[0] + c as f64 * s.pixel_size,
                origin[1] + r as f64 * s.pixel_size,
            ];
            2.0 * sim.expected_counts(b, n_e) + 3.0
        });
        let peak = want.iter().fold(0.0f64, |m, &v| m.max(v));
        assert!(peak > 20.0, "{peak}");
        for ((r, c), &w) in want.indexed_iter() {
            let got = f64::from(f[[r, c]]);
            // Frames cut each column 3.5 σ out along each axis, points 4.5 σ out radially.
            assert!((got - w).abs() < 3e-3 * peak, "{r} {c}: {got} {w}");
        }
    }

    #[test]
    fn bad_parameters_name_the_field() {
        let cfg = DopantSimConfig {
            hop_variance: Param::fixed(-1.0),
            ..Default::default()
        };
        let e = DopantSimulator::new(cfg, 0).unwrap_err().to_string();
        assert!(e.contains("hop_variance"), "{e}");
        let mut sim = quiet(DopantSimConfig::default());
        let e = sim.move_probe([f64::NAN, 0.0]).unwrap_err().to_string();
        assert!(e.contains("position"), "{e}");
    }
}
