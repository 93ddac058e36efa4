//! HAADF image formation in the incoherent approximation.
//!
//! Each atom contributes a scattering cross-section `σ(Z) = σ_C (Z/6)^n` (n = 1.7 by default)
//! placed at its sub-pixel position by a bilinear splat; the splat is convolved with the
//! reflected probe intensity (FFT) and a Gaussian source-size blur. With `N = I·t_dwell/e`
//! electrons per pixel the expected detector counts with the beam at r are
//! `N · Σ_atoms σ_a P(r_a − r)`, P the effective probe intensity per unit area about the probe
//! centre (∫P = 1): the beam at r lights the atom at r_a with the probe's intensity at the
//! atom's offset (so an asymmetric probe, e.g. with coma, images each atom reflected through
//! it). [`HaadfRenderer::effective_probe`] gives P on the pixel grid for point exposures. The
//! recorded frame resamples this ideal image along the distorted scan path, draws Poisson
//! counts, and applies detector gain, offset, read noise and salt noise.

use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::{Area, Unitless};
use crate::rng::{PoissonScratch, SimRng, normal, poisson_fill_approx};
use crate::stem::fft2::Fft2;
use crate::stem::optics::next_fast_len;
use crate::stem::probe::source_transfer;
use crate::stem::scan::Distortion;
use crate::stem::specimen::{Atom, AtomIndex, Specimen};
use num_complex::Complex;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// HAADF detector settings (`[detector]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorConfig {
    /// Exponent n of the Z^n contrast. Default 1.7 (physically 1.4-2.0).
    pub haadf_exponent: Param<Unitless>,
    /// HAADF cross-section of one carbon atom (detector geometry included), m².
    /// Default 5e-23 m² (0.005 Å²: about 10 counts on a carbon atom at 2500 e⁻ per pixel).
    pub carbon_cross_section: Param<Area>,
    /// Output units per detected electron. Default 1.
    pub gain: Param<Unitless>,
    /// Constant added to every pixel, output units. Default 0.
    pub offset: Param<Unitless>,
    /// Gaussian read noise, standard deviation in output units. Default 0.
    pub read_noise: Param<Unitless>,
    /// Probability that a pixel is replaced by a saturated (salt) value. Default 0.
    pub salt_probability: Param<Unitless>,
    /// Value of a salt pixel, output units. Default 65535.
    pub salt_value: Param<Unitless>,
    /// Whether counts are Poisson-sampled (false: the frame is the expectation). Default true.
    pub shot_noise: bool,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            haadf_exponent: Param::fixed(1.7),
            carbon_cross_section: Param::fixed(5e-23),
            gain: Param::fixed(1.0),
            offset: Param::fixed(0.0),
            read_noise: Param::fixed(0.0),
            salt_probability: Param::fixed(0.0),
            salt_value: Param::fixed(65535.0),
            shot_noise: true,
        }
    }
}

impl DetectorConfig {
    /// Records expected counts `lam` (a row or a whole frame) into `out`: Poisson counts (the
    /// expectation itself without shot noise), then gain and offset, which are applied to `lam`
    /// as well (it becomes the noiseless recorded signal). Read noise and salt follow over the
    /// whole frame ([`Self::add_read_noise_and_salt`]).
    pub fn count(
        &self,
        rng: &mut SimRng,
        lam: &mut [f32],
        out: &mut [f32],
        scratch: &mut PoissonScratch,
    ) {
        self.count_approx_from(rng, lam, out, scratch, f32::INFINITY);
    }

    /// [`Self::count`] with the shot noise of means of `approx_from` counts or more drawn from
    /// the rounded Cornish-Fisher approximation of [`poisson_fill_approx`] (a light model:
    /// `f32::INFINITY` draws every count exactly, as `count` does).
    pub fn count_approx_from(
        &self,
        rng: &mut SimRng,
        lam: &mut [f32],
        out: &mut [f32],
        scratch: &mut PoissonScratch,
        approx_from: f32,
    ) {
        if self.shot_noise {
            poisson_fill_approx(rng, lam, out, scratch, approx_from);
        } else {
            out.copy_from_slice(lam);
        }
        let (gain, offset) = (self.gain.get() as f32, self.offset.get() as f32);
        for (f, e) in out.iter_mut().zip(lam.iter_mut()) {
            *f = gain * *f + offset;
            *e = gain * *e + offset;
        }
    }

    /// Adds Gaussian read noise and replaces pixels by the salt value with the salt
    /// probability, over a recorded frame, in that order.
    pub fn add_read_noise_and_salt(&self, rng: &mut SimRng, frame: &mut [f32]) {
        let read = self.read_noise.get();
        if read > 0.0 {
            for f in frame.iter_mut() {
                *f += (read * normal(rng)) as f32;
            }
        }
        let salt = self.salt_probability.get();
        if salt > 0.0 {
            let v = self.salt_value.get() as f32;
            for f in frame.iter_mut() {
                if rng.random::<f64>() < salt {
                    *f = v;
                }
            }
        }
    }

