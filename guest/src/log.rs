//! A minimal `log::Log` that writes one line per record to stderr:
//! `[    2.345678 INFO ] vport-agent: <message>`, timestamped with `CLOCK_MONOTONIC` so lines line
//! up with the guest kernel's own console messages.

use crate::sys::monotonic_ns;
use log::{LevelFilter, Log, Metadata, Record, SetLoggerError};
use std::io::Write;

struct StderrLogger {
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(monotonic_ns(), record.level(), record.args());
        // One write per line so lines from the agent are not torn; a failing stderr has
        // nowhere to be reported.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// The text of one log line, newline included.
pub fn format_line(now_ns: u64, level: log::Level, args: &std::fmt::Arguments) -> String {
    format!(
        "[{:5}.{:06} {:<5}] vport-agent: {}\n",
        now_ns / 1_000_000_000,
        (now_ns % 1_000_000_000) / 1_000,
        level,
        args
    )
}

/// Installs the logger with `level` as the maximum level. Fails if a logger is already set.
pub fn init(level: LevelFilter) -> Result<(), SetLoggerError> {
    log::set_logger(Box::leak(Box::new(StderrLogger { level })))?;
    log::set_max_level(level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format() {
        let line = format_line(2_345_678_901, log::Level::Info, &format_args!("port x READY"));
        assert_eq!(line, "[    2.345678 INFO ] vport-agent: port x READY\n");
    }
}
