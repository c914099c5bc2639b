//! A scripted fake QMP server for tests: a unix socket in a temporary directory whose every
//! connection is handed, in turn, to a script that may misbehave at will.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// How long a script waits for a command before it gives up (a test that hangs is a bug).
const SCRIPT_WAIT: Duration = Duration::from_secs(20);

/// QEMU 7.2's greeting.
pub(super) const GREETING: &str =
    r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

/// A running fake server; it stops serving when dropped, and every [`Peer::hold`] returns.
pub(super) struct FakeQmp {
    pub(super) path: PathBuf,
    _dir: tempfile::TempDir,
    _stop: crossbeam_channel::Sender<()>,
}

/// One accepted connection, as the script sees it.
pub(super) struct Peer {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    stop: crossbeam_channel::Receiver<()>,
}

impl FakeQmp {
    /// Serves each connection with `script`, one after the other, until dropped.
    pub(super) fn start(mut script: impl FnMut(&mut Peer) + Send + 'static) -> FakeQmp {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(stream) = s else { return };
                let reader = BufReader::new(stream.try_clone().unwrap());
                script(&mut Peer { stream, reader, stop: stop.clone() });
                if stop.try_recv() == Err(crossbeam_channel::TryRecvError::Disconnected) {
                    return;
                }
            }
        });
        FakeQmp { path, _dir: dir, _stop: stop_tx }
    }

    /// A well-behaved server that answers each command with the lines `respond` returns.
    pub(super) fn respond(respond: impl Fn(&Value) -> Vec<String> + Send + 'static) -> FakeQmp {
        FakeQmp::start(move |p| {
            p.line(GREETING);
            while let Some(cmd) = p.command() {
                for out in respond(&cmd) {
                    p.line(&out);
                }
            }
        })
    }
}

impl Peer {
    /// Writes raw bytes; a client that has gone is not an error here.
    pub(super) fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Writes `text` and a newline.
    pub(super) fn line(&mut self, text: &str) {
        self.send(format!("{text}\n").as_bytes());
    }

    /// The next command line as JSON (`None` at EOF, on junk or after [`SCRIPT_WAIT`]).
    pub(super) fn command(&mut self) -> Option<Value> {
        self.reader.get_ref().set_read_timeout(Some(SCRIPT_WAIT)).ok()?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(n) if n > 0 => serde_json::from_str(&line).ok(),
            _ => None,
        }
    }

    /// Reads the next command and answers it with `ret`.
    pub(super) fn answer(&mut self, ret: Value) -> Value {
        let cmd = self.command().unwrap_or(Value::Null);
        self.line(&ok(&cmd, ret));
        cmd
    }

    /// Greets and answers `qmp_capabilities`, as QEMU does.
    pub(super) fn negotiate(&mut self) {
        self.line(GREETING);
        self.answer(json!({}));
    }

    /// Waits up to `d`, or less if the server is dropped (pacing, not synchronisation).
    pub(super) fn pause(&mut self, d: Duration) {
        let _ = self.stop.recv_timeout(d);
    }

    /// Whether the client closes the connection within [`SCRIPT_WAIT`] (whatever it sends
    /// before is read and dropped).
    pub(super) fn sees_close(&mut self) -> bool {
        if self.reader.get_ref().set_read_timeout(Some(SCRIPT_WAIT)).is_err() {
            return false;
        }
        self.reader.read_to_end(&mut Vec::new()).is_ok()
    }

    /// Keeps the connection open and silent, reading nothing, until the server is dropped.
    pub(super) fn hold(&mut self) {
        let _ = self.stop.recv();
    }
}

/// A reply to `cmd` returning `ret`.
pub(super) fn ok(cmd: &Value, ret: Value) -> String {
    json!({"return": ret, "id": cmd["id"]}).to_string()
}
