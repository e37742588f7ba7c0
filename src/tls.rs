//! Serving HTTPS: a rustls acceptor built from the PEM files in `[tls]`, offering HTTP/2 and
//! HTTP/1.1 by ALPN, and re-read when either file changes (checked on each new connection, so
//! a renewed certificate is served from the next handshake on; a broken pair is logged and the
//! previous one kept).
//!
//! Owns: loading and reloading the server config. Does not own: the handshake's place in the
//! accept loop (`server`) or client-side TLS to upstreams (`net::client`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::stamp::Stamp;

/// A version of a file, or `None` while it cannot be read.
fn stamp(path: &Path) -> Option<Stamp> {
    Stamp::of(path).ok()
}

pub struct Tls {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Current>,
}

struct Current {
    stamps: (Option<Stamp>, Option<Stamp>),
    acceptor: TlsAcceptor,
}

impl Tls {
    /// Loads the certificate and key; an error names the file.
    pub fn load(config: &TlsConfig) -> Result<Tls, String> {
        let stamps = (stamp(&config.cert_file), stamp(&config.key_file));
        let server = server_config(&config.cert_file, &config.key_file)?;
        Ok(Tls {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            current: RwLock::new(Current {
                stamps,
                acceptor: TlsAcceptor::from(Arc::new(server)),
            }),
        })
    }

    /// The acceptor for a new connection, reloading the files first if they changed.
    pub fn acceptor(&self) -> TlsAcceptor {
        let stamps = (stamp(&self.cert_file), stamp(&self.key_file));
        {
            let current = self.current.read().expect("tls lock");
            if current.stamps == stamps {
                return current.acceptor.clone();
            }
        }
        let mut current = self.current.write().expect("tls lock");
        if current.stamps != stamps {
            // Recorded even on failure, so a half-written pair is retried once it changes
            // again, not on every connection.
            current.stamps = stamps;
            match server_config(&self.cert_file, &self.key_file) {
                Ok(server) => {
                    current.acceptor = TlsAcceptor::from(Arc::new(server));
                    tracing::info!(cert_file = %self.cert_file.display(), "reloaded the TLS certificate");
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot reload the TLS certificate; serving the previous one")
                }
            }
        }
        current.acceptor.clone()
    }
}

fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, String> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls.cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.cert_file {}: no certificates",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("tls.key_file {}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.key_file {}: {e}", key_file.display()))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}
