//! The bounded memories of prefetch: the plans a manifest GET leaves for its first blob GET
//! (`prefetch.trigger = "first_blob"`), and the prefetches under way, by (upstream,
//! repository, manifest digest). Pure data over an explicit clock; the prefetcher holds them.
//!
//! Plans are bounded by count, by blobs indexed, and by age: a plan older than its time to live
//! starts nothing, and the oldest plans give way to new ones. Only an authorized GET of a cold
//! image manifest makes a plan, and another GET of the same manifest neither adds one nor
//! refreshes it, so a client can push others' plans out only by making berth fetch as many
//! distinct manifests from the upstream.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::oci::digest::Digest;
use crate::oci::name::Repository;

/// One image of one repository on one upstream, as a client asked for its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageKey {
    pub upstream: Arc<str>,
    pub repository: Repository,
    pub manifest: Digest,
}

/// What one manifest GET left to start at its first blob GET.
struct Plan {
    key: ImageKey,
    /// The manifest's missing config and layers, in order.
    blobs: Vec<Digest>,
    made: Instant,
}

/// The plans, oldest first, and the index a blob GET finds its plan by.
pub struct Plans {
    ttl: Duration,
    max_plans: usize,
    /// Most blob entries over all plans; a plan listing more indexes only its first ones.
    max_blobs: usize,
    /// By a number that grows with every plan made: the first is the oldest.
    plans: BTreeMap<u64, Plan>,
    by_key: HashMap<ImageKey, u64>,
    /// Blob digest -> the plans listing it (several images may share a layer).
    by_blob: HashMap<Digest, Vec<u64>>,
    indexed: usize,
    next: u64,
}

impl Plans {
    pub fn new(ttl: Duration, max_plans: usize, max_blobs: usize) -> Plans {
        Plans {
            ttl,
            max_plans,
            max_blobs,
            plans: BTreeMap::new(),
            by_key: HashMap::new(),
            by_blob: HashMap::new(),
            indexed: 0,
            next: 0,
        }
    }

    /// Whether a plan of `key` younger than the time to live is waiting.
    pub fn contains(&self, key: &ImageKey, now: Instant) -> bool {
        let plan = self.by_key.get(key).and_then(|id| self.plans.get(id));
        plan.is_some_and(|plan| self.fresh(plan, now))
    }

    /// Remembers what `key`'s first blob GET is to start, unless a fresh plan of it waits
    /// already; the oldest plans give way when the bounds are reached.
    pub fn insert(&mut self, key: ImageKey, mut blobs: Vec<Digest>, now: Instant) {
        self.expire(now);
        if self.by_key.contains_key(&key) || blobs.is_empty() {
            return;
        }
        blobs.truncate(self.max_blobs);
        while self.plans.len() >= self.max_plans || self.indexed + blobs.len() > self.max_blobs {
            let Some((&oldest, _)) = self.plans.first_key_value() else {
                break;
            };
            self.remove(oldest);
        }
        let id = self.next;
        self.next += 1;
        for blob in &blobs {
            self.by_blob.entry(blob.clone()).or_default().push(id);
        }
        self.indexed += blobs.len();
        self.by_key.insert(key.clone(), id);
        self.plans.insert(
            id,
            Plan {
                key,
                blobs,
                made: now,
            },
        );
    }

    /// A blob GET of `digest` through `upstream` and `repository`: takes the fresh plan that
    /// lists it there (it starts once), with its other blobs.
    pub fn take(
        &mut self,
        upstream: &str,
        repository: &Repository,
        digest: &Digest,
        now: Instant,
    ) -> Option<(ImageKey, Vec<Digest>)> {
        if self.plans.is_empty() {
            return None;
        }
        self.expire(now);
        let ids = self.by_blob.get(digest)?;
        let id = *ids.iter().rev().find(|id| {
            let key = &self.plans[id].key;
            *key.upstream == *upstream && key.repository == *repository
        })?;
        let plan = self.remove(id)?;
        let rest = plan.blobs.into_iter().filter(|blob| blob != digest);
        Some((plan.key, rest.collect()))
    }

