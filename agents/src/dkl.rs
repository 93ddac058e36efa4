//! Deep kernel learning (DKL, Wilson et al. 2016) as an active-learning agent for the explore
//! tasks (PfmSpectroscopyExplore, StemEelsExplore): structure (the overview patch of each
//! candidate point) → property (the scalarized spectrum or loop), as in GPax/AEcroscopy and
//! DTMicroscope (DESIGN.md §9). Feature `torch` (libtorch through tch).
//!
//! **Model** ([`DklModel`]): an exact Gaussian process on learned features `z = g(x)`,
//!
//! - `g`: an MLP `d → hidden → hidden → feature_dim` with ReLU (defaults 64, 64, 2), `x` the
//!   candidate's input ([`Inputs`]): the flattened patch (`d = patch²`, 16 by default), each
//!   pixel standardized over the candidates of the episode; optionally with the two grid
//!   coordinates appended (scaled to `[-1, 1]`);
//! - kernel `k(z, z') = s² exp(−|z − z'|² / (2ℓ²))` (RBF, one lengthscale), constant mean `m`,
//!   Gaussian noise `σ²` (plus a fixed `jitter`);
//! - outputs: the measured values, standardized (mean 0, sd 1 over the measured points);
//! - training: the MLP weights and `ln s`, `ln ℓ`, `ln σ`, `m` jointly, by minimizing the
//!   negative log marginal likelihood per point, `[½ rᵀK_y⁻¹r + ½ ln|K_y|] / n + ½ ln 2π` with
//!   `r = y − m`, `K_y = K + (σ² + jitter) I`, with Adam (`lr`, `epochs_initial` for the first
//!   fit, then `epochs_step` per measurement, warm-started from the previous parameters, Adam
//!   state included); all in f64, Cholesky with the jitter multiplied by 10 (up to 6 times)
//!   where the factorization fails.
//!
//! With `inputs = "coordinates"` the MLP is replaced by the identity on the two grid
//! coordinates scaled to `[0, 1]`: a plain RBF GP on position, fitted by the same code (the
//! ablation the DKL is compared against).
//!
//! **Agent** ([`DklAgent`]): reads only the observation: `patches` (`(n, p, p)`; not needed with
//! `inputs = "coordinates"`), `measured_value` and `measured_count` (`(g, g)`, `n = g²` the
//! action space's size: action `k` is grid point `row · g + column`), and `pristine` where the
//! observation has it. The first `n_initial` points are drawn uniformly (seeded by the episode
//! seed) among the unmeasured candidates; afterwards, each step refits the model on the
//! measured points (`measured_count > 0`, values `measured_value`: the mean of the readings at a
//! point) and measures the unmeasured candidate with the largest acquisition
//! ([`Acquisition`]: default UCB, β = 4; Thompson sampling is not offered, as it would need a joint
//! draw over all candidates). On PfmSpectroscopyExplore the candidates are restricted to the
//! `pristine` points (where a loop still counts: the film there is as grown); once none is
//! left, to all unmeasured points (nothing counts any more then, so the choice no longer
//! matters for the score). Every measured point enters the fit, counted or not (the
//! observation does not say which counted).
//!
//! **Operator** (`scopegym serve`): [`Agent::veto`] and [`Agent::forbid`] take cells out of the
//! candidates for the rest of the run (as the `bo` agent does: they are never proposed);
//! [`Agent::set_control`] changes `acquisition`, `beta` (UCB's β) and `xi` (ξ, standardized
//! output units). Asked again for the same measurements (after an intervention), the agent
//! rescores without refitting. [`Agent::insight`] shows what the last [`Agent::act`] computed:
//! the posterior mean and standard deviation over the whole grid (in the units of
//! `measured_value`), the acquisition (−∞ where a cell is not a candidate: measured, not
//! pristine while pristine cells remain, vetoed or off-limits), and the embedding scatter:
//! the learned features `z = g(x)` of each measured point's input, as they are where
//! `feature_dim ≤ 2` (a zero second axis for 1), else projected onto their first two principal
//! components (over the measured points), each row with the `measured_value` the agent read.
//! With `inputs = "coordinates"` the scatter axes are the grid row and column (fractions).
//!
//! ```
//! use scopegym_agents::dkl::DklConfig;
//! let cfg: DklConfig = toml::from_str("n_initial = 5\nacquisition = \"ei\"").unwrap();
//! assert_eq!(cfg.n_initial, 5);
//! cfg.validate().unwrap();
//! assert!(toml::from_str::<DklConfig>("lr = -1.0").unwrap().validate().is_err());
//! ```

use crate::acquisition::Acquisition;
use crate::agent::{Agent, GridMaps, Insight, Region, acquisition_control, acquisition_controls};
use crate::error::{AgentError, Result};
use rand::Rng;
use scopegym_envs::rng::{SimRng, seeded};
use scopegym_envs::{Env, Space, Value};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// `ln(2π) / 2`.
const HALF_LN_2PI: f64 = 0.918_938_533_204_672_8;

/// What the model sees of each candidate point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Inputs {
    /// The flattened overview patch, each pixel standardized over the candidates (DKL).
    #[default]
    Patches,
    /// The patch and the two grid coordinates scaled to `[-1, 1]` (DKL).
    #[serde(rename = "patches+coordinates")]
    PatchesAndCoordinates,
    /// The two grid coordinates scaled to `[0, 1]` under the identity instead of the MLP: a
    /// plain GP on position (the ablation).
    Coordinates,
}

/// Settings of the DKL agent (`--config agent.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DklConfig {
    /// Points drawn uniformly at random before the model takes over. Default 10.
    pub n_initial: usize,
    /// Acquisition function. Default UCB with β = 4 (`{ ucb = { beta = 4.0 } }`: on the
    /// simulated StemEelsExplore it left less regret than LogEI, tests/dkl.rs; on the real BEPS
    /// map LogEI found the top-1 % loop a little sooner, median 28 against 33.5 measurements
    /// over seeds 0..60). Thompson sampling is not offered.
    pub acquisition: Acquisition,
    /// Improvement margin ξ of EI, LogEI and PI, in standardized output units. Default 0.
    pub xi: f64,
    /// What the model sees of a candidate. Default `"patches"`.
    pub inputs: Inputs,
    /// Width of the MLP's two hidden layers. Default 64.
    pub hidden: usize,
    /// Dimension of the learned features the kernel acts on. Default 2.
    pub feature_dim: usize,
    /// Adam learning rate. Default 0.01.
    pub lr: f64,
    /// Adam epochs (full-batch steps) of the first fit of an episode. Default 200.
    pub epochs_initial: usize,
    /// Adam epochs of each later, warm-started fit. Default 30.
    pub epochs_step: usize,
    /// Initial kernel lengthscale ℓ, in feature units (coordinates: fractions of the grid side).
    /// Default 0.2.
    pub init_lengthscale: f64,
    /// Initial noise standard deviation σ, standardized output units. Default 0.1.
    pub init_noise: f64,
    /// Diagonal jitter added to `K_y` (standardized output units²), multiplied by 10 up to 6
    /// times where the Cholesky factorization fails. Default 1e-6.
    pub jitter: f64,
}

