//! When the observer hears of a connection: only once QEMU serves it. A connection waiting in
//! QEMU's listen backlog is not the port's client yet (another client holds the chardev), so
//! its connect, and what the host sends on it, are reported from the moment it is served.

use super::Backlog;
use crate::chardev::{Connection, EndpointKind};
use crate::link::LinkObserver;
use std::sync::{Arc, Mutex};
use vport_common::trace::Direction;
use vport_common::Message;

/// Whether QEMU serves `conn` now ([`Backlog`], never `NotConnected`). A connection QEMU made
/// to vport's listener is served by definition. A connection vport made is asked of the kernel
/// (`sock_diag`, unix sockets only); when the kernel cannot be asked, or for a TCP or pty
/// connection, it is [`Backlog::Unknown`]: never taken as served.
pub(super) fn service(conn: &Connection) -> Backlog {
    match conn.queued() {
        Some(true) => Backlog::Queued,
        Some(false) => Backlog::Served,
        None if matches!(conn.kind(), EndpointKind::UnixServer | EndpointKind::TcpServer) => Backlog::Served,
        None => Backlog::Unknown,
    }
}

/// Stands between a connection's link and the observer until QEMU is known to serve the
/// connection: opened by [`Gate::open`] when the kernel shows it served, or by the first frame
/// from the guest (the proof where the kernel cannot be asked, [`Backlog::Unknown`]). The
/// observer hears of the connect when the gate opens, and of every message after that; what
/// the host sent before is not reported (it waited in QEMU's backlog).
pub(super) struct Gate {
    state: Mutex<GateState>,
}

struct GateState {
    open: bool,
    observer: Option<Arc<dyn LinkObserver>>,
}

impl Gate {
    /// A closed gate reporting to `observer`.
    pub(super) fn new(observer: Option<Arc<dyn LinkObserver>>) -> Arc<Gate> {
        Arc::new(Gate { state: Mutex::new(GateState { open: false, observer }) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the observer heard of the connect (and so must hear of the disconnect).
    pub(super) fn is_open(&self) -> bool {
        self.lock().open
    }

    /// QEMU serves the connection: the observer hears of the connect now, unless it did.
    pub(super) fn open(&self, port: &str) {
        let observer = {
            let mut s = self.lock();
            if s.open {
                return;
            }
            s.open = true;
            s.observer.clone()
        };
        if let Some(o) = observer {
            o.host_connected(port);
        }
    }

    /// Reports to `observer` from now on; if the gate is open, it first hears of the connect.
    pub(super) fn set_observer(&self, port: &str, observer: Arc<dyn LinkObserver>) {
        let open = {
            let mut s = self.lock();
            s.observer = Some(observer.clone());
            s.open
        };
        if open {
            observer.host_connected(port);
        }
    }
}

impl Gate {
    /// The observer to hear of a frame that went `dir` (`None` while the gate is shut): a
    /// frame from the guest opens the gate (QEMU serves the connection), and the observer
    /// first hears of the connect.
    fn pass(&self, port: &str, dir: Direction) -> Option<Arc<dyn LinkObserver>> {
        let (opened, observer) = {
            let mut s = self.lock();
            let opened = dir == Direction::GuestToHost && !s.open;
            s.open |= opened;
            if !s.open {
                return None;
            }
            (opened, s.observer.clone())
        };
        let observer = observer?;
        if opened {
            observer.host_connected(port);
        }
        Some(observer)
    }
}

impl LinkObserver for Gate {
    fn message(&self, port: &str, dir: Direction, session: u32, msg: &Message, wire_len: u64) {
        if let Some(o) = self.pass(port, dir) {
            o.message(port, dir, session, msg, wire_len);
        }
    }

    fn stale(&self, port: &str, dir: Direction, session: u32, msg: &Message, wire_len: u64) {
        if let Some(o) = self.pass(port, dir) {
            o.stale(port, dir, session, msg, wire_len);
        }
    }

    fn host_connected(&self, port: &str) {
        if let Some(o) = self.lock().observer.clone() {
            o.host_connected(port);
        }
    }

    fn host_disconnected(&self, port: &str, reason: &str) {
        if let Some(o) = self.lock().observer.clone() {
            o.host_disconnected(port, reason);
        }
    }
}
