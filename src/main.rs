#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = keyswap::cli::Cli::parse();
    keyswap::cli::init_logging(cli.log_format);
    keyswap::cli::run(cli)
}
