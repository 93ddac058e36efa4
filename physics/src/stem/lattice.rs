//! A light STEM model for imaging a perfect crystal: HAADF lattice images by Fourier synthesis.
//!
//! [`StemSimulator`] splats every atom of a periodic specimen cell (with its images) and
//! convolves on a padded grid. For a perfect, unbounded crystal the same incoherent image
//! (DESIGN.md §4: columns weighted by `σ_Z ∝ Z^n`, convolved with the probe intensity and the
//! Gaussian source) is periodic, and the probe's transfer is zero beyond `2α/λ`, so the image is
//! a short Fourier series over the reciprocal lattice vectors `g` inside that disc (about twenty
//! pairs for MoS₂ at 60 kV and 30 mrad). By Poisson summation the expected counts at a lab
//! position `r` are
//!
//! `λ(r) = (N_e / A_cell) · Σ_g S_g · P̂(−g) · T(g) · exp(2πi g·(r − d(t)))`
//!
//! with `N_e = I·t_dwell/e` electrons per pixel, `S_g = Σ_j σ_j exp(−2πi g·r_j)` the HAADF
//! structure factor of the cell, `P̂` the Fourier transform of the probe intensity (normalized,
//! `P̂(0) = 1`; computed from the shared [`ProbeModel::fine`], so every aberration,
//! the aperture and the chromatic defocus spread enter as in the full simulator; `P̂(−g)`, the
//! conjugate, because the beam at r lights an atom at r_j with the probe's intensity at
//! `r_j − r`),
//! `T(g) = exp(−2π²σ_s²|g|²)` the source blur ([`ProbeModel::source_transfer`]) and `d(t)` the drift. Pixels are point samples
//! at the probe position. The drift is a constant velocity, applied at each pixel's time
//! (so a frame is sheared as it is scanned); its phase factorizes into row and column parts.
//!
//! A frame then costs one pass of `2·|g|` multiply-adds per pixel plus the counts (Poisson shot
//! noise, detector gain, offset, read noise and salt as in [`DetectorConfig`]); an aberration
//! change costs one probe and one transform of it at the `g` vectors. Frames and points use the
//! [`StemInstrument`] trait like the full simulator; EELS is refused.
//!
//! The model takes the full simulator's [`StemConfig`] and refuses what it cannot represent,
//! naming the field: defects (dopants, vacancies, a grain boundary, contamination), a finite
//! `specimen.size`, a random-walk drift, scan noise, line jitter, mains pickup and sputtering.
//!
//! [`DetectorConfig`]: crate::stem::haadf::DetectorConfig

use crate::constants::ELEMENTARY_CHARGE;
use crate::error::{PhysicsError, Result};
use crate::instrument::{
    Frame, FrameMeta, InstrumentInfo, InstrumentKind, ScanSettings, Spectrum, StemInstrument,
};
use crate::param::{Randomizer, Region};
use crate::rng::{PoissonScratch, SimRng, derive_seed, poisson, seeded};
use crate::stem::optics::{Aberrations, ProbeCalculator, electron_wavelength};
use crate::stem::probe::ProbeModel;
use crate::stem::settings::{DEFLECTION_RANGE, check_scan_settings};
use crate::stem::sim::{StemConfig, StemSimulator};
use ndarray::ArrayView2;
use std::f64::consts::PI;

/// Per beam of a frame: the coefficient of row 0 (complex), the phase step per row (rad and as a
/// phasor), and the running row coefficient.
type RowCoef = ([f64; 2], f64, [f64; 2], [f64; 2]);

/// One reciprocal lattice vector of the synthesis (one of each `±g` pair).
#[derive(Debug, Clone, Copy)]
struct Beam {
    /// The vector, 1/m.
    g: [f64; 2],
    /// Structure factor `S_g`, m² (complex: re, im).
    s: [f64; 2],
    /// `P̂(−g)·T(g)` of the probe in force.
    transfer: [f64; 2],
}

