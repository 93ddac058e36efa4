//! STM surfaces with atoms: an Ag(111) terrace with its atomic corrugation and Ag adatoms on
//! hollow sites, as the apparent-height map a constant-current STM images.
//!
//! The constant-current image follows an isosurface of the local density of states. Here that
//! isosurface is modelled as the sum of
//! - the substrate corrugation of a close-packed (111) lattice with constant a,
//!   `2c/9 · Σ_k cos(g_k · r)` over the three reciprocal vectors `g_k` (|g| = 4π/(√3 a)), which
//!   peaks at `2c/3` on atoms and bottoms out at `-c/3` at the hollows: the peak-to-peak
//!   corrugation is the configured `c` (default 1 pm, as on Ag(111)),
//! - one Gaussian bump per adatom, `h · exp(-r²/(2σ²))` with `σ = FWHM/(2√(2 ln 2))`
//!   (apparent height ≈ 0.1 nm and FWHM ≈ 0.6 nm for Ag on Ag(111) at small bias).
//!
//! Positions are in metres in the sample frame, origin at the centre of the sample grid. The
//! grid is one period of the sample ([`super::surface`]): a bump near an edge continues across
//! it, and an adatom anywhere is drawn at its periodic image on the grid. The atomic
//! corrugation repeats over the grid only when its sides are whole multiples of `a` (along x)
//! and `√3 a` (along y); otherwise the periodic continuation joins two lattice phases along the
//! edge, a seam as high as the corrugation (about a picometre).
//!
//! ```
//! use scopegym_physics::spm::adatoms::{AdatomConfig, place_adatoms, render};
//! use scopegym_physics::rng::seeded;
//! let cfg = AdatomConfig { count: 3, ..Default::default() };
//! let atoms = place_adatoms(&cfg, [5e-9, 5e-9], &mut seeded(1)).unwrap();
//! assert_eq!(atoms.len(), 3);
//! let h = render(&cfg, &atoms, [128, 128], 0.08e-9).unwrap();
//! assert!(h.iter().cloned().fold(0.0f32, f32::max) > 0.08e-9);
//! ```

