//! Scan-system distortions seen in frames (issue 15 §2, scan systems): a lattice imaged with a
//! scale error or a rotation of the raster shows its FFT peaks where the closed form puts them,
//! and the identity leaves frames bit for bit as they were.

use scopegym_physics::instrument::StemInstrument;
use scopegym_physics::param::Param;
use scopegym_physics::stem::scan::ScanDistortion;
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
