//! `persistence true` against kill -9: the real binary, a client we did not write (rumqttc),
//! and the promise that nothing acknowledged is lost.
//!
//! Each round: a publisher sends a retained message and 5,000 QoS 1 (every 25th QoS 2)
//! messages to an offline persistent session; the broker is killed with SIGKILL after a
//! random number of acknowledgements; it restarts on the same directory; the subscriber
//! reconnects (without subscribing again) and must get every message that had been PUBACKed
//! or PUBRECed (duplicates allowed at QoS 1, none at QoS 2, across all rounds), and the
//! retained message must be there. The subscriber then leaves and the broker is restarted
//! (SIGTERM), so every round also recovers a log that ends in deliveries.
mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::bin::{free_port, Midge};
use common::v311::{client, wait_for};
use rumqttc::{Event, Outgoing, Packet, QoS};

const MESSAGES: usize = 5_000;
const ROUNDS: usize = 11;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn seed() -> u64 {
    let s = std::env::var("PERSIST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("PERSIST_SEED={s}");
    s | 1
}

fn config(dir: &Path, port: u16) -> std::path::PathBuf {
    let f = dir.join("midge.conf");
    std::fs::write(
        &f,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}\nmax_queued_messages 20000\nlog_dest stderr\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    f
}

/// Start midge on `conf` and wait until each of its shards listens. After a SIGKILL the
/// kernel tears the dead process's io_uring down asynchronously, and its listening socket
/// (held by a pending accept) can outlive it for a moment: midge then refuses to start
/// ("already in use"), and we try again (bounded).
fn start(conf: &Path, shards: usize, port: u16) -> Midge {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut m = Midge::spawn(
            &[
                "-c",
                conf.to_str().unwrap(),
                "--shards",
                &shards.to_string(),
            ],
            Some("info"),
        );
        let listening = |m: &Midge| {
            m.lines()
                .iter()
                .filter(|l| l.contains(&format!("listening on 127.0.0.1:{port}")))
                .count()
        };
        loop {
            if listening(&m) >= shards {
                return m;
            }
            if let Some(st) = m.exited() {
                let lines = m.lines();
                assert!(
                    lines.iter().any(|l| l.contains("already in use")) && Instant::now() < deadline,
                    "midge exited during start-up: {st}\n{}",
                    lines.join("\n")
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "midge did not start:\n{}",
                m.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill9(m: &mut Midge, port: u16) {
    let _ = m.child.kill();
    let _ = m.child.wait();
    wait_port_free(port);
}

/// Until the dead broker's listening socket is gone (see `start`).
fn wait_port_free(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "port {port} still held 20 s after a kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What one publisher had acknowledged when its broker died.
#[derive(Default)]
struct Acked {
    qos1: HashSet<String>,
    qos2: HashSet<String>,
    retained: bool,
}

/// Publish the round's messages; SIGKILL the broker after `kill_after` acknowledgements.
/// Returns what was acknowledged (including acknowledgements read after the kill).
fn publish_and_kill(port: u16, round: usize, kill_after: usize, broker: &mut Midge) -> Acked {
    let pid = broker.child.id() as libc::pid_t;
    let (c, mut conn) = client(&format!("persist-pub-{round}"), port, true);
    // The order requests leave in: the n-th outgoing PUBLISH is plan[n].
    let mut plan: Vec<(String, QoS, String, bool)> = vec![(
        "persist/ret".into(),
        QoS::AtLeastOnce,
        format!("ret-{round}"),
        true,
    )];
    for i in 0..MESSAGES {
        let (topic, qos) = if i % 25 == 0 {
            (format!("exact/{round}"), QoS::ExactlyOnce)
        } else {
            (format!("load/{round}"), QoS::AtLeastOnce)
        };
        plan.push((topic, qos, format!("{round}:{i}"), false));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let plan = plan.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            for (t, q, p, r) in plan {
                if stop.load(Ordering::Relaxed) || c.publish(t, q, r, p).is_err() {
                    break;
                }
            }
            c
        })
    };
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut by_pkid: HashMap<u16, usize> = HashMap::new();
    let mut sent = 0usize;
    let mut count = 0usize;
    let mut killed = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                by_pkid.insert(pkid, sent);
                sent += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                let (_, _, p, r) = &plan[by_pkid[&a.pkid]];
                let mut g = acked.lock().unwrap();
                if *r {
                    g.retained = true;
                } else {
                    g.qos1.insert(p.clone());
                }
                count += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubRec(a)))) => {
                let (_, _, p, _) = &plan[by_pkid[&a.pkid]];
                acked.lock().unwrap().qos2.insert(p.clone());
                count += 1;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                if killed {
                    break;
                }
            }
        }
        if !killed && count >= kill_after {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
        }
    }
    assert!(
        killed,
        "round {round}: only {count} acknowledgements in 60 s"
    );
    stop.store(true, Ordering::Relaxed);
    drop(conn);
    let _ = sender.join();
    let _ = broker.child.wait();
    wait_port_free(port);
    Arc::try_unwrap(acked)
        .map(|m| m.into_inner().unwrap())
        .unwrap_or_default()
}

