//! Converting kernel timestamps (`CLOCK_BOOTTIME`, what BPF records) to wall-clock time.

use std::time::{Duration, SystemTime};

/// Current `CLOCK_BOOTTIME` in nanoseconds.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_BOOTTIME exists on every
    // kernel this agent supports, so the call cannot fail with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The wall-clock time of a `CLOCK_BOOTTIME` timestamp taken on this machine.
pub fn boot_ns_to_system_time(ns: u64) -> SystemTime {
    let age = Duration::from_nanos(boot_ns().saturating_sub(ns));
    SystemTime::now()
        .checked_sub(age)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The boot-clock time of a wall-clock time taken on this machine (a file's ctime).
pub fn system_time_to_boot_ns(t: SystemTime) -> u64 {
    let now = SystemTime::now();
    let boot = boot_ns();
    match now.duration_since(t) {
        Ok(age) => boot.saturating_sub(u64::try_from(age.as_nanos()).unwrap_or(u64::MAX)),
        Err(ahead) => {
            boot.saturating_add(u64::try_from(ahead.duration().as_nanos()).unwrap_or(u64::MAX))
        }
    }
}

/// The same as a protocol [`Timestamp`](guestwatch_protocol::Timestamp).
pub fn boot_ns_to_timestamp(ns: u64) -> guestwatch_protocol::Timestamp {
    guestwatch_protocol::Timestamp::from_system(boot_ns_to_system_time(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_clock_is_monotonic_and_converts_to_now() {
        let a = boot_ns();
        let b = boot_ns();
        assert!(b >= a && a > 0);
        let wall = boot_ns_to_system_time(b);
        let skew = SystemTime::now().duration_since(wall).unwrap_or_default();
        assert!(skew < Duration::from_secs(1), "{skew:?}");
    }
}
