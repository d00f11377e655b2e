//! Configuration: TOML text -> raw serde structs -> validated [`Config`].
//!
//! The raw structs mirror the file one to one and refuse unknown keys (a credential proxy fails
//! closed: a misspelt `client_secret_file` must not silently become "no secret"). Validation then
//! expands `${VAR}` in every string, checks each value and builds typed settings whose invariants
//! hold, so nothing downstream re-checks them. Every error names the file, the key and the fix.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use url::Url;

use crate::assertion::{JwtAlgorithm, SigningKeyFiles};
use crate::egress::{is_local, ForwardProxy, ProxySetting};
use crate::secret::Secret;

/// Default seconds before expiry at which a token is refreshed.
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(300);
/// Default timeout of one token request.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime assumed when a token response carries no `expires_in`.
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(600);
/// Default upstream connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time to wait for the upstream's response headers.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a request waits for a token when none is valid.
pub const DEFAULT_TOKEN_WAIT: Duration = Duration::from_secs(10);
/// Default time requests in flight get to finish on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default time a client has to send request headers (on HTTP/1.1 keep-alive connections this
/// includes the idle time before the next request).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest request head (request line and headers) in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default largest number of request headers.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Default largest number of client connections open at once, over all listeners.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default largest request body kept for a replay after an upstream 401.
pub const DEFAULT_REPLAY_MAX_BODY_BYTES: u64 = 64 * 1024;

/// A configuration problem: which file, which key, what is wrong and how to fix it; and the
/// other problems found in the same file (`also`), so that one run reports them all.
#[derive(Debug)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: String,
    /// The dotted key path (`credentials.cn-api.token_url`), or a location for parse errors.
    pub key: String,
    /// What is wrong.
    pub problem: String,
    /// What to do about it.
    pub fix: String,
    /// The file's other problems, each reported as this one is.
    pub also: Vec<ConfigError>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config error in {}: {}: {}\n  fix: {}",
            self.file, self.key, self.problem, self.fix
        )?;
        for other in &self.also {
            write!(f, "\n{other}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// The first of `errors`, holding the others; `None` when there are none.
    fn all(mut errors: Vec<ConfigError>) -> Option<ConfigError> {
        if errors.is_empty() {
            return None;
        }
        let mut first = errors.remove(0);
        first.also.extend(errors);
        Some(first)
    }
}

/// The validated configuration of one token-proxy process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration was read from (for messages).
    pub source: String,
    /// Address of the admin listener (`/healthz`, `/readyz`), if any.
    pub admin_listen: Option<SocketAddr>,
    /// Number of runtime worker threads; `None` means one per core.
    pub workers: Option<usize>,
    /// How long requests in flight may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Limits applied to every client connection.
    pub limits: ClientLimits,
    /// Credentials by name, sorted by name.
    pub credentials: Vec<CredentialConfig>,
    /// Routes in file order; each has its own listener.
    pub routes: Vec<RouteConfig>,
}

/// Limits on what clients may send, applied by every listener.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Time to send a request's headers (and, on HTTP/1.1, to start the next request).
    pub header_read_timeout: Duration,
    /// Largest request head in bytes; larger gets `431`.
    pub max_header_bytes: usize,
    /// Largest number of request headers; more gets `431`.
    pub max_headers: usize,
    /// Client connections open at once, over all listeners; more wait in the accept queue.
    pub max_connections: usize,
}

/// Where a route listens: a TCP address or a Unix domain socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `127.0.0.1:8080`.
    Tcp(SocketAddr),
    /// `unix:/run/token-proxy/api.sock`.
    Unix(PathBuf),
}

impl ListenAddr {
    /// The TCP address, if this is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            ListenAddr::Tcp(a) => Some(*a),
            ListenAddr::Unix(_) => None,
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => a.fmt(f),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// An IP network in CIDR notation, for `allowed_clients`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address (a single host).
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (
                a.trim().parse::<IpAddr>().ok()?,
                Some(p.trim().parse::<u8>().ok()?),
            ),
            None => (text.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `client_id` and `client_secret` as form fields.
    ClientSecretPost,
    /// HTTP Basic with the form-encoded id and secret.
    ClientSecretBasic,
}

/// What proves the client's identity to the token endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientCredential {
    /// A client secret, sent as the credential's `auth_method` says.
    Secret(SecretSource),
    /// A JWT signed with a certificate's key for each request (RFC 7523 `private_key_jwt`).
    PrivateKey(SigningKeyFiles),
    /// A JWT made by someone else (a federated workload identity token), read from this file
    /// for each request.
    AssertionFile(PathBuf),
    /// No secret: the platform's identity endpoint (Azure IMDS, or App Service's) issues the
    /// token for the identity of the machine or app (`managed_identity`).
    ManagedIdentity(ManagedIdentity),
}

/// An Azure managed identity, as a token source: which endpoint, which identity, for which
/// resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedIdentity {
    /// How the endpoint is asked.
    pub endpoint: IdentityEndpoint,
    /// A user-assigned identity: the query parameter naming it and its value (`client_id`,
    /// `object_id` or `msi_res_id` on IMDS; `client_id`, `principal_id` or `mi_res_id` on App
    /// Service). `None`: the system-assigned identity.
    pub identity: Option<(&'static str, String)>,
    /// The `resource` asked for: the credential's `scope` without its `/.default`.
    pub resource: String,
}

/// The two kinds of managed identity endpoint Azure has.
#[derive(Debug, Clone, PartialEq)]
pub enum IdentityEndpoint {
    /// The Instance Metadata Service of VMs, scale sets and AKS nodes: `GET` with
    /// `Metadata: true`, `api-version=2018-02-01`.
    Imds,
    /// App Service, Functions and Container Apps: `IDENTITY_ENDPOINT`, with `IDENTITY_HEADER`
    /// sent as `X-IDENTITY-HEADER`, `api-version=2019-08-01`.
    AppService(Secret),
}

/// Where IMDS issues managed identity tokens.
pub const IMDS_TOKEN_URL: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

impl CredentialConfig {
    /// How the client authenticates, as `check` reports it: `client_secret_post`,
    /// `client_secret_basic`, `private_key_jwt`, `client_assertion_file`, or
    /// `managed_identity (IMDS)` / `managed_identity (App Service)`.
    pub fn kind(&self) -> &'static str {
        match (&self.client_credential, self.auth_method) {
            (ClientCredential::Secret(_), AuthMethod::ClientSecretPost) => "client_secret_post",
            (ClientCredential::Secret(_), AuthMethod::ClientSecretBasic) => "client_secret_basic",
            (ClientCredential::PrivateKey(_), _) => "private_key_jwt",
            (ClientCredential::AssertionFile(_), _) => "client_assertion_file",
            (ClientCredential::ManagedIdentity(mi), _) => match mi.endpoint {
                IdentityEndpoint::Imds => "managed_identity (IMDS)",
                IdentityEndpoint::AppService(_) => "managed_identity (App Service)",
            },
        }
    }
}

/// The public Azure clouds and their authority hosts.
const AZURE_CLOUDS: [(&str, &str); 3] = [
    ("china", "https://login.chinacloudapi.cn"),
    ("global", "https://login.microsoftonline.com"),
    ("usgov", "https://login.microsoftonline.us"),
];

/// Where the client secret comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum SecretSource {
    /// Given in the config (usually through `${VAR}`).
    Inline(Secret),
    /// Read from this file at every token request, so a rotated secret is picked up.
    File(PathBuf),
}

/// One OAuth 2.0 client-credentials identity.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialConfig {
    /// The name routes refer to.
    pub name: String,
    /// The token endpoint.
    pub token_url: Url,
    /// The OAuth client id.
    pub client_id: String,
    /// The secret, key or assertion that authenticates the client.
    pub client_credential: ClientCredential,
    /// The `scope` form field (several scopes space-separated), if any.
    pub scope: Option<String>,
    /// The `audience` form field, if any.
    pub audience: Option<String>,
    /// The `resource` form field (RFC 8707, Entra v1), if any.
    pub resource: Option<String>,
    /// How a client secret is sent (post or basic).
    pub auth_method: AuthMethod,
    /// Extra form fields sent with every token request, in key order.
    pub extra_params: Vec<(String, String)>,
    /// Extra PEM roots trusted for the token endpoint.
    pub ca_file: Option<PathBuf>,
    /// Timeout of one token request.
    pub token_timeout: Duration,
    /// Refresh this long before expiry (never later than half way through the lifetime).
    pub refresh_before: Duration,
    /// Lifetime assumed when a response has no `expires_in`.
    pub default_expires_in: Duration,
    /// The forward proxy to the token endpoint, if any.
    pub proxy: Option<ForwardProxy>,
}

/// Where a route forwards to: scheme, authority and base path of the upstream URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port, as sent in `Host`.
    pub authority: Authority,
    /// The `Host` header value, ready-made.
    pub host_header: HeaderValue,
    /// Base path without a trailing slash (empty for none).
    pub base_path: String,
    /// The URL as configured, for messages.
    pub url: Url,
}

/// One listener that forwards to one upstream with one credential's token.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Where the route listens.
    pub listen: ListenAddr,
    /// File mode of a Unix socket listener (`None`: as the umask leaves it).
    pub socket_mode: Option<u32>,
    /// Where it forwards.
    pub upstream: Upstream,
    /// The credential whose token is stamped on requests.
    pub credential: String,
    /// Extra PEM roots trusted for the upstream.
    pub ca_file: Option<PathBuf>,
    /// Upstream TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time allowed for the upstream's response headers.
    pub response_timeout: Duration,
    /// Time a request waits for a token when none is valid, before `503 token_unavailable`.
    pub token_wait: Duration,
    /// Largest request body; larger gets `413` (`None`: no limit).
    pub max_body_bytes: Option<u64>,
    /// On an upstream `401`, refresh the token once and replay the request.
    pub retry_on_401: bool,
    /// Largest body kept so that a request can be replayed after a `401`.
    pub replay_max_body_bytes: u64,
    /// Clients must send `Proxy-Authorization: Bearer <this>` (read from `inbound_token_file`).
    pub inbound_token: Option<Secret>,
    /// Where the inbound token is read from (watched for changes while the route runs).
    pub inbound_token_file: Option<PathBuf>,
    /// Only these client networks may connect (empty: any).
    pub allowed_clients: Vec<Cidr>,
    /// The route's name in logs and metrics (default: its listen address, then its
    /// `path_prefix` unless that is `/`).
    pub name: String,
    /// The paths this route takes on its listener: `""` for every path (`path_prefix = "/"`),
    /// else `/a/b` without a trailing slash, matched on whole segments.
    pub path_prefix: String,
    /// Whether the prefix is cut from the path before it goes under the upstream's base path.
    pub strip_prefix: bool,
    /// Fields set on every forwarded request, replacing any the client sent (`set_headers`).
    /// Their values are secrets.
    pub set_headers: Vec<(HeaderName, Secret)>,
    /// Fields whose values are read from files (`set_header_files`), re-read when they change;
    /// with the value each file held when the config was loaded.
    pub set_header_files: Vec<(HeaderName, PathBuf, Secret)>,
    /// Where and how the token is sent (`token_header`, `token_format`).
    pub token_stamp: TokenStamp,
    /// The forward proxy to the upstream, if any.
    pub proxy: Option<ForwardProxy>,
    /// The client certificate for an upstream that asks for one (mutual TLS).
    pub client_identity: Option<crate::tls::ClientIdentity>,
    /// Whether each request gets an access log line (top-level `access_log`).
    pub access_log: bool,
    /// The upgrade protocols tunnelled (lowercase names, as in `Upgrade`); an `Upgrade` to any
    /// other is dropped and the request forwarded as a plain one.
    pub upgrades: Vec<String>,
    /// Rewrite a `Location` or `Content-Location` naming the upstream's own origin and base
    /// path to the address the client used.
    pub rewrite_location: bool,
    /// Add this process's `Via` entry to forwarded requests.
    pub via: bool,
}