/// A perfect crystal imaged by HAADF STEM through Fourier synthesis (see the module docs).
#[derive(Debug)]
pub struct LatticeSimulator {
    template: Randomizer<StemConfig>,
    /// This episode's drawn parameters, by dotted config key (SI units).
    drawn: Vec<(String, f64)>,
    region: Region,
    cfg: StemConfig,
    seed: u64,
    rng_noise: SimRng,
    scan: ScanSettings,
    aberrations: Aberrations,
    probe_dirty: bool,
    probe_calc: ProbeCalculator,
    /// Cell area, m².
    cell_area: f64,
    /// `S_0 = Σ_j σ_j`, m².
    s0: f64,
    /// Half of the `g` vectors inside the transfer disc (`g` and `−g` enter as `2·Re`).
    beams: Vec<Beam>,
    /// Drift velocity, m/s.
    drift_velocity: [f64; 2],
    clock: f64,
    probe_pos: [f64; 2],
    blanked: bool,
    frames: u64,
    /// Column phasors `exp(2πi g·Δ_col j)` per beam, real and imaginary parts (`beams × cols`).
    col_re: Vec<f32>,
    col_im: Vec<f32>,
    /// Per beam: the coefficient of row 0, the phase step per row (rad and as a phasor), and
    /// the running row coefficient.
    rows_coef: Vec<RowCoef>,
    /// Probe-transform scratch: phasors along one axis and the row sums.
    ex_re: Vec<f32>,
    ex_im: Vec<f32>,
    ey_re: Vec<f32>,
    ey_im: Vec<f32>,
    /// Column sums of the probe transform (real parts, then imaginary parts).
    col_acc: Vec<f32>,
    /// The probe intensity in single precision (its transform is summed in f32 lanes).
    intensity: Vec<f32>,
    noiseless: Vec<f32>,
    image: Vec<f32>,
    poisson: PoissonScratch,
    /// Frame pixels expecting this many counts or more draw their shot noise from the
    /// approximation of [`crate::rng::poisson_fill_approx`]; infinite (the default): exact.
    shot_noise_approx_from: f32,
}

impl LatticeSimulator {
    /// A simulator for `config`, seeded with `seed` (drawing the randomized parameters).
    pub fn new(config: StemConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut sim = Self {
            cfg: config.clone(),
            template: {
                let t = Randomizer::new(config)?;
                t.check_support(Self::check_drawn)?;
                t
            },
            drawn: Vec::new(),
            region: Region::All,
            seed,
            rng_noise: seeded(0),
            scan: ScanSettings {
                rows: 1,
                cols: 1,
                pixel_size: 1e-10,
                dwell_time: 1e-6,
                flyback_time: 0.0,
                center: [0.0, 0.0],
            },
            aberrations: Aberrations::default(),
            probe_dirty: true,
            probe_calc: ProbeCalculator::new(),
            cell_area: 1.0,
            s0: 0.0,
            beams: Vec::new(),
            drift_velocity: [0.0, 0.0],
            clock: 0.0,
            probe_pos: [0.0, 0.0],
            blanked: false,
            frames: 0,
            col_re: Vec::new(),
            col_im: Vec::new(),
            rows_coef: Vec::new(),
            ex_re: Vec::new(),
            ex_im: Vec::new(),
            ey_re: Vec::new(),
            ey_im: Vec::new(),
            col_acc: Vec::new(),
            intensity: Vec::new(),
            noiseless: Vec::new(),
            image: Vec::new(),
            poisson: PoissonScratch::default(),
            shot_noise_approx_from: f32::INFINITY,
        };
        sim.reset(seed)?;
        Ok(sim)
    }

    /// Shot noise of frames (opt-in, the `fidelity = "fast"` of StemAutofocus): pixels
    /// expecting `counts` or more (at least [`crate::rng::APPROX_MIN_MEAN`]) are drawn from the
    /// rounded Cornish-Fisher approximation of the Poisson distribution
    /// ([`crate::rng::poisson_fill_approx`]: total variation below 0.004, variance within
    /// 0.3 %), a few times cheaper than the exact draws; `f64::INFINITY` (the default) draws
    /// every count exactly. Point exposures stay exact.
    pub fn set_shot_noise_approx_from(&mut self, counts: f64) {
        self.shot_noise_approx_from = if counts.is_nan() {
            f32::INFINITY
        } else {
            counts as f32
        };
    }

