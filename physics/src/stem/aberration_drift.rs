//! Aberrations and defocus that drift in time (`[aberration_drift]`, opt-in).
//!
//! Lens currents, high-tension and corrector supplies wander, and the specimen's height creeps:
//! the defocus and the low-order aberrations of a real column drift by nm over minutes (defocus
//! drift of ~0.1-1 nm/min and two-fold astigmatism of similar size on a tuned corrector;
//! Barthel & Thust, Ultramicroscopy 111, 27 (2010); Krivanek et al., Ultramicroscopy 108, 179
//! (2008)). The model adds to the aberrations the corrector is set to (what
//! [`crate::instrument::StemInstrument::aberrations`] reports) a hidden offset that grows with
//! the instrument clock `t`:
//!
//! * a linear drift of every coefficient, `C(t) = C_set + r·t` (`rates`, m/s; azimuths rad/s);
//! * a random walk (Wiener process) of the defocus C10 and of each Cartesian component
//!   `(C12a, C12b)` of two-fold astigmatism, variance `2 D t` (`c10_diffusivity`,
//!   `c12_diffusivity`, m²/s), from its own random stream (deterministic per seed, and the
//!   other streams draw as without the drift).
//!
//! The probe sees `C_set + offset(t)` at the **start of each exposure**: a frame is imaged with
//! the aberrations at its first pixel (one probe per frame; the drift within a frame, ~ r × the
//! frame time, is neglected), a point exposure or spectrum with those at its start. With
//! `within_frame`, each row of a frame is imaged with the aberrations at its own start, floored
//! to `update_interval` (the drift along one row is neglected), so a slow frame's first and last
//! rows see different defocus, as on a real column. A probe is
//! rebuilt only when the aberrations changed, and `update_interval` (s) coarsens the clock
//! further (times are floored to a multiple of it) so that fast point sequences reuse one probe.
//! A magnitude that drifts through zero turns into its positive value with the azimuth turned
//! by π/m (m the fold), the same χ. Reference of the tests: the closed forms above
//! (`C10(t) = C10₀ + r t` exactly at frame starts, `Var = 2 D t` over seeds) and the full
//! simulator at the predicted static defocus for a later frame.

use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::{Diffusivity, Time};
use crate::rng::{SimRng, normal};
use crate::stem::optics::Aberrations;
use serde::{Deserialize, Serialize};

/// Drift of the aberrations in time (`[aberration_drift]`). Default: off (no drift).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AberrationDriftConfig {
    /// Linear drift rate of each coefficient, keyed like [`Aberrations`] (`c10`, `c12`,
    /// `phi12`, …): m/s for magnitudes, rad/s for azimuths. Default all 0.
    pub rates: Aberrations,
    /// Random-walk diffusivity of the defocus C10, m²/s (variance `2 D t`). Default 0.
    pub c10_diffusivity: Param<Diffusivity>,
    /// Random-walk diffusivity of each Cartesian component of two-fold astigmatism
    /// `(C12a, C12b)`, m²/s. Default 0.
    pub c12_diffusivity: Param<Diffusivity>,
    /// The probe follows the drift at instrument times floored to a multiple of this, s
    /// (0: at the start of every frame and point exposure). Default 0.
    pub update_interval: Param<Time>,
    /// Follow the drift within a frame too: each row is imaged with the aberrations at its
    /// start (floored to `update_interval`, which must then be > 0), so a frame longer than
    /// the interval is imaged by one probe per interval, at most [`MAX_FRAME_PROBES`]. Off
    /// (default): one probe per frame, at its first pixel.
    pub within_frame: bool,
}

/// The most probes one frame may be imaged with when the drift is followed within frames
/// (each is a probe computation and a render of the frame).
pub const MAX_FRAME_PROBES: usize = 64;

impl Default for AberrationDriftConfig {
    fn default() -> Self {
        Self {
            rates: Aberrations::default(),
            c10_diffusivity: Param::fixed(0.0),
            c12_diffusivity: Param::fixed(0.0),
            update_interval: Param::fixed(0.0),
            within_frame: false,
        }
    }
}

