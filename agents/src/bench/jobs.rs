//! Runs split into one-seed jobs, each saved to a file as soon as it finishes, and merged back.
//!
//! A [`RunSpec`] over seeds `s₀, s₁, …` splits into one [`JobSpec`] per seed
//! ([`JobSpec::split`]). The seeds of a run do not share state: each builds its agent from its
//! own seed, trains on its own seed and plays episodes whose reset seeds derive from it (see
//! [`super::run`]), so [`merge`] of the one-seed results gives exactly (bit for bit) the
//! multi-seed [`RunResults`] of [`super::run_agent`], summary and provenance included. That is
//! what lets `scopegym suite` and `scopegym run` run their seeds anywhere (on Ray workers, or
//! resumed after a crash) and still write the same files.
//!
//! A finished job is a [`JobRecord`] file (`<dir>/<name>.json`, [`JobSpec::name`]) written
//! atomically ([`write_record`]): the job it ran (with the build's version and commit) and its
//! outcome. [`reuse`] gives back a finished job's results when its file holds the same job, and
//! refuses (an error naming the differing fields) a file made with another job or build.

use super::run::{BuildInfo, RunProgress, RunResults, RunSpec, run_agent, summarize};
use crate::error::{AgentError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One seed of a run: a [`RunSpec`] with a single seed, serializable (what `scopegym job`
/// reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The task id.
    pub env_id: String,
    /// The agent's registry name.
    pub agent: String,
    /// The agent config (a table), `None` for the agent's defaults.
    pub agent_config: Option<toml::Value>,
    /// Task config overrides (a table), `None` for none.
    pub env_config: Option<toml::Value>,
    /// Difficulty level.
    pub difficulty: String,
    /// The split evaluated on.
    pub split: String,
    /// The run seed.
    pub seed: u64,
    /// Training env steps (learning agents only).
    pub train_steps: u64,
    /// Evaluation episodes.
    pub episodes: usize,
    /// Keep every step's reward and regret.
    pub keep_steps: bool,
    /// Version and commit of the build that runs it.
    pub build: BuildInfo,
    /// Where a learning agent saves what it learned (`<dir>/seed<s>/`), `None` for nowhere.
    pub save_dir: Option<PathBuf>,
}

impl JobSpec {
    /// One job per seed of `spec`, in the order of `spec.seeds`.
    pub fn split(spec: &RunSpec) -> Vec<JobSpec> {
        spec.seeds
            .iter()
            .map(|&seed| JobSpec {
                env_id: spec.env_id.clone(),
                agent: spec.agent.clone(),
                agent_config: spec.agent_config.clone(),
                env_config: spec.env_config.clone(),
                difficulty: spec.difficulty.clone(),
                split: spec.split.clone(),
                seed,
                train_steps: spec.train_steps,
                episodes: spec.episodes,
                keep_steps: spec.keep_steps,
                build: spec.build.clone(),
                save_dir: spec.save_dir.clone(),
            })
            .collect()
    }

    /// The [`RunSpec`] of this one seed.
    pub fn run_spec(&self) -> RunSpec {
        RunSpec {
            env_id: self.env_id.clone(),
            agent: self.agent.clone(),
            agent_config: self.agent_config.clone(),
            env_config: self.env_config.clone(),
            difficulty: self.difficulty.clone(),
            split: self.split.clone(),
            seeds: vec![self.seed],
            train_steps: self.train_steps,
            episodes: self.episodes,
            keep_steps: self.keep_steps,
            build: self.build.clone(),
            save_dir: self.save_dir.clone(),
        }
    }

    /// A file name for the job: `<task>.<agent>.seed<s>` (the task id without `scopegym/`,
    /// characters other than letters, digits, `-` and `_` replaced by `_`). Unique within a
    /// suite (one run per task and agent).
    pub fn name(&self) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        format!(
            "{}.{}.seed{}",
            clean(self.env_id.trim_start_matches("scopegym/")),
            clean(&self.agent),
            self.seed
        )
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Its one-seed results.
    Done(Box<RunResults>),
    /// The agent cannot run here ([`AgentError::MissingFeature`], [`AgentError::Unsupported`]):
    /// why.
    Skipped(String),
}

/// A finished job, as saved: the job and its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRecord {
    /// The job it ran.
    pub job: JobSpec,
    /// Its outcome.
    pub outcome: Outcome,
}

