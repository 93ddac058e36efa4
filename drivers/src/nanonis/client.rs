//! [`NanonisClient`]: the Nanonis TCP client behind the SPM instrument traits.
//!
//! How each trait call maps onto Nanonis commands (types in [`super::command_types`]):
//!
//! | call | commands |
//! |---|---|
//! | `configure_scan` | `Scan.FrameSet`, `Scan.BufferSet`, `Scan.SpeedSet` (time per line kept), then `Scan.FrameGet`, `Scan.BufferGet`, `Scan.SpeedGet` for what was accepted |
//! | `acquire_frame` | `Scan.Action` (start, up), `Scan.WaitEndOfScan`, `Scan.FrameDataGrab` per channel, `ZCtrl.StatusGet` |
//! | `move_probe` | `FolMe.XYPosSet` (f64 positions, wait) |
//! | `set_bias` | `Bias.Set` |
//! | `set_feedback_gains` | `ZCtrl.GainSet` (P, T = P/I, I), `ZCtrl.GainGet` |
//! | `set_withdrawn` | `ZCtrl.Withdraw` (true) / `ZCtrl.OnOffSet(1)` (false) |
//! | `condition_tip` pulse | `Bias.Pulse` (absolute, z on hold), `ZCtrl.StatusGet` |
//! | `condition_tip` dip | `TipShaper.PropsSet` (lift = −depth for the dip time, back up by the depth), `TipShaper.Start`, `ZCtrl.StatusGet` |
//! | `bias_pulse` | `FolMe.XYPosSet`, `Bias.Pulse`, `ZCtrl.StatusGet` |
//! | `point_spectroscopy` | `FolMe.XYPosSet`, then per linear segment of the waveform `BiasSpectr.LimitsSet`, `BiasSpectr.PropsSet`, `BiasSpectr.Start` (response = data row 1), `ZCtrl.StatusGet` |
//! | `manipulate` | `ZCtrl.SetpntGet`, `Bias.Get`, `FolMe.SpeedGet`, `FolMe.XYPosSet` (start), `FolMe.SpeedSet`, `Bias.Set`, `ZCtrl.SetpntSet`, then per segment `FolMe.XYPosSet` + `Signals.ValsGet` (Z), then `ZCtrl.SetpntSet`, `Bias.Set`, `FolMe.SpeedSet` (restore), `ZCtrl.StatusGet` (order and safety: the `LateralManipulation` impl of [`NanonisClient`]) |
//!
//! Precision: Nanonis carries positions in `FolMe.*` as `f64` (exact), but the scan frame,
//! scan speed, bias, pulse and tip-shaper values as `f32`; the instrument receives those
//! rounded to `f32` (a relative change below 6e-8), and the client reports the values read
//! back, widened by [`widen`] (0.05 reads as 0.05).
//!
//! The getters of the traits (`bias`, `probe_position`, `scan_settings`, `is_withdrawn`, ...)
//! return what the client last set or read back; the client reads the instrument's state when
//! it connects and after each new episode.

use super::codec::{self, ErrorBlock, HEADER_LEN, Ty, Value, widen};
use super::{ChannelMap, ZSTATUS_HOLD, ZSTATUS_ON, ZSTATUS_SAFE_TIP, command_types};
use crate::error::{DriverError, FaultKind, Result};
use crate::watchdog::{HasSafeHandle, SafeHandle};
use ndarray::Array2;
use scopegym_envs::env::Info;
use scopegym_physics::PhysicsError;
use scopegym_physics::instrument::{
    BiasWriting, Channel, InstrumentInfo, InstrumentKind, LateralManipulation, PointSpectroscopy,
    ScanSettings, SpmFrame, SpmFrameMeta, SpmInstrument, SpmMode, TipConditioning,
};
use scopegym_physics::spm::tip::Conditioning;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest chunk a reply body is read in (and so allocated ahead of its bytes), bytes.
const CHUNK: usize = 64 * 1024;

/// Settings of a [`NanonisClient`].
#[derive(Debug, Clone, PartialEq)]
pub struct NanonisOptions {
    /// Deadline of one command (write, reply header and whole body). Default 10 s.
    pub timeout: Duration,
    /// Deadline of a connection attempt. Default 5 s.
    pub connect_timeout: Duration,
    /// Added to the frame time for a scan's deadline (and to a pulse's or dip's duration).
    /// Default 10 s.
    pub scan_margin: Duration,
    /// Largest reply body accepted, bytes; a header announcing more is a fault. Default 64 MiB.
    pub max_body: usize,
    /// The imaging mode the controller is set up for. Default AFM.
    pub mode: SpmMode,
    /// The image channels to record and where each comes from. Default
    /// [`ChannelMap::defaults`] of `mode` (check the signal indexes for your controller).
    /// Lateral manipulation reads Z from the signal of the forward channel named `"height"`.
    pub channels: Vec<ChannelMap>,
    /// Lateral manipulation: the longest tip step along the path, m. The path is cut into
    /// `N = max(1, ceil(length / manip_step))` equal segments, one `FolMe.XYPosSet` and one Z
    /// reading each. Default 20 pm (the tip step of the simulator's manipulation model, an
    /// eighth of the Ag(111) hollow-site spacing); at most 100 000 segments per path.
    pub manip_step: f64,
    /// Lateral manipulation: the Follow Me speed during the drag, m/s (`FolMe.SpeedSet`, then
    /// the controller's speed is restored); `None` leaves the controller's speed. Default
    /// 1 nm/s (the speed the simulator assumes).
    pub manip_speed: Option<f64>,
    /// Lateral manipulation: the smallest current setpoint, A. A drag whose conductance ×
    /// |bias| is below it is refused before anything is sent: a constant-current feedback
    /// cannot hold a vanishing current (at 0 V it would drive the tip into the sample).
    /// Default 1 pA.
    pub manip_min_current: f64,
}

