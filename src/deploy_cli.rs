//! `scopegym deploy`: a policy on a driver, through the guard, with a live progress line and
//! the audit log.

use crate::bench_cli::read_toml;
use indicatif::{ProgressBar, ProgressStyle};
use scopegym::error::CliError;
use scopegym_agents::agent::Agent;
use scopegym_agents::bench::run::episode_seed;
use scopegym_drivers::connect::{DeployOptions, DriverUrl, make_env};
use scopegym_envs::env::{Env, InfoValue};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// What `scopegym deploy` runs.
#[derive(Debug)]
pub(crate) struct DeployArgs<'a> {
    pub env_id: &'a str,
    pub driver: &'a str,
    pub agent: Option<&'a str>,
    pub checkpoint: Option<&'a Path>,
    pub policy: Option<&'a Path>,
    pub config: Option<&'a Path>,
    pub env_config: Option<&'a Path>,
    pub difficulty: &'a str,
    pub split: &'a str,
    pub limits: Option<&'a Path>,
    pub dry_run: bool,
    pub episodes: usize,
    pub seed: u64,
    pub log: &'a Path,
    pub watchdog: f64,
    pub json: bool,
}

/// One episode as deployed.
#[derive(Debug, serde::Serialize)]
struct EpisodeOut {
    seed: u64,
    #[serde(rename = "return")]
    ret: f64,
    steps: usize,
    success: bool,
    terminated: bool,
    /// The refusal that ended the episode, if one did.
    refused: Option<String>,
}

fn arg(argument: &str, message: impl Into<String>) -> CliError {
    CliError::Argument {
        argument: argument.into(),
        message: message.into(),
    }
}

fn make_agent(a: &DeployArgs<'_>, env: &dyn Env) -> Result<Box<dyn Agent>, CliError> {
    use scopegym_agents::registry;
    if let Some(p) = a.policy {
        let mut t = toml::Table::new();
        t.insert(
            "policy".into(),
            toml::Value::String(p.display().to_string()),
        );
        return Ok(registry::make(
            "torchscript",
            env,
            Some(&toml::Value::Table(t)),
            a.seed,
        )?);
    }
    let name = a
        .agent
        .ok_or_else(|| arg("--agent", "give --agent or --policy"))?;
    if let Some(ck) = a.checkpoint {
        return Ok(registry::load(name, ck, env)?);
    }
    if registry::spec(name)?.learns {
        return Err(arg(
            "--checkpoint",
            format!(
                "{name} learns before it acts: give the checkpoint it saved (scopegym run \
                 writes <out>/checkpoints/seed<s>/{name}.safetensors) or its TorchScript \
                 export with --policy"
            ),
        ));
    }
    let cfg = a.config.map(|p| read_toml(p, "--config")).transpose()?;
    Ok(registry::make(name, env, cfg.as_ref(), a.seed)?)
}

