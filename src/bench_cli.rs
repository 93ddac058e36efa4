//! `scopegym run` and `scopegym suite`: agents on tasks over seeds, and the scored benchmark
//! suite. The protocol lives in `scopegym_agents::bench`; this module parses, shows progress,
//! writes the files and prints the tables.
//!
//! With `--ray` the runs split into one-seed jobs (`scopegym_agents::bench::jobs`) whose specs
//! go to `<out>/jobs/`; the Ray driver `python/scopegym/ray_suite.py` (carried in the binary)
//! runs each as a Ray task calling `scopegym job` and saves its record there; the results are
//! then gathered and merged exactly as a run without Ray gives them.

use crate::plots;
use indicatif::{ProgressBar, ProgressStyle};
use scopegym::error::CliError;
use scopegym_agents::bench::jobs::{self, JobRecord, JobSpec};
use scopegym_agents::bench::suite::{
    self as suite_mod, Aggregate, ExternalResults, Job, SUITE_V2, Selection, Skipped, SuiteFile,
    SuiteProgress, SuiteResults,
};
use scopegym_agents::bench::{BuildInfo, RunProgress, RunResults, RunSpec, run_agent};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Ray driver (`python -m scopegym.ray_suite`), run with `python -c`.
const RAY_DRIVER: &str = include_str!("../python/scopegym/ray_suite.py");

/// Where `--ray` runs the jobs.
#[derive(Debug, Clone)]
pub struct RayOptions {
    /// `local`, `auto` or `HOST:PORT`.
    pub address: String,
    /// CPUs of a local Ray (default: all).
    pub cpus: Option<usize>,
}

/// The Python that runs the Ray driver: `$SCOPEGYM_PYTHON`, else the active virtual
/// environment's, else `python3`.
fn python() -> String {
    match (
        std::env::var("SCOPEGYM_PYTHON"),
        std::env::var("VIRTUAL_ENV"),
    ) {
        (Ok(p), _) if !p.is_empty() => p,
        (_, Ok(v)) if !v.is_empty() => format!("{v}/bin/python"),
        _ => "python3".into(),
    }
}

fn ray_error(message: String) -> CliError {
    CliError::Ray { message }
}

/// Runs the `pending` jobs on Ray: writes their specs to `dir`, starts the driver and waits for
/// it. Every job that finishes is saved in `dir` by the driver, whatever happens to the others.
fn run_on_ray(ray: &RayOptions, dir: &Path, pending: &[JobSpec]) -> Result<(), CliError> {
    if ray.cpus.is_some() && ray.address != "local" {
        return Err(CliError::Argument {
            argument: "--ray-cpus".into(),
            message: format!(
                "sets the CPUs of the Ray that --ray local starts; --ray {} joins a cluster",
                ray.address
            ),
        });
    }
    if pending.is_empty() {
        return Ok(());
    }
    let py = python();
    let install = "--ray needs a Python with Ray: pip install 'scopegym[ray]' \
                   (set $SCOPEGYM_PYTHON to choose the Python)";
    match Command::new(&py).args(["-c", "import ray"]).output() {
        Err(e) => return Err(ray_error(format!("cannot start {py}: {e}; {install}"))),
        Ok(o) if !o.status.success() => {
            let why = String::from_utf8_lossy(&o.stderr);
            let last = why.trim().lines().last().unwrap_or_default().to_string();
            return Err(ray_error(format!(
                "{py} cannot import ray ({last}); {install}"
            )));
        }
        Ok(_) => {}
    }
    let exe = std::env::current_exe().map_err(|source| CliError::Io {
        path: "scopegym".into(),
        source,
    })?;
    let mut names = Vec::with_capacity(pending.len());
    for j in pending {
        let name = j.name();
        write_json(&dir.join(format!("{name}.spec.json")), j)?;
        names.push(name);
    }
    let mut cmd = Command::new(&py);
    cmd.arg("-c")
        .arg(RAY_DRIVER)
        .arg("--address")
        .arg(&ray.address)
        .arg("--bin")
        .arg(&exe)
        .arg("--jobs")
        .arg(dir);
    if let Some(n) = ray.cpus {
        cmd.arg("--num-cpus").arg(n.to_string());
    }
    let status = cmd
        .args(&names)
        .status()
        .map_err(|e| ray_error(format!("cannot start {py}: {e}; {install}")))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(3) => Err(ray_error(install.into())),
        _ => Err(ray_error(format!(
            "not every job finished ({status}, see above); the finished ones are saved in {} \
             and a rerun into the same folder reuses them",
            dir.display()
        ))),
    }
}

