//! Tests of the configuration as a mosquitto user would check it: what a given file means,
//! and the exact error an operator sees.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use tempfile::TempDir;

use super::*;

/// Per-listener keys whose value, before any `listener` line, makes mosquitto 2.0 create its
/// default listener (`config__parse_args` in mosquitto's src/conf.c).
const CREATES_DEFAULT_LISTENER: &[(&str, &str)] = &[("max_connections", "10"), ("max_qos", "1")];

/// Per-listener keys (or values) that, before any `listener` line, do not create it.
const IGNORED_BEFORE_LISTENER: &[(&str, &str)] = &[
    ("max_connections", "-1"),
    ("max_qos", "2"),
    ("max_topic_alias", "5"),
    ("protocol", "mqtt"),
    ("listener_allow_anonymous", "false"),
];

struct Fixture {
    dir: TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    /// Dummy PEM files: config only checks that they are readable.
    fn pem(&self) -> (String, String, String) {
        let c = self.write("server.crt", "-----BEGIN CERTIFICATE-----\n");
        let k = self.write("server.key", "-----BEGIN PRIVATE KEY-----\n");
        let ca = self.write("ca.crt", "-----BEGIN CERTIFICATE-----\n");
        (
            c.display().to_string(),
            k.display().to_string(),
            ca.display().to_string(),
        )
    }

    fn load(&self, text: &str) -> Result<Config, ConfigError> {
        let p = self.write("midge.conf", text);
        load(&Cli {
            config: Some(p),
            ..Cli::default()
        })
    }

    fn ok(&self, text: &str) -> Config {
        match self.load(text) {
            Ok(c) => c,
            Err(e) => panic!("unexpected error: {e}\n--- config ---\n{text}"),
        }
    }

    /// The error message with the temp file path replaced by `FILE`.
    fn err(&self, text: &str) -> String {
        match self.load(text) {
            Ok(c) => panic!("expected an error, got {c:?}\n--- config ---\n{text}"),
            Err(e) => e
                .to_string()
                .replace(&self.path("midge.conf").display().to_string(), "FILE"),
        }
    }
}

fn ok(text: &str) -> Config {
    Fixture::new().ok(text)
}

fn err(text: &str) -> String {
    Fixture::new().err(text)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn has_warning(c: &Config, key: &str) -> bool {
    c.warnings.iter().any(|w| w.key == key)
}

// ---- defaults ---------------------------------------------------------------------------

#[test]
fn no_arguments_means_loopback_anonymous_listener_and_mosquitto_limits() {
    let c = load(&Cli::default()).expect("defaults load");
    assert_eq!(c, Config::default());
    assert_eq!(c.listeners.len(), 1);
    let l = &c.listeners[0];
    assert_eq!(l.addr, addr("127.0.0.1:1883"));
    assert!(l.allow_anonymous);
    assert!(l.tls.is_none());
    assert_eq!(l.max_connections, None);
    assert_eq!(l.max_qos, QoS::ExactlyOnce);
    assert_eq!(
        c.shards,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // mosquitto's documented defaults.
    assert_eq!(c.limits.max_inflight_messages, 20);
    assert_eq!(c.limits.max_queued_messages, 1000);
    assert_eq!(c.limits.max_queued_bytes, 0);
    assert_eq!(c.limits.message_size_limit, 0);
    assert_eq!(c.limits.max_keepalive, 65535);
    assert_eq!(c.limits.max_subscriptions_per_client, 10_000);
    assert!(c.limits.retain_available);
    assert_eq!(c.limits.persistent_client_expiration, None);
    assert!(!c.limits.queue_qos0_messages);
    assert_eq!(c.sys_interval, Some(Duration::from_secs(10)));
    assert_eq!(c.log.dest, LogDest::Stderr);
    assert_eq!(c.log.level, LevelFilter::INFO);
    assert!(c.warnings.is_empty());
}

#[test]
fn cli_parses_mosquitto_style_flags() {
    let cli = Cli::try_parse_from([
        "midge",
        "-c",
        "/etc/midge.conf",
        "-p",
        "1884",
        "--bind",
        "0.0.0.0",
        "--shards",
        "2",
        "-v",
        "--check-config",
    ])
    .expect("parse");
    assert_eq!(cli.config.as_deref(), Some(Path::new("/etc/midge.conf")));
    assert_eq!(cli.port, Some(1884));
    assert_eq!(cli.bind, Some("0.0.0.0".parse().expect("ip")));
    assert_eq!(cli.shards, Some(2));
    assert!(cli.verbose && cli.check_config);
    assert_eq!(
        format!("{:?}", Cli::try_parse_from(["midge"]).expect("parse")),
        format!("{:?}", Cli::default())
    );
    // mosquitto spells it --config-file.
    let cli = Cli::try_parse_from(["midge", "--config-file", "x.conf"]).expect("parse");
    assert_eq!(cli.config.as_deref(), Some(Path::new("x.conf")));
}

#[test]
fn cli_rejects_incomplete_tls_and_bad_ports() {
    assert!(Cli::try_parse_from(["midge", "--cafile", "ca.pem"]).is_err());
    assert!(Cli::try_parse_from(["midge", "--tls-listen", "0.0.0.0:8883"]).is_err());
    assert!(
        Cli::try_parse_from(["midge", "--tls-listen", "0.0.0.0:8883", "--certfile", "c"]).is_err()
    );
    assert!(Cli::try_parse_from(["midge", "-p", "0"]).is_err());
    assert!(Cli::try_parse_from(["midge", "-p", "70000"]).is_err());
    assert!(Cli::try_parse_from(["midge", "-d"]).is_err());
}

#[test]
fn reload_subcommand_parses() {
    let cli =
        Cli::try_parse_from(["midge", "reload", "--pid-file", "/run/midge.pid"]).expect("parse");
    match cli.command {
        Some(Command::Reload(args)) => assert_eq!(
            args,
            ReloadArgs {
                pid_file: Some("/run/midge.pid".into()),
                ..ReloadArgs::default()
            }
        ),
        other => panic!("expected reload, got {other:?}"),
    }
    assert!(Cli::try_parse_from(["midge", "reload", "--pid", "5", "--pid-file", "x"]).is_err());
}

#[test]
fn cli_shards_zero_is_an_error() {
    let e = load(&Cli {
        shards: Some(0),
        ..Cli::default()
    })
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "command line: option '--shards': expected a number 1-64, got '0'"
    );
}

// ---- listeners and anonymous access -----------------------------------------------------

#[test]
fn file_without_listener_is_local_only_mode() {
    let c = ok("# only limits\nmax_inflight_messages 5\n\n");
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].addr, addr("127.0.0.1:1883"));
    assert!(c.listeners[0].allow_anonymous);
    // An explicit allow_anonymous false is honoured even in local-only mode.
    let c = ok("allow_anonymous false\n");
    assert!(!c.listeners[0].allow_anonymous);
}

