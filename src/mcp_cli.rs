//! `scopegym mcp`: a Model Context Protocol tool server for language-model agents.
//!
//! Two groups of tools, run one at a time (a mutex around the session):
//!
//! - task tools on the served task (`--task`), built on the driver (`--driver`) behind the
//!   guard exactly as `scopegym deploy` builds it ([`make_env`]): `list_tasks`, `reset`,
//!   `step`, `episode_score`. The task's config is the benchmark suite's (difficulty, split and
//!   the suite's overrides for the task), and episode `i` resets with the suite's episode seed
//!   `seed · 1 000 000 + i`, so an agent meets the scenarios the suite's agents met;
//! - instrument tools on the task's instrument, a second simulator of it behind the same guard
//!   (limits and audit log): `instrument_status`, `acquire_frame`, `move_probe`, `set_bias` /
//!   `set_withdrawn` (SPM), `set_defocus` (STEM), `point_spectroscopy`, `make_safe`. On `sim`
//!   they drive a second simulator and never change the task's episode; on a real driver they
//!   open a connection of their own to the same instrument (`--instrument-driver` names another
//!   address, such as a second port of a Nanonis controller) behind the same limits and audit
//!   log, so what they do acts on the instrument the task runs on.
//!
//! A malformed or refused call is a tool error (`isError`, the message names the field or the
//! limit), never a protocol error or a dead server. `step` returns what an instrument measures
//! (observation, reward, the guard's refusals); ground truth from `info` goes only to the
//! record. With `--record DIR`, `DIR/calls.jsonl` gets one JSON line per call and
//! `DIR/results.json` the episodes scored so far, in the shape `scopegym run` writes (agent
//! `llm`), rewritten after every episode.

use crate::bench_cli::read_toml_table;
use base64::Engine as _;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use scopegym::error::CliError;
use scopegym_agents::bench::run::{
    BuildInfo, EPISODE_STRIDE, EpisodeResult, Provenance, RunResults, SeedResult, episode_seed,
    summarize,
};
use scopegym_agents::bench::suite::{Selection, SuiteFile, SuiteResults, plan};
use scopegym_drivers::audit::AuditLog;
use scopegym_drivers::connect::{DeployOptions, Deployment, DriverUrl, limits_for, make_env};
use scopegym_drivers::guard::Guarded;
use scopegym_drivers::limits::Limits;
use scopegym_drivers::nanonis::{NanonisClient, NanonisOptions};
use scopegym_drivers::{ReplayOptions, ReplaySpm, StemGatewayClient, StemGatewayOptions};
use scopegym_envs::env::{Env, Info, InfoValue};
use scopegym_envs::space::{Space, Value};
use scopegym_envs::tasks::config_from_toml;
use scopegym_physics::instrument::{
    PointSpectroscopy, ScanSettings, SpmInstrument, SpmMode, StemInstrument,
};
use scopegym_physics::spm::sim::SpmSimulator;
use scopegym_physics::stem::StemSimulator;
use scopegym_physics::stem::dopant::DopantSimulator;
use scopegym_physics::stem::lattice::LatticeSimulator;
use serde_json::{Map, Value as Json, json};
use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// What `scopegym mcp` serves.
#[derive(Debug)]
pub(crate) struct McpArgs<'a> {
    pub task: &'a str,
    pub driver: &'a str,
    pub instrument_driver: Option<&'a str>,
    pub seed: u64,
    pub record: Option<&'a Path>,
    pub http: Option<&'a str>,
    pub limits: Option<&'a Path>,
    pub log: Option<&'a Path>,
    pub env_config: Option<&'a Path>,
    pub budget: &'a str,
    pub reference: Option<&'a Path>,
    pub agent: &'a str,
}

/// A tool's failure, shown to the agent.
#[derive(Debug)]
struct ToolError(String);

fn te(e: impl Display) -> ToolError {
    ToolError(e.to_string())
}

type ToolResult = Result<Out, ToolError>;

/// A tool's answer: JSON (text and structured content) and an optional PNG.
struct Out {
    json: Json,
    png: Option<Vec<u8>>,
}

impl Out {
    fn json(json: Json) -> Self {
        Self { json, png: None }
    }
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// Arguments

struct Args<'a> {
    map: &'a JsonObject,
}

impl<'a> Args<'a> {
    /// The arguments, with every key checked against `allowed`.
    fn new(map: &'a JsonObject, allowed: &[&str]) -> Result<Self, ToolError> {
        for k in map.keys() {
            if !allowed.contains(&k.as_str()) {
                return Err(ToolError(if allowed.is_empty() {
                    format!("{k}: unknown argument; this tool takes none")
                } else {
                    format!("{k}: unknown argument; expected {}", allowed.join(", "))
                }));
            }
        }
        Ok(Self { map })
    }

    fn get(&self, k: &str) -> Option<&'a Json> {
        self.map.get(k).filter(|v| !v.is_null())
    }

    fn f64_opt(&self, k: &str) -> Result<Option<f64>, ToolError> {
        self.get(k).map(|v| finite(v, k)).transpose()
    }

    fn f64(&self, k: &str) -> Result<f64, ToolError> {
        self.f64_opt(k)?
            .ok_or_else(|| ToolError(format!("{k}: required")))
    }

    /// Argument `k` read by `read` (absent: `None`); a value it cannot read is an error naming
    /// `k`, what was `expected` and the value.
    fn opt<T>(
        &self,
        k: &str,
        expected: &str,
        read: impl Fn(&'a serde_json::Value) -> Option<T>,
    ) -> Result<Option<T>, ToolError> {
        self.get(k)
            .map(|v| read(v).ok_or_else(|| ToolError(format!("{k}: expected {expected}, got {v}"))))
            .transpose()
    }

    fn u64_opt(&self, k: &str) -> Result<Option<u64>, ToolError> {
        self.opt(k, "an integer ≥ 0", serde_json::Value::as_u64)
    }

    fn bool_opt(&self, k: &str) -> Result<Option<bool>, ToolError> {
        self.opt(k, "true or false", serde_json::Value::as_bool)
    }

    fn str_opt(&self, k: &str) -> Result<Option<&'a str>, ToolError> {
        self.opt(k, "a string", serde_json::Value::as_str)
    }

    fn f64s(&self, k: &str) -> Result<Vec<f64>, ToolError> {
        let v = self
            .get(k)
            .ok_or_else(|| ToolError(format!("{k}: required")))?;
        let a = v
            .as_array()
            .ok_or_else(|| ToolError(format!("{k}: expected an array of numbers, got {v}")))?;
        a.iter()
            .enumerate()
            .map(|(i, x)| finite(x, &format!("{k}[{i}]")))
            .collect()
    }
}

/// A finite JSON number (JSON has no NaN: clients send NaN as null or a string).
fn finite(v: &Json, field: &str) -> Result<f64, ToolError> {
    match v.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(ToolError(format!(
            "{field}: must be a finite number, got {v}"
        ))),
    }
}

