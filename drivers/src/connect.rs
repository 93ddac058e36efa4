//! Opening a task on a driver: the driver URL, and the task's environment on that instrument
//! behind the guard, the audit log and the watchdog.
//!
//! | URL | instrument | tasks |
//! |---|---|---|
//! | `sim` | the task's own simulator | all |
//! | `nanonis://HOST:PORT` | a Nanonis SPM controller | SPM tasks |
//! | `stem-gateway://HOST:PORT` | a STEM behind the scopegym gateway protocol | STEM tasks |
//! | `replay:FILE` | recorded NSID HDF5 data | tasks the recording can serve |
//!
//! Every instrument, the simulator included, runs behind [`Guarded`] with the same limits, so a
//! policy meets the same refusals in simulation and on hardware; a refused step ends the
//! episode with `info["refused"]` (see `scopegym_envs::env::TaskEnv`).
//!
//! ```
//! use scopegym_drivers::connect::{DeployOptions, DriverUrl, make_env};
//! use scopegym_envs::env::Env;
//! let url: DriverUrl = "sim".parse().unwrap();
//! let mut env = make_env("scopegym/StemAutofocus-v2", &url, DeployOptions::default()).unwrap();
//! let (_obs, _info) = env.reset(Some(0)).unwrap();
//! assert!("ftp://x".parse::<DriverUrl>().is_err());
//! ```

use crate::audit::AuditLog;
use crate::error::{DriverError, Result};
use crate::guard::Guarded;
use crate::limits::Limits;
use crate::nanonis::{NanonisClient, NanonisOptions};
use crate::replay::{ReplayOptions, ReplaySpm};
use crate::stem_gateway::{StemGatewayClient, StemGatewayOptions};
use crate::watchdog::HasSafeHandle;
use crate::watchdog::{SafeHandle, Watchdog};
use scopegym_envs::env::{Env, Info, RgbImage, Step, Task, TaskEnv};
use scopegym_envs::space::{Space, Value};
use scopegym_envs::tasks::config_from_toml;
use scopegym_envs::tasks::{
    afm_feedback_tuning, pfm_domain_writing, pfm_spectroscopy_explore, spm_atom_manipulation,
    spm_tip_conditioning, stem_autofocus, stem_dopant_steer, stem_eels_explore, stem_sparse_scan,
};
use scopegym_physics::stem::StemSimulator;
use scopegym_physics::stem::dopant::DopantSimulator;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Where the instrument is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverUrl {
    /// The task's simulator (`sim`).
    Sim,
    /// A Nanonis controller's TCP programming interface (`nanonis://HOST:PORT`).
    Nanonis(String),
    /// A STEM gateway (`stem-gateway://HOST:PORT`).
    StemGateway(String),
    /// Recorded data (`replay:FILE`).
    Replay(PathBuf),
}

impl FromStr for DriverUrl {
    type Err = DriverError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| DriverError::InvalidUrl {
            url: s.to_owned(),
            reason: why.to_owned(),
        };
        let host_port = |rest: &str| {
            let ok = rest
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if ok {
                Ok(rest.to_owned())
            } else {
                Err(bad("expected HOST:PORT with a port in 1-65535"))
            }
        };
        if s == "sim" {
            Ok(Self::Sim)
        } else if let Some(rest) = s.strip_prefix("nanonis://") {
            host_port(rest).map(Self::Nanonis)
        } else if let Some(rest) = s.strip_prefix("stem-gateway://") {
            host_port(rest).map(Self::StemGateway)
        } else if let Some(rest) = s.strip_prefix("replay:") {
            if rest.is_empty() {
                Err(bad("expected replay:FILE"))
            } else {
                Ok(Self::Replay(PathBuf::from(rest)))
            }
        } else {
            Err(bad(
                "expected sim, nanonis://HOST:PORT, stem-gateway://HOST:PORT or replay:FILE",
            ))
        }
    }
}

impl fmt::Display for DriverUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sim => write!(f, "sim"),
            Self::Nanonis(a) => write!(f, "nanonis://{a}"),
            Self::StemGateway(a) => write!(f, "stem-gateway://{a}"),
            Self::Replay(p) => write!(f, "replay:{}", p.display()),
        }
    }
}

impl DriverUrl {
    /// Whether the URL names real hardware (`nanonis://`, `stem-gateway://`), which needs
    /// limits written for it.
    pub fn is_hardware(&self) -> bool {
        matches!(self, Self::Nanonis(_) | Self::StemGateway(_))
    }
}

