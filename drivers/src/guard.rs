//! [`Guarded`]: any instrument behind configured safety limits, with dry run and audit log.
//!
//! `Guarded<I>` implements every instrument trait `I` implements ([`SpmInstrument`],
//! [`StemInstrument`] and the capability traits), so it drops in wherever `I` did, on the
//! simulator and on hardware alike. Every command (a trait method that may change the
//! instrument's state or acquire data) goes through the same steps:
//!
//! 1. [`Check::check`] (pure) against the [`Limits`] and the instrument's current state (read
//!    through its getters). A refused command is **not sent**: the call returns
//!    [`PhysicsError::Refused`] with the reason prefixed by
//!    [`REFUSAL_PREFIX`](crate::error::REFUSAL_PREFIX) (see [`crate::error`]);
//!    [`Guarded::last_refusal`] keeps it structured.
//! 2. In dry-run mode the command is not sent either (see "Dry run").
//! 3. Otherwise it is forwarded, and the outcome is written to the [`AuditLog`].
//!
//! Getters are reads: they go straight to the instrument and are not logged. `make_safe` is
//! never refused.
//!
//! # What the guard does besides refusing
//!
//! - `set_bias` ramps (SPM): steps of at most `bias_slew_max · bias_ramp_interval`, waiting
//!   `bias_ramp_interval` between steps unless the instrument is simulated.
//! - Crash/corrugation abort (SPM): after each frame, if its `height` channel spans more than
//!   `abort_corrugation`, leaves `z_range` or holds a non-finite value, the guard withdraws the
//!   tip (`make_safe`) and returns a refusal. This is the only refusal that comes after the
//!   command was sent. The abort trips the guard: every later SPM command but `make_safe` and
//!   `set_withdrawn(true)` is refused (limit `spm.tripped`) until [`Guarded::clear_trip`].
//! - Fixed sanity limits that `limits.toml` does not set: feedback gains must be finite and
//!   ≥ 0 (limit `spm.feedback_gains`); after a failed audit write only `make_safe` passes
//!   (limit `audit`).
//! - Beam blanking (STEM, `blank_outside_acquisition`): the caller's `set_blanked(false)` is
//!   remembered, not sent; the beam is unblanked just before an acquisition and blanked right
//!   after (a failure to blank is recorded in the audit line's message). `is_blanked` reports
//!   the caller's view, so the environment sees what it would see on the bare instrument, and
//!   an acquisition asked for with the beam blanked fails as on the simulator
//!   (`PhysicsError::Refused`, "the beam is blanked", not a guard refusal) without being sent,
//!   so a real instrument does not record a dark frame where the simulator fails.
//! - Dose accounting (STEM): the guard adds the dose of every acquisition it sends to its
//!   [`DoseMap`] (frames at the dose `I·t_dwell/(e·pixel²)` over the cells they touch, ignoring
//!   drift and flyback, as the simulator does; points and spectra as `I·t/e` electrons over
//!   the probe's cell) and refuses an
//!   acquisition that would take any cell over `dose_budget`. A failed acquisition counts too,
//!   unless the instrument refused it or rejected its arguments.
//!
//! Acquisitions are copied into buffers owned by the guard (so that the guard can blank the
//! beam or withdraw the tip after reading the frame); the values are unchanged.
//!
//! # Dry run
//!
//! With [`Guarded::dry_run`], commands are checked and logged (result `"dry_run"`), and none is
//! sent, `make_safe` included. Getters still read the real instrument. A skipped command
//! returns what an instrument that accepted it unchanged would return: `set_bias(b)` → `b`,
//! `configure_scan(r)` → `r`, `set_feedback_gains(p, i)` → `(p, i)`, `set_aberrations(a)` →
//! `a`; unit results → `Ok(())`; `acquire_frame` → all-zero images of the configured size
//! (SPM: the channels of the last real frame, or those the simulator records in the
//! instrument's mode: `phase` and `amplitude` in PFM, then `height`, `height_retrace` and
//! `error`) with default
//! metadata; `acquire_point` → 0; `acquire_spectrum` → an empty spectrum;
//! `point_spectroscopy` → zeros, one per waveform point; `manipulate` → an empty trace.
//!
//! # Env integration
//!
//! [`Guarded::inner_mut`] bypasses the guard (e.g. to start a simulator's episode); call
//! [`Guarded::resync`] afterwards, and [`Guarded::reset_dose`] when the specimen is new.

use crate::audit::{AuditLog, Outcome};
use crate::command::{SpmCommand, StemCommand, with_unit};
use crate::error::{DriverError, Refusal, Result};
use crate::limits::Limits;
use ndarray::Array2;
use scopegym_physics::PhysicsError;
use scopegym_physics::constants::ELEMENTARY_CHARGE;
use scopegym_physics::instrument::{
    BiasWriting, Channel, Frame, FrameMeta, InstrumentInfo, LateralManipulation, PointSpectroscopy,
    ScanSettings, Spectrum, SpmFrame, SpmFrameMeta, SpmInstrument, SpmMode, StemInstrument,
    TipConditioning,
};
use scopegym_physics::spm::tip::Conditioning;
use scopegym_physics::stem::optics::Aberrations;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

type PResult<T> = scopegym_physics::Result<T>;

/// Most dose cells one acquisition may touch (a larger frame is refused: raise `dose_cell`).
pub const MAX_DOSE_CELLS: u64 = 1 << 20;

/// Whether a command would be allowed, without sending it.
pub trait Check<C> {
    /// `Ok(())` if `command` passes every limit in the instrument's current state, else the
    /// [`DriverError::Refused`] the guard would return. Changes nothing.
    fn check(&self, command: &C) -> Result<()>;
}

/// Cumulative dose per region: a square grid of cells anchored at the lab origin, e⁻/m².
#[derive(Debug, Clone, Default)]
pub struct DoseMap {
    cell: f64,
    cells: HashMap<(i64, i64), f64>,
}

impl DoseMap {
    /// An empty map with cells of side `cell`, m.
    pub fn new(cell: f64) -> Self {
        Self {
            cell,
            cells: HashMap::new(),
        }
    }

    /// Side of a cell, m.
    pub fn cell(&self) -> f64 {
        self.cell
    }

    fn index(&self, v: f64) -> i64 {
        (v / self.cell).floor() as i64
    }

    /// The cell of a lab position `(x, y)`, m.
    pub fn cell_of(&self, p: [f64; 2]) -> (i64, i64) {
        (self.index(p[0]), self.index(p[1]))
    }

