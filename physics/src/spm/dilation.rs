//! Tip imaging by grey-scale dilation (DESIGN.md §5).
//!
//! A contact (or constant-current) image of a surface `s` taken with a rigid tip is the
//! grey-scale dilation of the surface by the reflected tip:
//!
//! `img(x) = max_u [ s(x - u) + t(u) ]`,
//!
//! where `t(u) ≤ 0` is the [`Tip`] height map relative to its apex (`t(0) = 0`), sampled on the
//! surface's pixel grid. If the physical tip surface lies `h(v) ≥ 0` above the apex at lateral
//! offset `v`, then `t(u) = -h(-u)`: for symmetric tips the two coincide, and for a double tip
//! a point feature at `p` is imaged at `p` and again at `p + d`, where `t` has its second apex at
//! `d` (see [`Tip::double`]).
//!
//! Conventions: surfaces and images are `ndarray` arrays of `f32` heights in metres with the row
//! index along the slow scan axis `y` and the column index along the fast axis `x`; the tip's
//! pixel must equal the surface's. Positions outside the surface count as `-∞`, i.e. only offsets
//! `u` with `x - u` inside the surface take part. The surface must be finite (NaN heights give
//! unspecified values, never a panic).
//!
//! Three implementations compute the same function:
//!
//! - [`Dilator::dilate_general`]: any tip. The surface is copied into a `-∞`-padded buffer and
//!   each tip row becomes a "run" of taps (source offsets and weights, the tip reflected); each
//!   output chunk of 32 columns keeps its running maxima in vector registers while the taps
//!   stream past (one unaligned load, one add and one max per 8 pixels and tap; AVX2 selected at
//!   run time). Work that cannot change the result is skipped, exactly:
//!   - tip entries that are `-∞` or lower than the surface's total relief `min s - max s` (they
//!     can never beat the apex term `s(x) + t(0)`), once per frame;
//!   - per chunk, whole runs whose largest possible sum (the maximum of the source values they
//!     read, from a sliding-window maximum of the padded surface, plus their largest weight) lies
//!     below the smallest running maximum of the chunk; the runs are taken highest weight first
//!     so that this lower bound rises early.
//!
//!   The result is bit for bit that of [`dilate_brute_force`] (the same `f32` sums).
//! - [`Dilator::dilate_separable`]: tips that are a maximum of separable parts,
//!   `t(i, j) = max_k [rows_k(i) + cols_k(j)]` over the full square window: [`Tip::paraboloid`]
//!   (`-(ux² + uy²)/2R = -ux²/2R - uy²/2R`), [`Tip::point`] and [`Tip::double`] (two parts).
//!   Because `max_{i,j} [s + r(i) + c(j)] = max_i [r(i) + max_j (s + c(j))]`, each part is a 1-D
//!   max-plus along `x` followed by one along `y`, `2·side` taps per pixel instead of `side²`.
//!   It equals the general path up to the rounding of the order of the two `f32` additions.
//! - [`dilate_brute_force`]: the definition as plain loops, the reference for tests.
//!
//! - [`Tip::worn`] (a flat disc swept by separable parts, `t = D ⊕ p`): a flat-disc maximum
//!   filter (one sliding-window maximum per disc row) on the grid grown by the disc, then the
//!   separable passes, `2·side + log₂ side` operations per pixel and disc row instead of `side²`.
//!   It equals the brute force to the same rounding as the separable path.
//!
//! [`Dilator::dilate`] picks the worn, then the separable path when the tip has parts. A [`Dilator`] holds the
//! scratch buffers: after the first frame of a given size it allocates nothing.
//!
//! ```
//! use ndarray::Array2;
//! use scopegym_physics::spm::dilation::{Dilator, Tip, dilate_brute_force};
//! // A 1 nm pixel grid with one 3 nm tall, one-pixel-wide spike.
//! let mut surface = Array2::<f32>::zeros((32, 48));
//! surface[[16, 20]] = 3e-9;
//! let tip = Tip::paraboloid(5e-9, 1e-9, 9).unwrap();
//! let mut image = Array2::<f32>::zeros(surface.dim());
//! let mut dilator = Dilator::new();
//! dilator.dilate(surface.view(), &tip, image.view_mut()).unwrap();
//! // The spike is imaged as the (inverted) tip: 3 nm - (2 nm)²/(2·5 nm) two pixels away.
//! assert!((image[[16, 22]] - 2.6e-9).abs() < 1e-15);
//! // Never below the surface, and the same as the definition.
//! assert!(image.iter().zip(surface.iter()).all(|(i, s)| i >= s));
//! let reference = dilate_brute_force(surface.view(), &tip);
//! assert!(image.iter().zip(reference.iter()).all(|(a, b)| (a - b).abs() < 1e-15));
//! ```

use crate::error::{PhysicsError, Result};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

/// The largest tip side accepted, pixels.
pub const MAX_TIP_SIDE: usize = 2049;

/// Columns per register-blocked chunk of the separable passes (8 AVX2 vectors).
const WIDE: usize = 64;
/// Columns per chunk of the general path (4 AVX2 vectors), whose runs of taps are skipped chunk
/// by chunk when they cannot win: narrower chunks skip more (on the benchmark surface 63% of the
/// taps run with 32 columns, 76% with 64), wider ones run a little faster when nothing can be
/// skipped.
const GENERAL_WIDE: usize = 32;
/// Columns per tail chunk (one AVX2 vector).
const LANE: usize = 8;

/// A tip height map `t(u)` relative to its apex, on a square grid of `side × side` pixels.
///
/// Heights are in metres (`f32`), `t ≤ 0` everywhere, `t = 0` at the central entry (the apex,
/// `u = 0`); `-∞` marks entries that are not part of the tip. Entry `(i, j)` (row-major, row
/// `i` along the slow axis `y`) holds `t` at the offset `u = ((j - c)·pixel, (i - c)·pixel)`
/// with `c = side / 2`. Tips built by [`Tip::paraboloid`], [`Tip::point`] and [`Tip::double`]
/// also carry their decomposition into [`SeparablePart`]s (`t = max_k [rows_k(i) + cols_k(j)]`),
/// which the fast dilation path uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Tip {
    side: usize,
    pixel: f64,
    heights: Vec<f32>,
    parts: Vec<SeparablePart>,
    /// For a worn tip ([`Tip::worn`]): the half-widths (pixels) of the rows `-r..=r` of its flat
    /// disc, which the parts (over the inner `side - 2r` window) are swept over; empty otherwise.
    disc: Vec<usize>,
}

/// A separable piece of a tip over its whole square window: `t_k(i, j) = rows[i] + cols[j]` (m),
/// `-∞` entries allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct SeparablePart {
    rows: Vec<f32>,
    cols: Vec<f32>,
}

impl SeparablePart {
    /// The profile along the tip's rows (`y`, index `i`), m.
    pub fn rows(&self) -> &[f32] {
        &self.rows
    }

    /// The profile along the tip's columns (`x`, index `j`), m.
    pub fn cols(&self) -> &[f32] {
        &self.cols
    }
}

fn check_side(side: usize) -> Result<()> {
    if side % 2 == 0 || side > MAX_TIP_SIDE {
        return Err(PhysicsError::param(
            "side",
            format!("must be an odd number of pixels in 1..={MAX_TIP_SIDE}, got {side}"),
        ));
    }
    Ok(())
}

fn check_length(field: &str, v: f64, allow_zero: bool) -> Result<()> {
    let ok = v.is_finite() && (v > 0.0 || (allow_zero && v == 0.0));
    if !ok {
        let what = if allow_zero { ">= 0" } else { "> 0" };
        return Err(PhysicsError::param(
            field,
            format!("must be a finite length {what} m, got {v}"),
        ));
    }
    Ok(())
}

