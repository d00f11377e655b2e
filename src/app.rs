//! Wiring: config -> credentials (source + refresher + slot) -> routes -> listeners. Owns every
//! task it starts and stops them in order: stop accepting and drain connections first (their
//! requests may still need tokens), then stop the refreshers.
//!
//! Starting and reloading are one operation, [`Running::apply`]: it compares the new config with
//! what runs, builds and binds everything new first (so a broken config changes nothing), then
//! switches over. Unchanged credentials keep their refresher and token (a failing one retries
//! at once); a changed route gets a new service for new connections while connections already
//! open finish on the old one.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::AdminService;
use crate::config::{ClientLimits, Config, ConfigError, CredentialConfig, ListenAddr, RouteConfig};
use crate::metrics::Metrics;
use crate::proxy::service::{ProxyService, RouteService};
use crate::server::{self, BoundAddr, Listener};
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
    #[error("config error in {file}: {key}: {source}\n  fix: {}", source.fix())]
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
        addr: String,
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

/// Connections the admin listener serves at once (apart from `max_connections`).
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// A credential that runs: its settings, its slot and the handle to stop its refresher.
#[derive(Debug)]
struct RunningCredential {
    config: CredentialConfig,
    slot: Arc<TokenSlot>,
    stop: CancellationToken,
}

/// A route that runs on a listener: its settings, its slot and its service.
#[derive(Debug)]
struct RunningRoute {
    config: RouteConfig,
    slot: Arc<TokenSlot>,
    service: RouteService,
}

/// A listener that runs: its routes (one, or several told apart by `path_prefix`), the
/// service its new connections get (swapped by a reload that changes a route), its bound
/// address and the handle that stops it and drains its connections.
#[derive(Debug)]
struct RunningListener {
    listen: ListenAddr,
    routes: Vec<RunningRoute>,
    service: Arc<ArcSwap<ProxyService>>,
    addr: BoundAddr,
    stop: CancellationToken,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Credentials started (new or changed).
    pub credentials_started: usize,
    /// Credentials kept with their token.
    pub credentials_kept: usize,
    /// Credentials stopped (removed or replaced).
    pub credentials_stopped: usize,
    /// Routes started: on a new listener, or with a new `path_prefix` on a kept one.
    pub routes_started: usize,
    /// Routes changed on the same listener and prefix.
    pub routes_updated: usize,
    /// Routes stopped: with their listener, or removed from a kept one.
    pub routes_stopped: usize,
}

/// A running proxy: its bound addresses and the handles to stop it.
#[derive(Debug)]
pub struct Running {
    source: String,
    credentials: BTreeMap<String, RunningCredential>,
    listeners: Vec<RunningListener>,
    /// Where each route listens, in config order.
    route_addrs: Vec<BoundAddr>,
    admin_addr: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    admin_slots: Arc<ArcSwap<Vec<Arc<TokenSlot>>>>,
    metrics: Arc<Metrics>,
    limits: ClientLimits,
    permits: Arc<Semaphore>,
    stop_serving: CancellationToken,
    stop_refreshing: CancellationToken,
    serving: TaskTracker,
    refreshing: TaskTracker,
    grace: Duration,
    workers: Option<usize>,
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
            also: Vec::new(),
        }
        .into());
    }
    for (i, route) in config.routes.iter().enumerate() {
        crate::tls::client_config(route.ca_file.as_deref(), route.client_identity.as_ref())
            .map_err(|source| StartError::Tls {
                file: config.source.clone(),
                key: format!("routes[{i}].{}", source.key()),
                source,
            })?;
    }
    Ok(())
}

/// Starts refreshers and listeners for `config`; returns once every listener is bound.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    preflight(config)?;
    let admin = match config.admin_listen {
        Some(addr) => Some(
            server::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr: addr.to_string(),
                    key: "admin_listen".into(),
                    source,
                })?,
        ),
        None => None,
    };
    let admin_slots = Arc::new(ArcSwap::from_pointee(Vec::new()));
    let permits = Arc::new(Semaphore::new(config.limits.max_connections));
    let mut running = Running {
        source: config.source.clone(),
        credentials: BTreeMap::new(),
        listeners: Vec::new(),
        route_addrs: Vec::new(),
        admin_addr: None,
        admin_listen: config.admin_listen,
        metrics: Metrics::new(
            admin_slots.clone(),
            permits.clone(),
            config.limits.max_connections,
        ),
        admin_slots,
        limits: config.limits,
        permits,
        stop_serving: CancellationToken::new(),
        stop_refreshing: CancellationToken::new(),
        serving: TaskTracker::new(),
        refreshing: TaskTracker::new(),
        grace: config.shutdown_grace,
        workers: config.workers,
    };
    running.apply(config).await?;
    if let Some(listener) = admin {
        running.admin_addr = listener.local_addr().ok();
        info!(listen = ?running.admin_addr, "admin listening (/healthz, /readyz, /metrics)");
        let service = AdminService::new(running.admin_slots.clone(), running.metrics.clone());
        running.serving.spawn(server::serve(
            listener,
            move |_| server::Served {
                service: service.clone(),
                retire: CancellationToken::new(),
                front: None,
            },
            running.limits,
            // Probes have their own connections: clients using up max_connections cannot
            // make the proxy look dead.
            Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS)),
            running.stop_serving.clone(),
            running.serving.clone(),
            "admin",
        ));
    }
    Ok(running)
}

