//! The command line: `run`, `check`, `token`, `demo`, `health`, `completions` and `man`, and
//! the exit codes they end with.
//!
//! Exit codes: 0 success; 1 a runtime failure (a token could not be fetched, an address is in
//! use); 2 a configuration error (the message names the file, the key and the fix).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::app;
use crate::config::Config;
use crate::demo;
use crate::token::source::TokenSource;

/// token-proxy: forwards plain HTTP to an OAuth 2.0-protected API with a fresh bearer token.
#[derive(Debug, Parser)]
#[command(name = "token-proxy", version, about)]
pub struct Cli {
    /// Runtime worker threads (default: the config's `workers`, else one per core).
    #[arg(long, global = true, value_name = "N")]
    pub workers: Option<usize>,
    /// Log line format on stderr: `text` for people, `json` (one object per line) for log
    /// pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or filter (e.g. `debug`, `info,token_proxy=debug`); default: `RUST_LOG`,
    /// else `info`.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The default URL `health` probes: the admin listener of the example configs.
pub const DEFAULT_HEALTH_URL: &str = "http://127.0.0.1:9901/readyz";

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run {
        /// The TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate the config, then try each listener, upstream and credential (prints token
    /// lifetimes, never tokens).
    Check {
        /// The TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print one access token to stdout, for scripts.
    Token {
        /// The TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Which credential (needed when the config has several).
        #[arg(long, value_name = "NAME")]
        credential: Option<String>,
    },
    /// Run an embedded token endpoint and echo API behind the proxy, to try it out.
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: SocketAddr,
        /// Where the admin listener (`/healthz`, `/readyz`, `/metrics`) listens: by default a
        /// free loopback port, printed at the start.
        #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
        admin_listen: SocketAddr,
    },
    /// Probe a running token-proxy: exit 0 when its `/readyz` answers 200, else 1 (a Docker
    /// HEALTHCHECK or Kubernetes exec probe that needs no shell).
    Health {
        /// The readiness URL of the admin listener (`admin_listen`).
        #[arg(long, default_value = DEFAULT_HEALTH_URL, value_name = "URL", conflicts_with = "config")]
        url: String,
        /// Probe the admin listener this config file names (its `admin_listen`), instead of
        /// `--url`: a container's HEALTHCHECK then follows the config's port.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 2.0, value_name = "SECS")]
        timeout: f64,
    },
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `token-proxy man > token-proxy.1`.
    Man,
}

/// Installs the log subscriber on stderr: `--log-level`, else `RUST_LOG`, else `info`.
/// Dependencies are held to `info` whatever the filter says, since their trace output can
/// carry request bytes.
fn init_logging(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    let mut filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    for dep in [
        "hyper",
        "hyper_util",
        "h2",
        "reqwest",
        "rustls",
        "tokio_util",
    ] {
        if let Ok(d) = format!("{dep}=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    Ok(())
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// The man page (roff): one page with every command and its options in a COMMANDS section.
/// clap_mangen's own rendering refers to a page per command (`token-proxy-run(1)`), which
/// nothing installs.
pub fn man_page(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory as _;
    let cli = Cli::command();
    let man = clap_mangen::Man::new(cli.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    writeln!(out, ".SH COMMANDS")?;
    for sub in cli.get_subcommands() {
        let mut usage = sub
            .clone()
            .bin_name(format!("token-proxy {}", sub.get_name()))
            .render_usage()
            .to_string();
        if let Some(rest) = usage.strip_prefix("Usage: ") {
            usage = rest.to_string();
        }
        writeln!(out, ".TP\n\\fB{}\\fR", roff(&usage))?;
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            writeln!(out, "{}", roff(&about.to_string()))?;
        }
        for arg in sub.get_arguments() {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            let name = match (arg.get_long(), arg.get_short()) {
                (Some(long), Some(short)) => format!("-{short}, --{long}"),
                (Some(long), None) => format!("--{long}"),
                _ => arg.get_id().to_string(),
            };
            let value = arg
                .get_value_names()
                .and_then(|v| v.first())
                .map(|v| format!(" <{v}>"))
                .unwrap_or_default();
            let defaults: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            let default = if defaults.is_empty() {
                String::new()
            } else {
                format!(" [default: {}]", defaults.join(", "))
            };
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            writeln!(
                out,
                ".RS\n.TP\n\\fB{}\\fR{}\n{}{}\n.RE",
                roff(&name),
                roff(&value),
                roff(&help),
                roff(&default)
            )?;
        }
    }
    man.render_version_section(out)?;
    Ok(())
}

/// `text` escaped for roff: backslashes and hyphens, and a leading control character.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\\\").replace('-', "\\-");
    match escaped.chars().next() {
        Some('.' | '\'') => format!("\\&{escaped}"),
        _ => escaped,
    }
}

/// Runs the parsed command line and returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    if let Err(e) = init_logging(cli.log_format, cli.log_level.as_deref()) {
        eprintln!("{e}");
        return ExitCode::from(2);
    }
    match &cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "token-proxy",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            return match man_page(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cannot write the man page: {e}");
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    let (config, workers) = match &cli.command {
        Command::Run { config } | Command::Check { config } | Command::Token { config, .. } => {
            match load(config) {
                Ok(c) => {
                    let w = cli.workers.or(c.workers);
                    (Some(c), w)
                }
                Err(code) => return code,
            }
        }
        _ => (None, cli.workers),
    };
    if workers == Some(0) {
        eprintln!("--workers must be at least 1");
        return ExitCode::from(2);
    }
    // One current-thread runtime per worker: this thread's accepts connections, runs the
    // refreshers and the admin listener, and serves its share of connections; the others
    // serve theirs (`server::Workers`). The benchmark showed this faster than a
    // work-stealing pool, which moves a connection's tasks between threads.
    let workers = workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let runtime = match current_thread_runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let stop_workers = tokio_util::sync::CancellationToken::new();
    let mut threads = Vec::new();
    if workers > 1 && matches!(cli.command, Command::Run { .. } | Command::Demo { .. }) {
        let mut handles = Vec::new();
        for i in 1..workers {
            let rt = match current_thread_runtime() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start worker runtime {i}: {e}");
                    return ExitCode::from(1);
                }
            };
            handles.push(rt.handle().clone());
            let stop = stop_workers.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("token-proxy-worker-{i}"))
                .spawn(move || {
                    crate::metrics::set_worker(i);
                    rt.block_on(stop.cancelled())
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    eprintln!("cannot start worker thread {i}: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        crate::server::Workers::install(handles);
    }
    let code = runtime.block_on(async move {
        match (cli.command, config) {
            (Command::Run { config: path }, Some(config)) => run(&config, &path).await,
            (Command::Check { .. }, Some(config)) => check(&config).await,
            (Command::Token { credential, .. }, Some(config)) => {
                token(&config, credential.as_deref()).await
            }
            (
                Command::Demo {
                    listen,
                    admin_listen,
                },
                _,
            ) => run_demo(listen, admin_listen).await,
            (
                Command::Health {
                    config: Some(path),
                    timeout,
                    ..
                },
                _,
            ) => match readyz_url(&path) {
                Ok(url) => health(&url, timeout).await,
                Err(code) => code,
            },
            (Command::Health { url, timeout, .. }, _) => health(&url, timeout).await,
            _ => unreachable!("config is loaded for every command that needs one"),
        }
    });
    stop_workers.cancel();
    for t in threads {
        let _ = t.join();
    }
    code
}

fn current_thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

async fn run(config: &Config, path: &std::path::Path) -> ExitCode {
    match app::run(config, Some(path), app::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(if e.is_config() { 2 } else { 1 })
        }
    }
}

fn source_for(
    config: &Config,
    cred: &crate::config::CredentialConfig,
) -> Result<TokenSource, ExitCode> {
    TokenSource::new(cred).map_err(|e| {
        eprintln!(
            "config error in {}: credentials.{}.ca_file: {e}\n  fix: point ca_file at a PEM file of CA certificates",
            config.source, cred.name
        );
        ExitCode::from(2)
    })
}

/// Validates, then tries what `run` would need: each listener bound (and released), each
/// upstream reached, one token per credential; every one is tried and reported, and the last
/// line is the verdict.
async fn check(config: &Config) -> ExitCode {
    if let Err(e) = app::preflight(config) {
        eprintln!("{e}");
        println!("check: FAILED (config error)");
        return ExitCode::from(2);
    }
    println!(
        "config {}: ok ({} credentials, {} routes)",
        config.source,
        config.credentials.len(),
        config.routes.len()
    );
    let mut failed = 0;
    for (i, route) in config.routes.iter().enumerate() {
        let name = &route.name;
        let port_fixed = route.listen.tcp().is_none_or(|a| a.port() != 0);
        let shared = config.routes[..i]
            .iter()
            .find(|o| port_fixed && o.listen == route.listen);
        if let Some(first) = shared {
            println!(
                "route {name}: listen {} (path_prefix {}): shared with route {}",
                route.listen,
                if route.path_prefix.is_empty() {
                    "/"
                } else {
                    &route.path_prefix
                },
                first.name
            );
        } else {
            match crate::probe::bind(&route.listen) {
                Ok(what) => println!("route {name}: listen {}: {what}", route.listen),
                Err(e) => {
                    failed += 1;
                    println!(
                        "route {name}: listen {}: FAILED: {} (routes[{i}].listen: {})",
                        route.listen, e.why, e.fix
                    );
                }
            }
        }
        let set: Vec<&str> = route
            .set_headers
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(route.set_header_files.iter().map(|(n, _, _)| n.as_str()))
            .collect();
        if !set.is_empty() || !route.token_stamp.is_default() {
            let stamp = &route.token_stamp;
            println!(
                "route {name}: token in {}: {}{{token}}{}; sets {} (values not shown)",
                stamp.header,
                stamp.prefix,
                stamp.suffix,
                if set.is_empty() {
                    "no other field".to_owned()
                } else {
                    set.join(", ")
                }
            );
        }
        match crate::probe::upstream(route).await {
            Ok(what) => println!("route {name}: upstream {}: {what}", route.upstream.url),
            Err(why) => {
                failed += 1;
                println!(
                    "route {name}: upstream {}: FAILED: {why}",
                    route.upstream.url
                );
            }
        }
    }
    for cred in &config.credentials {
        let via = cred
            .proxy
            .as_ref()
            .map(|p| format!(", through forward proxy {}", p.uri()))
            .unwrap_or_default();
        println!(
            "credential {}: authenticates with {}{via}",
            cred.name,
            cred.kind()
        );
        let source = match source_for(config, cred) {
            Ok(s) => s,
            Err(code) => return code,
        };
        match source.fetch().await {
            Ok(t) => println!(
                "credential {}: ok, token lifetime {} s (from {})",
                cred.name,
                t.lifetime.as_secs(),
                cred.token_url
            ),
            Err(e) => {
                failed += 1;
                println!("credential {}: FAILED: {e}", cred.name);
            }
        }
    }
    if failed > 0 {
        println!(
            "check: FAILED ({failed} problem{} above)",
            if failed == 1 { "" } else { "s" }
        );
        ExitCode::from(1)
    } else {
        println!("check: ok");
        ExitCode::SUCCESS
    }
}

async fn token(config: &Config, name: Option<&str>) -> ExitCode {
    let cred = match name {
        Some(n) => config.credential(n),
        None if config.credentials.len() == 1 => config.credentials.first(),
        None => None,
    };
    let Some(cred) = cred else {
        let names: Vec<&str> = config.credentials.iter().map(|c| c.name.as_str()).collect();
        match name {
            Some(n) => eprintln!(
                "no credential is named `{n}` in {}; known: {}",
                config.source,
                names.join(", ")
            ),
            None => eprintln!(
                "{} has several credentials; choose one with --credential ({})",
                config.source,
                names.join(", ")
            ),
        }
        return ExitCode::from(2);
    };
    let source = match source_for(config, cred) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match source.fetch().await {
        Ok(t) => {
            println!("{}", t.access_token.expose());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("credential {}: {e}", cred.name);
            ExitCode::from(1)
        }
    }
}

/// The readiness URL of the admin listener that the config at `path` names; a config error,
/// or a config without `admin_listen`, is reported here (exit 2).
fn readyz_url(path: &std::path::Path) -> Result<String, ExitCode> {
    let config = load(path)?;
    let Some(admin) = config.admin_listen else {
        eprintln!(
            "{}: admin_listen: not set, and `health --config` probes the admin listener's /readyz: \
             add `admin_listen = \"127.0.0.1:9901\"` to the config, or give --url",
            path.display()
        );
        return Err(ExitCode::from(2));
    };
    Ok(format!("http://{}/readyz", probe_addr(admin)))
}

/// Where to reach a listener bound to `addr`: an unspecified address (`0.0.0.0`, `::`) is
/// reached on the loopback address of its family.
fn probe_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// One GET of `url` over plain HTTP/1.1: exit 0 on 200, 1 on anything else, 2 on a bad URL.
async fn health(url: &str, timeout: f64) -> ExitCode {
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("--url {url:?}: {e}");
            return ExitCode::from(2);
        }
    };
    let (Some("http"), Some(authority)) = (uri.scheme_str(), uri.authority().cloned()) else {
        eprintln!(
            "--url {url:?}: give an http:// URL of the admin listener, e.g. {DEFAULT_HEALTH_URL}"
        );
        return ExitCode::from(2);
    };
    let limit = Duration::from_secs_f64(timeout.clamp(0.1, 300.0));
    let probe = async {
        let port = authority.port_u16().unwrap_or(80);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let req = http::Request::get(path)
            .header(http::header::HOST, authority.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(std::io::Error::other)?;
        let response = sender
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(response.status())
    };
    match tokio::time::timeout(limit, probe).await {
        Ok(Ok(status)) if status == http::StatusCode::OK => {
            println!("{url}: {status}");
            ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            println!("{url}: {status}: not ready");
            ExitCode::from(1)
        }
        Ok(Err(e)) => {
            println!("{url}: {e}");
            ExitCode::from(1)
        }
        Err(_) => {
            println!("{url}: no answer within {timeout} s");
            ExitCode::from(1)
        }
    }
}

async fn run_demo(listen: SocketAddr, admin_listen: SocketAddr) -> ExitCode {
    // The demo's config is embedded: an address that cannot be bound is named by the flag
    // the user gave (or can give), not by the config key behind it.
    for (flag, addr) in [("--listen", listen), ("--admin-listen", admin_listen)] {
        if addr.port() == 0 {
            continue;
        }
        if let Err(e) = std::net::TcpListener::bind(addr) {
            eprintln!(
                "{flag} {addr}: cannot listen there: {e}; choose another address, e.g. {flag} 127.0.0.1:{}",
                addr.port().wrapping_add(1).max(1024)
            );
            return ExitCode::from(2);
        }
    }
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let started = async {
        let idp = demo::start_token_endpoint(loopback, Duration::from_secs(30)).await?;
        let api = demo::start_echo_api(loopback, idp.state().tokens.clone()).await?;
        Ok::<_, std::io::Error>((idp, api))
    };
    let (idp, api) = match started.await {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("cannot start the demo servers: {e}");
            return ExitCode::from(1);
        }
    };
    let text = demo::demo_config(&demo::token_url(&idp), api.addr(), listen, admin_listen);
    let config = match Config::parse(&text, "(embedded demo config)", &|_| None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let running = match app::start(&config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(if e.is_config() { 2 } else { 1 });
        }
    };
    let addr = running.route_addrs()[0];
    println!("token-proxy demo");
    println!(
        "  token endpoint (embedded): {}  issues 30-second tokens",
        demo::token_url(&idp)
    );
    println!(
        "  echo API (embedded):       http://{}/api  (401 without a current token)",
        api.addr()
    );
    println!("  proxy:                     http://{addr}  -> echo API, token stamped on");
    if let Some(admin) = running.admin_addr() {
        println!("  admin:                     http://{admin}  /healthz /readyz /metrics");
    }
    println!();
    println!("Try:  curl -s 'http://{addr}/hello?name=world'");
    if let Some(admin) = running.admin_addr() {
        println!("      curl -s http://{admin}/readyz");
        println!("      token-proxy health --url http://{admin}/readyz");
    }
    println!("Stop with Ctrl-C. Watch the log for a token refresh about every 15 s.");
    app::shutdown_signal().await;
    running.shutdown().await;
    ExitCode::SUCCESS
}
