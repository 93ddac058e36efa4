//! Beam damage: knock-on sputtering (lower thresholds at edges and vacancies), beam-driven dopant
//! hops, contamination build-up, beam-current fluctuation and the cumulative dose map.
//!
//! **Knock-on.** The largest energy an electron of kinetic energy E can give a nucleus of mass M
//! at rest is `T_max = 2E(E + 2m₀c²)/(Mc²)`. A nucleus moving along the beam with velocity v
//! receives up to `T_max(v) = T_max + 2 p_e v` (p_e the electron momentum), so thermal vibrations
//! smear the threshold: the displacement cross-section is the McKinley-Feshbach cross-section
//! for `T_max(v)` averaged over a Gaussian velocity distribution (Meyer et al., PRL 108, 196102,
//! 2012). It rises smoothly from zero where `T_max ≈ E_d` instead of jumping. The sputtering
//! probability of an atom that receives a dose D (electrons/m²) is `1 - exp(-σ D)`.
//!
//! Only an atom at the beam's exit surface can leave: a knocked interior atom is driven into the
//! atoms below it and stays. [`Atom::height`] is measured along the beam's direction of travel
//! (larger heights are further downstream), so in each atomic column (atoms whose projected
//! positions lie within [`COLUMN_RADIUS`]) only the atom of largest height can be sputtered;
//! once it is gone, the next one is at the exit surface and receives the rest of the exposure.
//! A column of atoms with equal cross-sections then loses `min(Poisson(σ D), atoms)` atoms per
//! exposure; a single layer is unchanged (each atom independently with `1 - exp(-σ D)`).
//!
//! **Under-coordinated atoms** (off by default). An atom with fewer bonds than in the bulk is
//! easier to displace: at an edge or beside a vacancy a graphene carbon atom has two bonds and a
//! threshold of ≈ 15-17 eV instead of the bulk 21.14 eV (Meyer et al. 2012; Kotakoski et al.,
//! ACS Nano 6, 671, 2012), which is what makes 60-80 kV imaging of graphene edges destructive
//! while the bulk survives. [`DamageConfig::under_coordinated`] lowers an element's threshold
//! by a fixed energy per missing bond (bonded neighbours counted within
//! [`DamageConfig::bond_length`], [`coordination`]), and each atom's cross-section is the
//! smeared McKinley-Feshbach one at its own threshold ([`KnockOn`]).
//!
//! **Contamination** (off by default): mobile hydrocarbons polymerize where the beam dwells,
//! so a deposit grows in proportion to the local dose: thickness `t = rate × D` at each bin of
//! the dose map. The deposit's atoms (density ρ) add `N_e σ_HAADF ρ t` expected counts per
//! pixel, a mass-thickness background that lowers the atoms' contrast where the beam has been.
//!
//! **Beam-current fluctuation** (off by default, [`CurrentFluctuation`]): the dose of each pixel
//! and point exposure is the nominal one times a positive lognormal AR(1) factor of mean 1.
//!
//! **Dopant hops.** A Si dopant in graphene hops to a neighbouring carbon site (they swap) as a
//! continuous-time Markov chain while the beam dwells at b. The rate toward neighbour j is
//! `k₀ (I/I₀) exp(-|b - μ_j|² / (2 s²))`, μ_j the point 0.85 Å from the Si toward j, s² = 0.1 Å²,
//! k₀ = ln2/3 s⁻¹ at 60 kV and the reference current I₀ (the putting-dune model). A parked beam
//! runs the chain with constant rates ([`HopModel::dwell`]); a raster frame runs it with the
//! rates of the pixel the beam holds at each moment ([`HopModel::raster`]), so a frame's first
//! hop comes with probability `1 - exp(-Σ_pixels t_dwell Σ_j rate_j(pixel))`.

use crate::constants::{
    AMU, AMU_ENERGY_EV, ATOMIC_MASS_U, BOHR_RADIUS, BOLTZMANN, ELECTRON_REST_ENERGY_EV,
    FINE_STRUCTURE, RYDBERG_EV, SPEED_OF_LIGHT, SYMBOLS,
};
use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::{Area, Current, Energy, Frequency, Length, Temperature, Unitless};
use crate::rng::{SimRng, normal};
use crate::stem::optics::{electron_beta, electron_momentum_ev};
use crate::stem::specimen::{Atom, AtomIndex, Specimen, Supercell};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::f64::consts::PI;

/// Maximum energy (eV) transferred by an electron of kinetic energy `energy_ev` to a nucleus at
/// rest of mass `mass_u` (atomic mass units): `T_max = 2E(E + 2m₀c²)/(Mc²)`.
///
/// ```
/// let t = scopegym_physics::stem::damage::max_transfer(86e3, 12.0);
/// assert!((t - 17.05).abs() < 0.17);
/// ```
pub fn max_transfer(energy_ev: f64, mass_u: f64) -> f64 {
    2.0 * energy_ev * (energy_ev + 2.0 * ELECTRON_REST_ENERGY_EV) / (mass_u * AMU_ENERGY_EV)
}

/// McKinley-Feshbach displacement cross-section (m²) for a maximum transfer `t_max` (eV) above
/// the displacement energy `e_d` (eV); zero below it.
pub fn mckinley_feshbach(energy_ev: f64, z: u8, t_max: f64, e_d: f64) -> f64 {
    if t_max <= e_d || e_d <= 0.0 {
        return 0.0;
    }
    let beta = electron_beta(energy_ev);
    let b2 = beta * beta;
    let zf = f64::from(z);
    let ratio = t_max / e_d;
    let pref = 4.0
        * PI
        * BOHR_RADIUS
        * BOHR_RADIUS
        * zf
        * zf
        * (RYDBERG_EV / ELECTRON_REST_ENERGY_EV).powi(2)
        * (1.0 - b2)
        / (b2 * b2);
    let bracket = ratio - 1.0 - b2 * ratio.ln()
        + PI * FINE_STRUCTURE * zf * beta * (2.0 * ratio.sqrt() - ratio.ln() - 2.0);
    (pref * bracket).max(0.0)
}

/// Displacement cross-section (m²) of an atom of atomic number `z` and mass `mass_u` (u) with
/// displacement energy `e_d` (eV), averaged over thermal velocities along the beam with r.m.s.
/// `v_rms` (m/s). Smooth in the beam energy; equal to [`mckinley_feshbach`] when `v_rms = 0`.
pub fn knock_on_cross_section(energy_ev: f64, z: u8, mass_u: f64, e_d: f64, v_rms: f64) -> f64 {
    let t0 = max_transfer(energy_ev, mass_u);
    if v_rms <= 0.0 {
        return mckinley_feshbach(energy_ev, z, t0, e_d);
    }
    let pc = electron_momentum_ev(energy_ev);
    crate::quadrature::gauss_hermite(20)
        .iter()
        .map(|&(x, w)| {
            let v = x * v_rms;
            let t = t0 + 2.0 * pc * v / SPEED_OF_LIGHT;
            w * mckinley_feshbach(energy_ev, z, t, e_d)
        })
        .sum()
}

/// Beam damage settings (`[damage]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DamageConfig {
    /// Whether knock-on sputtering removes atoms. Default true.
    pub sputtering: bool,
    /// Displacement energies by element symbol, eV. Defaults: C 21 eV (graphene), S 6.9 eV
    /// (MoS₂), Si 15 eV; any other element uses `default_displacement_energy`.
    pub displacement_energy: BTreeMap<String, Param<Energy>>,
    /// Displacement energy of elements not listed, eV. Default 25 eV.
    pub default_displacement_energy: Param<Energy>,
    /// Specimen temperature for thermal vibrations (equipartition along the beam), K. Default 300 K.
    pub temperature: Param<Temperature>,
    /// Extra multiplier on every cross-section (to model enhanced damage, e.g. by ionization).
    /// Default 1.
    pub cross_section_scale: Param<crate::param::dims::Unitless>,
    /// Whether dopant hops are simulated. Default true.
    pub dopant_hops: bool,
    /// Peak hop rate toward one neighbour at the reference current, 1/s. Default ln2/3 ≈ 0.231.
    pub hop_peak_rate: Param<Frequency>,
    /// Current at which the hop rate equals `hop_peak_rate`, A. Default 100 pA.
    pub hop_reference_current: Param<Current>,
    /// Distance from the dopant to the rate maximum, toward the neighbour, m. Default 0.85 Å.
    pub hop_offset: Param<Length>,
    /// Variance of the Gaussian rate profile, m². Default 0.1 Å².
    pub hop_variance: Param<Area>,
    /// Atomic number of the hopping dopant. Default 14 (Si).
    pub hop_dopant_z: u8,
    /// Atomic number of the host it swaps with. Default 6 (C).
    pub hop_host_z: u8,
    /// Cell size of the cumulative dose map, m. Default 1 Å.
    pub dose_map_cell: Param<Length>,
    /// Lower displacement energies of under-coordinated atoms (at edges, beside vacancies), by
    /// element symbol (module docs, *Under-coordinated atoms*). Default: none (every atom has
    /// its element's energy). For graphene at 60-80 kV:
    /// `C = { bonds = 3, missing_bond_energy = 5 }` with `displacement_energy.C = 21.14`.
    pub under_coordinated: BTreeMap<String, UnderCoordinated>,
    /// Largest projected distance of a bonded neighbour (atoms at the same height within 1 Å),
    /// m. Default 1.7 Å (graphene C-C 1.42 Å; about 2.8 Å for MoS₂'s Mo-S).
    pub bond_length: Param<Length>,
    /// Growth of the hydrocarbon contamination deposit under the beam: thickness per dose,
    /// m per (e⁻/m²) (= m³). Default 0 (off). Order 1e-34 m³ (0.1 nm of deposit per
    /// 10⁴ e⁻/Å²) on a specimen with mobile hydrocarbons, none on a clean (baked) one; see
    /// Egerton, Li & Malac, Micron 35, 399 (2004) on contamination build-up.
    pub contamination_rate: Param<Unitless>,
    /// Atom density of the deposit, atoms/m³. Default 1e29 (amorphous carbon, 2 g/cm³).
    pub contamination_density: Param<Unitless>,
    /// Element of the deposit's atoms (its HAADF cross-section sets the background). Default
    /// `"C"`.
    pub contamination_element: String,
}

/// Lower displacement energy of under-coordinated atoms of one element (`[damage.under_coordinated.C]`).
///
/// An atom of this element with `n` bonded neighbours (within [`DamageConfig::bond_length`])
/// has the displacement energy `max(E_d − (bonds − n)·missing_bond_energy, 1 eV)`, E_d its
/// element's ([`DamageConfig::displacement_energy`]); atoms with `n ≥ bonds` keep E_d.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnderCoordinated {
    /// Bonded neighbours of a bulk atom (graphene 3). Default 3.
    pub bonds: u32,
    /// Displacement energy lost per missing bond, eV. Default 5 eV: graphene's 21.14 eV bulk
    /// threshold (Meyer et al., PRL 108, 196102, 2012) falls to ≈ 16 eV for a two-fold
    /// coordinated atom at an edge or beside a vacancy (≈ 15-17 eV computed by Kotakoski et
    /// al., ACS Nano 6, 671, 2012, for edge atoms).
    pub missing_bond_energy: Param<Energy>,
}

