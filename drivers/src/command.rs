//! Instrument commands as values: what the guard checks, logs and forwards.
//!
//! Each method of the instrument traits that may change the instrument's state or acquire data
//! (which moves the tip or irradiates the specimen) has a command here; getters (`bias()`,
//! `scan_settings()`, ...) are reads, not commands: they are forwarded as they are, also in
//! dry-run mode, and not logged. Arguments
//! are SI; [`SpmCommand::args`] and [`StemCommand::args`] write them with their units for the
//! audit log (`"2.5 V"`, `"1e-9 m"`).

use scopegym_physics::instrument::ScanSettings;
use scopegym_physics::spm::tip::Conditioning;
use scopegym_physics::stem::optics::Aberrations;
use serde_json::{Map, Value, json};

/// `value unit` with the shortest exact decimal form of `value`, e.g. `"2.5 V"`, `"1e-9 m"`.
pub fn with_unit(value: f64, unit: &str) -> String {
    let a = value.abs();
    if value == 0.0 || (1e-3..1e6).contains(&a) || !value.is_finite() {
        format!("{value} {unit}")
    } else {
        format!("{value:e} {unit}")
    }
}

fn q(value: f64, unit: &str) -> Value {
    Value::String(with_unit(value, unit))
}

fn pos(p: [f64; 2]) -> Value {
    json!([q(p[0], "m"), q(p[1], "m")])
}

fn scan_args(s: &ScanSettings) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("rows".into(), json!(s.rows));
    m.insert("cols".into(), json!(s.cols));
    m.insert("pixel_size".into(), q(s.pixel_size, "m"));
    m.insert("dwell_time".into(), q(s.dwell_time, "s"));
    m.insert("flyback_time".into(), q(s.flyback_time, "s"));
    m.insert("center".into(), pos(s.center));
    m
}

/// A command to a scanning probe microscope.
#[derive(Debug, Clone, PartialEq)]
pub enum SpmCommand {
    /// `configure_scan(request)`.
    ConfigureScan(ScanSettings),
    /// `acquire_frame()` with the scan settings in force.
    AcquireFrame,
    /// `move_probe(position)`, position in lab coordinates, m.
    MoveProbe([f64; 2]),
    /// `set_bias(bias)`, V.
    SetBias(f64),
    /// `set_feedback_gains(p, i)`: P dimensionless, I in 1/s.
    SetFeedbackGains(f64, f64),
    /// `set_withdrawn(withdrawn)`.
    SetWithdrawn(bool),
    /// `condition_tip(action)`.
    ConditionTip(Conditioning),
    /// `bias_pulse(position, bias, duration)`: m, V, s.
    BiasPulse {
        /// Tip position, lab, m.
        position: [f64; 2],
        /// Pulse bias, V.
        bias: f64,
        /// Pulse duration, s.
        duration: f64,
    },
    /// `manipulate(start, end, bias, conductance)`: m, m, V, S.
    Manipulate {
        /// Start of the path, lab, m.
        start: [f64; 2],
        /// End of the path, lab, m.
        end: [f64; 2],
        /// Bias during the drag, V.
        bias: f64,
        /// Conductance setpoint during the drag, S.
        conductance: f64,
    },
    /// `point_spectroscopy(position, waveform)`: m, V.
    PointSpectroscopy {
        /// Tip position, lab, m.
        position: [f64; 2],
        /// Bias waveform, V.
        waveform: Vec<f64>,
    },
    /// `make_safe()`: withdraw the tip. Always allowed.
    MakeSafe,
}

