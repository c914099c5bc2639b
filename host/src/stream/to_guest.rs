//! `vport send`: a host file into the guest's stream directory as an acknowledged stream. The
//! host is the sender ([`Sender`]): it keeps at most a window of bytes unacknowledged, sends
//! again from the agent's offset in every new session, and ends with the file's digest, which
//! the agent checks before it renames its part file into place.

use super::{
    classify, obey, receive, stream_id, Control, Incoming, SessionOutcome, StreamSide, TransferError, TransferEvent,
    TransferOptions, TransferReport, HOST_CHUNK,
};
use crate::client::AgentClient;
use crate::session::Session;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vport_common::message::StreamDirection;
use vport_common::stream::{Sender, SenderInput, SenderState};
use vport_common::Message;

/// A host file on its way into the guest.
pub struct ToGuest {
    port: String,
    name: String,
    path: PathBuf,
    file: File,
    digest: u64,
    sender: Sender,
    opts: TransferOptions,
    end_sent: bool,
    started_at: Option<u64>,
}

impl ToGuest {
    /// Prepares the stream of `local` into the guest's stream directory as `name`: reads the
    /// file once for its digest (which, with the name and size, is the stream id: the same
    /// transfer run again resumes).
    pub fn new(port: &str, local: &Path, name: &str, opts: TransferOptions) -> Result<ToGuest, TransferError> {
        let err = |op: &'static str| move |source| TransferError::File { op, path: local.to_owned(), source };
        let mut file = File::open(local).map_err(err("cannot open"))?;
        let meta = file.metadata().map_err(err("cannot stat"))?;
        if !meta.is_file() {
            let source = std::io::Error::other("not a regular file");
            return Err(TransferError::File { op: "cannot send", path: local.to_owned(), source });
        }
        let digest = super::part::digest_reader(&mut file, local)?;
        let total = digest.bytes();
        let id = stream_id(&[b"to-guest", name.as_bytes(), &total.to_le_bytes(), &digest.digest().to_le_bytes()]);
        Ok(ToGuest {
            port: port.to_owned(),
            name: name.to_owned(),
            path: local.to_owned(),
            file,
            digest: digest.digest(),
            sender: Sender::new(id, total, opts.window),
            opts,
            end_sent: false,
            started_at: None,
        })
    }

    /// The stream id.
    pub fn id(&self) -> u64 {
        self.sender.id()
    }

    fn interrupted(&mut self, reason: String) -> SessionOutcome {
        // Counts what was in flight; the next STREAM_ACCEPT says where to start again.
        if let Err(e) = self.sender.on(SenderInput::Interrupted) {
            log::debug!("port {}: {e}", self.port);
        }
        SessionOutcome::Interrupted(reason)
    }

    fn protocol(&self, detail: String) -> TransferError {
        TransferError::Protocol { port: self.port.clone(), id: self.sender.id(), detail }
    }

    /// STREAM_OPEN, answered by STREAM_ACCEPT: where to start.
    fn open(&mut self, session: &mut Session) -> Result<Result<(), String>, TransferError> {
        let id = self.sender.id();
        let open = Message::StreamOpen {
            id,
            direction: StreamDirection::ToGuest,
            name: self.name.clone(),
            seed: 0,
            total: self.sender.total(),
            offset: 0,
            window: self.opts.window,
        };
        let accepted = session.request(&open, self.opts.stall_timeout, "STREAM_ACCEPT", |m| match m {
            Message::StreamAccept { id: i, offset, total, window } if *i == id => Some((*offset, *total, *window)),
            _ => None,
        });
        let (offset, total, window) = match accepted {
            Ok(((offset, total, window), _)) => (offset, total, window),
            Err(e) => return classify(&self.port, e).map(Err),
        };
        if total != self.sender.total() {
            return Err(
                self.protocol(format!("STREAM_ACCEPT says {total} bytes, the file has {}", self.sender.total()))
            );
        }
        self.sender.set_window(window);
        self.sender.on(SenderInput::Accepted { offset }).map_err(|e| self.protocol(e.to_string()))?;
        self.started_at.get_or_insert(offset);
        self.end_sent = false;
        Ok(Ok(()))
    }

