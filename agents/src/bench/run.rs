//! One agent on one task over seeds: [`run_agent`] and its [`RunResults`] (what `scopegym run`
//! writes as `results.json`).
//!
//! Per run seed `s`, in order:
//!
//! 1. the evaluation environment is built from the task id and the config table (the overrides,
//!    with `difficulty` and `split` set from the spec);
//! 2. the agent is built by name from the registry with the agent config and seed `s`;
//! 3. a learning agent ([`crate::registry::AgentSpec::learns`]) trains for `train_steps` env
//!    steps on the same config with `split = "train"` ([`crate::Agent::train`], seed `s`),
//!    which gives its learning curve;
//! 4. it plays `episodes` evaluation episodes; episode `i` resets with seed
//!    [`episode_seed`]`(s, i) = s · 1 000 000 + i`, so every agent meets the same scenarios for
//!    the same run seed (run seed 0 plays episode seeds 0, 1, …, like `scopegym floors`).
//!
//! Same spec, same results: every random draw is seeded from `s`.
//!
//! ```
//! use scopegym_agents::bench::run::{RunSpec, run_agent};
//! let mut spec = RunSpec::new("scopegym/StemSparseScan-v2", "raster");
//! spec.seeds = vec![0, 1];
//! spec.episodes = 2;
//! let r = run_agent(&spec, &mut |_| {}).unwrap();
//! assert_eq!(r.per_seed.len(), 2);
//! assert_eq!(r.per_seed[0].episodes[0].seed, 0);
//! assert_eq!(r.per_seed[1].episodes[1].seed, 1_000_001);
//! assert!(r.summary.success_rate >= 0.0 && r.summary.success_rate <= 1.0);
//! ```

use super::stats::mean_ci95;
use crate::agent::{CurvePoint, TrainSpec, run_episode};
use crate::error::{AgentError, Result};
use crate::registry;
use serde::{Deserialize, Serialize};

/// Episode seeds per run seed: episode `i` of run seed `s` resets with `s · EPISODE_STRIDE + i`.
pub const EPISODE_STRIDE: u64 = 1_000_000;

/// The reset seed of evaluation episode `i` of run seed `s`: `s · 1 000 000 + i`.
pub fn episode_seed(run_seed: u64, episode: usize) -> u64 {
    run_seed
        .wrapping_mul(EPISODE_STRIDE)
        .wrapping_add(episode as u64)
}

/// Where the results came from (filled by the caller: the CLI knows its version and commit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// The scopegym version.
    pub version: String,
    /// The git commit of the build (empty when unknown).
    pub commit: String,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The task id.
    pub env_id: String,
    /// The agent's registry name.
    pub agent: String,
    /// The agent config (TOML table), `None` for the agent's defaults.
    pub agent_config: Option<toml::Value>,
    /// Task config overrides (TOML table, e.g. `max_steps`), `None` for none. `difficulty` and
    /// `split` here are replaced by the fields below.
    pub env_config: Option<toml::Value>,
    /// Difficulty level (`easy`, `medium`, `hard`).
    pub difficulty: String,
    /// The parameter split evaluated on (`train` or `test`); training always uses `train`.
    pub split: String,
    /// Run seeds.
    pub seeds: Vec<u64>,
    /// Training env steps per seed (learning agents only).
    pub train_steps: u64,
    /// Evaluation episodes per seed.
    pub episodes: usize,
    /// Keep every step's reward and regret in [`EpisodeResult`] (for curves).
    pub keep_steps: bool,
    /// Version and commit for the provenance.
    pub build: BuildInfo,
    /// Where learning agents save what they learned, per seed: `<dir>/seed<s>/` (checkpoint
    /// and TorchScript policy, [`crate::Agent::save`]); `None` saves nothing.
    pub save_dir: Option<std::path::PathBuf>,
}

impl RunSpec {
    /// `agent` on `env_id`: medium difficulty, test split, seeds 0..5, 5 episodes, 10 000
    /// training steps, per-step records kept.
    pub fn new(env_id: &str, agent: &str) -> Self {
        Self {
            env_id: env_id.into(),
            agent: agent.into(),
            agent_config: None,
            env_config: None,
            difficulty: "medium".into(),
            split: "test".into(),
            seeds: (0..5).collect(),
            train_steps: 10_000,
            episodes: 5,
            keep_steps: true,
            build: BuildInfo::default(),
            save_dir: None,
        }
    }

