//! Minari-compatible datasets of recorded episodes (DESIGN.md §8).
//!
//! # Layout
//!
//! ```text
//! <dir>/data/metadata.json                 Minari's metadata (below)
//! <dir>/data/main_data.hdf5                one HDF5 external link per episode:
//!                                          episode_{i} -> episodes/episode_{i}.hdf5:/
//! <dir>/data/episodes/episode_{i}.hdf5     the episode itself, in its root group
//! ```
//!
//! Readers (h5py, Minari, HDF5 tools) open `main_data.hdf5` and see one group `episode_{i}`
//! per episode: HDF5 resolves a relative external link against the folder of the file holding
//! the link (after `HDF5_EXT_PREFIX`, before the current directory), so the dataset folder
//! can be read from any working directory and moved as a whole. Each episode group has the
//! attributes `id`, `total_steps`, `seed` and the datasets `observations` (T+1, ...),
//! `actions` (T, ...), `rewards` (T,) float64, `terminations` and `truncations` (T,) as HDF5
//! booleans (the enum h5py writes); Dict spaces become subgroups, Discrete values int64,
//! MultiBinary int8.
//!
//! ## `infos`
//!
//! When the episode carries infos ([`Episode::infos`], T+1 of them, the reset info first as
//! Minari stores them), the group `infos` holds one dataset of length T+1 per info key that
//! is present at every step (steps 1..=T) with a numeric or boolean value: `bool` (HDF5
//! boolean), `int64`, `float64` (integers mixed with floats become floats), or a float vector
//! of constant length `n` as a `(T+1, n)` float64 dataset. Text values, vectors whose length
//! changes, and keys containing `/` are left out. Where the reset info lacks the key (or holds
//! a value of another kind) row 0 is filled with `NaN` (floats), `false` (booleans) or `0`
//! (integers).
//!
//! ## `metadata.json`
//!
//! Minari's keys: `dataset_id`, `minari_version` (default [`MINARI_FORMAT_VERSION`], the
//! oldest Minari release whose format this writes; callers that know the installed Minari
//! pass its version), `data_format: "hdf5"`, `jpeg_encoding: false` (images are stored raw),
//! `total_episodes`, `total_steps`, `dataset_size` (MB as Minari computes it: the sizes of
//! every entry under `data/` / 10⁶, rounded to 0.1; updated after each episode),
//! `observation_space` / `action_space` (strings in Minari's serialization,
//! [`minari_space_json`]), `author` (a list; default `["scopegym"]`), and what the caller
//! adds: `description`, `env_spec`,
//! `eval_env_spec`, `requirements`, `algorithm_name`, and the reference scores from
//! [`reference_scores`] (`ref_min_score`, `ref_max_score`, `num_episodes_average_score`)
//! with which `minari.get_normalized_score` normalizes returns. Provenance: `scopegym_version`,
//! `seeds` (the episodes' reset seeds in order as runs `[first, end)`, so consecutive seeds
//! take one entry), and the caller's (env id, config, agent, git commit).
//!
//! # Cost and durability
//!
//! Writing is linear in the dataset's size: an episode is written once, to its own file, and
//! the main file only gains a link, in place (the file grows ~70 bytes per link; HDF5 rewrites
//! the current block of its link index with it, at most 64 KiB, a constant reached after
//! ~2500 episodes); nothing already written is copied ([`Recorder::last_write`] reports what
//! each episode added). Each finished episode is
//! made durable before the next starts: its file is written under a temporary name, synced and
//! renamed into place (so an episode file is complete or absent), then the link is added to
//! `main_data.hdf5` in place and synced, then `metadata.json` is replaced atomically.
//! Killing the process loses at most the episode in progress. While another process reads
//! the dataset (HDF5 locks `main_data.hdf5` against writers), adding a link waits for it (up
//! to 30 s) rather than failing. The only window in which a crash
//! can damage something is the in-place update of `main_data.hdf5` (a few small writes);
//! [`Recorder::repair`] (`scopegym record --repair`, Python
//! `from scopegym.record import repair_dataset`)
//! rebuilds it and the metadata counts from the episode files.
//!
//! The `scopegym record` command and the Python package (`scopegym.record`) both write through
//! this module.

use crate::env::{Env, Info, InfoValue};
use crate::evaluate::{Policy, Score, evaluate};
use crate::space::{Dtype, Space, Value};
use ndarray::{ArrayD, IxDyn};
use serde_json::{Map, Value as Json};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The oldest Minari release whose dataset format this module writes (the default
/// `minari_version`). Minari refuses datasets whose `minari_version` it does not list; every
/// release from 0.4.0 to 0.5.x reads this layout.
pub const MINARI_FORMAT_VERSION: &str = "0.5.0";

/// The main data file (links to the episodes) inside `<dir>/data`.
pub const MAIN_FILE: &str = "main_data.hdf5";
/// The metadata file inside `<dir>/data`.
pub const METADATA_FILE: &str = "metadata.json";
/// The folder of episode files inside `<dir>/data`.
pub const EPISODES_DIR: &str = "episodes";

/// Metadata keys the recorder maintains itself (callers' values for them are ignored).
const OWN_KEYS: [&str; 10] = [
    "dataset_id",
    "data_format",
    "jpeg_encoding",
    "observation_space",
    "action_space",
    "total_episodes",
    "total_steps",
    "dataset_size",
    "seeds",
    "scopegym_version",
];

/// One episode to write.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Episode {
    /// The reset seed.
    pub seed: u64,
    /// T + 1 observations (the reset observation first).
    pub observations: Vec<Value>,
    /// T actions.
    pub actions: Vec<Value>,
    /// T rewards.
    pub rewards: Vec<f64>,
    /// T termination flags.
    pub terminations: Vec<bool>,
    /// T truncation flags.
    pub truncations: Vec<bool>,
    /// T + 1 infos (the reset info first), or none (no `infos` group).
    pub infos: Vec<Info>,
}

/// What one [`Recorder::write_episode`] put on disk, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// The new episode file.
    pub episode_file: u64,
    /// Growth of `main_data.hdf5` (the new link).
    pub main_growth: u64,
    /// The rewritten `metadata.json`.
    pub metadata: u64,
}

impl WriteStats {
    /// Everything written for the episode.
    pub fn total(&self) -> u64 {
        self.episode_file + self.main_growth + self.metadata
    }
}

