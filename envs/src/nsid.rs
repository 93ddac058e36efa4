//! Reading recorded microscope data stored as NSID HDF5 (the pycroscopy / sidpy layout).
//!
//! An NSID file holds one or more *main datasets* (an image, a spectral image, ...), each with
//! the attributes `quantity` (what the values are, e.g. `"HeightRetrace"`), `units` and
//! `DIMENSION_LABELS` (one name per axis). Each axis has a *dimension scale*: a 1-D dataset
//! beside the main dataset, named after the axis, with the attributes `dimension_type`
//! (`"SPATIAL"`, `"SPECTRAL"`, `"TEMPORAL"`, ...), `units` and `quantity`, whose values are the
//! axis coordinates. sidpy writes these as siblings in one group, e.g.
//! `Measurement_000/Channel_0/Channel_0/{Channel_0, x, y}` or
//! `Channel_000/generic/{generic, X, Y, Voltage}`.
//!
//! [`read_main_datasets`] finds every main dataset of a file (any dataset carrying `quantity`,
//! `units` and `DIMENSION_LABELS`, at any depth) and reads it with its axes. Errors
//! ([`NsidError`]) name the file, the HDF5 object and what is missing or malformed. The
//! replay driver of `scopegym-drivers` and the real-data mode of
//! `PfmSpectroscopyExplore` both read through here.

use std::fmt;
use std::path::Path;

/// The most values one dataset may hold (2²⁸ values, 2 GiB as `f64`): a larger dataset is
/// refused rather than allocated.
pub const MAX_VALUES: usize = 1 << 28;

/// A failure reading an NSID file: which file, which HDF5 object, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct NsidError {
    /// The file, as given.
    pub file: String,
    /// The HDF5 object (dataset or attribute path), or `""` for the file itself.
    pub object: String,
    /// What is missing or malformed.
    pub reason: String,
}

impl fmt::Display for NsidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.object.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: `{}`: {}", self.file, self.object, self.reason)
        }
    }
}

impl std::error::Error for NsidError {}

/// What an axis spans, from its `dimension_type` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DimensionType {
    /// A position (`"SPATIAL"`, also sidpy's `"RECIPROCAL"` is not this).
    Spatial,
    /// A spectroscopic axis (`"SPECTRAL"`): bias, energy, frequency.
    Spectral,
    /// Time (`"TEMPORAL"`).
    Temporal,
    /// Anything else (`"CHANNEL"`, `"RECIPROCAL"`, `"UNKNOWN"`, ...).
    Other,
}

impl DimensionType {
    fn parse(s: &str) -> Self {
        match s.trim().to_ascii_uppercase().as_str() {
            "SPATIAL" => Self::Spatial,
            "SPECTRAL" => Self::Spectral,
            "TEMPORAL" => Self::Temporal,
            _ => Self::Other,
        }
    }
}

/// One axis of a main dataset: its dimension scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// The axis label (`DIMENSION_LABELS` entry), e.g. `"x"`, `"Voltage"`.
    pub name: String,
    /// HDF5 path of the dimension-scale dataset.
    pub path: String,
    /// What the coordinates are (`quantity`; the name when absent).
    pub quantity: String,
    /// Units of the coordinates (`units`), as written in the file.
    pub units: String,
    /// The `dimension_type` attribute.
    pub dimension_type: DimensionType,
    /// The coordinates, one per index along the axis.
    pub values: Vec<f64>,
}

/// A main dataset with its axes.
#[derive(Debug, Clone, PartialEq)]
pub struct MainDataset {
    /// HDF5 path, e.g. `"Channel_000/generic/generic"`.
    pub path: String,
    /// What the values are (`quantity`), e.g. `"HeightRetrace"`, `"Piezoresponse"`.
    pub quantity: String,
    /// Units of the values (`units`), as written in the file.
    pub units: String,
    /// The shape, one entry per axis.
    pub shape: Vec<usize>,
    /// The axes, in storage order.
    pub axes: Vec<Axis>,
    /// The values, row-major in storage order (the last axis varies fastest).
    pub data: Vec<f64>,
}

