//! Portable seeded randomness and fast samplers.
//!
//! Every simulator owns a [`SimRng`] (`rand_pcg::Pcg64Mcg`) seeded from a `u64`: the same seed
//! gives the same stream on every platform and thread count. Sub-streams for independent parts
//! of a simulation are derived with [`derive_seed`], so adding draws to one part never shifts
//! another.

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// The generator used throughout the simulation.
pub type SimRng = rand_pcg::Pcg64Mcg;

/// A generator seeded from `seed` (portable: `seed_from_u64` expands the seed with PCG32).
pub fn seeded(seed: u64) -> SimRng {
    SimRng::seed_from_u64(seed)
}

/// Mixes a seed with a stream label into a new seed (SplitMix64 finalizer), for independent
/// sub-streams such as "specimen", "noise", "drift".
pub fn derive_seed(seed: u64, stream: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = seed ^ h;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A standard normal draw.
#[inline]
pub fn normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    StandardNormal.sample(rng)
}

/// A uniform draw in `[0, 1)` with 53 random bits.
#[inline]
pub fn uniform<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    rng.random::<f64>()
}

/// ln(k!) exactly from a table for k < 32, Stirling series beyond (error < 1e-12).
#[inline]
fn ln_factorial(k: f64) -> f64 {
    if k < 32.0 {
        return ln_fact_small(k as usize);
    }
    let x = k + 1.0;
    // Stirling series for ln Γ(x).
    let inv = 1.0 / x;
    let inv2 = inv * inv;
    (x - 0.5) * x.ln() - x
        + 0.918_938_533_204_672_8
        + inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 / 1680.0)))
}

fn ln_fact_small(k: usize) -> f64 {
    // ln(k!) for k < 32, computed once.
    static TABLE: std::sync::OnceLock<[f64; 32]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0.0; 32];
        for i in 1..32 {
            t[i] = t[i - 1] + (i as f64).ln();
        }
        t
    })[k]
}

/// An exact Poisson sampler, fast for the counts of an electron detector.
///
/// Small means (λ < 10) use inversion by sequential search (one uniform); larger means use
/// Hörmann's transformed rejection with squeeze (PTRS, 1993), the method NumPy uses, which needs
/// about 1.1 uniform pairs per draw. Negative or NaN means give 0; an infinite mean gives
/// infinity.
///
/// The count is returned as an `f64`, so it never saturates: it is exact (an integer) for any
/// mean an instrument can produce, and for means beyond 2⁵³ it is the nearest double of the
/// draw (the Poisson spread, √λ, is then ≫ the spacing of doubles).
#[inline]
pub fn poisson<R: Rng + ?Sized>(rng: &mut R, lambda: f64) -> f64 {
    if lambda.is_nan() || lambda <= 0.0 {
        return 0.0;
    }
    if lambda == f64::INFINITY {
        return f64::INFINITY;
    }
    if lambda < 10.0 {
        // Sequential search: P(k) = P(k-1)·λ/k. Past k = 64 the tail mass is below 1e-30.
        let u: f64 = rng.random();
        let mut p = (-lambda).exp();
        let mut cdf = p;
        let mut k = 0usize;
        while u > cdf && k < 63 {
            k += 1;
            p *= lambda * INV[k];
            cdf += p;
        }
        return k as f64;
    }
    ptrs(rng, lambda)
}

/// Lanes of the batched sampler.
const LANES: usize = 32;

/// `e^{-x}` for `x ∈ [0, 64]` in single precision, branch-free so that it vectorizes:
/// `2^t` with `t = -x·log₂e` split into the nearest integer and a fraction in [-½, ½], the
/// fraction's power by a degree-7 Taylor series (relative error below 1e-6 up to x = 10 and
/// 1e-5 up to 64, set by the rounding of t).
#[inline(always)]
fn exp_neg_f32(x: f32) -> f32 {
    /// 1.5 · 2²³: adding it rounds a float of magnitude below 2²² to an integer, which then
    /// sits in the low mantissa bits (no float-to-int cast, whose saturation checks stop the
    /// loop from vectorizing).
    const ROUND: f32 = 12_582_912.0;
    let t = -x * std::f32::consts::LOG2_E;
    let shifted = t + ROUND;
    let n = shifted - ROUND;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let f = (t - n) * std::f32::consts::LN_2;
    let mut p = 1.0 / 5040.0;
    p = p * f + 1.0 / 720.0;
    p = p * f + 1.0 / 120.0;
    p = p * f + 1.0 / 24.0;
    p = p * f + 1.0 / 6.0;
    p = p * f + 0.5;
    p = p * f + 1.0;
    p = p * f + 1.0;
    let scale = f32::from_bits(((n_int + 127).max(0) as u32) << 23);
    p * scale
}

/// Largest mean (exclusive) that [`poisson_fill`] draws by batched inversion.
const MID_MAX: f32 = 64.0;
/// Terms of the inversion search: the mean plus twelve standard deviations at the largest mean
/// (searches end as soon as every lane of a batch has found its count).
const TERMS: usize = 160;

/// Reusable buffers of [`poisson_fill`] (after the first call of a given length it allocates
/// nothing).
#[derive(Debug, Clone, Default)]
pub struct PoissonScratch {
    uniforms: Vec<f32>,
    /// [`poisson_fill_approx`]: the exactly drawn means, their indices and counts, and the
    /// uniform pairs of the normals.
    exact_lambda: Vec<f32>,
    approx_index: Vec<u32>,
    approx_out: Vec<f32>,
    approx_lambda: Vec<f32>,
    mid_lambda: Vec<f32>,
    mid_uniform: Vec<f32>,
    mid_out: Vec<f32>,
    mid_index: Vec<u32>,
    /// [`poisson_fill_batched`]: the means of 64 and more, their positions, uniform pairs and
    /// squeeze results.
    large_index: Vec<u32>,
    large_lambda: Vec<f64>,
    large_u: Vec<f64>,
    large_v: Vec<f64>,
    large_k: Vec<f64>,
}

