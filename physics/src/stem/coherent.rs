//! Coherent detection of a thin specimen: the Ronchigram and bright-field (BF) and annular
//! bright-field (ABF) signals, next to the incoherent HAADF image (opt-in: no task uses them
//! yet).
//!
//! The probe `ψ_p(r) = F⁻¹[A(k) e^{−iχ(k)}]` (hard aperture α, the aberration function of
//! [`Aberrations`]; monochromatic, no source blur: the coherent limit) passes a thin specimen
//! of transmission `t(r) = exp(i σ V_proj(r))` (the phase-object approximation), and the
//! detector plane sees the far field `I(θ) = |F[ψ_p · t](θ/λ)|²`, normalized to one incident
//! electron. That intensity is the **Ronchigram**; a detector collecting `inner ≤ |θ| ≤ outer`
//! records the fraction `Σ I` over its annulus: a bright-field detector has `inner = 0`,
//! `outer ≲ α`; an annular bright-field detector `inner ≈ α/2`, `outer ≈ α`.
//!
//! The projected potential is a sum of round Gaussians, one per atom, each of standard
//! deviation the Thomas-Fermi screening radius `R = 0.885 a₀ Z^{−1/3}` and of integrated phase
//! `∫σV d²r = γ λ f_e(0)`, with `f_e(0) = 2 Z R²/a₀` the forward scattering amplitude of the
//! screened (Wentzel) atom (Reimer & Kohl, *Transmission Electron Microscopy*, 5th ed., §5.1.2;
//! within about 40 % of tabulated `f_e(0)`, e.g. 1.5 Å vs 2.5 Å for carbon).
//!
//! Reference reproduced (tests): the Ronchigram of a defocused probe is a shadow image of the
//! specimen magnified by `1/Δf` in angle, so a lattice of spacing `d` gives fringes of angular
//! period `d/|Δf|` inside the bright-field disc (the interference of the direct and diffracted
//! discs: `χ(θ) − χ(θ − λg) = 2π Δf g θ − π Δf λ g²` for pure defocus); and for an
//! aberration-free probe a small axial BF detector sees no phase contrast from a weak phase
//! object to first order, while an ABF detector sees light atoms dark.

use crate::constants::{BOHR_RADIUS, ELECTRON_REST_ENERGY_EV};
use crate::error::{PhysicsError, Result};
use crate::stem::optics::{ProbeSpec, electron_wavelength};
use num_complex::Complex;
use rustfft::FftPlanner;
use std::f64::consts::PI;

/// A round detector in the far field collecting scattering angles `inner ≤ θ ≤ outer` (rad).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnnularDetector {
    /// Inner collection semi-angle, rad (0 for a bright-field disc).
    pub inner: f64,
    /// Outer collection semi-angle, rad.
    pub outer: f64,
}

impl AnnularDetector {
    /// Checks `0 ≤ inner < outer ≤ max_angle` (rad); `name` names the detector in errors.
    pub fn validate(&self, name: &str, max_angle: f64) -> Result<()> {
        if !(self.inner >= 0.0 && self.inner < self.outer && self.outer.is_finite()) {
            return Err(PhysicsError::param(
                format!("{name}.inner"),
                format!(
                    "need 0 <= inner < outer (rad), got [{}, {}]",
                    self.inner, self.outer
                ),
            ));
        }
        if self.outer > max_angle {
            return Err(PhysicsError::param(
                format!("{name}.outer"),
                format!(
                    "must be at most the grid's largest angle λ/(2dx) = {max_angle:e} rad, got {:e}",
                    self.outer
                ),
            ));
        }
        Ok(())
    }
}

/// Integrated phase `∫ σ V_proj d²r` (rad·m²) of one atom of atomic number `z` for electrons of
/// `energy` (eV): `γ λ f_e(0)` with the screened-atom `f_e(0) = 2 Z R²/a₀` (module docs).
pub fn atom_phase(z: u8, energy: f64) -> f64 {
    let gamma = 1.0 + energy / ELECTRON_REST_ENERGY_EV;
    let r = screening_radius(z);
    gamma * electron_wavelength(energy) * 2.0 * f64::from(z) * r * r / BOHR_RADIUS
}

/// Thomas-Fermi screening radius `0.885 a₀ Z^{−1/3}`, m.
pub fn screening_radius(z: u8) -> f64 {
    0.885 * BOHR_RADIUS * f64::from(z.max(1)).powf(-1.0 / 3.0)
}

