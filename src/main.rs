//! The `midge` binary: CLI → Config → run. Everything else lives in the library.
use std::process::ExitCode;

use clap::Parser;
use midge::config::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Certs(cmd)) => {
            return match midge::tls::certs::run(cmd.clone()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("midge certs: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Passwd(args)) => {
            let mut prompt = midge::auth::passwd_cmd::TerminalPrompt;
            return match midge::auth::passwd_cmd::run(args, &mut prompt) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("midge passwd: Error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Reload(args)) => {
            return match config::run_reload(args) {
                Ok(pid) => {
                    println!("sent SIGHUP to midge (pid {pid})");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("midge reload: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        None => {}
    }
    if cli.check_config {
        let code = config::run_check_config(&cli);
        if code != 0 {
            return ExitCode::from(code as u8);
        }
        // The file is valid; load the TLS material as a start would (no sockets), so a key
        // that does not match its certificate fails the check rather than the next restart.
        if let Ok(cfg) = config::load(&cli) {
            if let Err(e) = midge::broker::prepare(&cfg) {
                eprintln!("midge: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    let cfg = match config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("midge: configuration error: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&cfg.log);
    for w in &cfg.warnings {
        if w.info {
            tracing::info!("{}: {}: {}", w.origin, w.key, w.message);
        } else {
            tracing::warn!("{}: {}: {}", w.origin, w.key, w.message);
        }
    }
    let prepared = match midge::broker::prepare(&cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("midge: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &cfg.pid_file {
        if let Err(e) = config::write_pid_file(path, std::process::id()) {
            eprintln!("midge: {e}");
            return ExitCode::FAILURE;
        }
    }
    let reloaders = prepared.reloaders;
    let security_files = prepared.security_files;
    let result = midge::shard::run_until_signalled(prepared.runtime, move || {
        midge::broker::reload_tls(&reloaders);
        midge::broker::reload_security(&security_files);
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("midge: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(log: &config::LogSettings) {
    if let Some(setup) = log.setup() {
        midge::logging::init(&setup);
    }
}
