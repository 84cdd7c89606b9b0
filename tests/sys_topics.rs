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
