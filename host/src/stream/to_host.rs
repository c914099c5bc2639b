//! `vport recv`: a file of the guest's stream directory into a host file as an acknowledged
//! stream. The host is the receiver ([`Receiver`]): it stores in order into its part file
//! ([`PartFile`]), acknowledges, passes its offset in every STREAM_OPEN so the agent resends
//! exactly what the host lacks, and renames the part file into place once the digest matches.
//!
//! A destination that is already there (and no part file) may hold the stream whole: the
//! transfer ran to its end before and is run again, or the guest was rewound (a saved state
//! restored a second time) and offers again what the host already has. The host then opens the
//! stream at the destination's length; if the guest's file has that length, the agent sends
//! only STREAM_END and the host compares the digests: equal, nothing is received again. Any
//! other destination is received afresh into the part file and replaced once verified.

use super::part::PartFile;
use super::{
    classify, obey, receive, stream_id, Control, Incoming, SessionOutcome, StreamSide, TransferError, TransferEvent,
    TransferOptions, TransferReport,
};
use crate::client::AgentClient;
use crate::session::{Session, SessionError};
use std::path::Path;
use std::time::{Duration, Instant};
use vport_common::message::{error_code, StreamDirection};
use vport_common::stream::{DataVerdict, Receiver};
use vport_common::Message;

/// How long the receiver waits for data before it sends the acknowledgement it holds back.
const ACK_IDLE: Duration = Duration::from_millis(50);

/// A guest file on its way to the host.
pub struct ToHost {
    port: String,
    id: u64,
    name: String,
    /// For a pattern stream (`name` empty): the seed and length asked for.
    pattern: Option<(u64, u64)>,
    part: Option<PartFile>,
    /// The destination, absolute.
    dest: std::path::PathBuf,
    /// The length of a destination that was already there with no part file: it may hold
    /// this stream whole (see the module's doc). `None` once the agent's answer showed it does
    /// not (the stream is then received into the part file).
    existing: Option<u64>,
    receiver: Option<Receiver>,
    total: u64,
    opts: TransferOptions,
    started_at: Option<u64>,
    duplicates: u64,
    interruptions: u64,
}

impl ToHost {
    /// Prepares the stream of the guest's `name` into `dest`; the stream id is derived from
    /// both, so the same transfer run again resumes from the part file beside `dest`.
    pub fn new(port: &str, name: &str, dest: &Path, opts: TransferOptions) -> Result<ToHost, TransferError> {
        let absolute = std::path::absolute(dest).map_err(|source| TransferError::File {
            op: "cannot resolve",
            path: dest.to_owned(),
            source,
        })?;
        let id = stream_id(&[b"to-host", name.as_bytes(), absolute.as_os_str().as_encoded_bytes()]);
        Self::with_id(port, id, name, None, &absolute, opts)
    }

    /// Prepares a stream of `total` bytes of the agent's pattern of `seed` (no guest file: it
    /// survives a guest that is reset or rebooted, whose stream directory may be gone) into
    /// `dest`; like [`ToHost::new`], the same transfer run again resumes.
    pub fn pattern(
        port: &str,
        seed: u64,
        total: u64,
        dest: &Path,
        opts: TransferOptions,
    ) -> Result<ToHost, TransferError> {
        let absolute = std::path::absolute(dest).map_err(|source| TransferError::File {
            op: "cannot resolve",
            path: dest.to_owned(),
            source,
        })?;
        let id = stream_id(&[
            b"to-host pattern",
            &seed.to_le_bytes(),
            &total.to_le_bytes(),
            absolute.as_os_str().as_encoded_bytes(),
        ]);
        Self::with_id(port, id, "", Some((seed, total)), &absolute, opts)
    }

