//! The z feedback loop of an AFM/STM scan (DESIGN.md §5 "Scanning"): a discrete PI controller
//! that follows a known true height profile along a scan line, with a z-speed limit, a finite
//! z range and a saturating interaction signal. It produces the tracking error, parachuting
//! behind tall features, the trace/retrace mismatch and the error-signal channel.
//!
//! # Model
//!
//! The profile handed to [`ZFeedback::scan_line`] is the true height the tip apex would follow
//! (the surface already dilated by the tip), `profile[j]` at the centre of pixel `j`. The tip
//! sweeps the line at constant speed, one pixel per `pixel_time` `t_p`; the controller runs at
//! `sample_rate` `f_s` (period `T = 1/f_s`). Sample `k` is taken at time `t_k = (k + ½)·T` after
//! the start of the line, when the tip is at `u_k = t_k/t_p` pixels from the line's start edge,
//! i.e. at the fractional pixel index `x_k = u_k − ½` (trace) or `x_k = n − ½ − u_k` (retrace).
//! A line holds `K = max(1, ⌈n·t_p/T − ½⌉)` samples (those with `t_k < n·t_p`).
//!
//! - True height `h_k`: the profile linearly interpolated at `x_k` (clamped to the end pixels).
//! - Interaction (error) signal, saturating when contact is lost by more than `c`
//!   (`saturation`): `e_k = max(h_k − z_k, −c)`. Positive: the surface is above the tip's
//!   set-point height (the tip presses); `−c`: lost contact, the controller no longer sees how
//!   far away the surface is. This saturation is what makes parachuting.
//! - Velocity-form PI with a z-speed limit `v_max` and the z range `±R`:
//!   `Δ_k = K_p (e_k − e_{k−1}) + K_i T e_k`, clamped to `±v_max T`,
//!   `z_{k+1} = clamp(z_k + Δ_k, −R, R)`. `K_p` is dimensionless, `K_i` in 1/s. The velocity
//!   form has no integrator state to wind up: at a range or speed limit the loop simply keeps
//!   its last error.
//! - Loop gain `g` (`loop_gain`, default 1): the gains acting on the loop are `g·K_p` and
//!   `g·K_i` (the set gains times the error-signal and piezo sensitivities relative to their
//!   nominal calibration). Everything below holds with the effective gains.
//! - Pixel outputs: the height channel of pixel `j` is the mean of `z_k` over the samples whose
//!   time falls in the pixel (`j·t_p ≤ t_k < (j+1)·t_p`, in scan order), the error channel the
//!   mean of `e_k`. A pixel that gets no sample (`t_p < T`) takes the sample nearest in time to
//!   its centre. Outputs are indexed by pixel position for trace and retrace alike (the retrace
//!   is not reversed). The controller state (`z`, `e_{k−1}`) carries over from line to line.
//!
//! # What follows from it
//!
//! - Linear regime (no saturation, no limits) on a flat stretch:
//!   `e_{k+1} = (1 − K_p − K_i T) e_k + K_p e_{k−1}`, poles
//!   `λ = [(1 − K_p − K_i T) ± √((1 − K_p − K_i T)² + 4K_p)]/2` (always real for `K_p ≥ 0`);
//!   stable iff `0 ≤ K_p < 1` and `0 < K_i T < 2(1 − K_p)` ([`ZFeedback::is_stable`]). After a
//!   step of height `H` from rest, `e_n = A₁λ₁ⁿ + A₂λ₂ⁿ` with `A₁ = Hλ₁/(λ₁ − λ₂)`, `A₂ = H − A₁`.
//! - Lag: summing the velocity-form update over a settled-to-settled transition of height `H`
//!   gives `Σ_k e_k = H/(K_i T)` whatever `K_p`: the recorded edge (its centroid) lags the true
//!   one by `1/K_i` in time, `v_scan/K_i` in space (exactly so in the pixel outputs when every
//!   pixel holds the same number of samples). Trace and retrace lag in opposite directions, so
//!   an edge is displaced by `2·v_scan/K_i` between them (`2/(K_i t_p)` pixels).
//! - Parachuting: behind a feature taller than `c`, the error is pinned at `−c`, the
//!   proportional term vanishes and `z` descends at `min(K_i c, v_max)`; the lost-contact tail
//!   lasts `(H − c)/min(K_i c, v_max)`.
//!
//! # Defaults
//!
//! `sample_rate` 2 kHz, `p_gain` 0.1, `i_gain` 300 1/s (`K_i T = 0.15`, dominant pole 0.866: a
//! time constant of ≈ 7 samples, 3.5 ms), `z_speed_limit` 1 µm/s, `z_range` ±1 µm,
//! `saturation` 5 nm. At 0.5 lines/s and 256 pixels (a trace takes 1 s, 7.8 samples per pixel)
//! an atomic terrace step (0.39 nm) is tracked with a lag of `256/300 ≈ 0.85` pixel, whereas
//! behind a 30 nm particle the tip loses contact and descends at `min(K_i c, v_max) = 1 µm/s`:
//! a ≈ 25 ms (≈ 6 pixel) parachute tail.
//!
//! # Cost
//!
//! [`ZFeedback::scan_line`] allocates nothing; each sample is a short dependent chain (its z
//! needs the previous one), ≈ 8 ns per sample on a 2.4 GHz core: a 256² frame with trace and
//! retrace at the defaults (≈ 1 M samples) takes ≈ 8 ms there. [`ZFeedback::step`] runs one
//! sample by itself.
//!
//! ```
//! use scopegym_physics::spm::feedback::{FeedbackConfig, ZFeedback};
//! let mut fb = ZFeedback::new(&FeedbackConfig::default()).unwrap();
//! // A 0.39 nm terrace step in the middle of a 256-pixel line, 1 s per trace.
//! let profile: Vec<f32> = (0..256).map(|j| if j < 128 { 0.0 } else { 0.39e-9 }).collect();
//! let (mut trace, mut retrace, mut err) = (vec![0f32; 256], vec![0f32; 256], vec![0f32; 256]);
//! fb.engage(0.0);
//! let stats = fb.scan_line(&profile, 1.0 / 256.0, false, &mut trace, &mut err).unwrap();
//! assert_eq!(stats.lost_contact_fraction, 0.0);
//! assert!((trace[255] - 0.39e-9).abs() < 1e-13); // settled on the upper terrace
//! fb.scan_line(&profile, 1.0 / 256.0, true, &mut retrace, &mut err).unwrap();
//! // The trace rises late (to the right of the edge), the retrace falls late (to its left).
//! assert!(trace[128] < retrace[128] && trace[127] < retrace[127]);
//! ```

use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::{Frequency, Length, Unitless, Velocity};
use serde::{Deserialize, Serialize};

/// Largest accepted proportional gain (the loop is unstable beyond 1, but allowed).
pub const MAX_P_GAIN: f64 = 10.0;
/// Largest accepted integral gain, 1/s.
pub const MAX_I_GAIN: f64 = 1e7;
/// Largest number of controller samples in one line (bounds the work of a call).
pub const MAX_LINE_SAMPLES: usize = 100_000_000;

/// Z-feedback settings (`[feedback]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedbackConfig {
    /// Proportional gain `K_p` of the velocity-form PI law, dimensionless, in `[0, 10]`
    /// (stable below 1). Default 0.1.
    pub p_gain: Param<Unitless>,
    /// Integral gain `K_i`, 1/s, in `[0, 1e7]`. Default 300 1/s (`K_i T = 0.15` at 2 kHz).
    pub i_gain: Param<Frequency>,
    /// Controller sample rate `f_s`, Hz, in `(0, 100 MHz]`. Default 2 kHz.
    pub sample_rate: Param<Frequency>,
    /// Largest z speed `v_max`, m/s, in `(0, 1000]`. Default 1 µm/s.
    pub z_speed_limit: Param<Velocity>,
    /// Half the z travel `R`: z stays within `±R`, m, in `(0, 1 mm]`. Default 1 µm.
    pub z_range: Param<Length>,
    /// Lost-contact saturation `c` of the error signal, m, in `(0, 10 µm]`: the error never
    /// reads below `−c`. Default 5 nm.
    pub saturation: Param<Length>,
    /// Loop gain `g`, dimensionless, in `(0, 100]`: the factor between the gains as set and
    /// those acting on the loop, `K_p,eff = g·K_p`, `K_i,eff = g·K_i`. It is the product of
    /// the error-signal and z-piezo sensitivities relative to their nominal calibration
    /// (deflection sensitivity, cantilever stiffness, contact stiffness), which a real
    /// instrument does not know exactly and which changes from cantilever to cantilever; so
    /// the same set gains track better or ring on different samples and tips. Default 1.
    pub loop_gain: Param<Unitless>,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        Self {
            p_gain: Param::fixed(0.1),
            i_gain: Param::fixed(300.0),
            sample_rate: Param::fixed(2e3),
            z_speed_limit: Param::fixed(1e-6),
            z_range: Param::fixed(1e-6),
            saturation: Param::fixed(5e-9),
            loop_gain: Param::fixed(1.0),
        }
    }
}

fn check_gains(p_gain: f64, i_gain: f64, prefix: &str) -> Result<()> {
    if !(0.0..=MAX_P_GAIN).contains(&p_gain) {
        return Err(PhysicsError::param(
            format!("{prefix}p_gain"),
            format!("must be in [0, {MAX_P_GAIN}], got {p_gain}"),
        ));
    }
    if !(0.0..=MAX_I_GAIN).contains(&i_gain) {
        return Err(PhysicsError::param(
            format!("{prefix}i_gain"),
            format!("must be in [0, {MAX_I_GAIN:e}] 1/s, got {i_gain}"),
        ));
    }
    Ok(())
}

fn check_speed(v: f64, prefix: &str) -> Result<()> {
    if v > 0.0 && v <= 1e3 {
        Ok(())
    } else {
        Err(PhysicsError::param(
            format!("{prefix}z_speed_limit"),
            format!("must be in (0, 1000] m/s, got {v}"),
        ))
    }
}

impl FeedbackConfig {
    /// Checks ranges (NaN is rejected); `prefix` names the section, e.g. `"feedback."`.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        check_gains(self.p_gain.get(), self.i_gain.get(), prefix)?;
        let pos = |n: &str, v: f64, hi: f64, unit: &str| {
            if v > 0.0 && v <= hi {
                Ok(())
            } else {
                Err(PhysicsError::param(
                    format!("{prefix}{n}"),
                    format!("must be in (0, {hi:e}] {unit}, got {v}"),
                ))
            }
        };
        pos("sample_rate", self.sample_rate.get(), 1e8, "Hz")?;
        check_speed(self.z_speed_limit.get(), prefix)?;
        pos("z_range", self.z_range.get(), 1e-3, "m")?;
        pos("saturation", self.saturation.get(), 1e-5, "m")?;
        pos("loop_gain", self.loop_gain.get(), 100.0, "")?;
        Ok(())
    }
}

