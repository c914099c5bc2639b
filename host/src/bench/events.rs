//! Event latencies: how soon the host knows of a port's life-cycle events, each way of knowing
//! against a baseline measured in the same run.
//!
//! - **A guest opens or closes a port** (the raw port, through GUEST_OP OPEN / CLOSE; time from
//!   the host's request): QMP `VSERPORT_CHANGE` (the baseline; its receipt time), `query-chardev`
//!   `frontend-open` polled back to back (the first answer in the new state), and the
//!   operation's own GUEST_OP_DONE over the control session (the guest's call returned).
//!   QEMU sends at most one `VSERPORT_CHANGE` per port and second and holds a later one to the
//!   end of that second: each change here is made a full second after the port's last one, so
//!   that the figure is the event's own latency, not the rate limit's.
//! - **The host connects -> READY** (the acknowledged streams' port; time from the connect to
//!   the handshake's end), against the raw 64 B round trip of the same run: what a session
//!   costs in round trips.
//! - **`device_add` -> READY** (a new port in the agent's prefix; time from its `chardev-add` to
//!   the handshake's end), against connect -> READY.
//! - **The host drops a stream's session -> the stream resumed** (an acknowledged host->guest
//!   stream; time from the drop after its first acknowledgement to STREAM_ACCEPT in the next
//!   session, and to the first acknowledgement after it), against connect -> READY.

