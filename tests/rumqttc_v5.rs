//! MQTT 5 interop with rumqttc's v5 client (a client we did not write).
mod common;

use std::time::{Duration, Instant};

use common::{TestBroker, WAIT};
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Connection, ConnectionError, Event, MqttOptions, StateError};

fn client(id: &str, port: u16, clean: bool, expiry: Option<u32>) -> (Client, Connection) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_clean_start(clean);
    o.set_session_expiry_interval(expiry);
    Client::new(o, 100)
}

fn recv_publishes(conn: &mut Connection, n: usize, within: Duration) -> Vec<Publish> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection error: {e:?}"),
            Err(_) => {}
        }
    }
    got
}

fn wait_for(conn: &mut Connection, what: fn(&Packet) -> bool) -> Packet {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(Event::Incoming(p))) if what(&p) => return p,
            Ok(Err(e)) => panic!("connection error: {e:?}"),
            _ => {}
        }
    }
    panic!("timed out waiting for packet");
}

fn suback(p: &Packet) -> bool {
    matches!(p, Packet::SubAck(_))
}

/// CONNACK → session_present.
fn connack(conn: &mut Connection) -> bool {
    match wait_for(conn, |p| matches!(p, Packet::ConnAck(_))) {
        Packet::ConnAck(a) => {
            assert_eq!(
                a.code,
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
            );
            a.session_present
        }
        _ => unreachable!(),
    }
}

fn drive(mut conn: Connection) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for ev in conn.iter() {
            if ev.is_err() {
                break;
            }
        }
    })
}

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

fn topic(p: &Publish) -> String {
    String::from_utf8(p.topic.to_vec()).unwrap()
}

#[test]
fn wildcards_and_qos_round_trips() {
    let b = TestBroker::start(2);
    let (sub, mut sconn) = client("v5-sub", b.port(), true, None);
    sub.subscribe("fleet/+/telemetry", QoS::ExactlyOnce)
        .unwrap();
    wait_for(&mut sconn, suback);
    sub.subscribe("cmd/#", QoS::AtLeastOnce).unwrap();
    wait_for(&mut sconn, suback);
    let (publ, pconn) = client("v5-pub", b.port(), true, None);
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
    publ.publish("cmd", QoS::ExactlyOnce, false, "root")
        .unwrap();
    publ.publish("cmd/a/b", QoS::ExactlyOnce, false, "deep")
        .unwrap();
    let got = recv_publishes(&mut sconn, 5, WAIT);
    let seen: Vec<(String, QoS)> = got.iter().map(|p| (topic(p), p.qos)).collect();
    assert_eq!(
        seen,
        [
            ("fleet/0/telemetry".into(), QoS::AtMostOnce),
            ("fleet/1/telemetry".into(), QoS::AtLeastOnce),
            ("fleet/2/telemetry".into(), QoS::ExactlyOnce),
            // Delivered at min(published, granted) QoS [MQTT-3.8.4-8].
            ("cmd".into(), QoS::AtLeastOnce),
            ("cmd/a/b".into(), QoS::AtLeastOnce),
        ]
    );
    assert_eq!(got[2].payload.as_ref(), &[2u8; 10][..]);
    assert!(recv_publishes(&mut sconn, 1, Duration::from_millis(300)).is_empty());
}

#[test]
fn qos2_exactly_once_count() {
    const N: usize = 300;
    let b = TestBroker::start(2);
    let (sub, mut sconn) = client("v5-sub-q2", b.port(), true, None);
    sub.subscribe("q2/count", QoS::ExactlyOnce).unwrap();
    wait_for(&mut sconn, suback);
    let (publ, pconn) = client("v5-pub-q2", b.port(), true, None);
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
        assert!(!p.dup);
        let v = u32::from_be_bytes(p.payload[..4].try_into().unwrap());
        assert_eq!(v as usize, i, "in publish order");
        assert!(seen.insert(v), "duplicate {v}");
    }
    assert!(recv_publishes(&mut sconn, 1, Duration::from_millis(500)).is_empty());
}

#[test]
fn retained_delivered_on_subscribe_and_cleared() {
    let b = TestBroker::start(2);
    let (publ, mut pconn) = client("v5-pub-ret", b.port(), true, None);
    publ.publish("ret5/a", QoS::AtLeastOnce, true, "kept")
        .unwrap();
    wait_for(&mut pconn, |p| matches!(p, Packet::PubAck(_)));
    let (sub, mut sconn) = client("v5-sub-ret", b.port(), true, None);
    sub.subscribe("ret5/#", QoS::AtLeastOnce).unwrap();
    let got = recv_publishes(&mut sconn, 1, WAIT);
    assert_eq!(got.len(), 1);
    assert!(got[0].retain);
    assert_eq!(got[0].payload.as_ref(), b"kept");
    // A live subscriber gets later retained publishes with retain=0 [MQTT-3.3.1-9]
    // (retain-as-published is off by default).
    publ.publish("ret5/a", QoS::AtLeastOnce, true, "").unwrap();
    wait_for(&mut pconn, |p| matches!(p, Packet::PubAck(_)));
    let got = recv_publishes(&mut sconn, 1, WAIT);
    assert_eq!(got.len(), 1);
    assert!(!got[0].retain);
    assert!(got[0].payload.is_empty());
    disconnect(&sub, &mut sconn);

    let (sub2, mut sconn2) = client("v5-sub-ret2", b.port(), true, None);
    sub2.subscribe("ret5/#", QoS::AtLeastOnce).unwrap();
    wait_for(&mut sconn2, suback);
    assert!(recv_publishes(&mut sconn2, 1, Duration::from_millis(600)).is_empty());
    let _d = drive(pconn);
}

