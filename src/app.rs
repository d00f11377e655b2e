//! Wiring: config -> credentials (source + refresher + slot) -> routes -> listeners. Owns every
//! task it starts and stops them in order: stop accepting and drain connections first (their
//! requests may still need tokens), then stop the refreshers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::AdminService;
use crate::config::{Config, ConfigError};
use crate::proxy::service::ProxyService;
use crate::server;
use crate::tls::TlsError;
use crate::token::refresh;
use crate::token::slot::TokenSlot;
use crate::token::source::TokenSource;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot run.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A TLS setting (a `ca_file`) is unusable.
    #[error("config error in {file}: {key}: {source}\n  fix: point ca_file at a PEM file of CA certificates")]
    Tls {
        /// The config file.
        file: String,
        /// The key whose TLS settings failed.
        key: String,
        /// The TLS error.
        source: TlsError,
    },
    /// A listener could not bind its address.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The config key.
        key: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl StartError {
    /// Whether the user must change the configuration (exit code 2) rather than the machine.
    pub fn is_config(&self) -> bool {
        !matches!(self, StartError::Bind { .. })
    }
}

/// A running proxy: its bound addresses and the handles to stop it.
#[derive(Debug)]
pub struct Running {
    route_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    slots: Vec<Arc<TokenSlot>>,
    stop_serving: CancellationToken,
    stop_refreshing: CancellationToken,
    serving: TaskTracker,
    refreshing: TaskTracker,
    grace: Duration,
}

/// Checks what `run` needs beyond a valid config: at least one route, and usable TLS settings
/// for every route (the credentials' are checked when their token clients are built).
pub fn preflight(config: &Config) -> Result<(), StartError> {
    if config.routes.is_empty() {
        return Err(ConfigError {
            file: config.source.clone(),
            key: "routes".into(),
            problem: "no [[routes]] are configured, so there is nothing to proxy".into(),
            fix: "add a [[routes]] table with listen, upstream and credential".into(),
        }
        .into());
    }
    for (i, route) in config.routes.iter().enumerate() {
        crate::tls::client_config(route.ca_file.as_deref()).map_err(|source| StartError::Tls {
            file: config.source.clone(),
            key: format!("routes[{i}].ca_file"),
            source,
        })?;
    }
    Ok(())
}

/// Starts refreshers and listeners for `config`; returns once every listener is bound.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    preflight(config)?;
    let stop_serving = CancellationToken::new();
    let stop_refreshing = CancellationToken::new();
    let serving = TaskTracker::new();
    let refreshing = TaskTracker::new();

    // Build everything fallible before spawning anything.
    let mut sources = Vec::with_capacity(config.credentials.len());
    for cred in &config.credentials {
        let source = TokenSource::new(cred).map_err(|source| StartError::Tls {
            file: config.source.clone(),
            key: format!("credentials.{}.ca_file", cred.name),
            source,
        })?;
        sources.push((
            Arc::new(source),
            Arc::new(TokenSlot::new(cred.name.clone())),
            cred.refresh_before,
        ));
    }
    let slot_of = |name: &str| {
        sources
            .iter()
            .find(|(s, _, _)| s.name() == name)
            .map(|(_, slot, _)| slot.clone())
    };
    let mut services = Vec::with_capacity(config.routes.len());
    for (i, route) in config.routes.iter().enumerate() {
        let slot = slot_of(&route.credential).expect("validated: route names a known credential");
        let service = ProxyService::new(route, slot, serving.clone(), stop_serving.clone())
            .map_err(|source| StartError::Tls {
                file: config.source.clone(),
                key: format!("routes[{i}].ca_file"),
                source,
            })?;
        let listener = server::bind(route.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: route.listen,
                key: format!("routes[{i}].listen"),
                source,
            })?;
        services.push((listener, service, route));
    }
    let admin = match config.admin_listen {
        Some(addr) => Some(
            server::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr,
                    key: "admin_listen".into(),
                    source,
                })?,
        ),
        None => None,
    };

    for (source, slot, refresh_before) in &sources {
        refreshing.spawn(refresh::run(
            source.clone(),
            slot.clone(),
            *refresh_before,
            stop_refreshing.clone(),
        ));
    }
    let permits = Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections));
    let mut route_addrs = Vec::with_capacity(services.len());
    for (listener, service, route) in services {
        let addr = listener.local_addr().unwrap_or(route.listen);
        info!(listen = %addr, upstream = %route.upstream.url, credential = %route.credential, "route listening");
        route_addrs.push(addr);
        serving.spawn(server::serve(
            listener,
            move |peer| service.for_peer(peer),
            config.limits,
            permits.clone(),
            stop_serving.clone(),
            serving.clone(),
            "route",
        ));
    }
    let slots: Vec<Arc<TokenSlot>> = sources.iter().map(|(_, slot, _)| slot.clone()).collect();
    let admin_addr = match admin {
        Some(listener) => {
            let addr = listener.local_addr().ok();
            info!(listen = ?addr, "admin listening (/healthz, /readyz)");
            let service = AdminService::new(slots.clone());
            serving.spawn(server::serve(
                listener,
                move |_| service.clone(),
                config.limits,
                permits.clone(),
                stop_serving.clone(),
                serving.clone(),
                "admin",
            ));
            addr
        }
        None => None,
    };
    Ok(Running {
        route_addrs,
        admin_addr,
        slots,
        stop_serving,
        stop_refreshing,
        serving,
        refreshing,
        grace: config.shutdown_grace,
    })
}

impl Running {
    /// The bound address of each route, in config order.
    pub fn route_addrs(&self) -> &[SocketAddr] {
        &self.route_addrs
    }

    /// The bound admin address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The credentials' token slots, sorted by name.
    pub fn slots(&self) -> &[Arc<TokenSlot>] {
        &self.slots
    }

    /// Stops accepting, lets requests in flight finish within the grace period, then stops the
    /// refreshers. Returns whether everything finished within the grace period.
    pub async fn shutdown(self) -> bool {
        self.stop_serving.cancel();
        self.serving.close();
        let drained = tokio::time::timeout(self.grace, self.serving.wait())
            .await
            .is_ok();
        if !drained {
            warn!(
                grace_secs = self.grace.as_secs_f64(),
                "requests still in flight after the grace period; closing them"
            );
        }
        self.stop_refreshing.cancel();
        self.refreshing.close();
        self.refreshing.wait().await;
        drained
    }
}

/// Runs `config` until `shutdown` resolves, then drains.
pub async fn run(config: &Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let running = start(config).await?;
    shutdown.await;
    info!("shutting down: no new connections, draining requests in flight");
    running.shutdown().await;
    info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => info!(signal = "SIGTERM", "signal received"),
                    _ = int.recv() => info!(signal = "SIGINT", "signal received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