impl MainDataset {
    /// Indices of the axes of dimension type `t`, in storage order.
    pub fn axes_of(&self, t: DimensionType) -> Vec<usize> {
        (0..self.axes.len())
            .filter(|&k| self.axes[k].dimension_type == t)
            .collect()
    }
}

fn h5err(file: &str, object: &str, e: hdf5::Error) -> NsidError {
    NsidError {
        file: file.into(),
        object: object.into(),
        reason: e.to_string(),
    }
}

/// A string attribute (variable- or fixed-length, ASCII or UTF-8; a one-element array reads as
/// its element). `Ok(None)` when the attribute is absent.
fn string_attr(loc: &hdf5::Location, name: &str, file: &str) -> Result<Option<String>, NsidError> {
    use hdf5::types::{FixedAscii, FixedUnicode, TypeDescriptor as TD, VarLenAscii, VarLenUnicode};
    if !loc
        .attr_names()
        .map_err(|e| h5err(file, &loc.name(), e))?
        .iter()
        .any(|n| n == name)
    {
        return Ok(None);
    }
    let object = format!("{}@{name}", loc.name());
    let attr = loc.attr(name).map_err(|e| h5err(file, &object, e))?;
    let desc = attr
        .dtype()
        .and_then(|t| t.to_descriptor())
        .map_err(|e| h5err(file, &object, e))?;
    let first = |v: Vec<String>| {
        v.into_iter().next().ok_or_else(|| NsidError {
            file: file.into(),
            object: object.clone(),
            reason: "empty string array".into(),
        })
    };
    let err = |e: hdf5::Error| h5err(file, &object, e);
    let s = match desc {
        TD::VarLenUnicode => first(
            attr.read_raw::<VarLenUnicode>()
                .map_err(err)?
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
        )?,
        TD::VarLenAscii => first(
            attr.read_raw::<VarLenAscii>()
                .map_err(err)?
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
        )?,
        TD::FixedAscii(n) if n <= 1024 => first(
            attr.read_raw::<FixedAscii<1024>>()
                .map_err(err)?
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
        )?,
        TD::FixedUnicode(n) if n <= 1024 => first(
            attr.read_raw::<FixedUnicode<1024>>()
                .map_err(err)?
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
        )?,
        other => {
            return Err(NsidError {
                file: file.into(),
                object,
                reason: format!("expected a string, found {other:?}"),
            });
        }
    };
    Ok(Some(s.trim_end_matches('\0').to_owned()))
}

/// A string-array attribute (`DIMENSION_LABELS`). `Ok(None)` when absent.
fn string_array_attr(
    loc: &hdf5::Location,
    name: &str,
    file: &str,
) -> Result<Option<Vec<String>>, NsidError> {
    use hdf5::types::{FixedAscii, TypeDescriptor as TD, VarLenAscii, VarLenUnicode};
    if !loc
        .attr_names()
        .map_err(|e| h5err(file, &loc.name(), e))?
        .iter()
        .any(|n| n == name)
    {
        return Ok(None);
    }
    let object = format!("{}@{name}", loc.name());
    let err = |e: hdf5::Error| h5err(file, &object, e);
    let attr = loc.attr(name).map_err(err)?;
    let desc = attr.dtype().and_then(|t| t.to_descriptor()).map_err(err)?;
    let v: Vec<String> = match desc {
        TD::VarLenUnicode => attr
            .read_raw::<VarLenUnicode>()
            .map_err(err)?
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect(),
        TD::VarLenAscii => attr
            .read_raw::<VarLenAscii>()
            .map_err(err)?
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect(),
        TD::FixedAscii(n) if n <= 1024 => attr
            .read_raw::<FixedAscii<1024>>()
            .map_err(err)?
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect(),
        other => {
            return Err(NsidError {
                file: file.into(),
                object,
                reason: format!("expected an array of strings, found {other:?}"),
            });
        }
    };
    Ok(Some(v))
}

