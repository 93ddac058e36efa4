//! Bayesian optimization on the tasks: the `bo` agent (a GP with a constant mean) and the
//! `sgp` agent (a structured GP whose mean is a physical model), driven by the observation
//! only.
//!
//! Three task families, recognized by the task id's name (any version):
//!
//! - **Grid exploration** (`PfmSpectroscopyExplore`, `StemEelsExplore`, and any task whose
//!   observation has a `measured_value` `g × g` map and whose action is `Discrete(g²)`): the GP
//!   models the measured value against the grid position (row, column scaled to [0, 1]); each
//!   step measures the unmeasured candidate with the best acquisition. Where the observation
//!   has `pristine` (PFM: where a new loop would count), candidates are pristine points while
//!   any remain and the GP is fitted to the loops measured on pristine points only (the agent
//!   logs which its own loops were). The first `n_initial` points are random.
//! - **Feedback tuning** (`AfmFeedbackTuning`): the GP models the step reward against the
//!   setting the observation reports (`obs[0..3]`, P, I and line rate as log positions in
//!   [-1, 1]). The action changes the setting relatively; the agent learns how far a unit
//!   action moves each position from its own moves (the median ratio, starting from
//!   `afm_gain`), travels toward the acquisition's choice (each step is a measurement too) and,
//!   in the last `settle_steps` steps, goes to and holds the setting with the best posterior
//!   mean among those measured.
//! - **Autofocus** (`StemAutofocus`): the GP models the image sharpness `var/mean²` of each
//!   frame (the task's criterion, from the observation) against the corrector setting the agent
//!   has applied (ΔC10, ΔC12a, ΔC12b from the episode start, in units of the task's step), in
//!   the box `±focus_box`. Moves are at most one step per coefficient per frame; every frame on
//!   the way is a measurement. When the steps left just suffice, it travels to the setting with
//!   the best posterior mean among those measured and declares done.
//!
//! The `sgp` agent's GP mean on both settings tasks is a single peak on a floor,
//! `a + h·exp(−Σ bᵢ (xᵢ − cᵢ)²)` ([`GaussianPeak`]: sharpness peaks at the focus `c` and levels
//! off far from it; the tracking reward peaks at the best gains), fitted with the kernel's
//! hyperparameters. A quadratic bowl ([`crate::gp::Quadratic`]) did worse on both (autofocus
//! 1.71 against 1.88, feedback tuning −46.1 against −41.9; 10 seeds × 2 episodes, medium, test
//! split): it keeps falling where the measured values level off.
//!
//! Ground truth never reaches the agent: it reads observations and rewards only, so it runs on
//! a real instrument as on the simulator.

use crate::acquisition::Acquisition;
use crate::agent::{Agent, GridMaps, Insight, Region, acquisition_control, acquisition_controls};
use crate::error::{AgentError, Result};
use crate::gp::{Constant, GaussianPeak, Gp, GpConfig, Kernel, MeanFunction, Refitter};
use rand::Rng;
use scopegym_envs::rng::{SimRng, seeded};
use scopegym_envs::tasks::stem_autofocus::normalized_variance;
use scopegym_envs::{Env, Space, Value};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What the task adapters ask of a surrogate model: fit to data, then the posterior mean and
/// standard deviation at candidates, and a joint posterior draw (Thompson sampling).
pub trait Surrogate: Send + std::fmt::Debug {
    /// Fits to inputs `x` (each in `[0, 1]^d`) and outputs `y`.
    fn fit(&mut self, x: &[Vec<f64>], y: &[f64]) -> Result<()>;
    /// Posterior mean and standard deviation at each of `x`, in the units of `y`.
    fn predict(&self, x: &[Vec<f64>]) -> Result<(Vec<f64>, Vec<f64>)>;
    /// One joint posterior draw at `x`.
    fn sample(&self, x: &[Vec<f64>], rng: &mut SimRng) -> Result<Vec<f64>>;
}

/// The GP surrogate of the `bo` (constant mean) and `sgp` (Gaussian peak mean) agents: an
/// exact [`Gp`] on the unit cube, its hyperparameters refitted at every call (warm-started from
/// the previous fit, a cold fit with random restarts every tenth, see [`Refitter`]).
#[derive(Debug)]
pub struct GpSurrogate {
    refitter: Refitter,
    mean: Arc<dyn MeanFunction>,
    dim: usize,
    seed: u64,
    gp: Option<Gp>,
}

impl GpSurrogate {
    /// A GP with the given kernel and mean on `[0, 1]^dim`.
    pub fn new(kernel: Kernel, mean: Arc<dyn MeanFunction>, dim: usize, seed: u64) -> Self {
        let config = GpConfig {
            kernel,
            ..GpConfig::default()
        };
        Self {
            refitter: Refitter::new(config, 10),
            mean,
            dim,
            seed,
            gp: None,
        }
    }

