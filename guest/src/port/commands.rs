//! Commands: one frame received in a live session, dispatched by type (`Port::handle_frame`).
//!
//! Every command needs a READY session and carries its id (else ERROR bad-state, saying what
//! is missing); replies carry the request's header session. The handshake frames go to
//! `session.rs`, the stream frames to `streams.rs`; here are PING, ECHO, CLOSE/REOPEN, PROBE,
//! SIGIO, STATS, EVENTS and the GUEST_OP hand-off to the event loop ([`crate::guest_ops`] runs
//! them; [`Port::take_guest_ops`], [`Port::send_guest_op_done`], [`Port::refuse_guest_op`]).
//! Frames only the agent sends are refused as sent the wrong way.

use super::acked::OpenRequest;
use super::counters::{event_records, stats_listing};
use super::{Env, GuestOpRequest, Port, PortIo, SigioState, MAX_EVENT_RECORDS, MAX_PROBE_READ, MAX_SIGIO_SAMPLES};
use vport_common::message::{
    error_code, BulkRef, GuestOp, GuestOpDone, ProbeKind, ProbeTarget, SigioAction, SigioSample, NO_REOPEN,
};
use vport_common::stream::SenderInput;
use vport_common::{Frame, Header, Message, MessageError, MessageType, PortState};

impl<I: PortIo> Port<I> {
    /// Handles one frame received while a session is live. Replies carry the request's
    /// header session.
    pub(super) fn handle_frame(&mut self, frame: Frame, env: &mut impl Env) {
        self.counters.frames_in += 1;
        let state = self.machine.state();
        let (current, nonce) = match state {
            PortState::Connected { session, nonce } | PortState::Ready { session, nonce } => (session, nonce),
            PortState::Disconnected => return,
        };
        let h = frame.header;
        if self.drop_stale(&h, current) {
            return;
        }
        // The bulk frames (DATA, STREAM_DATA) are read in place: their bytes are checked or
        // stored, never kept, so they are not copied out of the frame.
        match BulkRef::from_frame(&frame) {
            Ok(Some(bulk)) => return self.on_bulk(&h, bulk),
            Ok(None) => {}
            Err(e) => {
                log::debug!("port {}: malformed frame: {e}", self.name);
                return self.reply_error(&h, h.session, error_code::MALFORMED, e.to_string());
            }
        }
        let msg = match Message::from_frame(&frame) {
            Ok(m) => m,
            Err(e @ MessageError::UnknownType(_)) => {
                return self.reply_error(&h, h.session, error_code::UNKNOWN_TYPE, e.to_string())
            }
            Err(e) => {
                log::debug!("port {}: malformed frame: {e}", self.name);
                return self.reply_error(&h, h.session, error_code::MALFORMED, e.to_string());
            }
        };
        match msg {
            Message::HelloRequest => self.on_hello_request(state, env),
            Message::HelloAck { nonce: got, host_version } => {
                self.on_hello_ack(&h, current, nonce, got, &host_version, env)
            }
            Message::Ping { time_ns } => {
                let pong = Message::Pong { ping_time_ns: time_ns, time_ns: env.now_ns() };
                self.send(&pong, h.session);
            }
            Message::Echo(bytes) => {
                if self.require_ready(&h, MessageType::Echo) {
                    self.send(&Message::EchoReply(bytes), h.session);
                }
            }
            Message::Error { code, text, .. } => {
                self.counters.errors_received += 1;
                log::warn!("port {}: host reported error {code}: {text}", self.name);
            }
            Message::Pong { .. } => log::debug!("port {}: unsolicited pong ignored", self.name),
            Message::Close { reopen_after_ms } => {
                if self.require_ready(&h, MessageType::Close) {
                    self.on_close(&h, reopen_after_ms, "close requested");
                }
            }
            Message::Reopen => {
                if self.require_ready(&h, MessageType::Reopen) {
                    self.on_close(&h, 0, "reopen requested");
                }
            }
            Message::Probe { kind, target, arg } => {
                if self.require_ready(&h, MessageType::Probe) {
                    self.on_probe(&h, kind, target, arg);
                }
            }
            Message::Sigio { action } => {
                if self.require_ready(&h, MessageType::Sigio) {
                    self.on_sigio_request(&h, action);
                }
            }
            Message::Source { seed, bytes, chunk } => {
                if self.require_ready(&h, MessageType::Source) {
                    self.on_source(&h, seed, bytes, chunk);
                }
            }
            Message::Sink { seed, bytes } => {
                if self.require_ready(&h, MessageType::Sink) {
                    self.on_sink(&h, seed, bytes);
                }
            }
            Message::Stats => {
                if self.require_ready(&h, MessageType::Stats) {
                    let stats = self.stats(env);
                    self.send(&Message::StatsReply(stats), h.session);
                }
            }
            Message::Events { since_seq } => {
                if self.require_ready(&h, MessageType::Events) {
                    let reply = Message::EventsReply {
                        first_seq: self.history.first_seq(),
                        next_seq: self.history.next_seq(),
                        records: event_records(&self.history, since_seq, MAX_EVENT_RECORDS),
                    };
                    self.send(&reply, h.session);
                }
            }
            Message::StreamOpen { id, direction, name, seed, total, offset, window } => {
                if self.require_ready(&h, MessageType::StreamOpen) {
                    let req = OpenRequest { id, direction, name, seed, total, offset, window };
                    self.on_stream_open(&h, req);
                }
            }
            Message::StreamEnd { id, total, digest } => {
                if self.require_ready(&h, MessageType::StreamEnd) {
                    self.on_stream_end(&h, id, total, digest);
                }
            }
            Message::StreamAck { id, offset } => {
                if self.require_ready(&h, MessageType::StreamAck) {
                    self.on_stream_feedback(&h, id, SenderInput::Ack { offset });
                }
            }
            Message::StreamDone { id, ok, .. } => {
                if self.require_ready(&h, MessageType::StreamDone) {
                    self.on_stream_feedback(&h, id, SenderInput::Done { ok });
                }
            }
            Message::GuestOp { op_id, op } => self.on_guest_op(&h, op_id, op),
            Message::Hello(_)
            | Message::StreamAccept { .. }
            | Message::GuestOpDone(_)
            | Message::EchoReply(_)
            | Message::Bye { .. }
            | Message::ProbeResult { .. }
            | Message::SigioReport { .. }
            | Message::SourceDone { .. }
            | Message::SinkResult { .. }
            | Message::StatsReply(_)
            | Message::EventsReply { .. } => {
                let text = format!("{:?} is sent by the agent, never to it", msg.kind());
                self.reply_error(&h, h.session, error_code::WRONG_DIRECTION, text);
            }
            // Read in place above; served the same way should one come here.
            Message::Data { offset, bytes } => self.on_bulk(&h, BulkRef::Data { offset, bytes: &bytes }),
            Message::StreamData { id, offset, bytes } => {
                self.on_bulk(&h, BulkRef::StreamData { id, offset, bytes: &bytes })
            }
        }
    }

