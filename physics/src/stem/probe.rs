//! The one probe model of the three STEM simulators.
//!
//! A probe is the coherent, aperture-limited and aberrated wave of [`ProbeSpec`] (intensity
//! `|ψ|²` from [`ProbeCalculator`], chromatic defocus spread included), blurred by the
//! incoherent Gaussian image of the source of standard deviation `source_sigma`. Each simulator
//! asks [`ProbeModel`] for the form it needs:
//!
//! - the full simulator ([`StemSimulator`](crate::stem::StemSimulator)): the coherent intensity
//!   binned onto image pixels ([`ProbeModel::binned`]) and the source blur as the transfer
//!   function [`source_transfer`] of its frame convolution;
//! - the lattice model ([`LatticeSimulator`](crate::stem::lattice::LatticeSimulator)): the
//!   intensity on its fine grid ([`ProbeModel::fine`]), transformed at the reciprocal lattice
//!   vectors and multiplied by [`source_transfer`];
//! - the light dopant model ([`DopantSimulator`](crate::stem::dopant::DopantSimulator)): the
//!   round Gaussian of the same probe ([`ProbeModel::gaussian_sigma`]): the focused FWHM (the
//!   Airy FWHM `0.514 λ/α` and the source FWHM added in quadrature) widened by the geometric
//!   blur of defocus and two-fold astigmatism. Its `probe_fwhm` maps onto a source size by
//!   [`ProbeModel::from_focused_fwhm`], exactly as
//!   [`stem_config_for_dopant`](crate::stem::equivalent::stem_config_for_dopant) maps it for the
//!   full simulator.

use crate::constants::{AIRY_FWHM, FWHM_PER_SIGMA};
use crate::stem::optics::electron_wavelength;
use crate::stem::optics::{Aberrations, OpticsConfig, ProbeCalculator, ProbeSpec};
use std::f64::consts::PI;

/// The source-size blur σ (m) that, added in quadrature to the aberration-free probe of `energy`
/// (eV) and convergence semi-angle `alpha` (rad), gives an intensity FWHM of `fwhm` (m); 0 when
/// the diffraction limit alone is already wider.
pub fn source_sigma_for_fwhm(fwhm: f64, energy: f64, alpha: f64) -> f64 {
    let airy = AIRY_FWHM * electron_wavelength(energy) / alpha;
    (fwhm * fwhm - airy * airy).max(0.0).sqrt() / FWHM_PER_SIGMA
}

/// The transfer function of a Gaussian source blur of standard deviation `sigma` (m) at spatial
/// frequency squared `f2` (1/m²): `T = exp(−2π²σ²f²)`, the Fourier transform of the normalized
/// Gaussian.
#[inline]
pub fn source_transfer(sigma: f64, f2: f64) -> f64 {
    (-(2.0 * PI * PI * sigma * sigma) * f2).exp()
}

/// A probe: its coherent part and the Gaussian source blur. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeModel {
    /// The coherent probe (energy, convergence angle, aberrations, chromatic spread).
    pub spec: ProbeSpec,
    /// Standard deviation of the Gaussian source image, m.
    pub source_sigma: f64,
}

impl ProbeModel {
    /// The probe of `optics` (resolved values) with `aberrations` in force and the configured
    /// source size.
    pub fn new(optics: &OpticsConfig, aberrations: Aberrations) -> Self {
        Self {
            spec: optics.probe_spec(aberrations),
            source_sigma: optics.source_size.get(),
        }
    }

    /// A monochromatic probe of `energy` (eV) and convergence semi-angle `alpha` (rad) whose
    /// aberration-free intensity FWHM is `fwhm` (m), reached with the source blur of
    /// [`source_sigma_for_fwhm`] (a `fwhm` below the Airy FWHM gives the Airy probe), with
    /// `aberrations` in force.
    pub fn from_focused_fwhm(energy: f64, alpha: f64, fwhm: f64, aberrations: Aberrations) -> Self {
        Self {
            spec: ProbeSpec {
                energy,
                alpha,
                aberrations,
                cc: 0.0,
                energy_spread: 0.0,
            },
            source_sigma: source_sigma_for_fwhm(fwhm, energy, alpha),
        }
    }

    /// Intensity FWHM of the aberration-free probe (Airy and source added in quadrature), m.
    pub fn focused_fwhm(&self) -> f64 {
        let airy = AIRY_FWHM * electron_wavelength(self.spec.energy) / self.spec.alpha;
        airy.hypot(FWHM_PER_SIGMA * self.source_sigma)
    }

