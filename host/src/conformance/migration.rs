//! Group `migration`: source -> file -> destination 1 -> live (unix socket) -> destination 2.
//! The set-up saves the source to a file and starts destination 1 from it; the file cases
//! judge what destination 1 showed once it ran; the live case migrates destination 1 on.
//! The three VMs' ports have the same names: on the trace they are `src/`, `dst1/` and
//! `dst2/` ports.

use super::case::{chain, Case, CaseError, Observation};
use super::group::Group;
use super::options::SuiteOptions;
use super::recorder::Recorder;
use super::support::{alive, boot, collect_vserport, EVENT_WINDOW};
use super::trace::VmTrace;
use crate::client::AgentClient;
use crate::qemu::PortConfig;
use crate::rig::Rig;
use crate::session::{EndReason, PortServer, Reconnect, Session};
use crate::wait::wait_until;
use std::time::{Duration, Instant};

const MIG_OPEN: &str = "org.vport.conf.mig";
const MIG_CLOSED: &str = "other.vport.conf.closed";

fn mig_ports() -> Vec<PortConfig> {
    vec![PortConfig::serial(MIG_OPEN), PortConfig::serial(MIG_CLOSED)]
}

/// `migrate` to `uri` and waits for `query-migrate` status `completed`.
fn migrate(rig: &Rig, uri: &str) -> Result<Duration, CaseError> {
    let t0 = Instant::now();
    rig.qmp.execute("migrate", Some(serde_json::json!({ "uri": uri })))?;
    let failed: std::cell::RefCell<Option<String>> = std::cell::RefCell::new(None);
    wait_until(
        &format!("migration to {uri} to complete"),
        crate::speed::scaled(Duration::from_secs(120)),
        Duration::from_millis(50),
        || match failed.borrow().as_ref() {
            Some(s) => Err(format!("migration {s}")),
            None => rig.vm.check_alive(),
        },
        || {
            let r = rig.qmp.execute("query-migrate", None).ok()?;
            match r.get("status").and_then(|s| s.as_str()) {
                Some("completed") => Some(()),
                Some(s @ ("failed" | "cancelled")) => {
                    *failed.borrow_mut() = Some(format!("{s}: {r}"));
                    None
                }
                _ => None,
            }
        },
    )?;
    Ok(t0.elapsed())
}

/// Waits until a destination has loaded the incoming state (status leaves `inmigrate`).
fn wait_incoming(rig: &Rig) -> Result<String, CaseError> {
    Ok(wait_until(
        "the destination to load the migration stream",
        crate::speed::scaled(Duration::from_secs(120)),
        Duration::from_millis(50),
        alive(rig),
        || rig.qmp.query_status().ok().filter(|s| s != "inmigrate"),
    )?)
}

/// A session server on the open port of destination `rig`, connected while it loads (once:
/// the case observes that connection).
fn dest_server(trace: &VmTrace, rig: &Rig) -> Result<PortServer, CaseError> {
    let mut server = trace.serve(rig, MIG_OPEN)?;
    server.set_reconnect(Reconnect::Once);
    server.connect(Duration::from_secs(10))?;
    Ok(server)
}

/// After a destination runs: events for both ports, frontend-open of both, and a new session.
struct DestView {
    events: Vec<(String, bool)>,
    open_fo: Option<bool>,
    closed_fo: Option<bool>,
    spontaneous_hello: bool,
    ready: bool,
}

