//! The address rule: which IP addresses berth may open a connection to. Pure.
//!
//! Every outbound connection (upstream requests, redirect hops, token realms, the ECR, STS and
//! GCP exchange endpoints) is checked on the address actually dialled, after DNS, by
//! `net::connect`. IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::/96`) addresses
//! are judged by the IPv4 address inside them.
//! - Never: link-local, cloud metadata addresses, unspecified, `0.0.0.0/8`, multicast,
//!   broadcast, and the other reserved ranges.
//! - Loopback, private (RFC 1918, `100.64/10`) and unique-local (`fc00::/7`): only for an
//!   upstream whose configured endpoint is itself such an address, or whose `allow_networks`
//!   lists the network (`AddressRule::allowing`).
//! - Everything else (the public internet): always.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The internal networks: loopback, private (RFC 1918, RFC 6598) and unique-local.
const INTERNAL: [&str; 7] = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "::1/128",
    "fc00::/7",
];

/// What kind of address an IP is, for the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Public,
    Loopback,
    /// RFC 1918 and the carrier-grade NAT range 100.64/10.
    Private,
    /// IPv6 unique-local, fc00::/7.
    UniqueLocal,
    LinkLocal,
    /// The instance metadata services of the clouds, in any spelling.
    Metadata,
    Unspecified,
    Multicast,
    Broadcast,
    /// 0.0.0.0/8, 240/4, documentation and benchmarking ranges, and the like.
    Reserved,
}

impl AddressClass {
    pub fn as_str(self) -> &'static str {
        match self {
            AddressClass::Public => "public",
            AddressClass::Loopback => "loopback",
            AddressClass::Private => "private",
            AddressClass::UniqueLocal => "unique-local",
            AddressClass::LinkLocal => "link-local",
            AddressClass::Metadata => "cloud metadata",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Multicast => "multicast",
            AddressClass::Broadcast => "broadcast",
            AddressClass::Reserved => "reserved",
        }
    }

    /// Loopback, private and unique-local: allowed when the configuration says so.
    pub(crate) fn is_internal(self) -> bool {
        matches!(
            self,
            AddressClass::Loopback | AddressClass::Private | AddressClass::UniqueLocal
        )
    }
}

/// The IPv4 address an IPv6 address carries, for IPv4-mapped and NAT64 (RFC 6052) forms.
pub(crate) fn unwrap_ipv4(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    }
    ip
}

/// Classifies `ip` (unwrapped first).
pub(crate) fn classify(ip: IpAddr) -> AddressClass {
    match unwrap_ipv4(ip) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) {
        // AWS, GCP, Azure, OpenStack; Alibaba Cloud.
        return AddressClass::Metadata;
    }
    if ip.is_unspecified() {
        AddressClass::Unspecified
    } else if ip.is_broadcast() {
        AddressClass::Broadcast
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_link_local() {
        AddressClass::LinkLocal
    } else if ip.is_multicast() {
        AddressClass::Multicast
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        AddressClass::Private
    } else if a == 0
        || a >= 240
        || (a == 192 && b == 0 && c == 0)
        || ip.is_documentation()
        || (a == 198 && (18..20).contains(&b))
    {
        AddressClass::Reserved
    } else {
        AddressClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let s = ip.segments();
    // AWS's IPv6 metadata endpoint.
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return AddressClass::Metadata;
    }
    if ip.is_unspecified() {
        AddressClass::Unspecified
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_multicast() {
        AddressClass::Multicast
    } else if s[0] & 0xffc0 == 0xfe80 {
        AddressClass::LinkLocal
    } else if s[0] & 0xfe00 == 0xfc00 {
        AddressClass::UniqueLocal
    } else if s[0] & 0xffc0 == 0xfec0 || (s[0] == 0x2001 && s[1] == 0xdb8) || s[0] == 0x100 {
        // Deprecated site-local, documentation, discard-only.
        AddressClass::Reserved
    } else if s[..6] == [0; 6] {
        // ::a.b.c.d (IPv4-compatible), deprecated; nothing legitimate dials it.
        AddressClass::Reserved
    } else {
        AddressClass::Public
    }
}

/// An IP network in CIDR form, `10.0.0.0/8` or `fd00::/8`, for `allow_networks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }

    /// Whether the whole network is loopback, private or unique-local (what `allow_networks`
    /// may list).
    pub(crate) fn is_internal(&self) -> bool {
        let last = match self.addr {
            IpAddr::V4(v4) => {
                let host_bits = 32 - u32::from(self.prefix);
                let mask = u32::MAX.checked_shr(32 - host_bits).unwrap_or(0);
                let mask = if host_bits == 0 { 0 } else { mask };
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) | mask))
            }
            IpAddr::V6(v6) => {
                let host_bits = 128 - u32::from(self.prefix);
                let mask = if host_bits == 0 {
                    0
                } else {
                    u128::MAX >> (128 - host_bits)
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) | mask))
            }
        };
        let first_class = classify_v(self.addr);
        first_class.is_internal() && first_class == classify_v(last)
    }

    /// The smallest special-purpose network holding `ip`, for an endpoint configured as an
    /// address: a loopback endpoint allows loopback, a 10.x one allows 10/8, and so on.
    fn around(ip: IpAddr) -> Option<Network> {
        let ip = unwrap_ipv4(ip);
        INTERNAL
            .iter()
            .map(|text| text.parse::<Network>().expect("valid network"))
            .find(|network| network.contains(ip))
    }
}

