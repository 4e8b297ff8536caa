//! How a worker waits for work: the choice that dominates fault latency on hosts where waking a
//! thread on another CPU costs tens of microseconds (DESIGN.md §8, measured by `vmpager bench`).

use std::time::Duration;

/// How a worker thread waits for faults and exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// Sleep in `epoll_wait` until the kernel wakes the worker: no CPU burnt while idle, a
    /// cross-CPU wakeup per fault that arrives while asleep.
    Blocking,
    /// Never sleep: poll with a zero timeout in a loop. The lowest latency, one CPU per worker.
    BusyPoll,
    /// Poll without sleeping while work keeps arriving, and sleep once nothing arrived for
    /// `spin`: bursts of faults (a guest booting, post-copy) are served at busy-poll latency,
    /// an idle VM costs no CPU.
    Adaptive {
        /// How long after the last piece of work the worker keeps polling.
        spin: Duration,
    },
}

impl WaitMode {
    /// The default adaptive spin window: longer than the gap between a vCPU's consecutive
    /// faults on this host (a KVM_RUN round trip is ~25 µs, DESIGN.md §8), short enough that
    /// an idle worker sleeps almost at once.
    pub const DEFAULT_SPIN: Duration = Duration::from_micros(200);

    /// The poll timeout for the next wait, `idle_for` after the last piece of work.
    pub fn timeout(self, idle_for: Duration) -> Option<Duration> {
        match self {
            WaitMode::Blocking => None,
            WaitMode::BusyPoll => Some(Duration::ZERO),
            WaitMode::Adaptive { spin } if idle_for < spin => Some(Duration::ZERO),
            WaitMode::Adaptive { .. } => None,
        }
    }

    /// A short name (`blocking`, `busy-poll`, `adaptive`).
    pub fn name(self) -> &'static str {
        match self {
            WaitMode::Blocking => "blocking",
            WaitMode::BusyPoll => "busy-poll",
            WaitMode::Adaptive { .. } => "adaptive",
        }
    }
}

impl Default for WaitMode {
    fn default() -> WaitMode {
        WaitMode::Adaptive {
            spin: WaitMode::DEFAULT_SPIN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_polls_while_work_is_recent_then_sleeps() {
        let m = WaitMode::Adaptive {
            spin: Duration::from_micros(100),
        };
        assert_eq!(m.timeout(Duration::from_micros(10)), Some(Duration::ZERO));
        assert_eq!(m.timeout(Duration::from_micros(100)), None);
        assert_eq!(WaitMode::Blocking.timeout(Duration::ZERO), None);
        assert_eq!(
            WaitMode::BusyPoll.timeout(Duration::from_secs(10)),
            Some(Duration::ZERO)
        );
    }
}
