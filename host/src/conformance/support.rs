//! What the groups share: booting a VM for the suite, and bounded waits on QEMU's view of a
//! port (`query-chardev` `frontend-open`, `VSERPORT_CHANGE` events).

use super::case::CaseError;
use super::options::SuiteOptions;
use crate::qemu::{PortConfig, VmConfig};
use crate::qmp::QmpEvent;
use crate::rig::{vm_config, Rig};
use crate::wait::wait_until;
use crossbeam_channel::Receiver;
use std::time::{Duration, Instant};

/// The agent flag that turns guest operations on.
pub const GUEST_OPS_FLAG: &str = "--allow-guest-ops";
/// The agent's flag that makes it serve consoles (`/dev/hvcN`) as ports.
pub const CONSOLES_FLAG: &str = "--consoles";
/// QMP rate-limits VSERPORT_CHANGE to one per second per id; a window of this length after a
/// change is sure to contain the (possibly delayed) event.
pub(crate) const EVENT_WINDOW: Duration = Duration::from_millis(2500);

/// Starts QEMU (paused) with the suite's image and agent arguments, `ports`, and what `tweak`
/// changes.
pub(crate) fn boot(
    opts: &SuiteOptions,
    ports: Vec<PortConfig>,
    tweak: impl FnOnce(&mut VmConfig),
) -> Result<Rig, CaseError> {
    // The suite observes other ports through guest operations, which the agent refuses unless
    // told otherwise: this image turns them on explicitly.
    let mut args = opts.agent_args.clone();
    if !args.iter().any(|a| a == GUEST_OPS_FLAG) {
        args.push(GUEST_OPS_FLAG.into());
    }
    let mut cfg = vm_config(&opts.image, &[], &args);
    cfg.accel = opts.accel;
    opts.platform.apply(&mut cfg);
    cfg.ports = ports;
    tweak(&mut cfg);
    Ok(Rig::launch(cfg)?)
}

/// The liveness check of every wait: QEMU still runs.
pub(crate) fn alive(rig: &Rig) -> impl FnMut() -> Result<(), String> + '_ {
    || rig.vm.check_alive()
}

/// Waits until `query-chardev` says `frontend-open == open` for `chardev`; returns how long it took.
pub(crate) fn wait_frontend(rig: &Rig, chardev: &str, open: bool, timeout: Duration) -> Result<Duration, CaseError> {
    let t0 = Instant::now();
    wait_until(
        &format!("frontend-open={open} on chardev {chardev}"),
        timeout,
        Duration::from_millis(5),
        alive(rig),
        || (rig.qmp.frontend_open(chardev).ok().flatten() == Some(open)).then_some(()),
    )?;
    Ok(t0.elapsed())
}

/// Waits up to `timeout` for VSERPORT_CHANGE {id, open}; returns when it came.
pub(crate) fn wait_vserport(rx: &Receiver<QmpEvent>, id: &str, open: bool, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let ev = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok()?;
        if ev.vserport_change() == Some((id, open)) {
            return Some(ev.received);
        }
    }
}

/// VSERPORT_CHANGE events (id, open) received until no event at all came for `quiet`, or
/// until `max` passed.
pub(crate) fn collect_vserport(rx: &Receiver<QmpEvent>, quiet: Duration, max: Duration) -> Vec<(String, bool)> {
    let end = Instant::now() + max;
    let mut out = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now()).min(quiet);
        match rx.recv_timeout(left) {
            Ok(ev) => {
                if let Some((id, open)) = ev.vserport_change() {
                    out.push((id.to_string(), open));
                }
            }
            Err(_) => return out,
        }
    }
}
