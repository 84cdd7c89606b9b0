//! The session races of wave 1, over real sockets on 2 shards (the simulator covers their
//! interleavings; these check the wiring): back-to-back reconnects keep a persistent session,
//! a clean start gets nothing of the old one, and reconnect storms in the middle of a stream
//! lose nothing. Hand-written MQTT bytes, so the client's timing is exactly the flapping
//! link's (a client library would wait for the CONNACK).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::raw::{self, Raw, Read1, V311};
use common::{TestBroker, WAIT};

/// Topic and payload of a PUBLISH (3.1.1), and its packet id if QoS > 0.
fn parse_publish(p: &raw::Pkt) -> (String, Option<u16>, Vec<u8>) {
    let qos = (p.first >> 1) & 3;
    let tlen = u16::from_be_bytes([p.body[0], p.body[1]]) as usize;
    let topic = String::from_utf8_lossy(&p.body[2..2 + tlen]).into_owned();
    let mut at = 2 + tlen;
    let pid = (qos > 0).then(|| {
        let id = u16::from_be_bytes([p.body[at], p.body[at + 1]]);
        at += 2;
        id
    });
    (topic, pid, p.body[at..].to_vec())
}

fn puback(pid: u16) -> [u8; 4] {
    let b = pid.to_be_bytes();
    [0x40, 0x02, b[0], b[1]]
}

/// Publish `n` QoS 1 messages numbered from `from`, each waited for (PUBACK).
fn publish_acked(publ: &mut Raw, topic: &str, from: u32, n: u32) {
    for i in from..from + n {
        let pid = (i % 60_000 + 1) as u16;
        publ.send(&raw::publish(V311, topic, &i.to_be_bytes(), 1, pid));
        loop {
            let p = publ.expect("PUBACK", WAIT);
            if p.kind() == 4 {
                break;
            }
        }
    }
}

/// Read every connection until `want` distinct numbers arrived (PUBACKing each) or `within`
/// passes; returns the numbers seen.
fn drain(conns: &mut [&mut Raw], topic: &str, want: usize, within: Duration) -> BTreeSet<u32> {
    let deadline = Instant::now() + within;
    let mut got = BTreeSet::new();
    let mut open = vec![true; conns.len()];
    while got.len() < want && Instant::now() < deadline && open.iter().any(|o| *o) {
        for (i, c) in conns.iter_mut().enumerate() {
            if !open[i] {
                continue;
            }
            match c.read(Duration::from_millis(5)) {
                Read1::Packet(p) if p.kind() == 3 => {
                    let (t, pid, body) = parse_publish(&p);
                    if let Some(pid) = pid {
                        c.send_lenient(&puback(pid));
                    }
                    if t == topic && body.len() == 4 {
                        got.insert(u32::from_be_bytes([body[0], body[1], body[2], body[3]]));
                    }
                }
                Read1::Packet(_) | Read1::Timeout => {}
                Read1::Closed => open[i] = false,
            }
        }
    }
    got
}

#[test]
fn back_to_back_reconnects_keep_the_session_100_of_100() {
    let b = TestBroker::start(2);
    let mut publ = raw::client(b.shard_addrs[0], V311, "b2b-publisher");
    let mut kept = 0;
    for round in 0..100u32 {
        let id = format!("flappy-{round}");
        let topic = format!("flap/{round}");
        // A persistent session with a QoS 1 subscription, then offline.
        let mut dev = Raw::open(b.shard_addrs[(round % 2) as usize]);
        dev.handshake(&raw::connect(V311, &id, 30, false));
        dev.send(&raw::subscribe(V311, 1, &[(&topic, 1)]));
        assert_eq!(dev.expect("SUBACK", WAIT).kind(), 9);
        dev.send(&raw::disconnect());
        drop(dev);
        // 20 messages queued for it while offline.
        publish_acked(&mut publ, &topic, 0, 20);
        // The flapping link: two CONNECTs, the second sent before the first CONNACK, on
        // different shards (in either order, by round).
        let (s1, s2) = if round % 4 < 2 { (0, 1) } else { (1, 0) };
        let mut c1 = Raw::open(b.shard_addrs[s1]);
        let mut c2 = Raw::open(b.shard_addrs[s2]);
        c1.send(&raw::connect(V311, &id, 30, false));
        c2.send(&raw::connect(V311, &id, 30, false));
        let got = drain(&mut [&mut c1, &mut c2], &topic, 20, Duration::from_secs(5));
        if got.len() == 20 {
            kept += 1;
        } else {
            eprintln!("round {round}: {} of 20 ({got:?})", got.len());
        }
        // Leave no session behind for the next round to pay for.
        drop((c1, c2));
        let mut end = Raw::open(b.shard_addrs[0]);
        end.handshake(&raw::connect(V311, &id, 30, true));
        end.send(&raw::disconnect());
    }
    assert_eq!(
        kept, 100,
        "the session survived {kept} of 100 back-to-back reconnects"
    );
}

