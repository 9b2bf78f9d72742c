//! The `driftd` binary: parse the command line, start telemetry, run.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = driftd::cli::Cli::parse();
    driftd::telemetry::init();
    let code = match driftd::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            driftd::report::exit::ERROR
        }
    };
    std::process::exit(code);
}
