//! Two shards, clients placed deterministically on a chosen shard through each shard's own
//! listener: routing, takeover, retained and shared subscriptions must not depend on which
//! core a client landed on.
mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::v311::{client, recv_publishes, wait_for};
use common::{TestBroker, WAIT};
use rumqttc::{Client, Connection, Event, Outgoing, Packet, Publish, QoS};

fn connack(conn: &mut Connection) -> bool {
    match wait_for(conn, |p| matches!(p, Packet::ConnAck(_))) {
        Packet::ConnAck(a) => a.session_present,
        _ => unreachable!(),
    }
}

fn subscribe(c: &Client, conn: &mut Connection, filter: &str, qos: QoS) {
    c.subscribe(filter, qos).unwrap();
    wait_for(conn, |p| matches!(p, Packet::SubAck(_)));
}

/// Publish QoS 1 messages and wait for every PUBACK (so they are routed when we return).
fn publish_acked(c: &Client, conn: &mut Connection, msgs: &[(String, Vec<u8>)], retain: bool) {
    for (t, p) in msgs {
        c.publish(t.as_str(), QoS::AtLeastOnce, retain, p.clone())
            .unwrap();
    }
    for _ in msgs {
        wait_for(conn, |p| matches!(p, Packet::PubAck(_)));
    }
}

fn disconnect(c: &Client, conn: &mut Connection) {
    c.disconnect().unwrap();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) => return,
            _ => {}
        }
    }
    panic!("DISCONNECT not sent");
}

/// Wait until the broker closes `conn` (the event loop reports an error).
fn assert_closed(conn: &mut Connection) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(Err(_)) = conn.recv_timeout(Duration::from_millis(100)) {
            return;
        }
    }
    panic!("connection not closed by the broker");
}

/// Drive a publisher's connection in the background until it fails (no reconnect loop).
fn drive(mut conn: Connection) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for ev in conn.iter() {
            if ev.is_err() {
                break;
            }
        }
    })
}

fn numbered(topic: &str, n: u32) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (topic.to_string(), i.to_be_bytes().to_vec()))
        .collect()
}

fn numbers(got: &[Publish]) -> Vec<u32> {
    got.iter()
        .map(|p| u32::from_be_bytes(p.payload[..4].try_into().unwrap()))
        .collect()
}

