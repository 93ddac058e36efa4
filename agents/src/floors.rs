//! The floors every benchmark score is read against: uniform random actions, raster (grid)
//! sampling of the action space, and each task's heuristic.

use crate::agent::Agent;
use crate::error::{AgentError, Result};
use scopegym_envs::rng::{SimRng, seeded};
use scopegym_envs::{Env, Space, Value};

/// Uniform random actions from the action space, from a generator seeded by the episode seed
/// (the same stream as `scopegym floors`' random policy).
#[derive(Debug, Default)]
pub struct RandomAgent {
    rng: Option<SimRng>,
}

impl Agent for RandomAgent {
    fn name(&self) -> &str {
        "random"
    }

    fn begin_episode(&mut self, _env: &dyn Env, _obs: &Value, seed: u64) -> Result<()> {
        self.rng = Some(seeded(seed ^ 0x0005_eed0_fa11_ac75));
        Ok(())
    }

    fn act(&mut self, env: &mut dyn Env, _obs: &Value) -> Result<Value> {
        let rng = self.rng.get_or_insert_with(|| seeded(0));
        Ok(env.action_space().sample(rng))
    }
}

/// The task's expert rule of thumb ([`Env::heuristic_action`]).
#[derive(Debug, Default)]
pub struct HeuristicAgent;

impl Agent for HeuristicAgent {
    fn name(&self) -> &str {
        "heuristic"
    }

    fn begin_episode(&mut self, _env: &dyn Env, _obs: &Value, _seed: u64) -> Result<()> {
        Ok(())
    }

    fn act(&mut self, env: &mut dyn Env, obs: &Value) -> Result<Value> {
        Ok(env.heuristic_action(obs))
    }
}

/// Raster sampling of the action space, the same in every episode, cycled when the episode
/// outlasts it:
///
/// - `Discrete(n)` with `n` a square `g²` larger than the episode budget `B` (the grid tasks:
///   the action indexes a `g × g` grid row by row): the points of a coarse square lattice with
///   stride `⌈√(n / B)⌉`, centred in the grid, row by row;
/// - any other `Discrete(n)`: `start, start + 1, …`;
/// - `Box` of `d` elements: a grid of `k = max(2, ⌊B^(1/d)⌋)` points per element spanning the
///   bounds, in raster order (the last element fastest).
#[derive(Debug, Default)]
pub struct RasterAgent {
    plan: Vec<Value>,
    next: usize,
}

impl RasterAgent {
    /// The raster of `space` for an episode of `budget` steps.
    pub fn plan(space: &Space, budget: usize) -> Result<Vec<Value>> {
        let budget = budget.max(1);
        match space {
            Space::Discrete { n, start } => {
                let n = *n as usize;
                let g = (n as f64).sqrt().round() as usize;
                if g * g == n && n > budget {
                    let stride = (n as f64 / budget as f64).sqrt().ceil() as usize;
                    let k = g.div_ceil(stride);
                    let offset = (g - (k - 1) * stride - 1) / 2;
                    let mut out = Vec::with_capacity(k * k);
                    for r in 0..k {
                        for c in 0..k {
                            let (r, c) = (offset + r * stride, offset + c * stride);
                            out.push(Value::Discrete(*start + (r * g + c) as i64));
                        }
                    }
                    Ok(out)
                } else {
                    Ok((0..n as i64).map(|i| Value::Discrete(start + i)).collect())
                }
            }
            Space::Box { low, high, .. } => {
                let d = low.len().max(1);
                let k = ((budget as f64).powf(1.0 / d as f64).floor() as usize).max(2);
                let total = k.checked_pow(d as u32).unwrap_or(usize::MAX).min(1 << 20);
                let mut out = Vec::with_capacity(total);
                for mut idx in 0..total {
                    let mut v = vec![0f32; low.len()];
                    for e in (0..low.len()).rev() {
                        let i = idx % k;
                        idx /= k;
                        v[e] = low[e] + (high[e] - low[e]) * i as f32 / (k - 1) as f32;
                    }
                    out.push(Value::Box(v));
                }
                Ok(out)
            }
            other => Err(AgentError::Unsupported {
                agent: "raster".into(),
                task: String::new(),
                reason: format!("no raster over the action space {}", other.describe()),
            }),
        }
    }
}

impl Agent for RasterAgent {
    fn name(&self) -> &str {
        "raster"
    }

    fn begin_episode(&mut self, env: &dyn Env, _obs: &Value, _seed: u64) -> Result<()> {
        self.plan =
            Self::plan(env.action_space(), env.max_episode_steps()).map_err(|e| match e {
                AgentError::Unsupported { agent, reason, .. } => AgentError::Unsupported {
                    agent,
                    task: env.id().into(),
                    reason,
                },
                e => e,
            })?;
        self.next = 0;
        Ok(())
    }

    fn act(&mut self, _env: &mut dyn Env, _obs: &Value) -> Result<Value> {
        if self.plan.is_empty() {
            return Err(AgentError::arg("raster", "act called before begin_episode"));
        }
        let v = self.plan[self.next % self.plan.len()].clone();
        self.next += 1;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::run_episode;
    use scopegym_envs::evaluate::{Policy, evaluate};
    use scopegym_envs::registry::make;

    #[test]
    fn grid_raster_is_a_centred_lattice_within_budget() {
        let plan = RasterAgent::plan(&Space::Discrete { n: 1024, start: 0 }, 100).unwrap();
        // stride ⌈√10.24⌉ = 4: 8 × 8 points at rows/cols 1, 5, …, 29 (margins 1 and 2).
        assert_eq!(plan.len(), 64);
        assert_eq!(plan[0], Value::Discrete(32 + 1));
        assert_eq!(plan[1], Value::Discrete(32 + 5));
        assert_eq!(plan[63], Value::Discrete(29 * 32 + 29));
        let small = RasterAgent::plan(&Space::Discrete { n: 14, start: 0 }, 30).unwrap();
        assert_eq!(small.len(), 14);
        assert_eq!(small[13], Value::Discrete(13));
    }

    #[test]
    fn box_raster_spans_the_bounds() {
        let s = Space::bounded_box(vec![-1.0, 0.0], vec![1.0, 4.0]);
        let plan = RasterAgent::plan(&s, 9).unwrap();
        assert_eq!(plan.len(), 9);
        assert_eq!(plan[0], Value::Box(vec![-1.0, 0.0]));
        assert_eq!(plan[1], Value::Box(vec![-1.0, 2.0]));
        assert_eq!(plan[8], Value::Box(vec![1.0, 4.0]));
        assert!(plan.iter().all(|v| s.contains(v)));
    }

    #[test]
    fn random_and_heuristic_agents_match_the_floors_of_evaluate() {
        let cfg: toml::Value = toml::from_str("max_steps = 6").unwrap();
        let mut env = make("scopegym/StemDopantSteer-v1", Some(&cfg)).unwrap();
        for (policy, agent) in [
            (
                Policy::Random,
                &mut RandomAgent::default() as &mut dyn Agent,
            ),
            (Policy::Heuristic, &mut HeuristicAgent),
        ] {
            let s = evaluate(env.as_mut(), &policy, 0..3).unwrap();
            let rets: Vec<f64> = (0..3)
                .map(|seed| run_episode(env.as_mut(), agent, seed).unwrap().ret)
                .collect();
            assert_eq!(rets, s.returns, "{policy:?}");
        }
    }
}
