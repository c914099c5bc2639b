//! `vport watch`: the life cycle of every port of a running VM, live.
//!
//! For each port a watcher thread is the port's host client through a
//! [`PortServer`]: it takes each guest session as it comes and keeps reading it, so an
//! in-band BYE (the guest is closing), a HELLO of a new session (the guest opened again) or a
//! QMP event that ends the session is seen within milliseconds; a connection QEMU closes is
//! made again (the server's reconnect policy). At the start of each session it fetches the
//! agent's own transition records (EVENTS) and maps them onto the host clock with the
//! ping-estimated offset. QMP events go on
//! the same [`Timeline`]. Commands (`close PORT MS`, `reopen PORT`, `ping PORT`) reach the
//! watchers through a channel, so a user (or a test) can make the guest close and open a port;
//! [`serve_input`] reads them from a stream (stdin for `vport watch`) until `quit` or QEMU's
//! exit.
//!
//! The live table ([`Table`], [`TableSink`], in `watch/table.rs`) renders the trace replay of
//! [`vport_common::replay`]: the checker judges the very same per-port state.
//!
//! A VM vport did not start is watched alike ([`start_attached`], see [`crate::attach`]);
//! without its QMP, sessions end on in-band signals and connection loss only, and QEMU's exit
//! is inferred from the chardevs: once every port's chardev server is gone (a socket QEMU
//! listened on refuses the reconnect, a pty is gone), watching ends as for QEMU's exit. A
//! port where vport listens cannot tell, and watching then ends on `quit` (or Ctrl-C).

mod attached;
mod table;

pub use attached::{start_attached, AttachedWatch};

pub use table::{Table, TableSink};

use crate::client::AgentClient;
use crate::liveness::{IdleLiveness, LivenessAction, SessionWait};
use crate::qmp::QmpEvent;
use crate::rig::Rig;
use crate::session::{PortServer, Session, SessionError};
use crate::timeline::{ClockOffset, Timeline};
use crossbeam_channel::{Receiver, Sender};
use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use vport_common::message::MAX_REOPEN_DELAY_MS;
use vport_common::Message;

/// How long a watcher blocks in one read before it looks at its command channel.
const POLL_SLICE: Duration = Duration::from_millis(50);
/// Deadline for one request to the agent.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a watcher waits for the next session before it looks at its command channel.
const ACCEPT_SLICE: Duration = Duration::from_millis(500);

/// A command for the watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Ask the agent to close the port and reopen it after `ms` milliseconds.
    Close {
        /// Port name.
        port: String,
        /// Reopen delay.
        ms: u32,
    },
    /// Ask the agent to close and reopen the port at once.
    Reopen {
        /// Port name.
        port: String,
    },
    /// One ping round trip, noted on the timeline.
    Ping {
        /// Port name.
        port: String,
    },
}

impl Command {
    fn port(&self) -> &str {
        match self {
            Command::Close { port, .. } | Command::Reopen { port } | Command::Ping { port } => port,
        }
    }
}

