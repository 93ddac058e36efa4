//! Scoring policies on a task over many seeds: the floors (random, heuristic), the degenerate
//! policies a benchmark must not reward (every constant action, the corners of a Box, doing
//! nothing), and the summary statistics researchers report (mean return with a 95 % interval,
//! success rate).
//!
//! Success is read from `info["is_success"]` at the last step of each episode.
//!
//! ```
//! use scopegym_envs::evaluate::{Policy, evaluate};
//! use scopegym_envs::registry::make;
//! let cfg: toml::Value = toml::from_str("max_steps = 3").unwrap();
//! let mut env = make("scopegym/StemDopantSteer-v1", Some(&cfg)).unwrap();
//! let s = evaluate(env.as_mut(), &Policy::Random, 0..4).unwrap();
//! assert_eq!(s.episodes, 4);
//! assert!(s.mean_length <= 3.0 && (0.0..=1.0).contains(&s.success_rate));
//! ```

use crate::env::{Env, InfoValue};
use crate::error::Result;
use crate::space::{Space, Value};
use scopegym_physics::rng::seeded;
use serde::Serialize;

/// A policy to score.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    /// Uniform random actions from the action space (seeded per episode).
    Random,
    /// The task's heuristic ([`Env::heuristic_action`]).
    Heuristic,
    /// The same action at every step.
    Constant(Value),
}

/// The score of a policy over a set of seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    /// Episodes run (one per seed).
    pub episodes: usize,
    /// Mean undiscounted return.
    pub mean_return: f64,
    /// Half-width of the 95 % confidence interval of the mean return (normal approximation,
    /// `1.96 · sd / √n`).
    pub return_ci95: f64,
    /// Fraction of episodes whose last step reported `info["is_success"] = true`.
    pub success_rate: f64,
    /// Mean episode length, steps.
    pub mean_length: f64,
    /// Every episode's return, in seed order.
    pub returns: Vec<f64>,
}

/// Runs one episode per seed with `policy` and summarizes.
pub fn evaluate(env: &mut dyn Env, policy: &Policy, seeds: std::ops::Range<u64>) -> Result<Score> {
    let mut returns = Vec::new();
    let (mut successes, mut steps) = (0usize, 0usize);
    for seed in seeds {
        let (mut obs, _) = env.reset(Some(seed))?;
        let mut rng = seeded(seed ^ 0x0005_eed0_fa11_ac75);
        let mut ret = 0.0;
        loop {
            let a = match policy {
                Policy::Random => env.action_space().sample(&mut rng),
                Policy::Heuristic => env.heuristic_action(&obs),
                Policy::Constant(v) => v.clone(),
            };
            let s = env.step(&a)?;
            ret += s.reward;
            steps += 1;
            obs = s.obs;
            if s.terminated || s.truncated {
                successes += usize::from(s.info.get("is_success") == Some(&InfoValue::Bool(true)));
                break;
            }
        }
        returns.push(ret);
    }
    let n = returns.len().max(1) as f64;
    let mean = returns.iter().sum::<f64>() / n;
    let var = returns.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Ok(Score {
        episodes: returns.len(),
        mean_return: mean,
        return_ci95: 1.96 * (var / n).sqrt(),
        success_rate: successes as f64 / n,
        mean_length: steps as f64 / n,
        returns,
    })
}

/// The degenerate policies of an action space, each as a name and the constant action it
/// repeats: for a Discrete space every value (at most `max_discrete` of them, spread evenly
/// over the range and always including the first and last); for a Box the zero action (clipped
/// into the bounds: "do nothing"), the low and high corners, the centre, and one constant
/// random action drawn from `seed`.
pub fn degenerate_policies(space: &Space, max_discrete: usize, seed: u64) -> Vec<(String, Value)> {
    match space {
        Space::Discrete { n, start } => {
            let n = *n;
            let k = (max_discrete.max(2) as i64).min(n);
            let mut vals: Vec<i64> = (0..k)
                .map(|i| start + if k > 1 { i * (n - 1) / (k - 1) } else { 0 })
                .collect();
            vals.dedup();
            vals.into_iter()
                .map(|v| (format!("constant {v}"), Value::Discrete(v)))
                .collect()
        }
        Space::Box { low, high, .. } => {
            let zero: Vec<f32> = low
                .iter()
                .zip(high)
                .map(|(l, h)| 0f32.clamp(*l, *h))
                .collect();
            let mid: Vec<f32> = low.iter().zip(high).map(|(l, h)| 0.5 * (l + h)).collect();
            vec![
                ("zero".into(), Value::Box(zero)),
                ("low corner".into(), Value::Box(low.clone())),
                ("high corner".into(), Value::Box(high.clone())),
                ("centre".into(), Value::Box(mid)),
                (
                    "constant random".into(),
                    space.sample(&mut seeded(seed ^ 0x00c0_57a7)),
                ),
            ]
        }
        other => vec![(
            "constant random".into(),
            other.sample(&mut seeded(seed ^ 0x00c0_57a7)),
        )],
    }
}