/// A square grid of `n × n` pixels of size `dx` (m) centred on the probe: position of pixel
/// `(i, j)` (row, column) is `((j − n/2)·dx, (i − n/2)·dx)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoherentGrid {
    /// Side, pixels.
    pub n: usize,
    /// Pixel size, m.
    pub dx: f64,
}

impl CoherentGrid {
    /// Checks the grid for probe `spec`: 16 to 4096 pixels a side; the largest angle on the
    /// grid, `λ/(2dx)`, must exceed the aperture α.
    pub fn validate(&self, spec: &ProbeSpec) -> Result<()> {
        if !(16..=4096).contains(&self.n) {
            return Err(PhysicsError::param(
                "grid.n",
                format!("must be 16..=4096, got {}", self.n),
            ));
        }
        let max = self.max_angle(spec.energy);
        if !(self.dx > 0.0 && max > spec.alpha) {
            return Err(PhysicsError::param(
                "grid.dx",
                format!(
                    "must be > 0 with λ/(2dx) above the aperture {} rad, got {:e} m",
                    spec.alpha, self.dx
                ),
            ));
        }
        Ok(())
    }

    /// Largest scattering angle on the grid, `λ/(2dx)`, rad.
    pub fn max_angle(&self, energy: f64) -> f64 {
        electron_wavelength(energy) / (2.0 * self.dx)
    }

    /// Angular size of a far-field pixel, `λ/(n dx)`, rad.
    pub fn angular_pixel(&self, energy: f64) -> f64 {
        electron_wavelength(energy) / (self.n as f64 * self.dx)
    }

    /// The weak-phase transmission `exp(iφ(r))` of atoms at positions (m, relative to the grid
    /// centre) with atomic numbers, each a Gaussian phase of [`atom_phase`] and width
    /// [`screening_radius`] (module docs), row-major.
    pub fn transmission(
        &self,
        atoms: impl IntoIterator<Item = ([f64; 2], u8)>,
        energy: f64,
    ) -> Vec<Complex<f64>> {
        let n = self.n;
        let mut phase = vec![0.0f64; n * n];
        let c = (n / 2) as f64;
        for (p, z) in atoms {
            let s = screening_radius(z);
            let amp = atom_phase(z, energy) / (2.0 * PI * s * s);
            let reach = (4.0 * s / self.dx).ceil() as i64 + 1;
            let (u, v) = (p[0] / self.dx + c, p[1] / self.dx + c);
            let (j0, i0) = (u.round() as i64, v.round() as i64);
            for i in (i0 - reach)..=(i0 + reach) {
                if i < 0 || i >= n as i64 {
                    continue;
                }
                let dy = (i as f64 - v) * self.dx;
                for j in (j0 - reach)..=(j0 + reach) {
                    if j < 0 || j >= n as i64 {
                        continue;
                    }
                    let dxx = (j as f64 - u) * self.dx;
                    phase[i as usize * n + j as usize] +=
                        amp * (-(dxx * dxx + dy * dy) / (2.0 * s * s)).exp();
                }
            }
        }
        phase
            .into_iter()
            .map(|ph| Complex::from_polar(1.0, ph))
            .collect()
    }

    /// The Ronchigram `|F[ψ_p · t]|²` of probe `spec` (centred on the grid) through the
    /// transmission `t` (row-major, `n × n`, e.g. from [`Self::transmission`]), summing to 1,
    /// row-major with the optic axis θ = 0 at pixel `(n/2, n/2)` and pixels of
    /// [`Self::angular_pixel`] (column = θx, row = θy).
    pub fn ronchigram(&self, spec: &ProbeSpec, t: &[Complex<f64>]) -> Result<Vec<f64>> {
        self.validate(spec)?;
        let n = self.n;
        if t.len() != n * n {
            return Err(PhysicsError::arg(
                "transmission",
                format!("must hold n² = {} values, got {}", n * n, t.len()),
            ));
        }
        let lambda = electron_wavelength(spec.energy);
        let dk = 1.0 / (n as f64 * self.dx);
        let chi = spec.aberrations.cartesian(lambda);
        let sidx = |i: usize| i as f64 - (n / 2) as f64;
        // The probe's spectrum A e^{−iχ}, centred (index n/2 is k = 0), with the phase ramp
        // that centres ψ at pixel (n/2, n/2) in real space: (−1)^(i+j) for even n.
        let mut field = vec![Complex::new(0.0, 0.0); n * n];
        for i in 0..n {
            let ty = sidx(i) * dk * lambda;
            for j in 0..n {
                let tx = sidx(j) * dk * lambda;
                if tx * tx + ty * ty <= spec.alpha * spec.alpha {
                    field[i * n + j] = Complex::from_polar(1.0, -chi.chi(tx, ty));
                }
            }
        }
        let mut planner = FftPlanner::<f64>::new();
        // ψ = F⁻¹[Ψ]: with centred spectra, shift, transform, shift back (fftshift by the
        // (−1)^(i+j) modulation for even n, exact).
        checkerboard(&mut field, n);
        fft2(&mut planner, &mut field, n, true);
        checkerboard(&mut field, n);
        let norm: f64 = field.iter().map(|c| c.norm_sqr()).sum();
        for (f, tv) in field.iter_mut().zip(t) {
            *f *= *tv;
        }
        checkerboard(&mut field, n);
        fft2(&mut planner, &mut field, n, false);
        checkerboard(&mut field, n);
        let total: f64 = field.iter().map(|c| c.norm_sqr()).sum();
        let scale = 1.0 / total.max(norm * f64::MIN_POSITIVE).max(f64::MIN_POSITIVE);
        Ok(field.iter().map(|c| c.norm_sqr() * scale).collect())
    }