    /// The [`ModelFactory`] of the `bo` and `sgp` agents: a constant mean, or with
    /// `structured` the Gaussian peak on a floor `a + h·exp(−Σ bᵢ (uᵢ − cᵢ)²)` ([`GaussianPeak`]).
    pub fn factory(
        dim: usize,
        structured: bool,
        cfg: &BoAgentConfig,
        seed: u64,
    ) -> Result<Box<dyn Surrogate>> {
        let mean: Arc<dyn MeanFunction> = if structured {
            Arc::new(GaussianPeak { dim })
        } else {
            Arc::new(Constant)
        };
        Ok(Box::new(Self::new(cfg.kernel, mean, dim, seed)))
    }

    /// The fitted GP (after [`Surrogate::fit`]).
    pub fn gp(&self) -> Option<&Gp> {
        self.gp.as_ref()
    }

    fn fitted(&self) -> Result<&Gp> {
        self.gp
            .as_ref()
            .ok_or_else(|| AgentError::arg("surrogate", "predict before fit"))
    }
}

impl Surrogate for GpSurrogate {
    fn fit(&mut self, x: &[Vec<f64>], y: &[f64]) -> Result<()> {
        let bounds = vec![(0.0, 1.0); self.dim];
        let seed = self.seed.wrapping_add(self.refitter.fits() as u64);
        self.gp = Some(self.refitter.fit(self.mean.clone(), &bounds, x, y, seed)?);
        Ok(())
    }

    fn predict(&self, x: &[Vec<f64>]) -> Result<(Vec<f64>, Vec<f64>)> {
        Ok(self.fitted()?.predict(x))
    }

    fn sample(&self, x: &[Vec<f64>], rng: &mut SimRng) -> Result<Vec<f64>> {
        let mut draws = self.fitted()?.sample_joint(x, 1, rng)?;
        draws
            .pop()
            .ok_or_else(|| AgentError::numerical("GP sample", "no draw"))
    }
}

/// The index of the candidate with the best acquisition (ties: the first).
pub fn choose(
    model: &dyn Surrogate,
    acquisition: Acquisition,
    xi: f64,
    best: f64,
    candidates: &[Vec<f64>],
    rng: &mut SimRng,
) -> Result<usize> {
    if candidates.is_empty() {
        return Err(AgentError::arg("candidates", "no candidate to choose from"));
    }
    let scores = match acquisition {
        Acquisition::Thompson => model.sample(candidates, rng)?,
        a => {
            let (mu, sd) = model.predict(candidates)?;
            mu.iter()
                .zip(&sd)
                .map(|(&m, &s)| a.score(m, s, best, xi).unwrap_or(f64::NEG_INFINITY))
                .collect()
        }
    };
    Ok(argmax(&scores))
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if x > &v[best] || (v[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best
}

/// Settings of the `bo` and `sgp` agents on tasks (agent config TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BoAgentConfig {
    /// The acquisition function. Default LogEI.
    pub acquisition: Acquisition,
    /// The GP kernel (`matern52` or `rbf`). Default Matérn-5/2.
    pub kernel: Kernel,
    /// The improvement margin ξ of EI, LogEI and PI, in the units of the modelled quantity.
    /// Default 0.
    pub xi: f64,
    /// Random (seeded) measurements before the GP chooses: default 10 on grids, 4 for the
    /// settings of feedback tuning and autofocus.
    pub n_initial: Option<usize>,
    /// Candidates drawn at random (seeded) per choice in the continuous setting spaces. Default
    /// 1000.
    pub candidates: usize,
    /// Autofocus: half-widths of the search box in steps of the task's `max_step` (ΔC10,
    /// ΔC12a, ΔC12b). Default [3.5, 2.5, 2.5]: the medium level's ±6 nm defocus and up to 4 nm
    /// astigmatism at 2 nm steps, with half a step to spare.
    pub focus_box: [f64; 3],
    /// Autofocus: the dwell component of every action (the task maps [-1, 1] log-uniformly
    /// onto its dwell range). Default 0: the task's nominal 2 µs with its default range.
    pub dwell: f64,
    /// Feedback tuning: the initial guess of how far a unit action moves each setting's log
    /// position (observation units, [-1, 1] scale), replaced by the median of the agent's own
    /// measured moves. Default 0.25.
    pub afm_gain: f64,
    /// Feedback tuning: steps at the end of the episode spent going to and holding the
    /// setting with the best posterior mean. Default 4.
    pub settle_steps: usize,
}

impl Default for BoAgentConfig {
    fn default() -> Self {
        Self {
            acquisition: Acquisition::LogEi,
            kernel: Kernel::Matern52,
            xi: 0.0,
            n_initial: None,
            candidates: 1000,
            focus_box: [3.5, 2.5, 2.5],
            dwell: 0.0,
            afm_gain: 0.25,
            settle_steps: 4,
        }
    }
}

impl BoAgentConfig {
    /// Checks every field (errors name the field).
    pub fn validate(&self) -> Result<()> {
        if !self.xi.is_finite() {
            return Err(AgentError::config("xi", "must be finite"));
        }
        if let Acquisition::Ucb { beta } = self.acquisition
            && !(beta >= 0.0 && beta.is_finite())
        {
            return Err(AgentError::config(
                "acquisition.ucb.beta",
                "must be ≥ 0 and finite",
            ));
        }
        if self.n_initial == Some(0) {
            return Err(AgentError::config("n_initial", "must be ≥ 1"));
        }
        if !(1..=1_000_000).contains(&self.candidates) {
            return Err(AgentError::config("candidates", "must be in 1..=1e6"));
        }
        if self.focus_box.iter().any(|b| !(*b > 0.0 && b.is_finite())) {
            return Err(AgentError::config(
                "focus_box",
                "each half-width must be > 0",
            ));
        }
        if !(-1.0..=1.0).contains(&self.dwell) {
            return Err(AgentError::config("dwell", "must be in [-1, 1]"));
        }
        if !(self.afm_gain > 0.0 && self.afm_gain <= 2.0) {
            return Err(AgentError::config("afm_gain", "must be in (0, 2]"));
        }
        Ok(())
    }
}

/// Which family of task the agent is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A `g × g` grid of candidate points.
    Grid { g: usize, pristine: bool },
    /// AFM feedback tuning.
    Afm,
    /// STEM autofocus.
    Focus,
}