/// A paraboloid's depth below its apex at lateral distance² `d2` (m²), as `0 - d2/2R` so that the
/// apex itself is `+0`.
fn parabola(d2: f64, radius: f64) -> f64 {
    0.0 - d2 / (2.0 * radius)
}

impl Tip {
    /// A paraboloid apex of radius of curvature `radius` (m): `t(u) = -|u|²/(2R)` over the whole
    /// `side × side` window (`pixel` in m). The square window is what makes the tip exactly
    /// separable; choose `side` with [`Tip::paraboloid_side`] so that the truncation is deeper
    /// than the surface's relief and therefore invisible.
    ///
    /// ```
    /// let tip = scopegym_physics::spm::dilation::Tip::paraboloid(10e-9, 1e-9, 5).unwrap();
    /// assert_eq!(tip.height(2, 2), 0.0);
    /// assert_eq!(tip.height(2, 4), -(2e-9f64 * 2e-9 / 20e-9) as f32);
    /// assert!(tip.is_separable());
    /// ```
    pub fn paraboloid(radius: f64, pixel: f64, side: usize) -> Result<Self> {
        check_length("radius", radius, false)?;
        check_length("pixel", pixel, false)?;
        check_side(side)?;
        let c = (side / 2) as f64;
        let profile: Vec<f32> = (0..side)
            .map(|k| {
                let d = (k as f64 - c) * pixel;
                parabola(d * d, radius) as f32
            })
            .collect();
        Ok(Self::from_parts(
            side,
            pixel,
            vec![SeparablePart {
                rows: profile.clone(),
                cols: profile,
            }],
        ))
    }

    /// The ideal tip: only the apex (`t = 0` at the centre, `-∞` elsewhere), which images the
    /// surface unchanged. `side` (odd) sets the footprint, `pixel` the grid (m).
    pub fn point(side: usize, pixel: f64) -> Result<Self> {
        check_length("pixel", pixel, false)?;
        check_side(side)?;
        let mut profile = vec![f32::NEG_INFINITY; side];
        profile[side / 2] = 0.0;
        Ok(Self::from_parts(
            side,
            pixel,
            vec![SeparablePart {
                rows: profile.clone(),
                cols: profile,
            }],
        ))
    }

    /// A double tip: the paraboloid of [`Tip::paraboloid`] and a second one of the same radius
    /// whose apex lies at lateral offset `offset = [dx, dy]` (m, `x` along columns, `y` along
    /// rows) and `dz ≥ 0` (m) above the main apex in `t`, i.e.
    /// `t(u) = max(-|u|²/2R, -dz - |u - d|²/2R)` over the square window: the maximum of two
    /// separable parts, which [`Dilator::dilate`] images as two separable dilations. A point feature at `p` is then imaged twice:
    /// at `p` and, `dz` lower, at `p + d` (a "ghost"). The physical second apex sits at `-d` from
    /// the main one (`t` is the reflected tip).
    pub fn double(radius: f64, pixel: f64, side: usize, offset: [f64; 2], dz: f64) -> Result<Self> {
        check_length("radius", radius, false)?;
        check_length("pixel", pixel, false)?;
        check_side(side)?;
        if !(offset[0].is_finite() && offset[1].is_finite()) {
            return Err(PhysicsError::param("offset", "must be finite lengths in m"));
        }
        check_length("dz", dz, true)?;
        let c = (side / 2) as f64;
        let axis = |k: usize, shift: f64, drop: f64| {
            let d = (k as f64 - c) * pixel - shift;
            (parabola(d * d, radius) - drop) as f32
        };
        let main: Vec<f32> = (0..side).map(|k| axis(k, 0.0, 0.0)).collect();
        let second = SeparablePart {
            rows: (0..side).map(|i| axis(i, offset[1], dz)).collect(),
            cols: (0..side).map(|j| axis(j, offset[0], 0.0)).collect(),
        };
        // At u = 0 the second part is -dz - |d|²/2R ≤ 0: the main apex stays the tip's lowest point.
        Ok(Self::from_parts(
            side,
            pixel,
            vec![
                SeparablePart {
                    rows: main.clone(),
                    cols: main,
                },
                second,
            ],
        ))
    }

    /// A blunted (worn) tip: a flat disc of radius `flat_radius` (m, ≥ 0) at the apex, rounded
    /// off by a paraboloid of radius `radius` outside it: `t(u) = 0` for `|u| ≤ a` and
    /// `-(|u| - a)²/(2R)` beyond. With `flat_radius = 0` it is the paraboloid (not flagged as
    /// separable).
    pub fn blunted(radius: f64, flat_radius: f64, pixel: f64, side: usize) -> Result<Self> {
        check_length("radius", radius, false)?;
        check_length("flat_radius", flat_radius, true)?;
        check_length("pixel", pixel, false)?;
        check_side(side)?;
        let c = (side / 2) as f64;
        let mut heights = Vec::with_capacity(side * side);
        for i in 0..side {
            let uy = (i as f64 - c) * pixel;
            for j in 0..side {
                let ux = (j as f64 - c) * pixel;
                let beyond = ((ux * ux + uy * uy).sqrt() - flat_radius).max(0.0);
                heights.push(parabola(beyond * beyond, radius) as f32);
            }
        }
        Ok(Self {
            side,
            pixel,
            heights,
            parts: Vec::new(),
            disc: Vec::new(),
        })
    }

    /// A worn tip on the pixel grid: a flat disc of radius `flat_radius` (m, ≥ 0) swept by a
    /// paraboloid of radius `radius` (or by the double tip of [`Tip::double`] when `second` is
    /// `Some((offset, dz))`): `t(u) = max_{w ∈ D} p(u - w)` over the grid offsets `w` of the disc
    /// `D = {|w| ≤ a}` and the separable parts `p` over the inner `side - 2r` window (`r` the
    /// disc's radius in whole pixels). On the grid this is the shape of [`Tip::blunted`], whose
    /// `t = -(|u| - a)²/2R` is the same sweep with continuous `w`: the two differ by less than the
    /// paraboloid's drop over one pixel. [`Dilator::dilate`] images it exactly and fast: a
    /// flat-disc maximum filter (sliding-window maxima, one per disc row), then the parts'
    /// separable passes. A disc wider than the window is clipped to the window (the tip is then
    /// flat on the clipped disc).
    ///
    /// ```
    /// use scopegym_physics::spm::dilation::Tip;
    /// // R = 5 nm, a = 1 nm, 0.5 nm pixels: the apex is flat within 2 pixels.
    /// let tip = Tip::worn(5e-9, 1e-9, 0.5e-9, 15, None).unwrap();
    /// assert_eq!(tip.height(7, 9), 0.0);
    /// assert!(tip.height(7, 10) < 0.0);
    /// assert!(tip.is_separable());
    /// ```
    pub fn worn(
        radius: f64,
        flat_radius: f64,
        pixel: f64,
        side: usize,
        second: Option<([f64; 2], f64)>,
    ) -> Result<Self> {
        check_length("radius", radius, false)?;
        check_length("flat_radius", flat_radius, true)?;
        check_length("pixel", pixel, false)?;
        check_side(side)?;
        // A disc wider than the window is clipped to it (rows and half-widths at most side/2).
        let full = disc_rows(flat_radius, pixel);
        let r = (full.len() / 2).min(side / 2);
        let mid = full.len() / 2;
        let disc: Vec<usize> = full[mid - r..=mid + r].iter().map(|&w| w.min(r)).collect();
        let inner_side = side - 2 * r;
        let inner = match second {
            None => Self::paraboloid(radius, pixel, inner_side)?,
            Some((offset, dz)) => Self::double(radius, pixel, inner_side, offset, dz)?,
        };
        if r == 0 {
            return Ok(inner);
        }
        // t(u) = max over disc offsets of the inner tip moved by them: the disc filter of the
        // inner heights on the window grown by r.
        let inner_view = ArrayView2::from_shape((inner_side, inner_side), &inner.heights[..])
            .expect("inner side²");
        let mut heights = Vec::new();
        disc_max_filter(
            &inner_view,
            &disc,
            [&mut Vec::new(), &mut Vec::new(), &mut Vec::new()],
            &mut heights,
        );
        Ok(Self {
            side,
            pixel,
            heights,
            parts: inner.parts,
            disc,
        })
    }