    fn with_id(
        port: &str,
        id: u64,
        name: &str,
        pattern: Option<(u64, u64)>,
        absolute: &Path,
        opts: TransferOptions,
    ) -> Result<ToHost, TransferError> {
        let part = PartFile::open(absolute, id)?;
        let existing = if part.is_empty() {
            // Never through a symlink: the rename at the end replaces the link, not its target.
            std::fs::symlink_metadata(absolute).ok().filter(|m| m.is_file() && m.len() > 0).map(|m| m.len())
        } else {
            None
        };
        Ok(ToHost {
            port: port.to_owned(),
            id,
            name: name.to_owned(),
            pattern,
            part: Some(part),
            dest: absolute.to_owned(),
            existing,
            receiver: None,
            total: 0,
            opts,
            started_at: None,
            duplicates: 0,
            interruptions: 0,
        })
    }

    /// The stream id.
    pub fn id(&self) -> u64 {
        self.id
    }

    fn protocol(&self, detail: String) -> TransferError {
        TransferError::Protocol { port: self.port.clone(), id: self.id, detail }
    }

    fn interrupted(&mut self, reason: String) -> SessionOutcome {
        self.interruptions += 1;
        if let Some(r) = self.receiver.take() {
            self.duplicates += r.stats().duplicate_bytes;
        }
        SessionOutcome::Interrupted(reason)
    }

    fn part(&mut self) -> Result<&mut PartFile, TransferError> {
        let id = self.id;
        self.part.as_mut().ok_or_else(|| TransferError::Protocol {
            port: self.port.clone(),
            id,
            detail: "the part file is already closed".into(),
        })
    }

    /// STREAM_OPEN with the part file's length (or an existing destination's), answered by
    /// STREAM_ACCEPT. An existing destination the answer shows not to be this stream's whole
    /// file is given up at once and the stream opened again from the part file.
    fn open(&mut self, session: &mut Session) -> Result<Result<(), String>, TransferError> {
        loop {
            let id = self.id;
            let offset = match self.existing {
                Some(len) => len,
                None => self.part()?.len(),
            };
            let (seed, total) = self.pattern.unwrap_or((0, 0));
            let open = Message::StreamOpen {
                id,
                direction: StreamDirection::ToHost,
                name: self.name.clone(),
                seed,
                total,
                offset,
                window: self.opts.window,
            };
            let accepted = session.request(&open, self.opts.stall_timeout, "STREAM_ACCEPT", |m| match m {
                Message::StreamAccept { id: i, offset, total, .. } if *i == id => Some((*offset, *total)),
                _ => None,
            });
            let (start, total) = match accepted {
                Ok(((start, total), _)) => (start, total),
                Err(SessionError::Agent { code: error_code::BAD_STATE, .. }) if self.existing.is_some() => {
                    self.give_up_existing("is longer than the guest's file");
                    continue;
                }
                Err(SessionError::Agent { code: error_code::BAD_STATE, text, .. }) if offset > 0 => {
                    // The guest's file is shorter than what the part file holds: another file
                    // under the same name. Start again from 0, in the next session.
                    let path = self.part()?.path().display().to_string();
                    log::warn!("port {}: {text}; {path} is started again from 0", self.port);
                    self.part()?.truncate()?;
                    return Ok(Err(format!("{path} was longer than the guest's file ({text}): started again from 0")));
                }
                Err(e) => return classify(&self.port, e).map(Err),
            };
            if start != offset {
                return Err(self.protocol(format!("STREAM_ACCEPT starts at {start}, the host holds {offset}")));
            }
            if self.existing.is_some_and(|len| len != total) {
                // The agent's sender starts again at the part file's offset when asked: what
                // it sent from the destination's length meanwhile is not this request's reply.
                self.give_up_existing(&format!("has not the guest file's length ({total} bytes)"));
                continue;
            }
            self.total = total;
            self.receiver = Some(Receiver::new(id, total, offset).map_err(|e| self.protocol(e.to_string()))?);
            self.started_at.get_or_insert(offset);
            return Ok(Ok(()));
        }
    }

