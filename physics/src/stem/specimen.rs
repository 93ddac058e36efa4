//! Specimens: crystal builders, defects and contamination.
//!
//! A [`Specimen`] is a list of atoms (projected position, height along the beam, atomic number)
//! in metres, centred on the origin. It is the ground truth that image formation, damage and
//! rewards use. Builders cover graphene, 2H-MoS₂/WS₂ (top view), SrTiO₃ \[001\] and fcc \[110\];
//! defects are vacancies, substitutional dopants, a tilt grain boundary and amorphous low-Z
//! contamination.

use crate::constants::{SYMBOLS, atomic_number};
use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::{Angle, Length, Unitless};
use crate::rng::SimRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// One atom: projected position (x, y) and height z along the beam, m; atomic number.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Atom {
    /// Position x (fast scan axis), m.
    pub x: f64,
    /// Position y (slow scan axis), m.
    pub y: f64,
    /// Height along the beam, m (0 = specimen mid-plane).
    pub height: f64,
    /// Atomic number Z.
    pub z: u8,
}

/// A set of atoms with the rectangle they were built in.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Specimen {
    /// The atoms.
    pub atoms: Vec<Atom>,
    /// Half-widths of the built region (x, y), m; atoms lie in `[-hx, hx] × [-hy, hy]`.
    pub half_size: [f64; 2],
}

/// Crystal structures the builder knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Crystal {
    /// Monolayer graphene, a = 2.46 Å (C-C 1.42 Å).
    #[default]
    Graphene,
    /// 2H-MoS₂, a = 3.16 Å, top view (`layers` layers).
    Mos2,
    /// 2H-WS₂, a = 3.153 Å, top view.
    Ws2,
    /// SrTiO₃ viewed along \[001\], a = 3.905 Å, `thickness` unit cells.
    Srtio3,
    /// An fcc metal viewed along \[110\] (`element`, default Au with a = 4.078 Å).
    Fcc110,
    /// No crystal (vacuum, or contamination only).
    None,
}

impl Crystal {
    /// Default lattice constant, m.
    pub fn default_lattice_constant(self) -> f64 {
        match self {
            Self::Graphene => 2.46e-10,
            Self::Mos2 => 3.16e-10,
            Self::Ws2 => 3.153e-10,
            Self::Srtio3 => 3.905e-10,
            Self::Fcc110 => 4.078e-10,
            Self::None => 1e-10,
        }
    }
}

/// A substitutional dopant species.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DopantConfig {
    /// Element symbol of the dopant. Default `"Si"`.
    pub element: String,
    /// Element symbol of the host atoms it replaces. Default `"C"`.
    pub replaces: String,
    /// Number of dopants. Default 1.
    pub count: u32,
    /// `"center"`: the first dopant replaces the host atom nearest the origin, the rest random;
    /// `"random"`: all random. Default `"center"`.
    pub placement: String,
}

impl Default for DopantConfig {
    fn default() -> Self {
        Self {
            element: "Si".into(),
            replaces: "C".into(),
            count: 1,
            placement: "center".into(),
        }
    }
}

/// A tilt grain boundary along y at `position`: the crystal left of it is rotated by
/// `+misorientation/2`, right of it by `-misorientation/2`; atoms closer than `min_distance`
/// across the boundary are removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrainBoundaryConfig {
    /// Misorientation angle between the grains, rad. Default 21.8° (a common graphene boundary).
    pub misorientation: Param<Angle>,
    /// x position of the boundary, m. Default 0.
    pub position: Param<Length>,
    /// Minimum distance kept between atoms across the boundary, m. Default 1.1 Å.
    pub min_distance: Param<Length>,
}

impl Default for GrainBoundaryConfig {
    fn default() -> Self {
        Self {
            misorientation: Param::fixed(21.8f64.to_radians()),
            position: Param::fixed(0.0),
            min_distance: Param::fixed(1.1e-10),
        }
    }
}

/// Amorphous contamination: random low-Z atoms in round patches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContaminationConfig {
    /// Fraction of the area covered by patches, 0..1. Default 0.2.
    pub coverage: Param<Unitless>,
    /// Patch radius, m. Default 1 nm.
    pub patch_radius: Param<Length>,
    /// Areal density of atoms inside a patch, atoms/m². Default 0.3 Å⁻² (a few carbon layers).
    pub density: Param<crate::param::dims::Dose>,
    /// Element symbol. Default `"C"`.
    pub element: String,
}