/// `autosave`: an `autosave_interval` for runtime compaction (kills then also land during
/// and between compactions, and each restart reads a compacted file plus live segments).
fn kill_rounds(shards: usize, autosave: Option<u64>) {
    let mut rng = Rng(seed().wrapping_add(shards as u64));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = config(dir.path(), port);
    if let Some(a) = autosave {
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!("autosave_interval {a}\n"));
        std::fs::write(&conf, text).unwrap();
    }
    let mut m = start(&conf, shards, port);
    // The persistent subscriber, then offline.
    {
        let (s, mut sc) = client("persist-sub", port, false);
        s.subscribe("load/#", QoS::AtLeastOnce).unwrap();
        s.subscribe("exact/#", QoS::ExactlyOnce).unwrap();
        wait_for(&mut sc, |p| matches!(p, Packet::SubAck(_)));
        wait_for(&mut sc, |p| matches!(p, Packet::SubAck(_)));
        s.disconnect().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match sc.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) => break,
                _ => {}
            }
        }
    }
    let mut exact_done: HashSet<String> = HashSet::new();
    let mut total_acked = 0;
    for round in 0..ROUNDS {
        // Anywhere from the first acknowledgement to the last.
        let kill_after = 1 + (rng.next() % (MESSAGES as u64 + 1)) as usize;
        let acked = publish_and_kill(port, round, kill_after, &mut m);
        total_acked += acked.qos1.len() + acked.qos2.len();
        eprintln!(
            "{shards} shards, round {round}: killed after {kill_after} acknowledgements \
             ({} PUBACKed, {} PUBRECed by then)",
            acked.qos1.len(),
            acked.qos2.len()
        );
        m = start(&conf, shards, port);

        // Retained, from a fresh client.
        if acked.retained {
            let (r, mut rc) = client(&format!("persist-ret-{round}"), port, true);
            r.subscribe("persist/ret", QoS::AtLeastOnce).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut got = None;
            while got.is_none() && Instant::now() < deadline {
                if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                    rc.recv_timeout(Duration::from_millis(100))
                {
                    got = Some(String::from_utf8_lossy(&p.payload).to_string());
                }
            }
            assert_eq!(
                got.as_deref(),
                Some(format!("ret-{round}").as_str()),
                "{shards} shards, round {round}: retained message lost"
            );
        }

        // The subscriber: session present, subscriptions kept, every acknowledged message.
        // It leaves only when quiet and with no QoS 2 exchange half-done: rumqttc forgets its
        // incoming QoS 2 packet ids on every reconnect and treats the PUBREL a broker must
        // re-send for one as a protocol error.
        let (s, mut sc) = client("persist-sub", port, false);
        let mut missing1 = acked.qos1.clone();
        let mut missing2 = acked.qos2.clone();
        let mut present = None;
        // QoS 2 deliveries received and not yet completed (pkid → body).
        let mut open2: HashMap<u16, String> = HashMap::new();
        let mut last_publish = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let done = present.is_some() && missing1.is_empty() && missing2.is_empty();
            if done && open2.is_empty() && last_publish.elapsed() > Duration::from_millis(300) {
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            match sc.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => present = Some(a.session_present),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    last_publish = Instant::now();
                    let body = String::from_utf8_lossy(&p.payload).to_string();
                    if p.qos == QoS::ExactlyOnce {
                        // Delivered again after its exchange completed: twice.
                        assert!(
                            !exact_done.contains(&body),
                            "{shards} shards, round {round}: QoS 2 message {body} delivered twice"
                        );
                        open2.insert(p.pkid, body.clone());
                        missing2.remove(&body);
                    } else {
                        missing1.remove(&body);
                    }
                }
                Ok(Ok(Event::Outgoing(Outgoing::PubComp(pkid)))) => {
                    if let Some(body) = open2.remove(&pkid) {
                        exact_done.insert(body);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!(
                    "{shards} shards, round {round}: subscriber: {e:?}\n{}",
                    m.lines().join("\n")
                ),
                Err(_) => {}
            }
        }
        assert_eq!(present, Some(true), "{shards} shards, round {round}");
        assert!(
            missing1.is_empty() && missing2.is_empty(),
            "{shards} shards, round {round} (kill after {kill_after}): {} of {} PUBACKed and \
             {} of {} PUBRECed messages lost, e.g. {:?}\n{}",
            missing1.len(),
            acked.qos1.len(),
            missing2.len(),
            acked.qos2.len(),
            missing1
                .iter()
                .chain(missing2.iter())
                .take(5)
                .collect::<Vec<_>>(),
            m.lines().join("\n")
        );
        assert!(
            open2.is_empty(),
            "{shards} shards, round {round}: QoS 2 left open"
        );
        s.disconnect().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match sc.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) => break,
                _ => {}
            }
        }
        drop(sc);
        // Stopped (SIGTERM: what was recorded is flushed first), not killed: a kill here could
        // lose the record of the subscriber's last PUBCOMPs, and the broker would rightly
        // re-send their PUBRELs, which rumqttc (whose state died with the old client object)
        // rejects as unsolicited. The kills under test are the ones mid-publish.
        m.sigterm();
        assert_eq!(
            m.wait_exit(Duration::from_secs(15)).and_then(|s| s.code()),
            Some(0)
        );
        wait_port_free(port);
        m = start(&conf, shards, port);
    }
    assert!(total_acked > 0);
    m.sigterm();
    assert!(m.wait_exit(Duration::from_secs(15)).is_some());
}

