//! The machine's speed factor: how much slower than vport's reference machine a guest runs
//! here, so that the suites' failure deadlines stretch on a slow or busy host instead of
//! failing there.
//!
//! A factor is measured from one boot: the time from starting the guest to the agent's HELLO,
//! against [`REFERENCE_BOOT`] (what a TCG guest takes on the 2-core machines vport's CI runs
//! on). It is never below 1 (a fast machine keeps the deadlines as written: they are bounds,
//! not targets) and never above [`MAX`] (past that the machine cannot run the suites in any
//! useful time, and an endless wait would hide a real hang). `vport run matrix` measures it
//! with a calibration boot and passes it to every suite it runs (`--speed-factor`); a suite run
//! by hand takes `--speed-factor` or `VPORT_SPEED_FACTOR`, else 1.
//!
//! What it scales: deadlines after which vport declares a failure ([`scaled`]): every
//! [`crate::wait::wait_until`], the suites' HELLO and reply deadlines, QMP's reply deadline,
//! QEMU's start. What it never scales: measurement windows (the bench's rounds, idle periods),
//! protocol timing (HELLO_REQUEST intervals, reopen delays) and windows in which the suites
//! check that something does *not* happen, which only grow more certain when longer.
//!
//! The factor is process-wide: set once, before a suite starts ([`set`]); read by every
//! deadline. Pure apart from that one cell; no I/O.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use thiserror::Error;

/// Boot to HELLO on the reference machine (TCG, 2 cores: 4 to 8 s measured; the middle).
pub const REFERENCE_BOOT: Duration = Duration::from_secs(6);

/// The largest factor: deadlines grow at most tenfold.
pub const MAX: f64 = 10.0;

/// The environment variable a suite reads its factor from (as `--speed-factor`).
pub const SPEED_FACTOR_ENV: &str = "VPORT_SPEED_FACTOR";

/// A speed factor, in `1.0..=MAX`.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct SpeedFactor(f64);

/// A speed factor that is not a number in `1..=10`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("speed factor {value:?}: {reason}; give a number from 1 to 10 (1: the deadlines as written)")]
pub struct SpeedFactorError {
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl SpeedFactor {
    /// The deadlines as written.
    pub const ONE: SpeedFactor = SpeedFactor(1.0);

    /// The factor of a machine whose guest took `boot` from start to HELLO: `boot` over
    /// [`REFERENCE_BOOT`], rounded up to a tenth, within `1..=MAX`.
    pub fn from_boot(boot: Duration) -> SpeedFactor {
        let ratio = boot.as_secs_f64() / REFERENCE_BOOT.as_secs_f64();
        SpeedFactor(((ratio * 10.0).ceil() / 10.0).clamp(1.0, MAX))
    }

    /// The factor as a number.
    pub fn get(self) -> f64 {
        self.0
    }

    /// `d` stretched by the factor.
    pub fn scale(self, d: Duration) -> Duration {
        d.mul_f64(self.0)
    }
}

impl Default for SpeedFactor {
    fn default() -> SpeedFactor {
        SpeedFactor::ONE
    }
}

impl std::fmt::Display for SpeedFactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1}", self.0)
    }
}

impl FromStr for SpeedFactor {
    type Err = SpeedFactorError;

    fn from_str(s: &str) -> Result<SpeedFactor, SpeedFactorError> {
        let bad = |reason| SpeedFactorError { value: s.to_string(), reason };
        let v: f64 = s.trim().parse().map_err(|_| bad("not a number"))?;
        if !v.is_finite() || !(1.0..=MAX).contains(&v) {
            return Err(bad("out of range"));
        }
        Ok(SpeedFactor(v))
    }
}

/// The process's factor, as the bits of an `f64` (0: never set, which reads as 1).
static FACTOR: AtomicU64 = AtomicU64::new(0);

/// Sets the process's factor (before a suite starts its VMs).
pub fn set(factor: SpeedFactor) {
    FACTOR.store(factor.0.to_bits(), Ordering::Relaxed);
}

/// The process's factor ([`SpeedFactor::ONE`] unless [`set`]).
pub fn get() -> SpeedFactor {
    match FACTOR.load(Ordering::Relaxed) {
        0 => SpeedFactor::ONE,
        bits => SpeedFactor(f64::from_bits(bits)),
    }
}

/// A failure deadline `d` stretched by the process's factor.
pub fn scaled(d: Duration) -> Duration {
    get().scale(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_gives_its_ratio_to_the_reference_rounded_up_within_bounds() {
        assert_eq!(SpeedFactor::from_boot(Duration::from_secs(3)), SpeedFactor::ONE, "never below 1");
        assert_eq!(SpeedFactor::from_boot(REFERENCE_BOOT), SpeedFactor::ONE);
        assert_eq!(SpeedFactor::from_boot(Duration::from_millis(9_000)).get(), 1.5);
        assert_eq!(SpeedFactor::from_boot(Duration::from_millis(9_050)).get(), 1.6, "rounded up");
        assert_eq!(SpeedFactor::from_boot(Duration::from_secs(600)).get(), MAX, "never above MAX");
        assert_eq!(SpeedFactor::from_boot(Duration::from_millis(9_000)).to_string(), "1.5");
    }

    #[test]
    fn a_factor_scales_durations_and_parses_only_in_range() {
        let f: SpeedFactor = "2.5".parse().unwrap();
        assert_eq!(f.scale(Duration::from_secs(10)), Duration::from_secs(25));
        assert_eq!(SpeedFactor::ONE.scale(Duration::from_millis(1500)), Duration::from_millis(1500));
        assert_eq!(" 10 ".parse::<SpeedFactor>().unwrap().get(), 10.0);
        for bad in ["0.5", "11", "NaN", "inf", "fast", ""] {
            let e = bad.parse::<SpeedFactor>().unwrap_err();
            assert!(e.to_string().contains("give a number from 1 to 10"), "{bad}: {e}");
        }
        assert_eq!("0.5".parse::<SpeedFactor>().unwrap_err().reason, "out of range");
    }

    #[test]
    fn the_process_factor_is_one_until_set() {
        // The only test that sets it: others in this process read 1 before and must not mind
        // a factor of 1 after.
        assert_eq!(get(), SpeedFactor::ONE);
        assert_eq!(scaled(Duration::from_secs(7)), Duration::from_secs(7));
        set(SpeedFactor::ONE);
        assert_eq!(get(), SpeedFactor::ONE);
    }
}