impl Default for UnderCoordinated {
    fn default() -> Self {
        Self {
            bonds: 3,
            missing_bond_energy: Param::fixed(5.0),
        }
    }
}

impl Default for DamageConfig {
    fn default() -> Self {
        let mut ed = BTreeMap::new();
        ed.insert("C".into(), Param::fixed(21.0));
        ed.insert("S".into(), Param::fixed(6.9));
        ed.insert("Si".into(), Param::fixed(15.0));
        Self {
            sputtering: true,
            displacement_energy: ed,
            default_displacement_energy: Param::fixed(25.0),
            temperature: Param::fixed(300.0),
            cross_section_scale: Param::fixed(1.0),
            dopant_hops: true,
            hop_peak_rate: Param::fixed(std::f64::consts::LN_2 / 3.0),
            hop_reference_current: Param::fixed(100e-12),
            hop_offset: Param::fixed(0.85e-10),
            hop_variance: Param::fixed(0.1e-20),
            hop_dopant_z: 14,
            hop_host_z: 6,
            dose_map_cell: Param::fixed(1e-10),
            under_coordinated: BTreeMap::new(),
            bond_length: Param::fixed(1.7e-10),
            contamination_rate: Param::fixed(0.0),
            contamination_density: Param::fixed(1e29),
            contamination_element: "C".into(),
        }
    }
}

impl DamageConfig {
    /// Checks ranges; `prefix` is prepended to field names in errors.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        for (k, v) in &self.displacement_energy {
            if crate::constants::atomic_number(k).is_none() {
                return Err(PhysicsError::param(
                    format!("{prefix}displacement_energy.{k}"),
                    "unknown element symbol",
                ));
            }
            if !(v.get() > 0.0) {
                return Err(PhysicsError::param(
                    format!("{prefix}displacement_energy.{k}"),
                    "must be > 0 eV",
                ));
            }
        }
        let checks = [
            (
                "default_displacement_energy",
                self.default_displacement_energy.get(),
                0.0,
            ),
            ("temperature", self.temperature.get(), -1.0),
            ("cross_section_scale", self.cross_section_scale.get(), -1.0),
            ("hop_peak_rate", self.hop_peak_rate.get(), -1.0),
            (
                "hop_reference_current",
                self.hop_reference_current.get(),
                0.0,
            ),
            ("hop_offset", self.hop_offset.get(), -1.0),
            ("hop_variance", self.hop_variance.get(), 0.0),
            ("dose_map_cell", self.dose_map_cell.get(), 0.0),
            ("bond_length", self.bond_length.get(), 0.0),
            ("contamination_rate", self.contamination_rate.get(), -1.0),
            (
                "contamination_density",
                self.contamination_density.get(),
                0.0,
            ),
        ];
        for (n, v, strict_min) in checks {
            let ok = v.is_finite() && if strict_min == 0.0 { v > 0.0 } else { v >= 0.0 };
            if !ok {
                let what = if strict_min == 0.0 { "> 0" } else { ">= 0" };
                return Err(PhysicsError::param(
                    format!("{prefix}{n}"),
                    format!("must be finite and {what}, got {v}"),
                ));
            }
        }
        for (k, u) in &self.under_coordinated {
            if crate::constants::atomic_number(k).is_none() {
                return Err(PhysicsError::param(
                    format!("{prefix}under_coordinated.{k}"),
                    "unknown element symbol",
                ));
            }
            if !(1..=12).contains(&u.bonds) {
                return Err(PhysicsError::param(
                    format!("{prefix}under_coordinated.{k}.bonds"),
                    format!("must be 1..=12, got {}", u.bonds),
                ));
            }
            let e = u.missing_bond_energy.get();
            if !(e.is_finite() && e >= 0.0) {
                return Err(PhysicsError::param(
                    format!("{prefix}under_coordinated.{k}.missing_bond_energy"),
                    format!("must be finite and >= 0 eV, got {e}"),
                ));
            }
        }
        if crate::constants::atomic_number(&self.contamination_element).is_none() {
            return Err(PhysicsError::param(
                format!("{prefix}contamination_element"),
                "unknown element symbol",
            ));
        }
        Ok(())
    }

    /// Displacement energy (eV) of an atom of element `z` with `bonds` bonded neighbours: its
    /// element's, lowered for under-coordinated atoms of the elements listed in
    /// [`Self::under_coordinated`].
    pub fn displacement_energy_with_bonds(&self, z: u8, bonds: u32) -> f64 {
        let e = self.displacement_energy_of(z);
        let sym = SYMBOLS.get(z as usize).copied().unwrap_or("X");
        match self.under_coordinated.get(sym) {
            Some(u) if bonds < u.bonds => {
                let missing = f64::from(u.bonds - bonds);
                (e - missing * u.missing_bond_energy.get()).max(MIN_DISPLACEMENT_ENERGY)
            }
            _ => e,
        }
    }

    /// Displacement energy of element `z`, eV.
    pub fn displacement_energy_of(&self, z: u8) -> f64 {
        self.displacement_energy
            .get(SYMBOLS.get(z as usize).copied().unwrap_or("X"))
            .map_or(self.default_displacement_energy.get(), Param::get)
    }

    /// A table of knock-on cross-sections (m²) by atomic number at `energy_ev`.
    pub fn cross_sections(&self, energy_ev: f64) -> [f64; 93] {
        let mut out = [0.0; 93];
        for (z, o) in out.iter_mut().enumerate().skip(1) {
            *o = self.cross_section_at(energy_ev, z as u8, self.displacement_energy_of(z as u8));
        }
        out
    }

    /// Knock-on cross-section (m²) of element `z` at `energy_ev` for displacement energy `e_d`
    /// (eV), thermally smeared at [`Self::temperature`] and scaled by
    /// [`Self::cross_section_scale`].
    pub fn cross_section_at(&self, energy_ev: f64, z: u8, e_d: f64) -> f64 {
        let m = ATOMIC_MASS_U[z as usize];
        let v_rms = (BOLTZMANN * self.temperature.get() / (m * AMU)).sqrt();
        self.cross_section_scale.get() * knock_on_cross_section(energy_ev, z, m, e_d, v_rms)
    }

    /// The knock-on cross-sections at `energy_ev`, per element and per coordination.
    pub fn knock_on(&self, energy_ev: f64) -> KnockOn {
        let under = self
            .under_coordinated
            .iter()
            .filter_map(|(k, u)| {
                let z = crate::constants::atomic_number(k)?;
                let by_bonds = (0..u.bonds)
                    .map(|n| {
                        self.cross_section_at(
                            energy_ev,
                            z,
                            self.displacement_energy_with_bonds(z, n),
                        )
                    })
                    .collect();
                Some((z, by_bonds))
            })
            .collect();
        KnockOn {
            by_z: self.cross_sections(energy_ev),
            under,
            bond: self.bond_length.get(),
        }
    }
}

/// Lowest displacement energy an under-coordinated atom is given, eV.
pub const MIN_DISPLACEMENT_ENERGY: f64 = 1.0;

/// Knock-on cross-sections at one beam energy (m²): by element, and for the elements with
/// [`DamageConfig::under_coordinated`] thresholds by number of bonded neighbours.
#[derive(Debug, Clone, PartialEq)]
pub struct KnockOn {
    /// Cross-section of a fully coordinated atom by atomic number, m².
    pub by_z: [f64; 93],
    /// `(z, σ by bonded neighbours 0..bonds)` for under-coordinated atoms, m².
    pub under: Vec<(u8, Vec<f64>)>,
    /// Bond length cutoff, m.
    pub bond: f64,
}

impl KnockOn {
    /// Whether any atom can be sputtered (some cross-section is positive).
    pub fn any(&self) -> bool {
        self.by_z.iter().any(|s| *s > 0.0) || self.under.iter().flat_map(|u| &u.1).any(|s| *s > 0.0)
    }

    /// Cross-section (m²) of an atom of element `z` with `bonds` bonded neighbours.
    pub fn sigma(&self, z: u8, bonds: u32) -> f64 {
        if let Some((_, by)) = self.under.iter().find(|u| u.0 == z)
            && let Some(s) = by.get(bonds as usize)
        {
            return *s;
        }
        self.by_z.get(z as usize).copied().unwrap_or(0.0)
    }

    /// Bonded-neighbour counts of `specimen`'s atoms ([`coordination`]), or `None` when no
    /// element has under-coordinated thresholds (then the cross-section is by element).
    pub fn coordination_of(&self, specimen: &Specimen) -> Option<Vec<u32>> {
        (!self.under.is_empty()).then(|| coordination(specimen, self.bond))
    }

    /// The cross-section function [`sputter_with`] takes, given the counts of
    /// [`Self::coordination_of`].
    pub fn sigma_of<'a>(
        &'a self,
        bonds: &'a Option<Vec<u32>>,
    ) -> impl Fn(usize, &Atom) -> f64 + 'a {
        move |i, a| match bonds {
            Some(b) => self.sigma(a.z, b[i]),
            None => self.by_z.get(a.z as usize).copied().unwrap_or(0.0),
        }
    }
}

/// [`KnockOn::coordination_of`] kept for the specimen it was counted on: an exposure that
/// finds the same atoms (positions, heights, elements), cell and bond length reuses the counts
/// instead of counting every atom's neighbours again.
#[derive(Debug, Clone, Default)]
pub struct CoordinationCache {
    /// The specimen and bond length (m) the counts belong to (`None`: nothing counted yet).
    of: Option<(Specimen, f64)>,
    /// The counts.
    bonds: Option<Vec<u32>>,
}

impl CoordinationCache {
    /// The counts of [`KnockOn::coordination_of`] for `specimen`, counted again only when its
    /// atoms or cell differ from the last call's.
    pub fn get(&mut self, knock: &KnockOn, specimen: &Specimen) -> &Option<Vec<u32>> {
        if knock.under.is_empty() {
            self.of = None;
            self.bonds = None;
        } else if self
            .of
            .as_ref()
            .is_none_or(|(s, bond)| s != specimen || *bond != knock.bond)
        {
            self.bonds = knock.coordination_of(specimen);
            match &mut self.of {
                Some((s, bond)) => {
                    s.clone_from(specimen);
                    *bond = knock.bond;
                }
                None => self.of = Some((specimen.clone(), knock.bond)),
            }
        }
        &self.bonds
    }
}

