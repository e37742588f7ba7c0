//! A token server for the real registry's `auth.token` mode: Docker's token protocol the way
//! Docker Hub and GHCR speak it, in process on 127.0.0.1:0.
//!
//! Owns: the signing key and the self-signed certificate the registry trusts, the access policy
//! (which user may do what on which repository, and what anonymous callers get), the request log
//! that tests count, and bearer-authenticated pushes for seeding a token-protected registry.
//! Does not own: the registry side (`Auth::Token` in `registry` renders the config), OAuth2
//! `POST /token` (answered 404, which containerd and docker take as "use GET"), refresh tokens,
//! or TLS.
//!
//! The protocol (distribution `docs/spec/auth/token.md`):
//! ```text
//!   client ── GET /v2/NAME/manifests/REF ─────────────────────────> registry
//!          <─ 401 WWW-Authenticate: Bearer realm=R,service=S,scope=repository:NAME:pull
//!   client ── GET R?service=S&scope=repository:NAME:pull (+ Basic) ─> TokenServer
//!          <─ 200 {"token","access_token","expires_in","issued_at"}
//!   client ── GET ... Authorization: Bearer <JWT> ─────────────────> registry: 200
//! ```
//! The JWT is ES256 with a `kid` header. distribution 2.8 finds the verifying key in one of three
//! ways (`registry/auth/token/token.go`, `VerifySigningKey`): an `x5c` chain that must verify up
//! to `rootcertbundle`, a `jwk` header naming a trusted key, or a `kid` equal to the libtrust key
//! ID of a certificate's key in `rootcertbundle`. 2.8.2 accepted this server's tokens by `kid` and
//! by `x5c` alike (tried both); `kid` is used because it needs no certificate validity or
//! key-usage checks. Claims 2.8 checks: `iss` is the configured issuer, `aud` the service,
//! `exp`/`nbf` with 60 s of leeway (a token 55 s past `exp` still worked, 65 s past did not), then
//! each requested access must appear in `access`, else 401 `error="insufficient_scope"` (never
//! 403). A bad signature, an unknown key or an expired token gets 401 `error="invalid_token"`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::ca::pem;
use super::client::{self, BoxError, Creds};
use super::image::{Blob, Image, Index};
use super::push::{expect, upload_url, PushError};
use super::registry::Auth;
use super::tap::accept_each;

/// The `service` the registry names in its challenge and expects as the token's `aud`.
pub const SERVICE: &str = "berth-test-registry";
/// The `iss` the registry trusts.
pub const ISSUER: &str = "berth-test-token-issuer";
/// Docker Hub hands out 300 s tokens; so does this server unless told otherwise.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// Which repositories a principal may use and how. A pattern is a repository name, or a prefix
/// ending in `*` (`team/*`, or `*` for every repository); actions are `pull`, `push`, `delete`,
/// or `*` for all of them.
#[derive(Clone, Debug, Default)]
struct Grants(Vec<(String, Vec<String>)>);

impl Grants {
    /// From `[("team/app", "pull,push"), ("public/*", "pull")]`.
    fn new(grants: &[(&str, &str)]) -> Grants {
        Grants(
            grants
                .iter()
                .map(|(pattern, actions)| (pattern.to_string(), split_actions(actions)))
                .collect(),
        )
    }

    /// The subset of `requested` actions on `repo` these grants allow, in request order.
    fn allowed(&self, repo: &str, requested: &[String]) -> Vec<String> {
        let matching: Vec<&Vec<String>> = self
            .0
            .iter()
            .filter(|(pattern, _)| match pattern.strip_suffix('*') {
                Some(prefix) => repo.starts_with(prefix),
                None => pattern == repo,
            })
            .map(|(_, actions)| actions)
            .collect();
        requested
            .iter()
            .filter(|a| {
                matching
                    .iter()
                    .any(|g| g.contains(a) || g.iter().any(|g| g == "*"))
            })
            .cloned()
            .collect()
    }
}

/// Who may ask for what. Users authenticate with Basic credentials on the token request;
/// a request without credentials is anonymous and gets the anonymous grants (Docker Hub gives
/// anonymous callers pull on public repositories and an empty token for the rest).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    users: HashMap<String, (String, Grants)>,
    anonymous: Grants,
}

impl Policy {
    pub fn new() -> Policy {
        Policy::default()
    }

    /// Adds a user with a password and grants, e.g. `.user("alice", "pw", &[("team/*", "pull")])`.
    pub fn user(mut self, name: &str, password: &str, grants: &[(&str, &str)]) -> Policy {
        self.users
            .insert(name.to_owned(), (password.to_owned(), Grants::new(grants)));
        self
    }

