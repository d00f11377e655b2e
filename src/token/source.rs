//! One token request to the token endpoint (RFC 6749 §4.4, client credentials) and the parsing
//! of its answer into a lifetime and an access token, or a [`TokenError`] that says what went
//! wrong and what to check.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, StatusCode};
use tokio::time::Instant;
use url::Url;

use crate::assertion::{SigningKey, ASSERTION_TYPE};
use crate::config::{
    AuthMethod, ClientCredential, CredentialConfig, IdentityEndpoint, ManagedIdentity, SecretSource,
};
use crate::secret::Secret;
use crate::tls;

/// Largest token response body read; anything longer is an invalid response.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Longest lifetime believed; larger `expires_in` values are clamped to it.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How much of an error text is kept for logs and `/readyz`.
const MAX_TEXT: usize = 400;

/// A token as the endpoint granted it.
#[derive(Debug)]
pub struct Fetched {
    /// The access token.
    pub access_token: Secret,
    /// `expires_in`, clamped to [`MAX_LIFETIME`].
    pub lifetime: Duration,
    /// When the request was sent: the lifetime counts from here, which absorbs transit time.
    pub requested_at: Instant,
}

/// The fields of an RFC 6749 §5.2 error response, plus Azure's extras, already sanitised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OAuthError {
    /// `error`, e.g. `invalid_client`.
    pub error: String,
    /// `error_description`, shortened.
    pub description: Option<String>,
    /// Azure's `error_codes` (AADSTS numbers).
    pub error_codes: Vec<i64>,
    /// Azure's `trace_id`.
    pub trace_id: Option<String>,
    /// Azure's `correlation_id`.
    pub correlation_id: Option<String>,
    /// It came from a managed identity endpoint, whose fixes differ (see [`hint`](Self::hint)).
    pub managed_identity: bool,
}

impl OAuthError {
    /// A hint at the likely fix, by error code.
    pub fn hint(&self) -> &'static str {
        if self.managed_identity {
            return match self.error.as_str() {
                "invalid_request" => "check that the identity (managed_identity's client_id, object_id or resource_id, or the system-assigned one) is enabled and assigned to this machine or app, and check scope",
                _ => "the platform's identity endpoint refused: check that a managed identity is enabled here; token-proxy retries transient answers with backoff",
            };
        }
        match self.error.as_str() {
            "invalid_client" => "check client_id and the client secret (wrong or expired secret; Azure AADSTS7000215 = wrong secret, AADSTS7000222 = expired)",
            "unauthorized_client" => "the client may not use the client_credentials grant; check the app registration and tenant",
            "invalid_scope" => "check scope (Azure expects \"<app-id or app-id-uri>/.default\")",
            "invalid_request" => "check token_url (tenant), scope and extra_params",
            "invalid_grant" => "check the grant settings of the app registration",
            "unsupported_grant_type" => "the endpoint does not support the client_credentials grant",
            "temporarily_unavailable" | "server_error" => "the identity provider has a problem; token-proxy retries with backoff",
            _ => "see error_description",
        }
    }
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.error)?;
        if let Some(d) = &self.description {
            write!(f, ": {d}")?;
        }
        if !self.error_codes.is_empty() {
            write!(f, " (error_codes {:?})", self.error_codes)?;
        }
        if let Some(t) = &self.trace_id {
            write!(f, " trace_id={t}")?;
        }
        if let Some(c) = &self.correlation_id {
            write!(f, " correlation_id={c}")?;
        }
        write!(f, "; hint: {}", self.hint())
    }
}

/// Why a token request failed. The texts are safe to log and to show to clients: they never
/// hold the secret or a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The client secret file could not be read.
    #[error("cannot read client_secret_file {path}: {problem}")]
    SecretFile {
        /// The file.
        path: String,
        /// The I/O error.
        problem: String,
    },
    /// The request did not complete in time.
    #[error("token request to {url} timed out after {secs:.1} s")]
    Timeout {
        /// The token endpoint.
        url: String,
        /// The timeout.
        secs: f64,
    },
    /// The endpoint could not be reached.
    #[error("could not reach the token endpoint {url}: {problem}")]
    Unreachable {
        /// The token endpoint.
        url: String,
        /// What the transport said.
        problem: String,
    },
    /// The endpoint answered with an error status.
    #[error("token endpoint answered HTTP {status}: {detail}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The OAuth error, or a description of the body.
        detail: String,
        /// The parsed OAuth error, if the body was one.
        oauth: Option<Box<OAuthError>>,
        /// `Retry-After`, on 429 and 503.
        retry_after: Option<Duration>,
    },
    /// The endpoint answered 2xx but the body is not a usable token response.
    #[error("token endpoint sent an invalid response: {0}")]
    InvalidResponse(String),
    /// The private key, certificate or assertion file that authenticates the client is
    /// unusable.
    #[error("{0}")]
    Credential(String),
}

/// Every outcome label of `token_proxy_token_fetches_total`, as README lists them.
pub const OUTCOMES: &[&str] = &[
    "ok",
    "http_<status>",
    "invalid_response",
    "timeout",
    "unreachable",
    "secret_file",
    "credential_file",
];