    /// Starts a new session with `seed`: redraws the randomized parameters (rotation, lattice
    /// constant, optics, ...), zeroes the clock, the drift and the frame counter.
    pub fn reset(&mut self, seed: u64) -> Result<()> {
        let (cfg, drawn) = self.template.draw_valid(
            &mut seeded(derive_seed(seed, "params")),
            self.region,
            Self::check_drawn,
        )?;
        let sp = &cfg.specimen;
        let a = sp.lattice_constant.get();
        let a = if a > 0.0 {
            a
        } else {
            sp.crystal.default_lattice_constant()
        };
        let cell = sp.unit_cell(a, sp.rotation.get())?.ok_or_else(|| {
            PhysicsError::param(
                "specimen.crystal",
                "the lattice model needs a crystal, not \"none\"",
            )
        })?;
        let sigma = cfg.detector.cross_sections();
        let lambda = electron_wavelength(cfg.optics.energy.get());
        let g_max = 2.0 * cfg.optics.convergence_angle.get() / lambda;
        let (b1, b2) = cell.reciprocal();
        // Index range covering the disc |g| ≤ g_max: |h| ≤ g_max·|a1| and |k| ≤ g_max·|a2|.
        let n1 = (g_max * cell.a1[0].hypot(cell.a1[1])).ceil() as i64 + 1;
        let n2 = (g_max * cell.a2[0].hypot(cell.a2[1])).ceil() as i64 + 1;
        self.beams.clear();
        for h in 0..=n1 {
            for k in -n2..=n2 {
                // One of each ±g pair, g = 0 apart.
                if h == 0 && k <= 0 {
                    continue;
                }
                let g = [
                    h as f64 * b1[0] + k as f64 * b2[0],
                    h as f64 * b1[1] + k as f64 * b2[1],
                ];
                if g[0].hypot(g[1]) > g_max {
                    continue;
                }
                let mut s = [0.0, 0.0];
                for &(f, _, z) in &cell.basis {
                    let r = cell.position(f);
                    let w = sigma.get(usize::from(z)).copied().unwrap_or(0.0);
                    let (sn, cs) = (-2.0 * PI * (g[0] * r[0] + g[1] * r[1])).sin_cos();
                    s[0] += w * cs;
                    s[1] += w * sn;
                }
                self.beams.push(Beam {
                    g,
                    s,
                    transfer: [0.0, 0.0],
                });
            }
        }
        self.s0 = cell
            .basis
            .iter()
            .map(|&(_, _, z)| sigma.get(usize::from(z)).copied().unwrap_or(0.0))
            .sum();
        self.cell_area = cell.area();
        let (v, dir) = (cfg.drift.speed.get(), cfg.drift.direction.get());
        self.drift_velocity = [v * dir.cos(), v * dir.sin()];
        self.scan = StemSimulator::scan_from(&cfg);
        self.aberrations = cfg.optics.aberrations();
        self.cfg = cfg;
        self.drawn = drawn;
        self.seed = seed;
        self.rng_noise = seeded(derive_seed(seed, "noise"));
        self.probe_dirty = true;
        self.clock = 0.0;
        self.probe_pos = [0.0, 0.0];
        self.blanked = false;
        self.frames = 0;
        Ok(())
    }

    /// The checks every drawn config must pass: the config's own and
    /// [`Self::check_representable`].
    fn check_drawn(cfg: &StemConfig) -> Result<()> {
        cfg.validate()?;
        Self::check_representable(cfg)
    }

    /// Refuses what the Fourier synthesis of a perfect, unbounded crystal cannot represent.
    fn check_representable(cfg: &StemConfig) -> Result<()> {
        let refuse = |field: &str, what: &str| {
            Err(PhysicsError::param(
                field,
                format!("the lattice model images a perfect, unbounded crystal: {what}"),
            ))
        };
        let sp = &cfg.specimen;
        if !sp.dopants.is_empty() {
            return refuse("specimen.dopants", "no dopants");
        }
        if sp.vacancies.get() != 0.0 {
            return refuse("specimen.vacancies", "must be 0");
        }
        if sp.grain_boundary.is_some() {
            return refuse("specimen.grain_boundary", "no grain boundary");
        }
        if sp.contamination.is_some() {
            return refuse("specimen.contamination", "no contamination");
        }
        if sp.size.iter().any(|s| s.get() != 0.0) {
            return refuse("specimen.size", "leave it 0 (unbounded)");
        }
        if cfg.drift.diffusivity.get() != 0.0 {
            return refuse("drift.diffusivity", "constant drift only (0 here)");
        }
        let n = &cfg.scan_noise;
        for (field, v) in [
            ("scan_noise.rms", n.rms.get()),
            ("scan_noise.jitter_pixels", n.jitter_pixels.get()),
            ("scan_noise.mains_amplitude", n.mains_amplitude.get()),
        ] {
            if v != 0.0 {
                return refuse(field, "no scan distortions (0 here)");
            }
        }
        if cfg.damage.sputtering {
            return refuse("damage.sputtering", "no damage (false here)");
        }
        if let Some(e) = cfg.opt_in_effects().first() {
            return refuse(e.field(), e.off());
        }
        Ok(())
    }

    /// The configuration as given (distributions unresolved).
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