/// Draws Poisson counts for every mean in `lambda` into `out` (as `f32`).
///
/// Every mean gets one 24-bit uniform, drawn first in order. Means below 64 are then drawn by
/// inversion (sequential search `P(k) = P(k−1)·λ/k`) 32 at a time in single precision, four AVX2
/// vectors whose dependent multiply-add chains overlap, branch-free so that the compiler
/// vectorizes it (AVX2 selected at run time). When fewer than a quarter of the means lie in
/// [10, 64), those are gathered into batches of their own after the small ones, so that small
/// means do not wait for their long searches; a count depends only on its mean and uniform,
/// however the batches are formed.
/// Single precision resolves the probabilities to about 1e-5 of their size at a mean of 64 (6e-8
/// below 10), far below what any detector statistic can see. Means of 64 and more, and the
/// rare search that runs out of terms, use the exact scalar [`poisson`] (PTRS), in order,
/// after the uniforms. Negative or NaN means give 0. The stream of random numbers depends only
/// on the inputs, not on the CPU.
pub fn poisson_fill<R: Rng + ?Sized>(
    rng: &mut R,
    lambda: &[f32],
    out: &mut [f32],
    scratch: &mut PoissonScratch,
) {
    fill(rng, lambda, out, scratch, false);
}

/// [`poisson_fill`] with the means of 64 and more drawn by a batched PTRS instead of one at a
/// time: every such mean first gets a uniform pair (two 53-bit uniforms, in order, after the
/// 24-bit uniforms of every mean), whose squeeze test (most pairs end there) runs over all of
/// them at once, vectorized; a pair that fails the squeeze goes on through PTRS's full
/// acceptance test and, if rejected, its further pairs, one mean at a time in order
/// ([`poisson`]'s algorithm from that pair on). The counts follow the same distribution as
/// [`poisson_fill`]'s (those below 64 are the same counts for the same stream), from a
/// different stream of random numbers; the stream depends only on the inputs, not on the CPU.
pub fn poisson_fill_batched<R: Rng + ?Sized>(
    rng: &mut R,
    lambda: &[f32],
    out: &mut [f32],
    scratch: &mut PoissonScratch,
) {
    fill(rng, lambda, out, scratch, true);
}

/// [`poisson_fill`] (`batched_large` false) or [`poisson_fill_batched`] (true).
fn fill<R: Rng + ?Sized>(
    rng: &mut R,
    lambda: &[f32],
    out: &mut [f32],
    scratch: &mut PoissonScratch,
    batched_large: bool,
) {
    let n = lambda.len().min(out.len());
    let (lambda, out) = (&lambda[..n], &mut out[..n]);
    let uniforms = &mut scratch.uniforms;
    uniforms.resize(n.next_multiple_of(2), 0.0);
    for pair in uniforms.chunks_exact_mut(2) {
        let r = rng.next_u64();
        pair[0] = (r >> 40) as f32 * (1.0 / 16_777_216.0);
        pair[1] = ((r >> 8) & 0xFF_FFFF) as f32 * (1.0 / 16_777_216.0);
    }
    let mid = lambda
        .iter()
        .filter(|&&v| (10.0..MID_MAX).contains(&v))
        .count();
    if 4 * mid >= n {
        // Mostly means in [10, 64): one pass over everything (the few small means wait).
        if !inversion(lambda, &uniforms[..n], out, MID_MAX, TERMS) {
            return;
        }
    } else {
        let more = inversion(lambda, &uniforms[..n], out, 10.0, TERMS);
        if mid > 0 {
            // The means in [10, 64), gathered, so each batch holds only long searches.
            let s = &mut *scratch;
            // Room for every mean, so that later calls of this length allocate nothing.
            s.mid_lambda.clear();
            s.mid_lambda.reserve(n);
            s.mid_uniform.clear();
            s.mid_uniform.reserve(n);
            s.mid_index.clear();
            s.mid_index.reserve(n);
            s.mid_out.reserve(n);
            for (i, (&v, &u)) in lambda.iter().zip(&s.uniforms[..n]).enumerate() {
                if (10.0..MID_MAX).contains(&v) {
                    s.mid_lambda.push(v);
                    s.mid_uniform.push(u);
                    s.mid_index.push(i as u32);
                }
            }
            s.mid_out.resize(mid, 0.0);
            inversion(
                &s.mid_lambda,
                &s.mid_uniform,
                &mut s.mid_out,
                MID_MAX,
                TERMS,
            );
            for (&i, &c) in s.mid_index.iter().zip(&s.mid_out) {
                out[i as usize] = c;
            }
        } else if !more {
            return;
        }
    }
    if batched_large {
        ptrs_batched(rng, lambda, out, scratch);
    }
    // Large means (unless batched) and unfinished searches (marked -1): the exact scalar
    // sampler, in order.
    for (o, &v) in out.iter_mut().zip(lambda) {
        if (v >= MID_MAX && !(batched_large && batched_ptrs_mean(v))) || *o < 0.0 {
            *o = poisson(rng, f64::from(v)) as f32;
        }
    }
}

/// Whether [`ptrs_batched`] draws a mean: finite and at least [`MID_MAX`].
#[inline]
fn batched_ptrs_mean(v: f32) -> bool {
    v >= MID_MAX && v.is_finite()
}

/// The batched PTRS of [`poisson_fill_batched`]: writes a count into `out` for every mean
/// that [`batched_ptrs_mean`] takes.
fn ptrs_batched<R: Rng + ?Sized>(
    rng: &mut R,
    lambda: &[f32],
    out: &mut [f32],
    scratch: &mut PoissonScratch,
) {
    let s = scratch;
    s.large_index.clear();
    s.large_lambda.clear();
    s.large_u.clear();
    s.large_v.clear();
    for (i, &v) in lambda.iter().enumerate() {
        if batched_ptrs_mean(v) {
            s.large_index.push(i as u32);
            s.large_lambda.push(f64::from(v));
            s.large_u.push(rng.random::<f64>() - 0.5);
            s.large_v.push(rng.random::<f64>());
        }
    }
    if s.large_index.is_empty() {
        return;
    }
    s.large_k.resize(s.large_index.len(), 0.0);
    ptrs_squeeze(&s.large_lambda, &s.large_u, &s.large_v, &mut s.large_k);
    for (j, &i) in s.large_index.iter().enumerate() {
        let k = s.large_k[j];
        out[i as usize] = if k >= 0.0 {
            k
        } else {
            ptrs_from(rng, s.large_lambda[j], s.large_u[j], s.large_v[j])
        } as f32;
    }
}

/// PTRS's squeeze for each mean (≥ 10) with its pair `(u − ½, v)`: the count where the pair
/// is accepted by the squeeze, -1 where it is not (the count is then not decided). The same
/// arithmetic as [`Ptrs::try_pair`]'s squeeze, branch-free so that it vectorizes.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn ptrs_squeeze(lambda: &[f64], u: &[f64], v: &[f64], k: &mut [f64]) {
    for (((k, &lam), &u), &v) in k.iter_mut().zip(lambda).zip(u).zip(v) {
        let p = Ptrs::new(lam);
        let us = 0.5 - u.abs();
        let count = ((2.0 * p.a / us + p.b) * u + lam + 0.43).floor();
        *k = if us >= 0.07 && v <= p.vr { count } else { -1.0 };
    }
}

