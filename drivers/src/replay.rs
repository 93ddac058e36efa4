//! The replay driver: recorded NSID HDF5 data served through the SPM instrument traits.
//!
//! [`ReplaySpm`] opens a recording made on a real scanning probe microscope (the pycroscopy /
//! sidpy NSID layout, read by [`scopegym_envs::nsid`]) and answers [`SpmInstrument`] and
//! [`PointSpectroscopy`] calls from it, for offline deployment dry-runs (a policy, the guard,
//! the audit log and `scopegym deploy` run end to end with no microscope) and for testing
//! policies on real data. The driver URL `replay:FILE` opens one with
//! [`ReplayOptions::default`].
//!
//! # What a recording can serve
//!
//! - **Frames** from recorded images (every 2-D main dataset whose two axes are spatial, all
//!   on one grid), or, for a spectroscopy-only recording, from the loops (below).
//! - **Loops** ([`PointSpectroscopy`]) from a BEPS map: a main dataset with two spatial axes
//!   and one spectral axis in volts (the bias sweep), one loop per recorded point.
//!
//! # Coordinates
//!
//! Lab coordinates (m, [`scopegym_physics::instrument`]) have their origin at the centre of
//! the recording: the midpoint between its first and last pixel centres on each axis. `x` is
//! the spatial axis named `x` (any case; else the first spatial axis), `y` the other; a frame's
//! column runs along `x`, its row along `y`, as the simulator's (`x = centre + (column −
//! (cols − 1)/2)·pixel`). The recording covers its pixel centres plus half a pixel all round
//! (each recorded pixel is a cell): [`ReplaySpm::frame_extent`], [`ReplaySpm::loop_extent`].
//!
//! # Frames
//!
//! [`SpmInstrument::configure_scan`] accepts a frame (any rows, columns and pixel size) whose
//! pixel centres all lie within the recording's cover, and refuses one that does not
//! ([`PhysicsError::Refused`], operation `configure_scan`, the reason naming the requested and
//! recorded ranges and the file): a window outside the recording has no data, and padding
//! would show a policy an edge that the sample does not have. Refused settings leave the
//! settings in force unchanged. Every channel of a frame is the recorded image resampled
//! bilinearly at the frame's pixel centres (clamped to the outermost recorded pixel centres
//! within the half-pixel border). Frames larger than the recorded pixel are point samples: no
//! anti-aliasing, as a real scan at that pixel size also samples points.
//!
//! Channel names follow the simulator's ([`scopegym_physics::spm::sim`]), from each image's
//! `quantity` (case and separators ignored; a `Retrace`/`Trace` suffix gives `_retrace` or
//! nothing): `Height` → `height`, `Amplitude` → `amplitude`, `Phase` → `phase`, `Deflection`
//! → `deflection`, anything else its lower-cased name. A deflection channel also yields
//! `error` (`error_retrace`): the deflection minus its median over the recording (the feedback
//! holds the deflection at its setpoint, which NSID does not record; this is the simulator's
//! deflection error). With [`ReplayOptions::retrace_as_trace`] (the default) a channel recorded
//! only in retrace is also served under its trace name (its `quantity` says so): the shared
//! scan has retrace channels only, and tasks read `height`, `error` and `phase`; trace and
//! retrace then agree exactly, so a task's trace-retrace difference reads 0 on replay. Units
//! are SI, with phase in degrees as the simulator reports it: lengths in `nm`, `µm`, ... are
//! converted to `m`, phase in `rad` to `deg`; other units are passed through. The channels are
//! ordered phase, amplitude, height, height_retrace, error, then the rest in file order (the
//! first is the main channel, as on the simulator: PFM phase when recorded). The mode is PFM
//! when phase and amplitude are recorded (or loops are), else AFM.
//!
//! A spectroscopy-only recording serves frames of its as-grown state: `response`, the recorded
//! response at the first point of the sweep (before any bias; the file's units), and from it
//! `phase` (0° where the response is at or above the loops' centre, the median midpoint of the
//! despiked loops, else 180°) and `amplitude` (the distance from that centre), each computed
//! after resampling. The file's own axis-label slips are tolerated where unambiguous: a
//! spatial axis labelled in non-length units but with the same coordinates as another image's
//! axis in metres is read as metres, and [`ReplaySpm::notes`] says so.
//!
//! # Loops
//!
//! [`PointSpectroscopy::point_spectroscopy`] serves the loop of the recorded point nearest to
//! the requested position (refused beyond the loop grid's cover), at the requested waveform's
//! biases: each waveform point is on the rising or the falling branch by its sweep direction
//! (the step from the previous point; for the first point, the step from the DC bias in force,
//! [`SpmInstrument::bias`]; a point that repeats its predecessor's bias keeps its direction),
//! and its response is interpolated linearly along the recorded sweep's branch of that
//! direction. The recorded sweep is split into monotone segments (and the segment closing the
//! cycle, last point back to the first, when it is no longer than the sweep's largest step);
//! the first segment in sweep order of the right direction that spans the bias gives the
//! value. So a waveform equal to the recorded one reads the recorded numbers exactly, and a
//! coarser or finer triangle of the same amplitude reads the recorded loop between them.
//! Refused: a bias outside the recorded range, a bias no recorded branch of that direction
//! spans, a waveform that never changes from the DC bias (no branch is selected), and by
//! default a waveform that turns inside the recorded range (a minor loop: the recording holds
//! the major loop only, and cannot tell what a minor loop does; a turn within one step (the
//! recording's or the waveform's, whichever is larger) of a recorded extreme counts as a turn
//! at the extreme). [`ReplayOptions::allow_minor_loops`] serves minor loops from the major
//! loop's branches instead. Recorded loops have no history: measuring a point again reads the
//! same loop.
//!
//! # State
//!
//! Scan settings, probe position, DC bias, feedback gains and the withdrawn flag are kept as
//! state and read back as set; the gains and the DC bias do not change what is served (the
//! recording was made with its own). Acquisitions are refused while withdrawn, as on the
//! simulator. The clock advances by each frame's time (`rows · (2 · cols · dwell + flyback)`)
//! and each loop's (`points · spectroscopy_point_time`). A new episode
//! ([`NewEpisode`]) resets the clock, frame count, settings, probe, bias, gains and engages the
//! tip; the recorded sample does not change. [`SpmInstrument::info`] reports
//! `simulated = false`: the data were measured on a real instrument, and a replay exercises the
//! deployment path (guard, limits, audit log) exactly as hardware would; its name starts with
//! `"scopegym replay"`.
//!
//! The capabilities a recording cannot honour (bias writing, tip conditioning, lateral
//! manipulation) are not implemented, so a task that needs them does not compile against
//! `ReplaySpm`. The tasks that run on it: `scopegym/PfmSpectroscopyExplore-v1` (loops, and a
//! PFM overview frame) and `scopegym/AfmFeedbackTuning-v2` (frames with `height`,
//! `height_retrace`, `error`); it implements their ground-truth traits with nothing known.
//!
//! ```no_run
//! use scopegym_drivers::replay::{ReplayOptions, ReplaySpm};
//! use scopegym_physics::instrument::{PointSpectroscopy, SpmInstrument};
//!
//! let mut r = ReplaySpm::open("../shared/data/beps_pto_50x50.h5", ReplayOptions::default())?;
//! let loop_ = r.point_spectroscopy([0.0, 0.0], &[0.0, 4.25, 8.5, 4.25, 0.0, -4.25, -8.5])?;
//! assert_eq!(loop_.len(), 7);
//! let frame = r.acquire_frame()?;
//! assert_eq!(frame.main().name, "phase");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::error::DriverError;
use ndarray::Array2;
use scopegym_envs::env::{Info, InfoValue};
use scopegym_envs::nsid::{self, DimensionType, MainDataset};
use scopegym_envs::tasks::NewEpisode;
use scopegym_envs::tasks::pfm_spectroscopy_explore::RecordedLoops;
use scopegym_physics::PhysicsError;
use scopegym_physics::instrument::{
    Channel, InstrumentInfo, InstrumentKind, PointSpectroscopy, ScanSettings, SpmFrame,
    SpmFrameMeta, SpmInstrument, SpmMode,
};
use std::path::{Path, PathBuf};

