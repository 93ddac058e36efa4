//! The task registry: one line per task.
//!
//! ```
//! let env = scopegym_envs::registry::make("scopegym/AfmFeedbackTuning-v1", None).unwrap();
//! assert_eq!(env.max_episode_steps(), 30);
//! assert!(scopegym_envs::registry::make("scopegym/Nope-v1", None).is_err());
//! ```

use crate::env::{Env, TaskEnv};
use crate::error::{EnvError, Result};
use crate::tasks::afm_feedback_tuning::AfmFeedbackTuning;
use crate::tasks::pfm_domain_writing::PfmDomainWriting;
use crate::tasks::pfm_spectroscopy_explore::PfmSpectroscopyExplore;
use crate::tasks::spm_atom_manipulation::SpmAtomManipulation;
use crate::tasks::spm_tip_conditioning::SpmTipConditioning;
use crate::tasks::stem_dopant_steer::StemDopantSteer;
use crate::tasks::stem_eels_explore::StemEelsExplore;
use crate::tasks::stem_sparse_scan::StemSparseScan;

/// Builds a task's environment from its id and an optional TOML config.
pub type MakeFn = fn(&'static str, Option<&toml::Value>) -> Result<Box<dyn Env>>;

/// A registered task.
#[derive(Debug, Clone, Copy)]
pub struct TaskSpec {
    /// The id, `scopegym/<Name>-v1`.
    pub id: &'static str,
    /// The instrument family: `"stem"`, `"stm"`, `"afm"`, `"pfm"`.
    pub instrument: &'static str,
    /// One line on what the agent does.
    pub description: &'static str,
    /// Builds the environment from an optional TOML config.
    pub make: MakeFn,
    /// Whether the task takes `fidelity = "fast" | "full"` ([`crate::tasks::Fidelity`]);
    /// a task without the knob runs its one (full) model.
    pub fidelity: bool,
}

/// Every task, one line each.
#[rustfmt::skip]
pub const TASKS: &[TaskSpec] = &[
    TaskSpec { id: "scopegym/AfmFeedbackTuning-v1", instrument: "afm", description: "tune P, I and scan speed of the z-feedback for accurate, fast tracking", make: |id, c| Ok(Box::new(TaskEnv::new(id, AfmFeedbackTuning::from_config(c)?))), fidelity: true },
    TaskSpec { id: "scopegym/PfmDomainWriting-v1", instrument: "pfm", description: "write a target domain pattern with tip bias pulses, below the breakdown bias", make: |id, c| Ok(Box::new(TaskEnv::new(id, PfmDomainWriting::from_config(c)?))), fidelity: false },
    TaskSpec { id: "scopegym/PfmSpectroscopyExplore-v1", instrument: "pfm", description: "choose where to measure switching loops to find the largest loop in a budget", make: |id, c| Ok(Box::new(TaskEnv::new(id, PfmSpectroscopyExplore::from_config(c)?))), fidelity: false },
    TaskSpec { id: "scopegym/SpmTipConditioning-v1", instrument: "stm", description: "condition the STM tip with pulses and dips until it images sharply", make: |id, c| Ok(Box::new(TaskEnv::new(id, SpmTipConditioning::from_config(c)?))), fidelity: true },
    TaskSpec { id: "scopegym/SpmAtomManipulation-v1", instrument: "stm", description: "drag an adatom to a goal site by lateral manipulation", make: |id, c| Ok(Box::new(TaskEnv::new(id, SpmAtomManipulation::from_config(c)?))), fidelity: true },
    TaskSpec { id: "scopegym/StemAutofocus-v1", instrument: "stem", description: "correct defocus and two-fold astigmatism from HAADF image sharpness", make: crate::tasks::stem_autofocus::make_env, fidelity: true },
    TaskSpec { id: "scopegym/StemDopantSteer-v1", instrument: "stem", description: "steer a Si dopant in graphene to a goal site by parking the beam beside it", make: |id, c| Ok(Box::new(TaskEnv::new(id, StemDopantSteer::from_config(c)?))), fidelity: false },
    TaskSpec { id: "scopegym/StemEelsExplore-v1", instrument: "stem", description: "choose where to take EELS spectra to find the strongest Si-L edge within a budget", make: |id, c| Ok(Box::new(TaskEnv::new(id, StemEelsExplore::from_config(c)?))), fidelity: false },
    TaskSpec { id: "scopegym/StemSparseScan-v1", instrument: "stem", description: "choose which tiles of a field to scan to image it well within a dose budget", make: |id, c| Ok(Box::new(TaskEnv::new(id, StemSparseScan::from_config(c)?))), fidelity: false },
];

/// The registered ids.
pub fn ids() -> Vec<&'static str> {
    TASKS.iter().map(|t| t.id).collect()
}

/// The spec of `id`.
pub fn spec(id: &str) -> Result<&'static TaskSpec> {
    TASKS
        .iter()
        .find(|t| t.id == id)
        .ok_or_else(|| EnvError::UnknownTask {
            id: id.into(),
            known: ids().join(", "),
        })
}

/// Builds the environment registered as `id`, with an optional config (TOML table).
pub fn make(id: &str, config: Option<&toml::Value>) -> Result<Box<dyn Env>> {
    let s = spec(id)?;
    (s.make)(s.id, config)
}
