//! TLS on both sides: berth serving HTTPS (HTTP/2 and HTTP/1.1 by ALPN, certificate reloaded
//! when its files change), and berth verifying an HTTPS upstream (always, unless the operator
//! adds a CA bundle or marks that one upstream `insecure`).

mod support;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use support::ca::pem;
use support::{get, push_blob, random_blob, single_upstream_config, Auth, Berth, Registry};

/// A private CA, and leaf certificates for `localhost` and 127.0.0.1 signed by it.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            issuer: Issuer::new(params, key),
            der: cert.der().clone(),
        }
    }

    fn pem(&self) -> String {
        pem("CERTIFICATE", &self.der)
    }

    fn leaf(&self) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: pem("CERTIFICATE", cert.der()),
            key_pem: pem("PRIVATE KEY", &key.serialize_der()),
            der: cert.der().clone(),
        }
    }
}

fn write_leaf(dir: &Path, leaf: &Leaf) {
    std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
    std::fs::write(dir.join("cert.pem"), &leaf.cert_pem).unwrap();
}

fn tls_section(dir: &Path) -> String {
    format!(
        "[tls]\ncert_file = \"{0}/cert.pem\"\nkey_file = \"{0}/key.pem\"\n",
        dir.display()
    )
}

/// A TLS connection to berth trusting `ca`, offering one ALPN protocol.
async fn connect(
    addr: std::net::SocketAddr,
    ca: &Ca,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// The ping came back 200 over the protocol ALPN chose.
fn assert_ok_over<B>(response: &http::Response<B>, version: Version) {
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), version);
}

fn ping() -> Request<Empty<Bytes>> {
    Request::get("https://localhost/v2/")
        .body(Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_http2_and_http1_by_alpn_and_reloads_a_replaced_certificate() {
    let ca = Ca::new();
    let first = ca.leaf();
    let dir = tempfile::tempdir().unwrap();
    write_leaf(dir.path(), &first);
    let config = single_upstream_config(
        "unused.test",
        "http://127.0.0.1:9",
        &dir.path().join("cache"),
        &tls_section(dir.path()),
    );
    let berth = Berth::start(&config).await;

    let tls = connect(berth.addr, &ca, b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], first.der);
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(ping()).await.unwrap();
    assert_ok_over(&response, Version::HTTP_2);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "{}"
    );

    let tls = connect(berth.addr, &ca, b"http/1.1").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(ping()).await.unwrap();
    assert_ok_over(&response, Version::HTTP_11);

    // A renewed certificate is served from the next handshake on.
    let second = ca.leaf();
    write_leaf(dir.path(), &second);
    let tls = connect(berth.addr, &ca, b"h2").await;
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], second.der);

    // A broken pair is refused and the last good one kept.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    let tls = connect(berth.addr, &ca, b"h2").await;
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], second.der);
}

/// A registry holding a random blob of `size` bytes from `seed` in `team/app`.
async fn registry_holding(size: usize, seed: u64) -> (Registry, support::Blob) {
    let registry = Registry::start(Auth::None).await;
    let blob = random_blob(size, seed);
    push_blob(&registry.url(), "team/app", &blob, None)
        .await
        .unwrap();
    (registry, blob)
}

/// A private CA, and a directory holding a leaf certificate it signed (`key.pem`, `cert.pem`).
fn ca_with_leaf() -> (Ca, tempfile::TempDir) {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    write_leaf(dir.path(), &ca.leaf());
    (ca, dir)
}