#[test]
fn listener_without_address_binds_all_ipv4_and_denies_anonymous() {
    let c = ok("listener 1883\n");
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].addr, addr("0.0.0.0:1883"));
    assert!(!c.listeners[0].allow_anonymous, "mosquitto 2.0 default");
    // No client could ever connect: warn.
    assert!(has_warning(&c, "allow_anonymous"));
}

#[test]
fn listener_addresses() {
    let c = ok("listener 1883 127.0.0.1\nlistener 1884 ::1\nlistener 1885 localhost\n");
    let addrs: Vec<SocketAddr> = c.listeners.iter().map(|l| l.addr).collect();
    assert_eq!(
        addrs,
        vec![
            addr("127.0.0.1:1883"),
            addr("[::1]:1884"),
            addr("127.0.0.1:1885")
        ]
    );
    assert_eq!(
        err("listener abc\n"),
        "FILE:1: key 'listener': expected a port 1-65535, got 'abc'"
    );
    assert!(err("listener\n").contains("missing port"));
    assert!(err("listener 0 /tmp/mqtt.sock\n").contains("unix"));
    assert!(err("listener 1883 1.2.3.4 extra\n").contains("unexpected 'extra'"));
}

#[test]
fn allow_anonymous_is_global_without_per_listener_settings() {
    // Written inside the second section, it still applies to every listener (mosquitto).
    let c = ok("listener 1883\nlistener 1884\nallow_anonymous true\n");
    assert!(c.listeners.iter().all(|l| l.allow_anonymous));
    let c = ok("allow_anonymous true\nlistener 1883\n");
    assert!(c.listeners[0].allow_anonymous);
}

#[test]
fn per_listener_settings_scopes_allow_anonymous() {
    let c = ok("per_listener_settings true\n\
         listener 1883 127.0.0.1\nallow_anonymous true\n\
         listener 1884\n");
    assert!(c.per_listener_settings);
    assert!(c.listeners[0].allow_anonymous);
    assert!(
        !c.listeners[1].allow_anonymous,
        "a listener without its own value denies"
    );
    // Before the first listener it concerns the default listener only.
    let c = ok("per_listener_settings true\nallow_anonymous true\nport 1883\nlistener 1884\n");
    assert_eq!(c.listeners[0].addr, addr("0.0.0.0:1883"));
    assert!(c.listeners[0].allow_anonymous);
    assert!(!c.listeners[1].allow_anonymous);
    let c = ok("per_listener_settings true\nallow_anonymous true\nlistener 1884\n");
    assert!(!c.listeners[0].allow_anonymous);
    assert!(has_warning(&c, "allow_anonymous"));
}

#[test]
fn per_listener_settings_must_come_first() {
    assert_eq!(
        err("allow_anonymous true\nlistener 1883\nper_listener_settings true\n"),
        "FILE:3: key 'per_listener_settings': must be set before any allow_anonymous, \
         password_file, acl_file or check_retain_source line (first one at FILE:1), because it \
         changes what that line applies to"
    );
    // As in mosquitto, listener lines before it and `false` after allow_anonymous are fine.
    let c = ok("listener 1883\nper_listener_settings true\nallow_anonymous true\n");
    assert!(c.per_listener_settings && c.listeners[0].allow_anonymous);
    let c = ok("allow_anonymous true\nper_listener_settings false\nlistener 1883\n");
    assert!(c.listeners[0].allow_anonymous);
}

#[test]
fn listener_allow_anonymous_overrides_for_its_listener() {
    let c = ok("allow_anonymous false\nlistener 1883 127.0.0.1\nlistener_allow_anonymous true\nlistener 1884\n");
    assert!(c.listeners[0].allow_anonymous);
    assert!(!c.listeners[1].allow_anonymous);
}

#[test]
fn legacy_port_and_bind_address_make_the_default_listener() {
    let c = ok("port 1884\n");
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].addr, addr("0.0.0.0:1884"));
    assert!(!c.listeners[0].allow_anonymous);
    let c = ok("bind_address 127.0.0.1\n");
    assert_eq!(c.listeners[0].addr, addr("127.0.0.1:1883"));
    let c = ok("listener 8883 127.0.0.1\nport 1884\nbind_address 127.0.0.1\n");
    let addrs: Vec<SocketAddr> = c.listeners.iter().map(|l| l.addr).collect();
    assert_eq!(
        addrs,
        vec![addr("127.0.0.1:1884"), addr("127.0.0.1:8883")],
        "default listener first"
    );
}

#[test]
fn per_listener_key_before_any_listener_creates_the_default_listener_as_mosquitto_does() {
    for (key, value) in CREATES_DEFAULT_LISTENER {
        let c = ok(&format!("{key} {value}\nlistener 8883 127.0.0.1\n"));
        assert_eq!(c.listeners.len(), 2, "{key}");
        assert_eq!(c.listeners[0].addr, addr("0.0.0.0:1883"), "{key}");
        assert!(has_warning(&c, key), "{key}");
    }
    for (key, value) in IGNORED_BEFORE_LISTENER {
        let c = ok(&format!("{key} {value}\nlistener 8883 127.0.0.1\n"));
        let addrs: Vec<SocketAddr> = c.listeners.iter().map(|l| l.addr).collect();
        assert_eq!(addrs, vec![addr("127.0.0.1:8883")], "{key} {value}");
        assert!(has_warning(&c, key), "{key}: no-effect warning");
    }
    let c = ok("max_connections 10\nlistener 8883 127.0.0.1\nmax_connections 20\n");
    assert_eq!(c.listeners[0].max_connections, Some(10));
    assert_eq!(c.listeners[1].max_connections, Some(20));
    // A key that does not create it still configures it when `port` does.
    let c = ok("max_topic_alias 5\nport 1884\nlistener 8883 127.0.0.1\n");
    assert_eq!(c.listeners[0].addr, addr("0.0.0.0:1884"));
    assert_eq!(c.listeners[0].max_topic_alias, 5);
}

