//! The `midge` binary: CLI → Config → run.
use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut cfg = midge::shard::RuntimeConfig::default();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--shards") {
        cfg.shards = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(1);
    }
    if let Some(i) = args.iter().position(|a| a == "-p") {
        cfg.listeners[0]
            .addr
            .set_port(args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(1883));
    }
    match midge::shard::run_until_signalled(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("midge: {e}");
            ExitCode::FAILURE
        }
    }
}
