//! The STEM gateway driver: a client for scopegym's own length-prefixed JSON-RPC protocol
//! (`drivers/STEM_GATEWAY.md`), behind [`StemInstrument`].
//!
//! STEM vendors expose in-process Python APIs only, so a lab runs a small gateway next to the
//! microscope (the reference one, `drivers/python/stem_gateway.py`, serves the simulator; a lab
//! swaps its backend for a shim over the vendor API). [`StemGatewayClient`] talks to it over
//! TCP:
//!
//! - every connect, write and read has a deadline ([`StemGatewayOptions`]); an acquisition's is
//!   its expected duration plus a margin;
//! - a received message is checked against the size limits before anything is read, and its
//!   bytes are read as they arrive, so a declared size is never allocated up front;
//! - every failed call (transport, timeout, protocol, error reply) first sends `make_safe` over
//!   a fresh connection, then reports a [`DriverError`] (which crosses the instrument traits as a
//!   [`PhysicsError::Refused`] with the reason prefix [`DRIVER_PREFIX`]); after a transport,
//!   timeout or protocol fault the connection is closed for good.
//!
//! The trait's getters (`clock`, `probe_position`, ...) cannot fail: when their call fails they
//! return the last value seen and the fault is reported by the next fallible call.
//!
//! [`wire`] holds the framing, usable by a server as well.
//!
//! [`DRIVER_PREFIX`]: crate::error::DRIVER_PREFIX

use crate::error::{DriverError, Result};
use crate::watchdog::{HasSafeHandle, SafeHandle};
use ndarray::Array2;
use scopegym_envs::tasks::NewEpisode;
use scopegym_envs::tasks::stem_autofocus::ProbeTruth;
use scopegym_envs::tasks::stem_dopant_steer::DopantTruth;
use scopegym_envs::tasks::stem_eels_explore::SpectrumTruth;
use scopegym_envs::tasks::stem_sparse_scan::{FieldTruth, TruthScratch};
use scopegym_envs::{Info, InfoValue};
use scopegym_physics::PhysicsError;
use scopegym_physics::instrument::{
    Frame, FrameMeta, InstrumentInfo, InstrumentKind, ScanSettings, Spectrum, StemInstrument,
};
use scopegym_physics::stem::optics::Aberrations;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The protocol version this client speaks (`info.protocol`).
pub const PROTOCOL_VERSION: u64 = 1;

/// The error codes of `drivers/STEM_GATEWAY.md`.
pub mod codes {
    /// The header is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a request object, or `method` / `id` missing.
    pub const INVALID_REQUEST: i64 = -32600;
    /// Unknown method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// A parameter is missing, of the wrong type or out of its domain.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The gateway itself failed.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The instrument refused the command in its current state.
    pub const REFUSED: i64 = -32000;
    /// The instrument rejected an argument value.
    pub const INVALID_ARGUMENT: i64 = -32001;
    /// An optional method this gateway does not implement.
    pub const UNSUPPORTED: i64 = -32002;
    /// The vendor API or the hardware reported a fault.
    pub const INSTRUMENT_FAULT: i64 = -32003;
    /// A message would exceed a size limit.
    pub const TOO_LARGE: i64 = -32004;

    /// The name of `code` as in the spec's table (`"unknown"` for any other).
    pub fn name(code: i64) -> &'static str {
        match code {
            PARSE_ERROR => "parse error",
            INVALID_REQUEST => "invalid request",
            METHOD_NOT_FOUND => "method not found",
            INVALID_PARAMS => "invalid params",
            INTERNAL_ERROR => "internal error",
            REFUSED => "refused",
            INVALID_ARGUMENT => "invalid argument",
            UNSUPPORTED => "unsupported",
            INSTRUMENT_FAULT => "instrument fault",
            TOO_LARGE => "too large",
            _ => "unknown",
        }
    }
}

/// Framing of the protocol: `u32` big-endian header length, the JSON header, then the binary
/// attachments it declares. Used by the client and by test servers.
pub mod wire {
    use serde_json::{Map, Value, json};
    use std::io::{Read, Write};
    use thiserror::Error;

    /// Largest header, bytes (1 MiB).
    pub const MAX_HEADER: usize = 1 << 20;
    /// Default largest message, bytes (128 MiB: a 4096² `f32` frame is 64 MiB).
    pub const DEFAULT_MAX_MESSAGE: usize = 128 << 20;
    /// Bytes read per chunk: the most a reader holds beyond what has arrived.
    const CHUNK: usize = 64 << 10;

