//! Routing: which configured upstream and which repository a request means.
//!
//! In order: containerd's `?ns=<registry>` names the upstream (percent-decoded once: containerd
//! sends `registry.internal%3A5000`); else a registry host as the first path component
//! (`/v2/docker.io/library/nginx/...`; a component is a host when it holds a '.' or ':' or is
//! `localhost`, as in Docker's reference grammar); else `default_upstream`. A registry name from
//! the request is parsed into a `RegistryHost` before any lookup, so a name with user-info, a
//! path, a query, brackets or an odd port is refused here (400), whatever patterns say. Docker
//! Hub names get `library/` when they have one component, so `nginx`, `library/nginx` and
//! `docker.io/library/nginx` are one cache key. A registry that is not configured is refused
//! here, before any connection: berth is never an open proxy.
//!
//! Full image references as people write them (`nginx:latest`, `ghcr.io/org/app@sha256:..`,
//! the platform's `//image/app:v1` and `/org/ORG/image/app:v1`), parsed by `oci::reference`,
//! are resolved here the same way, for `berth resolve` and the access report. Pure: no I/O.

use std::sync::Arc;

use crate::config::PlatformConfig;
use crate::oci::name::{NameError, Reference, Repository};
use crate::oci::reference::{is_registry_host, ImageRef, Orgs, ReferenceError};
use crate::upstream::host::{HostError, RegistryHost};
use crate::upstream::{Upstream, Upstreams};

/// The upstream and repository a request resolved to.
#[derive(Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub repository: Repository,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("registry {0:?} is not configured")]
    UnknownRegistry(String),
    #[error("the name holds no registry and no default_upstream is configured")]
    NoDefault,
    #[error(transparent)]
    Reference(#[from] ReferenceError),
}

/// The platform's registries as `oci::reference` reads them.
pub fn orgs(platform: &PlatformConfig) -> Orgs<'_> {
    Orgs {
        own: platform.org.as_deref(),
        domain: &platform.registry_domain,
    }
}

/// Resolves a full image reference to its upstream and repository.
pub fn resolve_image(upstreams: &Upstreams, text: &str) -> Result<(Target, Reference), RouteError> {
    let (target, image) = resolve_image_ref(upstreams, text)?;
    Ok((target, image.reference))
}

/// Resolves a full image reference, keeping all of it (a pinned tag too) for display.
pub fn resolve_image_ref(
    upstreams: &Upstreams,
    text: &str,
) -> Result<(Target, ImageRef), RouteError> {
    let image = ImageRef::parse(text, Some(orgs(upstreams.platform())))?;
    let target = resolve(upstreams, image.registry.as_deref(), image.name.as_str())?;
    Ok((target, image))
}

/// Resolves the raw name of a `/v2/<name>/...` path and the request's raw (still
/// percent-encoded) `ns` parameter.
pub fn resolve(upstreams: &Upstreams, ns: Option<&str>, name: &str) -> Result<Target, RouteError> {
    let (upstream, rest) = match ns {
        Some(ns) => {
            let decoded = percent_encoding::percent_decode_str(ns).decode_utf8_lossy();
            (lookup(upstreams, &decoded)?, name)
        }
        None => match name.split_once('/') {
            Some((first, rest)) if is_registry_host(first) => (lookup(upstreams, first)?, rest),
            _ => {
                let default = upstreams.default_upstream().ok_or(RouteError::NoDefault)?;
                (Arc::clone(default), name)
            }
        },
    };
    let repository = Repository::parse(rest)?;
    let repository = if upstream.docker_hub && repository.components().count() == 1 {
        Repository::with_prefix("library", &repository)?
    } else {
        repository
    };
    Ok(Target {
        upstream,
        repository,
    })
}

fn lookup(upstreams: &Upstreams, raw: &str) -> Result<Arc<Upstream>, RouteError> {
    let host = RegistryHost::parse(raw)?;
    upstreams
        .get(&host)
        .ok_or_else(|| RouteError::UnknownRegistry(host.to_string()))
}

