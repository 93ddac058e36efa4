//! Exposures of the full STEM simulator checked against each other and against closed forms
//! (issue 15 §1): a point exposure sees the frames' effective probe (probe intensity, chromatic
//! spread and Gaussian source blur) in its counts, its EELS composition and its knock-on dose;
//! raster frames drive beam-driven dopant hops at the putting-dune rate integrated over the
//! dwell positions; knock-on sputtering removes only the exit-surface atom of each column.

use rand::Rng;
use scopegym_physics::constants::ELEMENTARY_CHARGE;
use scopegym_physics::instrument::{ScanSettings, StemInstrument};
use scopegym_physics::param::Param;
use scopegym_physics::rng::seeded;
use scopegym_physics::stem::damage::sputter;
use scopegym_physics::stem::specimen::{
    Atom, ContaminationConfig, Crystal, DopantConfig, Specimen, SpecimenConfig,
};
use scopegym_physics::stem::{StemConfig, StemSimulator};

const ANGSTROM: f64 = 1e-10;

/// No scan distortions, no shot noise, no damage: graphene with a Si dopant at the centre,
/// `pixels²` pixels of `dx` (m).
fn quiet(pixels: usize, dx: f64) -> StemConfig {
    let mut cfg = StemConfig::default().without_scan_distortions();
    cfg.scan.pixels = [pixels, pixels];
    cfg.scan.pixel_size = Param::fixed(dx);
    cfg.detector.shot_noise = false;
    cfg.damage.sputtering = false;
    cfg.damage.dopant_hops = false;
    cfg.specimen.dopants = vec![DopantConfig::default()];
    cfg
}

/// Lab position (m) of pixel `(r, c)` of the scan `sc`.
fn pixel_position(sc: &ScanSettings, r: usize, c: usize) -> [f64; 2] {
    [
        sc.center[0] + (c as f64 - 0.5 * (sc.cols as f64 - 1.0)) * sc.pixel_size,
        sc.center[1] + (r as f64 - 0.5 * (sc.rows as f64 - 1.0)) * sc.pixel_size,
    ]
}

/// Largest relative difference between the expected point counts (noiseless `acquire_point`
/// with the frame's dwell) and the noiseless frame at a grid of interior pixels (relative to the
/// pixel's value, floored at 5 % of the frame's maximum).
fn point_vs_frame(cfg: StemConfig) -> f64 {
    let mut sim = StemSimulator::new(cfg, 3).unwrap();
    sim.acquire_frame().unwrap();
    let frame = sim.last_noiseless().to_owned();
    let sc = sim.scan_settings();
    let max = frame.iter().fold(0.0f32, |m, &v| m.max(v)) as f64;
    let n = sc.rows;
    let mut worst = 0.0f64;
    for r in (n / 4..3 * n / 4).step_by(3) {
        for c in (n / 4..3 * n / 4).step_by(3) {
            sim.move_probe(pixel_position(&sc, r, c)).unwrap();
            let point = sim.acquire_point(sc.dwell_time).unwrap();
            let f = f64::from(frame[[r, c]]);
            worst = worst.max((point - f).abs() / f.max(0.05 * max));
        }
    }
    worst
}

#[test]
fn point_counts_equal_the_frame_counts_at_the_same_positions() {
    // A 1 Å source (4 pixels): the unblurred probe would put several times the counts on an
    // atom that the frame shows.
    let mut cfg = quiet(40, 0.25 * ANGSTROM);
    cfg.optics.source_size = Param::fixed(ANGSTROM);
    let worst = point_vs_frame(cfg);
    assert!(
        worst < 0.015,
        "source blur: worst relative difference {worst}"
    );
    // An asymmetric probe (axial coma) with chromatic spread and the default 0.35 Å source: the
    // point exposure and the frame see each atom through the same effective probe, with the
    // same orientation.
    let mut cfg = quiet(48, 0.1 * ANGSTROM);
    cfg.optics.c21 = Param::fixed(60e-9);
    cfg.optics.phi21 = Param::fixed(0.5);
    cfg.optics.energy_spread = Param::fixed(0.6);
    let worst = point_vs_frame(cfg);
    assert!(worst < 0.015, "coma: worst relative difference {worst}");
    // Coarse pixels (1 Å, as StemSparseScan) with contamination and the default source, 0.35
    // pixel: there the frames' blur is band-limited and rings (taps of alternating sign, under
    // 0.5 % each, reaching across the padded grid), which a point keeps out to 6 pixels only;
    // measured 1.6 % (1.0 % without contamination).
    let mut cfg = quiet(32, ANGSTROM);
    cfg.specimen.contamination = Some(ContaminationConfig::default());
    let worst = point_vs_frame(cfg);
    assert!(
        worst < 0.025,
        "coarse pixels: worst relative difference {worst}"
    );
}

