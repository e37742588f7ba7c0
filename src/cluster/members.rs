//! Who is in the location right now: the listed members (static `peers`, or what DNS said at
//! the last refresh) less those that said they are draining and those whose breaker is open.
//!
//! The owner of a key is found on the listed ring first; a member that is drained or whose
//! breaker rejects is taken out and the owner found again, so its keys go to their
//! second-highest member on every replica alike, and nobody else's keys move. A member's
//! breaker (`upstream::breaker`) opens after `client.breaker_threshold` failures in a row and
//! lets one probe through after `peer_cooldown`, exactly as for an upstream.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::ring::Ring;
use crate::upstream::breaker::{Admission, Breaker};

pub struct Members {
    listed: RwLock<Ring>,
    /// Members that answered 503 "draining", and until when they stay out (a restarted
    /// replica comes back after that, or at once when DNS lists it anew).
    drained: Mutex<HashMap<Arc<str>, Instant>>,
    breakers: Mutex<HashMap<Arc<str>, Arc<Breaker>>>,
    threshold: u32,
    cooldown: Duration,
}

impl Members {
    pub fn new(listed: Ring, threshold: u32, cooldown: Duration) -> Members {
        Members {
            listed: RwLock::new(listed),
            drained: Mutex::default(),
            breakers: Mutex::default(),
            threshold,
            cooldown,
        }
    }

    /// The members as last listed (for `/admin/stats` and the ring-size gauge).
    pub fn listed(&self) -> Ring {
        self.listed.read().expect("members lock").clone()
    }

    /// Whether `ip` is the address of a listed member (a URL whose host is an IP literal, as
    /// DNS membership and pod-IP `self` URLs give): its requests are peer traffic, exempt from
    /// the per-client limits (`limits::ClientSlots`).
    pub fn has_address(&self, ip: IpAddr) -> bool {
        let listed = self.listed.read().expect("members lock");
        listed
            .members()
            .iter()
            .any(|m| address_of(&m.url) == Some(ip))
    }

    /// Replaces the listed members (a DNS refresh). Returns whether anything changed.
    pub fn set(&self, ring: Ring) -> bool {
        let mut listed = self.listed.write().expect("members lock");
        if *listed == ring {
            return false;
        }
        let mut drained = self.drained.lock().expect("drained lock");
        // A member gone from DNS and back is a new replica: it is not draining any more.
        drained.retain(|url, _| ring.members().iter().any(|m| m.url == *url));
        *listed = ring;
        true
    }

    /// The member that owns `key` among those that may be asked now, `None` for an empty
    /// ring. Bounded by the ring's size: each round takes one member out.
    pub fn owner(&self, key: &str) -> Option<Arc<str>> {
        let now = Instant::now();
        let mut ring = self.listed();
        {
            let mut drained = self.drained.lock().expect("drained lock");
            drained.retain(|_, until| *until > now);
            ring = ring.without(|url| drained.contains_key(url));
        }
        for _ in 0..=ring.len() {
            let owner = Arc::clone(&ring.owner(key)?.url);
            match self.breaker(&owner).admit() {
                Admission::Pass | Admission::Probe => return Some(owner),
                Admission::Reject { .. } => ring = ring.without(|url| *url == *owner),
            }
        }
        None
    }

    /// Each listed member and whether it is asked now: `live`, `draining` (it said so) or
    /// `skipped` (its breaker is open after repeated failures). For `/admin/stats`.
    pub fn states(&self) -> Vec<(Arc<str>, &'static str)> {
        let now = Instant::now();
        let drained = self.drained.lock().expect("drained lock").clone();
        let listed = self.listed();
        let breakers = self.breakers.lock().expect("breakers lock");
        listed
            .members()
            .iter()
            .map(|m| {
                let state = if drained.get(&m.url).is_some_and(|until| *until > now) {
                    "draining"
                } else if breakers.get(&m.url).is_some_and(|b| b.is_open()) {
                    "skipped"
                } else {
                    "live"
                };
                (Arc::clone(&m.url), state)
            })
            .collect()
    }

