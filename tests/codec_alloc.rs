//! Allocation budget of the codec hot path: decoding a PUBLISH allocates nothing (topic and
//! payload are slices of the read buffer, v5 properties default to empty `Vec`s), and encoding
//! into a buffer that already has room allocates nothing. Own test binary because it installs a
//! counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{Bytes, BytesMut};
use midge::codec::{
    decode, encode, Limits, Packet, ProtocolVersion, PubResp, Publish, PublishProps, QoS, TopicName,
};

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCS.with(Cell::get);
    let r = f();
    (r, ALLOCS.with(Cell::get) - before)
}

fn publish() -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: TopicName::new("fleet/device-1/telemetry").unwrap(),
        packet_id: 7,
        payload: Bytes::from(vec![1; 200]),
        properties: PublishProps::none(),
    })
}

#[test]
fn publish_decode_and_encode_do_not_allocate() {
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let packet = publish();
        let mut buf = BytesMut::with_capacity(4096);
        for _ in 0..3 {
            encode(&packet, version, &mut buf);
        }
        let limits = Limits::default();
        // The first split of a fresh BytesMut turns its Vec into a shared buffer (one
        // allocation per read buffer, not per packet); measure the packets after it.
        assert_eq!(decode(&mut buf, version, &limits), Ok(Some(packet.clone())));
        for _ in 0..2 {
            let (got, n) = allocations(|| decode(&mut buf, version, &limits));
            assert_eq!(got, Ok(Some(packet.clone())));
            assert_eq!(n, 0, "{version:?} PUBLISH decode allocated {n} times");
        }

        let mut out = BytesMut::with_capacity(4096);
        let ((), n) = allocations(|| encode(&packet, version, &mut out));
        assert_eq!(n, 0, "{version:?} PUBLISH encode allocated {n} times");
        let ack = Packet::PubAck(PubResp::new(7));
        let ((), n) = allocations(|| encode(&ack, version, &mut out));
        assert_eq!(n, 0, "{version:?} PUBACK encode allocated {n} times");
    }

    // The counter does see allocations: a v5 user property needs its Vec.
    let mut with_props = publish();
    if let Packet::Publish(p) = &mut with_props {
        p.properties.user_properties.push(("k".into(), "v".into()));
    }
    let mut buf = BytesMut::with_capacity(4096);
    encode(&with_props, ProtocolVersion::V5, &mut buf);
    encode(&with_props, ProtocolVersion::V5, &mut buf);
    let limits = Limits::default();
    let _ = decode(&mut buf, ProtocolVersion::V5, &limits);
    let (got, n) = allocations(|| decode(&mut buf, ProtocolVersion::V5, &limits));
    assert_eq!(got, Ok(Some(with_props)));
    assert!(n >= 1, "allocation counter is not counting");
}
