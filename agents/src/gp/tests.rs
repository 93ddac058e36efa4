//! GP checks against independent computations.

use super::*;
use rand::Rng;

/// Dense solve by Gaussian elimination with partial pivoting (independent of the Cholesky
/// path in the module).
fn gauss_solve(a: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = a.to_vec();
    let mut r = b.to_vec();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| m[i][c].abs().total_cmp(&m[j][c].abs()))
            .unwrap();
        m.swap(c, p);
        r.swap(c, p);
        for i in c + 1..n {
            let f = m[i][c] / m[c][c];
            for k in c..n {
                m[i][k] -= f * m[c][k];
            }
            r[i] -= f * r[c];
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| m[i][k] * x[k]).sum();
        x[i] = (r[i] - s) / m[i][i];
    }
    x
}

/// The kernel written out from its textbook form on raw coordinates.
fn k_ref(kernel: Kernel, a: &[f64], b: &[f64], bounds: &[(f64, f64)], h: &Hyperparameters) -> f64 {
    let mut r2 = 0.0;
    for k in 0..a.len() {
        let w = bounds[k].1 - bounds[k].0;
        let t = (a[k] - b[k]) / (w * h.lengthscales[k]);
        r2 += t * t;
    }
    let r = r2.sqrt();
    h.output_scale
        * match kernel {
            Kernel::Rbf => (-0.5 * r2).exp(),
            Kernel::Matern52 => {
                (1.0 + 5f64.sqrt() * r + 5.0 * r2 / 3.0) * (-(5f64.sqrt()) * r).exp()
            }
        }
}

type Data = (Vec<(f64, f64)>, Vec<Vec<f64>>, Vec<f64>);

fn toy(n: usize, seed: u64) -> Data {
    let bounds = vec![(-2.0, 3.0), (10.0, 30.0)];
    let mut rng = scopegym_envs::rng::seeded(seed);
    let x: Vec<Vec<f64>> = (0..n)
        .map(|_| vec![rng.random_range(-2.0..3.0), rng.random_range(10.0..30.0)])
        .collect();
    let y = x
        .iter()
        .map(|p| 5.0 + 3.0 * (p[0]).sin() * (p[1] / 7.0).cos() + 0.1 * rng.random::<f64>())
        .collect();
    (bounds, x, y)
}

#[test]
fn posterior_equals_closed_form() {
    let (bounds, x, y) = toy(9, 1);
    let h = Hyperparameters {
        lengthscales: vec![0.3, 0.7],
        output_scale: 1.3,
        noise: 0.01,
        mean: vec![0.2],
    };
    let xs: Vec<Vec<f64>> = vec![
        vec![0.1, 12.0],
        vec![2.9, 29.0],
        vec![-1.0, 20.0],
        x[3].clone(),
    ];
    for kernel in [Kernel::Matern52, Kernel::Rbf] {
        let gp = Gp::with_hyperparameters(kernel, Arc::new(Constant), &bounds, &x, &y, &h, None)
            .unwrap();
        let (mu, var) = gp.predict(&xs);
        // Closed form in standardized units, written independently.
        let n = y.len();
        let ym = y.iter().sum::<f64>() / n as f64;
        let sd = (y.iter().map(|v| (v - ym).powi(2)).sum::<f64>() / (n as f64 - 1.0)).sqrt();
        let r: Vec<f64> = y.iter().map(|v| (v - ym) / sd - h.mean[0]).collect();
        let kmat: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        k_ref(kernel, &x[i], &x[j], &bounds, &h)
                            + if i == j { h.noise } else { 0.0 }
                    })
                    .collect()
            })
            .collect();
        let alpha = gauss_solve(&kmat, &r);
        for (j, q) in xs.iter().enumerate() {
            let ks: Vec<f64> = x
                .iter()
                .map(|xi| k_ref(kernel, xi, q, &bounds, &h))
                .collect();
            let w = gauss_solve(&kmat, &ks);
            let m_ref =
                ym + sd * (h.mean[0] + ks.iter().zip(&alpha).map(|(a, b)| a * b).sum::<f64>());
            let v_ref =
                sd * sd * (h.output_scale - ks.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>());
            let em = (mu[j] - m_ref).abs() / m_ref.abs();
            let ev = (var[j] - v_ref).abs() / v_ref.abs();
            println!(
                "{kernel:?} point {j}: mean {:.12} vs {m_ref:.12} (rel {em:.1e}), var {:.6e} vs {v_ref:.6e} (rel {ev:.1e})",
                mu[j], var[j]
            );
            assert!(em < 1e-8, "mean rel error {em}");
            assert!(ev < 1e-8, "variance rel error {ev}");
        }
    }
}

