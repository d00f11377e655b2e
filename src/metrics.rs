//! Prometheus metrics, served by the admin listener at `/metrics`.
//!
//! Recording on the request path is a few relaxed atomic adds on counters the route's service
//! holds directly: no lock, no map lookup, no allocation, and no write to memory another
//! worker writes too. The counters a request bumps are kept in one shard per worker thread
//! ([`set_worker`]), each on cache lines of its own: with shared counters, every request on
//! one core pulled their lines away from the other, which measurably cost CPU per request with
//! two workers. prometheus-client does the text encoding at scrape time, through a
//! [`Collector`] that sums the shards and reads the credentials' token slots. Counters of a
//! route live as long as the process (keyed by the route's name), so a reload does not reset
//! them; the route's services and every request record borrow them for `'static`.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::token::slot::TokenSlot;

/// Method classes counted apart; anything else is `other`.
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upper bounds (seconds) of the request duration histogram's buckets.
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The proxy's own error codes (`ProxyError::code`), in the order of `RouteMetrics::errors`.
pub(crate) const ERROR_CODES: [&str; 11] = [
    "token_unavailable",
    "upstream_unavailable",
    "upstream_timeout",
    "bad_request",
    "forbidden",
    "proxy_authentication_required",
    "payload_too_large",
    "loop_detected",
    "headers_too_large",
    "not_implemented",
    "no_route",
];

fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::PATCH => 4,
        Method::DELETE => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

thread_local! {
    /// This thread's shard of every route's request counters.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Most shards a route keeps; workers beyond share them (still correct, atomically).
const MAX_SHARDS: usize = 64;

/// Makes this thread record into shard `index` (taken modulo the shard count). Each worker
/// runtime's thread calls it once with its own number; any other thread records into shard 0.
pub fn set_worker(index: usize) {
    SHARD.with(|s| s.set(index));
}

/// The counters of one route, recorded by its service.
#[derive(Debug)]
pub struct RouteMetrics {
    name: Arc<str>,
    /// Per-worker request counters, summed at scrape time.
    shards: Box<[Shard]>,
    /// Requests the proxy answered itself, by error code.
    errors: [AtomicU64; ERROR_CODES.len()],
    /// Requests sent again with a new token after a `401`.
    replays_401: AtomicU64,
}

/// One worker's counts of a route's requests, aligned to keep it off its neighbours' cache
/// lines (128 bytes: adjacent-line prefetch pairs lines on x86).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    /// Requests answered, by method class and status class.
    requests: [[AtomicU64; STATUS_CLASSES.len()]; METHODS.len()],
    /// Request durations (until the response's end), by bucket; the last is `+Inf`.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    duration_sum_micros: AtomicU64,
}

impl RouteMetrics {
    fn new(name: &str) -> RouteMetrics {
        let shards = std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .min(MAX_SHARDS);
        RouteMetrics {
            name: name.into(),
            shards: (0..shards).map(|_| Shard::default()).collect(),
            errors: Default::default(),
            replays_401: AtomicU64::new(0),
        }
    }

    /// The route's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A request that ended with `status` after `elapsed`.
    pub fn record(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        let shard = &self.shards[SHARD.with(Cell::get) % self.shards.len()];
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        shard.requests[method_index(method)][class].fetch_add(1, Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        shard.buckets[bucket].fetch_add(1, Relaxed);
        shard
            .duration_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    /// The sum over the shards of the counter `pick` chooses.
    fn total(&self, pick: impl Fn(&Shard) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| pick(s).load(Relaxed)).sum()
    }

    /// A request the proxy answered itself with the error `code`.
    pub fn error(&self, code: &str) {
        if let Some(i) = ERROR_CODES.iter().position(|c| *c == code) {
            self.errors[i].fetch_add(1, Relaxed);
        }
    }

    /// A request replayed after a `401`.
    pub fn replay_401(&self) {
        self.replays_401.fetch_add(1, Relaxed);
    }
}

/// All metrics of the process: routes by name, the credentials' slots, and the connection
/// semaphore (open connections are the permits taken).
#[derive(Debug)]
pub struct Metrics {
    /// Leaked on purpose: a route's counters live as long as the process, and borrowing them
    /// for `'static` spares every request a shared reference count.
    routes: Mutex<BTreeMap<String, &'static RouteMetrics>>,
    slots: Arc<ArcSwap<Vec<Arc<TokenSlot>>>>,
    permits: Arc<Semaphore>,
    max_connections: usize,
}

impl Metrics {
    /// Metrics over `slots` (swapped on reload) and the client connection `permits`.
    pub fn new(
        slots: Arc<ArcSwap<Vec<Arc<TokenSlot>>>>,
        permits: Arc<Semaphore>,
        max_connections: usize,
    ) -> Arc<Metrics> {
        Arc::new(Metrics {
            routes: Mutex::new(BTreeMap::new()),
            slots,
            permits,
            max_connections,
        })
    }

