//! The server machine's tests: the whole transition table, and the session guarantees over
//! arbitrary input sequences.

use super::*;
use proptest::prelude::*;
use Action::{Disconnect, End, RequestHello, Yield};
use EndReason::{AgentBye, GuestClosed, GuestReset, HostClosed, Migrated, Unplugged, VmExited, VmStopped};
use Input as I;
use ServerState as S;

const A: SessionId = SessionId { session: 0xA, nonce: 1 };
const B: SessionId = SessionId { session: 0xB, nonce: 2 };
/// Session A's id with another nonce.
const A2: SessionId = SessionId { session: 0xA, nonce: 9 };

/// One sample of every input; `input_index` (a match with no wildcard) fails to compile when
/// an input is added, so the table below cannot silently miss it.
fn inputs() -> Vec<Input> {
    vec![
        I::HostConnected,
        I::Hello(A),
        I::Hello(B),
        I::Hello(A2),
        I::Bye,
        I::BadSession,
        I::FrontendOpen(true),
        I::FrontendOpen(false),
        I::DeviceDeleted,
        I::VmStopped,
        I::Migrated,
        I::VmExited,
        I::GuestReset,
        I::ConnectionLost,
        I::HostClose,
        I::ProtocolError("x".into()),
    ]
}

fn input_index(i: &Input) -> usize {
    match i {
        I::HostConnected => 0,
        I::Hello(_) => 1,
        I::Bye => 2,
        I::BadSession => 3,
        I::FrontendOpen(_) => 4,
        I::DeviceDeleted => 5,
        I::VmStopped => 6,
        I::Migrated => 7,
        I::VmExited => 8,
        I::GuestReset => 9,
        I::ConnectionLost => 10,
        I::HostClose => 11,
        I::ProtocolError(_) => 12,
    }
}

/// One sample of every state (CONNECTED with and without a last session).
fn states() -> Vec<ServerState> {
    vec![
        S::Idle,
        S::Connected { last: None },
        S::Connected { last: Some(A) },
        S::Ready { id: A },
        S::Closed { reason: Unplugged },
    ]
}

fn state_index(s: &ServerState) -> usize {
    match s {
        S::Idle => 0,
        S::Connected { .. } => 1,
        S::Ready { .. } => 2,
        S::Closed { .. } => 3,
    }
}

type Outcome = Result<(ServerState, Vec<Action>), ServerError>;

#[test]
fn every_input_in_every_state_has_a_defined_result() {
    let mut seen_inputs: Vec<usize> = inputs().iter().map(input_index).collect();
    seen_inputs.dedup();
    assert_eq!(seen_inputs, (0..13).collect::<Vec<_>>(), "a sample of every input, in order");
    let mut seen_states: Vec<usize> = states().iter().map(state_index).collect();
    seen_states.dedup();
    assert_eq!(seen_states, (0..4).collect::<Vec<_>>(), "a sample of every state, in order");

    let go = |s: ServerState, a: Vec<Action>| -> Outcome { Ok((s, a)) };
    let stay = |s: &ServerState| -> Outcome { Ok((s.clone(), vec![])) };
    let none = |i: usize| -> Outcome { Err(ServerError::NoConnection { input: inputs()[i].clone() }) };
    let again = |i: usize, state: &'static str| -> Outcome {
        Err(ServerError::AlreadyConnected { input: inputs()[i].clone(), state })
    };
    let closed = |i: usize| -> Outcome { Err(ServerError::Closed { input: inputs()[i].clone(), reason: Unplugged }) };
    let [idle, fresh, after_a, ready_a, gone] = <[ServerState; 5]>::try_from(states()).unwrap();
    let conn_a = S::Connected { last: Some(A) };
    let mismatch = "hello for session 0x0000000a with nonce 0x9, the session's is 0x1".to_string();
    let connected_row = |s: &ServerState, hello_a: Outcome| -> Vec<Outcome> {
        vec![
            again(0, "CONNECTED"),
            hello_a,
            go(S::Ready { id: B }, vec![Yield(B)]),
            go(S::Ready { id: A2 }, vec![Yield(A2)]),
            stay(s),
            go(s.clone(), vec![RequestHello]),
            stay(s),
            stay(s),
            go(S::Closed { reason: Unplugged }, vec![Disconnect]),
            stay(s),
            stay(s),
            go(S::Closed { reason: VmExited }, vec![Disconnect]),
            stay(s),
            go(S::Idle, vec![Disconnect]),
            go(S::Idle, vec![Disconnect]),
            go(S::Idle, vec![Disconnect]),
        ]
    };
    #[rustfmt::skip]
    let expected: Vec<Vec<Outcome>> = vec![
        // IDLE: HostConnected, Hello A, B, A2, Bye, BadSession, FO true, FO false, DeviceDeleted,
        // VmStopped, Migrated, VmExited, GuestReset, ConnectionLost, HostClose, ProtocolError.
        vec![go(fresh.clone(), vec![]), none(1), none(2), none(3), none(4), none(5), stay(&idle), stay(&idle),
             go(S::Closed { reason: Unplugged }, vec![]), stay(&idle), stay(&idle),
             go(S::Closed { reason: VmExited }, vec![]), stay(&idle), none(13), none(14), none(15)],
        connected_row(&fresh, go(S::Ready { id: A }, vec![Yield(A)])),
        connected_row(&after_a, stay(&after_a)),
        // READY (session A).
        vec![again(0, "READY"), stay(&ready_a), go(conn_a.clone(), vec![End(GuestClosed), RequestHello]),
             go(S::Idle, vec![End(EndReason::ProtocolError(mismatch)), Disconnect]),
             go(conn_a.clone(), vec![End(AgentBye)]), go(conn_a.clone(), vec![End(GuestClosed), RequestHello]),
             stay(&ready_a), go(conn_a.clone(), vec![End(GuestClosed)]),
             go(S::Closed { reason: Unplugged }, vec![End(Unplugged), Disconnect]),
             go(conn_a.clone(), vec![End(VmStopped)]),
             go(conn_a.clone(), vec![End(Migrated)]),
             go(S::Closed { reason: VmExited }, vec![End(VmExited), Disconnect]),
             go(conn_a.clone(), vec![End(GuestReset)]), go(S::Idle, vec![End(EndReason::ConnectionLost), Disconnect]),
             go(S::Idle, vec![End(HostClosed), Disconnect]),
             go(S::Idle, vec![End(EndReason::ProtocolError("x".into())), Disconnect])],
        // CLOSED (unplugged).
        vec![closed(0), closed(1), closed(2), closed(3), closed(4), closed(5), stay(&gone), stay(&gone),
             stay(&gone), stay(&gone), stay(&gone), stay(&gone), stay(&gone), closed(13), closed(14), closed(15)],
    ];
    for (s, row) in states().iter().zip(&expected) {
        assert_eq!(row.len(), inputs().len(), "row of {s:?}");
        for (i, want) in inputs().iter().zip(row) {
            let mut m = ServerMachine { state: s.clone(), since_ns: 5 };
            let got = m.step(i, 9).map(|step| {
                assert_eq!((&step.from, step.at_ns), (s, 9));
                (step.to, step.actions)
            });
            assert_eq!(&got, want, "state {s:?} input {i:?}");
            match &got {
                Ok((to, _)) => {
                    assert_eq!(m.state(), to);
                    assert_eq!(m.since_ns(), if to == s { 5 } else { 9 }, "since_ns moves only on a change");
                }
                Err(e) => {
                    assert_eq!(m.state(), s, "an illegal input leaves the state unchanged");
                    assert!(e.to_string().contains(&i.to_string()), "{e} names the input");
                }
            }
        }
    }
}