#[test]
fn publishes_cross_shards_in_order_both_ways() {
    const N: u32 = 200;
    let b = TestBroker::start(2);
    let (s0, mut c0) = client("xs-sub0", b.shard_port(0), true);
    subscribe(&s0, &mut c0, "xs/#", QoS::AtLeastOnce);
    let (s1, mut c1) = client("xs-sub1", b.shard_port(1), true);
    subscribe(&s1, &mut c1, "xs/+", QoS::AtLeastOnce);
    for from in 0..2 {
        let (p, mut pc) = client(&format!("xs-pub{from}"), b.shard_port(from), true);
        let topic = format!("xs/from{from}");
        publish_acked(&p, &mut pc, &numbered(&topic, N), false);
        // Both subscribers (one local to the publisher, one remote) get every message, in the
        // publisher's order [MQTT-4.6.0-6].
        for (name, conn) in [("shard 0", &mut c0), ("shard 1", &mut c1)] {
            let got = recv_publishes(conn, N as usize, WAIT);
            assert!(got.iter().all(|m| m.topic == topic));
            assert_eq!(
                numbers(&got),
                (0..N).collect::<Vec<_>>(),
                "{name} from {from}"
            );
        }
    }
    // Both publishers at once.
    let (p0, mut pc0) = client("xs-both0", b.shard_port(0), true);
    let (p1, mut pc1) = client("xs-both1", b.shard_port(1), true);
    connack(&mut pc0);
    connack(&mut pc1);
    for i in 0..N {
        p0.publish("xs/a", QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
            .unwrap();
        p1.publish("xs/b", QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
            .unwrap();
    }
    let _d0 = drive(pc0);
    let _d1 = drive(pc1);
    for conn in [&mut c0, &mut c1] {
        let got = recv_publishes(conn, 2 * N as usize, WAIT);
        assert_eq!(got.len(), 2 * N as usize);
        for t in ["xs/a", "xs/b"] {
            let from_t: Vec<Publish> = got.iter().filter(|m| m.topic == t).cloned().collect();
            assert_eq!(numbers(&from_t), (0..N).collect::<Vec<_>>(), "{t}");
        }
    }
    drop((p0, p1));
}

#[test]
fn takeover_on_the_other_shard_moves_the_live_session() {
    let b = TestBroker::start(2);
    // Several ids, so the home shard is sometimes the old host, sometimes the new one.
    for (i, (from, to)) in [(0, 1), (1, 0), (0, 1), (1, 0)].into_iter().enumerate() {
        let id = format!("mover-{i}");
        let topic = format!("mv/{i}");
        let (a, mut ac) = client(&id, b.shard_port(from), false);
        assert!(!connack(&mut ac));
        subscribe(&a, &mut ac, &topic, QoS::AtLeastOnce);

        let (_b2, mut bc) = client(&id, b.shard_port(to), false);
        assert!(
            connack(&mut bc),
            "session_present after takeover ({from}->{to})"
        );
        assert_closed(&mut ac);
        drop(ac); // stop the old event loop before it reconnects

        // The subscription came along: a publish from either shard reaches the new host.
        for via in 0..2 {
            let (p, mut pc) = client(&format!("mv-pub-{i}-{via}"), b.shard_port(via), true);
            publish_acked(&p, &mut pc, &[(topic.clone(), vec![via as u8])], false);
            let got = recv_publishes(&mut bc, 1, WAIT);
            assert_eq!(got.len(), 1, "{from}->{to}, published via {via}");
            assert_eq!(got[0].payload.as_ref(), &[via as u8]);
        }
        // And exactly one copy: the old shard no longer delivers to a ghost.
        assert!(recv_publishes(&mut bc, 1, Duration::from_millis(200)).is_empty());
    }
}

#[test]
fn reconnect_on_the_other_shard_gets_messages_queued_offline() {
    let b = TestBroker::start(2);
    for (i, (from, to)) in [(0, 1), (1, 0), (0, 1), (1, 0)].into_iter().enumerate() {
        let id = format!("roam-{i}");
        let topic = format!("roam/{i}");
        let (a, mut ac) = client(&id, b.shard_port(from), false);
        assert!(!connack(&mut ac));
        subscribe(&a, &mut ac, &topic, QoS::AtLeastOnce);
        disconnect(&a, &mut ac);
        drop(ac);

        // Published on the shard the client left, and on the one it will land on.
        let (p, mut pc) = client(&format!("roam-pub-{i}"), b.shard_port(from), true);
        publish_acked(&p, &mut pc, &numbered(&topic, 5), false);
        let (p2, mut pc2) = client(&format!("roam-pub2-{i}"), b.shard_port(to), true);
        publish_acked(
            &p2,
            &mut pc2,
            &[(topic.clone(), 5u32.to_be_bytes().to_vec())],
            false,
        );

        let (_a2, mut ac2) = client(&id, b.shard_port(to), false);
        assert!(connack(&mut ac2), "session_present ({from}->{to})");
        let got = recv_publishes(&mut ac2, 6, WAIT);
        assert_eq!(numbers(&got), [0, 1, 2, 3, 4, 5], "{from}->{to}");
        // Live delivery continues on the new shard, right away: the resumed subscription's
        // route reached the publisher's shard before our CONNACK did.
        publish_acked(
            &p,
            &mut pc,
            &[(topic.clone(), 6u32.to_be_bytes().to_vec())],
            false,
        );
        let got = recv_publishes(&mut ac2, 1, WAIT);
        assert_eq!(numbers(&got), [6], "live after {from}->{to}, id {id}");
        assert!(recv_publishes(&mut ac2, 1, Duration::from_millis(200)).is_empty());
    }
}

#[test]
fn retained_set_on_one_shard_is_seen_on_the_other() {
    let b = TestBroker::start(2);
    for (set_on, sub_on) in [(0, 1), (1, 0)] {
        let topic = format!("rx/{set_on}");
        let (p, mut pc) = client(&format!("rx-pub{set_on}"), b.shard_port(set_on), true);
        publish_acked(&p, &mut pc, &[(topic.clone(), b"state".to_vec())], true);

        let (s, mut sc) = client(&format!("rx-sub{sub_on}"), b.shard_port(sub_on), true);
        s.subscribe("rx/#", QoS::AtLeastOnce).unwrap();
        let got = recv_publishes(&mut sc, 1, WAIT);
        assert_eq!(
            got.len(),
            1,
            "retained from shard {set_on} on shard {sub_on}"
        );
        assert!(got[0].retain);
        assert_eq!(got[0].topic, topic);
        disconnect(&s, &mut sc);

        // Cleared from the subscriber's shard, gone on the publisher's shard.
        let (c, mut cc) = client(&format!("rx-clr{sub_on}"), b.shard_port(sub_on), true);
        publish_acked(&c, &mut cc, &[(topic.clone(), Vec::new())], true);
        let (s2, mut sc2) = client(&format!("rx-sub2-{set_on}"), b.shard_port(set_on), true);
        subscribe(&s2, &mut sc2, "rx/#", QoS::AtLeastOnce);
        let got = recv_publishes(&mut sc2, 1, Duration::from_millis(500));
        assert!(got.is_empty(), "cleared retained still delivered: {got:?}");
    }
}

#[test]
fn shared_subscription_delivers_each_message_to_exactly_one_member() {
    const N: u32 = 200;
    let b = TestBroker::start(2);
    let (m0, mut c0) = client("share-m0", b.shard_port(0), true);
    subscribe(&m0, &mut c0, "$share/g/jobs/+", QoS::AtLeastOnce);
    let (m1, mut c1) = client("share-m1", b.shard_port(1), true);
    subscribe(&m1, &mut c1, "$share/g/jobs/+", QoS::AtLeastOnce);
    // A plain subscriber on the same topic still gets everything.
    let (pl, mut plc) = client("share-plain", b.shard_port(1), true);
    subscribe(&pl, &mut plc, "jobs/#", QoS::AtLeastOnce);

    let (p0, mut pc0) = client("share-pub0", b.shard_port(0), true);
    let (p1, mut pc1) = client("share-pub1", b.shard_port(1), true);
    publish_acked(&p0, &mut pc0, &numbered("jobs/a", N), false);
    let msgs: Vec<(String, Vec<u8>)> = (N..2 * N)
        .map(|i| ("jobs/b".to_string(), i.to_be_bytes().to_vec()))
        .collect();
    publish_acked(&p1, &mut pc1, &msgs, false);

    let mut seen = HashSet::new();
    let mut per_member = [0usize; 2];
    let deadline = Instant::now() + WAIT;
    while seen.len() < 2 * N as usize && Instant::now() < deadline {
        for (k, conn) in [&mut c0, &mut c1].into_iter().enumerate() {
            for m in recv_publishes(conn, 2 * N as usize, Duration::from_millis(50)) {
                let v = numbers(std::slice::from_ref(&m))[0];
                assert!(
                    seen.insert(v),
                    "message {v} delivered to more than one member"
                );
                per_member[k] += 1;
            }
        }
    }
    assert_eq!(seen.len(), 2 * N as usize, "per member: {per_member:?}");
    for (k, conn) in [&mut c0, &mut c1].into_iter().enumerate() {
        let extra = recv_publishes(conn, 1, Duration::from_millis(200));
        assert!(extra.is_empty(), "member {k} got an extra copy: {extra:?}");
    }
    // The group spreads the load over its members on both shards.
    assert!(
        per_member.iter().all(|&n| n > 0),
        "per member: {per_member:?}"
    );
    let plain = recv_publishes(&mut plc, 2 * N as usize, WAIT);
    assert_eq!(plain.len(), 2 * N as usize);
}

/// Forwarded messages must wake an idle shard promptly: a publisher on one shard, a
/// subscriber on the other, with pauses so the receiving shard goes to sleep in between.
#[test]
fn idle_shard_is_woken_by_forwarded_messages() {
    use common::raw::{self, V311};
    let b = TestBroker::start(2);
    for (from, to) in [(0, 1), (1, 0)] {
        let mut sub = raw::client(b.shard_addrs[to], V311, &format!("wake-sub-{to}"));
        sub.send(&raw::subscribe(V311, 1, &[("wake/#", 0)]));
        assert_eq!(sub.expect("SUBACK", WAIT).kind(), 9);
        let mut publ = raw::client(b.shard_addrs[from], V311, &format!("wake-pub-{from}"));
        // Let the route delta settle (see subscribe_then_publish_on_other_shard).
        std::thread::sleep(Duration::from_millis(100));
        for i in 0..60u32 {
            std::thread::sleep(Duration::from_millis(u64::from(i % 7) * 9));
            publ.send(&raw::publish(V311, "wake/x", &i.to_be_bytes(), 0, 0));
            let p = sub.expect(
                &format!("message {i} ({from}->{to})"),
                Duration::from_secs(2),
            );
            assert_eq!(p.kind(), 3);
            assert!(p.body.ends_with(&i.to_be_bytes()));
            // A shard that was asleep must be woken by the forward: without the wake-up the
            // message would sit until some unrelated event (the 2 s `expect` above fails).
        }
    }
}

/// A subscriber that got its SUBACK expects a message published afterwards by a device on
/// another core to reach it (mosquitto: always). The route delta travels by mailbox, so
/// this checks it is applied before a later publish is routed on the other shard.
#[test]
fn subscribe_then_publish_on_other_shard() {
    use common::raw::{self, V311};
    let b = TestBroker::start(2);
    let mut misses = Vec::new();
    for (from, to) in [(0, 1), (1, 0)] {
        let mut publ = raw::client(b.shard_addrs[from], V311, &format!("sp-pub-{from}"));
        let mut sub = raw::client(b.shard_addrs[to], V311, &format!("sp-sub-{to}"));
        for i in 0..100u16 {
            let topic = format!("sp/{from}/{i}");
            sub.send(&raw::subscribe(V311, i + 1, &[(&topic, 1)]));
            assert_eq!(sub.expect("SUBACK", WAIT).kind(), 9);
            publ.send(&raw::publish(V311, &topic, b"x", 1, i + 1));
            assert_eq!(publ.expect("PUBACK", WAIT).kind(), 4);
            match sub.read(Duration::from_secs(1)) {
                raw::Read1::Packet(p) if p.kind() == 3 => {
                    let pid = &p.body[2 + topic.len()..4 + topic.len()];
                    sub.send(&[0x40, 2, pid[0], pid[1]]);
                }
                other => misses.push((from, to, i, format!("{other:?}"))),
            }
            if misses.len() >= 10 {
                break; // enough to show it; keep a failing run short
            }
        }
    }
    assert!(
        misses.is_empty(),
        "{} of 200 missed: {misses:?}",
        misses.len()
    );
}

/// A retained message acknowledged (PUBACK) on one shard is there for a subscriber on the
/// other shard that subscribes right after.
#[test]
fn retained_then_subscribe_on_other_shard() {
    use common::raw::{self, V311};
    let b = TestBroker::start(2);
    let mut misses = Vec::new();
    for (from, to) in [(0, 1), (1, 0)] {
        let mut publ = raw::client(b.shard_addrs[from], V311, &format!("rp-pub-{from}"));
        let mut sub = raw::client(b.shard_addrs[to], V311, &format!("rp-sub-{to}"));
        for i in 0..100u16 {
            let topic = format!("rp/{from}/{i}");
            let mut p = raw::publish(V311, &topic, b"r", 1, i + 1);
            p[0] |= 0x01; // retain
            publ.send(&p);
            assert_eq!(publ.expect("PUBACK", WAIT).kind(), 4);
            sub.send(&raw::subscribe(V311, i + 1, &[(&topic, 0)]));
            assert_eq!(sub.expect("SUBACK", WAIT).kind(), 9);
            match sub.read(Duration::from_secs(1)) {
                raw::Read1::Packet(p) if p.kind() == 3 => {}
                other => misses.push((from, to, i, format!("{other:?}"))),
            }
            if misses.len() >= 10 {
                break; // enough to show it; keep a failing run short
            }
        }
    }
    assert!(misses.is_empty(), "missed: {misses:?}");
}

/// When a member of a share group leaves, the group's messages go to the members left; none
/// is lost in the moment the leaving member's shard still appears in other shards' routes.
#[test]
fn shared_subscription_member_leaving_loses_nothing() {
    use common::raw::{self, V311};
    let b = TestBroker::start(2);
    let mut lost = Vec::new();
    for round in 0..20u16 {
        let filter = format!("$share/g/leave/{round}");
        let topic = format!("leave/{round}");
        let mut stay = raw::client(b.shard_addrs[0], V311, "leave-stay");
        stay.send(&raw::subscribe(V311, 1, &[(&filter, 1)]));
        assert_eq!(stay.expect("SUBACK", WAIT).kind(), 9);
        let mut go = raw::client(b.shard_addrs[1], V311, "leave-go");
        go.send(&raw::subscribe(V311, 1, &[(&filter, 1)]));
        assert_eq!(go.expect("SUBACK", WAIT).kind(), 9);
        let mut publ = raw::client(b.shard_addrs[0], V311, "leave-pub");
        go.send(&raw::disconnect());
        go.until_closed(WAIT);
        for i in 0..10u16 {
            publ.send(&raw::publish(V311, &topic, &i.to_be_bytes(), 1, i + 1));
            assert_eq!(publ.expect("PUBACK", WAIT).kind(), 4);
        }
        let mut got = 0;
        while got < 10 {
            match stay.read(Duration::from_millis(500)) {
                raw::Read1::Packet(p) if p.kind() == 3 => {
                    let pid = &p.body[2 + topic.len()..4 + topic.len()];
                    stay.send(&[0x40, 2, pid[0], pid[1]]);
                    got += 1;
                }
                other => {
                    lost.push((round, 10 - got, format!("{other:?}")));
                    break;
                }
            }
        }
        stay.send(&raw::disconnect());
        publ.send(&raw::disconnect());
        stay.until_closed(WAIT);
        publ.until_closed(WAIT);
    }
    assert!(lost.is_empty(), "(round, lost, why): {lost:?}");
}

/// A persistent session taken over by a connection on the other shard while QoS 1 messages
/// stream in: every message arrives (at the old or the new connection), none is lost in the
/// hand-over. Duplicates are allowed (QoS 1).
#[test]
fn takeover_during_a_qos1_stream_loses_nothing() {
    use common::raw::{self, Raw, Read1, V311};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const N: u16 = 3000;
    let b = TestBroker::start(2);
    for (from, to) in [(0, 1), (1, 0)] {
        let id = format!("stream-{from}{to}");
        let topic = format!("stream/{from}{to}");
        let mut a = Raw::open(b.shard_addrs[from]);
        a.handshake(&raw::connect(V311, &id, 30, false));
        a.send(&raw::subscribe(V311, 1, &[(&topic, 1)]));
        assert_eq!(a.expect("SUBACK", WAIT).kind(), 9);

        // The publisher (on the shard that is neither-or-both) streams with its own acks.
        let publ_addr = b.shard_addrs[from];
        let t2 = topic.clone();
        let done = Arc::new(AtomicBool::new(false));
        let done2 = done.clone();
        let publisher = std::thread::spawn(move || {
            let mut p = raw::client(publ_addr, V311, "streamer");
            for i in 0..N {
                p.send(&raw::publish(V311, &t2, &i.to_be_bytes(), 1, i + 1));
                assert_eq!(p.expect("PUBACK", WAIT).kind(), 4);
            }
            done2.store(true, Ordering::Release);
        });

        let mut seen = vec![false; N as usize];
        let read_ack = |c: &mut Raw, seen: &mut Vec<bool>, within: Duration| -> bool {
            match c.read(within) {
                Read1::Packet(p) if p.kind() == 3 => {
                    let tl = topic.len();
                    let pid = [p.body[2 + tl], p.body[3 + tl]];
                    let v = u16::from_be_bytes([p.body[4 + tl], p.body[5 + tl]]);
                    seen[v as usize] = true;
                    c.send_lenient(&[0x40, 2, pid[0], pid[1]]);
                    true
                }
                Read1::Packet(_) => true,
                _ => false,
            }
        };
        let mut got_a = 0;
        while got_a < 300 && read_ack(&mut a, &mut seen, WAIT) {
            got_a += 1;
        }
        let mut bc = Raw::open(b.shard_addrs[to]);
        assert!(
            bc.handshake(&raw::connect(V311, &id, 30, false)),
            "session_present"
        );
        // Whatever the old connection still had buffered counts as received.
        while read_ack(&mut a, &mut seen, Duration::from_millis(50)) {}
        while !(done.load(Ordering::Acquire) && seen.iter().all(|&s| s)) {
            if !read_ack(&mut bc, &mut seen, Duration::from_secs(2)) {
                break;
            }
        }
        publisher.join().unwrap();
        let missing: Vec<usize> = (0..N as usize).filter(|&i| !seen[i]).collect();
        assert!(
            missing.is_empty(),
            "{from}->{to}: {} lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        bc.send(&raw::disconnect());
    }
}
