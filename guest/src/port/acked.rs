//! Acknowledged streams on a port (`docs/protocol.md`, "Acknowledged streams"): STREAM_OPEN,
//! STREAM_DATA, STREAM_ACK, STREAM_END and STREAM_DONE, over the machines of
//! [`vport_common::stream`] and the files of [`crate::stream_dir`].
//!
//! At most one stream per direction is open on a port, in the session that opened it. The
//! receiver's state is its part file, not this struct: a session that ends drops the open
//! streams (logged), and the next STREAM_OPEN of the same id resumes from the file.

use super::{AckedStreams, Incoming, OutSource, Outgoing, Port, PortIo, SOURCE_LOW_WATER};
use crate::stream_dir::{self, StreamDir, StreamDirError};
use vport_common::message::{error_code, BulkHead, StreamDirection};
use vport_common::pattern;
use vport_common::stream::{DataVerdict, Receiver, Sender, SenderInput, SenderState, DEFAULT_WINDOW, MAX_WINDOW};
use vport_common::{Header, Message, MessageType};

/// Largest STREAM_DATA payload the agent sends: one frame fills one 32 KiB write (frame
/// overhead 28, id and offset 16).
pub const STREAM_CHUNK: usize = super::MAX_WRITE - vport_common::frame::OVERHEAD - 16;

/// A STREAM_OPEN, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    /// Stream id.
    pub id: u64,
    /// Which way.
    pub direction: StreamDirection,
    /// File name under the stream directory (empty: a to-host pattern).
    pub name: String,
    /// Pattern seed (to-host pattern).
    pub seed: u64,
    /// Stream length (0 for a to-host file).
    pub total: u64,
    /// The host's receive offset (to-host).
    pub offset: u64,
    /// The host's window (0: the default).
    pub window: u32,
}

impl AckedStreams {
    /// True while an outgoing stream has something to send or to end with.
    pub fn wants_to_send(&self) -> bool {
        self.outgoing.as_ref().is_some_and(|o| match o.sender.state() {
            SenderState::Sending => o.sender.can_send(),
            SenderState::Ending => !o.end_sent,
            _ => false,
        })
    }
}

impl Outgoing {
    /// Adds the bytes at `offset` being sent to the digest of what was sent: only the part
    /// past what is digested already (a resent range counts once); a gap drops the digest.
    pub(super) fn digest_sent(&mut self, offset: u64, bytes: &[u8]) {
        let Some(digest) = self.sent_digest.as_mut() else { return };
        let end = offset + bytes.len() as u64;
        if offset > self.digested {
            self.sent_digest = None;
        } else if end > self.digested {
            let new = usize::try_from(self.digested - offset).unwrap_or(usize::MAX);
            digest.update(&bytes[new.min(bytes.len())..]);
            self.digested = end;
        }
    }
}

impl<I: PortIo> Port<I> {
    fn stream_dir(&self) -> Option<StreamDir> {
        self.settings.stream_dir.clone().map(StreamDir::new)
    }

