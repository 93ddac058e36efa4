//! Physical quantities written as text: `"1.42 Å"`, `"60 kV"`, `"100 pA"`, `"4 µs"`, `"1e4 e/Å²"`.
//!
//! One parser handles every quantity a scenario file may write. A unit expression is a product
//! of SI-prefixed symbols with optional integer exponents (`^2`, `²`, `^-1`), with at most one
//! `/` separating numerator and denominator: `nm/min`, `e/Å^2`, `nm²/s`, `1/s`.
//! The result is always a plain SI number (energies in eV, see [`Dimension`]).
//!
//! ```
//! use scopegym_physics::units::{parse_quantity, Dimension};
//! let a = parse_quantity("1.42 Å", Dimension::LENGTH).unwrap();
//! assert!((a - 1.42e-10).abs() < 1e-22);
//! let e = parse_quantity("60 kV", Dimension::ENERGY).unwrap(); // accelerating voltage → eV
//! assert_eq!(e, 60e3);
//! assert!(parse_quantity("60 kV", Dimension::LENGTH).is_err());
//! ```

use crate::error::{PhysicsError, Result};
use std::fmt;

/// Exponents of the base dimensions of a quantity:
/// length (m), time (s), current (A), energy (eV), voltage (V), plane angle (rad), temperature (K).
///
/// Electron counts (`e`) are dimensionless, so a dose reads `"1e4 e/Å²"` or `"1e4 /Å²"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dimension(pub [i8; 7]);

impl Dimension {
    /// A pure number.
    pub const DIMENSIONLESS: Self = Self([0, 0, 0, 0, 0, 0, 0]);
    /// Metres.
    pub const LENGTH: Self = Self([1, 0, 0, 0, 0, 0, 0]);
    /// Seconds.
    pub const TIME: Self = Self([0, 1, 0, 0, 0, 0, 0]);
    /// Amperes.
    pub const CURRENT: Self = Self([0, 0, 1, 0, 0, 0, 0]);
    /// Electronvolts. Voltage units are accepted too (an accelerating voltage of 60 kV gives
    /// electrons of 60 keV).
    pub const ENERGY: Self = Self([0, 0, 0, 1, 0, 0, 0]);
    /// Volts.
    pub const VOLTAGE: Self = Self([0, 0, 0, 0, 1, 0, 0]);
    /// Radians.
    pub const ANGLE: Self = Self([0, 0, 0, 0, 0, 1, 0]);
    /// Kelvin.
    pub const TEMPERATURE: Self = Self([0, 0, 0, 0, 0, 0, 1]);
    /// Hertz (1/s).
    pub const FREQUENCY: Self = Self([0, -1, 0, 0, 0, 0, 0]);
    /// m/s.
    pub const VELOCITY: Self = Self([1, -1, 0, 0, 0, 0, 0]);
    /// m².
    pub const AREA: Self = Self([2, 0, 0, 0, 0, 0, 0]);
    /// Electrons per m².
    pub const DOSE: Self = Self([-2, 0, 0, 0, 0, 0, 0]);
    /// m²/s (diffusion constant of a random walk).
    pub const DIFFUSIVITY: Self = Self([2, -1, 0, 0, 0, 0, 0]);

    fn mul(self, other: Self, power: i8) -> Self {
        let mut out = self.0;
        for (o, b) in out.iter_mut().zip(other.0) {
            *o += b * power;
        }
        Self(out)
    }

    /// The SI unit this dimension is stored in, e.g. `"m/s"`.
    pub fn si_unit(self) -> String {
        const NAMES: [&str; 7] = ["m", "s", "A", "eV", "V", "rad", "K"];
        let mut num = Vec::new();
        let mut den = Vec::new();
        for (name, &p) in NAMES.iter().zip(self.0.iter()) {
            match p {
                0 => {}
                1 => num.push((*name).to_string()),
                p if p > 1 => num.push(format!("{name}^{p}")),
                -1 => den.push((*name).to_string()),
                p => den.push(format!("{name}^{}", -p)),
            }
        }
        match (num.is_empty(), den.is_empty()) {
            (true, true) => "1".into(),
            (false, true) => num.join("·"),
            (true, false) => format!("1/{}", den.join("·")),
            (false, false) => format!("{}/{}", num.join("·"), den.join("·")),
        }
    }