impl Default for ContaminationConfig {
    fn default() -> Self {
        Self {
            coverage: Param::fixed(0.2),
            patch_radius: Param::fixed(1e-9),
            density: Param::fixed(0.3e20),
            element: "C".into(),
        }
    }
}

/// The specimen of a scenario (`[specimen]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpecimenConfig {
    /// Crystal structure. Default graphene.
    pub crystal: Crystal,
    /// Lattice constant, m. Default 0 = the crystal's own (graphene 2.46 Å, MoS₂ 3.16 Å, ...).
    pub lattice_constant: Param<Length>,
    /// In-plane rotation of the crystal, rad. Default 0.
    pub rotation: Param<Angle>,
    /// Size of the built region (x, y), m. Default 0 = the field of view plus 2 nm on each side.
    pub size: [Param<Length>; 2],
    /// Thickness in unit cells along the beam (SrTiO₃, fcc) or layers (MoS₂/WS₂). Default 1.
    pub thickness: u32,
    /// Element of an fcc crystal. Default `"Au"`.
    pub element: String,
    /// Fraction of atoms removed at random (vacancies), 0..1. Default 0.
    pub vacancies: Param<Unitless>,
    /// Substitutional dopants. Default none.
    pub dopants: Vec<DopantConfig>,
    /// Optional tilt grain boundary.
    pub grain_boundary: Option<GrainBoundaryConfig>,
    /// Optional amorphous contamination.
    pub contamination: Option<ContaminationConfig>,
}

impl Default for SpecimenConfig {
    fn default() -> Self {
        Self {
            crystal: Crystal::Graphene,
            lattice_constant: Param::fixed(0.0),
            rotation: Param::fixed(0.0),
            size: [Param::fixed(0.0), Param::fixed(0.0)],
            thickness: 1,
            element: "Au".into(),
            vacancies: Param::fixed(0.0),
            dopants: Vec::new(),
            grain_boundary: None,
            contamination: None,
        }
    }
}

fn element(symbol: &str, field: &str) -> Result<u8> {
    atomic_number(symbol)
        .ok_or_else(|| PhysicsError::param(field, format!("unknown element symbol {symbol:?}")))
}

