//! Every case's life-cycle trace, judged by the checker (`vport trace check`'s engine) as the
//! thread's asserts: a group records one [`Timeline`] (host connects and disconnects, every
//! in-band message and request of the agent's sessions, QMP `VSERPORT_CHANGE` events); a case's
//! trace is the records added since the previous case ended (the group's set-up belongs to
//! its first case). [`judge_trace`] runs the checker over the trace up to the case's last
//! record, so the state the earlier cases left is known, and keeps the violations whose latest
//! record is the case's; [`judged`] makes a case with such a violation FAIL, naming the records.
//!
//! What is not recorded: bytes on the plain streams of ports the agent does not serve (the
//! guest group's target ports: there is no session there, only their connects and
//! disconnects are recorded), and the sends of a client QEMU has not accepted yet (it waits in
//! the socket's backlog; its session server records it from the moment QEMU serves it).

use super::case::{CaseError, Observation};
use crate::link::LinkObserver;
use crate::qemu::PortInfo;
use crate::report::{TraceVerdict, Verdict};
use crate::rig::Rig;
use crate::session::PortServer;
use crate::timeline::Timeline;
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use vport_common::checker::check;
use vport_common::trace::{Direction, Kind, Record};
use vport_common::Message;

/// The checker's verdict on the records `first..` of `records` (a group's trace so far):
/// the checker reads the whole prefix, and the case gets the violations and notes whose latest
/// record is at or after `first`.
pub(crate) fn judge_trace(records: &[Record], first: u64) -> TraceVerdict {
    let report = check(records);
    let mine = |recs: &[u64]| recs.iter().max().is_some_and(|m| *m >= first);
    let notes = report.notes.iter().filter(|n| mine(&n.records)).count();
    let violations: Vec<_> = report.violations.into_iter().filter(|v| mine(&v.records)).collect();
    let count = (records.len() as u64).saturating_sub(first);
    if violations.is_empty() {
        TraceVerdict::Clean { first_record: first, records: count, notes }
    } else {
        TraceVerdict::Violations { first_record: first, records: count, notes, violations }
    }
}

/// A case's verdict, observation and note, from what its code returned (`Err`: the note of
/// an ERROR) and the checker's verdict on its trace: a violation makes a PASS or QUIRK a FAIL
/// whose note names the violations and their records (an ERROR stays an ERROR, with them).
pub(crate) fn judged(outcome: Result<Observation, String>, trace: &TraceVerdict) -> (Verdict, String, String) {
    let violations = trace.violations();
    let lines = || {
        let mut s = format!("the case's trace breaks {} life-cycle rule(s):", violations.len());
        for v in violations {
            s.push_str("\n  ");
            s.push_str(&v.to_string());
        }
        s
    };
    let join = |note: String| if note.is_empty() { lines() } else { format!("{note}\n{}", lines()) };
    match outcome {
        Ok(o) if violations.is_empty() => (o.verdict, o.observed, o.note),
        Ok(o) => (Verdict::Fail, o.observed, join(o.note)),
        Err(note) if violations.is_empty() => (Verdict::Error, String::new(), note),
        Err(note) => (Verdict::Error, String::new(), join(note)),
    }
}

/// One VM's part of its group's trace: its ports' names (prefixed when a group runs several
/// VMs with the same ports, such as the migration chain), its QMP events, and the host ends
/// the cases open on it.
pub(crate) struct VmTrace {
    timeline: Timeline,
    prefix: String,
    /// QEMU device id -> the port's name on the trace.
    names: Arc<Mutex<HashMap<String, String>>>,
}

impl VmTrace {
    /// Records `rig`'s `VSERPORT_CHANGE` events on `timeline` from now on (until QEMU's QMP
    /// connection ends), naming ports `<prefix><name>`.
    pub(crate) fn start(timeline: &Timeline, rig: &Rig, prefix: &str) -> Result<VmTrace, CaseError> {
        let names: HashMap<String, String> =
            rig.vm.ports().iter().map(|p| (p.id.clone(), format!("{prefix}{}", p.name))).collect();
        let names = Arc::new(Mutex::new(names));
        let events = rig.qmp.subscribe();
        let (tl, ids) = (timeline.clone(), names.clone());
        std::thread::Builder::new()
            .name("vport-conformance-qmp-trace".into())
            .spawn(move || {
                for ev in events.iter() {
                    if let Some((id, open)) = ev.vserport_change() {
                        let port = lock(&ids).get(id).cloned().unwrap_or_else(|| id.to_string());
                        tl.record_at_ns(tl.t_ns(ev.received), &port, Kind::VserportChange { id: id.into(), open });
                    }
                }
            })
            .map_err(|e| CaseError::Other(format!("cannot start the QMP trace recorder: {e}")))?;
        Ok(VmTrace { timeline: timeline.clone(), prefix: prefix.into(), names })
    }

    /// Records another VM of the same group (a migration destination) on the same trace.
    pub(crate) fn another(&self, rig: &Rig, prefix: &str) -> Result<VmTrace, CaseError> {
        VmTrace::start(&self.timeline, rig, prefix)
    }

