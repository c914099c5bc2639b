//! Watching a growing log (QEMU's stderr with its trace, the guest console) for the event a
//! fault or the bench waits for: only the bytes appended since the last look are read.

use crate::wait::wait_until;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a watched log is read.
const POLL: Duration = Duration::from_millis(10);

/// QEMU's trace line of a port's throttling (`virtio_serial_throttle_port port N, throttle X`,
/// QEMU's `log` trace backend, on its stderr).
const THROTTLE_TRACE: &str = "virtio_serial_throttle_port";

/// A log file read from where it ended when the watch began.
pub struct LogTail {
    file: std::fs::File,
    partial: String,
}

impl LogTail {
    /// Watches `path` from its present end.
    pub fn from_end(path: &Path) -> Result<LogTail, String> {
        let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        file.seek(SeekFrom::End(0)).map_err(|e| format!("cannot seek {}: {e}", path.display()))?;
        Ok(LogTail { file, partial: String::new() })
    }

    /// The whole lines appended since the last call (a line still being written waits).
    pub fn new_lines(&mut self) -> Vec<String> {
        let mut bytes = Vec::new();
        if let Err(e) = self.file.read_to_end(&mut bytes) {
            log::warn!("faults: cannot read a log: {e}");
        }
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let Some(end) = self.partial.rfind('\n') else { return Vec::new() };
        let rest = self.partial.split_off(end + 1);
        let lines = std::mem::replace(&mut self.partial, rest);
        lines.lines().map(str::to_owned).collect()
    }
}

/// Waits up to `deadline` (reading every 10 ms) until a line containing `needle` is appended
/// to the file `tail` watches.
pub fn wait_for_line(tail: &mut LogTail, needle: &str, deadline: Duration) -> Result<(), String> {
    wait_until(
        &format!("a line with {needle:?}"),
        deadline,
        POLL,
        || Ok(()),
        || tail.new_lines().iter().any(|l| l.contains(needle)).then_some(()),
    )
    .map_err(|e| e.to_string())
}

/// The throttle state a trace line reports (`throttle 1`: throttled), if it is one.
fn throttle_state(line: &str) -> Option<bool> {
    let rest = line.split(THROTTLE_TRACE).nth(1)?;
    match rest.trim_end().rsplit(' ').next()? {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// Whether the last throttle line of `text` says throttled.
pub fn last_throttled(text: &str) -> bool {
    text.lines().rev().find_map(throttle_state).unwrap_or(false)
}

/// Waits up to `deadline` until QEMU throttles a port while nothing reads it: a new
/// `throttle 1` line in `tail`, or, when the port was already throttled as the wait began
/// (`throttled_at_start`), no `throttle 0` for `settle` (QEMU unthrottles only when the host
/// end can take data again, which a host that reads nothing never allows).
pub fn wait_throttled(
    tail: &mut LogTail,
    throttled_at_start: bool,
    settle: Duration,
    deadline: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    let mut throttled = throttled_at_start;
    wait_until(
        "QEMU to throttle the port (its trace: throttle 1)",
        deadline,
        POLL,
        || Ok(()),
        || {
            for line in tail.new_lines() {
                match throttle_state(&line) {
                    Some(true) => return Some(()),
                    Some(false) => throttled = false,
                    None => {}
                }
            }
            (throttled && started.elapsed() >= settle).then_some(())
        },
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn only_whole_lines_appended_after_the_start_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "old line\n").unwrap();
        let mut tail = LogTail::from_end(&path).unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "new one\nhalf").unwrap();
        assert_eq!(tail.new_lines(), ["new one"]);
        writeln!(f, " done").unwrap();
        assert_eq!(tail.new_lines(), ["half done"]);
        assert!(tail.new_lines().is_empty());
        writeln!(f, "the agent restarted").unwrap();
        assert!(wait_for_line(&mut tail, "restarted", Duration::from_secs(1)).is_ok());
        assert!(wait_for_line(&mut tail, "restarted", Duration::from_millis(30)).is_err(), "seen once");
    }

    #[test]
    fn a_throttle_is_a_new_throttle_line_or_a_throttled_port_that_stays_so() {
        let trace = |x| format!("virtio_serial_throttle_port port 2, throttle {x}\n");
        assert!(last_throttled(&format!("{}{}", trace(0), trace(1))));
        assert!(!last_throttled(&format!("{}{}", trace(1), trace(0))));
        assert!(!last_throttled("nothing here\n"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr");
        std::fs::write(&path, trace(1)).unwrap();
        let (settle, deadline) = (Duration::from_millis(20), Duration::from_millis(200));
        let mut tail = LogTail::from_end(&path).unwrap();
        assert!(wait_throttled(&mut tail, true, settle, deadline).is_ok(), "already throttled, and stays so");
        let mut tail = LogTail::from_end(&path).unwrap();
        assert!(wait_throttled(&mut tail, false, settle, deadline).is_err(), "never throttled");
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(trace(0).as_bytes()).unwrap();
        let mut tail = LogTail::from_end(&path).unwrap();
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(trace(1).as_bytes()).unwrap();
        assert!(wait_throttled(&mut tail, false, settle, deadline).is_ok(), "a new throttle");
        let mut tail = LogTail::from_end(&path).unwrap();
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(trace(0).as_bytes()).unwrap();
        assert!(wait_throttled(&mut tail, true, settle, deadline).is_err(), "unthrottled after the start");
    }
}