    /// `member` answered 503 "draining": it leaves the ring at once, for `cooldown`.
    pub fn drained(&self, member: &str) {
        let mut drained = self.drained.lock().expect("drained lock");
        drained.insert(Arc::from(member), Instant::now() + self.cooldown);
    }

    pub fn succeeded(&self, member: &str) {
        self.breaker(member).success();
    }

    /// Returns true when this failure took the member out of the ring for a while.
    pub fn failed(&self, member: &str) -> bool {
        self.breaker(member).failure()
    }

    fn breaker(&self, member: &str) -> Arc<Breaker> {
        let mut breakers = self.breakers.lock().expect("breakers lock");
        // Bounded by the members ever listed; a DNS churn of fresh pod IPs is pruned here.
        if breakers.len() > 4 * self.listed().len().max(16) {
            let listed = self.listed();
            breakers.retain(|url, _| listed.members().iter().any(|m| m.url == *url));
        }
        let breaker = breakers
            .entry(Arc::from(member))
            .or_insert_with(|| Arc::new(Breaker::new(self.threshold, self.cooldown)));
        Arc::clone(breaker)
    }
}

/// The IP address of a member's URL, when its host is an IP literal (IPv6 in brackets).
fn address_of(url: &str) -> Option<IpAddr> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "http://a:1";
    const B: &str = "http://b:1";
    const C: &str = "http://c:1";

    fn members() -> Members {
        Members::new(Ring::new([A, B, C]), 2, Duration::from_secs(60))
    }

    /// The test membership and a key `owner` owns in it.
    fn members_and_key_of(owner: &str) -> (Members, String) {
        let members = members();
        let key = key_owned_by(&members, owner);
        (members, key)
    }

    fn key_owned_by(members: &Members, wanted: &str) -> String {
        (0u32..)
            .map(|i| format!("sha256:{i:064}"))
            .find(|key| members.owner(key).as_deref() == Some(wanted))
            .unwrap()
    }

    #[test]
    fn listed_members_addresses_are_known_and_others_are_not() {
        let members = Members::new(
            Ring::new([
                "http://10.0.0.7:5000",
                "https://[fd00::9]:5000",
                "http://b:1",
            ]),
            2,
            Duration::from_secs(60),
        );
        assert!(members.has_address("10.0.0.7".parse().unwrap()));
        assert!(members.has_address("fd00::9".parse().unwrap()));
        assert!(!members.has_address("10.0.0.8".parse().unwrap()));
        members.set(Ring::new(["http://10.0.0.8:5000"]));
        assert!(!members.has_address("10.0.0.7".parse().unwrap()));
        assert!(members.has_address("10.0.0.8".parse().unwrap()));
    }

    #[test]
    fn a_draining_member_leaves_the_ring_at_once_and_only_its_keys_move() {
        let (members, key) = members_and_key_of(B);
        let other = key_owned_by(&members, C);
        members.drained(B);
        assert_ne!(members.owner(&key).as_deref(), Some(B));
        let states = members.states();
        assert!(states.contains(&(Arc::from(B), "draining")), "{states:?}");
        assert!(states.contains(&(Arc::from(A), "live")), "{states:?}");
        assert_eq!(members.owner(&other).as_deref(), Some(C));
    }

    #[test]
    fn a_member_failing_repeatedly_is_skipped() {
        let (members, key) = members_and_key_of(A);
        members.failed(A);
        assert_eq!(members.owner(&key).as_deref(), Some(A));
        assert!(members.failed(A));
        assert_ne!(members.owner(&key).as_deref(), Some(A));
        members.succeeded(A);
        assert_eq!(members.owner(&key).as_deref(), Some(A));
    }

    #[test]
    fn a_member_listed_anew_is_no_longer_drained() {
        let (members, key) = members_and_key_of(C);
        members.drained(C);
        assert!(members.set(Ring::new([A, B])));
        assert!(members.set(Ring::new([A, B, C])));
        assert_eq!(members.owner(&key).as_deref(), Some(C));
        assert!(!members.set(Ring::new([C, B, A])));
    }
}
