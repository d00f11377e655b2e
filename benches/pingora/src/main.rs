//! Pingora as a benchmark peer of token-proxy (see benches/README.md): a reverse proxy that
//! sends every request to one upstream and sets the same static `Authorization` header as the
//! other peers (nginx `proxy_set_header`, HAProxy `set-header`, Caddy `header_up`).
//!
//! Usage: `pingora-peer CONFIG.yaml` (or `--version`). benches/run.py writes the file into
//! target/bench/configs/. It is Pingora's own `ServerConf` (threads, upstream keep-alive pool,
//! CA file, shutdown timings: Pingora ignores keys it does not know) plus a `peer:` section that
//! this program reads: where to listen and forward, TLS, SNI, ALPN, the header value.
//!
//! Nothing is logged per request (`ProxyHttp::logging` is left empty, as every peer runs
//! without an access log); warnings and errors go to stderr.

use async_trait::async_trait;
use http::HeaderValue;
use pingora_core::apps::HttpServerOptions;
use pingora_core::protocols::ALPN;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;
use pingora_http::RequestHeader;
use pingora_proxy::{ProxyHttp, Session};
use serde::Deserialize;

/// The `peer:` section of the configuration file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerConf {
    /// The client-facing address, e.g. 127.0.0.1:8080 (plain HTTP).
    listen: String,
    /// Also serve HTTP/2 with prior knowledge (h2c) on `listen`: Pingora peeks for the h2
    /// preface and otherwise speaks HTTP/1.1.
    h2c: bool,
    /// The upstream's address, ip:port (dialled by address: no resolver).
    upstream: String,
    /// TLS to the upstream. Verification is Pingora's default (on, certificate and name),
    /// against the roots in ServerConf's `ca_file`.
    tls: bool,
    /// The name sent as SNI and verified against the upstream's certificate.
    #[serde(default)]
    sni: String,
    /// Offer h2 and http/1.1 by ALPN (`ALPN::H2H1`); otherwise http/1.1 only. TLS only.
    #[serde(default)]
    offer_h2: bool,
    /// Concurrent streams per upstream h2 connection (Pingora's default is 1).
    #[serde(default = "one")]
    max_h2_streams: usize,
    /// The value of the Authorization header set on every forwarded request.
    authorization: String,
}

fn one() -> usize {
    1
}

#[derive(Deserialize)]
struct ConfFile {
    peer: PeerConf,
}

struct Peer {
    /// Cloned for every request; connections are pooled by the peer's hash (address, scheme,
    /// SNI, options), which the clones share, so they all reuse one pool.
    upstream: HttpPeer,
    authorization: HeaderValue,
}

#[async_trait]
impl ProxyHttp for Peer {
    type CTX = ();
    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.upstream.clone()))
    }

    async fn upstream_request_filter(
        &self,
        _: &mut Session,
        req: &mut RequestHeader,
        _: &mut (),
    ) -> Result<()> {
        // Replaces any Authorization the client sent, as the other peers do.
        req.insert_header(http::header::AUTHORIZATION, self.authorization.clone())
    }
}

/// Warnings and errors to stderr; Pingora logs through the `log` crate.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("{} {}: {}", r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    if arg == "--version" {
        println!("pingora-peer {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if arg.is_empty() || arg.starts_with('-') {
        eprintln!("usage: pingora-peer CONFIG.yaml | --version");
        std::process::exit(2);
    }
    log::set_logger(&StderrLog).expect("logger");
    log::set_max_level(log::LevelFilter::Warn);

    let text = std::fs::read_to_string(&arg).unwrap_or_else(|e| panic!("{arg}: {e}"));
    let peer: PeerConf = serde_yaml::from_str::<ConfFile>(&text)
        .unwrap_or_else(|e| panic!("{arg}: peer section: {e}"))
        .peer;
    let conf = ServerConf::from_yaml(&text).unwrap_or_else(|e| panic!("{arg}: {e}"));

    let mut upstream = HttpPeer::new(peer.upstream.as_str(), peer.tls, peer.sni.clone());
    if peer.tls && peer.offer_h2 {
        upstream.options.alpn = ALPN::H2H1;
    }
    upstream.options.max_h2_streams = peer.max_h2_streams;

    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = pingora_proxy::http_proxy_service(
        &server.configuration,
        Peer {
            upstream,
            authorization: HeaderValue::from_str(&peer.authorization).expect("header value"),
        },
    );
    let mut options = HttpServerOptions::default();
    options.h2c = peer.h2c;
    service.app_logic_mut().expect("proxy app").server_options = Some(options);
    service.add_tcp(&peer.listen);
    server.add_service(service);
    server.run_forever();
}