/// A route on a listener, prepared before anything changes: the running route at this index
/// kept, or a new service (replacing the running route at the index, if any).
enum RoutePlan {
    Keep(usize),
    New(RouteService, Option<usize>),
}

/// A listener, prepared before anything changes: the running one at this index, or a new
/// one bound, with the token that stops it (its routes' services were built with it, so that
/// their tasks stop with it too).
enum ListenerPlan {
    Existing(usize),
    Start(Listener, CancellationToken),
}

/// The routes of `routes` that share a listener, each group in config order: routes with the
/// same address share it, except on port `0`, where each route gets a port of its own.
fn listener_groups(routes: &[RouteConfig]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        let shared = route.listen.tcp().is_none_or(|a| a.port() != 0);
        match groups
            .iter_mut()
            .find(|g| shared && routes[g[0]].listen == route.listen)
        {
            Some(group) => group.push(i),
            None => groups.push(vec![i]),
        }
    }
    groups
}

/// A route's `path_prefix` as written: `/` for every path.
fn shown_prefix(prefix: &str) -> &str {
    if prefix.is_empty() {
        "/"
    } else {
        prefix
    }
}

impl Running {
    /// The service of `config.routes[i]`, on the listener `stop` stops.
    fn route_service(
        &self,
        config: &Config,
        i: usize,
        slot: Arc<TokenSlot>,
        stop: &CancellationToken,
    ) -> Result<RouteService, StartError> {
        let route = &config.routes[i];
        let metrics = self.metrics.route(&route.name);
        RouteService::new(route, slot, metrics, self.serving.clone(), stop.clone()).map_err(
            |source| StartError::Tls {
                file: config.source.clone(),
                key: format!("routes[{i}].{}", source.key()),
                source,
            },
        )
    }

    /// The service a listener's connections get: its routes, retired with the listener or
    /// by a reload that replaces it. What the listener answers before a route is known is
    /// counted under its address when it has several routes.
    fn listener_service(
        &self,
        listen: &ListenAddr,
        routes: Vec<RouteService>,
        stop: &CancellationToken,
    ) -> ProxyService {
        ProxyService::new(
            routes,
            || self.metrics.route(&listen.to_string()),
            stop.child_token(),
        )
    }

    /// The bound TCP address of each TCP route, in config order (routes that share a
    /// listener share its address).
    pub fn route_addrs(&self) -> Vec<SocketAddr> {
        self.route_addrs
            .iter()
            .filter_map(|a| match a {
                BoundAddr::Tcp(a) => Some(*a),
                BoundAddr::Unix(_) => None,
            })
            .collect()
    }

    /// Where each route listens (TCP or Unix socket), in config order.
    pub fn route_listeners(&self) -> Vec<BoundAddr> {
        self.route_addrs.clone()
    }

    /// The bound admin address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The credentials' token slots, sorted by name.
    pub fn slots(&self) -> Vec<Arc<TokenSlot>> {
        self.credentials.values().map(|c| c.slot.clone()).collect()
    }

