//! rumqttc (MQTT 3.1.1) helpers shared by the tests that drive it synchronously.

use std::time::{Duration, Instant};

use rumqttc::{Client, Connection, Event, MqttOptions, Packet, Publish};

use super::WAIT;

pub fn client(id: &str, port: u16, clean: bool) -> (Client, Connection) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_clean_session(clean);
    Client::new(o, 1000)
}

/// Drive the connection until `n` publishes arrived or `within` passed.
pub fn recv_publishes(conn: &mut Connection, n: usize, within: Duration) -> Vec<Publish> {
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

/// Drive until a packet `what` accepts arrives (SUBACK, CONNACK, ...).
pub fn wait_for(conn: &mut Connection, what: fn(&Packet) -> bool) -> Packet {
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
