//! The actor-critic network: the observation layout and normalization ([`ObsLayout`]), the
//! action distribution ([`ActionKind`]) and the network itself ([`ActorCritic`]). The module
//! docs of [`crate::rl`] describe the architecture.

use crate::error::{AgentError, Result};
use scopegym_envs::{Env, Space, Value};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Serializes every use of libtorch's global generator (initialization), so that a seed gives
/// the same weights whatever else runs in the process.
static TORCH_RNG: Mutex<()> = Mutex::new(());

/// Images below this side are flattened instead of going through a CNN.
const MIN_IMAGE_SIDE: usize = 8;
/// From this side up, the Nature-CNN; below, the small CNN.
const NATURE_CNN_SIDE: usize = 36;

/// One part of the flattened observation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Part {
    /// Elements `offset..offset + len` fed to the MLP heads as they are.
    Vector {
        /// First element.
        offset: usize,
        /// Number of elements.
        len: usize,
    },
    /// A `height × width` image at `offset`, encoded by a CNN.
    Image {
        /// First element.
        offset: usize,
        /// Rows.
        height: usize,
        /// Columns.
        width: usize,
    },
    /// Elements the network ignores (3-D Boxes inside a Dict).
    Skipped {
        /// First element.
        offset: usize,
        /// Number of elements.
        len: usize,
    },
}

/// How the flattened observation is normalized and split into parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObsLayout {
    /// Flattened length.
    pub len: usize,
    /// The parts, with the Dict key (empty for a plain space).
    pub parts: Vec<(String, Part)>,
    /// Normalization `x' = x · scale + shift`, per element.
    pub scale: Vec<f32>,
    /// See `scale`.
    pub shift: Vec<f32>,
}

impl ObsLayout {
    /// The layout of an observation space.
    pub fn new(space: &Space) -> Result<Self> {
        let mut l = Self {
            len: 0,
            parts: Vec::new(),
            scale: Vec::new(),
            shift: Vec::new(),
        };
        l.add(space, "", true)?;
        Ok(l)
    }

    fn add(&mut self, space: &Space, key: &str, top: bool) -> Result<()> {
        let offset = self.len;
        let bounds = |lo: f32, hi: f32| -> (f32, f32) {
            if lo.is_finite() && hi.is_finite() && hi > lo {
                let s = 2.0 / (hi - lo);
                (s, -1.0 - lo * s)
            } else {
                (1.0, 0.0)
            }
        };
        let part = match space {
            Space::Box {
                shape, low, high, ..
            } => {
                for (&lo, &hi) in low.iter().zip(high) {
                    let (s, b) = bounds(lo, hi);
                    self.scale.push(s);
                    self.shift.push(b);
                }
                let len = low.len();
                match shape.as_slice() {
                    [h, w] if *h >= MIN_IMAGE_SIDE && *w >= MIN_IMAGE_SIDE => Part::Image {
                        offset,
                        height: *h,
                        width: *w,
                    },
                    s if s.len() >= 3 && !top => Part::Skipped { offset, len },
                    _ => Part::Vector { offset, len },
                }
            }
            Space::Discrete { n, start } => {
                let (s, b) = bounds(*start as f32, (*start + *n - 1) as f32);
                self.scale.push(s);
                self.shift.push(b);
                Part::Vector { offset, len: 1 }
            }
            Space::MultiDiscrete { nvec } => {
                for &n in nvec {
                    let (s, b) = bounds(0.0, (n - 1) as f32);
                    self.scale.push(s);
                    self.shift.push(b);
                }
                Part::Vector {
                    offset,
                    len: nvec.len(),
                }
            }
            Space::MultiBinary { n } => {
                self.scale.extend(std::iter::repeat_n(2.0, *n));
                self.shift.extend(std::iter::repeat_n(-1.0, *n));
                Part::Vector { offset, len: *n }
            }
            Space::Dict(items) => {
                if !top {
                    return Err(AgentError::arg(
                        "observation_space",
                        format!("nested Dict under {key:?} is not supported"),
                    ));
                }
                for (k, s) in items {
                    self.add(s, k, false)?;
                }
                return Ok(());
            }
        };
        self.len = self.scale.len();
        self.parts.push((key.to_string(), part));
        Ok(())
    }

    /// Flattens and normalizes `obs` into `out` (`len` elements).
    pub fn normalize_into(&self, obs: &Value, out: &mut [f32]) -> Result<()> {
        if out.len() != self.len {
            return Err(AgentError::arg(
                "obs",
                format!("expected {} values, got {}", self.len, out.len()),
            ));
        }
        let n = scopegym_envs::vector::flatten_into(obs, out);
        if n != self.len {
            return Err(AgentError::arg(
                "obs",
                format!("observation has {n} values, the space {}", self.len),
            ));
        }
        self.normalize_in_place(out);
        Ok(())
    }

