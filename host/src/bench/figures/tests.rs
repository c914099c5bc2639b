//! The figures' tests: medians, ratios, goals, the table and the JSON.

use super::*;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn tp(direction: Direction, carrier: Carrier, samples: &[u64]) -> Throughput {
    let samples: Vec<_> = samples.iter().map(|v| ms(*v)).collect();
    let agent_cpu = samples.iter().map(|d| *d / 2).collect();
    Throughput { direction, carrier, bytes: 10_000_000, write_size: 65536, samples, agent_cpu, guest_insns: Vec::new() }
}

#[test]
fn guest_instructions_are_per_mib_at_their_median_and_compared_with_raw() {
    let mib = |t: &Throughput| t.bytes as f64 / f64::from(1u32 << 20);
    let counted = |carrier, insns: &[u64]| Throughput {
        guest_insns: insns.to_vec(),
        ..tp(Direction::GuestToHost, carrier, &[10, 10, 10])
    };
    let raw = counted(Carrier::Raw, &[900, 100, 500]);
    let plain = counted(Carrier::Plain, &[1500, 1000, 2000]);
    assert_eq!(raw.insns_per_mib(), Some(500.0 / mib(&raw)), "the median count, per MiB");
    let uncounted = tp(Direction::GuestToHost, Carrier::Acked, &[10]);
    assert_eq!(uncounted.insns_per_mib(), None);
    let report = BenchReport { throughput: vec![raw, plain, uncounted], ..Default::default() };
    let ratio = report.insns_ratio_to_raw(&report.throughput[1]).unwrap();
    assert!((ratio - 3.0).abs() < 1e-9, "{ratio}");
    assert_eq!(report.insns_ratio_to_raw(&report.throughput[2]), None, "not counted: no ratio");
    let json = report.to_json();
    assert!((json["throughput"][1]["guest_insns_x_raw"].as_f64().unwrap() - 3.0).abs() < 1e-9);
    assert_eq!(json["throughput"][1]["guest_insns"], serde_json::json!([1500, 1000, 2000]));
    assert!(json["throughput"][2]["guest_insns_per_mib"].is_null());
    let text = report.render_text();
    let plain_row = text.lines().find(|l| l.contains(" plain ")).unwrap();
    assert!(plain_row.trim_end().ends_with("3.00"), "{text}");
}

#[test]
fn the_median_is_a_measured_sample() {
    assert_eq!(median(&[]), None);
    assert_eq!(median(&[ms(5)]), Some(ms(5)));
    assert_eq!(median(&[ms(9), ms(1), ms(5)]), Some(ms(5)));
    assert_eq!(median(&[ms(4), ms(1), ms(9), ms(2)]), Some(ms(2)), "the lower middle of an even count");
}

#[test]
fn throughput_is_bytes_over_the_median() {
    let t = tp(Direction::GuestToHost, Carrier::Raw, &[200, 100, 300]);
    assert_eq!(t.mb_per_s(), Some(50.0));
    assert_eq!(tp(Direction::GuestToHost, Carrier::Raw, &[]).mb_per_s(), None);
    assert_eq!(tp(Direction::GuestToHost, Carrier::Raw, &[0]).mb_per_s(), None);
    assert_eq!(t.agent_busy(), Some(0.5));
    assert_eq!(tp(Direction::GuestToHost, Carrier::Raw, &[]).agent_busy(), None);
}

#[test]
fn each_carrier_is_compared_with_the_raw_port_of_its_direction() {
    let report = BenchReport {
        throughput: vec![
            tp(Direction::GuestToHost, Carrier::Raw, &[100]),
            tp(Direction::GuestToHost, Carrier::Plain, &[125]),
            tp(Direction::HostToGuest, Carrier::Raw, &[200]),
            tp(Direction::HostToGuest, Carrier::Acked, &[200]),
            // No raw baseline at this size: not compared.
            Throughput { write_size: 64, ..tp(Direction::HostToGuest, Carrier::Plain, &[1]) },
        ],
        ..Default::default()
    };
    let c = report.comparisons();
    assert_eq!(c.len(), 2, "{c:?}");
    assert_eq!(c[0].what, "guest->host 64 KiB plain / raw");
    assert!((c[0].ratio - 0.8).abs() < 1e-9 && !c[0].met, "{:?}", c[0]);
    assert_eq!(c[1].what, "host->guest 64 KiB acked / raw");
    assert!((c[1].ratio - 1.0).abs() < 1e-9 && c[1].met, "{:?}", c[1]);
    let text = report.render_text();
    assert!(text.contains("0.80x  MISSED") && text.contains("1.00x  met"), "{text}");
    assert!(text.contains("50%"), "the agent's share of the wall time: {text}");
    let json = report.to_json();
    assert_eq!(json["comparisons"].as_array().unwrap().len(), 2);
    assert_eq!(json["throughput"][1]["carrier"], "plain");
    assert_eq!(json["throughput"][1]["median_mb_per_s"], 80.0);
    assert_eq!(json["throughput"][0]["direction"], "guest-to-host");
}