/// The body of a GET of `path` over a new TLS connection speaking the protocol `alpn` names.
async fn get_over_tls(addr: std::net::SocketAddr, ca: &Ca, alpn: &[u8], path: &str) -> Bytes {
    let tls = TokioIo::new(connect(addr, ca, alpn).await);
    let request = Request::get(format!("https://localhost{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = if alpn == b"h2" {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), tls)
                .await
                .unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(tls).await.unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    };
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn hits_over_tls_are_never_sent_with_sendfile() {
    let (registry, blob) = registry_holding(3 << 20, 61).await;
    let (ca, dir) = ca_with_leaf();
    let config = single_upstream_config(
        &registry.host(),
        &registry.url(),
        &dir.path().join("cache"),
        &tls_section(dir.path()),
    );
    let berth = Berth::start(&config).await;
    let path = format!("/v2/team/app/blobs/{}", blob.digest);
    // A miss, then hits over both protocols: every body whole, none sent from the file.
    for alpn in [&b"http/1.1"[..], b"http/1.1", b"h2"] {
        let body = get_over_tls(berth.addr, &ca, alpn, &path).await;
        assert!(body == blob.bytes);
    }
    assert_eq!(berth.state.metrics.sendfile_bytes.get(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_certificates_are_verified_unless_a_ca_file_or_insecure_says_otherwise() {
    let (registry, blob) = registry_holding(200_000, 60).await;
    // An HTTPS registry: berth with TLS in front of the real one, with a private CA's cert.
    let (ca, dir) = ca_with_leaf();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let front = Berth::start(&single_upstream_config(
        &registry.host(),
        &registry.url(),
        &dir.path().join("front-cache"),
        &tls_section(dir.path()),
    ))
    .await;
    let endpoint = format!("https://127.0.0.1:{}", front.addr.port());

    let edge = |name: &str, client: &str, upstream: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\ndefault_upstream = \"{}\"\n[cache]\ndir = \"{}/{name}\"\n\
             [client]\nretries = 0\n{client}\n[[upstream]]\nhost = \"{}\"\nendpoint = \"{endpoint}\"\n{upstream}\n",
            registry.host(),
            dir.path().display(),
            registry.host(),
        )
    };
    let url = |berth: &Berth| format!("{}/v2/team/app/blobs/{}", berth.url(), blob.digest);

    let strict = Berth::start(&edge("strict", "", "")).await;
    let refused = get(&url(&strict), None).await.unwrap();
    assert_eq!(refused.status, 502);
    // The TLS failure is in berth's log; the client gets the request id only.
    let detail = String::from_utf8_lossy(&refused.body).to_string();
    assert!(
        detail.contains("request id") && !detail.contains("certificate"),
        "{detail}"
    );

    let ca_file = format!("ca_file = \"{}/ca.pem\"", dir.path().display());
    let trusting = Berth::start(&edge("trusting", &ca_file, "")).await;
    let fetched = get(&url(&trusting), None).await.unwrap();
    assert_eq!(fetched.status, 200);
    assert!(fetched.body == blob.bytes);

    let insecure = Berth::start(&edge("insecure", "", "insecure = true")).await;
    let fetched = get(&url(&insecure), None).await.unwrap();
    assert_eq!(fetched.status, 200);
    assert!(fetched.body == blob.bytes);
}

/// In the policy mode berth's 401 names its own token service as the realm; behind `[tls]`
/// that is an `https://` URL, or a client would send its key in clear (and fail the pull).
#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pulls_over_https_through_the_token_service_in_the_policy_mode() {
    const KEY: &str = "ci-key-0123456789abcdef0123";
    let registry = Registry::start(Auth::None).await;
    let image = support::Image::random(support::Flavor::Oci, 1310, &[10_000]);
    support::push_image(&registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    write_leaf(dir.path(), &ca.leaf());
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    std::fs::write(certs.join("ca.crt"), ca.pem()).unwrap();
    let hash = berth::access::principals::KeyHash::generate(KEY).to_string();
    let principals =
        serde_json::json!({"serviceAccounts": [{"name": "ci", "keys": [{"hash": hash}]}]});
    std::fs::write(dir.path().join("principals.json"), principals.to_string()).unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let config = format!(
        r#"
listen = "127.0.0.1:0"
default_upstream = "registry.test"
{tls}
[cache]
dir = "{dir}/cache"
[access]
mode = "policy"
principals = "{dir}/principals.json"
policies = "{dir}/policies"
[[upstream]]
host = "registry.test"
endpoint = "{endpoint}"
public = true
"#,
        tls = tls_section(dir.path()),
        dir = dir.path().display(),
        endpoint = registry.url(),
    );
    let berth = Berth::start(&config).await;
    let dest = tempfile::tempdir().unwrap();
    let source = format!("docker://localhost:{}/team/app:v1", berth.addr.port());
    let creds = format!("<token>:{KEY}");
    let cert_dir = certs.display().to_string();
    support::skopeo_copy_ok(
        &source,
        dest.path(),
        &[
            "--src-tls-verify=true",
            "--src-cert-dir",
            &cert_dir,
            "--src-creds",
            &creds,
            "--preserve-digests",
        ],
    )
    .await;
    let layout = support::read_oci_layout(dest.path()).unwrap();
    assert_eq!(layout.manifest_digest, image.digest());
    let tokens = berth
        .state
        .metrics
        .requests
        .with_label_values(&["token", "GET", "2xx", "BYPASS"])
        .get();
    assert!(tokens >= 1, "skopeo took the token route");
}
