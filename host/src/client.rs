//! [`AgentClient`]: the one request/reply path between the host and `vport-agent`.
//!
//! Every typed request the host makes (PING, ECHO, PROBE, GUEST_OP, SIGIO, STATS, EVENTS,
//! SOURCE, SINK) is written once, here, as a provided method over four primitives: send a
//! request, wait for its reply, start a guest op, ask where a guest op stands. Two types carry
//! them:
//!
//! - [`crate::session::Session`], the normal way: one guest session, whose end (BYE, the guest
//!   closing the port, QMP's `STOP`, `DEVICE_DELETED`, `RESET`, the VM exiting) is seen while a
//!   request waits and fails it with [`crate::session::SessionError::Ended`], never a write
//!   into the next session;
//! - [`Link`], the bare framed link, for the end-to-end tests of the agent's protocol (a
//!   handshake made by hand, a request sent before the guest opens the port, raw bytes).
//!
//! Each request waits until its deadline for the reply that answers it; an agent ERROR that
//! names the request (`about_kind`, `about_seq`) fails it with the implementor's agent error,
//! ERRORs about other frames are kept as reports (see [`crate::link::Replies`]).

use crate::chardev::Stream;
use crate::link::{EventsOutcome, Link, LinkError, PingSample, ProbeOutcome, SigioOutcome, SinkOutcome, SourceOutcome};
use std::time::{Duration, Instant};
use vport_common::frame::DEFAULT_MAX_PAYLOAD;
use vport_common::message::{GuestOp, GuestOpDone, MessageType, ProbeKind, ProbeTarget, SigioAction, NO_MISMATCH};
use vport_common::pattern::{self, StreamDigest};
use vport_common::Message;

/// Where a guest op stands ([`AgentClient::guest_op_progress`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestOpProgress {
    /// It completed (the completion is taken).
    Done(GuestOpDone),
    /// Not completed yet; its GUEST_OP was sent with sequence number `seq` (`u32::MAX`: no
    /// such op is pending).
    Pending {
        /// The request's sequence number, which a refusal names.
        seq: u32,
    },
}

/// A conversation with one agent: the primitives, and the typed requests built on them.
pub trait AgentClient {
    /// What a request fails with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Sends `msg` in the current session; returns the sequence number it was sent with (an
    /// agent ERROR answering it names it).
    fn send_request(&mut self, msg: &Message) -> Result<u32, Self::Error>;

    /// Waits until `deadline` for the reply to `request` (its type and sequence number) that
    /// `pick` accepts; `what` names it in errors and logs.
    fn await_reply<T>(
        &mut self,
        deadline: Instant,
        what: &str,
        request: (MessageType, u32),
        pick: &mut dyn FnMut(&Message) -> Option<T>,
    ) -> Result<(T, Instant), Self::Error>;

    /// GUEST_OP: starts `op` in the guest and returns its op_id; the completion is collected
    /// with [`AgentClient::await_guest_op`] (other requests may be made meanwhile).
    fn start_guest_op(&mut self, op: GuestOp) -> Result<u32, Self::Error>;

    /// Where guest op `op_id` stands: its completion if it came while something else was
    /// awaited (taken), the agent's refusal as the error, or still pending.
    fn guest_op_progress(&mut self, op_id: u32) -> Result<GuestOpProgress, Self::Error>;

    /// Waits up to `timeout` for the completion of guest op `op_id`. A timeout leaves the op
    /// pending (ask again); an op the agent refused is the agent error.
    fn await_guest_op(&mut self, op_id: u32, timeout: Duration) -> Result<GuestOpDone, Self::Error> {
        let deadline = Instant::now() + timeout;
        let seq = match self.guest_op_progress(op_id)? {
            GuestOpProgress::Done(d) => return Ok(d),
            GuestOpProgress::Pending { seq } => seq,
        };
        let (d, _) = self.await_reply(deadline, "GUEST_OP_DONE", (MessageType::GuestOp, seq), &mut |m| match m {
            Message::GuestOpDone(d) if d.op_id == op_id => Some(d.clone()),
            _ => None,
        })?;
        Ok(d)
    }

    /// Sends `msg` in the current session, expecting no reply.
    fn send(&mut self, msg: &Message) -> Result<(), Self::Error> {
        self.send_request(msg).map(|_| ())
    }