    /// The configuration in force (distributions drawn for this session).
    pub fn config(&self) -> &StemConfig {
        &self.cfg
    }

    /// The noiseless recorded signal of the last frame (expected counts after gain and offset,
    /// like [`StemSimulator::last_noiseless`]), `rows × cols`.
    pub fn last_noiseless(&self) -> ArrayView2<'_, f32> {
        let s = self.scan;
        ArrayView2::from_shape((s.rows, s.cols), &self.noiseless[..s.rows * s.cols])
            .expect("buffer sized to the scan")
    }

    /// Number of `±g` pairs in the synthesis.
    pub fn beam_pairs(&self) -> usize {
        self.beams.len()
    }

    /// Recomputes `P̂(−g)·T(g)` for every beam if the optics changed.
    fn ensure_probe(&mut self) {
        if !self.probe_dirty {
            return;
        }
        let model = ProbeModel::new(&self.cfg.optics, self.aberrations);
        // The probe grid of the full simulator's kernel for this scan: it resolves the probe
        // (fine pixel ≤ λ/4α, so P̂ is not aliased below 2α/λ) and holds it (geometric blur +
        // 3 λ/α), up to the field of view (a probe wider than the field gives a featureless
        // frame either way).
        let dx = self.scan.pixel_size;
        let extent = dx * self.scan.rows.max(self.scan.cols).max(16) as f64;
        let (n, fdx) = model.fine(&mut self.probe_calc, dx, extent);
        self.intensity.clear();
        self.intensity
            .extend(self.probe_calc.intensity().iter().map(|&v| v as f32));
        let inten = &self.intensity;
        let c = (n / 2) as f64;
        self.ex_re.resize(n, 0.0);
        self.ex_im.resize(n, 0.0);
        self.ey_re.resize(n, 0.0);
        self.ey_im.resize(n, 0.0);
        self.col_acc.resize(2 * n, 0.0);
        for b in &mut self.beams {
            // P̂(g) = Σ_{y,x} I[y][x] exp(−2πi g·((x − c), (y − c))·fdx).
            phasors(
                -2.0 * PI * b.g[0] * fdx,
                -c,
                &mut self.ex_re,
                &mut self.ex_im,
            );
            phasors(
                -2.0 * PI * b.g[1] * fdx,
                -c,
                &mut self.ey_re,
                &mut self.ey_im,
            );
            let [re, im] = probe_transform(
                inten,
                [&self.ex_re, &self.ex_im],
                [&self.ey_re, &self.ey_im],
                &mut self.col_acc,
            );
            let g2 = b.g[0] * b.g[0] + b.g[1] * b.g[1];
            let t = model.source_transfer(g2);
            // P̂(−g) = conj P̂(g): the image is the lattice convolved with the reflected probe.
            b.transfer = [re * t, -im * t];
        }
        self.probe_dirty = false;
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

    /// Drift displacement of the crystal at time `t`, m.
    fn drift(&self, t: f64) -> [f64; 2] {
        [self.drift_velocity[0] * t, self.drift_velocity[1] * t]
    }

    /// Expected counts with the probe at lab position `r` at time `t` for `n_e` electrons.
    fn expected_at(&self, r: [f64; 2], t: f64, n_e: f64) -> f64 {
        let d = self.drift(t);
        let mut acc = self.s0;
        for b in &self.beams {
            let (sn, cs) = (2.0 * PI * (b.g[0] * (r[0] - d[0]) + b.g[1] * (r[1] - d[1]))).sin_cos();
            let c = cmul(cmul(b.s, b.transfer), [cs, sn]);
            acc += 2.0 * c[0];
        }
        (n_e / self.cell_area * acc).max(0.0)
    }

    /// Fills `noiseless` with the expected counts of a frame starting at the clock.
    fn synthesize(&mut self, n_e: f64) {
        let sc = self.scan;
        let (rows, cols) = (sc.rows, sc.cols);
        let line = cols as f64 * sc.dwell_time + sc.flyback_time;
        // Pixel (i, j) sits at r00 + (j, i)·dx and is visited at t0 + i·line + j·dwell.
        let r00 = [
            sc.center[0] - 0.5 * (cols as f64 - 1.0) * sc.pixel_size,
            sc.center[1] - 0.5 * (rows as f64 - 1.0) * sc.pixel_size,
        ];
        let d0 = self.drift(self.clock);
        let v = self.drift_velocity;
        let nb = self.beams.len();
        self.col_re.resize(nb * cols, 0.0);
        self.col_im.resize(nb * cols, 0.0);
        let scale = n_e / self.cell_area;
        // Per beam: the column phasors, and the coefficient of row 0 with its per-row step.
        self.rows_coef.clear();
        for (k, b) in self.beams.iter().enumerate() {
            let g = b.g;
            let gv = g[0] * v[0] + g[1] * v[1];
            let col_step = 2.0 * PI * (g[0] * sc.pixel_size - gv * sc.dwell_time);
            let row_step = 2.0 * PI * (g[1] * sc.pixel_size - gv * line);
            let phase0 = 2.0 * PI * (g[0] * (r00[0] - d0[0]) + g[1] * (r00[1] - d0[1]));
            let c = cmul(cmul(b.s, b.transfer), cis(phase0));
            let c0 = [2.0 * scale * c[0], 2.0 * scale * c[1]];
            self.rows_coef.push((c0, row_step, cis(row_step), c0));
            let (re, im) = (
                &mut self.col_re[k * cols..(k + 1) * cols],
                &mut self.col_im[k * cols..(k + 1) * cols],
            );
            let step = cis(col_step);
            let mut p = [1.0, 0.0];
            for (j, (r, i)) in re.iter_mut().zip(im.iter_mut()).enumerate() {
                // Re-anchored every 64 pixels so the recurrence's rounding cannot build up.
                if j % 64 == 0 {
                    p = cis(col_step * j as f64);
                }
                (*r, *i) = (p[0] as f32, p[1] as f32);
                p = cmul(p, step);
            }
        }
        let mean = (scale * self.s0) as f32;
        self.noiseless.resize(rows * cols, 0.0);
        synthesize_rows(
            &mut self.noiseless,
            cols,
            mean,
            &mut self.rows_coef,
            &self.col_re,
            &self.col_im,
        );
    }

    /// Counts, gain, offset, read noise and salt from `noiseless` into `image` (gain and
    /// offset are applied to `noiseless` too, as the full simulator does).
    fn record(&mut self) {
        self.image.resize(self.noiseless.len(), 0.0);
        let det = &self.cfg.detector;
        det.count_approx_from(
            &mut self.rng_noise,
            &mut self.noiseless,
            &mut self.image,
            &mut self.poisson,
            self.shot_noise_approx_from,
        );
        det.add_read_noise_and_salt(&mut self.rng_noise, &mut self.image);
    }
}

