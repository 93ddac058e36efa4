//! The hidden tip state ([`TipState`]): a paraboloid apex of radius `R`, optionally blunted
//! to a flat disc of radius `a`, optionally double ([`SecondApex`]) and optionally carrying an
//! [`Adsorbate`]; built and validated here, and read by the simulator through its quality,
//! noise and glitch factors.

use super::{MAX_FEATURE, MAX_STATE_LENGTH, MIN_STATE_RADIUS, TipConfig, check_arg};
use crate::error::Result;
use crate::rng::{SimRng, uniform};

/// Depth scale of a double tip's penalty in [`TipState::quality`], m.
const DOUBLE_DEPTH_SCALE: f64 = 1e-9;
/// Quality factor of a tip carrying an adsorbate.
const ADSORBATE_QUALITY: f64 = 0.7;

/// A second apex (double tip).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecondApex {
    /// Offset `d = [dx, dy]` of the second apex in the kernel `t`, m (`x` along columns, `y`
    /// along rows): a feature at `p` is imaged again at `p + d`. `|dx|, |dy| ≤ 1 µm`.
    pub offset: [f64; 2],
    /// How far the second apex lies below the main one (in `t`), m, `0 ≤ dz ≤ 1 µm`.
    pub dz: f64,
}

/// An adsorbate on the tip: it smears features and makes the images noisy and streaky.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adsorbate {
    /// Extra kernel radius, m, in `[0, 1 µm]`.
    pub blur: f64,
    /// Factor on the image noise, in `[1, 100]`.
    pub noise_factor: f64,
    /// Probability per scan line of a glitch, in `[0, 1]`.
    pub glitch_probability: f64,
}

impl Adsorbate {
    /// The adsorbate a [`TipConfig`] describes.
    pub fn from_config(cfg: &TipConfig) -> Self {
        Self {
            blur: cfg.adsorbate_blur.get(),
            noise_factor: cfg.adsorbate_noise.get(),
            glitch_probability: cfg.adsorbate_glitch.get(),
        }
    }
}

/// The hidden state of the tip. Built by [`TipState::new`] or [`TipState::sharp`] and the
/// `with_*` builders, which validate; changed by wear, crashes, pick-ups and conditioning.
#[derive(Debug, Clone, PartialEq)]
pub struct TipState {
    pub(super) radius: f64,
    pub(super) flat_radius: f64,
    pub(super) second: Option<SecondApex>,
    pub(super) adsorbate: Option<Adsorbate>,
}

impl TipState {
    /// A new tip from `cfg` (validated): radius `initial_radius`, double with probability
    /// `initial_double_probability`, carrying an adsorbate with probability
    /// `initial_adsorbate_probability`.
    pub fn new(cfg: &TipConfig, rng: &mut SimRng) -> Result<Self> {
        cfg.validate("tip.")?;
        let mut s = Self::sharp(cfg.initial_radius.get())?;
        let (u_double, u_ads) = (uniform(rng), uniform(rng));
        if u_double < cfg.initial_double_probability.get() {
            s.second = Some(draw_second(cfg, rng));
        }
        if u_ads < cfg.initial_adsorbate_probability.get() {
            s.adsorbate = Some(Adsorbate::from_config(cfg));
        }
        Ok(s)
    }

    /// A single clean paraboloid tip of apex radius `radius` (m, in `[1e-12, 1e-3]`).
    pub fn sharp(radius: f64) -> Result<Self> {
        check_arg("radius", radius, MIN_STATE_RADIUS, MAX_STATE_LENGTH, "m")?;
        Ok(Self {
            radius,
            flat_radius: 0.0,
            second: None,
            adsorbate: None,
        })
    }

    /// The same tip blunted to a flat apex of radius `flat_radius` (m, in `[0, 1e-3]`).
    pub fn with_flat_radius(mut self, flat_radius: f64) -> Result<Self> {
        check_arg("flat_radius", flat_radius, 0.0, MAX_STATE_LENGTH, "m")?;
        self.flat_radius = flat_radius;
        Ok(self)
    }

    /// The same tip with a second apex (`None`: single).
    pub fn with_second_apex(mut self, second: Option<SecondApex>) -> Result<Self> {
        if let Some(d) = second {
            check_arg("offset", d.offset[0], -MAX_FEATURE, MAX_FEATURE, "m")?;
            check_arg("offset", d.offset[1], -MAX_FEATURE, MAX_FEATURE, "m")?;
            check_arg("dz", d.dz, 0.0, MAX_FEATURE, "m")?;
        }
        self.second = second;
        Ok(self)
    }

