//! Unit tests of the shard core: a few cores wired by hand, every message delivered by the
//! test in the order the case needs, so each race is reproduced on purpose (the simulator
//! explores orders at random; these pin the ones that once lost data).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;

use super::*;
use crate::codec::{
    Connect, ConnectProperties, Packet, ProtocolVersion, PubResp, Publish, QoS, Subscribe,
    SubscriptionOptions, TopicFilter, TopicName,
};
use crate::metrics::DropCause;

struct Net {
    cores: Vec<ShardCore>,
    /// [from][to]
    mail: Vec<Vec<VecDeque<PeerMsg>>>,
    now: Instant,
}

impl Net {
    fn new(shards: usize, tweak: impl Fn(&mut CoreConfig)) -> Net {
        let mut cfg = CoreConfig {
            shards,
            ..CoreConfig::default()
        };
        tweak(&mut cfg);
        Net {
            cores: (0..shards)
                .map(|i| ShardCore::new(i, cfg.clone(), Arc::new(ShardCounters::default())))
                .collect(),
            mail: (0..shards)
                .map(|_| (0..shards).map(|_| VecDeque::new()).collect())
                .collect(),
            now: Instant::now(),
        }
    }

    /// Move every core's peer output into the mailboxes.
    fn collect(&mut self) {
        for s in 0..self.cores.len() {
            for p in 0..self.cores.len() {
                while let Some(m) = self.cores[s].poll_peer(p, self.now) {
                    self.mail[s][p].push_back(m);
                }
            }
        }
    }

    /// Deliver one message from `from` to `to`; false if none was waiting.
    fn step(&mut self, from: usize, to: usize) -> bool {
        self.collect();
        let Some(m) = self.mail[from][to].pop_front() else {
            return false;
        };
        self.cores[to].handle_peer(from, m, self.now);
        self.collect();
        true
    }

    /// Deliver everything, in a fixed round-robin order, until nothing moves.
    fn settle(&mut self) {
        loop {
            self.collect();
            let mut moved = false;
            for f in 0..self.cores.len() {
                for t in 0..self.cores.len() {
                    while self.step(f, t) {
                        moved = true;
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn connect(&mut self, shard: usize, id: &str, clean: bool) -> ConnKey {
        let key = self.cores[shard].next_conn_key();
        let connect = Connect {
            protocol: ProtocolVersion::V5,
            clean_start: clean,
            keep_alive: 60,
            client_id: ByteString::from(id),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: Some(if clean { 0 } else { u32::MAX }),
                ..ConnectProperties::default()
            },
        };
        let req = ConnectRequest {
            client_id: ByteString::from(id),
            connect: Box::new(connect),
            config: self.cores[shard].cfg.session,
            username: None,
            peer: None,
            auth: None,
        };
        self.cores[shard].handle_connect(key, req, self.now);
        key
    }

    fn send(&mut self, key: ConnKey, p: Packet) {
        let s = conn_shard(key);
        self.cores[s].handle_packet(key, p, self.now);
    }

    fn out(&mut self, key: ConnKey) -> Vec<Packet> {
        let s = conn_shard(key);
        let mut v = Vec::new();
        while let Some(p) = self.cores[s].poll_transmit(key, self.now) {
            v.push(p);
        }
        v
    }

    fn close(&mut self, key: ConnKey) {
        let s = conn_shard(key);
        self.cores[s].handle_conn_closed(key, self.now);
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
        for c in &mut self.cores {
            c.handle_tick(self.now);
        }
    }
}

fn subscribe(pid: u16, filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: pid,
        filters: vec![(
            TopicFilter::new(filter.to_string()).unwrap(),
            SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
        )],
        properties: Default::default(),
    })
}

fn publish(pid: u16, topic: &str, qos: QoS, body: &'static str) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: TopicName::new(topic.to_string()).unwrap(),
        packet_id: pid,
        payload: Bytes::from_static(body.as_bytes()),
        properties: Default::default(),
    })
}

fn payloads(v: &[Packet]) -> Vec<String> {
    v.iter()
        .filter_map(|p| match p {
            Packet::Publish(pb) => Some(String::from_utf8_lossy(&pb.payload).into_owned()),
            _ => None,
        })
        .collect()
}

