//! When to try a call again: jittered exponential backoff, and the EHR's own `Retry-After`
//! (RFC 9110 §10.2.3: delay-seconds or an HTTP-date). Pure functions of their inputs; the HTTP
//! client does the sleeping.

use std::time::{Duration, SystemTime};

/// How one call retries (see [`super::settings`] for the keys and defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries of one call, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Total time one call may spend waiting between tries.
    pub budget: Duration,
    /// The longest `Retry-After` waited for inside a call.
    pub retry_after_cap: Duration,
}

/// The wait before retry number `attempt` (0 for the first retry): "equal jitter", a uniform
/// draw in `[step/2, step]` where `step = min(max, base * 2^attempt)`, so concurrent clients
/// spread out yet each waits at least half a step.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    let step = base
        .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let half = step / 2;
    let spread = (step - half).as_micros() as u64;
    half + Duration::from_micros(fastrand::u64(0..=spread))
}

/// A `Retry-After` header value as a delay from `now`: delay-seconds or an HTTP-date (a date in
/// the past is zero). `None` when it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_bounds_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_millis(1_000);
        for _ in 0..200 {
            let d0 = backoff_delay(0, base, max);
            assert!(d0 >= Duration::from_millis(50) && d0 <= base, "{d0:?}");
            let d2 = backoff_delay(2, base, max);
            assert!(d2 >= Duration::from_millis(200) && d2 <= Duration::from_millis(400));
            let d9 = backoff_delay(9, base, max);
            assert!(d9 >= Duration::from_millis(500) && d9 <= max, "{d9:?}");
            assert!(backoff_delay(60, base, max) <= max);
        }
    }

    #[test]
    fn backoff_is_jittered() {
        let draws: std::collections::HashSet<_> = (0..50)
            .map(|_| backoff_delay(3, Duration::from_millis(100), Duration::from_secs(10)))
            .collect();
        assert!(draws.len() > 1);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }
}