/// Why watching could not start.
#[derive(Debug, Error)]
pub enum WatchError {
    /// A port could not be connected.
    #[error(transparent)]
    Rig(#[from] crate::rig::RigError),
    /// A port of an attached VM could not be served.
    #[error(transparent)]
    Attach(#[from] crate::attach::AttachError),
    /// A watcher thread could not be started.
    #[error("cannot start the {name} thread")]
    Thread {
        /// The thread's name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<(), WatchError> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map(drop)
        .map_err(|source| WatchError::Thread { name, source })
}

/// A command line that is not a command.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad command {0:?}: use `close PORT [MS]`, `reopen PORT`, `ping PORT` or `quit`")]
pub struct ParseCommandError(pub String);

/// Parses one line of input; `Ok(None)` for `quit` (and for end of input, by the caller).
pub fn parse_command(line: &str) -> Result<Option<Command>, ParseCommandError> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let bad = || ParseCommandError(line.trim().to_string());
    match words.as_slice() {
        ["quit"] | ["exit"] => Ok(None),
        ["close", port] => Ok(Some(Command::Close { port: port.to_string(), ms: 1000 })),
        ["close", port, ms] => match ms.parse::<u32>() {
            Ok(ms) if ms <= MAX_REOPEN_DELAY_MS => Ok(Some(Command::Close { port: port.to_string(), ms })),
            _ => Err(ParseCommandError(format!(
                "{}: the delay must be a whole number of milliseconds up to {MAX_REOPEN_DELAY_MS} (the agent's limit)",
                line.trim()
            ))),
        },
        ["reopen", port] => Ok(Some(Command::Reopen { port: port.to_string() })),
        ["ping", port] => Ok(Some(Command::Ping { port: port.to_string() })),
        _ => Err(bad()),
    }
}

/// How reading commands ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputEnd {
    /// A `quit` (or `exit`) line.
    Quit,
    /// End of input, or a read error (treated alike: no more commands will come).
    Closed,
}

/// How watching ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The user quit.
    Quit,
    /// QEMU exited (its QMP event channel closed; never without QMP).
    QemuExited,
}

/// Reads command lines from `input` and sends each command to `commands` until `quit` or the end
/// of input. Blank lines are skipped; a line that is not a command goes to `on_bad_line` and
/// reading goes on.
pub fn read_commands(
    input: impl BufRead,
    commands: &Sender<Command>,
    mut on_bad_line: impl FnMut(&ParseCommandError),
) -> InputEnd {
    for line in input.lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        match parse_command(&line) {
            Ok(Some(cmd)) => {
                if commands.send(cmd).is_err() {
                    log::warn!("watch: the watchers are gone; command {:?} dropped", line.trim());
                }
            }
            Ok(None) => return InputEnd::Quit,
            Err(e) => on_bad_line(&e),
        }
    }
    InputEnd::Closed
}

/// Waits until the input says `quit` or QEMU exits (`qemu_events` closes). The end of input
/// alone does not end watching: it goes on until QEMU exits (or Ctrl-C).
pub fn wait_for_end<T>(input: &Receiver<InputEnd>, qemu_events: &Receiver<T>) -> WatchEnd {
    let mut input = input.clone();
    loop {
        crossbeam_channel::select! {
            recv(input) -> end => match end {
                Ok(InputEnd::Quit) => return WatchEnd::Quit,
                Ok(InputEnd::Closed) | Err(_) => input = crossbeam_channel::never(),
            },
            recv(qemu_events) -> ev => {
                if ev.is_err() {
                    return WatchEnd::QemuExited;
                }
            }
        }
    }
}

/// `vport watch`'s input loop: reads commands from `input` on a thread of its own (see
/// [`read_commands`]) and passes them to the watchers through `commands`, until the user quits
/// or QEMU exits ([`wait_for_end`], on the rig's QMP event channel).
pub fn serve_input(
    rig: &Rig,
    input: impl BufRead + Send + 'static,
    commands: Sender<Command>,
    on_bad_line: impl FnMut(&ParseCommandError) + Send + 'static,
) -> Result<WatchEnd, WatchError> {
    serve_input_until(rig.qmp.events(), input, commands, on_bad_line)
}

/// Like [`serve_input`], watching for QEMU's exit on `qemu_events` (an attached VM's
/// [`Attached::events`](crate::attach::Attached::events): without QMP, nothing ever ends it but `quit`).
pub fn serve_input_until(
    qemu_events: &Receiver<QmpEvent>,
    input: impl BufRead + Send + 'static,
    commands: Sender<Command>,
    on_bad_line: impl FnMut(&ParseCommandError) + Send + 'static,
) -> Result<WatchEnd, WatchError> {
    let (end_tx, end_rx) = crossbeam_channel::bounded(1);
    spawn("watch-input".into(), move || {
        let end = read_commands(input, &commands, on_bad_line);
        // The receiver lives until watching ends; after that nobody waits for this.
        let _ = end_tx.send(end);
    })?;
    Ok(wait_for_end(&end_rx, qemu_events))
}

