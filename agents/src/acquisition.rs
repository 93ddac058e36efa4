//! Acquisition functions for maximization (DESIGN.md §9): with `μ`, `σ` the posterior mean and
//! standard deviation at a candidate and `f*` the best value observed so far,
//! `z = (μ − f* − ξ) / σ`:
//!
//! - EI (expected improvement) `= σ (φ(z) + z Φ(z))`;
//! - LogEI, its logarithm computed without underflow (Ament et al., NeurIPS 2023: far in the
//!   left tail EI underflows to 0 and its gradient vanishes; `log EI` stays finite and
//!   informative);
//! - UCB `= μ + √β σ` (β = 4 by default);
//! - PI `= Φ(z)`;
//! - maximum uncertainty `= σ`;
//! - Thompson sampling: a joint draw of the posterior over the candidates (the GP draws it;
//!   [`Acquisition::score`] does not apply).
//!
//! ```
//! use scopegym_agents::acquisition::{expected_improvement, log_expected_improvement};
//! let ei = expected_improvement(0.2, 0.5, 0.0, 0.0);
//! assert!((log_expected_improvement(0.2, 0.5, 0.0, 0.0) - ei.ln()).abs() < 1e-12);
//! // 40 σ below the best: EI underflows, LogEI does not.
//! assert_eq!(expected_improvement(-40.0, 1.0, 0.0, 0.0), 0.0);
//! assert!(log_expected_improvement(-40.0, 1.0, 0.0, 0.0).is_finite());
//! ```

use serde::{Deserialize, Serialize};
use std::f64::consts::{FRAC_1_SQRT_2, PI};

/// `ln(2π) / 2`.
const HALF_LN_2PI: f64 = 0.918_938_533_204_672_8;

/// An acquisition function, as written in agent configs: a name (`acquisition = "logei"`,
/// any name [`Acquisition::parse`] takes, `"ucb"` with β = 4), or UCB with its β
/// (`acquisition = { ucb = { beta = 2.0 } }`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", try_from = "AcquisitionRepr")]
pub enum Acquisition {
    /// Expected improvement.
    Ei,
    /// The logarithm of the expected improvement, stable in the tails.
    #[default]
    LogEi,
    /// Upper confidence bound `μ + √β σ`.
    Ucb {
        /// Exploration weight β (dimensionless), default 4.
        #[serde(default = "default_beta")]
        beta: f64,
    },
    /// Probability of improvement.
    Pi,
    /// Maximum posterior standard deviation (pure exploration).
    MaxUncertainty,
    /// Thompson sampling: the maximizer of one joint posterior draw.
    Thompson,
}

fn default_beta() -> f64 {
    4.0
}

/// UCB's settings in the table form.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UcbRepr {
    #[serde(default = "default_beta")]
    beta: f64,
}

/// What a config may write for an [`Acquisition`].
#[derive(Deserialize)]
#[serde(untagged)]
enum AcquisitionRepr {
    Name(String),
    Ucb { ucb: UcbRepr },
}

impl TryFrom<AcquisitionRepr> for Acquisition {
    type Error = String;
    fn try_from(r: AcquisitionRepr) -> std::result::Result<Self, String> {
        match r {
            AcquisitionRepr::Name(n) => Self::parse(&n).ok_or_else(|| {
                format!(
                    "unknown acquisition {n:?}; known: ei, logei, ucb, pi, maxuncertainty, \
                     thompson (or {{ ucb = {{ beta = 4.0 }} }})"
                )
            }),
            AcquisitionRepr::Ucb { ucb } => Ok(Self::Ucb { beta: ucb.beta }),
        }
    }
}

impl Acquisition {
    /// The name as configs write it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ei => "ei",
            Self::LogEi => "logei",
            Self::Ucb { .. } => "ucb",
            Self::Pi => "pi",
            Self::MaxUncertainty => "maxuncertainty",
            Self::Thompson => "thompson",
        }
    }

    /// Parses a name (`ei`, `logei`, `ucb` with β = 4, `pi`, `maxuncertainty` or `maxvar`,
    /// `thompson` or `ts`; case-insensitive).
    pub fn parse(name: &str) -> Option<Self> {
        Some(
            match name.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
                "ei" => Self::Ei,
                "logei" => Self::LogEi,
                "ucb" => Self::Ucb { beta: 4.0 },
                "pi" => Self::Pi,
                "maxuncertainty" | "maxvar" | "uncertainty" => Self::MaxUncertainty,
                "thompson" | "ts" => Self::Thompson,
                _ => return None,
            },
        )
    }

    /// The acquisition value at a candidate with posterior mean `mu` and standard deviation
    /// `sigma`, given the best observed value `best` and the improvement margin `xi` (EI,
    /// LogEI, PI). Larger is better. `None` for Thompson sampling, which needs a joint draw.
    pub fn score(&self, mu: f64, sigma: f64, best: f64, xi: f64) -> Option<f64> {
        Some(match *self {
            Self::Ei => expected_improvement(mu, sigma, best, xi),
            Self::LogEi => log_expected_improvement(mu, sigma, best, xi),
            Self::Ucb { beta } => mu + beta.max(0.0).sqrt() * sigma,
            Self::Pi => {
                if sigma > 0.0 {
                    norm_cdf((mu - best - xi) / sigma)
                } else {
                    f64::from(mu > best + xi)
                }
            }
            Self::MaxUncertainty => sigma,
            Self::Thompson => return None,
        })
    }
}