    /// Normalizes flattened observations in place (any number of rows of `len`).
    pub fn normalize_in_place(&self, x: &mut [f32]) {
        for row in x.chunks_exact_mut(self.len.max(1)) {
            for ((v, s), b) in row.iter_mut().zip(&self.scale).zip(&self.shift) {
                *v = *v * s + b;
            }
        }
    }
}

/// The action distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ActionKind {
    /// Categorical over `n` values `start..start + n`.
    Discrete {
        /// Number of values.
        n: i64,
        /// Smallest value.
        start: i64,
    },
    /// Diagonal Gaussian, clipped into `[low, high]` when sent to the env.
    Gaussian {
        /// Lower bounds.
        low: Vec<f32>,
        /// Upper bounds.
        high: Vec<f32>,
    },
}

impl ActionKind {
    /// The distribution for an action space (Discrete, or a Box with finite bounds).
    pub fn new(space: &Space) -> Result<Self> {
        match space {
            Space::Discrete { n, start } if *n >= 1 => Ok(Self::Discrete {
                n: *n,
                start: *start,
            }),
            Space::Box { low, high, .. }
                if low.iter().chain(high).all(|v| v.is_finite()) && !low.is_empty() =>
            {
                Ok(Self::Gaussian {
                    low: low.clone(),
                    high: high.clone(),
                })
            }
            other => Err(AgentError::arg(
                "action_space",
                format!("needs Discrete or a finite Box, got {}", other.describe()),
            )),
        }
    }

    /// Outputs of the policy head (logits or means).
    pub fn outputs(&self) -> usize {
        match self {
            Self::Discrete { n, .. } => *n as usize,
            Self::Gaussian { low, .. } => low.len(),
        }
    }

    /// Numbers stored per action in a rollout buffer (1 for Discrete: the index from 0).
    pub fn stored_len(&self) -> usize {
        match self {
            Self::Discrete { .. } => 1,
            Self::Gaussian { low, .. } => low.len(),
        }
    }

    /// The env action (flat, as [`scopegym_envs::vector::VectorEnv::step_flat`] takes it) of
    /// a stored action: the index plus `start`, or the sample clipped to the bounds.
    pub fn to_env_flat(&self, stored: &[f32], out: &mut [f32]) {
        match self {
            Self::Discrete { start, .. } => out[0] = (stored[0] as i64 + start) as f32,
            Self::Gaussian { low, high } => {
                for (((o, &a), &lo), &hi) in out.iter_mut().zip(stored).zip(low).zip(high) {
                    *o = if a.is_finite() {
                        a.clamp(lo, hi)
                    } else {
                        0.5 * (lo + hi)
                    };
                }
            }
        }
    }

    /// The env [`Value`] of a stored action.
    pub fn to_value(&self, stored: &[f32]) -> Value {
        match self {
            Self::Discrete { start, .. } => Value::Discrete(stored[0] as i64 + start),
            Self::Gaussian { low, .. } => {
                let mut v = vec![0.0; low.len()];
                self.to_env_flat(stored, &mut v);
                Value::Box(v)
            }
        }
    }

    /// The deterministic stored action of a policy output row (argmax of the logits, or the
    /// mean).
    pub fn mode(&self, out: &[f32]) -> Vec<f32> {
        match self {
            Self::Discrete { .. } => vec![argmax(out) as f32],
            Self::Gaussian { .. } => out.to_vec(),
        }
    }
}

/// Index of the largest value (the first of ties; NaN never wins).
pub(crate) fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || x[best].is_nan() {
            best = i;
        }
    }
    best
}

/// What defines a network: its observation layout and action distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetSpec {
    /// The observation layout.
    pub obs: ObsLayout,
    /// The action distribution.
    pub action: ActionKind,
}

impl NetSpec {
    /// The spec for an env's spaces.
    pub fn for_env(env: &dyn Env) -> Result<Self> {
        Self::new(env.observation_space(), env.action_space())
    }

    /// The spec for these spaces.
    pub fn new(observation_space: &Space, action_space: &Space) -> Result<Self> {
        Ok(Self {
            obs: ObsLayout::new(observation_space)?,
            action: ActionKind::new(action_space)?,
        })
    }
}