    /// Dose accumulated in the cell holding `p`, e⁻/m².
    pub fn dose_at(&self, p: [f64; 2]) -> f64 {
        self.cells.get(&self.cell_of(p)).copied().unwrap_or(0.0)
    }

    /// The largest dose of any cell, e⁻/m².
    pub fn max_dose(&self) -> f64 {
        self.cells.values().copied().fold(0.0, f64::max)
    }

    /// Every touched cell `((i, j), dose)`; cell `(i, j)` spans `[i·cell, (i+1)·cell)` in x.
    pub fn cells(&self) -> impl Iterator<Item = ((i64, i64), f64)> + '_ {
        self.cells.iter().map(|(k, v)| (*k, *v))
    }

    /// Cell index ranges `(i0..=i1, j0..=j1)` touched by a rectangle, and their number.
    fn rect(&self, x: [f64; 2], y: [f64; 2]) -> ((i64, i64), (i64, i64), u64) {
        let span = |lo: f64, hi: f64| {
            let a = self.index(lo);
            let b = ((hi / self.cell).ceil() as i64).saturating_sub(1).max(a);
            (a, b)
        };
        let (xi, yi) = (span(x[0], x[1]), span(y[0], y[1]));
        let n = |r: (i64, i64)| (r.1 as i128 - r.0 as i128 + 1).clamp(0, u64::MAX as i128) as u64;
        (xi, yi, n(xi).saturating_mul(n(yi)))
    }

    fn rect_max(&self, xi: (i64, i64), yi: (i64, i64)) -> (f64, (i64, i64)) {
        let mut best = (0.0, (xi.0, yi.0));
        if self.cells.len() as u64 <= (xi.1 - xi.0 + 1) as u64 * (yi.1 - yi.0 + 1) as u64 {
            for (&(i, j), &d) in &self.cells {
                if (xi.0..=xi.1).contains(&i) && (yi.0..=yi.1).contains(&j) && d > best.0 {
                    best = (d, (i, j));
                }
            }
        } else {
            for i in xi.0..=xi.1 {
                for j in yi.0..=yi.1 {
                    let d = self.cells.get(&(i, j)).copied().unwrap_or(0.0);
                    if d > best.0 {
                        best = (d, (i, j));
                    }
                }
            }
        }
        best
    }

    fn add_rect(&mut self, xi: (i64, i64), yi: (i64, i64), dose: f64) {
        for i in xi.0..=xi.1 {
            for j in yi.0..=yi.1 {
                *self.cells.entry((i, j)).or_insert(0.0) += dose;
            }
        }
    }

    fn add_point(&mut self, p: [f64; 2], dose: f64) {
        *self.cells.entry(self.cell_of(p)).or_insert(0.0) += dose;
    }
}

/// An instrument behind the guard (module docs).
pub struct Guarded<I> {
    inner: I,
    limits: Limits,
    dry_run: bool,
    audit: AuditLog,
    dose: DoseMap,
    blank_request: Option<bool>,
    last_refusal: Option<Refusal>,
    tripped: Option<Refusal>,
    forwarded: u64,
    watchdog: Option<Arc<AtomicBool>>,
    stem_image: Array2<f32>,
    stem_energy: Vec<f64>,
    stem_counts: Vec<f32>,
    spm_channels: Vec<Channel>,
}

impl<I> std::fmt::Debug for Guarded<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("limits", &self.limits)
            .field("dry_run", &self.dry_run)
            .field("audit", &self.audit)
            .field("forwarded", &self.forwarded)
            .field("last_refusal", &self.last_refusal)
            .field("tripped", &self.tripped)
            .finish_non_exhaustive()
    }
}

fn refuse(limit: &str, command: &str, reason: String) -> Result<()> {
    Err(DriverError::refused(limit, command, reason))
}

fn range_text(r: [f64; 2], unit: &str) -> String {
    format!("[{}, {}]", with_unit(r[0], unit), with_unit(r[1], unit))
}

fn copy_channels(dst: &mut Vec<Channel>, src: &[Channel]) {
    dst.truncate(src.len());
    for (i, c) in src.iter().enumerate() {
        if let Some(d) = dst.get_mut(i) {
            d.name.clone_from(&c.name);
            d.units.clone_from(&c.units);
            d.quantity.clone_from(&c.quantity);
            if d.image.dim() == c.image.dim() {
                d.image.assign(&c.image);
            } else {
                d.image = c.image.clone();
            }
        } else {
            dst.push(c.clone());
        }
    }
}

/// Whether an instrument error means the command did nothing (so no dose was delivered).
fn did_nothing(e: &PhysicsError) -> bool {
    matches!(
        e,
        PhysicsError::Refused { .. }
            | PhysicsError::InvalidArgument { .. }
            | PhysicsError::InvalidParameter { .. }
    )
}

impl<I> Guarded<I> {
    /// Wraps `inner` behind `limits` (validated), logging nowhere. Sends nothing.
    pub fn new(inner: I, limits: Limits) -> Result<Self> {
        limits.validate()?;
        Ok(Self {
            inner,
            dose: DoseMap::new(limits.stem.dose_cell),
            limits,
            dry_run: false,
            audit: AuditLog::disabled(),
            blank_request: None,
            last_refusal: None,
            tripped: None,
            forwarded: 0,
            watchdog: None,
            stem_image: Array2::zeros((0, 0)),
            stem_energy: Vec::new(),
            stem_counts: Vec::new(),
            spm_channels: Vec::new(),
        })
    }

    /// This guard writing its audit lines to `log`.
    pub fn with_audit(mut self, log: AuditLog) -> Self {
        self.audit = log;
        self
    }

    /// This guard in dry-run mode (`true`: check and log, send nothing) or not.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// This guard refusing every command but `make_safe` (limit `watchdog`) once `fired` turns
    /// true: the [`Watchdog`](crate::watchdog::Watchdog)'s
    /// [`fired_flag`](crate::watchdog::Watchdog::fired_flag), set when it made the instrument
    /// safe because the policy side went quiet. [`Guarded::clear_trip`] re-arms.
    pub fn watch(mut self, fired: Arc<AtomicBool>) -> Self {
        self.watchdog = Some(fired);
        self
    }

