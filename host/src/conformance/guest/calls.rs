//! The guest group's cases about single system calls with and without a host client: open,
//! read, write and poll, the blocking ones observed as blocked and then completing.
//!
//! "Blocks" is observed with a bounded window: the operation has not completed
//! [`BLOCK_WINDOW`] after it started. The window is the measurement, not a synchronisation.

use super::super::case::{CaseError, Observation};
use super::program::{errno_of, host_write, parse_sysfs, pattern_bytes, read_n, IN_OUT, POLLHUP, POLLIN, POLLOUT};
use super::state::{GuestGroup, CON, CTL, L, P, Q};
use nix::libc::{EAGAIN, ENXIO};
use std::time::{Duration, Instant};
use vport_common::message::GuestOp;
use vport_common::pattern::{self, StreamDigest};

/// How long an operation must stay incomplete to count as blocked.
pub(super) const BLOCK_WINDOW: Duration = Duration::from_millis(1000);

/// `sysfs-name-appears`.
pub(super) fn sysfs_name_appears(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    let d = st.g.op(GuestOp::Sysfs)?;
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
}

/// `virtconsole-vport-enxio`.
pub(super) fn virtconsole_vport_enxio(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    let d = st.g.op(GuestOp::Open { port: CON.into(), nonblock: true, sigio: false })?;
    if d.ret > 0 {
        st.g.close(d.ret as u32)?;
    }
    let path = String::from_utf8_lossy(&d.data).to_string();
    Ok(Observation::check((d.ret, d.errno) == (-1, ENXIO), format!("open {path}: {}", errno_of(&d))))
}

/// `read-no-host-returns-0`.
pub(super) fn read_no_host_returns_0(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    let h = st.g.open(P, false, false)?;
    let d = st.g.op(GuestOp::Read { handle: h, bytes: 64, all: false })?;
    st.g.close(h)?;
    Ok(Observation::check(
        d.ret == 0 && d.data.is_empty(),
        format!("blocking read: {} after {} us", errno_of(&d), d.elapsed_ns / 1000),
    ))
}

/// `poll-mask-no-host`.
pub(super) fn poll_mask_no_host(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    let h = st.g.open(P, false, false)?;
    let (ret, mask) = st.g.poll(h)?;
    st.g.close(h)?;
    Ok(Observation::check((ret, mask) == (1, POLLIN | POLLHUP), format!("ret {ret} revents {mask:#x}")))
}

/// `nonblock-write-no-host-eagain`.
pub(super) fn nonblock_write_no_host_eagain(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    let h = st.g.open(P, true, false)?;
    let d = st.g.op(GuestOp::Write { handle: h, seed: 5, bytes: 10 })?;
    st.g.close(h)?;
    Ok(Observation::check(
        (d.ret, d.errno, d.bytes) == (-1, EAGAIN, 0),
        format!("{}, {} bytes written", errno_of(&d), d.bytes),
    ))
}

/// `write-no-host-blocks-10b`.
pub(super) fn write_no_host_blocks_10b(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    write_no_host_blocks(st, 10, 10)
}

/// `write-no-host-blocks-64mib`.
pub(super) fn write_no_host_blocks_64mib(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    write_no_host_blocks(st, 64 << 20, 64)
}

/// A blocking write of `bytes` (pattern `seed`) on P with no host client; it completes when
/// one connects. The handle and the host end stay for the next cases.
fn write_no_host_blocks(st: &mut GuestGroup, bytes: u64, seed: u64) -> Result<Observation, CaseError> {
    let h = match st.hp {
        Some(h) => h,
        None => {
            let h = st.g.open(P, false, false)?;
            st.hp = Some(h);
            h
        }
    };
    if let Some(old) = st.host_p.take() {
        drop(old);
        st.g.wait_mask(&st.rig, h, POLLHUP)?;
    }
    let g = &mut st.g;
    let id = g.start(GuestOp::Write { handle: h, seed, bytes })?;
    let early = g.within(id, BLOCK_WINDOW)?;
    let mut s = st.trace.connect_raw(&st.rig, P)?;
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
    st.host_p = Some(s);
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
}

fn no_open_port() -> CaseError {
    CaseError::Other("the blocking-write cases left no open port with a host".into())
}

/// `blocking-read-returns-on-host-write`.
pub(super) fn blocking_read_returns_on_host_write(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    let (Some(h), Some(s)) = (st.hp, st.host_p.as_mut()) else { return Err(no_open_port()) };
    let g = &mut st.g;
    let id = g.start(GuestOp::Read { handle: h, bytes: 64 * 1024, all: false })?;
    let early = g.within(id, BLOCK_WINDOW)?;
    let data = pattern_bytes(21, 100);
    let wrote = Instant::now();
    host_write(s, &data)?;
    let d = g.finish(id, st.t)?;
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
}

/// `poll-masks-host-connected`.
pub(super) fn poll_masks_host_connected(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    let (Some(h), Some(s)) = (st.hp, st.host_p.as_mut()) else { return Err(no_open_port()) };
    let g = &mut st.g;
    let (_, idle) = g.poll(h)?;
    host_write(s, b"0123456789")?;
    g.wait_mask(&st.rig, h, POLLIN)?;
    let (_, pending) = g.poll(h)?;
    let r = g.op(GuestOp::Read { handle: h, bytes: 64, all: false })?;
    let (_, drained) = g.poll(h)?;
    Ok(Observation::check(
        idle == POLLOUT && pending == IN_OUT && r.ret == 10 && drained == POLLOUT,
        format!("nothing pending {idle:#x}; data pending {pending:#x}; read {}; after reading {drained:#x}", r.ret),
    ))
}

/// `poll-mask-host-closed-unread`.
pub(super) fn poll_mask_host_closed_unread(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    let (Some(h), Some(mut s)) = (st.hp.take(), st.host_p.take()) else { return Err(no_open_port()) };
    let g = &mut st.g;
    let data = pattern_bytes(22, 20);
    host_write(&mut s, &data)?;
    g.wait_mask(&st.rig, h, POLLIN)?;
    drop(s);
    g.wait_mask(&st.rig, h, POLLHUP)?;
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
}