/// Central finite differences of the objective against its analytic gradient.
fn check_gradient(kernel: Kernel, mean: &dyn MeanFunction, theta: &[f64]) {
    let (bounds, x, y) = toy(25, 2);
    let d = bounds.len();
    let mut u = Vec::new();
    for xi in &x {
        scale_into(&bounds, xi, &mut u);
    }
    let (m, s) = standardize(&y);
    let ys: Vec<f64> = y.iter().map(|v| (v - m) / s).collect();
    let obj = Objective::new(kernel, d, &u, &ys, mean);
    let (f0, g) = obj.eval(theta);
    assert!(f0.is_finite());
    let mut worst: f64 = 0.0;
    for k in 0..theta.len() {
        let h = 1e-5;
        let mut tp = theta.to_vec();
        let mut tm = theta.to_vec();
        tp[k] += h;
        tm[k] -= h;
        let fd = (obj.eval(&tp).0 - obj.eval(&tm).0) / (2.0 * h);
        let err = (fd - g[k]).abs() / (1.0 + fd.abs());
        worst = worst.max(err);
        assert!(
            err < 1e-6,
            "{kernel:?} param {k}: analytic {} vs fd {fd}",
            g[k]
        );
    }
    println!(
        "{kernel:?} {mean:?}: worst relative gradient error {worst:.2e} over {} params",
        theta.len()
    );
}

#[test]
fn marginal_likelihood_gradient_matches_finite_differences() {
    let base = [-1.2, 0.3, 0.2, -3.0];
    for kernel in [Kernel::Matern52, Kernel::Rbf] {
        let mut t = base.to_vec();
        t.push(0.1);
        check_gradient(kernel, &Constant, &t);
        let q = Quadratic { dim: 2 };
        let mut t = base.to_vec();
        t.extend_from_slice(&[0.5, 0.2, -0.3, 0.4, 0.6]);
        check_gradient(kernel, &q, &t);
    }
}

/// A textbook Cholesky for the test's own GP sampler.
fn chol_ref(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = a.len();
    let mut l = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                l[i][i] = (a[i][i] - s).sqrt();
            } else {
                l[i][j] = (a[i][j] - s) / l[j][j];
            }
        }
    }
    l
}

#[test]
fn fitted_lengthscales_recover_known_ones() {
    // Draw a 2-D RBF GP sample with lengthscales (0.15, 0.5) on the unit box, fit, and
    // recover each lengthscale within a factor 1.6 (several draws keep one unlucky sample
    // from deciding; the median of the estimates is checked).
    let truth = [0.15, 0.5];
    let n = 120;
    let mut est = [Vec::new(), Vec::new()];
    for seed in 0..3u64 {
        let mut rng = scopegym_envs::rng::seeded(100 + seed);
        let x: Vec<Vec<f64>> = (0..n).map(|_| vec![rng.random(), rng.random()]).collect();
        let kmat: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        let a = (x[i][0] - x[j][0]) / truth[0];
                        let b = (x[i][1] - x[j][1]) / truth[1];
                        (-0.5 * (a * a + b * b)).exp() + if i == j { 1e-6 + 1e-4 } else { 0.0 }
                    })
                    .collect()
            })
            .collect();
        let l = chol_ref(&kmat);
        let z: Vec<f64> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
        let y: Vec<f64> = (0..n)
            .map(|i| (0..=i).map(|k| l[i][k] * z[k]).sum())
            .collect();
        let cfg = GpConfig {
            kernel: Kernel::Rbf,
            ..GpConfig::default()
        };
        let gp = Gp::fit(&cfg, &[(0.0, 1.0), (0.0, 1.0)], &x, &y, None, seed).unwrap();
        let h = gp.hyperparameters();
        println!(
            "draw {seed}: lengthscales {:?} (truth {truth:?}), noise {:.2e}",
            h.lengthscales, h.noise
        );
        for k in 0..2 {
            est[k].push(h.lengthscales[k]);
        }
    }
    for k in 0..2 {
        est[k].sort_by(f64::total_cmp);
        let med = est[k][1];
        let ratio = med / truth[k];
        println!("dimension {k}: median fitted {med:.4}, ratio {ratio:.3}");
        assert!(
            (1.0 / 1.6..1.6).contains(&ratio),
            "dimension {k}: ratio {ratio}"
        );
    }
}

#[test]
fn incremental_update_equals_full_conditioning() {
    let (bounds, x, y) = toy(30, 3);
    let h = Hyperparameters {
        lengthscales: vec![0.25, 0.4],
        output_scale: 0.9,
        noise: 0.003,
        mean: vec![-0.1],
    };
    for kernel in [Kernel::Matern52, Kernel::Rbf] {
        let mut gp = Gp::with_hyperparameters(
            kernel,
            Arc::new(Constant),
            &bounds,
            &x[..20],
            &y[..20],
            &h,
            None,
        )
        .unwrap();
        let st = gp.standardization();
        for i in 20..30 {
            gp.add_point(&x[i], y[i]).unwrap();
        }
        let full =
            Gp::with_hyperparameters(kernel, Arc::new(Constant), &bounds, &x, &y, &h, Some(st))
                .unwrap();
        let xs: Vec<Vec<f64>> = (0..50)
            .map(|i| vec![-2.0 + 0.1 * i as f64, 10.0 + 0.4 * i as f64])
            .collect();
        let (m1, v1) = gp.predict(&xs);
        let (m2, v2) = full.predict(&xs);
        let mut worst: f64 = 0.0;
        for j in 0..xs.len() {
            worst = worst.max((m1[j] - m2[j]).abs()).max((v1[j] - v2[j]).abs());
        }
        for (a, b) in gp.l.iter().zip(&full.l) {
            worst = worst.max((a - b).abs());
        }
        for (a, b) in gp.linv.iter().zip(full.linv.iter()) {
            worst = worst.max((a - b).abs());
        }
        println!("{kernel:?}: incremental vs full, worst abs difference {worst:.2e}");
        assert!(worst < 1e-10, "{worst}");
        assert!((gp.log_marginal_likelihood() - full.log_marginal_likelihood()).abs() < 1e-10);
    }
}