impl SpmCommand {
    /// The trait method's name, e.g. `"set_bias"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ConfigureScan(_) => "configure_scan",
            Self::AcquireFrame => "acquire_frame",
            Self::MoveProbe(_) => "move_probe",
            Self::SetBias(_) => "set_bias",
            Self::SetFeedbackGains(..) => "set_feedback_gains",
            Self::SetWithdrawn(_) => "set_withdrawn",
            Self::ConditionTip(_) => "condition_tip",
            Self::BiasPulse { .. } => "bias_pulse",
            Self::Manipulate { .. } => "manipulate",
            Self::PointSpectroscopy { .. } => "point_spectroscopy",
            Self::MakeSafe => "make_safe",
        }
    }

    /// The arguments with their units, for the audit log.
    pub fn args(&self) -> Map<String, Value> {
        let mut m = Map::new();
        match self {
            Self::ConfigureScan(s) => return scan_args(s),
            Self::AcquireFrame | Self::MakeSafe => {}
            Self::MoveProbe(p) => {
                m.insert("position".into(), pos(*p));
            }
            Self::SetBias(b) => {
                m.insert("bias".into(), q(*b, "V"));
            }
            Self::SetFeedbackGains(p, i) => {
                m.insert("p_gain".into(), q(*p, "1"));
                m.insert("i_gain".into(), q(*i, "1/s"));
            }
            Self::SetWithdrawn(w) => {
                m.insert("withdrawn".into(), json!(w));
            }
            Self::ConditionTip(Conditioning::Pulse { bias, duration }) => {
                m.insert("kind".into(), json!("pulse"));
                m.insert("bias".into(), q(*bias, "V"));
                m.insert("duration".into(), q(*duration, "s"));
            }
            Self::ConditionTip(Conditioning::Dip {
                depth,
                bias,
                duration,
            }) => {
                m.insert("kind".into(), json!("dip"));
                m.insert("depth".into(), q(*depth, "m"));
                m.insert("bias".into(), q(*bias, "V"));
                m.insert("duration".into(), q(*duration, "s"));
            }
            Self::BiasPulse {
                position,
                bias,
                duration,
            } => {
                m.insert("position".into(), pos(*position));
                m.insert("bias".into(), q(*bias, "V"));
                m.insert("duration".into(), q(*duration, "s"));
            }
            Self::Manipulate {
                start,
                end,
                bias,
                conductance,
            } => {
                m.insert("start".into(), pos(*start));
                m.insert("end".into(), pos(*end));
                m.insert("bias".into(), q(*bias, "V"));
                m.insert("conductance".into(), q(*conductance, "S"));
            }
            Self::PointSpectroscopy { position, waveform } => {
                m.insert("position".into(), pos(*position));
                m.insert(
                    "waveform".into(),
                    json!({ "unit": "V", "values": waveform.iter().map(|v| if v.is_finite() { json!(v) } else { json!(v.to_string()) }).collect::<Vec<_>>() }),
                );
            }
        }
        m
    }
}

/// A command to a scanning transmission electron microscope.
#[derive(Debug, Clone, PartialEq)]
pub enum StemCommand {
    /// `configure_scan(request)`.
    ConfigureScan(ScanSettings),
    /// `acquire_frame()` with the scan settings in force.
    AcquireFrame,
    /// `move_probe(position)`, lab, m.
    MoveProbe([f64; 2]),
    /// `acquire_point(dwell_time)`, s.
    AcquirePoint(f64),
    /// `acquire_spectrum(exposure)`, s.
    AcquireSpectrum(f64),
    /// `set_aberrations(aberrations)`.
    SetAberrations(Aberrations),
    /// `set_blanked(blanked)`.
    SetBlanked(bool),
    /// `make_safe()`: blank the beam. Always allowed.
    MakeSafe,
}

impl StemCommand {
    /// The trait method's name, e.g. `"acquire_frame"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ConfigureScan(_) => "configure_scan",
            Self::AcquireFrame => "acquire_frame",
            Self::MoveProbe(_) => "move_probe",
            Self::AcquirePoint(_) => "acquire_point",
            Self::AcquireSpectrum(_) => "acquire_spectrum",
            Self::SetAberrations(_) => "set_aberrations",
            Self::SetBlanked(_) => "set_blanked",
            Self::MakeSafe => "make_safe",
        }
    }

    /// The arguments with their units, for the audit log.
    pub fn args(&self) -> Map<String, Value> {
        let mut m = Map::new();
        match self {
            Self::ConfigureScan(s) => return scan_args(s),
            Self::AcquireFrame | Self::MakeSafe => {}
            Self::MoveProbe(p) => {
                m.insert("position".into(), pos(*p));
            }
            Self::AcquirePoint(t) => {
                m.insert("dwell_time".into(), q(*t, "s"));
            }
            Self::AcquireSpectrum(t) => {
                m.insert("exposure".into(), q(*t, "s"));
            }
            Self::SetAberrations(a) => {
                for (n, v, u) in [
                    ("c10", a.c10, "m"),
                    ("c12", a.c12, "m"),
                    ("phi12", a.phi12, "rad"),
                    ("c21", a.c21, "m"),
                    ("phi21", a.phi21, "rad"),
                    ("c23", a.c23, "m"),
                    ("phi23", a.phi23, "rad"),
                    ("c30", a.c30, "m"),
                    ("c50", a.c50, "m"),
                ] {
                    m.insert(n.into(), q(v, u));
                }
            }
            Self::SetBlanked(b) => {
                m.insert("blanked".into(), json!(b));
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scopegym_physics::units::{Dimension, parse_quantity};

    #[test]
    fn quantities_round_trip_through_the_unit_parser() {
        for v in [0.0, 2.5, -8.0, 1e-9, 3.3e-10, 1e7, 0.2] {
            let s = with_unit(v, "m");
            assert_eq!(parse_quantity(&s, Dimension::LENGTH).unwrap(), v, "{s}");
        }
    }
}
