//! PPO (clipped surrogate, GAE) with CleanRL's defaults (DESIGN.md §9), on rollouts from the
//! native vector env.
//!
//! Each iteration collects `num_steps` steps of `num_envs` envs (same-step autoreset), computes
//! GAE advantages and returns, and runs `update_epochs` epochs of `num_minibatches`
//! minibatches of the clipped objective with a clipped value loss and an entropy bonus.
//!
//! Terminations and truncations: a terminated episode's next value is 0; a truncated one
//! (the step limit, or an instrument failure the vector env turns into a truncation) is
//! bootstrapped by adding `γ V(final observation)` to its last reward (the final observation
//! comes from the vector env's `info["final_obs"]`), then cut like a termination.
//!
//! Training runs `⌈steps / (num_steps · num_envs)⌉` iterations (at least one), so it may take
//! up to one batch more env steps than asked.
//!
//! Options beyond CleanRL's (off by default): `init_log_std` (the Gaussian's initial spread)
//! and `curriculum` (stages of training on the task's own config with some settings changed,
//! e.g. nearer goals, before the evaluated setting; [`CurriculumStage`]). A training env
//! whose reset fails (a task that cannot set up an episode for some seed) is reset again with
//! another seed (counted in [`PpoStats::reset_failures`]).

use super::common::{self, Actor, Checkpoint};
use super::net::{ActorCritic, NetSpec};
use crate::agent::{Agent, CurvePoint, TrainSpec};
use crate::error::{AgentError, Result};
use rand::seq::SliceRandom;
use scopegym_envs::rng::seeded;
use scopegym_envs::{Env, Value};
use scopegym_physics::rng::derive_seed;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn::OptimizerConfig;
use tch::{Kind, Tensor, nn};

/// PPO's settings (CleanRL's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// Adam's learning rate at the start. Default 2.5e-4.
    pub learning_rate: f64,
    /// Anneal the learning rate linearly to 0 over training. Default true.
    pub anneal_lr: bool,
    /// Adam's ε. Default 1e-5.
    pub adam_eps: f64,
    /// Parallel envs. Default 8.
    pub num_envs: usize,
    /// Steps per env per rollout. Default 128.
    pub num_steps: usize,
    /// Discount γ. Default 0.99.
    pub gamma: f64,
    /// GAE λ. Default 0.95.
    pub gae_lambda: f64,
    /// Minibatches per epoch. Default 4.
    pub num_minibatches: usize,
    /// Epochs per rollout. Default 4.
    pub update_epochs: usize,
    /// Surrogate clipping ε. Default 0.2.
    pub clip_coef: f64,
    /// Clip the value loss too (with `clip_coef`). Default true.
    pub clip_vloss: bool,
    /// Entropy bonus coefficient. Default 0.01.
    pub ent_coef: f64,
    /// Value loss coefficient. Default 0.5.
    pub vf_coef: f64,
    /// Global gradient norm clip. Default 0.5.
    pub max_grad_norm: f64,
    /// Normalize advantages per minibatch. Default true.
    pub norm_adv: bool,
    /// Evaluation acts deterministically (argmax, or the Gaussian mean clipped). Default true.
    pub deterministic_eval: bool,
    /// Threads stepping the envs (libtorch itself uses one). Default 1.
    pub env_threads: usize,
    /// Initial log standard deviation of the Gaussian policy (Box actions), per component, in
    /// units of the action (CleanRL: 0, a standard deviation of 1, half the width of a
    /// `[-1, 1]` Box). Default 0.
    pub init_log_std: f64,
    /// A training curriculum over the task's own config (default empty: none). Stage `k`
    /// trains on envs whose config is the task's training config with `stage.env_config`
    /// merged over it, until the fraction `stage.until` of the training steps; after the last
    /// stage, training goes on with the task's config unchanged (the evaluated setting). Only
    /// [`Agent::train`] applies it (evaluation never sees it); every stage must keep the
    /// task's observation and action spaces. See [`CurriculumStage`].
    pub curriculum: Vec<CurriculumStage>,
}

