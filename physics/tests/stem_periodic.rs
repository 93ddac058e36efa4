//! Issue 15 §1: the STEM specimen is periodic, so a scan anywhere and a drift of any length image
//! material (the specimen used to end 2 nm beyond the field of view, and such frames were
//! silently vacuum).

use scopegym_physics::constants::ELEMENTARY_CHARGE;
use scopegym_physics::instrument::StemInstrument;
use scopegym_physics::param::Param;
use scopegym_physics::stem::{StemConfig, StemSimulator};

/// Graphene, 128² pixels of 0.2 Å (2.56 nm), no scan distortions, no shot noise, no damage.
fn config() -> StemConfig {
    let mut cfg = StemConfig::default().without_scan_distortions();
    cfg.scan.pixels = [128, 128];
    cfg.specimen.rotation = Param::fixed(0.2);
    cfg.detector.shot_noise = false;
    cfg.damage.sputtering = false;
    cfg.damage.dopant_hops = false;
    cfg
}

/// Mean counts per pixel and the density of atom columns (local maxima of the noiseless frame
/// above half its maximum, 3 pixels or more from the edge), 1/m².
fn frame_stats(sim: &mut StemSimulator) -> (f64, f64) {
    sim.acquire_frame().unwrap();
    let img = sim.last_noiseless().to_owned();
    let (rows, cols) = img.dim();
    let mean = img.iter().map(|&v| f64::from(v)).sum::<f64>() / (rows * cols) as f64;
    let max = img.iter().copied().fold(0.0f32, f32::max);
    let b = 3;
    let mut peaks = 0;
    for i in b..rows - b {
        for j in b..cols - b {
            let v = img[[i, j]];
            let is_max = v > 0.5 * max
                && (-1i64..=1).all(|di| {
                    (-1i64..=1).all(|dj| {
                        (di == 0 && dj == 0)
                            || v > img[[(i as i64 + di) as usize, (j as i64 + dj) as usize]]
                    })
                });
            peaks += usize::from(is_max);
        }
    }
    let px = sim.scan_settings().pixel_size;
    let area = ((rows - 2 * b) as f64 * px) * ((cols - 2 * b) as f64 * px);
    (mean, peaks as f64 / area)
}

/// A frame centred 10 fields of view away from the origin, and a frame after the specimen
/// drifted 33 nm (2000 s at 1 nm/min), image graphene like the centred frame: the same mean
/// counts and column density, which are the closed forms `N_e·σ_C·ρ` (∫P = 1, so the mean
/// expected counts are the electrons per pixel times the cross-section per area) and
/// `ρ = 4/(√3 a²)` = 38.2 nm⁻² (graphene, a = 2.46 Å). Tolerances: 1 % on the means (a 2.56 nm
/// frame holds about ten lattice periods, so its mean over a cut lattice differs from the
/// infinite-plane mean by a few tenths of a percent), 5 % on the column counts (columns on the
/// frame's border band are counted or not depending on the registry). The old specimen ended
/// 2 nm beyond the frame: both frames were vacuum (mean 0, no columns). The specimen does not
/// grow, and the dose of the far frame lands on the periodic dose map.
#[test]
fn far_scans_and_long_drifts_image_the_same_material() {
    let cfg = config();
    let a: f64 = 2.46e-10;
    let rho = 4.0 / (3f64.sqrt() * a * a);
    let electrons = 100e-12 * 4e-6 / ELEMENTARY_CHARGE;
    let expected_mean = electrons * 5e-23 * rho;

    let mut sim = StemSimulator::new(cfg.clone(), 3).unwrap();
    let n_atoms = sim.specimen().atoms.len();
    let centred = frame_stats(&mut sim);
    // 10 fields of view away along x and 7 along −y.
    let mut scan = sim.scan_settings();
    let fov = scan.field_of_view()[0];
    scan.center = [10.0 * fov, -7.0 * fov];
    sim.configure_scan(&scan).unwrap();
    let before = sim.dose_map().total_electrons();
    let under_before = sim.dose_map().at(scan.center[0], scan.center[1]);
    let far = frame_stats(&mut sim);
    // The far frame's dose lands on the specimen region it scanned (periodic dose map).
    let frame_electrons = electrons * (scan.rows * scan.cols) as f64;
    let added = sim.dose_map().total_electrons() - before;
    assert!(
        (added / frame_electrons - 1.0).abs() < 1e-9,
        "{added} vs {frame_electrons}"
    );
    let dose = electrons / (scan.pixel_size * scan.pixel_size);
    // (The specimen region under it may have had the centred frame's dose already: the cell
    // repeats every few nm.)
    let under = sim.dose_map().at(scan.center[0], scan.center[1]) - under_before;
    assert!((under / dose - 1.0).abs() < 1e-6, "{under} vs {dose}");

    // A long drift: 1 nm/min for 2000 s (two parked 1000 s exposures off to the side).
    let mut dcfg = cfg.clone();
    dcfg.drift.speed = Param::fixed(1e-9 / 60.0);
    dcfg.drift.direction = Param::fixed(2.0);
    let mut drifted = StemSimulator::new(dcfg, 3).unwrap();
    let c = drifted.scan_settings().center;
    for _ in 0..2 {
        drifted.move_probe([c[0] + 0.9 * fov, c[1]]).unwrap();
        drifted.acquire_point(1000.0).unwrap();
    }
    let d = drifted.drift_offset();
    assert!(d[0].hypot(d[1]) > 30e-9, "{d:?}");
    let after_drift = frame_stats(&mut drifted);

    let rel = |x: f64, y: f64| (x / y - 1.0).abs();
    println!(
        "expected mean {expected_mean:.4}, density {:.2}/nm²; centred {centred:?}, far {far:?}, \
         drifted {after_drift:?}",
        rho * 1e-18
    );
    for (name, (mean, density)) in [("centred", centred), ("far", far), ("drifted", after_drift)] {
        assert!(
            rel(mean, expected_mean) < 0.01 && rel(mean, centred.0) < 0.01,
            "{name}: mean {mean} counts, expected {expected_mean} (centred {})",
            centred.0
        );
        assert!(
            rel(density, rho) < 0.05 && rel(density, centred.1) < 0.05,
            "{name}: {density} columns/m², expected {rho} (centred {})",
            centred.1
        );
    }
    // Memory is bounded: the specimen is still one cell.
    assert_eq!(sim.specimen().atoms.len(), n_atoms);
    assert_eq!(drifted.specimen().atoms.len(), n_atoms);
}

