//! Retry timing shared by the webhook worker and the claim-status dispatcher.

use std::time::Duration;

/// The longest an EHR's `Retry-After` may hold a row back: a longer ask is a misconfigured EHR,
/// and the row would look stuck.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The delay before attempt `attempts + 1`: `base * 2^(attempts - 1)` capped at `max`, drawn
/// uniformly from its upper half (so instances retrying together spread out), and never less
/// than what the EHR asked for (itself at most [`MAX_RETRY_AFTER`]).
pub(crate) fn backoff(
    attempts: i64,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let step = base.saturating_mul(1u32 << exponent).min(max);
    let half = step / 2;
    let jittered = half + half.mul_f64(fastrand::f64());
    jittered.max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER))
}

/// `d` in whole microseconds (the unit of every `*_us` column), saturating.
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_attempt_within_its_cap_and_honours_retry_after() {
        let base = Duration::from_millis(1_000);
        let max = Duration::from_millis(60_000);
        for attempts in 1..=10 {
            let step = (base * (1 << (attempts - 1))).min(max);
            let d = backoff(attempts, base, max, None);
            assert!(d >= step / 2 && d <= step, "attempt {attempts}: {d:?}");
        }
        let d = backoff(1, base, max, Some(Duration::from_secs(120)));
        assert_eq!(d, Duration::from_secs(120), "Retry-After wins over the cap");
        let d = backoff(3, base, max, Some(Duration::from_millis(10)));
        assert!(
            d >= Duration::from_secs(2),
            "a short Retry-After does not shorten it"
        );
        assert_eq!(
            backoff(1, base, max, Some(Duration::from_secs(86_400))),
            MAX_RETRY_AFTER
        );
        assert!(backoff(i64::MAX, base, max, None) <= max);
        assert!(backoff(0, base, max, None) <= base);
    }
}
