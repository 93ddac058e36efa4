//! `scopegym._native`: the Python extension module over the Rust environment engine
//! (`scopegym-envs`). It only converts types; the Gymnasium classes live in the pure-Python
//! package `scopegym`, which flattens actions to `float32` and reshapes observations.
//!
//! - [`NativeEnv`]: one environment; observations and actions cross as flat `float32` arrays in
//!   the space's order (Dict: keys in order).
//! - [`NativeVectorEnv`]: the engine's vector env; each step is one call that releases the GIL
//!   and writes observations, rewards and flags straight into fresh NumPy arrays.
//! - [`NativeRecorder`]: the engine's Minari-compatible dataset writer.
//! - `StemSim` (stem_sim.rs): the bare STEM simulator of a task, for the reference STEM gateway.
//! - [`BayesOpt`]: the agents' ask/tell Bayesian optimizer (`scopegym.bo.minimize`).
//!
//! Engine errors become the exception classes of `scopegym._errors` (rooted at
//! `ScopegymError`); a Rust panic is caught and raised as `NativePanic`, never aborting the
//! interpreter.
#![deny(missing_docs)]
// PyO3's `#[pymodule]`, `#[pyclass]` and `#[pymethods]` expand to `unsafe` FFI glue (the
// workspace denies `unsafe_code`); this crate itself writes no `unsafe` block.
#![allow(unsafe_code)]

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};
use scopegym_agents::AgentError;
use scopegym_agents::acquisition::Acquisition;
use scopegym_agents::bo::{BayesOpt as RustBayesOpt, BoConfig};
use scopegym_agents::gp::Kernel;
use scopegym_envs::record::{Episode, RecordError, Recorder, reference_scores};
use scopegym_envs::registry::{RETIRED, TASKS, make};
use scopegym_envs::tasks::merge_toml;
use scopegym_envs::vector::{AutoReset, Outputs, VectorEnv, flatten_into};
use scopegym_envs::{Env, EnvError, Info, InfoValue, Space, Value};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

mod stem_sim;

/// An error on the Rust side, before it becomes a Python exception.
enum Failure {
    Env(EnvError),
    Agent(AgentError),
    Record(RecordError),
    Driver(scopegym_drivers::DriverError),
    Panic(String),
}

impl From<scopegym_drivers::DriverError> for Failure {
    fn from(e: scopegym_drivers::DriverError) -> Self {
        match e {
            scopegym_drivers::DriverError::Env(e) => Self::Env(*e),
            e => Self::Driver(e),
        }
    }
}

impl From<EnvError> for Failure {
    fn from(e: EnvError) -> Self {
        Self::Env(e)
    }
}

impl From<AgentError> for Failure {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Env(e) => Self::Env(e),
            e => Self::Agent(e),
        }
    }
}

impl From<RecordError> for Failure {
    fn from(e: RecordError) -> Self {
        Self::Record(e)
    }
}

/// The exception class `name` of `scopegym._errors`.
fn exception(py: Python<'_>, name: &str, message: String) -> PyErr {
    let class = py
        .import("scopegym._errors")
        .and_then(|m| m.getattr(name))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match class {
        Ok(c) => PyErr::from_type(c, message),
        Err(e) => e,
    }
}

impl Failure {
    fn into_py(self, py: Python<'_>) -> PyErr {
        let (class, msg) = match self {
            Self::Env(e) => {
                let class = match &e {
                    EnvError::InvalidAction { .. } => "InvalidAction",
                    EnvError::InvalidConfig { .. } => "InvalidConfig",
                    EnvError::UnknownTask { .. } => "UnknownTask",
                    EnvError::RetiredTask { .. } => "RetiredTask",
                    EnvError::NeedsReset(_) => "ResetNeeded",
                    EnvError::InvalidArgument { .. } => "InvalidArgument",
                    EnvError::Physics(_) => "PhysicsError",
                };
                (class, e.to_string())
            }
            Self::Agent(e) => {
                let class = match &e {
                    AgentError::InvalidConfig { .. } => "InvalidConfig",
                    AgentError::InvalidArgument { .. } => "InvalidArgument",
                    AgentError::Io { .. } => "DatasetError",
                    _ => "ScopegymError",
                };
                (class, e.to_string())
            }
            Self::Record(e) => ("DatasetError", e.to_string()),
            Self::Driver(e) => {
                use scopegym_drivers::DriverError as D;
                let class = match &e {
                    D::InvalidUrl { .. } | D::InvalidOptions { .. } => "InvalidArgument",
                    D::InvalidLimits { .. } => "InvalidConfig",
                    _ => "DriverError",
                };
                (class, e.to_string())
            }
            Self::Panic(m) => ("NativePanic", format!("the Rust engine panicked: {m}")),
        };
        exception(py, class, msg)
    }
}

