//! [`Blind`]: an instrument wrapper that passes every instrument call through to the wrapped
//! instrument, records it, and knows no ground truth: the tasks' truth traits (`AtomTruth`,
//! `TipTruth`, `SpectrumTruth`, ...) answer "unknown", as a real instrument's driver does.
//!
//! A task run on `Blind<Simulator>` therefore sees exactly what it would see on a microscope
//! driven through the same calls: if its observations, rewards and terminations are the same
//! as on the bare simulator, they are built from measurements alone, and only `info` may
//! differ. The recording lists every command the task sent, in order (like the audit log of a
//! guarded driver), so a test can also check which operations a task depends on.
//!
//! ```
//! use scopegym_envs::audit::Blind;
//! use scopegym_physics::instrument::SpmInstrument;
//! use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
//! let mut inst = Blind::new(SpmSimulator::new(SpmConfig::default(), 1).unwrap());
//! inst.set_bias(0.5).unwrap();
//! assert_eq!(inst.calls(), ["set_bias"]);
//! ```

use crate::env::Info;
use crate::error::Result;
use crate::tasks::NewEpisode;
use crate::tasks::pfm_domain_writing::PolarizationTruth;
use crate::tasks::pfm_spectroscopy_explore::LoopTruth;
use crate::tasks::spm_atom_manipulation::AtomTruth;
use crate::tasks::spm_tip_conditioning::TipTruth;
use crate::tasks::stem_eels_explore::SpectrumTruth;
use crate::tasks::stem_sparse_scan::FieldTruth;
use scopegym_physics::Result as PResult;
use scopegym_physics::instrument::{
    BiasWriting, Frame, InstrumentInfo, LateralManipulation, PointSpectroscopy, ScanSettings,
    Spectrum, SpmFrame, SpmInstrument, SpmMode, StemInstrument, TipConditioning,
};
use scopegym_physics::param::Region;
use scopegym_physics::spm::tip::Conditioning;
use scopegym_physics::stem::optics::Aberrations;

/// An instrument seen only through its commands and measurements (see the module docs).
#[derive(Debug)]
pub struct Blind<I> {
    inner: I,
    calls: Vec<&'static str>,
}

impl<I> Blind<I> {
    /// Wraps `inner`.
    pub fn new(inner: I) -> Self {
        Self {
            inner,
            calls: Vec::new(),
        }
    }

    /// The commands and acquisitions sent so far (state-changing and measuring calls, not
    /// plain getters), in order.
    pub fn calls(&self) -> &[&'static str] {
        &self.calls
    }

    /// Forgets the recorded calls.
    pub fn clear_calls(&mut self) {
        self.calls.clear();
    }

    /// The wrapped instrument.
    pub fn inner(&self) -> &I {
        &self.inner
    }

    fn log(&mut self, call: &'static str) -> &mut I {
        self.calls.push(call);
        &mut self.inner
    }
}

impl<I: NewEpisode> NewEpisode for Blind<I> {
    fn new_episode(&mut self, seed: u64, info: &mut Info) -> Result<()> {
        self.log("new_episode").new_episode(seed, info)
    }

    fn set_region(&mut self, region: Region) {
        self.inner.set_region(region);
    }
}

impl<I: StemInstrument> StemInstrument for Blind<I> {
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
        self.log("configure_scan").configure_scan(request)
    }
    fn acquire_frame(&mut self) -> PResult<Frame<'_>> {
        self.log("acquire_frame").acquire_frame()
    }
    fn probe_position(&self) -> [f64; 2] {
        StemInstrument::probe_position(&self.inner)
    }
    fn move_probe(&mut self, position: [f64; 2]) -> PResult<()> {
        StemInstrument::move_probe(self.log("move_probe"), position)
    }
    fn acquire_point(&mut self, dwell_time: f64) -> PResult<f64> {
        self.log("acquire_point").acquire_point(dwell_time)
    }
    fn acquire_spectrum(&mut self, exposure: f64) -> PResult<Spectrum<'_>> {
        self.log("acquire_spectrum").acquire_spectrum(exposure)
    }
    fn aberrations(&self) -> Aberrations {
        self.inner.aberrations()
    }
    fn set_aberrations(&mut self, aberrations: &Aberrations) -> PResult<Aberrations> {
        self.log("set_aberrations").set_aberrations(aberrations)
    }
    fn set_blanked(&mut self, blanked: bool) -> PResult<()> {
        self.log("set_blanked").set_blanked(blanked)
    }
    fn is_blanked(&self) -> bool {
        self.inner.is_blanked()
    }
}