use super::figures::{Carrier, EventLatency};
use super::{BenchError, PORT_CTL, PORT_RAW, PORT_STREAM, REPLY};
use crate::client::AgentClient;
use crate::qmp::Qmp;
use crate::rig::Rig;
use crate::session::{PortServer, Session};
use crate::stream::to_guest::ToGuest;
use crate::stream::{Control, StreamSide, TransferEvent, TransferOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vport_common::message::{GuestOp, GuestOpDone};
use vport_common::pattern;

/// QEMU's rate limit of `VSERPORT_CHANGE` per port, with a margin.
const VSERPORT_CHANGE_WINDOW: Duration = Duration::from_millis(1100);
/// Longest wait for one event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) const GUEST_OPENS: &str = "guest opens a port";
pub(super) const GUEST_CLOSES: &str = "guest closes a port";
pub(super) const HOST_CONNECTS: &str = "host connects -> READY";
pub(super) const DEVICE_ADD: &str = "device_add -> READY";
pub(super) const RESUMED: &str = "host drops -> stream resumed";
/// The guest file of the stream that is dropped and resumed.
const RESUME_FILE: &str = "bench-resume.bin";
/// Bytes of the stream that is dropped and resumed.
const RESUME_BYTES: usize = 4 << 20;

/// What one guest open or close of the raw port showed.
struct Change {
    qmp: Option<Duration>,
    polled: Option<Duration>,
    done: Duration,
    reply: GuestOpDone,
}

/// The event figures being gathered.
pub(super) struct Events {
    figures: Vec<EventLatency>,
    /// When the raw port last changed (QEMU's rate limit counts from there).
    last_change: Instant,
    hot_ports: u32,
}

impl Events {
    /// Empty figures; the raw port is taken to have changed just now (its open at the start).
    pub(super) fn new(raw_64b_round_trips: &[Duration]) -> Events {
        let figure = |event, by| EventLatency { event, by, samples: Vec::new(), missed: 0 };
        let mut figures = vec![
            figure(GUEST_OPENS, "QMP VSERPORT_CHANGE"),
            figure(GUEST_OPENS, "query-chardev frontend-open (polled)"),
            figure(GUEST_OPENS, "GUEST_OP_DONE (in band)"),
            figure(GUEST_CLOSES, "QMP VSERPORT_CHANGE"),
            figure(GUEST_CLOSES, "query-chardev frontend-open (polled)"),
            figure(GUEST_CLOSES, "GUEST_OP_DONE (in band)"),
            figure(HOST_CONNECTS, "raw 64 B round trip (reference)"),
            figure(HOST_CONNECTS, "HELLO / HELLO_ACK"),
            figure(DEVICE_ADD, "host connects -> READY (reference)"),
            figure(DEVICE_ADD, "chardev-add, device_add, HELLO"),
            figure(RESUMED, "host connects -> READY (reference)"),
            figure(RESUMED, "STREAM_ACCEPT in the next session"),
            figure(RESUMED, "first acknowledgement after it"),
        ];
        figures[6].samples = raw_64b_round_trips.to_vec();
        Events { figures, last_change: Instant::now(), hot_ports: 0 }
    }

    /// The figures.
    pub(super) fn into_figures(self) -> Vec<EventLatency> {
        self.figures
    }

    fn add(&mut self, event: &str, by_prefix: &str, sample: Option<Duration>) {
        if let Some(f) = self.figures.iter_mut().find(|f| f.event == event && f.by.starts_with(by_prefix)) {
            match sample {
                Some(d) => f.samples.push(d),
                None => f.missed += 1,
            }
        }
    }

    /// The guest closes the raw port (its handle `handle`), then opens it again: returns the
    /// new handle.
    pub(super) fn guest_close_and_open(
        &mut self,
        rig: &Rig,
        ctl: &mut Session,
        handle: u32,
    ) -> Result<u32, BenchError> {
        let closed = self.raw_change(rig, ctl, GuestOp::Close { handle }, false)?;
        if closed.reply.ret < 0 {
            return Err(guest_failed("close the raw port", &closed.reply));
        }
        self.record(GUEST_CLOSES, &closed);
        let opened =
            self.raw_change(rig, ctl, GuestOp::Open { port: PORT_RAW.into(), nonblock: false, sigio: false }, true)?;
        let handle = u32::try_from(opened.reply.ret)
            .ok()
            .filter(|h| *h > 0)
            .ok_or_else(|| guest_failed("open the raw port", &opened.reply))?;
        self.record(GUEST_OPENS, &opened);
        Ok(handle)
    }

    fn record(&mut self, event: &'static str, c: &Change) {
        self.add(event, "QMP", c.qmp);
        self.add(event, "query-chardev", c.polled);
        self.add(event, "GUEST_OP_DONE", Some(c.done));
    }

    /// Runs `op` on the raw port, made a full rate-limit window after its last change, and
    /// times the three ways of knowing the port is now open (`open`) or closed.
    fn raw_change(&mut self, rig: &Rig, ctl: &mut Session, op: GuestOp, open: bool) -> Result<Change, BenchError> {
        let port = rig.port(PORT_RAW).map_err(|e| BenchError::Setup(e.to_string()))?;
        let (device, chardev) = (port.id.clone(), port.chardev_id.clone());
        // Waiting out QEMU's rate limit is the measurement's precondition, not a
        // synchronisation: no event is waited for here.
        let quiet = self.last_change + VSERPORT_CHANGE_WINDOW;
        std::thread::sleep(quiet.saturating_duration_since(Instant::now()));
        let events = rig.qmp.subscribe();
        let stop = AtomicBool::new(false);
        let qmp: &Qmp = &rig.qmp;
        let (chardev, stop) = (&chardev, &stop);
        let (change, polled) = std::thread::scope(|scope| {
            let t0 = Instant::now();
            let poller = scope.spawn(move || poll_frontend(qmp, chardev, open, t0, stop));
            let result = (|| {
                let id = ctl.start_guest_op(op)?;
                let reply = ctl.await_guest_op(id, crate::speed::scaled(REPLY))?;
                let done = t0.elapsed();
                let deadline = t0 + crate::speed::scaled(EVENT_TIMEOUT);
                let is_change = |e: &crate::qmp::QmpEvent| {
                    e.name == "VSERPORT_CHANGE"
                        && e.data.get("id").and_then(|v| v.as_str()) == Some(device.as_str())
                        && e.data.get("open").and_then(|v| v.as_bool()) == Some(open)
                };
                let qmp = loop {
                    match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(e) if is_change(&e) => break Some(e.received.saturating_duration_since(t0)),
                        Ok(_) => continue,
                        Err(_) => break None,
                    }
                };
                Ok::<_, BenchError>(Change { qmp, polled: None, done, reply })
            })();
            // The poller has had until the event (or the deadline) to see the new state.
            stop.store(true, Ordering::Relaxed);
            let polled = poller.join();
            (result, polled)
        });
        self.last_change = Instant::now();
        let mut change = change?;
        change.polled = polled.map_err(|_| BenchError::Setup("the query-chardev poller panicked".into()))?;
        Ok(change)
    }

    /// The host connects to the acknowledged streams' port and completes a handshake.
    pub(super) fn host_connects(&mut self, streams: &mut PortServer) -> Result<(), BenchError> {
        streams.disconnect();
        let t0 = Instant::now();
        let session = streams.accept(crate::speed::scaled(EVENT_TIMEOUT))?;
        let took = t0.elapsed();
        drop(session);
        self.add(HOST_CONNECTS, "HELLO", Some(took));
        self.add(DEVICE_ADD, "host connects", Some(took));
        self.add(RESUMED, "host connects", Some(took));
        Ok(())
    }

    /// A new port in the agent's prefix is plugged in and served to READY.
    pub(super) fn device_add(&mut self, rig: &mut Rig) -> Result<(), BenchError> {
        self.hot_ports += 1;
        let name = format!("{PORT_CTL}.hot{}", self.hot_ports);
        let t0 = Instant::now();
        rig.hotplug_serial_port(&name, 0).map_err(|e| BenchError::Setup(format!("hot-plug {name}: {e}")))?;
        let mut server = rig.port_server(&name).map_err(|e| BenchError::Setup(format!("serve {name}: {e}")))?;
        let session = server.accept(crate::speed::scaled(EVENT_TIMEOUT))?;
        let took = t0.elapsed();
        drop(session);
        self.add(DEVICE_ADD, "chardev-add", Some(took));
        Ok(())
    }
}

