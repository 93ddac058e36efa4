//! Exact Gaussian-process regression in pure Rust (DESIGN.md §9).
//!
//! - Kernels: Matérn-5/2 and RBF (squared exponential), with per-dimension (ARD) lengthscales
//!   `ℓ_k` and an output scale (variance) `σ_f²`: `k(u, u') = σ_f² κ(r)`,
//!   `r² = Σ_k (u_k − u'_k)² / ℓ_k²`, plus a homoscedastic noise variance `σ_n²` on the diagonal.
//! - Inputs are scaled to the unit box by the given bounds; outputs are standardized (mean 0,
//!   standard deviation 1) internally; predictions come back in the caller's units.
//! - Mean: a [`MeanFunction`], [`Constant`] or a parametric model such as [`Quadratic`]
//!   (the structured GP), fitted jointly with the kernel.
//! - Hyperparameters maximize the log marginal likelihood plus log priors, with the analytic
//!   gradient `½ tr((α αᵀ − K⁻¹) ∂K/∂θ)` (and `αᵀ ∂m/∂θ` for the mean), by L-BFGS (argmin,
//!   Moré–Thuente line search) on `θ = [ln ℓ_1 … ln ℓ_d, ln σ_f², ln(σ_n² − 10⁻⁶), mean…]`, from
//!   a default start (or the previous fit's hyperparameters, a warm start) plus seeded random
//!   restarts; the best point evaluated wins.
//! - Priors, as densities of the log-parameters (all on unit-scaled inputs and standardized
//!   outputs): `ln ℓ_k ~ Normal(√2 + ½ ln d, 3)` (the LogNormal(√2 + ½ ln d, √3) of DESIGN.md
//!   §9), `ln σ_f² ~ Normal(0, 1)` (our choice for the output scale: the data are standardized,
//!   so a signal variance near 1 is expected), `ln(σ_n² − 10⁻⁶) ~ Normal(−4, 1)`
//!   (LogNormal(−4, 1) on the noise variance above a floor of 10⁻⁶), and the mean's own
//!   [`MeanFunction::log_prior`].
//! - Cholesky with jitter escalation (`10⁻⁸ … 10⁻²` relative to the mean diagonal) and an
//!   [`AgentError::Numerical`] if the covariance stays singular; rank-one growth of the factor
//!   when a point is added with the hyperparameters kept ([`Gp::add_point`], `O(n²)`).
//!
//! ```
//! use scopegym_agents::gp::{Gp, GpConfig};
//! let x: Vec<Vec<f64>> = (0..8).map(|i| vec![i as f64]).collect();
//! let y: Vec<f64> = x.iter().map(|x| (x[0] / 2.0).sin()).collect();
//! let gp = Gp::fit(&GpConfig::default(), &[(0.0, 7.0)], &x, &y, None, 0).unwrap();
//! let (mu, var) = gp.predict(&[vec![3.0], vec![3.5]]);
//! assert!((mu[0] - (1.5f64).sin()).abs() < 0.05 && var[0] >= 0.0);
//! assert!((mu[1] - (1.75f64).sin()).abs() < 0.1);
//! ```

// Index loops mirror the formulas (several arrays indexed together).
#![allow(clippy::needless_range_loop)]

mod linalg;
pub mod mean;

pub use mean::{Constant, GaussianPeak, MeanFunction, Quadratic};

use crate::error::{AgentError, Result};
use argmin::core::{CostFunction, Executor, Gradient};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::quasinewton::LBFGS;
use nalgebra::DMatrix;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::sync::Arc;

/// The noise variance floor (standardized units): `σ_n² = 10⁻⁶ + e^z`.
pub const NOISE_FLOOR: f64 = 1e-6;
/// L-BFGS stops when the gradient norm of the objective per observation falls below this
/// (1e-3: hyperparameters to ~0.1% of a log unit, ample for BO; halves the warm fit time vs 1e-4).
const TOL_GRAD: f64 = 1e-3;
/// ... or when the objective per observation changes by less than this.
const TOL_COST: f64 = 1e-8;
const LN_2PI: f64 = 1.837_877_066_409_345_5;

/// The kernel's radial profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kernel {
    /// Matérn ν = 5/2: `(1 + √5 r + 5r²/3) e^{−√5 r}`.
    #[default]
    Matern52,
    /// Squared exponential: `e^{−r²/2}`.
    Rbf,
}

impl Kernel {
    /// `(κ(r²), G(r²))` with `∂κ/∂ln ℓ_k = G Δ_k²/ℓ_k²`.
    #[inline]
    fn eval(self, r2: f64) -> (f64, f64) {
        match self {
            Self::Rbf => {
                let k = (-0.5 * r2).exp();
                (k, k)
            }
            Self::Matern52 => {
                let s = (5.0 * r2).sqrt();
                let e = (-s).exp();
                ((1.0 + s + s * s / 3.0) * e, (5.0 / 3.0) * (1.0 + s) * e)
            }
        }
    }
}

