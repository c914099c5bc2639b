//! The session life cycle, over the pure [`vport_common::PortMachine`]: host presence as
//! `poll(2)` reports it, the offer (HELLO), a new client's HELLO_REQUEST, the handshake
//! (HELLO_ACK), frames of other sessions (stale), and the session's end (host gone, port
//! closed, BYE at shutdown). Every transition is recorded in the life-cycle ring and logged;
//! every refused event is counted (`illegal_transitions`) and logged.

use super::{Env, Port, PortIo};
use nix::poll::PollFlags;
use vport_common::message::error_code;
use vport_common::{Header, Message, MessageType, PortEvent, PortState};

impl<I: PortIo> Port<I> {
    /// The port is being closed (unplug, agent exit): the session ends.
    pub fn close(&mut self, env: &mut impl Env, cause: &'static str) {
        if self.machine.state() != PortState::Disconnected {
            let _ = self.step(PortEvent::Closed, cause, env);
        }
        self.end_session_buffers();
    }

    /// Whether `session` is the port's READY session (guest-op handles live as long as it).
    pub fn session_is_ready(&self, session: u32) -> bool {
        matches!(self.machine.state(), PortState::Ready { session: s, .. } if s == session)
    }

    /// Queues BYE in the live session, if any (agent shutdown). Returns whether one was queued.
    pub fn say_bye(&mut self, reopen_after_ms: u32, reason: &str) -> bool {
        match self.machine.state().session() {
            Some(session) => self.send(&Message::Bye { reopen_after_ms, reason: reason.to_owned() }, session),
            None => false,
        }
    }

    /// Reconciles the state machine with host presence as `poll` reports it.
    pub(super) fn apply_mask(&mut self, mask: PollFlags, env: &mut impl Env) {
        // POLLHUP alone is what an unplugged port reports: leave that verdict to read/write
        // (ENODEV), so the history says "closed: unplugged" rather than "host disconnected".
        if mask.contains(PollFlags::POLLHUP) && !mask.intersects(PollFlags::POLLIN | PollFlags::POLLOUT) {
            return;
        }
        let host = !mask.contains(PollFlags::POLLHUP);
        match (self.machine.state(), host) {
            (PortState::Disconnected, true) => self.start_session(false, env),
            (PortState::Connected { .. } | PortState::Ready { .. }, false) => self.host_gone(env, "poll: POLLHUP"),
            // Presence unchanged.
            (PortState::Disconnected, false) | (PortState::Connected { .. } | PortState::Ready { .. }, true) => {}
        }
    }

    /// Applies `event` to the state machine, recording and logging the transition, or counting
    /// and logging the refusal.
    fn step(&mut self, event: PortEvent, cause: &'static str, env: &mut impl Env) -> Result<(), ()> {
        let now = env.now_ns();
        match self.machine.step(event, now) {
            Ok(t) => {
                let (wakeups, cpu_ns) = (env.wakeups(), env.cpu_ns());
                self.history.push(t, event, cause, wakeups, cpu_ns);
                let session = t.to.session().or(t.from.session()).unwrap_or(0);
                log::info!(
                    "port {}: {} -> {} session={session:#010x} ({cause})",
                    self.name,
                    t.from.name(),
                    t.to.name()
                );
                Ok(())
            }
            Err(e) => {
                self.counters.illegal_transitions += 1;
                log::warn!("port {}: illegal {event:?} in {}: {e} ({cause})", self.name, self.machine.state().name());
                Err(())
            }
        }
    }

    /// Host attached (`new_session == false`) or HELLO_REQUEST: new session id and nonce, HELLO.
    fn start_session(&mut self, new_session: bool, env: &mut impl Env) {
        let old = self.machine.state().session().unwrap_or(0);
        let session = loop {
            let s = env.random_u64() as u32;
            if s != 0 && s != old {
                break s;
            }
        };
        let nonce = env.random_u64();
        let (event, cause) = if new_session {
            (PortEvent::NewSession { session, nonce }, "hello request")
        } else {
            (PortEvent::HostConnected { session, nonce }, "poll: POLLHUP clear")
        };
        if self.step(event, cause, env).is_err() {
            return;
        }
        if new_session {
            // The old session's work ends here: its streams stop and its unsent output goes
            // (a frame already on its way is finished, never torn). Its guest-op handles are
            // closed by the event loop, which sees the session is no longer READY.
            self.abort_streams();
            let dropped = self.out.drop_unstarted();
            if dropped > 0 {
                self.counters.dropped_bytes += dropped as u64;
                log::info!("port {}: dropped {dropped} unsent bytes of session {old:#010x}", self.name);
            }
        }
        self.skipped_seen = self.decoder.stats().skipped_bytes;
        self.seq = 0;
        self.counters.sessions += 1;
        self.send_hello(session, nonce, env);
    }

    /// Offers session `session` with `nonce` (again, when repeating an unanswered offer).
    fn send_hello(&mut self, session: u32, nonce: u64, env: &mut impl Env) {
        let hello = Message::Hello(vport_common::message::Hello {
            agent_version: self.info.agent_version.clone(),
            port_name: self.name.clone(),
            kernel_release: self.info.kernel_release.clone(),
            boot_id: self.info.boot_id.clone(),
            nonce,
            agent_time_ns: env.now_ns(),
        });
        self.send(&hello, session);
    }