/// Fills the rows of `out` (`cols` wide): `mean + Σ_beams Re(a_k(i) · col_k[j])`, with the row
/// coefficient `a_k(i) = c0_k · step_k^i` advanced by recurrence (re-anchored every 64 rows) and
/// the column phasors `col_k` (`col_re`, `col_im`, beams × cols). Clipped at 0. One call per
/// frame, AVX2 selected at run time.
#[multiversion::multiversion(targets("x86_64+avx2"))]
fn synthesize_rows(
    out: &mut [f32],
    cols: usize,
    mean: f32,
    coef: &mut [RowCoef],
    col_re: &[f32],
    col_im: &[f32],
) {
    for (i, row) in out.chunks_exact_mut(cols).enumerate() {
        row.fill(mean);
        for (k, (c0, row_step, step, a)) in coef.iter_mut().enumerate() {
            if i % 64 == 0 {
                *a = cmul(*c0, cis(*row_step * i as f64));
            }
            let (ar, ai) = (a[0] as f32, a[1] as f32);
            let (re, im) = (
                &col_re[k * cols..(k + 1) * cols],
                &col_im[k * cols..(k + 1) * cols],
            );
            for ((o, &r), &m) in row.iter_mut().zip(re).zip(im) {
                *o += ar * r - ai * m;
            }
            *a = cmul(*a, *step);
        }
        // Rounding can leave tiny negatives where the image is dark.
        row.iter_mut().for_each(|x| *x = x.max(0.0));
    }
}

/// `exp(i·phi)` as `[re, im]`.
fn cis(phi: f64) -> [f64; 2] {
    let (s, c) = phi.sin_cos();
    [c, s]
}

fn cmul(a: [f64; 2], b: [f64; 2]) -> [f64; 2] {
    [a[0] * b[0] - a[1] * b[1], a[0] * b[1] + a[1] * b[0]]
}

/// `exp(i·w·(x + x0))` for every `x` into `re`, `im` (computed in f64 by recurrence,
/// re-anchored every 64 entries).
fn phasors(w: f64, x0: f64, re: &mut [f32], im: &mut [f32]) {
    let step = cis(w);
    let mut p = [1.0, 0.0];
    for (x, (r, i)) in re.iter_mut().zip(im.iter_mut()).enumerate() {
        if x % 64 == 0 {
            p = cis(w * (x as f64 + x0));
        }
        (*r, *i) = (p[0] as f32, p[1] as f32);
        p = cmul(p, step);
    }
}