    fn fresh(&self, plan: &Plan, now: Instant) -> bool {
        now.saturating_duration_since(plan.made) < self.ttl
    }

    /// Drops the plans past their time to live (the oldest come first).
    fn expire(&mut self, now: Instant) {
        while let Some((&oldest, plan)) = self.plans.first_key_value() {
            if self.fresh(plan, now) {
                break;
            }
            self.remove(oldest);
        }
    }

    fn remove(&mut self, id: u64) -> Option<Plan> {
        let plan = self.plans.remove(&id)?;
        self.by_key.remove(&plan.key);
        for blob in &plan.blobs {
            if let Some(ids) = self.by_blob.get_mut(blob) {
                ids.retain(|other| *other != id);
                if ids.is_empty() {
                    self.by_blob.remove(blob);
                }
            }
        }
        self.indexed -= plan.blobs.len();
        Some(plan)
    }
}

/// The images whose prefetch runs now: a GET of one of them meanwhile starts nothing (30 nodes
/// asking for one manifest at once start its prefetch once). Bounded: past `max`, nothing new
/// is admitted until some end.
pub struct Prefetching {
    images: Arc<Mutex<HashSet<ImageKey>>>,
    max: usize,
}

/// An image's place in `Prefetching`, left when dropped (when its prefetch ends, however it ends).
pub struct Underway {
    images: Arc<Mutex<HashSet<ImageKey>>>,
    key: ImageKey,
}

/// Why `Prefetching::enter` admitted nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum NotEntered {
    /// The image's prefetch runs already.
    Prefetching,
    /// `max` prefetches run.
    Full,
}

impl Prefetching {
    pub fn new(max: usize) -> Prefetching {
        Prefetching {
            images: Arc::default(),
            max,
        }
    }

    pub fn contains(&self, key: &ImageKey) -> bool {
        self.images.lock().expect("prefetch lock").contains(key)
    }

    pub fn enter(&self, key: ImageKey) -> Result<Underway, NotEntered> {
        let mut images = self.images.lock().expect("prefetch lock");
        if images.contains(&key) {
            return Err(NotEntered::Prefetching);
        }
        if images.len() >= self.max {
            return Err(NotEntered::Full);
        }
        images.insert(key.clone());
        let images = Arc::clone(&self.images);
        Ok(Underway { images, key })
    }
}

