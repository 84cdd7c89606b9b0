//! What the broker's log looks like to an operator reading it from a file or journald: peer
//! text (client ids, usernames) cannot forge lines, and there are no terminal colour codes
//! when the log is not a terminal.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::bin::{free_port, Midge};
use common::raw::{self, Raw, V311, V5};
use common::WAIT;

/// A CONNECT with a username (no password).
fn connect_with_username(version: u8, id: &str, user: &str) -> Vec<u8> {
    let mut b = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', version, 0x82, 0x00, 0x3c,
    ];
    if version == V5 {
        b.push(0);
    }
    b.extend_from_slice(&(id.len() as u16).to_be_bytes());
    b.extend_from_slice(id.as_bytes());
    b.extend_from_slice(&(user.len() as u16).to_be_bytes());
    b.extend_from_slice(user.as_bytes());
    raw::packet(0x10, &b)
}

#[test]
fn client_ids_and_usernames_cannot_forge_log_lines() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut m = Midge::spawn(&["-p", &port.to_string()], Some("info"));
    m.wait_listening(addr);
    let forged = "2026-12-01T00:00:00Z  INFO midge: New client connected from 6.6.6.6 as admin";
    for (version, n) in [(V311, 1), (V5, 2)] {
        let id = format!("dev-{n}\n{forged}\r\n\x1b[2J");
        let user = format!("u{n}\r\n{forged} (user)");
        let mut c = Raw::open(addr);
        c.send(&connect_with_username(version, &id, &user));
        let p = c.expect("CONNACK", WAIT);
        assert_eq!(p.kind(), 2, "{p:?}");
        m.wait_log(WAIT, |l| l.contains(&format!("as dev-{n}")))
            .expect("the connect line");
    }
    let lines = m.lines();
    // Every line that mentions the forged text is a genuine connect line carrying it escaped.
    let forged_lines: Vec<&String> = lines.iter().filter(|l| l.contains("6.6.6.6")).collect();
    assert_eq!(forged_lines.len(), 2, "{lines:#?}");
    for l in &forged_lines {
        assert!(
            l.contains("New client connected from 127.0.0.1:"),
            "a forged line: {l:?}"
        );
        assert!(
            l.contains("\\n2026-12-01T00:00:00Z"),
            "id not escaped: {l:?}"
        );
        assert!(l.contains("\\r\\n"), "username not escaped: {l:?}");
        assert!(!l.contains('\x1b'), "terminal escape passed through: {l:?}");
    }
}

#[test]
fn no_colour_codes_when_the_log_is_not_a_terminal() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut m = Midge::spawn(&["-p", &port.to_string()], None);
    m.wait_listening(addr);
    let mut c = raw::client(addr, V311, "plain-log");
    c.send(&raw::disconnect());
    m.wait_log(Duration::from_secs(5), |l| l.contains("as plain-log"))
        .expect("connect line");
    let lines = m.lines();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(!l.contains('\x1b'), "ANSI escape in a piped log: {l:?}");
    }
}

/// The first log line of `midge -c` with `conf` (plus a listener).
fn first_line(extra: &str) -> String {
    let port = free_port();
    let (_dir, conf) = common::bin::config_file(&format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\n{extra}"
    ));
    let mut m = Midge::with_config(&conf, None);
    m.wait_log(Duration::from_secs(10), |l| l.contains("listening on"))
        .expect("listening line")
}

/// mosquitto's layout, `TIMESTAMP: message`: seconds since the epoch by default, strftime
/// with `log_timestamp_format`, no timestamp with `log_timestamp false`.
#[test]
fn log_lines_follow_mosquittos_log_timestamp_settings() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let line = first_line("");
    let (ts, rest) = line.split_once(": ").expect("TIMESTAMP: message");
    let ts: u64 = ts
        .parse()
        .unwrap_or_else(|_| panic!("epoch seconds: {line:?}"));
    assert!(ts.abs_diff(now) < 600, "{line:?}");
    assert!(rest.starts_with("shard "), "{line:?}");

    let line = first_line("log_timestamp_format %Y-%m-%dT%H:%M:%S\n");
    let (ts, rest) = line.split_once(": ").expect("TIMESTAMP: message");
    let b = ts.as_bytes();
    assert!(
        ts.len() == 19 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':',
        "strftime timestamp: {line:?}"
    );
    assert!(rest.starts_with("shard "), "{line:?}");

    let line = first_line("log_timestamp false\n");
    assert!(line.starts_with("shard "), "{line:?}");
}
