//! Hostile and broken input, sent as hand-written bytes over a plain `TcpStream` (so a codec
//! bug cannot hide on both sides). After each case the broker must still serve a normal
//! client.
mod common;

use std::time::{Duration, Instant};

use common::raw::{self, Raw, Read1, V311, V5};
use common::{assert_serves, TestBroker, WAIT};

/// Nothing but a close (no bytes back) within `within`.
fn assert_closed_silently(c: &mut Raw, within: Duration) {
    let got = c.until_closed(within);
    assert!(got.is_empty(), "expected a silent close, got {got:?}");
}

/// The broker sends exactly one DISCONNECT with `reason`, then closes.
fn assert_disconnect_reason(c: &mut Raw, reason: u8) {
    let got = c.until_closed(WAIT);
    let reasons: Vec<Option<u8>> = got.iter().map(|p| p.disconnect_reason()).collect();
    assert_eq!(reasons, [Some(reason)], "last packets: {got:?}");
}

#[test]
fn garbage_bytes_close_the_connection() {
    let b = TestBroker::start(2);
    // Reserved packet type 0, then a malformed remaining length.
    let mut c = Raw::open(b.addr);
    c.send_lenient(&[0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0x02, 0x03]);
    assert_closed_silently(&mut c, WAIT);
    // Text that is not MQTT at all (an HTTP request to the MQTT port).
    let mut c = Raw::open(b.addr);
    c.send_lenient(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_closed_silently(&mut c, WAIT);
    // Garbage after a valid CONNECT (v3.1.1): closed, no reply.
    let mut c = raw::client(b.addr, V311, "garbage-after");
    c.send_lenient(&[0xF0, 0x00, 0x00]); // type 15 (AUTH) is not a v3 packet
    assert_closed_silently(&mut c, WAIT);
    assert_serves(b.addr);
}

#[test]
fn packet_before_connect_is_closed() {
    // [MQTT-3.1.0-1]: the first packet from the client must be CONNECT.
    let b = TestBroker::start(2);
    let mut c = Raw::open(b.addr);
    c.send_lenient(&raw::publish(V311, "a/b", b"early", 0, 0));
    assert_closed_silently(&mut c, WAIT);
    let mut c = Raw::open(b.addr);
    c.send_lenient(&raw::subscribe(V311, 1, &[("a/#", 0)]));
    assert_closed_silently(&mut c, WAIT);
    let mut c = Raw::open(b.addr);
    c.send_lenient(&[0xC0, 0x00]); // PINGREQ
    assert_closed_silently(&mut c, WAIT);
    assert_serves(b.addr);
}

#[test]
fn second_connect_is_a_protocol_error() {
    // [MQTT-3.1.0-2]: a second CONNECT is a Protocol Error.
    let b = TestBroker::start(2);
    let mut c = raw::client(b.addr, V5, "twice-v5");
    c.send_lenient(&raw::connect(V5, "twice-v5", 30, true));
    assert_disconnect_reason(&mut c, 0x82);

    let mut c = raw::client(b.addr, V311, "twice-v3");
    c.send_lenient(&raw::connect(V311, "twice-v3", 30, true));
    assert_closed_silently(&mut c, WAIT);
    assert_serves(b.addr);
}

#[test]
fn publish_with_wildcard_topic_is_refused() {
    // [MQTT-3.3.2-2]: the topic name in a PUBLISH must not contain wildcards.
    let b = TestBroker::start(2);
    let mut watcher = raw::client(b.addr, V311, "wild-watch");
    watcher.send(&raw::subscribe(V311, 1, &[("#", 0)]));
    assert_eq!(watcher.expect("SUBACK", WAIT).kind(), 9);

    let mut c = raw::client(b.addr, V5, "wild-v5");
    c.send_lenient(&raw::publish(V5, "a/+/c", b"x", 0, 0));
    assert_disconnect_reason(&mut c, 0x90);
    let mut c = raw::client(b.addr, V5, "wild-v5-hash");
    c.send_lenient(&raw::publish(V5, "a/#", b"x", 1, 7));
    assert_disconnect_reason(&mut c, 0x90);

    let mut c = raw::client(b.addr, V311, "wild-v3");
    c.send_lenient(&raw::publish(V311, "a/#", b"x", 1, 7));
    assert_closed_silently(&mut c, WAIT);
    // Nothing was routed.
    assert_eq!(watcher.read(Duration::from_millis(300)), Read1::Timeout);
    assert_serves(b.addr);
}

#[test]
fn publish_above_max_packet_size_is_refused() {
    let b = TestBroker::start_with(2, |cfg| cfg.session.max_packet_size = 1024);
    // The limit is announced in CONNACK (property 0x27 Maximum Packet Size).
    let mut c = Raw::open(b.addr);
    c.send(&raw::connect(V5, "big-v5", 30, true));
    let ack = c.expect("CONNACK", WAIT);
    assert_eq!(ack.kind(), 2);
    let props = &ack.body[3..];
    let pos = props.iter().position(|&b| b == 0x27);
    let announced = pos.map(|i| u32::from_be_bytes(props[i + 1..i + 5].try_into().unwrap()));
    assert_eq!(announced, Some(1024), "CONNACK {ack:?}");
    // A publish just under the limit is fine; one over it is 0x95 [MQTT-3.2.2-15 analog].
    c.send(&raw::publish(V5, "big/ok", &[7u8; 900], 1, 1));
    let p = c.expect("PUBACK", WAIT);
    assert_eq!(p.kind(), 4, "{p:?}");
    c.send_lenient(&raw::publish(V5, "big/no", &[7u8; 2000], 1, 2));
    assert_disconnect_reason(&mut c, 0x95);

    // v3: no DISCONNECT from a server, just the close.
    let mut c = raw::client(b.addr, V311, "big-v3");
    c.send_lenient(&raw::publish(V311, "big/no", &[7u8; 2000], 0, 0));
    assert_closed_silently(&mut c, WAIT);
    assert_serves(b.addr);
}

#[test]
fn truncated_packet_then_silence_closes_after_keepalive_grace() {
    let b = TestBroker::start(2);
    for version in [V311, V5] {
        let mut c = Raw::open(b.addr);
        c.handshake(&raw::connect(version, &format!("trunc-{version}"), 1, true));
        // A PUBLISH announcing 100 bytes, of which we send 5 and then nothing.
        c.send(&[0x30, 100, 0x00, 0x03, b'a', b'/', b'b']);
        let start = Instant::now();
        // [MQTT-3.1.2-22]: 1.5 × keepalive (1 s) without a complete packet.
        let got = c.until_closed(Duration::from_secs(3));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1000),
            "closed too early: {took:?}"
        );
        assert!(
            got.iter().all(|p| p.disconnect_reason() == Some(0x8D)),
            "only a v5 'keep alive timeout' may precede the close: {got:?}"
        );
    }
    assert_serves(b.addr);
}

#[test]
fn no_connect_is_closed_after_connect_timeout() {
    let b = TestBroker::start_with(2, |cfg| cfg.connect_timeout = Duration::from_secs(1));
    let start = Instant::now();
    let mut idle = Raw::open(b.addr);
    // Half a CONNECT is not a CONNECT either.
    let mut half = Raw::open(b.addr);
    half.send(&raw::connect(V311, "half", 30, true)[..6]);
    assert_closed_silently(&mut idle, Duration::from_secs(3));
    assert_closed_silently(&mut half, Duration::from_secs(3));
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "closed before the timeout"
    );
    assert_serves(b.addr);
}
