//! The QMP client's read side: the greeting, the reader thread, and the state it shares with
//! the commands (who waits for which reply, who subscribed to events, why the connection
//! ended, counters).

use super::{
    parse_message, Alive, ConnectionEnd, ErrorReply, GreetingError, Incoming, LineSplitter, QmpEvent, ALIVE_STEP,
};
use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The most events one receiver ([`super::Qmp::events`] or a subscriber) holds before further
/// events are dropped for it and counted in [`QmpStats::events_dropped`]. QEMU rate-limits the
/// events vport uses, so only a flooding server or a receiver nobody reads reaches it.
pub const EVENT_BACKLOG: usize = 65_536;

/// What the reader has seen on one connection (the greeting is not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QmpStats {
    /// Complete lines read.
    pub lines: u64,
    /// Events received (delivered to every receiver with room).
    pub events: u64,
    /// Replies handed to the command waiting for them.
    pub replies: u64,
    /// Replies whose id was missing, not one vport sent, or no longer waited for.
    pub unmatched_replies: u64,
    /// Lines that are not QMP messages, and greetings after the first.
    pub skipped: u64,
    /// Event copies dropped because a receiver already held [`EVENT_BACKLOG`] events.
    pub events_dropped: u64,
}

/// The outcome a waiting command receives.
pub(super) type Outcome = Result<Value, ErrorReply>;

#[derive(Default)]
struct State {
    waiters: HashMap<u64, Sender<Outcome>>,
    subscribers: Vec<Sender<QmpEvent>>,
    end: Option<ConnectionEnd>,
    stats: QmpStats,
}

/// State shared by the reader thread and the commands.
#[derive(Default)]
pub(super) struct Shared(Mutex<State>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a command waiting for reply `id`; fails if the connection has ended.
    pub(super) fn expect(&self, id: u64, tx: Sender<Outcome>) -> Result<(), ConnectionEnd> {
        let mut st = self.lock();
        if let Some(end) = &st.end {
            return Err(end.clone());
        }
        st.waiters.insert(id, tx);
        Ok(())
    }

    /// The command waiting for `id` gave up.
    pub(super) fn forget(&self, id: u64) {
        self.lock().waiters.remove(&id);
    }

    /// Ends the connection for `reason` unless it ended already: every waiter and subscriber
    /// wakes (their senders are dropped) and later commands fail at once.
    pub(super) fn close(&self, reason: ConnectionEnd) {
        let mut st = self.lock();
        if st.end.is_none() {
            log::debug!("qmp: connection ended: {reason}");
            st.end = Some(reason);
        }
        st.waiters.clear();
        st.subscribers.clear();
    }

    /// Why the connection ended ([`ConnectionEnd::ReaderGone`] if it has not, which a caller
    /// that saw its reply sender dropped cannot observe).
    pub(super) fn end(&self) -> ConnectionEnd {
        self.lock().end.clone().unwrap_or(ConnectionEnd::ReaderGone)
    }

    pub(super) fn subscribe(&self) -> Receiver<QmpEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut st = self.lock();
        if st.end.is_none() {
            st.subscribers.push(tx);
        }
        // When the connection has ended `tx` is dropped here and `rx` reports it.
        rx
    }

    pub(super) fn stats(&self) -> QmpStats {
        self.lock().stats
    }
}

/// Reads the greeting line, the whole line before `deadline` (`timeout` after the start of the
/// caller's wait, as errors report it), asking `alive` (if any) every [`ALIVE_STEP`]. Bytes
/// after it stay in `lines`.
pub(super) fn read_greeting(
    stream: &mut UnixStream,
    lines: &mut LineSplitter,
    deadline: Instant,
    timeout: Duration,
    mut alive: Alive<'_>,
) -> Result<Value, GreetingError> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(line) = lines.next_line() {
            let line = line.map_err(|e| GreetingError::Lost(ConnectionEnd::LineTooLong { limit: e.limit }))?;
            return match parse_message(&line) {
                Ok(Incoming::Greeting(v)) => Ok(v),
                Ok(Incoming::Event(_)) => Err(GreetingError::NotAGreeting { got: "an event" }),
                Ok(Incoming::Reply(_)) => Err(GreetingError::NotAGreeting { got: "a command reply" }),
                Err(e) => Err(GreetingError::Parse(e)),
            };
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(GreetingError::Timeout { timeout });
        }
        if let Some(Err(reason)) = alive.as_mut().map(|alive| alive()) {
            return Err(GreetingError::Abandoned { reason });
        }
        let step = if alive.is_some() { left.min(ALIVE_STEP) } else { left };
        stream.set_read_timeout(Some(step)).map_err(|e| GreetingError::Lost(read_end(&e)))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(GreetingError::Lost(end_of_stream(lines.partial()))),
            Ok(n) => lines.push(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(GreetingError::Lost(read_end(&e))),
        }
    }
}

/// Starts the reader thread on `stream` (blocking reads), continuing with the bytes already in
/// `lines`. Returns the shared state and the main event receiver.
pub(super) fn spawn(stream: UnixStream, lines: LineSplitter) -> std::io::Result<(Arc<Shared>, Receiver<QmpEvent>)> {
    let shared = Arc::new(Shared::default());
    let (tx, rx) = crossbeam_channel::unbounded();
    let reader = Reader { stream, lines, shared: shared.clone(), events: tx };
    std::thread::Builder::new().name("qmp-reader".into()).spawn(move || reader.run())?;
    Ok((shared, rx))
}

struct Reader {
    stream: UnixStream,
    lines: LineSplitter,
    shared: Arc<Shared>,
    events: Sender<QmpEvent>,
}