/// Inversion for means in (0, `max_mean`) with up to `terms` terms, 32 lanes at a time; other
/// means give 0, and a search still unfinished after `terms` terms gives -1. Returns whether
/// any mean is `max_mean` or more or any search was unfinished.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn inversion(lambda: &[f32], uni: &[f32], out: &mut [f32], max_mean: f32, terms: usize) -> bool {
    let mut more_work = false;
    let mut lam = [0.0f32; LANES];
    let mut u = [0.0f32; LANES];
    let inv = &INV_F32[1..terms.min(INV_F32.len())];
    for ((lc, uc), oc) in lambda
        .chunks(LANES)
        .zip(uni.chunks(LANES))
        .zip(out.chunks_mut(LANES))
    {
        let m = lc.len();
        lam[..m].copy_from_slice(lc);
        lam[m..].iter_mut().for_each(|v| *v = 0.0);
        u[..m].copy_from_slice(uc);
        let mut p = [0.0f32; LANES];
        let mut cdf = [0.0f32; LANES];
        let mut counts = [0i32; LANES];
        for l in 0..LANES {
            more_work |= lam[l] >= max_mean;
            // Means that are out of range, negative or NaN run zero iterations.
            lam[l] = if lam[l] > 0.0 && lam[l] < max_mean {
                lam[l]
            } else {
                0.0
            };
            p[l] = exp_neg_f32(lam[l]);
            cdf[l] = if lam[l] > 0.0 { p[l] } else { 2.0 };
        }
        // Terms four at a time, then a check whether any lane still searches (a lane whose
        // search ended counts nothing more: its cdf only grows).
        for block in inv.chunks(4) {
            for &inv in block {
                for l in 0..LANES {
                    counts[l] += i32::from(u[l] >= cdf[l]);
                    p[l] *= lam[l] * inv;
                    cdf[l] += p[l];
                }
            }
            let mut any = false;
            for l in 0..LANES {
                any |= u[l] >= cdf[l];
            }
            if !any {
                break;
            }
        }
        let mut res = [0.0f32; LANES];
        for l in 0..LANES {
            let unfinished = u[l] >= cdf[l];
            more_work |= unfinished;
            res[l] = if unfinished { -1.0 } else { counts[l] as f32 };
        }
        oc.copy_from_slice(&res[..m]);
    }
    more_work
}

/// 1/k in single precision for k ≤ [`TERMS`] (entry 0 unused).
const INV_F32: [f32; TERMS + 1] = {
    let mut t = [0.0; TERMS + 1];
    let mut k = 1;
    while k <= TERMS {
        t[k] = 1.0 / k as f32;
        k += 1;
    }
    t
};

/// 1/k for k < 64 (INV[0] unused).
const INV: [f64; 64] = {
    let mut t = [0.0; 64];
    let mut k = 1;
    while k < 64 {
        t[k] = 1.0 / k as f64;
        k += 1;
    }
    t
};

/// Means from which PTRS evaluates the log-probability in the cancellation-free form of
/// [`log_pmf_large`]: below it `-λ + k ln λ - ln k!` loses under 1e-8 to rounding (and the
/// draws of every realistic detector mean stay as they were); above it the three terms, each
/// ~λ ln λ, would cancel to nothing.
const STABLE_LOG_PMF: f64 = 1e7;

/// `ln P(k; λ)` for large `λ`, without the cancellation of `-λ + k ln λ - ln k!`: with
/// `t = (k - λ)/λ` it is `-λ·g(t) - ½ ln(2πk) - 1/(12k) + 1/(360k³)` (Stirling), where
/// `g(t) = (1+t) ln(1+t) - t`, summed as its series `Σ (-t)ⁿ/(n(n-1))` for small `|t|`.
fn log_pmf_large(k: f64, lambda: f64) -> f64 {
    if k <= 0.0 {
        return -lambda;
    }
    let t = (k - lambda) / lambda;
    let g = if t.abs() < 1e-2 {
        // Σ_{n≥2} (-t)ⁿ / (n(n-1)); eight terms reach 1e-20 relative at |t| = 0.01.
        let mut term = t * t;
        let mut sum = 0.0;
        for n in 2..10 {
            sum += term / (n * (n - 1)) as f64;
            term *= -t;
        }
        sum
    } else {
        (1.0 + t) * t.ln_1p() - t
    };
    let inv = 1.0 / k;
    -lambda * g - 0.5 * (std::f64::consts::TAU * k).ln() - inv * (1.0 / 12.0 - inv * inv / 360.0)
}

/// PTRS's constants for a mean (Hörmann 1993).
#[derive(Debug, Clone, Copy)]
struct Ptrs {
    b: f64,
    a: f64,
    vr: f64,
}

impl Ptrs {
    #[inline(always)]
    fn new(lambda: f64) -> Self {
        let slam = lambda.sqrt();
        let b = 0.931 + 2.53 * slam;
        let a = -0.059 + 0.02483 * b;
        let vr = 0.9277 - 3.6224 / (b - 2.0);
        Self { b, a, vr }
    }

    /// The count if the pair `(u − ½, v)` is accepted for `lambda`, `None` if rejected. Only
    /// the full test needs the logarithms in `logs`; most pairs end at the squeeze, so they
    /// are computed on first use (the draws are the same either way).
    #[inline(always)]
    fn try_pair(&self, lambda: f64, u: f64, v: f64, logs: &mut Option<(f64, f64)>) -> Option<f64> {
        let Self { b, a, vr } = *self;
        let us = 0.5 - u.abs();
        let k = ((2.0 * a / us + b) * u + lambda + 0.43).floor();
        if us >= 0.07 && v <= vr {
            return Some(k);
        }
        if k < 0.0 || (us < 0.013 && v > us) {
            return None;
        }
        let (loglam, log_inv_alpha) =
            *logs.get_or_insert_with(|| (lambda.ln(), (1.1239 + 1.1328 / (b - 3.4)).ln()));
        let log_pmf = if lambda < STABLE_LOG_PMF {
            -lambda + k * loglam - ln_factorial(k)
        } else {
            log_pmf_large(k, lambda)
        };
        (v.ln() + log_inv_alpha - (a / (us * us) + b).ln() <= log_pmf).then_some(k)
    }
}

