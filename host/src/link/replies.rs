//! Matching the agent's replies to the requests that wait for them.
//!
//! Every request/reply exchange of the host (on a bare [`super::Link`] or in a
//! [`crate::session::Session`]) offers each received frame to [`Replies::offer`], which says
//! whether it is the awaited reply, an agent ERROR that fails the request, or something else.
//! ERRORs are matched by the type and sequence number they name (`about_kind`, `about_seq`):
//! an ERROR answering another frame never fails the request being waited for; a refused
//! GUEST_OP is filed under its op_id for its own wait; anything else is kept as an
//! [`AgentReport`] (at most [`MAX_AGENT_REPORTS`], oldest dropped first). GUEST_OP completions
//! that arrive while something else is awaited are kept for [`Replies::finished_guest_op`].

use super::types::{AgentReport, LinkError, Received, MAX_AGENT_REPORTS};
use std::collections::{HashMap, VecDeque};
use vport_common::message::{GuestOpDone, MessageType};
use vport_common::Message;

/// What a received frame means to the request being waited for.
#[derive(Debug)]
pub enum Offer<T> {
    /// The awaited reply, as the request's `pick` made it.
    Reply(T),
    /// An agent ERROR answering the request (or refusing the guest op awaited).
    Failed(LinkError),
    /// Anything else: filed, kept or skipped.
    Other,
}

/// The reply bookkeeping of one link. See the module docs.
#[derive(Debug)]
pub struct Replies {
    port: String,
    /// The op_id of the next GUEST_OP.
    next_op_id: u32,
    /// GUEST_OP completions received while waiting for something else.
    guest_ops_done: HashMap<u32, GuestOpDone>,
    /// Sequence number of each GUEST_OP request not completed yet -> its op_id.
    guest_op_seqs: HashMap<u32, u32>,
    /// GUEST_OP requests the agent refused (ERROR), by op_id.
    guest_ops_refused: HashMap<u32, AgentReport>,
    /// Agent ERRORs no waiting request took, newest last.
    reports: VecDeque<AgentReport>,
    /// Agent ERRORs filed as reports so far (including those dropped from `reports`).
    filed: u64,
}

impl Replies {
    /// Empty bookkeeping for port `port`.
    pub fn new(port: &str) -> Replies {
        Replies {
            port: port.into(),
            next_op_id: 1,
            guest_ops_done: HashMap::new(),
            guest_op_seqs: HashMap::new(),
            guest_ops_refused: HashMap::new(),
            reports: VecDeque::new(),
            filed: 0,
        }
    }

    /// The op_id for the next GUEST_OP (never 0).
    pub fn next_guest_op(&mut self) -> u32 {
        let id = self.next_op_id;
        self.next_op_id = self.next_op_id.wrapping_add(1).max(1);
        id
    }

    /// Records that guest op `op_id` was sent with sequence number `seq`.
    pub fn guest_op_sent(&mut self, seq: u32, op_id: u32) {
        self.guest_op_seqs.insert(seq, op_id);
    }

    /// The sequence number guest op `op_id` was sent with (`u32::MAX` if it is not pending).
    pub fn guest_op_seq(&self, op_id: u32) -> u32 {
        self.guest_op_seqs.iter().find(|(_, op)| **op == op_id).map_or(u32::MAX, |(s, _)| *s)
    }

    /// The result of guest op `op_id` if it already came (a completion or a refusal), taken.
    pub fn finished_guest_op(&mut self, op_id: u32) -> Option<Result<GuestOpDone, LinkError>> {
        if let Some(d) = self.guest_ops_done.remove(&op_id) {
            self.guest_op_seqs.retain(|_, op| *op != op_id);
            return Some(Ok(d));
        }
        let e = self.guest_ops_refused.remove(&op_id)?;
        Some(Err(LinkError::Agent { port: self.port.clone(), code: e.code, text: e.text }))
    }

    /// Agent ERRORs that no waiting request took, oldest first.
    pub fn reports(&self) -> impl Iterator<Item = &AgentReport> {
        self.reports.iter()
    }

    /// Takes the kept reports.
    pub fn take_reports(&mut self) -> Vec<AgentReport> {
        self.reports.drain(..).collect()
    }

    /// Agent ERRORs filed as reports so far.
    pub fn filed(&self) -> u64 {
        self.filed
    }

    /// Offers frame `r` to the request `request` (its type and sequence number), whose reply
    /// `pick` recognises; `what` names the reply in logs.
    pub fn offer<T>(
        &mut self,
        r: &Received,
        what: &str,
        request: (MessageType, u32),
        pick: &mut dyn FnMut(&Message) -> Option<T>,
    ) -> Offer<T> {
        match &r.message {
            Ok(Message::Error { code, about_kind, about_seq, text }) => {
                let report =
                    AgentReport { code: *code, about_kind: *about_kind, about_seq: *about_seq, text: text.clone() };
                if let Some(e) = self.file_error(report, request) {
                    return Offer::Failed(e);
                }
                match self.refused_guest_op(request) {
                    Some(e) => Offer::Failed(e),
                    None => Offer::Other,
                }
            }
            Ok(m) => match pick(m) {
                Some(v) => {
                    if let Message::GuestOpDone(d) = m {
                        self.guest_op_seqs.retain(|_, op| *op != d.op_id);
                    }
                    Offer::Reply(v)
                }
                None => {
                    if let Message::GuestOpDone(d) = m {
                        // Kept for its own wait: guest ops complete in any order.
                        self.guest_op_seqs.retain(|_, op| *op != d.op_id);
                        self.guest_ops_done.insert(d.op_id, d.clone());
                    } else {
                        log::debug!("port {}: skipping {:?} while waiting for {what}", self.port, m.kind());
                    }
                    Offer::Other
                }
            },
            Err(e) => {
                log::debug!("port {}: unparsable frame while waiting for {what}: {e}", self.port);
                Offer::Other
            }
        }
    }

    /// Files an agent ERROR that is not the answer to `request`: a GUEST_OP refusal under its
    /// op_id, anything else in the reports. Returns the error when it answers `request`.
    fn file_error(&mut self, e: AgentReport, request: (MessageType, u32)) -> Option<LinkError> {
        if e.about_kind == request.0 as u8 && e.about_seq == request.1 {
            return Some(LinkError::Agent { port: self.port.clone(), code: e.code, text: e.text });
        }
        if e.about_kind == MessageType::GuestOp as u8 {
            if let Some(op_id) = self.guest_op_seqs.remove(&e.about_seq) {
                self.guest_ops_refused.insert(op_id, e);
                return None;
            }
        }
        log::debug!(
            "port {}: agent error {} about type {:#04x} seq {}: {}",
            self.port,
            e.code,
            e.about_kind,
            e.about_seq,
            e.text
        );
        self.filed += 1;
        if self.reports.len() == MAX_AGENT_REPORTS {
            self.reports.pop_front();
        }
        self.reports.push_back(e);
        None
    }

    /// The refusal of the guest op awaited by `request`, if it was filed meanwhile.
    fn refused_guest_op(&mut self, request: (MessageType, u32)) -> Option<LinkError> {
        if request.0 != MessageType::GuestOp {
            return None;
        }
        let op_id = *self.guest_op_seqs.get(&request.1)?;
        let e = self.guest_ops_refused.remove(&op_id)?;
        Some(LinkError::Agent { port: self.port.clone(), code: e.code, text: e.text })
    }
}
