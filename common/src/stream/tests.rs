//! The stream machines: every transition of the sender, the receiver's verdicts, and a
//! simulated transfer through random interruptions, rewinds and repeats that must store the
//! stream exactly once.

use super::*;
use crate::pattern;
use proptest::prelude::*;

#[test]
fn sender_sends_within_the_window_and_ends_when_all_is_acknowledged() {
    let mut s = Sender::new(7, 100, 40);
    assert_eq!(s.take_chunk(16), None, "nothing before the receiver's offset is known");
    assert_eq!(s.on(SenderInput::Accepted { offset: 0 }), Ok(SenderState::Sending));
    assert_eq!(s.take_chunk(16), Some((0, 16)));
    assert_eq!(s.take_chunk(16), Some((16, 16)));
    assert_eq!(s.take_chunk(16), Some((32, 8)), "the window holds 40 unacknowledged bytes");
    assert_eq!(s.take_chunk(16), None);
    assert_eq!(s.on(SenderInput::Ack { offset: 30 }), Ok(SenderState::Sending));
    assert_eq!(s.take_chunk(100), Some((40, 30)));
    assert_eq!(s.on(SenderInput::Ack { offset: 20 }), Ok(SenderState::Sending), "an overtaken ack is harmless");
    assert_eq!(s.acked(), 30);
    assert_eq!(s.take_chunk(100), None);
    assert_eq!(s.on(SenderInput::Ack { offset: 70 }), Ok(SenderState::Sending));
    assert_eq!(s.take_chunk(100), Some((70, 30)));
    assert_eq!(s.on(SenderInput::Ack { offset: 100 }), Ok(SenderState::Ending));
    assert_eq!(s.on(SenderInput::Ack { offset: 100 }), Ok(SenderState::Ending), "a repeated final ack");
    assert_eq!(s.on(SenderInput::Done { ok: true }), Ok(SenderState::Done { ok: true }));
    assert_eq!(s.stats().sent, 100);
}

#[test]
fn sender_refuses_what_the_protocol_forbids() {
    let mut s = Sender::new(1, 10, 4);
    assert!(matches!(s.on(SenderInput::Ack { offset: 0 }), Err(StreamError::WrongState { input: "STREAM_ACK", .. })));
    assert!(matches!(s.on(SenderInput::Done { ok: true }), Err(StreamError::WrongState { .. })));
    assert_eq!(
        s.on(SenderInput::Accepted { offset: 11 }),
        Err(StreamError::OffsetPastEnd { id: 1, offset: 11, total: 10 })
    );
    s.on(SenderInput::Accepted { offset: 2 }).unwrap();
    assert_eq!(s.take_chunk(100), Some((2, 4)));
    assert_eq!(s.on(SenderInput::Ack { offset: 7 }), Err(StreamError::AckBeyondSent { id: 1, offset: 7, sent: 6 }));
    assert!(matches!(s.on(SenderInput::Accepted { offset: 0 }), Err(StreamError::WrongState { .. })));
}

#[test]
fn an_interrupted_sender_resumes_from_the_receivers_offset_and_counts_what_it_resends() {
    let mut s = Sender::new(3, 1000, 300);
    s.on(SenderInput::Accepted { offset: 0 }).unwrap();
    s.take_chunk(300).unwrap();
    s.on(SenderInput::Ack { offset: 200 }).unwrap();
    s.take_chunk(300).unwrap();
    assert_eq!(s.on(SenderInput::Interrupted), Ok(SenderState::Opening));
    assert_eq!(s.stats().unacked_at_interrupt, 300, "sent up to 500, acknowledged 200");
    // The receiver was rewound to 150 (a loadvm): 50 acknowledged bytes are sent again.
    s.on(SenderInput::Accepted { offset: 150 }).unwrap();
    assert_eq!(s.stats().rewound, 50);
    assert_eq!(s.stats().resumes, 1);
    assert_eq!(s.take_chunk(1000), Some((150, 300)));
}

#[test]
fn a_stream_of_zero_bytes_ends_at_its_accept() {
    let mut s = Sender::new(9, 0, 10);
    assert_eq!(s.on(SenderInput::Accepted { offset: 0 }), Ok(SenderState::Ending));
    assert_eq!(s.on(SenderInput::Interrupted), Ok(SenderState::Opening));
    assert_eq!(s.on(SenderInput::Accepted { offset: 0 }), Ok(SenderState::Ending));
    assert_eq!(s.on(SenderInput::Done { ok: false }), Ok(SenderState::Done { ok: false }));
    assert_eq!(s.on(SenderInput::Interrupted), Ok(SenderState::Done { ok: false }), "a done stream stays done");
}

