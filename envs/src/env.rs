//! The step/reset API with Gymnasium 1.x semantics, and the wrapper that turns a task's inner
//! dynamics into an environment (time limit, done-masking, action checks, seeding).

use crate::error::{EnvError, Result};
use crate::space::{Space, Value};
use rand::RngCore;
use scopegym_physics::rng::{SimRng, seeded};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// One entry of an `info` dict.
#[derive(Debug, Clone, PartialEq)]
pub enum InfoValue {
    /// A float.
    F64(f64),
    /// An integer.
    I64(i64),
    /// A flag.
    Bool(bool),
    /// Text.
    Str(String),
    /// A float vector.
    F64s(Vec<f64>),
}

/// The `info` dict of `reset` and `step`: diagnostics and ground truth that never enter the
/// observation. Keys are usually string literals (`"success".into()` borrows, allocating
/// nothing); built keys (`format!(..).into()`) are owned.
pub type Info = BTreeMap<Cow<'static, str>, InfoValue>;

/// An RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width, pixels.
    pub width: usize,
    /// Height, pixels.
    pub height: usize,
    /// `height × width × 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// A grey-scale rendering of `values` (`height × width`, row-major) scaled between their
    /// minimum and maximum.
    pub fn from_grey(values: &[f32], height: usize, width: usize) -> Self {
        let (lo, hi) = values
            .iter()
            .filter(|v| v.is_finite())
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let span = if hi > lo { hi - lo } else { 1.0 };
        let mut data = Vec::with_capacity(values.len() * 3);
        for &v in values {
            let g = if v.is_finite() {
                (((v - lo) / span).clamp(0.0, 1.0) * 255.0).round() as u8
            } else {
                0
            };
            data.extend_from_slice(&[g, g, g]);
        }
        Self {
            width,
            height,
            data,
        }
    }
}

/// What `step` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The next observation.
    pub obs: Value,
    /// The reward of this transition.
    pub reward: f64,
    /// The episode reached a terminal state of the task (success or failure).
    pub terminated: bool,
    /// The episode was cut (time limit).
    pub truncated: bool,
    /// Diagnostics and ground truth.
    pub info: Info,
}

/// An environment (Gymnasium 1.x semantics).
pub trait Env: Send {
    /// The task id, e.g. `"scopegym/SpmTipConditioning-v2"`.
    fn id(&self) -> &str;
    /// The observation space.
    fn observation_space(&self) -> &Space;
    /// The action space.
    fn action_space(&self) -> &Space;
    /// Steps after which an episode is truncated.
    fn max_episode_steps(&self) -> usize;
    /// Starts an episode. `Some(seed)` reseeds the environment; `None` continues its seed
    /// stream (drawn from OS entropy on the very first reset, as Gymnasium does).
    fn reset(&mut self, seed: Option<u64>) -> Result<(Value, Info)>;
    /// Advances one step. Errors on invalid actions and when called before `reset` or after the
    /// episode ended.
    fn step(&mut self, action: &Value) -> Result<Step>;
    /// [`Env::step`] with the observation written into `obs` instead of returned (the returned
    /// step's `obs` is an empty Box). `obs` must hold this env's latest observation, from its
    /// last reset or step: a step refused by a safety guard leaves it as it is. A caller that
    /// keeps the latest observation anyway (the vector env) spares the env a copy of its own.
    /// The default steps and moves the observation over.
    fn step_into(&mut self, action: &Value, obs: &mut Value) -> Result<Step> {
        let mut st = self.step(action)?;
        *obs = std::mem::replace(&mut st.obs, Value::Box(Vec::new()));
        Ok(st)
    }
    /// An RGB picture of the current state.
    fn render(&self) -> RgbImage;
    /// The task's expert rule of thumb for the current observation.
    fn heuristic_action(&mut self, obs: &Value) -> Value;
}

/// What a task's inner `step` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskStep {
    /// The next observation.
    pub obs: Value,
    /// The reward.
    pub reward: f64,
    /// Whether the task reached a terminal state.
    pub terminated: bool,
    /// Whether the task counts as solved at this step (`info["is_success"]`), decided from
    /// ground truth where the simulator knows it: it scores the agent and never enters the
    /// observation or reward.
    pub success: bool,
}