impl AberrationDriftConfig {
    /// Checks ranges; `prefix` is prepended to field names in errors.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        for (name, r) in Aberrations::NAMES.iter().zip(self.rates.values()) {
            if !r.is_finite() {
                return Err(PhysicsError::param(
                    format!("{prefix}rates.{name}"),
                    format!("must be finite, got {r}"),
                ));
            }
        }
        for (name, d) in [
            ("c10_diffusivity", self.c10_diffusivity.get()),
            ("c12_diffusivity", self.c12_diffusivity.get()),
        ] {
            if !(d >= 0.0 && d.is_finite()) {
                return Err(PhysicsError::param(
                    format!("{prefix}{name}"),
                    format!("must be a finite diffusivity >= 0, got {d} m²/s"),
                ));
            }
        }
        let u = self.update_interval.get();
        if !(u >= 0.0 && u.is_finite()) {
            return Err(PhysicsError::param(
                format!("{prefix}update_interval"),
                format!("must be a finite time >= 0, got {u} s"),
            ));
        }
        if self.within_frame && u <= 0.0 {
            return Err(PhysicsError::param(
                format!("{prefix}update_interval"),
                "must be > 0 with within_frame = true (the probe is recomputed once per \
                 interval within a frame)",
            ));
        }
        Ok(())
    }

    /// Whether the aberrations drift at all (any rate or diffusivity non-zero).
    pub fn is_on(&self) -> bool {
        self.rates.values().iter().any(|r| *r != 0.0)
            || self.c10_diffusivity.get() != 0.0
            || self.c12_diffusivity.get() != 0.0
    }
}

/// The fold m of each magnitude in [`Aberrations::NAMES`] order that is followed by its azimuth
/// (`(index of the magnitude, fold)`): a negative magnitude is the positive one at φ + π/m.
const FOLDS: [(usize, f64); 11] = [
    (1, 2.0),
    (3, 1.0),
    (5, 3.0),
    (9, 2.0),
    (11, 4.0),
    (13, 1.0),
    (15, 3.0),
    (17, 5.0),
    (19, 2.0),
    (21, 4.0),
    (23, 6.0),
];

/// The drift's state in one session: the random walks so far and the time they reached.
#[derive(Debug, Clone, PartialEq)]
pub struct AberrationDrift {
    cfg: AberrationDriftConfig,
    /// Random-walk displacement of C10 and of (C12a, C12b), m.
    walk: [f64; 3],
    /// Instrument time the walk reached, s.
    time: f64,
}