    /// Whether commands are only checked and logged.
    pub fn is_dry_run(&self) -> bool {
        self.dry_run
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The wrapped instrument (reads only).
    pub fn inner(&self) -> &I {
        &self.inner
    }

    /// The wrapped instrument, **bypassing the guard**: nothing done through it is checked or
    /// logged. For setup outside the policy's reach (a simulator's `reset`); call
    /// [`Guarded::resync`] afterwards.
    pub fn inner_mut(&mut self) -> &mut I {
        &mut self.inner
    }

    /// Unwraps the instrument.
    pub fn into_inner(self) -> I {
        self.inner
    }

    /// Forgets what the guard remembered of the instrument's state (the caller's blanking
    /// request) after the instrument was changed through [`Guarded::inner_mut`]. The dose map is
    /// kept: see [`Guarded::reset_dose`].
    pub fn resync(&mut self) {
        self.blank_request = None;
    }

    /// The abort that tripped the guard, if one did (SPM crash/corrugation abort): until
    /// [`Guarded::clear_trip`], every SPM command but `make_safe` and `set_withdrawn(true)` is
    /// refused by the limit `spm.tripped`.
    pub fn tripped(&self) -> Option<&Refusal> {
        self.tripped.as_ref()
    }

    /// Re-arms the guard after an abort, once a person (or, on a simulator, a new episode) has
    /// dealt with its cause.
    pub fn clear_trip(&mut self) {
        self.tripped = None;
        if let Some(w) = &self.watchdog {
            w.store(false, Ordering::SeqCst);
        }
    }

    /// Clears the dose map (a new specimen or a new, unexposed area after a stage move).
    pub fn reset_dose(&mut self) {
        self.dose = DoseMap::new(self.limits.stem.dose_cell);
    }

    /// The cumulative dose per region.
    pub fn dose_map(&self) -> &DoseMap {
        &self.dose
    }

    /// The latest refusal, if any command was refused.
    pub fn last_refusal(&self) -> Option<&Refusal> {
        self.last_refusal.as_ref()
    }

    /// Takes the latest refusal (an environment reads it into `info["refused"]`).
    pub fn take_refusal(&mut self) -> Option<Refusal> {
        self.last_refusal.take()
    }

    /// Calls forwarded to the instrument so far (ramp steps and blanking included).
    pub fn forwarded(&self) -> u64 {
        self.forwarded
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Writes one line to the audit log for something done outside the limits' reach
    /// (starting an episode, the watchdog).
    pub fn log(
        &mut self,
        command: &str,
        args: serde_json::Map<String, serde_json::Value>,
        outcome: &Outcome,
    ) -> Result<()> {
        self.audit.record(command, args, outcome)
    }

    /// Step 1 and 2 of every command: refused, skipped (dry run) or to send (`true`).
    fn admit(
        &mut self,
        name: &str,
        args: impl FnOnce() -> serde_json::Map<String, serde_json::Value>,
        verdict: Result<()>,
        always: bool,
    ) -> PResult<bool> {
        let fired = self
            .watchdog
            .as_ref()
            .is_some_and(|w| w.load(Ordering::SeqCst));
        let verdict = match (&self.audit.failure(), always) {
            (Some(why), false) => Err(DriverError::refused(
                "audit",
                name,
                format!("the audit log failed ({why}); only make_safe is allowed"),
            )),
            (None, false) if fired => Err(DriverError::refused(
                "watchdog",
                name,
                "the watchdog made the instrument safe after the policy side went quiet; \
                 only make_safe is allowed until a person re-arms the guard (clear_trip)"
                    .to_owned(),
            )),
            _ => verdict,
        };
        if let Err(e) = verdict {
            if let Some(r) = e.as_refusal() {
                let outcome = Outcome::Refused {
                    limit: r.limit.clone(),
                    reason: r.reason.clone(),
                };
                self.last_refusal = Some(r);
                // A failing log cannot make a refusal less of a refusal: ignore its error.
                let _ = self.audit.record(name, args(), &outcome);
            }
            return Err(e.into());
        }
        if self.dry_run {
            self.audit.record(name, args(), &Outcome::DryRun)?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Step 3: logs the outcome of a sent command; a log failure becomes the call's error
    /// (except for `make_safe`, whose instrument result is returned).
    fn finish<T>(
        &mut self,
        name: &str,
        args: serde_json::Map<String, serde_json::Value>,
        result: PResult<T>,
        describe: impl FnOnce(&T) -> String,
    ) -> PResult<T> {
        let outcome = match &result {
            Ok(v) => Outcome::Ok(describe(v)),
            Err(e) => Outcome::Error(e.to_string()),
        };
        let logged = self.audit.record(name, args, &outcome);
        match (result, logged) {
            (Ok(v), Ok(())) => Ok(v),
            (Ok(v), Err(_)) if name == "make_safe" => Ok(v),
            (Ok(_), Err(e)) => Err(e.into()),
            (Err(e), _) => Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SPM
// ---------------------------------------------------------------------------------------------

impl<I: SpmInstrument> Guarded<I> {
    fn area_half(&self) -> [f64; 2] {
        let s = &self.limits.spm;
        [
            0.5 * s.scan_area_fraction * s.scanner_range[0],
            0.5 * s.scan_area_fraction * s.scanner_range[1],
        ]
    }

    fn check_point(&self, cmd: &str, what: &str, p: [f64; 2]) -> Result<()> {
        let h = self.area_half();
        if !(p[0].is_finite() && p[1].is_finite()) || p[0].abs() > h[0] || p[1].abs() > h[1] {
            return refuse(
                "spm.scan_area_fraction",
                cmd,
                format!(
                    "{what} ({}, {}) is outside the allowed area ±{} × ±{} ({} of scanner_range)",
                    with_unit(p[0], "m"),
                    with_unit(p[1], "m"),
                    with_unit(h[0], "m"),
                    with_unit(h[1], "m"),
                    self.limits.spm.scan_area_fraction
                ),
            );
        }
        Ok(())
    }

    fn check_frame_area(&self, cmd: &str, s: &ScanSettings) -> Result<()> {
        let [w, h] = s.field_of_view();
        let half = self.area_half();
        let ok = s.rows > 0
            && s.cols > 0
            && s.pixel_size > 0.0
            && [w, h, s.center[0], s.center[1]]
                .iter()
                .all(|v| v.is_finite())
            && s.center[0].abs() + 0.5 * w <= half[0]
            && s.center[1].abs() + 0.5 * h <= half[1];
        if !ok {
            return refuse(
                "spm.scan_area_fraction",
                cmd,
                format!(
                    "frame {} × {} centred at ({}, {}) is not inside the allowed area ±{} × ±{} \
                     ({} of scanner_range)",
                    with_unit(w, "m"),
                    with_unit(h, "m"),
                    with_unit(s.center[0], "m"),
                    with_unit(s.center[1], "m"),
                    with_unit(half[0], "m"),
                    with_unit(half[1], "m"),
                    self.limits.spm.scan_area_fraction
                ),
            );
        }
        Ok(())
    }

    fn check_bias(&self, cmd: &str, what: &str, b: f64) -> Result<()> {
        let w = self.limits.spm.bias_window;
        if !(b >= w[0] && b <= w[1]) {
            return refuse(
                "spm.bias_window",
                cmd,
                format!(
                    "{what} {} is outside {}",
                    with_unit(b, "V"),
                    range_text(w, "V")
                ),
            );
        }
        Ok(())
    }

    fn check_pulse(&self, cmd: &str, bias: f64, duration: f64) -> Result<()> {
        let s = &self.limits.spm;
        if !(bias.abs() <= s.pulse_bias_max) {
            return refuse(
                "spm.pulse_bias_max",
                cmd,
                format!(
                    "pulse bias {} exceeds ±{}",
                    with_unit(bias, "V"),
                    with_unit(s.pulse_bias_max, "V")
                ),
            );
        }
        self.check_width(cmd, duration)
    }

    fn check_width(&self, cmd: &str, duration: f64) -> Result<()> {
        let max = self.limits.spm.pulse_width_max;
        if !(duration > 0.0 && duration <= max) {
            return refuse(
                "spm.pulse_width_max",
                cmd,
                format!(
                    "duration {} is outside (0, {}]",
                    with_unit(duration, "s"),
                    with_unit(max, "s")
                ),
            );
        }
        Ok(())
    }

    /// The abort verdict on a frame's height channel (after it was acquired).
    fn frame_abort(&self, channels: &[Channel]) -> Result<()> {
        let s = &self.limits.spm;
        let height = channels
            .iter()
            .find(|c| c.name == "height")
            .or_else(|| channels.first().filter(|c| c.units == "m"));
        let Some(h) = height else {
            return Ok(());
        };
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for &v in &h.image {
            let v = f64::from(v);
            if !v.is_finite() {
                return refuse(
                    "spm.abort_corrugation",
                    "acquire_frame",
                    "the height channel holds a non-finite value; tip withdrawn".into(),
                );
            }
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if h.image.is_empty() {
            return Ok(());
        }
        if hi - lo > s.abort_corrugation {
            return refuse(
                "spm.abort_corrugation",
                "acquire_frame",
                format!(
                    "the frame's height spans {} > {} (crash or corrugation); tip withdrawn",
                    with_unit(hi - lo, "m"),
                    with_unit(s.abort_corrugation, "m")
                ),
            );
        }
        if lo < s.z_range[0] || hi > s.z_range[1] {
            return refuse(
                "spm.z_range",
                "acquire_frame",
                format!(
                    "the frame's height [{}, {}] leaves {}; tip withdrawn",
                    with_unit(lo, "m"),
                    with_unit(hi, "m"),
                    range_text(s.z_range, "m")
                ),
            );
        }
        Ok(())
    }

    fn spm_dry_frame(&mut self) -> SpmFrame<'_> {
        let s = self.inner.scan_settings();
        if self.spm_channels.is_empty() {
            // The channels an instrument of this mode records (the simulator's names).
            let pfm = [("phase", "deg"), ("amplitude", "a.u.")];
            let topo = [("height", "m"), ("height_retrace", "m"), ("error", "m")];
            let extra: &[(&str, &str)] = if self.inner.mode() == SpmMode::Pfm {
                &pfm
            } else {
                &[]
            };
            for (name, units) in extra.iter().chain(&topo) {
                self.spm_channels.push(Channel {
                    name: (*name).into(),
                    units: (*units).into(),
                    quantity: "dry run: not measured".into(),
                    image: Array2::zeros((s.rows, s.cols)),
                });
            }
        }
        for c in &mut self.spm_channels {
            if c.image.dim() == (s.rows, s.cols) {
                c.image.fill(0.0);
            } else {
                c.image = Array2::zeros((s.rows, s.cols));
            }
        }
        SpmFrame {
            channels: &self.spm_channels,
            meta: SpmFrameMeta::default(),
        }
    }

    fn spm_make_safe(&mut self) -> PResult<()> {
        let cmd = SpmCommand::MakeSafe;
        if !self.admit(cmd.name(), || cmd.args(), Ok(()), true)? {
            return Ok(());
        }
        self.forwarded += 1;
        let r = self.inner.make_safe();
        self.finish(cmd.name(), cmd.args(), r, |()| "tip withdrawn".into())
    }
}

impl<I: SpmInstrument> Check<SpmCommand> for Guarded<I> {
    fn check(&self, command: &SpmCommand) -> Result<()> {
        let name = command.name();
        let s = &self.limits.spm;
        if let Some(t) = &self.tripped {
            if !matches!(
                command,
                SpmCommand::MakeSafe | SpmCommand::SetWithdrawn(true)
            ) {
                return refuse(
                    "spm.tripped",
                    name,
                    format!(
                        "the guard tripped ({}: {}); clear_trip re-arms it",
                        t.limit, t.reason
                    ),
                );
            }
        }
        match command {
            SpmCommand::ConfigureScan(r) => self.check_frame_area(name, r),
            SpmCommand::AcquireFrame => self.check_frame_area(name, &self.inner.scan_settings()),
            SpmCommand::MoveProbe(p) => self.check_point(name, "position", *p),
            SpmCommand::SetBias(b) => {
                self.check_bias(name, "bias", *b)?;
                if !self.inner.bias().is_finite() {
                    return refuse(
                        "spm.bias_slew_max",
                        name,
                        "the present bias is not finite: cannot ramp from it".into(),
                    );
                }
                Ok(())
            }
            SpmCommand::SetFeedbackGains(p, i) => {
                if !(p.is_finite() && i.is_finite() && *p >= 0.0 && *i >= 0.0) {
                    return refuse(
                        "spm.feedback_gains",
                        name,
                        format!("gains must be finite and ≥ 0, got P = {p}, I = {i} 1/s"),
                    );
                }
                Ok(())
            }
            SpmCommand::SetWithdrawn(_) | SpmCommand::MakeSafe => Ok(()),
            SpmCommand::ConditionTip(Conditioning::Pulse { bias, duration }) => {
                self.check_point(name, "tip position", self.inner.probe_position())?;
                self.check_pulse(name, *bias, *duration)
            }
            SpmCommand::ConditionTip(Conditioning::Dip {
                depth,
                bias,
                duration,
            }) => {
                self.check_point(name, "tip position", self.inner.probe_position())?;
                if !(*depth > 0.0 && *depth <= s.dip_depth_max) {
                    return refuse(
                        "spm.dip_depth_max",
                        name,
                        format!(
                            "dip depth {} is outside (0, {}]",
                            with_unit(*depth, "m"),
                            with_unit(s.dip_depth_max, "m")
                        ),
                    );
                }
                self.check_bias(name, "dip bias", *bias)?;
                self.check_width(name, *duration)
            }
            SpmCommand::BiasPulse {
                position,
                bias,
                duration,
            } => {
                self.check_point(name, "position", *position)?;
                self.check_pulse(name, *bias, *duration)
            }
            SpmCommand::Manipulate {
                start,
                end,
                bias,
                conductance,
            } => {
                self.check_point(name, "start", *start)?;
                self.check_point(name, "end", *end)?;
                self.check_bias(name, "bias", *bias)?;
                let r = s.setpoint_range;
                if !(*conductance >= r[0] && *conductance <= r[1]) {
                    return refuse(
                        "spm.setpoint_range",
                        name,
                        format!(
                            "conductance {} is outside {}",
                            with_unit(*conductance, "S"),
                            range_text(r, "S")
                        ),
                    );
                }
                Ok(())
            }
            SpmCommand::PointSpectroscopy { position, waveform } => {
                self.check_point(name, "position", *position)?;
                for (k, v) in waveform.iter().enumerate() {
                    self.check_bias(name, &format!("waveform[{k}]"), *v)?;
                }
                Ok(())
            }
        }
    }
}

impl<I: SpmInstrument> SpmInstrument for Guarded<I> {
    fn info(&self) -> InstrumentInfo {
        self.inner.info()
    }

    fn mode(&self) -> SpmMode {
        self.inner.mode()
    }

    fn clock(&self) -> f64 {
        self.inner.clock()
    }

    fn scan_settings(&self) -> ScanSettings {
        self.inner.scan_settings()
    }

    fn configure_scan(&mut self, request: &ScanSettings) -> PResult<ScanSettings> {
        let cmd = SpmCommand::ConfigureScan(*request);
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(*request);
        }
        self.forwarded += 1;
        let r = self.inner.configure_scan(request);
        self.finish(cmd.name(), cmd.args(), r, |a| {
            format!(
                "accepted {}×{} px of {} at ({}, {})",
                a.rows,
                a.cols,
                with_unit(a.pixel_size, "m"),
                with_unit(a.center[0], "m"),
                with_unit(a.center[1], "m")
            )
        })
    }

    fn acquire_frame(&mut self) -> PResult<SpmFrame<'_>> {
        let cmd = SpmCommand::AcquireFrame;
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(self.spm_dry_frame());
        }
        self.forwarded += 1;
        let meta = match self.inner.acquire_frame() {
            Ok(f) => {
                copy_channels(&mut self.spm_channels, f.channels);
                Ok(f.meta)
            }
            Err(e) => Err(e),
        };
        let meta = match meta {
            Ok(m) => m,
            Err(e) => {
                let _ = self
                    .audit
                    .record(cmd.name(), cmd.args(), &Outcome::Error(e.to_string()));
                return Err(e);
            }
        };
        if let Err(abort) = self.frame_abort(&self.spm_channels) {
            self.forwarded += 1;
            let safe = self.inner.make_safe();
            let mut r = abort.as_refusal().unwrap_or_else(|| Refusal {
                limit: "spm.abort_corrugation".into(),
                command: cmd.name().into(),
                reason: abort.to_string(),
            });
            if let Err(e) = &safe {
                r.reason.push_str(&format!(" (make_safe failed: {e})"));
            }
            let _ = self.audit.record(
                cmd.name(),
                cmd.args(),
                &Outcome::Refused {
                    limit: r.limit.clone(),
                    reason: r.reason.clone(),
                },
            );
            self.last_refusal = Some(r.clone());
            self.tripped = Some(r.clone());
            return Err(DriverError::Refused {
                limit: r.limit,
                command: r.command,
                reason: r.reason,
            }
            .into());
        }
        self.finish(cmd.name(), cmd.args(), Ok(meta), |m| {
            format!("frame {} at t = {}", m.index, with_unit(m.t_start, "s"))
        })?;
        Ok(SpmFrame {
            channels: &self.spm_channels,
            meta,
        })
    }

    fn probe_position(&self) -> [f64; 2] {
        self.inner.probe_position()
    }

    fn move_probe(&mut self, position: [f64; 2]) -> PResult<()> {
        let cmd = SpmCommand::MoveProbe(position);
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(());
        }
        self.forwarded += 1;
        let r = self.inner.move_probe(position);
        self.finish(cmd.name(), cmd.args(), r, |()| String::new())
    }

    fn bias(&self) -> f64 {
        self.inner.bias()
    }

    fn set_bias(&mut self, bias: f64) -> PResult<f64> {
        let cmd = SpmCommand::SetBias(bias);
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(bias);
        }
        let s = &self.limits.spm;
        let (step, interval) = (s.bias_slew_max * s.bias_ramp_interval, s.bias_ramp_interval);
        let from = self.inner.bias();
        let n = ((bias - from).abs() / step).ceil().clamp(1.0, 1e7) as u64;
        let real = !self.inner.info().simulated;
        let mut r = Ok(bias);
        for k in 1..n {
            self.forwarded += 1;
            if let Err(e) = self
                .inner
                .set_bias(from + (bias - from) * (k as f64 / n as f64))
            {
                r = Err(e);
                break;
            }
            if real {
                std::thread::sleep(std::time::Duration::from_secs_f64(interval));
            }
        }
        if r.is_ok() {
            self.forwarded += 1;
            r = self.inner.set_bias(bias);
        }
        self.finish(cmd.name(), cmd.args(), r, |b| {
            format!("applied {} (ramp of {n} steps)", with_unit(*b, "V"))
        })
    }

    fn feedback_gains(&self) -> (f64, f64) {
        self.inner.feedback_gains()
    }

    fn set_feedback_gains(&mut self, p_gain: f64, i_gain: f64) -> PResult<(f64, f64)> {
        let cmd = SpmCommand::SetFeedbackGains(p_gain, i_gain);
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok((p_gain, i_gain));
        }
        self.forwarded += 1;
        let r = self.inner.set_feedback_gains(p_gain, i_gain);
        self.finish(cmd.name(), cmd.args(), r, |(p, i)| {
            format!("accepted P = {p}, I = {}", with_unit(*i, "1/s"))
        })
    }

    fn is_withdrawn(&self) -> bool {
        self.inner.is_withdrawn()
    }

    fn set_withdrawn(&mut self, withdrawn: bool) -> PResult<()> {
        let cmd = SpmCommand::SetWithdrawn(withdrawn);
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(());
        }
        self.forwarded += 1;
        let r = self.inner.set_withdrawn(withdrawn);
        self.finish(cmd.name(), cmd.args(), r, |()| String::new())
    }