#[test]
fn repeated_listener_line_reopens_its_section() {
    let c = ok("listener 1883 127.0.0.1\nmax_qos 1\nlistener 1884 127.0.0.1\nlistener 1883 127.0.0.1\nmax_connections 5\n");
    assert_eq!(c.listeners.len(), 2);
    assert_eq!(c.listeners[0].max_qos, QoS::AtLeastOnce);
    assert_eq!(c.listeners[0].max_connections, Some(5));
    assert_eq!(c.listeners[1].max_connections, None);
}

#[test]
fn overlapping_listeners_are_refused() {
    // SO_REUSEPORT would let these share the port silently.
    assert_eq!(
        err("port 1883\nlistener 1883\n"),
        "FILE:2: listener 0.0.0.0:1883 overlaps listener 0.0.0.0:1883 declared at FILE:1: \
         both would accept on port 1883"
    );
    assert!(err("listener 1883 127.0.0.1\nlistener 1883\n").starts_with("FILE:2:"));
    assert!(err("listener 1883 ::\nlistener 1883 127.0.0.1\n").contains("overlaps"));
    ok("listener 1883 127.0.0.1\nlistener 1883 ::1\nlistener 1884\n");
}

#[test]
fn max_connections_and_max_qos() {
    let c =
        ok("listener 1883\nmax_connections -1\nlistener 1884\nmax_connections 100\nmax_qos 0\n");
    assert_eq!(c.listeners[0].max_connections, None);
    assert_eq!(c.listeners[1].max_connections, Some(100));
    assert_eq!(c.listeners[1].max_qos, QoS::AtMostOnce);
    assert_eq!(
        err("listener 1883\nmax_connections 0\n"),
        "FILE:2: key 'max_connections': expected -1 (unlimited) or a number 1-2147483647, got '0'"
    );
    assert_eq!(
        err("listener 1883\nmax_qos 3\n"),
        "FILE:2: key 'max_qos': expected a number 0-2, got '3'"
    );
}

#[test]
fn max_topic_alias_is_per_listener() {
    let c = ok("listener 1883\nmax_topic_alias 0\nlistener 1884\n");
    assert_eq!(c.listeners[0].max_topic_alias, 0);
    assert_eq!(c.listeners[1].max_topic_alias, 10, "mosquitto default");
    assert_eq!(
        err("listener 1883\nmax_topic_alias 70000\n"),
        "FILE:2: key 'max_topic_alias': expected a number 0-65535, got '70000'"
    );
}

#[test]
fn protocol_websockets_is_a_clear_error() {
    ok("listener 1883\nprotocol mqtt\n");
    let e = err("listener 9001\nprotocol websockets\n");
    assert!(
        e.starts_with("FILE:2: key 'protocol': MQTT over WebSockets is not supported"),
        "{e}"
    );
    assert!(err("listener 1883\nprotocol coap\n").contains("expected mqtt, got 'coap'"));
}

// ---- global keys --------------------------------------------------------------------------

#[test]
fn numeric_limits_are_read_and_validated() {
    type Check = fn(&Config) -> u64;
    let cases: &[(&str, &str, u64, Check, &str, &str)] = &[
        (
            "max_inflight_messages",
            "1",
            1,
            |c| c.limits.max_inflight_messages as u64,
            "abc",
            "expected a number 0-65535, got 'abc'",
        ),
        (
            "max_inflight_messages",
            "0",
            0,
            |c| c.limits.inflight_window() as u64 - 65535,
            "65536",
            "expected a number 0-65535, got '65536'",
        ),
        (
            "max_queued_messages",
            "5000",
            5000,
            |c| c.limits.max_queued_messages as u64,
            "-1",
            "expected a number 0-4294967295, got '-1'",
        ),
        (
            "max_queued_bytes",
            "1048576",
            1_048_576,
            |c| c.limits.max_queued_bytes,
            "1MB",
            "got '1MB'",
        ),
        (
            "message_size_limit",
            "268435455",
            268_435_455,
            |c| c.limits.message_size_limit as u64,
            "268435456",
            "expected a number 0-268435455, got '268435456'",
        ),
        (
            "max_packet_size",
            "1024",
            1024,
            |c| c.limits.max_packet_size as u64,
            "19",
            "below 20 bytes",
        ),
        (
            "max_packet_size",
            "0",
            268_435_460,
            |c| c.limits.effective_max_packet_size() as u64,
            "x",
            "expected 0 (protocol maximum) or a number 20-268435460, got 'x'",
        ),
        (
            "max_keepalive",
            "60",
            60,
            |c| c.limits.max_keepalive as u64,
            "65536",
            "expected a number 0-65535, got '65536'",
        ),
        (
            "max_subscriptions_per_client",
            "50",
            50,
            |c| c.limits.max_subscriptions_per_client as u64,
            "-1",
            "expected a number",
        ),
        (
            "sys_interval",
            "30",
            30,
            |c| c.sys_interval.map_or(0, |d| d.as_secs()),
            "ten",
            "expected a number",
        ),
        (
            "sys_interval",
            "0",
            0,
            |c| c.sys_interval.map_or(0, |d| d.as_secs() + 1),
            "1.5",
            "got '1.5'",
        ),
        (
            "autosave_interval",
            "60",
            60,
            |c| c.autosave_interval.as_secs(),
            "x",
            "expected a number",
        ),
        (
            "shards",
            "1",
            1,
            |c| c.shards as u64,
            "0",
            "expected a number 1-64, got '0'",
        ),
    ];
    for (key, good, want, get, bad, msg) in cases {
        let c = ok(&format!("# comment\n{key} {good}\n"));
        assert_eq!(get(&c), *want, "{key} {good}");
        let e = err(&format!("# comment\n\n{key} {bad}\n"));
        assert!(e.starts_with(&format!("FILE:3: key '{key}': ")), "{e}");
        assert!(e.contains(msg), "{key} {bad}: {e}");
    }
}

#[test]
fn exact_error_format_names_file_line_and_key() {
    assert_eq!(
        err("listener 1883\n\n# note\nmax_inflight_messages abc\n"),
        "FILE:4: key 'max_inflight_messages': expected a number 0-65535, got 'abc'"
    );
}

#[test]
fn message_size_limit_above_packet_size_warns() {
    let c = ok("max_packet_size 1000\nmessage_size_limit 5000\n");
    assert!(has_warning(&c, "message_size_limit"));
    assert!(!has_warning(
        &ok("message_size_limit 5000\n"),
        "message_size_limit"
    ));
}

