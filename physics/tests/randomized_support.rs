//! Randomized parameters are valid over their whole support, not just at their centre: a
//! distribution that reaches invalid values is refused when the simulator is built (naming the
//! field), and the tails of a normal are redrawn, so no seed fails at reset.

use scopegym_physics::PhysicsError;
use scopegym_physics::param::Param;
use scopegym_physics::stem::dopant::{DopantSimConfig, DopantSimulator};
use scopegym_physics::stem::sim::{StemConfig, StemSimulator};

fn small_stem() -> StemConfig {
    let mut c = StemConfig::default();
    c.scan.pixels = [16, 16];
    c
}

fn field(e: &PhysicsError) -> &str {
    match e {
        PhysicsError::InvalidParameter { field, .. } => field,
        other => panic!("expected an invalid parameter, got {other}"),
    }
}

#[test]
fn a_uniform_reaching_invalid_values_is_refused_at_construction_for_every_seed() {
    // Centre 50 pA is valid, the lower end -50 pA is not: before, the seeds that drew a
    // positive current built a simulator and others failed later, at reset.
    let mut c = small_stem();
    c.beam.current = Param::uniform(-50e-12, 150e-12);
    for seed in 0..8 {
        let e = StemSimulator::new(c.clone(), seed).expect_err("must be refused");
        assert_eq!(field(&e), "beam.current", "{e}");
        assert!(e.to_string().contains("-5e-11"), "names the bad end: {e}");
    }
}

#[test]
fn normal_tails_are_redrawn_so_every_seed_resets() {
    // 100 ± 45 pA: 1.3 % of plain draws are <= 0 A, which the config refuses.
    let mut c = small_stem();
    c.beam.current = Param::Normal(100e-12, 45e-12, Default::default());
    let mut sim = StemSimulator::new(c, 0).unwrap();
    let mut below_mean = 0;
    let n = 600;
    for seed in 0..n {
        sim.reset(seed)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let i = sim.config().beam.current.get();
        assert!(i > 0.0 && i <= 1e-6, "seed {seed}: {i}");
        if i < 100e-12 {
            below_mean += 1;
        }
    }
    // Truncation removes ~1.3 % of the lower half: P(below the mean) = 0.4868/0.9868 = 0.493,
    // binomial sd over 600 draws ≈ 0.020.
    let p = f64::from(below_mean) / f64::from(n as u32);
    assert!((p - 0.493).abs() < 0.07, "fraction below the mean {p}");
}

#[test]
fn the_dopant_model_checks_the_support_and_redraws_tails() {
    let mut c = DopantSimConfig {
        current: Param::uniform(-10e-12, 60e-12),
        ..Default::default()
    };
    let e = DopantSimulator::new(c.clone(), 0).expect_err("must be refused");
    assert_eq!(field(&e), "current", "{e}");
    c.current = Param::Normal(50e-12, 22e-12, Default::default());
    let mut sim = DopantSimulator::new(c, 0).unwrap();
    for seed in 0..600 {
        sim.reset(seed)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}
