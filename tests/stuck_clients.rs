//! Clients that stop half-way through a packet, or send one slowly, against the real binary:
//! they cost the broker nothing but their buffers. Every other client keeps being served, and
//! SIGTERM still stops the process.
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::bin::{free_port, Midge};
use common::raw::{self, Raw, V311};
use common::WAIT;

/// A connected 3.1.1 client whose CONNACK the broker logged; returns the shard it landed on.
fn connect_logged(m: &mut Midge, addr: SocketAddr, id: &str, keepalive: u16) -> (Raw, usize) {
    let mut c = Raw::open(addr);
    c.handshake(&raw::connect(V311, id, keepalive, true));
    let needle = format!(" as {id} ");
    let line = m
        .wait_log(WAIT, |l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no connect line for {id}"));
    let shard = line
        .rsplit("on shard ")
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no shard in {line:?}"));
    (c, shard)
}

/// Fresh clients connect, subscribe, publish QoS 1 and receive it: the broker is serving.
fn round_trip(addr: SocketAddr, n: usize) {
    let topic = format!("live/{n}");
    let mut sub = raw::client(addr, V311, &format!("live-sub-{n}"));
    sub.send(&raw::subscribe(V311, 1, &[(&topic, 1)]));
    assert_eq!(sub.expect("SUBACK", WAIT).kind(), 9, "round {n}");
    let mut publ = raw::client(addr, V311, &format!("live-pub-{n}"));
    publ.send(&raw::publish(V311, &topic, b"alive", 1, 7));
    assert_eq!(publ.expect("PUBACK", WAIT).kind(), 4, "round {n}");
    let p = sub.expect("PUBLISH", WAIT);
    assert_eq!(p.kind(), 3, "round {n}: {p:?}");
    assert!(p.body.ends_with(b"alive"));
    sub.send(&raw::disconnect());
    publ.send(&raw::disconnect());
}

/// Three bytes of a PUBLISH, then silence, on several connections of every shard (the start
/// of a packet must not turn a connection's idle timer into a busy loop that starves its
/// shard): new clients keep being served well past the idle-trim delay, and SIGTERM stops
/// the broker with exit code 0.
#[test]
fn half_sent_packets_on_every_shard_block_nothing() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut m = Midge::spawn(&["-p", &port.to_string(), "--shards", "2"], Some("info"));
    m.wait_listening(addr);

    // Keep connecting until each shard holds three stuck connections (REUSEPORT spreads
    // them; the connect log line says where each landed).
    let mut stuck = Vec::new();
    let mut per_shard = [0usize; 2];
    for i in 0..64 {
        if per_shard.iter().all(|&n| n >= 3) {
            break;
        }
        let (mut c, shard) = connect_logged(&mut m, addr, &format!("stuck-{i}"), 0);
        c.send(&[0x30, 0x10, 0x00]); // PUBLISH, remaining length 16, first topic-length byte
        per_shard[shard] += 1;
        stuck.push(c);
    }
    assert!(
        per_shard.iter().all(|&n| n >= 3),
        "per shard: {per_shard:?}"
    );

    // Keep serving others for three seconds: past the one-second idle trim of every stuck
    // connection, which is when a shard froze.
    let since = Instant::now();
    let mut n = 0;
    while since.elapsed() < Duration::from_secs(3) {
        round_trip(addr, n);
        n += 1;
    }
    // The stuck connections are still open and still answered once they finish a packet.
    for c in &mut stuck {
        // The rest of the 16-byte body: topic length 0 (no topic), which 3.1.1 forbids, so
        // the broker closes the connection [MQTT-4.7.3-1].
        let mut rest = vec![0x00];
        rest.extend_from_slice(&[b'x'; 14]);
        c.send(&rest);
    }
    for c in &mut stuck {
        c.until_closed(WAIT);
    }
    round_trip(addr, n);

    m.sigterm();
    let st = m
        .wait_exit(Duration::from_secs(15))
        .expect("midge exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "exit status {st}");
}

/// A 3 KB QoS 1 PUBLISH arriving in three pieces 1.5 s apart (a slow cellular link, keepalive
/// 60): the broker serves others meanwhile, then acknowledges and delivers the message.
#[test]
fn a_publish_sent_in_slow_pieces_is_delivered_while_others_are_served() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut m = Midge::spawn(&["-p", &port.to_string(), "--shards", "1"], Some("info"));
    m.wait_listening(addr);

    let mut sub = raw::client(addr, V311, "slow-sub");
    sub.send(&raw::subscribe(V311, 1, &[("slow/#", 1)]));
    assert_eq!(sub.expect("SUBACK", WAIT).kind(), 9);

    let mut publ = Raw::open(addr);
    publ.handshake(&raw::connect(V311, "slow-pub", 60, true));
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let packet = raw::publish(V311, "slow/cell", &payload, 1, 42);
    let third = packet.len() / 3;
    let pieces = [
        &packet[..third],
        &packet[third..2 * third],
        &packet[2 * third..],
    ];
    for (i, piece) in pieces.iter().enumerate() {
        publ.send(piece);
        if i == pieces.len() - 1 {
            break;
        }
        // The link's gap: 1.5 s during which another client keeps talking to the broker.
        let gap = Instant::now();
        while gap.elapsed() < Duration::from_millis(1500) {
            sub.send(&[0xC0, 0x00]);
            let p = sub.expect("PINGRESP during the gap", WAIT);
            assert_eq!(p.kind(), 13, "{p:?}");
        }
    }
    let ack = publ.expect("PUBACK", WAIT);
    assert_eq!((ack.kind(), &ack.body[..]), (4, &[0u8, 42][..]), "{ack:?}");
    let p = sub.expect("the 3 KB PUBLISH", WAIT);
    assert_eq!(p.kind(), 3, "{p:?}");
    assert!(p.body.ends_with(&payload), "payload mangled");

    m.sigterm();
    let st = m
        .wait_exit(Duration::from_secs(15))
        .expect("midge exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "exit status {st}");
}
