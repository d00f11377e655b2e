//! Client assertions (RFC 7523 `private_key_jwt`), as Microsoft Entra ID expects them from an
//! application that authenticates with a certificate instead of a secret.
//!
//! Each token request gets a fresh JWT signed with the configured RSA private key (RS256 or
//! PS256, by `jsonwebtoken` over `ring`): `iss` = `sub` = the client id, `aud` = the token
//! URL, a random `jti`, `nbf`/`iat` now and `exp` five minutes later. The header names the
//! certificate by its SHA-256 thumbprint (`x5t#S256`) and, for tenants that still look for it,
//! its SHA-1 thumbprint (`x5t`). The key and certificate files are read again for each
//! request, so a rotated certificate is picked up like a rotated secret file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::Serialize;

use crate::secret::Secret;

/// The assertion's lifetime: long enough for clock skew, short enough to be useless if seen.
const LIFETIME: Duration = Duration::from_secs(300);

/// `client_assertion_type` for a JWT assertion (RFC 7523 §2.2).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The signature algorithm of an assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PSS with SHA-256.
    Ps256,
}

impl JwtAlgorithm {
    /// Parses `RS256` or `PS256`.
    pub fn parse(text: &str) -> Option<JwtAlgorithm> {
        match text {
            "RS256" => Some(JwtAlgorithm::Rs256),
            "PS256" => Some(JwtAlgorithm::Ps256),
            _ => None,
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Ps256 => Algorithm::PS256,
        }
    }
}

/// Where a signing key and its certificate are.
#[derive(Debug, Clone, PartialEq)]
pub struct SigningKeyFiles {
    /// PEM private key (PKCS#8 or PKCS#1 RSA).
    pub key_file: PathBuf,
    /// PEM certificate of that key, as registered with the identity provider.
    pub certificate_file: PathBuf,
    /// RS256 or PS256.
    pub algorithm: JwtAlgorithm,
}

/// A loaded key: the signing key and the certificate's thumbprints. Its `Debug` shows
/// neither key bytes nor anything derived from them.
pub struct SigningKey {
    key: EncodingKey,
    algorithm: JwtAlgorithm,
    x5t: String,
    x5t_s256: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .field("x5t#S256", &self.x5t_s256)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

/// The first PEM block of `pem` that holds a private key (`PRIVATE KEY`, `RSA PRIVATE KEY`),
/// with its armour.
fn private_key_block(pem: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    while let Some(start) = find(&pem[at..], b"-----BEGIN ").map(|i| at + i) {
        let label_end = find(&pem[start + 11..], b"-----")? + start + 11;
        let label = &pem[start + 11..label_end];
        let end_marker = [b"-----END ".as_slice(), label, b"-----"].concat();
        let end = find(&pem[label_end..], &end_marker)? + label_end + end_marker.len();
        if label.ends_with(b"PRIVATE KEY") && !label.starts_with(b"ENCRYPTED") {
            return Some(&pem[start..end]);
        }
        at = end;
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether the private key in `key_pem` is the certificate's: their public keys compared
/// (SubjectPublicKeyInfo), so a key that does not match is refused at load, not by the
/// identity provider at the first token request.
fn keys_match(key_pem: &[u8], cert: &CertificateDer<'_>) -> Result<(), String> {
    let der = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("the private key cannot be read ({e})"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| format!("the private key cannot be used ({e})"))?;
    rustls::sign::CertifiedKey::new(vec![cert.clone().into_owned()], signer)
        .keys_match()
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                "the private key is not the certificate's (their public keys differ): give the key the certificate was issued for".to_string()
            }
            other => format!("the key and the certificate cannot be compared ({other})"),
        })
}

fn read(path: &Path, what: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    std::fs::read(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| format!("{what} {}: {e}", path.display()))
}