    /// STREAM_OPEN: opens or resumes a stream and answers STREAM_ACCEPT.
    pub(super) fn on_stream_open(&mut self, h: &Header, req: OpenRequest) {
        let Some(dir) = self.stream_dir() else {
            self.counters.refusals += 1;
            let text =
                "acknowledged streams are disabled: start vport-agent with --stream-dir DIR (see docs/security.md)";
            return self.reply_error(h, h.session, error_code::DENIED, text.to_owned());
        };
        let window = match req.window {
            0 => DEFAULT_WINDOW,
            w => w.min(MAX_WINDOW),
        };
        let busy = match req.direction {
            StreamDirection::ToGuest => self.acked.incoming.as_ref().map(|i| i.receiver.id()),
            StreamDirection::ToHost => self.acked.outgoing.as_ref().map(|o| o.sender.id()),
        };
        if let Some(open) = busy.filter(|open| *open != req.id) {
            let text = format!("a {:?} stream is already open on this port (id {open:#x})", req.direction);
            return self.reply_error(h, h.session, error_code::BAD_STATE, text);
        }
        if req.total > self.settings.limits.max_stream_bytes {
            self.counters.refusals += 1;
            let text = format!(
                "a stream of {} bytes exceeds the agent's limit of {} bytes (vport-agent --max-stream-bytes)",
                req.total, self.settings.limits.max_stream_bytes
            );
            return self.reply_error(h, h.session, error_code::LIMIT, text);
        }
        let opened = match req.direction {
            StreamDirection::ToGuest => self.open_incoming(&dir, h.session, &req),
            StreamDirection::ToHost => self.open_outgoing(&dir, h.session, &req, window),
        };
        match opened {
            Ok((_, total)) if total > self.settings.limits.max_stream_bytes => {
                self.acked.outgoing = None;
                self.counters.refusals += 1;
                let text = format!(
                    "{:?} has {total} bytes, over the agent's limit of {} bytes (vport-agent --max-stream-bytes)",
                    req.name, self.settings.limits.max_stream_bytes
                );
                self.reply_error(h, h.session, error_code::LIMIT, text);
            }
            Ok((offset, total)) => {
                log::info!(
                    "port {}: stream {:#x} {:?} {:?} open at {offset} of {total} (window {window})",
                    self.name,
                    req.id,
                    req.direction,
                    req.name
                );
                self.send(&Message::StreamAccept { id: req.id, offset, total, window }, h.session);
            }
            Err(e @ (StreamDirError::BadName { .. } | StreamDirError::NotAFile { .. })) => {
                self.counters.refusals += 1;
                self.reply_error(h, h.session, error_code::DENIED, e.to_string());
            }
            Err(e @ StreamDirError::PastEnd { .. }) => {
                self.reply_error(h, h.session, error_code::BAD_STATE, e.to_string())
            }
            Err(e) => self.reply_error(h, h.session, error_code::INTERNAL, e.to_string()),
        }
    }

    /// Opens the part file of a to-guest stream; `(offset, total)` for STREAM_ACCEPT.
    fn open_incoming(
        &mut self,
        dir: &StreamDir,
        session: u32,
        req: &OpenRequest,
    ) -> Result<(u64, u64), StreamDirError> {
        stream_dir::check_name(&req.name)?;
        self.acked.incoming = None;
        if dir.completed(&req.name, req.id, req.total) {
            self.acked.completed = Some((req.id, req.name.clone()));
            return Ok((req.total, req.total));
        }
        let (part, offset) = dir.open_part(&req.name, req.id, req.total)?;
        let receiver = match Receiver::new(req.id, req.total, offset) {
            Ok(r) => r,
            Err(e) => {
                return Err(StreamDirError::Io {
                    op: "resume",
                    path: part.path().to_owned(),
                    source: std::io::Error::other(e),
                })
            }
        };
        self.acked.incoming = Some(Incoming { session, receiver, part, name: req.name.clone() });
        Ok((offset, req.total))
    }

    /// Opens the source of a to-host stream and starts its sender at the host's offset.
    fn open_outgoing(
        &mut self,
        dir: &StreamDir,
        session: u32,
        req: &OpenRequest,
        window: u32,
    ) -> Result<(u64, u64), StreamDirError> {
        self.acked.outgoing = None;
        let (source, total) = if req.name.is_empty() {
            (OutSource::Pattern { seed: req.seed }, req.total)
        } else {
            let (file, len) = dir.open_source(&req.name)?;
            (OutSource::File { file, path: dir.root().join(&req.name) }, len)
        };
        if req.offset > total {
            return Err(StreamDirError::PastEnd { name: req.name.clone(), offset: req.offset, len: total });
        }
        let mut sender = Sender::new(req.id, total, window);
        if let Err(e) = sender.on(SenderInput::Accepted { offset: req.offset }) {
            return Err(StreamDirError::Io {
                op: "resume",
                path: dir.root().join(&req.name),
                source: std::io::Error::other(e),
            });
        }
        // A pattern's digest is kept as it is sent; a file's is taken from the file at the end
        // (STREAM_END then says what the file holds, even if it changed while being sent).
        let sent_digest = matches!(source, OutSource::Pattern { .. }).then(pattern::StreamDigest::new);
        self.acked.outgoing = Some(Outgoing { session, sender, source, end_sent: false, sent_digest, digested: 0 });
        Ok((req.offset, total))
    }

