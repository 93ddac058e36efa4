//! Dense kernels on column-major square matrices stored as flat slices (`a[i + j n]`): a
//! left-looking Cholesky with jitter escalation, the inverse of a lower-triangular factor, the
//! lower triangle of `L⁻ᵀ L⁻¹`, and triangular solves. Inner loops are contiguous `axpy`/`dot`
//! over columns so that they vectorize.

use crate::error::{AgentError, Result};

/// `y += a x`.
#[inline]
pub(crate) fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// `xᵀ y` with four accumulators (vectorizes without reassociation flags).
#[inline]
pub(crate) fn dot(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [0.0f64; 4];
    let chunks = n / 4;
    for c in 0..chunks {
        let i = 4 * c;
        acc[0] += x[i] * y[i];
        acc[1] += x[i + 1] * y[i + 1];
        acc[2] += x[i + 2] * y[i + 2];
        acc[3] += x[i + 3] * y[i + 3];
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for i in 4 * chunks..n {
        s += x[i] * y[i];
    }
    s
}

/// In-place Cholesky of the symmetric positive-definite `a` (lower triangle read; on success the
/// lower triangle holds `L` and the strict upper triangle is zeroed). `false` if a pivot is not
/// positive (the contents are then garbage).
pub(crate) fn cholesky_in_place(a: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let (done, rest) = a.split_at_mut(j * n);
        let colj = &mut rest[..n];
        for k in 0..j {
            let colk = &done[k * n..(k + 1) * n];
            let ljk = colk[j];
            if ljk != 0.0 {
                axpy(-ljk, &colk[j..], &mut colj[j..]);
            }
        }
        let d = colj[j];
        if !(d > 0.0) || !d.is_finite() {
            return false;
        }
        let s = d.sqrt();
        let inv = 1.0 / s;
        colj[j] = s;
        for v in &mut colj[j + 1..] {
            *v *= inv;
        }
        for v in &mut colj[..j] {
            *v = 0.0;
        }
    }
    true
}

/// Cholesky of `k` (only its lower triangle is read) into `l`, adding a diagonal jitter
/// `ε · mean(diag k)` with `ε = 0, 1e-8, 1e-7, …, 1e-2` until it succeeds. Returns the absolute
/// jitter added; [`AgentError::Numerical`] if the matrix stays singular.
pub(crate) fn cholesky_jitter(k: &[f64], n: usize, l: &mut Vec<f64>, context: &str) -> Result<f64> {
    l.clear();
    l.extend_from_slice(k);
    if n == 0 {
        return Ok(0.0);
    }
    let mean_diag = (0..n).map(|i| k[i + i * n]).sum::<f64>() / n as f64;
    if !mean_diag.is_finite() || mean_diag <= 0.0 {
        return Err(AgentError::numerical(
            context,
            format!("covariance diagonal mean is {mean_diag}"),
        ));
    }
    if cholesky_in_place(l, n) {
        return Ok(0.0);
    }
    let mut eps = 1e-8;
    while eps <= 1e-2 * (1.0 + 1e-9) {
        let jitter = eps * mean_diag;
        l.clear();
        l.extend_from_slice(k);
        for i in 0..n {
            l[i + i * n] += jitter;
        }
        if cholesky_in_place(l, n) {
            return Ok(jitter);
        }
        eps *= 10.0;
    }
    Err(AgentError::numerical(
        context,
        format!("{n}×{n} covariance not positive definite even with a relative jitter of 1e-2"),
    ))
}

/// `m = L⁻¹` (lower triangular, strict upper zeroed) for lower-triangular `l`.
pub(crate) fn lower_inverse(l: &[f64], n: usize, m: &mut Vec<f64>) {
    m.clear();
    m.resize(n * n, 0.0);
    for j in 0..n {
        let col = &mut m[j * n..(j + 1) * n];
        col[j] = 1.0;
        for k in j..n {
            let lk = &l[k * n..(k + 1) * n];
            col[k] /= lk[k];
            let mk = col[k];
            if mk != 0.0 {
                let (head, tail) = col.split_at_mut(k + 1);
                let _ = head;
                axpy(-mk, &lk[k + 1..], tail);
            }
        }
    }
}

