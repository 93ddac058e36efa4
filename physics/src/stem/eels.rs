//! Electron energy-loss spectra (EELS) at a probe position.
//!
//! Of `N` incident electrons a fraction `collection_efficiency` reaches the spectrometer. With
//! `τ = t/λ` (thickness over inelastic mean free path) the number of valence (plasmon) events
//! per electron is Poisson: `P_n = τⁿ e^{-τ} / n!`. The spectrum is the sum of
//! - the zero-loss peak (ZLP): a Gaussian at 0 eV of FWHM `zlp_fwhm`, weight `P_0`;
//! - the n-th plasmon (n ≥ 1, weight `P_n`): a Drude loss function `E Γ Ep² / ((E² - Ep²)² + (EΓ)²)`
//!   peaked at `n·plasmon_energy` with width `n·plasmon_width` (the self-convolution of Lorentzians
//!   adds widths), tapered by a Gaussian of width `2nΓ` so its tail does not mask the background;
//! - a power-law background `A·E^-r` (valence and edge tails), turned on smoothly around
//!   `background_onset`, carrying `background_fraction` of the inelastic electrons `1 - P_0`;
//! - core-loss edges: per effective atom of element Z, each edge of Z adds the probability
//!   `edge_scale × strength` (see [`Edge`]) with a hydrogenic sawtooth shape: zero below the
//!   onset, a rise smoothed by the ZLP resolution, then `(E/E_onset)^-edge_exponent`. 3d metals get
//!   L3/L2 white lines (Lorentzians, 2:1 area) on top of a split continuum.
//!
//! **Collection angle and beam energy** (off by default). With
//! [`EelsConfig::collection_angle`] β set, each edge's probability follows the small-angle Bethe
//! scaling of the partial cross-section (Egerton, *Electron Energy-Loss Spectroscopy in the
//! Electron Microscope*, 3rd ed., ch. 3): `σ(β, E₀) ∝ ln(1 + β²/θ_E²) / T`, with the
//! characteristic angle `θ_E = E_edge/(2γT)`, `T = m₀v²/2` and γ the beam electron's (energy
//! E₀). [`EelsConfig::edge_scale`] then holds at the reference angle and energy
//! ([`EelsConfig::reference_collection_angle`], [`EelsConfig::reference_energy`]); a smaller β
//! or a higher E₀ collects fewer core-loss electrons, high-energy edges the more so. The beam
//! energy comes from the microscope ([`EelsModel::set_beam_energy`]).
//!
//! Edge electrons are taken from the other components, so a spectrum over a wide enough window
//! sums to `collection_efficiency × N`. Plural scattering of core-loss electrons is ignored.
//!
//! ```
//! use scopegym_physics::stem::eels::{EelsConfig, EelsModel};
//! let m = EelsModel::new(&EelsConfig::default()).unwrap();
//! let mut out = vec![0.0; m.energy_axis().len()];
//! m.expected(&[(6, 1.0)], 1e6, &mut out);
//! let total: f64 = out.iter().sum();
//! assert!((total - 0.8e6).abs() < 0.01 * 0.8e6);
//! ```

use crate::constants::ELECTRON_REST_ENERGY_EV;
use crate::constants::FWHM_PER_SIGMA;
use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::{Angle, Energy, Unitless};
use crate::rng::{PoissonScratch, SimRng, normal, poisson, poisson_fill_batched};
use crate::stem::optics::electron_beta;
use serde::{Deserialize, Serialize};
use std::f64::consts::{PI, SQRT_2};

/// At most this fraction of the collected electrons goes into core-loss edges (the linear
/// single-scattering model saturates there).
const MAX_CORE_FRACTION: f64 = 0.5;

/// Configuration of the EELS model. Energies in eV.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EelsConfig {
    /// Number of spectrometer channels. Default 2048.
    pub channels: usize,
    /// Energy loss at the centre of the first channel, eV. Default -10.
    pub energy_offset: Param<Energy>,
    /// Channel width, eV per channel. Default 0.5.
    pub dispersion: Param<Energy>,
    /// FWHM of the zero-loss peak (energy resolution), eV. Default 0.5 (typically 0.3-1).
    pub zlp_fwhm: Param<Energy>,
    /// Position of the (first) plasmon peak, eV. Default 20 (typically 15-25).
    pub plasmon_energy: Param<Energy>,
    /// FWHM of the first plasmon peak, eV. Default 8.
    pub plasmon_width: Param<Energy>,
    /// Specimen thickness over the inelastic mean free path, t/λ. Default 0.3.
    pub thickness_ratio: Param<Unitless>,
    /// Exponent r of the background `A·E^-r`, > 1. Default 3 (typically 2-5).
    pub background_exponent: Param<Unitless>,
    /// Fraction of the inelastically scattered electrons in the power-law background. Default 0.05.
    pub background_fraction: Param<Unitless>,
    /// Loss around which the background turns on (it follows `E^-r` above ~1.5× this), eV. Default 50.
    pub background_onset: Param<Energy>,
    /// Probability that an electron excites an edge of unit [`Edge::strength`] (C-K) per effective
    /// atom (with the reference area 1 Å² this is σ(C-K) ≈ 2e-24 m²). Default 2e-4.
    pub edge_scale: Param<Unitless>,
    /// Exponent s of the post-edge decay `(E/E_onset)^-s`, > 1. Default 3.
    pub edge_exponent: Param<Unitless>,
    /// Fraction of the incident electrons that reach the spectrometer, in (0, 1]. Default 0.8.
    pub collection_efficiency: Param<Unitless>,
    /// Gaussian read noise of the spectrometer camera, counts r.m.s. per channel, added after
    /// the Poisson draw (a spectrum may then hold small negative counts). Default 0 (a counting
    /// detector).
    pub read_noise: Param<Unitless>,
    /// Collection semi-angle β of the spectrometer, rad; 0 (default) leaves the edge
    /// probabilities as configured, whatever the beam energy (module docs). Typical 10-100 mrad.
    pub collection_angle: Param<Angle>,
    /// Collection semi-angle at which [`Self::edge_scale`] holds, rad. Default 50 mrad.
    pub reference_collection_angle: Param<Angle>,
    /// Beam energy at which [`Self::edge_scale`] holds, eV. Default 60 keV.
    pub reference_energy: Param<Energy>,
}