fn kinds(v: &[Packet]) -> Vec<u8> {
    v.iter().map(Packet::packet_type).collect()
}

/// The id's home shard in a 2-shard net, and a shard that is not it.
fn homes(id: &str) -> (usize, usize) {
    let h = home_shard(id, 2);
    (h, 1 - h)
}

#[test]
fn a_suback_waits_until_every_shard_applied_the_route() {
    let mut n = Net::new(2, |_| {});
    let sub = n.connect(0, "sub", true);
    n.settle();
    assert_eq!(kinds(&n.out(sub)), [2], "CONNACK");
    n.send(sub, subscribe(1, "t/#", QoS::AtLeastOnce));
    n.collect();
    assert!(
        n.out(sub).is_empty(),
        "SUBACK before shard 1 applied the route"
    );
    assert!(n.step(0, 1), "the route delta");
    assert!(n.out(sub).is_empty(), "SUBACK before the Applied came back");
    assert!(n.step(1, 0), "Applied");
    assert_eq!(kinds(&n.out(sub)), [9], "SUBACK once settled");
}

#[test]
fn a_second_subscriber_waits_for_the_first_ones_route() {
    // The route delta belongs to the first subscriber; the second SUBSCRIBE sends none, yet
    // its SUBACK must wait for it just the same (a simulator seed found this).
    let mut n = Net::new(2, |_| {});
    let a = n.connect(0, "a", true);
    let b = n.connect(0, "b", true);
    n.settle();
    n.out(a);
    n.out(b);
    n.send(a, subscribe(1, "t/#", QoS::AtLeastOnce));
    n.send(b, subscribe(1, "t/#", QoS::AtLeastOnce));
    n.collect();
    assert!(n.out(b).is_empty(), "b's SUBACK before the route settled");
    n.settle();
    assert_eq!(kinds(&n.out(b)), [9]);
}

#[test]
fn back_to_back_reconnects_keep_the_session() {
    // The flapping-link race: a persistent session is offline on one shard; two CONNECTs with
    // its id arrive on the other shard, the second before the first one's hand-over. The
    // Takeover of the first reaches its shard before that shard got its Handover.
    let id = "flappy";
    let (home, other) = homes(id);
    let mut n = Net::new(2, |_| {});
    let old = n.connect(home, id, false);
    n.settle();
    n.out(old);
    n.send(old, subscribe(1, "t", QoS::AtLeastOnce));
    n.settle();
    n.out(old);
    n.close(old);
    let publ = n.connect(home, "publisher", true);
    n.settle();
    for (i, body) in ["m1", "m2", "m3"].into_iter().enumerate() {
        n.send(publ, publish(i as u16 + 1, "t", QoS::AtLeastOnce, body));
    }
    n.settle();
    // Two connects on the other shard; their Registers reach the home shard in order.
    let _first = n.connect(other, id, false);
    let second = n.connect(other, id, false);
    n.collect();
    assert!(n.step(other, home), "Register first");
    assert!(n.step(other, home), "Register second");
    // The home shard's Takeover of the old session (local to it) runs first: the Handover for
    // `first` now waits in the home→other mailbox, and the Takeover of `first` behind it.
    // Deliver in the mailbox's order: Handover(first), then Takeover(first → second).
    n.settle();
    let got = n.out(second);
    assert!(
        matches!(got.first(), Some(Packet::ConnAck(a)) if a.session_present),
        "the second connection resumes the session: {got:?}"
    );
    let mut bodies = payloads(&got);
    // Anything the first connection was sent before being kicked goes again (DUP).
    bodies.dedup();
    assert_eq!(bodies, ["m1", "m2", "m3"]);
}