impl SpecimenConfig {
    /// Checks ranges; `prefix` is prepended to field names in errors.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let a = self.lattice_constant.get();
        if !(a == 0.0 || (0.5e-10..=50e-10).contains(&a)) {
            return Err(PhysicsError::param(
                format!("{prefix}lattice_constant"),
                format!("must be 0 (default) or 0.5-50 Å, got {a} m"),
            ));
        }
        for (i, s) in self.size.iter().enumerate() {
            let v = s.get();
            if !(0.0..=1e-6).contains(&v) {
                return Err(PhysicsError::param(
                    format!("{prefix}size[{i}]"),
                    format!("must be 0 (auto) to 1 µm, got {v} m"),
                ));
            }
        }
        if !(1..=200).contains(&self.thickness) {
            return Err(PhysicsError::param(
                format!("{prefix}thickness"),
                "must be 1..=200",
            ));
        }
        let v = self.vacancies.get();
        if !(0.0..=1.0).contains(&v) {
            return Err(PhysicsError::param(
                format!("{prefix}vacancies"),
                format!("must be a fraction in [0, 1], got {v}"),
            ));
        }
        if self.crystal == Crystal::Fcc110 {
            element(&self.element, &format!("{prefix}element"))?;
        }
        for (i, d) in self.dopants.iter().enumerate() {
            element(&d.element, &format!("{prefix}dopants[{i}].element"))?;
            element(&d.replaces, &format!("{prefix}dopants[{i}].replaces"))?;
            if !matches!(d.placement.as_str(), "center" | "random") {
                return Err(PhysicsError::param(
                    format!("{prefix}dopants[{i}].placement"),
                    "must be \"center\" or \"random\"",
                ));
            }
        }
        if let Some(c) = &self.contamination {
            element(&c.element, &format!("{prefix}contamination.element"))?;
            let cov = c.coverage.get();
            if !(0.0..=1.0).contains(&cov) {
                return Err(PhysicsError::param(
                    format!("{prefix}contamination.coverage"),
                    "must be in [0, 1]",
                ));
            }
            if !(c.patch_radius.get() > 0.0) || c.density.get() < 0.0 || c.density.get() > 1e21 {
                return Err(PhysicsError::param(
                    format!("{prefix}contamination"),
                    "patch_radius must be > 0 and density in [0, 10 Å⁻²]",
                ));
            }
        }
        Ok(())
    }

    /// Builds the specimen over `half_size` (m), drawing defects from `rng`.
    pub fn build(&self, half_size: [f64; 2], rng: &mut SimRng) -> Result<Specimen> {
        self.validate("specimen.")?;
        let a = self.lattice_constant.get();
        let a = if a > 0.0 {
            a
        } else {
            self.crystal.default_lattice_constant()
        };
        let rot = self.rotation.get();
        let mut atoms = match &self.grain_boundary {
            None => self.lattice(a, rot, half_size)?,
            Some(gb) => {
                let half = 0.5 * gb.misorientation.get();
                let x0 = gb.position.get();
                let dmin = gb.min_distance.get();
                let left: Vec<Atom> = self
                    .lattice(a, rot + half, half_size)?
                    .into_iter()
                    .filter(|p| p.x < x0)
                    .collect();
                let right: Vec<Atom> = self
                    .lattice(a, rot - half, half_size)?
                    .into_iter()
                    .filter(|p| p.x >= x0)
                    .collect();
                let near: Vec<&Atom> = left.iter().filter(|p| p.x > x0 - 3.0 * dmin).collect();
                let mut all = left.clone();
                for r in right {
                    let clash = r.x < x0 + 3.0 * dmin
                        && near.iter().any(|l| {
                            (l.x - r.x).hypot(l.y - r.y) < dmin
                                && (l.height - r.height).abs() < 0.5e-10
                        });
                    if !clash {
                        all.push(r);
                    }
                }
                all
            }
        };
        // Vacancies.
        let frac = self.vacancies.get();
        if frac > 0.0 {
            atoms.retain(|_| rng.random::<f64>() >= frac);
        }
        // Dopants.
        for d in &self.dopants {
            let dz = element(&d.element, "dopants.element")?;
            let host = element(&d.replaces, "dopants.replaces")?;
            for k in 0..d.count {
                let hosts: Vec<usize> = atoms
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.z == host)
                    .map(|(i, _)| i)
                    .collect();
                if hosts.is_empty() {
                    return Err(PhysicsError::param(
                        "specimen.dopants",
                        format!(
                            "no {} atoms left to replace with {}",
                            SYMBOLS[host as usize], d.element
                        ),
                    ));
                }
                let pick = if k == 0 && d.placement == "center" {
                    *hosts
                        .iter()
                        .min_by(|&&i, &&j| {
                            let ri = atoms[i].x.hypot(atoms[i].y);
                            let rj = atoms[j].x.hypot(atoms[j].y);
                            ri.total_cmp(&rj)
                        })
                        .expect("non-empty")
                } else {
                    hosts[rng.random_range(0..hosts.len())]
                };
                atoms[pick].z = dz;
            }
        }
        // Contamination.
        if let Some(c) = &self.contamination {
            let ez = element(&c.element, "contamination.element")?;
            let r = c.patch_radius.get();
            let area = 4.0 * half_size[0] * half_size[1];
            // Overlapping discs: coverage = 1 - exp(-n π r² / area).
            let cov = c.coverage.get().min(0.999);
            let n_patch = if cov > 0.0 {
                (-(1.0 - cov).ln() * area / (PI * r * r)).round() as usize
            } else {
                0
            };
            let centres: Vec<(f64, f64)> = (0..n_patch)
                .map(|_| {
                    (
                        rng.random_range(-half_size[0]..half_size[0]),
                        rng.random_range(-half_size[1]..half_size[1]),
                    )
                })
                .collect();
            let n_atoms = (c.density.get() * area).round() as usize;
            // Squared distances: this loop runs for every candidate atom of every patch.
            let r2 = r * r;
            for _ in 0..n_atoms {
                let x = rng.random_range(-half_size[0]..half_size[0]);
                let y = rng.random_range(-half_size[1]..half_size[1]);
                if centres
                    .iter()
                    .any(|&(cx, cy)| (x - cx) * (x - cx) + (y - cy) * (y - cy) < r2)
                {
                    let h = 3.4e-10 + rng.random::<f64>() * 10e-10;
                    atoms.push(Atom {
                        x,
                        y,
                        height: h,
                        z: ez,
                    });
                }
            }
        }
        Ok(Specimen { atoms, half_size })
    }

    /// The crystal's projected unit cell with lattice constant `a` (m), rotated by `rot` (rad):
    /// `None` for [`Crystal::None`].
    pub fn unit_cell(&self, a: f64, rot: f64) -> Result<Option<UnitCell>> {
        let s3 = 3f64.sqrt();
        // Lattice vectors, basis (fractional coordinates, height, Z) per crystal.
        type Basis = Vec<([f64; 2], f64, u8)>;
        let (a1, a2, basis): ([f64; 2], [f64; 2], Basis) = match self.crystal {
            Crystal::None => return Ok(None),
            Crystal::Graphene => (
                [a, 0.0],
                [0.5 * a, 0.5 * s3 * a],
                vec![([0.0, 0.0], 0.0, 6), ([1.0 / 3.0, 1.0 / 3.0], 0.0, 6)],
            ),
            Crystal::Mos2 | Crystal::Ws2 => {
                let metal = if self.crystal == Crystal::Mos2 {
                    42
                } else {
                    74
                };
                let mut b = Vec::new();
                let dz_s = 1.56e-10;
                let c_half = 6.15e-10;
                for l in 0..self.thickness {
                    // 2H stacking: odd layers are rotated by 180°, swapping the metal and S₂ sites.
                    let (m_site, s_site) = if l % 2 == 0 {
                        ([0.0, 0.0], [1.0 / 3.0, 1.0 / 3.0])
                    } else {
                        ([1.0 / 3.0, 1.0 / 3.0], [0.0, 0.0])
                    };
                    let h = f64::from(l) * c_half;
                    b.push((m_site, h, metal));
                    b.push((s_site, h - dz_s, 16));
                    b.push((s_site, h + dz_s, 16));
                }
                ([a, 0.0], [0.5 * a, 0.5 * s3 * a], b)
            }
            Crystal::Srtio3 => {
                let mut b = Vec::new();
                for l in 0..self.thickness {
                    let h = f64::from(l) * a;
                    b.push(([0.0, 0.0], h, 38)); // Sr
                    b.push(([0.5, 0.5], h + 0.5 * a, 22)); // Ti
                    b.push(([0.5, 0.5], h, 8)); // O on the Ti column
                    b.push(([0.5, 0.0], h + 0.5 * a, 8)); // O columns
                    b.push(([0.0, 0.5], h + 0.5 * a, 8));
                }
                ([a, 0.0], [0.0, a], b)
            }
            Crystal::Fcc110 => {
                let z = element(&self.element, "specimen.element")?;
                let d = a / 2f64.sqrt();
                let mut b = Vec::new();
                for l in 0..self.thickness {
                    let h = f64::from(l) * d;
                    b.push(([0.0, 0.0], h, z));
                    b.push(([0.5, 0.5], h + 0.5 * d, z));
                }
                // Projected cell: a along x ([001]), a/√2 along y ([1-10]).
                ([a, 0.0], [0.0, d], b)
            }
        };
        let (c, s) = (rot.cos(), rot.sin());
        let r = |v: [f64; 2]| [c * v[0] - s * v[1], s * v[0] + c * v[1]];
        Ok(Some(UnitCell {
            a1: r(a1),
            a2: r(a2),
            basis,
        }))
    }

    /// The perfect lattice, rotated by `rot`, clipped to the rectangle.
    fn lattice(&self, a: f64, rot: f64, half: [f64; 2]) -> Result<Vec<Atom>> {
        let Some(UnitCell { a1, a2, basis }) = self.unit_cell(a, rot)? else {
            return Ok(Vec::new());
        };
        let reach = half[0].hypot(half[1]) + 2.0 * a;
        let det = a1[0] * a2[1] - a1[1] * a2[0];
        // Bound the index range by the reach in each lattice direction.
        let n1 = (reach * a2[0].hypot(a2[1]) / det.abs()).ceil() as i64 + 1;
        let n2 = (reach * a1[0].hypot(a1[1]) / det.abs()).ceil() as i64 + 1;
        let mut atoms = Vec::new();
        for i in -n1..=n1 {
            for j in -n2..=n2 {
                for &(f, h, z) in &basis {
                    let u = i as f64 + f[0];
                    let v = j as f64 + f[1];
                    let x = u * a1[0] + v * a2[0];
                    let y = u * a1[1] + v * a2[1];
                    if x.abs() <= half[0] && y.abs() <= half[1] {
                        atoms.push(Atom { x, y, height: h, z });
                    }
                }
            }
        }
        Ok(atoms)
    }
}

