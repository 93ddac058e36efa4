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