#[test]
fn a_kicked_registration_passes_the_late_handover_on() {
    // The exact order that lost the session in wave 1: the Takeover of a connection still
    // waiting for its own Handover arrives first.
    let id = "kicked";
    let (home, other) = homes(id);
    let mut n = Net::new(2, |_| {});
    let old = n.connect(other, id, false);
    n.settle();
    n.out(old);
    n.send(old, subscribe(1, "t", QoS::AtLeastOnce));
    n.settle();
    n.out(old);
    n.close(old);
    n.settle();
    // first: on the home shard; second: on the other shard.
    let first = n.connect(home, id, false); // Register is local: handled at once
                                            // home registered `first` and sent Takeover(old → first) to `other`.
    let second = n.connect(other, id, false);
    assert!(n.step(other, home), "Register(second) reaches home");
    // home now sends Takeover(first → second) to itself: `first` is kicked before its
    // Handover (still in other→home, behind nothing: the old host has not run yet).
    n.collect();
    // Now the old host hands `old` over to `first` (arrives after the kick).
    n.settle();
    let got = n.out(second);
    assert!(
        matches!(got.first(), Some(Packet::ConnAck(a)) if a.session_present),
        "the late hand-over reached the newest connection: {got:?}"
    );
    let _ = first;
}

#[test]
fn a_clean_start_gets_nothing_of_the_old_session() {
    let id = "cleaner";
    let (home, other) = homes(id);
    let mut n = Net::new(2, |_| {});
    let old = n.connect(home, id, false);
    n.settle();
    n.out(old);
    n.send(old, subscribe(1, "t", QoS::AtLeastOnce));
    n.settle();
    n.out(old);
    n.close(old);
    let publ = n.connect(other, "p", true);
    n.settle();
    n.send(publ, publish(1, "t", QoS::AtLeastOnce, "old"));
    n.settle();
    let fresh = n.connect(other, id, true);
    n.settle();
    let got = n.out(fresh);
    assert!(matches!(got.first(), Some(Packet::ConnAck(a)) if !a.session_present));
    assert!(
        payloads(&got).is_empty(),
        "old session's messages leaked: {got:?}"
    );
}

#[test]
fn a_full_subscriber_pauses_its_publisher_and_never_drops() {
    let mut n = Net::new(1, |c| {
        c.session.max_queued_messages = 4;
        c.session.max_inflight = 2;
        c.max_deferred_input = 4;
    });
    let sub = n.connect(0, "sub", true);
    let publ = n.connect(0, "pub", true);
    n.settle();
    n.out(sub);
    n.out(publ);
    n.send(sub, subscribe(1, "t", QoS::AtLeastOnce));
    n.out(sub);
    let bodies: Vec<&'static str> = (0..20)
        .map(|i| &*Box::leak(format!("m{i}").into_boxed_str()))
        .collect();
    let mut sent = 0;
    while sent < bodies.len() && !n.cores[0].input_paused(publ) {
        n.send(
            publ,
            publish(sent as u16 + 1, "t", QoS::AtLeastOnce, bodies[sent]),
        );
        sent += 1;
    }
    assert!(sent < bodies.len(), "the publisher was never paused");
    let acks = n.out(publ).len();
    assert!(
        acks < sent,
        "every publish acknowledged while the subscriber is full"
    );
    // The subscriber drains: acknowledge everything it gets until the publisher is done.
    let mut got = Vec::new();
    for _ in 0..200 {
        let out = n.out(sub);
        for p in &out {
            if let Packet::Publish(pb) = p {
                got.push(String::from_utf8_lossy(&pb.payload).into_owned());
                n.send(sub, Packet::PubAck(PubResp::new(pb.packet_id)));
            }
        }
        while sent < bodies.len() && !n.cores[0].input_paused(publ) {
            n.send(
                publ,
                publish(sent as u16 + 1, "t", QoS::AtLeastOnce, bodies[sent]),
            );
            sent += 1;
        }
        n.out(publ);
        if got.len() == bodies.len() {
            break;
        }
    }
    assert_eq!(got, bodies, "every message, in order");
    assert_eq!(n.cores[0].counters.dropped_total(), 0);
    assert!(n.cores[0].counters.pauses.get() >= 1);
}