/// The heuristic's score and every degenerate policy's score (see [`degenerate_policies`]) on
/// the same seeds, for the no-reward-hack checks: no degenerate policy may come close to the
/// heuristic's mean return or success rate.
pub fn degenerate_scores(
    env: &mut dyn Env,
    seeds: std::ops::Range<u64>,
    max_discrete: usize,
) -> Result<(Score, Vec<(String, Score)>)> {
    let heuristic = evaluate(env, &Policy::Heuristic, seeds.clone())?;
    let policies = degenerate_policies(env.action_space(), max_discrete, seeds.start);
    let mut out = Vec::with_capacity(policies.len() + 1);
    out.push((
        "random".to_string(),
        evaluate(env, &Policy::Random, seeds.clone())?,
    ));
    for (name, v) in policies {
        let s = evaluate(env, &Policy::Constant(v), seeds.clone())?;
        out.push((name, s));
    }
    Ok((heuristic, out))
}

/// Asserts (panicking with a table of every score) that each degenerate policy's mean return is
/// at least `return_margin` below the heuristic's and its success rate at least
/// `success_margin` below it. For tests.
pub fn assert_no_degenerate_wins(
    id: &str,
    heuristic: &Score,
    others: &[(String, Score)],
    return_margin: f64,
    success_margin: f64,
) {
    let mut table = format!(
        "{id}: heuristic return {:.3} ± {:.3}, success {:.2}\n",
        heuristic.mean_return, heuristic.return_ci95, heuristic.success_rate
    );
    let mut bad = Vec::new();
    for (name, s) in others {
        table += &format!(
            "  {name:>16}: return {:.3} ± {:.3}, success {:.2}\n",
            s.mean_return, s.return_ci95, s.success_rate
        );
        if s.mean_return > heuristic.mean_return - return_margin
            || s.success_rate > heuristic.success_rate - success_margin
        {
            bad.push(name.clone());
        }
    }
    println!("{table}");
    assert!(
        bad.is_empty(),
        "{id}: degenerate policies {bad:?} come within the margins (return {return_margin}, \
         success {success_margin}) of the heuristic:\n{table}"
    );
}

/// The check of issue 12 for one task: the heuristic and random actions over `seeds` of `env`
/// (configure its split and level beforehand); prints both scores and panics unless the
/// heuristic's mean return exceeds random's by more than `return_margin` and its success rate
/// by at least `success_margin`. Returns `(heuristic, random)`.
pub fn assert_heuristic_beats_random(
    id: &str,
    env: &mut dyn Env,
    seeds: std::ops::Range<u64>,
    return_margin: f64,
    success_margin: f64,
) -> (Score, Score) {
    let n = seeds.end.saturating_sub(seeds.start);
    let h = evaluate(env, &Policy::Heuristic, seeds.clone()).expect("heuristic episodes run");
    let r = evaluate(env, &Policy::Random, seeds).expect("random episodes run");
    let table = format!(
        "{id}, {n} seeds: heuristic return {:.3} ± {:.3}, success {:.3}; random return {:.3} ± \
         {:.3}, success {:.3}",
        h.mean_return, h.return_ci95, h.success_rate, r.mean_return, r.return_ci95, r.success_rate
    );
    println!("{table}");
    assert!(
        h.mean_return > r.mean_return + return_margin
            && h.success_rate >= r.success_rate + success_margin,
        "{table}: margins (return {return_margin}, success {success_margin}) not reached"
    );
    (h, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discrete_degenerates_span_the_range() {
        let s = Space::Discrete { n: 100, start: 0 };
        let d = degenerate_policies(&s, 8, 0);
        assert_eq!(d.len(), 8);
        assert_eq!(d[0].1, Value::Discrete(0));
        assert_eq!(d[7].1, Value::Discrete(99));
        let s = Space::Discrete { n: 3, start: 0 };
        assert_eq!(degenerate_policies(&s, 8, 0).len(), 3);
    }

    #[test]
    fn box_degenerates_are_inside_the_box() {
        let s = Space::bounded_box(vec![1.0, -2.0], vec![3.0, 2.0]);
        for (name, v) in degenerate_policies(&s, 8, 3) {
            assert!(s.contains(&v), "{name}: {v:?}");
        }
    }

    #[test]
    fn scores_summarize_returns() {
        let mut env = crate::registry::make(
            "scopegym/StemDopantSteer-v1",
            Some(&toml::from_str("max_steps = 5").unwrap()),
        )
        .unwrap();
        let s = evaluate(env.as_mut(), &Policy::Heuristic, 0..6).unwrap();
        assert_eq!(s.returns.len(), 6);
        let m = s.returns.iter().sum::<f64>() / 6.0;
        assert!((m - s.mean_return).abs() < 1e-12);
        assert!(s.return_ci95 >= 0.0);
    }
}
