//! [`StemSim`]: the bare STEM simulator of a task, for the reference STEM gateway
//! (`drivers/python/stem_gateway.py`). Its methods mirror the gateway protocol
//! (`drivers/STEM_GATEWAY.md`); it only converts types.

use crate::{Failure, build_config, guarded, lock};
use numpy::ndarray::Array2;
use numpy::{PyArray1, PyArray2};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use scopegym_envs::tasks::{NewEpisode, TaskConfig, config_from_toml};
use scopegym_envs::tasks::{
    stem_autofocus, stem_dopant_steer, stem_eels_explore, stem_sparse_scan,
};
use scopegym_envs::{EnvError, Info, InfoValue};
use scopegym_physics::PhysicsError;
use scopegym_physics::instrument::{FrameMeta, ScanSettings, StemInstrument};
use scopegym_physics::stem::StemSimulator;
use scopegym_physics::stem::dopant::DopantSimulator;
use scopegym_physics::stem::optics::Aberrations;
use std::path::PathBuf;
use std::sync::Mutex;

/// A simulated instrument that can start episodes.
trait Instrument: StemInstrument + NewEpisode + Send {}
impl<T: StemInstrument + NewEpisode + Send> Instrument for T {}

/// The instrument the task `id` runs on, configured from `config` exactly as the task builds
/// it (its `Config` at the level, validated; the split's region set).
fn task_instrument(
    id: &str,
    config: Option<&toml::Value>,
) -> Result<Box<dyn Instrument>, EnvError> {
    let inst = |e: PhysicsError| EnvError::config("instrument", e.to_string());
    fn read<C: TaskConfig>(c: Option<&toml::Value>) -> Result<C, EnvError> {
        config_from_toml(c)
    }
    let sim: Box<dyn Instrument> = match id {
        "scopegym/StemAutofocus-v2" => {
            let c: stem_autofocus::Config = read(config)?;
            c.validate()?;
            let mut s = stem_autofocus::simulator(&c, 0).map_err(inst)?;
            NewEpisode::set_region(&mut s, c.split.region());
            Box::new(s)
        }
        "scopegym/StemSparseScan-v2" => {
            let c: stem_sparse_scan::Config = read(config)?;
            c.validate()?;
            let mut s = StemSimulator::new(c.instrument_config(), 0).map_err(inst)?;
            NewEpisode::set_region(&mut s, c.split.region());
            Box::new(s)
        }
        "scopegym/StemEelsExplore-v2" => {
            let c: stem_eels_explore::Config = read(config)?;
            c.validate()?;
            let mut s = stem_eels_explore::simulator(&c, 0).map_err(inst)?;
            NewEpisode::set_region(&mut s, c.split.region());
            Box::new(s)
        }
        "scopegym/StemDopantSteer-v1" => {
            let c: stem_dopant_steer::Config = read(config)?;
            c.validate()?;
            let mut s = DopantSimulator::new(c.instrument.clone(), 0).map_err(inst)?;
            NewEpisode::set_region(&mut s, c.split.region());
            Box::new(s)
        }
        other => {
            return Err(EnvError::UnknownTask {
                id: other.into(),
                known: "scopegym/StemAutofocus-v2, scopegym/StemDopantSteer-v1, \
                        scopegym/StemEelsExplore-v2, scopegym/StemSparseScan-v2"
                    .into(),
            });
        }
    };
    Ok(sim)
}

/// Runs `f` without the GIL; a `PhysicsError` becomes `scopegym.PhysicsError` with a `kind`
/// attribute (`"refused"`, `"invalid_argument"`, `"invalid_parameter"`, `"invalid_quantity"`)
/// that the gateway maps to its error codes.
fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Failure> + Send) -> PyResult<T> {
    match py.detach(|| guarded(f)) {
        Ok(v) => Ok(v),
        Err(Failure::Env(EnvError::Physics(p))) => {
            let kind = match &p {
                PhysicsError::Refused { .. } => "refused",
                PhysicsError::InvalidArgument { .. } => "invalid_argument",
                PhysicsError::InvalidParameter { .. } => "invalid_parameter",
                PhysicsError::InvalidQuantity { .. } => "invalid_quantity",
            };
            let err = Failure::Env(EnvError::Physics(p)).into_py(py);
            err.value(py).setattr("kind", kind)?;
            Err(err)
        }
        Err(e) => Err(e.into_py(py)),
    }
}