/// The limits for `url`: read from `file`, or the defaults ([`Limits::default`]) for a
/// simulator or a recording. Real hardware without a limits file is an error: its limits must
/// be written for it (`drivers/limits.example.toml` is a conservative start).
pub fn limits_for(url: &DriverUrl, file: Option<&std::path::Path>) -> Result<Limits> {
    match file {
        Some(p) => Limits::from_file(p),
        None if url.is_hardware() => Err(DriverError::InvalidUrl {
            url: url.to_string(),
            reason: "a real instrument needs a limits file written for it (limits=...; \
                     drivers/limits.example.toml is a conservative start)"
                .into(),
        }),
        None => Ok(Limits::default()),
    }
}

/// How to run a task on a driver.
#[derive(Debug, Default)]
pub struct DeployOptions {
    /// The task's config (TOML table), as for `scopegym_envs::registry::make`.
    pub config: Option<toml::Value>,
    /// The limits (default: [`Limits::default`], the conservative example).
    pub limits: Limits,
    /// Check and log every command, send none that changes the instrument's state.
    pub dry_run: bool,
    /// Append the audit log to this file (JSON lines); `None` logs nothing.
    pub audit: Option<PathBuf>,
    /// Make the instrument safe when the policy side goes quiet this long between calls
    /// (`None`: no watchdog). A call in progress has its own deadline instead.
    pub watchdog: Option<Duration>,
}

/// A task on a driver (an [`Env`]), with the watchdog that guards it.
///
/// Every `reset` and `step` pets the watchdog and pauses it while the call runs. Dropping a
/// deployment makes the instrument safe (the watchdog fires on drop); [`Deployment::close`]
/// does so explicitly and reports whether it worked.
pub struct Deployment {
    env: Box<dyn Env>,
    watchdog: Option<Watchdog>,
    safe: Arc<dyn SafeHandle>,
    url: DriverUrl,
}

impl fmt::Debug for Deployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deployment")
            .field("env", &self.env.id())
            .field("url", &self.url)
            .field("watchdog", &self.watchdog)
            .finish_non_exhaustive()
    }
}

impl Deployment {
    /// The driver URL.
    pub fn url(&self) -> &DriverUrl {
        &self.url
    }

    /// The handle that makes the instrument safe from any thread (a Ctrl-C handler).
    pub fn safe_handle(&self) -> Arc<dyn SafeHandle> {
        self.safe.clone()
    }

    /// Whether the watchdog has made the instrument safe.
    pub fn watchdog_fired(&self) -> bool {
        self.watchdog.as_ref().is_some_and(Watchdog::fired)
    }

    /// Ends the deployment: makes the instrument safe (tip withdrawn, beam blanked) over the
    /// driver's safe handle and stops the watchdog.
    pub fn close(mut self) -> Result<()> {
        if let Some(w) = self.watchdog.take() {
            w.disarm();
        }
        self.safe.make_safe()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if self.watchdog.is_none() {
            let _ = self.safe.make_safe();
        }
        // Otherwise the watchdog's own drop makes the instrument safe.
    }
}

impl Env for Deployment {
    fn id(&self) -> &str {
        self.env.id()
    }

    fn observation_space(&self) -> &Space {
        self.env.observation_space()
    }

    fn action_space(&self) -> &Space {
        self.env.action_space()
    }

    fn max_episode_steps(&self) -> usize {
        self.env.max_episode_steps()
    }

    fn reset(&mut self, seed: Option<u64>) -> scopegym_envs::Result<(Value, Info)> {
        let _busy = self.watchdog.as_ref().map(Watchdog::busy);
        self.env.reset(seed)
    }

    fn step(&mut self, action: &Value) -> scopegym_envs::Result<Step> {
        let _busy = self.watchdog.as_ref().map(Watchdog::busy);
        self.env.step(action)
    }

    fn step_into(&mut self, action: &Value, obs: &mut Value) -> scopegym_envs::Result<Step> {
        let _busy = self.watchdog.as_ref().map(Watchdog::busy);
        self.env.step_into(action, obs)
    }

    fn render(&self) -> RgbImage {
        self.env.render()
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        self.env.heuristic_action(obs)
    }
}

/// An instrument without hardware behind it (a simulator, a recording): nothing moves while
/// nobody calls it, so there is nothing to withdraw from another thread; the watchdog's flag
/// makes the guard refuse every later command instead.
#[derive(Debug)]
struct NoHardware(&'static str);

impl SafeHandle for NoHardware {
    fn make_safe(&self) -> Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        self.0.into()
    }
}

/// The guard every instrument runs behind, with the options' limits, mode and log.
fn guard<I>(inst: I, o: &DeployOptions, dog: Option<&Watchdog>) -> Result<Guarded<I>> {
    let audit = match &o.audit {
        Some(p) => AuditLog::append_file(p)?,
        None => AuditLog::disabled(),
    };
    let g = Guarded::new(inst, o.limits.clone())?
        .dry_run(o.dry_run)
        .with_audit(audit);
    Ok(match dog {
        Some(d) => g.watch(d.fired_flag()),
        None => g,
    })
}

