//! [`FakeNanonis`]: a Nanonis TCP server on `127.0.0.1:<ephemeral>` backed by the SPM
//! simulator, for tests of the client (and of anything built on it).
//!
//! It serves the commands of [`super::command_types`] by calling the simulator's instrument
//! traits, so a task run through [`NanonisClient`](super::NanonisClient) drives the same
//! simulator calls, in the same order, as the task run on the simulator directly:
//!
//! - `Scan.FrameSet`, `Scan.BufferSet` and `Scan.SpeedSet` only record the request; the
//!   simulator's `configure_scan` runs once, at the next `Scan.*Get` or scan start, so the
//!   client's three setters make one `configure_scan` as the direct call does.
//! - `Scan.Action` (start) scans a whole frame (`acquire_frame`); `Scan.WaitEndOfScan` answers
//!   at once; `Scan.FrameDataGrab` returns the channel mapped to the signal and direction (the
//!   server uses the same [`ChannelMap`] as the client; the backward channel is stored left to
//!   right, like the forward one).
//! - `Bias.Pulse` is a writing pulse at the tip position (`bias_pulse`) in PFM mode and a
//!   conditioning pulse (`condition_tip`) otherwise; `TipShaper.Start` is a dip of depth
//!   `−tip lift`, bias and duration `lift time 1` from the last `TipShaper.PropsSet`.
//! - `BiasSpectr.Start` runs `point_spectroscopy` at the tip over the linear sweep set by
//!   `BiasSpectr.LimitsSet` and the points of `BiasSpectr.PropsSet`; data row 0 is the bias,
//!   row 1 the response.
//! - `FolMe.XYPosSet` under manipulation conditions (STM mode, tip engaged, `0 < |V| ≤
//!   15 mV` — the domain of the simulator's manipulation model — and a non-zero current
//!   setpoint) drags: the conductance is `|setpoint| / |bias|` and the moves map onto the
//!   simulator's `manipulate` as set by [`DragModel`] (default: a straight run of moves is
//!   one drag). Outside those conditions (e.g. at the 0.1 V imaging bias) it only moves the
//!   tip. The fake sees only what the commands carry: setpoint, bias and positions.
//! - `Signals.ValsGet` / `Signals.ValGet`: Z (the signal of the forward `"height"` channel)
//!   is the true surface height under the tip (no tip shape, no feedback dynamics); signal 0
//!   is the current (the setpoint while engaged); other signals are an error reply.
//! - `ZCtrl.SetpntSet`/`Get` hold the setpoint (STM mode starts at [`IMAGING_CURRENT`]);
//!   `FolMe.SpeedSet`/`Get` hold the Follow Me speed (the simulator's drag takes its own time).
//! - `ZCtrl.StatusGet` answers 2 (on) when engaged, 1 (off) when withdrawn, 5 after an injected
//!   safe-tip event (which also withdraws the simulated tip).
//!
//! Every `f32` argument reaches the simulator through [`widen`] (its shortest decimal form),
//! so a value like 0.05 s per line arrives as 0.05, not 0.0500000007: the simulator's time base
//! has exact boundaries (3.125 controller samples per pixel at 10 lines/s and 32 px) that a
//! plain widening would move, changing heights by picometres.
//!
//! Every request is recorded, decoded, in [`FakeNanonis::log`], with the connection it came on.
//! Faults ([`ServerFault`]) are injected per command and fire once; split and delayed writes
//! ([`FakeNanonis::set_split_writes`]) apply to every reply until turned off.

use super::codec::{self, ErrorBlock, HEADER_LEN, Value, widen};
use super::{ChannelMap, ZSTATUS_OFF, ZSTATUS_ON, ZSTATUS_SAFE_TIP, command_types};
use ndarray::Array2;
use scopegym_physics::instrument::{
    BiasWriting, LateralManipulation, PointSpectroscopy, ScanSettings, SpmInstrument, SpmMode,
    TipConditioning,
};
use scopegym_physics::param::Region;
use scopegym_physics::spm::manipulation::{MAX_BIAS, MAX_CONDUCTANCE};
use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
use scopegym_physics::spm::tip::Conditioning;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest request body the fake accepts, bytes (a larger one closes the connection).
const MAX_REQUEST: usize = 16 << 20;

/// The imaging current setpoint an STM-mode fake starts with, A (100 pA; at the simulator's
/// 0.1 V imaging bias a gap of 1 nA/V, far outside the manipulation regime).
pub const IMAGING_CURRENT: f32 = 100e-12;