/// One stage of [`PpoConfig::curriculum`], e.g. `{ until = 0.3, env_config = { goal_distance =
/// [1.4e-10, 1.6e-10] } }`: the first 30 % of training with goals one bond away.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurriculumStage {
    /// The stage ends at this fraction of the training steps, in (0, 1] (stages in increasing
    /// order).
    pub until: f64,
    /// Task settings merged over the training config for this stage (a TOML table, as a
    /// task's `config`; the task validates it).
    pub env_config: toml::Table,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            learning_rate: 2.5e-4,
            anneal_lr: true,
            adam_eps: 1e-5,
            num_envs: 8,
            num_steps: 128,
            gamma: 0.99,
            gae_lambda: 0.95,
            num_minibatches: 4,
            update_epochs: 4,
            clip_coef: 0.2,
            clip_vloss: true,
            ent_coef: 0.01,
            vf_coef: 0.5,
            max_grad_norm: 0.5,
            norm_adv: true,
            deterministic_eval: true,
            env_threads: 1,
            init_log_std: 0.0,
            curriculum: Vec::new(),
        }
    }
}

/// A fresh network for `spec` (seeded from `seed`), its Gaussian log standard deviations set
/// to `cfg.init_log_std`.
fn init_net(spec: NetSpec, cfg: &PpoConfig, seed: u64) -> Result<ActorCritic> {
    let net = ActorCritic::new(spec, derive_seed(seed, "ppo-init"))?;
    if let Some(l) = net.log_std() {
        tch::no_grad(|| {
            let _ = l.shallow_clone().fill_(cfg.init_log_std);
        });
    }
    Ok(net)
}

/// Whether two specs have the same observation layout and action distribution (their
/// observation normalizations may differ).
fn same_shapes(a: &NetSpec, b: &NetSpec) -> bool {
    a.action == b.action && a.obs.len == b.obs.len && a.obs.parts == b.obs.parts
}

pub(crate) fn check(ok: bool, field: &str, reason: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(AgentError::config(field, reason))
    }
}

impl PpoConfig {
    /// Errors naming the first out-of-range field.
    pub fn validate(&self) -> Result<()> {
        let pos = |v: f64| v.is_finite() && v > 0.0;
        let nonneg = |v: f64| v.is_finite() && v >= 0.0;
        check(
            pos(self.learning_rate),
            "learning_rate",
            "must be positive and finite",
        )?;
        check(
            pos(self.adam_eps),
            "adam_eps",
            "must be positive and finite",
        )?;
        check(self.num_envs >= 1, "num_envs", "must be at least 1")?;
        check(self.num_steps >= 1, "num_steps", "must be at least 1")?;
        check(
            (0.0..=1.0).contains(&self.gamma),
            "gamma",
            "must be in [0, 1]",
        )?;
        check(
            (0.0..=1.0).contains(&self.gae_lambda),
            "gae_lambda",
            "must be in [0, 1]",
        )?;
        check(
            self.num_minibatches >= 1,
            "num_minibatches",
            "must be at least 1",
        )?;
        check(
            self.num_minibatches <= self.num_envs * self.num_steps,
            "num_minibatches",
            "must not exceed num_envs · num_steps",
        )?;
        check(
            self.update_epochs >= 1,
            "update_epochs",
            "must be at least 1",
        )?;
        check(
            pos(self.clip_coef),
            "clip_coef",
            "must be positive and finite",
        )?;
        check(
            nonneg(self.ent_coef),
            "ent_coef",
            "must be non-negative and finite",
        )?;
        check(
            nonneg(self.vf_coef),
            "vf_coef",
            "must be non-negative and finite",
        )?;
        check(
            pos(self.max_grad_norm),
            "max_grad_norm",
            "must be positive and finite",
        )?;
        check(self.env_threads >= 1, "env_threads", "must be at least 1")?;
        check(
            self.init_log_std.is_finite() && self.init_log_std.abs() <= 5.0,
            "init_log_std",
            "must lie in [-5, 5]",
        )?;
        let mut prev = 0.0;
        for st in &self.curriculum {
            check(
                st.until.is_finite() && st.until > prev && st.until <= 1.0,
                "curriculum",
                "each stage's `until` must lie in (0, 1], increasing",
            )?;
            prev = st.until;
        }
        Ok(())
    }
}