impl Drop for Underway {
    fn drop(&mut self) {
        self.images.lock().expect("prefetch lock").remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn digest(n: u32) -> Digest {
        Digest::of(&n.to_be_bytes())
    }

    fn image(n: u32) -> ImageKey {
        ImageKey {
            upstream: "up".into(),
            repository: Repository::parse("team/app").unwrap(),
            manifest: digest(1000 + n),
        }
    }

    /// Empty plans of these bounds, and the time now.
    fn plans_of(max_plans: usize, max_blobs: usize) -> (Plans, Instant) {
        (Plans::new(TTL, max_plans, max_blobs), Instant::now())
    }

    fn take(plans: &mut Plans, blob: u32, now: Instant) -> Option<(ImageKey, Vec<Digest>)> {
        let repository = Repository::parse("team/app").unwrap();
        plans.take("up", &repository, &digest(blob), now)
    }

    #[test]
    fn the_first_blob_of_a_plan_takes_it_with_its_other_blobs_once() {
        let (mut plans, now) = plans_of(8, 64);
        plans.insert(image(1), vec![digest(1), digest(2), digest(3)], now);
        assert!(plans.contains(&image(1), now));

        let (key, rest) = take(&mut plans, 2, now).unwrap();
        assert_eq!(key, image(1));
        assert_eq!(rest, vec![digest(1), digest(3)]);
        assert!(take(&mut plans, 3, now).is_none(), "a plan starts once");
        assert_eq!(
            (plans.plans.len(), plans.indexed, plans.by_blob.len()),
            (0, 0, 0)
        );
    }

    #[test]
    fn a_blob_of_another_repository_or_upstream_takes_no_plan() {
        let (mut plans, now) = plans_of(8, 64);
        plans.insert(image(1), vec![digest(1), digest(2)], now);
        let other = Repository::parse("team/other").unwrap();
        assert!(plans.take("up", &other, &digest(1), now).is_none());
        let repository = Repository::parse("team/app").unwrap();
        assert!(plans
            .take("elsewhere", &repository, &digest(1), now)
            .is_none());
        assert!(take(&mut plans, 1, now).is_some());
    }

    #[test]
    fn past_the_count_the_oldest_plan_is_gone() {
        let (mut plans, now) = plans_of(3, 64);
        for n in 0..5 {
            plans.insert(image(n), vec![digest(n)], now);
        }
        assert_eq!(plans.plans.len(), 3);
        assert!(!plans.contains(&image(0), now) && !plans.contains(&image(1), now));
        assert!(take(&mut plans, 0, now).is_none());
        assert!(take(&mut plans, 4, now).is_some());
    }

    #[test]
    fn past_the_blobs_bound_the_oldest_plans_give_way_and_a_huge_plan_is_cut() {
        let (mut plans, now) = plans_of(100, 4);
        plans.insert(image(1), vec![digest(1), digest(2)], now);
        plans.insert(image(2), vec![digest(3), digest(4)], now);
        plans.insert(image(3), vec![digest(5), digest(6)], now);
        assert!(!plans.contains(&image(1), now));
        assert_eq!(plans.indexed, 4);
        plans.insert(image(4), (10..20).map(digest).collect(), now);
        assert_eq!((plans.plans.len(), plans.indexed), (1, 4));
        assert!(take(&mut plans, 15, now).is_none(), "not indexed");
        assert_eq!(take(&mut plans, 10, now).unwrap().1.len(), 3);
    }

    #[test]
    fn an_expired_plan_starts_nothing() {
        let (mut plans, now) = plans_of(8, 64);
        plans.insert(image(1), vec![digest(1), digest(2)], now);
        let later = now + TTL;
        assert!(!plans.contains(&image(1), later));
        assert!(take(&mut plans, 1, later).is_none());
        assert_eq!((plans.plans.len(), plans.indexed), (0, 0));
    }

    #[test]
    fn another_get_of_the_manifest_neither_adds_nor_refreshes_its_plan() {
        let (mut plans, now) = plans_of(8, 64);
        plans.insert(image(1), vec![digest(1)], now);
        plans.insert(image(1), vec![digest(1)], now + TTL / 2);
        assert_eq!((plans.plans.len(), plans.indexed), (1, 1));
        assert!(
            take(&mut plans, 1, now + TTL).is_none(),
            "aged from the first GET"
        );
    }

    #[test]
    fn a_shared_layer_takes_the_newest_plan_of_its_repository() {
        let (mut plans, now) = plans_of(8, 64);
        plans.insert(image(1), vec![digest(1), digest(2)], now);
        plans.insert(image(2), vec![digest(1), digest(3)], now);
        assert_eq!(take(&mut plans, 1, now).unwrap().0, image(2));
        assert_eq!(take(&mut plans, 1, now).unwrap().0, image(1));
    }

    #[test]
    fn an_image_runs_once_and_leaves_when_its_prefetch_ends() {
        let running = Prefetching::new(2);
        let first = running.enter(image(1)).unwrap();
        assert_eq!(running.enter(image(1)).err(), Some(NotEntered::Prefetching));
        let _second = running.enter(image(2)).unwrap();
        assert_eq!(running.enter(image(3)).err(), Some(NotEntered::Full));
        drop(first);
        assert!(!running.contains(&image(1)));
        assert!(running.enter(image(1)).is_ok());
    }
}