fn env_table(a: &DeployArgs<'_>) -> Result<toml::Value, CliError> {
    let mut t = match a
        .env_config
        .map(|p| read_toml(p, "--env-config"))
        .transpose()?
    {
        Some(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    t.insert(
        "difficulty".into(),
        toml::Value::String(a.difficulty.into()),
    );
    t.insert("split".into(), toml::Value::String(a.split.into()));
    Ok(toml::Value::Table(t))
}

/// Runs `scopegym deploy`.
pub(crate) fn deploy(a: &DeployArgs<'_>) -> Result<(), CliError> {
    let url: DriverUrl = a.driver.parse()?;
    let limits = scopegym_drivers::connect::limits_for(&url, a.limits)?;
    if !(a.watchdog.is_finite() && a.watchdog >= 0.0) {
        return Err(arg("--watchdog", "must be ≥ 0 s (0: no watchdog)"));
    }
    if a.episodes == 0 {
        return Err(arg("--episodes", "must be at least 1"));
    }
    let opts = DeployOptions {
        config: Some(env_table(a)?),
        limits,
        dry_run: a.dry_run,
        audit: Some(a.log.to_path_buf()),
        watchdog: (a.watchdog > 0.0).then(|| Duration::from_secs_f64(a.watchdog)),
    };
    let mut dep = make_env(a.env_id, &url, opts)?;
    let mut agent = make_agent(a, &dep)?;

    // Ctrl-C: the first ends the run after the current step (the instrument is then made
    // safe); the second makes it safe at once and exits.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (stop, safe, presses) = (stop.clone(), dep.safe_handle(), AtomicUsize::new(0));
        let _ = ctrlc::set_handler(move || {
            if presses.fetch_add(1, Ordering::SeqCst) == 0 {
                stop.store(true, Ordering::SeqCst);
                eprintln!("\nstopping after this step (Ctrl-C again: make safe and exit now)");
            } else {
                let _ = safe.make_safe();
                std::process::exit(130);
            }
        });
    }

    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("valid"));
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut out = Vec::with_capacity(a.episodes);
    let who = a.policy.map_or_else(
        || a.agent.unwrap_or("").to_owned(),
        |p| p.display().to_string(),
    );
    'episodes: for i in 0..a.episodes {
        let seed = episode_seed(a.seed, i);
        let (mut obs, _) = dep.reset(Some(seed))?;
        agent.begin_episode(&dep, &obs, seed)?;
        let mut ep = EpisodeOut {
            seed,
            ret: 0.0,
            steps: 0,
            success: false,
            terminated: false,
            refused: None,
        };
        loop {
            if stop.load(Ordering::SeqCst) {
                out.push(ep);
                break 'episodes;
            }
            let action = agent.act(&mut dep, &obs)?;
            let s = dep.step(&action)?;
            agent.observe(&action, s.reward, &s.obs)?;
            ep.ret += s.reward;
            ep.steps += 1;
            ep.success = matches!(s.info.get("is_success"), Some(InfoValue::Bool(true)));
            if let Some(InfoValue::Str(r)) = s.info.get("refused_reason") {
                ep.refused = Some(r.clone());
            }
            bar.set_message(format!(
                "{} on {} via {url}{}: episode {}/{}, step {}, reward {:+.4}, return {:+.4}",
                who,
                a.env_id,
                if a.dry_run { " (dry run)" } else { "" },
                i + 1,
                a.episodes,
                ep.steps,
                s.reward,
                ep.ret
            ));
            obs = s.obs;
            if s.terminated || s.truncated {
                ep.terminated = s.terminated;
                break;
            }
        }
        out.push(ep);
    }
    bar.finish_and_clear();
    let fired = dep.watchdog_fired();
    dep.close()?;
    if a.json {
        let v = serde_json::json!({
            "env_id": a.env_id,
            "driver": url.to_string(),
            "dry_run": a.dry_run,
            "agent": who,
            "episodes": out,
            "watchdog_fired": fired,
            "audit_log": a.log.display().to_string(),
        });
        println!("{v}");
    } else {
        println!("{who} on {} via {url}", a.env_id);
        println!(
            "{:>20} {:>12} {:>6} {:>8}  refused",
            "seed", "return", "steps", "success"
        );
        for e in &out {
            println!(
                "{:>20} {:>12.4} {:>6} {:>8}  {}",
                e.seed,
                e.ret,
                e.steps,
                e.success,
                e.refused.as_deref().unwrap_or("-")
            );
        }
        if fired {
            println!("the watchdog made the instrument safe during the run");
        }
        if a.dry_run {
            println!(
                "dry run: every command was checked and logged, none that changes the \
                 instrument was sent; observations were placeholders (zeros), so the returns \
                 and successes above measure nothing"
            );
        }
    }
    eprintln!("audit log: {}", a.log.display());
    Ok(())
}

/// Runs `scopegym fake-nanonis`.
pub(crate) fn fake_nanonis(
    env_id: &str,
    env_config: Option<&Path>,
    seed: u64,
) -> Result<(), CliError> {
    use scopegym_envs::tasks::{
        afm_feedback_tuning, config_from_toml, pfm_domain_writing, pfm_spectroscopy_explore,
        spm_atom_manipulation, spm_tip_conditioning,
    };
    let id = scopegym_envs::registry::spec(env_id)?.id;
    let table = env_config
        .map(|p| read_toml(p, "--env-config"))
        .transpose()?;
    let c = table.as_ref();
    macro_rules! instrument {
        ($task:ident) => {{
            let cfg: $task::Config = config_from_toml(c)?;
            cfg.validate()?;
            (cfg.instrument.clone(), cfg.split.region())
        }};
    }
    let (inst, region) = match id {
        "scopegym/AfmFeedbackTuning-v2" => instrument!(afm_feedback_tuning),
        "scopegym/PfmDomainWriting-v1" => instrument!(pfm_domain_writing),
        "scopegym/PfmSpectroscopyExplore-v1" => instrument!(pfm_spectroscopy_explore),
        "scopegym/SpmTipConditioning-v2" => instrument!(spm_tip_conditioning),
        "scopegym/SpmAtomManipulation-v2" => instrument!(spm_atom_manipulation),
        _ => {
            return Err(arg(
                "env_id",
                format!("{id} does not run on a Nanonis controller"),
            ));
        }
    };
    let fake =
        scopegym_drivers::nanonis::FakeNanonis::from_config(inst, region).map_err(|source| {
            CliError::Io {
                path: "127.0.0.1".into(),
                source,
            }
        })?;
    fake.reset(seed).map_err(|e| arg("--seed", e.to_string()))?;
    println!("{}", fake.url());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    eprintln!("serving {id}'s simulator as a fake Nanonis controller; Ctrl-C stops it");
    loop {
        std::thread::park();
    }
}