/// The `ns` query parameter containerd adds when it uses berth as a mirror.
pub fn ns_param(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("ns="))
        .filter(|ns| !ns.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::oci::name::Tag;

    fn upstreams() -> Upstreams {
        let config = Config::from_toml(
            r#"
            default_upstream = "docker.io"
            [[upstream]]
            host = "docker.io"
            aliases = ["index.docker.io", "registry-1.docker.io"]
            [[upstream]]
            host = "ghcr.io"
            [[upstream]]
            host = "127.0.0.1:5000"
            endpoint = "http://127.0.0.1:5000"
            [[upstream]]
            host = "localhost"
            endpoint = "http://localhost:5001"
            "#,
        )
        .unwrap();
        Upstreams::new(&config).unwrap()
    }

    fn route(ns: Option<&str>, name: &str) -> Result<(String, String), RouteError> {
        resolve(&upstreams(), ns, name)
            .map(|t| (t.upstream.name.to_string(), t.repository.to_string()))
    }

    #[test]
    fn docker_hub_names_share_one_key() {
        let expected = Ok(("docker.io".to_string(), "library/nginx".to_string()));
        for (ns, name) in [
            (None, "nginx"),
            (None, "library/nginx"),
            (None, "docker.io/library/nginx"),
            (None, "docker.io/nginx"),
            (None, "index.docker.io/nginx"),
            (None, "registry-1.docker.io/library/nginx"),
            (Some("docker.io"), "library/nginx"),
            (Some("docker.io"), "nginx"),
        ] {
            assert_eq!(route(ns, name), expected, "{ns:?} {name}");
        }
    }

    #[test]
    fn docker_hub_configured_by_name_alone_answers_to_all_its_names() {
        let config = Config::from_toml(
            "default_upstream = \"docker.io\"\n[[upstream]]\nhost = \"docker.io\"",
        )
        .unwrap();
        let upstreams = Upstreams::new(&config).unwrap();
        for (ns, name) in [
            (None, "nginx"),
            (None, "index.docker.io/library/nginx"),
            (None, "registry-1.docker.io/nginx"),
            (None, "registry.hub.docker.com/library/nginx"),
            (Some("index.docker.io"), "nginx"),
            (Some("registry-1.docker.io"), "library/nginx"),
        ] {
            let target = resolve(&upstreams, ns, name).unwrap();
            assert_eq!(target.upstream.name.as_ref(), "docker.io", "{ns:?} {name}");
            assert_eq!(target.upstream.endpoint(), "https://registry-1.docker.io");
            assert_eq!(target.repository.as_str(), "library/nginx", "{ns:?} {name}");
        }
    }

    #[test]
    fn ns_wins_over_a_host_looking_component() {
        assert_eq!(
            route(Some("ghcr.io"), "org/app"),
            Ok(("ghcr.io".into(), "org/app".into()))
        );
        assert_eq!(
            route(None, "ghcr.io/org/app"),
            Ok(("ghcr.io".into(), "org/app".into()))
        );
    }

    #[test]
    fn ports_and_localhost_are_hosts() {
        assert_eq!(
            route(None, "127.0.0.1:5000/team/app"),
            Ok(("127.0.0.1:5000".into(), "team/app".into()))
        );
        assert_eq!(
            route(None, "localhost/app"),
            Ok(("localhost".into(), "app".into()))
        );
    }

    #[test]
    fn unconfigured_registries_are_refused() {
        assert_eq!(
            route(None, "evil.example.com/x"),
            Err(RouteError::UnknownRegistry("evil.example.com".into()))
        );
        assert_eq!(
            route(Some("quay.io"), "x/y"),
            Err(RouteError::UnknownRegistry("quay.io".into()))
        );
    }

    #[test]
    fn invalid_names_are_name_errors() {
        for name in ["Upper/case", "a//b", "a/../b", "ghcr.io/", "a\0b"] {
            assert!(
                matches!(route(None, name), Err(RouteError::Name(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_pinned_reference_fetches_the_digest_and_keeps_the_tag_for_display() {
        let digest = format!("sha256:{}", "b".repeat(64));
        let text = format!("docker.io/library/nginx:1.27@{digest}");
        let (target, image) = resolve_image_ref(&upstreams(), &text).unwrap();
        assert_eq!(target.repository.as_str(), "library/nginx");
        assert_eq!(image.reference.as_str(), digest);
        assert_eq!(image.pinned_tag.as_ref().map(Tag::as_str), Some("1.27"));
        assert_eq!(image.shown_reference(), format!("1.27@{digest}"));
        let plain = resolve_image_ref(&upstreams(), "nginx:1.27").unwrap().1;
        assert_eq!(plain.pinned_tag, None);
        assert_eq!(plain.shown_reference(), "1.27");
    }

    #[test]
    fn image_references_resolve_to_upstreams() {
        let (target, reference) = resolve_image(&upstreams(), "nginx:latest")
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!(target.upstream.name.as_ref(), "docker.io");
        assert_eq!(target.repository.as_str(), "library/nginx");
        assert_eq!(reference.as_str(), "latest");
        assert!(resolve_image(&upstreams(), "quay.io/x/y:1").is_err());
    }

    #[test]
    fn hostile_registry_names_are_refused_before_any_lookup() {
        for (ns, name) in [
            (Some("localhost:5999/.amazonaws.com"), "x"),
            (Some("localhost%3A5999%2F.amazonaws.com"), "x"),
            (Some("user@ghcr.io"), "x"),
            (Some("ghcr.io%40evil.example"), "x"),
            (Some("%5B%3A%3A1%5D"), "x"),
            (Some("ghcr.io%253A1"), "x"),
            (None, "[::1]:5000/x"),
            (None, "user@ghcr.io/x"),
            (None, "ghcr.io:0/x"),
            (None, "ghcr.io%3A443/x"),
        ] {
            assert!(
                matches!(route(ns, name), Err(RouteError::Host(_))),
                "{ns:?} {name}: {:?}",
                route(ns, name)
            );
        }
    }

    #[test]
    fn ns_is_percent_decoded_once() {
        assert_eq!(
            route(Some("127.0.0.1%3A5000"), "team/app"),
            Ok(("127.0.0.1:5000".into(), "team/app".into()))
        );
        assert_eq!(
            route(Some("GHCR.io"), "org/app"),
            Ok(("ghcr.io".into(), "org/app".into()))
        );
    }

    #[test]
    fn ns_param_is_found_among_others() {
        assert_eq!(ns_param(Some("n=10&ns=ghcr.io")), Some("ghcr.io"));
        assert_eq!(ns_param(Some("ns=")), None);
        assert_eq!(ns_param(None), None);
    }
}
