//! The `scopegym` command-line program.

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, Array3, Axis};
use scopegym::error::CliError;
use scopegym::output::{
    AttrValue, Data, Dataset, check_writable, montage_u8, write_hdf5, write_png,
};
use scopegym::scenario::{InstrumentConfig, Scenario, physics_to_scenario};
use scopegym_physics::instrument::StemInstrument;
use scopegym_physics::stem::{StemConfig, StemSimulator};

mod bench_cli;
mod deploy_cli;
mod env_cli;
mod mcp_cli;
mod plots;
mod serve;
mod spm_cli;
use spm_cli::{perf_spm, simulate_spm};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// scopegym: microscopy simulation engine and reinforcement-learning gym.
#[derive(Debug, Parser)]
#[command(name = "scopegym", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Simulate frames from a scenario and save them as PNG (and HDF5 with ground truth).
    Simulate {
        /// Scenario TOML file.
        scenario: PathBuf,
        /// Output PNG of the main channel (frames side by side when --frames > 1).
        #[arg(long, required_unless_present = "hdf5")]
        out: Option<PathBuf>,
        /// Also write an HDF5 file with the frames, the noiseless expectation and the atoms.
        #[arg(long)]
        hdf5: Option<PathBuf>,
        /// Seed of the session (same seed, same output).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Number of consecutive frames (drift, damage and tip wear carry over).
        #[arg(long, default_value_t = 1)]
        frames: usize,
        /// PFM: after the frames, run switching spectroscopy at X,Y (metres from the first
        /// frame's top-left corner, x along the fast axis) and write /spectroscopy/* to --hdf5.
        #[arg(long, value_name = "X,Y", requires = "hdf5")]
        spectroscopy: Option<String>,
    },
    /// List the registered environments (id, instrument, spaces, max steps, description).
    List {
        /// Print one JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The floors of the benchmark: random and heuristic mean returns and success rates of
    /// every task (or those named) over seeds, at a difficulty and split.
    Floors {
        /// Task ids (default: every registered task).
        env_ids: Vec<String>,
        /// Episodes (seeds 0..N) per policy and task.
        #[arg(long, default_value_t = 20)]
        seeds: u64,
        /// Difficulty level: easy, medium or hard.
        #[arg(long, default_value = "medium")]
        difficulty: String,
        /// Parameter split: train or test.
        #[arg(long, default_value = "test")]
        split: String,
        /// Print one JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Steps per second of a vector env with random actions.
    Bench {
        /// Environment id, e.g. scopegym/AfmFeedbackTuning-v2.
        env_id: String,
        /// Number of environments.
        #[arg(long, default_value_t = 16)]
        num_envs: usize,
        /// Worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Vector steps to time.
        #[arg(long, default_value_t = 100)]
        steps: usize,
        /// Time only this fidelity (fast or full); by default both, where the task has the
        /// fidelity knob.
        #[arg(long)]
        fidelity: Option<String>,
        /// The task's configuration (TOML), e.g. an observation mode or a difficulty; a
        /// `fidelity` in it is overridden by `--fidelity` and, without that, timed alone.
        #[arg(long)]
        env_config: Option<PathBuf>,
        /// Print one JSON object per timed fidelity (a line each) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Record episodes of an agent into a Minari-compatible dataset folder.
    Record {
        /// Environment id (not needed with --repair).
        #[arg(required_unless_present = "repair")]
        env_id: Option<String>,
        /// The agent: random or heuristic.
        #[arg(long, default_value = "random")]
        agent: String,
        /// Number of episodes.
        #[arg(long, default_value_t = 10)]
        episodes: usize,
        /// Seed of the first episode (episode i resets with seed + i).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output folder (gets data/main_data.hdf5, data/episodes/ and data/metadata.json).
        #[arg(long)]
        out: PathBuf,
        /// Difficulty level: easy, medium or hard.
        #[arg(long, default_value = "medium")]
        difficulty: String,
        /// Parameter split: train or test.
        #[arg(long, default_value = "train")]
        split: String,
        /// Episodes (seeds 0..N) of the random and heuristic policies whose mean returns become
        /// Minari's reference scores (ref_min_score, ref_max_score); 0 skips them.
        #[arg(long, default_value_t = 20)]
        reference_episodes: u64,
        /// The dataset's author (Minari metadata).
        #[arg(long, default_value = "scopegym")]
        author: String,
        /// The dataset's description (default: the task, agent, seeds and config).
        #[arg(long)]
        description: Option<String>,
        /// Instead of recording: rebuild --out's main file and metadata counts from its
        /// episode files (after a crash).
        #[arg(long)]
        repair: bool,
    },
    /// Run an agent on a task over seeds (train learning agents, then evaluate): a table,
    /// <out>/results.json and <out>/curves.png. With --compare, overlay earlier runs instead.
    Run {
        /// Environment id, e.g. scopegym/StemAutofocus-v2.
        #[arg(required_unless_present = "compare")]
        env_id: Option<String>,
        /// The agent (see the agents registry: random, raster, heuristic, ...).
        #[arg(long, required_unless_present = "compare")]
        agent: Option<String>,
        /// Run seeds 0..N.
        #[arg(long, default_value_t = 5)]
        seeds: u64,
        /// Training env steps per seed (learning agents; default 10000).
        #[arg(long)]
        steps: Option<u64>,
        /// Evaluation episodes per seed (default 5); episode i of seed s resets with
        /// s * 1000000 + i.
        #[arg(long)]
        episodes: Option<usize>,
        /// Agent config (TOML table).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Task config overrides (TOML table, e.g. max_steps = 20).
        #[arg(long)]
        env_config: Option<PathBuf>,
        /// Difficulty level: easy, medium or hard.
        #[arg(long, default_value = "medium")]
        difficulty: String,
        /// Parameter split evaluated on: train or test (training always uses train).
        #[arg(long, default_value = "test")]
        split: String,
        /// Output folder (results.json, curves.png; compare.png with --compare).
        #[arg(long, required_unless_present = "compare")]
        out: Option<PathBuf>,
        /// Overlay the results of these run folders (a table and <out>/compare.png, <out>
        /// defaulting to the current folder).
        #[arg(long, num_args = 1.., conflicts_with_all = ["env_id", "agent"])]
        compare: Vec<PathBuf>,
        /// Run the seeds as Ray tasks: local (start a Ray on this machine), auto or HOST:PORT
        /// (join a running cluster). Needs Python with Ray ($SCOPEGYM_PYTHON, else the active
        /// virtual environment's python, else python3): pip install 'scopegym[ray]'.
        #[arg(long, value_name = "local|auto|ADDRESS", conflicts_with = "compare")]
        ray: Option<String>,
        /// CPUs of the Ray that --ray local starts (default: all).
        #[arg(long, requires = "ray")]
        ray_cpus: Option<usize>,
    },
    /// Run the benchmark suite (suite/suite-v2.toml): every task's agents on the test split,
    /// normalized scores, IQM with bootstrap 95 % intervals and performance profiles:
    /// <out>/suite.json, <out>/suite.png and a table.
    Suite {
        /// The budget: small (a few minutes) or full.
        #[arg(long, default_value = "small")]
        budget: String,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Only these agents, comma-separated (random and heuristic always run: they are the
        /// references).
        #[arg(long, value_delimiter = ',')]
        agents: Vec<String>,
        /// Only these tasks, comma-separated (ids or a unique part such as StemAutofocus).
        #[arg(long, value_delimiter = ',')]
        tasks: Vec<String>,
        /// A suite file instead of the embedded suite-v2.toml.
        #[arg(long)]
        suite: Option<PathBuf>,
        /// Only the first N run seeds of each task's budget.
        #[arg(long)]
        seeds: Option<usize>,
        /// Run the (task, agent, seed) jobs as Ray tasks: local (start a Ray on this machine),
        /// auto or HOST:PORT (join a running cluster); the results are the same as without.
        /// Needs Python with Ray ($SCOPEGYM_PYTHON, else the active virtual environment's
        /// python, else python3): pip install 'scopegym[ray]'. With or without Ray, each
        /// finished job is saved in <out>/jobs/ and a rerun into the same <out> reuses it.
        #[arg(long, value_name = "local|auto|ADDRESS")]
        ray: Option<String>,
        /// CPUs of the Ray that --ray local starts (default: all).
        #[arg(long, requires = "ray")]
        ray_cpus: Option<usize>,
        /// Discard the jobs saved in <out>/jobs/ and run every job again (needed when they
        /// were made by another build or with other settings).
        #[arg(long)]
        restart: bool,
        /// Score results made outside the suite beside its agents: results.json files (or
        /// folders holding one) of `scopegym mcp --record` or `scopegym run`, comma-separated
        /// or repeated. Each must be for a task of this run, with its config and the same run
        /// and episode seeds; an agent's files for one task merge (one per run seed).
        #[arg(long, value_delimiter = ',', value_name = "PATH")]
        add_results: Vec<PathBuf>,
    },
    /// Run one saved job (one task, agent and seed) and write its record (used by --ray).
    #[command(hide = true)]
    Job {
        /// The job's spec (JSON).
        spec: PathBuf,
        /// Where to write its record (JSON, written atomically).
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a policy on an instrument through the safety guard (limits, dry run, watchdog) with
    /// a live progress line and an audit log of every command.
    Deploy {
        /// Environment id, e.g. scopegym/PfmDomainWriting-v1.
        env_id: String,
        /// The instrument: sim, nanonis://HOST:PORT, stem-gateway://HOST:PORT or replay:FILE.
        #[arg(long)]
        driver: String,
        /// The agent (random, raster, heuristic, bo, sgp, dkl, ppo, reinforce).
        #[arg(long, required_unless_present = "policy", conflicts_with = "policy")]
        agent: Option<String>,
        /// The checkpoint of a learning agent (written by `scopegym run` under
        /// <out>/checkpoints/seed<s>/).
        #[arg(long, requires = "agent")]
        checkpoint: Option<PathBuf>,
        /// A TorchScript policy file (exported by PPO or REINFORCE, or scripted in PyTorch).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Agent config (TOML table).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Task config overrides (TOML table).
        #[arg(long)]
        env_config: Option<PathBuf>,
        /// Difficulty level: easy, medium or hard.
        #[arg(long, default_value = "medium")]
        difficulty: String,
        /// Parameter split (matters on the simulator only).
        #[arg(long, default_value = "test")]
        split: String,
        /// Safety limits (TOML with units; required for real instruments; see
        /// drivers/limits.example.toml).
        #[arg(long)]
        limits: Option<PathBuf>,
        /// Check and log every command; send none that changes the instrument's state.
        #[arg(long)]
        dry_run: bool,
        /// Episodes to run.
        #[arg(long, default_value_t = 1)]
        episodes: usize,
        /// Seed of the first episode's seed stream.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The audit log (JSON lines, appended).
        #[arg(long)]
        log: PathBuf,
        /// Make the instrument safe when the policy side is quiet this long between steps, s
        /// (0: no watchdog).
        #[arg(long, default_value_t = 30.0)]
        watchdog: f64,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Serve a fake Nanonis controller backed by the simulator of an SPM task, to try `deploy`
    /// and Python's `driver=` without hardware: prints its nanonis://127.0.0.1:PORT URL on the
    /// first line and serves until stopped.
    FakeNanonis {
        /// The SPM task whose instrument to simulate.
        env_id: String,
        /// Task config overrides (TOML table).
        #[arg(long)]
        env_config: Option<PathBuf>,
        /// Seed of the simulated sample.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Serve a task and its instrument as Model Context Protocol tools for a language-model
    /// agent (stdio by default), through the same guard, limits and audit log as `deploy`.
    Mcp {
        /// The task (e.g. scopegym/StemAutofocus-v2).
        #[arg(long)]
        task: String,
        /// Where the instrument is: sim, nanonis://HOST:PORT, stem-gateway://HOST:PORT or
        /// replay:FILE.
        #[arg(long, default_value = "sim")]
        driver: String,
        /// Where the instrument tools connect, if not to --driver (e.g. a second port of a
        /// Nanonis controller, which serves one client per port). On sim they get a simulator
        /// of their own either way.
        #[arg(long, value_name = "URL")]
        instrument_driver: Option<String>,
        /// Run seed: episode i resets with seed * 1000000 + i, as in the benchmark suite.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Record every tool call (DIR/calls.jsonl) and the scored episodes (DIR/results.json,
        /// as `scopegym run` writes them); the audit log goes to DIR/audit.jsonl unless --log.
        #[arg(long, value_name = "DIR")]
        record: Option<PathBuf>,
        /// Serve streamable HTTP at ADDR:PORT (path /mcp) instead of stdio.
        #[arg(long, value_name = "ADDR:PORT")]
        http: Option<String>,
        /// Safety limits (TOML with units; required for real instruments).
        #[arg(long)]
        limits: Option<PathBuf>,
        /// The audit log (JSON lines, appended).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Task config overrides (TOML table) over the suite's config for the task.
        #[arg(long)]
        env_config: Option<PathBuf>,
        /// The suite budget whose task config to use (small or full).
        #[arg(long, default_value = "full")]
        budget: String,
        /// A suite.json (from `scopegym suite`) whose random and heuristic scores for the task
        /// normalize the episode scores.
        #[arg(long)]
        reference: Option<PathBuf>,
        /// The agent's name in results.json.
        #[arg(long, default_value = "llm")]
        agent: String,
    },
    /// Run an agent on a task (through the guard, as `deploy`) and serve a live operator
    /// dashboard on 127.0.0.1: the frame with the proposed point, the agent's maps (BO, DKL),
    /// embedding scatter (DKL), action distribution and value estimate (RL), curves, budget
    /// and audit log; pause, resume, veto, off-limits regions and agent controls, each
    /// recorded in OUT/interventions.jsonl and OUT/results.json.
    Serve {
        /// Environment id, e.g. scopegym/StemEelsExplore-v2.
        env_id: String,
        /// The agent (random, raster, heuristic, bo, sgp, dkl, ppo, reinforce).
        #[arg(long)]
        agent: String,
        /// The instrument: sim, nanonis://HOST:PORT, stem-gateway://HOST:PORT or replay:FILE.
        #[arg(long, default_value = "sim")]
        driver: String,
        /// The checkpoint of a learning agent.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Agent config (TOML table).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Task config overrides (TOML table).
        #[arg(long)]
        env_config: Option<PathBuf>,
        /// Difficulty level: easy, medium or hard.
        #[arg(long, default_value = "medium")]
        difficulty: String,
        /// Parameter split (matters on the simulator only).
        #[arg(long, default_value = "test")]
        split: String,
        /// Safety limits (TOML with units; required for real instruments).
        #[arg(long)]
        limits: Option<PathBuf>,
        /// Run seed: episode i resets with seed * 1000000 + i.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Episodes to run.
        #[arg(long, default_value_t = 1)]
        episodes: usize,
        /// Port on 127.0.0.1 (0: any free port; the URL is printed on stdout's first line).
        #[arg(long, default_value_t = 8765)]
        port: u16,
        /// Where the record goes (results.json, interventions.jsonl, audit.jsonl).
        #[arg(long, default_value = "serve-out")]
        out: PathBuf,
        /// The audit log (JSON lines, appended; default OUT/audit.jsonl).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Apply the vetoes, regions and controls of an interventions.jsonl at the same step
        /// indices (pauses are not replayed).
        #[arg(long)]
        replay: Option<PathBuf>,
        /// Start paused (the first action is proposed, not taken).
        #[arg(long)]
        start_paused: bool,
        /// Exit when the run ends (default: keep serving until Ctrl-C).
        #[arg(long)]
        exit: bool,
        /// The least wall time between steps, s (to follow a fast simulator; 0: as fast as
        /// it runs).
        #[arg(long, default_value_t = 0.0)]
        pace: f64,
    },
    /// Reset an environment and save its render as a PNG.
    Render {
        /// Environment id.
        env_id: String,
        /// Reset seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
    },
    /// Time frames (unchanged probe and specimen; changed specimen) and probe recomputation (median ms).
    Perf {
        /// Scenario TOML file.
        scenario: PathBuf,
        /// Frames to time.
        #[arg(long, default_value_t = 50)]
        frames: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// A closed stdout (`scopegym list | head`) ends the program quietly with the shell's SIGPIPE
/// status (141) instead of a panic message.
fn exit_quietly_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Simulate {
            scenario,
            out,
            hdf5,
            seed,
            frames,
            spectroscopy,
        } => simulate(scenario, out, hdf5, seed, frames, spectroscopy),
        Command::Perf {
            scenario,
            frames,
            json,
        } => perf(scenario, frames, json),
        Command::List { json } => env_cli::list(json),
        Command::Floors {
            env_ids,
            seeds,
            difficulty,
            split,
            json,
        } => env_cli::floors(&env_ids, seeds, &difficulty, &split, json),
        Command::Bench {
            env_id,
            num_envs,
            threads,
            steps,
            fidelity,
            env_config,
            json,
        } => env_cli::bench(
            &env_id,
            &env_cli::BenchOptions {
                num_envs,
                threads,
                steps,
                fidelity: fidelity.as_deref(),
                env_config: env_config.as_deref(),
                json,
            },
        ),
        Command::Run { compare, out, .. } if !compare.is_empty() => bench_cli::compare(
            &compare,
            out.as_deref().unwrap_or(std::path::Path::new(".")),
        ),
        Command::Run {
            env_id,
            agent,
            seeds,
            steps,
            episodes,
            config,
            env_config,
            difficulty,
            split,
            out,
            compare: _,
            ray,
            ray_cpus,
        } => bench_cli::run(&bench_cli::RunOptions {
            env_id: env_id.as_deref().unwrap_or_default(),
            agent: agent.as_deref().unwrap_or_default(),
            seeds,
            steps,
            episodes,
            config: config.as_deref(),
            env_config: env_config.as_deref(),
            difficulty: &difficulty,
            split: &split,
            out: out.as_deref().unwrap_or(std::path::Path::new(".")),
            ray: ray.map(|address| bench_cli::RayOptions {
                address,
                cpus: ray_cpus,
            }),
        }),
        Command::Suite {
            budget,
            out,
            agents,
            tasks,
            suite,
            seeds,
            ray,
            ray_cpus,
            restart,
            add_results,
        } => bench_cli::suite(&bench_cli::SuiteOptions {
            budget: &budget,
            out: &out,
            agents: &agents,
            tasks: &tasks,
            suite: suite.as_deref(),
            seeds,
            ray: ray.map(|address| bench_cli::RayOptions {
                address,
                cpus: ray_cpus,
            }),
            restart,
            add_results: &add_results,
        }),
        Command::Job { spec, out } => bench_cli::job(&spec, &out),
        Command::Mcp {
            task,
            driver,
            seed,
            record,
            http,
            limits,
            log,
            env_config,
            budget,
            reference,
            agent,
            instrument_driver,
        } => mcp_cli::mcp(&mcp_cli::McpArgs {
            task: &task,
            driver: &driver,
            instrument_driver: instrument_driver.as_deref(),
            seed,
            record: record.as_deref(),
            http: http.as_deref(),
            limits: limits.as_deref(),
            log: log.as_deref(),
            env_config: env_config.as_deref(),
            budget: &budget,
            reference: reference.as_deref(),
            agent: &agent,
        }),
        Command::Serve {
            env_id,
            agent,
            driver,
            checkpoint,
            config,
            env_config,
            difficulty,
            split,
            limits,
            seed,
            episodes,
            port,
            out,
            log,
            replay,
            start_paused,
            exit,
            pace,
        } => serve::serve(&serve::ServeArgs {
            env_id: &env_id,
            agent: &agent,
            driver: &driver,
            checkpoint: checkpoint.as_deref(),
            config: config.as_deref(),
            env_config: env_config.as_deref(),
            difficulty: &difficulty,
            split: &split,
            limits: limits.as_deref(),
            seed,
            episodes,
            port,
            out: &out,
            log: log.as_deref(),
            replay: replay.as_deref(),
            start_paused,
            exit,
            pace,
        }),
        Command::Render { env_id, seed, out } => env_cli::render(&env_id, seed, &out),
        Command::FakeNanonis {
            env_id,
            env_config,
            seed,
        } => deploy_cli::fake_nanonis(&env_id, env_config.as_deref(), seed),
        Command::Deploy {
            env_id,
            driver,
            agent,
            checkpoint,
            policy,
            config,
            env_config,
            difficulty,
            split,
            limits,
            dry_run,
            episodes,
            seed,
            log,
            watchdog,
            json,
        } => deploy_cli::deploy(&deploy_cli::DeployArgs {
            env_id: &env_id,
            driver: &driver,
            agent: agent.as_deref(),
            checkpoint: checkpoint.as_deref(),
            policy: policy.as_deref(),
            config: config.as_deref(),
            env_config: env_config.as_deref(),
            difficulty: &difficulty,
            split: &split,
            limits: limits.as_deref(),
            dry_run,
            episodes,
            seed,
            log: &log,
            watchdog,
            json,
        }),
        Command::Record {
            repair: true, out, ..
        } => env_cli::repair(&out),
        Command::Record {
            env_id,
            agent,
            episodes,
            seed,
            out,
            difficulty,
            split,
            reference_episodes,
            author,
            description,
            repair: false,
        } => env_cli::record(&env_cli::RecordOptions {
            id: env_id.as_deref().unwrap_or_default(),
            agent: &agent,
            episodes,
            seed,
            out: &out,
            difficulty: &difficulty,
            split: &split,
            reference_episodes,
            author: &author,
            description: description.as_deref(),
        }),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn stem_sim(sc: &Scenario, cfg: &StemConfig, seed: u64) -> Result<StemSimulator, CliError> {
    StemSimulator::new(cfg.clone(), seed).map_err(|e| physics_to_scenario(&sc.path, e))
}

fn progress(frames: usize) -> ProgressBar {
    let bar = if frames > 1 {
        ProgressBar::new(frames as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} simulating {bar:40} {pos}/{len} frames ({eta})")
            .expect("valid template"),
    );
    bar
}

fn attrs(u: &str, q: &str) -> Vec<(String, String)> {
    vec![
        ("units".to_string(), u.to_string()),
        ("quantity".to_string(), q.to_string()),
    ]
}

/// Root attributes every output file carries: seed, frames, the scenario as written and as
/// resolved, the version and git commit.
fn provenance(
    sc: &Scenario,
    seed: u64,
    frames: usize,
    template: String,
    resolved: String,
) -> Vec<(String, AttrValue)> {
    vec![
        ("seed".into(), AttrValue::U64(seed)),
        ("frames".into(), AttrValue::U64(frames as u64)),
        ("scenario_name".into(), AttrValue::Str(sc.name.clone())),
        ("scenario_version".into(), AttrValue::I64(sc.version)),
        ("scenario_file".into(), AttrValue::Str(template)),
        ("resolved_config".into(), AttrValue::Str(resolved)),
        (
            "scopegym_version".into(),
            AttrValue::Str(scopegym::VERSION.into()),
        ),
        (
            "git_commit".into(),
            AttrValue::Str(scopegym::GIT_COMMIT.into()),
        ),
    ]
}

fn parse_point(text: &str) -> Result<[f64; 2], CliError> {
    let bad = || CliError::Argument {
        argument: "--spectroscopy".into(),
        message: format!("expected X,Y in metres (e.g. 2.5e-7,4e-7), got {text:?}"),
    };
    let mut it = text.split(',').map(|v| v.trim().parse::<f64>());
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(x)), Some(Ok(y)), None) if x.is_finite() && y.is_finite() => Ok([x, y]),
        _ => Err(bad()),
    }
}

fn simulate(
    scenario: PathBuf,
    out: Option<PathBuf>,
    hdf5: Option<PathBuf>,
    seed: u64,
    frames: usize,
    spectroscopy: Option<String>,
) -> Result<(), CliError> {
    if !(1..=10_000).contains(&frames) {
        return Err(CliError::Argument {
            argument: "--frames".into(),
            message: format!("must be 1..=10000, got {frames}"),
        });
    }
    if let Some(o) = &out {
        check_writable(o, "--out")?;
    }
    if let Some(h) = &hdf5 {
        check_writable(h, "--hdf5")?;
    }
    let point = spectroscopy.as_deref().map(parse_point).transpose()?;
    let sc = Scenario::load(&scenario)?;
    match &sc.config {
        InstrumentConfig::Stem(cfg) => {
            if point.is_some() {
                return Err(CliError::Argument {
                    argument: "--spectroscopy".into(),
                    message: "switching spectroscopy needs a PFM scenario".into(),
                });
            }
            simulate_stem(&sc, cfg, &scenario, out, hdf5, seed, frames)
        }
        InstrumentConfig::Spm(cfg) => {
            simulate_spm(&sc, cfg, &scenario, out, hdf5, seed, frames, point)
        }
    }
}

fn simulate_stem(
    sc: &Scenario,
    cfg: &StemConfig,
    scenario: &std::path::Path,
    out: Option<PathBuf>,
    hdf5: Option<PathBuf>,
    seed: u64,
    frames: usize,
) -> Result<(), CliError> {
    let mut sim = stem_sim(sc, cfg, seed)?;
    let s = sim.scan_settings();
    let mut stack = Array3::<f32>::zeros((frames, s.rows, s.cols));
    let mut noiseless = Array3::<f32>::zeros((frames, s.rows, s.cols));
    let mut times = Vec::with_capacity(frames);
    let d0 = sim.drift_offset();
    let specimen0 = sim.specimen().clone();
    let bar = progress(frames);
    for k in 0..frames {
        let f = sim.acquire_frame()?;
        times.push(f.meta.t_start);
        stack.index_axis_mut(Axis(0), k).assign(&f.image);
        noiseless
            .index_axis_mut(Axis(0), k)
            .assign(&sim.last_noiseless());
        bar.inc(1);
    }
    bar.finish_and_clear();
    let views: Vec<_> = stack.outer_iter().collect();
    let png = montage_u8(&views);
    if let Some(h) = &hdf5 {
        let cfg = sim.config();
        let ab = sim.aberrations();
        // Atoms at the first frame, in metres from the frame's top-left corner: pixel (i, j)
        // centre is at ((j + 0.5) dx, (i + 0.5) dx). The specimen is periodic: every image of
        // its atoms over the frame and 2 nm around it.
        let [w, hgt] = s.field_of_view();
        let half = [0.5 * w + 2e-9, 0.5 * hgt + 2e-9];
        let mut xy = Vec::new();
        let mut z: Vec<i32> = Vec::new();
        for a in &specimen0.atoms {
            let rel = [a.x + d0[0] - s.center[0], a.y + d0[1] - s.center[1]];
            for p in specimen0.images(rel, half) {
                xy.push([p[0] + 0.5 * w, p[1] + 0.5 * hgt]);
                z.push(i32::from(a.z));
            }
        }
        let mut pos = Array2::<f64>::zeros((xy.len(), 2));
        for (i, p) in xy.iter().enumerate() {
            pos[[i, 0]] = p[0];
            pos[[i, 1]] = p[1];
        }
        let datasets = vec![
            Dataset {
                name: "frame".into(),
                data: Data::F32x3(stack.clone()),
                attrs: attrs("counts", "HAADF intensity"),
            },
            Dataset {
                name: "noiseless".into(),
                data: Data::F32x3(noiseless),
                attrs: attrs("counts", "expected HAADF intensity before noise"),
            },
            Dataset {
                name: "frame_start_time".into(),
                data: Data::F64x1(times),
                attrs: attrs("s", "time of each frame's first pixel"),
            },
            Dataset {
                name: "atoms/positions".into(),
                data: Data::F64x2(pos),
                attrs: attrs("m", "atom position (x, y) from the frame's top-left corner"),
            },
            Dataset {
                name: "atoms/z".into(),
                data: Data::I32x1(z),
                attrs: attrs("1", "atomic number"),
            },
        ];
        let resolved = toml::to_string(cfg).unwrap_or_default();
        let template = std::fs::read_to_string(scenario).unwrap_or_default();
        let f = AttrValue::F64;
        let mut root = vec![
            ("beam_energy_eV".into(), f(sim.beam_energy())),
            (
                "convergence_angle_rad".into(),
                f(cfg.optics.convergence_angle.get()),
            ),
            ("pixel_size_m".into(), f(s.pixel_size)),
            ("dwell_time_s".into(), f(s.dwell_time)),
            ("flyback_time_s".into(), f(s.flyback_time)),
            ("beam_current_A".into(), f(sim.beam_current())),
            (
                "haadf_exponent".into(),
                f(cfg.detector.haadf_exponent.get()),
            ),
            ("C10_m".into(), f(ab.c10)),
            ("C12_m".into(), f(ab.c12)),
            ("phi12_rad".into(), f(ab.phi12)),
            ("C21_m".into(), f(ab.c21)),
            ("phi21_rad".into(), f(ab.phi21)),
            ("C23_m".into(), f(ab.c23)),
            ("phi23_rad".into(), f(ab.phi23)),
            ("C30_m".into(), f(ab.c30)),
            ("C50_m".into(), f(ab.c50)),
            ("source_size_m".into(), f(cfg.optics.source_size.get())),
        ];
        root.extend(provenance(sc, seed, frames, template, resolved));
        write_hdf5(h, &datasets, &root)?;
    }
    if let Some(o) = &out {
        write_png(o, &png)?;
    }
    eprintln!(
        "wrote {} frame(s) of {}x{} ({:.3} s each, {:.0} e-/Å² per frame) to {}",
        frames,
        s.rows,
        s.cols,
        s.frame_time(),
        sim.config().beam.current.get() * s.dwell_time
            / scopegym_physics::constants::ELEMENTARY_CHARGE
            / (s.pixel_size * s.pixel_size)
            * 1e-20,
        out.iter()
            .chain(hdf5.iter())
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn perf(scenario: PathBuf, frames: usize, json: bool) -> Result<(), CliError> {
    if frames == 0 {
        return Err(CliError::Argument {
            argument: "--frames".into(),
            message: "must be > 0".into(),
        });
    }
    let sc = Scenario::load(&scenario)?;
    let cfg = match &sc.config {
        InstrumentConfig::Stem(cfg) => cfg,
        InstrumentConfig::Spm(cfg) => return perf_spm(&sc, cfg, frames, json),
    };
    let mut sim = stem_sim(&sc, cfg, 0)?;
    sim.acquire_frame()?; // warm-up: plans, probe, buffers
    let mut frame_ms = Vec::with_capacity(frames);
    for _ in 0..frames {
        let t = Instant::now();
        std::hint::black_box(sim.acquire_frame()?.image[[0, 0]]);
        frame_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // Frames whose specimen changed (as after damage): the ideal image is re-rendered (splat, FFT
    // convolution), the probe is not recomputed.
    let mut rerender_ms = Vec::with_capacity(frames);
    for _ in 0..frames {
        let t = Instant::now();
        sim.specimen_mut();
        std::hint::black_box(sim.acquire_frame()?.image[[0, 0]]);
        rerender_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut probe_ms = Vec::with_capacity(frames);
    let base = sim.aberrations();
    for k in 0..frames.min(50) {
        let mut ab = base;
        ab.c10 += if k % 2 == 0 { 1e-10 } else { -1e-10 };
        let t = Instant::now();
        sim.set_aberrations(&ab)?;
        std::hint::black_box(sim.probe_kernel().1[0]);
        probe_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let s = sim.scan_settings();
    let (f, r, p) = (median(frame_ms), median(rerender_ms), median(probe_ms));
    let atoms = sim.specimen().atoms.len();
    if json {
        println!(
            "{{\"scenario\": {:?}, \"pixels\": [{}, {}], \"atoms\": {}, \"frames\": {}, \"frame_ms\": {:.4}, \"frame_rerender_ms\": {:.4}, \"probe_ms\": {:.4}}}",
            sc.name, s.rows, s.cols, atoms, frames, f, r, p
        );
    } else {
        println!("{}: {}x{} pixels, {} atoms", sc.name, s.rows, s.cols, atoms);
        println!("frame (unchanged probe): {f:.3} ms (median of {frames})");
        println!("frame (specimen changed): {r:.3} ms");
        println!("probe recomputation:     {p:.3} ms");
    }
    Ok(())
}