fn phys<T>(r: Result<T, PhysicsError>) -> Result<T, Failure> {
    r.map_err(|e| Failure::Env(EnvError::Physics(e)))
}

fn scan_dict<'py>(py: Python<'py>, s: &ScanSettings) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("rows", s.rows)?;
    d.set_item("cols", s.cols)?;
    d.set_item("pixel_size", s.pixel_size)?;
    d.set_item("dwell_time", s.dwell_time)?;
    d.set_item("flyback_time", s.flyback_time)?;
    d.set_item("center", (s.center[0], s.center[1]))?;
    Ok(d)
}

const ABERRATION_KEYS: [&str; Aberrations::COUNT] = Aberrations::NAMES;

fn aberration_dict<'py>(py: Python<'py>, a: &Aberrations) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in ABERRATION_KEYS.iter().zip(a.values()) {
        d.set_item(*k, v)?;
    }
    Ok(d)
}

/// `(energy, counts)` of a spectrum, as NumPy arrays.
type Spectrum<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f32>>);

/// The bare STEM simulator a task runs on, for serving it through the STEM gateway.
#[pyclass(module = "scopegym._native", frozen)]
pub(crate) struct StemSim {
    inst: Mutex<Box<dyn Instrument>>,
}

#[pymethods]
impl StemSim {
    /// The instrument of task `task_id` (a STEM task) with `config_json` (a JSON object)
    /// merged over a scenario file's `[task]`, as the task itself would build it.
    #[new]
    #[pyo3(signature = (task_id, config_json=None, scenario=None))]
    fn new(
        py: Python<'_>,
        task_id: &str,
        config_json: Option<&str>,
        scenario: Option<PathBuf>,
    ) -> PyResult<Self> {
        let inst = run(py, || {
            let cfg = build_config(config_json, scenario.as_deref())?;
            Ok(task_instrument(task_id, cfg.as_ref())?)
        })?;
        Ok(Self {
            inst: Mutex::new(inst),
        })
    }

    /// `(name, simulated)`.
    fn info(&self) -> (String, bool) {
        let i = lock(&self.inst).info();
        (i.name, i.simulated)
    }

    /// Instrument clock, s.
    fn clock(&self) -> f64 {
        lock(&self.inst).clock()
    }

    /// Beam energy, eV.
    fn beam_energy(&self) -> f64 {
        lock(&self.inst).beam_energy()
    }

    /// Beam current, A.
    fn beam_current(&self) -> f64 {
        lock(&self.inst).beam_current()
    }