/// The lower triangle of `K⁻¹ = L⁻ᵀ L⁻¹` from `m = L⁻¹`: `K⁻¹_ij = Σ_{k ≥ i} M_ki M_kj` for
/// `i ≥ j` (the strict upper triangle of `out` is left unspecified).
pub(crate) fn inverse_from_lower_inverse(m: &[f64], n: usize, out: &mut Vec<f64>) {
    out.clear();
    out.resize(n * n, 0.0);
    for j in 0..n {
        for i in j..n {
            out[i + j * n] = dot(&m[i * n + i..(i + 1) * n], &m[j * n + i..(j + 1) * n]);
        }
    }
}

/// Solves `L x = b` in place (forward substitution, column oriented).
pub(crate) fn solve_lower(l: &[f64], n: usize, b: &mut [f64]) {
    for k in 0..n {
        let lk = &l[k * n..(k + 1) * n];
        b[k] /= lk[k];
        let bk = b[k];
        if bk != 0.0 {
            let (_, tail) = b.split_at_mut(k + 1);
            axpy(-bk, &lk[k + 1..], tail);
        }
    }
}

/// Solves `Lᵀ x = b` in place (back substitution with the columns of `L` as rows of `Lᵀ`).
pub(crate) fn solve_lower_transpose(l: &[f64], n: usize, b: &mut [f64]) {
    for k in (0..n).rev() {
        let lk = &l[k * n..(k + 1) * n];
        let s = dot(&lk[k + 1..], &b[k + 1..n]);
        b[k] = (b[k] - s) / lk[k];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize) -> Vec<f64> {
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                let d = i as f64 - j as f64;
                a[i + j * n] = (-0.1 * d * d).exp() + if i == j { 0.1 } else { 0.0 };
            }
        }
        a
    }

    #[test]
    fn cholesky_inverse_and_solves_reconstruct() {
        let n = 23;
        let a = spd(n);
        let mut l = Vec::new();
        let jitter = cholesky_jitter(&a, n, &mut l, "test").unwrap();
        assert_eq!(jitter, 0.0);
        // L Lᵀ = A.
        for i in 0..n {
            for j in 0..n {
                let s: f64 = (0..n).map(|k| l[i + k * n] * l[j + k * n]).sum();
                assert!((s - a[i + j * n]).abs() < 1e-12, "{i} {j}");
            }
        }
        let mut m = Vec::new();
        lower_inverse(&l, n, &mut m);
        let mut kinv = Vec::new();
        inverse_from_lower_inverse(&m, n, &mut kinv);
        // A K⁻¹ = I using the lower triangle of K⁻¹.
        let sym = |i: usize, j: usize| {
            if i >= j {
                kinv[i + j * n]
            } else {
                kinv[j + i * n]
            }
        };
        for i in 0..n {
            for j in 0..n {
                let s: f64 = (0..n).map(|k| a[i + k * n] * sym(k, j)).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-9, "{i} {j} {s}");
            }
        }
        let b: Vec<f64> = (0..n).map(|i| (i as f64).sin()).collect();
        let mut x = b.clone();
        solve_lower(&l, n, &mut x);
        solve_lower_transpose(&l, n, &mut x);
        for i in 0..n {
            let s: f64 = (0..n).map(|k| a[i + k * n] * x[k]).sum();
            assert!((s - b[i]).abs() < 1e-10);
        }
    }

    #[test]
    fn jitter_escalates_and_singular_is_an_error() {
        // Rank one: needs jitter.
        let n = 5;
        let a = vec![1.0; n * n];
        let mut l = Vec::new();
        let jitter = cholesky_jitter(&a, n, &mut l, "rank one").unwrap();
        assert!(jitter > 0.0 && jitter <= 1e-2, "{jitter}");
        // Indefinite: fails with a Numerical error naming the context.
        let mut b = vec![0.0; 4];
        b[0] = 1.0;
        b[3] = -1.0;
        let err = cholesky_jitter(&b, 2, &mut l, "indefinite").unwrap_err();
        assert!(err.to_string().contains("indefinite"), "{err}");
    }
}