/// A fault the server injects into its reply to one command.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerFault {
    /// Reply with a non-zero error status and this message (the command is not executed).
    ErrorReply(String),
    /// Execute, send the header and half the body, then close the connection.
    StopMidBody,
    /// Execute, then send a header announcing a body of `i32::MAX` bytes, a few bytes, and
    /// nothing more (the connection stays open).
    AbsurdBodySize,
    /// Execute, then send 40 bytes of garbage instead of the header (and keep the connection).
    GarbageHeader,
    /// A safe-tip event: this and later `ZCtrl.StatusGet` answer 5 until the next reset, and
    /// the simulated tip is withdrawn. Inject it on `ZCtrl.StatusGet`.
    SafeTip,
    /// Execute, then never answer (the connection stays open until the client closes it).
    Stall,
    /// Execute, then answer after this delay.
    Delay(Duration),
    /// Execute, then write this one reply in pieces of `.0` bytes with `.1` between them.
    Split(usize, Duration),
}

/// How the fake maps tip moves made under manipulation conditions (STM, engaged, `|V| ≤
/// 15 mV`, current setpoint non-zero) onto the simulator's `manipulate`, which models one drag
/// along a straight path as one event (one pick-up draw, one choice of the adatom nearest the
/// start, hops at its own tip steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DragModel {
    /// Consecutive `FolMe.XYPosSet` moves under the same conditions that continue one straight
    /// line are one drag, from where the first began to where the last ended; it runs on the
    /// simulator when a command other than a read (`Signals.Val(s)Get`, `FolMe.XYPosGet`,
    /// `FolMe.Speed*`, `ZCtrl.SetpntGet`, `Bias.Get`, `ZCtrl.StatusGet`) or a move off the line
    /// arrives, typically the `ZCtrl.SetpntSet` that restores the imaging setpoint. Z readings
    /// during the drag therefore show the surface before the adatom moved. Default.
    WholePath,
    /// Every move is its own drag (`manipulate(from, to)` at once): Z readings show the adatom
    /// following the tip, but a path cut into `N` segments gets `N` pick-up draws and `N`
    /// choices of adatom.
    PerSegment,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Drag {
    start: [f64; 2],
    end: [f64; 2],
    bias: f64,
    conductance: f64,
}

/// One request the server received.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedCommand {
    /// Which connection it came on (1 = the first accepted).
    pub connection: u64,
    /// The command name (`"<garbage>"` for an undecodable header).
    pub name: String,
    /// The decoded arguments (empty when they did not decode).
    pub args: Vec<Value>,
}

#[derive(Debug, Default)]
struct Pending {
    frame: Option<[f32; 4]>,
    buffer: Option<(Vec<i32>, usize, usize)>,
    t_line: Option<f32>,
}

#[derive(Debug)]
struct State {
    sim: SpmSimulator,
    channels: Vec<ChannelMap>,
    pending: Pending,
    buffer_channels: Vec<i32>,
    frame: Vec<(String, Array2<f32>)>,
    tip_shaper: Vec<f32>,
    spectr: (f32, f32, usize),
    setpoint: f32,
    folme_speed: (f32, u32),
    drag: Option<Drag>,
    drag_model: DragModel,
    safe_tip: bool,
    log: Vec<LoggedCommand>,
    /// (command, occurrences still to let pass, fault).
    faults: VecDeque<(String, u32, ServerFault)>,
    split: Option<(usize, Duration)>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    connections: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in a handler cannot leave the state half-written in a way that matters to
        // a test; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A fake Nanonis controller (see the [module docs](self)). Stops when dropped.
///
/// ```
/// use scopegym_drivers::nanonis::FakeNanonis;
/// use scopegym_physics::param::Region;
/// use scopegym_physics::spm::sim::SpmConfig;
/// let fake = FakeNanonis::from_config(SpmConfig::default(), Region::default()).unwrap();
/// assert!(fake.url().starts_with("nanonis://127.0.0.1:"));
/// fake.reset(7).unwrap(); // a new episode of the simulator, seed 7
/// assert!(fake.log().is_empty());
/// ```
#[derive(Debug)]
pub struct FakeNanonis {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeNanonis {
    /// Serves `sim` on `127.0.0.1` at an ephemeral port, with the default channels of its mode.
    pub fn start(sim: SpmSimulator) -> std::io::Result<Self> {
        let channels = ChannelMap::defaults(sim.mode());
        Self::start_with_channels(sim, channels)
    }

