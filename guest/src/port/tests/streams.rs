//! SOURCE, SINK and DATA (`streams.rs`).

use super::*;

#[test]
fn source_streams_the_pattern_lazily_then_reports_the_digest() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    let total = 3 * SOURCE_LOW_WATER as u64 + 123;
    p.io.budget = 0;
    request(&mut p, &mut e, &Message::Source { seed: 42, bytes: total, chunk: 10_000 }, session);
    assert!(p.queued() >= SOURCE_LOW_WATER && p.queued() < SOURCE_LOW_WATER + 10_100, "lazy: {}", p.queued());
    let mut got = 0u64;
    let mut digest = StreamDigest::new();
    let mut done = None;
    let mut d = Decoder::default();
    for _ in 0..100 {
        p.io.budget = 100_000;
        p.service(&mut e).unwrap();
        d.push(&std::mem::take(&mut p.io.written));
        for f in d.by_ref() {
            let f = f.unwrap();
            let (h, m) = (f.header, Message::from_frame(&f).unwrap());
            assert_eq!(h.session, session);
            match m {
                Message::Data { offset, bytes } => {
                    assert_eq!(offset, got);
                    assert!(bytes.len() <= 10_000);
                    assert_eq!(pattern::first_mismatch(42, offset, &bytes), None);
                    digest.update(&bytes);
                    got += bytes.len() as u64;
                }
                Message::SourceDone { bytes, digest } => done = Some((bytes, digest)),
                other => panic!("{other:?}"),
            }
        }
        if done.is_some() {
            break;
        }
    }
    assert_eq!(got, total);
    assert_eq!(done, Some((total, digest.digest())));
    assert_eq!(digest.digest(), pattern::pattern_digest(42, total));

    // A session that ends aborts a running SOURCE.
    p.io.budget = 0;
    request(&mut p, &mut e, &Message::Source { seed: 1, bytes: 1 << 30, chunk: 0 }, session);
    p.io.mask = NO_HOST;
    p.service(&mut e).unwrap();
    assert_eq!(p.counters().stream_aborts, 1);
    assert_eq!(p.queued(), 0);
}

#[test]
fn sink_verifies_in_order_and_reports_the_first_mismatch() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    expect_error(
        &request(&mut p, &mut e, &Message::Data { offset: 0, bytes: vec![0] }, session),
        error_code::BAD_STATE,
    );

    let mut stream = vec![0u8; 50_000];
    pattern::fill(9, 0, &mut stream);
    assert!(request(&mut p, &mut e, &Message::Sink { seed: 9, bytes: 50_000 }, session).is_empty());
    let mut sent = vec![];
    for (i, c) in stream.chunks(7_000).enumerate() {
        sent = request(&mut p, &mut e, &Message::Data { offset: (i * 7_000) as u64, bytes: c.to_vec() }, session);
    }
    let good =
        Message::SinkResult { bytes: 50_000, digest: pattern::pattern_digest(9, 50_000), first_mismatch: NO_MISMATCH };
    assert_eq!(sent, vec![(sent[0].0, good)]);

    // A flipped byte is located exactly.
    let mut bad = stream.clone();
    bad[12_345] ^= 0x40;
    request(&mut p, &mut e, &Message::Sink { seed: 9, bytes: 50_000 }, session);
    let sent = request(&mut p, &mut e, &Message::Data { offset: 0, bytes: bad }, session);
    assert!(matches!(sent[0].1, Message::SinkResult { bytes: 50_000, first_mismatch: 12_345, .. }), "{sent:?}");

    // A gap counts as a mismatch at the expected offset.
    request(&mut p, &mut e, &Message::Sink { seed: 9, bytes: 20_000 }, session);
    request(&mut p, &mut e, &Message::Data { offset: 0, bytes: stream[..10_000].to_vec() }, session);
    let sent =
        request(&mut p, &mut e, &Message::Data { offset: 11_000, bytes: stream[11_000..21_000].to_vec() }, session);
    assert!(matches!(sent[0].1, Message::SinkResult { first_mismatch: 10_000, .. }), "{sent:?}");
    // A zero-byte SINK answers at once.
    let sent = request(&mut p, &mut e, &Message::Sink { seed: 9, bytes: 0 }, session);
    assert!(matches!(sent[0].1, Message::SinkResult { bytes: 0, first_mismatch: NO_MISMATCH, .. }));
}

#[test]
fn streams_over_the_limit_are_refused() {
    let limits = Limits { max_stream_bytes: 1000, ..Limits::default() };
    let (mut p, mut e) = (port_with(Settings { limits, ..Settings::default() }), env());
    let session = ready(&mut p, &mut e);
    for m in [Message::Source { seed: 1, bytes: 1001, chunk: 0 }, Message::Sink { seed: 1, bytes: 1 << 40 }] {
        let sent = request(&mut p, &mut e, &m, session);
        expect_error(&sent, error_code::LIMIT);
    }
    // At the limit is fine.
    let sent = request(&mut p, &mut e, &Message::Source { seed: 1, bytes: 1000, chunk: 0 }, session);
    assert!(matches!(sent.last(), Some((_, Message::SourceDone { bytes: 1000, .. }))), "{sent:?}");
    assert_eq!(p.counters().refusals, 2);
}

#[test]
fn close_stops_a_running_stream_and_nothing_follows_the_bye() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    p.io.budget = 0;
    let mut bytes = wire(&Message::Source { seed: 1, bytes: 1 << 30, chunk: 0 }, session, 1);
    bytes.extend(wire(&Message::Close { reopen_after_ms: 10 }, session, 2));
    feed(&mut p, &bytes);
    p.service(&mut e).unwrap();
    let queued = p.queued();
    // A late guest-op completion is not queued after the BYE either.
    assert!(!p.send_guest_op_done(session, GuestOpDone { op_id: 1, ..Default::default() }));
    p.io.budget = usize::MAX;
    service_until_idle(&mut p, &mut e);
    assert_eq!(p.queued(), 0);
    let sent = take_sent(&mut p);
    assert!(matches!(sent.last(), Some((_, Message::Bye { .. }))), "BYE is the last frame: {sent:?}");
    assert!(sent.len() * DEFAULT_CHUNK <= queued + DEFAULT_CHUNK, "the stream stopped at CLOSE");
    assert_eq!(p.counters().stream_aborts, 1);
}
