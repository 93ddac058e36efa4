//! Physical parameters that are either fixed values or distributions (domain randomization).
//!
//! A [`Param`] field in a config deserializes from
//! - a number (SI units): `current = 1e-10`,
//! - a quantity string: `current = "100 pA"`,
//! - a distribution: `current = { uniform = ["50 pA", "150 pA"] }`,
//!   `{ normal = [mean, sd] }` or `{ log_uniform = [lo, hi] }`.
//!
//! [`resolve`] turns a config holding distributions into one holding only fixed values, drawing
//! each from a seeded generator in a fixed (alphabetical field path) order, so the same seed
//! always gives the same values.
//!
//! ```
//! use scopegym_physics::param::{Param, resolve};
//! use scopegym_physics::param::dims::Length;
//! use scopegym_physics::rng::seeded;
//! #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
//! struct Cfg { radius: Param<Length> }
//! let cfg: Cfg = toml::from_str(r#"radius = { uniform = ["5 nm", "50 nm"] }"#).unwrap();
//! let fixed = resolve(&cfg, &mut seeded(7)).unwrap();
//! let r = fixed.radius.get();
//! assert!((5e-9..=50e-9).contains(&r));
//! assert_eq!(fixed, resolve(&cfg, &mut seeded(7)).unwrap());
//! ```

use crate::error::{PhysicsError, Result};
use crate::units::{Dimension, parse_quantity};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::marker::PhantomData;

/// A compile-time physical dimension for [`Param`] fields.
pub trait Dim: Copy + fmt::Debug + Default + Send + Sync + 'static {
    /// The dimension quantities of this kind must have.
    const DIM: Dimension;
}

macro_rules! dims {
    ($($(#[$m:meta])* $name:ident = $d:ident;)*) => {$(
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $name;
        impl Dim for $name { const DIM: Dimension = Dimension::$d; }
    )*};
}

/// Dimension markers for [`Param`].
pub mod dims {
    use super::{Dim, Dimension};
    dims! {
        /// Metres.
        Length = LENGTH;
        /// Seconds.
        Time = TIME;
        /// Amperes.
        Current = CURRENT;
        /// Electronvolts (voltage units accepted).
        Energy = ENERGY;
        /// Volts.
        Voltage = VOLTAGE;
        /// Radians.
        Angle = ANGLE;
        /// Kelvin.
        Temperature = TEMPERATURE;
        /// Hertz.
        Frequency = FREQUENCY;
        /// Metres per second.
        Velocity = VELOCITY;
        /// Square metres.
        Area = AREA;
        /// Electrons per square metre.
        Dose = DOSE;
        /// Square metres per second.
        Diffusivity = DIFFUSIVITY;
        /// A plain number.
        Unitless = DIMENSIONLESS;
    }
}

/// A value or a distribution over values, in SI units of dimension `D`.
#[derive(Clone, Copy, PartialEq)]
pub enum Param<D: Dim> {
    /// A fixed value.
    Fixed(f64, PhantomData<D>),
    /// Uniform on `[lo, hi]`.
    Uniform(f64, f64, PhantomData<D>),
    /// Normal with mean and standard deviation.
    Normal(f64, f64, PhantomData<D>),
    /// Log-uniform on `[lo, hi]`, `0 < lo ≤ hi`.
    LogUniform(f64, f64, PhantomData<D>),
}

impl<D: Dim> fmt::Debug for Param<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Fixed(v, _) => write!(f, "{v:e}"),
            Self::Uniform(a, b, _) => write!(f, "uniform[{a:e}, {b:e}]"),
            Self::Normal(a, b, _) => write!(f, "normal[{a:e}, {b:e}]"),
            Self::LogUniform(a, b, _) => write!(f, "log_uniform[{a:e}, {b:e}]"),
        }
    }
}

impl<D: Dim> Default for Param<D> {
    fn default() -> Self {
        Self::fixed(0.0)
    }
}

impl<D: Dim> From<f64> for Param<D> {
    fn from(v: f64) -> Self {
        Self::fixed(v)
    }
}

