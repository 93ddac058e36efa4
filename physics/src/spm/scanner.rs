//! Scanner imperfections of a scanning probe microscope (DESIGN.md §5 "Scanning"): thermal
//! drift that settles after the engage, piezo creep after offset jumps, fast-axis hysteresis,
//! and height noise (white, 1/f and per-line offsets).
//!
//! # Model
//!
//! **Coordinates.** Lab coordinates in metres (see [`crate::instrument`]). Pixel `(i, j)` (row
//! `i` on the slow axis, column `j` on the fast axis) of a frame of `H × W` pixels of size `p`
//! centred on `c` is commanded at `x = c_x + (j − (W−1)/2)·p`, `y = c_y + (i − (H−1)/2)·p`. A
//! line starting at `t_start` visits its `k`-th pixel (in scan order) at the middle of its dwell,
//! `t = t_start + (k + ½)·dwell`; the trace visits columns `0 → W−1` (`k = j`), the retrace
//! `W−1 → 0` (`k = W−1−j`). The sample drifts relative to the lab by `d(t)`, so the tip's
//! position on the sample is
//!
//! `r_sample = r_cmd + hysteresis − creep deficit(t) − d(t)`.
//!
//! **Thermal drift.** The engage is at `t = 0`. The drift speed relaxes from `v₀`
//! (`drift_initial`, default 5 nm/min) toward `v_s` (`drift_settled`, default 0.5 nm/min) with
//! time constant `τ` (`drift_settle_time`, default 10 min), `v(t) = v_s + (v₀ − v_s) e^{−t/τ}`,
//! along the direction `θ` (`drift_direction`). Integrated in closed form:
//!
//! `d(t) = [v_s t + (v₀ − v_s) τ (1 − e^{−t/τ})]·(cos θ, sin θ) + w(t)`,
//!
//! where `w(t)` is a random walk with diffusivity `D` (`drift_diffusivity`): each axis gains
//! `N(0, 2 D Δt)` whenever the scanner's clock advances by `Δt`. The walk persists across lines
//! and frames. Within one line it is drawn at the line's start and end and interpolated linearly
//! (the Brownian-bridge mean; the omitted in-line fluctuation, `√(D·t_line/2)`, is far below a
//! picometre for realistic `D`). Low-temperature STM: set all three drift rates far lower.
//!
//! **Piezo creep.** When the scan centre jumps by `Δ` at `t_j` ([`Scanner::move_center`]), the
//! piezo reaches only `(1 − c)·Δ` at once (`c` = `creep_fraction`, default 5 %) and creeps the
//! rest logarithmically in time, with `t₀` = `creep_time` (default 1 s) and settling time
//! `T = 100·t₀` ([`CREEP_SETTLE_RATIO`]):
//!
//! `deficit(t) = c·Δ·max(0, 1 − log₁₀(1 + (t − t_j)/t₀) / log₁₀(1 + T/t₀))` for `t ≥ t_j`.
//!
//! Every jump creeps, proportionally to its size; overlapping jumps add up, and settled ones are
//! forgotten. The deficit of one jump never exceeds `c·|Δ|` and decays monotonically to 0.
//!
//! **Hysteresis.** On the fast axis the actual position bows away from the command, in opposite
//! directions on trace and retrace: with `u = (j + ½)/W ∈ (0, 1)` across the line, `L = W·p`
//! the line length and `s = +1` (trace) or `−1` (retrace),
//!
//! `x_actual = x_cmd + s·h·(L/2)·(1 − (2u − 1)²)`,
//!
//! so trace and retrace differ by `2·h·(L/2)·(1 − (2u − 1)²)`, at most `h·L` at the line's
//! centre (`h` = `hysteresis`, default 1 %).
//!
//! **Height noise** ([`Scanner::add_line_noise`]), in metres, added in scan order:
//! - white, r.m.s. `white_noise` (default 20 pm), independent per pixel;
//! - 1/f (pink), r.m.s. `pink_noise` (default 50 pm) over 0.01 Hz–1 kHz: the sum of
//!   [`PINK_COMPONENTS`] Ornstein-Uhlenbeck (AR(1)) processes with equal variance
//!   `pink_noise²/N` and corner frequencies `f_k` log-spaced about one octave apart from
//!   [`PINK_LOW`] to [`PINK_HIGH`]. Each has spectrum `∝ 1/(f_k (1 + (f/f_k)²))`, and their sum
//!   falls as `1/f` between the extreme corners. A process's state persists from line to line,
//!   sampled with the pixel period `Δt` as `x ← a x + σ_k √(1 − a²) ξ`, `a = e^{−2π f_k Δt}`.
//!   Slow processes are advanced exactly every `m` pixels (`2π f_k m Δt ≈ 0.05`) and interpolated
//!   linearly in between; processes far faster than the pixel rate (`2π f_k Δt > 6`) are
//!   uncorrelated from pixel to pixel and are drawn as white noise;
//! - a line offset, r.m.s. `line_offset` (default 100 pm), one independent draw per line and
//!   direction, added to all the line's pixels.
//!
//! **Height errors before the loop** ([`Scanner::add_line_z_errors`], all off by default), added
//! to the height the tip must follow, so the z feedback tracks them (they reach the height
//! channel through the loop, with its lag):
//! - plane tilt `[θx, θy]` (`tilt`): `tan θx · x + tan θy · y` at the tip's sample-frame
//!   position;
//! - scanner bow (`bow_curvature` `κ`, 1/m): `κ (X² + Y²)/2` at the piezo's lateral excursion
//!   `(X, Y)` from the tube axis (the lab origin; the commanded position with hysteresis, less
//!   the creep deficit). A tube of length `L` swings its end on an arc of radius `L`, whose sag
//!   at excursion `r` is `L − √(L² − r²) ≈ r²/(2L)`: `|κ| = 1/L`, its sign set by whether the
//!   arc lifts the tip off the sample (`κ = −1/L`, a dome) or the sample toward it;
//! - z drift (`z_drift` `v_z`, m/s, and a random walk of diffusivity `z_drift_diffusivity`):
//!   `v_z t + w_z(t)`, the walk advanced with the clock like the lateral one and interpolated
//!   linearly within a line.
//!
//! **Detector noise before the loop** ([`Scanner::add_detector_noise`], off by default): white
//! noise of one-sided density `ρ` (`detector_noise`, m/√Hz), `N(0, ρ²/(2 t_p))` per pixel of
//! dwell `t_p`, and a 1/f bank (`detector_pink_noise`), added to the height the loop is handed:
//! the loop's closed-loop transfer function shapes it, unlike the height noise above, which is
//! added to the recorded height after the loop.
//!
//! ```
//! use scopegym_physics::instrument::ScanSettings;
//! use scopegym_physics::rng::seeded;
//! use scopegym_physics::spm::scanner::{Scanner, ScannerConfig};
//! let mut rng = seeded(3);
//! let mut sc = Scanner::new(&ScannerConfig::default(), &mut rng).unwrap();
//! let settings = ScanSettings {
//!     rows: 64,
//!     cols: 64,
//!     pixel_size: 1e-9,
//!     dwell_time: 1e-3,
//!     flyback_time: 0.0,
//!     center: [0.0, 0.0],
//! };
//! let (mut xs, mut ys) = (vec![0.0; 64], vec![0.0; 64]);
//! sc.line_positions(&settings, 0, 0.0, false, &mut rng, &mut xs, &mut ys).unwrap();
//! assert!(xs[0] < xs[63]);
//! let mut heights = vec![0.0f32; 64];
//! sc.add_line_noise(&mut heights, settings.dwell_time, false, &mut rng);
//! assert!(heights.iter().all(|h| h.abs() < 2e-9));
//! // Ten minutes after the engage the sample has drifted about 33 nm.
//! sc.advance(600.0, &mut rng);
//! let [dx, dy] = sc.drift();
//! assert!((30e-9..37e-9).contains(&dx.hypot(dy)));
//! ```

use crate::error::{PhysicsError, Result, check_range};
use crate::instrument::ScanSettings;
use crate::param::Param;
use crate::param::dims::{Angle, Diffusivity, Length, Time, Unitless, Velocity};
use crate::rng::{SimRng, normal};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use std::ops::Bound::{Excluded, Included};

/// The creep settling time in units of `creep_time`: a jump's deficit reaches 0 at
/// `t − t_j = CREEP_SETTLE_RATIO · creep_time`.
pub const CREEP_SETTLE_RATIO: f64 = 100.0;

/// Lowest corner frequency of the 1/f noise, Hz.
pub const PINK_LOW: f64 = 0.01;

/// Highest corner frequency of the 1/f noise, Hz.
pub const PINK_HIGH: f64 = 1000.0;

/// Number of AR(1) processes summed into the 1/f noise (corners ≈ one octave apart).
pub const PINK_COMPONENTS: usize = 18;

/// Most pixels between the nodes at which [`Scanner::line_positions`] evaluates the
/// deterministic drift and the creep when they are interpolated
/// ([`Scanner::set_interpolated_drift`]) ...
pub const DRIFT_NODE_PIXELS: usize = 8;
/// ... fewer where the interpolation error bound would exceed this fraction of a pixel.
pub const DRIFT_NODE_TOLERANCE: f64 = 1e-3;

/// Decay `2π f_k m Δt` between the nodes of a slowly varying 1/f process.
const NODE_DECAY: f64 = 0.05;

/// Decay per pixel above which a 1/f process is drawn as white noise (`e^{-6} ≈ 0.0025`), by
/// default ([`Scanner::set_white_decay`]).
pub const WHITE_DECAY: f64 = 6.0;

/// Scanner imperfections (`[scanner]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScannerConfig {
    /// Thermal drift speed just after the engage (t = 0), m/s. Default 5 nm/min.
    pub drift_initial: Param<Velocity>,
    /// Drift speed once settled, m/s. Default 0.5 nm/min (typically 0.1-1 nm/min).
    pub drift_settled: Param<Velocity>,
    /// Time constant of the exponential settling of the drift speed, s. Default 10 min.
    pub drift_settle_time: Param<Time>,
    /// Drift direction (angle from +x toward +y), rad. Default 0.5 rad.
    pub drift_direction: Param<Angle>,
    /// Diffusivity of the random walk added to the drift (per axis, variance `2 D Δt`), m²/s.
    /// Default 1e-22 m²/s (≈ 0.1 nm r.m.s. per minute).
    pub drift_diffusivity: Param<Diffusivity>,
    /// Fraction of an offset jump left to creep, in [0, 0.5]. Default 0.05.
    pub creep_fraction: Param<Unitless>,
    /// Time scale `t₀` of the logarithmic creep, s; the creep settles after 100·t₀. Default 1 s.
    pub creep_time: Param<Time>,
    /// Fast-axis hysteresis `h`: trace and retrace bow apart by up to `h` times the line length,
    /// in [0, 0.25]. Default 0.01.
    pub hysteresis: Param<Unitless>,
    /// White height noise (r.m.s. per pixel), m. Default 20 pm.
    pub white_noise: Param<Length>,
    /// 1/f height noise (r.m.s. over 0.01 Hz-1 kHz), m. Default 50 pm.
    pub pink_noise: Param<Length>,
    /// Height offset of each line (r.m.s., independent per line and direction), m. Default 100 pm.
    pub line_offset: Param<Length>,
    /// Sample plane tilt `[θx, θy]`, rad, each in `[−0.5, 0.5]`: the sample surface rises by
    /// `tan θx` per metre along x and `tan θy` along y of the sample frame. Default `[0, 0]`.
    pub tilt: [Param<Angle>; 2],
    /// Scanner bow: signed curvature `κ` of the surface the piezo tube's end sweeps, 1/m, in
    /// `[−1e4, 1e4]`; the height error at a lateral excursion `r` from the tube axis is
    /// `κ r²/2`. A tube of length `L` swings its end on an arc of radius `L`: `|κ| = 1/L`.
    /// Default 0.
    pub bow_curvature: Param<Unitless>,
    /// Speed of the z drift (the sample creeping toward the tip: heights rise), m/s, in
    /// `(−1 µm/s, 1 µm/s)`. Default 0.
    pub z_drift: Param<Velocity>,
    /// Diffusivity of a random walk added to the z drift (variance `2 D Δt`), m²/s, in
    /// `[0, 1e-12)`. Default 0.
    pub z_drift_diffusivity: Param<Diffusivity>,
    /// White detector noise before the feedback loop (deflection or gap error), one-sided
    /// amplitude spectral density, m/√Hz, in `[0, 1e-9)`; a pixel of dwell `t_p` gets
    /// `N(0, ρ²/(2 t_p))`. Default 0.
    pub detector_noise: Param<Unitless>,
    /// 1/f detector noise before the feedback loop, r.m.s. over 0.01 Hz-1 kHz, m, in
    /// `[0, 10 nm)` (the same AR(1) bank as `pink_noise`). Default 0.
    pub detector_pink_noise: Param<Length>,
}

