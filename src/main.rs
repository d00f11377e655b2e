//! The `token-proxy` binary: parse the command line, run it, exit with its code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    token_proxy::cli::main(token_proxy::cli::Cli::parse())
}