/// An action of `space` from JSON: an integer (Discrete), an array of numbers, row-major or
/// nested (Box), an array of integers (MultiDiscrete, MultiBinary) or an object (Dict).
fn action_from_json(space: &Space, v: &Json, field: &str) -> Result<Value, ToolError> {
    fn int(v: &Json, field: &str) -> Result<i64, ToolError> {
        v.as_i64()
            .ok_or_else(|| ToolError(format!("{field}: expected an integer, got {v}")))
    }
    fn flat<'j>(v: &'j Json, out: &mut Vec<&'j Json>) {
        match v {
            Json::Array(a) => a.iter().for_each(|x| flat(x, out)),
            x => out.push(x),
        }
    }
    fn ints(v: &Json, field: &str) -> Result<Vec<i64>, ToolError> {
        let a = v
            .as_array()
            .ok_or_else(|| ToolError(format!("{field}: expected an array of integers, got {v}")))?;
        a.iter()
            .enumerate()
            .map(|(i, x)| int(x, &format!("{field}[{i}]")))
            .collect()
    }
    match space {
        Space::Discrete { .. } => Ok(Value::Discrete(int(v, field)?)),
        Space::Box { .. } => {
            let mut xs = Vec::new();
            match v {
                Json::Array(_) => flat(v, &mut xs),
                Json::Number(_) => xs.push(v),
                _ => {
                    return Err(ToolError(format!(
                        "{field}: expected an array of numbers {}, got {v}",
                        space.describe()
                    )));
                }
            }
            let out = xs
                .iter()
                .enumerate()
                .map(|(i, x)| finite(x, &format!("{field}[{i}]")).map(|x| x as f32))
                .collect::<Result<Vec<f32>, _>>()?;
            Ok(Value::Box(out))
        }
        Space::MultiDiscrete { .. } => Ok(Value::MultiDiscrete(ints(v, field)?)),
        Space::MultiBinary { .. } => {
            let bits = ints(v, field)?;
            let mut out = Vec::with_capacity(bits.len());
            for (i, b) in bits.into_iter().enumerate() {
                out.push(
                    u8::try_from(b).ok().filter(|b| *b <= 1).ok_or_else(|| {
                        ToolError(format!("{field}[{i}]: expected 0 or 1, got {b}"))
                    })?,
                );
            }
            Ok(Value::MultiBinary(out))
        }
        Space::Dict(items) => {
            let o = v
                .as_object()
                .ok_or_else(|| ToolError(format!("{field}: expected an object, got {v}")))?;
            if let Some(k) = o.keys().find(|k| !items.iter().any(|(n, _)| n == *k)) {
                return Err(ToolError(format!("{field}.{k}: unknown key")));
            }
            items
                .iter()
                .map(|(k, s)| {
                    let f = format!("{field}.{k}");
                    let x = o
                        .get(k)
                        .ok_or_else(|| ToolError(format!("{f}: required")))?;
                    Ok((k.clone(), action_from_json(s, x, &f)?))
                })
                .collect::<Result<_, _>>()
                .map(Value::Dict)
        }
    }
}

/// The JSON schema of an action of `space`.
fn action_schema(space: &Space) -> Json {
    match space {
        Space::Discrete { n, start } => json!({
            "type": "integer", "minimum": start, "maximum": start + n - 1,
        }),
        Space::Box { shape, low, .. } => json!({
            "type": "array", "items": {"type": "number"},
            "minItems": low.len(), "maxItems": low.len(),
            "description": format!(
                "{} values, row-major (shape {shape:?}); out-of-bound values are clipped",
                low.len()
            ),
        }),
        Space::MultiDiscrete { nvec } => json!({
            "type": "array", "items": {"type": "integer", "minimum": 0},
            "minItems": nvec.len(), "maxItems": nvec.len(),
        }),
        Space::MultiBinary { n } => json!({
            "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1},
            "minItems": n, "maxItems": n,
        }),
        Space::Dict(items) => {
            let mut p = Map::new();
            for (k, s) in items {
                p.insert(k.clone(), action_schema(s));
            }
            let keys: Vec<&str> = items.iter().map(|(k, _)| k.as_str()).collect();
            json!({"type": "object", "properties": p, "required": keys,
                   "additionalProperties": false})
        }
    }
}

/// A value as JSON (Box elements as numbers, exact: f32 → f64 is lossless).
pub(crate) fn value_json(v: &Value) -> Json {
    match v {
        Value::Box(x) => Json::Array(x.iter().map(|&f| json!(f64::from(f))).collect()),
        Value::Discrete(d) => json!(d),
        Value::MultiDiscrete(d) => json!(d),
        Value::MultiBinary(b) => json!(b),
        Value::Dict(items) => Json::Object(
            items
                .iter()
                .map(|(k, v)| (k.clone(), value_json(v)))
                .collect(),
        ),
    }
}

fn stats(x: impl Iterator<Item = f64>) -> Json {
    let (mut n, mut lo, mut hi, mut sum, mut sq) =
        (0usize, f64::INFINITY, f64::NEG_INFINITY, 0.0, 0.0);
    for v in x.filter(|v| v.is_finite()) {
        n += 1;
        lo = lo.min(v);
        hi = hi.max(v);
        sum += v;
        sq += v * v;
    }
    if n == 0 {
        return json!({"finite_values": 0});
    }
    let mean = sum / n as f64;
    json!({"min": lo, "max": hi, "mean": mean,
           "std": (sq / n as f64 - mean * mean).max(0.0).sqrt(), "finite_values": n})
}

/// A short summary of an observation: Box shape and statistics, other values in full.
fn value_summary(v: &Value, space: &Space) -> Json {
    match (v, space) {
        (Value::Box(x), Space::Box { shape, .. }) if x.len() > 16 => {
            let mut s = stats(x.iter().map(|&f| f64::from(f)));
            s["shape"] = json!(shape);
            s
        }
        (Value::Dict(items), Space::Dict(spaces)) => Json::Object(
            items
                .iter()
                .zip(spaces)
                .map(|((k, v), (_, s))| (k.clone(), value_summary(v, s)))
                .collect(),
        ),
        _ => value_json(v),
    }
}

fn info_value_json(v: &InfoValue) -> Json {
    match v {
        InfoValue::F64(x) => json!(x),
        InfoValue::I64(x) => json!(x),
        InfoValue::Bool(x) => json!(x),
        InfoValue::Str(x) => json!(x),
        InfoValue::F64s(x) => json!(x),
    }
}

