//! One client must not be able to grow the broker's memory without bound: retained messages
//! on SUBSCRIBE go through the same per-client transmit bound as everything else, and topic
//! alias maps hold their own copies of the topics (not the read buffers they arrived in).
//! Memory is the broker process's resident set (the real binary), with generous bounds.
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::bin::{config_file, free_port, Midge};
use common::raw::{self, Raw, Read1, V311, V5};
use common::{TestBroker, WAIT};

const MIB: u64 = 1024;

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn topic_of(p: &raw::Pkt) -> String {
    let n = u16::from_be_bytes([p.body[0], p.body[1]]) as usize;
    String::from_utf8_lossy(&p.body[2..2 + n]).into_owned()
}

/// Set `n` retained QoS 1 messages `{prefix}/NNNN` with `size`-byte payloads, each acknowledged.
fn retain(addr: SocketAddr, prefix: &str, n: usize, size: usize) {
    let mut p = raw::client(addr, V311, &format!("{prefix}-retainer"));
    let payload = vec![b'r'; size];
    for i in 0..n {
        let mut pkt = raw::publish(V311, &format!("{prefix}/{i:04}"), &payload, 1, 1 + i as u16);
        pkt[0] |= 0x01;
        p.send(&pkt);
        assert_eq!(p.expect("PUBACK", WAIT).kind(), 4);
    }
    p.send(&raw::disconnect());
}

/// One SUBSCRIBE with `#` repeated as often as the 2 MB packet limit allows, against 1,000
/// retained messages, from a client that does not read at first: the broker's memory stays
/// bounded, the client gets the retained messages as it reads, others are served throughout.
#[test]
fn a_subscribe_repeating_hash_500k_times_keeps_memory_bounded() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut m = Midge::spawn(&["-p", &port.to_string(), "--shards", "1"], Some("info"));
    m.wait_listening(addr);
    retain(addr, "r", 1000, 100);
    let base = m.rss_kib();

    // 3.1.1 SUBSCRIBE: packet id, then per filter: length 1, "#", QoS 0 (4 bytes).
    let n = (2_000_000 - 8) / 4;
    let mut body = vec![0x00, 0x01];
    for _ in 0..n {
        body.extend_from_slice(&[0x00, 0x01, b'#', 0x00]);
    }
    let mut pkt = vec![0x82];
    varint(body.len(), &mut pkt);
    pkt.extend_from_slice(&body);
    assert!(pkt.len() <= 2_000_000);
    let mut c = Raw::open(addr);
    c.handshake(&raw::connect(V311, "hash-flood", 60, true));
    c.send(&pkt);

    // Not reading for a second and a half while the broker works on it; it must not grow.
    let bound = base + 256 * MIB;
    let watch = Instant::now();
    let mut peak = base;
    while watch.elapsed() < Duration::from_millis(1500) {
        peak = peak.max(m.rss_kib());
        assert!(
            peak < bound,
            "broker RSS {peak} KiB, started at {base} KiB: retained messages queued unboundedly"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    common::assert_serves(addr);

    // The client reads: its SUBACK grants every filter, then retained messages flow.
    let ack = c.expect("SUBACK", Duration::from_secs(30));
    assert_eq!(ack.kind(), 9);
    assert_eq!(ack.body.len(), 2 + n, "one code per filter");
    // A filter's retained messages are asked for once while they wait, however often the
    // packet repeats it: each of the 1,000 arrives once.
    let mut topics = std::collections::BTreeSet::new();
    while topics.len() < 1000 {
        let p = c.expect("retained PUBLISH", WAIT);
        assert_eq!(p.kind(), 3, "{p:?}");
        let t = topic_of(&p);
        if !t.starts_with("r/") {
            continue; // a live message (the health check matches `#` too)
        }
        assert_eq!(p.first & 0x01, 1, "RETAIN set on retained delivery");
        assert!(topics.insert(t.clone()), "{t} twice");
        if topics.len() % 250 == 0 {
            peak = peak.max(m.rss_kib());
            assert!(
                peak < bound,
                "broker RSS {peak} KiB while draining (base {base})"
            );
        }
    }
    eprintln!("RSS: base {base} KiB, peak {peak} KiB");
    common::assert_serves(addr);
    drop(c);
}

/// 2,000 retained QoS 1 messages to a QoS 1 subscriber: more than the inflight window plus the
/// queue (20 + 1,000), and every one arrives as the client acknowledges (none dropped because
/// the queue was full).
#[test]
fn retained_qos1_beyond_the_queue_bound_all_arrive_as_the_client_acknowledges() {
    let b = TestBroker::start(1);
    retain(b.addr, "q", 2000, 10);
    let mut c = raw::client(b.addr, V311, "q-sub");
    c.send(&raw::subscribe(V311, 1, &[("q/#", 1)]));
    assert_eq!(c.expect("SUBACK", WAIT).kind(), 9);
    let mut topics = std::collections::BTreeSet::new();
    while topics.len() < 2000 {
        match c.read(WAIT) {
            Read1::Packet(p) if p.kind() == 3 => {
                let t = topic_of(&p);
                let pid = [p.body[2 + t.len()], p.body[3 + t.len()]];
                c.send(&[0x40, 0x02, pid[0], pid[1]]);
                topics.insert(t);
            }
            other => panic!("after {} of 2000: {other:?}", topics.len()),
        }
    }
    assert_eq!(topics.len(), 2000);
}

/// A v5 CONNECT with a Topic Alias Maximum (broker → client aliases).
fn connect_v5_aliases(id: &str, alias_max: u16) -> Vec<u8> {
    let mut b = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 5, 0x02, 0x00, 0x3c];
    b.extend_from_slice(&[3, 0x22]);
    b.extend_from_slice(&alias_max.to_be_bytes());
    b.extend_from_slice(&(id.len() as u16).to_be_bytes());
    b.extend_from_slice(id.as_bytes());
    raw::packet(0x10, &b)
}