#[test]
fn frames_see_each_atom_through_the_probe_intensity_at_its_offset() {
    // One atom under a comatic probe and no source blur: with the beam at b the atom at a
    // receives the probe intensity P(a − b), so the frame around the atom is the probe kernel
    // (intensity about the probe centre) reflected through the atom.
    let mut cfg = quiet(48, 0.1 * ANGSTROM);
    cfg.optics.source_size = Param::fixed(0.0);
    cfg.optics.c21 = Param::fixed(80e-9);
    cfg.optics.phi21 = Param::fixed(0.3);
    let mut sim = StemSimulator::new(cfg.clone(), 1).unwrap();
    let sc = sim.scan_settings();
    let (r0, c0) = (24, 24);
    let a = pixel_position(&sc, r0, c0);
    sim.specimen_mut().atoms = vec![Atom {
        x: a[0],
        y: a[1],
        height: 0.0,
        z: 14,
    }];
    sim.acquire_frame().unwrap();
    let frame = sim.last_noiseless().to_owned();
    let (side, kernel) = sim.probe_kernel();
    let kernel = kernel.to_vec();
    let c = side / 2;
    let n_px = cfg.beam.current.get() * sc.dwell_time / ELEMENTARY_CHARGE;
    let scale = n_px * cfg.detector.cross_sections()[14] / sc.pixel_size.powi(2);
    let peak = kernel.iter().fold(0.0f64, |m, &v| m.max(v)) * scale;
    let h = 8usize.min(c);
    let mut worst = 0.0f64;
    for i in 0..=2 * h {
        for j in 0..=2 * h {
            // Beam at pixel (r0 − di, c0 − dj): the atom sits at offset (+dj, +di) from it.
            let (di, dj) = (i as i64 - h as i64, j as i64 - h as i64);
            let (r, cc) = ((r0 as i64 - di) as usize, (c0 as i64 - dj) as usize);
            let k = kernel[(c as i64 + di) as usize * side + (c as i64 + dj) as usize];
            worst = worst.max((f64::from(frame[[r, cc]]) - k * scale).abs());
        }
    }
    assert!(
        worst < 2e-3 * peak,
        "frame differs from the probe at the atom's offset by {worst} (peak {peak})"
    );
}

