//! Flow control with clients we did not write (rumqttc, mosquitto_pub), 2 shards: a PUBACK is
//! a promise, so subscribers that are connected and making progress lose nothing however fast
//! the publishers go — full queues pause the publishers instead (issue 10). The queues are set
//! small here so the pausing happens within a few hundred messages.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::TestBroker;
use rumqttc::{Client, Connection, Event, MqttOptions, Packet, QoS};

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    o
}

fn connected(conn: &mut Connection) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) =
            conn.recv_timeout(Duration::from_millis(100))
        {
            return;
        }
    }
    panic!("no CONNACK");
}

fn subscribed(conn: &mut Connection) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Packet::SubAck(_)))) =
            conn.recv_timeout(Duration::from_millis(100))
        {
            return;
        }
    }
    panic!("no SUBACK");
}

/// What one subscriber saw: (publisher, seq) pairs in arrival order, and how many of them
/// were DUP re-deliveries.
struct Seen {
    order: Vec<(u32, u32)>,
    dups: usize,
}

/// A subscriber thread: reads until `want` distinct messages arrived (or `within`), pausing
/// `pause` every `every` messages to read "at its own pace".
fn subscriber(
    mut conn: Connection,
    want: usize,
    within: Duration,
    pause: Duration,
    every: usize,
) -> JoinHandle<Seen> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + within;
        let mut seen = Seen {
            order: Vec::new(),
            dups: 0,
        };
        let mut distinct = BTreeSet::new();
        let mut n = 0usize;
        while distinct.len() < want && Instant::now() < deadline {
            match conn.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let publ = u32::from_be_bytes(p.payload[0..4].try_into().unwrap());
                    let seq = u32::from_be_bytes(p.payload[4..8].try_into().unwrap());
                    if p.dup {
                        seen.dups += 1;
                    }
                    seen.order.push((publ, seq));
                    distinct.insert((publ, seq));
                    n += 1;
                    if every > 0 && n % every == 0 {
                        std::thread::sleep(pause); // a slow consumer, not synchronisation
                    }
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => panic!("subscriber connection error: {e:?}"),
            }
        }
        seen
    })
}

/// A publisher thread: `n` messages as fast as rumqttc's window allows; returns once each
/// was acknowledged (PUBACK, or PUBCOMP for QoS 2).
fn publisher(
    client: Client,
    mut conn: Connection,
    id: u32,
    topic: String,
    n: u32,
    qos: QoS,
) -> JoinHandle<u32> {
    let sender = std::thread::spawn(move || {
        for seq in 0..n {
            let mut payload = id.to_be_bytes().to_vec();
            payload.extend_from_slice(&seq.to_be_bytes());
            payload.resize(64, 0);
            client.publish(topic.clone(), qos, false, payload).unwrap();
        }
        client
    });
    std::thread::spawn(move || {
        let mut acked = 0u32;
        let deadline = Instant::now() + Duration::from_secs(120);
        while acked < n && Instant::now() < deadline {
            match conn.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) if qos == QoS::AtLeastOnce => acked += 1,
                Ok(Ok(Event::Incoming(Packet::PubComp(_)))) if qos == QoS::ExactlyOnce => {
                    acked += 1
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => panic!("publisher connection error: {e:?}"),
            }
        }
        let _client = sender.join().expect("publisher sender");
        acked
    })
}

/// Check one subscriber's log: every message of every publisher exactly as QoS promises,
/// each publisher's first deliveries in order.
fn check(seen: &Seen, publishers: &[u32], n: u32, qos: QoS, who: &str) {
    let mut first: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut count: HashMap<(u32, u32), usize> = HashMap::new();
    for &(p, s) in &seen.order {
        let c = count.entry((p, s)).or_default();
        *c += 1;
        if *c == 1 {
            first.entry(p).or_default().push(s);
        }
    }
    for &p in publishers {
        let got = first.get(&p).cloned().unwrap_or_default();
        assert_eq!(
            got.len(),
            n as usize,
            "{who}: {} of {n} from publisher {p}",
            got.len()
        );
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "{who}: publisher {p} out of order"
        );
    }
    let extra: usize = count.values().map(|c| c - 1).sum();
    match qos {
        QoS::ExactlyOnce => assert_eq!(extra, 0, "{who}: QoS 2 delivered more than once"),
        _ => assert!(
            extra <= seen.dups,
            "{who}: {extra} duplicates, only {} DUP",
            seen.dups
        ),
    }
}

