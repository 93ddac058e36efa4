//! Scan-system distortions seen in frames (issue 15 §2, scan systems): a lattice imaged with a
//! scale error or a rotation of the raster shows its FFT peaks where the closed form puts them,
//! and the identity leaves frames bit for bit as they were.

use scopegym_physics::instrument::StemInstrument;
use scopegym_physics::param::Param;
use scopegym_physics::stem::scan::ScanDistortion;
use scopegym_physics::stem::specimen::{DopantConfig, Specimen};
use scopegym_physics::stem::{StemConfig, StemSimulator};
use std::f64::consts::PI;

const N: usize = 128;

/// A noiseless 128² frame of default graphene (0.2 Å pixels) with the given distortion.
fn frame(sd: ScanDistortion) -> Vec<f64> {
    let mut cfg = StemConfig::default().without_scan_distortions();
    cfg.scan.pixels = [N, N];
    cfg.detector.shot_noise = false;
    cfg.damage.sputtering = false;
    cfg.damage.dopant_hops = false;
    cfg.scan_distortion = sd;
    let mut sim = StemSimulator::new(cfg, 1).unwrap();
    let f = sim.acquire_frame().unwrap();
    f.image.iter().map(|&v| f64::from(v)).collect()
}

/// |DTFT|² of the mean-subtracted, Hann-windowed image at (kx, ky), cycles per pixel.
fn power(img: &[f64], k: [f64; 2]) -> f64 {
    let mean = img.iter().sum::<f64>() / img.len() as f64;
    let hann = |i: usize| 0.5 - 0.5 * (2.0 * PI * (i as f64 + 0.5) / N as f64).cos();
    let (mut re, mut im) = (0.0, 0.0);
    for i in 0..N {
        let (mut rr, mut ri) = (0.0, 0.0);
        for j in 0..N {
            let v = (img[i * N + j] - mean) * hann(j);
            let (s, c) = (2.0 * PI * k[0] * j as f64).sin_cos();
            rr += v * c;
            ri -= v * s;
        }
        let w = hann(i);
        let (s, c) = (2.0 * PI * k[1] * i as f64).sin_cos();
        re += w * (rr * c + ri * s);
        im += w * (ri * c - rr * s);
    }
    re * re + im * im
}

/// The strongest FFT peak with 0.07 < |k| < 0.12 cycles/pixel (graphene's {100} at 0.094) and
/// ky > 0, refined to 1e-4 bin by pattern search on the continuous transform.
fn peak(img: &[f64]) -> [f64; 2] {
    let bin = 1.0 / N as f64;
    let mut best = ([0.0, 0.0], f64::NEG_INFINITY);
    for a in 1..N / 2 {
        for b in -(N as i64) / 2..(N as i64) / 2 {
            let k = [b as f64 * bin, a as f64 * bin];
            let r = k[0].hypot(k[1]);
            if !(0.07..0.12).contains(&r) {
                continue;
            }
            let p = power(img, k);
            if p > best.1 {
                best = (k, p);
            }
        }
    }
    let (mut k, mut p) = best;
    let mut step = 0.5 * bin;
    while step > 1e-4 * bin {
        let mut moved = false;
        for d in [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]] {
            let q = [k[0] + d[0] * step, k[1] + d[1] * step];
            let pq = power(img, q);
            if pq > p {
                (k, p, moved) = (q, pq, true);
            }
        }
        if !moved {
            step *= 0.5;
        }
    }
    k
}