/// Runs `f`, turning a panic into [`Failure::Panic`].
fn guarded<T>(f: impl FnOnce() -> Result<T, Failure>) -> Result<T, Failure> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Failure::Panic(msg))
        }
    }
}

/// Runs `f` without the GIL, catching panics, and converts its error.
fn native<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Failure> + Send) -> PyResult<T> {
    py.detach(|| guarded(f)).map_err(|e| e.into_py(py))
}

/// Locks `m`, recovering from a poisoned lock (a panic already became an exception).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The task config: a scenario file's `[task]` table (or its whole content when it has none),
/// with `config_json` (a JSON object) merged over it.
fn build_config(
    config_json: Option<&str>,
    scenario: Option<&Path>,
) -> Result<Option<toml::Value>, EnvError> {
    let mut table: Option<toml::Table> = None;
    if let Some(path) = scenario {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EnvError::config("scenario", format!("{}: {e}", path.display())))?;
        let mut t: toml::Table = toml::from_str(&text).map_err(|e| {
            EnvError::config(
                "scenario",
                format!("{}: {}", path.display(), e.message().trim()),
            )
        })?;
        table = Some(match t.remove("task") {
            Some(toml::Value::Table(task)) => task,
            Some(_) => {
                return Err(EnvError::config(
                    "task",
                    format!("{}: [task] must be a table", path.display()),
                ));
            }
            None => t,
        });
    }
    if let Some(json) = config_json {
        let over: toml::Table = serde_json::from_str(json).map_err(|e| {
            EnvError::config(
                "config",
                format!("must be a dict of TOML-compatible values (no None): {e}"),
            )
        })?;
        match &mut table {
            Some(t) => {
                let mut base = toml::Value::Table(std::mem::take(t));
                merge_toml(&mut base, &toml::Value::Table(over));
                if let toml::Value::Table(merged) = base {
                    *t = merged;
                }
            }
            None => table = Some(over),
        }
    }
    Ok(table.map(toml::Value::Table))
}

/// A watchdog timeout from Python (`None`: no watchdog).
fn watchdog_duration(s: Option<f64>) -> Result<Option<std::time::Duration>, Failure> {
    match s {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 => Ok(Some(std::time::Duration::from_secs_f64(s))),
        Some(s) => Err(Failure::Env(EnvError::InvalidArgument {
            name: "watchdog".into(),
            reason: format!("must be a positive number of seconds or None, got {s}"),
        })),
    }
}

fn make_env(
    id: &str,
    config: Option<&str>,
    scenario: Option<&Path>,
) -> Result<Box<dyn Env>, Failure> {
    let cfg = build_config(config, scenario)?;
    Ok(make(id, cfg.as_ref())?)
}

fn info_value<'py>(py: Python<'py>, v: &InfoValue) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        InfoValue::F64(x) => x.into_pyobject(py)?.into_any(),
        InfoValue::I64(x) => x.into_pyobject(py)?.into_any(),
        InfoValue::Bool(x) => x.into_pyobject(py)?.to_owned().into_any(),
        InfoValue::Str(x) => x.into_pyobject(py)?.into_any(),
        InfoValue::F64s(x) => PyArray1::from_slice(py, x).into_any(),
    })
}

fn info_dict<'py>(py: Python<'py>, info: &Info) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in info {
        d.set_item(k.as_ref(), info_value(py, v)?)?;
    }
    Ok(d)
}