impl Default for EelsConfig {
    fn default() -> Self {
        Self {
            channels: 2048,
            energy_offset: Param::fixed(-10.0),
            dispersion: Param::fixed(0.5),
            zlp_fwhm: Param::fixed(0.5),
            plasmon_energy: Param::fixed(20.0),
            plasmon_width: Param::fixed(8.0),
            thickness_ratio: Param::fixed(0.3),
            background_exponent: Param::fixed(3.0),
            background_fraction: Param::fixed(0.05),
            background_onset: Param::fixed(50.0),
            edge_scale: Param::fixed(2e-4),
            edge_exponent: Param::fixed(3.0),
            collection_efficiency: Param::fixed(0.8),
            read_noise: Param::fixed(0.0),
            collection_angle: Param::fixed(0.0),
            reference_collection_angle: Param::fixed(50e-3),
            reference_energy: Param::fixed(60e3),
        }
    }
}

/// Small-angle Bethe partial cross-section of an edge at `onset` (eV) collected within `beta`
/// (rad) from a beam of `energy_ev`, up to a factor common to all β and E₀ (module docs):
/// `ln(1 + β²/θ_E²) / T`, `θ_E = E_edge/(2γT)`, `T = m₀v²/2` (eV).
pub fn bethe_edge_factor(onset: f64, beta: f64, energy_ev: f64) -> f64 {
    let gamma = 1.0 + energy_ev / ELECTRON_REST_ENERGY_EV;
    let b = electron_beta(energy_ev);
    let t = 0.5 * ELECTRON_REST_ENERGY_EV * b * b;
    let theta_e = onset / (2.0 * gamma * t);
    (beta * beta / (theta_e * theta_e)).ln_1p() / t
}

impl EelsConfig {
    /// Checks ranges; `prefix` is prepended to field names in errors.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        if self.channels == 0 || self.channels > 1 << 20 {
            return Err(PhysicsError::param(
                format!("{prefix}channels"),
                format!("must be in 1..=1048576, got {}", self.channels),
            ));
        }
        // (name, value, lower bound, lower bound allowed, upper bound)
        let checks = [
            (
                "energy_offset",
                self.energy_offset.get(),
                f64::NEG_INFINITY,
                true,
                f64::INFINITY,
            ),
            (
                "dispersion",
                self.dispersion.get(),
                0.0,
                false,
                f64::INFINITY,
            ),
            ("zlp_fwhm", self.zlp_fwhm.get(), 0.0, false, f64::INFINITY),
            (
                "plasmon_energy",
                self.plasmon_energy.get(),
                0.0,
                false,
                f64::INFINITY,
            ),
            (
                "plasmon_width",
                self.plasmon_width.get(),
                0.0,
                false,
                f64::INFINITY,
            ),
            (
                "thickness_ratio",
                self.thickness_ratio.get(),
                0.0,
                true,
                20.0,
            ),
            (
                "background_exponent",
                self.background_exponent.get(),
                1.0,
                false,
                20.0,
            ),
            (
                "background_fraction",
                self.background_fraction.get(),
                0.0,
                true,
                1.0,
            ),
            (
                "background_onset",
                self.background_onset.get(),
                0.0,
                false,
                f64::INFINITY,
            ),
            ("edge_scale", self.edge_scale.get(), 0.0, true, 1.0),
            ("edge_exponent", self.edge_exponent.get(), 1.0, false, 20.0),
            (
                "collection_angle",
                self.collection_angle.get(),
                0.0,
                true,
                0.5,
            ),
            (
                "reference_collection_angle",
                self.reference_collection_angle.get(),
                0.0,
                false,
                0.5,
            ),
            (
                "reference_energy",
                self.reference_energy.get(),
                1e3,
                true,
                1e7,
            ),
            (
                "collection_efficiency",
                self.collection_efficiency.get(),
                0.0,
                false,
                1.0,
            ),
            (
                "read_noise",
                self.read_noise.get(),
                0.0,
                true,
                f64::INFINITY,
            ),
        ];
        for (n, v, lo, lo_ok, hi) in checks {
            let ok = v.is_finite() && (v > lo || (lo_ok && v == lo)) && v <= hi;
            if !ok {
                let mut want = String::from("must be finite");
                if lo.is_finite() {
                    want += &format!(", {} {lo}", if lo_ok { ">=" } else { ">" });
                }
                if hi.is_finite() {
                    want += &format!(", <= {hi}");
                }
                return Err(PhysicsError::param(
                    format!("{prefix}{n}"),
                    format!("{want}; got {v}"),
                ));
            }
        }
        Ok(())
    }
}

/// A core-loss edge of the built-in table [`EDGES`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Edge {
    /// Atomic number.
    pub z: u8,
    /// Label, e.g. `"C-K"`.
    pub name: &'static str,
    /// Onset (first ionization threshold, L3 for L2,3 edges), eV.
    pub onset: f64,
    /// Shell factor: 1 for K, 2.5 for L2,3 (more electrons), 1.7 for L3 alone, 2 for the delayed
    /// M4,5, 1 for N4,5.
    pub shell_factor: f64,
    /// L3 → L2 spin-orbit splitting, eV (0: a single onset).
    pub split: f64,
    /// Fraction of the edge's electrons in the white lines (0: none).
    pub white_fraction: f64,
}

impl Edge {
    /// Relative per-atom cross-section (C-K = 1): `shell_factor × (284 eV / onset)^1.5`, so
    /// strength falls with onset energy and an L2,3 edge beats a K edge at the same onset.
    pub fn strength(&self) -> f64 {
        self.shell_factor * (284.0 / self.onset).powf(1.5)
    }
}

const fn edge(
    z: u8,
    name: &'static str,
    onset: f64,
    shell_factor: f64,
    split: f64,
    white_fraction: f64,
) -> Edge {
    Edge {
        z,
        name,
        onset,
        shell_factor,
        split,
        white_fraction,
    }
}