#[test]
fn point_knock_on_dose_is_the_blurred_probe_and_the_point_dose_has_the_blurred_width() {
    // A carbon atom at 200 kV (above the knock-on threshold) under a parked beam, with a 1 Å
    // source: its sputtering probability is 1 − exp(−σ_d · n_e · P_eff(a − b)), P_eff the
    // effective probe density, which the noiseless frame of the atom measures:
    // frame(b) = N_px · σ_HAADF · P_eff(a − b).
    let mut cfg = quiet(40, 0.25 * ANGSTROM);
    cfg.optics.source_size = Param::fixed(ANGSTROM);
    cfg.optics.energy = Param::fixed(200e3);
    let mut reference = StemSimulator::new(cfg.clone(), 1).unwrap();
    let sc = reference.scan_settings();
    let (r0, c0) = (20, 20);
    let a = pixel_position(&sc, r0, c0);
    let atom = Atom {
        x: a[0],
        y: a[1],
        height: 0.0,
        z: 6,
    };
    reference.specimen_mut().atoms = vec![atom];
    reference.acquire_frame().unwrap();
    let frame = reference.last_noiseless().to_owned();
    let current = cfg.beam.current.get();
    let n_px = current * sc.dwell_time / ELEMENTARY_CHARGE;
    let density =
        |r: usize, c: usize| f64::from(frame[[r, c]]) / (n_px * cfg.detector.cross_sections()[6]);
    let sigma_d = cfg.damage.cross_sections(200e3)[6];
    assert!(sigma_d > 1e-30, "{sigma_d}");
    // Dwell for a probability of 1/2 with the beam on the atom.
    let t = std::f64::consts::LN_2 / (sigma_d * density(r0, c0)) * ELEMENTARY_CHARGE / current;
    let mut cfg_d = cfg.clone();
    cfg_d.damage.sputtering = true;
    let mut sim = StemSimulator::new(cfg_d, 2).unwrap();
    for (r, c) in [(r0, c0), (r0 + 3, c0 - 2)] {
        let p = -(-sigma_d * current * t / ELEMENTARY_CHARGE * density(r, c)).exp_m1();
        let trials = 1500;
        let mut hits = 0;
        for _ in 0..trials {
            sim.specimen_mut().atoms = vec![atom];
            sim.move_probe(pixel_position(&sc, r, c)).unwrap();
            sim.acquire_point(t).unwrap();
            hits += sim.last_damage().sputtered.len();
        }
        let frac = hits as f64 / trials as f64;
        let se = (p * (1.0 - p) / trials as f64).sqrt();
        assert!(
            (frac - p).abs() < 4.0 * se + 0.01,
            "beam at ({r}, {c}): sputtered {frac} vs 1 − exp(−σ n P_eff) = {p} ± {se}"
        );
    }

    // The dose a point exposure deposits is spread over the effective probe: per axis, the
    // probe's second moment plus the source variance σ².
    let mut cfg_w = cfg.clone();
    cfg_w.specimen.size = [Param::fixed(2e-9), Param::fixed(2e-9)];
    cfg_w.damage.dose_map_cell = Param::fixed(0.05 * ANGSTROM);
    let mut sim = StemSimulator::new(cfg_w, 4).unwrap();
    let (side, kernel) = sim.probe_kernel();
    let kc = (side / 2) as f64;
    let probe_var_x: f64 = kernel
        .iter()
        .enumerate()
        .map(|(k, &v)| v * ((k % side) as f64 - kc).powi(2))
        .sum::<f64>()
        * sc.pixel_size.powi(2);
    let b = [0.3 * ANGSTROM, -0.2 * ANGSTROM];
    sim.move_probe(b).unwrap();
    sim.acquire_point(1e-3).unwrap();
    let m = sim.dose_map();
    let (mut w, mut vx, mut vy) = (0.0, 0.0, 0.0);
    for iy in 0..m.shape[1] {
        for ix in 0..m.shape[0] {
            let d = m.dose[iy * m.shape[0] + ix];
            // Bin centre in the (rotated) cell's coordinates, then in the lab.
            let size = m.period.size();
            let q = [
                -0.5 * size[0] + (ix as f64 + 0.5) * m.cell[0],
                -0.5 * size[1] + (iy as f64 + 0.5) * m.cell[1],
            ];
            let p = m.period.from_cell(q);
            let (x, y) = (p[0] - b[0], p[1] - b[1]);
            w += d;
            vx += d * x * x;
            vy += d * y * y;
        }
    }
    let expected = probe_var_x + ANGSTROM * ANGSTROM;
    for v in [vx / w, vy / w] {
        assert!(
            (v / expected - 1.0).abs() < 0.03,
            "dose variance {v} m² vs probe + source {expected} m²"
        );
    }
}