    /// No host: the session (if any) ends, and what it buffered goes with it.
    ///
    /// Without a session nothing is dropped: bytes read since the last session ended belong
    /// to the next client. The guest learns of a connection on the control queue, which a
    /// kernel worker serves after the data interrupt already delivered the client's first
    /// bytes, so a new client's HELLO_REQUEST and requests can be read while `read()` still
    /// says "no host" (`read() == 0` once they are taken). They are handled when the poll
    /// shows the host; bytes an old client left are cut by that HELLO_REQUEST or answered as
    /// stale (`vport_common::decoder`, "Torn frames").
    pub(super) fn host_gone(&mut self, env: &mut impl Env, cause: &'static str) {
        if self.machine.state() != PortState::Disconnected {
            let _ = self.step(PortEvent::HostDisconnected, cause, env);
            self.end_session_buffers();
        }
    }

    /// The session ended: its streams stop, and its buffered input and unsent output go.
    fn end_session_buffers(&mut self) {
        self.abort_streams();
        self.decoder.clear();
        let dropped = self.out.clear();
        if dropped > 0 {
            self.counters.dropped_bytes += dropped as u64;
            log::info!("port {}: dropped {dropped} unsent bytes of the ended session", self.name);
        }
    }

    /// True if `h` carries the READY session's id; otherwise answers BAD_STATE, saying what
    /// is missing, and returns false. (Frames of a foreign non-zero session never get here.)
    pub(super) fn require_ready(&mut self, h: &Header, kind: MessageType) -> bool {
        let text = match self.machine.state() {
            PortState::Ready { session, .. } if session == h.session => return true,
            PortState::Ready { session, .. } => format!(
                "{kind:?} needs the READY session's id in its header: it carries {:#010x}, the session is \
                 {session:#010x}",
                h.session
            ),
            state => format!(
                "{kind:?} needs a READY session: the port is {} (send HELLO_ACK with the HELLO's nonce first)",
                state.name()
            ),
        };
        self.reply_error(h, h.session, error_code::BAD_STATE, text);
        false
    }

    /// True (answered, counted and logged) if `h` is a frame of a session that is neither 0
    /// nor the `current` one; a HELLO_REQUEST is never stale: it asks for a new session.
    pub(super) fn drop_stale(&mut self, h: &Header, current: u32) -> bool {
        if h.session == 0 || h.session == current || h.kind == MessageType::HelloRequest as u8 {
            return false;
        }
        self.counters.stale_frames += 1;
        log::debug!(
            "port {}: stale frame type {:#04x} of session {:#010x} (current {current:#010x}) dropped",
            self.name,
            h.kind,
            h.session
        );
        // Answered outside any session (0), which every host accepts: a host still in an
        // ended session learns it has ended, and a host that used a wrong id sees the answer.
        let text = format!("session {:#010x} is not the current session {current:#010x}", h.session);
        self.reply_error(h, 0, error_code::BAD_SESSION, text);
        true
    }

    /// HELLO_REQUEST in `state` (the state when the frame was taken). A request for a session
    /// already offered and not yet acknowledged repeats the offer: requests the host queued
    /// while the guest was booting must not multiply sessions. Otherwise a new session starts.
    pub(super) fn on_hello_request(&mut self, state: PortState, env: &mut impl Env) {
        match state {
            PortState::Connected { session, nonce } => {
                log::debug!("port {}: hello request while the offer is pending: repeating HELLO", self.name);
                self.counters.hello_repeats += 1;
                self.send_hello(session, nonce, env);
            }
            PortState::Ready { .. } | PortState::Disconnected => {
                log::info!("port {}: host requested a new session", self.name);
                self.start_session(true, env);
            }
        }
    }

    /// HELLO_ACK carrying `got` and `host_version` in header `h`, while session `current` with
    /// `nonce` is offered or live: READY, or an ERROR saying why not (BAD_SESSION outside any session for another
    /// session's id or nonce, BAD_STATE for a session already READY).
    pub(super) fn on_hello_ack(
        &mut self,
        h: &Header,
        current: u32,
        nonce: u64,
        got: u64,
        host_version: &str,
        env: &mut impl Env,
    ) {
        if h.session != current {
            let text = format!("hello ack for session {:#010x}, current is {current:#010x}", h.session);
            return self.reply_error(h, 0, error_code::BAD_SESSION, text);
        }
        let mismatch = got != nonce;
        if self.step(PortEvent::HelloAcked { nonce: got }, "hello ack", env).is_err() {
            let (code, text) = if mismatch {
                (error_code::BAD_SESSION, format!("hello ack nonce {got:#x} is not the session's"))
            } else {
                (error_code::BAD_STATE, "session already ready".to_owned())
            };
            let session = if code == error_code::BAD_SESSION { 0 } else { current };
            return self.reply_error(h, session, code, text);
        }
        log::info!("port {} READY session={current:#010x} host={host_version}", self.name);
    }
}
