//! Observation and action spaces (Gymnasium's Box, Discrete, MultiDiscrete, MultiBinary, Dict)
//! and the values that live in them.
//!
//! Values are flat: a Box value is its elements in row-major order (the shape lives in the
//! space), so vector environments can copy them into contiguous `[N, ...]` buffers.
//!
//! ```
//! use scopegym_envs::space::{Space, Value};
//! use scopegym_envs::rng::seeded;
//! let s = Space::uniform_box(&[2], -1.0, 1.0);
//! let v = s.sample(&mut seeded(1));
//! assert!(s.contains(&v));
//! assert!(!s.contains(&Value::Box(vec![0.0, 2.0])));
//! assert_eq!(s.to_json()["type"], "Box");
//! ```

use crate::error::{EnvError, Result};
use rand::Rng;
use serde_json::{Value as Json, json};

/// Element type of a Box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// 8-bit unsigned integer (images).
    U8,
}

impl Dtype {
    /// NumPy's name: `"float32"` or `"uint8"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::U8 => "uint8",
        }
    }
}

/// A space.
#[derive(Debug, Clone, PartialEq)]
pub enum Space {
    /// A box `low ≤ x ≤ high` of `shape`, elementwise bounds (row-major).
    Box {
        /// Shape.
        shape: Vec<usize>,
        /// Lower bounds, one per element.
        low: Vec<f32>,
        /// Upper bounds, one per element.
        high: Vec<f32>,
        /// Element type.
        dtype: Dtype,
    },
    /// Integers `start ≤ x < start + n`.
    Discrete {
        /// Number of values.
        n: i64,
        /// Smallest value.
        start: i64,
    },
    /// A vector of integers `0 ≤ x[i] < nvec[i]`.
    MultiDiscrete {
        /// Number of values of each element.
        nvec: Vec<i64>,
    },
    /// A vector of `n` bits.
    MultiBinary {
        /// Number of bits.
        n: usize,
    },
    /// Named subspaces (keys in this order).
    Dict(Vec<(String, Space)>),
}

/// A value of a [`Space`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Box elements, row-major (U8 boxes hold integral values as `f32`).
    Box(Vec<f32>),
    /// A Discrete value.
    Discrete(i64),
    /// A MultiDiscrete value.
    MultiDiscrete(Vec<i64>),
    /// A MultiBinary value (0 or 1 each).
    MultiBinary(Vec<u8>),
    /// Dict values, in the space's key order.
    Dict(Vec<(String, Value)>),
}

impl Value {
    /// Makes `self` equal to `other`, reusing `self`'s buffers where the shapes agree (no
    /// allocation when the same observation layout is copied step after step).
    pub fn assign(&mut self, other: &Value) {
        match (&mut *self, other) {
            (Value::Box(a), Value::Box(b)) => a.clone_from(b),
            (Value::Discrete(a), Value::Discrete(b)) => *a = *b,
            (Value::MultiDiscrete(a), Value::MultiDiscrete(b)) => a.clone_from(b),
            (Value::MultiBinary(a), Value::MultiBinary(b)) => a.clone_from(b),
            (Value::Dict(a), Value::Dict(b)) if a.len() == b.len() => {
                for ((ka, va), (kb, vb)) in a.iter_mut().zip(b) {
                    ka.clone_from(kb);
                    va.assign(vb);
                }
            }
            (slot, _) => *slot = other.clone(),
        }
    }

    /// The Box elements, if this is a Box value.
    pub fn as_box(&self) -> Option<&[f32]> {
        match self {
            Self::Box(v) => Some(v),
            _ => None,
        }
    }

    /// The Discrete value, if this is one.
    pub fn as_discrete(&self) -> Option<i64> {
        match self {
            Self::Discrete(v) => Some(*v),
            _ => None,
        }
    }