impl<D: Dim> Param<D> {
    /// A fixed value in SI units.
    pub const fn fixed(v: f64) -> Self {
        Self::Fixed(v, PhantomData)
    }

    /// Uniform distribution on `[lo, hi]`.
    pub const fn uniform(lo: f64, hi: f64) -> Self {
        Self::Uniform(lo, hi, PhantomData)
    }

    /// Log-uniform distribution on `[lo, hi]`, `0 < lo ≤ hi`.
    pub const fn log_uniform(lo: f64, hi: f64) -> Self {
        Self::LogUniform(lo, hi, PhantomData)
    }

    /// The fixed value `lo` when `lo == hi`, else uniform on `[lo, hi]` (a range in a table of
    /// levels, where an easy level often pins a parameter).
    pub fn between(lo: f64, hi: f64) -> Self {
        if lo == hi {
            Self::fixed(lo)
        } else {
            Self::uniform(lo, hi)
        }
    }

    /// The value: the fixed value, or the distribution's centre (mean, midpoint or geometric mean)
    /// when the config has not been [`resolve`]d.
    pub fn get(&self) -> f64 {
        match *self {
            Self::Fixed(v, _) => v,
            Self::Uniform(a, b, _) => 0.5 * (a + b),
            Self::Normal(m, _, _) => m,
            Self::LogUniform(a, b, _) => (a * b).sqrt(),
        }
    }

    /// Whether this is a fixed value.
    pub fn is_fixed(&self) -> bool {
        matches!(self, Self::Fixed(..))
    }

    /// Draws a value.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        sample_dist(self.kind(), rng, Region::All)
    }

    /// Draws a value from `region` of the distribution (see [`Region`]).
    pub fn sample_in<R: Rng + ?Sized>(&self, rng: &mut R, region: Region) -> f64 {
        sample_dist(self.kind(), rng, region)
    }

    pub(crate) fn kind(&self) -> (Option<&'static str>, f64, f64) {
        match *self {
            Self::Fixed(v, _) => (None, v, v),
            Self::Uniform(a, b, _) => (Some("uniform"), a, b),
            Self::Normal(a, b, _) => (Some("normal"), a, b),
            Self::LogUniform(a, b, _) => (Some("log_uniform"), a, b),
        }
    }
}

/// The part of every distribution that draws come from: the whole of it, or one of two
/// complementary sets of quantile bands, so that two sets of episodes can be drawn whose
/// parameters never meet (held-out evaluation ranges) while covering the same overall span.
///
/// The unit interval of quantiles is cut into four strata of width ¼; [`Region::Main`] draws
/// from the lower 80 % of each stratum, [`Region::HeldOut`] from the upper 20 %
/// (`[0.2, 0.25) ∪ [0.45, 0.5) ∪ [0.7, 0.75) ∪ [0.95, 1)`). A uniform `u` is mapped onto the
/// region's bands, then through the distribution's quantile function, so every region costs the
/// same draws and the same seed gives the same stream of generator calls in each.
///
/// ```
/// use scopegym_physics::param::Region;
/// assert_eq!(Region::All.quantile(0.3), 0.3);
/// let q = Region::HeldOut.quantile(0.3); // stratum 1, 20 % into its held-out band
/// assert!((q - 0.46).abs() < 1e-12);
/// assert!(Region::Main.quantile(0.999) < 0.95);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Region {
    /// The whole distribution.
    #[default]
    All,
    /// The lower 80 % of each quarter of the quantile range.
    Main,
    /// The upper 20 % of each quarter of the quantile range (disjoint from [`Region::Main`]).
    HeldOut,
}

impl Region {
    /// Maps a uniform `u ∈ [0, 1)` onto this region's quantile bands (measure-preserving up to
    /// scale, monotone within each stratum).
    pub fn quantile(self, u: f64) -> f64 {
        let u = u.clamp(0.0, 1.0 - f64::EPSILON);
        let (k, v) = ((4.0 * u).floor(), (4.0 * u).fract());
        match self {
            Self::All => u,
            Self::Main => 0.25 * (k + 0.8 * v),
            Self::HeldOut => 0.25 * (k + 0.8 + 0.2 * v),
        }
    }