/// The host sends `local` (the pattern of `seed`) to the guest as an acknowledged stream and
/// drops the session at its first acknowledgement; the stream resumes in the next session.
pub(super) fn drop_and_resume(
    events: &mut Events,
    streams: &mut PortServer,
    local: &Path,
    seed: u64,
    opts: &TransferOptions,
) -> Result<(), BenchError> {
    let mut data = vec![0u8; RESUME_BYTES];
    pattern::fill(seed, 0, &mut data);
    std::fs::write(local, &data).map_err(|e| BenchError::io("write the file to send", e))?;
    let (mut dropped, mut accepted, mut first_ack) = (None::<Instant>, None::<Duration>, None::<Duration>);
    let mut stream = ToGuest::new(PORT_STREAM, local, RESUME_FILE, opts.clone())?;
    let report = stream.run(streams, &mut |event| match (event, dropped) {
        (TransferEvent::Progress { .. }, None) => {
            dropped = Some(Instant::now());
            Control::DropSession
        }
        (TransferEvent::Accepted { .. }, Some(at)) if accepted.is_none() => {
            accepted = Some(at.elapsed());
            Control::Continue
        }
        (TransferEvent::Progress { .. }, Some(at)) if accepted.is_some() && first_ack.is_none() => {
            first_ack = Some(at.elapsed());
            Control::Continue
        }
        _ => Control::Continue,
    })?;
    if report.bytes != RESUME_BYTES as u64 || report.sessions < 2 {
        return Err(BenchError::Integrity(format!(
            "the dropped stream: {} of {RESUME_BYTES} bytes in {} session(s), not resumed in a second",
            report.bytes, report.sessions
        )));
    }
    let mut whole = pattern::StreamDigest::new();
    whole.update(&data);
    if report.digest != whole.digest() {
        return Err(BenchError::Integrity(format!("the resumed stream's digest is {:#018x}", report.digest)));
    }
    events.add(RESUMED, "STREAM_ACCEPT", accepted);
    events.add(RESUMED, "first ack", first_ack);
    Ok(())
}

/// `query-chardev` back to back until `chardev` is seen `open` (or `stop`): when it was first
/// seen so, after `t0`. `None` if it never was (the state came and went between two answers,
/// or QMP failed).
fn poll_frontend(qmp: &Qmp, chardev: &str, open: bool, t0: Instant, stop: &AtomicBool) -> Option<Duration> {
    let seen = || qmp.query_chardev().ok().map(|all| all.iter().any(|c| c.label == chardev && c.frontend_open == open));
    loop {
        if seen()? {
            return Some(t0.elapsed());
        }
        if stop.load(Ordering::Relaxed) {
            // One answer after the stop: the state may have come just before it.
            return seen()?.then(|| t0.elapsed());
        }
    }
}

fn guest_failed(what: &str, done: &GuestOpDone) -> BenchError {
    BenchError::Guest {
        what: what.into(),
        detail: format!("ret {} errno {} {}", done.ret, done.errno, String::from_utf8_lossy(&done.data)),
    }
}

/// The raw 64 B round trips of `report`, the reference of a session's handshake.
pub(super) fn raw_64b(report: &super::figures::BenchReport) -> Vec<Duration> {
    report
        .round_trips
        .iter()
        .find(|t| t.carrier == Carrier::Raw && t.size == 64)
        .map_or_else(Vec::new, |t| t.samples.clone())
}