/// A task's inner dynamics: [`TaskEnv`] adds time limits, done-masking, action checks and
/// seeding.
pub trait Task: Send {
    /// The observation space.
    fn observation_space(&self) -> Space;
    /// The action space.
    fn action_space(&self) -> Space;
    /// Steps after which an episode is truncated.
    fn max_episode_steps(&self) -> usize;
    /// Starts an episode from `seed` (domain randomization draws from it); fills `info`.
    fn reset(&mut self, seed: u64, info: &mut Info) -> Result<Value>;
    /// One transition with an action already checked (and clipped) against the action space.
    fn step(&mut self, action: &Value, info: &mut Info) -> Result<TaskStep>;
    /// [`Task::step`] with the observation written into `obs` instead of returned (the
    /// returned step's `obs` is an empty Box). `obs` holds the observation this task returned
    /// last, from its last `reset` or step ([`Env::step_into`]'s contract), so a task may
    /// write only what changed; on an error `obs` is left as it was. The default steps and
    /// moves the observation over.
    fn step_into(&mut self, action: &Value, info: &mut Info, obs: &mut Value) -> Result<TaskStep> {
        let mut st = self.step(action, info)?;
        *obs = std::mem::replace(&mut st.obs, Value::Box(Vec::new()));
        Ok(st)
    }
    /// An RGB picture of the current state.
    fn render(&self) -> RgbImage;
    /// The expert's rule of thumb.
    fn heuristic_action(&mut self, obs: &Value) -> Value;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NeedsReset,
    Running,
    Done,
}

/// A [`Task`] as an [`Env`].
#[derive(Debug)]
pub struct TaskEnv<T: Task> {
    id: String,
    task: T,
    obs_space: Space,
    act_space: Space,
    max_steps: usize,
    steps: usize,
    phase: Phase,
    seeds: Option<SimRng>,
    /// The latest observation, returned again when a step is refused by a safety guard (`None`
    /// while the caller of [`Env::step_into`] holds it).
    last_obs: Option<Value>,
}

/// A step taken, or refused by a safety guard (its `obs` still to be filled in).
enum Outcome {
    Stepped(Step),
    Refused(Step),
}

fn entropy_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

impl<T: Task> TaskEnv<T> {
    /// Wraps `task` under `id`.
    pub fn new(id: impl Into<String>, task: T) -> Self {
        Self {
            id: id.into(),
            obs_space: task.observation_space(),
            act_space: task.action_space(),
            max_steps: task.max_episode_steps(),
            task,
            steps: 0,
            phase: Phase::NeedsReset,
            seeds: None,
            last_obs: None,
        }
    }

    /// The task.
    pub fn task(&self) -> &T {
        &self.task
    }

    /// Steps taken in this episode.
    pub fn elapsed_steps(&self) -> usize {
        self.steps
    }

    /// Keeps `obs` as the latest observation, in the buffers of the previous one.
    fn keep(&mut self, obs: &Value) {
        match &mut self.last_obs {
            Some(last) => last.assign(obs),
            slot => *slot = Some(obs.clone()),
        }
    }

    /// The documented outcome of a step a safety guard refused (a command outside the
    /// configured limits, never sent): the episode ends (`terminated`, reward 0), the
    /// observation is the previous one, and `info` says why: `refused` (true), `refused_limit`
    /// (the limit's name in `limits.toml`), `refused_reason` (the full message) and
    /// `is_success` (false). The same on a simulator and on hardware, since both run behind
    /// the same guard.
    fn refused(&mut self, e: &scopegym_physics::PhysicsError, mut info: Info) -> Step {
        info.insert("refused".into(), InfoValue::Bool(true));
        if let Some(limit) = e.guard_limit() {
            info.insert("refused_limit".into(), InfoValue::Str(limit.to_owned()));
        }
        info.insert("refused_reason".into(), InfoValue::Str(e.to_string()));
        info.insert("is_success".into(), InfoValue::Bool(false));
        self.steps += 1;
        self.phase = Phase::Done;
        // The observation (the previous one) is filled in by the caller.
        Step {
            obs: Value::Box(Vec::new()),
            reward: 0.0,
            terminated: true,
            truncated: false,
            info,
        }
    }
}

impl<T: Task> Env for TaskEnv<T> {
    fn id(&self) -> &str {
        &self.id
    }

    fn observation_space(&self) -> &Space {
        &self.obs_space
    }

    fn action_space(&self) -> &Space {
        &self.act_space
    }

    fn max_episode_steps(&self) -> usize {
        self.max_steps
    }

    fn reset(&mut self, seed: Option<u64>) -> Result<(Value, Info)> {
        if let Some(s) = seed {
            self.seeds = Some(seeded(s));
        }
        let episode_seed = self
            .seeds
            .get_or_insert_with(|| seeded(entropy_seed()))
            .next_u64();
        let mut info = Info::new();
        info.insert("episode_seed".into(), InfoValue::I64(episode_seed as i64));
        self.phase = Phase::NeedsReset;
        let obs = self.task.reset(episode_seed, &mut info)?;
        self.steps = 0;
        self.phase = Phase::Running;
        self.keep(&obs);
        Ok((obs, info))
    }

