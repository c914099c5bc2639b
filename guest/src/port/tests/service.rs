//! The service loop (`service.rs`): unplug, I/O errors, backpressure, read and write budgets.

use super::*;

#[test]
fn enodev_means_unplugged_and_close_records_it() {
    let (mut p, mut e) = (port(), env());
    ready(&mut p, &mut e);
    p.io.mask = PollFlags::POLLHUP;
    assert!(p.looks_unplugged().unwrap());
    p.io.reads.push_back(Read::Err(Errno::ENODEV));
    assert_eq!(p.service(&mut e), Ok(Health::Unplugged));
    p.close(&mut e, "unplugged");
    assert_eq!(p.state(), PortState::Disconnected);
    // Connected, Ready, then Closed: POLLHUP alone is not taken for a host disconnect.
    assert_eq!(p.history().len(), 3);
    let last = p.history().since(0).last().unwrap();
    assert_eq!((last.event, last.cause), (PortEvent::Closed, "unplugged"));
}

#[test]
fn other_errnos_are_errors_naming_the_port() {
    let (mut p, mut e) = (port(), env());
    p.io.mask = HOST;
    p.io.reads.push_back(Read::Err(Errno::EIO));
    let err = p.service(&mut e).unwrap_err();
    assert_eq!(err.to_string(), "port org.vport.0: read failed");
    assert_eq!(err.source, Errno::EIO);
}

#[test]
fn reading_pauses_at_the_high_water_mark_and_resumes() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    p.io.budget = 0;
    let payload = vec![1u8; 200_000];
    let echo = wire(&Message::Echo(payload.clone()), session, 1);
    let n_frames = 8; // 1.6 MB of replies > READ_HIGH_WATER
    for _ in 0..n_frames {
        feed(&mut p, &echo);
    }
    service_until_idle(&mut p, &mut e);
    assert!(p.queued() >= READ_HIGH_WATER && p.queued() < READ_HIGH_WATER + echo.len());
    assert!(!p.io.reads.is_empty(), "reading paused");
    p.io.budget = usize::MAX;
    let calls = service_until_idle(&mut p, &mut e);
    assert!(calls > 1, "1.6 MB of replies take several write budgets");
    assert!(p.io.reads.is_empty());
    let sent = take_sent(&mut p);
    assert_eq!(sent.len(), n_frames);
    assert!(sent.iter().all(|(_, m)| *m == Message::EchoReply(payload.clone())));
}

#[test]
fn reading_stops_at_the_read_budget_and_goes_on_at_the_next_turn() {
    let limits = Limits { read_budget: 10 * 1024, ..Limits::default() };
    let (mut p, mut e) = (port_with(Settings { limits, ..Settings::default() }), env());
    let session = ready(&mut p, &mut e);
    // 64 KiB of SINK data that needs no answer: a flood no output queue would stop.
    feed(&mut p, &wire(&Message::Sink { seed: 4, bytes: 60_000 }, session, 1));
    let mut data = vec![0u8; 60_000];
    pattern::fill(4, 0, &mut data);
    feed(&mut p, &wire(&Message::Data { offset: 0, bytes: data }, session, 2));
    let before = p.counters().bytes_in;
    assert_eq!(p.service(&mut e).unwrap(), Health::MoreWork);
    let taken = p.counters().bytes_in - before;
    // The read that crosses the budget is the last one of the turn.
    assert!(taken <= (10 * 1024 + READ_BUF) as u64, "{taken} bytes read in one turn");
    let calls = service_until_idle(&mut p, &mut e);
    assert!(calls >= 4, "{calls}");
    let sent = take_sent(&mut p);
    assert!(
        matches!(&sent[..], [(_, Message::SinkResult { bytes: 60_000, first_mismatch: NO_MISMATCH, .. })]),
        "{sent:?}"
    );
}

#[test]
fn a_hello_request_is_read_between_write_budgets_of_a_stream() {
    let (mut p, mut e) = (port(), env());
    let old = ready(&mut p, &mut e);
    feed(&mut p, &wire(&Message::Source { seed: 9, bytes: 1 << 30, chunk: 0 }, old, 1));
    assert_eq!(p.service(&mut e).unwrap(), Health::MoreWork, "a 1 GiB stream stops at the budget");
    let first = std::mem::take(&mut p.io.written).len();
    assert!(first <= Limits::default().write_budget + MAX_WRITE, "{first}");
    feed(&mut p, &wire(&Message::HelloRequest, 0, 0));
    assert_eq!(p.service(&mut e).unwrap(), Health::Open, "the request ended the stream");
    assert!(matches!(p.state(), PortState::Connected { .. }));
    assert_eq!(p.counters().stream_aborts, 1);
}
