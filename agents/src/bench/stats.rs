//! The statistics a benchmark reports, following rliable (Agarwal et al. 2021, "Deep
//! reinforcement learning at the edge of the statistical precipice"):
//!
//! - [`mean_ci95`]: a mean with the half-width `1.96 · sd / √n` of its normal-approximation
//!   95 % interval (`sd` with `n − 1`; 0 for fewer than two values);
//! - [`normalized`]: `(score − low) / (high − low)` against two reference scores;
//! - [`iqm`]: the interquartile mean, `scipy.stats.trim_mean(x, 0.25)`: sort the `n` values,
//!   drop `⌊0.25 n⌋` from each end, average the rest (rliable calls exactly this on the
//!   flattened runs × tasks matrix);
//! - [`stratified_bootstrap_iqm`]: a percentile interval of the IQM from a stratified
//!   bootstrap: each resample draws, for every task independently, as many runs as the task has,
//!   with replacement, from that task's runs; the interval is the `(1 ± c)/2` quantiles of the
//!   resampled IQMs ([`quantile`], linear interpolation as numpy's default);
//! - [`performance_profile`]: for each threshold `τ`, the fraction of runs whose score is
//!   strictly above `τ`, computed per task and averaged over tasks (rliable's
//!   `create_performance_profile`, score distributions).
//!
//! ```
//! use scopegym_agents::bench::stats::{iqm, quantile};
//! // 8 values: drop 2 at each end, average 3, 4, 5, 6.
//! assert_eq!(iqm(&[8.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0]), Some(4.5));
//! assert_eq!(quantile(&[0.0, 10.0], 0.25), 2.5);
//! ```

use rand::Rng;
use scopegym_envs::rng::seeded;

/// Mean and 95 % half-width `1.96 · sd / √n` (sample standard deviation, `n − 1`); the
/// half-width is 0 for fewer than two values, and both are NaN for none.
pub fn mean_ci95(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, 1.96 * (var / n as f64).sqrt())
}

/// `(score − low) / (high − low)`: 0 at the low reference, 1 at the high one. NaN when the two
/// references are equal (no scale to normalize by).
pub fn normalized(score: f64, low: f64, high: f64) -> f64 {
    let span = high - low;
    if span == 0.0 || !span.is_finite() {
        return f64::NAN;
    }
    (score - low) / span
}

/// The trimmed mean of `values` cutting `proportion` of the values at each end:
/// `scipy.stats.trim_mean` (sort; drop `⌊proportion · n⌋` values from each end; average the
/// rest). `None` for no values or a `proportion` outside `[0, 0.5)`.
pub fn trim_mean(values: &[f64], proportion: f64) -> Option<f64> {
    let n = values.len();
    if n == 0 || !(0.0..0.5).contains(&proportion) {
        return None;
    }
    let mut s = values.to_vec();
    s.sort_by(f64::total_cmp);
    let cut = (proportion * n as f64).floor() as usize;
    let kept = &s[cut..n - cut];
    Some(kept.iter().sum::<f64>() / kept.len() as f64)
}

/// The interquartile mean: [`trim_mean`] with proportion 0.25.
pub fn iqm(values: &[f64]) -> Option<f64> {
    trim_mean(values, 0.25)
}

/// The `p`-quantile of `sorted` (ascending) with linear interpolation between order statistics
/// (numpy's default, `h = (n − 1) p`). NaN for an empty slice.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    let h = (n - 1) as f64 * p.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// The IQM of the runs of every task pooled (`per_task[t]` holds task `t`'s runs).
pub fn pooled_iqm(per_task: &[Vec<f64>]) -> Option<f64> {
    let all: Vec<f64> = per_task.iter().flatten().copied().collect();
    iqm(&all)
}