/// `Σ_{y,x} img[y][x] · ex[x] · ey[y]` for a square `n × n` image (`n = ex[0].len()`) and
/// complex phasors `ex`, `ey` given as (re, im) parts: the image is first summed down its
/// columns against `ey` (whole rows of single-precision lanes at a time, AVX2 at run time, no
/// reduction per row), then the column sums against `ex` in f64. `acc` is scratch of `2n`.
#[multiversion::multiversion(targets("x86_64+avx2"))]
fn probe_transform(img: &[f32], ex: [&[f32]; 2], ey: [&[f32]; 2], acc: &mut [f32]) -> [f64; 2] {
    let n = ex[0].len();
    let (cr, ci) = acc[..2 * n].split_at_mut(n);
    cr.fill(0.0);
    ci.fill(0.0);
    for ((line, &yr), &yi) in img.chunks_exact(n).zip(ey[0]).zip(ey[1]) {
        for ((r, i), &v) in cr.iter_mut().zip(ci.iter_mut()).zip(line) {
            *r += v * yr;
            *i += v * yi;
        }
    }
    let (mut re, mut im) = (0.0f64, 0.0f64);
    for (((&r, &i), &xr), &xi) in cr.iter().zip(ci.iter()).zip(ex[0]).zip(ex[1]) {
        let (r, i, xr, xi) = (f64::from(r), f64::from(i), f64::from(xr), f64::from(xi));
        re += r * xr - i * xi;
        im += r * xi + i * xr;
    }
    [re, im]
}

impl StemInstrument for LatticeSimulator {
    fn info(&self) -> InstrumentInfo {
        InstrumentInfo {
            name: "scopegym STEM lattice model".into(),
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
        // The probe grid depends on the pixel size and, through its largest extent, the frame.
        if (request.rows, request.cols, request.pixel_size)
            != (self.scan.rows, self.scan.cols, self.scan.pixel_size)
        {
            self.probe_dirty = true;
        }
        self.scan = *request;
        Ok(self.scan)
    }

    fn acquire_frame(&mut self) -> Result<Frame<'_>> {
        self.check_beam("acquire_frame")?;
        self.ensure_probe();
        let sc = self.scan;
        let n_e = self.beam_current() * sc.dwell_time / ELEMENTARY_CHARGE;
        self.synthesize(n_e);
        self.record();
        let meta = FrameMeta {
            index: self.frames,
            t_start: self.clock,
            duration: sc.frame_time(),
            electrons_per_pixel: n_e,
            dose: n_e / (sc.pixel_size * sc.pixel_size),
        };
        self.clock += sc.frame_time();
        self.frames += 1;
        Ok(Frame {
            image: ArrayView2::from_shape((sc.rows, sc.cols), &self.image[..sc.rows * sc.cols])
                .expect("buffer sized to the scan"),
            meta,
        })
    }

    fn probe_position(&self) -> [f64; 2] {
        self.probe_pos
    }

    fn move_probe(&mut self, position: [f64; 2]) -> Result<()> {
        if !position
            .iter()
            .all(|v| v.is_finite() && v.abs() <= DEFLECTION_RANGE)
        {
            return Err(PhysicsError::arg(
                "position",
                format!("must be finite and within ±{DEFLECTION_RANGE} m, got {position:?}"),
            ));
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
        self.ensure_probe();
        let n_e = self.beam_current() * dwell_time / ELEMENTARY_CHARGE;
        let lam = self.expected_at(self.probe_pos, self.clock, n_e);
        self.clock += dwell_time;
        let det = &self.cfg.detector;
        let counts = if det.shot_noise {
            poisson(&mut self.rng_noise, lam)
        } else {
            lam
        };
        Ok(det.gain.get() * counts + det.offset.get())
    }

    fn acquire_spectrum(&mut self, _exposure: f64) -> Result<Spectrum<'_>> {
        Err(PhysicsError::Refused {
            operation: "acquire_spectrum".into(),
            reason: "the lattice model has no EELS; use StemSimulator".into(),
        })
    }

    fn aberrations(&self) -> Aberrations {
        self.aberrations
    }

