//! The soak's cycles, each repeated many times on a running VM: the host leaving and coming
//! back, the guest closing and reopening, `stop`/`cont`, and the port unplugged and plugged in
//! again under an acknowledged stream. Each returns what it measured; the suite judges.

use crate::client::AgentClient;
use crate::link::stat;
use crate::qemu::PortInfo;
use crate::qmp::Qmp;
use crate::rig::replug_port;
use crate::session::{PortServer, Session};
use crate::stream::replug::ReplugSource;
use crate::stream::to_guest::ToGuest;
use crate::stream::{Control, StreamSide, TransferError, TransferEvent, TransferOptions, TransferReport};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one cycle may take to give a READY session again.
pub(super) const CYCLE_DEADLINE: Duration = Duration::from_secs(30);
/// How long a STATS reply may take.
const REPLY: Duration = Duration::from_secs(10);
/// How long QEMU may take to confirm an unplug.
const UNPLUG_DEADLINE: Duration = Duration::from_secs(15);

/// What one kind of cycle measured: how many cycles completed, the time each took to give a
/// READY session, and what the agent counted meanwhile.
#[derive(Debug, Default, Clone)]
pub(super) struct CycleFigures {
    /// Cycles completed (a READY session after each).
    pub(super) done: u64,
    /// Time from the fault to READY, per cycle.
    pub(super) ready: Vec<Duration>,
    /// The agent's count (of sessions, opens) before and after.
    pub(super) agent_before: u64,
    pub(super) agent_after: u64,
}

impl CycleFigures {
    /// `median / max` of the times back to READY, in milliseconds.
    pub(super) fn ready_summary(&self) -> String {
        let mut ms: Vec<u128> = self.ready.iter().map(Duration::as_millis).collect();
        ms.sort_unstable();
        match (ms.get(ms.len() / 2), ms.last()) {
            (Some(median), Some(max)) => format!("READY again after median {median} ms, max {max} ms"),
            _ => "no cycle completed".into(),
        }
    }
}

/// A port counter of the agent's STATS, in `session`.
pub(super) fn port_counter(session: &mut Session, name: &str) -> Result<u64, String> {
    let stats = session.agent_stats(crate::speed::scaled(REPLY)).map_err(|e| format!("STATS failed: {e}"))?;
    stat(&stats, name).ok_or_else(|| format!("the agent's STATS has no {name}"))
}

/// The agent's resident set (KiB) and open file descriptors, in `session`.
pub(super) fn agent_usage(session: &mut Session) -> Result<(u64, u64), String> {
    let stats = session.agent_stats(crate::speed::scaled(REPLY)).map_err(|e| format!("STATS failed: {e}"))?;
    match (stat(&stats, "rss_kib"), stat(&stats, "open_fds")) {
        (Some(rss), Some(fds)) => Ok((rss, fds)),
        _ => Err("the agent's STATS has no rss_kib or open_fds: install the vport-agent of this vport".into()),
    }
}

fn next(server: &mut PortServer, what: &str, cycle: u64) -> Result<Session, String> {
    server.accept(crate::speed::scaled(CYCLE_DEADLINE)).map_err(|e| format!("{what} {cycle}: no READY session: {e}"))
}

/// `count` cycles of `fault` on `server`'s port: each takes the live session (and ends it, or
/// makes it end), returns when READY is to be timed from, and the next READY session is
/// awaited. Counts the agent's port `counter` around the cycles.
fn run_cycles(
    server: &mut PortServer,
    what: &str,
    counter: &str,
    count: u64,
    progress: &mut dyn FnMut(u64),
    mut fault: impl FnMut(Session, u64) -> Result<Instant, String>,
) -> Result<CycleFigures, String> {
    let mut session = next(server, what, 0)?;
    let mut fig = CycleFigures { agent_before: port_counter(&mut session, counter)?, ..Default::default() };
    for cycle in 1..=count {
        let t0 = fault(session, cycle)?;
        session = next(server, what, cycle)?;
        fig.ready.push(t0.elapsed());
        fig.done = cycle;
        progress(cycle);
    }
    fig.agent_after = port_counter(&mut session, counter)?;
    Ok(fig)
}