/// What [`Recorder::repair`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repaired {
    /// Episodes linked from the rebuilt `main_data.hdf5` (`episode_0` .. `episode_{n-1}`).
    pub episodes: usize,
    /// Their steps.
    pub steps: usize,
    /// Unfinished temporary files removed (episodes in progress at the crash).
    pub removed: Vec<PathBuf>,
    /// Files moved to `<dir>/unlinked/` (outside `data/`, so readers ignore them): episode
    /// files that do not read back or follow a missing one, and a main file that did not open.
    pub moved: Vec<PathBuf>,
}

/// Writes episodes into a dataset folder.
#[derive(Debug)]
pub struct Recorder {
    data: PathBuf,
    meta: Map<String, Json>,
    obs_space: Space,
    act_space: Space,
    episodes: usize,
    steps: usize,
    seed_runs: Vec<[u64; 2]>,
    /// Sizes of the episode files written, summed.
    episode_bytes: u64,
    last: WriteStats,
}

/// What can go wrong when writing a dataset.
#[derive(Debug, Error)]
pub enum RecordError {
    /// The folder already holds a dataset.
    #[error("{} already holds a dataset", .0.display())]
    Exists(PathBuf),
    /// An episode's arrays do not fit together.
    #[error("invalid episode: {0}")]
    Episode(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The HDF5 library failed.
    #[error("{}: HDF5: {message}", path.display())]
    Hdf5 {
        /// The file.
        path: PathBuf,
        /// The library's message.
        message: String,
    },
}

fn h5err(path: &Path) -> impl Fn(hdf5::Error) -> RecordError + '_ {
    move |e| RecordError::Hdf5 {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An invalid-data error about `path`.
fn invalid(path: &Path, message: String) -> RecordError {
    RecordError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
    }
}

const PARTIAL: &str = ".partial-";

/// A sibling temporary path for write-then-rename.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}{PARTIAL}{}", std::process::id()))
}

/// Flushes `path`'s data to the disk.
fn sync_file(path: &Path) -> Result<(), RecordError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Makes a rename inside `dir` durable (a no-op where folders cannot be synced).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    {
        let _ = std::fs::File::open(dir).and_then(|f| f.sync_all());
    }
    #[cfg(not(unix))]
    let _ = dir;
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Closes an HDF5 file, reporting a failure to write it out.
fn close(file: hdf5::File, path: &Path) -> Result<(), RecordError> {
    file.close().map_err(h5err(path))
}

fn write_values(g: &hdf5::Group, name: &str, space: &Space, values: &[&Value]) -> hdf5::Result<()> {
    let t = values.len();
    match space {
        Space::Box { shape, dtype, .. } => {
            let mut dims = vec![t];
            dims.extend_from_slice(shape);
            let flat: Vec<f32> = values
                .iter()
                .flat_map(|v| v.as_box().unwrap_or(&[]).iter().copied())
                .collect();
            if flat.len() != dims.iter().product::<usize>() {
                return Err(hdf5::Error::from(format!(
                    "{name}: values do not match the space"
                )));
            }
            match dtype {
                Dtype::F32 => {
                    let a = ArrayD::from_shape_vec(IxDyn(&dims), flat)
                        .map_err(|e| hdf5::Error::from(e.to_string()))?;
                    g.new_dataset_builder().with_data(&a).create(name)?;
                }
                Dtype::U8 => {
                    let bytes: Vec<u8> = flat.iter().map(|&v| v.clamp(0.0, 255.0) as u8).collect();
                    let a = ArrayD::from_shape_vec(IxDyn(&dims), bytes)
                        .map_err(|e| hdf5::Error::from(e.to_string()))?;
                    g.new_dataset_builder().with_data(&a).create(name)?;
                }
            }
        }
        Space::Discrete { .. } => {
            let v: Vec<i64> = values
                .iter()
                .map(|v| v.as_discrete().unwrap_or(0))
                .collect();
            g.new_dataset_builder()
                .with_data(v.as_slice())
                .create(name)?;
        }
        Space::MultiDiscrete { nvec } => {
            let flat: Vec<i64> = values
                .iter()
                .flat_map(|v| match v {
                    Value::MultiDiscrete(x) => x.clone(),
                    _ => vec![0; nvec.len()],
                })
                .collect();
            let a = ndarray::Array2::from_shape_vec((t, nvec.len()), flat)
                .map_err(|e| hdf5::Error::from(e.to_string()))?;
            g.new_dataset_builder().with_data(&a).create(name)?;
        }
        Space::MultiBinary { n } => {
            let flat: Vec<i8> = values
                .iter()
                .flat_map(|v| match v {
                    Value::MultiBinary(x) => x.iter().map(|&b| b as i8).collect(),
                    _ => vec![0; *n],
                })
                .collect();
            let a = ndarray::Array2::from_shape_vec((t, *n), flat)
                .map_err(|e| hdf5::Error::from(e.to_string()))?;
            g.new_dataset_builder().with_data(&a).create(name)?;
        }
        Space::Dict(items) => {
            let sub = g.create_group(name)?;
            for (k, s) in items {
                let vs: Vec<&Value> = values
                    .iter()
                    .map(|v| v.get(k).unwrap_or(&Value::Discrete(0)))
                    .collect();
                write_values(&sub, k, s, &vs)?;
            }
        }
    }
    Ok(())
}

/// The kind of an info column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    I64,
    F64,
    F64s(usize),
}

fn kind(v: &InfoValue) -> Option<Kind> {
    match v {
        InfoValue::Bool(_) => Some(Kind::Bool),
        InfoValue::I64(_) => Some(Kind::I64),
        InfoValue::F64(_) => Some(Kind::F64),
        InfoValue::F64s(x) if !x.is_empty() => Some(Kind::F64s(x.len())),
        _ => None,
    }
}

/// The kind holding values of both kinds, if any.
fn merge(a: Kind, b: Kind) -> Option<Kind> {
    match (a, b) {
        _ if a == b => Some(a),
        (Kind::I64, Kind::F64) | (Kind::F64, Kind::I64) => Some(Kind::F64),
        _ => None,
    }
}

/// The info keys written (see the module docs) with their kinds, in key order.
fn info_columns(infos: &[Info]) -> Vec<(&str, Kind)> {
    let Some((reset, steps)) = infos.split_first() else {
        return Vec::new();
    };
    // An episode without steps has only its reset info to go by.
    let steps = if steps.is_empty() { infos } else { steps };
    let mut cols = Vec::new();
    for (key, v0) in &steps[0] {
        let key: &str = key.as_ref();
        if key.is_empty() || key.contains('/') {
            continue;
        }
        let mut k = kind(v0);
        for info in &steps[1..] {
            k = k.and_then(|k| info.get(key).and_then(kind).and_then(|b| merge(k, b)));
        }
        let Some(mut k) = k else { continue };
        if let Some(r) = reset.get(key).and_then(kind) {
            k = merge(k, r).unwrap_or(k);
        }
        cols.push((key, k));
    }
    cols
}