/// Summary of one scanned line, over its controller samples.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LineStats {
    /// Root-mean-square error signal `√⟨e_k²⟩`, m.
    pub rms_error: f64,
    /// Largest `|e_k|`, m.
    pub max_abs_error: f64,
    /// Fraction of samples with lost contact (`h_k − z_k < −c`, the error saturated).
    pub lost_contact_fraction: f64,
    /// Fraction of samples whose z update was cut by the z range (z pinned at `±R`).
    pub z_clipped_fraction: f64,
    /// Number of controller samples in the line.
    pub samples: usize,
    /// How many of them the closed-form path evaluated ([`ZFeedback::set_closed_form`]).
    pub closed_form_samples: usize,
}

/// The z feedback controller: resolved parameters and its state (z and the previous error),
/// which persists from line to line.
#[derive(Debug, Clone, PartialEq)]
pub struct ZFeedback {
    p_gain: f64,
    i_gain: f64,
    period: f64,
    z_speed_limit: f64,
    z_range: f64,
    saturation: f64,
    loop_gain: f64,
    z: f64,
    prev_error: f64,
    /// The closed-form tables when the closed-form path is on and the loop is stable.
    closed: Option<Box<ClosedForm>>,
    closed_form: bool,
    /// Tests: run every sample with the limits (no optimistic pass, [`Run::piece`]).
    limited_only: bool,
}

/// Longest run of samples one closed-form evaluation covers; longer runs are split.
const CLOSED_MAX: usize = 32;

/// Shortest run worth the closed form (its set-up costs about two samples of the loop);
/// shorter runs go sample by sample.
const CLOSED_MIN: usize = 3;

/// Below this many samples per pixel (and from one) the closed-form path runs a line in one
/// pass instead ([`ZFeedback::line_one_pass`]): its pieces hold fewer than [`CLOSED_MIN`]
/// samples on average, too short for the closed form.
const ONE_PASS_MAX_SPP: f64 = 2.0 * CLOSED_MIN as f64;

/// Relative margin by which the closed-form path must clear every limit (far above the
/// rounding of either computation, ≈ 1e-16 relative).
const CLOSED_MARGIN: f64 = 1e-12;

/// Tables of the closed-form solution of the linear regime (no saturation, no limits).
///
/// Along one linear piece of the profile, `h_i = H₀ + β i`, the error obeys
/// `e_{i+1} = (1 − K_p − K_i T) e_i + K_p e_{i−1} + β`, whose fixed point is `e* = β/(K_i T)`.
/// The deviation `d_i = e_i − e*` is `d_i = F_i d₀ + G_i d₋₁` with the fundamental solutions
/// `F₀ = 1, G₀ = 0, F₁ = b, G₁ = K_p`, `X_{i+1} = b X_i + K_p X_{i−1}` (`b = 1 − K_p − K_i T`),
/// so every sample of a run of `m`, their sums and the state after them are affine in the
/// start state `(d₀, d₋₁)` with coefficients tabulated here per run length `m ≤ CLOSED_MAX`.
#[derive(Debug, Clone, PartialEq)]
struct ClosedForm {
    inv_kit: f64,
    /// `F_i`, `G_i`, `i = 0..=CLOSED_MAX`.
    f: [f64; CLOSED_MAX + 1],
    g: [f64; CLOSED_MAX + 1],
    /// `Σ_{i<m} F_i`, `Σ_{i<m} G_i` at index `m`.
    sf: [f64; CLOSED_MAX + 1],
    sg: [f64; CLOSED_MAX + 1],
    /// `Σ_{i<m} F_i²`, `Σ_{i<m} F_i G_i`, `Σ_{i<m} G_i²`.
    ff: [f64; CLOSED_MAX + 1],
    fg: [f64; CLOSED_MAX + 1],
    gg: [f64; CLOSED_MAX + 1],
    /// `max_{i≤m} |F_i|`, `max_{i≤m} |G_i|`: `|d_i| ≤ |d₀|·mf[m] + |d₋₁|·mg[m]` for `i ≤ m`.
    mf: [f64; CLOSED_MAX + 1],
    mg: [f64; CLOSED_MAX + 1],
    /// `max_{i<m} |F_{i+1} − F_i|` and the same for `G`: bounds the z steps.
    df: [f64; CLOSED_MAX + 1],
    dg: [f64; CLOSED_MAX + 1],
}

impl ClosedForm {
    /// The tables for effective gains `kp` and `K_i T = kit`; `None` unless the loop is
    /// stable (the fast path is used only where the loop forgets its rounding).
    fn new(kp: f64, kit: f64, stable: bool) -> Option<Box<Self>> {
        if !(stable && kit > 0.0) {
            return None;
        }
        let b = 1.0 - kp - kit;
        let z = [0.0; CLOSED_MAX + 1];
        let mut t = Box::new(Self {
            inv_kit: 1.0 / kit,
            f: z,
            g: z,
            sf: z,
            sg: z,
            ff: z,
            fg: z,
            gg: z,
            mf: z,
            mg: z,
            df: z,
            dg: z,
        });
        t.f[0] = 1.0;
        t.f[1] = b;
        t.g[1] = kp;
        for i in 1..CLOSED_MAX {
            t.f[i + 1] = b * t.f[i] + kp * t.f[i - 1];
            t.g[i + 1] = b * t.g[i] + kp * t.g[i - 1];
        }
        t.mf[0] = 1.0;
        for m in 1..=CLOSED_MAX {
            let (f, g) = (t.f[m - 1], t.g[m - 1]);
            t.sf[m] = t.sf[m - 1] + f;
            t.sg[m] = t.sg[m - 1] + g;
            t.ff[m] = t.ff[m - 1] + f * f;
            t.fg[m] = t.fg[m - 1] + f * g;
            t.gg[m] = t.gg[m - 1] + g * g;
            t.mf[m] = t.mf[m - 1].max(t.f[m].abs());
            t.mg[m] = t.mg[m - 1].max(t.g[m].abs());
            t.df[m] = t.df[m - 1].max((t.f[m] - f).abs());
            t.dg[m] = t.dg[m - 1].max((t.g[m] - g).abs());
        }
        Some(t)
    }
}

/// The per-sample law with its constants folded.
#[derive(Clone, Copy)]
struct Law {
    kp: f64,
    /// `K_p + K_i T`.
    a: f64,
    c: f64,
    vt: f64,
    r: f64,
}

#[inline(always)]
fn fmax(a: f64, b: f64) -> f64 {
    if a > b { a } else { b }
}

#[inline(always)]
fn fmin(a: f64, b: f64) -> f64 {
    if a < b { a } else { b }
}

/// One controller sample's result.
struct Tick {
    e: f64,
    z_next: f64,
    lost: bool,
    clipped: bool,
}

impl Law {
    /// One sample at tip height `z`, previous error `ep` and true height `h`.
    #[inline(always)]
    fn tick(&self, z: f64, ep: f64, h: f64) -> Tick {
        let d = h - z;
        let lost = d < -self.c;
        let e = fmax(d, -self.c);
        // z + Kp (e − ep) + Ki T e, grouped so that only one multiply-add follows `e`.
        let y = (z - self.kp * ep) + self.a * e;
        // clamp(clamp(y, z ± v_max T), ±R) equals one clamp to the intersection of the two
        // intervals (z lies in both), whose ends do not depend on `e`.
        let lo = fmax(z - self.vt, -self.r);
        let hi = fmin(z + self.vt, self.r);
        let z_next = fmin(fmax(y, lo), hi);
        // The range (not the speed limit) cut the update.
        let clipped = y.abs() > self.r && z_next.abs() >= self.r;
        Tick {
            e,
            z_next,
            lost,
            clipped,
        }
    }
}

/// `⌈v⌉` for `|v| < 2⁵³` without a libm call (baseline x86-64 has no rounding instruction).
#[inline(always)]
fn ceil(v: f64) -> f64 {
    let t = v as i64 as f64; // truncation toward zero
    if t < v { t + 1.0 } else { t }
}

/// The state of one line scan: the law, the controller state and the sums.
struct Run<'a> {
    law: Law,
    /// Measurement noise added to each sample's error (m), by sample index; empty for none.
    noise: &'a [f64],
    /// Pixels per sample, `T/t_p`.
    r: f64,
    z: f64,
    ep: f64,
    sum_e2: f64,
    max_abs: f64,
    n_lost: usize,
    n_clip: usize,
    n_closed: usize,
    /// Only the sample-by-sample loop with the limits (tests: the reference of [`Self::piece`]).
    limited_only: bool,
    /// Samples before this index go straight to the loop with the limits: one acted lately
    /// ([`Self::piece`]), so an optimistic pass would likely be wasted.
    skip_until: usize,
}

/// Samples after a piece where a limit acted that [`Run::piece`] runs with the limits at once.
const LIMITED_COOLDOWN: usize = 32;

/// Sums of one pixel's samples, its first sample (if any yet) and its last.
#[derive(Clone, Copy)]
struct PixelSums {
    z: f64,
    e: f64,
    first: Option<(f64, f64)>,
    last: (f64, f64),
}

/// A pixel's output value type (`f32` frames, `f64` for checks at full precision).
trait Out: Copy {
    fn from_f64(v: f64) -> Self;
}

impl Out for f32 {
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Out for f64 {
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}

impl Run<'_> {
    /// Runs one sample against the true height `h` and returns `(z_k, e_k)`.
    #[inline(always)]
    fn sample(&mut self, h: f64) -> (f64, f64) {
        let t = self.law.tick(self.z, self.ep, h);
        let zk = self.z;
        self.z = t.z_next;
        self.ep = t.e;
        self.sum_e2 += t.e * t.e;
        self.max_abs = fmax(self.max_abs, t.e.abs());
        self.n_lost += usize::from(t.lost);
        self.n_clip += usize::from(t.clipped);
        (zk, t.e)
    }

