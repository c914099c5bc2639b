//! Frames out of the decoder, and the decode reports: damaged frames (decode errors) and bytes
//! outside any frame (garbage) are reported to the host as ERROR decode in the current session,
//! at most [`crate::settings::Limits::decode_reports_per_sec`] per second
//! ([`crate::ratelimit::ReportLimiter`]); the reports held back are counted, and the next one
//! sent says how many.
//!
//! A burst of garbage gets one report; garbage before a damaged frame is reported before that
//! frame's error; a frame torn by a new client's HELLO_REQUEST is reported in the new session.

use super::{Env, Port, PortIo};
use vport_common::message::error_code;
use vport_common::{DecodeError, Message};

impl<I: PortIo> Port<I> {
    /// Handles complete frames while a session is live. Frames that arrive with no session are
    /// kept until the next poll tells whether a host is attached. Decode errors, and bytes
    /// skipped outside any frame, are reported to the host (ERROR decode, rate-limited).
    ///
    /// A torn frame is reported after the HELLO_REQUEST that cut it has been handled, so the
    /// report goes to the new session (the old one's output is dropped at that point).
    pub(super) fn process_frames(&mut self, env: &mut impl Env) {
        let mut torn: Option<String> = None;
        while self.machine.state().session().is_some() && self.close_request.is_none() {
            match self.decoder.next_frame() {
                None => break,
                Some(Ok(frame)) => {
                    // Garbage before a frame is reported before the frame's own answer.
                    self.report_skipped(env);
                    self.damage_reported = false;
                    self.handle_frame(frame, env);
                    if let Some(text) = torn.take() {
                        self.report_decode(&text, env);
                    }
                }
                Some(Err(e)) => {
                    self.counters.decode_errors += 1;
                    log::debug!("port {}: {e}", self.name);
                    // Garbage before the damaged frame is reported first; the bytes of the
                    // frame itself (skipped from its magic on) are the error's.
                    // (After an earlier error in this turn, the bytes between are its frame's.)
                    let stats = self.decoder.stats();
                    let damage = stats.last_skip_end.saturating_sub(e.offset());
                    if !self.damage_reported {
                        self.report_garbage(stats.skipped_bytes.saturating_sub(damage), e.offset(), env);
                    }
                    self.skipped_seen = stats.skipped_bytes;
                    if matches!(e, DecodeError::Torn { .. }) {
                        self.counters.torn_frames += 1;
                        torn = Some(e.to_string());
                    } else {
                        self.report_decode(&e.to_string(), env);
                    }
                    // The rejected frame's bytes are skipped from here on: this error explains them.
                    self.damage_reported = true;
                }
            }
        }
        if let Some(text) = torn {
            self.report_decode(&text, env);
        }
    }

    /// Reports the bytes the decoder skipped outside any frame since the last look (and that
    /// no decode error explained) as one ERROR decode: a burst of garbage gets one report.
    pub(super) fn report_skipped(&mut self, env: &mut impl Env) {
        let stats = self.decoder.stats();
        if self.damage_reported {
            self.skipped_seen = stats.skipped_bytes;
            return;
        }
        self.report_garbage(stats.skipped_bytes, stats.last_skip_end, env);
        self.skipped_seen = stats.skipped_bytes;
    }

    /// Reports the bytes skipped since the last look when the decoder's count is `skipped`,
    /// the last of them just before stream offset `end`.
    fn report_garbage(&mut self, skipped: u64, end: u64, env: &mut impl Env) {
        let new = skipped.saturating_sub(self.skipped_seen);
        if new > 0 && self.machine.state().session().is_some() {
            let text = format!(
                "skipped {new} bytes that are not part of any frame, the last just before stream offset {end} \
                 (a frame starts with the magic f5 56 50 52)"
            );
            self.report_decode(&text, env);
        }
    }

    /// Sends ERROR decode with `text` in the current session, unless the rate limit holds it
    /// back (then it is only counted).
    fn report_decode(&mut self, text: &str, env: &mut impl Env) {
        let Some(session) = self.machine.state().session() else { return };
        let Some(held_back) = self.reports.admit(env.now_ns()) else {
            self.counters.decode_reports_held_back += 1;
            return;
        };
        let text = match held_back {
            0 => text.to_owned(),
            n => format!("{text} ({n} earlier reports held back by the rate limit)"),
        };
        self.counters.decode_reports += 1;
        self.counters.errors_sent += 1;
        self.send(&Message::error_unsolicited(error_code::DECODE, text), session);
    }
}
