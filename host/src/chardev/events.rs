//! The record of a host end's connects and disconnects, each with its [`Instant`]: a history
//! and live subscriptions, shared by an endpoint and its connections.

use crossbeam_channel::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::addr::EndpointKind;

/// What happened on an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointEventKind {
    /// A connection was established (the host end is attached).
    Connected,
    /// vport closed the connection.
    ClosedByHost,
    /// QEMU closed the connection (read end of file, reset, or pty master gone).
    ClosedByPeer,
}

/// One connect or disconnect of a port's host end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointEvent {
    /// Port name.
    pub port: String,
    /// Endpoint kind.
    pub kind: EndpointKind,
    /// Connection number on this endpoint, from 1.
    pub conn: u64,
    /// What happened.
    pub what: EndpointEventKind,
    /// Local monotonic time.
    pub at: Instant,
}

#[derive(Default)]
struct HubInner {
    history: Vec<EndpointEvent>,
    subscribers: Vec<Sender<EndpointEvent>>,
    conns: u64,
}

/// The record of an endpoint's connects and disconnects, shared by the endpoint and its
/// connections. Cheap to clone (one shared log).
#[derive(Clone, Default)]
pub struct EndpointEvents {
    inner: Arc<Mutex<HubInner>>,
}

impl EndpointEvents {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number of the next connection, from 1.
    pub(super) fn next_conn(&self) -> u64 {
        let mut g = self.lock();
        g.conns += 1;
        g.conns
    }

    /// Logs `ev`, sends it to every subscriber and keeps it in the history.
    pub(super) fn record(&self, ev: EndpointEvent) {
        log::debug!("port {}: {} connection {} {:?}", ev.port, ev.kind.name(), ev.conn, ev.what);
        let mut g = self.lock();
        g.subscribers.retain(|tx| tx.send(ev.clone()).is_ok());
        g.history.push(ev);
    }

    /// Every event so far, in order.
    pub fn history(&self) -> Vec<EndpointEvent> {
        self.lock().history.clone()
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> Receiver<EndpointEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.lock().subscribers.push(tx);
        rx
    }
}