/// The standard normal density φ(z).
pub fn norm_pdf(z: f64) -> f64 {
    (-0.5 * z * z - HALF_LN_2PI).exp()
}

/// The standard normal distribution function Φ(z), accurate in both tails.
pub fn norm_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z * FRAC_1_SQRT_2)
}

/// The scaled complementary error function `erfcx(x) = exp(x²) erfc(x)`, for `x ≥ 0`
/// (relative error below 1e-10): directly below 26, by its asymptotic series above (where
/// `erfc` underflows).
pub fn erfcx(x: f64) -> f64 {
    if x < 26.0 {
        (x * x).exp() * libm::erfc(x)
    } else {
        let r = 1.0 / (x * x);
        (1.0 - 0.5 * r + 0.75 * r * r - 1.875 * r * r * r + 6.5625 * r * r * r * r)
            / (x * PI.sqrt())
    }
}

/// `h(z) = φ(z) + z Φ(z)`, the expected improvement of a unit normal over 0 at mean `z`.
fn h(z: f64) -> f64 {
    norm_pdf(z) + z * norm_cdf(z)
}

/// `ln(1 − eˣ)` for `x < 0`, accurate near 0 and for large `|x|`.
fn log1mexp(x: f64) -> f64 {
    if x > -std::f64::consts::LN_2 {
        (-x.exp_m1()).ln()
    } else {
        (-x.exp()).ln_1p()
    }
}

/// `ln h(z)`, finite for every finite `z`.
///
/// For `z > −1`, directly. Below, `h(z) = φ(z) (1 − |z| · erfcx(|z|/√2) · √(π/2))`, so
/// `ln h = −z²/2 − ln√(2π) + log1mexp(ln(|z| erfcx(|z|/√2)) + ln√(π/2))`; beyond
/// `|z| > 1/√ε` the bracket is `1/z²` to machine precision.
pub fn log_h(z: f64) -> f64 {
    if z > -1.0 {
        h(z).ln()
    } else if z > -1.0 / f64::EPSILON.sqrt() {
        let a = -z;
        let inner = (a * erfcx(a * FRAC_1_SQRT_2)).ln() + 0.5 * (PI / 2.0).ln();
        -0.5 * z * z - HALF_LN_2PI + log1mexp(inner)
    } else {
        -0.5 * z * z - HALF_LN_2PI - 2.0 * (-z).ln()
    }
}

/// Expected improvement `σ h((μ − f* − ξ)/σ)`; with `σ = 0`, `max(μ − f* − ξ, 0)`.
pub fn expected_improvement(mu: f64, sigma: f64, best: f64, xi: f64) -> f64 {
    let d = mu - best - xi;
    if sigma > 0.0 {
        sigma * h(d / sigma)
    } else {
        d.max(0.0)
    }
}