/// A column straddling the cell edge appears on both sides: a frame centred on the cell's
/// corner (where four cells meet) equals, pixel for pixel, a frame centred on the origin of a
/// specimen translated by the period, and has the bulk mean (no seam of vacuum or doubled
/// columns at the edge: the mean over the corner frame matches `N_e·σ_C·ρ` within 1 %).
#[test]
fn a_frame_across_the_cell_edge_shows_no_seam() {
    let mut cfg = config();
    cfg.scan.pixels = [96, 96];
    let mut sim = StemSimulator::new(cfg, 1).unwrap();
    let cell = sim.specimen().cell.unwrap();
    let [l1, l2] = cell.size();
    let corner = cell.from_cell([0.5 * l1, 0.5 * l2]);
    let mut scan = sim.scan_settings();
    scan.center = corner;
    sim.configure_scan(&scan).unwrap();
    sim.acquire_frame().unwrap();
    let at_corner = sim.last_noiseless().to_owned();
    // The same place one period further along both axes.
    let [p1, p2] = cell.periods();
    scan.center = [corner[0] + p1[0] + p2[0], corner[1] + p1[1] + p2[1]];
    sim.configure_scan(&scan).unwrap();
    sim.acquire_frame().unwrap();
    let shifted = sim.last_noiseless().to_owned();
    let peak = at_corner.iter().copied().fold(0.0f32, f32::max);
    let dev = at_corner
        .iter()
        .zip(&shifted)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(peak > 1.0 && dev < 1e-3 * peak, "{dev} of {peak}");
    // The seam adds or loses no atoms: the frame has the bulk mean.
    let a: f64 = 2.46e-10;
    let rho = 4.0 / (3f64.sqrt() * a * a);
    let electrons = 100e-12 * 4e-6 / ELEMENTARY_CHARGE;
    let expected = electrons * 5e-23 * rho;
    let mean = at_corner.iter().map(|&v| f64::from(v)).sum::<f64>() / at_corner.len() as f64;
    println!("corner frame mean {mean:.4}, expected {expected:.4}; max |Δ| {dev} of {peak}");
    assert!((mean / expected - 1.0).abs() < 0.01, "{mean} vs {expected}");
}

/// The dose map is periodic on the specimen cell, also when the cell is rotated: a rectangle
/// larger than the cell and far from the origin adds exactly `dose × area` electrons (clipped
/// bins plus wrapped ones), a Gaussian spot adds its electrons, and the map reads the same dose
/// one period away. A rectangle tiling the cell exactly (its own period translates) leaves the
/// map uniform.
#[test]
fn dose_map_is_periodic_on_a_rotated_cell() {
    use scopegym_physics::stem::damage::DoseMap;
    use scopegym_physics::stem::specimen::Supercell;
    let cell = Supercell::new([2.1e-9, 1.4e-9], 0.4);
    let mut m = DoseMap::new(cell, 1e-10);
    let (x0, y0) = (37.3e-9, -12.9e-9);
    m.add_rect(x0, x0 + 5e-9, y0, y0 + 3e-9, 1e20);
    let total = m.total_electrons();
    let expected = 1e20 * 15e-18;
    assert!(
        (total / expected - 1.0).abs() < 1e-9,
        "{total} vs {expected}"
    );
    m.add_gaussian(-81e-9, 4e-9, 0.4e-10, 5000.0);
    assert!((m.total_electrons() - total - 5000.0).abs() < 1e-6);
    let [p1, p2] = cell.periods();
    for &(x, y) in &[(38.0e-9, -11.0e-9), (0.3e-9, 0.2e-9), (-81e-9, 4e-9)] {
        let a = m.at(x, y);
        let b = m.at(x + 3.0 * p1[0] - 2.0 * p2[0], y + 3.0 * p1[1] - 2.0 * p2[1]);
        assert_eq!(a, b);
    }
    // The cell's own rectangle, in an unrotated cell: every bin gets exactly the dose.
    let flat = Supercell::new([2.1e-9, 1.4e-9], 0.0);
    let mut u = DoseMap::new(flat, 1e-10);
    u.add_rect(5.0e-9, 7.1e-9, 1.0e-9, 2.4e-9, 1e20);
    assert!(u.dose.iter().all(|d| (d / 1e20 - 1.0).abs() < 1e-9));
}