fn env_err(e: scopegym_envs::EnvError) -> DriverError {
    DriverError::Env(Box::new(e))
}

fn phys_err(e: scopegym_physics::PhysicsError) -> DriverError {
    env_err(scopegym_envs::EnvError::config("instrument", e.to_string()))
}

fn wrong_family(id: &str, url: &DriverUrl) -> DriverError {
    let can = match url {
        DriverUrl::Sim => "every task",
        DriverUrl::Nanonis(_) => {
            "the SPM tasks: AfmFeedbackTuning, PfmDomainWriting, PfmSpectroscopyExplore, \
             SpmAtomManipulation, SpmTipConditioning"
        }
        DriverUrl::StemGateway(_) => "the STEM tasks",
        DriverUrl::Replay(_) => {
            "the tasks a recording can serve: PfmSpectroscopyExplore (recorded loops) and \
             AfmFeedbackTuning (a recorded scan)"
        }
    };
    DriverError::InvalidUrl {
        url: url.to_string(),
        reason: format!("this driver cannot run {id}; it runs {can}"),
    }
}

/// The last step of [`make_env`]: watchdog, guard, task, environment.
fn deploy<I, T: Task + 'static>(
    id: &'static str,
    url: &DriverUrl,
    opts: &DeployOptions,
    inst: I,
    safe: Arc<dyn SafeHandle>,
    task: impl FnOnce(Guarded<I>) -> T,
) -> Result<Deployment> {
    let dog = opts.watchdog.map(|t| Watchdog::start(safe.clone(), t));
    let g = guard(inst, opts, dog.as_ref())?;
    Ok(Deployment {
        env: Box::new(TaskEnv::new(id, task(g))),
        watchdog: dog,
        safe,
        url: url.clone(),
    })
}