impl Default for ScannerConfig {
    fn default() -> Self {
        Self {
            drift_initial: Param::fixed(5e-9 / 60.0),
            drift_settled: Param::fixed(0.5e-9 / 60.0),
            drift_settle_time: Param::fixed(600.0),
            drift_direction: Param::fixed(0.5),
            drift_diffusivity: Param::fixed(1e-22),
            creep_fraction: Param::fixed(0.05),
            creep_time: Param::fixed(1.0),
            hysteresis: Param::fixed(0.01),
            white_noise: Param::fixed(20e-12),
            pink_noise: Param::fixed(50e-12),
            line_offset: Param::fixed(100e-12),
            tilt: [Param::fixed(0.0), Param::fixed(0.0)],
            bow_curvature: Param::fixed(0.0),
            z_drift: Param::fixed(0.0),
            z_drift_diffusivity: Param::fixed(0.0),
            detector_noise: Param::fixed(0.0),
            detector_pink_noise: Param::fixed(0.0),
        }
    }
}

impl ScannerConfig {
    /// Checks ranges (NaN is rejected everywhere); `prefix` is prepended to field names in errors.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let f = |name: &str| format!("{prefix}{name}");
        for (n, v) in [
            ("drift_initial", self.drift_initial.get()),
            ("drift_settled", self.drift_settled.get()),
        ] {
            check_range(&f(n), v, 0.0..1e-6, "m/s")?;
        }
        let tau = self.drift_settle_time.get();
        check_range(
            &f("drift_settle_time"),
            tau,
            (Excluded(0.0), Included(1e6)),
            "s",
        )?;
        let finite = (Excluded(f64::NEG_INFINITY), Excluded(f64::INFINITY));
        check_range(
            &f("drift_direction"),
            self.drift_direction.get(),
            finite,
            "rad",
        )?;
        for (n, v) in [
            ("drift_diffusivity", self.drift_diffusivity.get()),
            ("z_drift_diffusivity", self.z_drift_diffusivity.get()),
        ] {
            check_range(&f(n), v, 0.0..1e-12, "m²/s")?;
        }
        check_range(
            &f("creep_fraction"),
            self.creep_fraction.get(),
            0.0..=0.5,
            "",
        )?;
        let t0 = self.creep_time.get();
        check_range(&f("creep_time"), t0, (Excluded(0.0), Included(1e4)), "s")?;
        check_range(&f("hysteresis"), self.hysteresis.get(), 0.0..=0.25, "")?;
        for (n, v) in [
            ("white_noise", self.white_noise.get()),
            ("pink_noise", self.pink_noise.get()),
            ("line_offset", self.line_offset.get()),
            ("detector_pink_noise", self.detector_pink_noise.get()),
        ] {
            check_range(&f(n), v, 0.0..1e-8, "m")?;
        }
        for (k, t) in self.tilt.iter().enumerate() {
            check_range(&f(&format!("tilt[{k}]")), t.get(), -0.5..=0.5, "rad")?;
        }
        check_range(
            &f("bow_curvature"),
            self.bow_curvature.get(),
            -1e4..=1e4,
            "1/m",
        )?;
        let vz = self.z_drift.get();
        check_range(&f("z_drift"), vz, (Excluded(-1e-6), Excluded(1e-6)), "m/s")?;
        let rho = self.detector_noise.get();
        check_range(&f("detector_noise"), rho, 0.0..1e-9, "m/√Hz")
    }
}

/// One offset jump that is still creeping.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CreepEvent {
    /// Time of the jump, s.
    t: f64,
    /// Initial deficit `c·Δ`, m.
    deficit: [f64; 2],
}

/// One AR(1) (Ornstein-Uhlenbeck) process of the 1/f noise, advanced at nodes `len` pixels
/// apart and interpolated linearly between them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PinkProcess {
    /// Corner frequency, Hz.
    corner: f64,
    /// Standard deviation, m.
    sd: f64,
    /// Value at the last node, m.
    v0: f64,
    /// Value at the next node, m.
    v1: f64,
    /// Pixels since the last node.
    pos: usize,
    /// Pixels between the last and the next node (0: no next node drawn yet).
    len: usize,
    /// Node step `m` and its AR(1) coefficients `(a, sd·sqrt(1 - a²))`, cached for `cached_dt`.
    cached: (usize, f64, f64),
    /// Pixel period the cache is for, s (NaN: none).
    cached_dt: f64,
}

impl PinkProcess {
    /// Draws the next node when the current segment is finished (nodes `m` pixels apart, AR(1)
    /// coefficients `(a, b)` per node); returns the segment's slope per pixel, m.
    #[inline]
    fn segment(&mut self, (m, a, b): (usize, f64, f64), rng: &mut SimRng) -> f64 {
        if self.pos >= self.len {
            if self.len > 0 {
                self.v0 = self.v1;
            }
            self.len = m;
            self.v1 = a * self.v0 + b * normal(rng);
            self.pos = 0;
        }
        (self.v1 - self.v0) / self.len as f64
    }

    /// The node step `m` and the AR(1) coefficients `(a, sd·sqrt(1 − a²))` per node at pixel
    /// period `pixel_time` (s), `r = 2π f_k · pixel_time`; cached.
    #[inline]
    fn coefficients(&mut self, r: f64, pixel_time: f64) -> (usize, f64, f64) {
        if self.cached_dt != pixel_time {
            let m = ((NODE_DECAY / r).floor() as usize).clamp(1, 1 << 30);
            let a = (-r * m as f64).exp();
            self.cached = (m, a, self.sd * (1.0 - a * a).max(0.0).sqrt());
            self.cached_dt = pixel_time;
        }
        self.cached
    }

    /// The process's value at the next pixel, when no interpolated segment is under way
    /// (`pos ≥ len`): the pending node, or the initial state before the first node.
    fn next_value(&self) -> f64 {
        if self.len > 0 { self.v1 } else { self.v0 }
    }
}

/// Most 1/f processes [`PinkFilter`] takes.
const FILTER_MAX: usize = 8;

/// The 1/f processes with a node every pixel plus the white noise, simulated as one Gaussian
/// process through its innovations (Kalman) representation: per pixel one normal draw of the
/// innovation `e ~ N(0, S)`, output `y = Σ x̂_k + e` and `x̂ ← A x̂ + K e`, with the predicted
/// state `x̂` (the processes' conditional mean given the output so far), its error covariance
/// `P`, `S = Σ_kl P_kl + R` and `K = A P 1 / S` (`A = diag(a_k)`, `Q = diag(b_k²)`,
/// `R` the white variance), `P ← A (P − P 1 1ᵀ P / S) A + Q`. This is the chain rule of the
/// joint Gaussian distribution of the outputs, so the outputs have exactly the distribution of
/// the sum of the independent AR(1) processes and white noise (the same mean 0 and
/// covariances at every lag) at one normal draw per pixel instead of one per process plus one.
/// `P` starts at 0 (the processes' values are known when they enter) and is updated per pixel
/// until it stops changing (successive values within [`FILTER_SETTLE`] of its trace), then
/// held with its gain.
#[derive(Debug, Clone, PartialEq)]
struct PinkFilter {
    /// Bit `k` set: process `k` of the bank is in the filter.
    members: u32,
    /// Number of processes, their bank indices, `a_k` and `b_k²`.
    n: usize,
    idx: [usize; FILTER_MAX],
    a: [f64; FILTER_MAX],
    q: [f64; FILTER_MAX],
    /// White variance `R`, m².
    r: f64,
    /// Predicted state `x̂` (the processes at the next pixel), m.
    x: [f64; FILTER_MAX],
    /// Its error covariance `P`, m².
    p: [[f64; FILTER_MAX]; FILTER_MAX],
    /// Settled: the constant gain `K` and innovation standard deviation `√S`.
    settled: Option<([f64; FILTER_MAX], f64)>,
}

/// Relative change of the filter's `P` (to its trace) per pixel below which it is held.
const FILTER_SETTLE: f64 = 1e-14;

impl PinkFilter {
    /// Sets the coefficients (`a`, `q` in member order) and the white variance; when any
    /// changed, `P` is updated per pixel again until it settles.
    fn set(&mut self, a: &[f64], q: &[f64], r: f64) {
        let n = self.n;
        if self.a[..n] != a[..n] || self.q[..n] != q[..n] || self.r != r {
            self.a[..n].copy_from_slice(&a[..n]);
            self.q[..n].copy_from_slice(&q[..n]);
            self.r = r;
            self.settled = None;
        }
    }

    /// Adds the filter's output to `line`.
    fn add(&mut self, line: &mut [f32], rng: &mut SimRng) {
        let n = self.n;
        let mut v = line.iter_mut();
        while self.settled.is_none() {
            let Some(out) = v.next() else { return };
            // g = P 1, S = 1ᵀ P 1 + R.
            let mut g = [0.0; FILTER_MAX];
            for (gk, row) in g[..n].iter_mut().zip(&self.p[..n]) {
                *gk = row[..n].iter().sum();
            }
            let s = g[..n].iter().sum::<f64>() + self.r;
            let e = if s > 0.0 { s.sqrt() * normal(rng) } else { 0.0 };
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            *out += (self.x[..n].iter().sum::<f64>() + e) as f32;
            let (mut change, mut trace) = (0.0f64, 0.0f64);
            for k in 0..n {
                self.x[k] = self.a[k] * (self.x[k] + g[k] * inv * e);
                for l in 0..n {
                    let new = self.a[k] * self.a[l] * (self.p[k][l] - g[k] * g[l] * inv)
                        + if k == l { self.q[k] } else { 0.0 };
                    change = change.max((new - self.p[k][l]).abs());
                    self.p[k][l] = new;
                }
                trace += self.p[k][k];
            }
            if change <= FILTER_SETTLE * trace {
                let mut g = [0.0; FILTER_MAX];
                for (gk, row) in g[..n].iter_mut().zip(&self.p[..n]) {
                    *gk = row[..n].iter().sum();
                }
                let s = g[..n].iter().sum::<f64>() + self.r;
                let mut gain = [0.0; FILTER_MAX];
                if s > 0.0 {
                    for k in 0..n {
                        gain[k] = self.a[k] * g[k] / s;
                    }
                }
                self.settled = Some((gain, s.max(0.0).sqrt()));
            }
        }
        let Some((gain, sd)) = self.settled else {
            return;
        };
        let (a, x) = (&self.a[..n], &mut self.x[..n]);
        for out in v {
            let e = sd * normal(rng);
            *out += (x.iter().sum::<f64>() + e) as f32;
            for ((xk, ak), gk) in x.iter_mut().zip(a).zip(&gain[..n]) {
                *xk = ak * *xk + gk * e;
            }
        }
    }

    /// Hands the state back to the processes: draws their values at the next pixel from
    /// `N(x̂, P)` (their distribution given the output so far) as pending nodes.
    fn release(&self, pink: &mut [PinkProcess], rng: &mut SimRng) {
        let n = self.n;
        // Cholesky factor of P (positive semi-definite: pivots at or below 0 are taken as 0).
        let mut l = [[0.0f64; FILTER_MAX]; FILTER_MAX];
        for i in 0..n {
            for j in 0..=i {
                let s = self.p[i][j] - (0..j).map(|k| l[i][k] * l[j][k]).sum::<f64>();
                if i == j {
                    l[i][i] = s.max(0.0).sqrt();
                } else if l[j][j] > 0.0 {
                    l[i][j] = s / l[j][j];
                }
            }
        }
        let mut z = [0.0f64; FILTER_MAX];
        for zk in &mut z[..n] {
            *zk = normal(rng);
        }
        for i in 0..n {
            let c = &mut pink[self.idx[i]];
            c.v1 = self.x[i] + (0..=i).map(|k| l[i][k] * z[k]).sum::<f64>();
            (c.len, c.pos) = (1, 1);
        }
    }
}

/// The scanner of an SPM: drift, creep, hysteresis and height noise, with state that persists
/// across lines and frames (the drift's random walk, creep events, the 1/f noise).
///
/// See the [module docs](self) for the model.
#[derive(Debug, Clone)]
pub struct Scanner {
    v_initial: f64,
    v_settled: f64,
    settle_time: f64,
    direction: [f64; 2],
    diffusivity: f64,
    creep_fraction: f64,
    creep_time: f64,
    hysteresis: f64,
    white: f64,
    line_offset: f64,
    /// Scanner clock, s since the engage.
    clock: f64,
    /// Random-walk part of the drift at `clock`, m.
    walk: [f64; 2],
    creep: Vec<CreepEvent>,
    pink: Vec<PinkProcess>,
    /// Plane tilt as slopes `[tan θx, tan θy]`.
    tilt: [f64; 2],
    /// Bow curvature `κ`, 1/m.
    bow: f64,
    /// z drift speed, m/s, and its random walk's diffusivity, m²/s.
    z_rate: f64,
    z_diffusivity: f64,
    /// Random-walk part of the z drift at `clock`, m.
    z_walk: f64,
    /// The z walk at the ends of the line last positioned: `(t_a, t_b, w_a, w_b)`.
    z_span: (f64, f64, f64, f64),
    /// Detector noise before the loop: white density, m/√Hz, and the 1/f bank.
    detector: f64,
    detector_pink: Vec<PinkProcess>,
    /// Interpolate the drift and creep along a line between nodes
    /// ([`Scanner::set_interpolated_drift`]).
    interpolated_drift: bool,
    /// Decay per pixel above which a 1/f process is drawn as white noise
    /// ([`Scanner::set_white_decay`]).
    white_decay: f64,
    /// Simulate the pixel-rate 1/f processes and the white noise of the height noise through
    /// one innovation per pixel ([`Scanner::set_single_innovation`]), and the filter doing it.
    single_innovation: bool,
    filter: Option<PinkFilter>,
    /// Scratch of [`add_interpolated_sum`]: the slope changes along a line, m per pixel.
    slope_scratch: Vec<f64>,
}