/// Number of bonded neighbours of each atom: atoms within `bond` (m) in projection
/// (minimum-image distance in a periodic specimen) and at the same height within 1 Å, as
/// [`Specimen::neighbors`] counts them. Linear in the number of atoms (a cell list) for periodic
/// specimens whose cell spans at least three bonds along each axis; quadratic otherwise.
pub fn coordination(specimen: &Specimen, bond: f64) -> Vec<u32> {
    let atoms = &specimen.atoms;
    let n = atoms.len();
    let mut out = vec![0u32; n];
    let bonded = |i: usize, j: usize| {
        let (p, q) = (atoms[i], atoms[j]);
        if (q.height - p.height).abs() >= 1e-10 {
            return false;
        }
        let [dx, dy] = specimen.separation([p.x, p.y], [q.x, q.y]);
        dx.hypot(dy) <= bond
    };
    let bins = specimen.cell.map(|c| {
        let size = c.size();
        [0, 1].map(|k| (size[k] / bond).floor() as usize)
    });
    match (specimen.cell, bins) {
        (Some(cell), Some([b1, b2])) if b1 >= 3 && b2 >= 3 => {
            let size = cell.size();
            let bin_of = |a: &Atom| {
                let q = cell.to_cell(cell.wrap([a.x, a.y]));
                let f = |k: usize, nb: usize| {
                    let u = ((q[k] / size[k] + 0.5) * nb as f64).floor() as i64;
                    u.rem_euclid(nb as i64) as usize
                };
                (f(0, b1), f(1, b2))
            };
            let mut head: Vec<Vec<usize>> = vec![Vec::new(); b1 * b2];
            let home: Vec<(usize, usize)> = atoms.iter().map(bin_of).collect();
            for (i, &(u, v)) in home.iter().enumerate() {
                head[v * b1 + u].push(i);
            }
            for (i, &(u, v)) in home.iter().enumerate() {
                for dv in [b2 - 1, 0, 1] {
                    for du in [b1 - 1, 0, 1] {
                        let cell_idx = ((v + dv) % b2) * b1 + (u + du) % b1;
                        for &j in &head[cell_idx] {
                            if j != i && bonded(i, j) {
                                out[i] += 1;
                            }
                        }
                    }
                }
            }
        }
        _ => {
            for i in 0..n {
                for j in i + 1..n {
                    if bonded(i, j) {
                        out[i] += 1;
                        out[j] += 1;
                    }
                }
            }
        }
    }
    out
}

/// Beam-current fluctuation: the current (and so every pixel's dose) times a positive factor
/// `f = exp(g − s²/2)`, g a stationary Gaussian AR(1) (Ornstein-Uhlenbeck) process of variance
/// `s² = ln(1 + r²)` and correlation `exp(−Δt/τ)` between times Δt apart. Then exactly
/// `E[f] = 1` (the mean dose is kept), `Var f = r²` and the correlation of f at lag Δt is
/// `(exp(s²·e^{−Δt/τ}) − 1)/(exp(s²) − 1)`, which is `exp(−Δt/τ)` to first order in r² (for
/// r = 5 % within 0.13 % of it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurrentFluctuation {
    /// Relative r.m.s. r of the current.
    pub relative_rms: f64,
    /// Correlation time τ, s.
    pub correlation_time: f64,
    /// The Gaussian state g; `None` before the first draw (then drawn from the stationary law).
    state: Option<f64>,
}

impl CurrentFluctuation {
    /// A process of relative r.m.s. `relative_rms` and correlation time `correlation_time` (s).
    pub fn new(relative_rms: f64, correlation_time: f64) -> Self {
        Self {
            relative_rms,
            correlation_time,
            state: None,
        }
    }

    /// Whether the current fluctuates at all.
    pub fn is_on(&self) -> bool {
        self.relative_rms > 0.0
    }

    /// Forgets the state (the next draw comes from the stationary law).
    pub fn reset(&mut self) {
        self.state = None;
    }

    /// The factor `dt` (s) after the previous draw.
    pub fn next(&mut self, dt: f64, rng: &mut SimRng) -> f64 {
        let s2 = self.relative_rms.powi(2).ln_1p();
        let s = s2.sqrt();
        let g = match self.state {
            None => s * normal(rng),
            Some(g) => {
                let rho = (-dt.max(0.0) / self.correlation_time).exp();
                rho * g + s * (1.0 - rho * rho).max(0.0).sqrt() * normal(rng)
            }
        };
        self.state = Some(g);
        (g - 0.5 * s2).exp()
    }
}

/// Cumulative electron dose per area on a grid fixed to the specimen, electrons/m².
///
/// The grid is periodic on the specimen's [`Supercell`]: its bins are aligned with the cell's
/// axes and a whole number of them spans the cell, so a dose delivered anywhere in the plane
/// lands on the bin of the specimen region it hit (the same atoms), however far the scan is
/// panned or the specimen drifted, and the map's memory stays that of one cell.
#[derive(Debug, Clone, PartialEq)]
pub struct DoseMap {
    /// Dose per bin, row-major (row = the cell's second axis ê₂), electrons/m².
    pub dose: Vec<f64>,
    /// Bins along the cell's axes ê₁ and ê₂.
    pub shape: [usize; 2],
    /// Bin sides along ê₁ and ê₂, m: the requested bin size rounded so that whole bins span the
    /// cell.
    pub cell: [f64; 2],
    /// The periodic cell the map covers (specimen coordinates); bin (0, 0) starts at its corner
    /// `(ξ, η) = −size/2`.
    pub period: Supercell,
}

/// Area (m²) of the convex polygon `poly` (cell coordinates, either orientation) inside the
/// rectangle `[lo, hi]` (Sutherland-Hodgman clipping, then the shoelace formula).
fn clipped_area(poly: &[[f64; 2]; 4], lo: [f64; 2], hi: [f64; 2]) -> f64 {
    // A quadrilateral clipped by four half-planes has at most 8 vertices.
    let (mut cur, mut next) = ([[0.0f64; 2]; 8], [[0.0f64; 2]; 8]);
    cur[..4].copy_from_slice(poly);
    let mut n = 4;
    for (axis, bound, sign) in [
        (0, lo[0], 1.0),
        (0, hi[0], -1.0),
        (1, lo[1], 1.0),
        (1, hi[1], -1.0),
    ] {
        let inside = |p: [f64; 2]| sign * (p[axis] - bound) >= 0.0;
        let mut m = 0;
        for k in 0..n {
            let (p, q) = (cur[k], cur[(k + 1) % n]);
            let (ip, iq) = (inside(p), inside(q));
            if ip {
                next[m] = p;
                m += 1;
            }
            if ip != iq {
                let t = (bound - p[axis]) / (q[axis] - p[axis]);
                next[m] = [p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])];
                m += 1;
            }
        }
        std::mem::swap(&mut cur, &mut next);
        n = m;
        if n == 0 {
            return 0.0;
        }
    }
    let twice: f64 = (0..n)
        .map(|k| {
            let (p, q) = (cur[k], cur[(k + 1) % n]);
            p[0] * q[1] - q[0] * p[1]
        })
        .sum();
    0.5 * twice.abs()
}

impl DoseMap {
    /// An empty map periodic on `period`, with bins of about `bin` (m) on a side.
    pub fn new(period: Supercell, bin: f64) -> Self {
        let size = period.size();
        let shape = size.map(|l| ((l / bin).round() as usize).max(1));
        Self {
            dose: vec![0.0; shape[0] * shape[1]],
            shape,
            cell: [size[0] / shape[0] as f64, size[1] / shape[1] as f64],
            period,
        }
    }

    /// Unwrapped bin index along axis `k` of cell coordinate `q` (m).
    fn index(&self, q: f64, k: usize) -> i64 {
        ((q + 0.5 * self.period.size()[k]) / self.cell[k]).floor() as i64
    }

    /// Flat index of the bin with unwrapped indices `(i, j)`, wrapped onto the cell.
    fn flat(&self, i: i64, j: i64) -> usize {
        let i = i.rem_euclid(self.shape[0] as i64) as usize;
        let j = j.rem_euclid(self.shape[1] as i64) as usize;
        j * self.shape[0] + i
    }

