//! The harness: the port, its fake, and the event loop's part (service again on `MoreWork`,
//! guest ops, closing after BYE, reopening), with the state and counter checks.

use super::fake::{FakeIo, FuzzEnv, Mode, ReadItem, Wire};
use super::output::{check_output, OpenView};
use super::{counter_list, open_port, WRITE_CAP};
use crate::input::Input;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use vport_agent::port::{Carry, Counters, GuestOpRequest, Health, Port, QUEUE_LIMIT};
use vport_agent::settings::Settings;
use vport_common::message::{error_code, GuestOpDone};
use vport_common::{Message, PortEvent, PortState};

/// Service calls one SERVICE step makes while the port answers `MoreWork`.
pub const MAX_MORE_WORK: usize = 32;

/// One second, in the fake clock's nanoseconds.
const SECOND: u64 = 1_000_000_000;

/// The harness: the port, its fake, and what the checks remember.
pub struct Harness {
    pub wire: Rc<RefCell<Wire>>,
    pub port: Port<FakeIo>,
    pub env: FuzzEnv,
    pub settings: Settings,
    /// Guest ops taken from the port and not answered yet.
    pub deferred: Vec<GuestOpRequest>,
    /// The counters after the previous step.
    pub prev: Counters,
    /// Counters when this open began (the decoder, and the rate limiter, are per open).
    pub frames_in_at_open: u64,
    pub errors_at_open: u64,
    pub torn_at_open: u64,
    pub reports_at_open: u64,
    pub overflows_at_open: u64,
    /// The decoders' skipped bytes of the earlier opens.
    pub skipped_before: u64,
    /// Sessions the port has been in (for the "previous session" selector and reply checks).
    pub sessions: Vec<u32>,
    /// Service steps since the port asked to be closed (CLOSE or REOPEN served).
    pub closing: u32,
    /// Clock readings of the NewSession transitions (HELLO_REQUEST in READY) seen in the ring,
    /// and the next ring record to look at.
    pub new_sessions: Vec<u64>,
    pub hist_next: u64,
    /// The clock when this open began.
    pub open_clock: u64,
    /// The script's clock jumps so far (ns), and the decode-report rate window: (jumps when it
    /// began, reports in it); the counter value last accounted.
    pub jumps: u64,
    pub window: Option<(u64, u64)>,
    pub reports_seen: u64,
}

impl Harness {
    /// Checks what this open of the port wrote (see [`check_output`]); `end`: the input ended.
    pub fn check_output(&self, end: bool) {
        let wire = self.wire.borrow();
        let view = OpenView {
            wire: &wire,
            queued: self.port.queued(),
            settings: &self.settings,
            new_sessions: &self.new_sessions,
            open_clock: self.open_clock,
            sessions: &self.sessions,
            decode_reports: self.port.counters().decode_reports,
            reports_at_open: self.reports_at_open,
        };
        check_output(&view, end);
    }

    pub fn new(env_seed: u8, settings: Settings) -> Self {
        let clock = Rc::new(Cell::new(0));
        let wire = Rc::new(RefCell::new(Wire::new(WRITE_CAP, Rc::clone(&clock))));
        let port = open_port(FakeIo { wire: Rc::clone(&wire) }, settings.clone(), Carry::default());
        let env = FuzzEnv { now: clock, rng: u64::from(env_seed), wakeups: 0 };
        let prev = port.counters();
        Harness {
            wire,
            port,
            env,
            settings,
            deferred: Vec::new(),
            prev,
            frames_in_at_open: 0,
            errors_at_open: 0,
            torn_at_open: 0,
            reports_at_open: 0,
            overflows_at_open: 0,
            skipped_before: 0,
            sessions: Vec::new(),
            closing: 0,
            new_sessions: Vec::new(),
            hist_next: 0,
            open_clock: 0,
            jumps: 0,
            window: None,
            reports_seen: 0,
        }
    }

    fn current_session(&self) -> u32 {
        self.port.state().session().unwrap_or(0)
    }

    /// The header session for a frame the script sends: 0, the current one, the previous one,
    /// or one from the input.
    pub fn session(&self, sel: u8, input: &mut Input) -> u32 {
        match sel % 4 {
            0 => 0,
            1 => self.current_session(),
            2 => {
                let cur = self.current_session();
                self.sessions.iter().rev().copied().find(|&s| s != cur).unwrap_or(0)
            }
            _ => input.u32(),
        }
    }