/// `scopegym job <spec> --out <record>` (hidden; what a Ray task runs): one saved job.
pub fn job(spec: &Path, out: &Path) -> Result<(), CliError> {
    let text = std::fs::read_to_string(spec).map_err(|source| CliError::Io {
        path: spec.into(),
        source,
    })?;
    let job: JobSpec = serde_json::from_str(&text).map_err(|e| CliError::Argument {
        argument: "spec".into(),
        message: format!("{}: not a job spec of scopegym: {e}", spec.display()),
    })?;
    if job.build != build() {
        return Err(CliError::Argument {
            argument: "spec".into(),
            message: format!(
                "{}: planned by scopegym {} ({}), but this is {} ({}): every Ray node needs the \
                 same scopegym binary",
                spec.display(),
                job.build.version,
                job.build.commit,
                scopegym::VERSION,
                scopegym::GIT_COMMIT
            ),
        });
    }
    let outcome = jobs::run_job(&job, &mut |_| {})?;
    jobs::write_record(out, &JobRecord { job, outcome })?;
    Ok(())
}

fn build() -> BuildInfo {
    BuildInfo {
        version: scopegym::VERSION.into(),
        commit: scopegym::GIT_COMMIT.into(),
    }
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(total.max(1));
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} {{bar:40}} {{pos}}/{{len}} env steps ({{msg}}, {{eta}})"
        ))
        .expect("valid template"),
    );
    b
}

/// The TOML file `path` (given as `argument`) as a table value.
pub(crate) fn read_toml(path: &Path, argument: &str) -> Result<toml::Value, CliError> {
    read_toml_table(path, argument).map(toml::Value::Table)
}

/// The TOML file `path` (given as `argument`): a document is always a table.
pub(crate) fn read_toml_table(path: &Path, argument: &str) -> Result<toml::Table, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Io {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| CliError::Argument {
        argument: argument.into(),
        message: format!("{}: {e}", path.display()),
    })
}

pub(crate) fn make_dir(dir: &Path) -> Result<(), CliError> {
    std::fs::create_dir_all(dir).map_err(|source| CliError::Io {
        path: dir.into(),
        source,
    })
}

fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| CliError::Io {
        path: path.into(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path, text + "\n").map_err(|source| CliError::Io {
        path: path.into(),
        source,
    })
}

/// What `scopegym run <env-id>` runs.
#[derive(Debug)]
pub struct RunOptions<'a> {
    /// Task id.
    pub env_id: &'a str,
    /// Agent name.
    pub agent: &'a str,
    /// Seeds 0..N.
    pub seeds: u64,
    /// Training env steps per seed (learning agents).
    pub steps: Option<u64>,
    /// Evaluation episodes per seed.
    pub episodes: Option<usize>,
    /// Agent config file (TOML).
    pub config: Option<&'a Path>,
    /// Task config overrides file (TOML).
    pub env_config: Option<&'a Path>,
    /// Difficulty.
    pub difficulty: &'a str,
    /// Split.
    pub split: &'a str,
    /// Output folder.
    pub out: &'a Path,
    /// Run the seeds on Ray.
    pub ray: Option<RayOptions>,
}

