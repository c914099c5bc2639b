//! The transmit path (`transmit.rs`): whole frames in order over short writes and EAGAIN.

use super::*;

#[test]
fn short_writes_deliver_identical_frames_in_order() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    p.io.chunk = 5;
    p.io.write_calls.clear();
    let payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 3 + i as usize * 7]).collect();
    let mut input = vec![];
    for (i, pl) in payloads.iter().enumerate() {
        input.extend(wire(&Message::Echo(pl.clone()), session, i as u32 + 1));
    }
    p.io.reads.push_back(Read::Data(input));
    p.service(&mut e).unwrap();
    assert!(p.io.write_calls.iter().all(|&n| n <= 5));
    let expected: Vec<u8> = payloads
        .iter()
        .enumerate()
        .flat_map(|(i, pl)| wire(&Message::EchoReply(pl.clone()), session, i as u32 + 1))
        .collect();
    assert_eq!(p.io.written, expected, "byte-identical, in order, seq 1..=20");
    assert!(p.counters().short_writes > 0);
    assert_eq!(p.queued(), 0);
}

#[test]
fn eagain_mid_frame_resumes_on_the_next_writable_event() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    let big = vec![0xAB; 50_000];
    p.io.budget = 1000;
    p.io.write_calls.clear();
    feed(&mut p, &wire(&Message::Echo(big[..10_000].to_vec()), session, 1));
    feed(&mut p, &wire(&Message::Echo(big[10_000..].to_vec()), session, 2));
    p.service(&mut e).unwrap();
    assert_eq!(p.io.written.len(), 1000);
    let expected = [
        wire(&Message::EchoReply(big[..10_000].to_vec()), session, 1),
        wire(&Message::EchoReply(big[10_000..].to_vec()), session, 2),
    ]
    .concat();
    assert_eq!(p.queued(), expected.len() - 1000);
    // Nothing more until the port is writable again; then the rest, in 32 KiB writes.
    p.io.budget = usize::MAX;
    p.service(&mut e).unwrap();
    assert_eq!(p.io.written, expected);
    assert!(p.io.write_calls[1..].iter().all(|&n| n <= MAX_WRITE));
    assert_eq!(p.io.write_calls.len(), 1 + expected[1000..].len().div_ceil(MAX_WRITE));
}
