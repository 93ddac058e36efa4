//! Procedural sample surfaces for SPM: terraces with atomic steps, particles, grains, and a
//! rough flat film. Heights in metres on a pixel grid (row = slow scan axis).
//!
//! ```
//! use scopegym_physics::spm::surface::{SurfaceConfig, SurfaceKind, generate};
//! use scopegym_physics::rng::seeded;
//! let cfg = SurfaceConfig { kind: SurfaceKind::Terraces, ..Default::default() };
//! let s = generate(&cfg, [64, 64], 2e-9, &mut seeded(1)).unwrap();
//! assert_eq!(s.dim(), (64, 64));
//! ```

use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::{Angle, Dose, Length};
use crate::rng::{SimRng, normal};
use ndarray::Array2;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// What the surface looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SurfaceKind {
    /// Vicinal terraces separated by atomic steps.
    #[default]
    Terraces,
    /// Hemispherical particles on a flat substrate.
    Particles,
    /// Polycrystalline grains (Voronoi cells) of different heights.
    Grains,
    /// A flat film with roughness only.
    Flat,
    /// Terraces with particles lying on them (the terrace and particle settings both apply;
    /// `particle_density = 0` gives bare terraces, a tiny `step_height` bare particles).
    Mixed,
}

/// Surface generator settings (`[surface]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SurfaceConfig {
    /// Kind of surface. Default terraces.
    pub kind: SurfaceKind,
    /// Atomic step height, m. Default 0.39 nm (SrTiO3).
    pub step_height: Param<Length>,
    /// Terrace width, m. Default 50 nm.
    pub terrace_width: Param<Length>,
    /// Direction of the step normal (angle from +x), rad. Default 0.3 rad.
    pub step_direction: Param<Angle>,
    /// Areal density of particles, 1/m². Default 2e14 m⁻² (200 per µm²).
    pub particle_density: Param<Dose>,
    /// Particle radius, m. Default 10 nm.
    pub particle_radius: Param<Length>,
    /// Mean grain diameter, m. Default 60 nm.
    pub grain_size: Param<Length>,
    /// Standard deviation of grain heights, m. Default 2 nm.
    pub grain_height: Param<Length>,
    /// White roughness added to every pixel (standard deviation), m. Default 0.03 nm.
    pub roughness: Param<Length>,
}

impl Default for SurfaceConfig {
    fn default() -> Self {
        Self {
            kind: SurfaceKind::Terraces,
            step_height: Param::fixed(0.39e-9),
            terrace_width: Param::fixed(50e-9),
            step_direction: Param::fixed(0.3),
            particle_density: Param::fixed(2e14),
            particle_radius: Param::fixed(10e-9),
            grain_size: Param::fixed(60e-9),
            grain_height: Param::fixed(2e-9),
            roughness: Param::fixed(0.03e-9),
        }
    }
}

impl SurfaceConfig {
    /// Checks ranges; `prefix` names the section.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let pos = |n: &str, v: f64, hi: f64| {
            if v > 0.0 && v <= hi {
                Ok(())
            } else {
                Err(PhysicsError::param(
                    format!("{prefix}{n}"),
                    format!("must be in (0, {hi}], got {v}"),
                ))
            }
        };
        pos("step_height", self.step_height.get(), 1e-7)?;
        pos("terrace_width", self.terrace_width.get(), 1e-4)?;
        pos("particle_radius", self.particle_radius.get(), 1e-5)?;
        pos("grain_size", self.grain_size.get(), 1e-4)?;
        if !(0.0..=1e18).contains(&self.particle_density.get()) {
            return Err(PhysicsError::param(
                format!("{prefix}particle_density"),
                "must be in [0, 1e18] m⁻²",
            ));
        }
        for (n, v) in [
            ("grain_height", self.grain_height.get()),
            ("roughness", self.roughness.get()),
        ] {
            if !(0.0..=1e-6).contains(&v) {
                return Err(PhysicsError::param(
                    format!("{prefix}{n}"),
                    "must be in [0, 1 µm]",
                ));
            }
        }
        if !self.step_direction.get().is_finite() {
            return Err(PhysicsError::param(
                format!("{prefix}step_direction"),
                "must be finite",
            ));
        }
        Ok(())
    }
}

