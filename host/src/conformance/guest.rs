//! The guest-side cases: an ordinary guest program (the agent's guest ops, run on ports the
//! agent does not serve) opens, reads, writes, polls and closes while the host connects, writes
//! and leaves. The agent is driven over its own control port; the target ports' host ends are
//! plain byte streams ([`Rig::connect_raw`]).
//!
//! "Blocks" is observed with a bounded window: the operation has not completed [`BLOCK_WINDOW`]
//! after it started. The window is the measurement, not a synchronisation.

use super::cases::{alive, boot, note_versions, HOST};
use super::{CaseError, Observation, Recorder, SuiteOptions};
use crate::link::{Link, LinkError};
use crate::qemu::{PortConfig, PortKind};
use crate::rig::Rig;
use crate::wait::wait_until;
use nix::libc::{EAGAIN, ENXIO};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vport_common::message::{GuestOp, GuestOpDone};
use vport_common::pattern::{self, StreamDigest};

const CTL: &str = "org.vport.ops.ctl";
/// Read, write and poll cases.
const P: &str = "other.vport.p";
/// Host data before the guest opens; discard at close.
const Q: &str = "other.vport.q";
/// Guest -> host loss on host disconnect.
const L: &str = "other.vport.loss";
/// A virtconsole (its vport node refuses open).
const CON: &str = "other.vport.con";
/// Hot-plugged for SIGIO on data and unplug.
const HOT: &str = "other.vport.sig";

/// How long an operation must stay incomplete to count as blocked.
const BLOCK_WINDOW: Duration = Duration::from_millis(1000);
const POLLIN: u16 = nix::libc::POLLIN as u16;
const POLLOUT: u16 = nix::libc::POLLOUT as u16;
const POLLHUP: u16 = nix::libc::POLLHUP as u16;
const IN_OUT: u16 = POLLIN | POLLOUT;

/// The guest program: guest ops over the agent's control link.
struct Guest {
    link: Link<UnixStream>,
    t: Duration,
}

impl Guest {
    fn op(&mut self, op: GuestOp) -> Result<GuestOpDone, CaseError> {
        Ok(self.link.guest_op(op, self.t)?)
    }

    fn start(&mut self, op: GuestOp) -> Result<u32, CaseError> {
        Ok(self.link.start_guest_op(op)?)
    }

    fn finish(&mut self, id: u32, timeout: Duration) -> Result<GuestOpDone, CaseError> {
        Ok(self.link.await_guest_op(id, timeout)?)
    }