    /// The existing destination is not this stream's whole file (`why`): the stream is
    /// received into the part file, and the destination replaced once it is verified.
    fn give_up_existing(&mut self, why: &str) {
        if self.existing.take().is_some() {
            self.started_at = None;
            log::info!(
                "port {}: {} {why}: the stream is received again and replaces it once verified",
                self.port,
                self.dest.display()
            );
        }
    }

    /// STREAM_END: the part file's digest against the sender's; kept (renamed into place)
    /// before STREAM_DONE says so, discarded otherwise. `None` when an existing destination
    /// turned out not to hold the stream: it is then opened again, from the part file.
    fn end(&mut self, session: &mut Session, total: u64, digest: u64) -> Result<Option<SessionOutcome>, TransferError> {
        let id = self.id;
        let stored = self.receiver.as_ref().map_or(0, |r| r.offset());
        if total != self.total || stored != total {
            return Err(
                self.protocol(format!("STREAM_END of {total} bytes, but {stored} of {} are stored", self.total))
            );
        }
        if self.existing.is_some() {
            return self.end_existing(session, digest);
        }
        let got = self.part()?.digest()?;
        let ok = got.bytes() == total && got.digest() == digest;
        let Some(part) = self.part.take() else { return Err(self.protocol("the part file is gone".into())) };
        if ok {
            part.finish()?;
        } else {
            part.discard()?;
        }
        self.done(session, got.bytes(), got.digest(), ok);
        if !ok {
            return Err(TransferError::DigestMismatch {
                port: self.port.clone(),
                id,
                bytes: got.bytes(),
                expected: digest,
                got: got.digest(),
            });
        }
        Ok(Some(self.finished(digest)))
    }

    /// STREAM_END of a stream opened at an existing destination's length: the destination's
    /// digest against the sender's. Equal, the destination is the stream whole and nothing was
    /// received again (the empty part file goes); otherwise STREAM_DONE says not `ok` and the
    /// stream is received afresh.
    fn end_existing(&mut self, session: &mut Session, digest: u64) -> Result<Option<SessionOutcome>, TransferError> {
        let got = std::fs::File::open(&self.dest)
            .map_err(|source| TransferError::File { op: "cannot open", path: self.dest.clone(), source })
            .and_then(|mut f| super::part::digest_reader(&mut f, &self.dest))?;
        let ok = got.bytes() == self.total && got.digest() == digest;
        self.done(session, got.bytes(), got.digest(), ok);
        if !ok {
            self.give_up_existing("has the guest file's length but not its digest");
            return Ok(None);
        }
        let Some(part) = self.part.take() else { return Err(self.protocol("the part file is gone".into())) };
        part.discard()?;
        log::info!(
            "port {}: {} already holds the stream whole: nothing received again",
            self.port,
            self.dest.display()
        );
        Ok(Some(self.finished(digest)))
    }

    /// STREAM_DONE to the agent; the stream is settled here whether or not it goes out.
    fn done(&self, session: &mut Session, bytes: u64, digest: u64, ok: bool) {
        if let Err(e) = session.send(&Message::StreamDone { id: self.id, bytes, digest, ok }) {
            // The agent closes its side when the session ends.
            log::info!("port {}: STREAM_DONE not sent ({e}); the stream is settled here", self.port);
        }
    }

    fn finished(&self, digest: u64) -> SessionOutcome {
        let duplicates = self.duplicates + self.receiver.as_ref().map_or(0, |r| r.stats().duplicate_bytes);
        SessionOutcome::Finished(TransferReport {
            id: self.id,
            bytes: self.total,
            digest,
            sessions: 0,
            interruptions: self.interruptions,
            resent: 0,
            duplicates,
            started_at: self.started_at.unwrap_or(0),
            elapsed: Default::default(),
        })
    }

