//! Safety limits, read from a `limits.toml` whose values carry units.
//!
//! Every quantity is written as a string with a unit (`"10 V"`, `"5 V/s"`, `"100 ms"`, `"2 nm"`,
//! `"1e5 e/Å^2"`), parsed by [`scopegym_physics::units`]; a bare number is taken as SI. Inside,
//! everything is SI: volts, seconds, metres, electrons per m², siemens written as `A/V`
//! (`"1 µA/V"` = 1 µS). Unknown keys are errors, every field has a documented default, and
//! [`Limits::validate`] names the offending field. Both sections are optional: a missing
//! section takes its defaults.
//!
//! ```
//! use scopegym_drivers::limits::Limits;
//! let l = Limits::from_toml_str(r#"
//!     [spm]
//!     bias_window = ["-2 V", "2 V"]
//!     pulse_width_max = "100 ms"
//!     [stem]
//!     dose_budget = "1e5 e/Å^2"
//! "#).unwrap();
//! assert_eq!(l.spm.bias_window, [-2.0, 2.0]);
//! assert!((l.spm.pulse_width_max - 0.1).abs() < 1e-15);
//! assert!((l.stem.dose_budget - 1e25).abs() < 1e12); // e/m²
//! assert!(Limits::from_toml_str("[spm]\nbias_window = [\"2 nm\", \"3 nm\"]").is_err());
//! ```

use crate::error::{DriverError, Result};
use scopegym_physics::units::{Dimension, parse_quantity};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// Volts per second.
const VOLTAGE_RATE: Dimension = Dimension([0, -1, 0, 0, 1, 0, 0]);
/// Siemens (A/V).
const CONDUCTANCE: Dimension = Dimension([0, 0, 1, 0, -1, 0, 0]);

/// Deserializes a quantity of dimension `dim`: a string with a unit, or a number in SI.
fn quantity<'de, D: Deserializer<'de>>(d: D, dim: Dimension) -> std::result::Result<f64, D::Error> {
    struct V(Dimension);
    impl Visitor<'_> for V {
        type Value = f64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "{} as a string with a unit, or a number in SI units",
                self.0
            )
        }
        fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<f64, E> {
            parse_quantity(v, self.0).map_err(E::custom)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<f64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<f64, E> {
            Ok(v as f64)
        }
    }
    d.deserialize_any(V(dim))
}

fn range<'de, D: Deserializer<'de>>(
    d: D,
    dim: Dimension,
) -> std::result::Result<[f64; 2], D::Error> {
    #[derive(Deserialize)]
    #[serde(transparent)]
    struct Raw(Vec<toml::Value>);
    let raw = Raw::deserialize(d)?;
    if raw.0.len() != 2 {
        return Err(de::Error::custom(format!(
            "expected [min, max], two values of {dim}, got {} values",
            raw.0.len()
        )));
    }
    let one = |v: &toml::Value| -> std::result::Result<f64, D::Error> {
        match v {
            toml::Value::String(s) => parse_quantity(s, dim).map_err(de::Error::custom),
            toml::Value::Float(x) => Ok(*x),
            toml::Value::Integer(i) => Ok(*i as f64),
            other => Err(de::Error::custom(format!(
                "expected {dim} as a string with a unit, got {}",
                other.type_str()
            ))),
        }
    };
    Ok([one(&raw.0[0])?, one(&raw.0[1])?])
}

macro_rules! dim_fns {
    ($($q:ident, $r:ident, $dim:expr;)*) => {$(
        #[allow(dead_code)]
        fn $q<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
            quantity(d, $dim)
        }
        #[allow(dead_code)]
        fn $r<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<[f64; 2], D::Error> {
            range(d, $dim)
        }
    )*};
}

dim_fns! {
    volts, volts_range, Dimension::VOLTAGE;
    volts_per_s, volts_per_s_range, VOLTAGE_RATE;
    seconds, seconds_range, Dimension::TIME;
    metres, metres_range, Dimension::LENGTH;
    siemens, siemens_range, CONDUCTANCE;
    dose, dose_range, Dimension::DOSE;
}

/// All limits the guard enforces.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Scanning probe microscope limits (`[spm]`).
    pub spm: SpmLimits,
    /// Scanning transmission electron microscope limits (`[stem]`).
    pub stem: StemLimits,
}

