//! CONNECT admission as a mosquitto user configures it: anonymous access, connection limits,
//! client identifiers, keepalive pings.
mod common;

use std::time::{Duration, Instant};

use common::raw::{self, Raw, Read1, V311, V5};
use common::{assert_serves, TestBroker, WAIT};

/// CONNACK (kind 2): (session_present, return/reason code, v5 properties bytes).
fn connack(c: &mut Raw) -> (bool, u8, Vec<u8>) {
    let p = c.expect("CONNACK", WAIT);
    assert_eq!(p.kind(), 2, "expected CONNACK, got {p:?}");
    let props = if p.body.len() > 2 {
        p.body[3..].to_vec()
    } else {
        Vec::new()
    };
    (p.body[0] & 1 == 1, p.body[1], props)
}

#[test]
fn anonymous_refused_when_not_allowed() {
    let b = TestBroker::start_with(2, |cfg| cfg.listeners[0].allow_anonymous = false);
    let mut c = Raw::open(b.addr);
    c.send(&raw::connect(V311, "anon", 30, true));
    assert_eq!(connack(&mut c).1, 0x05, "v3 'not authorized'");
    assert!(c.until_closed(WAIT).is_empty());
    let mut c = Raw::open(b.addr);
    c.send(&raw::connect(V5, "anon5", 30, true));
    assert_eq!(connack(&mut c).1, 0x87, "v5 'Not authorized'");
    assert!(c.until_closed(WAIT).is_empty());
}

#[test]
fn max_connections_is_enforced_per_listener() {
    let b = TestBroker::start_with(2, |cfg| cfg.listeners[0].max_connections = 2);
    let mut a = raw::client(b.addr, V311, "mc-a");
    let _b2 = raw::client(b.addr, V311, "mc-b");
    let mut third = Raw::open(b.addr);
    third.send_lenient(&raw::connect(V311, "mc-c", 30, true));
    assert!(
        third.until_closed(WAIT).is_empty(),
        "third connection served"
    );
    // A slot frees when a client leaves.
    a.send(&raw::disconnect());
    a.until_closed(WAIT);
    // The slot is released when the broker's connection task ends, just after the close
    // we saw: retry until a new client is served (bounded).
    let deadline = Instant::now() + WAIT;
    loop {
        let mut again = Raw::open(b.addr);
        again.send_lenient(&raw::connect(V311, "mc-d", 30, true));
        match again.read(Duration::from_millis(500)) {
            raw::Read1::Packet(p) if p.kind() == 2 && p.body.get(1) == Some(&0) => break,
            _ => assert!(Instant::now() < deadline, "the freed slot was not reused"),
        }
    }
}

#[test]
fn client_identifier_rules() {
    let b = TestBroker::start(2);
    // v3.1.1: empty id needs clean session [MQTT-3.1.3-8] → return code 2.
    let mut c = Raw::open(b.addr);
    c.send(&raw::connect(V311, "", 30, false));
    assert_eq!(connack(&mut c).1, 0x02);
    assert!(c.until_closed(WAIT).is_empty());
    // v3.1.1 with clean session: accepted.
    let mut c = Raw::open(b.addr);
    c.handshake(&raw::connect(V311, "", 30, true));
    // v5: accepted and told its Assigned Client Identifier (0x12) [MQTT-3.2.2-16].
    let mut c = Raw::open(b.addr);
    c.send(&raw::connect(V5, "", 30, true));
    let (_, code, props) = connack(&mut c);
    assert_eq!(code, 0);
    let pos = props.iter().position(|&b| b == 0x12);
    assert!(pos.is_some(), "no Assigned Client Identifier in {props:?}");
    assert_serves(b.addr);
}

#[test]
fn pingreq_gets_pingresp_and_keeps_the_connection() {
    let b = TestBroker::start(2);
    let mut c = Raw::open(b.addr);
    c.handshake(&raw::connect(V311, "pinger", 1, true));
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(600));
        c.send(&[0xC0, 0x00]);
        let p = c.expect("PINGRESP", WAIT);
        assert_eq!((p.first, p.body.len()), (0xD0, 0));
    }
    // 2.4 s with keepalive 1 s: still open because we pinged.
    assert_eq!(c.read(Duration::from_millis(100)), Read1::Timeout);
}