    /// Draws a value uniformly from `[lo, hi]`, restricted to this region's bands.
    pub fn uniform<R: Rng + ?Sized>(self, rng: &mut R, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.quantile(rng.random::<f64>())
    }
}

/// The standard normal quantile function Φ⁻¹(p) for `p ∈ (0, 1)` (Acklam's rational
/// approximation, relative error below 1.2e-9: ample for parameter draws).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

fn sample_dist<R: Rng + ?Sized>(
    kind: (Option<&str>, f64, f64),
    rng: &mut R,
    region: Region,
) -> f64 {
    let (k, a, b) = kind;
    match k {
        None => a,
        Some("uniform") => a + (b - a) * region.quantile(rng.random::<f64>()),
        Some("normal") if region == Region::All => {
            let z: f64 = StandardNormal.sample(rng);
            a + b * z
        }
        Some("normal") => a + b * normal_quantile(region.quantile(rng.random::<f64>()).max(1e-12)),
        Some("log_uniform") => {
            (a.ln() + (b.ln() - a.ln()) * region.quantile(rng.random::<f64>())).exp()
        }
        Some(_) => a,
    }
}

fn check_dist(kind: &str, a: f64, b: f64) -> std::result::Result<(), String> {
    if !a.is_finite() || !b.is_finite() {
        return Err(format!("{kind} bounds must be finite"));
    }
    match kind {
        "uniform" if a > b => Err(format!("uniform needs lo <= hi, got [{a}, {b}]")),
        "normal" if b < 0.0 => Err(format!("normal needs sd >= 0, got {b}")),
        "log_uniform" if !(a > 0.0 && a <= b) => {
            Err(format!("log_uniform needs 0 < lo <= hi, got [{a}, {b}]"))
        }
        _ => Ok(()),
    }
}

const KINDS: [&str; 3] = ["uniform", "normal", "log_uniform"];

impl<D: Dim> Serialize for Param<D> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.kind() {
            (None, v, _) => s.serialize_f64(v),
            (Some(k), a, b) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry(k, &[a, b])?;
                m.end()
            }
        }
    }
}

/// A number or a quantity string, as found in a scenario file.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Num(f64),
    Int(i64),
    Text(String),
}

fn scalar_to_si<E: de::Error>(s: Scalar, dim: Dimension) -> std::result::Result<f64, E> {
    match s {
        Scalar::Num(v) if v.is_finite() => Ok(v),
        Scalar::Num(v) => Err(E::custom(format!("{v} is not a finite number"))),
        Scalar::Int(i) => Ok(i as f64),
        Scalar::Text(t) => parse_quantity(&t, dim).map_err(E::custom),
    }
}

