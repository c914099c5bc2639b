//! `vport send` and `vport recv`: a file between the host and the guest's stream directory, as
//! an acknowledged stream ([`crate::stream`]) through a port of a VM started by `vport boot`
//! (or any chardev socket, `--socket`). The transfer survives the host leaving, the guest
//! closing the port, the agent restarting and the VM migrating: it waits for the next session
//! and resumes from the receiver's offset; run again after a failure, it resumes from what is
//! stored.

use super::{stdout_err, CommandError, Progress};
use crate::chardev::UnixClientEndpoint;
use crate::connect::{self, Target};
use crate::registry;
use crate::session::PortServer;
use crate::stream::to_guest::ToGuest;
use crate::stream::to_host::ToHost;
use crate::stream::{Control, StreamSide, TransferEvent, TransferOptions, TransferReport};
use crate::usage::{self, UsageError};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which way the file goes.
#[derive(Debug, Clone)]
pub enum Direction {
    /// `vport send`: host file `local` into the guest's stream directory as `name`.
    Send {
        /// The host file.
        local: PathBuf,
        /// The name in the guest (default: `local`'s file name).
        name: Option<String>,
    },
    /// `vport recv`: the guest's `name` into host file `dest`.
    Recv {
        /// The name in the guest's stream directory.
        name: String,
        /// The host file (default: `name` in the current directory).
        dest: Option<PathBuf>,
    },
}

/// What `vport send` / `vport recv` is asked for.
#[derive(Debug, Clone)]
pub struct TransferCommand {
    /// The port, by name.
    pub port: Option<String>,
    /// QEMU pid of the VM, when several have the port.
    pub vm: Option<u32>,
    /// A chardev socket to connect to directly.
    pub socket: Option<PathBuf>,
    /// Which way.
    pub direction: Direction,
    /// Longest wait for a session, at the start and after each interruption.
    pub session_timeout: Duration,
    /// Longest time a session may make no progress before the host leaves and resumes.
    pub stall_timeout: Duration,
    /// Print the result as one JSON object.
    pub json: bool,
}

/// `vport send` / `vport recv`: checks the arguments, connects, runs the stream to its end
/// (resuming through interruptions), and prints what was moved.
pub fn transfer(cmd: &TransferCommand, out: &mut impl Write, progress: &Progress) -> Result<(), CommandError> {
    // Arguments first: nothing connects for a bad name or a missing file.
    let (name, local) = match &cmd.direction {
        Direction::Send { local, name } => {
            usage::check_source_file(local)?;
            let name = match name {
                Some(n) => n.clone(),
                None => local.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            };
            (name, local.clone())
        }
        Direction::Recv { name, dest } => {
            usage::check_stream_name(name)?;
            let dest = dest.clone().unwrap_or_else(|| PathBuf::from(name));
            usage::check_output_file("--output", &dest)?;
            (name.clone(), dest)
        }
    };
    usage::check_stream_name(&name)?;
    let target = match (&cmd.socket, &cmd.port) {
        (Some(socket), _) => Target::socket(socket),
        (None, Some(port)) => connect::lookup(&registry::registry_dir(), port, cmd.vm)?,
        (None, None) => return Err(UsageError::MissingPort.into()),
    };
    let port = target.name.clone().unwrap_or_else(|| target.socket.display().to_string());
    progress.say(&format!("connecting to {}", target.place()));
    let (first, qmp) = connect::open_keeping_qmp(&target, Duration::from_secs(3))?;
    // The first connection is the checked one; later ones connect to the same socket again.
    let endpoint = UnixClientEndpoint::resuming(&port, &target.socket, first, cmd.stall_timeout);
    // With the VM's tools monitor (a `vport boot` VM), QMP events end sessions (a pause, a
    // migration, an unplug) and the run state keeps a paused VM from looking stalled; without
    // it (--socket) a session's end is seen in band (BYE, a newer HELLO) or as the
    // connection's loss, and a session that makes no progress for --stall is left and resumed.
    // The default reconnect policy (always) connects again after every interruption.
    let chardev = target.qmp.as_ref().map(|(_, label)| label.clone()).unwrap_or_default();
    let device = target.device.clone().unwrap_or_default();
    // Without QMP no event comes, but the channel stays open (its sender lives to the end): a
    // closed channel would read as QEMU gone.
    let (_keep_open, no_events) = crossbeam_channel::unbounded();
    let mut server = match qmp {
        Some(qmp) => {
            let events = qmp.subscribe();
            PortServer::with_events(&port, &device, &chardev, Box::new(endpoint), events, Some(Arc::new(qmp)))
        }
        None => PortServer::with_events(&port, &device, &chardev, Box::new(endpoint), no_events, None),
    };
    let opts = TransferOptions {
        session_timeout: cmd.session_timeout,
        stall_timeout: cmd.stall_timeout,
        ..Default::default()
    };
    let mut shown = ProgressLine::new(progress);
    let mut hook = |e: &TransferEvent| {
        shown.event(e);
        Control::Continue
    };
    let (what, report) = match &cmd.direction {
        Direction::Send { .. } => {
            let mut stream = ToGuest::new(&port, &local, &name, opts)?;
            progress.say(&format!("sending {} as {name} (stream {:#018x})", local.display(), stream.id()));
            ("sent", stream.run(&mut server, &mut hook)?)
        }
        Direction::Recv { .. } => {
            let mut stream = ToHost::new(&port, &name, &local, opts)?;
            progress.say(&format!("receiving {name} into {} (stream {:#018x})", local.display(), stream.id()));
            ("received", stream.run(&mut server, &mut hook)?)
        }
    };
    let (from, to) = match &cmd.direction {
        Direction::Send { .. } => (local.display().to_string(), format!("{port}:{name}")),
        Direction::Recv { .. } => (format!("{port}:{name}"), local.display().to_string()),
    };
    write_report(out, what, &from, &to, &report, cmd.json).map_err(stdout_err)
}