/// One info key over all envs as a NumPy array (float64, int64 or bool when every present
/// value has that type; object otherwise), absent entries 0 / False / None. Numeric columns
/// are copied into arrays NumPy allocates (`from_slice`), which is cheaper for these short
/// columns than handing over the `Vec` (a container object per array).
fn info_column<'py>(py: Python<'py>, col: &[Option<&InfoValue>]) -> PyResult<Bound<'py, PyAny>> {
    let present = || col.iter().flatten();
    if present().all(|v| matches!(v, InfoValue::F64(_))) {
        let v: Vec<f64> = col
            .iter()
            .map(|v| match v {
                Some(InfoValue::F64(x)) => *x,
                _ => 0.0,
            })
            .collect();
        return Ok(PyArray1::from_slice(py, &v).into_any());
    }
    if present().all(|v| matches!(v, InfoValue::I64(_))) {
        let v: Vec<i64> = col
            .iter()
            .map(|v| match v {
                Some(InfoValue::I64(x)) => *x,
                _ => 0,
            })
            .collect();
        return Ok(PyArray1::from_slice(py, &v).into_any());
    }
    if present().all(|v| matches!(v, InfoValue::Bool(_))) {
        let v: Vec<bool> = col
            .iter()
            .map(|v| matches!(v, Some(InfoValue::Bool(true))))
            .collect();
        return Ok(PyArray1::from_slice(py, &v).into_any());
    }
    let objs = col
        .iter()
        .map(|v| match v {
            Some(v) => info_value(py, v).map(Bound::unbind),
            None => Ok(py.None()),
        })
        .collect::<PyResult<Vec<Py<PyAny>>>>()?;
    Ok(PyArray1::from_vec(py, objs).into_any())
}

/// Infos in Gymnasium's vector form: `{key: array(num_envs), "_key": mask(num_envs)}`.
///
/// One pass over the envs: each entry goes to its key's column, found among the few keys seen
/// so far (literal keys are the same `&'static str` in every env, so the pointer check
/// usually settles it without comparing text).
fn vector_infos<'py>(py: Python<'py>, infos: &[&Info]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let n = infos.len();
    let mut keys: Vec<&str> = Vec::new();
    let mut columns: Vec<Vec<Option<&InfoValue>>> = Vec::new();
    let same = |a: &str, b: &str| std::ptr::eq(a, b) || a == b;
    // Consecutive envs mostly carry the same keys in the same (sorted) order: try the column
    // of the previous env's entry at the same place first.
    let mut prev: Vec<usize> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for (i, info) in infos.iter().enumerate() {
        cur.clear();
        for (j, (k, v)) in info.iter().enumerate() {
            let k: &str = k.as_ref();
            let c = match prev.get(j) {
                Some(&c) if std::ptr::eq(keys[c], k) => c,
                _ => match keys.iter().position(|q| same(q, k)) {
                    Some(c) => c,
                    None => {
                        keys.push(k);
                        columns.push(vec![None; n]);
                        columns.len() - 1
                    }
                },
            };
            columns[c][i] = Some(v);
            cur.push(c);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    // Sorted keys, as the engine's maps give them.
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| keys[a].cmp(keys[b]));
    for c in order {
        let (k, col) = (keys[c], &columns[c]);
        let mask: Vec<bool> = col.iter().map(Option::is_some).collect();
        d.set_item(k, info_column(py, col)?)?;
        d.set_item(format!("_{k}"), PyArray1::from_slice(py, &mask))?;
    }
    Ok(d)
}

/// The space's JSON form with Dict subspaces as `[key, space]` pairs in the space's own order
/// (the order of the flattened values; a JSON object would sort them).
fn ordered_json(space: &Space) -> String {
    fn go(space: &Space) -> serde_json::Value {
        match space {
            Space::Dict(items) => serde_json::json!({
                "type": "Dict",
                "subspaces": items
                    .iter()
                    .map(|(k, s)| serde_json::json!([k, go(s)]))
                    .collect::<Vec<_>>(),
            }),
            other => other.to_json(),
        }
    }
    go(space).to_string()
}

fn flat_obs<'py>(py: Python<'py>, space: &Space, v: &Value) -> Bound<'py, PyArray1<f32>> {
    let mut flat = vec![0.0f32; space.flat_len()];
    flatten_into(v, &mut flat);
    PyArray1::from_vec(py, flat)
}

/// The registered tasks as `(id, instrument, description, max_episode_steps)`, the last of the
/// default config (each task is built once to read it).
#[pyfunction]
fn task_specs(py: Python<'_>) -> PyResult<Vec<(&'static str, &'static str, &'static str, usize)>> {
    native(py, || {
        TASKS
            .iter()
            .map(|t| {
                let env = make(t.id, None)?;
                Ok((t.id, t.instrument, t.description, env.max_episode_steps()))
            })
            .collect::<Result<Vec<_>, Failure>>()
    })
}

/// The retired task ids: `(old id, current id, what changed)`.
#[pyfunction]
fn retired_tasks() -> Vec<(&'static str, &'static str, &'static str)> {
    RETIRED.to_vec()
}

/// Panics inside the engine's guard (tests that a panic becomes `NativePanic`).
#[pyfunction]
fn _panic_for_test(py: Python<'_>) -> PyResult<()> {
    native(py, || -> Result<(), Failure> {
        panic!("deliberate test panic")
    })
}