    /// The counters of the route `name`, the same ones across reloads.
    pub fn route(&self, name: &str) -> &'static RouteMetrics {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes
            .entry(name.to_string())
            .or_insert_with(|| Box::leak(Box::new(RouteMetrics::new(name))))
    }

    /// The Prometheus (OpenMetrics) text of every metric.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(self.clone())));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
            let _ = writeln!(out, "# metrics could not be encoded");
        }
        out
    }
}

/// One scrape's view, as prometheus-client's collector.
#[derive(Debug)]
struct Scrape(Arc<Metrics>);

type Labels<'a> = [(&'static str, &'a str)];

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metrics = &self.0;
        let routes: Vec<&RouteMetrics> = metrics
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .copied()
            .collect();

        let mut family = encoder.encode_descriptor(
            "token_proxy_requests",
            "Requests answered, by route, method class and status class.",
            None,
            MetricType::Counter,
        )?;
        for r in &routes {
            for (m, method) in METHODS.iter().enumerate() {
                for (s, status) in STATUS_CLASSES.iter().enumerate() {
                    let v = r.total(|shard| &shard.requests[m][s]);
                    if v > 0 {
                        let labels: &Labels =
                            &[("route", &r.name), ("method", method), ("status", status)];
                        family
                            .encode_family(&labels)?
                            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                    }
                }
            }
        }

        let mut family = encoder.encode_descriptor(
            "token_proxy_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route.",
            None,
            MetricType::Histogram,
        )?;
        for r in &routes {
            // Per-bucket counts: the encoder makes them cumulative.
            let mut total = 0;
            let mut buckets = Vec::with_capacity(DURATION_BUCKETS.len() + 1);
            for i in 0..=DURATION_BUCKETS.len() {
                let count = r.total(|shard| &shard.buckets[i]);
                total += count;
                let bound = DURATION_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
                buckets.push((bound, count));
            }
            let sum = r.total(|shard| &shard.duration_sum_micros) as f64 / 1e6;
            let labels: &Labels = &[("route", &r.name)];
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, total, &buckets, None)?;
        }

        let mut family = encoder.encode_descriptor(
            "token_proxy_errors",
            "Requests the proxy answered itself, by route and error code (upstream_unavailable, upstream_timeout, token_unavailable, ...).",
            None,
            MetricType::Counter,
        )?;
        for r in &routes {
            for (i, code) in ERROR_CODES.iter().enumerate() {
                let v = r.errors[i].load(Relaxed);
                if v > 0 {
                    let labels: &Labels = &[("route", &r.name), ("error", code)];
                    family
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                }
            }
        }

        let mut family = encoder.encode_descriptor(
            "token_proxy_replays_after_401",
            "Requests sent again with a new token after the upstream answered 401, by route.",
            None,
            MetricType::Counter,
        )?;
        for r in &routes {
            let labels: &Labels = &[("route", &r.name)];
            family
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&r.replays_401.load(Relaxed), None)?;
        }

        let slots = metrics.slots.load();
        let mut family = encoder.encode_descriptor(
            "token_proxy_token_fetches",
            "Token requests to the identity provider, by credential and outcome (ok, http_<status>, invalid_response, timeout, unreachable, secret_file, credential_file).",
            None,
            MetricType::Counter,
        )?;
        for slot in slots.iter() {
            for (outcome, v) in slot.fetch_counts() {
                let labels: &Labels = &[("credential", slot.name()), ("outcome", &outcome)];
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }

        let now = Instant::now();
        let mut family = encoder.encode_descriptor(
            "token_proxy_token_expiry_seconds",
            "Seconds until the credential's current token is no longer used (0: none valid).",
            None,
            MetricType::Gauge,
        )?;
        for slot in slots.iter() {
            let left = slot.status(now).1.unwrap_or_default().as_secs_f64();
            let labels: &Labels = &[("credential", slot.name())];
            family.encode_family(&labels)?.encode_gauge(&left)?;
        }

        let mut family = encoder.encode_descriptor(
            "token_proxy_token_fetches_in_flight",
            "Token requests in flight, by credential (0 or 1).",
            None,
            MetricType::Gauge,
        )?;
        for slot in slots.iter() {
            let labels: &Labels = &[("credential", slot.name())];
            family
                .encode_family(&labels)?
                .encode_gauge(&u64::from(slot.is_fetching()))?;
        }

        let open = metrics
            .max_connections
            .saturating_sub(metrics.permits.available_permits());
        encoder
            .encode_descriptor(
                "token_proxy_client_connections",
                "Client connections open on the route listeners.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&(open as u64))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges_in_the_text_format() {
        let slots = Arc::new(ArcSwap::from_pointee(vec![Arc::new(TokenSlot::new("api"))]));
        let permits = Arc::new(Semaphore::new(10));
        let _held = permits.clone().try_acquire_many_owned(3).unwrap();
        let metrics = Metrics::new(slots.clone(), permits, 10);
        let route = metrics.route("main");
        assert!(
            std::ptr::eq(route, metrics.route("main")),
            "one set per name"
        );
        route.record(&Method::GET, StatusCode::OK, Duration::from_millis(3));
        route.record(&Method::GET, StatusCode::OK, Duration::from_millis(30));
        route.record(
            &Method::from_bytes(b"PROPFIND").unwrap(),
            StatusCode::BAD_GATEWAY,
            Duration::from_secs(20),
        );
        route.error("upstream_unavailable");
        slots.load()[0].count_fetch("ok");
        slots.load()[0].count_fetch("http_401");
        slots.load()[0].count_fetch("http_401");

        let text = metrics.render();
        for line in [
            r#"token_proxy_requests_total{route="main",method="GET",status="2xx"} 2"#,
            r#"token_proxy_requests_total{route="main",method="other",status="5xx"} 1"#,
            r#"token_proxy_request_duration_seconds_bucket{le="0.005",route="main"} 1"#,
            r#"token_proxy_request_duration_seconds_bucket{le="0.05",route="main"} 2"#,
            r#"token_proxy_request_duration_seconds_bucket{le="+Inf",route="main"} 3"#,
            r#"token_proxy_request_duration_seconds_count{route="main"} 3"#,
            r#"token_proxy_errors_total{route="main",error="upstream_unavailable"} 1"#,
            r#"token_proxy_replays_after_401_total{route="main"} 0"#,
            r#"token_proxy_token_fetches_total{credential="api",outcome="http_401"} 2"#,
            r#"token_proxy_token_fetches_total{credential="api",outcome="ok"} 1"#,
            r#"token_proxy_token_expiry_seconds{credential="api"} 0.0"#,
            r#"token_proxy_token_fetches_in_flight{credential="api"} 0"#,
            "token_proxy_client_connections 3",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        // Every metric a scrape holds has its row in README's table, and every row a metric.
        let readme = include_str!("../README.md");
        let served: std::collections::BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        // A counter's `# TYPE` line names it without `_total` (OpenMetrics).
        let documented: std::collections::BTreeSet<&str> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .filter(|name| name.starts_with("token_proxy_"))
            .map(|name| name.strip_suffix("_total").unwrap_or(name))
            .collect();
        assert_eq!(
            served, documented,
            "README's /metrics table and a scrape differ"
        );
    }

    #[test]
    fn workers_record_into_their_own_shards_and_a_scrape_sums_them() {
        let slots = Arc::new(ArcSwap::from_pointee(Vec::new()));
        let metrics = Metrics::new(slots, Arc::new(Semaphore::new(1)), 1);
        let route = metrics.route("main");
        std::thread::scope(|s| {
            for worker in 0..4 {
                s.spawn(move || {
                    set_worker(worker);
                    for _ in 0..1000 {
                        route.record(&Method::GET, StatusCode::OK, Duration::from_micros(100));
                    }
                });
            }
        });
        // Four workers on however many shards this machine gives a route.
        let busy = route
            .shards
            .iter()
            .filter(|s| s.requests[0][1].load(Relaxed) > 0)
            .count();
        assert_eq!(busy, route.shards.len().min(4));
        let text = metrics.render();
        for line in [
            r#"token_proxy_requests_total{route="main",method="GET",status="2xx"} 4000"#,
            r#"token_proxy_request_duration_seconds_bucket{le="0.0005",route="main"} 4000"#,
            r#"token_proxy_request_duration_seconds_sum{route="main"} 0.4"#,
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