/// A stratified-bootstrap percentile interval of [`pooled_iqm`]: `resamples` resamples, each
/// drawing for every task `t` independently `per_task[t].len()` runs with replacement from
/// `per_task[t]` (a generator seeded with `seed`, tasks in the given order, runs by uniform
/// index), then the `(1 − confidence)/2` and `(1 + confidence)/2` [`quantile`]s of the
/// resampled IQMs. `None` when there are no runs or no resamples.
pub fn stratified_bootstrap_iqm(
    per_task: &[Vec<f64>],
    resamples: usize,
    confidence: f64,
    seed: u64,
) -> Option<[f64; 2]> {
    let total: usize = per_task.iter().map(Vec::len).sum();
    if total == 0 || resamples == 0 {
        return None;
    }
    let mut rng = seeded(seed);
    let mut buf = Vec::with_capacity(total);
    let mut stats = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        buf.clear();
        for runs in per_task.iter().filter(|r| !r.is_empty()) {
            for _ in 0..runs.len() {
                buf.push(runs[rng.random_range(0..runs.len())]);
            }
        }
        stats.push(iqm(&buf)?);
    }
    stats.sort_by(f64::total_cmp);
    let a = (1.0 - confidence) / 2.0;
    Some([quantile(&stats, a), quantile(&stats, 1.0 - a)])
}

/// The performance profile at each of `taus`: per task the fraction of its runs scoring
/// strictly above `τ`, averaged over the tasks that have runs. NaN where no task has runs.
pub fn performance_profile(per_task: &[Vec<f64>], taus: &[f64]) -> Vec<f64> {
    let tasks: Vec<&Vec<f64>> = per_task.iter().filter(|r| !r.is_empty()).collect();
    taus.iter()
        .map(|&tau| {
            if tasks.is_empty() {
                return f64::NAN;
            }
            tasks
                .iter()
                .map(|runs| runs.iter().filter(|&&s| s > tau).count() as f64 / runs.len() as f64)
                .sum::<f64>()
                / tasks.len() as f64
        })
        .collect()
}