#[test]
fn receiver_stores_in_order_drops_repeats_and_refuses_gaps() {
    assert_eq!(Receiver::new(1, 10, 11).unwrap_err(), StreamError::OffsetPastEnd { id: 1, offset: 11, total: 10 });
    let mut r = Receiver::new(1, 200_000, 0).unwrap();
    assert_eq!(r.on_data(0, 1000), Ok(DataVerdict::Store { skip: 0 }));
    assert_eq!(r.stored(1000), None, "acknowledged every ACK_EVERY bytes");
    assert_eq!(r.on_data(500, 1000), Ok(DataVerdict::Store { skip: 500 }));
    assert_eq!(r.stored(500), None);
    assert_eq!(r.on_data(0, 1500), Ok(DataVerdict::Duplicate));
    assert_eq!(r.stats().duplicate_bytes, 2000);
    assert_eq!(r.on_data(1600, 10), Err(StreamError::Gap { id: 1, offset: 1600, expected: 1500 }));
    assert_eq!(r.on_data(1500, 200_000), Err(StreamError::PastEnd { id: 1, end: 201_500, total: 200_000 }));
    assert_eq!(r.flush_ack(), Some(1500));
    assert_eq!(r.flush_ack(), None);
    assert_eq!(r.on_data(1500, ACK_EVERY as usize), Ok(DataVerdict::Store { skip: 0 }));
    assert_eq!(r.stored(ACK_EVERY), Some(1500 + ACK_EVERY));
    let rest = 200_000 - r.offset();
    assert_eq!(r.on_data(r.offset(), rest as usize), Ok(DataVerdict::Store { skip: 0 }));
    assert_eq!(r.stored(rest), Some(200_000), "the end is always acknowledged");
    assert!(r.is_complete());
}

/// One fault of the simulated transfer.
#[derive(Debug, Clone)]
enum Fault {
    /// The session ends with everything in flight lost.
    Drop,
    /// The session ends and the receiver loses its last `n` stored bytes (loadvm).
    Rewind(u64),
    /// The next piece is delivered twice.
    Repeat,
}

fn faults() -> impl Strategy<Value = Vec<(u8, Fault)>> {
    let fault = prop_oneof![Just(Fault::Drop), (0u64..5000).prop_map(Fault::Rewind), Just(Fault::Repeat)];
    proptest::collection::vec((any::<u8>(), fault), 0..12)
}

proptest! {
    /// Whatever the interruptions, rewinds and repeats, the receiver ends holding exactly the
    /// stream, each byte stored once per time it was lost, and the sender ends at the digest.
    #[test]
    fn a_transfer_through_faults_stores_the_stream_exactly(
        total in 0u64..40_000, window in 1u32..9000, chunk in 1usize..5000, schedule in faults(), seed: u64
    ) {
        let mut expected = vec![0u8; total as usize];
        pattern::fill(seed, 0, &mut expected);
        let mut stored: Vec<u8> = Vec::new();
        let mut s = Sender::new(5, total, window);
        let mut schedule = schedule.into_iter();
        let mut next_fault = schedule.next();
        let mut step = 0u32;
        let mut lost = 0u64;
        'sessions: for _ in 0..100 {
            let mut r = Receiver::new(5, total, stored.len() as u64).unwrap();
            s.on(SenderInput::Accepted { offset: r.offset() }).unwrap();
            let mut in_flight: Vec<(u64, Vec<u8>)> = Vec::new();
            loop {
                step += 1;
                if let Some((at, fault)) = next_fault.clone() {
                    if step % 256 == u32::from(at) % 256 {
                        next_fault = schedule.next();
                        match fault {
                            Fault::Drop => {
                                s.on(SenderInput::Interrupted).unwrap();
                                continue 'sessions;
                            }
                            Fault::Rewind(n) => {
                                let keep = stored.len().saturating_sub(n as usize);
                                lost += (stored.len() - keep) as u64;
                                stored.truncate(keep);
                                s.on(SenderInput::Interrupted).unwrap();
                                continue 'sessions;
                            }
                            Fault::Repeat => {
                                if let Some(p) = in_flight.first().cloned() {
                                    in_flight.insert(0, p);
                                }
                            }
                        }
                    }
                }
                if let Some((offset, len)) = s.take_chunk(chunk) {
                    in_flight.push((offset, expected[offset as usize..offset as usize + len].to_vec()));
                    continue;
                }
                if s.state() == SenderState::Ending {
                    prop_assert_eq!(&stored, &expected);
                    s.on(SenderInput::Done { ok: true }).unwrap();
                    break 'sessions;
                }
                // Deliver the oldest piece in flight.
                prop_assert!(!in_flight.is_empty(), "the sender waits on an acknowledgement that cannot come");
                let (offset, bytes) = in_flight.remove(0);
                let ack = match r.on_data(offset, bytes.len()).unwrap() {
                    DataVerdict::Store { skip } => {
                        stored.extend_from_slice(&bytes[skip..]);
                        r.stored((bytes.len() - skip) as u64)
                    }
                    DataVerdict::Duplicate => None,
                };
                let ack = ack.or_else(|| in_flight.is_empty().then(|| r.flush_ack()).flatten());
                if let Some(offset) = ack {
                    s.on(SenderInput::Ack { offset }).unwrap();
                }
            }
        }
        prop_assert_eq!(s.state(), SenderState::Done { ok: true });
        prop_assert_eq!(stored.len() as u64, total);
        prop_assert!(s.stats().rewound <= lost);
    }
}
