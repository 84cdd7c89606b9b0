//! MQTT 3.1.1 interop with rumqttc (a client we did not write).
mod common;

use std::time::{Duration, Instant};

use common::v311::{client, recv_publishes, wait_for};
use common::{TestBroker, WAIT};
use rumqttc::{Client, Connection, Event, Packet, QoS};

fn suback(p: &Packet) -> bool {
    matches!(p, Packet::SubAck(_))
}

#[test]
fn qos_round_trips_with_wildcards() {
    let b = TestBroker::start(2);
    let (sub, mut sconn) = client("sub", b.port(), true);
    sub.subscribe("fleet/+/telemetry", QoS::ExactlyOnce)
        .unwrap();
    wait_for(&mut sconn, suback);
    let (publ, pconn) = client("pub", b.port(), true);
    let _d = drive(pconn);
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        publ.publish(
            format!("fleet/{i}/telemetry"),
            qos,
            false,
            vec![i as u8; 10],
        )
        .unwrap();
    }
    publ.publish("fleet/x/other", QoS::AtLeastOnce, false, "no")
        .unwrap();
    let got = recv_publishes(&mut sconn, 3, WAIT);
    assert_eq!(got.len(), 3);
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.topic, format!("fleet/{i}/telemetry"));
        assert_eq!(p.payload.as_ref(), &vec![i as u8; 10][..]);
    }
    assert_eq!(got[0].qos, QoS::AtMostOnce);
    assert_eq!(got[1].qos, QoS::AtLeastOnce);
    assert_eq!(got[2].qos, QoS::ExactlyOnce);
    assert!(recv_publishes(&mut sconn, 1, Duration::from_millis(300)).is_empty());
}

/// Drive a connection in the background (a publisher nobody reads from).
fn drive(mut conn: Connection) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for ev in conn.iter() {
            if ev.is_err() {
                break;
            }
        }
    })
}

/// Disconnect cleanly: send DISCONNECT and drive until the event loop reports it sent.
fn disconnect(c: &Client, conn: &mut Connection) {
    c.disconnect().unwrap();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) => return,
            _ => {}
        }
    }
    panic!("DISCONNECT not sent");
}

/// Wait for CONNACK; returns session_present.
fn connack(conn: &mut Connection) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => {
                assert_eq!(a.code, rumqttc::ConnectReturnCode::Success);
                return a.session_present;
            }
            Ok(Err(e)) => panic!("connect failed: {e:?}"),
            _ => {}
        }
    }
    panic!("no CONNACK");
}

#[test]
fn multi_level_wildcard_matches_parent_and_children() {
    let b = TestBroker::start(2);
    let (sub, mut sconn) = client("sub-hash", b.port(), true);
    sub.subscribe("site/#", QoS::AtLeastOnce).unwrap();
    wait_for(&mut sconn, suback);
    let (publ, pconn) = client("pub-hash", b.port(), true);
    let _d = drive(pconn);
    for t in ["site", "site/a", "site/a/b/c", "other/site", "sites/x"] {
        publ.publish(t, QoS::AtLeastOnce, false, t.as_bytes().to_vec())
            .unwrap();
    }
    let got = recv_publishes(&mut sconn, 3, WAIT);
    let topics: Vec<String> = got.iter().map(|p| p.topic.clone()).collect();
    // [MQTT-4.7.1-2]: "site/#" also matches the parent "site".
    assert_eq!(topics, ["site", "site/a", "site/a/b/c"]);
    assert!(recv_publishes(&mut sconn, 1, Duration::from_millis(300)).is_empty());
}

#[test]
fn qos2_exactly_once_count() {
    const N: usize = 300;
    let b = TestBroker::start(2);
    let (sub, mut sconn) = client("sub-q2", b.port(), true);
    sub.subscribe("q2/count", QoS::ExactlyOnce).unwrap();
    wait_for(&mut sconn, suback);
    let (publ, pconn) = client("pub-q2", b.port(), true);
    let _d = drive(pconn);
    std::thread::spawn(move || {
        for i in 0..N as u32 {
            publ.publish(
                "q2/count",
                QoS::ExactlyOnce,
                false,
                i.to_be_bytes().to_vec(),
            )
            .unwrap();
        }
        publ
    });
    let got = recv_publishes(&mut sconn, N, Duration::from_secs(20));
    assert_eq!(got.len(), N);
    let mut seen = std::collections::HashSet::new();
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.qos, QoS::ExactlyOnce);
        assert!(!p.dup, "no redelivery on a healthy connection");
        let v = u32::from_be_bytes(p.payload[..4].try_into().unwrap());
        assert_eq!(v as usize, i, "in publish order");
        assert!(seen.insert(v), "duplicate {v}");
    }
    assert!(recv_publishes(&mut sconn, 1, Duration::from_millis(500)).is_empty());
}

