//! `$SYS/broker/...` topics, as mosquitto users read them (with mosquitto_sub, a client we
//! did not write).
mod common;

use std::process::Command;
use std::time::Duration;

use common::TestBroker;

fn sub(port: u16, filter: &str, count: usize) -> String {
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            filter,
            "-v",
        ])
        .args(["-C", &count.to_string(), "-W", "5"])
        .output()
        .expect("mosquitto_sub runs (scripts/test.sh installs mosquitto-clients)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sys_topics_are_published_and_retained() {
    let b = TestBroker::start_with(2, |c| c.sys_interval = Some(Duration::from_millis(200)));
    std::thread::sleep(Duration::from_millis(600));
    let version = sub(b.port(), "$SYS/broker/version", 1);
    assert!(
        version.starts_with("$SYS/broker/version midge version"),
        "{version}"
    );
    // This subscriber itself is connected while it reads the (retained) count.
    let connected = sub(b.port(), "$SYS/broker/clients/connected", 1);
    let n: usize = connected
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a count: {connected:?}"));
    assert!(n <= 1, "{connected}");
    let per_shard = sub(b.port(), "$SYS/broker/shard/+/messages/received", 2);
    assert_eq!(per_shard.lines().count(), 2, "{per_shard}");
}

#[test]
fn a_hash_subscription_does_not_see_sys_topics() {
    // [MQTT-4.7.2-1]: wildcards at the first level do not match topics starting with '$'.
    let b = TestBroker::start_with(1, |c| c.sys_interval = Some(Duration::from_millis(100)));
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &b.port().to_string(),
            "-t",
            "#",
            "-v",
        ])
        .args(["-W", "1"])
        .output()
        .expect("mosquitto_sub runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("$SYS"), "{text}");
}

/// The topic of a PUBLISH body.
fn topic_of(p: &common::raw::Pkt) -> String {
    let n = u16::from_be_bytes([p.body[0], p.body[1]]) as usize;
    String::from_utf8_lossy(&p.body[2..2 + n]).into_owned()
}

/// Client PUBLISHes under `$SYS` are refused as mosquitto refuses them: v5 QoS 1/2 get
/// PUBACK/PUBREC 0x87 (not authorized), 3.1.1 a plain acknowledgement; nothing is routed or
/// retained. Checked against `addr` (Midge, or mosquitto itself).
fn sys_writes_are_refused(addr: std::net::SocketAddr) {
    use common::raw::{self, Raw, V311, V5};
    use common::WAIT;
    let mut sub = raw::client(addr, V5, "sysw-sub");
    sub.send(&raw::subscribe(
        V5,
        1,
        &[("$SYS/broker/forged/#", 1), ("ctl/#", 1)],
    ));
    assert_eq!(sub.expect("SUBACK", WAIT).kind(), 9);

    let mut v5 = raw::client(addr, V5, "sysw-v5");
    let mut p = raw::publish(V5, "$SYS/broker/forged/a", b"x", 1, 1);
    p[0] |= 0x01; // retain
    v5.send(&p);
    let ack = v5.expect("PUBACK", WAIT);
    assert_eq!(
        (ack.kind(), &ack.body[..2], ack.body.get(2)),
        (4, &[0, 1][..], Some(&0x87)),
        "PUBACK 0x87 (not authorized): {ack:?}"
    );
    v5.send(&raw::publish(V5, "$SYS/broker/forged/b", b"x", 2, 2));
    let rec = v5.expect("PUBREC", WAIT);
    assert_eq!(
        (rec.kind(), &rec.body[..2], rec.body.get(2)),
        (5, &[0, 2][..], Some(&0x87)),
        "PUBREC 0x87 (not authorized): {rec:?}"
    );
    v5.send(&raw::publish(V5, "ctl/v5", b"done", 1, 3));
    assert_eq!(v5.expect("PUBACK", WAIT).body[..2], [0, 3]);

    let mut v3 = Raw::open(addr);
    v3.handshake(&raw::connect(V311, "sysw-v3", 30, true));
    let mut p = raw::publish(V311, "$SYS/broker/forged/c", b"x", 1, 4);
    p[0] |= 0x01;
    v3.send(&p);
    let ack = v3.expect("PUBACK", WAIT);
    assert_eq!((ack.kind(), &ack.body[..]), (4, &[0, 4][..]), "{ack:?}");
    v3.send(&raw::publish(V311, "$SYS/broker/forged/d", b"x", 0, 0));
    v3.send(&raw::publish(V311, "ctl/v3", b"done", 1, 5));
    assert_eq!(v3.expect("PUBACK", WAIT).body[..], [0, 5]);

    // Only the two control messages arrive (each after its publisher's refused ones).
    let mut topics = Vec::new();
    while topics.len() < 2 {
        let p = sub.expect("the control messages", WAIT);
        assert_eq!(p.kind(), 3, "{p:?}");
        topics.push(topic_of(&p));
        let pid = {
            let n = 2 + topics.last().unwrap().len();
            [p.body[n], p.body[n + 1]]
        };
        sub.send(&[0x40, 0x02, pid[0], pid[1]]);
    }
    topics.sort();
    assert_eq!(topics, ["ctl/v3", "ctl/v5"]);

    // Nothing was retained: a new subscriber gets its SUBACK and then only its PINGRESP.
    let mut late = raw::client(addr, V311, "sysw-late");
    late.send(&raw::subscribe(V311, 1, &[("$SYS/broker/forged/#", 1)]));
    assert_eq!(late.expect("SUBACK", WAIT).kind(), 9);
    late.send(&[0xC0, 0x00]);
    let p = late.expect("PINGRESP", WAIT);
    assert_eq!(p.kind(), 13, "a retained forged message arrived: {p:?}");
}

#[test]
fn clients_cannot_write_sys_topics() {
    let b = TestBroker::start_with(2, |c| c.sys_interval = None);
    sys_writes_are_refused(b.addr);
}

/// The same script against mosquitto 2.0 itself: what the test above expects is what
/// mosquitto does.
#[test]
fn mosquitto_refuses_sys_writes_the_same_way() {
    use common::bin::{config_file, free_port};
    let port = free_port();
    let (_dir, conf) = config_file(&format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\n"
    ));
    let mut child = Command::new("/usr/sbin/mosquitto")
        .args(["-c", conf.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("/usr/sbin/mosquitto runs (scripts/test.sh installs mosquitto)");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "mosquitto not listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = std::panic::catch_unwind(|| sys_writes_are_refused(addr));
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}
