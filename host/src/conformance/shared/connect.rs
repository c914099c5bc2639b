//! The shared group's cases about who connects when: the host before the guest opens, the
//! guest before the host connects, the guest closing and reopening, a second host client,
//! fast reopen cycles, and the host leaving while the VM is paused.

use super::super::case::{chain, CaseError, Observation};
use super::super::support::{collect_vserport, wait_frontend, wait_vserport, EVENT_WINDOW};
use super::state::{FirstContact, Shared, A, B};
use crate::client::AgentClient;
use crate::link::stat;
use crate::session::{Backlog, EndReason, Reconnect, SessionError};
use crate::wait::WaitError;
use std::time::{Duration, Instant};
use vport_common::Message;
use vport_common::Phase;

/// `host-connects-before-guest-opens`: judges the set-up's first handshake.
pub(super) fn host_connects_before_guest_opens(st: &mut Shared) -> Result<Observation, CaseError> {
    judge_host_first(&st.first)
}

/// PASS: READY, and QEMU shows the guest's open. FAIL: the guest opened the port (QEMU shows
/// it open) and never offered a session, so it never saw the host that was there first; or
/// READY while QEMU shows the port closed. ERROR: no session and the guest never opened the
/// port (the agent did not run), which says nothing about the spec row.
pub(crate) fn judge_host_first(c: &FirstContact) -> Result<Observation, CaseError> {
    match (&c.hello, c.frontend_open) {
        (Ok((after, requests)), fo) => Ok(Observation::check(
            fo == Some(true),
            format!("READY {:.1} s after cont, {requests} HELLO_REQUEST(s); frontend-open {fo:?}", after.as_secs_f64()),
        )),
        (Err(e @ SessionError::Timeout { .. }), Some(true)) => Ok(Observation::check(
            false,
            format!(
                "the guest opened the port (frontend-open true) but never offered a session: it did not see the \
                 host client connected before it opened ({})",
                chain(e)
            ),
        )),
        (Err(e), fo) => Err(CaseError::Other(format!("no session on port A, frontend-open {fo:?}: {}", chain(e)))),
    }
}

/// `guest-opens-before-host-connects`: the guest opens B with no host client (QEMU shows it
/// open), then a host client connects and the agent offers a session.
pub(super) fn guest_opens_before_host_connects(st: &mut Shared) -> Result<Observation, CaseError> {
    let opened = match wait_frontend(&st.rig, &st.b.chardev_id, true, st.hello_timeout) {
        Ok(after) => Ok(after),
        Err(CaseError::Wait(e @ WaitError::Timeout { .. })) => Err(chain(&e)),
        Err(e) => return Err(e),
    };
    if let Err(why) = opened {
        return Ok(judge_guest_first(Err(why), None));
    }
    let mut server = st.trace.serve(&st.rig, B)?;
    let ready = match server.accept(st.reply_timeout) {
        Ok(session) => {
            let requests = session.handshake().requests_sent;
            st.session_b = Some(session);
            Ok(requests)
        }
        Err(e @ SessionError::Timeout { .. }) => Err(chain(&e)),
        Err(e) => return Err(e.into()),
    };
    Ok(judge_guest_first(Ok(()), Some(ready)))
}

/// PASS: QEMU showed B open with no host client, and a session came once one connected.
/// FAIL: the guest did not open it without a host (`opened` is why), or it had it open and
/// never offered a session after the connect (`ready` is why).
pub(crate) fn judge_guest_first(opened: Result<(), String>, ready: Option<Result<u32, String>>) -> Observation {
    match (opened, ready) {
        (Err(why), _) => {
            Observation::check(false, format!("the guest did not open the port with no host client: {why}"))
        }
        (Ok(()), Some(Ok(requests))) => Observation::check(
            true,
            format!("frontend-open true with no host client; READY after connect ({requests} request(s))"),
        ),
        (Ok(()), Some(Err(why))) => Observation::check(
            false,
            format!("frontend-open true with no host client; after connect no session: {why}"),
        ),
        (Ok(()), None) => Observation::check(false, "frontend-open true with no host client; no connect was tried"),
    }
}

/// `guest-open-close-frontend`: the agent closes A and reopens it 2.5 s later.
pub(super) fn guest_open_close_frontend(st: &mut Shared) -> Result<Observation, CaseError> {
    let t = st.reply_timeout;
    let rx = st.rig.qmp.subscribe();
    let end = st.session_a()?.close_guest(2500, t)?;
    let (rig, a) = (&st.rig, &st.a);
    let t0 = Instant::now();
    let closed = wait_frontend(rig, &a.chardev_id, false, Duration::from_secs(5))?;
    let ev_false = wait_vserport(&rx, &a.id, false, EVENT_WINDOW).map(|i| i - t0);
    wait_frontend(rig, &a.chardev_id, true, Duration::from_secs(15))?;
    let reopened = t0.elapsed();
    let ev_true = wait_vserport(&rx, &a.id, true, EVENT_WINDOW).map(|i| i - t0);
    st.session = Some(st.server.accept(t)?);
    let ms = |d: Option<Duration>| d.map_or("none".to_string(), |d| format!("{} ms", d.as_millis()));
    Ok(Observation::check(
        ev_false.is_some() && ev_true.is_some() && end == EndReason::AgentBye,
        format!(
            "session ended {end:?}; frontend-open false after {} ms, event open=false at {}; reopen after {} ms, \
             event open=true at {}",
            closed.as_millis(),
            ms(ev_false),
            reopened.as_millis(),
            ms(ev_true)
        ),
    ))
}