    /// A tip from an explicit row-major height map (m), `side × side` entries: finite values
    /// `≤ 0` or `-∞` (not part of the tip), with `0` at the centre.
    pub fn from_heights(side: usize, pixel: f64, heights: Vec<f32>) -> Result<Self> {
        check_length("pixel", pixel, false)?;
        check_side(side)?;
        if heights.len() != side * side {
            return Err(PhysicsError::param(
                "heights",
                format!(
                    "needs side² = {} values, got {}",
                    side * side,
                    heights.len()
                ),
            ));
        }
        if let Some(k) = heights
            .iter()
            .position(|&v| v.is_nan() || v > 0.0 || v == f32::INFINITY)
        {
            return Err(PhysicsError::param(
                "heights",
                format!(
                    "every height must be <= 0 m or -inf, entry {k} is {}",
                    heights[k]
                ),
            ));
        }
        let apex = heights[(side / 2) * side + side / 2];
        if apex != 0.0 {
            return Err(PhysicsError::param(
                "heights",
                format!("the central entry (the apex) must be 0, got {apex}"),
            ));
        }
        Ok(Self {
            side,
            pixel,
            heights,
            parts: Vec::new(),
            disc: Vec::new(),
        })
    }

    /// A tip `t(i, j) = max_k [rows_k(i) + cols_k(j)]` (in `f32`) from validated parts whose
    /// maximum is `0` at the centre and `≤ 0` elsewhere.
    fn from_parts(side: usize, pixel: f64, parts: Vec<SeparablePart>) -> Self {
        let mut heights = vec![f32::NEG_INFINITY; side * side];
        for p in &parts {
            for (i, &ri) in p.rows.iter().enumerate() {
                let line = &mut heights[i * side..(i + 1) * side];
                for (h, &cj) in line.iter_mut().zip(&p.cols) {
                    let v = ri + cj;
                    if v > *h {
                        *h = v;
                    }
                }
            }
        }
        Self {
            side,
            pixel,
            heights,
            parts,
            disc: Vec::new(),
        }
    }

    /// The smallest odd side (pixels) of a paraboloid window whose edge lies at least `depth`
    /// (m) below the apex: `side = 2⌈√(2R·depth)/pixel⌉ + 1`. With `depth` at least the surface's
    /// relief (max - min height), truncating the paraboloid to this window changes no image.
    ///
    /// ```
    /// use scopegym_physics::spm::dilation::Tip;
    /// // R = 10 nm, 1 nm pixels, 7.2 nm of relief: half-width 12 px.
    /// assert_eq!(Tip::paraboloid_side(10e-9, 1e-9, 7.2e-9).unwrap(), 25);
    /// ```
    pub fn paraboloid_side(radius: f64, pixel: f64, depth: f64) -> Result<usize> {
        check_length("radius", radius, false)?;
        check_length("pixel", pixel, false)?;
        check_length("depth", depth, true)?;
        // A relative slack keeps exact cases (√ of a perfect square) from rounding up a pixel.
        let half = ((2.0 * radius * depth).sqrt() / pixel * (1.0 - 1e-12)).ceil();
        let side = 2.0 * half + 1.0;
        if side > MAX_TIP_SIDE as f64 {
            return Err(PhysicsError::param(
                "depth",
                format!("needs a window of {side} pixels, more than {MAX_TIP_SIDE}"),
            ));
        }
        Ok(side as usize)
    }

    /// Side of the square window, pixels (odd).
    pub fn side(&self) -> usize {
        self.side
    }

    /// Half the side, `side / 2`: the apex's row and column index, pixels.
    pub fn half_width(&self) -> usize {
        self.side / 2
    }

    /// Pixel size of the grid, m.
    pub fn pixel(&self) -> f64 {
        self.pixel
    }

    /// The height map, row-major, m.
    pub fn heights(&self) -> &[f32] {
        &self.heights
    }

    /// The height map as a `side × side` view (row = `y`), m.
    pub fn as_array(&self) -> ArrayView2<'_, f32> {
        ArrayView2::from_shape((self.side, self.side), &self.heights)
            .expect("side² heights by construction")
    }

    /// The height at row `i`, column `j` (the apex is `(side/2, side/2)`), m.
    ///
    /// # Panics
    /// If `i` or `j` is not below [`Tip::side`].
    pub fn height(&self, i: usize, j: usize) -> f32 {
        assert!(i < self.side && j < self.side, "tip index out of range");
        self.heights[i * self.side + j]
    }

    /// The separable parts with `t(i, j) = max_k [rows_k(i) + cols_k(j)]`, for tips built from
    /// them ([`Tip::paraboloid`] and [`Tip::point`]: one part, [`Tip::double`]: two); empty for
    /// other tips.
    pub fn parts(&self) -> &[SeparablePart] {
        &self.parts
    }

    /// Whether the tip is a maximum of separable parts, so that [`Dilator::dilate`] takes the
    /// fast path.
    pub fn is_separable(&self) -> bool {
        !self.parts.is_empty()
    }
}

/// The half-widths (pixels) of the rows `dy = -r..=r` of a flat disc of radius `a` (m) on a
/// `pixel` grid: the columns `|dx| ≤ w(dy)` with `(dx² + dy²)·pixel² ≤ a²` (a relative 1e-9 of
/// slack keeps grid points on the rim). Just `[0]` for `a < pixel`.
fn disc_rows(a: f64, pixel: f64) -> Vec<usize> {
    let rho = a / pixel * (1.0 + 1e-9);
    let r = rho.floor() as usize;
    (0..=2 * r)
        .map(|k| {
            let dy = k as f64 - r as f64;
            (rho * rho - dy * dy).max(0.0).sqrt().floor() as usize
        })
        .collect()
}

/// A run of taps along one source row: tap `k < len` adds `weights[w + k]` to the source value at
/// offset `off + k` from the output position.
#[derive(Debug, Clone, Copy)]
struct Run {
    off: usize,
    w: usize,
    len: usize,
    /// The largest weight of the run.
    top: f32,
}

/// The tip entries a max-plus pass adds, grouped in runs along source rows.
#[derive(Debug, Clone, Default)]
struct Taps {
    runs: Vec<Run>,
    weights: Vec<f32>,
}

impl Taps {
    fn clear(&mut self) {
        self.runs.clear();
        self.weights.clear();
    }

    /// Adds the `n` weights `weight(k)` that read the source at offsets `off + k`, as one run from
    /// the first to the last live weight (see [`is_live`]). The entries between keep their
    /// weights: `-∞` or too low to win, they add nothing to the maximum.
    fn push_row(&mut self, off: usize, n: usize, threshold: f64, weight: impl Fn(usize) -> f32) {
        let Some(first) = (0..n).find(|&k| is_live(weight(k), threshold)) else {
            return;
        };
        let last = (first..n)
            .rev()
            .find(|&k| is_live(weight(k), threshold))
            .unwrap_or(first);
        let w = self.weights.len();
        self.weights.extend((first..=last).map(weight));
        let top = self.weights[w..]
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        self.runs.push(Run {
            off: off + first,
            w,
            len: last + 1 - first,
            top,
        });
    }

    /// Puts the runs with the highest weights first, so that the running maxima of a chunk reach
    /// a good lower bound early (see [`max_plus_chunk_bounded`]).
    fn sort_by_top(&mut self) {
        self.runs.sort_unstable_by(|a, b| b.top.total_cmp(&a.top));
    }
}