#[test]
fn run_check_config_exit_status() {
    assert_eq!(run_check_config(&Cli::default()), 0);
    let f = Fixture::new();
    let p = f.write("bad.conf", "password_file /x\n");
    assert_eq!(
        run_check_config(&Cli {
            config: Some(p),
            ..Cli::default()
        }),
        1
    );
}

#[test]
fn booleans_are_validated() {
    let c = ok("retain_available false\nqueue_qos0_messages true\n");
    assert!(!c.limits.retain_available);
    assert!(c.limits.queue_qos0_messages);
    assert_eq!(
        err("retain_available yes\n"),
        "FILE:1: key 'retain_available': expected true or false, got 'yes'"
    );
}

#[test]
fn values_with_trailing_text_are_refused() {
    assert_eq!(
        err("max_keepalive 60 # one minute\n"),
        "FILE:1: key 'max_keepalive': expected one value, got '60 # one minute' \
         (comments must be on their own line)"
    );
    assert_eq!(
        err("max_keepalive\n"),
        "FILE:1: key 'max_keepalive': missing value"
    );
}

#[test]
fn persistent_client_expiration_uses_mosquitto_durations() {
    let day = 86_400;
    for (v, secs) in [
        ("2h", 7200),
        ("14d", 14 * day),
        ("1w", 7 * day),
        ("1m", 30 * day),
        ("1y", 365 * day),
    ] {
        let c = ok(&format!("persistent_client_expiration {v}\n"));
        assert_eq!(
            c.limits.persistent_client_expiration,
            Some(Duration::from_secs(secs)),
            "{v}"
        );
    }
    let e = err("persistent_client_expiration 10\n");
    assert!(
        e.starts_with("FILE:1: key 'persistent_client_expiration': expected a duration"),
        "{e}"
    );
}

#[test]
fn queues_must_be_bounded() {
    let e = err("max_queued_messages 0\n");
    assert!(
        e.starts_with("FILE:1: key 'max_queued_messages': 0 (no maximum)"),
        "{e}"
    );
    let c = ok("max_queued_messages 0\nmax_queued_bytes 1000000\n");
    assert_eq!(c.limits.max_queued_messages, 0);
    assert_eq!(c.limits.max_queued_bytes, 1_000_000);
}

#[test]
fn persistence_keys() {
    assert_eq!(ok("persistence false\n").persistence, None);
    let c = ok("persistence true\npersistence_location /var/lib/x\npersistence_sync batch\n");
    let p = c.persistence.expect("on");
    assert_eq!(p.dir, std::path::PathBuf::from("/var/lib/x/midge.db"));
    assert_eq!(p.sync, crate::config::SyncMode::Batch);
    let c = ok("persistence true\npersistence_file m.db\n");
    assert_eq!(c.persistence.unwrap().sync, crate::config::SyncMode::Always);
    assert_eq!(p.timeout, std::time::Duration::from_secs(30));
    let c = ok("persistence true\npersistence_timeout 3\n");
    assert_eq!(
        c.persistence.unwrap().timeout,
        std::time::Duration::from_secs(3)
    );
    let c = ok("persistence true\npersistence_max_backlog 65536\n");
    assert_eq!(c.persistence.unwrap().max_backlog, 65536);
    let e = err("persistence true\npersistence_max_backlog 100\n");
    assert!(e.contains("persistence_max_backlog"), "{e}");
    let e = err("persistence true\npersistence_timeout 0\n");
    assert!(e.contains("persistence_timeout"), "{e}");
    let e = err("persistence true\npersistence_sync sometimes\n");
    assert!(e.contains("expected always, batch or none"), "{e}");
    let e = err("persistence maybe\n");
    assert!(e.starts_with("FILE:1: key 'persistence'"), "{e}");
}

#[test]
fn set_tcp_nodelay_is_accepted_with_a_note() {
    let c = ok("set_tcp_nodelay true\n");
    let w = c
        .warnings
        .iter()
        .find(|w| w.key == "set_tcp_nodelay")
        .expect("note");
    assert!(w.info);
    assert!(w.message.contains("always sets TCP_NODELAY"));
    assert!(err("set_tcp_nodelay maybe\n").contains("expected true or false"));
}

#[test]
fn upgrade_outgoing_qos() {
    let c = ok("upgrade_outgoing_qos false\n");
    assert!(has_warning(&c, "upgrade_outgoing_qos"));
    assert!(err("upgrade_outgoing_qos true\n").contains("not supported by Midge"));
}

#[test]
fn pid_file_is_kept() {
    let c = ok("pid_file /run/midge/midge.pid\n");
    assert_eq!(
        c.pid_file.as_deref(),
        Some(Path::new("/run/midge/midge.pid"))
    );
}

// ---- logging ------------------------------------------------------------------------------

#[test]
fn log_dest() {
    assert_eq!(ok("log_dest stdout\n").log.dest, LogDest::Stdout);
    assert_eq!(
        ok("log_dest stderr\nlog_dest stderr\n").log.dest,
        LogDest::Stderr
    );
    assert_eq!(ok("log_dest none\n").log.dest, LogDest::None);
    let e = err("log_dest file /var/log/mosquitto.log\n");
    assert!(
        e.starts_with("FILE:1: key 'log_dest': 'file' is not supported by Midge"),
        "{e}"
    );
    assert!(err("log_dest syslog\n").contains("'syslog' is not supported"));
    assert!(err("log_dest topic\n").contains("'topic' is not supported"));
    assert!(err("log_dest stdout\nlog_dest stderr\n").contains("one destination"));
}

#[test]
fn log_type_maps_to_a_level() {
    let level = |t: &str| ok(t).log.level;
    assert_eq!(level("log_type error\n"), LevelFilter::ERROR);
    assert_eq!(
        level("log_type error\nlog_type warning\n"),
        LevelFilter::WARN
    );
    assert_eq!(level("log_type notice\n"), LevelFilter::INFO);
    assert_eq!(level("log_type information\n"), LevelFilter::INFO);
    assert_eq!(
        level("log_type debug\nlog_type error\n"),
        LevelFilter::DEBUG
    );
    assert_eq!(level("log_type all\n"), LevelFilter::TRACE);
    assert_eq!(level("log_type none\n"), LevelFilter::OFF);
    assert!(err("log_type verbose\n").contains("got 'verbose'"));
    // -v wins over the file, as mosquitto's -v.
    let f = Fixture::new();
    let p = f.write("m.conf", "log_type error\n");
    let c = load(&Cli {
        config: Some(p),
        verbose: true,
        ..Cli::default()
    })
    .expect("load");
    assert_eq!(c.log.level, LevelFilter::TRACE);
}