#[test]
fn a_stuck_subscriber_is_cut_loose_after_the_stall_timeout() {
    let mut n = Net::new(1, |c| {
        c.session.max_queued_messages = 4;
        c.session.max_inflight = 2;
        c.stall_timeout = Duration::from_secs(5);
    });
    let stuck = n.connect(0, "stuck", true);
    let publ = n.connect(0, "pub", true);
    n.settle();
    n.out(stuck);
    n.out(publ);
    n.send(stuck, subscribe(1, "t", QoS::AtLeastOnce));
    n.out(stuck);
    let mut pid = 0u16;
    while !n.cores[0].input_paused(publ) {
        pid += 1;
        n.send(publ, publish(pid, "t", QoS::AtLeastOnce, "x"));
    }
    assert!(n.cores[0].input_paused(publ));
    n.tick(Duration::from_secs(4));
    assert!(
        n.cores[0].input_paused(publ),
        "released before stall_timeout"
    );
    n.tick(Duration::from_secs(2));
    assert!(
        !n.cores[0].input_paused(publ),
        "still paused after stall_timeout"
    );
    assert_eq!(n.cores[0].counters.stalls.get(), 1);
    // From now on its overflow is dropped and counted, and the publisher flows.
    for _ in 0..10 {
        pid += 1;
        n.send(publ, publish(pid, "t", QoS::AtLeastOnce, "y"));
    }
    assert!(n.cores[0].counters.dropped(DropCause::Stalled) >= 10);
    assert!(!n.cores[0].input_paused(publ));
}

#[test]
fn an_idle_connection_costs_one_timer_entry() {
    let mut n = Net::new(1, |_| {});
    let c = n.connect(0, "idle", true);
    n.settle();
    n.out(c);
    // One message first: the session's event queue has been used.
    n.send(
        c,
        publish(1, "fleet/idle/telemetry", QoS::AtLeastOnce, "21.5"),
    );
    n.settle();
    assert_eq!(kinds(&n.out(c)), [4], "PUBACK");
    // Keepalive 60 s: the grace is 90 s. A device that pings every 30 s stays connected, and
    // its pings never add heap entries: the deadline moves forward without touching it.
    for _ in 0..10 {
        n.tick(Duration::from_secs(30));
        n.send(c, Packet::PingReq);
        assert_eq!(kinds(&n.out(c)), [13], "PINGRESP");
        assert!(!n.cores[0].wants_close(c));
        assert!(
            n.cores[0].timer_entries() <= 2,
            "{}",
            n.cores[0].timer_entries()
        );
    }
    // Its timer came due while it pinged: the session's empty queues were given back, and
    // each PINGRESP since took one slot, not four.
    let held = n.cores[0].sessions[&c].session.queue_memory();
    assert!(held <= std::mem::size_of::<Packet>(), "{held} bytes");
    // Silence: closed once the grace has passed, not before.
    n.tick(Duration::from_secs(80));
    assert!(!n.cores[0].wants_close(c));
    n.tick(Duration::from_secs(20));
    assert!(n.cores[0].wants_close(c), "keepalive timeout not enforced");
    assert_eq!(n.cores[0].counters.keepalive_timeouts.get(), 1);
}

#[test]
fn coarse_rounds_up_onto_one_grid() {
    let mut t = super::timers::Timers::default();
    let t0 = Instant::now();
    assert_eq!(t.coarse(t0), t0, "the first deadline is the grid's origin");
    for ms in [1u64, 249, 250, 251, 999, 30_000, 45_123] {
        let d = t0 + Duration::from_millis(ms);
        let c = t.coarse(d);
        assert!(
            c >= d && c - d < super::timers::SESSION_TIMER_GRID,
            "{ms} ms -> {:?}",
            c - t0
        );
        assert_eq!(
            (c - t0).as_nanos() % super::timers::SESSION_TIMER_GRID.as_nanos(),
            0
        );
    }
    let before = t0 - Duration::from_millis(5);
    assert_eq!(t.coarse(before), before);
}

/// 200 devices connecting 3 ms apart have 200 keepalive deadlines spread over 600 ms: the
/// shard's timer wakes for them at a few grid points, not 200 times.
#[test]
fn keepalive_timers_of_many_devices_share_wakeups() {
    let mut n = Net::new(1, |_| {});
    for i in 0..200 {
        n.connect(0, &format!("dev-{i}"), true);
        n.settle();
        n.tick(Duration::from_millis(3));
    }
    let wakeups = n.cores[0].session_timer_wakeups();
    assert!((1..=4).contains(&wakeups), "{wakeups} distinct wake-ups");
}