/// Runs `spec`'s seeds as Ray jobs saved in `<out>/jobs/` (reusing finished ones) and merges
/// them.
fn run_with_ray(ray: &RayOptions, spec: &mut RunSpec, out: &Path) -> Result<RunResults, CliError> {
    let out = out.canonicalize().map_err(|source| CliError::Io {
        path: out.into(),
        source,
    })?;
    if let Some(d) = &mut spec.save_dir {
        *d = out.join("checkpoints");
    }
    let dir = out.join("jobs");
    make_dir(&dir)?;
    let job = Job {
        spec: spec.clone(),
        skip: None,
        units: 0,
    };
    let pending = suite_mod::pending(std::slice::from_ref(&job), &dir)?;
    run_on_ray(ray, &dir, &pending)?;
    let (mut results, skipped) = suite_mod::gather(&[job], &dir)?;
    match (results.pop(), skipped.first()) {
        (Some(r), None) => Ok(r),
        (_, Some(s)) => Err(CliError::Argument {
            argument: "--agent".into(),
            message: s.reason.clone(),
        }),
        (None, None) => Err(ray_error("no results came back".into())),
    }
}

/// `scopegym run <env-id> --agent <name> ...`.
pub fn run(o: &RunOptions<'_>) -> Result<(), CliError> {
    if !(1..=10_000).contains(&o.seeds) {
        return Err(CliError::Argument {
            argument: "--seeds".into(),
            message: format!("must be 1..=10000, got {}", o.seeds),
        });
    }
    let spec_entry = scopegym_agents::registry::spec(o.agent)?;
    let mut spec = RunSpec::new(o.env_id, o.agent);
    spec.seeds = (0..o.seeds).collect();
    if let Some(e) = o.episodes {
        spec.episodes = e;
    }
    if let Some(s) = o.steps {
        if !spec_entry.learns {
            eprintln!(
                "note: --steps is the training budget of learning agents; {} does not learn",
                o.agent
            );
        }
        spec.train_steps = s;
    }
    spec.agent_config = o.config.map(|p| read_toml(p, "--config")).transpose()?;
    spec.env_config = o
        .env_config
        .map(|p| read_toml(p, "--env-config"))
        .transpose()?;
    spec.difficulty = o.difficulty.into();
    spec.split = o.split.into();
    spec.build = build();
    if spec_entry.learns {
        spec.save_dir = Some(o.out.join("checkpoints"));
    }
    make_dir(o.out)?;
    let r = match &o.ray {
        Some(ray) => run_with_ray(ray, &mut spec, o.out)?,
        None => {
            let b = bar(0, &format!("{} on {}", o.agent, o.env_id));
            let r = run_agent(&spec, &mut |p: RunProgress| {
                b.set_length(p.total.max(1));
                b.set_position(p.done);
                b.set_message(format!("seed {}", p.seed));
            })?;
            b.finish_and_clear();
            r
        }
    };
    let results = o.out.join("results.json");
    write_json(&results, &r)?;
    let curves = o.out.join("curves.png");
    plots::write_panels(
        &curves,
        &plots::run_panels(&r),
        &format!(
            "{} on {} ({} seeds, {} split, {})",
            r.agent,
            r.env_id,
            r.seeds.len(),
            r.provenance.split,
            r.provenance.difficulty
        ),
    )?;
    print_run(&r);
    eprintln!("wrote {} and {}", results.display(), curves.display());
    Ok(())
}

fn print_run(r: &RunResults) {
    println!("{} on {}", r.agent, r.env_id);
    println!(
        "{:>6} {:>12} {:>8} {:>10} {:>9}",
        "seed", "return", "success", "steps", "episodes"
    );
    for s in &r.per_seed {
        println!(
            "{:>6} {:>12.4} {:>8.2} {:>10} {:>9}",
            s.seed,
            s.return_mean,
            s.success_rate,
            s.steps,
            s.episodes.len()
        );
    }
    println!(
        "mean return {:.4} ± {:.4} (95 % interval over {} seeds), success rate {:.2}",
        r.summary.return_mean,
        r.summary.return_ci95,
        r.seeds.len(),
        r.summary.success_rate
    );
}