#[test]
fn log_type_is_mosquittos_set_the_first_line_replacing_the_default() {
    assert_eq!(ok("").log.types, LogTypes::DEFAULT);
    // As mosquitto's conf.c: `log_type subscribe` alone logs only subscribe lines (and a
    // warning says errors are no longer logged).
    let c = ok("log_type subscribe\n");
    assert_eq!(c.log.types, LogTypes::SUBSCRIBE);
    assert!(has_warning(&c, "log_type"));
    let c = ok("log_type error\nlog_type warning\nlog_type subscribe\n");
    assert!(c.log.types.contains(LogTypes::SUBSCRIBE));
    assert!(c.log.types.contains(LogTypes::ERROR));
    assert!(!c.log.types.contains(LogTypes::NOTICE));
    assert!(!has_warning(&c, "log_type"));
    assert_eq!(
        ok("log_type error\nlog_type none\n").log.types,
        LogTypes::NONE
    );
    assert!(ok("").log.connection_messages);
    assert!(!ok("connection_messages false\n").log.connection_messages);
    assert_eq!(ok("").log.format, LogFormat::Mosquitto);
    assert_eq!(ok("log_format json\n").log.format, LogFormat::Json);
    assert!(err("log_format xml\n").contains("expected mosquitto or json"));
}

#[test]
fn metrics_listener_is_off_by_default_and_local_without_an_address() {
    assert_eq!(ok("").metrics_listener, None);
    assert_eq!(
        ok("metrics_listener 9234\n").metrics_listener,
        Some("127.0.0.1:9234".parse().unwrap())
    );
    assert_eq!(
        ok("metrics_listener 9234 0.0.0.0\n").metrics_listener,
        Some("0.0.0.0:9234".parse().unwrap())
    );
    assert!(err("metrics_listener\n").contains("metrics_listener"));
    assert!(err("metrics_listener 99999\n").contains("metrics_listener"));
    assert!(err("metrics_listener 9234 127.0.0.1 x\n").contains("unexpected 'x'"));
    let e = err("listener 1883\nmetrics_listener 1883\n");
    assert!(e.contains("overlaps the MQTT listener"), "{e}");
    // What --check-config prints reads back as the same setting.
    let c = ok("metrics_listener 9234\n");
    assert!(
        super::render::render_effective(&c).contains("metrics_listener 9234 127.0.0.1"),
        "{}",
        super::render::render_effective(&c)
    );
}

// ---- unsupported, harmless and unknown keys ---------------------------------------------------

#[test]
fn security_and_delivery_keys_are_errors() {
    for line in [
        "psk_file /etc/mosquitto/psk",
        "allow_zero_length_clientid false",
        "allow_zero_length_clientid true",
        "auth_plugin /usr/lib/auth.so",
        "plugin /usr/lib/mosquitto_dynamic_security.so",
        "plugin_opt_config_file /x.json",
        "auth_opt_backends mysql",
        "connection bridge-01",
        "bridge_cafile /x",
        "clientid_prefixes secure-",
        "mount_point tenant/",
        "max_inflight_bytes 1000",
    ] {
        let key = line.split(' ').next().unwrap_or_default();
        let e = err(&format!("listener 1883\n{line}\n"));
        assert!(
            e.starts_with(&format!("FILE:2: key '{key}': not supported by Midge: ")),
            "{line}: {e}"
        );
    }
}

#[test]
fn unknown_keys_are_errors() {
    assert_eq!(
        err("max_inflight_mesages 10\n"),
        "FILE:1: key 'max_inflight_mesages': unknown key (neither a mosquitto key Midge \
         supports nor a Midge key; check the spelling)"
    );
}

#[test]
fn harmless_keys_are_accepted_with_a_warning() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    for (key, _) in HARMLESS_KEYS {
        if *key == "user" && root {
            continue;
        }
        let c = ok(&format!("{key} something\n"));
        let w = c
            .warnings
            .iter()
            .find(|w| w.key == *key)
            .unwrap_or_else(|| panic!("no warning for {key}"));
        assert!(w.message.starts_with("accepted and ignored"), "{key}");
        assert!(w.to_string().contains(":1: key '"), "{w}");
    }
    for key in [
        "password_file",
        "acl_file",
        "check_retain_source",
        "require_client_id_match_identity",
        "psk_file",
        "allow_zero_length_clientid",
        "auth_plugin",
        "include_dir",
    ] {
        assert!(
            !HARMLESS_KEYS.iter().any(|(k, _)| *k == key),
            "{key} must not be harmless"
        );
    }
}

#[test]
fn user_is_refused_when_running_as_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(err("user mosquitto\n").contains("does not drop privileges"));
    } else {
        assert!(has_warning(&ok("user mosquitto\n"), "user"));
    }
}

// ---- include_dir ----------------------------------------------------------------------------

#[test]
fn include_dir_reads_conf_files_in_mosquitto_order() {
    let f = Fixture::new();
    let d = f.path("conf.d");
    std::fs::create_dir(&d).expect("mkdir");
    // Expected order: A.conf, a.conf, B.conf.
    std::fs::write(d.join("B.conf"), "sys_interval 3\n").expect("write");
    std::fs::write(d.join("a.conf"), "sys_interval 2\nmax_keepalive 20\n").expect("write");
    std::fs::write(d.join("A.conf"), "sys_interval 1\nmax_keepalive 10\n").expect("write");
    std::fs::write(d.join("notes.txt"), "garbage\n").expect("write");
    let c = f.ok(&format!("include_dir {}\n", d.display()));
    assert_eq!(c.sys_interval, Some(Duration::from_secs(3)));
    assert_eq!(c.limits.max_keepalive, 20);

    std::fs::write(d.join("c.conf"), "bogus_key 1\n").expect("write");
    let e = f.err(&format!("include_dir {}\n", d.display()));
    assert!(e.contains("c.conf:1: key 'bogus_key'"), "{e}");

    std::fs::remove_file(d.join("c.conf")).expect("rm");
    std::fs::write(d.join("c.conf"), format!("include_dir {}\n", d.display())).expect("write");
    let e = f.err(&format!("include_dir {}\n", d.display()));
    assert!(
        e.contains("only allowed in the main configuration file"),
        "{e}"
    );

    let e = f.err("include_dir /nonexistent/midge.d\n");
    assert!(
        e.starts_with("FILE:1: key 'include_dir': cannot read '/nonexistent/midge.d'"),
        "{e}"
    );
}