impl Default for NanonisOptions {
    fn default() -> Self {
        Self::for_mode(SpmMode::Afm)
    }
}

impl NanonisOptions {
    /// The defaults for `mode`, with that mode's default channels.
    pub fn for_mode(mode: SpmMode) -> Self {
        Self {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            scan_margin: Duration::from_secs(10),
            max_body: 64 << 20,
            mode,
            channels: ChannelMap::defaults(mode),
            manip_step: 20e-12,
            manip_speed: Some(1e-9),
            manip_min_current: 1e-12,
        }
    }
}

/// A transport fault: its kind and what happened.
type Fail = (FaultKind, String);

fn io_fail(e: &std::io::Error, what: &str) -> Fail {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => (FaultKind::Timeout, format!("{what}: {e}")),
        _ => (FaultKind::Connection, format!("{what}: {e}")),
    }
}

fn remaining(deadline: Instant, what: &str) -> std::result::Result<Duration, Fail> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err((FaultKind::Timeout, format!("deadline passed while {what}")));
    }
    Ok(left)
}

fn connect(addr: SocketAddr, timeout: Duration) -> std::result::Result<TcpStream, Fail> {
    let s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| io_fail(&e, &format!("connecting to {addr}")))?;
    // Requests are small and answered one at a time: send each at once.
    let _ = s.set_nodelay(true);
    Ok(s)
}

fn write_all(
    s: &mut TcpStream,
    mut buf: &[u8],
    deadline: Instant,
) -> std::result::Result<(), Fail> {
    while !buf.is_empty() {
        let left = remaining(deadline, "sending the request")?;
        s.set_write_timeout(Some(left))
            .map_err(|e| io_fail(&e, "setting the write timeout"))?;
        match s.write(buf) {
            Ok(0) => return Err((FaultKind::Connection, "the peer stopped reading".into())),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(io_fail(&e, "sending the request")),
        }
    }
    Ok(())
}

fn read_exact(
    s: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    what: &str,
) -> std::result::Result<(), Fail> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = remaining(
            deadline,
            &format!("reading {what} ({filled} of {} bytes)", buf.len()),
        )?;
        s.set_read_timeout(Some(left))
            .map_err(|e| io_fail(&e, "setting the read timeout"))?;
        match s.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err((
                    FaultKind::Connection,
                    format!(
                        "the peer closed the connection after {filled} of {} bytes of {what}",
                        buf.len()
                    ),
                ));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(io_fail(&e, &format!("reading {what}"))),
        }
    }
    Ok(())
}

/// Sends one request and reads its reply: the return values of `name` and the error block.
fn exchange(
    s: &mut TcpStream,
    name: &str,
    args: &[Value],
    deadline: Instant,
    max_body: usize,
) -> std::result::Result<(Vec<Value>, ErrorBlock), Fail> {
    let (arg_types, ret_types) = command_types(name)
        .ok_or_else(|| (FaultKind::Protocol, format!("unknown command {name}")))?;
    let types: Vec<Ty> = args.iter().map(Value::ty).collect();
    if types != arg_types {
        return Err((
            FaultKind::Protocol,
            format!("{name} takes {arg_types:?}, given {types:?}"),
        ));
    }
    let body = codec::encode_values(args).map_err(|e| (FaultKind::Protocol, e.0))?;
    let req = codec::encode_request(name, &body).map_err(|e| (FaultKind::Protocol, e.0))?;
    write_all(s, &req, deadline)?;
    let mut h = [0u8; HEADER_LEN];
    read_exact(s, &mut h, deadline, "the reply header")?;
    let (got, size) = codec::decode_reply_header(&h).map_err(|e| (FaultKind::Protocol, e.0))?;
    if got != name {
        return Err((
            FaultKind::Protocol,
            format!("reply is for {got:?}, not {name:?}"),
        ));
    }
    if size > max_body {
        return Err((
            FaultKind::BodyTooLarge,
            format!("reply header announces {size} bytes, over the cap of {max_body}"),
        ));
    }
    let mut body = Vec::with_capacity(size.min(CHUNK));
    while body.len() < size {
        let start = body.len();
        let n = (size - start).min(CHUNK);
        body.resize(start + n, 0);
        read_exact(s, &mut body[start..], deadline, "the reply body")?;
    }
    codec::decode_reply_body(&body, ret_types)
        .map_err(|e| (FaultKind::Protocol, format!("reply body: {e}")))
}

fn ms(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

/// Makes a Nanonis controller safe over its own, fresh connection: sends `ZCtrl.Withdraw`.
#[derive(Debug, Clone)]
pub struct NanonisSafeHandle {
    addr: SocketAddr,
    timeout: Duration,
    connect_timeout: Duration,
}

impl NanonisSafeHandle {
    /// A handle for the controller at `addr`, with a deadline of `timeout` for the withdraw.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Self {
            addr,
            timeout,
            connect_timeout: timeout,
        }
    }

    fn withdraw(&self) -> std::result::Result<(), Fail> {
        let deadline = Instant::now() + self.connect_timeout + self.timeout;
        let mut s = connect(self.addr, self.connect_timeout)?;
        let args = [Value::U32(1), Value::I32(ms(self.timeout))];
        let (_, e) = exchange(&mut s, "ZCtrl.Withdraw", &args, deadline, 1 << 16)?;
        if !e.is_ok() {
            return Err((
                FaultKind::ErrorReply,
                format!("status {}: {}", e.status, e.message),
            ));
        }
        Ok(())
    }
}