/// The built-in edge table (onsets from standard EELS atlases, rounded).
pub const EDGES: &[Edge] = &[
    edge(5, "B-K", 188.0, 1.0, 0.0, 0.0),
    edge(6, "C-K", 284.0, 1.0, 0.0, 0.0),
    edge(7, "N-K", 401.0, 1.0, 0.0, 0.0),
    edge(8, "O-K", 532.0, 1.0, 0.0, 0.0),
    edge(13, "Al-L2,3", 73.0, 2.5, 0.0, 0.0),
    edge(13, "Al-K", 1560.0, 1.0, 0.0, 0.0),
    edge(14, "Si-L2,3", 99.0, 2.5, 0.0, 0.0),
    edge(14, "Si-K", 1839.0, 1.0, 0.0, 0.0),
    edge(15, "P-L2,3", 132.0, 2.5, 0.0, 0.0),
    edge(16, "S-L2,3", 165.0, 2.5, 0.0, 0.0),
    edge(22, "Ti-L2,3", 456.0, 2.5, 5.7, 0.5),
    edge(23, "V-L2,3", 513.0, 2.5, 7.5, 0.5),
    edge(24, "Cr-L2,3", 575.0, 2.5, 9.0, 0.45),
    edge(25, "Mn-L2,3", 640.0, 2.5, 11.0, 0.45),
    edge(26, "Fe-L2,3", 708.0, 2.5, 13.0, 0.4),
    edge(27, "Co-L2,3", 779.0, 2.5, 15.0, 0.35),
    edge(28, "Ni-L2,3", 855.0, 2.5, 17.0, 0.3),
    edge(29, "Cu-L2,3", 931.0, 2.5, 20.0, 0.08),
    edge(38, "Sr-M4,5", 133.0, 2.0, 0.0, 0.0),
    edge(38, "Sr-L3", 1940.0, 1.7, 0.0, 0.0),
    edge(42, "Mo-M4,5", 227.0, 2.0, 0.0, 0.0),
    edge(42, "Mo-L3", 2520.0, 1.7, 0.0, 0.0),
    edge(47, "Ag-M4,5", 367.0, 2.0, 0.0, 0.0),
    edge(74, "W-N4,5", 245.0, 1.0, 0.0, 0.0),
    edge(74, "W-M4,5", 1809.0, 2.0, 0.0, 0.0),
    edge(79, "Au-N4,5", 335.0, 1.0, 0.0, 0.0),
    edge(79, "Au-M4,5", 2206.0, 2.0, 0.0, 0.0),
];

/// An edge precomputed on the energy axis.
#[derive(Debug, Clone)]
struct EdgeShape {
    z: u8,
    /// Label, e.g. `"C-K"`.
    name: &'static str,
    /// Onset, eV.
    onset: f64,
    /// Probability per electron per effective atom at the reference angle and energy.
    prob_ref: f64,
    /// Probability per electron per effective atom at the current beam energy.
    prob: f64,
    /// First channel with a non-negligible value.
    first: usize,
    /// Per-channel fraction of the edge's electrons.
    shape: Vec<f64>,
}

/// An EELS model precomputed for one configuration: energy axis and static spectral shapes.
///
/// A composition is a list of `(atomic number, effective number of atoms the probe sees)`,
/// e.g. the sum over atoms of probe intensity per area × a reference area. Elements without an
/// entry in [`EDGES`], and non-finite or negative weights, add no edge. Entries may repeat.
#[derive(Debug, Clone)]
pub struct EelsModel {
    energy: Vec<f64>,
    /// ZLP + plasmons + background per collected electron.
    base: Vec<f64>,
    edges: Vec<EdgeShape>,
    collection: f64,
    read_noise: f64,
    /// `(β, β_ref, E₀_ref)`, rad, rad, eV, when the collection angle is set.
    angles: Option<(f64, f64, f64)>,
}

/// Complementary error function (Chebyshev fit, fractional error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let c = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let poly = c.iter().rev().fold(0.0, |acc, &ci| acc * t + ci);
    let r = t * (-z * z + poly).exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Standard normal cumulative distribution.
fn phi(x: f64) -> f64 {
    0.5 * erfc(-x / SQRT_2)
}

/// Drude loss function with peak at `peak` and width `gamma`, times a Gaussian taper; 0 for E ≤ 0.
fn plasmon_density(e: f64, peak: f64, gamma: f64) -> f64 {
    if e <= 0.0 {
        return 0.0;
    }
    // Drude energy whose loss-function maximum lies at `peak` (root of 3x² - (2Ep² - Γ²)x - Ep⁴ = 0, x = peak²).
    let x = peak * peak;
    let ep2 = (4.0 * x * x + gamma * gamma * x).sqrt() - x;
    let d = e * gamma * ep2 / ((e * e - ep2).powi(2) + (e * gamma).powi(2));
    d * (-((e - peak) / (2.0 * gamma)).powi(2)).exp()
}

/// Integral over (0, ∞) of a non-negative density by the trapezoid rule on a log grid.
fn integrate_log(f: impl Fn(f64) -> f64, lo: f64, hi: f64) -> f64 {
    let n = 4000;
    let (a, b) = (lo.ln(), hi.ln());
    let h = (b - a) / n as f64;
    (0..=n)
        .map(|i| {
            let e = (a + h * i as f64).exp();
            let w = if i == 0 || i == n { 0.5 } else { 1.0 };
            w * f(e) * e * h
        })
        .sum()
}

