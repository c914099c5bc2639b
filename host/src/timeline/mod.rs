//! One timeline: every observation of the ports' life cycles (host endpoint connect,
//! disconnect and data, in-band handshake messages, QMP events, `frontend-open` samples, the
//! agent's own transition records) becomes a [`Record`] on one monotonic clock, written as a
//! JSON line to a sink as it is recorded and kept in memory for [`Timeline::check`].
//!
//! The format is `docs/trace.md` ([`vport_common::trace`]); `vport trace check FILE` reads it
//! back ([`crate::trace_check`]).
//!
//! ```
//! use std::time::Instant;
//! use vport_common::trace::Direction;
//! use vport_host::timeline::Timeline;
//!
//! let timeline = Timeline::new(Instant::now());
//! timeline.host_connect("org.vport.0");
//! timeline.hello("org.vport.0", 7, 42);
//! timeline.hello_ack("org.vport.0", 7, 42);
//! timeline.data("org.vport.0", Direction::HostToGuest, 128, 7);
//! assert!(timeline.check().is_clean());
//! ```
//!
//! # Clocks
//!
//! `t_ns` is host monotonic time since the timeline's origin. Endpoint and in-band records are
//! stamped when recorded (under the timeline's lock, so they are also written in time order);
//! QMP events with their receipt time ([`QmpEvent::received`]), which can be earlier than
//! records already written. Agent records carry the agent's monotonic clock, mapped with a
//! [`ClockOffset`] estimated from PING round trips: error at most half the round trip of the
//! sample used (see [`ClockOffset::error_bound_ns`]).

use crate::link::{LinkObserver, PingSample};
use crate::qmp::{ChardevInfo, QmpEvent};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use thiserror::Error;
use vport_common::checker::{check, CheckReport};
use vport_common::message::{EventRecord, Message, NO_REOPEN};
use vport_common::trace::{Direction, Kind, Record};

/// What went wrong recording a timeline.
#[derive(Debug, Error)]
pub enum TimelineError {
    /// The trace file could not be created.
    #[error("cannot create trace file {path}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing a record to the sink failed. The sink is not written again (a trace with a hole
    /// would mislead the checker); records from `seq` on are only in memory.
    #[error("cannot write trace record #{seq} to the trace sink; records from #{seq} on are only in memory")]
    Write {
        /// The first record not written.
        seq: u64,
        /// Cause (absent when the error was already reported by an earlier flush).
        #[source]
        source: Option<std::io::Error>,
    },
}

/// Offset between the agent's monotonic clock and the timeline's, estimated from PING round
/// trips: `host_ns = agent_ns + offset_ns`.
///
/// Estimate: for the sample with the smallest round trip, the agent read its clock somewhere
/// between the host's send and receive, so the midpoint is wrong by at most half the round
/// trip ([`ClockOffset::error_bound_ns`]). Assumes both clocks run at the same rate (true for a
/// KVM guest's monotonic clock over seconds; a VM paused during the estimate breaks it, so
/// re-estimate after a stop/cont).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockOffset {
    offset_ns: i128,
    rtt_ns: u64,
}

impl ClockOffset {
    /// Estimates the offset from `(host_sent_ns, host_recv_ns, agent_time_ns)` samples (host
    /// times on the timeline's clock) using the sample with the smallest round trip (the first
    /// of equals). Samples with `host_recv_ns < host_sent_ns` are ignored. `None` when no
    /// sample is usable.
    pub fn from_pings(samples: &[(u64, u64, u64)]) -> Option<ClockOffset> {
        let (sent, recv, agent) = samples.iter().copied().filter(|(s, r, _)| r >= s).min_by_key(|(s, r, _)| r - s)?;
        let mid = i128::from(sent) + i128::from(recv - sent) / 2;
        Some(ClockOffset { offset_ns: mid - i128::from(agent), rtt_ns: recv - sent })
    }

    /// [`ClockOffset::from_pings`] for [`PingSample`]s, with host times measured from `origin`
    /// (samples sent before `origin` are ignored).
    pub fn from_ping_samples(origin: Instant, samples: &[PingSample]) -> Option<ClockOffset> {
        let pings: Vec<(u64, u64, u64)> = samples
            .iter()
            .filter_map(|p| {
                let sent = duration_ns(p.sent.checked_duration_since(origin)?);
                Some((sent, sent.saturating_add(duration_ns(p.rtt)), p.agent_time_ns))
            })
            .collect();
        ClockOffset::from_pings(&pings)
    }