    /// STREAM_DATA: stored in order, acknowledged; `Some(acked)` when an acknowledgement went out.
    fn data(
        &mut self,
        session: &mut Session,
        offset: u64,
        bytes: &[u8],
    ) -> Result<Result<Option<u64>, String>, TransferError> {
        let Some(receiver) = self.receiver.as_mut() else { return Ok(Ok(None)) };
        let verdict = receiver.on_data(offset, bytes.len()).map_err(|e| e.to_string());
        let skip = match verdict {
            Ok(DataVerdict::Store { skip }) => skip,
            Ok(DataVerdict::Duplicate) => return Ok(Ok(None)),
            Err(e) => return Err(self.protocol(e)),
        };
        self.part()?.append(&bytes[skip..])?;
        let ack = self.receiver.as_mut().and_then(|r| r.stored((bytes.len() - skip) as u64));
        self.send_ack(session, ack)
    }

    fn send_ack(
        &mut self,
        session: &mut Session,
        ack: Option<u64>,
    ) -> Result<Result<Option<u64>, String>, TransferError> {
        let Some(offset) = ack else { return Ok(Ok(None)) };
        match session.send(&Message::StreamAck { id: self.id, offset }) {
            Ok(()) => Ok(Ok(Some(offset))),
            Err(e) => classify(&self.port, e).map(Err),
        }
    }
}

impl StreamSide for ToHost {
    fn port(&self) -> &str {
        &self.port
    }

    fn options(&self) -> &TransferOptions {
        &self.opts
    }

    fn progress(&self) -> (u64, u64) {
        (self.receiver.as_ref().map_or_else(|| self.part.as_ref().map_or(0, |p| p.len()), |r| r.offset()), self.total)
    }

    fn in_session(
        &mut self,
        session: &mut Session,
        hook: &mut dyn FnMut(&TransferEvent) -> Control,
    ) -> Result<SessionOutcome, TransferError> {
        if let Err(reason) = self.open(session)? {
            return Ok(self.interrupted(reason));
        }
        let (id, total) = (self.id, self.total);
        if let Some(reason) = obey(hook(&TransferEvent::Accepted { offset: self.progress().0, total }), session) {
            return Ok(self.interrupted(reason));
        }
        let mut last_progress = Instant::now();
        loop {
            let message = match receive(session, ACK_IDLE, &self.port, id)? {
                Incoming::Message(m) => m,
                Incoming::Idle => {
                    // Idle: the acknowledgement held back goes out now.
                    let ack = self.receiver.as_mut().and_then(|r| r.flush_ack());
                    match self.send_ack(session, ack)? {
                        Ok(Some(_)) => last_progress = Instant::now(),
                        Ok(None) => {}
                        Err(reason) => return Ok(self.interrupted(reason)),
                    }
                    if last_progress.elapsed() >= self.opts.stall_timeout {
                        let reason = format!("no data within {:?}: the session stalled", self.opts.stall_timeout);
                        return Ok(self.interrupted(reason));
                    }
                    continue;
                }
                Incoming::Over(reason) => return Ok(self.interrupted(reason)),
            };
            match message {
                Message::StreamData { id: i, offset, bytes } if i == id => {
                    last_progress = Instant::now();
                    match self.data(session, offset, &bytes)? {
                        Ok(Some(acked)) => {
                            if let Some(reason) = obey(hook(&TransferEvent::Progress { acked, total }), session) {
                                return Ok(self.interrupted(reason));
                            }
                        }
                        Ok(None) => {}
                        Err(reason) => return Ok(self.interrupted(reason)),
                    }
                }
                Message::StreamEnd { id: i, total, digest } if i == id => match self.end(session, total, digest)? {
                    Some(outcome) => return Ok(outcome),
                    None => {
                        // The existing destination was another file: the stream from 0.
                        if let Err(reason) = self.open(session)? {
                            return Ok(self.interrupted(reason));
                        }
                        last_progress = Instant::now();
                    }
                },
                other => log::debug!("port {}: {:?} ignored during the stream", self.port, other.kind()),
            }
        }
    }
}