/// Limits for scanning probe microscopes (`[spm]` in `limits.toml`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpmLimits {
    /// Allowed sample bias `[min, max]`, V, for `set_bias`, the bias during manipulation and
    /// dips, and every point of a spectroscopy waveform. Default `["-10 V", "10 V"]`.
    #[serde(deserialize_with = "volts_range")]
    pub bias_window: [f64; 2],
    /// Largest bias slew rate, V/s: `set_bias` ramps the bias in steps of at most
    /// `bias_slew_max · bias_ramp_interval`, waiting `bias_ramp_interval` between steps on a real
    /// instrument (a simulator's clock does not run between commands, so it is not waited for).
    /// Default `"10 V/s"`.
    #[serde(deserialize_with = "volts_per_s")]
    pub bias_slew_max: f64,
    /// Interval between bias ramp steps, s. Default `"10 ms"`.
    #[serde(deserialize_with = "seconds")]
    pub bias_ramp_interval: f64,
    /// Largest pulse amplitude `|V|`, V (tip-conditioning pulses and writing pulses).
    /// Default `"10 V"`.
    #[serde(deserialize_with = "volts")]
    pub pulse_bias_max: f64,
    /// Longest pulse (and dip), s. Default `"1 s"`.
    #[serde(deserialize_with = "seconds")]
    pub pulse_width_max: f64,
    /// Allowed tunnelling-conductance setpoint `[min, max]`, S (written `A/V`), for lateral
    /// manipulation. Default `["1 pA/V", "10 µA/V"]`.
    #[serde(deserialize_with = "siemens_range")]
    pub setpoint_range: [f64; 2],
    /// Deepest controlled dip of the tip below its imaging height, m. Default `"5 nm"`.
    #[serde(deserialize_with = "metres")]
    pub dip_depth_max: f64,
    /// Allowed tip height `[min, max]`, m, as recorded in the `height` channel: a frame with a
    /// height outside it aborts (the tip is withdrawn and the frame refused).
    /// Default `["-1 µm", "1 µm"]`.
    #[serde(deserialize_with = "metres_range")]
    pub z_range: [f64; 2],
    /// Scanner range `[x, y]`, m, centred on the lab origin. Default `["1 µm", "1 µm"]`: set it
    /// to the instrument's.
    #[serde(deserialize_with = "metres_range")]
    pub scanner_range: [f64; 2],
    /// Fraction of the scanner range that frames and tip positions must stay inside (a
    /// centred box of `fraction · scanner_range`), in (0, 1]. Default 0.95.
    pub scan_area_fraction: f64,
    /// Crash/corrugation abort: a frame whose `height` channel spans more than this
    /// (peak to peak), m, or holds a non-finite value, withdraws the tip and is refused.
    /// Default `"50 nm"`.
    #[serde(deserialize_with = "metres")]
    pub abort_corrugation: f64,
}

impl Default for SpmLimits {
    fn default() -> Self {
        Self {
            bias_window: [-10.0, 10.0],
            bias_slew_max: 10.0,
            bias_ramp_interval: 0.01,
            pulse_bias_max: 10.0,
            pulse_width_max: 1.0,
            setpoint_range: [1e-12, 1e-5],
            dip_depth_max: 5e-9,
            z_range: [-1e-6, 1e-6],
            scanner_range: [1e-6, 1e-6],
            scan_area_fraction: 0.95,
            abort_corrugation: 50e-9,
        }
    }
}

/// Largest change of each aberration coefficient per `set_aberrations` call, m
/// (`[stem.aberration_step_max]`). For coefficients with an azimuth (C12, C21, C23, C32 … C56;
/// `n` the symmetry order) the step is the length of the change of the coefficient as a 2-D
/// vector, `|C·e^{inφ} − C'·e^{inφ'}|`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AberrationSteps {
    /// Defocus C10, m. Default `"20 nm"`.
    #[serde(deserialize_with = "metres")]
    pub c10: f64,
    /// Two-fold astigmatism C12, m. Default `"10 nm"`.
    #[serde(deserialize_with = "metres")]
    pub c12: f64,
    /// Axial coma C21, m. Default `"200 nm"`.
    #[serde(deserialize_with = "metres")]
    pub c21: f64,
    /// Three-fold astigmatism C23, m. Default `"200 nm"`.
    #[serde(deserialize_with = "metres")]
    pub c23: f64,
    /// Spherical aberration C30, m. Default `"5 µm"`.
    #[serde(deserialize_with = "metres")]
    pub c30: f64,
    /// Fifth-order spherical aberration C50, m. Default `"1 mm"`.
    #[serde(deserialize_with = "metres")]
    pub c50: f64,
    /// Third-order star aberration C32, m. Default `"5 µm"`.
    #[serde(deserialize_with = "metres")]
    pub c32: f64,
    /// Four-fold astigmatism C34, m. Default `"5 µm"`.
    #[serde(deserialize_with = "metres")]
    pub c34: f64,
    /// Fourth-order axial coma C41, m. Default `"50 µm"`.
    #[serde(deserialize_with = "metres")]
    pub c41: f64,
    /// Fourth-order three-lobe aberration C43, m. Default `"50 µm"`.
    #[serde(deserialize_with = "metres")]
    pub c43: f64,
    /// Five-fold astigmatism C45, m. Default `"50 µm"`.
    #[serde(deserialize_with = "metres")]
    pub c45: f64,
    /// Fifth-order two-fold aberration C52, m. Default `"1 mm"`.
    #[serde(deserialize_with = "metres")]
    pub c52: f64,
    /// Fifth-order four-fold aberration C54, m. Default `"1 mm"`.
    #[serde(deserialize_with = "metres")]
    pub c54: f64,
    /// Six-fold astigmatism C56, m. Default `"1 mm"`.
    #[serde(deserialize_with = "metres")]
    pub c56: f64,
}

