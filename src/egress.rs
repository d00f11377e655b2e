//! Outbound (forward) HTTP proxies between token-proxy and the token endpoint or the upstream,
//! as corporate networks require them.
//!
//! Each credential and route has a fixed destination, so the proxy is decided once, when the
//! config is loaded: the `proxy` key if set (`"none"` for a direct connection), else the usual
//! environment variables (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`, upper or
//! lower case, with curl's rules as hyper-util's matcher implements them). Loopback
//! destinations never go through an environment proxy (a sidecar's own upstream or token
//! endpoint on `127.0.0.1` is not meant for the corporate proxy), only through an explicit
//! `proxy` key.
//!
//! HTTPS destinations are reached through a `CONNECT` tunnel; plain `http` ones by sending the
//! request in absolute form to the proxy. Proxy credentials (`http://user:pass@proxy:3128`)
//! become a `Proxy-Authorization: Basic` header that is marked sensitive and never shown:
//! `Debug` and messages show the proxy without them.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A forward proxy to connect through.
#[derive(Clone, PartialEq)]
pub struct ForwardProxy {
    /// `http://host:port`, without credentials.
    uri: Uri,
    /// `Basic …` from the proxy URL's credentials.
    auth: Option<HeaderValue>,
}

impl std::fmt::Debug for ForwardProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardProxy")
            .field("uri", &self.uri)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl std::fmt::Display for ForwardProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.uri)
    }
}

impl ForwardProxy {
    /// The proxy's address, as an `http://host:port` URI without credentials.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The proxy's host (brackets removed from an IPv6 address) and port.
    pub fn host_port(&self) -> (&str, u16) {
        let host = self.uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (host, self.uri.port_u16().unwrap_or(80))
    }

    /// The `Proxy-Authorization` value, marked sensitive, if the proxy URL had credentials.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper-util's TCP connector, direct or through a forward proxy's `CONNECT` tunnel; what the
/// upstream's TLS connector wraps.
#[derive(Clone)]
pub enum Connector {
    /// Straight to the destination.
    Direct(HttpConnector),
    /// Through the proxy: `CONNECT host:port`, then the destination's bytes.
    Tunnel(Tunnel<HttpConnector>),
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the tunnel's fields: they hold the Proxy-Authorization value.
        f.write_str(match self {
            Connector::Direct(_) => "Connector::Direct",
            Connector::Tunnel(_) => "Connector::Tunnel",
        })
    }
}

