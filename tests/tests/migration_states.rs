//! Migration and loadvm in each session state, on real VMs: the observations behind
//! `docs/sessions.md` ("Migration and loadvm").
//!
//! One VM holds four agent ports, one per state:
//!
//! | state | how it is made |
//! |---|---|
//! | `closed` | the agent closed the port on a CLOSE with a reopen delay; its host client stays connected |
//! | `open-no-host` | the agent has the port open; no host client ever connected |
//! | `connected-not-ready` | a host client asked (HELLO_REQUEST), the agent offered HELLO, nobody acknowledged it |
//! | `ready` | handshake done; SIGIO counting on the agent's fd |
//!
//! - **Migration**: the source is saved to a file (`migrate exec:cat > FILE`, as the conformance
//!   suite's migration group does). Destination A is started from the file with a host client
//!   connected to every port before `cont`; destination B with none (its clients connect after
//!   the events have settled).
//! - **loadvm**: a second VM gets a qcow2 node made by QEMU itself (`blockdev-create`, so no
//!   `qemu-img` is needed), `savevm` in the four states; then every port's host side changes
//!   (the closed port reopens and handshakes, the no-host port gets a client and handshakes, the
//!   offered session is acknowledged, the READY client leaves), then `loadvm`.
//!
//! For every port and scenario: the VSERPORT_CHANGE events and `frontend-open`, the frames the
//! agent sent unasked, the answer to an ECHO in the session the port had before, the session a
//! new handshake gets, and the agent's life-cycle records (EVENTS) and SIGIO samples after the
//! save point. The first test to run does both experiments (a source VM and two destinations
//! restored from it, then one more VM for loadvm: about 32 s under TCG); each test then judges
//! one state and prints its figures.

use crossbeam_channel::Receiver;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use vport_common::message::{EventRecord, SigioAction};
use vport_common::{Message, MessageType, Phase};
use vport_host::client::AgentClient;
use vport_host::link::{Link, LinkError};
use vport_host::qmp::QmpEvent;
use vport_host::rig::{vm_config, Rig};
use vport_host::wait::wait_until;
use vport_tests::{guest_image, wait_migration_completed, TestVm, HELLO_TIMEOUT, REPLY_TIMEOUT};

/// The four states a port is in when the VM is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    OpenNoHost,
    ConnectedNotReady,
    Ready,
}

impl State {
    const ALL: [State; 4] = [State::Closed, State::OpenNoHost, State::ConnectedNotReady, State::Ready];

    fn port(self) -> &'static str {
        match self {
            State::Closed => "org.vport.st.closed",
            State::OpenNoHost => "org.vport.st.nohost",
            State::ConnectedNotReady => "org.vport.st.conn",
            State::Ready => "org.vport.st.ready",
        }
    }

    fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::OpenNoHost => "open-no-host",
            State::ConnectedNotReady => "connected-not-ready",
            State::Ready => "READY",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

fn port_names() -> Vec<&'static str> {
    State::ALL.iter().map(|s| s.port()).collect()
}

/// Reopen delay of the closed port on the migration source: long enough that the save is
/// done before it runs out (the save takes under a second), short enough to see the reopen on
/// each destination.
const MIGRATION_REOPEN_MS: u32 = 5000;
/// The same for the loadvm VM, shorter: the test waits for this reopen between `savevm` and
/// `loadvm`.
const LOADVM_REOPEN_MS: u32 = 3000;
/// QMP rate-limits VSERPORT_CHANGE to one per second per id: a quiet window this long is sure
/// to hold a delayed event.
const EVENT_QUIET: Duration = Duration::from_millis(2500);
/// How long the host listens for frames the agent sends without being asked.
const UNASKED_WINDOW: Duration = Duration::from_millis(1500);
/// The seq of the ECHO sent in an old session, so its answer can be told apart.
const OLD_SESSION_SEQ: u32 = 0x0051_0000;
const HOST: &str = "vport-tests migration_states";

/// What an ECHO sent in an old session id got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// ECHO_REPLY: the old session goes on.
    Echoed { session: u32 },
    /// An ERROR about the ECHO.
    Refused { code: u16, session: u32, text: String },
    /// Nothing within the wait.
    Silent(Duration),
}

/// One port after a restore (destination `cont`, or `loadvm`).
#[derive(Debug, Clone, Default)]
struct PortView {
    /// `frontend-open` after the load, before `cont` (destinations only).
    frontend_before_cont: Option<bool>,
    /// VSERPORT_CHANGE `open` values for the port from the restore on, in order (with the
    /// milliseconds after the restore).
    vserport: Vec<(bool, u128)>,
    /// `frontend-open` once the events settled.
    frontend: Option<bool>,
    /// Frames the agent sent before the host asked anything: type, session, ms after restore.
    unasked: Vec<(MessageType, u32, u128)>,
    /// The answer to an ECHO in the session the port had before (None: it had none).
    old_session: Option<Answer>,
    /// The session and nonce a handshake after the restore got.
    handshake: Option<(u32, u64)>,
    /// The agent's life-cycle records after the save point.
    records: Vec<EventRecord>,
    /// SIGIO samples after the save point (the READY port only): ms after the save point, mask.
    sigio: Vec<(u64, u16)>,
}

/// What the host knew of each port when the VM was saved.
#[derive(Debug, Clone, Copy, Default)]
struct Saved {
    /// Per state: the session the host last had on the port (the one CLOSE ended, the offered
    /// one, the READY one); 0 for none.
    session: [u32; 4],
    /// The nonce offered on the connected-not-ready port.
    offered_nonce: u64,
    /// The agent's monotonic clock just before the save (a PING on the READY port).
    agent_ns: u64,
}

