//! token-proxy: a local reverse proxy that stamps a fresh OAuth 2.0 client-credentials bearer
//! token on every request.
//!
//! Modules, in the order data flows (each uses only those before it):
//!
//! - [`secret`], [`tls`], [`errors`], [`assertion`], [`egress`]: a `Debug`-safe secret string;
//!   TLS client settings; error cause chains; signed JWT client assertions; outbound proxies.
//! - [`config`]: TOML -> validated [`config::Config`].
//! - [`token`]: fetching tokens ([`token::source`]), holding the current one
//!   ([`token::slot`]) and refreshing it ahead of expiry ([`token::refresh`]).
//! - [`metrics`]: lock-free counters the request path records, encoded for Prometheus.
//! - [`proxy`]: the request path: header hygiene, the upstream pool and the per-route service.
//! - [`server`], [`admin`]: listeners with graceful drain; `/healthz`, `/readyz`, `/metrics`.
//! - [`app`]: wiring, task ownership and shutdown.
//! - [`demo`], [`cli`]: the embedded demo (also the tests' fakes) and the command line.
//!
//! A refresh: the refresher wakes ahead of expiry, POSTs the client-credentials form, builds a
//! sensitive `Authorization` header value and swaps it into the slot. A request: the service
//! loads the slot (no lock, no I/O), checks expiry, rewrites target and headers, and streams
//! the exchange with the upstream.

pub mod admin;
pub mod app;
pub mod assertion;
pub mod cli;
pub mod config;
pub mod demo;
pub mod egress;
pub mod errors;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod tls;
pub mod token;