#[test]
fn kill9_loses_nothing_acknowledged_one_shard() {
    kill_rounds(1, None);
}

#[test]
fn kill9_loses_nothing_acknowledged_two_shards_compacting_every_second() {
    kill_rounds(2, Some(1));
}

/// Publish `n` QoS 1 messages to an offline persistent session and wait for every PUBACK.
fn fill(port: u16, n: usize) {
    let (s, mut sc) = client("torn-sub", port, false);
    s.subscribe("torn/#", QoS::AtLeastOnce).unwrap();
    wait_for(&mut sc, |p| matches!(p, Packet::SubAck(_)));
    drop(s);
    drop(sc);
    let (c, mut conn) = client("torn-pub", port, true);
    let t = std::thread::spawn(move || {
        for i in 0..n {
            c.publish("torn/x", QoS::AtLeastOnce, false, format!("{i}"))
                .unwrap();
        }
        c
    });
    let mut acks = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acks < n && Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Packet::PubAck(_)))) =
            conn.recv_timeout(Duration::from_millis(100))
        {
            acks += 1;
        }
    }
    assert_eq!(acks, n);
    let _ = t.join();
}

/// The one segment shard 0 wrote in the current generation.
fn segment(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data").join("midge.db");
    let cur = std::fs::read_to_string(data.join("CURRENT")).unwrap();
    let g = cur.trim().strip_prefix("gen ").unwrap().to_string();
    data.join(format!("gen-{g}"))
        .join("shard-0")
        .join("00000001.log")
}

/// The end of the last intact frame (frames: len u32, crc u32, then len bytes).
fn frames_end(buf: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut at = 0;
    while at + 8 <= buf.len() {
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 || at + 8 + len > buf.len() {
            break;
        }
        at += 8 + len;
        ends.push(at);
    }
    ends
}