    /// The scan settings in force (`rows`, `cols`, `pixel_size`, `dwell_time`, `flyback_time`,
    /// `center`).
    fn scan<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        scan_dict(py, &lock(&self.inst).scan_settings())
    }

    /// Requests scan settings; returns what was accepted.
    #[allow(clippy::too_many_arguments)] // one argument per field of the protocol's `Scan`
    fn configure_scan<'py>(
        &self,
        py: Python<'py>,
        rows: usize,
        cols: usize,
        pixel_size: f64,
        dwell_time: f64,
        flyback_time: f64,
        center: (f64, f64),
    ) -> PyResult<Bound<'py, PyDict>> {
        let req = ScanSettings {
            rows,
            cols,
            pixel_size,
            dwell_time,
            flyback_time,
            center: [center.0, center.1],
        };
        let s = run(py, || phys(lock(&self.inst).configure_scan(&req)))?;
        scan_dict(py, &s)
    }

    /// Acquires a frame: `(image float32 (rows, cols), meta)`; meta has `index`, `t_start`,
    /// `duration`, `electrons_per_pixel`, `dose`.
    fn acquire_frame<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyArray2<f32>>, Bound<'py, PyDict>)> {
        let (img, m): (Array2<f32>, FrameMeta) = run(py, || {
            let mut i = lock(&self.inst);
            let f = phys(i.acquire_frame())?;
            Ok((f.image.to_owned(), f.meta))
        })?;
        let d = PyDict::new(py);
        d.set_item("index", m.index)?;
        d.set_item("t_start", m.t_start)?;
        d.set_item("duration", m.duration)?;
        d.set_item("electrons_per_pixel", m.electrons_per_pixel)?;
        d.set_item("dose", m.dose)?;
        Ok((PyArray2::from_owned_array(py, img), d))
    }

    /// Probe position `(x, y)`, m.
    fn probe_position(&self) -> (f64, f64) {
        let p = lock(&self.inst).probe_position();
        (p[0], p[1])
    }

    /// Moves the probe to `(x, y)`, m.
    fn move_probe(&self, py: Python<'_>, x: f64, y: f64) -> PyResult<()> {
        run(py, || phys(lock(&self.inst).move_probe([x, y])))
    }

    /// HAADF counts of a dwell of `dwell_time` s at the probe.
    fn acquire_point(&self, py: Python<'_>, dwell_time: f64) -> PyResult<f64> {
        run(py, || phys(lock(&self.inst).acquire_point(dwell_time)))
    }

    /// An EELS spectrum at the probe: `(energy float64 eV, counts float32)`.
    fn acquire_spectrum<'py>(&self, py: Python<'py>, exposure: f64) -> PyResult<Spectrum<'py>> {
        let (e, c) = run(py, || {
            let mut i = lock(&self.inst);
            let s = phys(i.acquire_spectrum(exposure))?;
            Ok((s.energy.to_vec(), s.counts.to_vec()))
        })?;
        Ok((PyArray1::from_vec(py, e), PyArray1::from_vec(py, c)))
    }

    /// The aberration corrector's setting: all 25 coefficients of `Aberrations::NAMES` (`c10`,
    /// `c12`, `phi12`, … `c50`, then the non-round `c32` … `phi56`; m and rad).
    fn aberrations<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        aberration_dict(py, &lock(&self.inst).aberrations())
    }

    /// Requests aberrations (missing keys are 0, unknown keys an error); returns what was
    /// accepted.
    fn set_aberrations<'py>(
        &self,
        py: Python<'py>,
        values: std::collections::HashMap<String, f64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mut v = [0.0; Aberrations::COUNT];
        for (k, x) in &values {
            let i = ABERRATION_KEYS.iter().position(|n| n == k).ok_or_else(|| {
                Failure::Env(EnvError::Physics(PhysicsError::arg(
                    "aberrations",
                    format!("unknown key `{k}` (expected {ABERRATION_KEYS:?})"),
                )))
                .into_py(py)
            })?;
            v[i] = *x;
        }
        let req = Aberrations::from_values(v);
        let a = run(py, || phys(lock(&self.inst).set_aberrations(&req)))?;
        aberration_dict(py, &a)
    }

    /// Whether the beam is blanked.
    fn blanked(&self) -> bool {
        lock(&self.inst).is_blanked()
    }

    /// Blanks or unblanks the beam.
    fn set_blanked(&self, py: Python<'_>, blanked: bool) -> PyResult<()> {
        run(py, || phys(lock(&self.inst).set_blanked(blanked)))
    }

    /// Blanks the beam. Idempotent.
    fn make_safe(&self, py: Python<'_>) -> PyResult<()> {
        run(py, || phys(lock(&self.inst).make_safe()))
    }

    /// Reseeds: redraws the randomized parameters from `seed` and rebuilds the specimen;
    /// returns the randomized parameters by name.
    fn start_episode<'py>(&self, py: Python<'py>, seed: u64) -> PyResult<Bound<'py, PyDict>> {
        let info = run(py, || {
            let mut info = Info::new();
            lock(&self.inst).new_episode(seed, &mut info)?;
            Ok(info)
        })?;
        let d = PyDict::new(py);
        for (k, v) in &info {
            if let (Some(name), InfoValue::F64(x)) = (k.strip_prefix("param."), v) {
                d.set_item(name, *x)?;
            }
        }
        Ok(d)
    }
}
