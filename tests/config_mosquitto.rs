//! The same mosquitto.conf given to mosquitto 2.0 and to Midge opens the same ports: which
//! keys create mosquitto's default listener (port 1883) is mosquitto's rule, checked against
//! the mosquitto binary itself (Debian's package, installed by scripts/test.sh).
mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::bin::{config_file, free_port, Midge};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// The ports mosquitto opens for `conf`: it logs "Opening ipv4 listen socket on port N."
/// for each before it says "running" (or fails to bind one).
fn mosquitto_ports(conf: &str) -> BTreeSet<u16> {
    let (_dir, path) = config_file(&format!("{conf}log_dest stderr\n"));
    let mut child = Command::new(MOSQUITTO)
        .args(["-c", path.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{MOSQUITTO} is not runnable ({e}): install Debian's mosquitto")
        });
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut ports = BTreeSet::new();
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.split("listen socket on port ").nth(1) {
                    ports.insert(rest.trim_end_matches('.').parse().unwrap());
                }
                let done = line.contains("running") || line.contains("Error");
                log.push(line);
                if done {
                    break;
                }
            }
            Err(_) => break, // exited (channel closed) or the deadline passed
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !ports.is_empty(),
        "mosquitto opened nothing for {conf:?}: {log:#?}"
    );
    ports
}

/// The ports Midge would listen on for `conf` (`--check-config` prints each listener).
fn midge_ports(conf: &str) -> BTreeSet<u16> {
    let (_dir, path) = config_file(conf);
    let out = Command::new(env!("CARGO_BIN_EXE_midge"))
        .args(["-c", path.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{conf:?}: {out:?}");
    text.lines()
        .filter_map(|l| l.strip_prefix("listener "))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn the_same_file_opens_the_same_ports_as_mosquitto() {
    let p1 = free_port();
    let p2 = free_port();
    let cases = [
        // The file: global keys before the first listener create nothing.
        format!(
            "per_listener_settings false\nallow_anonymous true\nmax_connections -1\n\
             listener {p1} 127.0.0.1\n"
        ),
        // Listener keys at their default values, or keys mosquitto does not count.
        format!("max_qos 2\nmax_topic_alias 5\nprotocol mqtt\nlistener {p1} 127.0.0.1\nallow_anonymous true\n"),
        format!("per_listener_settings true\nallow_anonymous true\nlistener {p1} 127.0.0.1\n"),
        // `port` creates it, wherever it is written.
        format!("listener {p1} 127.0.0.1\nport {p2}\nallow_anonymous true\n"),
        format!("max_qos 1\nport {p2}\nlistener {p1} 127.0.0.1\nallow_anonymous true\n"),
        // A non-default listener value before the first listener creates it on 1883.
        format!("max_connections 5\nlistener {p1} 127.0.0.1\nallow_anonymous true\n"),
        format!("max_qos 0\nlistener {p1} 127.0.0.1\nallow_anonymous true\n"),
    ];
    for conf in &cases {
        assert_eq!(midge_ports(conf), mosquitto_ports(conf), "for:\n{conf}");
    }
}

/// The file against the running binary: Midge listens on 127.0.0.1:P only, as
/// mosquitto 2.0.11 does, not also on 0.0.0.0:1883.
#[test]
fn global_keys_before_a_listener_open_no_default_listener() {
    let p = free_port();
    let (_dir, path) = config_file(&format!(
        "per_listener_settings false\nallow_anonymous true\nmax_connections -1\nlistener {p} 127.0.0.1\n"
    ));
    let mut m = Midge::with_config(&path, Some("info"));
    let line = m
        .wait_log(Duration::from_secs(10), |l| l.contains("listening on"))
        .expect("listening line");
    let addrs = line
        .split("listening on ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(addrs, format!("127.0.0.1:{p}"), "{line}");
}