#[test]
fn unreadable_config_file_is_named() {
    let e = load(&Cli {
        config: Some("/nonexistent/midge.conf".into()),
        ..Cli::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("/nonexistent/midge.conf: cannot read configuration file: "),
        "{e}"
    );
}

// ---- TLS ------------------------------------------------------------------------------------------

#[test]
fn tls_listener_settings_are_read() {
    let f = Fixture::new();
    let (cert, key, ca) = f.pem();
    let crl = f.write("ca.crl", "-----BEGIN X509 CRL-----\n");
    let c = f.ok(&format!(
        "listener 8883\ncertfile {cert}\nkeyfile {key}\ncafile {ca}\ncrlfile {}\n\
         require_certificate true\nuse_identity_as_username true\ntls_version tlsv1.3\n\
         ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256\n\
         ciphers_tls1.3 TLS_AES_128_GCM_SHA256\ntls_kx_groups x25519,secp256r1\n\
         tls_handshake_timeout 5\nmax_handshakes_in_progress 64\n",
        crl.display()
    ));
    let l = &c.listeners[0];
    let t = l.tls.as_ref().expect("tls listener");
    assert_eq!(t.certfile, PathBuf::from(&cert));
    assert_eq!(t.keyfile, PathBuf::from(&key));
    assert_eq!(t.cafile, Some(PathBuf::from(&ca)));
    assert_eq!(t.crlfile, Some(crl));
    assert!(t.require_certificate && t.use_identity_as_username && !t.use_subject_as_username);
    assert_eq!(t.tls_version, TlsVersion::Tls13);
    assert_eq!(
        t.ciphers.as_deref(),
        Some("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")
    );
    assert_eq!(t.ciphers_tls13.as_deref(), Some("TLS_AES_128_GCM_SHA256"));
    assert_eq!(t.kx_groups, vec![KxGroup::X25519, KxGroup::Secp256r1]);
    assert_eq!(t.handshake_timeout, Duration::from_secs(5));
    assert_eq!(t.max_handshakes_in_progress, 64);
    assert!(!l.allow_anonymous);
    assert!(l.can_authenticate(), "identity from certificate");
    assert!(!has_warning(&c, "allow_anonymous"));
}

#[test]
fn tls_defaults() {
    let f = Fixture::new();
    let (cert, key, _) = f.pem();
    let c = f.ok(&format!(
        "listener 8883\ncertfile {cert}\nkeyfile {key}\nallow_anonymous true\n"
    ));
    let t = c.listeners[0].tls.as_ref().expect("tls");
    assert_eq!(t.tls_version, TlsVersion::Tls12);
    assert!(!t.require_certificate);
    assert!(t.kx_groups.is_empty(), "empty = the tls module's default");
    assert_eq!(t.handshake_timeout, defaults::TLS_HANDSHAKE_TIMEOUT);
    assert_eq!(
        t.max_handshakes_in_progress,
        defaults::MAX_HANDSHAKES_IN_PROGRESS
    );
    assert_eq!(t.ciphers, None);
}

#[test]
fn certfile_without_keyfile_names_both() {
    let f = Fixture::new();
    let (cert, key, ca) = f.pem();
    assert_eq!(
        f.err(&format!("listener 8883\ncertfile {cert}\n")),
        "FILE:2: key 'certfile': certfile is set but keyfile is not (listener 0.0.0.0:8883): \
         certificate-based TLS needs both certfile and keyfile"
    );
    assert!(f
        .err(&format!("listener 8883\nkeyfile {key}\n"))
        .starts_with("FILE:2: key 'keyfile': keyfile is set but certfile is not"));
    let e = f.err(&format!("listener 8883\ncafile {ca}\n"));
    assert!(
        e.starts_with("FILE:2: key 'cafile': is a TLS setting, but listener 0.0.0.0:8883 (declared at FILE:1) has no certfile and keyfile"),
        "{e}"
    );
}

#[test]
fn tls_consistency_rules() {
    let f = Fixture::new();
    let (cert, key, ca) = f.pem();
    let base = format!("listener 8883\ncertfile {cert}\nkeyfile {key}\n");
    let e = f.err(&format!("{base}require_certificate true\n"));
    assert!(e.starts_with("FILE:4: key 'require_certificate': listener 0.0.0.0:8883 requires client certificates but has no cafile or capath"), "{e}");
    let e = f.err(&format!(
        "{base}cafile {ca}\nuse_identity_as_username true\n"
    ));
    assert!(
        e.starts_with("FILE:5: key 'use_identity_as_username': needs require_certificate true"),
        "{e}"
    );
    let e = f.err(&format!(
        "{base}cafile {ca}\nrequire_certificate false\nuse_subject_as_username true\n"
    ));
    assert!(
        e.contains("key 'use_subject_as_username': needs require_certificate true"),
        "{e}"
    );
    let c = f.ok(&format!("{base}cafile {ca}\nrequire_certificate true\nuse_identity_as_username true\nuse_subject_as_username true\n"));
    assert!(has_warning(&c, "use_subject_as_username"));
    let e = f.err(&format!("{base}tls_version tlsv1.1\n"));
    assert!(e.contains("TLS 1.2 and 1.3 only"), "{e}");
    let e = f.err(&format!("{base}tls_kx_groups x25519,ffdhe2048\n"));
    assert!(
        e.starts_with("FILE:4: key 'tls_kx_groups': unknown key-exchange group 'ffdhe2048'"),
        "{e}"
    );
    let c = f.ok(&format!(
        "{base}tls_kx_groups X25519MLKEM768,p-256,x25519\nallow_anonymous true\n"
    ));
    assert_eq!(
        c.listeners[0].tls.as_ref().map(|t| t.kx_groups.clone()),
        Some(vec![
            KxGroup::X25519Mlkem768,
            KxGroup::Secp256r1,
            KxGroup::X25519
        ])
    );
    assert!(f
        .err(&format!("{base}tls_handshake_timeout 0\n"))
        .contains("expected a number of seconds 1-300"));
    assert!(f
        .err(&format!("{base}max_handshakes_in_progress 0\n"))
        .contains("expected a number 1-1000000"));
}

#[test]
fn missing_tls_files_are_reported_with_their_line() {
    let f = Fixture::new();
    let (cert, _, _) = f.pem();
    let e = f.err(&format!(
        "listener 8883\ncertfile {cert}\nkeyfile /nonexistent/server.key\n"
    ));
    assert!(
        e.starts_with("FILE:3: key 'keyfile': cannot read '/nonexistent/server.key': "),
        "{e}"
    );
}

#[test]
fn cli_tls_listener() {
    let f = Fixture::new();
    let (cert, key, ca) = f.pem();
    let cli = Cli::try_parse_from([
        "midge",
        "--tls-listen",
        "127.0.0.1:8883",
        "--certfile",
        &cert,
        "--keyfile",
        &key,
        "--cafile",
        &ca,
        "--require-certificate",
        "--use-identity-as-username",
    ])
    .expect("parse");
    let c = load(&cli).expect("load");
    // A listener is configured, so no implicit plain listener is added.
    assert_eq!(c.listeners.len(), 1);
    let l = &c.listeners[0];
    assert_eq!(l.addr, addr("127.0.0.1:8883"));
    assert!(!l.allow_anonymous);
    let t = l.tls.as_ref().expect("tls");
    assert!(t.require_certificate && t.use_identity_as_username);
    assert!(l.can_authenticate());
    assert_eq!(l.origin, Origin::Cli("--tls-listen"));

    let cli = Cli::try_parse_from([
        "midge",
        "--tls-listen",
        "127.0.0.1:8883",
        "--certfile",
        &cert,
        "--keyfile",
        &key,
        "--require-certificate",
    ])
    .expect("parse");
    assert_eq!(
        load(&cli).unwrap_err().to_string(),
        "command line: option '--require-certificate': listener \
         127.0.0.1:8883 requires client certificates but has no cafile or capath to verify them"
    );
}

// ---- command line overrides -------------------------------------------------------------------

#[test]
fn cli_overrides_the_file() {
    let f = Fixture::new();
    let p = f.write("m.conf", "port 1884\nshards 1\n");
    let c = load(&Cli {
        config: Some(p),
        port: Some(1999),
        shards: Some(1),
        ..Cli::default()
    })
    .expect("load");
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].addr, addr("0.0.0.0:1999"));
    assert_eq!(c.shards, 1);
}

