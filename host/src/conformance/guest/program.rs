//! The guest program of the guest group: guest operations (the agent's GUEST_OP, real system
//! calls in the guest, each handle on its own worker thread) driven in a session on the agent's
//! control port, and the host end of a target port as a plain byte stream.

use super::super::case::CaseError;
use crate::client::AgentClient;
use crate::rig::Rig;
use crate::session::{Session, SessionError};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vport_common::message::{GuestOp, GuestOpDone};
use vport_common::pattern;

pub(super) const POLLIN: u16 = nix::libc::POLLIN as u16;
pub(super) const POLLOUT: u16 = nix::libc::POLLOUT as u16;
pub(super) const POLLHUP: u16 = nix::libc::POLLHUP as u16;
pub(super) const IN_OUT: u16 = POLLIN | POLLOUT;

/// The guest program: guest ops in a session on the agent's control port.
pub(super) struct Guest {
    pub(super) session: Session,
    pub(super) t: Duration,
}

impl Guest {
    pub(super) fn op(&mut self, op: GuestOp) -> Result<GuestOpDone, CaseError> {
        Ok(self.session.guest_op(op, self.t)?)
    }

    pub(super) fn start(&mut self, op: GuestOp) -> Result<u32, CaseError> {
        Ok(self.session.start_guest_op(op)?)
    }

    pub(super) fn finish(&mut self, id: u32, timeout: Duration) -> Result<GuestOpDone, CaseError> {
        Ok(self.session.await_guest_op(id, timeout)?)
    }

    /// `Some(done)` if op `id` completes within `window`, `None` if it is still running.
    pub(super) fn within(&mut self, id: u32, window: Duration) -> Result<Option<GuestOpDone>, CaseError> {
        match self.session.await_guest_op(id, window) {
            Ok(d) => Ok(Some(d)),
            Err(SessionError::Timeout { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn open(&mut self, port: &str, nonblock: bool, sigio: bool) -> Result<u32, CaseError> {
        let d = self.op(GuestOp::Open { port: port.into(), nonblock, sigio })?;
        if d.ret <= 0 {
            return Err(CaseError::Other(format!(
                "guest open of {port} failed: errno {} ({})",
                d.errno,
                String::from_utf8_lossy(&d.data)
            )));
        }
        Ok(d.ret as u32)
    }

    pub(super) fn close(&mut self, handle: u32) -> Result<(), CaseError> {
        let d = self.op(GuestOp::Close { handle })?;
        if d.ret != 0 {
            return Err(CaseError::Other(format!("guest close of handle {handle}: errno {}", d.errno)));
        }
        Ok(())
    }

    /// poll(POLLIN|POLLOUT, 0): (ret, revents).
    pub(super) fn poll(&mut self, handle: u32) -> Result<(i64, u16), CaseError> {
        let d = self.op(GuestOp::Poll { handle, events: IN_OUT, timeout_ms: 0 })?;
        Ok((d.ret, d.mask))
    }

    /// Waits (bounded) until poll's revents contain `bits`.
    pub(super) fn wait_mask(&mut self, rig: &Rig, handle: u32, bits: u16) -> Result<u16, CaseError> {
        let end = Instant::now() + self.t;
        loop {
            rig.vm.check_alive().map_err(CaseError::Other)?;
            // A blocking poll for the wanted bits (POLLHUP is always reported).
            let d = self.op(GuestOp::Poll { handle, events: bits & IN_OUT, timeout_ms: 500 })?;
            if d.mask & bits == bits {
                return Ok(d.mask);
            }
            if Instant::now() >= end {
                return Err(CaseError::Other(format!("poll never showed {bits:#x} (last {:#x})", d.mask)));
            }
        }
    }

    /// The port's debugfs file as key -> value.
    pub(super) fn debugfs(&mut self, port: &str) -> Result<BTreeMap<String, String>, CaseError> {
        let d = self.op(GuestOp::Debugfs { port: port.into() })?;
        if d.ret < 0 {
            return Err(CaseError::Other(format!(
                "debugfs of {port}: errno {} ({})",
                d.errno,
                String::from_utf8_lossy(&d.data)
            )));
        }
        Ok(parse_debugfs(&String::from_utf8_lossy(&d.data)))
    }

    /// `port`'s node name if sysfs lists it with that name.
    pub(super) fn sysfs_node(&mut self, port: &str) -> Result<Option<String>, CaseError> {
        let d = self.op(GuestOp::Sysfs)?;
        Ok(parse_sysfs(&String::from_utf8_lossy(&d.data)).into_iter().find(|(_, n)| n == port).map(|(dev, _)| dev))
    }
}

/// `key: value` lines of a virtio-ports debugfs file.
pub(crate) fn parse_debugfs(text: &str) -> BTreeMap<String, String> {
    text.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect()
}

/// `node name` lines of a SYSFS guest op: (node, name); unnamed ports have an empty name.
pub(crate) fn parse_sysfs(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (dev, name) = l.split_once(' ').unwrap_or((l, ""));
            (!dev.is_empty()).then(|| (dev.to_string(), name.to_string()))
        })
        .collect()
}

/// The number `key` of a debugfs map.
pub(super) fn num(map: &BTreeMap<String, String>, key: &str) -> Result<u64, CaseError> {
    map.get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| CaseError::Other(format!("debugfs has no numeric {key}: {map:?}")))
}

/// One `read` from the host end that waits at most until `end`: `Ok(0)` means the peer
/// closed, a timeout is an error naming `what`.
pub(super) fn read_some(
    s: &mut UnixStream,
    buf: &mut [u8],
    end: Instant,
    what: &dyn Fn() -> String,
) -> Result<usize, CaseError> {
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CaseError::Other(what()));
        }
        s.set_read_timeout(Some(left)).map_err(|e| CaseError::Other(format!("host socket: {e}")))?;
        match s.read(buf) {
            Ok(k) => return Ok(k),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(CaseError::Other(format!("host read: {e}"))),
        }
    }
}

