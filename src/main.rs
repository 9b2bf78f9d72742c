//! The `driftd` binary: parse the command line, start telemetry, run.
//! Everything else is the library; its design, the promises it keeps and
//! its layers are in `docs/DESIGN.md`.

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = driftd::cli::Cli::parse();
    // The quickstart prints its own story; its pass logs would repeat it.
    let quiet = matches!(cli.command, driftd::cli::Command::Quickstart { .. });
    driftd::telemetry::init(if quiet { "warn" } else { "warn,driftd=info" });
    let code = match driftd::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            driftd::report::exit::ERROR
        }
    };
    std::process::exit(code);
}
