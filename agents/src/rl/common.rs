//! What PPO and REINFORCE share: the training envs, policy evaluation and sampling on
//! batches, evaluation-time acting, and checkpoints.

use super::net::{ActorCritic, NetSpec, sample_row};
use crate::agent::TrainSpec;
use crate::error::{AgentError, Result};
use scopegym_envs::rng::{SimRng, seeded};
use scopegym_envs::vector::{AutoReset, VectorEnv};
use scopegym_envs::{Env, InfoValue, Value};
use scopegym_physics::rng::derive_seed;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::Tensor;

/// `num_envs` envs of the task `spec` names, with its config.
pub(crate) fn make_envs(spec: &TrainSpec<'_>, num_envs: usize) -> Result<Vec<Box<dyn Env>>> {
    Ok((0..num_envs)
        .map(|_| scopegym_envs::registry::make(spec.env_id, spec.env_config))
        .collect::<std::result::Result<Vec<_>, _>>()?)
}

/// A training env whose failed resets are retried: when the task cannot set up an episode
/// (e.g. StemDopantSteer-v1's survey misses the lattice for about one seed in 20 000), the
/// reset is tried again with seeds derived from the failed one, up to [`RESET_RETRIES`]
/// times, and counted in `failures`. Training only: evaluation sees every failure.
pub(crate) struct RetryReset {
    inner: Box<dyn Env>,
    /// Seed stream of the retries (advanced on every retry).
    next: u64,
    failures: Arc<AtomicU64>,
}

/// Retries of a failed training reset before its error is returned.
pub(crate) const RESET_RETRIES: usize = 8;

impl RetryReset {
    pub(crate) fn wrap(inner: Box<dyn Env>, seed: u64, failures: Arc<AtomicU64>) -> Box<dyn Env> {
        Box::new(Self {
            inner,
            next: seed,
            failures,
        })
    }
}

impl std::fmt::Debug for RetryReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RetryReset({})", self.inner.id())
    }
}

impl Env for RetryReset {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn observation_space(&self) -> &scopegym_envs::Space {
        self.inner.observation_space()
    }
    fn action_space(&self) -> &scopegym_envs::Space {
        self.inner.action_space()
    }
    fn max_episode_steps(&self) -> usize {
        self.inner.max_episode_steps()
    }
    fn reset(&mut self, seed: Option<u64>) -> scopegym_envs::Result<(Value, scopegym_envs::Info)> {
        let mut r = self.inner.reset(seed);
        for _ in 0..RESET_RETRIES {
            if r.is_ok() {
                break;
            }
            self.failures.fetch_add(1, Ordering::Relaxed);
            self.next = derive_seed(self.next ^ seed.unwrap_or(0), "ppo-reset-retry");
            r = self.inner.reset(Some(self.next));
        }
        r
    }
    fn step(&mut self, action: &Value) -> scopegym_envs::Result<scopegym_envs::Step> {
        self.inner.step(action)
    }
    fn step_into(
        &mut self,
        action: &Value,
        obs: &mut Value,
    ) -> scopegym_envs::Result<scopegym_envs::Step> {
        self.inner.step_into(action, obs)
    }
    fn render(&self) -> scopegym_envs::RgbImage {
        self.inner.render()
    }
    fn heuristic_action(&mut self, obs: &Value) -> Value {
        self.inner.heuristic_action(obs)
    }
}

/// The training vector env over `envs` (same-step autoreset: a finished episode's last
/// observation is in `info["final_obs"]`, which truncated episodes bootstrap from).
pub(crate) fn vec_env(
    envs: Vec<Box<dyn Env>>,
    num_envs: usize,
    threads: usize,
) -> Result<VectorEnv> {
    if envs.len() != num_envs {
        return Err(AgentError::arg(
            "envs",
            format!("expected num_envs = {num_envs} envs, got {}", envs.len()),
        ));
    }
    Ok(VectorEnv::new(envs, AutoReset::SameStep, threads.max(1))?)
}

/// The normalized final observation of env `i` of `venv` after a step that ended its episode
/// (into `out`); false when the env reported none.
pub(crate) fn final_obs(venv: &VectorEnv, i: usize, net: &ActorCritic, out: &mut [f32]) -> bool {
    match venv.infos()[i].get("final_obs") {
        Some(InfoValue::F64s(v)) if v.len() == out.len() => {
            for (o, x) in out.iter_mut().zip(v) {
                *o = *x as f32;
            }
            net.spec.obs.normalize_in_place(out);
            true
        }
        _ => false,
    }
}

/// Copies a tensor's values into a `Vec<f32>`.
pub(crate) fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        &t.flatten(0, -1).to_kind(tch::Kind::Float),
    )?)
}

