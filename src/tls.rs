//! TLS client settings shared by the token endpoint client and the upstream client.
//!
//! Verification is always on. The trusted roots are the Mozilla set compiled into the binary
//! (so a `scratch` or distroless image needs no CA bundle) plus, where configured, the PEM
//! certificates of a `ca_file` for private CAs. The crypto provider is `ring`, chosen explicitly
//! so that no process-wide default provider has to be installed. An upstream that asks for a
//! client certificate (mutual TLS) gets the route's `client_certificate_file` and
//! `client_key_file`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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
    /// The client certificate or its key could not be read or do not match.
    #[error("client certificate {path}: {problem}")]
    ClientIdentity {
        /// The file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the settings (should not happen with the defaults).
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsError {
    /// The config key (after `routes[i].` or `credentials.NAME.`) to fix.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::ClientIdentity { .. } => "client_certificate_file",
            _ => "ca_file",
        }
    }

    /// How to fix it.
    pub fn fix(&self) -> &'static str {
        match self {
            TlsError::ClientIdentity { .. } => "point client_certificate_file at a PEM certificate (chain) and client_key_file at its PEM private key",
            _ => "point ca_file at a PEM file of CA certificates",
        }
    }
}

/// What tells a changed file: modification time, length and inode (following symlinks, so a
/// Kubernetes Secret's symlink swap counts). `None` when it cannot be read.
pub type FileStamp = Option<(std::time::SystemTime, u64, u64)>;

/// The [`FileStamp`] of `path` now.
pub fn file_stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// A client certificate for mutual TLS: PEM certificate (chain) and PEM private key.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientIdentity {
    /// The certificate, then any intermediates.
    pub certificate_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl ClientIdentity {
    /// Both files.
    pub fn files(&self) -> [&PathBuf; 2] {
        [&self.certificate_file, &self.key_file]
    }
}

/// A TLS client config trusting the built-in roots plus `ca_file`, presenting `identity` if
/// the server asks. ALPN is left to the HTTP client that uses it (hyper-rustls offers h2 and
/// http/1.1 itself).
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<&ClientIdentity>,
) -> Result<ClientConfig, TlsError> {
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
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let Some(identity) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let id_err = |path: &Path, problem: String| TlsError::ClientIdentity {
        path: path.display().to_string(),
        problem,
    };
    let cert_path = &identity.certificate_file;
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| id_err(cert_path, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| id_err(cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(id_err(cert_path, "holds no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&identity.key_file).map_err(|e| {
        id_err(
            &identity.key_file,
            format!("no usable PEM private key: {e}"),
        )
    })?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| id_err(cert_path, format!("does not go with client_key_file: {e}")))
}
