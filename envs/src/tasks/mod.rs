//! The microscopy tasks of DESIGN.md §6, one file each, and what they share: starting a new
//! episode on an instrument, and reading a task config from TOML.

pub mod afm_feedback_tuning;
pub mod pfm_domain_writing;
pub mod pfm_spectroscopy_explore;
pub mod spm_atom_manipulation;
pub mod spm_tip_conditioning;
pub mod stem_autofocus;
pub mod stem_dopant_steer;
pub mod stem_eels_explore;
pub mod stem_sparse_scan;

use crate::env::{Info, InfoValue};
use crate::error::{EnvError, Result};
use crate::level::Difficulty;
use scopegym_physics::instrument::SpmMode;
use scopegym_physics::param::{Param, Region};
use scopegym_physics::spm::sim::{SpmConfig, SpmFidelity, SpmSimulator};
use scopegym_physics::spm::surface::SurfaceKind;
use scopegym_physics::stem::StemSimulator;
use scopegym_physics::stem::dopant::DopantSimulator;
use scopegym_physics::stem::lattice::LatticeSimulator;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Starting a new episode on an instrument: the simulators redraw their randomized parameters
/// from the seed and rebuild the sample; a real-instrument driver moves to a fresh area.
pub trait NewEpisode {
    /// Starts an episode from `seed`; records what was randomized in `info` (`param.<key>`).
    fn new_episode(&mut self, seed: u64, info: &mut Info) -> Result<()>;

    /// Draws later episodes' randomized parameters from `region` (the task's split). A real
    /// instrument draws nothing: the default does nothing.
    fn set_region(&mut self, _region: Region) {}

    /// Whether [`NewEpisode::new_episode`] puts a fresh, unexposed specimen under the probe
    /// with the instrument in a known good state (a simulator rebuilds everything: true). A
    /// real instrument keeps its specimen, its history and whatever crashed: false, the
    /// default. A safety guard clears its dose map and re-arms after an abort only when this
    /// is true.
    fn fresh_specimen(&self) -> bool {
        false
    }
}

macro_rules! new_episode_from_template {
    ($($sim:ty),*) => {$(
        impl NewEpisode for $sim {
            fn new_episode(&mut self, seed: u64, info: &mut Info) -> Result<()> {
                self.reset(seed)?;
                for (name, v) in self.randomized() {
                    info.insert(format!("param.{name}").into(), InfoValue::F64(*v));
                }
                Ok(())
            }

            fn set_region(&mut self, region: Region) {
                <$sim>::set_region(self, region);
            }

            fn fresh_specimen(&self) -> bool {
                true
            }
        }
    )*};
}

new_episode_from_template!(SpmSimulator, LatticeSimulator, StemSimulator);

impl NewEpisode for DopantSimulator {
    fn new_episode(&mut self, seed: u64, info: &mut Info) -> Result<()> {
        self.reset(seed)?;
        for (name, v) in self.randomized() {
            info.insert(format!("param.{name}").into(), InfoValue::F64(v));
        }
        Ok(())
    }

    fn set_region(&mut self, region: Region) {
        DopantSimulator::set_region(self, region);
    }

    fn fresh_specimen(&self) -> bool {
        true
    }
}

