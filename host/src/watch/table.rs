//! The live table of `vport watch`: the trace replay of [`vport_common::replay`] rendered one
//! row per port ([`Table`]), and the timeline sink that prints it on every change
//! ([`TableSink`]).

use vport_common::replay::{PortReplay, Replay};
use vport_common::trace::Record;

/// The live table: the trace replay of the records so far, rendered one row per port.
#[derive(Debug, Default)]
pub struct Table {
    replay: Replay,
}

impl Table {
    /// Applies one record; returns whether a row changed (every record about a port does).
    pub fn apply(&mut self, r: &Record) -> bool {
        self.replay.apply(r).is_some()
    }

    /// The ports, in first-seen order.
    pub fn ports(&self) -> &[PortReplay] {
        self.replay.ports()
    }

    /// The table as text: port, guest open (by the latest evidence, in band or QMP), host
    /// connected, in-band phase, session, bytes each way, and the last record.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:<20} {:<6} {:<5} {:<12} {:<10} {:>10} {:>10}  {}\n",
            "PORT", "GUEST", "HOST", "STATE", "SESSION", "H2G B", "G2H B", "LAST EVENT"
        );
        for p in self.replay.ports() {
            let guest = match p.guest_open() {
                Some(true) => "open",
                Some(false) => "closed",
                None => "?",
            };
            let session = p.session().map_or_else(|| "-".to_string(), |s| format!("{s:#010x}"));
            let last = p
                .last()
                .map(|r| format!("{:>8.3}s {:?} {}", r.t_ns as f64 / 1e9, r.source, r.kind))
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<20} {:<6} {:<5} {:<12} {:<10} {:>10} {:>10}  {}\n",
                p.port(),
                guest,
                if p.host_connected() { "yes" } else { "no" },
                p.phase().name(),
                session,
                p.counts().bytes_h2g,
                p.counts().bytes_g2h,
                last
            ));
        }
        out
    }
}

/// A timeline sink that keeps a [`Table`] and prints it on every change: redrawn in place on
/// a terminal, appended (one table per change) otherwise.
pub struct TableSink<W: std::io::Write> {
    out: W,
    table: Table,
    pending: Vec<u8>,
    redraw: bool,
}

impl<W: std::io::Write> TableSink<W> {
    /// A sink printing to `out`; `redraw` clears the screen before each table.
    pub fn new(out: W, redraw: bool) -> Self {
        TableSink { out, table: Table::default(), pending: Vec::new(), redraw }
    }
}

impl<W: std::io::Write> std::io::Write for TableSink<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(nl) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line);
            match vport_common::trace::parse_record(&text, 0) {
                Ok(Some(r)) if self.table.apply(&r) => {
                    if self.redraw {
                        self.out.write_all(b"\x1b[H\x1b[2J")?;
                    }
                    self.out.write_all(self.table.render().as_bytes())?;
                    if !self.redraw {
                        self.out.write_all(b"\n")?;
                    }
                }
                Ok(_) => {}
                Err(e) => log::warn!("watch: cannot show a record: {e}"),
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use vport_common::trace::{Direction, Kind};
    use vport_common::Phase;

    fn record(seq: u64, port: &str, kind: Kind) -> Record {
        Record { seq, t_ns: seq * 250_000_000, port: port.into(), source: kind.default_source(), kind }
    }

    #[test]
    fn the_table_renders_the_replay() {
        let mut t = Table::default();
        let p = "org.vport.0";
        for (i, kind) in [
            Kind::VserportChange { id: "vport0".into(), open: true },
            Kind::HostConnect,
            Kind::Hello { session: 7, nonce: 1 },
            Kind::HelloAck { session: 7, nonce: 1 },
            Kind::Data { dir: Direction::HostToGuest, bytes: 64, session: 7 },
        ]
        .into_iter()
        .enumerate()
        {
            assert!(t.apply(&record(i as u64, p, kind)));
        }
        assert!(t.apply(&record(5, "org.vport.1", Kind::HostConnect)));
        assert!(!t.apply(&record(6, "", Kind::Note { text: "phase 2".into() })), "a rig note is about no port");
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("PORT "), "{text}");
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(row[..7], ["org.vport.0", "open", "yes", "READY", "0x00000007", "64", "0"], "{text}");
        assert!(lines[1].ends_with("1.000s Host data h2g 64 bytes session=0x00000007"), "{text}");
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(row[..7], ["org.vport.1", "?", "yes", "DISCONNECTED", "-", "0", "0"], "{text}");

        // The guest closes: in band first (BYE), the session ends.
        t.apply(&record(7, p, Kind::Bye { session: 7, reopen_after_ms: Some(100), reason: "close".into() }));
        assert_eq!(t.ports()[0].phase(), Phase::Disconnected);
        assert_eq!((t.ports()[0].guest_open(), t.ports()[0].session()), (Some(false), None));
    }
}