impl TokenError {
    /// How long the endpoint asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Rejected { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether retrying soon cannot help: the endpoint refused the credential or the request
    /// itself (HTTP 400/401, `invalid_client`, `unauthorized_client`, `invalid_scope`).
    pub fn is_permanent(&self) -> bool {
        match self {
            TokenError::Rejected { status, oauth, .. } => {
                matches!(status, 400 | 401)
                    || oauth.as_ref().is_some_and(|o| {
                        matches!(
                            o.error.as_str(),
                            "invalid_client" | "unauthorized_client" | "invalid_scope"
                        )
                    })
            }
            _ => false,
        }
    }

    /// What kind of failure this is, without the parts that change on every attempt (trace
    /// ids, timestamps): two failures with the same key are the same problem.
    pub fn kind_key(&self) -> String {
        match self {
            TokenError::Rejected {
                status,
                oauth: Some(o),
                ..
            } => {
                format!("{status} {} {:?}", o.error, o.error_codes)
            }
            TokenError::Rejected { status, .. } => format!("{status}"),
            TokenError::SecretFile { problem, .. } => format!("secret file: {problem}"),
            TokenError::Timeout { .. } => "timeout".into(),
            TokenError::Unreachable { problem, .. } => format!("unreachable: {problem}"),
            TokenError::InvalidResponse(text) => format!("invalid: {text}"),
            TokenError::Credential(text) => format!("credential: {text}"),
        }
    }

    /// The outcome label of `/metrics`: `http_<status>`, `invalid_response`, `timeout`,
    /// `unreachable`, `secret_file` or `credential_file` (one of [`OUTCOMES`]).
    pub fn outcome(&self) -> String {
        match self {
            TokenError::Rejected { status, .. } => format!("http_{status}"),
            TokenError::SecretFile { .. } => "secret_file".into(),
            TokenError::Timeout { .. } => "timeout".into(),
            TokenError::Unreachable { .. } => "unreachable".into(),
            TokenError::InvalidResponse(_) => "invalid_response".into(),
            TokenError::Credential(_) => "credential_file".into(),
        }
    }

    /// The OAuth `error` code, if the endpoint sent one.
    pub fn oauth_error(&self) -> Option<&OAuthError> {
        match self {
            TokenError::Rejected { oauth, .. } => oauth.as_deref(),
            _ => None,
        }
    }
}

/// Fetches tokens for one credential.
#[derive(Debug)]
pub struct TokenSource {
    /// The client, and the `ca_file` stamp it was built with: rebuilt when the file changes.
    client: std::sync::Mutex<(Option<tls::FileStamp>, reqwest::Client)>,
    config: CredentialConfig,
}

impl TokenSource {
    /// Builds the HTTP client for this credential's token endpoint.
    pub fn new(cfg: &CredentialConfig) -> Result<TokenSource, tls::TlsError> {
        let client = build_client(cfg)?;
        let stamp = cfg.ca_file.as_deref().map(tls::file_stamp);
        Ok(TokenSource {
            client: std::sync::Mutex::new((stamp, client)),
            config: cfg.clone(),
        })
    }

    /// The HTTP client, rebuilt first if the `ca_file` changed since it was built (a renewed
    /// private CA is picked up at the next token request). An unusable new file keeps the
    /// current client.
    fn client(&self) -> reqwest::Client {
        let mut guard = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = self.config.ca_file.as_deref() {
            let now = tls::file_stamp(path);
            if guard.0.as_ref() != Some(&now) {
                match build_client(&self.config) {
                    Ok(client) => {
                        tracing::info!(credential = %self.config.name, "ca_file changed: the token client uses it now");
                        *guard = (Some(now), client);
                    }
                    Err(e) => {
                        tracing::warn!(credential = %self.config.name, error = %e, "ca_file changed but is unusable: keeping the current one");
                        guard.0 = Some(now);
                    }
                }
            }
        }
        guard.1.clone()
    }

    /// The credential's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The token endpoint.
    pub fn url(&self) -> &Url {
        &self.config.token_url
    }

    /// The secret or the client assertion for one token request.
    async fn proof(&self) -> Result<Secret, TokenError> {
        match &self.config.client_credential {
            ClientCredential::Secret(SecretSource::Inline(s)) => Ok(s.clone()),
            ClientCredential::Secret(SecretSource::File(path)) => read_secret_file(path).await,
            ClientCredential::AssertionFile(path) => {
                read_secret_file(path).await.map_err(|e| match e {
                    TokenError::SecretFile { path, problem } => TokenError::Credential(format!(
                        "cannot read client_assertion_file {path}: {problem}"
                    )),
                    other => other,
                })
            }
            // App Service's `IDENTITY_HEADER` is the one secret a managed identity request holds.
            ClientCredential::ManagedIdentity(mi) => Ok(match &mi.endpoint {
                IdentityEndpoint::AppService(header) => header.clone(),
                IdentityEndpoint::Imds => Secret::new(""),
            }),
            ClientCredential::PrivateKey(files) => {
                let (files, client_id) = (files.clone(), self.config.client_id.clone());
                let audience = self.config.token_url.to_string();
                tokio::task::spawn_blocking(move || {
                    SigningKey::load(&files)?.sign(&client_id, &audience, SystemTime::now())
                })
                .await
                .unwrap_or_else(|e| Err(format!("signing task failed: {e}")))
                .map_err(TokenError::Credential)
            }
        }
    }

