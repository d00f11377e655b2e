//! Token requests against a real OAuth 2.0 server, not the project's own fake: panva's
//! `oidc-provider` (a certified OpenID provider, from npm), run by `tests/oauth-server/` on
//! loopback. It checks client secrets sent as form fields and as RFC 6749 Basic, and
//! `private_key_jwt` assertions (RS256, PS256) signed with a key pair this test generates
//! with `openssl`. Needs Node.js and npm (`.ci/run` installs them); the server's packages are
//! installed by the first test that needs them (`npm ci`).

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use support::*;
use token_proxy::config::Config;
use token_proxy::token::source::{TokenError, TokenSource};

fn harness() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oauth-server")
}

/// Runs `npm ci` once per test process if the server's packages are missing.
fn ensure_installed() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        if harness().join("node_modules/oidc-provider").is_dir() {
            return;
        }
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(harness())
            .status()
            .expect("npm: install Node.js and npm (apt-get install -y nodejs npm)");
        assert!(status.success(), "npm ci in tests/oauth-server failed");
    });
}

/// The server, stopped when dropped (its stdin closes).
struct OAuthServer {
    child: Child,
    _stdin: ChildStdin,
    issuer: String,
}

impl OAuthServer {
    async fn start(config: Value) -> OAuthServer {
        ensure_installed();
        let path = temp_file("oauth-server.json", &config.to_string());
        let mut child = Command::new("node")
            .arg(harness().join("server.js"))
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node: install Node.js (apt-get install -y nodejs npm)");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let line = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).map(|_| line)
            }),
        )
        .await
        .expect("the OAuth server starts within 30 s")
        .unwrap()
        .unwrap();
        let issuer = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        OAuthServer {
            child,
            _stdin: stdin,
            issuer,
        }
    }

    fn token_url(&self) -> String {
        format!("{}/token", self.issuer)
    }

    /// The token requests the server saw (the harness's own log).
    async fn requests(&self) -> Vec<Value> {
        let addr = self
            .issuer
            .strip_prefix("http://")
            .unwrap()
            .parse()
            .unwrap();
        get(addr, "/_test/requests")
            .await
            .json()
            .as_array()
            .unwrap()
            .clone()
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fetches one token for the credential `[credentials.c]` + `body`.
async fn fetch(body: &str) -> Result<token_proxy::token::source::Fetched, TokenError> {
    let text = format!(
        "[credentials.c]\n{body}\n[[routes]]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\ncredential = \"c\"\n"
    );
    let config = Config::parse(&text, "oauth.toml", &|_| None).expect("valid config");
    TokenSource::new(&config.credentials[0])
        .unwrap()
        .fetch()
        .await
}

/// The JSON of a JWT's part `i` (0 header, 1 claims), not verified.
fn jwt_part(jwt: &str, i: usize) -> Value {
    let part = jwt.split('.').nth(i).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// A fresh RSA key and self-signed certificate, with the key's public JWK.
fn key_pair() -> (PathBuf, PathBuf, Value) {
    let marker = temp_file("keys", "");
    let dir = marker.parent().unwrap();
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=token-proxy-test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl (apt-get install -y openssl)");
    assert!(status.success());
    let out = Command::new("node")
        .arg(harness().join("pem-to-jwk.mjs"))
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    (key, cert, serde_json::from_slice(&out.stdout).unwrap())
}

const RESOURCE: &str = "https://api.example.test/";

#[tokio::test]
async fn client_secret_post_and_basic_with_scopes_audience_and_resource() {
    let server = OAuthServer::start(json!({
        "clients": [
            {"client_id": "post-client", "client_secret": "s3cret-post",
             "token_endpoint_auth_method": "client_secret_post", "scope": "api.read api.write"},
            {"client_id": "basic client+/=", "client_secret": "s3cr%t basic+&=",
             "token_endpoint_auth_method": "client_secret_basic"}
        ],
        "resource": RESOURCE,
        "resources": [RESOURCE, "https://orders.example.test/"]
    }))
    .await;
    let url = server.token_url();

    let fetched = fetch(&format!(
        "token_url = \"{url}\"\nclient_id = \"post-client\"\nclient_secret = \"s3cret-post\"\n\
         scope = [\"api.read\", \"api.write\"]\naudience = \"urn:example:aud\"\nresource = \"https://orders.example.test/\""
    ))
    .await
    .expect("client_secret_post token");
    assert_eq!(fetched.lifetime, Duration::from_secs(600));
    let claims = jwt_part(fetched.access_token.expose(), 1);
    assert_eq!(claims["scope"], "api.read api.write");
    assert_eq!(
        claims["aud"], "https://orders.example.test/",
        "resource decides the audience"
    );

    // Special characters in the id and the secret: the server decodes RFC 6749 §2.3.1 form
    // encoding inside Basic, so only a correctly encoded header passes.
    fetch(&format!(
        "token_url = \"{url}\"\nclient_id = \"basic client+/=\"\nclient_secret = \"s3cr%t basic+&=\"\nauth_method = \"client_secret_basic\""
    ))
    .await
    .expect("client_secret_basic token");

    let wrong = fetch(&format!(
        "token_url = \"{url}\"\nclient_id = \"post-client\"\nclient_secret = \"wrong\""
    ))
    .await
    .expect_err("a wrong secret is refused");
    assert!(wrong.is_permanent(), "{wrong}");
    assert!(wrong.to_string().contains("invalid_client"), "{wrong}");

    let seen = server.requests().await;
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0]["auth_used"], "client_secret_post");
    assert_eq!(seen[0]["form"]["scope"], "api.read api.write");
    assert_eq!(seen[0]["form"]["audience"], "urn:example:aud");
    assert_eq!(seen[0]["form"]["grant_type"], "client_credentials");
    assert_eq!(seen[1]["auth_used"], "client_secret_basic");
    assert!(
        seen[1]["form"].get("client_secret").is_none(),
        "Basic only: no secret in the form"
    );
    assert_eq!(seen[1]["status"], 200);
    assert_eq!(seen[2]["status"], 401);
}

