//! Procedural sample surfaces for SPM: terraces with atomic steps, particles, grains, and a
//! rough flat film. Heights in metres on a pixel grid (row = slow scan axis).
//!
//! # Periodic samples
//!
//! A sample grid of `ny × nx` cells of size `p` is one period of an endless sample: the scanner
//! may drift or be offset past its edge, and what it sees there is the sample continued, never a
//! copied edge value. Every generator here makes its surface periodic:
//!
//! - roughness is white (independent per cell), so periodic as it stands;
//! - particles and grains are placed on the torus: a particle near one edge also rises at the
//!   opposite edge, and grains are the Voronoi cells of their seeds under the periodic
//!   (minimum-image) distance;
//! - terraces are a vicinal staircase, which cannot be periodic in height: it is periodic up to a
//!   constant **rise**, `h(x + nx·p, y) = h(x, y) + rise[0]` and `h(x, y + ny·p) = h(x, y) +
//!   rise[1]`. For the step pattern to repeat, a whole number of steps must cross the sample
//!   along each axis: the step counts are `Nx = round(nx·p·cos θ / w)` and `Ny = round(ny·p·sin θ
//!   / w)` (at least one step along the dominant axis), so the realized terrace width
//!   `1/√((Nx/nx p)² + (Ny/ny p)²)` and step direction `atan2(Ny/ny, Nx/nx)` are the nearest
//!   ones commensurate with the sample ([`terrace_steps`]); `rise = [Nx, Ny]·step_height`.
//!
//! [`bilinear`] samples such a grid anywhere (it wraps, adding the rise per period crossed), and
//! [`pad_periodic`] extends it by a margin (for a dilation that sees across the edge).
//!
//! ```
//! use scopegym_physics::spm::surface::{SurfaceConfig, SurfaceKind, bilinear, generate};
//! use scopegym_physics::rng::seeded;
//! let cfg = SurfaceConfig { kind: SurfaceKind::Terraces, ..Default::default() };
//! let s = generate(&cfg, [64, 64], 2e-9, &mut seeded(1)).unwrap();
//! assert_eq!(s.heights.dim(), (64, 64));
//! // One period (128 nm) further along x the surface is the same, `rise[0]` higher.
//! let at = |x: f64| bilinear(s.heights.view(), 2e-9, s.rise, x, 10e-9);
//! assert!((at(30e-9 + 128e-9) - at(30e-9) - s.rise[0]).abs() < 1e-15);
//! ```

use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::{Angle, Dose, Length};
use crate::rng::{SimRng, normal};
use ndarray::{Array2, ArrayView2, ArrayViewMut2, s};
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
    /// Terrace width, m. Default 50 nm. Realized as the nearest width that repeats over the
    /// sample (a whole number of steps per side, [`terrace_steps`]).
    pub terrace_width: Param<Length>,
    /// Direction of the step normal (angle from +x), rad. Default 0.3 rad. Realized, like the
    /// width, as the nearest direction that repeats over the sample.
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

/// Whole steps `[Nx, Ny]` the terraces of `cfg` rise across a grid of `shape = [rows, cols]`
/// cells of size `pixel` (m) along x and along y: the configured step normal `(cos θ, sin θ)/w`
/// times the sample's sides, rounded to integers so the staircase repeats over the sample (module
/// docs); when both round to 0 (terraces wider than the sample), one step along the dominant
/// axis.
pub fn terrace_steps(cfg: &SurfaceConfig, shape: [usize; 2], pixel: f64) -> [i64; 2] {
    let [ny, nx] = shape;
    let th = cfg.step_direction.get();
    let w = cfg.terrace_width.get();
    let kx = nx as f64 * pixel * th.cos() / w;
    let ky = ny as f64 * pixel * th.sin() / w;
    let (mut sx, mut sy) = (kx.round() as i64, ky.round() as i64);
    if sx == 0 && sy == 0 {
        let sign = |v: f64| if v < 0.0 { -1 } else { 1 };
        if kx.abs() >= ky.abs() {
            sx = sign(kx);
        } else {
            sy = sign(ky);
        }
    }
    [sx, sy]
}