/// One environment, built from a registered id and an optional config.
#[pyclass(module = "scopegym._native", frozen)]
struct NativeEnv {
    env: Mutex<Box<dyn Env>>,
    id: String,
    obs_space: Space,
    act_space: Space,
    max_steps: usize,
}

#[pymethods]
impl NativeEnv {
    /// Builds `env_id` with `config_json` (a JSON object) merged over a scenario file's `[task]`.
    /// With `driver` (`sim`, `nanonis://HOST:PORT`, `stem-gateway://HOST:PORT`,
    /// `replay:FILE`) the task runs on that instrument behind the safety guard: `limits` (a
    /// limits TOML; required for real instruments), `dry_run`, the audit log `audit_log`
    /// (JSON lines) and a watchdog of `watchdog` s.
    #[new]
    #[pyo3(signature = (env_id, config_json=None, scenario=None, driver=None, limits=None, dry_run=false, audit_log=None, watchdog=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        env_id: &str,
        config_json: Option<&str>,
        scenario: Option<PathBuf>,
        driver: Option<&str>,
        limits: Option<PathBuf>,
        dry_run: bool,
        audit_log: Option<PathBuf>,
        watchdog: Option<f64>,
    ) -> PyResult<Self> {
        let env = native(py, || match driver {
            None => make_env(env_id, config_json, scenario.as_deref()),
            Some(url) => {
                let opts = scopegym_drivers::connect::DeployOptions {
                    config: build_config(config_json, scenario.as_deref())?,
                    dry_run,
                    audit: audit_log,
                    watchdog: watchdog_duration(watchdog)?,
                    ..Default::default()
                };
                let url: scopegym_drivers::connect::DriverUrl = url.parse()?;
                let opts = scopegym_drivers::connect::DeployOptions {
                    limits: scopegym_drivers::connect::limits_for(&url, limits.as_deref())?,
                    ..opts
                };
                let d = scopegym_drivers::connect::make_env(env_id, &url, opts)?;
                Ok(Box::new(d) as Box<dyn Env>)
            }
        })?;
        Ok(Self {
            id: env.id().to_string(),
            obs_space: env.observation_space().clone(),
            act_space: env.action_space().clone(),
            max_steps: env.max_episode_steps(),
            env: Mutex::new(env),
        })
    }

    /// The task id.
    #[getter]
    fn id(&self) -> &str {
        &self.id
    }

    /// The observation space in Gymnasium's JSON form, Dict subspaces as ordered `[key, space]` pairs.
    #[getter]
    fn observation_space_json(&self) -> String {
        ordered_json(&self.obs_space)
    }

    /// The action space in Gymnasium's JSON form, Dict subspaces as ordered `[key, space]` pairs.
    #[getter]
    fn action_space_json(&self) -> String {
        ordered_json(&self.act_space)
    }

    /// Steps after which an episode is truncated.
    #[getter]
    fn max_episode_steps(&self) -> usize {
        self.max_steps
    }

    /// Starts an episode: `(flat observation, info)`.
    #[pyo3(signature = (seed=None))]
    fn reset<'py>(
        &self,
        py: Python<'py>,
        seed: Option<u64>,
    ) -> PyResult<(Bound<'py, PyArray1<f32>>, Bound<'py, PyDict>)> {
        let (obs, info) = native(py, || Ok(lock(&self.env).reset(seed)?))?;
        Ok((flat_obs(py, &self.obs_space, &obs), info_dict(py, &info)?))
    }

    /// One step from a flat float32 action: `(flat obs, reward, terminated, truncated, info)`.
    #[allow(clippy::type_complexity)]
    fn step<'py>(
        &self,
        py: Python<'py>,
        action: PyReadonlyArray1<'py, f32>,
    ) -> PyResult<(
        Bound<'py, PyArray1<f32>>,
        f64,
        bool,
        bool,
        Bound<'py, PyDict>,
    )> {
        let flat = action.as_slice()?;
        let s = native(py, || {
            let a = self.act_space.unflatten(flat, "action")?;
            Ok(lock(&self.env).step(&a)?)
        })?;
        Ok((
            flat_obs(py, &self.obs_space, &s.obs),
            s.reward,
            s.terminated,
            s.truncated,
            info_dict(py, &s.info)?,
        ))
    }

    /// An RGB picture of the current state, `(H, W, 3)` uint8.
    fn render<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let img = native(py, || Ok(lock(&self.env).render()))?;
        Ok(PyArray1::from_vec(py, img.data)
            .reshape([img.height, img.width, 3])?
            .into_any())
    }

    /// The task's expert rule of thumb for a flat observation, as a flat action.
    fn heuristic_action<'py>(
        &self,
        py: Python<'py>,
        obs: PyReadonlyArray1<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let flat = obs.as_slice()?;
        let a = native(py, || {
            let o = self.obs_space.unflatten(flat, "obs")?;
            Ok(lock(&self.env).heuristic_action(&o))
        })?;
        Ok(flat_obs(py, &self.act_space, &a))
    }
}