    /// Checks ranges; `prefix` is prepended to field names in errors.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let n = self.haadf_exponent.get();
        if !(0.5..=3.0).contains(&n) {
            return Err(PhysicsError::param(
                format!("{prefix}haadf_exponent"),
                format!("must be in [0.5, 3] (physically 1.4-2.0), got {n}"),
            ));
        }
        let s = self.carbon_cross_section.get();
        if !(s > 0.0 && s < 1e-18) {
            return Err(PhysicsError::param(
                format!("{prefix}carbon_cross_section"),
                format!("must be in (0, 100 Å²), got {s} m²"),
            ));
        }
        let checks = [
            ("gain", self.gain.get(), 0.0, 1e9),
            ("offset", self.offset.get(), -1e9, 1e9),
            ("read_noise", self.read_noise.get(), 0.0, 1e9),
            ("salt_probability", self.salt_probability.get(), 0.0, 1.0),
            ("salt_value", self.salt_value.get(), -1e12, 1e12),
        ];
        for (name, v, lo, hi) in checks {
            if !(v >= lo && v <= hi) {
                return Err(PhysicsError::param(
                    format!("{prefix}{name}"),
                    format!("must be in [{lo}, {hi}], got {v}"),
                ));
            }
        }
        if self.gain.get() <= 0.0 {
            return Err(PhysicsError::param(format!("{prefix}gain"), "must be > 0"));
        }
        Ok(())
    }

    /// Cross-section per atomic number, m²: `σ_C (Z/6)^n`.
    pub fn cross_sections(&self) -> [f64; 93] {
        let n = self.haadf_exponent.get();
        let s = self.carbon_cross_section.get();
        let mut out = [0.0; 93];
        for (z, o) in out.iter_mut().enumerate() {
            *o = s * (z as f64 / 6.0).powf(n);
        }
        out
    }
}

/// Bilinear samples along a run whose column advances by one per pixel: sample `t` lies between
/// `top[t..=t+1]` and `bottom[t..=t+1]` at fractions `fx0 + dfx·t` (x) and `fy0 + dfy·t` (y).
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn resample_run(
    top: &[f32],
    bottom: &[f32],
    fx0: f32,
    dfx: f32,
    fy0: f32,
    dfy: f32,
    out: &mut [f32],
) {
    let n = out.len();
    let (t0, t1) = (&top[..n], &top[1..=n]);
    let (b0, b1) = (&bottom[..n], &bottom[1..=n]);
    for (t, o) in out.iter_mut().enumerate() {
        let fx = fx0 + dfx * t as f32;
        let fy = fy0 + dfy * t as f32;
        let a = t0[t] + (t1[t] - t0[t]) * fx;
        let b = b0[t] + (b1[t] - b0[t]) * fx;
        *o = a + (b - a) * fy;
    }
}

/// The taps `w[0..=reach]` (symmetric: `w[−t] = w[t]`) of a Gaussian blur of standard deviation
/// `sigma` (m) on a periodic axis of `n` pixels of size `dx` (m), as the frame renderer applies it:
/// `w[t] = (1/n) Σ_k exp(−2π²σ²f_k²) cos(2π k t/n)`, `f_k` the axis' signed frequencies. Taps
/// are kept out to `5σ/dx + 4` (and not beyond the last one of at least 1e-5 of `w[0]`, nor
/// beyond `n/2 − 1`) and renormalized to sum to 1 over `−reach..=reach`. A blur much wider than
/// a pixel is a sampled Gaussian that has died out by then; a narrower one is band-limited and
/// rings with alternating sign, each cut tap under 0.5 % of `w[0]`.
fn source_taps(n: usize, dx: f64, sigma: f64) -> Vec<f64> {
    if sigma <= 0.0 || n < 4 {
        return vec![1.0];
    }
    let transfer: Vec<f64> = (0..n)
        .map(|k| {
            let ki = if k <= n / 2 {
                k as f64
            } else {
                k as f64 - n as f64
            };
            let f = ki / (n as f64 * dx);
            source_transfer(sigma, f * f)
        })
        .collect();
    let tap = |t: usize| {
        transfer
            .iter()
            .enumerate()
            .map(|(k, &v)| v * (2.0 * PI * (k * t % n) as f64 / n as f64).cos())
            .sum::<f64>()
            / n as f64
    };
    let most = ((5.0 * sigma / dx).ceil() as usize + 4).min(n / 2 - 1);
    let mut w: Vec<f64> = (0..=most).map(tap).collect();
    let last = w.iter().rposition(|v| v.abs() >= 1e-5 * w[0]).unwrap_or(0);
    w.truncate(last + 1);
    let total = w[0] + 2.0 * w[1..].iter().sum::<f64>();
    w.iter_mut().for_each(|v| *v /= total);
    w
}

/// Largest drift (pixels, along each axis) that [`HaadfRenderer::shift_ideal`] applies to the
/// last rendered spectrum instead of splatting and transforming again.
pub const MAX_SPECTRAL_SHIFT: f64 = 1.0;

/// Geometry of one frame on the padded simulation grid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameGeometry {
    /// Frame rows and columns.
    pub rows: usize,
    /// Frame columns.
    pub cols: usize,
    /// Pixel size, m.
    pub dx: f64,
    /// Margin of the padded grid around the frame, pixels.
    pub margin: usize,
    /// Padded grid rows.
    pub prows: usize,
    /// Padded grid columns.
    pub pcols: usize,
}

impl FrameGeometry {
    /// Geometry for a frame with a probe kernel of `kernel_side` pixels.
    pub fn new(rows: usize, cols: usize, dx: f64, kernel_side: usize) -> Self {
        // Half the kernel and a little more, so the circular convolution never wraps into the
        // frame (however small the frame).
        let margin = (kernel_side / 2 + 4).max(8);
        let prows = next_fast_len(rows + 2 * margin);
        let pcols = next_fast_len(cols + 2 * margin);
        Self {
            rows,
            cols,
            dx,
            margin,
            prows,
            pcols,
        }
    }

    /// Padded-grid pixel coordinates `(u, v)` (column, row) of a lab-frame position relative to
    /// the frame centre, m.
    pub fn to_grid(&self, x: f64, y: f64) -> (f64, f64) {
        let u = x / self.dx + self.cols as f64 * 0.5 - 0.5 + self.margin as f64;
        let v = y / self.dx + self.rows as f64 * 0.5 - 0.5 + self.margin as f64;
        (u, v)
    }
}

