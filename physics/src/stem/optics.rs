//! Electron optics: wavelength, aberration function, probe formation.
//!
//! The probe is `ψ(r) = F⁻¹[A(k) e^{-iχ(k)}]` with a hard aperture `A(k) = 1` for `λ|k| ≤ α`
//! and the aberration function in Krivanek notation (DESIGN.md §4):
//!
//! `χ(θ,φ) = 2π/λ · Σ_{n,m} C_{n,m} θ^{n+1}/(n+1) · cos m(φ − φ_{n,m})`
//!
//! over the round terms C10 (defocus), C30 (Cs), C50 (C5) and the non-round ones up to fifth
//! order: C12 (two-fold astigmatism), C21 (axial coma), C23 (three-fold astigmatism), C32 (star),
//! C34 (four-fold astigmatism), C41 (fourth-order coma), C43 (three-lobe), C45 (five-fold
//! astigmatism), C52, C54 and C56 (fifth-order two-, four- and six-fold terms), as in Krivanek,
//! Dellby & Lupini, Ultramicroscopy 78 (1999) 1, Table 1 (Haider's S3, A3, B4, D4, A4, S5, R5 and
//! A5 name the same terms with other numerical factors). Every coefficient defaults to 0 except where the
//! [`OpticsConfig`] of a scenario sets C30 and C50.
//!
//! The intensity `|ψ|²` is computed on a fine grid that resolves the aperture (pixel ≤ λ/(4α)),
//! optionally summed over a Gauss-Hermite set of defoci for chromatic spread, binned onto the
//! image grid and normalized to sum to 1. Source-size blur is applied by the image formation
//! step as a Gaussian transfer function.

use crate::constants::{
    ELECTRON_MASS, ELECTRON_REST_ENERGY_EV, ELEMENTARY_CHARGE, FWHM_PER_SIGMA, PLANCK,
    SPEED_OF_LIGHT,
};
use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::{Angle, Energy, Length};
use crate::quadrature::gauss_hermite;
use num_complex::Complex;
use rustfft::{Fft, FftPlanner};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use std::sync::Arc;

/// Relativistic electron wavelength in metres for a kinetic energy in eV:
/// `λ = h / sqrt(2 m₀ e E (1 + e E / (2 m₀ c²)))`.
///
/// ```
/// let l = scopegym_physics::stem::optics::electron_wavelength(60e3);
/// assert!((l - 4.866e-12).abs() < 0.005e-12);
/// ```
pub fn electron_wavelength(energy_ev: f64) -> f64 {
    let e = energy_ev * ELEMENTARY_CHARGE;
    PLANCK
        / (2.0
            * ELECTRON_MASS
            * e
            * (1.0 + e / (2.0 * ELECTRON_MASS * SPEED_OF_LIGHT * SPEED_OF_LIGHT)))
            .sqrt()
}

/// Electron momentum times c, in eV: `pc = sqrt(E (E + 2 m₀c²))`.
pub fn electron_momentum_ev(energy_ev: f64) -> f64 {
    (energy_ev * (energy_ev + 2.0 * ELECTRON_REST_ENERGY_EV)).sqrt()
}

/// Electron speed over c, β.
pub fn electron_beta(energy_ev: f64) -> f64 {
    let gamma = 1.0 + energy_ev / ELECTRON_REST_ENERGY_EV;
    (1.0 - 1.0 / (gamma * gamma)).sqrt()
}

/// Coherent aberrations of the probe-forming lens (Krivanek notation), SI units.
///
/// Magnitudes in metres, azimuths in radians. Two-fold astigmatism may also be read and written
/// in Cartesian form `(C12a, C12b) = C12 (cos 2φ12, sin 2φ12)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Aberrations {
    /// Defocus C10, m (positive = overfocus convention of Krivanek: χ grows with C10). Default 0.
    pub c10: f64,
    /// Two-fold astigmatism C12, m. Default 0.
    pub c12: f64,
    /// Azimuth of C12, rad. Default 0.
    pub phi12: f64,
    /// Axial coma C21, m. Default 0.
    pub c21: f64,
    /// Azimuth of C21, rad. Default 0.
    pub phi21: f64,
    /// Three-fold astigmatism C23, m. Default 0.
    pub c23: f64,
    /// Azimuth of C23, rad. Default 0.
    pub phi23: f64,
    /// Third-order spherical aberration C30 (Cs), m. Default 0.
    pub c30: f64,
    /// Fifth-order spherical aberration C50, m. Default 0.
    pub c50: f64,
    /// Third-order star aberration C32, m (χ term `θ⁴/4 · C32 cos 2(φ − φ32)`). Default 0
    /// (a few µm uncorrected to ~1 µm after a corrector's tuning; Krivanek et al. 1999).
    pub c32: f64,
    /// Azimuth of C32, rad. Default 0.
    pub phi32: f64,
    /// Four-fold astigmatism C34, m (`θ⁴/4 · C34 cos 4(φ − φ34)`). Default 0 (typically
    /// 0.1-1 µm on a tuned corrector).
    pub c34: f64,
    /// Azimuth of C34, rad. Default 0.
    pub phi34: f64,
    /// Fourth-order axial coma C41, m (`θ⁵/5 · C41 cos(φ − φ41)`). Default 0 (typically
    /// 1-10 µm).
    pub c41: f64,
    /// Azimuth of C41, rad. Default 0.
    pub phi41: f64,
    /// Fourth-order three-lobe aberration C43, m (`θ⁵/5 · C43 cos 3(φ − φ43)`). Default 0
    /// (typically 1-10 µm).
    pub c43: f64,
    /// Azimuth of C43, rad. Default 0.
    pub phi43: f64,
    /// Five-fold astigmatism C45, m (`θ⁵/5 · C45 cos 5(φ − φ45)`). Default 0 (typically
    /// 1-10 µm; the limiting term of many quadrupole-octupole correctors).
    pub c45: f64,
    /// Azimuth of C45, rad. Default 0.
    pub phi45: f64,
    /// Fifth-order two-fold aberration C52, m (`θ⁶/6 · C52 cos 2(φ − φ52)`). Default 0
    /// (typically 0.1-1 mm).
    pub c52: f64,
    /// Azimuth of C52, rad. Default 0.
    pub phi52: f64,
    /// Fifth-order four-fold aberration C54, m (`θ⁶/6 · C54 cos 4(φ − φ54)`). Default 0
    /// (typically 0.1-1 mm).
    pub c54: f64,
    /// Azimuth of C54, rad. Default 0.
    pub phi54: f64,
    /// Six-fold astigmatism C56, m (`θ⁶/6 · C56 cos 6(φ − φ56)`). Default 0 (typically
    /// 0.1-5 mm, the usual limit of a hexapole corrector).
    pub c56: f64,
    /// Azimuth of C56, rad. Default 0.
    pub phi56: f64,
}

