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

/// Why a listen address cannot be bound, and what would fix it.
#[derive(Debug)]
pub struct BindFailure {
    pub why: String,
    pub fix: &'static str,
}

/// Tries to bind `listen` as `run` would, and releases it at once.
///
/// A Unix socket path is judged as `run` judges it, without disturbing what is there: a socket
/// another process serves is in use; a stale socket file (nothing answers) is one `run`
/// replaces; a path that does not exist is bound and its file removed again; anything else at
/// the path (a regular file, a directory) cannot be bound.
pub fn bind(listen: &ListenAddr) -> Result<&'static str, BindFailure> {
    const IN_USE: &str = "stop what holds it, or choose another address";
    match listen {
        ListenAddr::Tcp(addr) => std::net::TcpListener::bind(addr)
            .map(|_| "can be bound")
            .map_err(|e| BindFailure {
                why: format!("cannot be bound: {e}"),
                fix: IN_USE,
            }),
        ListenAddr::Unix(path) => {
            use std::os::unix::fs::FileTypeExt;
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_socket() => {
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        Err(BindFailure {
                            why: "cannot be bound: another process is serving this socket".into(),
                            fix: IN_USE,
                        })
                    } else {
                        Ok("a stale socket file, which run replaces")
                    }
                }
                Ok(_) => Err(BindFailure {
                    why: "cannot be bound: the path exists and is not a socket".into(),
                    fix: "remove what is at the path, or choose another path",
                }),
                Err(_) => match std::os::unix::net::UnixListener::bind(path) {
                    Ok(listener) => {
                        drop(listener);
                        let _ = std::fs::remove_file(path);
                        Ok("can be bound")
                    }
                    Err(e) => Err(BindFailure {
                        why: format!("cannot be bound: {e}"),
                        fix:
                            "create the socket's directory, and let token-proxy's user write to it",
                    }),
                },
            }
        }
    }
}

/// Connects to the route's upstream as the proxy would: TCP within `connect_timeout`, then
/// for `https` a TLS handshake verified with the route's trust settings, offering `h2` and
/// `http/1.1`. Says what it reached, or why it could not.
///
/// Through a forward proxy, an `https` upstream is reached through the proxy's `CONNECT`
/// tunnel, as requests are, and its TLS is tried inside it. A plain-`http` upstream is asked
/// of the proxy request by request, so only the proxy is reached: sending a request to try
/// the upstream could have effects there.
pub async fn upstream(route: &RouteConfig) -> Result<String, String> {
    let upstream = &route.upstream;
    let https = upstream.scheme == http::uri::Scheme::HTTPS;
    let host = upstream
        .authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = upstream
        .authority
        .port_u16()
        .unwrap_or(if https { 443 } else { 80 });
    let limit = route.connect_timeout;
    let (tcp, via) = match &route.proxy {
        None => (
            within(limit, tokio::net::TcpStream::connect((host.as_str(), port)))
                .await
                .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?,
            String::new(),
        ),
        Some(p) if !https => {
            let (phost, pport) = p.host_port();
            within(limit, tokio::net::TcpStream::connect((phost, pport)))
                .await
                .map_err(|e| format!("cannot connect to forward proxy {}: {e}", p.uri()))?;
            return Ok(format!(
                "TCP connection to forward proxy {} ok (a plain-http upstream is asked of the proxy per request, not tried here)",
                p.uri()
            ));
        }
        Some(p) => {
            let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
            http.enforce_http(false);
            http.set_connect_timeout(Some(limit));
            let mut tunnel = crate::egress::Connector::new(http, Some(p));
            let dst: http::Uri = format!("https://{}:{port}/", upstream.authority.host())
                .parse()
                .map_err(|e| format!("{host} is not a host name: {e}"))?;
            let io = tokio::time::timeout(limit, tower_service::Service::call(&mut tunnel, dst))
                .await
                .map_err(|_| {
                    format!(
                        "no tunnel through forward proxy {} within {} s (connect_timeout_secs)",
                        p.uri(),
                        limit.as_secs_f64()
                    )
                })?
                .map_err(|e| {
                    let e: &(dyn std::error::Error + 'static) = &*e;
                    let mut why = e.to_string();
                    for cause in crate::errors::causes(e) {
                        why = format!("{why}: {cause}");
                    }
                    format!(
                        "cannot tunnel to {host}:{port} through forward proxy {}: {why}",
                        p.uri()
                    )
                })?;
            (
                io.into_inner(),
                format!(" through forward proxy {}", p.uri()),
            )
        }
    };
    if !https {
        return Ok(format!("TCP connection to {host}:{port} ok"));
    }
    let mut config = tls::client_config(route.ca_file.as_deref(), route.client_identity.as_ref())
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("{host} is not a TLS server name: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = within(limit, connector.connect(name, tcp))
        .await
        .map_err(|e| format!("TLS with {host}:{port}{via} failed: {e}"))?;
    let alpn = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => "h2",
        Some(b"http/1.1") => "http/1.1",
        _ => "no protocol chosen by ALPN (HTTP/1.1)",
    };
    Ok(format!(
        "TLS with {host}:{port}{via} ok (certificate verified, {alpn})"
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
