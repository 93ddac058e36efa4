//! `scopegym list`, `scopegym bench` and `scopegym render`: the environments from the command
//! line.

use indicatif::{ProgressBar, ProgressStyle};
use scopegym::error::CliError;
use scopegym::output::check_writable;
use scopegym_envs::registry::{TASKS, make};
use scopegym_envs::rng::seeded;
use scopegym_envs::tasks::Fidelity;
use scopegym_envs::vector::{AutoReset, VectorEnv};
use std::path::Path;
use std::time::Instant;

/// Prints every registered task: id, instrument, spaces, max steps, description.
pub fn list(json: bool) -> Result<(), CliError> {
    let mut rows = Vec::new();
    for t in TASKS {
        let env = make(t.id, None)?;
        rows.push(serde_json::json!({
            "id": t.id,
            "instrument": t.instrument,
            "observation_space": env.observation_space().to_json(),
            "action_space": env.action_space().to_json(),
            "max_episode_steps": env.max_episode_steps(),
            "description": t.description,
        }));
        if !json {
            println!(
                "{}  [{}]  max {} steps",
                t.id,
                t.instrument,
                env.max_episode_steps()
            );
            println!("    {}", t.description);
            println!("    observation: {}", env.observation_space().describe());
            println!("    action:      {}", env.action_space().describe());
        }
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
    }
    Ok(())
}

/// The random and heuristic floors of `ids` (every task when empty) over seeds `0..seeds` at
/// `difficulty` and `split`: a table (or JSON) of mean returns with 95 % intervals and success
/// rates.
pub fn floors(
    ids: &[String],
    seeds: u64,
    difficulty: &str,
    split: &str,
    json: bool,
) -> Result<(), CliError> {
    use scopegym_envs::evaluate::{Policy, evaluate};
    positive("--seeds", seeds as usize, 100_000)?;
    let ids: Vec<&str> = if ids.is_empty() {
        TASKS.iter().map(|t| t.id).collect()
    } else {
        ids.iter().map(String::as_str).collect()
    };
    let mut cfg = toml::Table::new();
    cfg.insert("difficulty".into(), difficulty.into());
    cfg.insert("split".into(), split.into());
    let cfg = toml::Value::Table(cfg);
    let envs = ids
        .iter()
        .map(|id| make(id, Some(&cfg)))
        .collect::<Result<Vec<_>, _>>()?;
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(2 * ids.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} floors {bar:40} {pos}/{len} ({msg}, {eta})")
            .expect("valid template"),
    );
    let mut rows = Vec::new();
    for (id, mut env) in ids.iter().zip(envs) {
        let mut scores = Vec::new();
        for (name, policy) in [("random", Policy::Random), ("heuristic", Policy::Heuristic)] {
            bar.set_message(format!("{id} {name}"));
            scores.push(evaluate(env.as_mut(), &policy, 0..seeds)?);
            bar.inc(1);
        }
        rows.push(serde_json::json!({
            "id": id,
            "difficulty": difficulty,
            "split": split,
            "seeds": seeds,
            "random": scores[0],
            "heuristic": scores[1],
        }));
    }
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<38} {:>20} {:>8} {:>20} {:>8} {:>6}",
        "task", "random return", "success", "heuristic return", "success", "seeds"
    );
    for r in &rows {
        let cell = |p: &str| {
            format!(
                "{:.3} ± {:.3}",
                r[p]["mean_return"].as_f64().unwrap_or(f64::NAN),
                r[p]["return_ci95"].as_f64().unwrap_or(f64::NAN)
            )
        };
        let rate = |p: &str| r[p]["success_rate"].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<38} {:>20} {:>8.2} {:>20} {:>8.2} {:>6}",
            r["id"].as_str().unwrap_or("?"),
            cell("random"),
            rate("random"),
            cell("heuristic"),
            rate("heuristic"),
            seeds
        );
    }
    println!("(difficulty {difficulty}, split {split}; ± is the 95 % interval of the mean)");
    Ok(())
}

fn positive(name: &str, v: usize, max: usize) -> Result<(), CliError> {
    if !(1..=max).contains(&v) {
        return Err(CliError::Argument {
            argument: name.into(),
            message: format!("must be 1..={max}, got {v}"),
        });
    }
    Ok(())
}