/// How a GP is fitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpConfig {
    /// The kernel (default Matérn-5/2).
    pub kernel: Kernel,
    /// Random restarts of L-BFGS besides the default start, for a fit without a warm start
    /// (default 4).
    pub restarts: usize,
    /// Random restarts besides the warm start, for a warm-started fit (default 0).
    pub warm_restarts: usize,
    /// L-BFGS iterations per start (default 50).
    pub max_iters: u64,
}

impl Default for GpConfig {
    fn default() -> Self {
        Self {
            kernel: Kernel::Matern52,
            restarts: 4,
            warm_restarts: 0,
            max_iters: 50,
        }
    }
}

impl GpConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.max_iters == 0 {
            return Err(AgentError::config("max_iters", "must be at least 1"));
        }
        if self.restarts > 1000 || self.warm_restarts > 1000 {
            return Err(AgentError::config("restarts", "at most 1000"));
        }
        Ok(())
    }
}

/// GP hyperparameters, on unit-scaled inputs and standardized outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    /// ARD lengthscales `ℓ_k` (unit-scaled input units), one per dimension.
    pub lengthscales: Vec<f64>,
    /// Output scale (signal variance) `σ_f²`.
    pub output_scale: f64,
    /// Noise variance `σ_n²`.
    pub noise: f64,
    /// Mean parameters (see the [`MeanFunction`]).
    pub mean: Vec<f64>,
}

impl Hyperparameters {
    fn to_log(&self) -> Vec<f64> {
        let mut t: Vec<f64> = self.lengthscales.iter().map(|l| l.ln()).collect();
        t.push(self.output_scale.ln());
        t.push((self.noise - NOISE_FLOOR).max(1e-12).ln());
        t.extend_from_slice(&self.mean);
        t
    }

    fn from_log(theta: &[f64], d: usize) -> Self {
        Self {
            lengthscales: theta[..d].iter().map(|z| z.exp()).collect(),
            output_scale: theta[d].exp(),
            noise: NOISE_FLOOR + theta[d + 1].exp(),
            mean: theta[d + 2..].to_vec(),
        }
    }

    fn validate(&self, d: usize, n_mean: usize) -> Result<()> {
        if self.lengthscales.len() != d
            || self
                .lengthscales
                .iter()
                .any(|l| !(l.is_finite() && *l > 0.0))
        {
            return Err(AgentError::arg(
                "hyperparameters.lengthscales",
                format!("need {d} finite positive values"),
            ));
        }
        if !(self.output_scale.is_finite() && self.output_scale > 0.0) {
            return Err(AgentError::arg(
                "hyperparameters.output_scale",
                "must be > 0",
            ));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(AgentError::arg("hyperparameters.noise", "must be ≥ 0"));
        }
        if self.mean.len() != n_mean || self.mean.iter().any(|v| !v.is_finite()) {
            return Err(AgentError::arg(
                "hyperparameters.mean",
                format!("need {n_mean} finite values"),
            ));
        }
        Ok(())
    }
}

/// The lengthscale prior's location `√2 + ½ ln d` (on `ln ℓ`, variance 3).
fn ls_prior_mu(d: usize) -> f64 {
    std::f64::consts::SQRT_2 + 0.5 * (d as f64).ln()
}
const LS_PRIOR_VAR: f64 = 3.0;
const NOISE_PRIOR_MU: f64 = -4.0;

/// Buffers for batched predictions (reused between calls to avoid reallocating).
#[derive(Debug, Default)]
pub struct PredictWorkspace {
    kstar: DMatrix<f64>,
    v: DMatrix<f64>,
    q: Vec<f64>,
}

/// Candidates per block in batched predictions.
const BLOCK: usize = 512;

/// A GP conditioned on data with fixed hyperparameters.
#[derive(Debug, Clone)]
pub struct Gp {
    kernel: Kernel,
    mean: Arc<dyn MeanFunction>,
    bounds: Vec<(f64, f64)>,
    d: usize,
    n: usize,
    x: Vec<Vec<f64>>,
    y: Vec<f64>,
    /// Unit-scaled inputs, row-major `n × d`.
    u: Vec<f64>,
    /// Unit-scaled inputs divided by the lengthscales, row-major.
    u_ls: Vec<f64>,
    ys: Vec<f64>,
    y_mean: f64,
    y_sd: f64,
    hyp: Hyperparameters,
    /// Noise plus the jitter the Cholesky needed.
    diag_noise: f64,
    jitter: f64,
    l: Vec<f64>,
    linv: DMatrix<f64>,
    resid: Vec<f64>,
    alpha: Vec<f64>,
    log_posterior: f64,
}

