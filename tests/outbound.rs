//! Outbound safety: berth dials only what its configuration allows, and credentials go only to
//! the registries they are for. Each test performs an attack and checks it fails: hostile
//! registry names from requests, a public name resolving to loopback, redirects to the metadata
//! address and from https to http, a challenge on a redirect hop, a docker login offered to
//! another host of the same pattern, and what a connect failure tells the client.

mod support;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use berth::config::Config;
use berth::net::connect::{Resolve, Resolver};
use berth::oci::name::{Reference, Repository};
use berth::upstream::{UpstreamError, Upstreams};
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use support::ca::test_ca;
use support::scripted::{Answer, Scripted};
use support::stack::registry_with;
use support::token::{Policy, TokenServer};
use support::{fetch, push_image, request, Auth, Berth, Flavor, Image, Registry, Tap};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A loopback listener that counts the connections it accepts and closes each at once.
struct Counting {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Counting {
    async fn start() -> Counting {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Counting {
            port,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `GET <target>` exactly as written (no client-side parsing or escaping) and returns the
/// status code.
async fn raw_get(addr: std::net::SocketAddr, target: &str) -> u16 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {target} HTTP/1.1\r\nHost: berth.test\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_registry_names_never_reach_a_socket() {
    let listener = Counting::start().await;
    let port = listener.port;
    let cache = tempfile::tempdir().unwrap();
    // The embedded default's patterns, a broad-but-legal one, and a control upstream that
    // really is the counting listener.
    let mut config = format!("[cache]\ndir = \"{}\"\n", cache.path().display());
    for pattern in [
        "*.gcr.io",
        "*-docker.pkg.dev",
        "*.dkr.ecr.*.amazonaws.com",
        "*.azurecr.io",
        "*.amazonaws.com",
    ] {
        config.push_str(&format!("[[upstream]]\nhost = \"{pattern}\"\n"));
    }
    config.push_str(&format!(
        "[[upstream]]\nhost = \"control.test\"\nendpoint = \"http://127.0.0.1:{port}\"\n"
    ));
    let berth = Berth::start(&config).await;
    let names = [
        format!("localhost:{port}/.amazonaws.com"),
        format!("localhost:{port}#.amazonaws.com"),
        format!("localhost:{port}?.amazonaws.com"),
        format!("localhost:{port}\\.amazonaws.com"),
        format!("127.0.0.1:{port}"),
        format!("LOCALHOST:{port}"),
        format!("x@127.0.0.1:{port}"),
        format!("x.amazonaws.com@127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("2130706433:{port}"),
        format!("1.dkr.ecr.localhost:{port}/.amazonaws.com"),
        format!("a-docker.pkg.dev:{port}"),
        format!("eu.GCR.io@localhost:{port}"),
        format!("{}.amazonaws.com", "a".repeat(64)),
        format!("x .amazonaws.com:{port}"),
        format!("%6c%6fcalhost:{port}"),
    ];
    let encode = |text: &str| -> String {
        text.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' => (b as char).to_string(),
                other => format!("%{other:02X}"),
            })
            .collect()
    };
    let mut targets = Vec::new();
    for name in &names {
        for spelled in [name.clone(), encode(name)] {
            targets.push(format!("/v2/team/app/tags/list?ns={spelled}"));
            targets.push(format!("/v2/team/app/manifests/v1?n=1&ns={spelled}"));
            targets.push(format!("/v2/{spelled}/team/app/manifests/v1"));
            targets.push(format!(
                "/v2/{spelled}/team/app/blobs/sha256:{}",
                "a".repeat(64)
            ));
        }
    }
    for target in &targets {
        let status = raw_get(berth.addr, target).await;
        assert!(
            matches!(status, 400 | 404),
            "{target}: answered {status}, wanted 400 or 404"
        );
        assert_eq!(listener.accepted(), 0, "{target} reached the listener");
    }
    // The control: a configured upstream on that port is reached, so the count works.
    let status = raw_get(berth.addr, "/v2/team/app/tags/list?ns=control.test").await;
    assert_eq!(status, 502);
    assert!(listener.accepted() >= 1);
}

/// Resolves every name in its table to the address given; anything else fails.
struct Table(Vec<(&'static str, IpAddr)>);

impl Resolve for Table {
    fn resolve(
        &self,
        name: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>
    {
        let found: Vec<IpAddr> = self
            .0
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, ip)| *ip)
            .collect();
        Box::pin(async move {
            if found.is_empty() {
                Err(std::io::Error::other("no such name in the test table"))
            } else {
                Ok(found)
            }
        })
    }
}

fn table(entries: &[(&'static str, &str)]) -> Resolver {
    Arc::new(Table(
        entries
            .iter()
            .map(|(name, ip)| (*name, ip.parse().unwrap()))
            .collect(),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_public_name_resolving_to_loopback_is_refused_unless_its_network_is_allowed() {
    let image = Image::random(Flavor::Oci, 3, &[1000]);
    let (_registry, tap) = registry_with(&image, "team/app", "v1").await;
    let cache = tempfile::tempdir().unwrap();
    let config = |extra: &str| {
        format!(
            "[cache]\ndir = \"{}\"\n[[upstream]]\nhost = \"registry.example.com\"\n\
             endpoint = \"http://registry.example.com:{}\"\n{extra}\n",
            cache.path().display(),
            tap.addr().port()
        )
    };
    let resolver = table(&[
        ("registry.example.com", "127.0.0.1"),
        ("registry.example.com", "::ffff:127.0.0.1"),
    ]);
    let url = |berth: &Berth| {
        format!(
            "{}/v2/registry.example.com/team/app/manifests/v1",
            berth.url()
        )
    };
    let accept = [("accept", Flavor::Oci.manifest_type())];
    let get = |berth: &Berth| {
        fetch(request(
            Method::GET,
            &url(berth),
            None,
            &accept,
            Bytes::new(),
        ))
    };
    let berth = Berth::start_with_resolver(&config(""), Arc::clone(&resolver)).await;
    let refused = get(&berth).await.unwrap();
    assert_eq!(refused.status, 502, "{:?}", refused.body);
    assert!(tap.requests().is_empty(), "{:#?}", tap.requests());
    let body = String::from_utf8_lossy(&refused.body);
    assert!(
        !body.contains("127.0.0.1") && !body.contains("loopback"),
        "{body}"
    );

    let allowed = "allow_networks = [\"127.0.0.0/8\"]";
    let berth = Berth::start_with_resolver(&config(allowed), resolver).await;
    let fetched = get(&berth).await.unwrap();
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.body, image.manifest.bytes);
}

/// An empty answer of `status` with one header, to every request.
fn answer_with(status: StatusCode, name: &'static str, value: String) -> Answer {
    Arc::new(move |_, _| {
        Response::builder()
            .status(status)
            .header(name, value.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap()
    })
}

fn redirect_to(location: String) -> Answer {
    answer_with(StatusCode::TEMPORARY_REDIRECT, "location", location)
}

/// Upstreams configured by `head` (top-level tables) and one `[[upstream]]` for `host` at
/// `endpoint` with `extra` keys.
fn upstreams_for(head: &str, host: &str, endpoint: &str, extra: &str) -> Upstreams {
    let text = format!("{head}[[upstream]]\nhost = \"{host}\"\nendpoint = \"{endpoint}\"\n{extra}");
    Upstreams::new(&Config::from_toml(&text).unwrap()).unwrap()
}

/// The error of a manifest GET through `host` that must fail.
async fn manifest_error(upstreams: &Upstreams, host: &str) -> UpstreamError {
    manifest_through(upstreams, host).await.unwrap_err()
}

async fn manifest_through(upstreams: &Upstreams, host: &str) -> Result<u16, UpstreamError> {
    let target = berth::route::resolve(upstreams, Some(host), "team/app").unwrap();
    let repository: &Repository = &target.repository;
    let reference = Reference::parse("v1").unwrap();
    let accept = http::HeaderValue::from_static(Flavor::Oci.manifest_type());
    target
        .upstream
        .manifest(Method::GET, repository, &reference, Some(&accept))
        .await
        .map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_to_the_metadata_address_is_refused_before_any_connection() {
    for location in [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://metadata.test/computeMetadata/v1/",
    ] {
        let upstream = Scripted::start(redirect_to(location.to_string())).await;
        let config = Config::from_toml(&format!(
            "[[upstream]]\nhost = \"redirecting.test\"\nendpoint = \"{}\"\n",
            upstream.url()
        ))
        .unwrap();
        let resolver = table(&[("metadata.test", "169.254.169.254")]);
        let metrics = Arc::new(berth::metrics::Metrics::new());
        let upstreams = Upstreams::with_resolver(&config, metrics, resolver).unwrap();
        let err = manifest_error(&upstreams, "redirecting.test").await;
        // `Refused` comes only from the connector's check, which runs before a socket exists.
        assert!(
            matches!(err, UpstreamError::Refused(_)),
            "{location}: {err:?}"
        );
        assert_eq!(upstream.count(), 1, "no retries of a refusal");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_are_followed_five_times_at_most() {
    let upstream = Scripted::start(redirect_to("/v2/team/app/manifests/v1".into())).await;
    let upstreams = upstreams_for("", "loop.test", &upstream.url(), "");
    let err = manifest_error(&upstreams, "loop.test").await;
    assert!(matches!(err, UpstreamError::Invalid(_)), "{err:?}");
    assert_eq!(upstream.count(), 6, "the request and five redirects");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_challenge_on_a_redirect_hop_is_answered_anonymously() {
    let policy = Policy::new()
        .user("alice", "alice-pw", &[("team/*", "pull")])
        .anonymous(&[("team/*", "pull")]);
    let tokens = TokenServer::start(policy).await;
    let registry = Registry::start(tokens.auth()).await;
    let image = Image::random(Flavor::Oci, 7, &[1000]);
    tokens
        .seed_image(&registry.url(), "team/app", "v1", &image)
        .await
        .unwrap();
    // The upstream (with alice's password configured) redirects every call to the token
    // registry, as registry.k8s.io sends every /v2/ call to a pkg.dev host.
    let registry_url = registry.url();
    let origin = Scripted::start(Arc::new(move |req, _| {
        Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header("location", format!("{registry_url}{}", req.uri().path()))
            .body(Full::new(Bytes::new()))
            .unwrap()
    }))
    .await;
    let upstreams = upstreams_for(
        "",
        "origin.test",
        &origin.url(),
        "username = \"alice\"\npassword = \"alice-pw\"\n",
    );
    tokens.reset();
    let status = manifest_through(&upstreams, "origin.test").await.unwrap();
    assert_eq!(status, 200);
    let requests = tokens.requests();
    assert!(!requests.is_empty());
    assert!(
        requests.iter().all(|r| r.user.is_none()),
        "the hop's realm never saw alice: {requests:#?}"
    );
    // A second pull reuses the hop's anonymous token.
    let fetched = requests.len();
    assert_eq!(
        manifest_through(&upstreams, "origin.test").await.unwrap(),
        200
    );
    assert_eq!(tokens.requests().len(), fetched, "{:#?}", tokens.requests());
    assert_eq!(origin.count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_docker_login_is_never_offered_to_another_host_of_its_pattern() {
    let registry = Registry::start(Auth::basic("puller", "pull-pw")).await;
    let tap = Tap::start(&registry.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pull.json");
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("puller:pull-pw");
    let auths = serde_json::json!({"auths": {"a.reg.test": {"auth": auth}}});
    std::fs::write(&secret, auths.to_string()).unwrap();
    let text = format!(
        "[cache]\ndir = \"{cache}\"\n[[upstream]]\nhost = \"*.reg.test\"\nendpoint = \"{url}\"\n\
         secret = \"pull\"\n[[secret]]\nname = \"pull\"\ntype = \"docker\"\nfile = \"{file}\"\n",
        cache = dir.path().join("cache").display(),
        url = tap.url(),
        file = secret.display()
    );
    let berth = Berth::start(&text).await;
    let accept = [("accept", Flavor::Oci.manifest_type())];
    let url = format!("{}/v2/b.reg.test/team/app/manifests/v1", berth.url());
    let fetched = fetch(request(Method::GET, &url, None, &accept, Bytes::new()))
        .await
        .unwrap();
    assert!(fetched.status.is_client_error() || fetched.status.is_server_error());
    let offered = tap
        .seen()
        .iter()
        .filter(|s| s.headers.contains_key("authorization"))
        .count();
    assert_eq!(offered, 0, "b.reg.test was offered a.reg.test's login");
    // a.reg.test itself still gets it.
    let image = Image::random(Flavor::Oci, 8, &[500]);
    push_image(&registry.url(), "team/app", "v1", &image, registry.creds())
        .await
        .unwrap();
    let url = format!("{}/v2/a.reg.test/team/app/manifests/v1", berth.url());
    let fetched = fetch(request(Method::GET, &url, None, &accept, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(fetched.status, 200, "{:?}", fetched.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connect_failure_tells_the_client_nothing_but_the_request_id() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let cache = tempfile::tempdir().unwrap();
    let text = format!(
        "[cache]\ndir = \"{}\"\n[client]\nretries = 0\n[[upstream]]\nhost = \"down.test\"\n\
         endpoint = \"http://127.0.0.1:{port}\"\n",
        cache.path().display()
    );
    let berth = Berth::start(&text).await;
    let url = format!("{}/v2/down.test/team/app/manifests/v1", berth.url());
    let headers = [("x-request-id", "req-42")];
    let fetched = fetch(request(Method::GET, &url, None, &headers, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(fetched.status, 502);
    let body = String::from_utf8_lossy(&fetched.body);
    assert!(body.contains("req-42"), "{body}");
    for leak in [
        "127.0.0.1",
        &port.to_string(),
        "refused",
        "os error",
        "tcp",
        "connect",
    ] {
        assert!(!body.contains(leak), "{leak} in {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_a_registry_with_a_port_routed_by_ns_alone() {
    let image = Image::random(Flavor::Oci, 41, &[32 << 10, 96 << 10]);
    let (_registry, tap) = registry_with(&image, "team/app", "v1").await;
    // The registry's name carries a port; it is not the default upstream, and the path holds
    // no host, so only `?ns=registry.internal%3APORT` (as containerd encodes it) can route.
    let name = format!("registry.internal:{}", tap.addr().port());
    let cache = tempfile::tempdir().unwrap();
    let text = format!(
        "[cache]\ndir = \"{}\"\n[[upstream]]\nhost = \"{name}\"\nendpoint = \"{}\"\n",
        cache.path().display(),
        tap.url()
    );
    let berth = Berth::start(&text).await;
    let containerd = support::Containerd::start().await;
    let hosts = support::HostsDir::new();
    hosts.mirror(&name, &berth.url(), None);
    containerd
        .pull_ok(&format!("{name}/team/app:v1"), hosts.path(), &[])
        .await;
    let images = containerd.images().await;
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0].digest, image.digest());
    assert_eq!(
        tap.count(Method::GET, support::Kind::Blob),
        image.blobs().len()
    );
    assert_eq!(
        containerd.escapes(),
        Vec::<String>::new(),
        "nothing bypassed berth"
    );
}

fn challenge(value: String) -> Answer {
    answer_with(StatusCode::UNAUTHORIZED, "www-authenticate", value)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_upstream_redirecting_to_http_is_not_followed() {
    let listener = Counting::start().await;
    let location = format!(
        "http://127.0.0.1:{}/v2/team/app/manifests/v1",
        listener.port
    );
    let origin = Scripted::start_tls(redirect_to(location)).await;
    let upstreams = upstreams_for(&test_ca().client_section(), "tls.test", &origin.url(), "");
    let err = manifest_error(&upstreams, "tls.test").await;
    assert!(matches!(err, UpstreamError::Invalid(_)), "{err:?}");
    assert_eq!(origin.count(), 1, "the TLS upstream was asked");
    assert_eq!(listener.accepted(), 0, "the http target was never dialled");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_upstream_sends_its_credentials_to_an_https_realm_only() {
    let tokens =
        TokenServer::start(Policy::new().user("alice", "alice-pw", &[("team/*", "pull")])).await;
    let realm = format!("Bearer realm=\"{}\",service=\"test\"", tokens.realm());
    let origin = Scripted::start_tls(challenge(realm)).await;
    let upstreams = upstreams_for(
        &test_ca().client_section(),
        "tls.test",
        &origin.url(),
        "username = \"alice\"\npassword = \"alice-pw\"\n",
    );
    let _ = manifest_through(&upstreams, "tls.test").await;
    let requests = tokens.requests();
    assert!(!requests.is_empty(), "the realm was asked");
    assert!(
        requests.iter().all(|r| r.user.is_none()),
        "alice's password went to a plain-http realm: {requests:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_realm_at_the_metadata_address_is_refused() {
    let origin = Scripted::start(challenge(
        "Bearer realm=\"http://169.254.169.254/latest/api/token\"".to_string(),
    ))
    .await;
    let upstreams = upstreams_for("", "realm.test", &origin.url(), "");
    let err = manifest_error(&upstreams, "realm.test").await;
    assert!(matches!(err, UpstreamError::Refused(_)), "{err:?}");
}
