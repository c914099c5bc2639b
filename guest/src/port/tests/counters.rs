//! Counters, carry and the STATS and EVENTS listings (`counters.rs`).

use super::*;
use vport_common::Phase;

#[test]
fn skipped_bytes_and_held_back_reports_survive_a_reopen() {
    let (mut p, mut e) = (port(), env());
    ready(&mut p, &mut e);
    feed(&mut p, b"garbage!");
    p.service(&mut e).unwrap();
    let get = |p: &Port<Fake>, e: &mut TestEnv, n: &str| p.stats(e).into_iter().find(|(k, _)| k == n).map(|(_, v)| v);
    assert_eq!(get(&p, &mut e, "skipped_bytes"), Some(8));
    let carry = p.into_carry();
    let p2 = Port::with_carry(
        "org.vport.0".into(),
        "vport0p1".into(),
        Fake::new(),
        Rc::new(AgentInfo { agent_version: "x".into(), kernel_release: "k".into(), boot_id: "b".into() }),
        Rc::new(Settings::default()),
        carry,
    );
    assert_eq!(get(&p2, &mut e, "skipped_bytes"), Some(8));
}

#[test]
fn stats_and_events_report_counters_and_stamped_transitions() {
    let (mut p, mut e) = (port(), env());
    p.counters_mut().ebusy = 2;
    e.wakeups = 5;
    let session = ready(&mut p, &mut e);
    e.wakeups = 9;
    let sent = request(&mut p, &mut e, &Message::Stats, session);
    let Message::StatsReply(pairs) = &sent[0].1 else { panic!("{sent:?}") };
    let get = |n: &str| pairs.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
    assert_eq!(get("ebusy"), Some(2));
    assert_eq!(get("sessions"), Some(1));
    assert_eq!(get("frames_in"), Some(2));
    assert_eq!(get("wakeups"), Some(9));
    assert_eq!(get("ebusy_total"), Some(3));
    for name in [
        "bytes_in",
        "bytes_out",
        "frames_out",
        "decode_errors",
        "stale_frames",
        "hello_repeats",
        "illegal_transitions",
        "dropped_bytes",
        "short_writes",
        "queue_overflows",
        "opens",
        "closes",
    ] {
        assert!(get(name).is_some(), "{name} missing");
    }

    let sent = request(&mut p, &mut e, &Message::Events { since_seq: 1 }, session);
    let Message::EventsReply { first_seq: 0, next_seq: 2, records } = &sent[0].1 else { panic!("{sent:?}") };
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!((r.seq, r.from, r.to, r.session), (1, Phase::Connected, Phase::Ready, session));
    assert_eq!((r.wakeups, r.cpu_ns, r.cause.as_str()), (5, 50, "hello ack"));

    // Counters and ring survive a close and reopen.
    p.close(&mut e, "reopen requested");
    let carry = std::mem::replace(&mut p, port()).into_carry();
    assert_eq!(carry.history.next_seq(), 3);
    let p2 = Port::with_carry(
        "org.vport.0".into(),
        "vport0p1".into(),
        Fake::new(),
        p.info.clone(),
        p.settings.clone(),
        carry,
    );
    assert_eq!(p2.counters().ebusy, 2);
    assert_eq!(p2.history().since(0).last().unwrap().transition.to, PortState::Disconnected);
}