/// The STM the two STM tasks start from at difficulty `d`: 0.1 V bias over a flat 8 nm sample
/// of 100² cells (crash at 0.5 nm), a 4.8 nm scan of `scan_pixels`² at 10 lines/s, the current
/// feedback (P 0.1, I 1000-2000 at medium, 100 nm/s), and the scanner's white and 1/f noise,
/// line offsets and hysteresis from the level's ranges, drifting in a uniform direction. Each
/// task adds its drift rates, tip and adatoms.
pub(crate) fn stm_instrument_at(d: Difficulty, scan_pixels: usize) -> SpmConfig {
    const NM: f64 = 1e-9;
    const PM: f64 = 1e-12;
    let mut inst = SpmConfig {
        mode: SpmMode::Stm,
        ..SpmConfig::default()
    };
    let p = |e: (f64, f64), m: (f64, f64), h: (f64, f64)| d.pick(e, m, h);
    inst.bias = Param::fixed(0.1);
    inst.sample.size = Param::fixed(8.0 * NM);
    inst.sample.pixels = 100;
    inst.sample.crash_threshold = Param::fixed(0.5 * NM);
    inst.scan.pixels = [scan_pixels, scan_pixels];
    inst.scan.size = Param::fixed(4.8 * NM);
    inst.scan.line_rate = Param::fixed(10.0);
    inst.surface.kind = SurfaceKind::Flat;
    inst.surface.roughness = Param::fixed(0.0);
    let f = &mut inst.feedback;
    f.p_gain = Param::fixed(0.1);
    let (lo, hi) = p((1500.0, 1500.0), (1000.0, 2000.0), (600.0, 2000.0));
    f.i_gain = Param::between(lo, hi);
    f.z_speed_limit = Param::fixed(100.0 * NM);
    let s = &mut inst.scanner;
    s.drift_direction = Param::uniform(0.0, std::f64::consts::TAU);
    let (lo, hi) = p((2.0, 2.0), (1.0, 4.0), (2.0, 6.0));
    s.white_noise = Param::between(lo * PM, hi * PM);
    let (lo, hi) = p((3.0, 3.0), (2.0, 6.0), (3.0, 10.0));
    s.pink_noise = Param::between(lo * PM, hi * PM);
    let (lo, hi) = p((2.0, 2.0), (1.0, 10.0), (5.0, 30.0));
    s.line_offset = Param::between(lo * PM, hi * PM);
    let (lo, hi) = p((0.0, 0.0), (0.0, 0.01), (0.0, 0.02));
    s.hysteresis = Param::between(lo, hi);
    inst
}

/// Checks that every `(field, value)` is finite and ≥ 0; the error names the first that is not.
pub fn check_nonnegative(fields: &[(&str, f64)]) -> Result<()> {
    match fields.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
        Some((f, v)) => Err(EnvError::config(
            *f,
            format!("must be finite and ≥ 0, got {v}"),
        )),
        None => Ok(()),
    }
}

/// Checks that every `(field, value)` is finite and > 0; the error names the first that is not.
pub fn check_positive(fields: &[(&str, f64)]) -> Result<()> {
    match fields.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
        Some((f, v)) => Err(EnvError::config(
            *f,
            format!("must be finite and > 0, got {v}"),
        )),
        None => Ok(()),
    }
}

/// Which models a task's simulator runs (`fidelity = "fast" | "full"` in a task config).
///
/// `"full"` runs the complete simulator ([`StemSimulator`], [`SpmSimulator`]); `"fast"` a light
/// model of the same instrument that reproduces the statistics of what the task observes (the
/// tests of each task compare the two: means, variances and spectra within stated
/// tolerances) at a fraction of the cost. Both give the same spaces, reward and info, so a
/// multi-fidelity agent may train on one and evaluate on the other. A real instrument has one
/// fidelity: the knob configures the simulators only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fidelity {
    /// The light model.
    #[default]
    Fast,
    /// The complete model.
    Full,
}

impl Fidelity {
    /// Both fidelities, fast first.
    pub const ALL: [Fidelity; 2] = [Fidelity::Fast, Fidelity::Full];

    /// `"fast"` or `"full"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Full => "full",
        }
    }
}

impl Fidelity {
    /// The SPM simulator's setting for this fidelity: `"full"` runs [`SpmSimulator`] as
    /// documented, `"fast"` its cheaper stages ([`SpmFidelity::Fast`]).
    pub fn spm(self) -> SpmFidelity {
        match self {
            Self::Fast => SpmFidelity::Fast,
            Self::Full => SpmFidelity::Full,
        }
    }
}

/// The SPM simulator of an SPM task: `instrument` with its `fidelity` set from the task's.
pub(crate) fn spm_simulator(
    instrument: &SpmConfig,
    fidelity: Fidelity,
    seed: u64,
) -> scopegym_physics::Result<SpmSimulator> {
    let mut cfg = instrument.clone();
    cfg.fidelity = fidelity.spm();
    SpmSimulator::new(cfg, seed)
}

/// The simulator of a PFM task, which observes the PFM channels only: [`spm_simulator`], and at
/// `fidelity = "fast"` with `pfm.topography` off (frames without the topography channels, no z
/// feedback run: the PFM channels' model and statistics are unchanged).
pub(crate) fn pfm_simulator(
    instrument: &SpmConfig,
    fidelity: Fidelity,
    seed: u64,
) -> scopegym_physics::Result<SpmSimulator> {
    let mut cfg = instrument.clone();
    cfg.pfm.topography &= fidelity != Fidelity::Fast;
    spm_simulator(&cfg, fidelity, seed)
}

