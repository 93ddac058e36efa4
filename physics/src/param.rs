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
        sample_dist(self.kind(), rng)
    }

    fn kind(&self) -> (Option<&'static str>, f64, f64) {
        match *self {
            Self::Fixed(v, _) => (None, v, v),
            Self::Uniform(a, b, _) => (Some("uniform"), a, b),
            Self::Normal(a, b, _) => (Some("normal"), a, b),
            Self::LogUniform(a, b, _) => (Some("log_uniform"), a, b),
        }
    }
}

fn sample_dist<R: Rng + ?Sized>(kind: (Option<&str>, f64, f64), rng: &mut R) -> f64 {
    let (k, a, b) = kind;
    match k {
        None => a,
        Some("uniform") => a + (b - a) * rng.random::<f64>(),
        Some("normal") => {
            let z: f64 = StandardNormal.sample(rng);
            a + b * z
        }
        Some("log_uniform") => (a.ln() + (b.ln() - a.ln()) * rng.random::<f64>()).exp(),
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
    let mut value = toml::Value::try_from(cfg)
        .map_err(|e| PhysicsError::param("<config>", format!("cannot serialize: {e}")))?;
    walk(&mut value, rng);
    value
        .try_into()
        .map_err(|e: toml::de::Error| PhysicsError::param("<config>", e.to_string()))
}

/// The number of distributions (randomized parameters) in `cfg`.
pub fn count_distributions<T: Serialize>(cfg: &T) -> usize {
    fn count(v: &toml::Value) -> usize {
        match v {
            toml::Value::Table(t) if as_dist(t).is_some() => 1,
            toml::Value::Table(t) => t.values().map(count).sum(),
            toml::Value::Array(a) => a.iter().map(count).sum(),
            _ => 0,
        }
    }
    toml::Value::try_from(cfg).map(|v| count(&v)).unwrap_or(0)
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

fn walk<R: Rng + ?Sized>(v: &mut toml::Value, rng: &mut R) {
    match v {
        toml::Value::Table(t) => {
            if let Some((k, a, b)) = as_dist(t) {
                *v = toml::Value::Float(sample_dist((Some(k), a, b), rng));
            } else {
                for (_, child) in t.iter_mut() {
                    walk(child, rng);
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(|c| walk(c, rng)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::dims::*;
    use super::*;
    use crate::rng::seeded;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        e: Param<Energy>,
        i: Param<Current>,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
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
    fn normal_samples_have_the_right_moments() {
        let p: Param<Length> = Param::Normal(5.0, 2.0, PhantomData);
        let mut rng = seeded(3);
        let xs: Vec<f64> = (0..20000).map(|_| p.sample(&mut rng)).collect();
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!((m - 5.0).abs() < 0.05, "{m}");
        assert!((v.sqrt() - 2.0).abs() < 0.05, "{v}");
    }
}