impl Default for DklConfig {
    fn default() -> Self {
        Self {
            n_initial: 10,
            acquisition: Acquisition::Ucb { beta: 4.0 },
            xi: 0.0,
            inputs: Inputs::Patches,
            hidden: 64,
            feature_dim: 2,
            lr: 0.01,
            epochs_initial: 200,
            epochs_step: 30,
            init_lengthscale: 0.2,
            init_noise: 0.1,
            jitter: 1e-6,
        }
    }
}

impl DklConfig {
    /// Checks every field (the error names it).
    pub fn validate(&self) -> Result<()> {
        let pos = |v: f64, name: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(AgentError::config(
                    name,
                    format!("must be finite and > 0, got {v}"),
                ))
            }
        };
        if self.n_initial == 0 {
            return Err(AgentError::config("n_initial", "must be at least 1"));
        }
        if matches!(self.acquisition, Acquisition::Thompson) {
            return Err(AgentError::config(
                "acquisition",
                "thompson is not offered by dkl (use ei, logei, ucb, pi or maxuncertainty)",
            ));
        }
        if let Acquisition::Ucb { beta } = self.acquisition {
            if !(beta.is_finite() && beta >= 0.0) {
                return Err(AgentError::config("acquisition", "ucb beta must be >= 0"));
            }
        }
        if !(self.xi.is_finite() && self.xi >= 0.0) {
            return Err(AgentError::config("xi", "must be finite and >= 0"));
        }
        if !(1..=4096).contains(&self.hidden) {
            return Err(AgentError::config("hidden", "must be in 1..=4096"));
        }
        if !(1..=64).contains(&self.feature_dim) {
            return Err(AgentError::config("feature_dim", "must be in 1..=64"));
        }
        pos(self.lr, "lr")?;
        if self.epochs_initial > 100_000 || self.epochs_step > 100_000 {
            let f = if self.epochs_initial > 100_000 {
                "epochs_initial"
            } else {
                "epochs_step"
            };
            return Err(AgentError::config(f, "must be at most 100000"));
        }
        pos(self.init_lengthscale, "init_lengthscale")?;
        pos(self.init_noise, "init_noise")?;
        pos(self.jitter, "jitter")?;
        if self.jitter > 1.0 {
            return Err(AgentError::config("jitter", "must be at most 1"));
        }
        Ok(())
    }

    /// Reads a TOML table (`None`: the defaults) and validates it.
    pub fn from_toml(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Self = crate::error::parse_config(config)?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The GP hyperparameters of a [`DklModel`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hyper {
    /// Kernel output scale `s` (standard deviation), standardized output units.
    pub outputscale: f64,
    /// Kernel lengthscale ℓ, feature units.
    pub lengthscale: f64,
    /// Noise standard deviation σ, standardized output units.
    pub noise: f64,
    /// Constant mean `m`, standardized output units.
    pub mean: f64,
}

/// The feature extractor and GP of deep kernel learning (module docs), on f64 tensors.
#[derive(Debug)]
pub struct DklModel {
    /// MLP weights `(W₁, b₁, W₂, b₂, W₃, b₃)`, `W` shaped `(out, in)`; empty: identity.
    mlp: Vec<Tensor>,
    /// `ln s`, `ln ℓ`, `ln σ`, `m` (scalars).
    gp: Vec<Tensor>,
    adam_m: Vec<Tensor>,
    adam_v: Vec<Tensor>,
    adam_t: i32,
    jitter: f64,
}

/// A trainable f64 scalar or tensor from values.
fn param(v: &[f64], shape: &[i64]) -> Tensor {
    Tensor::from_slice(v).reshape(shape).set_requires_grad(true)
}

/// The values of a tensor, as f64.
fn values(t: &Tensor) -> Result<Vec<f64>> {
    let t = t.f_to_kind(Kind::Double)?.f_contiguous()?.f_view([-1])?;
    Ok(Vec::<f64>::try_from(&t)?)
}

impl DklModel {
    /// A model on inputs of dimension `d`: with `hidden > 0` an MLP `d → hidden → hidden →
    /// feature_dim` initialized as PyTorch's `Linear` (weights and biases uniform in
    /// `±1/√fan_in`) from `seed` (this crate's generator, not torch's); with `hidden = 0` the
    /// identity (`feature_dim` ignored). `hyper` gives the initial GP hyperparameters.
    pub fn new(
        d: usize,
        hidden: usize,
        feature_dim: usize,
        hyper: Hyper,
        jitter: f64,
        seed: u64,
    ) -> Self {
        let mut rng = seeded(seed ^ 0xd1c1_5eed_0000_0001);
        let mut mlp = Vec::new();
        if hidden > 0 {
            for (i, o) in [(d, hidden), (hidden, hidden), (hidden, feature_dim)] {
                let b = 1.0 / (i as f64).sqrt();
                let w: Vec<f64> = (0..i * o).map(|_| rng.random_range(-b..b)).collect();
                let bias: Vec<f64> = (0..o).map(|_| rng.random_range(-b..b)).collect();
                mlp.push(param(&w, &[o as i64, i as i64]));
                mlp.push(param(&bias, &[o as i64]));
            }
        }
        let gp = vec![
            param(&[hyper.outputscale.ln()], &[]),
            param(&[hyper.lengthscale.ln()], &[]),
            param(&[hyper.noise.ln()], &[]),
            param(&[hyper.mean], &[]),
        ];
        let all: Vec<&Tensor> = mlp.iter().chain(&gp).collect();
        let adam_m = all.iter().map(|p| p.zeros_like()).collect();
        let adam_v = all.iter().map(|p| p.zeros_like()).collect();
        Self {
            mlp,
            gp,
            adam_m,
            adam_v,
            adam_t: 0,
            jitter,
        }
    }

    /// The current GP hyperparameters.
    pub fn hyper(&self) -> Hyper {
        let v = |i: usize| self.gp[i].double_value(&[]);
        Hyper {
            outputscale: v(0).exp(),
            lengthscale: v(1).exp(),
            noise: v(2).exp(),
            mean: v(3),
        }
    }

    /// The MLP's weights and biases `(values, shape)` in the order `W₁, b₁, W₂, b₂, W₃, b₃`
    /// (`W` shaped `(out, in)`, row-major; empty for the identity).
    pub fn mlp_weights(&self) -> Result<Vec<(Vec<f64>, Vec<i64>)>> {
        self.mlp
            .iter()
            .map(|t| Ok((values(t)?, t.size())))
            .collect()
    }

    /// The learned features of the rows of `x` (`(n, d)`).
    fn features(&self, x: &Tensor) -> Tensor {
        if self.mlp.is_empty() {
            return x.shallow_clone();
        }
        let w = &self.mlp;
        let h = x.matmul(&w[0].tr()).g_add(&w[1]).relu();
        let h = h.matmul(&w[2].tr()).g_add(&w[3]).relu();
        h.matmul(&w[4].tr()).g_add(&w[5])
    }

    /// `s² exp(−|a − b|² / (2ℓ²))` between the rows of `a` and `b`.
    fn kernel(&self, a: &Tensor, b: &Tensor) -> Tensor {
        let aa = a.square().sum_dim_intlist(1, true, Kind::Double);
        let bb = b.square().sum_dim_intlist(1, true, Kind::Double).tr();
        let d2 = (aa + bb - a.matmul(&b.tr()) * 2.0).clamp_min(0.0);
        let l2 = (&self.gp[1] * 2.0).exp();
        (&self.gp[0] * 2.0).exp() * (-(d2 / l2) * 0.5).exp()
    }

    /// The lower Cholesky factor of `K_y` on features `z`, with the jitter grown where needed.
    fn cholesky(&self, z: &Tensor) -> Result<Tensor> {
        let n = z.size()[0];
        let k = self.kernel(z, z);
        let eye = Tensor::eye(n, (Kind::Double, tch::Device::Cpu));
        let noise = (&self.gp[2] * 2.0).exp();
        let mut jitter = self.jitter;
        for _ in 0..7 {
            let ky = &k + &eye * (&noise + jitter);
            let (l, info) = ky.f_linalg_cholesky_ex(false, false)?;
            if info.int64_value(&[]) == 0 && bool::try_from(l.isfinite().all())? {
                return Ok(l);
            }
            jitter *= 10.0;
        }
        Err(AgentError::numerical(
            "dkl cholesky",
            format!("K_y not positive definite with jitter up to {jitter:e}"),
        ))
    }

    /// The negative log marginal likelihood per point (a graph for autograd).
    fn nll_tensor(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let n = y.size()[0];
        let z = self.features(x);
        let l = self.cholesky(&z)?;
        let r = (y - &self.gp[3]).unsqueeze(1);
        let a = r.cholesky_solve(&l, false);
        let quad = (&r * &a).sum(Kind::Double);
        let logdet = l.diagonal(0, 0, 1).log().sum(Kind::Double);
        Ok((quad * 0.5 + logdet) / n as f64 + HALF_LN_2PI)
    }

    /// The negative log marginal likelihood per point of outputs `y` (`n`) at inputs `x`
    /// (`n × d`, row-major), with the current parameters.
    pub fn nll(&self, x: &[f64], y: &[f64]) -> Result<f64> {
        let (x, y) = tensors(x, y)?;
        let v = tch::no_grad(|| self.nll_tensor(&x, &y))?;
        Ok(v.double_value(&[]))
    }

    /// `epochs` full-batch Adam steps (rate `lr`, β = (0.9, 0.999), ε = 1e-8) on the negative
    /// log marginal likelihood of `y` at `x`, all parameters jointly, continuing the optimizer's
    /// state. Returns the objective before each step.
    pub fn fit(&mut self, x: &[f64], y: &[f64], epochs: usize, lr: f64) -> Result<Vec<f64>> {
        let (x, y) = tensors(x, y)?;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        let mut trace = Vec::with_capacity(epochs);
        for _ in 0..epochs {
            let loss = self.nll_tensor(&x, &y)?;
            let v = loss.double_value(&[]);
            if !v.is_finite() {
                return Err(AgentError::numerical("dkl fit", format!("objective {v}")));
            }
            trace.push(v);
            loss.f_backward()?;
            self.adam_t += 1;
            let (c1, c2) = (1.0 - b1.powi(self.adam_t), 1.0 - b2.powi(self.adam_t));
            tch::no_grad(|| -> Result<()> {
                for (i, p) in self.mlp.iter_mut().chain(self.gp.iter_mut()).enumerate() {
                    let g = p.grad();
                    if !g.defined() {
                        continue;
                    }
                    self.adam_m[i] = &self.adam_m[i] * b1 + &g * (1.0 - b1);
                    self.adam_v[i] = &self.adam_v[i] * b2 + g.square() * (1.0 - b2);
                    let step = (&self.adam_m[i] / c1) / ((&self.adam_v[i] / c2).sqrt() + eps) * lr;
                    let _ = p.f_sub_(&step)?;
                    p.zero_grad();
                }
                Ok(())
            })?;
        }
        Ok(trace)
    }

    /// The posterior mean and variance (of the latent function, without the noise) at the rows
    /// of `xs` (`m × d`), given outputs `y` at `x`.
    pub fn posterior(&self, x: &[f64], y: &[f64], xs: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
        let (x, y) = tensors(x, y)?;
        let d = x.size()[1];
        if xs.len() % d as usize != 0 {
            return Err(AgentError::arg(
                "xs",
                format!("length {} is not a multiple of {d}", xs.len()),
            ));
        }
        let xs = Tensor::from_slice(xs).reshape([-1, d]);
        tch::no_grad(|| {
            let z = self.features(&x);
            let zs = self.features(&xs);
            let l = self.cholesky(&z)?;
            let ks = self.kernel(&zs, &z);
            let a = (&y - &self.gp[3]).unsqueeze(1).cholesky_solve(&l, false);
            let mu = ks.matmul(&a).squeeze_dim(1) + &self.gp[3];
            let v = l.linalg_solve_triangular(&ks.tr(), false, true, false);
            let s2 = (&self.gp[0] * 2.0).exp();
            let var = (-v.square().sum_dim_intlist(0, false, Kind::Double) + s2).clamp_min(0.0);
            Ok((values(&mu)?, values(&var)?))
        })
    }
}

impl DklModel {
    /// The learned features `z = g(x)` of the rows of `x` (`m × d`, row-major) and their
    /// dimension (the MLP's `feature_dim`, or `d` for the identity).
    pub fn embedding(&self, x: &[f64], d: usize) -> Result<(Vec<f64>, usize)> {
        if d == 0 || x.len() % d != 0 {
            return Err(AgentError::arg(
                "x",
                format!("length {} is not a multiple of {d}", x.len()),
            ));
        }
        let t = Tensor::from_slice(x).reshape([-1, d as i64]);
        let z = tch::no_grad(|| self.features(&t));
        let f = z.size().get(1).copied().unwrap_or(0) as usize;
        Ok((values(&z)?, f))
    }
}

/// The rows of `z` (`m × f`, row-major) in 2-D: as they are for `f ≤ 2` (a zero second
/// coordinate for `f = 1`), else their coordinates along the first two principal components
/// (centred; each component's sign set so that its largest-magnitude loading is positive).
/// Returns the points and whether they were projected.
fn project_2d(z: &[f64], f: usize) -> Result<(Vec<[f64; 2]>, bool)> {
    let m = z.len().checked_div(f).unwrap_or(0);
    if f <= 2 {
        let pts = (0..m)
            .map(|i| [z[i * f], if f == 2 { z[i * f + 1] } else { 0.0 }])
            .collect();
        return Ok((pts, false));
    }
    let mean: Vec<f64> = (0..f)
        .map(|j| (0..m).map(|i| z[i * f + j]).sum::<f64>() / m.max(1) as f64)
        .collect();
    let c: Vec<f64> = (0..m)
        .flat_map(|i| (0..f).map(|j| z[i * f + j] - mean[j]).collect::<Vec<_>>())
        .collect();
    let ct = Tensor::from_slice(&c).reshape([m as i64, f as i64]);
    let cov = ct.tr().matmul(&ct) / m.max(1) as f64;
    let (_, vecs) = cov.f_linalg_eigh("L")?;
    // Eigenvalues ascending: the last two columns.
    let v = values(&vecs)?;
    let comp = |col: usize| -> Vec<f64> {
        let mut u: Vec<f64> = (0..f).map(|r| v[r * f + col]).collect();
        let big = u
            .iter()
            .copied()
            .fold(0.0f64, |a, b| if b.abs() > a.abs() { b } else { a });
        if big < 0.0 {
            u.iter_mut().for_each(|x| *x = -*x);
        }
        u
    };
    let (u0, u1) = (comp(f - 1), comp(f - 2));
    let dot = |row: &[f64], u: &[f64]| row.iter().zip(u).map(|(a, b)| a * b).sum::<f64>();
    let pts = c
        .chunks(f)
        .map(|row| [dot(row, &u0), dot(row, &u1)])
        .collect();
    Ok((pts, true))
}

/// `x` (`n × d` with `n = y.len()`) and `y` as tensors.
fn tensors(x: &[f64], y: &[f64]) -> Result<(Tensor, Tensor)> {
    let n = y.len();
    if n == 0 || x.len() % n != 0 || x.is_empty() {
        return Err(AgentError::arg(
            "x",
            format!("{} inputs for {n} outputs: expected n × d", x.len()),
        ));
    }
    if x.iter().chain(y).any(|v| !v.is_finite()) {
        return Err(AgentError::arg("x", "non-finite input or output"));
    }
    let d = (x.len() / n) as i64;
    Ok((
        Tensor::from_slice(x).reshape([n as i64, d]),
        Tensor::from_slice(y),
    ))
}

/// The DKL active-learning agent (module docs).
#[derive(Debug)]
pub struct DklAgent {
    cfg: DklConfig,
    seed: u64,
    /// Candidate inputs, `n × d` row-major, and `d`.
    x: Vec<f64>,
    d: usize,
    n: usize,
    model: Option<DklModel>,
    rng: SimRng,
    /// Grid cells the operator vetoed or marked off-limits (kept for the whole run).
    forbidden: std::collections::BTreeSet<usize>,
    /// The measured cells and values the model was last fitted to (no refit for the same).
    fitted_on: Option<(Vec<usize>, Vec<f64>)>,
    /// What the last [`Agent::act`] computed, for [`Agent::insight`].
    view: View,
}

/// What [`DklAgent::act`] computed last (the operator's view).
#[derive(Debug, Clone, Default)]
struct View {
    /// The proposed cell.
    pick: Option<usize>,
    /// Posterior mean and sd (units of `measured_value`) and acquisition, over every cell.
    maps: Option<(Vec<f64>, Vec<f64>, Vec<f64>)>,
    /// `[e₀, e₁, measured value]` of the measured points.
    scatter: Vec<[f64; 3]>,
    axes: Vec<String>,
}

/// A `Box` entry of a Dict observation.
fn obs_box<'a>(obs: &'a Value, key: &str) -> Option<&'a [f32]> {
    obs.get(key).and_then(Value::as_box)
}