/// Where a route sends the token: the field `header`, its value `prefix`, the token, `suffix`.
/// The default is `Authorization: Bearer <token>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStamp {
    /// The field (lowercase).
    pub header: HeaderName,
    /// What comes before the token (`"Bearer "` by default).
    pub prefix: String,
    /// What comes after it.
    pub suffix: String,
}

impl Default for TokenStamp {
    fn default() -> Self {
        TokenStamp {
            header: http::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
            suffix: String::new(),
        }
    }
}

impl TokenStamp {
    /// Whether this is `Authorization: Bearer <token>`, the value the token slot holds.
    pub fn is_default(&self) -> bool {
        self.header == http::header::AUTHORIZATION
            && self.prefix == "Bearer "
            && self.suffix.is_empty()
    }
}

/// Fields a route may not set (`set_headers`, `set_header_files`, `token_header`): hop-by-hop
/// ones, those the proxy sets itself, and the message's framing.
const UNSETTABLE_HEADERS: [&str; 12] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
    "host",
    "content-length",
    "proxy-authorization",
    "proxy-authenticate",
];

// ---- raw, as in the file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    admin_listen: Option<String>,
    #[serde(default)]
    admin_allow_remote: bool,
    workers: Option<usize>,
    shutdown_grace_secs: Option<f64>,
    header_read_timeout_secs: Option<f64>,
    max_header_bytes: Option<usize>,
    max_headers: Option<usize>,
    max_connections: Option<usize>,
    access_log: Option<bool>,
    #[serde(default)]
    credentials: BTreeMap<String, RawCredential>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    token_url: Option<String>,
    azure: Option<RawAzure>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_file: Option<String>,
    private_key_file: Option<String>,
    certificate_file: Option<String>,
    assertion_algorithm: Option<String>,
    client_assertion_file: Option<String>,
    scope: Option<Scopes>,
    audience: Option<String>,
    resource: Option<String>,
    auth_method: Option<String>,
    #[serde(default)]
    extra_params: BTreeMap<String, String>,
    ca_file: Option<String>,
    token_timeout_secs: Option<f64>,
    refresh_before_secs: Option<f64>,
    default_expires_in_secs: Option<f64>,
    #[serde(default)]
    allow_insecure_token_url: bool,
    proxy: Option<String>,
    managed_identity: Option<RawManagedIdentity>,
}

/// `managed_identity = true`, or a table naming a user-assigned identity or the endpoint.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawManagedIdentity {
    On(bool),
    Table(RawIdentity),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    client_id: Option<String>,
    object_id: Option<String>,
    resource_id: Option<String>,
    endpoint: Option<String>,
}

/// The keys that say how a client authenticates, taken out of [`RawCredential`].
struct RawSecretKeys {
    client_secret: Option<String>,
    client_secret_file: Option<String>,
    private_key_file: Option<String>,
    certificate_file: Option<String>,
    assertion_algorithm: Option<String>,
    client_assertion_file: Option<String>,
}

/// `azure = { cloud = "china", tenant = "…" }`: the token URL of a Microsoft Entra tenant.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAzure {
    cloud: Option<String>,
    tenant: Option<String>,
    authority_host: Option<String>,
}

/// `scope = "a b"` or `scope = ["a", "b"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scopes {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    path_prefix: Option<String>,
    strip_prefix: Option<bool>,
    set_headers: Option<BTreeMap<String, String>>,
    set_header_files: Option<BTreeMap<String, String>>,
    token_header: Option<String>,
    token_format: Option<String>,
    proxy: Option<String>,
    client_certificate_file: Option<String>,
    client_key_file: Option<String>,
    listen: Option<String>,
    socket_mode: Option<String>,
    upstream: Option<String>,
    credential: Option<String>,
    ca_file: Option<String>,
    connect_timeout_secs: Option<f64>,
    response_timeout_secs: Option<f64>,
    token_wait_secs: Option<f64>,
    #[serde(default)]
    allow_remote: bool,
    #[serde(default)]
    allow_insecure_upstream: bool,
    max_body_bytes: Option<u64>,
    retry_on_401: Option<bool>,
    replay_max_body_bytes: Option<u64>,
    inbound_token_file: Option<String>,
    #[serde(default)]
    allowed_clients: Vec<String>,
    upgrades: Option<Vec<String>>,
    rewrite_location: Option<bool>,
    via: Option<bool>,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            problem: format!("cannot read the file: {e}"),
            fix: "pass an existing, readable TOML file with --config".into(),
            also: Vec::new(),
        })?;
        Config::parse(&text, &file, &|name| std::env::var(name).ok())
    }

    /// Validates TOML `text`; `file` names it in messages and `env` resolves `${VAR}`.
    pub fn parse(
        text: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(text, file, &e))?;
        Validator { file, env }.config(raw)
    }
}

/// A TOML error as the other config errors read: the dotted key it is at (found in the
/// document by the error's position), and what was expected in the user's words rather than
/// serde's (`data did not match any variant of untagged enum Scopes` is "a string or a list of
/// strings"; `invalid type: map, expected a sequence` at `routes` is `[[routes]]` written as
/// `[routes]`).
fn toml_error(text: &str, file: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim_end_matches('\n');
    let start = e.span().map(|s| s.start.min(text.len()));
    let line = start.map(|at| text[..at].matches('\n').count() + 1);
    let key = start.and_then(|at| key_at(text, at));
    let location = match (&key, line) {
        (Some(key), Some(line)) => format!("{key} (line {line})"),
        (None, Some(line)) => format!("line {line}"),
        _ => "(document)".into(),
    };
    let leaf = key
        .as_deref()
        .map(|k| k.rsplit(['.', '[']).next().unwrap_or(k));
    let (problem, fix) = if message.starts_with("unknown field") {
        (
            message.to_string(),
            "remove or correct the key; the README's configuration reference lists every key"
                .into(),
        )
    } else if message.contains("untagged enum Scopes") {
        (
            "expected a string or a list of strings".into(),
            "write scope = \"api://x/.default\", or scope = [\"a\", \"b\"]".into(),
        )
    } else if let (Some(table), true) = (
        leaf.filter(|l| *l == "routes"),
        message.starts_with("invalid type: map, expected a sequence"),
    ) {
        (
            format!("expected [[{table}]], an array of tables, found a single table"),
            format!("write [[{table}]] (two brackets) above each route, not [{table}]"),
        )
    } else if let Some(rest) = message.strip_prefix("invalid type: ") {
        let (found, expected) = rest
            .split_once(", expected ")
            .unwrap_or((rest, "another type"));
        (
            format!(
                "expected {}, found {}",
                in_user_words(expected),
                in_user_words(found)
            ),
            "correct the value; the README's configuration reference gives each key's type".into(),
        )
    } else {
        (
            message.to_string(),
            "correct the TOML; the README's configuration reference lists every key and type"
                .into(),
        )
    };
    ConfigError {
        file: file.into(),
        key: location,
        problem,
        fix,
        also: Vec::new(),
    }
}

/// A serde type name (`u16`, `a sequence`, `map`) in the words the README uses.
fn in_user_words(serde: &str) -> String {
    let bare = serde.split_whitespace().next().unwrap_or(serde);
    match bare {
        "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64" | "integer" => {
            "a whole number".into()
        }
        "f32" | "f64" | "float" | "floating" => "a number".into(),
        "a" | "an" => match serde {
            "a sequence" => "a list ([...])".into(),
            "a map" => "a table".into(),
            "a boolean" => "true or false".into(),
            other => other.into(),
        },
        "sequence" => "a list".into(),
        "map" => "a table".into(),
        "boolean" => format!("true or false ({serde})"),
        "string" => format!("a string ({})", serde.trim_start_matches("string ")),
        "struct" => "a table".into(),
        _ => serde.into(),
    }
}

/// The dotted key (`credentials.cn-api.scope`, `routes[0].listen`) whose value holds byte
/// `at` of `text`, the deepest one: found by parsing the document again, with positions. A
/// table's own position is only its header's, so every table is searched, not only those
/// whose position holds `at`.
fn key_at(text: &str, at: usize) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    fn in_table(table: &DeTable<'_>, at: usize) -> Option<String> {
        table.iter().find_map(|(key, value)| {
            let name = key.get_ref();
            match in_value(value.get_ref(), at) {
                Some(below) if below.starts_with('[') => Some(format!("{name}{below}")),
                Some(below) => Some(format!("{name}.{below}")),
                None if value.span().contains(&at) || key.span().contains(&at) => {
                    Some(name.to_string())
                }
                None => None,
            }
        })
    }
    fn in_value(value: &DeValue<'_>, at: usize) -> Option<String> {
        match value {
            DeValue::Table(table) => in_table(table, at),
            DeValue::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, item)| match in_value(item.get_ref(), at) {
                    Some(below) if below.starts_with('[') => Some(format!("[{i}]{below}")),
                    Some(below) => Some(format!("[{i}].{below}")),
                    None if item.span().contains(&at) => Some(format!("[{i}]")),
                    None => None,
                }),
            _ => None,
        }
    }
    let document = DeTable::parse(text).ok()?;
    in_table(document.get_ref(), at)
}

/// `r`'s value, or `default` with its error kept in `errors`: judging goes on, so that one
/// run reports every problem.
fn kept<T>(errors: &mut Vec<ConfigError>, r: Result<T, ConfigError>, default: T) -> T {
    r.unwrap_or_else(|e| {
        errors.push(e);
        default
    })
}