    /// What a caller without credentials may do.
    pub fn anonymous(mut self, grants: &[(&str, &str)]) -> Policy {
        self.anonymous = Grants::new(grants);
        self
    }
}

/// One request to the token endpoint, as the server saw and answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The Basic user name, `None` when anonymous. Recorded even when the password was wrong.
    pub user: Option<String>,
    pub service: Option<String>,
    /// Each requested scope as sent, e.g. `repository:team/app:pull,push`.
    pub scopes: Vec<String>,
    pub status: StatusCode,
    /// What the issued token allows, as `repository:NAME:a,b`; empty for a refusal or when the
    /// caller may do none of what it asked.
    pub granted: Vec<String>,
}

/// The `access` claim of a token: one entry per repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub repo: String,
    pub actions: Vec<String>,
}

impl Access {
    pub fn new(repo: &str, actions: &str) -> Access {
        Access {
            repo: repo.to_owned(),
            actions: split_actions(actions),
        }
    }
}

/// The signing key and the certificate that carries its public half to the registry.
struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    /// libtrust key ID of the public key, the JWT `kid` distribution looks up.
    kid: String,
    cert_pem: String,
}

impl Signer {
    /// A fresh P-256 key per server (a few milliseconds), so no key material is committed.
    fn generate() -> Signer {
        use rcgen::PublicKeyData as _;
        let key = rcgen::KeyPair::generate().expect("generate P-256 key");
        let params = rcgen::CertificateParams::new(vec!["berth-test-token-issuer".to_owned()])
            .expect("certificate params");
        let cert = params.self_signed(&key).expect("self-sign certificate");
        let rng = SystemRandom::new();
        let pkcs8 = key.serialize_der();
        let signing = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .expect("rcgen's PKCS#8 loads in ring");
        Signer {
            key: signing,
            rng,
            kid: libtrust_key_id(&key.subject_public_key_info()),
            cert_pem: pem("CERTIFICATE", cert.der()),
        }
    }