/// The task's name from its id (`scopegym/StemAutofocus-v2` → `StemAutofocus`).
fn task_name(id: &str) -> &str {
    let s = id.rsplit('/').next().unwrap_or(id);
    s.rsplit_once("-v").map_or(s, |(n, _)| n)
}

fn mode_of(env: &dyn Env) -> std::result::Result<Mode, String> {
    if let (Space::Dict(keys), Space::Discrete { n, start: 0 }) =
        (env.observation_space(), env.action_space())
        && let Some((_, Space::Box { shape, .. })) =
            keys.iter().find(|(k, _)| k == "measured_value")
        && shape.len() == 2
        && shape[0] == shape[1]
        && (shape[0] * shape[1]) as i64 == *n
    {
        return Ok(Mode::Grid {
            g: shape[0],
            pristine: keys.iter().any(|(k, _)| k == "pristine"),
        });
    }
    match task_name(env.id()) {
        "AfmFeedbackTuning" => Ok(Mode::Afm),
        "StemAutofocus" => Ok(Mode::Focus),
        _ => Err(
            "it chooses grid points (a `measured_value` map and a Discrete action over \
                  the grid), AFM feedback settings or autofocus corrector settings; this task \
                  is sequential control"
                .into(),
        ),
    }
}

fn obs_key<'a>(obs: &'a Value, key: &str) -> Result<&'a [f32]> {
    obs.get(key)
        .and_then(Value::as_box)
        .ok_or_else(|| AgentError::arg("observation", format!("no Box key {key:?}")))
}

/// The `bo` agent (constant-mean GP) and the `sgp` agent (structured GP) on a task.
#[derive(Debug)]
pub struct BoAgent {
    cfg: BoAgentConfig,
    structured: bool,
    seed: u64,
    model: Option<Box<dyn Surrogate>>,
    mode: Option<Mode>,
    rng: SimRng,
    /// Inputs (unit cube) and outputs of the measurements the model is fitted to.
    xs: Vec<Vec<f64>>,
    ys: Vec<f64>,
    steps: usize,
    max_steps: usize,
    /// Grid: the cell chosen last and whether it was pristine then.
    pending: Option<(usize, bool)>,
    /// Settings: where the agent is (AFM: observation positions; focus: steps from the start).
    now: Vec<f64>,
    target: Option<Vec<f64>>,
    /// AFM: measured moves per unit action, per setting.
    ratios: [Vec<f64>; 3],
    last_action: Vec<f64>,
    factory: ModelFactory,
    /// Grid cells the operator vetoed or marked off-limits (kept for the whole run).
    forbidden: std::collections::BTreeSet<usize>,
}

/// Builds the surrogate for inputs of dimension `dim`; `structured` asks for the physical
/// (Gaussian peak) mean.
pub type ModelFactory =
    fn(dim: usize, structured: bool, cfg: &BoAgentConfig, seed: u64) -> Result<Box<dyn Surrogate>>;