    /// A port hot-plugged after [`VmTrace::start`]: its events are recorded under its name.
    pub(crate) fn add_port(&self, info: &PortInfo) {
        lock(&self.names).insert(info.id.clone(), self.name(&info.name));
    }

    /// `port`'s name on the trace.
    pub(crate) fn name(&self, port: &str) -> String {
        format!("{}{port}", self.prefix)
    }

    /// A session server for `port` whose connections and messages are recorded under the
    /// port's trace name.
    pub(crate) fn serve(&self, rig: &Rig, port: &str) -> Result<PortServer, CaseError> {
        let mut server = rig.port_server(port)?;
        server.set_observer(Arc::new(TraceObserver { timeline: self.timeline.clone(), prefix: self.prefix.clone() }));
        Ok(server)
    }

    /// Connects to `port` as a plain byte stream (a port the agent does not serve): the
    /// connect and the disconnect are recorded, the bytes are not (there is no session).
    pub(crate) fn connect_raw(&self, rig: &Rig, port: &str) -> Result<Traced<UnixStream>, CaseError> {
        let name = self.name(port);
        let stream = rig.connect_raw(port)?;
        self.timeline.host_connect(&name);
        Ok(Traced { inner: stream, timeline: self.timeline.clone(), port: name, connected: true })
    }
}

/// Records a session server's connections and messages under `prefix` + the port name.
struct TraceObserver {
    timeline: Timeline,
    prefix: String,
}

impl LinkObserver for TraceObserver {
    fn message(&self, port: &str, dir: Direction, session: u32, msg: &Message, wire_len: u64) {
        self.timeline.message(&format!("{}{port}", self.prefix), dir, session, msg, wire_len);
    }

    fn stale(&self, port: &str, dir: Direction, session: u32, msg: &Message, wire_len: u64) {
        self.timeline.stale_frame(&format!("{}{port}", self.prefix), dir, session, msg, wire_len);
    }

    fn host_connected(&self, port: &str) {
        self.timeline.host_connect(&format!("{}{port}", self.prefix));
    }

    fn host_disconnected(&self, port: &str, reason: &str) {
        self.timeline.host_disconnect(&format!("{}{port}", self.prefix), reason);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A host end whose connection is on the trace: dropping it records the disconnect.
pub(crate) struct Traced<T> {
    inner: T,
    timeline: Timeline,
    port: String,
    connected: bool,
}

impl<T> Traced<T> {
    /// Records that the host end is no longer connected (once).
    fn disconnected(&mut self, reason: &str) {
        if std::mem::replace(&mut self.connected, false) {
            self.timeline.host_disconnect(&self.port, reason);
        }
    }
}

impl<T> Drop for Traced<T> {
    fn drop(&mut self) {
        self.disconnected("host closed the connection");
    }
}

impl<T> Deref for Traced<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> DerefMut for Traced<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Two cases on one port: the first connects and completes a handshake, the second
    /// connects again without a disconnect (a duplicate OPENED).
    fn two_cases() -> (Vec<Record>, u64) {
        let tl = Timeline::new(Instant::now());
        tl.host_connect("p");
        tl.hello("p", 7, 42);
        tl.hello_ack("p", 7, 42);
        let second = tl.len() as u64;
        tl.data("p", vport_common::trace::Direction::HostToGuest, 10, 7);
        tl.host_connect("p");
        (tl.records(), second)
    }

    #[test]
    fn a_case_gets_the_violations_of_its_own_records() {
        let (records, second) = two_cases();
        let first = judge_trace(&records[..second as usize], 0);
        assert_eq!(first, TraceVerdict::Clean { first_record: 0, records: 3, notes: 0 });
        let v = judge_trace(&records, second);
        assert_eq!(v.violations().len(), 1, "{v:?}");
        assert_eq!(v.violations()[0].records, [0, 4], "the earlier connect and the duplicate");
        assert!(matches!(v, TraceVerdict::Violations { first_record: 3, records: 2, .. }), "{v:?}");
    }

    #[test]
    fn a_trace_violation_fails_a_passing_case_naming_the_records() {
        let (records, second) = two_cases();
        let v = judge_trace(&records, second);
        let (verdict, observed, note) = judged(Ok(Observation::check(true, "READY")), &v);
        assert_eq!(verdict, Verdict::Fail);
        assert_eq!(observed, "READY");
        assert!(note.contains("breaks 1 life-cycle rule(s)") && note.contains("records #0, #4"), "{note}");
        let (verdict, _, note) = judged(Ok(Observation::quirk("x", "why")), &v);
        assert_eq!(verdict, Verdict::Fail, "a QUIRK with a violation fails too");
        assert!(note.starts_with("why\n"), "{note}");
        let (verdict, _, note) = judged(Err("link: timeout".into()), &v);
        assert_eq!(verdict, Verdict::Error, "an ERROR stays an ERROR");
        assert!(note.contains("#0, #4"), "{note}");
        let clean = judge_trace(&records[..second as usize], 0);
        assert_eq!(judged(Ok(Observation::check(true, "READY")), &clean).0, Verdict::Pass);
    }
}