impl DklAgent {
    /// The agent with `cfg` (validated here); `seed` is mixed into every episode's seed.
    pub fn new(cfg: DklConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            seed,
            x: Vec::new(),
            d: 0,
            n: 0,
            model: None,
            rng: seeded(seed),
            forbidden: Default::default(),
            fitted_on: None,
            view: View::default(),
        })
    }

    /// Builds the agent for `env` from a TOML config (registry entry).
    pub fn make(env: &dyn Env, config: Option<&toml::Value>, seed: u64) -> Result<Box<dyn Agent>> {
        let cfg = DklConfig::from_toml(config)?;
        check_env(env)?;
        Ok(Box::new(Self::new(cfg, seed)?))
    }

    /// The model of the episode, once fitted.
    pub fn model(&self) -> Option<&DklModel> {
        self.model.as_ref()
    }

    /// The candidate inputs of the episode from the first observation.
    fn inputs(&self, obs: &Value) -> Result<(Vec<f64>, usize)> {
        let (n, g) = (self.n, (self.n as f64).sqrt().round() as usize);
        let coords = |k: usize| {
            [
                (k / g) as f64 / (g - 1) as f64,
                (k % g) as f64 / (g - 1) as f64,
            ]
        };
        if self.cfg.inputs == Inputs::Coordinates {
            return Ok(((0..n).flat_map(coords).collect(), 2));
        }
        let p = obs_box(obs, "patches").ok_or_else(|| {
            AgentError::arg(
                "obs",
                "no `patches` key (set the task's patch > 0, or inputs = \"coordinates\")",
            )
        })?;
        if p.is_empty() || p.len() % n != 0 {
            return Err(AgentError::arg(
                "patches",
                format!("{} values for {n} candidates", p.len()),
            ));
        }
        let dp = p.len() / n;
        // Standardize each pixel over the candidates.
        let mut mean = vec![0.0; dp];
        let mut sd = vec![0.0; dp];
        for k in 0..n {
            for j in 0..dp {
                mean[j] += f64::from(p[k * dp + j]) / n as f64;
            }
        }
        for k in 0..n {
            for j in 0..dp {
                sd[j] += (f64::from(p[k * dp + j]) - mean[j]).powi(2) / n as f64;
            }
        }
        let sd: Vec<f64> = sd.iter().map(|v| v.sqrt().max(1e-6)).collect();
        let with_coords = self.cfg.inputs == Inputs::PatchesAndCoordinates;
        let d = dp + if with_coords { 2 } else { 0 };
        let mut x = Vec::with_capacity(n * d);
        for k in 0..n {
            for j in 0..dp {
                let v = (f64::from(p[k * dp + j]) - mean[j]) / sd[j];
                x.push(if v.is_finite() { v } else { 0.0 });
            }
            if with_coords {
                x.extend(coords(k).map(|c| 2.0 * c - 1.0));
            }
        }
        Ok((x, d))
    }
}