/// Reusable workspace for the dilation: a padded copy of the surface, its sliding-window maxima
/// (general path) or the intermediate image (separable path), and the taps. Keep one per
/// simulator; it allocates only when a frame (or tip) is larger than any before.
#[derive(Debug, Clone, Default)]
pub struct Dilator {
    padded: Vec<f32>,
    mid: Vec<f32>,
    bounds: Vec<f32>,
    scratch: Vec<f32>,
    taps: Taps,
    /// Worn tips: the surface's rows padded by `2r` each side, their window maxima, and the
    /// disc-filtered surface and its image on the grid grown by `r` each side.
    disc_rows: Vec<f32>,
    disc_max: Vec<f32>,
    disc_tmp: Vec<f32>,
    grown: Vec<f32>,
    grown_out: Vec<f32>,
}

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

fn check_shapes(surface: &ArrayView2<'_, f32>, out: &ArrayViewMut2<'_, f32>) -> Result<()> {
    if surface.dim() != out.dim() {
        return Err(PhysicsError::arg(
            "out",
            format!(
                "shape {:?} must equal the surface's {:?}",
                out.dim(),
                surface.dim()
            ),
        ));
    }
    Ok(())
}

/// The tip heights below which a tap cannot change any output: with the apex term
/// `s(x) + 0 ≥ min s`, a tap `w < min s - max s` gives `s(x-u) + w < min s` (and its `f32`
/// rounding no more than `min s`). The slack makes the `f64` difference err on the safe side.
/// Non-finite extremes disable the skipping.
fn skip_threshold(lo: f32, hi: f32) -> f64 {
    let d = f64::from(lo) - f64::from(hi);
    if d.is_finite() {
        d * (1.0 + 1e-12)
    } else {
        f64::NEG_INFINITY
    }
}

fn is_live(w: f32, threshold: f64) -> bool {
    w > f32::NEG_INFINITY && !(f64::from(w) < threshold)
}

/// Minimum and maximum of a slice, eight independent lanes so that it vectorizes.
fn min_max(v: &[f32], lo: &mut [f32; LANE], hi: &mut [f32; LANE]) {
    let mut chunks = v.chunks_exact(LANE);
    for c in &mut chunks {
        for k in 0..LANE {
            lo[k] = if c[k] < lo[k] { c[k] } else { lo[k] };
            hi[k] = if c[k] > hi[k] { c[k] } else { hi[k] };
        }
    }
    for (k, &x) in chunks.remainder().iter().enumerate() {
        lo[k] = if x < lo[k] { x } else { lo[k] };
        hi[k] = if x > hi[k] { x } else { hi[k] };
    }
}

/// Copies `surface` into `buf` at row `top`, column `left` of a `rows × stride` buffer whose
/// other entries are `-∞`, and returns the surface's minimum and maximum.
fn pad_into(
    buf: &mut Vec<f32>,
    surface: &ArrayView2<'_, f32>,
    top: usize,
    left: usize,
    rows: usize,
    stride: usize,
) -> (f32, f32) {
    let (h, w) = surface.dim();
    let n = rows * stride;
    if buf.len() != n {
        buf.clear();
        buf.resize(n, f32::NEG_INFINITY);
    }
    buf[..top * stride].fill(f32::NEG_INFINITY);
    buf[(top + h) * stride..].fill(f32::NEG_INFINITY);
    let mut lo = [f32::INFINITY; LANE];
    let mut hi = [f32::NEG_INFINITY; LANE];
    for (y, row) in surface.rows().into_iter().enumerate() {
        let line = &mut buf[(top + y) * stride..(top + y + 1) * stride];
        line[..left].fill(f32::NEG_INFINITY);
        line[left + w..].fill(f32::NEG_INFINITY);
        let dst = &mut line[left..left + w];
        match row.as_slice() {
            Some(src) => dst.copy_from_slice(src),
            None => dst.iter_mut().zip(row.iter()).for_each(|(d, &s)| *d = s),
        }
        min_max(dst, &mut lo, &mut hi);
    }
    let lo = lo
        .iter()
        .fold(f32::INFINITY, |a, &b| if b < a { b } else { a });
    let hi = hi
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    (lo, hi)
}

/// The smallest of `N` values (`N` a multiple of [`LANE`]): elementwise minima of the vectors,
/// then of the lanes.
#[inline(always)]
fn horizontal_min<const N: usize>(v: &[f32; N]) -> f32 {
    let mut m = [f32::INFINITY; LANE];
    for c in v.chunks_exact(LANE) {
        for k in 0..LANE {
            m[k] = if c[k] < m[k] { c[k] } else { m[k] };
        }
    }
    let mut h = [0.0f32; 4];
    for k in 0..4 {
        h[k] = if m[k + 4] < m[k] { m[k + 4] } else { m[k] };
    }
    let a = if h[2] < h[0] { h[2] } else { h[0] };
    let b = if h[3] < h[1] { h[3] } else { h[1] };
    if b < a { b } else { a }
}

/// The taps of one run on `N` running maxima: `acc[k] = max_t (seg[t + k] + weights[t], acc[k])`
/// with `seg` holding `weights.len() + N - 1` source values.
#[inline(always)]
fn max_plus_run<const N: usize>(seg: &[f32], weights: &[f32], acc: &mut [f32; N]) {
    let mut a = *acc;
    for (win, &w) in seg.windows(N).zip(weights) {
        let s: &[f32; N] = win.try_into().expect("N values");
        for k in 0..N {
            let v = s[k] + w;
            // `if` rather than `f32::max`: one vmaxps, no NaN fix-up.
            a[k] = if v > a[k] { v } else { a[k] };
        }
    }
    *acc = a;
}

/// `N` output columns starting at `base`: `dst[k] = max_taps src[base + off + k] + w` (also over
/// the old `dst[k]` when `accumulate`), the running maxima kept in registers across the taps.
#[inline(always)]
fn max_plus_chunk<const N: usize>(
    src: &[f32],
    base: usize,
    taps: &Taps,
    dst: &mut [f32; N],
    accumulate: bool,
) {
    let mut acc = if accumulate {
        *dst
    } else {
        [f32::NEG_INFINITY; N]
    };
    for run in &taps.runs {
        let start = base + run.off;
        let seg = &src[start..start + run.len + N - 1];
        max_plus_run(seg, &taps.weights[run.w..run.w + run.len], &mut acc);
    }
    *dst = acc;
}

/// [`max_plus_chunk`] (without accumulation) that skips the runs of taps which cannot raise any
/// of the `N` outputs. `lo` is a lower bound of every running maximum (the smallest of them,
/// refreshed after runs 1, 2, 4, 8, ...; the runs come highest weight first). A run whose first
/// tap reads the source at `a` is skipped when `bound[a] + top < lo`, with
/// `bound[a] ≥ max src[a..a + len + N - 1]` (every source value the run reads) and `top` its
/// largest weight: every sum it would produce is then below that bound (rounding is monotone)
/// and so below each maximum it would compete with. The result is bit for bit the same.
#[inline(always)]
fn max_plus_chunk_bounded<const N: usize>(
    src: &[f32],
    bound: &[f32],
    base: usize,
    taps: &Taps,
    acc: &mut [f32; N],
) {
    *acc = [f32::NEG_INFINITY; N];
    let mut lo = f32::NEG_INFINITY;
    for (n, run) in taps.runs.iter().enumerate() {
        let start = base + run.off;
        if !(bound[start] + run.top < lo) {
            let weights = &taps.weights[run.w..run.w + run.len];
            let seg = &src[start..start + run.len + N - 1];
            max_plus_run(seg, weights, acc);
        }
        if (n + 1).is_power_of_two() {
            lo = horizontal_min(acc);
        }
    }
}

