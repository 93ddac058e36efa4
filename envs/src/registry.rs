//! The task registry: one line per task.
//!
//! ```
//! let env = scopegym_envs::registry::make("scopegym/AfmFeedbackTuning-v2", None).unwrap();
//! assert_eq!(env.max_episode_steps(), 30);
//! assert!(scopegym_envs::registry::make("scopegym/Nope-v1", None).is_err());
//! // A retired version names its replacement.
//! let e = scopegym_envs::registry::make("scopegym/StemAutofocus-v1", None).err().unwrap();
//! assert!(e.to_string().contains("scopegym/StemAutofocus-v2"));
//! ```

use crate::env::{Env, TaskEnv};
use crate::error::{EnvError, Result};
use crate::tasks::afm_feedback_tuning::AfmFeedbackTuning;
use crate::tasks::pfm_domain_writing::PfmDomainWriting;
use crate::tasks::pfm_spectroscopy_explore::PfmSpectroscopyExplore;
use crate::tasks::spm_atom_manipulation::SpmAtomManipulation;
use crate::tasks::spm_tip_conditioning::SpmTipConditioning;
use crate::tasks::stem_eels_explore::StemEelsExplore;
use crate::tasks::stem_sparse_scan::StemSparseScan;

/// Builds a task's environment from its id and an optional TOML config.
pub type MakeFn = fn(&'static str, Option<&toml::Value>) -> Result<Box<dyn Env>>;

/// A registered task.
#[derive(Debug, Clone, Copy)]
pub struct TaskSpec {
    /// The id, `scopegym/<Name>-vN`.
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
    TaskSpec { id: "scopegym/AfmFeedbackTuning-v2", instrument: "afm", description: "tune P, I and scan speed of the z-feedback for accurate, fast tracking", make: |id, c| Ok(Box::new(TaskEnv::new(id, AfmFeedbackTuning::from_config(c)?))), fidelity: true },
    TaskSpec { id: "scopegym/PfmDomainWriting-v1", instrument: "pfm", description: "write a target domain pattern with tip bias pulses, below the breakdown bias", make: |id, c| Ok(Box::new(TaskEnv::new(id, PfmDomainWriting::from_config(c)?))), fidelity: true },
    TaskSpec { id: "scopegym/PfmSpectroscopyExplore-v1", instrument: "pfm", description: "choose where to measure switching loops to find the largest loop in a budget", make: |id, c| Ok(Box::new(TaskEnv::new(id, PfmSpectroscopyExplore::from_config(c)?))), fidelity: true },
    TaskSpec { id: "scopegym/SpmTipConditioning-v2", instrument: "stm", description: "condition the STM tip with pulses and dips until it images sharply", make: |id, c| Ok(Box::new(TaskEnv::new(id, SpmTipConditioning::from_config(c)?))), fidelity: true },
    TaskSpec { id: "scopegym/SpmAtomManipulation-v2", instrument: "stm", description: "drag an adatom to a goal site by lateral manipulation", make: |id, c| Ok(Box::new(TaskEnv::new(id, SpmAtomManipulation::from_config(c)?))), fidelity: true },
    TaskSpec { id: "scopegym/StemAutofocus-v2", instrument: "stem", description: "correct defocus and two-fold astigmatism from HAADF image sharpness", make: crate::tasks::stem_autofocus::make_env, fidelity: true },
    TaskSpec { id: "scopegym/StemDopantSteer-v1", instrument: "stem", description: "steer a Si dopant in graphene to a goal site by parking the beam beside it", make: crate::tasks::stem_dopant_steer::make_env, fidelity: true },
    TaskSpec { id: "scopegym/StemEelsExplore-v2", instrument: "stem", description: "choose where to take EELS spectra to find the strongest Si-L edge within a budget", make: |id, c| Ok(Box::new(TaskEnv::new(id, StemEelsExplore::from_config(c)?))), fidelity: true },
    TaskSpec { id: "scopegym/StemSparseScan-v2", instrument: "stem", description: "choose which tiles of a field to scan to image it well within a dose budget", make: |id, c| Ok(Box::new(TaskEnv::new(id, StemSparseScan::from_config(c)?))), fidelity: true },
];

/// Retired ids: `(old id, current id, what changed)`. Asking for an old id is an
/// [`EnvError::RetiredTask`] naming the current one (results under the two ids do not compare).
pub const RETIRED: &[(&str, &str, &str)] = &[
    (
        "scopegym/AfmFeedbackTuning-v1",
        "scopegym/AfmFeedbackTuning-v2",
        STEP8_SPM,
    ),
    (
        "scopegym/SpmTipConditioning-v1",
        "scopegym/SpmTipConditioning-v2",
        STEP8_SPM,
    ),
    (
        "scopegym/SpmAtomManipulation-v1",
        "scopegym/SpmAtomManipulation-v2",
        STEP8_SPM,
    ),
    (
        "scopegym/StemAutofocus-v1",
        "scopegym/StemAutofocus-v2",
        STEP8_STEM,
    ),
    (
        "scopegym/StemEelsExplore-v1",
        "scopegym/StemEelsExplore-v2",
        STEP8_STEM,
    ),
    (
        "scopegym/StemSparseScan-v1",
        "scopegym/StemSparseScan-v2",
        STEP8_STEM,
    ),
];

const STEP8_SPM: &str = "the step-8 physics fixes changed its dynamics: periodic samples without \
    edge streaks, the adatom corrugation at its configured peak-to-peak, lost adatoms picked up \
    or scattered";
const STEP8_STEM: &str = "the step-8 physics fixes changed its dynamics: periodic specimens, \
    source-blurred point exposures, 1/f scan noise, exit-surface sputtering, raster-driven hops";

/// The registered ids.
pub fn ids() -> Vec<&'static str> {
    TASKS.iter().map(|t| t.id).collect()
}

/// The spec of `id`.
pub fn spec(id: &str) -> Result<&'static TaskSpec> {
    TASKS
        .iter()
        .find(|t| t.id == id)
        .ok_or_else(|| match RETIRED.iter().find(|r| r.0 == id) {
            Some((_, current, why)) => EnvError::RetiredTask {
                id: id.into(),
                replacement: (*current).into(),
                why: (*why).into(),
            },
            None => EnvError::UnknownTask {
                id: id.into(),
                known: ids().join(", "),
            },
        })
}

/// Builds the environment registered as `id`, with an optional config (TOML table).
pub fn make(id: &str, config: Option<&toml::Value>) -> Result<Box<dyn Env>> {
    let s = spec(id)?;
    (s.make)(s.id, config)
}