    /// The config table of the environment for `split`: the overrides with `difficulty` and
    /// `split` set.
    pub fn env_table(&self, split: &str) -> Result<toml::Value> {
        let mut t = match &self.env_config {
            None => toml::Table::new(),
            Some(toml::Value::Table(t)) => t.clone(),
            Some(_) => {
                return Err(AgentError::arg(
                    "env_config",
                    "expected a table of task settings",
                ));
            }
        };
        t.insert("difficulty".into(), self.difficulty.clone().into());
        t.insert("split".into(), split.into());
        Ok(toml::Value::Table(t))
    }

    fn validate(&self) -> Result<()> {
        if self.seeds.is_empty() {
            return Err(AgentError::arg("seeds", "at least one seed is needed"));
        }
        if self.episodes == 0 || self.episodes as u64 >= EPISODE_STRIDE {
            return Err(AgentError::arg(
                "episodes",
                format!("must be 1..{EPISODE_STRIDE}, got {}", self.episodes),
            ));
        }
        Ok(())
    }
}

/// One evaluation episode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeResult {
    /// Its reset seed ([`episode_seed`]).
    pub seed: u64,
    /// Undiscounted return.
    #[serde(rename = "return")]
    pub ret: f64,
    /// `info["is_success"]` at the last step.
    pub success: bool,
    /// Steps taken.
    pub steps: usize,
    /// Every step's reward (kept with [`RunSpec::keep_steps`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewards: Vec<f64>,
    /// Every step's `info["regret"]` where the task reports it (kept with
    /// [`RunSpec::keep_steps`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regret: Vec<f64>,
}

/// The results of one run seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedResult {
    /// The run seed.
    pub seed: u64,
    /// Mean evaluation return over its episodes.
    pub return_mean: f64,
    /// Fraction of its evaluation episodes that succeeded.
    pub success_rate: f64,
    /// Env steps used in all: training (the budget, or the curve's last step if larger) plus
    /// evaluation.
    pub steps: u64,
    /// Training env steps (0 for agents that do not learn).
    pub train_steps: u64,
    /// Evaluation env steps.
    pub eval_steps: u64,
    /// The learning curve from training (empty for agents that do not learn).
    pub curve: Vec<CurvePoint>,
    /// The evaluation episodes.
    pub episodes: Vec<EpisodeResult>,
}

/// Mean over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Mean of the per-seed mean returns.
    pub return_mean: f64,
    /// Half-width of the 95 % interval of `return_mean`: `1.96 · sd / √n` over the per-seed
    /// means (sample sd; 0 with one seed).
    pub return_ci95: f64,
    /// Mean of the per-seed success rates.
    pub success_rate: f64,
    /// Evaluation episodes in all.
    pub episodes: usize,
}

/// How the results were made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// scopegym version.
    pub version: String,
    /// git commit (empty when unknown).
    pub commit: String,
    /// The task config the evaluation env was built with (overrides, difficulty, split; the
    /// task fills every other field with its defaults at that difficulty for this version).
    pub env_config: serde_json::Value,
    /// The task config of training (`split = "train"`), for learning agents; null otherwise.
    pub train_env_config: serde_json::Value,
    /// The agent config with every default filled in (null for agents without settings).
    pub agent_config: serde_json::Value,
    /// Difficulty level.
    pub difficulty: String,
    /// The split evaluated on.
    pub split: String,
    /// Whether the agent learns (trains before evaluation).
    pub learns: bool,
    /// The budget.
    pub budget: Budget,
    /// The env's step limit per episode.
    pub max_episode_steps: usize,
    /// How episode seeds derive from run seeds.
    pub episode_seeds: String,
}

/// The budget of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Training env steps per seed (learning agents).
    pub train_steps: u64,
    /// Evaluation episodes per seed.
    pub episodes: usize,
}