/// `out[a] = max src[a..a + n]` over the part of that window inside `src` (`n ≥ 1`): windows of
/// doubling length up to the largest power of two `p ≤ n` (`log2 p` vectorized passes, the
/// first from `src` itself, then ping-ponging with `tmp`), then `max(W_p[a], W_p[a + n - p])`.
/// Every pass writes its whole output, so the buffers are only sized, never cleared.
fn window_max(src: &[f32], n: usize, out: &mut Vec<f32>, tmp: &mut Vec<f32>) {
    let len = src.len();
    let p = 1usize << (usize::BITS - 1 - n.max(1).leading_zeros());
    // The passes' offsets: 1, 2, 4, … below p, then n − p when p < n.
    let mut ks = std::iter::successors(Some(1usize), |k| Some(k * 2))
        .take_while(|&k| k < p)
        .chain((p < n).then_some(n - p));
    out.resize(len, 0.0);
    let Some(first) = ks.next() else {
        out.copy_from_slice(src);
        return;
    };
    window_max_step(src, out, first);
    tmp.resize(len, 0.0);
    for k in ks {
        window_max_step(out, tmp, k);
        std::mem::swap(out, tmp);
    }
}

/// The maximum of `src` (`rows × cols`) over the flat disc whose rows `-r..=r` have the
/// half-widths `disc`, on the grid grown by `r` each side: `grown[(y, x)] = max src[(y - r - dy,
/// x - r - dx)]` over `|dx| ≤ disc[dy + r]` and the positions inside `src` (`-∞` where there is
/// none), row-major `(rows + 2r) × (cols + 2r)`. One sliding-window maximum of the padded rows per
/// distinct half-width; `bufs` are scratch.
fn disc_max_filter(
    src: &ArrayView2<'_, f32>,
    disc: &[usize],
    bufs: [&mut Vec<f32>; 3],
    grown: &mut Vec<f32>,
) {
    let [padded, maxima, tmp] = bufs;
    let (rows, cols) = src.dim();
    let r = disc.len() / 2;
    let grown_width = cols + 2 * r;
    // Source rows with 2r of -∞ each side, so that every window stays inside its row.
    let line = cols + 4 * r;
    pad_into(padded, src, 0, 2 * r, rows, line);
    grown.clear();
    grown.resize((rows + 2 * r) * grown_width, f32::NEG_INFINITY);
    for k in 0..=r {
        let w = disc[r + k];
        // maxima[y·line + a] = max of padded row y over columns a..a + 2w + 1.
        window_max(padded, 2 * w + 1, maxima, tmp);
        // Grown (y + r + dy, x') takes row y's window centred on padded column x' + r.
        let dys: &[isize] = if k == 0 { &[0] } else { &[-1, 1] };
        for &sign in dys {
            let dy = sign * k as isize;
            for y in 0..rows {
                let gy = (y as isize + r as isize + dy) as usize;
                let start = y * line + r - w;
                max_into(
                    &mut grown[gy * grown_width..(gy + 1) * grown_width],
                    &maxima[start..start + grown_width],
                );
            }
        }
    }
}

/// [`disc_max_filter`] in valid mode: the maximum of `src` (`rows × cols`) over the flat disc
/// (rows `-r..=r` of half-widths `disc`) on the interior only, `g[(y, x)] = max src[(y + r +
/// dy, x + r + dx)]` over `|dx| ≤ disc[dy + r]`, row-major `(rows − 2r) × (cols − 2r)`: every
/// window lies inside its row, so no padding. `bufs` are scratch.
fn disc_max_valid(
    src: &ArrayView2<'_, f32>,
    disc: &[usize],
    bufs: [&mut Vec<f32>; 3],
    g: &mut Vec<f32>,
) {
    let [flat, maxima, tmp] = bufs;
    let (rows, cols) = src.dim();
    let r = disc.len() / 2;
    let (gr, gc) = (rows - 2 * r, cols - 2 * r);
    flat.clear();
    flat.extend(src.iter());
    g.clear();
    g.resize(gr * gc, f32::NEG_INFINITY);
    let mut last = None;
    for k in 0..=r {
        let w = disc[r + k];
        // maxima[y·cols + a] = max of row y over columns a..a + 2w + 1 (inside the row for
        // a ≤ cols − 2w − 1, which every read below is); rows of the disc with the same
        // half-width share them.
        if last != Some(w) {
            window_max(flat, 2 * w + 1, maxima, tmp);
            last = Some(w);
        }
        let dys: &[isize] = if k == 0 { &[0] } else { &[-1, 1] };
        for &sign in dys {
            let dy = sign * k as isize;
            for q in 0..gr {
                let y = (q as isize + r as isize + dy) as usize;
                let start = y * cols + r - w;
                max_into(&mut g[q * gc..(q + 1) * gc], &maxima[start..start + gc]);
            }
        }
    }
}

/// `dst[a] = max(dst[a], src[a])`.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn max_into(dst: &mut [f32], src: &[f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = if x > *d { x } else { *d };
    }
}

/// `dst[a] = max(src[a], src[a + k])`, and `src[a]` where `a + k` is past the end.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn window_max_step(src: &[f32], dst: &mut [f32], k: usize) {
    let len = src.len();
    let k = k.min(len);
    for ((d, &x), &y) in dst[..len - k]
        .iter_mut()
        .zip(&src[..len - k])
        .zip(&src[k..])
    {
        *d = if y > x { y } else { x };
    }
    dst[len - k..].copy_from_slice(&src[len - k..]);
}

/// [`max_plus_pass`] without accumulation, skipping hopeless runs in the full chunks of
/// [`GENERAL_WIDE`] columns (see [`max_plus_chunk_bounded`]; `bound` is [`window_max`] of `src`
/// over at least `GENERAL_WIDE + len - 1` values for every run length `len`).
#[allow(clippy::too_many_arguments)]
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn max_plus_pass_bounded(
    src: &[f32],
    bound: &[f32],
    src_stride: usize,
    taps: &Taps,
    rows: usize,
    width: usize,
    dst: &mut [f32],
    dst_stride: usize,
) {
    for r in 0..rows {
        let base = r * src_stride;
        let line = &mut dst[r * dst_stride..r * dst_stride + width];
        let mut x = 0;
        while x + GENERAL_WIDE <= width {
            let out: &mut [f32; GENERAL_WIDE] = (&mut line[x..x + GENERAL_WIDE])
                .try_into()
                .expect("GENERAL_WIDE");
            max_plus_chunk_bounded::<GENERAL_WIDE>(src, bound, base + x, taps, out);
            x += GENERAL_WIDE;
        }
        while x < width {
            let n = LANE.min(width - x);
            let mut out = [f32::NEG_INFINITY; LANE];
            max_plus_chunk::<LANE>(src, base + x, taps, &mut out, false);
            line[x..x + n].copy_from_slice(&out[..n]);
            x += LANE;
        }
    }
}

/// One max-plus pass over `rows` rows of `width` columns:
/// `dst[r·dst_stride + x] = max_taps src[r·src_stride + x + off] + w` (and the old value when
/// `accumulate`).
///
/// `src` must hold `LANE`-rounded rows past every tap offset (the padded buffers do).
#[allow(clippy::too_many_arguments)]
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn max_plus_pass(
    src: &[f32],
    src_stride: usize,
    taps: &Taps,
    rows: usize,
    width: usize,
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
) {
    for r in 0..rows {
        let base = r * src_stride;
        let line = &mut dst[r * dst_stride..r * dst_stride + width];
        let mut x = 0;
        while x + WIDE <= width {
            let out: &mut [f32; WIDE] = (&mut line[x..x + WIDE]).try_into().expect("WIDE");
            max_plus_chunk::<WIDE>(src, base + x, taps, out, accumulate);
            x += WIDE;
        }
        while x < width {
            let n = LANE.min(width - x);
            let mut out = [f32::NEG_INFINITY; LANE];
            out[..n].copy_from_slice(&line[x..x + n]);
            max_plus_chunk::<LANE>(src, base + x, taps, &mut out, accumulate);
            line[x..x + n].copy_from_slice(&out[..n]);
            x += LANE;
        }
    }
}

