//! DNS membership: the location's replicas are the addresses `cluster.dns` (a headless
//! Service's name) resolves to, asked again every `cluster.refresh`. Each address becomes the
//! member `http://<address>:<dns_port>` (IPv6 in brackets). The resolver is the system's, or
//! the one at `cluster.resolver` (asked over UDP with hickory, so tests can answer themselves).
//!
//! A failed or empty answer keeps the ring as it was: a DNS hiccup must not shrink the
//! location to one replica and move every key. Deliberately not here: who owns what
//! (`ring`), and draining or failing members (`members`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Weak;
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use super::ring::Ring;
use super::{refuse, Cluster, ClusterError};
use crate::config::cluster::ClusterConfig;
use crate::net::connect::Resolver;

/// Members one answer may list: a location is a handful of replicas; a hostile or broken
/// answer listing thousands must not make every lookup walk them.
const MAX_MEMBERS: usize = 64;

/// How `cluster.dns` is resolved.
pub struct Lookup {
    name: String,
    port: u16,
    resolver: Via,
}

enum Via {
    System(Resolver),
    Server(Box<TokioResolver>),
}

/// `cluster.resolver`: an `ip:port`.
pub(super) fn resolver_address(address: &str) -> Result<SocketAddr, ClusterError> {
    address
        .parse()
        .map_err(|_| refuse("resolver", format!("{address:?} is not ip:port")))
}

impl Lookup {
    pub fn new(
        config: &ClusterConfig,
        name: &str,
        system: Resolver,
    ) -> Result<Lookup, ClusterError> {
        let resolver = match &config.resolver {
            None => Via::System(system),
            Some(address) => Via::Server(Box::new(server_resolver(resolver_address(address)?))),
        };
        Ok(Lookup {
            name: name.to_owned(),
            port: config.dns_port,
            resolver,
        })
    }

    /// The members the name lists now, sorted and bounded; an error or no address is `None`.
    pub async fn members(&self) -> Option<Ring> {
        let addresses: Vec<IpAddr> = match &self.resolver {
            Via::System(resolver) => resolver.resolve(&self.name).await.ok()?,
            Via::Server(resolver) => resolver
                .lookup_ip(self.name.as_str())
                .await
                .ok()?
                .iter()
                .collect(),
        };
        // Only internal addresses: the peer token goes to every member, in plain http unless
        // the members are https, so a spoofed answer must not name a host outside.
        let mut urls: Vec<String> = addresses
            .iter()
            .filter(|ip| crate::net::address::classify(**ip).is_internal())
            .map(|ip| member_url(*ip, self.port))
            .collect();
        urls.sort();
        urls.dedup();
        urls.truncate(MAX_MEMBERS);
        (!urls.is_empty()).then(|| Ring::new(urls.iter().map(String::as_str)))
    }
}

/// A hickory resolver that asks only `address`, over UDP, and caches nothing (the refresh
/// interval is the cache).
fn server_resolver(address: SocketAddr) -> TokioResolver {
    let mut connection = ConnectionConfig::udp();
    connection.port = address.port();
    let mut server = NameServerConfig::udp(address.ip());
    server.connections = vec![connection];
    let config = ResolverConfig::from_name_servers(vec![server]);
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    builder.options_mut().cache_size = 0;
    builder
        .build()
        .expect("a resolver of one UDP name server builds")
}

fn member_url(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("http://{v4}:{port}"),
        IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
    }
}

/// Resolves the members now and every `every` while the cluster lives.
pub async fn refresh(cluster: Weak<Cluster>, lookup: Lookup, every: Duration) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let found = lookup.members().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let Some(ring) = found else {
            tracing::warn!(name = %lookup.name, "cluster.dns answered no members; keeping the ring");
            continue;
        };
        let size = ring.len();
        if cluster.members.set(ring) {
            cluster.metrics.ring_size.set(size as i64);
            tracing::info!(name = %lookup.name, members = size, "cluster membership changed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_urls_of_the_addresses_on_the_dns_port() {
        assert_eq!(
            member_url("10.0.0.5".parse().unwrap(), 5000),
            "http://10.0.0.5:5000"
        );
        assert_eq!(
            member_url("fd00::5".parse().unwrap(), 5000),
            "http://[fd00::5]:5000"
        );
    }
}