/// One restore scenario.
#[derive(Debug, Clone, Default)]
struct Scenario {
    name: &'static str,
    ports: [PortView; 4],
    /// Every QMP event from the restore on (name and, for VSERPORT_CHANGE, the port).
    qmp: Vec<String>,
}

/// The source's side of the migration.
#[derive(Debug, Clone, Default)]
struct SourceView {
    save_ms: u128,
    /// QMP events from `migrate` until the events settled.
    qmp: Vec<String>,
    /// Per state: the old host connection right after the save, and after the source exited.
    old_link_after_save: [Option<String>; 4],
    old_link_after_exit: [Option<String>; 4],
}

/// The loadvm VM's side.
#[derive(Debug, Clone, Default)]
struct LoadvmView {
    savevm_ms: u128,
    loadvm_ms: u128,
    /// QMP events during `savevm` (until the changes began).
    qmp_savevm: Vec<String>,
    /// Per state: the session the host had on the port just before loadvm (0: no client).
    live_session: [u32; 4],
    /// The agent's clock just before `loadvm` and just after it, ms after the save point.
    clock_before_ms: u64,
    clock_after_ms: u64,
}

#[derive(Debug, Clone)]
struct Observations {
    saved_migration: Saved,
    source: SourceView,
    dest_a: Scenario,
    dest_b: Scenario,
    saved_loadvm: Saved,
    loadvm_side: LoadvmView,
    loadvm: Scenario,
}