/// Calls `f(i, atom)` for the atoms `selection` lists (ascending indices), or for every atom.
#[inline(always)]
fn for_atoms(atoms: &[Atom], selection: Option<&[u32]>, mut f: impl FnMut(usize, &Atom)) {
    match selection {
        Some(ids) => {
            for &i in ids {
                f(i as usize, &atoms[i as usize]);
            }
        }
        None => {
            for (i, a) in atoms.iter().enumerate() {
                f(i, a);
            }
        }
    }
}

/// Renders HAADF frames, reusing FFT plans and every buffer: after the first frame of a given
/// geometry, rendering allocates nothing.
#[derive(Debug, Default)]
pub struct HaadfRenderer {
    geom: Option<FrameGeometry>,
    fft: Option<Fft2>,
    kernel_spec: Vec<Complex<f32>>,
    /// Probe spectra of the depth slices ([`Self::set_slice_probes`]).
    slice_specs: Vec<Vec<Complex<f32>>>,
    /// Geometry and source size `(prows, pcols, dx, σ)` of the cached transfer factors.
    transfer_key: Option<(usize, usize, u64, u64)>,
    /// Source-blur transfer factor along the padded rows, per `ky`.
    transfer_y: Vec<f32>,
    /// Source-blur transfer factor along the padded columns, per `kx`, times `1/(prows·pcols)`.
    transfer_x: Vec<f32>,
    splat: Vec<f32>,
    spec: Vec<Complex<f32>>,
    /// Spectrum of the last splatted image convolved with the probe (transposed layout), kept
    /// so that a drifted image is a phase ramp and one inverse transform away.
    base_spec: Vec<Complex<f32>>,
    /// Drift shift (m) the atoms of [`Self::base_spec`] were splatted with; `None` when there
    /// is none for the installed probe.
    base_shift: Option<[f64; 2]>,
    /// Phase-ramp factors along the spectrum's columns (`kx`) and rows (`ky`).
    ramp_x: Vec<Complex<f32>>,
    ramp_y: Vec<Complex<f32>>,
    /// The ideal (undistorted, noiseless) expected counts on the padded grid.
    pub ideal: Vec<f32>,
    /// The last frame's expected counts along the distorted scan path, after gain and offset.
    pub noiseless: Vec<f32>,
    /// The last recorded frame.
    pub frame: Vec<f32>,
    /// Scratch for the noise sampler.
    poisson: PoissonScratch,
    /// Scratch: the atoms near the grid ([`AtomIndex::candidates`]).
    candidates: Vec<u32>,
}

impl HaadfRenderer {
    /// Current geometry, if a probe has been set.
    pub fn geometry(&self) -> Option<FrameGeometry> {
        self.geom
    }

    /// Installs a probe kernel for frames of `rows × cols` pixels of size `dx`.
    ///
    /// The kernel is the binned intensity, `side × side`, centred at `side/2`, summing to 1; the
    /// Gaussian source blur has standard deviation `source_sigma` (m).
    pub fn set_probe(
        &mut self,
        kernel: &[f64],
        side: usize,
        rows: usize,
        cols: usize,
        dx: f64,
        source_sigma: f64,
    ) {
        let g = FrameGeometry::new(rows, cols, dx, side);
        if self.geom.map(|o| (o.prows, o.pcols)) != Some((g.prows, g.pcols)) {
            self.fft = Some(Fft2::new(g.prows, g.pcols));
        }
        self.geom = Some(g);
        self.base_shift = None;
        let fft = self.fft.as_mut().expect("planned above");
        let n = g.prows * g.pcols;
        self.splat.resize(n, 0.0);
        self.ideal.resize(n, 0.0);
        self.frame.resize(rows * cols, 0.0);
        self.noiseless.resize(rows * cols, 0.0);
        self.spec.resize(fft.spectrum_len(), Complex::new(0.0, 0.0));
        self.base_spec
            .resize(fft.spectrum_len(), Complex::new(0.0, 0.0));
        // The phase ramps of `shift_ideal`, so no frame allocates.
        self.ramp_x.reserve(g.pcols / 2 + 1);
        self.ramp_y.reserve(g.prows);
        self.kernel_spec
            .resize(fft.spectrum_len(), Complex::new(0.0, 0.0));
        // Source blur and the 1/(N) normalization of the unnormalized inverse.
        // The Gaussian transfer function is separable: exp(-2π²σ²fx²) · exp(-2π²σ²fy²); its
        // factors depend on the geometry and σ only, so they are kept across aberration changes.
        let key = (g.prows, g.pcols, dx.to_bits(), source_sigma.to_bits());
        if self.transfer_key != Some(key) {
            self.transfer_key = Some(key);
            let nxc = g.pcols / 2 + 1;
            let norm = 1.0 / (g.prows * g.pcols) as f64;
            self.transfer_y.clear();
            self.transfer_y.extend((0..g.prows).map(|ky| {
                let kyi = if ky <= g.prows / 2 {
                    ky as f64
                } else {
                    ky as f64 - g.prows as f64
                };
                let fy = kyi / (g.prows as f64 * dx);
                source_transfer(source_sigma, fy * fy) as f32
            }));
            self.transfer_x.clear();
            self.transfer_x.extend((0..nxc).map(|kx| {
                let fx = kx as f64 / (g.pcols as f64 * dx);
                (source_transfer(source_sigma, fx * fx) * norm) as f32
            }));
        }
        // The kernel wrapped around the origin of the padded grid, times the transfer function.
        fft.forward_wrapped_filtered(
            kernel,
            side,
            side / 2,
            &self.transfer_x,
            &self.transfer_y,
            &mut self.kernel_spec,
        );
        // The image convolves with the reflected probe, P(−r), whose spectrum is the conjugate
        // (the kernel is real, the transfer function real and even).
        for k in &mut self.kernel_spec {
            *k = k.conj();
        }
    }