#[test]
fn other_write_sizes_get_ratios_but_no_goal_and_the_table_is_ordered() {
    let at = |direction, carrier, size: u32, ms_each: u64| Throughput {
        write_size: size,
        ..tp(direction, carrier, &[ms_each])
    };
    let report = BenchReport {
        throughput: vec![
            at(Direction::HostToGuest, Carrier::Raw, 65536, 10),
            at(Direction::GuestToHost, Carrier::Plain, 64, 40),
            at(Direction::GuestToHost, Carrier::Raw, 64, 20),
            at(Direction::GuestToHost, Carrier::Plain, 65536, 10),
            at(Direction::GuestToHost, Carrier::Raw, 65536, 10),
        ],
        ..BenchReport::default()
    };
    let goals: Vec<_> = report.comparisons().into_iter().map(|c| c.what).collect();
    assert_eq!(goals, ["guest->host 64 KiB plain / raw"], "the goal is judged at 64 KiB only");
    assert_eq!(report.ratio_to_raw(&report.throughput[1]), Some(0.5));
    let order: Vec<_> =
        report.sorted_throughput().iter().map(|t| (t.direction.arrow(), t.write_size, t.carrier.name())).collect();
    assert_eq!(
        order,
        [
            ("guest->host", 64, "raw"),
            ("guest->host", 64, "plain"),
            ("guest->host", 65536, "raw"),
            ("guest->host", 65536, "plain"),
            ("host->guest", 65536, "raw"),
        ]
    );
    let json = report.to_json();
    assert_eq!(json["throughput"][1]["x_raw"], 0.5);
    assert!(json["throughput"][0]["x_raw"].as_f64() == Some(1.0));
}

#[test]
fn each_event_figure_is_compared_with_the_first_of_its_event() {
    let ev = |event, by, ms_each: &[u64], missed| EventLatency {
        event,
        by,
        samples: ms_each.iter().map(|v| ms(*v)).collect(),
        missed,
    };
    let report = BenchReport {
        events: vec![
            ev("guest opens a port", "QMP", &[2, 4, 3], 0),
            ev("guest opens a port", "polled", &[6, 6], 1),
            ev("host connects -> READY", "reference", &[1], 0),
            ev("host connects -> READY", "HELLO", &[5], 0),
        ],
        ..BenchReport::default()
    };
    let ratios: Vec<_> = report.events.iter().map(|e| report.event_ratio(e)).collect();
    assert_eq!(ratios, [Some(1.0), Some(2.0), Some(1.0), Some(5.0)]);
    let text = report.render_text();
    assert!(text.contains("2/3"), "seen 2 of 3: {text}");
    assert_eq!(report.to_json()["events"][1]["missed"], 1);
}

#[test]
fn the_idle_goals_are_judged_in_the_table() {
    let idle = IdleCost { window_ms: 2000, wakeups: 0, cpu_ns: 1500, rss_kib: 5000, request_wakeups: 3 };
    let text = BenchReport { idle: Some(idle), ..Default::default() }.render_text();
    assert!(
        text.contains("0 wakeup(s) (goal 0: met)")
            && text.contains("RSS 5000 KiB (goal at most 4096: MISSED)")
            && text.contains("costs 3 wakeup(s)"),
        "{text}"
    );
}

#[test]
fn percentiles_are_nearest_rank_samples() {
    let samples: Vec<_> = (1..=1000).map(ms).collect();
    assert_eq!(percentile(&samples, 50.0), Some(ms(500)));
    assert_eq!(percentile(&samples, 99.0), Some(ms(990)));
    assert_eq!(percentile(&samples, 99.9), Some(ms(999)));
    assert_eq!(percentile(&samples, 100.0), Some(ms(1000)));
    assert_eq!(percentile(&[ms(7)], 99.9), Some(ms(7)));
    assert_eq!(percentile(&[], 50.0), None);
}

