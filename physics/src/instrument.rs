//! The seam between environments and microscopes: instrument traits.
//!
//! Environments talk to an instrument only through these traits. The simulators in this crate
//! implement them, and so do the real-instrument clients in `scopegym-drivers`, so a policy
//! trained in simulation runs unchanged on hardware (DESIGN.md §10).
//!
//! Coordinates are lab coordinates in metres: the origin is the centre of the scan field at zero
//! scan offset, x along the fast scan axis, y along the slow axis. The specimen may drift
//! relative to this frame.

use crate::error::Result;
use crate::stem::optics::Aberrations;
use ndarray::ArrayView2;

/// What kind of microscope an instrument is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstrumentKind {
    /// Scanning transmission electron microscope.
    Stem,
    /// Scanning probe microscope (AFM, STM, PFM).
    Spm,
}

/// Static facts about an instrument.
#[derive(Debug, Clone, PartialEq)]
pub struct InstrumentInfo {
    /// Human-readable name, e.g. `"scopegym STEM simulator"`.
    pub name: String,
    /// The instrument family.
    pub kind: InstrumentKind,
    /// Whether this is a simulator (true) or a real instrument (false).
    pub simulated: bool,
}

/// Raster scan settings, as requested and as accepted by the instrument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScanSettings {
    /// Rows (slow axis) of a frame.
    pub rows: usize,
    /// Columns (fast axis) of a frame.
    pub cols: usize,
    /// Pixel size, m.
    pub pixel_size: f64,
    /// Dwell time per pixel, s.
    pub dwell_time: f64,
    /// Flyback time per line, s.
    pub flyback_time: f64,
    /// Centre of the frame in lab coordinates, m.
    pub center: [f64; 2],
}

impl ScanSettings {
    /// Time to acquire one frame, s: `rows · (cols · dwell + flyback)`.
    pub fn frame_time(&self) -> f64 {
        self.rows as f64 * (self.cols as f64 * self.dwell_time + self.flyback_time)
    }

    /// Checks a scan request as an SPM controller does before anything moves: 2-4096 rows and
    /// columns, a positive pixel size, a dwell time in (0, 10] s per pixel, a flyback ≥ 0 and a
    /// finite centre. The error names the field.
    pub fn check_spm_request(&self) -> Result<()> {
        let r = self;
        let bad = |field: &str, reason: String| Err(crate::PhysicsError::arg(field, reason));
        if !(2..=4096).contains(&r.rows) || !(2..=4096).contains(&r.cols) {
            return bad(
                "rows/cols",
                format!("must be 2..=4096, got {}x{}", r.rows, r.cols),
            );
        }
        if !(r.pixel_size.is_finite() && r.pixel_size > 0.0) {
            return bad(
                "pixel_size",
                format!("must be positive, got {}", r.pixel_size),
            );
        }
        if !(r.dwell_time.is_finite() && r.dwell_time > 0.0 && r.dwell_time <= 10.0) {
            return bad(
                "dwell_time",
                format!("must be in (0, 10] s, got {}", r.dwell_time),
            );
        }
        if !(r.flyback_time.is_finite() && r.flyback_time >= 0.0) {
            return bad(
                "flyback_time",
                format!("must be ≥ 0, got {}", r.flyback_time),
            );
        }
        if !r.center.iter().all(|v| v.is_finite()) {
            return bad("center", "must be finite".into());
        }
        Ok(())
    }

    /// Field of view `[width, height]`, m.
    pub fn field_of_view(&self) -> [f64; 2] {
        [
            self.cols as f64 * self.pixel_size,
            self.rows as f64 * self.pixel_size,
        ]
    }
}

/// Facts about one acquired frame.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FrameMeta {
    /// Frame number since the last reset (0-based).
    pub index: u64,
    /// Instrument clock at the frame's first pixel, s.
    pub t_start: f64,
    /// Acquisition time including flyback, s.
    pub duration: f64,
    /// Electrons per pixel, `I·t_dwell/e`.
    pub electrons_per_pixel: f64,
    /// Dose per area delivered by this frame, e⁻/m².
    pub dose: f64,
}

/// A frame borrowed from the instrument's buffer (valid until the next acquisition).
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The image, `rows × cols`, row = slow scan axis.
    pub image: ArrayView2<'a, f32>,
    /// Acquisition facts.
    pub meta: FrameMeta,
}

