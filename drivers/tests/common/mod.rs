//! A recording test double: forwards every call to the wrapped instrument and records each
//! state-changing one (with the state that matters for the limits), so tests can tell what the
//! guard let through.

#![allow(dead_code)]

use scopegym_physics::Result;
use scopegym_physics::instrument::{
    BiasWriting, Frame, InstrumentInfo, LateralManipulation, PointSpectroscopy, ScanSettings,
    Spectrum, SpmFrame, SpmInstrument, SpmMode, StemInstrument, TipConditioning,
};
use scopegym_physics::spm::tip::Conditioning;
use scopegym_physics::stem::optics::Aberrations;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// One forwarded call.
#[derive(Debug, Clone, PartialEq)]
pub enum Fwd {
    ConfigureScan(ScanSettings),
    /// With the scan settings and beam current (STEM; 0 for SPM) in force.
    AcquireFrame(ScanSettings, f64),
    MoveProbe([f64; 2]),
    SetBias(f64),
    SetGains(f64, f64),
    SetWithdrawn(bool),
    ConditionTip(Conditioning),
    BiasPulse([f64; 2], f64, f64),
    Manipulate([f64; 2], [f64; 2], f64, f64),
    PointSpectroscopy([f64; 2], Vec<f64>),
    /// Dwell, probe position, beam current.
    AcquirePoint(f64, [f64; 2], f64),
    /// Exposure, probe position, beam current.
    AcquireSpectrum(f64, [f64; 2], f64),
    SetAberrations(Aberrations),
    SetBlanked(bool),
    MakeSafe,
}

/// The recording double.
#[derive(Debug)]
pub struct Recorder<I> {
    pub inner: I,
    pub log: Arc<Mutex<Vec<Fwd>>>,
}

impl<I> Recorder<I> {
    pub fn new(inner: I) -> (Self, Arc<Mutex<Vec<Fwd>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                inner,
                log: log.clone(),
            },
            log,
        )
    }

    fn push(&self, f: Fwd) {
        self.log.lock().unwrap().push(f);
    }
}

impl<I: SpmInstrument> SpmInstrument for Recorder<I> {
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
    fn configure_scan(&mut self, request: &ScanSettings) -> Result<ScanSettings> {
        self.push(Fwd::ConfigureScan(*request));
        self.inner.configure_scan(request)
    }
    fn acquire_frame(&mut self) -> Result<SpmFrame<'_>> {
        self.push(Fwd::AcquireFrame(self.inner.scan_settings(), 0.0));
        self.inner.acquire_frame()
    }
    fn probe_position(&self) -> [f64; 2] {
        self.inner.probe_position()
    }
    fn move_probe(&mut self, position: [f64; 2]) -> Result<()> {
        self.push(Fwd::MoveProbe(position));
        self.inner.move_probe(position)
    }
    fn bias(&self) -> f64 {
        self.inner.bias()
    }
    fn set_bias(&mut self, bias: f64) -> Result<f64> {
        self.push(Fwd::SetBias(bias));
        self.inner.set_bias(bias)
    }
    fn feedback_gains(&self) -> (f64, f64) {
        self.inner.feedback_gains()
    }
    fn set_feedback_gains(&mut self, p: f64, i: f64) -> Result<(f64, f64)> {
        self.push(Fwd::SetGains(p, i));
        self.inner.set_feedback_gains(p, i)
    }
    fn is_withdrawn(&self) -> bool {
        self.inner.is_withdrawn()
    }
    fn set_withdrawn(&mut self, w: bool) -> Result<()> {
        self.push(Fwd::SetWithdrawn(w));
        self.inner.set_withdrawn(w)
    }
    fn make_safe(&mut self) -> Result<()> {
        self.push(Fwd::MakeSafe);
        SpmInstrument::make_safe(&mut self.inner)
    }
}

impl<I: TipConditioning> TipConditioning for Recorder<I> {
    fn condition_tip(&mut self, action: &Conditioning) -> Result<()> {
        self.push(Fwd::ConditionTip(*action));
        self.inner.condition_tip(action)
    }
}

impl<I: BiasWriting> BiasWriting for Recorder<I> {
    fn bias_pulse(&mut self, position: [f64; 2], bias: f64, duration: f64) -> Result<()> {
        self.push(Fwd::BiasPulse(position, bias, duration));
        self.inner.bias_pulse(position, bias, duration)
    }
}

impl<I: LateralManipulation> LateralManipulation for Recorder<I> {
    fn manipulate(&mut self, s: [f64; 2], e: [f64; 2], b: f64, g: f64) -> Result<Vec<f64>> {
        self.push(Fwd::Manipulate(s, e, b, g));
        self.inner.manipulate(s, e, b, g)
    }
}

impl<I: PointSpectroscopy> PointSpectroscopy for Recorder<I> {
    fn point_spectroscopy(&mut self, position: [f64; 2], waveform: &[f64]) -> Result<Vec<f64>> {
        self.push(Fwd::PointSpectroscopy(position, waveform.to_vec()));
        self.inner.point_spectroscopy(position, waveform)
    }
}

impl<I: StemInstrument> StemInstrument for Recorder<I> {
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
    fn configure_scan(&mut self, request: &ScanSettings) -> Result<ScanSettings> {
        self.push(Fwd::ConfigureScan(*request));
        self.inner.configure_scan(request)
    }
    fn acquire_frame(&mut self) -> Result<Frame<'_>> {
        self.push(Fwd::AcquireFrame(
            self.inner.scan_settings(),
            self.inner.beam_current(),
        ));
        self.inner.acquire_frame()
    }
    fn probe_position(&self) -> [f64; 2] {
        self.inner.probe_position()
    }
    fn move_probe(&mut self, position: [f64; 2]) -> Result<()> {
        self.push(Fwd::MoveProbe(position));
        self.inner.move_probe(position)
    }
    fn acquire_point(&mut self, dwell: f64) -> Result<f64> {
        self.push(Fwd::AcquirePoint(
            dwell,
            self.inner.probe_position(),
            self.inner.beam_current(),
        ));
        self.inner.acquire_point(dwell)
    }
    fn acquire_spectrum(&mut self, exposure: f64) -> Result<Spectrum<'_>> {
        self.push(Fwd::AcquireSpectrum(
            exposure,
            self.inner.probe_position(),
            self.inner.beam_current(),
        ));
        self.inner.acquire_spectrum(exposure)
    }
    fn aberrations(&self) -> Aberrations {
        self.inner.aberrations()
    }
    fn set_aberrations(&mut self, a: &Aberrations) -> Result<Aberrations> {
        self.push(Fwd::SetAberrations(*a));
        self.inner.set_aberrations(a)
    }
    fn set_blanked(&mut self, b: bool) -> Result<()> {
        self.push(Fwd::SetBlanked(b));
        self.inner.set_blanked(b)
    }
    fn is_blanked(&self) -> bool {
        self.inner.is_blanked()
    }
    fn make_safe(&mut self) -> Result<()> {
        self.push(Fwd::MakeSafe);
        StemInstrument::make_safe(&mut self.inner)
    }
}

/// An in-memory audit sink the test keeps a handle to.
#[derive(Debug, Clone, Default)]
pub struct Sink(pub Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    /// Every line parsed as JSON (panics on an invalid line).
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect()
    }
}

/// A writer that always fails.
#[derive(Debug)]
pub struct Broken;

impl Write for Broken {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("disk full"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