/// What `scopegym run` writes as `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResults {
    /// The task id.
    pub env_id: String,
    /// The agent's name.
    pub agent: String,
    /// The run seeds.
    pub seeds: Vec<u64>,
    /// One entry per seed, in order.
    pub per_seed: Vec<SeedResult>,
    /// Over seeds.
    pub summary: Summary,
    /// How they were made.
    pub provenance: Provenance,
}

impl RunResults {
    /// Whether any episode recorded a regret (the explore tasks).
    pub fn has_regret(&self) -> bool {
        self.per_seed
            .iter()
            .flat_map(|s| &s.episodes)
            .any(|e| !e.regret.is_empty())
    }

    /// Whether any seed has a learning curve.
    pub fn has_curve(&self) -> bool {
        self.per_seed.iter().any(|s| !s.curve.is_empty())
    }

    /// Drops the per-step records (rewards, regret) of every episode, keeping the returns.
    pub fn drop_steps(&mut self) {
        for e in self.per_seed.iter_mut().flat_map(|s| &mut s.episodes) {
            e.rewards = Vec::new();
            e.regret = Vec::new();
        }
    }
}

/// Progress of a run, in env steps: training reports its steps, each evaluation episode counts
/// for the env's `max_episode_steps` when it ends (whatever its length), so the total is known
/// in advance ([`RunProgress::total`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunProgress {
    /// The run seed being run.
    pub seed: u64,
    /// Units done so far in the run.
    pub done: u64,
    /// Units in all: `seeds · (train_steps (learning agents) + episodes · max_episode_steps)`.
    pub total: u64,
}