/// A spectrum borrowed from the instrument's buffer (valid until the next acquisition).
#[derive(Debug, Clone, Copy)]
pub struct Spectrum<'a> {
    /// Energy loss of each channel, eV.
    pub energy: &'a [f64],
    /// Counts per channel.
    pub counts: &'a [f32],
}

/// A scanning transmission electron microscope.
pub trait StemInstrument {
    /// Static facts about the instrument.
    fn info(&self) -> InstrumentInfo;
    /// Instrument clock, s since the last reset or connection.
    fn clock(&self) -> f64;
    /// Beam energy, eV.
    fn beam_energy(&self) -> f64;
    /// Beam current, A.
    fn beam_current(&self) -> f64;
    /// The scan settings in force.
    fn scan_settings(&self) -> ScanSettings;
    /// Requests new scan settings; returns what the instrument accepted.
    fn configure_scan(&mut self, request: &ScanSettings) -> Result<ScanSettings>;
    /// Acquires one HAADF frame with the current scan settings.
    fn acquire_frame(&mut self) -> Result<Frame<'_>>;
    /// Current probe position in lab coordinates, m.
    fn probe_position(&self) -> [f64; 2];
    /// Moves the (parked) probe to a lab position, m.
    fn move_probe(&mut self, position: [f64; 2]) -> Result<()>;
    /// Dwells the beam at the probe position for `dwell_time` s; returns the HAADF counts.
    fn acquire_point(&mut self, dwell_time: f64) -> Result<f64>;
    /// Acquires an EELS spectrum at the probe position with exposure `exposure` s.
    fn acquire_spectrum(&mut self, exposure: f64) -> Result<Spectrum<'_>>;
    /// The coherent aberrations in force.
    fn aberrations(&self) -> Aberrations;
    /// Requests new aberrations; returns what the corrector accepted.
    fn set_aberrations(&mut self, aberrations: &Aberrations) -> Result<Aberrations>;
    /// Blanks (true) or unblanks (false) the beam. Acquisitions are refused while blanked.
    fn set_blanked(&mut self, blanked: bool) -> Result<()>;
    /// Whether the beam is blanked.
    fn is_blanked(&self) -> bool;
    /// Puts the instrument in a safe state (beam blanked). Idempotent.
    fn make_safe(&mut self) -> Result<()> {
        self.set_blanked(true)
    }
}

/// The imaging mode of a scanning probe microscope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpmMode {
    /// Atomic force microscopy (contact mode, deflection feedback).
    #[default]
    Afm,
    /// Scanning tunnelling microscopy (constant-current feedback).
    Stm,
    /// Piezoresponse force microscopy (contact AFM plus an AC bias; amplitude and phase).
    Pfm,
}

impl SpmMode {
    /// Lower-case name: `"afm"`, `"stm"`, `"pfm"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Afm => "afm",
            Self::Stm => "stm",
            Self::Pfm => "pfm",
        }
    }
}

/// One image channel of an SPM frame (height, error, amplitude, phase, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Channel {
    /// Channel name, e.g. `"height"`, `"height_retrace"`, `"error"`, `"amplitude"`, `"phase"`.
    pub name: String,
    /// Units of the values, e.g. `"m"`, `"deg"`, `"a.u."`.
    pub units: String,
    /// What the values are, in words.
    pub quantity: String,
    /// The image, `rows × cols`, row = slow scan axis, column = fast axis position (retrace
    /// channels are stored in the same left-to-right order as trace channels).
    pub image: ndarray::Array2<f32>,
}

/// Facts about one acquired SPM frame.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SpmFrameMeta {
    /// Frame number since the last reset (0-based).
    pub index: u64,
    /// Instrument clock at the frame's first pixel, s.
    pub t_start: f64,
    /// Acquisition time, trace and retrace of every line, s.
    pub duration: f64,
}

/// An SPM frame borrowed from the instrument's buffers (valid until the next acquisition).
#[derive(Debug, Clone, Copy)]
pub struct SpmFrame<'a> {
    /// Every channel; the first is the main channel (trace height, or PFM phase).
    pub channels: &'a [Channel],
    /// Acquisition facts.
    pub meta: SpmFrameMeta,
}

