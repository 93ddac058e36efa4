//! A guarded instrument inside a task: starting episodes and passing ground truth through.
//!
//! The tasks of `scopegym-envs` need [`NewEpisode`] and one ground-truth trait each from their
//! instrument. For a [`Guarded`] instrument both go to the wrapped instrument:
//!
//! - **New episode**: the wrapped instrument starts the episode (a simulator reseeds and
//!   rebuilds its specimen; a real driver keeps its specimen or moves to a fresh area). This is
//!   setup outside the policy's reach, so it is not checked against the limits, but it is
//!   written to the audit log (`new_episode` with the seed). The guard then forgets the
//!   state it remembered ([`Guarded::resync`]); only where the instrument reports a fresh,
//!   unexposed specimen ([`NewEpisode::fresh_specimen`]: the simulators) does it also clear
//!   the dose map and re-arm after a crash abort. On a real instrument a tripped guard stays
//!   tripped and the dose keeps adding up across episodes until a person calls
//!   [`Guarded::clear_trip`] / [`Guarded::reset_dose`].
//! - **Ground truth** is read from the wrapped instrument (a simulator knows it; a real driver
//!   reports none). It only ever enters `info`, never an observation or a command.

use crate::audit::Outcome;
use crate::guard::Guarded;
use scopegym_envs::env::{Info, InfoValue};
use scopegym_envs::tasks::NewEpisode;
use scopegym_envs::tasks::afm_feedback_tuning::LoopTruth as AfmLoopTruth;
use scopegym_envs::tasks::pfm_domain_writing::PolarizationTruth;
use scopegym_envs::tasks::pfm_spectroscopy_explore::{LoopOracle, LoopTruth as PfmLoopTruth};
use scopegym_envs::tasks::spm_atom_manipulation::AtomTruth;
use scopegym_envs::tasks::spm_tip_conditioning::TipTruth;
use scopegym_envs::tasks::stem_autofocus::ProbeTruth;
use scopegym_envs::tasks::stem_dopant_steer::DopantTruth;
use scopegym_envs::tasks::stem_eels_explore::{SpectrumScratch, SpectrumTruth};
use scopegym_envs::tasks::stem_sparse_scan::{FieldTruth, TruthScratch};
use scopegym_physics::instrument::ScanSettings;
use scopegym_physics::param::Region;
use scopegym_physics::stem::optics::Aberrations;
use serde_json::{Map, json};

impl<I: NewEpisode> NewEpisode for Guarded<I> {
    fn new_episode(&mut self, seed: u64, info: &mut Info) -> scopegym_envs::Result<()> {
        let fresh = self.inner().fresh_specimen();
        let result = self.inner_mut().new_episode(seed, info);
        let mut args = Map::new();
        args.insert("seed".into(), json!(seed));
        args.insert("fresh_specimen".into(), json!(fresh));
        let outcome = match &result {
            Ok(()) => Outcome::Ok(String::new()),
            Err(e) => Outcome::Error(e.to_string()),
        };
        let logged = self.log("new_episode", args, &outcome);
        result?;
        logged.map_err(|e| scopegym_envs::EnvError::Physics(e.into()))?;
        self.resync();
        if fresh {
            self.reset_dose();
            self.clear_trip();
        }
        if let Some(t) = self.tripped() {
            info.insert("guard_tripped".into(), InfoValue::Str(t.reason.clone()));
        }
        Ok(())
    }

    fn set_region(&mut self, region: Region) {
        self.inner_mut().set_region(region);
    }

    fn fresh_specimen(&self) -> bool {
        self.inner().fresh_specimen()
    }
}

impl<I: TipTruth> TipTruth for Guarded<I> {
    fn record_tip(&self, info: &mut Info) {
        self.inner().record_tip(info);
    }
}

impl<I: PolarizationTruth> PolarizationTruth for Guarded<I> {
    fn true_up(&self, scan: &ScanSettings) -> Option<Vec<bool>> {
        self.inner().true_up(scan)
    }
}

impl<I: AfmLoopTruth> AfmLoopTruth for Guarded<I> {
    fn loop_gain(&self) -> Option<f64> {
        self.inner().loop_gain()
    }

    fn controller_period(&self) -> Option<f64> {
        self.inner().controller_period()
    }
}

impl<I: PfmLoopTruth> PfmLoopTruth for Guarded<I> {
    fn loop_oracle(&self) -> Option<LoopOracle> {
        self.inner().loop_oracle()
    }
}

impl<I: AtomTruth> AtomTruth for Guarded<I> {
    fn true_atoms_lab(&self) -> Vec<[f64; 2]> {
        self.inner().true_atoms_lab()
    }
}

impl<I: ProbeTruth> ProbeTruth for Guarded<I> {
    fn true_aberrations(&self) -> Option<Aberrations> {
        self.inner().true_aberrations()
    }

    fn true_convergence_angle(&self) -> Option<f64> {
        self.inner().true_convergence_angle()
    }
}

impl<I: DopantTruth> DopantTruth for Guarded<I> {
    fn true_dopant(&self, near: [f64; 2], neighbours: &mut Vec<[f64; 2]>) -> Option<[f64; 2]> {
        self.inner().true_dopant(near, neighbours)
    }

    fn true_site_near(&self, p: [f64; 2]) -> Option<[f64; 2]> {
        self.inner().true_site_near(p)
    }

    fn true_drift(&self) -> Option<[f64; 2]> {
        self.inner().true_drift()
    }

    fn true_hops(&self) -> Option<u64> {
        self.inner().true_hops()
    }
}

impl<I: SpectrumTruth> SpectrumTruth for Guarded<I> {
    fn expected_values(
        &mut self,
        positions: &[[f64; 2]],
        exposure: f64,
        window: [f64; 2],
        value: &dyn Fn(&[f64], &[f64]) -> f64,
        scratch: &mut SpectrumScratch,
        out: &mut Vec<f64>,
    ) -> bool {
        self.inner_mut()
            .expected_values(positions, exposure, window, value, scratch, out)
    }
}

impl<I: FieldTruth> FieldTruth for Guarded<I> {
    fn noiseless_field(
        &mut self,
        settings: &ScanSettings,
        scratch: &mut TruthScratch,
        out: &mut Vec<f64>,
    ) -> bool {
        self.inner_mut().noiseless_field(settings, scratch, out)
    }
}
