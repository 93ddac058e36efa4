//! Scenario files: named, versioned TOML files describing a specimen, an instrument and its
//! settings.
//!
//! A scenario has top-level metadata (`name`, `version`, `description`, `instrument`) and the
//! instrument's sections (for `instrument = "stem"`: `[specimen]`, `[optics]`, `[beam]`,
//! `[scan]`, `[detector]`, `[drift]`, `[scan_noise]`, `[damage]`, `[eels]`; see
//! [`scopegym_physics::stem::StemConfig`]; for `"afm"`, `"stm"` and `"pfm"`: `[sample]`,
//! `[scan]`, `[surface]`, `[adatoms]`, `[tip]`, `[feedback]`, `[scanner]`, `[ferroelectric]`,
//! `[pfm]`, `[manipulation]`; see [`scopegym_physics::spm::sim::SpmConfig`]). Quantities are SI numbers or strings with units
//! (`"1.42 Å"`, `"60 kV"`); any physical parameter may be a distribution
//! (`{ uniform = [lo, hi] }`) drawn from the seed.
//!
//! ```
//! let text = r#"
//! name = "demo"
//! instrument = "stem"
//! [optics]
//! energy = "80 kV"
//! [scan]
//! pixels = [64, 64]
//! "#;
//! let s = scopegym::scenario::Scenario::from_str(text, "demo.toml".as_ref()).unwrap();
//! assert_eq!(s.name, "demo");
//! let scopegym::scenario::InstrumentConfig::Stem(cfg) = &s.config else { panic!() };
//! assert_eq!(cfg.optics.energy.get(), 80e3);
//! ```

use crate::error::CliError;
use scopegym_physics::PhysicsError;
use scopegym_physics::instrument::SpmMode;
use scopegym_physics::spm::sim::SpmConfig;
use scopegym_physics::stem::StemConfig;
use std::path::{Path, PathBuf};

/// The instrument a scenario configures.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // loaded once per run; boxing buys nothing
pub enum InstrumentConfig {
    /// A scanning transmission electron microscope.
    Stem(StemConfig),
    /// A scanning probe microscope (`instrument = "afm"`, `"stm"` or `"pfm"`).
    Spm(SpmConfig),
}

/// A loaded and validated scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Scenario name (default: the file stem).
    pub name: String,
    /// Scenario version (default 1).
    pub version: i64,
    /// One-line description.
    pub description: String,
    /// The file it came from.
    pub path: PathBuf,
    /// The instrument's configuration (may hold distributions).
    pub config: InstrumentConfig,
}

const META: [&str; 4] = ["name", "version", "description", "instrument"];

fn scenario_err(path: &Path, key: &str, message: impl Into<String>) -> CliError {
    let key = if key.is_empty() {
        String::new()
    } else {
        format!("key `{key}`: ")
    };
    // One line: the TOML parser appends "in `table`" lines, which the key already says.
    let message: String = message.into();
    let message = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("in `"))
        .collect::<Vec<_>>()
        .join(" ");
    CliError::Scenario {
        file: path.to_path_buf(),
        key,
        message,
    }
}

/// Maps a physics validation error to a scenario error naming the key.
pub fn physics_to_scenario(path: &Path, e: PhysicsError) -> CliError {
    match e {
        PhysicsError::InvalidParameter { field, reason } => scenario_err(path, &field, reason),
        other => scenario_err(path, "", other.to_string()),
    }
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, CliError> {
        let text = std::fs::read_to_string(path).map_err(|source| CliError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_str(&text, path)
    }

    /// Parses and validates scenario text; `path` names it in errors.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, path: &Path) -> Result<Self, CliError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let msg = e.message().to_string();
            let loc = e.span().map(|s| {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: ")
            });
            scenario_err(path, "", format!("{}{msg}", loc.unwrap_or_default()))
        })?;
        let stem_name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let get_str = |t: &toml::Table, k: &str| -> Result<Option<String>, CliError> {
            match t.get(k) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(scenario_err(path, k, "expected a string")),
            }
        };
        let name = get_str(&table, "name")?.unwrap_or(stem_name);
        let description = get_str(&table, "description")?.unwrap_or_default();
        let instrument = get_str(&table, "instrument")?.unwrap_or_else(|| "stem".into());
        let version = match table.get("version") {
            None => 1,
            Some(toml::Value::Integer(v)) => *v,
            Some(_) => return Err(scenario_err(path, "version", "expected an integer")),
        };
        for k in META {
            table.remove(k);
        }
        let de_err = |e: serde_path_to_error::Error<toml::de::Error>| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            scenario_err(path, &key, e.into_inner().to_string())
        };
        let config = match instrument.as_str() {
            "stem" => {
                let cfg: StemConfig =
                    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(de_err)?;
                cfg.validate().map_err(|e| physics_to_scenario(path, e))?;
                InstrumentConfig::Stem(cfg)
            }
            "afm" | "stm" | "pfm" => {
                if table.contains_key("mode") {
                    return Err(scenario_err(
                        path,
                        "mode",
                        "the mode comes from `instrument`; remove this key",
                    ));
                }
                let mut cfg: SpmConfig =
                    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(de_err)?;
                cfg.mode = match instrument.as_str() {
                    "afm" => SpmMode::Afm,
                    "stm" => SpmMode::Stm,
                    _ => SpmMode::Pfm,
                };
                cfg.validate().map_err(|e| physics_to_scenario(path, e))?;
                InstrumentConfig::Spm(cfg)
            }
            other => {
                return Err(scenario_err(
                    path,
                    "instrument",
                    format!(
                        "unknown instrument {other:?}; expected \"stem\", \"afm\", \"stm\" or \"pfm\""
                    ),
                ));
            }
        };
        Ok(Self {
            name,
            version,
            description,
            path: path.to_path_buf(),
            config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Scenario::from_str(text, Path::new("s.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let e = err("[optics]\nconvergence_angel = 0.03\n");
        assert!(e.starts_with("s.toml: "), "{e}");
        assert!(e.contains("convergence_angel"), "{e}");
        let e = err("[optics]\nenergy = \"3 nm\"\n");
        assert!(e.contains("key `optics.energy`"), "{e}");
        assert!(e.contains("expected an energy"), "{e}");
        let e = err("[scan]\ndose = \"-5 e/Å²\"\n");
        assert!(e.contains("scan.dose"), "{e}");
        let e = err("[optics]\nconvergence_angle = \"0 mrad\"\n");
        assert!(e.contains("key `optics.convergence_angle`"), "{e}");
        let e = err("instrument = \"sem\"\n");
        assert!(e.contains("instrument"), "{e}");
        let e = err("[optics\n");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn distributions_and_units_load() {
        let s = Scenario::from_str(
            "name = \"x\"\nversion = 3\n[beam]\ncurrent = { uniform = [\"50 pA\", \"150 pA\"] }\n[detector]\nhaadf_exponent = { uniform = [1.4, 2.0] }\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(s.version, 3);
        let InstrumentConfig::Stem(c) = s.config else {
            panic!("a STEM scenario")
        };
        assert!(!c.beam.current.is_fixed());
        assert!((c.beam.current.get() - 100e-12).abs() < 1e-20);
    }
}