fn ptrs<R: Rng + ?Sized>(rng: &mut R, lambda: f64) -> f64 {
    let p = Ptrs::new(lambda);
    let mut logs: Option<(f64, f64)> = None;
    loop {
        let u: f64 = rng.random::<f64>() - 0.5;
        let v: f64 = rng.random();
        if let Some(k) = p.try_pair(lambda, u, v, &mut logs) {
            return k;
        }
    }
}

/// PTRS for `lambda` (≥ 10) from its first pair `(u − ½, v)` on: the count of that pair if
/// accepted, else of the first accepted pair drawn after it.
fn ptrs_from<R: Rng + ?Sized>(rng: &mut R, lambda: f64, u: f64, v: f64) -> f64 {
    let p = Ptrs::new(lambda);
    let mut logs: Option<(f64, f64)> = None;
    if let Some(k) = p.try_pair(lambda, u, v, &mut logs) {
        return k;
    }
    loop {
        let u: f64 = rng.random::<f64>() - 0.5;
        let v: f64 = rng.random();
        if let Some(k) = p.try_pair(lambda, u, v, &mut logs) {
            return k;
        }
    }
}

/// Smallest mean [`poisson_fill_approx`] approximates: from here the approximation's total
/// variation distance to the Poisson distribution is below 0.004 and its variance within 0.3 %.
pub const APPROX_MIN_MEAN: f32 = 10.0;

/// [`poisson_fill`] with the means of `approx_from` or more (at least [`APPROX_MIN_MEAN`]) drawn
/// from an approximation a few times cheaper than an exact draw: the Poisson quantile at a
/// standard normal `z`, by the Cornish-Fisher expansion in the cumulants (all equal to λ),
/// rounded to the nearest count:
///
/// `k = max(0, ⌊λ + √λ·z + (z² − 1)/6 + (z³ − 7z)/(72√λ) + ½⌋)`.
///
/// The first correction gives the Poisson skewness `1/√λ`; the second, with the rounding, its
/// variance. Against the exact distribution (the approximation's distribution integrated over
/// `z`, not sampled): at λ = 10 the total variation distance is 0.0037, the mean exact to 1e-4
/// and the variance 0.28 % high; at λ = 64 0.0006 and 0.04 %; both shrink about as 1/λ. No
/// detector statistic of a frame sees that.
///
/// Means below `approx_from`, negative or NaN are drawn exactly: gathered in order and drawn
/// first by [`poisson_fill`]. Then every pixel gets a normal from the Box-Muller transform of
/// 32-bit uniform pairs (|z| up to 6.8; one 64-bit draw per two pixels) and the approximated
/// ones keep their quantile; logarithm, sine and cosine are single-precision polynomials
/// (error below 1e-6), branch-free so that the passes vectorize. With no mean at or above
/// `approx_from` the output and the random stream are exactly `poisson_fill`'s; an
/// `approx_from` that is NaN or infinite draws everything exactly.
pub fn poisson_fill_approx<R: Rng + ?Sized>(
    rng: &mut R,
    lambda: &[f32],
    out: &mut [f32],
    scratch: &mut PoissonScratch,
    approx_from: f32,
) {
    let n = lambda.len().min(out.len());
    let (lambda, out) = (&lambda[..n], &mut out[..n]);
    let from = approx_from.max(APPROX_MIN_MEAN);
    if !from.is_finite() || !lambda.iter().any(|&v| v >= from) {
        poisson_fill(rng, lambda, out, scratch);
        return;
    }
    // The exactly drawn means, gathered (in order) and drawn first by `poisson_fill`.
    let mut exact = std::mem::take(&mut scratch.exact_lambda);
    let mut index = std::mem::take(&mut scratch.approx_index);
    let mut counts = std::mem::take(&mut scratch.approx_out);
    exact.clear();
    index.clear();
    for (i, &v) in lambda.iter().enumerate() {
        if !(v >= from) {
            exact.push(v);
            index.push(i as u32);
        }
    }
    counts.resize(exact.len(), 0.0);
    poisson_fill(rng, &exact, &mut counts, scratch);
    // Then a normal for every pixel (one 64-bit draw per pair: two 32-bit uniforms, the first
    // in (0, 1]), its quantile count, and the exact counts put back over theirs.
    let uni = &mut scratch.approx_lambda;
    uni.resize(n.next_multiple_of(2), 0.0);
    for pair in uni.chunks_exact_mut(2) {
        pair.copy_from_slice(&uniform_pair(rng.next_u64()));
    }
    let z = &mut scratch.uniforms;
    z.resize(uni.len(), 0.0);
    box_muller_pairs(uni, z);
    out.copy_from_slice(&z[..n]);
    quantile_counts(lambda, out);
    for (&i, &k) in index.iter().zip(&counts) {
        out[i as usize] = k;
    }
    (
        scratch.exact_lambda,
        scratch.approx_index,
        scratch.approx_out,
    ) = (exact, index, counts);
}

/// Two 32-bit uniforms from one 64-bit draw, as Box-Muller takes them: the high half in
/// (0, 1] (its logarithm is finite), the low half in [0, 1] (1 only where rounding to `f32`
/// takes it there, an angle of 2π, the same as 0).
fn uniform_pair(r: u64) -> [f32; 2] {
    const SCALE: f32 = 1.0 / 4_294_967_296.0;
    [
        ((r >> 32) as f32 + 0.5) * SCALE,
        (r & 0xFFFF_FFFF) as f32 * SCALE,
    ]
}

/// Standard normals from uniform pairs `(u₁ ∈ (0, 1], u₂ ∈ [0, 1))`, two per pair:
/// `√(−2 ln u₁)·(cos 2πu₂, sin 2πu₂)`.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn box_muller_pairs(uni: &[f32], out: &mut [f32]) {
    for (u, z) in uni.chunks_exact(2).zip(out.chunks_exact_mut(2)) {
        let r = (-2.0 * ln_f32(u[0])).max(0.0).sqrt();
        let (s, c) = sincos_2pi_f32(u[1]);
        z[0] = r * c;
        z[1] = r * s;
    }
}

/// Replaces each normal `z` in `z_to_k` by the rounded Cornish-Fisher quantile of Poisson(λ)
/// (see [`poisson_fill_approx`]).
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn quantile_counts(lambda: &[f32], z_to_k: &mut [f32]) {
    for (&lam, z) in lambda.iter().zip(z_to_k.iter_mut()) {
        let (s, x) = (lam.sqrt(), *z);
        let q = lam + s * x + (x * x - 1.0) * (1.0 / 6.0) + (x * x * x - 7.0 * x) / (72.0 * s);
        *z = (q + 0.5).floor().max(0.0);
    }
}