/// Reads a numeric dataset as `f64`, refusing more than [`MAX_VALUES`] values and non-finite
/// ones.
fn read_values(ds: &hdf5::Dataset, file: &str) -> Result<Vec<f64>, NsidError> {
    let path = ds.name();
    let n = ds.size();
    if n > MAX_VALUES {
        return Err(NsidError {
            file: file.into(),
            object: path,
            reason: format!("{n} values exceed the limit of {MAX_VALUES}"),
        });
    }
    let v: Vec<f64> = ds.read_raw().map_err(|e| h5err(file, &path, e))?;
    if let Some(k) = v.iter().position(|x| !x.is_finite()) {
        return Err(NsidError {
            file: file.into(),
            object: path,
            reason: format!("non-finite value {} at flat index {k}", v[k]),
        });
    }
    Ok(v)
}

/// Reads the main dataset `ds` (which has `DIMENSION_LABELS`) and its dimension scales.
fn read_main(ds: &hdf5::Dataset, file: &str) -> Result<MainDataset, NsidError> {
    let path = ds.name();
    let missing = |object: String, what: &str| NsidError {
        file: file.into(),
        object,
        reason: format!("missing {what}"),
    };
    let quantity = string_attr(ds, "quantity", file)?
        .ok_or_else(|| missing(format!("{path}@quantity"), "attribute `quantity`"))?;
    let units = string_attr(ds, "units", file)?
        .ok_or_else(|| missing(format!("{path}@units"), "attribute `units`"))?;
    let labels = string_array_attr(ds, "DIMENSION_LABELS", file)?.ok_or_else(|| {
        missing(
            format!("{path}@DIMENSION_LABELS"),
            "attribute `DIMENSION_LABELS`",
        )
    })?;
    let shape = ds.shape();
    if labels.len() != shape.len() {
        return Err(NsidError {
            file: file.into(),
            object: format!("{path}@DIMENSION_LABELS"),
            reason: format!(
                "{} labels for a dataset of {} dimensions {shape:?}",
                labels.len(),
                shape.len()
            ),
        });
    }
    // The dimension scales are the main dataset's siblings, named after the labels.
    let parent = match path.rfind('/') {
        Some(0) | None => "/".to_owned(),
        Some(k) => path[..k].to_owned(),
    };
    let file_h = ds.file().map_err(|e| h5err(file, &path, e))?;
    let group = file_h.group(&parent).map_err(|e| h5err(file, &parent, e))?;
    let mut axes = Vec::with_capacity(labels.len());
    for (k, label) in labels.iter().enumerate() {
        let label = label.trim_end_matches('\0').to_owned();
        let spath = format!("{}/{label}", parent.trim_end_matches('/'));
        let sds = group.dataset(&label).map_err(|_| {
            missing(
                spath.clone(),
                &format!("dimension scale of axis {k} (`{label}`) of `{path}`"),
            )
        })?;
        let values = read_values(&sds, file)?;
        if values.len() != shape[k] {
            return Err(NsidError {
                file: file.into(),
                object: spath,
                reason: format!(
                    "{} coordinates for axis {k} of `{path}`, which has {}",
                    values.len(),
                    shape[k]
                ),
            });
        }
        let dimension_type = string_attr(&sds, "dimension_type", file)?.ok_or_else(|| {
            missing(
                format!("{spath}@dimension_type"),
                "attribute `dimension_type`",
            )
        })?;
        let units = string_attr(&sds, "units", file)?
            .ok_or_else(|| missing(format!("{spath}@units"), "attribute `units`"))?;
        let quantity = string_attr(&sds, "quantity", file)?.unwrap_or_else(|| label.clone());
        axes.push(Axis {
            name: label,
            path: spath,
            quantity,
            units,
            dimension_type: DimensionType::parse(&dimension_type),
            values,
        });
    }
    let data = read_values(ds, file)?;
    Ok(MainDataset {
        path,
        quantity,
        units,
        shape,
        axes,
        data,
    })
}