    /// Element type of an attachment.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Dtype {
        /// Little-endian IEEE-754 binary32, `"<f4"`.
        F32,
        /// Little-endian IEEE-754 binary64, `"<f8"`.
        F64,
    }

    impl Dtype {
        /// NumPy's name: `"<f4"` or `"<f8"`.
        pub fn name(self) -> &'static str {
            match self {
                Self::F32 => "<f4",
                Self::F64 => "<f8",
            }
        }

        /// Bytes per element.
        pub fn size(self) -> usize {
            match self {
                Self::F32 => 4,
                Self::F64 => 8,
            }
        }

        /// The dtype named `s`, if version 1 has it.
        pub fn parse(s: &str) -> Option<Self> {
            match s {
                "<f4" => Some(Self::F32),
                "<f8" => Some(Self::F64),
                _ => None,
            }
        }
    }

    /// A binary array attached to a message.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Attachment {
        /// Its name, e.g. `image`.
        pub name: String,
        /// Element type.
        pub dtype: Dtype,
        /// Shape, C order.
        pub shape: Vec<usize>,
        /// The bytes, `product(shape) · dtype.size()` of them.
        pub data: Vec<u8>,
    }

    impl Attachment {
        /// An `<f4` attachment.
        pub fn f32(name: &str, shape: &[usize], values: &[f32]) -> Self {
            Self {
                name: name.into(),
                dtype: Dtype::F32,
                shape: shape.to_vec(),
                data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            }
        }

        /// An `<f8` attachment.
        pub fn f64(name: &str, shape: &[usize], values: &[f64]) -> Self {
            Self {
                name: name.into(),
                dtype: Dtype::F64,
                shape: shape.to_vec(),
                data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            }
        }

        /// The values, if the dtype is `<f4`.
        pub fn to_f32(&self) -> Option<Vec<f32>> {
            (self.dtype == Dtype::F32).then(|| {
                self.data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            })
        }

        /// The values, if the dtype is `<f8`.
        pub fn to_f64(&self) -> Option<Vec<f64>> {
            (self.dtype == Dtype::F64).then(|| {
                self.data
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect()
            })
        }

        fn descriptor(&self) -> Value {
            json!({
                "name": self.name,
                "dtype": self.dtype.name(),
                "shape": self.shape,
                "nbytes": self.data.len(),
            })
        }
    }

    /// One message: a JSON header object and its attachments.
    #[derive(Debug, Clone, PartialEq, Default)]
    pub struct Message {
        /// The header (without the `attachments` key, which [`write_message`] writes).
        pub header: Map<String, Value>,
        /// The attachments, in order.
        pub attachments: Vec<Attachment>,
    }

    impl Message {
        /// The attachment called `name`.
        pub fn attachment(&self, name: &str) -> Option<&Attachment> {
            self.attachments.iter().find(|a| a.name == name)
        }
    }

    /// What can go wrong reading or writing a message.
    #[derive(Debug, Error)]
    pub enum WireError {
        /// The transport failed (including a read or write timeout).
        #[error("I/O error: {0}")]
        Io(#[from] std::io::Error),
        /// The peer closed the connection before the message ended.
        #[error(
            "truncated message: the connection closed after {got} of {expected} bytes of the {part}"
        )]
        Truncated {
            /// Which part: `length`, `header` or an attachment's name.
            part: String,
            /// Bytes received.
            got: usize,
            /// Bytes declared.
            expected: usize,
        },
        /// The peer closed the connection between messages.
        #[error("the connection closed")]
        Closed,
        /// A declared size exceeds a limit.
        #[error("message too large: {0}")]
        TooLarge(String),
        /// The bytes do not follow the protocol.
        #[error("{0}")]
        Malformed(String),
    }

    /// Reads exactly `n` bytes, in chunks as they arrive (never reserving `n` up front).
    fn read_part<R: Read>(r: &mut R, n: usize, part: &str) -> Result<Vec<u8>, WireError> {
        let mut buf = Vec::new();
        while buf.len() < n {
            let start = buf.len();
            let want = (n - start).min(CHUNK);
            buf.resize(start + want, 0);
            let got = loop {
                match r.read(&mut buf[start..]) {
                    Ok(k) => break k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            };
            buf.truncate(start + got);
            if got == 0 {
                return Err(WireError::Truncated {
                    part: part.into(),
                    got: start,
                    expected: n,
                });
            }
        }
        Ok(buf)
    }

    fn descriptor(d: &Value, i: usize) -> Result<(String, Dtype, Vec<usize>, usize), WireError> {
        let bad = |why: String| WireError::Malformed(format!("attachment {i}: {why}"));
        let o = d.as_object().ok_or_else(|| bad("not an object".into()))?;
        let name = o
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("`name` missing or not a string".into()))?
            .to_string();
        let dtype = o
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("`dtype` missing or not a string".into()))?;
        let dtype = Dtype::parse(dtype)
            .ok_or_else(|| bad(format!("dtype {dtype:?} is not \"<f4\" or \"<f8\"")))?;
        let shape = o
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("`shape` missing or not a list".into()))?
            .iter()
            .map(|v| v.as_u64().and_then(|v| usize::try_from(v).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("`shape` must hold non-negative integers".into()))?;
        let nbytes = o
            .get("nbytes")
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| bad("`nbytes` missing or not a non-negative integer".into()))?;
        let expected = shape
            .iter()
            .try_fold(dtype.size(), |a, &b| a.checked_mul(b))
            .ok_or_else(|| {
                WireError::TooLarge(format!("attachment `{name}`: shape {shape:?} overflows"))
            })?;
        if expected != nbytes {
            return Err(bad(format!(
                "`{name}`: nbytes {nbytes} ≠ {expected} for shape {shape:?} of {}",
                dtype.name()
            )));
        }
        Ok((name, dtype, shape, nbytes))
    }

    /// Reads one message, refusing any whose header exceeds [`MAX_HEADER`] or whose total
    /// (`4 + header + attachments`) exceeds `max_message` before reading it.
    pub fn read_message<R: Read>(r: &mut R, max_message: usize) -> Result<Message, WireError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match r.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Err(WireError::Closed),
                Ok(0) => {
                    return Err(WireError::Truncated {
                        part: "length".into(),
                        got,
                        expected: 4,
                    });
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let h = u32::from_be_bytes(len) as usize;
        if h == 0 {
            return Err(WireError::Malformed("header length 0".into()));
        }
        if h > MAX_HEADER || 4 + h > max_message {
            return Err(WireError::TooLarge(format!(
                "declared header of {h} bytes exceeds the limit of {} bytes",
                MAX_HEADER.min(max_message.saturating_sub(4))
            )));
        }
        let bytes = read_part(r, h, "header")?;
        let header: Value = serde_json::from_slice(&bytes)
            .map_err(|e| WireError::Malformed(format!("header is not JSON: {e}")))?;
        let Value::Object(mut header) = header else {
            return Err(WireError::Malformed("header is not a JSON object".into()));
        };
        let descs = match header.remove("attachments") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(WireError::Malformed("`attachments` is not a list".into())),
        };
        let descs = descs
            .iter()
            .enumerate()
            .map(|(i, d)| descriptor(d, i))
            .collect::<Result<Vec<_>, _>>()?;
        let total = descs
            .iter()
            .try_fold(4 + h, |a, d| a.checked_add(d.3))
            .filter(|&t| t <= max_message);
        if total.is_none() {
            let sum: u128 = descs.iter().map(|d| d.3 as u128).sum();
            return Err(WireError::TooLarge(format!(
                "declared message of {} bytes exceeds the limit of {max_message} bytes",
                sum + 4 + h as u128
            )));
        }
        let mut attachments = Vec::with_capacity(descs.len());
        for (name, dtype, shape, nbytes) in descs {
            let data = read_part(r, nbytes, &name)?;
            attachments.push(Attachment {
                name,
                dtype,
                shape,
                data,
            });
        }
        Ok(Message {
            header,
            attachments,
        })
    }

    /// Writes one message (the header's `attachments` key is set from `msg.attachments`),
    /// refusing one over `max_message` bytes.
    pub fn write_message<W: Write>(
        w: &mut W,
        msg: &Message,
        max_message: usize,
    ) -> Result<(), WireError> {
        let mut header = msg.header.clone();
        if !msg.attachments.is_empty() {
            header.insert(
                "attachments".into(),
                Value::Array(msg.attachments.iter().map(Attachment::descriptor).collect()),
            );
        }
        let bytes = serde_json::to_vec(&header)
            .map_err(|e| WireError::Malformed(format!("cannot encode the header: {e}")))?;
        let total = 4 + bytes.len() + msg.attachments.iter().map(|a| a.data.len()).sum::<usize>();
        if bytes.len() > MAX_HEADER || total > max_message {
            return Err(WireError::TooLarge(format!(
                "message of {total} bytes (header {}) exceeds the limit",
                bytes.len()
            )));
        }
        let mut head = Vec::with_capacity(4 + bytes.len());
        head.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        head.extend_from_slice(&bytes);
        w.write_all(&head)?;
        for a in &msg.attachments {
            w.write_all(&a.data)?;
        }
        w.flush()?;
        Ok(())
    }

    /// A request header: `{"jsonrpc": "2.0", "id", "method", "params"}`.
    pub fn request(id: u64, method: &str, params: Value) -> Message {
        let mut header = Map::new();
        header.insert("jsonrpc".into(), json!("2.0"));
        header.insert("id".into(), json!(id));
        header.insert("method".into(), json!(method));
        header.insert("params".into(), params);
        Message {
            header,
            attachments: Vec::new(),
        }
    }

    /// A success reply.
    pub fn reply(id: Value, result: Value, attachments: Vec<Attachment>) -> Message {
        let mut header = Map::new();
        header.insert("jsonrpc".into(), json!("2.0"));
        header.insert("id".into(), id);
        header.insert("result".into(), result);
        Message {
            header,
            attachments,
        }
    }

    /// An error reply.
    pub fn error_reply(id: Value, code: i64, message: &str) -> Message {
        let mut header = Map::new();
        header.insert("jsonrpc".into(), json!("2.0"));
        header.insert("id".into(), id);
        header.insert("error".into(), json!({"code": code, "message": message}));
        Message {
            header,
            attachments: Vec::new(),
        }
    }
}