/// One non-round term of χ above third order in the aperture angle: order `n` (power `n + 1` of
/// θ), fold `m`, magnitude (m) and azimuth (rad).
#[derive(Debug, Clone, Copy, PartialEq)]
struct HigherTerm {
    n: u8,
    m: u8,
    c: f64,
    phi: f64,
}

/// Writes [`Aberrations::NAMES`], [`Aberrations::values`] and [`Aberrations::from_values`] from
/// one list of the fields.
macro_rules! aberration_coefficients {
    ($($f:ident),* $(,)?) => {
        impl Aberrations {
            /// The coefficients' names (the serde keys), in the order of [`Self::values`].
            pub const NAMES: [&'static str; Self::COUNT] = [$(stringify!($f)),*];

            /// Every coefficient (m or rad), in the order of [`Self::NAMES`].
            pub fn values(&self) -> [f64; Self::COUNT] {
                [$(self.$f),*]
            }

            /// The aberrations from coefficients in the order of [`Self::NAMES`].
            pub fn from_values(v: [f64; Self::COUNT]) -> Self {
                let [$($f),*] = v;
                Self { $($f),* }
            }
        }
    };
}

aberration_coefficients!(
    c10, c12, phi12, c21, phi21, c23, phi23, c30, c50, c32, phi32, c34, phi34, c41, phi41, c43,
    phi43, c45, phi45, c52, phi52, c54, phi54, c56, phi56
);

impl Aberrations {
    /// Number of coefficients ([`Self::NAMES`]).
    pub const COUNT: usize = 25;

    /// The non-round terms of orders 3 to 5 (C32 … C56) with their names.
    fn higher_terms(&self) -> [(&'static str, &'static str, HigherTerm); 8] {
        let t = |n, m, c, phi| HigherTerm { n, m, c, phi };
        [
            ("c32", "phi32", t(3, 2, self.c32, self.phi32)),
            ("c34", "phi34", t(3, 4, self.c34, self.phi34)),
            ("c41", "phi41", t(4, 1, self.c41, self.phi41)),
            ("c43", "phi43", t(4, 3, self.c43, self.phi43)),
            ("c45", "phi45", t(4, 5, self.c45, self.phi45)),
            ("c52", "phi52", t(5, 2, self.c52, self.phi52)),
            ("c54", "phi54", t(5, 4, self.c54, self.phi54)),
            ("c56", "phi56", t(5, 6, self.c56, self.phi56)),
        ]
    }

    /// Cartesian two-fold astigmatism `(C12a, C12b)`, m.
    pub fn c12_cartesian(&self) -> (f64, f64) {
        (
            self.c12 * (2.0 * self.phi12).cos(),
            self.c12 * (2.0 * self.phi12).sin(),
        )
    }

    /// Sets two-fold astigmatism from Cartesian components, m.
    pub fn set_c12_cartesian(&mut self, a: f64, b: f64) {
        self.c12 = a.hypot(b);
        self.phi12 = if self.c12 > 0.0 {
            0.5 * b.atan2(a)
        } else {
            0.0
        };
    }

    /// Checks every value is finite and every magnitude non-negative.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let vals = [
            ("c10", self.c10),
            ("c12", self.c12),
            ("phi12", self.phi12),
            ("c21", self.c21),
            ("phi21", self.phi21),
            ("c23", self.c23),
            ("phi23", self.phi23),
            ("c30", self.c30),
            ("c50", self.c50),
        ];
        let higher = self.higher_terms();
        let higher_vals = higher
            .iter()
            .flat_map(|&(cn, pn, t)| [(cn, t.c), (pn, t.phi)]);
        for (n, v) in vals.into_iter().chain(higher_vals) {
            if !v.is_finite() {
                return Err(PhysicsError::param(
                    format!("{prefix}{n}"),
                    "must be finite",
                ));
            }
        }
        let magnitudes = [("c12", self.c12), ("c21", self.c21), ("c23", self.c23)];
        for (n, v) in magnitudes
            .into_iter()
            .chain(higher.iter().map(|&(cn, _, t)| (cn, t.c)))
        {
            if v < 0.0 {
                return Err(PhysicsError::param(
                    format!("{prefix}{n}"),
                    "a magnitude must be >= 0 (use the azimuth for direction)",
                ));
            }
        }
        Ok(())
    }

    /// The aberration phase χ in radians at scattering angle components `(θx, θy)` (rad) for
    /// wavelength `lambda` (m).
    pub fn chi(&self, lambda: f64, tx: f64, ty: f64) -> f64 {
        let t2 = tx * tx + ty * ty;
        let theta = t2.sqrt();
        let phi = ty.atan2(tx);
        2.0 * PI / lambda
            * (t2 / 2.0 * (self.c10 + self.c12 * (2.0 * (phi - self.phi12)).cos())
                + theta * t2 / 3.0
                    * (self.c21 * (phi - self.phi21).cos()
                        + self.c23 * (3.0 * (phi - self.phi23)).cos())
                + t2 * t2 / 4.0 * self.c30
                + t2 * t2 * t2 / 6.0 * self.c50
                + self
                    .higher_terms()
                    .iter()
                    .map(|&(_, _, t)| {
                        let k = f64::from(t.n) + 1.0;
                        t.c * theta.powf(k) / k * (f64::from(t.m) * (phi - t.phi)).cos()
                    })
                    .sum::<f64>())
    }

    /// The aberration function in Cartesian form for wavelength `lambda` (m): no trigonometry
    /// per evaluation, for filling the aperture.
    pub fn cartesian(&self, lambda: f64) -> ChiCartesian {
        let (c12a, c12b) = self.c12_cartesian();
        ChiCartesian {
            pref: 2.0 * PI / lambda,
            c10: self.c10,
            c12: [c12a, c12b],
            c21: [self.c21 * self.phi21.cos(), self.c21 * self.phi21.sin()],
            c23: [
                self.c23 * (3.0 * self.phi23).cos(),
                self.c23 * (3.0 * self.phi23).sin(),
            ],
            c30: self.c30,
            c50: self.c50,
            higher: self.higher_terms().map(|(_, _, t)| {
                let (s, c) = (f64::from(t.m) * t.phi).sin_cos();
                let k = f64::from(t.n) + 1.0;
                [t.c * c / k, t.c * s / k]
            }),
            has_higher: self.higher_terms().iter().any(|(_, _, t)| t.c != 0.0),
        }
    }

    /// Geometric-optics blur radius at the aperture edge, m: `max |∇χ| λ / 2π` over θ ≤ α,
    /// bounded above by the sum of the terms' contributions.
    pub fn geometric_radius(&self, alpha: f64) -> f64 {
        self.c10.abs() * alpha
            + self.c12 * alpha
            + (self.c21 + self.c23) * alpha * alpha
            + self.c30.abs() * alpha.powi(3)
            + self.c50.abs() * alpha.powi(5)
            + self
                .higher_terms()
                .iter()
                .map(|&(_, _, t)| t.c * alpha.powi(i32::from(t.n)))
                .sum::<f64>()
    }
}