impl Drop for Reader {
    /// However the thread ends (even by a panic), every waiter wakes.
    fn drop(&mut self) {
        self.shared.close(ConnectionEnd::ReaderGone);
    }
}

impl Reader {
    fn run(mut self) {
        let end = self.read_until_end();
        self.shared.close(end);
        // The client cannot use a connection the reader has left (a line too long has no end
        // to resynchronise on): close it, so the server sees the client go. Errors only mean
        // the socket is gone already.
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn read_until_end(&mut self) -> ConnectionEnd {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            while let Some(line) = self.lines.next_line() {
                match line {
                    Ok(line) => self.handle(&line),
                    Err(e) => {
                        log::warn!("qmp: the server sent a line longer than {} bytes; closing", e.limit);
                        return ConnectionEnd::LineTooLong { limit: e.limit };
                    }
                }
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return end_of_stream(self.lines.partial()),
                Ok(n) => self.lines.push(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return read_end(&e),
            }
        }
    }

    fn handle(&self, line: &[u8]) {
        let received = Instant::now();
        log::debug!("qmp <- {}", shown(line));
        let message = parse_message(line);
        let mut st = self.shared.lock();
        st.stats.lines += 1;
        match message {
            Ok(Incoming::Event(e)) => {
                st.stats.events += 1;
                let ev = QmpEvent { name: e.name, data: e.data, qemu_time_us: e.qemu_time_us, received };
                let mut dropped = 0;
                // A subscriber whose receiver is gone is forgotten.
                st.subscribers.retain(|tx| offer(tx, &ev, &mut dropped));
                // A closed main receiver only means nobody listens there any more.
                offer(&self.events, &ev, &mut dropped);
                if dropped > 0 {
                    st.stats.events_dropped += dropped;
                    // Once, then at every power of two, so a flood does not flood the log.
                    if st.stats.events_dropped.is_power_of_two() {
                        log::warn!("qmp: {} events dropped for receivers nobody reads", st.stats.events_dropped);
                    }
                }
            }
            Ok(Incoming::Reply(r)) => match r.numeric_id().and_then(|id| st.waiters.remove(&id)) {
                Some(tx) => {
                    st.stats.replies += 1;
                    // The waiter may have timed out just now; the reply is then moot.
                    let _ = tx.send(r.outcome);
                }
                None => {
                    st.stats.unmatched_replies += 1;
                    log::debug!("qmp: dropping a reply nobody waits for (id {:?})", r.id);
                }
            },
            Ok(Incoming::Greeting(_)) => {
                st.stats.skipped += 1;
                log::warn!("qmp: skipping a second greeting");
            }
            Err(e) => {
                st.stats.skipped += 1;
                log::warn!("qmp: skipping a line that is not a QMP message ({e}): {}", shown(line));
            }
        }
    }
}

/// Sends a copy of `ev` unless the receiver holds [`EVENT_BACKLOG`] events (then counts it in
/// `dropped`); false once the receiver is gone.
fn offer(tx: &Sender<QmpEvent>, ev: &QmpEvent, dropped: &mut u64) -> bool {
    if tx.len() >= EVENT_BACKLOG {
        *dropped += 1;
        return true;
    }
    tx.send(ev.clone()).is_ok()
}

fn end_of_stream(partial: usize) -> ConnectionEnd {
    match partial {
        0 => ConnectionEnd::Closed,
        bytes => ConnectionEnd::ClosedMidLine { bytes },
    }
}

fn read_end(e: &std::io::Error) -> ConnectionEnd {
    ConnectionEnd::Read { kind: e.kind(), message: e.to_string() }
}

/// `line` for a log: lossy UTF-8, white space trimmed, cut to 500 characters.
pub(super) fn shown(line: &[u8]) -> Cow<'_, str> {
    const MAX: usize = 500;
    let text = String::from_utf8_lossy(&line[..line.len().min(4 * MAX)]);
    let trimmed = text.trim_end();
    match trimmed.char_indices().nth(MAX) {
        Some((cut, _)) => Cow::Owned(format!("{}... ({} bytes)", &trimmed[..cut], line.len())),
        None if line.len() > 4 * MAX => Cow::Owned(format!("{trimmed}... ({} bytes)", line.len())),
        None if trimmed.len() == text.len() => text,
        None => Cow::Owned(trimmed.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_that_ends_without_a_reason_still_wakes_every_waiter() {
        let (stream, _peer) = UnixStream::pair().unwrap();
        let shared = Arc::new(Shared::default());
        let (tx, waiter) = crossbeam_channel::bounded(1);
        shared.expect(1, tx).unwrap();
        let sub = shared.subscribe();
        let (events, _rx) = crossbeam_channel::unbounded();
        let reader = Reader { stream, lines: LineSplitter::new(16), shared: shared.clone(), events };
        // As a panic in `run` would: the reader is dropped without closing.
        drop(reader);
        assert_eq!(
            waiter.recv_timeout(Duration::from_secs(10)),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        );
        assert!(sub.recv_timeout(Duration::from_secs(10)).is_err());
        assert_eq!(shared.end(), ConnectionEnd::ReaderGone);
        assert_eq!(shared.expect(2, crossbeam_channel::bounded(1).0), Err(ConnectionEnd::ReaderGone));
    }

    #[test]
    fn log_lines_are_cut_to_a_readable_length() {
        assert_eq!(shown(b"{\"a\": 1}\r\n"), "{\"a\": 1}");
        let long = shown(&[b'x'; 5000]);
        assert!(long.starts_with(&"x".repeat(500)) && long.ends_with("... (5000 bytes)"), "{long}");
        assert_eq!(shown(b"\xff ok").as_ref(), "\u{fffd} ok");
    }
}