#[test]
fn frames_drive_dopant_hops_at_the_raster_integrated_putting_dune_rate() {
    let mut cfg = StemConfig::default().without_scan_distortions();
    cfg.specimen.dopants = vec![DopantConfig::default()];
    cfg.specimen.size = [Param::fixed(2e-9), Param::fixed(2e-9)];
    cfg.specimen.rotation = Param::fixed(0.2);
    cfg.damage.sputtering = false;
    cfg.detector.shot_noise = false;
    cfg.scan.pixels = [16, 16];
    let mut sim = StemSimulator::new(cfg.clone(), 0).unwrap();
    let original: Specimen = sim.specimen().clone();
    let si = original.indices_of(14)[0];
    let d = original.atoms[si];
    let hosts: Vec<Atom> = original
        .atoms
        .iter()
        .filter(|a| a.z == 6 && (a.x - d.x).hypot(a.y - d.y) < 1.6 * ANGSTROM)
        .copied()
        .collect();
    assert_eq!(hosts.len(), 3);
    // DESIGN.md §4: toward neighbour j the rate is k₀ (I/I₀) exp(−|b − μ_j|²/(2s²)), μ_j 0.85 Å
    // from the Si toward j, s² = 0.1 Å², k₀ = ln2/3 s⁻¹ at I₀ = 100 pA.
    let mu: Vec<[f64; 2]> = hosts
        .iter()
        .map(|n| {
            let len = (n.x - d.x).hypot(n.y - d.y);
            [
                d.x + 0.85 * ANGSTROM * (n.x - d.x) / len,
                d.y + 0.85 * ANGSTROM * (n.y - d.y) / len,
            ]
        })
        .collect();
    let current = cfg.beam.current.get();
    let rate = |j: usize, b: [f64; 2]| {
        let r2 = (b[0] - mu[j][0]).powi(2) + (b[1] - mu[j][1]).powi(2);
        std::f64::consts::LN_2 / 3.0 * (current / 100e-12) * (-r2 / (2.0 * 0.1e-20)).exp()
    };
    // A 16² raster of 0.2 Å pixels centred near μ₀: neighbour 0's rate profile lies inside, the
    // other two are cut by the frame's edge.
    let mut sc = sim.scan_settings();
    sc.rows = 16;
    sc.cols = 16;
    sc.pixel_size = 0.2 * ANGSTROM;
    sc.flyback_time = 1e-3;
    sc.center = [mu[0][0] + 0.13 * ANGSTROM, mu[0][1] - 0.07 * ANGSTROM];
    // Dwell for an integrated hazard of 0.8 over the raster.
    let total: f64 = (0..16 * 16)
        .map(|k| {
            (0..3)
                .map(|j| rate(j, pixel_position(&sc, k / 16, k % 16)))
                .sum::<f64>()
        })
        .sum();
    sc.dwell_time = 0.8 / total;
    sim.configure_scan(&sc).unwrap();
    // The first hop of a chain with rates constant over each dwell: in time order, pixel k ends
    // the no-hop run with probability S_k − S_{k+1} (S the survival), split by rate.
    let mut first = [0.0; 3];
    let mut survival = 1.0;
    for k in 0..16 * 16 {
        let b = pixel_position(&sc, k / 16, k % 16);
        let r: Vec<f64> = (0..3).map(|j| rate(j, b)).collect();
        let rt: f64 = r.iter().sum();
        let next = survival * (-rt * sc.dwell_time).exp();
        for j in 0..3 {
            first[j] += (survival - next) * r[j] / rt;
        }
        survival = next;
    }
    assert!((survival - (-0.8f64).exp()).abs() < 1e-9);
    let trials = 2000;
    let mut hopped = 0usize;
    let mut to = [0usize; 3];
    for _ in 0..trials {
        *sim.specimen_mut() = original.clone();
        sim.acquire_frame().unwrap();
        let hops = sim.last_damage().hops.clone();
        if hops.is_empty() {
            continue;
        }
        hopped += 1;
        assert_eq!(hops[0].from, [d.x, d.y]);
        let j = hosts
            .iter()
            .position(|n| [n.x, n.y] == hops[0].to)
            .expect("the first hop goes to a neighbour of the Si");
        to[j] += 1;
        // Ground truth follows: one Si, at the last hop's destination; nothing created or lost.
        let s = sim.specimen();
        assert_eq!(s.atoms.len(), original.atoms.len());
        let sis = s.indices_of(14);
        assert_eq!(sis.len(), 1);
        let last = hops[hops.len() - 1].to;
        assert_eq!([s.atoms[sis[0]].x, s.atoms[sis[0]].y], last);
        assert!(
            hops.iter()
                .all(|h| h.time >= 0.0 && h.time <= sc.frame_time())
        );
    }
    let n = trials as f64;
    let p = 1.0 - (-0.8f64).exp();
    let se = (p * (1.0 - p) / n).sqrt();
    let frac = hopped as f64 / n;
    assert!(
        (frac - p).abs() < 4.0 * se,
        "frames with a hop: {frac} vs 1 − exp(−∫rate) = {p} ± {se}"
    );
    for j in 0..3 {
        let f = to[j] as f64 / n;
        let se = (first[j] * (1.0 - first[j]) / n).sqrt();
        assert!(
            (f - first[j]).abs() < 4.0 * se + 0.005,
            "first hop to neighbour {j}: {f} vs {} ± {se}",
            first[j]
        );
    }
}

/// Atoms at the projected position `(x, y)` (m) with the given heights (m), in that order.
fn column(x: f64, y: f64, heights: &[f64], z: u8) -> Vec<Atom> {
    heights
        .iter()
        .map(|&h| Atom { x, y, height: h, z })
        .collect()
}