impl SafeHandle for NanonisSafeHandle {
    fn make_safe(&self) -> Result<()> {
        self.withdraw()
            .map_err(|(kind, detail)| DriverError::Fault {
                command: "ZCtrl.Withdraw".into(),
                kind,
                detail,
                safe: "this was the make_safe attempt".into(),
            })
    }

    fn describe(&self) -> String {
        format!("nanonis://{}", self.addr)
    }
}

/// Called with the seed at each new episode (see [`NanonisClient::on_new_episode`]).
pub type EpisodeHook = Box<dyn FnMut(u64) -> std::result::Result<(), String> + Send>;

/// A client for a Nanonis SPM controller (TCP programming interface, DESIGN.md §10),
/// implementing [`SpmInstrument`], [`TipConditioning`], [`BiasWriting`],
/// [`PointSpectroscopy`] and [`LateralManipulation`]. See the [module docs](super) for timeouts and faults.
///
/// ```
/// use scopegym_drivers::nanonis::{FakeNanonis, NanonisClient, NanonisOptions};
/// use scopegym_physics::instrument::{SpmInstrument, SpmMode};
/// use scopegym_physics::param::Region;
/// use scopegym_physics::spm::sim::SpmConfig;
///
/// let fake = FakeNanonis::from_config(SpmConfig::default(), Region::default()).unwrap();
/// let mut c = NanonisClient::connect(&fake.url(), NanonisOptions::for_mode(SpmMode::Afm)).unwrap();
/// assert_eq!(c.set_bias(0.5).unwrap(), 0.5);
/// assert_eq!(fake.log().last().unwrap().name, "Bias.Set");
/// ```
pub struct NanonisClient {
    addr: SocketAddr,
    opts: NanonisOptions,
    stream: Option<TcpStream>,
    safe: Arc<NanonisSafeHandle>,
    hook: Option<EpisodeHook>,
    t0: Instant,
    bias: f64,
    probe: [f64; 2],
    gains: (f64, f64),
    withdrawn: bool,
    scan: ScanSettings,
    channels: Vec<Channel>,
    frames: u64,
    sent: u64,
    /// Imaging setpoint and bias (as sent) still to be restored after a manipulation that
    /// failed half-way; applied before the tip is engaged again.
    pending_restore: Option<(f32, f32)>,
}

impl std::fmt::Debug for NanonisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NanonisClient")
            .field("addr", &self.addr)
            .field("opts", &self.opts)
            .field("connected", &self.stream.is_some())
            .field("withdrawn", &self.withdrawn)
            .field("scan", &self.scan)
            .finish_non_exhaustive()
    }
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    let a = addr.strip_prefix("nanonis://").unwrap_or(addr);
    let fail = |detail: String| DriverError::Fault {
        command: "connect".into(),
        kind: FaultKind::Connection,
        detail,
        safe: "not attempted (no address)".into(),
    };
    a.to_socket_addrs()
        .map_err(|e| fail(format!("cannot resolve {a:?}: {e}")))?
        .next()
        .ok_or_else(|| fail(format!("{a:?} resolves to no address")))
}

fn f32_of(v: &Value) -> f64 {
    match v {
        Value::F32(x) => widen(*x),
        Value::F64(x) => *x,
        _ => f64::NAN,
    }
}

impl NanonisClient {
    /// Connects to the controller at `addr` (`"HOST:PORT"` or `"nanonis://HOST:PORT"`; the
    /// Nanonis server listens on ports 6501-6504) and reads its state (bias, tip position,
    /// gains, Z status, scan frame, buffer and speed). Sends nothing that changes state.
    pub fn connect(addr: &str, opts: NanonisOptions) -> Result<Self> {
        let addr = resolve(addr)?;
        if opts.channels.is_empty() {
            return Err(DriverError::Instrument(PhysicsError::arg(
                "channels",
                "map at least one channel",
            )));
        }
        let safe = Arc::new(NanonisSafeHandle {
            addr,
            timeout: opts.timeout,
            connect_timeout: opts.connect_timeout,
        });
        let mut c = Self {
            addr,
            stream: None,
            safe,
            hook: None,
            t0: Instant::now(),
            bias: 0.0,
            probe: [0.0; 2],
            gains: (0.0, 0.0),
            withdrawn: true,
            scan: ScanSettings {
                rows: 0,
                cols: 0,
                pixel_size: 0.0,
                dwell_time: 0.0,
                flyback_time: 0.0,
                center: [0.0; 2],
            },
            channels: Vec::new(),
            frames: 0,
            sent: 0,
            pending_restore: None,
            opts,
        };
        let s =
            connect(addr, c.opts.connect_timeout).map_err(|(kind, detail)| DriverError::Fault {
                command: "connect".into(),
                kind,
                detail,
                safe: "not attempted (never connected)".into(),
            })?;
        c.stream = Some(s);
        c.refresh()?;
        Ok(c)
    }

    /// Sets the function called with the seed at each new episode, before the client re-reads
    /// the controller's state. A real instrument does not reset a sample: a lab may move to a
    /// fresh area here; a test resets the fake server's simulator
    /// ([`FakeNanonis::episode_hook`](super::FakeNanonis::episode_hook)).
    pub fn on_new_episode(&mut self, hook: EpisodeHook) {
        self.hook = Some(hook);
    }