use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::Length;
use crate::rng::SimRng;
use crate::spm::manipulation::{AG111_A, nearest_hollow};
use ndarray::Array2;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Adatoms on a (111) terrace (`[adatoms]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdatomConfig {
    /// Number of adatoms placed at random hollow sites at reset. Default 0.
    pub count: usize,
    /// Lattice constant of the (111) surface, m. Default 0.288 nm (Ag).
    pub lattice_constant: Param<Length>,
    /// Apparent height of an adatom, m. Default 0.1 nm.
    pub apparent_height: Param<Length>,
    /// Apparent full width at half maximum of an adatom, m. Default 0.6 nm.
    pub width: Param<Length>,
    /// Peak-to-peak substrate corrugation, m. Default 1 pm.
    pub corrugation: Param<Length>,
    /// Smallest distance between two adatoms at placement, m. Default 1.5 nm.
    pub min_separation: Param<Length>,
    /// Margin kept free of adatoms at the sample edge, m. Default 1 nm.
    pub margin: Param<Length>,
}

impl Default for AdatomConfig {
    fn default() -> Self {
        Self {
            count: 0,
            lattice_constant: Param::fixed(AG111_A),
            apparent_height: Param::fixed(0.1e-9),
            width: Param::fixed(0.6e-9),
            corrugation: Param::fixed(1e-12),
            min_separation: Param::fixed(1.5e-9),
            margin: Param::fixed(1e-9),
        }
    }
}

impl AdatomConfig {
    /// Checks ranges; `prefix` is prepended to field names in errors.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        if self.count > 10_000 {
            return Err(PhysicsError::param(
                format!("{prefix}count"),
                format!("must be at most 10000, got {}", self.count),
            ));
        }
        let checks: [(&str, f64, f64, f64); 6] = [
            (
                "lattice_constant",
                self.lattice_constant.get(),
                0.1e-9,
                1e-9,
            ),
            ("apparent_height", self.apparent_height.get(), 0.0, 5e-9),
            ("width", self.width.get(), 0.05e-9, 10e-9),
            ("corrugation", self.corrugation.get(), 0.0, 0.1e-9),
            ("min_separation", self.min_separation.get(), 0.0, 100e-9),
            ("margin", self.margin.get(), 0.0, 1e-6),
        ];
        for (name, v, lo, hi) in checks {
            if !(v.is_finite() && (lo..=hi).contains(&v)) {
                return Err(PhysicsError::param(
                    format!("{prefix}{name}"),
                    format!("must be in [{lo:e}, {hi:e}] m, got {v}"),
                ));
            }
        }
        Ok(())
    }
}

/// Places `cfg.count` adatoms on random hollow sites inside `[-half, half]` (m, minus the
/// margin), at least `min_separation` apart. Errors when they do not fit.
pub fn place_adatoms(
    cfg: &AdatomConfig,
    half: [f64; 2],
    rng: &mut SimRng,
) -> Result<Vec<[f64; 2]>> {
    cfg.validate("adatoms.")?;
    let a = cfg.lattice_constant.get();
    let m = cfg.margin.get();
    let lim = [half[0] - m, half[1] - m];
    if cfg.count > 0 && (lim[0] <= 0.0 || lim[1] <= 0.0) {
        return Err(PhysicsError::param(
            "adatoms.margin",
            "leaves no room for adatoms on this sample",
        ));
    }
    let sep = cfg.min_separation.get();
    let mut atoms: Vec<[f64; 2]> = Vec::with_capacity(cfg.count);
    let mut tries = 0usize;
    while atoms.len() < cfg.count {
        tries += 1;
        if tries > 1000 * (cfg.count + 10) {
            return Err(PhysicsError::param(
                "adatoms.count",
                format!(
                    "{} adatoms {sep:e} m apart do not fit on the sample",
                    cfg.count
                ),
            ));
        }
        let p = [
            (2.0 * rng.random::<f64>() - 1.0) * lim[0],
            (2.0 * rng.random::<f64>() - 1.0) * lim[1],
        ];
        let p = nearest_hollow(p, a);
        if p[0].abs() > lim[0] || p[1].abs() > lim[1] {
            continue;
        }
        if atoms
            .iter()
            .all(|q| (q[0] - p[0]).hypot(q[1] - p[1]) >= sep)
        {
            atoms.push(p);
        }
    }
    Ok(atoms)
}

/// Renders the apparent-height map (m) of the terrace with `atoms` on a grid of `shape =
/// [rows, cols]` pixels of size `pixel` (m), centred on the origin: pixel (i, j) is at
/// `x = (j + ½ − cols/2)·pixel`, `y = (i + ½ − rows/2)·pixel`.
pub fn render(
    cfg: &AdatomConfig,
    atoms: &[[f64; 2]],
    shape: [usize; 2],
    pixel: f64,
) -> Result<Array2<f32>> {
    let mut h = corrugation(cfg, shape, pixel)?;
    h += &bumps(cfg, atoms, shape, pixel)?;
    Ok(h)
}

fn check_grid(cfg: &AdatomConfig, shape: [usize; 2], pixel: f64) -> Result<()> {
    cfg.validate("adatoms.")?;
    if shape[0] == 0 || shape[1] == 0 || !(pixel > 0.0 && pixel.is_finite()) {
        return Err(PhysicsError::arg(
            "shape",
            "needs at least one pixel and a positive pixel size",
        ));
    }
    Ok(())
}

/// The terrace's atomic corrugation `2c/9 · Σ_k cos(g_k · r)` (peak-to-peak `c`) on the grid of
/// [`render`] (it does not depend on the adatoms, so a simulator computes it once per sample).
pub fn corrugation(cfg: &AdatomConfig, shape: [usize; 2], pixel: f64) -> Result<Array2<f32>> {
    check_grid(cfg, shape, pixel)?;
    let [ny, nx] = shape;
    let a = cfg.lattice_constant.get();
    let c = cfg.corrugation.get();
    let g = 4.0 * std::f64::consts::PI / (3f64.sqrt() * a);
    // Reciprocal directions of a hexagonal lattice with a1 along x: 30°, 90°, 150°.
    let dirs: [(f64, f64); 3] = [30f64, 90.0, 150.0].map(|d| {
        let r = d.to_radians();
        (g * r.cos(), g * r.sin())
    });
    let x0 = -0.5 * nx as f64 * pixel;
    let y0 = -0.5 * ny as f64 * pixel;
    let mut h = Array2::<f32>::zeros((ny, nx));
    if c > 0.0 {
        for i in 0..ny {
            let y = y0 + (i as f64 + 0.5) * pixel;
            for j in 0..nx {
                let x = x0 + (j as f64 + 0.5) * pixel;
                let s: f64 = dirs.iter().map(|(gx, gy)| (gx * x + gy * y).cos()).sum();
                h[[i, j]] = (2.0 * c / 9.0 * s) as f32;
            }
        }
    }
    Ok(h)
}

/// One adatom's Gaussian bump on a window of the grid of [`render`]: `side × side` cells from
/// cell `(row0, col0)`, indices that may lie outside the grid (the sample is periodic), values in
/// m (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct BumpPatch {
    /// First row of the window (any integer: a row outside the grid is its periodic image).
    pub row0: i64,
    /// First column of the window.
    pub col0: i64,
    /// Side of the square window, cells.
    pub side: usize,
    /// The bump's heights on the window, m, row-major.
    pub values: Vec<f32>,
}