/// A task's config: serde, with defaults per [`Difficulty`] level.
pub trait TaskConfig: Serialize + DeserializeOwned {
    /// The defaults at `difficulty` (its `difficulty` field set to it): the ranges the task's
    /// domain randomization draws from at that level.
    fn at_level(difficulty: Difficulty) -> Self;
}

fn is_distribution(t: &toml::map::Map<String, toml::Value>) -> bool {
    t.len() == 1
        && ["uniform", "normal", "log_uniform"]
            .iter()
            .any(|k| t.contains_key(*k))
}

/// Writes `over` onto `base`: tables merge key by key; anything else (numbers, strings, arrays,
/// distribution tables such as `{ uniform = [lo, hi] }`) replaces what was there.
pub fn merge_toml(base: &mut toml::Value, over: &toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) if !is_distribution(o) => {
            for (k, v) in o {
                let nested = matches!(b.get(k), Some(toml::Value::Table(t)) if !is_distribution(t));
                match b.get_mut(k) {
                    Some(bv) if nested => merge_toml(bv, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn config_error(e: serde_path_to_error::Error<toml::de::Error>) -> EnvError {
    let key = e.path().to_string();
    EnvError::config(
        if key == "." { "config".into() } else { key },
        e.into_inner().to_string(),
    )
}

/// Reads a task config from optional TOML. The `difficulty` key (default `"medium"`) picks the
/// defaults ([`TaskConfig::at_level`]); the keys given are written over them (tables merge key
/// by key, so `instrument.tip.initial_radius = "2 nm"` changes one value). An unknown key or a
/// wrong type is an [`EnvError::InvalidConfig`] naming the key.
pub fn config_from_toml<C: TaskConfig>(config: Option<&toml::Value>) -> Result<C> {
    let difficulty = match config.and_then(|c| c.get("difficulty")) {
        None => Difficulty::default(),
        Some(d) => serde_path_to_error::deserialize(d.clone())
            .map_err(|e| EnvError::config("difficulty", e.into_inner().to_string()))?,
    };
    let defaults = C::at_level(difficulty);
    let Some(over) = config else {
        return Ok(defaults);
    };
    if !over.is_table() {
        return Err(EnvError::config("config", "expected a table of settings"));
    }
    let mut merged = toml::Value::try_from(&defaults)
        .map_err(|e| EnvError::config("config", format!("cannot serialize the defaults: {e}")))?;
    merge_toml(&mut merged, over);
    serde_path_to_error::deserialize(merged).map_err(config_error)
}

/// Helpers the tasks' unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use crate::env::{Env, Info, InfoValue, Step};
    use crate::error::Result;
    use crate::space::Value;

    /// The float `info[key]` (panics when absent or not a float).
    pub fn info_f64(info: &Info, key: &str) -> f64 {
        match info.get(key) {
            Some(InfoValue::F64(v)) => *v,
            other => panic!("info[{key}]: expected a float, got {other:?}"),
        }
    }

    /// Statistics of a set of square images (`n × n`, row-major), for comparing what a task
    /// observes under its two fidelities: the mean of the pixel means, the mean pixel variance
    /// (each image about its own mean), and the mean power (per pixel, mean removed) in three
    /// radial bands of spatial frequency `|k|` (in cycles per image): `[1, n/8)`, `[n/8,
    /// n/4)` and `[n/4, n/2]`, from the image's 2-D discrete Fourier transform.
    pub fn image_statistics(images: &[Vec<f32>], n: usize) -> [f64; 5] {
        use std::f64::consts::TAU;
        let mut acc = [0.0; 5];
        let (c, s): (Vec<f64>, Vec<f64>) = (0..n)
            .map(|k| {
                (
                    (TAU * k as f64 / n as f64).cos(),
                    (TAU * k as f64 / n as f64).sin(),
                )
            })
            .unzip();
        for img in images {
            let m = img.iter().map(|&v| f64::from(v)).sum::<f64>() / (n * n) as f64;
            let x: Vec<f64> = img.iter().map(|&v| f64::from(v) - m).collect();
            acc[0] += m;
            acc[1] += x.iter().map(|v| v * v).sum::<f64>() / (n * n) as f64;
            // Rows first, then columns (twiddles from the tables, index (j·k) mod n).
            let mut rows = vec![(0.0, 0.0); n * n];
            for i in 0..n {
                for k in 0..n {
                    let (mut re, mut im) = (0.0, 0.0);
                    for j in 0..n {
                        let w = (j * k) % n;
                        re += x[i * n + j] * c[w];
                        im -= x[i * n + j] * s[w];
                    }
                    rows[i * n + k] = (re, im);
                }
            }
            for kx in 0..n {
                for ky in 0..n {
                    let (mut re, mut im) = (0.0, 0.0);
                    for i in 0..n {
                        let w = (i * ky) % n;
                        let (a, b) = rows[i * n + kx];
                        re += a * c[w] + b * s[w];
                        im += b * c[w] - a * s[w];
                    }
                    let fx = kx.min(n - kx) as f64;
                    let fy = ky.min(n - ky) as f64;
                    let f = (fx * fx + fy * fy).sqrt();
                    let p = (re * re + im * im) / (n * n * n * n) as f64;
                    let n = n as f64;
                    if f >= 1.0 && f < n / 8.0 {
                        acc[2] += p;
                    } else if f >= n / 8.0 && f < n / 4.0 {
                        acc[3] += p;
                    } else if f >= n / 4.0 {
                        acc[4] += p;
                    }
                }
            }
        }
        acc.map(|v| v / images.len() as f64)
    }

    /// `|a − b| / |b|`, elementwise.
    pub fn relative_differences<const N: usize>(a: &[f64; N], b: &[f64; N]) -> [f64; N] {
        std::array::from_fn(|k| (a[k] - b[k]).abs() / b[k].abs())
    }

    /// Asserts `|fast − full| / |full| < tol` for every statistic `k`, naming `what` and `k`.
    pub fn assert_relatively_close<const N: usize>(
        what: &str,
        fast: &[f64; N],
        full: &[f64; N],
        tol: f64,
    ) {
        for (k, r) in relative_differences(fast, full).into_iter().enumerate() {
            assert!(r < tol, "{what} {k}: {} vs {} ({r})", fast[k], full[k]);
        }
    }

    /// Runs the heuristic for one episode per seed; returns how many ended with
    /// `info["success"] = true`.
    pub fn heuristic_successes(env: &mut impl Env, seeds: std::ops::Range<u64>) -> usize {
        let mut successes = 0;
        for seed in seeds {
            let (mut obs, _) = env.reset(Some(seed)).unwrap();
            loop {
                let a = env.heuristic_action(&obs);
                let s = env.step(&a).unwrap();
                obs = s.obs;
                if s.terminated || s.truncated {
                    successes += usize::from(s.info.get("success") == Some(&InfoValue::Bool(true)));
                    break;
                }
            }
        }
        successes
    }

    /// Runs one episode per seed, of at most `steps` steps, with the action `policy(env, k,
    /// obs)` at step `k`; `see(env, obs, step)` hears every observation: after the reset (with
    /// `None`) and after each step. The loop of the fast/full statistics tests.
    pub fn roll_out<E: Env>(
        env: &mut E,
        seeds: std::ops::Range<u64>,
        steps: usize,
        mut policy: impl FnMut(&mut E, usize, &Value) -> Value,
        mut see: impl FnMut(&E, &Value, Option<&Step>),
    ) {
        for seed in seeds {
            let (mut obs, _) = env.reset(Some(seed)).unwrap();
            see(env, &obs, None);
            for k in 0..steps {
                let a = policy(env, k, &obs);
                let s = env.step(&a).unwrap();
                see(env, &s.obs, Some(&s));
                let done = s.terminated || s.truncated;
                obs = s.obs;
                if done {
                    break;
                }
            }
        }
    }

    /// Asserts that building a task from each TOML snippet fails with an error naming the
    /// field.
    pub fn assert_config_errors_name_fields<T: std::fmt::Debug>(
        make: impl Fn(Option<&toml::Value>) -> Result<T>,
        cases: &[(&str, &str)],
    ) {
        for (text, field) in cases {
            let c: toml::Value = toml::from_str(text).unwrap();
            let e = make(Some(&c)).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