/// Checks a box: at least one dimension, each `(lo, hi)` finite with `lo < hi`.
pub(crate) fn check_bounds(bounds: &[(f64, f64)]) -> Result<()> {
    if bounds.is_empty() {
        return Err(AgentError::arg("bounds", "need at least one dimension"));
    }
    for (k, &(lo, hi)) in bounds.iter().enumerate() {
        if !(lo.is_finite() && hi.is_finite() && hi > lo) {
            return Err(AgentError::arg(
                "bounds",
                format!("dimension {k}: need finite lo < hi, got ({lo}, {hi})"),
            ));
        }
    }
    Ok(())
}

fn check_data(bounds: &[(f64, f64)], x: &[Vec<f64>], y: &[f64]) -> Result<()> {
    check_bounds(bounds)?;
    if x.is_empty() {
        return Err(AgentError::arg("x", "need at least one observation"));
    }
    if x.len() != y.len() {
        return Err(AgentError::arg(
            "y",
            format!("{} values for {} inputs", y.len(), x.len()),
        ));
    }
    for (i, xi) in x.iter().enumerate() {
        if xi.len() != bounds.len() || xi.iter().any(|v| !v.is_finite()) {
            return Err(AgentError::arg(
                "x",
                format!("point {i}: need {} finite coordinates", bounds.len()),
            ));
        }
    }
    if let Some(i) = y.iter().position(|v| !v.is_finite()) {
        return Err(AgentError::arg("y", format!("value {i} is {}", y[i])));
    }
    Ok(())
}

fn scale_into(bounds: &[(f64, f64)], x: &[f64], out: &mut Vec<f64>) {
    for (v, &(lo, hi)) in x.iter().zip(bounds) {
        out.push((v - lo) / (hi - lo));
    }
}

fn standardize(y: &[f64]) -> (f64, f64) {
    let n = y.len() as f64;
    let m = y.iter().sum::<f64>() / n;
    let var = y.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (n - 1.0).max(1.0);
    let sd = var.sqrt();
    (
        m,
        if sd > 1e-12 * m.abs().max(1e-300) && sd > 0.0 {
            sd
        } else {
            1.0
        },
    )
}

/// The negative log posterior `−(ln p(y | θ) + ln p(θ))` and its gradient in `θ`.
struct Objective<'a> {
    kernel: Kernel,
    d: usize,
    n: usize,
    u: &'a [f64],
    ys: &'a [f64],
    mean: &'a dyn MeanFunction,
    /// Squared coordinate differences per pair `i > j` (column order), `[pair][k]`.
    diff2: Vec<f64>,
    ws: RefCell<ObjWs>,
}

#[derive(Default)]
struct ObjWs {
    k: Vec<f64>,
    l: Vec<f64>,
    m: Vec<f64>,
    kinv: Vec<f64>,
    kv: Vec<f64>,
    gv: Vec<f64>,
    alpha: Vec<f64>,
    mg: Vec<f64>,
    last: Option<(Vec<f64>, f64, Vec<f64>)>,
    best: Option<(f64, Vec<f64>)>,
    evals: usize,
}

impl<'a> Objective<'a> {
    fn new(
        kernel: Kernel,
        d: usize,
        u: &'a [f64],
        ys: &'a [f64],
        mean: &'a dyn MeanFunction,
    ) -> Self {
        let n = ys.len();
        let mut diff2 = Vec::with_capacity(n * n.saturating_sub(1) / 2 * d);
        for j in 0..n {
            for i in j + 1..n {
                for k in 0..d {
                    let t = u[i * d + k] - u[j * d + k];
                    diff2.push(t * t);
                }
            }
        }
        Self {
            kernel,
            d,
            n,
            u,
            ys,
            mean,
            diff2,
            ws: RefCell::new(ObjWs::default()),
        }
    }

    /// Objective and gradient (`+∞` and a zero gradient where the covariance is singular).
    fn eval(&self, theta: &[f64]) -> (f64, Vec<f64>) {
        let mut guard = self.ws.borrow_mut();
        let ws = &mut *guard;
        if let Some((t, f, g)) = &ws.last
            && t.as_slice() == theta
        {
            return (*f, g.clone());
        }
        let (f, g) = self.eval_uncached(theta, ws);
        ws.evals += 1;
        if f.is_finite() && ws.best.as_ref().is_none_or(|(bf, _)| f < *bf) {
            ws.best = Some((f, theta.to_vec()));
        }
        ws.last = Some((theta.to_vec(), f, g.clone()));
        (f, g)
    }

