//! The guest group's cases about data and counters: host data before the guest opens, data
//! discarded at close, the debugfs counters, guest data lost when the host leaves, and SIGIO
//! on data and unplug.

use super::super::case::{CaseError, Observation};
use super::super::support::alive;
use super::calls::BLOCK_WINDOW;
use super::program::{host_write, num, pattern_bytes, read_n, read_some, Guest, POLLIN, POLLOUT};
use super::state::{GuestGroup, HOT, L, P, Q};
use crate::qemu::controller_id;
use crate::wait::wait_until;
use std::time::{Duration, Instant};
use vport_common::message::GuestOp;
use vport_common::pattern;

/// `host-writes-before-guest-opens`.
pub(super) fn host_writes_before_guest_opens(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    let chardev = st.rig.port(Q)?.chardev_id.clone();
    let mut s = st.trace.connect_raw(&st.rig, Q)?;
    let data = pattern_bytes(31, 4096);
    host_write(&mut s, &data)?;
    let closed_in_guest = st.rig.qmp.frontend_open(&chardev)? == Some(false);
    let h = st.g.open(Q, false, false)?;
    let d = st.g.op(GuestOp::Read { handle: h, bytes: 4096, all: true })?;
    st.hq = Some((h, s));
    let ok = d.bytes == 4096 && d.digest == pattern::pattern_digest(31, 4096);
    Ok(Observation::check(
        closed_in_guest && ok,
        format!(
            "guest had the port closed while the host wrote: {closed_in_guest}; after the open it read {} \
             bytes, intact: {ok}",
            d.bytes
        ),
    ))
}

/// `close-discards-unread`.
pub(super) fn close_discards_unread(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    let Some((h, mut s)) = st.hq.take() else {
        return Err(CaseError::Other("host-writes-before-guest-opens left no open port".into()));
    };
    let g = &mut st.g;
    let before = g.debugfs(Q)?;
    let (recv0, disc0) = (num(&before, "bytes_received")?, num(&before, "bytes_discarded")?);
    // Less than one receive buffer (a page), so QEMU delivers it in one piece: once the
    // guest sees POLLIN, all of it is in the guest's buffers. (bytes_received counts a
    // buffer when the driver takes it from the ring, so it cannot show arrival.)
    const N: u64 = 3000;
    host_write(&mut s, &pattern_bytes(32, N as usize))?;
    g.wait_mask(&st.rig, h, POLLIN)?;
    g.close(h)?;
    let after = g.debugfs(Q)?;
    let disc = num(&after, "bytes_discarded")? - disc0;
    let recv = num(&after, "bytes_received")? - recv0;
    Ok(Observation::check(
        disc == N && recv == N,
        format!(
            "host wrote {N} bytes the guest never read; after close bytes_received +{recv}, bytes_discarded +{disc}"
        ),
    ))
}

/// `debugfs-counters`.
pub(super) fn debugfs_counters(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    let g = &mut st.g;
    let h = g.open(P, false, false)?;
    let mut s = st.trace.connect_raw(&st.rig, P)?;
    g.wait_mask(&st.rig, h, POLLOUT)?;
    let d0 = g.debugfs(P)?;
    let w = g.op(GuestOp::Write { handle: h, seed: 41, bytes: 1000 })?;
    let got = read_n(&mut s, 1000, st.t)?;
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
}

/// The most one blocking write() puts in one out-queue buffer: `port_fops_write` in Linux's
/// drivers/char/virtio_console.c caps each write at 32 KiB, and a buffer takes one descriptor.
const GUEST_WRITE_CHUNK: u64 = 32 << 10;
/// The out queue's ring size to assume where QEMU cannot tell (no `x-query-virtio`): QEMU's
/// `VIRTQUEUE_MAX_SIZE`, which virtio-mmio offers and Linux takes; PCI keeps the device's 128.
const RING_MAX: u64 = 1024;