/// The AR(1) bank of a 1/f noise of r.m.s. `rms` from `n` processes, corners log-spaced from
/// [`PINK_LOW`] to [`PINK_HIGH`], initial states drawn from `rng`.
fn pink_bank(rms: f64, n: usize, rng: &mut SimRng) -> Vec<PinkProcess> {
    let sd = rms / (n as f64).sqrt();
    (0..n)
        .map(|k| {
            let corner = PINK_LOW * (PINK_HIGH / PINK_LOW).powf(k as f64 / (n - 1) as f64);
            PinkProcess {
                corner,
                sd,
                v0: sd * normal(rng),
                v1: 0.0,
                pos: 0,
                len: 0,
                cached: (1, 0.0, 0.0),
                cached_dt: f64::NAN,
            }
        })
        .collect()
}

/// Adds the 1/f bank `pink` to `line` (heights, m, in scan order, pixel period `pixel_time`
/// s), continuing each process; returns `white_var` plus the variance of the processes too
/// fast to resolve (or of all of them if `pixel_time` is not a positive finite time), which the
/// caller adds as white noise.
fn add_pink(
    pink: &mut [PinkProcess],
    line: &mut [f32],
    pixel_time: f64,
    (mut white_var, white_decay): (f64, f64),
    rng: &mut SimRng,
) -> f64 {
    let valid_dt = pixel_time > 0.0 && pixel_time.is_finite();
    let n = line.len();
    for c in pink {
        let r = 2.0 * PI * c.corner * pixel_time;
        if !valid_dt || r > white_decay {
            white_var += c.sd * c.sd;
            continue;
        }
        let (m, a, b) = c.coefficients(r, pixel_time);
        if m == 1 && c.pos >= c.len {
            // A node every pixel: the same recursion as below without the interpolation,
            // with the state in locals (the generator cannot alias it).
            if n == 0 {
                continue;
            }
            // The first node ever keeps v0 where it is.
            let mut v0 = if c.len > 0 { c.v1 } else { c.v0 };
            let mut v1 = a * v0 + b * normal(rng);
            line[0] += v0 as f32;
            for v in line[1..].iter_mut() {
                v0 = v1;
                v1 = a * v0 + b * normal(rng);
                *v += v0 as f32;
            }
            (c.v0, c.v1, c.len, c.pos) = (v0, v1, 1, 1);
            continue;
        }
        add_interpolated(c, line, (m, a, b), rng);
    }
    white_var
}

/// Continues the process `c` over `line` with nodes `m` pixels apart and AR(1) coefficients
/// `(a, b)` per node, interpolated linearly in between (a segment already begun is finished
/// first).
#[inline]
fn add_interpolated(
    c: &mut PinkProcess,
    line: &mut [f32],
    (m, a, b): (usize, f64, f64),
    rng: &mut SimRng,
) {
    let n = line.len();
    let mut i = 0;
    while i < n {
        let slope = c.segment((m, a, b), rng);
        let k = (c.len - c.pos).min(n - i);
        let base = c.v0 + slope * c.pos as f64;
        for (s, v) in line[i..i + k].iter_mut().enumerate() {
            *v += (base + slope * s as f64) as f32;
        }
        c.pos += k;
        i += k;
    }
}

/// Adds the sum of the processes `procs` (each with its `(m, a, b)` as in
/// [`add_interpolated`]) to `line` in one pass: each process walks its segments as
/// [`add_interpolated`] does (the same draws in the same order, the same final state), but only
/// records its value at the first pixel and its slope's changes in `ds` (resized to
/// `line.len() + 1`); the sum of the piecewise-linear interpolants, itself piecewise linear and
/// continuous, is then accumulated pixel by pixel in `f64` and added to `line` once. The values
/// equal [`add_interpolated`]'s sum up to `f64` rounding of the accumulation (a few `f64` ulps
/// per pixel, against [`add_interpolated`]'s one `f32` rounding per process and pixel).
fn add_interpolated_sum<'a>(
    procs: impl Iterator<Item = (&'a mut PinkProcess, (usize, f64, f64))>,
    line: &mut [f32],
    ds: &mut Vec<f64>,
    rng: &mut SimRng,
) {
    let n = line.len();
    ds.clear();
    ds.resize(n + 1, 0.0);
    let mut start = 0.0;
    let mut any = false;
    for (c, (m, a, b)) in procs {
        let mut i = 0;
        while i < n {
            let slope = c.segment((m, a, b), rng);
            let k = (c.len - c.pos).min(n - i);
            if i == 0 {
                start += c.v0 + slope * c.pos as f64;
            }
            ds[i] += slope;
            ds[i + k] -= slope;
            c.pos += k;
            i += k;
        }
        any = true;
    }
    if !any || n == 0 {
        return;
    }
    let (mut value, mut slope) = (start, 0.0);
    for (v, &d) in line.iter_mut().zip(ds.iter()) {
        *v += value as f32;
        slope += d;
        value += slope;
    }
}

/// The commanded geometry of one line: pixel `j`'s fast-axis command (with hysteresis) and
/// time, and the line's slow-axis command.
struct LineGeometry {
    center_x: f64,
    p: f64,
    bow: f64,
    mid_col: f64,
    cols: usize,
    y_cmd: f64,
    t_start: f64,
    dwell: f64,
    reverse: bool,
}

impl LineGeometry {
    fn new(
        settings: &ScanSettings,
        hysteresis: f64,
        row: usize,
        t_start: f64,
        reverse: bool,
    ) -> Self {
        let ScanSettings {
            rows,
            cols,
            pixel_size: p,
            dwell_time: dwell,
            center,
            ..
        } = *settings;
        let half_len = 0.5 * cols as f64 * p;
        Self {
            center_x: center[0],
            p,
            bow: if reverse { -1.0 } else { 1.0 } * hysteresis * half_len,
            mid_col: 0.5 * (cols as f64 - 1.0),
            cols,
            y_cmd: center[1] + (row as f64 - 0.5 * (rows as f64 - 1.0)) * p,
            t_start,
            dwell,
            reverse,
        }
    }

    /// `(x_cmd, t)` of pixel column `j`: its commanded fast-axis position with hysteresis, m,
    /// and the time the tip is there, s.
    #[inline(always)]
    fn pixel(&self, j: usize) -> (f64, f64) {
        let k = if self.reverse { self.cols - 1 - j } else { j };
        self.pixel_at(j as f64, k as f64)
    }

    /// [`Self::pixel`] of column `jf` visited `kf`-th (both integers, as `f64`).
    #[inline(always)]
    fn pixel_at(&self, jf: f64, kf: f64) -> (f64, f64) {
        self.command(jf, kf, (jf + 0.5) / self.cols as f64)
    }

    /// [`Self::pixel_at`] with the column's fraction of the line `(jf + ½)/cols` taken as
    /// `(jf + ½)·inv_cols` (`inv_cols = 1/cols`): no division, the same values up to rounding.
    #[inline(always)]
    fn pixel_scaled(&self, jf: f64, kf: f64, inv_cols: f64) -> (f64, f64) {
        self.command(jf, kf, (jf + 0.5) * inv_cols)
    }

    /// The command and time of column `jf` visited `kf`-th, at the fraction `u` of the line.
    #[inline(always)]
    fn command(&self, jf: f64, kf: f64, u: f64) -> (f64, f64) {
        let t = self.t_start + (kf + 0.5) * self.dwell;
        let x_cmd = self.center_x
            + (jf - self.mid_col) * self.p
            + self.bow * (1.0 - (2.0 * u - 1.0).powi(2));
        (x_cmd, t)
    }
}

impl Scanner {
    /// A scanner just after the engage (clock 0, no drift yet, no creep). `cfg` must hold fixed
    /// values (distributions are read at their centre; resolve them first); it is validated
    /// with the prefix `scanner.`. `rng` draws the initial state of the 1/f noise.
    pub fn new(cfg: &ScannerConfig, rng: &mut SimRng) -> Result<Self> {
        Self::with_pink_components(cfg, PINK_COMPONENTS, rng)
    }

    /// [`Scanner::new`] with the 1/f noise summed from `components` AR(1) processes (at least
    /// 2, at most [`PINK_COMPONENTS`]) instead of [`PINK_COMPONENTS`]: the same total variance
    /// `pink_noise²` and the same extreme corners, the corners `(PINK_HIGH/PINK_LOW)^(1/(N−1))`
    /// apart. Fewer processes cost fewer normal draws per pixel; the spectrum stays ∝ 1/f
    /// between the corners with a ripple that grows with the spacing (the fast SPM model,
    /// [`crate::spm::sim::SpmFidelity::Fast`], uses 9: corners a factor 4.2 apart).
    pub fn with_pink_components(
        cfg: &ScannerConfig,
        components: usize,
        rng: &mut SimRng,
    ) -> Result<Self> {
        cfg.validate("scanner.")?;
        if !(2..=PINK_COMPONENTS).contains(&components) {
            return Err(PhysicsError::arg(
                "components",
                format!("must be in 2..={PINK_COMPONENTS}, got {components}"),
            ));
        }
        let dir = cfg.drift_direction.get();
        let pink = pink_bank(cfg.pink_noise.get(), components, rng);
        // Drawn only when switched on, so that the streams stay as they were without it.
        let detector_pink = if cfg.detector_pink_noise.get() > 0.0 {
            pink_bank(cfg.detector_pink_noise.get(), components, rng)
        } else {
            Vec::new()
        };
        Ok(Self {
            v_initial: cfg.drift_initial.get(),
            v_settled: cfg.drift_settled.get(),
            settle_time: cfg.drift_settle_time.get(),
            direction: [dir.cos(), dir.sin()],
            diffusivity: cfg.drift_diffusivity.get(),
            creep_fraction: cfg.creep_fraction.get(),
            creep_time: cfg.creep_time.get(),
            hysteresis: cfg.hysteresis.get(),
            white: cfg.white_noise.get(),
            line_offset: cfg.line_offset.get(),
            clock: 0.0,
            walk: [0.0, 0.0],
            creep: Vec::with_capacity(16),
            pink,
            tilt: [cfg.tilt[0].get().tan(), cfg.tilt[1].get().tan()],
            bow: cfg.bow_curvature.get(),
            z_rate: cfg.z_drift.get(),
            z_diffusivity: cfg.z_drift_diffusivity.get(),
            z_walk: 0.0,
            z_span: (0.0, 0.0, 0.0, 0.0),
            detector: cfg.detector_noise.get(),
            detector_pink,
            interpolated_drift: false,
            white_decay: WHITE_DECAY,
            single_innovation: false,
            filter: None,
            slope_scratch: Vec::new(),
        })
    }

    /// With `on`, [`Scanner::line_positions`] evaluates the deterministic drift and the creep
    /// (an `expm1` and a `ln_1p` per creep event) only at nodes up to [`DRIFT_NODE_PIXELS`]
    /// pixels apart (and at the line's ends) and interpolates linearly in between (the fast
    /// SPM model, [`crate::spm::sim::SpmFidelity::Fast`]). Both are smooth in time: the error
    /// is at most `h²/8` times their largest second time derivative, `Σ|D|/(t₀² ln 101)` over
    /// the creep deficits `D` (`t₀` = `creep_time`) plus `|v₀ − v_s|/τ` for the drift
    /// (`τ` = `drift_settle_time`), over a node interval `h`; the node interval is shortened
    /// so that this bound stays below [`DRIFT_NODE_TOLERANCE`] of a pixel (exact pixels where
    /// it would be under 2). The random walk was already interpolated linearly; on this path its
    /// fraction of the line and the hysteresis' position along it are taken with reciprocals
    /// instead of a division per pixel (rounding apart, the same). Default off (exact at every
    /// pixel).
    pub fn set_interpolated_drift(&mut self, on: bool) {
        self.interpolated_drift = on;
    }

    /// Draws the 1/f processes whose decay per pixel `2π f_k Δt` exceeds `decay` as white noise
    /// of their variance (default [`WHITE_DECAY`], 6: a correlation `e^{−6}` between pixels).
    /// The total variance stays `pink_noise²`; a lower threshold whitens processes whose
    /// pixel-to-pixel correlation `e^{−decay}` is small and saves their normal draws (the fast
    /// SPM model, [`crate::spm::sim::SpmFidelity::Fast`], uses 2: correlations below 0.14).
    /// Errors unless `decay` is positive and finite.
    pub fn set_white_decay(&mut self, decay: f64) -> Result<()> {
        if !(decay > 0.0 && decay.is_finite()) {
            return Err(PhysicsError::arg(
                "decay",
                format!("must be positive and finite, got {decay}"),
            ));
        }
        self.white_decay = decay;
        Ok(())
    }

    /// With `on`, [`Scanner::add_line_noise`] and [`Scanner::add_line_noise_with_white`] draw
    /// the 1/f processes that have a node every pixel (`2π f_k Δt` above 0.025 and at most
    /// the white decay, [`Scanner::set_white_decay`]) together with the white noise as one
    /// Gaussian process driven by one normal draw per pixel: the innovations (Kalman)
    /// representation of their sum, which has exactly its distribution (the same covariance at
    /// every lag, so the same spectrum and r.m.s.; the filter's error covariance is held once
    /// it changes by less than 10⁻¹⁴ of its trace per pixel). Processes enter it with their
    /// current values and leave it (when the pixel period moves them out of that band) with
    /// values drawn from their distribution given the output so far. The fast SPM model
    /// ([`crate::spm::sim::SpmFidelity::Fast`]) uses it; default off. Other random streams
    /// than with it off.
    pub fn set_single_innovation(&mut self, on: bool) {
        self.single_innovation = on;
    }