/// Writes vicinal terraces into `h` (pixel size `pixel`, m), periodic up to the rise: cell
/// `(i, j)` is at `floor(Nx·j/nx + Ny·i/ny + φ)` steps, `φ` a random phase. Returns the rise.
fn terraces(cfg: &SurfaceConfig, pixel: f64, h: &mut Array2<f64>, rng: &mut SimRng) -> [f64; 2] {
    let (ny, nx) = h.dim();
    let [sx, sy] = terrace_steps(cfg, [ny, nx], pixel);
    let dz = cfg.step_height.get();
    let phase = rng.random::<f64>();
    let (fx, fy) = (sx as f64 / nx as f64, sy as f64 / ny as f64);
    for ((i, j), v) in h.indexed_iter_mut() {
        *v = (j as f64 * fx + i as f64 * fy + phase).floor() * dz;
    }
    [sx as f64 * dz, sy as f64 * dz]
}

/// The offset `d = k - c` (cells) of integer cell `k` from the position `c` on a periodic axis of
/// `n` cells, taken to the nearest periodic image (minimum image, `|d| ≤ n/2`).
fn min_image(k: f64, c: f64, n: f64) -> f64 {
    let d = k - c;
    d - n * (d / n).round()
}

/// Raises hemispherical particles in `h` (each pixel the highest of what is there and the
/// particles over it), on the torus: a particle across an edge rises on both sides.
fn particles(cfg: &SurfaceConfig, pixel: f64, h: &mut Array2<f64>, rng: &mut SimRng) {
    let (ny, nx) = h.dim();
    let area = nx as f64 * ny as f64 * pixel * pixel;
    let n = (cfg.particle_density.get() * area).round() as usize;
    let r = cfg.particle_radius.get();
    let rp = (r / pixel).ceil() as i64;
    // Cells whose offset from `c` along an axis of `len` cells can lie within the radius, each
    // with that offset (minimum image), each cell once.
    let window = |c: f64, len: usize| -> Vec<(usize, f64)> {
        let nl = len as i64;
        if 2 * rp + 1 >= nl {
            (0..len)
                .map(|k| (k, min_image(k as f64, c, len as f64)))
                .collect()
        } else {
            (c as i64 - rp..=c as i64 + rp)
                .map(|k| (k.rem_euclid(nl) as usize, k as f64 - c))
                .collect()
        }
    };
    for _ in 0..n {
        let (cx, cy) = (
            rng.random::<f64>() * nx as f64,
            rng.random::<f64>() * ny as f64,
        );
        let cols = window(cx, nx);
        for (i, di) in window(cy, ny) {
            for &(j, dj) in &cols {
                let d2 = (dj * dj + di * di) * pixel * pixel;
                if d2 < r * r {
                    let z = (r * r - d2).sqrt();
                    let cell = &mut h[[i, j]];
                    *cell = cell.max(z);
                }
            }
        }
    }
}

/// A generated sample: heights on a grid that is one period of the sample (module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Surface {
    /// Heights of the cells, m (row = y).
    pub heights: Array2<f32>,
    /// Height gained per period along x and along y (the terraces' staircase), m: the sample at
    /// `(x + cols·pixel, y)` is `rise[0]` higher than at `(x, y)`, at `(x, y + rows·pixel)`
    /// `rise[1]` higher. Zero for every other kind.
    pub rise: [f64; 2],
    /// The material of each cell: 1 on a feature (a particle), 0 on the substrate (terraces,
    /// grains, the film). Tapping mode reads it as its dissipation map
    /// ([`super::tapping`]).
    pub feature: Array2<f32>,
}

