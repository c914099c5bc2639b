//! QMP client: commands with ids and deadlines, events on a channel.
//!
//! One reader thread owns the socket's read half. Replies are routed to the waiting command by
//! `id`; events go to a crossbeam channel together with the local monotonic time they arrived.
//! When QEMU closes the socket every waiting command fails with [`QmpError::Disconnected`] and
//! the event channel is closed, so nobody waits for a dead VM until its deadline.
//!
//! QMP rate-limits `VSERPORT_CHANGE` to one event per second per port id (the first at once,
//! later ones in the window replaced by the latest): treat it as a level hint and confirm with
//! [`Qmp::query_chardev`]'s `frontend_open`.

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// What went wrong talking QMP.
#[derive(Debug, Error)]
pub enum QmpError {
    /// The QMP socket could not be connected.
    #[error("cannot connect to qmp socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not send a valid greeting in time.
    #[error("no qmp greeting from {path} within {timeout:?}")]
    Greeting {
        /// Socket path.
        path: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
    /// Writing a command failed.
    #[error("cannot send qmp command {command}")]
    Send {
        /// The command.
        command: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered the command with an error.
    #[error("qmp command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QMP error description.
        desc: String,
    },
    /// No reply before the deadline.
    #[error("qmp command {command} got no reply within {timeout:?}")]
    Timeout {
        /// The command.
        command: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The socket closed (QEMU exited) before the reply.
    #[error("qmp connection closed while waiting for {command}")]
    Disconnected {
        /// The command.
        command: String,
    },
    /// A reply did not have the expected shape.
    #[error("unexpected reply to qmp command {command}: {reply}")]
    Unexpected {
        /// The command.
        command: String,
        /// The reply, as JSON text.
        reply: String,
    },
}

/// A QMP event with the time it was received.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, for example `VSERPORT_CHANGE`.
    pub name: String,
    /// The event's `data` member (`Null` when absent).
    pub data: Value,
    /// QEMU's wall-clock timestamp in microseconds since the epoch.
    pub qemu_time_us: u64,
    /// Local monotonic time of receipt.
    pub received: Instant,
}

impl QmpEvent {
    /// For `VSERPORT_CHANGE`: the port id and the `open` flag.
    pub fn vserport_change(&self) -> Option<(&str, bool)> {
        if self.name != "VSERPORT_CHANGE" {
            return None;
        }
        Some((self.data.get("id")?.as_str()?, self.data.get("open")?.as_bool()?))
    }
}

/// One row of `query-chardev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChardevInfo {
    /// Chardev id.
    pub label: String,
    /// Backend description, for example `unix:/tmp/x.sock,server=on`.
    pub filename: String,
    /// Whether the frontend (the guest side) has it open.
    pub frontend_open: bool,
}

/// QEMU version from `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QemuVersion {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Micro.
    pub micro: u64,
    /// Package string, for example `Debian 1:7.2+dfsg-7+deb12u18`.
    pub package: String,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        match self.package.trim() {
            "" => Ok(()),
            p if p.starts_with('(') => write!(f, " {p}"),
            p => write!(f, " ({p})"),
        }
    }
}

/// The state of a migration, from `query-migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationStatus {
    /// `none` (no migration yet), `setup`, `active`, `completed`, `failed`, `cancelled`, ...
    pub status: String,
    /// QEMU's description of a failure.
    pub error: Option<String>,
}

type Reply = Result<Value, (String, String)>;
type Pending = Arc<Mutex<Option<HashMap<u64, Sender<Reply>>>>>;
/// Extra event receivers (see [`Qmp::subscribe`]); `None` once the connection closed.
type Subscribers = Arc<Mutex<Option<Vec<Sender<QmpEvent>>>>>;

