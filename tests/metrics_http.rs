//! The metrics listener as Prometheus and an operator's curl see it: `/metrics` parses with
//! real Prometheus parsers (promtool, the Python prometheus_client, in both formats), its
//! counters move as a scripted mosquitto_pub/mosquitto_sub session says they must, `/healthz`
//! turns 503 naming a stalled shard and 200 again once it runs, and bad HTTP (huge heads,
//! slowloris, other methods and paths, too many at once) gets a clean refusal while MQTT
//! clients carry on.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::{self, V311};
use common::{TestBroker, WAIT};
use midge::shard::StallHook;

fn broker_with_metrics(shards: usize) -> TestBroker {
    TestBroker::start_with(shards, |c| {
        c.metrics_listener = Some("127.0.0.1:0".parse().unwrap());
    })
}

/// One HTTP exchange: send `request` as is, read until the server closes.
/// Returns (status, head, body).
fn http_raw(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out)
}

fn parse_response(out: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, head.to_string(), body.to_string())
}

fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n{accept}\r\n").as_bytes(),
    )
}

/// The sum of every sample of `name` whose labels include all of `want`.
fn sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    let mut found = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (n, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let ok = want
            .iter()
            .all(|(k, v)| labels.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if ok {
            found = true;
            total += value.parse::<f64>().unwrap();
        }
    }
    assert!(found, "no sample {name} {want:?} in\n{text}");
    total
}

/// Validate with promtool (Debian's prometheus package) if present, and with the Python
/// prometheus_client parsers if present; at least one must be (scripts/test.sh installs both).
fn validate(prom_text: &str, om_text: &str) {
    let mut validators = 0;
    if let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(prom_text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // promtool exits 1 for lint problems too (and 3 for a parse error): accept neither.
        assert!(out.status.success(), "promtool check metrics: {msg}");
        validators += 1;
    }
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
prom, omt = sys.stdin.read().split("\n=====\n")
a = sum(len(f.samples) for f in text_string_to_metric_families(prom))
b = sum(len(f.samples) for f in om(omt))
assert a > 50 and b > 50, (a, b)
print(a, b)
"#;
    for python in ["python3", "/usr/bin/python3"] {
        let Ok(mut child) = Command::new(python)
            .args(["-c", "import prometheus_client"])
            .stderr(Stdio::null())
            .spawn()
        else {
            continue;
        };
        if !child.wait().unwrap().success() {
            continue;
        }
        let mut child = Command::new(python)
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{prom_text}\n=====\n{om_text}").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "prometheus_client parser: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        validators += 1;
        break;
    }
    assert!(
        validators > 0,
        "neither promtool nor python3 prometheus_client is installed (scripts/test.sh installs them)"
    );
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("run a mosquitto client");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Poll `/metrics` until `pred` holds (the counters are written by the shards as they work).
fn scrape_until(addr: SocketAddr, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, _, body) = get(addr, "/metrics", None);
        assert_eq!(code, 200);
        if pred(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what} never held:\n{body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_parse_and_move_with_a_mosquitto_session() {
    let b = broker_with_metrics(2);
    let m = b.metrics_addr.expect("metrics listener bound");
    let port = b.port().to_string();

    let (code, head, before) = get(m, "/metrics", None);
    assert_eq!(code, 200, "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(sum(&before, "midge_publish_received_total", &[]), 0.0);
    assert_eq!(sum(&before, "midge_shards", &[]), 2.0);

    // A subscriber waiting for 3 QoS 1 messages, then 3 QoS 1 and 2 QoS 0 publishes.
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            "metrics-sub",
            "-t",
            "m/#",
            "-q",
            "1",
            "-C",
            "3",
            "-W",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    scrape_until(m, "the subscription", |t| {
        sum(t, "midge_subscriptions", &[]) == 1.0
    });
    for i in 0..3 {
        run(Command::new("mosquitto_pub").args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            &format!("metrics-pub-{i}"),
            "-t",
            "m/a",
            "-q",
            "1",
            "-m",
            "hello",
        ]));
    }
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    for _ in 0..2 {
        run(Command::new("mosquitto_pub").args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "m/b",
            "-q",
            "0",
            "-m",
            "abc",
        ]));
    }

    let after = scrape_until(m, "every client gone", |t| {
        sum(t, "midge_sessions", &[("state", "live")]) == 0.0
            && sum(t, "midge_connections", &[]) == 0.0
            && sum(t, "midge_publish_received_total", &[("qos", "0")]) == 2.0
    });
    assert_eq!(
        sum(&after, "midge_publish_received_total", &[("qos", "1")]),
        3.0
    );
    assert_eq!(
        sum(
            &after,
            "midge_publish_received_bytes_total",
            &[("qos", "1")]
        ),
        15.0
    );
    assert_eq!(
        sum(
            &after,
            "midge_publish_received_bytes_total",
            &[("qos", "0")]
        ),
        6.0
    );
    assert_eq!(
        sum(&after, "midge_publish_sent_total", &[("qos", "1")]),
        3.0
    );
    assert_eq!(
        sum(&after, "midge_publish_sent_total", &[("qos", "0")]),
        0.0
    );
    // 1 subscriber + 5 publishers.
    assert_eq!(sum(&after, "midge_connects_total", &[]), 6.0);
    assert_eq!(
        sum(&after, "midge_listener_connections_accepted_total", &[]),
        6.0
    );
    assert_eq!(sum(&after, "midge_subscriptions", &[]), 0.0);
    assert_eq!(sum(&after, "midge_dropped_messages_total", &[]), 0.0);
    assert_eq!(sum(&after, "midge_shard_up", &[]), 2.0);
    // The QoS 0 messages had no subscriber left; the QoS 1 ones reached one.
    assert_eq!(sum(&after, "midge_deliveries_total", &[]), 3.0);

    let (code, head, om) = get(
        m,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert_eq!(code, 200);
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"));
    validate(&after, &om);
}

