//! Property tests of physics invariants: finite non-negative images, a dose map that only grows,
//! and damage that never creates atoms.

use proptest::prelude::*;
use scopegym_physics::instrument::StemInstrument;
use scopegym_physics::param::Param;
use scopegym_physics::stem::specimen::Crystal;
use scopegym_physics::stem::{StemConfig, StemSimulator};

fn config(
    px: usize,
    dx: f64,
    energy: f64,
    c10: f64,
    c12: f64,
    n: f64,
    crystal: Crystal,
) -> StemConfig {
    let mut c = StemConfig::default();
    c.scan.pixels = [px, px + 8];
    c.scan.pixel_size = Param::fixed(dx);
    c.optics.energy = Param::fixed(energy);
    c.optics.c10 = Param::fixed(c10);
    c.optics.c12 = Param::fixed(c12);
    c.detector.haadf_exponent = Param::fixed(n);
    c.specimen.crystal = crystal;
    c.specimen.dopants = if crystal == Crystal::Graphene {
        vec![Default::default()]
    } else {
        vec![]
    };
    c
}

fn crystal() -> impl Strategy<Value = Crystal> {
    prop_oneof![
        Just(Crystal::Graphene),
        Just(Crystal::Mos2),
        Just(Crystal::Srtio3),
        Just(Crystal::Fcc110)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn frames_are_finite_and_non_negative(
        px in 16usize..48, dx in 0.1e-10f64..0.5e-10, energy in 40e3f64..300e3,
        c10 in -10e-9f64..10e-9, c12 in 0.0f64..10e-9, n in 1.4f64..2.0, cr in crystal(), seed in any::<u64>(),
    ) {
        let mut sim = StemSimulator::new(config(px, dx, energy, c10, c12, n, cr), seed).unwrap();
        for _ in 0..2 {
            let f = sim.acquire_frame().unwrap();
            prop_assert!(f.image.iter().all(|v| v.is_finite() && *v >= 0.0));
            prop_assert!(sim.last_noiseless().iter().all(|v| v.is_finite() && *v >= 0.0));
        }
    }

    #[test]
    fn dose_map_only_grows_and_damage_never_creates_atoms(
        energy in 60e3f64..300e3, cr in crystal(), seed in any::<u64>(),
        ops in proptest::collection::vec((0u8..3, -0.5f64..0.5, -0.5f64..0.5, 0.01f64..2.0), 1..8),
    ) {
        let mut cfg = config(24, 0.3e-10, energy, 0.0, 0.0, 1.7, cr);
        cfg.damage.cross_section_scale = Param::fixed(1e3); // make damage frequent
        let mut sim = StemSimulator::new(cfg, seed).unwrap();
        let original: Vec<(u64, u64, u64)> = sim.specimen().atoms.iter().map(|a| (a.x.to_bits(), a.y.to_bits(), a.height.to_bits())).collect();
        let mut dose = sim.dose_map().dose.clone();
        let mut count = original.len();
        let mut clock = sim.clock();
        let fov = sim.scan_settings().field_of_view();
        for (kind, fx, fy, t) in ops {
            match kind {
                0 => { sim.acquire_frame().unwrap(); }
                1 => { sim.move_probe([fx * fov[0], fy * fov[1]]).unwrap(); sim.acquire_point(t).unwrap(); }
                _ => { sim.move_probe([fx * fov[0], fy * fov[1]]).unwrap(); sim.acquire_spectrum(t).unwrap(); }
            }
            let map = sim.dose_map();
            prop_assert!(map.dose.iter().zip(&dose).all(|(a, b)| a >= b));
            prop_assert!(map.total_electrons() > 0.0);
            dose = map.dose.clone();
            prop_assert!(sim.specimen().atoms.len() <= count);
            count = sim.specimen().atoms.len();
            prop_assert!(sim.clock() > clock);
            clock = sim.clock();
            for a in &sim.specimen().atoms {
                prop_assert!(original.contains(&(a.x.to_bits(), a.y.to_bits(), a.height.to_bits())));
            }
        }
    }
}