fn persistent(cfg: &mut CoreConfig) {
    cfg.persist = Some(PersistConfig {
        base: Instant::now(),
        base_ns: 1,
        immediate: false,
        timeout: Duration::from_secs(30),
        max_backlog: DEFAULT_MAX_BACKLOG,
    });
}

impl Net {
    /// The disk confirms everything shard `s` recorded so far.
    fn disk(&mut self, s: usize) {
        let mut b = Vec::new();
        let upto = self.cores[s].take_store_output(&mut b);
        assert!(!b.is_empty() || upto == 0 || !self.cores[s].store_pending());
        self.cores[s].handle_durable(upto, self.now);
    }
}

#[test]
fn acknowledgements_wait_for_the_disk_and_qos0_flows_while_it_fails() {
    let mut n = Net::new(1, persistent);
    let sub = n.connect(0, "sub", false);
    n.settle();
    assert!(
        n.out(sub).is_empty(),
        "CONNACK of a persistent session before its record"
    );
    n.disk(0);
    assert_eq!(kinds(&n.out(sub)), [2]);
    n.send(sub, subscribe(1, "t", QoS::AtLeastOnce));
    n.settle();
    assert!(n.out(sub).is_empty(), "SUBACK before its record");
    n.disk(0);
    assert_eq!(kinds(&n.out(sub)), [9]);

    // A clean, non-persistent publisher records nothing of its own: CONNACK at once.
    let publ = n.connect(0, "pub", true);
    n.settle();
    assert_eq!(kinds(&n.out(publ)), [2]);
    n.send(publ, publish(1, "t", QoS::AtLeastOnce, "a"));
    assert!(
        n.out(publ).is_empty(),
        "PUBACK before the message is durable"
    );
    assert_eq!(payloads(&n.out(sub)), ["a"]);

    // The disk fails: acknowledgements stay held, QoS 0 keeps flowing.
    n.cores[0].handle_store_failed(n.now);
    n.send(publ, publish(0, "t", QoS::AtMostOnce, "z"));
    assert_eq!(payloads(&n.out(sub)), ["z"]);
    n.tick(Duration::from_secs(5));
    assert!(n.out(publ).is_empty());
    // It works again: the PUBACK leaves.
    n.disk(0);
    assert_eq!(kinds(&n.out(publ)), [4]);

    // A disk that never confirms: the publisher is disconnected (0x97), never acknowledged.
    n.send(publ, publish(2, "t", QoS::AtLeastOnce, "b"));
    n.tick(Duration::from_secs(31));
    let out = n.out(publ);
    assert!(!kinds(&out).contains(&4), "{out:?}");
    assert!(
        out.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.reason == crate::codec::ReasonCode::QUOTA_EXCEEDED)),
        "{out:?}"
    );
}

#[test]
fn a_qos2_forward_leaves_only_once_its_record_is_durable() {
    // Subscriber (persistent) on shard 1, publisher on shard 0.
    let mut n = Net::new(2, persistent);
    let sub = n.connect(1, "sub", false);
    n.settle();
    n.disk(0);
    n.disk(1);
    n.settle();
    assert_eq!(kinds(&n.out(sub)), [2]);
    n.send(sub, subscribe(1, "t", QoS::ExactlyOnce));
    n.settle();
    n.disk(1);
    n.settle();
    assert_eq!(kinds(&n.out(sub)), [9]);
    let publ = n.connect(0, "pub", true);
    n.settle();
    n.out(publ);

    // QoS 1 may go ahead of its record (a duplicate after a crash is allowed at QoS 1).
    n.send(publ, publish(1, "t", QoS::AtLeastOnce, "one"));
    n.settle();
    assert_eq!(payloads(&n.out(sub)), ["one"]);

    // QoS 2 waits: a copy delivered before the record is durable could be delivered again
    // after a crash, when the publisher (no PUBREC yet) re-sends it.
    n.send(publ, publish(2, "t", QoS::ExactlyOnce, "two"));
    // And what the same publisher sends after it waits behind it (per-publisher order).
    n.send(publ, publish(0, "t", QoS::AtMostOnce, "three"));
    n.settle();
    n.disk(1);
    n.settle();
    assert!(
        n.out(sub).is_empty(),
        "QoS 2 forward left before its record"
    );
    assert_eq!(
        n.cores[0].peer_backlog(1),
        2,
        "both held on the origin shard"
    );
    assert_eq!(
        n.cores[0].peers_with_output(),
        0,
        "a held queue is not output"
    );
    assert!(n.out(publ).iter().all(|p| !matches!(p, Packet::PubRec(_))));
    n.disk(0);
    n.settle();
    n.disk(1);
    n.settle();
    assert_eq!(payloads(&n.out(sub)), ["two", "three"]);
    assert!(n.out(publ).iter().any(|p| matches!(p, Packet::PubRec(_))));
}