    /// The options in force.
    pub fn options(&self) -> &NanonisOptions {
        &self.opts
    }

    /// The controller's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Commands sent so far (on the main connection).
    pub fn commands_sent(&self) -> u64 {
        self.sent
    }

    /// Sends `name` with `args` (deadline `timeout` from now); returns the reply values. Any
    /// fault is turned into [`DriverError::Fault`] after `make_safe`.
    pub fn call(&mut self, name: &str, args: &[Value], timeout: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let stream = match self.stream.take() {
            Some(s) => s,
            None => match connect(self.addr, self.opts.connect_timeout.min(timeout)) {
                Ok(s) => s,
                Err((kind, detail)) => return Err(self.fault(name, kind, detail)),
            },
        };
        let mut stream = stream;
        self.sent += 1;
        match exchange(&mut stream, name, args, deadline, self.opts.max_body) {
            Ok((values, e)) => {
                self.stream = Some(stream);
                if e.is_ok() {
                    Ok(values)
                } else {
                    Err(self.fault(
                        name,
                        FaultKind::ErrorReply,
                        format!("status {}: {}", e.status, e.message),
                    ))
                }
            }
            // The stream may be out of step: drop it (the next command reconnects).
            Err((kind, detail)) => Err(self.fault(name, kind, detail)),
        }
    }

    fn call_t(&mut self, name: &str, args: &[Value]) -> Result<Vec<Value>> {
        self.call(name, args, self.opts.timeout)
    }

    /// Withdraws the tip over a fresh connection and builds the fault.
    fn fault(&mut self, command: &str, kind: FaultKind, detail: String) -> DriverError {
        let safe = match self.safe.withdraw() {
            Ok(()) => {
                self.withdrawn = true;
                "tip withdrawn (ZCtrl.Withdraw over a fresh connection)".to_string()
            }
            Err((k, d)) => format!("FAILED ({k}: {d}): check the instrument"),
        };
        DriverError::Fault {
            command: command.into(),
            kind,
            detail,
            safe,
        }
    }

    fn protocol(&mut self, command: &str, detail: String) -> DriverError {
        self.stream = None;
        self.fault(command, FaultKind::Protocol, detail)
    }

    /// Checks the Z controller after a tip action: a safe-tip event (status 5) is a fault.
    fn check_status(&mut self, after: &str) -> Result<()> {
        let v = self.call_t("ZCtrl.StatusGet", &[])?;
        let status = match v.first() {
            Some(Value::U16(s)) => *s,
            _ => return Err(self.protocol("ZCtrl.StatusGet", "no status".into())),
        };
        if status == ZSTATUS_SAFE_TIP {
            return Err(self.fault(
                "ZCtrl.StatusGet",
                FaultKind::SafeTip,
                format!("the Z controller reports a safe-tip event (status 5) after {after}"),
            ));
        }
        self.withdrawn = !(status == ZSTATUS_ON || status == ZSTATUS_HOLD);
        Ok(())
    }

    /// Re-reads the controller's state into the client's cache.
    pub fn refresh(&mut self) -> Result<()> {
        let v = self.call_t("Bias.Get", &[])?;
        self.bias = f32_of(&v[0]);
        let v = self.call_t("FolMe.XYPosGet", &[Value::U32(1)])?;
        self.probe = [f32_of(&v[0]), f32_of(&v[1])];
        let v = self.call_t("ZCtrl.GainGet", &[])?;
        self.gains = (f32_of(&v[0]), f32_of(&v[2]));
        self.check_status("connecting")?;
        self.read_scan()?;
        Ok(())
    }

    fn read_scan(&mut self) -> Result<ScanSettings> {
        let f = self.call_t("Scan.FrameGet", &[])?;
        let b = self.call_t("Scan.BufferGet", &[])?;
        let s = self.call_t("Scan.SpeedGet", &[])?;
        let (pixels, lines) = match (&b[1], &b[2]) {
            (Value::I32(p), Value::I32(l)) => (*p, *l),
            _ => (0, 0),
        };
        let (Ok(cols), Ok(rows)) = (usize::try_from(pixels), usize::try_from(lines)) else {
            return Err(self.protocol("Scan.BufferGet", format!("negative size {pixels}×{lines}")));
        };
        let (width, t_line) = (f32_of(&f[2]), f32_of(&s[2]));
        if cols == 0 || rows == 0 || !(width > 0.0) || !(t_line > 0.0) {
            return Err(self.protocol(
                "Scan.FrameGet",
                format!("unusable scan: {cols}×{rows} px, width {width} m, {t_line} s per line"),
            ));
        }
        let acc = ScanSettings {
            rows,
            cols,
            pixel_size: width / cols as f64,
            dwell_time: t_line / cols as f64,
            flyback_time: 0.0,
            center: [f32_of(&f[0]), f32_of(&f[1])],
        };
        if self.channels.first().map(|c| c.image.dim()) != Some((rows, cols)) {
            self.channels = self
                .opts
                .channels
                .iter()
                .map(|m| Channel {
                    name: m.name.clone(),
                    units: m.units.clone(),
                    quantity: m.quantity.clone(),
                    image: Array2::zeros((rows, cols)),
                })
                .collect();
        }
        self.scan = acc;
        Ok(acc)
    }

    fn engaged(&self, what: &str) -> Result<()> {
        if self.withdrawn {
            return Err(DriverError::Instrument(PhysicsError::Refused {
                operation: what.into(),
                reason: "the tip is withdrawn".into(),
            }));
        }
        Ok(())
    }