    /// The value under `key`, if this is a Dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Self::Dict(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

impl Space {
    /// A float32 Box of `shape` with the same bounds everywhere.
    pub fn uniform_box(shape: &[usize], low: f32, high: f32) -> Self {
        let n = shape.iter().product();
        Self::Box {
            shape: shape.to_vec(),
            low: vec![low; n],
            high: vec![high; n],
            dtype: Dtype::F32,
        }
    }

    /// A float32 Box with per-element bounds.
    pub fn bounded_box(low: Vec<f32>, high: Vec<f32>) -> Self {
        Self::Box {
            shape: vec![low.len()],
            low,
            high,
            dtype: Dtype::F32,
        }
    }

    /// A uint8 image Box `(h, w)` or `(h, w, c)` with bounds 0..255.
    pub fn image(shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Self::Box {
            shape: shape.to_vec(),
            low: vec![0.0; n],
            high: vec![255.0; n],
            dtype: Dtype::U8,
        }
    }

    /// Number of scalar elements of a value (Dict: the sum over keys; Discrete: 1).
    pub fn flat_len(&self) -> usize {
        match self {
            Self::Box { shape, .. } => shape.iter().product(),
            Self::Discrete { .. } => 1,
            Self::MultiDiscrete { nvec } => nvec.len(),
            Self::MultiBinary { n } => *n,
            Self::Dict(items) => items.iter().map(|(_, s)| s.flat_len()).sum(),
        }
    }

    /// The value whose flattened form ([`crate::vector::flatten_into`]) is `flat` (Box
    /// elements as given; Discrete, MultiDiscrete and MultiBinary elements must be whole
    /// numbers). Errors name `field[i]` for a wrong length or a non-finite or fractional
    /// integer element; bounds are checked later by [`Space::check_action`].
    pub fn unflatten(&self, flat: &[f32], field: &str) -> Result<Value> {
        if flat.len() != self.flat_len() {
            return Err(EnvError::action(
                field,
                format!(
                    "expected shape [{}] (flattened), got {} values",
                    self.flat_len(),
                    flat.len()
                ),
            ));
        }
        let whole = |k: usize| -> Result<i64> {
            let v = flat[k];
            if v.is_finite() && v.fract() == 0.0 {
                Ok(v as i64)
            } else {
                Err(EnvError::action(
                    format!("{field}[{k}]"),
                    format!("must be a whole number, got {v}"),
                ))
            }
        };
        Ok(match self {
            Self::Box { .. } => Value::Box(flat.to_vec()),
            Self::Discrete { .. } => Value::Discrete(whole(0)?),
            Self::MultiDiscrete { nvec } => {
                Value::MultiDiscrete((0..nvec.len()).map(whole).collect::<Result<_>>()?)
            }
            Self::MultiBinary { n } => Value::MultiBinary(
                (0..*n)
                    .map(|k| match whole(k)? {
                        b @ (0 | 1) => Ok(b as u8),
                        b => Err(EnvError::action(
                            format!("{field}[{k}]"),
                            format!("must be 0 or 1, got {b}"),
                        )),
                    })
                    .collect::<Result<_>>()?,
            ),
            Self::Dict(items) => {
                let mut k = 0;
                let mut out = Vec::with_capacity(items.len());
                for (key, s) in items {
                    let n = s.flat_len();
                    out.push((
                        key.clone(),
                        s.unflatten(&flat[k..k + n], &format!("{field}.{key}"))?,
                    ));
                    k += n;
                }
                Value::Dict(out)
            }
        })
    }

    /// [`Space::unflatten`] into `out`, reusing its buffer when `out` is already a Box (the
    /// vector env decodes every step's actions this way without allocating).
    pub fn unflatten_into(&self, flat: &[f32], field: &str, out: &mut Value) -> Result<()> {
        if let (Self::Box { .. }, Value::Box(v)) = (self, &mut *out) {
            if flat.len() != self.flat_len() {
                return self.unflatten(flat, field).map(|_| ());
            }
            v.clear();
            v.extend_from_slice(flat);
            return Ok(());
        }
        *out = self.unflatten(flat, field)?;
        Ok(())
    }