    /// The `application/x-www-form-urlencoded` body of a token request; `secret` is the
    /// client secret or the client assertion, as the credential says.
    fn form(&self, secret: &Secret) -> String {
        let c = &self.config;
        let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(7 + c.extra_params.len());
        pairs.push(("grant_type", "client_credentials"));
        match &c.client_credential {
            ClientCredential::Secret(_) => {
                if c.auth_method == AuthMethod::ClientSecretPost {
                    pairs.push(("client_id", &c.client_id));
                    pairs.push(("client_secret", secret.expose()));
                }
            }
            ClientCredential::PrivateKey(_) | ClientCredential::AssertionFile(_) => {
                pairs.push(("client_id", &c.client_id));
                pairs.push(("client_assertion_type", ASSERTION_TYPE));
                pairs.push(("client_assertion", secret.expose()));
            }
            // A managed identity's request is a `GET` (see `managed_identity_request`).
            ClientCredential::ManagedIdentity(_) => {}
        }
        for (name, value) in [
            ("scope", &c.scope),
            ("audience", &c.audience),
            ("resource", &c.resource),
        ] {
            if let Some(value) = value {
                pairs.push((name, value));
            }
        }
        pairs.extend(c.extra_params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        // Sized exactly, so the buffer holding the secret never reallocates (a reallocation
        // would leave a copy behind that is not zeroed): `name=value` joined by `&`.
        let len = pairs
            .iter()
            .map(|(k, v)| encoded_len(k) + 1 + encoded_len(v))
            .sum::<usize>()
            + pairs.len().saturating_sub(1);
        let mut form = form_urlencoded::Serializer::new(String::with_capacity(len));
        form.extend_pairs(pairs);
        let form = form.finish();
        debug_assert_eq!(form.len(), len, "the token request form is sized exactly");
        form
    }

    /// A managed identity's token request: a `GET` of the endpoint with the API version,
    /// the resource and the identity in the query, and the header that proves the request
    /// comes from the machine (`Metadata: true`) or the app (`X-IDENTITY-HEADER`). No proxy:
    /// the endpoint is local, and IMDS refuses a request that carries `X-Forwarded-For`.
    fn managed_identity_request(
        &self,
        mi: &ManagedIdentity,
        secret: &Secret,
    ) -> reqwest::RequestBuilder {
        let mut url = self.config.token_url.clone();
        {
            let mut query = url.query_pairs_mut();
            let version = match mi.endpoint {
                IdentityEndpoint::Imds => "2018-02-01",
                IdentityEndpoint::AppService(_) => "2019-08-01",
            };
            query.append_pair("api-version", version);
            query.append_pair("resource", &mi.resource);
            if let Some((param, value)) = &mi.identity {
                query.append_pair(param, value);
            }
        }
        let request = self.client().get(url).header(ACCEPT, "application/json");
        match mi.endpoint {
            IdentityEndpoint::Imds => request.header("Metadata", "true"),
            IdentityEndpoint::AppService(_) => {
                let mut value = HeaderValue::from_str(secret.expose())
                    .unwrap_or_else(|_| HeaderValue::from_static(""));
                value.set_sensitive(true);
                request.header("X-IDENTITY-HEADER", value)
            }
        }
    }

    /// Makes one token request.
    pub async fn fetch(&self) -> Result<Fetched, TokenError> {
        let secret = self.proof().await?;
        let requested_at = Instant::now();
        if let ClientCredential::ManagedIdentity(mi) = &self.config.client_credential {
            let request = self.managed_identity_request(mi, &secret);
            return self
                .exchange(request, secret, requested_at)
                .await
                .map_err(|mut e| {
                    if let TokenError::Rejected { oauth: Some(o), .. } = &mut e {
                        o.managed_identity = true;
                    }
                    e
                });
        }
        let mut request = self
            .client()
            .post(self.config.token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(crate::secret::zeroizing_bytes(
                self.form(&secret).into_bytes(),
            ));
        if matches!(self.config.client_credential, ClientCredential::Secret(_))
            && self.config.auth_method == AuthMethod::ClientSecretBasic
        {
            request = request.header(AUTHORIZATION, basic_auth(&self.config.client_id, &secret));
        }
        self.exchange(request, secret, requested_at).await
    }

    /// Sends a token request and reads its answer, within `token_timeout`.
    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        secret: Secret,
        requested_at: Instant,
    ) -> Result<Fetched, TokenError> {
        let url = self.config.token_url.as_str();
        let exchange = async {
            let mut response = request.send().await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(parse_retry_after);
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            // The body holds the access token: zero it once parsed.
            let mut body = zeroize::Zeroizing::new(Vec::new());
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Ok(Err(TokenError::InvalidResponse(format!(
                        "body larger than {MAX_RESPONSE_BYTES} bytes"
                    ))));
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>(Ok((status, retry_after, content_type, body)))
        };
        let (status, retry_after, content_type, body) =
            match tokio::time::timeout(self.config.token_timeout, exchange).await {
                Err(_) => {
                    return Err(TokenError::Timeout {
                        url: url.into(),
                        secs: self.config.token_timeout.as_secs_f64(),
                    })
                }
                Ok(Err(e)) => {
                    return Err(TokenError::Unreachable {
                        url: url.into(),
                        problem: crate::errors::cause_text(&e),
                    })
                }
                Ok(Ok(result)) => result?,
            };
        let (access_token, lifetime) = parse_response(
            status,
            retry_after,
            &content_type,
            &body,
            self.config.default_expires_in,
            &secret,
        )?;
        Ok(Fetched {
            access_token,
            lifetime,
            requested_at,
        })
    }
}

async fn read_secret_file(path: &PathBuf) -> Result<Secret, TokenError> {
    let err = |problem: String| TokenError::SecretFile {
        path: path.display().to_string(),
        problem,
    };
    // The file's bytes are zeroed once the secret is copied out.
    let text = zeroize::Zeroizing::new(
        tokio::fs::read_to_string(path)
            .await
            .map_err(|e| err(e.to_string()))?,
    );
    let trimmed = text.trim_end_matches(['\n', '\r']);
    if trimmed.is_empty() {
        return Err(err("the file is empty".into()));
    }
    Ok(Secret::new(trimmed))
}

/// The length of `s` once form-urlencoded, by `form_urlencoded`'s own encoder (its pieces
/// borrow from `s` or are static: nothing is allocated).
fn encoded_len(s: &str) -> usize {
    form_urlencoded::byte_serialize(s.as_bytes())
        .map(str::len)
        .sum()
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`, as RFC 6749 §2.3.1 asks.
fn basic_auth(client_id: &str, secret: &Secret) -> HeaderValue {
    use zeroize::Zeroizing;
    let id: String = form_urlencoded::byte_serialize(client_id.as_bytes()).collect();
    let pw: Zeroizing<String> =
        Zeroizing::new(form_urlencoded::byte_serialize(secret.expose().as_bytes()).collect());
    let pair = Zeroizing::new(format!("{id}:{}", pw.as_str()));
    let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(pair.as_bytes()));
    // Sized exactly, as the form is: the buffer holding the secret never reallocates.
    let len = 6 + encoded.len();
    let mut header = Vec::with_capacity(len);
    header.extend_from_slice(b"Basic ");
    header.extend_from_slice(encoded.as_bytes());
    debug_assert_eq!(header.len(), len, "the Basic header is sized exactly");
    let mut value = HeaderValue::from_maybe_shared(crate::secret::zeroizing_bytes(header))
        .expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

/// `Retry-After` in seconds (HTTP dates are rare on token endpoints and are ignored).
fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let secs: u64 = value.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(3600)))
}

/// Shortens `text`, removes control characters and any occurrence of the secret.
fn sanitize(text: &str, secret: &Secret) -> String {
    let mut clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if !secret.is_empty() && clean.contains(secret.expose()) {
        clean = clean.replace(secret.expose(), "<redacted>");
    }
    if clean.chars().count() > MAX_TEXT {
        clean = clean.chars().take(MAX_TEXT).collect::<String>() + "…";
    }
    clean
}

fn string_field(v: &serde_json::Value, key: &str, secret: &Secret) -> Option<String> {
    v.get(key)
        .and_then(|x| x.as_str())
        .map(|s| sanitize(s, secret))
}

fn oauth_error(v: &serde_json::Value, secret: &Secret) -> Option<OAuthError> {
    let error = string_field(v, "error", secret)?;
    Some(OAuthError {
        error,
        description: string_field(v, "error_description", secret),
        error_codes: v
            .get("error_codes")
            .and_then(|c| c.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_i64()).collect())
            .unwrap_or_default(),
        trace_id: string_field(v, "trace_id", secret),
        correlation_id: string_field(v, "correlation_id", secret),
        managed_identity: false,
    })
}

/// What a body that is not JSON looks like, for the error message.
fn describe_body(content_type: &str, body: &[u8], secret: &Secret) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]);
    let kind = if content_type.contains("html") || text.trim_start().starts_with('<') {
        "an HTML page (a proxy, gateway or wrong token_url?)"
    } else {
        "a non-JSON body"
    };
    let ct = if content_type.is_empty() {
        "no content-type"
    } else {
        content_type
    };
    format!(
        "{kind} ({ct}, {} bytes, starting {:?})",
        body.len(),
        sanitize(text.trim(), secret)
    )
}

/// Interprets a token endpoint's answer.
pub fn parse_response(
    status: StatusCode,
    retry_after: Option<Duration>,
    content_type: &str,
    body: &[u8],
    default_expires_in: Duration,
    secret: &Secret,
) -> Result<(Secret, Duration), TokenError> {
    let mut json: Option<serde_json::Value> = serde_json::from_slice(body)
        .ok()
        .filter(serde_json::Value::is_object);
    if !status.is_success() {
        let oauth = json
            .as_ref()
            .and_then(|v| oauth_error(v, secret))
            .map(Box::new);
        let detail = match &oauth {
            Some(o) => o.to_string(),
            None if body.is_empty() => "empty body".into(),
            None => describe_body(content_type, body, secret),
        };
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => retry_after,
            _ => None,
        };
        return Err(TokenError::Rejected {
            status: status.as_u16(),
            detail,
            oauth,
            retry_after,
        });
    }
    let Some(json) = json.as_mut() else {
        return Err(TokenError::InvalidResponse(describe_body(
            content_type,
            body,
            secret,
        )));
    };
    if let Some(o) = oauth_error(json, secret) {
        return Err(TokenError::Rejected {
            status: status.as_u16(),
            detail: o.to_string(),
            oauth: Some(Box::new(o)),
            retry_after: None,
        });
    }
    // Move the token out of the JSON tree, so the only copy is the zeroizing `Secret`.
    let access_token = match json.get_mut("access_token").map(serde_json::Value::take) {
        Some(serde_json::Value::String(t)) if !t.is_empty() => Secret::new(t),
        Some(_) => {
            return Err(TokenError::InvalidResponse(
                "access_token is empty or not a string".into(),
            ))
        }
        None => {
            return Err(TokenError::InvalidResponse(
                "no access_token in the response".into(),
            ))
        }
    };
    if let Some(tt) = json.get("token_type") {
        let tt = tt.as_str().unwrap_or("");
        if !tt.eq_ignore_ascii_case("bearer") {
            return Err(TokenError::InvalidResponse(format!(
                "token_type is {:?}, token-proxy only sends Bearer tokens",
                sanitize(tt, secret)
            )));
        }
    }
    let lifetime = match json.get("expires_in") {
        // App Service's managed identity endpoint gives only `expires_on`, the Unix time.
        None | Some(serde_json::Value::Null) => match json.get("expires_on").and_then(unix_time) {
            Some(at) => {
                let now = SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let secs = at - now;
                if secs < 1.0 {
                    return Err(TokenError::InvalidResponse(format!(
                        "expires_on {at} is not in the future"
                    )));
                }
                Duration::from_secs_f64(secs.min(MAX_LIFETIME.as_secs_f64()))
            }
            None => default_expires_in,
        },
        Some(v) => {
            let secs = match v {
                serde_json::Value::Number(n) => n.as_f64(),
                serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match secs {
                Some(s) if s.is_finite() && s >= 1.0 => {
                    Duration::from_secs_f64(s.min(MAX_LIFETIME.as_secs_f64()))
                }
                _ => {
                    return Err(TokenError::InvalidResponse(format!(
                        "expires_in {} is not a positive number of seconds",
                        sanitize(&v.to_string(), secret)
                    )))
                }
            }
        }
    };
    Ok((access_token, lifetime))
}

/// A Unix time in seconds, as a number or a string of digits (`expires_on`).
fn unix_time(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<u64>().ok().map(|n| n as f64),
        _ => None,
    }
    .filter(|t| t.is_finite() && *t > 0.0)
}

/// The token endpoint's client: TLS with the built-in roots and `ca_file`, the proxy decided
/// with the config, no redirects.
fn build_client(cfg: &CredentialConfig) -> Result<reqwest::Client, tls::TlsError> {
    let tls = tls::client_config(cfg.ca_file.as_deref(), None)?;
    // Proxies were decided with the config (src/egress.rs): never reqwest's own reading of
    // the environment, so that `proxy = "none"` and the loopback rule hold.
    let mut builder = reqwest::Client::builder().no_proxy();
    if let Some(p) = &cfg.proxy {
        let mut proxy =
            reqwest::Proxy::all(p.uri().to_string()).map_err(|e| tls::TlsError::CaFile {
                path: "(token client proxy)".into(),
                problem: e.to_string(),
            })?;
        if let Some(auth) = p.authorization() {
            proxy = proxy.custom_http_auth(auth.clone());
        }
        builder = builder.proxy(proxy);
    }
    builder
        .tls_backend_preconfigured(tls)
        // The secret goes in the body: never let a redirect carry it to another host.
        .redirect(reqwest::redirect::Policy::none())
        // A backstop only: `exchange`'s own timeout, of the same length, starts first, so it
        // is the one that fires and names the failure.
        .connect_timeout(cfg.token_timeout)
        .timeout(cfg.token_timeout)
        .user_agent(concat!("token-proxy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| tls::TlsError::CaFile {
            path: "(token client)".into(),
            problem: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// README's `/metrics` table lists every outcome label, and the errors' labels are among
    /// them.
    #[test]
    fn every_fetch_outcome_is_documented() {
        let readme = include_str!("../../README.md");
        let row = readme
            .lines()
            .find(|l| l.starts_with("| `token_proxy_token_fetches_total`"))
            .expect("the metric's row");
        for outcome in OUTCOMES {
            assert!(
                row.contains(&format!("`{outcome}`")),
                "{outcome} not in {row}"
            );
        }
        for e in [
            TokenError::InvalidResponse(String::new()),
            TokenError::Credential(String::new()),
        ] {
            assert!(OUTCOMES.contains(&e.outcome().as_str()), "{}", e.outcome());
        }
    }

    fn parse(status: u16, body: &str) -> Result<(Secret, Duration), TokenError> {
        parse_response(
            StatusCode::from_u16(status).unwrap(),
            Some(Duration::from_secs(7)),
            "application/json",
            body.as_bytes(),
            Duration::from_secs(600),
            &Secret::new("the-secret"),
        )
    }

    #[test]
    fn azure_answer_with_number_or_string_lifetime() {
        let (t, l) = parse(200, r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"abc"}"#).unwrap();
        assert_eq!((t.expose(), l), ("abc", Duration::from_secs(3599)));
        let (_, l) = parse(
            200,
            r#"{"token_type":"bearer","expires_in":"3599","access_token":"abc"}"#,
        )
        .unwrap();
        assert_eq!(l, Duration::from_secs(3599));
    }

    #[test]
    fn missing_lifetime_uses_default_and_huge_is_clamped() {
        assert_eq!(
            parse(200, r#"{"access_token":"a"}"#).unwrap().1,
            Duration::from_secs(600)
        );
        assert_eq!(
            parse(200, r#"{"access_token":"a","expires_in":1099511627776}"#)
                .unwrap()
                .1,
            MAX_LIFETIME
        );
    }

    #[test]
    fn bad_lifetimes_and_bodies_are_errors() {
        for body in [
            r#"{"access_token":"a","expires_in":0}"#,
            r#"{"access_token":"a","expires_in":-5}"#,
            r#"{"access_token":"a","expires_in":"soon"}"#,
            r#"{"token_type":"Bearer","expires_in":10}"#,
            r#"{"access_token":"a","token_type":"mac"}"#,
            r#"{"access_token":"","expires_in":10}"#,
            r#"{"access_token":5,"expires_in":10}"#,
            "<!DOCTYPE html><html>oops</html>",
        ] {
            assert!(parse(200, body).is_err(), "{body}");
        }
    }

    #[test]
    fn azure_error_is_explained_and_sanitised() {
        let body = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided: the-secret.\r\nTrace ID: x","error_codes":[7000215],"trace_id":"t-1","correlation_id":"c-1"}"#;
        let e = parse(401, body).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("invalid_client")
                && text.contains("7000215")
                && text.contains("t-1")
                && text.contains("c-1"),
            "{text}"
        );
        assert!(
            text.contains("hint: check client_id and the client secret"),
            "{text}"
        );
        assert!(
            !text.contains("the-secret") && !text.contains('\n'),
            "{text}"
        );
        assert_eq!(e.retry_after(), None);
        assert!(e.is_permanent());
        assert!(!parse(500, "{}").unwrap_err().is_permanent());
        assert!(!parse(429, "{}").unwrap_err().is_permanent());
        assert!(parse(400, "{}").unwrap_err().is_permanent());
    }

    /// The IMDS retry rules (Azure's managed identity docs): `404`, `410` (while the endpoint
    /// starts), `429` and `5xx` are tried again on the backoff; `400` (an unknown identity) is
    /// permanent.
    #[test]
    fn imds_answers_are_transient_except_400() {
        for status in [404, 410, 429, 500, 503] {
            let e = parse(
                status,
                r#"{"error":"invalid_request","error_description":"x"}"#,
            )
            .unwrap_err();
            assert!(!e.is_permanent(), "{status}");
        }
        let e = parse(
            400,
            r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
        )
        .unwrap_err();
        assert!(e.is_permanent());
    }

    /// App Service's endpoint gives only `expires_on` (a Unix time, as a string).
    #[test]
    fn expires_on_alone_gives_the_lifetime() {
        let at = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 900; // not the default lifetime (600 s)
        let (_, lifetime) = parse(
            200,
            &format!(r#"{{"access_token":"t","expires_on":"{at}","token_type":"Bearer"}}"#),
        )
        .unwrap();
        assert!((898..=900).contains(&lifetime.as_secs()), "{lifetime:?}");
        // As a number, too.
        let (_, lifetime) =
            parse(200, &format!(r#"{{"access_token":"t","expires_on":{at}}}"#)).unwrap();
        assert!((898..=900).contains(&lifetime.as_secs()), "{lifetime:?}");
        let past = parse(200, r#"{"access_token":"t","expires_on":"1000"}"#).unwrap_err();
        assert!(past.to_string().contains("expires_on"), "{past}");
    }

    #[test]
    fn retry_after_only_on_429_and_503() {
        assert_eq!(
            parse(429, "{}").unwrap_err().retry_after(),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse(503, "busy").unwrap_err().retry_after(),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse(500, "busy").unwrap_err().retry_after(), None);
    }

    /// Seconds are taken (capped at an hour); an HTTP date, as RFC 9110 also allows, is
    /// ignored: the usual backoff applies, as for an answer without `Retry-After`.
    #[test]
    fn retry_after_is_seconds_and_an_http_date_is_ignored() {
        let parsed = |v: &str| parse_retry_after(&HeaderValue::from_str(v).unwrap());
        assert_eq!(parsed("30"), Some(Duration::from_secs(30)));
        assert_eq!(parsed(" 5 "), Some(Duration::from_secs(5)));
        assert_eq!(parsed("0"), Some(Duration::ZERO));
        assert_eq!(parsed("86400"), Some(Duration::from_secs(3600)));
        for ignored in ["Wed, 21 Oct 2015 07:28:00 GMT", "-5", "1.5", "soon", ""] {
            assert_eq!(parsed(ignored), None, "{ignored:?}");
        }
    }

    #[test]
    fn html_error_page_is_described() {
        let e = parse(500, "<html><body>Bad Gateway</body></html>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTML page"), "{e}");
    }

    #[test]
    fn basic_auth_form_encodes_id_and_secret() {
        let v = basic_auth("id:1", &Secret::new("p@ss word"));
        assert!(v.is_sensitive());
        let b64 = v.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(raw, b"id%3A1:p%40ss+word");
    }

    fn credential(extra: &str) -> CredentialConfig {
        let text = format!(
            "[credentials.api]\ntoken_url = \"https://login.example.com/t/token\"\n\
             client_id = \"id\"\nclient_secret = \"s\"\n{extra}\n\
             [[routes]]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://api.example.com/\"\n\
             credential = \"api\"\n"
        );
        let config = crate::config::Config::parse(&text, "test.toml", &|_| None).unwrap();
        config.credential("api").unwrap().clone()
    }

    /// The form's buffer is sized exactly (`form` asserts it), so the secret is never left
    /// behind in a reallocated one: every field at its worst, each byte encoded to three, and
    /// the fields that stay as they are; and what was encoded reads back as what was given.
    #[test]
    fn form_is_sized_exactly_and_reads_back() {
        let every_byte: String = (1u8..=127).map(char::from).collect::<String>() + "é€ +";
        let mut cfg = credential("scope = \"app/.default\"");
        cfg.client_id = every_byte.clone();
        cfg.scope = Some(every_byte.clone());
        cfg.audience = Some("aud".into());
        cfg.resource = Some(every_byte.clone());
        cfg.extra_params = (0..50)
            .map(|i| (format!("&{i}"), "&".repeat(i)))
            .chain([("Type".into(), "oauth2".into())])
            .collect();
        let source = TokenSource::new(&cfg).unwrap();
        let secret = Secret::new(every_byte.repeat(20));
        let form = source.form(&secret);
        let back: Vec<(String, String)> = form_urlencoded::parse(form.as_bytes())
            .into_owned()
            .collect();
        let mut want: Vec<(String, String)> = [
            ("grant_type", "client_credentials"),
            ("client_id", &every_byte),
            ("client_secret", secret.expose()),
            ("scope", &every_byte),
            ("audience", "aud"),
            ("resource", &every_byte),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec();
        want.extend(cfg.extra_params.iter().cloned());
        assert!(back == want, "the form does not read back as its fields");

        cfg.auth_method = AuthMethod::ClientSecretBasic;
        cfg.scope = None;
        cfg.audience = None;
        cfg.resource = None;
        cfg.extra_params.clear();
        let form = TokenSource::new(&cfg).unwrap().form(&secret);
        assert_eq!(
            form, "grant_type=client_credentials",
            "basic: no secret in the body"
        );
    }

    /// Each OAuth error code gets its own fix, and a managed identity's differ.
    #[test]
    fn every_error_code_has_its_hint() {
        let hint = |error: &str, managed_identity| {
            let e = OAuthError {
                error: error.into(),
                managed_identity,
                ..Default::default()
            };
            e.hint()
        };
        for (error, says) in [
            ("invalid_client", "check client_id and the client secret"),
            (
                "unauthorized_client",
                "may not use the client_credentials grant",
            ),
            ("invalid_scope", "check scope (Azure expects"),
            ("invalid_request", "check token_url (tenant)"),
            ("invalid_grant", "check the grant settings"),
            (
                "unsupported_grant_type",
                "does not support the client_credentials grant",
            ),
            ("temporarily_unavailable", "retries with backoff"),
            ("server_error", "retries with backoff"),
            ("something_else", "see error_description"),
        ] {
            assert!(hint(error, false).contains(says), "{error}");
        }
        assert!(hint("invalid_request", true).starts_with("check that the identity"));
        assert!(hint("other", true).starts_with("the platform's identity endpoint refused"));
    }

    /// The parts of an OAuth error that are there, in order, and nothing for those that are
    /// not; the kind and the `/metrics` outcome of every error.
    #[test]
    fn errors_read_exactly() {
        let bare = parse(400, r#"{"error":"invalid_grant"}"#).unwrap_err();
        assert_eq!(
            bare.to_string(),
            "token endpoint answered HTTP 400: invalid_grant; hint: check the grant settings of the app registration"
        );
        assert_eq!(bare.kind_key(), "400 invalid_grant []");
        assert_eq!(
            bare.oauth_error().map(|o| o.error.as_str()),
            Some("invalid_grant")
        );
        let full = parse(
            401,
            r#"{"error":"e","error_description":"d","error_codes":[1,2],"trace_id":"t","correlation_id":"c"}"#,
        )
        .unwrap_err();
        assert_eq!(
            full.oauth_error().unwrap().to_string(),
            "e: d (error_codes [1, 2]) trace_id=t correlation_id=c; hint: see error_description"
        );
        assert_eq!(full.kind_key(), "401 e [1, 2]");
        let errors = [
            (parse(502, "").unwrap_err(), "502", "http_502"),
            (
                TokenError::SecretFile {
                    path: "f".into(),
                    problem: "gone".into(),
                },
                "secret file: gone",
                "secret_file",
            ),
            (
                TokenError::Timeout {
                    url: "u".into(),
                    secs: 1.0,
                },
                "timeout",
                "timeout",
            ),
            (
                TokenError::Unreachable {
                    url: "u".into(),
                    problem: "refused".into(),
                },
                "unreachable: refused",
                "unreachable",
            ),
            (
                TokenError::InvalidResponse("x".into()),
                "invalid: x",
                "invalid_response",
            ),
            (
                TokenError::Credential("k".into()),
                "credential: k",
                "credential_file",
            ),
        ];
        for (e, key, outcome) in errors {
            assert_eq!(
                (e.kind_key(), e.outcome()),
                (key.to_string(), outcome.to_string())
            );
            assert!(e.oauth_error().is_none() && !e.is_permanent() && e.retry_after().is_none());
        }
        assert_eq!(
            parse(502, "").unwrap_err().to_string(),
            "token endpoint answered HTTP 502: empty body"
        );
        // A code that names the request as wrong is permanent whatever the status.
        assert!(parse(403, r#"{"error":"invalid_scope"}"#)
            .unwrap_err()
            .is_permanent());
        assert!(parse(403, r#"{"error":"unauthorized_client"}"#)
            .unwrap_err()
            .is_permanent());
        assert!(!parse(403, r#"{"error":"access_denied"}"#)
            .unwrap_err()
            .is_permanent());
        // An error in a 200 answer is still an error.
        let ok_status = parse(200, r#"{"error":"invalid_client","access_token":"x"}"#).unwrap_err();
        assert_eq!(ok_status.kind_key(), "200 invalid_client []");
    }

    /// Error texts are cut at MAX_TEXT characters, control characters become spaces, and the
    /// secret is redacted, but an empty secret redacts nothing.
    #[test]
    fn error_texts_are_shortened_and_cleaned() {
        let secret = Secret::new("s3");
        let at_limit = "é".repeat(MAX_TEXT);
        assert_eq!(sanitize(&at_limit, &secret), at_limit);
        let over = at_limit.clone() + "x";
        assert_eq!(sanitize(&over, &secret), at_limit + "…");
        assert_eq!(sanitize("a\r\nb s3", &secret), "a  b <redacted>");
        assert_eq!(sanitize("abc", &Secret::new("")), "abc");
    }

    /// What a body that is not JSON looks like: an HTML page by its content type or by its
    /// first character, its size, and at most its first 120 bytes.
    #[test]
    fn bodies_that_are_not_json_are_described() {
        let secret = Secret::new("s3");
        let html = "an HTML page (a proxy, gateway or wrong token_url?)";
        let d = describe_body("text/html", b"oops", &secret);
        assert_eq!(d, format!("{html} (text/html, 4 bytes, starting \"oops\")"));
        let d = describe_body("", b"  <p>s3</p>", &secret);
        assert_eq!(
            d,
            format!("{html} (no content-type, 11 bytes, starting \"<p><redacted></p>\")")
        );
        let long = "x".repeat(200);
        let d = describe_body("text/plain", long.as_bytes(), &secret);
        let start = "x".repeat(120);
        assert_eq!(
            d,
            format!("a non-JSON body (text/plain, 200 bytes, starting \"{start}\")")
        );
    }

    /// An `expires_on` that is not a Unix time after 1970 counts as absent: the default
    /// lifetime applies.
    #[test]
    fn expires_on_that_is_no_time_is_absent() {
        for v in ["0", "-5", "\"soon\"", "\"\"", "null", "true"] {
            let body = format!(r#"{{"access_token":"t","expires_on":{v}}}"#);
            assert_eq!(
                parse(200, &body).unwrap().1,
                Duration::from_secs(600),
                "{v}"
            );
        }
    }
}