/// A projected crystal cell: lattice vectors (m, lab frame) and the atoms of one cell.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitCell {
    /// First lattice vector, m.
    pub a1: [f64; 2],
    /// Second lattice vector, m.
    pub a2: [f64; 2],
    /// Atoms of the cell: fractional coordinates along `a1`, `a2`, height along the beam (m)
    /// and atomic number.
    pub basis: Vec<([f64; 2], f64, u8)>,
}

impl UnitCell {
    /// Projected cell area, m².
    pub fn area(&self) -> f64 {
        (self.a1[0] * self.a2[1] - self.a1[1] * self.a2[0]).abs()
    }

    /// Reciprocal lattice vectors `(b1, b2)` with `a_i · b_j = δ_ij`, 1/m.
    pub fn reciprocal(&self) -> ([f64; 2], [f64; 2]) {
        let (a1, a2) = (self.a1, self.a2);
        let det = a1[0] * a2[1] - a1[1] * a2[0];
        ([a2[1] / det, -a2[0] / det], [-a1[1] / det, a1[0] / det])
    }

    /// Cartesian position (m) of a basis atom at fractional coordinates `f`.
    pub fn position(&self, f: [f64; 2]) -> [f64; 2] {
        [
            f[0] * self.a1[0] + f[1] * self.a2[0],
            f[0] * self.a1[1] + f[1] * self.a2[1],
        ]
    }
}