/// `ln EI`, finite wherever `σ > 0` (with `σ = 0`: `ln max(μ − f* − ξ, 0)`, `−∞` when no
/// improvement is possible).
pub fn log_expected_improvement(mu: f64, sigma: f64, best: f64, xi: f64) -> f64 {
    let d = mu - best - xi;
    if sigma > 0.0 {
        log_h(d / sigma) + sigma.ln()
    } else if d > 0.0 {
        d.ln()
    } else {
        f64::NEG_INFINITY
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// EI by numerical integration of `max(x − f*, 0)` against the normal density (Simpson,
    /// ±12 σ): an independent computation of the closed form.
    fn ei_by_quadrature(mu: f64, sigma: f64, best: f64) -> f64 {
        let (a, b) = (best.max(mu - 12.0 * sigma), mu + 12.0 * sigma);
        if a >= b {
            return 0.0;
        }
        let n = 20_000;
        let hstep = (b - a) / n as f64;
        let f = |x: f64| (x - best) * (-0.5 * ((x - mu) / sigma).powi(2)).exp();
        let mut s = f(a) + f(b);
        for i in 1..n {
            s += f(a + i as f64 * hstep) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * hstep / 3.0 / (sigma * (2.0 * PI).sqrt())
    }

    #[test]
    fn ei_matches_quadrature() {
        for &(mu, sigma, best) in &[
            (0.0, 1.0, 0.0),
            (1.0, 0.3, 0.5),
            (-1.0, 2.0, 0.7),
            (0.2, 0.05, 0.3),
        ] {
            let q = ei_by_quadrature(mu, sigma, best);
            let e = expected_improvement(mu, sigma, best, 0.0);
            assert!(
                (e - q).abs() < 1e-9 * (1.0 + q),
                "{mu} {sigma} {best}: {e} vs {q}"
            );
        }
        // At z = 0, EI = σ φ(0) = σ / √(2π).
        let e = expected_improvement(1.0, 2.0, 1.0, 0.0);
        assert!((e - 2.0 / (2.0 * PI).sqrt()).abs() < 1e-15);
    }

    #[test]
    fn log_ei_equals_log_of_ei_where_representable() {
        for i in 0..=400 {
            let z = -30.0 + 0.1 * i as f64;
            let ei = expected_improvement(z, 1.0, 0.0, 0.0);
            assert!(ei > 0.0 && ei.is_finite());
            let le = log_expected_improvement(z, 1.0, 0.0, 0.0);
            assert!(
                (le - ei.ln()).abs() < 1e-9 * (1.0 + ei.ln().abs()),
                "z = {z}: {le} vs {}",
                ei.ln()
            );
        }
    }

    #[test]
    fn log_ei_stays_finite_and_monotone_where_ei_underflows() {
        let mut prev = f64::NEG_INFINITY;
        for i in 0..=2000 {
            let z = -1e4 + 5.0 * i as f64;
            let le = log_h(z);
            assert!(le.is_finite(), "z = {z}");
            assert!(le > prev, "log h must increase: z = {z}");
            prev = le;
        }
        assert_eq!(expected_improvement(-40.0, 1.0, 0.0, 0.0), 0.0);
        // Asymptote: ln h(z) → −z²/2 − ln√(2π) − 2 ln|z|.
        let z = -1e3;
        let asym = -0.5 * z * z - HALF_LN_2PI - 2.0 * 1e3f64.ln();
        assert!((log_h(z) - asym).abs() < 1e-5 * asym.abs());
        // Continuity at the branch points.
        for zb in [-1.0, -1.0 / f64::EPSILON.sqrt()] {
            let (a, b) = (log_h(zb * (1.0 + 1e-12)), log_h(zb * (1.0 - 1e-12)));
            assert!((a - b).abs() < 1e-6 * a.abs().max(1.0), "{zb}: {a} {b}");
        }
    }

    #[test]
    fn erfcx_is_continuous_at_the_switch() {
        let (a, b) = (erfcx(26.0 - 1e-9), erfcx(26.0 + 1e-9));
        assert!((a - b).abs() < 1e-10 * a, "{a} {b}");
    }

    #[test]
    fn scores_follow_the_formulas() {
        let ucb = Acquisition::Ucb { beta: 4.0 };
        assert_eq!(ucb.score(1.0, 0.5, 0.0, 0.0), Some(2.0));
        assert!((Acquisition::Pi.score(0.0, 1.0, 0.0, 0.0).unwrap() - 0.5).abs() < 1e-15);
        assert_eq!(
            Acquisition::MaxUncertainty.score(3.0, 0.25, 9.0, 0.0),
            Some(0.25)
        );
        assert_eq!(Acquisition::Thompson.score(0.0, 1.0, 0.0, 0.0), None);
        assert_eq!(Acquisition::parse("LogEI"), Some(Acquisition::LogEi));
        assert_eq!(Acquisition::parse("nope"), None);
        let cfg: Acquisition = toml::from_str::<toml::Table>("a = { ucb = { beta = 9.0 } }")
            .unwrap()["a"]
            .clone()
            .try_into()
            .unwrap();
        assert_eq!(cfg, Acquisition::Ucb { beta: 9.0 });
        // Names as configs write them, and what serializes reads back.
        let read = |t: &str| -> std::result::Result<Acquisition, String> {
            toml::from_str::<toml::Table>(&format!("a = {t}")).unwrap()["a"]
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| e.to_string())
        };
        assert_eq!(read("\"ucb\""), Ok(Acquisition::Ucb { beta: 4.0 }));
        assert_eq!(read("\"thompson\""), Ok(Acquisition::Thompson));
        assert_eq!(read("{ ucb = {} }"), Ok(Acquisition::Ucb { beta: 4.0 }));
        assert!(
            read("\"best\"")
                .unwrap_err()
                .contains("unknown acquisition")
        );
        for a in [
            Acquisition::LogEi,
            Acquisition::Ucb { beta: 2.5 },
            Acquisition::MaxUncertainty,
        ] {
            let v = toml::Value::try_from(a).unwrap();
            assert_eq!(v.try_into::<Acquisition>().unwrap(), a);
        }
    }

    proptest! {
        #[test]
        fn ei_is_nonnegative_and_bounded_below_by_the_mean_gain(
            mu in -5.0f64..5.0, sigma in 1e-3f64..5.0, best in -5.0f64..5.0
        ) {
            let e = expected_improvement(mu, sigma, best, 0.0);
            prop_assert!(e >= (mu - best).max(0.0) - 1e-12);
            prop_assert!(e <= (mu - best).max(0.0) + sigma * norm_pdf(0.0) + 1e-12);
        }
    }
}
