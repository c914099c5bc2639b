//! One sample of each throughput figure on a live VM. Every sample moves all its bytes and
//! checks their digest; one that does not is a [`BenchError::Integrity`], never a figure.
//!
//! - **raw** (the baseline): the guest side is the agent's guest operations on a port it does
//!   not serve (GUEST_OP WRITE_EACH / READ `all`, a plain `write()` loop in calls of the write
//!   size, as `dd bs=` would, and a `read()` loop of at most 64 KiB), the host side the
//!   chardev's socket, read or written directly (writes of the write size).
//! - **plain**: SOURCE / SINK in a session: framed and checked, not acknowledged.
//! - **acked**: an acknowledged stream (`vport recv` of a pattern, `vport send` of a file).
//!
//! Each time runs from the host's request to the last byte (raw guest->host), or to the
//! receiver's verdict (SOURCE_DONE, SINK_RESULT, GUEST_OP_DONE of the READ, STREAM_DONE):
//! one round trip over the control port more than the raw guest->host figure, which favours
//! the baseline.

use super::BenchError;
use crate::client::AgentClient;
use crate::session::{PortServer, Session};
use crate::stream::to_guest::ToGuest;
use crate::stream::to_host::ToHost;
use crate::stream::{Control, StreamSide, TransferOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use vport_common::message::GuestOp;
use vport_common::pattern::{self, StreamDigest};

/// Longest wait for one sample (a stalled VM is an error, not a slow figure).
pub const SAMPLE_TIMEOUT: Duration = Duration::from_secs(120);
/// `poll(2)` bits of a guest op's mask.
const POLLHUP: u16 = 0x10;
const POLLOUT: u16 = 0x4;

/// The guest's handle on the raw port, opened through the control session, with the host's
/// connection to the raw port's chardev.
pub struct RawPort {
    /// The handle of the agent's guest operations.
    pub handle: u32,
    /// The host end.
    pub host: UnixStream,
}

/// Opens `port` in the guest through `ctl` and waits (up to `timeout`) until the guest sees
/// `host` connected (its poll mask loses POLLHUP): before that a guest write would not reach
/// the host.
pub fn open_raw(ctl: &mut Session, port: &str, host: UnixStream, timeout: Duration) -> Result<RawPort, BenchError> {
    let done = ctl.guest_op(GuestOp::Open { port: port.into(), nonblock: false, sigio: false }, timeout)?;
    let handle = u32::try_from(done.ret).ok().filter(|h| *h > 0).ok_or_else(|| BenchError::Guest {
        what: format!("open {port}"),
        detail: format!("ret {} errno {} {}", done.ret, done.errno, String::from_utf8_lossy(&done.data)),
    })?;
    let deadline = Instant::now() + timeout;
    loop {
        // POLL blocks in the guest for up to its timeout: an event-driven wait, bounded.
        let poll = GuestOp::Poll { handle, events: POLLOUT, timeout_ms: 200 };
        let done = ctl.guest_op(poll, timeout)?;
        if done.ret >= 0 && done.mask & POLLHUP == 0 {
            return Ok(RawPort { handle, host });
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Guest {
                what: format!("wait for the host on {port}"),
                detail: format!("the guest still sees POLLHUP after {timeout:?} (poll mask {:#x})", done.mask),
            });
        }
    }
}

/// Raw guest->host: the guest writes `bytes` of the pattern of `seed` to the raw port in
/// `write()` calls of `each` bytes, the host reads them off the socket. Time from the request
/// to the last byte read.
pub fn raw_to_host(
    ctl: &mut Session,
    raw: &mut RawPort,
    seed: u64,
    bytes: u64,
    each: u32,
) -> Result<Duration, BenchError> {
    write_each_to_host(ctl, raw, "raw", seed, bytes, each)
}

/// [`raw_to_host`] on any guest-op handle whose host end is a unix socket (the raw port, a
/// vsock stream); `name` names the carrier in errors.
pub(super) fn write_each_to_host(
    ctl: &mut Session,
    raw: &mut RawPort,
    name: &str,
    seed: u64,
    bytes: u64,
    each: u32,
) -> Result<Duration, BenchError> {
    let mut reader = raw.host.try_clone().map_err(|e| BenchError::io("clone the host's socket", e))?;
    reader
        .set_read_timeout(Some(crate::speed::scaled(SAMPLE_TIMEOUT)))
        .map_err(|e| BenchError::io("set a read timeout", e))?;
    std::thread::scope(|scope| {
        let t0 = Instant::now();
        let read = scope.spawn(move || read_exactly(&mut reader, name, bytes));
        let done = ctl.guest_op(
            GuestOp::WriteEach { handle: raw.handle, seed, bytes, each },
            crate::speed::scaled(SAMPLE_TIMEOUT),
        );
        if !matches!(&done, Ok(d) if d.bytes == bytes) {
            // Not all will come: end the reader's wait now rather than at its timeout.
            if let Err(e) = raw.host.shutdown(std::net::Shutdown::Read) {
                log::debug!("{name}: shutdown after a failed write: {e}");
            }
        }
        let read = read.join().map_err(|_| BenchError::Integrity(format!("the {name} reader thread panicked")))?;
        let done = done?;
        if done.bytes != bytes || done.ret < 0 {
            return Err(BenchError::Guest {
                what: format!("{name} write"),
                detail: format!("{} of {bytes} bytes written, ret {} errno {}", done.bytes, done.ret, done.errno),
            });
        }
        let (digest, last) = read?;
        check_digest(&format!("{name} guest->host"), digest, seed, bytes)?;
        Ok(last - t0)
    })
}