/// Per-iteration training statistics (the last iteration's, for diagnostics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PpoStats {
    /// Policy (clipped surrogate) loss of the last minibatch.
    pub policy_loss: f64,
    /// Value loss of the last minibatch.
    pub value_loss: f64,
    /// Mean entropy of the last minibatch.
    pub entropy: f64,
    /// Fraction of samples of the last epoch whose ratio was clipped.
    pub clip_fraction: f64,
    /// Training resets that failed and were retried with another seed, so far.
    pub reset_failures: u64,
}

/// The PPO agent.
#[derive(Debug)]
pub struct PpoAgent {
    cfg: PpoConfig,
    net: ActorCritic,
    seed: u64,
    actor: Actor,
    /// The last iteration's statistics.
    pub stats: PpoStats,
}

impl PpoAgent {
    /// A fresh agent for networks of `spec`, seeded with `seed`.
    pub fn new(spec: NetSpec, cfg: PpoConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        tch::set_num_threads(1);
        Ok(Self {
            net: init_net(spec, &cfg, seed)?,
            cfg,
            seed,
            actor: Actor::new(seed),
            stats: PpoStats::default(),
        })
    }

    /// A fresh agent for `env`'s spaces from a TOML config (`None`: the defaults).
    pub fn from_toml(env: &dyn Env, config: Option<&toml::Value>, seed: u64) -> Result<Self> {
        Self::new(NetSpec::for_env(env)?, super::parse_config(config)?, seed)
    }

    /// The config.
    pub fn config(&self) -> &PpoConfig {
        &self.cfg
    }

    /// The network.
    pub fn net(&self) -> &ActorCritic {
        &self.net
    }