#[tokio::test]
async fn private_key_jwt_rs256_and_ps256_with_certificate_thumbprints() {
    let (key, cert, jwk) = key_pair();
    let server = OAuthServer::start(json!({
        "clients": [
            {"client_id": "jwt-rs", "token_endpoint_auth_method": "private_key_jwt",
             "token_endpoint_auth_signing_alg": "RS256", "jwks": {"keys": [jwk]}},
            {"client_id": "jwt-ps", "token_endpoint_auth_method": "private_key_jwt",
             "token_endpoint_auth_signing_alg": "PS256", "jwks": {"keys": [jwk]}}
        ],
        "resource": RESOURCE
    }))
    .await;
    let url = server.token_url();
    let files = format!(
        "private_key_file = \"{}\"\ncertificate_file = \"{}\"",
        key.display(),
        cert.display()
    );
    fetch(&format!(
        "token_url = \"{url}\"\nclient_id = \"jwt-rs\"\n{files}"
    ))
    .await
    .expect("RS256 assertion accepted");
    fetch(&format!(
        "token_url = \"{url}\"\nclient_id = \"jwt-ps\"\n{files}\nassertion_algorithm = \"PS256\""
    ))
    .await
    .expect("PS256 assertion accepted");
    // Each request carries a fresh assertion (the server refuses a replayed jti).
    fetch(&format!(
        "token_url = \"{url}\"\nclient_id = \"jwt-rs\"\n{files}"
    ))
    .await
    .expect("a second RS256 assertion");

    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::from_pem_file(&cert).unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let sha256 = b64.encode(ring::digest::digest(&ring::digest::SHA256, &der));
    let sha1 = b64.encode(ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        &der,
    ));
    let seen = server.requests().await;
    assert_eq!(seen.len(), 3);
    let mut jtis = Vec::new();
    for (req, (client, alg)) in seen.iter().zip([
        ("jwt-rs", "RS256"),
        ("jwt-ps", "PS256"),
        ("jwt-rs", "RS256"),
    ]) {
        assert_eq!(req["status"], 200, "{req}");
        assert_eq!(req["auth_used"], "client_assertion");
        assert_eq!(
            req["form"]["client_assertion_type"],
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        );
        let assertion = req["form"]["client_assertion"].as_str().unwrap();
        let header = jwt_part(assertion, 0);
        assert_eq!(header["alg"], alg);
        assert_eq!(header["x5t#S256"], sha256.as_str());
        assert_eq!(header["x5t"], sha1.as_str());
        let claims = jwt_part(assertion, 1);
        assert_eq!(claims["aud"], url.as_str());
        assert_eq!(
            (&claims["iss"], &claims["sub"]),
            (&json!(client), &json!(client))
        );
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            300
        );
        jtis.push(claims["jti"].as_str().unwrap().to_string());
    }
    jtis.dedup();
    assert_eq!(jtis.len(), 3, "a new jti every time");
}