    fn step(&mut self, action: &Value) -> Result<Step> {
        match self.advance(action, None)? {
            Outcome::Stepped(st) => {
                self.keep(&st.obs);
                Ok(st)
            }
            Outcome::Refused(mut st) => {
                // `last_obs` is set by every reset and step, so a running episode has one,
                // unless the caller of `step_into` holds it.
                st.obs = self.last_obs.clone().ok_or_else(|| {
                    EnvError::NeedsReset(format!(
                        "{}: a safety guard refused the step, and the latest observation went \
                         to the caller of step_into; call reset",
                        self.id
                    ))
                })?;
                Ok(st)
            }
        }
    }

    fn step_into(&mut self, action: &Value, obs: &mut Value) -> Result<Step> {
        match self.advance(action, Some(obs))? {
            Outcome::Stepped(st) => {
                // The caller keeps it (the task wrote it into `obs`): no copy of our own.
                self.last_obs = None;
                Ok(st)
            }
            Outcome::Refused(st) => Ok(st),
        }
    }

    fn render(&self) -> RgbImage {
        self.task.render()
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        self.task.heuristic_action(obs)
    }
}

impl<T: Task> TaskEnv<T> {
    /// One step, its observation not yet kept; a refused step's observation not yet filled in.
    /// With `into`, the task writes the observation there ([`Task::step_into`]; the step's
    /// `obs` is then an empty Box).
    fn advance(&mut self, action: &Value, into: Option<&mut Value>) -> Result<Outcome> {
        match self.phase {
            Phase::NeedsReset => {
                return Err(EnvError::NeedsReset(format!(
                    "{}: step called before reset",
                    self.id
                )));
            }
            Phase::Done => {
                return Err(EnvError::NeedsReset(format!(
                    "{}: step called after the episode ended; call reset",
                    self.id
                )));
            }
            Phase::Running => {}
        }
        let (action, clipped) = self.act_space.check_action(action, "action")?;
        let mut info = Info::new();
        if clipped {
            info.insert("action_clipped".into(), InfoValue::Bool(true));
        }
        let stepped = match into {
            Some(obs) => self.task.step_into(&action, &mut info, obs),
            None => self.task.step(&action, &mut info),
        };
        let s = match stepped {
            Ok(s) => s,
            Err(EnvError::Physics(e)) if e.guard_limit().is_some() => {
                return Ok(Outcome::Refused(self.refused(&e, info)));
            }
            Err(e) => return Err(e),
        };
        info.insert("is_success".into(), InfoValue::Bool(s.success));
        self.steps += 1;
        let truncated = !s.terminated && self.steps >= self.max_steps;
        if s.terminated || truncated {
            self.phase = Phase::Done;
        }
        if !s.reward.is_finite() {
            return Err(EnvError::Physics(scopegym_physics::PhysicsError::arg(
                "reward",
                format!("{}: the task produced a non-finite reward", self.id),
            )));
        }
        Ok(Outcome::Stepped(Step {
            obs: s.obs,
            reward: s.reward,
            terminated: s.terminated,
            truncated,
            info,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::make;

    /// `step_into` gives what `step` gives (the observation in the caller's buffer), step after
    /// step, for a task env with a Dict observation and one with a Box.
    #[test]
    fn step_into_equals_step() {
        for id in [
            "scopegym/StemEelsExplore-v2",
            "scopegym/StemDopantSteer-v1",
            "scopegym/StemSparseScan-v2",
        ] {
            let (mut a, mut b) = (make(id, None).unwrap(), make(id, None).unwrap());
            let (oa, _) = a.reset(Some(5)).unwrap();
            let (mut ob, _) = b.reset(Some(5)).unwrap();
            assert_eq!(oa, ob);
            let mut rng = seeded(9);
            for k in 0..6 {
                let act = a.action_space().sample(&mut rng);
                let sa = a.step(&act).unwrap();
                let sb = b.step_into(&act, &mut ob).unwrap();
                assert_eq!(sa.obs, ob, "{id} step {k}");
                assert_eq!(sb.obs, Value::Box(Vec::new()));
                assert_eq!(
                    (sa.reward, sa.terminated, sa.truncated),
                    (sb.reward, sb.terminated, sb.truncated)
                );
                assert_eq!(sa.info, sb.info);
                if sa.terminated || sa.truncated {
                    break;
                }
            }
        }
    }
}