fn write_infos(g: &hdf5::Group, infos: &[Info]) -> hdf5::Result<()> {
    let cols = info_columns(infos);
    if cols.is_empty() {
        return Ok(());
    }
    let ig = g.create_group("infos")?;
    for (key, k) in cols {
        let at = |i: &Info| i.get(key).cloned();
        match k {
            Kind::Bool => {
                let v: Vec<bool> = infos
                    .iter()
                    .map(|i| matches!(at(i), Some(InfoValue::Bool(true))))
                    .collect();
                ig.new_dataset_builder()
                    .with_data(v.as_slice())
                    .create(key)?;
            }
            Kind::I64 => {
                let v: Vec<i64> = infos
                    .iter()
                    .map(|i| match i.get(key) {
                        Some(InfoValue::I64(x)) => *x,
                        _ => 0,
                    })
                    .collect();
                ig.new_dataset_builder()
                    .with_data(v.as_slice())
                    .create(key)?;
            }
            Kind::F64 => {
                let v: Vec<f64> = infos
                    .iter()
                    .map(|i| match i.get(key) {
                        Some(InfoValue::F64(x)) => *x,
                        Some(InfoValue::I64(x)) => *x as f64,
                        _ => f64::NAN,
                    })
                    .collect();
                ig.new_dataset_builder()
                    .with_data(v.as_slice())
                    .create(key)?;
            }
            Kind::F64s(n) => {
                let flat: Vec<f64> = infos
                    .iter()
                    .flat_map(|i| match i.get(key) {
                        Some(InfoValue::F64s(x)) if x.len() == n => x.clone(),
                        _ => vec![f64::NAN; n],
                    })
                    .collect();
                let a = ndarray::Array2::from_shape_vec((infos.len(), n), flat)
                    .map_err(|e| hdf5::Error::from(e.to_string()))?;
                ig.new_dataset_builder().with_data(&a).create(key)?;
            }
        }
    }
    Ok(())
}

fn set_attr<T: hdf5::H5Type>(loc: &hdf5::Group, name: &str, v: T) -> hdf5::Result<()> {
    loc.new_attr::<T>().create(name)?.write_scalar(&v)
}

fn push_seed(runs: &mut Vec<[u64; 2]>, seed: u64) {
    if let Some(last) = runs.last_mut() {
        if last[1] == seed && seed != u64::MAX {
            last[1] += 1;
            return;
        }
    }
    runs.push([seed, seed.saturating_add(1)]);
}

fn episode_name(i: usize) -> String {
    format!("episode_{i}")
}

/// The episode file's path relative to `data/` (the external link's target).
fn episode_rel(i: usize) -> String {
    format!("{EPISODES_DIR}/episode_{i}.hdf5")
}

