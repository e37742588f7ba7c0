//! A private certificate authority for the TLS servers of the tests, made once per test binary,
//! with its certificate written where a client's `client.ca_file` can name it.
//!
//! Does not own: the proxy's own listener certificates (tests/tls.rs makes those, with reloads).

use std::path::Path;
use std::sync::OnceLock;

use base64::Engine;

/// The CA: its issuer (to sign leaves) and its PEM certificate in a file.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    file: tempfile::NamedTempFile,
}

pub fn test_ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), pem("CERTIFICATE", cert.der())).unwrap();
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            file,
        }
    })
}

impl TestCa {
    /// A fresh certificate and key for 127.0.0.1, signed by the CA.
    pub fn leaf(
        &self,
    ) -> (
        rustls_pki_types::CertificateDer<'static>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        (cert.der().clone(), key.into())
    }

    /// The CA certificate's file, for `client.ca_file`.
    pub fn file(&self) -> &Path {
        self.file.path()
    }

    /// A `[client]` section trusting the CA.
    pub fn client_section(&self) -> String {
        format!("[client]\nca_file = \"{}\"\n", self.file().display())
    }
}

/// `der` as PEM with the given label, in 64-column lines.
pub fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}