/// The result: one line for people, one JSON object with `--json`.
fn write_report(
    out: &mut impl Write,
    what: &str,
    from: &str,
    to: &str,
    r: &TransferReport,
    json: bool,
) -> std::io::Result<()> {
    if json {
        let v = json!({
            "result": what, "from": from, "to": to, "stream_id": format!("{:#018x}", r.id),
            "bytes": r.bytes, "digest": format!("{:#018x}", r.digest), "sessions": r.sessions,
            "interruptions": r.interruptions, "resent_bytes": r.resent, "duplicate_bytes": r.duplicates,
            "resumed_at": r.started_at, "moved_bytes": r.bytes - r.started_at, "elapsed_s": r.elapsed.as_secs_f64(),
        });
        return writeln!(out, "{v}");
    }
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    writeln!(
        out,
        "{what} {from} -> {to}: {} bytes, digest {:#018x} verified, {} session(s), {} interruption(s), {} bytes resent{}, {:.1} MiB/s",
        r.bytes,
        r.digest,
        r.sessions,
        r.interruptions,
        r.resent,
        match r.started_at {
            0 => String::new(),
            at if at == r.bytes => ", already there whole: nothing moved".into(),
            at => format!(", resumed at {at}"),
        },
        (r.bytes - r.started_at) as f64 / secs / (1024.0 * 1024.0)
    )
}

/// Progress on stderr: every session and interruption, and the acknowledged bytes at most
/// once a second.
struct ProgressLine<'a> {
    progress: &'a Progress,
    last: Option<Instant>,
}

impl<'a> ProgressLine<'a> {
    fn new(progress: &'a Progress) -> Self {
        ProgressLine { progress, last: None }
    }

    fn event(&mut self, e: &TransferEvent) {
        match e {
            TransferEvent::Session { number } if *number > 1 => {
                self.progress.say(&format!("session {number}: resuming"));
            }
            TransferEvent::Session { .. } => {}
            TransferEvent::Accepted { offset, total } => {
                self.progress.say(&format!("stream open at {offset} of {total} bytes"));
            }
            TransferEvent::Progress { acked, total } => {
                if self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) || acked == total {
                    self.last = Some(Instant::now());
                    let pct = if *total == 0 { 100.0 } else { *acked as f64 * 100.0 / *total as f64 };
                    self.progress.say(&format!("{acked} of {total} bytes acknowledged ({pct:.0}%)"));
                }
            }
            TransferEvent::Reconnecting { waited } => {
                self.progress
                    .say(&format!("no session within {waited:?}: leaving the connection and connecting again"));
            }
            TransferEvent::Interrupted { reason, acked } => {
                self.progress
                    .say(&format!("interrupted at {acked} acknowledged bytes: {reason}; waiting for the next session"));
            }
        }
    }
}