    fn set_aberrations(&mut self, aberrations: &Aberrations) -> Result<Aberrations> {
        aberrations.validate("aberrations.")?;
        if *aberrations != self.aberrations {
            self.aberrations = *aberrations;
            self.probe_dirty = true;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::param::Param;
    use crate::stem::specimen::{Crystal, DopantConfig};

    /// MoS₂ rotated by 0.3 rad, 64² pixels of 0.25 Å, C10 = 2 nm, C12 = 1 nm, no distortions,
    /// no damage.
    fn config(shot_noise: bool) -> StemConfig {
        let mut c = StemConfig::default().without_scan_distortions();
        c.specimen.crystal = Crystal::Mos2;
        c.specimen.rotation = Param::fixed(0.3);
        c.scan.pixels = [64, 64];
        c.scan.pixel_size = Param::fixed(0.25e-10);
        c.scan.dwell_time = Param::fixed(2e-6);
        c.optics.c10 = Param::fixed(2e-9);
        c.optics.c12 = Param::fixed(1e-9);
        c.damage.sputtering = false;
        c.detector.shot_noise = shot_noise;
        c
    }

    fn noiseless(sim: &mut LatticeSimulator) -> Vec<f64> {
        sim.acquire_frame().unwrap();
        sim.last_noiseless().iter().map(|&v| f64::from(v)).collect()
    }

    fn mean_std(v: &[f64]) -> (f64, f64) {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
        (m, var.sqrt())
    }

    #[test]
    fn matches_the_full_simulator_on_a_perfect_crystal() {
        // The full simulator splats a periodic cell (with its images) bilinearly, bins the
        // probe over each pixel and convolves on a padded grid; inside the field the images
        // agree up to the blur of its splat and binning (a few % of the contrast).
        let cfg = config(false);
        let mut full = StemSimulator::new(cfg.clone(), 1).unwrap();
        full.acquire_frame().unwrap();
        let a: Vec<f64> = full
            .last_noiseless()
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let mut light = LatticeSimulator::new(cfg, 1).unwrap();
        let b = noiseless(&mut light);
        let ((ma, sa), (mb, sb)) = (mean_std(&a), mean_std(&b));
        let cov = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - ma) * (y - mb))
            .sum::<f64>()
            / a.len() as f64;
        let corr = cov / (sa * sb);
        let peak = a.iter().copied().fold(0.0, f64::max);
        let dev = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!((ma / mb - 1.0).abs() < 1e-3, "means {ma} vs {mb}");
        assert!(corr > 0.999, "correlation {corr}");
        assert!(sb >= sa && sb < 1.05 * sa, "contrast {sb} vs {sa}");
        assert!(
            dev < 0.06 * peak,
            "max |full - lattice| = {dev} of peak {peak}"
        );
    }

    #[test]
    fn mean_counts_are_the_cross_sections_per_cell_area() {
        // Graphene: two carbon atoms per cell of area (√3/2)·a².
        let mut c = config(false);
        c.specimen.crystal = Crystal::Graphene;
        c.scan.pixels = [128, 128];
        let mut sim = LatticeSimulator::new(c.clone(), 0).unwrap();
        let img = noiseless(&mut sim);
        let a = 2.46e-10;
        let n_e = 100e-12 * 2e-6 / ELEMENTARY_CHARGE;
        let sigma_c = c.detector.carbon_cross_section.get();
        let expected = n_e * 2.0 * sigma_c / (0.5 * 3f64.sqrt() * a * a);
        let (m, _) = mean_std(&img);
        // A 32 Å window holds a whole number of cells only approximately.
        assert!((m / expected - 1.0).abs() < 0.01, "mean {m} vs {expected}");
    }

    #[test]
    fn defocus_lowers_the_contrast() {
        let mut sim = LatticeSimulator::new(config(false), 0).unwrap();
        let mut last = f64::INFINITY;
        for c10 in [0.0, 2e-9, 4e-9, 8e-9] {
            let mut ab = sim.aberrations();
            ab.c10 = c10;
            ab.c12 = 0.0;
            sim.set_aberrations(&ab).unwrap();
            let (m, s) = mean_std(&noiseless(&mut sim));
            let nv = (s / m).powi(2);
            assert!(
                nv < last,
                "C10 = {c10}: normalized variance {nv} not below {last}"
            );
            last = nv;
        }
    }