#[test]
fn a_column_loses_atoms_from_the_exit_surface_only() {
    // Four carbon atoms stacked along the beam (listed out of height order, the projected
    // positions 0.05 Å apart) and a lone atom. With σ·D = 1.5 per exposure the removals of a
    // column form a Poisson process in the delivered dose that stops when the column is empty:
    // the number removed is min(Poisson(1.5), 4), always the atoms furthest along the beam.
    let mut stack = column(0.0, 0.0, &[1e-10, 3e-10, 0.0, 2e-10], 6);
    stack[1].x += 0.05e-10;
    stack[3].y -= 0.05e-10;
    let mut atoms = stack.clone();
    atoms.extend(column(5e-10, 0.0, &[0.0], 6));
    let mut sig = [0.0; 93];
    sig[6] = 1e-28;
    let dose = 1.5 / 1e-28;
    let lam: f64 = 1.5;
    let mut pmf = [0.0; 5];
    let mut term = (-lam).exp();
    for (k, p) in pmf.iter_mut().enumerate().take(4) {
        *p = term;
        term *= lam / (k as f64 + 1.0);
    }
    pmf[4] = 1.0 - pmf[..4].iter().sum::<f64>();
    let trials = 4000;
    let mut counts = [0usize; 5];
    let mut lone = 0usize;
    let mut rng = seeded(7);
    for _ in 0..trials {
        let mut s = Specimen {
            atoms: atoms.clone(),
            cell: None,
        };
        let removed = sputter(&mut s, &sig, &mut rng, |_| dose);
        let from_stack: Vec<f64> = removed
            .iter()
            .filter(|a| a.x.abs() < 1e-11)
            .map(|a| a.height)
            .collect();
        lone += removed.len() - from_stack.len();
        let k = from_stack.len();
        counts[k] += 1;
        // The k removed are the k highest; the survivors are the lowest.
        let mut sorted = from_stack.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let top: Vec<f64> = [3e-10, 2e-10, 1e-10, 0.0][..k].to_vec();
        assert_eq!(sorted, top, "removed {from_stack:?}");
        let left: Vec<f64> = s
            .atoms
            .iter()
            .filter(|a| a.x.abs() < 1e-11)
            .map(|a| a.height)
            .collect();
        assert!(
            left.iter().all(|h| *h < 4e-10 - 1e-10 * k as f64),
            "{left:?}"
        );
    }
    let n = trials as f64;
    for k in 0..5 {
        let f = counts[k] as f64 / n;
        let se = (pmf[k] * (1.0 - pmf[k]) / n).sqrt();
        assert!(
            (f - pmf[k]).abs() < 4.0 * se,
            "{k} removed: {f} vs {} ± {se}",
            pmf[k]
        );
    }
    // The lone atom: 1 − exp(−σD).
    let p = 1.0 - (-lam).exp();
    let se = (p * (1.0 - p) / n).sqrt();
    assert!((lone as f64 / n - p).abs() < 4.0 * se, "{lone}");
}

#[test]
fn a_single_layer_sputters_atom_by_atom_with_probability_sigma_dose() {
    // Graphene, and one atom 5 Å above the plane far from the sheet (so the specimen is not
    // flat, but no atom is stacked on another): each atom is removed independently with
    // 1 − exp(−σD) ≈ σD (DESIGN.md §4), drawing one uniform per atom in the specimen's order,
    // exactly as before the depth rule.
    let cfg = SpecimenConfig::default();
    let mut base = cfg.build([3e-9, 3e-9], &mut seeded(0)).unwrap();
    base.atoms.extend(column(10e-9, 0.0, &[5e-10], 6));
    let mut sig = [0.0; 93];
    sig[6] = 1e-28;
    let dose = 0.05 / 1e-28;
    let p = -(-0.05f64).exp_m1();
    let mut removed_total = 0usize;
    let mut n_total = 0usize;
    for seed in 0..20 {
        let mut s = base.clone();
        let n0 = s.atoms.len();
        let removed = sputter(&mut s, &sig, &mut seeded(seed), |_| dose);
        // Reference: one uniform per atom in order, removed when below p.
        let mut rng = seeded(seed);
        let expected: Vec<Atom> = base
            .atoms
            .iter()
            .filter(|_| rng.random::<f64>() < p)
            .copied()
            .collect();
        assert_eq!(removed, expected);
        assert_eq!(s.atoms.len() + removed.len(), n0);
        removed_total += removed.len();
        n_total += n0;
    }
    let frac = removed_total as f64 / n_total as f64;
    let se = (p * (1.0 - p) / n_total as f64).sqrt();
    assert!((frac - p).abs() < 4.0 * se, "{frac} vs {p} ± {se}");
    assert!((p / 0.05 - 1.0).abs() < 0.03);
}