/// What `scopegym bench` times.
pub struct BenchOptions<'a> {
    /// Envs in the vector env.
    pub num_envs: usize,
    /// Worker threads.
    pub threads: usize,
    /// Vector steps timed.
    pub steps: usize,
    /// Only this fidelity (`fast` or `full`).
    pub fidelity: Option<&'a str>,
    /// The task's configuration (a TOML file).
    pub env_config: Option<&'a Path>,
    /// One JSON line per timed fidelity instead of text.
    pub json: bool,
}

/// Steps per second of the vector env with random actions: at the fidelity asked for, else at
/// the one the env config names, else at both where the task has the knob.
pub fn bench(id: &str, o: &BenchOptions<'_>) -> Result<(), CliError> {
    positive("--num-envs", o.num_envs, 65_536)?;
    positive("--threads", o.threads, 1024)?;
    positive("--steps", o.steps, 100_000_000)?;
    let spec = scopegym_envs::registry::spec(id)?;
    let mut table = match o.env_config {
        Some(p) => crate::bench_cli::read_toml_table(p, "--env-config")?,
        None => toml::Table::new(),
    };
    let requested = match (o.fidelity, table.get("fidelity")) {
        (Some(f), _) => Some((f.to_string(), "--fidelity")),
        (None, Some(toml::Value::String(f))) => Some((f.clone(), "--env-config")),
        (None, Some(other)) => {
            return Err(CliError::Argument {
                argument: "--env-config".into(),
                message: format!("fidelity must be \"fast\" or \"full\", got {other}"),
            });
        }
        (None, None) => None,
    };
    // The fidelities to time: the one asked for, else both where the task has the knob.
    let fidelities: Vec<Option<Fidelity>> = match requested {
        Some((f, argument)) => {
            let f = match f.as_str() {
                "fast" => Fidelity::Fast,
                "full" => Fidelity::Full,
                other => {
                    return Err(CliError::Argument {
                        argument: argument.into(),
                        message: format!("expected fast or full, got {other:?}"),
                    });
                }
            };
            if !spec.fidelity {
                return Err(CliError::Argument {
                    argument: argument.into(),
                    message: format!("{id} has one model and no fidelity knob"),
                });
            }
            vec![Some(f)]
        }
        None if spec.fidelity => Fidelity::ALL.iter().copied().map(Some).collect(),
        None => vec![None],
    };
    for f in fidelities {
        if let Some(f) = f {
            table.insert("fidelity".into(), toml::Value::String(f.name().into()));
        }
        let config = (!table.is_empty()).then(|| toml::Value::Table(table.clone()));
        bench_one(id, f, config.as_ref(), o)?;
    }
    Ok(())
}

fn bench_one(
    id: &str,
    fidelity: Option<Fidelity>,
    config: Option<&toml::Value>,
    o: &BenchOptions<'_>,
) -> Result<(), CliError> {
    let BenchOptions {
        num_envs,
        threads,
        steps,
        json,
        ..
    } = *o;
    let envs = (0..num_envs)
        .map(|_| make(id, config))
        .collect::<Result<Vec<_>, _>>()?;
    let mut v = VectorEnv::new(envs, AutoReset::NextStep, threads)?;
    v.reset(Some(0))?;
    let space = v.env(0).action_space().clone();
    // Random actions drawn before timing (an agent hands them over; drawing them is not the
    // env's work): 16 batches, used in turn.
    let mut rngs: Vec<_> = (0..num_envs).map(|i| seeded(1_000 + i as u64)).collect();
    let batches: Vec<Vec<_>> = (0..16)
        .map(|_| rngs.iter_mut().map(|r| space.sample(r)).collect())
        .collect();
    let bar = if json || steps < 50 {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} stepping {bar:40} {pos}/{len} ({eta})")
            .expect("valid template"),
    );
    let start = Instant::now();
    let mut episodes = 0usize;
    for k in 0..steps {
        v.step(&batches[k % batches.len()])?;
        // Ended episodes: with next-step autoreset, each costs one of the timed steps (the
        // reset) besides its own.
        episodes += v
            .terminated()
            .iter()
            .zip(v.truncated())
            .filter(|(a, b)| **a || **b)
            .count();
        if k % 16 == 0 {
            bar.set_position(k as u64);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let sps = (num_envs * steps) as f64 / seconds;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "env_id": id,
                "fidelity": fidelity.map_or("full", Fidelity::name),
                "num_envs": num_envs,
                "threads": threads,
                "steps": steps,
                "seconds": seconds,
                "steps_per_second": sps,
                "episodes": episodes,
                "env_config": o.env_config.map(|p| p.display().to_string()),
            })
        );
    } else {
        println!(
            "{id} ({}): {num_envs} envs x {steps} steps on {threads} thread(s) in {seconds:.3} s: {sps:.0} steps/s ({episodes} episodes ended)",
            fidelity.map_or("full", Fidelity::name)
        );
    }
    Ok(())
}

