//! The configuration API as main uses it, from outside the crate: parse argv, load, print
//! the effective configuration. (The binary itself is wired by main.)

use std::io::Write;

use clap::Parser;
use midge::config::{self, Cli, Command, LevelFilter, LogDest};

fn conf(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("tempfile");
    f.write_all(text.as_bytes()).expect("write");
    f
}

#[test]
fn argv_to_config_with_overrides() {
    let f = conf("listener 1883 127.0.0.1\nallow_anonymous true\nlog_dest stdout\nshards 1\n");
    let path = f.path().to_str().expect("utf-8 path");
    let cli = Cli::try_parse_from(["midge", "-c", path, "-v", "-p", "1999"]).expect("argv");
    assert!(cli.command.is_none());
    let c = config::load(&cli).expect("load");
    assert_eq!(c.shards, 1);
    assert_eq!(c.log.dest, LogDest::Stdout);
    assert_eq!(c.log.level, LevelFilter::TRACE, "-v");
    let addrs: Vec<String> = c.listeners.iter().map(|l| l.addr.to_string()).collect();
    // -p adds mosquitto's default listener, on loopback when the file did not set one.
    assert_eq!(addrs, ["127.0.0.1:1999", "127.0.0.1:1883"]);
    assert!(c.listeners.iter().all(|l| l.allow_anonymous));
}

#[test]
fn check_config_report_or_error() {
    let good = conf("listener 1883 127.0.0.1\nmax_queued_messages 50\n");
    let cli = Cli::try_parse_from([
        "midge",
        "--check-config",
        "-c",
        good.path().to_str().expect("utf-8 path"),
    ])
    .expect("argv");
    assert!(cli.check_config);
    let out = config::check_config_report(&cli).expect("valid");
    assert!(out.lines().any(|l| l == "max_queued_messages 50"), "{out}");
    assert!(out.lines().any(|l| l == "listener 1883 127.0.0.1"), "{out}");
    assert_eq!(config::run_check_config(&cli), 0);

    let bad = conf("listener 1883\nacl_file /nonexistent/midge/acl\n");
    let cli = Cli::try_parse_from(["midge", "-c", bad.path().to_str().expect("utf-8 path")])
        .expect("argv");
    let e = config::check_config_report(&cli).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}:2: key 'acl_file': /nonexistent/midge/acl: cannot read ACL file",
            bad.path().display()
        )),
        "{e}"
    );
    assert_eq!(config::run_check_config(&cli), 1);
}

#[test]
fn reload_is_a_subcommand() {
    let cli = Cli::try_parse_from(["midge", "reload", "--pid", "12345"]).expect("argv");
    assert!(matches!(cli.command, Some(Command::Reload(ref a)) if a.pid == Some(12345)));
}
