//! Codec micro-benchmarks: decode and encode of a QoS 1 PUBLISH with a 64-byte and a 4 KiB
//! payload, for MQTT 3.1.1 and 5.0. Decode measures the zero-copy path a broker runs per
//! incoming message; encode writes into a reused, pre-sized buffer as a connection would.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use midge::codec::{
    decode, encode, encoded_len, Limits, Packet, ProtocolVersion, Publish, PublishProps, QoS,
    TopicName,
};

fn publish(payload_len: usize) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: TopicName::new("fleet/device-000123/telemetry").expect("valid topic"),
        packet_id: 42,
        payload: Bytes::from(vec![0x5A; payload_len]),
        properties: PublishProps::none(),
    })
}

fn bench(c: &mut Criterion) {
    let limits = Limits::default();
    for (version, vname) in [(ProtocolVersion::V311, "v311"), (ProtocolVersion::V5, "v5")] {
        for (len, lname) in [(64usize, "64B"), (4096, "4KiB")] {
            let packet = publish(len);
            let mut wire = BytesMut::new();
            encode(&packet, version, &mut wire);
            let wire = wire.freeze();

            let mut g = c.benchmark_group(format!("publish_qos1_{vname}_{lname}"));
            g.throughput(Throughput::Bytes(wire.len() as u64));
            g.bench_function("decode", |b| {
                // A read buffer holding a batch of packets back to back, refilled outside the
                // timed region, so the figure is decode alone (as on a connection's buffer).
                b.iter_custom(|iters| {
                    let batch = 256u64;
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let n = left.min(batch);
                        let mut buf = BytesMut::with_capacity(wire.len() * n as usize);
                        for _ in 0..n {
                            buf.extend_from_slice(&wire);
                        }
                        let start = Instant::now();
                        for _ in 0..n {
                            black_box(decode(&mut buf, version, &limits).ok());
                        }
                        total += start.elapsed();
                        left -= n;
                    }
                    total
                });
            });
            g.bench_function("encode", |b| {
                let mut buf = BytesMut::with_capacity(encoded_len(&packet, version) * 2);
                b.iter(|| {
                    buf.clear();
                    encode(black_box(&packet), version, &mut buf);
                    black_box(buf.len())
                });
            });
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