    /// An exact offset (for tests and for traces replayed from elsewhere).
    pub fn fixed(offset_ns: i64) -> ClockOffset {
        ClockOffset { offset_ns: i128::from(offset_ns), rtt_ns: 0 }
    }

    /// `host_ns - agent_ns`, clamped to the `i64` range.
    pub fn offset_ns(&self) -> i64 {
        self.offset_ns.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }

    /// Round trip of the sample the estimate came from.
    pub fn rtt_ns(&self) -> u64 {
        self.rtt_ns
    }

    /// The estimate's error bound: half the round trip (rounded up).
    pub fn error_bound_ns(&self) -> u64 {
        self.rtt_ns.div_ceil(2)
    }

    /// An agent clock reading on the timeline's clock, clamped to `0..=u64::MAX` (an agent
    /// event from before the timeline's origin maps to 0).
    pub fn to_host_ns(&self, agent_ns: u64) -> u64 {
        (i128::from(agent_ns) + self.offset_ns).clamp(0, i128::from(u64::MAX)) as u64
    }
}

fn duration_ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

struct Inner {
    records: Vec<Record>,
    sink: Option<Box<dyn Write + Send>>,
    /// The first record the sink failed on, and the error until a flush reports it.
    failed: Option<(u64, Option<std::io::Error>)>,
    /// QEMU names (qdev id, chardev label) -> port name.
    aliases: HashMap<String, String>,
    /// Per port: the next agent record number not yet recorded.
    agent_next: HashMap<String, u64>,
}

/// The timeline recorder. Cloning gives another handle to the same timeline (for other
/// threads); records from all handles share one numbering and one sink, in recording order.
///
/// Memory: every record is kept until the timeline is dropped.
#[derive(Clone)]
pub struct Timeline {
    origin: Instant,
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timeline").field("origin", &self.origin).field("records", &self.len()).finish()
    }
}

impl Timeline {
    /// A timeline in memory only, with time 0 at `origin`.
    pub fn new(origin: Instant) -> Timeline {
        Timeline::build(origin, None)
    }

    /// A timeline that also writes each record, as one JSON line, to `sink` as it is recorded
    /// (one `write_all` per line; wrap the sink in a `BufWriter` for speed, or not, for a file
    /// that `tail -f` can follow).
    pub fn with_sink(origin: Instant, sink: impl Write + Send + 'static) -> Timeline {
        Timeline::build(origin, Some(Box::new(sink)))
    }

    /// A timeline writing to a new file at `path` (truncated if it exists), unbuffered: each
    /// record is in the file when its recording call returns.
    pub fn create(path: &Path, origin: Instant) -> Result<Timeline, TimelineError> {
        let file = std::fs::File::create(path).map_err(|source| TimelineError::Create { path: path.into(), source })?;
        Ok(Timeline::with_sink(origin, file))
    }

