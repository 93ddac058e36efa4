//! Bayesian optimization (maximization) over a box or a finite candidate set, on the pure-Rust
//! [`Gp`](crate::gp::Gp) (DESIGN.md §9), and a scikit-optimize-style [`minimize`].
//!
//! The loop: `n_initial` space-filling points (a seeded Latin hypercube), then at every
//! [`BayesOpt::ask`] a GP fit (warm-started from the previous hyperparameters) and the
//! maximization of the acquisition:
//! - over a box: `n_candidates` uniform random candidates, then the best `n_local` of them are
//!   refined by projected gradient ascent inside the bounds (gradient by central finite
//!   differences of the acquisition in unit-scaled coordinates, step halving until the
//!   acquisition improves); Thompson sampling instead draws one joint posterior sample over
//!   `min(n_candidates, thompson_candidates)` random candidates and takes its maximizer;
//! - over a finite set ([`BayesOpt::suggest_from`]): the acquisition (or a joint Thompson
//!   draw) at every candidate not excluded.
//!
//! Batches of `q > 1` points: Thompson sampling takes the maximizers of `q` independent joint
//! draws; the other acquisitions use the Kriging believer (the posterior mean at each chosen
//! point is added as a fantasy observation with the hyperparameters kept, by the `O(n²)`
//! incremental update, before the next point is chosen).
//!
//! ```
//! use scopegym_agents::bo::minimize;
//! use scopegym_agents::acquisition::Acquisition;
//! let r = minimize(|x| (x[0] - 0.3).powi(2), &[(-1.0, 1.0)], 5, 15, Acquisition::LogEi, 0).unwrap();
//! assert!((r.x[0] - 0.3).abs() < 0.05, "{:?}", r.x);
//! assert_eq!(r.func_vals.len(), 15);
//! ```

