//! What `check` tries beyond the config and the token endpoints: that each route's listen
//! address can be bound (then released at once), and that each upstream answers a connection,
//! with TLS verified by the route's own trust settings (`ca_file`, `client_certificate_file`).
//!
//! Why: a config can be valid and still fail at start (a port in use) or at the first request
//! (an upstream unreachable, a private CA missing). `check` says so before `run` is tried.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{ListenAddr, RouteConfig};
use crate::tls;

/// Tries to bind `listen`, and releases it. A Unix socket path is not tried: binding it
/// would replace a socket a running token-proxy serves.
pub fn bind(listen: &ListenAddr) -> Result<&'static str, String> {
    match listen {
        ListenAddr::Tcp(addr) => std::net::TcpListener::bind(addr)
            .map(|_| "can be bound")
            .map_err(|e| format!("cannot be bound: {e}")),
        ListenAddr::Unix(_) => Ok("a Unix socket, not tried"),
    }
}

/// Connects to the route's upstream as the proxy would: TCP within `connect_timeout`, then
/// for `https` a TLS handshake verified with the route's trust settings, offering `h2` and
/// `http/1.1`. Says what it reached, or why it could not. Through a forward proxy, only the
/// forward proxy is reached.
pub async fn upstream(route: &RouteConfig) -> Result<String, String> {
    let upstream = &route.upstream;
    let https = upstream.scheme == http::uri::Scheme::HTTPS;
    let (host, port, via) = match &route.proxy {
        Some(p) => {
            let (host, port) = p.host_port();
            (
                host.to_owned(),
                port,
                format!(" (forward proxy {})", p.uri()),
            )
        }
        None => (
            upstream
                .authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            upstream
                .authority
                .port_u16()
                .unwrap_or(if https { 443 } else { 80 }),
            String::new(),
        ),
    };
    let limit = route.connect_timeout;
    let tcp = within(limit, tokio::net::TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}{via}: {e}"))?;
    if !https || route.proxy.is_some() {
        return Ok(format!("TCP connection to {host}:{port}{via} ok"));
    }
    let mut config = tls::client_config(route.ca_file.as_deref(), route.client_identity.as_ref())
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("{host} is not a TLS server name: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = within(limit, connector.connect(name, tcp))
        .await
        .map_err(|e| format!("TLS with {host}:{port} failed: {e}"))?;
    let alpn = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => "h2",
        Some(b"http/1.1") => "http/1.1",
        _ => "no protocol chosen by ALPN (HTTP/1.1)",
    };
    Ok(format!(
        "TLS with {host}:{port} ok (certificate verified, {alpn})"
    ))
}

/// `io` within `limit`, a timeout read as an error.
async fn within<T>(
    limit: Duration,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    match tokio::time::timeout(limit, io).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer within {} s (connect_timeout_secs)",
                limit.as_secs_f64()
            ),
        )),
    }
}