#[test]
fn retained_delivered_on_subscribe_and_cleared_by_empty_publish() {
    let b = TestBroker::start(2);
    let (publ, mut pconn) = client("pub-ret", b.port(), true);
    publ.publish("ret/a", QoS::AtLeastOnce, true, "kept")
        .unwrap();
    publ.publish("ret/b", QoS::AtMostOnce, true, "also")
        .unwrap();
    // Wait for the QoS 1 PUBACK so the retained message is stored before we subscribe.
    wait_for(&mut pconn, |p| matches!(p, Packet::PubAck(_)));

    let (sub, mut sconn) = client("sub-ret", b.port(), true);
    sub.subscribe("ret/+", QoS::AtLeastOnce).unwrap();
    let mut got = recv_publishes(&mut sconn, 2, WAIT);
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(got.len(), 2);
    assert!(
        got.iter().all(|p| p.retain),
        "retained flag set on subscribe delivery"
    );
    assert_eq!(got[0].payload.as_ref(), b"kept");
    assert_eq!(got[1].payload.as_ref(), b"also");
    disconnect(&sub, &mut sconn);

    // An empty retained publish clears it [MQTT-3.3.1-10]; live subscribers see nothing.
    publ.publish("ret/a", QoS::AtLeastOnce, true, "").unwrap();
    wait_for(&mut pconn, |p| matches!(p, Packet::PubAck(_)));
    let (sub2, mut sconn2) = client("sub-ret2", b.port(), true);
    sub2.subscribe("ret/+", QoS::AtLeastOnce).unwrap();
    let got = recv_publishes(&mut sconn2, 2, Duration::from_millis(800));
    assert_eq!(got.len(), 1, "only ret/b left: {got:?}");
    assert_eq!(got[0].topic, "ret/b");
    let _d = drive(pconn);
}

#[test]
fn will_published_on_abnormal_close_only() {
    use common::raw::{self, Raw, Will, V311};
    let b = TestBroker::start(2);
    let (sub, mut sconn) = client("sub-will", b.port(), true);
    sub.subscribe("wills/#", QoS::AtLeastOnce).unwrap();
    wait_for(&mut sconn, suback);

    // 1. Socket shut without DISCONNECT: the will is published [MQTT-3.1.2-8].
    let mut dying = Raw::open(b.addr);
    dying.handshake(&raw::connect_full(
        V311,
        "dying",
        30,
        true,
        Some(Will {
            topic: "wills/dying",
            payload: b"gone",
            qos: 1,
            retain: false,
        }),
        None,
    ));
    dying.s.shutdown(std::net::Shutdown::Both).unwrap();
    let got = recv_publishes(&mut sconn, 1, WAIT);
    assert_eq!(got.len(), 1, "will not published");
    assert_eq!(got[0].topic, "wills/dying");
    assert_eq!(got[0].payload.as_ref(), b"gone");

    // 2. Clean DISCONNECT: the will is discarded [MQTT-3.1.2-10].
    let mut polite = Raw::open(b.addr);
    polite.handshake(&raw::connect_full(
        V311,
        "polite",
        30,
        true,
        Some(Will {
            topic: "wills/polite",
            payload: b"never",
            qos: 1,
            retain: false,
        }),
        None,
    ));
    polite.send(&raw::disconnect());
    polite.until_closed(WAIT);
    let got = recv_publishes(&mut sconn, 1, Duration::from_millis(800));
    assert!(got.is_empty(), "will sent after DISCONNECT: {got:?}");
}

#[test]
fn persistent_session_receives_qos1_sent_while_offline() {
    let b = TestBroker::start(2);
    let (sub, mut sconn) = client("persist-311", b.port(), false);
    assert!(!connack(&mut sconn), "first connect has no session");
    sub.subscribe("offline/+", QoS::AtLeastOnce).unwrap();
    wait_for(&mut sconn, suback);
    disconnect(&sub, &mut sconn);
    drop(sconn);

    let (publ, mut pconn) = client("pub-offline", b.port(), true);
    for i in 0..5u8 {
        publ.publish(format!("offline/{i}"), QoS::AtLeastOnce, false, vec![i])
            .unwrap();
    }
    publ.publish("offline/q0", QoS::AtMostOnce, false, "dropped")
        .unwrap();
    let mut acks = 0;
    while acks < 5 {
        wait_for(&mut pconn, |p| matches!(p, Packet::PubAck(_)));
        acks += 1;
    }
    let _d = drive(pconn);

    let (_sub, mut sconn) = client("persist-311", b.port(), false);
    assert!(connack(&mut sconn), "session_present [MQTT-3.2.2-2]");
    let got = recv_publishes(&mut sconn, 5, WAIT);
    let payloads: Vec<u8> = got.iter().map(|p| p.payload[0]).collect();
    assert_eq!(payloads, [0, 1, 2, 3, 4]);
    assert!(got.iter().all(|p| p.qos == QoS::AtLeastOnce));
    // QoS 0 is not queued for offline clients (mosquitto's default).
    assert!(recv_publishes(&mut sconn, 1, Duration::from_millis(300)).is_empty());
}

#[test]
fn takeover_disconnects_first_client_second_works() {
    let b = TestBroker::start(2);
    let (first, mut c1) = client("same-id", b.port(), true);
    connack(&mut c1);
    first.subscribe("to/first", QoS::AtLeastOnce).unwrap();
    wait_for(&mut c1, suback);

    let (second, mut c2) = client("same-id", b.port(), true);
    connack(&mut c2);
    // The first connection is closed by the broker [MQTT-3.1.4-3].
    let deadline = Instant::now() + WAIT;
    let mut closed = false;
    while Instant::now() < deadline {
        if let Ok(Err(_)) = c1.recv_timeout(Duration::from_millis(100)) {
            closed = true;
            break;
        }
    }
    assert!(closed, "first connection not closed");
    drop(c1); // stop its event loop before it reconnects and takes the id back

    second.subscribe("to/second", QoS::AtLeastOnce).unwrap();
    wait_for(&mut c2, suback);
    let (publ, pconn) = client("pub-take", b.port(), true);
    let _d = drive(pconn);
    publ.publish("to/second", QoS::AtLeastOnce, false, "hi")
        .unwrap();
    let got = recv_publishes(&mut c2, 1, WAIT);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload.as_ref(), b"hi");
}