    /// The fast path of [`Scanner::add_line_noise_with_white`]: `line` in scan order, the 1/f
    /// bank's slow processes as usual, the pixel-rate ones and all the white noise (variance
    /// `white_var`) through the filter. Returns false (nothing done, filter released) where it
    /// does not apply: an invalid pixel time, no pixel-rate process, more than
    /// [`FILTER_MAX`], or one entering mid-segment.
    fn add_line_noise_filtered(
        &mut self,
        line: &mut [f32],
        pixel_time: f64,
        mut white_var: f64,
        rng: &mut SimRng,
    ) -> bool {
        let valid_dt = pixel_time > 0.0 && pixel_time.is_finite();
        let current = self.filter.as_ref().map_or(0, |f| f.members);
        let mut members = 0u32;
        let (mut a, mut q) = ([0.0; FILTER_MAX], [0.0; FILTER_MAX]);
        let mut count = 0;
        let mut ok = valid_dt && self.pink.len() <= 32;
        if ok {
            for (k, c) in self.pink.iter_mut().enumerate() {
                let r = 2.0 * PI * c.corner * pixel_time;
                if r > self.white_decay {
                    continue;
                }
                let (m, ak, bk) = c.coefficients(r, pixel_time);
                if m != 1 {
                    continue;
                }
                if count == FILTER_MAX || (current & (1 << k) == 0 && c.pos < c.len) {
                    ok = false;
                    break;
                }
                members |= 1 << k;
                (a[count], q[count]) = (ak, bk * bk);
                count += 1;
            }
        }
        ok &= members != 0;
        if current != members || !ok {
            if let Some(f) = self.filter.take() {
                f.release(&mut self.pink, rng);
            }
        }
        if !ok {
            return false;
        }
        let white_decay = self.white_decay;
        let slow = self.pink.iter_mut().enumerate().filter_map(|(k, c)| {
            let r = 2.0 * PI * c.corner * pixel_time;
            if r > white_decay {
                white_var += c.sd * c.sd;
                None
            } else if members & (1 << k) == 0 {
                let coeffs = c.coefficients(r, pixel_time);
                Some((c, coeffs))
            } else {
                None
            }
        });
        add_interpolated_sum(slow, line, &mut self.slope_scratch, rng);
        let pink = &self.pink;
        let filter = self.filter.get_or_insert_with(|| {
            let mut f = PinkFilter {
                members,
                n: count,
                idx: [0; FILTER_MAX],
                a: [f64::NAN; FILTER_MAX],
                q: [f64::NAN; FILTER_MAX],
                r: f64::NAN,
                x: [0.0; FILTER_MAX],
                p: [[0.0; FILTER_MAX]; FILTER_MAX],
                settled: None,
            };
            let mut i = 0;
            for (k, c) in pink.iter().enumerate() {
                if members & (1 << k) != 0 {
                    (f.idx[i], f.x[i]) = (k, c.next_value());
                    i += 1;
                }
            }
            f
        });
        filter.set(&a, &q, white_var);
        filter.add(line, rng);
        true
    }

    /// A bound on the second time derivative of [`Self::slow_offset`] (either axis), m/s².
    fn slow_curvature(&self) -> f64 {
        let norm = 1.0 / CREEP_SETTLE_RATIO.ln_1p();
        let creep: f64 = self
            .creep
            .iter()
            .map(|e| e.deficit[0].hypot(e.deficit[1]))
            .sum::<f64>()
            * norm
            / (self.creep_time * self.creep_time);
        creep + (self.v_initial - self.v_settled).abs() / self.settle_time
    }

    /// The deterministic drift plus the creep deficit at time `t` (s), m: what
    /// [`Scanner::line_positions`] subtracts from the command besides the random walk.
    #[inline]
    fn slow_offset(&self, t: f64) -> [f64; 2] {
        let det = self.deterministic_drift(t);
        let creep = self.creep_deficit(t);
        [creep[0] + det[0], creep[1] + det[1]]
    }

    /// The scanner's clock: s since the engage.
    pub fn clock(&self) -> f64 {
        self.clock
    }

    /// Current sample displacement relative to the lab, m: the deterministic drift at the
    /// clock plus the random walk accumulated so far.
    pub fn drift(&self) -> [f64; 2] {
        let d = self.deterministic_drift(self.clock);
        [d[0] + self.walk[0], d[1] + self.walk[1]]
    }

    /// The deterministic part of the drift at time `t` (s), m:
    /// `[v_s t + (v₀ − v_s) τ (1 − e^{−t/τ})]·(cos θ, sin θ)`; zero before the engage (`t ≤ 0`).
    pub fn deterministic_drift(&self, t: f64) -> [f64; 2] {
        let t = t.max(0.0);
        let tau = self.settle_time;
        let s = self.v_settled * t + (self.v_initial - self.v_settled) * tau * -(-t / tau).exp_m1();
        [s * self.direction[0], s * self.direction[1]]
    }

    /// The deterministic drift velocity at time `t` (s), m/s:
    /// `[v_s + (v₀ − v_s) e^{−t/τ}]·(cos θ, sin θ)`; zero before the engage (`t < 0`).
    pub fn drift_velocity(&self, t: f64) -> [f64; 2] {
        if !(t >= 0.0) {
            return [0.0, 0.0];
        }
        let v = self.v_settled + (self.v_initial - self.v_settled) * (-t / self.settle_time).exp();
        [v * self.direction[0], v * self.direction[1]]
    }

    /// Moves the scanner's clock forward to the absolute time `t` (s), adding the random walk
    /// over the elapsed time. Times at or before the clock, and non-finite times, change nothing.
    pub fn advance(&mut self, t: f64, rng: &mut SimRng) {
        if !(t.is_finite() && t > self.clock) {
            return;
        }
        let dt = t - self.clock;
        if self.diffusivity > 0.0 {
            let sd = (2.0 * self.diffusivity * dt).sqrt();
            for w in &mut self.walk {
                *w += sd * normal(rng);
            }
        }
        if self.z_diffusivity > 0.0 {
            self.z_walk += (2.0 * self.z_diffusivity * dt).sqrt() * normal(rng);
        }
        self.clock = t;
    }

    /// Records a jump of the scan centre from `from` to `to` (lab coordinates, m) at time `t`
    /// (s): the piezo then lags by [`Scanner::creep_deficit`]. Jumps settled by `t` are
    /// forgotten. Non-finite arguments are ignored.
    pub fn move_center(&mut self, from: [f64; 2], to: [f64; 2], t: f64) {
        if !(t.is_finite() && from.iter().chain(&to).all(|v| v.is_finite())) {
            return;
        }
        self.forget_settled(t);
        let c = self.creep_fraction;
        let deficit = [c * (to[0] - from[0]), c * (to[1] - from[1])];
        if deficit != [0.0, 0.0] {
            self.creep.push(CreepEvent { t, deficit });
        }
    }

    /// Number of offset jumps still creeping (not yet forgotten).
    pub fn creeping_jumps(&self) -> usize {
        self.creep.len()
    }

    /// How far the piezo lags behind the commanded centre at time `t` (s), m: the sum over
    /// remembered jumps of `c·Δ·max(0, 1 − log₁₀(1 + (t − t_j)/t₀) / log₁₀(1 + T/t₀))`
    /// (zero for jumps after `t`). The actual position is the command minus this.
    pub fn creep_deficit(&self, t: f64) -> [f64; 2] {
        let mut acc = [0.0, 0.0];
        let norm = 1.0 / CREEP_SETTLE_RATIO.ln_1p();
        for e in &self.creep {
            let dt = t - e.t;
            if !(dt >= 0.0) {
                continue;
            }
            let g = 1.0 - (dt / self.creep_time).ln_1p() * norm;
            if g > 0.0 {
                acc[0] += e.deficit[0] * g;
                acc[1] += e.deficit[1] * g;
            }
        }
        acc
    }

    fn forget_settled(&mut self, t: f64) {
        let settle = CREEP_SETTLE_RATIO * self.creep_time;
        self.creep.retain(|e| !(t - e.t >= settle));
    }

    /// Sample-frame coordinates (m) of each pixel of row `row` of a frame with `settings`, the
    /// line starting at absolute time `t_start` (s), each pixel taking `settings.dwell_time`;
    /// `reverse` = retrace (pixels visited from the last to the first; index = pixel column).
    /// Includes drift (advancing the clock to the line's end, `t_start + cols·dwell`), creep
    /// and hysteresis. Errors on `xs`/`ys` lengths other than `settings.cols`, `row ≥ rows`,
    /// non-positive or non-finite pixel size or dwell time, and non-finite centre or `t_start`.
    #[allow(clippy::too_many_arguments)]
    pub fn line_positions(
        &mut self,
        settings: &ScanSettings,
        row: usize,
        t_start: f64,
        reverse: bool,
        rng: &mut SimRng,
        xs: &mut [f64],
        ys: &mut [f64],
    ) -> Result<()> {
        let ScanSettings {
            rows,
            cols,
            pixel_size: p,
            dwell_time: dwell,
            center,
            ..
        } = *settings;
        if xs.len() != cols || ys.len() != cols {
            return Err(PhysicsError::arg(
                "xs, ys",
                format!(
                    "need one entry per column ({cols}), got {} and {}",
                    xs.len(),
                    ys.len()
                ),
            ));
        }
        if row >= rows {
            return Err(PhysicsError::arg(
                "row",
                format!("must be below rows = {rows}, got {row}"),
            ));
        }
        if !(p > 0.0 && p.is_finite()) {
            return Err(PhysicsError::arg(
                "settings.pixel_size",
                format!("must be positive and finite, got {p}"),
            ));
        }
        if !(dwell > 0.0 && dwell.is_finite()) {
            return Err(PhysicsError::arg(
                "settings.dwell_time",
                format!("must be positive and finite, got {dwell}"),
            ));
        }
        if !(center[0].is_finite() && center[1].is_finite()) {
            return Err(PhysicsError::arg("settings.center", "must be finite"));
        }
        if !t_start.is_finite() {
            return Err(PhysicsError::arg("t_start", "must be finite"));
        }
        let t_end = t_start + cols as f64 * dwell;
        // Random walk at the line's ends (or at the clock, if that is later).
        self.advance(t_start, rng);
        let (ta, wa, za) = (self.clock, self.walk, self.z_walk);
        self.advance(t_end, rng);
        let (tb, wb, zb) = (self.clock, self.walk, self.z_walk);
        self.z_span = (ta, tb, za, zb);
        self.forget_settled(t_start);
        let geometry = LineGeometry::new(settings, self.hysteresis, row, t_start, reverse);
        let y_cmd = geometry.y_cmd;
        // Node interval (pixels) of the interpolated drift: the bound h²/8·f'' under the
        // tolerance.
        let step = if self.interpolated_drift {
            let curv = self.slow_curvature();
            let h = (8.0 * DRIFT_NODE_TOLERANCE * p / curv).sqrt() / dwell;
            if h.is_nan() {
                0
            } else {
                h.min(DRIFT_NODE_PIXELS as f64) as usize
            }
        } else {
            0
        };
        if step >= 2 && cols > step {
            // Pixels in scan order k (column j = k, or cols − 1 − k on the retrace), the slow
            // offsets exact at k = 0, N, 2N, … and cols − 1, linear in k in between. The walk's
            // fraction of the line and the hysteresis' position along it are taken with
            // reciprocals instead of a division per pixel (rounding apart, the same values).
            let inv_span = if tb > ta { 1.0 / (tb - ta) } else { 0.0 };
            let walk = |t: f64, c: usize| {
                let frac = if tb > ta {
                    ((t - ta) * inv_span).clamp(0.0, 1.0)
                } else {
                    1.0
                };
                wa[c] + (wb[c] - wa[c]) * frac
            };
            let inv_cols = 1.0 / cols as f64;
            let time = |k: usize| t_start + (k as f64 + 0.5) * dwell;
            let mut k0 = 0;
            let mut o0 = self.slow_offset(time(0));
            // `k`, `cols − 1` and `k − k0` as `f64`, counted (exact integers) rather than
            // converted per pixel.
            let mut kf = 0.0f64;
            let last_col = (cols - 1) as f64;
            loop {
                let k1 = (k0 + step).min(cols - 1);
                let o1 = self.slow_offset(time(k1));
                let inv = 1.0 / (k1 - k0) as f64;
                let last = if k1 == cols - 1 { k1 + 1 } else { k1 };
                let mut sk = 0.0f64;
                for k in k0..last {
                    let j = if reverse { cols - 1 - k } else { k };
                    let jf = if reverse { last_col - kf } else { kf };
                    let (x_cmd, t) = geometry.pixel_scaled(jf, kf, inv_cols);
                    let s = sk * inv;
                    kf += 1.0;
                    sk += 1.0;
                    xs[j] = x_cmd - (o0[0] + (o1[0] - o0[0]) * s) - walk(t, 0);
                    ys[j] = y_cmd - (o0[1] + (o1[1] - o0[1]) * s) - walk(t, 1);
                }
                if k1 == cols - 1 {
                    break;
                }
                (k0, o0) = (k1, o1);
            }
            return Ok(());
        }
        for (j, (x, y)) in xs.iter_mut().zip(ys.iter_mut()).enumerate() {
            let (x_cmd, t) = geometry.pixel(j);
            let frac = if tb > ta {
                ((t - ta) / (tb - ta)).clamp(0.0, 1.0)
            } else {
                1.0
            };
            let det = self.deterministic_drift(t);
            let creep = self.creep_deficit(t);
            *x = x_cmd - creep[0] - det[0] - (wa[0] + (wb[0] - wa[0]) * frac);
            *y = y_cmd - creep[1] - det[1] - (wa[1] + (wb[1] - wa[1]) * frac);
        }
        Ok(())
    }