/// Start of the `reason` of every [`PhysicsError::Refused`] the replay driver makes.
pub const REPLAY_PREFIX: &str = "replay: ";

/// How a recording is served ([`ReplaySpm::open`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOptions {
    /// Serve a channel recorded only in retrace also under its trace name (module docs).
    /// Default true.
    pub retrace_as_trace: bool,
    /// Serve waveforms that turn inside the recorded bias range (minor loops) from the major
    /// loop's branches instead of refusing them (module docs). Default false.
    pub allow_minor_loops: bool,
    /// Time per waveform point of a loop, s (the clock's advance; NSID does not record it).
    /// Default 5 ms, the simulator's.
    pub spectroscopy_point_time: f64,
    /// Feedback gains `(P, I in 1/s)` at open and at every new episode. Default `(0.1, 300)`,
    /// the simulator's.
    pub initial_gains: (f64, f64),
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            retrace_as_trace: true,
            allow_minor_loops: false,
            spectroscopy_point_time: 5e-3,
            initial_gains: (0.1, 300.0),
        }
    }
}

/// One recorded axis on a uniform grid, in lab coordinates (m).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridAxis {
    /// Lab coordinate of index 0, m.
    pub first: f64,
    /// Signed spacing, m (negative when the file's coordinates decrease).
    pub step: f64,
    /// Number of points.
    pub n: usize,
}

impl GridAxis {
    /// The axis of recorded coordinates `values` (m), centred: its lab origin is the midpoint
    /// of the first and last values. `Err` names the problem (fewer than 2 points, not
    /// strictly monotone and uniform within 0.1 % of the step).
    pub fn centred(values: &[f64]) -> Result<Self, String> {
        let n = values.len();
        if n < 2 {
            return Err(format!("needs at least 2 coordinates, got {n}"));
        }
        let step = (values[n - 1] - values[0]) / (n - 1) as f64;
        if !(step.abs() > 0.0 && step.is_finite()) {
            return Err("coordinates do not change along the axis".into());
        }
        for (k, w) in values.windows(2).enumerate() {
            if ((w[1] - w[0]) - step).abs() > 1e-3 * step.abs() {
                return Err(format!(
                    "not uniformly spaced: step {k} is {:e}, the mean step {step:e}",
                    w[1] - w[0]
                ));
            }
        }
        let mid = 0.5 * (values[0] + values[n - 1]);
        Ok(Self {
            first: values[0] - mid,
            step,
            n,
        })
    }

    /// Fractional index of lab coordinate `x`.
    pub fn index(&self, x: f64) -> f64 {
        (x - self.first) / self.step
    }

    /// The lab range covered: the outermost pixel centres plus half a step, `[lo, hi]`.
    pub fn cover(&self) -> [f64; 2] {
        let a = self.first - 0.5 * self.step;
        let b = self.first + (self.n as f64 - 0.5) * self.step;
        [a.min(b), a.max(b)]
    }

    /// Whether lab coordinate `x` is within [`Self::cover`] (to 1 ppm of a step).
    pub fn covers(&self, x: f64) -> bool {
        let u = self.index(x);
        let tol = 1e-6;
        u.is_finite() && u >= -0.5 - tol && u <= self.n as f64 - 0.5 + tol
    }

    /// The nearest recorded index to `x` (clamped to the axis).
    pub fn nearest(&self, x: f64) -> usize {
        let u = self.index(x).round();
        if u.is_nan() || u <= 0.0 {
            0
        } else {
            (u as usize).min(self.n - 1)
        }
    }
}

/// Bilinear sample of the `ny × nx` image `img` (row-major, row = y) at fractional column `u`
/// and row `v`, each clamped to the outermost pixel centres.
pub fn bilinear(img: &[f64], nx: usize, ny: usize, u: f64, v: f64) -> f64 {
    let u = u.clamp(0.0, (nx - 1) as f64);
    let v = v.clamp(0.0, (ny - 1) as f64);
    let (i0, j0) = (v.floor() as usize, u.floor() as usize);
    let (i1, j1) = ((i0 + 1).min(ny - 1), (j0 + 1).min(nx - 1));
    let (fv, fu) = (v - i0 as f64, u - j0 as f64);
    let at = |i: usize, j: usize| img[i * nx + j];
    let top = at(i0, j0) * (1.0 - fu) + at(i0, j1) * fu;
    let bottom = at(i1, j0) * (1.0 - fu) + at(i1, j1) * fu;
    top * (1.0 - fv) + bottom * fv
}

/// The sweep direction of a waveform point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    /// The bias rises into this point.
    Rising,
    /// The bias falls into this point.
    Falling,
}

/// A recorded bias sweep split into monotone segments, for serving a loop at other biases.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    bias: Vec<f64>,
    /// `(from, to)` recorded indices of each segment, in sweep order, with its direction.
    segments: Vec<(usize, usize, Branch)>,
    lo: f64,
    hi: f64,
    /// Largest step of the recorded sweep, V.
    max_step: f64,
}

