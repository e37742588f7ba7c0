//! Short-lived credentials fetched on demand (ECR passwords, GCP access tokens, STS sessions):
//! cached until shortly before they expire, fetched once for all concurrent callers, and kept
//! in use while still valid when a refresh fails.
//!
//! The cache knows nothing about what it holds or how it is fetched; `ecr` and `gcp` supply
//! the key and the fetch. Keys carry the secret file's generation, and the cache is cleared
//! when the file changes, so a token minted from an old key is never served for a new one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::SecretError;
use crate::flight::Flights;

/// How long before expiry a credential is replaced: long enough that a slow token endpoint
/// or a clock a little ahead of AWS/Google does not leave requests holding an expired one.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// The longest any credential is kept (ECR's twelve hours, with room): a larger lifetime is a
/// bogus answer, and would overflow `Instant` arithmetic if believed.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A fetched credential and how long its issuer says it is valid.
pub(super) struct Fetched<T> {
    pub value: T,
    pub lifetime: Duration,
}

#[derive(Clone)]
struct Cached<T> {
    value: T,
    /// Unique per fetch, so `Credentials::id` changes whenever the credential does.
    serial: u64,
    refresh_at: Instant,
    expires: Instant,
}

/// Serials are process-wide so ids from different secrets or generations never collide.
static SERIAL: AtomicU64 = AtomicU64::new(1);

impl<T> Cached<T> {
    fn new(fetched: Fetched<T>, fetched_at: Instant) -> Cached<T> {
        let lifetime = fetched.lifetime.min(MAX_LIFETIME);
        let expires = fetched_at + lifetime;
        Cached {
            value: fetched.value,
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
            refresh_at: expires - refresh_margin(lifetime),
            expires,
        }
    }
}

/// Five minutes, or half the lifetime of a credential that lives less than ten.
fn refresh_margin(lifetime: Duration) -> Duration {
    REFRESH_MARGIN.min(lifetime / 2)
}

pub(super) struct TokenCache<T: Clone> {
    entries: Arc<Mutex<HashMap<String, Cached<T>>>>,
    flights: Flights<String, Result<Cached<T>, SecretError>>,
}