impl EelsModel {
    /// Precomputes the model; validates `cfg` (field names prefixed `eels.`).
    pub fn new(cfg: &EelsConfig) -> Result<Self> {
        cfg.validate("eels.")?;
        let n = cfg.channels;
        let (e0, d) = (cfg.energy_offset.get(), cfg.dispersion.get());
        let energy: Vec<f64> = (0..n).map(|i| e0 + d * i as f64).collect();
        let sigma = cfg.zlp_fwhm.get() / FWHM_PER_SIGMA;
        let tau = cfg.thickness_ratio.get();
        let mut base = vec![0.0; n];

        // Zero-loss peak, integrated over each channel.
        let p0 = (-tau).exp();
        for (b, &e) in base.iter_mut().zip(&energy) {
            *b += p0 * (phi((e + 0.5 * d) / sigma) - phi((e - 0.5 * d) / sigma));
        }
        // Plasmons of order 1.. until the remaining probability is negligible; the rest goes to the last.
        let (ep, gamma) = (cfg.plasmon_energy.get(), cfg.plasmon_width.get());
        let p_inel = 1.0 - p0;
        let plasmon_share = 1.0 - cfg.background_fraction.get();
        let (mut pn, mut left) = (p0, p_inel);
        for order in (1..=60).take_while(|_| p_inel > 0.0) {
            pn *= tau / order as f64;
            left -= pn;
            let done = left < 1e-6 * p_inel || order == 60;
            let (pk, g) = (ep * order as f64, gamma * order as f64);
            let norm = integrate_log(|e| plasmon_density(e, pk, g), 1e-4 * pk, pk + 20.0 * g);
            let w = if done { pn + left.max(0.0) } else { pn } * plasmon_share / norm;
            for (b, &e) in base.iter_mut().zip(&energy) {
                *b += w * plasmon_density(e, pk, g) * d;
            }
            if done {
                break;
            }
        }
        // Power-law background, smoothly switched on around `background_onset`.
        let (r, eb) = (cfg.background_exponent.get(), cfg.background_onset.get());
        let bg = |e: f64| {
            if e <= 0.0 {
                0.0
            } else {
                e.powf(-r) * -(-(e / eb).powf(r + 2.0)).exp_m1()
            }
        };
        let hi = 1e4 * eb;
        let norm = integrate_log(bg, 1e-4 * eb, hi) + hi.powf(1.0 - r) / (r - 1.0);
        let wb = cfg.background_fraction.get() * (1.0 - p0) / norm;
        for (b, &e) in base.iter_mut().zip(&energy) {
            *b += wb * bg(e) * d;
        }

        // Core-loss edges that reach into the window.
        let s = cfg.edge_exponent.get();
        let last = energy[n - 1] + 0.5 * d;
        let mut edges = Vec::new();
        for ed in EDGES.iter().filter(|ed| ed.onset - 6.0 * sigma < last) {
            let wl_width = 1.0 + cfg.zlp_fwhm.get();
            let onsets: &[(f64, f64)] = if ed.split > 0.0 {
                &[(0.0, 2.0 / 3.0), (1.0, 1.0 / 3.0)]
            } else {
                &[(0.0, 1.0)]
            };
            let shape: Vec<f64> = energy
                .iter()
                .map(|&e| {
                    onsets
                        .iter()
                        .map(|&(k, frac)| {
                            let on = ed.onset + k * ed.split;
                            let cont =
                                phi((e - on) / sigma) * (s - 1.0) / on * (e.max(on) / on).powf(-s);
                            let lor = wl_width
                                / (2.0 * PI)
                                / ((e - on).powi(2) + 0.25 * wl_width * wl_width);
                            frac * ((1.0 - ed.white_fraction) * cont + ed.white_fraction * lor) * d
                        })
                        .sum::<f64>()
                })
                .collect();
            let first = shape.iter().position(|&v| v > 1e-12).unwrap_or(n);
            edges.push(EdgeShape {
                z: ed.z,
                name: ed.name,
                onset: ed.onset,
                prob_ref: cfg.edge_scale.get() * ed.strength(),
                prob: cfg.edge_scale.get() * ed.strength(),
                first,
                shape,
            });
        }
        let beta = cfg.collection_angle.get();
        let mut model = Self {
            energy,
            base,
            edges,
            collection: cfg.collection_efficiency.get(),
            read_noise: cfg.read_noise.get(),
            angles: (beta > 0.0).then(|| {
                (
                    beta,
                    cfg.reference_collection_angle.get(),
                    cfg.reference_energy.get(),
                )
            }),
        };
        model.set_beam_energy(cfg.reference_energy.get());
        Ok(model)
    }

    /// Sets the beam energy (eV) the edge probabilities are for: with a collection angle set,
    /// each edge's probability is its reference one times
    /// `bethe_edge_factor(onset, β, E₀) / bethe_edge_factor(onset, β_ref, E₀_ref)`
    /// ([`bethe_edge_factor`]); without, nothing changes. A model starts at the reference
    /// energy.
    pub fn set_beam_energy(&mut self, energy_ev: f64) {
        for e in &mut self.edges {
            e.prob = match self.angles {
                Some((beta, beta_ref, e_ref)) if energy_ev > 0.0 => {
                    e.prob_ref * bethe_edge_factor(e.onset, beta, energy_ev)
                        / bethe_edge_factor(e.onset, beta_ref, e_ref)
                }
                _ => e.prob_ref,
            };
        }
    }