struct Validator<'a> {
    file: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Validator<'_> {
    fn err(&self, key: &str, problem: impl fmt::Display, fix: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.file.into(),
            key: key.into(),
            problem: problem.to_string(),
            fix: fix.to_string(),
            also: Vec::new(),
        }
    }

    /// Expands `${VAR}` references; a missing or empty variable is an error naming it.
    fn expand(&self, key: &str, value: &str) -> Result<String, ConfigError> {
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err(self.err(
                    key,
                    "unclosed `${` in value",
                    "write `${NAME}` with a closing brace",
                ));
            };
            let name = &after[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(self.err(
                    key,
                    format!("`${{{name}}}` is not a valid environment variable reference"),
                    "use letters, digits and `_` only, as in `${CN_API_CLIENT_ID}`",
                ));
            }
            match (self.env)(name) {
                // Set but empty is a mistake too (an unset secret in a deployment, a
                // `VAR= ` in a shell): it would make a URL, an id or a secret silently wrong
                // (`…chinacloudapi.cn//oauth2/…` for an empty tenant).
                Some(v) if v.is_empty() => {
                    return Err(self.err(
                        key,
                        format!("environment variable {name} is set but empty"),
                        format!("give {name} its value before starting token-proxy, or write the value in the file"),
                    ))
                }
                Some(v) => out.push_str(&v),
                None => {
                    return Err(self.err(
                        key,
                        format!("environment variable {name} is not set"),
                        format!(
                        "export {name} before starting token-proxy, or write the value in the file"
                    ),
                    ))
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn required(
        &self,
        key: &str,
        value: Option<String>,
        example: &str,
    ) -> Result<String, ConfigError> {
        match value {
            Some(v) => {
                let v = self.expand(key, &v)?;
                if v.trim().is_empty() {
                    Err(self.err(key, "is empty", format!("set it, e.g. {example}")))
                } else {
                    Ok(v)
                }
            }
            None => Err(self.err(key, "is missing", format!("add it, e.g. {example}"))),
        }
    }

    fn optional(&self, key: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
        value.map(|v| self.expand(key, &v)).transpose()
    }

    fn secs(
        &self,
        key: &str,
        value: Option<f64>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 * 365.0 => {
                Ok(Duration::from_secs_f64(s))
            }
            Some(s) => Err(self.err(
                key,
                format!("{s} is not a positive number of seconds"),
                format!("use a positive number, e.g. {}", default.as_secs()),
            )),
        }
    }

    fn socket_addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.err(
                key,
                format!("`{value}` is not an IP address and port"),
                "write an address and port such as \"127.0.0.1:8080\" (host names are not resolved)",
            )
        })
    }

    fn path(&self, key: &str, value: Option<String>) -> Result<Option<PathBuf>, ConfigError> {
        let Some(p) = self.optional(key, value)? else {
            return Ok(None);
        };
        let path = PathBuf::from(p);
        if !path.is_file() {
            return Err(self.err(
                key,
                format!("{} does not exist or is not a file", path.display()),
                "point it at an existing file (mount it into the container if needed)",
            ));
        }
        Ok(Some(path))
    }

    /// `admin_listen`, which must be a loopback address unless `admin_allow_remote` is set.
    fn admin_listen(
        &self,
        value: Option<String>,
        allow_remote: bool,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(a) = self.optional("admin_listen", value)? else {
            return Ok(None);
        };
        let addr = self.socket_addr("admin_listen", &a)?;
        if !addr.ip().is_loopback() && !allow_remote {
            return Err(self.err(
                "admin_listen",
                format!("{addr} is not a loopback address"),
                "listen on 127.0.0.1, or set admin_allow_remote = true to expose /healthz and /readyz (e.g. to kubelet probes)",
            ));
        }
        Ok(Some(addr))
    }

    /// The whole config: each top-level key, each credential and each route is judged on its
    /// own, and every problem found is reported together (see [`ConfigError::all`]). A route
    /// whose credential has a problem is left for later: its errors would only repeat it.
    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        let admin_listen = kept(
            &mut errors,
            self.admin_listen(raw.admin_listen, raw.admin_allow_remote),
            None,
        );
        let positive = |key: &str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(self.err(
                key,
                "must be at least 1",
                format!("remove it (default {default}) or set a positive number"),
            )),
            v => Ok(v.unwrap_or(default)),
        };
        let limits = ClientLimits {
            header_read_timeout: kept(
                &mut errors,
                self.secs(
                    "header_read_timeout_secs",
                    raw.header_read_timeout_secs,
                    DEFAULT_HEADER_READ_TIMEOUT,
                ),
                DEFAULT_HEADER_READ_TIMEOUT,
            ),
            // hyper needs room for at least one read buffer.
            max_header_bytes: kept(
                &mut errors,
                positive(
                    "max_header_bytes",
                    raw.max_header_bytes,
                    DEFAULT_MAX_HEADER_BYTES,
                ),
                DEFAULT_MAX_HEADER_BYTES,
            )
            .max(8192),
            max_headers: kept(
                &mut errors,
                positive("max_headers", raw.max_headers, DEFAULT_MAX_HEADERS),
                DEFAULT_MAX_HEADERS,
            ),
            max_connections: kept(
                &mut errors,
                positive(
                    "max_connections",
                    raw.max_connections,
                    DEFAULT_MAX_CONNECTIONS,
                ),
                DEFAULT_MAX_CONNECTIONS,
            ),
        };
        if raw.workers == Some(0) {
            errors.push(self.err(
                "workers",
                "must be at least 1",
                "remove it (one per core) or set e.g. workers = 2",
            ));
        }
        let shutdown_grace = kept(
            &mut errors,
            self.secs(
                "shutdown_grace_secs",
                raw.shutdown_grace_secs,
                DEFAULT_SHUTDOWN_GRACE,
            ),
            DEFAULT_SHUTDOWN_GRACE,
        );

        if raw.credentials.is_empty() {
            errors.push(self.err(
                "credentials",
                "no credential is configured",
                "add a [credentials.NAME] table with token_url, client_id and client_secret",
            ));
        }
        let mut credentials = Vec::with_capacity(raw.credentials.len());
        let mut failed = std::collections::HashSet::new();
        for (name, c) in raw.credentials {
            match self.credential(name.clone(), c) {
                Ok(c) => credentials.push(c),
                Err(e) => {
                    errors.push(e);
                    failed.insert(name);
                }
            }
        }

        let mut routes = Vec::with_capacity(raw.routes.len());
        // Each kept route's index in the file, for messages.
        let mut indices = Vec::with_capacity(raw.routes.len());
        for (i, r) in raw.routes.into_iter().enumerate() {
            if r.credential.as_ref().is_some_and(|c| failed.contains(c)) {
                continue;
            }
            let mut route = match self.route(i, r, &credentials) {
                Ok(route) => route,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            route.access_log = raw.access_log.unwrap_or(true);
            // Port 0 asks the OS for a free port, so it is never shared. Routes with the same
            // address share its listener, told apart by path_prefix.
            let port_fixed = route.listen.tcp().is_none_or(|a| a.port() != 0);
            let sharing = routes
                .iter()
                .enumerate()
                .filter(|(_, o): &(usize, &RouteConfig)| port_fixed && o.listen == route.listen);
            let mut clashed = false;
            for (other, o) in sharing {
                let other = indices[other];
                let shown = |p: &str| {
                    if p.is_empty() {
                        "/".to_owned()
                    } else {
                        p.to_owned()
                    }
                };
                if o.path_prefix == route.path_prefix {
                    errors.push(self.err(
                        &format!("routes[{i}].path_prefix"),
                        format!(
                            "{} on {} is already routes[{other}]'s",
                            shown(&route.path_prefix),
                            route.listen
                        ),
                        "give each route on one listener its own path_prefix, or its own listen address",
                    ));
                    clashed = true;
                } else if o.socket_mode != route.socket_mode {
                    errors.push(self.err(
                        &format!("routes[{i}].socket_mode"),
                        format!("differs from routes[{other}]'s, which shares {}", route.listen),
                        "set the same socket_mode on every route of one listener: it is the socket file's",
                    ));
                    clashed = true;
                }
                if clashed {
                    break;
                }
            }
            if clashed {
                continue;
            }
            if port_fixed && admin_listen.is_some() && admin_listen == route.listen.tcp() {
                errors.push(self.err(
                    &format!("routes[{i}].listen"),
                    format!("{} is also admin_listen", route.listen),
                    "use different addresses for routes and the admin listener",
                ));
                continue;
            }
            routes.push(route);
            indices.push(i);
        }
        if let Some(e) = ConfigError::all(errors) {
            return Err(e);
        }
        self.refuse_loops(&routes, admin_listen)?;

        Ok(Config {
            source: self.file.into(),
            admin_listen,
            workers: raw.workers,
            shutdown_grace,
            limits,
            credentials,
            routes,
        })
    }

    /// Refuses a route whose upstream is one of this process's own listeners.
    fn refuse_loops(
        &self,
        routes: &[RouteConfig],
        admin: Option<SocketAddr>,
    ) -> Result<(), ConfigError> {
        let listeners: Vec<SocketAddr> = routes
            .iter()
            .filter_map(|r| r.listen.tcp())
            .chain(admin)
            .filter(|a| a.port() != 0)
            .collect();
        for (i, route) in routes.iter().enumerate() {
            let url = &route.upstream.url;
            // `None` stands for `localhost`, any loopback address.
            let host_ip = match url.host() {
                Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
                Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip).to_canonical()),
                Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost") => None,
                _ => continue,
            };
            let port = url.port_or_known_default().unwrap_or(0);
            let looped = listeners.iter().any(|l| {
                let listen_ip = l.ip().to_canonical();
                l.port() == port
                    && match host_ip {
                        // The upstream is this listener's address, or the listener takes all.
                        Some(ip) if ip.is_unspecified() => {
                            listen_ip.is_loopback() || listen_ip.is_unspecified()
                        }
                        Some(ip) => {
                            ip == listen_ip
                                || (listen_ip.is_unspecified()
                                    && (ip.is_loopback() || ip.is_unspecified()))
                        }
                        None => listen_ip.is_loopback() || listen_ip.is_unspecified(),
                    }
            });
            if looped {
                return Err(self.err(
                    &format!("routes[{i}].upstream"),
                    format!("{url} is token-proxy's own listener: requests would loop"),
                    "point upstream at the real API",
                ));
            }
        }
        Ok(())
    }

    fn credential(
        &self,
        name: String,
        mut raw: RawCredential,
    ) -> Result<CredentialConfig, ConfigError> {
        let k = |field: &str| format!("credentials.{name}.{field}");
        if let Some(mi) = raw.managed_identity.take() {
            match mi {
                RawManagedIdentity::On(false) => {}
                RawManagedIdentity::On(true) => {
                    return self.managed_identity(name, raw, RawIdentity::default())
                }
                RawManagedIdentity::Table(t) => return self.managed_identity(name, raw, t),
            }
        }
        let azure = raw.azure.is_some();
        let token_url = match (raw.token_url, raw.azure) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    &k("azure"),
                    "both token_url and azure are set",
                    "keep one: azure = { cloud = \"china\", tenant = \"…\" } derives the token URL",
                ))
            }
            (Some(text), None) => {
                let text = self.expand(&k("token_url"), &text)?;
                self.http_url(&k("token_url"), &text)?
            }
            (None, Some(a)) => self.azure_token_url(&k("azure"), a)?,
            (None, None) => {
                return Err(self.err(
                    &k("token_url"),
                    "is missing",
                    "add token_url = \"https://login.chinacloudapi.cn/<tenant>/oauth2/v2.0/token\", or azure = { cloud = \"china\", tenant = \"<tenant>\" }",
                ))
            }
        };
        if token_url.scheme() == "http" && !is_local(&token_url) && !raw.allow_insecure_token_url {
            return Err(self.err(
                &k("token_url"),
                format!("{token_url} is plain http to another host: the client secret would cross the network unencrypted"),
                "use https://, or set allow_insecure_token_url = true on this credential if the network is trusted",
            ));
        }
        let client_id = match raw.client_id {
            Some(id) => self.expand(&k("client_id"), &id)?,
            None if azure => (self.env)("AZURE_CLIENT_ID").unwrap_or_default(),
            None => String::new(),
        };
        if client_id.is_empty() {
            return Err(self.err(
                &k("client_id"),
                "is missing or empty",
                if azure {
                    "add client_id = \"${CLIENT_ID}\", or set AZURE_CLIENT_ID (the workload identity webhook does)"
                } else {
                    "add client_id = \"${CLIENT_ID}\""
                },
            ));
        }
        let secret_keys = RawSecretKeys {
            client_secret: raw.client_secret,
            client_secret_file: raw.client_secret_file,
            private_key_file: raw.private_key_file,
            certificate_file: raw.certificate_file,
            assertion_algorithm: raw.assertion_algorithm,
            client_assertion_file: raw.client_assertion_file,
        };
        let client_credential = self.client_credential(&k, &secret_keys, azure)?;
        let auth_method = match (
            self.optional(&k("auth_method"), raw.auth_method)?.as_deref(),
            &client_credential,
        ) {
            (None | Some("client_secret_post"), ClientCredential::Secret(_)) => {
                AuthMethod::ClientSecretPost
            }
            (Some("client_secret_basic"), ClientCredential::Secret(_)) => {
                AuthMethod::ClientSecretBasic
            }
            (None | Some("private_key_jwt"), ClientCredential::PrivateKey(_))
            | (None | Some("private_key_jwt"), ClientCredential::AssertionFile(_)) => {
                AuthMethod::ClientSecretPost
            }
            (_, ClientCredential::ManagedIdentity(_)) => AuthMethod::ClientSecretPost,
            (Some(other), _) => {
                return Err(self.err(
                    &k("auth_method"),
                    format!("`{other}` does not go with how this credential authenticates"),
                    "with a client secret use \"client_secret_post\" (the default) or \"client_secret_basic\"; with private_key_file or client_assertion_file leave it out (or \"private_key_jwt\")",
                ))
            }
        };
        let scope = match raw.scope {
            None => None,
            Some(Scopes::One(s)) => Some(self.expand(&k("scope"), &s)?),
            Some(Scopes::Many(list)) => {
                let mut joined = Vec::with_capacity(list.len());
                for (i, s) in list.iter().enumerate() {
                    let s = self.expand(&format!("{}[{i}]", k("scope")), s)?;
                    if s.is_empty() || s.contains(' ') {
                        return Err(self.err(
                            &format!("{}[{i}]", k("scope")),
                            format!("{s:?} is not one scope"),
                            "give each scope as its own string, without spaces",
                        ));
                    }
                    joined.push(s);
                }
                Some(joined.join(" "))
            }
        }
        .filter(|s| !s.is_empty());
        const RESERVED: [&str; 6] = [
            "grant_type",
            "client_id",
            "client_secret",
            "scope",
            "client_assertion",
            "client_assertion_type",
        ];
        let audience = self
            .optional(&k("audience"), raw.audience)?
            .filter(|s| !s.is_empty());
        let resource = self
            .optional(&k("resource"), raw.resource)?
            .filter(|s| !s.is_empty());
        let mut extra_params = Vec::with_capacity(raw.extra_params.len());
        for (key, value) in raw.extra_params {
            let kk = format!("{}.{key}", k("extra_params"));
            // `audience` and `resource` may also come through extra_params (configs from before
            // they had keys of their own), but not both ways.
            let twice = (key == "audience" && audience.is_some())
                || (key == "resource" && resource.is_some());
            if RESERVED.contains(&key.as_str()) || twice {
                return Err(self.err(
                    &kk,
                    format!("`{key}` is set by token-proxy itself"),
                    format!("remove it from extra_params; use the credential's own `{key}` key where there is one"),
                ));
            }
            let value = self.expand(&kk, &value)?;
            extra_params.push((key, value));
        }
        let proxy = self.proxy(&k("proxy"), raw.proxy, &token_url)?;
        let (ca_file, token_timeout, refresh_before, default_expires_in) = self.token_client(
            &k,
            raw.ca_file,
            raw.token_timeout_secs,
            raw.refresh_before_secs,
            raw.default_expires_in_secs,
        )?;
        Ok(CredentialConfig {
            proxy,
            scope,
            audience,
            resource,
            ca_file,
            token_timeout,
            refresh_before,
            default_expires_in,
            name,
            token_url,
            client_id,
            client_credential,
            auth_method,
            extra_params,
        })
    }

    /// The token URL of `azure = { cloud, tenant, authority_host }`, with the tenant and the
    /// authority host taken from `AZURE_TENANT_ID` and `AZURE_AUTHORITY_HOST` when left out.
    /// The forward proxy for `dst`: the `proxy` key (`"none"`: direct), else the environment.
    fn proxy(
        &self,
        key: &str,
        raw: Option<String>,
        dst: &Url,
    ) -> Result<Option<ForwardProxy>, ConfigError> {
        let setting = match self.optional(key, raw)? {
            None => ProxySetting::Env,
            Some(v) if v.is_empty() || v == "none" => ProxySetting::Off,
            Some(v) => ProxySetting::Url(Secret::new(v)),
        };
        crate::egress::proxy_for(&setting, dst, self.env).map_err(|e| {
            self.err(
                key,
                e,
                "use proxy = \"http://host:port\" (credentials as http://user:password@host:port), or proxy = \"none\" to connect directly; without the key HTTPS_PROXY / HTTP_PROXY / NO_PROXY decide",
            )
        })
    }

    fn azure_token_url(&self, key: &str, raw: RawAzure) -> Result<Url, ConfigError> {
        let tenant = match raw.tenant {
            Some(t) => self.expand(&format!("{key}.tenant"), &t)?,
            None => (self.env)("AZURE_TENANT_ID").unwrap_or_default(),
        };
        if tenant.is_empty()
            || !tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(self.err(
                &format!("{key}.tenant"),
                format!("{tenant:?} is not a tenant id or domain"),
                "set tenant = \"<tenant id>\" in azure = { … }, or AZURE_TENANT_ID",
            ));
        }
        let host = match (raw.authority_host, raw.cloud) {
            (Some(h), _) => self.expand(&format!("{key}.authority_host"), &h)?,
            (None, Some(cloud)) => {
                let cloud = self.expand(&format!("{key}.cloud"), &cloud)?;
                match AZURE_CLOUDS.iter().find(|(name, _)| *name == cloud) {
                    Some((_, host)) => (*host).to_string(),
                    None => {
                        return Err(self.err(
                            &format!("{key}.cloud"),
                            format!("`{cloud}` is not a known Azure cloud"),
                            "use \"china\" (login.chinacloudapi.cn), \"global\" (login.microsoftonline.com) or \"usgov\" (login.microsoftonline.us), or give authority_host",
                        ))
                    }
                }
            }
            (None, None) => match (self.env)("AZURE_AUTHORITY_HOST").filter(|h| !h.is_empty()) {
                Some(h) => h,
                None => {
                    return Err(self.err(
                        &format!("{key}.cloud"),
                        "is missing (and AZURE_AUTHORITY_HOST is not set)",
                        "add cloud = \"china\", \"global\" or \"usgov\"",
                    ))
                }
            },
        };
        let text = format!("{}/{tenant}/oauth2/v2.0/token", host.trim_end_matches('/'));
        self.http_url(&format!("{key}.authority_host"), &text)
    }

    /// The keys of a credential's token client, shared by every kind: `ca_file` and the
    /// timings, with their defaults.
    fn token_client(
        &self,
        k: &dyn Fn(&str) -> String,
        ca_file: Option<String>,
        token_timeout: Option<f64>,
        refresh_before: Option<f64>,
        default_expires_in: Option<f64>,
    ) -> Result<(Option<PathBuf>, Duration, Duration, Duration), ConfigError> {
        Ok((
            self.path(&k("ca_file"), ca_file)?,
            self.secs(
                &k("token_timeout_secs"),
                token_timeout,
                DEFAULT_TOKEN_TIMEOUT,
            )?,
            self.secs(
                &k("refresh_before_secs"),
                refresh_before,
                DEFAULT_REFRESH_BEFORE,
            )?,
            self.secs(
                &k("default_expires_in_secs"),
                default_expires_in,
                DEFAULT_EXPIRES_IN,
            )?,
        ))
    }

    /// A `managed_identity` credential: no secret, the platform's endpoint, one identity, and
    /// the `scope` as the `resource` the endpoint wants.
    fn managed_identity(
        &self,
        name: String,
        raw: RawCredential,
        table: RawIdentity,
    ) -> Result<CredentialConfig, ConfigError> {
        let k = |field: &str| format!("credentials.{name}.{field}");
        let not_with = [
            ("token_url", raw.token_url.is_some()),
            ("azure", raw.azure.is_some()),
            ("client_id", raw.client_id.is_some()),
            ("client_secret", raw.client_secret.is_some()),
            ("client_secret_file", raw.client_secret_file.is_some()),
            ("private_key_file", raw.private_key_file.is_some()),
            ("certificate_file", raw.certificate_file.is_some()),
            ("assertion_algorithm", raw.assertion_algorithm.is_some()),
            ("client_assertion_file", raw.client_assertion_file.is_some()),
            ("auth_method", raw.auth_method.is_some()),
            ("audience", raw.audience.is_some()),
            ("resource", raw.resource.is_some()),
            ("extra_params", !raw.extra_params.is_empty()),
            ("proxy", raw.proxy.is_some()),
            ("allow_insecure_token_url", raw.allow_insecure_token_url),
        ];
        if let Some((key, _)) = not_with.iter().find(|(_, set)| *set) {
            return Err(self.err(
                &k(key),
                "is set, but a managed identity has no secret and asks the platform's own endpoint",
                format!("remove {key}; for a user-assigned identity write managed_identity = {{ client_id = \"<uuid>\" }}"),
            ));
        }
        let mut ids = Vec::new();
        for (key, value) in [
            ("client_id", table.client_id),
            ("object_id", table.object_id),
            ("resource_id", table.resource_id),
        ] {
            if let Some(v) = self.optional(&k(&format!("managed_identity.{key}")), value)? {
                ids.push((key, v));
            }
        }
        if ids.len() > 1 {
            return Err(self.err(
                &k("managed_identity"),
                format!(
                    "{} are all set",
                    ids.iter()
                        .map(|(k, _)| *k)
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
                "name the user-assigned identity one way: client_id, object_id or resource_id",
            ));
        }
        let endpoint = match (
            self.optional(&k("managed_identity.endpoint"), table.endpoint)?,
            (self.env)("IDENTITY_ENDPOINT").filter(|v| !v.is_empty()),
        ) {
            (Some(text), _) => Some((k("managed_identity.endpoint"), text)),
            (None, Some(text)) => Some(("IDENTITY_ENDPOINT".to_string(), text)),
            (None, None) => None,
        };
        let header = (self.env)("IDENTITY_HEADER").filter(|v| !v.is_empty());
        let (token_url, flavor) = match (endpoint, header) {
            (None, _) => (
                Url::parse(IMDS_TOKEN_URL).expect("a valid URL"),
                IdentityEndpoint::Imds,
            ),
            (Some((key, text)), header) => {
                let url = self.http_url(&key, &text)?;
                match header {
                    Some(h) => (url, IdentityEndpoint::AppService(Secret::new(h))),
                    None if key == "IDENTITY_ENDPOINT" => {
                        return Err(self.err(
                            &k("managed_identity"),
                            "IDENTITY_ENDPOINT is set but IDENTITY_HEADER is not",
                            "App Service, Functions and Container Apps set both; set IDENTITY_HEADER too, or unset IDENTITY_ENDPOINT to use IMDS",
                        ))
                    }
                    None => (url, IdentityEndpoint::Imds),
                }
            }
        };
        let app_service = matches!(flavor, IdentityEndpoint::AppService(_));
        let identity = ids.pop().map(|(key, v)| {
            let param = match (key, app_service) {
                ("client_id", _) => "client_id",
                ("object_id", false) => "object_id",
                ("object_id", true) => "principal_id",
                (_, false) => "msi_res_id",
                (_, true) => "mi_res_id",
            };
            (param, v)
        });
        let scope = match raw.scope {
            Some(Scopes::One(s)) => self.expand(&k("scope"), &s)?,
            Some(Scopes::Many(list)) if list.len() == 1 => self.expand(&k("scope"), &list[0])?,
            Some(Scopes::Many(_)) => {
                return Err(self.err(
                    &k("scope"),
                    "holds several scopes, but a managed identity token is for one resource",
                    "give one scope, such as scope = \"<app-id>/.default\"",
                ))
            }
            None => String::new(),
        };
        let resource = scope.trim().trim_end_matches("/.default").to_string();
        if resource.is_empty() || resource.contains(' ') {
            return Err(self.err(
                &k("scope"),
                "is missing, empty or holds several scopes: a managed identity token is for one resource",
                "set scope = \"<app-id or app-id-uri>/.default\" (sent as resource=<app-id or app-id-uri>)",
            ));
        }
        let (ca_file, token_timeout, refresh_before, default_expires_in) = self.token_client(
            &k,
            raw.ca_file,
            raw.token_timeout_secs,
            raw.refresh_before_secs,
            raw.default_expires_in_secs,
        )?;
        Ok(CredentialConfig {
            proxy: None,
            scope: Some(scope),
            audience: None,
            resource: None,
            ca_file,
            token_timeout,
            refresh_before,
            default_expires_in,
            name,
            token_url,
            client_id: String::new(),
            client_credential: ClientCredential::ManagedIdentity(ManagedIdentity {
                endpoint: flavor,
                identity,
                resource,
            }),
            auth_method: AuthMethod::ClientSecretPost,
            extra_params: Vec::new(),
        })
    }

    /// The one way the client proves its identity: a secret (inline or file), a signing
    /// key with its certificate, or an assertion file (with `azure`, `AZURE_FEDERATED_TOKEN_FILE`
    /// when none is given).
    fn client_credential(
        &self,
        k: &dyn Fn(&str) -> String,
        raw: &RawSecretKeys,
        azure: bool,
    ) -> Result<ClientCredential, ConfigError> {
        let given: Vec<&str> = [
            ("client_secret", raw.client_secret.is_some()),
            ("client_secret_file", raw.client_secret_file.is_some()),
            ("private_key_file", raw.private_key_file.is_some()),
            ("client_assertion_file", raw.client_assertion_file.is_some()),
        ]
        .iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| *name)
        .collect();
        if given.len() > 1 {
            return Err(self.err(
                &k(given[1]),
                format!("{} are all set", given.join(" and ")),
                "keep exactly one way to authenticate the client",
            ));
        }
        if raw.private_key_file.is_none()
            && (raw.certificate_file.is_some() || raw.assertion_algorithm.is_some())
        {
            return Err(self.err(
                &k("private_key_file"),
                "is missing, but certificate_file or assertion_algorithm is set",
                "add private_key_file = \"/path/key.pem\" (the certificate's private key)",
            ));
        }
        if let Some(s) = &raw.client_secret {
            let s = self.expand(&k("client_secret"), s)?;
            if s.is_empty() {
                return Err(self.err(
                    &k("client_secret"),
                    "is empty",
                    "set it, e.g. client_secret = \"${CLIENT_SECRET}\"",
                ));
            }
            return Ok(ClientCredential::Secret(SecretSource::Inline(Secret::new(
                s,
            ))));
        }
        if let Some(p) = self.path(&k("client_secret_file"), raw.client_secret_file.clone())? {
            return Ok(ClientCredential::Secret(SecretSource::File(p)));
        }
        if let Some(key_file) = self.path(&k("private_key_file"), raw.private_key_file.clone())? {
            let certificate_file = self
                .path(&k("certificate_file"), raw.certificate_file.clone())?
                .ok_or_else(|| {
                    self.err(
                        &k("certificate_file"),
                        "is missing",
                        "add certificate_file = \"/path/cert.pem\": its thumbprint names the key to the identity provider",
                    )
                })?;
            let algorithm =
                match self.optional(&k("assertion_algorithm"), raw.assertion_algorithm.clone())? {
                    None => JwtAlgorithm::Rs256,
                    Some(a) => JwtAlgorithm::parse(&a).ok_or_else(|| {
                        self.err(
                            &k("assertion_algorithm"),
                            format!("`{a}` is not supported"),
                            "use \"RS256\" (the default) or \"PS256\"",
                        )
                    })?,
                };
            let files = SigningKeyFiles {
                key_file,
                certificate_file,
                algorithm,
            };
            crate::assertion::SigningKey::load(&files)
                .map_err(|problem| self.err(&k("private_key_file"), problem, "give a PEM RSA private key (2048 bits or more) and the PEM certificate registered for the application"))?;
            return Ok(ClientCredential::PrivateKey(files));
        }
        let assertion_file = match raw.client_assertion_file.clone() {
            Some(f) => Some(f),
            None if azure => (self.env)("AZURE_FEDERATED_TOKEN_FILE").filter(|f| !f.is_empty()),
            None => None,
        };
        if let Some(p) = self.path(&k("client_assertion_file"), assertion_file)? {
            return Ok(ClientCredential::AssertionFile(p));
        }
        Err(self.err(
            &k("client_secret"),
            "is missing: the credential has no way to authenticate",
            "add client_secret = \"${CLIENT_SECRET}\", client_secret_file, private_key_file + certificate_file, or client_assertion_file (AZURE_FEDERATED_TOKEN_FILE with azure = { … })",
        ))
    }

    fn http_url(&self, key: &str, text: &str) -> Result<Url, ConfigError> {
        let url = Url::parse(text).map_err(|e| {
            self.err(
                key,
                format!("`{text}` is not a valid URL: {e}"),
                "write a full URL such as \"https://host/path\"",
            )
        })?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(self.err(
                key,
                format!("scheme `{}` is not supported", url.scheme()),
                "use an http:// or https:// URL",
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(self.err(
                key,
                format!("`{text}` has no host"),
                "write a full URL such as \"https://host/path\"",
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.err(
                key,
                "the URL carries user credentials",
                "remove `user:password@` from the URL; credentials go in client_id and client_secret",
            ));
        }
        if url.fragment().is_some() {
            return Err(self.err(key, "the URL has a #fragment", "remove the #fragment"));
        }
        Ok(url)
    }

    fn route(
        &self,
        i: usize,
        raw: RawRoute,
        credentials: &[CredentialConfig],
    ) -> Result<RouteConfig, ConfigError> {
        let k = |field: &str| format!("routes[{i}].{field}");
        let listen_text = self.required(&k("listen"), raw.listen, "listen = \"127.0.0.1:8080\"")?;
        let listen = match listen_text.strip_prefix("unix:") {
            Some(path) if path.starts_with('/') => ListenAddr::Unix(PathBuf::from(path)),
            Some(_) => {
                return Err(self.err(
                    &k("listen"),
                    format!("`{listen_text}` is not an absolute socket path"),
                    "write listen = \"unix:/run/token-proxy/api.sock\"",
                ))
            }
            None => ListenAddr::Tcp(self.socket_addr(&k("listen"), &listen_text)?),
        };
        let socket_mode = match self.optional(&k("socket_mode"), raw.socket_mode)? {
            None => None,
            Some(text) => match (
                &listen,
                u32::from_str_radix(text.trim_start_matches("0o"), 8),
            ) {
                (ListenAddr::Unix(_), Ok(mode)) if mode <= 0o777 => Some(mode),
                (ListenAddr::Unix(_), _) => {
                    return Err(self.err(
                        &k("socket_mode"),
                        format!("`{text}` is not an octal file mode"),
                        "write e.g. socket_mode = \"0660\"",
                    ))
                }
                (ListenAddr::Tcp(_), _) => {
                    return Err(self.err(
                        &k("socket_mode"),
                        "only applies to unix: listeners",
                        "remove socket_mode, or listen on \"unix:/path\"",
                    ))
                }
            },
        };
        if matches!(listen, ListenAddr::Unix(_)) && !raw.allowed_clients.is_empty() {
            return Err(self.err(
                &k("allowed_clients"),
                "a Unix socket has no client addresses",
                "remove allowed_clients; the socket file's permissions (socket_mode) decide who may connect",
            ));
        }
        let upstream_text = self.required(
            &k("upstream"),
            raw.upstream,
            "upstream = \"https://api.example.com/base\"",
        )?;
        let upstream = self.upstream(&k("upstream"), &upstream_text)?;
        let credential =
            self.required(&k("credential"), raw.credential, "credential = \"NAME\"")?;
        if !credentials.iter().any(|c| c.name == credential) {
            let known: Vec<&str> = credentials.iter().map(|c| c.name.as_str()).collect();
            return Err(self.err(
                &k("credential"),
                format!("no credential is named `{credential}`"),
                format!(
                    "use one of: {} (or add [credentials.{credential}])",
                    known.join(", ")
                ),
            ));
        }
        if listen.tcp().is_some_and(|a| !a.ip().is_loopback()) && !raw.allow_remote {
            return Err(self.err(
                &k("listen"),
                format!("{listen} is not a loopback address: anyone who can reach it could use the credential"),
                "listen on 127.0.0.1, or set allow_remote = true on this route together with inbound_token_file or allowed_clients",
            ));
        }
        if upstream.scheme == Scheme::HTTP
            && !is_local(&upstream.url)
            && !raw.allow_insecure_upstream
        {
            return Err(self.err(
                &k("upstream"),
                format!("{} is plain http to another host: the bearer token would cross the network unencrypted", upstream.url),
                "use https://, or set allow_insecure_upstream = true on this route if the network is trusted",
            ));
        }
        let inbound_token_file = self.path(&k("inbound_token_file"), raw.inbound_token_file)?;
        let inbound_token = match &inbound_token_file {
            Some(path) => Some(read_inbound_token(path).map_err(|problem| {
                self.err(
                    &k("inbound_token_file"),
                    problem,
                    "put a long random value in a file token-proxy can read, e.g. `openssl rand -hex 32 > FILE`",
                )
            })?),
            None => None,
        };
        let mut allowed_clients = Vec::with_capacity(raw.allowed_clients.len());
        for (j, c) in raw.allowed_clients.iter().enumerate() {
            let text = self.expand(&format!("{}[{j}]", k("allowed_clients")), c)?;
            allowed_clients.push(Cidr::parse(&text).ok_or_else(|| {
                self.err(
                    &format!("{}[{j}]", k("allowed_clients")),
                    format!("`{text}` is not an IP network"),
                    "write CIDRs such as \"10.0.0.0/8\" or \"::1/128\"",
                )
            })?);
        }
        let proxy = self.proxy(&k("proxy"), raw.proxy, &upstream.url)?;
        let client_identity = match (
            self.path(&k("client_certificate_file"), raw.client_certificate_file)?,
            self.path(&k("client_key_file"), raw.client_key_file)?,
        ) {
            (None, None) => None,
            (Some(certificate_file), Some(key_file)) => Some(crate::tls::ClientIdentity {
                certificate_file,
                key_file,
            }),
            (cert, _) => {
                let missing = if cert.is_none() {
                    "client_certificate_file"
                } else {
                    "client_key_file"
                };
                return Err(self.err(
                    &k(missing),
                    "is missing: mutual TLS needs both the certificate and its key",
                    "set client_certificate_file and client_key_file together",
                ));
            }
        };
        let path_prefix = self.path_prefix(&k("path_prefix"), raw.path_prefix)?;
        let token_stamp = self.token_stamp(&k(""), raw.token_header, raw.token_format)?;
        let (set_headers, set_header_files) =
            self.set_headers(&k(""), raw.set_headers, raw.set_header_files, &token_stamp)?;
        let name = match raw.name {
            Some(name) => name,
            None => format!("{listen_text}{path_prefix}"),
        };
        Ok(RouteConfig {
            client_identity,
            path_prefix,
            strip_prefix: raw.strip_prefix.unwrap_or(true),
            set_headers,
            set_header_files,
            token_stamp,
            listen,
            socket_mode,
            upstream,
            credential,
            ca_file: self.path(&k("ca_file"), raw.ca_file)?,
            connect_timeout: self.secs(
                &k("connect_timeout_secs"),
                raw.connect_timeout_secs,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            response_timeout: self.secs(
                &k("response_timeout_secs"),
                raw.response_timeout_secs,
                DEFAULT_RESPONSE_TIMEOUT,
            )?,
            token_wait: self.secs(
                &k("token_wait_secs"),
                raw.token_wait_secs,
                DEFAULT_TOKEN_WAIT,
            )?,
            max_body_bytes: raw.max_body_bytes,
            retry_on_401: raw.retry_on_401.unwrap_or(true),
            replay_max_body_bytes: raw
                .replay_max_body_bytes
                .unwrap_or(DEFAULT_REPLAY_MAX_BODY_BYTES),
            inbound_token,
            inbound_token_file,
            allowed_clients,
            name,
            access_log: true,
            proxy,
            upgrades: self.upgrades(&k("upgrades"), raw.upgrades)?,
            rewrite_location: raw.rewrite_location.unwrap_or(true),
            via: raw.via.unwrap_or(true),
        })
    }

    /// The route's `path_prefix`: `/` (every path, kept as `""`) when not set, else an absolute
    /// path of plain segments, its trailing `/` dropped. What matching reads as equal (dot
    /// segments, percent-encoding) is refused here, so that two prefixes never overlap unseen.
    fn path_prefix(&self, key: &str, raw: Option<String>) -> Result<String, ConfigError> {
        let Some(text) = self.optional(key, raw)? else {
            return Ok(String::new());
        };
        let prefix = text.trim_end_matches('/');
        let plain = |segment: &str| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b))
        };
        if !text.starts_with('/') || !prefix.split('/').skip(1).all(plain) {
            return Err(self.err(
                key,
                format!("`{text}` is not a path prefix"),
                "write an absolute path of plain segments, such as path_prefix = \"/graph\" (no `%`, `?`, `#`, `.` or `..` segments, no `//`)",
            ));
        }
        Ok(prefix.to_owned())
    }

    /// A field name a route may set, or the error at `key`.
    fn settable_header(&self, key: &str, name: &str) -> Result<HeaderName, ConfigError> {
        let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            self.err(
                key,
                format!("`{name}` is not a header field name"),
                "write a field name such as \"X-Api-Key\" (letters, digits and -)",
            )
        })?;
        if UNSETTABLE_HEADERS.contains(&parsed.as_str()) {
            return Err(self.err(
                key,
                format!("`{name}` cannot be set: it is hop-by-hop, set by token-proxy itself, or frames the message"),
                "remove it; token-proxy sets Host and the framing, and hop-by-hop fields never reach the upstream",
            ));
        }
        Ok(parsed)
    }

    /// `token_header` and `token_format` (keys under `prefix`, as `routes[0].`).
    fn token_stamp(
        &self,
        prefix: &str,
        header: Option<String>,
        format: Option<String>,
    ) -> Result<TokenStamp, ConfigError> {
        let mut stamp = TokenStamp::default();
        if let Some(name) = self.optional(&format!("{prefix}token_header"), header)? {
            stamp.header = self.settable_header(&format!("{prefix}token_header"), &name)?;
        }
        if let Some(text) = self.optional(&format!("{prefix}token_format"), format)? {
            let key = format!("{prefix}token_format");
            let Some((before, after)) = text.split_once("{token}") else {
                return Err(self.err(&key, format!("`{text}` has no {{token}}"), "write e.g. token_format = \"Bearer {token}\", or \"{token}\" for the bare token"));
            };
            let plain = |s: &str| {
                s.bytes()
                    .all(|b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b))
            };
            if after.contains("{token}") || !plain(before) || !plain(after) {
                return Err(self.err(
                    &key,
                    format!("`{text}` is not a header value with one {{token}}"),
                    "write printable ASCII around exactly one {token}, e.g. \"Bearer {token}\"",
                ));
            }
            stamp.prefix = before.to_owned();
            stamp.suffix = after.to_owned();
        }
        Ok(stamp)
    }

    /// `set_headers` and `set_header_files` (keys under `prefix`): names a route may set, each
    /// once, none the token's own field; values valid header values (never shown in errors:
    /// they are secrets).
    #[allow(clippy::type_complexity)]
    fn set_headers(
        &self,
        prefix: &str,
        inline: Option<BTreeMap<String, String>>,
        files: Option<BTreeMap<String, String>>,
        stamp: &TokenStamp,
    ) -> Result<
        (
            Vec<(HeaderName, Secret)>,
            Vec<(HeaderName, PathBuf, Secret)>,
        ),
        ConfigError,
    > {
        let mut seen: Vec<HeaderName> = Vec::new();
        let mut named = |key: &str, name: &str| -> Result<HeaderName, ConfigError> {
            let header = self.settable_header(key, name)?;
            if header == stamp.header {
                return Err(self.err(
                    key,
                    format!("`{name}` is the field the token goes in (token_header)"),
                    "set it with token_format, or choose another token_header",
                ));
            }
            if seen.contains(&header) {
                return Err(self.err(
                    key,
                    format!("`{name}` is set twice"),
                    "set each field once, in set_headers or set_header_files",
                ));
            }
            seen.push(header.clone());
            Ok(header)
        };
        let mut set = Vec::new();
        for (name, value) in inline.unwrap_or_default() {
            let key = format!("{prefix}set_headers.{name}");
            let header = named(&key, &name)?;
            let value = self.expand(&key, &value)?;
            if HeaderValue::from_str(&value).is_err() {
                return Err(self.err(
                    &key,
                    "the value is not a valid header value (a control character or a line break?)",
                    "give a value of printable characters",
                ));
            }
            set.push((header, Secret::new(value)));
        }
        let mut from_files = Vec::new();
        for (name, path) in files.unwrap_or_default() {
            let key = format!("{prefix}set_header_files.{name}");
            let header = named(&key, &name)?;
            let Some(path) = self.path(&key, Some(path))? else {
                continue;
            };
            let value = read_header_file(&path).map_err(|problem| {
                self.err(&key, problem, "put the value in a file token-proxy can read (surrounding whitespace is ignored)")
            })?;
            from_files.push((header, path, value));
        }
        Ok((set, from_files))
    }

    /// The route's `upgrades`: protocol names as `Upgrade` carries them (`websocket`, or a
    /// name with a version, `name/1.0`); `["websocket"]` when not set. `h2c` is refused: after
    /// an h2c upgrade the client's requests would reach the upstream without the token.
    fn upgrades(&self, key: &str, raw: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
        let Some(list) = raw else {
            return Ok(vec!["websocket".into()]);
        };
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        let mut out = Vec::with_capacity(list.len());
        for entry in list {
            let (name, version) = entry.split_once('/').unwrap_or((&entry, "x"));
            if !token(name) || !token(version) {
                return Err(self.err(
                    key,
                    format!("{entry:?} is not an upgrade protocol name"),
                    "list protocol names as clients send them in `Upgrade`, such as [\"websocket\"]",
                ));
            }
            if name.eq_ignore_ascii_case("h2c") {
                return Err(self.err(
                    key,
                    "\"h2c\" cannot be tunnelled: after the upgrade, the client's requests would reach the upstream without the token",
                    "remove \"h2c\"; HTTP/2 clients reach token-proxy with prior knowledge (h2c without an upgrade), and each of their requests gets the token",
                ));
            }
            out.push(entry.to_ascii_lowercase());
        }
        Ok(out)
    }

    fn upstream(&self, key: &str, text: &str) -> Result<Upstream, ConfigError> {
        let url = self.http_url(key, text)?;
        if url.query().is_some() {
            return Err(self.err(
                key,
                "the upstream URL has a ?query",
                "remove the query; clients send their own",
            ));
        }
        let host = url.host_str().unwrap_or_default();
        let authority_text = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let bad = |_| {
            self.err(
                key,
                format!("`{text}` has an invalid host"),
                "write a host name or IP address",
            )
        };
        let authority: Authority = authority_text.parse().map_err(bad)?;
        let host_header = HeaderValue::from_str(authority.as_str()).map_err(|_| {
            self.err(
                key,
                "the host is not a valid Host header",
                "write a plain host name",
            )
        })?;
        let scheme = if url.scheme() == "https" {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let base_path = url.path().trim_end_matches('/').to_string();
        Ok(Upstream {
            scheme,
            authority,
            host_header,
            base_path,
            url,
        })
    }
}