/// `n` evenly spaced values from `lo` to `hi` inclusive (numpy's `linspace`).
pub fn linspace(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![lo],
        _ => (0..n)
            .map(|i| lo + (hi - lo) * i as f64 / (n - 1) as f64)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_interval_by_hand() {
        // 1, 2, 3, 4: mean 2.5, sample variance 5/3, half-width 1.96·√(5/3/4).
        let (m, h) = mean_ci95(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((h - 1.96 * (5.0f64 / 12.0).sqrt()).abs() < 1e-15, "{h}");
        assert_eq!(mean_ci95(&[7.0]), (7.0, 0.0));
        assert!(mean_ci95(&[]).0.is_nan());
    }

    #[test]
    fn normalization_maps_references_to_0_and_1() {
        assert_eq!(normalized(-86.0, -86.0, -1.0), 0.0);
        assert_eq!(normalized(-1.0, -86.0, -1.0), 1.0);
        // Halfway between, and beyond the high reference.
        assert_eq!(normalized(-43.5, -86.0, -1.0), 0.5);
        assert_eq!(normalized(3.0, 1.0, 2.0), 2.0);
        assert!(normalized(3.0, 1.0, 1.0).is_nan());
    }

    #[test]
    fn trimmed_means_by_hand() {
        // n = 4: cut 1 each end → mean(2, 3) = 2.5 (the 100 is dropped).
        assert_eq!(iqm(&[100.0, 2.0, 1.0, 3.0]), Some(2.5));
        // n = 5: cut ⌊1.25⌋ = 1 each end → mean(2, 3, 4) = 3.
        assert_eq!(iqm(&[5.0, 4.0, 3.0, 2.0, -50.0]), Some(3.0));
        // n = 3: cut 0 → the plain mean.
        assert_eq!(iqm(&[1.0, 2.0, 6.0]), Some(3.0));
        // n = 10: cut 2 → mean of the 3rd..8th smallest: (3+4+5+6+7+8)/6 = 5.5.
        let v: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!(iqm(&v), Some(5.5));
        assert_eq!(iqm(&[]), None);
        assert_eq!(trim_mean(&[1.0], 0.5), None);
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let s = [1.0, 2.0, 4.0, 8.0];
        // numpy.quantile([1,2,4,8], [0, 0.25, 0.5, 0.975, 1]) = 1, 1.75, 3, 7.7, 8.
        for (p, want) in [
            (0.0, 1.0),
            (0.25, 1.75),
            (0.5, 3.0),
            (0.975, 7.7),
            (1.0, 8.0),
        ] {
            assert!((quantile(&s, p) - want).abs() < 1e-12, "p {p}");
        }
    }

    #[test]
    fn profiles_average_fractions_over_tasks() {
        // Task A: 2 of 4 runs above 0.5; task B: 1 of 2 → 0.5 at τ = 0.5.
        // At τ = 1.0 (strict): A has none (1.0 is not above 1.0), B has 1 of 2 → 0.25.
        let per_task = vec![vec![0.0, 0.4, 0.6, 1.0], vec![0.2, 3.0]];
        let p = performance_profile(&per_task, &[-1.0, 0.5, 1.0, 5.0]);
        assert_eq!(p, vec![1.0, 0.5, 0.25, 0.0]);
        assert!(performance_profile(&[], &[0.0])[0].is_nan());
    }

    #[test]
    fn bootstrap_of_constant_runs_is_the_constant() {
        let per_task = vec![vec![0.7; 5], vec![0.7; 3]];
        assert_eq!(
            stratified_bootstrap_iqm(&per_task, 200, 0.95, 1),
            Some([0.7, 0.7])
        );
    }

    #[test]
    fn bootstrap_keeps_strata_apart() {
        // Task A's runs are all 0, task B's all 1, equal counts: every stratified resample has
        // exactly 4 zeros and 4 ones, IQM (drop 2 each end) = mean(0, 0, 1, 1) = 0.5. An
        // unstratified bootstrap would spread.
        let per_task = vec![vec![0.0; 4], vec![1.0; 4]];
        assert_eq!(
            stratified_bootstrap_iqm(&per_task, 500, 0.95, 3),
            Some([0.5, 0.5])
        );
    }

    #[test]
    fn bootstrap_interval_brackets_the_iqm_and_matches_the_normal_theory() {
        // One task of 200 runs 0..199 (uniform): the IQM is 99.5 and the bootstrap spread
        // should follow the asymptotic sd of a 25 %-trimmed mean, σ_T = √(σ_w² / (1 − 2α)² / n)
        // with σ_w² the 25 %-winsorized variance.
        let runs: Vec<f64> = (0..200).map(f64::from).collect();
        let per_task = vec![runs];
        let [lo, hi] = stratified_bootstrap_iqm(&per_task, 4000, 0.95, 11).unwrap();
        // Winsorized at 25 %: half the mass uniform on [50, 150) (variance 50²/3 about the
        // centre, weight 0.5) and a quarter at each of 50 and 150 (50² each, weight 0.5):
        // σ_w² = 0.5·2500/3 + 0.5·2500 = 1666.7; σ_T = √(σ_w² / 0.25 / 200) = 5.77.
        let sigma_t = (1666.67f64 / 0.25 / 200.0).sqrt();
        let half = 0.5 * (hi - lo);
        println!(
            "bootstrap interval [{lo:.2}, {hi:.2}], half-width {half:.2} vs 1.96·σ_T = {:.2}",
            1.96 * sigma_t
        );
        assert!(lo < 99.5 && 99.5 < hi);
        assert!((half / (1.96 * sigma_t) - 1.0).abs() < 0.25, "{half}");
        // Deterministic for a seed.
        assert_eq!(
            stratified_bootstrap_iqm(&per_task, 100, 0.95, 5),
            stratified_bootstrap_iqm(&per_task, 100, 0.95, 5)
        );
    }

    #[test]
    fn linspace_ends() {
        assert_eq!(linspace(0.0, 1.0, 3), vec![0.0, 0.5, 1.0]);
        assert_eq!(linspace(2.0, 5.0, 1), vec![2.0]);
    }
}