    /// Sends what the window allows, then STREAM_END once everything is acknowledged.
    fn send_some(&mut self, session: &mut Session) -> Result<Result<(), String>, TransferError> {
        let id = self.sender.id();
        while let Some((offset, len)) = self.sender.take_chunk(HOST_CHUNK) {
            let mut bytes = vec![0u8; len];
            self.file.read_exact_at(&mut bytes, offset).map_err(|source| TransferError::File {
                op: "cannot read",
                path: self.path.clone(),
                source,
            })?;
            if let Err(e) = session.send(&Message::StreamData { id, offset, bytes }) {
                return classify(&self.port, e).map(Err);
            }
        }
        if self.sender.state() == SenderState::Ending && !self.end_sent {
            let end = Message::StreamEnd { id, total: self.sender.total(), digest: self.digest };
            if let Err(e) = session.send(&end) {
                return classify(&self.port, e).map(Err);
            }
            self.end_sent = true;
        }
        Ok(Ok(()))
    }
}

impl StreamSide for ToGuest {
    fn port(&self) -> &str {
        &self.port
    }

    fn options(&self) -> &TransferOptions {
        &self.opts
    }

    fn progress(&self) -> (u64, u64) {
        (self.sender.acked(), self.sender.total())
    }

    fn in_session(
        &mut self,
        session: &mut Session,
        hook: &mut dyn FnMut(&TransferEvent) -> Control,
    ) -> Result<SessionOutcome, TransferError> {
        if let Err(reason) = self.open(session)? {
            return Ok(self.interrupted(reason));
        }
        let total = self.sender.total();
        if let Some(reason) = obey(hook(&TransferEvent::Accepted { offset: self.sender.acked(), total }), session) {
            return Ok(self.interrupted(reason));
        }
        let id = self.sender.id();
        loop {
            if let Err(reason) = self.send_some(session)? {
                return Ok(self.interrupted(reason));
            }
            let message = match receive(session, self.opts.stall_timeout, &self.port, id)? {
                Incoming::Message(m) => m,
                Incoming::Idle => {
                    let reason =
                        format!("no acknowledgement within {:?}: the session stalled", self.opts.stall_timeout);
                    return Ok(self.interrupted(reason));
                }
                Incoming::Over(reason) => return Ok(self.interrupted(reason)),
            };
            match message {
                Message::StreamAck { id: i, offset } if i == id => {
                    let before = self.sender.acked();
                    self.sender.on(SenderInput::Ack { offset }).map_err(|e| self.protocol(e.to_string()))?;
                    let acked = self.sender.acked();
                    if acked > before {
                        if let Some(reason) = obey(hook(&TransferEvent::Progress { acked, total }), session) {
                            return Ok(self.interrupted(reason));
                        }
                    }
                }
                Message::StreamDone { id: i, bytes, digest, ok } if i == id => {
                    if !ok || bytes != total || digest != self.digest {
                        let expected = self.digest;
                        return Err(TransferError::DigestMismatch {
                            port: self.port.clone(),
                            id,
                            bytes,
                            expected,
                            got: digest,
                        });
                    }
                    self.sender.on(SenderInput::Done { ok }).map_err(|e| self.protocol(e.to_string()))?;
                    let stats = self.sender.stats();
                    return Ok(SessionOutcome::Finished(TransferReport {
                        id,
                        bytes: total,
                        digest,
                        sessions: 0,
                        interruptions: stats.interruptions,
                        resent: stats.unacked_at_interrupt,
                        duplicates: 0,
                        started_at: self.started_at.unwrap_or(0),
                        elapsed: Default::default(),
                    }));
                }
                other => log::debug!("port {}: {:?} ignored during the stream", self.port, other.kind()),
            }
        }
    }
}
