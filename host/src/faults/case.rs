//! One fault case: a file into the guest and another out of it at the same time, each an
//! acknowledged stream on its own port, with the fault injected when a stream is a third
//! through; what both receivers hold is then checked against what was sent.

use super::Fault;
use crate::qmp::Qmp;
use crate::session::{PortServer, Session, SessionError};
use crate::stream::to_guest::ToGuest;
use crate::stream::to_host::ToHost;
use crate::stream::{
    Control, SessionSource, StreamSide, TransferError, TransferEvent, TransferOptions, TransferReport,
};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The fault of one case, shared by its two streams. VM-wide faults (`stop`) are injected by
/// the to-host stream only; the to-guest stream lives through them.
pub(super) struct Plan {
    pub(super) fault: Fault,
    pub(super) qmp: Arc<Qmp>,
    stopped: AtomicBool,
    injected_at: Mutex<Option<Instant>>,
}

impl Plan {
    pub(super) fn new(fault: Fault, qmp: Arc<Qmp>) -> Arc<Plan> {
        Arc::new(Plan { fault, qmp, stopped: AtomicBool::new(false), injected_at: Mutex::new(None) })
    }

    fn injected_at(&self) -> Option<Instant> {
        *self.injected_at.lock().unwrap_or_else(|e| e.into_inner())
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
}

/// The server of one stream, with the fault's session-side part: after the VM was stopped,
/// the owner resumes it (for [`Fault::HostDropDuringStop`], after leaving first).
struct Injector<'a> {
    server: &'a mut PortServer,
    plan: Arc<Plan>,
    owner: bool,
    resumed_vm: bool,
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
        self.server.accept(timeout)
    }
    fn reconnect(&mut self) {
        self.server.disconnect();
    }
    fn vm_paused(&self) -> bool {
        self.server.vm_paused()
    }
}

/// The hook of one stream: injects the fault at a third of the stream and times the recovery.
fn hook<'a>(
    plan: &'a Plan,
    owner: bool,
    back_to_ready: &'a mut Option<Duration>,
    resumed: &'a mut Option<Duration>,
) -> impl FnMut(&TransferEvent) -> Control + 'a {
    let mut fired = false;
    // When this stream's own fault was injected (per-port faults), else the VM-wide one's.
    let mut own: Option<Instant> = None;
    let since = move |own: Option<Instant>| own.or_else(|| plan.injected_at()).map(|t| t.elapsed());
    move |e| match *e {
        TransferEvent::Progress { acked, total } if !fired && acked * 3 >= total => {
            fired = true;
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
                Fault::StopCont | Fault::HostDropDuringStop if owner => {
                    plan.mark_injected();
                    if let Err(e) = plan.qmp.stop() {
                        log::warn!("faults: stop failed: {e}");
                    }
                    plan.stopped.store(true, Ordering::SeqCst);
                    Control::Continue
                }
                Fault::StopCont | Fault::HostDropDuringStop => Control::Continue,
            }
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

/// Runs one case: `local` (already written) into the guest as `name` on `into`, and the
/// guest's `source_name` out to `dest` on `out_of`, both at once.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_case(
    plan: &Arc<Plan>,
    into: &mut PortServer,
    out_of: &mut PortServer,
    local: &Path,
    name: &str,
    source_name: &str,
    dest: &Path,
    opts: &TransferOptions,
) -> (Leg, Leg) {
    std::thread::scope(|scope| {
        let to_guest = scope.spawn(|| {
            let (mut ready, mut resumed) = (None, None);
            let result = ToGuest::new(&into.port(), local, name, opts.clone()).and_then(|mut s| {
                let mut source = Injector { server: into, plan: plan.clone(), owner: false, resumed_vm: false };
                s.run(&mut source, &mut hook(plan, false, &mut ready, &mut resumed))
            });
            Leg { result, back_to_ready: ready, resumed }
        });
        let to_host = scope.spawn(|| {
            let (mut ready, mut resumed) = (None, None);
            let result = ToHost::new(&out_of.port(), source_name, dest, opts.clone()).and_then(|mut s| {
                let mut source = Injector { server: out_of, plan: plan.clone(), owner: true, resumed_vm: false };
                s.run(&mut source, &mut hook(plan, true, &mut ready, &mut resumed))
            });
            Leg { result, back_to_ready: ready, resumed }
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
            })
        };
        (join(to_guest), join(to_host))
    })
}