/// The engine's vector env: `num_envs` copies of one task stepped by one native call.
#[pyclass(module = "scopegym._native", frozen)]
struct NativeVectorEnv {
    venv: Mutex<VectorEnv>,
    /// The affine map `physical = (a + 1)·half + low` from normalized Box actions, per action
    /// element (set by the Python layer when it exposes `[-1, 1]` actions).
    scale: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
    num_envs: usize,
    obs_len: usize,
    action_len: usize,
    mode: AutoReset,
    obs_space: Space,
    act_space: Space,
    max_steps: usize,
}

type StepResult<'py> = (
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<bool>>,
    Bound<'py, PyArray1<bool>>,
    Bound<'py, PyDict>,
);

impl NativeVectorEnv {
    /// Runs `f` on the vector env without the GIL, writing into fresh NumPy arrays.
    fn run<'py>(
        &self,
        py: Python<'py>,
        f: impl FnOnce(&mut VectorEnv, Outputs<'_>) -> Result<(), EnvError> + Send,
    ) -> PyResult<StepResult<'py>> {
        let n = self.num_envs;
        let obs = PyArray2::<f32>::zeros(py, [n, self.obs_len], false);
        let rewards = PyArray1::<f64>::zeros(py, n, false);
        let terminated = PyArray1::<bool>::zeros(py, n, false);
        let truncated = PyArray1::<bool>::zeros(py, n, false);
        {
            let (mut o, mut r, mut te, mut tr) = (
                obs.readwrite(),
                rewards.readwrite(),
                terminated.readwrite(),
                truncated.readwrite(),
            );
            let out = Outputs {
                obs: o.as_slice_mut()?,
                rewards: r.as_slice_mut()?,
                terminated: te.as_slice_mut()?,
                truncated: tr.as_slice_mut()?,
            };
            native(py, || Ok(f(&mut lock(&self.venv), out)?))?;
        }
        let venv = lock(&self.venv);
        let infos = vector_infos(py, &venv.infos())?;
        Ok((obs, rewards, terminated, truncated, infos))
    }
}

#[pymethods]
impl NativeVectorEnv {
    /// `num_envs` envs of `env_id` (same config) with an autoreset mode (`"NextStep"`,
    /// `"SameStep"` or `"Disabled"`), stepped on `threads` threads.
    #[new]
    #[pyo3(signature = (env_id, num_envs, config_json=None, scenario=None, autoreset_mode="NextStep", threads=1))]
    fn new(
        py: Python<'_>,
        env_id: &str,
        num_envs: usize,
        config_json: Option<&str>,
        scenario: Option<PathBuf>,
        autoreset_mode: &str,
        threads: usize,
    ) -> PyResult<Self> {
        let mode = match autoreset_mode {
            "NextStep" => AutoReset::NextStep,
            "SameStep" => AutoReset::SameStep,
            "Disabled" => AutoReset::Disabled,
            other => {
                return Err(Failure::Env(EnvError::arg(
                    "autoreset_mode",
                    format!("expected NextStep, SameStep or Disabled, got {other:?}"),
                ))
                .into_py(py));
            }
        };
        let venv = native(py, || {
            // The scenario file is read and the config merged once for all envs.
            let cfg = build_config(config_json, scenario.as_deref())?;
            let envs = (0..num_envs)
                .map(|_| make(env_id, cfg.as_ref()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(VectorEnv::new(envs, mode, threads)?)
        })?;
        let e = venv.env(0);
        Ok(Self {
            num_envs,
            obs_len: venv.obs_len(),
            action_len: venv.action_len(),
            mode,
            obs_space: e.observation_space().clone(),
            act_space: e.action_space().clone(),
            max_steps: e.max_episode_steps(),
            venv: Mutex::new(venv),
            scale: Mutex::new(None),
        })
    }

    /// Maps the actions given to `step` from `[-1, 1]` to `(a + 1)·half + low` (float32, per
    /// action element) before stepping; `None` takes actions as they are.
    #[pyo3(signature = (low=None, half=None))]
    fn set_action_scale<'py>(
        &self,
        py: Python<'py>,
        low: Option<PyReadonlyArray1<'py, f32>>,
        half: Option<PyReadonlyArray1<'py, f32>>,
    ) -> PyResult<()> {
        let scale = match (low, half) {
            (Some(l), Some(h)) => {
                let (l, h) = (l.as_slice()?.to_vec(), h.as_slice()?.to_vec());
                if l.len() != self.action_len || h.len() != self.action_len {
                    return Err(Failure::Env(EnvError::arg(
                        "scale",
                        format!("expected {} low and half values", self.action_len),
                    ))
                    .into_py(py));
                }
                Some((l, h))
            }
            (None, None) => None,
            _ => {
                return Err(Failure::Env(EnvError::arg(
                    "scale",
                    "give both low and half, or neither",
                ))
                .into_py(py));
            }
        };
        *lock(&self.scale) = scale;
        Ok(())
    }

    /// Number of envs.
    #[getter]
    fn num_envs(&self) -> usize {
        self.num_envs
    }

    /// The autoreset mode's name.
    #[getter]
    fn autoreset_mode(&self) -> &'static str {
        self.mode.name()
    }

