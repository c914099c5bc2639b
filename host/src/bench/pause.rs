//! The pause bug as an event latency: how soon an acknowledged stream notices a port QEMU left
//! stuck, and how soon it flows again (docs/reliability.md, "The pause bug").
//!
//! One sample: a guest->host acknowledged stream runs on the streams' port; at its first
//! acknowledgement the VM is stopped, the host leaves while it is stopped, and the VM is resumed
//! with no client. On a QEMU with the bug the CLOSED event is dropped during the stop, the
//! agent (which never saw the host leave) writes on, QEMU's write to the absent client fails and
//! the port is throttled with nothing to unthrottle it: QEMU's trace
//! `virtio_serial_throttle_port ... throttle 1` (switched on through QMP for this phase only)
//! shows it; the host comes back once the last such line says the port is throttled (or
//! [`THROTTLE_WAIT`] after `cont`: then the port may not be stuck). Its connection yields no
//! session, the stream's liveness gives up after [`PAUSE_STALL`] and connects anew, which
//! makes QEMU deliver a real close, and the stream resumes. Both times run from the host's
//! return:
//!
//! - *liveness leaves the stuck connection*: the stream's `Reconnecting` event (detection;
//!   a miss when the stream flowed without it: the port was not stuck);
//! - *STREAM_ACCEPT in a new session*: the stream resumed (recovery);
//!
//! against *host connects -> READY* of the same run. Stopping the VM ends every session, the
//! control session too: this phase runs last on the bench's VM.

use super::figures::EventLatency;
use super::{BenchError, PORT_STREAM};
use crate::qmp::Qmp;
use crate::session::{PortServer, Session, SessionError};
use crate::stream::to_host::ToHost;
use crate::stream::{Control, SessionSource, StreamSide, TransferEvent, TransferOptions};
use crate::wait::wait_until;
use std::cell::Cell;
use std::path::Path;
use std::time::{Duration, Instant};
use vport_common::server::EndReason;

/// The event's name in the report.
pub(super) const PAUSE_BUG: &str = "pause bug -> recovered";
/// The stall deadline of this phase's streams: how long a connection may yield no session
/// while the VM runs before the host leaves it (the detection figure is at least this).
pub(super) const PAUSE_STALL: Duration = Duration::from_secs(2);
/// How long QEMU is given, after `cont`, to show the port throttled.
const THROTTLE_WAIT: Duration = Duration::from_secs(5);
/// QEMU's trace event of a port being throttled or unthrottled.
const TRACE_EVENT: &str = "virtio_serial_throttle_port";
/// The end of the trace line of a throttle (QEMU's `log` trace backend writes to its stderr:
/// `virtio_serial_throttle_port port 2, throttle 1`); the bench's other ports are idle, so
/// the last line is the streams' port's.
const THROTTLED: &str = "throttle 1";
/// Bytes of each sample's stream.
const PAUSE_BYTES: u64 = 4 << 20;

const BY_REFERENCE: &str = "host connects -> READY (reference)";
const BY_LIVENESS: &str = "liveness leaves the stuck connection";
const BY_RESUMED: &str = "STREAM_ACCEPT in a new session";

/// What one sample saw, times from the host's return after `cont`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct PauseSample {
    /// QEMU's trace showed the port throttled after `cont`, with no client.
    pub throttled: bool,
    /// When liveness gave up on the connection (`None`: it did not have to).
    pub detected: Option<Duration>,
    /// When the stream was accepted in a new session.
    pub resumed: Option<Duration>,
}

/// The event's figures: the reference (connect -> READY samples of the same run) and one row
/// for detection and one for recovery.
pub(super) fn figures(reference: &[Duration], samples: &[PauseSample]) -> Vec<EventLatency> {
    let row = |by, pick: fn(&PauseSample) -> Option<Duration>| {
        let seen: Vec<Duration> = samples.iter().filter_map(pick).collect();
        let missed = u32::try_from(samples.len() - seen.len()).unwrap_or(u32::MAX);
        EventLatency { event: PAUSE_BUG, by, samples: seen, missed }
    };
    vec![
        EventLatency { event: PAUSE_BUG, by: BY_REFERENCE, samples: reference.to_vec(), missed: 0 },
        row(BY_LIVENESS, |s| s.detected),
        row(BY_RESUMED, |s| s.resumed),
    ]
}

/// Switches QEMU's throttle trace on (`on`) or off through QMP; an error names what is missing.
pub(super) fn set_trace(qmp: &Qmp, on: bool) -> Result<(), BenchError> {
    let args = serde_json::json!({ "name": TRACE_EVENT, "enable": on });
    qmp.execute("trace-event-set-state", Some(args)).map(drop).map_err(|e| {
        BenchError::Setup(format!(
            "cannot switch QEMU's trace event {TRACE_EVENT} {}: {e} (a QEMU built without the log trace backend cannot \
             show the pause bug)",
            if on { "on" } else { "off" }
        ))
    })
}

