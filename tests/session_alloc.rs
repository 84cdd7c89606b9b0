//! Heap allocations per message on the session's hot paths, counted with a per-thread
//! counting allocator (own test binary, so the allocator affects nothing else).
//!
//! Why: the publish path runs once per message per subscriber; the design rule is "allocate
//! nothing per message that can be avoided". These tests pin that down for the common case
//! (no v5 properties on the message).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Instant;

use bytes::Bytes;
use midge::codec::{
    Connect, ConnectProperties, Packet, ProtocolVersion, PubResp, Publish, PublishProps, QoS,
    SubscriptionOptions, TopicName,
};
use midge::message::Message;
use midge::session::{DeliveryOutcome, Session, SessionConfig};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

fn session(version: ProtocolVersion) -> Session {
    let connect = Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 60,
        client_id: "dev".into(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    };
    let mut s = Session::accept(
        &SessionConfig::default(),
        &connect,
        "dev".into(),
        None,
        Instant::now(),
    );
    while s.poll_transmit().is_some() {}
    s
}

const N: u64 = 1000;

/// Deliver a QoS 1 message, write its PUBLISH, receive the PUBACK: steady state.
fn outbound_qos1_cycle(version: ProtocolVersion, sub_ids: &[u32]) -> u64 {
    let mut s = session(version);
    let msg = Message {
        topic: TopicName::new("fleet/dev/cmd").unwrap(),
        payload: Bytes::from_static(b"reboot"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: None,
        expires_at: None,
        origin: "ops".into(),
        sid: 0,
    };
    let opts = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..SubscriptionOptions::default()
    };
    let now = Instant::now();
    let cycle = |s: &mut Session| {
        assert_eq!(s.deliver(&msg, opts, sub_ids, now), DeliveryOutcome::Sent);
        let Some(Packet::Publish(p)) = s.poll_transmit() else {
            panic!("expected PUBLISH")
        };
        s.handle_packet(Packet::PubAck(PubResp::new(p.packet_id)), now)
            .unwrap();
        assert!(s.poll_transmit().is_none());
    };
    for _ in 0..50 {
        cycle(&mut s); // warm up queue capacities
    }
    let before = allocs();
    for _ in 0..N {
        cycle(&mut s);
    }
    allocs() - before
}

#[test]
fn outbound_qos1_allocates_nothing_per_message() {
    assert_eq!(outbound_qos1_cycle(ProtocolVersion::V311, &[]), 0);
    assert_eq!(outbound_qos1_cycle(ProtocolVersion::V5, &[]), 0);
}

#[test]
fn outbound_with_subscription_id_allocates_the_property_set_and_one_vec() {
    // The packet model holds subscription identifiers in a Vec, inside the property set that
    // a PUBLISH boxes only when it has properties (so the common PUBLISH, without any, moves
    // as 80 bytes): two allocations per PUBLISH that carries an identifier, none otherwise.
    assert_eq!(outbound_qos1_cycle(ProtocolVersion::V5, &[7]), 2 * N);
}

#[test]
fn inbound_qos1_allocates_nothing_per_message() {
    let mut s = session(ProtocolVersion::V5);
    let topic = TopicName::new("fleet/dev/telemetry").unwrap();
    let payload = Bytes::from_static(b"{\"t\":21.5}");
    let now = Instant::now();
    let cycle = |s: &mut Session, id: u16| {
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.clone(),
            packet_id: id,
            payload: payload.clone(),
            properties: PublishProps::none(),
        };
        s.handle_packet(Packet::Publish(p), now).unwrap();
        assert!(matches!(s.poll_transmit(), Some(Packet::PubAck(_))));
        assert!(s.poll_event().is_some());
    };
    for id in 1..50 {
        cycle(&mut s, id);
    }
    let before = allocs();
    for i in 0..N {
        cycle(&mut s, (i % 60_000) as u16 + 1);
    }
    assert_eq!(allocs() - before, 0);
}

/// An idle session holds one slot per queue it used, not the four a `VecDeque` takes on its
/// first push, and nothing once `shrink_idle` ran (the shard core runs it when the session's
/// keepalive timer comes due).
#[test]
fn an_idle_session_holds_one_slot_per_queue_then_none() {
    use std::mem::size_of;
    let mut s = session(ProtocolVersion::V311);
    assert_eq!(
        s.queue_memory(),
        size_of::<Packet>(),
        "the CONNACK's one slot"
    );
    let now = Instant::now();
    let p = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: TopicName::new("fleet/dev/telemetry").unwrap(),
        packet_id: 1,
        payload: Bytes::from_static(b"21.5"),
        properties: PublishProps::none(),
    };
    s.handle_packet(Packet::Publish(p), now).unwrap();
    assert!(matches!(s.poll_transmit(), Some(Packet::PubAck(_))));
    assert!(s.poll_event().is_some());
    let one_event = s.queue_memory() - size_of::<Packet>();
    assert!(
        one_event > 0 && one_event < 2 * 160,
        "one event slot, not four: {one_event} bytes"
    );
    s.shrink_idle();
    assert_eq!(s.queue_memory(), 0);

    // A SUBSCRIBE queues a retained-message request; once the runtime has taken it, the
    // request queue and its set are given back at once (not at the next keepalive check).
    let sub = midge::codec::Subscribe {
        packet_id: 2,
        filters: vec![(
            midge::codec::TopicFilter::new("fleet/dev/cmd").unwrap(),
            SubscriptionOptions::default(),
        )],
        properties: Default::default(),
    };
    s.handle_packet(Packet::Subscribe(sub), now).unwrap();
    assert!(matches!(s.poll_transmit(), Some(Packet::SubAck(_))));
    assert!(s.poll_event().is_some());
    assert!(s.next_retained_request().is_some());
    assert!(s.next_retained_request().is_none());
    assert_eq!(
        s.queue_memory(),
        size_of::<Packet>() + one_event,
        "one SUBACK slot, one event slot, no retained-request queue"
    );
}