impl<T: Clone> Default for TokenCache<T> {
    fn default() -> Self {
        TokenCache {
            entries: Arc::default(),
            flights: Flights::default(),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> TokenCache<T> {
    /// The credential under `key` and its serial, from the cache while it is fresh at `now`,
    /// else from `fetch` (shared with every concurrent caller for `key`). If the fetch fails
    /// and the cached credential has not expired yet, that one is returned instead.
    pub async fn get<F, Fut>(
        &self,
        key: &str,
        now: Instant,
        fetch: F,
    ) -> Result<(T, u64), SecretError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched<T>, SecretError>> + Send + 'static,
    {
        let cached = self
            .entries
            .lock()
            .expect("token cache lock")
            .get(key)
            .cloned();
        if let Some(cached) = cached.as_ref().filter(|c| now < c.refresh_at) {
            return Ok((cached.value.clone(), cached.serial));
        }
        let entries = Arc::clone(&self.entries);
        let owned_key = key.to_string();
        let (result, _role) = self
            .flights
            .run(key.to_string(), move || {
                let fetching = fetch();
                async move {
                    // Lifetimes count from the request, not the answer: a little early is safe.
                    let cached = Cached::new(fetching.await?, now);
                    entries
                        .lock()
                        .expect("token cache lock")
                        .insert(owned_key, cached.clone());
                    Ok(cached)
                }
            })
            .await;
        match (result, cached) {
            (Ok(fresh), _) => Ok((fresh.value, fresh.serial)),
            (Err(err), Some(old)) if now < old.expires => {
                tracing::warn!(error = %err, "credential refresh failed; using the current one until it expires");
                Ok((old.value, old.serial))
            }
            (Err(err), _) => Err(err),
        }
    }

    /// Forgets every cached credential (the secret file changed).
    pub fn clear(&self) {
        self.entries.lock().expect("token cache lock").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn refused() -> SecretError {
        SecretError::Exchange {
            name: "s".into(),
            service: "test",
            reason: "HTTP 500".into(),
        }
    }

    type Fetch =
        futures_util::future::BoxFuture<'static, Result<Fetched<&'static str>, SecretError>>;

    /// A fetch that counts its runs and yields `value` valid for `lifetime`, or fails.
    fn fetch(
        runs: &Arc<AtomicUsize>,
        outcome: Result<(&'static str, Duration), SecretError>,
    ) -> impl FnOnce() -> Fetch {
        let runs = Arc::clone(runs);
        move || {
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                outcome.map(|(value, lifetime)| Fetched { value, lifetime })
            })
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn serves_from_cache_until_the_refresh_margin_then_fetches_again() {
        let cache = TokenCache::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let (a, serial_a) = cache
            .get("k", t0, fetch(&runs, Ok(("a", HOUR))))
            .await
            .unwrap();
        let later = t0 + HOUR - REFRESH_MARGIN - Duration::from_secs(1);
        let (b, serial_b) = cache
            .get("k", later, fetch(&runs, Ok(("b", HOUR))))
            .await
            .unwrap();
        assert_eq!((a, b, serial_a), ("a", "a", serial_b));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let due = t0 + HOUR - REFRESH_MARGIN;
        let (c, serial_c) = cache
            .get("k", due, fetch(&runs, Ok(("c", HOUR))))
            .await
            .unwrap();
        assert_eq!(c, "c");
        assert_ne!(serial_c, serial_a, "a new credential gets a new serial");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_unexpired_credential_then_reports_the_error() {
        let cache = TokenCache::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        cache
            .get("k", t0, fetch(&runs, Ok(("a", HOUR))))
            .await
            .unwrap();
        let due = t0 + HOUR - Duration::from_secs(1);
        let (kept, _) = cache
            .get("k", due, fetch(&runs, Err(refused())))
            .await
            .unwrap();
        assert_eq!(kept, "a");
        let expired = t0 + HOUR;
        let err = cache
            .get("k", expired, fetch(&runs, Err(refused())))
            .await
            .unwrap_err();
        assert_eq!(err, refused());
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let cache = TokenCache::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let calls = (0..8).map(|_| cache.get("k", now, fetch(&runs, Ok(("a", HOUR)))));
        let results = futures_util::future::join_all(calls).await;
        assert!(results.iter().all(|r| r.as_ref().unwrap().0 == "a"));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn clearing_forgets_everything_and_keys_are_separate() {
        let cache = TokenCache::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        cache
            .get("1:us-east-1", now, fetch(&runs, Ok(("a", HOUR))))
            .await
            .unwrap();
        cache
            .get("1:eu-west-1", now, fetch(&runs, Ok(("b", HOUR))))
            .await
            .unwrap();
        cache.clear();
        cache
            .get("1:us-east-1", now, fetch(&runs, Ok(("c", HOUR))))
            .await
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn absurd_lifetimes_are_capped() {
        let cache = TokenCache::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let forever = Duration::from_secs(u64::MAX);
        cache
            .get("k", t0, fetch(&runs, Ok(("a", forever))))
            .await
            .unwrap();
        let after_cap = t0 + MAX_LIFETIME;
        let (b, _) = cache
            .get("k", after_cap, fetch(&runs, Ok(("b", HOUR))))
            .await
            .unwrap();
        assert_eq!(b, "b");
    }

    #[test]
    fn short_lived_credentials_refresh_at_half_life() {
        assert_eq!(refresh_margin(HOUR * 12), REFRESH_MARGIN);
        assert_eq!(
            refresh_margin(Duration::from_secs(60)),
            Duration::from_secs(30)
        );
        assert_eq!(refresh_margin(Duration::ZERO), Duration::ZERO);
    }
}
