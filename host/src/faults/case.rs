//! One fault case: a file into the guest and another out of it at the same time, each an
//! acknowledged stream on its own port, with the fault injected when a stream is a third
//! through; what both receivers hold is then checked against what was sent.

use super::migration::Migration;
use super::Fault;
use crate::image::initscript::{AGENT_RESTARTING, GUEST_REBOOTING};
use crate::logwatch::{last_throttled, wait_for_line, wait_throttled, LogTail};
use crate::qemu::PortInfo;
use crate::qmp::Qmp;
use crate::rig::replug_port;
use crate::session::{PortServer, Session, SessionError};
use crate::stream::replug::accept_through_unplug;
use crate::stream::to_guest::ToGuest;
use crate::stream::to_host::ToHost;
use crate::stream::{
    Control, SessionSource, StreamSide, TransferError, TransferEvent, TransferOptions, TransferReport,
};
use crate::timeline::Timeline;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a case's stream that has begun waits for the other to begin.
const BEGIN_DEADLINE: Duration = Duration::from_secs(30);

/// How long QEMU may take to confirm an unplug.
const UNPLUG_DEADLINE: Duration = Duration::from_secs(15);

/// The fault of one case, shared by its two streams. A per-port fault is injected by each
/// stream on its own port; a VM-wide one (`stop`, a reset, a migration, QEMU killed) once,
/// by the first stream a third through ([`Fault::to_host_injects`]: by the to-host stream).
pub(super) struct Plan {
    pub(super) fault: Fault,
    pub(super) qmp: Arc<Qmp>,
    /// QEMU's pid (for [`Fault::QemuKill`]).
    qemu_pid: u32,
    /// QEMU's stderr, where its trace of throttled ports goes (for
    /// [`Fault::HostDropQueueFull`]).
    pub(super) qemu_stderr: Option<std::path::PathBuf>,
    /// The guest console, where `/init` reports restarting the agent (for
    /// [`Fault::AgentKill`]).
    pub(super) console: Option<std::path::PathBuf>,
    /// Inject nothing: the streams run to their end (a case's second pass).
    quiet: bool,
    /// The migration of a migration fault.
    pub(super) migration: Option<Migration>,
    /// The suite's trace: the injection and every liveness reconnect are noted on it.
    pub(super) trace: Option<Timeline>,
    stopped: AtomicBool,
    /// QEMU throttled the port while the host held its reading ([`Fault::HostDropQueueFull`]).
    pub(super) throttled: AtomicBool,
    injected_at: Mutex<Option<Instant>>,
    /// Streams that have begun (their first STREAM_ACCEPT): each waits for the other, so
    /// that the fault finds both in flight whichever got its session first.
    begun: Mutex<u8>,
    both_begun: Condvar,
    /// A stream claimed the VM-wide fault ([`Plan::claim`]).
    claimed: AtomicBool,
    /// Each stream's bytes acknowledged so far: [to-guest, to-host].
    acked: [AtomicU64; 2],
    /// Which stream injected the fault: [to-guest, to-host] (both for a per-port fault).
    injected_by: [AtomicBool; 2],
}

impl Plan {
    /// The plan of a case of `fault` on the VM of `qmp` and `qemu_pid`; what a fault needs
    /// more (a migration, the logs to watch) is set on the fields before it is shared.
    pub(super) fn new(fault: Fault, qmp: Arc<Qmp>, qemu_pid: u32) -> Plan {
        Plan {
            fault,
            qmp,
            qemu_pid,
            qemu_stderr: None,
            console: None,
            quiet: false,
            migration: None,
            trace: None,
            stopped: AtomicBool::new(false),
            throttled: AtomicBool::new(false),
            injected_at: Mutex::new(None),
            begun: Mutex::new(0),
            both_begun: Condvar::new(),
            claimed: AtomicBool::new(false),
            acked: [AtomicU64::new(0), AtomicU64::new(0)],
            injected_by: [AtomicBool::new(false), AtomicBool::new(false)],
        }
    }

    /// The plan of a case's second pass on the VM of `qmp` and `qemu_pid`: nothing injected.
    pub(super) fn quiet(fault: Fault, qmp: Arc<Qmp>, qemu_pid: u32) -> Plan {
        Plan { quiet: true, ..Plan::new(fault, qmp, qemu_pid) }
    }

    /// A stream has begun: waits (at most [`BEGIN_DEADLINE`]) until the other has too.
    fn begin(&self) {
        let mut begun = self.begun.lock().unwrap_or_else(|e| e.into_inner());
        *begun += 1;
        self.both_begun.notify_all();
        let (begun, waited) = self
            .both_begun
            .wait_timeout_while(begun, crate::speed::scaled(BEGIN_DEADLINE), |n| *n < 2)
            .unwrap_or_else(|e| e.into_inner());
        drop(begun);
        if waited.timed_out() {
            log::warn!(
                "faults: the other stream did not begin within {:?}; going on alone",
                crate::speed::scaled(BEGIN_DEADLINE)
            );
        }
    }

