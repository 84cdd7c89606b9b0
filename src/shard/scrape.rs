//! What a scrape of `/metrics` and a probe of `/healthz` read from the running shards.
//!
//! Owns: turning every shard's single-writer counters, the per-listener connection counts,
//! the TLS listeners' handshake figures and material dates, and the shards' heartbeats into
//! one exposition ([`render`]) and one health verdict ([`health`]). Runs on the exporter's
//! thread, never on a shard: it only loads relaxed atomics the shards write, so a scrape costs
//! the shards nothing and a stalled shard cannot stall a scrape. Must not touch: the counters'
//! meaning (the core and driver decide when to count), the HTTP side (`exporter`),
//! the text format (`crate::metrics::expose`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::driver::Shared;
use crate::metrics::expose::{self as m, Format, Writer};
use crate::metrics::{DropCause, HistogramSnapshot, RefuseCause};
use crate::tls::HandshakeFailure;

/// Milliseconds since each shard's control task last ran, indexed by shard.
fn heartbeat_ages(shared: &Shared) -> Vec<Duration> {
    let now = shared.epoch.elapsed().as_millis() as u64;
    shared
        .heartbeat
        .iter()
        .map(|h| Duration::from_millis(now.saturating_sub(h.get())))
        .collect()
}

/// How long a shard may go without running its control task before it counts as not
/// answering: the same bound other shards wait for its answers (`peer_timeout`).
fn health_bound(shared: &Shared) -> Duration {
    shared.cfg.peer_timeout
}

/// `Ok(text)` while every shard's control task ran within the bound; `Err(text)` naming the
/// shards that did not.
pub(crate) fn health(shared: &Shared) -> Result<String, String> {
    let bound = health_bound(shared);
    let late: Vec<String> = heartbeat_ages(shared)
        .iter()
        .enumerate()
        .filter(|(_, age)| **age > bound)
        .map(|(i, age)| format!("shard {i} has not answered for {:.1}s", age.as_secs_f64()))
        .collect();
    if late.is_empty() {
        Ok(format!("ok: {} shards answering\n", shared.shards))
    } else {
        Err(format!(
            "unhealthy: {} (bound {}s)\n",
            late.join(", "),
            bound.as_secs_f64()
        ))
    }
}

/// The listener label: its configured address (what the operator wrote in `listener`).
fn listener_label(shared: &Shared, i: usize) -> String {
    shared.listeners[i].addr.to_string()
}

