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

pub(crate) struct Tls {
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
    pub fn load(config: &TlsConfig) -> Result<Tls, TlsError> {
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

/// Why a certificate and key could not be served; names the key and the file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("tls.cert_file {}: {source}", path.display())]
    Certificates {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("tls.cert_file {}: no certificates", path.display())]
    NoCertificates { path: PathBuf },
    #[error("tls.key_file {}: {source}", path.display())]
    Key {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS setup: {0}")]
    Setup(#[source] rustls::Error),
    #[error("tls.key_file {}: {source}", path.display())]
    Pair {
        path: PathBuf,
        source: rustls::Error,
    },
}

fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificates {
            path: cert_file.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        let path = cert_file.to_path_buf();
        return Err(TlsError::NoCertificates { path });
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|source| TlsError::Key {
        path: key_file.to_path_buf(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Pair {
            path: key_file.to_path_buf(),
            source,
        })?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}