    /// The pixels of a Ronchigram of this grid at `energy` (eV) with their scattering angles:
    /// `(θx, θy, value)` (rad), row by row (θy), the beam axis at pixel `(n/2, n/2)`.
    pub fn with_angles<'a>(
        &self,
        ronchigram: &'a [f64],
        energy: f64,
    ) -> impl Iterator<Item = (f64, f64, f64)> + 'a {
        let n = self.n;
        let a = self.angular_pixel(energy);
        let c = (n / 2) as f64;
        ronchigram
            .chunks_exact(n)
            .enumerate()
            .flat_map(move |(i, row)| {
                let ty = (i as f64 - c) * a;
                row.iter()
                    .enumerate()
                    .map(move |(j, &v)| ((j as f64 - c) * a, ty, v))
            })
    }

    /// The fraction of the beam a detector collects from a Ronchigram of this grid at `energy`
    /// (eV): the sum over pixels with `inner ≤ |θ| ≤ outer`.
    pub fn detector_signal(&self, ronchigram: &[f64], energy: f64, det: &AnnularDetector) -> f64 {
        let (lo, hi) = (det.inner * det.inner, det.outer * det.outer);
        self.with_angles(ronchigram, energy)
            .filter(|(tx, ty, _)| (lo..=hi).contains(&(tx * tx + ty * ty)))
            .map(|(_, _, v)| v)
            .sum()
    }
}

/// Multiplies by `(−1)^(i+j)`: the shift by n/2 along both axes of a transform of even side.
fn checkerboard(v: &mut [Complex<f64>], n: usize) {
    for (i, row) in v.chunks_exact_mut(n).enumerate() {
        for (j, x) in row.iter_mut().enumerate() {
            if (i + j) % 2 == 1 {
                *x = -*x;
            }
        }
    }
}