impl AberrationDrift {
    /// A drift starting at time 0 with no displacement.
    pub fn new(cfg: &AberrationDriftConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            walk: [0.0; 3],
            time: 0.0,
        }
    }

    /// Whether it drifts at all ([`AberrationDriftConfig::is_on`]).
    pub fn is_on(&self) -> bool {
        self.cfg.is_on()
    }

    /// The time (s) the probe follows at instrument time `clock` (floored to the update
    /// interval).
    pub fn quantized(&self, clock: f64) -> f64 {
        let u = self.cfg.update_interval.get();
        if u > 0.0 {
            (clock / u).floor() * u
        } else {
            clock
        }
    }

    /// Advances the random walks to time `t` (s; no step backward) drawing from `rng`, and
    /// returns the aberrations in force then: `set` plus the linear drift `rates · t` plus the
    /// walks, magnitudes made non-negative.
    pub fn at(&mut self, set: &Aberrations, t: f64, rng: &mut SimRng) -> Aberrations {
        let dt = t - self.time;
        if dt > 0.0 {
            for (w, d) in self.walk.iter_mut().zip([
                self.cfg.c10_diffusivity.get(),
                self.cfg.c12_diffusivity.get(),
                self.cfg.c12_diffusivity.get(),
            ]) {
                if d > 0.0 {
                    *w += (2.0 * d * dt).sqrt() * normal(rng);
                }
            }
            self.time = t;
        }
        let mut v = set.values();
        for (x, r) in v.iter_mut().zip(self.cfg.rates.values()) {
            *x += r * t;
        }
        for &(i, m) in &FOLDS {
            if v[i] < 0.0 {
                v[i] = -v[i];
                v[i + 1] += std::f64::consts::PI / m;
            }
        }
        let mut a = Aberrations::from_values(v);
        a.c10 += self.walk[0];
        if self.walk[1] != 0.0 || self.walk[2] != 0.0 {
            let (ca, cb) = a.c12_cartesian();
            a.set_c12_cartesian(ca + self.walk[1], cb + self.walk[2]);
        }
        a
    }

    /// The random-walk displacements so far: C10, C12a, C12b (m).
    pub fn walk(&self) -> [f64; 3] {
        self.walk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;

    #[test]
    fn folds_pair_each_magnitude_with_its_azimuth() {
        for &(i, m) in &FOLDS {
            let (c, phi) = (Aberrations::NAMES[i], Aberrations::NAMES[i + 1]);
            assert_eq!(format!("phi{}", &c[1..]), phi);
            assert_eq!(f64::from(c.as_bytes()[2] - b'0'), m, "{c}");
        }
    }

    /// The random walks have mean 0 and variance 2 D t at any time, however the time is cut
    /// into steps: over 4000 seeds the sample variance of C10 and of C12a, C12b at t = 0.7 s
    /// (reached in 5 uneven steps) is 2 D t within 4 standard errors of the χ² law
    /// (`(N − 1) s² / σ²` has mean `N − 1`, standard deviation `√(2 (N − 1))`), the mean within
    /// 4 σ/√N; the linear part adds exactly `r t`.
    #[test]
    fn random_walk_variance_is_two_d_t() {
        let cfg = AberrationDriftConfig {
            c10_diffusivity: Param::fixed(2e-19),
            c12_diffusivity: Param::fixed(0.5e-19),
            rates: Aberrations {
                c10: 3e-9,
                ..Default::default()
            },
            ..Default::default()
        };
        let set = Aberrations {
            c10: 1e-9,
            ..Default::default()
        };
        let n = 4000;
        let t = 0.7;
        let mut samples = vec![[0.0; 3]; n];
        for (seed, s) in samples.iter_mut().enumerate() {
            let mut d = AberrationDrift::new(&cfg);
            let mut rng = seeded(seed as u64);
            let mut a = set;
            for step in [0.01, 0.2, 0.2, 0.55, t] {
                a = d.at(&set, step, &mut rng);
            }
            let (ca, cb) = a.c12_cartesian();
            *s = [a.c10 - (1e-9 + 3e-9 * t), ca, cb];
            assert!((s[0] - d.walk()[0]).abs() < 1e-24);
        }
        for (k, dif) in [(0, 2e-19), (1, 0.5e-19), (2, 0.5e-19)] {
            let sigma2 = 2.0 * dif * t;
            let mean = samples.iter().map(|s| s[k]).sum::<f64>() / n as f64;
            let var = samples.iter().map(|s| (s[k] - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            let chi2 = (n - 1) as f64 * var / sigma2;
            let sd = (2.0 * (n - 1) as f64).sqrt();
            println!("component {k}: variance {var} vs 2Dt = {sigma2}, mean {mean}");
            assert!(
                (chi2 - (n - 1) as f64).abs() < 4.0 * sd,
                "component {k}: variance {var} vs 2Dt = {sigma2}"
            );
            assert!(
                mean.abs() < 4.0 * (sigma2 / n as f64).sqrt(),
                "{k}: mean {mean}"
            );
        }
    }

    /// A magnitude drifting through zero keeps χ: C < 0 at φ equals |C| at φ + π/m.
    #[test]
    fn a_magnitude_through_zero_keeps_chi() {
        let mut cfg = AberrationDriftConfig::default();
        cfg.rates.c23 = -2e-9;
        cfg.rates.c12 = -1e-9;
        let set = Aberrations {
            c23: 1e-9,
            phi23: 0.3,
            c12: 0.5e-9,
            phi12: -0.2,
            ..Default::default()
        };
        let mut d = AberrationDrift::new(&cfg);
        let a = d.at(&set, 1.0, &mut seeded(0));
        assert_eq!((a.c23, a.c12), (1e-9, 0.5e-9));
        let raw = |th: [f64; 2]| {
            let (r, p) = (th[0].hypot(th[1]), th[1].atan2(th[0]));
            // χ's two- and three-fold terms with the signed magnitudes the rates give.
            0.5 * r * r * -0.5e-9 * (2.0 * (p + 0.2)).cos()
                + r.powi(3) / 3.0 * -1e-9 * (3.0 * (p - 0.3)).cos()
        };
        for th in [[0.01, 0.02], [-0.03, 0.005], [0.0, -0.02]] {
            let lambda = 1e-12;
            let got = a.chi(lambda, th[0], th[1]) * lambda / (2.0 * std::f64::consts::PI);
            assert!(
                (got - raw(th)).abs() < 1e-9 * raw(th).abs().max(1e-20),
                "{th:?}"
            );
        }
    }
}