#[test]
fn torn_last_record_recovers_and_flipped_byte_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = config(dir.path(), port);
    let mut m = start(&conf, 1, port);
    fill(port, 300);
    kill9(&mut m, port);
    let seg = segment(dir.path());
    let buf = std::fs::read(&seg).unwrap();
    let ends = frames_end(&buf);
    assert!(ends.len() > 50, "{} frames", ends.len());

    // Torn: the file ends mid-way through its last record.
    let last = ends[ends.len() - 1];
    let prev = ends[ends.len() - 2];
    std::fs::write(&seg, &buf[..prev + (last - prev) / 2]).unwrap();
    let mut m = start(&conf, 1, port);
    let torn = m.wait_log(Duration::from_secs(5), |l| l.contains("torn tail"));
    assert!(torn.is_some(), "{}", m.lines().join("\n"));
    // All but (at most) the torn last message arrive.
    let (_s, mut sc) = client("torn-sub", port, false);
    let got = common::v311::recv_publishes(&mut sc, 299, Duration::from_secs(10));
    assert!(got.len() >= 299, "{} of 299 after a torn tail", got.len());
    drop(sc);
    kill9(&mut m, port);

    // Corrupt: a byte flipped in the middle of a log with later batches.
    let mut m = start(&conf, 1, port);
    fill(port, 300);
    kill9(&mut m, port);
    let seg = segment(dir.path());
    let mut buf = std::fs::read(&seg).unwrap();
    let ends = frames_end(&buf);
    let mid = ends[ends.len() / 2] + 20;
    buf[mid] ^= 0x55;
    std::fs::write(&seg, &buf).unwrap();
    let mut m = Midge::spawn(
        &["-c", conf.to_str().unwrap(), "--shards", "1"],
        Some("info"),
    );
    let st = m
        .wait_exit(Duration::from_secs(10))
        .expect("refuses to start");
    assert!(!st.success());
    let lines = m.lines().join("\n");
    assert!(
        lines.contains(&seg.display().to_string()) && lines.contains("corrupt at offset"),
        "{lines}"
    );
}

/// A changed shard count: sessions recorded on 2 shards come back on 1 and on 2 again, with
/// their queues (`persistence_sync batch` here: the same promise as `always`).
#[test]
fn changed_shard_count_rehomes_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = config(dir.path(), port);
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("persistence_sync batch\n");
    std::fs::write(&conf, text).unwrap();
    let ids: Vec<String> = (0..8).map(|i| format!("rehome-{i}")).collect();
    let mut m = start(&conf, 2, port);
    for id in &ids {
        let (s, mut sc) = client(id, port, false);
        s.subscribe(format!("rehome/{id}"), QoS::AtLeastOnce)
            .unwrap();
        wait_for(&mut sc, |p| matches!(p, Packet::SubAck(_)));
    }
    for (phase, shards) in [1usize, 2, 1].into_iter().enumerate() {
        // Every session gets 20 messages while offline; all PUBACKed.
        let (c, mut conn) = client(&format!("rehome-pub-{phase}"), port, true);
        let n = ids.len() * 20;
        let topics: Vec<String> = ids.iter().map(|id| format!("rehome/{id}")).collect();
        let t = std::thread::spawn(move || {
            for i in 0..20 {
                for topic in &topics {
                    c.publish(
                        topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        format!("{phase}:{i}"),
                    )
                    .unwrap();
                }
            }
            c
        });
        let mut acks = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while acks < n && Instant::now() < deadline {
            if let Ok(Ok(Event::Incoming(Packet::PubAck(_)))) =
                conn.recv_timeout(Duration::from_millis(100))
            {
                acks += 1;
            }
        }
        assert_eq!(acks, n, "phase {phase}");
        let _ = t.join();
        kill9(&mut m, port);
        m = start(&conf, shards, port);
        for id in &ids {
            let (_s, mut sc) = client(id, port, false);
            // Earlier phases' messages may come again (QoS 1: the PUBACK of the last one
            // may not have left before the client went); this phase's must all come.
            let mut bodies = HashSet::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while bodies.len() < 20 && Instant::now() < deadline {
                if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                    sc.recv_timeout(Duration::from_millis(100))
                {
                    let b = String::from_utf8_lossy(&p.payload).to_string();
                    if b.starts_with(&format!("{phase}:")) {
                        bodies.insert(b);
                    }
                }
            }
            assert_eq!(
                bodies.len(),
                20,
                "{id} after moving to {shards} shards: {bodies:?}"
            );
        }
    }
    m.sigterm();
    assert!(m.wait_exit(Duration::from_secs(15)).is_some());
}

/// mosquitto's `persistence_file mosquitto.db` names a file; Midge keeps a directory there
/// and says so instead of failing with a bare "File exists".
#[test]
fn a_mosquitto_database_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("mosquitto.db"), b"mosquitto's format").unwrap();
    let conf = dir.path().join("m.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\npersistence true\npersistence_location {}\n\
             persistence_file mosquitto.db\n",
            data.display()
        ),
    )
    .unwrap();
    let mut m = Midge::spawn(&["-c", conf.to_str().unwrap(), "--shards", "1"], None);
    let st = m
        .wait_exit(Duration::from_secs(10))
        .expect("refuses to start");
    assert!(!st.success());
    let lines = m.lines().join("\n");
    assert!(
        lines.contains("mosquitto.db") && lines.contains("set persistence_file to another name"),
        "{lines}"
    );
}