    /// A simulator built from `config` (seed 0) drawing episodes from `region`, served as by
    /// [`FakeNanonis::start`]. Use the task's `cfg.instrument` and `cfg.split.region()` to
    /// serve what a task would simulate.
    pub fn from_config(config: SpmConfig, region: Region) -> std::io::Result<Self> {
        let mut sim = SpmSimulator::new(config, 0)
            .map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, e.to_string()))?;
        sim.set_region(region);
        Self::start(sim)
    }

    /// Serves `sim` with the channel mapping `channels` (it must match the client's).
    pub fn start_with_channels(
        sim: SpmSimulator,
        channels: Vec<ChannelMap>,
    ) -> std::io::Result<Self> {
        let stm = sim.mode() == SpmMode::Stm;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let mut buffer_channels: Vec<i32> = Vec::new();
        for m in &channels {
            let s = i32::try_from(m.signal).unwrap_or(i32::MAX);
            if !buffer_channels.contains(&s) {
                buffer_channels.push(s);
            }
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                sim,
                channels,
                pending: Pending::default(),
                buffer_channels,
                frame: Vec::new(),
                tip_shaper: vec![0.0; 11],
                spectr: (0.0, 0.0, 0),
                setpoint: if stm { IMAGING_CURRENT } else { 0.0 },
                folme_speed: (1e-9, 0),
                drag: None,
                drag_model: DragModel::WholePath,
                safe_tip: false,
                log: Vec::new(),
                faults: VecDeque::new(),
                split: None,
            }),
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = conn {
                    let id = sh.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let sh = sh.clone();
                    std::thread::spawn(move || serve(s, id, &sh));
                }
            }
        });
        Ok(Self {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `nanonis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nanonis://{}", self.addr)
    }

    /// Every request received so far, in order.
    pub fn log(&self) -> Vec<LoggedCommand> {
        self.shared.lock().log.clone()
    }

    /// Forgets the log.
    pub fn clear_log(&self) {
        self.shared.lock().log.clear();
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Injects `fault` into the reply to the next request named `command` (once).
    pub fn inject(&self, command: &str, fault: ServerFault) {
        self.inject_after(command, 0, fault);
    }

    /// Injects `fault` into the reply to the request named `command` after letting `skip` of
    /// them pass (once): `skip = 3` faults the fourth.
    pub fn inject_after(&self, command: &str, skip: u32, fault: ServerFault) {
        self.shared
            .lock()
            .faults
            .push_back((command.into(), skip, fault));
    }

    /// How `FolMe.XYPosSet` moves under manipulation conditions map onto the simulator
    /// (default [`DragModel::WholePath`]).
    pub fn set_drag_model(&self, model: DragModel) {
        self.shared.lock().drag_model = model;
    }

    /// The Z controller's current setpoint as the server holds it (A in STM mode).
    pub fn setpoint(&self) -> f32 {
        self.shared.lock().setpoint
    }

    /// Writes every reply in pieces of `chunk` bytes with `delay` between them (`None`: whole).
    pub fn set_split_writes(&self, split: Option<(usize, Duration)>) {
        self.shared.lock().split = split.map(|(c, d)| (c.max(1), d));
    }

    /// Starts a new episode of the simulator from `seed` (clears a safe-tip event and any
    /// pending scan settings).
    pub fn reset(&self, seed: u64) -> scopegym_physics::Result<()> {
        let mut st = self.shared.lock();
        st.sim.reset(seed)?;
        st.pending = Pending::default();
        st.safe_tip = false;
        st.frame.clear();
        st.drag = None;
        Ok(())
    }

    /// A hook for [`NanonisClient::on_new_episode`](super::NanonisClient::on_new_episode)
    /// that resets this server's simulator with the episode's seed.
    pub fn episode_hook(&self) -> super::EpisodeHook {
        let sh = self.shared.clone();
        Box::new(move |seed| {
            let mut st = sh.lock();
            st.sim.reset(seed).map_err(|e| e.to_string())?;
            st.pending = Pending::default();
            st.safe_tip = false;
            st.frame.clear();
            st.drag = None;
            Ok(())
        })
    }

    /// Runs `f` on the simulator (e.g. to read its ground truth).
    pub fn with_sim<R>(&self, f: impl FnOnce(&mut SpmSimulator) -> R) -> R {
        f(&mut self.shared.lock().sim)
    }

    /// A cheap handle to the same server state, for use from other threads or closures.
    pub fn handle(&self) -> FakeHandle {
        FakeHandle(self.shared.clone())
    }
}

/// A clonable handle to a [`FakeNanonis`]'s simulator and log (valid while the server runs).
#[derive(Debug, Clone)]
pub struct FakeHandle(Arc<Shared>);

impl FakeHandle {
    /// Runs `f` on the simulator.
    pub fn with_sim<R>(&self, f: impl FnOnce(&mut SpmSimulator) -> R) -> R {
        f(&mut self.0.lock().sim)
    }

    /// Every request received so far.
    pub fn log(&self) -> Vec<LoggedCommand> {
        self.0.lock().log.clone()
    }
}

impl Drop for FakeNanonis {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Reads exactly `buf.len()` bytes, giving up when the server stops or the peer closes.
fn read_full(s: &mut TcpStream, buf: &mut [u8], sh: &Shared) -> bool {
    let mut n = 0;
    while n < buf.len() {
        if sh.stop.load(Ordering::SeqCst) {
            return false;
        }
        match s.read(&mut buf[n..]) {
            Ok(0) => return false,
            Ok(k) => n += k,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Waits until the peer closes or the server stops.
fn linger(s: &mut TcpStream, sh: &Shared) {
    let mut b = [0u8; 256];
    let t0 = Instant::now();
    while !sh.stop.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(120) {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

fn send(s: &mut TcpStream, bytes: &[u8], split: Option<(usize, Duration)>) -> bool {
    match split {
        None => s.write_all(bytes).is_ok(),
        Some((chunk, delay)) => {
            for piece in bytes.chunks(chunk) {
                if s.write_all(piece).and_then(|()| s.flush()).is_err() {
                    return false;
                }
                std::thread::sleep(delay);
            }
            true
        }
    }
}

fn serve(mut s: TcpStream, id: u64, sh: &Shared) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = s.set_nodelay(true);
    loop {
        let mut h = [0u8; HEADER_LEN];
        if !read_full(&mut s, &mut h, sh) {
            return;
        }
        let header = match codec::decode_request_header(&h) {
            Ok(h) if h.body_size <= MAX_REQUEST => h,
            _ => {
                sh.lock().log.push(LoggedCommand {
                    connection: id,
                    name: "<garbage>".into(),
                    args: Vec::new(),
                });
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
        };
        let mut body = vec![0u8; header.body_size];
        if !read_full(&mut s, &mut body, sh) {
            return;
        }
        let (reply, fault, split) = {
            let mut st = sh.lock();
            let args =
                command_types(&header.name).and_then(|(t, _)| codec::decode_values(&body, t).ok());
            st.log.push(LoggedCommand {
                connection: id,
                name: header.name.clone(),
                args: args.clone().unwrap_or_default(),
            });
            let fault = match st.faults.iter().position(|(c, _, _)| *c == header.name) {
                Some(i) if st.faults[i].1 > 0 => {
                    st.faults[i].1 -= 1;
                    None
                }
                Some(i) => st.faults.remove(i).map(|(_, _, f)| f),
                None => None,
            };
            if fault == Some(ServerFault::SafeTip) {
                st.safe_tip = true;
                let _ = st.sim.set_withdrawn(true);
            }
            let result = match (&fault, args) {
                (Some(ServerFault::ErrorReply(m)), _) => Err(m.clone()),
                (_, None) => Err(format!("{}: unknown command or bad arguments", header.name)),
                (_, Some(a)) => handle(&mut st, &header.name, &a),
            };
            let reply = match result {
                Ok(v) => codec::encode_reply(&header.name, &v, &ErrorBlock::ok()),
                Err(m) => codec::encode_reply(
                    &header.name,
                    &[],
                    &ErrorBlock {
                        status: 1,
                        message: m,
                    },
                ),
            };
            (reply, fault, st.split)
        };
        let Ok(reply) = reply else {
            return;
        };
        if !header.send_response {
            continue;
        }
        match fault {
            Some(ServerFault::StopMidBody) => {
                let cut = HEADER_LEN + (reply.len() - HEADER_LEN) / 2;
                let _ = send(&mut s, &reply[..cut], split);
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
            Some(ServerFault::AbsurdBodySize) => {
                let mut r = reply[..HEADER_LEN].to_vec();
                r[32..36].copy_from_slice(&i32::MAX.to_be_bytes());
                r.extend_from_slice(&reply[HEADER_LEN..(HEADER_LEN + 4).min(reply.len())]);
                let _ = send(&mut s, &r, split);
                linger(&mut s, sh);
                return;
            }
            Some(ServerFault::GarbageHeader) => {
                let garbage: Vec<u8> = (0..HEADER_LEN as u32)
                    .map(|i| (i.wrapping_mul(0x9d) ^ 0xa5) as u8)
                    .collect();
                let _ = send(&mut s, &garbage, split);
                linger(&mut s, sh);
                return;
            }
            Some(ServerFault::Stall) => {
                linger(&mut s, sh);
                return;
            }
            Some(ServerFault::Delay(d)) => std::thread::sleep(d),
            _ => {}
        }
        let split = match fault {
            Some(ServerFault::Split(c, d)) => Some((c.max(1), d)),
            _ => split,
        };
        if !send(&mut s, &reply, split) {
            return;
        }
    }
}

fn f(v: &Value) -> f32 {
    match v {
        Value::F32(x) => *x,
        _ => f32::NAN,
    }
}

/// An `f32` argument as the simulator's `f64` ([`widen`]).
fn w(v: &Value) -> f64 {
    widen(f(v))
}

fn u(v: &Value) -> u32 {
    match v {
        Value::U32(x) => *x,
        Value::U16(x) => u32::from(*x),
        _ => 0,
    }
}

fn e(err: scopegym_physics::PhysicsError) -> String {
    err.to_string()
}

/// The value of signal `i` now: Z (the signal of the forward `"height"` channel) is the true
/// surface height under the tip; signal 0 (current) is the setpoint while engaged, else 0.
fn signal_value(st: &State, i: i32) -> Result<f32, String> {
    let z = st
        .channels
        .iter()
        .find(|m| m.name == "height" && !m.backward)
        .map(|m| i64::from(m.signal));
    if Some(i64::from(i)) == z {
        let p = st.sim.lab_to_sample(st.sim.probe_position());
        return Ok(height_at(st.sim.truth_surface(), st.sim.cell_size(), p));
    }
    if i == 0 {
        return Ok(if st.sim.is_withdrawn() {
            0.0
        } else {
            st.setpoint
        });
    }
    Err(format!("Signals: signal {i} is not simulated by the fake"))
}

/// Bilinear height of a centred grid (row = y, cell `cell` m) at sample position `p`.
fn height_at(g: ndarray::ArrayView2<'_, f32>, cell: f64, p: [f64; 2]) -> f32 {
    let (ny, nx) = g.dim();
    if nx == 0 || ny == 0 {
        return 0.0;
    }
    let fx = (p[0] / cell + 0.5 * nx as f64 - 0.5).clamp(0.0, (nx - 1) as f64);
    let fy = (p[1] / cell + 0.5 * ny as f64 - 0.5).clamp(0.0, (ny - 1) as f64);
    let (j, i) = (fx.floor() as usize, fy.floor() as usize);
    let (j1, i1) = ((j + 1).min(nx - 1), (i + 1).min(ny - 1));
    let (tx, ty) = (fx - j as f64, fy - i as f64);
    let row = |r: usize| f64::from(g[[r, j]]) * (1.0 - tx) + f64::from(g[[r, j1]]) * tx;
    (row(i) * (1.0 - ty) + row(i1) * ty) as f32
}

/// The bias (V) and tunnelling conductance (S) of a drag when the present conditions are
/// inside the simulator's manipulation model: STM, tip engaged, `0 < |V| ≤ 15 mV` and a
/// non-zero current setpoint. The conductance is `|I| / |V|` from the `f32` values the
/// controller holds, and a value above the model's 6 nA/mV by less than the `f32` precision
/// of the two is taken as 6 nA/mV.
fn drag_conditions(st: &State) -> Result<Option<(f64, f64)>, String> {
    if st.sim.mode() != SpmMode::Stm || st.sim.is_withdrawn() {
        return Ok(None);
    }
    let v = st.sim.bias();
    let v32 = f64::from(v as f32).abs();
    if v32 == 0.0 || v.abs() > MAX_BIAS || st.setpoint == 0.0 {
        return Ok(None);
    }
    let mut g = f64::from(st.setpoint).abs() / v32;
    let g_max = MAX_CONDUCTANCE * 1e-6;
    if g > g_max {
        if g <= g_max * (1.0 + 1e-6) {
            g = g_max;
        } else {
            return Err(format!(
                "FolMe.XYPosSet: setpoint {} A at {v} V is {} nA/mV, beyond the simulated \
                 manipulation model (at most {MAX_CONDUCTANCE} nA/mV)",
                st.setpoint,
                g * 1e6
            ));
        }
    }
    Ok(Some((v, g)))
}

/// Whether `q` continues the straight path `s → e` beyond `e`.
fn continues(s: [f64; 2], e: [f64; 2], q: [f64; 2]) -> bool {
    let (d, r) = ([e[0] - s[0], e[1] - s[1]], [q[0] - s[0], q[1] - s[1]]);
    let (ld, lr) = (d[0].hypot(d[1]), r[0].hypot(r[1]));
    let cross = d[0] * r[1] - d[1] * r[0];
    let dot = d[0] * r[0] + d[1] * r[1];
    ld > 0.0 && lr >= ld && dot > 0.0 && cross.abs() <= 1e-9 * ld * lr
}

/// A tip move: a plain move, or part of a drag under manipulation conditions (module docs).
fn folme_move(st: &mut State, q: [f64; 2]) -> Result<(), String> {
    let Some((v, g)) = drag_conditions(st)? else {
        finish_drag(st)?;
        return st.sim.move_probe(q).map_err(e);
    };
    let p = st.sim.probe_position();
    match st.drag_model {
        DragModel::PerSegment => {
            st.sim.manipulate(p, q, v, g).map_err(e)?;
        }
        DragModel::WholePath => {
            let extends = st.drag.as_ref().is_some_and(|d| {
                d.bias == v && d.conductance == g && d.end == p && continues(d.start, d.end, q)
            });
            if extends {
                if let Some(d) = st.drag.as_mut() {
                    d.end = q;
                }
            } else {
                finish_drag(st)?;
                st.drag = Some(Drag {
                    start: p,
                    end: q,
                    bias: v,
                    conductance: g,
                });
            }
            st.sim.move_probe(q).map_err(e)?;
        }
    }
    Ok(())
}

/// Runs the drag collected so far (if any) on the simulator, as one lateral manipulation.
fn finish_drag(st: &mut State) -> Result<(), String> {
    if let Some(d) = st.drag.take() {
        st.sim
            .manipulate(d.start, d.end, d.bias, d.conductance)
            .map_err(|x| format!("the drag {:?} -> {:?}: {x}", d.start, d.end))?;
    }
    Ok(())
}

/// Applies recorded scan settings to the simulator (one `configure_scan`).
fn apply_pending(st: &mut State) -> Result<(), String> {
    let p = std::mem::take(&mut st.pending);
    if p.frame.is_none() && p.buffer.is_none() && p.t_line.is_none() {
        return Ok(());
    }
    let cur = st.sim.scan_settings();
    let (cols, rows) = p
        .buffer
        .as_ref()
        .map_or((cur.cols, cur.rows), |b| (b.1, b.2));
    if let Some((ch, _, _)) = &p.buffer {
        st.buffer_channels = ch.clone();
    }
    let width = p
        .frame
        .map_or(cur.cols as f64 * cur.pixel_size, |fr| widen(fr[2]));
    let t_line = p.t_line.map_or(cur.cols as f64 * cur.dwell_time, widen);
    let center = p
        .frame
        .map_or(cur.center, |fr| [widen(fr[0]), widen(fr[1])]);
    if cols == 0 {
        return Err("Scan.BufferSet: zero pixels".into());
    }
    let req = ScanSettings {
        rows,
        cols,
        pixel_size: width / cols as f64,
        dwell_time: t_line / cols as f64,
        flyback_time: 0.0,
        center,
    };
    st.sim.configure_scan(&req).map_err(e)?;
    Ok(())
}

/// Commands that neither move the tip nor change the conditions: they do not end a drag.
const PASSIVE: [&str; 8] = [
    "Signals.ValsGet",
    "Signals.ValGet",
    "FolMe.XYPosGet",
    "FolMe.SpeedGet",
    "FolMe.SpeedSet",
    "ZCtrl.SetpntGet",
    "Bias.Get",
    "ZCtrl.StatusGet",
];

fn handle(st: &mut State, name: &str, a: &[Value]) -> Result<Vec<Value>, String> {
    let none = Ok(Vec::new());
    if name != "FolMe.XYPosSet" && !PASSIVE.contains(&name) {
        finish_drag(st)?;
    }
    match name {
        "Bias.Set" => {
            st.sim.set_bias(w(&a[0])).map_err(e)?;
            none
        }
        "Bias.Get" => Ok(vec![Value::F32(st.sim.bias() as f32)]),
        "Bias.Pulse" => {
            let (width, bias) = (w(&a[1]), w(&a[2]));
            apply_pending(st)?;
            if st.sim.film().is_some() {
                let p = st.sim.probe_position();
                st.sim.bias_pulse(p, bias, width).map_err(e)?;
            } else {
                let c = Conditioning::Pulse {
                    bias,
                    duration: width,
                };
                st.sim.condition_tip(&c).map_err(e)?;
            }
            none
        }
        "ZCtrl.OnOffSet" => {
            if u(&a[0]) == 1 {
                st.sim.set_withdrawn(false).map_err(e)?;
            }
            none
        }
        "ZCtrl.OnOffGet" => Ok(vec![Value::U32(u32::from(!st.sim.is_withdrawn()))]),
        "ZCtrl.SetpntSet" => {
            st.setpoint = f(&a[0]);
            none
        }
        "ZCtrl.SetpntGet" => Ok(vec![Value::F32(st.setpoint)]),
        "ZCtrl.Withdraw" => {
            st.sim.set_withdrawn(true).map_err(e)?;
            none
        }
        "ZCtrl.StatusGet" => {
            let s = if st.safe_tip {
                ZSTATUS_SAFE_TIP
            } else if st.sim.is_withdrawn() {
                ZSTATUS_OFF
            } else {
                ZSTATUS_ON
            };
            Ok(vec![Value::U16(s)])
        }
        "ZCtrl.GainSet" => {
            st.sim.set_feedback_gains(w(&a[0]), w(&a[2])).map_err(e)?;
            none
        }
        "ZCtrl.GainGet" => {
            let (p, i) = st.sim.feedback_gains();
            let t = if i > 0.0 { p / i } else { 0.0 };
            Ok(vec![
                Value::F32(p as f32),
                Value::F32(t as f32),
                Value::F32(i as f32),
            ])
        }
        "ZCtrl.LimitsSet" => none,
        "Scan.FrameSet" => {
            if f(&a[4]) != 0.0 {
                return Err("Scan.FrameSet: a rotated frame is not simulated".into());
            }
            st.pending.frame = Some([f(&a[0]), f(&a[1]), f(&a[2]), f(&a[3])]);
            none
        }
        "Scan.FrameGet" => {
            apply_pending(st)?;
            let s = st.sim.scan_settings();
            let [w, h] = s.field_of_view();
            Ok([s.center[0], s.center[1], w, h, 0.0]
                .map(|v| Value::F32(v as f32))
                .to_vec())
        }
        "Scan.BufferSet" => {
            let (Value::ArrI32(ch), Value::I32(px), Value::I32(lines)) = (&a[0], &a[1], &a[2])
            else {
                return Err("Scan.BufferSet: bad arguments".into());
            };
            let (Ok(px), Ok(lines)) = (usize::try_from(*px), usize::try_from(*lines)) else {
                return Err("Scan.BufferSet: negative size".into());
            };
            st.pending.buffer = Some((ch.clone(), px, lines));
            none
        }
        "Scan.BufferGet" => {
            apply_pending(st)?;
            let s = st.sim.scan_settings();
            let n = |v: usize| Value::I32(i32::try_from(v).unwrap_or(i32::MAX));
            Ok(vec![
                Value::ArrI32(st.buffer_channels.clone()),
                n(s.cols),
                n(s.rows),
            ])
        }
        "Scan.SpeedSet" => {
            st.pending.t_line = Some(f(&a[2]));
            none
        }
        "Scan.SpeedGet" => {
            apply_pending(st)?;
            let s = st.sim.scan_settings();
            let t = s.cols as f64 * s.dwell_time;
            let v = (s.cols as f64 * s.pixel_size / t) as f32;
            Ok(vec![
                Value::F32(v),
                Value::F32(v),
                Value::F32(t as f32),
                Value::F32(t as f32),
                Value::U16(2),
                Value::F32(1.0),
            ])
        }
        "Scan.Action" => {
            if u(&a[0]) == 0 {
                apply_pending(st)?;
                let fr = st.sim.acquire_frame().map_err(e)?;
                let frame: Vec<(String, Array2<f32>)> = fr
                    .channels
                    .iter()
                    .map(|c| (c.name.clone(), c.image.clone()))
                    .collect();
                st.frame = frame;
            }
            none
        }
        "Scan.WaitEndOfScan" => Ok(vec![Value::U32(0), Value::Str(String::new())]),
        "Scan.FrameDataGrab" => {
            let (sig, fwd) = (u(&a[0]), u(&a[1]) == 1);
            let name = st
                .channels
                .iter()
                .find(|m| m.signal == sig && m.backward != fwd)
                .map(|m| m.name.clone())
                .ok_or_else(|| format!("Scan.FrameDataGrab: signal {sig} is not recorded"))?;
            let data = st
                .frame
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, d)| d.clone())
                .ok_or_else(|| format!("Scan.FrameDataGrab: no {name} data (scan first)"))?;
            Ok(vec![Value::Str(name), Value::Arr2F32(data), Value::U32(1)])
        }
        "FolMe.XYPosSet" => {
            let (Value::F64(x), Value::F64(y)) = (&a[0], &a[1]) else {
                return Err("FolMe.XYPosSet: bad arguments".into());
            };
            folme_move(st, [*x, *y])?;
            none
        }
        "FolMe.SpeedSet" => {
            let sp = f(&a[0]);
            if !(sp.is_finite() && sp > 0.0) {
                return Err(format!("FolMe.SpeedSet: speed {sp} m/s"));
            }
            st.folme_speed = (sp, u(&a[1]));
            none
        }
        "FolMe.SpeedGet" => Ok(vec![
            Value::F32(st.folme_speed.0),
            Value::U32(st.folme_speed.1),
        ]),
        "Signals.ValsGet" => {
            let Value::ArrI32(idx) = &a[0] else {
                return Err("Signals.ValsGet: bad arguments".into());
            };
            let vals = idx
                .iter()
                .map(|&i| signal_value(st, i))
                .collect::<Result<Vec<f32>, String>>()?;
            Ok(vec![Value::ArrF32(vals)])
        }
        "Signals.ValGet" => {
            let Value::I32(i) = a[0] else {
                return Err("Signals.ValGet: bad arguments".into());
            };
            Ok(vec![Value::F32(signal_value(st, i)?)])
        }
        "FolMe.XYPosGet" => {
            let p = st.sim.probe_position();
            Ok(vec![Value::F64(p[0]), Value::F64(p[1])])
        }
        "TipShaper.PropsSet" => {
            st.tip_shaper = a.iter().map(f).collect();
            none
        }
        "TipShaper.Start" => {
            let t = &st.tip_shaper;
            let c = Conditioning::Dip {
                depth: -widen(t[3]),
                bias: widen(t[2]),
                duration: widen(t[4]),
            };
            apply_pending(st)?;
            st.sim.condition_tip(&c).map_err(e)?;
            none
        }
        "BiasSpectr.LimitsSet" => {
            st.spectr.0 = f(&a[0]);
            st.spectr.1 = f(&a[1]);
            none
        }
        "BiasSpectr.PropsSet" => {
            let Value::I32(n) = a[3] else {
                return Err("BiasSpectr.PropsSet: bad arguments".into());
            };
            st.spectr.2 = usize::try_from(n).map_err(|_| "negative points".to_string())?;
            none
        }
        "BiasSpectr.Start" => {
            let (lo, hi, n) = st.spectr;
            if n == 0 || n > 100_000 {
                return Err(format!("BiasSpectr.Start: {n} points"));
            }
            let (lo, hi) = (widen(lo), widen(hi));
            let w: Vec<f64> = (0..n)
                .map(|k| {
                    if n == 1 {
                        lo
                    } else {
                        lo + (hi - lo) * k as f64 / (n - 1) as f64
                    }
                })
                .collect();
            apply_pending(st)?;
            let p = st.sim.probe_position();
            let r = st.sim.point_spectroscopy(p, &w).map_err(e)?;
            let mut data = Array2::zeros((2, n));
            for k in 0..n {
                data[[0, k]] = w[k] as f32;
                data[[1, k]] = r[k] as f32;
            }
            let names = vec!["Bias (V)".to_string(), "Piezoresponse (a.u.)".to_string()];
            let size = names.iter().map(|s| 4 + s.len()).sum::<usize>();
            Ok(vec![
                Value::I32(i32::try_from(size).unwrap_or(i32::MAX)),
                Value::ArrStr(names),
                Value::Arr2F32(data),
                Value::ArrF32(Vec::new()),
            ])
        }
        other => Err(format!("{other}: not served by the fake")),
    }
}