    fn make_safe(&mut self) -> PResult<()> {
        self.spm_make_safe()
    }
}

impl<I: TipConditioning> TipConditioning for Guarded<I> {
    fn condition_tip(&mut self, action: &Conditioning) -> PResult<()> {
        let cmd = SpmCommand::ConditionTip(*action);
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(());
        }
        self.forwarded += 1;
        let r = self.inner.condition_tip(action);
        self.finish(cmd.name(), cmd.args(), r, |()| String::new())
    }
}

impl<I: BiasWriting> BiasWriting for Guarded<I> {
    fn bias_pulse(&mut self, position: [f64; 2], bias: f64, duration: f64) -> PResult<()> {
        let cmd = SpmCommand::BiasPulse {
            position,
            bias,
            duration,
        };
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(());
        }
        self.forwarded += 1;
        let r = self.inner.bias_pulse(position, bias, duration);
        self.finish(cmd.name(), cmd.args(), r, |()| String::new())
    }
}

impl<I: LateralManipulation> LateralManipulation for Guarded<I> {
    fn manipulate(
        &mut self,
        start: [f64; 2],
        end: [f64; 2],
        bias: f64,
        conductance: f64,
    ) -> PResult<Vec<f64>> {
        let cmd = SpmCommand::Manipulate {
            start,
            end,
            bias,
            conductance,
        };
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(Vec::new());
        }
        self.forwarded += 1;
        let r = self.inner.manipulate(start, end, bias, conductance);
        self.finish(cmd.name(), cmd.args(), r, |t| {
            format!("height trace of {} points", t.len())
        })
    }
}