/// A v5 QoS 0 PUBLISH setting topic alias `alias` for `topic`.
fn publish_v5_alias(topic: &str, alias: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = (topic.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(&[3, 0x23]);
    b.extend_from_slice(&alias.to_be_bytes());
    b.extend_from_slice(payload);
    raw::packet(0x30, &b)
}

/// 2,000 topic aliases each set by a 60 KB PUBLISH, in both directions: the alias maps keep
/// copies of the topics, so the read buffers those PUBLISHes arrived in are freed (before:
/// each alias pinned its buffer, ~120 MB here, up to 65,535 buffers per client).
#[test]
fn topic_alias_maps_do_not_pin_read_buffers() {
    const N: u16 = 2000;
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (_dir, conf) = config_file(&format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nmax_topic_alias 65535\n"
    ));
    let mut m = Midge::with_config(&conf, Some("info"));
    m.wait_listening(addr);
    let payload = vec![b'p'; 60_000];

    // Client → broker aliases (no subscriber: each payload is dropped once routed).
    let mut c = Raw::open(addr);
    c.handshake(&raw::connect(V5, "alias-in", 60, true));
    c.send(&[0xC0, 0x00]);
    assert_eq!(c.expect("PINGRESP", WAIT).kind(), 13);
    let base = m.rss_kib();
    for i in 0..N {
        c.send(&publish_v5_alias(&format!("alias/in/{i}"), i + 1, &payload));
    }
    c.send(&[0xC0, 0x00]);
    assert_eq!(c.expect("PINGRESP after the publishes", WAIT).kind(), 13);
    let grown = m.rss_kib().saturating_sub(base);
    assert!(
        grown < 48 * MIB,
        "incoming aliases: broker RSS grew {grown} KiB for {N} aliases"
    );

    // Broker → client aliases: a v5 subscriber allowing 65,535 aliases, a 3.1.1 publisher.
    let mut sub = Raw::open(addr);
    sub.handshake(&connect_v5_aliases("alias-out", 65535));
    sub.send(&raw::subscribe(V5, 1, &[("alias/out/#", 0)]));
    assert_eq!(sub.expect("SUBACK", WAIT).kind(), 9);
    let mut publ = raw::client(addr, V311, "alias-pub");
    let base = m.rss_kib();
    for i in 0..N {
        publ.send(&raw::publish(
            V311,
            &format!("alias/out/{i}"),
            &payload,
            0,
            0,
        ));
        let p = sub.expect("PUBLISH", WAIT);
        assert_eq!(p.kind(), 3, "{p:?}");
    }
    let grown = m.rss_kib().saturating_sub(base);
    assert!(
        grown < 48 * MIB,
        "outgoing aliases: broker RSS grew {grown} KiB for {N} aliases"
    );
}