/// Starts one watcher thread per port of `rig`, recording on `timeline`, plus a thread that
/// records QMP events. With `liveness`, a session silent that long while the VM runs is taken
/// for dead ([`crate::liveness`]: probed with a PING at half of it) and the watcher leaves
/// and connects again, with a `liveness:` note on the timeline. Returns the command sender;
/// the threads end when QEMU exits.
pub fn start(rig: &Rig, timeline: &Timeline, liveness: Option<Duration>) -> Result<Sender<Command>, WatchError> {
    let events = rig.qmp.subscribe();
    let mut servers = Vec::new();
    for port in rig.vm.ports() {
        timeline.alias(&port.id, &port.name);
        timeline.alias(&port.chardev_id, &port.name);
        servers.push(rig.port_server(&port.name)?);
    }
    start_servers(Some(events), servers, timeline, liveness, None)
}

/// The threads of [`start`]: QMP `events` recorded (when there is QMP), one watcher per server,
/// and the dispatcher of commands to them. A watcher whose server was found gone
/// ([`PortServer::server_gone`]) sends why to `gone`.
fn start_servers(
    events: Option<Receiver<QmpEvent>>,
    servers: Vec<PortServer>,
    timeline: &Timeline,
    liveness: Option<Duration>,
    gone: Option<Sender<String>>,
) -> Result<Sender<Command>, WatchError> {
    if let Some(events) = events {
        let tl = timeline.clone();
        spawn("watch-qmp".into(), move || {
            for ev in events.iter() {
                tl.qmp_event(&ev);
            }
        })?;
    }
    let mut senders = Vec::new();
    for mut server in servers {
        server.set_observer(Arc::new(timeline.clone()));
        let (tx, rx) = crossbeam_channel::unbounded();
        let tl = timeline.clone();
        let name = server.port();
        let gone = gone.clone();
        spawn(format!("watch-{name}"), move || {
            if let (Some(why), Some(gone)) = (watch_port(server, &tl, &rx, liveness), gone) {
                let _ = gone.send(why);
            }
        })?;
        senders.push((name, tx));
    }
    let (tx, rx) = crossbeam_channel::unbounded::<Command>();
    spawn("watch-dispatch".into(), move || {
        for cmd in rx.iter() {
            match senders.iter().find(|(name, _)| name == cmd.port()) {
                Some((_, s)) => drop(s.send(cmd)),
                None => log::warn!("no port named {} in this vm", cmd.port()),
            }
        }
    })?;
    Ok(tx)
}

/// The life of one port's watcher: each session from its handshake to its end, until the
/// server closes (QEMU exits, the port is unplugged). Returns why the chardev's server was
/// taken for gone ([`PortServer::server_gone`], noted on the timeline), if that ended it.
fn watch_port(
    mut server: PortServer,
    tl: &Timeline,
    commands: &Receiver<Command>,
    liveness: Option<Duration>,
) -> Option<String> {
    let port = server.port();
    let mut agent_seq = 0;
    // Armed once a session has ended: before the first one the guest may still be booting, or
    // have no agent on this port, and leaving would only add connections to the timeline.
    let mut waiting: Option<SessionWait> = None;
    loop {
        let mut session = match server.accept(ACCEPT_SLICE) {
            Ok(s) => s,
            Err(SessionError::Timeout { .. }) => {
                // No session yet: commands for a port without one are answered by a warning.
                while let Ok(cmd) = commands.try_recv() {
                    log::warn!("port {port}: no session to run {cmd:?} in");
                }
                if let (Some(deadline), Some(waiting)) = (liveness, waiting.as_mut()) {
                    if let Some(text) = waiting.overdue(std::time::Instant::now(), deadline, &|| server.vm_paused()) {
                        let text = format!("liveness: port {port} {text}; the host leaves and connects again");
                        log::warn!("{text}");
                        tl.note(&port, &text);
                        server.disconnect();
                    }
                }
                continue;
            }
            Err(e) => {
                log::info!("port {port}: watching ends: {e}");
                let gone = server.server_gone();
                if let Some(why) = &gone {
                    tl.note(&port, why);
                }
                return gone.map(|why| format!("port {port}: {why}"));
            }
        };
        match fetch_agent_events(&mut session, tl, &mut agent_seq) {
            Ok(()) => {
                let mut liveness = liveness.map(|d| IdleLiveness::new(d, std::time::Instant::now()));
                serve_session(&mut session, tl, commands, liveness.as_mut(), &|| server.vm_paused())
            }
            Err(e) => log::warn!("port {port}: {e}"),
        }
        if let Some(reason) = session.end_reason() {
            tl.note(&port, &format!("session ended: {reason}"));
        }
        waiting = Some(SessionWait::new(std::time::Instant::now()));
    }
}