/// Classifies without unwrapping: `allow_networks` entries are taken as written.
fn classify_v(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8, bits: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = u32::from(bits - prefix);
    (a >> shift) == (b >> shift)
}

/// A network that does not parse: the text, for the message that names the config key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a network in CIDR form (10.0.0.0/8)")]
pub(crate) struct NetworkError(String);

impl FromStr for Network {
    type Err = NetworkError;

    fn from_str(text: &str) -> Result<Network, NetworkError> {
        let invalid = || NetworkError(text.to_string());
        let (addr, prefix) = text.split_once('/').ok_or_else(invalid)?;
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > bits {
            return Err(invalid());
        }
        Ok(Network { addr, prefix })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The internal networks one set of connections may reach; public addresses always pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AddressRule {
    allowed: Vec<Network>,
}

/// A refused address, with its class; the connector's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address {ip} is {} and not allowed for this upstream", class.as_str())]
pub struct Refused {
    pub ip: IpAddr,
    pub class: AddressClass,
}

impl AddressRule {
    /// Public addresses only.
    pub(crate) fn public_only() -> AddressRule {
        AddressRule::default()
    }

    /// Public addresses and every loopback, private and unique-local one: for the clients of
    /// `berth warm` and `berth load`, whose target the operator names.
    pub fn any_internal() -> AddressRule {
        AddressRule::allowing(INTERNAL.iter().map(|n| n.parse().expect("valid network")))
    }

    /// Public addresses, and internal ones inside `networks`.
    pub(crate) fn allowing(networks: impl IntoIterator<Item = Network>) -> AddressRule {
        let mut allowed: Vec<Network> = networks.into_iter().collect();
        allowed.sort_by_key(|n| (n.addr, n.prefix));
        allowed.dedup();
        AddressRule { allowed }
    }

    /// The rule for connections made on behalf of an endpoint URL's host: when the host is
    /// itself an internal address (or `localhost`), its network is allowed, plus `extra`.
    pub(crate) fn for_endpoint(host: Option<&str>, extra: &[Network]) -> AddressRule {
        let host = host.map(|h| h.trim_start_matches('[').trim_end_matches(']'));
        let own = match host {
            Some("localhost") => vec![
                Network::around(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                Network::around(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ],
            Some(host) => vec![host.parse::<IpAddr>().ok().and_then(Network::around)],
            None => Vec::new(),
        };
        AddressRule::allowing(own.into_iter().flatten().chain(extra.iter().copied()))
    }

    /// This rule and `other`'s networks together.
    pub(crate) fn union(&self, other: &AddressRule) -> AddressRule {
        AddressRule::allowing(self.allowed.iter().chain(&other.allowed).copied())
    }

    /// Whether berth may connect to `ip` under this rule.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        let class = classify(ip);
        let unwrapped = unwrap_ipv4(ip);
        let allowed = class == AddressClass::Public
            || (class.is_internal() && self.allowed.iter().any(|n| n.contains(unwrapped)));
        if allowed {
            Ok(())
        } else {
            Err(Refused { ip, class })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn every_class_is_recognised_in_every_spelling() {
        use AddressClass::*;
        let cases = [
            ("8.8.8.8", Public),
            ("2606:4700::1111", Public),
            ("127.0.0.1", Loopback),
            ("127.9.9.9", Loopback),
            ("::1", Loopback),
            ("::ffff:127.0.0.1", Loopback),
            ("64:ff9b::7f00:1", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", Private),
            ("::ffff:10.0.0.1", Private),
            ("fc00::1", UniqueLocal),
            ("fd12:3456::1", UniqueLocal),
            ("169.254.1.1", LinkLocal),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("169.254.169.254", Metadata),
            ("::ffff:169.254.169.254", Metadata),
            ("::ffff:a9fe:a9fe", Metadata),
            ("64:ff9b::a9fe:a9fe", Metadata),
            ("fd00:ec2::254", Metadata),
            ("100.100.100.200", Metadata),
            ("0.0.0.0", Unspecified),
            ("::", Unspecified),
            ("::ffff:0.0.0.0", Unspecified),
            ("224.0.0.1", Multicast),
            ("ff02::1", Multicast),
            ("255.255.255.255", Broadcast),
            ("0.1.2.3", Reserved),
            ("240.0.0.1", Reserved),
            ("192.0.2.1", Reserved),
            ("2001:db8::1", Reserved),
            ("::127.0.0.1", Reserved),
            ("172.32.0.1", Public),
            ("100.128.0.1", Public),
        ];
        for (text, class) in cases {
            assert_eq!(classify(ip(text)), class, "{text}");
        }
    }

    #[test]
    fn internal_addresses_need_the_config_and_some_never_pass() {
        let public = AddressRule::public_only();
        assert_eq!(public.check(ip("8.8.8.8")), Ok(()));
        for text in ["127.0.0.1", "10.0.0.1", "fd00::1", "::ffff:192.168.0.1"] {
            assert!(public.check(ip(text)).is_err(), "{text}");
        }
        let loopback = AddressRule::for_endpoint(Some("127.0.0.1"), &[]);
        assert_eq!(loopback.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(loopback.check(ip("::ffff:127.0.0.2")), Ok(()));
        assert!(loopback.check(ip("10.0.0.1")).is_err());
        let local = AddressRule::for_endpoint(Some("localhost"), &[]);
        assert_eq!(local.check(ip("::1")), Ok(()));
        let named = AddressRule::for_endpoint(Some("registry.example"), &[]);
        assert!(named.check(ip("127.0.0.1")).is_err());
        let listed =
            AddressRule::for_endpoint(None, &["10.0.0.0/8".parse().unwrap()]).union(&loopback);
        assert_eq!(listed.check(ip("10.20.30.40")), Ok(()));
        assert!(listed.check(ip("192.168.0.1")).is_err());
        let everything =
            AddressRule::allowing(["0.0.0.0/0", "::/0"].map(|n| n.parse::<Network>().unwrap()));
        for never in [
            "169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
            "169.254.1.1",
            "fe80::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "0.1.2.3",
        ] {
            let refused = everything.check(ip(never)).unwrap_err();
            assert_eq!(refused.ip, ip(never));
        }
    }

    #[test]
    fn networks_parse_in_cidr_form_only() {
        let net: Network = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.255.0.1")) && !net.contains(ip("11.0.0.1")));
        assert!(
            !net.contains(ip("::ffff:10.0.0.1")),
            "unwrapped by the caller"
        );
        let v6: Network = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fc00::1")));
        for bad in ["10.0.0.0", "10.0.0.0/33", "::/129", "x/8", "10.0.0.0/-1"] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
        assert_eq!(net.to_string(), "10.0.0.0/8");
        for internal in [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "127.0.0.0/8",
            "fd00::/8",
            "10.1.2.3/32",
        ] {
            assert!(
                internal.parse::<Network>().unwrap().is_internal(),
                "{internal}"
            );
        }
        for not in [
            "10.0.0.0/7",
            "0.0.0.0/0",
            "169.254.0.0/16",
            "8.8.8.0/24",
            "::/0",
        ] {
            assert!(!not.parse::<Network>().unwrap().is_internal(), "{not}");
        }
    }
}