    fn deadline_for(&self, seconds: f64) -> Duration {
        self.opts.timeout + self.opts.scan_margin + Duration::from_secs_f64(seconds.clamp(0.0, 1e6))
    }

    fn pulse(&mut self, bias: f64, duration: f64) -> Result<()> {
        let args = [
            Value::U32(1),
            Value::F32(duration as f32),
            Value::F32(bias as f32),
            Value::U16(1),
            Value::U16(2),
        ];
        self.call("Bias.Pulse", &args, self.deadline_for(duration))?;
        self.check_status("Bias.Pulse")
    }

    fn frame(&mut self) -> Result<SpmFrameMeta> {
        self.engaged("acquire_frame")?;
        let s = self.scan;
        let frame_time = s.rows as f64 * (2.0 * s.cols as f64 * s.dwell_time + s.flyback_time);
        let t_start = self.clock();
        self.call_t("Scan.Action", &[Value::U16(0), Value::U32(1)])?;
        let wait = Duration::from_secs_f64(frame_time.clamp(0.0, 1e6)) + self.opts.scan_margin;
        let v = self.call(
            "Scan.WaitEndOfScan",
            &[Value::I32(ms(wait))],
            wait + self.opts.timeout,
        )?;
        if v[0] != Value::U32(0) {
            return Err(self.fault(
                "Scan.WaitEndOfScan",
                FaultKind::Timeout,
                format!("the scan did not end within {} s", wait.as_secs_f64()),
            ));
        }
        for i in 0..self.channels.len() {
            let m = self.opts.channels[i].clone();
            let args = [Value::U32(m.signal), Value::U32(u32::from(!m.backward))];
            let v = self.call_t("Scan.FrameDataGrab", &args)?;
            let Value::Arr2F32(data) = &v[1] else {
                return Err(self.protocol("Scan.FrameDataGrab", "no 2-D data".into()));
            };
            if data.dim() != (s.rows, s.cols) {
                let detail = format!(
                    "{}: got {:?} data for a {}×{} scan",
                    m.name,
                    data.dim(),
                    s.rows,
                    s.cols
                );
                return Err(self.protocol("Scan.FrameDataGrab", detail));
            }
            self.channels[i].image.assign(data);
        }
        self.check_status("the frame")?;
        let meta = SpmFrameMeta {
            index: self.frames,
            t_start,
            duration: frame_time,
        };
        self.frames += 1;
        Ok(meta)
    }

    fn spectroscopy(&mut self, position: [f64; 2], waveform: &[f64]) -> Result<Vec<f64>> {
        self.engaged("point_spectroscopy")?;
        if waveform.is_empty()
            || waveform.len() > 100_000
            || !waveform.iter().all(|v| v.is_finite())
        {
            return Err(DriverError::Instrument(PhysicsError::arg(
                "waveform",
                format!("needs 1..=100000 finite points, got {}", waveform.len()),
            )));
        }
        self.goto(position)?;
        let mut out = Vec::with_capacity(waveform.len());
        for seg in linear_segments(waveform) {
            let (a, b) = (waveform[seg.start], waveform[seg.end - 1]);
            let n = seg.len();
            self.call_t(
                "BiasSpectr.LimitsSet",
                &[Value::F32(a as f32), Value::F32(b as f32)],
            )?;
            let props = [
                Value::U16(0),
                Value::I32(1),
                Value::U16(2),
                Value::I32(i32::try_from(n).unwrap_or(i32::MAX)),
                Value::F32(0.0),
                Value::U16(2),
                Value::U16(2),
            ];
            self.call_t("BiasSpectr.PropsSet", &props)?;
            let v = self.call_t(
                "BiasSpectr.Start",
                &[Value::U32(1), Value::Str(String::new())],
            )?;
            let Value::Arr2F32(data) = &v[2] else {
                return Err(self.protocol("BiasSpectr.Start", "no data".into()));
            };
            if data.nrows() < 2 || data.ncols() != n {
                let detail = format!("expected 2×{n} data (bias, response), got {:?}", data.dim());
                return Err(self.protocol("BiasSpectr.Start", detail));
            }
            out.extend(data.row(1).iter().map(|&x| f64::from(x)));
        }
        self.check_status("BiasSpectr.Start")?;
        Ok(out)
    }

    fn goto(&mut self, p: [f64; 2]) -> Result<()> {
        if !p.iter().all(|v| v.is_finite()) {
            return Err(DriverError::Instrument(PhysicsError::arg(
                "position",
                format!("must be finite, got {p:?}"),
            )));
        }
        self.call_t(
            "FolMe.XYPosSet",
            &[Value::F64(p[0]), Value::F64(p[1]), Value::U32(1)],
        )?;
        self.probe = p;
        Ok(())
    }

    /// The Z signal index: the forward channel named `"height"` of the channel map.
    fn z_signal(&self) -> Result<i32> {
        self.opts
            .channels
            .iter()
            .find(|m| m.name == "height" && !m.backward)
            .map(|m| i32::try_from(m.signal).unwrap_or(i32::MAX))
            .ok_or_else(|| {
                DriverError::Instrument(PhysicsError::arg(
                    "channels",
                    "lateral manipulation reads Z from the forward channel named \"height\"; \
                     map it",
                ))
            })
    }

    fn read_z(&mut self, z: i32) -> Result<f64> {
        let v = self.call_t("Signals.ValsGet", &[Value::ArrI32(vec![z]), Value::U32(1)])?;
        match v.first() {
            Some(Value::ArrF32(a)) if a.len() == 1 => Ok(f64::from(a[0])),
            other => Err(self.protocol(
                "Signals.ValsGet",
                format!("expected one value for signal {z}, got {other:?}"),
            )),
        }
    }