use crate::acquisition::Acquisition;
use crate::error::{AgentError, Result};
use crate::gp::{
    Constant, Gp, GpConfig, Kernel, MeanFunction, PredictWorkspace, Refitter, check_bounds,
};
use rand::Rng;
use rand::seq::SliceRandom;
use scopegym_envs::rng::SimRng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Bayesian-optimization settings (`[bo]` in agent configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BoConfig {
    /// GP kernel (default Matérn-5/2).
    pub kernel: Kernel,
    /// Acquisition function (default LogEI).
    pub acquisition: Acquisition,
    /// Space-filling initial points before the first fit (default 10).
    pub n_initial: usize,
    /// Random L-BFGS restarts of a cold GP fit (default 4).
    pub restarts: usize,
    /// Random restarts besides the warm start in later fits (default 0).
    pub warm_restarts: usize,
    /// Every this many fits, a cold fit (default start plus `restarts`) instead of a
    /// warm-started one, so that a stale local optimum of the likelihood is left (default 10;
    /// 0: always warm after the first).
    pub refit_every: usize,
    /// L-BFGS iterations per start (default 50).
    pub max_iters: u64,
    /// Improvement margin ξ of EI/LogEI/PI, in output units (default 0).
    pub xi: f64,
    /// Points per [`BayesOpt::ask`] (default 1).
    pub q: usize,
    /// Random seed (default 0).
    pub seed: u64,
    /// Random candidates scored in a box (default 2000).
    pub n_candidates: usize,
    /// Best candidates refined locally (default 5).
    pub n_local: usize,
    /// Projected-gradient iterations per local refinement (default 30).
    pub local_iters: usize,
    /// Candidates of a joint Thompson draw in a box (default 500).
    pub thompson_candidates: usize,
}

impl Default for BoConfig {
    fn default() -> Self {
        Self {
            kernel: Kernel::Matern52,
            acquisition: Acquisition::LogEi,
            n_initial: 10,
            restarts: 4,
            warm_restarts: 0,
            refit_every: 10,
            max_iters: 50,
            xi: 0.0,
            q: 1,
            seed: 0,
            n_candidates: 2000,
            n_local: 5,
            local_iters: 30,
            thompson_candidates: 500,
        }
    }
}

impl BoConfig {
    /// Checks every field (the error names it).
    pub fn validate(&self) -> Result<()> {
        if self.n_initial == 0 {
            return Err(AgentError::config("n_initial", "must be at least 1"));
        }
        if self.q == 0 || self.q > 1000 {
            return Err(AgentError::config("q", "must be in 1..=1000"));
        }
        if !self.xi.is_finite() || self.xi < 0.0 {
            return Err(AgentError::config("xi", "must be finite and ≥ 0"));
        }
        if self.n_candidates == 0 {
            return Err(AgentError::config("n_candidates", "must be at least 1"));
        }
        if self.thompson_candidates == 0 {
            return Err(AgentError::config(
                "thompson_candidates",
                "must be at least 1",
            ));
        }
        if let Acquisition::Ucb { beta } = self.acquisition
            && !(beta.is_finite() && beta >= 0.0)
        {
            return Err(AgentError::config(
                "acquisition",
                "ucb beta must be finite and ≥ 0",
            ));
        }
        self.gp_config().validate()
    }

    /// The GP fit settings.
    pub fn gp_config(&self) -> GpConfig {
        GpConfig {
            kernel: self.kernel,
            restarts: self.restarts,
            warm_restarts: self.warm_restarts,
            max_iters: self.max_iters,
        }
    }
}

/// Ask/tell Bayesian optimizer (maximization).
#[derive(Debug)]
pub struct BayesOpt {
    config: BoConfig,
    bounds: Vec<(f64, f64)>,
    mean: Arc<dyn MeanFunction>,
    x: Vec<Vec<f64>>,
    y: Vec<f64>,
    design: Vec<Vec<f64>>,
    next_design: usize,
    rng: SimRng,
    refitter: Refitter,
    gp: Option<Gp>,
    ws: PredictWorkspace,
}

/// Latin hypercube of `n` points in the unit cube.
fn latin_hypercube(n: usize, d: usize, rng: &mut SimRng) -> Vec<Vec<f64>> {
    let mut pts = vec![vec![0.0; d]; n];
    let mut perm: Vec<usize> = (0..n).collect();
    for k in 0..d {
        perm.shuffle(rng);
        for (i, p) in pts.iter_mut().enumerate() {
            p[k] = (perm[i] as f64 + rng.random::<f64>()) / n as f64;
        }
    }
    pts
}

impl BayesOpt {
    /// A new optimizer over the box `bounds` (one `(lo, hi)` per dimension) with the constant
    /// mean.
    pub fn new(bounds: &[(f64, f64)], config: BoConfig) -> Result<Self> {
        config.validate()?;
        check_bounds(bounds)?;
        let mut rng = scopegym_envs::rng::seeded(config.seed);
        let d = bounds.len();
        let design = latin_hypercube(config.n_initial, d, &mut rng)
            .into_iter()
            .map(|u| from_unit(bounds, &u))
            .collect();
        let refitter = Refitter::new(config.gp_config(), config.refit_every);
        Ok(Self {
            config,
            refitter,
            bounds: bounds.to_vec(),
            mean: Arc::new(Constant),
            x: Vec::new(),
            y: Vec::new(),
            design,
            next_design: 0,
            rng,
            gp: None,
            ws: PredictWorkspace::default(),
        })
    }

    /// Uses a parametric GP mean (the structured GP) instead of the constant.
    pub fn with_mean(mut self, mean: Arc<dyn MeanFunction>) -> Self {
        self.mean = mean;
        self.refitter.reset();
        self.gp = None;
        self
    }

    /// The settings.
    pub fn config(&self) -> &BoConfig {
        &self.config
    }

    /// Records an observation `y = f(x)`.
    pub fn tell(&mut self, x: Vec<f64>, y: f64) -> Result<()> {
        if x.len() != self.bounds.len() || x.iter().any(|v| !v.is_finite()) {
            return Err(AgentError::arg(
                "x",
                format!("need {} finite coordinates", self.bounds.len()),
            ));
        }
        if !y.is_finite() {
            return Err(AgentError::arg("y", format!("objective value is {y}")));
        }
        self.x.push(x);
        self.y.push(y);
        self.gp = None;
        Ok(())
    }

    /// The best observation so far `(x, y)`.
    pub fn best(&self) -> Option<(&[f64], f64)> {
        let i = (0..self.y.len()).max_by(|&a, &b| self.y[a].total_cmp(&self.y[b]))?;
        Some((&self.x[i], self.y[i]))
    }

    /// The observations so far.
    pub fn observations(&self) -> (&[Vec<f64>], &[f64]) {
        (&self.x, &self.y)
    }

    /// The GP fitted at the last suggestion (if any).
    pub fn gp(&self) -> Option<&Gp> {
        self.gp.as_ref()
    }

    /// Fits the GP on the observations (warm-started), if not already fitted.
    pub fn fit(&mut self) -> Result<&Gp> {
        if self.gp.is_none() {
            if self.x.is_empty() {
                return Err(AgentError::arg("observations", "no data to fit"));
            }
            let seed = self.config.seed ^ (self.x.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let gp = self
                .refitter
                .fit(self.mean.clone(), &self.bounds, &self.x, &self.y, seed)?;
            self.gp = Some(gp);
        }
        Ok(self.gp.as_ref().expect("fitted above"))
    }

    /// The next `config.q` points to evaluate in the box.
    pub fn ask(&mut self) -> Result<Vec<Vec<f64>>> {
        let q = self.config.q;
        let mut out = Vec::with_capacity(q);
        while out.len() < q && self.next_design < self.design.len() {
            out.push(self.design[self.next_design].clone());
            self.next_design += 1;
        }
        if out.len() == q {
            return Ok(out);
        }
        if self.x.is_empty() {
            // Everything asked is pending: more random points.
            while out.len() < q {
                let u: Vec<f64> = (0..self.bounds.len()).map(|_| self.rng.random()).collect();
                out.push(from_unit(&self.bounds, &u));
            }
            return Ok(out);
        }
        self.fit()?;
        let mut gp = self.gp.clone().expect("fitted");
        let d = self.bounds.len();
        let acq = self.config.acquisition;
        let mut best = self.y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if acq == Acquisition::Thompson {
            let m = self
                .config
                .n_candidates
                .min(self.config.thompson_candidates);
            let cands: Vec<Vec<f64>> = (0..m)
                .map(|_| {
                    from_unit(
                        &self.bounds,
                        &(0..d).map(|_| self.rng.random()).collect::<Vec<f64>>(),
                    )
                })
                .collect();
            let draws = gp.sample_joint(&cands, q - out.len(), &mut self.rng)?;
            for f in draws {
                out.push(cands[argmax(&f)].clone());
            }
            return Ok(out);
        }
        while out.len() < q {
            let x = self.maximize_acquisition(&gp, best)?;
            if out.len() + 1 < q {
                let (mu, _) = gp.predict(std::slice::from_ref(&x));
                gp.add_point(&x, mu[0])?;
                best = best.max(mu[0]);
            }
            out.push(x);
        }
        Ok(out)
    }

    fn scores(&mut self, gp: &Gp, xs: &[Vec<f64>], best: f64, out: &mut Vec<f64>) {
        let (mut mu, mut var) = (Vec::new(), Vec::new());
        gp.predict_into(xs, &mut self.ws, &mut mu, &mut var);
        out.clear();
        let acq = self.config.acquisition;
        for (m, v) in mu.iter().zip(&var) {
            let s = acq
                .score(*m, v.sqrt(), best, self.config.xi)
                .unwrap_or(f64::NEG_INFINITY);
            out.push(if s.is_nan() { f64::NEG_INFINITY } else { s });
        }
    }

    fn maximize_acquisition(&mut self, gp: &Gp, best: f64) -> Result<Vec<f64>> {
        let d = self.bounds.len();
        let units: Vec<Vec<f64>> = (0..self.config.n_candidates)
            .map(|_| (0..d).map(|_| self.rng.random()).collect())
            .collect();
        let cands: Vec<Vec<f64>> = units.iter().map(|u| from_unit(&self.bounds, u)).collect();
        let mut sc = Vec::new();
        self.scores(gp, &cands, best, &mut sc);
        let mut order: Vec<usize> = (0..cands.len()).collect();
        order.sort_by(|&a, &b| sc[b].total_cmp(&sc[a]));
        let mut best_u = units[order[0]].clone();
        let mut best_s = sc[order[0]];
        for &i in order.iter().take(self.config.n_local) {
            let (u, s) = self.refine(gp, best, units[i].clone(), sc[i]);
            if s > best_s {
                best_s = s;
                best_u = u;
            }
        }
        Ok(from_unit(&self.bounds, &best_u))
    }

    /// Projected gradient ascent in unit coordinates with finite-difference gradients.
    fn refine(&mut self, gp: &Gp, best: f64, mut u: Vec<f64>, mut s: f64) -> (Vec<f64>, f64) {
        let d = u.len();
        let h = 1e-6;
        let mut step = 0.05;
        let mut sc = Vec::new();
        for _ in 0..self.config.local_iters {
            // Central differences (one-sided at the bounds), all 2d points in one batch.
            let mut pts = Vec::with_capacity(2 * d);
            for k in 0..d {
                let mut a = u.clone();
                let mut b = u.clone();
                a[k] = (u[k] + h).min(1.0);
                b[k] = (u[k] - h).max(0.0);
                pts.push(from_unit(&self.bounds, &a));
                pts.push(from_unit(&self.bounds, &b));
            }
            self.scores(gp, &pts, best, &mut sc);
            let mut g = vec![0.0; d];
            for k in 0..d {
                let du = (u[k] + h).min(1.0) - (u[k] - h).max(0.0);
                g[k] = if du > 0.0 {
                    (sc[2 * k] - sc[2 * k + 1]) / du
                } else {
                    0.0
                };
                if !g[k].is_finite() {
                    g[k] = 0.0;
                }
            }
            let gn = g.iter().map(|v| v * v).sum::<f64>().sqrt();
            if gn < 1e-12 {
                break;
            }
            let mut improved = false;
            while step > 1e-7 {
                let cand: Vec<f64> = (0..d)
                    .map(|k| (u[k] + step * g[k] / gn).clamp(0.0, 1.0))
                    .collect();
                self.scores(gp, &[from_unit(&self.bounds, &cand)], best, &mut sc);
                if sc[0] > s {
                    u = cand;
                    s = sc[0];
                    improved = true;
                    step *= 2.0;
                    break;
                }
                step *= 0.5;
            }
            if !improved {
                break;
            }
        }
        (u, s)
    }

    /// Chooses `q` distinct indices among a finite candidate set (each candidate a point in
    /// the box), skipping those with `exclude[i] == true`. Before `n_initial` observations,
    /// seeded random picks; then the acquisition's maximizers (Kriging believer for `q > 1`),
    /// or the maximizers of `q` joint Thompson draws over the allowed candidates.
    pub fn suggest_from(
        &mut self,
        candidates: &[Vec<f64>],
        q: usize,
        exclude: Option<&[bool]>,
    ) -> Result<Vec<usize>> {
        let d = self.bounds.len();
        if let Some(e) = exclude
            && e.len() != candidates.len()
        {
            return Err(AgentError::arg(
                "exclude",
                format!("{} flags for {} candidates", e.len(), candidates.len()),
            ));
        }
        if let Some(i) = candidates
            .iter()
            .position(|c| c.len() != d || c.iter().any(|v| !v.is_finite()))
        {
            return Err(AgentError::arg(
                "candidates",
                format!("candidate {i}: need {d} finite coordinates"),
            ));
        }
        let mut allowed: Vec<usize> = (0..candidates.len())
            .filter(|&i| !exclude.is_some_and(|e| e[i]))
            .collect();
        if allowed.len() < q {
            return Err(AgentError::arg(
                "candidates",
                format!("{} allowed candidates for q = {q}", allowed.len()),
            ));
        }
        let mut out = Vec::with_capacity(q);
        if self.x.len() < self.config.n_initial {
            allowed.shuffle(&mut self.rng);
            out.extend_from_slice(&allowed[..q]);
            return Ok(out);
        }
        self.fit()?;
        let mut gp = self.gp.clone().expect("fitted");
        let pts: Vec<Vec<f64>> = allowed.iter().map(|&i| candidates[i].clone()).collect();
        if self.config.acquisition == Acquisition::Thompson {
            let draws = gp.sample_joint(&pts, q, &mut self.rng)?;
            let mut taken = vec![false; pts.len()];
            for f in draws {
                let j = (0..pts.len())
                    .filter(|&j| !taken[j])
                    .max_by(|&a, &b| f[a].total_cmp(&f[b]))
                    .expect("enough candidates");
                taken[j] = true;
                out.push(allowed[j]);
            }
            return Ok(out);
        }
        let mut best = self.y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut taken = vec![false; pts.len()];
        let mut sc = Vec::new();
        while out.len() < q {
            self.scores(&gp, &pts, best, &mut sc);
            let j = (0..pts.len())
                .filter(|&j| !taken[j])
                .max_by(|&a, &b| sc[a].total_cmp(&sc[b]))
                .expect("enough candidates");
            taken[j] = true;
            out.push(allowed[j]);
            if out.len() < q {
                let (mu, _) = gp.predict(std::slice::from_ref(&pts[j]));
                gp.add_point(&pts[j], mu[0])?;
                best = best.max(mu[0]);
            }
        }
        Ok(out)
    }
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]))
        .unwrap_or(0)
}