/// Writes vicinal terraces into `h` (pixel size `pixel`, m).
fn terraces(cfg: &SurfaceConfig, pixel: f64, h: &mut Array2<f64>, rng: &mut SimRng) {
    let (c, s) = (
        cfg.step_direction.get().cos(),
        cfg.step_direction.get().sin(),
    );
    let (w, dz) = (cfg.terrace_width.get(), cfg.step_height.get());
    let phase = rng.random::<f64>() * w;
    for ((i, j), v) in h.indexed_iter_mut() {
        let d = (j as f64 * pixel) * c + (i as f64 * pixel) * s + phase;
        *v = (d / w).floor() * dz;
    }
}

/// Raises hemispherical particles in `h` (each pixel the highest of what is there and the
/// particles over it).
fn particles(cfg: &SurfaceConfig, pixel: f64, h: &mut Array2<f64>, rng: &mut SimRng) {
    let (ny, nx) = h.dim();
    let area = nx as f64 * ny as f64 * pixel * pixel;
    let n = (cfg.particle_density.get() * area).round() as usize;
    let r = cfg.particle_radius.get();
    let rp = (r / pixel).ceil() as i64;
    for _ in 0..n {
        let (cx, cy) = (
            rng.random::<f64>() * nx as f64,
            rng.random::<f64>() * ny as f64,
        );
        for i in (cy as i64 - rp).max(0)..=(cy as i64 + rp).min(ny as i64 - 1) {
            for j in (cx as i64 - rp).max(0)..=(cx as i64 + rp).min(nx as i64 - 1) {
                let d2 = ((j as f64 - cx).powi(2) + (i as f64 - cy).powi(2)) * pixel * pixel;
                if d2 < r * r {
                    let z = (r * r - d2).sqrt();
                    let cell = &mut h[[i as usize, j as usize]];
                    *cell = cell.max(z);
                }
            }
        }
    }
}