    /// Adds a uniform dose (e⁻/m²) over the rectangle `[x0, x1] × [y0, y1]` (specimen
    /// coordinates, lab axes), weighting partially covered bins by their covered fraction (exact
    /// polygon clipping), wrapped onto the periodic cell: the electrons added are exactly
    /// `dose · (x1 − x0)(y1 − y0)`.
    pub fn add_rect(&mut self, x0: f64, x1: f64, y0: f64, y1: f64, dose: f64) {
        if !(x1 > x0 && y1 > y0) {
            return;
        }
        let c = self.period;
        let poly = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]].map(|p| c.to_cell(p));
        let lo = [0, 1].map(|k| poly.iter().map(|p| p[k]).fold(f64::INFINITY, f64::min));
        let hi = [0, 1].map(|k| poly.iter().map(|p| p[k]).fold(f64::NEG_INFINITY, f64::max));
        let [b1, b2] = self.cell;
        let half = c.size().map(|l| 0.5 * l);
        let (i0, i1) = (self.index(lo[0], 0), self.index(hi[0], 0));
        let (j0, j1) = (self.index(lo[1], 1), self.index(hi[1], 1));
        let [e1, e2] = c.periods();
        if e1[1] == 0.0 && e2[0] == 0.0 {
            // Axes along the lab's (up to their sense): the covered fraction of a bin is the
            // product of its covered fractions along each axis.
            let cover = |lo: f64, hi: f64, start: f64, b: f64| {
                ((hi.min(start + b) - lo.max(start)) / b).clamp(0.0, 1.0)
            };
            for j in j0..=j1 {
                let fy = cover(lo[1], hi[1], j as f64 * b2 - half[1], b2);
                if fy <= 0.0 {
                    continue;
                }
                for i in i0..=i1 {
                    let fx = cover(lo[0], hi[0], i as f64 * b1 - half[0], b1);
                    if fx > 0.0 {
                        let k = self.flat(i, j);
                        self.dose[k] += dose * fx * fy;
                    }
                }
            }
            return;
        }
        // Rotated axes: the rectangle as a general quadrilateral (its inside test is exactly
        // the rectangle's, one of each edge's two products being zero).
        self.add_quad([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dose);
    }

    /// Adds a uniform dose (e⁻/m²) over the convex quadrilateral `quad` (specimen coordinates,
    /// lab axes, corners in order, either orientation), weighting partially covered bins by
    /// their covered fraction (exact polygon clipping), wrapped onto the periodic cell: the
    /// electrons added are exactly `dose` times the quadrilateral's area. The footprint of a
    /// distorted scan ([`crate::stem::scan::ScanDistortion`]: a parallelogram).
    pub fn add_quad(&mut self, quad: [[f64; 2]; 4], dose: f64) {
        // Orientation (twice the signed area): the inside is on the left of each edge when > 0.
        let area2: f64 = (0..4)
            .map(|k| {
                let (p, q) = (quad[k], quad[(k + 1) % 4]);
                p[0] * q[1] - q[0] * p[1]
            })
            .sum();
        if !(area2.abs() > 0.0 && dose.is_finite()) {
            return;
        }
        let sense = area2.signum();
        // Bins with all four corners inside are covered; the others are clipped. Lab corners
        // advance by the bin's edge vectors.
        let inside = |t: [f64; 2]| {
            (0..4).all(|k| {
                let (p, q) = (quad[k], quad[(k + 1) % 4]);
                sense * ((q[0] - p[0]) * (t[1] - p[1]) - (q[1] - p[1]) * (t[0] - p[0])) >= 0.0
            })
        };
        let c = self.period;
        let poly = quad.map(|p| c.to_cell(p));
        let lo = [0, 1].map(|k| poly.iter().map(|p| p[k]).fold(f64::INFINITY, f64::min));
        let hi = [0, 1].map(|k| poly.iter().map(|p| p[k]).fold(f64::NEG_INFINITY, f64::max));
        let [b1, b2] = self.cell;
        let half = c.size().map(|l| 0.5 * l);
        let (i0, i1) = (self.index(lo[0], 0), self.index(hi[0], 0));
        let (j0, j1) = (self.index(lo[1], 1), self.index(hi[1], 1));
        let (di, dj) = (c.from_cell([b1, 0.0]), c.from_cell([0.0, b2]));
        for j in j0..=j1 {
            let e0 = j as f64 * b2 - half[1];
            let row = c.from_cell([i0 as f64 * b1 - half[0], e0]);
            for (n, i) in (i0..=i1).enumerate() {
                let s0 = i as f64 * b1 - half[0];
                let p = [row[0] + n as f64 * di[0], row[1] + n as f64 * di[1]];
                let corners = [
                    p,
                    [p[0] + di[0], p[1] + di[1]],
                    [p[0] + dj[0], p[1] + dj[1]],
                    [p[0] + di[0] + dj[0], p[1] + di[1] + dj[1]],
                ];
                let frac = if corners.iter().all(|&q| inside(q)) {
                    1.0
                } else {
                    clipped_area(&poly, [s0, e0], [s0 + b1, e0 + b2]) / (b1 * b2)
                };
                if frac > 0.0 {
                    let k = self.flat(i, j);
                    self.dose[k] += dose * frac;
                }
            }
        }
    }

    /// Adds `electrons` spread as a Gaussian of standard deviation `sigma` (m) around `(x, y)`
    /// (specimen coordinates), wrapped onto the periodic cell.
    pub fn add_gaussian(&mut self, x: f64, y: f64, sigma: f64, electrons: f64) {
        let [b1, b2] = self.cell;
        let s = sigma.max(0.25 * b1.min(b2));
        let q = self.period.to_cell([x, y]);
        let (ri, rj) = ((4.0 * s / b1).ceil() as i64, (4.0 * s / b2).ceil() as i64);
        let (ci, cj) = (self.index(q[0], 0), self.index(q[1], 1));
        let half = self.period.size().map(|l| 0.5 * l);
        // Two passes over the window (normalize, then deposit): no allocation.
        let weight = |i: i64, j: i64| {
            let px = (i as f64 + 0.5) * b1 - half[0];
            let py = (j as f64 + 0.5) * b2 - half[1];
            (-((px - q[0]).powi(2) + (py - q[1]).powi(2)) / (2.0 * s * s)).exp()
        };
        let mut total = 0.0;
        for j in cj - rj..=cj + rj {
            for i in ci - ri..=ci + ri {
                total += weight(i, j);
            }
        }
        if total > 0.0 {
            let scale = electrons / total / (b1 * b2);
            for j in cj - rj..=cj + rj {
                for i in ci - ri..=ci + ri {
                    let k = self.flat(i, j);
                    self.dose[k] += scale * weight(i, j);
                }
            }
        }
    }

    /// Dose at a specimen position (the containing bin's, on the periodic cell), e⁻/m².
    pub fn at(&self, x: f64, y: f64) -> f64 {
        let q = self.period.to_cell([x, y]);
        self.dose[self.flat(self.index(q[0], 0), self.index(q[1], 1))]
    }

    /// Total number of electrons delivered.
    pub fn total_electrons(&self) -> f64 {
        self.dose.iter().sum::<f64>() * self.cell[0] * self.cell[1]
    }
}

/// Projected distance (m) within which atoms belong to one atomic column for sputtering: 0.2 Å
/// (well below any projected interatomic distance of the crystals the builder makes).
pub const COLUMN_RADIUS: f64 = 0.2e-10;

/// Height difference (m) below which two atoms count as level (both at the exit surface).
const LEVEL: f64 = 1e-13;

/// Removes atoms by knock-on sputtering given the dose each received.
///
/// `dose_of(atom)` returns the dose (e⁻/m²) an atom received in this exposure, delivered
/// uniformly over it. Only exit-surface atoms can be sputtered (module docs): an atom with
/// another atom within [`COLUMN_RADIUS`] in projection at a larger [`Atom::height`] (further
/// along the beam) is shielded until that atom has gone; then it receives the rest of the
/// exposure (the fraction left when the last atom below it was removed, times its dose). Each
/// exposed atom is removed with probability `1 - exp(-σ D)`, one uniform draw per atom that can
/// be hit, first for the atoms at the exit surface in the specimen's order (so a specimen with
/// no stacked atoms draws exactly as an atom-by-atom rule), then for uncovered atoms from the
/// exit side inward. Returns the removed atoms in their original order (no allocation when none
/// can be hit).
pub fn sputter(
    specimen: &mut Specimen,
    sigma_by_z: &[f64; 93],
    rng: &mut SimRng,
    dose_of: impl FnMut(&Atom) -> f64,
) -> Vec<Atom> {
    sputter_with(
        specimen,
        |_, a| sigma_by_z.get(a.z as usize).copied().unwrap_or(0.0),
        rng,
        dose_of,
    )
}

/// [`sputter`] with a cross-section (m²) per atom: `sigma_of(index, atom)`, e.g. lower for
/// under-coordinated atoms ([`KnockOn::sigma_of`]). Draws exactly as [`sputter`] when
/// `sigma_of` depends on the atomic number only.
pub fn sputter_with(
    specimen: &mut Specimen,
    sigma_of: impl Fn(usize, &Atom) -> f64,
    rng: &mut SimRng,
    mut dose_of: impl FnMut(&Atom) -> f64,
) -> Vec<Atom> {
    // Atoms this exposure may remove: (index, dose).
    let mut hit: Vec<(usize, f64)> = Vec::new();
    for (i, a) in specimen.atoms.iter().enumerate() {
        let sigma = sigma_of(i, a);
        if sigma <= 0.0 {
            continue;
        }
        let d = dose_of(a);
        if -(-sigma * d).exp_m1() > 0.0 {
            hit.push((i, d));
        }
    }
    if hit.is_empty() {
        return Vec::new();
    }
    let atoms = &specimen.atoms;
    // Exposure fraction at which each atom left (infinite: still there).
    let mut gone = vec![f64::INFINITY; atoms.len()];
    let shields = shielding(atoms, &hit);
    // Atoms at the exit surface, in the specimen's order. Draw only when the probability is
    // non-zero so that damage-free exposures consume no random numbers.
    for (k, &(i, d)) in hit.iter().enumerate() {
        if shields[k].is_empty() {
            let sigma = sigma_of(i, &atoms[i]);
            let p = -(-sigma * d).exp_m1();
            let u: f64 = rng.random();
            if u < p {
                // Removed once σ times the dose delivered so far reached E = −ln(1 − u).
                gone[i] = (-(-u).ln_1p() / (sigma * d)).min(1.0);
            }
        }
    }
    // Covered atoms, from the exit side inward: exposed from the moment the last atom below
    // them left.
    let mut covered: Vec<usize> = (0..hit.len()).filter(|&k| !shields[k].is_empty()).collect();
    covered.sort_by(|&a, &b| atoms[hit[b].0].height.total_cmp(&atoms[hit[a].0].height));
    for k in covered {
        let (i, d) = hit[k];
        let start = shields[k].iter().fold(0.0f64, |m, &j| m.max(gone[j]));
        if start >= 1.0 {
            continue;
        }
        let sigma = sigma_of(i, &atoms[i]);
        let p = -(-sigma * d * (1.0 - start)).exp_m1();
        if p > 0.0 {
            let u: f64 = rng.random();
            if u < p {
                gone[i] = (start - (-u).ln_1p() / (sigma * d)).min(1.0);
            }
        }
    }
    let mut removed = Vec::new();
    let mut k = 0;
    specimen.atoms.retain(|a| {
        let keep = gone[k].is_infinite();
        k += 1;
        if !keep {
            removed.push(*a);
        }
        keep
    });
    removed
}

/// For each hit atom `(index, _)`, the indices of the atoms that shield it: within
/// [`COLUMN_RADIUS`] in projection and further along the beam. Empty lists (no allocation per
/// atom) when every atom lies at one height.
fn shielding(atoms: &[Atom], hit: &[(usize, f64)]) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); hit.len()];
    let (lo, hi) = atoms
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), a| {
            (l.min(a.height), h.max(a.height))
        });
    if hi - lo <= LEVEL {
        return out;
    }
    // Atoms in the hit atoms' bounding box (plus the column radius), sorted by x.
    let r = COLUMN_RADIUS;
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(i, _) in hit {
        let a = &atoms[i];
        (x0, x1, y0, y1) = (x0.min(a.x), x1.max(a.x), y0.min(a.y), y1.max(a.y));
    }
    let mut near: Vec<(f64, usize)> = atoms
        .iter()
        .enumerate()
        .filter(|(_, a)| a.x >= x0 - r && a.x <= x1 + r && a.y >= y0 - r && a.y <= y1 + r)
        .map(|(j, a)| (a.x, j))
        .collect();
    near.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (o, &(i, _)) in out.iter_mut().zip(hit) {
        let a = &atoms[i];
        let from = near.partition_point(|e| e.0 < a.x - r);
        for &(x, j) in near[from..].iter().take_while(|e| e.0 <= a.x + r) {
            let b = &atoms[j];
            if (x - a.x).powi(2) + (b.y - a.y).powi(2) <= r * r && b.height > a.height + LEVEL {
                o.push(j);
            }
        }
    }
    out
}

/// One hop of a dopant: it moved from `from` to `to` (specimen coordinates, m) at time `time` (s,
/// since the start of the dwell). Both are the stored positions of the two atoms, in the
/// specimen's periodic cell: a hop across the cell edge has `to − from` one cell period off the
/// bond ([`Specimen::separation`] gives the bond).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hop {
    /// Index of the dopant atom (its index after the swap).
    pub atom: usize,
    /// Previous position, m.
    pub from: [f64; 2],
    /// New position, m.
    pub to: [f64; 2],
    /// Time of the hop since the start of the dwell or frame, s.
    pub time: f64,
}