/// Reads session `session` and runs the commands for it until it ends, or until `liveness`
/// finds it dead (`vm_paused` asks QEMU whether the VM runs, only when liveness would act).
fn serve_session(
    session: &mut Session,
    tl: &Timeline,
    commands: &Receiver<Command>,
    mut liveness: Option<&mut IdleLiveness>,
    vm_paused: &dyn Fn() -> bool,
) {
    let port = session.port().to_string();
    loop {
        if let Ok(cmd) = commands.try_recv() {
            if let Err(e) = run_command(session, tl, &cmd) {
                log::warn!("port {port}: {e}");
            }
        }
        if let Some(l) = liveness.as_deref_mut() {
            if !check_liveness(session, tl, l, vm_paused) {
                return;
            }
        }
        match session.recv(POLL_SLICE) {
            Ok(r) => {
                if let Some(l) = liveness.as_deref_mut() {
                    l.heard(std::time::Instant::now());
                }
                log::debug!("port {port}: {:?}", r.message)
            }
            Err(SessionError::Timeout { .. }) => {}
            Err(SessionError::Ended(_)) => return,
            Err(e) => {
                log::warn!("port {port}: {e}");
                return;
            }
        }
    }
}

/// Acts on what `liveness` asks now: sends its PING, or, for a dead session, notes it on the
/// timeline and leaves (the watcher then connects again). False when the session is over.
fn check_liveness(
    session: &mut Session,
    tl: &Timeline,
    liveness: &mut IdleLiveness,
    vm_paused: &dyn Fn() -> bool,
) -> bool {
    let now = std::time::Instant::now();
    if !liveness.due(now) {
        return true;
    }
    if vm_paused() {
        liveness.paused(now);
        return true;
    }
    match liveness.poll(now) {
        LivenessAction::Wait => true,
        LivenessAction::SendPing => match session.send(&Message::Ping { time_ns: tl.now_ns() }) {
            Ok(()) => true,
            Err(e) => {
                log::info!("port {}: liveness PING not sent: {e}", session.port());
                false
            }
        },
        LivenessAction::Dead { silent, probe_after } => {
            let port = session.port().to_string();
            let text = format!(
                "liveness: port {port}'s session was silent for {} ms while the vm ran (a PING sent after {} ms went \
                 unanswered); the host leaves and connects again",
                silent.as_millis(),
                probe_after.as_millis()
            );
            log::warn!("{text}");
            tl.note(&port, &text);
            session.close();
            false
        }
    }
}

