//! The benchmark suite: a versioned file of tasks, agents and budgets ([`SuiteFile`], the
//! repository's `suite/suite-v2.toml` embedded as [`SUITE_V2`]), run by [`run_suite`] and
//! scored by [`score`] into [`SuiteResults`] (what `scopegym suite` writes as `suite.json`).
//!
//! Scoring (the file's header says the same):
//!
//! - the score of a run (task, agent, seed) is its mean evaluation return ([`super::run`]);
//! - its normalized score is `(score − R) / (H − R)` with `R` and `H` the mean scores over the
//!   task's seeds of the reference agents (`reference_low = "random"`,
//!   `reference_high = "heuristic"`), run in the same suite on the same seeds;
//! - per agent, over the tasks it ran: the IQM of its normalized run scores pooled
//!   ([`stats::pooled_iqm`]), a stratified-bootstrap percentile interval
//!   ([`stats::stratified_bootstrap_iqm`], seeded with `bootstrap_seed` plus the FNV-1a hash of
//!   the agent's name, [`agent_seed`]) and the performance profile on the `τ` grid
//!   ([`stats::performance_profile`]).
//!
//! Results made outside the suite (a language-model agent's `scopegym mcp --record`, any
//! `scopegym run`) are scored beside its agents by [`score_with`], the same way, after checks
//! that they played the suite's scenarios (task config, run and episode seeds).
//!
//! Agents this build cannot run (not registered, a missing cargo feature, or not applicable to
//! the task) are skipped and listed in [`SuiteResults::skipped`], never silently.

use super::jobs::{self, JobRecord, JobSpec, Outcome};
use super::run::{BuildInfo, RunProgress, RunResults, RunSpec, SeedResult};
use super::stats;
use crate::error::{AgentError, Result};
use crate::registry;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The text of `suite/suite-v2.toml`, embedded.
pub const SUITE_V2: &str = include_str!("../../../suite/suite-v2.toml");

/// The suite file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteFile {
    /// The suite's name.
    pub name: String,
    /// Its version (a change of budgets, seeds, configs or scoring bumps it).
    pub version: u32,
    /// Difficulty of every task.
    pub difficulty: String,
    /// The split evaluated on (`test`).
    pub split: String,
    /// The agent whose mean score normalizes to 0.
    pub reference_low: String,
    /// The agent whose mean score normalizes to 1.
    pub reference_high: String,
    /// Bootstrap and profile settings.
    pub scoring: Scoring,
    /// The budgets by name (`small`, `full`).
    pub budgets: BTreeMap<String, Budget>,
    /// The tasks.
    pub tasks: Vec<SuiteTask>,
}

/// Bootstrap and profile settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scoring {
    /// Bootstrap resamples.
    pub bootstrap_resamples: usize,
    /// Confidence of the intervals (0.95).
    pub confidence: f64,
    /// Base seed of the bootstrap.
    pub bootstrap_seed: u64,
    /// Lowest `τ` of the performance profiles.
    pub tau_min: f64,
    /// Highest `τ`.
    pub tau_max: f64,
    /// Points of the `τ` grid (evenly spaced, ends included).
    pub tau_points: usize,
}

/// A budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Run seeds.
    pub seeds: Vec<u64>,
    /// Evaluation episodes per seed.
    pub episodes: usize,
    /// Training env steps per seed (learning agents).
    pub train_steps: u64,
}

/// One budget's overrides for one task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetOverride {
    /// Run seeds.
    pub seeds: Option<Vec<u64>>,
    /// Evaluation episodes per seed.
    pub episodes: Option<usize>,
    /// Training env steps per seed.
    pub train_steps: Option<u64>,
    /// Task config overrides (merged over the task's `config`, key by key at the top level).
    pub config: Option<toml::Table>,
}

/// A task of the suite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteTask {
    /// The task id.
    pub id: String,
    /// The agents to run on it.
    pub agents: Vec<String>,
    /// Task config overrides for every budget.
    #[serde(default)]
    pub config: Option<toml::Table>,
    /// Per-budget overrides.
    #[serde(default)]
    pub budgets: BTreeMap<String, BudgetOverride>,
}