/// [`Aberrations`] with the azimuths folded into Cartesian coefficients (see
/// [`Aberrations::cartesian`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChiCartesian {
    pref: f64,
    c10: f64,
    c12: [f64; 2],
    c21: [f64; 2],
    c23: [f64; 2],
    c30: f64,
    c50: f64,
    /// `C_{n,m} (cos mφ, sin mφ) / (n + 1)` of C32, C34, C41, C43, C45, C52, C54, C56.
    higher: [[f64; 2]; 8],
    /// Whether any of `higher` is non-zero (otherwise χ is evaluated as without them, so the
    /// result is the same to the bit).
    has_higher: bool,
}

impl ChiCartesian {
    /// χ in radians at angles `(θx, θy)` (rad), using θ² cos2φ = θx²−θy², θ² sin2φ = 2θxθy,
    /// θ³ cos3φ = θx³−3θxθy², θ³ sin3φ = 3θx²θy−θy³.
    #[inline]
    pub fn chi(&self, tx: f64, ty: f64) -> f64 {
        let t2 = tx * tx + ty * ty;
        let chi = self.pref
            * (0.5
                * (self.c10 * t2
                    + self.c12[0] * (tx * tx - ty * ty)
                    + self.c12[1] * 2.0 * tx * ty)
                + t2 * (self.c21[0] * tx + self.c21[1] * ty) / 3.0
                + (self.c23[0] * (tx * tx * tx - 3.0 * tx * ty * ty)
                    + self.c23[1] * (3.0 * tx * tx * ty - ty * ty * ty))
                    / 3.0
                + 0.25 * self.c30 * t2 * t2
                + self.c50 * t2 * t2 * t2 / 6.0);
        if self.has_higher {
            chi + self.pref * self.higher_chi(tx, ty, t2)
        } else {
            chi
        }
    }

    /// The non-round terms of orders 3-5 over `2π/λ`, using `θ^m cos mφ = Re zᵐ` and
    /// `θ^m sin mφ = Im zᵐ` with `z = θx + iθy`, so `θ^{n+1} cos m(φ − φ₀) = θ^{n+1−m}
    /// (cos mφ₀ Re zᵐ + sin mφ₀ Im zᵐ)` (`n + 1 − m` is even for every term).
    fn higher_chi(&self, tx: f64, ty: f64, t2: f64) -> f64 {
        let mul = |a: [f64; 2], b: [f64; 2]| [a[0] * b[0] - a[1] * b[1], a[0] * b[1] + a[1] * b[0]];
        let z1 = [tx, ty];
        let z2 = mul(z1, z1);
        let z3 = mul(z2, z1);
        let z4 = mul(z2, z2);
        let z5 = mul(z4, z1);
        let z6 = mul(z3, z3);
        let h = &self.higher;
        let dot = |c: [f64; 2], z: [f64; 2]| c[0] * z[0] + c[1] * z[1];
        let t4 = t2 * t2;
        t2 * dot(h[0], z2)
            + dot(h[1], z4)
            + t4 * dot(h[2], z1)
            + t2 * dot(h[3], z3)
            + dot(h[4], z5)
            + t4 * dot(h[5], z2)
            + t2 * dot(h[6], z4)
            + dot(h[7], z6)
    }
}