#[test]
fn healthz_names_a_stalled_shard_and_recovers() {
    let hook = Arc::new(StallHook::new(2));
    let h = hook.clone();
    let b = TestBroker::start_with(2, move |c| {
        c.metrics_listener = Some("127.0.0.1:0".parse().unwrap());
        c.peer_timeout = Duration::from_millis(600);
        c.stall_hook = Some(h);
    });
    let m = b.metrics_addr.unwrap();
    let (code, _, body) = get(m, "/healthz", None);
    assert_eq!(code, 200, "{body}");

    hook.stall[1].store(true, Ordering::Release);
    let deadline = Instant::now() + WAIT;
    let body = loop {
        let (code, _, body) = get(m, "/healthz", None);
        if code == 503 {
            break body;
        }
        assert_eq!(code, 200);
        assert!(Instant::now() < deadline, "/healthz stayed 200");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(body.contains("shard 1"), "{body}");
    assert!(!body.contains("shard 0"), "{body}");
    // The scrape itself does not wait for the stalled shard.
    let (code, _, t) = get(m, "/metrics", None);
    assert_eq!(code, 200);
    assert_eq!(sum(&t, "midge_shard_up", &[("shard", "1")]), 0.0);
    assert_eq!(sum(&t, "midge_shard_up", &[("shard", "0")]), 1.0);

    hook.stall[1].store(false, Ordering::Release);
    let deadline = Instant::now() + WAIT;
    while get(m, "/healthz", None).0 != 200 {
        assert!(Instant::now() < deadline, "/healthz stayed 503");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A subscriber and a publisher on the broker still exchange a QoS 1 message.
fn mqtt_still_works(b: &TestBroker, tag: &str) {
    let mut sub = raw::client(b.addr, V311, &format!("{tag}-sub"));
    sub.send(&raw::subscribe(V311, 1, &[("h/t", 1)]));
    assert_eq!(sub.expect("SUBACK", WAIT).kind(), 9);
    let mut publ = raw::client(b.addr, V311, &format!("{tag}-pub"));
    publ.send(&raw::publish(V311, "h/t", b"x", 1, 7));
    assert_eq!(publ.expect("PUBACK", WAIT).kind(), 4);
    assert_eq!(sub.expect("PUBLISH", WAIT).kind(), 3);
}

#[test]
fn bad_http_is_refused_cleanly_and_mqtt_carries_on() {
    use midge::shard::exporter::{MAX_ACTIVE, MAX_HEAD_BYTES};
    let b = broker_with_metrics(2);
    let m = b.metrics_addr.unwrap();

    let (code, head, _) = http_raw(m, b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!(code, 405, "{head}");
    assert!(head.contains("Allow: GET, HEAD"), "{head}");
    assert_eq!(http_raw(m, b"DELETE /healthz HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(get(m, "/", None).0, 404);
    assert_eq!(get(m, "/metrics/../etc/passwd", None).0, 404);
    assert_eq!(http_raw(m, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").0, 400);
    let (code, head, body) = http_raw(m, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(code, 200, "{head}");
    assert!(body.is_empty());

    // A huge head: refused once the bound is passed, without reading the rest.
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while huge.len() < 4 * MAX_HEAD_BYTES {
        huge.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    huge.extend_from_slice(b"\r\n");
    assert_eq!(http_raw(m, &huge).0, 431);

    // Slowloris: MAX_ACTIVE connections that trickle a head and never finish it. The next
    // request is refused at once with 503; MQTT is untouched; the slow ones get 408 when their
    // time is up, and scrapes work again.
    let slow: Vec<TcpStream> = (0..MAX_ACTIVE)
        .map(|_| {
            let mut s = TcpStream::connect(m).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, _, body) = get(m, "/healthz", None);
        if code == 503 {
            assert!(body.contains("too many"), "{body}");
            break;
        }
        // The server may not have accepted every slow connection yet.
        assert_eq!(code, 200);
        assert!(
            Instant::now() < deadline,
            "the connection bound never applied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    mqtt_still_works(&b, "during-slowloris");
    // Each slow connection is answered: 408 when its time is up, or 503 if a probe above held
    // a slot when it was accepted. None hangs.
    let mut timed_out = 0;
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(b"a");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        match parse_response(&out).0 {
            408 => timed_out += 1,
            503 => {}
            other => panic!("slow request answered {other}"),
        }
    }
    assert!(
        timed_out >= MAX_ACTIVE - 1,
        "{timed_out} of {MAX_ACTIVE} got 408"
    );
    let deadline = Instant::now() + WAIT;
    while get(m, "/healthz", None).0 != 200 {
        assert!(Instant::now() < deadline, "scrapes did not come back");
        std::thread::sleep(Duration::from_millis(20));
    }
    mqtt_still_works(&b, "after-slowloris");
}