    /// Adds white + 1/f noise and one line offset to `line` (heights, m), pixel period
    /// `pixel_time` s, in scan order per `reverse` (`true`: the last pixel is the first
    /// visited). The 1/f noise continues from the previous call. A non-positive or non-finite
    /// `pixel_time` draws the 1/f noise as white noise of the same variance.
    pub fn add_line_noise(
        &mut self,
        line: &mut [f32],
        pixel_time: f64,
        reverse: bool,
        rng: &mut SimRng,
    ) {
        self.add_line_noise_with_white(line, pixel_time, reverse, 0.0, rng);
    }

    /// [`Scanner::add_line_noise`] plus white noise of standard deviation `extra` (m) per
    /// pixel, drawn together with the scanner's own white noise: one normal draw per pixel of
    /// the summed variance, the same distribution as two independent draws (the fast model's
    /// adsorbate noise). `extra = 0` is [`Scanner::add_line_noise`] bit for bit.
    pub fn add_line_noise_with_white(
        &mut self,
        line: &mut [f32],
        pixel_time: f64,
        reverse: bool,
        extra: f64,
        rng: &mut SimRng,
    ) {
        if reverse {
            line.reverse();
        }
        let offset = self.line_offset * normal(rng);
        let filtered = self.single_innovation
            && self.add_line_noise_filtered(
                line,
                pixel_time,
                self.white * self.white + extra * extra,
                rng,
            );
        if !filtered {
            let white_var = add_pink(
                &mut self.pink,
                line,
                pixel_time,
                (self.white * self.white, self.white_decay),
                rng,
            );
            let sd_white = (white_var + extra * extra).sqrt();
            if sd_white > 0.0 {
                for v in line.iter_mut() {
                    *v += (sd_white * normal(rng)) as f32;
                }
            }
        }
        if offset != 0.0 {
            for v in line.iter_mut() {
                *v += offset as f32;
            }
        }
        if reverse {
            line.reverse();
        }
    }

    /// The z drift at the clock, m: `v_z t` plus the z random walk accumulated so far.
    pub fn z_drift(&self) -> f64 {
        self.z_rate * self.clock + self.z_walk
    }

    /// Whether any height error of the scanner is on (plane tilt, bow, z drift): without one,
    /// [`Scanner::add_line_z_errors`] adds nothing.
    pub fn has_z_errors(&self) -> bool {
        self.tilt != [0.0, 0.0] || self.bow != 0.0 || self.z_rate != 0.0 || self.z_diffusivity > 0.0
    }

    /// Whether detector noise before the loop is on ([`Scanner::add_detector_noise`]).
    pub fn has_detector_noise(&self) -> bool {
        self.detector > 0.0 || !self.detector_pink.is_empty()
    }

    /// The z drift at time `t` (s) of the line last positioned by [`Scanner::line_positions`],
    /// m: `v_z t` plus the random walk, interpolated linearly between the line's ends (as the
    /// lateral walk).
    fn z_drift_at(&self, t: f64) -> f64 {
        let (ta, tb, wa, wb) = self.z_span;
        let frac = if tb > ta {
            ((t - ta) / (tb - ta)).clamp(0.0, 1.0)
        } else {
            1.0
        };
        self.z_rate * t.max(0.0) + wa + (wb - wa) * frac
    }