/// `count` times: the host leaves (the session is dropped) and connects again, until READY.
/// Counts the agent's port `sessions` around the cycles.
pub(super) fn host_reconnects(
    server: &mut PortServer,
    count: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<CycleFigures, String> {
    run_cycles(server, "reconnect", "sessions", count, progress, |session, _| {
        drop(session);
        Ok(Instant::now())
    })
}

/// `count` times: the agent closes the port and opens it again (REOPEN), until READY. Counts
/// the agent's port `opens` around the cycles.
pub(super) fn guest_reopens(
    server: &mut PortServer,
    count: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<CycleFigures, String> {
    run_cycles(server, "reopen", "opens", count, progress, |mut session, cycle| {
        let t0 = Instant::now();
        session.reopen_guest(crate::speed::scaled(CYCLE_DEADLINE)).map_err(|e| format!("reopen {cycle}: {e}"))?;
        Ok(t0)
    })
}

/// `count` times: `stop`, then `cont`, then a READY session again (a STOP ends the session;
/// the connection stays). The time is from `cont`.
pub(super) fn stop_conts(
    server: &mut PortServer,
    qmp: &Qmp,
    count: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<CycleFigures, String> {
    run_cycles(server, "stop/cont", "sessions", count, progress, |session, cycle| {
        qmp.stop().map_err(|e| format!("stop {cycle}: {e}"))?;
        qmp.cont().map_err(|e| format!("cont {cycle}: {e}"))?;
        let t0 = Instant::now();
        // Ended by the STOP: dropping it does not close the connection.
        drop(session);
        Ok(t0)
    })
}

/// What the unplug cycles measured: the stream that ran through them and the cycles.
pub(super) struct ReplugFigures {
    pub(super) cycles: CycleFigures,
    pub(super) stream: Result<TransferReport, TransferError>,
}

/// `count` times under traffic: while `local` streams into the guest as `name` (an
/// acknowledged stream), the port is unplugged and plugged in again once each session has
/// acknowledged another `step` bytes; the stream resumes on the new port. The stream must end
/// whole: its digest is checked by the agent. `local` must be long enough for `count` sessions
/// of `step` bytes and a window more each (acknowledgements of bytes in flight still arrive
/// after the unplug).
#[allow(clippy::too_many_arguments)]
pub(super) fn replugs(
    server: PortServer,
    port: &PortInfo,
    qmp: &Arc<Qmp>,
    local: &Path,
    name: &str,
    step: u64,
    count: u64,
    opts: &TransferOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<ReplugFigures, String> {
    let mut source = ReplugSource::new(server, port.clone(), qmp.clone());
    let mut stream = ToGuest::new(&port.name, local, name, opts.clone()).map_err(|e| e.to_string())?;
    let mut fig = CycleFigures::default();
    let mut unplugged_at: Option<Instant> = None;
    // The acknowledged offset at the session's first progress.
    let mut base: Option<u64> = None;
    let mut failure: Option<String> = None;
    let result = stream.run(&mut source, &mut |e| match *e {
        TransferEvent::Progress { acked, .. } if fig.done < count && unplugged_at.is_none() => {
            if acked < *base.get_or_insert(acked) + step {
                return Control::Continue;
            }
            match replug_port(qmp, port, crate::speed::scaled(UNPLUG_DEADLINE)) {
                Ok(()) => {
                    unplugged_at = Some(Instant::now());
                    Control::Continue
                }
                Err(e) => {
                    failure = Some(format!("replug {}: {e}", fig.done + 1));
                    Control::DropSession
                }
            }
        }
        TransferEvent::Session { .. } => {
            base = None;
            if let Some(t0) = unplugged_at.take() {
                fig.ready.push(t0.elapsed());
                fig.done += 1;
                progress(fig.done);
            }
            Control::Continue
        }
        _ => Control::Continue,
    });
    if let Some(f) = failure {
        return Err(f);
    }
    Ok(ReplugFigures { cycles: fig, stream: result })
}