    /// Saves the weights to `path` (`.safetensors`, or tch's `.ot` for other extensions) and
    /// the config and network spec to `<path>.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let ck = Checkpoint {
            agent: "ppo".into(),
            config: self.cfg.clone(),
            spec: self.net.spec.clone(),
            seed: self.seed,
        };
        common::save(&self.net, &ck, path.as_ref())
    }

    /// Loads an agent saved by [`PpoAgent::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let (ck, net) = common::load::<PpoConfig>(path.as_ref(), "ppo")?;
        ck.config.validate()?;
        tch::set_num_threads(1);
        Ok(Self {
            cfg: ck.config,
            net,
            seed: ck.seed,
            actor: Actor::new(ck.seed),
            stats: PpoStats::default(),
        })
    }

    /// Exports the deterministic policy as TorchScript (see [`super::TorchScriptAgent`] for
    /// the module's contract).
    pub fn export_torchscript(&self, path: impl AsRef<Path>) -> Result<()> {
        common::export_torchscript(&self.net, path.as_ref())
    }

    /// One PPO update on a rollout (`b` samples).
    #[allow(clippy::too_many_arguments)]
    fn update(
        &mut self,
        opt: &mut nn::Optimizer,
        rng: &mut scopegym_envs::rng::SimRng,
        obs: &[f32],
        actions: &[f32],
        logp: &[f32],
        adv: &[f32],
        ret: &[f32],
        val: &[f32],
    ) -> Result<()> {
        let c = &self.cfg;
        let b = logp.len();
        let (len, sl) = (
            self.net.spec.obs.len as i64,
            self.net.spec.action.stored_len() as i64,
        );
        let b_obs = Tensor::from_slice(obs).view([b as i64, len]);
        let b_act = Tensor::from_slice(actions).view([b as i64, sl]);
        let b_logp = Tensor::from_slice(logp);
        let b_adv = Tensor::from_slice(adv);
        let b_ret = Tensor::from_slice(ret);
        let b_val = Tensor::from_slice(val);
        let mb = b / c.num_minibatches;
        let mut idx: Vec<i64> = (0..b as i64).collect();
        let mut stats = PpoStats::default();
        for _ in 0..c.update_epochs {
            idx.shuffle(rng);
            let mut clipped = 0.0;
            for k in 0..c.num_minibatches {
                let end = if k + 1 == c.num_minibatches {
                    b
                } else {
                    (k + 1) * mb
                };
                let i = Tensor::from_slice(&idx[k * mb..end]);
                let o = b_obs.index_select(0, &i);
                let a = b_act.index_select(0, &i);
                let (out, v) = self.net.forward(&o);
                let (lp, ent) = self.net.log_prob_entropy(&out, &a);
                let ratio = (&lp - b_logp.index_select(0, &i)).exp();
                let mut mb_adv = b_adv.index_select(0, &i);
                if c.norm_adv && end - k * mb > 1 {
                    mb_adv = (&mb_adv - mb_adv.mean(Kind::Float)) / (mb_adv.std(true) + 1e-8);
                }
                let pg1 = -&mb_adv * &ratio;
                let pg2 = -&mb_adv * ratio.clamp(1.0 - c.clip_coef, 1.0 + c.clip_coef);
                let pg_loss = pg1.maximum(&pg2).mean(Kind::Float);
                let r = b_ret.index_select(0, &i);
                let v_loss = if c.clip_vloss {
                    let old = b_val.index_select(0, &i);
                    let unclipped = (&v - &r).square();
                    let vc = &old + (&v - &old).clamp(-c.clip_coef, c.clip_coef);
                    let clipped = (vc - &r).square();
                    unclipped.maximum(&clipped).mean(Kind::Float) * 0.5
                } else {
                    (&v - &r).square().mean(Kind::Float) * 0.5
                };
                let ent_mean = ent.mean(Kind::Float);
                let loss = &pg_loss - &ent_mean * c.ent_coef + &v_loss * c.vf_coef;
                let lv = loss.double_value(&[]);
                if !lv.is_finite() {
                    return Err(AgentError::numerical("ppo update", format!("loss is {lv}")));
                }
                opt.zero_grad();
                loss.backward();
                opt.clip_grad_norm(c.max_grad_norm);
                opt.step();
                clipped += tch::no_grad(|| {
                    (ratio - 1.0)
                        .abs()
                        .gt(c.clip_coef)
                        .to_kind(Kind::Float)
                        .sum(Kind::Float)
                        .double_value(&[])
                });
                stats.policy_loss = pg_loss.double_value(&[]);
                stats.value_loss = v_loss.double_value(&[]);
                stats.entropy = ent_mean.double_value(&[]);
            }
            stats.clip_fraction = clipped / b as f64;
        }
        self.stats = stats;
        Ok(())
    }
    /// Trains on `envs` (`num_envs` of them, with the same spaces; env `i` is first reset with
    /// a seed derived from `seed` plus `i`) for `steps` env steps and returns the learning
    /// curve; [`Agent::train`] does this on envs of the task it names.
    pub fn train_envs(
        &mut self,
        envs: Vec<Box<dyn Env>>,
        steps: u64,
        seed: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<CurvePoint>> {
        self.train_stages(vec![(1.0, envs)], steps, seed, progress)
    }

    /// [`PpoAgent::train_envs`] through a sequence of stages `(until, envs)`: stage `k` runs
    /// the iterations up to the fraction `until` of the training (the last stage's `until` is
    /// taken as 1), each stage on its own envs (reset with a seed derived from `seed` and the
    /// stage; episodes in progress at a stage's end are dropped). The network, the optimizer
    /// and the learning-rate schedule carry over. The network is the last stage's (its
    /// observation normalization included); earlier stages must have the same observation
    /// layout and action distribution (their Box bounds may differ).
    pub fn train_stages(
        &mut self,
        stages: Vec<(f64, Vec<Box<dyn Env>>)>,
        steps: u64,
        seed: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<CurvePoint>> {
        tch::set_num_threads(1);
        let cfg = self.cfg.clone();
        let n_stages = stages.len();
        if n_stages == 0 {
            return Err(AgentError::arg("stages", "at least one stage is needed"));
        }
        // The network (and its observation normalization) is the last stage's: the setting
        // trained for. Earlier stages must have the same layout and action distribution.
        let last = stages[n_stages - 1].1.first().ok_or_else(|| {
            AgentError::arg(
                "envs",
                format!("expected num_envs = {} envs, got 0", cfg.num_envs),
            )
        })?;
        let netspec = NetSpec::for_env(last.as_ref())?;
        for (k, (_, envs)) in stages.iter().enumerate() {
            for e in envs {
                if !same_shapes(&NetSpec::for_env(e.as_ref())?, &netspec) {
                    return Err(AgentError::arg(
                        "curriculum",
                        format!(
                            "stage {k} has other observation or action spaces than the last stage"
                        ),
                    ));
                }
            }
        }
        if netspec != self.net.spec {
            self.net = init_net(netspec, &cfg, self.seed)?;
        }
        let failures = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let retrying = |envs: Vec<Box<dyn Env>>, stage: usize| -> Vec<Box<dyn Env>> {
            envs.into_iter()
                .enumerate()
                .map(|(i, e)| {
                    let s = derive_seed(seed, &format!("ppo-retry-{stage}-{i}"));
                    common::RetryReset::wrap(e, s, failures.clone())
                })
                .collect()
        };
        let mut stages = stages.into_iter();
        let (first_until, envs) = stages.next().expect("one stage");
        let mut venv = common::vec_env(retrying(envs, 0), cfg.num_envs, cfg.env_threads)?;
        let mut opt = nn::Adam {
            eps: cfg.adam_eps,
            ..Default::default()
        }
        .build(&self.net.vs, cfg.learning_rate)?;
        let (n, t_len) = (cfg.num_envs, cfg.num_steps);
        let len = self.net.spec.obs.len;
        let (sl, el) = (self.net.spec.action.stored_len(), venv.action_len());
        let k_out = self.net.spec.action.outputs();
        let batch = n * t_len;
        let iters = steps.div_ceil(batch as u64).max(1);
        let stage_end = |until: f64, last: bool| -> u64 {
            if last {
                iters
            } else {
                ((until * iters as f64).round() as u64).min(iters)
            }
        };
        let mut stage = 0usize;
        let mut end = stage_end(first_until, n_stages == 1);
        venv.reset(Some(derive_seed(seed, "ppo-envs")))?;
        let mut rng = seeded(derive_seed(seed, "ppo-sampling"));
        let mut obs = vec![0.0f32; batch * len];
        let mut actions = vec![0.0f32; batch * sl];
        let (mut logp, mut vals) = (vec![0.0f32; batch], vec![0.0f32; batch]);
        let (mut rewards, mut dones) = (vec![0.0f32; batch], vec![false; batch]);
        let mut env_actions = vec![0.0f32; n * el];
        let mut next_obs = venv.observations().to_vec();
        self.net.spec.obs.normalize_in_place(&mut next_obs);
        let mut fin = vec![0.0f32; len];
        let (mut trunc_obs, mut trunc_idx) = (Vec::new(), Vec::new());
        let mut ep_ret = vec![0.0f64; n];
        let mut curve = Vec::new();
        let mut global = 0u64;
        for it in 0..iters {
            while it >= end {
                let Some((until, envs)) = stages.next() else {
                    break;
                };
                stage += 1;
                venv = common::vec_env(retrying(envs, stage), cfg.num_envs, cfg.env_threads)?;
                end = stage_end(until, stage + 1 == n_stages);
                venv.reset(Some(derive_seed(seed, &format!("ppo-envs-stage{stage}"))))?;
                next_obs.copy_from_slice(venv.observations());
                self.net.spec.obs.normalize_in_place(&mut next_obs);
                ep_ret.iter_mut().for_each(|r| *r = 0.0);
            }
            if cfg.anneal_lr {
                opt.set_lr(cfg.learning_rate * (1.0 - it as f64 / iters as f64));
            }
            let sd = common::stds(&self.net)?;
            let mut finished = Vec::new();
            for t in 0..t_len {
                let rows = t * n..(t + 1) * n;
                obs[t * n * len..(t + 1) * n * len].copy_from_slice(&next_obs);
                let (out, v) = common::eval_batch(&self.net, &next_obs, n)?;
                if out.iter().any(|x| !x.is_finite()) {
                    return Err(AgentError::numerical(
                        "ppo rollout",
                        "non-finite policy output",
                    ));
                }
                vals[rows.clone()].copy_from_slice(&v);
                common::sample_batch(
                    &self.net,
                    &out[..n * k_out],
                    (&sd.0, &sd.1),
                    &mut rng,
                    &mut actions[t * n * sl..(t + 1) * n * sl],
                    &mut logp[rows.clone()],
                    &mut env_actions,
                );
                venv.step_flat(&env_actions)?;
                global += n as u64;
                trunc_obs.clear();
                trunc_idx.clear();
                for i in 0..n {
                    let r = venv.rewards()[i];
                    let (te, tr) = (venv.terminated()[i], venv.truncated()[i]);
                    rewards[t * n + i] = r as f32;
                    dones[t * n + i] = te || tr;
                    ep_ret[i] += r;
                    if te || tr {
                        finished.push(ep_ret[i]);
                        ep_ret[i] = 0.0;
                    }
                    if tr && !te && common::final_obs(&venv, i, &self.net, &mut fin) {
                        trunc_obs.extend_from_slice(&fin);
                        trunc_idx.push(i);
                    }
                }
                if !trunc_idx.is_empty() {
                    let fv = common::values(&self.net, &trunc_obs, trunc_idx.len())?;
                    for (&i, v) in trunc_idx.iter().zip(fv) {
                        rewards[t * n + i] += cfg.gamma as f32 * v;
                    }
                }
                next_obs.copy_from_slice(venv.observations());
                self.net.spec.obs.normalize_in_place(&mut next_obs);
            }
            // GAE.
            let next_v = common::values(&self.net, &next_obs, n)?;
            let (g, lam) = (cfg.gamma as f32, cfg.gae_lambda as f32);
            let mut adv = vec![0.0f32; batch];
            let mut last = vec![0.0f32; n];
            for t in (0..t_len).rev() {
                for i in 0..n {
                    let j = t * n + i;
                    let nv = if t + 1 == t_len {
                        next_v[i]
                    } else {
                        vals[j + n]
                    };
                    let nonterm = if dones[j] { 0.0 } else { 1.0 };
                    let delta = rewards[j] + g * nv * nonterm - vals[j];
                    last[i] = delta + g * lam * nonterm * last[i];
                    adv[j] = last[i];
                }
            }
            let ret: Vec<f32> = adv.iter().zip(&vals).map(|(a, v)| a + v).collect();
            self.update(&mut opt, &mut rng, &obs, &actions, &logp, &adv, &ret, &vals)?;
            self.stats.reset_failures = failures.load(std::sync::atomic::Ordering::Relaxed);
            progress(global);
            if let Some(m) = common::mean(&finished) {
                curve.push(CurvePoint {
                    step: global,
                    value: m,
                });
            }
        }
        Ok(curve)
    }
}

impl Agent for PpoAgent {
    fn name(&self) -> &str {
        "ppo"
    }

    fn save(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        super::common::save_agent_files(
            dir,
            "ppo",
            |p| self.save(p),
            |p| self.export_torchscript(p),
        )
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).unwrap_or_default()
    }

    fn train(
        &mut self,
        spec: &TrainSpec<'_>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<CurvePoint>> {
        let mut stages = Vec::with_capacity(self.cfg.curriculum.len() + 1);
        for st in &self.cfg.curriculum {
            let mut c = spec
                .env_config
                .cloned()
                .unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
            scopegym_envs::tasks::merge_toml(&mut c, &toml::Value::Table(st.env_config.clone()));
            let s = TrainSpec {
                env_config: Some(&c),
                ..*spec
            };
            stages.push((st.until, common::make_envs(&s, self.cfg.num_envs)?));
        }
        stages.push((1.0, common::make_envs(spec, self.cfg.num_envs)?));
        self.train_stages(stages, spec.steps, spec.seed, progress)
    }

    fn begin_episode(&mut self, _env: &dyn Env, _obs: &Value, seed: u64) -> Result<()> {
        self.actor.begin(seed);
        Ok(())
    }

    fn act(&mut self, _env: &mut dyn Env, obs: &Value) -> Result<Value> {
        self.actor.act(&self.net, obs, self.cfg.deterministic_eval)
    }

    /// The action distribution of the observation [`Agent::act`] saw last (the softmax of the
    /// logits, or the Gaussian's mean and standard deviation in the action's units) and the
    /// critic's value `V(obs)`, kept from that forward pass.
    fn insight(&self) -> Option<crate::agent::Insight> {
        Some(self.actor.insight(&self.net))
    }
}