    /// Sends `msg` and waits up to `timeout` for the reply `pick` accepts; returns it with its
    /// arrival time.
    fn request<T>(
        &mut self,
        msg: &Message,
        timeout: Duration,
        what: &str,
        mut pick: impl FnMut(&Message) -> Option<T>,
    ) -> Result<(T, Instant), Self::Error> {
        let deadline = Instant::now() + timeout;
        let seq = self.send_request(msg)?;
        self.await_reply(deadline, what, (msg.kind(), seq), &mut pick)
    }

    /// One PING/PONG round trip; `now_ns` is the host's clock sent in the PING.
    fn ping(&mut self, timeout: Duration, now_ns: u64) -> Result<PingSample, Self::Error> {
        let sent = Instant::now();
        let (agent_time_ns, at) = self.request(&Message::Ping { time_ns: now_ns }, timeout, "PONG", |m| match m {
            Message::Pong { ping_time_ns, time_ns } if *ping_time_ns == now_ns => Some(*time_ns),
            _ => None,
        })?;
        Ok(PingSample { rtt: at - sent, agent_time_ns, sent })
    }

    /// Sends `data` in an ECHO and returns what came back.
    fn echo(&mut self, data: &[u8], timeout: Duration) -> Result<Vec<u8>, Self::Error> {
        let (bytes, _) = self.request(&Message::Echo(data.to_vec()), timeout, "ECHO_REPLY", |m| match m {
            Message::EchoReply(b) => Some(b.clone()),
            _ => None,
        })?;
        Ok(bytes)
    }

    /// PROBE: one system call on the agent's fd or a second fd; the raw result.
    fn probe(
        &mut self,
        kind: ProbeKind,
        target: ProbeTarget,
        arg: u32,
        timeout: Duration,
    ) -> Result<ProbeOutcome, Self::Error> {
        let (out, _) = self.request(&Message::Probe { kind, target, arg }, timeout, "PROBE_RESULT", |m| match m {
            Message::ProbeResult { kind: k, target: t, ret, errno, mask, data } if *k == kind && *t == target => {
                Some(ProbeOutcome { ret: *ret, errno: *errno, mask: *mask, data: data.clone() })
            }
            _ => None,
        })?;
        Ok(out)
    }

    /// Runs guest op `op` and waits up to `timeout` for its completion.
    fn guest_op(&mut self, op: GuestOp, timeout: Duration) -> Result<GuestOpDone, Self::Error> {
        let id = self.start_guest_op(op)?;
        self.await_guest_op(id, timeout)
    }

    /// SIGIO: enable (reset and count), disable or query SIGIO observation.
    fn sigio(&mut self, action: SigioAction, timeout: Duration) -> Result<SigioOutcome, Self::Error> {
        let (out, _) = self.request(&Message::Sigio { action }, timeout, "SIGIO_REPORT", |m| match m {
            Message::SigioReport { enabled, count, samples } => {
                Some(SigioOutcome { enabled: *enabled, count: *count, samples: samples.clone() })
            }
            _ => None,
        })?;
        Ok(out)
    }

    /// STATS: the agent's counters as name/value pairs (look names up with
    /// [`crate::link::stat`]).
    fn agent_stats(&mut self, timeout: Duration) -> Result<Vec<(String, u64)>, Self::Error> {
        let (pairs, _) = self.request(&Message::Stats, timeout, "STATS_REPLY", |m| match m {
            Message::StatsReply(p) => Some(p.clone()),
            _ => None,
        })?;
        Ok(pairs)
    }

    /// EVENTS: the port's life-cycle records with `seq >= since_seq`.
    fn events(&mut self, since_seq: u64, timeout: Duration) -> Result<EventsOutcome, Self::Error> {
        let (out, _) = self.request(&Message::Events { since_seq }, timeout, "EVENTS_REPLY", |m| match m {
            Message::EventsReply { first_seq, next_seq, records } => {
                Some(EventsOutcome { first_seq: *first_seq, next_seq: *next_seq, records: records.clone() })
            }
            _ => None,
        })?;
        Ok(out)
    }