impl<I: SpmInstrument> SpmInstrument for Blind<I> {
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
        self.log("configure_scan").configure_scan(request)
    }
    fn acquire_frame(&mut self) -> PResult<SpmFrame<'_>> {
        self.log("acquire_frame").acquire_frame()
    }
    fn probe_position(&self) -> [f64; 2] {
        SpmInstrument::probe_position(&self.inner)
    }
    fn move_probe(&mut self, position: [f64; 2]) -> PResult<()> {
        SpmInstrument::move_probe(self.log("move_probe"), position)
    }
    fn bias(&self) -> f64 {
        self.inner.bias()
    }
    fn set_bias(&mut self, bias: f64) -> PResult<f64> {
        self.log("set_bias").set_bias(bias)
    }
    fn feedback_gains(&self) -> (f64, f64) {
        self.inner.feedback_gains()
    }
    fn set_feedback_gains(&mut self, p_gain: f64, i_gain: f64) -> PResult<(f64, f64)> {
        self.log("set_feedback_gains")
            .set_feedback_gains(p_gain, i_gain)
    }
    fn is_withdrawn(&self) -> bool {
        self.inner.is_withdrawn()
    }
    fn set_withdrawn(&mut self, withdrawn: bool) -> PResult<()> {
        self.log("set_withdrawn").set_withdrawn(withdrawn)
    }
}

impl<I: TipConditioning> TipConditioning for Blind<I> {
    fn condition_tip(&mut self, action: &Conditioning) -> PResult<()> {
        self.log("condition_tip").condition_tip(action)
    }
}

impl<I: BiasWriting> BiasWriting for Blind<I> {
    fn bias_pulse(&mut self, position: [f64; 2], bias: f64, duration: f64) -> PResult<()> {
        self.log("bias_pulse").bias_pulse(position, bias, duration)
    }
}

impl<I: LateralManipulation> LateralManipulation for Blind<I> {
    fn manipulate(
        &mut self,
        start: [f64; 2],
        end: [f64; 2],
        bias: f64,
        conductance: f64,
    ) -> PResult<Vec<f64>> {
        self.log("manipulate")
            .manipulate(start, end, bias, conductance)
    }
}

impl<I: PointSpectroscopy> PointSpectroscopy for Blind<I> {
    fn point_spectroscopy(&mut self, position: [f64; 2], waveform: &[f64]) -> PResult<Vec<f64>> {
        self.log("point_spectroscopy")
            .point_spectroscopy(position, waveform)
    }
}

// Ground truth: unknown, as on a real instrument.
impl<I> AtomTruth for Blind<I> {}
impl<I> TipTruth for Blind<I> {}
impl<I> PolarizationTruth for Blind<I> {
    fn true_up(&self, _scan: &ScanSettings) -> Option<Vec<bool>> {
        None
    }
}
impl<I> LoopTruth for Blind<I> {}
impl<I> SpectrumTruth for Blind<I> {
    fn expected_values(
        &mut self,
        _positions: &[[f64; 2]],
        _exposure: f64,
        _window: [f64; 2],
        _value: &dyn Fn(&[f64], &[f64]) -> f64,
        _scratch: &mut crate::tasks::stem_eels_explore::SpectrumScratch,
        _out: &mut Vec<f64>,
    ) -> bool {
        false
    }
}
impl<I> FieldTruth for Blind<I> {
    fn noiseless_field(
        &mut self,
        _settings: &ScanSettings,
        _scratch: &mut crate::tasks::stem_sparse_scan::TruthScratch,
        _out: &mut Vec<f64>,
    ) -> bool {
        false
    }
}
impl<I> crate::tasks::stem_dopant_steer::DopantTruth for Blind<I> {}
impl<I> crate::tasks::stem_autofocus::ProbeTruth for Blind<I> {}
impl<I> crate::tasks::afm_feedback_tuning::LoopTruth for Blind<I> {}