    fn eval_uncached(&self, theta: &[f64], ws: &mut ObjWs) -> (f64, Vec<f64>) {
        let (d, n) = (self.d, self.n);
        let np = theta.len();
        let bad = (f64::INFINITY, vec![0.0; np]);
        if theta.iter().any(|t| !t.is_finite()) {
            return bad;
        }
        let ls_inv2: Vec<f64> = theta[..d].iter().map(|z| (-2.0 * z).exp()).collect();
        let sf2 = theta[d].exp();
        let en = theta[d + 1].exp();
        let noise = NOISE_FLOOR + en;
        let phi = &theta[d + 2..];
        if !(sf2.is_finite() && noise.is_finite() && sf2 > 0.0)
            || ls_inv2.iter().any(|v| !v.is_finite())
        {
            return bad;
        }
        let npairs = self.diff2.len() / d.max(1);
        ws.k.clear();
        ws.k.resize(n * n, 0.0);
        ws.kv.clear();
        ws.kv.resize(npairs, 0.0);
        ws.gv.clear();
        ws.gv.resize(npairs, 0.0);
        let mut p = 0;
        for j in 0..n {
            ws.k[j + j * n] = sf2 + noise;
            for i in j + 1..n {
                let dd = &self.diff2[p * d..(p + 1) * d];
                let mut r2 = 0.0;
                for k in 0..d {
                    r2 += dd[k] * ls_inv2[k];
                }
                let (kv, gv) = self.kernel.eval(r2);
                ws.kv[p] = kv;
                ws.gv[p] = gv;
                ws.k[i + j * n] = sf2 * kv;
                p += 1;
            }
        }
        if linalg::cholesky_jitter(&ws.k, n, &mut ws.l, "GP marginal likelihood").is_err() {
            return bad;
        }
        ws.alpha.clear();
        for i in 0..n {
            ws.alpha
                .push(self.ys[i] - self.mean.value(&self.u[i * d..(i + 1) * d], phi));
        }
        linalg::solve_lower(&ws.l, n, &mut ws.alpha);
        let quad = linalg::dot(&ws.alpha, &ws.alpha);
        linalg::solve_lower_transpose(&ws.l, n, &mut ws.alpha);
        let logdet: f64 = (0..n).map(|i| ws.l[i + i * n].ln()).sum();
        let nll = 0.5 * quad + logdet + 0.5 * n as f64 * LN_2PI;

        linalg::lower_inverse(&ws.l, n, &mut ws.m);
        linalg::inverse_from_lower_inverse(&ws.m, n, &mut ws.kinv);
        // Gradient of the log marginal likelihood.
        let mut g_ls = vec![0.0; d];
        let mut g_sf = 0.0;
        let mut tr_w = 0.0;
        let alpha = &ws.alpha;
        let mut p = 0;
        for j in 0..n {
            let aj = alpha[j];
            tr_w += aj * aj - ws.kinv[j + j * n];
            let kcol = &ws.kinv[j * n..(j + 1) * n];
            for i in j + 1..n {
                let w = alpha[i] * aj - kcol[i];
                g_sf += w * ws.kv[p];
                let wg = w * ws.gv[p];
                let dd = &self.diff2[p * d..(p + 1) * d];
                for k in 0..d {
                    g_ls[k] += wg * dd[k];
                }
                p += 1;
            }
        }
        let mut grad = vec![0.0; np];
        for k in 0..d {
            grad[k] = sf2 * ls_inv2[k] * g_ls[k];
        }
        grad[d] = sf2 * (g_sf + 0.5 * tr_w);
        grad[d + 1] = 0.5 * en * tr_w;
        let nm = phi.len();
        if nm > 0 {
            ws.mg.clear();
            ws.mg.resize(nm, 0.0);
            for i in 0..n {
                self.mean
                    .gradient(&self.u[i * d..(i + 1) * d], phi, &mut ws.mg);
                for (g, m) in grad[d + 2..].iter_mut().zip(&ws.mg) {
                    *g += alpha[i] * m;
                }
            }
        }
        // Log prior and its gradient (added to the log likelihood's).
        let mu_ls = ls_prior_mu(d);
        let mut lp = 0.0;
        for k in 0..d {
            let t = theta[k] - mu_ls;
            lp -= t * t / (2.0 * LS_PRIOR_VAR);
            grad[k] -= t / LS_PRIOR_VAR;
        }
        lp -= 0.5 * theta[d] * theta[d];
        grad[d] -= theta[d];
        let t = theta[d + 1] - NOISE_PRIOR_MU;
        lp -= 0.5 * t * t;
        grad[d + 1] -= t;
        lp += self.mean.log_prior(phi);
        self.mean.add_log_prior_gradient(phi, &mut grad[d + 2..]);
        let f = nll - lp;
        if !f.is_finite() {
            return bad;
        }
        for g in &mut grad {
            *g = -*g;
        }
        (f, grad)
    }
}

/// argmin's view of the objective, scaled by `1/n` (well-sized first L-BFGS steps).
struct Problem<'o, 'a>(&'o Objective<'a>);

impl CostFunction for Problem<'_, '_> {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, p: &Vec<f64>) -> std::result::Result<f64, argmin::core::Error> {
        Ok(self.0.eval(p).0 / self.0.n as f64)
    }
}