/// Probe-forming optics as configured in a scenario (`[optics]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpticsConfig {
    /// Beam (kinetic) energy, eV. Default 60 keV.
    pub energy: Param<Energy>,
    /// Convergence semi-angle α, rad. Default 30 mrad.
    pub convergence_angle: Param<Angle>,
    /// Defocus C10, m. Default 0.
    pub c10: Param<Length>,
    /// Two-fold astigmatism C12, m. Default 0.
    pub c12: Param<Length>,
    /// Azimuth of C12, rad. Default 0.
    pub phi12: Param<Angle>,
    /// Axial coma C21, m. Default 0.
    pub c21: Param<Length>,
    /// Azimuth of C21, rad. Default 0.
    pub phi21: Param<Angle>,
    /// Three-fold astigmatism C23, m. Default 0.
    pub c23: Param<Length>,
    /// Azimuth of C23, rad. Default 0.
    pub phi23: Param<Angle>,
    /// Spherical aberration C30, m. Default 123 nm (a corrected instrument; uncorrected ≈ 1 mm).
    pub c30: Param<Length>,
    /// Fifth-order spherical aberration C50, m. Default 0.55 mm.
    pub c50: Param<Length>,
    /// C32, m (see [`Aberrations::c32`]). Default 0.
    pub c32: Param<Length>,
    /// Azimuth of C32, rad. Default 0.
    pub phi32: Param<Angle>,
    /// C34, m (see [`Aberrations::c34`]). Default 0.
    pub c34: Param<Length>,
    /// Azimuth of C34, rad. Default 0.
    pub phi34: Param<Angle>,
    /// C41, m (see [`Aberrations::c41`]). Default 0.
    pub c41: Param<Length>,
    /// Azimuth of C41, rad. Default 0.
    pub phi41: Param<Angle>,
    /// C43, m (see [`Aberrations::c43`]). Default 0.
    pub c43: Param<Length>,
    /// Azimuth of C43, rad. Default 0.
    pub phi43: Param<Angle>,
    /// C45, m (see [`Aberrations::c45`]). Default 0.
    pub c45: Param<Length>,
    /// Azimuth of C45, rad. Default 0.
    pub phi45: Param<Angle>,
    /// C52, m (see [`Aberrations::c52`]). Default 0.
    pub c52: Param<Length>,
    /// Azimuth of C52, rad. Default 0.
    pub phi52: Param<Angle>,
    /// C54, m (see [`Aberrations::c54`]). Default 0.
    pub c54: Param<Length>,
    /// Azimuth of C54, rad. Default 0.
    pub phi54: Param<Angle>,
    /// C56, m (see [`Aberrations::c56`]). Default 0.
    pub c56: Param<Length>,
    /// Azimuth of C56, rad. Default 0.
    pub phi56: Param<Angle>,
    /// Effective source size, Gaussian σ, m. Default 0.35 Å.
    pub source_size: Param<Length>,
    /// Chromatic aberration coefficient Cc, m. Default 1 mm.
    pub cc: Param<Length>,
    /// Energy spread of the source, FWHM, eV. Default 0 (chromatic blur off; 0.3 eV is typical
    /// of a cold field emitter).
    pub energy_spread: Param<Energy>,
}

impl Default for OpticsConfig {
    fn default() -> Self {
        Self {
            energy: Param::fixed(60e3),
            convergence_angle: Param::fixed(30e-3),
            c10: Param::fixed(0.0),
            c12: Param::fixed(0.0),
            phi12: Param::fixed(0.0),
            c21: Param::fixed(0.0),
            phi21: Param::fixed(0.0),
            c23: Param::fixed(0.0),
            phi23: Param::fixed(0.0),
            c30: Param::fixed(123e-9),
            c50: Param::fixed(0.55e-3),
            c32: Param::fixed(0.0),
            phi32: Param::fixed(0.0),
            c34: Param::fixed(0.0),
            phi34: Param::fixed(0.0),
            c41: Param::fixed(0.0),
            phi41: Param::fixed(0.0),
            c43: Param::fixed(0.0),
            phi43: Param::fixed(0.0),
            c45: Param::fixed(0.0),
            phi45: Param::fixed(0.0),
            c52: Param::fixed(0.0),
            phi52: Param::fixed(0.0),
            c54: Param::fixed(0.0),
            phi54: Param::fixed(0.0),
            c56: Param::fixed(0.0),
            phi56: Param::fixed(0.0),
            source_size: Param::fixed(0.35e-10),
            cc: Param::fixed(1e-3),
            energy_spread: Param::fixed(0.0),
        }
    }
}

impl OpticsConfig {
    /// The probe of these optics (resolved values) with the aberrations `aberrations` in force.
    pub fn probe_spec(&self, aberrations: Aberrations) -> ProbeSpec {
        ProbeSpec {
            energy: self.energy.get(),
            alpha: self.convergence_angle.get(),
            aberrations,
            cc: self.cc.get(),
            energy_spread: self.energy_spread.get(),
        }
    }

    /// The coherent aberrations this config starts with.
    pub fn aberrations(&self) -> Aberrations {
        Aberrations {
            c10: self.c10.get(),
            c12: self.c12.get(),
            phi12: self.phi12.get(),
            c21: self.c21.get(),
            phi21: self.phi21.get(),
            c23: self.c23.get(),
            phi23: self.phi23.get(),
            c30: self.c30.get(),
            c50: self.c50.get(),
            c32: self.c32.get(),
            phi32: self.phi32.get(),
            c34: self.c34.get(),
            phi34: self.phi34.get(),
            c41: self.c41.get(),
            phi41: self.phi41.get(),
            c43: self.c43.get(),
            phi43: self.phi43.get(),
            c45: self.c45.get(),
            phi45: self.phi45.get(),
            c52: self.c52.get(),
            phi52: self.phi52.get(),
            c54: self.c54.get(),
            phi54: self.phi54.get(),
            c56: self.c56.get(),
            phi56: self.phi56.get(),
        }
    }

    /// Checks ranges; `prefix` is prepended to field names in errors.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let e = self.energy.get();
        if !(1e3..=1e6).contains(&e) {
            return Err(PhysicsError::param(
                format!("{prefix}energy"),
                format!("must be 1 keV to 1 MeV, got {e} eV"),
            ));
        }
        let a = self.convergence_angle.get();
        if !(a > 0.0 && a <= 0.2) {
            return Err(PhysicsError::param(
                format!("{prefix}convergence_angle"),
                format!("must be in (0, 0.2] rad, got {a}"),
            ));
        }
        for (n, v) in [
            ("source_size", self.source_size.get()),
            ("cc", self.cc.get()),
            ("energy_spread", self.energy_spread.get()),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(PhysicsError::param(
                    format!("{prefix}{n}"),
                    format!("must be finite and >= 0, got {v}"),
                ));
            }
        }
        self.aberrations().validate(prefix)
    }
}