/// A connected QMP session (capabilities negotiated).
pub struct Qmp {
    writer: Mutex<UnixStream>,
    pending: Pending,
    next_id: AtomicU64,
    events: Receiver<QmpEvent>,
    subscribers: Subscribers,
    /// The default deadline for commands.
    pub timeout: Duration,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities, each within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect { path: path.into(), source })?;
        let greeting_err = || QmpError::Greeting { path: path.into(), timeout };
        stream.set_read_timeout(Some(timeout)).map_err(|_| greeting_err())?;
        let read_half = stream.try_clone().map_err(|source| QmpError::Connect { path: path.into(), source })?;
        let mut reader = BufReader::new(read_half);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|_| greeting_err())?;
        let greeting: Value = serde_json::from_str(&line).map_err(|_| greeting_err())?;
        if greeting.get("QMP").is_none() {
            return Err(greeting_err());
        }
        stream.set_read_timeout(None).map_err(|_| greeting_err())?;
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
        let subscribers: Subscribers = Arc::new(Mutex::new(Some(Vec::new())));
        let (p, subs) = (pending.clone(), subscribers.clone());
        std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || reader_loop(reader, p, ev_tx, subs))
            .map_err(|source| QmpError::Connect { path: path.into(), source })?;
        let qmp = Qmp {
            writer: Mutex::new(stream),
            pending,
            next_id: AtomicU64::new(1),
            events: ev_rx,
            subscribers,
            timeout,
        };
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The main event stream: every event since the connection, delivered once, to whichever
    /// caller takes it.
    pub fn events(&self) -> &Receiver<QmpEvent> {
        &self.events
    }

    /// A private copy of every event received from now on, independent of [`Qmp::events`] and
    /// of other subscribers. The receiver disconnects when QEMU closes the QMP socket.
    pub fn subscribe(&self) -> Receiver<QmpEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        if let Some(subs) = self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            subs.push(tx);
        }
        // When the connection is already closed, `tx` is dropped here and `rx` reports it.
        rx
    }

    /// Runs `command` with the default deadline.
    pub fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, self.timeout)
    }

    /// Runs `command` and waits up to `timeout` for its reply.
    pub fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        {
            let mut guard = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let Some(map) = guard.as_mut() else {
                return Err(QmpError::Disconnected { command: command.into() });
            };
            map.insert(id, tx);
        }
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(command.into()));
        if let Some(args) = arguments {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), json!(id));
        let mut line = Value::Object(msg).to_string();
        log::debug!("qmp -> {line}");
        line.push('\n');
        {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            w.write_all(line.as_bytes()).map_err(|source| QmpError::Send { command: command.into(), source })?;
        }
        match rx.recv_timeout(timeout) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err((class, desc))) => Err(QmpError::Command { command: command.into(), class, desc }),
            Err(RecvTimeoutError::Timeout) => {
                if let Some(map) = self.pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    map.remove(&id);
                }
                Err(QmpError::Timeout { command: command.into(), timeout })
            }
            Err(RecvTimeoutError::Disconnected) => Err(QmpError::Disconnected { command: command.into() }),
        }
    }

    /// `query-chardev`.
    pub fn query_chardev(&self) -> Result<Vec<ChardevInfo>, QmpError> {
        let reply = self.execute("query-chardev", None)?;
        parse_chardevs(&reply)
            .ok_or_else(|| QmpError::Unexpected { command: "query-chardev".into(), reply: reply.to_string() })
    }

    /// `frontend-open` of the chardev `label`, or `None` if QEMU has no such chardev.
    pub fn frontend_open(&self, label: &str) -> Result<Option<bool>, QmpError> {
        Ok(self.query_chardev()?.into_iter().find(|c| c.label == label).map(|c| c.frontend_open))
    }

    /// `query-version`.
    pub fn query_version(&self) -> Result<QemuVersion, QmpError> {
        let reply = self.execute("query-version", None)?;
        parse_version(&reply)
            .ok_or_else(|| QmpError::Unexpected { command: "query-version".into(), reply: reply.to_string() })
    }

    /// `query-status`: the run state (`running`, `paused`, `prelaunch`, ...).
    pub fn query_status(&self) -> Result<String, QmpError> {
        let reply = self.execute("query-status", None)?;
        reply
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Unexpected { command: "query-status".into(), reply: reply.to_string() })
    }

    /// `cont`: run a VM started paused (`-S`) or stopped.
    pub fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// `stop`: pause the VM.
    pub fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// `system_reset`.
    pub fn system_reset(&self) -> Result<(), QmpError> {
        self.execute("system_reset", None).map(drop)
    }

    /// `device_add` with the given properties (`driver`, `id`, ...).
    pub fn device_add(&self, props: Value) -> Result<(), QmpError> {
        self.execute("device_add", Some(props)).map(drop)
    }

    /// `device_del` of device `id`.
    pub fn device_del(&self, id: &str) -> Result<(), QmpError> {
        self.execute("device_del", Some(json!({ "id": id }))).map(drop)
    }

    /// `migrate` to `uri` (for example `unix:/path` to a destination started with
    /// `-incoming unix:/path`, or `exec:cat > FILE` to save the state). Returns at once;
    /// follow progress with [`Qmp::query_migrate`] or the `MIGRATION` events.
    pub fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri }))).map(drop)
    }

    /// `migrate-incoming` on a destination started with `-incoming defer`.
    pub fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri }))).map(drop)
    }

    /// `query-migrate`: the migration status (`none`, `setup`, `active`, `completed`, `failed`,
    /// ...) and, when failed, QEMU's error description.
    pub fn query_migrate(&self) -> Result<MigrationStatus, QmpError> {
        let reply = self.execute("query-migrate", None)?;
        Ok(MigrationStatus {
            status: reply.get("status").and_then(Value::as_str).unwrap_or("none").to_string(),
            error: reply.get("error-desc").and_then(Value::as_str).map(str::to_string),
        })
    }

    /// Waits up to `timeout` for an event accepted by `pred`; other events received meanwhile
    /// are returned too, in order, so the caller can record them.
    pub fn wait_event(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&QmpEvent) -> bool,
    ) -> (Option<QmpEvent>, Vec<QmpEvent>) {
        let deadline = Instant::now() + timeout;
        let mut others = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) if pred(&ev) => return (Some(ev), others),
                Ok(ev) => others.push(ev),
                Err(_) => return (None, others),
            }
        }
    }
}