fn observations() -> &'static Observations {
    static OBS: OnceLock<Result<Observations, String>> = OnceLock::new();
    let r = OBS.get_or_init(|| {
        let t0 = Instant::now();
        let (saved_migration, source, dest_a, dest_b) = migration_experiment()?;
        print_migration(&saved_migration, &source, &[&dest_a, &dest_b]);
        eprintln!("e2e: the migration experiment took {:.1} s", t0.elapsed().as_secs_f64());
        let t1 = Instant::now();
        let (saved_loadvm, loadvm_side, loadvm) = loadvm_experiment()?;
        print_loadvm(&saved_loadvm, &loadvm_side, &loadvm);
        eprintln!("e2e: the loadvm experiment took {:.1} s", t1.elapsed().as_secs_f64());
        Ok(Observations { saved_migration, source, dest_a, dest_b, saved_loadvm, loadvm_side, loadvm })
    });
    r.as_ref().unwrap_or_else(|e| panic!("the experiment failed: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Setting the four states up.

/// Host links by state (none for open-no-host).
type Links = [Option<Link<UnixStream>>; 4];

fn fail(vm: &TestVm, what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}\n{}", vm.rig.failure_context())
}

/// Puts the four ports of `vm` (launched paused, not resumed) into their states; returns the
/// host links and what the host knows.
fn stage(vm: &mut TestVm, reopen_ms: u32) -> Result<(Links, Saved), String> {
    let mut links: Links = Default::default();
    for s in [State::Closed, State::ConnectedNotReady, State::Ready] {
        links[s.index()] = Some(vm.rig.connect(s.port()).map_err(|e| fail(vm, "connect", e))?);
    }
    vm.resume();
    let mut saved = Saved::default();
    for s in [State::Ready, State::Closed] {
        let l = links[s.index()].as_mut().ok_or("no link")?;
        saved.session[s.index()] = l.handshake(HELLO_TIMEOUT, HOST).map_err(|e| fail(vm, s.port(), e))?.session;
    }
    // Connected, not ready: ask, take the HELLO, never acknowledge it. A PING after it flushes
    // a repeated HELLO (frames are answered in order), so nothing of it is left in flight.
    let l = links[State::ConnectedNotReady.index()].as_mut().ok_or("no link")?;
    l.send(&Message::HelloRequest).map_err(|e| fail(vm, "hello request", e))?;
    let deadline = Instant::now() + HELLO_TIMEOUT;
    loop {
        let r = l.recv(deadline, "HELLO").map_err(|e| fail(vm, "offer", e))?;
        if let Ok(Message::Hello(h)) = r.message {
            saved.session[State::ConnectedNotReady.index()] = r.frame.header.session;
            saved.offered_nonce = h.nonce;
            break;
        }
    }
    l.ping(REPLY_TIMEOUT, 7).map_err(|e| fail(vm, "ping in CONNECTED", e))?;
    wait_frontend(&vm.rig, State::OpenNoHost.port(), true)?;
    let ready = links[State::Ready.index()].as_mut().ok_or("no link")?;
    ready.sigio(SigioAction::Enable, REPLY_TIMEOUT).map_err(|e| fail(vm, "sigio enable", e))?;
    // The guest closes the port; its (rate-limited) VSERPORT_CHANGE is awaited here, so that
    // the events recorded after the save are the save's own.
    let rx = vm.rig.qmp.subscribe();
    let closed = links[State::Closed.index()].as_mut().ok_or("no link")?;
    let bye = closed.close(reopen_ms, REPLY_TIMEOUT).map_err(|e| fail(vm, "close", e))?;
    if bye.session != saved.session[State::Closed.index()] {
        return Err(format!("BYE in session {:#x}", bye.session));
    }
    wait_frontend(&vm.rig, State::Closed.port(), false)?;
    let id = vm.rig.port(State::Closed.port()).map_err(|e| e.to_string())?.id.clone();
    let deadline = Instant::now() + Duration::from_secs(3);
    while rx.recv_deadline(deadline).map_err(|_| "no VSERPORT_CHANGE for the close")?.vserport_change()
        != Some((id.as_str(), false))
    {}
    let closed = links[State::Closed.index()].take().ok_or("no link")?;
    links[State::Closed.index()] = Some(fresh(closed)?);
    let ready = links[State::Ready.index()].as_mut().ok_or("no link")?;
    saved.agent_ns = ready.ping(REPLY_TIMEOUT, 8).map_err(|e| fail(vm, "ping", e))?.agent_time_ns;
    Ok((links, saved))
}

fn chardev(rig: &Rig, port: &str) -> Result<String, String> {
    Ok(rig.port(port).map_err(|e| e.to_string())?.chardev_id.clone())
}

fn frontend(rig: &Rig, port: &str) -> Result<Option<bool>, String> {
    rig.qmp.frontend_open(&chardev(rig, port)?).map_err(|e| e.to_string())
}

fn wait_frontend(rig: &Rig, port: &str, open: bool) -> Result<(), String> {
    let id = chardev(rig, port)?;
    wait_until(
        &format!("frontend-open={open} on {port}"),
        Duration::from_secs(30),
        Duration::from_millis(10),
        || rig.vm.check_alive(),
        || (rig.qmp.frontend_open(&id).ok().flatten() == Some(open)).then_some(()),
    )
    .map(drop)
    .map_err(|e| format!("{e}\n{}", rig.failure_context()))
}

// ---------------------------------------------------------------------------------------------
// Observing.

/// QMP events received until `quiet` passes without one (at most `max`).
fn settle(rx: &Receiver<QmpEvent>, quiet: Duration, max: Duration) -> Vec<QmpEvent> {
    let end = Instant::now() + max;
    let mut out = Vec::new();
    while let Ok(ev) = rx.recv_timeout(end.saturating_duration_since(Instant::now()).min(quiet)) {
        out.push(ev);
    }
    out
}

/// The state whose port has the QMP device id `id`.
fn port_of(rig: &Rig, id: &str) -> Option<State> {
    State::ALL.into_iter().find(|s| rig.port(s.port()).map(|p| p.id == id).unwrap_or(false))
}

/// An event's name; for VSERPORT_CHANGE with the port's state and `open`.
fn event_label(rig: &Rig, ev: &QmpEvent) -> String {
    match ev.vserport_change() {
        Some((id, open)) => {
            let port = port_of(rig, id).map_or_else(|| id.to_string(), |s| s.name().to_string());
            format!("VSERPORT_CHANGE {port}={open}")
        }
        None => ev.name.clone(),
    }
}

/// Files `events` into `sc`: VSERPORT_CHANGE per port, every event by name.
fn file_events(rig: &Rig, sc: &mut Scenario, events: &[QmpEvent], since: Instant) {
    for ev in events {
        sc.qmp.push(event_label(rig, ev));
        if let Some((st, open)) = ev.vserport_change().and_then(|(id, open)| Some((port_of(rig, id)?, open))) {
            sc.ports[st.index()].vserport.push((open, ev.received.saturating_duration_since(since).as_millis()));
        }
    }
}

/// Frames the agent sends until `until` (at least a short read): type, session, ms after `since`.
fn unasked(
    link: &mut Link<UnixStream>,
    until: Instant,
    since: Instant,
) -> Result<Vec<(MessageType, u32, u128)>, String> {
    let mut out = Vec::new();
    let until = until.max(Instant::now() + Duration::from_millis(50));
    loop {
        match link.recv(until, "anything") {
            Ok(r) => out.push((
                MessageType::from_u8(r.frame.header.kind).unwrap_or(MessageType::Error),
                r.frame.header.session,
                r.at.saturating_duration_since(since).as_millis(),
            )),
            Err(LinkError::Timeout { .. }) => return Ok(out),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Sends an ECHO in `session` (raw: the link has no session yet) and returns what answered it.
fn ask_in_session(link: &mut Link<UnixStream>, session: u32, wait: Duration) -> Result<Answer, String> {
    let frame = Message::Echo(b"old session".to_vec()).to_frame(session, OLD_SESSION_SEQ).map_err(|e| e.to_string())?;
    let wire = frame.encode().map_err(|e| e.to_string())?;
    link.stream_mut().write_all(&wire).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let deadline = t0 + wait;
    loop {
        match link.recv(deadline, "the answer to an old-session ECHO") {
            Ok(r) => match r.message {
                Ok(Message::EchoReply(_)) => return Ok(Answer::Echoed { session: r.frame.header.session }),
                Ok(Message::Error { code, about_kind, about_seq, text })
                    if about_kind == MessageType::Echo as u8 && about_seq == OLD_SESSION_SEQ =>
                {
                    return Ok(Answer::Refused { code, session: r.frame.header.session, text })
                }
                _ => {}
            },
            Err(LinkError::Timeout { .. }) => return Ok(Answer::Silent(t0.elapsed())),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Handshakes on `link` and reads the records and SIGIO samples after `saved.agent_ns`.
fn after_handshake(
    vm: &TestVm,
    st: State,
    link: &mut Link<UnixStream>,
    saved: &Saved,
    view: &mut PortView,
) -> Result<(), String> {
    let hs = link.handshake(HELLO_TIMEOUT, HOST).map_err(|e| fail(vm, st.port(), e))?;
    view.handshake = Some((hs.session, hs.hello.nonce));
    let ev = link.events(0, REPLY_TIMEOUT).map_err(|e| fail(vm, "events", e))?;
    view.records = ev.records.into_iter().filter(|r| r.time_ns > saved.agent_ns).collect();
    if st == State::Ready {
        let s = link.sigio(SigioAction::Query, REPLY_TIMEOUT).map_err(|e| fail(vm, "sigio query", e))?;
        view.sigio = s
            .samples
            .iter()
            .filter(|x| x.time_ns > saved.agent_ns)
            .map(|x| ((x.time_ns - saved.agent_ns) / 1_000_000, x.mask))
            .collect();
    }
    Ok(())
}

/// The closed port after a restore: waits for the agent's reopen (its HELLO on `link`), then
/// handshakes.
fn closed_port_after_restore(
    vm: &TestVm,
    link: &mut Link<UnixStream>,
    since: Instant,
    reopen_ms: u32,
    view: &mut PortView,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_millis(u64::from(reopen_ms)) + Duration::from_secs(20);
    loop {
        let r = link.recv(deadline, "the reopened port's HELLO").map_err(|e| fail(vm, "reopen", e))?;
        let kind = MessageType::from_u8(r.frame.header.kind).unwrap_or(MessageType::Error);
        view.unasked.push((kind, r.frame.header.session, r.at.saturating_duration_since(since).as_millis()));
        if kind == MessageType::Hello {
            return Ok(());
        }
    }
}

/// A link on the same connection with no session: it passes every frame up, whatever its
/// session (a link drops frames of sessions other than its own once it has one).
fn fresh(mut link: Link<UnixStream>) -> Result<Link<UnixStream>, String> {
    let stream = link.stream_mut().try_clone().map_err(|e| format!("{}: {e}", link.port()))?;
    Ok(Link::new(link.port(), stream))
}

/// What an old host connection does now: silent (still connected), closed, or a frame.
fn old_link_state(link: &mut Link<UnixStream>, wait: Duration) -> String {
    match link.recv(Instant::now() + wait, "anything") {
        Err(LinkError::Timeout { .. }) => "connected, silent".into(),
        Err(LinkError::Closed { .. }) => "closed (EOF)".into(),
        Err(e) => format!("error: {e}"),
        Ok(r) => format!("frame {:#04x} in session {:#x}", r.frame.header.kind, r.frame.header.session),
    }
}

// ---------------------------------------------------------------------------------------------
// Migration.

type MigrationResult = (Saved, SourceView, Scenario, Scenario);

fn migration_experiment() -> Result<MigrationResult, String> {
    let mut src = TestVm::launch(&port_names());
    let (mut old_links, saved) = stage(&mut src, MIGRATION_REOPEN_MS)?;
    let file = src.rig.vm.dir().join("state.bin");
    let rx = src.rig.qmp.subscribe();
    let t0 = Instant::now();
    src.rig.qmp.migrate(&format!("exec:cat > {}", file.display())).map_err(|e| fail(&src, "migrate", e))?;
    wait_migration_completed(&src, Duration::from_secs(60)).map_err(|e| fail(&src, "migrate", e))?;
    let mut source = SourceView { save_ms: t0.elapsed().as_millis(), ..Default::default() };
    source.qmp = settle(&rx, Duration::from_millis(1500), Duration::from_secs(5))
        .iter()
        .map(|e| event_label(&src.rig, e))
        .collect();
    // The save must have caught the closed port closed (the reopen delay is far longer).
    if frontend(&src.rig, State::Closed.port())? != Some(false) {
        return Err("the closed port reopened before the save completed".into());
    }
    for s in State::ALL {
        if let Some(l) = old_links[s.index()].take() {
            let mut l = fresh(l)?;
            source.old_link_after_save[s.index()] = Some(old_link_state(&mut l, Duration::from_millis(300)));
            old_links[s.index()] = Some(l);
        }
    }
    let dest_a = destination(&file, true, &saved)?;
    let dest_b = destination(&file, false, &saved)?;
    drop(src);
    for s in State::ALL {
        if let Some(l) = old_links[s.index()].as_mut() {
            source.old_link_after_exit[s.index()] = Some(old_link_state(l, Duration::from_secs(2)));
        }
    }
    Ok((saved, source, dest_a, dest_b))
}

/// Starts a destination from `file`; with `host_first`, host clients connect to every port
/// before `cont`, otherwise after the events settled.
fn destination(file: &Path, host_first: bool, saved: &Saved) -> Result<Scenario, String> {
    let mut cfg = vm_config(guest_image(), &port_names(), &[]);
    cfg.incoming = Some(format!("exec:cat {}", file.display()));
    let rig = Rig::launch(cfg).map_err(|e| format!("destination: {:#}", anyhow::Error::new(e)))?;
    let mut vm = TestVm { rig };
    let rx = vm.rig.qmp.subscribe();
    let mut links: [Option<Link<UnixStream>>; 4] = Default::default();
    if host_first {
        for s in State::ALL {
            links[s.index()] = Some(vm.rig.connect(s.port()).map_err(|e| fail(&vm, "connect", e))?);
        }
    }
    wait_until(
        "the destination to load the state",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || vm.rig.vm.check_alive(),
        || vm.rig.qmp.query_status().ok().filter(|s| s != "inmigrate"),
    )
    .map_err(|e| fail(&vm, "incoming", e))?;
    let mut sc = Scenario {
        name: if host_first {
            "destination A (hosts connected before cont)"
        } else {
            "destination B (no host at cont)"
        },
        ..Default::default()
    };
    for s in State::ALL {
        sc.ports[s.index()].frontend_before_cont = frontend(&vm.rig, s.port())?;
    }
    let t_cont = vm.rig.resume().map_err(|e| fail(&vm, "cont", e))?;
    let events = settle(&rx, EVENT_QUIET, Duration::from_secs(8));
    file_events(&vm.rig, &mut sc, &events, t_cont);
    for s in State::ALL {
        sc.ports[s.index()].frontend = frontend(&vm.rig, s.port())?;
    }
    if !host_first {
        for s in State::ALL {
            links[s.index()] = Some(vm.rig.connect(s.port()).map_err(|e| fail(&vm, "connect", e))?);
        }
    }
    observe_ports(&vm, &mut links, &mut sc, saved, saved.session, t_cont, MIGRATION_REOPEN_MS)?;
    let late: Vec<QmpEvent> = rx.try_iter().collect();
    file_events(&vm.rig, &mut sc, &late, t_cont);
    Ok(sc)
}

/// The per-port observations after a restore at `since`: unasked frames, an ECHO in the old
/// session (`old[state]`, 0: none), a handshake, records; the closed port after its reopen.
fn observe_ports(
    vm: &TestVm,
    links: &mut [Option<Link<UnixStream>>; 4],
    sc: &mut Scenario,
    saved: &Saved,
    old: [u32; 4],
    since: Instant,
    reopen_ms: u32,
) -> Result<(), String> {
    let window_end = Instant::now() + UNASKED_WINDOW;
    for s in [State::OpenNoHost, State::ConnectedNotReady, State::Ready] {
        let l = links[s.index()].as_mut().ok_or("no link")?;
        sc.ports[s.index()].unasked = unasked(l, window_end, since)?;
    }
    for s in [State::OpenNoHost, State::ConnectedNotReady, State::Ready] {
        let l = links[s.index()].as_mut().ok_or("no link")?;
        if old[s.index()] != 0 {
            sc.ports[s.index()].old_session = Some(ask_in_session(l, old[s.index()], Duration::from_secs(3))?);
        }
        after_handshake(vm, s, l, saved, &mut sc.ports[s.index()])?;
    }
    let l = links[State::Closed.index()].as_mut().ok_or("no link")?;
    let view = &mut sc.ports[State::Closed.index()];
    closed_port_after_restore(vm, l, since, reopen_ms, view)?;
    if old[State::Closed.index()] != 0 {
        view.old_session = Some(ask_in_session(l, old[State::Closed.index()], Duration::from_secs(3))?);
    }
    after_handshake(vm, State::Closed, l, saved, view)
}

// ---------------------------------------------------------------------------------------------
// savevm / loadvm.

/// Gives the paused VM a 16 MiB qcow2 node for internal snapshots, made by QEMU itself:
/// `blockdev-add` of an empty file, `blockdev-create` of a qcow2 on it, `blockdev-add` of
/// the qcow2 node (monitor-owned, so `savevm` stores the VM state in it).
fn add_snapshot_node(vm: &TestVm) -> Result<(), String> {
    let img = vm.rig.vm.dir().join("snapshots.qcow2");
    std::fs::File::create(&img).map_err(|e| format!("{}: {e}", img.display()))?;
    let q = &vm.rig.qmp;
    let run = |cmd: &str, args: serde_json::Value| q.execute(cmd, Some(args)).map_err(|e| format!("{cmd}: {e}"));
    run("blockdev-add", serde_json::json!({"driver": "file", "node-name": "snapfile", "filename": img}))?;
    run(
        "blockdev-create",
        serde_json::json!({"job-id": "mkqcow2",
            "options": {"driver": "qcow2", "file": "snapfile", "size": 16u64 << 20}}),
    )?;
    let err = wait_until(
        "blockdev-create to conclude",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || vm.rig.vm.check_alive(),
        || {
            let jobs = q.execute("query-jobs", None).ok()?;
            let job = jobs.as_array()?.iter().find(|j| j["id"] == "mkqcow2")?.clone();
            (job["status"] == "concluded").then(|| job.get("error").cloned())
        },
    )
    .map_err(|e| e.to_string())?;
    if let Some(e) = err {
        return Err(format!("blockdev-create: {e}"));
    }
    run("job-dismiss", serde_json::json!({"id": "mkqcow2"}))?;
    run("blockdev-add", serde_json::json!({"driver": "qcow2", "node-name": "snap", "file": "snapfile"}))?;
    Ok(())
}

/// Runs an HMP command; its output must be empty (HMP reports errors as text).
fn hmp(vm: &TestVm, command: &str) -> Result<Duration, String> {
    let t0 = Instant::now();
    let out = vm
        .rig
        .qmp
        .execute_timeout(
            "human-monitor-command",
            Some(serde_json::json!({"command-line": command})),
            Duration::from_secs(60),
        )
        .map_err(|e| fail(vm, command, e))?;
    match out.as_str() {
        Some("") => Ok(t0.elapsed()),
        other => Err(fail(vm, command, format!("HMP said {other:?}"))),
    }
}

type LoadvmResult = (Saved, LoadvmView, Scenario);

fn loadvm_experiment() -> Result<LoadvmResult, String> {
    let mut vm = TestVm::launch(&port_names());
    add_snapshot_node(&vm).map_err(|e| fail(&vm, "snapshot node", e))?;
    let (mut links, saved) = stage(&mut vm, LOADVM_REOPEN_MS)?;
    let mut side = LoadvmView::default();
    let rx = vm.rig.qmp.subscribe();
    side.savevm_ms = hmp(&vm, "savevm vport-states")?.as_millis();
    side.qmp_savevm =
        settle(&rx, Duration::from_millis(300), Duration::from_secs(2)).iter().map(|e| e.name.clone()).collect();

    // Change every port's host side.
    let since_savevm = Instant::now();
    let mut scratch = PortView::default();
    let l = links[State::Closed.index()].as_mut().ok_or("no link")?;
    closed_port_after_restore(&vm, l, since_savevm, LOADVM_REOPEN_MS, &mut scratch)?;
    side.live_session[State::Closed.index()] =
        l.handshake(HELLO_TIMEOUT, HOST).map_err(|e| fail(&vm, "reopened", e))?.session;
    let mut l = vm.rig.connect(State::OpenNoHost.port()).map_err(|e| fail(&vm, "connect", e))?;
    side.live_session[State::OpenNoHost.index()] =
        l.handshake(HELLO_TIMEOUT, HOST).map_err(|e| fail(&vm, "no-host port", e))?.session;
    links[State::OpenNoHost.index()] = Some(l);
    let l = links[State::ConnectedNotReady.index()].as_mut().ok_or("no link")?;
    let hs = l.handshake(HELLO_TIMEOUT, HOST).map_err(|e| fail(&vm, "acknowledge", e))?;
    side.live_session[State::ConnectedNotReady.index()] = hs.session;
    for s in [State::Closed, State::OpenNoHost, State::ConnectedNotReady] {
        let l = links[s.index()].as_mut().ok_or("no link")?;
        l.echo(b"ready before loadvm", REPLY_TIMEOUT).map_err(|e| fail(&vm, "echo before loadvm", e))?;
    }
    links[State::Ready.index()] = None; // the READY client leaves
    for s in [State::Closed, State::OpenNoHost, State::ConnectedNotReady] {
        let l = links[s.index()].take().ok_or("no link")?;
        links[s.index()] = Some(fresh(l)?);
    }

    // The guest's clock before and after loadvm: a PING on the acknowledged port (PING needs no
    // READY session, and the port is CONNECTED again after the load).
    let clock = |vm: &TestVm, links: &mut Links| -> Result<u64, String> {
        let l = links[State::ConnectedNotReady.index()].as_mut().ok_or("no link")?;
        let t = l.ping(REPLY_TIMEOUT, 9).map_err(|e| fail(vm, "ping", e))?.agent_time_ns;
        Ok(t.saturating_sub(saved.agent_ns) / 1_000_000)
    };
    side.clock_before_ms = clock(&vm, &mut links)?;
    let rx = vm.rig.qmp.subscribe();
    let t0 = Instant::now();
    side.loadvm_ms = hmp(&vm, "loadvm vport-states")?.as_millis();
    side.clock_after_ms = clock(&vm, &mut links)?;
    let mut sc = Scenario { name: "loadvm (same QEMU, host side changed since savevm)", ..Default::default() };
    let events = settle(&rx, EVENT_QUIET, Duration::from_secs(8));
    file_events(&vm.rig, &mut sc, &events, t0);
    for s in State::ALL {
        sc.ports[s.index()].frontend = frontend(&vm.rig, s.port())?;
    }
    links[State::Ready.index()] = Some(vm.rig.connect(State::Ready.port()).map_err(|e| fail(&vm, "connect", e))?);
    let mut old = side.live_session;
    old[State::Ready.index()] = saved.session[State::Ready.index()];
    observe_ports(&vm, &mut links, &mut sc, &saved, old, t0, LOADVM_REOPEN_MS)?;
    let late: Vec<QmpEvent> = rx.try_iter().collect();
    file_events(&vm.rig, &mut sc, &late, t0);
    Ok((saved, side, sc))
}

// ---------------------------------------------------------------------------------------------
// Figures.

fn records(v: &PortView, saved: &Saved) -> String {
    let r: Vec<String> = v
        .records
        .iter()
        .map(|r| {
            let ms = (r.time_ns - saved.agent_ns) / 1_000_000;
            format!("+{ms} {}->{} {:#x} ({})", r.from.name(), r.to.name(), r.session, r.cause)
        })
        .collect();
    if r.is_empty() {
        "none".into()
    } else {
        r.join(", ")
    }
}

fn port_line(sc: &Scenario, st: State, saved: &Saved) -> String {
    let v = &sc.ports[st.index()];
    let unasked: Vec<String> = v.unasked.iter().map(|(k, s, ms)| format!("{k:?} {s:#x} (read by {ms} ms)")).collect();
    let hs = v.handshake.map(|(s, n)| {
        let same = if s == saved.session[st.index()] { " (the session saved)" } else { "" };
        format!("{s:#x} nonce {n:#x}{same}")
    });
    let before = v.frontend_before_cont.map(|f| format!("frontend-open before cont {f}, ")).unwrap_or_default();
    let sigio = if st == State::Ready {
        format!("; SIGIO (ms after the save point, mask): {:?}", v.sigio)
    } else {
        String::new()
    };
    format!(
        "  {:<20} {before}frontend-open after {:?}; VSERPORT_CHANGE (open, ms after the restore) {:?}; unasked [{}]; \
         ECHO in the old session: {:?}; handshake {}; agent records (ms after the save point): {}{sigio}",
        st.name(),
        v.frontend,
        v.vserport,
        unasked.join(", "),
        v.old_session,
        hs.unwrap_or_default(),
        records(v, saved),
    )
}

fn print_migration(saved: &Saved, s: &SourceView, dests: &[&Scenario]) {
    eprintln!("e2e: migration source: saved in {} ms; QMP events after migrate: {:?}", s.save_ms, s.qmp);
    for st in State::ALL {
        if let Some(a) = &s.old_link_after_save[st.index()] {
            eprintln!(
                "  {:<20} old host connection after the save: {a}; after the source exited: {}",
                st.name(),
                s.old_link_after_exit[st.index()].as_deref().unwrap_or("?")
            );
        }
    }
    for sc in dests {
        eprintln!("e2e: {}: QMP events {:?}", sc.name, sc.qmp);
        for st in State::ALL {
            eprintln!("{}", port_line(sc, st, saved));
        }
    }
}

fn print_loadvm(saved: &Saved, l: &LoadvmView, sc: &Scenario) {
    eprintln!(
        "e2e: savevm {} ms (QMP events {:?}); live sessions before loadvm {:x?}; loadvm {} ms; agent clock \
         before loadvm +{} ms, after +{} ms (from the save point); {}: QMP events {:?}",
        l.savevm_ms, l.qmp_savevm, l.live_session, l.loadvm_ms, l.clock_before_ms, l.clock_after_ms, sc.name, sc.qmp
    );
    for st in State::ALL {
        eprintln!("{}", port_line(sc, st, saved));
    }
}

// ---------------------------------------------------------------------------------------------
// The tests: one per state. Each asserts what was the same in every run (QEMU 7.2, Linux 6.1,
// TCG) and prints the rest.

/// A record as (from, to, cause), the host leaving written one way ("poll: POLLHUP" and
/// "read returned 0" are the same event seen two ways).
fn shape(v: &PortView) -> Vec<(Phase, Phase, &str)> {
    v.records
        .iter()
        .map(|r| {
            let cause = if r.cause == "read returned 0" { "poll: POLLHUP" } else { r.cause.as_str() };
            (r.from, r.to, cause)
        })
        .collect()
}

const D: Phase = Phase::Disconnected;
const C: Phase = Phase::Connected;
const R: Phase = Phase::Ready;
const HOST_CAME: &str = "poll: POLLHUP clear";
const HOST_LEFT: &str = "poll: POLLHUP";
const ACK: &str = "hello ack";

fn refused(a: &Option<Answer>) -> Option<u16> {
    match a {
        Some(Answer::Refused { code, .. }) => Some(*code),
        _ => None,
    }
}

/// The port's VSERPORT_CHANGE `open` values, in order.
fn opens(v: &PortView) -> Vec<bool> {
    v.vserport.iter().map(|e| e.0).collect()
}

fn unasked_hello(v: &PortView) -> bool {
    v.unasked.iter().any(|(k, _, _)| *k == MessageType::Hello)
}

/// What every scenario shows of `st`, and what the migration showed of the save itself.
fn common(o: &Observations, st: State) {
    eprintln!("e2e: state {}:", st.name());
    for (sc, saved) in [(&o.dest_a, &o.saved_migration), (&o.dest_b, &o.saved_migration), (&o.loadvm, &o.saved_loadvm)]
    {
        eprintln!("  {}:\n  {}", sc.name, port_line(sc, st, saved));
    }
    // The source emits no VSERPORT_CHANGE for the save; its host connections stay up, silent,
    // until the source QEMU exits.
    assert!(!o.source.qmp.iter().any(|e| e.starts_with("VSERPORT_CHANGE")), "source events {:?}", o.source.qmp);
    if let Some(a) = &o.source.old_link_after_save[st.index()] {
        assert_eq!(a, "connected, silent");
        assert_eq!(o.source.old_link_after_exit[st.index()].as_deref(), Some("closed (EOF)"));
    }
    // A destination shows every port closed between the load and `cont`; once it runs, one
    // VSERPORT_CHANGE per port gives the guest's restored state.
    let open_at_save = st != State::Closed;
    for sc in [&o.dest_a, &o.dest_b] {
        let v = &sc.ports[st.index()];
        assert_eq!(v.frontend_before_cont, Some(false), "{}: frontend-open before cont", sc.name);
        assert_eq!(v.vserport.first().map(|e| e.0), Some(open_at_save), "{}: first VSERPORT_CHANGE", sc.name);
        if open_at_save {
            // No more: host clients connecting (before or after `cont`) emit none.
            assert_eq!(v.vserport.len(), 1, "{}: VSERPORT_CHANGE {:?}", sc.name, v.vserport);
        }
        assert_eq!(v.frontend, Some(open_at_save), "{}: frontend-open after cont", sc.name);
    }
}

#[test]
fn closed() {
    let o = observations();
    common(o, State::Closed);
    // Closed at the save: no session on the destination until the agent reopens (its timer runs
    // on there); then a new one, whoever is connected. The session CLOSE ended stays ended.
    for sc in [&o.dest_a, &o.dest_b] {
        let v = &sc.ports[State::Closed.index()];
        assert_eq!(opens(v), [false, true], "{}", sc.name);
        assert_eq!(shape(v), [(D, C, HOST_CAME), (C, R, ACK)], "{}", sc.name);
        assert_eq!(refused(&v.old_session), Some(3), "{}", sc.name);
    }
    // loadvm: the live session made after the savevm ends; the restored agent reopens and offers
    // a new one.
    let v = &o.loadvm.ports[State::Closed.index()];
    assert_eq!(v.vserport.last().map(|e| e.0), Some(true));
    assert_eq!(shape(v), [(D, C, HOST_CAME), (C, R, ACK)]);
    assert_eq!(refused(&v.old_session), Some(3), "the session made after savevm is gone");
}

#[test]
fn open_no_host() {
    let o = observations();
    common(o, State::OpenNoHost);
    // Open, no host at the save: a host on the destination is seen as a host arriving (HELLO
    // unasked), whether it connected before `cont` or after.
    for sc in [&o.dest_a, &o.dest_b] {
        let v = &sc.ports[State::OpenNoHost.index()];
        assert_eq!(opens(v), [true], "{}", sc.name);
        assert!(unasked_hello(v), "{}: no HELLO unasked", sc.name);
        assert_eq!(shape(v), [(D, C, HOST_CAME), (C, R, ACK)], "{}", sc.name);
    }
    // loadvm with a READY host client since the savevm: the restored agent knows no host; QEMU
    // tells it one is there, it offers a new session, and the client's session is gone.
    let v = &o.loadvm.ports[State::OpenNoHost.index()];
    assert_eq!(opens(v), [false, true], "loadvm resets the device first");
    assert!(unasked_hello(v), "loadvm: no HELLO unasked");
    assert_eq!(refused(&v.old_session), Some(3));
    assert_eq!(shape(v), [(D, C, HOST_CAME), (C, R, ACK)]);
}

#[test]
fn connected_not_ready() {
    let o = observations();
    common(o, State::ConnectedNotReady);
    let saved = &o.saved_migration;
    let offered = (saved.session[State::ConnectedNotReady.index()], saved.offered_nonce);
    // A host on the destination before `cont`: the agent stays CONNECTED in the session it
    // offered the source's client, and hands that same offer (id and nonce) to the new client.
    let v = &o.dest_a.ports[State::ConnectedNotReady.index()];
    assert!(v.unasked.is_empty(), "dest A: unasked {:?}", v.unasked);
    assert_eq!(refused(&v.old_session), Some(4), "the offered session is still pending");
    assert_eq!(v.handshake, Some(offered), "the new client gets the source client's offer");
    assert_eq!(shape(v), [(C, R, ACK)]);
    // No host at `cont`: QEMU tells the guest the host left; the offer ends.
    let v = &o.dest_b.ports[State::ConnectedNotReady.index()];
    assert_eq!(shape(v), [(C, D, HOST_LEFT), (D, C, HOST_CAME), (C, R, ACK)]);
    assert_eq!(refused(&v.old_session), Some(3));
    assert_ne!(v.handshake.map(|h| h.0), Some(offered.0));
    // loadvm after the offer was acknowledged: the agent is back to CONNECTED in that session;
    // the client's READY requests are refused until it acknowledges again.
    let saved = &o.saved_loadvm;
    let v = &o.loadvm.ports[State::ConnectedNotReady.index()];
    assert_eq!(
        o.loadvm_side.live_session[State::ConnectedNotReady.index()],
        saved.session[State::ConnectedNotReady.index()]
    );
    assert!(v.unasked.is_empty(), "loadvm: unasked {:?}", v.unasked);
    assert_eq!(refused(&v.old_session), Some(4));
    assert_eq!(v.handshake, Some((saved.session[State::ConnectedNotReady.index()], saved.offered_nonce)));
    assert_eq!(shape(v), [(C, R, ACK)]);
    assert_eq!(opens(v), [false, true]);
}

#[test]
fn ready() {
    let o = observations();
    common(o, State::Ready);
    // A host on the destination before `cont`: the agent's READY session goes on, for whoever
    // knows its id; the guest saw only a redundant host-connected message (a SIGIO, POLLOUT).
    let v = &o.dest_a.ports[State::Ready.index()];
    let session = o.saved_migration.session[State::Ready.index()];
    assert!(v.unasked.is_empty(), "dest A: unasked {:?}", v.unasked);
    assert_eq!(v.old_session, Some(Answer::Echoed { session }), "the saved session answers on the destination");
    assert_eq!(shape(v), [(R, C, "hello request"), (C, R, ACK)]);
    assert_eq!(v.sigio.first().map(|s| s.1), Some(0x4), "SIGIO at cont: {:?}", v.sigio);
    // No host at `cont`: the session ends (POLLHUP); a later client gets a new one.
    let v = &o.dest_b.ports[State::Ready.index()];
    assert_eq!(shape(v), [(R, D, HOST_LEFT), (D, C, HOST_CAME), (C, R, ACK)]);
    assert_eq!(v.sigio.first().map(|s| s.1), Some(0x11), "SIGIO at cont: {:?}", v.sigio);
    assert!(unasked_hello(v));
    assert_eq!(refused(&v.old_session), Some(3));
    // loadvm after the client left: the restored READY session ends the same way.
    let v = &o.loadvm.ports[State::Ready.index()];
    assert_eq!(shape(v), [(R, D, HOST_LEFT), (D, C, HOST_CAME), (C, R, ACK)]);
    assert_eq!(v.sigio.first().map(|s| s.1), Some(0x11), "SIGIO after loadvm: {:?}", v.sigio);
    assert_eq!(refused(&v.old_session), Some(3));
    assert_eq!(opens(v), [false, true]);
}