    /// Each edge in the window with its probability per electron per effective atom at the
    /// current beam energy: `(label, atomic number, probability)`.
    pub fn edge_probabilities(&self) -> impl Iterator<Item = (&'static str, u8, f64)> + '_ {
        self.edges.iter().map(|e| (e.name, e.z, e.prob))
    }

    /// Energy loss at each channel centre, eV (length `channels`).
    pub fn energy_axis(&self) -> &[f64] {
        &self.energy
    }

    /// Calls `add(channel, expected counts)` for every contribution.
    fn accumulate(
        &self,
        composition: &[(u8, f64)],
        electrons: f64,
        mut add: impl FnMut(usize, f64),
    ) {
        if !(electrons.is_finite() && electrons > 0.0) {
            return;
        }
        let collected = electrons * self.collection;
        let mut wz = [0.0f64; 256];
        for &(z, w) in composition {
            if w.is_finite() && w > 0.0 {
                wz[usize::from(z)] += w;
            }
        }
        let p_core: f64 = self
            .edges
            .iter()
            .map(|e| wz[usize::from(e.z)] * e.prob)
            .sum();
        let k = if p_core > MAX_CORE_FRACTION {
            MAX_CORE_FRACTION / p_core
        } else {
            1.0
        };
        let rest = collected * (1.0 - p_core * k);
        for (i, &b) in self.base.iter().enumerate() {
            add(i, rest * b);
        }
        for e in &self.edges {
            let w = collected * k * wz[usize::from(e.z)] * e.prob;
            if w > 0.0 {
                for (i, &v) in e.shape.iter().enumerate().skip(e.first) {
                    add(i, w * v);
                }
            }
        }
    }

    /// Expected counts per channel (no noise) for `electrons` incident electrons and the given
    /// composition, written into `out` (length `channels`; a shorter `out` receives the first
    /// channels, a longer one gets zeros beyond them).
    pub fn expected(&self, composition: &[(u8, f64)], electrons: f64, out: &mut [f64]) {
        out.fill(0.0);
        self.accumulate(composition, electrons, |i, v| {
            if let Some(o) = out.get_mut(i) {
                *o += v;
            }
        });
    }

    /// A noisy spectrum: the [`expected`](Self::expected) counts, then a Poisson draw per
    /// channel and, when [`EelsConfig::read_noise`] is set, Gaussian read noise, written into
    /// `out` (counts as `f32`). Allocates nothing.
    pub fn sample(
        &self,
        composition: &[(u8, f64)],
        electrons: f64,
        rng: &mut SimRng,
        out: &mut [f32],
    ) {
        // No finite mean reaches the threshold: every channel is drawn exactly.
        self.sample_normal_above(composition, electrons, f64::INFINITY, rng, out);
    }

    /// [`Self::sample`] with the normal approximation of the Poisson draw where a channel
    /// expects at least `normal_above` counts: `round(λ + √λ·z)`, `z` standard normal (the
    /// same mean and variance; the skewness `1/√λ` is about 3 % at 10³ counts), cheaper
    /// than the exact draw. Channels below it are drawn exactly; read noise as in `sample`.
    pub fn sample_normal_above(
        &self,
        composition: &[(u8, f64)],
        electrons: f64,
        normal_above: f64,
        rng: &mut SimRng,
        out: &mut [f32],
    ) {
        out.fill(0.0);
        self.accumulate(composition, electrons, |i, v| {
            if let Some(o) = out.get_mut(i) {
                *o += v as f32;
            }
        });
        for o in out.iter_mut() {
            let lambda = f64::from(*o);
            *o = if lambda >= normal_above {
                (lambda + lambda.sqrt() * normal(rng)).round().max(0.0) as f32
            } else {
                poisson(rng, lambda) as f32
            };
        }
        if self.read_noise > 0.0 {
            for o in out.iter_mut() {
                *o += (self.read_noise * normal(rng)) as f32;
            }
        }
    }

    /// [`Self::sample_normal_above`] with the exact draws batched
    /// ([`poisson_fill_batched`]): the same distribution of counts per channel (Poisson below
    /// `normal_above`, the normal approximation `round(λ + √λ·z)` from it on, then read noise),
    /// drawn from a different stream of random numbers, several times faster. The channels'
    /// means are accumulated as in `sample_normal_above` (the same `f32` values). The normal
    /// draws follow the Poisson draws, in channel order. Allocates nothing once `scratch` has
    /// held a spectrum of this length.
    pub fn sample_batched(
        &self,
        composition: &[(u8, f64)],
        electrons: f64,
        normal_above: f64,
        rng: &mut SimRng,
        scratch: &mut SampleScratch,
        out: &mut [f32],
    ) {
        let lambda = &mut scratch.lambda;
        lambda.clear();
        lambda.resize(out.len(), 0.0);
        self.accumulate(composition, electrons, |i, v| {
            if let Some(o) = lambda.get_mut(i) {
                *o += v as f32;
            }
        });
        // Channels for the normal approximation: drawn after the Poisson ones (a mean of 0
        // meanwhile, which draws nothing but its uniform).
        scratch.normal.clear();
        for (i, l) in lambda.iter_mut().enumerate() {
            if f64::from(*l) >= normal_above {
                scratch.normal.push((i as u32, *l));
                *l = 0.0;
            }
        }
        poisson_fill_batched(rng, lambda, out, &mut scratch.poisson);
        for &(i, l) in &scratch.normal {
            let lambda = f64::from(l);
            out[i as usize] = (lambda + lambda.sqrt() * normal(rng)).round().max(0.0) as f32;
        }
        if self.read_noise > 0.0 {
            for o in out.iter_mut() {
                *o += (self.read_noise * normal(rng)) as f32;
            }
        }
    }
}

/// Reusable buffers of [`EelsModel::sample_batched`].
#[derive(Debug, Clone, Default)]
pub struct SampleScratch {
    /// Expected counts per channel.
    lambda: Vec<f32>,
    /// The channels of the normal approximation and their means.
    normal: Vec<(u32, f32)>,
    poisson: PoissonScratch,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;

    fn model(f: impl FnOnce(&mut EelsConfig)) -> EelsModel {
        let mut c = EelsConfig::default();
        f(&mut c);
        EelsModel::new(&c).unwrap()
    }

    fn spectrum(m: &EelsModel, comp: &[(u8, f64)]) -> Vec<f64> {
        let mut out = vec![0.0; m.energy_axis().len()];
        m.expected(comp, 1e8, &mut out);
        out
    }

    /// Closed form of the small-angle Bethe partial cross-section (Egerton ch. 3), up to a
    /// constant: `ln(1 + β²/θ_E²)/T`, `θ_E = E/(2γT)`, `T = m₀v²/2`, m₀c² = 510 998.95 eV.
    fn bethe(e_edge: f64, beta: f64, e0: f64) -> f64 {
        let mc2 = 510_998.95;
        let gamma = 1.0 + e0 / mc2;
        let t = 0.5 * mc2 * (1.0 - 1.0 / (gamma * gamma));
        let theta = e_edge / (2.0 * gamma * t);
        (1.0 + beta * beta / (theta * theta)).ln() / t
    }

    /// The C-K edge's electrons in a spectrum: (with one C atom) − (without), summed from
    /// 280 eV on, equals `collected · p · Σ(shape − base)`, linear in its probability p.
    fn ck_edge_counts(m: &EelsModel) -> f64 {
        let (with, without) = (spectrum(m, &[(6, 1.0)]), spectrum(m, &[]));
        m.energy_axis()
            .iter()
            .zip(with.iter().zip(&without))
            .filter(|(e, _)| **e >= 280.0)
            .map(|(_, (a, b))| a - b)
            .sum()
    }