/// `scopegym run --compare <dir>...`: a table and `compare.png` in `out`.
pub fn compare(dirs: &[PathBuf], out: &Path) -> Result<(), CliError> {
    let mut runs = Vec::new();
    for d in dirs {
        let path = d.join("results.json");
        let text = std::fs::read_to_string(&path).map_err(|source| CliError::Io {
            path: path.clone(),
            source,
        })?;
        let r: RunResults = serde_json::from_str(&text).map_err(|e| CliError::Argument {
            argument: "--compare".into(),
            message: format!(
                "{}: not a results.json of scopegym run: {e}",
                path.display()
            ),
        })?;
        runs.push(r);
    }
    println!(
        "{:<40} {:<12} {:>6} {:>22} {:>8}",
        "task", "agent", "seeds", "return (95 % interval)", "success"
    );
    for r in &runs {
        println!(
            "{:<40} {:<12} {:>6} {:>22} {:>8.2}",
            r.env_id,
            r.agent,
            r.seeds.len(),
            format!(
                "{:.4} ± {:.4}",
                r.summary.return_mean, r.summary.return_ci95
            ),
            r.summary.success_rate
        );
    }
    make_dir(out)?;
    let png = out.join("compare.png");
    plots::write_compare(&png, &runs)?;
    eprintln!("wrote {}", png.display());
    Ok(())
}

/// What `scopegym suite` runs.
#[derive(Debug)]
pub struct SuiteOptions<'a> {
    /// `small` or `full` (or another budget of the file).
    pub budget: &'a str,
    /// Output folder.
    pub out: &'a Path,
    /// Only these agents (references always run).
    pub agents: &'a [String],
    /// Only these tasks.
    pub tasks: &'a [String],
    /// A suite file instead of the embedded `suite/suite-v2.toml`.
    pub suite: Option<&'a Path>,
    /// Only the first N seeds of each task's budget.
    pub seeds: Option<usize>,
    /// Run the jobs on Ray.
    pub ray: Option<RayOptions>,
    /// Discard the saved jobs first.
    pub restart: bool,
    /// Results made outside the suite to score beside it (results.json, or a folder with one).
    pub add_results: &'a [PathBuf],
}

/// Reads the `--add-results` files (a folder stands for its `results.json`).
fn read_external(paths: &[PathBuf]) -> Result<Vec<ExternalResults>, CliError> {
    paths
        .iter()
        .map(|p| {
            let path = if p.is_dir() {
                p.join("results.json")
            } else {
                p.clone()
            };
            let text = std::fs::read_to_string(&path).map_err(|source| CliError::Io {
                path: path.clone(),
                source,
            })?;
            let results: RunResults =
                serde_json::from_str(&text).map_err(|e| CliError::Argument {
                    argument: "--add-results".into(),
                    message: format!(
                        "{}: not a results.json of scopegym run or mcp: {e}",
                        path.display()
                    ),
                })?;
            Ok(ExternalResults {
                file: path.display().to_string(),
                results,
            })
        })
        .collect()
}