    /// The effective probe of the frames on the pixel grid: the probe `kernel` (`side × side`,
    /// centred at `side/2`, summing to 1, as given to [`Self::set_probe`]) convolved with the
    /// source blur of standard deviation `source_sigma` (m) exactly as the frames apply it: the
    /// blur's taps along each axis are the inverse transform of its transfer function
    /// `exp(−2π²σ²f²)` at the padded grid's frequencies, kept out to `5σ + 4` pixels and
    /// renormalized, so the result sums to 1 (a blur narrower than a pixel is band-limited on
    /// the grid and rings beyond that with taps under 0.5 % of the central one, which are cut;
    /// a point then differs from the frame by up to about 2 %; with σ of a few pixels, by
    /// 2e-6 as measured at 3.5 and 4 pixels). Written to `out` as a square kernel centred at
    /// `side_out/2`; returns `side_out`. Without an installed probe, the kernel is returned
    /// unblurred.
    pub fn effective_probe(
        &self,
        kernel: &[f64],
        side: usize,
        source_sigma: f64,
        out: &mut Vec<f64>,
    ) -> usize {
        let Some(g) = self.geom else {
            out.clear();
            out.extend_from_slice(kernel);
            return side;
        };
        let taps_x = source_taps(g.pcols, g.dx, source_sigma);
        let taps_y = source_taps(g.prows, g.dx, source_sigma);
        let reach = (taps_x.len().max(taps_y.len())) - 1;
        let s2 = side + 2 * reach;
        // Along x into a `side × s2` buffer, then along y into `s2 × s2`.
        let mut tmp = vec![0.0; side * s2];
        for (row, trow) in kernel.chunks_exact(side).zip(tmp.chunks_exact_mut(s2)) {
            for (j, &v) in row.iter().enumerate() {
                if v == 0.0 {
                    continue;
                }
                let c = j + reach;
                for (t, &w) in taps_x.iter().enumerate() {
                    trow[c + t] += v * w;
                    if t > 0 {
                        trow[c - t] += v * w;
                    }
                }
            }
        }
        out.clear();
        out.resize(s2 * s2, 0.0);
        for (i, trow) in tmp.chunks_exact(s2).enumerate() {
            let r = i + reach;
            for (t, &w) in taps_y.iter().enumerate() {
                for (o, &v) in out[(r + t) * s2..(r + t + 1) * s2].iter_mut().zip(trow) {
                    *o += v * w;
                }
                if t > 0 {
                    for (o, &v) in out[(r - t) * s2..(r - t + 1) * s2].iter_mut().zip(trow) {
                        *o += v * w;
                    }
                }
            }
        }
        s2
    }

    /// Forms the ideal expected-count image on the padded grid: atoms at lab positions
    /// `(a.x + shift[0] − centre[0], a.y + shift[1] − centre[1])` relative to the frame centre,
    /// each weighted by `electrons · σ(Z) / dx²`. A periodic specimen is splatted with every
    /// image of each atom that falls on the padded grid (a column straddling the cell edge
    /// appears on both sides), so any centre and any drift image material.
    pub fn render_ideal(
        &mut self,
        specimen: &Specimen,
        sigma_by_z: &[f64; 93],
        electrons: f64,
        shift: [f64; 2],
        centre: [f64; 2],
    ) -> Result<()> {
        self.render_ideal_indexed(specimen, None, sigma_by_z, electrons, shift, centre)
    }

    /// [`Self::render_ideal`] visiting only the atoms `index` (built for `specimen`'s atoms as
    /// they are) lists near the grid: the same image, bit for bit, at a cost that scales with
    /// the grid's area rather than the specimen's. An index built for another number of atoms
    /// is ignored.
    pub fn render_ideal_indexed(
        &mut self,
        specimen: &Specimen,
        index: Option<&AtomIndex>,
        sigma_by_z: &[f64; 93],
        electrons: f64,
        shift: [f64; 2],
        centre: [f64; 2],
    ) -> Result<()> {
        let g = self.geom.ok_or_else(|| PhysicsError::Refused {
            operation: "render".into(),
            reason: "no probe installed".into(),
        })?;
        self.splat_atoms(
            g,
            specimen,
            sigma_by_z,
            electrons,
            shift,
            centre,
            index,
            |_| true,
        );
        let fft = self.fft.as_mut().expect("geometry implies plans");
        fft.forward(&self.splat, &mut self.base_spec);
        for ((b, s), k) in self
            .base_spec
            .iter_mut()
            .zip(self.spec.iter_mut())
            .zip(&self.kernel_spec)
        {
            *b *= *k;
            *s = *b;
        }
        self.base_shift = Some(shift);
        fft.inverse(&mut self.spec, &mut self.ideal);
        // FFT rounding can leave tiny negative values in empty regions.
        self.ideal.iter_mut().for_each(|v| *v = v.max(0.0));
        Ok(())
    }