    /// σ (m) of the round Gaussian the light models use for this probe:
    /// `σ² = (FWHM₀/2√(2 ln 2))² + α²(C10² + C12²)/4` with `FWHM₀` the
    /// [focused FWHM](Self::focused_fwhm) (the second term is the per-axis variance of the
    /// uniform disc of radius `α·C` that defocus or astigmatism `C` spreads the cone into).
    pub fn gaussian_sigma(&self) -> f64 {
        let s0 = self.focused_fwhm() / FWHM_PER_SIGMA;
        let (a, ab) = (self.spec.alpha, &self.spec.aberrations);
        (s0 * s0 + a * a * (ab.c10 * ab.c10 + ab.c12 * ab.c12) / 4.0).sqrt()
    }

    /// The source blur's transfer at spatial frequency squared `f2` (1/m²), see
    /// [`source_transfer`].
    pub fn source_transfer(&self, f2: f64) -> f64 {
        source_transfer(self.source_sigma, f2)
    }

    /// The coherent intensity (chromatic spread included, source blur not) binned onto image
    /// pixels of size `dx` (m), as a square kernel of side `n/m` pixels centred at index
    /// `side/2`, summing to 1; the probe grid spans at most `max_extent` (m). Returns the side.
    /// See [`ProbeCalculator::binned_probe`].
    pub fn binned(
        &self,
        calc: &mut ProbeCalculator,
        dx: f64,
        max_extent: f64,
        out: &mut Vec<f64>,
    ) -> usize {
        calc.binned_probe(&self.spec, dx, max_extent, out)
    }

    /// The coherent intensity on the fine grid that resolves it for image pixels `dx` (m),
    /// spanning at most `max_extent` (m), left in [`ProbeCalculator::intensity`] (centred at
    /// `(n/2, n/2)`, summing to 1). Returns the grid side `n` and fine pixel (m).
    pub fn fine(&self, calc: &mut ProbeCalculator, dx: f64, max_extent: f64) -> (usize, f64) {
        let (_, n, fdx) = ProbeCalculator::fine_geometry(&self.spec, dx, max_extent);
        calc.fine_intensity(&self.spec, n, fdx);
        (n, fdx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fwhm_constants_are_the_closed_forms() {
        assert!((FWHM_PER_SIGMA - 2.0 * (2.0 * std::f64::consts::LN_2).sqrt()).abs() < 1e-15);
        // Airy: [2J₁(v)/v]² = 1/2 at v = 1.6163 (J₁ by its series), FWHM = 2v/(2π) λ/α.
        let j1 = |v: f64| {
            let (mut term, mut sum) = (v / 2.0, 0.0);
            for k in 0..30 {
                sum += term;
                term *= -(v * v / 4.0) / ((k + 1) as f64 * (k + 2) as f64);
            }
            sum
        };
        let half = |v: f64| (2.0 * j1(v) / v).powi(2) - 0.5;
        let (mut lo, mut hi) = (1.0, 2.0);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if half(mid) > 0.0 { lo = mid } else { hi = mid }
        }
        let fwhm = 2.0 * lo / (2.0 * PI);
        assert!((fwhm - AIRY_FWHM).abs() < 1e-3, "{fwhm}");
    }

    #[test]
    fn the_light_gaussian_has_the_asked_fwhm_and_the_geometric_blur() {
        // 60 kV, 30 mrad: Airy FWHM 0.834 Å; a 1.1 Å probe is reached with the source blur.
        let p = ProbeModel::from_focused_fwhm(60e3, 30e-3, 1.1e-10, Aberrations::default());
        assert!((p.focused_fwhm() - 1.1e-10).abs() < 1e-22);
        assert!((p.gaussian_sigma() - 1.1e-10 / FWHM_PER_SIGMA).abs() < 1e-22);
        // Below the diffraction limit the probe is the Airy disc.
        let airy = ProbeModel::from_focused_fwhm(60e3, 30e-3, 0.5e-10, Aberrations::default());
        assert_eq!(airy.source_sigma, 0.0);
        assert!((airy.focused_fwhm() - 0.514 * electron_wavelength(60e3) / 30e-3).abs() < 1e-22);
        // Defocus 10 nm at 30 mrad: a disc of radius 3 Å, variance 2.25 Å² per axis.
        let ab = Aberrations {
            c10: 10e-9,
            ..Aberrations::default()
        };
        let d = ProbeModel::from_focused_fwhm(60e3, 30e-3, 1.1e-10, ab);
        let s0 = 1.1e-10 / FWHM_PER_SIGMA;
        let expected = (s0 * s0 + 2.25e-20).sqrt();
        assert!((d.gaussian_sigma() / expected - 1.0).abs() < 1e-12);
    }

    #[test]
    fn source_transfer_is_the_gaussian_transform() {
        // σ = 1 Å at f = 1/(2π σ) · √2: exp(−2π²σ² · 2/(4π²σ²)) = e⁻¹.
        let s = 1e-10;
        let f = 2f64.sqrt() / (2.0 * PI * s);
        assert!((source_transfer(s, f * f) - (-1f64).exp()).abs() < 1e-15);
        assert_eq!(source_transfer(0.0, 1e30), 1.0);
    }
}
