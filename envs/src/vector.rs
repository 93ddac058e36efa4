//! A vector of environments stepped in parallel (rayon) into contiguous, preallocated buffers,
//! with Gymnasium 1.x autoreset modes.
//!
//! Observations are flattened to `f32` in the space's order (Dict: keys in order), so the
//! buffer is `[num_envs, obs_len]`. Env `i` is seeded `seed + i`. Each env owns its random
//! streams, so results do not depend on the number of threads.

use crate::env::{Env, Info, InfoValue};
use crate::error::{EnvError, Result};
use crate::space::Value;

/// What happens after an episode ends (Gymnasium's `AutoresetMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoReset {
    /// The step after the last one resets the env (its action is ignored) and returns the
    /// first observation of the next episode with reward 0. Gymnasium's default.
    #[default]
    NextStep,
    /// The env resets in the same step; the last observation and info of the finished
    /// episode go into `info` as `final_obs` and `final_info.*`.
    SameStep,
    /// No automatic reset: reset finished envs with [`VectorEnv::reset_mask`].
    Disabled,
}

impl AutoReset {
    /// Gymnasium's name: `"NextStep"`, `"SameStep"` or `"Disabled"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::NextStep => "NextStep",
            Self::SameStep => "SameStep",
            Self::Disabled => "Disabled",
        }
    }
}

/// Flattens a value into `out` (Box elements, Discrete and MultiDiscrete as numbers, Dict in
/// key order).
pub fn flatten_into(v: &Value, out: &mut [f32]) -> usize {
    match v {
        Value::Box(x) => {
            out[..x.len()].copy_from_slice(x);
            x.len()
        }
        Value::Discrete(d) => {
            out[0] = *d as f32;
            1
        }
        Value::MultiDiscrete(x) => {
            for (o, v) in out.iter_mut().zip(x) {
                *o = *v as f32;
            }
            x.len()
        }
        Value::MultiBinary(x) => {
            for (o, v) in out.iter_mut().zip(x) {
                *o = f32::from(*v);
            }
            x.len()
        }
        Value::Dict(items) => {
            let mut k = 0;
            for (_, v) in items {
                k += flatten_into(v, &mut out[k..]);
            }
            k
        }
    }
}

/// Caller-provided buffers a vector step or reset writes into (`num_envs × obs_len`
/// observations, `num_envs` rewards and flags).
#[derive(Debug)]
pub struct Outputs<'a> {
    /// Flattened observations, `num_envs × obs_len`.
    pub obs: &'a mut [f32],
    /// Rewards, `num_envs`.
    pub rewards: &'a mut [f64],
    /// Terminations, `num_envs`.
    pub terminated: &'a mut [bool],
    /// Truncations, `num_envs`.
    pub truncated: &'a mut [bool],
}

impl Outputs<'_> {
    /// Errors unless the buffers fit `n` envs of `obs_len` observation values.
    fn check(&self, n: usize, obs_len: usize) -> Result<()> {
        let want = [n * obs_len, n, n, n];
        let got = [
            self.obs.len(),
            self.rewards.len(),
            self.terminated.len(),
            self.truncated.len(),
        ];
        if want != got {
            return Err(EnvError::arg(
                "outputs",
                format!(
                    "expected buffer lengths {want:?} (obs, rewards, terminated, truncated), got {got:?}"
                ),
            ));
        }
        Ok(())
    }
}

struct Slot {
    env: Box<dyn Env>,
    needs_reset: bool,
    reward: f64,
    terminated: bool,
    truncated: bool,
    info: Info,
    obs: Value,
    error: Option<EnvError>,
    /// Scratch for the action decoded from flat numbers (its buffer is reused every step).
    action: Value,
    /// Nanoseconds of the env's last timed step and last timed reset (`[step, reset]`;
    /// shared calls run the costly envs first).
    cost: [u64; 2],
}

impl Slot {
    /// Errors when env `i` cannot take a step: never reset, or (with autoreset disabled)
    /// finished and not reset since.
    fn check_steppable(&self, i: usize, mode: AutoReset) -> Result<()> {
        if self.needs_reset && (mode == AutoReset::Disabled || self.obs == Value::Box(Vec::new())) {
            return Err(EnvError::NeedsReset(format!(
                "env {i} needs a reset before it can step (reset, or reset_mask with autoreset disabled)"
            )));
        }
        Ok(())
    }

    /// Resets the env and records the first observation of the new episode.
    fn reset(&mut self, seed: Option<u64>) -> Result<()> {
        let (obs, info) = self.env.reset(seed)?;
        self.obs = obs;
        self.info = info;
        self.reward = 0.0;
        self.terminated = false;
        self.truncated = false;
        self.needs_reset = false;
        Ok(())
    }
}

/// Work per [`VectorEnv::run_slots_into`] call (thread time, nanoseconds) from which the envs
/// are shared among the threads: waking the pool and handing out the blocks costs a few
/// microseconds, so sharing work much smaller than this gains little or loses.
const SHARE_MIN_WORK_NS: u64 = 50_000;

/// How long the calling thread waits awake for the others to finish their blocks.
const SPIN_MAX: std::time::Duration = std::time::Duration::from_micros(500);

/// Contiguous blocks of envs per thread when shared ...
const SHARE_BLOCKS: usize = 2;