fn reader_loop(
    mut reader: BufReader<UnixStream>,
    pending: Pending,
    events: Sender<QmpEvent>,
    subscribers: Subscribers,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let received = Instant::now();
        log::debug!("qmp <- {}", line.trim_end());
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            log::warn!("qmp: ignoring a line that is not json: {}", line.trim_end());
            continue;
        };
        match classify(&v) {
            Incoming::Event(name, data, qemu_time_us) => {
                let ev = QmpEvent { name, data, qemu_time_us, received };
                if let Some(subs) = subscribers.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    // A subscriber whose receiver is gone is forgotten.
                    subs.retain(|tx| tx.send(ev.clone()).is_ok());
                }
                // A closed main receiver only means nobody listens there any more.
                let _ = events.send(ev);
            }
            Incoming::Reply(id, reply) => {
                let tx = pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut().and_then(|m| m.remove(&id));
                match tx {
                    // The waiter may have timed out and gone; the reply is then moot.
                    Some(tx) => drop(tx.send(reply)),
                    None => log::debug!("qmp: reply to id {id} nobody waits for"),
                }
            }
            Incoming::Other => log::debug!("qmp: unrecognised message {v}"),
        }
    }
    // Closing: dropping every sender wakes every waiter with Disconnected, and every
    // subscriber sees its channel disconnect.
    pending.lock().unwrap_or_else(|e| e.into_inner()).take();
    subscribers.lock().unwrap_or_else(|e| e.into_inner()).take();
    log::debug!("qmp: connection closed");
}

enum Incoming {
    Event(String, Value, u64),
    Reply(u64, Reply),
    Other,
}

fn classify(v: &Value) -> Incoming {
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        let ts = v.get("timestamp");
        let secs = ts.and_then(|t| t.get("seconds")).and_then(Value::as_u64).unwrap_or(0);
        let us = ts.and_then(|t| t.get("microseconds")).and_then(Value::as_u64).unwrap_or(0);
        let data = v.get("data").cloned().unwrap_or(Value::Null);
        return Incoming::Event(name.to_string(), data, secs * 1_000_000 + us);
    }
    let Some(id) = v.get("id").and_then(Value::as_u64) else { return Incoming::Other };
    if let Some(ret) = v.get("return") {
        return Incoming::Reply(id, Ok(ret.clone()));
    }
    if let Some(err) = v.get("error") {
        let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Incoming::Reply(id, Err((s("class"), s("desc"))));
    }
    Incoming::Other
}

fn parse_chardevs(v: &Value) -> Option<Vec<ChardevInfo>> {
    v.as_array()?
        .iter()
        .map(|c| {
            Some(ChardevInfo {
                label: c.get("label")?.as_str()?.to_string(),
                filename: c.get("filename")?.as_str()?.to_string(),
                frontend_open: c.get("frontend-open")?.as_bool()?,
            })
        })
        .collect()
}