    /// Whether the caller is the first to claim the VM-wide fault (it then injects it).
    fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::SeqCst)
    }

    fn injected_at(&self) -> Option<Instant> {
        *self.injected_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes `text` on the trace (about no one port: the ports' trace names carry the VM).
    fn note(&self, text: &str) {
        if let Some(trace) = &self.trace {
            trace.note("", text);
        }
    }

    fn mark_injected(&self) {
        self.injected_at.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Instant::now);
    }
}

/// What one stream of a case measured.
#[derive(Debug)]
pub(super) struct Leg {
    pub(super) result: Result<TransferReport, TransferError>,
    /// From the fault to the next session (READY again).
    pub(super) back_to_ready: Option<Duration>,
    /// From the fault to the stream's resumption (STREAM_ACCEPT in the next session).
    pub(super) resumed: Option<Duration>,
    /// From the fault to the stream's failure, when it failed.
    pub(super) failed_after: Option<Duration>,
    /// This stream injected the fault (it was in flight then: the fault is aimed at it).
    pub(super) injected: bool,
}

/// The server of one stream, with the fault's session-side part: after the VM was stopped,
/// the owner resumes it (for [`Fault::HostDropDuringStop`], after leaving first).
struct Injector<'a> {
    server: &'a mut PortServer,
    port: &'a PortInfo,
    plan: Arc<Plan>,
    owner: bool,
    resumed_vm: bool,
    renewed: u64,
}

impl SessionSource for Injector<'_> {
    fn next_session(&mut self, timeout: Duration) -> Result<Session, SessionError> {
        if self.owner && !self.resumed_vm && self.plan.stopped.load(Ordering::SeqCst) {
            self.resumed_vm = true;
            if self.plan.fault == Fault::HostDropDuringStop {
                self.server.disconnect();
            }
            if let Err(e) = self.plan.qmp.cont() {
                log::warn!("faults: cont failed: {e}");
            }
        }
        if let Some(m) = &self.plan.migration {
            if m.in_progress() {
                if let Err(e) = m.wait() {
                    log::warn!("faults: {e}");
                    let what = "the migration to hand over".into();
                    return Err(SessionError::Timeout { port: self.port.name.clone(), what, timeout });
                }
            }
            // From now on the destination's port: this stream's server is taken once.
            if let Some(server) = m.take_server(usize::from(self.owner)) {
                *self.server = server;
            }
        }
        accept_through_unplug(self.server, self.port, &self.plan.qmp, timeout, &mut self.renewed)
    }
    fn reconnect(&mut self) {
        self.server.disconnect();
    }
    fn vm_paused(&self) -> bool {
        self.server.vm_paused()
    }
}

