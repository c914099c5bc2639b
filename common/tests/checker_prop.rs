//! Properties of the checker: every trace a correct model produces passes; a duplicate OPENED
//! inserted anywhere into such a trace is caught and named.

use proptest::prelude::*;
use vport_common::checker::{check, NoteKind, Rule};
use vport_common::trace::{Direction, Kind, Record};
use vport_common::Phase;

const P: &str = "org.vport.0";

#[derive(Debug, Clone, Copy, PartialEq)]
enum S {
    Disconnected,
    Connected(u32, u64),
    Ready(u32, u64),
}

/// A correct host, agent and QEMU, run by a list of action numbers.
struct Model {
    host: bool,
    guest_open: bool,
    state: S,
    next_session: u32,
    t_ns: u64,
    agent_seq: u64,
    trace: Vec<(u64, Kind)>,
    agent_pending: Vec<(u64, Kind)>,
}

impl Model {
    fn new() -> Model {
        Model {
            host: false,
            guest_open: false,
            state: S::Disconnected,
            next_session: 1,
            t_ns: 0,
            agent_seq: 0,
            trace: vec![],
            agent_pending: vec![],
        }
    }

    fn emit(&mut self, kind: Kind) {
        self.t_ns += 1_000;
        self.trace.push((self.t_ns, kind));
    }

    fn code(s: S) -> Phase {
        match s {
            S::Disconnected => Phase::Disconnected,
            S::Connected(..) => Phase::Connected,
            S::Ready(..) => Phase::Ready,
        }
    }

    /// The agent's state change, recorded by the agent (fetched later).
    fn agent_to(&mut self, to: S) {
        let session = match to {
            S::Disconnected => 0,
            S::Connected(s, _) | S::Ready(s, _) => s,
        };
        let kind = Kind::AgentTransition {
            from: Self::code(self.state),
            to: Self::code(to),
            session,
            cause: "model".into(),
            agent_time_ns: self.t_ns,
            agent_seq: self.agent_seq,
        };
        self.agent_seq += 1;
        self.agent_pending.push((self.t_ns, kind));
        self.state = to;
    }

    fn new_session(&mut self) {
        let session = self.next_session;
        self.next_session += 1;
        let nonce = u64::from(session) * 7919;
        self.emit(Kind::Hello { session, nonce });
        self.agent_to(S::Connected(session, nonce));
    }

    fn guest_level_changed(&mut self) {
        // QEMU without throttling; the throttle's repeats are added by action 8.
        self.emit(Kind::VserportChange { id: "vport0".into(), open: self.guest_open });
    }

    fn act(&mut self, action: u8, arg: u32) {
        self.t_ns += u64::from(arg % 2_000) * 1_000_000;
        match action {
            0 if !self.host => {
                self.emit(Kind::HostConnect);
                self.host = true;
                if self.guest_open {
                    self.new_session();
                }
            }
            1 if self.host => {
                self.emit(Kind::HostDisconnect { reason: "model".into() });
                self.host = false;
                if self.state != S::Disconnected {
                    self.agent_to(S::Disconnected);
                }
            }
            2 if self.host => {
                self.emit(Kind::HelloRequest);
                match self.state {
                    S::Connected(session, nonce) => self.emit(Kind::Hello { session, nonce }),
                    S::Ready(..) => self.new_session(),
                    S::Disconnected => {}
                }
            }
            3 => {
                if let S::Connected(session, nonce) = self.state {
                    self.emit(Kind::HelloAck { session, nonce });
                    self.agent_to(S::Ready(session, nonce));
                }
            }
            4 => {
                if let S::Ready(session, _) = self.state {
                    let dir = if arg & 1 == 0 { Direction::HostToGuest } else { Direction::GuestToHost };
                    self.emit(Kind::Data { dir, bytes: u64::from(arg), session });
                }
            }
            5 if self.guest_open => {
                if let S::Connected(session, _) | S::Ready(session, _) = self.state {
                    self.emit(Kind::Bye { session, reopen_after_ms: None, reason: "model".into() });
                    self.agent_to(S::Disconnected);
                }
                self.guest_open = false;
                self.guest_level_changed();
            }
            6 if !self.guest_open => {
                self.guest_open = true;
                self.guest_level_changed();
                if self.host {
                    self.new_session();
                }
            }
            7 => self.emit(Kind::FrontendOpen { open: self.guest_open }),
            8 => self.emit(Kind::VserportChange { id: "vport0".into(), open: self.guest_open }),
            9 => {
                let batch = std::mem::take(&mut self.agent_pending);
                self.trace.extend(batch);
            }
            _ => {}
        }
    }

    fn finish(mut self) -> Vec<Record> {
        self.act(9, 0);
        self.trace
            .into_iter()
            .enumerate()
            .map(|(i, (t_ns, kind))| Record {
                seq: i as u64,
                t_ns,
                port: P.into(),
                source: kind.default_source(),
                kind,
            })
            .collect()
    }
}

fn run(actions: &[(u8, u32)]) -> Vec<Record> {
    let mut m = Model::new();
    for (a, arg) in actions {
        m.act(*a, *arg);
    }
    m.finish()
}

fn actions() -> impl Strategy<Value = Vec<(u8, u32)>> {
    proptest::collection::vec((0u8..10, any::<u32>()), 0..200)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_legal_walk_passes(actions in actions()) {
        let trace = run(&actions);
        let report = check(&trace);
        prop_assert!(report.is_clean(), "{:#?}\n{:#?}", report.violations, trace);
        for n in &report.notes {
            prop_assert_eq!(n.kind, NoteKind::CoalescedVserportChange, "{}", n);
        }
    }

    #[test]
    fn a_duplicate_connect_is_always_caught(actions in actions(), pick in any::<prop::sample::Index>()) {
        let trace = run(&actions);
        let connects: Vec<usize> =
            trace.iter().enumerate().filter(|(_, r)| r.kind == Kind::HostConnect).map(|(i, _)| i).collect();
        prop_assume!(!connects.is_empty());
        let at = connects[pick.index(connects.len())];
        let mut bad = trace.clone();
        let mut dup = bad[at].clone();
        dup.t_ns += 1;
        bad.insert(at + 1, dup);
        for (i, r) in bad.iter_mut().enumerate() {
            r.seq = i as u64;
        }
        let report = check(&bad);
        let dups: Vec<_> = report.of_rule(Rule::DuplicateOpened).collect();
        prop_assert_eq!(dups.len(), 1, "{:#?}", report.violations);
        prop_assert_eq!(&dups[0].records, &vec![at as u64, at as u64 + 1]);
    }
}