/// Everything that fixes the probe's shape: the probe is recomputed only when this changes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeSpec {
    /// Beam energy, eV.
    pub energy: f64,
    /// Convergence semi-angle, rad.
    pub alpha: f64,
    /// Coherent aberrations.
    pub aberrations: Aberrations,
    /// Chromatic aberration Cc, m.
    pub cc: f64,
    /// Energy spread FWHM, eV (0 = monochromatic).
    pub energy_spread: f64,
}

impl ProbeSpec {
    /// Standard deviation of the defocus spread from chromatic aberration, m:
    /// `σ_f = Cc · (ΔE/2√(2 ln 2)) / E · (1 + E/m₀c²)/(1 + E/2m₀c²)`.
    pub fn defocus_spread(&self) -> f64 {
        let e = self.energy;
        let rel = (1.0 + e / ELECTRON_REST_ENERGY_EV) / (1.0 + e / (2.0 * ELECTRON_REST_ENERGY_EV));
        self.cc * (self.energy_spread / FWHM_PER_SIGMA) / e * rel
    }
}

/// Number of Gauss-Hermite nodes of the chromatic defocus average (from
/// [`crate::quadrature::gauss_hermite`]).
const CHROMATIC_NODES: usize = 7;

/// Computes probe intensities on a fine grid and bins them onto an image grid, reusing FFT plans
/// and buffers between calls.
pub struct ProbeCalculator {
    planner: FftPlanner<f32>,
    plan: Option<(usize, Arc<dyn Fft<f32>>)>,
    /// The coherent probe: its spectrum (transposed), then ψ (row-major).
    field: Vec<Complex<f32>>,
    /// Second `n × n` buffer of the 2-D transform.
    work: Vec<Complex<f32>>,
    intensity: Vec<f64>,
    scratch: Vec<Complex<f32>>,
    /// Indices of the spectrum rows and columns inside the aperture band.
    band: Vec<usize>,
    /// Fine-grid side length (pixels) of the last computation.
    pub fine_n: usize,
    /// Fine-grid pixel size of the last computation, m.
    pub fine_dx: f64,
}

impl std::fmt::Debug for ProbeCalculator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeCalculator")
            .field("fine_n", &self.fine_n)
            .field("fine_dx", &self.fine_dx)
            .finish()
    }
}

impl Default for ProbeCalculator {
    fn default() -> Self {
        Self::new()
    }
}

/// Smallest n' ≥ n whose prime factors are 2, 3, 5 and 7 only (sizes with fast FFT butterflies).
pub fn next_fast_len(n: usize) -> usize {
    let mut m = n.max(1);
    loop {
        let mut r = m;
        for p in [2, 3, 5, 7] {
            while r % p == 0 {
                r /= p;
            }
        }
        if r == 1 {
            return m;
        }
        m += 1;
    }
}

impl ProbeCalculator {
    /// A calculator with no cached plans.
    pub fn new() -> Self {
        Self {
            planner: FftPlanner::new(),
            plan: None,
            field: Vec::new(),
            work: Vec::new(),
            intensity: Vec::new(),
            scratch: Vec::new(),
            band: Vec::new(),
            fine_n: 0,
            fine_dx: 0.0,
        }
    }

    /// Fine-grid geometry for an image pixel `dx`: (subsampling factor m, side n, fine pixel).
    ///
    /// The fine pixel `dx/m` is at most λ/(4α) so that the probe intensity (band limit 2α/λ) is
    /// sampled without aliasing; the side covers the geometric blur and diffraction tails, at most
    /// `max_extent`.
    pub fn fine_geometry(spec: &ProbeSpec, dx: f64, max_extent: f64) -> (usize, usize, f64) {
        let lambda = electron_wavelength(spec.energy);
        let limit = lambda / (4.0 * spec.alpha);
        let m = ((dx / limit).ceil() as usize).max(1);
        let fdx = dx / m as f64;
        // Radius holding the probe: geometric blur of the aberrations and chromatic spread, plus
        // 3 λ/α of diffraction (97 % of an Airy disc's intensity lies inside).
        let chrom = 3.0 * spec.defocus_spread() * spec.alpha;
        let radius =
            spec.aberrations.geometric_radius(spec.alpha) + chrom + 3.0 * lambda / spec.alpha;
        let max_side = ((max_extent / dx).floor() as usize).max(8);
        let mut side = (2 * ((radius / dx).ceil() as usize + 2)).clamp(8, max_side);
        // The fine grid (side · m) must be a fast FFT length.
        while next_fast_len(side * m) != side * m {
            side += 1;
        }
        (m, side * m, fdx)
    }

    /// Computes the probe intensity binned onto image pixels of size `dx` (m), as a square kernel
    /// of side `n/m` image pixels centred at index `side/2`, summing to 1. `out` is resized.
    pub fn binned_probe(
        &mut self,
        spec: &ProbeSpec,
        dx: f64,
        max_extent: f64,
        out: &mut Vec<f64>,
    ) -> usize {
        let (m, n, fdx) = Self::fine_geometry(spec, dx, max_extent);
        // Centre the probe on the centre of kernel bin side/2: fine index (side/2)·m + (m-1)/2.
        self.fine_intensity_shifted(spec, n, fdx, 0.5 * (m as f64 - 1.0));
        let side = n / m;
        out.clear();
        if m == 1 {
            out.extend_from_slice(&self.intensity);
        } else {
            out.resize(side * side, 0.0);
            // Each bin sums its m × m fine pixels row by row (the order of a row-major scan).
            for (fy, row) in self.intensity.chunks_exact(n).enumerate() {
                let bins = &mut out[(fy / m) * side..(fy / m + 1) * side];
                for (o, fine) in bins.iter_mut().zip(row.chunks_exact(m)) {
                    for &v in fine {
                        *o += v;
                    }
                }
            }
        }
        let s = sum_f64(out);
        if s > 0.0 {
            let inv = 1.0 / s;
            out.iter_mut().for_each(|v| *v *= inv);
        }
        side
    }

