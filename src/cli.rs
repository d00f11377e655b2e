//! The command line: `run`, `check`, `token` and `demo`, and the exit codes they end with.
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
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run {
        /// The TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate the config and fetch one token per credential (prints lifetimes, never tokens).
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
    },
}

/// Installs the log subscriber: `RUST_LOG` or `info`, on stderr. Dependencies are held to
/// `info` whatever `RUST_LOG` says, since their trace output can carry request bytes.
fn init_logging() {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// Runs the parsed command line and returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    init_logging();
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
        Command::Demo { .. } => (None, cli.workers),
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
                .spawn(move || rt.block_on(stop.cancelled()));
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
            (Command::Demo { listen }, _) => run_demo(listen).await,
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

async fn check(config: &Config) -> ExitCode {
    println!(
        "config {}: ok ({} credentials, {} routes)",
        config.source,
        config.credentials.len(),
        config.routes.len()
    );
    if let Err(e) = app::preflight(config) {
        eprintln!("{e}");
        return ExitCode::from(2);
    }
    let mut failed = false;
    for cred in &config.credentials {
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
                failed = true;
                println!("credential {}: FAILED: {e}", cred.name);
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
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

async fn run_demo(listen: SocketAddr) -> ExitCode {
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
    let text = demo::demo_config(&demo::token_url(&idp), api.addr(), listen);
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
    println!();
    println!("Try:  curl -s 'http://{addr}/hello?name=world'");
    println!("Stop with Ctrl-C. Watch the log for a token refresh about every 15 s.");
    app::shutdown_signal().await;
    running.shutdown().await;
    ExitCode::SUCCESS
}