    /// Flattened action length per env.
    #[getter]
    fn action_len(&self) -> usize {
        self.action_len
    }

    /// One env's observation space in Gymnasium's JSON form, Dict subspaces as ordered `[key, space]` pairs.
    #[getter]
    fn observation_space_json(&self) -> String {
        ordered_json(&self.obs_space)
    }

    /// One env's action space in Gymnasium's JSON form, Dict subspaces as ordered `[key, space]` pairs.
    #[getter]
    fn action_space_json(&self) -> String {
        ordered_json(&self.act_space)
    }

    /// Steps after which an episode is truncated.
    #[getter]
    fn max_episode_steps(&self) -> usize {
        self.max_steps
    }

    /// Resets the envs (where `mask` is true; all when `None`); env `i` gets `seed + i`.
    /// Returns `(obs, rewards, terminated, truncated, infos)`.
    #[pyo3(signature = (seed=None, mask=None))]
    fn reset<'py>(
        &self,
        py: Python<'py>,
        seed: Option<u64>,
        mask: Option<PyReadonlyArray1<'py, bool>>,
    ) -> PyResult<StepResult<'py>> {
        let mask = mask.as_ref().map(|m| m.as_slice()).transpose()?;
        self.run(py, |v, out| v.reset_into(seed, mask, out))
    }

    /// Steps every env with flat float32 actions `(num_envs, action_len)`.
    fn step<'py>(
        &self,
        py: Python<'py>,
        actions: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<StepResult<'py>> {
        let a = actions.as_slice()?;
        let n = self.action_len.max(1);
        let physical: Option<Vec<f32>> = lock(&self.scale).as_ref().map(|(low, half)| {
            a.iter()
                .enumerate()
                .map(|(k, &x)| (x + 1.0) * half[k % n] + low[k % n])
                .collect()
        });
        let a = physical.as_deref().unwrap_or(a);
        self.run(py, |v, out| v.step_flat_into(a, out))
    }

    /// Env `i`'s picture, `(H, W, 3)` uint8.
    fn render<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyAny>> {
        if i >= self.num_envs {
            return Err(Failure::Env(EnvError::arg("i", "out of range")).into_py(py));
        }
        let img = native(py, || Ok(lock(&self.venv).env(i).render()))?;
        Ok(PyArray1::from_vec(py, img.data)
            .reshape([img.height, img.width, 3])?
            .into_any())
    }
}

/// One Python info value as the engine's: `bool` / `numpy.bool_`, `int` / NumPy integers,
/// `float` / NumPy floats, 0-d NumPy arrays of those, and 1-D numeric NumPy arrays (as
/// float64 vectors); anything else (text, lists, dicts, None, N-d arrays) is `None` (skipped).
fn info_value_from_py(v: &Bound<'_, PyAny>) -> PyResult<Option<InfoValue>> {
    use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
    if let Ok(a) = v.cast::<PyUntypedArray>() {
        let kind = a.dtype().kind();
        if !matches!(kind, b'b' | b'i' | b'u' | b'f') {
            return Ok(None);
        }
        return Ok(match a.ndim() {
            0 => info_value_from_py(&v.call_method0("item")?)?,
            1 => {
                let f = v.call_method1("astype", ("float64",))?;
                let f = f.cast::<PyArray1<f64>>()?.readonly();
                Some(InfoValue::F64s(f.as_slice()?.to_vec()))
            }
            _ => None,
        });
    }
    if let Ok(b) = v.extract::<bool>() {
        return Ok(Some(InfoValue::Bool(b)));
    }
    if v.is_instance_of::<pyo3::types::PyFloat>() {
        return Ok(Some(InfoValue::F64(v.extract::<f64>()?)));
    }
    if let Ok(i) = v.extract::<i64>() {
        return Ok(Some(InfoValue::I64(i)));
    }
    // NumPy floats other than float64 (which subclasses `float`).
    let floating = v.py().import("numpy")?.getattr("floating")?;
    if v.is_instance(&floating)? {
        return Ok(Some(InfoValue::F64(v.extract::<f64>()?)));
    }
    Ok(None)
}