/// `ln x` for positive normal `x` in single precision (relative error below 1e-6 of `|ln x|`,
/// absolute below 1e-7 near 1): `x = m·2^e` with `m ∈ [√½, √2)`, `ln m = 2 atanh s`,
/// `s = (m − 1)/(m + 1)`, by its series to `s⁹`.
#[inline(always)]
fn ln_f32(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xFF) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F80_0000);
    let big = m > std::f32::consts::SQRT_2;
    m = if big { m * 0.5 } else { m };
    e += i32::from(big);
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    e as f32 * std::f32::consts::LN_2 + 2.0 * s * series
}

/// `(sin 2πt, cos 2πt)` for `t ∈ [0, 1]` in single precision (error below 1e-6): the nearest
/// quarter turn `q/4` taken out, the rest (`|x| ≤ π/4`) by Taylor polynomials, then rotated
/// back by `q` quarter turns.
#[inline(always)]
fn sincos_2pi_f32(t: f32) -> (f32, f32) {
    let q = (4.0 * t + 0.5).floor();
    let x = (t - 0.25 * q) * std::f32::consts::TAU;
    let x2 = x * x;
    let s = x * (1.0 - x2 * (1.0 / 6.0 - x2 * (1.0 / 120.0 - x2 * (1.0 / 5040.0))));
    let c = 1.0 - x2 * (0.5 - x2 * (1.0 / 24.0 - x2 * (1.0 / 720.0 - x2 * (1.0 / 40_320.0))));
    // q mod 4, as a float (a float-to-integer cast would keep the loop from vectorizing).
    let quadrant = q - 4.0 * (0.25 * q).floor();
    let odd = quadrant == 1.0 || quadrant == 3.0;
    let (s, c) = if odd { (c, -s) } else { (s, c) };
    if quadrant >= 2.0 { (-s, -c) } else { (s, c) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    /// Mean and (biased) variance of `xs`.
    fn mean_var(xs: impl IntoIterator<Item = f64> + Clone) -> (f64, f64) {
        let n = xs.clone().into_iter().count() as f64;
        let m = xs.clone().into_iter().sum::<f64>() / n;
        let v = xs.into_iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
        (m, v)
    }

    /// Mean and (biased) variance of `n` Poisson draws `xs` of mean `lam`; asserts the mean
    /// within 5 standard errors `sqrt(λ/n)` of `lam`.
    fn poisson_mean_var(xs: impl IntoIterator<Item = f64> + Clone, lam: f64) -> (f64, f64) {
        let n = xs.clone().into_iter().count() as f64;
        let (m, v) = mean_var(xs);
        assert!((m - lam).abs() < 5.0 * (lam / n).sqrt(), "λ={lam} mean {m}");
        (m, v)
    }

    /// Asserts the (biased) variance `v` of `n` Poisson draws of mean `lam` within 5 standard
    /// errors of `lam` (the sample variance's variance is about `(2λ² + λ)/n`).
    fn assert_poisson_var(v: f64, lam: f64, n: usize) {
        assert!(
            (v - lam).abs() < 5.0 * ((2.0 * lam * lam + lam) / n as f64).sqrt(),
            "λ={lam} var {v}"
        );
    }

    /// `n` Poisson draws of mean `lam` and their (biased) sample variance;
    /// asserts the mean within 5 standard errors `sqrt(λ/n)` of `lam`.
    fn poisson_sample(rng: &mut SimRng, lam: f64, n: usize) -> (Vec<f64>, f64) {
        let xs: Vec<f64> = (0..n).map(|_| poisson(rng, lam)).collect();
        let (_, v) = poisson_mean_var(xs.iter().copied(), lam);
        (xs, v)
    }

    /// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
    fn erf(x: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
        let poly = t
            * (0.254_829_592
                + t * (-0.284_496_736
                    + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
        (1.0 - poly * (-x * x).exp()).copysign(x)
    }

    /// The single-precision logarithm, sine and cosine of the approximate sampler against
    /// double precision.
    #[test]
    fn ln_and_sincos_f32_match_double_precision() {
        let mut x = 1.0e-10f32;
        while x <= 4.0 {
            let (got, want) = (f64::from(ln_f32(x)), f64::from(x).ln());
            assert!(
                (got - want).abs() <= 1e-6 * want.abs() + 2e-7,
                "ln {x}: {got} vs {want}"
            );
            x *= 1.000_37;
        }
        for i in 0..=200_000u32 {
            let t = i as f32 / 200_000.0;
            let (s, c) = sincos_2pi_f32(t);
            let a = std::f64::consts::TAU * f64::from(t);
            assert!((f64::from(s) - a.sin()).abs() < 1e-6, "sin at t = {t}: {s}");
            assert!((f64::from(c) - a.cos()).abs() < 1e-6, "cos at t = {t}: {c}");
        }
    }

    /// The rounded Cornish-Fisher quantile against the Poisson distribution's closed form: the
    /// distribution it gives a standard normal `z` (exact: the count is nondecreasing in `z`,
    /// so `P(k) = Φ(b_{k+1}) − Φ(b_k)` with `b_k` the smallest `z` that gives `k`, found by
    /// bisection; no sampling) has the total variation distance, mean and variance the docs state.
    #[test]
    fn approx_quantile_reproduces_the_poisson_distribution() {
        let count = |lam: f32, z: f64| {
            let mut k = [z as f32];
            quantile_counts(&[lam], &mut k);
            f64::from(k[0])
        };
        let phi = |x: f64| 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
        for (lam, tv_max, var_max) in [
            (10.0f32, 0.004, 0.0032),
            (17.3, 0.0027, 0.0020),
            (64.0, 0.0007, 0.0006),
            (1000.0, 0.0002, 0.0001),
        ] {
            let l = f64::from(lam);
            // b_k: the smallest z in [-9, 9] whose count is at least k.
            let boundary = |k: f64| {
                let (mut lo, mut hi) = (-9.0f64, 9.0f64);
                if count(lam, lo) >= k {
                    return lo;
                }
                for _ in 0..60 {
                    let mid = 0.5 * (lo + hi);
                    if count(lam, mid) >= k {
                        hi = mid
                    } else {
                        lo = mid
                    }
                }
                hi
            };
            let (k_lo, k_hi) = (count(lam, -9.0), count(lam, 9.0));
            let (mut tv, mut mean, mut m2, mut covered) = (0.0, 0.0, 0.0, 0.0);
            let log_pmf = |k: f64| -l + k * l.ln() - ln_factorial(k);
            let mut k = 0.0;
            while k <= k_hi + 20.0 {
                let p = if k < k_lo || k > k_hi {
                    0.0
                } else {
                    phi(boundary(k + 1.0).min(9.0)) - phi(boundary(k))
                };
                tv += 0.5 * (p - log_pmf(k).exp()).abs();
                mean += k * p;
                m2 += k * k * p;
                covered += p;
                k += 1.0;
            }
            let (mean, var) = (mean / covered, m2 / covered - (mean / covered).powi(2));
            assert!(tv < tv_max, "λ={lam}: total variation {tv}");
            assert!((mean - l).abs() < 2e-3 * l.sqrt(), "λ={lam}: mean {mean}");
            assert!((var / l - 1.0).abs() < var_max, "λ={lam}: variance {var}");
        }
    }

    /// The Box-Muller normals: moments, the Kolmogorov-Smirnov distance to Φ, and no
    /// correlation within or between pairs.
    #[test]
    fn box_muller_normals_are_standard_normal() {
        let mut rng = seeded(31);
        let n = 200_000;
        let uni: Vec<f32> = (0..n / 2)
            .flat_map(|_| uniform_pair(rng.next_u64()))
            .collect();
        let mut z = vec![0.0f32; n];
        box_muller_pairs(&uni, &mut z);
        let zd: Vec<f64> = z.iter().map(|&v| f64::from(v)).collect();
        let (m, v) = mean_var(zd.iter().copied());
        let k4 = zd.iter().map(|x| (x - m).powi(4)).sum::<f64>() / n as f64 / (v * v);
        assert!(m.abs() < 5.0 / (n as f64).sqrt(), "mean {m}");
        assert!(
            (v - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(),
            "variance {v}"
        );
        assert!(
            (k4 - 3.0).abs() < 5.0 * (24.0 / n as f64).sqrt(),
            "kurtosis {k4}"
        );
        let mut sorted = zd.clone();
        sorted.sort_by(f64::total_cmp);
        let phi = |x: f64| 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
        let ks = sorted
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = phi(x);
                (f - i as f64 / n as f64)
                    .abs()
                    .max(((i + 1) as f64 / n as f64 - f).abs())
            })
            .fold(0.0, f64::max);
        // 1.63/√n is the 1 % critical value.
        assert!(ks < 1.63 / (n as f64).sqrt(), "KS distance {ks}");
        for lag in [1, 2] {
            let c = zd.windows(lag + 1).map(|w| w[0] * w[lag]).sum::<f64>() / n as f64;
            assert!(
                c.abs() < 5.0 / (n as f64).sqrt(),
                "lag-{lag} correlation {c}"
            );
        }
    }

    /// `poisson_fill_approx` end to end: exact below the threshold (`poisson_fill`'s counts for
    /// those means alone), nothing approximated gives `poisson_fill`'s output and stream, and the
    /// approximated means have the Poisson mean and variance.
    #[test]
    fn approx_fill_is_exact_below_its_threshold_and_poisson_above() {
        let mut g = seeded(5);
        let lam: Vec<f32> = (0..5000)
            .map(|i| {
                if i % 3 == 0 {
                    20.0 + 180.0 * g.random::<f32>()
                } else {
                    19.9 * g.random::<f32>()
                }
            })
            .collect();
        let (mut a, mut b) = (vec![0.0f32; lam.len()], vec![0.0f32; lam.len()]);
        let mut sc = PoissonScratch::default();
        let (mut ra, mut rb) = (seeded(8), seeded(8));
        poisson_fill(&mut ra, &lam, &mut a, &mut sc);
        poisson_fill_approx(&mut rb, &lam, &mut b, &mut sc, f32::INFINITY);
        assert_eq!(a, b);
        assert_eq!(ra.next_u64(), rb.next_u64());
        // The means below 20 are those of `poisson_fill` over them alone, drawn first.
        let low: Vec<f32> = lam.iter().copied().filter(|&l| l < 20.0).collect();
        let mut low_counts = vec![0.0f32; low.len()];
        let (mut ra, mut rb) = (seeded(8), seeded(8));
        poisson_fill(&mut ra, &low, &mut low_counts, &mut sc);
        poisson_fill_approx(&mut rb, &lam, &mut b, &mut sc, 20.0);
        let mut low_counts = low_counts.into_iter();
        let mut approximated = 0;
        for (&l, &y) in lam.iter().zip(&b) {
            if l < 20.0 {
                assert_eq!(
                    Some(y),
                    low_counts.next(),
                    "an exact mean {l} drawn differently"
                );
            } else {
                approximated += 1;
                assert!(y >= 0.0 && y == y.floor() && (y - l).abs() < 8.0 * l.sqrt());
            }
        }
        assert_eq!(approximated, lam.len().div_ceil(3));
        for l in [12.0f32, 300.0] {
            let n = 200_000;
            let mut out = vec![0.0f32; n];
            poisson_fill_approx(&mut seeded(77), &vec![l; n], &mut out, &mut sc, 10.0);
            let xs: Vec<f64> = out.iter().map(|&v| f64::from(v)).collect();
            let l = f64::from(l);
            let (m, v) = poisson_mean_var(xs.iter().copied(), l);
            assert!((v / l - 1.0).abs() < 0.02, "λ={l}: variance {v}");
            // Neighbouring pixels are independent.
            let c = xs.windows(2).map(|w| (w[0] - m) * (w[1] - m)).sum::<f64>() / (n as f64 * v);
            assert!(
                c.abs() < 5.0 / (n as f64).sqrt(),
                "λ={l}: lag-1 correlation {c}"
            );
        }
    }

    #[test]
    fn poisson_moments_match_for_small_and_large_means() {
        let mut rng = seeded(42);
        for &lam in &[0.3, 2.5, 9.9, 10.0, 25.0, 2500.0] {
            let n = 200_000;
            let (_, v) = poisson_sample(&mut rng, lam, n);
            assert_poisson_var(v, lam, n);
        }
    }

    #[test]
    fn poisson_pmf_matches_at_lambda_12() {
        let mut rng = seeded(7);
        let lam: f64 = 12.0;
        let n = 400_000usize;
        let mut hist = [0usize; 40];
        for _ in 0..n {
            let k = poisson(&mut rng, lam) as usize;
            if k < 40 {
                hist[k] += 1;
            }
        }
        for (k, &count) in hist.iter().enumerate().take(24).skip(4) {
            let pmf = (-lam + k as f64 * lam.ln() - ln_factorial(k as f64)).exp();
            let expected = pmf * n as f64;
            let sd = expected.sqrt();
            assert!(
                (count as f64 - expected).abs() < 5.0 * sd,
                "k={k}: {count} vs {expected}"
            );
        }
    }

    #[test]
    fn ln_factorial_is_accurate() {
        let mut exact = 0.0f64;
        for k in 1..200u32 {
            exact += f64::from(k).ln();
            assert!(
                (ln_factorial(f64::from(k)) - exact).abs() < 1e-9 * exact.max(1.0),
                "k={k}"
            );
        }
    }

    #[test]
    fn batched_poisson_matches_the_distribution() {
        let mut rng = seeded(11);
        for &lam in &[
            0.05f32, 1.0, 4.8, 9.5, 10.0, 12.0, 33.0, 60.0, 63.9, 64.0, 150.0,
        ] {
            let n = 200_000;
            let means = vec![lam; n];
            let mut out = vec![0.0f32; n];
            poisson_fill(&mut rng, &means, &mut out, &mut PoissonScratch::default());
            assert!(out.iter().all(|v| *v >= 0.0 && v.fract() == 0.0));
            let l = f64::from(lam);
            let (_, v) = poisson_mean_var(out.iter().map(|&v| f64::from(v)), l);
            assert_poisson_var(v, l, n);
            // P(0) = e^{-λ}.
            let p0 = out.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
            let e0 = (-l).exp();
            assert!(
                (p0 - e0).abs() < 5.0 * (e0 * (1.0 - e0) / n as f64).sqrt() + 1e-6,
                "λ={lam} P0 {p0} vs {e0}"
            );
        }
        // Mixed means, odd length, zeros and NaN.
        let means = [0.0f32, f32::NAN, -1.0, 3.0, 25.0];
        let mut out = [9.0f32; 5];
        poisson_fill(&mut rng, &means, &mut out, &mut PoissonScratch::default());
        assert_eq!(&out[..3], &[0.0, 0.0, 0.0]);
        assert!(out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn batched_pmf_matches_for_interleaved_small_mid_and_large_means() {
        // Means 3, 40 and 90 interleaved: the first pass, the gathered pass and PTRS each get
        // their own pixels back, with the Poisson pmf.
        let mut rng = seeded(5);
        let lams = [3.0f32, 40.0, 90.0];
        let n = 3 * 150_000;
        let means: Vec<f32> = (0..n).map(|i| lams[i % 3]).collect();
        let mut out = vec![0.0f32; n];
        poisson_fill(&mut rng, &means, &mut out, &mut PoissonScratch::default());
        for (j, &lam) in lams.iter().enumerate() {
            let l = f64::from(lam);
            let mut hist = vec![0usize; 200];
            for v in out.iter().skip(j).step_by(3) {
                hist[*v as usize] += 1;
            }
            let m = n / 3;
            let lo = (l - 3.0 * l.sqrt()).max(0.0) as usize;
            let hi = (l + 3.0 * l.sqrt()) as usize;
            for (k, &count) in hist.iter().enumerate().take(hi + 1).skip(lo) {
                let pmf = (-l + k as f64 * l.ln() - ln_factorial(k as f64)).exp();
                let expected = pmf * m as f64;
                assert!(
                    (count as f64 - expected).abs() < 5.0 * expected.sqrt() + 1.0,
                    "λ={lam} k={k}: {count} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn a_count_does_not_depend_on_how_the_batches_are_formed() {
        // The same 100 leading means and uniforms, followed once by small means (the means in
        // [10, 64) are gathered) and once by mid-range ones (one pass over everything).
        let head: Vec<f32> = (0..100)
            .map(|i| [3.0, 40.0, 0.5, 20.0, 63.0][i % 5])
            .collect();
        let run = |tail: f32| {
            let mut means = head.clone();
            means.extend(std::iter::repeat_n(tail, 900));
            let mut out = vec![0.0f32; means.len()];
            poisson_fill(
                &mut seeded(9),
                &means,
                &mut out,
                &mut PoissonScratch::default(),
            );
            out.truncate(100);
            out
        };
        assert_eq!(run(2.0), run(30.0));
    }

    #[test]
    fn every_count_is_its_own_inversion_whatever_the_batch() {
        // Means spread over (0, 64), small and mid-range mixed, some 0, NaN or ≥ 64: each inverted count
        // equals the inversion of its own mean and uniform alone (one lane).
        let mut rng = seeded(21);
        let means: Vec<f32> = (0..3000)
            .map(|i| match i % 97 {
                0 => 0.0,
                1 => f32::NAN,
                2 => 80.0,
                _ => 64.0 * uniform(&mut rng) as f32,
            })
            .collect();
        let mut out = vec![0.0f32; means.len()];
        let mut scratch = PoissonScratch::default();
        poisson_fill(&mut seeded(4), &means, &mut out, &mut scratch);
        let uniforms = scratch.uniforms.clone();
        for (i, &v) in means.iter().enumerate() {
            if !(v > 0.0 && v < MID_MAX) {
                assert!(v >= MID_MAX || out[i] == 0.0, "mean {v}: {}", out[i]);
                continue;
            }
            let mut alone = [0.0f32];
            inversion(&[v], &uniforms[i..=i], &mut alone, MID_MAX, TERMS);
            if alone[0] >= 0.0 {
                assert_eq!(out[i], alone[0], "mean {v} at {i}");
            }
        }
    }

    /// `ln k!` for `k ≤ max` by summing logarithms (independent of [`ln_factorial`]).
    fn ln_factorials(max: usize) -> Vec<f64> {
        let mut t = vec![0.0f64; max + 1];
        for k in 1..=max {
            t[k] = t[k - 1] + (k as f64).ln();
        }
        t
    }

    #[test]
    fn batched_ptrs_matches_the_poisson_pmf() {
        // Means from the batch's lower end to far beyond it: the histogram within 5σ of the
        // pmf over ±3 standard deviations, and the mean and variance.
        let mut rng = seeded(13);
        let mut scratch = PoissonScratch::default();
        for &lam in &[64.0f32, 64.5, 100.0, 700.0, 3000.0, 2.5e5] {
            let n = 200_000;
            let means = vec![lam; n];
            let mut out = vec![-1.0f32; n];
            poisson_fill_batched(&mut rng, &means, &mut out, &mut scratch);
            assert!(out.iter().all(|v| *v >= 0.0 && v.fract() == 0.0), "λ={lam}");
            let l = f64::from(lam);
            let (_, v) = poisson_mean_var(out.iter().map(|&v| f64::from(v)), l);
            assert_poisson_var(v, l, n);
            let (lo, hi) = ((l - 3.0 * l.sqrt()) as usize, (l + 3.0 * l.sqrt()) as usize);
            let lf = ln_factorials(hi + 1);
            // Histogram bins of one count up to λ = 3000, of 40 counts beyond.
            let width = if l > 5000.0 { 40 } else { 1 };
            let mut hist = vec![0usize; hi - lo + 1];
            for &x in &out {
                if let Some(h) = (x as usize).checked_sub(lo).and_then(|j| hist.get_mut(j)) {
                    *h += 1;
                }
            }
            let mut k = lo;
            while k + width <= hi {
                let count = hist[k - lo..k - lo + width].iter().sum::<usize>() as f64;
                let expected: f64 = (k..k + width)
                    .map(|j| (-l + j as f64 * l.ln() - lf[j]).exp())
                    .sum::<f64>()
                    * n as f64;
                assert!(
                    (count - expected).abs() < 5.0 * expected.sqrt() + 1.0,
                    "λ={lam} k={k}: {count} vs {expected}"
                );
                k += width;
            }
        }
    }

    #[test]
    fn batched_fill_keeps_the_counts_below_64_and_handles_odd_means() {
        // The same stream of uniforms: every count of a mean below 64 is poisson_fill's.
        let mut rng = seeded(17);
        let means: Vec<f32> = (0..5000)
            .map(|i| match i % 7 {
                0 => 500.0 * uniform(&mut rng) as f32 + 64.0,
                1 => 64.0 * uniform(&mut rng) as f32,
                _ => 9.0 * uniform(&mut rng) as f32,
            })
            .collect();
        let (mut a, mut b) = (vec![0.0f32; 5000], vec![0.0f32; 5000]);
        let mut scratch = PoissonScratch::default();
        poisson_fill(&mut seeded(2), &means, &mut a, &mut scratch);
        poisson_fill_batched(&mut seeded(2), &means, &mut b, &mut scratch);
        for (i, &m) in means.iter().enumerate() {
            if m < MID_MAX {
                assert_eq!(a[i], b[i], "mean {m} at {i}");
            }
        }
        // Zero, negative, NaN, infinite and huge means.
        let means = [0.0f32, -3.0, f32::NAN, f32::INFINITY, 2e10, 64.0];
        let mut out = [7.0f32; 6];
        poisson_fill_batched(&mut rng, &means, &mut out, &mut scratch);
        assert_eq!(&out[..3], &[0.0, 0.0, 0.0]);
        assert_eq!(out[3], f32::INFINITY);
        assert!((f64::from(out[4]) / 2e10 - 1.0).abs() < 1e-3, "{}", out[4]);
        assert!(out[5] >= 0.0 && out[5].fract() == 0.0);
    }

    #[test]
    fn vectorized_squeeze_is_the_scalar_squeeze() {
        // Where the batched squeeze accepts a pair, the scalar PTRS step accepts it with the
        // same count; where it does not, the squeeze's condition fails.
        let mut rng = seeded(23);
        let n = 20_000;
        let lam: Vec<f64> = (0..n)
            .map(|_| 64.0 * (1e4f64).powf(uniform(&mut rng)))
            .collect();
        let u: Vec<f64> = (0..n).map(|_| uniform(&mut rng) - 0.5).collect();
        let v: Vec<f64> = (0..n).map(|_| uniform(&mut rng)).collect();
        let mut k = vec![0.0; n];
        ptrs_squeeze(&lam, &u, &v, &mut k);
        let mut accepted = 0;
        for i in 0..n {
            let p = Ptrs::new(lam[i]);
            let us = 0.5 - u[i].abs();
            if k[i] >= 0.0 {
                accepted += 1;
                assert_eq!(p.try_pair(lam[i], u[i], v[i], &mut None), Some(k[i]));
            } else {
                assert!(k[i] == -1.0 && !(us >= 0.07 && v[i] <= p.vr));
            }
        }
        assert!(accepted > n / 2 && accepted < n, "{accepted}");
    }

    #[test]
    fn fast_exp_is_accurate() {
        // Used for means below 64.
        for i in 0..=6400 {
            let x = i as f32 * 0.01;
            let rel = (exp_neg_f32(x) as f64 / (-(x as f64)).exp() - 1.0).abs();
            let tol = if x <= 10.0 { 1e-6 } else { 1e-5 };
            assert!(rel < tol, "x={x}: {rel}");
        }
    }

    #[test]
    fn stable_log_pmf_matches_the_direct_formula() {
        for &lam in &[50.0, 1e4, 2e6] {
            let sd: f64 = f64::sqrt(lam);
            for dk in [-4.0, -1.0, 0.0, 0.5, 3.0] {
                let k = (lam + dk * sd).floor();
                let direct = -lam + k * lam.ln() - ln_factorial(k);
                let stable = log_pmf_large(k, lam);
                assert!(
                    (direct - stable).abs() < 1e-6,
                    "λ={lam} k={k}: {direct} vs {stable}"
                );
            }
        }
    }

    #[test]
    fn huge_means_do_not_saturate() {
        // A u32 count saturated at 4.29e9; the draws must follow N(λ, λ) however large λ is.
        let mut rng = seeded(3);
        for &lam in &[1e10, 3.5e12, 1e18] {
            let (xs, v) = poisson_sample(&mut rng, lam, 2000);
            assert!((v / lam - 1.0).abs() < 0.2, "λ={lam} var/λ {}", v / lam);
            assert!(xs.iter().all(|x| x.fract() == 0.0), "counts are integers");
        }
        assert_eq!(poisson(&mut rng, f64::INFINITY), f64::INFINITY);
        // The batched sampler too (f32 counts).
        let lam = vec![2e10f32; 512];
        let mut out = vec![0.0f32; 512];
        poisson_fill(&mut rng, &lam, &mut out, &mut PoissonScratch::default());
        let m = out.iter().map(|&x| f64::from(x)).sum::<f64>() / 512.0;
        assert!((m / 2e10 - 1.0).abs() < 1e-4, "batched mean {m}");
    }

    #[test]
    fn zero_and_nan_means_give_zero() {
        let mut rng = seeded(0);
        assert_eq!(poisson(&mut rng, 0.0), 0.0);
        assert_eq!(poisson(&mut rng, -1.0), 0.0);
        assert_eq!(poisson(&mut rng, f64::NAN), 0.0);
    }

    #[test]
    fn derived_seeds_differ_by_stream() {
        assert_ne!(derive_seed(1, "noise"), derive_seed(1, "drift"));
        assert_ne!(derive_seed(1, "noise"), derive_seed(2, "noise"));
        assert_eq!(derive_seed(5, "x"), derive_seed(5, "x"));
    }
}