/// The policy's outputs for normalized observations `x` (`rows × len`): policy outputs
/// (flattened `rows × outputs`) and values.
pub(crate) fn eval_batch(
    net: &ActorCritic,
    x: &[f32],
    rows: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let t = Tensor::from_slice(x).view([rows as i64, net.spec.obs.len as i64]);
    let (out, v) = tch::no_grad(|| net.forward(&t));
    Ok((to_vec(&out)?, to_vec(&v)?))
}

/// The values of normalized observations `x` (`rows × len`).
pub(crate) fn values(net: &ActorCritic, x: &[f32], rows: usize) -> Result<Vec<f32>> {
    let t = Tensor::from_slice(x).view([rows as i64, net.spec.obs.len as i64]);
    to_vec(&tch::no_grad(|| net.value(&t)))
}

/// The Gaussian's standard deviations and their logarithms (empty for Discrete).
pub(crate) fn stds(net: &ActorCritic) -> Result<(Vec<f32>, Vec<f32>)> {
    match net.log_std() {
        Some(l) => {
            let ls = to_vec(&l.detach())?;
            Ok((ls.iter().map(|v| v.exp()).collect(), ls))
        }
        None => Ok((Vec::new(), Vec::new())),
    }
}

/// Samples one action per row of policy outputs: stored actions into `stored` (`rows ×
/// stored_len`), their log-probabilities into `logp`, the env actions into `env_flat`.
pub(crate) fn sample_batch(
    net: &ActorCritic,
    out: &[f32],
    (std, log_std): (&[f32], &[f32]),
    rng: &mut SimRng,
    stored: &mut [f32],
    logp: &mut [f32],
    env_flat: &mut [f32],
) {
    let kind = &net.spec.action;
    let (k, sl, el) = (
        kind.outputs(),
        kind.stored_len(),
        env_flat.len() / logp.len(),
    );
    for i in 0..logp.len() {
        let s = &mut stored[i * sl..(i + 1) * sl];
        logp[i] = sample_row(kind, &out[i * k..(i + 1) * k], std, log_std, rng, s);
        kind.to_env_flat(s, &mut env_flat[i * el..(i + 1) * el]);
    }
}

/// Evaluation-time acting: the deterministic action (most probable, or the mean, clipped) or a
/// sample from the policy. It keeps the policy's output and the critic's value of the last
/// observation it acted on ([`Actor::insight`]).
#[derive(Debug)]
pub(crate) struct Actor {
    rng: SimRng,
    buf: Vec<f32>,
    /// The policy output row (logits or Gaussian means) and the value of the last observation.
    last: Option<(Vec<f32>, f32)>,
}

impl Actor {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            rng: seeded(seed),
            buf: Vec::new(),
            last: None,
        }
    }

    pub(crate) fn begin(&mut self, seed: u64) {
        self.rng = seeded(seed ^ 0x5eed_ac70_0000_0001);
        self.last = None;
    }

    /// The action distribution and value of the observation acted on last: the softmax of the
    /// logits (Discrete), or the Gaussian's mean, standard deviation and the bounds (Box, in
    /// the action's units), and the critic's `V(obs)`.
    pub(crate) fn insight(&self, net: &ActorCritic) -> crate::agent::Insight {
        let mut ins = crate::agent::Insight::default();
        let Some((out, value)) = &self.last else {
            return ins;
        };
        ins.value = Some(f64::from(*value));
        match &net.spec.action {
            super::net::ActionKind::Discrete { .. } => ins.action_probs = softmax(out),
            super::net::ActionKind::Gaussian { low, high } => {
                ins.action_mean = out.iter().map(|&v| f64::from(v)).collect();
                if let Ok((std, _)) = stds(net) {
                    ins.action_sd = std.iter().map(|&v| f64::from(v)).collect();
                }
                ins.action_bounds = low
                    .iter()
                    .zip(high)
                    .map(|(&l, &h)| [f64::from(l), f64::from(h)])
                    .collect();
            }
        }
        ins
    }

    pub(crate) fn act(
        &mut self,
        net: &ActorCritic,
        obs: &Value,
        deterministic: bool,
    ) -> Result<Value> {
        self.buf.resize(net.spec.obs.len, 0.0);
        net.spec.obs.normalize_into(obs, &mut self.buf)?;
        let t = Tensor::from_slice(&self.buf).view([1, net.spec.obs.len as i64]);
        // The policy and the value in one pass over the shared features.
        let (out, value) = tch::no_grad(|| net.forward(&t));
        let (out, value) = (to_vec(&out)?, to_vec(&value)?);
        self.last = None;
        if out.iter().any(|v| !v.is_finite()) {
            return Err(AgentError::numerical("policy", "non-finite policy output"));
        }
        self.last = Some((out.clone(), value.first().copied().unwrap_or(f32::NAN)));
        let kind = &net.spec.action;
        let stored = if deterministic {
            kind.mode(&out)
        } else {
            let (std, log_std) = stds(net)?;
            let mut s = vec![0.0; kind.stored_len()];
            sample_row(kind, &out, &std, &log_std, &mut self.rng, &mut s);
            s
        };
        Ok(kind.to_value(&stored))
    }
}