impl AberrationSteps {
    /// Each coefficient's limit by name, in the order of [`crate::guard::aberration_steps`].
    pub fn by_name(&self) -> [(&'static str, f64); 14] {
        [
            ("c10", self.c10),
            ("c12", self.c12),
            ("c21", self.c21),
            ("c23", self.c23),
            ("c30", self.c30),
            ("c50", self.c50),
            ("c32", self.c32),
            ("c34", self.c34),
            ("c41", self.c41),
            ("c43", self.c43),
            ("c45", self.c45),
            ("c52", self.c52),
            ("c54", self.c54),
            ("c56", self.c56),
        ]
    }
}

impl Default for AberrationSteps {
    fn default() -> Self {
        Self {
            c10: 20e-9,
            c12: 10e-9,
            c21: 200e-9,
            c23: 200e-9,
            c30: 5e-6,
            c50: 1e-3,
            c32: 5e-6,
            c34: 5e-6,
            c41: 50e-6,
            c43: 50e-6,
            c45: 50e-6,
            c52: 1e-3,
            c54: 1e-3,
            c56: 1e-3,
        }
    }
}

/// Limits for scanning transmission electron microscopes (`[stem]` in `limits.toml`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StemLimits {
    /// Cumulative dose budget of each region, e⁻/m² (written e.g. `"1e5 e/Å^2"`). Regions are
    /// the cells of a square grid of side `dose_cell` anchored at the lab origin; a frame adds
    /// its dose to every cell it touches, a point or spectrum adds its electrons divided by the
    /// cell area to the cell of the probe. Default `"1e5 e/Å^2"`.
    #[serde(deserialize_with = "dose")]
    pub dose_budget: f64,
    /// Side of a dose region, m. Default `"1 nm"`.
    #[serde(deserialize_with = "metres")]
    pub dose_cell: f64,
    /// Longest frame `rows · (cols · dwell + flyback)`, s. Default `"10 s"`.
    #[serde(deserialize_with = "seconds")]
    pub max_frame_time: f64,
    /// Longest point dwell or spectrum exposure, s. Default `"1 s"`.
    #[serde(deserialize_with = "seconds")]
    pub max_exposure: f64,
    /// Keep the beam blanked except during acquisitions: the guard unblanks just before each
    /// acquisition the caller asked for with the beam unblanked, and blanks right after it.
    /// Default true.
    pub blank_outside_acquisition: bool,
    /// Largest aberration change per call.
    pub aberration_step_max: AberrationSteps,
}

impl Default for StemLimits {
    fn default() -> Self {
        Self {
            dose_budget: 1e5 / 1e-20,
            dose_cell: 1e-9,
            max_frame_time: 10.0,
            max_exposure: 1.0,
            blank_outside_acquisition: true,
            aberration_step_max: AberrationSteps::default(),
        }
    }
}

fn positive(field: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(DriverError::limits(
            field,
            format!("must be a positive finite value, got {v}"),
        ))
    }
}

fn ordered(field: &str, r: [f64; 2]) -> Result<()> {
    if r.iter().all(|v| v.is_finite()) && r[0] < r[1] {
        Ok(())
    } else {
        Err(DriverError::limits(
            field,
            format!("must be [min, max] with min < max, both finite, got {r:?}"),
        ))
    }
}