/// Generates a periodic surface of `shape = [rows, cols]` pixels of size `pixel` (m): one period
/// of the sample (module docs). Heights in m.
pub fn generate(
    cfg: &SurfaceConfig,
    shape: [usize; 2],
    pixel: f64,
    rng: &mut SimRng,
) -> Result<Surface> {
    cfg.validate("surface.")?;
    let [ny, nx] = shape;
    if ny == 0 || nx == 0 || !(pixel > 0.0 && pixel.is_finite()) {
        return Err(PhysicsError::arg(
            "shape",
            "needs at least one pixel and a positive pixel size",
        ));
    }
    let mut h = Array2::<f64>::zeros((ny, nx));
    let mut rise = [0.0, 0.0];
    let mut feature = Array2::<f32>::zeros((ny, nx));
    let on_particle = |p: &Array2<f64>| p.mapv(|v| if v > 0.0 { 1.0f32 } else { 0.0 });
    match cfg.kind {
        SurfaceKind::Flat => {}
        SurfaceKind::Terraces => rise = terraces(cfg, pixel, &mut h, rng),
        SurfaceKind::Particles => {
            particles(cfg, pixel, &mut h, rng);
            feature = on_particle(&h);
        }
        SurfaceKind::Mixed => {
            rise = terraces(cfg, pixel, &mut h, rng);
            let mut p = Array2::<f64>::zeros((ny, nx));
            particles(cfg, pixel, &mut p, rng);
            h += &p;
            feature = on_particle(&p);
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
            // Voronoi cells under the periodic (minimum-image) distance.
            let (lx, ly) = (nx as f64 * pixel, ny as f64 * pixel);
            let d2 = |g: &(f64, f64, f64), x: f64, y: f64| {
                min_image(g.0, x, lx).powi(2) + min_image(g.1, y, ly).powi(2)
            };
            for ((i, j), v) in h.indexed_iter_mut() {
                let (x, y) = (j as f64 * pixel, i as f64 * pixel);
                let nearest = seeds
                    .iter()
                    .min_by(|a, b| d2(a, x, y).total_cmp(&d2(b, x, y)));
                *v = nearest.map_or(0.0, |g| g.2);
            }
        }
    }
    let rough = cfg.roughness.get();
    if rough > 0.0 {
        h.iter_mut().for_each(|v| *v += rough * normal(rng));
    }
    Ok(Surface {
        heights: h.mapv(|v| v as f32),
        rise,
        feature,
    })
}

/// Bilinear interpolation on a periodic grid of `ny × nx` cells of size `cell` (m) centred on the
/// origin (cell `(i, j)` at `x = (j + ½ − nx/2)·cell`, `y = (i + ½ − ny/2)·cell`): the value at
/// `(x, y)` (m), any position, from the four surrounding nodes. `node(i, j)` gives the value at
/// node `(i, j)` for any integers (outside `0..ny`, `0..nx` the caller continues its grid
/// periodically). The crate's one bilinear rule; [`bilinear`] applies it to a grid.
#[inline(always)]
pub fn bilinear_nodes(
    [ny, nx]: [usize; 2],
    cell: f64,
    x: f64,
    y: f64,
    mut node: impl FnMut(i64, i64) -> f64,
) -> f64 {
    let ((i, j), w) = bilinear_cell([ny, nx], cell, x, y);
    let (j1, i1) = (j.saturating_add(1), i.saturating_add(1));
    bilinear_mix([node(i, j), node(i, j1), node(i1, j), node(i1, j1)], w)
}

/// The node `(i, j)` below and left of `(x, y)` on the grid of [`bilinear_nodes`] and the
/// fractions `(fu, fv)` of the way to the next nodes.
#[inline(always)]
fn bilinear_cell([ny, nx]: [usize; 2], cell: f64, x: f64, y: f64) -> ((i64, i64), (f64, f64)) {
    let u = x / cell + 0.5 * nx as f64 - 0.5;
    let v = y / cell + 0.5 * ny as f64 - 0.5;
    let (uf, vf) = (floor(u), floor(v));
    // Saturating casts (NaN → 0): a non-finite position gives a non-finite value, never a panic.
    ((vf as i64, uf as i64), (u - uf, v - vf))
}

/// The node `(i, j)` as grid indices when it and its neighbours `(i + 1, j + 1)` all lie on an
/// `ny × nx` grid, `None` otherwise. Compared as `j < nx − 1`, not `j + 1 < nx`: the saturated
/// index of an infinite position must not wrap.
#[inline(always)]
fn interior_cell([ny, nx]: [usize; 2], i: i64, j: i64) -> Option<(usize, usize)> {
    (j >= 0 && i >= 0 && j < nx as i64 - 1 && i < ny as i64 - 1).then_some((i as usize, j as usize))
}

