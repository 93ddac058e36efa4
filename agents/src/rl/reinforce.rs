//! REINFORCE with a learned value baseline: full-episode Monte Carlo returns
//! `G_t = Σ_k γ^k r_{t+k}`, advantage `G_t − V(s_t)`, one gradient step per batch of finished
//! episodes (at least `batch_steps` steps), on the same networks as PPO.
//!
//! The policy loss is `−mean(log π(a_t|s_t) · A_t)` (advantages normalized over the batch when
//! `norm_adv`), the value loss `½ mean((V(s_t) − G_t)²)`, plus an entropy bonus. A truncated
//! episode (step limit) bootstraps its return with `γ V(final observation)`.

use super::common::{self, Actor, Checkpoint};
use super::net::{ActorCritic, NetSpec};
use super::ppo::check;
use crate::agent::{Agent, CurvePoint, TrainSpec};
use crate::error::{AgentError, Result};
use scopegym_envs::rng::seeded;
use scopegym_envs::{Env, Value};
use scopegym_physics::rng::derive_seed;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn::OptimizerConfig;
use tch::{Kind, Tensor, nn};

/// REINFORCE's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReinforceConfig {
    /// Adam's learning rate. Default 1e-3.
    pub learning_rate: f64,
    /// Adam's ε. Default 1e-5.
    pub adam_eps: f64,
    /// Parallel envs. Default 8.
    pub num_envs: usize,
    /// Steps of finished episodes per update (at least). Default 1024.
    pub batch_steps: usize,
    /// Discount γ. Default 0.99.
    pub gamma: f64,
    /// Entropy bonus coefficient. Default 0.01.
    pub ent_coef: f64,
    /// Value loss coefficient. Default 0.5.
    pub vf_coef: f64,
    /// Global gradient norm clip. Default 0.5.
    pub max_grad_norm: f64,
    /// Normalize advantages over the batch. Default true.
    pub norm_adv: bool,
    /// Evaluation acts deterministically (argmax, or the Gaussian mean clipped). Default true.
    pub deterministic_eval: bool,
    /// Threads stepping the envs. Default 1.
    pub env_threads: usize,
}

impl Default for ReinforceConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-3,
            adam_eps: 1e-5,
            num_envs: 8,
            batch_steps: 1024,
            gamma: 0.99,
            ent_coef: 0.01,
            vf_coef: 0.5,
            max_grad_norm: 0.5,
            norm_adv: true,
            deterministic_eval: true,
            env_threads: 1,
        }
    }
}

impl ReinforceConfig {
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
        check(self.batch_steps >= 1, "batch_steps", "must be at least 1")?;
        check(
            (0.0..=1.0).contains(&self.gamma),
            "gamma",
            "must be in [0, 1]",
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
        Ok(())
    }
}

/// The REINFORCE agent.
#[derive(Debug)]
pub struct ReinforceAgent {
    cfg: ReinforceConfig,
    net: ActorCritic,
    seed: u64,
    actor: Actor,
}

/// One env's episode so far.
#[derive(Debug, Default)]
struct Trajectory {
    obs: Vec<f32>,
    actions: Vec<f32>,
    rewards: Vec<f32>,
}

impl ReinforceAgent {
    /// A fresh agent for networks of `spec`, seeded with `seed`.
    pub fn new(spec: NetSpec, cfg: ReinforceConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        tch::set_num_threads(1);
        Ok(Self {
            net: ActorCritic::new(spec, derive_seed(seed, "reinforce-init"))?,
            cfg,
            seed,
            actor: Actor::new(seed),
        })
    }

    /// A fresh agent for `env`'s spaces from a TOML config (`None`: the defaults).
    pub fn from_toml(env: &dyn Env, config: Option<&toml::Value>, seed: u64) -> Result<Self> {
        Self::new(NetSpec::for_env(env)?, super::parse_config(config)?, seed)
    }

    /// The network.
    pub fn net(&self) -> &ActorCritic {
        &self.net
    }