/// Runs the destination `rig` (whose server connected while it was loading) and observes it;
/// returns the view and the destination's session.
fn observe_destination(rig: &mut Rig, server: &mut PortServer, t: Duration) -> Result<(DestView, Session), CaseError> {
    let rx = rig.qmp.subscribe();
    rig.resume()?;
    let events = collect_vserport(&rx, EVENT_WINDOW, Duration::from_secs(8));
    let open_id = rig.port(MIG_OPEN)?.chardev_id.clone();
    let closed_id = rig.port(MIG_CLOSED)?.chardev_id.clone();
    let open_fo = rig.qmp.frontend_open(&open_id)?;
    let closed_fo = rig.qmp.frontend_open(&closed_id)?;
    // Does the agent offer a session by itself (it saw a host change), or must the host ask?
    let offered = server.accept_offered(Duration::from_millis(1500))?;
    let spontaneous_hello = offered.is_some();
    let mut session = match offered {
        Some(s) => s,
        None => server.accept(t)?,
    };
    let ready = session.echo(b"migrated", t)? == b"migrated";
    Ok((DestView { events, open_fo, closed_fo, spontaneous_hello, ready }, session))
}

fn describe(v: &DestView, open_port_id: &str) -> String {
    let evs: Vec<String> =
        v.events.iter().map(|(id, o)| format!("{}={o}", if id == open_port_id { "open-port" } else { id })).collect();
    format!(
        "events after cont {evs:?}; frontend-open {:?}; agent offered HELLO by itself: {}; READY + echo: {}",
        v.open_fo, v.spontaneous_hello, v.ready
    )
}

/// The migration group's state: destination 1 running, and what it showed.
pub(crate) struct Migration {
    opts: SuiteOptions,
    scratch: tempfile::TempDir,
    dst: Rig,
    trace: VmTrace,
    /// Destination 1's session (kept until it migrates away in `migrate-live-open-port`).
    session: Option<Session>,
    /// What destination 1 showed once it ran, or why that could not be observed.
    view: Result<DestView, String>,
    /// How the source's session ended when it migrated away (expected: `Migrated`).
    src_end: Result<EndReason, String>,
    /// How long the save took, and destination 1's run state after the load.
    saved: (Duration, String),
    open_id: String,
    closed_id: String,
}

fn setup(opts: &SuiteOptions, rec: &mut Recorder<'_>) -> Result<Migration, CaseError> {
    let scratch = tempfile::Builder::new()
        .prefix("vport-mig-")
        .tempdir()
        .map_err(|e| CaseError::Other(format!("migration scratch directory: {e}")))?;
    let state = scratch.path().join("state.bin");
    let mut src = boot(opts, mig_ports(), |_| {})?;
    rec.watch_vm(&src.vm);
    let src_trace = rec.trace_vm(&src, "src/")?;
    let mut src_server = src_trace.serve(&src, MIG_OPEN)?;
    src_server.set_reconnect(Reconnect::Once);
    src_server.connect(opts.hello_timeout)?;
    src.resume()?;
    let mut src_session = src_server.accept(opts.hello_timeout)?;
    rec.note_versions(&src, &src_session.handshake().hello.kernel_release);
    let took = migrate(&src, &format!("exec:cat > {}", state.display()))?;
    let src_end = src_session.wait_end(opts.reply_timeout).map_err(|e| chain(&e));
    let incoming = format!("exec:cat {}", state.display());
    let mut dst = boot(opts, mig_ports(), |c| c.incoming = Some(incoming))?;
    rec.watch_vm(&dst.vm);
    let trace = src_trace.another(&dst, "dst1/")?;
    let mut dst_server = dest_server(&trace, &dst)?;
    let status = wait_incoming(&dst)?;
    drop(src_session);
    drop(src_server);
    drop(src);
    let observed = observe_destination(&mut dst, &mut dst_server, opts.reply_timeout).map_err(|e| chain(&e));
    let (view, session) = match observed {
        Ok((v, s)) => (Ok(v), Some(s)),
        Err(e) => (Err(e), None),
    };
    let open_id = dst.port(MIG_OPEN)?.id.clone();
    let closed_id = dst.port(MIG_CLOSED)?.id.clone();
    Ok(Migration {
        opts: opts.clone(),
        scratch,
        dst,
        trace,
        session,
        view,
        src_end,
        saved: (took, status),
        open_id,
        closed_id,
    })
}