impl BumpPatch {
    /// The bump of an adatom at `atom` (m, sample frame) on the grid of [`render`]: the cells
    /// within `4σ` (rounded up to cells) of the cell nearest the atom along each axis.
    pub fn new(cfg: &AdatomConfig, atom: [f64; 2], shape: [usize; 2], pixel: f64) -> Result<Self> {
        let mut p = Self {
            row0: 0,
            col0: 0,
            side: 0,
            values: Vec::new(),
        };
        p.set(cfg, atom, shape, pixel)?;
        Ok(p)
    }

    /// Recomputes the patch for an adatom at `atom` in place (reusing its buffer).
    pub fn set(
        &mut self,
        cfg: &AdatomConfig,
        atom: [f64; 2],
        shape: [usize; 2],
        pixel: f64,
    ) -> Result<()> {
        check_grid(cfg, shape, pixel)?;
        if !(atom[0].is_finite() && atom[1].is_finite()) {
            return Err(PhysicsError::arg("atom", "position must be finite"));
        }
        let [ny, nx] = shape;
        let x0 = -0.5 * nx as f64 * pixel;
        let y0 = -0.5 * ny as f64 * pixel;
        let amp = cfg.apparent_height.get();
        let sigma = cfg.width.get() / crate::constants::FWHM_PER_SIGMA;
        let r = (4.0 * sigma / pixel).ceil() as i64;
        let (jc, ic) = ((atom[0] - x0) / pixel - 0.5, (atom[1] - y0) / pixel - 0.5);
        self.row0 = ic.round() as i64 - r;
        self.col0 = jc.round() as i64 - r;
        self.side = (2 * r + 1) as usize;
        // The Gaussian is separable: one factor per row and per column.
        let factor = |k: i64, c: f64| {
            let d = (k as f64 - c) * pixel;
            (-(d * d) / (2.0 * sigma * sigma)).exp()
        };
        let cols: Vec<f64> = (self.col0..self.col0 + self.side as i64)
            .map(|j| factor(j, jc))
            .collect();
        self.values.clear();
        for i in self.row0..self.row0 + self.side as i64 {
            let fy = amp * factor(i, ic);
            self.values.extend(cols.iter().map(|&fx| (fy * fx) as f32));
        }
        Ok(())
    }

    /// The bump's height at cell `(i, j)` (any integers) of the periodic grid of `shape`, m: the
    /// highest of the window's cells that are images of it, `None` if none is.
    pub fn get_periodic(&self, i: i64, j: i64, shape: [usize; 2]) -> Option<f32> {
        let (ny, nx) = (shape[0] as i64, shape[1] as i64);
        let s = self.side as i64;
        let mut best: Option<f32> = None;
        let mut di = (i - self.row0).rem_euclid(ny);
        while di < s {
            let mut dj = (j - self.col0).rem_euclid(nx);
            while dj < s {
                let v = self.values[(di * s + dj) as usize];
                best = Some(best.map_or(v, |b| b.max(v)));
                dj += nx;
            }
            di += ny;
        }
        best
    }
}