    /// Saves the weights to `path` and the config and network spec to `<path>.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let ck = Checkpoint {
            agent: "reinforce".into(),
            config: self.cfg.clone(),
            spec: self.net.spec.clone(),
            seed: self.seed,
        };
        common::save(&self.net, &ck, path.as_ref())
    }

    /// Loads an agent saved by [`ReinforceAgent::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let (ck, net) = common::load::<ReinforceConfig>(path.as_ref(), "reinforce")?;
        ck.config.validate()?;
        tch::set_num_threads(1);
        Ok(Self {
            cfg: ck.config,
            net,
            seed: ck.seed,
            actor: Actor::new(ck.seed),
        })
    }

    /// Exports the deterministic policy as TorchScript.
    pub fn export_torchscript(&self, path: impl AsRef<Path>) -> Result<()> {
        common::export_torchscript(&self.net, path.as_ref())
    }

    fn update(
        &mut self,
        opt: &mut nn::Optimizer,
        obs: &[f32],
        actions: &[f32],
        ret: &[f32],
    ) -> Result<()> {
        let c = &self.cfg;
        let b = ret.len() as i64;
        let (len, sl) = (
            self.net.spec.obs.len as i64,
            self.net.spec.action.stored_len() as i64,
        );
        let o = Tensor::from_slice(obs).view([b, len]);
        let a = Tensor::from_slice(actions).view([b, sl]);
        let g = Tensor::from_slice(ret);
        let (out, v) = self.net.forward(&o);
        let (lp, ent) = self.net.log_prob_entropy(&out, &a);
        let mut adv = (&g - v.detach()).detach();
        if c.norm_adv && b > 1 {
            adv = (&adv - adv.mean(Kind::Float)) / (adv.std(true) + 1e-8);
        }
        let pg = -(lp * adv).mean(Kind::Float);
        let vl = (&v - &g).square().mean(Kind::Float) * 0.5;
        let loss = pg - ent.mean(Kind::Float) * c.ent_coef + vl * c.vf_coef;
        let lv = loss.double_value(&[]);
        if !lv.is_finite() {
            return Err(AgentError::numerical(
                "reinforce update",
                format!("loss is {lv}"),
            ));
        }
        opt.zero_grad();
        loss.backward();
        opt.clip_grad_norm(c.max_grad_norm);
        opt.step();
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
        tch::set_num_threads(1);
        let cfg = self.cfg.clone();
        let mut venv = common::vec_env(envs, cfg.num_envs, cfg.env_threads)?;
        let netspec = NetSpec::for_env(venv.env(0))?;
        if netspec != self.net.spec {
            self.net = ActorCritic::new(netspec, derive_seed(self.seed, "reinforce-init"))?;
        }
        let mut opt = nn::Adam {
            eps: cfg.adam_eps,
            ..Default::default()
        }
        .build(&self.net.vs, cfg.learning_rate)?;
        let n = cfg.num_envs;
        let len = self.net.spec.obs.len;
        let (sl, el) = (self.net.spec.action.stored_len(), venv.action_len());
        let k_out = self.net.spec.action.outputs();
        venv.reset(Some(derive_seed(seed, "reinforce-envs")))?;
        let mut rng = seeded(derive_seed(seed, "reinforce-sampling"));
        let mut trajs: Vec<Trajectory> = (0..n).map(|_| Trajectory::default()).collect();
        let (mut b_obs, mut b_act, mut b_ret) = (Vec::new(), Vec::new(), Vec::new());
        let mut next_obs = venv.observations().to_vec();
        self.net.spec.obs.normalize_in_place(&mut next_obs);
        let (mut stored, mut logp, mut env_actions) =
            (vec![0.0f32; n * sl], vec![0.0f32; n], vec![0.0f32; n * el]);
        let mut fin = vec![0.0f32; len];
        let (mut finished, mut curve) = (Vec::new(), Vec::new());
        let mut global = 0u64;
        let mut sd = common::stds(&self.net)?;
        while global < steps.max(1) {
            let (out, _) = common::eval_batch(&self.net, &next_obs, n)?;
            if out.iter().any(|x| !x.is_finite()) {
                return Err(AgentError::numerical(
                    "reinforce rollout",
                    "non-finite policy output",
                ));
            }
            common::sample_batch(
                &self.net,
                &out[..n * k_out],
                (&sd.0, &sd.1),
                &mut rng,
                &mut stored,
                &mut logp,
                &mut env_actions,
            );
            venv.step_flat(&env_actions)?;
            global += n as u64;
            for (i, tr) in trajs.iter_mut().enumerate() {
                tr.obs.extend_from_slice(&next_obs[i * len..(i + 1) * len]);
                tr.actions.extend_from_slice(&stored[i * sl..(i + 1) * sl]);
                let r = venv.rewards()[i];
                tr.rewards.push(r as f32);
                let (te, tru) = (venv.terminated()[i], venv.truncated()[i]);
                if !(te || tru) {
                    continue;
                }
                finished.push(tr.rewards.iter().map(|&r| f64::from(r)).sum::<f64>());
                let mut g = 0.0f32;
                if tru && !te && common::final_obs(&venv, i, &self.net, &mut fin) {
                    g = common::values(&self.net, &fin, 1)?[0];
                }
                let start = b_ret.len();
                for &r in tr.rewards.iter().rev() {
                    g = r + cfg.gamma as f32 * g;
                    b_ret.push(g);
                }
                b_ret[start..].reverse();
                b_obs.append(&mut tr.obs);
                b_act.append(&mut tr.actions);
                tr.rewards.clear();
            }
            next_obs.copy_from_slice(venv.observations());
            self.net.spec.obs.normalize_in_place(&mut next_obs);
            if b_ret.len() >= cfg.batch_steps {
                self.update(&mut opt, &b_obs, &b_act, &b_ret)?;
                sd = common::stds(&self.net)?;
                b_obs.clear();
                b_act.clear();
                b_ret.clear();
                progress(global);
                if let Some(m) = common::mean(&finished) {
                    curve.push(CurvePoint {
                        step: global,
                        value: m,
                    });
                }
                finished.clear();
            }
        }
        if let Some(m) = common::mean(&finished) {
            curve.push(CurvePoint {
                step: global,
                value: m,
            });
        }
        progress(global);
        Ok(curve)
    }
}

impl Agent for ReinforceAgent {
    fn name(&self) -> &str {
        "reinforce"
    }

    fn save(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        super::common::save_agent_files(
            dir,
            "reinforce",
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
        let envs = common::make_envs(spec, self.cfg.num_envs)?;
        self.train_envs(envs, spec.steps, spec.seed, progress)
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