    /// SOURCE: the agent streams `bytes` bytes of the pattern of `seed` in DATA frames of at
    /// most `chunk` bytes; each is checked against the pattern here. `timeout` bounds the wait
    /// for each frame (not the whole stream).
    fn source(&mut self, seed: u64, bytes: u64, chunk: u32, timeout: Duration) -> Result<SourceOutcome, Self::Error> {
        let started = Instant::now();
        let seq = self.send_request(&Message::Source { seed, bytes, chunk })?;
        let request = (MessageType::Source, seq);
        let mut digest = StreamDigest::new();
        let mut first_mismatch = None;
        let mut frames = 0;
        loop {
            let (m, _) =
                self.await_reply(Instant::now() + timeout, "DATA or SOURCE_DONE", request, &mut |m| match m {
                    Message::Data { .. } | Message::SourceDone { .. } => Some(m.clone()),
                    _ => None,
                })?;
            match m {
                Message::Data { offset, bytes: data } => {
                    frames += 1;
                    let expected = digest.bytes();
                    if first_mismatch.is_none() {
                        first_mismatch = if offset != expected {
                            Some(expected)
                        } else {
                            pattern::first_mismatch(seed, offset, &data)
                        };
                    }
                    digest.update(&data);
                }
                Message::SourceDone { bytes: agent_bytes, digest: agent_digest } => {
                    let got = digest.bytes();
                    if first_mismatch.is_none() && got < bytes {
                        first_mismatch = Some(got);
                    }
                    let verified = first_mismatch.is_none()
                        && got == bytes
                        && agent_bytes == bytes
                        && agent_digest == digest.digest();
                    return Ok(SourceOutcome {
                        bytes: got,
                        digest: agent_digest,
                        verified,
                        first_mismatch,
                        frames,
                        elapsed: started.elapsed(),
                    });
                }
                _ => {}
            }
        }
    }

    /// SINK: sends `bytes` bytes of the pattern of `seed` in DATA frames of `chunk` bytes
    /// (capped by the payload limit) and returns the agent's verdict.
    fn sink(&mut self, seed: u64, bytes: u64, chunk: u32, timeout: Duration) -> Result<SinkOutcome, Self::Error> {
        let started = Instant::now();
        let seq = self.send_request(&Message::Sink { seed, bytes })?;
        let request = (MessageType::Sink, seq);
        let chunk = (chunk as u64).clamp(1, u64::from(DEFAULT_MAX_PAYLOAD) - 8);
        let mut offset = 0;
        while offset < bytes {
            let n = (bytes - offset).min(chunk) as usize;
            let mut data = vec![0u8; n];
            pattern::fill(seed, offset, &mut data);
            self.send(&Message::Data { offset, bytes: data })?;
            offset += n as u64;
        }
        let ((got, digest, mismatch), _) =
            self.await_reply(Instant::now() + timeout, "SINK_RESULT", request, &mut |m| match m {
                Message::SinkResult { bytes, digest, first_mismatch } => Some((*bytes, *digest, *first_mismatch)),
                _ => None,
            })?;
        let first_mismatch = (mismatch != NO_MISMATCH).then_some(mismatch);
        let verified = first_mismatch.is_none() && got == bytes && digest == pattern::pattern_digest(seed, bytes);
        Ok(SinkOutcome { bytes: got, digest, first_mismatch, verified, elapsed: started.elapsed() })
    }
}

/// The bare link: requests go straight to the connection; nothing watches the session's end
/// (a BYE read while waiting is skipped like any other frame).
impl<S: Stream> AgentClient for Link<S> {
    type Error = LinkError;

    fn send_request(&mut self, msg: &Message) -> Result<u32, LinkError> {
        Link::send_request(self, msg)
    }

    fn await_reply<T>(
        &mut self,
        deadline: Instant,
        what: &str,
        request: (MessageType, u32),
        pick: &mut dyn FnMut(&Message) -> Option<T>,
    ) -> Result<(T, Instant), LinkError> {
        Link::await_reply(self, deadline, what, request, pick)
    }

    fn start_guest_op(&mut self, op: GuestOp) -> Result<u32, LinkError> {
        Link::start_guest_op(self, op)
    }

    fn guest_op_progress(&mut self, op_id: u32) -> Result<GuestOpProgress, LinkError> {
        let replies = self.replies_mut();
        match replies.finished_guest_op(op_id) {
            Some(done) => done.map(GuestOpProgress::Done),
            None => Ok(GuestOpProgress::Pending { seq: replies.guest_op_seq(op_id) }),
        }
    }

    fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        Link::send(self, msg)
    }
}