fn view(m: &Migration) -> Result<&DestView, CaseError> {
    m.view.as_ref().map_err(|e| CaseError::Other(format!("destination 1 could not be observed: {e}")))
}

/// `migrate-file-open-port`.
fn file_open_port(m: &mut Migration) -> Result<Observation, CaseError> {
    let v = view(m)?;
    let ev = v.events.iter().any(|(id, o)| *id == m.open_id && *o);
    let src_end = match &m.src_end {
        Ok(r) => format!("{r:?}"),
        Err(e) => format!("not seen: {e}"),
    };
    Ok(Observation::check(
        ev && v.open_fo == Some(true) && v.ready && m.src_end == Ok(EndReason::Migrated),
        format!(
            "saved in {:.1} s, source session ended {src_end}; destination {}; {}",
            m.saved.0.as_secs_f64(),
            m.saved.1,
            describe(v, &m.open_id)
        ),
    ))
}

/// `migrate-file-closed-port`.
fn file_closed_port(m: &mut Migration) -> Result<Observation, CaseError> {
    let v = view(m)?;
    let evs: Vec<bool> = v.events.iter().filter(|(id, _)| *id == m.closed_id).map(|(_, o)| *o).collect();
    Ok(Observation::check(
        v.closed_fo == Some(false) && !evs.contains(&true),
        format!("frontend-open {:?}; events for the closed port {evs:?}", v.closed_fo),
    ))
}

/// `migrate-live-open-port`: destination 1 migrates live to destination 2.
fn live_open_port(m: &mut Migration) -> Result<Observation, CaseError> {
    let sock = m.scratch.path().join("live.sock");
    let uri = format!("unix:{}", sock.display());
    let mut dst2 = boot(&m.opts, mig_ports(), |c| c.incoming = Some(uri.clone()))?;
    let trace2 = m.trace.another(&dst2, "dst2/")?;
    let mut server2 = dest_server(&trace2, &dst2)?;
    let took = migrate(&m.dst, &uri)?;
    let t = m.opts.reply_timeout;
    let dst1_end = match m.session.as_mut() {
        Some(s) => s.wait_end(t).map_err(|e| chain(&e)),
        None => Err("destination 1 had no session".into()),
    };
    let status = wait_incoming(&dst2)?;
    let (v, _session2) = observe_destination(&mut dst2, &mut server2, t)?;
    let ev = v.events.iter().any(|(id, o)| *id == m.open_id && *o);
    Ok(Observation::check(
        ev && v.open_fo == Some(true) && v.closed_fo == Some(false) && v.ready && dst1_end == Ok(EndReason::Migrated),
        format!(
            "migrated live in {:.1} s, destination 1's session ended {dst1_end:?}; destination 2 {status}; {}",
            took.as_secs_f64(),
            describe(&v, &m.open_id)
        ),
    ))
}

/// The group's name.
const GROUP_NAME: &str = "migration";

/// The group, its cases in run order.
pub(crate) static GROUP: Group<Migration> = Group {
    name: GROUP_NAME,
    setup,
    diagnose: None,
    cases: &[
        Case::new(
            GROUP_NAME,
            "migrate-file-open-port",
            "migration destination: open=true for open ports once it runs (virtio-serial-bus.c post_load)",
            "VSERPORT_CHANGE open=true on the destination; frontend-open true; READY on a new client; the \
             source's session ends as Migrated",
            file_open_port,
        ),
        Case::new(
            GROUP_NAME,
            "migrate-file-closed-port",
            "migration: guest_connected restored from the stream",
            "frontend-open false; no open=true event",
            file_closed_port,
        ),
        Case::new(
            GROUP_NAME,
            "migrate-live-open-port",
            "live migration over a unix socket: same as the file case",
            "VSERPORT_CHANGE open=true on the destination; frontend-open true; READY on a new client",
            live_open_port,
        ),
    ],
};
