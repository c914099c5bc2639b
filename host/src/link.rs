//! A framed, typed message link to `vport-agent` over one port's chardev connection.
//!
//! The link owns a [`Decoder`] and the host's session view: it performs the HELLO handshake
//! (asking for a HELLO with HELLO_REQUEST when none comes, because a reconnect can happen
//! without an edge the agent can see), and offers request/response helpers with deadlines.
//! Damaged bytes are counted and skipped (the decoder resynchronises); they never end the link.

use crate::chardev::Stream;
use std::io::ErrorKind;
use std::time::{Duration, Instant};
use thiserror::Error;
use vport_common::message::Hello;
use vport_common::{Decoder, Frame, Message, MessageError};

/// What went wrong on a link.
#[derive(Debug, Error)]
pub enum LinkError {
    /// Reading or writing the chardev connection failed.
    #[error("i/o error on port {port}")]
    Io {
        /// Port name.
        port: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the connection (the VM exited or the chardev went away).
    #[error("port {port}: connection closed by qemu")]
    Closed {
        /// Port name.
        port: String,
    },
    /// Nothing awaited arrived in time.
    #[error("port {port}: no {what} within {timeout:?}")]
    Timeout {
        /// Port name.
        port: String,
        /// What was awaited.
        what: String,
        /// The deadline.
        timeout: Duration,
    },
    /// A message could not be encoded.
    #[error("port {port}: cannot encode message")]
    Encode {
        /// Port name.
        port: String,
        /// Cause.
        #[source]
        source: MessageError,
    },
    /// A frame could not be encoded (payload over the protocol maximum).
    #[error("port {port}: cannot encode frame")]
    Frame {
        /// Port name.
        port: String,
        /// Cause.
        #[source]
        source: vport_common::FrameError,
    },
    /// The agent answered with an ERROR message.
    #[error("port {port}: agent error {code}: {text}")]
    Agent {
        /// Port name.
        port: String,
        /// Error code.
        code: u16,
        /// Error text.
        text: String,
    },
}

/// A frame received, with its parsed message and arrival time.
#[derive(Debug, Clone)]
pub struct Received {
    /// The frame.
    pub frame: Frame,
    /// The message it carries, or why it does not parse.
    pub message: Result<Message, MessageError>,
    /// Local monotonic arrival time.
    pub at: Instant,
}

/// The result of a completed handshake.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// The agent's HELLO.
    pub hello: Hello,
    /// The session id the agent chose.
    pub session: u32,
    /// When the HELLO arrived.
    pub hello_at: Instant,
    /// HELLO_REQUESTs the host had to send before a HELLO came.
    pub requests_sent: u32,
}

/// One ping round trip.
#[derive(Debug, Clone, Copy)]
pub struct PingSample {
    /// Round-trip time measured on the host's monotonic clock.
    pub rtt: Duration,
    /// The agent's monotonic clock when it answered.
    pub agent_time_ns: u64,
    /// Host send time.
    pub sent: Instant,
}

/// Counters of a link.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkStats {
    /// Frames sent.
    pub frames_out: u64,
    /// Frames received and returned.
    pub frames_in: u64,
    /// Frames of another session dropped.
    pub stale_frames: u64,
}

/// How long the host waits for a HELLO before it asks for one with HELLO_REQUEST.
pub const HELLO_REQUEST_INTERVAL: Duration = Duration::from_secs(1);

/// A framed link on one port.
pub struct Link<S: Stream> {
    port: String,
    stream: S,
    decoder: Decoder,
    session: u32,
    seq: u32,
    stats: LinkStats,
    buf: Vec<u8>,
}

impl<S: Stream> Link<S> {
    /// A link for port `port` over `stream`, outside any session.
    pub fn new(port: &str, stream: S) -> Self {
        Link {
            port: port.into(),
            stream,
            decoder: Decoder::default(),
            session: 0,
            seq: 0,
            stats: LinkStats::default(),
            buf: vec![0; 64 * 1024],
        }
    }

    /// The port name.
    pub fn port(&self) -> &str {
        &self.port
    }

    /// The current session id (0 before the handshake).
    pub fn session(&self) -> u32 {
        self.session
    }

    /// Counters of the link and of its decoder.
    pub fn stats(&self) -> (LinkStats, vport_common::DecoderStats) {
        (self.stats, self.decoder.stats())
    }

