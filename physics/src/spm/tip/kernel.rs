//! The dilation kernel a [`TipState`] images with.
//!
//! With the kernel radius `R_k = R + b` (`b` the adsorbate's blur, 0 without one):
//! `t(u) = max( -(|u| - a)₊²/(2R_k), -dz - (|u - d|  - a)₊²/(2R_k) )`, the second term only for
//! a double tip (second apex at offset `d`, `dz ≥ 0` below the main one in `t`: a feature at `p`
//! is imaged again, `dz` lower, at `p + d`). Without flat and double it is
//! [`Tip::paraboloid`], with a double and no flat [`Tip::double`], with a flat [`Tip::worn`] (the
//! flat disc swept by the paraboloids on the pixel grid; all three image fast).

use super::TipState;
use crate::error::{PhysicsError, Result};
use crate::spm::dilation::{MAX_TIP_SIDE, Tip};

/// The largest kernel side [`TipState::kernel_side`] returns, pixels.
pub const MAX_KERNEL_SIDE: usize = 127;
/// Largest pixel accepted by [`TipState::kernel`], m.
const MAX_PIXEL: f64 = 1e-4;

impl TipState {
    /// A good kernel side (pixels, odd, at most [`MAX_KERNEL_SIDE`]) for imaging a surface of
    /// relief `depth` (m) on a `pixel` (m) grid: the half-width `⌈√(2R_k·depth)/pixel⌉ +
    /// ⌈a/pixel⌉ + ⌈max(|dx|, |dy|)/pixel⌉` (the last for a double tip), so that the kernel's
    /// edge lies at least `depth` below each apex. A non-positive or non-finite `pixel` gives 1;
    /// a negative or NaN `depth` counts as 0.
    pub fn kernel_side(&self, pixel: f64, depth: f64) -> usize {
        if !(pixel > 0.0 && pixel.is_finite()) {
            return 1;
        }
        let depth = if depth > 0.0 { depth } else { 0.0 };
        let cap = (MAX_KERNEL_SIDE / 2) as f64;
        let cells = |len: f64| (len / pixel * (1.0 - 1e-12)).ceil().max(0.0);
        let mut half = cells((2.0 * self.kernel_radius() * depth).sqrt()) + cells(self.flat_radius);
        if let Some(d) = self.second {
            half += cells(d.offset[0].abs().max(d.offset[1].abs()));
        }
        let half = if half.is_nan() { cap } else { half.min(cap) };
        2 * half as usize + 1
    }

    /// The dilation kernel `t` on a `pixel` grid (m, in `(0, 1e-4]`) of `side × side` pixels
    /// (odd, at most [`MAX_TIP_SIDE`]): apex at 0, heights ≤ 0 (see the module docs). A blunted
    /// apex is [`Tip::worn`]: the flat disc swept by the paraboloid(s) on the grid, `-∞` in the
    /// window's corners that the sweep does not reach (deeper than the window's edge).
    pub fn kernel(&self, pixel: f64, side: usize) -> Result<Tip> {
        if !(pixel > 0.0 && pixel <= MAX_PIXEL) {
            return Err(PhysicsError::arg(
                "pixel",
                format!("must be in (0, {MAX_PIXEL}] m, got {pixel}"),
            ));
        }
        if side % 2 == 0 || side > MAX_TIP_SIDE {
            return Err(PhysicsError::arg(
                "side",
                format!("must be odd and at most {MAX_TIP_SIDE}, got {side}"),
            ));
        }
        let rk = self.kernel_radius();
        let a = self.flat_radius;
        match (a > 0.0, self.second) {
            (false, None) => Tip::paraboloid(rk, pixel, side),
            (false, Some(d)) => Tip::double(rk, pixel, side, d.offset, d.dz),
            (true, second) => Tip::worn(rk, a, pixel, side, second.map(|d| (d.offset, d.dz))),
        }
    }
}