/// Runs one job; an agent that cannot run here is [`Outcome::Skipped`], any other failure an
/// error.
pub fn run_job(job: &JobSpec, progress: &mut dyn FnMut(RunProgress)) -> Result<Outcome> {
    match run_agent(&job.run_spec(), progress) {
        Ok(r) => Ok(Outcome::Done(Box::new(r))),
        Err(e @ (AgentError::MissingFeature { .. } | AgentError::Unsupported { .. })) => {
            Ok(Outcome::Skipped(e.to_string()))
        }
        Err(e) => Err(e),
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> AgentError {
    AgentError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Writes `record` to `path` atomically: to a temporary file beside it (named with this
/// process's id), then renamed over `path`, so a reader sees the whole record or none.
pub fn write_record(path: &Path, record: &JobRecord) -> Result<()> {
    let text = serde_json::to_string(record).map_err(|e| io_err(path, e))?;
    let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
    std::fs::write(&tmp, text + "\n").map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// Reads a job record; `None` when the file does not exist.
pub fn read_record(path: &Path) -> Result<Option<JobRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| io_err(path, format!("not a job record of scopegym: {e}")))
}

/// The top-level fields in which two jobs differ.
fn differences(a: &JobSpec, b: &JobSpec) -> Vec<String> {
    let (Ok(serde_json::Value::Object(x)), Ok(serde_json::Value::Object(y))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return vec!["job".into()];
    };
    x.iter()
        .filter(|(k, v)| y.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect()
}

/// The results of `job` saved in `dir` ([`JobSpec::name`]), if it finished there: `None` when
/// there is no file or it was skipped (skips are cheap to find again, and depend on the build's
/// features). A file of the same name made with another job or build is an error naming the
/// fields that differ (results of different runs are never mixed).
pub fn reuse(dir: &Path, job: &JobSpec) -> Result<Option<RunResults>> {
    let path = record_path(dir, job);
    let Some(rec) = read_record(&path)? else {
        return Ok(None);
    };
    if rec.job != *job {
        return Err(AgentError::arg(
            "out",
            format!(
                "{} holds a finished job made with a different {} (another suite file, budget, \
                 selection or build); use another output folder, or `--restart` to run every job \
                 again",
                path.display(),
                differences(&rec.job, job).join(", ")
            ),
        ));
    }
    Ok(match rec.outcome {
        Outcome::Done(r) => Some(*r),
        Outcome::Skipped(_) => None,
    })
}

/// Where `job`'s record lives in `dir`: `<dir>/<name>.json`.
pub fn record_path(dir: &Path, job: &JobSpec) -> PathBuf {
    dir.join(format!("{}.json", job.name()))
}

/// Merges the one-seed results of one run (in the order of its seeds) into the results
/// [`super::run_agent`] gives for all those seeds at once: the per-seed entries in order, the
/// summary over them, and the provenance of the first (every part must be of the same task and
/// agent, with the same provenance apart from the resolved agent config).
pub fn merge(parts: Vec<RunResults>) -> Result<RunResults> {
    let mut it = parts.into_iter();
    let Some(mut out) = it.next() else {
        return Err(AgentError::arg("parts", "nothing to merge"));
    };
    for p in it {
        let mut prov = p.provenance.clone();
        prov.agent_config = out.provenance.agent_config.clone();
        if p.env_id != out.env_id || p.agent != out.agent || prov != out.provenance {
            return Err(AgentError::arg(
                "parts",
                format!(
                    "cannot merge results of {} on {} with {} on {} made otherwise",
                    p.agent, p.env_id, out.agent, out.env_id
                ),
            ));
        }
        out.seeds.extend(p.seeds);
        out.per_seed.extend(p.per_seed);
    }
    out.summary = summarize(&out.per_seed);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh empty folder under the system's temporary folder.
    pub(crate) fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "scopegym-jobs-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn spec(task: &str, agent: &str, seeds: &[u64]) -> RunSpec {
        let mut s = RunSpec::new(task, agent);
        s.seeds = seeds.to_vec();
        s.episodes = 2;
        s.keep_steps = false;
        s.build = BuildInfo {
            version: "1.2.3".into(),
            commit: "abc".into(),
        };
        s
    }

    /// Every task of the suite (its config, difficulty and split), with the random and heuristic
    /// agents (the heuristic keeps state within an episode): seeds 3 and 0 run together (one env
    /// reused across seeds) equal the two one-seed runs merged, bit for bit, summary included,
    /// also after a round trip through the job files.
    #[test]
    fn one_seed_jobs_merge_into_the_multi_seed_run() {
        let dir = scratch("merge");
        let file = super::super::suite::SuiteFile::embedded();
        for t in &file.tasks {
            for agent in ["random", "heuristic"] {
                let mut s = spec(&t.id, agent, &[3, 0]);
                s.episodes = 1;
                s.env_config = t.config.clone().map(toml::Value::Table);
                s.difficulty = file.difficulty.clone();
                s.split = file.split.clone();
                let whole = run_agent(&s, &mut |_| {}).unwrap();
                let jobs = JobSpec::split(&s);
                assert_eq!(jobs.len(), 2);
                let mut parts = Vec::new();
                for j in &jobs {
                    assert_eq!(j.run_spec().seeds, vec![j.seed]);
                    let Outcome::Done(r) = run_job(j, &mut |_| {}).unwrap() else {
                        panic!("{} skipped", j.name())
                    };
                    write_record(
                        &record_path(&dir, j),
                        &JobRecord {
                            job: j.clone(),
                            outcome: Outcome::Done(r),
                        },
                    )
                    .unwrap();
                    parts.push(reuse(&dir, j).unwrap().expect("saved"));
                }
                let merged = merge(parts).unwrap();
                assert_eq!(merged, whole, "{agent} on {}", t.id);
                // Bit for bit, not just ==: the floats' bits and the written text agree.
                assert_eq!(
                    merged.summary.return_ci95.to_bits(),
                    whole.summary.return_ci95.to_bits()
                );
                assert_eq!(
                    serde_json::to_string(&merged).unwrap(),
                    serde_json::to_string(&whole).unwrap()
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn job_specs_and_floats_round_trip_exactly_through_json() {
        let mut s = spec("scopegym/StemSparseScan-v2", "bo", &[7]);
        // Floats whose decimal text needs all 17 digits.
        s.agent_config = Some(toml::from_str("xi = 0.1\nbeta = 2.718281828459045").unwrap());
        s.env_config = Some(toml::from_str("max_steps = 5").unwrap());
        let j = &JobSpec::split(&s)[0];
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(j).unwrap()).unwrap();
        assert_eq!(&back, j);
        assert_eq!(j.name(), "StemSparseScan-v2.bo.seed7");
        for x in [
            0.1f64,
            1.0 / 3.0,
            2.2250738585072014e-308,
            5e-324,
            1.7976931348623157e308,
        ] {
            let y: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            assert_eq!(x.to_bits(), y.to_bits(), "{x:e}");
        }
    }

    #[test]
    fn reuse_refuses_a_job_made_otherwise_and_ignores_skips() {
        let dir = scratch("reuse");
        let s = spec("scopegym/StemSparseScan-v2", "random", &[2]);
        let j = JobSpec::split(&s).remove(0);
        assert_eq!(reuse(&dir, &j).unwrap(), None);
        let Outcome::Done(r) = run_job(&j, &mut |_| {}).unwrap() else {
            panic!()
        };
        let path = record_path(&dir, &j);
        write_record(
            &path,
            &JobRecord {
                job: j.clone(),
                outcome: Outcome::Done(r.clone()),
            },
        )
        .unwrap();
        assert_eq!(reuse(&dir, &j).unwrap(), Some(*r));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        // Another build or budget: refused, naming the fields.
        let mut other = j.clone();
        other.build.commit = "def".into();
        other.episodes = 3;
        let e = reuse(&dir, &other).unwrap_err().to_string();
        assert!(
            e.contains("build, episodes") && e.contains("seed2.json"),
            "{e}"
        );
        // A skip is not reused.
        write_record(
            &path,
            &JobRecord {
                job: j.clone(),
                outcome: Outcome::Skipped("no torch".into()),
            },
        )
        .unwrap();
        assert_eq!(reuse(&dir, &j).unwrap(), None);
        // A damaged file is an error naming it, not a panic.
        std::fs::write(&path, "{").unwrap();
        let e = reuse(&dir, &j).unwrap_err().to_string();
        assert!(e.contains("not a job record"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn merge_refuses_parts_of_different_runs() {
        let a = run_agent(
            &spec("scopegym/StemSparseScan-v2", "random", &[0]),
            &mut |_| {},
        )
        .unwrap();
        let b = run_agent(
            &spec("scopegym/StemSparseScan-v2", "heuristic", &[1]),
            &mut |_| {},
        )
        .unwrap();
        assert!(merge(vec![a.clone(), b]).is_err());
        assert!(merge(vec![]).is_err());
        let mut c = a.clone();
        c.provenance.budget.episodes = 9;
        assert!(merge(vec![a, c]).is_err());
    }
}