/// `second-host-client-queued`: a second client on A waits in the socket's backlog while the
/// first is served, and is served, with what it sent, once the first leaves.
pub(super) fn second_host_client_queued(st: &mut Shared) -> Result<Observation, CaseError> {
    let t = st.reply_timeout;
    st.session_a()?;
    let mut second = st.trace.serve(&st.rig, A)?;
    second.set_reconnect(Reconnect::Once);
    second.connect(t)?;
    second.send_before_session(&Message::HelloRequest)?;
    second.send_before_session(&Message::Echo(b"queued-echo".to_vec()))?;
    let first_ok = st.session_a()?.echo(b"first", t)? == b"first";
    // Bounded observation window: the second client must get nothing while the first is active.
    let early = second.accept_offered(Duration::from_millis(700))?;
    let backlog = second.backlog();
    let unserved = early.is_none() && backlog != Backlog::Served;
    // The first leaves (its disconnect is recorded), then QEMU serves the second.
    st.session = None;
    st.server.disconnect();
    let mut session = second.accept(t)?;
    // The second client is A's client from now on, and connects again like the first did.
    second.set_reconnect(Reconnect::default());
    st.server = second;
    let h = session.handshake().clone();
    let mut answers: Vec<String> = h.before.iter().map(|r| format!("{:?}", r.message)).collect();
    let end = Instant::now() + Duration::from_secs(2);
    let mut echo_answered = answers.iter().any(|a| a.contains("EchoReply") || a.contains("Error"));
    while !echo_answered {
        match session.recv(end.saturating_duration_since(Instant::now())) {
            Ok(r) => {
                let s = format!("{:?}", r.message);
                echo_answered = s.contains("EchoReply") || s.contains("Error");
                answers.push(s);
            }
            Err(_) => break,
        }
    }
    let live = session.echo(b"after", t)? == b"after";
    st.session = Some(session);
    Ok(Observation::check(
        first_ok && unserved && h.requests_sent == 0 && echo_answered && live,
        format!(
            "first client served: {first_ok}; second unserved meanwhile: {unserved} (backlog: {backlog:?}); after \
             the first left: HELLO without new requests: {}; queued ECHO answered: {echo_answered} ({}); READY: \
             {live}",
            h.requests_sent == 0,
            answers.join(", ")
        ),
    ))
}

/// `reopen-fast-cycles`: the agent closes and reopens A many times in a row.
pub(super) fn reopen_fast_cycles(st: &mut Shared) -> Result<Observation, CaseError> {
    let t = st.reply_timeout;
    st.session_a()?;
    let rx = st.rig.qmp.subscribe();
    let t0 = Instant::now();
    let n = st.reopen_cycles;
    for _ in 0..n {
        st.session_a()?.reopen_guest(t)?;
        st.session = Some(st.server.accept(t)?);
    }
    let loop_time = t0.elapsed();
    let a = &st.a;
    let fo = st.rig.qmp.frontend_open(&a.chardev_id)?;
    let evs: Vec<bool> = collect_vserport(&rx, EVENT_WINDOW, Duration::from_secs(10))
        .into_iter()
        .filter(|(id, _)| *id == a.id)
        .map(|(_, o)| o)
        .collect();
    let dups = evs.windows(2).filter(|w| w[0] == w[1]).count();
    let missed = stat(&st.session_a()?.agent_stats(t)?, "missed_wakeups").map_or("unknown".into(), |n| n.to_string());
    let seq: String = evs.iter().map(|o| if *o { 'T' } else { 'F' }).collect();
    let bound = loop_time.as_secs() as usize + 3;
    Ok(Observation::check(
        fo == Some(true) && evs.last() == Some(&true) && evs.len() <= bound,
        format!(
            "{n} cycles in {:.1} s ({} guest opens+closes); frontend-open {fo:?}; {} VSERPORT_CHANGE events \
             [{seq}], {dups} repeats of the same value in a row; agent missed_wakeups so far {missed}",
            loop_time.as_secs_f64(),
            2 * n,
            evs.len()
        ),
    ))
}

/// `pause-host-disconnect`: the host leaves A while the VM is stopped.
pub(super) fn pause_host_disconnect(st: &mut Shared) -> Result<Observation, CaseError> {
    let t = st.reply_timeout;
    let old_session = st.session_a()?.id().session;
    st.rig.qmp.stop()?;
    let stop_end = st.session_a()?.wait_end(t).map_err(|e| chain(&e));
    st.session = None;
    st.server.disconnect();
    // The disconnect happens while paused; QEMU notices it in its main loop.
    let status = st.rig.qmp.query_status()?;
    st.rig.qmp.cont()?;
    let session = st.session.insert(st.server.accept(Duration::from_secs(30))?);
    let requests = session.handshake().requests_sent;
    let big = vec![0x5Au8; 60 * 1024];
    let flows = session.echo(&big, t)? == big && stop_end == Ok(EndReason::VmStopped);
    let ev = session.events(0, t)?;
    let seen = ev.records.iter().find(|r| r.session == old_session && r.to == Phase::Disconnected);
    let seen_s = seen.map_or("no record".to_string(), |r| format!("{} -> DISCONNECTED ({})", r.from.name(), r.cause));
    let observed = format!(
        "the session ended {stop_end:?} at stop; status during disconnect {status}; guest saw the old session \
         end: {seen_s}; new client READY ({requests} request(s)); 60 KiB echo: {flows}"
    );
    Ok(match (flows, seen.is_some()) {
        (true, true) => Observation::check(true, observed),
        (true, false) => Observation::quirk(
            observed,
            "the guest never saw the disconnect made during the pause (QEMU replays only OPENED on resume); \
             the new client still reached READY because vport asks with HELLO_REQUEST",
        ),
        (false, _) => Observation::check(false, observed),
    })
}