    /// Makes the running proxy match `config`. Everything that can fail (token clients, TLS,
    /// binding new listeners) happens first; on an error nothing has changed.
    pub async fn apply(&mut self, config: &Config) -> Result<ReloadSummary, StartError> {
        preflight(config)?;
        let mut summary = ReloadSummary::default();

        // Credentials: keep the unchanged ones, prepare the new and changed ones.
        let mut fresh = Vec::new();
        let mut slots: BTreeMap<String, Arc<TokenSlot>> = BTreeMap::new();
        for cred in &config.credentials {
            match self.credentials.get(&cred.name) {
                Some(running) if running.config == *cred => {
                    slots.insert(cred.name.clone(), running.slot.clone());
                }
                _ => {
                    let source = TokenSource::new(cred).map_err(|source| StartError::Tls {
                        file: config.source.clone(),
                        key: format!("credentials.{}.ca_file", cred.name),
                        source,
                    })?;
                    let slot = Arc::new(TokenSlot::new(cred.name.clone()));
                    slots.insert(cred.name.clone(), slot.clone());
                    fresh.push((cred.clone(), Arc::new(source), slot));
                }
            }
        }

        // Listeners, matched by address (port 0 ones by position too); their routes by
        // path_prefix.
        let groups = listener_groups(&config.routes);
        let mut plans = Vec::with_capacity(groups.len());
        for (g, members) in groups.iter().enumerate() {
            let first = members[0];
            let listen = &config.routes[first].listen;
            let existing = self.listeners.iter().enumerate().position(|(j, l)| {
                l.listen == *listen && (listen.tcp().is_none_or(|a| a.port() != 0) || g == j)
            });
            let stop = match existing {
                Some(j) => self.listeners[j].stop.clone(),
                None => self.stop_serving.child_token(),
            };
            let mut routes = Vec::with_capacity(members.len());
            for &i in members {
                let route = &config.routes[i];
                let slot = slots[&route.credential].clone();
                let old = existing.and_then(|j| {
                    self.listeners[j]
                        .routes
                        .iter()
                        .position(|r| r.config.path_prefix == route.path_prefix)
                });
                let plan = match old {
                    Some(k) => {
                        let running = &self.listeners[existing.unwrap_or_default()].routes[k];
                        if running.config == *route && Arc::ptr_eq(&running.slot, &slot) {
                            RoutePlan::Keep(k)
                        } else {
                            RoutePlan::New(self.route_service(config, i, slot, &stop)?, Some(k))
                        }
                    }
                    None => RoutePlan::New(self.route_service(config, i, slot, &stop)?, None),
                };
                routes.push(plan);
            }
            let listener = match existing {
                Some(j) => ListenerPlan::Existing(j),
                None => {
                    let route = &config.routes[first];
                    let listener = Listener::bind(&route.listen, route.socket_mode)
                        .await
                        .map_err(|source| StartError::Bind {
                            addr: route.listen.to_string(),
                            key: format!("routes[{first}].listen"),
                            source,
                        })?;
                    ListenerPlan::Start(listener, stop)
                }
            };
            plans.push((members.clone(), listener, routes));
        }

        for (i, route) in config.routes.iter().enumerate() {
            let remote = route.listen.tcp().is_some_and(|a| !a.ip().is_loopback());
            if remote && route.inbound_token.is_none() && route.allowed_clients.is_empty() {
                warn!(
                    route = i,
                    listen = %route.listen,
                    "route listens beyond loopback with no inbound_token_file or allowed_clients: anyone who reaches it uses the credential"
                );
            }
        }

        // Nothing can fail from here on: switch over. A kept credential that is failing
        // retries now: the reload may have fixed what it lacked (a secret file, a proxy).
        for (name, slot) in &slots {
            if !fresh.iter().any(|(cred, _, _)| &cred.name == name) {
                slot.retry_failing();
            }
        }
        for (cred, source, slot) in fresh {
            let stop = self.stop_refreshing.child_token();
            self.refreshing.spawn(refresh::run(
                source,
                slot.clone(),
                cred.refresh_before,
                stop.clone(),
            ));
            let replaced = self.credentials.insert(
                cred.name.clone(),
                RunningCredential {
                    config: cred,
                    slot,
                    stop,
                },
            );
            summary.credentials_started += 1;
            if let Some(old) = replaced {
                old.stop.cancel();
                summary.credentials_stopped += 1;
            }
        }
        summary.credentials_kept = config.credentials.len() - summary.credentials_started;

        let mut old_listeners: Vec<Option<RunningListener>> = std::mem::take(&mut self.listeners)
            .into_iter()
            .map(Some)
            .collect();
        let mut route_addrs: Vec<Option<BoundAddr>> = vec![None; config.routes.len()];
        for (members, listener, plans) in plans {
            let listen = config.routes[members[0]].listen.clone();
            let (mut kept, mut old_routes) = match &listener {
                ListenerPlan::Existing(j) => {
                    let mut old = old_listeners[*j]
                        .take()
                        .expect("each old listener is matched once");
                    let routes = std::mem::take(&mut old.routes);
                    (Some(old), routes.into_iter().map(Some).collect())
                }
                ListenerPlan::Start(..) => (None, Vec::new()),
            };
            let mut routes = Vec::with_capacity(members.len());
            let mut changed = false;
            for (&i, plan) in members.iter().zip(plans) {
                let route = &config.routes[i];
                match plan {
                    RoutePlan::Keep(k) => routes.push(
                        old_routes[k]
                            .take()
                            .expect("each old route is matched once"),
                    ),
                    RoutePlan::New(service, replacing) => {
                        changed = true;
                        match replacing.and_then(|k| old_routes[k].take()) {
                            Some(old) => {
                                old.service.retire();
                                summary.routes_updated += 1;
                            }
                            None => summary.routes_started += 1,
                        }
                        routes.push(RunningRoute {
                            config: route.clone(),
                            slot: slots[&route.credential].clone(),
                            service,
                        });
                    }
                }
            }
            for old in old_routes.into_iter().flatten() {
                changed = true;
                info!(listen = %listen, path_prefix = %shown_prefix(&old.config.path_prefix), "route removed; its listener stays");
                old.service.retire();
                summary.routes_stopped += 1;
            }
            let services: Vec<RouteService> = routes.iter().map(|r| r.service.clone()).collect();
            let entry = match (listener, kept.take()) {
                (ListenerPlan::Existing(_), Some(mut entry)) => {
                    if changed {
                        // New connections get the new set; open ones finish and close.
                        let service = self.listener_service(&listen, services, &entry.stop);
                        entry.service.swap(Arc::new(service)).retire();
                    }
                    entry.routes = routes;
                    entry
                }
                (ListenerPlan::Start(listener, stop), _) => {
                    let addr = listener.bound_addr().unwrap_or_else(|_| match &listen {
                        ListenAddr::Tcp(a) => BoundAddr::Tcp(*a),
                        ListenAddr::Unix(p) => BoundAddr::Unix(p.clone()),
                    });
                    let service = Arc::new(ArcSwap::from_pointee(
                        self.listener_service(&listen, services, &stop),
                    ));
                    let current = service.clone();
                    self.serving.spawn(server::serve(
                        listener,
                        move |peer| {
                            let service = current.load().for_peer(peer);
                            server::Served {
                                front: Some(service.clone()),
                                retire: service.retired(),
                                service,
                            }
                        },
                        self.limits,
                        self.permits.clone(),
                        stop.clone(),
                        self.serving.clone(),
                        "route",
                    ));
                    RunningListener {
                        listen,
                        routes,
                        service,
                        addr,
                        stop,
                    }
                }
                (ListenerPlan::Existing(_), None) => unreachable!("an existing listener is taken"),
            };
            for (&i, route) in members.iter().zip(&entry.routes) {
                route_addrs[i] = Some(entry.addr.clone());
                info!(listen = %entry.addr, path_prefix = %shown_prefix(&route.config.path_prefix), upstream = %route.config.upstream.url, credential = %route.config.credential, "route ready");
            }
            self.listeners.push(entry);
        }
        for old in old_listeners.into_iter().flatten() {
            for route in &old.routes {
                info!(listen = %old.addr, path_prefix = %shown_prefix(&route.config.path_prefix), "route removed: its listener stops accepting and drains its connections");
            }
            old.stop.cancel();
            summary.routes_stopped += old.routes.len();
        }
        self.route_addrs = route_addrs.into_iter().flatten().collect();
        let removed: Vec<String> = self
            .credentials
            .keys()
            .filter(|n| !slots.contains_key(*n))
            .cloned()
            .collect();
        for name in removed {
            if let Some(old) = self.credentials.remove(&name) {
                old.stop.cancel();
                summary.credentials_stopped += 1;
            }
        }
        self.admin_slots.store(Arc::new(self.slots()));

        if config.admin_listen != self.admin_listen {
            warn!("admin_listen changed: restart token-proxy to move the admin listener");
        }
        if config.limits.max_connections != self.limits.max_connections
            || config.limits.max_headers != self.limits.max_headers
            || config.limits.max_header_bytes != self.limits.max_header_bytes
            || config.limits.header_read_timeout != self.limits.header_read_timeout
            || config.shutdown_grace != self.grace
            || config.workers != self.workers
        {
            warn!("workers, connection limits or shutdown_grace_secs changed: restart token-proxy to apply them");
        }
        self.source = config.source.clone();
        Ok(summary)
    }

    /// Re-reads the config file at `path` and applies it; a broken config is logged and
    /// changes nothing.
    pub async fn reload_from(&mut self, path: &Path) -> Result<ReloadSummary, StartError> {
        let config = Config::load(path)?;
        self.apply(&config).await
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

/// Runs `config` until `shutdown` resolves, then drains. With `path`, SIGHUP re-reads the file
/// and applies it; a broken file is rejected with a logged error and the running config stays.
pub async fn run(
    config: &Config,
    path: Option<&Path>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let mut running = start(config).await?;
    tokio::pin!(shutdown);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<()>();
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hup => {
                let Some(path) = path else { continue };
                info!(config = %path.display(), "SIGHUP: reloading the configuration");
                match running.reload_from(path).await {
                    Ok(summary) => info!(?summary, "configuration reloaded"),
                    Err(e) => error!(error = %e, "configuration rejected; the running configuration stays"),
                }
            }
        }
    }
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