/// ... unless an env's step took at least this long on average (thread time, nanoseconds):
/// then every env is a block of its own, so the threads balance steps of unequal cost (a
/// reset, a re-dilated tip) env by env; a block's hand-off costs well under a microsecond.
const ENV_BLOCK_MIN_NS: u64 = 10_000;

/// Decides, call by call, whether sharing the envs among the threads pays. Every shared call
/// measures its own gain: the CPU time the threads spent on the envs' blocks over the call's
/// wall time (2 when two threads each worked the whole call, 1 when the helper got no CPU:
/// the other core was taken by another process). This compares one call with itself, so
/// calls of unequal cost (resets, episodes at different stages) cannot mislead it, as they
/// could a comparison of the wall time of shared calls with that of calls alone. While the
/// mean gain stays at `MIN_GAIN` or more the envs are shared; below it they run on the
/// calling thread, and sharing is tried again after `PROBE_MIN` calls (twice as long after
/// every try that failed, up to `PROBE_MAX`), so the vector env follows a change of load and
/// stays never slower than one thread. The choice changes only the timing: every env's
/// results are the same either way.
#[derive(Debug, Clone)]
struct ShareChooser {
    /// Mean gain of recent shared calls (`None` until one was measured).
    gain: Option<f64>,
    /// Calls in that mean since it was last replaced (by the first measured call or a try).
    samples: u64,
    /// Whether the mean started at the first measured call (not at a try after a spell
    /// alone): the first `FIRST_SAMPLES` calls of a vector env all share, whatever they gain.
    first: bool,
    /// Whether a shared call was made (the first is not measured: the helper threads start
    /// then).
    warm: bool,
    /// Calls made alone since the last try.
    alone: u64,
    /// Calls alone between two tries.
    every: u64,
}

impl Default for ShareChooser {
    fn default() -> Self {
        Self {
            gain: None,
            samples: 0,
            first: true,
            warm: false,
            alone: 0,
            every: Self::PROBE_MIN,
        }
    }
}

impl ShareChooser {
    /// Weight of the newest shared call in the mean gain (a plain mean of the calls so far
    /// while they are fewer than `1 / WEIGHT`).
    const WEIGHT: f64 = 0.25;
    /// Shared calls measured before the first decision (the first steps of a batch are the
    /// least even: one env may build a table the others already have).
    const FIRST_SAMPLES: u64 = 8;
    /// Mean gain from which sharing counts as paying (a little over 1: a shared call also
    /// pays the hand-off, and two threads slow each other a little through the caches).
    const MIN_GAIN: f64 = 1.1;
    /// Calls alone before the first try of sharing again ...
    const PROBE_MIN: u64 = 8;
    /// ... and at most (a failed try costs the shortfall of one call).
    const PROBE_MAX: u64 = 256;

    /// Whether sharing paid lately.
    fn paying(&self) -> bool {
        match self.gain {
            None => true,
            Some(g) => g >= Self::MIN_GAIN || (self.first && self.samples < Self::FIRST_SAMPLES),
        }
    }

    /// Whether the next call shares the envs.
    fn share(&mut self) -> bool {
        if self.paying() {
            return true;
        }
        self.alone += 1;
        if self.alone >= self.every {
            self.alone = 0;
            return true;
        }
        false
    }

    /// Records a shared call: `cpu_ns` of the threads' CPU time on the blocks in `wall_ns`.
    /// A try after a spell alone replaces the mean (the old one is stale: the load may have
    /// changed since).
    fn record(&mut self, cpu_ns: u64, wall_ns: u64) {
        if !std::mem::replace(&mut self.warm, true) {
            return;
        }
        let g = cpu_ns as f64 / wall_ns.max(1) as f64;
        let was_paying = self.paying();
        match self.gain {
            Some(m) if was_paying => {
                self.samples += 1;
                let w = Self::WEIGHT.max(1.0 / self.samples as f64);
                self.gain = Some(m + w * (g - m));
            }
            _ => {
                self.first &= self.gain.is_none();
                (self.gain, self.samples) = (Some(g), 1);
            }
        }
        self.every = match (was_paying, self.paying()) {
            (false, false) => (self.every * 2).min(Self::PROBE_MAX),
            _ => Self::PROBE_MIN,
        };
    }
}

/// The blocks each of `members` threads runs first: member `p` its own `p * per..(p + 1) *
/// per` (of `cost.len()` blocks), the costliest first (a stable sort: equal costs keep
/// their order).
fn block_order(cost: &[u64], per: usize, members: usize) -> Vec<Vec<usize>> {
    (0..members)
        .map(|p| {
            let own = (p * per).min(cost.len())..((p + 1) * per).min(cost.len());
            let mut own: Vec<usize> = own.collect();
            own.sort_by_key(|&b| std::cmp::Reverse(cost[b]));
            own
        })
        .collect()
}

