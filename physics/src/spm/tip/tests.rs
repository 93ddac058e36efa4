//! Tests of the tip model as a whole: conditioning, wear and kernels seen through images.

use super::*;
use crate::error::PhysicsError;
use crate::param::Param;
use crate::rng::seeded;
use crate::rng::uniform;
use crate::spm::dilation::dilate;
use ndarray::Array2;
use proptest::prelude::*;

const NM: f64 = 1e-9;
const PI: f64 = std::f64::consts::PI;

/// Sparse Gaussian bumps (σ 0.3 nm, 0.3-1 nm tall) on a flat background, 0.25 nm pixels.
fn bumps(n: usize, count: usize, seed: u64) -> (Array2<f32>, f64) {
    let pixel = 0.25 * NM;
    let mut rng = seeded(seed);
    let sites: Vec<(f64, f64, f64)> = (0..count)
        .map(|_| {
            (
                uniform(&mut rng) * n as f64,
                uniform(&mut rng) * n as f64,
                (0.3 + 0.7 * uniform(&mut rng)) * NM,
            )
        })
        .collect();
    let sigma = 0.3 * NM;
    let s = Array2::from_shape_fn((n, n), |(i, j)| {
        let mut h = 0.0f64;
        for &(y, x, a) in &sites {
            let r2 = ((i as f64 - y).powi(2) + (j as f64 - x).powi(2)) * pixel * pixel;
            h = h.max(a * (-r2 / (2.0 * sigma * sigma)).exp());
        }
        h as f32
    });
    (s, pixel)
}

fn image_sharpness(surface: &Array2<f32>, pixel: f64, tip: &TipState) -> f64 {
    let relief = f64::from(surface.iter().cloned().fold(f32::MIN, f32::max));
    let kernel = tip.kernel(pixel, tip.kernel_side(pixel, relief)).unwrap();
    sharpness(dilate(surface.view(), &kernel).view())
}

