//! MQTT 3.1.1 interop with rumqttc (a client we did not write).
mod common;

use std::time::{Duration, Instant};

use common::{TestBroker, WAIT};
use rumqttc::{Client, Connection, Event, MqttOptions, Packet, QoS};

fn client(id: &str, port: u16, clean: bool) -> (Client, Connection) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_clean_session(clean);
    Client::new(o, 100)
}

/// Drive the connection until `n` publishes arrived or the deadline passed.
fn recv_publishes(conn: &mut Connection, n: usize, within: Duration) -> Vec<rumqttc::Publish> {
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

/// Drive until the SUBACK (or CONNACK etc.) we wait for.
fn wait_for(conn: &mut Connection, what: fn(&Packet) -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(p))) = conn.recv_timeout(Duration::from_millis(100)) {
            if what(&p) {
                return;
            }
        }
    }
    panic!("timed out waiting for packet");
}

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
    let (publ, mut pconn) = client("pub", b.port(), true);
    std::thread::spawn(move || for _ in pconn.iter() {});
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