impl<I: PointSpectroscopy> PointSpectroscopy for Guarded<I> {
    fn point_spectroscopy(&mut self, position: [f64; 2], waveform: &[f64]) -> PResult<Vec<f64>> {
        let cmd = SpmCommand::PointSpectroscopy {
            position,
            waveform: waveform.to_vec(),
        };
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(vec![0.0; waveform.len()]);
        }
        self.forwarded += 1;
        let r = self.inner.point_spectroscopy(position, waveform);
        self.finish(cmd.name(), cmd.args(), r, |v| {
            format!("{} responses", v.len())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// STEM
// ---------------------------------------------------------------------------------------------

/// The size of the change from `a` to `b` of each coefficient, m (module docs of
/// [`crate::limits::AberrationSteps`]).
pub fn aberration_steps(a: &Aberrations, b: &Aberrations) -> [(&'static str, f64); 14] {
    let polar = |c0: f64, p0: f64, c1: f64, p1: f64, n: f64| {
        let (x0, y0) = (c0 * (n * p0).cos(), c0 * (n * p0).sin());
        let (x1, y1) = (c1 * (n * p1).cos(), c1 * (n * p1).sin());
        (x1 - x0).hypot(y1 - y0)
    };
    [
        ("c10", (b.c10 - a.c10).abs()),
        ("c12", polar(a.c12, a.phi12, b.c12, b.phi12, 2.0)),
        ("c21", polar(a.c21, a.phi21, b.c21, b.phi21, 1.0)),
        ("c23", polar(a.c23, a.phi23, b.c23, b.phi23, 3.0)),
        ("c30", (b.c30 - a.c30).abs()),
        ("c50", (b.c50 - a.c50).abs()),
        ("c32", polar(a.c32, a.phi32, b.c32, b.phi32, 2.0)),
        ("c34", polar(a.c34, a.phi34, b.c34, b.phi34, 4.0)),
        ("c41", polar(a.c41, a.phi41, b.c41, b.phi41, 1.0)),
        ("c43", polar(a.c43, a.phi43, b.c43, b.phi43, 3.0)),
        ("c45", polar(a.c45, a.phi45, b.c45, b.phi45, 5.0)),
        ("c52", polar(a.c52, a.phi52, b.c52, b.phi52, 2.0)),
        ("c54", polar(a.c54, a.phi54, b.c54, b.phi54, 4.0)),
        ("c56", polar(a.c56, a.phi56, b.c56, b.phi56, 6.0)),
    ]
}

/// Where an acquisition's dose goes.
enum DoseSpot {
    Rect((i64, i64), (i64, i64)),
    Point([f64; 2]),
}

impl<I: StemInstrument> Guarded<I> {
    /// The dose `command` would deliver: where, and how much per cell (e⁻/m²).
    fn planned_dose(&self, command: &StemCommand) -> Result<Option<(DoseSpot, f64)>> {
        let name = command.name();
        let t = &self.limits.stem;
        let current = self.inner.beam_current();
        let bad_current = || {
            refuse(
                "stem.dose_budget",
                name,
                format!(
                    "the beam current {} is not a finite, non-negative value",
                    with_unit(current, "A")
                ),
            )
        };
        if !(current.is_finite() && current >= 0.0) {
            bad_current()?;
        }
        match command {
            StemCommand::AcquireFrame => {
                let s = self.inner.scan_settings();
                let epp = current * s.dwell_time / ELEMENTARY_CHARGE;
                let dose = epp / (s.pixel_size * s.pixel_size);
                let [w, h] = s.field_of_view();
                let finite = dose.is_finite()
                    && dose >= 0.0
                    && w.is_finite()
                    && h.is_finite()
                    && s.center.iter().all(|c| c.is_finite());
                if !finite {
                    refuse(
                        "stem.dose_budget",
                        name,
                        format!(
                            "the frame's dose is not finite (dwell {}, pixel {})",
                            with_unit(s.dwell_time, "s"),
                            with_unit(s.pixel_size, "m")
                        ),
                    )?;
                }
                let (xi, yi, n) = self.dose.rect(
                    [s.center[0] - 0.5 * w, s.center[0] + 0.5 * w],
                    [s.center[1] - 0.5 * h, s.center[1] + 0.5 * h],
                );
                if n > MAX_DOSE_CELLS {
                    refuse(
                        "stem.dose_cell",
                        name,
                        format!(
                            "the frame touches {n} dose cells of {} (at most {MAX_DOSE_CELLS})",
                            with_unit(t.dose_cell, "m")
                        ),
                    )?;
                }
                Ok(Some((DoseSpot::Rect(xi, yi), dose)))
            }
            StemCommand::AcquirePoint(dt) | StemCommand::AcquireSpectrum(dt) => {
                let p = self.inner.probe_position();
                let dose = current * dt / ELEMENTARY_CHARGE / (t.dose_cell * t.dose_cell);
                if !(dose.is_finite() && p.iter().all(|v| v.is_finite())) {
                    refuse(
                        "stem.dose_budget",
                        name,
                        "the point's dose is not finite".into(),
                    )?;
                }
                Ok(Some((DoseSpot::Point(p), dose)))
            }
            _ => Ok(None),
        }
    }

    fn check_dose(&self, name: &str, spot: &DoseSpot, dose: f64) -> Result<()> {
        let budget = self.limits.stem.dose_budget;
        let (worst, cell) = match spot {
            DoseSpot::Rect(xi, yi) => self.dose.rect_max(*xi, *yi),
            DoseSpot::Point(p) => (self.dose.dose_at(*p), self.dose.cell_of(*p)),
        };
        if worst + dose > budget {
            let c = self.dose.cell();
            return refuse(
                "stem.dose_budget",
                name,
                format!(
                    "dose {} + {} delivered already in the region at ({}, {}) would exceed the \
                     budget {} (e/m²; 1 e/Å² = 1e20 e/m²)",
                    with_unit(dose, "e/m^2"),
                    with_unit(worst, "e/m^2"),
                    with_unit((cell.0 as f64 + 0.5) * c, "m"),
                    with_unit((cell.1 as f64 + 0.5) * c, "m"),
                    with_unit(budget, "e/m^2"),
                ),
            );
        }
        Ok(())
    }

    fn check_exposure(&self, name: &str, what: &str, t: f64) -> Result<()> {
        let max = self.limits.stem.max_exposure;
        if !(t > 0.0 && t <= max) {
            return refuse(
                "stem.max_exposure",
                name,
                format!(
                    "{what} {} is outside (0, {}]",
                    with_unit(t, "s"),
                    with_unit(max, "s")
                ),
            );
        }
        Ok(())
    }

    fn check_frame_time(&self, name: &str, s: &ScanSettings) -> Result<()> {
        let max = self.limits.stem.max_frame_time;
        let t = s.frame_time();
        if !(t >= 0.0 && t <= max && s.dwell_time > 0.0) {
            return refuse(
                "stem.max_frame_time",
                name,
                format!(
                    "frame time {} ({}×{} px, dwell {}, flyback {}) is outside (0, {}]",
                    with_unit(t, "s"),
                    s.rows,
                    s.cols,
                    with_unit(s.dwell_time, "s"),
                    with_unit(s.flyback_time, "s"),
                    with_unit(max, "s")
                ),
            );
        }
        Ok(())
    }

    fn add_dose(&mut self, spot: DoseSpot, dose: f64) {
        match spot {
            DoseSpot::Rect(xi, yi) => self.dose.add_rect(xi, yi, dose),
            DoseSpot::Point(p) => self.dose.add_point(p, dose),
        }
    }

    /// Runs an acquisition `acquire` (already admitted) with the beam unblanked around it when
    /// blanking is managed; adds its dose; returns its result and a note for the audit line.
    fn around_acquisition<T>(
        &mut self,
        command: &StemCommand,
        acquire: impl FnOnce(&mut Self) -> PResult<T>,
    ) -> (PResult<T>, String) {
        let planned = self.planned_dose(command).ok().flatten();
        let manage = self.limits.stem.blank_outside_acquisition;
        let wants_beam = !*self.blank_request.get_or_insert(self.inner.is_blanked());
        let mut note = String::new();
        if manage && !wants_beam {
            // As a simulator does; a real instrument would record a dark frame.
            let e = PhysicsError::Refused {
                operation: command.name().into(),
                reason: "the beam is blanked".into(),
            };
            return (Err(e), note);
        }
        if manage && self.inner.is_blanked() {
            self.forwarded += 1;
            if let Err(e) = self.inner.set_blanked(false) {
                return (Err(e), note);
            }
        }
        self.forwarded += 1;
        let r = acquire(self);
        let delivered = match &r {
            Ok(_) => true,
            Err(e) => !did_nothing(e),
        };
        if delivered {
            if let Some((spot, dose)) = planned {
                self.add_dose(spot, dose);
            }
        }
        if manage && !self.inner.is_blanked() {
            self.forwarded += 1;
            match self.inner.set_blanked(true) {
                Ok(()) => note.push_str("; beam blanked after"),
                Err(e) => note.push_str(&format!("; could not blank the beam: {e}")),
            }
        }
        (r, note)
    }

    fn stem_make_safe(&mut self) -> PResult<()> {
        let cmd = StemCommand::MakeSafe;
        if !self.admit(cmd.name(), || cmd.args(), Ok(()), true)? {
            return Ok(());
        }
        self.forwarded += 1;
        let r = self.inner.make_safe();
        if r.is_ok() {
            self.blank_request = Some(true);
        }
        self.finish(cmd.name(), cmd.args(), r, |()| "beam blanked".into())
    }
}

impl<I: StemInstrument> Check<StemCommand> for Guarded<I> {
    fn check(&self, command: &StemCommand) -> Result<()> {
        let name = command.name();
        match command {
            StemCommand::ConfigureScan(r) => self.check_frame_time(name, r),
            StemCommand::AcquireFrame => {
                self.check_frame_time(name, &self.inner.scan_settings())?;
                if let Some((spot, dose)) = self.planned_dose(command)? {
                    self.check_dose(name, &spot, dose)?;
                }
                Ok(())
            }
            StemCommand::AcquirePoint(t) | StemCommand::AcquireSpectrum(t) => {
                let what = if matches!(command, StemCommand::AcquirePoint(_)) {
                    "dwell time"
                } else {
                    "exposure"
                };
                self.check_exposure(name, what, *t)?;
                if let Some((spot, dose)) = self.planned_dose(command)? {
                    self.check_dose(name, &spot, dose)?;
                }
                Ok(())
            }
            StemCommand::SetAberrations(new) => {
                let now = self.inner.aberrations();
                let maxes = self.limits.stem.aberration_step_max.by_name();
                for ((coef, step), (_, m)) in aberration_steps(&now, new).into_iter().zip(maxes) {
                    if !(step <= m) {
                        return refuse(
                            &format!("stem.aberration_step_max.{coef}"),
                            name,
                            format!(
                                "a step of {} in {coef} exceeds {}",
                                with_unit(step, "m"),
                                with_unit(m, "m")
                            ),
                        );
                    }
                }
                Ok(())
            }
            StemCommand::MoveProbe(_) | StemCommand::SetBlanked(_) | StemCommand::MakeSafe => {
                Ok(())
            }
        }
    }
}

impl<I: StemInstrument> StemInstrument for Guarded<I> {
    fn info(&self) -> InstrumentInfo {
        self.inner.info()
    }

    fn clock(&self) -> f64 {
        self.inner.clock()
    }

    fn beam_energy(&self) -> f64 {
        self.inner.beam_energy()
    }

    fn beam_current(&self) -> f64 {
        self.inner.beam_current()
    }

    fn scan_settings(&self) -> ScanSettings {
        self.inner.scan_settings()
    }

    fn configure_scan(&mut self, request: &ScanSettings) -> PResult<ScanSettings> {
        let cmd = StemCommand::ConfigureScan(*request);
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(*request);
        }
        self.forwarded += 1;
        let r = self.inner.configure_scan(request);
        self.finish(cmd.name(), cmd.args(), r, |a| {
            format!(
                "accepted {}×{} px of {}, frame time {}",
                a.rows,
                a.cols,
                with_unit(a.pixel_size, "m"),
                with_unit(a.frame_time(), "s")
            )
        })
    }

    fn acquire_frame(&mut self) -> PResult<Frame<'_>> {
        let cmd = StemCommand::AcquireFrame;
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            let s = self.inner.scan_settings();
            if self.stem_image.dim() != (s.rows, s.cols) {
                self.stem_image = Array2::zeros((s.rows, s.cols));
            } else {
                self.stem_image.fill(0.0);
            }
            return Ok(Frame {
                image: self.stem_image.view(),
                meta: FrameMeta::default(),
            });
        }
        let (r, note) = self.around_acquisition(&cmd, |g| match g.inner.acquire_frame() {
            Ok(f) => {
                if g.stem_image.dim() == f.image.dim() {
                    g.stem_image.assign(&f.image);
                } else {
                    g.stem_image = f.image.to_owned();
                }
                Ok(f.meta)
            }
            Err(e) => Err(e),
        });
        let meta = self.finish(cmd.name(), cmd.args(), r, |m| {
            format!(
                "frame {}, dose {}{note}",
                m.index,
                with_unit(m.dose, "e/m^2")
            )
        })?;
        Ok(Frame {
            image: self.stem_image.view(),
            meta,
        })
    }

    fn probe_position(&self) -> [f64; 2] {
        self.inner.probe_position()
    }

    fn move_probe(&mut self, position: [f64; 2]) -> PResult<()> {
        let cmd = StemCommand::MoveProbe(position);
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(());
        }
        self.forwarded += 1;
        let r = self.inner.move_probe(position);
        self.finish(cmd.name(), cmd.args(), r, |()| String::new())
    }