#[test]
fn will_on_abnormal_close_not_after_disconnect() {
    use common::raw::{self, Raw, Will, V5};
    let b = TestBroker::start(2);
    let (sub, mut sconn) = client("v5-sub-will", b.port(), true, None);
    sub.subscribe("wills5/#", QoS::AtLeastOnce).unwrap();
    wait_for(&mut sconn, suback);

    let mut dying = Raw::open(b.addr);
    dying.handshake(&raw::connect_full(
        V5,
        "v5-dying",
        30,
        true,
        Some(Will {
            topic: "wills5/dying",
            payload: b"gone",
            qos: 1,
            retain: false,
        }),
        None,
    ));
    dying.s.shutdown(std::net::Shutdown::Both).unwrap();
    let got = recv_publishes(&mut sconn, 1, WAIT);
    assert_eq!(got.len(), 1, "will not published");
    assert_eq!(topic(&got[0]), "wills5/dying");
    assert_eq!(got[0].payload.as_ref(), b"gone");

    let mut polite = Raw::open(b.addr);
    polite.handshake(&raw::connect_full(
        V5,
        "v5-polite",
        30,
        true,
        Some(Will {
            topic: "wills5/polite",
            payload: b"never",
            qos: 1,
            retain: false,
        }),
        None,
    ));
    polite.send(&[0xE0, 0x01, 0x00]); // DISCONNECT, normal disconnection
    polite.until_closed(WAIT);
    assert!(recv_publishes(&mut sconn, 1, Duration::from_millis(800)).is_empty());
}

#[test]
fn persistent_session_with_expiry_receives_qos1_sent_while_offline() {
    let b = TestBroker::start(2);
    let (sub, mut sconn) = client("v5-persist", b.port(), true, Some(60));
    assert!(!connack(&mut sconn));
    sub.subscribe("off5/+", QoS::AtLeastOnce).unwrap();
    wait_for(&mut sconn, suback);
    disconnect(&sub, &mut sconn);
    drop(sconn);

    let (publ, mut pconn) = client("v5-pub-off", b.port(), true, None);
    for i in 0..5u8 {
        publ.publish(format!("off5/{i}"), QoS::AtLeastOnce, false, vec![i])
            .unwrap();
    }
    for _ in 0..5 {
        wait_for(&mut pconn, |p| matches!(p, Packet::PubAck(_)));
    }
    let _d = drive(pconn);

    let (_sub, mut sconn) = client("v5-persist", b.port(), false, Some(60));
    assert!(connack(&mut sconn), "session_present [MQTT-3.2.2-2]");
    let got = recv_publishes(&mut sconn, 5, WAIT);
    let payloads: Vec<u8> = got.iter().map(|p| p.payload[0]).collect();
    assert_eq!(payloads, [0, 1, 2, 3, 4]);
}

#[test]
fn session_without_expiry_is_discarded_on_disconnect() {
    // v5 with Session Expiry Interval 0 (the default): nothing survives the connection.
    let b = TestBroker::start(2);
    let (sub, mut sconn) = client("v5-transient", b.port(), false, None);
    connack(&mut sconn);
    sub.subscribe("gone/+", QoS::AtLeastOnce).unwrap();
    wait_for(&mut sconn, suback);
    disconnect(&sub, &mut sconn);
    drop(sconn);
    let (_s, mut sconn) = client("v5-transient", b.port(), false, None);
    assert!(!connack(&mut sconn), "no session after expiry 0");
}

#[test]
fn takeover_first_gets_0x8e_second_works() {
    let b = TestBroker::start(2);
    let (_first, mut c1) = client("v5-same", b.port(), true, None);
    connack(&mut c1);
    let (second, mut c2) = client("v5-same", b.port(), true, None);
    connack(&mut c2);
    let deadline = Instant::now() + WAIT;
    let mut reason = None;
    while Instant::now() < deadline && reason.is_none() {
        match c1.recv_timeout(Duration::from_millis(100)) {
            Ok(Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                reason_code,
                ..
            }))) => reason = Some(reason_code),
            Ok(Err(e)) => panic!("first closed without DISCONNECT: {e:?}"),
            _ => {}
        }
    }
    drop(c1);
    assert_eq!(reason, Some(DisconnectReasonCode::SessionTakenOver));

    second.subscribe("to5/second", QoS::AtLeastOnce).unwrap();
    wait_for(&mut c2, suback);
    let (publ, pconn) = client("v5-pub-take", b.port(), true, None);
    let _d = drive(pconn);
    publ.publish("to5/second", QoS::AtLeastOnce, false, "hi")
        .unwrap();
    let got = recv_publishes(&mut c2, 1, WAIT);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload.as_ref(), b"hi");
}

#[test]
fn takeover_raw_bytes_show_0x8e() {
    use common::raw::{self, Raw, V5};
    let b = TestBroker::start(2);
    let mut first = Raw::open(b.addr);
    first.handshake(&raw::connect(V5, "raw-same", 30, true));
    let mut second = Raw::open(b.addr);
    second.handshake(&raw::connect(V5, "raw-same", 30, true));
    let last = first.until_closed(WAIT);
    assert_eq!(
        last.iter()
            .map(|p| p.disconnect_reason())
            .collect::<Vec<_>>(),
        [Some(0x8E)],
        "first connection's last packets: {last:?}"
    );
}