#[test]
fn cli_port_alone_binds_loopback_with_anonymous() {
    let c = load(&Cli {
        port: Some(1999),
        ..Cli::default()
    })
    .expect("load");
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].addr, addr("127.0.0.1:1999"));
    assert!(c.listeners[0].allow_anonymous);
    // A public --bind never gets implicit anonymous access.
    let c = load(&Cli {
        bind: Some("0.0.0.0".parse().expect("ip")),
        ..Cli::default()
    })
    .expect("load");
    assert_eq!(c.listeners[0].addr, addr("0.0.0.0:1883"));
    assert!(!c.listeners[0].allow_anonymous);
    assert!(has_warning(&c, "allow_anonymous"));
}

#[test]
fn cli_port_adds_default_listener_beside_file_listeners() {
    let f = Fixture::new();
    let p = f.write("m.conf", "listener 8883 127.0.0.1\nallow_anonymous true\n");
    let c = load(&Cli {
        config: Some(p),
        port: Some(1999),
        ..Cli::default()
    })
    .expect("load");
    let addrs: Vec<SocketAddr> = c.listeners.iter().map(|l| l.addr).collect();
    assert_eq!(addrs, vec![addr("127.0.0.1:1999"), addr("127.0.0.1:8883")]);
}

// ---- effective configuration -------------------------------------------------------------

fn normalized(mut c: Config) -> Config {
    c.warnings.clear();
    c.source = None;
    for l in &mut c.listeners {
        l.origin = Origin::Default;
        for f in [&mut l.password_file, &mut l.acl_file]
            .into_iter()
            .flatten()
        {
            f.origin = Origin::Default;
        }
        if let Some(b) = &mut l.client_id_binding {
            b.origin = Origin::Default;
        }
    }
    c
}

#[test]
fn check_config_output_lists_defaults() {
    let out = check_config_report(&Cli::default()).expect("report");
    for line in [
        "listener 1883 127.0.0.1",
        "listener_allow_anonymous true",
        "max_inflight_messages 20",
        "max_queued_messages 1000",
        "max_packet_size 2000000",
        "log_dest stderr",
        "log_type information",
        "max_connections -1",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
    }
    assert!(out.contains("local-only mode"));
}

#[test]
fn check_config_output_reloads_to_the_same_config() {
    let f = Fixture::new();
    let (cert, key, ca) = f.pem();
    let text = format!(
        "per_listener_settings true\nshards 1\nmax_inflight_messages 0\nmax_queued_messages 0\n\
         max_queued_bytes 65536\npersistent_client_expiration 14d\nlog_type debug\nlog_dest stdout\n\
         sys_interval 0\npid_file /run/midge.pid\nqueue_qos0_messages true\n\
         port 1884\nbind_address 127.0.0.1\nallow_anonymous true\n\
         listener 8883 ::1\ncertfile {cert}\nkeyfile {key}\ncafile {ca}\nrequire_certificate true\n\
         use_subject_as_username true\ntls_kx_groups x25519\nciphers_tls1.3 TLS_AES_256_GCM_SHA384\n\
         max_connections 50000\nmax_qos 1\n\
         listener 1885 127.0.0.1\nlistener_allow_anonymous true\n"
    );
    let first = f.ok(&text);
    let rendered = render_effective(&first);
    let second = f.ok(&rendered);
    assert_eq!(
        normalized(first.clone()),
        normalized(second),
        "\n{rendered}"
    );
    // And the defaults round-trip too.
    let d = render_effective(&Config::default());
    assert_eq!(normalized(f.ok(&d)), normalized(Config::default()), "\n{d}");
    // Warnings are shown as comments.
    assert!(rendered.contains("# warning: ") || first.warnings.is_empty());
}

// ---- reload --------------------------------------------------------------------------------