fn pairs(qos: QoS) {
    const PAIRS: u32 = 16;
    const N: u32 = 1500;
    let b = TestBroker::start_with(2, |c| {
        c.session.max_queued_messages = 50;
        c.session.max_inflight = 10;
    });
    let mut subs = Vec::new();
    for i in 0..PAIRS {
        let (c, mut conn) = Client::new(
            options(&format!("fc-sub-{i}"), b.shard_port((i % 2) as usize)),
            1000,
        );
        connected(&mut conn);
        c.subscribe(format!("fc/{i}"), qos).unwrap();
        subscribed(&mut conn);
        // Half read at full speed, half pause 5 ms every 100 messages.
        let (pause, every) = if i % 2 == 0 {
            (Duration::ZERO, 0)
        } else {
            (Duration::from_millis(5), 100)
        };
        subs.push((
            c,
            subscriber(conn, N as usize, Duration::from_secs(120), pause, every),
        ));
    }
    let mut pubs = Vec::new();
    for i in 0..PAIRS {
        // Publisher i on the other shard than its subscriber: forwards carry the pressure.
        let (c, mut conn) = Client::new(
            options(&format!("fc-pub-{i}"), b.shard_port(((i + 1) % 2) as usize)),
            1000,
        );
        connected(&mut conn);
        pubs.push(publisher(c, conn, i, format!("fc/{i}"), N, qos));
    }
    for (i, p) in pubs.into_iter().enumerate() {
        assert_eq!(
            p.join().expect("publisher"),
            N,
            "publisher {i} acknowledged"
        );
    }
    for (i, (_c, s)) in subs.into_iter().enumerate() {
        let seen = s.join().expect("subscriber");
        check(&seen, &[i as u32], N, qos, &format!("subscriber {i}"));
    }
    let stats = b.stats();
    let drops: u64 = stats
        .iter()
        .map(|s| s.dropped_queue_full + s.dropped_stalled)
        .sum();
    let pauses: u64 = stats.iter().map(|s| s.pauses).sum();
    eprintln!("qos {qos:?}: pauses {pauses}, stats {stats:?}");
    assert_eq!(drops, 0, "acknowledged messages dropped: {stats:?}");
    assert!(
        pauses > 0,
        "the queues never filled: the test does not test flow control"
    );
}

#[test]
fn sixteen_qos1_publishers_to_sixteen_paced_subscribers_lose_nothing() {
    pairs(QoS::AtLeastOnce);
}

#[test]
fn sixteen_qos2_publishers_to_sixteen_paced_subscribers_exactly_once() {
    pairs(QoS::ExactlyOnce);
}

#[test]
fn a_share_group_under_pressure_gets_each_message_once() {
    const PUBS: u32 = 8;
    const N: u32 = 1000;
    let b = TestBroker::start_with(2, |c| {
        c.session.max_queued_messages = 50;
        c.session.max_inflight = 10;
    });
    let mut members = Vec::new();
    for i in 0..4u32 {
        let (c, mut conn) = Client::new(
            options(&format!("fc-member-{i}"), b.shard_port((i % 2) as usize)),
            1000,
        );
        connected(&mut conn);
        c.subscribe("$share/backend/fcs/+", QoS::AtLeastOnce)
            .unwrap();
        subscribed(&mut conn);
        let (pause, every) = if i == 0 {
            (Duration::from_millis(5), 50)
        } else {
            (Duration::ZERO, 0)
        };
        // Each member reads until the group has everything (bounded by time).
        members.push((
            c,
            subscriber(
                conn,
                (PUBS * N) as usize,
                Duration::from_secs(20),
                pause,
                every,
            ),
        ));
    }
    let mut pubs = Vec::new();
    for i in 0..PUBS {
        let (c, mut conn) = Client::new(
            options(&format!("fc-spub-{i}"), b.shard_port((i % 2) as usize)),
            1000,
        );
        connected(&mut conn);
        pubs.push(publisher(
            c,
            conn,
            i,
            format!("fcs/{i}"),
            N,
            QoS::AtLeastOnce,
        ));
    }
    for p in pubs {
        assert_eq!(p.join().expect("publisher"), N);
    }
    let mut all: HashMap<(u32, u32), usize> = HashMap::new();
    let mut dups = 0;
    for (_c, s) in members {
        let seen = s.join().expect("member");
        dups += seen.dups;
        for m in seen.order {
            *all.entry(m).or_default() += 1;
        }
    }
    assert_eq!(
        all.len(),
        (PUBS * N) as usize,
        "the group got {} of {}",
        all.len(),
        PUBS * N
    );
    let extra: usize = all.values().map(|c| c - 1).sum();
    assert!(
        extra <= dups,
        "{extra} duplicates in the group, only {dups} DUP"
    );
    let drops: u64 = b
        .stats()
        .iter()
        .map(|s| s.dropped_queue_full + s.dropped_stalled)
        .sum();
    assert_eq!(drops, 0);
}