    /// Runs the samples `k ∈ [from, to)` (at positions `u = (k + ½)·r`) over one linear piece
    /// of the profile, `h = h0 + (u − u0)·slope`, adding them to `acc`.
    ///
    /// First optimistically, as if no limit acted (`e_k = h_k − z_k`, `z_{k+1} = y_k`: a shorter
    /// dependent chain per sample), noting whether one could have (saturation, or the update
    /// `y_k` not strictly inside the speed and range interval). Where none did, these are exactly the
    /// operations of [`Law::tick`] (its `max` and clamp return their argument unchanged, and
    /// nothing counts as lost or clipped): bit for bit the same result. Otherwise the piece is
    /// rerun from its start sample by sample with the limits, as are the pieces of the next
    /// [`LIMITED_COOLDOWN`] samples.
    #[inline(always)]
    fn piece(&mut self, from: usize, to: usize, h0: f64, u0: f64, slope: f64, acc: &mut PixelSums) {
        if from >= to {
            return;
        }
        if self.limited_only || from < self.skip_until {
            return self.piece_limited(from, to, h0, u0, slope, acc);
        }
        let law = self.law;
        let (mut z, mut ep) = (self.z, self.ep);
        let (mut sum_e2, mut max_abs) = (self.sum_e2, self.max_abs);
        let mut a = *acc;
        let mut limited = false;
        let mut kf = from as f64 + 0.5;
        for k in from..to {
            let mut h = h0 + (kf * self.r - u0) * slope;
            if !self.noise.is_empty() {
                h += self.noise[k];
            }
            let e = h - z;
            let y = (z - law.kp * ep) + law.a * e;
            let lo = fmax(z - law.vt, -law.r);
            let hi = fmin(z + law.vt, law.r);
            // Strict, and negated so that a NaN counts as limited: at equality the exact
            // path decides (the sign of a zero included).
            limited |= !(e > -law.c) | !(y > lo) | !(y < hi);
            sum_e2 += e * e;
            max_abs = fmax(max_abs, e.abs());
            a.z += z;
            a.e += e;
            if k == from {
                a.first.get_or_insert((z, e));
            }
            a.last = (z, e);
            z = y;
            ep = e;
            kf += 1.0;
        }
        if !limited {
            (self.z, self.ep, self.sum_e2, self.max_abs) = (z, ep, sum_e2, max_abs);
            *acc = a;
            return;
        }
        self.skip_until = to + LIMITED_COOLDOWN;
        self.piece_limited(from, to, h0, u0, slope, acc);
    }

    /// [`Self::piece`] sample by sample with the limits ([`Law::tick`]).
    #[inline(never)]
    fn piece_limited(
        &mut self,
        from: usize,
        to: usize,
        h0: f64,
        u0: f64,
        slope: f64,
        acc: &mut PixelSums,
    ) {
        let mut kf = from as f64 + 0.5;
        for k in from..to {
            let mut h = h0 + (kf * self.r - u0) * slope;
            if !self.noise.is_empty() {
                // The error reads h − z + noise: as if the height were off by the noise.
                h += self.noise[k];
            }
            let (z, e) = self.sample(h);
            acc.z += z;
            acc.e += e;
            if k == from {
                acc.first.get_or_insert((z, e));
            }
            acc.last = (z, e);
            kf += 1.0;
        }
    }

    /// The samples `k ∈ [from, to)` of one linear piece (as [`Self::piece`]) in closed form
    /// wherever a bound proves that no limit acts, else sample by sample.
    #[inline(always)]
    fn piece_closed(
        &mut self,
        cf: &ClosedForm,
        from: usize,
        to: usize,
        (h0, u0, slope): (f64, f64, f64),
        acc: &mut PixelSums,
    ) {
        let mut k = from;
        while k < to {
            let m = (to - k).min(CLOSED_MAX);
            let closed = if m >= CLOSED_MIN {
                self.closed_run(cf, k, m, h0, u0, slope, acc)
            } else {
                None
            };
            if let Some(f) = closed {
                acc.first.get_or_insert(f);
            } else {
                self.piece(k, k + m, h0, u0, slope, acc);
            }
            k += m;
        }
    }

    /// `m ∈ [1, CLOSED_MAX]` samples from `k` in closed form ([`ClosedForm`]); `None` (nothing
    /// changed) unless saturation, the speed limit and the z range provably stay inactive
    /// over them with a margin. Returns the first sample `(z, e)`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn closed_run(
        &mut self,
        cf: &ClosedForm,
        k: usize,
        m: usize,
        h0: f64,
        u0: f64,
        slope: f64,
        acc: &mut PixelSums,
    ) -> Option<(f64, f64)> {
        let law = self.law;
        let (z0, ep) = (self.z, self.ep);
        // The first sample's height exactly as the sample loop computes it, and the step.
        let hh0 = h0 + ((k as f64 + 0.5) * self.r - u0) * slope;
        let beta = self.r * slope;
        let mf = m as f64;
        let hh1 = hh0 + beta * mf;
        let es = beta * cf.inv_kit;
        let e0 = hh0 - z0;
        let d0 = e0 - es;
        let dm = ep - es;
        let (a0, am) = (d0.abs(), dm.abs());
        // |d_i| ≤ bd for i ≤ m; |d_{i+1} − d_i| ≤ bs for i < m.
        let bd = a0 * cf.mf[m] + am * cf.mg[m];
        let bs = a0 * cf.df[m] + am * cf.dg[m];
        let hmax = fmax(hh0.abs(), hh1.abs());
        let tol = CLOSED_MARGIN * (hmax + z0.abs() + es.abs() + bd + law.c);
        // No saturation (e_i = e* + d_i > −c), no speed clamp (|z_{i+1} − z_i| =
        // |β − (d_{i+1} − d_i)| < v_max T), no range clamp (|z_i| = |h_i − e_i| < R, i ≤ m).
        let ok = es - bd > tol - law.c
            && beta.abs() + bs < law.vt - tol
            && hmax + es.abs() + bd < law.r - tol;
        if !ok {
            return None;
        }
        let sd = d0 * cf.sf[m] + dm * cf.sg[m];
        let se = mf * es + sd;
        let sd2 = d0 * d0 * cf.ff[m] + 2.0 * d0 * dm * cf.fg[m] + dm * dm * cf.gg[m];
        let se2 = mf * es * es + 2.0 * es * sd + sd2;
        let sz = mf * hh0 + beta * (0.5 * mf * (mf - 1.0)) - se;
        let e_last = es + d0 * cf.f[m - 1] + dm * cf.g[m - 1];
        let z_last = hh0 + beta * (mf - 1.0) - e_last;
        let e_end = es + d0 * cf.f[m] + dm * cf.g[m];
        self.z = hh1 - e_end;
        self.ep = e_last;
        self.sum_e2 += se2;
        self.n_closed += m;
        // The largest |e_i|, evaluated only where the bound could raise the running maximum.
        if es.abs() + bd > self.max_abs {
            for i in 0..m {
                let e = es + d0 * cf.f[i] + dm * cf.g[i];
                self.max_abs = fmax(self.max_abs, e.abs());
            }
        }
        acc.z += sz;
        acc.e += se;
        acc.last = (z_last, e_last);
        Some((z0, e0))
    }
}

impl ZFeedback {
    /// A controller from `cfg` (validated with the prefix `feedback.`; distributions count at
    /// their centre, so [`resolve`](crate::param::resolve) the config first), at `z = 0` with
    /// a cleared memory.
    pub fn new(cfg: &FeedbackConfig) -> Result<Self> {
        cfg.validate("feedback.")?;
        Ok(Self {
            p_gain: cfg.p_gain.get(),
            i_gain: cfg.i_gain.get(),
            period: 1.0 / cfg.sample_rate.get(),
            z_speed_limit: cfg.z_speed_limit.get(),
            z_range: cfg.z_range.get(),
            saturation: cfg.saturation.get(),
            loop_gain: cfg.loop_gain.get(),
            z: 0.0,
            prev_error: 0.0,
            closed: None,
            closed_form: false,
            limited_only: false,
        })
    }

    /// Switches the closed-form path of [`scan_line`](Self::scan_line) on or off (default
    /// off). On, runs of samples along one linear piece of the profile are evaluated in
    /// closed form ([`ClosedForm`]: the linear regime's solution, affine in the controller
    /// state) wherever a bound proves that saturation, the speed limit and the z range stay
    /// inactive over them, and sample by sample elsewhere; a stable loop only. The results
    /// equal the per-sample loop up to rounding (≈ 1e-15 relative to the relief in the tests;
    /// the f32 outputs may differ in their last bit). One run costs about as much as a few
    /// samples of the loop, so it pays only at several samples per pixel
    /// (`benches/spm_feedback.rs` times both). Below 6 samples per pixel (from 1), where the
    /// pieces are too short for it, a line instead runs in one pass sample by sample without
    /// the per-piece set-up, bit for bit the loop, unless a limit could act (then as above).
    pub fn set_closed_form(&mut self, on: bool) {
        self.closed_form = on;
        self.refresh_closed();
    }

    /// Whether the closed-form path is on ([`set_closed_form`](Self::set_closed_form)).
    pub fn closed_form(&self) -> bool {
        self.closed_form
    }

    fn refresh_closed(&mut self) {
        self.closed = if self.closed_form {
            let (kp, ki) = self.effective_gains();
            ClosedForm::new(kp, ki * self.period, self.is_stable())
        } else {
            None
        };
    }

    /// Sets `K_p` (dimensionless, `[0, 10]`) and `K_i` (1/s, `[0, 1e7]`). Unstable gains are
    /// allowed (see [`is_stable`](Self::is_stable)); out-of-range or NaN values give an error
    /// naming `p_gain` or `i_gain` and leave the gains unchanged.
    pub fn set_gains(&mut self, p_gain: f64, i_gain: f64) -> Result<()> {
        check_gains(p_gain, i_gain, "")?;
        self.p_gain = p_gain;
        self.i_gain = i_gain;
        self.refresh_closed();
        Ok(())
    }

    /// The gains `(K_p, K_i)` as set, K_i in 1/s.
    pub fn gains(&self) -> (f64, f64) {
        (self.p_gain, self.i_gain)
    }

    /// The loop gain `g` (the gains acting on the loop are `g·K_p`, `g·K_i`).
    pub fn loop_gain(&self) -> f64 {
        self.loop_gain
    }

    /// The gains acting on the loop, `(g·K_p, g·K_i)`, K_i in 1/s.
    pub fn effective_gains(&self) -> (f64, f64) {
        (self.loop_gain * self.p_gain, self.loop_gain * self.i_gain)
    }

    /// Sets the z-speed limit `v_max`, m/s, in `(0, 1000]`; otherwise an error naming
    /// `z_speed_limit`, the limit unchanged.
    pub fn set_z_speed_limit(&mut self, v: f64) -> Result<()> {
        check_speed(v, "")?;
        self.z_speed_limit = v;
        Ok(())
    }