    /// Loads the ideal image of the installed frame geometry from a larger one: `src` is the
    /// ideal image (padded grid `src_geom`) of a field rendered with the same probe and pixel
    /// size, and this frame's padded grid starts at its row `row0`, column `col0` (the frame's
    /// first pixel lies `row0`, `col0` pixels after the field's). Returns false (and changes
    /// nothing) without an installed geometry, with another pixel size or margin, or when the
    /// window is not inside `src`.
    pub fn load_ideal_window(
        &mut self,
        src: &[f32],
        src_geom: &FrameGeometry,
        row0: usize,
        col0: usize,
    ) -> bool {
        let Some(g) = self.geom else { return false };
        if g.dx != src_geom.dx
            || g.margin != src_geom.margin
            || row0 + g.prows > src_geom.prows
            || col0 + g.pcols > src_geom.pcols
            || src.len() < src_geom.prows * src_geom.pcols
        {
            return false;
        }
        for (i, dst) in self.ideal.chunks_exact_mut(g.pcols).enumerate() {
            let s = (row0 + i) * src_geom.pcols + col0;
            dst.copy_from_slice(&src[s..s + g.pcols]);
        }
        // The spectrum of the last render no longer matches the ideal image.
        self.base_shift = None;
        true
    }

    /// Installs the probes of depth slices for [`Self::render_ideal_sliced`]: `kernels[k]` is
    /// the binned probe of slice k (`side × side`, centred at `side/2`, summing to 1), each with
    /// the installed probe's source blur. `side` must not exceed the side the installed probe
    /// was set with (the padded grid's margin holds that one).
    pub fn set_slice_probes(&mut self, kernels: &[Vec<f64>], side: usize) -> Result<()> {
        let g = self.geom.ok_or_else(|| PhysicsError::Refused {
            operation: "set_slice_probes".into(),
            reason: "no probe installed".into(),
        })?;
        if side / 2 + 4 > g.margin {
            return Err(PhysicsError::arg(
                "set_slice_probes",
                format!(
                    "a {side}-pixel kernel exceeds the padded grid's margin {}",
                    g.margin
                ),
            ));
        }
        let fft = self.fft.as_mut().expect("geometry implies plans");
        self.slice_specs.resize_with(kernels.len(), Vec::new);
        for (k, spec) in kernels.iter().zip(self.slice_specs.iter_mut()) {
            spec.clear();
            spec.resize(fft.spectrum_len(), Complex::new(0.0, 0.0));
            fft.forward_wrapped_filtered(
                k,
                side,
                side / 2,
                &self.transfer_x,
                &self.transfer_y,
                spec,
            );
            for v in spec.iter_mut() {
                *v = v.conj();
            }
        }
        Ok(())
    }

    /// [`Self::render_ideal`] with depth of focus: the atoms of slice k (`slice_of[i]` for atom
    /// i of `specimen`) are convolved with slice k's probe ([`Self::set_slice_probes`]) and the
    /// slices summed (in the spectrum, so [`Self::shift_ideal`] works on the sum).
    #[allow(clippy::too_many_arguments)]
    pub fn render_ideal_sliced(
        &mut self,
        specimen: &Specimen,
        sigma_by_z: &[f64; 93],
        electrons: f64,
        shift: [f64; 2],
        centre: [f64; 2],
        slice_of: &[usize],
    ) -> Result<()> {
        let g = self.geom.ok_or_else(|| PhysicsError::Refused {
            operation: "render".into(),
            reason: "no probe installed".into(),
        })?;
        if slice_of.len() != specimen.atoms.len()
            || slice_of.iter().any(|&k| k >= self.slice_specs.len())
        {
            return Err(PhysicsError::arg(
                "slice_of",
                "one installed slice per atom of the specimen",
            ));
        }
        self.base_spec
            .iter_mut()
            .for_each(|v| *v = Complex::new(0.0, 0.0));
        for k in 0..self.slice_specs.len() {
            self.splat_atoms(
                g,
                specimen,
                sigma_by_z,
                electrons,
                shift,
                centre,
                None,
                |i| slice_of[i] == k,
            );
            let fft = self.fft.as_mut().expect("geometry implies plans");
            fft.forward(&self.splat, &mut self.spec);
            for ((b, s), p) in self
                .base_spec
                .iter_mut()
                .zip(&self.spec)
                .zip(&self.slice_specs[k])
            {
                *b += *s * *p;
            }
        }
        self.spec.copy_from_slice(&self.base_spec);
        self.base_shift = Some(shift);
        let fft = self.fft.as_mut().expect("geometry implies plans");
        fft.inverse(&mut self.spec, &mut self.ideal);
        self.ideal.iter_mut().for_each(|v| *v = v.max(0.0));
        Ok(())
    }