/// The integrated hazard at which the next event of a Poisson process happens, `−ln(1 − u)`
/// for one uniform draw `u`, if it comes before the `hazard` still ahead (dimensionless): `None`
/// when nothing happens (also for a hazard of 0). The one event draw of [`HopModel::raster`] and
/// [`HopModel::raster_path`].
fn next_event(hazard: f64, rng: &mut SimRng) -> Option<f64> {
    if hazard <= 0.0 {
        return None;
    }
    let u: f64 = rng.random();
    let e = -(-u).ln_1p();
    (e < hazard).then_some(e)
}

/// One of `pairs` drawn with probability proportional to `weight` (the weights summing to
/// `total`): one uniform draw, the last pair where rounding leaves the draw beyond the sum. The
/// neighbour draw of every hop chain ([`HopModel::dwell`], [`HopModel::raster`],
/// [`HopModel::raster_path`]).
fn pick_weighted<T: Copy>(
    pairs: &[T],
    total: f64,
    weight: impl Fn(&T) -> f64,
    rng: &mut SimRng,
) -> T {
    let mut pick = rng.random::<f64>() * total;
    for p in pairs {
        let w = weight(p);
        if pick < w {
            return *p;
        }
        pick -= w;
    }
    pairs[pairs.len() - 1]
}

/// Performs one hop: the dopant at index `dopant` and the host atom at index `host` swap
/// species (positions stay), and the hop at `time` (s) is returned with the dopant's old and new
/// positions. The one place [`HopModel::dwell`] and [`HopModel::raster`] change the specimen.
fn swap_dopant(specimen: &mut Specimen, dopant: usize, host: usize, time: f64) -> Hop {
    let (a, b) = (specimen.atoms[dopant], specimen.atoms[host]);
    specimen.atoms[dopant].z = b.z;
    specimen.atoms[host].z = a.z;
    Hop {
        atom: host,
        from: [a.x, a.y],
        to: [b.x, b.y],
        time,
    }
}

/// Parameters of the hop chain, in SI units, resolved from a [`DamageConfig`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HopModel {
    /// Peak rate at the reference current, 1/s.
    pub peak_rate: f64,
    /// Reference current, A.
    pub reference_current: f64,
    /// Offset of the rate maximum from the dopant, m.
    pub offset: f64,
    /// Variance of the Gaussian profile, m².
    pub variance: f64,
    /// Dopant atomic number.
    pub dopant_z: u8,
    /// Host atomic number.
    pub host_z: u8,
}

impl HopModel {
    /// Reads the model from a damage config.
    pub fn from_config(c: &DamageConfig) -> Self {
        Self {
            peak_rate: c.hop_peak_rate.get(),
            reference_current: c.hop_reference_current.get(),
            offset: c.hop_offset.get(),
            variance: c.hop_variance.get(),
            dopant_z: c.hop_dopant_z,
            host_z: c.hop_host_z,
        }
    }

    /// Rate (1/s) of a hop from a dopant at `d` toward a neighbour at `n` with the beam at `b`
    /// carrying `current` (A).
    pub fn rate(&self, d: [f64; 2], n: [f64; 2], b: [f64; 2], current: f64) -> f64 {
        let (ux, uy) = (n[0] - d[0], n[1] - d[1]);
        let len = (ux * ux + uy * uy).sqrt();
        if len == 0.0 {
            return 0.0;
        }
        let mu = [d[0] + self.offset * ux / len, d[1] + self.offset * uy / len];
        let r2 = (b[0] - mu[0]).powi(2) + (b[1] - mu[1]).powi(2);
        self.peak_rate * (current / self.reference_current) * (-0.5 * r2 / self.variance).exp()
    }

    /// Runs the chain for `duration` seconds with the beam at `beam` (specimen coordinates, m;
    /// any image of it in a periodic specimen). Each dopant's neighbours are the host atoms
    /// within `bond` (m, minimum-image distance), found through `index` when it is given
    /// (built for the specimen's positions; hops move no atom, they swap elements). Returns the
    /// hops in order.
    #[allow(clippy::too_many_arguments)] // the beam's dwell, the specimen and its index, the stream
    pub fn dwell(
        &self,
        specimen: &mut Specimen,
        beam: [f64; 2],
        current: f64,
        duration: f64,
        bond: f64,
        index: Option<&AtomIndex>,
        rng: &mut SimRng,
    ) -> Vec<Hop> {
        let mut hops = Vec::new();
        let mut t = 0.0;
        // Only dopants close enough to the beam can have a non-negligible rate.
        let reach = self.offset + bond + 8.0 * self.variance.sqrt();
        loop {
            let mut rates: Vec<(usize, usize, f64)> = Vec::new();
            for (i, a) in specimen.atoms.iter().enumerate() {
                if a.z != self.dopant_z {
                    continue;
                }
                // Minimum images (periodic specimen): the beam and neighbours nearest the dopant.
                let b = specimen.image_near(beam, [a.x, a.y]);
                if (a.x - b[0]).hypot(a.y - b[1]) > reach {
                    continue;
                }
                for j in specimen.neighbors_indexed(index, i, bond) {
                    let n = specimen.atoms[j];
                    if n.z == self.host_z {
                        let n = specimen.image_near([n.x, n.y], [a.x, a.y]);
                        let r = self.rate([a.x, a.y], n, b, current);
                        if r > 0.0 {
                            rates.push((i, j, r));
                        }
                    }
                }
            }
            let total: f64 = rates.iter().map(|r| r.2).sum();
            if total <= 0.0 {
                break;
            }
            let u: f64 = rng.random();
            t += -(1.0 - u).ln() / total;
            if t >= duration {
                break;
            }
            let (i, j, _) = pick_weighted(&rates, total, |r| r.2, rng);
            hops.push(swap_dopant(specimen, i, j, t));
        }
        hops
    }

    /// Runs the chain while a raster frame is scanned (specimen coordinates): the beam holds
    /// pixel `(r, c)` at `raster.origin + (c, r)·pixel_size` for `dwell` from
    /// `r·(cols·dwell + flyback) + c·dwell` on, and the chain's rates are those of the pixel the
    /// beam holds (none during flyback). Each dopant's neighbours are the host atoms within
    /// `bond` (m). Hop times are from the start of the frame, s. Returns the hops in order.
    ///
    /// The event times are exact for rates constant over each dwell: the next hop comes when
    /// the hazard integrated along the raster from the last event reaches an exponential draw,
    /// and goes toward a neighbour with probability proportional to its rate at that pixel.
    /// Every rate is a Gaussian in the beam position, so the hazard of the whole raster is a
    /// product of sums along x and y; a frame without a hop costs a few of those sums per
    /// dopant within reach of the raster (and one uniform draw).
    pub fn raster(
        &self,
        specimen: &mut Specimen,
        raster: &Raster,
        current: f64,
        bond: f64,
        rng: &mut SimRng,
    ) -> Vec<Hop> {
        self.raster_with(specimen, raster, current, bond, None, rng)
    }

    /// [`Self::raster`] with the specimen's dopant-host pairs taken from `pairs` (listed once
    /// while the specimen stays as it is, instead of by a pass over every atom per frame): the
    /// same pairs in the same order, so the same hops and draws, bit for bit. `pairs` must have
    /// been invalidated ([`HopPairs::invalidate`]) since the specimen last changed outside this
    /// call (and since this model or `bond` changed); the hops of this call keep it up to date.
    pub fn raster_cached(
        &self,
        specimen: &mut Specimen,
        raster: &Raster,
        current: f64,
        bond: f64,
        pairs: &mut HopPairs,
        rng: &mut SimRng,
    ) -> Vec<Hop> {
        self.raster_with(specimen, raster, current, bond, Some(pairs), rng)
    }

    /// The pairs of [`Self::each_pair`] in `window`, from `cache` when given.
    fn pairs_in(
        &self,
        atoms: &[Atom],
        bond: f64,
        window: [f64; 4],
        cache: &mut Option<&mut HopPairs>,
        mut f: impl FnMut(usize, usize, [f64; 2]),
    ) {
        match cache {
            Some(c) => {
                c.refresh(self, atoms);
                for k in 0..c.dopants.len() {
                    let d = c.dopants[k];
                    if !in_window(window, d.at) {
                        continue;
                    }
                    let (start, end) = match d.pairs {
                        Some(r) => r,
                        None => {
                            // First time in a window: its pairs, listed once.
                            let start = c.pairs.len();
                            let pairs = &mut c.pairs;
                            self.hosts_of(atoms, bond, d.atom, |j, mu| pairs.push((j, mu)));
                            let r = (start, c.pairs.len());
                            c.dopants[k].pairs = Some(r);
                            r
                        }
                    };
                    for &(j, mu) in &c.pairs[start..end] {
                        f(d.atom, j, mu);
                    }
                }
            }
            None => self.each_pair(atoms, bond, window, f),
        }
    }