/// Reads a `set_header_files` file: its trimmed content, which must be a valid header value.
/// The file's bytes are zeroed once the value is copied out.
pub fn read_header_file(path: &Path) -> Result<Secret, String> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    let value = text.trim();
    if value.is_empty() || HeaderValue::from_str(value).is_err() {
        return Err(format!(
            "{} is empty or does not hold a valid header value",
            path.display()
        ));
    }
    Ok(Secret::new(value))
}

/// Reads an inbound token file: the trimmed content, at least 16 characters. The file's bytes
/// are zeroed once the token is copied out.
pub fn read_inbound_token(path: &Path) -> Result<Secret, String> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    let token = text.trim();
    if token.len() < 16 {
        return Err(format!("{} holds fewer than 16 characters", path.display()));
    }
    Ok(Secret::new(token))
}

impl Config {
    /// The credential named `name`.
    pub fn credential(&self, name: &str) -> Option<&CredentialConfig> {
        self.credentials.iter().find(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "ID" => Some("my-id".into()),
            "SECRET" => Some("s3cr3t".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    const GOOD: &str = r#"
admin_listen = "127.0.0.1:9901"
[credentials.api]
token_url = "https://login.example.com/t/oauth2/v2.0/token"
client_id = "${ID}"
client_secret = "${SECRET}"
scope = "app/.default"
extra_params = { Type = "oauth2" }
[[routes]]
listen = "127.0.0.1:8080"
upstream = "https://api.example.com/base/"
credential = "api"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", &env)
    }

    /// One run reports every problem of the file, each named as it would be alone; a route
    /// whose credential has a problem is not judged until that is fixed.
    #[test]
    fn every_problem_is_reported_in_one_run() {
        let text = "workers = 0\n".to_string()
            + &GOOD
                .replace("127.0.0.1:9901", "10.0.0.1:9901")
                .replace("https://login.example.com/t/oauth2/v2.0/token", "not a url")
            + "[[routes]]\nlisten = \"localhost\"\nupstream = \"https://b.example.com\"\ncredential = \"nope\"\n";
        let e = parse(&text).unwrap_err();
        let keys: Vec<&str> = std::iter::once(e.key.as_str())
            .chain(e.also.iter().map(|o| o.key.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                "admin_listen",
                "workers",
                "credentials.api.token_url",
                "routes[1].listen"
            ],
            "{e}"
        );
        let text = e.to_string();
        assert_eq!(
            text.matches("config error in test.toml").count(),
            4,
            "{text}"
        );
        assert_eq!(text.matches("  fix: ").count(), 4, "{text}");
    }

    #[test]
    fn an_empty_environment_variable_is_named() {
        let text = GOOD.replace("/t/oauth2", "/${EMPTY}/oauth2");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, "credentials.api.token_url");
        assert_eq!(e.problem, "environment variable EMPTY is set but empty");
    }

    /// Every key the config takes, at each level, is in README's configuration reference:
    /// the keys come from the parser itself (its unknown-key error lists them).
    #[test]
    fn every_config_key_is_documented() {
        let readme = include_str!("../README.md");
        let keys = |text: &str| -> Vec<String> {
            let e = parse(text).unwrap_err();
            let list = e
                .problem
                .split("expected one of ")
                .nth(1)
                .unwrap_or_else(|| panic!("{e}"));
            list.split(", ")
                .map(|k| k.trim_matches('`').to_string())
                .collect()
        };
        let levels = [
            format!("zz_unknown = 1\n{GOOD}"),
            GOOD.replace("scope = ", "zz_unknown = 1\nscope = "),
            format!("{GOOD}zz_unknown = 1\n"),
        ];
        for text in &levels {
            let found = keys(text);
            assert!(found.len() > 5, "{found:?}");
            for key in found {
                let row = format!("| `{key}` |");
                assert!(
                    readme.contains(&row),
                    "README's configuration reference lacks {row:?}"
                );
            }
        }
    }

    /// Type and structure errors name the dotted key and say what was expected in the
    /// README's words, not serde's.
    #[test]
    fn type_errors_name_the_dotted_key_in_plain_words() {
        let cases = [
            (
                GOOD.replace("scope = \"app/.default\"", "scope = 5"),
                "credentials.api.scope (line 7)",
                "expected a string or a list of strings",
            ),
            (
                GOOD.replace("[[routes]]", "[routes]"),
                "routes (line 9)",
                "expected [[routes]], an array of tables",
            ),
            (
                GOOD.replace("listen = \"127.0.0.1:8080\"", "listen = 8080"),
                "routes[0].listen (line 10)",
                "expected a string",
            ),
            (
                format!("workers = \"two\"\n{GOOD}"),
                "workers (line 1)",
                "expected a whole number, found a string (\"two\")",
            ),
            (
                GOOD.replace("extra_params = { Type = \"oauth2\" }", "extra_params = [1]"),
                "credentials.api.extra_params (line 8)",
                "expected a table",
            ),
        ];
        for (text, key, problem) in cases {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.problem.starts_with(problem), "{problem:?} in {e}");
            assert!(
                !e.problem.contains("enum") && !e.problem.contains("sequence"),
                "{e}"
            );
        }
    }