    /// `Some(done)` if op `id` completes within `window`, `None` if it is still running.
    fn within(&mut self, id: u32, window: Duration) -> Result<Option<GuestOpDone>, CaseError> {
        match self.link.await_guest_op(id, window) {
            Ok(d) => Ok(Some(d)),
            Err(LinkError::Timeout { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn open(&mut self, port: &str, nonblock: bool, sigio: bool) -> Result<u32, CaseError> {
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

    fn close(&mut self, handle: u32) -> Result<(), CaseError> {
        let d = self.op(GuestOp::Close { handle })?;
        if d.ret != 0 {
            return Err(CaseError::Other(format!("guest close of handle {handle}: errno {}", d.errno)));
        }
        Ok(())
    }

    /// poll(POLLIN|POLLOUT, 0): (ret, revents).
    fn poll(&mut self, handle: u32) -> Result<(i64, u16), CaseError> {
        let d = self.op(GuestOp::Poll { handle, events: IN_OUT, timeout_ms: 0 })?;
        Ok((d.ret, d.mask))
    }

    /// Waits (bounded) until poll's revents contain `bits`.
    fn wait_mask(&mut self, rig: &Rig, handle: u32, bits: u16) -> Result<u16, CaseError> {
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
    fn debugfs(&mut self, port: &str) -> Result<BTreeMap<String, String>, CaseError> {
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
    fn sysfs_node(&mut self, port: &str) -> Result<Option<String>, CaseError> {
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

fn num(map: &BTreeMap<String, String>, key: &str) -> Result<u64, CaseError> {
    map.get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| CaseError::Other(format!("debugfs has no numeric {key}: {map:?}")))
}

/// One `read` from the host end that waits at most until `end`: `Ok(0)` means the peer
/// closed, a timeout is an error naming `what`.
fn read_some(s: &mut UnixStream, buf: &mut [u8], end: Instant, what: &dyn Fn() -> String) -> Result<usize, CaseError> {
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
fn read_n(s: &mut UnixStream, n: usize, timeout: Duration) -> Result<Vec<u8>, CaseError> {
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

fn host_write(s: &mut UnixStream, bytes: &[u8]) -> Result<(), CaseError> {
    s.write_all(bytes).map_err(|e| CaseError::Other(format!("host write: {e}")))
}

fn pattern_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    pattern::fill(seed, 0, &mut b);
    b
}

fn errno_of(d: &GuestOpDone) -> String {
    format!("ret {} errno {}", d.ret, d.errno)
}

pub(crate) fn guest_group(opts: &SuiteOptions, rec: &mut Recorder) -> Result<(), CaseError> {
    let t = opts.reply_timeout;
    let console = PortConfig { kind: PortKind::Console, ..PortConfig::serial(CON) };
    let ports =
        vec![PortConfig::serial(CTL), PortConfig::serial(P), PortConfig::serial(Q), PortConfig::serial(L), console];
    let mut rig = boot(opts, ports, |_| {})?;
    rec.watch_vm(&rig.vm);
    let mut link = rig.connect(CTL)?;
    rig.resume()?;
    let hs = link.handshake(opts.hello_timeout, HOST)?;
    note_versions(rec, &rig, &hs.hello.kernel_release);
    let mut g = Guest { link, t };

    rec.case("sysfs-name-appears", || {
        let d = g.op(GuestOp::Sysfs)?;
        let listing = parse_sysfs(&String::from_utf8_lossy(&d.data));
        let want = [CTL, P, Q, L, CON];
        let found: Vec<String> = want
            .iter()
            .map(|n| match listing.iter().find(|(_, name)| name == n) {
                Some((dev, _)) => format!("{n}={dev}"),
                None => format!("{n} MISSING"),
            })
            .collect();
        let all = want.iter().all(|n| listing.iter().any(|(_, name)| name == n));
        Ok(Observation::check(all, format!("{} nodes in sysfs; {}", listing.len(), found.join(", "))))
    });

    rec.case("virtconsole-vport-enxio", || {
        let d = g.op(GuestOp::Open { port: CON.into(), nonblock: true, sigio: false })?;
        if d.ret > 0 {
            g.close(d.ret as u32)?;
        }
        let path = String::from_utf8_lossy(&d.data).to_string();
        Ok(Observation::check((d.ret, d.errno) == (-1, ENXIO), format!("open {path}: {}", errno_of(&d))))
    });

    rec.case("read-no-host-returns-0", || {
        let h = g.open(P, false, false)?;
        let d = g.op(GuestOp::Read { handle: h, bytes: 64, all: false })?;
        g.close(h)?;
        Ok(Observation::check(
            d.ret == 0 && d.data.is_empty(),
            format!("blocking read: {} after {} us", errno_of(&d), d.elapsed_ns / 1000),
        ))
    });

    rec.case("poll-mask-no-host", || {
        let h = g.open(P, false, false)?;
        let (ret, mask) = g.poll(h)?;
        g.close(h)?;
        Ok(Observation::check((ret, mask) == (1, POLLIN | POLLHUP), format!("ret {ret} revents {mask:#x}")))
    });

    rec.case("nonblock-write-no-host-eagain", || {
        let h = g.open(P, true, false)?;
        let d = g.op(GuestOp::Write { handle: h, seed: 5, bytes: 10 })?;
        g.close(h)?;
        Ok(Observation::check(
            (d.ret, d.errno, d.bytes) == (-1, EAGAIN, 0),
            format!("{}, {} bytes written", errno_of(&d), d.bytes),
        ))
    });

    // The blocking writes: each starts with no host client on P and completes when one connects.
    let mut host_p: Option<UnixStream> = None;
    let mut hp: Option<u32> = None;
    for (name, bytes, seed) in
        [("write-no-host-blocks-10b", 10u64, 10u64), ("write-no-host-blocks-64mib", 64 << 20, 64)]
    {
        rec.case(name, || {
            let h = match hp {
                Some(h) => h,
                None => {
                    let h = g.open(P, false, false)?;
                    hp = Some(h);
                    h
                }
            };
            if let Some(old) = host_p.take() {
                drop(old);
                g.wait_mask(&rig, h, POLLHUP)?;
            }
            let id = g.start(GuestOp::Write { handle: h, seed, bytes })?;
            let early = g.within(id, BLOCK_WINDOW)?;
            let mut s = rig.connect_raw(P)?;
            let connected = Instant::now();
            let read_timeout = Duration::from_secs(300);
            let (host_side, done) = std::thread::scope(|sc| {
                let reader = sc.spawn(|| -> Result<(u64, u64, bool), CaseError> {
                    let mut digest = StreamDigest::new();
                    let mut intact = true;
                    let mut left = bytes as usize;
                    while left > 0 {
                        let chunk = read_n(&mut s, left.min(1 << 20), read_timeout)?;
                        intact &= pattern::first_mismatch(seed, digest.bytes(), &chunk).is_none();
                        digest.update(&chunk);
                        left -= chunk.len();
                    }
                    Ok((digest.bytes(), digest.digest(), intact))
                });
                let done = g.finish(id, read_timeout);
                (reader.join().unwrap_or_else(|_| Err(CaseError::Other("host reader panicked".into()))), done)
            });
            let (host_bytes, host_digest, intact) = host_side?;
            let done = done?;
            let after_connect = connected.elapsed();
            host_p = Some(s);
            let expect = pattern::pattern_digest(seed, bytes);
            Ok(Observation::check(
                early.is_none() && done.bytes == bytes && done.digest == expect && host_digest == expect && intact,
                format!(
                    "blocked for the {} ms window: {}; completed {} ms after the host connected: {} bytes written \
                     ({}); host received {host_bytes} bytes, intact: {intact}",
                    BLOCK_WINDOW.as_millis(),
                    early.is_none(),
                    after_connect.as_millis(),
                    done.bytes,
                    errno_of(&done)
                ),
            ))
        });
    }

    rec.case("blocking-read-returns-on-host-write", || {
        let (Some(h), Some(s)) = (hp, host_p.as_mut()) else {
            return Err(CaseError::Other("the blocking-write cases left no open port with a host".into()));
        };
        let id = g.start(GuestOp::Read { handle: h, bytes: 64 * 1024, all: false })?;
        let early = g.within(id, BLOCK_WINDOW)?;
        let data = pattern_bytes(21, 100);
        let wrote = Instant::now();
        host_write(s, &data)?;
        let d = g.finish(id, t)?;
        Ok(Observation::check(
            early.is_none() && d.ret == 100 && d.data == data,
            format!(
                "blocked for the {} ms window: {}; returned {} ({} bytes, intact: {}) {} ms after the host wrote",
                BLOCK_WINDOW.as_millis(),
                early.is_none(),
                d.ret,
                d.data.len(),
                d.data == data,
                wrote.elapsed().as_millis()
            ),
        ))
    });

    rec.case("poll-masks-host-connected", || {
        let (Some(h), Some(s)) = (hp, host_p.as_mut()) else {
            return Err(CaseError::Other("the blocking-write cases left no open port with a host".into()));
        };
        let (_, idle) = g.poll(h)?;
        host_write(s, b"0123456789")?;
        g.wait_mask(&rig, h, POLLIN)?;
        let (_, pending) = g.poll(h)?;
        let r = g.op(GuestOp::Read { handle: h, bytes: 64, all: false })?;
        let (_, drained) = g.poll(h)?;
        Ok(Observation::check(
            idle == POLLOUT && pending == IN_OUT && r.ret == 10 && drained == POLLOUT,
            format!("nothing pending {idle:#x}; data pending {pending:#x}; read {}; after reading {drained:#x}", r.ret),
        ))
    });

    rec.case("poll-mask-host-closed-unread", || {
        let (Some(h), Some(mut s)) = (hp.take(), host_p.take()) else {
            return Err(CaseError::Other("the blocking-write cases left no open port with a host".into()));
        };
        let data = pattern_bytes(22, 20);
        host_write(&mut s, &data)?;
        g.wait_mask(&rig, h, POLLIN)?;
        drop(s);
        g.wait_mask(&rig, h, POLLHUP)?;
        let (_, unread) = g.poll(h)?;
        let r1 = g.op(GuestOp::Read { handle: h, bytes: 64, all: false })?;
        let r2 = g.op(GuestOp::Read { handle: h, bytes: 64, all: false })?;
        let (_, after) = g.poll(h)?;
        g.close(h)?;
        Ok(Observation::check(
            unread == POLLIN | POLLHUP && r1.data == data && r2.ret == 0 && after == POLLIN | POLLHUP,
            format!(
                "host gone with 20 bytes unread: revents {unread:#x}; read {} (intact: {}); next read {}; \
                 after reading revents {after:#x}",
                r1.ret,
                r1.data == data,
                r2.ret
            ),
        ))
    });

    let mut hq: Option<(u32, UnixStream)> = None;
    rec.case("host-writes-before-guest-opens", || {
        let chardev = rig.port(Q)?.chardev_id.clone();
        let mut s = rig.connect_raw(Q)?;
        let data = pattern_bytes(31, 4096);
        host_write(&mut s, &data)?;
        let closed_in_guest = rig.qmp.frontend_open(&chardev)? == Some(false);
        let h = g.open(Q, false, false)?;
        let d = g.op(GuestOp::Read { handle: h, bytes: 4096, all: true })?;
        hq = Some((h, s));
        let ok = d.bytes == 4096 && d.digest == pattern::pattern_digest(31, 4096);
        Ok(Observation::check(
            closed_in_guest && ok,
            format!(
                "guest had the port closed while the host wrote: {closed_in_guest}; after the open it read {} \
                 bytes, intact: {ok}",
                d.bytes
            ),
        ))
    });

    rec.case("close-discards-unread", || {
        let Some((h, mut s)) = hq.take() else {
            return Err(CaseError::Other("host-writes-before-guest-opens left no open port".into()));
        };
        let before = g.debugfs(Q)?;
        let (recv0, disc0) = (num(&before, "bytes_received")?, num(&before, "bytes_discarded")?);
        // Less than one receive buffer (a page), so QEMU delivers it in one piece: once the
        // guest sees POLLIN, all of it is in the guest's buffers. (bytes_received counts a
        // buffer when the driver takes it from the ring, so it cannot show arrival.)
        const N: u64 = 3000;
        host_write(&mut s, &pattern_bytes(32, N as usize))?;
        g.wait_mask(&rig, h, POLLIN)?;
        g.close(h)?;
        let after = g.debugfs(Q)?;
        let disc = num(&after, "bytes_discarded")? - disc0;
        let recv = num(&after, "bytes_received")? - recv0;
        Ok(Observation::check(
            disc == N && recv == N,
            format!("host wrote {N} bytes the guest never read; after close bytes_received +{recv}, bytes_discarded +{disc}"),
        ))
    });

    rec.case("debugfs-counters", || {
        let h = g.open(P, false, false)?;
        let mut s = rig.connect_raw(P)?;
        g.wait_mask(&rig, h, POLLOUT)?;
        let d0 = g.debugfs(P)?;
        let w = g.op(GuestOp::Write { handle: h, seed: 41, bytes: 1000 })?;
        let got = read_n(&mut s, 1000, t)?;
        host_write(&mut s, &pattern_bytes(42, 2000))?;
        let r = g.op(GuestOp::Read { handle: h, bytes: 2000, all: true })?;
        let d1 = g.debugfs(P)?;
        g.close(h)?;
        let delta = |k: &str| -> Result<u64, CaseError> { Ok(num(&d1, k)? - num(&d0, k)?) };
        let (sent, recv, disc) = (delta("bytes_sent")?, delta("bytes_received")?, delta("bytes_discarded")?);
        let flags = |k: &str| d1.get(k).cloned().unwrap_or_default();
        let ok = w.bytes == 1000
            && got == pattern_bytes(41, 1000)
            && r.bytes == 2000
            && (sent, recv, disc) == (1000, 2000, 0)
            && flags("guest_connected") == "1"
            && flags("host_connected") == "1"
            && flags("is_console") == "no"
            && flags("name") == P;
        Ok(Observation::check(
            ok,
            format!(
                "guest wrote 1000, host wrote 2000: bytes_sent +{sent}, bytes_received +{recv}, bytes_discarded \
                 +{disc}; guest_connected {}, host_connected {}, is_console {}, name {}",
                flags("guest_connected"),
                flags("host_connected"),
                flags("is_console"),
                flags("name")
            ),
        ))
    });

    rec.case("guest-to-host-loss-on-disconnect", || {
        const TOTAL: u64 = 8 << 20;
        const FIRST: usize = 1 << 20;
        const MARK: usize = 4096;
        let mut s = rig.connect_raw(L)?;
        let h = g.open(L, false, false)?;
        g.wait_mask(&rig, h, POLLOUT)?;
        let id = g.start(GuestOp::Write { handle: h, seed: 51, bytes: TOTAL })?;
        // Queued behind the stream on the same handle: its arrival marks the end of the stream.
        let mark_id = g.start(GuestOp::Write { handle: h, seed: 52, bytes: MARK as u64 })?;
        let mut received = read_n(&mut s, FIRST, Duration::from_secs(120))?;
        // The host stops reading: QEMU fills the socket, throttles the port, and the guest's
        // out queue fills (debugfs outvq_full). Then the host leaves with all that queued.
        let backed_up = wait_until("the guest's out queue to fill", t, Duration::from_millis(20), alive(&rig), || {
            g.debugfs(L).ok().filter(|m| m.get("outvq_full").map(String::as_str) == Some("1"))
        })
        .is_ok();
        drop(s);
        let blocked = g.within(id, BLOCK_WINDOW)?.is_none();
        let mut s = rig.connect_raw(L)?;
        let mark = pattern_bytes(52, MARK);
        let end = Instant::now() + Duration::from_secs(120);
        let mut buf = vec![0u8; 1 << 16];
        while !received.ends_with(&mark) {
            let len = received.len();
            let what = || format!("the end marker never came ({len} bytes received)");
            match read_some(&mut s, &mut buf, end, &what)? {
                0 => return Err(CaseError::Other("host end closed before the end marker".into())),
                k => received.extend_from_slice(&buf[..k]),
            }
        }
        let done = g.finish(id, t)?;
        g.finish(mark_id, t)?;
        g.close(h)?;
        received.truncate(received.len() - MARK);
        let got = received.len() as u64;
        let lost = done.bytes.saturating_sub(got);
        // The stream must be the pattern with one hole: [0, hole) then [hole + lost, total).
        let hole = pattern::first_mismatch(51, 0, &received).unwrap_or(got);
        let tail_ok = pattern::first_mismatch(51, hole + lost, &received[hole as usize..]).is_none();
        Ok(Observation::check(
            done.bytes == TOTAL && got <= TOTAL && tail_ok,
            format!(
                "host read {FIRST} bytes, stopped reading (guest out queue full: {backed_up}), left; guest wrote {} \
                 bytes (the write {} while no host was connected); lost {lost} bytes ({} KiB) at stream offset \
                 {hole}; everything after the hole arrived intact after the reconnect: {tail_ok}",
                done.bytes,
                if blocked { "blocked" } else { "did not block" },
                lost / 1024
            ),
        ))
    });

    rec.case("sigio-data-and-unplug", || {
        let info = rig.hotplug_serial_port(HOT, 0)?;
        let g = &mut g;
        wait_until("the hot-plugged port's name in sysfs", t, Duration::from_millis(50), alive(&rig), || {
            g.sysfs_node(HOT).ok().flatten()
        })?;
        let h = g.open(HOT, false, true)?;
        let count = |g: &mut Guest| -> Result<(u64, Vec<u16>), CaseError> {
            let d = g.op(GuestOp::SigioCount { handle: h })?;
            let masks = d.data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            Ok((d.ret as u64, masks))
        };
        let wait_more = |g: &mut Guest, than: u64, what: &str| -> Result<u64, CaseError> {
            Ok(wait_until(&format!("SIGIO on {what}"), t, Duration::from_millis(20), alive(&rig), || {
                count(g).ok().map(|(c, _)| c).filter(|c| *c > than)
            })?)
        };
        let c0 = count(g)?.0;
        let mut s = rig.connect_raw(HOT)?;
        let c1 = wait_more(g, c0, "host connect")?;
        host_write(&mut s, b"sigio")?;
        let c2 = wait_more(g, c1, "data arrival")?;
        rig.qmp.device_del(&info.id)?;
        let c3 = wait_more(g, c2, "unplug")?;
        let (_, masks) = count(g)?;
        g.close(h)?;
        rig.vm.remove_port(HOT);
        let masks: Vec<String> = masks.iter().map(|m| format!("{m:#x}")).collect();
        Ok(Observation::check(
            c1 > c0 && c2 > c1 && c3 > c2,
            format!(
                "signals: {} on host connect, {} on data arrival, {} on unplug; poll masks at delivery {masks:?}",
                c1 - c0,
                c2 - c1,
                c3 - c2
            ),
        ))
    });
    drop(rig);
    Ok(())
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