impl Limits {
    /// Parses and validates limits from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| DriverError::limits("(file)", e.to_string()))?;
        let limits: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            DriverError::limits(path, inner.message().to_string())
        })?;
        limits.validate()?;
        Ok(limits)
    }

    /// Reads, parses and validates a `limits.toml`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| DriverError::Io {
            context: format!("reading {}", path.display()),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Checks every field, naming the first offending one.
    pub fn validate(&self) -> Result<()> {
        let s = &self.spm;
        ordered("spm.bias_window", s.bias_window)?;
        positive("spm.bias_slew_max", s.bias_slew_max)?;
        positive("spm.bias_ramp_interval", s.bias_ramp_interval)?;
        positive("spm.pulse_bias_max", s.pulse_bias_max)?;
        positive("spm.pulse_width_max", s.pulse_width_max)?;
        ordered("spm.setpoint_range", s.setpoint_range)?;
        if s.setpoint_range[0] <= 0.0 {
            return Err(DriverError::limits(
                "spm.setpoint_range",
                "min must be positive",
            ));
        }
        positive("spm.dip_depth_max", s.dip_depth_max)?;
        ordered("spm.z_range", s.z_range)?;
        positive("spm.scanner_range[0]", s.scanner_range[0])?;
        positive("spm.scanner_range[1]", s.scanner_range[1])?;
        if !(s.scan_area_fraction > 0.0 && s.scan_area_fraction <= 1.0) {
            return Err(DriverError::limits(
                "spm.scan_area_fraction",
                format!("must be in (0, 1], got {}", s.scan_area_fraction),
            ));
        }
        positive("spm.abort_corrugation", s.abort_corrugation)?;
        // A ramp across the whole window must not need more than a million steps.
        let width = s.bias_window[1] - s.bias_window[0];
        if width / (s.bias_slew_max * s.bias_ramp_interval) > 1e6 {
            return Err(DriverError::limits(
                "spm.bias_ramp_interval",
                "a ramp across bias_window would take more than 10^6 steps",
            ));
        }
        let t = &self.stem;
        positive("stem.dose_budget", t.dose_budget)?;
        positive("stem.dose_cell", t.dose_cell)?;
        positive("stem.max_frame_time", t.max_frame_time)?;
        positive("stem.max_exposure", t.max_exposure)?;
        for (n, v) in t.aberration_step_max.by_name() {
            positive(&format!("stem.aberration_step_max.{n}"), v)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Limits::default().validate().unwrap();
        assert_eq!(Limits::from_toml_str("").unwrap(), Limits::default());
    }

    #[test]
    fn example_file_parses_and_is_stricter_than_nothing() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/limits.example.toml");
        let l = Limits::from_file(path).unwrap();
        assert!(l.spm.bias_window[0] >= -10.0 && l.spm.bias_window[1] <= 10.0);
        assert!(l.spm.pulse_width_max <= 1.0);
        assert!((l.spm.scan_area_fraction - 0.95).abs() < 1e-12);
        assert!(l.stem.blank_outside_acquisition);
        assert!(l.stem.dose_budget <= 1e25);
    }

    #[test]
    fn units_are_converted_to_si() {
        let l = Limits::from_toml_str(
            "[spm]\nbias_slew_max = \"500 mV/s\"\nsetpoint_range = [\"1 nA/V\", \"2 µA/V\"]\n\
             z_range = [\"-200 nm\", 0.2e-6]\n[stem]\nmax_frame_time = \"100 ms\"\n\
             [stem.aberration_step_max]\nc10 = \"0.2 Å\"\n",
        )
        .unwrap();
        assert!((l.spm.bias_slew_max - 0.5).abs() < 1e-15);
        assert!((l.spm.setpoint_range[0] - 1e-9).abs() < 1e-24);
        assert!((l.spm.setpoint_range[1] - 2e-6).abs() < 1e-21);
        assert!((l.spm.z_range[0] + 200e-9).abs() < 1e-21);
        assert!((l.stem.max_frame_time - 0.1).abs() < 1e-15);
        assert!((l.stem.aberration_step_max.c10 - 0.2e-10).abs() < 1e-25);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "[spm]\nbias_window = [\"1 V\", \"-1 V\"]",
                "spm.bias_window",
            ),
            (
                "[spm]\nbias_window = [\"1 nm\", \"2 nm\"]",
                "spm.bias_window",
            ),
            ("[spm]\nbias_window = [\"1 V\"]", "spm.bias_window"),
            ("[spm]\npulse_width_max = \"-1 s\"", "spm.pulse_width_max"),
            ("[spm]\nscan_area_fraction = 1.5", "spm.scan_area_fraction"),
            ("[spm]\nbias_windw = [\"1 V\", \"2 V\"]", "bias_windw"),
            ("[stem]\ndose_budget = \"1e5 e/Å\"", "stem.dose_budget"),
            ("[stem]\ndose_cell = \"0 nm\"", "stem.dose_cell"),
            (
                "[stem.aberration_step_max]\nc10 = \"1 V\"",
                "stem.aberration_step_max.c10",
            ),
            ("[stem.aberration_step_max]\nc99 = \"1 nm\"", "c99"),
            ("[stm]\n", "stm"),
            ("[spm\n", "(file)"),
        ];
        for (text, field) in cases {
            let e = Limits::from_toml_str(text).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, DriverError::InvalidLimits { .. }) && msg.contains(field),
                "{text:?}: {msg}"
            );
        }
    }
}