    fn raster_with(
        &self,
        specimen: &mut Specimen,
        raster: &Raster,
        current: f64,
        bond: f64,
        mut cache: Option<&mut HopPairs>,
        rng: &mut SimRng,
    ) -> Vec<Hop> {
        let mut hops = Vec::new();
        let Raster {
            origin,
            pixel_size: dx,
            rows,
            cols,
            dwell,
            flyback,
        } = *raster;
        let k = self.peak_rate * (current / self.reference_current);
        if rows == 0 || cols == 0 || !(k > 0.0 && dwell > 0.0 && dx > 0.0 && self.variance > 0.0) {
            return hops;
        }
        let line = cols as f64 * dwell + flyback;
        // Rate profiles are cut 8 standard deviations out (exp(−32) of the peak).
        let cut = 8.0 * self.variance.sqrt();
        let two_v = 2.0 * self.variance;
        let g = |x: f64, m: f64| {
            let d = x - m;
            if d.abs() <= cut {
                (-(d * d) / two_v).exp()
            } else {
                0.0
            }
        };
        let range = |o: f64, n: usize, m: f64| -> (usize, usize) {
            let lo = ((m - cut - o) / dx).ceil().max(0.0);
            let hi = ((m + cut - o) / dx).floor().min(n as f64 - 1.0);
            if hi < lo {
                (1, 0)
            } else {
                (lo as usize, hi as usize)
            }
        };
        // Sum of the profile along x over columns `from..`, or along y over rows `from..`.
        let sum_x = |m: f64, from: usize| {
            let (lo, hi) = range(origin[0], cols, m);
            (lo.max(from)..=hi)
                .map(|c| g(origin[0] + c as f64 * dx, m))
                .sum::<f64>()
        };
        let sum_y = |m: f64, from: usize| {
            let (lo, hi) = range(origin[1], rows, m);
            (lo.max(from)..=hi)
                .map(|r| g(origin[1] + r as f64 * dx, m))
                .sum::<f64>()
        };
        let gx = |m: f64, c: usize| g(origin[0] + c as f64 * dx, m);
        let gy = |m: f64, r: usize| g(origin[1] + r as f64 * dx, m);
        // Where the raster stands: pixel `pos` (row-major) with `frac` of its dwell elapsed.
        let (mut pos, mut frac) = (0usize, 0.0f64);
        // (dopant, host, μ, Σ_x of the profile over the whole row), filled when a hop comes.
        let mut pairs: Vec<(usize, usize, [f64; 2], f64)> = Vec::new();
        let reach = self.offset + cut;
        let (x_lo, x_hi) = (
            origin[0] - reach,
            origin[0] + (cols - 1) as f64 * dx + reach,
        );
        let y_hi = origin[1] + (rows - 1) as f64 * dx + reach;
        loop {
            let (r0, c0) = (pos / cols, pos % cols);
            let window = [x_lo, x_hi, origin[1] + r0 as f64 * dx - reach, y_hi];
            // Hazard of the rest of the raster: the rest of the current pixel and row, then the
            // rows below (nothing is stored: a frame without a hop allocates nothing).
            let mut hazard = 0.0;
            self.pairs_in(&specimen.atoms, bond, window, &mut cache, |_, _, mu| {
                let sx = sum_x(mu[0], 0);
                if sx > 0.0 {
                    hazard += gy(mu[1], r0) * ((1.0 - frac) * gx(mu[0], c0) + sum_x(mu[0], c0 + 1))
                        + sx * sum_y(mu[1], r0 + 1);
                }
            });
            hazard *= k * dwell;
            let Some(e) = next_event(hazard, rng) else {
                break;
            };
            pairs.clear();
            self.pairs_in(&specimen.atoms, bond, window, &mut cache, |i, j, mu| {
                let sx = sum_x(mu[0], 0);
                if sx > 0.0 {
                    pairs.push((i, j, mu, sx));
                }
            });
            // Walk the raster to the pixel where the integrated hazard reaches `e`.
            let pixel_rate = |r: usize, c: usize| {
                k * pairs
                    .iter()
                    .map(|p| gy(p.2[1], r) * gx(p.2[0], c))
                    .sum::<f64>()
            };
            let mut acc = 0.0;
            let mut found = None;
            'rows: for r in r0..rows {
                if r > r0 {
                    let whole = k * dwell * pairs.iter().map(|p| gy(p.2[1], r) * p.3).sum::<f64>();
                    if acc + whole <= e {
                        acc += whole;
                        continue;
                    }
                }
                let c_from = if r == r0 { c0 } else { 0 };
                for c in c_from..cols {
                    let start = if r == r0 && c == c0 { frac } else { 0.0 };
                    let rate = pixel_rate(r, c);
                    let h = rate * dwell * (1.0 - start);
                    if acc + h > e {
                        let f = (start + (e - acc) / (rate * dwell)).min(1.0);
                        found = Some((r, c, f));
                        break 'rows;
                    }
                    acc += h;
                }
            }
            // Rounding can leave the walk a hair short of `e`: no hop then.
            let Some((r, c, f)) = found else { break };
            // The neighbour, by its rate at this pixel.
            let chosen = pick_weighted(
                &pairs,
                pixel_rate(r, c) / k,
                |p| gy(p.2[1], r) * gx(p.2[0], c),
                rng,
            );
            let time = r as f64 * line + (c as f64 + f) * dwell;
            hops.push(swap_dopant(specimen, chosen.0, chosen.1, time));
            if let Some(c) = cache.as_deref_mut() {
                c.invalidate();
            }
            (pos, frac) = (r * cols + c, f);
        }
        hops
    }

    /// [`Self::raster`] for a raster whose pixels lie anywhere (a distorted scan: rotation,
    /// shear, scale errors, flyback lag): the beam holds pixel `k` (row-major, `path.cols` per
    /// row) at `path.positions[k]` (specimen coordinates, m) for `path.dwell` from
    /// `r·(cols·dwell + flyback) + c·dwell` on. Same chain and event times (exact for rates
    /// constant over each dwell), without the separable sums: the rate of each pixel from the
    /// current one on is summed over the dopant-host pairs for every event (`rows·cols` floats
    /// of scratch, allocated per call).
    pub fn raster_path(
        &self,
        specimen: &mut Specimen,
        path: &RasterPath<'_>,
        current: f64,
        bond: f64,
        rng: &mut SimRng,
    ) -> Vec<Hop> {
        let mut hops = Vec::new();
        let RasterPath {
            positions,
            cols,
            dwell,
            flyback,
        } = *path;
        let n = positions.len();
        let k = self.peak_rate * (current / self.reference_current);
        if n == 0 || cols == 0 || !(k > 0.0 && dwell > 0.0 && self.variance > 0.0) {
            return hops;
        }
        let line = cols as f64 * dwell + flyback;
        let cut = 8.0 * self.variance.sqrt();
        let two_v = 2.0 * self.variance;
        // Profile of a pair centred at `mu` with the beam at `p` (cut like `raster`'s).
        let g = |p: [f64; 2], mu: [f64; 2]| {
            let (dx, dy) = (p[0] - mu[0], p[1] - mu[1]);
            if dx.abs() <= cut && dy.abs() <= cut {
                (-(dx * dx + dy * dy) / two_v).exp()
            } else {
                0.0
            }
        };
        let reach = self.offset + cut;
        let lo = [0, 1].map(|a| positions.iter().map(|p| p[a]).fold(f64::INFINITY, f64::min));
        let hi = [0, 1].map(|a| {
            positions
                .iter()
                .map(|p| p[a])
                .fold(f64::NEG_INFINITY, f64::max)
        });
        let window = [lo[0] - reach, hi[0] + reach, lo[1] - reach, hi[1] + reach];
        let mut pairs: Vec<(usize, usize, [f64; 2])> = Vec::new();
        let mut rates = vec![0.0f64; n];
        let (mut pos, mut frac) = (0usize, 0.0f64);
        loop {
            pairs.clear();
            self.each_pair(&specimen.atoms, bond, window, |i, j, mu| {
                pairs.push((i, j, mu))
            });
            if pairs.is_empty() {
                break;
            }
            // Profile sums of the pixels still to come, and the hazard of the rest of the raster.
            let mut hazard = 0.0;
            for (idx, r) in rates.iter_mut().enumerate().skip(pos) {
                *r = pairs.iter().map(|p| g(positions[idx], p.2)).sum::<f64>();
                hazard += if idx == pos { (1.0 - frac) * *r } else { *r };
            }
            hazard *= k * dwell;
            let Some(e) = next_event(hazard, rng) else {
                break;
            };
            let mut acc = 0.0;
            let mut found = None;
            for (idx, r) in rates.iter().enumerate().skip(pos) {
                let start = if idx == pos { frac } else { 0.0 };
                let rate = k * r;
                let h = rate * dwell * (1.0 - start);
                if acc + h > e {
                    found = Some((idx, (start + (e - acc) / (rate * dwell)).min(1.0)));
                    break;
                }
                acc += h;
            }
            // Rounding can leave the walk a hair short of `e`: no hop then.
            let Some((idx, f)) = found else { break };
            let chosen = pick_weighted(&pairs, rates[idx], |p| g(positions[idx], p.2), rng);
            let (r, c) = (idx / cols, idx % cols);
            let time = r as f64 * line + (c as f64 + f) * dwell;
            hops.push(swap_dopant(specimen, chosen.0, chosen.1, time));
            (pos, frac) = (idx, f);
        }
        hops
    }

    /// Calls `f(dopant, host, μ)` for every dopant (atomic number [`Self::dopant_z`]) inside
    /// `window = [x_lo, x_hi, y_lo, y_hi]` (m) and each host atom ([`Self::host_z`]) within
    /// `bond` (m) of it in projection at its height, μ the centre of the hop's rate profile
    /// ([`Self::offset`] from the dopant toward the host). Allocates nothing.
    fn each_pair(
        &self,
        atoms: &[Atom],
        bond: f64,
        window: [f64; 4],
        mut f: impl FnMut(usize, usize, [f64; 2]),
    ) {
        for (i, a) in atoms.iter().enumerate() {
            if a.z != self.dopant_z || !in_window(window, [a.x, a.y]) {
                continue;
            }
            self.hosts_of(atoms, bond, i, |j, mu| f(i, j, mu));
        }
    }

    /// The host neighbours `j` of atom `i` (ascending) within `bond` (m, raw positions), with
    /// the rate maximum `μ` of each: [`Self::each_pair`]'s pairs of one dopant.
    fn hosts_of(&self, atoms: &[Atom], bond: f64, i: usize, mut f: impl FnMut(usize, [f64; 2])) {
        let a = atoms[i];
        for (j, n) in atoms.iter().enumerate() {
            let (ux, uy) = (n.x - a.x, n.y - a.y);
            if n.z != self.host_z || ux.abs() > bond || uy.abs() > bond || j == i {
                continue;
            }
            let len = (ux * ux + uy * uy).sqrt();
            if len == 0.0 || len > bond || (n.height - a.height).abs() >= 1e-10 {
                continue;
            }
            f(
                j,
                [a.x + self.offset * ux / len, a.y + self.offset * uy / len],
            );
        }
    }
}

/// Whether `p` lies in `[x_lo, x_hi] × [y_lo, y_hi]` (`window`, m; a NaN coordinate counts
/// as inside, as the comparisons go).
fn in_window(window: [f64; 4], p: [f64; 2]) -> bool {
    let [x_lo, x_hi, y_lo, y_hi] = window;
    !(p[0] < x_lo || p[0] > x_hi || p[1] < y_lo || p[1] > y_hi)
}

/// The dopant-host pairs of a specimen as [`HopModel::raster`] finds them: the dopants in atom
/// order (listed once), and each one's host neighbours in atom order with the rate maximum `μ`
/// of each pair (listed the first time the dopant is within reach of a frame), kept until
/// invalidated ([`HopModel::raster_cached`]).
#[derive(Debug, Clone, Default)]
pub struct HopPairs {
    dopants: Vec<CachedDopant>,
    /// `(host, μ)` (m), each dopant's in a range of its own.
    pairs: Vec<(usize, [f64; 2])>,
    valid: bool,
}

#[derive(Debug, Clone, Copy)]
struct CachedDopant {
    atom: usize,
    /// The dopant's position, m.
    at: [f64; 2],
    /// Its pairs' range in [`HopPairs::pairs`], once listed.
    pairs: Option<(usize, usize)>,
}

impl HopPairs {
    /// Marks the lists stale: the specimen or the hop model changed.
    pub fn invalidate(&mut self) {
        self.valid = false;
    }

