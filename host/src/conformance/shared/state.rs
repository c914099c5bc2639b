//! The shared group's VM and what its cases pass on to each other: two ports served by the
//! agent (A, where most cases run, and B, a second session to ask through when A is stuck),
//! and a port hot-plugged by one case and unplugged by the next. Every conversation with the
//! agent is a [`Session`] from the port's [`PortServer`].

use super::super::case::{chain, CaseError};
use super::super::options::SuiteOptions;
use super::super::recorder::Recorder;
use super::super::support::boot;
use super::super::trace::VmTrace;
use crate::client::AgentClient;
use crate::link::stat;
use crate::qemu::{PortConfig, PortInfo};
use crate::rig::Rig;
use crate::session::{PortServer, Session, SessionError};
use std::time::{Duration, Instant};

/// Port A: the agent's port most cases use.
pub(super) const A: &str = "org.vport.conf.a";
/// Port B: opened by the guest before any host connects; the diagnosis asks through it.
pub(super) const B: &str = "org.vport.conf.b";
/// Hot-plugged by `hotplug-add`, unplugged by `hotplug-del-open`.
pub(super) const HOT: &str = "org.vport.conf.hot";

/// The first contact on port A: the host client was connected before the guest ran.
pub(crate) struct FirstContact {
    /// The handshake: how long after `cont` the session was READY, and how many
    /// HELLO_REQUESTs it took; or why it did not become READY.
    pub(crate) hello: Result<(Duration, u32), SessionError>,
    /// `query-chardev` `frontend-open` of A right after: whether the guest had opened it.
    pub(crate) frontend_open: Option<bool>,
}

/// The shared group's state.
pub(crate) struct Shared {
    pub(super) rig: Rig,
    pub(super) trace: VmTrace,
    pub(super) a: PortInfo,
    pub(super) b: PortInfo,
    /// A's session server (it connects again when a case made the host leave).
    pub(super) server: PortServer,
    /// The session on A, if the last handshake made one.
    pub(super) session: Option<Session>,
    pub(super) first: FirstContact,
    /// The session on B, once `guest-opens-before-host-connects` made it.
    pub(super) session_b: Option<Session>,
    /// The guest's boot id as of the last HELLO.
    pub(super) boot_id: String,
    /// The hot-plugged port and its session.
    pub(super) hot: Option<(PortInfo, Session)>,
    pub(super) reply_timeout: Duration,
    pub(super) hello_timeout: Duration,
    pub(super) reopen_cycles: u32,
}

impl Shared {
    /// The session on A, when the last handshake on A made one.
    pub(super) fn session_a(&mut self) -> Result<&mut Session, CaseError> {
        match (&mut self.session, &self.first.hello) {
            (Some(s), _) => Ok(s),
            (None, Err(e)) => Err(CaseError::Other(format!(
                "port A has no session: its first handshake failed ({}; see host-connects-before-guest-opens)",
                chain(e)
            ))),
            (None, Ok(_)) => Err(CaseError::Other("port A has no session: an earlier case lost it".into())),
        }
    }

    /// The host client of A leaves and a new one connects (in that order on the trace and on
    /// the socket); returns the new session.
    pub(super) fn reconnect_a(&mut self, timeout: Duration) -> Result<&mut Session, CaseError> {
        self.session = None;
        self.server.disconnect();
        self.session = Some(self.server.accept(timeout)?);
        self.session_a()
    }
}

/// Boots the VM with A and B, connects A before the guest runs, lets it run, and tries the
/// first handshake (its outcome is `host-connects-before-guest-opens`' observation; a failed
/// handshake does not fail the group).
pub(crate) fn setup(opts: &SuiteOptions, rec: &mut Recorder<'_>) -> Result<Shared, CaseError> {
    // vport's base arguments include -no-reboot, under which QEMU 7.2 turns QMP system_reset
    // into a shutdown (reboot action "shutdown"); `-action reboot=reset` restores the reset.
    let mut rig = boot(opts, vec![PortConfig::serial(A), PortConfig::serial(B)], |c| {
        c.extra_args.extend(["-action".into(), "reboot=reset".into()]);
    })?;
    rec.watch_vm(&rig.vm);
    let trace = rec.trace_vm(&rig, "")?;
    let a = rig.port(A)?.clone();
    let b = rig.port(B)?.clone();
    let mut server = trace.serve(&rig, A)?;
    server.connect(opts.hello_timeout)?;
    rig.resume()?;
    let t0 = Instant::now();
    let accepted = server.accept(opts.hello_timeout);
    let after = t0.elapsed();
    let frontend_open = rig.qmp.frontend_open(&a.chardev_id).ok().flatten();
    let mut boot_id = String::new();
    let mut session = None;
    let hello = accepted.map(|s| {
        let hs = s.handshake();
        rec.note_versions(&rig, &hs.hello.kernel_release);
        boot_id = hs.hello.boot_id.clone();
        let requests = hs.requests_sent;
        session = Some(s);
        (after, requests)
    });
    Ok(Shared {
        rig,
        trace,
        a,
        b,
        server,
        session,
        first: FirstContact { hello, frontend_open },
        session_b: None,
        boot_id,
        hot: None,
        reply_timeout: opts.reply_timeout,
        hello_timeout: opts.hello_timeout,
        reopen_cycles: opts.reopen_cycles,
    })
}

/// After a case on port A ended in ERROR: asks the agent for its counters through port B. An
/// answer shows the agent itself is alive, and `missed_wakeups` > 0 says it found data pending on
/// a port that epoll had not reported (the wakeup through B made it look), which separates a
/// lost wakeup in the guest from a lost message.
pub(crate) fn diagnose_through_b(st: &mut Shared) -> String {
    let t = st.reply_timeout;
    match st.session_b.as_mut().map(|b| b.agent_stats(t)) {
        Some(Ok(stats)) => format!(
            "diagnosis: the agent answered on port B; missed_wakeups {} (ports found with data pending and no \
             epoll event)",
            stat(&stats, "missed_wakeups").map_or("unknown".into(), |n| n.to_string())
        ),
        Some(Err(e)) => format!("diagnosis: the agent did not answer on port B either: {e}"),
        None => "diagnosis: no session on port B to ask through".into(),
    }
}