/// The hook of one stream (`to_host` or into the guest): injects the fault at a third of the
/// stream and times the recovery. A VM-wide fault is injected once, by the first stream to
/// reach a third (the other has begun and is short of a third: in flight), except those that
/// need the to-host stream's own server ([`Fault::to_host_injects`]).
fn hook<'a>(
    plan: &'a Plan,
    port: &'a PortInfo,
    to_host: bool,
    back_to_ready: &'a mut Option<Duration>,
    resumed: &'a mut Option<Duration>,
) -> impl FnMut(&TransferEvent) -> Control + 'a {
    let (mut fired, mut begun) = (false, false);
    // When this stream's own fault was injected (per-port faults), else the VM-wide one's.
    let mut own: Option<Instant> = None;
    let since = move |own: Option<Instant>| own.or_else(|| plan.injected_at()).map(|t| t.elapsed());
    move |e| match *e {
        TransferEvent::Accepted { .. } if !begun && !plan.quiet => {
            begun = true;
            plan.begin();
            Control::Continue
        }
        TransferEvent::Progress { acked, .. } if fired || plan.quiet => {
            plan.acked[usize::from(to_host)].store(acked, Ordering::SeqCst);
            Control::Continue
        }
        TransferEvent::Progress { acked, total } => {
            plan.acked[usize::from(to_host)].store(acked, Ordering::SeqCst);
            if acked * 3 < total {
                return Control::Continue;
            }
            fired = true;
            let injects = match plan.fault {
                f if f.per_port() => true,
                f if f.to_host_injects() => to_host,
                _ => plan.claim(),
            };
            if !injects {
                return Control::Continue;
            }
            plan.injected_by[usize::from(to_host)].store(true, Ordering::SeqCst);
            let [into, out] = [0, 1].map(|i| plan.acked[i].load(Ordering::SeqCst));
            let by = if to_host { "to-host" } else { "to-guest" };
            let text = format!("{} injected by the {by} stream; acknowledged: in {into}, out {out}", plan.fault.name());
            log::info!("faults: {text}");
            plan.note(&format!("fault: {text}"));
            match plan.fault {
                Fault::HostDrop => {
                    own = Some(Instant::now());
                    plan.mark_injected();
                    Control::DropSession
                }
                Fault::GuestReopen => {
                    own = Some(Instant::now());
                    plan.mark_injected();
                    Control::ReopenGuest
                }
                Fault::Replug => {
                    own = Some(Instant::now());
                    plan.mark_injected();
                    match replug_port(&plan.qmp, port, crate::speed::scaled(UNPLUG_DEADLINE)) {
                        Ok(()) => Control::Continue,
                        Err(e) => {
                            log::warn!("faults: replug of {} failed: {e}", port.name);
                            Control::DropSession
                        }
                    }
                }
                Fault::StopCont | Fault::HostDropDuringStop => {
                    plan.mark_injected();
                    if let Err(e) = plan.qmp.stop() {
                        log::warn!("faults: stop failed: {e}");
                    }
                    plan.stopped.store(true, Ordering::SeqCst);
                    Control::Continue
                }
                Fault::HostDropQueueFull => {
                    // The hook holds the receiving loop: the host reads nothing until QEMU
                    // says it throttled the port (its out queue and the socket are full).
                    plan.mark_injected();
                    match watch_throttle(plan.qemu_stderr.as_deref()) {
                        Ok(()) => plan.throttled.store(true, Ordering::SeqCst),
                        Err(e) => log::warn!("faults: {e}"),
                    }
                    // The fault is the host leaving, now: the times back to READY count from
                    // here, not from the wait for the throttle (up to THROTTLE_SETTLE when the
                    // port was throttled already).
                    own = Some(Instant::now());
                    Control::DropSession
                }
                Fault::MigrateLive | Fault::MigrateFile | Fault::RestoreTwice => {
                    plan.mark_injected();
                    match plan.migration.as_ref().map(|m| m.run(&plan.qmp)) {
                        Some(Ok(took)) => log::info!("faults: migrated in {} ms", took.as_millis()),
                        Some(Err(e)) => log::warn!("faults: the migration failed: {e}"),
                        None => log::warn!("faults: a migration fault without a migration"),
                    }
                    Control::Continue
                }
                Fault::AgentKill => {
                    // The key press reaches the guest some time after QMP returns: the hook
                    // holds the stream until /init says it restarted the killed agent.
                    plan.mark_injected();
                    let tail = plan.console.as_deref().map(LogTail::from_end).transpose();
                    let killed = tail.and_then(|tail| {
                        let mut tail = tail.ok_or("no guest console to watch")?;
                        plan.qmp.send_keys(&["alt", "sysrq", "i"]).map_err(|e| format!("send-key alt-sysrq-i: {e}"))?;
                        wait_for_line(&mut tail, AGENT_RESTARTING, crate::speed::scaled(KEY_DEADLINE))
                    });
                    if let Err(e) = killed {
                        log::warn!("faults: {e}");
                    }
                    Control::Continue
                }
                Fault::SystemReset => {
                    plan.mark_injected();
                    // vport's VMs run with -no-reboot, under which system_reset would shut QEMU
                    // down; the suite sets the reboot action back to shutdown after the case.
                    let reset = plan.qmp.set_reboot_action("reset").and_then(|()| plan.qmp.system_reset());
                    if let Err(e) = reset {
                        log::warn!("faults: system_reset: {e}");
                    }
                    Control::Continue
                }
                Fault::GuestReboot => {
                    // As for SystemReset, the reboot must not end QEMU (-no-reboot); the hook
                    // holds the stream until /init says the agent ended and it reboots.
                    plan.mark_injected();
                    let tail = plan.console.as_deref().map(LogTail::from_end).transpose();
                    let rebooting = tail.and_then(|tail| {
                        let mut tail = tail.ok_or("no guest console to watch")?;
                        plan.qmp.set_reboot_action("reset").map_err(|e| format!("set-action: {e}"))?;
                        let keys = ["ctrl", "alt", "delete"];
                        plan.qmp.send_keys(&keys).map_err(|e| format!("send-key ctrl-alt-delete: {e}"))?;
                        wait_for_line(&mut tail, GUEST_REBOOTING, crate::speed::scaled(KEY_DEADLINE))
                    });
                    if let Err(e) = rebooting {
                        log::warn!("faults: {e}");
                    }
                    Control::Continue
                }
                Fault::QemuKill => {
                    plan.mark_injected();
                    let pid = nix::unistd::Pid::from_raw(i32::try_from(plan.qemu_pid).unwrap_or(i32::MAX));
                    if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL) {
                        log::warn!("faults: cannot kill qemu {pid}: {e}");
                    }
                    Control::Continue
                }
            }
        }
        TransferEvent::Reconnecting { waited } => {
            let to = if to_host { "to-host" } else { "to-guest" };
            plan.note(&format!(
                "liveness: the {to} stream's port {} gave no session within {} ms while the vm ran; the host \
                 leaves and connects again",
                port.name,
                waited.as_millis()
            ));
            Control::Continue
        }
        TransferEvent::Session { number } if number > 1 && back_to_ready.is_none() => {
            *back_to_ready = since(own);
            Control::Continue
        }
        TransferEvent::Accepted { .. } if back_to_ready.is_some() && resumed.is_none() => {
            *resumed = since(own);
            Control::Continue
        }
        _ => Control::Continue,
    }
}