    /// Issue 15 §2: EELS edge cross-sections depend on the collection angle β as
    /// `ln(1 + β²/θ_E²)`: the C-K (284 eV) and Fe-L (708 eV) edge probabilities at 20 and 80 mrad
    /// (60 kV) differ by the closed-form ratio, and so do the C-K electrons in the spectra; the
    /// reference angle reproduces `edge_scale`.
    #[test]
    fn edge_probability_follows_the_bethe_log_between_collection_angles() {
        let at = |beta: f64| model(|c| c.collection_angle = Param::fixed(beta));
        let (m20, m80, m50) = (at(20e-3), at(80e-3), at(50e-3));
        let prob = |m: &EelsModel, name: &str| {
            m.edge_probabilities()
                .find(|e| e.0 == name)
                .map(|e| e.2)
                .unwrap()
        };
        for (name, onset) in [("C-K", 284.0), ("Fe-L2,3", 708.0)] {
            let got = prob(&m20, name) / prob(&m80, name);
            let want = bethe(onset, 20e-3, 60e3) / bethe(onset, 80e-3, 60e3);
            assert!((got / want - 1.0).abs() < 1e-12, "{name}: {got} vs {want}");
            assert!(want < 1.0);
        }
        assert!((prob(&m50, "C-K") - 2e-4).abs() < 1e-18);
        let got = ck_edge_counts(&m20) / ck_edge_counts(&m80);
        let want = bethe(284.0, 20e-3, 60e3) / bethe(284.0, 80e-3, 60e3);
        assert!((got / want - 1.0).abs() < 1e-9, "spectra: {got} vs {want}");
    }

    /// ... and on the beam energy through θ_E and the 1/T prefactor: at 30 mrad, 60 kV against
    /// 200 kV, in the probabilities and the spectra.
    #[test]
    fn edge_probability_follows_the_bethe_scaling_between_beam_energies() {
        let mut m = model(|c| c.collection_angle = Param::fixed(30e-3));
        m.set_beam_energy(60e3);
        let (p60, n60) = (
            m.edge_probabilities().find(|e| e.0 == "C-K").unwrap().2,
            ck_edge_counts(&m),
        );
        m.set_beam_energy(200e3);
        let (p200, n200) = (
            m.edge_probabilities().find(|e| e.0 == "C-K").unwrap().2,
            ck_edge_counts(&m),
        );
        let want = bethe(284.0, 30e-3, 60e3) / bethe(284.0, 30e-3, 200e3);
        assert!(
            (p60 / p200 / want - 1.0).abs() < 1e-12,
            "{} vs {want}",
            p60 / p200
        );
        assert!(
            (n60 / n200 / want - 1.0).abs() < 1e-9,
            "{} vs {want}",
            n60 / n200
        );
        assert!(want > 1.5, "{want}");
    }

    /// Without a collection angle the edges are as configured at any beam energy (the default:
    /// spectra unchanged bit for bit).
    #[test]
    fn no_collection_angle_leaves_edges_as_configured() {
        let plain = model(|_| {});
        let mut moved = plain.clone();
        moved.set_beam_energy(300e3);
        let (a, b) = (spectrum(&plain, &[(6, 1.0)]), spectrum(&moved, &[(6, 1.0)]));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        let e = EelsConfig {
            collection_angle: Param::fixed(-1e-3),
            ..Default::default()
        }
        .validate("eels.")
        .unwrap_err()
        .to_string();
        assert!(e.contains("eels.collection_angle"), "{e}");
    }

    /// (loss, value) of the channels with loss in [lo, hi].
    fn window(m: &EelsModel, s: &[f64], lo: f64, hi: f64) -> Vec<(f64, f64)> {
        m.energy_axis()
            .iter()
            .copied()
            .zip(s.iter().copied())
            .filter(|(e, _)| (lo..=hi).contains(e))
            .collect()
    }

    fn argmax_in(m: &EelsModel, s: &[f64], lo: f64, hi: f64) -> f64 {
        window(m, s, lo, hi)
            .into_iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap()
            .0
    }

