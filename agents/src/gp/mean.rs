//! Mean functions of the GP: a constant, and parametric means `m(u; θ)` whose parameters are
//! fitted jointly with the kernel's (the structured GP).
//!
//! Units: a mean function sees the **unit-scaled** input `u ∈ [0, 1]^d` (the GP's bounds map
//! to the unit box) and returns the **standardized** output (the caller's `y` minus its mean,
//! over its standard deviation), so that its parameters are of order one for the optimizer. A
//! physical model written in the caller's units converts with the bounds and the
//! standardization handed to [`MeanFunction::initial`].

use std::fmt::Debug;

/// A parametric mean `m(u; θ)` with an analytic gradient in `θ`.
pub trait MeanFunction: Debug + Send + Sync {
    /// Number of parameters `θ`.
    fn n_params(&self) -> usize;
    /// `m(u; θ)` at a unit-scaled input `u`.
    fn value(&self, u: &[f64], theta: &[f64]) -> f64;
    /// Writes `∂m/∂θ` at `u` into `grad` (length [`Self::n_params`]).
    fn gradient(&self, u: &[f64], theta: &[f64], grad: &mut [f64]);
    /// A starting point for the optimizer from the unit-scaled inputs `u` and standardized
    /// outputs `ys`.
    fn initial(&self, u: &[Vec<f64>], ys: &[f64]) -> Vec<f64>;
    /// `ln p(θ)` up to a constant (default: flat).
    fn log_prior(&self, _theta: &[f64]) -> f64 {
        0.0
    }
    /// Adds `∂ ln p(θ)/∂θ` to `grad` (default: flat, nothing).
    fn add_log_prior_gradient(&self, _theta: &[f64], _grad: &mut [f64]) {}
}

/// A constant mean `m = c` (one parameter, started at 0 = the data mean).
#[derive(Debug, Clone, Copy, Default)]
pub struct Constant;

impl MeanFunction for Constant {
    fn n_params(&self) -> usize {
        1
    }
    fn value(&self, _u: &[f64], theta: &[f64]) -> f64 {
        theta[0]
    }
    fn gradient(&self, _u: &[f64], _theta: &[f64], grad: &mut [f64]) {
        grad[0] = 1.0;
    }
    fn initial(&self, _u: &[Vec<f64>], _ys: &[f64]) -> Vec<f64> {
        vec![0.0]
    }
}

/// The largest standardized output and its input (the start of a peak's centre): `(0, the
/// box centre)` without data.
fn best_observed(u: &[Vec<f64>], ys: &[f64], d: usize) -> (f64, Vec<f64>) {
    match ys.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)) {
        Some((k, &y)) => (y, u.get(k).map_or_else(|| vec![0.5; d], Clone::clone)),
        None => (0.0, vec![0.5; d]),
    }
}

/// A concave quadratic bowl `m(u) = a − Σ_i b_i (u_i − c_i)²` (e.g. image sharpness against
/// aberrations). Parameters `θ = [a, ln b_1 … ln b_d, c_1 … c_d]` (so `b > 0`), with a weak
/// Normal(0, 2²) prior on `ln b_i` and Normal(0.5, 1) on `c_i` (unit-scaled inputs).
#[derive(Debug, Clone, Copy)]
pub struct Quadratic {
    /// Input dimension `d`.
    pub dim: usize,
}

impl MeanFunction for Quadratic {
    fn n_params(&self) -> usize {
        1 + 2 * self.dim
    }
    fn value(&self, u: &[f64], theta: &[f64]) -> f64 {
        let d = self.dim;
        let mut m = theta[0];
        for i in 0..d {
            let dx = u[i] - theta[1 + d + i];
            m -= theta[1 + i].exp() * dx * dx;
        }
        m
    }
    fn gradient(&self, u: &[f64], theta: &[f64], grad: &mut [f64]) {
        let d = self.dim;
        grad[0] = 1.0;
        for i in 0..d {
            let b = theta[1 + i].exp();
            let dx = u[i] - theta[1 + d + i];
            grad[1 + i] = -b * dx * dx;
            grad[1 + d + i] = 2.0 * b * dx;
        }
    }
    fn initial(&self, u: &[Vec<f64>], ys: &[f64]) -> Vec<f64> {
        let d = self.dim;
        let (ymax, centre) = best_observed(u, ys, d);
        let mut theta = vec![ymax; 1 + 2 * d];
        for i in 0..d {
            theta[1 + i] = 0.0;
            theta[1 + d + i] = centre[i];
        }
        theta
    }
    fn log_prior(&self, theta: &[f64]) -> f64 {
        let d = self.dim;
        let mut lp = 0.0;
        for i in 0..d {
            lp -= theta[1 + i] * theta[1 + i] / 8.0;
            let c = theta[1 + d + i] - 0.5;
            lp -= c * c / 2.0;
        }
        lp
    }
    fn add_log_prior_gradient(&self, theta: &[f64], grad: &mut [f64]) {
        let d = self.dim;
        for i in 0..d {
            grad[1 + i] -= theta[1 + i] / 4.0;
            grad[1 + d + i] -= theta[1 + d + i] - 0.5;
        }
    }
}

