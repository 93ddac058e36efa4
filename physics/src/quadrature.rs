//! Numerical quadrature shared by the models: Gauss-Hermite nodes and weights for averages
//! over a normal distribution.
//!
//! One source of nodes for every model that averages over a Gaussian spread (the chromatic
//! defocus spread of the STEM probe, thermal vibrations in knock-on cross-sections).

use std::sync::OnceLock;

/// Largest number of nodes [`gauss_hermite`] provides.
pub const MAX_NODES: usize = 64;

/// Probabilists' Gauss-Hermite rule with `n` nodes (clamped to `1..=MAX_NODES`): pairs
/// `(x_i, w_i)` with `Σ w_i f(x_i) ≈ E[f(X)]` for a standard normal `X`, exact for polynomials of
/// degree up to `2n − 1`. The weights sum to 1; the nodes are the roots of the Hermite polynomial
/// `He_n` (`He_{k+1} = x He_k − k He_{k−1}`), in increasing order, symmetric about 0 (the middle
/// node of an odd rule is exactly 0), and `w_i = 1 / (n · p_{n−1}(x_i)²)` with the normalized
/// `p_k = He_k/√k!`. Computed once per `n` (bisection of sign changes on a grid finer than the
/// smallest root spacing, to full precision).
///
/// ```
/// let r = scopegym_physics::quadrature::gauss_hermite(3);
/// // He_3 = x³ − 3x: nodes 0, ±√3, weights 2/3 and 1/6.
/// assert!((r[2].0 - 3f64.sqrt()).abs() < 1e-14 && (r[1].1 - 2.0 / 3.0).abs() < 1e-14);
/// ```
pub fn gauss_hermite(n: usize) -> &'static [(f64, f64)] {
    static TABLE: [OnceLock<Vec<(f64, f64)>>; MAX_NODES] = [const { OnceLock::new() }; MAX_NODES];
    let n = n.clamp(1, MAX_NODES);
    TABLE[n - 1].get_or_init(|| compute(n))
}

/// `(p_n(x), p_{n−1}(x))` of the normalized probabilists' Hermite polynomials `He_k/√k!`.
fn hermite_pair(n: usize, x: f64) -> (f64, f64) {
    let (mut prev, mut cur) = (0.0, 1.0);
    for k in 0..n {
        let next = (x * cur - (k as f64).sqrt() * prev) / ((k + 1) as f64).sqrt();
        prev = cur;
        cur = next;
    }
    (cur, prev)
}

fn compute(n: usize) -> Vec<(f64, f64)> {
    // The roots of He_n lie inside ±√(4n + 2); adjacent ones are at least ~2.7/√(4n+2) apart,
    // far more than the grid step.
    let bound = (4.0 * n as f64 + 2.0).sqrt();
    let steps = 20 * (n + 1) * 8;
    let h = bound / steps as f64;
    let mut positive = Vec::with_capacity(n / 2);
    let p = |x: f64| hermite_pair(n, x).0;
    let (mut a, mut pa) = (h * 0.5, p(h * 0.5));
    for i in 1..=steps {
        let b = h * (i as f64 + 0.5);
        let pb = p(b);
        if pa == 0.0 || pa.signum() != pb.signum() {
            let (mut lo, mut hi, mut plo) = (a, b, pa);
            for _ in 0..200 {
                let mid = 0.5 * (lo + hi);
                if mid <= lo || mid >= hi {
                    break;
                }
                let pm = p(mid);
                if pm == 0.0 {
                    lo = mid;
                    hi = mid;
                    break;
                }
                if pm.signum() == plo.signum() {
                    lo = mid;
                    plo = pm;
                } else {
                    hi = mid;
                }
            }
            positive.push(0.5 * (lo + hi));
        }
        a = b;
        pa = pb;
    }
    let weight = |x: f64| {
        let q = hermite_pair(n, x).1;
        1.0 / (n as f64 * q * q)
    };
    let mut out: Vec<(f64, f64)> = positive.iter().rev().map(|&x| (-x, weight(x))).collect();
    if n % 2 == 1 {
        out.push((0.0, weight(0.0)));
    }
    out.extend(positive.iter().map(|&x| (x, weight(x))));
    // Exact normalization (the analytic weights sum to 1 up to rounding).
    let total: f64 = out.iter().map(|w| w.1).sum();
    out.iter_mut().for_each(|w| w.1 /= total);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seven_nodes_match_the_published_table() {
        // Abramowitz & Stegun Table 25.10 (physicists' nodes × √2, weights / √π).
        let table = [
            (3.750_439_717_725_742, 0.000_548_268_855_972_22),
            (2.366_759_410_734_541, 0.030_757_123_967_586_5),
            (1.154_405_394_739_968, 0.240_123_178_605_012_7),
            (0.0, 0.457_142_857_142_857_1),
        ];
        let r = gauss_hermite(7);
        assert_eq!(r.len(), 7);
        for (k, &(x, w)) in table.iter().enumerate() {
            let (lo, hi) = (r[k], r[6 - k]);
            assert!(
                (hi.0 - x).abs() < 1e-13 && (lo.0 + x).abs() < 1e-13,
                "{k}: {r:?}"
            );
            assert!(
                (hi.1 - w).abs() < 1e-14 && (lo.1 - w).abs() < 1e-14,
                "{k}: {hi:?}"
            );
        }
        assert_eq!(r[3].0, 0.0);
    }

    #[test]
    fn rules_integrate_normal_moments_exactly() {
        // E[X^{2k}] = (2k − 1)!! for a standard normal, exact up to degree 2n − 1.
        for n in [1usize, 2, 5, 7, 20, 40] {
            let r = gauss_hermite(n);
            assert_eq!(r.len(), n);
            let mut double_fact = 1.0;
            for k in 0..n {
                if k > 0 {
                    double_fact *= (2 * k - 1) as f64;
                }
                let m: f64 = r.iter().map(|&(x, w)| w * x.powi(2 * k as i32)).sum();
                assert!((m / double_fact - 1.0).abs() < 1e-10, "n {n} k {k}: {m}");
                let odd: f64 = r.iter().map(|&(x, w)| w * x.powi(2 * k as i32 + 1)).sum();
                assert!(
                    odd.abs() < 1e-9 * double_fact.max(1.0),
                    "n {n} k {k}: {odd}"
                );
            }
        }
    }
}
