//! What the fleet coordinator and its workers (threads or `--procs` child processes) say to
//! each other, and how the workers' results are merged.
//!
//! Owns: the commands (coordinator → worker), events (worker → coordinator), a worker's
//! result, and [`merge`], which turns every worker's view into run totals: telemetry sent by
//! a device in one process may be received by a backend consumer in another (a shared
//! subscription spans processes), so loss and duplicates are only exact after the per-stream
//! sequence bitmaps of every worker are merged. Must not touch: sockets, clocks or output.
//! Everything is plain serde data: one JSON object per line on a child's stdin/stdout.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::FleetArgs;
use crate::seq::SeqTracker;
use crate::stats::Lat;

/// Coordinator → worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Cmd {
    /// Start connecting devices: device d is due at `at_ns + d / ramp_rate`.
    Ramp { at_ns: u64 },
    /// Devices start their telemetry schedules (and commanders theirs) at `at_ns`.
    Traffic { at_ns: u64 },
    /// Close everything and report.
    Stop,
}

/// Worker → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Event {
    /// Identities prepared, backend consumers and the commander connected and subscribed.
    Ready(ReadyInfo),
    /// Every device of this worker connected (or failed).
    Ramped {
        ok: u64,
        failed: u64,
    },
    Progress(Progress),
    /// The worker cannot go on (the message says why); it still sends its `Result`
    /// if it can.
    Failed(String),
    Result(Box<WorkerResult>),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReadyInfo {
    pub devices: u64,
    pub identities_minted: u64,
    pub identities_loaded: u64,
    pub prep_seconds: f64,
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    /// Where minted identities are cached (None: not minted, or minted afresh).
    pub cache_dir: Option<String>,
}

/// Running totals of one worker (monotonic counters).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub connected: u64,
    /// Devices whose connection attempt failed.
    pub failed: u64,
    pub tel_sent: u64,
    pub tel_recv: u64,
    /// PUBACKs the devices received for their telemetry (QoS 1).
    pub tel_acked: u64,
    pub cmd_sent: u64,
    pub cmd_recv: u64,
    pub cmd_acked: u64,
    pub pings: u64,
    /// Senders (connected devices and the commander) whose schedule is over.
    pub senders_done: u64,
    pub senders: u64,
    pub errors: u64,
}

/// What a worker process is told to do (the first line on its stdin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub index: u32,
    pub count: u32,
    /// The coordinator's CLOCK_MONOTONIC base: all times are ns since it.
    pub clock_base_ns: u64,
    /// Run nonce in every payload (the same in every worker: consumers accept any device).
    pub nonce: u16,
    pub cores: Vec<usize>,
    /// The CPUs the coordinator may use (a child inherits the pinned mask of the thread that
    /// spawned it and widens it back to these).
    pub allowed_cpus: Vec<usize>,
    /// Devices in the whole run after the coordinator's descriptor cap.
    pub devices: u64,
    pub args: FleetArgs,
}

/// A latency histogram as (value, count) pairs: exact, and small for the few thousand
/// distinct values a run records.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatData {
    pub counts: Vec<(u64, u64)>,
    pub clamped: u64,
}

impl From<&Lat> for LatData {
    fn from(l: &Lat) -> Self {
        LatData {
            counts: l
                .h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
            clamped: l.clamped,
        }
    }
}

impl LatData {
    pub fn to_lat(&self) -> Lat {
        let mut l = Lat::new();
        for &(v, n) in &self.counts {
            let _ = l.h.record_n(v.clamp(1, crate::stats::MAX_NS), n);
        }
        l.clamped = self.clamped;
        l
    }
}

/// Everything one worker measured. Times are ns on the shared clock.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub index: u32,
    pub devices: u64,
    pub connected: u64,
    pub failed: u64,
    /// Connection failures by reason.
    pub failures: Vec<(String, u64)>,
    /// Errors after connecting (closed by the broker, missing PINGRESP, …) by reason.
    pub errors: Vec<(String, u64)>,
    pub tcp: LatData,
    pub tls: LatData,
    pub connack: LatData,
    pub suback: LatData,
    /// Intended connect time → SUBACK of the command subscription.
    pub connect_total: LatData,
    pub ramp_first_ns: u64,
    pub ramp_last_ns: u64,
    /// Telemetry end-to-end latency (intended send time → arrival at a backend consumer),
    /// intended times in the measured window only.
    pub tel_lat: LatData,
    /// Command latency (backend → device), same window.
    pub cmd_lat: LatData,
    /// Telemetry published per device (device id, count).
    pub tel_sent: Vec<(u32, u64)>,
    pub tel_sent_measured: u64,
    pub tel_acked: u64,
    /// (receiver key, device id, what that receiver saw of that device's telemetry).
    pub tel_trackers: Vec<(u32, u32, SeqTracker)>,
    pub tel_recv: u64,
    /// Telemetry deliveries arriving inside the measured window.
    pub tel_recv_window: u64,
    pub foreign: u64,
    /// Commands sent per device (device id, count).
    pub cmd_sent: Vec<(u32, u64)>,
    pub cmd_sent_measured: u64,
    pub cmd_acked: u64,
    /// (device id, what it saw of its commands).
    pub cmd_trackers: Vec<(u32, SeqTracker)>,
    pub cmd_recv: u64,
    pub pings: u64,
    pub pongs: u64,
    /// Per loadgen core, over the traffic phase: CPU busy fraction and run-queue wait.
    pub cores: Vec<usize>,
    pub core_busy: Vec<f64>,
    pub core_runq: Vec<f64>,
    pub cpu_seconds: f64,
    pub identities_minted: u64,
    pub identities_loaded: u64,
    pub prep_seconds: f64,
    pub nofile_soft: u64,
    pub warnings: Vec<String>,
}

