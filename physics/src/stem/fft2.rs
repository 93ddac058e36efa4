//! Real 2-D FFTs with reusable plans and buffers (rows by `realfft`, columns by `rustfft`
//! through a blocked transpose). The spectrum is stored transposed: `(nx/2 + 1) × ny`, row `kx`
//! holding all `ky` contiguously. [`Fft2::forward_wrapped_filtered`] transforms a small kernel
//! wrapped around the origin (the probe kernel spectrum) without forming the padded grid.

use crate::stem::optics::transpose;
use num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::{Fft, FftPlanner};
use std::sync::Arc;

/// Plans and scratch for forward and inverse real 2-D transforms of one size.
pub struct Fft2 {
    /// Rows (slow axis length).
    pub ny: usize,
    /// Columns (fast axis length).
    pub nx: usize,
    r2c: Arc<dyn RealToComplex<f32>>,
    c2r: Arc<dyn ComplexToReal<f32>>,
    col_fwd: Arc<dyn Fft<f32>>,
    col_inv: Arc<dyn Fft<f32>>,
    /// Complex transform along a row, for two real rows at once.
    row_fwd: Arc<dyn Fft<f32>>,
    rows: Vec<Complex<f32>>,
    row_in: Vec<f32>,
    scratch_c: Vec<Complex<f32>>,
    /// Row spectra of the kernel rows in [`Self::forward_wrapped_filtered`]
    /// (`side × (nx/2 + 1)`).
    compact: Vec<Complex<f32>>,
    /// [`Self::compact`] transposed (`(nx/2 + 1) × side`).
    compact_t: Vec<Complex<f32>>,
    /// The column filter of [`Self::forward_wrapped_filtered`] as `(fy, fy)` pairs.
    fy_pairs: Vec<Complex<f32>>,
    /// Input block of the column pass of [`Self::forward_wrapped_filtered`].
    col_in: Vec<Complex<f32>>,
    /// Two real rows packed as one complex row in [`Self::forward_wrapped_filtered`].
    row_z: Vec<Complex<f32>>,
}

impl std::fmt::Debug for Fft2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fft2({}x{})", self.ny, self.nx)
    }
}

