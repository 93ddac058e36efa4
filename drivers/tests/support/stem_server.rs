//! A small STEM gateway in Rust for the tests: serves any simulated [`StemInstrument`] over the
//! protocol of `drivers/STEM_GATEWAY.md` on 127.0.0.1 (ephemeral port), one thread per
//! connection, with one-shot fault injection per method and a record of the requests.

#![allow(dead_code)]

use scopegym_drivers::stem_gateway::codes;
use scopegym_drivers::stem_gateway::wire::{
    self, Attachment, WireError, error_reply, read_message, reply, write_message,
};
use scopegym_envs::tasks::NewEpisode;
use scopegym_envs::{Info, InfoValue};
use scopegym_physics::PhysicsError;
use scopegym_physics::instrument::{ScanSettings, StemInstrument};
use scopegym_physics::stem::optics::Aberrations;
use serde_json::{Map, Value, json};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A fault the server injects once, on the next request for its method.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Wait this long before handling the request (outside the instrument's lock).
    Delay(Duration),
    /// Send the first half of the reply, then close the connection.
    Truncate,
    /// Send a header length of 0xFFFF_FFF0, then nothing.
    HugeHeader,
    /// Declare a 1 TB attachment, send nothing of it.
    HugeAttachment,
    /// Answer with this error.
    ErrorReply(i64, String),
    /// Send a header that is not JSON.
    Garbage,
    /// Answer with another request's id.
    WrongId,
}

/// What the server saw.
#[derive(Debug, Default)]
pub struct Log {
    /// Every method called, in order (all connections).
    pub methods: Vec<String>,
    /// `make_safe` calls, and on which connection (0 = first).
    pub make_safe: Vec<usize>,
    /// Connections accepted.
    pub connections: usize,
}

/// State shared with the test.
pub struct Shared {
    /// One-shot faults by method.
    pub faults: Mutex<Vec<(String, Fault)>>,
    /// What the server saw.
    pub log: Mutex<Log>,
}

impl Shared {
    /// Arms `fault` for the next `method` request.
    pub fn inject(&self, method: &str, fault: Fault) {
        self.faults.lock().unwrap().push((method.into(), fault));
    }

    /// `make_safe` calls so far.
    pub fn make_safe_count(&self) -> usize {
        self.log.lock().unwrap().make_safe.len()
    }

    /// Connections so far.
    pub fn connections(&self) -> usize {
        self.log.lock().unwrap().connections
    }

    fn take_fault(&self, method: &str) -> Option<Fault> {
        let mut f = self.faults.lock().unwrap();
        let i = f.iter().position(|(m, _)| m == method)?;
        Some(f.remove(i).1)
    }
}

/// A running server.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Faults and log.
    pub shared: Arc<Shared>,
}

impl Server {
    /// `host:port`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }
}

/// Serves `inst` until the test process ends.
pub fn serve<I: StemInstrument + NewEpisode + Send + 'static>(inst: I) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let shared = Arc::new(Shared {
        faults: Mutex::new(Vec::new()),
        log: Mutex::new(Log::default()),
    });
    let inst = Arc::new(Mutex::new(inst));
    let sh = Arc::clone(&shared);
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { continue };
            sh.log.lock().unwrap().connections += 1;
            let (sh, inst) = (Arc::clone(&sh), Arc::clone(&inst));
            std::thread::spawn(move || connection(stream, n, &sh, &inst));
        }
    });
    Server { addr, shared }
}

