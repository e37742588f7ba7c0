//! Routing: which configured upstream and which repository a request means.
//!
//! In order: containerd's `?ns=<registry>` names the upstream; else a registry host as the first
//! path component (`/v2/docker.io/library/nginx/...`; a component is a host when it holds a '.'
//! or ':' or is `localhost`, as in Docker's reference grammar); else `default_upstream`. Docker
//! Hub names get `library/` when they have one component, so `nginx`, `library/nginx` and
//! `docker.io/library/nginx` are one cache key. A registry that is not configured is refused
//! here, before any connection: berth is never an open proxy. Pure: no I/O.

use std::sync::Arc;

use crate::oci::name::{NameError, Repository};
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
    #[error("registry {0:?} is not configured")]
    UnknownRegistry(String),
    #[error("the name holds no registry and no default_upstream is configured")]
    NoDefault,
}

/// Whether the first component of a name is a registry host (Docker's reference grammar).
pub fn is_registry_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// Resolves the raw name of a `/v2/<name>/...` path and the request's `ns` parameter.
pub fn resolve(upstreams: &Upstreams, ns: Option<&str>, name: &str) -> Result<Target, RouteError> {
    let (upstream, rest) = match ns {
        Some(ns) => (lookup(upstreams, ns)?, name),
        None => match name.split_once('/') {
            Some((first, rest)) if is_registry_host(first) => (lookup(upstreams, first)?, rest),
            _ => (
                upstreams.default_upstream().ok_or(RouteError::NoDefault)?,
                name,
            ),
        },
    };
    let repository = Repository::parse(rest)?;
    let repository = if upstream.docker_hub && repository.components().count() == 1 {
        Repository::with_prefix("library", &repository)?
    } else {
        repository
    };
    Ok(Target {
        upstream: Arc::clone(upstream),
        repository,
    })
}

fn lookup<'a>(upstreams: &'a Upstreams, host: &str) -> Result<&'a Arc<Upstream>, RouteError> {
    upstreams
        .get(host)
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
    fn ns_param_is_found_among_others() {
        assert_eq!(ns_param(Some("n=10&ns=ghcr.io")), Some("ghcr.io"));
        assert_eq!(ns_param(Some("ns=")), None);
        assert_eq!(ns_param(None), None);
    }
}