/// A scale error s (both axes) makes the beam travel (1 + s) times the nominal distance: the
/// lattice's apparent period shrinks by 1/(1 + s), its FFT peak moves out by (1 + s), same
/// direction.
#[test]
fn scale_error_moves_the_lattice_peak_by_one_plus_s() {
    let s = 0.02;
    let k0 = peak(&frame(ScanDistortion::default()));
    let k1 = peak(&frame(ScanDistortion {
        scale: [Param::fixed(s), Param::fixed(s)],
        ..Default::default()
    }));
    let (r0, r1) = (k0[0].hypot(k0[1]), k1[0].hypot(k1[1]));
    println!("peaks {k0:?} -> {k1:?}, period ratio {}", r0 / r1);
    assert!(
        (r0 / r1 - 1.0 / (1.0 + s)).abs() < 0.05 * s,
        "period ratio {} vs {}",
        r0 / r1,
        1.0 / (1.0 + s)
    );
    let turn = (k1[1].atan2(k1[0]) - k0[1].atan2(k0[0])).abs();
    assert!(turn < 1e-3, "{turn}");
}

/// A scan rotation θ (the raster turned by θ over the specimen) turns the image's FFT peaks by
/// −θ and keeps their radius.
#[test]
fn scan_rotation_turns_the_lattice_peaks_by_minus_theta() {
    let theta = 0.02;
    let k0 = peak(&frame(ScanDistortion::default()));
    let k1 = peak(&frame(ScanDistortion {
        rotation: Param::fixed(theta),
        ..Default::default()
    }));
    let turn = k1[1].atan2(k1[0]) - k0[1].atan2(k0[0]);
    println!("peaks {k0:?} -> {k1:?}, turn {turn}");
    assert!(
        (turn + theta).abs() < 0.05 * theta,
        "turn {turn} vs {}",
        -theta
    );
    let (r0, r1) = (k0[0].hypot(k0[1]), k1[0].hypot(k1[1]));
    assert!((r1 / r0 - 1.0).abs() < 1e-3, "{r0} {r1}");
}