fn connection<I: StemInstrument + NewEpisode>(
    mut stream: TcpStream,
    n: usize,
    sh: &Shared,
    inst: &Mutex<I>,
) {
    let max = wire::DEFAULT_MAX_MESSAGE;
    loop {
        let req = match read_message(&mut stream, max) {
            Ok(m) => m,
            Err(WireError::Closed) => return,
            Err(e) => {
                let _ = write_message(
                    &mut stream,
                    &error_reply(Value::Null, codes::PARSE_ERROR, &e.to_string()),
                    max,
                );
                return;
            }
        };
        let id = req.header.get("id").cloned().unwrap_or(Value::Null);
        let method = req
            .header
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        {
            let mut log = sh.log.lock().unwrap();
            log.methods.push(method.clone());
            if method == "make_safe" {
                log.make_safe.push(n);
            }
        }
        let params = match req.header.get("params") {
            Some(Value::Object(p)) => p.clone(),
            _ => Map::new(),
        };
        let fault = sh.take_fault(&method);
        if let Some(Fault::Delay(d)) = &fault {
            std::thread::sleep(*d);
        }
        let msg = {
            let mut i = inst.lock().unwrap();
            match handle(&mut *i, &method, &params) {
                Ok((result, att)) => reply(id.clone(), result, att),
                Err((code, m)) => error_reply(id.clone(), code, &m),
            }
        };
        let mut bytes = Vec::new();
        match fault {
            None | Some(Fault::Delay(_)) => write_message(&mut bytes, &msg, max).unwrap(),
            Some(Fault::Truncate) => {
                write_message(&mut bytes, &msg, max).unwrap();
                bytes.truncate(bytes.len() / 2);
                let _ = stream.write_all(&bytes);
                return;
            }
            Some(Fault::HugeHeader) => {
                let _ = stream.write_all(&0xFFFF_FFF0u32.to_be_bytes());
                std::thread::sleep(Duration::from_millis(200));
                return;
            }
            Some(Fault::HugeAttachment) => {
                let h = json!({"jsonrpc": "2.0", "id": id, "result": {"meta": {}},
                    "attachments": [{"name": "image", "dtype": "<f4", "shape": [500000, 500000], "nbytes": 1_000_000_000_000u64}]});
                let h = serde_json::to_vec(&h).unwrap();
                bytes.extend_from_slice(&(h.len() as u32).to_be_bytes());
                bytes.extend_from_slice(&h);
            }
            Some(Fault::ErrorReply(code, m)) => {
                write_message(&mut bytes, &error_reply(id, code, &m), max).unwrap()
            }
            Some(Fault::Garbage) => {
                bytes.extend_from_slice(&9u32.to_be_bytes());
                bytes.extend_from_slice(b"{garbage}");
            }
            Some(Fault::WrongId) => {
                let mut m = msg;
                m.header.insert("id".into(), json!(999_999));
                write_message(&mut bytes, &m, max).unwrap()
            }
        }
        if stream.write_all(&bytes).is_err() {
            return;
        }
    }
}

type Handled = Result<(Value, Vec<Attachment>), (i64, String)>;

fn physics(e: PhysicsError) -> (i64, String) {
    let code = match e {
        PhysicsError::Refused { .. } => codes::REFUSED,
        _ => codes::INVALID_ARGUMENT,
    };
    (code, e.to_string())
}

fn param<T: serde::de::DeserializeOwned>(
    p: &Map<String, Value>,
    key: &str,
) -> Result<T, (i64, String)> {
    let v = p
        .get(key)
        .cloned()
        .ok_or((codes::INVALID_PARAMS, format!("`{key}` missing")))?;
    serde_json::from_value(v).map_err(|e| (codes::INVALID_PARAMS, format!("`{key}`: {e}")))
}

fn scan_json(s: &ScanSettings) -> Value {
    json!({"rows": s.rows, "cols": s.cols, "pixel_size": s.pixel_size, "dwell_time": s.dwell_time,
        "flyback_time": s.flyback_time, "center": s.center})
}