    /// A uniformly random value (Box: uniform within finite bounds; a normal draw around the
    /// finite bound, or a standard normal, where a bound is infinite, as Gymnasium does).
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Value {
        match self {
            Self::Box {
                low, high, dtype, ..
            } => Value::Box(
                low.iter()
                    .zip(high)
                    .map(|(&lo, &hi)| {
                        let v = match (lo.is_finite(), hi.is_finite()) {
                            (true, true) => lo + (hi - lo) * rng.random::<f32>(),
                            (true, false) => lo + exp1(rng),
                            (false, true) => hi - exp1(rng),
                            (false, false) => normal(rng),
                        };
                        if *dtype == Dtype::U8 {
                            v.floor().clamp(lo, hi)
                        } else {
                            v.clamp(lo, hi)
                        }
                    })
                    .collect(),
            ),
            Self::Discrete { n, start } => Value::Discrete(start + rng.random_range(0..*n)),
            Self::MultiDiscrete { nvec } => {
                Value::MultiDiscrete(nvec.iter().map(|&n| rng.random_range(0..n)).collect())
            }
            Self::MultiBinary { n } => {
                Value::MultiBinary((0..*n).map(|_| u8::from(rng.random::<bool>())).collect())
            }
            Self::Dict(items) => Value::Dict(
                items
                    .iter()
                    .map(|(k, s)| (k.clone(), s.sample(rng)))
                    .collect(),
            ),
        }
    }

    /// Whether `v` is a value of this space (right kind, length, bounds, integrality).
    pub fn contains(&self, v: &Value) -> bool {
        match (self, v) {
            (
                Self::Box {
                    low, high, dtype, ..
                },
                Value::Box(x),
            ) => {
                x.len() == low.len()
                    && x.iter().zip(low).zip(high).all(|((&x, &lo), &hi)| {
                        x >= lo && x <= hi && (*dtype == Dtype::F32 || x.fract() == 0.0)
                    })
            }
            (Self::Discrete { n, start }, Value::Discrete(x)) => *x >= *start && *x < start + n,
            (Self::MultiDiscrete { nvec }, Value::MultiDiscrete(x)) => {
                x.len() == nvec.len() && x.iter().zip(nvec).all(|(&x, &n)| (0..n).contains(&x))
            }
            (Self::MultiBinary { n }, Value::MultiBinary(x)) => {
                x.len() == *n && x.iter().all(|&b| b <= 1)
            }
            (Self::Dict(items), Value::Dict(vals)) => {
                items.len() == vals.len()
                    && items
                        .iter()
                        .zip(vals)
                        .all(|((k, s), (kv, v))| k == kv && s.contains(v))
            }
            _ => false,
        }
    }

    /// The errors of [`Space::check_action`] without building the clipped value: NaN/inf, wrong
    /// kind, length or keys, and out-of-range discrete values, each naming `field`.
    pub fn validate_action(&self, v: &Value, field: &str) -> Result<()> {
        match (self, v) {
            (Self::Box { shape, low, .. }, Value::Box(x)) => {
                if x.len() != low.len() {
                    return Err(EnvError::action(
                        field,
                        format!(
                            "expected shape {shape:?} ({} values), got {}",
                            low.len(),
                            x.len()
                        ),
                    ));
                }
                match x.iter().position(|v| !v.is_finite()) {
                    Some(i) => Err(EnvError::action(
                        format!("{field}[{i}]"),
                        format!("must be finite, got {}", x[i]),
                    )),
                    None => Ok(()),
                }
            }
            (Self::Dict(items), Value::Dict(vals)) => {
                if items.len() != vals.len()
                    || items.iter().zip(vals).any(|((k, _), (kv, _))| k != kv)
                {
                    let keys: Vec<&str> = items.iter().map(|(k, _)| k.as_str()).collect();
                    return Err(EnvError::action(field, format!("expected keys {keys:?}")));
                }
                for ((k, s), (_, v)) in items.iter().zip(vals) {
                    s.validate_action(v, &format!("{field}.{k}"))?;
                }
                Ok(())
            }
            _ if self.contains(v) => Ok(()),
            _ => Err(EnvError::action(
                field,
                format!("{v:?} is not in {}", self.to_json()),
            )),
        }
    }