impl<'a> SpmFrame<'a> {
    /// The channel called `name`, if the instrument recorded it.
    pub fn channel(&self, name: &str) -> Option<&'a Channel> {
        self.channels.iter().find(|c| c.name == name)
    }

    /// The main channel.
    pub fn main(&self) -> &'a Channel {
        &self.channels[0]
    }
}

/// A scanning probe microscope (AFM, STM or PFM).
///
/// Scan settings use the same [`ScanSettings`] as STEM: `dwell_time` is the time per pixel in
/// one scan direction, and every line is scanned forward (trace) and back (retrace), so a frame
/// takes `rows · (2 · cols · dwell_time + flyback_time)`.
pub trait SpmInstrument {
    /// Static facts about the instrument.
    fn info(&self) -> InstrumentInfo;
    /// The imaging mode.
    fn mode(&self) -> SpmMode;
    /// Instrument clock, s since the last reset or connection.
    fn clock(&self) -> f64;
    /// The scan settings in force.
    fn scan_settings(&self) -> ScanSettings;
    /// Requests new scan settings; returns what the instrument accepted.
    fn configure_scan(&mut self, request: &ScanSettings) -> Result<ScanSettings>;
    /// Scans one frame (trace and retrace of every line) with the current settings.
    fn acquire_frame(&mut self) -> Result<SpmFrame<'_>>;
    /// Current tip position in lab coordinates, m.
    fn probe_position(&self) -> [f64; 2];
    /// Moves the tip (feedback on) to a lab position, m.
    fn move_probe(&mut self, position: [f64; 2]) -> Result<()>;
    /// Sample bias, V.
    fn bias(&self) -> f64;
    /// Requests a sample bias, V; returns what was applied.
    fn set_bias(&mut self, bias: f64) -> Result<f64>;
    /// Feedback gains `(P, I)`: P dimensionless, I in 1/s.
    fn feedback_gains(&self) -> (f64, f64);
    /// Requests feedback gains; returns what the controller accepted.
    fn set_feedback_gains(&mut self, p_gain: f64, i_gain: f64) -> Result<(f64, f64)>;
    /// Whether the tip is withdrawn (no scanning, no tip-sample interaction).
    fn is_withdrawn(&self) -> bool;
    /// Withdraws (true) or re-engages (false) the tip. Acquisitions are refused while withdrawn.
    fn set_withdrawn(&mut self, withdrawn: bool) -> Result<()>;
    /// Puts the instrument in a safe state (tip withdrawn). Idempotent.
    fn make_safe(&mut self) -> Result<()> {
        self.set_withdrawn(true)
    }
}

/// Tip conditioning in place (STM): bias pulses and controlled dips (DeepSPM's action set).
pub trait TipConditioning: SpmInstrument {
    /// Applies one conditioning action at the current tip position. What it did to the tip is
    /// not reported: it shows in later images.
    fn condition_tip(&mut self, action: &crate::spm::tip::Conditioning) -> Result<()>;
}

/// Writing with the tip field (PFM): a bias pulse at a point.
pub trait BiasWriting: SpmInstrument {
    /// Applies a bias pulse of `bias` V for `duration` s with the tip at `position` (lab, m).
    fn bias_pulse(&mut self, position: [f64; 2], bias: f64, duration: f64) -> Result<()>;
}

/// STM lateral manipulation: drag the tip along a path at low tunnelling resistance.
pub trait LateralManipulation: SpmInstrument {
    /// Moves the tip from `start` to `end` (lab, m) at `bias` V and `conductance` S, then returns
    /// to imaging conditions. Returns the tip height trace along the path (m), recorded while
    /// the tip moves: the signal experimenters watch for hops (steps where the adatom jumps).
    fn manipulate(
        &mut self,
        start: [f64; 2],
        end: [f64; 2],
        bias: f64,
        conductance: f64,
    ) -> Result<Vec<f64>>;
}

/// Spectroscopy at a point: the response to a bias waveform (PFM switching spectroscopy,
/// STM I(V)).
pub trait PointSpectroscopy: SpmInstrument {
    /// Moves the tip to `position` (lab, m), steps through `waveform` (V) and returns one
    /// response per waveform point (PFM: piezoresponse, arbitrary units, sign = polarization).
    fn point_spectroscopy(&mut self, position: [f64; 2], waveform: &[f64]) -> Result<Vec<f64>>;
}
