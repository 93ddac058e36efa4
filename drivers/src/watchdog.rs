//! Making an instrument safe from outside the policy's thread.
//!
//! A policy can stop answering (a crash, a hung Python process, a killed terminal) while the
//! tip is engaged or the beam is unblanked. A [`Watchdog`] runs on its own thread: the policy
//! side [`pets`](Watchdog::pet) it on every command, and when no pet comes within the timeout,
//! or the watchdog is dropped without [`Watchdog::disarm`], it calls [`SafeHandle::make_safe`]
//! (withdraw the tip, blank the beam). A driver gives out a [`SafeHandle`] that works without
//! the policy's connection: the network clients open a fresh connection for it, so a hung or
//! dropped policy connection cannot stop it.

use crate::error::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Puts an instrument in its safe state from any thread (tip withdrawn, beam blanked).
/// Idempotent; may be called while another thread is inside a call to the instrument.
pub trait SafeHandle: Send + Sync {
    /// Withdraws the tip / blanks the beam.
    fn make_safe(&self) -> Result<()>;
    /// What the handle talks to, for the audit log (e.g. `nanonis://127.0.0.1:6501`).
    fn describe(&self) -> String;
}

/// A driver that can give out a [`SafeHandle`].
pub trait HasSafeHandle {
    /// A handle that makes this instrument safe from another thread.
    fn safe_handle(&self) -> Arc<dyn SafeHandle>;
}

/// What the policy side tells the watchdog thread.
#[derive(Debug)]
enum Msg {
    /// A command went out or came back: restart the countdown.
    Pet,
    /// A call to the instrument began (`true`: pause the countdown; the call has its own
    /// deadline) or ended (`false`).
    Busy(bool),
    /// Stop without making the instrument safe (an orderly end that already made it safe, or
    /// that leaves it to the operator).
    Disarm,
    /// Make the instrument safe now and stop.
    SafeAndStop,
}

/// A watchdog thread that makes the instrument safe when the policy side goes quiet for longer
/// than the timeout, or when the watchdog is dropped without [`Watchdog::disarm`] (the policy
/// side ended by an error or a panic). See the module docs.
///
/// It cannot help when the whole process is killed (`SIGKILL`, power loss): the instrument's
/// own protections (the controller's Z limits, the microscope's beam valve) remain the last
/// line.
///
/// ```
/// use scopegym_drivers::watchdog::{SafeHandle, Watchdog};
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::time::Duration;
///
/// #[derive(Default)]
/// struct Count(AtomicUsize);
/// impl SafeHandle for Count {
///     fn make_safe(&self) -> scopegym_drivers::Result<()> {
///         self.0.fetch_add(1, Ordering::SeqCst);
///         Ok(())
///     }
///     fn describe(&self) -> String {
///         "counter".into()
///     }
/// }
///
/// let count = Arc::new(Count::default());
/// let dog = Watchdog::start(count.clone(), Duration::from_millis(50));
/// std::thread::sleep(Duration::from_millis(300)); // the policy went quiet
/// assert!(dog.fired());
/// assert_eq!(count.0.load(Ordering::SeqCst), 1); // once, not once per period
/// dog.disarm();
/// ```
#[derive(Debug)]
pub struct Watchdog {
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    fired: Arc<AtomicBool>,
    timeout: Duration,
}

impl Watchdog {
    /// Starts the thread: `handle.make_safe()` is called when no [`Watchdog::pet`] comes
    /// within `timeout` (outside [`Watchdog::busy`] sections), and on drop.
    pub fn start(handle: Arc<dyn SafeHandle>, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel();
        let fired = Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        let thread = std::thread::Builder::new()
            .name("scopegym-watchdog".into())
            .spawn(move || watch(rx, handle, timeout, flag))
            .ok();
        Self {
            tx: Some(tx),
            thread,
            fired,
            timeout,
        }
    }

    /// The countdown, s.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The policy side is alive: restart the countdown.
    pub fn pet(&self) {
        self.send(Msg::Pet);
    }

    /// Pauses the countdown until the returned guard is dropped: a call to the instrument is in
    /// progress (a frame can take longer than the watchdog's timeout; the call's own deadline
    /// covers a hang). Dropping the guard pets the watchdog.
    pub fn busy(&self) -> Busy<'_> {
        self.send(Msg::Busy(true));
        Busy { dog: self }
    }

    /// Whether the watchdog has made the instrument safe. A guard that shares
    /// [`Watchdog::fired_flag`] refuses every command but `make_safe` from then on.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// The flag that turns true when the watchdog fires (for [`crate::Guarded::watch`]).
    pub fn fired_flag(&self) -> Arc<AtomicBool> {
        self.fired.clone()
    }

    /// Stops the thread without making the instrument safe.
    pub fn disarm(mut self) {
        self.stop(Msg::Disarm);
    }

    /// Makes the instrument safe now and stops the thread.
    pub fn make_safe_and_stop(mut self) {
        self.stop(Msg::SafeAndStop);
    }

    fn send(&self, m: Msg) {
        if let Some(tx) = &self.tx {
            // A dead thread cannot be petted; `fired` tells the caller what happened.
            let _ = tx.send(m);
        }
    }

    fn stop(&mut self, m: Msg) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(m);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop(Msg::SafeAndStop);
    }
}

/// A call in progress (see [`Watchdog::busy`]).
#[derive(Debug)]
pub struct Busy<'a> {
    dog: &'a Watchdog,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.dog.send(Msg::Busy(false));
    }
}

fn watch(
    rx: Receiver<Msg>,
    handle: Arc<dyn SafeHandle>,
    timeout: Duration,
    fired: Arc<AtomicBool>,
) {
    let fire = |fired: &AtomicBool| {
        // Whether or not it succeeds, there is nothing more this thread can do than try; the
        // caller sees `fired` and the next command fails.
        let _ = handle.make_safe();
        fired.store(true, Ordering::SeqCst);
    };
    let mut busy = false;
    let mut deadline = Instant::now() + timeout;
    loop {
        let msg = if busy || fired.load(Ordering::SeqCst) {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        };
        match msg {
            Ok(Msg::Pet) => deadline = Instant::now() + timeout,
            Ok(Msg::Busy(b)) => {
                busy = b;
                deadline = Instant::now() + timeout;
            }
            Ok(Msg::Disarm) => return,
            Ok(Msg::SafeAndStop) | Err(RecvTimeoutError::Disconnected) => {
                fire(&fired);
                return;
            }
            Err(RecvTimeoutError::Timeout) => fire(&fired),
        }
    }
}
