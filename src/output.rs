//! Writers for what the CLI produces: 8-bit PNG images and HDF5 files with provenance.
//!
//! Files are written to a temporary name beside the target and renamed when complete, so a
//! failed run never leaves a partial file under the requested name.

use crate::error::CliError;
use hdf5::types::VarLenUnicode;
use ndarray::{Array2, Array3, ArrayView2};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Scales a stack of frames to 8 bits between the 0.1 and 99.9 percentiles and tiles them
/// horizontally with a 2-pixel gap.
pub fn montage_u8(frames: &[ArrayView2<'_, f32>]) -> image::GrayImage {
    let (h, w) = frames.first().map_or((1, 1), |f| f.dim());
    let mut vals: Vec<f32> = frames
        .iter()
        .flat_map(|f| f.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = if vals.is_empty() {
        (0.0, 1.0)
    } else {
        vals.sort_by(f32::total_cmp);
        let q = |p: f64| vals[((vals.len() - 1) as f64 * p).round() as usize];
        (q(0.001), q(0.999))
    };
    let span = if hi > lo { hi - lo } else { 1.0 };
    let gap = 2;
    let width = frames.len().max(1) * (w + gap) - gap;
    let mut img = image::GrayImage::new(width as u32, h as u32);
    for (k, f) in frames.iter().enumerate() {
        for ((i, j), &v) in f.indexed_iter() {
            let t = ((v - lo) / span).clamp(0.0, 1.0);
            img.put_pixel(
                (k * (w + gap) + j) as u32,
                i as u32,
                image::Luma([(t * 255.0).round() as u8]),
            );
        }
    }
    img
}

/// A temporary path beside `path` (same directory, so the final rename is atomic).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Checks that the directory of `path` exists, before any work is done.
pub fn check_writable(path: &Path, argument: &str) -> Result<(), CliError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(CliError::Argument {
            argument: argument.into(),
            message: format!("directory {} does not exist", dir.display()),
        });
    }
    Ok(())
}

/// Writes an 8-bit PNG atomically.
pub fn write_png(path: &Path, img: &image::GrayImage) -> Result<(), CliError> {
    save_png(path, img)
}

/// Writes an RGB PNG atomically.
pub fn write_rgb_png(path: &Path, img: &image::RgbImage) -> Result<(), CliError> {
    save_png(path, img)
}

fn save_png<P, C>(path: &Path, img: &image::ImageBuffer<P, C>) -> Result<(), CliError>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let tmp = temp_path(path);
    let res = img
        .save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| CliError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        });
    finish(res, &tmp, path)
}

fn finish(res: Result<(), CliError>, tmp: &Path, path: &Path) -> Result<(), CliError> {
    match res {
        Ok(()) => std::fs::rename(tmp, path).map_err(|source| CliError::Io {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(tmp);
            Err(e)
        }
    }
}

/// A value for an HDF5 attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// A 64-bit float.
    F64(f64),
    /// An unsigned 64-bit integer.
    U64(u64),
    /// A signed 64-bit integer.
    I64(i64),
    /// A UTF-8 string.
    Str(String),
}

/// A dataset to write: name (with `/` for groups), data, and string attributes.
#[derive(Debug)]
pub enum Data {
    /// A 3-D float32 stack.
    F32x3(Array3<f32>),
    /// A 2-D float32 array.
    F32x2(Array2<f32>),
    /// A 2-D float64 array.
    F64x2(Array2<f64>),
    /// A 1-D float64 array.
    F64x1(Vec<f64>),
    /// A 1-D int32 array.
    I32x1(Vec<i32>),
}

/// One dataset with its attributes.
#[derive(Debug)]
pub struct Dataset {
    /// Path inside the file, e.g. `atoms/positions`.
    pub name: String,
    /// The values.
    pub data: Data,
    /// String attributes such as `units` and `quantity`.
    pub attrs: Vec<(String, String)>,
}

fn h5err(path: &Path) -> impl Fn(hdf5::Error) -> CliError + '_ {
    move |e| CliError::Hdf5 {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn write_attr(loc: &hdf5::Location, name: &str, v: &AttrValue) -> hdf5::Result<()> {
    match v {
        AttrValue::F64(x) => loc
            .new_attr::<f64>()
            .shape(())
            .create(name)?
            .write_scalar(x),
        AttrValue::U64(x) => loc
            .new_attr::<u64>()
            .shape(())
            .create(name)?
            .write_scalar(x),
        AttrValue::I64(x) => loc
            .new_attr::<i64>()
            .shape(())
            .create(name)?
            .write_scalar(x),
        AttrValue::Str(s) => {
            let s = VarLenUnicode::from_str(s)
                .map_err(|e| hdf5::Error::from(e.to_string().as_str()))?;
            loc.new_attr::<VarLenUnicode>()
                .shape(())
                .create(name)?
                .write_scalar(&s)
        }
    }
}

/// Writes datasets and root attributes to an HDF5 file atomically.
pub fn write_hdf5(
    path: &Path,
    datasets: &[Dataset],
    root_attrs: &[(String, AttrValue)],
) -> Result<(), CliError> {
    let tmp = temp_path(path);
    let res = (|| -> hdf5::Result<()> {
        let file = hdf5::File::create(&tmp)?;
        for (k, v) in root_attrs {
            write_attr(&file, k, v)?;
        }
        for d in datasets {
            let (group, leaf) = match d.name.rsplit_once('/') {
                Some((g, l)) => (Some(g), l),
                None => (None, d.name.as_str()),
            };
            let g = match group {
                Some(g) => match file.group(g) {
                    Ok(x) => x,
                    Err(_) => file.create_group(g)?,
                },
                None => file.as_group()?,
            };
            let ds = match &d.data {
                Data::F32x3(a) => g.new_dataset_builder().with_data(a).create(leaf)?,
                Data::F32x2(a) => g.new_dataset_builder().with_data(a).create(leaf)?,
                Data::F64x2(a) => g.new_dataset_builder().with_data(a).create(leaf)?,
                Data::F64x1(a) => g
                    .new_dataset_builder()
                    .with_data(a.as_slice())
                    .create(leaf)?,
                Data::I32x1(a) => g
                    .new_dataset_builder()
                    .with_data(a.as_slice())
                    .create(leaf)?,
            };
            for (k, v) in &d.attrs {
                write_attr(&ds, k, &AttrValue::Str(v.clone()))?;
            }
        }
        file.flush()?;
        Ok(())
    })()
    .map_err(h5err(path));
    finish(res, &tmp, path)
}