/// The bilinear mix of the nodes `[(i, j), (i, j + 1), (i + 1, j), (i + 1, j + 1)]` at the
/// fractions `(fu, fv)`.
#[inline(always)]
fn bilinear_mix([n00, n01, n10, n11]: [f64; 4], (fu, fv): (f64, f64)) -> f64 {
    let top = n00 * (1.0 - fu) + n01 * fu;
    let bottom = n10 * (1.0 - fu) + n11 * fu;
    top * (1.0 - fv) + bottom * fv
}

/// The value of the periodic grid `grid` (rise `rise` per period, m, see [`Surface::rise`]) at
/// node `(i, j)`, any integers: `grid[i mod ny, j mod nx]` plus the rise of the periods crossed.
#[inline(always)]
pub fn periodic_node<T: Copy + Into<f64>>(
    grid: ArrayView2<'_, T>,
    rise: [f64; 2],
    i: i64,
    j: i64,
) -> f64 {
    let (ny, nx) = grid.dim();
    let (nyi, nxi) = (ny as i64, nx as i64);
    if (0..nyi).contains(&i) && (0..nxi).contains(&j) {
        return grid[[i as usize, j as usize]].into();
    }
    let (iw, jw) = (i.rem_euclid(nyi) as usize, j.rem_euclid(nxi) as usize);
    let (ky, kx) = (i.div_euclid(nyi) as f64, j.div_euclid(nxi) as f64);
    let v: f64 = grid[[iw, jw]].into();
    v + (kx * rise[0] + ky * rise[1])
}

/// `⌊v⌋`, bit for bit as `f64::floor`, without the library call that baseline x86-64 (no
/// rounding instruction) makes for it: truncation where `|v| < 2⁵²`, the library elsewhere
/// (and for NaN and ±∞).
#[inline(always)]
fn floor(v: f64) -> f64 {
    if !(v.abs() < 4_503_599_627_370_496.0) {
        return v.floor();
    }
    let t = v as i64 as f64; // toward zero, exact here
    if t > v {
        t - 1.0
    } else if t == v {
        v // keeps the sign of −0
    } else {
        t
    }
}

/// Bilinear interpolation of the periodic grid `grid` (cell `cell`, m, centred on the origin as
/// in [`bilinear_nodes`]; rise `rise` per period, m) at `(x, y)` (m). Positions outside the grid
/// see the sample continued periodically (module docs), never a repeated edge value.
#[inline]
pub fn bilinear<T: Copy + Into<f64>>(
    grid: ArrayView2<'_, T>,
    cell: f64,
    rise: [f64; 2],
    x: f64,
    y: f64,
) -> f64 {
    let (ny, nx) = grid.dim();
    // With all four nodes on the grid, direct reads (the periodic continuation adds nothing).
    let ((i, j), w) = bilinear_cell([ny, nx], cell, x, y);
    if let Some((i, j)) = interior_cell([ny, nx], i, j) {
        let node = |i: usize, j: usize| -> f64 { grid[[i, j]].into() };
        return bilinear_mix(
            [
                node(i, j),
                node(i, j + 1),
                node(i + 1, j),
                node(i + 1, j + 1),
            ],
            w,
        );
    }
    bilinear_nodes([ny, nx], cell, x, y, |i, j| periodic_node(grid, rise, i, j))
}

/// [`bilinear`] at every position `(xs[k], ys[k])` into `out[k]` (as `f32`), the same values:
/// reads a contiguous grid's nodes straight from its slice.
pub fn bilinear_into<T: Copy + Into<f64>>(
    grid: ArrayView2<'_, T>,
    cell: f64,
    rise: [f64; 2],
    xs: &[f64],
    ys: &[f64],
    out: &mut [f32],
) {
    let (ny, nx) = grid.dim();
    let Some(g) = grid.as_slice() else {
        for ((o, &x), &y) in out.iter_mut().zip(xs).zip(ys) {
            *o = bilinear(grid, cell, rise, x, y) as f32;
        }
        return;
    };
    for ((o, &x), &y) in out.iter_mut().zip(xs).zip(ys) {
        let ((i, j), w) = bilinear_cell([ny, nx], cell, x, y);
        // As in `bilinear`.
        *o = if let Some((i, j)) = interior_cell([ny, nx], i, j) {
            let a = i * nx + j;
            let (top, bottom) = (&g[a..a + 2], &g[a + nx..a + nx + 2]);
            bilinear_mix(
                [
                    top[0].into(),
                    top[1].into(),
                    bottom[0].into(),
                    bottom[1].into(),
                ],
                w,
            )
        } else {
            bilinear_nodes([ny, nx], cell, x, y, |i, j| periodic_node(grid, rise, i, j))
        } as f32;
    }
}