/// `guest-to-host-loss-on-disconnect`.
pub(super) fn guest_to_host_loss_on_disconnect(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    const FIRST: usize = 1 << 20;
    const MARK: usize = 4096;
    let (g, rig, t) = (&mut st.g, &st.rig, st.t);
    // The stream must outlast what the host reads, QEMU's socket buffer and a full out queue,
    // or the guest never blocks and all of it (end marker included) sits in the ring when the
    // host leaves, to be discarded. The ring is 128 on PCI but 1024 on virtio-mmio (microvm):
    // virtio_mmio_read answers QUEUE_NUM_MAX with VIRTQUEUE_MAX_SIZE and Linux's vm_setup_vq
    // takes it, so 1024 buffers of 32 KiB hold 32 MiB.
    let controller = controller_id(rig.port(L)?.controller);
    // Every data queue of a virtio-serial device has the same size; 1 is port 0's out queue.
    let ring = rig.qmp.virtio_vring_num(&controller, 1)?.unwrap_or(RING_MAX);
    let total: u64 = (8 << 20).max(FIRST as u64 + ring * GUEST_WRITE_CHUNK + (4 << 20));
    let mut s = st.trace.connect_raw(rig, L)?;
    let h = g.open(L, false, false)?;
    g.wait_mask(rig, h, POLLOUT)?;
    let id = g.start(GuestOp::Write { handle: h, seed: 51, bytes: total })?;
    // Queued behind the stream on the same handle: its arrival marks the end of the stream.
    let mark_id = g.start(GuestOp::Write { handle: h, seed: 52, bytes: MARK as u64 })?;
    let mut received = read_n(&mut s, FIRST, crate::speed::scaled(Duration::from_secs(120)))?;
    // The host stops reading: QEMU fills the socket, throttles the port, and the guest's
    // out queue fills (debugfs outvq_full). Then the host leaves with all that queued.
    let backed_up = wait_until("the guest's out queue to fill", t, Duration::from_millis(20), alive(rig), || {
        g.debugfs(L).ok().filter(|m| m.get("outvq_full").map(String::as_str) == Some("1"))
    })
    .is_ok();
    drop(s);
    let blocked = g.within(id, BLOCK_WINDOW)?.is_none();
    let mut s = st.trace.connect_raw(rig, L)?;
    let mark = pattern_bytes(52, MARK);
    let end = Instant::now() + crate::speed::scaled(Duration::from_secs(120));
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
        done.bytes == total && got <= total && tail_ok,
        format!(
            "out queue ring {ring}; host read {FIRST} bytes, stopped reading (guest out queue full: {backed_up}), left; guest wrote {} \
             bytes (the write {} while no host was connected); lost {lost} bytes ({} KiB) at stream offset \
             {hole}; everything after the hole arrived intact after the reconnect: {tail_ok}",
            done.bytes,
            if blocked { "blocked" } else { "did not block" },
            lost / 1024
        ),
    ))
}

/// `sigio-data-and-unplug`.
pub(super) fn sigio_data_and_unplug(st: &mut GuestGroup) -> Result<Observation, CaseError> {
    let t = st.t;
    let info = st.rig.hotplug_serial_port(HOT, 0)?;
    st.trace.add_port(&info);
    let (g, rig) = (&mut st.g, &st.rig);
    wait_until("the hot-plugged port's name in sysfs", t, Duration::from_millis(50), alive(rig), || {
        g.sysfs_node(HOT).ok().flatten()
    })?;
    let h = g.open(HOT, false, true)?;
    let count = |g: &mut Guest| -> Result<(u64, Vec<u16>), CaseError> {
        let d = g.op(GuestOp::SigioCount { handle: h })?;
        let masks = d.data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        Ok((d.ret as u64, masks))
    };
    let wait_more = |g: &mut Guest, than: u64, what: &str| -> Result<u64, CaseError> {
        Ok(wait_until(&format!("SIGIO on {what}"), t, Duration::from_millis(20), alive(rig), || {
            count(g).ok().map(|(c, _)| c).filter(|c| *c > than)
        })?)
    };
    let c0 = count(g)?.0;
    let mut s = st.trace.connect_raw(rig, HOT)?;
    let c1 = wait_more(g, c0, "host connect")?;
    host_write(&mut s, b"sigio")?;
    let c2 = wait_more(g, c1, "data arrival")?;
    rig.qmp.device_del(&info.id)?;
    let c3 = wait_more(g, c2, "unplug")?;
    let (_, masks) = count(g)?;
    g.close(h)?;
    drop(s);
    st.rig.vm.remove_port(HOT);
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
}
