//! Session state across reconnects, checked byte by byte with raw clients: QoS 2 exactly-once
//! when a flow is interrupted, redelivery of unacknowledged QoS 1, v5 session expiry and will
//! delay, large payloads and fan-out across shards.
mod common;

use std::time::{Duration, Instant};

use common::raw::{self, Pkt, Raw, Read1, V311, V5};
use common::{TestBroker, WAIT};

fn ack(kind: u8, pid: u16) -> Vec<u8> {
    let first = match kind {
        4 => 0x40,
        5 => 0x50,
        6 => 0x62,
        7 => 0x70,
        _ => unreachable!(),
    };
    let p = pid.to_be_bytes();
    vec![first, 2, p[0], p[1]]
}

fn pid_of_ack(p: &Pkt) -> u16 {
    u16::from_be_bytes([p.body[0], p.body[1]])
}

/// (topic, packet id, payload) of a PUBLISH in protocol `version`.
fn parse_publish(p: &Pkt, version: u8) -> (String, Option<u16>, Vec<u8>) {
    assert_eq!(p.kind(), 3, "expected PUBLISH, got {p:?}");
    let tl = u16::from_be_bytes([p.body[0], p.body[1]]) as usize;
    let topic = String::from_utf8(p.body[2..2 + tl].to_vec()).unwrap();
    let mut i = 2 + tl;
    let qos = (p.first >> 1) & 3;
    let pid = (qos > 0).then(|| {
        i += 2;
        u16::from_be_bytes([p.body[i - 2], p.body[i - 1]])
    });
    if version == V5 {
        // Property length (a varint; short in these tests) and the properties.
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let b = p.body[i];
            i += 1;
            len |= ((b & 0x7f) as usize) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        i += len;
    }
    (topic, pid, p.body[i..].to_vec())
}

fn sub_client(addr: std::net::SocketAddr, id: &str, filter: &str, qos: u8, clean: bool) -> Raw {
    let mut c = Raw::open(addr);
    c.handshake(&raw::connect(V311, id, 30, clean));
    c.send(&raw::subscribe(V311, 1, &[(filter, qos)]));
    let p = c.expect("SUBACK", WAIT);
    assert_eq!(p.kind(), 9);
    assert_eq!(p.body[2], qos, "granted QoS");
    c
}

/// Every PUBLISH the client gets within `within`, acknowledged the way the QoS requires.
fn drain_publishes(c: &mut Raw, within: Duration) -> Vec<(String, Vec<u8>)> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.read(left) {
            Read1::Packet(p) if p.kind() == 3 => {
                let qos = (p.first >> 1) & 3;
                let (t, pid, payload) = parse_publish(&p, V311);
                match (qos, pid) {
                    (1, Some(pid)) => c.send(&ack(4, pid)),
                    (2, Some(pid)) => c.send(&ack(5, pid)),
                    _ => {}
                }
                got.push((t, payload));
            }
            Read1::Packet(p) if p.kind() == 6 => c.send(&ack(7, pid_of_ack(&p))),
            Read1::Packet(p) => panic!("unexpected {p:?}"),
            Read1::Closed => panic!("closed"),
            Read1::Timeout => return got,
        }
    }
}

#[test]
fn qos2_inbound_retransmission_after_reconnect_is_delivered_once() {
    // [MQTT-4.3.3-9/10]: after PUBREC the receiver must not deliver the same packet id again,
    // also when the sender reconnects (clean session off) and resends it with DUP set.
    let b = TestBroker::start(2);
    for (from, to) in [(0, 0), (0, 1), (1, 0)] {
        let mut sub = sub_client(b.shard_addrs[1 - from], "q2-watch", "q2in/#", 2, true);
        let id = format!("q2-sender-{from}-{to}");
        let topic = format!("q2in/{from}{to}");
        let mut p = Raw::open(b.shard_addrs[from]);
        assert!(!p.handshake(&raw::connect(V311, &id, 30, false)));
        p.send(&raw::publish(V311, &topic, b"once", 2, 9));
        let rec = p.expect("PUBREC", WAIT);
        assert_eq!((rec.kind(), pid_of_ack(&rec)), (5, 9));
        drop(p); // connection lost before PUBREL

        let mut p = Raw::open(b.shard_addrs[to]);
        assert!(
            p.handshake(&raw::connect(V311, &id, 30, false)),
            "session_present"
        );
        let mut again = raw::publish(V311, &topic, b"once", 2, 9);
        again[0] |= 0x08; // DUP
        p.send(&again);
        let rec = p.expect("PUBREC", WAIT);
        assert_eq!((rec.kind(), pid_of_ack(&rec)), (5, 9), "{from}->{to}");
        p.send(&ack(6, 9));
        let comp = p.expect("PUBCOMP", WAIT);
        assert_eq!((comp.kind(), pid_of_ack(&comp)), (7, 9));

        let got = drain_publishes(&mut sub, Duration::from_millis(500));
        assert_eq!(got, [(topic.clone(), b"once".to_vec())], "{from}->{to}");
        p.send(&raw::disconnect());
        sub.send(&raw::disconnect());
    }
}

