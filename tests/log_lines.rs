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
    // (The connect lines, and the lines saying each client closed its connection.)
    let forged_lines: Vec<&String> = lines.iter().filter(|l| l.contains("6.6.6.6")).collect();
    for l in &forged_lines {
        let msg = l.split_once(": ").map_or(l.as_str(), |(_, m)| m);
        assert!(
            msg.starts_with("New client connected from 127.0.0.1:")
                || msg.starts_with("Client dev-"),
            "a forged line: {l:?}"
        );
        assert!(!l.contains('\x1b'), "terminal escape passed through: {l:?}");
    }
    let forged_lines: Vec<&&String> = forged_lines
        .iter()
        .filter(|l| l.contains(": New client connected from 127.0.0.1:"))
        .collect();
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

/// mosquitto's disconnect lines, each naming its client (escaped) and, for a v5 DISCONNECT
/// with a reason, the reason: a normal DISCONNECT, one with a reason, a closed socket, a
/// keepalive timeout.
#[test]
fn disconnect_lines_are_mosquittos_with_the_v5_reason_and_escaped_ids() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut m = Midge::spawn(&["-p", &port.to_string(), "--shards", "1"], None);
    m.wait_listening(addr);

    let mut a = raw::client(addr, V311, "dl-normal");
    a.send(&raw::disconnect());
    m.wait_log(WAIT, |l| l.ends_with("Client dl-normal disconnected."))
        .expect("normal disconnect line");

    let mut b = raw::client(addr, V5, "dl-reason");
    // DISCONNECT with reason 0x04 (disconnect with will message), no properties.
    b.send(&raw::packet(0xE0, &[0x04, 0x00]));
    let l = m
        .wait_log(WAIT, |l| l.contains("Client dl-reason disconnected:"))
        .expect("v5 reason line");
    assert!(l.ends_with("(reason 0x04)."), "{l}");

    let c = raw::client(addr, V311, "dl-closed");
    drop(c);
    m.wait_log(WAIT, |l| {
        l.ends_with("Client dl-closed closed its connection.")
    })
    .expect("closed line");

    let mut d = Raw::open(addr);
    // Returns session_present: none for a clean start.
    assert!(!d.handshake(&raw::connect(V311, "dl-keepalive", 1, true)));
    m.wait_log(WAIT, |l| {
        l.ends_with("Client dl-keepalive has exceeded timeout, disconnecting.")
    })
    .expect("keepalive timeout line");

    let evil = "dl-evil\nClient admin disconnected.";
    let e = raw::client(addr, V311, evil);
    drop(e);
    let l = m
        .wait_log(WAIT, |l| {
            l.contains("closed its connection.") && l.contains("dl-evil")
        })
        .expect("the evil client's line");
    assert!(
        l.contains("dl-evil\\nClient admin disconnected. closed its connection."),
        "{l}"
    );
    assert!(
        !m.lines().iter().any(|l| l.starts_with("Client admin")
            || l.split_once(": ")
                .is_some_and(|(_, r)| r.starts_with("Client admin"))),
        "a forged line: {:#?}",
        m.lines()
    );
}

/// `connection_messages false` silences connect and disconnect lines and nothing else;
/// `log_type subscribe` adds mosquitto's subscribe lines (which mark where we are in the log).
#[test]
fn connection_messages_false_and_log_type_subscribe_are_honoured() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (_dir, conf) = common::bin::config_file(&format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nconnection_messages false\n\
         log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
         log_type subscribe\n"
    ));
    let mut m = Midge::spawn(&["-c", conf.to_str().unwrap(), "--shards", "1"], None);
    m.wait_listening(addr);
    for n in 1..=2 {
        let mut c = raw::client(addr, V311, &format!("cm-{n}"));
        c.send(&raw::subscribe(V311, 1, &[(&format!("cm/{n}"), 1)]));
        assert_eq!(c.expect("SUBACK", WAIT).kind(), 9);
        c.send(&raw::disconnect());
        m.wait_log(WAIT, |l| l.ends_with(&format!("cm-{n} 1 cm/{n}")))
            .expect("subscribe line");
    }
    let lines = m.lines();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("New client connected") || l.contains("disconnected")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("listening on")),
        "{lines:#?}"
    );
}

/// `log_format json`: every line is one JSON object with the mosquitto log type; peer text
/// stays inside its string; connection lines carry the connection's span.
#[test]
fn log_format_json_writes_one_object_per_line() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (_dir, conf) = common::bin::config_file(&format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nlog_format json\nlog_type all\n"
    ));
    let mut m = Midge::spawn(&["-c", conf.to_str().unwrap(), "--shards", "1"], None);
    m.wait_listening(addr);
    let mut c = raw::client(addr, V311, "json-\"dev\"\n{}");
    c.send(&raw::disconnect());
    m.wait_log(WAIT, |l| l.contains("disconnected.") && l.contains("json-"))
        .expect("disconnect line");
    // A client that just closes its socket: the connection task's own line carries the span.
    drop(raw::client(addr, V311, "json-span"));
    m.wait_log(WAIT, |l| l.contains("json-span closed its connection."))
        .expect("closed line");
    let lines = m.lines();
    let mut py = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, json\n\
             objs = [json.loads(l) for l in sys.stdin.read().splitlines()]\n\
             assert all(set(['level', 'type', 'message']) <= set(o) for o in objs), objs\n\
             d = [o for o in objs if 'disconnected.' in o['message']]\n\
             assert len(d) == 1 and d[0]['type'] == 'notice', d\n\
             assert d[0]['message'] == 'Client json-\"dev\"\\\\n{} disconnected.', d\n\
             s = [o for o in objs if o.get('span', {}).get('client') == 'json-span']\n\
             assert s and s[0]['span']['shard'] == 0 and s[0]['span']['peer'].startswith('127.0.0.1:'), objs\n",
        ])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    py.stdin
        .take()
        .unwrap()
        .write_all(lines.join("\n").as_bytes())
        .unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{lines:#?}",
        String::from_utf8_lossy(&out.stderr)
    );
}