/// Reads exactly `n` bytes from the host end within `timeout`.
pub(super) fn read_n(s: &mut UnixStream, n: usize, timeout: Duration) -> Result<Vec<u8>, CaseError> {
    let end = Instant::now() + timeout;
    let mut out = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let what = || format!("host read {got} of {n} bytes within {timeout:?}");
        match read_some(s, &mut out[got..], end, &what)? {
            0 => return Err(CaseError::Other(format!("host end closed after {got} of {n} bytes"))),
            k => got += k,
        }
    }
    Ok(out)
}

/// Writes all of `bytes` to the host end.
pub(super) fn host_write(s: &mut UnixStream, bytes: &[u8]) -> Result<(), CaseError> {
    s.write_all(bytes).map_err(|e| CaseError::Other(format!("host write: {e}")))
}

/// `n` bytes of the pattern with `seed`.
pub(super) fn pattern_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    pattern::fill(seed, 0, &mut b);
    b
}

/// `ret R errno E` of a completed guest op.
pub(super) fn errno_of(d: &GuestOpDone) -> String {
    format!("ret {} errno {}", d.ret, d.errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debugfs_and_sysfs_texts_parse() {
        let d = parse_debugfs("name: other.vport.p\nguest_connected: 1\nbytes_sent: 10\nis_console: no\n");
        assert_eq!(d.get("name").map(String::as_str), Some("other.vport.p"));
        assert_eq!(num(&d, "bytes_sent").unwrap(), 10);
        assert!(num(&d, "is_console").is_err());
        let s = parse_sysfs("vport0p1 org.vport.ops.ctl\nvport0p5 \n");
        assert_eq!(s, vec![("vport0p1".into(), "org.vport.ops.ctl".into()), ("vport0p5".into(), String::new())]);
    }
}