impl<'de, D: Dim> Deserialize<'de> for Param<D> {
    fn deserialize<De: Deserializer<'de>>(d: De) -> std::result::Result<Self, De::Error> {
        struct V<D>(PhantomData<D>);
        impl<'de, D: Dim> Visitor<'de> for V<D> {
            type Value = Param<D>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "{} as a number in SI units, a string with a unit, or a table \
                     {{ uniform = [lo, hi] }} / {{ normal = [mean, sd] }} / {{ log_uniform = [lo, hi] }}",
                    D::DIM
                )
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Self::Value, E> {
                scalar_to_si(Scalar::Num(v), D::DIM).map(Param::fixed)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
                Ok(Param::fixed(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
                Ok(Param::fixed(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                parse_quantity(v, D::DIM)
                    .map(Param::fixed)
                    .map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "empty table: expected one of uniform, normal, log_uniform",
                    ));
                };
                if !KINDS.contains(&key.as_str()) {
                    return Err(de::Error::unknown_field(&key, &KINDS));
                }
                let pair: Vec<Scalar> = map.next_value()?;
                if pair.len() != 2 {
                    return Err(de::Error::custom(format!(
                        "`{key}` needs exactly two values"
                    )));
                }
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom(
                        "a distribution table holds exactly one key",
                    ));
                }
                let mut it = pair.into_iter();
                let a = scalar_to_si(it.next().expect("two values"), D::DIM)?;
                let b = scalar_to_si(it.next().expect("two values"), D::DIM)?;
                check_dist(&key, a, b).map_err(de::Error::custom)?;
                Ok(match key.as_str() {
                    "uniform" => Param::Uniform(a, b, PhantomData),
                    "normal" => Param::Normal(a, b, PhantomData),
                    _ => Param::LogUniform(a, b, PhantomData),
                })
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// Replaces every distribution in `cfg` by a value drawn from `rng`.
///
/// Works on any config that serializes: the config is walked as a TOML tree in sorted key order
/// (so the draws are reproducible), each `{ uniform | normal | log_uniform = [a, b] }` table is
/// replaced by a number, and the tree is read back into `T`.
pub fn resolve<T, R>(cfg: &T, rng: &mut R) -> Result<T>
where
    T: Serialize + DeserializeOwned,
    R: Rng + ?Sized,
{
    resolve_in(cfg, rng, Region::All)
}

/// [`resolve`], drawing every distribution from `region` (held-out parameter ranges).
pub fn resolve_in<T, R>(cfg: &T, rng: &mut R, region: Region) -> Result<T>
where
    T: Serialize + DeserializeOwned,
    R: Rng + ?Sized,
{
    let mut value = toml::Value::try_from(cfg)
        .map_err(|e| PhysicsError::param("<config>", format!("cannot serialize: {e}")))?;
    walk_recorded(&mut value, rng, region, &mut Vec::new());
    value
        .try_into()
        .map_err(|e: toml::de::Error| PhysicsError::param("<config>", e.to_string()))
}

/// A config template whose distributions are redrawn at every episode: [`resolve_in`] with the
/// template serialized once, and the drawn values reported by their dotted keys.
///
/// ```
/// use scopegym_physics::param::{Param, Randomizer, Region};
/// use scopegym_physics::rng::seeded;
/// use scopegym_physics::param::dims::Length;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Film {
///     thickness: Param<Length>,
/// }
/// let r = Randomizer::new(Film { thickness: Param::uniform(1e-9, 2e-9) }).unwrap();
/// let (film, drawn) = r.draw(&mut seeded(4), Region::All).unwrap();
/// assert_eq!(drawn, vec![("thickness".to_string(), film.thickness.get())]);
/// assert!((1e-9..=2e-9).contains(&film.thickness.get()));
/// ```
#[derive(Debug, Clone)]
pub struct Randomizer<T> {
    template: T,
    tree: toml::Value,
}

impl<T: Serialize + DeserializeOwned> Randomizer<T> {
    /// Serializes `template` once; fails if it cannot be written as TOML.
    pub fn new(template: T) -> Result<Self> {
        let tree = toml::Value::try_from(&template)
            .map_err(|e| PhysicsError::param("<config>", format!("cannot serialize: {e}")))?;
        Ok(Self { template, tree })
    }

    /// The template, distributions included.
    pub fn template(&self) -> &T {
        &self.template
    }

    /// Draws every distribution from `region` (in sorted key order, the same draws as
    /// [`resolve_in`]) and returns the resolved config with `(dotted key, value)` for every
    /// drawn parameter, array elements as `key[i]`.
    pub fn draw<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        region: Region,
    ) -> Result<(T, Vec<(String, f64)>)> {
        let mut value = self.tree.clone();
        let mut drawn = Vec::new();
        walk_recorded(&mut value, rng, region, &mut drawn);
        let cfg = value
            .try_into()
            .map_err(|e: toml::de::Error| PhysicsError::param("<config>", e.to_string()))?;
        Ok((cfg, drawn))
    }