impl Gradient for Problem<'_, '_> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;
    fn gradient(&self, p: &Vec<f64>) -> std::result::Result<Vec<f64>, argmin::core::Error> {
        let s = 1.0 / self.0.n as f64;
        Ok(self.0.eval(p).1.into_iter().map(|g| g * s).collect())
    }
}

fn run_lbfgs(obj: &Objective, x0: Vec<f64>, max_iters: u64) {
    let ls = MoreThuenteLineSearch::new();
    let Ok(solver) = LBFGS::new(ls, 7)
        .with_tolerance_grad(TOL_GRAD)
        .and_then(|s| s.with_tolerance_cost(TOL_COST))
    else {
        return;
    };
    // Failures (a line search that cannot progress) end this start; the best point evaluated
    // so far is kept by the objective.
    let _ = Executor::new(Problem(obj), solver)
        .configure(|s| s.param(x0).max_iters(max_iters))
        .run();
}

/// Repeated fits to a growing data set: each fit starts from the previous fit's
/// hyperparameters (plus [`GpConfig::warm_restarts`] random starts), except every
/// `refit_every`-th fit, which starts afresh (the default start plus [`GpConfig::restarts`]) so
/// that a stale local optimum of the likelihood is left. `refit_every = 0`: only the first fit
/// is cold.
#[derive(Debug, Clone)]
pub struct Refitter {
    /// The fit settings.
    pub config: GpConfig,
    /// Every this many fits, a cold fit.
    pub refit_every: usize,
    n_fits: usize,
    last: Option<Hyperparameters>,
}

impl Refitter {
    /// No fit yet (the first is cold).
    pub fn new(config: GpConfig, refit_every: usize) -> Self {
        Self {
            config,
            refit_every,
            n_fits: 0,
            last: None,
        }
    }

    /// Fits done so far.
    pub fn fits(&self) -> usize {
        self.n_fits
    }

    /// Forgets the previous hyperparameters (the next fit is cold).
    pub fn reset(&mut self) {
        self.n_fits = 0;
        self.last = None;
    }

    /// Fits a GP with `mean` to `(x, y)` in `bounds` (see [`Gp::fit_with_mean`]).
    pub fn fit(
        &mut self,
        mean: Arc<dyn MeanFunction>,
        bounds: &[(f64, f64)],
        x: &[Vec<f64>],
        y: &[f64],
        seed: u64,
    ) -> Result<Gp> {
        let cold =
            self.n_fits == 0 || (self.refit_every > 0 && self.n_fits % self.refit_every == 0);
        let warm = if cold { None } else { self.last.as_ref() };
        let gp = Gp::fit_with_mean(&self.config, mean, bounds, x, y, warm, seed)?;
        self.n_fits += 1;
        self.last = Some(gp.hyperparameters().clone());
        Ok(gp)
    }
}

impl Gp {
    /// Fits the hyperparameters (maximum a posteriori, see the module docs) with the constant
    /// mean and conditions on the data. `warm`: the previous fit's hyperparameters, used as the
    /// first start (then `config.warm_restarts` random restarts instead of `config.restarts`).
    pub fn fit(
        config: &GpConfig,
        bounds: &[(f64, f64)],
        x: &[Vec<f64>],
        y: &[f64],
        warm: Option<&Hyperparameters>,
        seed: u64,
    ) -> Result<Self> {
        Self::fit_with_mean(config, Arc::new(Constant), bounds, x, y, warm, seed)
    }

    /// [`Gp::fit`] with a given mean function.
    pub fn fit_with_mean(
        config: &GpConfig,
        mean: Arc<dyn MeanFunction>,
        bounds: &[(f64, f64)],
        x: &[Vec<f64>],
        y: &[f64],
        warm: Option<&Hyperparameters>,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        check_data(bounds, x, y)?;
        let d = bounds.len();
        let nm = mean.n_params();
        let mut u = Vec::with_capacity(x.len() * d);
        for xi in x {
            scale_into(bounds, xi, &mut u);
        }
        let (y_mean, y_sd) = standardize(y);
        let ys: Vec<f64> = y.iter().map(|v| (v - y_mean) / y_sd).collect();
        let urows: Vec<Vec<f64>> = u.chunks(d).map(<[f64]>::to_vec).collect();
        let mean_init = mean.initial(&urows, &ys);
        if mean_init.len() != nm {
            return Err(AgentError::arg(
                "mean",
                format!(
                    "initial() gave {} parameters, n_params() says {nm}",
                    mean_init.len()
                ),
            ));
        }
        let mu_ls = ls_prior_mu(d);
        let default_start = {
            let mut t = vec![mu_ls - LS_PRIOR_VAR; d];
            t.push(0.0);
            t.push(NOISE_PRIOR_MU);
            t.extend_from_slice(&mean_init);
            t
        };
        let mut starts = Vec::new();
        let extra = match warm {
            Some(h) if h.validate(d, nm).is_ok() => {
                starts.push(h.to_log());
                config.warm_restarts
            }
            _ => {
                starts.push(default_start.clone());
                config.restarts
            }
        };
        let mut rng = scopegym_envs::rng::seeded(seed);
        for _ in 0..extra {
            let mut t = Vec::with_capacity(d + 2 + nm);
            for _ in 0..d {
                let z: f64 = rng.sample(StandardNormal);
                t.push((mu_ls - LS_PRIOR_VAR + z).clamp(0.01f64.ln(), 10f64.ln()));
            }
            let z: f64 = rng.sample(StandardNormal);
            t.push(0.5 * z);
            let z: f64 = rng.sample(StandardNormal);
            t.push(NOISE_PRIOR_MU + z);
            t.extend_from_slice(&mean_init);
            starts.push(t);
        }
        let obj = Objective::new(config.kernel, d, &u, &ys, mean.as_ref());
        for s in starts {
            run_lbfgs(&obj, s, config.max_iters);
        }
        let best = obj.ws.borrow_mut().best.take();
        let Some((_, theta)) = best else {
            return Err(AgentError::numerical(
                "GP fit",
                "the marginal likelihood was not finite at any start",
            ));
        };
        let hyp = Hyperparameters::from_log(&theta, d);
        Self::build(config.kernel, mean, bounds, x, y, &hyp, (y_mean, y_sd))
    }

