//! A bounded ring of a port's life-cycle transitions.
//!
//! Every record carries a sequence number that keeps counting when old records fall out, so a
//! later EVENTS request can ask "everything since N" and learn from [`History::first_seq`]
//! whether records were lost in between.

use std::collections::VecDeque;
use vport_common::{PortEvent, Transition};

/// The default number of records kept per port.
pub const DEFAULT_CAPACITY: usize = 256;

/// One recorded transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Position in the port's history, from 0, never reused.
    pub seq: u64,
    /// The transition (states and monotonic time).
    pub transition: Transition,
    /// The event that caused it.
    pub event: PortEvent,
    /// What the agent observed (`"poll: POLLHUP clear"`, `"read returned 0"`, ...).
    pub cause: &'static str,
    /// The agent's wakeup counter (returns from `epoll_wait`) when the transition was applied.
    pub wakeups: u64,
    /// The agent's CPU time (user + system, nanoseconds) when the transition was applied.
    pub cpu_ns: u64,
}

/// The ring.
#[derive(Debug, Clone)]
pub struct History {
    records: VecDeque<Record>,
    capacity: usize,
    next_seq: u64,
}

impl History {
    /// A ring keeping the last `capacity` records (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        History { records: VecDeque::with_capacity(capacity), capacity, next_seq: 0 }
    }

    /// Appends a record, evicting the oldest when full; returns its sequence number.
    /// `wakeups` and `cpu_ns` are the agent's counters at the transition.
    pub fn push(
        &mut self,
        transition: Transition,
        event: PortEvent,
        cause: &'static str,
        wakeups: u64,
        cpu_ns: u64,
    ) -> u64 {
        if self.records.len() == self.capacity {
            self.records.pop_front();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.records.push_back(Record { seq, transition, event, cause, wakeups, cpu_ns });
        seq
    }

    /// Sequence number of the oldest record still held (== [`History::next_seq`] when empty).
    pub fn first_seq(&self) -> u64 {
        self.records.front().map_or(self.next_seq, |r| r.seq)
    }

    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Records with `seq >= from`, oldest first.
    pub fn since(&self, from: u64) -> impl Iterator<Item = &Record> {
        let skip = from.saturating_sub(self.first_seq()) as usize;
        self.records.iter().skip(skip)
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when nothing was recorded (or everything was evicted, which cannot happen).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vport_common::PortState;

    fn t(at: u64) -> Transition {
        Transition { from: PortState::Disconnected, to: PortState::Disconnected, at_ns: at }
    }

    #[test]
    fn ring_evicts_oldest_and_keeps_counting() {
        let mut h = History::new(3);
        for i in 0..5 {
            assert_eq!(h.push(t(i), PortEvent::Closed, "test", i * 2, i * 3), i);
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.first_seq(), 2);
        assert_eq!(h.next_seq(), 5);
        let since: Vec<u64> = h.since(0).map(|r| r.seq).collect();
        assert_eq!(since, vec![2, 3, 4]);
        let since: Vec<(u64, u64, u64)> = h.since(4).map(|r| (r.transition.at_ns, r.wakeups, r.cpu_ns)).collect();
        assert_eq!(since, vec![(4, 8, 12)]);
        assert_eq!(h.since(9).count(), 0);
    }
}
