//! `vport watch`: the life cycle of every port of a running VM, live.
//!
//! For each port a watcher thread is the port's host client: it completes the handshake, then
//! keeps reading, so an in-band BYE (the guest is closing) or HELLO (the guest opened again) is
//! seen within milliseconds; after each handshake it fetches the agent's own transition records
//! (EVENTS) and maps them onto the host clock with the ping-estimated offset. QMP events go on
//! the same [`Timeline`]. Commands (`close PORT MS`, `reopen PORT`, `ping PORT`) reach the
//! watchers through a channel, so a user (or a test) can make the guest close and open a port.

use crate::link::{Link, LinkError, Received};
use crate::rig::Rig;
use crate::timeline::{ClockOffset, Timeline};
use crossbeam_channel::{Receiver, Sender};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use thiserror::Error;
use vport_common::message::MAX_REOPEN_DELAY_MS;
use vport_common::Message;

/// How long a watcher blocks in one read before it looks at its command channel.
const POLL_SLICE: Duration = Duration::from_millis(50);
/// Deadline for one request to the agent.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a handshake while the guest is expected to have the port open.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(120);
/// The host version sent in HELLO_ACK.
const HOST_VERSION: &str = concat!("vport watch ", env!("CARGO_PKG_VERSION"));

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

/// Starts one watcher thread per port of `rig`, recording on `timeline`, plus a thread that
/// records QMP events. Returns the command sender; the threads end when QEMU exits.
pub fn start(rig: &Rig, timeline: &Timeline) -> Result<Sender<Command>, WatchError> {
    let events = rig.qmp.subscribe();
    let tl = timeline.clone();
    spawn("watch-qmp".into(), move || {
        for ev in events.iter() {
            tl.qmp_event(&ev);
        }
    })?;
    let mut senders = Vec::new();
    for port in rig.vm.ports() {
        timeline.alias(&port.id, &port.name);
        timeline.alias(&port.chardev_id, &port.name);
        let mut link = rig.connect(&port.name)?;
        timeline.host_connect(&port.name);
        link.set_timeline(timeline.clone());
        let (tx, rx) = crossbeam_channel::unbounded();
        let tl = timeline.clone();
        let name = port.name.clone();
        spawn(format!("watch-{name}"), move || watch_port(link, &tl, &rx))?;
        senders.push((port.name.clone(), tx));
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

/// The life of one port's watcher: handshake, then read and serve commands until QEMU closes
/// the connection.
fn watch_port(mut link: Link<UnixStream>, tl: &Timeline, commands: &Receiver<Command>) {
    let port = link.port().to_string();
    let mut agent_seq = 0;
    loop {
        match link.handshake(HANDSHAKE_TIMEOUT, HOST_VERSION) {
            Ok(_) => {}
            Err(e) => return end(tl, &port, &e),
        }
        if let Err(e) = fetch_agent_events(&mut link, tl, &mut agent_seq) {
            return end(tl, &port, &e);
        }
        // READY: read until the session ends (BYE, or a HELLO of a new session).
        loop {
            if let Ok(cmd) = commands.try_recv() {
                if let Err(e) = run_command(&mut link, tl, &cmd) {
                    log::warn!("port {port}: {e}");
                }
            }
            match link.recv(Instant::now() + POLL_SLICE, "agent messages") {
                Ok(Received { message: Ok(Message::Bye { .. }), .. }) => break,
                Ok(Received { frame, message: Ok(Message::Hello(_)), .. })
                    if frame.header.session != link.session() =>
                {
                    break
                }
                Ok(_) | Err(LinkError::Timeout { .. }) => {}
                Err(e) => return end(tl, &port, &e),
            }
        }
    }
}

fn run_command(link: &mut Link<UnixStream>, tl: &Timeline, cmd: &Command) -> Result<(), LinkError> {
    let port = link.port().to_string();
    match cmd {
        // The BYE is read by the watcher loop, which then waits for the next session.
        Command::Close { ms, .. } => link.send(&Message::Close { reopen_after_ms: *ms }),
        Command::Reopen { .. } => link.send(&Message::Reopen),
        Command::Ping { .. } => {
            let p = link.ping(REQUEST_TIMEOUT, tl.now_ns())?;
            tl.note(&port, &format!("ping round trip {} us", p.rtt.as_micros()));
            Ok(())
        }
    }
}

/// Fetches the agent's new transition records and maps them with a fresh clock offset.
fn fetch_agent_events(link: &mut Link<UnixStream>, tl: &Timeline, since: &mut u64) -> Result<(), LinkError> {
    let mut samples = Vec::new();
    for _ in 0..5 {
        samples.push(link.ping(REQUEST_TIMEOUT, tl.now_ns())?);
    }
    let events = link.events(*since, REQUEST_TIMEOUT)?;
    *since = events.next_seq;
    if let Some(offset) = ClockOffset::from_ping_samples(tl.origin(), &samples) {
        tl.agent_events(link.port(), &events.records, &offset);
    }
    Ok(())
}

fn end(tl: &Timeline, port: &str, e: &LinkError) {
    let reason = match e {
        LinkError::Closed { .. } => "qemu closed the connection".to_string(),
        other => other.to_string(),
    };
    tl.host_disconnect(port, &reason);
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

/// One port's row in the live table, derived from timeline records only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRow {
    /// Port name.
    pub port: String,
    /// Whether the guest has the port open, as last seen (in band or QMP); `None`: not yet known.
    pub guest_open: Option<bool>,
    /// Whether the host client is attached.
    pub host_connected: bool,
    /// DISCONNECTED, CONNECTED or READY, from the in-band handshake.
    pub state: &'static str,
    /// The current session id.
    pub session: u32,
    /// Payload bytes host to guest.
    pub bytes_h2g: u64,
    /// Payload bytes guest to host.
    pub bytes_g2h: u64,
    /// The last thing that happened.
    pub last: String,
}

/// The live table: applies timeline records, renders the rows.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<PortRow>,
}

impl Table {
    /// Applies one record; returns whether a row changed.
    pub fn apply(&mut self, r: &vport_common::trace::Record) -> bool {
        use vport_common::trace::{Direction, Kind};
        if r.port.is_empty() {
            return false;
        }
        let idx = match self.rows.iter().position(|row| row.port == r.port) {
            Some(i) => i,
            None => {
                self.rows.push(PortRow { port: r.port.clone(), state: "DISCONNECTED", ..PortRow::default() });
                self.rows.len() - 1
            }
        };
        let row = &mut self.rows[idx];
        match &r.kind {
            Kind::HostConnect => row.host_connected = true,
            Kind::HostDisconnect { .. } => {
                row.host_connected = false;
                row.state = "DISCONNECTED";
            }
            Kind::Hello { session, .. } => {
                row.guest_open = Some(true);
                if row.state != "READY" || *session != row.session {
                    row.state = "CONNECTED";
                }
                row.session = *session;
            }
            Kind::HelloAck { .. } => row.state = "READY",
            Kind::Bye { .. } => {
                row.guest_open = Some(false);
                row.state = "DISCONNECTED";
            }
            Kind::VserportChange { open, .. } | Kind::FrontendOpen { open } => row.guest_open = Some(*open),
            Kind::Data { dir: Direction::HostToGuest, bytes, .. } => row.bytes_h2g += bytes,
            Kind::Data { dir: Direction::GuestToHost, bytes, .. } => row.bytes_g2h += bytes,
            _ => {}
        }
        row.last = format!("{:>8.3}s {:?} {}", r.t_ns as f64 / 1e9, r.source, r.kind);
        true
    }

    /// The rows, in first-seen order.
    pub fn rows(&self) -> &[PortRow] {
        &self.rows
    }

    /// The table as text.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:<20} {:<6} {:<5} {:<12} {:<10} {:>10} {:>10}  {}\n",
            "PORT", "GUEST", "HOST", "STATE", "SESSION", "H2G B", "G2H B", "LAST EVENT"
        );
        for r in &self.rows {
            let guest = match r.guest_open {
                Some(true) => "open",
                Some(false) => "closed",
                None => "?",
            };
            out.push_str(&format!(
                "{:<20} {:<6} {:<5} {:<12} {:<10} {:>10} {:>10}  {}\n",
                r.port,
                guest,
                if r.host_connected { "yes" } else { "no" },
                r.state,
                format!("{:#010x}", r.session),
                r.bytes_h2g,
                r.bytes_g2h,
                r.last
            ));
        }
        out
    }
}

/// A timeline sink that keeps a [`Table`] and prints it on every change: redrawn in place on
/// a terminal, appended (one table per change) otherwise.
pub struct TableSink<W: std::io::Write> {
    out: W,
    table: Table,
    pending: Vec<u8>,
    redraw: bool,
}

impl<W: std::io::Write> TableSink<W> {
    /// A sink printing to `out`; `redraw` clears the screen before each table.
    pub fn new(out: W, redraw: bool) -> Self {
        TableSink { out, table: Table::default(), pending: Vec::new(), redraw }
    }
}

impl<W: std::io::Write> std::io::Write for TableSink<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(nl) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line);
            match vport_common::trace::parse_record(&text, 0) {
                Ok(Some(r)) if self.table.apply(&r) => {
                    if self.redraw {
                        self.out.write_all(b"\x1b[H\x1b[2J")?;
                    }
                    self.out.write_all(self.table.render().as_bytes())?;
                    if !self.redraw {
                        self.out.write_all(b"\n")?;
                    }
                }
                Ok(_) => {}
                Err(e) => log::warn!("watch: cannot show a record: {e}"),
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