/// One exposition of every family in `expose::ALL`, in that order.
pub(crate) fn render(shared: &Shared, format: Format) -> String {
    let mut w = Writer::new(format);
    let shards: Vec<String> = (0..shared.shards).map(|i| i.to_string()).collect();
    let c = &shared.counters;
    let per_shard = |w: &mut Writer, f: &'static m::Family, get: &dyn Fn(usize) -> u64| {
        w.family(f);
        for (i, s) in shards.iter().enumerate() {
            w.sample(&[("shard", s)], get(i));
        }
    };

    w.family(&m::BUILD_INFO);
    w.sample(&[("version", env!("CARGO_PKG_VERSION"))], 1);
    w.family(&m::START_TIME);
    w.sample(&[], shared.started_unix);
    w.family(&m::SHARDS);
    w.sample(&[], shared.shards as u64);

    let ages = heartbeat_ages(shared);
    let bound = health_bound(shared);
    w.family(&m::SHARD_UP);
    for (s, age) in shards.iter().zip(&ages) {
        w.sample(&[("shard", s)], u64::from(*age <= bound));
    }
    w.family(&m::SHARD_HEARTBEAT_AGE);
    for (s, age) in shards.iter().zip(&ages) {
        w.sample_f64(&[("shard", s)], age.as_secs_f64());
    }

    per_shard(&mut w, &m::CONNECTIONS, &|i| c[i].sockets.get());
    let listeners: Vec<String> = (0..shared.listeners.len())
        .map(|i| listener_label(shared, i))
        .collect();
    w.family(&m::LISTENER_CONNECTIONS);
    for (i, l) in listeners.iter().enumerate() {
        let n = shared.connections[i].load(Ordering::Relaxed) as u64;
        w.sample(&[("listener", l)], n);
    }
    w.family(&m::LISTENER_ACCEPTED);
    for (i, l) in listeners.iter().enumerate() {
        let n: u64 = shared.accepted.iter().map(|a| a[i].get()).sum();
        w.sample(&[("listener", l)], n);
    }
    w.family(&m::CONNECTIONS_REFUSED);
    for (i, s) in shards.iter().enumerate() {
        for r in RefuseCause::ALL {
            w.sample(&[("shard", s), ("reason", r.as_str())], c[i].refused(r));
        }
    }
    per_shard(&mut w, &m::CONNECTS, &|i| c[i].connects.get());
    per_shard(&mut w, &m::KEEPALIVE_TIMEOUTS, &|i| {
        c[i].keepalive_timeouts.get()
    });
    per_shard(&mut w, &m::TAKEOVERS, &|i| c[i].takeovers.get());
    per_shard(&mut w, &m::PEER_TIMEOUTS, &|i| c[i].peer_timeouts.get());
    w.family(&m::SESSIONS);
    for (i, s) in shards.iter().enumerate() {
        w.sample(&[("shard", s), ("state", "live")], c[i].live_sessions.get());
        w.sample(
            &[("shard", s), ("state", "offline")],
            c[i].offline_sessions.get(),
        );
    }
    per_shard(&mut w, &m::SUBSCRIPTIONS, &|i| c[i].subscriptions.get());
    per_shard(&mut w, &m::RETAINED_MESSAGES, &|i| c[i].retained.get());
    per_shard(&mut w, &m::RETAINED_BYTES, &|i| c[i].retained_bytes.get());

    type ByQos = fn(&crate::metrics::ShardCounters, u8) -> (u64, u64);
    let by_qos = |w: &mut Writer, f: &'static m::Family, get: ByQos, bytes: bool| {
        w.family(f);
        for (i, s) in shards.iter().enumerate() {
            for (q, qs) in ["0", "1", "2"].iter().enumerate() {
                let (n, b) = get(&c[i], q as u8);
                w.sample(&[("shard", s), ("qos", qs)], if bytes { b } else { n });
            }
        }
    };
    by_qos(&mut w, &m::PUBLISH_RECEIVED, |c, q| c.received(q), false);
    by_qos(
        &mut w,
        &m::PUBLISH_RECEIVED_BYTES,
        |c, q| c.received(q),
        true,
    );
    by_qos(&mut w, &m::PUBLISH_SENT, |c, q| c.sent(q), false);
    by_qos(&mut w, &m::PUBLISH_SENT_BYTES, |c, q| c.sent(q), true);

    per_shard(&mut w, &m::MESSAGES_ROUTED, &|i| c[i].publishes_in.get());
    per_shard(&mut w, &m::DELIVERIES, &|i| c[i].deliveries.get());
    per_shard(&mut w, &m::FORWARDS, &|i| c[i].forwards_out.get());
    w.family(&m::DROPPED);
    for (i, s) in shards.iter().enumerate() {
        for d in DropCause::ALL {
            w.sample(&[("shard", s), ("reason", d.as_str())], c[i].dropped(d));
        }
    }
    per_shard(&mut w, &m::PUBLISHER_PAUSES, &|i| c[i].pauses.get());
    per_shard(&mut w, &m::PAUSED_PUBLISHERS, &|i| c[i].paused_now.get());
    per_shard(&mut w, &m::SUBSCRIBER_STALLS, &|i| c[i].stalls.get());
    per_shard(&mut w, &m::STALLED_SUBSCRIBERS, &|i| c[i].stalled_now.get());
    // The store's figures exist only with a log to measure (`persistence true`).
    let store = shared.store.is_some();
    w.family(&m::STORE_FSYNC_DURATION);
    if store {
        for (i, s) in shards.iter().enumerate() {
            w.histogram(&[("shard", s)], &c[i].store_fsync.0.snapshot());
        }
    }
    type Get = fn(&crate::metrics::ShardCounters) -> u64;
    let store_fams: [(&'static m::Family, Get); 6] = [
        (&m::STORE_WRITTEN_BYTES, |c| c.store_written_bytes.get()),
        (&m::STORE_WRITE_ERRORS, |c| c.store_write_errors.get()),
        (&m::STORE_FAILING, |c| c.store_failing.get()),
        (&m::STORE_BACKLOG_BYTES, |c| c.store_backlog_bytes.get()),
        (&m::STORE_HELD_INPUTS, |c| c.store_held_inputs.get()),
        (&m::STORE_HELD_CLOSES, |c| c.store_held_closes.get()),
    ];
    for (f, get) in store_fams {
        w.family(f);
        if store {
            for (i, s) in shards.iter().enumerate() {
                w.sample(&[("shard", s)], get(&c[i]));
            }
        }
    }

    // TLS listeners: figures summed over shards (a handshake's shard is the kernel's choice).
    let tls: Vec<(&String, &super::TlsListener)> = listeners
        .iter()
        .zip(&shared.listeners)
        .filter_map(|(l, spec)| spec.tls.as_deref().map(|t| (l, t)))
        .collect();
    let snaps: Vec<_> = tls
        .iter()
        .map(|(_, t)| {
            let s: Vec<_> = t.stats.iter().map(|s| s.snapshot()).collect();
            s
        })
        .collect();
    w.family(&m::TLS_HANDSHAKES);
    for ((l, _), s) in tls.iter().zip(&snaps) {
        let full = s.iter().map(|x| x.full).sum();
        let resumed = s.iter().map(|x| x.resumed).sum();
        w.sample(&[("listener", l), ("kind", "full")], full);
        w.sample(&[("listener", l), ("kind", "resumed")], resumed);
    }
    w.family(&m::TLS_HANDSHAKE_FAILURES);
    for ((l, _), s) in tls.iter().zip(&snaps) {
        for r in HandshakeFailure::ALL {
            let n = s.iter().map(|x| x.failures_for(r)).sum();
            w.sample(&[("listener", l), ("reason", r.as_str())], n);
        }
    }
    w.family(&m::TLS_HANDSHAKES_IN_PROGRESS);
    for ((l, _), s) in tls.iter().zip(&snaps) {
        let n = s.iter().map(|x| x.in_progress as u64).sum();
        w.sample(&[("listener", l)], n);
    }
    w.family(&m::TLS_HANDSHAKE_DURATION);
    for (l, t) in &tls {
        for (kind, resumed) in [("full", false), ("resumed", true)] {
            let mut sum: Option<HistogramSnapshot> = None;
            for s in &t.stats {
                let h = s.durations(resumed);
                match &mut sum {
                    Some(acc) => acc.merge(&h),
                    None => sum = Some(h),
                }
            }
            if let Some(h) = sum {
                w.histogram(&[("listener", l), ("kind", kind)], &h);
            }
        }
    }
    w.family(&m::TLS_RELOADS);
    for (l, t) in &tls {
        w.sample(&[("listener", l)], t.reloader.generation());
    }
    let dates: Vec<_> = tls.iter().map(|(_, t)| t.reloader.dates()).collect();
    w.family(&m::TLS_CERT_NOT_AFTER);
    for ((l, _), d) in tls.iter().zip(&dates) {
        w.sample_i64(&[("listener", l)], d.server_not_after);
    }
    w.family(&m::TLS_CA_NOT_AFTER);
    for ((l, _), d) in tls.iter().zip(&dates) {
        if let Some(t) = d.ca_not_after {
            w.sample_i64(&[("listener", l)], t);
        }
    }
    w.family(&m::TLS_CRL_NEXT_UPDATE);
    for ((l, _), d) in tls.iter().zip(&dates) {
        if let Some(t) = d.crl_next_update {
            w.sample_i64(&[("listener", l)], t);
        }
    }
    w.finish()
}