    /// The same tip carrying `adsorbate` (`None`: clean).
    pub fn with_adsorbate(mut self, adsorbate: Option<Adsorbate>) -> Result<Self> {
        if let Some(a) = adsorbate {
            check_arg("blur", a.blur, 0.0, MAX_FEATURE, "m")?;
            check_arg("noise_factor", a.noise_factor, 1.0, 100.0, "")?;
            check_arg("glitch_probability", a.glitch_probability, 0.0, 1.0, "")?;
        }
        self.adsorbate = adsorbate;
        Ok(self)
    }

    /// Apex radius `R`, m.
    pub fn radius(&self) -> f64 {
        self.radius
    }

    /// Radius `a` of the flat (blunted) apex, m (0: none).
    pub fn flat_radius(&self) -> f64 {
        self.flat_radius
    }

    /// The second apex, if the tip is double.
    pub fn second_apex(&self) -> Option<SecondApex> {
        self.second
    }

    /// The adsorbate, if any.
    pub fn adsorbate(&self) -> Option<Adsorbate> {
        self.adsorbate
    }

    /// Whether the tip is double.
    pub fn is_double(&self) -> bool {
        self.second.is_some()
    }

    /// Whether an adsorbate sits on the tip.
    pub fn has_adsorbate(&self) -> bool {
        self.adsorbate.is_some()
    }

    /// The kernel's paraboloid radius `R_k = R + b` (`b` the adsorbate's blur), m.
    pub fn kernel_radius(&self) -> f64 {
        self.radius + self.adsorbate.map_or(0.0, |a| a.blur)
    }

    /// The effective radius `R_eff = R + a + b`, m: how wide the tip images a point.
    pub fn effective_radius(&self) -> f64 {
        self.kernel_radius() + self.flat_radius
    }

    /// Factor (≥ 1) on the image noise: the adsorbate's, 1 without one.
    pub fn noise_factor(&self) -> f64 {
        self.adsorbate.map_or(1.0, |a| a.noise_factor)
    }

    /// Probability per scan line that the simulator adds a glitch (a streak): the adsorbate's,
    /// 0 without one.
    pub fn glitch_probability(&self) -> f64 {
        self.adsorbate.map_or(0.0, |a| a.glitch_probability)
    }

    /// Tip quality in `[0, 1]` (1 = ideal): `q_R · q_D · q_A` with
    /// `q_R = clamp(ln(R_max/R_eff) / ln(R_max/R_min), 0, 1)`, `q_D = 1 - 0.5·exp(-dz/1 nm)`
    /// for a double tip (1 otherwise) and `q_A = 0.7` with an adsorbate (1 otherwise).
    pub fn quality(&self, cfg: &TipConfig) -> f64 {
        let (rmin, rmax) = (cfg.min_radius.get(), cfg.max_radius.get());
        let q_r = if rmax > rmin {
            ((rmax / self.effective_radius()).ln() / (rmax / rmin).ln()).clamp(0.0, 1.0)
        } else if self.effective_radius() <= rmin {
            1.0
        } else {
            0.0
        };
        let q_d = self
            .second
            .map_or(1.0, |d| 1.0 - 0.5 * (-d.dz / DOUBLE_DEPTH_SCALE).exp());
        let q_a = if self.has_adsorbate() {
            ADSORBATE_QUALITY
        } else {
            1.0
        };
        let q = q_r * q_d * q_a;
        if q.is_nan() { 0.0 } else { q }
    }

    /// Whether the tip is good: single, clean, and `R_eff ≤ good_radius`.
    pub fn is_good(&self, cfg: &TipConfig) -> bool {
        self.second.is_none()
            && self.adsorbate.is_none()
            && self.effective_radius() <= cfg.good_radius.get()
    }
}

/// A random second apex: offset `[0.5, 1] × double_offset` in a uniform direction, depth
/// `[0, 1] × double_dz`.
pub(super) fn draw_second(cfg: &TipConfig, rng: &mut SimRng) -> SecondApex {
    let (u_r, u_phi, u_z) = (uniform(rng), uniform(rng), uniform(rng));
    let r = cfg.double_offset.get() * (0.5 + 0.5 * u_r);
    let phi = std::f64::consts::TAU * u_phi;
    SecondApex {
        offset: [r * phi.cos(), r * phi.sin()],
        dz: cfg.double_dz.get() * u_z,
    }
}
