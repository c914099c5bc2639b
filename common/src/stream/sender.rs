//! [`Sender`]: the sending end of an acknowledged stream.

use super::StreamError;

/// Where a sender stands. One transition function ([`Sender::on`]) moves it.
///
/// ```text
/// Opening --Accepted--> Sending --Ack(total)--> Ending --Done(ok)--> Done
///    ^                     |                       |
///    +---- Interrupted ----+-----------------------+   (a session ended: resume on the next)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderState {
    /// Waiting for the receiver's offset (STREAM_OPEN sent, STREAM_ACCEPT awaited).
    Opening,
    /// Sending within the window and taking acknowledgements.
    Sending,
    /// Every byte is acknowledged: STREAM_END is due or sent, STREAM_DONE awaited.
    Ending,
    /// The receiver judged the whole stream: `ok` when it matched the digest.
    Done {
        /// The receiver's verdict.
        ok: bool,
    },
}

impl SenderState {
    /// The state's name in errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            SenderState::Opening => "opening",
            SenderState::Sending => "sending",
            SenderState::Ending => "ending",
            SenderState::Done { .. } => "done",
        }
    }
}

/// What happened to a sender (the inputs of [`Sender::on`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderInput {
    /// The receiver stands at `offset` (STREAM_ACCEPT when the agent receives; the host's
    /// own stored length when the host receives).
    Accepted {
        /// The receiver's offset: every byte before it is stored.
        offset: u64,
    },
    /// STREAM_ACK: every byte before `offset` is stored.
    Ack {
        /// Cumulative offset.
        offset: u64,
    },
    /// STREAM_DONE: the receiver's verdict on the whole stream.
    Done {
        /// Whether its length and digest matched.
        ok: bool,
    },
    /// The session carrying the stream ended; what was not acknowledged is sent again on the
    /// next one, from the receiver's offset.
    Interrupted,
}

/// What a sender has measured over its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderStats {
    /// Bytes handed out for sending, counting bytes sent again.
    pub sent: u64,
    /// Bytes in flight (sent, not acknowledged) when a session ended: sent again.
    pub unacked_at_interrupt: u64,
    /// Bytes the receiver had acknowledged but no longer had when it resumed (it was
    /// rewound): sent again.
    pub rewound: u64,
    /// Sessions that ended while the stream was open.
    pub interruptions: u64,
    /// Resumes (STREAM_ACCEPT after the first).
    pub resumes: u64,
}

/// The sending end of stream `id`: what may be sent next, within the window, from the
/// receiver's offset.
#[derive(Debug, Clone)]
pub struct Sender {
    id: u64,
    total: u64,
    window: u64,
    acked: u64,
    next: u64,
    state: SenderState,
    accepted_once: bool,
    stats: SenderStats,
}

impl Sender {
    /// A sender of `total` bytes with at most `window` bytes unacknowledged (a window of 0 is
    /// taken as 1), waiting for the receiver's offset.
    pub fn new(id: u64, total: u64, window: u32) -> Sender {
        Sender {
            id,
            total,
            window: u64::from(window.max(1)),
            acked: 0,
            next: 0,
            state: SenderState::Opening,
            accepted_once: false,
            stats: SenderStats::default(),
        }
    }

    /// The stream id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The stream's length.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The state.
    pub fn state(&self) -> SenderState {
        self.state
    }

    /// Bytes the receiver has acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Bytes handed out up to now in this session (the next offset to send).
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// The measurements so far.
    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    /// Sets the window (the one the receiver granted); at least 1.
    pub fn set_window(&mut self, window: u32) {
        self.window = u64::from(window.max(1));
    }

    /// Whether [`Sender::take_chunk`] would hand out a piece now: sending, not at the end, and
    /// room in the window.
    pub fn can_send(&self) -> bool {
        self.state == SenderState::Sending && self.next < self.total && self.next - self.acked < self.window
    }

    /// The next piece to send, at most `max` bytes, as `(offset, len)`, counted as sent; `None`
    /// when not sending, at the end, or when the window is full.
    pub fn take_chunk(&mut self, max: usize) -> Option<(u64, usize)> {
        if self.state != SenderState::Sending || self.next >= self.total {
            return None;
        }
        let room = self.window.saturating_sub(self.next - self.acked);
        let len = (self.total - self.next).min(room).min(max as u64);
        if len == 0 {
            return None;
        }
        let offset = self.next;
        self.next += len;
        self.stats.sent += len;
        Some((offset, len as usize))
    }

    /// The one transition function. Returns the new state.
    pub fn on(&mut self, input: SenderInput) -> Result<SenderState, StreamError> {
        let wrong = |input: &'static str, state: SenderState| StreamError::WrongState {
            id: self.id,
            input,
            state: state.name(),
        };
        self.state = match (self.state, input) {
            (SenderState::Opening, SenderInput::Accepted { offset }) => {
                if offset > self.total {
                    return Err(StreamError::OffsetPastEnd { id: self.id, offset, total: self.total });
                }
                if self.accepted_once {
                    self.stats.resumes += 1;
                }
                self.stats.rewound += self.acked.saturating_sub(offset);
                self.accepted_once = true;
                self.acked = offset;
                self.next = offset;
                self.after_ack()
            }
            (SenderState::Sending, SenderInput::Ack { offset }) => {
                if offset > self.next {
                    return Err(StreamError::AckBeyondSent { id: self.id, offset, sent: self.next });
                }
                // An older acknowledgement overtaken by a newer one changes nothing.
                self.acked = self.acked.max(offset);
                self.after_ack()
            }
            // A late or repeated acknowledgement once everything is acknowledged.
            (SenderState::Ending, SenderInput::Ack { offset }) if offset <= self.total => SenderState::Ending,
            (SenderState::Ending, SenderInput::Done { ok }) => SenderState::Done { ok },
            (SenderState::Done { ok }, SenderInput::Interrupted) => SenderState::Done { ok },
            (_, SenderInput::Interrupted) => {
                self.stats.interruptions += 1;
                self.stats.unacked_at_interrupt += self.next - self.acked;
                self.next = self.acked;
                SenderState::Opening
            }
            (state, SenderInput::Accepted { .. }) => return Err(wrong("STREAM_ACCEPT", state)),
            (state, SenderInput::Ack { .. }) => return Err(wrong("STREAM_ACK", state)),
            (state, SenderInput::Done { .. }) => return Err(wrong("STREAM_DONE", state)),
        };
        Ok(self.state)
    }

    fn after_ack(&self) -> SenderState {
        if self.acked >= self.total {
            SenderState::Ending
        } else {
            SenderState::Sending
        }
    }
}