/// The softmax of logits, in f64 (sums to 1 up to rounding).
pub(crate) fn softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = logits.iter().map(|&v| f64::from(v - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|v| v / z).collect()
}

/// The JSON written beside a checkpoint's weights (`<path>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Checkpoint<C> {
    /// `ppo` or `reinforce`.
    pub agent: String,
    /// The agent's config.
    pub config: C,
    /// The network's spec.
    pub spec: NetSpec,
    /// The agent's seed.
    pub seed: u64,
}

/// `<path>.json`.
pub(crate) fn sidecar(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> AgentError {
    AgentError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Saves the weights to `path` (tch's format by extension: `.safetensors`, else `.ot`) and the
/// checkpoint description to `<path>.json`.
pub(crate) fn save<C: Serialize>(net: &ActorCritic, ck: &Checkpoint<C>, path: &Path) -> Result<()> {
    net.vs.save(path).map_err(|e| io_err(path, e))?;
    let js = sidecar(path);
    let text = serde_json::to_string_pretty(ck).map_err(|e| io_err(&js, e))?;
    std::fs::write(&js, text).map_err(|e| io_err(&js, e))
}

/// Loads a checkpoint written by [`save`]: its description and the network with its weights.
pub(crate) fn load<C: serde::de::DeserializeOwned>(
    path: &Path,
    agent: &str,
) -> Result<(Checkpoint<C>, ActorCritic)> {
    let js = sidecar(path);
    let text = std::fs::read_to_string(&js).map_err(|e| io_err(&js, e))?;
    let raw: Checkpoint<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| io_err(&js, e))?;
    if raw.agent != agent {
        return Err(io_err(
            &js,
            format!("a checkpoint of agent {:?}, not {agent:?}", raw.agent),
        ));
    }
    let ck = Checkpoint {
        config: serde_json::from_value(raw.config).map_err(|e| io_err(&js, e))?,
        agent: raw.agent,
        spec: raw.spec,
        seed: raw.seed,
    };
    let mut net = ActorCritic::new(ck.spec.clone(), ck.seed)?;
    net.vs.load(path).map_err(|e| io_err(path, e))?;
    Ok((ck, net))
}

/// Exports the deterministic policy head (normalized observation `[1, len]` → logits or
/// Gaussian means) as TorchScript, by tracing.
pub(crate) fn export_torchscript(net: &ActorCritic, path: &Path) -> Result<()> {
    let example = Tensor::zeros(
        [1, net.spec.obs.len as i64],
        (tch::Kind::Float, tch::Device::Cpu),
    );
    // Tracing records parameters as constants, which must not require gradients: trace a
    // frozen copy.
    let mut copy = ActorCritic::new(net.spec.clone(), 0)?;
    copy.vs.copy(&net.vs)?;
    copy.vs.freeze();
    let m = tch::no_grad(|| {
        tch::CModule::create_by_tracing("policy", "forward", &[example], &mut |xs| {
            vec![copy.policy(&xs[0])]
        })
    })?;
    m.save(path).map_err(|e| io_err(path, e))
}

/// Mean of the returns of the episodes that ended, if any.
pub(crate) fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// [`crate::Agent::save`] of a neural agent: the checkpoint `<dir>/<name>.safetensors` (with
/// its `.json`) and the TorchScript policy `<dir>/<name>.pt`.
pub(crate) fn save_agent_files(
    dir: &Path,
    name: &str,
    checkpoint: impl FnOnce(&Path) -> Result<()>,
    torchscript: impl FnOnce(&Path) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let ck = dir.join(format!("{name}.safetensors"));
    let pt = dir.join(format!("{name}.pt"));
    checkpoint(&ck)?;
    torchscript(&pt)?;
    Ok(vec![ck.clone(), sidecar(&ck), pt])
}

/// Checks that a loaded network fits `env`'s spaces (a checkpoint of another task would
/// otherwise fail deep inside libtorch).
pub(crate) fn check_fits(spec: &NetSpec, env: &dyn Env, path: &Path) -> Result<()> {
    let want = NetSpec::for_env(env)?;
    if *spec == want {
        Ok(())
    } else {
        Err(io_err(
            path,
            format!(
                "the checkpoint's network does not fit {}'s spaces (trained for another task?)",
                env.id()
            ),
        ))
    }
}