impl Specimen {
    /// Indices of atoms with atomic number `z`.
    pub fn indices_of(&self, z: u8) -> Vec<usize> {
        self.atoms
            .iter()
            .enumerate()
            .filter(|(_, a)| a.z == z)
            .map(|(i, _)| i)
            .collect()
    }

    /// Indices of atoms within `radius` (m) of atom `i` in projection, excluding `i`.
    pub fn neighbors(&self, i: usize, radius: f64) -> Vec<usize> {
        let p = self.atoms[i];
        self.atoms
            .iter()
            .enumerate()
            .filter(|&(j, q)| {
                j != i
                    && (q.x - p.x).hypot(q.y - p.y) <= radius
                    && (q.height - p.height).abs() < 1e-10
            })
            .map(|(j, _)| j)
            .collect()
    }

    /// The atoms' atomic numbers as a count per element, sorted by Z.
    pub fn composition(&self) -> Vec<(u8, usize)> {
        let mut counts = [0usize; 256];
        for a in &self.atoms {
            counts[a.z as usize] += 1;
        }
        counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(z, c)| (z as u8, *c))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;

    fn nearest_distance(s: &Specimen, i: usize) -> f64 {
        let p = s.atoms[i];
        s.atoms
            .iter()
            .enumerate()
            .filter(|&(j, q)| j != i && (q.height - p.height).abs() < 1e-12)
            .map(|(_, q)| (q.x - p.x).hypot(q.y - p.y))
            .fold(f64::INFINITY, f64::min)
    }

    #[test]
    fn graphene_has_the_right_bond_length_and_density() {
        let cfg = SpecimenConfig::default();
        let s = cfg.build([2e-9, 2e-9], &mut seeded(0)).unwrap();
        // 2 atoms per cell of area (√3/2) a².
        let a: f64 = 2.46e-10;
        let expected = 16e-18 / (0.5 * 3f64.sqrt() * a * a) * 2.0;
        let n = s.atoms.len() as f64;
        assert!((n / expected - 1.0).abs() < 0.05, "{n} vs {expected}");
        let centre = (0..s.atoms.len())
            .min_by(|&i, &j| {
                s.atoms[i]
                    .x
                    .hypot(s.atoms[i].y)
                    .total_cmp(&s.atoms[j].x.hypot(s.atoms[j].y))
            })
            .unwrap();
        let d = nearest_distance(&s, centre);
        assert!((d - 1.42e-10).abs() < 0.01e-10, "{d}");
        assert_eq!(s.neighbors(centre, 1.6e-10).len(), 3);
    }