    /// Adds the scanner's height errors to `line` (heights the tip follows, m; index = pixel
    /// column) of row `row` at the sample positions `xs`, `ys` (m) that
    /// [`Scanner::line_positions`] just gave for the same arguments:
    ///
    /// `Δz_j = tan θx · x_j + tan θy · y_j + κ (X_j² + Y_j²)/2 + v_z t_j + w_z(t_j)`,
    ///
    /// with `(x_j, y_j)` the sample-frame position (the tilted plane moves with the sample),
    /// `(X_j, Y_j)` the piezo's lateral excursion from the tube axis (the lab origin): the
    /// commanded position with hysteresis, less the creep deficit (drift moves the sample, not
    /// the tube), `t_j` the pixel's time and `w_z` the z random walk. Errors on slice lengths
    /// other than `settings.cols`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_line_z_errors(
        &self,
        settings: &ScanSettings,
        row: usize,
        t_start: f64,
        reverse: bool,
        xs: &[f64],
        ys: &[f64],
        line: &mut [f32],
    ) -> Result<()> {
        let cols = settings.cols;
        if xs.len() != cols || ys.len() != cols || line.len() != cols {
            return Err(PhysicsError::arg(
                "xs, ys, line",
                format!("need one entry per column ({cols})"),
            ));
        }
        let geometry = LineGeometry::new(settings, self.hysteresis, row, t_start, reverse);
        for (j, v) in line.iter_mut().enumerate() {
            let (x_cmd, t) = geometry.pixel(j);
            let creep = self.creep_deficit(t);
            let (px, py) = (x_cmd - creep[0], geometry.y_cmd - creep[1]);
            let dz = self.tilt[0] * xs[j]
                + self.tilt[1] * ys[j]
                + 0.5 * self.bow * (px * px + py * py)
                + self.z_drift_at(t);
            *v = (f64::from(*v) + dz) as f32;
        }
        Ok(())
    }

    /// Adds detector noise to `line` (the heights the feedback loop is handed, m), pixel period
    /// `pixel_time` s, in scan order per `reverse`: white, `N(0, ρ²/(2 t_p))` per pixel (a white
    /// one-sided density `ρ`, `detector_noise`, averaged over the dwell), plus the 1/f bank of
    /// `detector_pink_noise` (as [`Scanner::add_line_noise`]'s, continued from call to call).
    /// A non-positive or non-finite `pixel_time` adds nothing.
    pub fn add_detector_noise(
        &mut self,
        line: &mut [f32],
        pixel_time: f64,
        reverse: bool,
        rng: &mut SimRng,
    ) {
        if !(pixel_time > 0.0 && pixel_time.is_finite()) {
            return;
        }
        if reverse {
            line.reverse();
        }
        let var = add_pink(
            &mut self.detector_pink,
            line,
            pixel_time,
            (
                self.detector * self.detector / (2.0 * pixel_time),
                self.white_decay,
            ),
            rng,
        );
        if var > 0.0 {
            let sd = var.sqrt();
            for v in line.iter_mut() {
                *v += (sd * normal(rng)) as f32;
            }
        }
        if reverse {
            line.reverse();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;
    use num_complex::Complex;
    use proptest::prelude::*;

    /// The one-pass sum of slow processes against the reference, one process after the other
    /// with [`add_interpolated`] (one `f32` rounding per process and pixel): the same draws,
    /// the same final states, and the same line within 4 `f32` ulps of the largest partial sum
    /// (5 processes: 5 roundings of the reference plus one of the sum).
    #[test]
    fn interpolated_sum_equals_the_processes_one_by_one() {
        let mut rng = seeded(3);
        for trial in 0..200 {
            let n = [1, 2, 7, 40, 64, 129][trial % 6];
            let procs: Vec<(PinkProcess, (usize, f64, f64))> = (0..5)
                .map(|k| {
                    let m = [2, 3, 5, 17, 100][(k + trial) % 5];
                    let len = if trial % 3 == 0 { 0 } else { m };
                    let c = PinkProcess {
                        corner: 1.0,
                        sd: 1e-10,
                        v0: 1e-10 * normal(&mut rng),
                        v1: 1e-10 * normal(&mut rng),
                        pos: (trial * 7 + k) % (m + 1),
                        len,
                        cached: (1, 0.0, 0.0),
                        cached_dt: 0.0,
                    };
                    (c, (m, 0.9, 4e-11))
                })
                .collect();
            let base: Vec<f32> = (0..n).map(|_| (1e-9 * normal(&mut rng)) as f32).collect();
            let (mut ref_line, mut ref_procs, mut ref_rng) =
                (base.clone(), procs.clone(), rng.clone());
            for (c, coeffs) in ref_procs.iter_mut() {
                add_interpolated(c, &mut ref_line, *coeffs, &mut ref_rng);
            }
            let (mut line, mut new_procs, mut new_rng) = (base.clone(), procs.clone(), rng.clone());
            let mut ds = vec![f64::NAN; 3];
            add_interpolated_sum(
                new_procs.iter_mut().map(|(c, k)| (c, *k)),
                &mut line,
                &mut ds,
                &mut new_rng,
            );
            assert_eq!(new_procs, ref_procs, "trial {trial}");
            assert_eq!(normal(&mut new_rng), normal(&mut ref_rng), "trial {trial}");
            for (j, (&a, &b)) in line.iter().zip(&ref_line).enumerate() {
                // Every partial sum is below |base| + 5 processes × 1e-9.
                let scale = f64::from(base[j].abs()) + 5e-9;
                let ulp = scale * f64::from(f32::EPSILON);
                assert!(
                    (f64::from(a) - f64::from(b)).abs() <= 4.0 * ulp,
                    "trial {trial} pixel {j}: {a} vs {b}"
                );
            }
            rng = ref_rng;
        }
    }

    /// A scanner with every imperfection off; tests switch on what they look at.
    fn quiet() -> ScannerConfig {
        ScannerConfig {
            drift_initial: Param::fixed(0.0),
            drift_settled: Param::fixed(0.0),
            drift_diffusivity: Param::fixed(0.0),
            creep_fraction: Param::fixed(0.0),
            hysteresis: Param::fixed(0.0),
            white_noise: Param::fixed(0.0),
            pink_noise: Param::fixed(0.0),
            line_offset: Param::fixed(0.0),
            ..Default::default()
        }
    }

    fn settings(rows: usize, cols: usize, pixel: f64, dwell: f64) -> ScanSettings {
        ScanSettings {
            rows,
            cols,
            pixel_size: pixel,
            dwell_time: dwell,
            flyback_time: 0.0,
            center: [30e-9, -20e-9],
        }
    }

    fn commanded(s: &ScanSettings, row: usize, j: usize) -> [f64; 2] {
        [
            s.center[0] + (j as f64 - 0.5 * (s.cols as f64 - 1.0)) * s.pixel_size,
            s.center[1] + (row as f64 - 0.5 * (s.rows as f64 - 1.0)) * s.pixel_size,
        ]
    }

    /// The fast model's interpolated drift and creep ([`Scanner::set_interpolated_drift`])
    /// stay within the documented interpolation bound `h²/8 · max|f''|` of the exact
    /// positions, with `f''` from the closed forms: creep `D·/((t₀)² ln 101)` for a jump's
    /// deficit `D` (largest right after the jump, where this line starts), drift
    /// `|v₀ − v_s|/τ`; trace and retrace, lines of 64 and 61 pixels (a partial last node
    /// interval), the random walk and the hysteresis on (the fast path takes the hysteresis'
    /// position along the line and the walk's fraction with reciprocals: rounding). The bound
    /// is far below a pixel (1 nm): the image cannot tell the two apart.
    #[test]
    fn interpolated_drift_and_creep_stay_within_the_interpolation_bound() {
        let cfg = ScannerConfig {
            drift_initial: Param::fixed(20e-9 / 60.0),
            drift_settled: Param::fixed(1e-9 / 60.0),
            drift_settle_time: Param::fixed(30.0),
            creep_fraction: Param::fixed(0.3),
            creep_time: Param::fixed(0.05),
            drift_diffusivity: Param::fixed(1e-20),
            hysteresis: Param::fixed(0.02),
            ..quiet()
        };
        let jump: f64 = 400e-9;
        let tau = 30.0;
        // A slow creep (nodes 8 pixels apart) and a fast one (nodes closer, to the tolerance).
        let cases = [
            (1.0, 64, false),
            (1.0, 64, true),
            (1.0, 61, true),
            (0.05, 61, false),
        ];
        for (t0, cols, reverse) in cases {
            let cfg = ScannerConfig {
                creep_time: Param::fixed(t0),
                ..cfg.clone()
            };
            let s = settings(8, cols, 1e-9, 2e-3);
            let creep_f2 = 0.3 * jump.hypot(0.5 * jump) / (t0 * t0 * CREEP_SETTLE_RATIO.ln_1p());
            let drift_f2 = (20e-9 - 1e-9) / 60.0 / tau;
            let f2 = creep_f2 + drift_f2;
            let h = (DRIFT_NODE_PIXELS as f64 * s.dwell_time)
                .min((8.0 * DRIFT_NODE_TOLERANCE * s.pixel_size / f2).sqrt());
            let bound = h * h / 8.0 * f2 + 1e-17;
            let run = |interpolated: bool| {
                let mut sc = Scanner::new(&cfg, &mut seeded(4)).unwrap();
                sc.set_interpolated_drift(interpolated);
                sc.move_center([0.0, 0.0], [jump, 0.5 * jump], 1.0);
                let mut rng = seeded(5);
                let (mut xs, mut ys) = (vec![0.0; cols], vec![0.0; cols]);
                sc.line_positions(&s, 3, 1.0 + 1e-4, reverse, &mut rng, &mut xs, &mut ys)
                    .unwrap();
                (xs, ys)
            };
            let (exact, fast) = (run(false), run(true));
            let worst = exact
                .0
                .iter()
                .zip(&fast.0)
                .chain(exact.1.iter().zip(&fast.1))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                worst <= bound,
                "t0 {t0} cols {cols} reverse {reverse}: {worst:e} m > bound {bound:e} m"
            );
            // The bound is at most the tolerance; with the slow creep, interpolation acts (8
            // pixels apart, the creep curved), with the fast one nodes are closer (here every
            // pixel: exact).
            assert!(
                bound <= DRIFT_NODE_TOLERANCE * s.pixel_size + 2e-17,
                "{bound:e}"
            );
            assert_eq!(worst > 0.0, t0 == 1.0, "t0 {t0}: {worst:e}");
            // Both ends of the line are exact nodes.
            for j in [0, cols - 1] {
                assert!((exact.0[j] - fast.0[j]).abs() < 1e-18, "pixel {j}");
            }
        }
    }

    #[test]
    fn defaults_validate_and_bad_values_name_the_field() {
        ScannerConfig::default().validate("scanner.").unwrap();
        Scanner::new(&ScannerConfig::default(), &mut seeded(0)).unwrap();
        let bad: Vec<(&str, ScannerConfig)> = vec![
            (
                "drift_initial",
                ScannerConfig {
                    drift_initial: Param::fixed(f64::NAN),
                    ..Default::default()
                },
            ),
            (
                "drift_settled",
                ScannerConfig {
                    drift_settled: Param::fixed(-1e-12),
                    ..Default::default()
                },
            ),
            (
                "drift_settle_time",
                ScannerConfig {
                    drift_settle_time: Param::fixed(0.0),
                    ..Default::default()
                },
            ),
            (
                "drift_direction",
                ScannerConfig {
                    drift_direction: Param::fixed(f64::INFINITY),
                    ..Default::default()
                },
            ),
            (
                "drift_diffusivity",
                ScannerConfig {
                    drift_diffusivity: Param::fixed(f64::NAN),
                    ..Default::default()
                },
            ),
            (
                "creep_fraction",
                ScannerConfig {
                    creep_fraction: Param::fixed(0.8),
                    ..Default::default()
                },
            ),
            (
                "creep_time",
                ScannerConfig {
                    creep_time: Param::fixed(f64::NAN),
                    ..Default::default()
                },
            ),
            (
                "hysteresis",
                ScannerConfig {
                    hysteresis: Param::fixed(-0.01),
                    ..Default::default()
                },
            ),
            (
                "white_noise",
                ScannerConfig {
                    white_noise: Param::fixed(f64::NAN),
                    ..Default::default()
                },
            ),
            (
                "pink_noise",
                ScannerConfig {
                    pink_noise: Param::fixed(1e-6),
                    ..Default::default()
                },
            ),
            (
                "line_offset",
                ScannerConfig {
                    line_offset: Param::fixed(-1e-12),
                    ..Default::default()
                },
            ),
        ];
        for (field, cfg) in bad {
            match cfg.validate("scanner.") {
                Err(PhysicsError::InvalidParameter { field: f, .. }) => {
                    assert_eq!(f, format!("scanner.{field}"))
                }
                other => panic!("{field}: {other:?}"),
            }
            assert!(Scanner::new(&cfg, &mut seeded(0)).is_err(), "{field}");
        }
        // Quantity strings parse; unknown fields are rejected.
        let cfg: ScannerConfig =
            toml::from_str("drift_initial = \"3 nm/min\"\nwhite_noise = \"10 pm\"").unwrap();
        assert!((cfg.drift_initial.get() - 0.05e-9).abs() < 1e-20);
        assert!((cfg.white_noise.get() - 10e-12).abs() < 1e-24);
        assert_eq!(cfg.creep_time.get(), 1.0);
        assert!(toml::from_str::<ScannerConfig>("drift = 1.0").is_err());
    }

    #[test]
    fn drift_follows_the_closed_form_and_its_speed_settles() {
        let (v0, vs, tau, theta) = (6e-9 / 60.0, 0.6e-9 / 60.0, 300.0, 1.0f64);
        let cfg = ScannerConfig {
            drift_initial: Param::fixed(v0),
            drift_settled: Param::fixed(vs),
            drift_settle_time: Param::fixed(tau),
            drift_direction: Param::fixed(theta),
            ..quiet()
        };
        let mut rng = seeded(1);
        let mut sc = Scanner::new(&cfg, &mut rng).unwrap();
        assert_eq!(sc.drift(), [0.0, 0.0]);
        // Displacement = ∫ v, v(t) = v_s + (v0 − v_s) e^{−t/τ}: integrate numerically (Simpson).
        let integral = |t: f64| {
            let n = 2000;
            let h = t / n as f64;
            let v = |s: f64| vs + (v0 - vs) * (-s / tau).exp();
            let mut acc = v(0.0) + v(t);
            for i in 1..n {
                acc += if i % 2 == 1 { 4.0 } else { 2.0 } * v(i as f64 * h);
            }
            acc * h / 3.0
        };
        for t in [1.0, 10.0, 100.0, 300.0, 1000.0, 3000.0] {
            sc.advance(t, &mut rng);
            let d = sc.drift();
            let s = integral(t);
            // Closed form of DESIGN: v_s t + (v0 − v_s) τ (1 − e^{−t/τ}).
            let closed = vs * t + (v0 - vs) * tau * (1.0 - (-t / tau).exp());
            assert!((s / closed - 1.0).abs() < 1e-9, "t={t}");
            assert!((d[0] - s * theta.cos()).abs() < 1e-9 * s, "t={t} {d:?}");
            assert!((d[1] - s * theta.sin()).abs() < 1e-9 * s, "t={t} {d:?}");
        }
        // Speed by finite differences of the state: v0 just after the engage, settling to v_s.
        let speed = |t: f64| {
            let h = 1e-3 * tau;
            let mut a = Scanner::new(&cfg, &mut seeded(1)).unwrap();
            let mut r = seeded(1);
            a.advance(t, &mut r);
            let p = a.drift();
            a.advance(t + h, &mut r);
            let q = a.drift();
            (q[0] - p[0]).hypot(q[1] - p[1]) / h
        };
        assert!((speed(0.0) / v0 - 1.0).abs() < 2e-3);
        let at_tau = vs + (v0 - vs) / std::f64::consts::E;
        assert!((speed(tau) / at_tau - 1.0).abs() < 2e-3);
        assert!((speed(20.0 * tau) / vs - 1.0).abs() < 1e-3);
        let speeds: Vec<f64> = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
            .iter()
            .map(|k| speed(k * tau))
            .collect();
        assert!(speeds.windows(2).all(|w| w[1] < w[0]), "{speeds:?}");
        let v = sc.drift_velocity(tau);
        assert!((v[0].hypot(v[1]) / at_tau - 1.0).abs() < 1e-12);
        // Time never runs backwards.
        let before = sc.drift();
        sc.advance(10.0, &mut rng);
        sc.advance(f64::NAN, &mut rng);
        assert_eq!(sc.drift(), before);
    }

    #[test]
    fn random_walk_variance_is_two_d_t() {
        let d = 1e-20;
        let cfg = ScannerConfig {
            drift_diffusivity: Param::fixed(d),
            ..quiet()
        };
        let n = 2000;
        let (mut sum, mut sum2) = (0.0, 0.0);
        for seed in 0..n {
            let mut rng = seeded(seed);
            let mut sc = Scanner::new(&cfg, &mut rng).unwrap();
            for t in [1.0, 7.0, 20.0, 50.0] {
                sc.advance(t, &mut rng);
            }
            for x in sc.drift() {
                sum += x;
                sum2 += x * x;
            }
        }
        let m = sum / (2 * n) as f64;
        let var = sum2 / (2 * n) as f64 - m * m;
        let expected = 2.0 * d * 50.0;
        // Standard error of a variance from 4000 draws: √(2/4000) ≈ 2.2 %.
        assert!((var / expected - 1.0).abs() < 0.08, "{var} vs {expected}");
        assert!(m.abs() < 5.0 * (expected / (2 * n) as f64).sqrt());
    }

    /// The z drift: `v_z t` plus a random walk whose increments over `Δt` have variance
    /// `2 D Δt` (4000 increments of 1 s: the variance within 10 %, 4.5 standard errors); the
    /// lateral streams are untouched when it is off.
    #[test]
    fn z_drift_is_rate_times_time_plus_a_walk_of_variance_two_d_t() {
        let mut cfg = quiet();
        cfg.z_drift = Param::fixed(2e-11);
        let mut sc = Scanner::new(&cfg, &mut seeded(1)).unwrap();
        sc.advance(50.0, &mut seeded(2));
        assert!((sc.z_drift() - 1e-9).abs() < 1e-24);
        cfg.z_drift = Param::fixed(0.0);
        cfg.z_drift_diffusivity = Param::fixed(1e-20);
        let mut sc = Scanner::new(&cfg, &mut seeded(1)).unwrap();
        let mut rng = seeded(3);
        let n = 4000;
        let mut prev = 0.0;
        let mut sum2 = 0.0;
        for k in 1..=n {
            sc.advance(k as f64, &mut rng);
            sum2 += (sc.z_drift() - prev).powi(2);
            prev = sc.z_drift();
        }
        let var = sum2 / n as f64;
        assert!(
            (var / 2e-20 - 1.0).abs() < 0.1,
            "variance {var:e} m², expected 2e-20 m²"
        );
    }

    #[test]
    fn creep_starts_at_c_delta_and_decays_logarithmically_to_zero() {
        let (c, t0) = (0.05, 1.0);
        let cfg = ScannerConfig {
            creep_fraction: Param::fixed(c),
            creep_time: Param::fixed(t0),
            ..quiet()
        };
        let mut sc = Scanner::new(&cfg, &mut seeded(2)).unwrap();
        let (from, to, tj) = ([0.0, 0.0], [100e-9, -40e-9], 10.0);
        sc.move_center(from, to, tj);
        let full = [c * 100e-9, c * -40e-9];
        assert_eq!(sc.creep_deficit(tj - 1.0), [0.0, 0.0]);
        assert_eq!(sc.creep_deficit(tj), full);
        let just_after = sc.creep_deficit(tj + 1e-4);
        assert!((just_after[0] / full[0] - 1.0).abs() < 1e-4);
        assert!((just_after[1] / full[1] - 1.0).abs() < 1e-4);
        // Logarithmic: equal losses per decade of 1 + τ/t₀ (τ = 0, 9 t₀, 99 t₀).
        let x = |tau: f64| sc.creep_deficit(tj + tau * t0)[0];
        let (a, b, e) = (x(0.0), x(9.0), x(99.0));
        assert!(((a - b) / (b - e) - 1.0).abs() < 1e-9, "{a} {b} {e}");
        assert!(e > 0.0 && e < 0.01 * a);
        // Monotonic decay to exactly 0 after 100 t₀.
        let mut last = f64::INFINITY;
        for i in 0..=3000 {
            let tau = 0.1 * i as f64;
            let v = sc.creep_deficit(tj + tau)[0];
            assert!(v <= last && v >= 0.0, "τ={tau}");
            last = v;
        }
        assert_eq!(sc.creep_deficit(tj + 100.0 * t0), [0.0, 0.0]);
        // Overlapping jumps add; settled ones are forgotten.
        sc.move_center(to, [0.0, 0.0], tj + 50.0);
        let sum = sc.creep_deficit(tj + 60.0);
        let first = {
            let g = 1.0 - (61.0f64).log10() / (101.0f64).log10();
            full[0] * g
        };
        let second = -full[0] * (1.0 - (11.0f64).log10() / (101.0f64).log10());
        assert!((sum[0] - (first + second)).abs() < 1e-12 * full[0]);
        assert_eq!(sc.creeping_jumps(), 2);
        sc.move_center([0.0, 0.0], [0.0, 0.0], tj + 120.0);
        assert_eq!(sc.creeping_jumps(), 1);
        sc.move_center([0.0, 0.0], [1e-9, 0.0], tj + 200.0);
        assert_eq!(sc.creeping_jumps(), 1);
    }

    #[test]
    fn creep_shifts_the_scanned_positions() {
        let cfg = ScannerConfig {
            creep_fraction: Param::fixed(0.1),
            ..quiet()
        };
        let mut rng = seeded(3);
        let mut sc = Scanner::new(&cfg, &mut rng).unwrap();
        let s = settings(16, 32, 1e-9, 1e-2);
        sc.move_center([0.0, 0.0], s.center, 5.0);
        let (mut xs, mut ys) = (vec![0.0; 32], vec![0.0; 32]);
        sc.line_positions(&s, 3, 5.0, false, &mut rng, &mut xs, &mut ys)
            .unwrap();
        for j in 0..32 {
            let t = 5.0 + (j as f64 + 0.5) * 1e-2;
            let def = sc.creep_deficit(t);
            let cmd = commanded(&s, 3, j);
            assert!((xs[j] - (cmd[0] - def[0])).abs() < 1e-18);
            assert!((ys[j] - (cmd[1] - def[1])).abs() < 1e-18);
            // The piezo lags behind by nearly 10 % of the jump at first.
            assert!(def[0] > 0.08 * s.center[0] && def[0] <= 0.1 * s.center[0]);
        }
    }

    #[test]
    fn hysteresis_bows_trace_and_retrace_apart() {
        let h = 0.02;
        let cfg = ScannerConfig {
            hysteresis: Param::fixed(h),
            ..quiet()
        };
        let mut rng = seeded(4);
        let mut sc = Scanner::new(&cfg, &mut rng).unwrap();
        let s = settings(8, 100, 2e-9, 1e-3);
        let l = 100.0 * 2e-9;
        let (mut xt, mut yt) = (vec![0.0; 100], vec![0.0; 100]);
        let (mut xr, mut yr) = (vec![0.0; 100], vec![0.0; 100]);
        sc.line_positions(&s, 2, 0.0, false, &mut rng, &mut xt, &mut yt)
            .unwrap();
        sc.line_positions(&s, 2, 0.1, true, &mut rng, &mut xr, &mut yr)
            .unwrap();
        let mut max = 0.0f64;
        for j in 0..100 {
            let u = (j as f64 + 0.5) / 100.0;
            let expected = 2.0 * h * (l / 2.0) * (1.0 - (2.0 * u - 1.0).powi(2));
            assert!((xt[j] - xr[j] - expected).abs() < 1e-18, "j={j}");
            assert_eq!(yt[j], yr[j]);
            let cmd = commanded(&s, 2, j);
            // Symmetric bow: trace ahead by half the mismatch, retrace behind.
            assert!((xt[j] - cmd[0] - 0.5 * expected).abs() < 1e-18);
            max = max.max(xt[j] - xr[j]);
        }
        // At most h·L, at the centre.
        assert!(max <= h * l && max > 0.999 * h * l, "{max}");
    }

    #[test]
    fn pixels_are_timed_in_scan_order_and_the_clock_advances() {
        let v = 1e-9;
        let cfg = ScannerConfig {
            drift_initial: Param::fixed(v),
            drift_settled: Param::fixed(v),
            drift_direction: Param::fixed(0.0),
            ..quiet()
        };
        let mut rng = seeded(5);
        let mut sc = Scanner::new(&cfg, &mut rng).unwrap();
        let (cols, dwell, t_start) = (50, 2e-3, 7.0);
        let s = settings(10, cols, 1e-9, dwell);
        let (mut xs, mut ys) = (vec![0.0; cols], vec![0.0; cols]);
        for reverse in [false, true] {
            sc.line_positions(&s, 9, t_start, reverse, &mut rng, &mut xs, &mut ys)
                .unwrap();
            for j in 0..cols {
                let k = if reverse { cols - 1 - j } else { j };
                let t = t_start + (k as f64 + 0.5) * dwell;
                let cmd = commanded(&s, 9, j);
                assert!((xs[j] - (cmd[0] - v * t)).abs() < 1e-18, "{reverse} {j}");
                assert!((ys[j] - cmd[1]).abs() < 1e-18);
            }
            assert_eq!(sc.clock(), t_start + cols as f64 * dwell);
            assert!((sc.drift()[0] - v * sc.clock()).abs() < 1e-18);
        }
    }

    #[test]
    fn bad_line_arguments_are_errors() {
        let mut rng = seeded(6);
        let mut sc = Scanner::new(&ScannerConfig::default(), &mut rng).unwrap();
        let s = settings(4, 8, 1e-9, 1e-3);
        let (mut xs, mut ys) = (vec![0.0; 8], vec![0.0; 7]);
        let mut check = |s: &ScanSettings, row: usize, t: f64, xs: &mut [f64], ys: &mut [f64]| {
            matches!(
                sc.line_positions(s, row, t, false, &mut rng, xs, ys),
                Err(PhysicsError::InvalidArgument { .. })
            )
        };
        assert!(check(&s, 0, 0.0, &mut xs, &mut ys));
        let mut ys = vec![0.0; 8];
        assert!(check(&s, 4, 0.0, &mut xs, &mut ys));
        assert!(check(&s, 0, f64::NAN, &mut xs, &mut ys));
        let mut z = s;
        z.dwell_time = 0.0;
        assert!(check(&z, 0, 0.0, &mut xs, &mut ys));
        z = s;
        z.pixel_size = f64::NAN;
        assert!(check(&z, 0, 0.0, &mut xs, &mut ys));
        z = s;
        z.center[1] = f64::INFINITY;
        assert!(check(&z, 0, 0.0, &mut xs, &mut ys));
        assert!(!check(&s, 3, 0.0, &mut xs, &mut ys));
    }

    fn rms(v: impl Iterator<Item = f64>) -> f64 {
        let (mut s, mut n) = (0.0, 0.0);
        for x in v {
            s += x * x;
            n += 1.0;
        }
        (s / n).sqrt()
    }

    #[test]
    fn white_noise_and_line_offsets_have_their_rms() {
        let cfg = ScannerConfig {
            white_noise: Param::fixed(20e-12),
            ..quiet()
        };
        let mut rng = seeded(7);
        let mut sc = Scanner::new(&cfg, &mut rng).unwrap();
        let mut all = Vec::new();
        let mut line = vec![0.0f32; 256];
        for i in 0..400 {
            line.fill(0.0);
            sc.add_line_noise(&mut line, 1e-3, i % 2 == 1, &mut rng);
            all.extend(line.iter().map(|&v| f64::from(v)));
        }
        let r = rms(all.iter().copied());
        assert!((r / 20e-12 - 1.0).abs() < 0.02, "{r}");
        // Uncorrelated from pixel to pixel.
        let lag1: f64 = all.windows(2).map(|w| w[0] * w[1]).sum::<f64>() / (all.len() - 1) as f64;
        assert!((lag1 / (r * r)).abs() < 0.02);

        let cfg = ScannerConfig {
            line_offset: Param::fixed(100e-12),
            ..quiet()
        };
        let mut sc = Scanner::new(&cfg, &mut rng).unwrap();
        let mut line = vec![0.0f32; 16];
        let (mut offsets, mut pairs) = (Vec::new(), 0.0);
        for _ in 0..3000 {
            let mut o = [0.0; 2];
            for (d, reverse) in [false, true].into_iter().enumerate() {
                line.fill(0.0);
                sc.add_line_noise(&mut line, 1e-3, reverse, &mut rng);
                // One constant per line.
                assert!(line.iter().all(|&v| v == line[0]));
                o[d] = f64::from(line[0]);
                offsets.push(o[d]);
            }
            pairs += o[0] * o[1];
        }
        let r = rms(offsets.iter().copied());
        assert!((r / 100e-12 - 1.0).abs() < 0.04, "{r}");
        // Trace and retrace offsets are independent.
        assert!((pairs / 3000.0 / (r * r)).abs() < 0.08);
    }

    /// Welch periodogram (Hann window, segments of `seg`) of `x` sampled every `dt`:
    /// `(frequency, power)` for bins 1..seg/2.
    fn welch(x: &[f64], seg: usize, dt: f64) -> Vec<(f64, f64)> {
        let fft = rustfft::FftPlanner::<f64>::new().plan_fft_forward(seg);
        let mut acc = vec![0.0; seg / 2];
        let mut buf = vec![Complex::new(0.0, 0.0); seg];
        for chunk in x.chunks_exact(seg) {
            let mean = chunk.iter().sum::<f64>() / seg as f64;
            for (i, (b, &v)) in buf.iter_mut().zip(chunk).enumerate() {
                let w = 0.5 - 0.5 * (2.0 * PI * i as f64 / seg as f64).cos();
                *b = Complex::new((v - mean) * w, 0.0);
            }
            fft.process(&mut buf);
            for (a, b) in acc.iter_mut().zip(&buf) {
                *a += b.norm_sqr();
            }
        }
        (1..seg / 2)
            .map(|k| (k as f64 / (seg as f64 * dt), acc[k]))
            .collect()
    }

    /// Extra white noise drawn with the scanner's: the rms is `√(white² + extra² + pink²)`
    /// (independent variances add) and neighbouring pixels stay uncorrelated; with `extra = 0`
    /// the line and the stream are those of `add_line_noise` bit for bit.
    #[test]
    fn extra_white_noise_adds_its_variance() {
        let cfg = ScannerConfig {
            white_noise: Param::fixed(3e-12),
            ..quiet()
        };
        let mut sc = Scanner::new(&cfg, &mut seeded(1)).unwrap();
        let (mut rng, mut x) = (seeded(2), Vec::new());
        let mut line = vec![0.0f32; 1000];
        for l in 0..200 {
            line.fill(0.0);
            sc.add_line_noise_with_white(&mut line, 1e-3, l % 2 == 1, 4e-12, &mut rng);
            x.extend(line.iter().map(|&v| f64::from(v)));
        }
        let r = rms(x.iter().copied());
        assert!((r / 5e-12 - 1.0).abs() < 0.01, "{r:e}");
        let lag1 = x.windows(2).map(|w| w[0] * w[1]).sum::<f64>() / (x.len() - 1) as f64;
        assert!((lag1 / (r * r)).abs() < 0.01, "{}", lag1 / (r * r));
        let cfg = ScannerConfig {
            pink_noise: Param::fixed(20e-12),
            line_offset: Param::fixed(1e-12),
            ..cfg
        };
        let (mut a, mut b) = (
            Scanner::new(&cfg, &mut seeded(3)).unwrap(),
            Scanner::new(&cfg, &mut seeded(3)).unwrap(),
        );
        let (mut ra, mut rb) = (seeded(4), seeded(4));
        let (mut la, mut lb) = (vec![0.0f32; 64], vec![0.0f32; 64]);
        for l in 0..20 {
            a.add_line_noise(&mut la, 1e-3, l % 2 == 1, &mut ra);
            b.add_line_noise_with_white(&mut lb, 1e-3, l % 2 == 1, 0.0, &mut rb);
        }
        assert_eq!(la, lb);
        assert_eq!(ra.random::<u64>(), rb.random::<u64>());
    }

    #[test]
    /// The full bank (18 processes) and the fast model's (9): the stated r.m.s. and a 1/f
    /// spectrum (log-log slope −1 ± 0.3 between 0.2 and 50 Hz) for both.
    fn pink_noise_has_its_rms_and_a_one_over_f_spectrum() {
        let cfg = ScannerConfig {
            pink_noise: Param::fixed(50e-12),
            ..quiet()
        };
        let mut rng = seeded(8);
        for bad in [1, PINK_COMPONENTS + 1] {
            assert!(Scanner::with_pink_components(&cfg, bad, &mut rng).is_err());
        }
        // The full bank, the fast model's 9 processes, and those with the fast model's
        // whitening at its tip-conditioning dwell (the 237 Hz process, 2.3 decays per pixel,
        // drawn white).
        // Last, the same through one innovation per pixel (set_single_innovation).
        for (components, decay, dt, single) in [
            (PINK_COMPONENTS, WHITE_DECAY, 1e-3, false),
            (9, WHITE_DECAY, 1e-3, false),
            (9, 2.0, 1.5625e-3, false),
            (9, 2.0, 1.5625e-3, true),
        ] {
            let mut sc = Scanner::with_pink_components(&cfg, components, &mut rng).unwrap();
            for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
                assert!(sc.set_white_decay(bad).is_err());
            }
            sc.set_white_decay(decay).unwrap();
            sc.set_single_innovation(single);
            let mut x = Vec::with_capacity(1 << 20);
            let mut line = vec![0.0f32; 1024];
            for _ in 0..1024 {
                line.fill(0.0);
                sc.add_line_noise(&mut line, dt, false, &mut rng);
                x.extend(line.iter().map(|&v| f64::from(v)));
            }
            let r = rms(x.iter().copied());
            assert!((r / 50e-12 - 1.0).abs() < 0.15, "{r}");
            // Persistent across lines: no jump at line boundaries beyond the in-line steps.
            let step = |i: usize| (x[i] - x[i - 1]).abs();
            let at_edges = (1..1024).map(|l| step(l * 1024)).sum::<f64>() / 1023.0;
            let inside = (1..1024).map(|l| step(l * 1024 + 500)).sum::<f64>() / 1023.0;
            assert!(at_edges < 1.3 * inside, "{at_edges} vs {inside}");
            // Log-log slope of the spectrum between 0.2 and 50 Hz, averaged in log-spaced bins.
            let spec = welch(&x, 1 << 14, dt);
            let nb = 24;
            let (lo, hi) = (0.2f64.log10(), 50f64.log10());
            let mut pts = Vec::new();
            for b in 0..nb {
                let (a, e) = (
                    lo + (hi - lo) * b as f64 / nb as f64,
                    lo + (hi - lo) * (b + 1) as f64 / nb as f64,
                );
                let sel: Vec<&(f64, f64)> = spec
                    .iter()
                    .filter(|(f, _)| (a..e).contains(&f.log10()))
                    .collect();
                if sel.is_empty() {
                    continue;
                }
                let p = sel.iter().map(|(_, p)| p).sum::<f64>() / sel.len() as f64;
                pts.push((0.5 * (a + e), p.log10()));
            }
            let n = pts.len() as f64;
            let (mx, my) = (
                pts.iter().map(|p| p.0).sum::<f64>() / n,
                pts.iter().map(|p| p.1).sum::<f64>() / n,
            );
            let slope = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>()
                / pts.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>();
            assert!((-1.3..=-0.7).contains(&slope), "slope {slope}");

            eprintln!(
                "{components} processes, white above {decay}, single innovation {single}: \
                 rms {r:e}, slope {slope}"
            );
        }
    }

    /// The autocovariance of the AR(1) bank plus white noise at lag `lag` pixels, closed form:
    /// `Σ_k σ_k² a_k^lag + σ_w² [lag = 0]` with `a_k = e^{−2π f_k Δt}`.
    fn bank_autocovariance(sc: &Scanner, dt: f64, lag: usize) -> f64 {
        let white = if lag == 0 { sc.white * sc.white } else { 0.0 };
        sc.pink
            .iter()
            .map(|c| c.sd * c.sd * (-2.0 * PI * c.corner * dt * lag as f64).exp())
            .sum::<f64>()
            + white
    }

    #[test]
    /// With every process of an 8-process bank at one node per pixel (Δt = 0.5 s: decays
    /// 0.031 to 3142 per pixel), all the height noise runs through the single-innovation
    /// filter; its autocovariance at lags 0–64 matches the closed form of 8 independent AR(1)
    /// processes plus white noise (r.m.s. 50 pm and 20 pm) within 0.01 of the variance, and the
    /// spectrum the closed-form one within 10 % per octave band.
    fn single_innovation_noise_has_the_banks_covariance_and_spectrum() {
        let cfg = ScannerConfig {
            pink_noise: Param::fixed(50e-12),
            white_noise: Param::fixed(20e-12),
            ..quiet()
        };
        let dt = 0.5;
        let mut rng = seeded(21);
        let mut sc = Scanner::with_pink_components(&cfg, 8, &mut rng).unwrap();
        sc.set_white_decay(1e9).unwrap();
        sc.set_single_innovation(true);
        let mut x = Vec::with_capacity(1 << 20);
        let mut line = vec![0.0f32; 256];
        for l in 0..4096 {
            line.fill(0.0);
            sc.add_line_noise(&mut line, dt, l % 2 == 1, &mut rng);
            if l % 2 == 1 {
                line.reverse();
            }
            x.extend(line.iter().map(|&v| f64::from(v)));
        }
        let f = sc.filter.as_ref().expect("all 8 processes in the filter");
        assert_eq!((f.n, f.members), (8, 0xff));
        assert!(f.settled.is_some());
        let var0 = bank_autocovariance(&sc, dt, 0);
        assert!((var0.sqrt() / 53.85e-12 - 1.0).abs() < 1e-3, "{var0:e}");
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        for lag in [0, 1, 2, 3, 5, 8, 16, 32, 64] {
            let cov = x
                .iter()
                .zip(&x[lag..])
                .map(|(a, b)| (a - mean) * (b - mean))
                .sum::<f64>()
                / (x.len() - lag) as f64;
            let want = bank_autocovariance(&sc, dt, lag);
            eprintln!("lag {lag}: {:.4} vs {:.4}", cov / var0, want / var0);
            assert!(
                (cov - want).abs() < 0.01 * var0,
                "lag {lag}: {cov:e} vs {want:e}"
            );
        }
        // Spectrum in octave bands against the closed form (one-sided, m²/Hz):
        // 2 Δt (Σ_k σ_k² (1 − a_k²)/|1 − a_k e^{−iω}|² + σ_w²), ω = 2π f Δt.
        let seg = 1 << 12;
        // welch() sums |FFT|² of Hann-windowed segments: to one-sided m²/Hz.
        let norm = 2.0 * dt / ((x.len() / seg) as f64 * 0.375 * seg as f64);
        let spec: Vec<(f64, f64)> = welch(&x, seg, dt)
            .into_iter()
            .map(|(f, p)| (f, p * norm))
            .collect();
        let model = |f: f64| {
            let w = 2.0 * PI * f * dt;
            let bank: f64 = sc
                .pink
                .iter()
                .map(|c| {
                    let a = (-2.0 * PI * c.corner * dt).exp();
                    c.sd * c.sd * (1.0 - a * a) / (1.0 - 2.0 * a * w.cos() + a * a)
                })
                .sum();
            2.0 * dt * (bank + sc.white * sc.white)
        };
        let mut lo = 2e-3;
        while lo * 2.0 <= 1.0 / (2.0 * dt) {
            let sel: Vec<&(f64, f64)> = spec
                .iter()
                .filter(|(f, _)| (lo..2.0 * lo).contains(f))
                .collect();
            let got = sel.iter().map(|(_, p)| p).sum::<f64>() / sel.len() as f64;
            let want = sel.iter().map(|(f, _)| model(*f)).sum::<f64>() / sel.len() as f64;
            eprintln!("{lo:.4} Hz: {:.3}", got / want);
            assert!(
                (got / want - 1.0).abs() < 0.1,
                "{lo} Hz: {got:e} vs {want:e}"
            );
            lo *= 2.0;
        }
    }

    #[test]
    /// From the first pixel on, and across pixel-period changes that move processes into and
    /// out of the filter, each pixel's variance over 4000 sessions is the bank's (closed form,
    /// within 12 %, 4 standard errors), and processes leave the filter with their stationary
    /// variance `σ_k²` (within 12 %).
    fn single_innovation_noise_is_stationary_from_the_start_and_across_changes() {
        let cfg = ScannerConfig {
            pink_noise: Param::fixed(50e-12),
            white_noise: Param::fixed(20e-12),
            line_offset: Param::fixed(0.0),
            ..quiet()
        };
        let sessions = 4000;
        // (pixel period, pixels): all 8 in the filter, then the 4 fastest (the rest slow),
        // then all 8 (first without the filter until the slow ones' segments, up to 795 pixels,
        // are done, then with it).
        let plan = [(0.5, 16), (1e-3, 16), (0.5, 1024), (0.5, 16)];
        let mut sum2 = vec![0.0f64; 1072];
        let mut left = [0.0f64; 8];
        let mut sd = [0.0f64; 8];
        let mut rng = seeded(33);
        for _ in 0..sessions {
            let mut sc = Scanner::with_pink_components(&cfg, 8, &mut rng).unwrap();
            sc.set_white_decay(1e9).unwrap();
            sc.set_single_innovation(true);
            let mut i = 0;
            for (p, &(dt, n)) in plan.iter().enumerate() {
                let mut line = vec![0.0f32; n];
                sc.add_line_noise(&mut line, dt, false, &mut rng);
                if p == 1 {
                    assert_eq!(sc.filter.as_ref().unwrap().n, 4);
                    // The four that left hold pending values drawn from N(x̂, P).
                    for k in 0..4 {
                        left[k] += sc.pink[k].v1 * sc.pink[k].v1;
                        sd[k] = sc.pink[k].sd;
                    }
                }
                assert_eq!(sc.filter.is_some(), p != 2, "line {p}");
                for v in line {
                    sum2[i] += f64::from(v) * f64::from(v);
                    i += 1;
                }
            }
        }
        let sc = Scanner::with_pink_components(&cfg, 8, &mut rng).unwrap();
        let mut i = 0;
        for &(dt, n) in &plan {
            let want = bank_autocovariance(&sc, dt, 0);
            for _ in 0..n {
                let got = sum2[i] / sessions as f64;
                assert!(
                    (got / want - 1.0).abs() < 0.12,
                    "pixel {i}: {got:e} vs {want:e}"
                );
                i += 1;
            }
        }
        for k in 0..4 {
            let got = left[k] / sessions as f64;
            assert!(
                (got / (sd[k] * sd[k]) - 1.0).abs() < 0.12,
                "process {k}: {got:e}"
            );
        }
    }

    #[test]
    fn retrace_noise_is_the_trace_noise_in_reverse_scan_order() {
        let mut rng = seeded(9);
        let sc = Scanner::new(&ScannerConfig::default(), &mut rng).unwrap();
        let (mut a, mut b) = (sc.clone(), sc);
        let (mut ra, mut rb) = (rng.clone(), rng);
        let mut la = vec![0.0f32; 300];
        let mut lb = vec![0.0f32; 300];
        a.add_line_noise(&mut la, 2e-3, false, &mut ra);
        b.add_line_noise(&mut lb, 2e-3, true, &mut rb);
        lb.reverse();
        assert_eq!(la, lb);
        // A bad pixel time still gives finite noise of the same total variance.
        let mut l = vec![0.0f32; 4000];
        a.add_line_noise(&mut l, f64::NAN, false, &mut ra);
        assert!(l.iter().all(|v| v.is_finite()));
    }

    /// Runs a short session and returns everything it produced.
    fn session(seed: u64) -> (Vec<f64>, Vec<f32>) {
        let mut rng = seeded(seed);
        let mut sc = Scanner::new(&ScannerConfig::default(), &mut rng).unwrap();
        let s = settings(8, 32, 1e-9, 1e-3);
        let (mut xs, mut ys) = (vec![0.0; 32], vec![0.0; 32]);
        let mut line = vec![0.0f32; 32];
        let (mut pos, mut noise) = (Vec::new(), Vec::new());
        sc.move_center([0.0, 0.0], s.center, 0.5);
        let mut t = 1.0;
        for row in 0..8 {
            for reverse in [false, true] {
                sc.line_positions(&s, row, t, reverse, &mut rng, &mut xs, &mut ys)
                    .unwrap();
                line.fill(0.0);
                sc.add_line_noise(&mut line, s.dwell_time, reverse, &mut rng);
                pos.extend_from_slice(&xs);
                pos.extend_from_slice(&ys);
                noise.extend_from_slice(&line);
                t += 0.04;
            }
        }
        pos.extend_from_slice(&sc.drift());
        (pos, noise)
    }

    #[test]
    fn same_seed_same_output_bit_for_bit() {
        let (a, b) = (session(11), session(11));
        assert!(
            a.0.iter()
                .zip(&b.0)
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        assert!(
            a.1.iter()
                .zip(&b.1)
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        assert_ne!(session(12).1, a.1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn outputs_are_finite_and_creep_is_bounded(
            v0 in 0.0..1e-7f64, vs in 0.0..1e-7f64, tau in 1.0..1e5f64, dir in -10.0..10.0f64,
            d in 0.0..1e-16f64, c in 0.0..=0.5f64, t0 in 1e-3..1e3f64, h in 0.0..=0.25f64,
            white in 0.0..1e-9f64, pink in 0.0..1e-9f64, off in 0.0..1e-9f64,
            rows in 1usize..40, cols in 1usize..80, px in 1e-11..1e-6f64, dwell in 1e-6..0.1f64,
            jumps in proptest::collection::vec(
                (-1e-6..1e-6f64, -1e-6..1e-6f64, 0.0..50.0f64), 1..6),
            seed in 0u64..1000,
        ) {
            let cfg = ScannerConfig {
                drift_initial: Param::fixed(v0),
                drift_settled: Param::fixed(vs),
                drift_settle_time: Param::fixed(tau),
                drift_direction: Param::fixed(dir),
                drift_diffusivity: Param::fixed(d),
                creep_fraction: Param::fixed(c),
                creep_time: Param::fixed(t0),
                hysteresis: Param::fixed(h),
                white_noise: Param::fixed(white),
                pink_noise: Param::fixed(pink),
                line_offset: Param::fixed(off),
                ..Default::default()
            };
            let mut rng = seeded(seed);
            let mut sc = Scanner::new(&cfg, &mut rng).unwrap();
            let mut s = settings(rows, cols, px, dwell);
            let (mut xs, mut ys) = (vec![0.0; cols], vec![0.0; cols]);
            let mut line = vec![0.0f32; cols];
            let mut t = 0.0;
            let mut total = 0.0f64;
            for (i, &(x, y, wait)) in jumps.iter().enumerate() {
                let to = [x, y];
                let step = (to[0] - s.center[0]).hypot(to[1] - s.center[1]);
                sc.move_center(s.center, to, t);
                total += step;
                // One jump alone never lags by more than c·|Δ|.
                if i == 0 {
                    for k in 0..50 {
                        let one = sc.creep_deficit(t + t0 * 2f64.powi(k - 10));
                        prop_assert!(one[0].hypot(one[1]) <= c * step * (1.0 + 1e-12));
                    }
                }
                s.center = to;
                let row = i % rows;
                sc.line_positions(&s, row, t, i % 2 == 1, &mut rng, &mut xs, &mut ys).unwrap();
                prop_assert!(xs.iter().chain(&ys).all(|v| v.is_finite()));
                line.fill(0.0);
                sc.add_line_noise(&mut line, dwell, i % 2 == 1, &mut rng);
                prop_assert!(line.iter().all(|v| v.is_finite()));
                for k in 0..20 {
                    let def = sc.creep_deficit(t + wait * k as f64 / 19.0);
                    prop_assert!(def[0].is_finite() && def[1].is_finite());
                    prop_assert!(def[0].hypot(def[1]) <= c * total * (1.0 + 1e-12) + 1e-30);
                }
                t += cols as f64 * dwell + wait;
                sc.advance(t, &mut rng);
                let dr = sc.drift();
                prop_assert!(dr[0].is_finite() && dr[1].is_finite());
            }
        }
    }
}
