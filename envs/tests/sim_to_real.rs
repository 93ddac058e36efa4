//! Sim-to-real: every task builds its observations, rewards and terminations from measurements
//! alone. Each task runs twice from the same seeds with the same actions: on the bare simulator,
//! and on `Blind<simulator>`, which passes every command through but answers every ground-truth
//! accessor with "unknown", as a real instrument's driver does. The two runs must agree bit for
//! bit in everything but `info`; and the simulator run must actually report ground truth in
//! `info` (so the check is not vacuous).

use scopegym_envs::audit::Blind;
use scopegym_envs::env::{Env, Info, Task, TaskEnv};
use scopegym_envs::rng::seeded;
use scopegym_envs::tasks::{
    TaskConfig, afm_feedback_tuning as afm, config_from_toml, pfm_domain_writing as pdw,
    pfm_spectroscopy_explore as pse, spm_atom_manipulation as sam, spm_tip_conditioning as stc,
    stem_autofocus as saf, stem_dopant_steer as sds, stem_eels_explore as see,
    stem_sparse_scan as sss,
};
use scopegym_physics::spm::sim::SpmSimulator;
use scopegym_physics::stem::StemSimulator;
use scopegym_physics::stem::dopant::DopantSimulator;
use scopegym_physics::stem::lattice::LatticeSimulator;

fn config<C: TaskConfig>(text: &str) -> C {
    let v: toml::Value = toml::from_str(text).unwrap();
    config_from_toml(Some(&v)).unwrap()
}

/// Runs both envs in lockstep: the heuristic of the bare run on even steps, seeded random
/// actions on odd ones; asserts identical observations, rewards and flags, and (`truth`) that
/// the bare run's info held ground truth the blind run's lacked.
fn lockstep(
    id: &str,
    bare: &mut dyn Env,
    blind: &mut dyn Env,
    seeds: std::ops::Range<u64>,
    truth: bool,
) {
    let mut truth_keys = std::collections::BTreeSet::new();
    for seed in seeds {
        let (mut obs, info_a) = bare.reset(Some(seed)).unwrap();
        let (obs_b, info_b) = blind.reset(Some(seed)).unwrap();
        assert_eq!(obs, obs_b, "{id} seed {seed}: reset observations differ");
        note_truth(&info_a, &info_b, &mut truth_keys);
        let mut rng = seeded(seed ^ 0x51);
        for t in 0.. {
            let a = if t % 2 == 0 {
                bare.heuristic_action(&obs)
            } else {
                bare.action_space().sample(&mut rng)
            };
            assert_eq!(
                a,
                if t % 2 == 0 {
                    blind.heuristic_action(&obs)
                } else {
                    a.clone()
                },
                "{id} seed {seed} step {t}: the heuristic used ground truth"
            );
            let (sa, sb) = (bare.step(&a).unwrap(), blind.step(&a).unwrap());
            assert_eq!(
                sa.obs, sb.obs,
                "{id} seed {seed} step {t}: observations differ"
            );
            assert_eq!(
                sa.reward.to_bits(),
                sb.reward.to_bits(),
                "{id} seed {seed} step {t}: rewards differ ({} vs {})",
                sa.reward,
                sb.reward
            );
            assert_eq!(
                (sa.terminated, sa.truncated),
                (sb.terminated, sb.truncated),
                "{id} seed {seed} step {t}: termination differs"
            );
            note_truth(&sa.info, &sb.info, &mut truth_keys);
            obs = sa.obs;
            if sa.terminated || sa.truncated {
                break;
            }
        }
    }
    println!("{id}: ground truth only in the simulator's info: {truth_keys:?}");
    assert!(
        !truth || !truth_keys.is_empty(),
        "{id}: the simulator reported no ground truth that the blind run lacks"
    );
}

/// Keys whose values differ between the bare and the blind run's info (ground truth).
fn note_truth(a: &Info, b: &Info, keys: &mut std::collections::BTreeSet<String>) {
    for (k, v) in a {
        if b.get(k) != Some(v) {
            keys.insert(k.to_string());
        }
    }
}

