//! Routing benchmarks: a device fleet of 100 sites × 1000 devices, each device with its own
//! `fleet/{site}/{device}/telemetry` subscription, plus per-site `+` and `#` watchers and one
//! shared worker group. Measures `match_into` for a hitting and a missing topic, the cost of
//! one subscribe + unsubscribe, and the cross-shard replica match.
//!
//! Run: `cargo bench --bench trie -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use midge::codec::{TopicFilter, TopicName};
use midge::routing::{
    LocalSubscription, Match, RouteDelta, RouteOp, RoutingReplica, ShardId, ShardMatch,
    SubscriptionTrie,
};

const SITES: u64 = 100;
const DEVICES: u64 = 1000;

fn filter(s: String) -> TopicFilter {
    TopicFilter::new(s).expect("valid filter")
}

fn topic(s: &str) -> TopicName {
    TopicName::new(s.to_string()).expect("valid topic")
}

/// Every filter of the fleet, with the session that holds it.
fn fleet() -> Vec<(TopicFilter, u64)> {
    let mut v = Vec::with_capacity((SITES * DEVICES + 2 * SITES + 4) as usize);
    let mut session = 0u64;
    for site in 0..SITES {
        for dev in 0..DEVICES {
            v.push((filter(format!("fleet/s{site}/d{dev}/telemetry")), session));
            session += 1;
        }
        v.push((filter(format!("fleet/s{site}/+/telemetry")), session));
        session += 1;
        v.push((filter(format!("fleet/s{site}/#")), session));
        session += 1;
    }
    for _ in 0..4 {
        v.push((filter("$share/workers/fleet/+/+/telemetry".into()), session));
        session += 1;
    }
    v
}

fn rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4)
}

fn build_trie(filters: &[(TopicFilter, u64)]) -> SubscriptionTrie<u64, LocalSubscription> {
    let mut trie = SubscriptionTrie::new();
    for (f, s) in filters {
        trie.insert(f, *s, LocalSubscription::default());
    }
    trie
}

fn bench_trie(c: &mut Criterion) {
    let filters = fleet();
    let rss0 = rss_kib();
    let t0 = Instant::now();
    let trie = build_trie(&filters);
    let built = t0.elapsed();
    let rss1 = rss_kib();
    eprintln!(
        "built {} subscriptions, {} nodes in {:?} ({:.0} ns/insert); RSS +{} KiB",
        trie.len(),
        trie.node_count(),
        built,
        built.as_nanos() as f64 / trie.len() as f64,
        rss1.zip(rss0).map_or(0, |(a, b)| a.saturating_sub(b)),
    );

    let hit = topic("fleet/s42/d500/telemetry");
    let miss = topic("plant/s42/d500/telemetry");
    let near_miss = topic("fleet/s42/d500/status"); // only fleet/s42/# matches
    let mut out: Vec<Match<u64, LocalSubscription>> = Vec::with_capacity(64);
    out.clear();
    trie.match_into(&hit, &mut out);
    assert_eq!(out.len(), 7, "exact + '+' + '#' + 4 shared members");

    let mut g = c.benchmark_group("trie_100k");
    g.sample_size(30);
    g.bench_function("match_hit_7", |b| {
        b.iter(|| {
            out.clear();
            trie.match_into(black_box(&hit), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("match_near_miss_1", |b| {
        b.iter(|| {
            out.clear();
            trie.match_into(black_box(&near_miss), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("match_miss_0", |b| {
        b.iter(|| {
            out.clear();
            trie.match_into(black_box(&miss), &mut out);
            black_box(out.len())
        })
    });
    // The anti-pattern the trie replaces: test every filter. For scale only.
    g.bench_function("naive_scan_hit_reference", |b| {
        b.iter(|| {
            black_box(&filters)
                .iter()
                .filter(|(f, _)| f.matches(&hit))
                .count()
        })
    });
    let mut trie = trie;
    let fresh = filter("fleet/s42/d100000/telemetry".into());
    let existing_path = filter("fleet/s42/d500/telemetry".into());
    g.bench_function("insert_remove_new_path", |b| {
        b.iter(|| {
            trie.insert(black_box(&fresh), 1 << 40, LocalSubscription::default());
            black_box(trie.remove(&fresh, &(1 << 40)))
        })
    });
    g.bench_function("insert_remove_existing_path", |b| {
        b.iter(|| {
            trie.insert(
                black_box(&existing_path),
                1 << 40,
                LocalSubscription::default(),
            );
            black_box(trie.remove(&existing_path, &(1 << 40)))
        })
    });
    g.finish();

    // Replica: the same filters spread over 4 shards.
    let mut replica = RoutingReplica::new();
    for (f, s) in &filters {
        replica.apply(&RouteDelta {
            filter: f.clone(),
            shard: ShardId::new((*s % 4) as usize).expect("shard < 64"),
            op: RouteOp::Add,
        });
    }
    let mut m = ShardMatch::default();
    let mut g = c.benchmark_group("replica_100k");
    g.sample_size(30);
    g.bench_function("match_shards_hit_with_group", |b| {
        b.iter(|| {
            replica.match_shards(black_box(&hit), &mut m);
            black_box(m.plain)
        })
    });
    g.bench_function("match_shards_near_miss", |b| {
        b.iter(|| {
            replica.match_shards(black_box(&near_miss), &mut m);
            black_box(m.plain)
        })
    });
    g.bench_function("match_shards_miss", |b| {
        b.iter(|| {
            replica.match_shards(black_box(&miss), &mut m);
            black_box(m.plain)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_trie);
criterion_main!(benches);