    /// Splats the atoms `i` of `specimen` with `keep(i)` onto the padded grid (bilinear, every
    /// periodic image on the grid), each weighted by `electrons · σ(Z) / dx²`, at lab positions
    /// `(a.x + shift[0] − centre[0], a.y + shift[1] − centre[1])` relative to the frame centre.
    #[allow(clippy::too_many_arguments)]
    fn splat_atoms(
        &mut self,
        g: FrameGeometry,
        specimen: &Specimen,
        sigma_by_z: &[f64; 93],
        electrons: f64,
        shift: [f64; 2],
        centre: [f64; 2],
        index: Option<&AtomIndex>,
        keep: impl Fn(usize) -> bool,
    ) {
        self.splat.iter_mut().for_each(|v| *v = 0.0);
        let scale = electrons / (g.dx * g.dx);
        let (pw, ph) = (g.pcols as f64, g.prows as f64);
        let splat = &mut self.splat;
        let mut put = |x: f64, y: f64, w: f32| {
            let (u, v) = g.to_grid(x, y);
            if !(u >= 0.0 && v >= 0.0 && u < pw - 1.0 && v < ph - 1.0) {
                return;
            }
            let (i0, j0) = (v as usize, u as usize);
            let (fy, fx) = ((v - i0 as f64) as f32, (u - j0 as f64) as f32);
            let base = i0 * g.pcols + j0;
            splat[base] += w * (1.0 - fx) * (1.0 - fy);
            splat[base + 1] += w * fx * (1.0 - fy);
            splat[base + g.pcols] += w * (1.0 - fx) * fy;
            splat[base + g.pcols + 1] += w * fx * fy;
        };
        let weight =
            |a: &Atom| (scale * sigma_by_z.get(a.z as usize).copied().unwrap_or(0.0)) as f32;
        // The padded grid's half-extent around the frame centre (it is not centred exactly: the
        // larger side).
        let (u0, v0) = g.to_grid(0.0, 0.0);
        let half = [u0.max(pw - 1.0 - u0) * g.dx, v0.max(ph - 1.0 - v0) * g.dx];
        let c = [shift[0] - centre[0], shift[1] - centre[1]];
        let window = specimen.window(c, half);
        // The atoms that may reach the grid, in atom order (the same sums as over all atoms).
        let cand = &mut self.candidates;
        let indexed =
            index.is_some_and(|ix| ix.covers(specimen.atoms.len()) && ix.candidates(&window, cand));
        let sel = indexed.then_some(cand.as_slice());
        if window.is_direct() {
            // A finite specimen, or the grid inside one translated cell: one image per atom at
            // a fixed offset, no wrapping.
            let o = window.offset();
            for_atoms(&specimen.atoms, sel, |i, a| {
                if keep(i) {
                    put(a.x + o[0], a.y + o[1], weight(a));
                }
            });
        } else {
            for_atoms(&specimen.atoms, sel, |i, a| {
                if keep(i) {
                    let w = weight(a);
                    window.for_each_image([a.x, a.y], |[x, y]| put(x, y, w));
                }
            });
        }
    }

    /// Re-forms the ideal image for a new drift `shift` (m) from the spectrum of the last
    /// [`Self::render_ideal`], when the specimen moved by at most [`MAX_SPECTRAL_SHIFT`] pixels
    /// along each axis since: the image moved by `d` is the spectrum times the phase ramp
    /// `exp(−2πi (kx·dx/nx + ky·dy/ny))`, an exact band-limited shift, so only the inverse
    /// transform is needed (no splat, no forward transform). Returns `false` (and changes
    /// nothing) when there is no such spectrum or the shift is larger; render then.
    ///
    /// The shift moves the whole padded grid circularly; the margin keeps
    /// `4 − MAX_SPECTRAL_SHIFT` pixels of slack beyond the frame for the scan distortions, as a
    /// full render keeps 4.
    pub fn shift_ideal(&mut self, shift: [f64; 2]) -> bool {
        let (Some(g), Some(base)) = (self.geom, self.base_shift) else {
            return false;
        };
        let d = [(shift[0] - base[0]) / g.dx, (shift[1] - base[1]) / g.dx];
        if !(d[0].abs() <= MAX_SPECTRAL_SHIFT && d[1].abs() <= MAX_SPECTRAL_SHIFT) {
            return false;
        }
        let Some(fft) = self.fft.as_mut() else {
            return false;
        };
        let (ny, nx) = (g.prows, g.pcols);
        let phase = |k: f64, n: usize, d: f64| {
            let (s, c) = (-2.0 * PI * k * d / n as f64).sin_cos();
            Complex::new(c as f32, s as f32)
        };
        self.ramp_x.clear();
        self.ramp_x
            .extend((0..nx / 2 + 1).map(|kx| phase(kx as f64, nx, d[0])));
        self.ramp_y.clear();
        self.ramp_y.extend((0..ny).map(|ky| {
            let k = if ky <= ny / 2 {
                ky as f64
            } else {
                ky as f64 - ny as f64
            };
            phase(k, ny, d[1])
        }));
        // Transposed layout: row kx holds every ky.
        for ((col_s, col_b), &rx) in self
            .spec
            .chunks_exact_mut(ny)
            .zip(self.base_spec.chunks_exact(ny))
            .zip(&self.ramp_x)
        {
            for ((s, b), &ry) in col_s.iter_mut().zip(col_b).zip(&self.ramp_y) {
                *s = *b * (rx * ry);
            }
        }
        fft.inverse(&mut self.spec, &mut self.ideal);
        self.ideal.iter_mut().for_each(|v| *v = v.max(0.0));
        true
    }

    /// Samples the ideal image along the distorted scan path into `noiseless` and draws the
    /// recorded `frame`.
    ///
    /// Within a row the drift is linear in time and the scan noise is linear between its nodes,
    /// so the sampling position is linear over each node segment and is stepped incrementally.
    pub fn record(&mut self, dist: &Distortion, det: &DetectorConfig, rng: &mut SimRng) {
        let Some(g) = self.geom else { return };
        let (rows, cols) = (g.rows, g.cols);
        for i in 0..rows {
            self.expect_rows(dist, i..i + 1);
            // Counts for this row while its expectation is in cache.
            self.count_row(det, rng, i, cols);
        }
        det.add_read_noise_and_salt(rng, &mut self.frame[..rows * cols]);
    }

    /// Counts, gain and offset of row `i` (`cols` pixels) from its expected counts.
    fn count_row(&mut self, det: &DetectorConfig, rng: &mut SimRng, i: usize, cols: usize) {
        det.count(
            rng,
            &mut self.noiseless[i * cols..(i + 1) * cols],
            &mut self.frame[i * cols..(i + 1) * cols],
            &mut self.poisson,
        );
    }