    #[test]
    fn upgrades_rewrite_location_and_via_have_defaults_and_h2c_is_refused() {
        let route = &parse(GOOD).unwrap().routes[0];
        assert_eq!(route.upgrades, ["websocket"]);
        assert!(route.rewrite_location && route.via);
        let set = parse(&format!(
            "{GOOD}upgrades = [\"WebSocket\", \"example/1.0\"]\nrewrite_location = false\nvia = false\n"
        ))
        .unwrap();
        let route = &set.routes[0];
        assert_eq!(route.upgrades, ["websocket", "example/1.0"]);
        assert!(!route.rewrite_location && !route.via);
        assert!(parse(&format!("{GOOD}upgrades = []\n")).unwrap().routes[0]
            .upgrades
            .is_empty());
        for (bad, says) in [
            ("[\"h2c\"]", "without the token"),
            ("[\"H2C/1\"]", "without the token"),
            ("[\"web socket\"]", "not an upgrade protocol name"),
            ("[\"\"]", "not an upgrade protocol name"),
        ] {
            let e = parse(&format!("{GOOD}upgrades = {bad}\n")).unwrap_err();
            assert_eq!(e.key, "routes[0].upgrades", "{bad}");
            assert!(e.problem.contains(says), "{bad}: {}", e.problem);
        }
    }