/// A `mosquitto_sub -V 5` device with a will (delay 2 s) on a persistent session; its
/// stdout (`-d`: protocol lines) is read to know when it is subscribed.
fn will_device(port: u16, id: &str) -> std::process::Child {
    use std::io::BufRead;
    // stdbuf: mosquitto_sub's stdout is block-buffered into a pipe.
    let mut child = std::process::Command::new("stdbuf")
        .args([
            "-oL",
            "mosquitto_sub",
            "-V",
            "5",
            "-d",
            "-p",
            &port.to_string(),
            "-h",
            "127.0.0.1",
        ])
        .args([
            "-i",
            id,
            "-c",
            "-x",
            "600",
            "-q",
            "1",
            "-t",
            &format!("cmd/{id}"),
        ])
        .args(["--will-topic", &format!("wills/{id}"), "--will-payload"])
        .arg(format!("{id} lost"))
        .args(["--will-qos", "1", "-D", "will", "will-delay-interval", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto_sub (scripts/test.sh installs mosquitto-clients)");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("received SUBACK") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{id} was not subscribed within 10 s"));
    child
}

/// A will with a delay outlives a crash (issue 11): the device was connected when the
/// broker was killed, so after the restart its will is published once the delay has run
/// out. A device that disconnected normally before the crash has no will left to publish.
#[test]
fn a_delayed_will_is_published_after_a_kill9_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = config(dir.path(), port);
    let mut m = start(&conf, 2, port);
    let (w, mut wc) = client("will-watcher", port, false);
    w.subscribe("wills/#", QoS::AtLeastOnce).unwrap();
    wait_for(&mut wc, |p| matches!(p, Packet::SubAck(_)));

    // mosquitto_pub publishes and leaves with DISCONNECT 0x00, which discards its will.
    // (mosquitto_sub stopped by a signal would send 0x04: "publish my will".)
    let st = std::process::Command::new("mosquitto_pub")
        .args([
            "-V",
            "5",
            "-p",
            &port.to_string(),
            "-h",
            "127.0.0.1",
            "-i",
            "dev-polite",
        ])
        .args([
            "-c",
            "-x",
            "600",
            "-q",
            "1",
            "-t",
            "hello/dev-polite",
            "-m",
            "hi",
        ])
        .args([
            "--will-topic",
            "wills/dev-polite",
            "--will-payload",
            "dev-polite lost",
        ])
        .args(["--will-qos", "1", "-D", "will", "will-delay-interval", "2"])
        .status()
        .unwrap();
    assert!(st.success());
    let mut lost = will_device(port, "dev-lost");

    kill9(&mut m, port);
    // The device must not reconnect (that would cancel its will): it dies with the broker.
    let _ = lost.kill();
    let _ = lost.wait();
    drop(w);
    drop(wc);
    m = start(&conf, 2, port);

    let (_w, mut wc) = client("will-watcher", port, false);
    let mut wills = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut until = deadline;
    while Instant::now() < until {
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            wc.recv_timeout(Duration::from_millis(100))
        {
            wills.push(String::from_utf8_lossy(&p.payload).to_string());
            // Anything else due would have been due by now: a second more to see it.
            until = until.min(Instant::now() + Duration::from_secs(1));
        }
    }
    let log = m.lines().join("\n");
    assert_eq!(wills, ["dev-lost lost"], "broker log:\n{log}");
    m.sigterm();
    assert!(m.wait_exit(Duration::from_secs(15)).is_some());
}

fn dir_bytes(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let m = e.metadata().unwrap();
            n += if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            };
        }
    }
    n
}

/// Segment files of the current generation, as "shard-K/0000000S.log".
fn segments_now(data: &Path) -> Vec<String> {
    let cur = std::fs::read_to_string(data.join("CURRENT")).unwrap();
    let gen = data.join(format!("gen-{}", cur.trim().strip_prefix("gen ").unwrap()));
    let mut v = Vec::new();
    for e in std::fs::read_dir(&gen).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("shard-") {
            for s in std::fs::read_dir(e.path()).unwrap().flatten() {
                v.push(format!("{name}/{}", s.file_name().to_string_lossy()));
            }
        }
    }
    v.sort();
    v
}