/// The lockstep check of `bare` against `blind`; `truth`: the task reads ground truth through
/// a truth trait (so its info must show some).
fn run<T: Task + 'static, U: Task + 'static>(id: &str, bare: T, blind: U, seeds: u64, truth: bool) {
    let mut a = TaskEnv::new(id, bare);
    let mut b = TaskEnv::new(id, blind);
    lockstep(id, &mut a, &mut b, 0..seeds, truth);
}

#[test]
fn afm_feedback_tuning() {
    let c: afm::Config = config("max_steps = 8");
    let sim = |c: &afm::Config| SpmSimulator::new(c.instrument.clone(), 0).unwrap();
    run(
        "AfmFeedbackTuning",
        afm::AfmFeedbackTuning::new(c.clone(), sim(&c)),
        afm::AfmFeedbackTuning::new(c.clone(), Blind::new(sim(&c))),
        3,
        true,
    );
}

#[test]
fn pfm_domain_writing() {
    let c: pdw::Config = config("max_steps = 6");
    let sim = |c: &pdw::Config| SpmSimulator::new(c.instrument.clone(), 0).unwrap();
    run(
        "PfmDomainWriting",
        pdw::PfmDomainWriting::new(c.clone(), sim(&c)),
        pdw::PfmDomainWriting::new(c.clone(), Blind::new(sim(&c))),
        2,
        true,
    );
}

#[test]
fn pfm_spectroscopy_explore() {
    let c: pse::Config = config("");
    let sim = |c: &pse::Config| SpmSimulator::new(c.instrument.clone(), 0).unwrap();
    run(
        "PfmSpectroscopyExplore",
        pse::PfmSpectroscopyExplore::new(c.clone(), sim(&c)),
        pse::PfmSpectroscopyExplore::new(c.clone(), Blind::new(sim(&c))),
        2,
        true,
    );
}

#[test]
fn spm_atom_manipulation() {
    let c: sam::Config = config("max_steps = 8");
    let sim = |c: &sam::Config| SpmSimulator::new(c.instrument.clone(), 0).unwrap();
    run(
        "SpmAtomManipulation",
        sam::SpmAtomManipulation::new(c.clone(), sim(&c)),
        sam::SpmAtomManipulation::new(c.clone(), Blind::new(sim(&c))),
        3,
        true,
    );
}

#[test]
fn spm_tip_conditioning() {
    let c: stc::Config = config("max_steps = 10");
    let sim = |c: &stc::Config| SpmSimulator::new(c.instrument.clone(), 0).unwrap();
    run(
        "SpmTipConditioning",
        stc::SpmTipConditioning::new(c.clone(), sim(&c)),
        stc::SpmTipConditioning::new(c.clone(), Blind::new(sim(&c))),
        3,
        true,
    );
}

#[test]
fn stem_autofocus() {
    let c: saf::Config = config("max_steps = 10");
    let sim = |c: &saf::Config| LatticeSimulator::new(c.instrument.clone(), 0).unwrap();
    run(
        "StemAutofocus",
        saf::StemAutofocus::new(c.clone(), sim(&c)),
        saf::StemAutofocus::new(c.clone(), Blind::new(sim(&c))),
        3,
        true,
    );
}

#[test]
fn stem_dopant_steer() {
    let c: sds::Config = config("max_steps = 30");
    let sim = |c: &sds::Config| DopantSimulator::new(c.instrument.clone(), 0).unwrap();
    run(
        "StemDopantSteer",
        sds::StemDopantSteer::new(c.clone(), sim(&c)),
        sds::StemDopantSteer::new(c.clone(), Blind::new(sim(&c))),
        3,
        true,
    );
}

#[test]
fn stem_eels_explore() {
    let c: see::Config = config("");
    let sim = |c: &see::Config| StemSimulator::new(c.instrument_config(), 0).unwrap();
    run(
        "StemEelsExplore",
        see::StemEelsExplore::new(c.clone(), sim(&c)),
        see::StemEelsExplore::new(c.clone(), Blind::new(sim(&c))),
        2,
        true,
    );
}

#[test]
fn stem_sparse_scan() {
    let c: sss::Config = config("");
    let sim = |c: &sss::Config| StemSimulator::new(c.instrument_config(), 0).unwrap();
    run(
        "StemSparseScan",
        sss::StemSparseScan::new(c.clone(), sim(&c)),
        sss::StemSparseScan::new(c.clone(), Blind::new(sim(&c))),
        2,
        true,
    );
}