    /// The z-speed limit, m/s.
    pub fn z_speed_limit(&self) -> f64 {
        self.z_speed_limit
    }

    /// The controller period `T = 1/f_s`, s.
    pub fn period(&self) -> f64 {
        self.period
    }

    /// Half the z travel `R`, m (z stays within `±R`).
    pub fn z_range(&self) -> f64 {
        self.z_range
    }

    /// The lost-contact saturation `c` of the error, m.
    pub fn saturation(&self) -> f64 {
        self.saturation
    }

    /// The current z (the tip's set-point height), m.
    pub fn z(&self) -> f64 {
        self.z
    }

    /// Puts z at height `z` (m, clamped to `±R`; a NaN puts it at 0) and clears the controller
    /// memory (previous error = 0), as after an approach.
    pub fn engage(&mut self, z: f64) {
        let r = self.z_range;
        self.z = if z.is_nan() { 0.0 } else { z.clamp(-r, r) };
        self.prev_error = 0.0;
    }

    /// The two poles of the linearized loop (no saturation or limits), largest first:
    /// roots of `λ² − (1 − K_p − K_i T) λ − K_p = 0` with the effective gains
    /// ([`effective_gains`](Self::effective_gains)).
    pub fn poles(&self) -> [f64; 2] {
        let (kp, ki) = self.effective_gains();
        let b = 1.0 - kp - ki * self.period;
        let disc = (b * b + 4.0 * kp).sqrt();
        [0.5 * (b + disc), 0.5 * (b - disc)]
    }

    /// Whether the linearized loop is asymptotically stable (both poles inside the unit
    /// circle): `K_p < 1` and `0 < K_i T < 2(1 − K_p)` with the effective gains.
    pub fn is_stable(&self) -> bool {
        self.poles().iter().all(|p| p.abs() < 1.0)
    }

    fn law(&self) -> Law {
        let (kp, ki) = self.effective_gains();
        Law {
            kp,
            a: kp + ki * self.period,
            c: self.saturation,
            vt: self.z_speed_limit * self.period,
            r: self.z_range,
        }
    }

    /// Runs one controller sample against the true height `true_height` (m) and returns
    /// `(z_k, e_k)`: the z during the sample and its error signal; z then moves to `z_{k+1}`.
    /// [`scan_line`](Self::scan_line) is a sequence of these.
    pub fn step(&mut self, true_height: f64) -> Result<(f64, f64)> {
        if !true_height.is_finite() {
            return Err(PhysicsError::arg("true_height", "must be finite"));
        }
        let t = self.law().tick(self.z, self.prev_error, true_height);
        let z = self.z;
        self.z = t.z_next;
        self.prev_error = t.e;
        Ok((z, t.e))
    }

    /// Scans one line. `profile[j]` = true height at pixel j's centre (m), `pixel_time` s per
    /// pixel, `reverse` = scan from the last pixel to the first (retrace). Writes `height[j]`
    /// (mean z over the pixel's samples, m) and `error[j]` (mean error, m), indexed by pixel
    /// position in both directions. The state carries over to the next line. Allocates nothing.
    ///
    /// Errors: `profile`, `height` and `error` of different or zero lengths, a non-finite
    /// profile value, a `pixel_time` that is not positive and finite, or a line that would need
    /// more than [`MAX_LINE_SAMPLES`] samples.
    pub fn scan_line(
        &mut self,
        profile: &[f32],
        pixel_time: f64,
        reverse: bool,
        height: &mut [f32],
        error: &mut [f32],
    ) -> Result<LineStats> {
        self.scan_line_inner(profile, pixel_time, reverse, &[], height, error)
    }

    /// The number of controller samples in a line of `pixels` pixels at `pixel_time` s per
    /// pixel: `max(1, ⌈n·t_p/T − ½⌉)` (what [`scan_line_noisy`](Self::scan_line_noisy) needs).
    pub fn line_samples(&self, pixels: usize, pixel_time: f64) -> usize {
        let span = pixels as f64 * (pixel_time / self.period);
        (ceil(span - 0.5) as usize).max(1)
    }

    /// [`scan_line`](Self::scan_line) with measurement noise: sample `k` of the line reads the
    /// error `h_k − z_k + noise[k]` (m) before saturation, as noise on the interaction signal
    /// (e.g. tunnelling-current noise as a gap change) does. `noise`
    /// holds at least [`line_samples`](Self::line_samples) values, in scan order. Runs sample
    /// by sample (no closed form).
    pub fn scan_line_noisy(
        &mut self,
        profile: &[f32],
        pixel_time: f64,
        reverse: bool,
        noise: &[f64],
        height: &mut [f32],
        error: &mut [f32],
    ) -> Result<LineStats> {
        let need = self.line_samples(profile.len(), pixel_time);
        if noise.len() < need || noise.iter().any(|v| !v.is_finite()) {
            return Err(PhysicsError::arg(
                "noise",
                format!(
                    "must hold at least {need} finite values, got {}",
                    noise.len()
                ),
            ));
        }
        self.scan_line_inner(profile, pixel_time, reverse, noise, height, error)
    }

    /// [`scan_line`](Self::scan_line) with the pixel outputs in f64 (for comparisons at full
    /// precision).
    pub fn scan_line_f64(
        &mut self,
        profile: &[f32],
        pixel_time: f64,
        reverse: bool,
        height: &mut [f64],
        error: &mut [f64],
    ) -> Result<LineStats> {
        self.scan_line_inner(profile, pixel_time, reverse, &[], height, error)
    }

    fn scan_line_inner<T: Out>(
        &mut self,
        profile: &[f32],
        pixel_time: f64,
        reverse: bool,
        noise: &[f64],
        height: &mut [T],
        error: &mut [T],
    ) -> Result<LineStats> {
        let n = profile.len();
        if n == 0 {
            return Err(PhysicsError::arg("profile", "must hold at least one pixel"));
        }
        if height.len() != n {
            return Err(PhysicsError::arg(
                "height",
                format!("length {} differs from the profile's {n}", height.len()),
            ));
        }
        if error.len() != n {
            return Err(PhysicsError::arg(
                "error",
                format!("length {} differs from the profile's {n}", error.len()),
            ));
        }
        if let Some(j) = profile.iter().position(|v| !v.is_finite()) {
            return Err(PhysicsError::arg(
                "profile",
                format!("value at pixel {j} is not finite"),
            ));
        }
        if !(pixel_time > 0.0 && pixel_time.is_finite()) {
            return Err(PhysicsError::arg(
                "pixel_time",
                format!("must be positive and finite, got {pixel_time}"),
            ));
        }
        // Samples per pixel.
        let s = pixel_time / self.period;
        let span = n as f64 * s; // samples' worth of time in the line
        if !(span <= MAX_LINE_SAMPLES as f64) {
            return Err(PhysicsError::arg(
                "pixel_time",
                format!(
                    "a line of {n} pixels at {pixel_time} s per pixel needs {span:e} \
                     samples (at most {MAX_LINE_SAMPLES})"
                ),
            ));
        }
        let total_f = ceil(span - 0.5);
        let total = (total_f as usize).max(1);
        let idx = |m: usize| if reverse { n - 1 - m } else { m };
        if noise.is_empty()
            && self.closed.is_some()
            && !self.limited_only
            && (1.0..ONE_PASS_MAX_SPP).contains(&s)
            && let Some(st) =
                self.line_one_pass(profile, pixel_time, s, total, reverse, height, error)
        {
            return Ok(st);
        }
        let closed = if noise.is_empty() {
            self.closed.as_deref()
        } else {
            None
        };
        let mut run = Run {
            law: self.law(),
            noise,
            r: self.period / pixel_time,
            z: self.z,
            ep: self.prev_error,
            sum_e2: 0.0,
            max_abs: 0.0,
            n_lost: 0,
            n_clip: 0,
            n_closed: 0,
            limited_only: self.limited_only,
            skip_until: 0,
        };
        // First sample not yet run.
        let mut k = 0usize;
        // Last sample of the previous non-empty pixel (z, e), if any.
        let mut prev: Option<(f64, f64)> = None;
        // First pixel (scan order) still waiting for its nearest sample.
        let mut pending = 0usize;

        for m in 0..n {
            // Samples of pixel m (scan order): those with (k + ½)·T < (m + 1)·t_p.
            let k_end = if m + 1 == n {
                total
            } else {
                (ceil((m + 1) as f64 * s - 0.5).max(0.0) as usize).min(total)
            };
            if k_end <= k {
                continue; // no sample in this pixel
            }
            // In scan order the tip is at x = u − ½; pixel m's samples lie on the pieces
            // [m − 1, m] (u < m + ½) and [m, m + 1] of the interpolated profile (clamped at
            // the ends).
            let mf = m as f64;
            let pm = f64::from(profile[idx(m)]);
            let pp = if m > 0 {
                f64::from(profile[idx(m - 1)])
            } else {
                pm
            };
            let pn = if m + 1 < n {
                f64::from(profile[idx(m + 1)])
            } else {
                pm
            };
            let k_mid = (ceil((mf + 0.5) * s - 0.5).max(0.0) as usize).clamp(k, k_end);
            let (u1, b1) = (mf - 0.5, pm - pp);
            let (u2, b2) = (mf + 0.5, pn - pm);
            let mut acc = PixelSums {
                z: 0.0,
                e: 0.0,
                first: None,
                last: (0.0, 0.0),
            };
            // Pieces [k, k_mid) and [k_mid, k_end).
            if let Some(cf) = closed {
                run.piece_closed(cf, k, k_mid, (pp, u1, b1), &mut acc);
                run.piece_closed(cf, k_mid, k_end, (pm, u2, b2), &mut acc);
            } else {
                run.piece(k, k_mid, pp, u1, b1, &mut acc);
                run.piece(k_mid, k_end, pm, u2, b2, &mut acc);
            }
            // The first sample, which empty pixels before this one may need.
            let first = acc.first.unwrap_or(acc.last);
            // Empty pixels before this one: the nearest of the previous and this sample.
            // Sample times in units of T are k − ½ and k + ½; pixel q's centre is (q + ½)·s.
            for q in pending..m {
                let (zq, eq) = match prev {
                    Some(p) if (q as f64 + 0.5) * s <= k as f64 => p,
                    _ => first,
                };
                height[idx(q)] = T::from_f64(zq);
                error[idx(q)] = T::from_f64(eq);
            }
            let cnt = (k_end - k) as f64;
            height[idx(m)] = T::from_f64(acc.z / cnt);
            error[idx(m)] = T::from_f64(acc.e / cnt);
            prev = Some(acc.last);
            pending = m + 1;
            k = k_end;
        }
        if let Some((zl, el)) = prev {
            for q in pending..n {
                height[idx(q)] = T::from_f64(zl);
                error[idx(q)] = T::from_f64(el);
            }
        }
        self.z = run.z;
        self.prev_error = run.ep;
        let nk = total as f64;
        Ok(LineStats {
            // (The closed-form sums may round a zero sum of squares slightly below zero.)
            rms_error: (fmax(run.sum_e2, 0.0) / nk).sqrt(),
            max_abs_error: run.max_abs,
            lost_contact_fraction: run.n_lost as f64 / nk,
            z_clipped_fraction: run.n_clip as f64 / nk,
            samples: total,
            closed_form_samples: run.n_closed,
        })
    }
}