fn from_unit(bounds: &[(f64, f64)], u: &[f64]) -> Vec<f64> {
    u.iter()
        .zip(bounds)
        .map(|(v, &(lo, hi))| (lo + v * (hi - lo)).clamp(lo, hi))
        .collect()
}

/// The result of [`minimize`], named as scipy's `OptimizeResult`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizeResult {
    /// The best point found.
    pub x: Vec<f64>,
    /// `f(x)` there.
    pub fun: f64,
    /// Every evaluated point, in order.
    pub x_iters: Vec<Vec<f64>>,
    /// `f` at each evaluated point.
    pub func_vals: Vec<f64>,
}

/// Minimizes a black-box `f` over the box `bounds` with GP-BO, like scikit-optimize's
/// `gp_minimize`: `n_calls` evaluations in all, the first `n_initial` of them a Latin
/// hypercube. A non-finite `f` value is an error naming the point.
pub fn minimize(
    mut f: impl FnMut(&[f64]) -> f64,
    bounds: &[(f64, f64)],
    n_initial: usize,
    n_calls: usize,
    acquisition: Acquisition,
    seed: u64,
) -> Result<OptimizeResult> {
    if n_initial == 0 || n_calls < n_initial {
        return Err(AgentError::arg(
            "n_calls",
            format!(
                "need 1 ≤ n_initial ≤ n_calls, got n_initial = {n_initial}, n_calls = {n_calls}"
            ),
        ));
    }
    let config = BoConfig {
        acquisition,
        n_initial,
        seed,
        ..BoConfig::default()
    };
    let mut bo = BayesOpt::new(bounds, config)?;
    let mut x_iters = Vec::with_capacity(n_calls);
    let mut func_vals = Vec::with_capacity(n_calls);
    while func_vals.len() < n_calls {
        for x in bo.ask()? {
            let v = f(&x);
            if !v.is_finite() {
                return Err(AgentError::numerical(
                    "minimize",
                    format!("objective returned {v} at {x:?}"),
                ));
            }
            bo.tell(x.clone(), -v)?;
            x_iters.push(x);
            func_vals.push(v);
        }
    }
    let i = (0..func_vals.len())
        .min_by(|&a, &b| func_vals[a].total_cmp(&func_vals[b]))
        .expect("n_calls ≥ 1");
    Ok(OptimizeResult {
        x: x_iters[i].clone(),
        fun: func_vals[i],
        x_iters,
        func_vals,
    })
}

#[cfg(test)]
mod tests;