#[test]
fn fan_in_from_200_mosquitto_pub_processes_to_one_slow_backend() {
    // 200 devices (Debian's mosquitto_pub, one process each, QoS 1) publish 25 messages each
    // to one backend subscriber that is a little slower than the burst.
    const DEVICES: u32 = 200;
    const EACH: u32 = 25;
    let b = TestBroker::start_with(2, |c| {
        c.session.max_queued_messages = 100;
    });
    let (c, mut conn) = Client::new(options("fc-backend", b.shard_port(0)), 1000);
    connected(&mut conn);
    c.subscribe("fanin/#", QoS::AtLeastOnce).unwrap();
    subscribed(&mut conn);
    let backend = subscriber(
        conn,
        (DEVICES * EACH) as usize,
        Duration::from_secs(60),
        Duration::from_millis(2),
        100,
    );
    let mut procs = Vec::new();
    for d in 0..DEVICES {
        let mut child = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &b.shard_port((d % 2) as usize).to_string(),
            ])
            .args([
                "-q",
                "1",
                "-t",
                &format!("fanin/{d}"),
                "-l",
                "-i",
                &format!("fc-dev-{d}"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub (scripts/test.sh installs mosquitto-clients)");
        procs.push((d, child.stdin.take().unwrap(), child));
    }
    // Binary payloads cannot go through `-l` (lines): each line is "device seq" padded to 8
    // bytes in the subscriber's reading: encode as two 4-byte big-endian numbers in hex-free
    // form by using raw bytes that contain no newline (all < 0x0a avoided by offset).
    for (d, stdin, _) in procs.iter_mut() {
        for seq in 0..EACH {
            let mut line = Vec::new();
            line.extend_from_slice(&(*d + 0x1010_1010).to_be_bytes());
            line.extend_from_slice(&(seq + 0x1010_1010).to_be_bytes());
            line.push(b'\n');
            stdin.write_all(&line).unwrap();
        }
    }
    for (_, stdin, _) in procs.iter_mut() {
        stdin.flush().unwrap();
    }
    let mut failed = 0;
    for (d, stdin, mut child) in procs {
        drop(stdin); // EOF: mosquitto_pub finishes its in-flight messages and exits
        let status = child.wait().expect("mosquitto_pub");
        if !status.success() {
            failed += 1;
            eprintln!("device {d}: mosquitto_pub exited {status}");
        }
    }
    assert_eq!(failed, 0, "every device's publishes were acknowledged");
    let seen = backend.join().expect("backend");
    let distinct: BTreeSet<(u32, u32)> = seen
        .order
        .iter()
        .map(|&(d, s)| (d - 0x1010_1010, s - 0x1010_1010))
        .collect();
    assert_eq!(
        distinct.len(),
        (DEVICES * EACH) as usize,
        "the backend got {} of {}",
        distinct.len(),
        DEVICES * EACH
    );
    drop(c);
    let stats = b.stats();
    let drops: u64 = stats
        .iter()
        .map(|s| s.dropped_queue_full + s.dropped_stalled)
        .sum();
    assert_eq!(drops, 0, "{stats:?}");
}

#[test]
fn a_stuck_subscriber_is_cut_loose_while_a_healthy_one_gets_200k() {
    const N: u32 = 200_000;
    let b = TestBroker::start_with(2, |c| c.stall_timeout = Duration::from_secs(2));
    // The stuck one: subscribes, then never reads (tiny receive buffer).
    let stuck = {
        use common::raw::{self, Raw, V311};
        use socket2::{Domain, Socket, Type};
        let sk = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sk.set_recv_buffer_size(4096).unwrap();
        sk.connect(&b.shard_addrs[0].into()).unwrap();
        let mut r = Raw::from_stream(sk.into());
        r.handshake(&raw::connect(V311, "fc-stuck", 60, true));
        r.send(&raw::subscribe(V311, 1, &[("fc/big", 1)]));
        assert_eq!(r.expect("SUBACK", common::WAIT).kind(), 9);
        r
    };
    let (hc, mut hconn) = Client::new(options("fc-healthy", b.shard_port(1)), 1000);
    connected(&mut hconn);
    hc.subscribe("fc/big", QoS::AtLeastOnce).unwrap();
    subscribed(&mut hconn);
    let healthy = subscriber(
        hconn,
        N as usize,
        Duration::from_secs(120),
        Duration::ZERO,
        0,
    );
    let rss = |pid: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let before = rss("self");
    let (pc, pconn) = Client::new(options("fc-big-pub", b.shard_port(0)), 1000);
    let p = publisher(pc, pconn, 7, "fc/big".into(), N, QoS::AtLeastOnce);
    assert_eq!(
        p.join().expect("publisher"),
        N,
        "every publish acknowledged"
    );
    let seen = healthy.join().expect("healthy");
    check(&seen, &[7], N, QoS::AtLeastOnce, "healthy subscriber");
    let after = rss("self");
    let stats = b.stats();
    let stalls: u64 = stats.iter().map(|s| s.stalls).sum();
    let stalled_drops: u64 = stats.iter().map(|s| s.dropped_stalled).sum();
    eprintln!("RSS {before} -> {after} KiB, stats {stats:?}");
    assert_eq!(stalls, 1, "the stuck subscriber was cut loose once");
    assert!(stalled_drops > 0, "its overflow was dropped and counted");
    // 200,000 × 64 B went through; the broker (and these clients) hold at most the stuck
    // one's bounded queue.
    assert!(
        after.saturating_sub(before) < 128 * 1024,
        "RSS grew {} KiB",
        after - before
    );
    drop(stuck);
}