    /// Sends `msg` in the current session.
    pub fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        let frame = msg
            .to_frame(self.session, self.seq)
            .map_err(|source| LinkError::Encode { port: self.port.clone(), source })?;
        let wire = frame.encode().map_err(|source| LinkError::Frame { port: self.port.clone(), source })?;
        self.stream.write_all(&wire).map_err(|source| self.io_err(source))?;
        self.seq = self.seq.wrapping_add(1);
        self.stats.frames_out += 1;
        Ok(())
    }

    /// The next frame, waiting until `deadline`. Frames of another session than the current
    /// one (after the handshake) are dropped and counted.
    pub fn recv(&mut self, deadline: Instant, what: &str) -> Result<Received, LinkError> {
        let started = Instant::now();
        loop {
            while let Some(item) = self.decoder.next_frame() {
                match item {
                    Ok(frame) => {
                        if self.session != 0 && frame.header.session != 0 && frame.header.session != self.session {
                            self.stats.stale_frames += 1;
                            log::debug!(
                                "port {}: dropping frame of stale session {:#x}",
                                self.port,
                                frame.header.session
                            );
                            continue;
                        }
                        self.stats.frames_in += 1;
                        let message = Message::from_frame(&frame);
                        return Ok(Received { frame, message, at: Instant::now() });
                    }
                    Err(e) => log::debug!("port {}: {e}", self.port),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::Timeout {
                    port: self.port.clone(),
                    what: what.into(),
                    timeout: started.elapsed(),
                });
            }
            self.stream.set_read_timeout(Some(left)).map_err(|source| self.io_err(source))?;
            match self.stream.read(&mut self.buf) {
                // A peer that closes with our bytes unread makes the read fail with ECONNRESET.
                Ok(0) => return Err(LinkError::Closed { port: self.port.clone() }),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return Err(LinkError::Closed { port: self.port.clone() })
                }
                Ok(n) => self.decoder.push(&self.buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(source) => return Err(self.io_err(source)),
            }
        }
    }

    /// Waits for the agent's HELLO and acknowledges it; the link then belongs to that session.
    ///
    /// If no HELLO arrives within [`HELLO_REQUEST_INTERVAL`], a HELLO_REQUEST is sent, and again
    /// at that interval, until `timeout`. Requests written before the agent opened the port wait
    /// in QEMU (backpressure) and are answered then; the agent answers a request for a session
    /// it already offered by repeating that HELLO, so requests never multiply sessions.
    pub fn handshake(&mut self, timeout: Duration, host_version: &str) -> Result<Handshake, LinkError> {
        let deadline = Instant::now() + timeout;
        let mut requests_sent = 0;
        self.session = 0;
        loop {
            let slice = (Instant::now() + HELLO_REQUEST_INTERVAL).min(deadline);
            match self.recv(slice, "HELLO") {
                Ok(Received { frame, message: Ok(Message::Hello(hello)), at }) => {
                    self.session = frame.header.session;
                    self.seq = 0;
                    let nonce = hello.nonce;
                    self.send(&Message::HelloAck { nonce, host_version: host_version.into() })?;
                    return Ok(Handshake { hello, session: frame.header.session, hello_at: at, requests_sent });
                }
                Ok(other) => log::debug!("port {}: ignoring {:?} before HELLO", self.port, other.message),
                Err(LinkError::Timeout { .. }) if Instant::now() < deadline => {
                    log::debug!("port {}: no HELLO yet; sending HELLO_REQUEST", self.port);
                    self.send(&Message::HelloRequest)?;
                    requests_sent += 1;
                }
                Err(LinkError::Timeout { .. }) => {
                    return Err(LinkError::Timeout {
                        port: self.port.clone(),
                        what: "HELLO from vport-agent".into(),
                        timeout,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until `deadline` for a reply accepted by `pick`, skipping repeated HELLOs of the
    /// current session and failing on an agent ERROR.
    fn await_reply<T>(
        &mut self,
        deadline: Instant,
        what: &str,
        mut pick: impl FnMut(&Message) -> Option<T>,
    ) -> Result<(T, Instant), LinkError> {
        loop {
            let r = self.recv(deadline, what)?;
            match &r.message {
                Ok(Message::Error { code, text }) => {
                    return Err(LinkError::Agent { port: self.port.clone(), code: *code, text: text.clone() })
                }
                Ok(m) => match pick(m) {
                    Some(v) => return Ok((v, r.at)),
                    None => log::debug!("port {}: skipping {:?} while waiting for {what}", self.port, m.kind()),
                },
                Err(e) => log::debug!("port {}: unparsable frame while waiting for {what}: {e}", self.port),
            }
        }
    }

    /// One PING/PONG round trip; `now_ns` is the host's monotonic clock sent in the PING.
    pub fn ping(&mut self, timeout: Duration, now_ns: u64) -> Result<PingSample, LinkError> {
        let sent = Instant::now();
        self.send(&Message::Ping { time_ns: now_ns })?;
        let (agent_time_ns, at) = self.await_reply(sent + timeout, "PONG", |m| match m {
            Message::Pong { ping_time_ns, time_ns } if *ping_time_ns == now_ns => Some(*time_ns),
            _ => None,
        })?;
        Ok(PingSample { rtt: at - sent, agent_time_ns, sent })
    }

    /// Sends `data` in an ECHO and returns what came back.
    pub fn echo(&mut self, data: &[u8], timeout: Duration) -> Result<Vec<u8>, LinkError> {
        let sent = Instant::now();
        self.send(&Message::Echo(data.to_vec()))?;
        let (bytes, _) = self.await_reply(sent + timeout, "ECHO_REPLY", |m| match m {
            Message::EchoReply(b) => Some(b.clone()),
            _ => None,
        })?;
        Ok(bytes)
    }

    fn io_err(&self, source: std::io::Error) -> LinkError {
        LinkError::Io { port: self.port.clone(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// A scripted agent on the other end of a socketpair.
    fn agent(script: impl FnOnce(&mut Link<UnixStream>) + Send + 'static) -> Link<UnixStream> {
        let (host, guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut l = Link::new("fake-agent", guest);
            script(&mut l);
        });
        Link::new("org.vport.test", host)
    }

    fn hello(nonce: u64) -> Message {
        Message::Hello(Hello {
            agent_version: "t".into(),
            port_name: "org.vport.test".into(),
            kernel_release: "k".into(),
            boot_id: "b".into(),
            nonce,
            agent_time_ns: 0,
        })
    }

    fn send_in(l: &mut Link<UnixStream>, session: u32, m: &Message) {
        l.session = session;
        l.send(m).unwrap();
    }

    #[test]
    fn handshake_acks_the_hello_nonce_and_adopts_its_session() {
        let mut host = agent(|g| {
            // garbage first: the decoder must resynchronise
            g.stream.write_all(b"\xF5VPR stale bytes").unwrap();
            send_in(g, 0xAB, &hello(77));
            let r = g.recv(Instant::now() + Duration::from_secs(5), "ack").unwrap();
            assert_eq!(r.frame.header.session, 0xAB);
            assert!(matches!(r.message, Ok(Message::HelloAck { nonce: 77, .. })));
            let ping = g.recv(Instant::now() + Duration::from_secs(5), "ping").unwrap();
            let Ok(Message::Ping { time_ns }) = ping.message else { panic!("{:?}", ping.message) };
            send_in(g, 0x99, &Message::Pong { ping_time_ns: time_ns, time_ns: 1 }); // stale session
            send_in(g, 0xAB, &Message::Pong { ping_time_ns: time_ns, time_ns: 2 });
        });
        let hs = host.handshake(Duration::from_secs(5), "test").unwrap();
        assert_eq!((hs.session, hs.hello.nonce, hs.requests_sent), (0xAB, 77, 0));
        let p = host.ping(Duration::from_secs(5), 1234).unwrap();
        assert_eq!(p.agent_time_ns, 2, "the stale-session PONG must be dropped");
        assert_eq!(host.stats().0.stale_frames, 1);
    }

    #[test]
    fn a_silent_agent_gets_hello_requests_then_the_handshake_completes() {
        let mut host = agent(|g| {
            let r = g.recv(Instant::now() + Duration::from_secs(5), "request").unwrap();
            assert!(matches!(r.message, Ok(Message::HelloRequest)));
            send_in(g, 5, &hello(1));
            let _ = g.recv(Instant::now() + Duration::from_secs(5), "ack");
        });
        let hs = host.handshake(Duration::from_secs(5), "test").unwrap();
        assert_eq!(hs.requests_sent, 1);
    }

    #[test]
    fn no_hello_is_a_timeout_naming_what_was_awaited_and_close_is_closed() {
        let (host_end, guest_end) = UnixStream::pair().unwrap();
        let mut host = Link::new("org.vport.quiet", host_end);
        let err = host.handshake(Duration::from_millis(1500), "test").unwrap_err();
        assert!(err.to_string().contains("HELLO from vport-agent"), "{err}");
        drop(guest_end);
        let err = host.recv(Instant::now() + Duration::from_secs(5), "anything").unwrap_err();
        assert!(matches!(err, LinkError::Closed { .. }), "{err}");
    }

    #[test]
    fn agent_error_fails_the_request() {
        let mut host = agent(|g| {
            let _ = g.recv(Instant::now() + Duration::from_secs(5), "echo").unwrap();
            send_in(g, 0, &Message::Error { code: 4, text: "not ready".into() });
        });
        let err = host.echo(b"x", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, LinkError::Agent { code: 4, .. }), "{err}");
    }
}
