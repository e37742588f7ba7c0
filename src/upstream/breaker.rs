//! A per-upstream circuit breaker: after `threshold` consecutive connection failures or
//! timeouts the circuit opens, and requests to that upstream fail at once for `cooldown`
//! instead of each waiting out a connect or response timeout. After the cool-down one probe
//! request is let through (half-open); its success closes the circuit, its failure opens it
//! for another cool-down.
//!
//! Bad bodies count too, on a tally of their own: `threshold` blob fills in a row that the
//! upstream failed for good (cut or stalled past every resume, the wrong length or the wrong
//! digest), or bodies it trickled below the rate floor (each one counts when it is abandoned,
//! resumed or not; a cut is resumed first, as a network blip cuts many bodies at once), open
//! the circuit, so an upstream that answers every request but never delivers is shed instead
//! of costing a fill (a `max_fills` slot, a temp file, a writer thread) each time. A response head does not clear that tally (a hostile
//! upstream answers heads at once); only a verified blob does. After the cool-down the tally
//! stays one short of the threshold, so the next bad body reopens the circuit at once.
//!
//! Owns: the state machine, as plain functions of the current `Instant` so it is unit-tested
//! without clocks. Does not own: deciding what counts as a failure (`Upstream::send` reports
//! connection failures and timeouts, and any HTTP answer, even a 500, proves the upstream is
//! reachable; `fill` reports how each fill's body ended) or what callers do with a refusal
//! (`UpstreamError::CircuitOpen`, a 503).

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
    /// One probe is out since `since`; if it never reports (its caller was cancelled), another
    /// may go after a further cool-down.
    HalfOpen {
        since: Instant,
    },
}

/// What a caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// The circuit is closed: send.
    Pass,
    /// The cool-down is over and this caller is the one probe.
    Probe,
    /// The circuit is open: fail fast, for at most this long.
    Reject { retry_in: Duration },
}

/// The pure state machine.
#[derive(Debug, Clone)]
pub(crate) struct Circuit {
    threshold: u32,
    cooldown: Duration,
    state: State,
    /// Fills in a row whose body the upstream failed; only a verified blob resets it.
    bad_bodies: u32,
}

impl Circuit {
    pub fn new(threshold: u32, cooldown: Duration) -> Circuit {
        Circuit {
            threshold: threshold.max(1),
            cooldown,
            state: State::Closed { failures: 0 },
            bad_bodies: 0,
        }
    }

    pub(crate) fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            State::Closed { .. } => Admission::Pass,
            State::Open { until } if now < until => Admission::Reject {
                retry_in: until - now,
            },
            State::HalfOpen { since } if now < since + self.cooldown => Admission::Reject {
                retry_in: since + self.cooldown - now,
            },
            State::Open { .. } | State::HalfOpen { .. } => {
                self.state = State::HalfOpen { since: now };
                Admission::Probe
            }
        }
    }

    /// The upstream answered (any status): it is reachable.
    pub fn success(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    /// A connection failure or timeout. Returns true when this failure opened the circuit.
    pub fn failure(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed { failures } if failures + 1 < self.threshold => {
                self.state = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            State::Open { .. } => false,
            State::Closed { .. } | State::HalfOpen { .. } => {
                self.state = State::Open {
                    until: now + self.cooldown,
                };
                true
            }
        }
    }

    /// A fill's body failed for good by the upstream's doing, or was abandoned below the rate
    /// floor. Returns true when this opened the circuit.
    pub fn bad_body(&mut self, now: Instant) -> bool {
        self.bad_bodies = self.bad_bodies.saturating_add(1);
        if self.bad_bodies < self.threshold || matches!(self.state, State::Open { .. }) {
            return false;
        }
        self.bad_bodies = self.threshold - 1;
        self.state = State::Open {
            until: now + self.cooldown,
        };
        true
    }

    /// A fill's body arrived whole and verified: the upstream delivers.
    pub fn good_body(&mut self) {
        self.bad_bodies = 0;
    }

    pub(crate) fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }
}