    /// [`Randomizer::draw`] until `validate` accepts the drawn config, continuing the same
    /// generator (so the result is still a function of the seed): the distributions are
    /// truncated to the part of their support where the config is valid. Fails after
    /// [`MAX_REDRAWS`] invalid draws in a row, naming the field the last one broke; a template
    /// that passed [`Randomizer::check_support`] rejects only combinations of parameters (or
    /// the far tails of normals), so that takes a pathological config.
    pub fn draw_valid<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        region: Region,
        validate: impl Fn(&T) -> Result<()>,
    ) -> Result<(T, Vec<(String, f64)>)> {
        let mut last = None;
        for _ in 0..MAX_REDRAWS {
            let (cfg, drawn) = self.draw(rng, region)?;
            match validate(&cfg) {
                Ok(()) => return Ok((cfg, drawn)),
                Err(e) => last = Some(e),
            }
        }
        Err(redraws_exhausted(last.expect("MAX_REDRAWS > 0")))
    }

    /// Checks that the config is valid over the whole support of every distribution, not just
    /// at its centre: each distribution in turn is set to each end of its support (uniform and
    /// log-uniform: `lo` and `hi`; normal: `mean ± 2 sd`, beyond which only 4.6 % of draws
    /// fall and [`Randomizer::draw_valid`] redraws) with every other distribution at its
    /// centre, and `validate` must accept the result. The error names the distribution's field
    /// and the value that breaks the config.
    pub fn check_support(&self, validate: impl Fn(&T) -> Result<()>) -> Result<()> {
        let leaves = collect_dists(&self.tree);
        for (i, (path, kind, a, b)) in leaves.iter().enumerate() {
            for end in support_ends(kind, *a, *b) {
                let mut tree = self.tree.clone();
                let mut k = 0;
                replace_dists(&mut tree, &mut String::new(), &mut |_, kind, a, b| {
                    let x = if k == i { end } else { centre(kind, a, b) };
                    k += 1;
                    x
                });
                let outcome = tree
                    .try_into()
                    .map_err(|e: toml::de::Error| PhysicsError::param(path.clone(), e.to_string()))
                    .and_then(|cfg: T| validate(&cfg));
                if let Err(e) = outcome {
                    return Err(support_error(path.clone(), (kind, *a, *b), end, &e));
                }
            }
        }
        Ok(())
    }
}

/// How many invalid draws in a row [`Randomizer::draw_valid`] tries before it gives up.
pub const MAX_REDRAWS: usize = 64;

/// The two ends of a distribution's support that support checks pin it to: `lo` and `hi` of a
/// uniform or log-uniform, `mean ± 2 sd` of a normal (beyond which only 4.6 % of draws fall
/// and the redraw truncates).
pub(crate) fn support_ends(kind: &str, a: f64, b: f64) -> [f64; 2] {
    match kind {
        "normal" => [a - 2.0 * b, a + 2.0 * b],
        _ => [a, b],
    }
}

/// The error of a support check: distribution `(kind, a, b)` of `field` reaches `end`, where
/// the config is invalid for `reason`.
pub(crate) fn support_error(
    field: impl Into<String>,
    (kind, a, b): (&str, f64, f64),
    end: f64,
    reason: &PhysicsError,
) -> PhysicsError {
    let reason = match reason {
        PhysicsError::InvalidParameter { reason, .. } => reason.clone(),
        other => other.to_string(),
    };
    let what = if kind == "normal" {
        format!("normal(mean {a:e}, sd {b:e}) puts draws beyond {end:e}")
    } else {
        format!("{kind} [{a:e}, {b:e}] reaches {end:e}")
    };
    PhysicsError::param(
        field,
        format!("{what}, where the config is invalid: {reason}"),
    )
}

/// The error after [`MAX_REDRAWS`] invalid draws in a row, from the last draw's error.
pub(crate) fn redraws_exhausted(last: PhysicsError) -> PhysicsError {
    let (field, reason) = match last {
        PhysicsError::InvalidParameter { field, reason } => (field, reason),
        other => ("<config>".to_string(), other.to_string()),
    };
    PhysicsError::param(
        field,
        format!(
            "{MAX_REDRAWS} draws of the randomized parameters in a row gave an invalid config \
             (narrow the distributions); the last: {reason}"
        ),
    )
}