    /// Checks an action against this space: NaN/inf, wrong kind or length, and out-of-range
    /// discrete values are errors naming `field`; Box values outside the bounds are clipped.
    /// Returns the (possibly clipped) action and whether anything was clipped.
    pub fn check_action(&self, v: &Value, field: &str) -> Result<(Value, bool)> {
        self.validate_action(v, field)?;
        match (self, v) {
            (Self::Box { low, high, .. }, Value::Box(x)) => {
                let mut clipped = false;
                let y = x
                    .iter()
                    .zip(low)
                    .zip(high)
                    .map(|((&x, &lo), &hi)| {
                        let c = x.clamp(lo, hi);
                        clipped |= c != x;
                        c
                    })
                    .collect();
                Ok((Value::Box(y), clipped))
            }
            (Self::Dict(items), Value::Dict(vals)) => {
                let mut clipped = false;
                let mut out = Vec::with_capacity(items.len());
                for ((k, s), (_, v)) in items.iter().zip(vals) {
                    let (c, cl) = s.check_action(v, &format!("{field}.{k}"))?;
                    clipped |= cl;
                    out.push((k.clone(), c));
                }
                Ok((Value::Dict(out), clipped))
            }
            // Validated above: in the space.
            _ => Ok((v.clone(), false)),
        }
    }