    /// Restores the imaging setpoint, then the imaging bias (see [`LateralManipulation`]
    /// below for why in that order); stops at the first failure, leaving the rest pending.
    fn restore_imaging(&mut self) -> Result<()> {
        let Some((setpoint, bias)) = self.pending_restore else {
            return Ok(());
        };
        self.call_t("ZCtrl.SetpntSet", &[Value::F32(setpoint)])?;
        self.call_t("Bias.Set", &[Value::F32(bias)])?;
        self.bias = widen(bias);
        self.pending_restore = None;
        Ok(())
    }

    fn manipulation(
        &mut self,
        start: [f64; 2],
        end: [f64; 2],
        bias: f64,
        conductance: f64,
    ) -> Result<Vec<f64>> {
        self.engaged("manipulate")?;
        let bad = |n: &str, r: String| Err(DriverError::Instrument(PhysicsError::arg(n, r)));
        if !start.iter().chain(&end).all(|v| v.is_finite()) {
            return bad("path", format!("must be finite, got {start:?} -> {end:?}"));
        }
        if !(conductance.is_finite() && conductance > 0.0) {
            return bad(
                "conductance",
                format!("must be positive, got {conductance} S"),
            );
        }
        let v_m = finite("bias", bias)? as f32;
        let current = conductance * f64::from(v_m).abs();
        if !(current >= self.opts.manip_min_current) {
            return bad(
                "bias",
                format!(
                    "{conductance} S × |{bias} V| = {current} A is below the smallest current \
                     setpoint of {} A (manip_min_current)",
                    self.opts.manip_min_current
                ),
            );
        }
        let step = self.opts.manip_step;
        let len = (end[0] - start[0]).hypot(end[1] - start[1]);
        // A path of exactly k steps (0.3 nm in 20 pm) is k segments despite rounding.
        let n = (len / step * (1.0 - 1e-9)).ceil().max(1.0);
        if !(step > 0.0 && n <= 100_000.0) {
            return bad(
                "path",
                format!("{len} m in steps of {step} m (manip_step) is over 100000 segments"),
            );
        }
        let n = n as usize;
        let z = self.z_signal()?;
        // Imaging conditions, to restore.
        let v = self.call_t("ZCtrl.SetpntGet", &[])?;
        let Some(Value::F32(i_img)) = v.first().cloned() else {
            return Err(self.protocol("ZCtrl.SetpntGet", "no setpoint".into()));
        };
        let v = self.call_t("Bias.Get", &[])?;
        let Some(Value::F32(v_img)) = v.first().cloned() else {
            return Err(self.protocol("Bias.Get", "no bias".into()));
        };
        let v = self.call_t("FolMe.SpeedGet", &[])?;
        let (Some(Value::F32(speed0)), Some(Value::U32(custom0))) =
            (v.first().cloned(), v.get(1).cloned())
        else {
            return Err(self.protocol("FolMe.SpeedGet", "no speed".into()));
        };
        // The current keeps the sign convention of the imaging setpoint.
        let sign = if i_img < 0.0 { -1.0 } else { 1.0 };
        let i_m = (sign * current) as f32;
        // Approach the start at imaging conditions.
        self.goto(start)?;
        if let Some(sp) = self.opts.manip_speed {
            self.call_t("FolMe.SpeedSet", &[Value::F32(sp as f32), Value::U32(1)])?;
        }
        let speed = self.opts.manip_speed.unwrap_or(f64::from(speed0));
        let seg_time = if speed > 0.0 {
            len / n as f64 / speed
        } else {
            0.0
        };
        let seg_deadline = self.opts.timeout + Duration::from_secs_f64(seg_time.clamp(0.0, 1e6));
        self.pending_restore = Some((i_img, v_img));
        let drag = (|| -> Result<Vec<f64>> {
            // Bias first, then the setpoint: the intermediate state is the imaging current at
            // the manipulation bias.
            self.call_t("Bias.Set", &[Value::F32(v_m)])?;
            self.bias = widen(v_m);
            self.call_t("ZCtrl.SetpntSet", &[Value::F32(i_m)])?;
            let mut trace = Vec::with_capacity(n + 1);
            trace.push(self.read_z(z)?);
            for k in 1..=n {
                let p = if k == n {
                    end
                } else {
                    let t = k as f64 / n as f64;
                    [
                        start[0] + t * (end[0] - start[0]),
                        start[1] + t * (end[1] - start[1]),
                    ]
                };
                self.call(
                    "FolMe.XYPosSet",
                    &[Value::F64(p[0]), Value::F64(p[1]), Value::U32(1)],
                    seg_deadline,
                )?;
                self.probe = p;
                trace.push(self.read_z(z)?);
            }
            Ok(trace)
        })();
        // Restore whatever happened (after a fault the tip is already withdrawn; this is best
        // effort, and what fails stays pending until the tip is engaged again).
        let restored = self.restore_imaging();
        let trace = drag?;
        restored?;
        if self.opts.manip_speed.is_some() {
            self.call_t("FolMe.SpeedSet", &[Value::F32(speed0), Value::U32(custom0)])?;
        }
        self.check_status("the manipulation")?;
        Ok(trace)
    }
}

