//! TLS client settings shared by the token endpoint client and the upstream client.
//!
//! Verification is always on. The trusted roots are the Mozilla set compiled into the binary
//! (so a `scratch` or distroless image needs no CA bundle) plus, where configured, the PEM
//! certificates of a `ca_file` for private CAs. The crypto provider is `ring`, chosen explicitly
//! so that no process-wide default provider has to be installed.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file could not be read or holds no certificate.
    #[error("ca_file {path}: {problem}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the settings (should not happen with the defaults).
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS client config trusting the built-in roots plus `ca_file`. ALPN is left to the HTTP
/// client that uses it (hyper-rustls offers h2 and http/1.1 itself).
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let ca_err = |problem: String| TlsError::CaFile {
            path: path.display().to_string(),
            problem,
        };
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))? {
            let cert = cert.map_err(|e| ca_err(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| ca_err(format!("certificate rejected: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(ca_err("holds no PEM certificate".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