fn info_json(info: &Info) -> Json {
    Json::Object(
        info.iter()
            .map(|(k, v)| (k.to_string(), info_value_json(v)))
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Images

fn png(width: usize, height: usize, data: &[u8], rgb: bool) -> Result<Vec<u8>, ToolError> {
    use image::ImageEncoder;
    let mut buf = Vec::new();
    let color = if rgb {
        image::ExtendedColorType::Rgb8
    } else {
        image::ExtendedColorType::L8
    };
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(data, width as u32, height as u32, color)
        .map_err(|e| ToolError(format!("encoding the PNG failed: {e}")))?;
    Ok(buf)
}

/// A grey PNG of `values` (`rows × cols`) scaled between their finite minimum and maximum.
fn grey_png(values: &[f32], rows: usize, cols: usize) -> Result<Vec<u8>, ToolError> {
    let (lo, hi) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let px: Vec<u8> = values
        .iter()
        .map(|&v| {
            if v.is_finite() {
                ((v - lo) / span * 255.0).round().clamp(0.0, 255.0) as u8
            } else {
                0
            }
        })
        .collect();
    png(cols, rows, &px, false)
}

/// A grey PNG of the first image in an observation (a Box of two or more dimensions; of a
/// stack, its first plane), if it has one. Built from the observation, never from the task's
/// `render()`, which may draw ground truth (e.g. StemSparseScan's noiseless field) that the
/// agent must not see.
pub(crate) fn observation_png(v: &Value, space: &Space) -> Option<Vec<u8>> {
    match (v, space) {
        (Value::Box(x), Space::Box { shape, .. }) => {
            let (rows, cols, stride) = match shape.as_slice() {
                [r, c] => (*r, *c, 1),
                [k, r, c] if *k <= 4 => (*r, *c, 1),
                [r, c, k] => (*r, *c, *k),
                _ => return None,
            };
            let plane: Vec<f32> = x
                .iter()
                .step_by(stride)
                .take(rows * cols)
                .copied()
                .collect();
            (plane.len() == rows * cols && rows > 1 && cols > 1)
                .then(|| grey_png(&plane, rows, cols).ok())
                .flatten()
        }
        (Value::Dict(items), Space::Dict(spaces)) => items
            .iter()
            .zip(spaces)
            .find_map(|((_, v), (_, s))| observation_png(v, s)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The instrument tools

/// The task's instrument behind the guard: a simulator of it, or a connection of its own to
/// the driver's instrument (Nanonis, STEM gateway, replay).
// One per server: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Instrument {
    Spm(Guarded<SpmSimulator>),
    Nanonis(Guarded<NanonisClient>),
    Replay(Guarded<ReplaySpm>),
    Lattice(Guarded<LatticeSimulator>),
    Dopant(Guarded<DopantSimulator>),
    Stem(Guarded<StemSimulator>),
    Gateway(Guarded<StemGatewayClient>),
}

/// Runs `$body` with `$g` bound to the guarded STEM instrument, or `$spm` on an SPM.
macro_rules! stem {
    ($inst:expr, $g:ident => $body:expr, spm => $spm:expr) => {
        match $inst {
            Instrument::Lattice($g) => $body,
            Instrument::Dopant($g) => $body,
            Instrument::Stem($g) => $body,
            Instrument::Gateway($g) => $body,
            Instrument::Spm(_) | Instrument::Nanonis(_) | Instrument::Replay(_) => $spm,
        }
    };
}

/// Runs `$body` with `$g` bound to the guarded SPM instrument, or `$stem` on a STEM.
macro_rules! spm {
    ($inst:expr, $g:ident => $body:expr, stem => $stem:expr) => {
        match $inst {
            Instrument::Spm($g) => $body,
            Instrument::Nanonis($g) => $body,
            Instrument::Replay($g) => $body,
            Instrument::Lattice(_)
            | Instrument::Dopant(_)
            | Instrument::Stem(_)
            | Instrument::Gateway(_) => $stem,
        }
    };
}

fn spm_only(tool: &str) -> ToolError {
    ToolError(format!(
        "{tool}: this task's instrument is a STEM; the tool is for SPM"
    ))
}

fn stem_only(tool: &str) -> ToolError {
    ToolError(format!(
        "{tool}: this task's instrument is an SPM; the tool is for STEM"
    ))
}

fn settings_json(s: &ScanSettings) -> Json {
    json!({"rows": s.rows, "cols": s.cols, "pixel_size_m": s.pixel_size,
           "dwell_time_s": s.dwell_time, "flyback_time_s": s.flyback_time,
           "center_m": s.center, "frame_time_s": s.frame_time()})
}

impl Instrument {
    /// Task `id`'s instrument behind `limits`: on `url` = `sim` a simulator of it from the
    /// task's `config` (its own, apart from the task's episode); on a real driver a connection
    /// of its own to that instrument (a Nanonis controller serves each client on its own port:
    /// `--instrument-driver` names another one), or the replay file opened again.
    fn open(
        id: &str,
        config: &toml::Value,
        seed: u64,
        url: &DriverUrl,
        limits: &Limits,
        audit: Option<&Path>,
    ) -> Result<Self, CliError> {
        use scopegym_envs::tasks::{
            afm_feedback_tuning as afm, pfm_domain_writing as pdw, pfm_spectroscopy_explore as pse,
            spm_atom_manipulation as sam, spm_tip_conditioning as stc, stem_autofocus as saf,
            stem_dopant_steer as sds, stem_eels_explore as see, stem_sparse_scan as sss,
        };
        fn guarded<I>(
            inst: I,
            limits: &Limits,
            audit: Option<&Path>,
        ) -> Result<Guarded<I>, CliError> {
            let log = match audit {
                Some(p) => AuditLog::append_file(p)?,
                None => AuditLog::disabled(),
            };
            Ok(Guarded::new(inst, limits.clone())?.with_audit(log))
        }
        let wrong = |family: &str| CliError::Argument {
            argument: "--instrument-driver".into(),
            message: format!("{id} runs on {family}; {url} is not one"),
        };
        let c = Some(config);
        macro_rules! cfg {
            ($m:ident) => {{
                let c: $m::Config = config_from_toml(c)?;
                c.validate()?;
                c
            }};
        }
        // The SPM tasks: the task's simulator (`sim(seed)`, at its fidelity) on `sim`.
        let spm = |mode: SpmMode,
                   sim: &dyn Fn(u64) -> scopegym_physics::Result<SpmSimulator>|
         -> Result<Self, CliError> {
            Ok(match url {
                DriverUrl::Sim => Self::Spm(guarded(sim(seed)?, limits, audit)?),
                DriverUrl::Nanonis(a) => Self::Nanonis(guarded(
                    NanonisClient::connect(a, NanonisOptions::for_mode(mode))?,
                    limits,
                    audit,
                )?),
                DriverUrl::Replay(p) => Self::Replay(guarded(
                    ReplaySpm::open(p, ReplayOptions::default())?,
                    limits,
                    audit,
                )?),
                DriverUrl::StemGateway(_) => return Err(wrong("an SPM (sim, nanonis, replay)")),
            })
        };
        // The SPM task of module `$m`: its simulator on `sim`.
        macro_rules! spm_on {
            ($m:ident) => {{
                let c = cfg!($m);
                spm(c.instrument.mode, &|seed| $m::simulator(&c, seed))
            }};
        }
        // The STEM tasks: `$sim` on `sim`, the gateway's instrument on a gateway.
        macro_rules! stem_on {
            ($variant:ident, $sim:expr) => {
                match url {
                    DriverUrl::Sim => Ok(Self::$variant(guarded($sim?, limits, audit)?)),
                    DriverUrl::StemGateway(a) => Ok(Self::Gateway(guarded(
                        StemGatewayClient::connect(a, StemGatewayOptions::default())?,
                        limits,
                        audit,
                    )?)),
                    _ => Err(wrong("a STEM (sim, stem-gateway)")),
                }
            };
        }
        match id {
            "scopegym/AfmFeedbackTuning-v2" => spm_on!(afm),
            "scopegym/PfmDomainWriting-v1" => spm_on!(pdw),
            "scopegym/PfmSpectroscopyExplore-v1" => spm_on!(pse),
            "scopegym/SpmAtomManipulation-v2" => spm_on!(sam),
            "scopegym/SpmTipConditioning-v2" => spm_on!(stc),
            "scopegym/StemAutofocus-v2" => {
                stem_on!(Lattice, saf::simulator(&cfg!(saf), seed))
            }
            "scopegym/StemDopantSteer-v1" => {
                stem_on!(Dopant, DopantSimulator::new(cfg!(sds).instrument, seed))
            }
            "scopegym/StemEelsExplore-v2" => {
                stem_on!(Stem, see::simulator(&cfg!(see), seed))
            }
            "scopegym/StemSparseScan-v2" => {
                stem_on!(
                    Stem,
                    StemSimulator::new(cfg!(sss).instrument_config(), seed)
                )
            }
            _ => Err(CliError::Argument {
                argument: "--task".into(),
                message: format!("no instrument tools for {id}"),
            }),
        }
    }

    fn family(&self) -> &'static str {
        match self {
            Self::Spm(_) | Self::Nanonis(_) | Self::Replay(_) => "spm",
            _ => "stem",
        }
    }

    fn status(&self) -> Json {
        spm!(self, g => {
                let (p, i) = g.feedback_gains();
                json!({
                    "instrument": g.info().name, "simulated": g.info().simulated,
                    "mode": g.mode().name(), "clock_s": g.clock(),
                    "probe_position_m": g.probe_position(), "bias_v": g.bias(),
                    "feedback_p_gain": p, "feedback_i_gain": i,
                    "withdrawn": g.is_withdrawn(), "scan": settings_json(&g.scan_settings()),
                    "guard_tripped": g.tripped().map(|r| format!("{}: {}", r.limit, r.reason)),
                    "dry_run": g.is_dry_run(),
                })
            }, stem => stem!(self, g => {
                let a = g.aberrations();
                json!({
                    "instrument": g.info().name, "simulated": g.info().simulated,
                    "clock_s": g.clock(), "beam_energy_ev": g.beam_energy(),
                    "beam_current_a": g.beam_current(),
                    "probe_position_m": g.probe_position(),
                    "defocus_c10_m": a.c10, "astigmatism_c12_m": a.c12,
                    "astigmatism_phi12_rad": a.phi12, "blanked": g.is_blanked(),
                    "scan": settings_json(&g.scan_settings()),
                    "max_dose_e_per_m2": g.dose_map().max_dose(),
                    "dose_budget_e_per_m2": g.limits().stem.dose_budget,
                    "dry_run": g.is_dry_run(),
                })
            }, spm => unreachable!()))
    }

    /// The scan settings with the overrides in `a`.
    fn request(current: ScanSettings, a: &Args<'_>) -> Result<Option<ScanSettings>, ToolError> {
        let mut s = current;
        let mut changed = false;
        if let Some(r) = a.u64_opt("rows")? {
            s.rows = r as usize;
            changed = true;
        }
        if let Some(c) = a.u64_opt("cols")? {
            s.cols = c as usize;
            changed = true;
        }
        let [cx, cy] = &mut s.center;
        for (k, slot) in [
            ("pixel_size_m", &mut s.pixel_size),
            ("dwell_time_s", &mut s.dwell_time),
            ("center_x_m", cx),
            ("center_y_m", cy),
        ] {
            if let Some(v) = a.f64_opt(k)? {
                *slot = v;
                changed = true;
            }
        }
        if s.rows == 0 || s.cols == 0 || s.rows > 1024 || s.cols > 1024 {
            return Err(ToolError("rows, cols: must be 1..=1024".into()));
        }
        Ok(changed.then_some(s))
    }

    fn acquire_frame(&mut self, a: &Args<'_>) -> ToolResult {
        spm!(self, g => {
                if let Some(s) = Self::request(g.scan_settings(), a)? {
                    g.configure_scan(&s).map_err(te)?;
                }
                let want = a.str_opt("channel")?;
                let f = g.acquire_frame().map_err(te)?;
                let names: Vec<String> = f.channels.iter().map(|c| c.name.clone()).collect();
                let ch = match want {
                    Some(n) => f.channel(n).ok_or_else(|| {
                        ToolError(format!("channel: no {n:?}; this frame has {names:?}"))
                    })?,
                    None => f.main(),
                };
                let (rows, cols) = ch.image.dim();
                let values: Vec<f32> = ch.image.iter().copied().collect();
                let mut j = stats(values.iter().map(|&v| f64::from(v)));
                j["channel"] = json!(ch.name);
                j["units"] = json!(ch.units);
                j["quantity"] = json!(ch.quantity);
                j["channels"] = json!(names);
                j["rows"] = json!(rows);
                j["cols"] = json!(cols);
                j["frame_index"] = json!(f.meta.index);
                j["t_start_s"] = json!(f.meta.t_start);
                j["duration_s"] = json!(f.meta.duration);
                let png = grey_png(&values, rows, cols)?;
                j["scan"] = settings_json(&g.scan_settings());
                Ok(Out {
                    json: j,
                    png: Some(png),
                })
            }, stem => stem!(self, g => {
                if a.str_opt("channel")?.is_some() {
                    return Err(ToolError("channel: a STEM frame has one channel (HAADF)".into()));
                }
                if let Some(s) = Self::request(g.scan_settings(), a)? {
                    g.configure_scan(&s).map_err(te)?;
                }
                let f = g.acquire_frame().map_err(te)?;
                let (rows, cols) = f.image.dim();
                let values: Vec<f32> = f.image.iter().copied().collect();
                let mut j = stats(values.iter().map(|&v| f64::from(v)));
                j["channel"] = json!("haadf");
                j["units"] = json!("counts");
                j["rows"] = json!(rows);
                j["cols"] = json!(cols);
                j["frame_index"] = json!(f.meta.index);
                j["t_start_s"] = json!(f.meta.t_start);
                j["duration_s"] = json!(f.meta.duration);
                j["electrons_per_pixel"] = json!(f.meta.electrons_per_pixel);
                j["dose_e_per_m2"] = json!(f.meta.dose);
                let png = grey_png(&values, rows, cols)?;
                j["scan"] = settings_json(&g.scan_settings());
                Ok(Out { json: j, png: Some(png) })
            }, spm => unreachable!()))
    }

    fn move_probe(&mut self, a: &Args<'_>) -> ToolResult {
        let p = [a.f64("x_m")?, a.f64("y_m")?];
        spm!(self, g => {
                g.move_probe(p).map_err(te)?;
                Ok(Out::json(json!({"probe_position_m": g.probe_position()})))
            }, stem => stem!(self, g => {
                g.move_probe(p).map_err(te)?;
                Ok(Out::json(json!({"probe_position_m": g.probe_position()})))
            }, spm => unreachable!()))
    }

    fn set_bias(&mut self, a: &Args<'_>) -> ToolResult {
        let bias = a.f64("bias_v")?;
        spm!(self, g => {
            let b = g.set_bias(bias).map_err(te)?;
            Ok(Out::json(json!({"bias_v": b})))
        }, stem => Err(spm_only("set_bias")))
    }

    fn set_withdrawn(&mut self, a: &Args<'_>) -> ToolResult {
        let w = a
            .bool_opt("withdrawn")?
            .ok_or_else(|| ToolError("withdrawn: required".into()))?;
        spm!(self, g => {
            g.set_withdrawn(w).map_err(te)?;
            Ok(Out::json(json!({"withdrawn": g.is_withdrawn()})))
        }, stem => Err(spm_only("set_withdrawn")))
    }

    fn set_defocus(&mut self, a: &Args<'_>) -> ToolResult {
        let d = a.f64("defocus_m")?;
        stem!(self, g => {
            let mut ab = g.aberrations();
            ab.c10 = d;
            let got = g.set_aberrations(&ab).map_err(te)?;
            Ok(Out::json(json!({"defocus_c10_m": got.c10})))
        }, spm => Err(stem_only("set_defocus")))
    }

    fn point_spectroscopy(&mut self, a: &Args<'_>) -> ToolResult {
        let p = [a.f64("x_m")?, a.f64("y_m")?];
        spm!(self, g => {
                if a.get("exposure_s").is_some() {
                    return Err(ToolError(
                        "exposure_s: an SPM takes waveform_v (the bias at each point, V)".into(),
                    ));
                }
                let w = a.f64s("waveform_v")?;
                if w.is_empty() || w.len() > 4096 {
                    return Err(ToolError("waveform_v: give 1..=4096 bias values, V".into()));
                }
                let r = g.point_spectroscopy(p, &w).map_err(te)?;
                Ok(Out::json(json!({
                    "position_m": p, "waveform_v": w, "response": r,
                    "response_units": "instrument units (PFM: piezoresponse, a.u.)",
                })))
            }, stem => stem!(self, g => {
                if a.get("waveform_v").is_some() {
                    return Err(ToolError(
                        "waveform_v: a STEM takes exposure_s (the EELS exposure, s)".into(),
                    ));
                }
                let t = a.f64("exposure_s")?;
                g.move_probe(p).map_err(te)?;
                let s = g.acquire_spectrum(t).map_err(te)?;
                let counts: Vec<f64> = s.counts.iter().map(|&c| f64::from(c)).collect();
                Ok(Out::json(json!({
                    "position_m": p, "exposure_s": t, "energy_loss_ev": s.energy,
                    "counts": counts,
                })))
            }, spm => unreachable!()))
    }

    fn make_safe(&mut self) -> ToolResult {
        spm!(self, g => {
                SpmInstrument::make_safe(g).map_err(te)?;
                Ok(Out::json(
                    json!({"withdrawn": g.is_withdrawn(), "bias_v": g.bias()}),
                ))
            }, stem => stem!(self, g => {
                StemInstrument::make_safe(g).map_err(te)?;
                Ok(Out::json(json!({"blanked": g.is_blanked()})))
            }, spm => unreachable!()))
    }
}

// ---------------------------------------------------------------------------------------------
// The session

/// The episode in progress.
#[derive(Debug, Clone)]
struct Episode {
    seed: u64,
    ret: f64,
    steps: usize,
    success: bool,
    done: bool,
    rewards: Vec<f64>,
}

/// The writer of `--record`.
struct Recorder {
    dir: PathBuf,
    calls: std::fs::File,
}

impl Recorder {
    fn open(dir: &Path) -> Result<Self, CliError> {
        let io = |e| CliError::Io {
            path: dir.to_path_buf(),
            source: e,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let calls = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("calls.jsonl"))
            .map_err(io)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            calls,
        })
    }

    fn line(&mut self, j: &Json) {
        let mut s = j.to_string();
        s.push('\n');
        if let Err(e) = self.calls.write_all(s.as_bytes()) {
            eprintln!(
                "scopegym mcp: writing {}: {e}",
                self.dir.join("calls.jsonl").display()
            );
        }
    }
}

/// Everything the tools act on.
struct Session {
    task: &'static str,
    env: Deployment,
    env_config: toml::Value,
    suite_config: bool,
    run_seed: u64,
    /// Episodes started (the next `reset` without a seed uses `episode_seed(run_seed, this)`).
    started: usize,
    episode: Option<Episode>,
    finished: Vec<EpisodeResult>,
    instrument: Option<Instrument>,
    instrument_error: Option<String>,
    reference: Option<(f64, f64, String)>,
    recorder: Option<Recorder>,
    agent: String,
    /// The driver and the guard's limits the task runs under (recorded in the provenance).
    guard: Json,
    /// Steps the guard refused in this session.
    refused_steps: u64,
}

impl Session {
    fn open(a: &McpArgs<'_>) -> Result<Self, CliError> {
        let arg = |argument: &str, message: String| CliError::Argument {
            argument: argument.into(),
            message,
        };
        let spec = scopegym_envs::registry::spec(a.task)?;
        let url: DriverUrl = a.driver.parse()?;
        let limits = limits_for(&url, a.limits)?;
        // The suite's config for the task (difficulty, split, overrides), if the suite has it.
        let build = BuildInfo {
            version: scopegym::VERSION.into(),
            commit: scopegym::GIT_COMMIT.into(),
        };
        let sel = Selection {
            budget: a.budget.into(),
            agents: Vec::new(),
            tasks: vec![spec.id.into()],
            seeds: None,
        };
        let (mut table, suite_config) = match plan(&SuiteFile::embedded(), &sel, &build) {
            Ok(jobs) => match jobs.first() {
                Some(j) => match j.spec.env_table(&j.spec.split)? {
                    toml::Value::Table(t) => (t, true),
                    _ => (toml::Table::new(), false),
                },
                None => (toml::Table::new(), false),
            },
            Err(e) if e.to_string().contains("budget") => {
                return Err(arg("--budget", e.to_string()));
            }
            Err(_) => (toml::Table::new(), false),
        };
        if !suite_config {
            table.insert("difficulty".into(), "medium".into());
            table.insert("split".into(), "test".into());
        }
        let mut suite_config = suite_config;
        if let Some(p) = a.env_config {
            for (k, v) in read_toml_table(p, "--env-config")? {
                table.insert(k, v);
            }
            suite_config = false;
        }
        let env_config = toml::Value::Table(table);
        let audit = match (a.log, a.record) {
            (Some(p), _) => Some(p.to_path_buf()),
            (None, Some(d)) => Some(d.join("audit.jsonl")),
            (None, None) => None,
        };
        let recorder = a.record.map(Recorder::open).transpose()?;
        let opts = DeployOptions {
            config: Some(env_config.clone()),
            limits: limits.clone(),
            dry_run: false,
            audit: audit.clone(),
            watchdog: None,
        };
        let env = make_env(spec.id, &url, opts)?;
        // The instrument tools' own instrument: a second simulator on `sim`, else a connection
        // of their own (to --instrument-driver where the controller wants another port).
        let iurl: DriverUrl = match a.instrument_driver {
            Some(u) => u.parse()?,
            None => url.clone(),
        };
        let ilimits = if iurl == url {
            limits.clone()
        } else {
            limits_for(&iurl, a.limits)?
        };
        let (instrument, instrument_error) = match Instrument::open(
            spec.id,
            &env_config,
            a.seed,
            &iurl,
            &ilimits,
            audit.as_deref(),
        ) {
            Ok(i) => (Some(i), None),
            Err(e) => {
                let why = format!("the instrument tools have no instrument ({iurl}): {e}");
                if iurl.is_hardware() {
                    eprintln!("scopegym mcp: {why}");
                }
                (None, Some(why))
            }
        };
        let reference = match a.reference {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| CliError::Io {
                    path: p.to_path_buf(),
                    source: e,
                })?;
                let s: SuiteResults = serde_json::from_str(&text)
                    .map_err(|e| arg("--reference", format!("{}: {e}", p.display())))?;
                let t = s.tasks.iter().find(|t| t.id == spec.id).ok_or_else(|| {
                    arg(
                        "--reference",
                        format!("{} has no results for {}", p.display(), spec.id),
                    )
                })?;
                let r = &t.reference;
                if !(r.high - r.low).is_normal() {
                    return Err(arg(
                        "--reference",
                        format!("the references of {} have equal scores", spec.id),
                    ));
                }
                Some((r.low, r.high, p.display().to_string()))
            }
        };
        Ok(Self {
            task: spec.id,
            env,
            env_config,
            suite_config,
            run_seed: a.seed,
            started: 0,
            episode: None,
            finished: Vec::new(),
            instrument,
            instrument_error,
            reference,
            recorder,
            agent: a.agent.into(),
            guard: json!({"driver": url.to_string(),
                          "limits": serde_json::to_value(&limits).unwrap_or(Json::Null)}),
            refused_steps: 0,
        })
    }

    fn normalized(&self, ret: f64) -> Json {
        match &self.reference {
            Some((lo, hi, _)) => json!((ret - lo) / (hi - lo)),
            None => Json::Null,
        }
    }

    fn spaces(&self) -> Json {
        // Short forms: a Box's bounds in full would flood the agent's context.
        let act = self.env.action_space();
        let mut j = json!({
            "observation_space": self.env.observation_space().describe(),
            "action_space": act.describe(),
            "max_episode_steps": self.env.max_episode_steps(),
        });
        if act.flat_len() <= 64 {
            j["action_space_json"] = act.to_json();
        }
        j
    }

    fn list_tasks(&self) -> ToolResult {
        let tasks: Vec<Json> = scopegym_envs::registry::TASKS
            .iter()
            .map(|t| {
                json!({"id": t.id, "instrument": t.instrument, "description": t.description,
                       "served": t.id == self.task})
            })
            .collect();
        let mut j = json!({"served_task": self.task, "tasks": tasks,
                           "note": "this server runs the served task only; start another \
                                    `scopegym mcp --task ID` for another task"});
        j["served"] = self.spaces();
        Ok(Out::json(j))
    }

    /// Ends the episode in progress into the results (whether or not it finished).
    fn close_episode(&mut self) {
        if let Some(e) = self.episode.take() {
            let norm = self.normalized(e.ret);
            let rec = json!({"t": now_s(), "episode_end": {
                "seed": e.seed, "return": e.ret, "steps": e.steps, "success": e.success,
                "finished": e.done, "normalized_score": norm}});
            self.finished.push(EpisodeResult {
                seed: e.seed,
                ret: e.ret,
                success: e.success,
                steps: e.steps,
                rewards: e.rewards,
                regret: Vec::new(),
            });
            if let Some(r) = &mut self.recorder {
                r.line(&rec);
            }
            self.write_results();
        }
    }

    fn results(&self) -> RunResults {
        let n = self.finished.len().max(1) as f64;
        let eval_steps: u64 = self.finished.iter().map(|e| e.steps as u64).sum();
        let per_seed = vec![SeedResult {
            seed: self.run_seed,
            return_mean: self.finished.iter().map(|e| e.ret).sum::<f64>() / n,
            success_rate: self.finished.iter().filter(|e| e.success).count() as f64 / n,
            steps: eval_steps,
            train_steps: 0,
            eval_steps,
            curve: Vec::new(),
            episodes: self.finished.clone(),
        }];
        let get = |k: &str| {
            self.env_config
                .get(k)
                .and_then(toml::Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        RunResults {
            env_id: self.task.into(),
            agent: self.agent.clone(),
            seeds: vec![self.run_seed],
            summary: summarize(&per_seed),
            per_seed,
            provenance: Provenance {
                version: scopegym::VERSION.into(),
                commit: scopegym::GIT_COMMIT.into(),
                env_config: serde_json::to_value(&self.env_config).unwrap_or(Json::Null),
                train_env_config: Json::Null,
                agent_config: json!({"served_by": "scopegym mcp",
                                     "suite_config": self.suite_config,
                                     "guard": {"driver": self.guard["driver"],
                                               "limits": self.guard["limits"],
                                               "refused_steps": self.refused_steps}}),
                difficulty: get("difficulty"),
                split: get("split"),
                learns: false,
                budget: scopegym_agents::bench::run::Budget {
                    train_steps: 0,
                    episodes: self.finished.len(),
                },
                max_episode_steps: self.env.max_episode_steps(),
                episode_seeds: format!(
                    "episode i of run seed s resets with s * {EPISODE_STRIDE} + i \
                     (unless reset named a seed)"
                ),
            },
        }
    }

    fn write_results(&self) {
        let Some(r) = &self.recorder else { return };
        let p = r.dir.join("results.json");
        let text = serde_json::to_string_pretty(&self.results()).unwrap_or_default();
        if let Err(e) = std::fs::write(&p, text) {
            eprintln!("scopegym mcp: writing {}: {e}", p.display());
        }
    }

    fn reset(&mut self, a: &Args<'_>) -> ToolResult {
        if let Some(t) = a.str_opt("task")? {
            let s =
                scopegym_envs::registry::spec(t).map_err(|e| ToolError(format!("task: {e}")))?;
            if s.id != self.task {
                return Err(ToolError(format!(
                    "task: this server runs {}; start `scopegym mcp --task {}` for {}",
                    self.task, s.id, s.id
                )));
            }
        }
        let seed = match a.u64_opt("seed")? {
            Some(s) => s,
            None => episode_seed(self.run_seed, self.started),
        };
        let include = a.bool_opt("include_observation")?.unwrap_or(false);
        self.close_episode();
        let (obs, _info) = self.env.reset(Some(seed)).map_err(te)?;
        self.started += 1;
        self.episode = Some(Episode {
            seed,
            ret: 0.0,
            steps: 0,
            success: false,
            done: false,
            rewards: Vec::new(),
        });
        let mut j = json!({
            "task": self.task, "seed": seed, "episode": self.started - 1,
            "observation_summary": value_summary(&obs, self.env.observation_space()),
        });
        for (k, v) in self.spaces().as_object().into_iter().flatten() {
            j[k] = v.clone();
        }
        if include {
            j["observation"] = value_json(&obs);
        }
        let png = observation_png(&obs, self.env.observation_space());
        Ok(Out { json: j, png })
    }

    fn step(&mut self, a: &Args<'_>) -> Result<(Out, Json), ToolError> {
        let include = a.bool_opt("include_observation")?.unwrap_or(false);
        let raw = a
            .map
            .get("action")
            .ok_or_else(|| ToolError("action: required".into()))?;
        let space = self.env.action_space().clone();
        let action = action_from_json(&space, raw, "action")?;
        space.validate_action(&action, "action").map_err(te)?;
        match &self.episode {
            None => return Err(ToolError("no episode: call reset first".into())),
            Some(e) if e.done => {
                return Err(ToolError(
                    "the episode has ended: call episode_score, then reset".into(),
                ));
            }
            Some(_) => {}
        }
        let s = self.env.step(&action).map_err(te)?;
        let ep = self.episode.as_mut().expect("checked above");
        ep.ret += s.reward;
        ep.steps += 1;
        ep.rewards.push(s.reward);
        ep.success = matches!(s.info.get("is_success"), Some(InfoValue::Bool(true)));
        ep.done = s.terminated || s.truncated;
        if matches!(s.info.get("refused"), Some(InfoValue::Bool(true))) {
            self.refused_steps += 1;
        }
        let mut j = json!({
            "reward": s.reward, "terminated": s.terminated, "truncated": s.truncated,
            "return_so_far": ep.ret, "steps": ep.steps,
            "observation_summary": value_summary(&s.obs, self.env.observation_space()),
        });
        // What the instrument and the guard report; ground truth stays in the record.
        for k in [
            "refused",
            "refused_limit",
            "refused_reason",
            "action_clipped",
        ] {
            if let Some(v) = s.info.get(k) {
                j[k] = info_value_json(v);
            }
        }
        if include {
            j["observation"] = value_json(&s.obs);
        }
        let done = ep.done;
        let png = observation_png(&s.obs, self.env.observation_space());
        let info = info_json(&s.info);
        if done {
            j["episode_end"] = self.score_json();
            self.close_episode();
        }
        Ok((Out { json: j, png }, info))
    }

    fn score_json(&self) -> Json {
        let (ret, steps, success, done, seed) = match &self.episode {
            Some(e) => (e.ret, e.steps, e.success, e.done, Some(e.seed)),
            None => match self.finished.last() {
                Some(e) => (e.ret, e.steps, e.success, true, Some(e.seed)),
                None => (0.0, 0, false, false, None),
            },
        };
        let mean = if self.finished.is_empty() {
            Json::Null
        } else {
            json!(self.finished.iter().map(|e| e.ret).sum::<f64>() / self.finished.len() as f64)
        };
        json!({
            "task": self.task, "seed": seed, "return": ret, "steps": steps,
            "is_success": success, "episode_over": done,
            "normalized_score": self.normalized(ret),
            "normalization": match &self.reference {
                Some((lo, hi, file)) => json!({"random": lo, "heuristic": hi, "from": file,
                    "formula": "(return - random) / (heuristic - random)"}),
                None => json!("none: start the server with --reference SUITE_JSON \
                               (a scopegym suite output) to get normalized scores"),
            },
            "episodes_scored": self.finished.len(),
            "mean_return_of_scored_episodes": mean,
        })
    }

    fn instrument(&mut self) -> Result<&mut Instrument, ToolError> {
        match &mut self.instrument {
            Some(i) => Ok(i),
            None => Err(ToolError(
                self.instrument_error
                    .clone()
                    .unwrap_or_else(|| "no instrument".into()),
            )),
        }
    }

    /// Runs tool `name`; the second value is what only the record sees (a step's info).
    fn call(&mut self, name: &str, args: &JsonObject) -> Result<(Out, Json), ToolError> {
        let no_extra = |o: Out| (o, Json::Null);
        let a = |allowed: &[&str]| Args::new(args, allowed);
        match name {
            "list_tasks" => self.list_tasks().map(no_extra),
            "reset" => self
                .reset(&a(&["seed", "task", "include_observation"])?)
                .map(no_extra),
            "step" => self.step(&a(&["action", "include_observation"])?),
            "episode_score" => {
                a(&[])?;
                Ok(no_extra(Out::json(self.score_json())))
            }
            "instrument_status" => {
                a(&[])?;
                let i = self.instrument()?;
                let mut j = i.status();
                j["family"] = json!(i.family());
                Ok(no_extra(Out::json(j)))
            }
            "acquire_frame" => {
                let a = a(&[
                    "channel",
                    "rows",
                    "cols",
                    "pixel_size_m",
                    "dwell_time_s",
                    "center_x_m",
                    "center_y_m",
                ])?;
                self.instrument()?.acquire_frame(&a).map(no_extra)
            }
            "move_probe" => {
                let a = a(&["x_m", "y_m"])?;
                self.instrument()?.move_probe(&a).map(no_extra)
            }
            "set_bias" => {
                let a = a(&["bias_v"])?;
                self.instrument()?.set_bias(&a).map(no_extra)
            }
            "set_withdrawn" => {
                let a = a(&["withdrawn"])?;
                self.instrument()?.set_withdrawn(&a).map(no_extra)
            }
            "set_defocus" => {
                let a = a(&["defocus_m"])?;
                self.instrument()?.set_defocus(&a).map(no_extra)
            }
            "point_spectroscopy" => {
                let a = a(&["x_m", "y_m", "waveform_v", "exposure_s"])?;
                self.instrument()?.point_spectroscopy(&a).map(no_extra)
            }
            "make_safe" => {
                a(&[])?;
                self.instrument()?.make_safe().map(no_extra)
            }
            _ => Err(ToolError(format!(
                "unknown tool {name:?}; the tools are {}",
                TOOL_NAMES.join(", ")
            ))),
        }
    }
}

const TOOL_NAMES: &[&str] = &[
    "list_tasks",
    "reset",
    "step",
    "episode_score",
    "instrument_status",
    "acquire_frame",
    "move_probe",
    "set_bias",
    "set_withdrawn",
    "set_defocus",
    "point_spectroscopy",
    "make_safe",
];

// ---------------------------------------------------------------------------------------------
// The tool list

fn object(props: Json, required: &[&str]) -> JsonObject {
    let j = json!({"type": "object", "properties": props, "required": required,
                   "additionalProperties": false});
    match j {
        Json::Object(m) => m,
        _ => unreachable!(),
    }
}

fn tool(name: &'static str, description: String, props: Json, required: &[&str]) -> Tool {
    Tool::new(name, description, object(props, required))
}

/// The tools for `session`'s task and instrument.
fn tools(s: &Session) -> Vec<Tool> {
    let act = s.env.action_space();
    let include = json!({"type": "boolean", "default": false,
        "description": "also return the full observation as numbers (row-major); the summary \
                        and a PNG of the state always come back"});
    let family = s.instrument.as_ref().map(Instrument::family);
    let scan_props = json!({
        "rows": {"type": "integer", "minimum": 1, "maximum": 1024, "description": "pixels along the slow axis"},
        "cols": {"type": "integer", "minimum": 1, "maximum": 1024, "description": "pixels along the fast axis"},
        "pixel_size_m": {"type": "number", "description": "pixel size, m"},
        "dwell_time_s": {"type": "number", "description": "dwell time per pixel, s"},
        "center_x_m": {"type": "number", "description": "frame centre x (lab), m"},
        "center_y_m": {"type": "number", "description": "frame centre y (lab), m"},
        "channel": {"type": "string", "description": "SPM channel (height, height_retrace, error, amplitude, phase); default: the main channel"},
    });
    let mut v = vec![
        tool(
            "list_tasks",
            "List scopegym's tasks (id, instrument, description) and the spaces of the one \
             this server runs."
                .into(),
            json!({}),
            &[],
        ),
        tool(
            "reset",
            format!(
                "Start an episode of {}. Without a seed, episode i uses the benchmark suite's \
                 seed (run seed × 1 000 000 + i), so scores compare with the suite's agents. \
                 Returns the observation summary, the spaces and a PNG of the state. Starting \
                 a new episode scores the one in progress as it stands.",
                s.task
            ),
            json!({
                "seed": {"type": "integer", "minimum": 0, "description": "reset seed (dimensionless); default: the suite's next episode seed"},
                "task": {"type": "string", "description": format!("must be {} (this server's task) if given", s.task)},
                "include_observation": include,
            }),
            &[],
        ),
        tool(
            "step",
            format!(
                "Apply one action of {} (action space {}; the task's own dimensionless units) \
                 and return the reward, whether the episode ended, the observation summary and \
                 a PNG. A command outside the instrument's safety limits is not sent: the \
                 episode ends with refused=true and the reason.",
                s.task,
                act.describe()
            ),
            json!({"action": action_schema(act), "include_observation": include}),
            &["action"],
        ),
        tool(
            "episode_score",
            "The episode's return so far (or the last episode's), steps, is_success, and the \
             normalized score (random 0, heuristic 1) when the server has suite references."
                .into(),
            json!({}),
            &[],
        ),
    ];
    if family.is_none() {
        return v;
    }
    let sep = " Acts on a simulator of the task's instrument behind the same safety guard and \
               audit log, separate from the task's episode.";
    v.push(tool(
        "instrument_status",
        format!(
            "The instrument's state: probe position (m), scan settings (SI), bias (V) or \
                 aberrations (m), guard state.{sep}"
        ),
        json!({}),
        &[],
    ));
    v.push(tool(
        "acquire_frame",
        format!(
            "Scan one frame (optionally changing the scan settings first) and return it as \
                 a PNG plus statistics in the channel's units.{sep}"
        ),
        scan_props,
        &[],
    ));
    v.push(tool(
        "move_probe",
        format!("Move the probe (tip or beam) to a lab position.{sep}"),
        json!({"x_m": {"type": "number", "description": "x, m"},
               "y_m": {"type": "number", "description": "y, m"}}),
        &["x_m", "y_m"],
    ));
    if family == Some("spm") {
        v.push(tool(
            "set_bias",
            format!("Set the tip-sample bias (ramped within the slew limit).{sep}"),
            json!({"bias_v": {"type": "number", "description": "bias, V"}}),
            &["bias_v"],
        ));
        v.push(tool(
            "set_withdrawn",
            format!("Withdraw the tip (true) or approach it (false).{sep}"),
            json!({"withdrawn": {"type": "boolean"}}),
            &["withdrawn"],
        ));
        v.push(tool(
            "point_spectroscopy",
            format!(
                "Move the tip to (x_m, y_m) and step through a bias waveform; returns one \
                     response per point.{sep}"
            ),
            json!({"x_m": {"type": "number", "description": "x, m"},
                   "y_m": {"type": "number", "description": "y, m"},
                   "waveform_v": {"type": "array", "items": {"type": "number"}, "minItems": 1,
                                  "maxItems": 4096, "description": "bias at each point, V"}}),
            &["x_m", "y_m", "waveform_v"],
        ));
    } else {
        v.push(tool(
            "set_defocus",
            format!("Set the defocus C10 (other aberrations unchanged).{sep}"),
            json!({"defocus_m": {"type": "number", "description": "defocus C10, m"}}),
            &["defocus_m"],
        ));
        v.push(tool(
            "point_spectroscopy",
            format!("Move the beam to (x_m, y_m) and acquire an EELS spectrum.{sep}"),
            json!({"x_m": {"type": "number", "description": "x, m"},
                   "y_m": {"type": "number", "description": "y, m"},
                   "exposure_s": {"type": "number", "description": "exposure, s"}}),
            &["x_m", "y_m", "exposure_s"],
        ));
    }
    v.push(tool(
        "make_safe",
        format!("Make the instrument safe: withdraw the tip (SPM) or blank the beam (STEM).{sep}"),
        json!({}),
        &[],
    ));
    v
}

// ---------------------------------------------------------------------------------------------
// The MCP server

struct Shared {
    session: Mutex<Session>,
    tools: Vec<Tool>,
    instructions: String,
}

impl Shared {
    /// Runs a tool and records it; never panics across the lock.
    fn call(&self, name: &str, args: &JsonObject) -> CallToolResult {
        let mut s = self
            .session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let t = now_s();
        let res = s.call(name, args);
        if let Some(r) = &mut s.recorder {
            let mut line = json!({"t": t, "tool": name, "arguments": args,
                                  "duration_s": now_s() - t});
            match &res {
                Ok((out, extra)) => {
                    let mut summary = out.json.clone();
                    if let Some(o) = summary.as_object_mut() {
                        o.remove("observation");
                    }
                    line["ok"] = json!(true);
                    line["result"] = summary;
                    if !extra.is_null() {
                        line["info"] = extra.clone();
                    }
                }
                Err(e) => {
                    line["ok"] = json!(false);
                    line["error"] = json!(e.0);
                }
            }
            r.line(&line);
        }
        match res {
            Ok((out, _)) => {
                let mut content = vec![ContentBlock::text(out.json.to_string())];
                if let Some(p) = out.png {
                    content.push(ContentBlock::image(
                        base64::engine::general_purpose::STANDARD.encode(p),
                        "image/png",
                    ));
                }
                let mut r = CallToolResult::success(content);
                r.structured_content = Some(out.json);
                r
            }
            Err(e) => CallToolResult::error(vec![ContentBlock::text(format!("{name}: {}", e.0))]),
        }
    }
}

/// The MCP handler (cheap to clone: every clone serves the same session).
#[derive(Clone)]
struct Server(Arc<Shared>);

impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("scopegym", scopegym::VERSION))
            .with_instructions(self.0.instructions.clone())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.0.tools.clone()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let shared = self.0.clone();
        let name = request.name.to_string();
        let args = request.arguments.unwrap_or_default();
        let res = tokio::task::spawn_blocking(move || shared.call(&name, &args)).await;
        Ok(match res {
            Ok(r) => r,
            Err(e) => CallToolResult::error(vec![ContentBlock::text(format!(
                "internal error (the call failed, the server runs on): {e}"
            ))]),
        }
        .into())
    }
}