/// The adatoms' Gaussian bumps on the grid of [`render`] (where bumps overlap, the higher one),
/// drawn periodically: a bump across an edge continues at the opposite edge.
pub fn bumps(
    cfg: &AdatomConfig,
    atoms: &[[f64; 2]],
    shape: [usize; 2],
    pixel: f64,
) -> Result<Array2<f32>> {
    check_grid(cfg, shape, pixel)?;
    let [ny, nx] = shape;
    // Overlapping adatoms: the isosurface follows the higher bump.
    let mut bumps = Array2::<f32>::zeros((ny, nx));
    let mut patch = BumpPatch::new(cfg, [0.0, 0.0], shape, pixel)?;
    for &p in atoms {
        patch.set(cfg, p, shape, pixel)?;
        let s = patch.side as i64;
        for di in 0..s {
            let i = (patch.row0 + di).rem_euclid(ny as i64) as usize;
            for dj in 0..s {
                let j = (patch.col0 + dj).rem_euclid(nx as i64) as usize;
                let v = patch.values[(di * s + dj) as usize];
                let cell = &mut bumps[[i, j]];
                *cell = cell.max(v);
            }
        }
    }
    Ok(bumps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;

    #[test]
    fn adatoms_sit_on_hollows_apart_and_inside() {
        let cfg = AdatomConfig {
            count: 12,
            ..Default::default()
        };
        let atoms = place_adatoms(&cfg, [6e-9, 6e-9], &mut seeded(3)).unwrap();
        assert_eq!(atoms.len(), 12);
        for (k, p) in atoms.iter().enumerate() {
            let q = nearest_hollow(*p, AG111_A);
            assert!((q[0] - p[0]).abs() < 1e-15 && (q[1] - p[1]).abs() < 1e-15);
            assert!(p[0].abs() <= 5e-9 && p[1].abs() <= 5e-9);
            for r in &atoms[k + 1..] {
                assert!((r[0] - p[0]).hypot(r[1] - p[1]) >= 1.5e-9);
            }
        }
        let too_many = AdatomConfig {
            count: 500,
            ..Default::default()
        };
        let e = place_adatoms(&too_many, [3e-9, 3e-9], &mut seeded(1)).unwrap_err();
        assert!(e.to_string().contains("adatoms.count"), "{e}");
    }

    #[test]
    fn adatom_has_the_configured_height_and_width() {
        let cfg = AdatomConfig {
            corrugation: Param::fixed(0.0),
            ..Default::default()
        };
        let px = 0.02e-9;
        // One atom at the centre of pixel (100, 100) of a 200² grid: x = 0.5 px.
        let atoms = [[0.5 * px, 0.5 * px]];
        let h = render(&cfg, &atoms, [200, 200], px).unwrap();
        assert!((f64::from(h[[100, 100]]) - 0.1e-9).abs() < 1e-15);
        // Half maximum at FWHM/2 = 0.3 nm = 15 px from the centre.
        let half = f64::from(h[[100, 115]]) / 0.1e-9;
        assert!((half - 0.5).abs() < 0.01, "{half}");
    }

    #[test]
    fn substrate_corrugation_has_the_lattice_period_and_amplitude() {
        let cfg = AdatomConfig {
            corrugation: Param::fixed(10e-12),
            ..Default::default()
        };
        let px = AG111_A / 16.0;
        let h = render(&cfg, &[], [64, 64], px).unwrap();
        let (lo, hi) = h
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        // Peak-to-peak 2c/3 - (-c/3) = c, the configured value (sampling may miss the exact
        // extremes slightly).
        let pp = f64::from(hi - lo);
        assert!((pp / 10e-12 - 1.0).abs() < 0.1, "peak-to-peak {pp}");
        // Periodic along x with period a (16 px): row values repeat.
        for j in 0..40 {
            assert!((h[[10, j]] - h[[10, j + 16]]).abs() < 1e-15);
        }
    }

    #[test]
    fn bad_config_names_the_field() {
        let cfg = AdatomConfig {
            width: Param::fixed(-1.0),
            ..Default::default()
        };
        assert!(
            cfg.validate("adatoms.")
                .unwrap_err()
                .to_string()
                .contains("adatoms.width")
        );
    }

    /// The sample is periodic: an adatom 0.1 nm inside the right edge also raises the cells at
    /// the left edge, by the Gaussian of its distance through the edge.
    #[test]
    fn a_bump_across_the_edge_continues_on_the_other_side() {
        let cfg = AdatomConfig {
            corrugation: Param::fixed(0.0),
            ..Default::default()
        };
        let (n, px) = (100usize, 0.05e-9);
        let half = 0.5 * n as f64 * px;
        let atom = [half - 0.1e-9, 0.5 * px];
        let h = bumps(&cfg, &[atom], [n, n], px).unwrap();
        let sigma = 0.6e-9 / (8.0 * 2f64.ln()).sqrt();
        // Column 0 is at x = -half + px/2, i.e. half + px/2 past the right edge's atom image.
        let d = (-half + 0.5 * px + 2.0 * half) - atom[0];
        let expected = 0.1e-9 * (-d * d / (2.0 * sigma * sigma)).exp();
        let got = f64::from(h[[n / 2, 0]]);
        assert!(
            (got - expected).abs() < 1e-6 * 0.1e-9,
            "{got:e} vs {expected:e}"
        );
        assert!(expected > 0.05e-9);
    }
}
