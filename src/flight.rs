//! Single flight: concurrent callers asking for the same key share one run of the work.
//!
//! Used for manifest fetches, tag revalidations and token fetches, whose results are small and
//! cloneable. Blob fills have their own, streaming, coalescing in `fill`. The work runs on its
//! own task, so it completes even when every caller went away (a shared future nobody polls
//! would sit in the map for good, and keys are built from client input), and the key is
//! released by the work itself when it ends, so a cancelled first caller can never leave a
//! finished result behind for later callers. The work must bound its own duration (upstream
//! requests have deadlines).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

pub(crate) struct Flights<K, V: Clone> {
    running: Arc<Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>>,
    /// Followers currently waiting on someone else's run.
    waiting: AtomicUsize,
}

impl<K, V: Clone> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            running: Arc::default(),
            waiting: AtomicUsize::new(0),
        }
    }
}

/// Whether the caller started the work or joined a run already under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Leader,
    Follower,
}

impl<K, V> Flights<K, V>
where
    K: Clone + Eq + Hash + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` unless a run for `key` is under way, in which case waits for that run's result.
    pub async fn run<F>(&self, key: K, work: impl FnOnce() -> F) -> (V, Role)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (shared, role) = {
            let mut running = self.running.lock().expect("flight map lock");
            match running.get(&key) {
                Some(shared) => (shared.clone(), Role::Follower),
                None => {
                    let registry = Arc::clone(&self.running);
                    let owned_key = key.clone();
                    let fut = work();
                    let task = tokio::spawn(async move {
                        let value = fut.await;
                        registry.lock().expect("flight map lock").remove(&owned_key);
                        value
                    });
                    let shared = async move {
                        match task.await {
                            Ok(value) => value,
                            Err(err) => match err.try_into_panic() {
                                Ok(panic) => std::panic::resume_unwind(panic),
                                Err(_) => panic!("a single-flight task was cancelled"),
                            },
                        }
                    }
                    .boxed()
                    .shared();
                    running.insert(key, shared.clone());
                    (shared, Role::Leader)
                }
            }
        };
        if role == Role::Leader {
            return (shared.await, role);
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        (shared.await, role)
    }

    /// Runs under way (keys in the map); the tests' view of what stays keyed.
    #[cfg(test)]
    fn running(&self) -> usize {
        self.running.lock().expect("flight map lock").len()
    }

    /// How many callers are waiting on a run another caller started.
    pub(crate) fn followers_waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Decrements the waiting count however the wait ends (result or cancellation).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights: Flights<&str, u32> = Flights::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, gate) = oneshot::channel::<()>();
        let gate = gate.shared();
        let call = || {
            let runs = Arc::clone(&runs);
            let gate = gate.clone();
            move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let _ = gate.await;
                7
            }
        };
        let first = flights.run("k", call());
        let second = flights.run("k", call());
        let both = futures_util::future::join(first, second);
        let releaser = async {
            tokio::task::yield_now().await;
            release.send(()).unwrap();
        };
        let (((a, role_a), (b, role_b)), ()) = futures_util::future::join(both, releaser).await;
        assert_eq!((a, b), (7, 7));
        assert_eq!((role_a, role_b), (Role::Leader, Role::Follower));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let (c, role_c) = flights.run("k", call()).await;
        assert_eq!(
            (c, role_c),
            (7, Role::Leader),
            "a finished run releases its key"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_whose_callers_all_left_completes_and_leaves_the_map() {
        let flights: Flights<String, u32> = Flights::default();
        let (release, gate) = oneshot::channel::<()>();
        let (finished, done) = oneshot::channel::<()>();
        let mut caller = Box::pin(flights.run("client-chosen-key".into(), move || async move {
            let _ = gate.await;
            let _ = finished.send(());
            7
        }));
        assert!((&mut caller).now_or_never().is_none());
        assert_eq!(flights.running(), 1);
        drop(caller);
        release.send(()).unwrap();
        // Paused time: this timeout fires at once if nothing can make the work run.
        tokio::time::timeout(std::time::Duration::from_secs(60), done)
            .await
            .expect("the work ran on although its only caller left")
            .unwrap();
        for _ in 0..100 {
            if flights.running() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(flights.running(), 0, "nothing stays keyed in the map");
    }
}