/// Runs `scopegym mcp` until the client closes stdin (stdio) or the process is stopped (HTTP).
pub(crate) fn mcp(a: &McpArgs<'_>) -> Result<(), CliError> {
    let session = Session::open(a)?;
    let tools = tools(&session);
    let instructions = format!(
        "scopegym runs the microscopy task {} ({}). Call reset, then step with actions of the \
         task's action space until the episode ends; episode_score gives the score. Instrument \
         tools (acquire_frame, move_probe, ...) act on a separate simulator of the instrument \
         behind the same safety limits. Quantities are SI; argument names carry the unit \
         (x_m, bias_v, exposure_s).",
        session.task,
        scopegym_envs::registry::spec(session.task).map_or("", |t| t.description)
    );
    let shared = Arc::new(Shared {
        session: Mutex::new(session),
        tools,
        instructions,
    });
    let server = Server(shared.clone());
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| CliError::Io {
            path: PathBuf::from(what),
            source: e,
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("tokio runtime"))?;
    let served: Result<(), CliError> = rt.block_on(async move {
        match a.http {
            None => {
                let running = server
                    .serve(rmcp::transport::stdio())
                    .await
                    .map_err(|e| io("stdio")(std::io::Error::other(e.to_string())))?;
                let _ = running.waiting().await;
                Ok(())
            }
            Some(addr) => {
                use rmcp::transport::streamable_http_server::{
                    StreamableHttpServerConfig, StreamableHttpService,
                    session::local::LocalSessionManager,
                };
                let service = StreamableHttpService::new(
                    move || Ok(server.clone()),
                    Arc::new(LocalSessionManager::default()),
                    StreamableHttpServerConfig::default(),
                );
                let app = axum::Router::new().nest_service("/mcp", service);
                let listener =
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|e| CliError::Argument {
                            argument: "--http".into(),
                            message: format!("cannot listen on {addr}: {e}"),
                        })?;
                let local = listener.local_addr().map_err(io("--http"))?;
                eprintln!("scopegym mcp: serving {} on http://{local}/mcp", a.task);
                // Ctrl-C ends the server gracefully: the episode in progress is scored.
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = tokio::signal::ctrl_c().await;
                    })
                    .await
                    .map_err(io("--http"))
            }
        }
    });
    let mut s = shared
        .session
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    s.close_episode();
    if let Some(i) = &mut s.instrument {
        let _ = i.make_safe();
    }
    served
}