    /// A compact JWS: base64url(header).base64url(claims).base64url(r || s).
    fn sign(&self, claims: &Value) -> String {
        let header = json!({ "typ": "JWT", "alg": "ES256", "kid": self.kid });
        let encode = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"));
        let input = format!("{}.{}", encode(&header), encode(claims));
        let signature = self
            .key
            .sign(&self.rng, input.as_bytes())
            .expect("ECDSA signing");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

struct State {
    policy: Policy,
    signer: Signer,
    lifetime_secs: AtomicU64,
    backdate_secs: AtomicU64,
    log: Mutex<Vec<TokenRequest>>,
    /// Makes every `jti` unique, as a real issuer's would be.
    next_id: AtomicU64,
}

/// A running token server; dropping it stops accepting and closes its connections.
pub struct TokenServer {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl TokenServer {
    /// Generates a signing key and starts serving `GET /token` under `policy`.
    pub async fn start(policy: Policy) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind token server");
        let addr = listener.local_addr().expect("token server address");
        let state = Arc::new(State {
            policy,
            signer: Signer::generate(),
            lifetime_secs: AtomicU64::new(DEFAULT_LIFETIME.as_secs()),
            backdate_secs: AtomicU64::new(0),
            log: Mutex::default(),
            next_id: AtomicU64::new(1),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        TokenServer {
            addr,
            state,
            accept,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token endpoint, `http://127.0.0.1:PORT/token`, as the registry's challenge names it.
    pub fn realm(&self) -> String {
        format!("{}/token", self.url())
    }

    /// The registry configuration that trusts this server's tokens, with the challenge's realm
    /// pointing here.
    pub fn auth(&self) -> Auth {
        self.auth_with_realm(&self.realm())
    }

    /// Like `auth`, with another realm: e.g. `format!("{}/token", tap.url())` for a `Tap` in
    /// front of this server, so token requests can be counted or failed (`Kind::Token`).
    pub fn auth_with_realm(&self, realm: &str) -> Auth {
        Auth::Token {
            realm: realm.to_owned(),
            service: SERVICE.to_owned(),
            issuer: ISSUER.to_owned(),
            root_cert_pem: self.state.signer.cert_pem.clone(),
        }
    }

    /// Sets `expires_in` and the `exp` claim of tokens issued from now on (default 300 s).
    /// The registry allows 60 s of leeway past `exp`, so a short lifetime tests a client's
    /// refresh logic, not the registry's refusal; for that, see `backdate`.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.state
            .lifetime_secs
            .store(lifetime.as_secs(), Ordering::SeqCst);
    }

    /// Issues tokens as if `by` ago (`iat`, `nbf`, `exp` and `issued_at` all move back) while
    /// `expires_in` still promises the full lifetime: with `by` past lifetime + 60 s, every new
    /// token is one the registry refuses as expired (a revoked token, or an issuer whose clock
    /// is behind). `Duration::ZERO` restores normal tokens.
    pub fn backdate(&self, by: Duration) {
        self.state
            .backdate_secs
            .store(by.as_secs(), Ordering::SeqCst);
    }

    /// Every token request since the last `reset`, in arrival order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.log.lock().unwrap().clone()
    }

    /// Token requests made as `user` (`None`: anonymous) since the last `reset`.
    pub fn count(&self, user: Option<&str>) -> usize {
        let log = self.state.log.lock().unwrap();
        log.iter().filter(|r| r.user.as_deref() == user).count()
    }

    pub fn reset(&self) {
        self.state.log.lock().unwrap().clear();
    }

    /// Signs a token for `subject` with exactly `access`, with the current lifetime and backdate,
    /// without an HTTP request and without logging one: for seeding content and for tests that
    /// need a particular token.
    pub fn mint(&self, subject: &str, access: &[Access]) -> String {
        self.state.issue(subject, access).0
    }

    /// `GET /token` as a client would: `service` is ours and each of `scopes` is sent as its own
    /// `scope` parameter. Counted like any other request.
    pub async fn fetch_token(
        &self,
        creds: Creds<'_>,
        scopes: &[&str],
    ) -> Result<client::Fetched, BoxError> {
        let mut url = format!("{}?service={SERVICE}", self.realm());
        for scope in scopes {
            url.push_str("&scope=");
            url.push_str(&percent_encode(scope));
        }
        client::get(&url, creds).await
    }

    /// `fetch_token`, insisting on a 200, returning the `token` field.
    pub async fn token(&self, creds: Creds<'_>, scopes: &[&str]) -> String {
        let response = self
            .fetch_token(creds, scopes)
            .await
            .expect("token request");
        assert_eq!(response.status, StatusCode::OK, "{response:?}");
        let body: Value = serde_json::from_slice(&response.body).expect("token JSON");
        body["token"].as_str().expect("token field").to_owned()
    }

    /// Pushes `image` into `repo` with a minted push token (no token request is logged).
    pub async fn seed_image(
        &self,
        registry_url: &str,
        repo: &str,
        reference: &str,
        image: &Image,
    ) -> Result<(), PushError> {
        let token = self.mint("seed", &[Access::new(repo, "pull,push")]);
        push_image_bearer(registry_url, repo, reference, image, &token).await
    }

    /// Pushes `index` and its images into `repo` with a minted push token.
    pub async fn seed_index(
        &self,
        registry_url: &str,
        repo: &str,
        reference: &str,
        index: &Index,
    ) -> Result<(), PushError> {
        let token = self.mint("seed", &[Access::new(repo, "pull,push")]);
        for image in &index.images {
            push_image_bearer(registry_url, repo, image.digest(), image, &token).await?;
        }
        let bearer = Bearer::new(registry_url, repo, &token);
        let manifest = &index.manifest;
        bearer
            .manifest(reference, index.media_type(), manifest)
            .await
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A `WWW-Authenticate: Bearer ...` challenge, as a test reads it off a 401.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
    /// `invalid_token` or `insufficient_scope` (RFC 6750 section 3.1) when a token was refused.
    pub error: Option<String>,
}

impl Challenge {
    /// Parses a Bearer challenge; `None` for another scheme or without a realm. Enough for the
    /// challenges distribution writes (quoted values, which may hold commas), not a general
    /// RFC 9110 parser.
    pub fn parse(value: &str) -> Option<Challenge> {
        let (scheme, mut rest) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut params = HashMap::new();
        while let Some((key, after)) = rest.split_once('=') {
            let key = key
                .trim()
                .trim_start_matches(',')
                .trim()
                .to_ascii_lowercase();
            let after = after.trim_start();
            let (value, tail) = match after.strip_prefix('"') {
                Some(quoted) => {
                    let end = quoted.find('"')?;
                    (&quoted[..end], &quoted[end + 1..])
                }
                None => after.split_at(after.find(',').unwrap_or(after.len())),
            };
            params.insert(key, value.to_owned());
            rest = tail;
        }
        Some(Challenge {
            realm: params.remove("realm")?,
            service: params.remove("service"),
            scope: params.remove("scope"),
            error: params.remove("error"),
        })
    }
}

/// Pushes every blob of `image` and then its manifest with `Authorization: Bearer <token>`.
/// The same protocol as `push::push_image`, which speaks Basic only.
pub async fn push_image_bearer(
    url: &str,
    repo: &str,
    reference: &str,
    image: &Image,
    token: &str,
) -> Result<(), PushError> {
    let bearer = Bearer::new(url, repo, token);
    for blob in image.blobs() {
        bearer.blob(blob).await?;
    }
    bearer
        .manifest(reference, image.media_type(), &image.manifest)
        .await
}

/// One repository on one registry, with a token for it.
struct Bearer {
    url: String,
    repo: String,
    authorization: String,
}

impl Bearer {
    fn new(url: &str, repo: &str, token: &str) -> Bearer {
        Bearer {
            url: url.trim_end_matches('/').to_owned(),
            repo: repo.to_owned(),
            authorization: format!("Bearer {token}"),
        }
    }

    async fn blob(&self, blob: &Blob) -> Result<(), PushError> {
        let start = format!("{}/v2/{}/blobs/uploads/", self.url, self.repo);
        let started = self.send(Method::POST, &start, &[], Bytes::new()).await?;
        expect(&started, StatusCode::ACCEPTED)?;
        let location = started.header("location").ok_or_else(|| PushError {
            status: Some(started.status),
            message: "upload started without a Location header".into(),
        })?;
        let put = upload_url(&self.url, location, &blob.digest);
        let content_type = [(header::CONTENT_TYPE.as_str(), "application/octet-stream")];
        let done = self
            .send(Method::PUT, &put, &content_type, blob.bytes.clone())
            .await?;
        expect(&done, StatusCode::CREATED)
    }

    async fn manifest(
        &self,
        reference: &str,
        media_type: &str,
        manifest: &Blob,
    ) -> Result<(), PushError> {
        let target = format!("{}/v2/{}/manifests/{reference}", self.url, self.repo);
        let content_type = [(header::CONTENT_TYPE.as_str(), media_type)];
        let done = self
            .send(Method::PUT, &target, &content_type, manifest.bytes.clone())
            .await?;
        expect(&done, StatusCode::CREATED)?;
        match done.header("docker-content-digest") {
            Some(digest) if digest != manifest.digest => Err(PushError {
                status: None,
                message: format!("registry stored {digest}, expected {}", manifest.digest),
            }),
            _ => Ok(()),
        }
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<client::Fetched, PushError> {
        let mut all = vec![(header::AUTHORIZATION.as_str(), self.authorization.as_str())];
        all.extend_from_slice(headers);
        Ok(client::fetch(client::request(method, url, None, &all, body)).await?)
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    accept_each(listener, |stream| {
        let state = state.clone();
        async move {
            let service = service_fn(move |req| {
                let response = state.answer(&req);
                async move { Ok::<_, Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            // A client hanging up mid-request is not the test's concern.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        }
    })
    .await
}

/// What a token request asked for, parsed from its query and `Authorization` header.
struct Ask {
    service: Option<String>,
    scopes: Vec<String>,
    /// `(user, password)`; `None` when anonymous or when the header is not Basic.
    basic: Option<(String, String)>,
}

impl State {
    /// Decides one request, logs it and renders the response.
    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET || req.uri().path() != "/token" {
            return json_response(
                StatusCode::NOT_FOUND,
                &error_body("NOT_FOUND", "no such endpoint"),
            );
        }
        let ask = Ask::parse(req);
        let mut logged = TokenRequest {
            user: ask.basic.as_ref().map(|(user, _)| user.clone()),
            service: ask.service.clone(),
            scopes: ask.scopes.clone(),
            status: StatusCode::OK,
            granted: Vec::new(),
        };
        let response = match self.decide(&ask) {
            Err((status, body)) => {
                logged.status = status;
                json_response(status, &body)
            }
            Ok((subject, access)) => {
                logged.granted = access
                    .iter()
                    .map(|a| format!("repository:{}:{}", a.repo, a.actions.join(",")))
                    .collect();
                let (token, issued_at) = self.issue(&subject, &access);
                let body = json!({
                    "token": token,
                    "access_token": token,
                    "expires_in": self.lifetime_secs.load(Ordering::SeqCst),
                    "issued_at": rfc3339(issued_at),
                });
                json_response(StatusCode::OK, &body)
            }
        };
        self.log.lock().unwrap().push(logged);
        response
    }

    /// Authenticates and intersects the requested scopes with the caller's grants.
    fn decide(&self, ask: &Ask) -> Result<(String, Vec<Access>), (StatusCode, Value)> {
        if ask.service.as_deref() != Some(SERVICE) {
            let message = format!("service must be {SERVICE:?}, got {:?}", ask.service);
            return Err((StatusCode::BAD_REQUEST, error_body("UNSUPPORTED", &message)));
        }
        let (subject, grants) = match &ask.basic {
            None => (String::new(), &self.policy.anonymous),
            Some((user, password)) => match self.policy.users.get(user) {
                Some((expected, grants)) if expected == password => (user.clone(), grants),
                _ => {
                    let body = error_body("UNAUTHORIZED", "incorrect username or password");
                    return Err((StatusCode::UNAUTHORIZED, body));
                }
            },
        };
        let access = ask
            .scopes
            .iter()
            .filter_map(|scope| parse_scope(scope))
            .filter_map(|(repo, actions)| {
                let actions = grants.allowed(&repo, &actions);
                (!actions.is_empty()).then_some(Access { repo, actions })
            })
            .collect();
        Ok((subject, access))
    }

    /// Signs a token; returns it with its `iat` in Unix seconds.
    fn issue(&self, subject: &str, access: &[Access]) -> (String, u64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let issued_at = now - self.backdate_secs.load(Ordering::SeqCst);
        let expires = issued_at + self.lifetime_secs.load(Ordering::SeqCst);
        let access: Vec<Value> = access
            .iter()
            .map(|a| json!({ "type": "repository", "name": a.repo, "actions": a.actions }))
            .collect();
        let claims = json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": expires,
            "nbf": issued_at,
            "iat": issued_at,
            "jti": format!("berth-test-{}", self.next_id.fetch_add(1, Ordering::SeqCst)),
            "access": access,
        });
        (self.signer.sign(&claims), issued_at)
    }
}

impl Ask {
    fn parse(req: &Request<Incoming>) -> Ask {
        let mut service = None;
        let mut scopes = Vec::new();
        for pair in req.uri().query().unwrap_or_default().split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "service" => service = Some(percent_decode(value)),
                // OAuth2 allows several space-separated scopes in one parameter.
                "scope" => scopes.extend(percent_decode(value).split(' ').map(str::to_owned)),
                _ => {}
            }
        }
        scopes.retain(|s| !s.is_empty());
        let basic = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_basic);
        Ask {
            service,
            scopes,
            basic,
        }
    }
}

/// `repository:NAME:a,b` (or `repository(plugin):...`) into the name and actions; other
/// resource types (`registry:catalog:*`) are never granted here.
fn parse_scope(scope: &str) -> Option<(String, Vec<String>)> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let kind = kind.split('(').next().unwrap_or(kind);
    (kind == "repository").then(|| (name.to_owned(), split_actions(actions)))
}

fn split_actions(actions: &str) -> Vec<String> {
    actions
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// distribution's error envelope, which Docker Hub's token server also uses.
fn error_body(code: &str, message: &str) -> Value {
    json!({ "errors": [{ "code": code, "message": message }] })
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json");
    if status == StatusCode::UNAUTHORIZED {
        builder = builder.header(header::WWW_AUTHENTICATE, "Basic realm=\"berth-test-token\"");
    }
    let bytes = serde_json::to_vec(body).expect("json");
    builder
        .body(Full::new(Bytes::from(bytes)))
        .expect("valid response")
}

/// libtrust's key ID (docker/libtrust `keyIDFromCryptoKey`): SHA-256 of the DER
/// SubjectPublicKeyInfo, truncated to 240 bits, base32 without padding, in 12 groups of 4
/// joined by `:`.
fn libtrust_key_id(spki_der: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let hash = Sha256::digest(spki_der);
    // 240 bits are exactly 48 base32 digits, 5 bits each, read most significant first.
    let digits: Vec<u8> = (0..48)
        .map(|i| {
            let bit = i * 5;
            let pair = u16::from(hash[bit / 8]) << 8 | u16::from(hash[bit / 8 + 1]);
            ALPHABET[usize::from((pair >> (11 - bit % 8)) & 0x1f)]
        })
        .collect();
    let groups: Vec<&str> = digits
        .chunks(4)
        .map(|g| std::str::from_utf8(g).expect("ASCII"))
        .collect();
    groups.join(":")
}

/// Unix seconds as RFC 3339 UTC (`issued_at`), via the civil-from-days algorithm
/// (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Decodes `%XX` and `+` (form encoding, which Go's and Rust's URL builders both emit).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|hex| bytes[i] == b'%' && hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