/// Run totals over every worker.
#[derive(Default)]
pub struct Merged {
    pub devices: u64,
    pub connected: u64,
    pub failed: u64,
    pub failures: HashMap<String, u64>,
    pub errors: HashMap<String, u64>,
    pub tcp: Lat,
    pub tls: Lat,
    pub connack: Lat,
    pub suback: Lat,
    pub connect_total: Lat,
    pub ramp_first_ns: u64,
    pub ramp_last_ns: u64,
    pub tel_lat: Lat,
    pub cmd_lat: Lat,
    pub tel_sent: u64,
    pub tel_sent_measured: u64,
    pub tel_acked: u64,
    pub tel_expected: u64,
    pub tel_recv: u64,
    pub tel_recv_window: u64,
    pub tel_lost: u64,
    pub tel_duplicates: u64,
    pub foreign: u64,
    pub cmd_sent: u64,
    pub cmd_sent_measured: u64,
    pub cmd_acked: u64,
    pub cmd_recv: u64,
    pub cmd_lost: u64,
    pub cmd_duplicates: u64,
    pub pings: u64,
    pub pongs: u64,
    pub cores: Vec<usize>,
    pub core_busy: Vec<f64>,
    pub core_runq: Vec<f64>,
    pub cpu_seconds: f64,
    pub identities_minted: u64,
    pub identities_loaded: u64,
    pub prep_seconds: f64,
    pub warnings: Vec<String>,
}