    /// Conditions on data with given hyperparameters (no fit). `standardization`: the output
    /// mean and standard deviation to use (`None`: those of `y`).
    pub fn with_hyperparameters(
        kernel: Kernel,
        mean: Arc<dyn MeanFunction>,
        bounds: &[(f64, f64)],
        x: &[Vec<f64>],
        y: &[f64],
        hyp: &Hyperparameters,
        standardization: Option<(f64, f64)>,
    ) -> Result<Self> {
        check_data(bounds, x, y)?;
        hyp.validate(bounds.len(), mean.n_params())?;
        let st = match standardization {
            Some((m, s)) if m.is_finite() && s.is_finite() && s > 0.0 => (m, s),
            Some(_) => {
                return Err(AgentError::arg(
                    "standardization",
                    "need a finite mean and sd > 0",
                ));
            }
            None => standardize(y),
        };
        Self::build(kernel, mean, bounds, x, y, hyp, st)
    }

    fn build(
        kernel: Kernel,
        mean: Arc<dyn MeanFunction>,
        bounds: &[(f64, f64)],
        x: &[Vec<f64>],
        y: &[f64],
        hyp: &Hyperparameters,
        (y_mean, y_sd): (f64, f64),
    ) -> Result<Self> {
        let d = bounds.len();
        let n = x.len();
        let mut u = Vec::with_capacity(n * d);
        for xi in x {
            scale_into(bounds, xi, &mut u);
        }
        let mut u_ls = u.clone();
        for row in u_ls.chunks_mut(d) {
            for (v, l) in row.iter_mut().zip(&hyp.lengthscales) {
                *v /= l;
            }
        }
        let ys: Vec<f64> = y.iter().map(|v| (v - y_mean) / y_sd).collect();
        let sf2 = hyp.output_scale;
        let mut k = vec![0.0; n * n];
        for j in 0..n {
            k[j + j * n] = sf2 + hyp.noise;
            for i in j + 1..n {
                let r2 = sqdist(&u_ls[i * d..(i + 1) * d], &u_ls[j * d..(j + 1) * d]);
                k[i + j * n] = sf2 * kernel.eval(r2).0;
            }
        }
        let mut l = Vec::new();
        let jitter = linalg::cholesky_jitter(&k, n, &mut l, "GP posterior")?;
        let mut m = Vec::new();
        linalg::lower_inverse(&l, n, &mut m);
        let linv = DMatrix::from_vec(n, n, m);
        let resid: Vec<f64> = (0..n)
            .map(|i| ys[i] - mean.value(&u[i * d..(i + 1) * d], &hyp.mean))
            .collect();
        let mut gp = Self {
            kernel,
            mean,
            bounds: bounds.to_vec(),
            d,
            n,
            x: x.to_vec(),
            y: y.to_vec(),
            u,
            u_ls,
            ys,
            y_mean,
            y_sd,
            hyp: hyp.clone(),
            diag_noise: hyp.noise + jitter,
            jitter,
            l,
            linv,
            resid,
            alpha: Vec::new(),
            log_posterior: f64::NAN,
        };
        gp.refresh_alpha();
        Ok(gp)
    }

    fn refresh_alpha(&mut self) {
        let n = self.n;
        self.alpha.clone_from(&self.resid);
        linalg::solve_lower(&self.l, n, &mut self.alpha);
        let quad = linalg::dot(&self.alpha, &self.alpha);
        linalg::solve_lower_transpose(&self.l, n, &mut self.alpha);
        let logdet: f64 = (0..n).map(|i| self.l[i + i * n].ln()).sum();
        self.log_posterior = -(0.5 * quad + logdet + 0.5 * n as f64 * LN_2PI);
    }