    /// A short description, like Gymnasium's repr: `Box(-1.0, 1.0, (2,), float32)`,
    /// `Discrete(14)`, `Dict('image': Box(...), ...)`.
    pub fn describe(&self) -> String {
        match self {
            Self::Box {
                shape,
                low,
                high,
                dtype,
            } => {
                let bound = |v: &[f32]| -> String {
                    match v.first() {
                        Some(&f) if v.iter().all(|&x| x == f) => format!("{f:?}"),
                        _ => "[...]".into(),
                    }
                };
                let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
                let tuple = if dims.len() == 1 {
                    format!("({},)", dims[0])
                } else {
                    format!("({})", dims.join(", "))
                };
                format!(
                    "Box({}, {}, {tuple}, {})",
                    bound(low),
                    bound(high),
                    dtype.name()
                )
            }
            Self::Discrete { n, start } if *start == 0 => format!("Discrete({n})"),
            Self::Discrete { n, start } => format!("Discrete({n}, start={start})"),
            Self::MultiDiscrete { nvec } => format!("MultiDiscrete({nvec:?})"),
            Self::MultiBinary { n } => format!("MultiBinary({n})"),
            Self::Dict(items) => format!(
                "Dict({})",
                items
                    .iter()
                    .map(|(k, s)| format!("'{k}': {}", s.describe()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The space in the JSON form Gymnasium's and Minari's space serialization use
    /// (`{"type": "Box", "dtype": "float32", "shape": [..], "low": [..], "high": [..]}`, ...).
    pub fn to_json(&self) -> Json {
        let num = |v: f32| -> Json {
            if v.is_finite() {
                json!(v)
            } else if v > 0.0 {
                json!("inf")
            } else {
                json!("-inf")
            }
        };
        match self {
            Self::Box {
                shape,
                low,
                high,
                dtype,
            } => json!({
                "type": "Box",
                "dtype": dtype.name(),
                "shape": shape,
                "low": low.iter().map(|&v| num(v)).collect::<Vec<_>>(),
                "high": high.iter().map(|&v| num(v)).collect::<Vec<_>>(),
            }),
            Self::Discrete { n, start } => json!({
                "type": "Discrete", "dtype": "int64", "start": start, "n": n,
            }),
            Self::MultiDiscrete { nvec } => json!({
                "type": "MultiDiscrete", "dtype": "int64", "nvec": nvec, "start": vec![0; nvec.len()],
            }),
            Self::MultiBinary { n } => json!({
                "type": "MultiBinary", "dtype": "int8", "n": n,
            }),
            Self::Dict(items) => {
                let mut sub = serde_json::Map::new();
                for (k, s) in items {
                    sub.insert(k.clone(), s.to_json());
                }
                json!({"type": "Dict", "subspaces": sub})
            }
        }
    }
}

fn exp1<R: Rng + ?Sized>(rng: &mut R) -> f32 {
    -(1.0 - rng.random::<f32>()).ln()
}

fn normal<R: Rng + ?Sized>(rng: &mut R) -> f32 {
    scopegym_physics::rng::normal(rng) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assign_equals_clone_across_every_kind_and_reuses_buffers() {
        let a = Value::Dict(vec![
            ("image".into(), Value::Box(vec![1.0, 2.0, 3.0])),
            ("mode".into(), Value::Discrete(2)),
            ("bits".into(), Value::MultiBinary(vec![0, 1])),
            ("nvec".into(), Value::MultiDiscrete(vec![3, 4])),
        ]);
        let b = Value::Dict(vec![
            ("image".into(), Value::Box(vec![-1.0, 0.5, 9.0])),
            ("mode".into(), Value::Discrete(0)),
            ("bits".into(), Value::MultiBinary(vec![1, 1])),
            ("nvec".into(), Value::MultiDiscrete(vec![0, 1])),
        ]);
        let mut x = a.clone();
        let ptr = match &x {
            Value::Dict(d) => d[0].1.as_box().unwrap().as_ptr(),
            _ => unreachable!(),
        };
        x.assign(&b);
        assert_eq!(x, b);
        let same = match &x {
            Value::Dict(d) => d[0].1.as_box().unwrap().as_ptr(),
            _ => unreachable!(),
        };
        assert_eq!(ptr, same, "the Box buffer was reused");
        // Another kind or shape is replaced outright.
        let mut y = Value::Discrete(1);
        y.assign(&a);
        assert_eq!(y, a);
        let mut z = Value::Dict(vec![]);
        z.assign(&b);
        assert_eq!(z, b);
    }
    use crate::rng::seeded;
    use proptest::prelude::*;

    fn dict() -> Space {
        Space::Dict(vec![
            ("image".into(), Space::image(&[4, 4])),
            (
                "goal".into(),
                Space::bounded_box(vec![-1.0, 0.0], vec![1.0, 5.0]),
            ),
            ("mode".into(), Space::Discrete { n: 3, start: 1 }),
            ("md".into(), Space::MultiDiscrete { nvec: vec![2, 5] }),
            ("mb".into(), Space::MultiBinary { n: 3 }),
        ])
    }

    #[test]
    fn unflatten_inverts_flatten_and_names_bad_elements() {
        let s = Space::Dict(vec![
            (
                "a".into(),
                Space::bounded_box(vec![-1.0, 0.0], vec![1.0, 5.0]),
            ),
            ("d".into(), Space::Discrete { n: 3, start: 1 }),
            ("m".into(), Space::MultiDiscrete { nvec: vec![2, 4] }),
            ("b".into(), Space::MultiBinary { n: 2 }),
        ]);
        let mut rng = seeded(3);
        for _ in 0..50 {
            let v = s.sample(&mut rng);
            let mut flat = vec![0.0f32; s.flat_len()];
            crate::vector::flatten_into(&v, &mut flat);
            assert_eq!(s.unflatten(&flat, "action").unwrap(), v);
        }
        let e = s.unflatten(&[0.0; 3], "action").unwrap_err().to_string();
        assert!(e.contains("expected shape [7]"), "{e}");
        let e = s
            .unflatten(&[0.0, 0.0, 1.5, 0.0, 0.0, 0.0, 1.0], "action")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("action.d[0]") && e.contains("whole number"),
            "{e}"
        );
        let e = s
            .unflatten(&[0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 1.0], "action")
            .unwrap_err()
            .to_string();
        assert!(e.contains("action.b[0]") && e.contains("0 or 1"), "{e}");
        let e = s
            .unflatten(&[0.0, 0.0, 1.0, f32::NAN, 0.0, 0.0, 1.0], "action")
            .unwrap_err()
            .to_string();
        assert!(e.contains("action.m[0]"), "{e}");
    }

    #[test]
    fn samples_are_contained_and_outsiders_are_not() {
        let s = dict();
        let mut rng = seeded(2);
        for _ in 0..200 {
            assert!(s.contains(&s.sample(&mut rng)));
        }
        let bad = [
            Value::Box(vec![0.0]),
            Value::Dict(vec![]),
            Value::Discrete(0),
        ];
        for b in bad {
            assert!(!s.contains(&b));
        }
        let d = Space::Discrete { n: 3, start: 1 };
        assert!(d.contains(&Value::Discrete(3)) && !d.contains(&Value::Discrete(0)));
        let img = Space::image(&[1, 2]);
        assert!(
            !img.contains(&Value::Box(vec![0.5, 1.0])),
            "uint8 values are integral"
        );
        assert_eq!(s.flat_len(), 16 + 2 + 1 + 2 + 3);
    }

    #[test]
    fn actions_are_clipped_or_rejected_with_the_field_named() {
        let s = Space::bounded_box(vec![-1.0, -1.0], vec![1.0, 1.0]);
        let (v, clipped) = s
            .check_action(&Value::Box(vec![2.0, 0.5]), "action")
            .unwrap();
        assert!(clipped);
        assert_eq!(v, Value::Box(vec![1.0, 0.5]));
        let e = s
            .check_action(&Value::Box(vec![f32::NAN, 0.0]), "action")
            .unwrap_err();
        assert!(e.to_string().contains("action[0]"), "{e}");
        let e = s
            .check_action(&Value::Box(vec![0.0]), "action")
            .unwrap_err();
        assert!(e.to_string().contains("expected shape [2]"), "{e}");
        let d = Space::Discrete { n: 13, start: 0 };
        assert!(d.check_action(&Value::Discrete(13), "action").is_err());
        assert!(d.check_action(&Value::Box(vec![1.0]), "action").is_err());
        let e = dict()
            .check_action(
                &Value::Dict(vec![("goal".into(), Value::Box(vec![0.0, 0.0]))]),
                "action",
            )
            .unwrap_err();
        assert!(e.to_string().contains("expected keys"), "{e}");
    }

    #[test]
    fn json_has_the_gymnasium_form() {
        let j = dict().to_json();
        assert_eq!(j["type"], "Dict");
        assert_eq!(j["subspaces"]["image"]["dtype"], "uint8");
        assert_eq!(j["subspaces"]["image"]["shape"], json!([4, 4]));
        assert_eq!(j["subspaces"]["goal"]["high"], json!([1.0, 5.0]));
        assert_eq!(
            j["subspaces"]["mode"],
            json!({"type": "Discrete", "dtype": "int64", "start": 1, "n": 3})
        );
        assert_eq!(
            Space::uniform_box(&[2], -1.0, 1.0).describe(),
            "Box(-1.0, 1.0, (2,), float32)"
        );
        assert!(
            dict()
                .describe()
                .starts_with("Dict('image': Box(0.0, 255.0, (4, 4), uint8)")
        );
        let inf = Space::uniform_box(&[1], f32::NEG_INFINITY, f32::INFINITY).to_json();
        assert_eq!(inf["low"], json!(["-inf"]));
    }

    proptest! {
        #[test]
        fn clipped_actions_are_always_in_the_space(x in proptest::collection::vec(-1e6f32..1e6, 3)) {
            let s = Space::bounded_box(vec![-1.0, 0.0, 2.0], vec![1.0, 10.0, 3.0]);
            let (v, _) = s.check_action(&Value::Box(x), "a").unwrap();
            prop_assert!(s.contains(&v));
        }
    }
}