/// A Python info dict as the engine's (string keys; values as [`info_value_from_py`]).
fn info_from_py(d: &Bound<'_, PyAny>) -> PyResult<Info> {
    let d = d.cast::<PyDict>()?;
    let mut info = Info::new();
    for (k, v) in d.iter() {
        let Ok(k) = k.extract::<String>() else {
            continue;
        };
        if let Some(v) = info_value_from_py(&v)? {
            info.insert(k.into(), v);
        }
    }
    Ok(info)
}

/// Writes a Minari-compatible dataset (`<dir>/data/`) of episodes of `env`'s spaces.
#[pyclass(module = "scopegym._native", frozen)]
struct NativeRecorder {
    rec: Mutex<Recorder>,
    obs_space: Space,
    act_space: Space,
}

#[pymethods]
impl NativeRecorder {
    /// Creates the dataset folder; `provenance_json` (a JSON object) goes into the metadata.
    #[new]
    fn new(
        py: Python<'_>,
        dir: PathBuf,
        dataset_id: &str,
        env: &NativeEnv,
        provenance_json: &str,
    ) -> PyResult<Self> {
        let rec = native(py, || {
            let prov: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(provenance_json)
                    .map_err(|e| EnvError::arg("provenance", e.to_string()))?;
            Ok(Recorder::create(
                &dir,
                dataset_id,
                &env.obs_space,
                &env.act_space,
                prov,
            )?)
        })?;
        Ok(Self {
            rec: Mutex::new(rec),
            obs_space: env.obs_space.clone(),
            act_space: env.act_space.clone(),
        })
    }

    /// Episodes written so far.
    #[getter]
    fn episodes(&self) -> usize {
        lock(&self.rec).episodes()
    }

    /// The metadata as written, a JSON object.
    #[getter]
    fn metadata_json(&self) -> String {
        serde_json::Value::Object(lock(&self.rec).metadata().clone()).to_string()
    }

    /// Runs the random and heuristic policies on `env` over seeds `0..episodes` and stores
    /// their mean returns as Minari's `ref_min_score` / `ref_max_score` (0: nothing).
    fn set_reference_scores(&self, py: Python<'_>, env: &NativeEnv, episodes: u64) -> PyResult<()> {
        native(py, || {
            let scores = reference_scores(lock(&env.env).as_mut(), episodes)?;
            Ok(lock(&self.rec).update_metadata(scores)?)
        })
    }

    /// Appends one episode (flat observations `(T+1, obs_len)`, flat actions `(T,
    /// action_len)`, `T` rewards and flags, and optionally the `T+1` info dicts, the reset
    /// info first) and makes it durable. Info values that are numbers, booleans or 1-D numeric
    /// arrays are kept (the `infos` group); others are skipped.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (seed, observations, actions, rewards, terminations, truncations, infos=None))]
    fn write_episode<'py>(
        &self,
        py: Python<'py>,
        seed: u64,
        observations: PyReadonlyArray2<'py, f32>,
        actions: PyReadonlyArray2<'py, f32>,
        rewards: PyReadonlyArray1<'py, f64>,
        terminations: PyReadonlyArray1<'py, bool>,
        truncations: PyReadonlyArray1<'py, bool>,
        infos: Option<Vec<Bound<'py, PyAny>>>,
    ) -> PyResult<()> {
        let (o, a) = (observations.as_slice()?, actions.as_slice()?);
        let (r, te, tr) = (
            rewards.as_slice()?,
            terminations.as_slice()?,
            truncations.as_slice()?,
        );
        let infos = infos
            .unwrap_or_default()
            .iter()
            .map(info_from_py)
            .collect::<PyResult<Vec<Info>>>()?;
        let (ol, al) = (self.obs_space.flat_len(), self.act_space.flat_len());
        native(py, || {
            let rows = |flat: &[f32], len: usize, space: &Space, name: &str| {
                flat.chunks(len.max(1))
                    .enumerate()
                    .map(|(i, c)| space.unflatten(c, &format!("{name}[{i}]")))
                    .collect::<Result<Vec<_>, _>>()
            };
            let ep = Episode {
                seed,
                observations: rows(o, ol, &self.obs_space, "observations")?,
                actions: rows(a, al, &self.act_space, "actions")?,
                rewards: r.to_vec(),
                terminations: te.to_vec(),
                truncations: tr.to_vec(),
                infos,
            };
            Ok(lock(&self.rec).write_episode(&ep)?)
        })
    }

    /// Rebuilds the main file and metadata counts of the dataset at `dir` from its episode
    /// files after a crash; returns what it did as a JSON object (`episodes`, `steps`,
    /// `removed`, `moved`).
    #[staticmethod]
    fn repair(py: Python<'_>, dir: PathBuf) -> PyResult<String> {
        native(py, || {
            let r = Recorder::repair(&dir)?;
            let paths = |v: &[PathBuf]| {
                v.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
            };
            Ok(serde_json::json!({
                "episodes": r.episodes,
                "steps": r.steps,
                "removed": paths(&r.removed),
                "moved": paths(&r.moved),
            })
            .to_string())
        })
    }
}

