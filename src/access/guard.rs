//! Slowing down clients that keep presenting wrong credentials.
//!
//! Failures are counted per client IP and principal name (the Basic username, or the subject a
//! failing token claims), so one client behind a NAT or a TLS-terminating proxy cannot slow down
//! the others behind the same address. The first few failures are free (a mistyped key, a
//! rotated secret); after that, each further failure of that (address, name) is answered only
//! after its turn behind one gate and a sleep, doubling up to a ceiling. `Access` checks a key
//! before it consults the guard, so a correct key is never queued behind a failing one: keys
//! are random tokens of 128 bits or more (`principals`), which no guessing rate reaches, and the
//! guard is there to make noisy clients cheap to serve. The count is forgotten after a quiet
//! `WINDOW`.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

/// Failures allowed before checks slow down.
pub(crate) const FREE_FAILURES: u32 = 5;
/// The first delay; each further failure doubles it.
const FIRST_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(8);
/// A failure older than this no longer counts.
const WINDOW: Duration = Duration::from_secs(10 * 60);
/// (address, name) pairs tracked at once; a scan from many addresses or names cannot grow
/// memory without bound.
const MAX_CLIENTS: u64 = 100_000;
/// Names are client-chosen; only this much of one is kept.
const MAX_NAME: usize = 256;

type Client = (IpAddr, String);

fn client_key(client: Option<IpAddr>, name: &str) -> Option<Client> {
    let mut end = name.len().min(MAX_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    client.map(|ip| (ip, name[..end].to_string()))
}

/// How long a check waits after `failures` recent failures.
pub(crate) fn delay_for(failures: u32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES).min(16);
    FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY)
}

struct Strikes {
    /// Recent failures and when the last one happened.
    count: Mutex<(u32, Instant)>,
    /// Held through the delay and the check, so one address makes one guess at a time.
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Strikes {
    fn failures(&self) -> u32 {
        let (count, last) = *self.count.lock().expect("strikes lock");
        if last.elapsed() > WINDOW {
            0
        } else {
            count
        }
    }
}

pub(crate) struct Guard {
    clients: moka::sync::Cache<Client, Arc<Strikes>>,
}

/// Permission to check credentials; hold it until the check is done.
pub(crate) struct Admitted(#[allow(dead_code)] Option<OwnedMutexGuard<()>>);

impl Guard {
    pub fn new() -> Guard {
        Guard {
            clients: moka::sync::Cache::builder()
                .max_capacity(MAX_CLIENTS)
                .time_to_idle(WINDOW)
                .build(),
        }
    }

    /// Waits until `name` at a client with recent failures may be answered again; immediate
    /// for everyone else.
    pub(crate) async fn admit(&self, client: Option<IpAddr>, name: &str) -> Admitted {
        let Some(strikes) = client_key(client, name).and_then(|key| self.clients.get(&key)) else {
            return Admitted(None);
        };
        if delay_for(strikes.failures()) == Duration::ZERO {
            return Admitted(None);
        }
        let held = Arc::clone(&strikes.gate).lock_owned().await;
        // Failures may have piled up while this check queued.
        tokio::time::sleep(delay_for(strikes.failures())).await;
        Admitted(Some(held))
    }

    /// Counts a failed check of `name` at a client; returns its recent failures.
    pub fn fail(&self, client: Option<IpAddr>, name: &str) -> u32 {
        let Some(key) = client_key(client, name) else {
            return 0;
        };
        let strikes = self.clients.get_with(key, || {
            Arc::new(Strikes {
                count: Mutex::new((0, Instant::now())),
                gate: Arc::default(),
            })
        });
        let mut count = strikes.count.lock().expect("strikes lock");
        let recent = if count.1.elapsed() > WINDOW {
            0
        } else {
            count.0
        };
        *count = (recent.saturating_add(1), Instant::now());
        count.0
    }
}

impl Default for Guard {
    fn default() -> Self {
        Guard::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn delays_start_after_the_free_failures_and_double_to_a_ceiling() {
        assert_eq!(delay_for(0), Duration::ZERO);
        assert_eq!(delay_for(FREE_FAILURES - 1), Duration::ZERO);
        assert_eq!(delay_for(FREE_FAILURES), FIRST_DELAY);
        assert_eq!(delay_for(FREE_FAILURES + 1), FIRST_DELAY * 2);
        assert_eq!(delay_for(FREE_FAILURES + 20), MAX_DELAY);
        assert_eq!(delay_for(u32::MAX), MAX_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_with_many_failures_waits_and_others_do_not() {
        let guard = Guard::new();
        let bad = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        let good = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        for _ in 0..FREE_FAILURES {
            let _admitted = guard.admit(bad, "mallory").await;
            guard.fail(bad, "mallory");
        }
        // The good client and unknown peers are admitted without the clock moving.
        let before = Instant::now();
        drop(guard.admit(good, "mallory").await);
        drop(guard.admit(None, "mallory").await);
        assert_eq!(Instant::now(), before);
        // The bad client's check is held for the delay (paused time: the clock jumps by it).
        drop(guard.admit(bad, "mallory").await);
        assert_eq!(Instant::now() - before, delay_for(FREE_FAILURES));
    }

    #[tokio::test(start_paused = true)]
    async fn one_guess_at_a_time_from_a_penalised_client() {
        let guard = Arc::new(Guard::new());
        let bad = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        for _ in 0..FREE_FAILURES {
            guard.fail(bad, "mallory");
        }
        let first = guard.admit(bad, "mallory").await;
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let second = {
            let guard = Arc::clone(&guard);
            tokio::spawn(async move {
                let admitted = guard.admit(bad, "mallory").await;
                let _ = tx.send(());
                admitted
            })
        };
        // However long the first check takes, the second waits for it.
        tokio::time::advance(MAX_DELAY * 4).await;
        assert!(rx.try_recv().is_err(), "second check admitted early");
        drop(first);
        drop(second.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn another_principal_behind_the_same_address_is_not_held_up() {
        let guard = Guard::new();
        let shared = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        for _ in 0..FREE_FAILURES + 3 {
            guard.fail(shared, "mallory");
        }
        let before = Instant::now();
        drop(guard.admit(shared, "alice@example.com").await);
        drop(guard.admit(shared, "<token>").await);
        assert_eq!(Instant::now(), before);
        drop(guard.admit(shared, "mallory").await);
        assert!(Instant::now() > before);
        // A name of any length is kept bounded.
        assert_eq!(guard.fail(shared, &"é".repeat(1000)), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_forgotten_after_a_quiet_window() {
        let guard = Guard::new();
        let bad = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        for _ in 0..FREE_FAILURES + 3 {
            guard.fail(bad, "mallory");
        }
        tokio::time::advance(WINDOW + Duration::from_secs(1)).await;
        assert_eq!(guard.fail(bad, "mallory"), 1);
    }
}