/// Reads exactly `bytes` from `s` (the host end of carrier `name`): their digest and when the
/// last came.
fn read_exactly(s: &mut UnixStream, name: &str, bytes: u64) -> Result<(u64, Instant), BenchError> {
    let mut buf = vec![0u8; 64 << 10];
    let mut digest = StreamDigest::new();
    while digest.bytes() < bytes {
        let want = usize::try_from((bytes - digest.bytes()).min(buf.len() as u64)).unwrap_or(buf.len());
        let n = s.read(&mut buf[..want]).map_err(|e| BenchError::io("read the host's socket", e))?;
        if n == 0 {
            return Err(BenchError::Integrity(format!(
                "the {name} host socket closed after {} of {bytes} bytes",
                digest.bytes()
            )));
        }
        digest.update(&buf[..n]);
    }
    Ok((digest.digest(), Instant::now()))
}

/// Raw host->guest: the guest reads `bytes` off the raw port (READ `all`) while the host writes
/// `data` (the pattern of `seed`) to the socket in writes of `each` bytes. Time from the
/// request to the READ's completion.
pub fn raw_to_guest(
    ctl: &mut Session,
    raw: &mut RawPort,
    seed: u64,
    data: &[u8],
    each: u32,
) -> Result<Duration, BenchError> {
    read_all_from_host(ctl, raw, "raw", seed, data, each)
}

/// [`raw_to_guest`] on any guest-op handle whose host end is a unix socket (the raw port, a
/// vsock stream); `name` names the carrier in errors.
pub(super) fn read_all_from_host(
    ctl: &mut Session,
    raw: &mut RawPort,
    name: &str,
    seed: u64,
    data: &[u8],
    each: u32,
) -> Result<Duration, BenchError> {
    let bytes = data.len() as u64;
    let t0 = Instant::now();
    let op = ctl.start_guest_op(GuestOp::Read { handle: raw.handle, bytes, all: true })?;
    for chunk in data.chunks(each.max(1) as usize) {
        raw.host.write_all(chunk).map_err(|e| BenchError::io("write the host's socket", e))?;
    }
    let done = ctl.await_guest_op(op, crate::speed::scaled(SAMPLE_TIMEOUT))?;
    let took = t0.elapsed();
    if done.bytes != bytes {
        return Err(BenchError::Integrity(format!(
            "{name} host->guest: the guest read {} of {bytes} bytes (ret {} errno {})",
            done.bytes, done.ret, done.errno
        )));
    }
    check_digest(&format!("{name} host->guest"), done.digest, seed, bytes)?;
    Ok(took)
}

/// Raw round trips: `count` times, the host writes `size` bytes (the pattern of `seed`) to the
/// raw port and reads them back from the guest's LOOPBACK; each round trip is timed and its
/// echo compared with what was sent. The loopback's completion (all bytes echoed) closes it.
pub fn raw_round_trips(
    ctl: &mut Session,
    raw: &mut RawPort,
    seed: u64,
    size: usize,
    count: usize,
) -> Result<Vec<Duration>, BenchError> {
    let total = (size * count) as u64;
    let op = ctl.start_guest_op(GuestOp::Loopback { handle: raw.handle, bytes: total })?;
    raw.host
        .set_read_timeout(Some(crate::speed::scaled(SAMPLE_TIMEOUT)))
        .map_err(|e| BenchError::io("set a read timeout", e))?;
    let mut out = vec![0u8; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        pattern::fill(seed, (i * size) as u64, &mut out);
        let t0 = Instant::now();
        raw.host.write_all(&out).map_err(|e| BenchError::io("write the raw port", e))?;
        raw.host.read_exact(&mut back).map_err(|e| BenchError::io("read the raw port's echo", e))?;
        samples.push(t0.elapsed());
        if back != out {
            return Err(BenchError::Integrity(format!("raw loopback: round trip {i} came back other than sent")));
        }
    }
    let done = ctl.await_guest_op(op, crate::speed::scaled(SAMPLE_TIMEOUT))?;
    if done.bytes != total {
        return Err(BenchError::Guest {
            what: "raw loopback".into(),
            detail: format!("{} of {total} bytes echoed, ret {} errno {}", done.bytes, done.ret, done.errno),
        });
    }
    Ok(samples)
}