/// The ask/tell Bayesian optimizer of `scopegym-agents` (maximization; `scopegym.bo.minimize`
/// negates): an exact GP with hyperparameters refitted by maximum marginal likelihood, a Latin
/// hypercube of `n_initial` points first, then the acquisition's maximizer.
#[pyclass(module = "scopegym._native", frozen)]
struct BayesOpt {
    bo: Mutex<RustBayesOpt>,
}

#[pymethods]
impl BayesOpt {
    /// `bounds`: one `(low, high)` per dimension; `acquisition`: `ei`, `logei`, `ucb`, `pi`,
    /// `maxuncertainty` or `thompson`; `kernel`: `matern52` or `rbf`; `xi`: the improvement
    /// margin of EI, LogEI and PI (output units); `beta`: UCB's β.
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        bounds: Vec<(f64, f64)>,
        n_initial: usize,
        acquisition: &str,
        seed: u64,
        kernel: &str,
        xi: f64,
        beta: f64,
    ) -> PyResult<Self> {
        let bo = native(py, || {
            let mut acquisition = Acquisition::parse(acquisition).ok_or_else(|| {
                AgentError::arg(
                    "acquisition",
                    format!(
                        "unknown {acquisition:?}; known: ei, logei, ucb, pi, maxuncertainty, \
                         thompson"
                    ),
                )
            })?;
            if let Acquisition::Ucb { beta: b } = &mut acquisition {
                *b = beta;
            }
            let kernel = match kernel.to_ascii_lowercase().as_str() {
                "matern52" | "matern" => Kernel::Matern52,
                "rbf" => Kernel::Rbf,
                k => {
                    return Err(AgentError::arg(
                        "kernel",
                        format!("unknown {k:?}; known: matern52, rbf"),
                    )
                    .into());
                }
            };
            let config = BoConfig {
                kernel,
                acquisition,
                n_initial,
                xi,
                seed,
                ..BoConfig::default()
            };
            Ok(RustBayesOpt::new(&bounds, config)?)
        })?;
        Ok(Self { bo: Mutex::new(bo) })
    }

    /// The next point to evaluate.
    fn ask(&self, py: Python<'_>) -> PyResult<Vec<f64>> {
        native(py, || {
            let mut pts = lock(&self.bo).ask()?;
            pts.pop()
                .ok_or_else(|| AgentError::numerical("ask", "no point suggested").into())
        })
    }

    /// Records `y = f(x)` (to be maximized).
    fn tell(&self, py: Python<'_>, x: Vec<f64>, y: f64) -> PyResult<()> {
        native(py, || Ok(lock(&self.bo).tell(x, y)?))
    }

    /// Observations so far.
    #[getter]
    fn n_observations(&self) -> usize {
        lock(&self.bo).observations().1.len()
    }
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(task_specs, m)?)?;
    m.add_function(wrap_pyfunction!(retired_tasks, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_test, m)?)?;
    m.add_class::<NativeEnv>()?;
    m.add_class::<NativeVectorEnv>()?;
    m.add_class::<NativeRecorder>()?;
    m.add_class::<BayesOpt>()?;
    m.add_class::<stem_sim::StemSim>()?;
    Ok(())
}