/// Runs `f(dst)` on `out`'s row-major data (stride = `out`'s width): directly when `out` is
/// contiguous and row-major, otherwise on a scratch buffer that is then copied into `out`.
fn with_out(out: &mut ArrayViewMut2<'_, f32>, scratch: &mut Vec<f32>, f: impl FnOnce(&mut [f32])) {
    let (h, w) = out.dim();
    if let Some(dst) = out.as_slice_mut() {
        f(dst);
        return;
    }
    scratch.clear();
    scratch.resize(h * w, 0.0);
    f(scratch);
    let view = ArrayView2::from_shape((h, w), &scratch[..]).expect("h·w values");
    out.assign(&view);
}

/// The skip thresholds `(columns, rows)` of a separable `part` over a surface spanning
/// `lo..=hi` with skip `threshold`, or `None` when the part cannot win anywhere. A term
/// `s + cols(j) + rows(i)` below min `s` loses to the apex term `s(x)`, which the part holding
/// the apex contributes exactly; the margin covers the two f32 roundings of the split sum.
fn part_thresholds(part: &SeparablePart, lo: f32, hi: f32, threshold: f64) -> Option<(f64, f64)> {
    let (rmax, cmax) = (profile_max(&part.rows), profile_max(&part.cols));
    let margin = 4e-6
        * (f64::from(lo).abs()
            + f64::from(hi).abs()
            + f64::from(rmax).abs()
            + f64::from(cmax).abs());
    let col_threshold = threshold - margin - f64::from(rmax);
    let row_threshold = threshold - margin - f64::from(cmax);
    (is_live(cmax, col_threshold) && is_live(rmax, row_threshold))
        .then_some((col_threshold, row_threshold))
}