#[test]
fn thompson_draws_have_the_posterior_moments() {
    let (bounds, x, y) = toy(12, 4);
    let h = Hyperparameters {
        lengthscales: vec![0.3, 0.5],
        output_scale: 1.0,
        noise: 0.01,
        mean: vec![0.0],
    };
    let gp = Gp::with_hyperparameters(
        Kernel::Matern52,
        Arc::new(Constant),
        &bounds,
        &x,
        &y,
        &h,
        None,
    )
    .unwrap();
    let xs: Vec<Vec<f64>> = (0..6)
        .map(|i| vec![-2.0 + 0.8 * i as f64, 12.0 + 3.0 * i as f64])
        .collect();
    let (mu, var) = gp.predict(&xs);
    let mut rng = scopegym_envs::rng::seeded(9);
    let ns = 20000;
    let draws = gp.sample_joint(&xs, ns, &mut rng).unwrap();
    let m = xs.len();
    let mut mean = vec![0.0; m];
    for f in &draws {
        for k in 0..m {
            mean[k] += f[k] / ns as f64;
        }
    }
    let mut cov = vec![vec![0.0; m]; m];
    for f in &draws {
        for a in 0..m {
            for b in 0..m {
                cov[a][b] += (f[a] - mean[a]) * (f[b] - mean[b]) / (ns as f64 - 1.0);
            }
        }
    }
    // The reference covariance from the posterior variance of a sum: var(f_a + f_b).
    for a in 0..m {
        let sd = var[a].sqrt();
        let em = (mean[a] - mu[a]).abs() / sd;
        let ev = (cov[a][a] - var[a]).abs() / var[a];
        println!(
            "point {a}: mean {:.4} vs {:.4} ({em:.3} sd), var {:.4e} vs {:.4e} (rel {ev:.3})",
            mean[a], mu[a], cov[a][a], var[a]
        );
        assert!(em < 0.05, "{em}");
        assert!(ev < 0.05, "{ev}");
    }
    // Cross-covariances: posterior covariance from the closed form k(a,b) − k_aᵀ K⁻¹ k_b.
    let n = x.len();
    let (ym, sd) = gp.standardization();
    let _ = ym;
    let kmat: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    k_ref(Kernel::Matern52, &x[i], &x[j], &bounds, &h)
                        + if i == j { h.noise } else { 0.0 }
                })
                .collect()
        })
        .collect();
    for a in 0..m {
        for b in 0..a {
            let ka: Vec<f64> = x
                .iter()
                .map(|xi| k_ref(Kernel::Matern52, xi, &xs[a], &bounds, &h))
                .collect();
            let kb: Vec<f64> = x
                .iter()
                .map(|xi| k_ref(Kernel::Matern52, xi, &xs[b], &bounds, &h))
                .collect();
            let w = gauss_solve(&kmat, &kb);
            let c = sd
                * sd
                * (k_ref(Kernel::Matern52, &xs[a], &xs[b], &bounds, &h)
                    - ka.iter().zip(&w).map(|(p, q)| p * q).sum::<f64>());
            let tol = 0.05 * (var[a] * var[b]).sqrt();
            assert!(
                (cov[a][b] - c).abs() < tol,
                "cov {a},{b}: {} vs {c}",
                cov[a][b]
            );
        }
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let cfg = GpConfig::default();
    assert!(Gp::fit(&cfg, &[(1.0, 0.0)], &[vec![0.5]], &[1.0], None, 0).is_err());
    assert!(Gp::fit(&cfg, &[(0.0, 1.0)], &[vec![0.5]], &[f64::NAN], None, 0).is_err());
    assert!(Gp::fit(&cfg, &[(0.0, 1.0)], &[vec![0.5, 1.0]], &[1.0], None, 0).is_err());
    assert!(Gp::fit(&cfg, &[(0.0, 1.0)], &[], &[], None, 0).is_err());
    let bad = GpConfig {
        max_iters: 0,
        ..cfg
    };
    assert!(Gp::fit(&bad, &[(0.0, 1.0)], &[vec![0.5]], &[1.0], None, 0).is_err());
}
