//! The HTTP client of the upstreams: hyper-util's pooled client over rustls, trusting the
//! webpki roots plus an optional CA bundle, with connect and response-head timeouts, over the
//! `connect::Guarded` connector, so every connection obeys an `AddressRule`.
//!
//! One client per rule: `with_rule` makes a client with the same TLS set-up and resolver and
//! its own pool, for an upstream that may reach internal networks. Only transport lives here.
//! Registry semantics (auth, redirects, status mapping) are in `upstream`, which turns a
//! `SendError` into its own error.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::address::AddressRule;
use super::connect::{self, Guarded, Resolver};
use crate::config::ClientConfig;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("client.ca_file {}: {source}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("client.ca_file {}: {source}", path.display())]
    CaCertificate {
        path: std::path::PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("client.ca_file {}: no certificates", path.display())]
    NoCertificates { path: std::path::PathBuf },
    #[error("TLS setup: {0}")]
    Tls(#[source] rustls::Error),
}

/// Why a request got no response head. The text carries hyper's whole cause chain (the useful
/// cause, refused, TLS or DNS, sits several sources deep), so it is not repeated as a source.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("timed out: no response to {target}")]
    Timeout { target: String },
    /// The address rule refused the address; nothing was dialled.
    #[error("refused by the address rule: {target}: {chain}")]
    Refused { target: String, chain: String },
    #[error("cannot connect: {target}: {chain}")]
    Connect { target: String, chain: String },
    #[error("protocol error: {target}: {chain}")]
    Protocol { target: String, chain: String },
}

#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<Guarded>, Full<Bytes>>,
    response_timeout: Duration,
    setup: Arc<Setup>,
}

/// What `with_rule` needs to build a sibling client.
struct Setup {
    config: ClientConfig,
    tls: rustls::ClientConfig,
    resolver: Resolver,
    rule: AddressRule,
}

impl HttpClient {
    /// A client for public addresses only, certificates always verified, the system resolver.
    pub fn new(config: &ClientConfig) -> Result<HttpClient, ClientError> {
        HttpClient::with_resolver(config, connect::system_resolver())
    }

    /// `new`, resolving names with `resolver`.
    pub fn with_resolver(
        config: &ClientConfig,
        resolver: Resolver,
    ) -> Result<HttpClient, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &config.ca_file {
            add_ca_file(&mut roots, path)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ClientError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        HttpClient::build(config, tls, resolver, AddressRule::public_only())
    }

    /// The client for upstreams with `insecure = true` only: any certificate is accepted.
    /// Signatures are still checked, so the peer holds the key of the certificate it showed.
    pub fn new_insecure(
        config: &ClientConfig,
        resolver: Resolver,
    ) -> Result<HttpClient, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(AnyCertificate(Arc::clone(&provider)));
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ClientError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        HttpClient::build(config, tls, resolver, AddressRule::public_only())
    }

    /// A client like this one whose connections follow `rule` instead.
    pub fn with_rule(&self, rule: AddressRule) -> HttpClient {
        let setup = &self.setup;
        HttpClient::build(
            &setup.config,
            setup.tls.clone(),
            Arc::clone(&setup.resolver),
            rule,
        )
        .expect("the set-up built once already")
    }

    /// The address rule this client's connections follow.
    pub fn rule(&self) -> &AddressRule {
        &self.setup.rule
    }

    fn build(
        config: &ClientConfig,
        tls: rustls::ClientConfig,
        resolver: Resolver,
        rule: AddressRule,
    ) -> Result<HttpClient, ClientError> {
        let mut guarded = Guarded::new(Arc::clone(&resolver), rule.clone());
        let http = guarded.tcp();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(guarded);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_initial_stream_window_size(config.h2_stream_window)
            .http2_initial_connection_window_size(config.h2_connection_window)
            .build(https);
        Ok(HttpClient {
            inner,
            response_timeout: config.response_timeout,
            setup: Arc::new(Setup {
                config: config.clone(),
                tls,
                resolver,
                rule,
            }),
        })
    }

    /// Sends a request and waits for the response head, within the response timeout.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, SendError> {
        let target = format!("{} {}", request.method(), redact_query(request.uri()));
        match tokio::time::timeout(self.response_timeout, self.inner.request(request)).await {
            Err(_) => Err(SendError::Timeout { target }),
            Ok(Err(err)) => {
                let chain = error_chain(&err);
                Err(if connect::refusal(&err).is_some() {
                    SendError::Refused { target, chain }
                } else if err.is_connect() {
                    SendError::Connect { target, chain }
                } else {
                    SendError::Protocol { target, chain }
                })
            }
            Ok(Ok(response)) => Ok(response),
        }
    }
}

fn add_ca_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), ClientError> {
    let ca_file = |source| ClientError::CaFile {
        path: path.to_path_buf(),
        source,
    };
    let mut added = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(ca_file)? {
        let cert = cert.map_err(ca_file)?;
        roots
            .add(cert)
            .map_err(|source| ClientError::CaCertificate {
                path: path.to_path_buf(),
                source,
            })?;
        added += 1;
    }
    if added == 0 {
        return Err(ClientError::NoCertificates {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Token endpoints and signed redirect URLs carry credentials in the query; logs get the path only.
fn redact_query(uri: &http::Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map_or("", |a| a.as_str()),
        uri.path()
    )
}

/// hyper's errors put the useful cause (refused, TLS, DNS) several sources deep.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Accepts any server certificate: `insecure = true` upstreams only.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