    /// Computes `|ψ|²` on an `n × n` grid of pixel `dx` (m), centred at `(n/2, n/2)`, normalized to
    /// sum 1 (incoherent sum over defoci when the energy spread is non-zero). The result is in
    /// [`ProbeCalculator::intensity`].
    pub fn fine_intensity(&mut self, spec: &ProbeSpec, n: usize, dx: f64) {
        self.fine_intensity_shifted(spec, n, dx, 0.0);
    }

    /// As [`Self::fine_intensity`], with the probe centred at `(n/2 + shift, n/2 + shift)` fine
    /// pixels (a sub-pixel shift applied exactly as a phase ramp).
    pub fn fine_intensity_shifted(&mut self, spec: &ProbeSpec, n: usize, dx: f64, shift: f64) {
        self.fine_n = n;
        self.fine_dx = dx;
        let plan = match &self.plan {
            Some((pn, p)) if *pn == n => p.clone(),
            _ => {
                let p = self.planner.plan_fft_inverse(n);
                self.plan = Some((n, p.clone()));
                p
            }
        };
        self.intensity.clear();
        self.intensity.resize(n * n, 0.0);
        let sigma_f = spec.defocus_spread();
        let gh = gauss_hermite(CHROMATIC_NODES);
        // Without a spread only the middle node (exactly 0) is needed.
        let mid = CHROMATIC_NODES / 2;
        let nodes: &[(f64, f64)] = if sigma_f > 0.0 { gh } else { &gh[mid..=mid] };
        let norm_w: f64 = nodes.iter().map(|x| x.1).sum();
        for &(z, w) in nodes {
            let mut ab = spec.aberrations;
            ab.c10 += z * sigma_f;
            self.coherent_probe(spec, &ab, n, dx, shift, &*plan);
            let total = sum_norm_sqr(&self.field);
            let scale = w / norm_w / total.max(f64::MIN_POSITIVE);
            // Field index (0,0) is r = 0; shift by n/2 to centre: row y goes to row (y + h) mod n,
            // and within a row x goes to (x + h) mod n (two runs).
            let h = n / 2;
            for (y, src) in self.field.chunks_exact(n).enumerate() {
                let sy = (y + h) % n;
                let dst = &mut self.intensity[sy * n..(sy + 1) * n];
                let (a, b) = src.split_at(n - h);
                let (d_lo, d_hi) = dst.split_at_mut(h);
                for (d, c) in d_hi.iter_mut().zip(a) {
                    *d += f64::from(c.norm_sqr()) * scale;
                }
                for (d, c) in d_lo.iter_mut().zip(b) {
                    *d += f64::from(c.norm_sqr()) * scale;
                }
            }
        }
    }

    /// The fine-grid intensity of the last computation (row-major, side [`Self::fine_n`]).
    pub fn intensity(&self) -> &[f64] {
        &self.intensity
    }

    fn coherent_probe(
        &mut self,
        spec: &ProbeSpec,
        ab: &Aberrations,
        n: usize,
        dx: f64,
        shift: f64,
        plan: &dyn Fft<f32>,
    ) {
        let lambda = electron_wavelength(spec.energy);
        let dk = 1.0 / (n as f64 * dx);
        let kmax = spec.alpha / lambda;
        self.field.clear();
        self.field.resize(n * n, Complex::new(0.0, 0.0));
        let chi_of = ab.cartesian(lambda);
        let kidx = |i: usize| {
            if i <= n / 2 {
                i as f64
            } else {
                i as f64 - n as f64
            }
        };
        self.band.clear();
        self.band
            .extend((0..n).filter(|&i| (kidx(i) * dk).abs() <= kmax));
        // The spectrum is stored transposed (column ix of the spectrum is row ix of `field`), so
        // that the first pass of the inverse transform runs along y on the band's rows only.
        for &ix in &self.band {
            let tx = kidx(ix) * dk * lambda;
            let col = &mut self.field[ix * n..(ix + 1) * n];
            for &iy in &self.band {
                let ty = kidx(iy) * dk * lambda;
                let t2 = tx * tx + ty * ty;
                if t2 > spec.alpha * spec.alpha {
                    continue;
                }
                let chi = chi_of.chi(tx, ty);
                // Shift by `shift` pixels along x and y: ψ(r - s) ↔ Ψ(k) e^{-2πi k·s}.
                let ramp = 2.0 * PI * shift * (kidx(ix) + kidx(iy)) / n as f64;
                let (s, c) = (chi + ramp).sin_cos();
                col[iy] = Complex::new(c as f32, -s as f32);
            }
        }
        // 2-D inverse FFT: along y on the band's columns (the others are zero), one transpose,
        // then along x on every row; ψ ends up row-major in `field`.
        let need = plan.get_inplace_scratch_len();
        self.scratch.resize(need, Complex::new(0.0, 0.0));
        self.work.resize(n * n, Complex::new(0.0, 0.0));
        for &ix in &self.band {
            plan.process_with_scratch(&mut self.field[ix * n..(ix + 1) * n], &mut self.scratch);
        }
        transpose(&self.field, &mut self.work, n, n);
        plan.process_with_scratch(&mut self.work, &mut self.scratch);
        std::mem::swap(&mut self.field, &mut self.work);
    }
}