#[test]
fn a_thick_crystal_under_heavy_frames_loses_atoms_from_the_exit_side_only() {
    // fcc Al along [110], four cells thick (columns of 4 atoms), at 300 kV: per frame each
    // column inside the field loses min(Poisson(σ·dose), atoms left) atoms, from the exit side.
    let mut cfg = StemConfig::default().without_scan_distortions();
    cfg.specimen.crystal = Crystal::Fcc110;
    cfg.specimen.element = "Al".into();
    cfg.specimen.lattice_constant = Param::fixed(4.05e-10);
    cfg.specimen.thickness = 4;
    cfg.specimen.size = [Param::fixed(3e-9), Param::fixed(3e-9)];
    cfg.optics.energy = Param::fixed(300e3);
    cfg.damage.dopant_hops = false;
    cfg.detector.shot_noise = false;
    cfg.scan.pixels = [64, 64];
    cfg.scan.pixel_size = Param::fixed(0.25e-10);
    let sigma = cfg.damage.cross_sections(300e3)[13];
    assert!(sigma > 1e-31, "{sigma}");
    let lam = 0.5;
    let dx = cfg.scan.pixel_size.get();
    // Dose per frame = I·t/(e·dx²).
    cfg.scan.dwell_time = Param::fixed(lam / sigma * dx * dx * ELEMENTARY_CHARGE / 100e-12);
    let mut removed_first = 0usize;
    let mut columns_first = 0usize;
    for seed in 0..12 {
        let mut sim = StemSimulator::new(cfg.clone(), seed).unwrap();
        let original = sim.specimen().clone();
        let sc = sim.scan_settings();
        let [w, h] = sc.field_of_view();
        let inside = |a: &Atom| a.x.abs() < 0.5 * w && a.y.abs() < 0.5 * h;
        // Columns: atoms sharing a projected position.
        let mut cols: Vec<Vec<Atom>> = Vec::new();
        for a in &original.atoms {
            match cols
                .iter_mut()
                .find(|c| (c[0].x - a.x).hypot(c[0].y - a.y) < 0.1e-10)
            {
                Some(c) => c.push(*a),
                None => cols.push(vec![*a]),
            }
        }
        assert!(cols.iter().all(|c| c.len() == 4));
        for frame in 0..4 {
            sim.acquire_frame().unwrap();
            if frame == 0 {
                let lost = sim.last_damage().sputtered.len();
                removed_first += lost;
                columns_first += cols.iter().filter(|c| inside(&c[0])).count();
            }
            // In every column the survivors are the atoms nearest the entrance surface.
            let atoms = &sim.specimen().atoms;
            for c in &cols {
                let mut hs: Vec<f64> = c.iter().map(|a| a.height).collect();
                hs.sort_by(f64::total_cmp);
                let left = c.iter().filter(|a| atoms.contains(a)).count();
                for a in c {
                    let present = atoms.contains(a);
                    let rank = hs.iter().position(|h| *h == a.height).unwrap();
                    assert_eq!(present, rank < left, "column at ({}, {})", c[0].x, c[0].y);
                }
                if !inside(&c[0]) {
                    assert_eq!(left, 4);
                }
            }
        }
    }
    // First frame: E[min(Poisson(λ), 4)] atoms per column.
    let mut mean = 0.0;
    let mut term = (-lam).exp();
    let mut below = 0.0;
    for k in 0..4 {
        mean += k as f64 * term;
        below += term;
        term *= lam / (k as f64 + 1.0);
    }
    mean += 4.0 * (1.0 - below);
    let per_column = removed_first as f64 / columns_first as f64;
    // Poisson-like spread: variance ≈ mean per column.
    let se = (mean / columns_first as f64).sqrt();
    assert!(
        (per_column - mean).abs() < 4.0 * se,
        "{per_column} atoms per column in the first frame vs {mean} ± {se} ({columns_first} columns)"
    );
}