#[test]
fn qos2_outbound_resumes_with_pubrel_after_reconnect() {
    // [MQTT-4.4.0-1]: on reconnect the server resends unacknowledged PUBLISH and PUBREL;
    // a message whose PUBREC was received continues with PUBREL, never a second PUBLISH.
    let b = TestBroker::start(2);
    for (from, to) in [(0, 0), (0, 1), (1, 0)] {
        let id = format!("q2-recv-{from}-{to}");
        let topic = format!("q2out/{from}{to}");
        let mut c = sub_client(b.shard_addrs[from], &id, &topic, 2, false);
        let mut p = raw::client(b.shard_addrs[to], V311, "q2-pub");
        p.send(&raw::publish(V311, &topic, b"m", 2, 1));
        assert_eq!(p.expect("PUBREC", WAIT).kind(), 5);
        p.send(&ack(6, 1));
        assert_eq!(p.expect("PUBCOMP", WAIT).kind(), 7);

        let msg = c.expect("PUBLISH", WAIT);
        let (_, pid, payload) = parse_publish(&msg, V311);
        assert_eq!(payload, b"m");
        let pid = pid.unwrap();
        c.send(&ack(5, pid));
        let rel = c.expect("PUBREL", WAIT);
        assert_eq!((rel.kind(), pid_of_ack(&rel)), (6, pid));
        drop(c); // lost before our PUBCOMP

        let mut c = Raw::open(b.shard_addrs[to]);
        assert!(c.handshake(&raw::connect(V311, &id, 30, false)));
        let again = c.expect("PUBREL again", WAIT);
        assert_eq!(
            (again.kind(), pid_of_ack(&again)),
            (6, pid),
            "{from}->{to}: {again:?}"
        );
        c.send(&ack(7, pid));
        assert_eq!(
            c.read(Duration::from_millis(300)),
            Read1::Timeout,
            "nothing else"
        );
        c.send(&raw::disconnect());
        p.send(&raw::disconnect());
    }
}

#[test]
fn unacknowledged_qos1_is_redelivered_with_dup_after_reconnect() {
    // [MQTT-4.4.0-1], [MQTT-3.3.1-1]: resent with DUP=1, same packet id, before new messages.
    let b = TestBroker::start(2);
    for (from, to) in [(0, 0), (1, 0), (0, 1)] {
        let id = format!("q1-recv-{from}-{to}");
        let topic = format!("q1re/{from}{to}");
        let mut c = sub_client(b.shard_addrs[from], &id, &topic, 1, false);
        let mut p = raw::client(b.shard_addrs[to], V311, "q1-pub");
        for i in 0..3u8 {
            p.send(&raw::publish(V311, &topic, &[i], 1, u16::from(i) + 1));
            assert_eq!(p.expect("PUBACK", WAIT).kind(), 4);
        }
        let mut pids = Vec::new();
        for i in 0..3u8 {
            let m = c.expect("PUBLISH", WAIT);
            let (_, pid, payload) = parse_publish(&m, V311);
            assert_eq!(payload, [i]);
            assert_eq!(m.first & 0x08, 0, "first delivery has DUP=0");
            pids.push(pid.unwrap());
        }
        c.send(&ack(4, pids[0])); // only the first is acknowledged
        std::thread::sleep(Duration::from_millis(50));
        drop(c);
        // One more while offline.
        p.send(&raw::publish(V311, &topic, &[3], 1, 4));
        assert_eq!(p.expect("PUBACK", WAIT).kind(), 4);

        let mut c = Raw::open(b.shard_addrs[to]);
        assert!(c.handshake(&raw::connect(V311, &id, 30, false)));
        let mut seen = Vec::new();
        for _ in 0..3 {
            let m = c.expect("redelivery", WAIT);
            let (_, pid, payload) = parse_publish(&m, V311);
            seen.push((payload[0], m.first & 0x08 != 0, pid.unwrap()));
            c.send(&ack(4, pid.unwrap()));
        }
        assert_eq!(
            seen,
            [
                (1, true, pids[1]),
                (2, true, pids[2]),
                (3, false, seen[2].2)
            ],
            "{from}->{to}"
        );
        assert_eq!(c.read(Duration::from_millis(300)), Read1::Timeout);
        c.send(&raw::disconnect());
        p.send(&raw::disconnect());
    }
}

