//! What a SUBSCRIBE may not ask for is refused in its SUBACK, never granted and then silently
//! not routed: filters deeper than routing holds, and subscriptions beyond
//! `max_subscriptions_per_client`. One log line per refusing SUBSCRIBE, whatever it holds.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::bin::{config_file, free_port, Midge};
use common::raw::{self, V311, V5};
use common::WAIT;

/// A filter of `levels` levels.
fn deep(levels: usize) -> String {
    vec!["d"; levels].join("/")
}

fn suback_codes(p: &raw::Pkt, version: u8) -> Vec<u8> {
    assert_eq!(p.kind(), 9, "expected SUBACK, got {p:?}");
    // v5: packet id, property length 0, codes; 3.1.1: packet id, codes.
    p.body[if version == V5 { 3 } else { 2 }..].to_vec()
}

#[test]
fn filters_deeper_than_routing_holds_are_refused_in_the_suback() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut m = Midge::spawn(&["-p", &port.to_string(), "--shards", "2"], Some("info"));
    m.wait_listening(addr);
    let too_deep = deep(202); // routing holds 201 levels, as mosquitto's 200 '/'
    let deepest_ok = deep(201);
    for (version, refused) in [(V5, 0x8F), (V311, 0x80)] {
        let mut c = raw::client(addr, version, &format!("deep-{version}"));
        c.send(&raw::subscribe(
            version,
            7,
            &[
                (&too_deep, 1),
                ("ok/a", 1),
                (&format!("{too_deep}/x"), 0),
                (&deepest_ok, 1),
                (&format!("+/{too_deep}"), 1),
            ],
        ));
        let codes = suback_codes(&c.expect("SUBACK", WAIT), version);
        assert_eq!(
            codes,
            [refused, 1, refused, 1, refused],
            "version {version}"
        );
        // What was granted is routed.
        c.send(&raw::publish(version, "ok/a", b"routed", 1, 8));
        let mut got_msg = false;
        let mut got_ack = false;
        while !(got_msg && got_ack) {
            let p = c.expect("PUBACK and PUBLISH", WAIT);
            match p.kind() {
                3 => got_msg = true,
                4 => got_ack = true,
                _ => panic!("{p:?}"),
            }
        }
    }
    // One line per refusing SUBSCRIBE packet, not one per filter.
    m.wait_log(WAIT, |l| l.contains("SUBSCRIBE from deep-4"))
        .expect("a log line for the 3.1.1 client's SUBSCRIBE");
    let lines: Vec<String> = m
        .lines()
        .into_iter()
        .filter(|l| l.contains("refused") && l.contains("SUBSCRIBE"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines.iter().all(|l| l.contains("3 filter(s) refused")),
        "{lines:#?}"
    );
}

#[test]
fn subscriptions_beyond_max_subscriptions_per_client_are_refused() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (_dir, conf) = config_file(&format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nmax_subscriptions_per_client 3\n"
    ));
    let mut m = Midge::with_config(&conf, Some("info"));
    m.wait_listening(addr);
    for (version, refused) in [(V5, 0x97), (V311, 0x80)] {
        let mut c = raw::client(addr, version, &format!("many-{version}"));
        c.send(&raw::subscribe(version, 1, &[("a", 1), ("b", 1)]));
        assert_eq!(suback_codes(&c.expect("SUBACK", WAIT), version), [1, 1]);
        // Replacing "a" is not a new subscription; "c" is the third; "d" and "e" are over.
        c.send(&raw::subscribe(
            version,
            2,
            &[("a", 0), ("c", 1), ("d", 1), ("e", 1)],
        ));
        let codes = suback_codes(&c.expect("SUBACK", WAIT), version);
        assert_eq!(codes, [0, 1, refused, refused], "version {version}");
        // After an UNSUBSCRIBE there is room again.
        let mut unsub = vec![0x00, 0x03];
        if version == V5 {
            unsub.push(0);
        }
        unsub.extend_from_slice(&[0x00, 0x01, b'b']);
        c.send(&raw::packet(0xA2, &unsub));
        assert_eq!(c.expect("UNSUBACK", WAIT).kind(), 11);
        c.send(&raw::subscribe(version, 4, &[("d", 1), ("e", 1)]));
        assert_eq!(
            suback_codes(&c.expect("SUBACK", WAIT), version),
            [1, refused],
            "version {version}"
        );
        // A refused filter is not routed.
        c.send(&raw::publish(version, "e", b"no", 1, 5));
        assert_eq!(c.expect("PUBACK", WAIT).kind(), 4);
        c.send(&[0xC0, 0x00]);
        let p = c.expect("PINGRESP", WAIT);
        assert_eq!(p.kind(), 13, "a refused subscription got a message: {p:?}");
    }
    let line = m
        .wait_log(Duration::from_secs(2), |l| {
            l.contains("max_subscriptions_per_client 3")
        })
        .expect("the refusal is logged");
    assert!(line.contains("many-"), "{line}");
}