/// The largest finite-or-not value of a profile (`-∞` for an all-`-∞` one).
fn profile_max(p: &[f32]) -> f32 {
    p.iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

impl Dilator {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Images `surface` (m) with `tip` into `out` (same shape, m): `out(x) = max_u [ s(x-u) +
    /// t(u) ]`, through [`Dilator::dilate_separable`] when the tip is separable and
    /// [`Dilator::dilate_general`] otherwise.
    pub fn dilate(
        &mut self,
        surface: ArrayView2<'_, f32>,
        tip: &Tip,
        out: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        if !tip.disc.is_empty() {
            self.dilate_worn(surface, tip, out)
        } else if tip.is_separable() {
            self.dilate_separable(surface, tip, out)
        } else {
            self.dilate_general(surface, tip, out)
        }
    }

    /// The dilation for any tip shape, exact: equal to [`dilate_brute_force`] (the maximum is
    /// taken over the same `f32` sums). Errors if `out`'s shape differs from `surface`'s.
    pub fn dilate_general(
        &mut self,
        surface: ArrayView2<'_, f32>,
        tip: &Tip,
        mut out: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        check_shapes(&surface, &out)?;
        let (rows, width) = surface.dim();
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let Self {
            padded,
            mid,
            bounds,
            scratch,
            taps,
            ..
        } = self;
        let (side, c) = (tip.side, tip.side / 2);
        // Padded surface: P(y + c, x + c) = s(y, x), -∞ around, rows rounded up to whole vectors.
        let stride = round_up(width, LANE) + 2 * c;
        let (lo, hi) = pad_into(padded, &surface, c, c, rows + 2 * c, stride);
        let threshold = skip_threshold(lo, hi);
        // s(y - (i - c), x - (j - c)) = P(y + 2c - i, x + 2c - j).
        taps.clear();
        for i in 0..side {
            let row = &tip.heights[i * side..(i + 1) * side];
            taps.push_row((2 * c - i) * stride, side, threshold, |k| row[2 * c - k]);
        }
        taps.sort_by_top();
        let (src, taps) = (&padded[..], &*taps);
        // bounds[a] = max P[a..a + side + GENERAL_WIDE - 1]: all that a run starting at a reads.
        if width >= GENERAL_WIDE {
            window_max(src, GENERAL_WIDE + side - 1, bounds, mid);
        }
        let bound = &bounds[..];
        with_out(&mut out, scratch, |dst| {
            max_plus_pass_bounded(src, bound, stride, taps, rows, width, dst, width);
        });
        Ok(())
    }

    /// A worn tip ([`Tip::worn`]): the surface's maximum over the flat disc `D`, on the grid grown
    /// by the disc's radius `r` each side (`g(z) = max_{w ∈ D} s(z - w)` over the `w` with
    /// `z - w` inside the surface, `-∞` where there is none), then the separable parts over it
    /// (`img(x) = max_v [g(x - v) + p(v)]`, the same maximum as over `t = D ⊕ p`), cropped to the
    /// surface. Each disc row is one sliding-window maximum of the padded rows.
    fn dilate_worn(
        &mut self,
        surface: ArrayView2<'_, f32>,
        tip: &Tip,
        mut out: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        check_shapes(&surface, &out)?;
        let (rows, width) = surface.dim();
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let r = tip.disc.len() / 2;
        let (grown_rows, grown_width) = (rows + 2 * r, width + 2 * r);
        let mut grown = std::mem::take(&mut self.grown);
        disc_max_filter(
            &surface,
            &tip.disc,
            [&mut self.disc_rows, &mut self.disc_max, &mut self.disc_tmp],
            &mut grown,
        );
        let mut grown_out = std::mem::take(&mut self.grown_out);
        grown_out.clear();
        grown_out.resize(grown_rows * grown_width, 0.0);
        let inner_c = tip.side / 2 - r;
        let result = {
            let g = ArrayView2::from_shape((grown_rows, grown_width), &grown[..])
                .expect("grown rows × columns");
            let o = ArrayViewMut2::from_shape((grown_rows, grown_width), &mut grown_out[..])
                .expect("grown rows × columns");
            self.separable_parts(g, &tip.parts, inner_c, o)
        };
        if result.is_ok() {
            let g = ArrayView2::from_shape((grown_rows, grown_width), &grown_out[..])
                .expect("grown rows × columns");
            out.assign(&g.slice(ndarray::s![r..r + rows, r..r + width]));
        }
        self.grown = grown;
        self.grown_out = grown_out;
        result
    }

    /// The exact fast path for tips made of separable parts ([`Tip::paraboloid`],
    /// [`Tip::point`], [`Tip::double`]): for each part a 1-D max-plus with its column profile
    /// along `x`, then with its row profile along `y`, and the maximum over the parts. Equals the
    /// general path up to the rounding of `(s + cols(j)) + rows(i)` against
    /// `s + (rows(i) + cols(j))`. Errors if the tip has no parts or `out`'s shape differs from
    /// `surface`'s.
    pub fn dilate_separable(
        &mut self,
        surface: ArrayView2<'_, f32>,
        tip: &Tip,
        out: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        if tip.parts.is_empty() {
            return Err(PhysicsError::arg(
                "tip",
                "has no separable parts: use dilate_general",
            ));
        }
        if !tip.disc.is_empty() {
            return self.dilate_worn(surface, tip, out);
        }
        self.separable_parts(surface, &tip.parts, tip.side / 2, out)
    }

    /// The interior of the dilation ("valid" mode): with `h` the tip's half width, `out`
    /// (`(rows − 2h) × (cols − 2h)`) gets the image on the cells of `surface` at least `h` from
    /// its edge, whose tip window lies inside it: `out[(y, x)] = img[(y + h, x + h)]` of
    /// [`Dilator::dilate`], bit for bit, without computing the band along the edge (e.g. a
    /// periodically padded window, where the band is discarded). Worn and separable tips run
    /// their passes on the interior only; other tips dilate the whole surface and crop. Errors
    /// if `out`'s shape is not the interior's.
    pub fn dilate_valid(
        &mut self,
        surface: ArrayView2<'_, f32>,
        tip: &Tip,
        mut out: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        let h = tip.side / 2;
        let (rows, cols) = surface.dim();
        if rows < 2 * h || cols < 2 * h || out.dim() != (rows - 2 * h, cols - 2 * h) {
            return Err(PhysicsError::arg(
                "out",
                format!(
                    "shape {:?} must be the surface's {:?} less twice the tip's half width {h}",
                    out.dim(),
                    surface.dim()
                ),
            ));
        }
        if out.is_empty() {
            return Ok(());
        }
        if !tip.disc.is_empty() {
            let r = tip.disc.len() / 2;
            let mut grown = std::mem::take(&mut self.grown);
            disc_max_valid(
                &surface,
                &tip.disc,
                [&mut self.disc_rows, &mut self.disc_max, &mut self.disc_tmp],
                &mut grown,
            );
            let result = {
                let g = ArrayView2::from_shape((rows - 2 * r, cols - 2 * r), &grown[..])
                    .expect("interior rows × columns");
                self.separable_valid(g, &tip.parts, h - r, out)
            };
            self.grown = grown;
            result
        } else if tip.is_separable() {
            self.separable_valid(surface, &tip.parts, h, out)
        } else {
            let mut full = std::mem::take(&mut self.grown_out);
            full.clear();
            full.resize(rows * cols, 0.0);
            let result = {
                let f =
                    ArrayViewMut2::from_shape((rows, cols), &mut full[..]).expect("rows × columns");
                self.dilate_general(surface, tip, f)
            };
            if result.is_ok() {
                let f = ArrayView2::from_shape((rows, cols), &full[..]).expect("rows × columns");
                out.assign(&f.slice(ndarray::s![h..rows - h, h..cols - h]));
            }
            self.grown_out = full;
            result
        }
    }

    /// [`Dilator::separable_parts`] in valid mode ([`Dilator::dilate_valid`]): `out` is
    /// `(rows − 2c) × (cols − 2c)`, the image on the interior of `surface`. Pass 1 along `x` runs
    /// on every row but only the interior columns, pass 2 along `y` only on the interior rows;
    /// each output is the maximum over the same `f32` sums as in the full pass.
    fn separable_valid(
        &mut self,
        surface: ArrayView2<'_, f32>,
        parts: &[SeparablePart],
        c: usize,
        mut out: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        let (rows_in, cols_in) = surface.dim();
        let (rows, width) = (rows_in - 2 * c, cols_in - 2 * c);
        let Self {
            padded,
            mid,
            scratch,
            taps,
            ..
        } = self;
        let w8 = round_up(width, LANE);
        // Output column x reads input columns x..=x + 2c: rows of w8 + 2c, -∞ past the input.
        let stride = w8 + 2 * c;
        let (lo, hi) = pad_into(padded, &surface, 0, 0, rows_in, stride);
        let threshold = skip_threshold(lo, hi);
        // The intermediate g on every input row, stride w8; output row y reads rows y..=y + 2c.
        let n = rows_in * w8;
        if mid.len() != n {
            mid.clear();
            mid.resize(n, f32::NEG_INFINITY);
        }
        let padded = &padded[..];
        with_out(&mut out, scratch, |dst| {
            let mut first = true;
            for part in parts {
                let Some((col_threshold, row_threshold)) = part_thresholds(part, lo, hi, threshold)
                else {
                    continue;
                };
                taps.clear();
                taps.push_row(0, part.cols.len(), col_threshold, |k| part.cols[2 * c - k]);
                max_plus_pass(
                    padded,
                    stride,
                    taps,
                    rows_in,
                    width,
                    &mut mid[..],
                    w8,
                    false,
                );
                taps.clear();
                for (i, &w) in part.rows.iter().enumerate() {
                    taps.push_row((2 * c - i) * w8, 1, row_threshold, |_| w);
                }
                max_plus_pass(mid, w8, taps, rows, width, dst, width, !first);
                first = false;
            }
        });
        Ok(())
    }

    /// [`Dilator::dilate_separable`] for `parts` whose profiles have `2c + 1` entries.
    fn separable_parts(
        &mut self,
        surface: ArrayView2<'_, f32>,
        parts: &[SeparablePart],
        c: usize,
        mut out: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        check_shapes(&surface, &out)?;
        let (rows, width) = surface.dim();
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let Self {
            padded,
            mid,
            scratch,
            taps,
            ..
        } = self;
        let w8 = round_up(width, LANE);
        // Pass 1 along x reads rows padded left and right only.
        let stride = w8 + 2 * c;
        let (lo, hi) = pad_into(padded, &surface, 0, c, rows, stride);
        let threshold = skip_threshold(lo, hi);
        // The intermediate g = max_j (s + cols(j)) lives in `mid` at rows c..c + rows, with -∞
        // rows above and below, stride w8.
        let n = (rows + 2 * c) * w8;
        if mid.len() != n {
            mid.clear();
            mid.resize(n, f32::NEG_INFINITY);
        }
        mid[..c * w8].fill(f32::NEG_INFINITY);
        mid[(rows + c) * w8..].fill(f32::NEG_INFINITY);
        let padded = &padded[..];
        with_out(&mut out, scratch, |dst| {
            let mut first = true;
            for part in parts {
                let Some((col_threshold, row_threshold)) = part_thresholds(part, lo, hi, threshold)
                else {
                    continue;
                };
                taps.clear();
                taps.push_row(0, part.cols.len(), col_threshold, |k| part.cols[2 * c - k]);
                let mid_rows = &mut mid[c * w8..(rows + c) * w8];
                max_plus_pass(padded, stride, taps, rows, width, mid_rows, w8, false);
                // Pass 2 along y: g(y - (i - c), x) = mid(y + 2c - i, x).
                taps.clear();
                for (i, &w) in part.rows.iter().enumerate() {
                    taps.push_row((2 * c - i) * w8, 1, row_threshold, |_| w);
                }
                max_plus_pass(mid, w8, taps, rows, width, dst, width, !first);
                first = false;
            }
        });
        Ok(())
    }
}

/// The dilation of `surface` by `tip` into a new array (allocates a [`Dilator`] and the image;
/// keep a [`Dilator`] for repeated frames).
pub fn dilate(surface: ArrayView2<'_, f32>, tip: &Tip) -> Array2<f32> {
    let mut out = Array2::zeros(surface.dim());
    Dilator::new()
        .dilate(surface, tip, out.view_mut())
        .expect("the output has the surface's shape");
    out
}

/// The definition as plain loops, `O(pixels · side²)`: `img(y, x) = max` over tip entries
/// `(i, j)` with `(y - i + c, x - j + c)` inside the surface of `s(y - i + c, x - j + c) + t(i, j)`
/// in `f32`. The reference the fast paths are tested against.
pub fn dilate_brute_force(surface: ArrayView2<'_, f32>, tip: &Tip) -> Array2<f32> {
    let (rows, width) = surface.dim();
    let (side, c) = (tip.side, tip.side / 2);
    Array2::from_shape_fn((rows, width), |(y, x)| {
        let mut m = f32::NEG_INFINITY;
        for i in 0..side {
            let Some(sy) = (y + c).checked_sub(i).filter(|&v| v < rows) else {
                continue;
            };
            for j in 0..side {
                let Some(sx) = (x + c).checked_sub(j).filter(|&v| v < width) else {
                    continue;
                };
                let v = surface[[sy, sx]] + tip.heights[i * side + j];
                if v > m {
                    m = v;
                }
            }
        }
        m
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;
    use rand::Rng;

    fn random_surface(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut rng = seeded(seed);
        Array2::from_shape_fn((rows, cols), |_| rng.random::<f32>() * 5e-9)
    }

    /// Valid mode is the interior of the full dilation bit for bit: worn (with and without a
    /// second apex), paraboloid, double and general tips, on a rough surface (no tap skipped) and
    /// a low one (most taps skipped), odd sizes; a wrong output shape is an error.
    #[test]
    fn valid_mode_is_the_interior_of_the_full_dilation_bit_for_bit() {
        let px = 0.5e-9;
        let mut general = Tip::paraboloid(4e-9, px, 9).unwrap().heights().to_vec();
        general[3] = -0.1e-9;
        let tips = [
            Tip::worn(5e-9, 1e-9, px, 15, None).unwrap(),
            Tip::worn(3e-9, 1.6e-9, px, 21, Some(([1e-9, -0.5e-9], 0.05e-9))).unwrap(),
            Tip::paraboloid(5e-9, px, 13).unwrap(),
            Tip::double(5e-9, px, 11, [1e-9, 0.5e-9], 0.1e-9).unwrap(),
            Tip::from_heights(9, px, general).unwrap(),
        ];
        let mut dil = Dilator::new();
        let mut checked = 0;
        for (k, tip) in tips.iter().enumerate() {
            assert!(k == 4 || tip.is_separable());
            let h = tip.half_width();
            for (rows, cols, relief) in [(37, 45, 1.0), (50, 29, 0.05)] {
                let s = random_surface(rows, cols, 10 + k as u64).mapv(|v| v * relief);
                let mut full = Array2::zeros((rows, cols));
                dil.dilate(s.view(), tip, full.view_mut()).unwrap();
                let mut valid = Array2::from_elem((rows - 2 * h, cols - 2 * h), f32::NAN);
                dil.dilate_valid(s.view(), tip, valid.view_mut()).unwrap();
                let inner = full.slice(ndarray::s![h..rows - h, h..cols - h]);
                assert_eq!(
                    valid.view(),
                    inner,
                    "tip {k}, {rows}×{cols}, relief {relief}"
                );
                // Into a strided view of a larger array, too.
                let mut big = Array2::from_elem((rows, cols + 3), f32::NAN);
                dil.dilate_valid(
                    s.view(),
                    tip,
                    big.slice_mut(ndarray::s![..rows - 2 * h, 1..cols + 1 - 2 * h]),
                )
                .unwrap();
                assert_eq!(
                    big.slice(ndarray::s![..rows - 2 * h, 1..cols + 1 - 2 * h]),
                    inner
                );
                checked += 1;
            }
            let s = random_surface(30, 30, 1);
            let mut wrong = Array2::zeros((30, 30));
            assert!(dil.dilate_valid(s.view(), tip, wrong.view_mut()).is_err());
        }
        assert_eq!(checked, 10);
    }

    #[test]
    fn builders_validate_and_name_the_field() {
        let field = |e: PhysicsError| match e {
            PhysicsError::InvalidParameter { field, .. } => field,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(field(Tip::paraboloid(1e-9, 1e-9, 4).unwrap_err()), "side");
        assert_eq!(field(Tip::paraboloid(0.0, 1e-9, 5).unwrap_err()), "radius");
        assert_eq!(
            field(Tip::paraboloid(1e-9, f64::NAN, 5).unwrap_err()),
            "pixel"
        );
        assert_eq!(
            field(Tip::double(1e-9, 1e-9, 5, [0.0, 0.0], -1e-9).unwrap_err()),
            "dz"
        );
        assert_eq!(
            field(Tip::double(1e-9, 1e-9, 5, [f64::INFINITY, 0.0], 0.0).unwrap_err()),
            "offset"
        );
        assert_eq!(
            field(Tip::blunted(1e-9, -1e-9, 1e-9, 5).unwrap_err()),
            "flat_radius"
        );
        assert_eq!(
            field(Tip::from_heights(3, 1e-9, vec![0.0; 8]).unwrap_err()),
            "heights"
        );
        let mut h = vec![-1e-9f32; 9];
        h[4] = -1e-10;
        assert_eq!(field(Tip::from_heights(3, 1e-9, h).unwrap_err()), "heights");
        let mut h = vec![f32::NEG_INFINITY; 9];
        h[4] = 0.0;
        h[0] = 1e-9;
        assert_eq!(field(Tip::from_heights(3, 1e-9, h).unwrap_err()), "heights");
        assert!(Tip::point(MAX_TIP_SIDE + 2, 1e-9).is_err());
    }

    #[test]
    fn paraboloid_heights_are_the_profile_sums() {
        let tip = Tip::paraboloid(8e-9, 0.5e-9, 7).unwrap();
        let part = &tip.parts()[0];
        let p = part.rows();
        assert_eq!(part.rows(), part.cols());
        assert_eq!(p[3], 0.0);
        for i in 0..7 {
            for j in 0..7 {
                assert_eq!(tip.height(i, j), p[i] + p[j]);
                let d2 = ((i as f64 - 3.0).powi(2) + (j as f64 - 3.0).powi(2)) * 0.25e-18;
                let exact = -d2 / 16e-9;
                assert!((f64::from(tip.height(i, j)) - exact).abs() < 1e-6 * exact.abs() + 1e-30);
            }
        }
        assert_eq!(tip.as_array()[[3, 3]], 0.0);
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let s = Array2::<f32>::zeros((4, 5));
        let mut o = Array2::<f32>::zeros((5, 4));
        let tip = Tip::point(3, 1e-9).unwrap();
        let mut d = Dilator::new();
        assert!(d.dilate(s.view(), &tip, o.view_mut()).is_err());
        let blunt = Tip::blunted(1e-9, 0.0, 1e-9, 3).unwrap();
        assert!(
            d.dilate_separable(s.view(), &blunt, Array2::zeros((4, 5)).view_mut())
                .is_err()
        );
    }

    #[test]
    fn general_equals_brute_force_on_a_few_shapes() {
        for (k, &(r, c, side)) in [(1, 1, 1), (7, 3, 9), (20, 70, 5), (33, 129, 11)]
            .iter()
            .enumerate()
        {
            let s = random_surface(r, c, k as u64);
            let mut rng = seeded(100 + k as u64);
            let mut h: Vec<f32> = (0..side * side)
                .map(|_| -rng.random::<f32>() * 4e-9)
                .collect();
            h[side * side / 2] = 0.0;
            let tip = Tip::from_heights(side, 1e-9, h).unwrap();
            let mut out = Array2::zeros((r, c));
            Dilator::new()
                .dilate(s.view(), &tip, out.view_mut())
                .unwrap();
            assert_eq!(
                out,
                dilate_brute_force(s.view(), &tip),
                "{r}×{c}, side {side}"
            );
        }
    }

    /// `window_max` is the plain window maximum over the part of each window inside the input,
    /// for every length up to 40 and window up to 45, with its buffers reused from calls of
    /// other sizes (shorter and longer, holding stale values).
    #[test]
    fn window_max_is_the_plain_window_maximum() {
        let mut rng = seeded(4);
        let (mut out, mut tmp) = (vec![9.0f32; 3], vec![-9.0f32; 70]);
        for len in 0..40usize {
            let src: Vec<f32> = (0..len).map(|_| rng.random::<f32>() - 0.5).collect();
            for n in 1..45usize {
                window_max(&src, n, &mut out, &mut tmp);
                let want: Vec<f32> = (0..len)
                    .map(|a| {
                        src[a..(a + n).min(len)]
                            .iter()
                            .copied()
                            .fold(f32::MIN, f32::max)
                    })
                    .collect();
                assert_eq!(out, want, "len {len}, n {n}");
            }
        }
    }
}
