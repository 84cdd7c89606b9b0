//! v5 No Local across shards: a subscriber that is not the publisher gets the message
//! whichever cores the publisher and the subscribers landed on.
mod common;

use std::time::{Duration, Instant};

use common::{TestBroker, WAIT};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Connection, Event, MqttOptions};

fn client(id: &str, port: u16) -> (Client, Connection) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    Client::new(o, 100)
}

/// Drive `conn` until a packet `what` accepts arrives; panics after `WAIT`.
fn wait_for(conn: &mut Connection, what: impl Fn(&Packet) -> bool) -> Packet {
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

/// Payloads of the publishes that arrive: wait up to `WAIT` for `n`, then a short quiet
/// period for any extra copy (driving the connection throughout).
fn publishes(conn: &mut Connection, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut deadline = Instant::now() + WAIT;
    let mut quiet = false;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(20)) {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p.payload.to_vec()),
            Ok(Err(e)) => panic!("connection error: {e:?}"),
            _ => {}
        }
        if got.len() >= n && !quiet {
            quiet = true;
            deadline = Instant::now() + Duration::from_millis(200);
        }
    }
    got
}

#[test]
fn no_local_subscribers_on_two_shards_get_each_others_messages() {
    let b = TestBroker::start(2);
    // Every placement: both on one shard, and on different shards in both directions.
    for (round, (sa, sb)) in [(0, 1), (1, 0), (0, 0), (1, 1)].into_iter().enumerate() {
        let topic = format!("nl/{round}");
        let (a, mut ac) = client(&format!("nl-a-{round}"), b.shard_port(sa));
        let (bb, mut bc) = client(&format!("nl-b-{round}"), b.shard_port(sb));
        for (c, conn) in [(&a, &mut ac), (&bb, &mut bc)] {
            let mut f = Filter::new(&topic, QoS::AtLeastOnce);
            f.nolocal = true;
            c.subscribe_many([f]).unwrap();
            wait_for(conn, |p| matches!(p, Packet::SubAck(_)));
        }
        a.publish(&topic, QoS::AtLeastOnce, false, b"from-a".to_vec())
            .unwrap();
        wait_for(&mut ac, |p| matches!(p, Packet::PubAck(_)));
        let got_b = publishes(&mut bc, 1);
        assert_eq!(
            got_b,
            vec![b"from-a".to_vec()],
            "B (shard {sb}) must get A's (shard {sa}) message once"
        );
        bb.publish(&topic, QoS::AtLeastOnce, false, b"from-b".to_vec())
            .unwrap();
        wait_for(&mut bc, |p| matches!(p, Packet::PubAck(_)));
        let got_a = publishes(&mut ac, 1);
        assert_eq!(
            got_a,
            vec![b"from-b".to_vec()],
            "A (shard {sa}) must get B's (shard {sb}) message once, and not its own"
        );
        let own_b = publishes(&mut bc, 0);
        assert!(own_b.is_empty(), "B got its own message: {own_b:?}");
    }
}