/// Resets `id` with `seed` and writes its render as an RGB PNG.
pub fn render(id: &str, seed: u64, out: &Path) -> Result<(), CliError> {
    check_writable(out, "--out")?;
    let mut env = make(id, None)?;
    env.reset(Some(seed))?;
    let img = env.render();
    let rgb = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data).ok_or_else(
        || CliError::Argument {
            argument: "env".into(),
            message: "render returned an image of the wrong size".into(),
        },
    )?;
    scopegym::output::write_rgb_png(out, &rgb)?;
    eprintln!(
        "wrote {}x{} render of {id} to {}",
        img.width,
        img.height,
        out.display()
    );
    Ok(())
}

/// What `scopegym record` records.
#[derive(Debug)]
pub struct RecordOptions<'a> {
    /// Task id.
    pub id: &'a str,
    /// `random` or `heuristic`.
    pub agent: &'a str,
    /// Episodes to record.
    pub episodes: usize,
    /// Episode `i` resets with `seed + i`.
    pub seed: u64,
    /// The dataset folder.
    pub out: &'a Path,
    /// Difficulty level (`easy`, `medium`, `hard`).
    pub difficulty: &'a str,
    /// Parameter split (`train`, `test`).
    pub split: &'a str,
    /// Seeds `0..N` of the reference scores (0: none).
    pub reference_episodes: u64,
    /// The dataset's author.
    pub author: &'a str,
    /// The dataset's description (default: generated from the options).
    pub description: Option<&'a str>,
}

