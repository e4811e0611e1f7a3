//! Exponential backoff, shared by job retries, re-forks and reconnects.

use std::time::Duration;

/// `base * 2^(n-1)` capped at `max` (n counts from 1; n = 0 gives zero).
pub fn exponential(base: Duration, max: Duration, n: u32) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32.checked_shl(n - 1).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

/// [`exponential`] spread by ±25 % so jobs that failed together do not retry together.
/// `unit` is a random number in `0.0..1.0`.
pub fn with_jitter(delay: Duration, unit: f64) -> Duration {
    delay.mul_f64(0.75 + unit.clamp(0.0, 1.0) * 0.5)
}

/// The delay before retry number `attempt` of a failed job.
pub fn retry_delay(attempt: i32, base: Duration, max: Duration) -> Duration {
    with_jitter(
        exponential(base, max, attempt.max(1) as u32),
        fastrand::f64(),
    )
    .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let got: Vec<u128> = (0..7)
            .map(|n| exponential(base, max, n).as_millis())
            .collect();
        assert_eq!(got, vec![0, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(exponential(base, max, 200), max);
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        let d = Duration::from_secs(8);
        assert_eq!(with_jitter(d, 0.0), Duration::from_secs(6));
        assert_eq!(with_jitter(d, 1.0), Duration::from_secs(10));
        for _ in 0..100 {
            let r = retry_delay(3, Duration::from_secs(2), Duration::from_secs(3600));
            assert!(
                r >= Duration::from_secs(6) && r <= Duration::from_secs(10),
                "{r:?}"
            );
        }
    }
}