#[tokio::test]
async fn a_federated_assertion_file_is_read_at_each_request() {
    let (key, cert, jwk) = key_pair();
    let server = OAuthServer::start(json!({
        "clients": [{"client_id": "workload", "token_endpoint_auth_method": "private_key_jwt",
                     "jwks": {"keys": [jwk]}}],
        "resource": RESOURCE
    }))
    .await;
    let url = server.token_url();
    // Stand in for the platform (AKS writes AZURE_FEDERATED_TOKEN_FILE): an assertion signed
    // by the key the server trusts for this client, written to a file.
    let files = token_proxy::assertion::SigningKeyFiles {
        key_file: key,
        certificate_file: cert,
        algorithm: token_proxy::assertion::JwtAlgorithm::Rs256,
    };
    let signer = token_proxy::assertion::SigningKey::load(&files).unwrap();
    let write = |path: &Path| {
        let jwt = signer
            .sign("workload", &url, std::time::SystemTime::now())
            .unwrap();
        std::fs::write(path, jwt.expose()).unwrap();
    };
    let file = temp_file("federated-token", "");
    write(&file);
    let body = format!(
        "azure = {{ authority_host = \"{}\", tenant = \"t\" }}\nclient_id = \"workload\"\nclient_assertion_file = \"{}\"",
        server.issuer,
        file.display()
    );
    // azure = { … } derives <authority>/<tenant>/oauth2/v2.0/token, which this server does
    // not serve: check the derivation, then point token_url at the server.
    let text = format!("[credentials.c]\n{body}\n[[routes]]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\ncredential = \"c\"\n");
    let config = Config::parse(&text, "oauth.toml", &|_| None).unwrap();
    assert_eq!(
        config.credentials[0].token_url.as_str(),
        format!("{}/t/oauth2/v2.0/token", server.issuer)
    );
    assert_eq!(config.credentials[0].kind(), "client_assertion_file");

    let body = format!(
        "token_url = \"{url}\"\nclient_id = \"workload\"\nclient_assertion_file = \"{}\"",
        file.display()
    );
    fetch(&body)
        .await
        .expect("the file's assertion is accepted");
    // The platform rotates the file; the next request sends the new one.
    write(&file);
    fetch(&body)
        .await
        .expect("the rotated assertion is accepted");
    let seen = server.requests().await;
    assert_eq!(seen.len(), 2);
    assert_ne!(
        seen[0]["form"]["client_assertion"],
        seen[1]["form"]["client_assertion"]
    );
    assert!(seen
        .iter()
        .all(|r| r["auth_used"] == "client_assertion" && r["status"] == 200));
}