    /// Least-squares slope and intercept of ln(value) against ln(loss).
    fn loglog_fit(pts: &[(f64, f64)]) -> (f64, f64) {
        let l: Vec<(f64, f64)> = pts.iter().map(|(e, v)| (e.ln(), v.ln())).collect();
        let n = l.len() as f64;
        let (mx, my) = (
            l.iter().map(|p| p.0).sum::<f64>() / n,
            l.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let b = l.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>()
            / l.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>();
        (b, my - b * mx)
    }

    /// Mean relative excess over [onset+0.5, onset+10] eV above the power law fitted on
    /// [onset-20, onset-4] eV (the standard EELS background subtraction).
    fn edge_excess(m: &EelsModel, s: &[f64], onset: f64) -> f64 {
        let (b, a) = loglog_fit(&window(m, s, onset - 20.0, onset - 4.0));
        let post = window(m, s, onset + 0.5, onset + 10.0);
        post.iter()
            .map(|(e, v)| v / (a + b * e.ln()).exp() - 1.0)
            .sum::<f64>()
            / post.len() as f64
    }

    #[test]
    fn zlp_is_centred_at_zero_with_the_configured_fwhm() {
        for (fwhm, d) in [(0.3, 0.02), (0.5, 0.05), (1.0, 0.1), (0.5, 0.5)] {
            let m = model(|c| {
                (c.zlp_fwhm, c.dispersion, c.energy_offset) =
                    (Param::fixed(fwhm), Param::fixed(d), Param::fixed(-5.0));
                c.channels = (40.0 / d) as usize;
            });
            let (s, e) = (spectrum(&m, &[]), m.energy_axis());
            let ip = (0..s.len()).max_by(|&a, &b| s[a].total_cmp(&s[b])).unwrap();
            assert!(e[ip].abs() <= 0.5 * d + 1e-9, "peak at {}", e[ip]);
            let half = 0.5 * s[ip];
            let cross = |step: isize| {
                let mut i = ip;
                while s[i] > half {
                    i = (i as isize + step) as usize;
                }
                let j = (i as isize - step) as usize;
                e[i] + (e[j] - e[i]) * (half - s[i]) / (s[j] - s[i])
            };
            let width = cross(1) - cross(-1);
            assert!(
                (width - fwhm).abs() <= d,
                "fwhm {fwhm} at {d} eV/ch: measured {width}"
            );
        }
    }

    #[test]
    fn plasmon_peak_sits_at_the_plasmon_energy() {
        for ep in [15.0, 20.0, 25.0] {
            let m = model(|c| c.plasmon_energy = Param::fixed(ep));
            let pk = argmax_in(&m, &spectrum(&m, &[]), 5.0, 40.0);
            assert!((pk - ep).abs() <= 1.0, "plasmon {ep}: peak at {pk}");
        }
    }

    #[test]
    fn edges_rise_at_their_design_onsets_and_only_for_present_elements() {
        let m = model(|_| {});
        let (empty, e) = (spectrum(&m, &[]), m.energy_axis());
        // DESIGN §4 onsets.
        for (z, onset) in [
            (6u8, 284.0),
            (7, 401.0),
            (8, 532.0),
            (14, 99.0),
            (22, 456.0),
            (26, 708.0),
        ] {
            let s = spectrum(&m, &[(z, 1.0)]);
            let diff: Vec<f64> = s.iter().zip(&empty).map(|(a, b)| a - b).collect();
            let max = diff.iter().cloned().fold(0.0, f64::max);
            let i = diff.iter().position(|&v| v > 0.5 * max).unwrap();
            assert!(
                (e[i] - onset).abs() <= 1.0,
                "Z={z}: edge rises at {} not {onset}",
                e[i]
            );
            // Visible on the background: > 20 % over the pre-edge power law fitted and extrapolated.
            assert!(
                edge_excess(&m, &s, onset) > 0.2,
                "Z={z}: excess {}",
                edge_excess(&m, &s, onset)
            );
            assert!(
                edge_excess(&m, &empty, onset).abs() < 0.06,
                "Z={z}: empty excess {}",
                edge_excess(&m, &empty, onset)
            );
            // No edge of an absent element; C changes nothing below its onset but the ZLP share.
            if z == 6 {
                for o in [401.0, 532.0, 708.0] {
                    assert!(
                        edge_excess(&m, &s, o).abs() < 0.02,
                        "C spectrum has an edge at {o}"
                    );
                }
                assert!(
                    diff.iter()
                        .zip(e)
                        .zip(&empty)
                        .all(|((v, &x), b)| x > 280.0 || v.abs() <= 1e-3 * b)
                );
            }
        }
        // Every element of the shipped specimens has an edge in the default window.
        for z in [6u8, 14, 16, 22, 38, 42, 74, 79] {
            assert!(
                EDGES
                    .iter()
                    .any(|ed| ed.z == z && ed.onset < e[e.len() - 1])
                    && m.edges.iter().any(|ed| ed.z == z),
                "Z={z}"
            );
        }
        // Ti-L2,3 white line: a peak at the L3 onset well above the continuum.
        let diff: Vec<f64> = spectrum(&m, &[(22, 1.0)])
            .iter()
            .zip(&empty)
            .map(|(a, b)| a - b)
            .collect();
        assert!((argmax_in(&m, &diff, 440.0, 500.0) - 456.0).abs() <= 1.0);
        let mean = |lo, hi| {
            window(&m, &diff, lo, hi).iter().map(|p| p.1).sum::<f64>() / (2.0 * (hi - lo) + 1.0)
        };
        assert!(mean(455.5, 456.5) > 3.0 * mean(480.0, 490.0));
        // Relative strengths: L2,3 beats K, and strength falls with onset.
        let st = |n: &str| EDGES.iter().find(|ed| ed.name == n).unwrap().strength();
        assert!((st("C-K") - 1.0).abs() < 1e-12);
        assert!(
            st("Si-L2,3") > st("C-K")
                && st("C-K") > st("N-K")
                && st("N-K") > st("O-K")
                && st("Ti-L2,3") > st("N-K")
        );
    }

    #[test]
    fn background_follows_the_configured_power_law() {
        // Element-free: only the low-loss tail and the background reach 120-400 eV.
        for r in [2.0, 3.0, 4.5] {
            let m = model(|c| c.background_exponent = Param::fixed(r));
            let slope = loglog_fit(&window(&m, &spectrum(&m, &[]), 120.0, 400.0)).0;
            assert!((slope + r).abs() < 0.1, "r={r}: slope {slope}");
        }
    }

    #[test]
    fn spectrum_sums_to_the_collected_electrons() {
        for tau in [0.0, 0.3, 1.5] {
            let m = model(|c| (c.thickness_ratio, c.channels) = (Param::fixed(tau), 20000));
            let s = spectrum(&m, &[(6, 1.0), (8, 2.0), (79, 3.0)]);
            let total: f64 = s.iter().sum();
            assert!((total / 0.8e8 - 1.0).abs() < 0.01, "t/λ={tau}: {total}");
            // The zero-loss peak holds e^{-t/λ} of the electrons.
            let zlp: f64 = window(&m, &s, -2.0, 2.0).iter().map(|p| p.1).sum();
            assert!(
                (zlp / 0.8e8 - (-tau).exp()).abs() < 0.02,
                "t/λ={tau}: zlp {zlp}"
            );
        }
    }

    #[test]
    fn noisy_spectra_average_to_the_expectation() {
        let m = model(|c| c.channels = 600);
        let comp = [(6u8, 3.0), (14, 0.5)];
        let (mut exp, mut acc, mut out) = (vec![0.0; 600], vec![0.0f64; 600], vec![0.0f32; 600]);
        m.expected(&comp, 1e5, &mut exp);
        let (mut rng, draws) = (seeded(3), 2000);
        for _ in 0..draws {
            m.sample(&comp, 1e5, &mut rng, &mut out);
            assert!(
                out.iter()
                    .all(|v| v.is_finite() && *v >= 0.0 && v.fract() == 0.0)
            );
            acc.iter_mut()
                .zip(&out)
                .for_each(|(a, &v)| *a += f64::from(v));
        }
        for (a, &x) in acc.iter().zip(&exp) {
            let mean = a / f64::from(draws);
            assert!(
                (mean - x).abs() < 5.0 * (x / f64::from(draws)).sqrt() + 1e-3,
                "mean {mean} vs {x}"
            );
        }
    }

    #[test]
    fn batched_spectra_have_the_expected_mean_and_variance() {
        // Channels expecting from under 1 to 10⁵ counts (every branch of the batched draw:
        // inversion, gathered inversion, batched PTRS, the normal approximation from 10³):
        // each channel's mean and variance over 3000 spectra match the expectation λ (and
        // λ + read noise²), as the one-at-a-time `sample_normal_above` draws do.
        let comp = [(6u8, 3.0), (14, 0.5)];
        for noise in [0.0, 4.0] {
            let m = model(|c| {
                c.channels = 600;
                c.read_noise = Param::fixed(noise);
            });
            let mut exp = vec![0.0; 600];
            m.expected(&comp, 1e6, &mut exp);
            for (lo, hi) in [(0.0, 10.0), (10.0, 64.0), (64.0, 1e3), (1e3, f64::INFINITY)] {
                assert!(
                    exp.iter().any(|&x| x >= lo && x < hi),
                    "no mean in [{lo}, {hi})"
                );
            }
            let draws = 3000;
            let (mut s1, mut s2) = (vec![0.0f64; 600], vec![0.0f64; 600]);
            let (mut rng, mut scratch, mut out) =
                (seeded(8), SampleScratch::default(), vec![0.0f32; 600]);
            for _ in 0..draws {
                m.sample_batched(&comp, 1e6, 1e3, &mut rng, &mut scratch, &mut out);
                for (i, &v) in out.iter().enumerate() {
                    assert!(v.is_finite() && (noise > 0.0 || v.fract() == 0.0));
                    let d = f64::from(v) - exp[i];
                    s1[i] += d;
                    s2[i] += d * d;
                }
            }
            let n = f64::from(draws);
            for (i, &x) in exp.iter().enumerate() {
                let var = x + noise * noise;
                let mean_dev = s1[i] / n;
                assert!(
                    mean_dev.abs() < 5.0 * (var / n).sqrt() + 2e-3,
                    "channel {i} (λ {x}): mean off by {mean_dev}"
                );
                if var > 5.0 {
                    // The second moment about λ: relative standard error about √(2/n).
                    let got = s2[i] / n;
                    assert!(
                        (got / var - 1.0).abs() < 6.0 * (2.0 / n).sqrt() + 0.02,
                        "channel {i} (λ {x}): variance {got} vs {var}"
                    );
                }
            }
        }
    }

    #[test]
    fn values_are_finite_and_non_negative_for_odd_inputs() {
        let mut rng = seeded(9);
        for (tau, r, off) in [(0.0, 2.0, -10.0), (3.0, 5.0, 200.0), (20.0, 1.5, -50.0)] {
            let m = model(|c| {
                (c.thickness_ratio, c.background_exponent, c.energy_offset) =
                    (Param::fixed(tau), Param::fixed(r), Param::fixed(off));
            });
            let comp = [
                (0u8, 1.0),
                (255, 1.0),
                (6, f64::NAN),
                (8, -1.0),
                (26, 1e6),
                (79, f64::INFINITY),
            ];
            let mut out = vec![0.0; 2048];
            for el in [1e6, 0.0, -5.0, f64::NAN] {
                m.expected(&comp, el, &mut out);
                assert!(out.iter().all(|v| v.is_finite() && *v >= 0.0));
            }
            m.expected(&comp, 1e6, &mut out);
            assert!(out.iter().sum::<f64>() > 0.0);
            let mut short = vec![1.0f32; 100];
            m.sample(&comp, 1e6, &mut rng, &mut short);
            assert!(short.iter().all(|v| v.is_finite() && *v >= 0.0));
        }
    }

    #[test]
    fn validate_names_the_bad_field() {
        type Edit = fn(&mut EelsConfig);
        let cases: [(&str, Edit); 9] = [
            ("channels", |c| c.channels = 0),
            ("dispersion", |c| c.dispersion = Param::fixed(-0.5)),
            ("zlp_fwhm", |c| c.zlp_fwhm = Param::fixed(0.0)),
            ("plasmon_energy", |c| {
                c.plasmon_energy = Param::fixed(f64::NAN)
            }),
            ("thickness_ratio", |c| {
                c.thickness_ratio = Param::fixed(-0.1)
            }),
            ("background_exponent", |c| {
                c.background_exponent = Param::fixed(1.0)
            }),
            ("edge_exponent", |c| c.edge_exponent = Param::fixed(0.5)),
            ("collection_efficiency", |c| {
                c.collection_efficiency = Param::fixed(1.5)
            }),
            ("read_noise", |c| c.read_noise = Param::fixed(-1.0)),
        ];
        for (field, f) in cases {
            let mut c = EelsConfig::default();
            f(&mut c);
            let msg = c.validate("stem.eels.").unwrap_err().to_string();
            assert!(msg.contains(&format!("stem.eels.{field}")), "{msg}");
            assert!(EelsModel::new(&c).is_err());
        }
        assert!(EelsConfig::default().validate("").is_ok());
    }

    #[test]
    fn read_noise_adds_its_variance_and_leaves_the_mean() {
        // 64 channels from 100 eV (a few hundred counts each at 1e7 electrons): the deviations
        // from the expectation have the Poisson variance without read noise, plus 30² with it.
        let setup = |noise: f64| {
            model(|c| {
                c.channels = 64;
                c.energy_offset = Param::fixed(100.0);
                c.read_noise = Param::fixed(noise);
            })
        };
        let (quiet, noisy) = (setup(0.0), setup(30.0));
        let mut e = vec![0.0; 64];
        quiet.expected(&[], 1e7, &mut e);
        assert!(e.iter().all(|&v| v > 50.0 && v < 5000.0), "{e:?}");
        let excess = |m: &EelsModel| {
            let (mut out, mut rng) = (vec![0.0f32; 64], seeded(1));
            let (mut mean, mut var, mut n) = (0.0, 0.0, 0.0);
            for _ in 0..200 {
                m.sample(&[], 1e7, &mut rng, &mut out);
                for (o, ek) in out.iter().zip(&e) {
                    let d = f64::from(*o) - ek;
                    mean += d;
                    var += d * d - ek;
                    n += 1.0;
                }
            }
            (mean / n, var / n)
        };
        let ((mq, vq), (mn, vn)) = (excess(&quiet), excess(&noisy));
        assert!(vq.abs() < 60.0 && (vn - 900.0).abs() < 100.0, "{vq} {vn}");
        assert!(mq.abs() < 2.0 && mn.abs() < 2.0, "{mq} {mn}");
    }

    #[test]
    fn config_reads_toml_with_units_and_rejects_unknown_fields() {
        let c: EelsConfig = toml::from_str(
            "dispersion = \"0.25 eV\"\nchannels = 1024\nthickness_ratio = { uniform = [0.1, 0.5] }",
        )
        .unwrap();
        assert_eq!(
            (c.dispersion.get(), c.channels, c.zlp_fwhm),
            (0.25, 1024, EelsConfig::default().zlp_fwhm)
        );
        assert!(toml::from_str::<EelsConfig>("dispersoin = 0.1").is_err());
        assert_eq!(
            toml::from_str::<EelsConfig>(&toml::to_string(&c).unwrap()).unwrap(),
            c
        );
    }
}
