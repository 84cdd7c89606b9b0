//! `$SYS` topics, as mosquitto publishes them, plus Midge's per-shard and TLS counters.
//!
//! Owns: every `sys_interval`, shard 0 reads every shard's counters (single-writer cells,
//! read without disturbing their writers) and publishes them as retained messages under
//! `$SYS/broker/...`. Must not touch: the counters themselves (each shard owns its own) or
//! routing rules (messages go through the core's normal publish path).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use bytestring::ByteString;

use super::driver::{Shard, Stats};
use crate::codec::{QoS, TopicName};
use crate::message::Message;
use crate::metrics::DropCause;
use crate::tls::HandshakeFailure;

/// Publish one round of `$SYS` topics from `shard` (shard 0).
pub(crate) fn publish(shard: &Shard, started: Instant) {
    let now = Instant::now();
    let shared = &shard.shared;
    let snaps: Vec<Stats> = shared.stats_snapshot();
    let sum = |f: fn(&Stats) -> u64| snaps.iter().map(f).sum::<u64>();
    let connected: usize = shared
        .connections
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum();

    let mut topics: Vec<(String, String)> = vec![
        (
            "version".into(),
            format!("midge version {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "uptime".into(),
            format!("{} seconds", now.duration_since(started).as_secs()),
        ),
        ("clients/connected".into(), connected.to_string()),
        (
            "messages/received".into(),
            sum(|s| s.publishes_in).to_string(),
        ),
        ("messages/sent".into(), sum(|s| s.deliveries).to_string()),
        (
            "publish/messages/dropped".into(),
            shared
                .counters
                .iter()
                .map(|c| c.dropped_total())
                .sum::<u64>()
                .to_string(),
        ),
        (
            "retained messages/count".into(),
            snaps.first().map(|s| s.retained).unwrap_or(0).to_string(),
        ),
        ("clients/stalled".into(), sum(|s| s.stalled_now).to_string()),
        ("clients/paused".into(), sum(|s| s.paused_now).to_string()),
    ];
    for cause in DropCause::ALL {
        let n: u64 = shared.counters.iter().map(|c| c.dropped(cause)).sum();
        topics.push((
            format!("publish/messages/dropped/{}", cause.as_str()),
            n.to_string(),
        ));
    }
    for (i, s) in snaps.iter().enumerate() {
        let p = format!("shard/{i}");
        topics.push((format!("{p}/clients/connected"), s.live_conns.to_string()));
        topics.push((format!("{p}/messages/received"), s.publishes_in.to_string()));
        topics.push((format!("{p}/messages/sent"), s.deliveries.to_string()));
        topics.push((
            format!("{p}/messages/forwarded"),
            s.forwards_out.to_string(),
        ));
    }
    // Handshake counters of every TLS listener, per shard.
    for l in shared.listeners.iter() {
        let Some(t) = &l.tls else { continue };
        for (i, st) in t.stats.iter().enumerate() {
            let snap = st.snapshot();
            let p = format!("tls/{}/shard/{i}/handshakes", l.addr.port());
            topics.push((format!("{p}/started"), snap.started.to_string()));
            topics.push((format!("{p}/full"), snap.full.to_string()));
            topics.push((format!("{p}/resumed"), snap.resumed.to_string()));
            topics.push((format!("{p}/in_progress"), snap.in_progress.to_string()));
            let mut failed = String::new();
            for r in HandshakeFailure::ALL {
                let n = snap.failures_for(r);
                topics.push((format!("{p}/failed/{}", r.as_str()), n.to_string()));
                let _ = write!(failed, "{}={n} ", r.as_str());
            }
            tracing::debug!("{p}: {}", failed.trim_end());
        }
    }

    let mut core = shard.core.borrow_mut();
    for (t, v) in topics {
        let Ok(topic) = TopicName::new(format!("$SYS/broker/{t}")) else {
            continue;
        };
        let msg = Message {
            topic,
            payload: Bytes::from(v),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: None,
            expires_at: None,
            origin: ByteString::from_static("$SYS"),
            sid: 0,
        };
        core.publish_internal(msg, now);
    }
    drop(core);
    shard.after_input();
}