/// Issue 15 §2 (damage at 60-80 kV), contamination build-up: the deposit under a frame after
/// dose D is `rate × D` thick, and the next frame of an otherwise empty specimen shows its
/// background `N_e · σ_C · ρ · rate · D` per pixel (noiseless detector).
#[test]
fn contamination_grows_as_rate_times_dose_and_shows_as_background() {
    use scopegym_physics::stem::specimen::Crystal;
    let mut cfg = StemConfig::default().without_scan_distortions();
    cfg.scan.pixels = [32, 32];
    cfg.specimen.crystal = Crystal::None;
    cfg.detector.shot_noise = false;
    cfg.detector.gain = Param::fixed(2.0);
    let rate = 1e-34;
    cfg.damage.contamination_rate = Param::fixed(rate);
    let mut sim = StemSimulator::new(cfg.clone(), 3).unwrap();
    let first = sim.acquire_frame().unwrap();
    let (dose, epp) = (first.meta.dose, first.meta.electrons_per_pixel);
    assert!(first.image.iter().all(|&v| v == 0.0));
    let t = sim.contamination_thickness(0.0, 0.0);
    assert!(
        (t / (rate * dose) - 1.0).abs() < 1e-9,
        "{t} vs {}",
        rate * dose
    );
    let second = sim.acquire_frame().unwrap();
    let sigma_c = cfg.detector.cross_sections()[6];
    let want = 2.0 * epp * sigma_c * 1e29 * rate * dose;
    let centre = f64::from(second.image[[16, 16]]);
    assert!((centre / want - 1.0).abs() < 1e-5, "{centre} vs {want}");
    let t2 = sim.contamination_thickness(0.0, 0.0);
    assert!((t2 / (2.0 * rate * dose) - 1.0).abs() < 1e-9);
}

/// Beam-current fluctuation multiplies each pixel's expected counts by a factor of mean 1,
/// relative variance r² and correlation between neighbouring pixels (one dwell apart) of
/// `(exp(s²ρ) − 1)/(exp(s²) − 1)`, ρ = exp(−dwell/τ); off, frames are as before.
#[test]
fn current_fluctuation_scales_pixels_with_the_configured_statistics() {
    let mut cfg = StemConfig::default().without_scan_distortions();
    cfg.scan.pixels = [128, 128];
    cfg.detector.shot_noise = false;
    cfg.damage.sputtering = false;
    cfg.damage.dopant_hops = false;
    let plain: Vec<f64> = {
        let mut sim = StemSimulator::new(cfg.clone(), 5).unwrap();
        let f = sim.acquire_frame().unwrap();
        f.image.iter().map(|&v| f64::from(v)).collect()
    };
    let r: f64 = 0.1;
    let dwell = 4e-6;
    cfg.beam.current_fluctuation = Param::fixed(r);
    cfg.beam.current_correlation_time = Param::fixed(dwell);
    let mut sim = StemSimulator::new(cfg, 5).unwrap();
    let f = sim.acquire_frame().unwrap();
    let peak = plain.iter().fold(0.0f64, |m, v| m.max(*v));
    let ratio: Vec<Option<f64>> = f
        .image
        .iter()
        .zip(&plain)
        .map(|(&a, &b)| (b > 0.05 * peak).then(|| f64::from(a) / b))
        .collect();
    let vals: Vec<f64> = ratio.iter().flatten().copied().collect();
    let n = vals.len() as f64;
    assert!(n > 8000.0, "{n}");
    let mean = vals.iter().sum::<f64>() / n;
    let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let (mut cov, mut pairs) = (0.0, 0.0);
    for row in ratio.chunks_exact(128) {
        for w in row.windows(2) {
            if let (Some(a), Some(b)) = (w[0], w[1]) {
                cov += (a - mean) * (b - mean);
                pairs += 1.0;
            }
        }
    }
    let corr = cov / pairs / var;
    let s2 = (r * r).ln_1p();
    let rho = (-1.0f64).exp();
    let want = (s2 * rho).exp_m1() / s2.exp_m1();
    println!("mean {mean}, rel. var {var}, lag-1 {corr} vs {want}");
    assert!((mean - 1.0).abs() < 0.005, "{mean}");
    assert!((var / (r * r) - 1.0).abs() < 0.08, "{var}");
    assert!((corr - want).abs() < 0.04, "{corr} vs {want}");
}