impl BoAgent {
    /// A `bo` (`structured = false`) or `sgp` agent with models from `factory`.
    pub fn new(
        cfg: BoAgentConfig,
        structured: bool,
        seed: u64,
        factory: ModelFactory,
    ) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            structured,
            seed,
            model: None,
            mode: None,
            rng: seeded(seed),
            xs: Vec::new(),
            ys: Vec::new(),
            steps: 0,
            max_steps: 0,
            pending: None,
            now: Vec::new(),
            target: None,
            ratios: Default::default(),
            last_action: Vec::new(),
            factory,
            forbidden: Default::default(),
        })
    }

    /// A `bo` or `sgp` agent with the GP surrogate from a TOML config (`None`: the defaults).
    pub fn from_toml(config: Option<&toml::Value>, structured: bool, seed: u64) -> Result<Self> {
        let cfg: BoAgentConfig = crate::error::parse_config(config)?;
        Self::new(cfg, structured, seed, GpSurrogate::factory)
    }

    fn n_initial(&self) -> usize {
        self.cfg.n_initial.unwrap_or(match self.mode {
            Some(Mode::Grid { .. }) => 10,
            _ => 4,
        })
    }

    /// Fits the model to the data and returns it.
    fn fitted(&mut self) -> Result<&dyn Surrogate> {
        let model = self
            .model
            .as_deref_mut()
            .ok_or_else(|| AgentError::arg("bo", "no model"))?;
        model.fit(&self.xs, &self.ys)?;
        Ok(model)
    }

    /// The measured input with the largest posterior mean (the recommendation).
    fn best_measured(&mut self) -> Result<Vec<f64>> {
        if self.xs.is_empty() {
            return Err(AgentError::arg("bo", "no measurement yet"));
        }
        let xs = self.xs.clone();
        let (mu, _) = if self.xs.len() >= 2 {
            self.fitted()?.predict(&xs)?
        } else {
            (self.ys.clone(), Vec::new())
        };
        Ok(xs[argmax(&mu)].clone())
    }

    /// Random candidates in the unit cube, plus the measured inputs.
    fn continuous_candidates(&mut self, dim: usize) -> Vec<Vec<f64>> {
        let mut c: Vec<Vec<f64>> = (0..self.cfg.candidates)
            .map(|_| (0..dim).map(|_| self.rng.random::<f64>()).collect())
            .collect();
        c.extend(self.xs.iter().cloned());
        c
    }

    /// The next input the acquisition chooses among `candidates` (random before `n_initial`
    /// measurements).
    fn next_input(&mut self, candidates: &[Vec<f64>]) -> Result<usize> {
        if self.xs.len() < self.n_initial() || self.xs.len() < 2 {
            return Ok(self.rng.random_range(0..candidates.len()));
        }
        let best = self.ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (acq, xi) = (self.cfg.acquisition, self.cfg.xi);
        self.fitted()?;
        let model = self.model.as_deref().expect("fitted above");
        choose(model, acq, xi, best, candidates, &mut self.rng)
    }

    fn act_grid(&mut self, g: usize, has_pristine: bool, obs: &Value) -> Result<Value> {
        let count = obs_key(obs, "measured_count")?;
        let pristine = if has_pristine {
            Some(obs_key(obs, "pristine")?)
        } else {
            None
        };
        let allowed = |k: &usize| !self.forbidden.contains(k);
        let free = |k: usize| count[k] == 0.0;
        let mut cells: Vec<usize> = (0..g * g)
            .filter(|&k| free(k) && pristine.is_none_or(|p| p[k] > 0.5))
            .filter(allowed)
            .collect();
        if cells.is_empty() {
            cells = (0..g * g).filter(|&k| free(k)).filter(allowed).collect();
        }
        if cells.is_empty() {
            cells = (0..g * g).filter(allowed).collect();
        }
        if cells.is_empty() {
            return Err(AgentError::arg(
                "off_limits",
                "every grid cell is vetoed or off-limits",
            ));
        }
        let scale = (g.max(2) - 1) as f64;
        let cand: Vec<Vec<f64>> = cells
            .iter()
            .map(|&k| vec![(k / g) as f64 / scale, (k % g) as f64 / scale])
            .collect();
        let k = cells[self.next_input(&cand)?];
        self.pending = Some((k, pristine.is_none_or(|p| p[k] > 0.5)));
        Ok(Value::Discrete(k as i64))
    }

    /// The unit-cube position of AFM observation positions `p ∈ [-1, 1]³`.
    fn afm_unit(p: &[f64]) -> Vec<f64> {
        p.iter()
            .map(|v| ((v + 1.0) / 2.0).clamp(0.0, 1.0))
            .collect()
    }

    fn afm_gain(&self, i: usize) -> f64 {
        let r = &self.ratios[i];
        if r.is_empty() {
            return self.cfg.afm_gain;
        }
        let mut v = r.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2].max(1e-3)
    }

    fn act_afm(&mut self, obs: &Value) -> Result<Value> {
        let o = obs
            .as_box()
            .ok_or_else(|| AgentError::arg("observation", "not a Box"))?;
        if o.len() < 3 {
            return Err(AgentError::arg("observation", "fewer than 3 elements"));
        }
        self.now = o[..3].iter().map(|&v| f64::from(v)).collect();
        let left = self.max_steps.saturating_sub(self.steps);
        let target = if left <= self.cfg.settle_steps && !self.xs.is_empty() {
            let u = self.best_measured()?;
            u.iter().map(|v| 2.0 * v - 1.0).collect()
        } else {
            let reached = self.target.as_ref().is_none_or(|t| {
                (0..3).all(|i| (t[i] - self.now[i]).abs() <= self.afm_gain(i) + 1e-9)
            });
            if reached {
                let cand = self.continuous_candidates(3);
                let u = &cand[self.next_input(&cand)?];
                u.iter().map(|v| 2.0 * v - 1.0).collect()
            } else {
                self.target.clone().expect("not reached, so set")
            }
        };
        let a: Vec<f64> = (0..3)
            .map(|i| ((target[i] - self.now[i]) / self.afm_gain(i)).clamp(-1.0, 1.0))
            .collect();
        self.target = Some(target);
        self.last_action = a.clone();
        Ok(Value::Box(a.iter().map(|&v| v as f32).collect()))
    }

    fn focus_unit(&self, x: &[f64]) -> Vec<f64> {
        x.iter()
            .zip(&self.cfg.focus_box)
            .map(|(v, b)| ((v / b + 1.0) / 2.0).clamp(0.0, 1.0))
            .collect()
    }

    fn focus_setting(&self, u: &[f64]) -> Vec<f64> {
        u.iter()
            .zip(&self.cfg.focus_box)
            .map(|(v, b)| (2.0 * v - 1.0) * b)
            .collect()
    }

    fn act_focus(&mut self) -> Result<Value> {
        let dwell = self.cfg.dwell as f32;
        let left = self.max_steps.saturating_sub(self.steps);
        let travel = |now: &[f64], t: &[f64]| {
            (0..3)
                .map(|i| (t[i] - now[i]).abs().ceil() as usize)
                .max()
                .unwrap_or(0)
        };
        let best_unit = self.best_measured()?;
        let best = self.focus_setting(&best_unit);
        let finishing = left <= travel(&self.now, &best) + 2;
        let target = if finishing {
            if travel(&self.now, &best) == 0 {
                return Ok(Value::Box(vec![0.0, 0.0, 0.0, 1.0, dwell]));
            }
            best
        } else {
            let reached = self
                .target
                .as_ref()
                .is_none_or(|t| travel(&self.now, t) == 0);
            if reached {
                let cand = self.continuous_candidates(3);
                let u = cand[self.next_input(&cand)?].clone();
                self.focus_setting(&u)
            } else {
                self.target.clone().expect("not reached, so set")
            }
        };
        let mut a = vec![0f32, 0.0, 0.0, -1.0, dwell];
        let mut moved = self.now.clone();
        for i in 0..3 {
            let d = (target[i] - self.now[i]).clamp(-1.0, 1.0);
            a[i] = d as f32;
            moved[i] += f64::from(d as f32);
        }
        self.last_action = moved;
        self.target = Some(target);
        Ok(Value::Box(a))
    }
}