impl Connector {
    /// `http` through `proxy` if there is one.
    pub fn new(http: HttpConnector, proxy: Option<&ForwardProxy>) -> Connector {
        match proxy {
            None => Connector::Direct(http),
            Some(p) => {
                let tunnel = Tunnel::new(p.uri.clone(), http);
                Connector::Tunnel(match &p.auth {
                    Some(auth) => tunnel.with_auth(auth.clone()),
                    None => tunnel,
                })
            }
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Connector::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Connector::Tunnel(t) => t.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self {
            Connector::Direct(c) => {
                let connecting = c.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
            Connector::Tunnel(t) => {
                // hyper-util's tunnel assumes port 443 when the URI has none: name it.
                let dst = match (dst.port_u16(), dst.scheme_str(), dst.host()) {
                    (None, Some("http"), Some(host)) => {
                        format!("http://{host}:80/").parse().unwrap_or(dst)
                    }
                    _ => dst,
                };
                let connecting = t.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
        }
    }
}

/// Which proxy a destination uses, as the config says it.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxySetting {
    /// From the environment (the default).
    Env,
    /// Never a proxy (`proxy = "none"`).
    Off,
    /// This proxy URL (`proxy = "http://…"`), kept as written for `Debug`-safe re-parsing.
    Url(crate::secret::Secret),
}

/// Why a proxy setting is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProxyError(pub String);

/// The proxy for `dst` under `setting`, reading the environment through `env`.
pub fn proxy_for(
    setting: &ProxySetting,
    dst: &url::Url,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<ForwardProxy>, ProxyError> {
    let dst_uri: Uri = dst
        .as_str()
        .parse()
        .map_err(|e| ProxyError(format!("destination {dst}: {e}")))?;
    let matcher = match setting {
        ProxySetting::Off => return Ok(None),
        ProxySetting::Url(url) => {
            check_proxy_url(url.expose(), "proxy")?;
            Matcher::builder().all(url.expose().to_string()).build()
        }
        ProxySetting::Env => {
            if is_local(dst) {
                return Ok(None);
            }
            let first =
                |names: [&str; 2]| names.iter().find_map(|n| env(n).filter(|v| !v.is_empty()));
            let all = first(["ALL_PROXY", "all_proxy"]);
            let http = first(["HTTP_PROXY", "http_proxy"]);
            let https = first(["HTTPS_PROXY", "https_proxy"]);
            let chosen = match dst.scheme() {
                "https" => https.as_ref().map(|v| (v, "HTTPS_PROXY")),
                _ => http.as_ref().map(|v| (v, "HTTP_PROXY")),
            }
            .or(all.as_ref().map(|v| (v, "ALL_PROXY")));
            if let Some((value, name)) = chosen {
                check_proxy_url(value, name)?;
            }
            let mut builder = Matcher::builder();
            if let Some(v) = all {
                builder = builder.all(v);
            }
            if let Some(v) = http {
                builder = builder.http(v);
            }
            if let Some(v) = https {
                builder = builder.https(v);
            }
            if let Some(v) = first(["NO_PROXY", "no_proxy"]) {
                builder = builder.no(v);
            }
            builder.build()
        }
    };
    Ok(matcher.intercept(&dst_uri).map(|i| {
        let mut auth = i.basic_auth().cloned();
        if let Some(a) = auth.as_mut() {
            a.set_sensitive(true);
        }
        ForwardProxy {
            uri: strip_userinfo(i.uri()),
            auth,
        }
    }))
}

/// Only `http://host:port` proxies are supported (the connection to the proxy itself is
/// plain; HTTPS destinations still get end-to-end TLS through the tunnel).
fn check_proxy_url(value: &str, name: &str) -> Result<(), ProxyError> {
    let shown = redact(value);
    let url = url::Url::parse(value)
        .map_err(|e| ProxyError(format!("{name} {shown:?} is not a URL: {e}")))?;
    if url.scheme() != "http" || url.host().is_none() {
        return Err(ProxyError(format!(
            "{name} {shown:?}: only http://host:port proxies are supported"
        )));
    }
    Ok(())
}

/// Whether `url` points at this machine (a loopback address, IPv4-mapped ones included, or
/// `localhost`). Also what the config's plain-http checks use.
pub fn is_local(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => std::net::IpAddr::V6(ip).to_canonical().is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn strip_userinfo(uri: &Uri) -> Uri {
    let authority = uri.authority().map(|a| {
        let s = a.as_str();
        s.rsplit_once('@')
            .map_or(s, |(_, hostport)| hostport)
            .to_string()
    });
    let text = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("http"),
        authority.unwrap_or_default()
    );
    text.parse().unwrap_or_else(|_| uri.clone())
}

/// A proxy URL for messages: credentials replaced.
pub fn redact(value: &str) -> String {
    match url::Url::parse(value) {
        Ok(mut url) if !url.username().is_empty() || url.password().is_some() => {
            let _ = url.set_username("<redacted>");
            let _ = url.set_password(None);
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => "<unparsable>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn the_environment_decides_by_scheme_with_no_proxy_and_never_for_loopback() {
        let vars = [
            ("HTTPS_PROXY", "http://user:p%40ss@proxy.corp:3128"),
            ("http_proxy", "http://plain.corp:8080"),
            ("NO_PROXY", ".internal.example,10.0.0.0/8"),
        ];
        let e = env(&vars);
        let p = proxy_for(
            &ProxySetting::Env,
            &url("https://login.chinacloudapi.cn/t/oauth2/v2.0/token"),
            &e,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.uri().to_string(), "http://proxy.corp:3128/");
        assert_eq!(p.host_port(), ("proxy.corp", 3128));
        let auth = p.authorization().unwrap();
        assert!(auth.is_sensitive());
        assert!(!format!("{p:?} {p}").contains("p%40ss") && !format!("{p:?}").contains("Basic"));
        let http = proxy_for(&ProxySetting::Env, &url("http://api.example.cn/"), &e)
            .unwrap()
            .unwrap();
        assert_eq!(http.host_port(), ("plain.corp", 8080));
        assert!(http.authorization().is_none());
        for direct in [
            "https://svc.internal.example/",
            "https://10.1.2.3/",
            "http://127.0.0.1:9000/",
            "https://localhost/",
            "http://[::1]:80/",
        ] {
            assert_eq!(
                proxy_for(&ProxySetting::Env, &url(direct), &e).unwrap(),
                None,
                "{direct}"
            );
        }
        assert_eq!(
            proxy_for(&ProxySetting::Env, &url("https://a.example/"), &env(&[])).unwrap(),
            None
        );
    }

    #[test]
    fn an_explicit_proxy_applies_even_to_loopback_and_none_turns_it_off() {
        let e = env(&[("HTTPS_PROXY", "http://proxy.corp:3128")]);
        let setting = ProxySetting::Url(Secret::new("http://u:pw@127.0.0.1:8888"));
        let p = proxy_for(&setting, &url("http://127.0.0.1:9000/"), &e)
            .unwrap()
            .unwrap();
        assert_eq!(p.host_port(), ("127.0.0.1", 8888));
        assert!(p.authorization().is_some());
        assert_eq!(
            proxy_for(&ProxySetting::Off, &url("https://a.example/"), &e).unwrap(),
            None
        );
    }

    #[test]
    fn unusable_proxy_urls_are_refused_without_showing_credentials() {
        let e = proxy_for(
            &ProxySetting::Url(Secret::new("socks5://u:topsecret@proxy:1080")),
            &url("https://a.example/"),
            &env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("only http://") && !e.contains("topsecret"),
            "{e}"
        );
        let e = proxy_for(
            &ProxySetting::Env,
            &url("https://a.example/"),
            &env(&[("HTTPS_PROXY", "https://u:topsecret@proxy:443")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("HTTPS_PROXY") && !e.contains("topsecret"), "{e}");
    }
}
