//! A minimal `log::Log` that writes one line per record to stderr:
//! `[    2.345678 INFO ] vport-agent: <message>`, timestamped with `CLOCK_MONOTONIC` so lines line
//! up with the guest kernel's own console messages.
//!
//! When stderr is unusable at start (closed, or `/dev/null` as under many service managers
//! without a journal), lines go to `/dev/kmsg` instead, as `<prio>vport-agent: <message>` (the
//! kernel adds the timestamp). The kernel rate-limits user writes to kmsg (`printk_devkmsg`):
//! a burst of debug lines can be cut short there.

use crate::sys::monotonic_ns;
use log::{LevelFilter, Log, Metadata, Record, SetLoggerError};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;

/// Where lines go.
enum Sink {
    Stderr,
    Kmsg(File),
}

struct StderrLogger {
    level: LevelFilter,
    sink: Sink,
}

/// True when fd 2 is open and is not `/dev/null` (character device 1:3).
pub fn stderr_usable() -> bool {
    let stderr = std::io::stderr();
    match nix::sys::stat::fstat(stderr.as_fd()) {
        Err(_) => false,
        Ok(st) => {
            let is_chr = st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFCHR;
            !(is_chr && nix::sys::stat::major(st.st_rdev) == 1 && nix::sys::stat::minor(st.st_rdev) == 3)
        }
    }
}

/// The kmsg priority of a level (`<3>` err .. `<7>` debug).
pub fn kmsg_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // One write per line so lines from the agent are not torn (and kmsg takes one record
        // per write); a failing sink has nowhere to be reported.
        match &self.sink {
            Sink::Stderr => {
                let line = format_line(monotonic_ns(), record.level(), record.args());
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
            Sink::Kmsg(f) => {
                let line = format!("<{}>vport-agent: {}\n", kmsg_priority(record.level()), record.args());
                let _ = (&*f).write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {
        if let Sink::Stderr = self.sink {
            let _ = std::io::stderr().flush();
        }
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

/// Installs the logger with `level` as the maximum level: to stderr, or to `/dev/kmsg` when
/// stderr is unusable and kmsg can be opened. Fails if a logger is already set.
pub fn init(level: LevelFilter) -> Result<(), SetLoggerError> {
    let sink = if stderr_usable() {
        Sink::Stderr
    } else {
        match std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
            Ok(f) => Sink::Kmsg(f),
            Err(_) => Sink::Stderr,
        }
    };
    log::set_logger(Box::leak(Box::new(StderrLogger { level, sink })))?;
    log::set_max_level(level);
    Ok(())
}

/// `err` and its sources, joined with ": " (for log lines and error texts sent to the host).
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format() {
        let line = format_line(2_345_678_901, log::Level::Info, &format_args!("port x READY"));
        assert_eq!(line, "[    2.345678 INFO ] vport-agent: port x READY\n");
    }

    #[test]
    fn kmsg_priorities() {
        assert_eq!(kmsg_priority(log::Level::Error), 3);
        assert_eq!(kmsg_priority(log::Level::Warn), 4);
        assert_eq!(kmsg_priority(log::Level::Info), 6);
        assert_eq!(kmsg_priority(log::Level::Trace), 7);
    }
}