impl Fft2 {
    /// Plans transforms for an `ny × nx` real array.
    pub fn new(ny: usize, nx: usize) -> Self {
        let mut rp = RealFftPlanner::<f32>::new();
        let mut cp = FftPlanner::<f32>::new();
        let r2c = rp.plan_fft_forward(nx);
        let c2r = rp.plan_fft_inverse(nx);
        let col_fwd = cp.plan_fft_forward(ny);
        let col_inv = cp.plan_fft_inverse(ny);
        let row_fwd = cp.plan_fft_forward(nx);
        let nxc = nx / 2 + 1;
        let scratch = [
            r2c.get_scratch_len(),
            c2r.get_scratch_len(),
            col_fwd.get_inplace_scratch_len(),
            col_inv.get_inplace_scratch_len(),
            col_fwd.get_outofplace_scratch_len(),
            row_fwd.get_inplace_scratch_len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        Self {
            ny,
            nx,
            r2c,
            c2r,
            col_fwd,
            col_inv,
            row_fwd,
            rows: vec![Complex::new(0.0, 0.0); ny * nxc],
            row_in: vec![0.0; nx],
            scratch_c: vec![Complex::new(0.0, 0.0); scratch.max(1)],
            compact: Vec::new(),
            compact_t: Vec::new(),
            fy_pairs: Vec::new(),
            col_in: Vec::new(),
            row_z: Vec::new(),
        }
    }

    /// Length of a spectrum buffer: `(nx/2 + 1) · ny`.
    pub fn spectrum_len(&self) -> usize {
        (self.nx / 2 + 1) * self.ny
    }

    /// Forward transform of `input` (row-major `ny × nx`) into `spec` (transposed layout).
    pub fn forward(&mut self, input: &[f32], spec: &mut [Complex<f32>]) {
        let (nx, ny, nxc) = (self.nx, self.ny, self.nx / 2 + 1);
        for y in 0..ny {
            self.row_in.copy_from_slice(&input[y * nx..(y + 1) * nx]);
            // Sizes are consistent by construction, so the transform cannot fail.
            let _ = self.r2c.process_with_scratch(
                &mut self.row_in,
                &mut self.rows[y * nxc..(y + 1) * nxc],
                &mut self.scratch_c,
            );
        }
        transpose(&self.rows, spec, ny, nxc);
        self.col_fwd.process_with_scratch(spec, &mut self.scratch_c);
    }

    /// Forward transform of a compact `side × side` array (row-major) wrapped around the origin
    /// of the `ny × nx` grid, times a separable real filter: element `(ky, kx)` lands on row
    /// `(ky − centre) mod ny`, column `(kx − centre) mod nx` (elements that wrap onto the same
    /// cell add up), every other cell is zero, and spectrum bin `(ky, kx)` is multiplied by
    /// `fx[kx] · fy[ky]` (`fx` has `nx/2 + 1` entries, `fy` has `ny`). The result goes to `spec`
    /// (transposed layout).
    ///
    /// Only the `side` non-zero rows are transformed, two real rows per complex transform; `fx`
    /// is applied to those row spectra (`side` values per column instead of `ny`). The column
    /// transforms run on blocks of a few columns that are filled (zero padding included),
    /// transformed out of place into `spec` and scaled by `fy` in turn, so no pass touches the
    /// whole spectrum more than once. Nothing is allocated once the buffers have grown to
    /// `side`.
    pub fn forward_wrapped_filtered(
        &mut self,
        kernel: &[f64],
        side: usize,
        centre: usize,
        fx: &[f32],
        fy: &[f32],
        spec: &mut [Complex<f32>],
    ) {
        /// Spectrum columns per block of the column pass (a block of 8 columns of a few hundred
        /// points stays in the L1/L2 cache).
        const BLOCK: usize = 8;
        let (nx, ny, nxc) = (self.nx, self.ny, self.nx / 2 + 1);
        assert_eq!(kernel.len(), side * side, "kernel is side × side");
        assert_eq!(spec.len(), nxc * ny, "spectrum length");
        assert!(fx.len() == nxc && fy.len() == ny, "filter lengths");
        // Row pass: kernel row ky wrapped around column 0, transformed into compact row ky and
        // multiplied by fx.
        let zero = Complex::new(0.0, 0.0);
        self.compact.resize(side * nxc, zero);
        self.compact_t.resize(side * nxc, zero);
        self.col_in.resize(BLOCK * ny, zero);
        // Two real rows per complex transform: z = a + i·b gives A(k) = (Z(k) + Z*(−k))/2 and
        // B(k) = (Z(k) − Z*(−k))/(2i). Neighbouring rows pair up (similar magnitudes).
        self.row_z.resize(nx, zero);
        let x0 = (nx - centre % nx) % nx;
        for ky in (0..side).step_by(2) {
            self.row_z.fill(zero);
            let mut gx = x0;
            let a = &kernel[ky * side..(ky + 1) * side];
            let b = kernel.get((ky + 1) * side..(ky + 2) * side);
            for (kx, &v) in a.iter().enumerate() {
                let w = b.map_or(0.0, |b| b[kx]);
                self.row_z[gx] += Complex::new(v as f32, w as f32);
                gx += 1;
                if gx == nx {
                    gx = 0;
                }
            }
            self.row_fwd
                .process_with_scratch(&mut self.row_z, &mut self.scratch_c);
            let (ra, rb) = self.compact[ky * nxc..].split_at_mut(nxc);
            let rb = if ky + 1 < side {
                &mut rb[..nxc]
            } else {
                &mut [][..]
            };
            unpack_two_real(&self.row_z, fx, ra, rb);
        }
        // fy duplicated into (re, im) pairs, so the column scaling needs no shuffles.
        self.fy_pairs.clear();
        self.fy_pairs.extend(fy.iter().map(|&f| Complex::new(f, f)));
        // Columns of the compact rows, contiguous: compact_t[kx · side + ky].
        transpose(&self.compact, &mut self.compact_t, side, nxc);
        // Kernel row ky lands on grid row (y0 + ky) mod ny.
        let y0 = (ny - centre % ny) % ny;
        for (b, block) in spec.chunks_mut(BLOCK * ny).enumerate() {
            let kx0 = b * BLOCK;
            let input = &mut self.col_in[..block.len()];
            for (i, col) in input.chunks_exact_mut(ny).enumerate() {
                let src = &self.compact_t[(kx0 + i) * side..(kx0 + i + 1) * side];
                wrap_column(src, y0, col);
            }
            self.col_fwd
                .process_outofplace_with_scratch(input, block, &mut self.scratch_c);
            scale_columns(block, &self.fy_pairs);
        }
    }

    /// Inverse transform of `spec` (transposed layout; destroyed) into `out` (row-major
    /// `ny × nx`), unnormalized (a forward-inverse round trip multiplies by `nx · ny`).
    pub fn inverse(&mut self, spec: &mut [Complex<f32>], out: &mut [f32]) {
        let (nx, ny, nxc) = (self.nx, self.ny, self.nx / 2 + 1);
        self.col_inv.process_with_scratch(spec, &mut self.scratch_c);
        transpose(spec, &mut self.rows, nxc, ny);
        for y in 0..ny {
            let row = &mut self.rows[y * nxc..(y + 1) * nxc];
            // A real signal has real DC and Nyquist bins; clear rounding residue.
            row[0].im = 0.0;
            if nx % 2 == 0 {
                row[nxc - 1].im = 0.0;
            }
            let _ = self.c2r.process_with_scratch(
                row,
                &mut out[y * nx..(y + 1) * nx],
                &mut self.scratch_c,
            );
        }
    }
}

/// Splits the transform `z` of `a + i·b` (two real rows) into the half spectra of `a` and `b`,
/// times `f`: `out_a[k] = f[k] (Z(k) + Z*(−k))/2`, `out_b[k] = f[k] (Z(k) − Z*(−k))/(2i)` for
/// `k < out_a.len()`; `out_b` is either empty (no second row) or as long as `out_a`.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn unpack_two_real(
    z: &[Complex<f32>],
    f: &[f32],
    out_a: &mut [Complex<f32>],
    out_b: &mut [Complex<f32>],
) {
    let (n, m) = (z.len(), out_a.len());
    let split = |zk: Complex<f32>, zm: Complex<f32>, f: f32| {
        let (s, d) = ((zk + zm) * (0.5 * f), (zk - zm) * (0.5 * f));
        (s, Complex::new(d.im, -d.re))
    };
    let (a0, b0) = split(z[0], z[0].conj(), f[0]);
    out_a[0] = a0;
    // Z(−k) = Z(n − k): walk z[1..m] forward and z[n−m+1..n] backward.
    let fwd = &z[1..m];
    let bwd = &z[n + 1 - m..];
    if out_b.is_empty() {
        for ((o, &f), (&zk, &zr)) in out_a[1..]
            .iter_mut()
            .zip(&f[1..m])
            .zip(fwd.iter().zip(bwd.iter().rev()))
        {
            *o = split(zk, zr.conj(), f).0;
        }
    } else {
        out_b[0] = b0;
        for (((oa, ob), &f), (&zk, &zr)) in out_a[1..]
            .iter_mut()
            .zip(&mut out_b[1..])
            .zip(&f[1..m])
            .zip(fwd.iter().zip(bwd.iter().rev()))
        {
            (*oa, *ob) = split(zk, zr.conj(), f);
        }
    }
}