impl Agent for BoAgent {
    fn name(&self) -> &str {
        if self.structured { "sgp" } else { "bo" }
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).unwrap_or_default()
    }

    fn begin_episode(&mut self, env: &dyn Env, obs: &Value, seed: u64) -> Result<()> {
        let mode = mode_of(env).map_err(|reason| AgentError::Unsupported {
            agent: self.name().into(),
            task: env.id().into(),
            reason,
        })?;
        if self.structured && matches!(mode, Mode::Grid { .. }) {
            return Err(AgentError::Unsupported {
                agent: "sgp".into(),
                task: env.id().into(),
                reason: "its physical mean models a peak in instrument settings (autofocus \
                         sharpness, feedback tracking); use bo or dkl on grid exploration"
                    .into(),
            });
        }
        let dim = match mode {
            Mode::Grid { .. } => 2,
            Mode::Afm | Mode::Focus => 3,
        };
        self.mode = Some(mode);
        self.rng = seeded(self.seed ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.model = Some((self.factory)(
            dim,
            self.structured,
            &self.cfg,
            seed ^ self.seed,
        )?);
        self.xs.clear();
        self.ys.clear();
        self.steps = 0;
        self.max_steps = env.max_episode_steps();
        self.pending = None;
        self.target = None;
        self.ratios = Default::default();
        self.now = vec![0.0; 3];
        if mode == Mode::Focus {
            let frame = obs
                .as_box()
                .ok_or_else(|| AgentError::arg("observation", "not a Box"))?;
            self.xs.push(self.focus_unit(&self.now));
            self.ys.push(normalized_variance(frame));
        }
        Ok(())
    }

    fn act(&mut self, _env: &mut dyn Env, obs: &Value) -> Result<Value> {
        let a = match self.mode {
            Some(Mode::Grid { g, pristine }) => self.act_grid(g, pristine, obs),
            Some(Mode::Afm) => self.act_afm(obs),
            Some(Mode::Focus) => self.act_focus(),
            None => Err(AgentError::arg("bo", "act called before begin_episode")),
        };
        self.steps += 1;
        a
    }

    fn insight(&self) -> Option<Insight> {
        let mut ins = Insight {
            controls: acquisition_controls(self.cfg.acquisition, self.cfg.xi),
            ..Insight::default()
        };
        let Some(Mode::Grid { g, .. }) = self.mode else {
            return Some(ins);
        };
        if let Some((k, _)) = self.pending {
            let gf = g as f64;
            ins.point = Some([((k / g) as f64 + 0.5) / gf, ((k % g) as f64 + 0.5) / gf]);
        }
        let scale = (g.max(2) - 1) as f64;
        let cells: Vec<Vec<f64>> = (0..g * g)
            .map(|k| vec![(k / g) as f64 / scale, (k % g) as f64 / scale])
            .collect();
        let forbidden: Vec<bool> = (0..g * g).map(|k| self.forbidden.contains(&k)).collect();
        // The model as last fitted (it is fitted once the random initial points are taken).
        if self.xs.len() >= 2
            && let Some(model) = self.model.as_deref()
            && let Ok((mean, sd)) = model.predict(&cells)
        {
            let best = self.ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let acquisition = (0..g * g)
                .map(|k| match self.cfg.acquisition {
                    _ if forbidden[k] => f64::NEG_INFINITY,
                    // A draw is not a map: show the mean it is drawn around.
                    Acquisition::Thompson => mean[k],
                    a => a
                        .score(mean[k], sd[k], best, self.cfg.xi)
                        .unwrap_or(f64::NEG_INFINITY),
                })
                .collect();
            ins.maps = Some(GridMaps {
                rows: g,
                cols: g,
                mean,
                sd,
                acquisition,
                forbidden,
            });
        } else {
            ins.maps = Some(GridMaps {
                rows: g,
                cols: g,
                mean: vec![f64::NAN; g * g],
                sd: vec![f64::NAN; g * g],
                acquisition: vec![f64::NAN; g * g],
                forbidden,
            });
        }
        Some(ins)
    }

    /// `acquisition` (a name [`Acquisition::parse`] takes; `ucb` keeps the current β),
    /// `beta` (UCB's β ≥ 0; switches the acquisition to UCB) and `xi` (ξ of EI, LogEI, PI, in
    /// the units of the modelled quantity).
    fn set_control(&mut self, name: &str, value: &serde_json::Value) -> Result<()> {
        let mut cfg = self.cfg.clone();
        (cfg.acquisition, cfg.xi) = acquisition_control(
            self.name(),
            name,
            value,
            (cfg.acquisition, cfg.xi),
            "ei, logei, ucb, pi, maxuncertainty, thompson",
        )?;
        cfg.validate()?;
        self.cfg = cfg;
        Ok(())
    }

    fn veto(&mut self, action: &Value) -> Result<()> {
        let Some(Mode::Grid { g, .. }) = self.mode else {
            return Err(AgentError::arg(
                "veto",
                "the agent takes a veto on grid tasks only",
            ));
        };
        match action {
            Value::Discrete(k) if (0..(g * g) as i64).contains(k) => {
                self.forbidden.insert(*k as usize);
                Ok(())
            }
            _ => Err(AgentError::arg(
                "veto",
                format!("{action:?} is not a cell of the {g} × {g} grid"),
            )),
        }
    }

    fn forbid(&mut self, region: &Region) -> Result<()> {
        let Some(Mode::Grid { g, .. }) = self.mode else {
            return Err(AgentError::arg(
                "off_limits",
                "the agent marks cells off-limits on grid tasks only",
            ));
        };
        self.forbidden.extend(region.cells(g)?);
        Ok(())
    }

    fn observe(&mut self, _action: &Value, reward: f64, next_obs: &Value) -> Result<()> {
        match self.mode {
            Some(Mode::Grid { g, .. }) => {
                if let Some((k, counts)) = self.pending.take() {
                    let v = f64::from(obs_key(next_obs, "measured_value")?[k]);
                    if counts && v.is_finite() {
                        let scale = (g.max(2) - 1) as f64;
                        self.xs
                            .push(vec![(k / g) as f64 / scale, (k % g) as f64 / scale]);
                        self.ys.push(v);
                    }
                }
            }
            Some(Mode::Afm) => {
                let o = next_obs
                    .as_box()
                    .ok_or_else(|| AgentError::arg("observation", "not a Box"))?;
                let p: Vec<f64> = o[..3].iter().map(|&v| f64::from(v)).collect();
                for (i, &pi) in p.iter().enumerate() {
                    let a = self.last_action.get(i).copied().unwrap_or(0.0);
                    if a.abs() > 0.2 && pi.abs() < 0.98 && self.now[i].abs() < 0.98 {
                        let r = (pi - self.now[i]) / a;
                        if r > 0.0 && r.is_finite() {
                            self.ratios[i].push(r);
                        }
                    }
                }
                self.xs.push(Self::afm_unit(&p));
                self.ys.push(reward);
            }
            // A move's frame (a `done` step sets no move).
            Some(Mode::Focus) if self.last_action.len() == 3 => {
                self.now = std::mem::take(&mut self.last_action);
                let frame = next_obs
                    .as_box()
                    .ok_or_else(|| AgentError::arg("observation", "not a Box"))?;
                self.xs.push(self.focus_unit(&self.now));
                self.ys.push(normalized_variance(frame));
            }
            Some(Mode::Focus) => {}
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::run_episode;
    use scopegym_envs::registry::make;

    /// A test surrogate: the mean is an inverse-distance-weighted average of the data, the
    /// standard deviation the distance to the nearest datum (enough to exercise the adapters;
    /// the GP is tested on its own).
    #[derive(Debug, Default)]
    struct Idw {
        x: Vec<Vec<f64>>,
        y: Vec<f64>,
    }

    impl Surrogate for Idw {
        fn fit(&mut self, x: &[Vec<f64>], y: &[f64]) -> Result<()> {
            self.x = x.to_vec();
            self.y = y.to_vec();
            Ok(())
        }
        fn predict(&self, x: &[Vec<f64>]) -> Result<(Vec<f64>, Vec<f64>)> {
            let mut mu = Vec::new();
            let mut sd = Vec::new();
            for p in x {
                let (mut w, mut s, mut dmin) = (0.0, 0.0, f64::MAX);
                for (q, y) in self.x.iter().zip(&self.y) {
                    let d2: f64 = p.iter().zip(q).map(|(a, b)| (a - b).powi(2)).sum();
                    dmin = dmin.min(d2.sqrt());
                    let wi = 1.0 / (d2 + 1e-6);
                    w += wi;
                    s += wi * y;
                }
                mu.push(s / w);
                sd.push(dmin);
            }
            Ok((mu, sd))
        }
        fn sample(&self, x: &[Vec<f64>], rng: &mut SimRng) -> Result<Vec<f64>> {
            let (mu, sd) = self.predict(x)?;
            Ok(mu
                .iter()
                .zip(&sd)
                .map(|(m, s)| m + s * (rng.random::<f64>() - 0.5))
                .collect())
        }
    }

    fn idw(
        _dim: usize,
        _structured: bool,
        _cfg: &BoAgentConfig,
        _seed: u64,
    ) -> Result<Box<dyn Surrogate>> {
        Ok(Box::new(Idw::default()))
    }

    #[test]
    fn recognizes_the_task_families() {
        let mode = |id: &str| mode_of(make(id, None).unwrap().as_ref());
        assert_eq!(
            mode("scopegym/PfmSpectroscopyExplore-v1"),
            Ok(Mode::Grid {
                g: 32,
                pristine: true
            })
        );
        assert_eq!(
            mode("scopegym/StemEelsExplore-v2"),
            Ok(Mode::Grid {
                g: 32,
                pristine: false
            })
        );
        assert_eq!(mode("scopegym/AfmFeedbackTuning-v2"), Ok(Mode::Afm));
        assert_eq!(mode("scopegym/StemAutofocus-v2"), Ok(Mode::Focus));
        assert!(mode("scopegym/StemDopantSteer-v1").is_err());
        assert_eq!(task_name("scopegym/StemAutofocus-v12"), "StemAutofocus");
    }

    #[test]
    fn sgp_refuses_grids_and_bo_refuses_control_tasks() {
        let env = make("scopegym/StemEelsExplore-v2", None).unwrap();
        let mut a = BoAgent::new(BoAgentConfig::default(), true, 0, idw).unwrap();
        let (obs, _) = make("scopegym/StemEelsExplore-v2", None)
            .unwrap()
            .reset(Some(0))
            .unwrap();
        let e = a.begin_episode(env.as_ref(), &obs, 0).unwrap_err();
        assert!(matches!(e, AgentError::Unsupported { .. }), "{e}");
        let mut env = make("scopegym/StemDopantSteer-v1", None).unwrap();
        let mut b = BoAgent::new(BoAgentConfig::default(), false, 0, idw).unwrap();
        let e = run_episode(env.as_mut(), &mut b, 0).unwrap_err();
        assert!(e.to_string().contains("sequential control"), "{e}");
    }

    #[test]
    fn bad_configs_name_the_field() {
        let bad = |toml_text: &str| {
            let c: BoAgentConfig = toml::from_str(toml_text).unwrap();
            c.validate().unwrap_err().to_string()
        };
        assert!(bad("n_initial = 0").contains("n_initial"));
        assert!(bad("focus_box = [1.0, 0.0, 1.0]").contains("focus_box"));
        assert!(bad("acquisition = { ucb = { beta = -1.0 } }").contains("beta"));
        assert!(toml::from_str::<BoAgentConfig>("nope = 1").is_err());
    }

    #[test]
    fn grid_agent_measures_fresh_pristine_points_within_budget() {
        let mut env = make("scopegym/StemEelsExplore-v2", None).unwrap();
        let mut a = BoAgent::new(BoAgentConfig::default(), false, 3, idw).unwrap();
        let rec = run_episode(env.as_mut(), &mut a, 5).unwrap();
        assert_eq!(rec.steps, env.max_episode_steps());
        // Every step measured a new point (no candidate repeats while unmeasured ones remain).
        assert_eq!(a.xs.len(), rec.steps);
        let mut seen = a.xs.clone();
        seen.sort_by(|p, q| p.partial_cmp(q).unwrap());
        seen.dedup();
        assert_eq!(seen.len(), rec.steps);
    }

    /// The operator's veto and off-limits region: the agent never proposes those cells again
    /// (asked again after each veto, as `scopegym serve` does), and controls are checked.
    #[test]
    fn vetoed_and_off_limits_cells_are_never_proposed() {
        let mut env = make("scopegym/StemEelsExplore-v2", None).unwrap();
        let mut a = BoAgent::new(BoAgentConfig::default(), false, 3, idw).unwrap();
        let (mut obs, _) = env.reset(Some(5)).unwrap();
        a.begin_episode(env.as_ref(), &obs, 5).unwrap();
        a.forbid(&Region {
            rows: [0, 15],
            cols: [0, 31],
        })
        .unwrap();
        let mut vetoed = Vec::new();
        let mut taken = Vec::new();
        for step in 0..30 {
            let mut action = a.act(env.as_mut(), &obs).unwrap();
            if step % 3 == 0 {
                a.veto(&action).unwrap();
                vetoed.push(action.clone());
                action = a.act(env.as_mut(), &obs).unwrap();
            }
            if step == 12 {
                a.set_control("beta", &serde_json::json!(9.0)).unwrap();
            }
            let s = env.step(&action).unwrap();
            a.observe(&action, s.reward, &s.obs).unwrap();
            taken.push(action);
            obs = s.obs;
        }
        for v in &taken {
            let Value::Discrete(k) = v else { panic!() };
            assert!(*k >= 16 * 32, "cell {k} is in the off-limits rows 0..=15");
            assert!(!vetoed.contains(v), "vetoed {v:?} was proposed again");
        }
        assert_eq!(vetoed.len(), 10);
        let ins = a.insight().unwrap();
        assert_eq!(ins.controls["acquisition"], "ucb");
        assert_eq!(ins.controls["beta"], 9.0);
        let maps = ins.maps.unwrap();
        assert_eq!(maps.forbidden.iter().filter(|f| **f).count(), 16 * 32 + 10);
        assert!(maps.acquisition[0] == f64::NEG_INFINITY);
        // Bad controls name the field; the agent keeps its settings.
        let e = a.set_control("beta", &serde_json::json!(-1.0)).unwrap_err();
        assert!(e.to_string().contains("beta"), "{e}");
        let e = a.set_control("beta", &serde_json::json!("x")).unwrap_err();
        assert!(e.to_string().contains("beta"), "{e}");
        let e = a.set_control("gamma", &serde_json::json!(1)).unwrap_err();
        assert!(e.to_string().contains("gamma"), "{e}");
        let e = a
            .forbid(&Region {
                rows: [3, 40],
                cols: [0, 0],
            })
            .unwrap_err();
        assert!(e.to_string().contains("off_limits.rows"), "{e}");
        assert_eq!(a.insight().unwrap().controls["beta"], 9.0);
    }

    #[test]
    fn setting_agents_move_within_one_step_and_finish() {
        for id in ["scopegym/StemAutofocus-v2", "scopegym/AfmFeedbackTuning-v2"] {
            let mut env = make(id, None).unwrap();
            for s in [true, false] {
                let mut a = BoAgent::new(BoAgentConfig::default(), s, 1, idw).unwrap();
                let rec = run_episode(env.as_mut(), &mut a, 2).unwrap();
                assert!(rec.steps >= 5, "{id}: {} steps", rec.steps);
                if id.contains("Autofocus") {
                    // It declares done (terminates) before the step limit.
                    assert!(
                        rec.steps < env.max_episode_steps(),
                        "{id}: never declared done"
                    );
                }
            }
        }
    }
}
