//! The retained store's byte bound counts what it really keeps: its trie nodes (one per topic
//! level, on every shard) and v5 properties, not only topic and payload. Observed from outside:
//! how many retained messages a subscriber gets back after publishing more than fit.
mod common;

use std::collections::BTreeSet;

use common::raw::{self, Read1, V311, V5};
use common::{TestBroker, WAIT};
use midge::routing::RetainedLimits;

const MAX_BYTES: usize = 64 * 1024;

fn broker() -> TestBroker {
    TestBroker::start_with(2, |c| {
        c.retained = RetainedLimits {
            max_messages: 1_000_000,
            max_bytes: MAX_BYTES,
        }
    })
}

/// The topics of the retained messages a new subscriber to `filter` gets.
fn retained_topics(addr: std::net::SocketAddr, filter: &str) -> BTreeSet<String> {
    let mut c = raw::client(addr, V311, "rb-reader");
    c.send(&raw::subscribe(V311, 1, &[(filter, 0)]));
    assert_eq!(c.expect("SUBACK", WAIT).kind(), 9);
    c.send(&[0xC0, 0x00]);
    let mut topics = BTreeSet::new();
    loop {
        match c.read(WAIT) {
            Read1::Packet(p) if p.kind() == 3 => {
                let n = u16::from_be_bytes([p.body[0], p.body[1]]) as usize;
                topics.insert(String::from_utf8_lossy(&p.body[2..2 + n]).into_owned());
            }
            Read1::Packet(p) if p.kind() == 13 => return topics,
            other => panic!("{other:?}"),
        }
    }
}

/// 300 retained messages on 150-level topics: each keeps 150 trie nodes alive (at least 32
/// bytes each, however a trie is laid out) per shard, so a 64 KiB bound holds only a handful;
/// counting topic + payload alone (~300 bytes each) stored all of them.
#[test]
fn deep_retained_topics_are_bounded_by_their_trie_nodes() {
    let b = broker();
    let mut p = raw::client(b.shard_addrs[0], V311, "rb-deep");
    for i in 0..300u16 {
        let topic = format!("deep{i}/{}", vec!["l"; 149].join("/"));
        let mut pkt = raw::publish(V311, &topic, b"x", 1, i + 1);
        pkt[0] |= 0x01;
        p.send(&pkt);
        assert_eq!(p.expect("PUBACK", WAIT).kind(), 4);
    }
    for shard in 0..2 {
        let kept = retained_topics(b.shard_addrs[shard], "+/#").len();
        assert!(kept > 0, "shard {shard}: nothing kept");
        assert!(
            kept * 150 * 32 <= MAX_BYTES,
            "shard {shard} keeps {kept} messages of 150 levels against a {MAX_BYTES}-byte bound"
        );
    }
}

/// 200 retained v5 messages, each with a 1 KiB user property and a 1-byte payload: the
/// properties count, so a 64 KiB bound holds fewer than 64 of them.
#[test]
fn retained_v5_properties_count_against_the_bound() {
    let b = broker();
    let mut p = raw::client(b.shard_addrs[1], V5, "rb-props");
    let value = vec![b'v'; 1024];
    for i in 0..200u16 {
        let topic = format!("props/{i}");
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&(i + 1).to_be_bytes());
        // Properties: one user property ("k", 1 KiB value).
        let mut props = vec![0x26, 0x00, 0x01, b'k'];
        props.extend_from_slice(&(value.len() as u16).to_be_bytes());
        props.extend_from_slice(&value);
        let mut len = Vec::new();
        let mut n = props.len();
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            len.push(byte);
            if n == 0 {
                break;
            }
        }
        body.extend_from_slice(&len);
        body.extend_from_slice(&props);
        body.push(b'x');
        p.send(&raw::packet(0x33, &body)); // PUBLISH QoS 1, retain
        assert_eq!(p.expect("PUBACK", WAIT).kind(), 4);
    }
    for shard in 0..2 {
        let kept = retained_topics(b.shard_addrs[shard], "props/+").len();
        assert!(kept > 0, "shard {shard}: nothing kept");
        assert!(
            kept * 1024 <= MAX_BYTES,
            "shard {shard} keeps {kept} messages with 1 KiB of properties each against a \
             {MAX_BYTES}-byte bound"
        );
    }
}