/// Merge every worker's result. `receivers` are the telemetry receiver keys: `[0]` for a
/// shared subscription (the group receives each message once), else one key per backend
/// consumer (each receives every message).
pub fn merge(results: &[WorkerResult], receivers: &[u32]) -> Merged {
    let mut m = Merged {
        ramp_first_ns: u64::MAX,
        ..Default::default()
    };
    let mut tel_sent: HashMap<u32, u64> = HashMap::new();
    let mut cmd_sent: HashMap<u32, u64> = HashMap::new();
    let mut tel_tr: HashMap<(u32, u32), SeqTracker> = HashMap::new();
    let mut cmd_tr: HashMap<u32, SeqTracker> = HashMap::new();
    let add = |to: &mut HashMap<String, u64>, from: &[(String, u64)]| {
        for (k, v) in from {
            *to.entry(k.clone()).or_default() += v;
        }
    };
    for r in results {
        m.devices += r.devices;
        m.connected += r.connected;
        m.failed += r.failed;
        add(&mut m.failures, &r.failures);
        add(&mut m.errors, &r.errors);
        for (dst, src) in [
            (&mut m.tcp, &r.tcp),
            (&mut m.tls, &r.tls),
            (&mut m.connack, &r.connack),
            (&mut m.suback, &r.suback),
            (&mut m.connect_total, &r.connect_total),
            (&mut m.tel_lat, &r.tel_lat),
            (&mut m.cmd_lat, &r.cmd_lat),
        ] {
            dst.merge(&src.to_lat());
        }
        if r.connected > 0 {
            m.ramp_first_ns = m.ramp_first_ns.min(r.ramp_first_ns);
            m.ramp_last_ns = m.ramp_last_ns.max(r.ramp_last_ns);
        }
        for (d, n) in &r.tel_sent {
            *tel_sent.entry(*d).or_default() += n;
        }
        for (d, n) in &r.cmd_sent {
            *cmd_sent.entry(*d).or_default() += n;
        }
        for (k, d, t) in &r.tel_trackers {
            tel_tr.entry((*k, *d)).or_default().merge(t);
        }
        for (d, t) in &r.cmd_trackers {
            cmd_tr.entry(*d).or_default().merge(t);
        }
        m.tel_sent_measured += r.tel_sent_measured;
        m.tel_acked += r.tel_acked;
        m.tel_recv += r.tel_recv;
        m.tel_recv_window += r.tel_recv_window;
        m.foreign += r.foreign;
        m.cmd_sent_measured += r.cmd_sent_measured;
        m.cmd_acked += r.cmd_acked;
        m.cmd_recv += r.cmd_recv;
        m.pings += r.pings;
        m.pongs += r.pongs;
        m.cores.extend(&r.cores);
        m.core_busy.extend(&r.core_busy);
        m.core_runq.extend(&r.core_runq);
        m.cpu_seconds += r.cpu_seconds;
        m.identities_minted += r.identities_minted;
        m.identities_loaded += r.identities_loaded;
        m.prep_seconds = m.prep_seconds.max(r.prep_seconds);
        m.warnings.extend(r.warnings.iter().cloned());
    }
    if m.ramp_first_ns == u64::MAX {
        m.ramp_first_ns = 0;
    }
    let empty = SeqTracker::new();
    m.tel_sent = tel_sent.values().sum();
    m.tel_expected = m.tel_sent * receivers.len() as u64;
    for &k in receivers {
        for (d, &n) in &tel_sent {
            let t = tel_tr.get(&(k, *d)).unwrap_or(&empty);
            m.tel_lost += t.lost(n);
            m.tel_duplicates += t.duplicates;
        }
    }
    // Deliveries of streams nobody sent (a receiver key or device that is not ours) are
    // duplicates of nothing: count them as foreign instead of hiding them.
    for ((k, d), t) in &tel_tr {
        if !receivers.contains(k) || !tel_sent.contains_key(d) {
            m.foreign += t.distinct + t.duplicates;
        }
    }
    m.cmd_sent = cmd_sent.values().sum();
    for (d, &n) in &cmd_sent {
        let t = cmd_tr.get(d).unwrap_or(&empty);
        m.cmd_lost += t.lost(n);
        m.cmd_duplicates += t.duplicates;
    }
    for (d, t) in &cmd_tr {
        if !cmd_sent.contains_key(d) {
            m.foreign += t.distinct + t.duplicates;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(seqs: &[u64]) -> SeqTracker {
        let mut t = SeqTracker::new();
        for &s in seqs {
            t.record(s);
        }
        t
    }

    #[test]
    fn latency_histograms_survive_the_wire() {
        let mut l = Lat::new();
        for v in [1u64, 999, 1_000, 123_456, 9_999_999, 59_000_000_000] {
            l.record(v);
        }
        l.record(crate::stats::MAX_NS * 3);
        let d = LatData::from(&l);
        let json = serde_json::to_string(&d).unwrap();
        let back: LatData = serde_json::from_str(&json).unwrap();
        let l2 = back.to_lat();
        assert_eq!(l2.summary(), l.summary());
        assert_eq!(l2.clamped, 1);
        assert_eq!(l2.h.len(), 7);
    }

    #[test]
    fn shared_group_spanning_two_processes_is_exact() {
        // Devices 0 (worker 0) and 1 (worker 1) each sent 6 messages; the shared group's
        // members live in both workers. Device 0's message 3 reached both members (a
        // duplicate); device 1's message 5 reached nobody (lost).
        let w0 = WorkerResult {
            index: 0,
            devices: 1,
            connected: 1,
            tel_sent: vec![(0, 6)],
            tel_trackers: vec![(0, 0, tracker(&[0, 1, 2, 3])), (0, 1, tracker(&[0, 2]))],
            tel_recv: 6,
            cmd_sent: vec![(0, 2)],
            cmd_trackers: vec![(0, tracker(&[0, 1, 1]))],
            cmd_recv: 3,
            failures: vec![("tcp: connection refused".into(), 2)],
            ramp_first_ns: 50,
            ramp_last_ns: 70,
            ..Default::default()
        };
        let w1 = WorkerResult {
            index: 1,
            devices: 1,
            connected: 1,
            tel_sent: vec![(1, 6)],
            tel_trackers: vec![(0, 0, tracker(&[3, 4, 5])), (0, 1, tracker(&[1, 3, 4]))],
            tel_recv: 6,
            failures: vec![("tcp: connection refused".into(), 1)],
            ramp_first_ns: 40,
            ramp_last_ns: 90,
            ..Default::default()
        };
        // Through JSON, as from child processes.
        let wire = |w: &WorkerResult| -> WorkerResult {
            serde_json::from_str(&serde_json::to_string(w).unwrap()).unwrap()
        };
        let m = merge(&[wire(&w0), wire(&w1)], &[0]);
        assert_eq!((m.tel_sent, m.tel_expected, m.tel_recv), (12, 12, 12));
        assert_eq!(m.tel_lost, 1, "device 1 message 5");
        assert_eq!(m.tel_duplicates, 1, "device 0 message 3");
        assert_eq!((m.cmd_sent, m.cmd_lost, m.cmd_duplicates), (2, 0, 1));
        assert_eq!(m.failures["tcp: connection refused"], 3);
        assert_eq!((m.ramp_first_ns, m.ramp_last_ns), (40, 90));
        assert_eq!(m.foreign, 0);
    }

    #[test]
    fn every_plain_subscriber_must_see_every_message() {
        // Two backends on fleet/+/telemetry (no shared subscription): each is its own
        // receiver; backend 1 missed device 0's message 1.
        let w = WorkerResult {
            tel_sent: vec![(0, 2)],
            tel_trackers: vec![
                (0, 0, tracker(&[0, 1])),
                (1, 0, tracker(&[0])),
                (7, 0, tracker(&[0])),
            ],
            ..Default::default()
        };
        let m = merge(&[w], &[0, 1]);
        assert_eq!((m.tel_expected, m.tel_lost, m.tel_duplicates), (4, 1, 0));
        assert_eq!(m.foreign, 1, "receiver 7 is not one of ours");
    }
}