impl SuiteFile {
    /// Parses and validates a suite file's text.
    pub fn parse(text: &str) -> Result<Self> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| AgentError::config("suite", e.to_string()))?;
        let s: Self = serde_path_to_error::deserialize(de)
            .map_err(|e| AgentError::config(e.path().to_string(), e.into_inner().to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// The embedded `suite-v2.toml`.
    pub fn embedded() -> Self {
        Self::parse(SUITE_V2).expect("the embedded suite file is valid")
    }

    fn validate(&self) -> Result<()> {
        let sc = &self.scoring;
        if sc.bootstrap_resamples == 0 {
            return Err(AgentError::config(
                "scoring.bootstrap_resamples",
                "must be > 0",
            ));
        }
        if !(sc.confidence > 0.0 && sc.confidence < 1.0) {
            return Err(AgentError::config(
                "scoring.confidence",
                "must be in (0, 1)",
            ));
        }
        if !(sc.tau_min.is_finite() && sc.tau_max > sc.tau_min) || sc.tau_points < 2 {
            return Err(AgentError::config(
                "scoring.tau_min",
                "the τ grid needs tau_min < tau_max and tau_points ≥ 2",
            ));
        }
        for (name, b) in &self.budgets {
            if b.seeds.is_empty() || b.episodes == 0 {
                return Err(AgentError::config(
                    format!("budgets.{name}"),
                    "needs at least one seed and one episode",
                ));
            }
        }
        for (i, t) in self.tasks.iter().enumerate() {
            scopegym_envs::registry::spec(&t.id)
                .map_err(|e| AgentError::config(format!("tasks[{i}].id"), e.to_string()))?;
            for (name, o) in &t.budgets {
                if !self.budgets.contains_key(name) {
                    return Err(AgentError::config(
                        format!("tasks[{i}].budgets.{name}"),
                        "no such budget",
                    ));
                }
                if o.seeds.as_ref().is_some_and(Vec::is_empty) || o.episodes == Some(0) {
                    return Err(AgentError::config(
                        format!("tasks[{i}].budgets.{name}"),
                        "needs at least one seed and one episode",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The `τ` grid of the performance profiles.
    pub fn taus(&self) -> Vec<f64> {
        stats::linspace(
            self.scoring.tau_min,
            self.scoring.tau_max,
            self.scoring.tau_points,
        )
    }
}

/// What to run of the suite.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// The budget's name.
    pub budget: String,
    /// Only these agents (the references are always run); empty for all.
    pub agents: Vec<String>,
    /// Only these tasks (ids, or a unique part of one such as `StemAutofocus`); empty for all.
    pub tasks: Vec<String>,
    /// Only the first this many run seeds of each task's budget; `None` for all.
    pub seeds: Option<usize>,
}

/// One (task, agent) job of the suite.
#[derive(Debug, Clone)]
pub struct Job {
    /// The run.
    pub spec: RunSpec,
    /// Why it will not run, when known before running (agent not registered).
    pub skip: Option<String>,
    /// Progress units of the job (see [`RunProgress::total`]).
    pub units: u64,
}

/// An agent the suite lists that did not run on a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// The task id.
    pub task: String,
    /// The agent.
    pub agent: String,
    /// Why.
    pub reason: String,
}

fn resolve_task<'a>(file: &'a SuiteFile, name: &str) -> Result<&'a SuiteTask> {
    if let Some(t) = file.tasks.iter().find(|t| t.id == name) {
        return Ok(t);
    }
    let hits: Vec<&SuiteTask> = file.tasks.iter().filter(|t| t.id.contains(name)).collect();
    match hits.as_slice() {
        [t] => Ok(t),
        [] => Err(AgentError::arg(
            "tasks",
            format!("{name:?} names no task of the suite"),
        )),
        _ => Err(AgentError::arg(
            "tasks",
            format!("{name:?} names several tasks of the suite"),
        )),
    }
}

/// The jobs of `sel`: per selected task, the reference agents first, then the others the file
/// lists (restricted to `sel.agents` when given), each with the budget resolved.
pub fn plan(file: &SuiteFile, sel: &Selection, build: &BuildInfo) -> Result<Vec<Job>> {
    let budget = file.budgets.get(&sel.budget).ok_or_else(|| {
        AgentError::arg(
            "budget",
            format!(
                "no budget {:?} in the suite (has: {})",
                sel.budget,
                file.budgets.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    let tasks: Vec<&SuiteTask> = if sel.tasks.is_empty() {
        file.tasks.iter().collect()
    } else {
        sel.tasks
            .iter()
            .map(|n| resolve_task(file, n))
            .collect::<Result<_>>()?
    };
    if sel.seeds == Some(0) {
        return Err(AgentError::arg("seeds", "at least one seed is needed"));
    }
    for a in &sel.agents {
        if !file.tasks.iter().any(|t| t.agents.contains(a)) {
            return Err(AgentError::arg(
                "agents",
                format!("{a:?} is not an agent of the suite"),
            ));
        }
    }
    let mut jobs = Vec::new();
    for t in tasks {
        let o = t.budgets.get(&sel.budget).cloned().unwrap_or_default();
        let mut config = t.config.clone().unwrap_or_default();
        for (k, v) in o.config.unwrap_or_default() {
            config.insert(k, v);
        }
        let mut agents = vec![file.reference_low.clone(), file.reference_high.clone()];
        for a in &t.agents {
            if !agents.contains(a) && (sel.agents.is_empty() || sel.agents.contains(a)) {
                agents.push(a.clone());
            }
        }
        let max_steps = {
            let mut s = RunSpec::new(&t.id, "random");
            s.env_config = Some(toml::Value::Table(config.clone()));
            s.difficulty = file.difficulty.clone();
            let cfg = s.env_table(&file.split)?;
            scopegym_envs::registry::make(&t.id, Some(&cfg))?.max_episode_steps()
        };
        for a in agents {
            let mut spec = RunSpec::new(&t.id, &a);
            spec.env_config = Some(toml::Value::Table(config.clone()));
            spec.difficulty = file.difficulty.clone();
            spec.split = file.split.clone();
            spec.seeds = o.seeds.clone().unwrap_or_else(|| budget.seeds.clone());
            if let Some(n) = sel.seeds {
                spec.seeds.truncate(n);
            }
            spec.episodes = o.episodes.unwrap_or(budget.episodes);
            spec.train_steps = o.train_steps.unwrap_or(budget.train_steps);
            spec.keep_steps = false;
            spec.build = build.clone();
            let (skip, learns) = match registry::spec(&a) {
                Ok(s) => (None, s.learns),
                Err(_) => (Some("not registered in this build".to_string()), false),
            };
            let units = if skip.is_some() {
                0
            } else {
                spec.seeds.len() as u64
                    * (if learns { spec.train_steps } else { 0 }
                        + (spec.episodes * max_steps) as u64)
            };
            jobs.push(Job { spec, skip, units });
        }
    }
    Ok(jobs)
}

/// Progress of the suite: the job running and the units done over all jobs.
#[derive(Debug, Clone)]
pub struct SuiteProgress<'a> {
    /// The task of the job.
    pub task: &'a str,
    /// The agent of the job.
    pub agent: &'a str,
    /// Units done over all jobs.
    pub done: u64,
    /// Units of all jobs.
    pub total: u64,
}

/// Runs the jobs; an agent that cannot run (not registered, [`AgentError::MissingFeature`],
/// [`AgentError::Unsupported`]) is skipped with its reason; `note` hears of each skip as it
/// happens. Any other error stops the suite. The same as [`run_jobs_in`] without a folder.
pub fn run_jobs(
    jobs: &[Job],
    progress: &mut dyn FnMut(SuiteProgress<'_>),
    note: &mut dyn FnMut(&Skipped),
) -> Result<(Vec<RunResults>, Vec<Skipped>)> {
    run_jobs_in(jobs, None, progress, note)
}

fn skipped(job: &Job, reason: String) -> Skipped {
    Skipped {
        task: job.spec.env_id.clone(),
        agent: job.spec.agent.clone(),
        reason,
    }
}

/// Runs the jobs one seed at a time ([`JobSpec::split`]) and merges each job's seeds
/// ([`jobs::merge`]: the same results as running its seeds at once). With a folder `dir`, each
/// finished seed is saved there at once ([`jobs::write_record`]) and a seed already finished
/// there is reused ([`jobs::reuse`]; one made with another job or build is an error). Skips
/// and errors as in [`run_jobs`].
pub fn run_jobs_in(
    jobs: &[Job],
    dir: Option<&Path>,
    progress: &mut dyn FnMut(SuiteProgress<'_>),
    note: &mut dyn FnMut(&Skipped),
) -> Result<(Vec<RunResults>, Vec<Skipped>)> {
    let total: u64 = jobs.iter().map(|j| j.units).sum();
    let mut base = 0;
    let (mut results, mut skips) = (Vec::new(), Vec::new());
    for job in jobs {
        let (task, agent) = (job.spec.env_id.as_str(), job.spec.agent.as_str());
        if let Some(r) = &job.skip {
            let s = skipped(job, r.clone());
            note(&s);
            skips.push(s);
            continue;
        }
        let seeds = JobSpec::split(&job.spec);
        let per_seed = job.units / seeds.len() as u64;
        let mut parts = Vec::with_capacity(seeds.len());
        let mut skip = None;
        for (k, one) in seeds.iter().enumerate() {
            let at = base + per_seed * k as u64;
            if let Some(r) = dir.map(|d| jobs::reuse(d, one)).transpose()?.flatten() {
                parts.push(r);
                continue;
            }
            let outcome = jobs::run_job(one, &mut |p: RunProgress| {
                progress(SuiteProgress {
                    task,
                    agent,
                    done: at + p.done,
                    total,
                })
            })?;
            if let Some(d) = dir {
                jobs::write_record(
                    &jobs::record_path(d, one),
                    &JobRecord {
                        job: one.clone(),
                        outcome: outcome.clone(),
                    },
                )?;
            }
            match outcome {
                Outcome::Done(r) => parts.push(*r),
                Outcome::Skipped(reason) => {
                    skip = Some(reason);
                    break;
                }
            }
        }
        match skip {
            Some(reason) => {
                let s = skipped(job, reason);
                note(&s);
                skips.push(s);
            }
            None => results.push(jobs::merge(parts)?),
        }
        base += job.units;
        progress(SuiteProgress {
            task,
            agent,
            done: base,
            total,
        });
    }
    Ok((results, skips))
}

/// The one-seed jobs of `jobs` not yet finished in `dir` (in order); a finished one made with
/// another job or build is an error ([`jobs::reuse`]). Jobs planned as skipped have none.
pub fn pending(jobs: &[Job], dir: &Path) -> Result<Vec<JobSpec>> {
    let mut out = Vec::new();
    for job in jobs.iter().filter(|j| j.skip.is_none()) {
        for one in JobSpec::split(&job.spec) {
            if jobs::reuse(dir, &one)?.is_none() {
                out.push(one);
            }
        }
    }
    Ok(out)
}

/// Gathers the results of `jobs` from the one-seed records in `dir` (after they ran elsewhere,
/// e.g. on Ray) as [`run_jobs_in`] would have returned them: per job its seeds merged, or its
/// skip. A missing record, or one made with another job or build, is an error.
pub fn gather(jobs: &[Job], dir: &Path) -> Result<(Vec<RunResults>, Vec<Skipped>)> {
    let (mut results, mut skips) = (Vec::new(), Vec::new());
    for job in jobs {
        if let Some(r) = &job.skip {
            skips.push(skipped(job, r.clone()));
            continue;
        }
        let mut parts = Vec::new();
        let mut skip = None;
        for one in JobSpec::split(&job.spec) {
            let path = jobs::record_path(dir, &one);
            let rec = jobs::read_record(&path)?.ok_or_else(|| {
                AgentError::arg(
                    "out",
                    format!("{} is missing: that job did not finish", path.display()),
                )
            })?;
            if rec.job != one {
                // Let reuse() name the differing fields.
                jobs::reuse(dir, &one)?;
            }
            match rec.outcome {
                Outcome::Done(r) => parts.push(*r),
                Outcome::Skipped(reason) => {
                    skip = Some(reason);
                    break;
                }
            }
        }
        match skip {
            Some(reason) => skips.push(skipped(job, reason)),
            None => results.push(jobs::merge(parts)?),
        }
    }
    Ok((results, skips))
}

/// The scores of one agent on one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentOnTask {
    /// The agent.
    pub agent: String,
    /// The normalized score of each run seed, in the order of `results.per_seed`.
    pub normalized: Vec<f64>,
    /// Their mean (the task's normalized score of the agent).
    pub normalized_mean: f64,
    /// The raw results (per-step records dropped).
    pub results: RunResults,
}

/// The reference scores of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// The agent normalized to 0.
    pub low_agent: String,
    /// Its mean score over the task's seeds.
    pub low: f64,
    /// The agent normalized to 1.
    pub high_agent: String,
    /// Its mean score over the task's seeds.
    pub high: f64,
}

/// One task's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResults {
    /// The task id.
    pub id: String,
    /// The references.
    pub reference: Reference,
    /// Every agent that ran, references included.
    pub agents: Vec<AgentOnTask>,
}

/// An agent across tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// The agent.
    pub agent: String,
    /// The tasks it ran on.
    pub tasks: Vec<String>,
    /// Its runs (task × seed) in all.
    pub runs: usize,
    /// IQM of its normalized run scores pooled over its tasks.
    pub iqm: f64,
    /// Stratified-bootstrap percentile interval of the IQM.
    pub iqm_ci: [f64; 2],
    /// Plain mean of the normalized run scores.
    pub mean: f64,
    /// The performance profile on [`SuiteResults::taus`].
    pub profile: Vec<f64>,
    /// The seed its bootstrap used ([`agent_seed`]).
    pub bootstrap_seed: u64,
}

/// The suite's meta data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteMeta {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// The budget run.
    pub budget: String,
    /// Difficulty.
    pub difficulty: String,
    /// Split.
    pub split: String,
    /// Bootstrap and profile settings.
    pub scoring: Scoring,
    /// The suite file's text.
    pub file: String,
    /// The tasks selected (empty: all).
    pub selected_tasks: Vec<String>,
    /// The agents selected (empty: all).
    pub selected_agents: Vec<String>,
    /// Only the first this many seeds of each task's budget ran (absent: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_seeds: Option<usize>,
}

/// What `scopegym suite` writes as `suite.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteResults {
    /// The suite.
    pub suite: SuiteMeta,
    /// Version and commit of the build.
    pub provenance: BuildInfo,
    /// Per task.
    pub tasks: Vec<TaskResults>,
    /// The `τ` grid of the profiles.
    pub taus: Vec<f64>,
    /// Per agent across tasks (references included), in order of first appearance.
    pub aggregate: Vec<Aggregate>,
    /// Agents listed that did not run, with the reason.
    pub skipped: Vec<Skipped>,
    /// Agents scored from results made outside the suite ([`score_with`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external: Vec<ExternalAgent>,
}

/// Results made outside the suite for one of its tasks (a `results.json` of `scopegym mcp
/// --record` or `scopegym run`), to score beside the suite's agents ([`score_with`]).
#[derive(Debug, Clone)]
pub struct ExternalResults {
    /// Where they came from (named in errors and in [`ExternalAgent::files`]).
    pub file: String,
    /// The results.
    pub results: RunResults,
}

/// An agent scored from [`ExternalResults`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExternalAgent {
    /// The agent.
    pub agent: String,
    /// The files its results came from.
    pub files: Vec<String>,
    /// The tasks it covers (its [`Aggregate`] pools these only).
    pub tasks: Vec<String>,
    /// When it covers fewer tasks than the suite scored: every agent's aggregate over the same
    /// tasks (in [`SuiteResults::aggregate`]'s order), for a like-for-like comparison; empty
    /// when it covers them all.
    pub same_tasks: Vec<Aggregate>,
    /// How its episodes ran where that differs from the suite's agents, which play the bare
    /// simulator: through the safety guard (`scopegym mcp`), with its driver and the steps the
    /// guard refused, per file; and the build that made a file when it is not the suite's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The bootstrap seed of `agent`: `base` plus the 64-bit FNV-1a hash of its name (wrapping), so
/// an agent's interval does not depend on which others ran.
pub fn agent_seed(base: u64, agent: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in agent.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    base.wrapping_add(h)
}

/// The aggregate of `agent` over the tasks of `by_task` it ran on.
fn aggregate_of(file: &SuiteFile, by_task: &[TaskResults], name: &str, taus: &[f64]) -> Aggregate {
    let sc = &file.scoring;
    let mut tasks = Vec::new();
    let mut per_task = Vec::new();
    for t in by_task {
        if let Some(a) = t.agents.iter().find(|a| a.agent == name) {
            tasks.push(t.id.clone());
            per_task.push(a.normalized.clone());
        }
    }
    let seed = agent_seed(sc.bootstrap_seed, name);
    let all: Vec<f64> = per_task.iter().flatten().copied().collect();
    Aggregate {
        agent: name.to_owned(),
        tasks,
        runs: all.len(),
        iqm: stats::pooled_iqm(&per_task).unwrap_or(f64::NAN),
        iqm_ci: stats::stratified_bootstrap_iqm(
            &per_task,
            sc.bootstrap_resamples,
            sc.confidence,
            seed,
        )
        .unwrap_or([f64::NAN; 2]),
        mean: stats::mean_ci95(&all).0,
        profile: stats::performance_profile(&per_task, taus),
        bootstrap_seed: seed,
    }
}

/// Scores the results of a suite run: normalized scores per task, IQM with bootstrap interval
/// and profile per agent.
///
/// Errors when a task lacks a reference agent's results.
pub fn score(
    file: &SuiteFile,
    sel: &Selection,
    text: &str,
    build: &BuildInfo,
    results: Vec<RunResults>,
    skipped: Vec<Skipped>,
) -> Result<SuiteResults> {
    let taus = file.taus();
    let mut task_ids: Vec<String> = Vec::new();
    for r in &results {
        if !task_ids.contains(&r.env_id) {
            task_ids.push(r.env_id.clone());
        }
    }
    let mut by_task: Vec<TaskResults> = Vec::new();
    for id in &task_ids {
        let mean_of = |agent: &str| -> Result<f64> {
            results
                .iter()
                .find(|r| &r.env_id == id && r.agent == agent)
                .map(|r| {
                    r.per_seed.iter().map(|s| s.return_mean).sum::<f64>() / r.per_seed.len() as f64
                })
                .ok_or_else(|| {
                    AgentError::arg(
                        "results",
                        format!("{id} has no results of the reference agent {agent}"),
                    )
                })
        };
        let low = mean_of(&file.reference_low)?;
        let high = mean_of(&file.reference_high)?;
        let agents = results
            .iter()
            .filter(|r| &r.env_id == id)
            .map(|r| {
                let normalized: Vec<f64> = r
                    .per_seed
                    .iter()
                    .map(|s| stats::normalized(s.return_mean, low, high))
                    .collect();
                let mut results = r.clone();
                results.drop_steps();
                AgentOnTask {
                    agent: r.agent.clone(),
                    normalized_mean: normalized.iter().sum::<f64>() / normalized.len() as f64,
                    normalized,
                    results,
                }
            })
            .collect();
        by_task.push(TaskResults {
            id: id.clone(),
            reference: Reference {
                low_agent: file.reference_low.clone(),
                low,
                high_agent: file.reference_high.clone(),
                high,
            },
            agents,
        });
    }
    let mut names: Vec<String> = Vec::new();
    for r in &results {
        if !names.contains(&r.agent) {
            names.push(r.agent.clone());
        }
    }
    let aggregate = names
        .iter()
        .map(|name| aggregate_of(file, &by_task, name, &taus))
        .collect();
    Ok(SuiteResults {
        suite: SuiteMeta {
            name: file.name.clone(),
            version: file.version,
            budget: sel.budget.clone(),
            difficulty: file.difficulty.clone(),
            split: file.split.clone(),
            scoring: file.scoring.clone(),
            file: text.into(),
            selected_tasks: sel.tasks.clone(),
            selected_agents: sel.agents.clone(),
            selected_seeds: sel.seeds,
        },
        provenance: build.clone(),
        tasks: by_task,
        taus,
        aggregate,
        skipped,
        external: Vec::new(),
    })
}

/// The keys at which two JSON objects differ (their values shown), or the two values.
fn json_diff(ours: &serde_json::Value, theirs: &serde_json::Value) -> String {
    match (ours.as_object(), theirs.as_object()) {
        (Some(a), Some(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter(|k| a.get(*k) != b.get(*k))
                .map(|k| {
                    let show = |v: Option<&serde_json::Value>| {
                        v.map_or_else(|| "absent".to_string(), ToString::to_string)
                    };
                    format!("{k} = {} (suite: {})", show(b.get(k)), show(a.get(k)))
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
        _ => format!("{theirs} (suite: {ours})"),
    }
}

/// Checks what can be checked of outside results before the suite runs: each is for one of
/// `tasks` (the task ids the suite runs) and its agent is not named as one of the suite's.
pub fn check_external(file: &SuiteFile, tasks: &[&str], ext: &[ExternalResults]) -> Result<()> {
    let bad = |f: &str, why: String| AgentError::arg("add-results", format!("{f}: {why}"));
    let suite_agents: Vec<&str> = file
        .tasks
        .iter()
        .flat_map(|t| &t.agents)
        .map(String::as_str)
        .chain([file.reference_low.as_str(), file.reference_high.as_str()])
        .collect();
    for e in ext {
        let r = &e.results;
        if suite_agents.contains(&r.agent.as_str()) {
            return Err(bad(
                &e.file,
                format!(
                    "agent {:?} is an agent of the suite; give the outside results another name \
                     (scopegym mcp --agent NAME, or the file's \"agent\")",
                    r.agent
                ),
            ));
        }
        if !tasks.contains(&r.env_id.as_str()) {
            let mut ids = tasks.to_vec();
            ids.dedup();
            return Err(bad(
                &e.file,
                format!(
                    "task {} is not in this suite run (it runs: {})",
                    r.env_id,
                    ids.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// (agent, file) of each outside results file.
type AgentFiles = Vec<(String, String)>;

/// Checks `ext` against the suite's runs and merges each (agent, task)'s files into one
/// [`RunResults`] over the suite's run seeds (in the suite's order).
fn external_runs(
    file: &SuiteFile,
    results: &[RunResults],
    ext: Vec<ExternalResults>,
) -> Result<(Vec<RunResults>, AgentFiles)> {
    let bad = |f: &str, why: String| AgentError::arg("add-results", format!("{f}: {why}"));
    let tasks: Vec<&str> = results.iter().map(|x| x.env_id.as_str()).collect();
    check_external(file, &tasks, &ext)?;
    // Per (agent, task): the reference run it is checked against, and (file, seed result)s.
    type Group<'r> = (
        String,
        String,
        &'r RunResults,
        Vec<(String, SeedResult)>,
        RunResults,
    );
    let mut groups: Vec<Group<'_>> = Vec::new();
    let mut files: AgentFiles = Vec::new();
    for e in ext {
        let (f, r) = (e.file, e.results);
        let reference = results
            .iter()
            .find(|x| x.env_id == r.env_id && x.agent == file.reference_low)
            .ok_or_else(|| bad(&f, format!("no {} run on {}", file.reference_low, r.env_id)))?;
        let (p, q) = (&reference.provenance, &r.provenance);
        if q.env_config != p.env_config {
            return Err(bad(
                &f,
                format!(
                    "its task config differs from the suite's for {}: {}; a score under \
                     another config is not comparable",
                    r.env_id,
                    json_diff(&p.env_config, &q.env_config)
                ),
            ));
        }
        for (field, ours, theirs) in [
            ("difficulty", &p.difficulty, &q.difficulty),
            ("split", &p.split, &q.split),
        ] {
            if ours != theirs {
                return Err(bad(
                    &f,
                    format!("{field} {theirs:?}, but the suite's is {ours:?}"),
                ));
            }
        }
        if q.max_episode_steps != p.max_episode_steps {
            return Err(bad(
                &f,
                format!(
                    "max_episode_steps {}, but the suite's {} has {}",
                    q.max_episode_steps, r.env_id, p.max_episode_steps
                ),
            ));
        }
        if let Some(s) = r.per_seed.iter().find(|s| !s.return_mean.is_finite()) {
            return Err(bad(&f, format!("run seed {} has no finite score", s.seed)));
        }
        let at = match groups
            .iter()
            .position(|g| g.0 == r.agent && g.1 == r.env_id)
        {
            Some(i) => i,
            None => {
                groups.push((
                    r.agent.clone(),
                    r.env_id.clone(),
                    reference,
                    Vec::new(),
                    r.clone(),
                ));
                groups.len() - 1
            }
        };
        for s in &r.per_seed {
            if let Some((g, _)) = groups[at].3.iter().find(|(_, x)| x.seed == s.seed) {
                return Err(bad(
                    &f,
                    format!(
                        "run seed {} of {} on {} is also in {g}",
                        s.seed, r.agent, r.env_id
                    ),
                ));
            }
            groups[at].3.push((f.clone(), s.clone()));
        }
        files.push((r.agent.clone(), f));
    }
    let mut out = Vec::new();
    for (agent, task, reference, mut seeds, mut merged) in groups {
        let names = || {
            let mut n: Vec<&str> = seeds.iter().map(|(f, _)| f.as_str()).collect();
            n.dedup();
            n.join(", ")
        };
        let have: Vec<u64> = seeds.iter().map(|(_, s)| s.seed).collect();
        let mut want = reference.seeds.clone();
        let (mut a, mut b) = (have.clone(), want.clone());
        a.sort_unstable();
        b.sort_unstable();
        if a != b {
            return Err(bad(
                &names(),
                format!(
                    "{agent} on {task} has run seeds {have:?}, but the suite ran {want:?}: its \
                     score must cover the same scenarios (run the suite with --seeds N, or play \
                     the missing run seeds)"
                ),
            ));
        }
        seeds.sort_by_key(|(_, s)| want.iter().position(|&w| w == s.seed));
        for ((f, s), r) in seeds.iter().zip(&reference.per_seed) {
            let theirs: Vec<u64> = s.episodes.iter().map(|e| e.seed).collect();
            let ours: Vec<u64> = r.episodes.iter().map(|e| e.seed).collect();
            if theirs != ours {
                return Err(bad(
                    f,
                    format!(
                        "run seed {} of {agent} on {task} played episode seeds {theirs:?}, but \
                         the suite's are {ours:?}: a score on other scenarios is not comparable",
                        s.seed
                    ),
                ));
            }
        }
        merged.seeds = std::mem::take(&mut want);
        merged.per_seed = seeds.into_iter().map(|(_, s)| s).collect();
        merged.summary = super::run::summarize(&merged.per_seed);
        out.push(merged);
    }
    Ok((out, files))
}

/// [`score`] with results made outside the suite scored beside its agents, exactly as they
/// are: normalized with the task's references, pooled into an [`Aggregate`] over the tasks the
/// agent covers, and listed in [`SuiteResults::external`] (with every agent's aggregate over
/// the same tasks when it covers fewer than the suite scored).
///
/// Errors, naming the file: a task the suite did not score; an agent name the suite file lists;
/// a task config, difficulty, split or step limit other than the suite's for the task; run
/// seeds other than the suite's for the task (several files of one agent and task are merged
/// first; a run seed in two of them is an error); per run seed, episode seeds other than the
/// suite's.
pub fn score_with(
    file: &SuiteFile,
    sel: &Selection,
    text: &str,
    build: &BuildInfo,
    mut results: Vec<RunResults>,
    skipped: Vec<Skipped>,
    external: Vec<ExternalResults>,
) -> Result<SuiteResults> {
    // What the files' provenance says of the guard (`scopegym mcp` records it), per agent.
    let mut notes: Vec<(String, String)> = Vec::new();
    for e in &external {
        let g = &e.results.provenance.agent_config["guard"];
        if g.is_object() {
            notes.push((
                e.results.agent.clone(),
                format!(
                    "{}: {} ran through the safety guard on {} ({} refused step(s); the limits are \
                     in the file's provenance), the suite's agents without it",
                    e.file,
                    e.results.env_id,
                    g["driver"].as_str().unwrap_or("?"),
                    g["refused_steps"].as_u64().unwrap_or(0)
                ),
            ));
        }
    }
    // A build other than the suite's: the task ids, configs and seeds match (checked below),
    // but a fix between builds that kept the ids could still move the scores.
    for e in &external {
        let p = &e.results.provenance;
        let commits_differ =
            !p.commit.is_empty() && !build.commit.is_empty() && p.commit != build.commit;
        if p.version != build.version || commits_differ {
            let describe = |v: &str, c: &str| {
                if c.is_empty() {
                    format!("scopegym {v}")
                } else {
                    format!("scopegym {v} ({c})")
                }
            };
            notes.push((
                e.results.agent.clone(),
                format!(
                    "{}: made by {}, the suite by {}",
                    e.file,
                    describe(&p.version, &p.commit),
                    describe(&build.version, &build.commit)
                ),
            ));
        }
    }
    let (ext, files) = external_runs(file, &results, external)?;
    let mut names: Vec<String> = Vec::new();
    for r in &ext {
        if !names.contains(&r.agent) {
            names.push(r.agent.clone());
        }
    }
    results.extend(ext);
    let mut s = score(file, sel, text, build, results, skipped)?;
    let taus = s.taus.clone();
    for name in names {
        let tasks: Vec<String> = s
            .tasks
            .iter()
            .filter(|t| t.agents.iter().any(|a| a.agent == name))
            .map(|t| t.id.clone())
            .collect();
        let same_tasks = if tasks.len() < s.tasks.len() {
            let sub: Vec<TaskResults> = s
                .tasks
                .iter()
                .filter(|t| tasks.contains(&t.id))
                .cloned()
                .collect();
            s.aggregate
                .iter()
                .filter(|a| a.tasks.iter().any(|t| tasks.contains(t)))
                .map(|a| aggregate_of(file, &sub, &a.agent, &taus))
                .collect()
        } else {
            Vec::new()
        };
        s.external.push(ExternalAgent {
            files: files
                .iter()
                .filter(|(a, _)| *a == name)
                .map(|(_, f)| f.clone())
                .collect(),
            notes: notes
                .iter()
                .filter(|(a, _)| *a == name)
                .map(|(_, n)| n.clone())
                .collect(),
            agent: name,
            tasks,
            same_tasks,
        });
    }
    Ok(s)
}

/// Plans, runs and scores the suite in `text` (a suite file): [`plan`], [`run_jobs`], [`score`].
pub fn run_suite(
    text: &str,
    sel: &Selection,
    build: &BuildInfo,
    progress: &mut dyn FnMut(SuiteProgress<'_>),
    note: &mut dyn FnMut(&Skipped),
) -> Result<SuiteResults> {
    run_suite_in(text, sel, build, None, progress, note)
}

/// [`run_suite`] saving each finished seed in `dir` and reusing those already there
/// ([`run_jobs_in`]).
pub fn run_suite_in(
    text: &str,
    sel: &Selection,
    build: &BuildInfo,
    dir: Option<&Path>,
    progress: &mut dyn FnMut(SuiteProgress<'_>),
    note: &mut dyn FnMut(&Skipped),
) -> Result<SuiteResults> {
    let file = SuiteFile::parse(text)?;
    let jobs = plan(&file, sel, build)?;
    let (results, skipped) = run_jobs_in(&jobs, dir, progress, note)?;
    score(&file, sel, text, build, results, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::run::{Budget as RunBudget, Provenance, SeedResult, Summary};

    #[test]
    fn the_embedded_suite_parses_and_lists_every_task() {
        let s = SuiteFile::embedded();
        assert_eq!(s.version, 2);
        assert_eq!(s.split, "test");
        let ids: Vec<&str> = s.tasks.iter().map(|t| t.id.as_str()).collect();
        for t in scopegym_envs::registry::TASKS {
            assert!(ids.contains(&t.id), "{} missing from the suite", t.id);
        }
        for t in &s.tasks {
            assert!(t.agents.contains(&"random".to_string()));
            assert!(t.agents.contains(&"heuristic".to_string()));
        }
        assert!(s.budgets.contains_key("small") && s.budgets.contains_key("full"));
        assert_eq!(s.taus().len(), 61);
    }

    #[test]
    fn bad_suite_files_name_the_field() {
        let bad = SUITE_V2.replace("bootstrap_resamples = 2000", "bootstrap_resamples = 0");
        let e = SuiteFile::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("bootstrap_resamples"), "{e}");
        let bad = SUITE_V2.replace("id = \"scopegym/StemSparseScan-v2\"", "id = \"nope\"");
        let e = SuiteFile::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("tasks[8].id"), "{e}");
        let bad = SUITE_V2.replace("episodes = 4", "episodes = 4\nbogus = 1");
        let e = SuiteFile::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn plan_puts_references_first_and_skips_unregistered_agents() {
        let s = SuiteFile::embedded();
        let sel = Selection {
            budget: "small".into(),
            agents: vec!["raster".into()],
            tasks: vec!["StemSparseScan".into()],
            seeds: None,
        };
        let jobs = plan(&s, &sel, &BuildInfo::default()).unwrap();
        let names: Vec<&str> = jobs.iter().map(|j| j.spec.agent.as_str()).collect();
        assert_eq!(names, ["random", "heuristic", "raster"]);
        assert!(jobs.iter().all(|j| j.skip.is_none()));
        assert_eq!(jobs[0].units, 5 * 4 * 12);
        // An agent the suite lists that no build registers is planned as skipped.
        let text = SUITE_V2.replace(
            "\"heuristic\", \"reinforce\"",
            "\"heuristic\", \"no-such-agent\", \"reinforce\"",
        );
        let s = SuiteFile::parse(&text).unwrap();
        let sel = Selection {
            budget: "small".into(),
            agents: vec!["no-such-agent".into()],
            tasks: vec!["StemSparseScan".into()],
            seeds: None,
        };
        let jobs = plan(&s, &sel, &BuildInfo::default()).unwrap();
        assert_eq!(
            jobs[2].skip.as_deref(),
            Some("not registered in this build")
        );
        assert!(
            plan(
                &s,
                &Selection {
                    budget: "huge".into(),
                    ..sel.clone()
                },
                &BuildInfo::default()
            )
            .is_err()
        );
        // The override of the small budget applies to its task.
        let sel = Selection {
            budget: "small".into(),
            agents: vec![],
            tasks: vec!["StemEelsExplore".into()],
            seeds: None,
        };
        assert_eq!(
            plan(&SuiteFile::embedded(), &sel, &BuildInfo::default()).unwrap()[0]
                .spec
                .episodes,
            2
        );
    }

    fn fake(task: &str, agent: &str, means: &[f64]) -> RunResults {
        RunResults {
            env_id: task.into(),
            agent: agent.into(),
            seeds: (0..means.len() as u64).collect(),
            per_seed: means
                .iter()
                .enumerate()
                .map(|(i, &m)| SeedResult {
                    seed: i as u64,
                    return_mean: m,
                    success_rate: 0.0,
                    steps: 1,
                    train_steps: 0,
                    eval_steps: 1,
                    curve: vec![],
                    episodes: vec![],
                })
                .collect(),
            summary: Summary {
                return_mean: 0.0,
                return_ci95: 0.0,
                success_rate: 0.0,
                episodes: 0,
            },
            provenance: Provenance {
                version: String::new(),
                commit: String::new(),
                env_config: serde_json::Value::Null,
                train_env_config: serde_json::Value::Null,
                agent_config: serde_json::Value::Null,
                difficulty: String::new(),
                split: String::new(),
                learns: false,
                budget: RunBudget {
                    train_steps: 0,
                    episodes: 1,
                },
                max_episode_steps: 1,
                episode_seeds: String::new(),
            },
        }
    }

    #[test]
    fn scores_by_hand() {
        // Task A: random 0, 2 (mean 1); heuristic 5, 5 (mean 5): span 4.
        //   raster 3, 9 → normalized (3−1)/4 = 0.5, (9−1)/4 = 2.
        // Task B: random −10, −10; heuristic −6, −6: span 4. raster −8, −10 → 0.5, 0.
        // Raster's pooled runs {0.5, 2, 0.5, 0}: IQM (n = 4, drop 1 each end) = mean(0.5, 0.5)
        // = 0.5; mean = 0.75. Profile at τ = 0.25: A 2/2, B 1/2 → 0.75; at τ = 1: A 1/2,
        // B 0 → 0.25.
        let results = vec![
            fake("A", "random", &[0.0, 2.0]),
            fake("A", "heuristic", &[5.0, 5.0]),
            fake("A", "raster", &[3.0, 9.0]),
            fake("B", "random", &[-10.0, -10.0]),
            fake("B", "heuristic", &[-6.0, -6.0]),
            fake("B", "raster", &[-8.0, -10.0]),
        ];
        let mut file = SuiteFile::embedded();
        file.scoring.tau_min = 0.25;
        file.scoring.tau_max = 1.0;
        file.scoring.tau_points = 2;
        let sel = Selection {
            budget: "small".into(),
            ..Default::default()
        };
        let r = score(&file, &sel, "", &BuildInfo::default(), results, vec![]).unwrap();
        assert_eq!(r.tasks[0].reference.low, 1.0);
        assert_eq!(r.tasks[0].reference.high, 5.0);
        let raster_a = &r.tasks[0].agents[2];
        assert_eq!(raster_a.normalized, vec![0.5, 2.0]);
        assert_eq!(raster_a.normalized_mean, 1.25);
        assert_eq!(r.tasks[1].agents[2].normalized, vec![0.5, 0.0]);
        let agg = r.aggregate.iter().find(|a| a.agent == "raster").unwrap();
        assert_eq!(agg.iqm, 0.5);
        assert_eq!(agg.mean, 0.75);
        assert_eq!(agg.runs, 4);
        assert_eq!(agg.profile, vec![0.75, 0.25]);
        assert!(agg.iqm_ci[0] <= 0.5 && 0.5 <= agg.iqm_ci[1]);
        // The references normalize to means of exactly 0 and 1.
        let rand_a = &r.tasks[0].agents[0];
        assert_eq!(rand_a.normalized, vec![-0.25, 0.25]);
        assert_eq!(r.tasks[1].agents[1].normalized_mean, 1.0);
        // A task without a reference is an error.
        let e = score(
            &file,
            &sel,
            "",
            &BuildInfo::default(),
            vec![fake("C", "raster", &[1.0])],
            vec![],
        );
        assert!(e.unwrap_err().to_string().contains("reference"));
    }

    #[test]
    fn outside_results_merge_per_seed_and_score_as_the_suites_own() {
        // Task A: random 0, 2 (mean 1), heuristic 5, 5: span 4. The outside agent's run seeds
        // come in two files, seed 1 first: 9 → (9 − 1)/4 = 2, seed 0: 3 → 0.5.
        let results = vec![
            fake("A", "random", &[0.0, 2.0]),
            fake("A", "heuristic", &[5.0, 5.0]),
            fake("B", "random", &[0.0, 0.0]),
            fake("B", "heuristic", &[1.0, 1.0]),
        ];
        let one = |seed: u64, m: f64, file: &str| {
            let mut r = fake("A", "llm", &[m]);
            r.seeds = vec![seed];
            r.per_seed[0].seed = seed;
            ExternalResults {
                file: file.into(),
                results: r,
            }
        };
        let file = SuiteFile::embedded();
        let sel = Selection {
            budget: "small".into(),
            ..Default::default()
        };
        let b = BuildInfo::default();
        let go = |ext: Vec<ExternalResults>| {
            score_with(&file, &sel, "", &b, results.clone(), vec![], ext)
        };
        let r = go(vec![one(1, 9.0, "s1.json"), one(0, 3.0, "s0.json")]).unwrap();
        let llm = r.tasks[0].agents.iter().find(|a| a.agent == "llm").unwrap();
        assert_eq!(llm.results.seeds, [0, 1]);
        assert_eq!(llm.normalized, [0.5, 2.0]);
        assert_eq!(llm.results.summary.return_mean, 6.0);
        assert!(r.tasks[1].agents.iter().all(|a| a.agent != "llm"));
        let e = &r.external[0];
        assert_eq!(e.files, ["s1.json", "s0.json"]);
        assert_eq!(e.tasks, ["A"]);
        // It covers 1 of 2 tasks: every agent's aggregate on task A alone.
        let names: Vec<&str> = e.same_tasks.iter().map(|a| a.agent.as_str()).collect();
        assert_eq!(names, ["random", "heuristic", "llm"]);
        assert_eq!(e.same_tasks[0].runs, 2);
        assert_eq!(e.same_tasks[2].mean, 1.25);
        assert!(e.notes.is_empty(), "{:?}", e.notes);
        // Made by another build: scored, with a note naming both builds.
        let mut other = one(0, 3.0, "o.json");
        other.results.provenance.version = "0.0.9".into();
        other.results.provenance.commit = "abc123".into();
        let r = go(vec![one(1, 9.0, "s1.json"), other]).unwrap();
        let notes = &r.external[0].notes;
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("o.json: made by") && notes[0].contains("(abc123)"),
            "{notes:?}"
        );
        // A seed in two files, a missing seed, and a suite agent's name are refused.
        let err = |ext| go(ext).unwrap_err().to_string();
        let e = err(vec![one(0, 3.0, "a.json"), one(0, 4.0, "b.json")]);
        assert!(e.contains("b.json") && e.contains("also in a.json"), "{e}");
        let e = err(vec![one(1, 3.0, "a.json")]);
        assert!(e.contains("a.json") && e.contains("run seeds [1]"), "{e}");
        let mut x = one(0, 3.0, "x.json");
        x.results.agent = "ppo".into();
        let e = err(vec![x]);
        assert!(e.contains("x.json") && e.contains("\"ppo\""), "{e}");
    }

    #[test]
    fn a_small_suite_runs_and_is_deterministic() {
        let text = SUITE_V2.replace("episodes = 4", "episodes = 1");
        let sel = Selection {
            budget: "small".into(),
            agents: vec!["raster".into()],
            tasks: vec!["StemSparseScan".into(), "AfmFeedbackTuning".into()],
            seeds: None,
        };
        let t = std::time::Instant::now();
        let mut notes = Vec::new();
        let a = run_suite(&text, &sel, &BuildInfo::default(), &mut |_| {}, &mut |s| {
            notes.push(s.clone())
        })
        .unwrap();
        println!("2-task suite in {:.2} s", t.elapsed().as_secs_f64());
        let b = run_suite(&text, &sel, &BuildInfo::default(), &mut |_| {}, &mut |_| {}).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.tasks.len(), 2);
        assert_eq!(a.aggregate.len(), 3);
        assert!(notes.is_empty());
        let h = a.aggregate.iter().find(|x| x.agent == "heuristic").unwrap();
        // The heuristic's normalized task means are exactly 1.
        for t in &a.tasks {
            let m = t
                .agents
                .iter()
                .find(|x| x.agent == "heuristic")
                .unwrap()
                .normalized_mean;
            assert!((m - 1.0).abs() < 1e-12, "{m}");
        }
        assert_eq!(h.runs, 10);
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("scopegym-suite-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn two_task_jobs(episodes: usize) -> Vec<Job> {
        let text = SUITE_V2.replace("episodes = 4", &format!("episodes = {episodes}"));
        let sel = Selection {
            budget: "small".into(),
            agents: vec!["raster".into()],
            tasks: vec!["StemSparseScan".into(), "AfmFeedbackTuning".into()],
            seeds: Some(3),
        };
        plan(
            &SuiteFile::parse(&text).unwrap(),
            &sel,
            &BuildInfo::default(),
        )
        .unwrap()
    }

    #[test]
    fn seeds_run_as_saved_jobs_merge_into_the_multi_seed_runs_and_gather_back() {
        let dir = scratch("saved");
        let jobs = two_task_jobs(1);
        assert_eq!(jobs.len(), 6);
        assert!(jobs.iter().all(|j| j.spec.seeds == [0, 1, 2]));
        assert_eq!(pending(&jobs, &dir).unwrap().len(), 18);
        let mut last = 0;
        let (a, skips) =
            run_jobs_in(&jobs, Some(&dir), &mut |p| last = p.done, &mut |_| {}).unwrap();
        assert!(skips.is_empty());
        assert_eq!(last, jobs.iter().map(|j| j.units).sum::<u64>());
        // Each merged job equals the run of all its seeds at once.
        for (j, r) in jobs.iter().zip(&a) {
            assert_eq!(r, &super::super::run_agent(&j.spec, &mut |_| {}).unwrap());
        }
        // Every seed was saved: nothing pending, and gathering the files gives the same.
        assert!(pending(&jobs, &dir).unwrap().is_empty());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 18);
        let (b, _) = gather(&jobs, &dir).unwrap();
        assert_eq!(a, b);
        // A missing seed is an error naming its file.
        let gone = dir.join("AfmFeedbackTuning-v2.raster.seed1.json");
        std::fs::remove_file(&gone).unwrap();
        let e = gather(&jobs, &dir).unwrap_err().to_string();
        assert!(e.contains("AfmFeedbackTuning-v2.raster.seed1.json"), "{e}");
        assert_eq!(pending(&jobs, &dir).unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_resumed_suite_reuses_finished_jobs_and_refuses_other_ones() {
        let dir = scratch("resume");
        let jobs = two_task_jobs(1);
        run_jobs_in(&jobs[..2], Some(&dir), &mut |_| {}, &mut |_| {}).unwrap();
        // Mark one saved seed so that reuse (not a rerun) shows in the results.
        let one = &JobSpec::split(&jobs[1].spec)[2];
        let path = jobs::record_path(&dir, one);
        let mut rec = jobs::read_record(&path).unwrap().unwrap();
        let Outcome::Done(r) = &mut rec.outcome else {
            panic!()
        };
        r.per_seed[0].return_mean = 1234.5;
        jobs::write_record(&path, &rec).unwrap();
        let (res, _) = run_jobs_in(&jobs, Some(&dir), &mut |_| {}, &mut |_| {}).unwrap();
        assert_eq!(res.len(), 6);
        assert_eq!(res[1].per_seed[2].return_mean, 1234.5);
        assert_ne!(res[1].per_seed[1].return_mean, 1234.5);
        // Another budget (2 episodes) or build in the same folder is refused, naming the field.
        let e = run_jobs_in(&two_task_jobs(2), Some(&dir), &mut |_| {}, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("different episodes"), "{e}");
        let mut other = two_task_jobs(1);
        other[0].spec.build.commit = "0123".into();
        let e = pending(&other, &dir).unwrap_err().to_string();
        assert!(e.contains("different build"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