/// Generates a surface of `shape = [rows, cols]` pixels of size `pixel` (m). Heights in m.
pub fn generate(
    cfg: &SurfaceConfig,
    shape: [usize; 2],
    pixel: f64,
    rng: &mut SimRng,
) -> Result<Array2<f32>> {
    cfg.validate("surface.")?;
    let [ny, nx] = shape;
    if ny == 0 || nx == 0 || !(pixel > 0.0 && pixel.is_finite()) {
        return Err(PhysicsError::arg(
            "shape",
            "needs at least one pixel and a positive pixel size",
        ));
    }
    let mut h = Array2::<f64>::zeros((ny, nx));
    match cfg.kind {
        SurfaceKind::Flat => {}
        SurfaceKind::Terraces => terraces(cfg, pixel, &mut h, rng),
        SurfaceKind::Particles => particles(cfg, pixel, &mut h, rng),
        SurfaceKind::Mixed => {
            terraces(cfg, pixel, &mut h, rng);
            let mut p = Array2::<f64>::zeros((ny, nx));
            particles(cfg, pixel, &mut p, rng);
            h += &p;
        }
        SurfaceKind::Grains => {
            let area = nx as f64 * ny as f64 * pixel * pixel;
            let d = cfg.grain_size.get();
            let n = ((area / (d * d)).round() as usize).max(1);
            let seeds: Vec<(f64, f64, f64)> = (0..n)
                .map(|_| {
                    (
                        rng.random::<f64>() * nx as f64 * pixel,
                        rng.random::<f64>() * ny as f64 * pixel,
                        cfg.grain_height.get() * normal(rng),
                    )
                })
                .collect();
            for ((i, j), v) in h.indexed_iter_mut() {
                let (x, y) = (j as f64 * pixel, i as f64 * pixel);
                let nearest = seeds.iter().min_by(|a, b| {
                    ((a.0 - x).powi(2) + (a.1 - y).powi(2))
                        .total_cmp(&((b.0 - x).powi(2) + (b.1 - y).powi(2)))
                });
                *v = nearest.map_or(0.0, |g| g.2);
            }
        }
    }
    let rough = cfg.roughness.get();
    if rough > 0.0 {
        h.iter_mut().for_each(|v| *v += rough * normal(rng));
    }
    Ok(h.mapv(|v| v as f32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;

    #[test]
    fn terraces_are_levels_one_step_apart() {
        let cfg = SurfaceConfig {
            roughness: Param::fixed(0.0),
            ..Default::default()
        };
        let s = generate(&cfg, [128, 128], 2e-9, &mut seeded(1)).unwrap();
        let mut levels: Vec<i64> = s
            .iter()
            .map(|&v| (f64::from(v) / 0.39e-9).round() as i64)
            .collect();
        // Every height is an integer number of steps.
        assert!(
            s.iter().all(
                |&v| ((f64::from(v) / 0.39e-9) - (f64::from(v) / 0.39e-9).round()).abs() < 1e-4
            )
        );
        levels.sort_unstable();
        levels.dedup();
        // 256 nm field, 50 nm terraces: about 5-7 levels, consecutive.
        assert!((4..=9).contains(&levels.len()), "{levels:?}");
        assert!(levels.windows(2).all(|w| w[1] - w[0] == 1), "{levels:?}");
    }

    #[test]
    fn particles_rise_to_their_radius_and_roughness_has_its_rms() {
        let cfg = SurfaceConfig {
            kind: SurfaceKind::Particles,
            roughness: Param::fixed(0.0),
            ..Default::default()
        };
        let s = generate(&cfg, [128, 128], 2e-9, &mut seeded(2)).unwrap();
        let max = s.iter().copied().fold(f32::MIN, f32::max);
        assert!((f64::from(max) - 10e-9).abs() < 0.5e-9, "{max}");
        let covered = s.iter().filter(|&&v| v > 0.0).count() as f64 / s.len() as f64;
        // 200 per µm² of 10 nm discs cover 1 - exp(-ρπr²) ≈ 6 %.
        assert!((0.03..0.1).contains(&covered), "{covered}");
        let flat = SurfaceConfig {
            kind: SurfaceKind::Flat,
            ..Default::default()
        };
        let f = generate(&flat, [128, 128], 2e-9, &mut seeded(3)).unwrap();
        let rms = (f.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / f.len() as f64).sqrt();
        assert!((rms / 0.03e-9 - 1.0).abs() < 0.05, "{rms}");
    }

    #[test]
    fn mixed_is_terraces_plus_particles() {
        let base = SurfaceConfig {
            roughness: Param::fixed(0.0),
            ..Default::default()
        };
        let mixed = SurfaceConfig {
            kind: SurfaceKind::Mixed,
            ..base.clone()
        };
        let t = generate(&base, [128, 128], 2e-9, &mut seeded(4)).unwrap();
        let m = generate(&mixed, [128, 128], 2e-9, &mut seeded(4)).unwrap();
        // Same terraces (the same draws come first); particles only ever add height, up to
        // their radius.
        let raised: Vec<f32> = m.iter().zip(&t).map(|(a, b)| a - b).collect();
        assert!(raised.iter().all(|&d| (-1e-15..=10.01e-9).contains(&d)));
        let covered = raised.iter().filter(|&&d| d > 0.0).count() as f64 / raised.len() as f64;
        assert!((0.03..0.1).contains(&covered), "{covered}");
        let none = SurfaceConfig {
            particle_density: Param::fixed(0.0),
            ..mixed
        };
        assert_eq!(
            generate(&none, [64, 64], 2e-9, &mut seeded(4)).unwrap(),
            generate(&base, [64, 64], 2e-9, &mut seeded(4)).unwrap()
        );
    }

    #[test]
    fn grains_are_piecewise_constant_and_seeded() {
        let cfg = SurfaceConfig {
            kind: SurfaceKind::Grains,
            roughness: Param::fixed(0.0),
            ..Default::default()
        };
        let a = generate(&cfg, [64, 64], 4e-9, &mut seeded(5)).unwrap();
        let b = generate(&cfg, [64, 64], 4e-9, &mut seeded(5)).unwrap();
        assert_eq!(a, b);
        let mut vals: Vec<f32> = a.iter().copied().collect();
        vals.sort_by(f32::total_cmp);
        vals.dedup();
        // 256 nm / 60 nm grains: about 18 grains, far fewer distinct heights than pixels.
        assert!((5..=40).contains(&vals.len()), "{}", vals.len());
        assert!(
            SurfaceConfig {
                step_height: Param::fixed(-1.0),
                ..Default::default()
            }
            .validate("surface.")
            .unwrap_err()
            .to_string()
            .contains("surface.step_height")
        );
    }
}
