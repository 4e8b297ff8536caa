//! Reconnect pacing: exponential backoff with jitter, capped.

use std::time::Duration;

/// Delays between reconnect attempts: the `n`th delay is drawn uniformly from
/// `[base/2, base]` with `base = min(initial × 2^n, max)` ("equal jitter"), so two
/// destinations that lost the same source do not reconnect in lockstep, and a delay is never
/// below half the nominal one.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Default for Backoff {
    /// 50 ms doubling up to 5 s.
    fn default() -> Backoff {
        Backoff::new(Duration::from_millis(50), Duration::from_secs(5))
    }
}

impl Backoff {
    /// Backoff from `initial` doubling up to `max`, seeded from `getrandom(2)` (a fixed seed
    /// if that fails: jitter is a courtesy, not a secret).
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let mut seed = [0; 8];
        let seed = match crate::auth::random(&mut seed) {
            Ok(()) => u64::from_le_bytes(seed),
            Err(_) => 0x9e37_79b9_7f4a_7c15,
        };
        Backoff::with_seed(initial, max, seed)
    }

    /// Like [`Backoff::new`] with a given seed (reproducible in tests).
    pub fn with_seed(initial: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng: seed | 1,
        }
    }

    /// Attempts since the last [`Backoff::reset`].
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Call after a successful connection: the next delay starts from `initial` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        let base = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = base / 2;
        let nanos = half.as_nanos() as u64;
        let jitter = if nanos == 0 {
            0
        } else {
            self.rng % (nanos + 1)
        };
        half + Duration::from_nanos(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_bounds_and_resets() {
        let (i, m) = (Duration::from_millis(10), Duration::from_millis(300));
        let mut b = Backoff::with_seed(i, m, 42);
        for n in 0..100u32 {
            let base = i
                .saturating_mul(1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX))
                .min(m);
            let d = b.next_delay();
            assert!(d >= base / 2 && d <= base, "attempt {n}: {d:?} vs {base:?}");
        }
        assert_eq!(b.attempts(), 100);
        b.reset();
        assert!(b.next_delay() <= i);
    }
}