thread_local! {
    /// Whether this thread is stepping envs of a [`VectorEnv`] right now.
    static IN_VECTOR_ENV: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is stepping (or resetting) envs of a [`VectorEnv`]. The vector
/// env shares its envs among the threads it was given, so an env should then not spread work
/// of its own over more threads (a lone env may: a task's ground truth at reset, say). Either
/// way the results are the same.
pub fn in_vector_env() -> bool {
    IN_VECTOR_ENV.with(std::cell::Cell::get)
}

/// Marks this thread as stepping a vector env's envs until dropped (then restores the mark).
struct InVectorEnv(bool);

impl InVectorEnv {
    fn enter() -> Self {
        Self(IN_VECTOR_ENV.with(|c| c.replace(true)))
    }
}

impl Drop for InVectorEnv {
    fn drop(&mut self) {
        IN_VECTOR_ENV.with(|c| c.set(self.0));
    }
}

/// Nanoseconds since `start` (saturating; a call never takes 584 years).
fn nanos(start: std::time::Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// N environments stepped together.
pub struct VectorEnv {
    slots: Vec<Slot>,
    mode: AutoReset,
    /// Threads stepping the envs, the calling one included.
    threads: usize,
    /// The `threads - 1` threads helping the calling one (`None` for one thread).
    pool: Option<rayon::ThreadPool>,
    obs_len: usize,
    action_len: usize,
    /// Work of the last [`VectorEnv::run_slots_into`] call, nanoseconds of thread time (the
    /// next call shares the envs among the threads if it reached `SHARE_MIN_WORK_NS`).
    work_ns: u64,
    /// Whether sharing has paid lately (wall time per env each way).
    chooser: ShareChooser,
    obs: Vec<f32>,
    rewards: Vec<f64>,
    terminated: Vec<bool>,
    truncated: Vec<bool>,
}

impl std::fmt::Debug for VectorEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorEnv")
            .field("num_envs", &self.slots.len())
            .field("mode", &self.mode)
            .field("threads", &self.threads)
            .finish()
    }
}