    /// STREAM_DATA of the open to-guest stream: stored in order, acknowledged.
    pub(super) fn on_stream_data(&mut self, h: &Header, id: u64, offset: u64, bytes: &[u8]) {
        let Some(inc) = self.acked.incoming.as_mut().filter(|i| i.receiver.id() == id) else {
            return self.reply_error(
                h,
                h.session,
                error_code::BAD_STATE,
                format!("no to-guest stream {id:#x} is open"),
            );
        };
        let stored = match inc.receiver.on_data(offset, bytes.len()) {
            Err(e) => return self.reply_error(h, h.session, error_code::BAD_STATE, e.to_string()),
            Ok(DataVerdict::Duplicate) => return,
            Ok(DataVerdict::Store { skip }) => inc.part.append(&bytes[skip..]).map(|()| (bytes.len() - skip) as u64),
        };
        match stored {
            Ok(n) => {
                if let Some(ack) = inc.receiver.stored(n) {
                    let session = inc.session;
                    self.send(&Message::StreamAck { id, offset: ack }, session);
                }
            }
            Err(e) => {
                log::error!("port {}: stream {id:#x}: {e}; the stream is closed", self.name);
                self.acked.incoming = None;
                self.reply_error(h, h.session, error_code::INTERNAL, e.to_string());
            }
        }
    }

    /// STREAM_END of the open to-guest stream: the stored file judged whole.
    pub(super) fn on_stream_end(&mut self, h: &Header, id: u64, total: u64, digest: u64) {
        let Some(inc) = self.acked.incoming.as_mut().filter(|i| i.receiver.id() == id) else {
            // A stream that completed before (its marker is there) is judged from its file.
            return self.end_completed(h, id, total, digest);
        };
        if !inc.receiver.is_complete() || total != inc.receiver.total() {
            let text = format!(
                "stream {id:#x}: STREAM_END of {total} bytes, but {} of {} are stored",
                inc.receiver.offset(),
                inc.receiver.total()
            );
            return self.reply_error(h, h.session, error_code::BAD_STATE, text);
        }
        let Some(inc) = self.acked.incoming.take() else { return };
        let mut part = inc.part;
        let verdict = part.digest().and_then(|(bytes, got)| {
            let ok = bytes == total && got == digest;
            if ok {
                part.finish().map(|path| (bytes, got, ok, path.display().to_string()))
            } else {
                let path = part.path().display().to_string();
                part.discard().map(|()| (bytes, got, ok, path))
            }
        });
        match verdict {
            Ok((bytes, got, ok, path)) => {
                log::info!("port {}: stream {id:#x} into {path}: {bytes} bytes, digest {got:#x}, ok {ok}", self.name);
                self.send(&Message::StreamDone { id, bytes, digest: got, ok }, h.session);
            }
            Err(e) => self.reply_error(h, h.session, error_code::INTERNAL, e.to_string()),
        }
    }

    /// STREAM_END of a stream that is not open: STREAM_DONE from the completed file, if any.
    fn end_completed(&mut self, h: &Header, id: u64, total: u64, digest: u64) {
        let completed = self.acked.completed.as_ref().filter(|(done, _)| *done == id).map(|(_, n)| n.clone());
        let (Some(dir), Some(name)) = (self.stream_dir(), completed) else {
            let text = format!("no to-guest stream {id:#x} is open");
            return self.reply_error(h, h.session, error_code::BAD_STATE, text);
        };
        match dir.digest_of(&name, total) {
            Ok((bytes, got)) => {
                let ok = bytes == total && got == digest;
                if !ok {
                    // The file changed since: the next STREAM_OPEN stores the stream again.
                    dir.forget_completed(&name, id);
                    self.acked.completed = None;
                }
                self.send(&Message::StreamDone { id, bytes, digest: got, ok }, h.session);
            }
            Err(e) => self.reply_error(h, h.session, error_code::INTERNAL, e.to_string()),
        }
    }

    /// STREAM_ACK or STREAM_DONE of the open to-host stream.
    pub(super) fn on_stream_feedback(&mut self, h: &Header, id: u64, input: SenderInput) {
        let Some(out) = self.acked.outgoing.as_mut().filter(|o| o.sender.id() == id) else {
            return self.reply_error(h, h.session, error_code::BAD_STATE, format!("no to-host stream {id:#x} is open"));
        };
        match out.sender.on(input) {
            Ok(SenderState::Done { ok }) => {
                log::info!("port {}: stream {id:#x} to the host done, ok {ok}", self.name);
                self.acked.outgoing = None;
            }
            Ok(_) => {}
            Err(e) => self.reply_error(h, h.session, error_code::BAD_STATE, e.to_string()),
        }
    }