/// The shared breaker of one upstream.
#[derive(Debug)]
pub(crate) struct Breaker {
    circuit: Mutex<Circuit>,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            circuit: Mutex::new(Circuit::new(threshold, cooldown)),
        }
    }

    pub(crate) fn admit(&self) -> Admission {
        self.lock().admit(Instant::now())
    }

    pub fn success(&self) {
        self.lock().success();
    }

    /// Returns true when this failure opened the circuit.
    pub fn failure(&self) -> bool {
        self.lock().failure(Instant::now())
    }

    /// Returns true when this bad body opened the circuit.
    pub fn bad_body(&self) -> bool {
        self.lock().bad_body(Instant::now())
    }

    pub fn good_body(&self) {
        self.lock().good_body();
    }

    /// Whether the circuit fails requests fast right now (open, or one probe under way).
    pub(crate) fn is_open(&self) -> bool {
        self.lock().is_open()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Circuit> {
        self.circuit.lock().expect("breaker lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(10);

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut circuit = Circuit::new(3, COOL);
        assert!(!circuit.failure(t0));
        assert!(!circuit.failure(t0));
        circuit.success();
        assert!(!circuit.failure(t0));
        assert!(!circuit.failure(t0));
        assert_eq!(circuit.admit(t0), Admission::Pass);
        assert!(circuit.failure(t0), "third consecutive failure opens");
        assert_eq!(
            circuit.admit(t0 + Duration::from_secs(4)),
            Admission::Reject {
                retry_in: Duration::from_secs(6)
            }
        );
    }

    #[test]
    fn after_the_cooldown_exactly_one_probe_goes_and_its_result_decides() {
        let t0 = Instant::now();
        let mut circuit = Circuit::new(1, COOL);
        assert!(circuit.failure(t0));
        let later = t0 + COOL;
        assert_eq!(circuit.admit(later), Admission::Probe);
        assert!(matches!(circuit.admit(later), Admission::Reject { .. }));
        circuit.success();
        assert_eq!(circuit.admit(later), Admission::Pass);

        assert!(circuit.failure(later));
        let probe_time = later + COOL;
        assert_eq!(circuit.admit(probe_time), Admission::Probe);
        assert!(circuit.failure(probe_time), "a failed probe reopens");
        assert!(matches!(
            circuit.admit(probe_time + Duration::from_secs(1)),
            Admission::Reject { .. }
        ));
    }

    #[test]
    fn bad_bodies_in_a_row_open_the_circuit_though_every_head_arrived() {
        let t0 = Instant::now();
        let mut circuit = Circuit::new(3, COOL);
        for _ in 0..2 {
            circuit.success();
            assert!(!circuit.bad_body(t0));
        }
        circuit.success();
        assert!(circuit.bad_body(t0), "third bad body in a row opens");
        assert!(matches!(circuit.admit(t0), Admission::Reject { .. }));
        assert!(!circuit.bad_body(t0), "already open");

        // After the cool-down the probe's head arrives, and one more bad body reopens at once.
        assert_eq!(circuit.admit(t0 + COOL), Admission::Probe);
        circuit.success();
        assert_eq!(circuit.admit(t0 + COOL), Admission::Pass);
        assert!(circuit.bad_body(t0 + COOL));
    }

    #[test]
    fn a_verified_blob_clears_the_bad_body_tally() {
        let t0 = Instant::now();
        let mut circuit = Circuit::new(3, COOL);
        for verified_between in [true, false] {
            assert!(!circuit.bad_body(t0) && !circuit.bad_body(t0));
            if verified_between {
                circuit.good_body();
            }
        }
        assert_eq!(circuit.admit(t0), Admission::Pass);
        // Connection failures keep their own count: two bad bodies and one failure stay closed.
        assert!(!circuit.failure(t0));
        assert_eq!(circuit.admit(t0), Admission::Pass);
    }

    #[test]
    fn a_probe_that_never_reports_does_not_wedge_the_circuit() {
        let t0 = Instant::now();
        let mut circuit = Circuit::new(1, COOL);
        circuit.failure(t0);
        assert_eq!(circuit.admit(t0 + COOL), Admission::Probe);
        assert_eq!(circuit.admit(t0 + COOL * 2), Admission::Probe);
    }
}