fn run_command(session: &mut Session, tl: &Timeline, cmd: &Command) -> Result<(), SessionError> {
    let port = session.port().to_string();
    match cmd {
        // The BYE ends the session: the watcher then waits for the next one.
        Command::Close { ms, .. } => session.send(&Message::Close { reopen_after_ms: *ms }),
        Command::Reopen { .. } => session.send(&Message::Reopen),
        Command::Ping { .. } => {
            let p = session.ping(REQUEST_TIMEOUT, tl.now_ns())?;
            tl.note(&port, &format!("ping round trip {} us", p.rtt.as_micros()));
            Ok(())
        }
    }
}

/// Fetches the agent's new transition records and maps them with a fresh clock offset.
fn fetch_agent_events(session: &mut Session, tl: &Timeline, since: &mut u64) -> Result<(), SessionError> {
    let mut samples = Vec::new();
    for _ in 0..5 {
        samples.push(session.ping(REQUEST_TIMEOUT, tl.now_ns())?);
    }
    let events = session.events(*since, REQUEST_TIMEOUT)?;
    *since = events.next_seq;
    if let Some(offset) = ClockOffset::from_ping_samples(tl.origin(), &samples) {
        tl.agent_events(session.port(), &events.records, &offset);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vport_common::trace::Kind;

    #[test]
    fn commands_parse_and_bad_lines_say_what_is_accepted() {
        assert_eq!(
            parse_command("close org.vport.0 250"),
            Ok(Some(Command::Close { port: "org.vport.0".into(), ms: 250 }))
        );
        assert_eq!(parse_command("close p"), Ok(Some(Command::Close { port: "p".into(), ms: 1000 })));
        assert_eq!(parse_command(" reopen p "), Ok(Some(Command::Reopen { port: "p".into() })));
        assert_eq!(parse_command("quit"), Ok(None));
        let err = parse_command("close p soon").unwrap_err();
        assert!(err.to_string().contains("close PORT [MS]"), "{err}");
        assert!(parse_command("teleport").is_err());
        assert_eq!(parse_command("close p 60000"), Ok(Some(Command::Close { port: "p".into(), ms: 60_000 })));
        let err = parse_command("close p 60001").unwrap_err();
        assert!(err.to_string().contains("up to 60000 (the agent's limit)"), "{err}");
    }

    #[test]
    fn commands_are_read_until_quit_and_bad_lines_are_reported() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut bad = Vec::new();
        let input: &[u8] = b"close p 10\n\n  \nteleport\nping p\nquit\nreopen p\n";
        assert_eq!(read_commands(input, &tx, |e| bad.push(e.0.clone())), InputEnd::Quit);
        let got: Vec<Command> = rx.try_iter().collect();
        assert_eq!(got, [Command::Close { port: "p".into(), ms: 10 }, Command::Ping { port: "p".into() }]);
        assert_eq!(bad, ["teleport"], "nothing is read after quit");
        assert_eq!(read_commands(&b"reopen p"[..], &tx, |_| {}), InputEnd::Closed);
        assert_eq!(rx.try_recv(), Ok(Command::Reopen { port: "p".into() }));
    }

    #[test]
    fn watching_ends_on_quit_or_when_qemu_exits_not_at_the_end_of_input() {
        let (end_tx, end_rx) = crossbeam_channel::bounded(1);
        let (qemu_tx, qemu_rx) = crossbeam_channel::unbounded::<()>();
        end_tx.send(InputEnd::Quit).unwrap();
        assert_eq!(wait_for_end(&end_rx, &qemu_rx), WatchEnd::Quit);

        end_tx.send(InputEnd::Closed).unwrap();
        drop(end_tx);
        let waiter = std::thread::spawn(move || wait_for_end(&end_rx, &qemu_rx));
        qemu_tx.send(()).unwrap(); // an event: still watching
        drop(qemu_tx);
        assert_eq!(waiter.join().unwrap(), WatchEnd::QemuExited);
    }

    /// An agent that handshakes session 0xA, answers the first PING, then hears the second
    /// and stays silent (hung); returns what it saw after that: whether the host closed.
    fn agent_that_hangs_after_one_pong(
        agents: crossbeam_channel::Receiver<std::os::unix::net::UnixStream>,
    ) -> std::thread::JoinHandle<bool> {
        use crate::session::fakes::agent;
        let a = crate::session::SessionId { session: 0xA, nonce: 1 };
        std::thread::spawn(move || {
            let mut g = agent(&agents);
            assert!(matches!(g.recv(), (0, Message::HelloRequest)));
            g.hello(a);
            assert!(matches!(g.recv(), (0xA, Message::HelloAck { nonce: 1, .. })));
            let (session, m) = g.recv();
            let Message::Ping { time_ns } = m else { panic!("{m:?} instead of a PING") };
            g.send(session, &Message::Pong { ping_time_ns: time_ns, time_ns: 1 });
            assert!(matches!(g.recv(), (0xA, Message::Ping { .. })), "probed again once silent");
            // Hung: no answer. The host must leave within the deadline.
            g.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 64];
            matches!(std::io::Read::read(&mut g.s, &mut buf), Ok(0))
        })
    }

    #[test]
    fn a_session_silent_past_the_liveness_deadline_is_left_and_noted() {
        let (mut srv, agents, _qmp) = crate::session::fakes::server();
        let hung = agent_that_hangs_after_one_pong(agents);
        let tl = Timeline::new(std::time::Instant::now());
        let mut session = srv.accept(Duration::from_secs(5)).unwrap();
        let (_tx, commands) = crossbeam_channel::unbounded();
        let deadline = Duration::from_millis(400);
        let mut liveness = IdleLiveness::new(deadline, std::time::Instant::now());
        let started = std::time::Instant::now();
        serve_session(&mut session, &tl, &commands, Some(&mut liveness), &|| false);
        assert!(started.elapsed() >= deadline, "left only after a PONG and a whole silent deadline");
        assert!(hung.join().unwrap(), "the host closed the connection");
        assert_eq!(session.end_reason(), Some(crate::session::EndReason::HostClosed));
        let notes: Vec<String> = tl
            .records()
            .into_iter()
            .filter_map(|r| match r.kind {
                Kind::Note { text } => Some(text),
                _ => None,
            })
            .collect();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with("liveness: port org.vport.fake's session was silent for "), "{notes:?}");
    }

    #[test]
    fn a_paused_vm_is_never_probed_nor_left() {
        use crate::session::fakes::agent;
        let (mut srv, agents, _qmp) = crate::session::fakes::server();
        let a = crate::session::SessionId { session: 0xA, nonce: 1 };
        let silent = std::thread::spawn(move || {
            let mut g = agent(&agents);
            assert!(matches!(g.recv(), (0, Message::HelloRequest)));
            g.hello(a);
            assert!(matches!(g.recv(), (0xA, Message::HelloAck { nonce: 1, .. })));
            // Three deadlines of silence from the host too: no PING, no close.
            g.s.set_read_timeout(Some(Duration::from_millis(600))).unwrap();
            let mut buf = [0u8; 64];
            let quiet =
                matches!(std::io::Read::read(&mut g.s, &mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            g.send(0xA, &Message::Bye { reopen_after_ms: vport_common::message::NO_REOPEN, reason: "test".into() });
            quiet
        });
        let tl = Timeline::new(std::time::Instant::now());
        let mut session = srv.accept(Duration::from_secs(5)).unwrap();
        let (_tx, commands) = crossbeam_channel::unbounded();
        let mut liveness = IdleLiveness::new(Duration::from_millis(200), std::time::Instant::now());
        serve_session(&mut session, &tl, &commands, Some(&mut liveness), &|| true);
        assert!(silent.join().unwrap(), "the host sent nothing while the vm was paused");
        assert_eq!(session.end_reason(), Some(crate::session::EndReason::AgentBye));
        assert!(!tl.records().iter().any(|r| matches!(&r.kind, Kind::Note { text } if text.starts_with("liveness"))));
    }
}