    #[test]
    fn drift_carries_the_lattice_at_its_velocity() {
        let mut c = config(false);
        c.drift.speed = Param::fixed(2e-10);
        c.drift.direction = Param::fixed(0.7);
        let mut sim = LatticeSimulator::new(c, 0).unwrap();
        let v = [2e-10 * 0.7f64.cos(), 2e-10 * 0.7f64.sin()];
        let p0 = [0.3e-10, -0.2e-10];
        sim.move_probe(p0).unwrap();
        let first = sim.acquire_point(0.5).unwrap();
        // After 0.5 s the crystal moved by v·0.5: the same spot of it is there.
        let t = sim.clock();
        sim.move_probe([p0[0] + v[0] * t, p0[1] + v[1] * t])
            .unwrap();
        let later = sim.acquire_point(0.5).unwrap();
        assert!((later / first - 1.0).abs() < 1e-9, "{later} vs {first}");
        // And not where it was (the lattice moved by 0.1 Å, the image varies on that scale).
        sim.move_probe(p0).unwrap();
        let stale = sim.acquire_point(0.5).unwrap();
        assert!((stale / first - 1.0).abs() > 1e-3, "{stale} vs {first}");
    }

    #[test]
    fn shot_noise_averages_to_the_expectation_and_seeds_reproduce() {
        let mut a = LatticeSimulator::new(config(true), 5).unwrap();
        let f1: Vec<f32> = a.acquire_frame().unwrap().image.iter().copied().collect();
        let lam: Vec<f64> = a.last_noiseless().iter().map(|&v| f64::from(v)).collect();
        let total: f64 = lam.iter().sum();
        let counts: f64 = f1.iter().map(|&v| f64::from(v)).sum();
        assert!(
            (counts - total).abs() < 5.0 * total.sqrt(),
            "{counts} vs {total}"
        );
        let mut b = LatticeSimulator::new(config(true), 5).unwrap();
        let f2: Vec<f32> = b.acquire_frame().unwrap().image.iter().copied().collect();
        assert_eq!(f1, f2);
        let mut c = LatticeSimulator::new(config(true), 6).unwrap();
        let f3: Vec<f32> = c.acquire_frame().unwrap().image.iter().copied().collect();
        assert_ne!(f1, f3);
    }

    #[test]
    fn what_it_cannot_represent_is_refused_by_name() {
        let mut c = config(false);
        c.specimen.dopants = vec![DopantConfig::default()];
        let e = LatticeSimulator::new(c, 0).unwrap_err().to_string();
        assert!(e.contains("specimen.dopants"), "{e}");
        let mut c = config(false);
        c.specimen.size = [Param::fixed(2e-9), Param::fixed(2e-9)];
        let e = LatticeSimulator::new(c, 0).unwrap_err().to_string();
        assert!(e.contains("specimen.size"), "{e}");
        let mut c = config(false);
        c.drift.diffusivity = Param::fixed(1e-22);
        let e = LatticeSimulator::new(c, 0).unwrap_err().to_string();
        assert!(e.contains("drift.diffusivity"), "{e}");
        let mut c = config(false);
        c.damage.sputtering = true;
        let e = LatticeSimulator::new(c, 0).unwrap_err().to_string();
        assert!(e.contains("damage.sputtering"), "{e}");
        let mut c = config(false);
        c.scan_distortion.rotation = Param::uniform(-0.01, 0.01);
        let e = LatticeSimulator::new(c, 0).unwrap_err().to_string();
        assert!(e.contains("scan_distortion"), "{e}");
        let mut c = config(false);
        c.damage.contamination_rate = Param::fixed(1e-34);
        let e = LatticeSimulator::new(c, 0).unwrap_err().to_string();
        assert!(e.contains("damage.contamination_rate"), "{e}");
        let mut c = config(false);
        c.beam.current_fluctuation = Param::fixed(0.05);
        let e = LatticeSimulator::new(c, 0).unwrap_err().to_string();
        assert!(e.contains("beam.current_fluctuation"), "{e}");
        let mut c = config(false);
        c.aberration_drift.rates.c10 = 1e-11;
        let e = LatticeSimulator::new(c, 0).unwrap_err().to_string();
        assert!(e.contains("aberration_drift"), "{e}");
        let mut c = config(false);
        c.depth_of_focus.enabled = true;
        let e = LatticeSimulator::new(c, 0).unwrap_err().to_string();
        assert!(e.contains("depth_of_focus.enabled"), "{e}");
        let mut c = config(false);
        c.specimen.tilt[1] = Param::fixed(0.01);
        let e = LatticeSimulator::new(c, 0).unwrap_err().to_string();
        assert!(e.contains("specimen.tilt"), "{e}");
        let mut sim = LatticeSimulator::new(config(false), 0).unwrap();
        assert!(sim.acquire_spectrum(1.0).is_err());
        sim.set_blanked(true).unwrap();
        assert!(sim.acquire_frame().is_err());
    }
}