/// ECHO round trips: `count` ECHOs of `size` bytes (the pattern of `seed`), each timed and
/// its reply compared with what was sent.
pub fn echo_round_trips(ctl: &mut Session, seed: u64, size: usize, count: usize) -> Result<Vec<Duration>, BenchError> {
    let mut out = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        pattern::fill(seed, (i * size) as u64, &mut out);
        let t0 = Instant::now();
        let back = ctl.echo(&out, crate::speed::scaled(SAMPLE_TIMEOUT))?;
        samples.push(t0.elapsed());
        if back != out {
            return Err(BenchError::Integrity(format!("ECHO {i} of {size} B came back other than sent")));
        }
    }
    Ok(samples)
}

/// Plain guest->host: SOURCE of `bytes` in DATA frames of `chunk` bytes, checked byte by byte.
pub fn plain_to_host(ctl: &mut Session, seed: u64, bytes: u64, chunk: u32) -> Result<Duration, BenchError> {
    let out = ctl.source(seed, bytes, chunk, crate::speed::scaled(SAMPLE_TIMEOUT))?;
    if !out.verified || out.bytes != bytes {
        return Err(BenchError::Integrity(format!(
            "SOURCE: {} of {bytes} bytes, verified {}, first mismatch {:?}",
            out.bytes, out.verified, out.first_mismatch
        )));
    }
    Ok(out.elapsed)
}

/// Plain host->guest: SINK of `bytes` sent in DATA frames of `chunk` bytes, checked by the agent.
pub fn plain_to_guest(ctl: &mut Session, seed: u64, bytes: u64, chunk: u32) -> Result<Duration, BenchError> {
    let out = ctl.sink(seed, bytes, chunk, crate::speed::scaled(SAMPLE_TIMEOUT))?;
    if !out.verified || out.bytes != bytes {
        return Err(BenchError::Integrity(format!(
            "SINK: the agent got {} of {bytes} bytes, verified {}, first mismatch {:?}",
            out.bytes, out.verified, out.first_mismatch
        )));
    }
    Ok(out.elapsed)
}

/// Acknowledged guest->host: a stream of `bytes` of the agent's pattern of `seed` into `dest`
/// (removed again after the check, so that the next sample moves everything).
pub fn acked_to_host(
    server: &mut PortServer,
    port: &str,
    seed: u64,
    bytes: u64,
    dest: &Path,
    opts: &TransferOptions,
) -> Result<Duration, BenchError> {
    let mut stream = ToHost::pattern(port, seed, bytes, dest, opts.clone())?;
    let report = stream.run(server, &mut |_| Control::Continue)?;
    take_stored_pattern("acked guest->host", dest, report.bytes, seed, bytes)?;
    Ok(report.elapsed)
}

/// Acknowledged host->guest: `local` (the pattern of `seed`) sent as guest file `name`. The
/// guest keeps one file of that name: each sample's content differs, so each moves all of it.
pub fn acked_to_guest(
    server: &mut PortServer,
    port: &str,
    local: &Path,
    name: &str,
    seed: u64,
    bytes: u64,
    opts: &TransferOptions,
) -> Result<Duration, BenchError> {
    let mut stream = ToGuest::new(port, local, name, opts.clone())?;
    let report = stream.run(server, &mut |_| Control::Continue)?;
    if report.bytes != bytes || report.started_at != 0 {
        return Err(BenchError::Integrity(format!(
            "acked host->guest: {} of {bytes} bytes, started at {}",
            report.bytes, report.started_at
        )));
    }
    check_digest("acked host->guest", report.digest, seed, bytes)?;
    Ok(report.elapsed)
}

/// Reads and removes `dest`, a received stream that the transfer reported as `reported` bytes:
/// both must be `bytes` of the pattern of `seed`. Returns the file's digest.
pub(super) fn take_stored_pattern(
    what: &str,
    dest: &Path,
    reported: u64,
    seed: u64,
    bytes: u64,
) -> Result<u64, BenchError> {
    let stored = std::fs::read(dest).map_err(|e| BenchError::io("read the received file", e))?;
    std::fs::remove_file(dest).map_err(|e| BenchError::io("remove the received file", e))?;
    if reported != bytes || stored.len() as u64 != bytes {
        return Err(BenchError::Integrity(format!("{what}: {} of {bytes} bytes stored", stored.len())));
    }
    let digest = xxh3(&stored);
    check_digest(what, digest, seed, bytes)?;
    Ok(digest)
}

fn xxh3(bytes: &[u8]) -> u64 {
    let mut d = StreamDigest::new();
    d.update(bytes);
    d.digest()
}

/// The digest of `bytes` of the pattern of `seed` must be `got`.
fn check_digest(what: &str, got: u64, seed: u64, bytes: u64) -> Result<(), BenchError> {
    let want = pattern::pattern_digest(seed, bytes);
    if got == want {
        Ok(())
    } else {
        Err(BenchError::Integrity(format!("{what}: digest {got:#018x}, the pattern's is {want:#018x}")))
    }
}