    /// Draws the recorded `frame` from the expected counts in `noiseless` (all rows, filled by
    /// [`HaadfRenderer::expect_rows`]): what [`HaadfRenderer::record`] does after sampling.
    pub fn count_rows(&mut self, det: &DetectorConfig, rng: &mut SimRng) {
        let Some(g) = self.geom else { return };
        let (rows, cols) = (g.rows, g.cols);
        for i in 0..rows {
            self.count_row(det, rng, i, cols);
        }
        det.add_read_noise_and_salt(rng, &mut self.frame[..rows * cols]);
    }

    /// Samples the ideal image along the distorted scan path into rows `range` of `noiseless`
    /// (expected counts, before the detector): the first stage of [`HaadfRenderer::record`].
    /// A frame whose probe changes between rows renders each part's ideal image and samples
    /// its rows, then draws the counts with [`HaadfRenderer::count_rows`].
    pub fn expect_rows(&mut self, dist: &Distortion, range: std::ops::Range<usize>) {
        let Some(g) = self.geom else { return };
        let (rows, cols) = (g.rows, g.cols);
        let range = range.start.min(rows)..range.end.min(rows);
        let node = dist.node.max(1);
        let npr = Distortion::nodes_per_row(cols, node);
        let inv_dx = 1.0 / g.dx;
        let (maxu, maxv) = ((g.pcols - 2) as f32, (g.prows - 2) as f32);
        let pc = g.pcols;
        let inv_span = if cols > 1 {
            1.0 / (cols - 1) as f64
        } else {
            0.0
        };
        // Row by row: expected counts λ along the scan path.
        for i in range {
            let d0 = dist.row_drift_start.get(i).copied().unwrap_or([0.0; 2]);
            let d1 = dist.row_drift_end.get(i).copied().unwrap_or([0.0; 2]);
            let jit = dist.row_jitter.get(i).copied().unwrap_or(0.0);
            let nodes = dist.noise_nodes.get(i * npr..(i + 1) * npr);
            // Position (u, v) on the padded grid at column j (any real j).
            let pos = |j: usize, k: usize| -> (f64, f64) {
                let f = j as f64 * inv_span;
                let (nx, ny) = nodes.map_or((0.0, 0.0), |nd| (nd[k][0], nd[k][1]));
                let u = (g.margin + j) as f64 + jit + (nx - (d0[0] + (d1[0] - d0[0]) * f)) * inv_dx;
                let v = (g.margin + i) as f64 + (ny - (d0[1] + (d1[1] - d0[1]) * f)) * inv_dx;
                (u, v)
            };
            let out = &mut self.noiseless[i * cols..(i + 1) * cols];
            // A segment's end is the next segment's start.
            let mut start = pos(0, 0);
            for (seg, chunk) in out.chunks_mut(node).enumerate() {
                let j0 = seg * node;
                let (ua, va) = start;
                let (ub, vb) = pos(j0 + node, seg + 1);
                start = (ub, vb);
                let (du, dv) = (
                    ((ub - ua) / node as f64) as f32,
                    ((vb - va) / node as f64) as f32,
                );
                let (ua, va) = (ua as f32, va as f32);
                let id = &self.ideal;
                let sample = |u: f32, v: f32| {
                    // In range by construction; the i32 cast is one instruction on x86-64
                    // (f32 → u64 is not).
                    let (i0, j0) = (v as i32 as usize, u as i32 as usize);
                    let (fy, fx) = (v - i0 as f32, u - j0 as f32);
                    let b = i0 * pc + j0;
                    let top = id[b] + (id[b + 1] - id[b]) * fx;
                    let bottom = id[b + pc] + (id[b + pc + 1] - id[b + pc]) * fx;
                    top + (bottom - top) * fy
                };
                let last = chunk.len() as f32 - 1.0;
                let inside = |a: f32, d: f32, max: f32| {
                    a >= 0.0 && a <= max && a + d * last >= 0.0 && a + d * last <= max
                };
                // The common case: along the segment the sample stays in one row pair and moves
                // one column per pixel (u - t and v keep their integer parts), so the reads are
                // contiguous and the loop vectorizes.
                let (j0, i0) = (ua.floor(), va.floor());
                let contiguous = inside(ua, du, maxu)
                    && inside(va, dv, maxv)
                    && (ua + (du - 1.0) * last).floor() == j0
                    && (va + dv * last).floor() == i0;
                if contiguous {
                    let (j0, i0) = (j0 as i32 as usize, i0 as i32 as usize);
                    let len = chunk.len();
                    let top = &id[i0 * pc + j0..i0 * pc + j0 + len + 1];
                    let bottom = &id[(i0 + 1) * pc + j0..(i0 + 1) * pc + j0 + len + 1];
                    let (fx0, fy0) = (ua - j0 as f32, va - i0 as f32);
                    resample_run(top, bottom, fx0, du - 1.0, fy0, dv, chunk);
                } else if inside(ua, du, maxu) && inside(va, dv, maxv) {
                    for (t, o) in chunk.iter_mut().enumerate() {
                        *o = sample(ua + du * t as f32, va + dv * t as f32);
                    }
                } else {
                    for (t, o) in chunk.iter_mut().enumerate() {
                        *o = sample(
                            (ua + du * t as f32).clamp(0.0, maxu),
                            (va + dv * t as f32).clamp(0.0, maxv),
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference bilinear sample of a row-major grid of width `pc` at (u, v).
    fn bilinear(id: &[f32], pc: usize, u: f32, v: f32) -> f32 {
        let (i0, j0) = (v.floor() as usize, u.floor() as usize);
        let (fy, fx) = (v - i0 as f32, u - j0 as f32);
        let b = i0 * pc + j0;
        let top = id[b] * (1.0 - fx) + id[b + 1] * fx;
        let bottom = id[b + pc] * (1.0 - fx) + id[b + pc + 1] * fx;
        top * (1.0 - fy) + bottom * fy
    }

    fn graphene(rotation: f64) -> Specimen {
        let cfg = crate::stem::specimen::SpecimenConfig {
            rotation: Param::fixed(rotation),
            ..Default::default()
        };
        cfg.build([4e-9, 3e-9], &mut crate::rng::seeded(2)).unwrap()
    }

    #[test]
    fn indexed_render_is_the_full_render_bit_for_bit() {
        let sigma = DetectorConfig::default().cross_sections();
        let kernel: Vec<f64> = {
            let g: Vec<f64> = (0..9)
                .map(|i| (-((i as f64 - 4.0) / 1.5).powi(2)).exp())
                .collect();
            let k: Vec<f64> = (0..81).map(|k| g[k / 9] * g[k % 9]).collect();
            let t: f64 = k.iter().sum();
            k.iter().map(|v| v / t).collect()
        };
        for rotation in [0.0, 0.7] {
            let s = graphene(rotation);
            let index = AtomIndex::build(&s, 4e-10);
            let (mut a, mut b) = (HaadfRenderer::default(), HaadfRenderer::default());
            for r in [&mut a, &mut b] {
                r.set_probe(&kernel, 9, 16, 24, 0.5e-10, 0.3e-10);
            }
            // Frames inside one cell, across its edges, and far from the origin.
            for centre in [
                [0.0, 0.0],
                [1.9e-9, -1.4e-9],
                [-7.3e-9, 5.1e-9],
                [0.4e-9, 1.45e-9],
            ] {
                let shift = [0.3e-10, -0.2e-10];
                a.render_ideal(&s, &sigma, 5e3, shift, centre).unwrap();
                b.render_ideal_indexed(&s, Some(&index), &sigma, 5e3, shift, centre)
                    .unwrap();
                assert!(a.ideal.iter().any(|&v| v > 0.0));
                assert!(
                    a.ideal
                        .iter()
                        .zip(&b.ideal)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "rotation {rotation}, centre {centre:?}"
                );
            }
        }
    }

    #[test]
    fn source_taps_are_the_gaussian_with_its_variance() {
        // Wide blur (σ = 2.5 pixels): the taps are the sampled Gaussian, second moment σ².
        let w = source_taps(128, 1.0, 2.5);
        let m0 = w[0] + 2.0 * w[1..].iter().sum::<f64>();
        let m2: f64 = 2.0
            * w.iter()
                .enumerate()
                .map(|(t, v)| (t * t) as f64 * v)
                .sum::<f64>();
        assert!((m0 - 1.0).abs() < 1e-12, "{m0}");
        assert!((m2 / 6.25 - 1.0).abs() < 1e-3, "{m2}");
        let g0 = 1.0 / (2.5 * (2.0 * PI).sqrt());
        assert!((w[0] / g0 - 1.0).abs() < 1e-3, "{} vs {g0}", w[0]);
        // Narrow blur (σ = 0.35 pixel, the default source at 1 Å pixels): band-limited, it
        // rings; the cut taps are each under 0.5 % of the central one.
        let n = 96;
        let w = source_taps(n, 1.0, 0.35);
        let full: Vec<f64> = {
            let s2 = 2.0 * PI * PI * 0.35 * 0.35;
            (0..n / 2)
                .map(|t| {
                    (0..n)
                        .map(|k| {
                            let f = if k <= n / 2 {
                                k as f64
                            } else {
                                k as f64 - n as f64
                            } / n as f64;
                            (-(s2 * f * f)).exp() * (2.0 * PI * (k * t) as f64 / n as f64).cos()
                        })
                        .sum::<f64>()
                        / n as f64
                })
                .collect()
        };
        let cut = full[w.len()..].iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(
            w.len() <= 7 && cut < 5e-3 * full[0],
            "{} taps, {cut} cut",
            w.len()
        );
        let kept = full[0] + 2.0 * full[1..w.len()].iter().sum::<f64>();
        assert!((w[0] - full[0] / kept).abs() < 1e-12);
    }

    #[test]
    fn contiguous_run_equals_pointwise_bilinear_sampling() {
        let pc = 64;
        let id: Vec<f32> = (0..pc * pc)
            .map(|k| ((k * 2_654_435_761usize) % 1000) as f32 * 0.01)
            .collect();
        for &(ua, du, va, dv) in &[
            (3.25f32, 1.0f32, 5.5f32, 0.0f32),
            (10.1, 1.004, 20.9, 0.003),
            (0.5, 0.999, 7.5, -0.002),
        ] {
            let n = 20;
            let (j0, i0) = (ua.floor() as usize, va.floor() as usize);
            // The precondition `record` checks: u - t and v keep their integer parts.
            let last = (n - 1) as f32;
            assert_eq!((ua + (du - 1.0) * last).floor() as usize, j0);
            assert_eq!((va + dv * last).floor() as usize, i0);
            let top = &id[i0 * pc + j0..i0 * pc + j0 + n + 1];
            let bottom = &id[(i0 + 1) * pc + j0..(i0 + 1) * pc + j0 + n + 1];
            let mut out = vec![0.0f32; n];
            resample_run(
                top,
                bottom,
                ua - j0 as f32,
                du - 1.0,
                va - i0 as f32,
                dv,
                &mut out,
            );
            for (t, &o) in out.iter().enumerate() {
                let r = bilinear(&id, pc, ua + du * t as f32, va + dv * t as f32);
                assert!((o - r).abs() < 1e-4 * r.abs().max(1.0), "t={t}: {o} vs {r}");
            }
        }
    }
}