    /// DATA for the running SINK, STREAM_DATA for the open to-guest stream.
    fn on_bulk(&mut self, h: &Header, bulk: BulkRef<'_>) {
        match bulk {
            BulkRef::Data { offset, bytes } => {
                if self.require_ready(h, MessageType::Data) {
                    self.on_data(h, offset, bytes);
                }
            }
            BulkRef::StreamData { id, offset, bytes } => {
                if self.require_ready(h, MessageType::StreamData) {
                    self.on_stream_data(h, id, offset, bytes);
                }
            }
        }
    }

    /// Counters as STATS name/value pairs. Per port: `bytes_in`, `bytes_out`, `frames_in`,
    /// `frames_out`, `decode_errors`, `skipped_bytes` (decoder bytes outside valid frames),
    /// `stale_frames`, `sessions`, `hello_repeats`, `illegal_transitions`, `errors_sent`,
    /// `errors_received`, `dropped_bytes`, `short_writes`, `queue_overflows`, `ebusy` (EBUSY met
    /// opening this port), `opens`, `closes`, `stream_aborts`, `bye_flush_timeouts`,
    /// `sigio_signals`, `torn_frames`, `decode_reports`, `decode_reports_held_back`,
    /// `refusals` (ERROR limit or denied), `after_bye_dropped` (late replies not sent after a
    /// BYE), `queued` (bytes waiting now). Agent-wide
    /// ([`Env::agent_stats`]): `wakeups`, `ebusy_total`, `rss_kib`, `open_fds`, `uptime_ns`, `cpu_ns`,
    /// `ports_open`, `pid`, `sigio_overflows`, `missed_wakeups`, `euid`, `egid`,
    /// `guest_ops_allowed`. Counters survive a close/reopen and an unplug/replug of the same
    /// name (`queued` is the present).
    pub fn stats(&self, env: &mut impl Env) -> Vec<(String, u64)> {
        let mut v = stats_listing(&self.counters, self.decoder.stats(), self.out.len());
        v.extend(env.agent_stats().into_iter().map(|(k, v)| (k.to_owned(), v)));
        v
    }

    /// CLOSE/REOPEN: BYE, then the loop closes the port (see [`Port::close_request`]). A
    /// running stream stops here (nothing is added after the BYE); a delay over the limit is
    /// refused (ERROR limit), so no host can keep the port closed for long.
    fn on_close(&mut self, h: &Header, reopen_after_ms: u32, reason: &'static str) {
        let max = self.settings.limits.max_reopen_delay_ms;
        if reopen_after_ms > max {
            self.counters.refusals += 1;
            let text = format!(
                "a reopen delay of {reopen_after_ms} ms exceeds the agent's limit of {max} ms (a host may not keep \
                 the port closed longer)"
            );
            return self.reply_error(h, h.session, error_code::LIMIT, text);
        }
        self.abort_streams();
        log::info!(
            "port {}: {reason}: closing, reopen after {}",
            self.name,
            if reopen_after_ms == NO_REOPEN { "never".to_owned() } else { format!("{reopen_after_ms} ms") }
        );
        self.send(&Message::Bye { reopen_after_ms, reason: reason.to_owned() }, h.session);
        self.close_request = Some(reopen_after_ms);
        self.close_cause = reason;
    }

