//! The HTTP client every upstream shares: hyper-util's pooled client over rustls, trusting the
//! webpki roots plus an optional CA bundle, with connect and response-head timeouts.
//!
//! Only transport lives here. Registry semantics (auth, redirects, status mapping) are in
//! `upstream`.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::UpstreamError;
use crate::config::ClientConfig;

#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    response_timeout: Duration,
}

impl HttpClient {
    pub fn new(config: &ClientConfig) -> Result<HttpClient, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &config.ca_file {
            add_ca_file(&mut roots, path)?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Ok(HttpClient {
            inner,
            response_timeout: config.response_timeout,
        })
    }

    /// Sends a request and waits for the response head, within the response timeout.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let target = format!("{} {}", request.method(), redact_query(request.uri()));
        match tokio::time::timeout(self.response_timeout, self.inner.request(request)).await {
            Err(_) => Err(UpstreamError::Timeout(format!("no response to {target}"))),
            Ok(Err(err)) if err.is_connect() => Err(UpstreamError::Connect(format!(
                "{target}: {}",
                error_chain(&err)
            ))),
            Ok(Err(err)) => Err(UpstreamError::Protocol(format!(
                "{target}: {}",
                error_chain(&err)
            ))),
            Ok(Ok(response)) => Ok(response),
        }
    }
}

fn add_ca_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("client.ca_file {}: {e}", path.display()))?;
    let mut added = 0;
    for cert in certs {
        let cert = cert.map_err(|e| format!("client.ca_file {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("client.ca_file {}: {e}", path.display()))?;
        added += 1;
    }
    if added == 0 {
        return Err(format!(
            "client.ca_file {}: no certificates",
            path.display()
        ));
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
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