/// Writes `text` to `path` through a synced temporary file and a rename.
fn write_atomic(path: &Path, text: &[u8]) -> Result<(), RecordError> {
    let tmp = temp_path(path);
    std::fs::write(&tmp, text).map_err(io(path))?;
    sync_file(&tmp)?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Writes a main file linking episodes `0..n` to `path` through a temporary file.
fn write_main(path: &Path, n: usize) -> Result<(), RecordError> {
    let tmp = temp_path(path);
    let res = (|| -> hdf5::Result<()> {
        let file = hdf5::File::create(&tmp)?;
        for i in 0..n {
            file.link_external(&episode_rel(i), "/", &episode_name(i))?;
        }
        file.close()
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(h5err(path)(e));
    }
    sync_file(&tmp)?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// How long [`open_rw_waiting`] waits for readers to close the main file.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens the main file for writing; while another process reads it (HDF5 locks the file),
/// retries for up to [`LOCK_WAIT`] (readers such as Minari hold it only while they read).
fn open_rw_waiting(path: &Path) -> Result<hdf5::File, RecordError> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        match hdf5::File::open_rw(path) {
            Ok(f) => return Ok(f),
            Err(e) if e.to_string().contains("lock") && start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
            Err(e) => {
                let hint = if e.to_string().contains("lock") {
                    "another process keeps it open; close it to go on recording"
                } else {
                    "if a crash damaged it, Recorder::repair / `scopegym record --repair` rebuilds it"
                };
                return Err(h5err(path)(hdf5::Error::from(format!("{e} ({hint})"))));
            }
        }
    }
}

/// Minari's `dataset_size`: MB (10⁶ bytes) rounded to 0.1.
fn megabytes(bytes: u64) -> f64 {
    (bytes as f64 / 1e5).round() / 10.0
}

/// Serializes `meta` with `dataset_size` computed from `others` (every other entry under
/// `data/`, bytes) plus the metadata file's own length.
fn metadata_text(meta: &mut Map<String, Json>, others: u64) -> String {
    let mut text = String::new();
    // The file's own length enters its content; two rounds settle it (0.1 MB resolution).
    for _ in 0..2 {
        meta.insert(
            "dataset_size".into(),
            megabytes(others + text.len() as u64).into(),
        );
        text = serde_json::to_string_pretty(&Json::Object(meta.clone())).unwrap_or_default();
    }
    text
}

impl Recorder {
    /// Creates `<dir>/data/` with an empty `main_data.hdf5` and the metadata (the folder may
    /// exist but must not hold a dataset already). `provenance` goes into the metadata as is,
    /// and may set `minari_version`, `author` (a string or a list), `description` and any
    /// other key; the keys the recorder maintains (counts, spaces, format, size, seeds) are
    /// its own.
    pub fn create(
        dir: &Path,
        dataset_id: &str,
        obs_space: &Space,
        act_space: &Space,
        provenance: Map<String, Json>,
    ) -> Result<Self, RecordError> {
        let data = dir.join("data");
        let episodes = data.join(EPISODES_DIR);
        let non_empty = |p: &Path| std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some());
        if data.join(MAIN_FILE).exists()
            || data.join(METADATA_FILE).exists()
            || non_empty(&episodes)
        {
            return Err(RecordError::Exists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(&episodes).map_err(io(&episodes))?;
        let mut meta = Map::new();
        meta.insert("dataset_id".into(), dataset_id.into());
        meta.insert("minari_version".into(), MINARI_FORMAT_VERSION.into());
        meta.insert("data_format".into(), "hdf5".into());
        meta.insert("jpeg_encoding".into(), false.into());
        meta.insert(
            "observation_space".into(),
            minari_space_json(obs_space).to_string().into(),
        );
        meta.insert(
            "action_space".into(),
            minari_space_json(act_space).to_string().into(),
        );
        meta.insert("author".into(), Json::Array(vec!["scopegym".into()]));
        meta.insert(
            "scopegym_version".into(),
            env!("CARGO_PKG_VERSION").to_string().into(),
        );
        let mut rec = Self {
            data,
            meta,
            obs_space: obs_space.clone(),
            act_space: act_space.clone(),
            episodes: 0,
            steps: 0,
            seed_runs: Vec::new(),
            episode_bytes: 0,
            last: WriteStats::default(),
        };
        rec.merge_metadata(provenance);
        write_main(&rec.data.join(MAIN_FILE), 0)?;
        rec.write_metadata()?;
        Ok(rec)
    }

    /// Episodes written so far.
    pub fn episodes(&self) -> usize {
        self.episodes
    }

    /// The dataset's `data/` folder.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// What the last [`write_episode`](Self::write_episode) wrote.
    pub fn last_write(&self) -> WriteStats {
        self.last
    }

    /// The metadata as written.
    pub fn metadata(&self) -> &Map<String, Json> {
        &self.meta
    }

    fn merge_metadata(&mut self, extra: Map<String, Json>) {
        for (k, v) in extra {
            if OWN_KEYS.contains(&k.as_str()) {
                continue;
            }
            // Minari reads `author` as a collection (a JSON list).
            let v = match (k.as_str(), v) {
                ("author" | "author_email", Json::String(s)) => Json::Array(vec![s.into()]),
                (_, v) => v,
            };
            self.meta.insert(k, v);
        }
    }

    /// Adds `extra` to the metadata (e.g. [`reference_scores`]) and rewrites it; the keys the
    /// recorder maintains are ignored.
    pub fn update_metadata(&mut self, extra: Map<String, Json>) -> Result<(), RecordError> {
        self.merge_metadata(extra);
        self.write_metadata().map(drop)
    }

    fn write_metadata(&mut self) -> Result<u64, RecordError> {
        self.meta
            .insert("total_episodes".into(), self.episodes.into());
        self.meta.insert("total_steps".into(), self.steps.into());
        self.meta.insert(
            "seeds".into(),
            serde_json::to_value(&self.seed_runs).unwrap_or_default(),
        );
        // Minari's size: every entry under data/ (the episodes folder itself included).
        let others = self.episode_bytes
            + file_len(&self.data.join(MAIN_FILE))
            + file_len(&self.data.join(EPISODES_DIR));
        let text = metadata_text(&mut self.meta, others);
        write_atomic(&self.data.join(METADATA_FILE), text.as_bytes())?;
        Ok(text.len() as u64)
    }

    /// Appends one finished episode and makes it durable (see the module docs).
    pub fn write_episode(&mut self, ep: &Episode) -> Result<(), RecordError> {
        let t = ep.actions.len();
        if ep.observations.len() != t + 1
            || ep.rewards.len() != t
            || ep.terminations.len() != t
            || ep.truncations.len() != t
        {
            return Err(RecordError::Episode(
                "needs T+1 observations and T actions, rewards and flags".into(),
            ));
        }
        if !ep.infos.is_empty() && ep.infos.len() != t + 1 {
            return Err(RecordError::Episode(format!(
                "needs T+1 = {} infos (the reset info first) or none, got {}",
                t + 1,
                ep.infos.len()
            )));
        }
        let i = self.episodes;
        let path = self.data.join(episode_rel(i));
        let tmp = temp_path(&path);
        let res = (|| -> hdf5::Result<()> {
            let file = hdf5::File::create(&tmp)?;
            set_attr(&file, "id", i as i64)?;
            set_attr(&file, "total_steps", t as i64)?;
            set_attr(&file, "seed", ep.seed as i64)?;
            let obs: Vec<&Value> = ep.observations.iter().collect();
            write_values(&file, "observations", &self.obs_space, &obs)?;
            let act: Vec<&Value> = ep.actions.iter().collect();
            write_values(&file, "actions", &self.act_space, &act)?;
            file.new_dataset_builder()
                .with_data(ep.rewards.as_slice())
                .create("rewards")?;
            file.new_dataset_builder()
                .with_data(ep.terminations.as_slice())
                .create("terminations")?;
            file.new_dataset_builder()
                .with_data(ep.truncations.as_slice())
                .create("truncations")?;
            write_infos(&file, &ep.infos)?;
            file.close()
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(h5err(&path)(e));
        }
        sync_file(&tmp)?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.data.join(EPISODES_DIR));
        let episode_file = file_len(&path);

        // The link, added in place.
        let main = self.data.join(MAIN_FILE);
        let before = file_len(&main);
        let file = open_rw_waiting(&main)?;
        file.link_external(&episode_rel(i), "/", &episode_name(i))
            .map_err(h5err(&main))?;
        close(file, &main)?;
        sync_file(&main)?;
        let main_growth = file_len(&main).saturating_sub(before);

        self.episodes += 1;
        self.steps += t;
        self.episode_bytes += episode_file;
        push_seed(&mut self.seed_runs, ep.seed);
        let metadata = self.write_metadata()?;
        self.last = WriteStats {
            episode_file,
            main_growth,
            metadata,
        };
        Ok(())
    }

    /// Rebuilds `<dir>/data/main_data.hdf5` and the counts in `metadata.json` from the episode
    /// files, after a crash: removes unfinished temporary files, links every episode file
    /// `episode_0 ..` that reads back (up to the first missing or unreadable one; later ones
    /// and a main file that does not open are moved to `<dir>/unlinked/`), and rewrites
    /// `total_episodes`, `total_steps`, `seeds` and `dataset_size`. A dataset whose main file
    /// holds episodes itself (not links) is refused, untouched.
    pub fn repair(dir: &Path) -> Result<Repaired, RecordError> {
        let data = dir.join("data");
        let meta_path = data.join(METADATA_FILE);
        let text = std::fs::read_to_string(&meta_path).map_err(io(&meta_path))?;
        let mut meta: Map<String, Json> = serde_json::from_str(&text)
            .map_err(|e| invalid(&meta_path, format!("not a metadata JSON object: {e}")))?;
        let main = data.join(MAIN_FILE);
        let episodes_dir = data.join(EPISODES_DIR);
        let unlinked = dir.join("unlinked");
        let mut out = Repaired::default();
        let move_aside = |p: &Path, out: &mut Repaired| -> Result<(), RecordError> {
            std::fs::create_dir_all(&unlinked).map_err(io(&unlinked))?;
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            let mut to = unlinked.join(name.as_ref());
            let mut k = 1;
            while to.exists() {
                to = unlinked.join(format!("{name}.{k}"));
                k += 1;
            }
            std::fs::rename(p, &to).map_err(io(p))?;
            out.moved.push(to);
            Ok(())
        };
        // The main file must hold only links to episode files.
        let main_ok = match hdf5::File::open(&main) {
            Ok(f) => {
                let mut hard = Vec::new();
                f.iter_visit_default(|name, info| {
                    if info.link_type != hdf5::LinkType::External {
                        hard.push(name.to_string());
                    }
                    Ok(())
                })
                .map_err(h5err(&main))?;
                if let Some(name) = hard.first() {
                    return Err(invalid(
                        &main,
                        format!(
                            "holds {name} itself (not a link to {EPISODES_DIR}/); repair only rebuilds datasets written by this recorder"
                        ),
                    ));
                }
                true
            }
            Err(_) => !main.exists(),
        };
        if !main_ok {
            move_aside(&main, &mut out)?;
        }
        // Temporary files of writes in progress.
        for folder in [&data, &episodes_dir] {
            let Ok(entries) = std::fs::read_dir(folder) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().contains(PARTIAL) {
                    std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
                    out.removed.push(e.path());
                }
            }
        }
        std::fs::create_dir_all(&episodes_dir).map_err(io(&episodes_dir))?;
        // The episode files that read back, in order.
        let mut seed_runs = Vec::new();
        let mut episode_bytes = 0;
        loop {
            let path = data.join(episode_rel(out.episodes));
            let read = (|| -> hdf5::Result<(usize, u64)> {
                let f = hdf5::File::open(&path)?;
                let t = f.attr("total_steps")?.read_scalar::<i64>()?;
                let seed = f.attr("seed")?.read_scalar::<i64>()?;
                let id = f.attr("id")?.read_scalar::<i64>()?;
                let rewards = f.dataset("rewards")?.size();
                let obs = f.dataset("observations").map(|d| d.shape());
                let obs_ok = obs.map_or(true, |s| s.first() == Some(&(t as usize + 1)));
                if t < 0 || id != out.episodes as i64 || rewards != t as usize || !obs_ok {
                    return Err(hdf5::Error::from("inconsistent episode"));
                }
                Ok((t as usize, seed as u64))
            })();
            match read {
                Ok((t, seed)) => {
                    out.episodes += 1;
                    out.steps += t;
                    push_seed(&mut seed_runs, seed);
                    episode_bytes += file_len(&path);
                }
                Err(_) => break,
            }
        }
        // Episode files the rebuilt main file will not link.
        let mut stray: Vec<PathBuf> = std::fs::read_dir(&episodes_dir)
            .map_err(io(&episodes_dir))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                name.strip_prefix("episode_")
                    .and_then(|s| s.strip_suffix(".hdf5"))
                    .and_then(|s| s.parse::<usize>().ok())
                    .is_some_and(|k| k >= out.episodes)
            })
            .collect();
        stray.sort();
        for p in stray {
            move_aside(&p, &mut out)?;
        }
        write_main(&main, out.episodes)?;
        meta.insert("total_episodes".into(), out.episodes.into());
        meta.insert("total_steps".into(), out.steps.into());
        meta.insert(
            "seeds".into(),
            serde_json::to_value(&seed_runs).unwrap_or_default(),
        );
        let others = episode_bytes + file_len(&main) + file_len(&episodes_dir);
        let text = metadata_text(&mut meta, others);
        write_atomic(&meta_path, text.as_bytes())?;
        Ok(out)
    }
}