fn handle<I: StemInstrument + NewEpisode>(
    i: &mut I,
    method: &str,
    p: &Map<String, Value>,
) -> Handled {
    let ok = |v: Value| Ok((v, Vec::new()));
    match method {
        "info" => {
            let info = i.info();
            ok(
                json!({"protocol": 1, "name": info.name, "simulated": info.simulated, "kind": "stem",
                "max_message_size": wire::DEFAULT_MAX_MESSAGE, "methods": []}),
            )
        }
        "status" => ok(json!({"clock": i.clock(), "blanked": i.is_blanked(),
            "probe_position": i.probe_position(), "beam_energy": i.beam_energy(),
            "beam_current": i.beam_current(), "scan": scan_json(&i.scan_settings()),
            "aberrations": serde_json::to_value(i.aberrations()).unwrap()})),
        "clock" => ok(json!({"clock": i.clock()})),
        "get_probe_position" => ok(json!({"position": i.probe_position()})),
        "set_probe_position" => {
            let pos: [f64; 2] = param(p, "position")?;
            i.move_probe(pos).map_err(physics)?;
            ok(json!({"position": i.probe_position()}))
        }
        "get_scan" => ok(scan_json(&i.scan_settings())),
        "configure_scan" => {
            let req = ScanSettings {
                rows: param(p, "rows")?,
                cols: param(p, "cols")?,
                pixel_size: param(p, "pixel_size")?,
                dwell_time: param(p, "dwell_time")?,
                flyback_time: param(p, "flyback_time")?,
                center: param(p, "center")?,
            };
            let s = i.configure_scan(&req).map_err(physics)?;
            ok(scan_json(&s))
        }
        "acquire_frame" => {
            let f = i.acquire_frame().map_err(physics)?;
            let (r, c) = f.image.dim();
            let v: Vec<f32> = f.image.iter().copied().collect();
            let m = f.meta;
            Ok((
                json!({"meta": {"index": m.index, "t_start": m.t_start, "duration": m.duration,
                    "electrons_per_pixel": m.electrons_per_pixel, "dose": m.dose}}),
                vec![Attachment::f32("image", &[r, c], &v)],
            ))
        }
        "acquire_point" => {
            let d: f64 = param(p, "dwell_time")?;
            ok(json!({"counts": i.acquire_point(d).map_err(physics)?}))
        }
        "acquire_spectrum" => {
            let e: f64 = param(p, "exposure")?;
            let s = i.acquire_spectrum(e).map_err(physics)?;
            let n = s.energy.len();
            Ok((
                json!({}),
                vec![
                    Attachment::f64("energy", &[n], s.energy),
                    Attachment::f32("counts", &[n], s.counts),
                ],
            ))
        }
        "get_aberrations" => ok(serde_json::to_value(i.aberrations()).unwrap()),
        "set_aberrations" => {
            let a: Aberrations = serde_json::from_value(Value::Object(p.clone()))
                .map_err(|e| (codes::INVALID_PARAMS, e.to_string()))?;
            let a = i.set_aberrations(&a).map_err(physics)?;
            ok(serde_json::to_value(a).unwrap())
        }
        "set_blanked" => {
            let b: bool = param(p, "blanked")?;
            i.set_blanked(b).map_err(physics)?;
            ok(json!({"blanked": i.is_blanked()}))
        }
        "get_blanked" => ok(json!({"blanked": i.is_blanked()})),
        "make_safe" => {
            i.make_safe().map_err(physics)?;
            ok(json!({"blanked": i.is_blanked()}))
        }
        "start_episode" => {
            let seed: u64 = param(p, "seed")?;
            let mut info = Info::new();
            i.new_episode(seed, &mut info)
                .map_err(|e| (codes::INSTRUMENT_FAULT, e.to_string()))?;
            let params: Map<String, Value> = info
                .iter()
                .filter_map(|(k, v)| match (k.strip_prefix("param."), v) {
                    (Some(name), InfoValue::F64(x)) => Some((name.to_string(), json!(x))),
                    _ => None,
                })
                .collect();
            ok(json!({"params": params}))
        }
        other => Err((codes::METHOD_NOT_FOUND, format!("no method `{other}`"))),
    }
}

/// A server that accepts connections and never answers (for connect/handshake timeouts).
pub fn silent() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    addr
}