fn bounded_backlog(max: usize) -> impl Fn(&mut CoreConfig) {
    move |cfg: &mut CoreConfig| {
        persistent(cfg);
        if let Some(p) = cfg.persist.as_mut() {
            p.max_backlog = max;
        }
        cfg.max_deferred_input = 4;
    }
}

const BODY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn a_failing_disk_holds_input_at_the_backlog_bound_and_resumes_in_order() {
    let mut n = Net::new(1, bounded_backlog(1024));
    let sub = n.connect(0, "sub", false);
    n.settle();
    n.disk(0);
    n.out(sub);
    n.send(sub, subscribe(1, "t", QoS::AtLeastOnce));
    n.settle();
    n.disk(0);
    assert_eq!(kinds(&n.out(sub)), [9]);
    let publ = n.connect(0, "pub", true);
    let q0 = n.connect(0, "q0", true);
    n.settle();
    n.out(publ);
    n.out(q0);

    // The disk fails: the driver took the first records and keeps retrying them.
    n.cores[0].handle_store_failed(n.now);
    let mut driver = Vec::new();
    let mut pid = 0u16;
    while !n.cores[0].input_paused(publ) {
        pid += 1;
        assert!(pid < 200, "the publisher was never held");
        n.send(publ, publish(pid, "t", QoS::AtLeastOnce, BODY));
        if pid == 3 {
            n.cores[0].take_store_output(&mut driver);
        }
    }
    let c = n.cores[0].counters.clone();
    assert_eq!(c.store_held_inputs.get(), 1, "held once, counted once");
    // Bounded: the bound plus at most one packet's records (and the deferred packets).
    let backlog = n.cores[0].store.backlog_bytes();
    assert!(
        (1024..1024 + 256).contains(&backlog),
        "backlog {backlog} bytes"
    );
    assert!(n.out(publ).is_empty(), "a PUBACK while nothing is durable");
    // Routed before the hold: delivered (held messages are not).
    let before: Vec<String> = payloads(&n.out(sub));
    assert!(!before.is_empty() && before.len() < pid as usize);
    // QoS 0 from a clean client keeps flowing; a clean CONNECT is served; a persistent one
    // is refused with 0x97 instead of waiting on the disk.
    n.send(q0, publish(0, "t", QoS::AtMostOnce, "zero"));
    assert_eq!(payloads(&n.out(sub)), ["zero"]);
    // (A clean CONNECT depends on no record: answered at once, even with the disk full.)
    let clean = n.connect(0, "clean", true);
    n.settle();
    assert!(matches!(n.out(clean).first(), Some(Packet::ConnAck(a)) if a.reason.0 == 0));
    assert!(!n.cores[0].wants_close(clean));
    let pers = n.connect(0, "pers", false);
    n.settle();
    assert!(
        matches!(n.out(pers).first(), Some(Packet::ConnAck(a)) if a.reason == crate::codec::ReasonCode::QUOTA_EXCEEDED)
    );
    assert!(n.cores[0].wants_close(pers));
    assert_eq!(c.refused(crate::metrics::RefuseCause::StoreFull), 1);

    // The disk comes back: the driver's retry succeeds, the held input runs, and every
    // message is acknowledged once durable and delivered in order.
    let upto = n.cores[0].take_store_output(&mut driver);
    n.cores[0].handle_durable(upto, n.now);
    let mut acked = 0;
    let mut got = before;
    for _ in 0..100 {
        n.disk(0);
        acked += kinds(&n.out(publ)).iter().filter(|k| **k == 4).count();
        for p in n.out(sub) {
            if let Packet::Publish(pb) = p {
                got.push(String::from_utf8_lossy(&pb.payload).into_owned());
                n.send(sub, Packet::PubAck(PubResp::new(pb.packet_id)));
            }
        }
        if acked == pid as usize && !n.cores[0].input_paused(publ) {
            break;
        }
    }
    assert_eq!(acked, pid as usize, "every held publish acknowledged");
    assert_eq!(got.iter().filter(|b| *b == BODY).count(), pid as usize);
    assert!(!n.cores[0].store.full);
    n.disk(0); // the subscriber's last acknowledgements
    assert!(
        n.cores[0].is_quiescent().is_ok(),
        "{:?}",
        n.cores[0].is_quiescent()
    );
}

