//! The append-only audit log: one JSON object per line for every command the guard sees.
//!
//! Each line holds `time` (Unix time, s, with fractions), `seq` (0-based line number of this
//! log), `command` (the trait method, e.g. `"set_bias"`), `args` (the arguments with units,
//! e.g. `{"bias": "2.5 V"}`), `result` (`"ok"`, `"refused"`, `"error"` or `"dry_run"`: not sent),
//! `message` (what the instrument returned, why it was refused, or the error) and, for a
//! refusal, `limit` (the limit's name in `limits.toml`). Each line is written with one
//! `write_all` and flushed before the guard returns, so a crash loses nothing that was recorded.
//! A failed write latches the log: the guard then refuses every command but `make_safe`.

use crate::error::{DriverError, Result};
use serde_json::{Map, Value, json};
use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// The outcome of a command, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Sent and succeeded; what the instrument returned.
    Ok(String),
    /// Refused by `limit` before it was sent (or, for an abort, right after).
    Refused {
        /// The limit's name.
        limit: String,
        /// The values and the limit's values.
        reason: String,
    },
    /// Sent and failed; the error.
    Error(String),
    /// Not sent (dry-run mode).
    DryRun,
}

/// Where the audit lines go.
pub struct AuditLog {
    out: Option<Box<dyn Write + Send>>,
    seq: u64,
    failed: Option<String>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("enabled", &self.out.is_some())
            .field("seq", &self.seq)
            .field("failed", &self.failed)
            .finish()
    }
}

impl AuditLog {
    /// A log written to `out` (flushed after every line).
    pub fn new(out: impl Write + Send + 'static) -> Self {
        Self {
            out: Some(Box::new(out)),
            seq: 0,
            failed: None,
        }
    }

    /// A log that records nothing.
    pub fn disabled() -> Self {
        Self {
            out: None,
            seq: 0,
            failed: None,
        }
    }

    /// A log appended to the file at `path` (created if missing; existing lines are kept).
    pub fn append_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| DriverError::Io {
                context: format!("opening audit log {}", path.display()),
                source,
            })?;
        Ok(Self::new(f))
    }

    /// Lines written so far.
    pub fn lines_written(&self) -> u64 {
        self.seq
    }

    /// Why the log stopped, if a write failed.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Writes one line; a failure latches the log (see the module docs).
    pub fn record(
        &mut self,
        command: &str,
        args: Map<String, Value>,
        outcome: &Outcome,
    ) -> Result<()> {
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut line = json!({
            "time": time,
            "seq": self.seq,
            "command": command,
            "args": Value::Object(args),
        });
        let (result, message, limit) = match outcome {
            Outcome::Ok(m) => ("ok", m.as_str(), None),
            Outcome::Refused { limit, reason } => ("refused", reason.as_str(), Some(limit)),
            Outcome::Error(m) => ("error", m.as_str(), None),
            Outcome::DryRun => ("dry_run", "not sent (dry run)", None),
        };
        if let Some(obj) = line.as_object_mut() {
            obj.insert("result".into(), json!(result));
            obj.insert("message".into(), json!(message));
            if let Some(l) = limit {
                obj.insert("limit".into(), json!(l));
            }
        }
        let mut text = line.to_string();
        text.push('\n');
        let written = out.write_all(text.as_bytes()).and_then(|()| out.flush());
        match written {
            Ok(()) => {
                self.seq += 1;
                Ok(())
            }
            Err(source) => {
                self.failed = Some(source.to_string());
                Err(DriverError::Io {
                    context: "audit log".into(),
                    source,
                })
            }
        }
    }
}
