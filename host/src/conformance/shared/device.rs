//! The shared group's cases about the device: a port hot-plugged and unplugged, and a guest
//! reset.

use super::super::case::{chain, CaseError, Observation};
use super::super::support::{alive, wait_vserport, EVENT_WINDOW};
use super::state::{Shared, HOT};
use crate::client::AgentClient;
use crate::link::stat;
use crate::session::{EndReason, SessionError};
use crate::wait::wait_until;
use std::time::{Duration, Instant};

/// Deadline of the hot-plugged port's first session.
const HOTPLUG_DEADLINE: Duration = Duration::from_secs(30);

/// `hotplug-add`: a port added at run time; the agent takes it.
pub(super) fn hotplug_add(st: &mut Shared) -> Result<Observation, CaseError> {
    let info = st.rig.hotplug_serial_port(HOT, 0)?;
    st.trace.add_port(&info);
    let t0 = Instant::now();
    let mut server = st.trace.serve(&st.rig, HOT)?;
    let (ready, session) = match server.accept(crate::speed::scaled(HOTPLUG_DEADLINE)) {
        Ok(s) => (Ok((t0.elapsed(), s.handshake().requests_sent)), Some(s)),
        Err(e @ SessionError::Timeout { .. }) => (Err(chain(&e)), None),
        Err(e) => return Err(e.into()),
    };
    let frontend_open = st.rig.qmp.frontend_open(&info.chardev_id)?;
    let o = judge_hotplug(ready, frontend_open);
    if let Some(s) = session {
        st.hot = Some((info, s));
    }
    Ok(o)
}

/// PASS: the agent offered a session on the new port and QEMU shows the guest has it open.
/// FAIL: no session within the deadline (`ready` says why), or QEMU shows it closed.
pub(crate) fn judge_hotplug(ready: Result<(Duration, u32), String>, frontend_open: Option<bool>) -> Observation {
    match ready {
        Ok((after, requests)) => Observation::check(
            frontend_open == Some(true),
            format!(
                "READY {} ms after device_add ({requests} request(s)); frontend-open {frontend_open:?}",
                after.as_millis()
            ),
        ),
        Err(why) => Observation::check(
            false,
            format!("the agent did not take the hot-plugged port: {why}; frontend-open {frontend_open:?}"),
        ),
    }
}

/// `hotplug-del-open`: the hot-plugged port is unplugged while open.
pub(super) fn hotplug_del_open(st: &mut Shared) -> Result<Observation, CaseError> {
    let t = st.reply_timeout;
    let open_before = stat(&st.session_a()?.agent_stats(t)?, "ports_open").unwrap_or(0);
    let Some((info, mut hot_session)) = st.hot.take() else {
        return Err(CaseError::Other("hotplug-add did not leave a port".into()));
    };
    let rx = st.rig.qmp.subscribe();
    st.rig.qmp.device_del(&info.id)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut deleted = false;
    let mut vser = Vec::new();
    let mut window_end = deadline;
    while let Ok(ev) = rx.recv_timeout(window_end.saturating_duration_since(Instant::now())) {
        if ev.name == "DEVICE_DELETED" && ev.data.get("device").and_then(|d| d.as_str()) == Some(info.id.as_str()) {
            deleted = true;
            // Keep looking for a VSERPORT_CHANGE for a while after the deletion.
            window_end = Instant::now() + EVENT_WINDOW;
        }
        if let Some((id, open)) = ev.vserport_change() {
            if id == info.id {
                vser.push(open);
            }
        }
    }
    st.rig.vm.remove_port(HOT);
    // The hot port's session saw the unplug too (its server watches DEVICE_DELETED).
    let hot_end = hot_session.wait_end(t).map_err(|e| chain(&e));
    drop(hot_session);
    st.session_a()?;
    let Some(session) = st.session.as_mut() else { return Err(CaseError::Other("port A has no session".into())) };
    let agent_dropped = wait_until(
        "the agent to drop the unplugged port",
        crate::speed::scaled(Duration::from_secs(10)),
        Duration::from_millis(100),
        alive(&st.rig),
        || session.agent_stats(t).ok().and_then(|s| stat(&s, "ports_open")).filter(|n| *n < open_before),
    );
    let after = agent_dropped.as_ref().map_or("unchanged".to_string(), |n| n.to_string());
    Ok(Observation::check(
        deleted && vser.is_empty() && agent_dropped.is_ok() && hot_end == Ok(EndReason::Unplugged),
        format!(
            "DEVICE_DELETED: {deleted}; VSERPORT_CHANGE for the port: {vser:?}; agent ports_open {open_before} -> \
             {after}; the port's session ended: {hot_end:?}"
        ),
    ))
}

/// `system-reset`: the guest is reset; the host's connection stays.
pub(super) fn system_reset(st: &mut Shared) -> Result<Observation, CaseError> {
    st.session_a()?;
    let a_id = st.a.id.clone();
    let rx = st.rig.qmp.subscribe();
    // QEMU emits at most one VSERPORT_CHANGE per second per port and replaces the ones in
    // the window by the latest: a reset inside a window opened by an earlier case would
    // have its open=false replaced by the reboot's open=true. Start in a quiet window: no
    // event for the port for 1.1 s (bounded).
    let quiet_deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < quiet_deadline {
        match rx.recv_timeout(Duration::from_millis(1100)) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => break,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            Ok(_) => continue,
        }
    }
    let t0 = Instant::now();
    st.rig.qmp.system_reset()?;
    // QEMU resets the devices (emitting VSERPORT_CHANGE open=false for open ports) before it
    // emits RESET, so keep every event seen on the way.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let reset = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(ev) if ev.name == "RESET" => break Some(ev.received - t0),
            Ok(ev) => seen.push(ev),
            Err(_) => break None,
        }
    };
    let ev = match seen.iter().find(|e| e.vserport_change() == Some((a_id.as_str(), false))) {
        Some(e) => Some(e.received - t0),
        None => wait_vserport(&rx, &a_id, false, EVENT_WINDOW).map(|i| i - t0),
    };
    // The session on A ends with the reset; the connection stays for the new boot's session.
    let t = st.reply_timeout;
    let a_end = st.session_a()?.wait_end(t).map_err(|e| chain(&e));
    // A HELLO of the old boot may still be in flight: accept until the boot id changes (an old
    // boot's session is kept until the new boot's HELLO ends it).
    let deadline = Instant::now() + st.hello_timeout;
    let session = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match st.server.accept(left.max(Duration::from_secs(1))) {
            Ok(s) if s.handshake().hello.boot_id != st.boot_id || Instant::now() >= deadline => break s,
            Ok(old) => st.session = Some(old),
            Err(e) if st.rig.vm.check_alive().is_err() => {
                return Ok(Observation::check(false, format!("qemu exited after system_reset ({e})")));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let connections = st.server.endpoint_events().history().len();
    log::debug!("system-reset: RESET event after {reset:?}");
    let new_boot = session.handshake().hello.boot_id != st.boot_id;
    st.boot_id = session.handshake().hello.boot_id.clone();
    st.session = Some(session);
    let same_connection = st.server.endpoint_events().history().len() == connections;
    Ok(Observation::check(
        ev.is_some() && new_boot && same_connection && a_end == Ok(EndReason::GuestReset),
        format!(
            "open=false event after {}; the session ended: {a_end:?}; HELLO on the same connection: \
             {same_connection}, after {:.1} s, new boot id: {new_boot}",
            ev.map_or("none".into(), |d| format!("{} ms", d.as_millis())),
            t0.elapsed().as_secs_f64()
        ),
    ))
}
