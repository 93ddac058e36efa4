//! BO checks: argument errors, batches, finite sets, and the Branin / Hartmann6 benchmarks.

use super::*;
use std::f64::consts::PI;

fn branin(x: &[f64]) -> f64 {
    let (a, b, c, r, s, t) = (
        1.0,
        5.1 / (4.0 * PI * PI),
        5.0 / PI,
        6.0,
        10.0,
        1.0 / (8.0 * PI),
    );
    a * (x[1] - b * x[0] * x[0] + c * x[0] - r).powi(2) + s * (1.0 - t) * x[0].cos() + s
}

fn hartmann6(x: &[f64]) -> f64 {
    const ALPHA: [f64; 4] = [1.0, 1.2, 3.0, 3.2];
    const A: [[f64; 6]; 4] = [
        [10.0, 3.0, 17.0, 3.5, 1.7, 8.0],
        [0.05, 10.0, 17.0, 0.1, 8.0, 14.0],
        [3.0, 3.5, 1.7, 10.0, 17.0, 8.0],
        [17.0, 8.0, 0.05, 10.0, 0.1, 14.0],
    ];
    const P: [[f64; 6]; 4] = [
        [0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886],
        [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
        [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650],
        [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381],
    ];
    let mut s = 0.0;
    for i in 0..4 {
        let e: f64 = (0..6).map(|j| A[i][j] * (x[j] - P[i][j]).powi(2)).sum();
        s += ALPHA[i] * (-e).exp();
    }
    -s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

#[test]
fn test_functions_have_their_known_optima() {
    assert!((branin(&[PI, 2.275]) - 0.397_887).abs() < 1e-5);
    let xh = [
        0.201_69, 0.150_011, 0.476_874, 0.275_332, 0.311_652, 0.657_3,
    ];
    assert!(
        (hartmann6(&xh) + 3.322_37).abs() < 1e-4,
        "{}",
        hartmann6(&xh)
    );
}

#[test]
fn branin_logei_median_regret_below_0_05() {
    // 10 LHS points + 30 BO iterations, 10 seeds; budget: median simple regret < 0.05.
    let t = std::time::Instant::now();
    let regrets: Vec<f64> = (0..10)
        .map(|seed| {
            let r = minimize(
                branin,
                &[(-5.0, 10.0), (0.0, 15.0)],
                10,
                40,
                Acquisition::LogEi,
                seed,
            )
            .unwrap();
            assert_eq!(r.func_vals.len(), 40);
            r.fun - 0.397_887
        })
        .collect();
    let med = median(regrets.clone());
    println!(
        "Branin regrets {regrets:.4?}; median {med:.5} (budget 0.05); {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(med < 0.05, "median regret {med}");
}

#[test]
fn hartmann6_bo_beats_random_search() {
    // 40 evaluations each (BO: 10 LHS + 30 iterations), median best value over 5 seeds.
    let t = std::time::Instant::now();
    let bounds = vec![(0.0, 1.0); 6];
    let mut bo_best = Vec::new();
    let mut rs_best = Vec::new();
    for seed in 0..5 {
        let r = minimize(hartmann6, &bounds, 10, 40, Acquisition::LogEi, seed).unwrap();
        bo_best.push(r.fun);
        let mut rng = scopegym_envs::rng::seeded(1000 + seed);
        let best = (0..40)
            .map(|_| hartmann6(&(0..6).map(|_| rng.random()).collect::<Vec<f64>>()))
            .fold(f64::INFINITY, f64::min);
        rs_best.push(best);
    }
    let (mb, mr) = (median(bo_best.clone()), median(rs_best.clone()));
    println!(
        "Hartmann6 (optimum −3.32237): BO best {bo_best:.4?} median {mb:.4}; random {rs_best:.4?} median {mr:.4}; {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(mb < mr, "BO median {mb} vs random {mr}");
}

#[test]
fn batches_and_finite_candidate_sets() {
    // Maximize −(x−0.7)² − (y−0.2)² over a 32×32 grid: q = 3 distinct picks, excluded ones
    // never chosen, and the optimum cell found within 30 evaluations, for LogEI and Thompson.
    let grid: Vec<Vec<f64>> = (0..32 * 32)
        .map(|i| vec![(i % 32) as f64 / 31.0, (i / 32) as f64 / 31.0])
        .collect();
    let f = |p: &[f64]| -(p[0] - 0.7).powi(2) - (p[1] - 0.2).powi(2);
    let opt = grid.iter().map(|p| f(p)).fold(f64::NEG_INFINITY, f64::max);
    for acq in [
        Acquisition::LogEi,
        Acquisition::Thompson,
        Acquisition::Ucb { beta: 4.0 },
    ] {
        let cfg = BoConfig {
            acquisition: acq,
            n_initial: 6,
            q: 3,
            seed: 5,
            ..BoConfig::default()
        };
        let mut bo = BayesOpt::new(&[(0.0, 1.0), (0.0, 1.0)], cfg).unwrap();
        let mut exclude = vec![false; grid.len()];
        for _ in 0..10 {
            let picks = bo.suggest_from(&grid, 3, Some(&exclude)).unwrap();
            assert_eq!(picks.len(), 3);
            for &i in &picks {
                assert!(!exclude[i], "excluded candidate {i} chosen");
                exclude[i] = true;
                bo.tell(grid[i].clone(), f(&grid[i])).unwrap();
            }
        }
        let best = bo.best().unwrap().1;
        println!("{acq:?}: best {best:.5} vs grid optimum {opt:.5}");
        assert!(opt - best < 2e-3, "{acq:?}: {best} vs {opt}");
    }
}

#[test]
fn ask_tell_batches_in_a_box() {
    for acq in [Acquisition::Ei, Acquisition::Thompson] {
        let cfg = BoConfig {
            acquisition: acq,
            n_initial: 5,
            q: 2,
            seed: 1,
            ..BoConfig::default()
        };
        let bounds = [(-1.0, 2.0)];
        let mut bo = BayesOpt::new(&bounds, cfg).unwrap();
        for _ in 0..8 {
            let xs = bo.ask().unwrap();
            assert_eq!(xs.len(), 2);
            for x in xs {
                assert!((-1.0..=2.0).contains(&x[0]));
                let y = -(x[0] - 1.2f64).powi(2);
                bo.tell(x, y).unwrap();
            }
        }
        let (x, _) = bo.best().unwrap();
        println!("{acq:?}: best x {x:?}");
        assert!((x[0] - 1.2).abs() < 0.05, "{acq:?}: {x:?}");
    }
}

#[test]
fn bad_arguments_are_errors() {
    assert!(minimize(|x| x[0], &[(1.0, 0.0)], 2, 5, Acquisition::LogEi, 0).is_err());
    assert!(minimize(|x| x[0], &[(0.0, 1.0)], 5, 3, Acquisition::LogEi, 0).is_err());
    let e = minimize(|_| f64::NAN, &[(0.0, 1.0)], 2, 5, Acquisition::LogEi, 0).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
    let bad = BoConfig {
        q: 0,
        ..BoConfig::default()
    };
    let e = BayesOpt::new(&[(0.0, 1.0)], bad).unwrap_err();
    assert!(e.to_string().contains('q'), "{e}");
    let cfg: std::result::Result<BoConfig, _> = toml::from_str("n_initial = 3\nbogus = 1");
    assert!(cfg.is_err());
    let cfg: BoConfig = toml::from_str("acquisition = \"ei\"\nq = 4").unwrap();
    assert_eq!(
        (cfg.acquisition, cfg.q, cfg.n_initial),
        (Acquisition::Ei, 4, 10)
    );
    let mut bo = BayesOpt::new(&[(0.0, 1.0)], BoConfig::default()).unwrap();
    assert!(bo.tell(vec![0.5], f64::INFINITY).is_err());
    assert!(bo.suggest_from(&[vec![0.1]], 2, None).is_err());
}