    /// SIGIO: starts (counting from 0), stops or only reports the observation of SIGIO on the
    /// port's fd ([`PortIo::set_async`]); answers SIGIO_REPORT, or ERROR internal if `fcntl`
    /// failed.
    fn on_sigio_request(&mut self, h: &Header, action: SigioAction) {
        let result = match action {
            SigioAction::Query => Ok(()),
            SigioAction::Enable => self.io.set_async(true).map(|()| {
                self.sigio = SigioState { enabled: true, count: 0, samples: Vec::new() };
            }),
            SigioAction::Disable => self.io.set_async(false).map(|()| self.sigio.enabled = false),
        };
        if let Err(e) = result {
            log::warn!("port {}: SIGIO {action:?} failed: {e}", self.name);
            return self.reply_error(
                h,
                h.session,
                error_code::INTERNAL,
                format!("sigio {action:?}: fcntl failed: {e}"),
            );
        }
        let s = &self.sigio;
        log::debug!("port {}: SIGIO {action:?}: enabled={} count={}", self.name, s.enabled, s.count);
        let report = Message::SigioReport { enabled: s.enabled, count: s.count, samples: s.samples.clone() };
        self.send(&report, h.session);
    }

    /// PROBE: one system call through [`PortIo::probe`] (a read takes at most
    /// [`MAX_PROBE_READ`] bytes, counted in `bytes_in`); its raw result is the answer.
    fn on_probe(&mut self, h: &Header, kind: ProbeKind, target: ProbeTarget, arg: u32) {
        let out = self.io.probe(kind, target, arg.min(MAX_PROBE_READ as u32));
        if kind == ProbeKind::Read && target == ProbeTarget::OwnFd {
            self.counters.bytes_in += out.data.len() as u64;
        }
        log::debug!("port {}: probe {kind:?} on {target:?}: ret {} errno {}", self.name, out.ret, out.errno);
        let reply =
            Message::ProbeResult { kind, target, ret: out.ret, errno: out.errno, mask: out.mask, data: out.data };
        self.send(&reply, h.session);
    }

    /// One SIGIO for this port's fd arrived: counted, and its poll mask sampled, while
    /// observation is enabled.
    pub fn on_sigio(&mut self, env: &mut impl Env) {
        if !self.sigio.enabled {
            return;
        }
        self.sigio.count += 1;
        self.counters.sigio_signals += 1;
        if self.sigio.samples.len() < MAX_SIGIO_SAMPLES {
            let mask = self.io.poll_mask().map(|m| m.bits() as u16).unwrap_or(0);
            self.sigio.samples.push(SigioSample { time_ns: env.now_ns(), mask });
        }
    }

    /// GUEST_OP: refused (ERROR denied, nothing opened) unless the agent serves guest
    /// operations; in a READY session, kept for the event loop ([`Port::take_guest_ops`]).
    fn on_guest_op(&mut self, h: &Header, op_id: u32, op: GuestOp) {
        if !self.settings.allow_guest_ops {
            self.counters.refusals += 1;
            let text = format!(
                "guest ops disabled: guest op {op_id} refused, nothing was opened (start vport-agent with \
                 --allow-guest-ops to serve them; see docs/security.md)"
            );
            return self.reply_error(h, h.session, error_code::DENIED, text);
        }
        if self.require_ready(h, MessageType::GuestOp) {
            log::debug!("port {}: guest op {op_id}: {op:?}", self.name);
            self.guest_ops.push(GuestOpRequest { session: h.session, seq: h.seq, op_id, op });
        }
    }

    /// The GUEST_OP requests accepted since the last call. The event loop runs them
    /// ([`crate::guest_ops`]) and answers with [`Port::send_guest_op_done`] or
    /// [`Port::refuse_guest_op`].
    pub fn take_guest_ops(&mut self) -> Vec<GuestOpRequest> {
        std::mem::take(&mut self.guest_ops)
    }

    /// Answers `request` with ERROR `code` (limit or denied) in its session, if that is still
    /// the READY session; returns whether it was queued.
    pub fn refuse_guest_op(&mut self, request: &GuestOpRequest, code: u16, text: String) -> bool {
        if !self.session_is_ready(request.session) {
            log::info!("port {}: refusal of guest op {} after its session ended; dropped", self.name, request.op_id);
            return false;
        }
        log::info!("port {}: guest op {} refused: {text}", self.name, request.op_id);
        self.counters.refusals += 1;
        let header = Header { kind: MessageType::GuestOp as u8, flags: 0, session: request.session, seq: request.seq };
        self.reply_error(&header, request.session, code, text);
        true
    }

    /// Queues GUEST_OP_DONE in `session` if that is still the READY session; returns whether
    /// it was queued (a completion for an ended session is dropped and logged).
    pub fn send_guest_op_done(&mut self, session: u32, done: GuestOpDone) -> bool {
        if !self.session_is_ready(session) {
            log::info!(
                "port {}: guest op {} finished after its session {session:#010x} ended; dropped",
                self.name,
                done.op_id
            );
            return false;
        }
        self.send(&Message::GuestOpDone(done), session)
    }
}
