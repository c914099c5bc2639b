//! Test doubles for the session server: an endpoint whose connections are socketpairs handed
//! to a scripted agent, the agent's side, an observer that keeps what it heard, and a scripted
//! QMP monitor. Shared with the tests of the session server's users (`watch`).

use super::{PortServer, SessionId};
use crate::chardev::{ChardevError, Connection, Endpoint, EndpointAddr, EndpointEvents, EndpointKind};
use crate::qmp::{Qmp, QmpEvent};
use crossbeam_channel::{Receiver, Sender};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vport_common::message::error_code;
use vport_common::message::Hello;
use vport_common::Decoder;
use vport_common::Message;

/// An endpoint whose connections are socketpairs handed to a scripted agent. Their kind is
/// `kind`: a unix client's is asked of the kernel (a socketpair is served at once), a TCP
/// client's cannot be ([`super::Backlog::Unknown`]).
pub(crate) struct FakeEndpoint {
    addr: EndpointAddr,
    kind: EndpointKind,
    events: EndpointEvents,
    agents: Sender<UnixStream>,
}

impl Endpoint for FakeEndpoint {
    fn port(&self) -> &str {
        "org.vport.fake"
    }
    fn addr(&self) -> &EndpointAddr {
        &self.addr
    }
    fn connect(&mut self, _timeout: Duration) -> Result<Connection, ChardevError> {
        let (host, guest) = UnixStream::pair().unwrap();
        self.agents.send(guest).unwrap();
        Ok(Connection::from_unix_stream("org.vport.fake", self.kind, host, &self.events))
    }
    fn events(&self) -> &EndpointEvents {
        &self.events
    }
}

/// The guest side of one connection, scripted by the test thread.
pub(crate) struct Agent {
    pub(crate) s: UnixStream,
    dec: Decoder,
    seq: u32,
}

impl Agent {
    pub(crate) fn send(&mut self, session: u32, m: &Message) {
        self.s.write_all(&m.to_frame(session, self.seq).unwrap().encode().unwrap()).unwrap();
        self.seq += 1;
    }
    pub(crate) fn hello(&mut self, id: SessionId) {
        let h = Hello {
            agent_version: "t".into(),
            port_name: "org.vport.fake".into(),
            kernel_release: "k".into(),
            boot_id: "b".into(),
            nonce: id.nonce,
            agent_time_ns: 0,
        };
        self.send(id.session, &Message::Hello(h));
    }
    pub(crate) fn recv(&mut self) -> (u32, Message) {
        let (h, m) = self.recv_frame();
        (h.session, m)
    }
    pub(crate) fn recv_frame(&mut self) -> (vport_common::Header, Message) {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.dec.next_frame() {
                let f = f.unwrap();
                return (f.header, Message::from_frame(&f).unwrap());
            }
            let n = self.s.read(&mut buf).unwrap();
            assert!(n > 0, "host closed");
            self.dec.push(&buf[..n]);
        }
    }
    /// Answers requests like the agent in session `id` until `until` matches.
    /// A frame of another session is answered as the agent does: ERROR bad-session about it,
    /// in session 0.
    pub(crate) fn serve(&mut self, id: SessionId, mut until: impl FnMut(&Message) -> bool) {
        loop {
            let (h, m) = self.recv_frame();
            if until(&m) {
                return;
            }
            match m {
                Message::Ping { time_ns } if h.session == id.session || h.session == 0 => {
                    self.send(h.session, &Message::Pong { ping_time_ns: time_ns, time_ns: 7 })
                }
                Message::Ping { .. } => self.send(0, &Message::error_for(&h, error_code::BAD_SESSION, "stale")),
                _ => {}
            }
        }
    }
}

/// A server over a [`FakeEndpoint`] of unix client connections, without a QMP monitor: the
/// server, the guest ends of its connections, and its QMP event channel.
pub(crate) fn server() -> (PortServer, Receiver<UnixStream>, Sender<QmpEvent>) {
    server_with(EndpointKind::UnixClient, None)
}

/// A server over a [`FakeEndpoint`] of `kind` connections, asking `qmp` (see
/// [`scripted_qmp`]) what QMP events leave open.
pub(crate) fn server_with(
    kind: EndpointKind,
    qmp: Option<Arc<Qmp>>,
) -> (PortServer, Receiver<UnixStream>, Sender<QmpEvent>) {
    let (agents, rx) = crossbeam_channel::unbounded();
    let addr = EndpointAddr::UnixClient { path: "/fake".into() };
    let ep = FakeEndpoint { addr, kind, events: Default::default(), agents };
    let (qtx, qrx) = crossbeam_channel::unbounded();
    let srv = PortServer::with_events("org.vport.fake", "vport-port0", "vport-ch0", Box::new(ep), qrx, qmp);
    (srv, rx, qtx)
}

pub(crate) fn agent(rx: &Receiver<UnixStream>) -> Agent {
    Agent { s: rx.recv_timeout(Duration::from_secs(5)).unwrap(), dec: Decoder::default(), seq: 0 }
}

pub(crate) fn event(name: &str, data: serde_json::Value) -> QmpEvent {
    QmpEvent { name: name.into(), data, qemu_time_us: 0, received: Instant::now() }
}

/// An observer that keeps what it heard of the connection.
#[derive(Default)]
pub(crate) struct Recorded(std::sync::Mutex<Vec<String>>);

impl Recorded {
    pub(crate) fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl crate::link::LinkObserver for Recorded {
    fn message(&self, _: &str, _: vport_common::trace::Direction, _: u32, m: &Message, _: u64) {
        self.0.lock().unwrap().push(format!("{:?}", m.kind()));
    }
    fn stale(&self, _: &str, _: vport_common::trace::Direction, _: u32, m: &Message, _: u64) {
        self.0.lock().unwrap().push(format!("stale {:?}", m.kind()));
    }
    fn host_connected(&self, _: &str) {
        self.0.lock().unwrap().push("connect".into());
    }
    fn host_disconnected(&self, _: &str, reason: &str) {
        self.0.lock().unwrap().push(format!("disconnect: {reason}"));
    }
}

/// A QMP monitor on a unix socket that answers each command with `answer(command)`, and
/// closes the connection (QEMU gone) when that is `None` (`qmp_capabilities` is answered with
/// `{}` first, without asking). Events come from the test's own channel, see
/// [`PortServer::with_events`]. Returns the client and the directory that holds the socket
/// (keep it while the client is used).
pub(crate) fn scripted_qmp(answer: impl Fn(&str) -> Option<Value> + Send + 'static) -> (Arc<Qmp>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else { return };
        let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;
        writeln!(s, "{greeting}").unwrap();
        let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
        while let Some(Ok(line)) = lines.next() {
            let cmd: Value = serde_json::from_str(&line).unwrap();
            let ret = match cmd["execute"].as_str().unwrap_or("") {
                "qmp_capabilities" => json!({}),
                command => match answer(command) {
                    Some(ret) => ret,
                    None => return,
                },
            };
            if writeln!(s, "{}", json!({"return": ret, "id": cmd["id"]})).is_err() {
                return;
            }
        }
    });
    let qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
    (Arc::new(qmp), dir)
}
