//! The host's TSC rate, for a `microvm` guest under TCG.
//!
//! Under TCG a guest's `rdtsc` reads the host's TSC (QEMU's `cpu_get_host_ticks`), so the guest
//! kernel must learn the host's rate. It calibrates against the PIT, which fails when the host
//! is busy (the vCPU thread is preempted between PIT reads); on `pc` and `q35` it then falls back
//! to the ACPI PM timer, but `microvm` has neither a PM timer nor an HPET, so the kernel marks
//! the TSC unusable ("tsc: Unable to calibrate against PIT ... No reference (HPET/PMTIMER)
//! available") and hangs before `/init`. `tsc_early_khz=` on the kernel command line gives it
//! the rate instead ([`kernel_param`]); it is measured once per process ([`host_tsc_khz`]).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long the measurement spans: the clock reads around it are a few microseconds apart, so
/// the rate is within 0.01%.
const SPAN: Duration = Duration::from_millis(40);

/// The host's TSC rate in kHz, measured against the monotonic clock over 40 ms on first use;
/// `None` where there is no TSC to read (not x86_64) or the measurement is not plausible.
pub fn host_tsc_khz() -> Option<u32> {
    static KHZ: OnceLock<Option<u32>> = OnceLock::new();
    *KHZ.get_or_init(measure)
}

#[cfg(target_arch = "x86_64")]
fn measure() -> Option<u32> {
    // SAFETY: rdtsc reads a counter; it has no preconditions on x86_64.
    let tsc = || unsafe { std::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    // Not a synchronisation: the interval is what is measured.
    std::thread::sleep(SPAN);
    let (c1, t1) = (tsc(), Instant::now());
    khz(c1.wrapping_sub(c0), t1 - t0)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<u32> {
    None
}

/// `ticks` over `elapsed` in kHz, if it is a plausible TSC rate (1 MHz to 100 GHz).
fn khz(ticks: u64, elapsed: Duration) -> Option<u32> {
    let micros = elapsed.as_micros();
    if micros == 0 {
        return None;
    }
    let khz = u128::from(ticks) * 1000 / micros;
    (1_000..=100_000_000).contains(&khz).then_some(khz as u32)
}

/// The kernel parameter that gives the guest the TSC rate `khz`.
pub fn kernel_param(khz: u32) -> String {
    format!("tsc_early_khz={khz}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_ticks_per_millisecond_within_plausible_bounds() {
        assert_eq!(khz(2_600_000_000, Duration::from_secs(1)), Some(2_600_000));
        assert_eq!(khz(104_000_000, Duration::from_millis(40)), Some(2_600_000));
        assert_eq!(khz(5, Duration::from_secs(1)), None, "a counter that barely moves is no TSC");
        assert_eq!(khz(1, Duration::ZERO), None);
        assert_eq!(kernel_param(2_599_998), "tsc_early_khz=2599998");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_host_has_a_tsc_rate() {
        let khz = host_tsc_khz().expect("an x86_64 host has a TSC");
        assert!((100_000..=10_000_000).contains(&khz), "{khz} kHz");
        assert_eq!(host_tsc_khz(), Some(khz), "measured once");
    }
}