use wire::{Message, WireError};

/// Settings of a [`StemGatewayClient`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StemGatewayOptions {
    /// Deadline of a connect and of every ordinary call (write and reply), s. Default 5 s.
    pub timeout: Duration,
    /// Added to an acquisition's expected duration (frame time, dwell, exposure) to make its
    /// deadline. Default 10 s.
    pub acquisition_margin: Duration,
    /// Largest message accepted, bytes. Default 128 MiB.
    pub max_message_size: usize,
}

impl Default for StemGatewayOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            acquisition_margin: Duration::from_secs(10),
            max_message_size: wire::DEFAULT_MAX_MESSAGE,
        }
    }
}

/// A TCP stream whose reads and writes all end by one deadline.
struct Deadlined<'a> {
    stream: &'a TcpStream,
    until: Instant,
}

impl Deadlined<'_> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "deadline passed",
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.stream).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

/// Why a call failed, before it becomes a [`DriverError`]: transport faults close the
/// connection, error replies do not.
enum CallError {
    /// The connection is no longer in step (closed here).
    Transport(DriverError),
    /// An error reply; the connection stays usable.
    Reply(DriverError),
}

impl CallError {
    fn into_inner(self) -> DriverError {
        match self {
            Self::Transport(e) | Self::Reply(e) => e,
        }
    }
}

/// One connection: a stream and the next request id.
struct Conn {
    stream: TcpStream,
    next_id: u64,
}

/// Everything a connection needs to reach the gateway.
#[derive(Debug, Clone)]
struct Endpoint {
    addrs: Vec<SocketAddr>,
    label: String,
    opts: StemGatewayOptions,
}