/// Minari's reference scores for `env`'s task (as configured): `ref_min_score`, the mean
/// return of uniform random actions, and `ref_max_score`, the task heuristic's, each over
/// seeds `0..episodes` ([`evaluate`]); `num_episodes_average_score`; and `reference_scores`
/// with both [`Score`]s (mean return, 95 % interval, success rate, mean length). Empty when
/// `episodes` is 0 or a mean is not finite.
pub fn reference_scores(env: &mut dyn Env, episodes: u64) -> crate::Result<Map<String, Json>> {
    let mut out = Map::new();
    if episodes == 0 {
        return Ok(out);
    }
    let random = evaluate(env, &Policy::Random, 0..episodes)?;
    let heuristic = evaluate(env, &Policy::Heuristic, 0..episodes)?;
    if !(random.mean_return.is_finite() && heuristic.mean_return.is_finite()) {
        return Ok(out);
    }
    let summary = |s: &Score| {
        serde_json::json!({
            "mean_return": s.mean_return,
            "return_ci95": if s.return_ci95.is_finite() { s.return_ci95 } else { 0.0 },
            "success_rate": s.success_rate,
            "mean_length": s.mean_length,
        })
    };
    out.insert("ref_min_score".into(), random.mean_return.into());
    out.insert("ref_max_score".into(), heuristic.mean_return.into());
    out.insert("num_episodes_average_score".into(), episodes.into());
    out.insert(
        "reference_scores".into(),
        serde_json::json!({
            "min_policy": "random",
            "max_policy": "heuristic",
            "seeds": [0, episodes],
            "random": summary(&random),
            "heuristic": summary(&heuristic),
        }),
    );
    Ok(out)
}

/// The space as Minari serializes it (`minari.serialization.serialize_space`, which the
/// metadata's `observation_space` / `action_space` must follow): Gymnasium's JSON form with
/// Box bounds nested to the Box's shape (a flat list does not deserialize for shapes of more
/// than one dimension).
pub fn minari_space_json(space: &Space) -> Json {
    fn nest(flat: &[Json], shape: &[usize]) -> Json {
        if flat.len() != shape.iter().product::<usize>() {
            return Json::Array(flat.to_vec());
        }
        match shape {
            [] => flat.first().cloned().unwrap_or(Json::Null),
            [_] => Json::Array(flat.to_vec()),
            [n, rest @ ..] => {
                let step = rest.iter().product::<usize>();
                Json::Array(
                    (0..*n)
                        .map(|i| nest(&flat[i * step..(i + 1) * step], rest))
                        .collect(),
                )
            }
        }
    }
    let mut j = space.to_json();
    match space {
        Space::Box { shape, .. } => {
            for key in ["low", "high"] {
                if let Some(Json::Array(flat)) = j.get(key).cloned() {
                    j[key] = nest(&flat, shape);
                }
            }
        }
        Space::Dict(items) => {
            for (k, s) in items {
                j["subspaces"][k.as_str()] = minari_space_json(s);
            }
        }
        _ => {}
    }
    j
}