impl VectorEnv {
    /// Wraps `envs` (all with the same spaces) stepped on `threads` threads.
    pub fn new(envs: Vec<Box<dyn Env>>, mode: AutoReset, threads: usize) -> Result<Self> {
        let Some(first) = envs.first() else {
            return Err(EnvError::arg("num_envs", "needs at least one env"));
        };
        let (os, acts) = (
            first.observation_space().clone(),
            first.action_space().clone(),
        );
        if envs
            .iter()
            .any(|e| e.observation_space() != &os || e.action_space() != &acts)
        {
            return Err(EnvError::arg("envs", "all envs must share their spaces"));
        }
        if threads == 0 {
            return Err(EnvError::arg("threads", "must be at least 1"));
        }
        let pool = if threads > 1 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads - 1)
                .build()
                .map_err(|e| EnvError::arg("threads", e.to_string()))?;
            Some(pool)
        } else {
            None
        };
        let n = envs.len();
        let obs_len = os.flat_len();
        Ok(Self {
            slots: envs
                .into_iter()
                .map(|env| Slot {
                    env,
                    needs_reset: true,
                    reward: 0.0,
                    terminated: false,
                    truncated: false,
                    info: Info::new(),
                    obs: Value::Box(Vec::new()),
                    error: None,
                    action: Value::Box(Vec::new()),
                    cost: [0; 2],
                })
                .collect(),
            mode,
            threads,
            pool,
            obs_len,
            action_len: acts.flat_len(),
            work_ns: u64::MAX,
            chooser: ShareChooser::default(),
            obs: vec![0.0; n * obs_len],
            rewards: vec![0.0; n],
            terminated: vec![false; n],
            truncated: vec![false; n],
        })
    }

    /// Number of environments.
    pub fn num_envs(&self) -> usize {
        self.slots.len()
    }

    /// The autoreset mode.
    pub fn mode(&self) -> AutoReset {
        self.mode
    }

    /// Flattened observation length per env.
    pub fn obs_len(&self) -> usize {
        self.obs_len
    }

    /// The first env (spaces, id).
    pub fn env(&self, i: usize) -> &dyn Env {
        self.slots[i].env.as_ref()
    }

    /// Observations `[num_envs × obs_len]` after the last reset or step.
    pub fn observations(&self) -> &[f32] {
        &self.obs
    }

    /// Observation values (unflattened) after the last reset or step.
    pub fn observation_values(&self) -> Vec<&Value> {
        self.slots.iter().map(|s| &s.obs).collect()
    }

    /// Rewards of the last step.
    pub fn rewards(&self) -> &[f64] {
        &self.rewards
    }

    /// Terminations of the last step.
    pub fn terminated(&self) -> &[bool] {
        &self.terminated
    }

    /// Truncations of the last step.
    pub fn truncated(&self) -> &[bool] {
        &self.truncated
    }

    /// Infos of the last reset or step, one per env.
    pub fn infos(&self) -> Vec<&Info> {
        self.slots.iter().map(|s| &s.info).collect()
    }

    /// Runs `f` on every slot and copies the slots' results into `out` (this env's own
    /// buffers when `None`, already checked by [`Outputs::check`] otherwise); returns the first
    /// env error (every slot's error is cleared, and the buffers hold the last good values of
    /// failed envs).
    fn run_slots(
        &mut self,
        f: impl Fn(usize, &mut Slot) -> Result<()> + Sync + Send,
        out: Option<Outputs<'_>>,
    ) -> Result<()> {
        if let Some(out) = out {
            return self.run_slots_into(f, out);
        }
        let mut obs = std::mem::take(&mut self.obs);
        let mut rewards = std::mem::take(&mut self.rewards);
        let mut terminated = std::mem::take(&mut self.terminated);
        let mut truncated = std::mem::take(&mut self.truncated);
        let res = self.run_slots_into(
            f,
            Outputs {
                obs: &mut obs,
                rewards: &mut rewards,
                terminated: &mut terminated,
                truncated: &mut truncated,
            },
        );
        (self.obs, self.rewards, self.terminated, self.truncated) =
            (obs, rewards, terminated, truncated);
        res
    }

    /// Runs `f` on every slot (in parallel on the pool, or in order on the calling thread when
    /// the pool has one thread: no hand-off cost) and copies each slot's results into its rows
    /// of `out` on the same thread (the slots stay in that thread's cache).
    ///
    /// Handing work to the pool costs microseconds (waking the workers), more than a whole
    /// step of a light task with few envs (StemDopantSteer: a few µs per env). So every call
    /// times its work (the threads' CPU time on the blocks when shared), and the next call
    /// shares the envs among the threads only if that work reached `SHARE_MIN_WORK_NS`.
    /// Shared, the envs go out in contiguous blocks, `SHARE_BLOCKS` per thread: few enough
    /// that a block costs one hand-off, enough that a thread left with cheap envs (steps)
    /// takes blocks from one held up by costly ones (resets). When an env's step cost
    /// `ENV_BLOCK_MIN_NS` or more on average, every env is its own block. A call that could
    /// share still runs on the calling thread alone while sharing has not paid lately
    /// ([`ShareChooser`]: on a busy machine the helper may get too little CPU to gain).
    /// Each env owns its state and random streams, so the results are the same either way.
    fn run_slots_into(
        &mut self,
        f: impl Fn(usize, &mut Slot) -> Result<()> + Sync + Send,
        out: Outputs<'_>,
    ) -> Result<()> {
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
        use std::time::Instant;
        let obs_len = self.obs_len;
        let failed = AtomicBool::new(false);
        // `timed`: each env's time goes into its `cost` (the shared calls order blocks by it).
        let run_block = |first: usize, block: &mut [Slot], out: Outputs<'_>, timed: bool| {
            let _mark = InVectorEnv::enter();
            for (k, s) in block.iter_mut().enumerate() {
                let (start, resetting) = (timed.then(Instant::now), s.needs_reset);
                if let Err(e) = f(first + k, s) {
                    s.error = Some(e);
                }
                if let Some(start) = start {
                    s.cost[usize::from(resetting)] = nanos(start);
                }
                if s.error.is_some() {
                    failed.store(true, Ordering::Relaxed);
                    continue;
                }
                flatten_into(&s.obs, &mut out.obs[k * obs_len..(k + 1) * obs_len]);
                out.rewards[k] = s.reward;
                out.terminated[k] = s.terminated;
                out.truncated[k] = s.truncated;
            }
        };
        let n = self.slots.len();
        // Enough work to share at all; then whether sharing has paid lately.
        let eligible = n > 1 && self.work_ns >= SHARE_MIN_WORK_NS;
        let pool = match &self.pool {
            Some(pool) if eligible && self.chooser.share() => pool,
            Some(_) if n > 1 => {
                let start = Instant::now();
                run_block(0, &mut self.slots, out, false);
                self.work_ns = nanos(start);
                return self.take_errors(failed.into_inner());
            }
            _ => {
                run_block(0, &mut self.slots, out, false);
                return self.take_errors(failed.into_inner());
            }
        };
        // The calling thread is member 0, the pool's threads the others; member `p` runs its
        // own blocks `p * per..(p + 1) * per` (the same envs each call, so they stay in its
        // cache), the costliest first, then takes what is left of the others'. Costliest
        // first (each env's last step, or its last reset when it resets now) leaves cheap
        // blocks for the end, where a thread that ran out takes them from the other.
        let members = self.threads;
        let len = if self.work_ns >= ENV_BLOCK_MIN_NS.saturating_mul(n as u64) {
            1
        } else {
            n.div_ceil(members * SHARE_BLOCKS)
        };
        let per = n.div_ceil(len).div_ceil(members);
        let cost: Vec<u64> = self
            .slots
            .chunks(len)
            .map(|b| b.iter().map(|s| s.cost[usize::from(s.needs_reset)]).sum())
            .collect();
        let order = block_order(&cost, per, members);
        let mut blocks = Vec::with_capacity(cost.len());
        let (mut slots, mut rest) = (&mut self.slots[..], out);
        while !slots.is_empty() {
            let (first, k) = (n - slots.len(), len.min(slots.len()));
            let (s, s_rest) = slots.split_at_mut(k);
            let (o, o_rest) = rest.obs.split_at_mut(k * obs_len);
            let (r, r_rest) = rest.rewards.split_at_mut(k);
            let (te, te_rest) = rest.terminated.split_at_mut(k);
            let (tr, tr_rest) = rest.truncated.split_at_mut(k);
            let block = Outputs {
                obs: o,
                rewards: r,
                terminated: te,
                truncated: tr,
            };
            blocks.push(Mutex::new(Some((first, s, block))));
            slots = s_rest;
            rest = Outputs {
                obs: o_rest,
                rewards: r_rest,
                terminated: te_rest,
                truncated: tr_rest,
            };
        }
        let next: Vec<AtomicUsize> = (0..members).map(|_| AtomicUsize::new(0)).collect();
        let (work, done) = (AtomicU64::new(0), AtomicUsize::new(0));
        let member = |p: usize| {
            // Thread CPU time where the system gives it (wall time otherwise: then a helper
            // descheduled mid-block counts as working).
            let (cpu, wall) = (cpu_time::ThreadTime::try_now().ok(), Instant::now());
            for q in (0..members).map(|k| (p + k) % members) {
                loop {
                    let j = next[q].fetch_add(1, Ordering::Relaxed);
                    let Some(cell) = order[q].get(j).map(|&b| &blocks[b]) else {
                        break;
                    };
                    let taken = cell.lock().ok().and_then(|mut c| c.take());
                    if let Some((first, block, out)) = taken {
                        run_block(first, block, out, true);
                    }
                }
            }
            let busy = cpu.and_then(|c| c.try_elapsed().ok()).map_or_else(
                || nanos(wall),
                |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            );
            work.fetch_add(busy, Ordering::Relaxed);
            done.fetch_add(1, Ordering::Release);
        };
        let member = &member;
        let wall = Instant::now();
        pool.in_place_scope(|scope| {
            for p in 1..members {
                scope.spawn(move |_| member(p));
            }
            member(0);
            // The others are finishing their last blocks: wait for them awake (for at most
            // `SPIN_MAX`), since sleeping means being woken, which costs tens of microseconds.
            let start = Instant::now();
            while done.load(Ordering::Acquire) < members && start.elapsed() < SPIN_MAX {
                std::hint::spin_loop();
            }
        });
        self.work_ns = work.into_inner();
        self.chooser.record(self.work_ns, nanos(wall));
        self.take_errors(failed.into_inner())
    }

    /// After a call where some env failed (`failed`), clears every slot's error and returns
    /// the first.
    fn take_errors(&mut self, failed: bool) -> Result<()> {
        if !failed {
            return Ok(());
        }
        let mut first = None;
        for s in &mut self.slots {
            if let Some(e) = s.error.take() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Like [`VectorEnv::step_flat`], but writes observations, rewards and flags straight into
    /// `out` (e.g. the memory of freshly allocated NumPy arrays) instead of this env's own
    /// buffers, which keep the values of the last call without `_into`.
    pub fn step_flat_into(&mut self, actions: &[f32], out: Outputs<'_>) -> Result<()> {
        out.check(self.slots.len(), self.obs_len)?;
        self.step_flat_inner(actions, Some(out))
    }

    /// Like [`VectorEnv::reset_mask`] (`mask` `None`: every env), writing into `out`; envs
    /// outside the mask write their last observation and flags again.
    pub fn reset_into(
        &mut self,
        seed: Option<u64>,
        mask: Option<&[bool]>,
        out: Outputs<'_>,
    ) -> Result<()> {
        out.check(self.slots.len(), self.obs_len)?;
        self.reset_slots(seed, mask, Some(out))
    }

    /// Resets every env; env `i` gets `seed + i` (or continues its stream when `None`).
    pub fn reset(&mut self, seed: Option<u64>) -> Result<()> {
        self.reset_slots(seed, None, None)
    }

    /// Resets the envs where `mask` is true (for [`AutoReset::Disabled`]).
    pub fn reset_mask(&mut self, seed: Option<u64>, mask: &[bool]) -> Result<()> {
        self.reset_slots(seed, Some(mask), None)
    }

    /// Resets the envs where `mask` is true (every env when `None`), env `i` with `seed + i`,
    /// and copies every env's results into `out` (this env's buffers when `None`).
    fn reset_slots(
        &mut self,
        seed: Option<u64>,
        mask: Option<&[bool]>,
        out: Option<Outputs<'_>>,
    ) -> Result<()> {
        if let Some(m) = mask
            && m.len() != self.slots.len()
        {
            return Err(EnvError::arg(
                "mask",
                format!("expected {} flags, got {}", self.slots.len(), m.len()),
            ));
        }
        self.run_slots(
            |i, s| {
                if mask.is_none_or(|m| m[i]) {
                    s.reset(seed.map(|v| v.wrapping_add(i as u64)))?;
                }
                Ok(())
            },
            out,
        )
    }

    /// Flattened action length per env.
    pub fn action_len(&self) -> usize {
        self.action_len
    }

    /// Steps every env with actions flattened in the action space's order: `num_envs ×
    /// action_len` numbers (Discrete, MultiDiscrete and MultiBinary elements as whole numbers),
    /// the form NumPy hands over.
    pub fn step_flat(&mut self, actions: &[f32]) -> Result<()> {
        self.step_flat_inner(actions, None)
    }

    /// Steps every env from flat actions and copies the results into `out` (this env's
    /// buffers when `None`). Every action is decoded and checked before any env steps, so a bad
    /// action leaves the batch as it was.
    fn step_flat_inner(&mut self, actions: &[f32], out: Option<Outputs<'_>>) -> Result<()> {
        let (n, len) = (self.slots.len(), self.action_len);
        if actions.len() != n * len {
            return Err(EnvError::action(
                "actions",
                format!(
                    "expected shape [{n}, {len}] ({} values), got {}",
                    n * len,
                    actions.len()
                ),
            ));
        }
        let mode = self.mode;
        for (i, s) in self.slots.iter_mut().enumerate() {
            let space = s.env.action_space();
            // The field name is formatted only for an error (this runs every step).
            let flat = &actions[i * len..(i + 1) * len];
            if space
                .unflatten_into(flat, "actions", &mut s.action)
                .is_err()
                || space.validate_action(&s.action, "actions").is_err()
            {
                let field = format!("actions[{i}]");
                space.unflatten_into(flat, &field, &mut s.action)?;
                space.validate_action(&s.action, &field)?;
            }
            s.check_steppable(i, mode)?;
        }
        self.run_slots(
            |_, s| {
                let a = std::mem::replace(&mut s.action, Value::Discrete(0));
                let r = step_slot(s, &a, mode);
                s.action = a;
                r
            },
            out,
        )
    }

    /// Steps every env with its action (`actions.len() == num_envs`). Every action is checked
    /// before any env steps.
    pub fn step(&mut self, actions: &[Value]) -> Result<()> {
        if actions.len() != self.slots.len() {
            return Err(EnvError::action(
                "actions",
                format!(
                    "expected {} actions, got {}",
                    self.slots.len(),
                    actions.len()
                ),
            ));
        }
        let mode = self.mode;
        for (i, (s, a)) in self.slots.iter().zip(actions).enumerate() {
            let space = s.env.action_space();
            // The field name is formatted only for an error (this runs every step).
            if space.validate_action(a, "actions").is_err() {
                space.validate_action(a, &format!("actions[{i}]"))?;
            }
            s.check_steppable(i, mode)?;
        }
        self.run_slots(|i, s| step_slot(s, &actions[i], mode), None)
    }
}

/// Steps one env. A failure of the env itself (the instrument refused or failed) does not fail
/// the batch: it ends that env's episode as truncated, with the message in `info["error"]`,
/// the last observation kept and reward 0; the env is then reset like any finished env.
fn step_slot(s: &mut Slot, action: &Value, mode: AutoReset) -> Result<()> {
    if s.needs_reset && mode == AutoReset::NextStep {
        return s.reset(None);
    }
    // `s.obs` holds the env's latest observation (the vector env keeps it anyway).
    match s.env.step_into(action, &mut s.obs) {
        Ok(st) => {
            s.reward = st.reward;
            s.terminated = st.terminated;
            s.truncated = st.truncated;
            s.info = st.info;
        }
        Err(e) => {
            s.reward = 0.0;
            s.terminated = false;
            s.truncated = true;
            s.info = Info::from([
                ("error".into(), InfoValue::Str(e.to_string())),
                ("is_success".into(), InfoValue::Bool(false)),
            ]);
        }
    }
    if s.terminated || s.truncated {
        match mode {
            AutoReset::NextStep | AutoReset::Disabled => s.needs_reset = true,
            AutoReset::SameStep => {
                let mut flat = vec![0.0f32; s.env.observation_space().flat_len()];
                flatten_into(&s.obs, &mut flat);
                let final_info = std::mem::take(&mut s.info);
                let (obs, mut info) = s.env.reset(None)?;
                for (k, v) in final_info {
                    info.insert(format!("final_info.{k}").into(), v);
                }
                info.insert(
                    "final_obs".into(),
                    InfoValue::F64s(flat.iter().map(|&v| f64::from(v)).collect()),
                );
                s.obs = obs;
                s.info = info;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::make;
    use crate::space::Space;

    fn vec_env(n: usize) -> VectorEnv {
        let envs = (0..n)
            .map(|_| make("scopegym/StemDopantSteer-v1", None).unwrap())
            .collect();
        VectorEnv::new(envs, AutoReset::NextStep, 1).unwrap()
    }

    /// Runs `calls` calls through the chooser, a shared one gaining `gain(k)` at the `k`th
    /// shared call of this run; returns how many shared.
    fn choose(c: &mut ShareChooser, calls: usize, gain: impl Fn(usize) -> f64) -> usize {
        let mut shared = 0;
        for _ in 0..calls {
            if c.share() {
                c.record((gain(shared) * 1e6) as u64, 1_000_000);
                shared += 1;
            }
        }
        shared
    }

    /// Sharing that gains is kept on every call; when the second core gets busy (the helper
    /// gets little CPU) the calls run alone within six calls, with tries 8, 16, 32, ... 256
    /// calls apart; when the load goes away, sharing comes back at the next try.
    #[test]
    fn share_chooser_keeps_sharing_that_pays_and_follows_the_load() {
        let mut c = ShareChooser::default();
        assert_eq!(choose(&mut c, 1024, |_| 1.8), 1024);
        // Busy: a shared call gains nothing (0.9: the hand-off and the wait cost a little).
        let shared = choose(&mut c, 1024, |_| 0.9);
        // Six calls bring the mean from 1.8 under 1.1 (weight 1/4), then tries after 8, 16,
        // 32, 64, 128, 256, 256, 256 calls alone: 6 + 8 shared calls in 1024.
        assert_eq!(shared, 14, "shared calls while busy");
        assert_eq!(c.every, ShareChooser::PROBE_MAX);
        // The load goes away: the next try gains, and sharing stays.
        let shared = choose(&mut c, 1024, |_| 1.8);
        assert!(
            shared >= 1024 - 256,
            "{shared} of 1024 shared after the load went away"
        );
        assert_eq!(c.every, ShareChooser::PROBE_MIN);
        // Sharing that barely gains (1.05: two threads slowing each other) is not kept.
        let shared = choose(&mut c, 1024, |_| 1.05);
        assert!(shared <= 20, "{shared} of 1024 shared at a gain of 1.05");
    }

    /// The mark is set while a vector env steps its envs, on every thread, and only then.
    #[test]
    fn envs_know_when_a_vector_env_steps_them() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static MARKED: AtomicUsize = AtomicUsize::new(0);
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        struct Probe(Box<dyn Env>);
        impl Env for Probe {
            fn id(&self) -> &str {
                self.0.id()
            }
            fn observation_space(&self) -> &Space {
                self.0.observation_space()
            }
            fn action_space(&self) -> &Space {
                self.0.action_space()
            }
            fn max_episode_steps(&self) -> usize {
                self.0.max_episode_steps()
            }
            fn reset(&mut self, seed: Option<u64>) -> Result<(Value, Info)> {
                CALLS.fetch_add(1, Ordering::Relaxed);
                MARKED.fetch_add(usize::from(in_vector_env()), Ordering::Relaxed);
                self.0.reset(seed)
            }
            fn step(&mut self, action: &Value) -> Result<crate::env::Step> {
                CALLS.fetch_add(1, Ordering::Relaxed);
                MARKED.fetch_add(usize::from(in_vector_env()), Ordering::Relaxed);
                self.0.step(action)
            }
            fn render(&self) -> crate::env::RgbImage {
                self.0.render()
            }
            fn heuristic_action(&mut self, obs: &Value) -> Value {
                self.0.heuristic_action(obs)
            }
        }
        for threads in [1, 2] {
            let envs = (0..4)
                .map(|_| {
                    let e = make("scopegym/StemDopantSteer-v1", None).unwrap();
                    Box::new(Probe(e)) as Box<dyn Env>
                })
                .collect();
            let mut v = VectorEnv::new(envs, AutoReset::NextStep, threads).unwrap();
            assert!(!in_vector_env());
            let mut probe = Probe(make("scopegym/StemDopantSteer-v1", None).unwrap());
            probe.reset(Some(1)).unwrap();
            assert_eq!(
                MARKED.swap(0, Ordering::Relaxed),
                0,
                "a lone env was marked"
            );
            CALLS.store(0, Ordering::Relaxed);
            v.reset(Some(0)).unwrap();
            let actions: Vec<Value> = (0..4)
                .map(|_| {
                    v.env(0)
                        .action_space()
                        .sample(&mut scopegym_physics::rng::seeded(3))
                })
                .collect();
            for _ in 0..3 {
                v.step(&actions).unwrap();
            }
            let (marked, calls) = (
                MARKED.swap(0, Ordering::Relaxed),
                CALLS.swap(0, Ordering::Relaxed),
            );
            assert_eq!((marked, calls), (16, 16), "{threads} thread(s)");
            assert!(!in_vector_env(), "the mark outlived the call");
        }
    }

    /// Every block goes to exactly one member, in its own range, the costliest first.
    #[test]
    fn blocks_run_costliest_first_within_each_members_range() {
        let cost = [5, 90, 5, 7, 300, 1, 1];
        let order = block_order(&cost, 4, 2);
        assert_eq!(order, vec![vec![1, 3, 0, 2], vec![4, 5, 6]]);
        // More members than blocks: the last ones own nothing.
        assert_eq!(block_order(&[3, 4], 1, 3), vec![vec![0], vec![1], vec![]]);
    }

    /// The first shared call starts the helper threads: however slow, it is not measured.
    /// The next eight all share and their plain mean decides, so two uneven calls among
    /// them do not stop sharing; a later outlier (a helper descheduled once) does not either,
    /// and a second core busy from the start is left after those eight calls.
    #[test]
    fn share_chooser_ignores_the_warm_up_and_outliers() {
        let mut c = ShareChooser::default();
        let shared = choose(&mut c, 64, |k| match k {
            0 => 0.05,
            2 | 3 => 0.9,
            _ => 1.8,
        });
        assert_eq!(
            shared, 64,
            "a cold first call or two uneven ones kept sharing out"
        );
        let shared = choose(&mut c, 64, |k| if k == 10 { 0.5 } else { 1.8 });
        assert_eq!(shared, 64, "one outlier stopped sharing");
        let mut c = ShareChooser::default();
        let shared = choose(&mut c, 64, |_| 0.9);
        // The warm-up and eight measured calls, then tries after 8 and 16 calls alone.
        assert_eq!(
            shared, 11,
            "shared calls with the second core busy from the start"
        );
    }

    #[test]
    fn into_buffers_match_own_buffers() {
        let (mut a, mut b) = (vec_env(3), vec_env(3));
        let (ol, al) = (a.obs_len(), a.action_len());
        let mut obs = vec![0.0f32; 3 * ol];
        let (mut r, mut te, mut tr) = (vec![0.0; 3], vec![false; 3], vec![false; 3]);
        a.reset(Some(7)).unwrap();
        let out = Outputs {
            obs: &mut obs,
            rewards: &mut r,
            terminated: &mut te,
            truncated: &mut tr,
        };
        b.reset_into(Some(7), None, out).unwrap();
        assert_eq!(a.observations(), &obs[..]);
        let actions: Vec<f32> = (0..3 * al).map(|k| [0.1, -0.1, 0.5][k % 3]).collect();
        for _ in 0..40 {
            a.step_flat(&actions).unwrap();
            b.step_flat_into(
                &actions,
                Outputs {
                    obs: &mut obs,
                    rewards: &mut r,
                    terminated: &mut te,
                    truncated: &mut tr,
                },
            )
            .unwrap();
            assert_eq!(a.observations(), &obs[..]);
            assert_eq!(a.rewards(), &r[..]);
            assert_eq!(a.terminated(), &te[..]);
            assert_eq!(a.truncated(), &tr[..]);
        }
        let mut short = vec![0.0f32; 1];
        let e = b.step_flat_into(
            &actions,
            Outputs {
                obs: &mut short,
                rewards: &mut r,
                terminated: &mut te,
                truncated: &mut tr,
            },
        );
        assert!(matches!(e, Err(EnvError::InvalidArgument { .. })));
    }

    /// An env that fails (as an instrument refusing) on the steps listed in `fail_at`.
    #[derive(Debug)]
    struct Flaky {
        obs: Space,
        act: Space,
        t: usize,
        fail_at: Vec<usize>,
    }

    impl Env for Flaky {
        fn id(&self) -> &str {
            "test/Flaky-v1"
        }
        fn observation_space(&self) -> &Space {
            &self.obs
        }
        fn action_space(&self) -> &Space {
            &self.act
        }
        fn max_episode_steps(&self) -> usize {
            100
        }
        fn reset(&mut self, _seed: Option<u64>) -> Result<(Value, Info)> {
            self.t = 0;
            Ok((Value::Box(vec![0.0]), Info::new()))
        }
        fn step(&mut self, _action: &Value) -> Result<crate::env::Step> {
            self.t += 1;
            if self.fail_at.contains(&self.t) {
                return Err(scopegym_physics::PhysicsError::arg("bias", "refused").into());
            }
            Ok(crate::env::Step {
                obs: Value::Box(vec![self.t as f32]),
                reward: 1.0,
                terminated: false,
                truncated: false,
                info: Info::new(),
            })
        }
        fn render(&self) -> crate::env::RgbImage {
            crate::env::RgbImage::from_grey(&[0.0], 1, 1)
        }
        fn heuristic_action(&mut self, _obs: &Value) -> Value {
            Value::Box(vec![0.0])
        }
    }

    fn flaky(fail_at: &[usize]) -> Box<dyn Env> {
        Box::new(Flaky {
            obs: Space::uniform_box(&[1], 0.0, 100.0),
            act: Space::uniform_box(&[1], -1.0, 1.0),
            t: 0,
            fail_at: fail_at.to_vec(),
        })
    }

    #[test]
    fn a_bad_action_steps_no_env() {
        let (mut a, mut b) = (vec_env(4), vec_env(4));
        a.reset(Some(1)).unwrap();
        b.reset(Some(1)).unwrap();
        let al = a.action_len();
        let good: Vec<f32> = (0..4 * al).map(|k| [0.05, -0.05, 0.5][k % 3]).collect();
        let mut bad = good.clone();
        bad[3 * al] = f32::NAN;
        let e = a.step_flat(&bad).unwrap_err().to_string();
        assert!(e.contains("actions[3][0]"), "{e}");
        let vals: Vec<Value> = (0..4)
            .map(|i| Value::Box(bad[i * al..(i + 1) * al].to_vec()))
            .collect();
        let e = a.step(&vals).unwrap_err().to_string();
        assert!(e.contains("actions[3][0]"), "{e}");
        // Neither failed call stepped any env: a and b stay in lockstep.
        for _ in 0..10 {
            a.step_flat(&good).unwrap();
            b.step_flat(&good).unwrap();
            assert_eq!(a.observations(), b.observations());
            assert_eq!(a.rewards(), b.rewards());
        }
    }

    #[test]
    fn an_env_failure_ends_that_episode_and_keeps_the_others() {
        for mode in [
            AutoReset::NextStep,
            AutoReset::SameStep,
            AutoReset::Disabled,
        ] {
            let envs = vec![flaky(&[]), flaky(&[3]), flaky(&[])];
            let mut v = VectorEnv::new(envs, mode, 1).unwrap();
            v.reset(Some(0)).unwrap();
            let a = [0.0f32; 3];
            for _ in 0..2 {
                v.step_flat(&a).unwrap();
            }
            v.step_flat(&a).unwrap();
            assert_eq!(v.rewards(), &[1.0, 0.0, 1.0], "{mode:?}");
            assert_eq!(v.truncated(), &[false, true, false], "{mode:?}");
            assert_eq!(v.observations()[0], 3.0);
            let info = v.infos()[1];
            match info.get("error").or_else(|| info.get("final_info.error")) {
                Some(InfoValue::Str(m)) => assert!(m.contains("bias"), "{m}"),
                other => panic!("{mode:?}: no error in info: {other:?}"),
            }
            match mode {
                AutoReset::SameStep => assert_eq!(v.observations()[1], 0.0),
                _ => assert_eq!(v.observations()[1], 2.0, "last good observation kept"),
            }
            if mode == AutoReset::Disabled {
                // The failed env must be reset before it steps again; the others were kept.
                assert!(matches!(v.step_flat(&a), Err(EnvError::NeedsReset(_))));
                v.reset_mask(None, &[false, true, false]).unwrap();
            }
            v.step_flat(&a).unwrap();
            assert_eq!(v.observations()[0], 4.0, "{mode:?}");
            assert_eq!(v.observations()[2], 4.0, "{mode:?}");
            assert!(
                v.observations()[1] <= 1.0,
                "{mode:?}: the failed env was reset"
            );
        }
    }
}