fn to_json(v: &toml::Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// The summary over seeds of `per_seed` (what [`RunResults::summary`] holds).
pub fn summarize(per_seed: &[SeedResult]) -> Summary {
    let means: Vec<f64> = per_seed.iter().map(|s| s.return_mean).collect();
    let (return_mean, return_ci95) = mean_ci95(&means);
    Summary {
        return_mean,
        return_ci95,
        success_rate: per_seed.iter().map(|s| s.success_rate).sum::<f64>() / per_seed.len() as f64,
        episodes: per_seed.iter().map(|s| s.episodes.len()).sum(),
    }
}

/// Runs `spec`; `progress` hears of every training report and every finished episode.
///
/// Errors: an unknown task or agent, a bad config (either), an agent that does not apply to the
/// task ([`AgentError::Unsupported`]) or lacks a feature ([`AgentError::MissingFeature`]), and
/// any failure while training or stepping.
pub fn run_agent(spec: &RunSpec, progress: &mut dyn FnMut(RunProgress)) -> Result<RunResults> {
    spec.validate()?;
    run_agent_with(spec, registry::spec(&spec.agent)?, progress)
}

/// [`run_agent`] with the agent given by its registry entry (for agents outside the registry,
/// such as tests' own).
pub fn run_agent_with(
    spec: &RunSpec,
    agent_spec: &registry::AgentSpec,
    progress: &mut dyn FnMut(RunProgress),
) -> Result<RunResults> {
    spec.validate()?;
    let eval_cfg = spec.env_table(&spec.split)?;
    let train_cfg = spec.env_table("train")?;
    let mut env = scopegym_envs::registry::make(&spec.env_id, Some(&eval_cfg))?;
    let max_steps = env.max_episode_steps();
    let train_steps = if agent_spec.learns {
        spec.train_steps
    } else {
        0
    };
    let per_seed_units = train_steps + (spec.episodes * max_steps) as u64;
    let total = per_seed_units * spec.seeds.len() as u64;
    let mut per_seed = Vec::with_capacity(spec.seeds.len());
    let mut resolved_agent_config = serde_json::Value::Null;
    for (k, &seed) in spec.seeds.iter().enumerate() {
        let base = per_seed_units * k as u64;
        let mut agent = (agent_spec.make)(env.as_ref(), spec.agent_config.as_ref(), seed)?;
        if k == 0 {
            resolved_agent_config = agent.config();
        }
        let curve = if agent_spec.learns {
            let ts = TrainSpec {
                env_id: &spec.env_id,
                env_config: Some(&train_cfg),
                steps: train_steps,
                seed,
            };
            agent.train(&ts, &mut |done| {
                progress(RunProgress {
                    seed,
                    done: base + done.min(train_steps),
                    total,
                })
            })?
        } else {
            Vec::new()
        };
        if let (true, Some(dir)) = (agent_spec.learns, &spec.save_dir) {
            agent.save(&dir.join(format!("seed{seed}")))?;
        }
        let mut episodes = Vec::with_capacity(spec.episodes);
        for i in 0..spec.episodes {
            let rec = run_episode(env.as_mut(), agent.as_mut(), episode_seed(seed, i))?;
            let keep = spec.keep_steps;
            episodes.push(EpisodeResult {
                seed: rec.seed,
                ret: rec.ret,
                success: rec.success,
                steps: rec.steps,
                rewards: if keep { rec.rewards } else { Vec::new() },
                regret: if keep { rec.regret } else { Vec::new() },
            });
            progress(RunProgress {
                seed,
                done: base + train_steps + ((i + 1) * max_steps) as u64,
                total,
            });
        }
        let n = episodes.len() as f64;
        let eval_steps: u64 = episodes.iter().map(|e| e.steps as u64).sum();
        let trained = train_steps.max(curve.last().map_or(0, |p| p.step));
        per_seed.push(SeedResult {
            seed,
            return_mean: episodes.iter().map(|e| e.ret).sum::<f64>() / n,
            success_rate: episodes.iter().filter(|e| e.success).count() as f64 / n,
            steps: trained + eval_steps,
            train_steps: trained,
            eval_steps,
            curve,
            episodes,
        });
    }
    let summary = summarize(&per_seed);
    Ok(RunResults {
        env_id: spec.env_id.clone(),
        agent: spec.agent.clone(),
        seeds: spec.seeds.clone(),
        per_seed,
        summary,
        provenance: Provenance {
            version: spec.build.version.clone(),
            commit: spec.build.commit.clone(),
            env_config: to_json(&eval_cfg),
            train_env_config: if agent_spec.learns {
                to_json(&train_cfg)
            } else {
                serde_json::Value::Null
            },
            agent_config: resolved_agent_config,
            difficulty: spec.difficulty.clone(),
            split: spec.split.clone(),
            learns: agent_spec.learns,
            budget: Budget {
                train_steps,
                episodes: spec.episodes,
            },
            max_episode_steps: max_steps,
            episode_seeds: format!("episode i of run seed s resets with s * {EPISODE_STRIDE} + i"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use scopegym_envs::evaluate::{Policy, evaluate};

    fn small(agent: &str) -> RunSpec {
        let mut s = RunSpec::new("scopegym/StemSparseScan-v2", agent);
        s.seeds = vec![0, 3];
        s.episodes = 3;
        s
    }

    #[test]
    fn random_and_heuristic_match_the_envs_independent_evaluation() {
        // The envs crate's evaluate() runs the same policies on the same episode seeds with its
        // own loop: the returns must agree exactly (the random agent draws the same stream).
        for (agent, policy) in [("random", Policy::Random), ("heuristic", Policy::Heuristic)] {
            let r = run_agent(&small(agent), &mut |_| {}).unwrap();
            let mut env = scopegym_envs::registry::make(
                "scopegym/StemSparseScan-v2",
                Some(&small(agent).env_table("test").unwrap()),
            )
            .unwrap();
            for s in &r.per_seed {
                let lo = episode_seed(s.seed, 0);
                let score = evaluate(env.as_mut(), &policy, lo..lo + 3).unwrap();
                let mine: Vec<f64> = s.episodes.iter().map(|e| e.ret).collect();
                assert_eq!(mine, score.returns, "{agent} seed {}", s.seed);
                assert!((s.return_mean - score.mean_return).abs() < 1e-12);
                assert!((s.success_rate - score.success_rate).abs() < 1e-12);
            }
            let (m, h) = mean_ci95(&[r.per_seed[0].return_mean, r.per_seed[1].return_mean]);
            assert_eq!((r.summary.return_mean, r.summary.return_ci95), (m, h));
            println!(
                "{agent}: {:.3} ± {:.3}",
                r.summary.return_mean, r.summary.return_ci95
            );
        }
    }

    #[test]
    fn deterministic_and_progress_reaches_the_total() {
        let mut last = None;
        let a = run_agent(&small("random"), &mut |p| last = Some(p)).unwrap();
        let b = run_agent(&small("random"), &mut |_| {}).unwrap();
        assert_eq!(a, b);
        let p = last.unwrap();
        assert_eq!(p.done, p.total);
        assert_eq!(p.total, 2 * 3 * 12);
        let e = &a.per_seed[0].episodes[0];
        assert_eq!(e.rewards.len(), e.steps);
        assert!((e.rewards.iter().sum::<f64>() - e.ret).abs() < 1e-9);
        assert_eq!(a.provenance.env_config["split"], "test");
        assert_eq!(a.per_seed[1].steps, a.per_seed[1].eval_steps);
    }

    /// A learning agent that "trains" by reporting progress and a fixed curve, and checks it
    /// was handed the train split; it then acts like the heuristic.
    struct Learner;
    impl crate::Agent for Learner {
        fn name(&self) -> &str {
            "learner"
        }
        fn train(
            &mut self,
            spec: &TrainSpec<'_>,
            progress: &mut dyn FnMut(u64),
        ) -> Result<Vec<CurvePoint>> {
            let split = spec.env_config.and_then(|c| c.get("split")).cloned();
            assert_eq!(split, Some("train".into()));
            let mut curve = Vec::new();
            for k in 1..=4 {
                progress(k * spec.steps / 4);
                curve.push(CurvePoint {
                    step: k * spec.steps / 4,
                    value: spec.seed as f64 + k as f64,
                });
            }
            Ok(curve)
        }
        fn begin_episode(
            &mut self,
            _: &dyn scopegym_envs::Env,
            _: &scopegym_envs::Value,
            _: u64,
        ) -> Result<()> {
            Ok(())
        }
        fn act(
            &mut self,
            env: &mut dyn scopegym_envs::Env,
            obs: &scopegym_envs::Value,
        ) -> Result<scopegym_envs::Value> {
            Ok(env.heuristic_action(obs))
        }
    }

    #[test]
    fn learning_agents_train_on_the_train_split_and_keep_their_curves() {
        let fake = registry::AgentSpec {
            name: "learner",
            description: "test",
            learns: true,
            make: |_, _, _| Ok(Box::new(Learner)),
        };
        let mut spec = small("learner");
        spec.train_steps = 400;
        let mut seen = Vec::new();
        let r = run_agent_with(&spec, &fake, &mut |p| seen.push(p.done)).unwrap();
        // Per seed 400 training units then 3 episodes of 12: total 2 · (400 + 36).
        assert_eq!(seen.last(), Some(&(2 * 436)));
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
        assert!(seen.contains(&(436 + 100)));
        let s = &r.per_seed[1];
        assert_eq!(s.curve.len(), 4);
        assert_eq!(
            s.curve[3],
            CurvePoint {
                step: 400,
                value: 3.0 + 4.0
            }
        );
        assert_eq!(s.train_steps, 400);
        assert_eq!(s.steps, 400 + s.eval_steps);
        assert!(r.has_curve() && r.provenance.learns);
        assert_eq!(r.provenance.train_env_config["split"], "train");
        assert_eq!(r.provenance.env_config["split"], "test");
        // It evaluates like the heuristic on the same episode seeds.
        let h = run_agent(&small("heuristic"), &mut |_| {}).unwrap();
        assert_eq!(r.per_seed[0].return_mean, h.per_seed[0].return_mean);
    }

    #[test]
    fn bad_specs_are_errors_naming_the_field() {
        let mut s = small("random");
        s.seeds.clear();
        assert!(
            run_agent(&s, &mut |_| {})
                .unwrap_err()
                .to_string()
                .contains("seeds")
        );
        let mut s = small("random");
        s.episodes = 0;
        assert!(
            run_agent(&s, &mut |_| {})
                .unwrap_err()
                .to_string()
                .contains("episodes")
        );
        let s = small("nope");
        assert!(matches!(
            run_agent(&s, &mut |_| {}),
            Err(AgentError::UnknownAgent { .. })
        ));
        let mut s = small("random");
        s.env_config = Some(toml::from_str("bogus_key = 1").unwrap());
        assert!(
            run_agent(&s, &mut |_| {})
                .unwrap_err()
                .to_string()
                .contains("bogus_key")
        );
    }
}