/// The centre of a distribution (as [`Param::get`] reads it).
fn centre(kind: &str, a: f64, b: f64) -> f64 {
    match kind {
        "uniform" => 0.5 * (a + b),
        "log_uniform" => (a * b).sqrt(),
        _ => a,
    }
}

/// Visits every distribution in `v` in one fixed order (tables key by key, arrays element by
/// element) and replaces it by `f(dotted path, kind, a, b)`: the one tree walk behind drawing
/// ([`walk_recorded`]), listing and pinning distributions ([`Randomizer::check_support`]).
fn replace_dists(
    v: &mut toml::Value,
    path: &mut String,
    f: &mut impl FnMut(&str, &'static str, f64, f64) -> f64,
) {
    let len = path.len();
    match v {
        toml::Value::Table(t) => {
            if let Some((k, a, b)) = as_dist(t) {
                *v = toml::Value::Float(f(path, k, a, b));
            } else {
                for (key, child) in t.iter_mut() {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                    replace_dists(child, path, f);
                    path.truncate(len);
                }
            }
        }
        toml::Value::Array(a) => {
            for (i, child) in a.iter_mut().enumerate() {
                use std::fmt::Write as _;
                let _ = write!(path, "[{i}]");
                replace_dists(child, path, f);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Every distribution in `v` as `(dotted path, kind, a, b)`, in [`replace_dists`]'s order.
fn collect_dists(v: &toml::Value) -> Vec<(String, &'static str, f64, f64)> {
    let mut out = Vec::new();
    replace_dists(&mut v.clone(), &mut String::new(), &mut |p, k, a, b| {
        out.push((p.to_string(), k, a, b));
        a
    });
    out
}

/// Draws every distribution in `v` (replacing it by the draw) and records `(path, value)`.
fn walk_recorded<R: Rng + ?Sized>(
    v: &mut toml::Value,
    rng: &mut R,
    region: Region,
    drawn: &mut Vec<(String, f64)>,
) {
    replace_dists(v, &mut String::new(), &mut |p, k, a, b| {
        let x = sample_dist((Some(k), a, b), rng, region);
        drawn.push((p.to_string(), x));
        x
    });
}

/// The number of distributions (randomized parameters) in `cfg`.
pub fn count_distributions<T: Serialize>(cfg: &T) -> usize {
    toml::Value::try_from(cfg)
        .map(|v| collect_dists(&v).len())
        .unwrap_or(0)
}

fn as_dist(t: &toml::map::Map<String, toml::Value>) -> Option<(&'static str, f64, f64)> {
    if t.len() != 1 {
        return None;
    }
    let (k, v) = t.iter().next()?;
    let kind = KINDS.iter().find(|x| **x == k)?;
    let arr = v.as_array()?;
    if arr.len() != 2 {
        return None;
    }
    let num = |x: &toml::Value| x.as_float().or_else(|| x.as_integer().map(|i| i as f64));
    Some((kind, num(&arr[0])?, num(&arr[1])?))
}

#[cfg(test)]
mod tests {
    use super::dims::*;
    use super::*;
    use crate::rng::seeded;

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        e: Param<Energy>,
        i: Param<Current>,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        a: Param<Length>,
        inner: Inner,
        n: u32,
    }

    #[test]
    fn reads_numbers_strings_and_distributions() {
        let c: Outer = toml::from_str(
            r#"
            a = "2 nm"
            n = 3
            [inner]
            e = { uniform = ["60 kV", "80 kV"] }
            i = { log_uniform = ["10 pA", 1e-9] }
            "#,
        )
        .unwrap();
        assert_eq!(c.a.get(), 2e-9);
        assert!(!c.inner.e.is_fixed());
        assert_eq!(count_distributions(&c), 2);
        let r = resolve(&c, &mut seeded(1)).unwrap();
        assert_eq!(count_distributions(&r), 0);
        assert!((60e3..=80e3).contains(&r.inner.e.get()));
        assert!((1e-11..=1e-9).contains(&r.inner.i.get()));
        assert_eq!(r.n, 3);
        // Reproducible and seed-dependent.
        assert_eq!(r, resolve(&c, &mut seeded(1)).unwrap());
        assert_ne!(r, resolve(&c, &mut seeded(2)).unwrap());
    }

    #[test]
    fn randomizer_draws_what_resolve_draws_and_names_each_draw() {
        let c: Outer = toml::from_str(
            r#"
            a = { normal = ["2 nm", "0.1 nm"] }
            n = 3
            [inner]
            e = { uniform = ["60 kV", "80 kV"] }
            i = 1e-9
            "#,
        )
        .unwrap();
        let r = Randomizer::new(c.clone()).unwrap();
        for region in [Region::All, Region::Main, Region::HeldOut] {
            let (got, drawn) = r.draw(&mut seeded(9), region).unwrap();
            assert_eq!(got, resolve_in(&c, &mut seeded(9), region).unwrap());
            assert_eq!(
                drawn,
                vec![
                    ("a".to_string(), got.a.get()),
                    ("inner.e".to_string(), got.inner.e.get())
                ]
            );
        }
    }

    #[test]
    fn rejects_bad_distributions_and_units() {
        let bad = [
            r#"a = { uniform = [3, 1] }"#,
            r#"a = { normal = [1, -1] }"#,
            r#"a = { log_uniform = [0, 1] }"#,
            r#"a = { gamma = [1, 1] }"#,
            r#"a = { uniform = [1] }"#,
            r#"a = "60 kV""#,
        ];
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct One {
            a: Param<Length>,
        }
        for b in bad {
            assert!(toml::from_str::<One>(b).is_err(), "accepted {b}");
        }
    }

    #[test]
    fn regions_are_disjoint_and_cover_the_span() {
        let p: Param<Length> = Param::uniform(1.0, 5.0);
        let mut rng = seeded(9);
        let band = |x: f64| {
            let q = (x - 1.0) / 4.0;
            (4.0 * q).fract() >= 0.8 - 1e-12
        };
        let (mut lo, mut hi) = (f64::MAX, f64::MIN);
        for _ in 0..20000 {
            let m = p.sample_in(&mut rng, Region::Main);
            let h = p.sample_in(&mut rng, Region::HeldOut);
            assert!(!band(m), "main draw {m} in a held-out band");
            assert!(band(h), "held-out draw {h} outside the held-out bands");
            lo = lo.min(m.min(h));
            hi = hi.max(m.max(h));
        }
        assert!(lo < 1.01 && hi > 4.99, "[{lo}, {hi}]");
        // Normals: held-out draws are the held-out quantile bands of N(0, 1).
        let n: Param<Length> = Param::Normal(0.0, 1.0, PhantomData);
        for _ in 0..2000 {
            let z = n.sample_in(&mut rng, Region::HeldOut);
            let q = 0.5 * (1.0 + erf(z / 2f64.sqrt()));
            assert!((4.0 * q).fract() >= 0.8 - 1e-6, "z {z} q {q}");
        }
    }

    /// erf by Abramowitz–Stegun 7.1.26 (|error| < 1.5e-7): an independent check of the quantile.
    fn erf(x: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.3275911 * x.abs());
        let y = 1.0
            - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
                + 0.254829592)
                * t
                * (-x * x).exp();
        y.copysign(x)
    }

    #[test]
    fn normal_quantile_matches_known_values() {
        for (p, z) in [
            (0.5, 0.0),
            (0.975, 1.959963985),
            (0.8413447461, 1.0),
            (0.001, -3.090232306),
        ] {
            assert!(
                (normal_quantile(p) - z).abs() < 1e-6,
                "{p}: {}",
                normal_quantile(p)
            );
        }
    }

    #[test]
    fn normal_samples_have_the_right_moments() {
        let p: Param<Length> = Param::Normal(5.0, 2.0, PhantomData);
        let mut rng = seeded(3);
        let xs: Vec<f64> = (0..20000).map(|_| p.sample(&mut rng)).collect();
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!((m - 5.0).abs() < 0.05, "{m}");
        assert!((v.sqrt() - 2.0).abs() < 0.05, "{v}");
    }

    #[derive(Serialize, Deserialize, Debug, Clone)]
    struct Pair {
        x: Param<Length>,
        y: Param<Length>,
    }

    fn positive_sum_below_3(c: &Pair) -> Result<()> {
        if c.x.get() <= 0.0 {
            return Err(PhysicsError::param("x", "must be > 0"));
        }
        if c.x.get() + c.y.get() >= 3.0 {
            return Err(PhysicsError::param("y", "x + y must be < 3"));
        }
        Ok(())
    }

    #[test]
    fn support_checks_name_the_field_and_the_breaking_end() {
        let ok = Randomizer::new(Pair {
            x: Param::uniform(0.5, 1.5),
            y: Param::fixed(1.0),
        })
        .unwrap();
        assert!(ok.check_support(positive_sum_below_3).is_ok());
        let bad = Randomizer::new(Pair {
            x: Param::uniform(-0.5, 1.5),
            y: Param::fixed(1.0),
        })
        .unwrap();
        let e = bad.check_support(positive_sum_below_3).unwrap_err();
        assert!(
            matches!(&e, PhysicsError::InvalidParameter { field, .. } if field == "x"),
            "{e}"
        );
        assert!(e.to_string().contains("-5e-1"), "{e}");
        // The upper end breaks the other field's rule: reported under the distribution's path.
        let high = Randomizer::new(Pair {
            x: Param::uniform(0.5, 2.5),
            y: Param::fixed(1.0),
        })
        .unwrap();
        let e = high.check_support(positive_sum_below_3).unwrap_err();
        assert!(
            matches!(&e, PhysicsError::InvalidParameter { field, .. } if field == "x"),
            "{e}"
        );
        // Normals are checked at mean ± 2 sd.
        let n = Randomizer::new(Pair {
            x: Param::Normal(1.0, 0.6, PhantomData),
            y: Param::fixed(0.0),
        })
        .unwrap();
        assert!(n.check_support(positive_sum_below_3).is_err());
        let n = Randomizer::new(Pair {
            x: Param::Normal(1.0, 0.45, PhantomData),
            y: Param::fixed(0.0),
        })
        .unwrap();
        assert!(n.check_support(positive_sum_below_3).is_ok());
    }

    #[test]
    fn draw_valid_truncates_and_is_reproducible() {
        // P(x <= 0) = Φ(-2.22) ≈ 1.3 % of plain draws.
        let r = Randomizer::new(Pair {
            x: Param::Normal(1.0, 0.45, PhantomData),
            y: Param::fixed(0.0),
        })
        .unwrap();
        let mut plain_invalid = 0;
        for seed in 0..2000 {
            let (c, drawn) = r
                .draw_valid(&mut seeded(seed), Region::All, positive_sum_below_3)
                .unwrap();
            assert!(c.x.get() > 0.0 && c.x.get() < 3.0);
            assert_eq!(drawn, vec![("x".to_string(), c.x.get())]);
            let (again, _) = r
                .draw_valid(&mut seeded(seed), Region::All, positive_sum_below_3)
                .unwrap();
            assert_eq!(again.x.get(), c.x.get());
            let (p, _) = r.draw(&mut seeded(seed), Region::All).unwrap();
            if positive_sum_below_3(&p).is_err() {
                plain_invalid += 1;
            }
        }
        assert!(
            plain_invalid > 5,
            "the plain draws do hit the tail: {plain_invalid}"
        );
        // A config no draw satisfies: a clear error after MAX_REDRAWS, naming the field.
        let never = Randomizer::new(Pair {
            x: Param::uniform(4.0, 5.0),
            y: Param::fixed(0.0),
        })
        .unwrap();
        let e = never
            .draw_valid(&mut seeded(1), Region::All, positive_sum_below_3)
            .unwrap_err();
        assert!(
            matches!(&e, PhysicsError::InvalidParameter { field, reason } if field == "y" && reason.contains("64 draws")),
            "{e}"
        );
    }
}