/// Splits `w` into maximal runs of equally spaced values (each run one linear sweep).
fn linear_segments(w: &[f64]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < w.len() {
        let mut end = start + 1;
        if end < w.len() {
            let step = w[end] - w[start];
            end += 1;
            while end < w.len() {
                let d = w[end] - w[end - 1];
                if (d - step).abs() > 1e-9 * step.abs().max(1e-6) {
                    break;
                }
                end += 1;
            }
        }
        out.push(start..end);
        start = end;
    }
    out
}

fn finite(name: &str, v: f64) -> Result<f64, PhysicsError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(PhysicsError::arg(name, format!("must be finite, got {v}")))
    }
}

impl SpmInstrument for NanonisClient {
    fn info(&self) -> InstrumentInfo {
        InstrumentInfo {
            name: format!("Nanonis SPM at nanonis://{}", self.addr),
            kind: InstrumentKind::Spm,
            simulated: false,
        }
    }

    fn mode(&self) -> SpmMode {
        self.opts.mode
    }

    fn clock(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn scan_settings(&self) -> ScanSettings {
        self.scan
    }

    fn configure_scan(&mut self, r: &ScanSettings) -> scopegym_physics::Result<ScanSettings> {
        r.check_spm_request()?;
        let [w, h] = r.field_of_view();
        let t_line = r.cols as f64 * r.dwell_time;
        let speed = w / t_line;
        let frame = [r.center[0], r.center[1], w, h, 0.0].map(|v| Value::F32(v as f32));
        self.call_t("Scan.FrameSet", &frame)?;
        let ch: Vec<i32> = {
            let mut v: Vec<i32> = Vec::new();
            for m in &self.opts.channels {
                let s = i32::try_from(m.signal).unwrap_or(i32::MAX);
                if !v.contains(&s) {
                    v.push(s);
                }
            }
            v
        };
        let dims = |n: usize| Value::I32(i32::try_from(n).unwrap_or(i32::MAX));
        self.call_t(
            "Scan.BufferSet",
            &[Value::ArrI32(ch), dims(r.cols), dims(r.rows)],
        )?;
        let speeds = [
            Value::F32(speed as f32),
            Value::F32(speed as f32),
            Value::F32(t_line as f32),
            Value::F32(t_line as f32),
            Value::U16(2),
            Value::F32(1.0),
        ];
        self.call_t("Scan.SpeedSet", &speeds)?;
        Ok(self.read_scan()?)
    }

    fn acquire_frame(&mut self) -> scopegym_physics::Result<SpmFrame<'_>> {
        let meta = self.frame()?;
        Ok(SpmFrame {
            channels: &self.channels,
            meta,
        })
    }

    fn probe_position(&self) -> [f64; 2] {
        self.probe
    }

    fn move_probe(&mut self, position: [f64; 2]) -> scopegym_physics::Result<()> {
        Ok(self.goto(position)?)
    }

    fn bias(&self) -> f64 {
        self.bias
    }

    fn set_bias(&mut self, bias: f64) -> scopegym_physics::Result<f64> {
        let b = finite("bias", bias)? as f32;
        self.call_t("Bias.Set", &[Value::F32(b)])?;
        self.bias = widen(b);
        Ok(self.bias)
    }

    fn feedback_gains(&self) -> (f64, f64) {
        self.gains
    }

    fn set_feedback_gains(&mut self, p: f64, i: f64) -> scopegym_physics::Result<(f64, f64)> {
        if !(p.is_finite() && i.is_finite() && p >= 0.0 && i >= 0.0) {
            return Err(PhysicsError::arg(
                "gains",
                format!("must be finite and ≥ 0, got P {p}, I {i}"),
            ));
        }
        let t = if i > 0.0 { p / i } else { 0.0 };
        self.call_t(
            "ZCtrl.GainSet",
            &[
                Value::F32(p as f32),
                Value::F32(t as f32),
                Value::F32(i as f32),
            ],
        )?;
        let v = self.call_t("ZCtrl.GainGet", &[])?;
        self.gains = (f32_of(&v[0]), f32_of(&v[2]));
        Ok(self.gains)
    }

    fn is_withdrawn(&self) -> bool {
        self.withdrawn
    }

    fn set_withdrawn(&mut self, withdrawn: bool) -> scopegym_physics::Result<()> {
        if withdrawn {
            let t = self.opts.timeout;
            self.call("ZCtrl.Withdraw", &[Value::U32(1), Value::I32(ms(t))], t + t)?;
        } else {
            // Never engage at a manipulation setpoint left by a failed drag.
            self.restore_imaging()?;
            self.call_t("ZCtrl.OnOffSet", &[Value::U32(1)])?;
        }
        self.withdrawn = withdrawn;
        Ok(())
    }
}

impl TipConditioning for NanonisClient {
    fn condition_tip(&mut self, action: &Conditioning) -> scopegym_physics::Result<()> {
        self.engaged("condition_tip")?;
        match *action {
            Conditioning::Pulse { bias, duration } => {
                finite("bias", bias)?;
                finite("duration", duration)?;
                self.pulse(bias, duration)?;
            }
            Conditioning::Dip {
                depth,
                bias,
                duration,
            } => {
                for (n, v) in [("depth", depth), ("bias", bias), ("duration", duration)] {
                    finite(n, v)?;
                }
                let props = [
                    Value::F32(0.0),
                    Value::U32(1),
                    Value::F32(bias as f32),
                    Value::F32(-depth as f32),
                    Value::F32(duration as f32),
                    Value::F32(bias as f32),
                    Value::F32(0.0),
                    Value::F32(depth as f32),
                    Value::F32(0.0),
                    Value::F32(0.0),
                    Value::U32(1),
                ];
                self.call_t("TipShaper.PropsSet", &props)?;
                let t = self.deadline_for(duration);
                self.call("TipShaper.Start", &[Value::U32(1), Value::I32(ms(t))], t)?;
                self.check_status("TipShaper.Start")?;
            }
        }
        Ok(())
    }
}