/// One sample on the streams' port of a running VM (`qmp`, QEMU's stderr at `stderr`, its
/// liveness by `alive`); `dest` is where the stream is stored on the host.
pub(super) fn sample(
    server: &mut PortServer,
    qmp: &Qmp,
    stderr: &Path,
    alive: &dyn Fn() -> Result<(), String>,
    seed: u64,
    dest: &Path,
) -> Result<PauseSample, BenchError> {
    let stopped = Cell::new(false);
    let back: Cell<Option<Instant>> = Cell::new(None);
    let mut fault =
        PauseFault { server, qmp, stderr, alive, stopped: &stopped, back: &back, throttled: None, cont_failed: None };
    let (mut detected, mut resumed, mut stop_failed) = (None, None, None);
    let opts =
        TransferOptions { stall_timeout: PAUSE_STALL, session_timeout: Duration::from_secs(60), ..Default::default() };
    let mut stream = ToHost::pattern(PORT_STREAM, seed, PAUSE_BYTES, dest, opts)?;
    let report = stream.run(&mut fault, &mut |event| {
        match event {
            TransferEvent::Progress { .. } if !stopped.get() => match qmp.stop() {
                Ok(()) => stopped.set(true),
                Err(e) => stop_failed = Some(e.to_string()),
            },
            TransferEvent::Reconnecting { .. } if detected.is_none() => detected = back.get().map(|t| t.elapsed()),
            TransferEvent::Accepted { .. } if resumed.is_none() => resumed = back.get().map(|t| t.elapsed()),
            _ => {}
        }
        Control::Continue
    });
    if let Some(e) = fault.cont_failed.take() {
        return Err(BenchError::Setup(format!("QMP cont after the pause: {e}")));
    }
    let report = report?;
    let throttled = fault.throttled;
    if let Some(e) = stop_failed {
        return Err(BenchError::Setup(format!("QMP stop: {e}")));
    }
    let what = "the stream through the pause";
    let digest = super::measure::take_stored_pattern(what, dest, report.bytes, seed, PAUSE_BYTES)?;
    if report.digest != digest {
        return Err(BenchError::Integrity(format!("{what}: the transfer's digest is not the stored file's")));
    }
    let Some(throttled) = throttled else {
        return Err(BenchError::Setup(
            "the VM was never stopped: the stream ended before its first acknowledgement".into(),
        ));
    };
    Ok(PauseSample { throttled, detected, resumed })
}

/// The stream's sessions, with the fault: the first session asked for after the VM was stopped
/// finds the host gone (it leaves while the VM is stopped), the VM resumed with no client, and
/// QEMU's trace watched until it shows the port throttled (or [`THROTTLE_WAIT`] passes); then
/// the host comes back.
struct PauseFault<'a> {
    server: &'a mut PortServer,
    qmp: &'a Qmp,
    stderr: &'a Path,
    alive: &'a dyn Fn() -> Result<(), String>,
    stopped: &'a Cell<bool>,
    /// When the host came back after `cont`.
    back: &'a Cell<Option<Instant>>,
    /// Set once the fault was made: whether QEMU throttled the port.
    throttled: Option<bool>,
    /// QMP `cont` failed with this.
    cont_failed: Option<String>,
}

impl PauseFault<'_> {
    /// Whether QEMU's last throttle trace line says throttled.
    fn throttled_now(&self) -> bool {
        let log = std::fs::read_to_string(self.stderr).unwrap_or_default();
        log.lines().rev().find(|l| l.contains(TRACE_EVENT)).is_some_and(|l| l.trim_end().ends_with(THROTTLED))
    }
}

impl SessionSource for PauseFault<'_> {
    fn next_session(&mut self, timeout: Duration) -> Result<Session, SessionError> {
        if self.stopped.get() && self.throttled.is_none() {
            self.server.disconnect();
            if let Err(e) = self.qmp.cont() {
                // The VM stays stopped: no session can come. Said once the stream gives up.
                self.cont_failed = Some(e.to_string());
                return Err(SessionError::Closed { port: PORT_STREAM.into(), reason: EndReason::VmStopped });
            }
            let throttled = wait_until(
                "QEMU to throttle the port with no client",
                THROTTLE_WAIT,
                Duration::from_millis(10),
                self.alive,
                || self.throttled_now().then_some(()),
            );
            self.back.set(Some(Instant::now()));
            self.throttled = Some(throttled.is_ok());
            if let Err(e) = throttled {
                log::info!("pause bug: {e}");
            }
        }
        self.server.accept(timeout)
    }
    fn reconnect(&mut self) {
        self.server.disconnect();
    }
    fn vm_paused(&self) -> bool {
        self.server.vm_paused()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_count_a_pause_without_the_bug_as_a_missed_detection() {
        let ms = Duration::from_millis;
        let samples = [
            PauseSample { throttled: true, detected: Some(ms(2100)), resumed: Some(ms(2200)) },
            PauseSample { throttled: false, detected: None, resumed: Some(ms(30)) },
        ];
        let f = figures(&[ms(3)], &samples);
        assert_eq!(f.len(), 3);
        assert!(f.iter().all(|e| e.event == PAUSE_BUG));
        assert_eq!((f[0].by, f[0].samples.as_slice(), f[0].missed), (BY_REFERENCE, &[ms(3)][..], 0));
        assert_eq!((f[1].samples.as_slice(), f[1].missed), (&[ms(2100)][..], 1));
        assert_eq!((f[2].samples.as_slice(), f[2].missed), (&[ms(2200), ms(30)][..], 0));
    }
}
