//! `RegistryHost`: a registry name taken from a request (`?ns=` or the first path component),
//! validated before anything looks it up, matches it against a pattern or builds a URL from it.
//!
//! A registry host is DNS labels of `[a-z0-9-]` (lower-cased here; 1 to 63 characters, no
//! leading or trailing `-`, at most 253 in all) or a dotted-quad IPv4 address, with an optional
//! `:port` (1 to 65535). Nothing else: no user-info, path, query, fragment, percent sign,
//! brackets (IPv6 literals), backslash, whitespace, or empty labels. Names that a resolver
//! would read as a number (`2130706433`, `0x7f000001`, `127.1`) are refused too, since
//! `getaddrinfo` turns them into addresses. Pure: percent-decoding `?ns=` is the caller's job.

use std::fmt;
use std::net::Ipv4Addr;

/// Longest host name DNS allows (RFC 1035 section 2.3.4, without the trailing dot).
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// A validated, lower-cased registry host with an optional port.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RegistryHost {
    /// `name[:port]`, lower case.
    text: String,
    /// Where the name ends (and the `:port`, if any, begins).
    name_end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid registry host {0:?}")]
pub struct HostError(pub String);

impl RegistryHost {
    pub fn parse(raw: &str) -> Result<RegistryHost, HostError> {
        let invalid = || HostError(raw.chars().take(300).collect());
        let lower = raw.to_ascii_lowercase();
        let (name, port) = match lower.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (lower.as_str(), None),
        };
        if let Some(port) = port {
            let digits_only = !port.is_empty() && port.len() <= 5;
            let digits_only = digits_only && port.bytes().all(|b| b.is_ascii_digit());
            if !digits_only || !(1..=65535).contains(&port.parse::<u32>().unwrap_or(0)) {
                return Err(invalid());
            }
        }
        if !is_ipv4(name) && !is_dns_name(name) {
            return Err(invalid());
        }
        Ok(RegistryHost {
            name_end: name.len(),
            text: lower,
        })
    }

    /// `name[:port]`, as image references spell it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The name without the port.
    pub fn name(&self) -> &str {
        &self.text[..self.name_end]
    }

    /// The port, when the host names one.
    pub fn port(&self) -> Option<u16> {
        self.text[self.name_end..]
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
    }
}

/// Canonical dotted quad only: four decimal parts, no leading zeros.
fn is_ipv4(name: &str) -> bool {
    name.parse::<Ipv4Addr>().is_ok()
}

fn is_dns_name(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_NAME {
        return false;
    }
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= MAX_LABEL
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    labels_ok && !reads_as_a_number(name)
}

/// Whether a resolver could take `name` for an IPv4 address in inet_aton's loose forms
/// (`127.1`, `2130706433`, `0x7f.1`, `0177.0.0.1`): its last label is a number. No top-level
/// domain is numeric, so no real registry name is refused by this.
fn reads_as_a_number(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    hex || last.bytes().all(|b| b.is_ascii_digit())
}

impl fmt::Display for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegistryHost({:?})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn registry_names_as_image_references_spell_them() {
        for (raw, name, port) in [
            ("docker.io", "docker.io", None),
            ("GHCR.IO", "ghcr.io", None),
            ("localhost", "localhost", None),
            ("localhost:5000", "localhost", Some(5000)),
            ("registry.internal:5000", "registry.internal", Some(5000)),
            ("127.0.0.1:5000", "127.0.0.1", Some(5000)),
            (
                "us-central1-docker.pkg.dev",
                "us-central1-docker.pkg.dev",
                None,
            ),
            (
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
                None,
            ),
        ] {
            let host = RegistryHost::parse(raw).unwrap();
            assert_eq!((host.name(), host.port()), (name, port), "{raw}");
        }
    }

    #[test]
    fn anything_but_a_host_and_port_is_refused() {
        let long_label = format!("{}.io", "a".repeat(64));
        let long_name = format!("{}io", "abcdefghi.".repeat(26));
        for raw in [
            "",
            ":5000",
            "a:",
            "a:0",
            "a:65536",
            "a:+80",
            "a:80:80",
            "a:080808",
            "localhost:5999/.amazonaws.com",
            "user@ghcr.io",
            "ghcr.io/x",
            "ghcr.io?x",
            "ghcr.io#x",
            "ghcr.io%2f",
            "[::1]",
            "[::1]:5000",
            "::1",
            "a\\b.io",
            "a b.io",
            " ghcr.io",
            "ghcr.io\n",
            "a..io",
            ".io",
            "io.",
            "-a.io",
            "a-.io",
            "a_b.io",
            "é.io",
            &long_label,
            &long_name,
            "2130706433",
            "127.1",
            "0x7f000001",
            "0177.0.0.1",
            "127.000.000.001",
            "1.2.3.256",
            "a.0x10",
        ] {
            assert!(RegistryHost::parse(raw).is_err(), "{raw:?}");
        }
    }

    proptest! {
        #[test]
        fn a_parsed_host_prints_as_it_parses(raw in "\\PC{0,40}") {
            if let Ok(host) = RegistryHost::parse(&raw) {
                prop_assert_eq!(RegistryHost::parse(host.as_str()), Ok(host.clone()));
                prop_assert!(host.as_str().bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit() || b"-.:".contains(&b)));
            }
        }
    }
}
