//! The shared group's cases about the system calls the agent makes on its own port: a second
//! open, seeks, a non-blocking read, poll, and SIGIO.

use super::super::case::{CaseError, Observation};
use super::state::Shared;
use crate::client::AgentClient;
use crate::link::ProbeOutcome;
use nix::libc::{EAGAIN, EBUSY, ESPIPE};
use vport_common::message::{ProbeKind, ProbeTarget, SigioAction};

/// poll(2) bits as the agent reports them (`revents`, a u16 on the wire).
const POLLOUT: u16 = nix::libc::POLLOUT as u16;
const POLLHUP: u16 = nix::libc::POLLHUP as u16;

fn errno_pair(o: &ProbeOutcome) -> String {
    format!("ret {} errno {}", o.ret, o.errno)
}

/// `second-open-ebusy`.
pub(super) fn second_open_ebusy(st: &mut Shared) -> Result<Observation, CaseError> {
    let t = st.reply_timeout;
    let p = st.session_a()?.probe(ProbeKind::Open, ProbeTarget::SecondFd, 0, t)?;
    Ok(Observation::check((p.ret, p.errno) == (-1, EBUSY), errno_pair(&p)))
}

/// `lseek-pread-pwrite-espipe`.
pub(super) fn lseek_pread_pwrite_espipe(st: &mut Shared) -> Result<Observation, CaseError> {
    let t = st.reply_timeout;
    let session = st.session_a()?;
    let mut seen = Vec::new();
    let mut ok = true;
    for kind in [ProbeKind::Lseek, ProbeKind::Pread, ProbeKind::Pwrite] {
        let p = session.probe(kind, ProbeTarget::OwnFd, 0, t)?;
        ok &= (p.ret, p.errno) == (-1, ESPIPE);
        seen.push(format!("{kind:?}: {}", errno_pair(&p)));
    }
    Ok(Observation::check(ok, seen.join("; ")))
}

/// `nonblock-read-eagain`.
pub(super) fn nonblock_read_eagain(st: &mut Shared) -> Result<Observation, CaseError> {
    let t = st.reply_timeout;
    let p = st.session_a()?.probe(ProbeKind::Read, ProbeTarget::OwnFd, 64, t)?;
    Ok(Observation::check((p.ret, p.errno) == (-1, EAGAIN) && p.data.is_empty(), errno_pair(&p)))
}

/// `poll-mask-host-connected`.
pub(super) fn poll_mask_host_connected(st: &mut Shared) -> Result<Observation, CaseError> {
    let t = st.reply_timeout;
    let p = st.session_a()?.probe(ProbeKind::Poll, ProbeTarget::OwnFd, 0, t)?;
    Ok(Observation::check((p.ret, p.mask) == (1, POLLOUT), format!("ret {} revents {:#x}", p.ret, p.mask)))
}

/// `sigio-host-disconnect-connect`: the agent turns SIGIO on for A, the host client leaves
/// and a new one connects.
pub(super) fn sigio_host_disconnect_connect(st: &mut Shared) -> Result<Observation, CaseError> {
    let t = st.reply_timeout;
    let s = st.session_a()?.sigio(SigioAction::Enable, t)?;
    if (s.enabled, s.count) != (true, 0) {
        return Ok(Observation::check(false, format!("enable reported {s:?}")));
    }
    let session = st.reconnect_a(t)?;
    let s = session.sigio(SigioAction::Query, t)?;
    session.sigio(SigioAction::Disable, t)?;
    let masks: Vec<String> = s.samples.iter().map(|x| format!("{:#x}", x.mask)).collect();
    let hup = s.samples.iter().filter(|x| x.mask & POLLHUP != 0).count();
    let mut observed =
        format!("{} signals (handshake data included), poll masks at delivery {masks:?}, {hup} with POLLHUP", s.count);
    if s.count < 2 {
        // What the agent saw in all, to tell a signal never sent from one lost on its way
        // (the real-time queue overflowed into plain SIGIO) or a port that lost its setting.
        let stats = session.agent_stats(t)?;
        let stat = |k| crate::link::stat(&stats, k).map_or("?".to_string(), |v| v.to_string());
        observed.push_str(&format!(
            "; still enabled: {}; this port: {} SIGIO counted ever, {} opens, {} closes; agent-wide: {} plain SIGIO \
             (queue overflow)",
            s.enabled,
            stat("sigio_signals"),
            stat("opens"),
            stat("closes"),
            stat("sigio_overflows")
        ));
    }
    Ok(Observation::check(s.count >= 2, observed))
}