/// An actor and a critic over shared observation encoders (the CNNs of the images).
#[derive(Debug)]
pub struct ActorCritic {
    /// What it was built for.
    pub spec: NetSpec,
    /// The parameters.
    pub vs: nn::VarStore,
    cnns: Vec<Option<nn::Sequential>>,
    actor: nn::Sequential,
    critic: nn::Sequential,
    log_std: Option<Tensor>,
    /// Whether the features are the normalized observation itself (one Vector part).
    identity: bool,
}

fn conv_out(i: usize, k: usize, s: usize) -> usize {
    (i - k) / s + 1
}

fn linear(p: nn::Path, i: usize, o: usize, gain: f64) -> nn::Linear {
    nn::linear(
        p,
        i as i64,
        o as i64,
        nn::LinearConfig {
            ws_init: nn::Init::Orthogonal { gain },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}

fn conv(p: nn::Path, i: i64, o: i64, k: i64, stride: i64) -> nn::Conv2D {
    let mut c = nn::conv2d(
        p,
        i,
        o,
        k,
        nn::ConvConfig {
            stride,
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        },
    );
    // tch's orthogonal initializer returns the 2-D matrix for a 4-D weight, so set it in place
    // (a `[out, in · k · k]` orthogonal matrix viewed as the kernel, as PyTorch does).
    tch::no_grad(|| {
        let q = nn::init(
            nn::Init::Orthogonal {
                gain: std::f64::consts::SQRT_2,
            },
            &[o, i * k * k],
            Device::Cpu,
        );
        c.ws.copy_(&q.view_as(&c.ws));
    });
    c
}

/// A CNN for a `h × w` image (one channel) and its output width.
fn cnn(p: &nn::Path, h: usize, w: usize) -> (nn::Sequential, usize) {
    let (h, w) = (h as i64, w as i64);
    let g = std::f64::consts::SQRT_2;
    if h.min(w) >= NATURE_CNN_SIDE as i64 {
        let (oh, ow) = {
            let f = |x: usize| conv_out(conv_out(conv_out(x, 8, 4), 4, 2), 3, 1);
            (f(h as usize), f(w as usize))
        };
        let flat = 64 * oh * ow;
        let s = nn::seq()
            .add_fn(move |x| x.reshape([-1, 1, h, w]))
            .add(conv(p / "c1", 1, 32, 8, 4))
            .add_fn(|x| x.relu())
            .add(conv(p / "c2", 32, 64, 4, 2))
            .add_fn(|x| x.relu())
            .add(conv(p / "c3", 64, 64, 3, 1))
            .add_fn(|x| x.relu().flatten(1, -1))
            .add(linear(p / "fc", flat, 512, g))
            .add_fn(|x| x.relu());
        (s, 512)
    } else {
        let (oh, ow) = {
            let f = |x: usize| conv_out(conv_out(x, 3, 2), 3, 2);
            (f(h as usize), f(w as usize))
        };
        let flat = 32 * oh * ow;
        let s = nn::seq()
            .add_fn(move |x| x.reshape([-1, 1, h, w]))
            .add(conv(p / "c1", 1, 16, 3, 2))
            .add_fn(|x| x.relu())
            .add(conv(p / "c2", 16, 32, 3, 2))
            .add_fn(|x| x.relu().flatten(1, -1))
            .add(linear(p / "fc", flat, 128, g))
            .add_fn(|x| x.relu());
        (s, 128)
    }
}

fn mlp(p: &nn::Path, i: usize, o: usize, head_gain: f64) -> nn::Sequential {
    let g = std::f64::consts::SQRT_2;
    nn::seq()
        .add(linear(p / "l1", i, 64, g))
        .add_fn(|x| x.tanh())
        .add(linear(p / "l2", 64, 64, g))
        .add_fn(|x| x.tanh())
        .add(linear(p / "l3", 64, o, head_gain))
}

impl ActorCritic {
    /// A freshly initialized network (libtorch's generator seeded with `seed`).
    pub fn new(spec: NetSpec, seed: u64) -> Result<Self> {
        let _lock = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let mut cnns = Vec::new();
        let mut features = 0;
        for (k, (_, part)) in spec.obs.parts.iter().enumerate() {
            match part {
                Part::Vector { len, .. } => {
                    features += len;
                    cnns.push(None);
                }
                Part::Image { height, width, .. } => {
                    let (s, f) = cnn(&(&root / format!("cnn{k}")), *height, *width);
                    features += f;
                    cnns.push(Some(s));
                }
                Part::Skipped { .. } => cnns.push(None),
            }
        }
        if features == 0 {
            return Err(AgentError::arg(
                "observation_space",
                "no part of the observation can be encoded",
            ));
        }
        let actor = mlp(&(&root / "actor"), features, spec.action.outputs(), 0.01);
        let critic = mlp(&(&root / "critic"), features, 1, 1.0);
        let log_std = match &spec.action {
            ActionKind::Gaussian { low, .. } => Some(root.zeros("log_std", &[low.len() as i64])),
            ActionKind::Discrete { .. } => None,
        };
        let identity = matches!(spec.obs.parts.as_slice(), [(_, Part::Vector { offset: 0, len })] if *len == spec.obs.len);
        Ok(Self {
            spec,
            vs,
            cnns,
            actor,
            critic,
            log_std,
            identity,
        })
    }

    /// The features of normalized observations `[B, len]`.
    pub fn features(&self, x: &Tensor) -> Tensor {
        if self.identity {
            return x.shallow_clone();
        }
        let mut f = Vec::new();
        for ((_, part), cnn) in self.spec.obs.parts.iter().zip(&self.cnns) {
            match part {
                Part::Vector { offset, len } => f.push(x.narrow(1, *offset as i64, *len as i64)),
                Part::Image {
                    offset,
                    height,
                    width,
                } => {
                    let img = x.narrow(1, *offset as i64, (*height * *width) as i64);
                    if let Some(c) = cnn {
                        f.push(c.forward(&img));
                    }
                }
                Part::Skipped { .. } => {}
            }
        }
        Tensor::cat(&f, 1)
    }

    /// The policy head's output (logits or Gaussian means) `[B, outputs]` for normalized
    /// observations `[B, len]`.
    pub fn policy(&self, x: &Tensor) -> Tensor {
        self.actor.forward(&self.features(x))
    }

    /// Policy output and value `[B]` for normalized observations `[B, len]`.
    pub fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        let f = self.features(x);
        (
            self.actor.forward(&f),
            self.critic.forward(&f).squeeze_dim(1),
        )
    }

    /// The value `[B]` of normalized observations `[B, len]`.
    pub fn value(&self, x: &Tensor) -> Tensor {
        self.critic.forward(&self.features(x)).squeeze_dim(1)
    }

    /// The Gaussian's log standard deviations (`None` for Discrete).
    pub fn log_std(&self) -> Option<&Tensor> {
        self.log_std.as_ref()
    }

    /// Log-probabilities `[B]` of stored actions `[B, stored_len]` and entropies `[B]` under
    /// policy outputs `[B, outputs]`.
    pub fn log_prob_entropy(&self, out: &Tensor, actions: &Tensor) -> (Tensor, Tensor) {
        match &self.log_std {
            None => {
                let logp = out.log_softmax(-1, Kind::Float);
                let idx = actions.to_kind(Kind::Int64).view([-1, 1]);
                let lp = logp.gather(1, &idx, false).squeeze_dim(1);
                let ent = -(logp.exp() * &logp).sum_dim_intlist(-1, false, Kind::Float);
                (lp, ent)
            }
            Some(log_std) => {
                let c = 0.5 * (2.0 * std::f64::consts::PI).ln();
                let z = (actions - out) * (-log_std).exp();
                let lp = (z.square() * -0.5 - log_std - c).sum_dim_intlist(-1, false, Kind::Float);
                let ent = (log_std + 0.5 + c).sum(Kind::Float);
                (lp, ent.expand([out.size()[0]], false))
            }
        }
    }
}

/// Samples a stored action from one row of policy outputs with our generator and returns its
/// log-probability (the same formula as [`ActorCritic::log_prob_entropy`]). `std` holds the
/// Gaussian's standard deviations, `log_std` their logarithms (empty for Discrete).
pub(crate) fn sample_row(
    kind: &ActionKind,
    out: &[f32],
    std: &[f32],
    log_std: &[f32],
    rng: &mut scopegym_envs::rng::SimRng,
    stored: &mut [f32],
) -> f32 {
    use rand::Rng;
    match kind {
        ActionKind::Discrete { .. } => {
            // log-softmax, then inverse-CDF sampling.
            let m = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = out.iter().map(|v| (v - m).exp()).sum();
            let lz = m + z.ln();
            let u: f32 = rng.random::<f32>() * z;
            let mut acc = 0.0;
            let mut k = out.len() - 1;
            for (i, v) in out.iter().enumerate() {
                acc += (v - m).exp();
                if u < acc {
                    k = i;
                    break;
                }
            }
            stored[0] = k as f32;
            out[k] - lz
        }
        ActionKind::Gaussian { .. } => {
            let c = 0.5 * (2.0 * std::f32::consts::PI).ln();
            let mut lp = 0.0;
            for i in 0..out.len() {
                let e: f32 = rng.sample(rand_distr::StandardNormal);
                stored[i] = out[i] + std[i] * e;
                lp += -0.5 * e * e - log_std[i] - c;
            }
            lp
        }
    }
}