/// `scopegym record`: runs `episodes` episodes of `id` at `difficulty` and `split` with the
/// `agent` (`random` or `heuristic`) from `seed` (episode `i` resets with `seed + i`) and
/// writes a Minari-compatible dataset to `out` (DESIGN.md §8; the layout is
/// `scopegym_envs::record`'s). The metadata carries the Gymnasium `env_spec` that rebuilds the
/// env with the stored (physical, `normalize_actions=False`) action convention and the same
/// config, an `eval_env_spec` on the held-out `test` split, reference scores of the random
/// and heuristic policies over seeds `0..reference_episodes` (so `minari.get_normalized_score`
/// works), the author and a description. `minari_version` is
/// `scopegym_envs::record::MINARI_FORMAT_VERSION` ("0.5.0"): the oldest Minari release whose
/// format this writes (the CLI cannot know which Minari will read it).
pub fn record(o: &RecordOptions<'_>) -> Result<(), CliError> {
    use scopegym_envs::record::{Episode, Recorder, env_spec_json, reference_scores};
    positive("--episodes", o.episodes, 10_000_000)?;
    if o.reference_episodes > 100_000 {
        return Err(CliError::Argument {
            argument: "--reference-episodes".into(),
            message: format!("must be 0..=100000, got {}", o.reference_episodes),
        });
    }
    if o.agent != "random" && o.agent != "heuristic" {
        return Err(CliError::Argument {
            argument: "--agent".into(),
            message: format!("expected random or heuristic, got {:?}", o.agent),
        });
    }
    let id = o.id;
    let level = |split: &str| {
        let mut t = toml::Table::new();
        t.insert("difficulty".into(), o.difficulty.into());
        t.insert("split".into(), split.into());
        toml::Value::Table(t)
    };
    let cfg = level(o.split);
    let mut env = make(id, Some(&cfg))?;
    let name = id.trim_start_matches("scopegym/");
    let name = name.rsplit_once("-v").map_or(name, |(n, _)| n);
    let config_json = |split: &str| serde_json::json!({"difficulty": o.difficulty, "split": split});
    let spec = |split: &str| {
        env_spec_json(
            id,
            &[
                ("task_id", id.into()),
                ("normalize_actions", false.into()),
                ("config", config_json(split)),
            ],
        )
    };
    let version = env!("CARGO_PKG_VERSION");
    let mut prov = serde_json::Map::new();
    prov.insert("env_id".into(), id.into());
    prov.insert("agent".into(), o.agent.into());
    prov.insert("algorithm_name".into(), o.agent.into());
    prov.insert("seed".into(), o.seed.into());
    prov.insert("max_episode_steps".into(), env.max_episode_steps().into());
    prov.insert("env_spec".into(), spec(o.split).into());
    prov.insert("eval_env_spec".into(), spec("test").into());
    prov.insert("config".into(), config_json(o.split));
    prov.insert("difficulty".into(), o.difficulty.into());
    prov.insert("split".into(), o.split.into());
    prov.insert("git_commit".into(), scopegym::GIT_COMMIT.into());
    prov.insert("author".into(), o.author.into());
    prov.insert(
        "requirements".into(),
        serde_json::json!([format!("scopegym=={version}")]),
    );
    let policy = if o.agent == "heuristic" {
        "the task's heuristic (its rule of thumb)"
    } else {
        "uniformly random actions"
    };
    let description = o.description.map(str::to_string).unwrap_or_else(|| {
        format!(
            "Episodes of {id} at difficulty {} on the {} split, acted by {policy} (agent {}); \
             episode i resets with seed {} + i. Actions are stored in the task's physical units \
             (normalize_actions=False); config {}. Recorded by `scopegym record` (scopegym {version}).",
            o.difficulty,
            o.split,
            o.agent,
            o.seed,
            config_json(o.split)
        )
    });
    prov.insert("description".into(), description.into());
    if o.reference_episodes > 0 {
        eprintln!(
            "reference scores: random and heuristic over seeds 0..{}",
            o.reference_episodes
        );
        let mut ref_env = make(id, Some(&cfg))?;
        prov.extend(reference_scores(ref_env.as_mut(), o.reference_episodes)?);
    }
    let mut rec = Recorder::create(
        o.out,
        &format!("scopegym/{name}/{}-v1", o.agent),
        env.observation_space(),
        env.action_space(),
        prov,
    )?;
    let bar = if o.episodes > 1 {
        ProgressBar::new(o.episodes as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} recording {bar:40} {pos}/{len} episodes ({eta})")
            .expect("valid template"),
    );
    let space = env.action_space().clone();
    for i in 0..o.episodes {
        let ep_seed = o.seed.wrapping_add(i as u64);
        let mut rng = seeded(ep_seed ^ 0x5eed);
        let (obs, info) = env.reset(Some(ep_seed))?;
        let mut ep = Episode {
            seed: ep_seed,
            observations: vec![obs],
            infos: vec![info],
            ..Default::default()
        };
        loop {
            let last = ep.observations.last().expect("reset observation");
            let a = if o.agent == "heuristic" {
                env.heuristic_action(last)
            } else {
                space.sample(&mut rng)
            };
            let s = env.step(&a)?;
            ep.actions.push(a);
            ep.observations.push(s.obs);
            ep.rewards.push(s.reward);
            ep.terminations.push(s.terminated);
            ep.truncations.push(s.truncated);
            ep.infos.push(s.info);
            if s.terminated || s.truncated {
                break;
            }
        }
        rec.write_episode(&ep)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!(
        "wrote {} episode(s) of {id} to {}",
        rec.episodes(),
        o.out.display()
    );
    Ok(())
}

/// `scopegym record --repair`: rebuilds the main file and metadata counts of the dataset at
/// `out` from its episode files after a crash (`Recorder::repair`).
pub fn repair(out: &Path) -> Result<(), CliError> {
    let r = scopegym_envs::record::Recorder::repair(out)?;
    for p in &r.removed {
        eprintln!("removed unfinished {}", p.display());
    }
    for p in &r.moved {
        eprintln!("moved aside {}", p.display());
    }
    eprintln!(
        "{}: {} episode(s), {} step(s) linked",
        out.display(),
        r.episodes,
        r.steps
    );
    Ok(())
}