/// Issue 15 §2 (damage at 60-80 kV): at 80 kV graphene's bulk (21.14 eV) survives a frame while
/// atoms beside vacancies (two bonds, 16.14 eV; one bond, 11.14 eV) are knocked out with
/// `1 − exp(−σ D)`, σ the smeared McKinley-Feshbach cross-section at their lower threshold;
/// without the under-coordinated table nothing goes.
#[test]
fn frames_at_80_kv_sputter_only_atoms_beside_vacancies() {
    use scopegym_physics::stem::damage::{UnderCoordinated, coordination};
    let mut cfg = StemConfig::default().without_scan_distortions();
    cfg.scan.pixels = [64, 64];
    cfg.optics.energy = Param::fixed(80e3);
    cfg.specimen.vacancies = Param::fixed(0.03);
    cfg.damage.dopant_hops = false;
    cfg.damage
        .displacement_energy
        .insert("C".into(), Param::fixed(21.14));
    // Amplified so that one frame removes a measurable share (bulk and edge alike).
    cfg.damage.cross_section_scale = Param::fixed(500.0);
    let mut plain = StemSimulator::new(cfg.clone(), 2).unwrap();
    let n0 = plain.specimen().atoms.len();
    plain.acquire_frame().unwrap();
    assert_eq!(
        plain.specimen().atoms.len(),
        n0,
        "bulk atoms sputtered at 80 kV"
    );

    cfg.damage
        .under_coordinated
        .insert("C".into(), UnderCoordinated::default());
    let knock = cfg.damage.knock_on(80e3);
    let sigma_edge = knock.sigma(6, 2);
    let (mut expected, mut var, mut trials) = (0.0, 0.0, 0);
    let mut removed_edge = 0;
    let mut removed = 0;
    for seed in 0..12 {
        let mut sim = StemSimulator::new(cfg.clone(), seed).unwrap();
        let before = sim.specimen().clone();
        let bonds = coordination(&before, 1.7e-10);
        let f = sim.acquire_frame().unwrap();
        let dose = f.meta.dose;
        let [w, h] = sim.scan_settings().field_of_view();
        for (a, &b) in before.atoms.iter().zip(&bonds) {
            let p = -(-knock.sigma(6, b) * dose).exp_m1();
            if b < 3 && a.x.abs() < 0.5 * w && a.y.abs() < 0.5 * h {
                expected += p;
                var += p * (1.0 - p);
                trials += 1;
            }
        }
        for a in &sim.last_damage().sputtered {
            let i = before.atoms.iter().position(|b| b == a).unwrap();
            removed += 1;
            if bonds[i] < 3 {
                removed_edge += 1;
            }
        }
    }
    println!(
        "σ_edge {sigma_edge:e} m²: removed {removed} ({removed_edge} under-coordinated) of {trials}, expected {expected:.1}"
    );
    assert_eq!(removed, removed_edge, "a three-fold atom went");
    assert!(trials > 40 && expected > 10.0, "{trials} {expected}");
    assert!(
        (removed as f64 - expected).abs() < 4.0 * var.sqrt() + 1.0,
        "{removed} vs {expected}"
    );
}

/// Point exposures, spectra and frames defer their dose until the dose map is read: the map
/// after many exposures (past the cap of deferred ones) equals, bit for bit, the one read after
/// every exposure (each added at once), and holds every electron delivered (frames:
/// electrons per pixel × pixels; points: I·t/e). With a contamination growth rate, a point's
/// counts see the deposit of every earlier exposure either way.
#[test]
fn deferred_doses_give_the_dose_map_of_immediate_ones() {
    for rate in [0.0, 1e-34] {
        let mut cfg = quiet(32, 0.2 * ANGSTROM);
        cfg.damage.contamination_rate = Param::fixed(rate);
        let run = |read_each: bool| {
            let mut sim = StemSimulator::new(cfg.clone(), 5).unwrap();
            let (mut electrons, mut counts) = (0.0, Vec::new());
            let mut rng = seeded(1);
            for i in 0..600 {
                if i % 100 == 0 {
                    let f = sim.acquire_frame().unwrap();
                    electrons += f.meta.electrons_per_pixel * f.image.len() as f64;
                } else {
                    let p = [
                        (rng.random::<f64>() - 0.5) * 6.0 * ANGSTROM,
                        (rng.random::<f64>() - 0.5) * 6.0 * ANGSTROM,
                    ];
                    sim.move_probe(p).unwrap();
                    let t = 1e-4 * (1.0 + (i % 3) as f64);
                    if i % 2 == 0 {
                        counts.push(sim.acquire_point(t).unwrap());
                    } else {
                        sim.acquire_spectrum(t).unwrap();
                    }
                    electrons += sim.beam_current() * t / ELEMENTARY_CHARGE;
                }
                if read_each {
                    sim.dose_map();
                }
            }
            (sim.dose_map().clone(), electrons, counts)
        };
        let ((deferred, electrons, c1), (immediate, _, c2)) = (run(false), run(true));
        assert!(
            deferred
                .dose
                .iter()
                .zip(&immediate.dose)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "rate {rate}"
        );
        assert_eq!(c1, c2, "rate {rate}");
        let total = deferred.total_electrons();
        assert!(
            (total / electrons - 1.0).abs() < 1e-9,
            "rate {rate}: {total} vs {electrons}"
        );
    }
}