    #[test]
    fn good_config_validates_and_expands_env() {
        let c = parse(GOOD).unwrap();
        let cred = &c.credentials[0];
        assert_eq!(cred.client_id, "my-id");
        assert!(
            matches!(&cred.client_credential, ClientCredential::Secret(SecretSource::Inline(s)) if s.expose() == "s3cr3t")
        );
        assert_eq!(
            cred.extra_params,
            vec![("Type".to_string(), "oauth2".to_string())]
        );
        assert_eq!(cred.auth_method, AuthMethod::ClientSecretPost);
        let r = &c.routes[0];
        assert_eq!(r.upstream.base_path, "/base");
        assert_eq!(r.upstream.authority.as_str(), "api.example.com");
        assert_eq!(r.upstream.scheme, Scheme::HTTPS);
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn unknown_key_is_named_with_a_fix() {
        let e = parse(&GOOD.replace("scope =", "scopes ="))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test.toml") && e.contains("scopes") && e.contains("fix:"),
            "{e}"
        );
    }

    #[test]
    fn missing_env_var_is_named() {
        let e = parse(&GOOD.replace("${SECRET}", "${NOPE_NOT_SET}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("NOPE_NOT_SET") && e.contains("credentials.api.client_secret"),
            "{e}"
        );
    }

    #[test]
    fn bad_urls_are_refused() {
        for bad in [
            "ftp://x/y",
            "not a url",
            "https://user:pw@host/",
            "https://host/?q=1",
            "https://host/#top",
        ] {
            let e = parse(&GOOD.replace("https://api.example.com/base/", bad))
                .unwrap_err()
                .to_string();
            assert!(e.contains("routes[0].upstream"), "{bad}: {e}");
        }
        // Credentials in the token URL would be sent (and logged) with every request.
        for (bad, fix) in [
            (
                "https://user:pw@login.example.com/t",
                "remove `user:password@`",
            ),
            (
                "https://user@login.example.com/t",
                "remove `user:password@`",
            ),
            ("https://login.example.com/t#frag", "remove the #fragment"),
        ] {
            let e = parse(&GOOD.replace("https://login.example.com/t/oauth2/v2.0/token", bad))
                .unwrap_err();
            assert_eq!(e.key, "credentials.api.token_url", "{bad}: {e}");
            assert!(e.to_string().contains(fix), "{bad}: {e}");
            assert!(
                !e.to_string().contains("pw@"),
                "the password is not echoed: {e}"
            );
        }
    }

    #[test]
    fn route_must_name_a_known_credential() {
        let e = parse(&GOOD.replace("credential = \"api\"", "credential = \"other\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("routes[0].credential") && e.contains("api"),
            "{e}"
        );
    }

    #[test]
    fn remote_listeners_and_insecure_upstreams_need_opt_in() {
        let remote = GOOD.replace("listen = \"127.0.0.1:8080\"", "listen = \"0.0.0.0:8080\"");
        let e = parse(&remote).unwrap_err().to_string();
        assert!(
            e.contains("routes[0].listen") && e.contains("allow_remote"),
            "{e}"
        );
        assert!(parse(&remote.replace(
            "credential = \"api\"",
            "credential = \"api\"\nallow_remote = true"
        ))
        .is_ok());

        let e = parse(&GOOD.replace(
            "admin_listen = \"127.0.0.1:9901\"",
            "admin_listen = \"0.0.0.0:9901\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("admin_allow_remote"), "{e}");

        let plain = GOOD.replace(
            "https://api.example.com/base/",
            "http://api.example.com/base/",
        );
        let e = parse(&plain).unwrap_err().to_string();
        assert!(
            e.contains("routes[0].upstream") && e.contains("allow_insecure_upstream"),
            "{e}"
        );
        assert!(parse(&plain.replace(
            "credential = \"api\"",
            "credential = \"api\"\nallow_insecure_upstream = true"
        ))
        .is_ok());
        assert!(
            parse(&GOOD.replace("https://api.example.com/base/", "http://127.0.0.1:9000/")).is_ok()
        );
    }

    #[test]
    fn an_upstream_pointing_at_the_proxy_itself_is_refused() {
        for up in [
            "http://127.0.0.1:8080/",
            "http://localhost:8080",
            "http://127.0.0.1:9901",
        ] {
            let e = parse(&GOOD.replace("https://api.example.com/base/", up))
                .unwrap_err()
                .to_string();
            assert!(e.contains("loop"), "{up}: {e}");
        }
    }

    #[test]
    fn unix_listeners_take_a_mode_and_no_client_networks() {
        let unix = GOOD.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"unix:/run/tp/api.sock\"\nsocket_mode = \"0660\"",
        );
        let c = parse(&unix).unwrap();
        assert_eq!(
            c.routes[0].listen,
            ListenAddr::Unix("/run/tp/api.sock".into())
        );
        assert_eq!(c.routes[0].socket_mode, Some(0o660));
        let e = parse(&unix.replace("\"0660\"", "\"rw\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("socket_mode"), "{e}");
        let e = parse(&GOOD.replace(
            "credential = \"api\"",
            "credential = \"api\"\nsocket_mode = \"0600\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("only applies to unix"), "{e}");
        let e = parse(&unix.replace(
            "credential = \"api\"",
            "credential = \"api\"\nallowed_clients = [\"10.0.0.0/8\"]",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("no client addresses"), "{e}");
        let e = parse(&GOOD.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"unix:relative.sock\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("absolute"), "{e}");
    }

    #[test]
    fn loops_through_any_spelling_of_loopback_are_refused() {
        let e = parse(&GOOD.replace(
            "https://api.example.com/base/",
            "http://[::ffff:127.0.0.1]:8080",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("loop"), "{e}");
        assert!(
            parse(&GOOD.replace("https://api.example.com/base/", "http://127.0.0.2:8080")).is_ok()
        );
    }

    #[test]
    fn plain_http_token_urls_to_other_hosts_need_opt_in() {
        let plain = GOOD.replace("https://login.example.com", "http://login.example.com");
        let e = parse(&plain).unwrap_err().to_string();
        assert!(
            e.contains("credentials.api.token_url") && e.contains("allow_insecure_token_url"),
            "{e}"
        );
        assert!(
            parse(&plain.replace("scope =", "allow_insecure_token_url = true\nscope =")).is_ok()
        );
    }

    #[test]
    fn cidrs_match_their_networks() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("192.0.2.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none() && Cidr::parse("nope").is_none());
        let e = parse(&GOOD.replace(
            "credential = \"api\"",
            "credential = \"api\"\nallowed_clients = [\"10.0.0.0/8\", \"bad\"]",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("routes[0].allowed_clients[1]"), "{e}");
    }

    #[test]
    fn secret_and_secret_file_conflict() {
        let e = parse(&GOOD.replace("scope =", "client_secret_file = \"/x\"\nscope ="))
            .unwrap_err()
            .to_string();
        assert!(e.contains("keep exactly one way"), "{e}");
    }

    fn azure_cred(cred: &str) -> String {
        format!(
            "[credentials.api]\n{cred}\n[[routes]]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://api.example.cn\"\ncredential = \"api\"\n"
        )
    }

    #[test]
    fn azure_derives_the_token_url_per_cloud_and_reads_the_workload_identity_env() {
        let c = parse(&azure_cred(
            "azure = { cloud = \"china\", tenant = \"contoso.partner.onmschina.cn\" }\nclient_id = \"id\"\nclient_secret = \"s\"",
        ))
        .unwrap();
        assert_eq!(
            c.credentials[0].token_url.as_str(),
            "https://login.chinacloudapi.cn/contoso.partner.onmschina.cn/oauth2/v2.0/token"
        );
        assert_eq!(c.credentials[0].kind(), "client_secret_post");
        for (cloud, host) in [
            ("global", "login.microsoftonline.com"),
            ("usgov", "login.microsoftonline.us"),
        ] {
            let c = parse(&azure_cred(&format!(
                "azure = {{ cloud = \"{cloud}\", tenant = \"t\" }}\nclient_id = \"id\"\nclient_secret = \"s\""
            )))
            .unwrap();
            assert_eq!(
                c.credentials[0].token_url.as_str(),
                format!("https://{host}/t/oauth2/v2.0/token")
            );
        }

        // AKS workload identity: nothing but `azure = {}`; the webhook's variables do the rest.
        let token_file = std::env::temp_dir().join(format!("tp-fed-{}", std::process::id()));
        std::fs::write(&token_file, "eyJ.fake.jwt").unwrap();
        let file = token_file.display().to_string();
        let env = |name: &str| match name {
            "AZURE_CLIENT_ID" => Some("wi-client".to_string()),
            "AZURE_TENANT_ID" => Some("wi-tenant".to_string()),
            "AZURE_AUTHORITY_HOST" => Some("https://login.chinacloudapi.cn/".to_string()),
            "AZURE_FEDERATED_TOKEN_FILE" => Some(file.clone()),
            _ => None,
        };
        let c = Config::parse(&azure_cred("azure = {}"), "test.toml", &env).unwrap();
        let cred = &c.credentials[0];
        assert_eq!(cred.client_id, "wi-client");
        assert_eq!(
            cred.token_url.as_str(),
            "https://login.chinacloudapi.cn/wi-tenant/oauth2/v2.0/token"
        );
        assert_eq!(cred.kind(), "client_assertion_file");
        assert_eq!(
            cred.client_credential,
            ClientCredential::AssertionFile(token_file.clone())
        );
        std::fs::remove_file(&token_file).unwrap();
    }

    #[test]
    fn credential_kind_errors_name_the_key_and_the_fix() {
        let cases = [
            ("azure = { cloud = \"mars\", tenant = \"t\" }\nclient_id = \"i\"\nclient_secret = \"s\"", "credentials.api.azure.cloud", "china"),
            ("azure = { cloud = \"china\" }\nclient_id = \"i\"\nclient_secret = \"s\"", "credentials.api.azure.tenant", "AZURE_TENANT_ID"),
            ("token_url = \"https://t/\"\nazure = { cloud = \"china\", tenant = \"t\" }\nclient_id = \"i\"\nclient_secret = \"s\"", "credentials.api.azure", "keep one"),
            ("azure = { cloud = \"china\", tenant = \"t\" }\nclient_secret = \"s\"", "credentials.api.client_id", "AZURE_CLIENT_ID"),
            ("token_url = \"https://t/\"\nclient_id = \"i\"", "credentials.api.client_secret", "private_key_file"),
            ("token_url = \"https://t/\"\nclient_id = \"i\"\nclient_secret = \"s\"\ncertificate_file = \"/c.pem\"", "credentials.api.private_key_file", "private key"),
            ("token_url = \"https://t/\"\nclient_id = \"i\"\nclient_secret = \"s\"\nauth_method = \"private_key_jwt\"", "credentials.api.auth_method", "client_secret_post"),
            ("token_url = \"https://t/\"\nclient_id = \"i\"\nclient_secret = \"s\"\nscope = [\"a\", \"b c\"]", "credentials.api.scope[1]", "own string"),
            ("token_url = \"https://t/\"\nclient_id = \"i\"\nclient_secret = \"s\"\nresource = \"r\"\nextra_params = { resource = \"r\" }", "credentials.api.extra_params.resource", "own `resource` key"),
        ];
        for (cred, key, fix) in cases {
            let e = parse(&azure_cred(cred)).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.to_string().contains(fix), "{e}");
        }
    }

    #[test]
    fn several_scopes_audience_and_resource() {
        let c = parse(&azure_cred(
            "token_url = \"https://t/\"\nclient_id = \"i\"\nclient_secret = \"s\"\nscope = [\"api.read\", \"api.write\"]\naudience = \"urn:aud\"\nextra_params = { resource = \"https://r/\" }",
        ))
        .unwrap();
        let cred = &c.credentials[0];
        assert_eq!(cred.scope.as_deref(), Some("api.read api.write"));
        assert_eq!(cred.audience.as_deref(), Some("urn:aud"));
        assert_eq!(
            cred.extra_params,
            vec![("resource".to_string(), "https://r/".to_string())]
        );
    }

    #[test]
    fn the_shipped_example_configs_are_valid() {
        let env = |name: &str| {
            // Not the proxy variables, nor App Service's identity endpoint: unset, as on a VM.
            let upper = name.to_ascii_uppercase();
            (!upper.contains("PROXY") && !upper.starts_with("IDENTITY_"))
                .then(|| "value-from-env".to_string())
        };
        for (name, text) in [
            (
                "config/example.toml",
                include_str!("../config/example.toml"),
            ),
            (
                "config/azure-china.toml",
                include_str!("../config/azure-china.toml"),
            ),
            (
                "config/one-port.toml",
                include_str!("../config/one-port.toml"),
            ),
            ("config/apim.toml", include_str!("../config/apim.toml")),
            (
                "config/managed-identity.toml",
                include_str!("../config/managed-identity.toml"),
            ),
        ] {
            // The files a config reads at load, where a test can make them.
            let key = std::env::temp_dir().join(format!("tp-example-key-{}", std::process::id()));
            std::fs::write(&key, "example-key").unwrap();
            let text = text.replace("/run/secrets/api-key", key.to_str().unwrap());
            if let Err(e) = Config::parse(&text, name, &env) {
                panic!("{e}");
            }
        }
    }
}