    /// Queues `bytes` as the result of the next read (nothing for no bytes: a read returning 0
    /// means "no host", which is a script op of its own).
    pub fn feed(&self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.wire.borrow_mut().reads.push_back(ReadItem::Data(bytes));
        }
    }

    pub fn feed_message(&self, m: &Message, session: u32, seq: u32) {
        // Requests built here are small: an encode failure is a finding in the encoder.
        let frame = m.to_frame(session, seq).expect("a request frames");
        self.feed(frame.encode().expect("a request encodes"));
    }

    /// Advances the fake clock by `ms` milliseconds.
    pub fn advance(&mut self, ms: u64) {
        let ns = ms * 1_000_000;
        self.jumps += ns;
        self.env.now.set(self.env.now.get() + ns);
    }

    /// One turn of the event loop for this port: `service` (again at once while it answers
    /// `MoreWork`, as the loop does), the guest ops it accepted, and the close it asked for.
    pub fn service(&mut self) {
        for _ in 0..MAX_MORE_WORK {
            let before = self.port.counters();
            let health = self.port.service(&mut self.env);
            if let Ok(Health::Open | Health::MoreWork) = health {
                let state = self.port.state();
                match self.wire.borrow().mode {
                    Mode::Host => assert!(state.session().is_some(), "a host is attached but the port is {state:?}"),
                    Mode::NoHost => assert_eq!(state, PortState::Disconnected, "no host is attached"),
                    Mode::Unplugged => {}
                }
            }
            let after = self.port.counters();
            if let Ok(Health::MoreWork) = health {
                assert!(
                    (after.bytes_in, after.bytes_out) != (before.bytes_in, before.bytes_out),
                    "service answered MoreWork but moved no byte: the event loop would spin [more-work-progress]"
                );
            }
            let budget = self.settings.limits.write_budget as u64;
            assert!(
                after.bytes_out - before.bytes_out <= budget,
                "one service call wrote {} bytes, over the write budget of {budget} [write-budget]",
                after.bytes_out - before.bytes_out
            );
            self.note_session();
            // Answers queued for guest ops are written by the next turn, as in the loop.
            let answered = self.run_guest_ops();
            if !self.after_service(health) && !answered {
                return;
            }
        }
    }

    /// The event loop's part after one `service` call; returns whether to call `service` again
    /// at once (`MoreWork` on a port that stays open).
    fn after_service(&mut self, health: Result<Health, vport_agent::port::PortError>) -> bool {
        match health {
            Ok(h @ (Health::Open | Health::MoreWork)) if self.port.close_request().is_some() => {
                // The loop closes once BYE (and what was queued before it) is written, or after
                // its flush bound: here, the third service step.
                self.closing += 1;
                if self.port.queued() == 0 || self.closing >= 3 {
                    if self.port.queued() > 0 {
                        self.port.counters_mut().bye_flush_timeouts += 1;
                    }
                    self.reopen("close requested");
                    return false;
                }
                return h == Health::MoreWork;
            }
            Ok(Health::Open) => {}
            Ok(Health::MoreWork) => return true,
            Ok(Health::Unplugged) => self.reopen("unplugged"),
            Err(_) => self.reopen("i/o error"),
        }
        false
    }

    /// The guest ops the port accepted, as the event loop's `run_guest_ops` does: dropped if
    /// their session ended, else even op ids complete at once and odd ones later (completed or
    /// refused by a script step). Returns whether any was taken (the loop then serves the port
    /// again on its next turn).
    fn run_guest_ops(&mut self) -> bool {
        let taken = self.port.take_guest_ops();
        let any = !taken.is_empty();
        for r in taken {
            assert!(
                self.settings.allow_guest_ops,
                "guest op {} handed to the event loop with guest ops off [guest-ops-off]",
                r.op_id
            );
            if !self.port.session_is_ready(r.session) {
                continue;
            }
            if r.op_id % 2 == 0 {
                self.complete(r.session, r.op_id);
            } else {
                self.deferred.push(r);
            }
        }
        any
    }

    pub fn complete(&mut self, session: u32, op_id: u32) {
        let ready = self.port.session_is_ready(session);
        let done = GuestOpDone { op_id, ret: 0, data: b"done".to_vec(), ..GuestOpDone::default() };
        let sent = self.port.send_guest_op_done(session, done);
        assert!(!sent || ready, "GUEST_OP_DONE queued for session {session:#x}, which is not READY");
    }

    /// Answers the deferred guest ops: completed, or refused (ERROR limit) as the guest-op
    /// runner does when a handle limit is hit.
    pub fn answer_deferred(&mut self, refuse: bool) {
        for r in std::mem::take(&mut self.deferred) {
            if refuse {
                let ready = self.port.session_is_ready(r.session);
                let sent = self.port.refuse_guest_op(&r, error_code::LIMIT, "fuzz: handle limit".into());
                assert!(!sent || ready, "a refusal queued for session {:#x}, which is not READY", r.session);
            } else {
                self.complete(r.session, r.op_id);
            }
        }
        // The loop writes them on its next turn of this port.
        self.service();
    }

    /// Agent shutdown: BYE in the live session (not a second one), flush, close, open again.
    pub fn shutdown(&mut self) {
        let had_session = self.port.state().session().is_some();
        // A CLOSE served in this open queued its BYE (unless the queue refused it).
        let bye_before =
            self.port.close_request().is_some() && self.port.counters().queue_overflows == self.overflows_at_open;
        let sent = self.port.say_bye(vport_common::message::NO_REOPEN, "shutdown");
        assert!(!sent || had_session, "BYE queued with no session");
        assert!(!(sent && bye_before), "say_bye queued a second BYE after the CLOSE's [after-bye]");
        let _ = self.port.flush_out();
        self.reopen("shutdown");
    }

    fn note_session(&mut self) {
        if let Some(s) = self.port.state().session() {
            if self.sessions.last() != Some(&s) {
                self.sessions.push(s);
            }
        }
    }

    /// Takes the new life-cycle records: the NewSession transitions' times.
    fn collect_history(&mut self) {
        for r in self.port.history().since(self.hist_next) {
            if matches!(r.event, PortEvent::NewSession { .. }) {
                self.new_sessions.push(r.transition.at_ns);
            }
            self.hist_next = r.seq + 1;
        }
    }

    /// Accounts the decode reports the port sent since the last look in the rate-limit window
    /// of the script's clock: at most `decode_reports_per_sec` per window, a window beginning
    /// with the first report at least one second after the previous window began. (Steps are
    /// timed by the script's jumps, in whole milliseconds; all clock readings of one input add
    /// up to far less than one, so a step is wholly inside a window or wholly after it.)
    fn note_reports(&mut self) {
        let now = self.port.counters().decode_reports;
        let new = now - self.reports_seen;
        self.reports_seen = now;
        let drift = self.env.now.get() - self.jumps;
        if new == 0 || drift >= 1_000_000 {
            return;
        }
        let count = match self.window {
            Some((start, count)) if self.jumps - start < SECOND => count + new,
            _ => new,
        };
        let start = match self.window {
            Some((start, _)) if self.jumps - start < SECOND => start,
            _ => self.jumps,
        };
        self.window = Some((start, count));
        let max = u64::from(self.settings.limits.decode_reports_per_sec);
        assert!(
            count <= max,
            "{count} decode reports within one second of the fake clock; the limit is {max} [report-rate]"
        );
    }

    /// Closes this open of the port as the event loop does, checks what it wrote, and opens the
    /// port again with the carried counters and ring.
    pub fn reopen(&mut self, cause: &'static str) {
        self.port.close(&mut self.env, cause);
        self.port.counters_mut().closes += 1;
        self.wire.borrow_mut().cut_here();
        self.collect_history();
        self.note_reports();
        self.check_output(false);
        self.skipped_before += self.port.decoder_stats().skipped_bytes;
        let fresh = open_port(FakeIo { wire: Rc::clone(&self.wire) }, self.settings.clone(), Carry::default());
        let old = std::mem::replace(&mut self.port, fresh);
        let carry = old.into_carry();
        assert_eq!(
            carry.counters.skipped_bytes_before, self.skipped_before,
            "skipped_bytes_before is not the skipped bytes of the earlier opens"
        );
        self.port = open_port(FakeIo { wire: Rc::clone(&self.wire) }, self.settings.clone(), carry);
        {
            let mut w = self.wire.borrow_mut();
            w.written.clear();
            w.cuts.clear();
            w.write_log.clear();
            w.bytes_read_this_open = 0;
        }
        self.deferred.clear();
        self.closing = 0;
        let c = self.port.counters();
        self.frames_in_at_open = c.frames_in;
        self.errors_at_open = c.decode_errors;
        self.torn_at_open = c.torn_frames;
        self.reports_at_open = c.decode_reports;
        self.overflows_at_open = c.queue_overflows;
        self.open_clock = self.env.now.get();
        self.new_sessions.clear();
        // The new open has a fresh rate limiter.
        self.window = None;
    }

    /// Invariants of state and counters, after every step.
    pub fn check_state(&mut self) {
        self.collect_history();
        self.note_reports();
        let c = self.port.counters();
        for ((name, now), (_, before)) in counter_list(&c).into_iter().zip(counter_list(&self.prev)) {
            assert!(now >= before, "counter {name} went down from {before} to {now}");
        }
        self.prev = c;
        let w = self.wire.borrow();
        assert_eq!(c.bytes_out, w.bytes_written, "bytes_out is not what writes accepted");
        assert_eq!(c.bytes_in, w.bytes_read + w.probe_read_bytes, "bytes_in is not what reads returned");
        let d = self.port.decoder_stats();
        assert_eq!(d.bytes_in, w.bytes_read_this_open, "the decoder got other bytes than this open read");
        assert_eq!(c.frames_in - self.frames_in_at_open, d.frames, "frames_in is not the frames decoded");
        assert_eq!(c.decode_errors - self.errors_at_open, d.errors, "decode_errors is not the decoder's errors");
        assert_eq!(c.torn_frames - self.torn_at_open, d.torn, "torn_frames is not the decoder's torn frames");
        assert_eq!(c.skipped_bytes_before, self.skipped_before, "skipped_bytes_before");
        assert!(self.port.queued() <= QUEUE_LIMIT, "queue of {} bytes over its limit", self.port.queued());
        if !self.settings.allow_guest_ops {
            assert!(self.deferred.is_empty(), "guest ops deferred with guest ops off");
        }
        let mut prev_to: Option<PortState> = None;
        for r in self.port.history().since(0) {
            if let Some(to) = prev_to {
                assert_eq!(r.transition.from, to, "history record {} does not start where the last ended", r.seq);
            }
            prev_to = Some(r.transition.to);
        }
        if let Some(to) = prev_to {
            assert_eq!(to, self.port.state(), "the history does not end in the current state");
        }
    }
}