/// The identity distortion (any flyback time constant, zero amplitudes) leaves frames bit for
/// bit as without the section, with scan noise, jitter and drift on; a real one changes them.
#[test]
fn identity_distortion_gives_bit_identical_frames() {
    let run = |sd: ScanDistortion| {
        let mut cfg = StemConfig::default();
        cfg.scan.pixels = [48, 48];
        cfg.scan_distortion = sd;
        let mut sim = StemSimulator::new(cfg, 9).unwrap();
        (0..2)
            .flat_map(|_| {
                sim.acquire_frame()
                    .unwrap()
                    .image
                    .iter()
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<f32>>()
    };
    let plain = run(ScanDistortion::default());
    let identity = run(ScanDistortion {
        flyback_time_constant: Param::fixed(1e-6),
        ..Default::default()
    });
    assert!(
        plain
            .iter()
            .zip(&identity)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    let lagged = run(ScanDistortion {
        flyback_amplitude: Param::fixed(0.3e-10),
        flyback_time_constant: Param::fixed(1e-6),
        ..Default::default()
    });
    assert_ne!(plain, lagged);
}

/// A distortion that would move pixels beyond the rendered margin is refused, naming the field.
#[test]
fn too_large_a_distortion_is_refused() {
    let mut cfg = StemConfig::default();
    cfg.scan.pixels = [256, 256];
    cfg.scan_distortion.rotation = Param::fixed(0.1);
    let e = StemSimulator::new(cfg, 0).unwrap_err().to_string();
    assert!(e.contains("scan_distortion"), "{e}");
}

/// `R(θ)·p`, counter-clockwise.
fn rotate(theta: f64, p: [f64; 2]) -> [f64; 2] {
    let (s, c) = theta.sin_cos();
    [c * p[0] - s * p[1], s * p[0] + c * p[1]]
}

/// With a scan rotation, a frame's dose lands on the rotated footprint (dose map of 0.05 Å
/// bins): full dose 0.7 pixel inside the rotated square's edge where it sticks out of the
/// nominal one, none 0.7 pixel inside the nominal square's edge where the rotated one has turned
/// away (at all four edges); the unrotated frame doses the reverse. The electrons added are
/// rows · cols · electrons per pixel either way.
#[test]
fn a_rotated_scan_doses_the_rotated_footprint() {
    let theta = 0.06;
    let run = |rotation: f64| {
        let mut cfg = StemConfig::default().without_scan_distortions();
        cfg.scan.pixels = [64, 64];
        cfg.damage.sputtering = false;
        cfg.damage.dopant_hops = false;
        cfg.damage.dose_map_cell = Param::fixed(0.05e-10);
        cfg.scan_distortion.rotation = Param::fixed(rotation);
        let mut sim = StemSimulator::new(cfg, 2).unwrap();
        let meta = sim.acquire_frame().unwrap().meta;
        (sim.dose_map().clone(), meta, sim.scan_settings())
    };
    let (rotated, meta, sc) = run(theta);
    let (plain, _, _) = run(0.0);
    let dx = sc.pixel_size;
    let h = 32.0; // half side of the scanned square, pixels
    let electrons = 64.0 * 64.0 * meta.electrons_per_pixel;
    for m in [&rotated, &plain] {
        assert!((m.total_electrons() / electrons - 1.0).abs() < 1e-9);
    }
    let lab = |p: [f64; 2]| [sc.center[0] + p[0] * dx, sc.center[1] + p[1] * dx];
    for quarter in 0..4 {
        let q = |p: [f64; 2]| rotate(quarter as f64 * 0.5 * PI, p);
        // Inside the rotated square only: its edge point at y = −0.8 h, 0.7 pixel in.
        let a = q(rotate(theta, [h - 0.7, -0.8 * h]));
        let outside = |p: [f64; 2]| p[0].abs().max(p[1].abs()) > h + 0.5;
        assert!(outside(a), "{a:?}");
        // Inside the nominal square only: its edge point at y = +0.8 h, 0.7 pixel in.
        let b = q([h - 0.7, 0.8 * h]);
        assert!(outside(rotate(-theta, b)), "{b:?}");
        let [pa, pb] = [lab(a), lab(b)];
        let rel = |v: f64| v / meta.dose;
        assert!(
            (rel(rotated.at(pa[0], pa[1])) - 1.0).abs() < 1e-9,
            "{quarter}"
        );
        assert_eq!(rotated.at(pb[0], pb[1]), 0.0, "{quarter}");
        assert_eq!(plain.at(pa[0], pa[1]), 0.0, "{quarter}");
        assert!(
            (rel(plain.at(pb[0], pb[1])) - 1.0).abs() < 1e-9,
            "{quarter}"
        );
    }
}

/// The identity distortion leaves the dose map and beam-driven hops bit for bit as without it.
#[test]
fn identity_distortion_leaves_dose_and_hops_unchanged() {
    let run = |sd: ScanDistortion| {
        let mut cfg = StemConfig::default();
        cfg.scan.pixels = [32, 32];
        cfg.scan.pixel_size = Param::fixed(0.5e-10);
        cfg.scan.dwell_time = Param::fixed(0.05);
        cfg.beam.current = Param::fixed(1e-9);
        cfg.specimen.dopants = vec![DopantConfig::default()];
        cfg.damage.dopant_hops = true;
        cfg.scan_distortion = sd;
        let mut sim = StemSimulator::new(cfg, 5).unwrap();
        let mut hops = Vec::new();
        for _ in 0..3 {
            sim.acquire_frame().unwrap();
            hops.extend(sim.last_damage().hops.clone());
        }
        (sim.dose_map().clone(), hops, sim.specimen().clone())
    };
    let plain = run(ScanDistortion::default());
    let identity = run(ScanDistortion {
        flyback_time_constant: Param::fixed(1e-6),
        ..Default::default()
    });
    assert!(!plain.1.is_empty(), "the frames make hops to compare");
    assert_eq!(plain, identity);
}

/// Frames drive dopant hops along the distorted raster: with the scan rotated by θ = 0.2 rad
/// and the raster's corner pixel put on the peak μ of a hop's rate profile (just outside the
/// nominal raster; the corner and μ where the nominal raster sees the least), the fraction of 16² frames with a hop is 1 − exp(−H), H the putting-dune
/// rate (DESIGN.md §4) integrated over the rotated pixel positions (0.8 by the choice of
/// dwell), and 1 − exp(−H₀) over the nominal positions without the rotation (H₀ < 0.4).
#[test]
fn frames_drive_hops_along_the_rotated_raster() {
    const A: f64 = 1e-10;
    let theta = 0.2;
    let mut cfg = StemConfig::default().without_scan_distortions();
    cfg.specimen.dopants = vec![DopantConfig::default()];
    cfg.specimen.size = [Param::fixed(2e-9), Param::fixed(2e-9)];
    cfg.specimen.rotation = Param::fixed(0.2);
    cfg.damage.sputtering = false;
    cfg.detector.shot_noise = false;
    cfg.scan.pixels = [16, 16];
    cfg.beam.current = Param::fixed(5e-9);
    let sim = StemSimulator::new(cfg.clone(), 0).unwrap();
    let original: Specimen = sim.specimen().clone();
    let d = original.atoms[original.indices_of(14)[0]];
    let mu: Vec<[f64; 2]> = original
        .atoms
        .iter()
        .filter(|a| a.z == 6 && (a.x - d.x).hypot(a.y - d.y) < 1.6 * A)
        .map(|n| {
            let len = (n.x - d.x).hypot(n.y - d.y);
            [
                d.x + 0.85 * A * (n.x - d.x) / len,
                d.y + 0.85 * A * (n.y - d.y) / len,
            ]
        })
        .collect();
    assert_eq!(mu.len(), 3);
    let current = cfg.beam.current.get();
    let rate = |b: [f64; 2]| -> f64 {
        mu.iter()
            .map(|m| {
                let r2 = (b[0] - m[0]).powi(2) + (b[1] - m[1]).powi(2);
                std::f64::consts::LN_2 / 3.0
                    * (current / 100e-12)
                    * (-r2 / (2.0 * 0.1 * A * A)).exp()
            })
            .sum()
    };
    let dx = 0.5 * A;
    // Beam positions of pixel k of a raster centred on `center`, rotated by t or nominal (drift
    // off: specimen = lab coordinates).
    let pos = |k: usize, t: f64, center: [f64; 2]| {
        let r = rotate(
            t,
            [
                (k % 16) as f64 * dx - 7.5 * dx,
                (k / 16) as f64 * dx - 7.5 * dx,
            ],
        );
        [center[0] + r[0], center[1] + r[1]]
    };
    let sum = |t: f64, center: [f64; 2]| (0..256).map(|k| rate(pos(k, t, center))).sum::<f64>();
    // The rotated raster's corner on one of the profile peaks: the corner and peak where the
    // nominal raster sees the least of the rates.
    let mut best = (f64::INFINITY, [0.0; 2]);
    for m in &mu {
        for corner in [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]] {
            let c = rotate(theta, [7.5 * dx * corner[0], 7.5 * dx * corner[1]]);
            let center = [m[0] - c[0], m[1] - c[1]];
            let ratio = sum(0.0, center) / sum(theta, center);
            if ratio < best.0 {
                best = (ratio, center);
            }
        }
    }
    let center = best.1;
    let dwell = 0.8 / sum(theta, center);
    let h0 = 0.8 * best.0;
    assert!(h0 < 0.4, "nominal hazard {h0}");
    let fraction = |t: f64| {
        let mut c = cfg.clone();
        c.scan_distortion.rotation = Param::fixed(t);
        let mut sim = StemSimulator::new(c, 0).unwrap();
        let mut sc = sim.scan_settings();
        sc.pixel_size = dx;
        sc.dwell_time = dwell;
        sc.flyback_time = 1e-3;
        sc.center = center;
        sim.configure_scan(&sc).unwrap();
        let trials = 1500;
        let mut hopped = 0;
        for _ in 0..trials {
            *sim.specimen_mut() = original.clone();
            sim.acquire_frame().unwrap();
            if !sim.last_damage().hops.is_empty() {
                hopped += 1;
            }
        }
        (hopped as f64 / trials as f64, trials as f64)
    };
    for (t, h) in [(theta, 0.8), (0.0, h0)] {
        let (f, n) = fraction(t);
        let p = 1.0 - (-h).exp();
        let se = (p * (1.0 - p) / n).sqrt();
        println!("θ = {t}: frames with a hop {f} vs 1 − exp(−{h}) = {p} ± {se}");
        assert!(
            (f - p).abs() < 4.0 * se,
            "θ = {t}: frames with a hop {f} vs 1 − exp(−{h}) = {p} ± {se}"
        );
    }
}

/// Knock-on during a rotated frame removes atoms where the rotated scan put the dose, as the
/// dose map records it: with a cross-section so large that every atom the beam crosses goes,
/// the sputtered atoms fill the rotated square (none beyond it, some where it sticks out of the
/// nominal square) and the nominal square's corners the rotation turned away keep theirs.
#[test]
fn knock_on_during_a_rotated_frame_follows_the_rotated_footprint() {
    let theta = 0.06;
    let run = |rotation: f64| {
        let mut cfg = StemConfig::default().without_scan_distortions();
        cfg.scan.pixels = [64, 64];
        cfg.damage.dopant_hops = false;
        cfg.scan.pixel_size = Param::fixed(1e-10);
        cfg.damage
            .displacement_energy
            .insert("C".into(), Param::fixed(5.0));
        cfg.damage.cross_section_scale = Param::fixed(1e6);
        cfg.scan_distortion.rotation = Param::fixed(rotation);
        let mut sim = StemSimulator::new(cfg, 4).unwrap();
        sim.acquire_frame().unwrap();
        let sc = sim.scan_settings();
        // Sputtered atoms in pixels from the scan centre (lab axes), and in the scan's axes.
        let lab: Vec<[f64; 2]> = sim
            .last_damage()
            .sputtered
            .iter()
            .map(|a| {
                let p = sim.specimen().image_near([a.x, a.y], sc.center);
                [
                    (p[0] - sc.center[0]) / sc.pixel_size,
                    (p[1] - sc.center[1]) / sc.pixel_size,
                ]
            })
            .collect();
        let scan: Vec<[f64; 2]> = lab.iter().map(|&p| rotate(-rotation, p)).collect();
        (scan, lab)
    };
    let h = 32.0;
    let beyond = |p: &[f64; 2], m: f64| p[0].abs().max(p[1].abs()) > h + m;
    let (in_scan, in_lab) = run(theta);
    assert!(in_scan.len() > 1000, "{} sputtered", in_scan.len());
    // None beyond the rotated square (its frame), a hair's margin for the cell edges.
    let out: Vec<_> = in_scan.iter().filter(|p| beyond(p, 1e-6)).collect();
    assert!(
        out.is_empty(),
        "{} beyond the rotated square: {:?}",
        out.len(),
        &out[..out.len().min(3)]
    );
    // Some beyond the nominal square (where the rotated one sticks out by up to 1.9 px).
    let outside_nominal = in_lab.iter().filter(|p| beyond(p, 0.2)).count();
    assert!(outside_nominal >= 10, "{outside_nominal}");
    // The unrotated frame sputters nothing beyond the nominal square, and the corners the
    // rotation turned away (inside the nominal square, 0.2 px or more beyond the rotated one)
    // lose atoms only without the rotation.
    let (plain, _) = run(0.0);
    assert!(plain.iter().all(|p| !beyond(p, 1e-6)));
    let turned_away = |p: &[f64; 2]| !beyond(p, 0.0) && beyond(&rotate(-theta, *p), 0.2);
    let plain_there = plain.iter().filter(|p| turned_away(p)).count();
    let rotated_there = in_lab.iter().filter(|p| turned_away(p)).count();
    assert!(
        plain_there >= 10 && rotated_there == 0,
        "{plain_there} vs {rotated_there}"
    );
}
