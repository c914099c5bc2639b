//! The guest group's VM: the agent's control port and the target ports an ordinary guest
//! program uses (the agent does not serve them), and what the cases pass on to each other.

use super::super::case::CaseError;
use super::super::options::SuiteOptions;
use super::super::recorder::Recorder;
use super::super::support::boot;
use super::super::trace::{Traced, VmTrace};
use super::program::Guest;
use crate::qemu::{PortConfig, PortKind};
use crate::rig::Rig;
use crate::session::Reconnect;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The agent's control port.
pub(super) const CTL: &str = "org.vport.ops.ctl";
/// Read, write and poll cases.
pub(super) const P: &str = "other.vport.p";
/// Host data before the guest opens; discard at close.
pub(super) const Q: &str = "other.vport.q";
/// Guest -> host loss on host disconnect.
pub(super) const L: &str = "other.vport.loss";
/// A virtconsole (its vport node refuses open).
pub(super) const CON: &str = "other.vport.con";
/// Hot-plugged for SIGIO on data and unplug.
pub(super) const HOT: &str = "other.vport.sig";

/// The guest group's state.
pub(crate) struct GuestGroup {
    pub(super) rig: Rig,
    pub(super) trace: VmTrace,
    pub(super) g: Guest,
    pub(super) t: Duration,
    /// The guest's handle on P, left open by the blocking-write cases.
    pub(super) hp: Option<u32>,
    /// The host end of P, connected by the blocking-write cases.
    pub(super) host_p: Option<Traced<UnixStream>>,
    /// The guest's handle on Q and Q's host end, left by `host-writes-before-guest-opens`.
    pub(super) hq: Option<(u32, Traced<UnixStream>)>,
}

/// Boots the VM and makes the control session.
pub(crate) fn setup(opts: &SuiteOptions, rec: &mut Recorder<'_>) -> Result<GuestGroup, CaseError> {
    let console = PortConfig { kind: PortKind::Console, ..PortConfig::serial(CON) };
    let ports =
        vec![PortConfig::serial(CTL), PortConfig::serial(P), PortConfig::serial(Q), PortConfig::serial(L), console];
    let mut rig = boot(opts, ports, |_| {})?;
    rec.watch_vm(&rig.vm);
    let trace = rec.trace_vm(&rig, "")?;
    let mut server = trace.serve(&rig, CTL)?;
    server.set_reconnect(Reconnect::Once);
    server.connect(opts.hello_timeout)?;
    rig.resume()?;
    let session = server.accept(opts.hello_timeout)?;
    rec.note_versions(&rig, &session.handshake().hello.kernel_release);
    let t = opts.reply_timeout;
    Ok(GuestGroup { rig, trace, g: Guest { session, t }, t, hp: None, host_p: None, hq: None })
}