#[test]
fn echo_is_held_to_the_raw_loopback_of_its_size() {
    let rt = |carrier, size, v: &[u64]| RoundTrip { carrier, size, samples: v.iter().map(|x| ms(*x)).collect() };
    let report = BenchReport {
        round_trips: vec![
            rt(Carrier::Raw, 64, &[10, 10, 10]),
            rt(Carrier::Plain, 64, &[11, 11, 50]),
            rt(Carrier::Raw, 4096, &[20]),
            rt(Carrier::Plain, 4096, &[30]),
            rt(Carrier::Plain, 1, &[5]), // no raw baseline of its size
        ],
        ..Default::default()
    };
    let c = report.round_trip_comparisons();
    assert_eq!(c.len(), 2, "{c:?}");
    assert_eq!(c[0].what, "round trip 64 B echo / raw loopback, p50");
    assert!((c[0].ratio - 1.1).abs() < 1e-9 && c[0].met, "at the goal is met: {:?}", c[0]);
    assert!((c[1].ratio - 1.5).abs() < 1e-9 && !c[1].met, "{:?}", c[1]);
    let text = report.render_text();
    assert!(text.contains("p50 at most 1.10x raw") && text.contains("1.50x  MISSED"), "{text}");
    assert_eq!(report.to_json()["round_trips"][1]["p99_us"], 50_000.0);
}

#[test]
fn sizes_are_named_in_their_largest_whole_unit() {
    assert_eq!(size_name(64), "64 B");
    assert_eq!(size_name(4096), "4 KiB");
    assert_eq!(size_name(1 << 20), "1 MiB");
    assert_eq!(size_name(1536), "1536 B");
}

#[test]
fn many_ports_are_compared_with_one_port_of_the_same_vm_and_boot_with_the_raw_shell() {
    let f = |cpus, ports, took_ms| PortsFigure { cpus, ports, bytes_per_port: 1_000_000, took: ms(took_ms) };
    let report = BenchReport {
        ports: vec![f(1, 1, 10), f(1, 4, 20), f(2, 1, 10), f(2, 4, 10)],
        boots: vec![BootFigure {
            cpus: 1,
            raw_shell: ms(2000),
            first_ready: ms(3000),
            all_ready: ms(4000),
            ports: 31,
            reconnected: 1,
        }],
        ..BenchReport::default()
    };
    let ratios: Vec<_> = report.ports.iter().map(|p| report.ports_ratio(p)).collect();
    assert_eq!(ratios, [Some(1.0), Some(2.0), Some(1.0), Some(4.0)]);
    assert_eq!(report.ports[1].mb_per_s(), Some(200.0));
    let json = report.to_json();
    assert_eq!(json["boots"][0]["first_ready_x_raw_shell"], 1.5);
    assert_eq!(json["ports"][3]["x_one_port"], 4.0);
    let text = report.render_text();
    assert!(text.contains("1.50") && text.contains("4000 (31 ports, 1 reconnect(s))"), "{text}");
}

#[test]
fn vsock_is_a_reference_shown_as_a_ratio_to_raw_and_held_to_no_goal() {
    let report = BenchReport {
        throughput: vec![
            tp(Direction::GuestToHost, Carrier::Vsock, &[50]),
            tp(Direction::GuestToHost, Carrier::Raw, &[100]),
            tp(Direction::GuestToHost, Carrier::Plain, &[200]),
        ],
        ..Default::default()
    };
    let vsock = &report.throughput[0];
    assert_eq!(report.ratio_to_raw(vsock), Some(2.0));
    let goals = report.comparisons();
    assert_eq!(goals.len(), 1, "plain only: {goals:?}");
    assert!(goals[0].what.contains("plain"));
    let order: Vec<_> = report.sorted_throughput().iter().map(|t| t.carrier).collect();
    assert_eq!(order, [Carrier::Raw, Carrier::Plain, Carrier::Vsock]);
    let json = report.to_json();
    assert_eq!(json["throughput"][0]["carrier"], "vsock");
    assert_eq!(json["throughput"][0]["x_raw"], 2.0);
    let text = report.render_text();
    let row = text.lines().find(|l| l.contains(" vsock ")).unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("2.00"), "{row}");
    assert!(!text.lines().any(|l| l.contains("vsock /")), "no goal line for vsock: {text}");
}