impl BiasWriting for NanonisClient {
    fn bias_pulse(
        &mut self,
        position: [f64; 2],
        bias: f64,
        duration: f64,
    ) -> scopegym_physics::Result<()> {
        self.engaged("bias_pulse")?;
        finite("bias", bias)?;
        finite("duration", duration)?;
        self.goto(position)?;
        Ok(self.pulse(bias, duration)?)
    }
}

impl PointSpectroscopy for NanonisClient {
    fn point_spectroscopy(
        &mut self,
        position: [f64; 2],
        waveform: &[f64],
    ) -> scopegym_physics::Result<Vec<f64>> {
        Ok(self.spectroscopy(position, waveform)?)
    }
}

/// Lateral manipulation as an STM operator does it through the Nanonis interface:
///
/// 1. `ZCtrl.SetpntGet`, `Bias.Get`, `FolMe.SpeedGet`: the imaging conditions to restore.
/// 2. `FolMe.XYPosSet(start, wait)` at imaging conditions; `FolMe.SpeedSet(manip_speed,
///    custom)` when [`NanonisOptions::manip_speed`] is set.
/// 3. `Bias.Set(bias)`, then `ZCtrl.SetpntSet(conductance × |bias|)` (feedback stays on, so
///    the tip closes in to the manipulation gap), then `Signals.ValsGet([Z], wait)`.
/// 4. `N` equal segments ([`NanonisOptions::manip_step`]): `FolMe.XYPosSet(p_k, wait)` and
///    `Signals.ValsGet([Z], wait)` each. The height trace returned is these `N + 1` Z readings
///    (m), start included.
/// 5. `ZCtrl.SetpntSet(imaging)`, then `Bias.Set(imaging)`, then `FolMe.SpeedSet` back to the
///    controller's speed, then `ZCtrl.StatusGet` (a safe-tip event is a fault).
///
/// Why this order: going in, the bias changes first at the small imaging current and the
/// current rises last; coming out, the current drops first at the small manipulation bias and
/// the bias rises last. The state in between is, both ways, the imaging current at the
/// manipulation bias, whose gap (conductance `I_img/|V_m|`) lies between the imaging and the
/// manipulation gaps whenever `|V_m| ≤ |V_img|` and `I_img ≤ I_m` (the usual case): the tip
/// moves monotonically towards the sample and back, never passes closer than the drag
/// requires, and the large manipulation current never flows at the large imaging bias.
///
/// The current setpoint keeps the sign of the imaging setpoint. A drag whose current would
/// be below [`NanonisOptions::manip_min_current`] (e.g. at 0 V) is refused before anything is
/// sent; the simulator accepts it, hardware cannot regulate on it.
///
/// Faults: every command has its deadline (a segment gets `timeout` plus its travel time at
/// the drag speed) and a fault withdraws the tip as everywhere else. The imaging setpoint and
/// bias are then restored at once, best effort (over a fresh connection if the old one
/// died); whatever could not be restored is re-sent by `set_withdrawn(false)` before it
/// re-engages, so the tip is never engaged at the manipulation setpoint afterwards. The error
/// returned is the first fault (`driver: <kind>: ...; make_safe: tip withdrawn ...`).
impl LateralManipulation for NanonisClient {
    fn manipulate(
        &mut self,
        start: [f64; 2],
        end: [f64; 2],
        bias: f64,
        conductance: f64,
    ) -> scopegym_physics::Result<Vec<f64>> {
        Ok(self.manipulation(start, end, bias, conductance)?)
    }
}

impl HasSafeHandle for NanonisClient {
    fn safe_handle(&self) -> Arc<dyn SafeHandle> {
        self.safe.clone()
    }
}

impl scopegym_envs::tasks::NewEpisode for NanonisClient {
    fn new_episode(&mut self, seed: u64, _info: &mut Info) -> scopegym_envs::Result<()> {
        if let Some(hook) = self.hook.as_mut() {
            hook(seed).map_err(|e| PhysicsError::Refused {
                operation: "new_episode".into(),
                reason: format!("{}episode hook: {e}", crate::error::DRIVER_PREFIX),
            })?;
        }
        self.frames = 0;
        self.refresh().map_err(PhysicsError::from)?;
        Ok(())
    }
}

impl scopegym_envs::tasks::spm_tip_conditioning::TipTruth for NanonisClient {}
impl scopegym_envs::tasks::afm_feedback_tuning::LoopTruth for NanonisClient {}
impl scopegym_envs::tasks::pfm_spectroscopy_explore::LoopTruth for NanonisClient {}
impl scopegym_envs::tasks::spm_atom_manipulation::AtomTruth for NanonisClient {}
impl scopegym_envs::tasks::pfm_domain_writing::PolarizationTruth for NanonisClient {
    fn true_up(&self, _scan: &ScanSettings) -> Option<Vec<bool>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waveforms_split_into_linear_sweeps() {
        let w = [0.0, 1.0, 2.0, 3.0, 2.0, 1.0, 0.0, 5.0];
        let s = linear_segments(&w);
        assert_eq!(s, vec![0..4, 4..7, 7..8]);
        assert_eq!(linear_segments(&[1.0]), vec![0..1]);
        assert!(linear_segments(&[]).is_empty());
    }
}
