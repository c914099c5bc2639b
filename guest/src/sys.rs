//! Small wrappers around the system facts the agent needs: the monotonic clock, random session
//! ids and nonces, the values HELLO reports about the guest (kernel release, boot id), its own
//! costs (CPU, RSS, open files), and how its allocator gives memory back.

use nix::time::{clock_gettime, ClockId};
use std::sync::atomic::{AtomicU64, Ordering};

/// Allocations of at least this size are mapped on their own and unmapped when freed.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Makes large buffers (a 1 MiB frame's) go back to the system when freed. glibc raises its
/// mmap threshold after each large free, so that later large buffers come from the heap, which
/// keeps them: after a stream of 1 MiB frames the idle agent held 6 MiB (RSS) where it holds
/// 3 MiB otherwise. A fixed threshold (glibc's default start, 128 KiB) stops that. Returns
/// whether the allocator took the setting (`false` where it is not glibc's).
///
/// # Safety
///
/// glibc's `mallopt` is not thread-safe: call this before the process starts any other thread.
pub unsafe fn return_large_buffers() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: the caller guarantees no other thread exists; mallopt only sets an allocator
        // tunable from plain integers.
        unsafe { nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

/// Nanoseconds on `CLOCK_MONOTONIC` (what the kernel's own log timestamps approximate).
pub fn monotonic_ns() -> u64 {
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec() as u64),
        // CLOCK_MONOTONIC cannot fail on Linux; 0 keeps the signature total.
        Err(_) => 0,
    }
}

/// Fills `buf` with random bytes without ever blocking.
///
/// Session ids and nonces only need to differ between sessions and boots, not to be secret, so
/// an early-boot guest whose CRNG is not initialised yet must not stall the agent:
/// `GRND_INSECURE` (Linux >= 5.6) never blocks; older kernels get `GRND_NONBLOCK`, and if that
/// has no entropy yet, a clock-seeded splitmix64 stream fills the gap.
pub fn fill_random(buf: &mut [u8]) {
    for flags in [nix::libc::GRND_INSECURE, nix::libc::GRND_NONBLOCK] {
        let mut filled = 0;
        while filled < buf.len() {
            let rest = &mut buf[filled..];
            // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes that outlives the
            // call; getrandom writes at most that many bytes into it and keeps no reference.
            let n = unsafe { nix::libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), flags) };
            if n > 0 {
                filled += n as usize;
            } else if nix::errno::Errno::last() != nix::errno::Errno::EINTR {
                break;
            }
        }
        if filled == buf.len() {
            return;
        }
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut state = monotonic_ns() ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed);
    for chunk in buf.chunks_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// A random u64.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    fill_random(&mut b);
    u64::from_le_bytes(b)
}

/// Guest kernel release (`uname -r`), or `"unknown"`.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain old data (arrays of c_char), so all-zero is a valid value.
    let mut u: nix::libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname; uname fills it and keeps no reference.
    if unsafe { nix::libc::uname(&mut u) } != 0 {
        return "unknown".to_owned();
    }
    let bytes: Vec<u8> = u.release.iter().map(|&c| c as u8).collect();
    let release = std::ffi::CStr::from_bytes_until_nul(&bytes).unwrap_or_default();
    release.to_str().map(str::to_owned).unwrap_or_else(|_| "unknown".to_owned())
}

/// Guest boot id (`/proc/sys/kernel/random/boot_id`, trimmed), or `"unknown"` when /proc is not
/// mounted.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The agent's CPU time so far (user + system, all threads), in nanoseconds, from
/// `getrusage(RUSAGE_SELF)` (microsecond resolution; the kernel derives it from the scheduler's
/// precise runtime). 0 if the call fails, which it cannot for `RUSAGE_SELF`.
pub fn cpu_ns() -> u64 {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv_ns = |t: nix::sys::time::TimeVal| {
                (t.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_usec() as u64 * 1_000)
            };
            tv_ns(u.user_time()).saturating_add(tv_ns(u.system_time()))
        }
        Err(_) => 0,
    }
}

/// The agent's resident set size in KiB (`/proc/self/statm`, second field), or 0 when /proc is
/// not mounted.
pub fn rss_kib() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|f| f.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) };
    pages.saturating_mul(u64::try_from(page).unwrap_or(4096)) / 1024
}

/// The number of file descriptors the agent holds open (entries of `/proc/self/fd`, less the one
/// the count itself uses), or 0 when /proc is not mounted. A soak compares it over time: a
/// count that grows is a leak.
pub fn open_fds() -> u64 {
    match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => (dir.count() as u64).saturating_sub(1),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_values_differ() {
        let a: Vec<u64> = (0..8).map(|_| random_u64()).collect();
        let mut b = a.clone();
        b.sort_unstable();
        b.dedup();
        assert_eq!(b.len(), a.len(), "{a:?}");
    }

    #[test]
    fn cpu_time_and_rss_are_reported() {
        // Burn a little CPU so the counter must have moved from zero.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_ns() > 0);
        assert!(rss_kib() > 0);
    }

    #[test]
    fn an_opened_file_is_counted_and_its_close_uncounted() {
        // The count is the process's, and tests on other threads open files too: an attempt
        // that another thread disturbed is tried again; one undisturbed attempt must show it.
        let undisturbed = (0..200).any(|_| {
            let before = open_fds();
            let f = std::fs::File::open("/proc/self/statm").unwrap();
            let during = open_fds();
            drop(f);
            let after = open_fds();
            (during, after) == (before + 1, before)
        });
        assert!(undisturbed, "opening a file never moved the count by exactly one");
    }

    #[test]
    fn clock_advances() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