/// In-place 2-D FFT of a row-major `n × n` array (forward or inverse, unnormalized).
fn fft2(planner: &mut FftPlanner<f64>, v: &mut [Complex<f64>], n: usize, inverse: bool) {
    let plan = if inverse {
        planner.plan_fft_inverse(n)
    } else {
        planner.plan_fft_forward(n)
    };
    let mut scratch = vec![Complex::new(0.0, 0.0); plan.get_inplace_scratch_len()];
    for row in v.chunks_exact_mut(n) {
        plan.process_with_scratch(row, &mut scratch);
    }
    let mut t = vec![Complex::new(0.0, 0.0); n * n];
    crate::stem::optics::transpose(v, &mut t, n, n);
    for row in t.chunks_exact_mut(n) {
        plan.process_with_scratch(row, &mut scratch);
    }
    crate::stem::optics::transpose(&t, v, n, n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stem::optics::Aberrations;

    fn spec(alpha: f64, ab: Aberrations) -> ProbeSpec {
        ProbeSpec {
            energy: 60e3,
            alpha,
            aberrations: ab,
            cc: 0.0,
            energy_spread: 0.0,
        }
    }

    /// Angular period (rad) of the fringes along θx inside `0.8 α`: the period among `trial`
    /// maximizing the DFT magnitude of the Ronchigram's band |θy| < α/4.
    fn fringe_period(g: &CoherentGrid, r: &[f64], alpha: f64, trials: &[f64]) -> f64 {
        // The band, and its mean, subtracted so that the bright disc itself does not leak into
        // the transform.
        let band: Vec<(f64, f64)> = g
            .with_angles(r, 60e3)
            .filter(|(tx, ty, _)| ty.abs() <= 0.25 * alpha && tx.abs() < 0.8 * alpha)
            .map(|(tx, _, v)| (tx, v))
            .collect();
        let mean = band.iter().map(|(_, v)| v).sum::<f64>() / band.len() as f64;
        let mut best = (0.0, 0.0);
        for &p in trials {
            let (mut re, mut im) = (0.0, 0.0);
            for (tx, v) in &band {
                re += (v - mean) * (2.0 * PI * tx / p).cos();
                im += (v - mean) * (2.0 * PI * tx / p).sin();
            }
            let m = re.hypot(im);
            if m > best.1 {
                best = (p, m);
            }
        }
        best.0
    }

    /// A phase grating of spacing d = 5 Å along x seen through a probe defocused by Δf: the
    /// shadow fringes in the Ronchigram have the angular period d/Δf, within 3 %. The direct and
    /// the two first-order discs interfere to `−4 J₀J₁ cos(2πΔf g θ) sin(πΔf λ g²)`, so the
    /// defoci are taken where the Talbot factor `|sin(πΔf λ g²)|` is 1: `Δf = (k + ½)/(λg²)`,
    /// 128 nm and 180 nm for k = 2, 3 at 60 kV (periods 3.9 and 2.8 mrad).
    #[test]
    fn ronchigram_fringes_have_the_shadow_magnification() {
        let g = CoherentGrid {
            n: 256,
            dx: 0.5e-10,
        };
        let d = 5e-10;
        let c = (g.n / 2) as f64;
        let t: Vec<Complex<f64>> = (0..g.n * g.n)
            .map(|k| {
                let x = ((k % g.n) as f64 - c) * g.dx;
                Complex::from_polar(1.0, 0.3 * (2.0 * PI * x / d).cos())
            })
            .collect();
        let alpha = 20e-3;
        let trials: Vec<f64> = (0..400).map(|k| 1e-3 + k as f64 * 0.02e-3).collect();
        let lambda = electron_wavelength(60e3);
        for k in [2.0, 3.0] {
            let df = (k + 0.5) * d * d / lambda;
            let ab = Aberrations {
                c10: df,
                ..Aberrations::default()
            };
            let r = g.ronchigram(&spec(alpha, ab), &t).unwrap();
            assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            let p = fringe_period(&g, &r, alpha, &trials);
            let want = d / df;
            assert!((p / want - 1.0).abs() < 0.03, "Δf {df}: {p} vs {want}");
        }
    }

    /// A single carbon atom (a weak phase object, peak phase 0.2 rad) under an aberration-free
    /// 30 mrad probe: a small axial BF detector (2 mrad) sees under 1 % contrast (no phase
    /// contrast to first order with χ = 0), an annular BF detector (15-30 mrad) sees the atom
    /// dark (by 0.36 % for one atom: the thin-specimen contrast is of second order).
    #[test]
    fn bf_shows_no_weak_phase_contrast_and_abf_shows_light_atoms_dark() {
        let g = CoherentGrid {
            n: 128,
            dx: 0.05e-10,
        };
        let s = spec(30e-3, Aberrations::default());
        let bf = AnnularDetector {
            inner: 0.0,
            outer: 2e-3,
        };
        let abf = AnnularDetector {
            inner: 15e-3,
            outer: 30e-3,
        };
        bf.validate("bf", g.max_angle(60e3)).unwrap();
        abf.validate("abf", g.max_angle(60e3)).unwrap();
        let vacuum = g.ronchigram(&s, &g.transmission([], 60e3)).unwrap();
        let on_atom = g
            .ronchigram(&s, &g.transmission([([0.0, 0.0], 6u8)], 60e3))
            .unwrap();
        let sig = |r: &[f64], d: &AnnularDetector| g.detector_signal(r, 60e3, d);
        let (bf0, bf1) = (sig(&vacuum, &bf), sig(&on_atom, &bf));
        let (abf0, abf1) = (sig(&vacuum, &abf), sig(&on_atom, &abf));
        assert!(bf0 > 0.0 && abf0 > 0.5, "{bf0} {abf0}");
        assert!(((bf1 - bf0) / bf0).abs() < 0.01, "BF {bf0} → {bf1}");
        assert!(abf1 < 0.999 * abf0, "ABF {abf0} → {abf1}");
        // With χ = 0 and the probe on a centrosymmetric atom the first-order term vanishes for
        // every detector, so the contrast is of second order in the phase: a column of twice
        // the phase (two stacked atoms) darkens the ABF signal about four times as much.
        let two = g
            .ronchigram(
                &s,
                &g.transmission([([0.0, 0.0], 6u8), ([0.0, 0.0], 6u8)], 60e3),
            )
            .unwrap();
        let ratio = (abf0 - sig(&two, &abf)) / (abf0 - abf1);
        assert!((ratio - 4.0).abs() < 0.4, "{ratio}");
    }

    #[test]
    fn bad_detectors_and_grids_are_refused_by_name() {
        let g = CoherentGrid { n: 64, dx: 1e-10 };
        let e = AnnularDetector {
            inner: 0.02,
            outer: 0.01,
        }
        .validate("abf", 0.1)
        .unwrap_err();
        assert!(e.to_string().contains("abf.inner"), "{e}");
        // λ/(2dx) = 24 mrad < 30 mrad aperture.
        let e = g
            .ronchigram(&spec(30e-3, Aberrations::default()), &[])
            .unwrap_err();
        assert!(e.to_string().contains("grid.dx"), "{e}");
    }

    /// The full simulator's opt-in methods: a Ronchigram of its graphene at the parked probe
    /// sums to 1, and a carbon column under the probe makes the ABF signal darker than in the
    /// middle of a hexagon (aberration-free probe), while BF detector angles beyond the grid
    /// and a blanked beam are refused by name.
    #[test]
    fn the_full_simulator_exposes_ronchigram_bf_and_abf() {
        use crate::instrument::StemInstrument;
        use crate::param::Param;
        use crate::stem::{StemConfig, StemSimulator};
        let mut cfg = StemConfig::default().without_scan_distortions();
        cfg.scan.pixels = [64, 64];
        cfg.optics.c30 = Param::fixed(0.0);
        cfg.optics.c50 = Param::fixed(0.0);
        cfg.drift.speed = Param::fixed(0.0);
        let mut sim = StemSimulator::new(cfg, 3).unwrap();
        let grid = CoherentGrid {
            n: 64,
            dx: 0.05e-10,
        };
        let abf = AnnularDetector {
            inner: 15e-3,
            outer: 30e-3,
        };
        let bf = AnnularDetector {
            inner: 0.0,
            outer: 2e-3,
        };
        let d = sim.drift_offset();
        // The atom nearest the optic axis (the specimen is periodic: its images near 0).
        let on = sim
            .specimen()
            .atoms
            .iter()
            .map(|a| [a.x + d[0], a.y + d[1]])
            .min_by(|p, q| p[0].hypot(p[1]).total_cmp(&q[0].hypot(q[1])))
            .unwrap();
        sim.move_probe(on).unwrap();
        let r = sim.ronchigram(&grid).unwrap();
        assert_eq!(r.len(), 64 * 64);
        assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let at_atom = sim.coherent_signals(&grid, &[bf, abf]).unwrap();
        // The hexagon centre: a C-C bond (1.42 Å) away from the atom, along any bond is a
        // neighbour, so try the six directions and take the one farthest from every atom.
        let mut best = (0.0, on);
        for k in 0..12 {
            let a = k as f64 * PI / 6.0;
            let p = [on[0] + 1.42e-10 * a.cos(), on[1] + 1.42e-10 * a.sin()];
            let nearest = sim
                .specimen()
                .atoms
                .iter()
                .map(|b| (b.x + d[0] - p[0]).hypot(b.y + d[1] - p[1]))
                .fold(f64::INFINITY, f64::min);
            if nearest > best.0 {
                best = (nearest, p);
            }
        }
        assert!(best.0 > 1.3e-10, "{}", best.0);
        sim.move_probe(best.1).unwrap();
        let hollow = sim.coherent_signals(&grid, &[bf, abf]).unwrap();
        assert!(at_atom[1] < hollow[1], "ABF {at_atom:?} vs {hollow:?}");
        let wide = AnnularDetector {
            inner: 0.0,
            outer: 0.5,
        };
        let e = sim.coherent_signals(&grid, &[bf, wide]).unwrap_err();
        assert!(e.to_string().contains("detectors[1].outer"), "{e}");
        sim.set_blanked(true).unwrap();
        assert!(sim.ronchigram(&grid).is_err());
    }
}
