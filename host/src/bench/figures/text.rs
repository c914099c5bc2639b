//! The report for people: [`BenchReport::render_text`].

use super::*;
use std::fmt::Write as _;

impl BenchReport {
    /// The report for people: the environment, the throughput table with each figure's ratio
    /// to raw, the goals, the idle cost.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.environment {
            let _ = writeln!(s, "{k}: {v}");
        }
        let _ = writeln!(
            s,
            "\n{:<12} {:>8} {:<6} {:>9} {:>10} {:>8} {:>11} {:>12} {:>10}",
            "direction", "write", "by", "MB/s", "x raw", "samples", "agent busy", "Minsn/MiB", "insn x raw"
        );
        for t in self.sorted_throughput() {
            let ratio = self.ratio_to_raw(t).map_or("-".to_string(), |r| format!("{r:.2}"));
            let mbs = t.mb_per_s().map_or("-".to_string(), |v| format!("{v:.1}"));
            let busy = t.agent_busy().map_or("-".to_string(), |b| format!("{:.0}%", b * 100.0));
            let insns = t.insns_per_mib().map_or("-".to_string(), |i| format!("{:.2}", i / 1e6));
            let insns_ratio = self.insns_ratio_to_raw(t).map_or("-".to_string(), |r| format!("{r:.2}"));
            let _ = writeln!(
                s,
                "{:<12} {:>8} {:<6} {:>9} {:>10} {:>8} {:>11} {:>12} {:>10}",
                t.direction.arrow(),
                size_name(u64::from(t.write_size)),
                t.carrier.name(),
                mbs,
                ratio,
                t.samples.len(),
                busy,
                insns,
                insns_ratio
            );
        }
        let comparisons = self.comparisons();
        if !comparisons.is_empty() {
            let _ = writeln!(s, "\ngoals (at least {THROUGHPUT_GOAL:.2}x raw):");
            for c in &comparisons {
                let verdict = if c.met { "met" } else { "MISSED" };
                let _ = writeln!(s, "  {:<46} {:.2}x  {verdict}", c.what, c.ratio);
            }
        }
        if !self.round_trips.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<16} {:<6} {:>9} {:>9} {:>9} {:>8}",
                "round trip", "by", "p50 us", "p99 us", "p99.9 us", "samples"
            );
            let us = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.0}", d.as_secs_f64() * 1e6));
            for t in &self.round_trips {
                let carrier = if t.carrier == Carrier::Raw { "raw" } else { "echo" };
                let _ = writeln!(
                    s,
                    "{:<16} {:<6} {:>9} {:>9} {:>9} {:>8}",
                    size_name(u64::from(t.size)),
                    carrier,
                    us(t.percentile(50.0)),
                    us(t.percentile(99.0)),
                    us(t.percentile(99.9)),
                    t.samples.len()
                );
            }
            let rtt = self.round_trip_comparisons();
            if !rtt.is_empty() {
                let _ = writeln!(s, "\ngoals (p50 at most {ROUND_TRIP_GOAL:.2}x raw):");
                for c in &rtt {
                    let verdict = if c.met { "met" } else { "MISSED" };
                    let _ = writeln!(s, "  {:<46} {:.2}x  {verdict}", c.what, c.ratio);
                }
            }
        }
        if !self.events.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<30} {:<40} {:>9} {:>9} {:>10} {:>7}",
                "event", "known by", "p50 ms", "max ms", "x first", "seen"
            );
            let ms = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2}", d.as_secs_f64() * 1e3));
            for e in &self.events {
                let ratio = self.event_ratio(e).map_or("-".to_string(), |r| format!("{r:.2}"));
                let seen = format!("{}/{}", e.samples.len(), e.samples.len() as u32 + e.missed);
                let max = e.samples.iter().max().copied();
                let _ = writeln!(
                    s,
                    "{:<30} {:<40} {:>9} {:>9} {:>10} {:>7}",
                    e.event,
                    e.by,
                    ms(median(&e.samples)),
                    ms(max),
                    ratio,
                    seen
                );
            }
        }
        if !self.boots.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<6} {:>15} {:>15} {:>12} {:>15}",
                "vCPUs", "raw shell ms", "first READY ms", "x raw shell", "all READY ms"
            );
            for b in &self.boots {
                let _ = writeln!(
                    s,
                    "{:<6} {:>15.0} {:>15.0} {:>12} {:>15}",
                    b.cpus,
                    b.raw_shell.as_secs_f64() * 1e3,
                    b.first_ready.as_secs_f64() * 1e3,
                    ratio(b.first_ready, b.raw_shell).map_or("-".to_string(), |r| format!("{r:.2}")),
                    format!(
                        "{:.0} ({} ports, {} reconnect(s))",
                        b.all_ready.as_secs_f64() * 1e3,
                        b.ports,
                        b.reconnected
                    )
                );
            }
        }
        if !self.ports.is_empty() {
            let _ = writeln!(s, "\n{:<6} {:>6} {:>16} {:>11}", "vCPUs", "ports", "MB/s in all", "x 1 port");
            for f in &self.ports {
                let _ = writeln!(
                    s,
                    "{:<6} {:>6} {:>16} {:>11}",
                    f.cpus,
                    f.ports,
                    f.mb_per_s().map_or("-".to_string(), |v| format!("{v:.1}")),
                    self.ports_ratio(f).map_or("-".to_string(), |r| format!("{r:.2}"))
                );
            }
        }
        if let Some(idle) = &self.idle {
            let _ = writeln!(
                s,
                "\nagent idle, its session READY, {} ms: {} wakeup(s) (goal 0: {}), {} us CPU, RSS {} KiB (goal at most {RSS_GOAL_KIB}: {}); one STATS request costs {} wakeup(s)",
                idle.window_ms,
                idle.wakeups,
                if idle.wakeups == 0 { "met" } else { "MISSED" },
                idle.cpu_ns / 1000,
                idle.rss_kib,
                if idle.rss_kib <= RSS_GOAL_KIB { "met" } else { "MISSED" },
                idle.request_wakeups,
            );
        }
        let _ = writeln!(s, "\nbench finished in {:.1} s", self.elapsed.as_secs_f64());
        s
    }
}