/// Writes `src` into `col` from row `y0` on, wrapping around the end (values that wrap onto each
/// other add up), and zeros elsewhere.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn wrap_column(src: &[Complex<f32>], y0: usize, col: &mut [Complex<f32>]) {
    let (ny, side) = (col.len(), src.len());
    // Opaque to the optimizer, so the zero fills stay inline vector stores: a `memset` call of
    // this size takes the `rep stosb` path, which is slow on some CPUs.
    let zero = std::hint::black_box(Complex::new(0.0, 0.0));
    if y0 + side <= ny {
        // One run of rows y0..y0 + side.
        col[..y0].fill(zero);
        col[y0..y0 + side].copy_from_slice(src);
        col[y0 + side..].fill(zero);
    } else if side <= ny {
        // Two runs: rows y0.. to the end, then rows 0.. .
        let (head, tail) = src.split_at(ny - y0);
        col[y0..].copy_from_slice(head);
        col[..tail.len()].copy_from_slice(tail);
        col[tail.len()..y0].fill(zero);
    } else {
        col.fill(zero);
        let mut gy = y0;
        for &v in src {
            col[gy] += v;
            gy += 1;
            if gy == ny {
                gy = 0;
            }
        }
    }
}

/// Multiplies every column of `block` (columns of length `f.len()`) element by element by `f`,
/// real and imaginary parts separately.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn scale_columns(block: &mut [Complex<f32>], f: &[Complex<f32>]) {
    for col in block.chunks_exact_mut(f.len()) {
        for (c, g) in col.iter_mut().zip(f) {
            c.re *= g.re;
            c.im *= g.im;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_convolution_theorem() {
        let (ny, nx) = (12, 10);
        let mut f = Fft2::new(ny, nx);
        let a: Vec<f32> = (0..ny * nx).map(|i| ((i * 7919) % 13) as f32).collect();
        let mut spec = vec![Complex::new(0.0, 0.0); f.spectrum_len()];
        f.forward(&a, &mut spec);
        let mut back = vec![0.0; ny * nx];
        f.inverse(&mut spec, &mut back);
        for (x, y) in a.iter().zip(&back) {
            assert!((x - y / (nx * ny) as f32).abs() < 1e-4);
        }
        // Circular convolution with a shifted delta shifts the array.
        let mut d = vec![0.0f32; ny * nx];
        d[2 * nx + 3] = 1.0;
        let mut sa = vec![Complex::new(0.0, 0.0); f.spectrum_len()];
        let mut sd = sa.clone();
        f.forward(&a, &mut sa);
        f.forward(&d, &mut sd);
        for (x, y) in sa.iter_mut().zip(&sd) {
            *x *= *y / (nx * ny) as f32;
        }
        let mut conv = vec![0.0; ny * nx];
        f.inverse(&mut sa, &mut conv);
        for y in 0..ny {
            for x in 0..nx {
                let src = ((y + ny - 2) % ny) * nx + (x + nx - 3) % nx;
                assert!((conv[y * nx + x] - a[src]).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn wrapped_filtered_transform_equals_the_full_one() {
        // The wrapped transform of a compact array equals the full transform of the array
        // wrapped onto the grid, also when it is larger than the grid and wraps onto itself,
        // for even and odd sizes and odd and even numbers of kernel rows. One `Fft2` per size
        // serves several kernels, so stale buffer contents would show.
        for &(ny, nx) in &[(12usize, 10usize), (9, 7), (7, 9), (16, 16)] {
            let mut f = Fft2::new(ny, nx);
            for &(side, centre) in &[(5usize, 2usize), (4, 3), (13, 6), (25, 12), (6, 3), (3, 1)] {
                let k: Vec<f64> = (0..side * side)
                    .map(|i| ((i * 31) % 17) as f64 * 0.25 + 0.01)
                    .collect();
                let mut grid = vec![0.0f32; ny * nx];
                for ky in 0..side {
                    for kx in 0..side {
                        let gy = (ky + 10 * ny - centre) % ny;
                        let gx = (kx + 10 * nx - centre) % nx;
                        grid[gy * nx + gx] += k[ky * side + kx] as f32;
                    }
                }
                let mut full = vec![Complex::new(0.0, 0.0); f.spectrum_len()];
                let mut wrapped = full.clone();
                f.forward(&grid, &mut full);
                let fx: Vec<f32> = (0..nx / 2 + 1).map(|k| 1.0 - 0.05 * k as f32).collect();
                let fy: Vec<f32> = (0..ny).map(|k| 0.5 + 0.1 * k as f32).collect();
                f.forward_wrapped_filtered(&k, side, centre, &fx, &fy, &mut wrapped);
                for kx in 0..nx / 2 + 1 {
                    for ky in 0..ny {
                        full[kx * ny + ky] *= fx[kx] * fy[ky];
                    }
                }
                let peak = full.iter().map(|c| c.norm()).fold(0.0f32, f32::max);
                for (a, b) in full.iter().zip(&wrapped) {
                    assert!(
                        (a - b).norm() < 1e-5 * peak,
                        "{ny}x{nx}, side {side}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
