//! Decode reports (`decode_reports.rs`): torn frames, damaged frames and garbage, within the
//! rate limit.

use super::*;

#[test]
fn a_torn_frame_left_by_a_client_is_cut_by_the_next_clients_hello_request() {
    let (mut p, mut e) = (port(), env());
    let old = ready(&mut p, &mut e);
    let big = wire(&Message::Echo(vec![7; 4096]), old, 1);
    feed(&mut p, &big[..2048]);
    p.service(&mut e).unwrap();
    assert!(take_sent(&mut p).is_empty(), "half a frame: nothing to do yet");
    feed(&mut p, &wire(&Message::HelloRequest, 0, 0));
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    // The new session is offered, and the torn frame reported in it.
    assert_eq!(sent.len(), 2, "{sent:?}");
    let (session, _) = expect_hello(&sent[..1]);
    assert_ne!(session, old);
    assert!(
        matches!(&sent[1], (h, Message::Error { code: error_code::DECODE, about_kind: 0, text, .. })
        if h.session == session && text.starts_with("torn frame at stream offset 42: its header announced 4096")),
        "{sent:?}"
    );
    assert_eq!((p.counters().torn_frames, p.counters().decode_errors), (1, 1));
}

#[test]
fn decode_errors_and_garbage_are_reported_within_the_rate_limit() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    feed(&mut p, b"hello agent\n");
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    assert!(
        matches!(&sent[..], [(h, Message::Error { code: error_code::DECODE, text, .. })]
        if h.session == session && text.starts_with("skipped 12 bytes")),
        "{sent:?}"
    );
    // 30 frames with a damaged payload: 10 reports per second at most (the test clock
    // advances 1 us per reading), and the held-back ones are counted.
    let mut bad = wire(&Message::Ping { time_ns: 1 }, session, 2);
    bad[26] ^= 0xFF;
    for _ in 0..30 {
        feed(&mut p, &bad);
    }
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    let reports = sent.iter().filter(|(_, m)| matches!(m, Message::Error { code: error_code::DECODE, .. })).count();
    assert_eq!(reports, 9, "10 per window, one used by the garbage report: {sent:?}");
    let stats = p.stats(&mut e);
    let get = |n: &str| stats.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
    assert_eq!(get("decode_errors"), Some(30));
    assert_eq!(get("decode_reports"), Some(10));
    assert_eq!(get("decode_reports_held_back"), Some(21));
    // A second later the next report says how many were held back.
    e.now += 2_000_000_000;
    feed(&mut p, &bad);
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    assert!(
        matches!(&sent[..], [(_, Message::Error { text, .. })] if text.contains("(21 earlier reports held back")),
        "{sent:?}"
    );
}

#[test]
fn a_burst_of_garbage_gets_one_report_naming_where_it_ended() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    let start = p.decoder.stream_offset();
    // 20 KiB of garbage in five reads, then a PING: one report, the garbage ending where the
    // PING begins, then the PONG.
    let mut bytes = vec![b'x'; 20 * 1024];
    bytes.extend(wire(&Message::Ping { time_ns: 5 }, session, 2));
    feed(&mut p, &bytes);
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    let want = format!(
        "skipped 20480 bytes that are not part of any frame, the last just before stream offset {}",
        start + 20480
    );
    assert!(
        matches!(&sent[..], [(_, Message::Error { code: error_code::DECODE, text, .. }), (_, Message::Pong { .. })]
        if text.starts_with(&want)),
        "{sent:?}"
    );
}

#[test]
fn garbage_before_a_damaged_frame_is_reported_before_the_frame() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    let start = p.decoder.stream_offset();
    let mut bytes = b"hello agent\n".to_vec();
    let mut bad = wire(&Message::Ping { time_ns: 1 }, session, 2);
    bad[30] ^= 0xFF; // the payload: a bad frame crc
    bytes.extend(&bad);
    feed(&mut p, &bytes);
    p.service(&mut e).unwrap();
    let texts: Vec<String> = take_sent(&mut p)
        .into_iter()
        .map(|(_, m)| match m {
            Message::Error { code: error_code::DECODE, text, .. } => text,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(
        texts[0].starts_with(&format!(
            "skipped 12 bytes that are not part of any frame, the last just before stream offset {}",
            start + 12
        )),
        "{texts:?}"
    );
    assert_eq!(texts[1], format!("bad frame crc at stream offset {}", start + 12));
}