impl Endpoint {
    fn connect(&self) -> Result<Conn> {
        let mut last = None;
        for a in &self.addrs {
            match TcpStream::connect_timeout(a, self.opts.timeout) {
                Ok(stream) => {
                    // Small requests must leave at once; a failure to set it costs latency only.
                    let _ = stream.set_nodelay(true);
                    return Ok(Conn { stream, next_id: 1 });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(DriverError::Connection {
            endpoint: self.label.clone(),
            context: "connect".into(),
            reason: match last {
                Some(e) if is_timeout(&e) => {
                    format!("no answer within {} s", self.opts.timeout.as_secs_f64())
                }
                Some(e) => e.to_string(),
                None => "the address resolved to nothing".into(),
            },
        })
    }

    fn wire_error(&self, method: &str, e: WireError, limit: Duration) -> DriverError {
        match e {
            WireError::Io(e) if is_timeout(&e) => DriverError::Timeout {
                command: method.into(),
                seconds: limit.as_secs_f64(),
            },
            WireError::Io(e) => DriverError::Connection {
                endpoint: self.label.clone(),
                context: method.into(),
                reason: e.to_string(),
            },
            WireError::Closed => DriverError::Connection {
                endpoint: self.label.clone(),
                context: method.into(),
                reason: "the gateway closed the connection without replying".into(),
            },
            e => DriverError::Protocol {
                command: method.into(),
                reason: e.to_string(),
            },
        }
    }

    /// Sends one request on `conn` and reads its reply, all within `limit`.
    fn call(
        &self,
        conn: &mut Conn,
        method: &str,
        params: Value,
        limit: Duration,
    ) -> std::result::Result<(Map<String, Value>, Vec<wire::Attachment>), CallError> {
        let id = conn.next_id;
        conn.next_id += 1;
        let mut io = Deadlined {
            stream: &conn.stream,
            until: Instant::now() + limit,
        };
        let max = self.opts.max_message_size;
        let transport = |e| CallError::Transport(self.wire_error(method, e, limit));
        wire::write_message(&mut io, &wire::request(id, method, params), max).map_err(transport)?;
        let Message {
            mut header,
            attachments,
        } = wire::read_message(&mut io, max).map_err(transport)?;
        let protocol = |reason: String| {
            CallError::Transport(DriverError::Protocol {
                command: method.into(),
                reason,
            })
        };
        if let Some(err) = header.remove("error") {
            let code = err.get("code").and_then(Value::as_i64);
            let message = err.get("message").and_then(Value::as_str);
            let (Some(code), Some(message)) = (code, message) else {
                return Err(protocol(format!(
                    "error reply without an integer `code` and a string `message`: {err}"
                )));
            };
            // A request the gateway could not parse may be answered with a null id.
            let rid = header.get("id");
            if rid.is_some_and(|v| v.as_u64() != Some(id) && !v.is_null()) {
                return Err(protocol(format!("reply id {rid:?} ≠ request id {id}")));
            }
            return Err(CallError::Reply(DriverError::Gateway {
                command: method.into(),
                code,
                message: message.into(),
            }));
        }
        match header.get("id").and_then(Value::as_u64) {
            Some(r) if r == id => {}
            other => return Err(protocol(format!("reply id {other:?} ≠ request id {id}"))),
        }
        match header.remove("result") {
            Some(Value::Object(result)) => Ok((result, attachments)),
            Some(other) => Err(protocol(format!("`result` is not an object: {other}"))),
            None => Err(protocol("reply has neither `result` nor `error`".into())),
        }
    }

    /// Opens a fresh connection and sends `make_safe`.
    fn make_safe(&self) -> Result<()> {
        let mut conn = self.connect()?;
        let r = self
            .call(&mut conn, "make_safe", json!({}), self.opts.timeout)
            .map_err(CallError::into_inner)?;
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        match r.0.get("blanked").and_then(Value::as_bool) {
            Some(true) => Ok(()),
            _ => Err(DriverError::Protocol {
                command: "make_safe".into(),
                reason: format!("reply does not confirm `blanked: true`: {:?}", r.0),
            }),
        }
    }
}

/// A [`SafeHandle`] that blanks the beam over its own, fresh connection.
#[derive(Debug, Clone)]
pub struct GatewaySafeHandle {
    endpoint: Endpoint,
    attempts: Arc<AtomicU64>,
}

impl SafeHandle for GatewaySafeHandle {
    fn make_safe(&self) -> Result<()> {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        self.endpoint.make_safe()
    }

    fn describe(&self) -> String {
        self.endpoint.label.clone()
    }
}

/// Scan settings on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct WireScan {
    rows: usize,
    cols: usize,
    pixel_size: f64,
    dwell_time: f64,
    flyback_time: f64,
    center: [f64; 2],
}

impl From<&ScanSettings> for WireScan {
    fn from(s: &ScanSettings) -> Self {
        Self {
            rows: s.rows,
            cols: s.cols,
            pixel_size: s.pixel_size,
            dwell_time: s.dwell_time,
            flyback_time: s.flyback_time,
            center: s.center,
        }
    }
}

impl From<WireScan> for ScanSettings {
    fn from(s: WireScan) -> Self {
        Self {
            rows: s.rows,
            cols: s.cols,
            pixel_size: s.pixel_size,
            dwell_time: s.dwell_time,
            flyback_time: s.flyback_time,
            center: s.center,
        }
    }
}

/// How many of [`Aberrations::NAMES`] (the first: `c10` … `c50`) a reply must carry; the
/// non-round terms after them (`c32` … `phi56`) were added later and read as 0 when absent.
const WIRE_REQUIRED_ABERRATIONS: usize = 9;

/// Aberrations on the wire: an object keyed by [`Aberrations::NAMES`] (m; azimuths rad).
///
/// Decoding requires the first [`WIRE_REQUIRED_ABERRATIONS`] keys, reads a missing C32 … C56
/// key as 0 (a gateway of the first version) and ignores unknown keys (a later version).
/// Encoding writes the nine first keys always and a C32 … C56 key only when it is non-zero, so
/// that a request with the higher-order terms at 0 still suits a first-version gateway (which
/// refuses unknown keys); missing keys are 0 on both sides, so nothing is lost.
#[derive(Debug, Clone, Copy, PartialEq)]
struct WireAberrations(Aberrations);

impl Serialize for WireAberrations {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let values = self.0.values();
        let n = WIRE_REQUIRED_ABERRATIONS
            + values[WIRE_REQUIRED_ABERRATIONS..]
                .iter()
                .filter(|v| **v != 0.0)
                .count();
        let mut m = s.serialize_map(Some(n))?;
        for (i, (k, v)) in Aberrations::NAMES.iter().zip(values).enumerate() {
            if i < WIRE_REQUIRED_ABERRATIONS || v != 0.0 {
                m.serialize_entry(k, &v)?;
            }
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for WireAberrations {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        let m = Map::<String, Value>::deserialize(d)?;
        let mut v = [0.0; Aberrations::COUNT];
        for (i, (k, x)) in Aberrations::NAMES.iter().zip(v.iter_mut()).enumerate() {
            match m.get(*k) {
                Some(val) => {
                    *x = val
                        .as_f64()
                        .ok_or_else(|| D::Error::custom(format!("`{k}` must be a number")))?;
                }
                None if i < WIRE_REQUIRED_ABERRATIONS => return Err(D::Error::missing_field(k)),
                None => {}
            }
        }
        Ok(Self(Aberrations::from_values(v)))
    }
}

impl From<&Aberrations> for WireAberrations {
    fn from(a: &Aberrations) -> Self {
        Self(*a)
    }
}

impl From<WireAberrations> for Aberrations {
    fn from(a: WireAberrations) -> Self {
        a.0
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct WireMeta {
    index: u64,
    t_start: f64,
    duration: f64,
    electrons_per_pixel: f64,
    dose: f64,
}

#[derive(Debug, Deserialize)]
struct WireInfo {
    protocol: u64,
    name: String,
    simulated: bool,
}

#[derive(Debug, Deserialize)]
struct WireStatus {
    clock: f64,
    blanked: bool,
    probe_position: [f64; 2],
    beam_energy: f64,
    beam_current: f64,
    scan: WireScan,
    aberrations: WireAberrations,
}

/// The last values the getters saw, returned when a getter's call fails.
#[derive(Debug, Clone, Copy)]
struct Seen {
    clock: f64,
    blanked: bool,
    probe: [f64; 2],
    beam_energy: f64,
    beam_current: f64,
    scan: ScanSettings,
    aberrations: Aberrations,
}

impl From<WireStatus> for Seen {
    fn from(s: WireStatus) -> Self {
        Self {
            clock: s.clock,
            blanked: s.blanked,
            probe: s.probe_position,
            beam_energy: s.beam_energy,
            beam_current: s.beam_current,
            scan: s.scan.into(),
            aberrations: s.aberrations.into(),
        }
    }
}

/// A STEM behind a gateway speaking `drivers/STEM_GATEWAY.md`, as a [`StemInstrument`].
///
/// ```no_run
/// use scopegym_drivers::stem_gateway::{StemGatewayClient, StemGatewayOptions};
/// use scopegym_physics::instrument::StemInstrument;
///
/// let mut stem = StemGatewayClient::connect("127.0.0.1:7001", StemGatewayOptions::default())?;
/// stem.set_blanked(false)?;
/// let frame = stem.acquire_frame()?;
/// println!("{} × {} frame, dose {} e⁻/m²", frame.image.nrows(), frame.image.ncols(), frame.meta.dose);
/// stem.make_safe()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct StemGatewayClient {
    endpoint: Endpoint,
    conn: RefCell<Option<Conn>>,
    /// Why the connection was closed, once it was.
    closed: RefCell<Option<String>>,
    /// A fault met by a getter, reported by the next fallible call.
    pending: RefCell<Option<DriverError>>,
    seen: Cell<Seen>,
    info: InstrumentInfo,
    image: Array2<f32>,
    energy: Vec<f64>,
    counts: Vec<f32>,
    safe_attempts: Arc<AtomicU64>,
}

impl std::fmt::Debug for StemGatewayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StemGatewayClient")
            .field("endpoint", &self.endpoint.label)
            .field("info", &self.info)
            .field("closed", &self.closed.borrow())
            .finish_non_exhaustive()
    }
}

impl StemGatewayClient {
    /// Connects to the gateway at `addr` (`host:port`), checks its protocol version (`info`)
    /// and reads its state (`status`).
    ///
    /// Errors: [`DriverError::Connection`] when nothing answers in time, [`DriverError::Protocol`]
    /// when the gateway speaks another protocol version or breaks the protocol.
    pub fn connect(addr: &str, options: StemGatewayOptions) -> Result<Self> {
        let label = format!("stem-gateway://{addr}");
        let bad_option = |reason: &str| DriverError::Connection {
            endpoint: label.clone(),
            context: "options".into(),
            reason: reason.into(),
        };
        if options.timeout.is_zero() {
            return Err(bad_option("timeout must be > 0"));
        }
        if options.max_message_size < 1024 {
            return Err(bad_option("max_message_size must be at least 1024 bytes"));
        }
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| DriverError::Connection {
                endpoint: label.clone(),
                context: "resolve".into(),
                reason: e.to_string(),
            })?
            .collect();
        let endpoint = Endpoint {
            addrs,
            label,
            opts: options,
        };
        let mut conn = endpoint.connect()?;
        let t = options.timeout;
        let (info, _) = endpoint
            .call(&mut conn, "info", json!({}), t)
            .map_err(CallError::into_inner)?;
        let info: WireInfo = decode("info", info)?;
        if info.protocol != PROTOCOL_VERSION {
            return Err(DriverError::Protocol {
                command: "info".into(),
                reason: format!(
                    "the gateway speaks protocol {}, this client {PROTOCOL_VERSION}",
                    info.protocol
                ),
            });
        }
        let (status, _) = endpoint
            .call(&mut conn, "status", json!({}), t)
            .map_err(CallError::into_inner)?;
        let status: WireStatus = decode("status", status)?;
        Ok(Self {
            endpoint,
            conn: RefCell::new(Some(conn)),
            closed: RefCell::new(None),
            pending: RefCell::new(None),
            seen: Cell::new(status.into()),
            info: InstrumentInfo {
                name: info.name,
                kind: InstrumentKind::Stem,
                simulated: info.simulated,
            },
            image: Array2::zeros((0, 0)),
            energy: Vec::new(),
            counts: Vec::new(),
            safe_attempts: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The gateway, as `stem-gateway://host:port`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint.label
    }

    /// How many times this client (or a handle from [`HasSafeHandle::safe_handle`]) has tried
    /// `make_safe` over a fresh connection.
    pub fn make_safe_attempts(&self) -> u64 {
        self.safe_attempts.load(Ordering::Relaxed)
    }

    /// Whether the connection was closed after a fault (every call then fails).
    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// The full state in one call (`status`).
    pub fn status(&self) -> Result<()> {
        let r = self.call("status", json!({}), self.endpoint.opts.timeout)?;
        let s: WireStatus = decode("status", r.0)?;
        self.seen.set(s.into());
        Ok(())
    }

    /// Sends `method` and returns its result; on any failure sends `make_safe` over a fresh
    /// connection first.
    fn call(
        &self,
        method: &str,
        params: Value,
        limit: Duration,
    ) -> Result<(Map<String, Value>, Vec<wire::Attachment>)> {
        self.raw_call(method, params, limit)
            .inspect_err(|_| self.safe_after_fault())
    }

    /// [`Self::call`] without the `make_safe`.
    fn raw_call(
        &self,
        method: &str,
        params: Value,
        limit: Duration,
    ) -> Result<(Map<String, Value>, Vec<wire::Attachment>)> {
        if let Some(e) = self.pending.borrow_mut().take() {
            return Err(e);
        }
        let mut slot = self.conn.borrow_mut();
        let Some(conn) = slot.as_mut() else {
            return Err(DriverError::Connection {
                endpoint: self.endpoint.label.clone(),
                context: method.into(),
                reason: format!(
                    "closed after an earlier fault ({}); connect again",
                    self.closed.borrow().as_deref().unwrap_or("unknown")
                ),
            });
        };
        match self.endpoint.call(conn, method, params, limit) {
            Ok(r) => Ok(r),
            Err(CallError::Reply(e)) => Err(e),
            Err(CallError::Transport(e)) => {
                if let Some(c) = slot.take() {
                    let _ = c.stream.shutdown(std::net::Shutdown::Both);
                }
                *self.closed.borrow_mut() = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn safe_after_fault(&self) {
        self.safe_attempts.fetch_add(1, Ordering::Relaxed);
        // The original fault is what the caller needs; a failure here cannot be reported
        // beside it through the traits, and the watchdog keeps trying on its own.
        let _ = self.endpoint.make_safe();
    }

    /// A getter's call: the value, or the last seen one with the fault kept for later.
    fn get<T>(
        &self,
        method: &str,
        pick: impl FnOnce(Map<String, Value>) -> Result<T>,
    ) -> Option<T> {
        let r = self
            .call(method, json!({}), self.endpoint.opts.timeout)
            .and_then(|(m, _)| pick(m));
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                let mut p = self.pending.borrow_mut();
                if p.is_none() && !self.is_closed() {
                    *p = Some(e);
                }
                None
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut Seen)) {
        let mut s = self.seen.get();
        f(&mut s);
        self.seen.set(s);
    }

    /// Deadline of an acquisition expected to take `expected` s.
    fn acquisition_limit(&self, expected: f64) -> Duration {
        let e = if expected.is_finite() && expected > 0.0 {
            Duration::from_secs_f64(expected.min(86_400.0))
        } else {
            Duration::ZERO
        };
        self.endpoint
            .opts
            .timeout
            .max(e + self.endpoint.opts.acquisition_margin)
    }

    /// Decodes a result, sending `make_safe` when it does not follow the spec.
    fn decoded<T: for<'de> Deserialize<'de>>(
        &self,
        method: &str,
        m: Map<String, Value>,
    ) -> Result<T> {
        decode(method, m).inspect_err(|_| self.safe_after_fault())
    }
}

fn decode<T: for<'de> Deserialize<'de>>(method: &str, m: Map<String, Value>) -> Result<T> {
    serde_json::from_value(Value::Object(m)).map_err(|e| DriverError::Protocol {
        command: method.into(),
        reason: format!("unexpected result: {e}"),
    })
}

fn field<T: for<'de> Deserialize<'de>>(
    method: &str,
    key: &str,
    mut m: Map<String, Value>,
) -> Result<T> {
    let v = m.remove(key).ok_or_else(|| DriverError::Protocol {
        command: method.into(),
        reason: format!("result lacks `{key}`"),
    })?;
    serde_json::from_value(v).map_err(|e| DriverError::Protocol {
        command: method.into(),
        reason: format!("`{key}`: {e}"),
    })
}

fn pe(e: DriverError) -> PhysicsError {
    e.into()
}

impl StemInstrument for StemGatewayClient {
    fn info(&self) -> InstrumentInfo {
        self.info.clone()
    }

    fn clock(&self) -> f64 {
        match self.get("clock", |m| field("clock", "clock", m)) {
            Some(c) => {
                self.update(|s| s.clock = c);
                c
            }
            None => self.seen.get().clock,
        }
    }

    fn beam_energy(&self) -> f64 {
        let _ = self.get("status", |m| {
            let s: WireStatus = decode("status", m)?;
            self.seen.set(s.into());
            Ok(())
        });
        self.seen.get().beam_energy
    }

    fn beam_current(&self) -> f64 {
        let _ = self.get("status", |m| {
            let s: WireStatus = decode("status", m)?;
            self.seen.set(s.into());
            Ok(())
        });
        self.seen.get().beam_current
    }

    fn scan_settings(&self) -> ScanSettings {
        if let Some(s) = self.get("get_scan", |m| decode::<WireScan>("get_scan", m)) {
            self.update(|x| x.scan = s.into());
        }
        self.seen.get().scan
    }

    fn configure_scan(&mut self, request: &ScanSettings) -> scopegym_physics::Result<ScanSettings> {
        let params = serde_json::to_value(WireScan::from(request)).map_err(|e| {
            PhysicsError::arg("request", format!("cannot encode the scan settings: {e}"))
        })?;
        let (m, _) = self
            .call("configure_scan", params, self.endpoint.opts.timeout)
            .map_err(pe)?;
        let s: ScanSettings = self
            .decoded::<WireScan>("configure_scan", m)
            .map_err(pe)?
            .into();
        self.update(|x| x.scan = s);
        Ok(s)
    }

    fn acquire_frame(&mut self) -> scopegym_physics::Result<Frame<'_>> {
        const M: &str = "acquire_frame";
        let limit = self.acquisition_limit(self.seen.get().scan.frame_time());
        let (m, att) = self.call(M, json!({}), limit).map_err(pe)?;
        let decoded = (|| {
            let meta: WireMeta = field(M, "meta", m)?;
            let bad = |reason: String| DriverError::Protocol {
                command: M.into(),
                reason,
            };
            let a = att
                .iter()
                .find(|a| a.name == "image")
                .ok_or_else(|| bad("reply lacks the `image` attachment".into()))?;
            let [rows, cols] = a.shape[..] else {
                return Err(bad(format!("`image` must be 2-D, got shape {:?}", a.shape)));
            };
            let v = a
                .to_f32()
                .ok_or_else(|| bad(format!("`image` must be <f4, got {}", a.dtype.name())))?;
            let img = Array2::from_shape_vec((rows, cols), v)
                .map_err(|e| bad(format!("`image`: {e}")))?;
            Ok((meta, img))
        })();
        let (meta, img) = decoded
            .inspect_err(|_| self.safe_after_fault())
            .map_err(pe)?;
        self.image = img;
        self.update(|s| s.clock = meta.t_start + meta.duration);
        Ok(Frame {
            image: self.image.view(),
            meta: FrameMeta {
                index: meta.index,
                t_start: meta.t_start,
                duration: meta.duration,
                electrons_per_pixel: meta.electrons_per_pixel,
                dose: meta.dose,
            },
        })
    }

    fn probe_position(&self) -> [f64; 2] {
        if let Some(p) = self.get("get_probe_position", |m| {
            field("get_probe_position", "position", m)
        }) {
            self.update(|s| s.probe = p);
        }
        self.seen.get().probe
    }

    fn move_probe(&mut self, position: [f64; 2]) -> scopegym_physics::Result<()> {
        const M: &str = "set_probe_position";
        if !position.iter().all(|v| v.is_finite()) {
            return Err(PhysicsError::arg(
                "position",
                format!("must be finite, got {position:?}"),
            ));
        }
        let (m, _) = self
            .call(M, json!({"position": position}), self.endpoint.opts.timeout)
            .map_err(pe)?;
        let p: [f64; 2] = field(M, "position", m)
            .inspect_err(|_| self.safe_after_fault())
            .map_err(pe)?;
        self.update(|s| s.probe = p);
        Ok(())
    }

    fn acquire_point(&mut self, dwell_time: f64) -> scopegym_physics::Result<f64> {
        const M: &str = "acquire_point";
        if !(dwell_time.is_finite() && dwell_time > 0.0) {
            return Err(PhysicsError::arg(
                "dwell_time",
                format!("must be finite and > 0, got {dwell_time}"),
            ));
        }
        let limit = self.acquisition_limit(dwell_time);
        let (m, _) = self
            .call(M, json!({"dwell_time": dwell_time}), limit)
            .map_err(pe)?;
        field(M, "counts", m)
            .inspect_err(|_| self.safe_after_fault())
            .map_err(pe)
    }

    fn acquire_spectrum(&mut self, exposure: f64) -> scopegym_physics::Result<Spectrum<'_>> {
        const M: &str = "acquire_spectrum";
        if !(exposure.is_finite() && exposure > 0.0) {
            return Err(PhysicsError::arg(
                "exposure",
                format!("must be finite and > 0, got {exposure}"),
            ));
        }
        let limit = self.acquisition_limit(exposure);
        let (_, att) = self
            .call(M, json!({"exposure": exposure}), limit)
            .map_err(pe)?;
        let decoded = (|| {
            let bad = |reason: String| DriverError::Protocol {
                command: M.into(),
                reason,
            };
            let get = |name: &str| {
                att.iter()
                    .find(|a| a.name == name)
                    .filter(|a| a.shape.len() == 1)
                    .ok_or_else(|| bad(format!("reply lacks a 1-D `{name}` attachment")))
            };
            let energy = get("energy")?
                .to_f64()
                .ok_or_else(|| bad("`energy` must be <f8".into()))?;
            let counts = get("counts")?
                .to_f32()
                .ok_or_else(|| bad("`counts` must be <f4".into()))?;
            if energy.len() != counts.len() {
                return Err(bad(format!(
                    "`energy` has {} channels, `counts` {}",
                    energy.len(),
                    counts.len()
                )));
            }
            Ok((energy, counts))
        })();
        let (energy, counts) = decoded
            .inspect_err(|_| self.safe_after_fault())
            .map_err(pe)?;
        self.energy = energy;
        self.counts = counts;
        Ok(Spectrum {
            energy: &self.energy,
            counts: &self.counts,
        })
    }

    fn aberrations(&self) -> Aberrations {
        if let Some(a) = self.get("get_aberrations", |m| {
            decode::<WireAberrations>("get_aberrations", m)
        }) {
            self.update(|s| s.aberrations = a.into());
        }
        self.seen.get().aberrations
    }

    fn set_aberrations(
        &mut self,
        aberrations: &Aberrations,
    ) -> scopegym_physics::Result<Aberrations> {
        const M: &str = "set_aberrations";
        aberrations.validate("aberrations.")?;
        let params = serde_json::to_value(WireAberrations::from(aberrations))
            .map_err(|e| PhysicsError::arg("aberrations", format!("cannot encode: {e}")))?;
        let (m, _) = self
            .call(M, params, self.endpoint.opts.timeout)
            .map_err(pe)?;
        let a: Aberrations = self.decoded::<WireAberrations>(M, m).map_err(pe)?.into();
        self.update(|s| s.aberrations = a);
        Ok(a)
    }

    fn set_blanked(&mut self, blanked: bool) -> scopegym_physics::Result<()> {
        const M: &str = "set_blanked";
        let (m, _) = self
            .call(M, json!({"blanked": blanked}), self.endpoint.opts.timeout)
            .map_err(pe)?;
        let b: bool = field(M, "blanked", m)
            .inspect_err(|_| self.safe_after_fault())
            .map_err(pe)?;
        self.update(|s| s.blanked = b);
        if b != blanked {
            self.safe_after_fault();
            return Err(pe(DriverError::Protocol {
                command: M.into(),
                reason: format!("asked blanked = {blanked}, the gateway reports {b}"),
            }));
        }
        Ok(())
    }

    fn is_blanked(&self) -> bool {
        if let Some(b) = self.get("get_blanked", |m| field("get_blanked", "blanked", m)) {
            self.update(|s| s.blanked = b);
        }
        self.seen.get().blanked
    }

    fn make_safe(&mut self) -> scopegym_physics::Result<()> {
        const M: &str = "make_safe";
        let (m, _) = self
            .call(M, json!({}), self.endpoint.opts.timeout)
            .map_err(pe)?;
        match m.get("blanked").and_then(Value::as_bool) {
            Some(true) => {
                self.update(|s| s.blanked = true);
                Ok(())
            }
            _ => {
                self.safe_after_fault();
                Err(pe(DriverError::Protocol {
                    command: M.into(),
                    reason: format!("reply does not confirm `blanked: true`: {m:?}"),
                }))
            }
        }
    }
}

impl HasSafeHandle for StemGatewayClient {
    fn safe_handle(&self) -> Arc<dyn SafeHandle> {
        Arc::new(GatewaySafeHandle {
            endpoint: self.endpoint.clone(),
            attempts: Arc::clone(&self.safe_attempts),
        })
    }
}

impl NewEpisode for StemGatewayClient {
    /// Sends `start_episode {seed}`: a simulator behind the gateway reseeds (its randomized
    /// parameters go to `info` as `param.<name>`), a lab's shim may move to a fresh area; a
    /// gateway that answers `unsupported` starts nothing.
    fn new_episode(&mut self, seed: u64, info: &mut Info) -> scopegym_envs::Result<()> {
        const M: &str = "start_episode";
        let r = self.raw_call(M, json!({"seed": seed}), self.endpoint.opts.timeout);
        let m = match r {
            Ok((m, _)) => m,
            Err(DriverError::Gateway { code, .. }) if code == codes::UNSUPPORTED => return Ok(()),
            Err(e) => {
                self.safe_after_fault();
                return Err(pe(e).into());
            }
        };
        let params: Map<String, Value> = match m.get("params") {
            None | Some(Value::Null) => Map::new(),
            Some(_) => field(M, "params", m)
                .inspect_err(|_| self.safe_after_fault())
                .map_err(pe)?,
        };
        for (k, v) in params {
            if let Some(x) = v.as_f64() {
                info.insert(format!("param.{k}").into(), InfoValue::F64(x));
            }
        }
        Ok(())
    }
}

/// Ground truth is unknown behind a gateway.
impl ProbeTruth for StemGatewayClient {}
/// Ground truth is unknown behind a gateway.
impl SpectrumTruth for StemGatewayClient {}
/// Ground truth is unknown behind a gateway.
impl DopantTruth for StemGatewayClient {}
/// Ground truth is unknown behind a gateway.
impl FieldTruth for StemGatewayClient {
    fn noiseless_field(
        &mut self,
        _settings: &ScanSettings,
        _scratch: &mut TruthScratch,
        _out: &mut Vec<f64>,
    ) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::wire::*;
    use super::*;

    fn roundtrip(msg: &Message) -> std::result::Result<Message, WireError> {
        let mut buf = Vec::new();
        write_message(&mut buf, msg, DEFAULT_MAX_MESSAGE)?;
        read_message(&mut buf.as_slice(), DEFAULT_MAX_MESSAGE)
    }

    proptest::proptest! {
        /// Every wire type round-trips bit for bit: JSON headers with any finite numbers
        /// (integers, f64 through `float_roundtrip`), strings and nesting, and `<f4` / `<f8`
        /// attachments of any shape and values (NaN bit patterns included).
        #[test]
        fn any_message_round_trips(
            id in proptest::prelude::any::<u64>(),
            method in "[a-z_]{1,20}",
            x in proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO,
            n in proptest::prelude::any::<i64>(),
            text in "\\PC{0,40}",
            rows in 0usize..5,
            cols in 0usize..5,
            bits32 in proptest::collection::vec(proptest::prelude::any::<u32>(), 25),
            bits64 in proptest::collection::vec(proptest::prelude::any::<u64>(), 7),
        ) {
            let mut m = request(id, &method, json!({"x": x, "n": n, "text": text, "nested": [x, {"t": text}]}));
            let f: Vec<f32> = bits32[..rows * cols].iter().map(|b| f32::from_bits(*b)).collect();
            m.attachments.push(Attachment::f32("image", &[rows, cols], &f));
            let g: Vec<f64> = bits64[..rows.min(7)].iter().map(|b| f64::from_bits(*b)).collect();
            m.attachments.push(Attachment::f64("energy", &[g.len()], &g));
            let back = roundtrip(&m).unwrap();
            // Compare bytes (NaN != NaN as floats).
            proptest::prop_assert_eq!(&back.header, &m.header);
            proptest::prop_assert_eq!(back.attachments.len(), 2);
            for (a, b) in back.attachments.iter().zip(&m.attachments) {
                proptest::prop_assert_eq!(&a.name, &b.name);
                proptest::prop_assert_eq!(a.dtype, b.dtype);
                proptest::prop_assert_eq!(&a.shape, &b.shape);
                proptest::prop_assert_eq!(&a.data, &b.data);
            }
        }
    }

    #[test]
    fn a_message_with_attachments_round_trips() {
        let mut m = reply(json!(3), json!({"meta": {"dose": 1.5}}), vec![]);
        m.attachments.push(Attachment::f32(
            "image",
            &[2, 3],
            &[1.0, -2.0, 3.5, 0.0, 1e-30, f32::MAX],
        ));
        m.attachments
            .push(Attachment::f64("energy", &[2], &[0.1, 1e300]));
        let back = roundtrip(&m).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            back.attachment("energy").unwrap().to_f64().unwrap(),
            vec![0.1, 1e300]
        );
    }

    #[test]
    fn the_framing_is_big_endian_length_then_json() {
        let mut buf = Vec::new();
        write_message(&mut buf, &request(1, "info", json!({})), 1 << 20).unwrap();
        let text = br#"{"id":1,"jsonrpc":"2.0","method":"info","params":{}}"#;
        assert_eq!(&buf[..4], &(text.len() as u32).to_be_bytes());
        assert_eq!(&buf[4..], text);
        // Attachments are little-endian.
        let a = Attachment::f32("x", &[1], &[1.0]);
        assert_eq!(a.data, vec![0x00, 0x00, 0x80, 0x3f]);
    }

    #[test]
    fn declared_sizes_over_the_limit_are_refused_before_reading() {
        // A header length of 4 GiB - 1: refused from the four bytes alone.
        let bytes = [0xff, 0xff, 0xff, 0xff];
        let e = read_message(&mut bytes.as_slice(), DEFAULT_MAX_MESSAGE).unwrap_err();
        assert!(matches!(e, WireError::TooLarge(_)), "{e}");
        // An attachment declared at 1 TB (consistent shape), nothing sent after the header.
        let h = br#"{"id":1,"result":{},"attachments":[{"name":"image","dtype":"<f4","shape":[500000,500000],"nbytes":1000000000000}]}"#;
        let mut buf = (h.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(h);
        let e = read_message(&mut buf.as_slice(), DEFAULT_MAX_MESSAGE).unwrap_err();
        assert!(matches!(e, WireError::TooLarge(_)), "{e}");
    }

    #[test]
    fn malformed_headers_name_what_is_wrong() {
        let cases: [(&[u8], &str); 4] = [
            (b"not json", "not JSON"),
            (b"[1,2]", "not a JSON object"),
            (
                br#"{"attachments":[{"name":"a","dtype":"<i4","shape":[1],"nbytes":4}]}"#,
                "dtype",
            ),
            (
                br#"{"attachments":[{"name":"a","dtype":"<f4","shape":[2],"nbytes":4}]}"#,
                "nbytes",
            ),
        ];
        for (h, want) in cases {
            let mut buf = (h.len() as u32).to_be_bytes().to_vec();
            buf.extend_from_slice(h);
            let e = read_message(&mut buf.as_slice(), DEFAULT_MAX_MESSAGE).unwrap_err();
            assert!(e.to_string().contains(want), "{e} lacks {want}");
        }
    }

    #[test]
    fn a_truncated_message_says_how_much_arrived() {
        let mut m = reply(json!(1), json!({}), vec![]);
        m.attachments
            .push(Attachment::f32("image", &[4], &[1.0; 4]));
        let mut buf = Vec::new();
        write_message(&mut buf, &m, DEFAULT_MAX_MESSAGE).unwrap();
        buf.truncate(buf.len() - 3);
        match read_message(&mut buf.as_slice(), DEFAULT_MAX_MESSAGE).unwrap_err() {
            WireError::Truncated {
                part,
                got,
                expected,
            } => {
                assert_eq!((part.as_str(), got, expected), ("image", 13, 16));
            }
            e => panic!("{e}"),
        }
        assert!(matches!(
            read_message(&mut [].as_slice(), 1024),
            Err(WireError::Closed)
        ));
    }

    /// All 25 coefficients, each non-zero and distinct (a valid corrector state).
    fn all_aberrations() -> Aberrations {
        let mut v = [0.0; Aberrations::COUNT];
        for (i, (x, name)) in v.iter_mut().zip(Aberrations::NAMES).enumerate() {
            *x = if name.starts_with("phi") {
                0.1 * (i as f64 + 1.0)
            } else {
                1.25e-9 * (i as f64 + 1.0)
            };
        }
        Aberrations::from_values(v)
    }

    #[test]
    fn aberrations_round_trip_on_the_wire_with_all_coefficients() {
        let a = all_aberrations();
        assert!(a.values().iter().all(|v| *v != 0.0));
        let json = serde_json::to_value(WireAberrations::from(&a)).unwrap();
        let obj = json.as_object().unwrap();
        assert_eq!(obj.len(), Aberrations::COUNT);
        for (k, v) in Aberrations::NAMES.iter().zip(a.values()) {
            assert_eq!(obj[*k].as_f64(), Some(v), "{k}");
        }
        // Through the message encoding too, bit for bit.
        let back = roundtrip(&request(1, "set_aberrations", json)).unwrap();
        let params = back.header["params"].as_object().unwrap().clone();
        let b: Aberrations = decode::<WireAberrations>("set_aberrations", params)
            .unwrap()
            .into();
        assert_eq!(b.values().map(f64::to_bits), a.values().map(f64::to_bits));
    }

    #[test]
    fn first_version_aberration_messages_still_parse() {
        // A reply of a gateway that knows only c10 … c50: the rest is 0.
        let old = json!({"c10": 1e-9, "c12": 2e-9, "phi12": 0.3, "c21": 4e-9, "phi21": 0.5,
            "c23": 6e-9, "phi23": 0.7, "c30": 8e-6, "c50": 9e-3, "future_key": 1.0});
        let a: Aberrations = serde_json::from_value::<WireAberrations>(old)
            .unwrap()
            .into();
        assert_eq!(
            a.values()[..WIRE_REQUIRED_ABERRATIONS],
            [1e-9, 2e-9, 0.3, 4e-9, 0.5, 6e-9, 0.7, 8e-6, 9e-3]
        );
        assert!(
            a.values()[WIRE_REQUIRED_ABERRATIONS..]
                .iter()
                .all(|v| *v == 0.0)
        );
        // A request without higher-order terms carries only the first nine keys.
        let json = serde_json::to_value(WireAberrations::from(&a)).unwrap();
        assert_eq!(json.as_object().unwrap().len(), WIRE_REQUIRED_ABERRATIONS);
        // The first nine are still required in a reply; a non-number is refused by name.
        let e = serde_json::from_value::<WireAberrations>(json!({"c10": 1e-9})).unwrap_err();
        assert!(e.to_string().contains("c12"), "{e}");
        let mut bad = serde_json::to_value(WireAberrations::from(&a)).unwrap();
        bad["c45"] = json!("big");
        let e = serde_json::from_value::<WireAberrations>(bad).unwrap_err();
        assert!(e.to_string().contains("c45"), "{e}");
    }

    #[test]
    fn every_code_has_a_name() {
        for c in [
            -32700, -32600, -32601, -32602, -32603, -32000, -32001, -32002, -32003, -32004,
        ] {
            assert_ne!(codes::name(c), "unknown");
        }
        assert_eq!(codes::name(7), "unknown");
    }

    #[test]
    fn connecting_to_nothing_fails_fast_with_a_clear_error() {
        // Bind and drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Instant::now();
        let e =
            StemGatewayClient::connect(&format!("127.0.0.1:{port}"), StemGatewayOptions::default())
                .unwrap_err();
        assert!(matches!(e, DriverError::Connection { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let p: PhysicsError = e.into();
        assert!(p.to_string().contains(crate::error::DRIVER_PREFIX), "{p}");
    }
}
