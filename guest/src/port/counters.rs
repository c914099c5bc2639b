//! What a port counts and reports about itself: [`Counters`], [`Carry`] (what survives a close
//! and reopen, and an unplug and replug of the same name), and the two listings the host reads,
//! STATS ([`stats_listing`]) and EVENTS ([`event_records`]). Pure: no I/O.

use crate::history::{History, DEFAULT_CAPACITY};
use vport_common::message::EventRecord;
use vport_common::DecoderStats;
use vport_common::Phase;

/// Running counters of one port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes read from the port.
    pub bytes_in: u64,
    /// Bytes written to the port.
    pub bytes_out: u64,
    /// Valid frames received.
    pub frames_in: u64,
    /// Frames queued for sending.
    pub frames_out: u64,
    /// Sessions started (HELLO sent).
    pub sessions: u64,
    /// HELLOs repeated because a HELLO_REQUEST came while the offer was pending.
    pub hello_repeats: u64,
    /// Decoder errors (damaged or foreign bytes).
    pub decode_errors: u64,
    /// Frames of a session that is neither 0 nor the current one.
    pub stale_frames: u64,
    /// Events the state machine refused.
    pub illegal_transitions: u64,
    /// ERROR frames sent.
    pub errors_sent: u64,
    /// ERROR frames received from the host.
    pub errors_received: u64,
    /// Queued bytes thrown away because the session ended or the port closed.
    pub dropped_bytes: u64,
    /// Frames refused because the output queue was full.
    pub queue_overflows: u64,
    /// Write calls that accepted fewer bytes than offered.
    pub short_writes: u64,
    /// EBUSY results of opening this port (another process held it).
    pub ebusy: u64,
    /// Successful opens of this port.
    pub opens: u64,
    /// Closes of this port (command, unplug, error, exit).
    pub closes: u64,
    /// SOURCE or SINK streams aborted because their session ended.
    pub stream_aborts: u64,
    /// BYE frames not fully written within the flush bound before a close.
    pub bye_flush_timeouts: u64,
    /// SIGIO signals counted for this port while observation was enabled.
    pub sigio_signals: u64,
    /// Torn frames cut at a new client's HELLO_REQUEST (also in `decode_errors`).
    pub torn_frames: u64,
    /// ERROR decode reports sent to the host (rate-limited; the rest are only counted).
    pub decode_reports: u64,
    /// ERROR decode reports held back by the rate limit.
    pub decode_reports_held_back: u64,
    /// Bytes the decoder skipped outside valid frames on earlier opens of this port (the
    /// current open's are in its decoder).
    pub skipped_bytes_before: u64,
    /// Requests refused by a limit or the policy (ERROR limit or denied).
    pub refusals: u64,
    /// Frames not queued because the session's BYE was already queued (late replies).
    pub after_bye_dropped: u64,
}

/// What survives a close and reopen of a port (and an unplug and replug of the same name):
/// the counters and the life-cycle ring.
#[derive(Debug, Clone)]
pub struct Carry {
    /// Counters so far.
    pub counters: Counters,
    /// The ring so far.
    pub history: History,
}

impl Default for Carry {
    fn default() -> Self {
        Carry { counters: Counters::default(), history: History::new(DEFAULT_CAPACITY) }
    }
}

/// The per-port STATS pairs, in the order [`super::Port::stats`] documents: `counters`, the
/// current open's `decoder` (its skipped bytes add to those of earlier opens) and the bytes
/// `queued` now.
pub(super) fn stats_listing(c: &Counters, decoder: DecoderStats, queued: usize) -> Vec<(String, u64)> {
    [
        ("bytes_in", c.bytes_in),
        ("bytes_out", c.bytes_out),
        ("frames_in", c.frames_in),
        ("frames_out", c.frames_out),
        ("decode_errors", c.decode_errors),
        ("skipped_bytes", c.skipped_bytes_before + decoder.skipped_bytes),
        ("stale_frames", c.stale_frames),
        ("sessions", c.sessions),
        ("hello_repeats", c.hello_repeats),
        ("illegal_transitions", c.illegal_transitions),
        ("errors_sent", c.errors_sent),
        ("errors_received", c.errors_received),
        ("dropped_bytes", c.dropped_bytes),
        ("short_writes", c.short_writes),
        ("queue_overflows", c.queue_overflows),
        ("ebusy", c.ebusy),
        ("opens", c.opens),
        ("closes", c.closes),
        ("stream_aborts", c.stream_aborts),
        ("bye_flush_timeouts", c.bye_flush_timeouts),
        ("sigio_signals", c.sigio_signals),
        ("torn_frames", c.torn_frames),
        ("decode_reports", c.decode_reports),
        ("decode_reports_held_back", c.decode_reports_held_back),
        ("refusals", c.refusals),
        ("after_bye_dropped", c.after_bye_dropped),
        ("queued", queued as u64),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The records of `history` with `seq >= since`, at most `max`, as EVENTS records.
pub(super) fn event_records(history: &History, since: u64, max: usize) -> Vec<EventRecord> {
    history
        .since(since)
        .take(max)
        .map(|r| EventRecord {
            seq: r.seq,
            time_ns: r.transition.at_ns,
            from: Phase::from(&r.transition.from),
            to: Phase::from(&r.transition.to),
            session: r.transition.to.session().unwrap_or(0),
            wakeups: r.wakeups,
            cpu_ns: r.cpu_ns,
            cause: r.cause.to_owned(),
        })
        .collect()
}