/// A Gaussian peak on a floor, `m(u) = a + h · exp(−Σ_i b_i (u_i − c_i)²)`: a sharpness that
/// peaks at the focus `c` and levels off far from it (where a quadratic would keep falling).
/// Parameters `θ = [a, ln h, ln b_1 … ln b_d, c_1 … c_d]` (so `h, b > 0`), with weak priors
/// Normal(0, 2²) on `ln h`, Normal(ln 10, 2²) on `ln b_i` (a peak a third of the box wide) and
/// Normal(0.5, 1) on `c_i` (unit-scaled inputs, standardized outputs).
#[derive(Debug, Clone, Copy)]
pub struct GaussianPeak {
    /// Input dimension `d`.
    pub dim: usize,
}

const LN_10: f64 = std::f64::consts::LN_10;

impl GaussianPeak {
    /// `(h, e)`: the height and the Gaussian factor at `u`.
    fn parts(&self, u: &[f64], theta: &[f64]) -> (f64, f64) {
        let d = self.dim;
        let mut q = 0.0;
        for i in 0..d {
            let dx = u[i] - theta[2 + d + i];
            q += theta[2 + i].exp() * dx * dx;
        }
        (theta[1].exp(), (-q).exp())
    }
}

impl MeanFunction for GaussianPeak {
    fn n_params(&self) -> usize {
        2 + 2 * self.dim
    }
    fn value(&self, u: &[f64], theta: &[f64]) -> f64 {
        let (h, e) = self.parts(u, theta);
        theta[0] + h * e
    }
    fn gradient(&self, u: &[f64], theta: &[f64], grad: &mut [f64]) {
        let d = self.dim;
        let (h, e) = self.parts(u, theta);
        grad[0] = 1.0;
        grad[1] = h * e;
        for i in 0..d {
            let b = theta[2 + i].exp();
            let dx = u[i] - theta[2 + d + i];
            grad[2 + i] = -h * e * b * dx * dx;
            grad[2 + d + i] = 2.0 * h * e * b * dx;
        }
    }
    fn initial(&self, u: &[Vec<f64>], ys: &[f64]) -> Vec<f64> {
        let d = self.dim;
        let (ymax, centre) = best_observed(u, ys, d);
        let ymin = ys.iter().copied().fold(f64::INFINITY, f64::min);
        let ymin = if ymin.is_finite() { ymin } else { 0.0 };
        let mut theta = vec![0.0; 2 + 2 * d];
        theta[0] = ymin;
        theta[1] = (ymax - ymin).max(0.1).ln();
        for i in 0..d {
            theta[2 + i] = LN_10;
            theta[2 + d + i] = centre[i];
        }
        theta
    }
    fn log_prior(&self, theta: &[f64]) -> f64 {
        let d = self.dim;
        let mut lp = -theta[1] * theta[1] / 8.0;
        for i in 0..d {
            let lb = theta[2 + i] - LN_10;
            lp -= lb * lb / 8.0;
            let c = theta[2 + d + i] - 0.5;
            lp -= c * c / 2.0;
        }
        lp
    }
    fn add_log_prior_gradient(&self, theta: &[f64], grad: &mut [f64]) {
        let d = self.dim;
        grad[1] -= theta[1] / 4.0;
        for i in 0..d {
            grad[2 + i] -= (theta[2 + i] - LN_10) / 4.0;
            grad[2 + d + i] -= theta[2 + d + i] - 0.5;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quadratic_gradient_matches_finite_differences() {
        let q = Quadratic { dim: 3 };
        let theta = [0.3, -0.2, 0.5, 0.1, 0.4, 0.6, 0.2];
        let u = [0.1, 0.9, 0.5];
        let mut g = vec![0.0; 7];
        q.gradient(&u, &theta, &mut g);
        for k in 0..7 {
            let h = 1e-6;
            let mut tp = theta;
            let mut tm = theta;
            tp[k] += h;
            tm[k] -= h;
            let fd = (q.value(&u, &tp) - q.value(&u, &tm)) / (2.0 * h);
            assert!((fd - g[k]).abs() < 1e-8, "param {k}: {fd} vs {}", g[k]);
        }
        // The maximum is a at u = c.
        assert!((q.value(&[0.4, 0.6, 0.2], &theta) - 0.3).abs() < 1e-15);
    }

    #[test]
    fn gaussian_peak_gradients_match_finite_differences() {
        let m = GaussianPeak { dim: 3 };
        let theta = [-0.7, 0.9, 1.5, 2.5, 2.0, 0.4, 0.6, 0.2];
        let u = [0.1, 0.9, 0.5];
        let mut g = vec![0.0; 8];
        m.gradient(&u, &theta, &mut g);
        let mut gp = vec![0.0; 8];
        m.add_log_prior_gradient(&theta, &mut gp);
        for k in 0..8 {
            let h = 1e-6;
            let (mut tp, mut tm) = (theta, theta);
            tp[k] += h;
            tm[k] -= h;
            let fd = (m.value(&u, &tp) - m.value(&u, &tm)) / (2.0 * h);
            assert!((fd - g[k]).abs() < 1e-8, "param {k}: {fd} vs {}", g[k]);
            let fdp = (m.log_prior(&tp) - m.log_prior(&tm)) / (2.0 * h);
            assert!((fdp - gp[k]).abs() < 1e-7, "prior {k}: {fdp} vs {}", gp[k]);
        }
        // The peak a + h at u = c, the floor a far away.
        let top = -0.7 + 0.9f64.exp();
        assert!((m.value(&[0.4, 0.6, 0.2], &theta) - top).abs() < 1e-15);
        assert!((m.value(&[40.0, -40.0, 40.0], &theta) + 0.7).abs() < 1e-12);
    }
}