    /// Adds one observation keeping the hyperparameters and the output standardization:
    /// the Cholesky factor and its inverse grow by one row (`O(n²)`).
    pub fn add_point(&mut self, x: &[f64], y: f64) -> Result<()> {
        let d = self.d;
        if x.len() != d || x.iter().any(|v| !v.is_finite()) {
            return Err(AgentError::arg("x", format!("need {d} finite coordinates")));
        }
        if !y.is_finite() {
            return Err(AgentError::arg("y", format!("value is {y}")));
        }
        let n = self.n;
        let mut un = Vec::with_capacity(d);
        scale_into(&self.bounds, x, &mut un);
        let uls: Vec<f64> = un
            .iter()
            .zip(&self.hyp.lengthscales)
            .map(|(v, l)| v / l)
            .collect();
        let sf2 = self.hyp.output_scale;
        let mut kv: Vec<f64> = (0..n)
            .map(|i| {
                sf2 * self
                    .kernel
                    .eval(sqdist(&self.u_ls[i * d..(i + 1) * d], &uls))
                    .0
            })
            .collect();
        linalg::solve_lower(&self.l, n, &mut kv);
        let d2 = sf2 + self.diag_noise - linalg::dot(&kv, &kv);
        let ys_new = (y - self.y_mean) / self.y_sd;
        let resid_new = ys_new - self.mean.value(&un, &self.hyp.mean);
        self.x.push(x.to_vec());
        self.y.push(y);
        self.u.extend_from_slice(&un);
        self.u_ls.extend_from_slice(&uls);
        self.ys.push(ys_new);
        self.resid.push(resid_new);
        if !(d2 > 1e-12 * (sf2 + self.diag_noise)) {
            // Numerically dependent on the data: refactorize with jitter escalation.
            let rebuilt = Self::build(
                self.kernel,
                self.mean.clone(),
                &self.bounds,
                &self.x,
                &self.y,
                &self.hyp,
                (self.y_mean, self.y_sd),
            )?;
            *self = rebuilt;
            return Ok(());
        }
        let dn = d2.sqrt();
        let n1 = n + 1;
        let mut l = vec![0.0; n1 * n1];
        for j in 0..n {
            l[j * n1..j * n1 + n].copy_from_slice(&self.l[j * n..(j + 1) * n]);
            l[n + j * n1] = kv[j];
        }
        l[n + n * n1] = dn;
        // Last row of the new inverse: −(l₁₂ᵀ L⁻¹)/d, with L⁻¹ lower triangular.
        let mut linv = DMatrix::zeros(n1, n1);
        {
            let old = self.linv.as_slice();
            let new = linv.as_mut_slice();
            for j in 0..n {
                let col = &old[j * n..(j + 1) * n];
                new[j * n1..j * n1 + n].copy_from_slice(col);
                new[n + j * n1] = -linalg::dot(&col[j..], &kv[j..]) / dn;
            }
            new[n + n * n1] = 1.0 / dn;
        }
        self.l = l;
        self.linv = linv;
        self.n = n1;
        self.refresh_alpha();
        Ok(())
    }

    /// Posterior mean and variance (of the latent function, without noise) at `xs`, in the
    /// caller's units.
    pub fn predict(&self, xs: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
        let mut ws = PredictWorkspace::default();
        let (mut m, mut v) = (Vec::new(), Vec::new());
        self.predict_into(xs, &mut ws, &mut m, &mut v);
        (m, v)
    }

