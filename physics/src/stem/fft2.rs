//! Real 2-D FFTs with reusable plans and buffers (rows by `realfft`, columns by `rustfft`
//! through a blocked transpose). The spectrum is stored transposed: `(nx/2 + 1) × ny`, row `kx`
//! holding all `ky` contiguously.

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
    rows: Vec<Complex<f32>>,
    row_in: Vec<f32>,
    scratch_c: Vec<Complex<f32>>,
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
        let nxc = nx / 2 + 1;
        let scratch = [
            r2c.get_scratch_len(),
            c2r.get_scratch_len(),
            col_fwd.get_inplace_scratch_len(),
            col_inv.get_inplace_scratch_len(),
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
            rows: vec![Complex::new(0.0, 0.0); ny * nxc],
            row_in: vec![0.0; nx],
            scratch_c: vec![Complex::new(0.0, 0.0); scratch.max(1)],
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

    /// As [`Self::forward`], for an input whose rows are zero wherever `nonzero(row)` is false
    /// (those rows' transforms are skipped).
    pub fn forward_sparse_rows(
        &mut self,
        input: &[f32],
        nonzero: impl Fn(usize) -> bool,
        spec: &mut [Complex<f32>],
    ) {
        let (nx, ny, nxc) = (self.nx, self.ny, self.nx / 2 + 1);
        // Zero rows stay zero: clear the spectrum and scatter only the transformed rows into
        // their columns of the transposed layout.
        spec.iter_mut().for_each(|c| *c = Complex::new(0.0, 0.0));
        for y in (0..ny).filter(|&y| nonzero(y)) {
            let out = &mut self.rows[..nxc];
            self.row_in.copy_from_slice(&input[y * nx..(y + 1) * nx]);
            let _ = self
                .r2c
                .process_with_scratch(&mut self.row_in, out, &mut self.scratch_c);
            for (kx, &c) in out.iter().enumerate() {
                spec[kx * ny + y] = c;
            }
        }
        self.col_fwd.process_with_scratch(spec, &mut self.scratch_c);
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
        // The sparse-row transform equals the full one when the skipped rows are zero.
        let mut z = a.clone();
        z[3 * nx..9 * nx].iter_mut().for_each(|v| *v = 0.0);
        let mut full = vec![Complex::new(0.0, 0.0); f.spectrum_len()];
        let mut sparse = full.clone();
        f.forward(&z, &mut full);
        f.forward_sparse_rows(&z, |y| !(3..9).contains(&y), &mut sparse);
        assert_eq!(full, sparse);
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
}