impl SigningKey {
    /// Reads and checks the key and the certificate. Blocking file I/O: call it off the
    /// runtime's threads (or at start).
    pub fn load(files: &SigningKeyFiles) -> Result<SigningKey, String> {
        let pem = read(&files.key_file, "private key file")?;
        // The key's block wherever it is in the file: a PEM with the certificate first (as
        // many tools write a combined file) works too.
        let block = private_key_block(&pem).ok_or_else(|| {
            format!(
                "private key file {}: holds no PEM private key block",
                files.key_file.display()
            )
        })?;
        let key = EncodingKey::from_rsa_pem(block).map_err(|e| {
            format!(
                "private key file {}: not a PEM RSA private key ({e})",
                files.key_file.display()
            )
        })?;
        let cert_pem = read(&files.certificate_file, "certificate file")?;
        let cert = CertificateDer::pem_slice_iter(&cert_pem)
            .next()
            .ok_or_else(|| {
                format!(
                    "certificate file {}: holds no PEM certificate",
                    files.certificate_file.display()
                )
            })?
            .map_err(|e| format!("certificate file {}: {e}", files.certificate_file.display()))?;
        keys_match(block, &cert).map_err(|why| {
            format!(
                "private key file {} and certificate file {}: {why}",
                files.key_file.display(),
                files.certificate_file.display()
            )
        })?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let sha256 = ring::digest::digest(&ring::digest::SHA256, &cert);
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &cert);
        let signing = SigningKey {
            key,
            algorithm: files.algorithm,
            x5t: b64.encode(sha1.as_ref()),
            x5t_s256: b64.encode(sha256.as_ref()),
        };
        // A key that cannot sign (not RSA, too short for ring) is reported now, not at the
        // first token request.
        signing.sign("check", "check", SystemTime::now())?;
        Ok(signing)
    }

    /// A fresh assertion for `client_id` at the token endpoint `audience`.
    pub fn sign(&self, client_id: &str, audience: &str, now: SystemTime) -> Result<Secret, String> {
        let mut header = Header::new(self.algorithm.jwt());
        header.x5t = Some(self.x5t.clone());
        header.x5t_s256 = Some(self.x5t_s256.clone());
        let now_secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let claims = Claims {
            aud: audience,
            iss: client_id,
            sub: client_id,
            jti: format!("{:032x}", fastrand::u128(..)),
            nbf: now_secs,
            iat: now_secs,
            exp: now_secs + LIFETIME.as_secs(),
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map(Secret::new)
            .map_err(|e| format!("could not sign the client assertion: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_parse_by_their_jose_names() {
        assert_eq!(JwtAlgorithm::parse("RS256"), Some(JwtAlgorithm::Rs256));
        assert_eq!(JwtAlgorithm::parse("PS256"), Some(JwtAlgorithm::Ps256));
        assert_eq!(JwtAlgorithm::parse("rs256"), None);
        assert_eq!(JwtAlgorithm::parse("ES256"), None);
    }

    /// A key pair and its self-signed certificate, and another key, made by openssl.
    fn keys(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let (key, cert, other) = (dir.join("k.pem"), dir.join("c.pem"), dir.join("o.pem"));
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl (tests/run.sh installs it)");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let (k, c, o) = (
            key.to_str().unwrap(),
            cert.to_str().unwrap(),
            other.to_str().unwrap(),
        );
        run(&[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", k, "-out", c,
        ]
        .into_iter()
        .chain(["-subj", "/CN=token-proxy test", "-days", "1"])
        .collect::<Vec<_>>());
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            o,
        ]);
        (key, cert, other)
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_and_a_combined_pem_works() {
        let dir = std::env::temp_dir().join(format!("tp-assertion-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (key, cert, other) = keys(&dir);
        let files = |key_file: &Path, certificate_file: &Path| SigningKeyFiles {
            key_file: key_file.into(),
            certificate_file: certificate_file.into(),
            algorithm: JwtAlgorithm::Rs256,
        };
        assert!(SigningKey::load(&files(&key, &cert)).is_ok());
        let e = SigningKey::load(&files(&other, &cert)).unwrap_err();
        assert!(e.contains("is not the certificate's"), "{e}");
        // The certificate first, then the key, in one file given for both.
        let combined = dir.join("combined.pem");
        let text = [std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()].concat();
        std::fs::write(&combined, text).unwrap();
        SigningKey::load(&files(&combined, &combined)).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_files_are_named() {
        let files = SigningKeyFiles {
            key_file: "/nonexistent/key.pem".into(),
            certificate_file: "/nonexistent/cert.pem".into(),
            algorithm: JwtAlgorithm::Rs256,
        };
        let e = SigningKey::load(&files).unwrap_err();
        assert!(e.contains("private key file /nonexistent/key.pem"), "{e}");
    }
}