impl ZFeedback {
    /// The closed-form path's line at `s ∈ [1, ONE_PASS_MAX_SPP)` samples per pixel (every pixel
    /// holds a sample): the optimistic samples of [`Run::piece`] over the whole line in one loop,
    /// without the per-piece set-up, the same operations in the same order (so bit for bit the
    /// sample loop's pixels, statistics and state). `None`, with nothing changed but the outputs
    /// (which the caller then rewrites), as soon as a limit could act: the caller runs the line
    /// piece by piece.
    #[allow(clippy::too_many_arguments)]
    fn line_one_pass<T: Out>(
        &mut self,
        profile: &[f32],
        pixel_time: f64,
        s: f64,
        total: usize,
        reverse: bool,
        height: &mut [T],
        error: &mut [T],
    ) -> Option<LineStats> {
        if reverse {
            self.line_one_pass_dir::<T, true>(profile, pixel_time, s, total, height, error)
        } else {
            self.line_one_pass_dir::<T, false>(profile, pixel_time, s, total, height, error)
        }
    }

    /// [`Self::line_one_pass`] in one scan direction (`REVERSE`: the retrace). The pixel's
    /// sample range is `ceil_index` of the same products as in `scan_line_inner` (its integer
    /// form, the same numbers), and the neighbouring profile values are carried from pixel to
    /// pixel instead of read again.
    fn line_one_pass_dir<T: Out, const REVERSE: bool>(
        &mut self,
        profile: &[f32],
        pixel_time: f64,
        s: f64,
        total: usize,
        height: &mut [T],
        error: &mut [T],
    ) -> Option<LineStats> {
        let n = profile.len();
        if n == 0 || height.len() != n || error.len() != n {
            return None;
        }
        let law = self.law();
        let r = self.period / pixel_time;
        let idx = |m: usize| if REVERSE { n - 1 - m } else { m };
        let (mut z, mut ep) = (self.z, self.prev_error);
        let (mut sum_e2, mut max_abs) = (0.0f64, 0.0f64);
        let mut k = 0usize;
        // k + ½, exact.
        let mut kf = 0.5f64;
        let (neg_c, neg_r) = (-law.c, -law.r);
        // The profile at pixels m − 1, m and m + 1 (clamped at the ends).
        let mut pm = f64::from(profile[idx(0)]);
        let mut pp = pm;
        let mut pn = if n > 1 {
            f64::from(profile[idx(1)])
        } else {
            pm
        };
        // `m` as `f64`, counted (exact integers).
        let mut mf = 0.0f64;
        for m in 0..n {
            // The pixel's samples and its two pieces, as in `scan_line_inner`.
            let k_end = if m + 1 == n {
                total
            } else {
                ceil_index((mf + 1.0) * s - 0.5, total)
            };
            if k_end <= k {
                return None;
            }
            let k_mid = ceil_index((mf + 0.5) * s - 0.5, total).clamp(k, k_end);
            let k_start = k;
            let (mut az, mut ae) = (0.0f64, 0.0f64);
            let mut limited = false;
            let pieces = [
                (k_mid, pp, mf - 0.5, pm - pp),
                (k_end, pm, mf + 0.5, pn - pm),
            ];
            for (stop, h0, u0, slope) in pieces {
                while k < stop {
                    // The operations of `Run::piece`'s optimistic pass; `y` inside
                    // `(max(z − v_max T, −R), min(z + v_max T, R))` as four comparisons.
                    let h = h0 + (kf * r - u0) * slope;
                    let e = h - z;
                    let y = (z - law.kp * ep) + law.a * e;
                    limited |= !(e > neg_c)
                        | !(y > z - law.vt)
                        | !(y < z + law.vt)
                        | !(y > neg_r)
                        | !(y < law.r);
                    sum_e2 += e * e;
                    max_abs = fmax(max_abs, e.abs());
                    az += z;
                    ae += e;
                    z = y;
                    ep = e;
                    kf += 1.0;
                    k += 1;
                }
            }
            if limited {
                return None;
            }
            let cnt = (k_end - k_start) as f64;
            let at = idx(m);
            height[at] = T::from_f64(az / cnt);
            error[at] = T::from_f64(ae / cnt);
            pp = pm;
            pm = pn;
            mf += 1.0;
            if m + 2 < n {
                pn = f64::from(profile[idx(m + 2)]);
            }
        }
        self.z = z;
        self.prev_error = ep;
        let nk = total as f64;
        Some(LineStats {
            rms_error: (fmax(sum_e2, 0.0) / nk).sqrt(),
            max_abs_error: max_abs,
            lost_contact_fraction: 0.0,
            z_clipped_fraction: 0.0,
            samples: total,
            closed_form_samples: 0,
        })
    }
}

