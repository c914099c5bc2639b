//! SOURCE, SINK and DATA: seeded pattern streams ([`vport_common::pattern`]) that measure the
//! port's throughput and integrity.
//!
//! - SOURCE: the agent sends `bytes` of the pattern as DATA frames, generated lazily (frames
//!   are added only while the queue holds less than [`SOURCE_LOW_WATER`]), then SOURCE_DONE
//!   with the digest.
//! - SINK: the agent checks the DATA the host sends against the pattern, in order, and answers
//!   SINK_RESULT with the digest and the first mismatching offset (a gap counts as one).
//!
//! One of each may run per port, within [`crate::settings::Limits::max_stream_bytes`]; a
//! session that ends (or a CLOSE) aborts them, counted in `stream_aborts` and logged.

use super::{Port, PortIo, SinkJob, SourceJob, DEFAULT_CHUNK, MAX_CHUNK, SOURCE_LOW_WATER};
use std::convert::Infallible;
use vport_common::message::{error_code, BulkHead, NO_MISMATCH};
use vport_common::pattern::{self, StreamDigest};
use vport_common::{Header, Message, MessageType};

impl<I: PortIo> Port<I> {
    /// SOURCE of `bytes` from `seed` in DATA frames of `chunk` bytes (0: [`DEFAULT_CHUNK`],
    /// at most [`MAX_CHUNK`]), in the request's session.
    pub(super) fn on_source(&mut self, h: &Header, seed: u64, bytes: u64, chunk: u32) {
        if self.source.is_some() {
            return self.reply_error(h, h.session, error_code::BAD_STATE, "a SOURCE is already running".into());
        }
        if !self.within_stream_limit(h, bytes) {
            return;
        }
        let chunk = match chunk as usize {
            0 => DEFAULT_CHUNK,
            c => c.min(MAX_CHUNK),
        };
        log::info!("port {}: SOURCE seed={seed:#x} bytes={bytes} chunk={chunk}", self.name);
        self.source =
            Some(SourceJob { session: h.session, seed, total: bytes, chunk, offset: 0, digest: StreamDigest::new() });
    }

    /// SINK of `bytes` from `seed`, in the request's session (a zero-byte SINK answers at once).
    pub(super) fn on_sink(&mut self, h: &Header, seed: u64, bytes: u64) {
        if self.sink.is_some() {
            return self.reply_error(h, h.session, error_code::BAD_STATE, "a SINK is already running".into());
        }
        if !self.within_stream_limit(h, bytes) {
            return;
        }
        log::info!("port {}: SINK seed={seed:#x} bytes={bytes}", self.name);
        self.sink = Some(SinkJob {
            session: h.session,
            seed,
            total: bytes,
            received: 0,
            first_mismatch: NO_MISMATCH,
            digest: StreamDigest::new(),
        });
        if bytes == 0 {
            self.finish_sink();
        }
    }

    /// True if a stream of `bytes` is within the stream limit; otherwise answers ERROR limit.
    fn within_stream_limit(&mut self, h: &Header, bytes: u64) -> bool {
        let max = self.settings.limits.max_stream_bytes;
        if bytes <= max {
            return true;
        }
        self.counters.refusals += 1;
        let text = format!(
            "a stream of {bytes} bytes exceeds the agent's limit of {max} bytes (vport-agent --max-stream-bytes)"
        );
        self.reply_error(h, h.session, error_code::LIMIT, text);
        false
    }

    /// DATA at `offset` for the running SINK: checked against the pattern in order (the first
    /// mismatch, or the first gap, is kept); the last byte answers SINK_RESULT.
    pub(super) fn on_data(&mut self, h: &Header, offset: u64, bytes: &[u8]) {
        let Some(job) = self.sink.as_mut() else {
            return self.reply_error(h, h.session, error_code::BAD_STATE, "DATA outside a SINK".to_owned());
        };
        if offset != job.received && job.first_mismatch == NO_MISMATCH {
            log::debug!("port {}: SINK expected offset {}, got {offset}", self.name, job.received);
            job.first_mismatch = job.received;
        }
        if job.first_mismatch == NO_MISMATCH {
            if let Some(m) = pattern::first_mismatch(job.seed, job.received, bytes) {
                job.first_mismatch = m;
            }
        }
        job.digest.update(bytes);
        job.received += bytes.len() as u64;
        if job.received >= job.total {
            self.finish_sink();
        }
    }

    /// Ends the running SINK with SINK_RESULT in its session.
    fn finish_sink(&mut self) {
        let Some(job) = self.sink.take() else { return };
        let result = Message::SinkResult {
            bytes: job.received,
            digest: job.digest.digest(),
            first_mismatch: job.first_mismatch,
        };
        log::info!(
            "port {}: SINK of {} bytes complete, first mismatch {}",
            self.name,
            job.received,
            if job.first_mismatch == NO_MISMATCH { "none".to_owned() } else { job.first_mismatch.to_string() }
        );
        self.send(&result, job.session);
    }

    /// Adds SOURCE frames while the queue is below [`SOURCE_LOW_WATER`]; queues SOURCE_DONE at
    /// the end of the stream.
    pub(super) fn pump_source(&mut self) {
        while self.out.len() < SOURCE_LOW_WATER {
            let Some(job) = self.source.as_mut() else { return };
            let session = job.session;
            if job.offset >= job.total {
                let done = Message::SourceDone { bytes: job.total, digest: job.digest.digest() };
                log::info!("port {}: SOURCE of {} bytes complete", self.name, job.total);
                self.source = None;
                self.send(&done, session);
                return;
            }
            let offset = job.offset;
            let queued = self.may_send(MessageType::Data) && self.queue_source_data();
            if !queued {
                self.counters.stream_aborts += 1;
                log::error!("port {}: SOURCE aborted at {offset}: DATA frame could not be queued", self.name);
                self.source = None;
            }
        }
    }

    /// Queues the running SOURCE's next DATA frame, the pattern written straight into the
    /// output queue (never copied); false if it could not be queued (logged and counted).
    fn queue_source_data(&mut self) -> bool {
        let Some(job) = self.source.as_mut() else { return false };
        let (session, seed, offset, seq) = (job.session, job.seed, job.offset, self.seq);
        let n = (job.total - offset).min(job.chunk as u64) as usize;
        let pushed = self.out.push_encoded(|buf| {
            BulkHead::Data { offset }.encode_into(session, seq, n, buf, |bytes| {
                pattern::fill(seed, offset, bytes);
                job.digest.update(bytes);
                Ok::<(), Infallible>(())
            })
        });
        job.offset += n as u64;
        match self.settle(MessageType::Data, pushed) {
            Ok(queued) => queued,
            Err(never) => match never {},
        }
    }

    /// Stops a running SOURCE and SINK (counted in `stream_aborts` and logged), and closes the
    /// open acknowledged streams (their files stay, to be resumed).
    pub(super) fn abort_streams(&mut self) {
        self.close_acked_streams();
        if let Some(job) = self.source.take() {
            self.counters.stream_aborts += 1;
            log::warn!(
                "port {}: SOURCE aborted at {} of {} bytes: the session ended",
                self.name,
                job.offset,
                job.total
            );
        }
        if let Some(job) = self.sink.take() {
            self.counters.stream_aborts += 1;
            log::warn!(
                "port {}: SINK aborted at {} of {} bytes: the session ended",
                self.name,
                job.received,
                job.total
            );
        }
    }
}