/// `scopegym suite --budget <b> --out <dir>`.
pub fn suite(o: &SuiteOptions<'_>) -> Result<(), CliError> {
    let text = match o.suite {
        None => SUITE_V2.to_string(),
        Some(p) => std::fs::read_to_string(p).map_err(|source| CliError::Io {
            path: p.into(),
            source,
        })?,
    };
    let sel = Selection {
        budget: o.budget.into(),
        agents: o.agents.to_vec(),
        tasks: o.tasks.to_vec(),
        seeds: o.seeds,
    };
    let file = SuiteFile::parse(&text)?;
    let build = build();
    let jobs = suite_mod::plan(&file, &sel, &build)?;
    let external = read_external(o.add_results)?;
    let ids: Vec<&str> = jobs.iter().map(|j| j.spec.env_id.as_str()).collect();
    suite_mod::check_external(&file, &ids, &external)?;
    make_dir(o.out)?;
    let dir = o.out.join("jobs");
    if o.restart && dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| CliError::Io {
            path: dir.clone(),
            source,
        })?;
    }
    make_dir(&dir)?;
    let t0 = std::time::Instant::now();
    let pending = suite_mod::pending(&jobs, &dir)?;
    let all: usize = jobs
        .iter()
        .filter(|j| j.skip.is_none())
        .map(|j| j.spec.seeds.len())
        .sum();
    if pending.len() < all {
        eprintln!(
            "reusing {} of {all} (task, agent, seed) jobs finished in {}",
            all - pending.len(),
            dir.display()
        );
    }
    let note = |s: &Skipped| format!("note: skipping {} on {}: {}", s.agent, s.task, s.reason);
    let (results, skipped) = match &o.ray {
        None => {
            let b = bar(0, "suite");
            let r = suite_mod::run_jobs_in(
                &jobs,
                Some(&dir),
                &mut |p: SuiteProgress<'_>| {
                    b.set_length(p.total.max(1));
                    b.set_position(p.done);
                    b.set_message(format!(
                        "{} on {}",
                        p.agent,
                        p.task.trim_start_matches("scopegym/")
                    ));
                },
                &mut |s: &Skipped| b.suspend(|| eprintln!("{}", note(s))),
            )?;
            b.finish_and_clear();
            r
        }
        Some(ray) => {
            run_on_ray(ray, &dir, &pending)?;
            let r = suite_mod::gather(&jobs, &dir)?;
            for s in &r.1 {
                eprintln!("{}", note(s));
            }
            r
        }
    };
    let res = suite_mod::score_with(&file, &sel, &text, &build, results, skipped, external)?;
    let json = o.out.join("suite.json");
    write_json(&json, &res)?;
    let png = o.out.join("suite.png");
    plots::write_suite(&png, &res)?;
    print_suite(&res);
    eprintln!(
        "wrote {} and {} in {:.1} s",
        json.display(),
        png.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn print_suite(s: &SuiteResults) {
    let agents: Vec<&str> = s.aggregate.iter().map(|a| a.agent.as_str()).collect();
    println!(
        "{} v{}, budget {}, {} split, {}: normalized scores (random 0, heuristic 1; mean over seeds)",
        s.suite.name, s.suite.version, s.suite.budget, s.suite.split, s.suite.difficulty
    );
    print!("{:<34}", "task");
    for a in &agents {
        print!(" {a:>10}");
    }
    println!();
    for t in &s.tasks {
        print!("{:<34}", t.id.trim_start_matches("scopegym/"));
        for a in &agents {
            match t.agents.iter().find(|x| x.agent == *a) {
                Some(x) => print!(
                    " {:>10}",
                    format!("{:.3}", x.normalized_mean).replace("-0.000", "0.000")
                ),
                None => print!(" {:>10}", "-"),
            }
        }
        println!();
    }
    println!(
        "{:<12} {:>6} {:>6} {:>8} {:>22} {:>8}",
        "agent", "tasks", "runs", "IQM", "95 % CI (bootstrap)", "mean"
    );
    let row = |a: &Aggregate, of: usize| {
        println!(
            "{:<12} {:>6} {:>6} {:>8.3} {:>22} {:>8.3}",
            a.agent,
            format!("{}/{of}", a.tasks.len()),
            a.runs,
            a.iqm,
            format!("[{:.3}, {:.3}]", a.iqm_ci[0], a.iqm_ci[1]),
            a.mean
        );
    };
    for a in &s.aggregate {
        row(a, s.tasks.len());
    }
    for e in &s.external {
        println!("{} from outside the suite: {}", e.agent, e.files.join(", "));
        for n in &e.notes {
            println!("  {n}");
        }
        if !e.same_tasks.is_empty() {
            println!(
                "{} covers {} of {} tasks; its aggregate pools those only. Every agent on the \
                 same {} tasks:",
                e.agent,
                e.tasks.len(),
                s.tasks.len(),
                e.tasks.len()
            );
            for a in &e.same_tasks {
                row(a, e.tasks.len());
            }
        }
    }
    for k in &s.skipped {
        println!("skipped: {} on {}: {}", k.agent, k.task, k.reason);
    }
}