/// Runtime compaction (`autosave_interval 1`): while QoS 1 messages queue for an offline
/// session and a retained message is overwritten thousands of times, the log is compacted
/// every second: the sealed segments go, the directory stays near the size of what is still
/// needed, and after kill -9 every PUBACKed message still arrives.
#[test]
fn runtime_compaction_bounds_the_log_and_loses_nothing() {
    const ROUNDS: usize = 4;
    const KEPT: usize = 150;
    const OVERWRITES: usize = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = config(dir.path(), port);
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("autosave_interval 1\n");
    std::fs::write(&conf, text).unwrap();
    let data = dir.path().join("data").join("midge.db");
    let mut m = start(&conf, 2, port);
    let (s, mut sc) = client("comp-sub", port, false);
    s.subscribe("comp/keep", QoS::AtLeastOnce).unwrap();
    wait_for(&mut sc, |p| matches!(p, Packet::SubAck(_)));
    drop(s);
    drop(sc);
    let compactions = |m: &Midge| {
        m.lines()
            .iter()
            .filter(|l| l.contains("persistence: compacted"))
            .count()
    };
    let big = "r".repeat(1024);
    let mut written = 0u64;
    for round in 0..ROUNDS {
        let (c, mut conn) = client(&format!("comp-pub-{round}"), port, true);
        let big = big.clone();
        let t = std::thread::spawn(move || {
            for i in 0..OVERWRITES {
                c.publish(
                    "comp/ret",
                    QoS::AtLeastOnce,
                    true,
                    format!("{round}:{i}:{big}"),
                )
                .unwrap();
                if i % (OVERWRITES / KEPT) == 0 && i / (OVERWRITES / KEPT) < KEPT {
                    c.publish("comp/keep", QoS::AtLeastOnce, false, format!("{round}:{i}"))
                        .unwrap();
                }
            }
            c
        });
        let n = OVERWRITES + KEPT;
        let mut acks = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while acks < n && Instant::now() < deadline {
            if let Ok(Ok(Event::Incoming(Packet::PubAck(_)))) =
                conn.recv_timeout(Duration::from_millis(100))
            {
                acks += 1;
            }
        }
        assert_eq!(acks, n, "round {round}");
        let _ = t.join();
        written += (OVERWRITES * 1024) as u64;
        // A compaction after this round's messages (the cadence is 1 s; allow a busy box).
        let before = compactions(&m);
        let deadline = Instant::now() + Duration::from_secs(20);
        while compactions(&m) <= before {
            assert!(
                Instant::now() < deadline,
                "no compaction in 20 s:\n{}",
                m.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Everything written is sealed and folded within a few cadences: the first segments are
    // gone and the directory holds about what is still needed (600 small queued messages and
    // one retained message), far less than the 4 MiB of retained overwrites written.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let segs = segments_now(&data);
        let bytes = dir_bytes(&data);
        if !segs.iter().any(|s| s.ends_with("/00000001.log")) && bytes < written / 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "log not bounded: {bytes} bytes of {written} written, segments {segs:?}\n{}",
            m.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(compactions(&m) >= ROUNDS);
    kill9(&mut m, port);
    m = start(&conf, 2, port);
    let (_s, mut sc) = client("comp-sub", port, false);
    let mut bodies = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while bodies.len() < ROUNDS * KEPT && Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            sc.recv_timeout(Duration::from_millis(100))
        {
            bodies.insert(String::from_utf8_lossy(&p.payload).to_string());
        }
    }
    assert_eq!(bodies.len(), ROUNDS * KEPT, "after kill -9");
    // The retained message is the last one written.
    let (r, mut rc) = client("comp-ret", port, true);
    r.subscribe("comp/ret", QoS::AtLeastOnce).unwrap();
    let p = wait_for(&mut rc, |p| matches!(p, Packet::Publish(_)));
    let Packet::Publish(p) = p else {
        unreachable!()
    };
    assert!(
        p.payload
            .starts_with(format!("{}:{}:", ROUNDS - 1, OVERWRITES - 1).as_bytes()),
        "retained: {:?}",
        String::from_utf8_lossy(&p.payload[..20])
    );
    m.sigterm();
    assert!(m.wait_exit(Duration::from_secs(15)).is_some());
}