/// Start a `sleep` renamed to `midge`, so /proc/PID/comm says midge, and wait until it does.
fn fake_broker(f: &Fixture, name: &str) -> std::process::Child {
    let exe = f.path(name);
    std::fs::copy("/bin/sleep", &exe).expect("copy sleep");
    // Another test thread forking while the copy's write handle was open makes exec fail with
    // "text file busy" (ETXTBSY) for a moment: retry, as Linux build tools do.
    let mut tries = 0;
    let child = loop {
        match std::process::Command::new(&exe).arg("30").spawn() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("spawn {}: {e}", exe.display()),
        }
    };
    // exec replaces comm asynchronously: wait for the new name rather than guessing a delay.
    let comm = format!("/proc/{}/comm", child.id());
    for _ in 0..500 {
        if std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == name) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn reload_sends_sighup_to_the_pid_in_the_pid_file() {
    use std::os::unix::process::ExitStatusExt;
    let f = Fixture::new();
    let mut child = fake_broker(&f, "midge");
    let pid_file = f.write("midge.pid", &format!("{}\n", child.id()));
    let pid = run_reload(&ReloadArgs {
        pid_file: Some(pid_file.clone()),
        ..ReloadArgs::default()
    })
    .expect("reload");
    assert_eq!(pid, child.id());
    let status = child.wait().expect("wait");
    assert_eq!(status.signal(), Some(libc::SIGHUP), "sleep dies of SIGHUP");

    // The process is gone now: a stale pid file is reported.
    let e = run_reload(&ReloadArgs {
        pid_file: Some(pid_file),
        force: true,
        ..ReloadArgs::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("no process with pid"), "{e}");
}

#[test]
fn reload_refuses_a_process_that_is_not_midge() {
    use std::os::unix::process::ExitStatusExt;
    let f = Fixture::new();
    let mut child = fake_broker(&f, "notmidge");
    let args = ReloadArgs {
        pid: Some(child.id()),
        ..ReloadArgs::default()
    };
    let e = run_reload(&args).unwrap_err().to_string();
    assert!(e.contains("is 'notmidge', not midge"), "{e}");
    run_reload(&ReloadArgs {
        force: true,
        ..args
    })
    .expect("forced");
    assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGHUP));
}

#[test]
fn reload_finds_pid_file_through_config_and_refuses_group_pids() {
    let f = Fixture::new();
    let conf = f.write("m.conf", "listener 1883 127.0.0.1\n");
    let e = run_reload(&ReloadArgs {
        config: Some(conf),
        ..ReloadArgs::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("has no pid_file"), "{e}");
    for pid in [0, 1, u32::MAX] {
        let e = run_reload(&ReloadArgs {
            pid: Some(pid),
            force: true,
            ..ReloadArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("refusing to signal"), "{e}");
    }
    let bad = f.write("bad.pid", "twelve\n");
    assert!(run_reload(&ReloadArgs {
        pid_file: Some(bad),
        ..ReloadArgs::default()
    })
    .unwrap_err()
    .to_string()
    .contains("expected a process id"));
}

#[test]
fn pid_file_written_and_read_back() {
    let f = Fixture::new();
    let p = f.path("x.pid");
    write_pid_file(&p, 4242).expect("write");
    assert_eq!(std::fs::read_to_string(&p).expect("read"), "4242\n");
}

#[test]
fn tuning_example_config_is_valid() {
    let f = Fixture::new();
    let certs = f.path("certs");
    std::fs::create_dir(&certs).expect("mkdir");
    for name in [
        "server.crt",
        "server.key",
        "devices-ca.crt",
        "devices-ca.crl",
    ] {
        std::fs::write(certs.join(name), "-----BEGIN-----\n").expect("write");
    }
    let text = include_str!("../../tuning/midge.conf.example")
        .replace("/etc/midge/certs", &certs.display().to_string());
    let c = f.ok(&text);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.listeners.len(), 2);
    let devices = &c.listeners[0];
    assert_eq!(devices.addr, addr("0.0.0.0:8883"));
    assert!(!devices.allow_anonymous && devices.can_authenticate());
    let t = devices.tls.as_ref().expect("tls");
    assert!(t.require_certificate && t.use_identity_as_username && t.crlfile.is_some());
    assert_eq!(t.kx_groups, vec![KxGroup::X25519, KxGroup::Secp256r1]);
    let local = &c.listeners[1];
    assert_eq!(local.addr, addr("127.0.0.1:1883"));
    assert!(local.allow_anonymous && local.tls.is_none());
    assert_eq!(c.log.level, LevelFilter::INFO);
    assert_eq!(c.limits.max_queued_bytes, 1_048_576);
}

#[test]
fn capath_is_a_directory_of_cas() {
    let f = Fixture::new();
    let (cert, key, ca) = f.pem();
    let dir = f.path("cas");
    std::fs::create_dir(&dir).expect("mkdir");
    let c = f.ok(&format!(
        "listener 8883\ncertfile {cert}\nkeyfile {key}\ncapath {}\nrequire_certificate true\n\
         use_subject_as_username true\n",
        dir.display()
    ));
    let t = c.listeners[0].tls.as_ref().expect("tls");
    assert_eq!(t.capath.as_deref(), Some(dir.as_path()));
    assert!(t.require_certificate && t.use_subject_as_username);
    assert!(c.listeners[0].can_authenticate());
    let e = f.err(&format!(
        "listener 8883\ncertfile {cert}\nkeyfile {key}\ncapath {ca}\n"
    ));
    assert!(
        e.starts_with(&format!("FILE:4: key 'capath': cannot read '{ca}'")),
        "{e}"
    );
}

mod auth;

#[test]
fn autosave_keys_set_the_compaction_cadence() {
    use crate::store::compact::Cadence;
    let cadence = |text: &str| {
        ok(&format!("persistence true\n{text}"))
            .persistence
            .unwrap()
            .compaction
    };
    assert_eq!(cadence(""), Some(Cadence::Every(Duration::from_secs(1800))));
    assert_eq!(
        cadence("autosave_interval 60\n"),
        Some(Cadence::Every(Duration::from_secs(60)))
    );
    assert_eq!(cadence("autosave_interval 0\n"), None);
    assert_eq!(
        cadence("autosave_on_changes true\nautosave_interval 500\n"),
        Some(Cadence::Changes(500))
    );
    assert_eq!(
        cadence("autosave_interval 500\nautosave_on_changes 1\n"),
        Some(Cadence::Changes(500))
    );
    assert_eq!(
        cadence("autosave_on_changes false\n"),
        Some(Cadence::Every(Duration::from_secs(1800)))
    );
    assert!(err("autosave_on_changes 2\n").contains("expected true or false"));
}