/// The task must have a square `Discrete` action space of at least 4 points.
fn check_env(env: &dyn Env) -> Result<usize> {
    let unsupported = |reason: String| AgentError::Unsupported {
        agent: "dkl".into(),
        task: env.id().into(),
        reason,
    };
    match env.action_space() {
        Space::Discrete { n, start: 0 } => {
            let n = *n as usize;
            let g = (n as f64).sqrt().round() as usize;
            if g * g != n || g < 2 {
                return Err(unsupported(format!("Discrete({n}) is not a square grid")));
            }
            Ok(n)
        }
        other => Err(unsupported(format!(
            "needs a Discrete grid of candidate points, got {}",
            other.describe()
        ))),
    }
}

impl Agent for DklAgent {
    fn name(&self) -> &str {
        "dkl"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).unwrap_or_default()
    }

    fn begin_episode(&mut self, env: &dyn Env, obs: &Value, seed: u64) -> Result<()> {
        tch::set_num_threads(1);
        self.n = check_env(env)?;
        let s = seed ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        tch::manual_seed(s as i64);
        self.rng = seeded(s ^ 0x0d41_a9e1_7000_0001);
        (self.x, self.d) = self.inputs(obs)?;
        self.model = None;
        self.fitted_on = None;
        self.view = View::default();
        Ok(())
    }

    fn act(&mut self, _env: &mut dyn Env, obs: &Value) -> Result<Value> {
        let n = self.n;
        if self.x.is_empty() {
            return Err(AgentError::arg("dkl", "act called before begin_episode"));
        }
        let (Some(value), Some(count)) = (
            obs_box(obs, "measured_value"),
            obs_box(obs, "measured_count"),
        ) else {
            return Err(AgentError::arg(
                "obs",
                "needs `measured_value` and `measured_count`",
            ));
        };
        if value.len() != n || count.len() != n {
            return Err(AgentError::arg(
                "measured_value",
                format!(
                    "{} and {} values for {n} candidates",
                    value.len(),
                    count.len()
                ),
            ));
        }
        let pristine: Vec<bool> = match obs_box(obs, "pristine") {
            Some(p) if p.len() == n => p.iter().map(|&v| v > 0.5).collect(),
            _ => vec![true; n],
        };
        let allowed = |k: &usize| !self.forbidden.contains(k);
        let measured: Vec<usize> = (0..n).filter(|&k| count[k] > 0.0).collect();
        let fresh: Vec<usize> = (0..n)
            .filter(|&k| count[k] <= 0.0 && pristine[k])
            .filter(allowed)
            .collect();
        let cands: Vec<usize> = if fresh.is_empty() {
            (0..n)
                .filter(|&k| count[k] <= 0.0)
                .filter(allowed)
                .collect()
        } else {
            fresh
        };
        self.view.pick = None;
        if cands.is_empty() {
            // Everything measured: measure the first allowed point again.
            let k = (0..n).find(allowed).ok_or_else(|| {
                AgentError::arg("off_limits", "every grid cell is vetoed or off-limits")
            })?;
            self.view.pick = Some(k);
            return Ok(Value::Discrete(k as i64));
        }
        if measured.len() < self.cfg.n_initial.max(2) {
            let k = cands[self.rng.random_range(0..cands.len())];
            self.view.pick = Some(k);
            return Ok(Value::Discrete(k as i64));
        }
        // Standardized outputs.
        let raw: Vec<f64> = measured.iter().map(|&k| f64::from(value[k])).collect();
        let mean = raw.iter().sum::<f64>() / raw.len() as f64;
        let sd = (raw.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / raw.len() as f64).sqrt();
        let sd = if sd > 1e-12 { sd } else { 1.0 };
        let y: Vec<f64> = raw.iter().map(|v| (v - mean) / sd).collect();
        let d = self.d;
        let xm: Vec<f64> = measured
            .iter()
            .flat_map(|&k| self.x[k * d..(k + 1) * d].iter().copied())
            .collect();
        let first = self.model.is_none();
        let model = self.model.get_or_insert_with(|| {
            let hidden = if self.cfg.inputs == Inputs::Coordinates {
                0
            } else {
                self.cfg.hidden
            };
            DklModel::new(
                d,
                hidden,
                self.cfg.feature_dim,
                Hyper {
                    outputscale: 1.0,
                    lengthscale: self.cfg.init_lengthscale,
                    noise: self.cfg.init_noise,
                    mean: 0.0,
                },
                self.cfg.jitter,
                self.rng.random(),
            )
        });
        let epochs = if first {
            self.cfg.epochs_initial
        } else {
            self.cfg.epochs_step
        };
        // Asked again for the same measurements (after a veto or a control): no refit.
        let key = (measured.clone(), raw.clone());
        if self.fitted_on.as_ref() != Some(&key) {
            model.fit(&xm, &y, epochs, self.cfg.lr)?;
            self.fitted_on = Some(key);
        }
        let rows = |ks: &[usize]| -> Vec<f64> {
            ks.iter()
                .flat_map(|&k| self.x[k * d..(k + 1) * d].iter().copied())
                .collect()
        };
        let xs = rows(&cands);
        let (mu, var) = model.posterior(&xm, &y, &xs)?;
        let best = y.iter().copied().fold(f64::MIN, f64::max);
        let mut pick = (f64::NEG_INFINITY, cands[0]);
        let mut acq = vec![f64::NEG_INFINITY; n];
        for (i, &k) in cands.iter().enumerate() {
            let a = self
                .cfg
                .acquisition
                .score(mu[i], var[i].sqrt(), best, self.cfg.xi)
                .unwrap_or(f64::NEG_INFINITY);
            acq[k] = a;
            if a > pick.0 {
                pick = (a, k);
            }
        }
        // The operator's view: the posterior over the other cells too, and the embedding.
        let (mut m_all, mut v_all) = (vec![0.0; n], vec![0.0; n]);
        for (i, &k) in cands.iter().enumerate() {
            (m_all[k], v_all[k]) = (mu[i], var[i]);
        }
        let mut is_cand = vec![false; n];
        cands.iter().for_each(|&k| is_cand[k] = true);
        let others: Vec<usize> = (0..n).filter(|&k| !is_cand[k]).collect();
        if !others.is_empty() {
            let (mo, vo) = model.posterior(&xm, &y, &rows(&others))?;
            for (i, &k) in others.iter().enumerate() {
                (m_all[k], v_all[k]) = (mo[i], vo[i]);
            }
        }
        let mean_map = m_all.iter().map(|v| v * sd + mean).collect();
        let sd_map = v_all.iter().map(|v| v.sqrt() * sd).collect();
        let (z, f) = model.embedding(&xm, d)?;
        let (pts, projected) = project_2d(&z, f)?;
        self.view = View {
            pick: Some(pick.1),
            maps: Some((mean_map, sd_map, acq)),
            scatter: pts
                .iter()
                .zip(&raw)
                .map(|(p, &v)| [p[0], p[1], v])
                .collect(),
            axes: match (self.cfg.inputs, projected, f) {
                (Inputs::Coordinates, ..) => vec!["row".into(), "column".into()],
                (_, true, _) => vec!["PC1 of z".into(), "PC2 of z".into()],
                (_, false, 1) => vec!["z0".into(), "-".into()],
                _ => vec!["z0".into(), "z1".into()],
            },
        };
        Ok(Value::Discrete(pick.1 as i64))
    }

    fn insight(&self) -> Option<Insight> {
        let mut ins = Insight {
            controls: acquisition_controls(self.cfg.acquisition, self.cfg.xi),
            ..Insight::default()
        };
        let n = self.n;
        if n == 0 {
            return Some(ins);
        }
        let g = (n as f64).sqrt().round() as usize;
        let gf = g as f64;
        ins.point = self
            .view
            .pick
            .map(|k| [((k / g) as f64 + 0.5) / gf, ((k % g) as f64 + 0.5) / gf]);
        let forbidden: Vec<bool> = (0..n).map(|k| self.forbidden.contains(&k)).collect();
        ins.maps = Some(match &self.view.maps {
            Some((mean, sd, acq)) => GridMaps {
                rows: g,
                cols: g,
                mean: mean.clone(),
                sd: sd.clone(),
                // Cells forbidden since the last act are not candidates any more.
                acquisition: acq
                    .iter()
                    .zip(&forbidden)
                    .map(|(&a, &f)| if f { f64::NEG_INFINITY } else { a })
                    .collect(),
                forbidden,
            },
            None => GridMaps {
                rows: g,
                cols: g,
                mean: vec![f64::NAN; n],
                sd: vec![f64::NAN; n],
                acquisition: vec![f64::NAN; n],
                forbidden,
            },
        });
        ins.scatter = self.view.scatter.clone();
        ins.scatter_axes = self.view.axes.clone();
        Some(ins)
    }

    /// `acquisition` (a name [`Acquisition::parse`] takes, not Thompson; `ucb` keeps the
    /// current β), `beta` (UCB's β ≥ 0; switches the acquisition to UCB) and `xi` (ξ ≥ 0 of EI,
    /// LogEI, PI, in standardized output units).
    fn set_control(&mut self, name: &str, value: &serde_json::Value) -> Result<()> {
        let mut cfg = self.cfg.clone();
        (cfg.acquisition, cfg.xi) = acquisition_control(
            self.name(),
            name,
            value,
            (cfg.acquisition, cfg.xi),
            "ei, logei, ucb, pi, maxuncertainty",
        )?;
        cfg.validate()?;
        self.cfg = cfg;
        Ok(())
    }

    fn veto(&mut self, action: &Value) -> Result<()> {
        let n = self.n as i64;
        match action {
            Value::Discrete(k) if (0..n).contains(k) => {
                self.forbidden.insert(*k as usize);
                Ok(())
            }
            _ => Err(AgentError::arg(
                "veto",
                format!("{action:?} is not a cell of the grid of {n} candidates"),
            )),
        }
    }

    fn forbid(&mut self, region: &Region) -> Result<()> {
        if self.n == 0 {
            return Err(AgentError::arg(
                "off_limits",
                "the dkl agent has no grid before its first episode",
            ));
        }
        let g = (self.n as f64).sqrt().round() as usize;
        self.forbidden.extend(region.cells(g)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Solves `a x = b` (`n × n`, row-major) by Gaussian elimination with partial pivoting;
    /// returns `x` and `ln |det a|`.
    fn solve(a: &[f64], b: &[f64], n: usize) -> (Vec<f64>, f64) {
        let m = b.len() / n;
        let (mut a, mut b) = (a.to_vec(), b.to_vec());
        let mut logdet = 0.0;
        for c in 0..n {
            let p = (c..n)
                .max_by(|&i, &j| a[i * n + c].abs().total_cmp(&a[j * n + c].abs()))
                .unwrap();
            for j in 0..n {
                a.swap(c * n + j, p * n + j);
            }
            for j in 0..m {
                b.swap(c * m + j, p * m + j);
            }
            logdet += a[c * n + c].abs().ln();
            for i in c + 1..n {
                let f = a[i * n + c] / a[c * n + c];
                for j in c..n {
                    a[i * n + j] -= f * a[c * n + j];
                }
                for j in 0..m {
                    b[i * m + j] -= f * b[c * m + j];
                }
            }
        }
        let mut x = vec![0.0; n * m];
        for j in 0..m {
            for i in (0..n).rev() {
                let s: f64 = (i + 1..n).map(|k| a[i * n + k] * x[k * m + j]).sum();
                x[i * m + j] = (b[i * m + j] - s) / a[i * n + i];
            }
        }
        (x, logdet)
    }

    /// The MLP of `w` (as [`DklModel::mlp_weights`] gives it) applied to `x` (`d` values), by
    /// hand.
    fn mlp(w: &[(Vec<f64>, Vec<i64>)], x: &[f64]) -> Vec<f64> {
        let mut h = x.to_vec();
        for (l, pair) in w.chunks(2).enumerate() {
            let (wv, shape) = (&pair[0].0, &pair[0].1);
            let (o, i) = (shape[0] as usize, shape[1] as usize);
            h = (0..o)
                .map(|r| {
                    let v = pair[1].0[r] + (0..i).map(|c| wv[r * i + c] * h[c]).sum::<f64>();
                    if l < 2 { v.max(0.0) } else { v }
                })
                .collect();
        }
        h
    }

    /// Posterior mean, variance and NLL per point in closed form on fixed features.
    fn closed_form(
        z: &[Vec<f64>],
        y: &[f64],
        zs: &[Vec<f64>],
        h: Hyper,
        jitter: f64,
    ) -> (Vec<f64>, Vec<f64>, f64) {
        let k = |a: &[f64], b: &[f64]| {
            let d2: f64 = a.iter().zip(b).map(|(p, q)| (p - q).powi(2)).sum();
            h.outputscale.powi(2) * (-d2 / (2.0 * h.lengthscale.powi(2))).exp()
        };
        let n = z.len();
        let mut ky = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                ky[i * n + j] = k(&z[i], &z[j])
                    + if i == j {
                        h.noise.powi(2) + jitter
                    } else {
                        0.0
                    };
            }
        }
        let r: Vec<f64> = y.iter().map(|v| v - h.mean).collect();
        let (alpha, logdet) = solve(&ky, &r, n);
        let nll = (0.5 * r.iter().zip(&alpha).map(|(a, b)| a * b).sum::<f64>() + 0.5 * logdet)
            / n as f64
            + 0.5 * (2.0 * std::f64::consts::PI).ln();
        let (mut mu, mut var) = (Vec::new(), Vec::new());
        for s in zs {
            let ks: Vec<f64> = z.iter().map(|zi| k(s, zi)).collect();
            let (v, _) = solve(&ky, &ks, n);
            mu.push(h.mean + ks.iter().zip(&alpha).map(|(a, b)| a * b).sum::<f64>());
            var.push(h.outputscale.powi(2) - ks.iter().zip(&v).map(|(a, b)| a * b).sum::<f64>());
        }
        (mu, var, nll)
    }

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(1e-300)
    }

    #[test]
    fn exact_gp_equals_the_closed_form_on_fixed_features() {
        let mut rng = seeded(7);
        let (n, m, d) = (12, 9, 5);
        let x: Vec<f64> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let xs: Vec<f64> = (0..m * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let y: Vec<f64> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let h = Hyper {
            outputscale: 1.3,
            lengthscale: 0.45,
            noise: 0.2,
            mean: 0.3,
        };
        let jitter = 1e-6;
        for hidden in [0, 8] {
            let model = DklModel::new(d, hidden, 3, h, jitter, 11);
            let w = model.mlp_weights().unwrap();
            let feat = |v: &[f64]| if hidden == 0 { v.to_vec() } else { mlp(&w, v) };
            let z: Vec<Vec<f64>> = x.chunks(d).map(feat).collect();
            let zs: Vec<Vec<f64>> = xs.chunks(d).map(feat).collect();
            let (mu0, var0, nll0) = closed_form(&z, &y, &zs, h, jitter);
            let (mu, var) = model.posterior(&x, &y, &xs).unwrap();
            let nll = model.nll(&x, &y).unwrap();
            let worst = mu
                .iter()
                .zip(&mu0)
                .chain(var.iter().zip(&var0))
                .map(|(a, b)| rel(*a, *b))
                .fold(rel(nll, nll0), f64::max);
            println!(
                "hidden {hidden}: nll {nll:.12} (closed form {nll0:.12}), worst relative error {worst:.2e}"
            );
            assert!(
                worst < 1e-8,
                "hidden {hidden}: worst relative error {worst:e}"
            );
            assert!(
                var0.iter().all(|&v| v > 1e-3),
                "the test's variances are not degenerate"
            );
        }
    }

    #[test]
    fn training_lowers_the_nll_on_a_nonlinear_patch_target() {
        // 16-pixel "patches"; the target is a nonlinear function of a contrast between the two
        // halves of the patch, not of any one pixel.
        let mut rng = seeded(3);
        let (n, d) = (80, 16);
        let x: Vec<f64> = (0..n * d).map(|_| rng.random_range(-1.5..1.5)).collect();
        let f = |p: &[f64]| {
            let u = (p[..8].iter().sum::<f64>() - p[8..].iter().sum::<f64>()) / 4.0;
            (2.0 * u).sin() + 0.5 * u * u
        };
        let raw: Vec<f64> = x.chunks(d).map(f).collect();
        let mean = raw.iter().sum::<f64>() / n as f64;
        let sd = (raw.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        let y: Vec<f64> = raw.iter().map(|v| (v - mean) / sd).collect();
        let h = Hyper {
            outputscale: 1.0,
            lengthscale: 0.2,
            noise: 0.1,
            mean: 0.0,
        };
        let mut model = DklModel::new(d, 64, 2, h, 1e-6, 5);
        let before = model.nll(&x, &y).unwrap();
        let trace = model.fit(&x, &y, 300, 0.01).unwrap();
        let after = model.nll(&x, &y).unwrap();
        let at = |i: usize| trace[i];
        println!(
            "NLL per point: {before:.3} before, {:.3} after 50, {:.3} after 150, {after:.3} after 300 epochs; {:?}",
            at(50),
            at(150),
            model.hyper()
        );
        assert!((trace[0] - before).abs() < 1e-9);
        // The first epochs shrink a poorly scaled kernel; by the end the objective is well
        // below its start and still falling (means over windows, as Adam is not monotone).
        let win = |a: usize| trace[a..a + 20].iter().sum::<f64>() / 20.0;
        assert!(after < before - 0.3, "NLL {before} → {after}");
        assert!(win(280) < win(100), "{} then {}", win(100), win(280));
        // It learned some structure: on 200 held-out patches the posterior mean explains part of
        // the target's variance (0.36 measured; before training it explains none).
        let xt: Vec<f64> = (0..200 * d).map(|_| rng.random_range(-1.5..1.5)).collect();
        let yt: Vec<f64> = xt.chunks(d).map(|p| (f(p) - mean) / sd).collect();
        let r2 = |m: &DklModel| {
            let (mu, _) = m.posterior(&x, &y, &xt).unwrap();
            let vt = yt.iter().map(|v| v * v).sum::<f64>();
            let ybar = yt.iter().sum::<f64>() / yt.len() as f64;
            let tot = vt - yt.len() as f64 * ybar * ybar;
            1.0 - mu
                .iter()
                .zip(&yt)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                / tot
        };
        let r2_before = r2(&DklModel::new(d, 64, 2, h, 1e-6, 5));
        let r2_after = r2(&model);
        println!("held-out R²: {r2_before:.3} before training, {r2_after:.3} after");
        assert!(
            r2_after > 0.2 && r2_before < 0.1,
            "R² {r2_before} → {r2_after}"
        );
        // Same seed, same result.
        let mut again = DklModel::new(d, 64, 2, h, 1e-6, 5);
        again.fit(&x, &y, 300, 0.01).unwrap();
        assert_eq!(again.nll(&x, &y).unwrap(), after);
    }

    /// The operator's view and interventions on StemEelsExplore: maps over the whole grid
    /// (finite mean and sd, −∞ acquisition exactly off the candidates), the proposed cell the
    /// acquisition's argmax, one scatter row per measured cell carrying the value the
    /// observation reported there, the embedding as the network computes it (`feature_dim =
    /// 2`) or its principal-component projection (`feature_dim = 3`); vetoed and off-limits
    /// cells never proposed.
    #[test]
    fn insight_shows_what_act_computed_and_interventions_are_honoured() {
        use scopegym_envs::registry::make;
        let text = "n_initial = 4\nhidden = 16\nepochs_initial = 30\nepochs_step = 5";
        for feature_dim in [2, 3] {
            let mut env = make("scopegym/StemEelsExplore-v2", None).unwrap();
            let cfg: DklConfig =
                toml::from_str(&format!("{text}\nfeature_dim = {feature_dim}")).unwrap();
            let mut a = DklAgent::new(cfg, 1).unwrap();
            let (mut obs, _) = env.reset(Some(4)).unwrap();
            a.begin_episode(env.as_ref(), &obs, 4).unwrap();
            let n = 32 * 32;
            a.forbid(&Region {
                rows: [0, 7],
                cols: [0, 31],
            })
            .unwrap();
            let (mut vetoed, mut taken) = (Vec::new(), Vec::new());
            for step in 0..12 {
                let mut action = a.act(env.as_mut(), &obs).unwrap();
                if step % 4 == 3 {
                    a.veto(&action).unwrap();
                    vetoed.push(action.clone());
                    action = a.act(env.as_mut(), &obs).unwrap();
                }
                if step == 6 {
                    a.set_control("beta", &serde_json::json!(1.0)).unwrap();
                    action = a.act(env.as_mut(), &obs).unwrap();
                }
                let k = action.as_discrete().unwrap() as usize;
                let ins = a.insight().unwrap();
                let g = 32.0;
                assert_eq!(
                    ins.point,
                    Some([((k / 32) as f64 + 0.5) / g, ((k % 32) as f64 + 0.5) / g])
                );
                let value = obs_box(&obs, "measured_value").unwrap();
                let count = obs_box(&obs, "measured_count").unwrap();
                let measured: Vec<usize> = (0..n).filter(|&j| count[j] > 0.0).collect();
                let maps = ins.maps.as_ref().unwrap();
                assert_eq!(
                    maps.forbidden.iter().filter(|f| **f).count(),
                    8 * 32 + vetoed.len()
                );
                if measured.len() >= 4 {
                    assert!(maps.mean.iter().chain(&maps.sd).all(|v| v.is_finite()));
                    for (j, &c) in count.iter().enumerate() {
                        let cand = c <= 0.0 && !maps.forbidden[j];
                        assert_eq!(maps.acquisition[j].is_finite(), cand, "cell {j}");
                    }
                    let best = (0..n)
                        .max_by(|&i, &j| maps.acquisition[i].total_cmp(&maps.acquisition[j]))
                        .unwrap();
                    assert_eq!(maps.acquisition[best], maps.acquisition[k]);
                    // One row per measured cell, its value as the observation reports it.
                    assert_eq!(ins.scatter.len(), measured.len());
                    for (row, &j) in ins.scatter.iter().zip(&measured) {
                        assert_eq!(row[2], f64::from(value[j]), "cell {j}");
                    }
                    // The embedding: the network's features of the measured patches, by hand.
                    let w = a.model().unwrap().mlp_weights().unwrap();
                    let d = a.d;
                    let z: Vec<Vec<f64>> = measured
                        .iter()
                        .map(|&j| mlp(&w, &a.x[j * d..(j + 1) * d]))
                        .collect();
                    let e: Vec<[f64; 2]> = ins.scatter.iter().map(|r| [r[0], r[1]]).collect();
                    if feature_dim == 2 {
                        assert_eq!(ins.scatter_axes, ["z0", "z1"]);
                        for (p, q) in e.iter().zip(&z) {
                            assert!((p[0] - q[0]).abs() < 1e-9 && (p[1] - q[1]).abs() < 1e-9);
                        }
                    } else {
                        assert_eq!(ins.scatter_axes, ["PC1 of z", "PC2 of z"]);
                        check_principal_components(&z, &e);
                    }
                } else {
                    assert!(ins.scatter.is_empty());
                }
                let s = env.step(&action).unwrap();
                a.observe(&action, s.reward, &s.obs).unwrap();
                taken.push(k);
                obs = s.obs;
            }
            for &k in &taken {
                assert!(k >= 8 * 32, "cell {k} is in the off-limits rows 0..=7");
                assert!(
                    !vetoed.contains(&Value::Discrete(k as i64)),
                    "vetoed {k} taken"
                );
            }
            assert_eq!(vetoed.len(), 3);
            println!("feature_dim {feature_dim}: cells taken {taken:?}, vetoed {vetoed:?}");
            let ins = a.insight().unwrap();
            assert_eq!(ins.controls["acquisition"], "ucb");
            assert_eq!(ins.controls["beta"], 1.0);
            for (name, v) in [
                ("beta", serde_json::json!(-1.0)),
                ("acquisition", serde_json::json!("thompson")),
                ("xi", serde_json::json!("x")),
                ("gamma", serde_json::json!(1.0)),
            ] {
                let e = a.set_control(name, &v).unwrap_err().to_string();
                assert!(e.contains(name), "{e}");
            }
            let e = a
                .forbid(&Region {
                    rows: [0, 32],
                    cols: [0, 0],
                })
                .unwrap_err();
            assert!(e.to_string().contains("off_limits.rows"), "{e}");
        }
    }

    /// `e` is the centred projection of `z` onto its first two principal components: the two
    /// coordinates uncorrelated, the first the wider, together at least as much variance as any
    /// two of the original axes and no more than all, and no pairwise distance grown.
    fn check_principal_components(z: &[Vec<f64>], e: &[[f64; 2]]) {
        let m = z.len() as f64;
        let col = |f: &dyn Fn(usize) -> f64| (0..z.len()).map(f).collect::<Vec<f64>>();
        let var = |v: &[f64]| {
            let mu = v.iter().sum::<f64>() / m;
            v.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / m
        };
        let (e0, e1) = (col(&|i| e[i][0]), col(&|i| e[i][1]));
        let mean0 = e0.iter().sum::<f64>() / m;
        assert!(mean0.abs() < 1e-9, "not centred: {mean0}");
        let cov: f64 = e0.iter().zip(&e1).map(|(a, b)| a * b).sum::<f64>() / m;
        let (v0, v1) = (var(&e0), var(&e1));
        println!("PC variances {v0:.4e}, {v1:.4e}; cov {cov:.1e}");
        assert!(cov.abs() <= 1e-9 * (v0 + 1e-12), "cov {cov}, var {v0}");
        assert!(v0 >= v1 - 1e-12);
        let axis: Vec<f64> = (0..3).map(|j| var(&col(&|i| z[i][j]))).collect();
        let total: f64 = axis.iter().sum();
        let mut sorted = axis.clone();
        sorted.sort_by(f64::total_cmp);
        assert!(
            v0 + v1 >= sorted[1] + sorted[2] - 1e-9,
            "{v0} + {v1} < {sorted:?}"
        );
        assert!(v0 + v1 <= total + 1e-9);
        for i in 0..z.len() {
            for j in 0..i {
                let dz: f64 = (0..3).map(|k| (z[i][k] - z[j][k]).powi(2)).sum();
                let de = (e[i][0] - e[j][0]).powi(2) + (e[i][1] - e[j][1]).powi(2);
                assert!(de <= dz + 1e-9);
            }
        }
    }

    #[test]
    fn bad_configs_name_the_field() {
        for (text, field) in [
            ("n_initial = 0", "n_initial"),
            ("lr = 0.0", "lr"),
            ("jitter = -1.0", "jitter"),
            ("hidden = 0", "hidden"),
            ("feature_dim = 0", "feature_dim"),
            ("acquisition = \"thompson\"", "acquisition"),
            ("init_lengthscale = nan", "init_lengthscale"),
            ("inputs = \"pixels\"", "inputs"),
            ("nope = 1", "nope"),
        ] {
            let v: toml::Value = toml::from_str(text).unwrap();
            let e = DklConfig::from_toml(Some(&v)).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
        let v: toml::Value = toml::from_str(
            "inputs = \"patches+coordinates\"\nacquisition = { ucb = { beta = 2.0 } }",
        )
        .unwrap();
        let c = DklConfig::from_toml(Some(&v)).unwrap();
        assert_eq!(c.inputs, Inputs::PatchesAndCoordinates);
        assert_eq!(c.acquisition, Acquisition::Ucb { beta: 2.0 });
    }
}
