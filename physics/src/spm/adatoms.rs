//! STM surfaces with atoms: an Ag(111) terrace with its atomic corrugation and Ag adatoms on
//! hollow sites, as the apparent-height map a constant-current STM images.
//!
//! The constant-current image follows an isosurface of the local density of states. Here that
//! isosurface is modelled as the sum of
//! - the substrate corrugation of a close-packed (111) lattice with constant a,
//!   `c/9 · Σ_k cos(g_k · r)` over the three reciprocal vectors `g_k` (|g| = 4π/(√3 a)), which
//!   peaks with height `c/3` on atoms and `-c/6` at the hollows (total corrugation `c/2`;
//!   defaults give ~1 pm as on Ag(111)),
//! - one Gaussian bump per adatom, `h · exp(-r²/(2σ²))` with `σ = FWHM/(2√(2 ln 2))`
//!   (apparent height ≈ 0.1 nm and FWHM ≈ 0.6 nm for Ag on Ag(111) at small bias).
//!
//! Positions are in metres in the sample frame, origin at the centre of the sample grid.
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
    /// Peak-to-peak substrate corrugation, m. Default 2 pm.
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
            corrugation: Param::fixed(2e-12),
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

/// The terrace's atomic corrugation `c/9 · Σ_k cos(g_k · r)` on the grid of [`render`] (it
/// does not depend on the adatoms, so a simulator computes it once per sample).
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
                h[[i, j]] = (c / 9.0 * s) as f32;
            }
        }
    }
    Ok(h)
}

/// The adatoms' Gaussian bumps on the grid of [`render`] (where bumps overlap, the higher one).
pub fn bumps(
    cfg: &AdatomConfig,
    atoms: &[[f64; 2]],
    shape: [usize; 2],
    pixel: f64,
) -> Result<Array2<f32>> {
    check_grid(cfg, shape, pixel)?;
    let [ny, nx] = shape;
    let x0 = -0.5 * nx as f64 * pixel;
    let y0 = -0.5 * ny as f64 * pixel;
    let amp = cfg.apparent_height.get();
    let sigma = cfg.width.get() / (2.0 * (2.0 * std::f64::consts::LN_2).sqrt());
    let reach = 4.0 * sigma;
    // Overlapping adatoms: the isosurface follows the higher bump.
    let mut bumps = Array2::<f32>::zeros((ny, nx));
    for p in atoms {
        let (jc, ic) = ((p[0] - x0) / pixel - 0.5, (p[1] - y0) / pixel - 0.5);
        let r = (reach / pixel).ceil() as i64;
        let (i_lo, i_hi) = (
            (ic.round() as i64 - r).max(0),
            (ic.round() as i64 + r).min(ny as i64 - 1),
        );
        let (j_lo, j_hi) = (
            (jc.round() as i64 - r).max(0),
            (jc.round() as i64 + r).min(nx as i64 - 1),
        );
        for i in i_lo..=i_hi {
            let dy = (i as f64 - ic) * pixel;
            for j in j_lo..=j_hi {
                let dx = (j as f64 - jc) * pixel;
                let v = (amp * (-(dx * dx + dy * dy) / (2.0 * sigma * sigma)).exp()) as f32;
                let cell = &mut bumps[[i as usize, j as usize]];
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
        // Peak-to-peak c/3 - (-c/6) = c/2 (sampling may miss the exact extremes slightly).
        let pp = f64::from(hi - lo);
        assert!((pp / 5e-12 - 1.0).abs() < 0.1, "peak-to-peak {pp}");
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
}
