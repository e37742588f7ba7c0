//! The connector under berth's HTTP client: name resolution through an injectable `Resolve`,
//! and the address rule (`address`) applied to every address before a socket is opened.
//!
//! hyper-util's `HttpConnector` dials IP literals without asking its resolver, so `Guarded`
//! checks literal hosts itself and hands names to `RuleResolver`, which drops the addresses the
//! rule refuses. Either way the address checked is the one connected to: nothing is dialled
//! that the rule did not pass. TLS, pooling and timeouts are `client`'s.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::address::{AddressRule, Refused};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Looks up the addresses of a host name. The system resolver in production; tests inject
/// their own to make a name resolve where they want (a loopback server "looking public").
pub trait Resolve: Send + Sync + 'static {
    fn resolve(&self, name: &str) -> BoxFuture<std::io::Result<Vec<IpAddr>>>;
}

/// A shared resolver.
pub type Resolver = Arc<dyn Resolve>;

/// `getaddrinfo`, through tokio's blocking pool.
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, name: &str) -> BoxFuture<std::io::Result<Vec<IpAddr>>> {
        let name = name.to_string();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((name.as_str(), 0)).await?;
            Ok(addrs.map(|addr| addr.ip()).collect())
        })
    }
}

pub fn system_resolver() -> Resolver {
    Arc::new(SystemResolver)
}

/// The resolver `HttpConnector` asks: `Resolve`, then the rule.
#[derive(Clone)]
pub struct RuleResolver {
    resolver: Resolver,
    rule: Arc<AddressRule>,
}

impl tower_service::Service<Name> for RuleResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let (resolver, rule) = (Arc::clone(&self.resolver), Arc::clone(&self.rule));
        Box::pin(async move {
            let found = resolver.resolve(name.as_str()).await?;
            permitted(&rule, found).map(|ips| {
                let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| (ip, 0).into()).collect();
                addrs.into_iter()
            })
        })
    }
}

/// The addresses the rule passes, or the refusal of the first when it passes none.
fn permitted(rule: &AddressRule, found: Vec<IpAddr>) -> Result<Vec<IpAddr>, BoxError> {
    let mut first_refusal: Option<Refused> = None;
    let mut allowed = Vec::new();
    for ip in found {
        match rule.check(ip) {
            Ok(()) => allowed.push(ip),
            Err(refused) => {
                first_refusal.get_or_insert(refused);
            }
        }
    }
    match (allowed.is_empty(), first_refusal) {
        (false, _) => Ok(allowed),
        (true, Some(refused)) => Err(Box::new(refused)),
        (true, None) => Err("the name resolved to no address".into()),
    }
}

/// `HttpConnector` with the address rule in front of it.
#[derive(Clone)]
pub struct Guarded {
    inner: HttpConnector<RuleResolver>,
    rule: Arc<AddressRule>,
}

impl Guarded {
    pub fn new(resolver: Resolver, rule: AddressRule) -> Guarded {
        let rule = Arc::new(rule);
        let inner = HttpConnector::new_with_resolver(RuleResolver {
            resolver,
            rule: Arc::clone(&rule),
        });
        Guarded { inner, rule }
    }

    /// The TCP settings of the wrapped connector.
    pub fn tcp(&mut self) -> &mut HttpConnector<RuleResolver> {
        &mut self.inner
    }
}

impl tower_service::Service<Uri> for Guarded {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let literal = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<IpAddr>().ok());
        if let Some(Err(refused)) = literal.map(|ip| self.rule.check(ip)) {
            return Box::pin(std::future::ready(Err(Box::new(refused) as BoxError)));
        }
        let connecting = self.inner.call(uri);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

/// The refusal somewhere in an error's chain, if the address rule caused it.
pub fn refusal<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut current = Some(err);
    while let Some(cause) = current {
        if let Some(refused) = cause.downcast_ref::<Refused>() {
            return Some(refused);
        }
        current = cause.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_service::Service;

    struct Fixed(Vec<IpAddr>);

    impl Resolve for Fixed {
        fn resolve(&self, _name: &str) -> BoxFuture<std::io::Result<Vec<IpAddr>>> {
            let ips = self.0.clone();
            Box::pin(async move { Ok(ips) })
        }
    }

    #[tokio::test]
    async fn refused_addresses_never_reach_a_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let mut public_only = Guarded::new(Arc::new(Fixed(vec![loopback])), AddressRule::default());
        for uri in [
            format!("http://registry.example:{port}/v2/"),
            format!("http://127.0.0.1:{port}/v2/"),
            format!("http://[::ffff:127.0.0.1]:{port}/v2/"),
            "http://169.254.169.254/latest/meta-data/".to_string(),
        ] {
            let err = public_only.call(uri.parse().unwrap()).await.unwrap_err();
            let refused = refusal(err.as_ref()).map(|r| r.class);
            assert!(refused.is_some(), "{uri}: {err}");
        }
        let allowed = AddressRule::for_endpoint(Some("127.0.0.1"), &[]);
        let mut internal = Guarded::new(Arc::new(Fixed(vec![loopback])), allowed);
        let uri = format!("http://registry.example:{port}/v2/");
        let accepted = tokio::spawn(async move { listener.accept().await.is_ok() });
        internal.call(uri.parse().unwrap()).await.unwrap();
        assert!(accepted.await.unwrap());
    }
}