#[test]
fn v5_session_expires_after_its_interval() {
    let b = TestBroker::start(2);
    let mut c = Raw::open(b.shard_addrs[0]);
    assert!(!c.handshake(&raw::connect_full(
        V5,
        "short-lived",
        30,
        true,
        None,
        Some(1)
    )));
    c.send(&[0xE0, 0x00]);
    c.until_closed(WAIT);
    // Within the interval: the session is there (on the other shard, too).
    let mut c = Raw::open(b.shard_addrs[1]);
    assert!(c.handshake(&raw::connect_full(
        V5,
        "short-lived",
        30,
        false,
        None,
        Some(1)
    )));
    c.send(&[0xE0, 0x00]);
    c.until_closed(WAIT);
    // After it: gone [MQTT-3.1.2-23 analog for v5 expiry].
    std::thread::sleep(Duration::from_millis(1600));
    let mut c = Raw::open(b.shard_addrs[0]);
    assert!(
        !c.handshake(&raw::connect_full(
            V5,
            "short-lived",
            30,
            false,
            None,
            Some(1)
        )),
        "session still present after its expiry interval"
    );
}

/// A v5 CONNECT with a will that has a Will Delay Interval (property 0x18).
fn connect_with_delayed_will(id: &str, delay: u32, expiry: u32, topic: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 5]);
    b.push(0x04 | (1 << 3)); // will, will QoS 1, clean start 0
    b.extend_from_slice(&30u16.to_be_bytes());
    b.extend_from_slice(&[5, 0x11]);
    b.extend_from_slice(&expiry.to_be_bytes());
    b.extend_from_slice(&(id.len() as u16).to_be_bytes());
    b.extend_from_slice(id.as_bytes());
    b.extend_from_slice(&[5, 0x18]);
    b.extend_from_slice(&delay.to_be_bytes());
    b.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(&[0, 4]);
    b.extend_from_slice(b"dead");
    raw::packet(0x10, &b)
}

#[test]
fn v5_will_delay_cancelled_by_reconnect_and_sent_otherwise() {
    // [MQTT-3.1.3-9]: the will is not sent if the client reconnects before the delay ends.
    let b = TestBroker::start(2);
    let mut watch = sub_client(b.shard_addrs[0], "will-watch", "wd/#", 1, true);

    // A 2 s delay leaves a loaded machine ample time to reconnect; the drain outlasts it.
    let mut c = Raw::open(b.shard_addrs[0]);
    c.handshake(&connect_with_delayed_will("wd-back", 2, 60, "wd/back"));
    drop(c); // lost
    std::thread::sleep(Duration::from_millis(300));
    let mut c = Raw::open(b.shard_addrs[1]);
    assert!(c.handshake(&connect_with_delayed_will("wd-back", 2, 60, "wd/back")));
    let got = drain_publishes(&mut watch, Duration::from_millis(3000));
    assert!(
        got.is_empty(),
        "will sent although the client came back: {got:?}"
    );

    let mut gone = Raw::open(b.shard_addrs[1]);
    gone.handshake(&connect_with_delayed_will("wd-gone", 1, 60, "wd/gone"));
    let lost_at = Instant::now();
    drop(gone);
    let got = drain_publishes(&mut watch, Duration::from_millis(2500));
    let took = lost_at.elapsed();
    assert_eq!(got, [("wd/gone".to_string(), b"dead".to_vec())]);
    assert!(took >= Duration::from_millis(900), "will not delayed");
    c.send(&[0xE0, 0x00]);
}