fn collect(
    group: &hdf5::Group,
    file: &str,
    depth: usize,
    out: &mut Vec<MainDataset>,
) -> Result<(), NsidError> {
    if depth > 32 {
        return Err(NsidError {
            file: file.into(),
            object: group.name(),
            reason: "groups nested deeper than 32 levels".into(),
        });
    }
    let mut names = group
        .member_names()
        .map_err(|e| h5err(file, &group.name(), e))?;
    names.sort();
    for name in names {
        if let Ok(ds) = group.dataset(&name) {
            let main = ds
                .attr_names()
                .map_err(|e| h5err(file, &ds.name(), e))?
                .iter()
                .any(|a| a == "DIMENSION_LABELS");
            if main {
                out.push(read_main(&ds, file)?);
            }
        } else if let Ok(g) = group.group(&name) {
            collect(&g, file, depth + 1, out)?;
        }
    }
    Ok(())
}

/// Every main dataset of the NSID file at `path` (datasets with `DIMENSION_LABELS`, at any
/// depth, in lexical order of their paths), each with its dimension scales. An error names the
/// file and the dataset or attribute that is missing or malformed; a file without any main
/// dataset is an error.
pub fn read_main_datasets(path: &Path) -> Result<Vec<MainDataset>, NsidError> {
    let file = path.display().to_string();
    let f = hdf5::File::open(path).map_err(|e| h5err(&file, "", e))?;
    let root = f.group("/").map_err(|e| h5err(&file, "/", e))?;
    let mut out = Vec::new();
    collect(&root, &file, 0, &mut out)?;
    if out.is_empty() {
        return Err(NsidError {
            file,
            object: String::new(),
            reason: "no NSID main dataset (a dataset with `quantity`, `units` and \
                     `DIMENSION_LABELS` attributes)"
                .into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::pfm_spectroscopy_explore::find_shared_data;

    fn data(name: &str) -> Option<std::path::PathBuf> {
        find_shared_data(name, Path::new(env!("CARGO_MANIFEST_DIR")))
    }

    #[test]
    fn reads_the_shared_beps_file() {
        let Some(p) = data("beps_pto_50x50.h5") else {
            return;
        };
        let m = read_main_datasets(&p).unwrap();
        assert_eq!(m.len(), 1);
        let d = &m[0];
        assert_eq!(d.path, "/Channel_000/generic/generic");
        assert_eq!(d.shape, [50, 50, 64]);
        assert_eq!(
            (d.quantity.as_str(), d.units.as_str()),
            ("Piezoresponse", "a.u.")
        );
        let names: Vec<&str> = d.axes.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["X", "Y", "Voltage"]);
        assert_eq!(d.axes_of(DimensionType::Spatial), [0, 1]);
        assert_eq!(d.axes_of(DimensionType::Spectral), [2]);
        assert_eq!(d.axes[2].units, "V");
        assert_eq!(d.axes[2].values[16], 8.5);
        assert_eq!(d.axes[0].values[49], 2e-6);
        assert_eq!(d.data.len(), 50 * 50 * 64);
    }

    #[test]
    fn reads_the_shared_scan_file() {
        let Some(p) = data("pto_funakubo_0001.h5") else {
            return;
        };
        let m = read_main_datasets(&p).unwrap();
        let q: Vec<&str> = m.iter().map(|d| d.quantity.as_str()).collect();
        assert_eq!(
            q,
            [
                "HeightRetrace",
                "AmplitudeRetrace",
                "DeflectionRetrace",
                "PhaseRetrace"
            ]
        );
        for d in &m {
            assert_eq!(d.shape, [256, 256]);
            assert_eq!(d.axes_of(DimensionType::Spatial), [0, 1]);
            assert_eq!(d.axes[0].name, "x");
        }
        // The file's phase channel labels its position axes in degrees (a sidpy export slip).
        assert_eq!(m[3].axes[0].units, "deg");
        assert_eq!(m[0].axes[0].units, "m");
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = read_main_datasets(Path::new("/nonexistent/x.h5")).unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/x.h5: "), "{e}");
    }
}