#[test]
fn phases_and_names() {
    let got: Vec<(&str, Phase)> = states().iter().map(|s| (s.name(), s.phase())).collect();
    assert_eq!(
        got,
        [
            ("IDLE", Phase::Disconnected),
            ("CONNECTED", Phase::Connected),
            ("CONNECTED", Phase::Connected),
            ("READY", Phase::Ready),
            ("CLOSED", Phase::Disconnected)
        ]
    );
    let e = ServerError::Closed { input: I::Hello(A), reason: Unplugged };
    assert_eq!(
        e.to_string(),
        "hello of session 0x0000000a (nonce 0x1) after the server closed: the port was unplugged"
    );
}

fn any_input() -> impl Strategy<Value = Input> {
    let id = (0u32..3, 0u64..2).prop_map(|(session, nonce)| SessionId { session, nonce });
    prop_oneof![
        Just(I::HostConnected),
        id.prop_map(I::Hello),
        Just(I::Bye),
        Just(I::BadSession),
        any::<bool>().prop_map(I::FrontendOpen),
        Just(I::DeviceDeleted),
        Just(I::VmStopped),
        Just(I::Migrated),
        Just(I::VmExited),
        Just(I::GuestReset),
        Just(I::ConnectionLost),
        Just(I::HostClose),
        Just(I::ProtocolError("p".into())),
    ]
}

proptest! {
    /// Whatever happens: a session is live exactly in READY, each handed-out session ends at
    /// most once (and before the next is handed out), a yield comes only out of CONNECTED, and
    /// CLOSED is never left.
    #[test]
    fn sessions_end_exactly_once_and_closed_is_final(inputs in proptest::collection::vec(any_input(), 0..60)) {
        let mut m = ServerMachine::new();
        let mut live = 0i64;
        let mut connected = false;
        for (t, i) in inputs.iter().enumerate() {
            let before = m.state().clone();
            let Ok(step) = m.step(i, t as u64) else {
                prop_assert_eq!(m.state(), &before);
                continue;
            };
            for a in &step.actions {
                match a {
                    Yield(_) => {
                        prop_assert!(matches!(before, S::Connected { .. }), "yield out of {:?}", before);
                        live += 1;
                    }
                    End(_) => live -= 1,
                    Disconnect => {
                        prop_assert!(connected, "disconnect without a connection");
                        connected = false;
                    }
                    RequestHello => prop_assert!(matches!(step.to, S::Connected { .. }), "request hello into {:?}", step.to),
                }
                prop_assert!((0..=1).contains(&live), "live sessions {} after {:?}", live, a);
            }
            if matches!((&before, &step.to), (S::Idle, S::Connected { .. })) {
                connected = true;
            }
            prop_assert_eq!(live == 1, matches!(step.to, S::Ready { .. }));
            prop_assert_eq!(connected, matches!(step.to, S::Connected { .. } | S::Ready { .. }));
            if matches!(before, S::Closed { .. }) {
                prop_assert_eq!(&step.to, &before);
            }
        }
    }
}