    /// Lists the dopants of `atoms` for `model` if stale (their pairs to be listed when needed).
    fn refresh(&mut self, model: &HopModel, atoms: &[Atom]) {
        if self.valid {
            return;
        }
        self.pairs.clear();
        self.dopants.clear();
        for (i, a) in atoms.iter().enumerate() {
            if a.z == model.dopant_z {
                self.dopants.push(CachedDopant {
                    atom: i,
                    at: [a.x, a.y],
                    pairs: None,
                });
            }
        }
        self.valid = true;
    }
}

/// A raster frame as the beam visits it, in specimen coordinates (for [`HopModel::raster`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Raster {
    /// Position of pixel (0, 0), m; pixel `(r, c)` lies at `origin + (c, r)·pixel_size`.
    pub origin: [f64; 2],
    /// Pixel size, m.
    pub pixel_size: f64,
    /// Rows (slow axis).
    pub rows: usize,
    /// Columns (fast axis).
    pub cols: usize,
    /// Dwell per pixel, s.
    pub dwell: f64,
    /// Flyback per row, s (the beam leaves the specimen alone meanwhile).
    pub flyback: f64,
}

/// A raster whose pixels lie anywhere (for [`HopModel::raster_path`]), in specimen
/// coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RasterPath<'a> {
    /// Beam position of each pixel, row-major, m.
    pub positions: &'a [[f64; 2]],
    /// Columns (fast axis); the rows are `positions.len() / cols`.
    pub cols: usize,
    /// Dwell per pixel, s.
    pub dwell: f64,
    /// Flyback per row, s.
    pub flyback: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;
    use crate::stem::specimen::{DopantConfig, SpecimenConfig};

    #[test]
    fn t_max_for_carbon_at_86_kev() {
        // DESIGN/issue: 17.05 eV within 1 %.
        let t = max_transfer(86e3, 12.0);
        assert!((t / 17.05 - 1.0).abs() < 0.01, "{t}");
    }

    #[test]
    fn gauss_hermite_integrates_moments() {
        let nodes = crate::quadrature::gauss_hermite(20);
        let m0: f64 = nodes.iter().map(|n| n.1).sum();
        let m2: f64 = nodes.iter().map(|n| n.1 * n.0 * n.0).sum();
        let m4: f64 = nodes.iter().map(|n| n.1 * n.0.powi(4)).sum();
        assert!((m0 - 1.0).abs() < 1e-10, "{m0}");
        assert!((m2 - 1.0).abs() < 1e-10, "{m2}");
        assert!((m4 - 3.0).abs() < 1e-9, "{m4}");
    }

    #[test]
    fn cross_section_is_smooth_and_rises_from_zero_at_threshold() {
        // Static threshold for C with E_d = 21 eV: T_max = 21 eV at ~ 101 keV.
        let v_rms = (BOLTZMANN * 300.0 / (12.011 * AMU)).sqrt();
        let sig = |e: f64| knock_on_cross_section(e, 6, 12.011, 21.0, v_rms);
        let s60 = sig(60e3);
        let s80 = sig(80e3);
        let s95 = sig(95e3);
        let s100 = sig(100e3);
        let s120 = sig(120e3);
        assert!(s60 < 1e-40, "{s60}");
        assert!(
            s80 < s95 && s95 < s100 && s100 < s120,
            "{s80} {s95} {s100} {s120}"
        );
        // Thermal smearing gives a finite cross-section below the static threshold.
        assert!(s95 > 0.0);
        assert_eq!(
            mckinley_feshbach(95e3, 6, max_transfer(95e3, 12.011), 21.0),
            0.0
        );
        // Order of magnitude at 120 keV: well above 1 barn-scale threshold values (1e-28 m²)... below 100 b.
        assert!(s120 > 1e-29 && s120 < 1e-26, "{s120}");
    }

    #[test]
    fn dose_map_rect_adds_exact_totals() {
        let mut m = DoseMap::new(Supercell::new([2e-9, 2e-9], 0.0), 1e-10);
        m.add_rect(-0.55e-9, 0.45e-9, -0.5e-9, 0.5e-9, 1e20);
        let total = m.total_electrons();
        assert!((total - 1e20 * 1e-18).abs() < 1e-6 * total, "{total}");
        m.add_gaussian(0.0, 0.0, 0.3e-10, 1000.0);
        assert!((m.total_electrons() - total - 1000.0).abs() < 1e-6);
    }

    /// A rectangle through `add_quad` is `add_rect` bin for bin (axis-aligned and rotated
    /// cells); a rotated square adds exactly dose × area, full dose in bins well inside it and
    /// none outside (where the unrotated square would have put some).
    #[test]
    fn dose_map_quad_matches_rect_and_covers_a_rotated_square() {
        for angle in [0.0, 0.37] {
            let cell = Supercell::new([3e-9, 2.5e-9], angle);
            let (mut a, mut b) = (DoseMap::new(cell, 0.7e-10), DoseMap::new(cell, 0.7e-10));
            let (x0, x1, y0, y1) = (-0.83e-9, 0.61e-9, -0.4e-9, 1.13e-9);
            a.add_rect(x0, x1, y0, y1, 1e20);
            b.add_quad([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], 1e20);
            for (p, q) in a.dose.iter().zip(&b.dose) {
                assert!((p - q).abs() <= 1e-9 * 1e20, "{p} vs {q}");
            }
            // The other orientation gives the same.
            let mut c = DoseMap::new(cell, 0.7e-10);
            c.add_quad([[x0, y0], [x0, y1], [x1, y1], [x1, y0]], 1e20);
            for (p, q) in b.dose.iter().zip(&c.dose) {
                assert!((p - q).abs() <= 1e-9 * 1e20, "{p} vs {q}");
            }
        }
        let (t, h) = (0.3f64, 0.5e-9);
        let rot = |p: [f64; 2]| {
            let (s, c) = t.sin_cos();
            [c * p[0] - s * p[1], s * p[0] + c * p[1]]
        };
        let mut m = DoseMap::new(Supercell::new([3e-9, 3e-9], 0.0), 0.2e-10);
        m.add_quad([[-h, -h], [h, -h], [h, h], [-h, h]].map(rot), 1e20);
        let total = m.total_electrons();
        assert!((total / (1e20 * 1e-18) - 1.0).abs() < 1e-12, "{total}");
        // Inside the rotated square only (beyond the unrotated one's edge x = h), and inside
        // the unrotated square only: near the corners, 0.05 nm inside, over 0.03 nm outside.
        let only_rotated = rot([h - 0.05e-9, -h + 0.05e-9]);
        assert!(only_rotated[0] > h + 0.03e-9, "{only_rotated:?}");
        assert_eq!(m.at(only_rotated[0], only_rotated[1]), 1e20);
        let only_plain = [h - 0.05e-9, h - 0.05e-9];
        let inv = {
            let (s, c) = t.sin_cos();
            [
                c * only_plain[0] + s * only_plain[1],
                -s * only_plain[0] + c * only_plain[1],
            ]
        };
        assert!(inv[0] > h + 0.03e-9, "{inv:?}");
        assert_eq!(m.at(only_plain[0], only_plain[1]), 0.0);
    }

    /// `raster_path` over the pixel positions of a regular raster draws the same chain as
    /// `raster` (same hops, times to rounding) for the same random numbers.
    #[test]
    fn raster_path_on_a_regular_grid_reproduces_raster() {
        let cfg = SpecimenConfig {
            dopants: vec![DopantConfig::default()],
            ..Default::default()
        };
        let s0 = cfg.build([1.5e-9, 1.5e-9], &mut seeded(1)).unwrap();
        let d = s0.atoms[s0.indices_of(14)[0]];
        let h = HopModel::from_config(&DamageConfig::default());
        let (rows, cols, dx) = (20, 24, 0.2e-10);
        let raster = Raster {
            origin: [d.x - 11.3 * dx, d.y - 9.6 * dx],
            pixel_size: dx,
            rows,
            cols,
            dwell: 0.15,
            flyback: 0.02,
        };
        let positions: Vec<[f64; 2]> = (0..rows * cols)
            .map(|k| {
                let (r, c) = (k / cols, k % cols);
                [
                    raster.origin[0] + c as f64 * dx,
                    raster.origin[1] + r as f64 * dx,
                ]
            })
            .collect();
        let path = RasterPath {
            positions: &positions,
            cols,
            dwell: raster.dwell,
            flyback: raster.flyback,
        };
        let mut total = 0;
        for seed in 0..200 {
            let (mut a, mut b) = (s0.clone(), s0.clone());
            let ha = h.raster(&mut a, &raster, 100e-12, 1.6e-10, &mut seeded(seed));
            let hb = h.raster_path(&mut b, &path, 100e-12, 1.6e-10, &mut seeded(seed));
            assert_eq!(ha.len(), hb.len(), "seed {seed}");
            for (p, q) in ha.iter().zip(&hb) {
                assert_eq!((p.from, p.to), (q.from, q.to), "seed {seed}");
                assert!((p.time - q.time).abs() <= 1e-9 * p.time, "{p:?} {q:?}");
            }
            assert_eq!(a, b);
            total += ha.len();
        }
        // The frames hop often enough for the comparison to mean something.
        assert!(total > 100, "{total}");
    }

    /// `raster_cached` against `raster`: the same hops, the same specimen and the same draws,
    /// bit for bit, over runs of frames that share one pair list (kept across frames while the
    /// specimen is unchanged, brought up to date by the hops inside a frame), with several
    /// dopants (some outside each frame's reach) and frames long enough to hop several times.
    #[test]
    fn cached_pairs_reproduce_the_raster_bit_for_bit() {
        use rand::Rng;
        let cfg = SpecimenConfig {
            dopants: vec![DopantConfig {
                count: 8,
                placement: "random".into(),
                ..Default::default()
            }],
            rotation: Param::fixed(0.3),
            ..Default::default()
        };
        let h = HopModel::from_config(&DamageConfig::default());
        let (rows, cols, dx) = (12, 16, 0.4e-10);
        let (mut hops, mut frames_with_several) = (0, 0);
        for seed in 0..30 {
            let s0 = cfg.build([2e-9, 2e-9], &mut seeded(seed)).unwrap();
            let (mut a, mut b) = (s0.clone(), s0.clone());
            let (mut ra, mut rb) = (seeded(100 + seed), seeded(100 + seed));
            let mut pairs = HopPairs::default();
            let mut place = seeded(200 + seed);
            for _ in 0..20 {
                let raster = Raster {
                    origin: [
                        place.random_range(-1.2e-9..0.6e-9),
                        place.random_range(-1.2e-9..0.6e-9),
                    ],
                    pixel_size: dx,
                    rows,
                    cols,
                    dwell: 0.1,
                    flyback: 0.01,
                };
                // 1 nA: a few hops per frame near a dopant.
                let ha = h.raster(&mut a, &raster, 1e-9, 1.7e-10, &mut ra);
                let hb = h.raster_cached(&mut b, &raster, 1e-9, 1.7e-10, &mut pairs, &mut rb);
                assert_eq!(ha.len(), hb.len(), "seed {seed}");
                for (p, q) in ha.iter().zip(&hb) {
                    assert_eq!(
                        (p.atom, p.from, p.to, p.time.to_bits()),
                        (q.atom, q.from, q.to, q.time.to_bits()),
                        "seed {seed}"
                    );
                }
                assert_eq!(a, b, "seed {seed}");
                assert_eq!(ra.random::<u64>(), rb.random::<u64>(), "seed {seed}");
                hops += ha.len();
                frames_with_several += usize::from(ha.len() > 1);
            }
        }
        // Enough hops (several within one frame, too) for the comparison to mean something.
        assert!(
            hops > 100 && frames_with_several > 10,
            "{hops}, {frames_with_several}"
        );
    }

    #[test]
    fn hop_rate_peaks_beside_the_dopant() {
        let h = HopModel::from_config(&DamageConfig::default());
        let d = [0.0, 0.0];
        let n = [1.42e-10, 0.0];
        let peak = h.rate(d, n, [0.85e-10, 0.0], 100e-12);
        assert!((peak - std::f64::consts::LN_2 / 3.0).abs() < 1e-12);
        assert!(h.rate(d, n, [0.0, 0.0], 100e-12) < 0.1 * peak);
        assert!((h.rate(d, n, [0.85e-10, 0.0], 200e-12) - 2.0 * peak).abs() < 1e-12);
    }

    #[test]
    fn dopant_hops_toward_the_beam_and_never_creates_atoms() {
        let cfg = SpecimenConfig {
            dopants: vec![DopantConfig::default()],
            ..Default::default()
        };
        let mut s = cfg.build([1e-9, 1e-9], &mut seeded(0)).unwrap();
        let n_before = s.atoms.len();
        let si = s.indices_of(14)[0];
        let p = s.atoms[si];
        let nb = s.neighbors(si, 1.6e-10)[0];
        let q = s.atoms[nb];
        let len = (q.x - p.x).hypot(q.y - p.y);
        let beam = [
            p.x + 0.85e-10 * (q.x - p.x) / len,
            p.y + 0.85e-10 * (q.y - p.y) / len,
        ];
        let h = HopModel::from_config(&DamageConfig::default());
        let mut rng = seeded(3);
        // Mean waiting time 3/ln2 ≈ 4.3 s: over 100 s the dopant hops at least once.
        let hops = h.dwell(&mut s, beam, 100e-12, 100.0, 1.6e-10, None, &mut rng);
        assert!(!hops.is_empty());
        assert_eq!(hops[0].to, [q.x, q.y]);
        assert_eq!(s.atoms.len(), n_before);
        assert_eq!(s.indices_of(14).len(), 1);
    }

    /// Issue 15 §2 (damage at 60-80 kV): an atom beside a vacancy has two bonds instead of
    /// three, and its cross-section is the McKinley-Feshbach formula at the lowered threshold
    /// (21.14 − 5 eV), a bulk atom's at 21.14 eV (Meyer et al. 2012): checked at 120 kV without
    /// thermal smearing (both thresholds below T_max = 24.5 eV) and at 80 kV at 300 K (the
    /// smeared formula, [`knock_on_cross_section`], at the two thresholds).
    #[test]
    fn edge_atoms_follow_mckinley_feshbach_at_their_lower_threshold() {
        let mut s = SpecimenConfig::default()
            .build([2e-9, 2e-9], &mut seeded(0))
            .unwrap();
        let bonds = coordination(&s, 1.7e-10);
        // Pristine periodic graphene: three bonds everywhere, across the cell edge too.
        assert!(bonds.iter().all(|&b| b == 3), "{bonds:?}");
        for (i, b) in bonds.iter().enumerate().step_by(7) {
            assert_eq!(*b as usize, s.neighbors(i, 1.7e-10).len());
        }
        let gone = s.atoms.len() / 2;
        let beside = s.neighbors(gone, 1.7e-10);
        assert_eq!(beside.len(), 3);
        s.atoms.remove(gone);
        let bonds = coordination(&s, 1.7e-10);
        let edge: Vec<usize> = beside
            .iter()
            .map(|&j| if j > gone { j - 1 } else { j })
            .collect();
        for (i, &b) in bonds.iter().enumerate() {
            assert_eq!(b, if edge.contains(&i) { 2 } else { 3 }, "atom {i}");
        }
        let mut cfg = DamageConfig::default();
        cfg.displacement_energy
            .insert("C".into(), Param::fixed(21.14));
        cfg.under_coordinated
            .insert("C".into(), UnderCoordinated::default());
        let m = ATOMIC_MASS_U[6];
        for (energy, temperature) in [(120e3, 0.0), (80e3, 300.0)] {
            cfg.temperature = Param::fixed(temperature);
            let knock = cfg.knock_on(energy);
            let b = knock.coordination_of(&s);
            let sigma = knock.sigma_of(&b);
            let v_rms = (BOLTZMANN * temperature / (m * AMU)).sqrt();
            let (bulk, low) = if temperature == 0.0 {
                let t = max_transfer(energy, m);
                (
                    mckinley_feshbach(energy, 6, t, 21.14),
                    mckinley_feshbach(energy, 6, t, 16.14),
                )
            } else {
                (
                    knock_on_cross_section(energy, 6, m, 21.14, v_rms),
                    knock_on_cross_section(energy, 6, m, 16.14, v_rms),
                )
            };
            assert!(low > bulk && low > 0.0, "{energy}: {low} vs {bulk}");
            for (i, a) in s.atoms.iter().enumerate() {
                let want = if edge.contains(&i) { low } else { bulk };
                let got = sigma(i, a);
                assert!(
                    (got - want).abs() <= 1e-12 * want,
                    "{energy} eV, atom {i}: {got:e} vs {want:e}"
                );
            }
        }
        // The cache counts what `coordination` counts, again after an atom leaves.
        let knock = cfg.knock_on(80e3);
        let mut cache = CoordinationCache::default();
        let mut t = s.clone();
        assert_eq!(cache.get(&knock, &t), &Some(coordination(&t, knock.bond)));
        assert_eq!(cache.get(&knock, &t), &Some(coordination(&t, knock.bond)));
        t.atoms.remove(beside[0]);
        let fresh = coordination(&t, knock.bond);
        assert_ne!(Some(&fresh), knock.coordination_of(&s).as_ref());
        assert_eq!(cache.get(&knock, &t), &Some(fresh));
        // Thresholds never fall below 1 eV; elements not listed keep theirs.
        cfg.under_coordinated.insert(
            "C".into(),
            UnderCoordinated {
                bonds: 3,
                missing_bond_energy: Param::fixed(15.0),
            },
        );
        assert_eq!(cfg.displacement_energy_with_bonds(6, 1), 1.0);
        assert_eq!(cfg.displacement_energy_with_bonds(6, 3), 21.14);
        assert_eq!(cfg.displacement_energy_with_bonds(14, 0), 15.0);
    }

    /// With no under-coordinated table, [`sputter_with`] through [`KnockOn::sigma_of`] draws
    /// exactly as [`sputter`] by element.
    #[test]
    fn knock_on_without_edges_sputters_as_by_element() {
        let cfg = DamageConfig {
            cross_section_scale: Param::fixed(1e6),
            ..Default::default()
        };
        let knock = cfg.knock_on(100e3);
        assert!(knock.coordination_of(&Specimen::default()).is_none());
        let s0 = SpecimenConfig::default()
            .build([2e-9, 2e-9], &mut seeded(0))
            .unwrap();
        let (mut a, mut b) = (s0.clone(), s0);
        let ra = sputter(&mut a, &knock.by_z, &mut seeded(4), |_| 1e22);
        let ra2 = sputter_with(&mut b, knock.sigma_of(&None), &mut seeded(4), |_| 1e22);
        assert!(!ra.is_empty());
        assert_eq!(ra, ra2);
    }

    /// The current factor (lognormal AR(1)) has mean 1 (the mean dose is kept), variance r² and
    /// lag correlation `(exp(s²ρ) − 1)/(exp(s²) − 1)`, `ρ = exp(−Δt/τ)`, s² = ln(1 + r²): with
    /// r = 0.3 that is 0.596 for Δt = τ/2 (ρ = 0.6065; the small-r limit is ρ itself).
    #[test]
    fn current_fluctuation_keeps_the_mean_and_has_the_configured_variance_and_correlation() {
        let (r, tau, dt) = (0.3f64, 1e-3, 0.5e-3);
        let mut p = CurrentFluctuation::new(r, tau);
        let mut rng = seeded(11);
        let n = 200_000;
        let f: Vec<f64> = (0..n).map(|_| p.next(dt, &mut rng)).collect();
        let mean = f.iter().sum::<f64>() / n as f64;
        let var = f.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        let cov = f
            .windows(2)
            .map(|w| (w[0] - mean) * (w[1] - mean))
            .sum::<f64>()
            / (n - 1) as f64;
        let rho = (-dt / tau).exp();
        let s2 = (r * r).ln_1p();
        let want = (s2 * rho).exp_m1() / s2.exp_m1();
        println!(
            "mean {mean}, var {var}, lag-1 {} vs {want} (ρ {rho})",
            cov / var
        );
        assert!(f.iter().all(|v| *v > 0.0));
        assert!((mean - 1.0).abs() < 0.005, "{mean}");
        assert!((var / (r * r) - 1.0).abs() < 0.05, "{var}");
        assert!((cov / var - want).abs() < 0.01, "{} vs {want}", cov / var);
        // At r = 5 % the correlation is ρ within 0.2 %.
        let s2 = 0.05f64.powi(2).ln_1p();
        assert!(((s2 * rho).exp_m1() / s2.exp_m1() / rho - 1.0).abs() < 2e-3);
    }

    #[test]
    fn sputtering_removes_atoms_with_the_expected_probability() {
        let cfg = SpecimenConfig::default();
        let mut s = cfg.build([3e-9, 3e-9], &mut seeded(0)).unwrap();
        let n0 = s.atoms.len();
        let mut sig = [0.0; 93];
        sig[6] = 1e-28; // 1 barn
        let dose = 0.5 / 1e-28; // p = 1 - e^{-0.5}
        let removed = sputter(&mut s, &sig, &mut seeded(1), |_| dose);
        assert!(removed.iter().all(|a| a.z == 6));
        let frac = removed.len() as f64 / n0 as f64;
        let p = 1.0 - (-0.5f64).exp();
        let sd = (p * (1.0 - p) / n0 as f64).sqrt();
        assert!((frac - p).abs() < 5.0 * sd, "{frac} vs {p}");
        assert_eq!(s.atoms.len() + removed.len(), n0);
    }
}