    fn build(origin: Instant, sink: Option<Box<dyn Write + Send>>) -> Timeline {
        let inner =
            Inner { records: Vec::new(), sink, failed: None, aliases: HashMap::new(), agent_next: HashMap::new() };
        Timeline { origin, inner: Arc::new(Mutex::new(inner)) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves a consistent append-only log.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Time 0 of the timeline.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// `at` on the timeline's clock (0 for instants before the origin).
    pub fn t_ns(&self, at: Instant) -> u64 {
        duration_ns(at.saturating_duration_since(self.origin))
    }

    /// Now, on the timeline's clock.
    pub fn now_ns(&self) -> u64 {
        self.t_ns(Instant::now())
    }

    /// Names the port that QEMU calls `qemu_name` (its qdev `id=`, or its chardev's label), so
    /// QMP records carry the port's name. Unaliased QEMU names are used as they are.
    pub fn alias(&self, qemu_name: &str, port: &str) {
        self.lock().aliases.insert(qemu_name.to_string(), port.to_string());
    }

    /// The port name for a QEMU name (itself when not aliased).
    pub fn port_name(&self, qemu_name: &str) -> String {
        self.lock().aliases.get(qemu_name).cloned().unwrap_or_else(|| qemu_name.to_string())
    }

    /// Records `kind` about `port` at `t_ns`, with the kind's usual source; returns its `seq`.
    pub fn record_at_ns(&self, t_ns: u64, port: &str, kind: Kind) -> u64 {
        self.push(Some(t_ns), port, kind)
    }

    /// Records `kind` about `port` observed now (the time is taken under the timeline's lock,
    /// so records stamped this way are in time order in the file).
    pub fn record(&self, port: &str, kind: Kind) -> u64 {
        self.push(None, port, kind)
    }

    /// The core of every recording method: stamps (`None`: now), numbers, writes, keeps.
    fn push(&self, t_ns: Option<u64>, port: &str, kind: Kind) -> u64 {
        let mut inner = self.lock();
        let t_ns = t_ns.unwrap_or_else(|| self.now_ns());
        let seq = inner.records.len() as u64;
        let record = Record { seq, t_ns, port: port.to_string(), source: kind.default_source(), kind };
        if inner.failed.is_none() {
            if let Some(sink) = inner.sink.as_mut() {
                let written = serde_json::to_vec(&record).map_err(std::io::Error::other).and_then(|mut line| {
                    line.push(b'\n');
                    sink.write_all(&line)
                });
                if let Err(e) = written {
                    log::warn!("timeline: cannot write trace record #{seq}: {e}; later records stay in memory only");
                    inner.failed = Some((seq, Some(e)));
                }
            }
        }
        inner.records.push(record);
        seq
    }

    /// The host endpoint connected to the port's chardev.
    pub fn host_connect(&self, port: &str) -> u64 {
        self.record(port, Kind::HostConnect)
    }

    /// The host endpoint's connection ended, for `reason`.
    pub fn host_disconnect(&self, port: &str, reason: &str) -> u64 {
        self.record(port, Kind::HostDisconnect { reason: reason.to_string() })
    }

    /// Session data moved (`bytes` on the wire, frames of `session`).
    pub fn data(&self, port: &str, dir: Direction, bytes: u64, session: u32) -> u64 {
        self.record(port, Kind::Data { dir, bytes, session })
    }

    /// The host received HELLO.
    pub fn hello(&self, port: &str, session: u32, nonce: u64) -> u64 {
        self.record(port, Kind::Hello { session, nonce })
    }

    /// The host sent HELLO_ACK.
    pub fn hello_ack(&self, port: &str, session: u32, nonce: u64) -> u64 {
        self.record(port, Kind::HelloAck { session, nonce })
    }

    /// The host sent HELLO_REQUEST.
    pub fn hello_request(&self, port: &str) -> u64 {
        self.record(port, Kind::HelloRequest)
    }

    /// The host received BYE (`reopen_after_ms` as on the wire: [`NO_REOPEN`] = not reopening).
    pub fn bye(&self, port: &str, session: u32, reopen_after_ms: u32, reason: &str) -> u64 {
        let reopen_after_ms = (reopen_after_ms != NO_REOPEN).then_some(reopen_after_ms);
        self.record(port, Kind::Bye { session, reopen_after_ms, reason: reason.to_string() })
    }

    /// A rig note (`port` empty when it is about no particular port).
    pub fn note(&self, port: &str, text: &str) -> u64 {
        self.record(port, Kind::Note { text: text.to_string() })
    }

    /// Notes a frame the host dropped as stale (see [`LinkObserver::stale`]): a note, not
    /// session data, so that the checker does not count it against the port's life cycle.
    pub fn stale_frame(&self, port: &str, dir: Direction, session: u32, msg: &Message, wire_bytes: u64) -> u64 {
        let text = format!(
            "stale frame dropped: {} {:?} of session {session:#010x} ({wire_bytes} bytes), no session of this \
             connection",
            dir.name(),
            msg.kind()
        );
        self.note(port, &text)
    }

    /// Records a message the host sent (`HostToGuest`) or received (`GuestToHost`) in a frame
    /// of header session `session` that was `wire_bytes` long: HELLO, HELLO_ACK, HELLO_REQUEST
    /// and BYE as themselves; PING, PONG and ERROR not at all (they are legal outside READY);
    /// everything else as session data. Returns the record's `seq`, if one was written.
    pub fn message(&self, port: &str, dir: Direction, session: u32, msg: &Message, wire_bytes: u64) -> Option<u64> {
        Some(match msg {
            Message::Hello(h) => self.hello(port, session, h.nonce),
            Message::HelloAck { nonce, .. } => self.hello_ack(port, session, *nonce),
            Message::HelloRequest => self.hello_request(port),
            Message::Bye { reopen_after_ms, reason } => self.bye(port, session, *reopen_after_ms, reason),
            Message::Ping { .. } | Message::Pong { .. } | Message::Error { .. } => return None,
            _ => self.data(port, dir, wire_bytes, session),
        })
    }

    /// Records a QMP event: `VSERPORT_CHANGE` as `vserport_change` stamped with its receipt
    /// time, the port named through [`Timeline::alias`]. Other events are not recorded (`None`).
    pub fn qmp_event(&self, event: &QmpEvent) -> Option<u64> {
        let (id, open) = event.vserport_change()?;
        let port = self.port_name(id);
        Some(self.record_at_ns(self.t_ns(event.received), &port, Kind::VserportChange { id: id.to_string(), open }))
    }

    /// Records a `frontend-open` sample of `port` (a port name or an aliased chardev label)
    /// whose answer arrived at `at`.
    pub fn frontend_open(&self, port: &str, open: bool, at: Instant) -> u64 {
        let port = self.port_name(port);
        self.record_at_ns(self.t_ns(at), &port, Kind::FrontendOpen { open })
    }

    /// Records the `frontend-open` of every chardev in a `query-chardev` answer that arrived at
    /// `at` and whose label is aliased to a port (the monitor, serial console and other
    /// chardevs are skipped). Returns the records' `seq`s.
    pub fn frontend_samples(&self, chardevs: &[ChardevInfo], at: Instant) -> Vec<u64> {
        let ports: Vec<(String, bool)> = {
            let inner = self.lock();
            chardevs.iter().filter_map(|c| inner.aliases.get(&c.label).map(|p| (p.clone(), c.frontend_open))).collect()
        };
        let t_ns = self.t_ns(at);
        ports.into_iter().map(|(port, open)| self.record_at_ns(t_ns, &port, Kind::FrontendOpen { open })).collect()
    }

    /// Records the agent's transition records for `port` (an EVENTS reply), mapping their time
    /// with `offset`. Records already recorded (agent record number below the next expected)
    /// are skipped, so overlapping EVENTS replies can be passed as they come. Returns how many
    /// were recorded.
    pub fn agent_events(&self, port: &str, records: &[EventRecord], offset: &ClockOffset) -> usize {
        let mut recorded = 0;
        for r in records {
            {
                let mut inner = self.lock();
                let next = inner.agent_next.entry(port.to_string()).or_insert(0);
                if r.seq < *next {
                    continue;
                }
                *next = r.seq.saturating_add(1);
            }
            self.record_at_ns(offset.to_host_ns(r.time_ns), port, Kind::from_event_record(r));
            recorded += 1;
        }
        recorded
    }

    /// How many records so far.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// True before the first record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of every record so far, in `seq` order.
    pub fn records(&self) -> Vec<Record> {
        self.lock().records.clone()
    }

    /// Runs the life-cycle checker over the records so far.
    pub fn check(&self) -> CheckReport {
        check(&self.lock().records)
    }

    /// Flushes the sink; reports a write failure (here or in any earlier record).
    pub fn flush(&self) -> Result<(), TimelineError> {
        let mut inner = self.lock();
        if let Some((seq, source)) = inner.failed.as_mut() {
            return Err(TimelineError::Write { seq: *seq, source: source.take() });
        }
        let seq = inner.records.len() as u64;
        let result = match inner.sink.as_mut() {
            Some(sink) => sink.flush(),
            None => Ok(()),
        };
        result.map_err(|e| {
            inner.failed = Some((seq, None));
            TimelineError::Write { seq, source: Some(e) }
        })
    }
}

/// A link reports to its timeline through this (see [`Timeline::message`]).
impl LinkObserver for Timeline {
    fn message(&self, port: &str, dir: Direction, session: u32, msg: &Message, wire_len: u64) {
        Timeline::message(self, port, dir, session, msg, wire_len);
    }

    fn stale(&self, port: &str, dir: Direction, session: u32, msg: &Message, wire_len: u64) {
        self.stale_frame(port, dir, session, msg, wire_len);
    }

    fn host_connected(&self, port: &str) {
        self.host_connect(port);
    }

    fn host_disconnected(&self, port: &str, reason: &str) {
        self.host_disconnect(port, reason);
    }
}

#[cfg(test)]
mod tests;