#[test]
fn input_held_for_a_disk_that_never_returns_is_closed_not_acknowledged() {
    let mut n = Net::new(1, bounded_backlog(256));
    let publ = n.connect(0, "pub", true);
    n.settle();
    n.out(publ);
    n.cores[0].handle_store_failed(n.now);
    let mut pid = 0u16;
    while !n.cores[0].input_paused(publ) {
        pid += 1;
        assert!(pid < 200, "the publisher was never held");
        n.send(publ, publish(pid, "t", QoS::AtLeastOnce, BODY));
    }
    n.tick(Duration::from_secs(29));
    assert!(!n.cores[0].wants_close(publ), "closed before the timeout");
    n.tick(Duration::from_secs(2));
    let out = n.out(publ);
    assert!(!kinds(&out).contains(&4), "{out:?}");
    assert!(
        out.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.reason == crate::codec::ReasonCode::QUOTA_EXCEEDED)),
        "{out:?}"
    );
    assert!(n.cores[0].wants_close(publ));
    assert_eq!(n.cores[0].counters.store_held_closes.get(), 1);
    n.close(publ);
    assert!(n.cores[0].store.held.is_empty());
}

#[test]
fn a_connack_that_waited_too_long_for_the_disk_becomes_a_refusal_not_a_disconnect() {
    let mut n = Net::new(1, persistent);
    n.cores[0].handle_store_failed(n.now);
    let c = n.connect(0, "late", false);
    n.settle();
    assert!(n.out(c).is_empty(), "CONNACK before the session's record");
    n.tick(Duration::from_secs(31));
    // Nothing may precede a CONNACK [MQTT-3.2.0-1]: the client is refused with 0x97.
    let out = n.out(c);
    assert!(
        matches!(out.as_slice(), [Packet::ConnAck(a)] if a.reason == crate::codec::ReasonCode::QUOTA_EXCEEDED),
        "{out:?}"
    );
    assert!(n.cores[0].wants_close(c));
}

#[test]
fn a_clean_client_connects_while_the_disk_fails_but_not_past_an_unwritten_end() {
    let mut n = Net::new(2, persistent);
    // A persistent session on shard 1, durable.
    let old = n.connect(1, "dev", false);
    n.settle();
    n.disk(1);
    n.settle();
    assert_eq!(kinds(&n.out(old)), [2]);
    n.cores[1].handle_conn_closed(old, n.now);
    n.settle();
    n.disk(1);

    // The disk stops confirming; records are pending on both shards.
    let other = n.connect(0, "other", false);
    n.settle();
    assert!(n.out(other).is_empty());
    n.cores[0].handle_store_failed(n.now);
    n.cores[1].handle_store_failed(n.now);

    // A clean, non-persistent client with no old session depends on no record.
    let fresh = n.connect(0, "fresh", true);
    n.settle();
    assert_eq!(kinds(&n.out(fresh)), [2], "CONNACK held by others' records");

    // A clean start that ends "dev"'s persistent session (on shard 1): its CONNACK waits
    // for that end to be durable, or a crash would bring the old session back.
    let again = n.connect(0, "dev", true);
    n.settle();
    assert!(
        n.out(again).is_empty(),
        "CONNACK before the old session's end"
    );
    n.disk(0);
    n.settle();
    assert!(
        n.out(again).is_empty(),
        "shard 0's disk is not the one that matters"
    );
    n.disk(1);
    n.settle();
    assert_eq!(kinds(&n.out(again)), [2]);
}
