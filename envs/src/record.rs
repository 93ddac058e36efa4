//! Minari-compatible datasets of recorded episodes (DESIGN.md §8).
//!
//! Layout: `<dir>/data/main_data.hdf5` with one group `episode_{i}` per episode (attributes
//! `id`, `total_steps`, `seed`) holding `observations` (T+1, ...), `actions` (T, ...),
//! `rewards` (T,), `terminations` and `truncations` (T,) as HDF5 booleans (the enum h5py
//! writes); Dict spaces become subgroups, Discrete values int64. `<dir>/data/metadata.json`
//! holds `dataset_id`, `minari_version`, `data_format`, `total_episodes`, `total_steps`, the
//! spaces as JSON strings, and provenance (scopegym version, git commit, env id and config,
//! seeds).
//!
//! The `scopegym record` command and the Python package (`scopegym.record`) both write through
//! this module.
//!
//! Every finished episode is made durable before the next starts: the data file is copied,
//! the episode appended to the copy, and the copy renamed over the original (then the metadata
//! likewise), so killing the process loses at most the episode in progress and never leaves a
//! half-written file.

use crate::space::{Dtype, Space, Value};
use ndarray::{ArrayD, IxDyn};
use std::path::{Path, PathBuf};
use thiserror::Error;

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
}

/// Writes episodes into a dataset folder.
#[derive(Debug)]
pub struct Recorder {
    data: PathBuf,
    meta: serde_json::Map<String, serde_json::Value>,
    obs_space: Space,
    act_space: Space,
    episodes: usize,
    steps: usize,
    seeds: Vec<u64>,
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

/// A sibling temporary path for write-then-rename.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
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

fn set_attr<T: hdf5::H5Type>(loc: &hdf5::Group, name: &str, v: T) -> hdf5::Result<()> {
    loc.new_attr::<T>().create(name)?.write_scalar(&v)
}

impl Recorder {
    /// Creates `<dir>/data/` (the folder may exist but must not hold a dataset already).
    /// `provenance` goes into the metadata as is (and may override the defaults).
    pub fn create(
        dir: &Path,
        dataset_id: &str,
        obs_space: &Space,
        act_space: &Space,
        provenance: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, RecordError> {
        let data = dir.join("data");
        if data.join("main_data.hdf5").exists() || data.join("metadata.json").exists() {
            return Err(RecordError::Exists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(&data).map_err(io(&data))?;
        let mut meta = serde_json::Map::new();
        meta.insert("dataset_id".into(), dataset_id.into());
        // Minari checks this against the exact versions whose format it reads.
        meta.insert("minari_version".into(), "0.5.0".into());
        meta.insert("data_format".into(), "hdf5".into());
        meta.insert(
            "observation_space".into(),
            obs_space.to_json().to_string().into(),
        );
        meta.insert(
            "action_space".into(),
            act_space.to_json().to_string().into(),
        );
        meta.insert(
            "scopegym_version".into(),
            env!("CARGO_PKG_VERSION").to_string().into(),
        );
        for (k, v) in provenance {
            meta.insert(k, v);
        }
        let mut r = Self {
            data,
            meta,
            obs_space: obs_space.clone(),
            act_space: act_space.clone(),
            episodes: 0,
            steps: 0,
            seeds: Vec::new(),
        };
        r.write_metadata()?;
        Ok(r)
    }

    /// Episodes written so far.
    pub fn episodes(&self) -> usize {
        self.episodes
    }

    fn write_metadata(&mut self) -> Result<(), RecordError> {
        self.meta
            .insert("total_episodes".into(), self.episodes.into());
        self.meta.insert("total_steps".into(), self.steps.into());
        self.meta.insert("seeds".into(), self.seeds.clone().into());
        let path = self.data.join("metadata.json");
        let tmp = temp_path(&path);
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(self.meta.clone()))
            .unwrap_or_default();
        std::fs::write(&tmp, text).map_err(io(&path))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// Appends one finished episode and makes it durable.
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
        let path = self.data.join("main_data.hdf5");
        let tmp = temp_path(&path);
        if path.exists() {
            std::fs::copy(&path, &tmp).map_err(io(&path))?;
        }
        let res = (|| -> hdf5::Result<()> {
            let file = if path.exists() {
                hdf5::File::open_rw(&tmp)?
            } else {
                hdf5::File::create(&tmp)?
            };
            let g = file.create_group(&format!("episode_{}", self.episodes))?;
            set_attr(&g, "id", self.episodes as i64)?;
            set_attr(&g, "total_steps", t as i64)?;
            set_attr(&g, "seed", ep.seed as i64)?;
            let obs: Vec<&Value> = ep.observations.iter().collect();
            write_values(&g, "observations", &self.obs_space, &obs)?;
            let act: Vec<&Value> = ep.actions.iter().collect();
            write_values(&g, "actions", &self.act_space, &act)?;
            g.new_dataset_builder()
                .with_data(ep.rewards.as_slice())
                .create("rewards")?;
            g.new_dataset_builder()
                .with_data(ep.terminations.as_slice())
                .create("terminations")?;
            g.new_dataset_builder()
                .with_data(ep.truncations.as_slice())
                .create("truncations")?;
            file.flush()?;
            Ok(())
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(h5err(&path)(e));
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        self.episodes += 1;
        self.steps += t;
        self.seeds.push(ep.seed);
        self.write_metadata()
    }
}