/// Writes the periodic grid `src` (rise `rise` per period, m) extended by `pad` cells on every
/// side into `dst`, which must be `(rows + 2·pad) × (cols + 2·pad)`: `dst[i][j]` is node
/// `(i − pad, j − pad)` of the periodic sample.
pub fn pad_periodic(
    src: ArrayView2<'_, f32>,
    rise: [f64; 2],
    pad: usize,
    dst: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let rows = dst.nrows();
    pad_periodic_rows(src, rise, pad, dst, 0..rows)
}

/// [`pad_periodic`] on the rows `rows` of `dst` only (the others are left as they are): the
/// same values there.
pub fn pad_periodic_rows(
    src: ArrayView2<'_, f32>,
    rise: [f64; 2],
    pad: usize,
    mut dst: ArrayViewMut2<'_, f32>,
    rows: std::ops::Range<usize>,
) -> Result<()> {
    let (ny, nx) = src.dim();
    if dst.dim() != (ny + 2 * pad, nx + 2 * pad) {
        return Err(PhysicsError::arg(
            "dst",
            format!(
                "must be {}x{} for a {ny}x{nx} grid padded by {pad}, got {:?}",
                ny + 2 * pad,
                nx + 2 * pad,
                dst.dim()
            ),
        ));
    }
    if rows.end > dst.nrows() {
        return Err(PhysicsError::arg(
            "rows",
            format!("must end by row {}, got {rows:?}", dst.nrows()),
        ));
    }
    if rows.is_empty() {
        return Ok(());
    }
    let p = pad as i64;
    let contiguous = src.is_standard_layout() && dst.is_standard_layout();
    if pad > nx || pad > ny || !contiguous {
        // The margin wraps more than once (or a strided view): node by node, over `rows`.
        let first = rows.start as i64;
        for ((i, j), d) in dst.slice_mut(s![rows, ..]).indexed_iter_mut() {
            *d = periodic_node(src, rise, first + i as i64 - p, j as i64 - p) as f32;
        }
        return Ok(());
    }
    let width = nx + 2 * pad;
    let (Some(src), Some(dst)) = (src.as_slice(), dst.as_slice_mut()) else {
        unreachable!("standard layout is contiguous");
    };
    // Row by row: the left margin is the row's last `pad` cells one period down (−rise[0]), the
    // middle the row itself, the right margin its first `pad` cells one period up.
    for pi in rows {
        let out = &mut dst[pi * width..(pi + 1) * width];
        let i = pi as i64 - p;
        let (iw, ky) = (i.rem_euclid(ny as i64) as usize, i.div_euclid(ny as i64));
        let row = &src[iw * nx..(iw + 1) * nx];
        let dy = ky as f64 * rise[1];
        let (left, rest) = out.split_at_mut(pad);
        let (middle, right) = rest.split_at_mut(nx);
        let parts: [(&mut [f32], &[f32], f64); 3] = [
            (left, &row[nx - pad..], dy - rise[0]),
            (middle, row, dy),
            (right, &row[..pad], dy + rise[0]),
        ];
        for (d, s, offset) in parts {
            if offset == 0.0 {
                d.copy_from_slice(s);
            } else {
                d.iter_mut()
                    .zip(s)
                    .for_each(|(d, &v)| *d = (f64::from(v) + offset) as f32);
            }
        }
    }
    Ok(())
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
        let s = generate(&cfg, [128, 128], 2e-9, &mut seeded(1))
            .unwrap()
            .heights;
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
        let s = generate(&cfg, [128, 128], 2e-9, &mut seeded(2))
            .unwrap()
            .heights;
        let max = s.iter().copied().fold(f32::MIN, f32::max);
        assert!((f64::from(max) - 10e-9).abs() < 0.5e-9, "{max}");
        let covered = s.iter().filter(|&&v| v > 0.0).count() as f64 / s.len() as f64;
        // 200 per µm² of 10 nm discs cover 1 - exp(-ρπr²) ≈ 6 %.
        assert!((0.03..0.1).contains(&covered), "{covered}");
        let flat = SurfaceConfig {
            kind: SurfaceKind::Flat,
            ..Default::default()
        };
        let f = generate(&flat, [128, 128], 2e-9, &mut seeded(3))
            .unwrap()
            .heights;
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
        let t = generate(&base, [128, 128], 2e-9, &mut seeded(4))
            .unwrap()
            .heights;
        let m = generate(&mixed, [128, 128], 2e-9, &mut seeded(4))
            .unwrap()
            .heights;
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
        let a = generate(&cfg, [64, 64], 4e-9, &mut seeded(5))
            .unwrap()
            .heights;
        let b = generate(&cfg, [64, 64], 4e-9, &mut seeded(5))
            .unwrap()
            .heights;
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

    /// Per pair of adjacent grid lines, the mean absolute height difference between them: first
    /// the pair across the edge (line `n − 1` and line `n`, the periodic continuation with its
    /// rise), then the largest over the interior pairs; along x (columns) and along y (rows).
    fn seam_and_interior(s: &Surface) -> [(f64, f64); 2] {
        let h = s.heights.view();
        let (ny, nx) = (h.dim().0 as i64, h.dim().1 as i64);
        let node = |i: i64, j: i64| periodic_node(h, s.rise, i, j);
        let col_pair = |j: i64| {
            (0..ny)
                .map(|i| (node(i, j + 1) - node(i, j)).abs())
                .sum::<f64>()
                / ny as f64
        };
        let row_pair = |i: i64| {
            (0..nx)
                .map(|j| (node(i + 1, j) - node(i, j)).abs())
                .sum::<f64>()
                / nx as f64
        };
        let most = |f: &dyn Fn(i64) -> f64, n: i64| (0..n - 1).map(f).fold(0.0, f64::max);
        [
            (col_pair(nx - 1), most(&col_pair, nx)),
            (row_pair(ny - 1), most(&row_pair, ny)),
        ]
    }

    /// Issue 15 §1: every generator makes the grid one period of the sample. Across the edge
    /// the surface continues like anywhere inside: the pair of lines across the edge (with the
    /// terraces' rise) differs on average by no more than 1.5 times the most any interior pair
    /// does (on a periodic sample the edge pair is one more pair like the others; particles or
    /// grains cut at the edge, or terraces whose steps do not line up, make it an outlier several
    /// times larger), for several seeds and every kind.
    #[test]
    fn every_kind_is_periodic_across_the_edge() {
        for kind in [
            SurfaceKind::Terraces,
            SurfaceKind::Particles,
            SurfaceKind::Grains,
            SurfaceKind::Mixed,
        ] {
            for seed in 0..4 {
                let cfg = SurfaceConfig {
                    kind,
                    roughness: Param::fixed(0.0),
                    particle_density: Param::fixed(1e15),
                    grain_size: Param::fixed(30e-9),
                    step_direction: Param::fixed(0.7),
                    ..Default::default()
                };
                let s = generate(&cfg, [96, 112], 2e-9, &mut seeded(seed)).unwrap();
                for (axis, (seam, interior)) in seam_and_interior(&s).into_iter().enumerate() {
                    assert!(
                        seam <= 1.5 * interior,
                        "{kind:?} seed {seed} axis {axis}: seam {seam:e} vs interior {interior:e}"
                    );
                }
            }
        }
    }

    /// The terraces' step counts are the configured step normal times the sample's sides,
    /// rounded (each within half a step), their rise the counts times the step height, and every
    /// step across the edge is one step, as inside.
    #[test]
    fn terraces_repeat_with_whole_steps_per_period() {
        let cfg = SurfaceConfig {
            roughness: Param::fixed(0.0),
            ..Default::default()
        };
        let [sx, sy] = terrace_steps(&cfg, [128, 128], 2e-9);
        // 256 nm sides, 50 nm terraces at 0.3 rad: 4.89 and 1.51 steps.
        assert_eq!([sx, sy], [5, 2]);
        let s = generate(&cfg, [128, 128], 2e-9, &mut seeded(1)).unwrap();
        assert!(
            (s.rise[0] - 5.0 * 0.39e-9).abs() < 1e-20 && (s.rise[1] - 2.0 * 0.39e-9).abs() < 1e-20
        );
        for i in 0..128i64 {
            let d = periodic_node(s.heights.view(), s.rise, i, 128)
                - periodic_node(s.heights.view(), s.rise, i, 127);
            assert!(
                d.abs() < 1e-15 || (d - 0.39e-9).abs() < 1e-15,
                "row {i}: {d:e}"
            );
        }
        // Terraces far wider than the sample: one step along the dominant axis.
        let wide = SurfaceConfig {
            terrace_width: Param::fixed(5e-6),
            step_direction: Param::fixed(2.0),
            ..cfg
        };
        assert_eq!(terrace_steps(&wide, [128, 128], 2e-9), [0, 1]);
    }

    /// The one bilinear sampler reproduces a linear field exactly anywhere: on a grid holding
    /// `f = a·x + b·y` at its nodes with rise `[a·Lx, b·Ly]`, the sampled value at any `(x, y)`
    /// (inside, past the edges, several periods away) is `a·x + b·y`. Clamping at the edge (as
    /// before issue 15) gives the edge value instead.
    #[test]
    fn bilinear_continues_the_grid_periodically() {
        let (ny, nx, cell) = (6usize, 9usize, 0.5);
        let (a, b) = (0.3, -1.7);
        let pos = |k: usize, n: usize| (k as f64 + 0.5 - 0.5 * n as f64) * cell;
        let grid = Array2::from_shape_fn((ny, nx), |(i, j)| a * pos(j, nx) + b * pos(i, ny));
        let rise = [a * nx as f64 * cell, b * ny as f64 * cell];
        for &(x, y) in &[
            (0.1, 0.2),
            (2.2, -1.4),
            (2.4, 1.6),
            (-2.6, -1.7),
            (7.3, -0.2),
            (-31.0, 12.9),
        ] {
            let v = bilinear(grid.view(), cell, rise, x, y);
            assert!((v - (a * x + b * y)).abs() < 1e-12, "({x}, {y}): {v}");
        }
        // A periodic field (no rise): one period on, the same value.
        let f32grid = grid.mapv(|v| v as f32);
        let at = |x: f64, y: f64| bilinear(f32grid.view(), cell, [0.0, 0.0], x, y);
        assert!((at(0.3 + 4.5, -0.7 - 3.0) - at(0.3, -0.7)).abs() < 1e-6);
        // Padding agrees with the sampler at the nodes.
        let mut padded = Array2::<f32>::zeros((ny + 6, nx + 6));
        pad_periodic(f32grid.view(), rise, 3, padded.view_mut()).unwrap();
        for ((i, j), &v) in padded.indexed_iter() {
            let (x, y) = (pos(j, nx) - 3.0 * cell, pos(i, ny) - 3.0 * cell);
            assert!((f64::from(v) - (a * x + b * y)).abs() < 1e-5, "({i}, {j})");
        }
        assert!(pad_periodic(f32grid.view(), rise, 2, padded.view_mut()).is_err());
    }

    /// `bilinear_into` gives `bilinear`'s value, as `f32`, bit for bit: random positions inside
    /// the grid, past its edges and several periods away, on its nodes and edges, and NaN and
    /// ±∞, which give a non-finite value (before, an infinite position overflowed the index
    /// check: a panic in debug builds, an out-of-range slice in release).
    #[test]
    fn bilinear_into_equals_the_pointwise_sampler() {
        let (ny, nx, cell) = (7usize, 11usize, 0.37);
        let mut rng = seeded(3);
        let grid = Array2::from_shape_fn((ny, nx), |_| (normal(&mut rng) * 1e-9) as f32);
        let rise = [0.2e-9, -0.1e-9];
        let (lx, ly) = (nx as f64 * cell, ny as f64 * cell);
        for n in [0usize, 1, 5, 64, 200] {
            let mut xs: Vec<f64> = (0..n)
                .map(|_| (rng.random::<f64>() - 0.5) * 3.0 * lx)
                .collect();
            let mut ys: Vec<f64> = (0..n)
                .map(|_| (rng.random::<f64>() - 0.5) * 3.0 * ly)
                .collect();
            let specials = [
                (0.0, 0.0),
                (0.5 * lx, -0.5 * ly),
                (-0.5 * lx + 0.5 * cell, 0.5 * ly - 0.5 * cell),
                (f64::NAN, 0.1),
                (0.1, f64::INFINITY),
                (f64::NEG_INFINITY, f64::NAN),
                (-7.0 * lx, 5.0 * ly),
            ];
            for (k, &(x, y)) in specials.iter().enumerate().take(n) {
                (xs[k * n / specials.len()], ys[k * n / specials.len()]) = (x, y);
            }
            let mut out = vec![0.0f32; n];
            bilinear_into(grid.view(), cell, rise, &xs, &ys, &mut out);
            for k in 0..n {
                let want = bilinear(grid.view(), cell, rise, xs[k], ys[k]) as f32;
                assert_eq!(
                    out[k].to_bits(),
                    want.to_bits(),
                    "n {n}, k {k}: ({}, {})",
                    xs[k],
                    ys[k]
                );
                if !(xs[k].is_finite() && ys[k].is_finite()) {
                    assert!(
                        !out[k].is_finite(),
                        "({}, {}) gave {}",
                        xs[k],
                        ys[k],
                        out[k]
                    );
                }
            }
        }
    }

    /// `pad_periodic` writes `periodic_node`'s value (as `f32`) at every padded node, bit for
    /// bit, on the row path (a margin narrower than the grid), the node-by-node path (wider)
    /// and a strided (transposed) grid; `pad_periodic_rows` writes the same on its rows and
    /// leaves the others alone (none for an empty range), and refuses rows past the end.
    #[test]
    fn padding_equals_the_periodic_nodes_row_by_row_or_node_by_node() {
        let mut rng = seeded(8);
        let grid = Array2::from_shape_fn((5, 7), |_| (normal(&mut rng) * 1e-9) as f32);
        let rise = [0.3e-9, -0.2e-9];
        let transposed = grid.t();
        for g in [grid.view(), transposed] {
            let (ny, nx) = g.dim();
            for pad in 0..=9 {
                let shape = (ny + 2 * pad, nx + 2 * pad);
                let want = Array2::from_shape_fn(shape, |(i, j)| {
                    periodic_node(g, rise, i as i64 - pad as i64, j as i64 - pad as i64) as f32
                });
                let mut all = Array2::<f32>::from_elem(shape, f32::NAN);
                pad_periodic(g, rise, pad, all.view_mut()).unwrap();
                let bits = |a: &Array2<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&all), bits(&want), "{ny}x{nx}, pad {pad}");
                // Rows in the middle, and none (an empty or reversed range).
                #[allow(clippy::reversed_empty_ranges)]
                for rows in [2..shape.0.min(pad + 4), 3..3, 4..2] {
                    let mut some = Array2::<f32>::from_elem(shape, 7.0);
                    pad_periodic_rows(g, rise, pad, some.view_mut(), rows.clone()).unwrap();
                    for ((i, j), &v) in some.indexed_iter() {
                        let expected = if rows.contains(&i) { want[[i, j]] } else { 7.0 };
                        assert_eq!(v.to_bits(), expected.to_bits(), "pad {pad}, ({i}, {j})");
                    }
                }
                let mut some = Array2::<f32>::from_elem(shape, 7.0);
                let past = 0..shape.0 + 1;
                assert!(pad_periodic_rows(g, rise, pad, some.view_mut(), past).is_err());
            }
        }
    }
}