    fn acquire_point(&mut self, dwell_time: f64) -> PResult<f64> {
        let cmd = StemCommand::AcquirePoint(dwell_time);
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(0.0);
        }
        let (r, note) = self.around_acquisition(&cmd, |g| g.inner.acquire_point(dwell_time));
        self.finish(cmd.name(), cmd.args(), r, |c| format!("counts {c}{note}"))
    }

    fn acquire_spectrum(&mut self, exposure: f64) -> PResult<Spectrum<'_>> {
        let cmd = StemCommand::AcquireSpectrum(exposure);
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(Spectrum {
                energy: &[],
                counts: &[],
            });
        }
        let (r, note) =
            self.around_acquisition(&cmd, |g| match g.inner.acquire_spectrum(exposure) {
                Ok(s) => {
                    g.stem_energy.clear();
                    g.stem_energy.extend_from_slice(s.energy);
                    g.stem_counts.clear();
                    g.stem_counts.extend_from_slice(s.counts);
                    Ok(())
                }
                Err(e) => Err(e),
            });
        let n = self.stem_counts.len();
        self.finish(cmd.name(), cmd.args(), r, |()| {
            format!("{n} channels{note}")
        })?;
        Ok(Spectrum {
            energy: &self.stem_energy,
            counts: &self.stem_counts,
        })
    }

    fn aberrations(&self) -> Aberrations {
        self.inner.aberrations()
    }

    fn set_aberrations(&mut self, aberrations: &Aberrations) -> PResult<Aberrations> {
        let cmd = StemCommand::SetAberrations(*aberrations);
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(*aberrations);
        }
        self.forwarded += 1;
        let r = self.inner.set_aberrations(aberrations);
        self.finish(cmd.name(), cmd.args(), r, |a| {
            format!("accepted C10 = {}", with_unit(a.c10, "m"))
        })
    }

    fn set_blanked(&mut self, blanked: bool) -> PResult<()> {
        let cmd = StemCommand::SetBlanked(blanked);
        let verdict = self.check(&cmd);
        if !self.admit(cmd.name(), || cmd.args(), verdict, false)? {
            return Ok(());
        }
        if !self.limits.stem.blank_outside_acquisition {
            self.forwarded += 1;
            let r = self.inner.set_blanked(blanked);
            return self.finish(cmd.name(), cmd.args(), r, |()| String::new());
        }
        self.blank_request = Some(blanked);
        let mut r = Ok(());
        if !self.inner.is_blanked() {
            self.forwarded += 1;
            r = self.inner.set_blanked(true);
        }
        self.finish(cmd.name(), cmd.args(), r, |()| {
            if blanked {
                "beam blanked".into()
            } else {
                "beam kept blanked until the next acquisition (blank_outside_acquisition)".into()
            }
        })
    }

    fn is_blanked(&self) -> bool {
        if self.limits.stem.blank_outside_acquisition {
            self.blank_request
                .unwrap_or_else(|| self.inner.is_blanked())
        } else {
            self.inner.is_blanked()
        }
    }

    fn make_safe(&mut self) -> PResult<()> {
        self.stem_make_safe()
    }
}