fn parse_version(v: &Value) -> Option<QemuVersion> {
    let q = v.get("qemu")?;
    Some(QemuVersion {
        major: q.get("major")?.as_u64()?,
        minor: q.get("minor")?.as_u64()?,
        micro: q.get("micro")?.as_u64()?,
        package: v.get("package").and_then(Value::as_str).unwrap_or("").to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted QMP server: sends the greeting, then answers each command line with
    /// `respond(command_json)` lines.
    fn fake_qmp(respond: impl Fn(&Value) -> Vec<String> + Send + 'static) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let cmd: Value = serde_json::from_str(&line).unwrap();
                for out in respond(&cmd) {
                    s.write_all(out.as_bytes()).unwrap();
                    s.write_all(b"\n").unwrap();
                }
                line.clear();
            }
        });
        (dir, path)
    }

    fn ok(cmd: &Value, ret: Value) -> String {
        json!({"return": ret, "id": cmd["id"]}).to_string()
    }

    #[test]
    fn replies_route_by_id_and_events_arrive_on_the_channel() {
        let (_d, path) = fake_qmp(|cmd| {
            match cmd["execute"].as_str().unwrap() {
            "query-chardev" => vec![
                // an event interleaved before the reply
                r#"{"event":"VSERPORT_CHANGE","data":{"id":"port0","open":true},"timestamp":{"seconds":2,"microseconds":5}}"#.into(),
                ok(cmd, json!([{"label":"c0","filename":"unix:/x,server=on","frontend-open":true}])),
            ],
            _ => vec![ok(cmd, json!({}))],
        }
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let sub = qmp.subscribe();
        let devs = qmp.query_chardev().unwrap();
        assert_eq!(
            devs,
            vec![ChardevInfo { label: "c0".into(), filename: "unix:/x,server=on".into(), frontend_open: true }]
        );
        let (ev, others) = qmp.wait_event(Duration::from_secs(5), |e| e.vserport_change().is_some());
        let ev = ev.unwrap();
        assert_eq!(ev.vserport_change(), Some(("port0", true)));
        assert_eq!(ev.qemu_time_us, 2_000_005);
        assert!(others.is_empty());
        // Subscribed before the event: the subscriber has its own copy.
        assert_eq!(sub.recv_timeout(Duration::from_secs(5)).unwrap().vserport_change(), Some(("port0", true)));
    }

    #[test]
    fn command_errors_carry_class_and_description() {
        let (_d, path) = fake_qmp(|cmd| match cmd["execute"].as_str().unwrap() {
            "device_del" => {
                vec![json!({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}, "id": cmd["id"]})
                    .to_string()]
            }
            _ => vec![ok(cmd, json!({}))],
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let err = qmp.device_del("x").unwrap_err();
        assert!(matches!(&err, QmpError::Command { class, .. } if class == "DeviceNotFound"), "{err}");
    }

    #[test]
    fn silent_server_times_out_and_closed_server_disconnects() {
        let (_d, path) = fake_qmp(|cmd| match cmd["execute"].as_str().unwrap() {
            "qmp_capabilities" => vec![ok(cmd, json!({}))],
            _ => vec![],
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let err = qmp.execute_timeout("query-status", None, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {}}\n").unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let cmd: Value = serde_json::from_str(&line).unwrap();
            s.write_all(format!("{}\n", ok(&cmd, json!({}))).as_bytes()).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap(); // read the next command, then hang up
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let sub = qmp.subscribe();
        let err = qmp.execute_timeout("query-status", None, Duration::from_secs(30)).unwrap_err();
        assert!(matches!(err, QmpError::Disconnected { .. }), "{err}");
        assert!(sub.recv_timeout(Duration::from_secs(5)).is_err(), "subscribers see the close");
    }

    #[test]
    fn migration_wrappers_send_the_uri_and_parse_the_status() {
        let (_d, path) = fake_qmp(|cmd| match cmd["execute"].as_str().unwrap() {
            "migrate" => {
                assert_eq!(cmd["arguments"]["uri"], "unix:/tmp/m.sock");
                vec![ok(cmd, json!({}))]
            }
            "query-migrate" => vec![ok(cmd, json!({"status": "failed", "error-desc": "boom"}))],
            _ => vec![ok(cmd, json!({}))],
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        qmp.migrate("unix:/tmp/m.sock").unwrap();
        assert_eq!(
            qmp.query_migrate().unwrap(),
            MigrationStatus { status: "failed".into(), error: Some("boom".into()) }
        );
    }

    #[test]
    fn version_display_puts_the_package_in_parentheses() {
        let v = QemuVersion { major: 7, minor: 2, micro: 22, package: "Debian 1:7.2+dfsg-7".into() };
        assert_eq!(v.to_string(), "7.2.22 (Debian 1:7.2+dfsg-7)");
        let v = QemuVersion { package: String::new(), ..v };
        assert_eq!(v.to_string(), "7.2.22");
    }

    #[test]
    fn a_missing_socket_is_a_connect_error_naming_the_path() {
        let err = Qmp::connect(Path::new("/nonexistent/qmp.sock"), Duration::from_secs(1)).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/qmp.sock"), "{err}");
    }
}