/// How long a port throttled before the host stopped reading must stay so to count.
const THROTTLE_SETTLE: Duration = Duration::from_millis(500);
/// How long the host may hold its reading before QEMU throttles the port.
const THROTTLE_DEADLINE: Duration = Duration::from_secs(10);

/// How long the guest may take to act on a key press.
const KEY_DEADLINE: Duration = Duration::from_secs(10);

/// Waits until QEMU's stderr (`path`, with the throttle trace) shows the port throttled
/// while the host reads nothing.
fn watch_throttle(path: Option<&Path>) -> Result<(), String> {
    let path = path.ok_or("no QEMU stderr to read its trace from")?;
    let mut tail = LogTail::from_end(path)?;
    let before = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    wait_throttled(
        &mut tail,
        last_throttled(&String::from_utf8_lossy(&before)),
        THROTTLE_SETTLE,
        crate::speed::scaled(THROTTLE_DEADLINE),
    )
}

/// Where the to-host stream comes from.
pub(super) enum GuestSource<'a> {
    /// A file of the guest's stream directory.
    File(&'a str),
    /// The agent's pattern (`seed`, `total` bytes): survives a guest reset.
    Pattern { seed: u64, total: u64 },
}

/// One port of a case: its server and description.
pub(super) struct CasePort<'a> {
    pub(super) server: &'a mut PortServer,
    pub(super) info: &'a PortInfo,
}

/// Runs one case: `local` (already written) into the guest as `name` on `into`, and `source`
/// out of the guest to `dest` on `out_of`, both at once.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_case(
    plan: &Arc<Plan>,
    into: CasePort<'_>,
    out_of: CasePort<'_>,
    local: &Path,
    name: &str,
    source: GuestSource<'_>,
    dest: &Path,
    opts: &TransferOptions,
) -> (Leg, Leg) {
    let failed_after = |result: &Result<TransferReport, TransferError>| {
        result.as_ref().err().and(plan.injected_at()).map(|t| t.elapsed())
    };
    std::thread::scope(|scope| {
        let to_guest = scope.spawn(|| {
            let (mut ready, mut resumed) = (None, None);
            let CasePort { server, info } = into;
            let result = ToGuest::new(&info.name, local, name, opts.clone()).and_then(|mut s| {
                let mut source =
                    Injector { server, port: info, plan: plan.clone(), owner: false, resumed_vm: false, renewed: 0 };
                s.run(&mut source, &mut hook(plan, info, false, &mut ready, &mut resumed))
            });
            let failed_after = failed_after(&result);
            let injected = plan.injected_by[0].load(Ordering::SeqCst);
            Leg { result, back_to_ready: ready, resumed, failed_after, injected }
        });
        let to_host = scope.spawn(|| {
            let (mut ready, mut resumed) = (None, None);
            let CasePort { server, info } = out_of;
            let stream = match source {
                GuestSource::File(file) => ToHost::new(&info.name, file, dest, opts.clone()),
                GuestSource::Pattern { seed, total } => ToHost::pattern(&info.name, seed, total, dest, opts.clone()),
            };
            let result = stream.and_then(|mut s| {
                let mut source =
                    Injector { server, port: info, plan: plan.clone(), owner: true, resumed_vm: false, renewed: 0 };
                s.run(&mut source, &mut hook(plan, info, true, &mut ready, &mut resumed))
            });
            let failed_after = failed_after(&result);
            let injected = plan.injected_by[1].load(Ordering::SeqCst);
            Leg { result, back_to_ready: ready, resumed, failed_after, injected }
        });
        let join = |h: std::thread::ScopedJoinHandle<'_, Leg>| {
            h.join().unwrap_or_else(|_| Leg {
                result: Err(TransferError::Protocol {
                    port: String::new(),
                    id: 0,
                    detail: "the stream's thread panicked".into(),
                }),
                back_to_ready: None,
                resumed: None,
                failed_after: None,
                injected: false,
            })
        };
        (join(to_guest), join(to_host))
    })
}