    #[test]
    fn dopant_replaces_the_central_carbon() {
        let cfg = SpecimenConfig {
            dopants: vec![DopantConfig::default()],
            ..Default::default()
        };
        let s = cfg.build([1e-9, 1e-9], &mut seeded(0)).unwrap();
        let si = s.indices_of(14);
        assert_eq!(si.len(), 1);
        assert!(s.atoms[si[0]].x.hypot(s.atoms[si[0]].y) < 1.5e-10);
    }

    #[test]
    fn other_crystals_have_their_species_and_spacing() {
        let mut rng = seeded(1);
        let mos2 = SpecimenConfig {
            crystal: Crystal::Mos2,
            ..Default::default()
        }
        .build([1e-9, 1e-9], &mut rng)
        .unwrap();
        let comp = mos2.composition();
        let mo = comp.iter().find(|c| c.0 == 42).unwrap().1 as f64;
        let s = comp.iter().find(|c| c.0 == 16).unwrap().1 as f64;
        assert!((s / mo - 2.0).abs() < 0.2, "S/Mo = {}", s / mo);
        let sto = SpecimenConfig {
            crystal: Crystal::Srtio3,
            thickness: 2,
            ..Default::default()
        }
        .build([3e-9, 3e-9], &mut rng)
        .unwrap();
        let comp = sto.composition();
        let sr = comp.iter().find(|c| c.0 == 38).unwrap().1 as f64;
        let o = comp.iter().find(|c| c.0 == 8).unwrap().1 as f64;
        // 3 O per Sr in the bulk; the clipped border adds a few extra O columns.
        assert!((o / sr - 3.0).abs() < 0.5, "O/Sr = {}", o / sr);
        let ti = comp.iter().find(|c| c.0 == 22).unwrap().1 as f64;
        assert!((ti / sr - 1.0).abs() < 0.2, "Ti/Sr = {}", ti / sr);
        let fcc = SpecimenConfig {
            crystal: Crystal::Fcc110,
            thickness: 3,
            ..Default::default()
        }
        .build([1e-9, 1e-9], &mut rng)
        .unwrap();
        assert!(fcc.atoms.iter().all(|a| a.z == 79));
        // Projected column spacing along y is a/(2√2) between the two column types at x offset a/2.
        let d = (0..fcc.atoms.len())
            .map(|i| nearest_distance(&fcc, i))
            .fold(f64::INFINITY, f64::min);
        assert!(d > 1e-10, "{d}");
    }

    #[test]
    fn vacancies_contamination_and_grain_boundary() {
        let mut rng = seeded(2);
        let base = SpecimenConfig::default()
            .build([2e-9, 2e-9], &mut rng)
            .unwrap();
        let vac = SpecimenConfig {
            vacancies: Param::fixed(0.1),
            ..Default::default()
        }
        .build([2e-9, 2e-9], &mut rng)
        .unwrap();
        let ratio = vac.atoms.len() as f64 / base.atoms.len() as f64;
        assert!((ratio - 0.9).abs() < 0.03, "{ratio}");
        let gb = SpecimenConfig {
            grain_boundary: Some(GrainBoundaryConfig::default()),
            ..Default::default()
        }
        .build([2e-9, 2e-9], &mut rng)
        .unwrap();
        let min_d = (0..gb.atoms.len())
            .map(|i| nearest_distance(&gb, i))
            .fold(f64::INFINITY, f64::min);
        assert!(min_d >= 1.1e-10 - 1e-15, "{min_d}");
        let cont = SpecimenConfig {
            crystal: Crystal::None,
            contamination: Some(ContaminationConfig::default()),
            ..Default::default()
        }
        .build([5e-9, 5e-9], &mut rng)
        .unwrap();
        let expected = 0.2 * 0.3e20 * 100e-18;
        let n = cont.atoms.len() as f64;
        assert!((n / expected - 1.0).abs() < 0.5, "{n} vs {expected}");
    }

    #[test]
    fn bad_config_names_the_field() {
        let cfg = SpecimenConfig {
            vacancies: Param::fixed(1.5),
            ..Default::default()
        };
        let e = cfg.validate("specimen.").unwrap_err().to_string();
        assert!(e.contains("specimen.vacancies"), "{e}");
        let cfg = SpecimenConfig {
            dopants: vec![DopantConfig {
                element: "Xx".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(
            cfg.validate("specimen.")
                .unwrap_err()
                .to_string()
                .contains("dopants[0].element")
        );
    }
}