/// Sum of `|c|²` in f64 over four interleaved partial sums (vectorizable).
fn sum_norm_sqr(v: &[Complex<f32>]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = v.chunks_exact(4);
    let rest: f64 = chunks
        .remainder()
        .iter()
        .map(|c| f64::from(c.norm_sqr()))
        .sum();
    for c in chunks {
        for (a, z) in acc.iter_mut().zip(c) {
            *a += f64::from(z.norm_sqr());
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + rest
}

/// Sum over four interleaved partial sums (vectorizable).
fn sum_f64(v: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = v.chunks_exact(4);
    let rest: f64 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + rest
}

/// Out-of-place transpose of a row-major `rows × cols` matrix into `cols × rows`.
pub fn transpose<T: Copy>(src: &[T], dst: &mut [T], rows: usize, cols: usize) {
    // The `transpose` crate takes (input width, input height).
    ::transpose::transpose(src, dst, cols, rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defocus, two- and three-fold astigmatism, coma, C3 and C5 set; C32 … C56 zero: the
    /// base of the test probes.
    fn low_order() -> Aberrations {
        Aberrations {
            c10: 3e-9,
            c12: 2e-9,
            phi12: 0.4,
            c21: 50e-9,
            phi21: 1.0,
            c23: 30e-9,
            phi23: -0.3,
            c30: 1e-6,
            c50: 1e-3,
            ..Aberrations::default()
        }
    }

    #[test]
    fn coefficient_names_are_the_serde_keys_in_value_order() {
        let a = Aberrations::from_values(std::array::from_fn(|i| i as f64 + 1.0));
        let t = toml::Value::try_from(a).unwrap();
        assert_eq!(t.as_table().unwrap().len(), Aberrations::COUNT);
        for (i, name) in Aberrations::NAMES.iter().enumerate() {
            assert_eq!(t[*name].as_float(), Some(i as f64 + 1.0), "{name}");
        }
        assert_eq!(Aberrations::from_values(a.values()), a);
    }

    #[test]
    fn wavelengths_match_reference_values() {
        // DESIGN.md: 60 kV → 4.866 pm, 200 kV → 2.508 pm (0.1 %).
        let l60 = electron_wavelength(60e3);
        let l200 = electron_wavelength(200e3);
        assert!((l60 / 4.866e-12 - 1.0).abs() < 1e-3, "{l60}");
        assert!((l200 / 2.508e-12 - 1.0).abs() < 1e-3, "{l200}");
    }

    #[test]
    fn chi_matches_cartesian_form_used_for_the_probe() {
        let ab = Aberrations {
            c32: 2e-6,
            phi32: 0.3,
            c34: 1e-6,
            phi34: -0.8,
            c41: 5e-6,
            phi41: 2.1,
            c43: 4e-6,
            phi43: 0.6,
            c45: 3e-6,
            phi45: -1.7,
            c52: 0.2e-3,
            phi52: 1.2,
            c54: 0.3e-3,
            phi54: -0.4,
            c56: 1e-3,
            phi56: 0.05,
            ..low_order()
        };
        let lambda = electron_wavelength(100e3);
        let cartesian = ab.cartesian(lambda);
        for &(tx, ty) in &[(0.01, 0.0), (0.003, -0.02), (-0.015, 0.012)] {
            let cart = cartesian.chi(tx, ty);
            let polar = ab.chi(lambda, tx, ty);
            assert!(
                (cart - polar).abs() < 1e-9 * polar.abs().max(1.0),
                "{cart} vs {polar}"
            );
        }
    }

    /// Every non-round term of orders 3-5 (C32 … C56) alone, 1 µm at azimuth φ₀ = 0.2 rad,
    /// evaluated with `2π/λ = 10¹² /m` at θ = 0.1 rad: the closed form of Krivanek et al. (1999),
    /// `χ = 2π/λ · C θ^{n+1}/(n+1) · cos m(φ − φ₀)`, gives `10⁶ · 0.1^{n+1}/(n+1)` rad on the
    /// term's axis φ = φ₀ (25 rad for n = 3, 2 rad for n = 4, 1/6 rad for n = 5), its negative at
    /// φ = φ₀ + π/m and zero at φ = φ₀ + π/(2m); χ is unchanged by a rotation of 2π/m.
    #[test]
    fn higher_order_terms_follow_the_closed_form_and_their_symmetry() {
        type Set = fn(&mut Aberrations, f64, f64);
        let terms: [(&str, u8, u8, f64, Set); 8] = [
            ("c32", 3, 2, 25.0, |a, c, p| (a.c32, a.phi32) = (c, p)),
            ("c34", 3, 4, 25.0, |a, c, p| (a.c34, a.phi34) = (c, p)),
            ("c41", 4, 1, 2.0, |a, c, p| (a.c41, a.phi41) = (c, p)),
            ("c43", 4, 3, 2.0, |a, c, p| (a.c43, a.phi43) = (c, p)),
            ("c45", 4, 5, 2.0, |a, c, p| (a.c45, a.phi45) = (c, p)),
            ("c52", 5, 2, 1.0 / 6.0, |a, c, p| (a.c52, a.phi52) = (c, p)),
            ("c54", 5, 4, 1.0 / 6.0, |a, c, p| (a.c54, a.phi54) = (c, p)),
            ("c56", 5, 6, 1.0 / 6.0, |a, c, p| (a.c56, a.phi56) = (c, p)),
        ];
        let lambda = 2.0 * PI * 1e-12;
        let (theta, phi0) = (0.1, 0.2);
        for (name, _n, m, on_axis, set) in terms {
            let mut ab = Aberrations::default();
            set(&mut ab, 1e-6, phi0);
            ab.validate("").unwrap();
            let cart = ab.cartesian(lambda);
            let at = |phi: f64| {
                let (tx, ty) = (theta * phi.cos(), theta * phi.sin());
                (cart.chi(tx, ty), ab.chi(lambda, tx, ty))
            };
            let m = f64::from(m);
            for (phi, want) in [
                (phi0, on_axis),
                (phi0 + PI / m, -on_axis),
                (phi0 + PI / (2.0 * m), 0.0),
            ] {
                let (c, p) = at(phi);
                assert!(
                    (c - want).abs() < 1e-9 * on_axis,
                    "{name} φ={phi}: {c} vs {want}"
                );
                assert!(
                    (p - want).abs() < 1e-9 * on_axis,
                    "{name} φ={phi}: {p} vs {want}"
                );
            }
            // m-fold symmetry at an arbitrary azimuth, and no other term leaks in.
            for phi in [0.37, 1.9, -2.4] {
                let (c0, _) = at(phi);
                let (c1, _) = at(phi + 2.0 * PI / m);
                assert!((c0 - c1).abs() < 1e-9 * on_axis, "{name}: {c0} vs {c1}");
                let want = on_axis * (m * (phi - phi0)).cos();
                assert!((c0 - want).abs() < 1e-9 * on_axis, "{name}: {c0} vs {want}");
            }
            // A negative magnitude is refused by name.
            let mut bad = Aberrations::default();
            set(&mut bad, -1e-6, 0.0);
            match bad.validate("optics.") {
                Err(PhysicsError::InvalidParameter { field, .. }) => {
                    assert_eq!(field, format!("optics.{name}"))
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    /// The aberration function of the terms up to C50 as it was before C32 … C56 existed.
    fn chi_before_higher_orders(ab: &Aberrations, lambda: f64, tx: f64, ty: f64) -> f64 {
        let (c12a, c12b) = ab.c12_cartesian();
        let c21 = [ab.c21 * ab.phi21.cos(), ab.c21 * ab.phi21.sin()];
        let c23 = [
            ab.c23 * (3.0 * ab.phi23).cos(),
            ab.c23 * (3.0 * ab.phi23).sin(),
        ];
        let t2 = tx * tx + ty * ty;
        2.0 * PI / lambda
            * (0.5 * (ab.c10 * t2 + c12a * (tx * tx - ty * ty) + c12b * 2.0 * tx * ty)
                + t2 * (c21[0] * tx + c21[1] * ty) / 3.0
                + (c23[0] * (tx * tx * tx - 3.0 * tx * ty * ty)
                    + c23[1] * (3.0 * tx * tx * ty - ty * ty * ty))
                    / 3.0
                + 0.25 * ab.c30 * t2 * t2
                + ab.c50 * t2 * t2 * t2 / 6.0)
    }

    /// With C32 … C56 zero (whatever their azimuths) χ and the probe are the same to the bit as
    /// without the new terms.
    #[test]
    fn probes_without_higher_orders_are_unchanged_bit_for_bit() {
        let low = low_order();
        let lambda = electron_wavelength(60e3);
        let cart = low.cartesian(lambda);
        for i in -20..=20 {
            for j in -20..=20 {
                let (tx, ty) = (f64::from(i) * 1.7e-3, f64::from(j) * 1.3e-3);
                let old = chi_before_higher_orders(&low, lambda, tx, ty);
                assert_eq!(cart.chi(tx, ty).to_bits(), old.to_bits(), "({tx}, {ty})");
            }
        }
        let zero_with_azimuths = Aberrations {
            phi32: 0.3,
            phi34: 1.1,
            phi41: -0.7,
            phi43: 2.0,
            phi45: 0.9,
            phi52: -1.3,
            phi54: 0.5,
            phi56: 2.9,
            ..Aberrations::default()
        };
        for ab in [Aberrations::default(), zero_with_azimuths] {
            let spec = ProbeSpec {
                energy: 60e3,
                alpha: 30e-3,
                aberrations: ab,
                cc: 0.0,
                energy_spread: 0.0,
            };
            let mut calc = ProbeCalculator::new();
            let mut kernel = Vec::new();
            calc.binned_probe(&spec, 0.2e-10, 2e-9, &mut kernel);
            // The aberration-free probe by the pre-change evaluation: the same spectrum with the
            // old χ (which is 0 for these aberrations) is the unshifted, phase-free aperture.
            let zero = chi_before_higher_orders(&ab, electron_wavelength(60e3), 0.01, 0.02);
            assert_eq!(zero.to_bits(), 0.0f64.to_bits());
            let mut reference = Vec::new();
            ProbeCalculator::new().binned_probe(
                &ProbeSpec {
                    aberrations: Aberrations::default(),
                    ..spec
                },
                0.2e-10,
                2e-9,
                &mut reference,
            );
            assert_eq!(kernel.len(), reference.len());
            assert!(
                kernel
                    .iter()
                    .zip(&reference)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }

    /// A four-fold astigmatism C34 (with defocus, which breaks the χ → −χ symmetry of the
    /// intensity) gives a probe with four-fold symmetry: on the periodic grid centred on the
    /// probe its intensity is unchanged by a 90° rotation, while with φ34 = π/8 its mirror image
    /// about the x axis (which turns the C34 term into its negative) differs.
    #[test]
    fn a_c34_probe_has_four_fold_symmetry() {
        let spec = ProbeSpec {
            energy: 60e3,
            alpha: 30e-3,
            aberrations: Aberrations {
                c10: 3e-9,
                c34: 5e-6,
                phi34: PI / 8.0,
                ..Aberrations::default()
            },
            cc: 0.0,
            energy_spread: 0.0,
        };
        let mut calc = ProbeCalculator::new();
        let n = 128usize;
        calc.fine_intensity(&spec, n, 0.04e-10);
        let im = calc.intensity();
        let c = (n / 2) as i64;
        let at = |dx: i64, dy: i64| {
            let (x, y) = ((c + dx).rem_euclid(n as i64), (c + dy).rem_euclid(n as i64));
            im[y as usize * n + x as usize]
        };
        let (mut rot, mut mirror, mut total) = (0.0, 0.0, 0.0);
        for dy in -c..c {
            for dx in -c..c {
                let v = at(dx, dy);
                total += v;
                rot += (v - at(-dy, dx)).abs();
                mirror += (v - at(dx, -dy)).abs();
            }
        }
        assert!(rot < 1e-4 * total, "{rot} of {total}");
        assert!(mirror > 1e-2 * total, "{mirror} of {total}");
    }

    #[test]
    fn cartesian_astigmatism_round_trips() {
        let mut ab = Aberrations::default();
        ab.set_c12_cartesian(3e-9, -4e-9);
        assert!((ab.c12 - 5e-9).abs() < 1e-20);
        let (a, b) = ab.c12_cartesian();
        assert!((a - 3e-9).abs() < 1e-18 && (b + 4e-9).abs() < 1e-18);
    }

    #[test]
    fn fast_lengths() {
        assert_eq!(next_fast_len(256), 256);
        assert_eq!(next_fast_len(257), 270);
        assert_eq!(next_fast_len(289), 294);
        assert_eq!(next_fast_len(331), 336);
    }
}