#[test]
fn retained_will_is_kept() {
    let b = TestBroker::start(2);
    let mut c = Raw::open(b.shard_addrs[0]);
    c.handshake(&raw::connect_full(
        V311,
        "rw",
        30,
        true,
        Some(raw::Will {
            topic: "rw/status",
            payload: b"offline",
            qos: 1,
            retain: true,
        }),
        None,
    ));
    drop(c);
    // The will is published once the broker sees the connection gone: a subscriber arriving
    // before that gets it live (RETAIN 0), so ask again until the stored copy answers.
    let deadline = Instant::now() + WAIT;
    let m = loop {
        let mut s = sub_client(b.shard_addrs[1], "rw-sub", "rw/#", 1, true);
        if let Read1::Packet(m) = s.read(Duration::from_millis(500)) {
            if m.kind() == 3 && m.first & 0x01 == 1 {
                break m;
            }
        }
        assert!(Instant::now() < deadline, "no retained will");
        s.send(&[0xE0, 0x00]);
    };
    let (t, _, payload) = parse_publish(&m, V311);
    assert_eq!(
        (t.as_str(), payload.as_slice()),
        ("rw/status", &b"offline"[..])
    );
    assert_eq!(m.first & 0x01, 1, "retain flag");
}

#[test]
fn unsubscribe_stops_delivery_across_shards() {
    let b = TestBroker::start(2);
    let mut s = sub_client(b.shard_addrs[1], "unsub", "us/#", 1, true);
    let mut p = raw::client(b.shard_addrs[0], V311, "unsub-pub");
    std::thread::sleep(Duration::from_millis(100)); // route delta (see cross_shard.rs)
    p.send(&raw::publish(V311, "us/a", b"1", 0, 0));
    assert_eq!(drain_publishes(&mut s, Duration::from_millis(500)).len(), 1);
    // UNSUBSCRIBE us/#, packet id 2.
    s.send(&[0xA2, 0x08, 0x00, 0x02, 0x00, 0x04, b'u', b's', b'/', b'#']);
    let ack = s.expect("UNSUBACK", WAIT);
    assert_eq!((ack.kind(), pid_of_ack(&ack)), (11, 2));
    std::thread::sleep(Duration::from_millis(100));
    p.send(&raw::publish(V311, "us/a", b"2", 1, 1));
    assert_eq!(p.expect("PUBACK", WAIT).kind(), 4);
    assert_eq!(s.read(Duration::from_millis(300)), Read1::Timeout);
}

#[test]
fn large_payload_crosses_shards_intact() {
    let b = TestBroker::start(2);
    let mut s = sub_client(b.shard_addrs[1], "big-sub", "big/#", 1, true);
    let mut p = raw::client(b.shard_addrs[0], V311, "big-pub");
    std::thread::sleep(Duration::from_millis(100));
    let payload: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let bytes = raw::publish(V311, "big/one", &payload, 1, 1);
    let writer = {
        let mut w = p.s.try_clone().unwrap();
        std::thread::spawn(move || std::io::Write::write_all(&mut w, &bytes).unwrap())
    };
    let m = s.expect("4 MiB PUBLISH", Duration::from_secs(10));
    writer.join().unwrap();
    let (t, pid, got) = parse_publish(&m, V311);
    assert_eq!(t, "big/one");
    assert!(got == payload, "payload differs (len {})", got.len());
    s.send(&ack(4, pid.unwrap()));
    assert_eq!(p.expect("PUBACK", WAIT).kind(), 4);
}

#[test]
fn fan_out_to_many_subscribers_on_both_shards() {
    const SUBS: usize = 200;
    let b = TestBroker::start(2);
    let mut subs: Vec<Raw> = (0..SUBS)
        .map(|i| sub_client(b.shard_addrs[i % 2], &format!("fan-{i}"), "fan/+", 1, true))
        .collect();
    let mut p = raw::client(b.shard_addrs[0], V311, "fan-pub");
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..5u8 {
        p.send(&raw::publish(V311, "fan/x", &[i], 1, u16::from(i) + 1));
        assert_eq!(p.expect("PUBACK", WAIT).kind(), 4);
    }
    for (k, s) in subs.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < 5 {
            let m = s.expect(&format!("message for subscriber {k}"), WAIT);
            let (_, pid, payload) = parse_publish(&m, V311);
            s.send(&ack(4, pid.unwrap()));
            got.push(payload[0]);
        }
        assert_eq!(got, [0, 1, 2, 3, 4], "subscriber {k}");
    }
}