    /// Queues STREAM_DATA of the to-host stream while the queue is below [`SOURCE_LOW_WATER`]
    /// and the window allows; STREAM_END once every byte is acknowledged; and the pending
    /// acknowledgement of the to-guest stream (at the end of every turn that stored bytes).
    pub(super) fn pump_acked(&mut self) {
        if let Some(inc) = self.acked.incoming.as_mut() {
            if let Some(offset) = inc.receiver.flush_ack() {
                let (id, session) = (inc.receiver.id(), inc.session);
                self.send(&Message::StreamAck { id, offset }, session);
            }
        }
        while self.out.len() < SOURCE_LOW_WATER {
            let Some(out) = self.acked.outgoing.as_mut() else { return };
            let (id, session) = (out.sender.id(), out.session);
            if out.sender.state() == SenderState::Ending && !out.end_sent {
                out.end_sent = true;
                let total = out.sender.total();
                let digest = match (&out.sent_digest, &mut out.source) {
                    (Some(sent), _) if out.digested == total => Ok(sent.digest()),
                    (_, OutSource::Pattern { seed }) => Ok(pattern::pattern_digest(*seed, total)),
                    (_, OutSource::File { file, path }) => stream_dir::digest_file(file, path, total).map(|(_, d)| d),
                };
                match digest {
                    Ok(digest) => {
                        self.send(&Message::StreamEnd { id, total, digest }, session);
                    }
                    Err(e) => self.abort_outgoing(MessageType::StreamEnd, e.to_string()),
                }
                return;
            }
            if self.bye_queued {
                // Nothing follows BYE (`may_send` counts it when a frame is refused).
                return;
            }
            let Some((offset, len)) = out.sender.take_chunk(STREAM_CHUNK) else { return };
            // The bytes are read or made straight into the output queue, in the frame.
            let seq = self.seq;
            let pushed = self.out.push_encoded(|buf| {
                BulkHead::StreamData { id, offset }.encode_into(session, seq, len, buf, |bytes| {
                    match &out.source {
                        OutSource::Pattern { seed } => pattern::fill(*seed, offset, bytes),
                        OutSource::File { file, path } => stream_dir::read_at(file, offset, bytes, path)?,
                    }
                    out.digest_sent(offset, bytes);
                    Ok::<(), StreamDirError>(())
                })
            });
            let queued = match self.settle(MessageType::StreamData, pushed) {
                Ok(queued) => queued,
                Err(e) => return self.abort_outgoing(MessageType::StreamData, e.to_string()),
            };
            if !queued {
                return self.abort_outgoing(MessageType::StreamData, "STREAM_DATA could not be queued".into());
            }
        }
    }

    /// The to-host stream cannot go on (its file failed): it is closed, and the host hears
    /// why in an ERROR (internal) about `kind`, so that it fails the transfer instead of
    /// waiting for data that never comes.
    fn abort_outgoing(&mut self, kind: MessageType, why: String) {
        let Some(out) = self.acked.outgoing.take() else { return };
        let id = out.sender.id();
        log::error!("port {}: stream {id:#x}: {why}; the stream is closed", self.name);
        self.counters.errors_sent += 1;
        let text = format!("to-host stream {id:#x} closed: {why}");
        let error = Message::Error { code: error_code::INTERNAL, text, about_kind: kind as u8, about_seq: 0 };
        self.send(&error, out.session);
    }

    /// A session ended: its open streams are closed (their files stay; the next STREAM_OPEN
    /// resumes them).
    pub(super) fn close_acked_streams(&mut self) {
        if let Some(inc) = self.acked.incoming.take() {
            log::info!(
                "port {}: to-guest stream {:#x} into {:?} paused at {} of {}: the session ended",
                self.name,
                inc.receiver.id(),
                inc.name,
                inc.receiver.offset(),
                inc.receiver.total()
            );
        }
        if let Some(out) = self.acked.outgoing.take() {
            log::info!(
                "port {}: to-host stream {:#x} paused at {} acknowledged of {}: the session ended",
                self.name,
                out.sender.id(),
                out.sender.acked(),
                out.sender.total()
            );
        }
    }
}