/// Builds task `id` on the instrument at `url`, behind the guard (limits, dry run, audit log)
/// and, where `opts.watchdog` is set, the watchdog. Connecting reads the instrument's state and
/// changes nothing.
pub fn make_env(id: &str, url: &DriverUrl, opts: DeployOptions) -> Result<Deployment> {
    use afm_feedback_tuning::AfmFeedbackTuning;
    use pfm_domain_writing::PfmDomainWriting;
    use pfm_spectroscopy_explore::PfmSpectroscopyExplore;
    use spm_atom_manipulation::SpmAtomManipulation;
    use spm_tip_conditioning::SpmTipConditioning;
    use stem_autofocus::StemAutofocus;
    use stem_dopant_steer::StemDopantSteer;
    use stem_eels_explore::StemEelsExplore;
    use stem_sparse_scan::StemSparseScan;

    let id = scopegym_envs::registry::spec(id).map_err(env_err)?.id;
    let c = opts.config.as_ref();
    // The task's config, validated.
    macro_rules! config {
        ($task:ident) => {{
            let cfg: $task::Config = config_from_toml(c).map_err(env_err)?;
            cfg.validate().map_err(env_err)?;
            cfg
        }};
    }
    // The task `$ty` on `$inst` (with its safe handle `$safe`).
    macro_rules! on {
        ($cfg:ident, $ty:ident, $inst:expr, $safe:expr) => {{
            let inst = $inst;
            let safe: Arc<dyn SafeHandle> = $safe(&inst);
            deploy(id, url, &opts, inst, safe, |g| $ty::new($cfg, g))
        }};
    }
    fn sim<T>(_: &T) -> Arc<dyn SafeHandle> {
        Arc::new(NoHardware("sim"))
    }
    fn replay<T>(_: &T) -> Arc<dyn SafeHandle> {
        Arc::new(NoHardware("replay"))
    }
    let nanonis = |c: &NanonisClient| c.safe_handle();
    let connect_nanonis =
        |addr: &str, mode| NanonisClient::connect(addr, NanonisOptions::for_mode(mode));
    let gateway = |c: &StemGatewayClient| c.safe_handle();
    let connect_gateway =
        |addr: &str| StemGatewayClient::connect(addr, StemGatewayOptions::default());
    let open_replay = |p: &PathBuf| ReplaySpm::open(p, ReplayOptions::default());
    match (id, url) {
        ("scopegym/AfmFeedbackTuning-v2", u) => {
            let cfg = config!(afm_feedback_tuning);
            match u {
                DriverUrl::Sim => on!(
                    cfg,
                    AfmFeedbackTuning,
                    afm_feedback_tuning::simulator(&cfg, 0).map_err(phys_err)?,
                    sim
                ),
                DriverUrl::Nanonis(a) => on!(
                    cfg,
                    AfmFeedbackTuning,
                    connect_nanonis(a, cfg.instrument.mode)?,
                    nanonis
                ),
                DriverUrl::Replay(p) => on!(cfg, AfmFeedbackTuning, open_replay(p)?, replay),
                _ => Err(wrong_family(id, url)),
            }
        }
        ("scopegym/PfmSpectroscopyExplore-v1", u) => {
            let cfg = config!(pfm_spectroscopy_explore);
            match u {
                DriverUrl::Sim => {
                    on!(
                        cfg,
                        PfmSpectroscopyExplore,
                        pfm_spectroscopy_explore::simulator(&cfg, 0).map_err(phys_err)?,
                        sim
                    )
                }
                DriverUrl::Nanonis(a) => on!(
                    cfg,
                    PfmSpectroscopyExplore,
                    connect_nanonis(a, cfg.instrument.mode)?,
                    nanonis
                ),
                DriverUrl::Replay(p) => {
                    on!(cfg, PfmSpectroscopyExplore, open_replay(p)?, replay)
                }
                _ => Err(wrong_family(id, url)),
            }
        }
        ("scopegym/PfmDomainWriting-v1", u) => {
            let cfg = config!(pfm_domain_writing);
            match u {
                DriverUrl::Sim => on!(
                    cfg,
                    PfmDomainWriting,
                    pfm_domain_writing::simulator(&cfg, 0).map_err(phys_err)?,
                    sim
                ),
                DriverUrl::Nanonis(a) => on!(
                    cfg,
                    PfmDomainWriting,
                    connect_nanonis(a, cfg.instrument.mode)?,
                    nanonis
                ),
                _ => Err(wrong_family(id, url)),
            }
        }
        ("scopegym/SpmTipConditioning-v2", u) => {
            let cfg = config!(spm_tip_conditioning);
            match u {
                DriverUrl::Sim => on!(
                    cfg,
                    SpmTipConditioning,
                    spm_tip_conditioning::simulator(&cfg, 0).map_err(phys_err)?,
                    sim
                ),
                DriverUrl::Nanonis(a) => on!(
                    cfg,
                    SpmTipConditioning,
                    connect_nanonis(a, cfg.instrument.mode)?,
                    nanonis
                ),
                _ => Err(wrong_family(id, url)),
            }
        }
        ("scopegym/SpmAtomManipulation-v2", u) => {
            let cfg = config!(spm_atom_manipulation);
            match u {
                DriverUrl::Sim => on!(
                    cfg,
                    SpmAtomManipulation,
                    spm_atom_manipulation::simulator(&cfg, 0).map_err(phys_err)?,
                    sim
                ),
                DriverUrl::Nanonis(a) => on!(
                    cfg,
                    SpmAtomManipulation,
                    connect_nanonis(a, cfg.instrument.mode)?,
                    nanonis
                ),
                _ => Err(wrong_family(id, url)),
            }
        }
        ("scopegym/StemAutofocus-v2", u) => {
            let cfg = config!(stem_autofocus);
            match u {
                DriverUrl::Sim => {
                    let inst = scopegym_envs::tasks::stem_autofocus::simulator(&cfg, 0)
                        .map_err(phys_err)?;
                    on!(cfg, StemAutofocus, inst, sim)
                }
                DriverUrl::StemGateway(a) => on!(cfg, StemAutofocus, connect_gateway(a)?, gateway),
                _ => Err(wrong_family(id, url)),
            }
        }
        ("scopegym/StemDopantSteer-v1", u) => {
            let cfg = config!(stem_dopant_steer);
            match u {
                DriverUrl::Sim => {
                    let inst = DopantSimulator::new(cfg.instrument.clone(), 0).map_err(phys_err)?;
                    on!(cfg, StemDopantSteer, inst, sim)
                }
                DriverUrl::StemGateway(a) => {
                    on!(cfg, StemDopantSteer, connect_gateway(a)?, gateway)
                }
                _ => Err(wrong_family(id, url)),
            }
        }
        ("scopegym/StemEelsExplore-v2", u) => {
            let cfg = config!(stem_eels_explore);
            match u {
                DriverUrl::Sim => {
                    let inst = scopegym_envs::tasks::stem_eels_explore::simulator(&cfg, 0)
                        .map_err(phys_err)?;
                    on!(cfg, StemEelsExplore, inst, sim)
                }
                DriverUrl::StemGateway(a) => {
                    on!(cfg, StemEelsExplore, connect_gateway(a)?, gateway)
                }
                _ => Err(wrong_family(id, url)),
            }
        }
        ("scopegym/StemSparseScan-v2", u) => {
            let cfg = config!(stem_sparse_scan);
            match u {
                DriverUrl::Sim => {
                    let inst = StemSimulator::new(cfg.instrument_config(), 0).map_err(phys_err)?;
                    on!(cfg, StemSparseScan, inst, sim)
                }
                DriverUrl::StemGateway(a) => on!(cfg, StemSparseScan, connect_gateway(a)?, gateway),
                _ => Err(wrong_family(id, url)),
            }
        }
        _ => Err(wrong_family(id, url)),
    }
}
