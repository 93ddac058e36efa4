//! The shipped SPM scenarios against the real PbTiO3 data and DESIGN.md §5: loop coercive
//! voltages, bimodal PFM phase, determinism.

use scopegym::scenario::{InstrumentConfig, Scenario};
use scopegym_physics::instrument::{PointSpectroscopy, SpmInstrument};
use scopegym_physics::spm::ferro::{loop_coercive, phase_clusters, triangle_waveform};
use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
use std::path::{Path, PathBuf};

fn scenario(name: &str) -> SpmConfig {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("scenarios/{name}.toml"));
    match Scenario::load(&p).expect("scenario loads").config {
        InstrumentConfig::Spm(c) => c,
        other => panic!("{name} is not an SPM scenario: {other:?}"),
    }
}

/// The shared real-data folder: `$SCOPEGYM_DATA_DIR`, else `../shared/data` beside the checkout.
fn data_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("SCOPEGYM_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: real data folder {} not found (set SCOPEGYM_DATA_DIR)",
            dir.display()
        );
        None
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn pfm_pto_film_loops_have_the_real_films_coercive_voltages() {
    // The real film (../shared/data/beps_pto_50x50.h5): about +4.6 V and -2.9 V.
    let mut sim = SpmSimulator::new(scenario("pfm_pto_film"), 3).unwrap();
    let pc = sim.config().pfm.clone();
    let one = triangle_waveform(pc.loop_amplitude.get(), pc.loop_points);
    let mut wave = one.clone();
    wave.extend_from_slice(&one);
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for (k, p) in [
        [-0.5e-6, -0.5e-6],
        [0.5e-6, -0.4e-6],
        [-0.3e-6, 0.6e-6],
        [0.45e-6, 0.5e-6],
        [0.0, 0.0],
    ]
    .into_iter()
    .enumerate()
    {
        let r = sim.point_spectroscopy(p, &wave).unwrap();
        let (up, down) = loop_coercive(&wave[one.len()..], &r[one.len()..]);
        let (up, down) = (up.expect("switches up"), down.expect("switches down"));
        println!("point {k}: coercive {up:+.2} V / {down:+.2} V");
        ups.push(up);
        downs.push(down);
    }
    let (up, down) = (median(ups), median(downs));
    println!("median coercive voltages {up:+.2} V / {down:+.2} V (real film +4.6 / -2.9 V)");
    assert!((up - 4.6).abs() < 1.0, "V+ = {up}");
    assert!((down + 2.9).abs() < 1.0, "V- = {down}");
}

#[test]
fn real_and_simulated_pfm_phase_images_are_bimodal() {
    let mut sim = SpmSimulator::new(scenario("pfm_pto_film"), 5).unwrap();
    let frame = sim.acquire_frame().unwrap();
    let phase = frame.channel("phase").expect("a PFM phase channel");
    assert_eq!(phase.units, "deg");
    let sim_c = phase_clusters(phase.image.iter().map(|&v| f64::from(v))).unwrap();
    println!("simulated: {sim_c:?}");
    assert!(sim_c.is_bimodal(), "simulated phase not bimodal: {sim_c:?}");
    let Some(dir) = data_dir() else { return };
    let file = hdf5::File::open(dir.join("pto_funakubo_0001.h5")).expect("real PFM scan opens");
    let ds = file
        .dataset("Measurement_000/Channel_3/Channel_3/Channel_3")
        .expect("PhaseRetrace channel");
    let real: Vec<f32> = ds.read_raw().expect("reads");
    assert_eq!(real.len(), 256 * 256);
    let real_c = phase_clusters(real.iter().map(|&v| f64::from(v))).unwrap();
    println!("real: {real_c:?}");
    assert!(real_c.is_bimodal(), "real phase not bimodal: {real_c:?}");
    // A negative control from the same data: the main state alone (phases within 60° of its
    // centre) is one state, not two.
    let main = real_c.centres[0];
    let one_state = real.iter().map(|&v| f64::from(v)).filter(|v| {
        let d = (v - main).rem_euclid(360.0);
        d.min(360.0 - d) < 60.0
    });
    assert!(!phase_clusters(one_state).unwrap().is_bimodal());
}

#[test]
fn every_spm_scenario_is_deterministic_and_seed_dependent() {
    for name in ["afm_terraces", "stm_ag111_adatoms", "pfm_pto_film"] {
        let mut cfg = scenario(name);
        // Small frames keep the test quick; the physics is the scenario's.
        cfg.scan.pixels = [32, 32];
        let frame = |seed: u64| {
            let mut sim = SpmSimulator::new(cfg.clone(), seed).unwrap();
            let f = sim.acquire_frame().unwrap();
            assert!(
                f.channels
                    .iter()
                    .all(|c| c.image.iter().all(|v| v.is_finite())),
                "{name}: non-finite values"
            );
            f.main().image.clone()
        };
        let (a, b, c) = (frame(1), frame(1), frame(2));
        assert_eq!(a, b, "{name}: same seed, different frames");
        assert_ne!(a, c, "{name}: different seeds, same frame");
    }
}