#[test]
fn a_clean_start_gets_nothing_of_the_old_session() {
    let b = TestBroker::start(2);
    let mut publ = raw::client(b.shard_addrs[1], V311, "clean-publisher");
    for round in 0..20u32 {
        let id = format!("cleaner-{round}");
        let old_topic = format!("old/{round}");
        let new_topic = format!("new/{round}");
        let mut old = Raw::open(b.shard_addrs[0]);
        old.handshake(&raw::connect(V311, &id, 30, false));
        old.send(&raw::subscribe(V311, 1, &[(&old_topic, 1)]));
        assert_eq!(old.expect("SUBACK", WAIT).kind(), 9);
        // The old session has messages queued, in flight and arriving while it moves.
        publish_acked(&mut publ, &old_topic, 0, 10);
        drop(old);
        publish_acked(&mut publ, &old_topic, 10, 10);
        let mut fresh = Raw::open(b.shard_addrs[(round % 2) as usize]);
        let present = fresh.handshake(&raw::connect(V311, &id, 30, true));
        assert!(!present, "a clean start must not resume the session");
        fresh.send(&raw::subscribe(V311, 1, &[(&new_topic, 1)]));
        loop {
            let p = fresh.expect("SUBACK", WAIT);
            if p.kind() == 3 {
                let (t, _, _) = parse_publish(&p);
                assert_eq!(
                    t, new_topic,
                    "round {round}: the old session's message leaked"
                );
            }
            if p.kind() == 9 {
                break;
            }
        }
        publish_acked(&mut publ, &old_topic, 20, 10);
        publish_acked(&mut publ, &new_topic, 0, 5);
        // Everything it receives must belong to its own subscription [MQTT-3.1.2-4].
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut new_msgs = 0;
        while new_msgs < 5 && Instant::now() < deadline {
            if let Read1::Packet(p) = fresh.read(Duration::from_millis(20)) {
                if p.kind() == 3 {
                    let (t, pid, _) = parse_publish(&p);
                    assert_eq!(
                        t, new_topic,
                        "round {round}: the old session's message leaked"
                    );
                    if let Some(pid) = pid {
                        fresh.send(&puback(pid));
                    }
                    new_msgs += 1;
                }
            }
        }
        assert_eq!(new_msgs, 5, "round {round}: the new subscription works");
        fresh.send(&raw::disconnect());
    }
}

#[test]
fn reconnect_storms_during_a_stream_lose_nothing() {
    // A persistent subscriber flaps (storms of 2 or 3 CONNECTs on both shards) while 1,500
    // QoS 1 messages stream from a publisher; every acknowledged message reaches it.
    let b = TestBroker::start(2);
    const N: u32 = 1500;
    let topic = "storm/stream";
    let mut dev = Raw::open(b.shard_addrs[0]);
    dev.handshake(&raw::connect(V311, "stormy", 30, false));
    dev.send(&raw::subscribe(V311, 1, &[(topic, 1)]));
    assert_eq!(dev.expect("SUBACK", WAIT).kind(), 9);
    let addrs = b.shard_addrs.clone();
    let publisher = std::thread::spawn(move || {
        let mut publ = raw::client(addrs[1], V311, "storm-publisher");
        publish_acked(&mut publ, topic, 0, N);
    });
    let mut got = BTreeSet::new();
    let mut conns = vec![dev];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut storm = 0;
    while got.len() < N as usize || storm < 10 {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} arrived",
            got.len()
        );
        // Read for a while, then flap.
        let mut refs: Vec<&mut Raw> = conns.iter_mut().collect();
        got.extend(drain(
            &mut refs,
            topic,
            N as usize,
            Duration::from_millis(30),
        ));
        if !publisher.is_finished() || storm < 10 {
            storm += 1;
            conns.clear();
            for k in 0..(2 + storm % 2) {
                let mut c = Raw::open(b.shard_addrs[(storm + k) % 2]);
                c.send(&raw::connect(V311, "stormy", 30, false));
                conns.push(c);
            }
        }
    }
    publisher.join().expect("publisher");
    assert!(storm >= 10, "the subscriber flapped {storm} times");
    assert_eq!(got.len(), N as usize);
}