    /// A human name for error messages.
    pub fn describe(self) -> String {
        let name = match self {
            Self::DIMENSIONLESS => "a plain number",
            Self::LENGTH => "a length",
            Self::TIME => "a time",
            Self::CURRENT => "a current",
            Self::ENERGY => "an energy",
            Self::VOLTAGE => "a voltage",
            Self::ANGLE => "an angle",
            Self::TEMPERATURE => "a temperature",
            Self::FREQUENCY => "a frequency",
            Self::VELOCITY => "a velocity",
            Self::AREA => "an area",
            Self::DOSE => "a dose (electrons per area)",
            Self::DIFFUSIVITY => "a diffusivity",
            _ => return format!("a quantity in {}", self.si_unit()),
        };
        format!("{name} ({})", self.si_unit())
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Base symbols: (symbol, factor to SI, dimension, accepts SI prefixes).
const SYMBOLS: &[(&str, f64, Dimension, bool)] = &[
    ("m", 1.0, Dimension::LENGTH, true),
    ("Å", 1e-10, Dimension::LENGTH, false),
    ("Å", 1e-10, Dimension::LENGTH, false), // U+212B ANGSTROM SIGN
    ("angstrom", 1e-10, Dimension::LENGTH, false),
    ("Ang", 1e-10, Dimension::LENGTH, false),
    ("s", 1.0, Dimension::TIME, true),
    ("min", 60.0, Dimension::TIME, false),
    ("h", 3600.0, Dimension::TIME, false),
    ("Hz", 1.0, Dimension::FREQUENCY, true),
    ("A", 1.0, Dimension::CURRENT, true),
    ("eV", 1.0, Dimension::ENERGY, true),
    ("V", 1.0, Dimension::VOLTAGE, true),
    ("rad", 1.0, Dimension::ANGLE, true),
    ("deg", std::f64::consts::PI / 180.0, Dimension::ANGLE, false),
    ("°", std::f64::consts::PI / 180.0, Dimension::ANGLE, false),
    ("K", 1.0, Dimension::TEMPERATURE, false),
    ("barn", 1e-28, Dimension::AREA, false),
    ("e", 1.0, Dimension::DIMENSIONLESS, false),
    ("1", 1.0, Dimension::DIMENSIONLESS, false),
];

const PREFIXES: &[(&str, f64)] = &[
    ("f", 1e-15),
    ("p", 1e-12),
    ("n", 1e-9),
    ("µ", 1e-6),
    ("μ", 1e-6), // Greek mu
    ("u", 1e-6),
    ("m", 1e-3),
    ("c", 1e-2),
    ("k", 1e3),
    ("M", 1e6),
    ("G", 1e9),
];

fn lookup_symbol(sym: &str) -> Option<(f64, Dimension)> {
    if let Some(&(_, f, d, _)) = SYMBOLS.iter().find(|(s, ..)| *s == sym) {
        return Some((f, d));
    }
    for (p, pf) in PREFIXES {
        if let Some(rest) = sym.strip_prefix(p) {
            if let Some(&(_, f, d, _)) = SYMBOLS.iter().find(|(s, _, _, pre)| *pre && *s == rest) {
                return Some((pf * f, d));
            }
        }
    }
    None
}

fn superscript_to_ascii(c: char) -> Option<char> {
    Some(match c {
        '⁰' => '0',
        '¹' => '1',
        '²' => '2',
        '³' => '3',
        '⁴' => '4',
        '⁻' => '-',
        _ => return None,
    })
}

/// Parses one factor such as `nm`, `Å²`, `s^-1` into (factor, dimension).
fn parse_factor(text: &str, input: &str) -> Result<(f64, Dimension)> {
    let bad = |reason: String| PhysicsError::InvalidQuantity {
        input: input.into(),
        reason,
    };
    // Split off an exponent: either `^n` or trailing superscript characters.
    let (sym, exp): (String, i8) = if let Some((s, e)) = text.split_once('^') {
        let e: i8 = e
            .trim()
            .parse()
            .map_err(|_| bad(format!("bad exponent `{e}`")))?;
        (s.trim().to_string(), e)
    } else {
        let sup: String = text
            .chars()
            .rev()
            .take_while(|c| superscript_to_ascii(*c).is_some())
            .collect();
        if sup.is_empty() {
            (text.to_string(), 1)
        } else {
            let digits: String = sup.chars().rev().filter_map(superscript_to_ascii).collect();
            let e: i8 = digits
                .parse()
                .map_err(|_| bad(format!("bad exponent `{digits}`")))?;
            let n = text.chars().count() - sup.chars().count();
            (text.chars().take(n).collect(), e)
        }
    };
    let (f, d) = lookup_symbol(&sym).ok_or_else(|| bad(format!("unknown unit `{sym}`")))?;
    Ok((f.powi(i32::from(exp)), Dimension::DIMENSIONLESS.mul(d, exp)))
}

/// Parses a unit expression (`"nm/min"`, `"e/Å²"`, `"pA"`) into (factor to SI, dimension).
pub fn parse_unit(unit: &str) -> Result<(f64, Dimension)> {
    let unit = unit.trim();
    if unit.is_empty() {
        return Ok((1.0, Dimension::DIMENSIONLESS));
    }
    let mut factor = 1.0;
    let mut dim = Dimension::DIMENSIONLESS;
    for (i, part) in unit.split('/').enumerate() {
        let sign: i8 = if i == 0 { 1 } else { -1 };
        let part = part.trim();
        if part.is_empty() {
            if i == 0 {
                continue; // "/Å²" means 1/Å²
            }
            return Err(PhysicsError::InvalidQuantity {
                input: unit.into(),
                reason: "empty unit after `/`".into(),
            });
        }
        for f in part.split(['*', '·', ' ']).filter(|s| !s.is_empty()) {
            let (ff, fd) = parse_factor(f, unit)?;
            factor *= if sign > 0 { ff } else { 1.0 / ff };
            dim = dim.mul(fd, sign);
        }
    }
    Ok((factor, dim))
}

/// Parses `"<number> <unit>"` and converts it to SI, checking that it has dimension `expected`.
///
/// Energies accept voltage units (`"60 kV"` → 60 000 eV). A bare number is taken as SI.
pub fn parse_quantity(text: &str, expected: Dimension) -> Result<f64> {
    let t = text.trim();
    let split = t
        .char_indices()
        .find(|&(i, c)| {
            !(c.is_ascii_digit()
                || c == '.'
                || c == '+'
                || c == '-'
                || ((c == 'e' || c == 'E')
                    && t[i + 1..]
                        .starts_with(|n: char| n.is_ascii_digit() || n == '-' || n == '+')
                    && i > 0))
        })
        .map_or(t.len(), |(i, _)| i);
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| PhysicsError::InvalidQuantity {
            input: text.into(),
            reason: format!(
                "expected a number followed by a unit, e.g. \"1.5 nm\" ({})",
                expected
            ),
        })?;
    let (factor, dim) = parse_unit(unit).map_err(|e| match e {
        PhysicsError::InvalidQuantity { reason, .. } => PhysicsError::InvalidQuantity {
            input: text.into(),
            reason: format!("{reason}; expected {expected}"),
        },
        other => other,
    })?;
    let dim_ok = dim == expected || (expected == Dimension::ENERGY && dim == Dimension::VOLTAGE);
    if !dim_ok {
        return Err(PhysicsError::InvalidQuantity {
            input: text.into(),
            reason: format!("expected {expected}, got {}", dim.describe()),
        });
    }
    let v = value * factor;
    if !v.is_finite() {
        return Err(PhysicsError::InvalidQuantity {
            input: text.into(),
            reason: "not a finite number".into(),
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-300)
    }

    #[test]
    fn parses_the_design_examples() {
        assert!(close(
            parse_quantity("1.42 Å", Dimension::LENGTH).unwrap(),
            1.42e-10
        ));
        assert!(close(
            parse_quantity("20 nm", Dimension::LENGTH).unwrap(),
            20e-9
        ));
        assert!(close(
            parse_quantity("60 kV", Dimension::ENERGY).unwrap(),
            60e3
        ));
        assert!(close(
            parse_quantity("100 pA", Dimension::CURRENT).unwrap(),
            100e-12
        ));
        assert!(close(
            parse_quantity("4 µs", Dimension::TIME).unwrap(),
            4e-6
        ));
        assert!(close(
            parse_quantity("4 us", Dimension::TIME).unwrap(),
            4e-6
        ));
        assert!(close(
            parse_quantity("30 mrad", Dimension::ANGLE).unwrap(),
            0.03
        ));
        assert!(close(
            parse_quantity("0.55 mm", Dimension::LENGTH).unwrap(),
            0.55e-3
        ));
    }

    #[test]
    fn parses_compound_units() {
        let v = parse_quantity("1 nm/min", Dimension::VELOCITY).unwrap();
        assert!(close(v, 1e-9 / 60.0));
        let d = parse_quantity("1e4 e/Å²", Dimension::DOSE).unwrap();
        assert!(close(d, 1e4 / 1e-20));
        let d2 = parse_quantity("1e4 e/Å^2", Dimension::DOSE).unwrap();
        assert!(close(d, d2));
        let f = parse_quantity("50 Hz", Dimension::FREQUENCY).unwrap();
        assert!(close(f, 50.0));
        let f2 = parse_quantity("2 1/s", Dimension::FREQUENCY).unwrap();
        assert!(close(f2, 2.0));
        let diff = parse_quantity("0.01 nm²/s", Dimension::DIFFUSIVITY).unwrap();
        assert!(close(diff, 0.01e-18));
        assert!(close(
            parse_quantity("-2.5e-3", Dimension::DIMENSIONLESS).unwrap(),
            -2.5e-3
        ));
        assert!(close(
            parse_quantity("30 deg", Dimension::ANGLE).unwrap(),
            std::f64::consts::PI / 6.0
        ));
    }

    #[test]
    fn rejects_wrong_dimension_and_garbage() {
        let e = parse_quantity("60 kV", Dimension::LENGTH)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a length"), "{e}");
        assert!(e.contains("voltage"), "{e}");
        assert!(parse_quantity("abc nm", Dimension::LENGTH).is_err());
        assert!(
            parse_quantity("3 furlongs", Dimension::LENGTH)
                .unwrap_err()
                .to_string()
                .contains("furlongs")
        );
        assert!(parse_quantity("", Dimension::LENGTH).is_err());
        assert!(parse_quantity("1e999 m", Dimension::LENGTH).is_err());
    }

    #[test]
    fn ampere_and_angstrom_are_distinct() {
        assert!(parse_quantity("1 A", Dimension::LENGTH).is_err());
        assert!(close(
            parse_quantity("1 A", Dimension::CURRENT).unwrap(),
            1.0
        ));
        assert!(close(
            parse_quantity("1 Å", Dimension::LENGTH).unwrap(),
            1e-10
        ));
    }
}