impl Sweep {
    /// The sweep `bias` (V) as recorded. The segment from the last point back to the first
    /// closes the cycle when it is no longer than the largest recorded step.
    pub fn new(bias: &[f64]) -> Result<Self, String> {
        if bias.len() < 2 {
            return Err(format!("needs at least 2 bias points, got {}", bias.len()));
        }
        let n = bias.len();
        let max_step = bias
            .windows(2)
            .map(|w| (w[1] - w[0]).abs())
            .fold(0.0, f64::max);
        let mut pairs: Vec<(usize, usize)> = (0..n - 1).map(|k| (k, k + 1)).collect();
        if (bias[0] - bias[n - 1]).abs() <= max_step * (1.0 + 1e-9) {
            pairs.push((n - 1, 0));
        }
        let segments = pairs
            .into_iter()
            .filter_map(|(a, b)| {
                let d = bias[b] - bias[a];
                if d > 0.0 {
                    Some((a, b, Branch::Rising))
                } else if d < 0.0 {
                    Some((a, b, Branch::Falling))
                } else {
                    None
                }
            })
            .collect();
        let (lo, hi) = bias
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        Ok(Self {
            bias: bias.to_vec(),
            segments,
            lo,
            hi,
            max_step,
        })
    }

    /// The recorded bias range `[lo, hi]`, V.
    pub fn range(&self) -> [f64; 2] {
        [self.lo, self.hi]
    }

    /// Where bias `v` on branch `dir` lies on the recorded sweep: `(from, to, t)`, the value
    /// being `(1 − t)·r[from] + t·r[to]`. `None` when no segment of that direction spans `v`.
    pub fn locate(&self, v: f64, dir: Branch) -> Option<(usize, usize, f64)> {
        let tol = 1e-9 * self.lo.abs().max(self.hi.abs()).max(1e-3);
        self.segments
            .iter()
            .filter(|s| s.2 == dir)
            .find_map(|&(a, b, _)| {
                let (va, vb) = (self.bias[a], self.bias[b]);
                let (lo, hi) = (va.min(vb), va.max(vb));
                (v >= lo - tol && v <= hi + tol)
                    .then(|| (a, b, ((v - va) / (vb - va)).clamp(0.0, 1.0)))
            })
    }

    /// The direction of each point of `waveform` when the DC bias before it is `start`: the
    /// sign of the step into it, a repeated bias keeping its predecessor's, leading repeats
    /// taking the first change's. `Err` when the waveform never leaves `start`.
    pub fn directions(waveform: &[f64], start: f64) -> Result<Vec<Branch>, String> {
        let mut out: Vec<Option<Branch>> = Vec::with_capacity(waveform.len());
        let mut prev = start;
        let mut cur = None;
        for &v in waveform {
            if v > prev {
                cur = Some(Branch::Rising);
            } else if v < prev {
                cur = Some(Branch::Falling);
            }
            out.push(cur);
            prev = v;
        }
        let first = out.iter().flatten().next().copied().ok_or_else(|| {
            format!(
                "the waveform never leaves the DC bias {start} V, so it selects no branch of \
                 the recorded loop"
            )
        })?;
        Ok(out.into_iter().map(|d| d.unwrap_or(first)).collect())
    }

    /// Checks that every turn of `waveform` (directions `dirs`) is at a recorded extreme,
    /// within one step (the recording's or the waveform's at the turn, whichever larger).
    /// `Err` names the first turn inside the range.
    pub fn check_turns(&self, waveform: &[f64], dirs: &[Branch]) -> Result<(), String> {
        for k in 1..waveform.len().min(dirs.len()) {
            if dirs[k] == dirs[k - 1] {
                continue;
            }
            let turn = waveform[k - 1];
            let before = if k >= 2 {
                (waveform[k - 1] - waveform[k - 2]).abs()
            } else {
                0.0
            };
            let tol = self.max_step.max(before).max((waveform[k] - turn).abs()) * (1.0 + 1e-9);
            let (extreme, ok) = match dirs[k - 1] {
                Branch::Rising => (self.hi, turn >= self.hi - tol),
                Branch::Falling => (self.lo, turn <= self.lo + tol),
            };
            if !ok {
                return Err(format!(
                    "the waveform turns at {turn} V (point {}), inside the recorded sweep's \
                     range [{} V, {} V]: a minor loop, which the recording (its major loop, \
                     turning at {extreme} V) cannot serve",
                    k - 1,
                    self.lo,
                    self.hi
                ));
            }
        }
        Ok(())
    }
}

/// How a served channel is made from a recorded image after resampling.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Derive {
    /// `scale · v − offset`.
    Linear { scale: f64, offset: f64 },
    /// 0° where `v ≥ centre`, else 180°.
    PhaseOf { centre: f64 },
    /// `|v − centre|`.
    AmplitudeOf { centre: f64 },
}

impl Derive {
    fn apply(self, v: f64) -> f64 {
        match self {
            Self::Linear { scale, offset } => scale * v - offset,
            Self::PhaseOf { centre } => {
                if v >= centre {
                    0.0
                } else {
                    180.0
                }
            }
            Self::AmplitudeOf { centre } => (v - centre).abs(),
        }
    }
}

/// A channel as served: name, units, what it is, and where it comes from.
#[derive(Debug, Clone, PartialEq)]
struct Served {
    name: String,
    units: String,
    quantity: String,
    image: usize,
    derive: Derive,
}

/// The images frames are made from.
#[derive(Debug, Clone)]
struct Scan {
    x: GridAxis,
    y: GridAxis,
    /// Recorded images, `ny × nx` row-major (row = y).
    images: Vec<Vec<f64>>,
    served: Vec<Served>,
}

/// The recorded loops.
#[derive(Debug, Clone)]
struct Loops {
    x: GridAxis,
    y: GridAxis,
    rec: RecordedLoops,
    sweep: Sweep,
}

/// Factor to metres of a length unit, `None` if `units` is not a length.
fn length_scale(units: &str) -> Option<f64> {
    match units.trim() {
        "m" => Some(1.0),
        "mm" => Some(1e-3),
        "um" | "µm" | "μm" => Some(1e-6),
        "nm" => Some(1e-9),
        "pm" => Some(1e-12),
        "Å" | "A" | "angstrom" => Some(1e-10),
        _ => None,
    }
}

/// SI units of a channel (lengths in m, angles in deg) and the factor to them.
fn si_units(units: &str) -> (String, f64) {
    if let Some(s) = length_scale(units) {
        return ("m".into(), s);
    }
    match units.trim() {
        "deg" | "degree" | "degrees" | "°" => ("deg".into(), 1.0),
        "rad" | "radian" | "radians" => ("deg".into(), 180.0 / std::f64::consts::PI),
        "V" => ("V".into(), 1.0),
        "mV" => ("V".into(), 1e-3),
        other => (other.to_owned(), 1.0),
    }
}