    /// [`Gp::predict`] into given buffers, reusing `ws` (one `L⁻¹ K*` product per block of
    /// 512 candidates; rows of `L⁻¹` in four bands so that its zero upper triangle is mostly
    /// skipped). Coordinates of `xs` beyond the GP's dimension are ignored; missing ones are 0.
    pub fn predict_into(
        &self,
        xs: &[Vec<f64>],
        ws: &mut PredictWorkspace,
        mean: &mut Vec<f64>,
        var: &mut Vec<f64>,
    ) {
        mean.clear();
        var.clear();
        let (n, d) = (self.n, self.d);
        let sf2 = self.hyp.output_scale;
        let s2 = self.y_sd * self.y_sd;
        for chunk in xs.chunks(BLOCK) {
            let c = chunk.len();
            if ws.kstar.nrows() != n || ws.kstar.ncols() < c {
                ws.kstar = DMatrix::zeros(n, c.max(BLOCK.min(xs.len())));
                ws.v = DMatrix::zeros(n, ws.kstar.ncols());
            }
            for (j, x) in chunk.iter().enumerate() {
                ws.q.clear();
                for k in 0..d {
                    let (lo, hi) = self.bounds[k];
                    let v = x.get(k).copied().unwrap_or(0.0);
                    ws.q.push((v - lo) / (hi - lo) / self.hyp.lengthscales[k]);
                }
                let col = &mut ws.kstar.as_mut_slice()[j * n..(j + 1) * n];
                for (i, cv) in col.iter_mut().enumerate() {
                    *cv = sf2
                        * self
                            .kernel
                            .eval(sqdist(&self.u_ls[i * d..(i + 1) * d], &ws.q))
                            .0;
                }
                let mut uq = ws.q.clone();
                for (v, l) in uq.iter_mut().zip(&self.hyp.lengthscales) {
                    *v *= l;
                }
                let mu = self.mean.value(&uq, &self.hyp.mean) + linalg::dot(col, &self.alpha);
                mean.push(self.y_mean + self.y_sd * mu);
            }
            let kstar = ws.kstar.columns(0, c);
            let bands = 4.min(n.max(1));
            for b in 0..bands {
                let r0 = b * n / bands;
                let r1 = (b + 1) * n / bands;
                if r1 == r0 {
                    continue;
                }
                let mut vb = ws.v.view_mut((r0, 0), (r1 - r0, c));
                vb.gemm(
                    1.0,
                    &self.linv.view((r0, 0), (r1 - r0, r1)),
                    &kstar.rows(0, r1),
                    0.0,
                );
            }
            let vs = ws.v.as_slice();
            for j in 0..c {
                let col = &vs[j * n..(j + 1) * n];
                var.push(s2 * (sf2 - linalg::dot(col, col)).max(0.0));
            }
        }
    }

    /// Joint posterior draws of the latent function at `xs` (caller's units): `n_samples`
    /// vectors of `xs.len()` values, from the Cholesky factor of the posterior covariance
    /// (with jitter escalation).
    pub fn sample_joint(
        &self,
        xs: &[Vec<f64>],
        n_samples: usize,
        rng: &mut impl Rng,
    ) -> Result<Vec<Vec<f64>>> {
        let m = xs.len();
        let (n, d) = (self.n, self.d);
        if m == 0 {
            return Ok(vec![Vec::new(); n_samples]);
        }
        let (mu, _) = self.predict(xs);
        let sf2 = self.hyp.output_scale;
        let q: Vec<f64> = xs
            .iter()
            .flat_map(|x| {
                (0..d).map(move |k| {
                    let (lo, hi) = self.bounds[k];
                    (x.get(k).copied().unwrap_or(0.0) - lo) / (hi - lo) / self.hyp.lengthscales[k]
                })
            })
            .collect();
        let mut kstar = DMatrix::zeros(n, m);
        for j in 0..m {
            for i in 0..n {
                kstar[(i, j)] = sf2
                    * self
                        .kernel
                        .eval(sqdist(
                            &self.u_ls[i * d..(i + 1) * d],
                            &q[j * d..(j + 1) * d],
                        ))
                        .0;
            }
        }
        let v = &self.linv * &kstar;
        let vt = v.transpose();
        let mut cov = DMatrix::zeros(m, m);
        for j in 0..m {
            for i in j..m {
                let r2 = sqdist(&q[i * d..(i + 1) * d], &q[j * d..(j + 1) * d]);
                cov[(i, j)] = sf2 * self.kernel.eval(r2).0;
            }
        }
        cov.gemm(-1.0, &vt, &v, 1.0);
        let mut l = Vec::new();
        linalg::cholesky_jitter(cov.as_slice(), m, &mut l, "Thompson sample covariance")?;
        let mut out = Vec::with_capacity(n_samples);
        let mut z = vec![0.0; m];
        for _ in 0..n_samples {
            for zi in &mut z {
                *zi = StandardNormal.sample(rng);
            }
            let mut f = mu.clone();
            for k in 0..m {
                let zk = self.y_sd * z[k];
                linalg::axpy(zk, &l[k * m + k..(k + 1) * m], &mut f[k..]);
            }
            out.push(f);
        }
        Ok(out)
    }

    /// The hyperparameters.
    pub fn hyperparameters(&self) -> &Hyperparameters {
        &self.hyp
    }

    /// The output standardization `(mean, standard deviation)` in the caller's units.
    pub fn standardization(&self) -> (f64, f64) {
        (self.y_mean, self.y_sd)
    }

    /// The log marginal likelihood of the standardized outputs at the current
    /// hyperparameters (without priors).
    pub fn log_marginal_likelihood(&self) -> f64 {
        self.log_posterior
    }

    /// The absolute diagonal jitter the Cholesky factorization needed (standardized units).
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Number of observations.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The observed inputs.
    pub fn x(&self) -> &[Vec<f64>] {
        &self.x
    }

    /// The observed outputs (caller's units).
    pub fn y(&self) -> &[f64] {
        &self.y
    }

    /// The input bounds.
    pub fn bounds(&self) -> &[(f64, f64)] {
        &self.bounds
    }

    /// The kernel.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }
}

#[inline]
fn sqdist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

#[cfg(test)]
mod tests;