/// `value` as Python's `json.dumps` writes it (separators `", "` and `": "`; object keys in
/// the map's order).
fn py_json_into(v: &Json, out: &mut String) {
    match v {
        Json::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_json_into(x, out);
            }
            out.push(']');
        }
        Json::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(": ");
                py_json_into(x, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The Gymnasium `EnvSpec` of a scopegym task as `EnvSpec.to_json()` writes it (same fields,
/// order and formatting), for Minari's `env_spec` / `eval_env_spec`: entry point
/// `scopegym.env:ScopegymEnv`, vector entry point `scopegym.vector:ScopegymVectorEnv`,
/// `kwargs` in the given order (e.g. `task_id`, `normalize_actions`, `config`), and
/// `max_episode_steps` null: the engine truncates at the configured task's limit itself, and
/// Gymnasium's `TimeLimit` would also flag `truncated` on an episode that terminates at its
/// last step, which the stored flags (the engine's) do not.
pub fn env_spec_json(id: &str, kwargs: &[(&str, Json)]) -> String {
    let mut out = String::from("{");
    let fields: [(&str, Json); 7] = [
        ("id", id.into()),
        ("entry_point", "scopegym.env:ScopegymEnv".into()),
        ("reward_threshold", Json::Null),
        ("nondeterministic", false.into()),
        ("max_episode_steps", Json::Null),
        ("order_enforce", true.into()),
        ("disable_env_checker", false.into()),
    ];
    for (k, v) in &fields {
        out.push_str(&format!("\"{k}\": "));
        py_json_into(v, &mut out);
        out.push_str(", ");
    }
    out.push_str("\"kwargs\": {");
    for (i, (k, v)) in kwargs.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&Json::String((*k).to_string()).to_string());
        out.push_str(": ");
        py_json_into(v, &mut out);
    }
    out.push_str("}, \"additional_wrappers\": [], ");
    out.push_str("\"vector_entry_point\": \"scopegym.vector:ScopegymVectorEnv\"}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    /// A fresh folder under the system's temporary folder, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "scopegym-record-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn spaces() -> (Space, Space) {
        (
            Space::uniform_box(&[4], -1.0, 1.0),
            Space::Discrete { n: 3, start: 0 },
        )
    }

    fn info(pairs: &[(&'static str, InfoValue)]) -> Info {
        pairs
            .iter()
            .map(|(k, v)| (Cow::Borrowed(*k), v.clone()))
            .collect()
    }

    /// A synthetic episode of `t` steps with infos.
    fn episode(seed: u64, t: usize) -> Episode {
        let mut ep = Episode {
            seed,
            observations: vec![Value::Box(vec![0.0; 4])],
            infos: vec![info(&[("text", InfoValue::Str("reset".into()))])],
            ..Default::default()
        };
        for k in 0..t {
            let x = (seed as f32 + k as f32) * 1e-3;
            ep.observations.push(Value::Box(vec![x, -x, 0.5, 0.25]));
            ep.actions.push(Value::Discrete((k % 3) as i64));
            ep.rewards.push(k as f64 * 0.5);
            ep.terminations.push(false);
            ep.truncations.push(k + 1 == t);
            ep.infos.push(info(&[
                ("is_success", InfoValue::Bool(k + 1 == t)),
                ("count", InfoValue::I64(k as i64)),
                ("error", InfoValue::F64(x as f64)),
                ("vec", InfoValue::F64s(vec![1.0, k as f64])),
                // An int at one step and a float at the others: a float column.
                (
                    "mixed",
                    if k == 0 {
                        InfoValue::I64(1)
                    } else {
                        InfoValue::F64(0.5)
                    },
                ),
                // Changes length: left out.
                ("ragged", InfoValue::F64s(vec![0.0; k + 1])),
                ("text", InfoValue::Str("step".into())),
            ]));
        }
        ep
    }

    fn create(dir: &Path) -> Recorder {
        let (o, a) = spaces();
        let mut prov = Map::new();
        prov.insert("author".into(), "tester".into());
        prov.insert("total_episodes".into(), 99.into()); // ignored: the recorder's own
        Recorder::create(dir, "scopegym/Test/random-v1", &o, &a, prov).unwrap()
    }

    fn read_meta(dir: &Path) -> Map<String, Json> {
        serde_json::from_str(&std::fs::read_to_string(dir.join("data/metadata.json")).unwrap())
            .unwrap()
    }

    /// Minari's `get_size`: every entry under data/, MB rounded to 0.1.
    fn minari_size(data: &Path) -> f64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p)
                .unwrap()
                .flatten()
                .map(|e| {
                    let m = e.metadata().unwrap();
                    m.len() + if m.is_dir() { walk(&e.path()) } else { 0 }
                })
                .sum()
        }
        megabytes(walk(data))
    }

    #[test]
    fn record_episodes_are_linked_files_with_infos_and_metadata() {
        let tmp = TempDir::new("layout");
        let dir = tmp.0.join("ds");
        let mut rec = create(&dir);
        for i in 0..3 {
            rec.write_episode(&episode(10 + i, 5 + i as usize)).unwrap();
        }
        let main = hdf5::File::open(dir.join("data/main_data.hdf5")).unwrap();
        let mut kinds = Vec::new();
        main.iter_visit_default(|name, info| {
            kinds.push((name.to_string(), info.link_type));
            Ok(())
        })
        .unwrap();
        kinds.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            kinds,
            (0..3)
                .map(|i| (format!("episode_{i}"), hdf5::LinkType::External))
                .collect::<Vec<_>>()
        );
        for i in 0..3usize {
            // Through the link, as readers see it.
            let g = main.group(&format!("episode_{i}")).unwrap();
            let t = 5 + i;
            assert_eq!(
                g.attr("id").unwrap().read_scalar::<i64>().unwrap(),
                i as i64
            );
            assert_eq!(
                g.attr("total_steps").unwrap().read_scalar::<i64>().unwrap(),
                t as i64
            );
            assert_eq!(
                g.attr("seed").unwrap().read_scalar::<i64>().unwrap(),
                10 + i as i64
            );
            assert_eq!(g.dataset("observations").unwrap().shape(), vec![t + 1, 4]);
            assert_eq!(g.dataset("actions").unwrap().shape(), vec![t]);
            let infos = g.group("infos").unwrap();
            let mut keys = infos.member_names().unwrap();
            keys.sort();
            assert_eq!(keys, ["count", "error", "is_success", "mixed", "vec"]);
            let succ = infos
                .dataset("is_success")
                .unwrap()
                .read_raw::<bool>()
                .unwrap();
            // The reset info lacks the key: false; then the step values.
            let mut want = vec![false; t + 1];
            want[t] = true;
            assert_eq!(succ, want);
            let count = infos.dataset("count").unwrap().read_raw::<i64>().unwrap();
            assert_eq!(count[0], 0);
            assert_eq!(&count[1..], (0..t as i64).collect::<Vec<_>>());
            let err = infos.dataset("error").unwrap().read_raw::<f64>().unwrap();
            assert!(err[0].is_nan() && err.len() == t + 1);
            let mixed = infos.dataset("mixed").unwrap().read_raw::<f64>().unwrap();
            assert_eq!(mixed[1], 1.0);
            assert_eq!(mixed[2], 0.5);
            let v = infos.dataset("vec").unwrap();
            assert_eq!(v.shape(), vec![t + 1, 2]);
            let v = v.read_raw::<f64>().unwrap();
            assert!(v[0].is_nan() && v[1].is_nan());
            assert_eq!(&v[2..6], &[1.0, 0.0, 1.0, 1.0]);
        }
        drop(main);
        let meta = read_meta(&dir);
        assert_eq!(meta["total_episodes"], 3);
        assert_eq!(meta["total_steps"], 5 + 6 + 7);
        assert_eq!(meta["seeds"], serde_json::json!([[10, 13]]));
        assert_eq!(meta["author"], serde_json::json!(["tester"]));
        assert_eq!(meta["minari_version"], MINARI_FORMAT_VERSION);
        assert_eq!(meta["jpeg_encoding"], false);
        assert_eq!(
            meta["dataset_size"].as_f64().unwrap(),
            minari_size(&dir.join("data"))
        );
        // Refused on an existing dataset.
        let (o, a) = spaces();
        assert!(matches!(
            Recorder::create(&dir, "x-v0", &o, &a, Map::new()),
            Err(RecordError::Exists(_))
        ));
        // Infos of the wrong length are refused.
        let mut bad = episode(0, 3);
        bad.infos.pop();
        assert!(matches!(
            rec.write_episode(&bad),
            Err(RecordError::Episode(_))
        ));
    }

    #[test]
    fn record_without_infos_writes_no_infos_group() {
        let tmp = TempDir::new("noinfo");
        let mut rec = create(&tmp.0);
        let mut ep = episode(1, 3);
        ep.infos.clear();
        rec.write_episode(&ep).unwrap();
        let f = hdf5::File::open(tmp.0.join("data/main_data.hdf5")).unwrap();
        assert!(!f.group("episode_0").unwrap().link_exists("infos"));
        drop(f); // HDF5 refuses to open a file for writing that this process has open
        // Non-consecutive seeds: one run each.
        rec.write_episode(&episode(7, 2)).unwrap();
        rec.write_episode(&episode(8, 2)).unwrap();
        assert_eq!(
            read_meta(&tmp.0)["seeds"],
            serde_json::json!([[1, 2], [7, 9]])
        );
    }

    /// Bytes this thread has passed to write calls so far (Linux), from `/proc/thread-self/io`.
    fn thread_wchar() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/thread-self/io").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("wchar:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Writing is linear in the dataset's size: the bytes written for an episode do not grow
    /// with the episodes already written. (The old recorder copied the whole file each time:
    /// its k-th episode cost k episodes' bytes.) The main file's link index is an HDF5
    /// fractal heap whose current block (at most 64 KiB, reached after ~2500 links) is
    /// rewritten with each link, so the per-episode cost rises to that plateau and stays.
    #[test]
    fn record_bytes_written_per_episode_do_not_grow_with_the_dataset() {
        let tmp = TempDir::new("linear");
        let mut rec = create(&tmp.0);
        let n = 5000usize;
        let (mut stats, mut wchar) = (Vec::new(), Vec::new());
        for i in 0..n {
            let before = thread_wchar();
            rec.write_episode(&episode(i as u64, 2)).unwrap();
            if let (Some(a), Some(b)) = (before, thread_wchar()) {
                wchar.push(b - a);
            }
            stats.push(rec.last_write());
        }
        let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64;
        let totals: Vec<u64> = stats.iter().map(WriteStats::total).collect();
        let (mid, late) = (mean(&totals[3500..3700]), mean(&totals[n - 200..]));
        let episode_file = stats[n - 1].episode_file as f64;
        let main_len = file_len(&tmp.0.join("data/main_data.hdf5")) as f64;
        let old = rec.episode_bytes as f64;
        println!(
            "episode file {episode_file} B; file growth per episode at 3500-3700 {mid:.0} B, at {}-{n} {late:.0} B; main file {main_len} B after {n} episodes ({:.0} B per link); the old recorder would copy {old:.0} B for the next episode",
            n - 200,
            main_len / n as f64
        );
        assert!(late <= mid * 1.1 + 256.0, "{mid} -> {late}");
        assert!(main_len / (n as f64) < 512.0, "{main_len}");
        // Measured by the OS where it can (every write call of this thread, HDF5's included).
        if wchar.len() == n {
            let at = |k: usize| mean(&wchar[k..k + 200]);
            let (first, mid, late) = (at(100), at(3500), at(n - 200));
            println!(
                "write calls per episode: {first:.0} B at 100-300, {mid:.0} B at 3500-3700, {late:.0} B at {}-{n}",
                n - 200
            );
            assert!(late <= mid * 1.1 + 1024.0, "{mid} -> {late}");
            // The episode, its metadata, and at most one 64 KiB heap block plus index nodes.
            assert!(late < episode_file + 80.0 * 1024.0, "{late}");
        }
    }

    #[test]
    fn record_repair_rebuilds_a_damaged_main_file_and_links_unlinked_episodes() {
        let tmp = TempDir::new("repair");
        let dir = &tmp.0;
        let mut rec = create(dir);
        for i in 0..4 {
            rec.write_episode(&episode(i, 3)).unwrap();
        }
        drop(rec);
        let data = dir.join("data");
        // A crash between the episode's rename and its link: episode 3 is on disk but not
        // linked or counted.
        let main = data.join(MAIN_FILE);
        let f = hdf5::File::open_rw(&main).unwrap();
        f.unlink("episode_3").unwrap();
        f.close().unwrap();
        let mut meta = read_meta(dir);
        meta.insert("total_episodes".into(), 3.into());
        std::fs::write(
            data.join(METADATA_FILE),
            serde_json::to_string(&meta).unwrap(),
        )
        .unwrap();
        // Then a crash in the middle of the next link: the main file is garbage; and an
        // episode in progress left its temporary file.
        let partial = data.join("episodes/.episode_4.hdf5.partial-1");
        std::fs::write(&partial, b"half an episode").unwrap();
        let bytes = std::fs::read(&main).unwrap();
        std::fs::write(&main, &bytes[..bytes.len() / 3]).unwrap();
        assert!(hdf5::File::open(&main).is_err());
        // An episode after a gap (never happens by crash): moved aside.
        std::fs::copy(
            data.join("episodes/episode_0.hdf5"),
            data.join("episodes/episode_9.hdf5"),
        )
        .unwrap();

        let r = Recorder::repair(dir).unwrap();
        assert_eq!(r.episodes, 4);
        assert_eq!(r.steps, 12);
        assert_eq!(r.removed, vec![partial.clone()]);
        assert_eq!(r.moved.len(), 2, "{:?}", r.moved); // the damaged main file and episode_9
        assert!(!partial.exists() && !data.join("episodes/episode_9.hdf5").exists());
        let f = hdf5::File::open(&main).unwrap();
        for i in 0..4i64 {
            let g = f.group(&format!("episode_{i}")).unwrap();
            assert_eq!(g.attr("seed").unwrap().read_scalar::<i64>().unwrap(), i);
        }
        assert!(!f.link_exists("episode_4"));
        let meta = read_meta(dir);
        assert_eq!(meta["total_episodes"], 4);
        assert_eq!(meta["total_steps"], 12);
        assert_eq!(meta["seeds"], serde_json::json!([[0, 4]]));
        assert_eq!(meta["author"], serde_json::json!(["tester"]));
        assert_eq!(meta["dataset_size"].as_f64().unwrap(), minari_size(&data));
        // Idempotent.
        let again = Recorder::repair(dir).unwrap();
        assert_eq!((again.episodes, again.moved.len()), (4, 0));

        // A main file holding episodes itself is refused, untouched.
        let other = TempDir::new("repair-old");
        let odata = other.0.join("data");
        std::fs::create_dir_all(&odata).unwrap();
        std::fs::write(odata.join(METADATA_FILE), "{}").unwrap();
        let f = hdf5::File::create(odata.join(MAIN_FILE)).unwrap();
        f.create_group("episode_0").unwrap();
        f.close().unwrap();
        let before = std::fs::read(odata.join(MAIN_FILE)).unwrap();
        assert!(Recorder::repair(&other.0).is_err());
        assert_eq!(std::fs::read(odata.join(MAIN_FILE)).unwrap(), before);
    }

    #[test]
    fn record_reference_scores_are_the_random_and_heuristic_means() {
        let cfg: toml::Value = toml::from_str("max_steps = 4").unwrap();
        let id = "scopegym/StemDopantSteer-v1";
        let mut env = crate::registry::make(id, Some(&cfg)).unwrap();
        let m = reference_scores(env.as_mut(), 3).unwrap();
        let random = evaluate(env.as_mut(), &Policy::Random, 0..3).unwrap();
        let heuristic = evaluate(env.as_mut(), &Policy::Heuristic, 0..3).unwrap();
        assert_eq!(m["ref_min_score"].as_f64().unwrap(), random.mean_return);
        assert_eq!(m["ref_max_score"].as_f64().unwrap(), heuristic.mean_return);
        assert_eq!(m["num_episodes_average_score"], 3);
        assert_eq!(
            m["reference_scores"]["heuristic"]["success_rate"]
                .as_f64()
                .unwrap(),
            heuristic.success_rate
        );
        assert!(reference_scores(env.as_mut(), 0).unwrap().is_empty());
        // Into the metadata.
        let tmp = TempDir::new("ref");
        let mut rec = create(&tmp.0);
        rec.update_metadata(m).unwrap();
        let meta = read_meta(&tmp.0);
        assert_eq!(meta["ref_min_score"].as_f64().unwrap(), random.mean_return);
        assert_eq!(meta["total_episodes"], 0);
    }

    #[test]
    fn record_env_spec_is_gymnasium_json() {
        let cfg = serde_json::json!({"difficulty": "hard", "split": "test"});
        let s = env_spec_json(
            "scopegym/X-v1",
            &[
                ("task_id", "scopegym/X-v1".into()),
                ("normalize_actions", false.into()),
                ("config", cfg),
            ],
        );
        assert_eq!(
            s,
            r#"{"id": "scopegym/X-v1", "entry_point": "scopegym.env:ScopegymEnv", "reward_threshold": null, "nondeterministic": false, "max_episode_steps": null, "order_enforce": true, "disable_env_checker": false, "kwargs": {"task_id": "scopegym/X-v1", "normalize_actions": false, "config": {"difficulty": "hard", "split": "test"}}, "additional_wrappers": [], "vector_entry_point": "scopegym.vector:ScopegymVectorEnv"}"#
        );
        let parsed: Json = serde_json::from_str(&s).unwrap();
        assert_eq!(parsed["kwargs"]["normalize_actions"], false);
    }

    #[test]
    fn record_spaces_nest_box_bounds_to_their_shape() {
        let b = Space::uniform_box(&[2, 3], 0.0, 1.0);
        let j = minari_space_json(&b);
        assert_eq!(j["shape"], serde_json::json!([2, 3]));
        assert_eq!(
            j["low"],
            serde_json::json!([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        );
        let d = Space::Dict(vec![
            ("img".into(), b),
            ("v".into(), Space::uniform_box(&[2], -1.0, 1.0)),
        ]);
        let j = minari_space_json(&d);
        assert_eq!(
            j["subspaces"]["img"]["high"][1],
            serde_json::json!([1.0, 1.0, 1.0])
        );
        assert_eq!(j["subspaces"]["v"]["low"], serde_json::json!([-1.0, -1.0]));
    }
}