/// `(⌈x⌉ clamped at 0 as usize).min(total)` for `|x| < 2⁵³`, in integers: the same number as
/// `(ceil(x).max(0.0) as usize).min(total)` (NaN gives 0 either way) with one conversion.
#[inline(always)]
fn ceil_index(x: f64, total: usize) -> usize {
    let t = x as i64; // truncation toward zero
    let c = if (t as f64) < x { t + 1 } else { t };
    (c.max(0) as usize).min(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Controller period at the default 2 kHz, s.
    const T: f64 = 5e-4;

    fn controller(kp: f64, ki: f64, v_max: f64, c: f64) -> ZFeedback {
        let cfg = FeedbackConfig {
            p_gain: Param::fixed(kp),
            i_gain: Param::fixed(ki),
            z_speed_limit: Param::fixed(v_max),
            saturation: Param::fixed(c),
            ..FeedbackConfig::default()
        };
        ZFeedback::new(&cfg).unwrap()
    }

    fn scan(fb: &mut ZFeedback, profile: &[f32], tp: f64, reverse: bool) -> (Vec<f32>, Vec<f32>) {
        let mut h = vec![f32::NAN; profile.len()];
        let mut e = vec![f32::NAN; profile.len()];
        fb.scan_line(profile, tp, reverse, &mut h, &mut e).unwrap();
        (h, e)
    }

    /// Samples after the step until |e| < 5% of the step for good, from the closed-form
    /// solution `e_n = A₁λ₁ⁿ + A₂λ₂ⁿ` of the linear recurrence (independent of the code).
    fn predicted_settling(kp: f64, kit: f64) -> usize {
        let b = 1.0 - kp - kit;
        let disc = (b * b + 4.0 * kp).sqrt();
        let (l1, l2) = (0.5 * (b + disc), 0.5 * (b - disc));
        let a1 = l1 / (l1 - l2);
        let a2 = 1.0 - a1;
        let mut last = None;
        for n in 0..2000 {
            let e = a1 * l1.powi(n) + a2 * l2.powi(n);
            if e.abs() >= 0.05 {
                last = Some(n as usize);
            }
        }
        last.map_or(0, |l| l + 1)
    }

    #[test]
    fn step_settling_matches_closed_form_and_shrinks_with_gain() {
        // One sample per pixel: the pixel outputs are the samples, sample k sits at pixel k.
        let (hs, k0, n) = (0.39e-9f32, 50usize, 400usize);
        let profile: Vec<f32> = (0..n).map(|j| if j < k0 { 0.0 } else { hs }).collect();
        let mut settling = Vec::new();
        for ki in [100.0, 200.0, 400.0, 800.0, 1600.0] {
            let mut fb = controller(0.1, ki, 1e-6, 5e-9);
            assert!(fb.is_stable());
            fb.engage(0.0);
            let (h, e) = scan(&mut fb, &profile, T, false);
            assert!(e[..k0].iter().all(|&v| v == 0.0));
            // The first sample on the step sees the full step.
            assert!((e[k0] - hs).abs() < 1e-6 * hs);
            let last_big = (k0..n).rev().find(|&j| e[j].abs() >= 0.05 * hs).unwrap();
            let measured = last_big - k0 + 1;
            let predicted = predicted_settling(0.1, ki * T);
            assert!(
                measured.abs_diff(predicted) <= 1,
                "Ki {ki}: settling {measured} samples, closed form {predicted}"
            );
            assert!((h[n - 1] - hs).abs() < 1e-3 * hs, "tracks the step");
            settling.push(measured);
        }
        assert!(
            settling.windows(2).all(|w| w[1] < w[0]),
            "settling must shrink as Ki grows: {settling:?}"
        );
    }

    /// Length of the run of pixels from `start` on that satisfy `pred`.
    fn run_from(start: usize, n: usize, pred: impl Fn(usize) -> bool) -> usize {
        (start..n).take_while(|&j| pred(j)).count()
    }

    #[test]
    fn speed_limit_makes_a_parachute_tail_of_the_predicted_length() {
        let (hb, c, v) = (50e-9, 5e-9, 1e-6);
        let tp = 4.0 * T; // 2 ms per pixel, 4 samples per pixel
        let (n, a, b) = (220usize, 20usize, 100usize);
        let profile: Vec<f32> = (0..n)
            .map(|j| if (a..b).contains(&j) { hb as f32 } else { 0.0 })
            .collect();
        // K_i c = 5 µm/s > v_max: the descent is speed limited.
        let mut fb = controller(0.1, 1000.0, v, c);
        fb.engage(0.0);
        let mut h = vec![0f32; n];
        let mut e = vec![0f32; n];
        let stats = fb.scan_line(&profile, tp, false, &mut h, &mut e).unwrap();
        assert!(
            (f64::from(h[b - 5]) - hb).abs() < 1e-11,
            "settled on the block"
        );

        // Lost contact, the error pinned at -c, from the falling edge for (H - c)/v_max.
        let lost = run_from(b, n, |j| f64::from(e[j]) <= -0.99 * c);
        let lost_pred = (hb - c) / (v * tp) - 0.5;
        assert!(
            (lost as f64 - lost_pred).abs() <= 1.5,
            "lost-contact tail {lost} px, predicted {lost_pred}"
        );
        assert!(
            e[b..b + lost]
                .iter()
                .all(|&x| (f64::from(x) + c).abs() < 1e-3 * c)
        );
        // Samples with lost contact: (H - c)/(v_max T), up to the partial edge pixels.
        let lost_samples = stats.lost_contact_fraction * stats.samples as f64;
        assert!(
            (lost_samples - (hb - c) / (v * T)).abs() <= 2.0,
            "{lost_samples}"
        );
        // The height channel stays above the surface by > δ for (H - δ)/v_max.
        let delta = 2e-9;
        let tail = run_from(b, n, |j| f64::from(h[j] - profile[j]) > delta);
        let tail_pred = (hb - delta) / (v * tp) - 0.5;
        assert!(
            (tail as f64 - tail_pred).abs() <= 1.5,
            "height tail {tail} px, predicted {tail_pred}"
        );
        // z descends at v_max: 10 pixels apart in the tail differ by 10·v_max·t_p.
        let drop = f64::from(h[b + 5] - h[b + 15]);
        assert!(
            (drop - 10.0 * v * tp).abs() < 0.01 * 10.0 * v * tp,
            "{drop}"
        );

        // Without the speed limit (and a larger gain) the descent runs at K_i c = 9 µm/s.
        let ki = 1800.0;
        let mut fast = controller(0.1, ki, 1.0, c);
        assert!(fast.is_stable());
        fast.engage(0.0);
        let (hf, ef) = scan(&mut fast, &profile, tp, false);
        let lost_fast = run_from(b, n, |j| f64::from(ef[j]) <= -0.99 * c);
        let lost_fast_pred = (hb - c) / (ki * c * tp) - 0.5;
        assert!(
            (lost_fast as f64 - lost_fast_pred).abs() <= 1.0,
            "{lost_fast} vs {lost_fast_pred}"
        );
        let tail_fast = run_from(b, n, |j| f64::from(hf[j] - profile[j]) > delta);
        assert!(
            4 * tail_fast < tail,
            "fast tail {tail_fast} vs limited {tail}"
        );
    }

    /// Edge position (pixels) of a 0 → H step, from the area under the height: Σ (H − z_j)/H.
    fn edge(h: &[f32], hs: f32) -> f64 {
        h.iter().map(|&z| f64::from((hs - z) / hs)).sum()
    }

    /// Trace minus retrace edge position, and the trace edge, at `tp` s per pixel.
    fn trace_retrace_shift(tp: f64) -> (f64, f64) {
        let (hs, n) = (1e-9f32, 128usize);
        let profile: Vec<f32> = (0..n).map(|j| if j < n / 2 { 0.0 } else { hs }).collect();
        let mut fb = ZFeedback::new(&FeedbackConfig::default()).unwrap();
        fb.engage(0.0);
        let (trace, _) = scan(&mut fb, &profile, tp, false);
        let (retrace, _) = scan(&mut fb, &profile, tp, true);
        let (et, er) = (edge(&trace, hs), edge(&retrace, hs));
        (et - er, et)
    }

    #[test]
    fn trace_retrace_displacement_is_twice_scan_speed_over_ki() {
        let ki = FeedbackConfig::default().i_gain.get();
        let mut shifts = Vec::new();
        for tp in [8.0 * T, 4.0 * T] {
            let (shift, trace_edge) = trace_retrace_shift(tp);
            // v_scan = 1/t_p pixels per second.
            let lag = 1.0 / (ki * tp);
            assert!(
                (shift - 2.0 * lag).abs() < 0.02 * 2.0 * lag,
                "t_p {tp}: shift {shift} px, expected {}",
                2.0 * lag
            );
            assert!((trace_edge - 64.0 - lag).abs() < 0.02 * lag, "{trace_edge}");
            shifts.push(shift);
        }
        // Twice the scan speed, twice the displacement.
        assert!((shifts[1] / shifts[0] - 2.0).abs() < 0.03, "{shifts:?}");
        // The default scan (256 px at 0.5 lines/s: 7.8 samples per pixel, not an integer).
        let tp = 1.0 / 256.0;
        let (shift, _) = trace_retrace_shift(tp);
        let expected = 2.0 / (ki * tp);
        assert!(
            (shift - expected).abs() < 0.1 * expected,
            "{shift} vs {expected}"
        );
    }

    #[test]
    fn loop_gain_scales_the_gains_acting_on_the_loop() {
        // Gains (p, i) with loop gain g scan exactly as gains (g p, g i) with loop gain 1.
        let profile: Vec<f32> = (0..64).map(|j| if j < 32 { 0.0 } else { 2e-9 }).collect();
        let g = 2.5;
        let scaled = FeedbackConfig {
            p_gain: Param::fixed(0.1),
            i_gain: Param::fixed(200.0),
            loop_gain: Param::fixed(g),
            ..FeedbackConfig::default()
        };
        let mut a = ZFeedback::new(&scaled).unwrap();
        let mut b = controller(0.1 * g, 200.0 * g, 1e-6, 5e-9);
        assert_eq!(a.gains(), (0.1, 200.0));
        assert_eq!(a.effective_gains(), b.gains());
        assert_eq!(a.poles(), b.poles());
        let (mut ha, mut ea, mut hb, mut eb) = ([0f32; 64], [0f32; 64], [0f32; 64], [0f32; 64]);
        for reverse in [false, true] {
            let sa = a
                .scan_line(&profile, 1e-3, reverse, &mut ha, &mut ea)
                .unwrap();
            let sb = b
                .scan_line(&profile, 1e-3, reverse, &mut hb, &mut eb)
                .unwrap();
            assert_eq!((ha, ea, sa), (hb, eb, sb));
        }
        // Gains stable at g = 1 ring at g = 2.5.
        a.set_gains(0.3, 2000.0).unwrap();
        assert!(!a.is_stable());
        assert!(controller(0.3, 2000.0, 1e-6, 5e-9).is_stable());
        let bad = FeedbackConfig {
            loop_gain: Param::fixed(0.0),
            ..FeedbackConfig::default()
        };
        assert!(
            bad.validate("feedback.")
                .unwrap_err()
                .to_string()
                .contains("loop_gain")
        );
    }

    #[test]
    fn flat_surface_gives_zero_error_and_default_loop_is_stable() {
        let s = 3e-9f32;
        let profile = vec![s; 64];
        let mut fb = ZFeedback::new(&FeedbackConfig::default()).unwrap();
        assert!(fb.is_stable());
        let [l1, l2] = fb.poles();
        assert!(
            (l1 - 0.8657).abs() < 1e-3 && (l2 + 0.1155).abs() < 1e-3,
            "{l1} {l2}"
        );
        fb.engage(f64::from(s));
        for reverse in [false, true] {
            let mut h = vec![0f32; 64];
            let mut e = vec![1f32; 64];
            let st = fb
                .scan_line(&profile, 1.0 / 256.0, reverse, &mut h, &mut e)
                .unwrap();
            assert!(e.iter().all(|&x| x == 0.0));
            assert!(h.iter().all(|&x| x == s));
            assert_eq!(st.rms_error, 0.0);
            assert_eq!(st.lost_contact_fraction + st.z_clipped_fraction, 0.0);
        }
        // Engaged 3 nm off, the default loop converges and stays put.
        fb.engage(0.0);
        let mut rms = Vec::new();
        for line in 0..4 {
            let mut h = vec![0f32; 64];
            let mut e = vec![0f32; 64];
            let st = fb.scan_line(&profile, 1.0 / 256.0, line % 2 == 1, &mut h, &mut e);
            rms.push(st.unwrap().rms_error);
            if line > 0 {
                assert!(h.iter().all(|&x| (x - s).abs() < 1e-6 * s));
                assert!(e.iter().all(|&x| x.abs() < 1e-6 * s));
            }
        }
        assert!(rms[0] > 1e-10 && rms[1] < 1e-6 * rms[0], "{rms:?}");
    }

    #[test]
    fn stability_boundary_follows_the_jury_criterion() {
        let mut fb = ZFeedback::new(&FeedbackConfig::default()).unwrap();
        for kp in [0.0, 0.3, 0.6] {
            let edge_ki = 2.0 * (1.0 - kp) / T;
            fb.set_gains(kp, 0.99 * edge_ki).unwrap();
            assert!(fb.is_stable(), "kp {kp}");
            fb.set_gains(kp, 1.01 * edge_ki).unwrap();
            assert!(!fb.is_stable(), "kp {kp}");
        }
        fb.set_gains(1.05, 10.0).unwrap();
        assert!(!fb.is_stable());
        fb.set_gains(0.1, 0.0).unwrap();
        assert!(!fb.is_stable(), "no integral action: offsets never decay");
        // An unstable loop oscillates (bounded by the limits) instead of settling.
        fb.set_gains(0.1, 1.2 * 1.8 / T).unwrap();
        let profile = vec![0f32; 64];
        fb.engage(0.2e-9);
        let mut st = LineStats::default();
        for _ in 0..3 {
            let (mut h, mut e) = (vec![0f32; 64], vec![0f32; 64]);
            st = fb
                .scan_line(&profile, 1.0 / 256.0, false, &mut h, &mut e)
                .unwrap();
            assert!(h.iter().chain(&e).all(|x| x.is_finite()));
        }
        assert!(st.rms_error > 0.1e-9, "{st:?}");
        assert!(fb.z().abs() <= fb.z_range());
    }

    #[test]
    fn pixel_outputs_average_samples_and_fill_empty_pixels_with_the_nearest() {
        // Feedback off (z fixed at 0): the error channel reads the interpolated profile.
        let n = 16;
        let profile: Vec<f32> = (0..n).map(|j| j as f32 * 1e-9).collect();
        let mut fb = controller(0.0, 0.0, 1e-6, 5e-9);
        fb.engage(0.0);
        // Four samples per pixel at x = j - 3/8, j - 1/8, j + 1/8, j + 3/8: the mean is j.
        let (h, e) = scan(&mut fb, &profile, 4.0 * T, false);
        assert!(h.iter().all(|&x| x == 0.0));
        for (j, &ej) in e.iter().enumerate().take(n - 1).skip(1) {
            assert!((ej - j as f32 * 1e-9).abs() < 1e-15, "{j}: {ej}");
        }
        assert!((e[0] - 0.125e-9).abs() < 1e-15, "clamped at the line start");
        // Four pixels per sample: samples at u = 2, 6, 10, 14 (x = 1.5, 5.5, ...); the others
        // take the nearest sample in time, so e[j] = 4⌊j/4⌋ + 1.5 nm.
        let (_, e) = scan(&mut fb, &profile, T / 4.0, false);
        for (j, &ej) in e.iter().enumerate() {
            let want = (4 * (j / 4)) as f32 * 1e-9 + 1.5e-9;
            assert!((ej - want).abs() < 1e-15, "{j}: {ej} vs {want}");
        }
        // Retrace: indexed by position (not reversed), the samples at x = 15 - 1.5 - 4i.
        let (_, e) = scan(&mut fb, &profile, T / 4.0, true);
        for (j, &ej) in e.iter().enumerate() {
            let m = n - 1 - j;
            let want = 15e-9 - ((4 * (m / 4)) as f32 * 1e-9 + 1.5e-9);
            assert!((ej - want).abs() < 1e-15, "{j}: {ej} vs {want}");
        }
        // A line shorter than one period still takes one sample, used by every pixel.
        let st = fb
            .scan_line(&profile, 1e-9, false, &mut vec![0.0; n], &mut vec![0.0; n])
            .unwrap();
        assert_eq!(st.samples, 1);
    }

    #[test]
    fn scan_line_equals_a_sequence_of_steps() {
        let profile: Vec<f32> = (0..50).map(|j| ((j as f32) * 0.7).sin() * 8e-9).collect();
        let mut a = ZFeedback::new(&FeedbackConfig::default()).unwrap();
        let mut b = a.clone();
        let (h, e) = scan(&mut a, &profile, T, false);
        for j in 0..50 {
            let (z, err) = b.step(f64::from(profile[j])).unwrap();
            assert_eq!((z as f32, err as f32), (h[j], e[j]), "{j}");
        }
        assert_eq!(a, b);
        assert!(b.step(f64::NAN).is_err());
    }

    #[test]
    fn rejects_bad_arguments_and_configs() {
        let mut fb = ZFeedback::new(&FeedbackConfig::default()).unwrap();
        let p = vec![0f32; 8];
        let (mut h, mut e) = (vec![0f32; 8], vec![0f32; 8]);
        let arg = |r: Result<LineStats>| match r {
            Err(PhysicsError::InvalidArgument { argument, .. }) => argument,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            arg(fb.scan_line(&p, 1e-3, false, &mut [0.0; 7], &mut e)),
            "height"
        );
        assert_eq!(
            arg(fb.scan_line(&p, 1e-3, false, &mut h, &mut [0.0; 9])),
            "error"
        );
        assert_eq!(
            arg(fb.scan_line(&[], 1e-3, false, &mut [], &mut [])),
            "profile"
        );
        let mut bad = p.clone();
        bad[3] = f32::NAN;
        assert_eq!(
            arg(fb.scan_line(&bad, 1e-3, false, &mut h, &mut e)),
            "profile"
        );
        bad[3] = f32::INFINITY;
        assert_eq!(
            arg(fb.scan_line(&bad, 1e-3, false, &mut h, &mut e)),
            "profile"
        );
        for tp in [0.0, -1e-3, f64::NAN, f64::INFINITY, 1e9] {
            assert_eq!(
                arg(fb.scan_line(&p, tp, false, &mut h, &mut e)),
                "pixel_time"
            );
        }
        let before = fb.clone();
        let field = |r: Result<()>| match r {
            Err(PhysicsError::InvalidParameter { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(fb.set_gains(-0.1, 300.0)), "p_gain");
        assert_eq!(field(fb.set_gains(0.1, f64::NAN)), "i_gain");
        assert_eq!(field(fb.set_z_speed_limit(0.0)), "z_speed_limit");
        assert_eq!(field(fb.set_z_speed_limit(f64::INFINITY)), "z_speed_limit");
        assert_eq!(fb, before, "failed setters change nothing");
        fb.set_gains(0.2, 500.0).unwrap();
        assert_eq!(fb.gains(), (0.2, 500.0));
        fb.engage(f64::NAN);
        assert_eq!(fb.z(), 0.0);
        fb.engage(1.0);
        assert_eq!(fb.z(), fb.z_range());

        let d = FeedbackConfig::default();
        let cases: [(&str, FeedbackConfig); 6] = [
            (
                "p_gain",
                FeedbackConfig {
                    p_gain: Param::fixed(11.0),
                    ..d.clone()
                },
            ),
            (
                "i_gain",
                FeedbackConfig {
                    i_gain: Param::fixed(-1.0),
                    ..d.clone()
                },
            ),
            (
                "sample_rate",
                FeedbackConfig {
                    sample_rate: Param::fixed(0.0),
                    ..d.clone()
                },
            ),
            (
                "z_speed_limit",
                FeedbackConfig {
                    z_speed_limit: Param::fixed(f64::NAN),
                    ..d.clone()
                },
            ),
            (
                "z_range",
                FeedbackConfig {
                    z_range: Param::fixed(-1e-6),
                    ..d.clone()
                },
            ),
            (
                "saturation",
                FeedbackConfig {
                    saturation: Param::fixed(0.0),
                    ..d.clone()
                },
            ),
        ];
        for (name, cfg) in cases {
            match ZFeedback::new(&cfg) {
                Err(PhysicsError::InvalidParameter { field, .. }) => {
                    assert_eq!(field, format!("feedback.{name}"));
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn config_reads_units_from_toml() {
        let cfg: FeedbackConfig = toml::from_str(
            r#"
            p_gain = 0.2
            i_gain = "500 Hz"
            sample_rate = "4 kHz"
            z_speed_limit = "2 µm/s"
            z_range = "3 µm"
            saturation = "10 nm"
            "#,
        )
        .unwrap();
        cfg.validate("feedback.").unwrap();
        let fb = ZFeedback::new(&cfg).unwrap();
        assert_eq!(fb.gains(), (0.2, 500.0));
        assert!((fb.period() - 2.5e-4).abs() < 1e-18);
        assert!((fb.z_speed_limit() - 2e-6).abs() < 1e-18);
        assert!((fb.z_range() - 3e-6).abs() < 1e-18);
        assert!((fb.saturation() - 10e-9).abs() < 1e-20);
        assert!(toml::from_str::<FeedbackConfig>("gain = 1").is_err());
        let back: FeedbackConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    /// Scans `lines` lines (alternating direction) with the per-sample loop and with the
    /// closed-form path from the same state; returns the largest difference of any output
    /// (pixel values, rms and largest error, final z and error) over `scale`, and the
    /// closed-form and total sample counts. Counted outcomes (lost contact, clipping) must
    /// agree exactly.
    fn closed_vs_loop(
        fb: &ZFeedback,
        profile: &[f32],
        tp: f64,
        lines: usize,
        scale: f64,
    ) -> (f64, usize, usize) {
        let (mut a, mut b) = (fb.clone(), fb.clone());
        a.set_closed_form(false);
        b.set_closed_form(true);
        assert!(b.closed_form() && !a.closed_form());
        let n = profile.len();
        let mut worst = 0f64;
        let (mut closed, mut total) = (0, 0);
        for line in 0..lines {
            let rev = line % 2 == 1;
            let (mut ha, mut ea, mut hb, mut eb) =
                (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            let sa = a.scan_line_f64(profile, tp, rev, &mut ha, &mut ea).unwrap();
            let sb = b.scan_line_f64(profile, tp, rev, &mut hb, &mut eb).unwrap();
            assert_eq!(sa.closed_form_samples, 0);
            assert_eq!(sa.samples, sb.samples);
            assert_eq!(sa.lost_contact_fraction, sb.lost_contact_fraction);
            assert_eq!(sa.z_clipped_fraction, sb.z_clipped_fraction);
            closed += sb.closed_form_samples;
            total += sb.samples;
            for (x, y) in ha.iter().zip(&hb).chain(ea.iter().zip(&eb)) {
                worst = worst.max((x - y).abs());
            }
            worst = worst
                .max((sa.rms_error - sb.rms_error).abs())
                .max((sa.max_abs_error - sb.max_abs_error).abs())
                .max((a.z() - b.z()).abs())
                .max((a.prev_error - b.prev_error).abs());
        }
        (worst / scale, closed, total)
    }

    #[test]
    fn closed_form_matches_the_sample_loop_at_the_defaults() {
        // Terraces of 0.39 nm every 32 pixels, the default scan (7.8 samples per pixel).
        let profile: Vec<f32> = (0..256).map(|j| ((j / 32) as f32) * 0.39e-9).collect();
        let mut fb = ZFeedback::new(&FeedbackConfig::default()).unwrap();
        fb.engage(0.0);
        let (rel, closed, total) = closed_vs_loop(&fb, &profile, 1.0 / 256.0, 4, 2.73e-9);
        assert!(rel <= 1e-12, "{rel:e}");
        // Nearly all samples in closed form: not the speed limit (0.5 pm per sample) nor
        // saturation acts on 0.39 nm steps.
        assert!(closed as f64 >= 0.99 * total as f64, "{closed} of {total}");
    }

    /// Below 6 samples per pixel the closed-form path runs each line in one pass: bit for bit
    /// the sample loop (pixels at f64, statistics, final state) on piecewise-linear lines where
    /// no limit acts (and no closed-form run at all, though pieces of 3 samples would take
    /// one); where saturation and the speed limit act, the line falls back to the pieces and
    /// matches the loop to rounding (1e-12 of the relief).
    #[test]
    fn one_pass_lines_equal_the_sample_loop_bit_for_bit() {
        let n = 64;
        // Linear between knots, with a 0.3 nm step and a 40 nm block (the parachute).
        let knots = [0.0, 0.8, -0.5, 0.3, 1.0, -0.2];
        let line = |relief: f64, block: f64| -> Vec<f32> {
            (0..n)
                .map(|j| {
                    let x = j as f64 / n as f64 * (knots.len() - 1) as f64;
                    let i = x as usize;
                    let v = knots[i] * (1.0 - (x - i as f64)) + knots[i + 1] * (x - i as f64);
                    let step = if j > n / 2 { 0.3e-9 } else { 0.0 };
                    let b = if (40..48).contains(&j) { block } else { 0.0 };
                    (relief * v + step + b) as f32
                })
                .collect()
        };
        for (spp, relief) in [(1.0, 0.4e-9), (3.125, 0.4e-9), (5.5, 1e-9)] {
            let profile = line(relief, 0.0);
            let mut a = controller(0.1, 600.0, 1.0, 5e-9);
            a.engage(0.2e-9);
            let mut b = a.clone();
            b.set_closed_form(true);
            for l in 0..6 {
                let rev = l % 2 == 1;
                let (mut ha, mut ea, mut hb, mut eb) =
                    (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
                let sa = a
                    .scan_line_f64(&profile, spp * T, rev, &mut ha, &mut ea)
                    .unwrap();
                let sb = b
                    .scan_line_f64(&profile, spp * T, rev, &mut hb, &mut eb)
                    .unwrap();
                assert_eq!(
                    (ha, ea, sa),
                    (hb, eb, sb),
                    "{spp} samples per pixel, line {l}"
                );
                assert_eq!((a.z(), a.prev_error), (b.z(), b.prev_error));
            }
        }
        for spp in [2.3, 5.9] {
            let mut a = controller(0.1, 600.0, 1e-3, 5e-9);
            a.engage(0.2e-9);
            let profile = line(0.4e-9, 40e-9);
            let (rel, _, total) = closed_vs_loop(&a, &profile, spp * T, 6, 40e-9);
            assert!(rel <= 1e-12, "{rel:e}");
            let st = a
                .scan_line(&profile, spp * T, false, &mut [0.0; 64], &mut [0.0; 64])
                .unwrap();
            assert!(st.lost_contact_fraction > 0.02 && total > 6 * 64, "{st:?}");
        }
    }

    #[test]
    fn closed_form_falls_back_where_limits_act_and_still_matches() {
        // The parachute case: a 50 nm block, saturation 5 nm, speed limited descent.
        let (n, c) = (220usize, 5e-9);
        let profile: Vec<f32> = (0..n)
            .map(|j| if (20..100).contains(&j) { 50e-9 } else { 0.0 })
            .collect();
        for (kp, ki, v) in [(0.1, 1000.0, 1e-6), (0.1, 1800.0, 1.0), (0.3, 500.0, 2e-5)] {
            let mut fb = controller(kp, ki, v, c);
            fb.engage(0.0);
            let mut probe = fb.clone();
            probe.set_closed_form(true);
            let st = probe
                .scan_line(&profile, 8.0 * T, false, &mut [0.0; 220], &mut [0.0; 220])
                .unwrap();
            assert!(st.lost_contact_fraction > 0.0, "saturation acts");
            assert!(
                st.closed_form_samples > 0 && st.closed_form_samples < st.samples,
                "{st:?}"
            );
            let (rel, _, _) = closed_vs_loop(&fb, &profile, 8.0 * T, 3, 50e-9);
            assert!(rel <= 1e-12, "kp {kp} ki {ki} v {v}: {rel:e}");
        }
        // The z range: a profile beyond ±R pins z at the range.
        let mut fb = controller(0.1, 300.0, 1.0, c);
        fb.engage(0.0);
        let tall: Vec<f32> = (0..64).map(|j| if j < 32 { 0.0 } else { 1.5e-6 }).collect();
        let (rel, closed, total) = closed_vs_loop(&fb, &tall, 8.0 * T, 2, 1.5e-6);
        assert!(rel <= 1e-12 && closed < total, "{rel:e} {closed} {total}");
        // An unstable loop never takes the closed form.
        let mut fb = controller(0.1, 1.2 * 1.8 / T, 1e-6, c);
        fb.set_closed_form(true);
        let st = fb
            .scan_line(&profile, 8.0 * T, false, &mut [0.0; 220], &mut [0.0; 220])
            .unwrap();
        assert_eq!(st.closed_form_samples, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn closed_form_matches_the_sample_loop_to_rounding(
            knots in proptest::collection::vec(-1.0f64..1.0, 2..12),
            n in 1usize..120,
            relief in prop_oneof![Just(0.4e-9), Just(5e-9), Just(60e-9)],
            offset in -5e-7f64..5e-7,
            kp in 0.0f64..0.9,
            frac in 0.01f64..0.99,
            samples_per_pixel in prop_oneof![0.3f64..1.0, 1.0f64..12.0, 30.0f64..80.0],
            v_max in prop_oneof![Just(1e-6), Just(1e-5), Just(1.0)],
            c in prop_oneof![Just(1e-9), Just(5e-9)],
            z0 in -1e-9f64..1e-9,
            lines in 1usize..4,
        ) {
            // A random piecewise-smooth profile: linear between random knots, with a step.
            let profile: Vec<f32> = (0..n)
                .map(|j| {
                    let x = j as f64 / n as f64 * (knots.len() - 1) as f64;
                    let i = (x as usize).min(knots.len() - 2);
                    let t = x - i as f64;
                    let v = knots[i] * (1.0 - t) + knots[i + 1] * t;
                    let step = if j > n / 2 { 0.5 } else { 0.0 };
                    (offset + relief * (v + step)) as f32
                })
                .collect();
            let ki = frac * 2.0 * (1.0 - kp) / T;
            let mut fb = controller(kp, ki, v_max, c);
            fb.engage(f64::from(profile[0]) + z0);
            let scale = relief.max(offset.abs());
            let (rel, _, _) = closed_vs_loop(&fb, &profile, samples_per_pixel * T, lines, scale);
            prop_assert!(rel <= 1e-12, "{:e}", rel);
        }
    }

    /// Scans `lines` lines (alternating direction) with `fb` and with a copy that runs every
    /// sample with the limits; asserts the pixels, the statistics and the final state equal bit
    /// for bit, and returns the fractions of samples with lost contact and clipped z.
    fn optimistic_vs_limited(fb: &ZFeedback, profile: &[f32], tp: f64, lines: usize) -> f64 {
        let (mut a, mut b) = (fb.clone(), fb.clone());
        b.limited_only = true;
        let n = profile.len();
        let mut limited = 0.0;
        for line in 0..lines {
            let rev = line % 2 == 1;
            let (mut ha, mut ea, mut hb, mut eb) =
                (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            let sa = a.scan_line_f64(profile, tp, rev, &mut ha, &mut ea).unwrap();
            let sb = b.scan_line_f64(profile, tp, rev, &mut hb, &mut eb).unwrap();
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&ha), bits(&hb), "height, line {line}");
            assert_eq!(bits(&ea), bits(&eb), "error, line {line}");
            assert_eq!(sa, sb);
            assert_eq!(
                (a.z.to_bits(), a.prev_error.to_bits()),
                (b.z.to_bits(), b.prev_error.to_bits())
            );
            limited += sa.lost_contact_fraction + sa.z_clipped_fraction;
        }
        limited
    }

    #[test]
    fn optimistic_samples_equal_the_limited_loop_bit_for_bit() {
        // Without limits acting (0.39 nm terraces), and with each limit acting: saturation and
        // the speed limit behind a 50 nm block, the z range on a 1.5 µm step.
        let terraces: Vec<f32> = (0..256).map(|j| ((j / 32) as f32) * 0.39e-9).collect();
        let block: Vec<f32> = (0..220)
            .map(|j| if (20..100).contains(&j) { 50e-9 } else { 0.0 })
            .collect();
        let tall: Vec<f32> = (0..64).map(|j| if j < 32 { 0.0 } else { 1.5e-6 }).collect();
        let mut fb = ZFeedback::new(&FeedbackConfig::default()).unwrap();
        fb.engage(0.0);
        assert_eq!(optimistic_vs_limited(&fb, &terraces, 1.0 / 256.0, 4), 0.0);
        for (profile, v) in [(&block, 1e-6), (&block, 1.0), (&tall, 1.0)] {
            let mut fb = controller(0.1, 1000.0, v, 5e-9);
            fb.engage(0.0);
            for spp in [0.5, 1.0, 3.125, 8.0] {
                assert!(
                    optimistic_vs_limited(&fb, profile, spp * T, 3) > 0.0,
                    "limits act"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn optimistic_samples_equal_the_limited_loop_on_random_lines(
            profile in proptest::collection::vec(-60e-9f32..60e-9, 1..80),
            kp in 0.0f64..1.2,
            frac in 0.01f64..1.3,
            spp in prop_oneof![0.3f64..1.0, 1.0f64..5.0, 5.0f64..40.0],
            v_max in prop_oneof![Just(1e-7), Just(1e-5), Just(1.0)],
            c in prop_oneof![Just(1e-9), Just(5e-9), Just(1e-7)],
            z0 in -1e-7f64..1e-7,
        ) {
            let ki = frac * 2.0 * (1.0 - kp).abs().max(0.05) / T;
            let mut fb = controller(kp, ki, v_max, c);
            fb.engage(z0);
            optimistic_vs_limited(&fb, &profile, spp * T, 3);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn outputs_finite_and_z_in_range(
            profile in proptest::collection::vec(-2e-6f32..2e-6, 1..80),
            kp in 0.0f64..0.9,
            frac in 0.01f64..0.99,
            tp in 1e-5f64..2e-2,
            v_max in 1e-7f64..1e-2,
            z0 in -2e-6f64..2e-6,
            reverse in any::<bool>(),
            lines in 1usize..4,
        ) {
            let ki = frac * 2.0 * (1.0 - kp) / T;
            let mut fb = controller(kp, ki, v_max, 5e-9);
            prop_assert!(fb.is_stable());
            fb.engage(z0);
            let start = fb.clone();
            let n = profile.len();
            let r = fb.z_range() as f32;
            let c = fb.saturation() as f32;
            let mut outs = Vec::new();
            for line in 0..lines {
                let (mut h, mut e) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                let st = fb
                    .scan_line(&profile, tp, reverse ^ (line % 2 == 1), &mut h, &mut e)
                    .unwrap();
                prop_assert!(h.iter().all(|&x| x.is_finite() && x.abs() <= r * (1.0 + 1e-6)));
                prop_assert!(e.iter().all(|&x| x.is_finite() && x >= -c * (1.0 + 1e-6)));
                prop_assert!(st.rms_error.is_finite() && st.max_abs_error >= st.rms_error * (1.0 - 1e-12));
                prop_assert!((0.0..=1.0).contains(&st.lost_contact_fraction));
                prop_assert!((0.0..=1.0).contains(&st.z_clipped_fraction));
                prop_assert!(st.samples >= 1);
                prop_assert!(fb.z().abs() <= fb.z_range());
                outs.push((h, e, st));
            }
            // Deterministic: the same state and input give the same bits.
            let mut again = start;
            for (line, (h0, e0, st0)) in outs.iter().enumerate() {
                let (mut h, mut e) = (vec![0f32; n], vec![0f32; n]);
                let st = again
                    .scan_line(&profile, tp, reverse ^ (line % 2 == 1), &mut h, &mut e)
                    .unwrap();
                prop_assert_eq!(&st, st0);
                prop_assert!(h.iter().zip(h0).all(|(a, b)| a.to_bits() == b.to_bits()));
                prop_assert!(e.iter().zip(e0).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
            prop_assert_eq!(again, fb);
        }
    }
}