/// The simulator's channel name for a recorded `quantity`: `(base, retrace)`.
fn channel_name(quantity: &str) -> (String, bool) {
    let q: String = quantity
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect();
    let (base, retrace) = if let Some(b) = q.strip_suffix("retrace") {
        (b.to_owned(), true)
    } else if let Some(b) = q.strip_suffix("trace") {
        (b.to_owned(), false)
    } else {
        (q, false)
    };
    let base = if base.is_empty() {
        "channel".to_owned()
    } else {
        base
    };
    (base, retrace)
}

fn suffixed(base: &str, retrace: bool) -> String {
    if retrace {
        format!("{base}_retrace")
    } else {
        base.to_owned()
    }
}

/// Where a served channel sorts: the simulator's order first.
fn rank(name: &str) -> usize {
    ["phase", "amplitude", "height", "height_retrace", "error"]
        .iter()
        .position(|n| *n == name)
        .unwrap_or(5)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn recording_error(file: &str, object: &str, reason: impl Into<String>) -> DriverError {
    DriverError::Recording {
        file: file.into(),
        object: object.into(),
        reason: reason.into(),
    }
}

/// The spatial axes `(x, y)` of a dataset: the one named `x` (any case) is x, else the first.
fn xy_axes(d: &MainDataset) -> (usize, usize) {
    let sp = d.axes_of(DimensionType::Spatial);
    if d.axes[sp[1]].name.eq_ignore_ascii_case("x") {
        (sp[1], sp[0])
    } else {
        (sp[0], sp[1])
    }
}

fn refused(operation: &str, reason: String) -> PhysicsError {
    PhysicsError::Refused {
        operation: operation.into(),
        reason: format!("{REPLAY_PREFIX}{reason}"),
    }
}

/// An SPM answering from a recording (module docs).
#[derive(Debug, Clone)]
pub struct ReplaySpm {
    file: PathBuf,
    opts: ReplayOptions,
    scan: Scan,
    loops: Option<Loops>,
    notes: Vec<String>,
    mode: SpmMode,
    default_settings: ScanSettings,
    settings: ScanSettings,
    channels: Vec<Channel>,
    clock: f64,
    frames: u64,
    probe: [f64; 2],
    bias: f64,
    gains: (f64, f64),
    withdrawn: bool,
}

impl ReplaySpm {
    /// Opens the NSID HDF5 recording at `path` and decides what it serves (module docs):
    /// frames from its images, or from its loops when it has no images, and loops when it has
    /// a BEPS map. Errors ([`DriverError::Recording`]) name the file and the dataset or
    /// attribute that is missing or malformed, or say that nothing servable was found;
    /// [`DriverError::InvalidOptions`] names a bad option.
    pub fn open(path: impl AsRef<Path>, options: ReplayOptions) -> Result<Self, DriverError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let t = options.spectroscopy_point_time;
        if !(t.is_finite() && t > 0.0 && t <= 10.0) {
            return Err(DriverError::InvalidOptions {
                field: "spectroscopy_point_time".into(),
                reason: format!("must be in (0, 10] s, got {t}"),
            });
        }
        let (p, i) = options.initial_gains;
        if !(p.is_finite() && p >= 0.0 && i.is_finite() && i >= 0.0) {
            return Err(DriverError::InvalidOptions {
                field: "initial_gains".into(),
                reason: format!("must be finite and ≥ 0, got ({p}, {i})"),
            });
        }
        let sets = nsid::read_main_datasets(path)?;
        let mut notes = Vec::new();
        let loops = match sets.iter().find(|d| RecordedLoops::is_beps(d)) {
            Some(d) => Some(Self::read_loops(d, &file)?),
            None => None,
        };
        let images: Vec<&MainDataset> = sets
            .iter()
            .filter(|d| d.shape.len() == 2 && d.axes_of(DimensionType::Spatial).len() == 2)
            .collect();
        let scan = if !images.is_empty() {
            Self::read_images(&images, &file, &options, &mut notes)?
        } else if let Some(l) = &loops {
            notes.push(format!(
                "{file}: no recorded image; frames show the as-grown response (the first \
                 point of each loop of `{}`)",
                sets.iter()
                    .find(|d| RecordedLoops::is_beps(d))
                    .map_or("", |d| d.path.as_str())
            ));
            Self::images_from_loops(l)
        } else {
            return Err(recording_error(
                &file,
                "",
                format!(
                    "nothing to serve: no image (2 spatial axes) and no BEPS map (2 spatial \
                     axes and a spectral axis in V) among {}",
                    sets.iter()
                        .map(|d| format!("`{}` {:?}", d.path, d.shape))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        let has = |n: &str| scan.served.iter().any(|s| s.name == n);
        let mode = if loops.is_some() || (has("phase") && has("amplitude")) {
            SpmMode::Pfm
        } else {
            SpmMode::Afm
        };
        let px = scan.x.step.abs().max(scan.y.step.abs());
        let cols = ((scan.x.n as f64 - 1.0) * scan.x.step.abs() / px).floor() as usize + 1;
        let rows = ((scan.y.n as f64 - 1.0) * scan.y.step.abs() / px).floor() as usize + 1;
        let default_settings = ScanSettings {
            rows: rows.max(2),
            cols: cols.max(2),
            pixel_size: px,
            // One line (trace and retrace) per second.
            dwell_time: 0.5 / cols.max(2) as f64,
            flyback_time: 0.0,
            center: [0.0, 0.0],
        };
        Ok(Self {
            file: path.to_path_buf(),
            scan,
            loops,
            notes,
            mode,
            default_settings,
            settings: default_settings,
            channels: Vec::new(),
            clock: 0.0,
            frames: 0,
            probe: [0.0, 0.0],
            bias: 0.0,
            gains: options.initial_gains,
            withdrawn: false,
            opts: options,
        })
    }

    fn read_loops(d: &MainDataset, file: &str) -> Result<Loops, DriverError> {
        let rec = RecordedLoops::from_dataset(d).map_err(|e| recording_error(file, &d.path, e))?;
        let (ax, ay) = xy_axes(d);
        let axis = |k: usize| -> Result<GridAxis, DriverError> {
            let a = &d.axes[k];
            let s = length_scale(&a.units).ok_or_else(|| {
                recording_error(
                    file,
                    &format!("{}@units", a.path),
                    format!("a spatial axis needs a length unit, got `{}`", a.units),
                )
            })?;
            let v: Vec<f64> = a.values.iter().map(|x| x * s).collect();
            GridAxis::centred(&v).map_err(|e| recording_error(file, &a.path, e))
        };
        let (x, y) = (axis(ax)?, axis(ay)?);
        let sweep = Sweep::new(&rec.bias).map_err(|e| {
            recording_error(file, &d.axes[d.axes_of(DimensionType::Spectral)[0]].path, e)
        })?;
        Ok(Loops { x, y, rec, sweep })
    }

    fn images_from_loops(l: &Loops) -> Scan {
        let [nx, ny] = l.rec.shape;
        let mut img = vec![0.0; nx * ny];
        for iy in 0..ny {
            for ix in 0..nx {
                img[iy * nx + ix] = l.rec.loop_at(ix, iy)[0];
            }
        }
        let c = l.rec.centre;
        let v0 = l.rec.bias[0];
        let served = vec![
            Served {
                name: "phase".into(),
                units: "deg".into(),
                quantity: format!(
                    "PFM phase of the as-grown state: 0° where the response at {v0} V (first \
                     sweep point) is at or above the loops' centre {c:e}, else 180°"
                ),
                image: 0,
                derive: Derive::PhaseOf { centre: c },
            },
            Served {
                name: "amplitude".into(),
                units: "a.u.".into(),
                quantity: format!(
                    "PFM amplitude of the as-grown state: |response at {v0} V − {c:e}|"
                ),
                image: 0,
                derive: Derive::AmplitudeOf { centre: c },
            },
            Served {
                name: "response".into(),
                units: "a.u.".into(),
                quantity: format!("recorded piezoresponse at the first sweep point ({v0} V)"),
                image: 0,
                derive: Derive::Linear {
                    scale: 1.0,
                    offset: 0.0,
                },
            },
        ];
        Scan {
            x: l.x,
            y: l.y,
            images: vec![img],
            served,
        }
    }

    fn read_images(
        images: &[&MainDataset],
        file: &str,
        opts: &ReplayOptions,
        notes: &mut Vec<String>,
    ) -> Result<Scan, DriverError> {
        // The reference grid: the first image whose spatial axes are both lengths.
        let reference = images
            .iter()
            .find(|d| {
                let (ax, ay) = xy_axes(d);
                length_scale(&d.axes[ax].units).is_some()
                    && length_scale(&d.axes[ay].units).is_some()
            })
            .ok_or_else(|| {
                let a = &images[0].axes[xy_axes(images[0]).0];
                recording_error(
                    file,
                    &format!("{}@units", a.path),
                    format!(
                        "no image has spatial axes in a length unit (this one is `{}`)",
                        a.units
                    ),
                )
            })?;
        let (rx, ry) = xy_axes(reference);
        let ref_axes = [&reference.axes[rx], &reference.axes[ry]];
        let metres = |k: usize| -> Vec<f64> {
            let a = ref_axes[k];
            let s = length_scale(&a.units).unwrap_or(1.0);
            a.values.iter().map(|v| v * s).collect()
        };
        let x = GridAxis::centred(&metres(0))
            .map_err(|e| recording_error(file, &ref_axes[0].path, e))?;
        let y = GridAxis::centred(&metres(1))
            .map_err(|e| recording_error(file, &ref_axes[1].path, e))?;
        let (nx, ny) = (x.n, y.n);
        let mut out_images = Vec::new();
        let mut recorded: Vec<(String, bool, String, String, usize, f64)> = Vec::new();
        for d in images {
            let (ax, ay) = xy_axes(d);
            for (k, a) in [&d.axes[ax], &d.axes[ay]].into_iter().enumerate() {
                let r = ref_axes[k];
                let same = |p: &[f64], q: &[f64]| {
                    let span = (q[q.len() - 1] - q[0]).abs().max(1e-300);
                    p.len() == q.len() && p.iter().zip(q).all(|(u, v)| (u - v).abs() <= 1e-6 * span)
                };
                match length_scale(&a.units) {
                    Some(s) => {
                        let v: Vec<f64> = a.values.iter().map(|x| x * s).collect();
                        if !same(&v, &metres(k)) {
                            return Err(recording_error(
                                file,
                                &a.path,
                                format!(
                                    "the image's {} axis differs from `{}`'s: every image must \
                                     share one grid",
                                    ["x", "y"][k],
                                    r.path
                                ),
                            ));
                        }
                    }
                    None if same(&a.values, &r.values) => notes.push(format!(
                        "{file}: `{}` is labelled `{}` but has the coordinates of `{}` ({}): \
                         read as {}",
                        a.path, a.units, r.path, r.units, r.units
                    )),
                    None => {
                        return Err(recording_error(
                            file,
                            &format!("{}@units", a.path),
                            format!(
                                "a spatial axis needs a length unit, got `{}` (and its \
                                 coordinates differ from `{}`'s)",
                                a.units, r.path
                            ),
                        ));
                    }
                }
            }
            // Reorder to ny × nx, row = y.
            let sx = if ax == 0 { d.shape[1] } else { 1 };
            let sy = if ay == 0 { d.shape[1] } else { 1 };
            let mut img = vec![0.0; nx * ny];
            for iy in 0..ny {
                for ix in 0..nx {
                    img[iy * nx + ix] = d.data[ix * sx + iy * sy];
                }
            }
            let (units, scale) = si_units(&d.units);
            let (base, retrace) = channel_name(&d.quantity);
            recorded.push((
                base,
                retrace,
                units,
                d.quantity.clone(),
                out_images.len(),
                scale,
            ));
            out_images.push(img);
        }
        let mut served: Vec<Served> = Vec::new();
        for (base, retrace, units, quantity, image, scale) in &recorded {
            let linear = Derive::Linear {
                scale: *scale,
                offset: 0.0,
            };
            served.push(Served {
                name: suffixed(base, *retrace),
                units: units.clone(),
                quantity: format!("{quantity} (recorded)"),
                image: *image,
                derive: linear,
            });
            if base == "deflection" {
                let offset = scale * median(&out_images[*image]);
                served.push(Served {
                    name: suffixed("error", *retrace),
                    units: units.clone(),
                    quantity: format!(
                        "feedback error: {quantity} minus its median over the recording \
                         ({offset:e} {units})"
                    ),
                    image: *image,
                    derive: Derive::Linear {
                        scale: *scale,
                        offset,
                    },
                });
            }
        }
        if opts.retrace_as_trace {
            let aliases: Vec<Served> = served
                .iter()
                .filter_map(|s| {
                    let base = s.name.strip_suffix("_retrace")?;
                    (!served.iter().any(|t| t.name == base)).then(|| Served {
                        name: base.to_owned(),
                        quantity: format!(
                            "{} (retrace served as trace: no trace recorded)",
                            s.quantity
                        ),
                        ..s.clone()
                    })
                })
                .collect();
            served.extend(aliases);
        }
        served.sort_by_key(|s| rank(&s.name));
        Ok(Scan {
            x,
            y,
            images: out_images,
            served,
        })
    }

    /// The recording's path.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// Whether loops are served ([`PointSpectroscopy`]); frames always are.
    pub fn serves_spectroscopy(&self) -> bool {
        self.loops.is_some()
    }

    /// The names of the channels a frame holds, main channel first.
    pub fn channel_names(&self) -> Vec<&str> {
        self.scan.served.iter().map(|s| s.name.as_str()).collect()
    }

    /// The lab area frames can cover, `[[x_lo, x_hi], [y_lo, y_hi]]` (m): the recorded pixel
    /// centres plus half a pixel.
    pub fn frame_extent(&self) -> [[f64; 2]; 2] {
        [self.scan.x.cover(), self.scan.y.cover()]
    }

    /// The recorded image's grid `(x, y)` (lab coordinates).
    pub fn frame_grid(&self) -> (GridAxis, GridAxis) {
        (self.scan.x, self.scan.y)
    }

    /// The lab area loops can be measured in (m), as [`Self::frame_extent`]; `None` without
    /// loops.
    pub fn loop_extent(&self) -> Option<[[f64; 2]; 2]> {
        self.loops.as_ref().map(|l| [l.x.cover(), l.y.cover()])
    }

    /// The loop grid `(x, y)` (lab coordinates); `None` without loops.
    pub fn loop_grid(&self) -> Option<(GridAxis, GridAxis)> {
        self.loops.as_ref().map(|l| (l.x, l.y))
    }

    /// The recorded loops (bias sweep, responses, robust span and centre); `None` without.
    pub fn recorded_loops(&self) -> Option<&RecordedLoops> {
        self.loops.as_ref().map(|l| &l.rec)
    }

    /// What was tolerated or derived while reading the file (axis-label slips, derived frames).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The scan settings at open and at every new episode: the whole recording at its pixel
    /// size, one line per second.
    pub fn default_scan(&self) -> ScanSettings {
        self.default_settings
    }

    /// The options in force.
    pub fn options(&self) -> &ReplayOptions {
        &self.opts
    }

    fn engaged(&self, op: &str) -> Result<(), PhysicsError> {
        if self.withdrawn {
            return Err(PhysicsError::Refused {
                operation: op.into(),
                reason: "the tip is withdrawn".into(),
            });
        }
        Ok(())
    }

    fn check_position(&self, name: &str, p: [f64; 2]) -> Result<(), PhysicsError> {
        if !p.iter().all(|v| v.is_finite()) {
            return Err(PhysicsError::arg(
                name,
                format!("must be finite, got {p:?}"),
            ));
        }
        Ok(())
    }

    fn outside(&self, what: &str, req: [[f64; 2]; 2], cover: [[f64; 2]; 2]) -> String {
        format!(
            "{what} spans x [{:e}, {:e}] m, y [{:e}, {:e}] m; the recording {} covers x [{:e}, \
             {:e}] m, y [{:e}, {:e}] m (lab coordinates, origin at the recording's centre)",
            req[0][0],
            req[0][1],
            req[1][0],
            req[1][1],
            self.file.display(),
            cover[0][0],
            cover[0][1],
            cover[1][0],
            cover[1][1]
        )
    }
}

impl SpmInstrument for ReplaySpm {
    fn info(&self) -> InstrumentInfo {
        InstrumentInfo {
            name: format!("scopegym replay of {}", self.file.display()),
            kind: InstrumentKind::Spm,
            simulated: false,
        }
    }

    fn mode(&self) -> SpmMode {
        self.mode
    }

    fn clock(&self) -> f64 {
        self.clock
    }

    fn scan_settings(&self) -> ScanSettings {
        self.settings
    }

    fn configure_scan(&mut self, r: &ScanSettings) -> Result<ScanSettings, PhysicsError> {
        r.check_spm_request()?;
        self.check_position("center", r.center)?;
        let half = |n: usize| 0.5 * (n as f64 - 1.0) * r.pixel_size;
        let req = [
            [r.center[0] - half(r.cols), r.center[0] + half(r.cols)],
            [r.center[1] - half(r.rows), r.center[1] + half(r.rows)],
        ];
        let (gx, gy) = (self.scan.x, self.scan.y);
        if !(req[0].iter().all(|&v| gx.covers(v)) && req[1].iter().all(|&v| gy.covers(v))) {
            return Err(refused(
                "configure_scan",
                self.outside(
                    "the requested frame's pixel centres",
                    req,
                    self.frame_extent(),
                ),
            ));
        }
        self.settings = *r;
        Ok(*r)
    }

    fn acquire_frame(&mut self) -> Result<SpmFrame<'_>, PhysicsError> {
        self.engaged("acquire_frame")?;
        let s = self.settings;
        let (rows, cols) = (s.rows, s.cols);
        let sc = &self.scan;
        let (nx, ny) = (sc.x.n, sc.y.n);
        // Fractional recorded indices of each column and row.
        let us: Vec<f64> = (0..cols)
            .map(|j| {
                sc.x.index(s.center[0] + (j as f64 - 0.5 * (cols as f64 - 1.0)) * s.pixel_size)
            })
            .collect();
        let vs: Vec<f64> = (0..rows)
            .map(|i| {
                sc.y.index(s.center[1] + (i as f64 - 0.5 * (rows as f64 - 1.0)) * s.pixel_size)
            })
            .collect();
        let fresh = self.channels.len() != sc.served.len()
            || self
                .channels
                .iter()
                .zip(&sc.served)
                .any(|(c, d)| c.name != d.name || c.image.dim() != (rows, cols));
        if fresh {
            self.channels = sc
                .served
                .iter()
                .map(|d| Channel {
                    name: d.name.clone(),
                    units: d.units.clone(),
                    quantity: d.quantity.clone(),
                    image: Array2::zeros((rows, cols)),
                })
                .collect();
        }
        for (ch, d) in self.channels.iter_mut().zip(&sc.served) {
            let img = &sc.images[d.image];
            for (i, &v) in vs.iter().enumerate() {
                for (j, &u) in us.iter().enumerate() {
                    ch.image[[i, j]] = d.derive.apply(bilinear(img, nx, ny, u, v)) as f32;
                }
            }
        }
        let t_start = self.clock;
        let duration = rows as f64 * (2.0 * cols as f64 * s.dwell_time + s.flyback_time);
        self.clock += duration;
        let meta = SpmFrameMeta {
            index: self.frames,
            t_start,
            duration,
        };
        self.frames += 1;
        Ok(SpmFrame {
            channels: &self.channels,
            meta,
        })
    }

    fn probe_position(&self) -> [f64; 2] {
        self.probe
    }

    fn move_probe(&mut self, position: [f64; 2]) -> Result<(), PhysicsError> {
        self.check_position("position", position)?;
        let mut cover = self.frame_extent();
        if let Some(l) = self.loop_extent() {
            for k in 0..2 {
                cover[k] = [cover[k][0].min(l[k][0]), cover[k][1].max(l[k][1])];
            }
        }
        if !(0..2).all(|k| position[k] >= cover[k][0] && position[k] <= cover[k][1]) {
            let p = [[position[0]; 2], [position[1]; 2]];
            return Err(refused(
                "move_probe",
                self.outside("the requested position", p, cover),
            ));
        }
        self.probe = position;
        Ok(())
    }

    fn bias(&self) -> f64 {
        self.bias
    }

    fn set_bias(&mut self, bias: f64) -> Result<f64, PhysicsError> {
        if !bias.is_finite() {
            return Err(PhysicsError::arg(
                "bias",
                format!("must be finite, got {bias}"),
            ));
        }
        self.bias = bias;
        Ok(bias)
    }

    fn feedback_gains(&self) -> (f64, f64) {
        self.gains
    }

    fn set_feedback_gains(&mut self, p_gain: f64, i_gain: f64) -> Result<(f64, f64), PhysicsError> {
        if !(p_gain.is_finite() && p_gain >= 0.0 && i_gain.is_finite() && i_gain >= 0.0) {
            return Err(PhysicsError::arg(
                "gains",
                format!("must be finite and ≥ 0, got ({p_gain}, {i_gain})"),
            ));
        }
        self.gains = (p_gain, i_gain);
        Ok(self.gains)
    }

    fn is_withdrawn(&self) -> bool {
        self.withdrawn
    }

    fn set_withdrawn(&mut self, withdrawn: bool) -> Result<(), PhysicsError> {
        self.withdrawn = withdrawn;
        Ok(())
    }
}

impl PointSpectroscopy for ReplaySpm {
    fn point_spectroscopy(
        &mut self,
        position: [f64; 2],
        waveform: &[f64],
    ) -> Result<Vec<f64>, PhysicsError> {
        const OP: &str = "point_spectroscopy";
        self.engaged(OP)?;
        self.check_position("position", position)?;
        if waveform.is_empty() || waveform.len() > 100_000 {
            return Err(PhysicsError::arg(
                "waveform",
                format!("needs 1..=100000 points, got {}", waveform.len()),
            ));
        }
        if let Some(k) = waveform.iter().position(|v| !v.is_finite()) {
            return Err(PhysicsError::arg(
                "waveform",
                format!("point {k} is {}, must be finite", waveform[k]),
            ));
        }
        let Some(l) = &self.loops else {
            return Err(refused(
                OP,
                format!(
                    "the recording {} holds no spectroscopy (no main dataset with two spatial \
                     axes and a spectral axis in V)",
                    self.file.display()
                ),
            ));
        };
        if !(l.x.covers(position[0]) && l.y.covers(position[1])) {
            let p = [[position[0]; 2], [position[1]; 2]];
            let cover = [l.x.cover(), l.y.cover()];
            return Err(refused(
                OP,
                self.outside("the requested position", p, cover),
            ));
        }
        let [lo, hi] = l.sweep.range();
        let tol = 1e-9 * lo.abs().max(hi.abs()).max(1e-3);
        if let Some(k) = waveform.iter().position(|&v| v < lo - tol || v > hi + tol) {
            return Err(refused(
                OP,
                format!(
                    "bias {} V at waveform point {k} is outside the recorded sweep [{lo} V, \
                     {hi} V] of {}",
                    waveform[k],
                    self.file.display()
                ),
            ));
        }
        let dirs = Sweep::directions(waveform, self.bias).map_err(|e| refused(OP, e))?;
        if !self.opts.allow_minor_loops {
            l.sweep
                .check_turns(waveform, &dirs)
                .map_err(|e| refused(OP, e))?;
        }
        let r = l
            .rec
            .loop_at(l.x.nearest(position[0]), l.y.nearest(position[1]));
        let mut out = Vec::with_capacity(waveform.len());
        for (k, (&v, &d)) in waveform.iter().zip(&dirs).enumerate() {
            let (a, b, t) = l.sweep.locate(v, d).ok_or_else(|| {
                refused(
                    OP,
                    format!(
                        "no {} branch of the recorded sweep spans {v} V (waveform point {k})",
                        match d {
                            Branch::Rising => "rising",
                            Branch::Falling => "falling",
                        }
                    ),
                )
            })?;
            out.push((1.0 - t) * r[a] + t * r[b]);
        }
        self.probe = position;
        self.clock += waveform.len() as f64 * self.opts.spectroscopy_point_time;
        Ok(out)
    }
}

impl NewEpisode for ReplaySpm {
    /// A new episode on the same recording: clock, frame count, scan settings, probe, DC bias
    /// and gains back to their values at open, tip engaged. Records `info["real_data"] = true`
    /// and `info["replay_file"]`.
    fn new_episode(&mut self, _seed: u64, info: &mut Info) -> scopegym_envs::Result<()> {
        self.clock = 0.0;
        self.frames = 0;
        self.settings = self.default_settings;
        self.probe = [0.0, 0.0];
        self.bias = 0.0;
        self.gains = self.opts.initial_gains;
        self.withdrawn = false;
        info.insert("real_data".into(), InfoValue::Bool(true));
        info.insert(
            "replay_file".into(),
            InfoValue::Str(self.file.display().to_string()),
        );
        Ok(())
    }
}

/// Loop ground truth is unknown for a recording.
impl scopegym_envs::tasks::pfm_spectroscopy_explore::LoopTruth for ReplaySpm {}

/// The feedback loop's gain is unknown for a recording.
impl scopegym_envs::tasks::afm_feedback_tuning::LoopTruth for ReplaySpm {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_axis_centres_and_covers() {
        // 5 points 0..4 µm: centre 2 µm, lab -2..2 µm, cover ±2.5 µm.
        let a = GridAxis::centred(&[0.0, 1e-6, 2e-6, 3e-6, 4e-6]).unwrap();
        assert!((a.first + 2e-6).abs() < 1e-18 && (a.step - 1e-6).abs() < 1e-18);
        let c = a.cover();
        assert!(
            (c[0] + 2.5e-6).abs() < 1e-18 && (c[1] - 2.5e-6).abs() < 1e-18,
            "{c:?}"
        );
        assert!(a.covers(2.5e-6) && a.covers(-2.5e-6) && !a.covers(2.51e-6));
        assert!((a.index(0.0) - 2.0).abs() < 1e-12);
        assert_eq!(a.nearest(0.4e-6), 2);
        assert_eq!(a.nearest(0.6e-6), 3);
        assert_eq!(a.nearest(-9.0), 0);
        assert_eq!(a.nearest(9.0), 4);
        // Decreasing coordinates: index 0 is at +2 µm.
        let d = GridAxis::centred(&[4e-6, 3e-6, 2e-6, 1e-6, 0.0]).unwrap();
        assert!((d.index(2e-6) - 0.0).abs() < 1e-12);
        assert!(GridAxis::centred(&[0.0, 1.0, 3.0]).is_err());
        assert!(GridAxis::centred(&[1.0]).is_err());
    }

    #[test]
    fn bilinear_by_hand() {
        // 3 × 2 image (ny = 2 rows, nx = 3 columns):
        //   row 0: 0 1 2
        //   row 1: 10 11 12
        let img = [0.0, 1.0, 2.0, 10.0, 11.0, 12.0];
        assert_eq!(bilinear(&img, 3, 2, 0.0, 0.0), 0.0);
        assert_eq!(bilinear(&img, 3, 2, 2.0, 1.0), 12.0);
        // Halfway between columns 1 and 2 on row 0: 1.5; a quarter down: + 2.5.
        assert!((bilinear(&img, 3, 2, 1.5, 0.0) - 1.5).abs() < 1e-12);
        assert!((bilinear(&img, 3, 2, 1.5, 0.25) - 4.0).abs() < 1e-12);
        // Clamped within the half-pixel border.
        assert_eq!(bilinear(&img, 3, 2, -0.5, -0.5), 0.0);
        assert_eq!(bilinear(&img, 3, 2, 2.5, 1.5), 12.0);
    }

    /// The shared file's sweep: 0 → 8.5 → 0 → -8.5 → (-0.53) in 64 steps of 8.5/16 V.
    fn beps_sweep() -> Vec<f64> {
        (0..64)
            .map(|k| {
                let t = k as f64 / 16.0;
                8.5 * if t < 1.0 {
                    t
                } else if t < 3.0 {
                    2.0 - t
                } else {
                    t - 4.0
                }
            })
            .collect()
    }

    #[test]
    fn branches_of_the_recorded_sweep_by_hand() {
        let s = Sweep::new(&beps_sweep()).unwrap();
        assert_eq!(s.range(), [-8.5, 8.5]);
        // Rising through 1 V: segment 1 → 2 (0.53125 → 1.0625 V), t = (1 - 0.53125)/0.53125.
        let (a, b, t) = s.locate(1.0, Branch::Rising).unwrap();
        assert_eq!((a, b), (1, 2));
        assert!((t - 0.882_352_941_176_470_6).abs() < 1e-12);
        // Falling through 1 V: segment 30 → 31 (1.0625 → 0.53125 V), t = 0.0625/0.53125.
        let (a, b, t) = s.locate(1.0, Branch::Falling).unwrap();
        assert_eq!((a, b), (30, 31));
        assert!((t - 0.117_647_058_823_529_41).abs() < 1e-12);
        // Rising through -0.2 V: the segment closing the cycle, 63 → 0 (-0.53125 → 0 V).
        let (a, b, t) = s.locate(-0.2, Branch::Rising).unwrap();
        assert_eq!((a, b), (63, 0));
        assert!((t - (0.33125 / 0.53125)).abs() < 1e-12);
        // A recorded bias reads its recorded point exactly.
        assert_eq!(s.locate(8.5, Branch::Rising), Some((15, 16, 1.0)));
        assert_eq!(s.locate(-8.5, Branch::Falling), Some((47, 48, 1.0)));
        assert_eq!(s.locate(9.0, Branch::Rising), None);
        // An open sweep 0 → 8.5 has no falling branch.
        let open = Sweep::new(&beps_sweep()[..17]).unwrap();
        assert_eq!(open.locate(4.0, Branch::Falling), None);
    }

    #[test]
    fn directions_and_turns() {
        use Branch::{Falling as F, Rising as R};
        let d = Sweep::directions(&[0.0, 0.0, 1.0, 1.0, 0.5], 0.0).unwrap();
        assert_eq!(d, [R, R, R, R, F]);
        let d = Sweep::directions(&[-1.0, -2.0, -1.0], 0.0).unwrap();
        assert_eq!(d, [F, F, R]);
        assert!(Sweep::directions(&[0.0, 0.0], 0.0).is_err());
        let s = Sweep::new(&beps_sweep()).unwrap();
        // A triangle of the recorded amplitude turns at the extremes: fine.
        let w = [0.0, 4.25, 8.5, 4.25, 0.0, -4.25, -8.5, -4.25];
        assert!(
            s.check_turns(&w, &Sweep::directions(&w, 0.0).unwrap())
                .is_ok()
        );
        // A coarse triangle whose samples miss the peak by less than its step: fine.
        let w = [0.0, 3.0, 6.0, 8.0, 6.0];
        assert!(
            s.check_turns(&w, &Sweep::directions(&w, 0.0).unwrap())
                .is_ok()
        );
        // A 4 V minor loop: refused, naming the turn.
        let w = [0.0, 2.0, 4.0, 2.0, 0.0];
        let e = s
            .check_turns(&w, &Sweep::directions(&w, 0.0).unwrap())
            .unwrap_err();
        assert!(e.contains("turns at 4 V"), "{e}");
    }

    #[test]
    fn channel_names_follow_the_simulator() {
        assert_eq!(channel_name("HeightRetrace"), ("height".into(), true));
        assert_eq!(channel_name("Height Trace"), ("height".into(), false));
        assert_eq!(channel_name("PhaseRetrace"), ("phase".into(), true));
        assert_eq!(channel_name("Amplitude"), ("amplitude".into(), false));
        assert_eq!(channel_name("ZSensor"), ("zsensor".into(), false));
        assert_eq!(si_units("nm"), ("m".into(), 1e-9));
        assert_eq!(si_units("rad").0, "deg");
        assert_eq!(si_units("a.u."), ("a.u.".into(), 1.0));
        let mut names = [
            "error",
            "height",
            "zz",
            "phase",
            "height_retrace",
            "amplitude",
        ];
        names.sort_by_key(|n| rank(n));
        assert_eq!(
            names,
            [
                "phase",
                "amplitude",
                "height",
                "height_retrace",
                "error",
                "zz"
            ]
        );
    }
}
