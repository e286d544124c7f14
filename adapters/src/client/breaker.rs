//! A per-connection circuit breaker: after `threshold` consecutive failures (5xx, timeouts,
//! connection errors) it opens and every call fails fast for `cooldown`; then it half-opens and
//! lets exactly one probe through; the probe's success closes it, its failure opens it again.
//!
//! Time is passed in (`now`) so the rules are tested without sleeping. It never decides what a
//! failure is: the HTTP client reports outcomes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; everyone else fails fast until it reports.
    HalfOpen,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

/// The circuit is open: fail fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open;

/// Leave to make one call. Report it with [`Permit::success`] or [`Permit::failure`]; a permit
/// dropped unreported (the call was cancelled) counts as neither, but frees a half-open probe
/// slot so the next call probes.
#[derive(Debug)]
pub struct Permit<'b> {
    breaker: &'b CircuitBreaker,
    probe: bool,
    reported: bool,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere while holding it; the state is still a
        // valid value.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn try_acquire(&self, now: Instant) -> Result<Permit<'_>, Open> {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Ok(Permit {
                breaker: self,
                probe: false,
                reported: false,
            }),
            State::Open { until } if now >= until => {
                *state = State::HalfOpen;
                Ok(Permit {
                    breaker: self,
                    probe: true,
                    reported: false,
                })
            }
            State::Open { .. } | State::HalfOpen => Err(Open),
        }
    }

    /// Whether calls currently fail fast.
    pub fn is_open(&self, now: Instant) -> bool {
        match *self.lock() {
            State::Closed { .. } => false,
            State::Open { until } => now < until,
            State::HalfOpen => true,
        }
    }

    fn record(&self, success: bool, probe: bool, now: Instant) {
        let mut state = self.lock();
        *state = match (*state, success) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            (State::HalfOpen, false) if !probe => State::HalfOpen,
            (_, false) => State::Open {
                until: now + self.cooldown,
            },
        };
    }
}

impl Permit<'_> {
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.record(true, self.probe, Instant::now());
    }

    pub fn failure(self) {
        self.failure_at(Instant::now());
    }

    pub fn failure_at(mut self, now: Instant) {
        self.reported = true;
        self.breaker.record(false, self.probe, now);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            let mut state = self.breaker.lock();
            if *state == State::HalfOpen {
                *state = State::Open {
                    until: Instant::now(),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_consecutive_failures_and_a_success_resets_the_count() {
        let b = CircuitBreaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        b.try_acquire(t0).unwrap().failure_at(t0);
        b.try_acquire(t0).unwrap().failure_at(t0);
        b.try_acquire(t0).unwrap().success();
        b.try_acquire(t0).unwrap().failure_at(t0);
        b.try_acquire(t0).unwrap().failure_at(t0);
        assert!(!b.is_open(t0));
        b.try_acquire(t0).unwrap().failure_at(t0);
        assert!(b.is_open(t0));
        assert_eq!(b.try_acquire(t0 + Duration::from_secs(9)).err(), Some(Open));
    }

    #[test]
    fn half_opens_after_the_cooldown_with_exactly_one_probe() {
        let b = CircuitBreaker::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        b.try_acquire(t0).unwrap().failure_at(t0);
        let later = t0 + Duration::from_secs(10);
        let probe = b.try_acquire(later).unwrap();
        assert_eq!(
            b.try_acquire(later).err(),
            Some(Open),
            "a second call while probing"
        );
        probe.success();
        assert!(b.try_acquire(later).is_ok(), "closed after a good probe");
    }

    #[test]
    fn a_failed_probe_opens_again_for_a_full_cooldown() {
        let b = CircuitBreaker::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        b.try_acquire(t0).unwrap().failure_at(t0);
        b.try_acquire(t0).unwrap().failure_at(t0);
        let t1 = t0 + Duration::from_secs(11);
        b.try_acquire(t1).unwrap().failure_at(t1);
        assert_eq!(b.try_acquire(t1 + Duration::from_secs(9)).err(), Some(Open));
        assert!(b.try_acquire(t1 + Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn a_cancelled_probe_lets_the_next_call_probe() {
        let b = CircuitBreaker::new(1, Duration::from_millis(0));
        let t0 = Instant::now();
        b.try_acquire(t0).unwrap().failure_at(t0);
        let probe = b.try_acquire(Instant::now()).unwrap();
        drop(probe);
        assert!(b.try_acquire(Instant::now()).is_ok());
    }
}