fn field(e: PhysicsError) -> String {
    match e {
        PhysicsError::InvalidParameter { field, .. } => field,
        PhysicsError::InvalidArgument { argument, .. } => argument,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn sharpness_is_scale_invariant_and_falls_with_feature_width() {
    // Flat image: 0, finite.
    assert_eq!(sharpness(Array2::<f32>::from_elem((8, 8), 3.0).view()), 0.0);
    assert_eq!(sharpness(Array2::<f32>::zeros((1, 1)).view()), 0.0);
    // Checkerboard: every neighbour differs by 2σ → 4 + 4 over σ² = 1.
    let cb = Array2::from_shape_fn((16, 16), |(i, j)| if (i + j) % 2 == 0 { 1.0 } else { -1.0 });
    assert!((sharpness(cb.view()) - 8.0).abs() < 1e-12);
    // A sinusoid along x with period P pixels: ⟨(ΔI)²⟩/var = 2(1 - cos(2π/P)).
    for p in [8.0f64, 16.0, 32.0] {
        let img = Array2::from_shape_fn((4, 64), |(_, j)| {
            (std::f64::consts::TAU * j as f64 / p).sin() as f32
        });
        let expected = 2.0 * (1.0 - (std::f64::consts::TAU / p).cos());
        let got = sharpness(img.view());
        assert!(
            (got - expected).abs() < 0.02 * expected,
            "P={p}: {got} vs {expected}"
        );
        let scaled = img.mapv(|v| 7.0 * v - 2.0);
        assert!((sharpness(scaled.view()) - got).abs() < 1e-5 * got);
    }
    let mut nan = Array2::<f32>::zeros((4, 4));
    nan[[1, 1]] = f32::NAN;
    assert_eq!(sharpness(nan.view()), 0.0);
}

#[test]
fn blunter_tips_give_lower_sharpness() {
    let (surface, pixel) = bumps(64, 8, 5);
    let by_radius: Vec<f64> = [2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
        .iter()
        .map(|&r| image_sharpness(&surface, pixel, &TipState::sharp(r * NM).unwrap()))
        .collect();
    let by_flat: Vec<f64> = [0.0, 0.5, 1.0, 2.0]
        .iter()
        .map(|&a| {
            let tip = TipState::sharp(4.0 * NM)
                .unwrap()
                .with_flat_radius(a * NM)
                .unwrap();
            image_sharpness(&surface, pixel, &tip)
        })
        .collect();
    println!("sharpness by R {by_radius:?}, by flat radius {by_flat:?}");
    // (Much flatter apexes image the sparse bumps as plateaus that cover most of the field,
    // with edges as steep as the sharp tip's: the statistic cannot see that, see `sharpness`.)
    assert!(by_radius.windows(2).all(|w| w[1] < w[0]), "{by_radius:?}");
    assert!(by_flat.windows(2).all(|w| w[1] < w[0]), "{by_flat:?}");
}

#[test]
fn conditioning_changes_later_images() {
    // Margin: every Sharpened event raises the image sharpness by more than 3 %, every
    // Worsened event lowers it by more than 3 %.
    const MARGIN: f64 = 0.03;
    let (surface, pixel) = bumps(64, 8, 5);
    let cfg = TipConfig::default();
    let starts = [
        TipState::sharp(12.0 * NM).unwrap(),
        TipState::sharp(6.0 * NM)
            .unwrap()
            .with_second_apex(Some(SecondApex {
                offset: [1.5 * NM, -0.5 * NM],
                dz: 0.1 * NM,
            }))
            .unwrap(),
        TipState::sharp(5.0 * NM)
            .unwrap()
            .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
            .unwrap(),
        TipState::sharp(4.0 * NM)
            .unwrap()
            .with_flat_radius(1.0 * NM)
            .unwrap(),
    ];
    let (mut sharpened, mut worsened) = (0, 0);
    let mut smallest_gain = f64::INFINITY;
    let mut smallest_loss = f64::INFINITY;
    for (k, start) in starts.iter().enumerate() {
        let before = image_sharpness(&surface, pixel, start);
        for (a, action) in Conditioning::deepspm_actions().iter().enumerate() {
            let mut rng = seeded(1000 * k as u64 + a as u64);
            let (mut found_s, mut found_w) = (0, 0);
            for _ in 0..60 {
                if found_s >= 2 && found_w >= 2 {
                    break;
                }
                let mut tip = start.clone();
                match tip.condition(action, &cfg, &mut rng).unwrap() {
                    Outcome::Unchanged => assert_eq!(&tip, start),
                    Outcome::Sharpened if found_s < 2 => {
                        found_s += 1;
                        let after = image_sharpness(&surface, pixel, &tip);
                        smallest_gain = smallest_gain.min(after / before - 1.0);
                        assert!(
                            after > before * (1.0 + MARGIN),
                            "start {k}, {action:?}: sharpened {before} -> {after} ({tip:?})"
                        );
                    }
                    Outcome::Worsened if found_w < 2 => {
                        found_w += 1;
                        let after = image_sharpness(&surface, pixel, &tip);
                        smallest_loss = smallest_loss.min(1.0 - after / before);
                        assert!(
                            after < before * (1.0 - MARGIN),
                            "start {k}, {action:?}: worsened {before} -> {after} ({tip:?})"
                        );
                    }
                    _ => {}
                }
            }
            sharpened += found_s;
            worsened += found_w;
        }
    }
    println!(
        "{sharpened} sharpened (smallest gain {smallest_gain:.3}), {worsened} worsened \
         (smallest loss {smallest_loss:.3})"
    );
    assert!(sharpened >= 60 && worsened >= 60, "{sharpened} {worsened}");
}

#[test]
fn a_double_tip_images_one_bump_twice() {
    let pixel = 0.25 * NM;
    let n = 64;
    let sigma = 0.3 * NM;
    let surface = Array2::from_shape_fn((n, n), |(i, j)| {
        let r2 = ((i as f64 - 32.0).powi(2) + (j as f64 - 32.0).powi(2)) * pixel * pixel;
        (1.0 * NM * (-r2 / (2.0 * sigma * sigma)).exp()) as f32
    });
    // Ghost 3 nm (12 px) along +x and 1 nm (4 px) along +y, 0.2 nm lower.
    let d = SecondApex {
        offset: [3.0 * NM, 1.0 * NM],
        dz: 0.2 * NM,
    };
    let single = TipState::sharp(3.0 * NM).unwrap();
    let double = single.clone().with_second_apex(Some(d)).unwrap();
    for tip in [&double, &double.clone().with_flat_radius(0.2 * NM).unwrap()] {
        let side = tip.kernel_side(pixel, 1.0 * NM);
        let img = dilate(surface.view(), &tip.kernel(pixel, side).unwrap());
        let (peak, ghost, mid) = (img[[32, 32]], img[[36, 44]], img[[34, 38]]);
        // The ghost is a second local maximum, `dz` below the peak, with a valley between.
        assert!((f64::from(peak) - 1.0 * NM).abs() < 1e-12);
        assert!((f64::from(ghost) - 0.8 * NM).abs() < 0.01 * NM, "{ghost}");
        assert!(mid < ghost - 0.1 * NM as f32, "{mid} {ghost}");
        for (di, dj) in [(-1i64, 0i64), (1, 0), (0, -1), (0, 1)] {
            let v = img[[(36 + di) as usize, (44 + dj) as usize]];
            assert!(v < ghost, "ghost is not a local maximum");
        }
    }
    // The single tip images the bump once: nothing tall at the ghost position.
    let side = single.kernel_side(pixel, 1.0 * NM);
    let img = dilate(surface.view(), &single.kernel(pixel, side).unwrap());
    assert!(f64::from(img[[36, 44]]) < 0.2 * NM, "{}", img[[36, 44]]);
}

#[test]
fn probabilities_follow_the_stated_formula_and_the_frequencies_match() {
    let cfg = TipConfig::default();
    // The worked example of the module docs: clean R = 30 nm, dip 5 nm, 200 ms.
    let tip = TipState::sharp(30.0 * NM).unwrap();
    let [ps, pu, pw] = tip
        .probabilities(&Conditioning::dip(5.0 * NM), &cfg)
        .unwrap();
    let g = 1.0 - (-1.0f64 / 0.3).exp();
    let nb = 1.0 - (-54.0f64 / 3.0).exp();
    assert!((ps - 0.6 * g * (0.15 + 0.85 * nb)).abs() < 1e-12);
    assert!((pw - g * 0.4 * (1.0 - 0.5 * nb)).abs() < 1e-12);
    assert!((ps - 0.579).abs() < 1e-3 && (pw - 0.193).abs() < 1e-3);
    assert!((ps + pu + pw - 1.0).abs() < 1e-12);
    // A pulse of 4 V on a tip at R_min with an adsorbate: s = 0.5, n = 0.9,
    // R_eff = 3 nm = R_good so r = 1.
    let ads = TipState::sharp(2.0 * NM)
        .unwrap()
        .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
        .unwrap();
    let action = Conditioning::pulse(-4.0);
    let [ps, _, pw] = ads.probabilities(&action, &cfg).unwrap();
    let g = 1.0 - (-0.5f64 / 0.3).exp();
    assert!((ps - 0.6 * g * (0.15 + 0.85 * 0.9)).abs() < 1e-12);
    assert!((pw - g * 0.3 * 0.55).abs() < 1e-12);
    // Monte Carlo frequencies within 4.5 binomial standard deviations.
    let mut rng = seeded(77);
    let n = 20_000;
    let (mut ns, mut nw) = (0usize, 0usize);
    for _ in 0..n {
        match ads.clone().condition(&action, &cfg, &mut rng).unwrap() {
            Outcome::Sharpened => ns += 1,
            Outcome::Worsened => nw += 1,
            Outcome::Unchanged => {}
        }
    }
    for (count, p) in [(ns, ps), (nw, pw)] {
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        let f = count as f64 / n as f64;
        assert!((f - p).abs() < 4.5 * sd, "frequency {f} vs {p}");
    }
    // The ideal tip cannot be sharpened; no action always works.
    let ideal = TipState::sharp(2.0 * NM).unwrap();
    let worst = TipState::sharp(100.0 * NM)
        .unwrap()
        .with_second_apex(Some(SecondApex {
            offset: [1.0 * NM, 0.0],
            dz: 0.0,
        }))
        .unwrap()
        .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
        .unwrap();
    for action in Conditioning::deepspm_actions().iter().chain(&[
        Conditioning::Pulse {
            bias: 10.0,
            duration: 10.0,
        },
        Conditioning::Dip {
            depth: 10.0 * NM,
            bias: 0.0,
            duration: 10.0,
        },
    ]) {
        assert_eq!(ideal.probabilities(action, &cfg).unwrap()[0], 0.0);
        let p = worst.probabilities(action, &cfg).unwrap();
        assert!(p[0] <= 0.6 && p[2] > 0.0, "{action:?}: {p:?}");
    }
}

#[test]
fn bad_tips_improve_more_often_and_good_tips_worsen_more_often() {
    let cfg = TipConfig::default();
    let good = TipState::sharp(2.5 * NM).unwrap();
    assert!(good.is_good(&cfg));
    let bad = [
        TipState::sharp(20.0 * NM).unwrap(),
        TipState::sharp(2.5 * NM)
            .unwrap()
            .with_second_apex(Some(SecondApex {
                offset: [1.0 * NM, 1.0 * NM],
                dz: 0.1 * NM,
            }))
            .unwrap(),
        TipState::sharp(2.5 * NM)
            .unwrap()
            .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
            .unwrap(),
    ];
    let n = 4000;
    let freq = |tip: &TipState, action: &Conditioning, seed: u64| {
        let mut rng = seeded(seed);
        let mut c = [0usize; 3];
        for _ in 0..n {
            let k = match tip.clone().condition(action, &cfg, &mut rng).unwrap() {
                Outcome::Sharpened => 0,
                Outcome::Unchanged => 1,
                Outcome::Worsened => 2,
            };
            c[k] += 1;
        }
        c.map(|v| v as f64 / n as f64)
    };
    for (a, action) in Conditioning::deepspm_actions().iter().enumerate() {
        let g = freq(&good, action, a as u64);
        assert!(g[2] > g[0], "{action:?}: good tip {g:?}");
        for (b, tip) in bad.iter().enumerate() {
            assert!(!tip.is_good(&cfg));
            let f = freq(tip, action, 100 + 10 * a as u64 + b as u64);
            assert!(f[0] > g[0], "{action:?}, bad tip {b}: {f:?} vs good {g:?}");
        }
    }
    // Pulses remove adsorbates better than dips; dips fix double tips better than pulses.
    let p = |t: &TipState, a: Conditioning| t.probabilities(&a, &cfg).unwrap()[0];
    assert!(p(&bad[2], Conditioning::pulse(4.0)) > p(&bad[2], Conditioning::dip(2.0 * NM)));
    assert!(p(&bad[1], Conditioning::dip(2.0 * NM)) > p(&bad[1], Conditioning::pulse(4.0)));
    // Stronger actions change the tip more often.
    let change = |a: Conditioning| 1.0 - good.probabilities(&a, &cfg).unwrap()[1];
    assert!(change(Conditioning::pulse(8.0)) > change(Conditioning::pulse(2.5)));
    assert!(change(Conditioning::dip(5.0 * NM)) > change(Conditioning::dip(0.8 * NM)));
}

#[test]
fn repeated_conditioning_turns_a_bad_tip_good() {
    let cfg = TipConfig::default();
    let start = TipState::sharp(30.0 * NM)
        .unwrap()
        .with_flat_radius(3.0 * NM)
        .unwrap()
        .with_second_apex(Some(SecondApex {
            offset: [2.0 * NM, 0.0],
            dz: 0.1 * NM,
        }))
        .unwrap()
        .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
        .unwrap();
    // Blind policies, stopping once the tip is good: alternate a −4 V pulse and a 2 nm dip
    // (at most 40 actions), or dip 5 nm (at most 20).
    let alternate = [Conditioning::pulse(-4.0), Conditioning::dip(2.0 * NM)];
    let strong = [Conditioning::dip(5.0 * NM)];
    for (policy, max_steps, min_rate) in [(&alternate[..], 40, 0.9), (&strong[..], 20, 0.98)] {
        let trials = 1000;
        let mut rng = seeded(21);
        let (mut good, mut steps_total) = (0, 0);
        let mut q_sum = 0.0;
        for _ in 0..trials {
            let mut tip = start.clone();
            for step in 0..max_steps {
                tip.condition(&policy[step % policy.len()], &cfg, &mut rng)
                    .unwrap();
                if tip.is_good(&cfg) {
                    good += 1;
                    steps_total += step + 1;
                    break;
                }
            }
            q_sum += tip.quality(&cfg);
        }
        let rate = good as f64 / trials as f64;
        println!(
            "{policy:?}: good within {max_steps} actions: {rate}, mean steps {}",
            steps_total as f64 / good.max(1) as f64
        );
        assert!(rate > min_rate, "{rate}");
        assert!(q_sum / trials as f64 > 3.0 * start.quality(&cfg));
    }
}

#[test]
fn wear_crash_and_pickups_follow_their_formulas() {
    let cfg = TipConfig::default();
    let mut rng = seeded(4);
    // 100 frames of 256 lines of 1 µm, trace and retrace, in one call per line.
    let mut tip = TipState::sharp(10.0 * NM).unwrap();
    for _ in 0..100 * 256 {
        tip.wear(2e-6, &cfg, &mut rng).unwrap();
    }
    let grown = tip.radius() - 10.0 * NM;
    // Mean 1e-7 · 5.12 cm = 5.12 nm; the U(0.5, 1.5) factors average out (sd 0.3 %).
    assert!((grown - 5.12 * NM).abs() < 0.05 * NM, "{grown}");
    // A 2 nm crash: R grows by 2·2 nm·u ∈ [2, 6] nm, flat = 0.3·√(2·10 nm·2 nm).
    let mut tip = TipState::sharp(10.0 * NM).unwrap();
    tip.crash(2.0 * NM, &cfg, &mut rng).unwrap();
    let dr = tip.radius() - 10.0 * NM;
    assert!((2.0 * NM..=6.0 * NM).contains(&dr), "{dr}");
    assert!((tip.flat_radius() - 0.3 * (40.0f64).sqrt() * NM).abs() < 1e-15);
    // Pick-ups: P(no event in T) = exp(-rate·T).
    let t = 3600.0;
    let n = 4000;
    let untouched = (0..n)
        .filter(|_| {
            let mut tip = TipState::sharp(3.0 * NM).unwrap();
            tip.spontaneous(t, &cfg, &mut rng).unwrap();
            tip == TipState::sharp(3.0 * NM).unwrap()
        })
        .count() as f64
        / n as f64;
    let p0 = (-2e-4 * t).exp();
    assert!((untouched - p0).abs() < 4.5 * (p0 * (1.0 - p0) / n as f64).sqrt());
    // Errors name the argument; a bad call changes nothing.
    let before = tip.clone();
    assert_eq!(
        field(tip.wear(-1.0, &cfg, &mut rng).unwrap_err()),
        "contact_travel"
    );
    assert_eq!(
        field(tip.crash(f64::NAN, &cfg, &mut rng).unwrap_err()),
        "depth"
    );
    assert_eq!(
        field(tip.spontaneous(f64::INFINITY, &cfg, &mut rng).unwrap_err()),
        "scan_time"
    );
    assert_eq!(tip, before);
}

#[test]
fn quality_and_noise_reflect_the_state() {
    let cfg = TipConfig::default();
    let ideal = TipState::sharp(2.0 * NM).unwrap();
    assert_eq!(ideal.quality(&cfg), 1.0);
    assert_eq!(ideal.noise_factor(), 1.0);
    assert_eq!(ideal.glitch_probability(), 0.0);
    let blunt = TipState::sharp(20.0 * NM).unwrap();
    // ln(100/20)/ln(100/2).
    assert!((blunt.quality(&cfg) - 5f64.ln() / 50f64.ln()).abs() < 1e-12);
    assert_eq!(TipState::sharp(100.0 * NM).unwrap().quality(&cfg), 0.0);
    let ads = ideal
        .clone()
        .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
        .unwrap();
    assert_eq!(ads.noise_factor(), 2.5);
    assert_eq!(ads.glitch_probability(), 0.05);
    assert!(ads.quality(&cfg) < 0.7 && !ads.is_good(&cfg));
    let dbl = ideal
        .clone()
        .with_second_apex(Some(SecondApex {
            offset: [1.0 * NM, 0.0],
            dz: 0.0,
        }))
        .unwrap();
    assert!((dbl.quality(&cfg) - 0.5).abs() < 1e-12 && !dbl.is_good(&cfg));
    assert!(ideal.is_good(&cfg) && TipState::sharp(2.99 * NM).unwrap().is_good(&cfg));
    assert!(!TipState::sharp(3.1 * NM).unwrap().is_good(&cfg));
}

#[test]
fn kernels_have_the_stated_shape() {
    let pixel = 0.5 * NM;
    // Paraboloid of radius R + blur with an adsorbate.
    let cfg = TipConfig::default();
    let tip = TipState::sharp(4.0 * NM)
        .unwrap()
        .with_adsorbate(Some(Adsorbate::from_config(&cfg)))
        .unwrap();
    let k = tip.kernel(pixel, 9).unwrap();
    assert!(k.is_separable());
    let expected = -(2.0 * NM).powi(2) / (2.0 * 5.0 * NM);
    assert!((f64::from(k.height(4, 8)) - expected).abs() < 1e-6 * expected.abs());
    // Blunted: flat within a, parabolic beyond.
    let tip = TipState::sharp(4.0 * NM)
        .unwrap()
        .with_flat_radius(1.0 * NM)
        .unwrap();
    let k = tip.kernel(pixel, 11).unwrap();
    assert_eq!(k.height(5, 7), 0.0);
    let expected = -(1.5 * NM).powi(2) / (8.0 * NM);
    assert!((f64::from(k.height(5, 10)) - expected).abs() < 1e-6 * expected.abs());
    // kernel_side: R_k = 4 nm, relief 2 nm → √16 nm = 4 nm = 8 px, + 2 px of flat.
    assert_eq!(tip.kernel_side(pixel, 2.0 * NM), 2 * 10 + 1);
    assert_eq!(
        TipState::sharp(1e-6).unwrap().kernel_side(pixel, 1e-6),
        MAX_KERNEL_SIDE
    );
    assert_eq!(tip.kernel_side(f64::NAN, 1.0), 1);
    // Errors name the argument.
    assert_eq!(field(tip.kernel(0.0, 5).unwrap_err()), "pixel");
    assert_eq!(field(tip.kernel(pixel, 4).unwrap_err()), "side");
}

#[test]
fn invalid_config_and_actions_name_the_field() {
    let cfg = TipConfig::default();
    cfg.validate("tip.").unwrap();
    let bad = |f: fn(&mut TipConfig)| {
        let mut c = TipConfig::default();
        f(&mut c);
        field(c.validate("tip.").unwrap_err())
    };
    assert_eq!(
        bad(|c| c.min_radius = Param::fixed(f64::NAN)),
        "tip.min_radius"
    );
    assert_eq!(
        bad(|c| c.good_radius = Param::fixed(1e-9)),
        "tip.good_radius"
    );
    assert_eq!(
        bad(|c| c.max_radius = Param::fixed(2.5e-9)),
        "tip.max_radius"
    );
    assert_eq!(
        bad(|c| c.initial_radius = Param::fixed(1e-6)),
        "tip.initial_radius"
    );
    assert_eq!(
        bad(|c| c.sharpen_max = Param::fixed(1.0)),
        "tip.sharpen_max"
    );
    assert_eq!(bad(|c| c.wear_rate = Param::fixed(-1.0)), "tip.wear_rate");
    assert_eq!(
        bad(|c| c.adsorbate_noise = Param::fixed(0.5)),
        "tip.adsorbate_noise"
    );
    assert_eq!(
        bad(|c| c.double_probability = Param::fixed(1.5)),
        "tip.double_probability"
    );
    assert_eq!(
        bad(|c| c.strength_scale = Param::fixed(0.0)),
        "tip.strength_scale"
    );
    // Unknown keys are rejected; distributions resolve.
    assert!(toml::from_str::<TipConfig>("radius = 1e-9").is_err());
    let c: TipConfig =
        toml::from_str(r#"initial_radius = { uniform = ["5 nm", "50 nm"] }"#).unwrap();
    let r = crate::param::resolve(&c, &mut seeded(1)).unwrap();
    assert!((5e-9..=50e-9).contains(&r.initial_radius.get()));
    // Actions.
    let tip = TipState::sharp(5.0 * NM).unwrap();
    let mut t = tip.clone();
    let mut rng = seeded(0);
    for (a, name) in [
        (Conditioning::pulse(0.0), "bias"),
        (Conditioning::pulse(f64::NAN), "bias"),
        (Conditioning::pulse(11.0), "bias"),
        (Conditioning::dip(0.0), "depth"),
        (Conditioning::dip(11.0 * NM), "depth"),
        (
            Conditioning::Dip {
                depth: 1.0 * NM,
                bias: 2.0,
                duration: 0.2,
            },
            "bias",
        ),
        (
            Conditioning::Pulse {
                bias: 4.0,
                duration: 0.0,
            },
            "duration",
        ),
    ] {
        assert_eq!(field(t.condition(&a, &cfg, &mut rng).unwrap_err()), name);
    }
    assert_eq!(t, tip);
    // State builders.
    assert_eq!(field(TipState::sharp(0.0).unwrap_err()), "radius");
    assert_eq!(
        field(tip.clone().with_flat_radius(-1.0).unwrap_err()),
        "flat_radius"
    );
    assert_eq!(
        field(
            tip.with_second_apex(Some(SecondApex {
                offset: [0.0, 0.0],
                dz: -1.0
            }))
            .unwrap_err()
        ),
        "dz"
    );
    // Strengths.
    assert_eq!(Conditioning::pulse(-8.0).strength().unwrap(), 1.0);
    assert!((Conditioning::dip(0.8 * NM).strength().unwrap() - 0.16).abs() < 1e-12);
}

#[test]
fn conditioning_wear_grows_the_apex_whatever_the_outcome() {
    use crate::rng::seeded;
    // Off by default: the same draws as before the option existed.
    let base = TipConfig::default();
    let worn = TipConfig {
        conditioning_wear: Param::fixed(0.1 * NM),
        sharpen_max: Param::fixed(0.0),
        worsen_base: Param::fixed(0.0),
        worsen_slope: Param::fixed(0.0),
        ..Default::default()
    };
    let dip = Conditioning::dip(5.0 * NM);
    let mut t = TipState::sharp(3.0 * NM).unwrap();
    let mut rng = seeded(1);
    for _ in 0..10 {
        // Nothing but wear can happen: R grows by 0.05..0.15 nm per unit-strength action.
        let r0 = t.radius();
        assert_eq!(
            t.condition(&dip, &worn, &mut rng).unwrap(),
            Outcome::Unchanged
        );
        let dr = t.radius() - r0;
        assert!((0.05 * NM..=0.15 * NM).contains(&dr), "{dr:e}");
    }
    let mut t = TipState::sharp(3.0 * NM).unwrap();
    let quiet = TipConfig {
        sharpen_max: Param::fixed(0.0),
        worsen_base: Param::fixed(0.0),
        worsen_slope: Param::fixed(0.0),
        ..base.clone()
    };
    t.condition(&dip, &quiet, &mut rng).unwrap();
    assert_eq!(t.radius(), 3.0 * NM);
    let bad = TipConfig {
        conditioning_wear: Param::fixed(-1.0),
        ..base
    };
    assert!(
        bad.validate("tip.")
            .unwrap_err()
            .to_string()
            .contains("tip.conditioning_wear")
    );
}

#[test]
fn same_seed_same_trajectory() {
    let cfg = TipConfig {
        initial_double_probability: Param::fixed(0.5),
        initial_adsorbate_probability: Param::fixed(0.5),
        ..Default::default()
    };
    let run = |seed: u64| {
        let mut rng = seeded(seed);
        let mut tip = TipState::new(&cfg, &mut rng).unwrap();
        let mut log = Vec::new();
        for (k, a) in Conditioning::deepspm_actions()
            .iter()
            .cycle()
            .take(60)
            .enumerate()
        {
            log.push(tip.condition(a, &cfg, &mut rng).unwrap());
            tip.wear(1e-3, &cfg, &mut rng).unwrap();
            if k % 7 == 0 {
                tip.crash(0.5 * NM, &cfg, &mut rng).unwrap();
            }
            tip.spontaneous(600.0, &cfg, &mut rng).unwrap();
        }
        (tip, log)
    };
    assert_eq!(run(9), run(9));
    assert_ne!(run(9), run(10));
}

#[derive(Debug, Clone)]
enum Op {
    Wear(f64),
    Crash(f64),
    Spontaneous(f64),
    Condition(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0.0f64..1.0).prop_map(Op::Wear),
        (0.0f64..20e-9).prop_map(Op::Crash),
        (0.0f64..1e5).prop_map(Op::Spontaneous),
        (0usize..12).prop_map(Op::Condition),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn radius_stays_in_range_and_kernels_are_valid(
        seed in any::<u64>(),
        r0 in 2e-9f64..100e-9,
        ops in proptest::collection::vec(op(), 1..40),
        pixel in 0.05e-9f64..2e-9,
    ) {
        let cfg = TipConfig {
            initial_radius: Param::fixed(r0),
            initial_double_probability: Param::fixed(0.3),
            initial_adsorbate_probability: Param::fixed(0.3),
            ..Default::default()
        };
        let (rmin, rmax) = (cfg.min_radius.get(), cfg.max_radius.get());
        let mut rng = seeded(seed);
        let mut tip = TipState::new(&cfg, &mut rng).unwrap();
        let actions = Conditioning::deepspm_actions();
        for o in &ops {
            let before = tip.radius();
            match *o {
                Op::Wear(l) => tip.wear(l, &cfg, &mut rng).unwrap(),
                Op::Crash(d) => tip.crash(d, &cfg, &mut rng).unwrap(),
                Op::Spontaneous(t) => tip.spontaneous(t, &cfg, &mut rng).unwrap(),
                Op::Condition(a) => {
                    tip.condition(&actions[a], &cfg, &mut rng).unwrap();
                }
            }
            if !matches!(o, Op::Condition(_)) {
                prop_assert!(tip.radius() >= before, "{o:?} shrank R");
            }
            prop_assert!(tip.radius() >= rmin && tip.radius() <= rmax, "R = {}", tip.radius());
            let q = tip.quality(&cfg);
            prop_assert!((0.0..=1.0).contains(&q));
            let side = tip.kernel_side(pixel, 2e-9);
            prop_assert!(side % 2 == 1 && side <= MAX_KERNEL_SIDE);
            let k = tip.kernel(pixel, side).unwrap();
            let c = side / 2;
            prop_assert_eq!(k.height(c, c), 0.0);
            // Finite wherever the paraboloid's window reaches (−∞ only in the corners a
            // worn tip's flat disc does not sweep), never above the apex.
            prop_assert!(k.heights().iter().all(|h| !h.is_nan() && *h <= 0.0));
            prop_assert!((0..side).all(|j| k.height(c, j).is_finite() && k.height(j, c).is_finite()));
        }
    }
}

/// Archard wear truncates the paraboloid apex: the volume above a flat at height `δ` is
/// `π R δ²` (checked here by integrating the paraboloid cap `∫₀^a 2πρ (δ − ρ²/2R) dρ`
/// numerically), so a worn volume `V = k_w F s / H` leaves the flat radius
/// `a = √(2R·√(V/(πR)))`; volumes of successive passes add, and doubling the load doubles
/// the volume.
#[test]
fn archard_wear_truncates_the_apex_by_the_worn_volume() {
    let cfg = TipConfig {
        wear_model: WearModel::Archard,
        wear_coefficient: Param::fixed(1e-4),
        hardness: Param::fixed(10e9),
        ..Default::default()
    };
    let r = 10.0 * NM;
    // 10 nN over 1 mm: V = 1e-4 · 1e-8 · 1e-3 / 1e10 = 1e-25 m³ (100 nm³).
    let mut tip = TipState::sharp(r).unwrap();
    let v = tip.wear_archard(10e-9, 1e-3, &cfg).unwrap();
    assert!((v / 1e-25 - 1.0).abs() < 1e-12, "{v:e}");
    let delta = (v / (PI * r)).sqrt();
    let a = (2.0 * r * delta).sqrt();
    assert!(
        (tip.flat_radius() / a - 1.0).abs() < 1e-12,
        "flat {:e} m, closed form {a:e} m",
        tip.flat_radius()
    );
    assert_eq!(tip.radius(), r);
    // The cap's volume by the midpoint rule.
    let n = 100_000;
    let h = a / n as f64;
    let cap: f64 = (0..n)
        .map(|i| {
            let rho = (i as f64 + 0.5) * h;
            2.0 * PI * rho * (delta - rho * rho / (2.0 * r)) * h
        })
        .sum();
    assert!((cap / v - 1.0).abs() < 1e-8, "cap {cap:e} m³ vs {v:e} m³");
    assert!((tip.truncated_volume() / v - 1.0).abs() < 1e-12);
    // Ten more passes of the same volume: 11 V in all; twice the load: twice the volume.
    for _ in 0..10 {
        tip.wear_archard(10e-9, 1e-3, &cfg).unwrap();
    }
    assert!((tip.truncated_volume() / (11.0 * v) - 1.0).abs() < 1e-12);
    let mut hard = TipState::sharp(r).unwrap();
    let v2 = hard.wear_archard(20e-9, 1e-3, &cfg).unwrap();
    assert!((v2 / v - 2.0).abs() < 1e-12);
    assert!((hard.truncated_volume() / v - 2.0).abs() < 1e-12);
    // No load, no wear; bad arguments name themselves and change nothing.
    let before = tip.clone();
    tip.wear_archard(0.0, 1.0, &cfg).unwrap();
    assert_eq!(
        field(tip.wear_archard(-1.0, 1.0, &cfg).unwrap_err()),
        "load"
    );
    assert_eq!(
        field(tip.wear_archard(1e-9, f64::NAN, &cfg).unwrap_err()),
        "contact_travel"
    );
    assert_eq!(tip, before);
    // The flat never grows past max_radius.
    let mut big = TipState::sharp(r).unwrap();
    big.wear_archard(1e-6, 1e3, &cfg).unwrap();
    assert_eq!(big.flat_radius(), cfg.max_radius.get());
}
