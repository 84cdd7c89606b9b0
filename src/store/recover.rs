//! Recovery: from the records of every shard to the state a broker starts with.
//!
//! Owns: replaying records in timestamp order into sessions (subscriptions with the time each
//! was made, expiry, the client's unreleased QoS 2 ids), the retained set, and the re-queue
//! of every stored message a persistent session has not completed: matched against the
//! subscriptions the session had when it was published, de-duplicated by `sid`, QoS 2 ones
//! in flight with the packet id they were first sent with. It also picks the records a new
//! generation needs (compaction). Must not touch: files (`mod.rs`), placing sessions on shards
//! (the caller), the clock (time comes in).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use bytestring::ByteString;
use smallvec::SmallVec;

use super::record::{self, sid_origin, sid_seq, Record};
use crate::codec::{QoS, TopicFilter};
use crate::message::Message;
use crate::routing::{LocalSubscription, LocalSubscriptions};
use crate::session::{RecoveredDelivery, SessionState, Subscription, WillAuth, EXPIRY_NEVER};

/// What the broker starts with.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Persistent sessions, offline, with their queues.
    pub sessions: Vec<SessionState>,
    pub retained: Vec<Message>,
    /// Next message sequence per origin shard (continues every origin seen).
    pub next_seq: HashMap<usize, u64>,
    /// Latest timestamp in the log (the new run's clock starts after it).
    pub max_ts: u64,
    /// The records a new generation needs to stand for all of the old one.
    pub compacted: Vec<Record>,
    pub stats: Stats,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub records: usize,
    pub messages_stored: usize,
    pub sessions: usize,
    pub sessions_expired: usize,
    pub queued: usize,
    pub inflight: usize,
    pub retained: usize,
    /// Sessions with a will pending (their connection was lost, the delay had not run out).
    pub wills: usize,
}

#[derive(Default)]
struct Sess {
    /// Time of the start that created it (a clean start makes a new one).
    base_ts: u64,
    expiry: u32,
    online: bool,
    offline_since: u64,
    /// filter → (options byte, subscription id, since)
    subs: BTreeMap<ByteString, (u8, u32, u64)>,
    /// Unreleased QoS 2 packet ids → the sid of the message they carried.
    incoming: BTreeMap<u16, u64>,
    /// Index of the `Will` record of its latest connection, while that will is pending.
    will: Option<usize>,
}

struct Stored {
    ts: u64,
    msg: Message,
    /// Index of the record in the input (for compaction).
    rec: usize,
}

/// Rebuild state from every shard's records (any order; merged by timestamp here).
///
/// This is start-up: the log's end is where the broker stopped, so sessions still online
/// there lost their connection then, and whatever expired since is gone. `compacted` stands
/// for the whole log and nothing may follow it.
pub fn rebuild(records: Vec<Record>, now: Instant, now_ns: u64) -> Recovered {
    replay(records, now, now_ns, false)
}

/// Runtime compaction (`crate::store::compact`): the records a compacted file needs to stand
/// for `records` while the broker runs, for any records `S` that follow, all with later
/// timestamps: `rebuild(compact_runtime(P) ∪ S)` rebuilds what `rebuild(P ∪ S)` does
/// (sessions, their queues and in-flight messages, retained messages, the message sequences
/// and the latest timestamp; see the tests). So, unlike [`rebuild`]:
/// * the end of `records` is no crash: sessions online there stay online (no `Disc`), and
///   nothing expires by time (the broker records an `End` when it expires a session, and a
///   message's expiry is applied by the start-up that finally reads it);
/// * a message is kept whenever a later record could still make it count: any subscription
///   that was there when it was published matches it, whatever its QoS or no-local option
///   (a later SUBSCRIBE of the same filter changes both but keeps its time), and any
///   `$share` group matches it (a later `Sent` picks the member);
/// * `Ack`/`Sent`/`Rel` for a message `records` does not hold are kept (whoever's they are:
///   they count for any later session of the client): its `Msg` may be in `S` (shards'
///   clocks are not causally ordered to the nanosecond). The cost: such a record whose
///   message had been dropped by an earlier compaction (a session that unsubscribed, then
///   acknowledged what was queued) stays until the next start-up drops it;
/// * a [`Record::Mark`] keeps the latest timestamp and every origin's next sequence.
pub fn compact_runtime(records: Vec<Record>) -> Vec<Record> {
    replay(records, Instant::now(), 0, true).compacted
}

fn replay(mut records: Vec<Record>, now: Instant, now_ns: u64, runtime: bool) -> Recovered {
    let mut out = Recovered::default();
    out.stats.records = records.len();
    records.sort_by_key(Record::ts);
    let mut sessions: BTreeMap<ByteString, Sess> = BTreeMap::new();
    let mut acks: HashSet<(ByteString, u64)> = HashSet::new();
    let mut sent: HashMap<(ByteString, u64), u16> = HashMap::new();
    let mut rel: HashSet<(ByteString, u64)> = HashSet::new();
    let mut msgs: Vec<Stored> = Vec::new();
    let mut retained: HashMap<String, Option<usize>> = HashMap::new();
    // The latest retained-flag message per topic (a delete when its payload is empty).
    let mut latest_retained: HashMap<String, usize> = HashMap::new();
    let to_instant = |ns: u64| -> Option<Instant> {
        (ns > now_ns).then(|| now + Duration::from_nanos(ns - now_ns))
    };
    for (i, r) in records.iter().enumerate() {
        out.max_ts = out.max_ts.max(r.ts());
        match r {
            Record::Msg {
                ts,
                sid,
                client,
                in_pid,
                expires,
                publish,
            } => {
                let next = out.next_seq.entry(sid_origin(*sid)).or_insert(1);
                *next = (*next).max(sid_seq(*sid) + 1);
                let Ok(p) = record::decode_publish(publish) else {
                    continue;
                };
                let expires_at = match *expires {
                    0 => None,
                    e => match to_instant(e) {
                        Some(t) => Some(t),
                        None => Some(now), // expired: kept out below
                    },
                };
                let msg = Message {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos,
                    retain: p.retain,
                    properties: (!p.properties.is_empty())
                        .then(|| std::sync::Arc::new(p.properties.into_inner())),
                    expires_at,
                    origin: client.clone(),
                    sid: *sid,
                };
                if msg.retain {
                    let slot = (!msg.payload.is_empty()).then_some(msgs.len());
                    retained.insert(msg.topic.as_str().to_string(), slot);
                    latest_retained.insert(msg.topic.as_str().to_string(), msgs.len());
                }
                if *in_pid != 0 {
                    if let Some(s) = sessions.get_mut(client) {
                        s.incoming.insert(*in_pid, *sid);
                    }
                }
                msgs.push(Stored {
                    ts: *ts,
                    msg,
                    rec: i,
                });
            }
            Record::Start {
                ts,
                client,
                clean,
                expiry,
            } => {
                let s = sessions.entry(client.clone()).or_default();
                if *clean || s.base_ts == 0 {
                    *s = Sess {
                        base_ts: *ts,
                        ..Sess::default()
                    };
                }
                s.expiry = *expiry;
                s.online = true;
                // A new connection cancels a pending will [MQTT-3.1.3-9] (or, on a clean
                // start, it was published: its message is a record of its own).
                s.will = None;
            }
            Record::Sub {
                ts,
                client,
                filter,
                options,
                sub_id,
            } => {
                if let Some(s) = sessions.get_mut(client) {
                    let e = s.subs.entry(filter.clone()).or_insert((0, 0, *ts));
                    e.0 = *options;
                    e.1 = *sub_id;
                }
            }
            Record::Unsub { client, filter, .. } => {
                if let Some(s) = sessions.get_mut(client) {
                    s.subs.remove(filter);
                }
            }
            Record::Disc { ts, client, expiry } => {
                if let Some(s) = sessions.get_mut(client) {
                    s.online = false;
                    s.offline_since = *ts;
                    s.expiry = *expiry;
                }
            }
            Record::End { client, .. } => {
                sessions.remove(client);
            }
            Record::Ack { client, sid, .. } => {
                acks.insert((client.clone(), *sid));
            }
            Record::Sent {
                client, sid, pid, ..
            } => {
                sent.insert((client.clone(), *sid), *pid);
            }
            Record::Rel { client, sid, .. } => {
                rel.insert((client.clone(), *sid));
            }
            Record::InRel { client, pid, .. } => {
                if let Some(s) = sessions.get_mut(client) {
                    s.incoming.remove(pid);
                }
            }
            Record::Will { client, .. } => {
                if let Some(s) = sessions.get_mut(client) {
                    s.will = Some(i);
                }
            }
            Record::WillGone { client, .. } => {
                if let Some(s) = sessions.get_mut(client) {
                    s.will = None;
                }
            }
            Record::Mark { next_seq, .. } => {
                for &(origin, next) in next_seq {
                    let e = out.next_seq.entry(usize::from(origin)).or_insert(1);
                    *e = (*e).max(next);
                }
            }
        }
    }
    out.stats.messages_stored = msgs.len();

    // Sessions that outlived their expiry while the broker was down are gone.
    let crash_ts = out.max_ts;
    let mut live: Vec<(ByteString, Sess, Option<Instant>)> = Vec::new();
    for (client, mut s) in sessions {
        if s.online && !runtime {
            s.online = false;
            s.offline_since = crash_ts;
        }
        let expires_at = if s.expiry == EXPIRY_NEVER || runtime {
            None
        } else {
            let deadline = s
                .offline_since
                .saturating_add(u64::from(s.expiry).saturating_mul(1_000_000_000));
            match to_instant(deadline) {
                Some(t) => Some(t),
                None => {
                    out.stats.sessions_expired += 1;
                    continue;
                }
            }
        };
        live.push((client, s, expires_at));
    }

    // Subscription tables: plain filters in a trie keyed by (session, filter number), shared
    // ones in a list (few).
    let routing_id = crate::routing::ShardId::new(0).expect("shard 0 exists");
    let mut plain: LocalSubscriptions<(u32, u32)> = LocalSubscriptions::new(routing_id);
    let mut since: Vec<Vec<u64>> = Vec::with_capacity(live.len());
    let mut groups: BTreeMap<String, Vec<Member>> = BTreeMap::new();
    for (si, (_, s, _)) in live.iter().enumerate() {
        let mut v = Vec::with_capacity(s.subs.len());
        for (fi, (f, &(opts, id, ts))) in s.subs.iter().enumerate() {
            v.push(ts);
            let Some(filter) = record::filter(f) else {
                continue;
            };
            if let Some(g) = filter.share_group() {
                let key = format!("{g}\u{0}{}", filter.filter());
                groups
                    .entry(key)
                    .or_default()
                    .push((si, filter, opts, id, ts));
                continue;
            }
            let sub = LocalSubscription {
                options: record::options_from(opts),
                subscription_id: (id != 0).then_some(id),
            };
            let _ = plain.subscribe(&filter, (si as u32, fi as u32), sub);
        }
        since.push(v);
    }

    let mut inflight: Vec<Vec<(u64, RecoveredDelivery)>> = vec![Vec::new(); live.len()];
    let mut queue: Vec<Vec<RecoveredDelivery>> = vec![Vec::new(); live.len()];
    let mut needed = vec![false; msgs.len()];
    let mut matches = Vec::new();
    for (mi, st) in msgs.iter().enumerate() {
        let m = &st.msg;
        if m.qos == QoS::AtMostOnce || (!runtime && m.is_expired(now)) {
            continue;
        }
        matches.clear();
        plain.match_plain_into(&m.topic, &mut matches);
        matches.sort_unstable_by_key(|((si, _), _)| *si);
        let mut k = 0;
        while k < matches.len() {
            let si = matches[k].0 .0 as usize;
            let mut q: Option<QoS> = None;
            let mut rap = false;
            let mut ids: SmallVec<[u32; 2]> = SmallVec::new();
            while k < matches.len() && matches[k].0 .0 as usize == si {
                let ((_, fi), sub) = matches[k];
                k += 1;
                if since[si][fi as usize] > st.ts {
                    continue; // subscribed after it was published
                }
                if runtime && !acks.contains(&(live[si].0.clone(), m.sid)) {
                    // A later SUBSCRIBE of this filter may raise its QoS or drop no-local.
                    needed[mi] = true;
                }
                if sub.options.no_local && m.origin == live[si].0 {
                    continue;
                }
                q = q.max(Some(sub.options.qos));
                rap |= sub.options.retain_as_published;
                if let Some(id) = sub.subscription_id {
                    ids.push(id);
                }
            }
            let Some(q) = q else { continue };
            let qos = m.qos.min(q);
            if qos == QoS::AtMostOnce {
                continue;
            }
            let client = &live[si].0;
            let key = (client.clone(), m.sid);
            if acks.contains(&key) {
                continue;
            }
            needed[mi] = true;
            place(
                &mut inflight[si],
                &mut queue[si],
                m,
                qos,
                rap && m.retain,
                ids,
                &sent,
                &rel,
                key,
            );
        }
        for members in groups.values() {
            let Some((_, gf, _, _, _)) = members.first() else {
                continue;
            };
            if !gf.matches(&m.topic) {
                continue;
            }
            if members
                .iter()
                .any(|(si, ..)| acks.contains(&(live[*si].0.clone(), m.sid)))
            {
                continue;
            }
            if runtime {
                needed[mi] = true; // a later `Sent` may pick any member
            }
            // Whoever had it in flight keeps it; otherwise the first member that was in the
            // group when it was published. Either was a member then: one that joined later
            // cannot have got it through the group (and a later join must not change what
            // a compacted log stands for).
            let pick = members
                .iter()
                .find(|(si, .., ts)| {
                    *ts <= st.ts && sent.contains_key(&(live[*si].0.clone(), m.sid))
                })
                .or_else(|| members.iter().find(|(.., ts)| *ts <= st.ts));
            let Some(&(si, _, opts, id, _)) = pick else {
                continue;
            };
            let qos = m.qos.min(record::options_from(opts).qos);
            if qos == QoS::AtMostOnce {
                continue;
            }
            needed[mi] = true;
            let key = (live[si].0.clone(), m.sid);
            let ids: SmallVec<[u32; 2]> = (id != 0).then_some(id).into_iter().collect();
            place(
                &mut inflight[si],
                &mut queue[si],
                m,
                qos,
                false,
                ids,
                &sent,
                &rel,
                key,
            );
        }
    }

    // Retained: the latest per topic, unexpired.
    let mut kept_retained: Vec<usize> = retained.values().flatten().copied().collect();
    kept_retained.sort_unstable();
    for &mi in &kept_retained {
        let m = &msgs[mi].msg;
        if !runtime && m.is_expired(now) {
            continue;
        }
        needed[mi] = true;
        out.retained.push(m.clone());
    }
    out.stats.retained = out.retained.len();

    // Sessions, and what a new generation needs to stand for them.
    let live_ids: HashSet<ByteString> = live.iter().map(|(c, ..)| c.clone()).collect();
    let sid_index: HashMap<u64, usize> = msgs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.msg.sid, i))
        .collect();
    // A kept message carries its publisher's QoS 2 id only while that id is unreleased: the
    // `InRel` that released it is not kept, and a stale id would make the client's next
    // PUBLISH with it look like a duplicate.
    let pending_in: HashSet<(ByteString, u16, u64)> = live
        .iter()
        .flat_map(|(c, s, _)| s.incoming.iter().map(|(&pid, &sid)| (c.clone(), pid, sid)))
        .collect();
    for (si, (client, s, expires_at)) in live.into_iter().enumerate() {
        for &sid in s.incoming.values() {
            if let Some(&mi) = sid_index.get(&sid) {
                needed[mi] = true;
            }
        }
        out.compacted.push(Record::Start {
            ts: s.base_ts,
            client: client.clone(),
            clean: true,
            expiry: s.expiry,
        });
        for (f, &(options, sub_id, ts)) in &s.subs {
            out.compacted.push(Record::Sub {
                ts,
                client: client.clone(),
                filter: f.clone(),
                options,
                sub_id,
            });
        }
        if let Some(wi) = s.will {
            out.compacted.push(records[wi].clone());
        }
        if !s.online {
            out.compacted.push(Record::Disc {
                ts: s.offline_since.max(s.base_ts),
                client: client.clone(),
                expiry: s.expiry,
            });
        }
        let mut infl = std::mem::take(&mut inflight[si]);
        infl.sort_by_key(|(order, _)| *order);
        out.stats.inflight += infl.len();
        out.stats.queued += queue[si].len();
        let subs = s.subs.iter().filter_map(|(f, &(o, id, _))| {
            Some((
                record::filter(f)?,
                Subscription {
                    options: record::options_from(o),
                    subscription_id: (id != 0).then_some(id),
                },
            ))
        });
        let mut state = SessionState::recovered(
            client.clone(),
            subs,
            infl.into_iter().map(|(_, d)| d),
            std::mem::take(&mut queue[si]),
            s.incoming.keys().copied(),
            s.expiry,
            expires_at,
        );
        if let Some(Record::Will {
            delay,
            listener,
            username,
            publish,
            ..
        }) = s.will.map(|wi| &records[wi])
        {
            // The connection was lost (a DISCONNECT or publication would have cleared it):
            // the will is due its delay after that, or when the session ends if sooner.
            // Already due: it goes out as soon as the broker runs.
            if let Ok(will) = record::decode_will(publish, *delay) {
                let since = s.offline_since.max(s.base_ts);
                let due_ns = since.saturating_add(u64::from(*delay).saturating_mul(1_000_000_000));
                let mut due = to_instant(due_ns).unwrap_or(now);
                if let Some(end) = expires_at {
                    due = due.min(end);
                }
                let auth = (*listener != record::NO_LISTENER).then(|| WillAuth {
                    listener: usize::from(*listener),
                    username: username.clone(),
                });
                state.set_recovered_will(will, due, auth);
                out.stats.wills += 1;
            }
        }
        out.sessions.push(state);
    }
    out.stats.sessions = out.sessions.len();
    // An older retained message kept for a queue or a QoS 2 id would be the topic's retained
    // message again without the delete (or the expired message) that replaced it: keep
    // that one too.
    let mut held: HashSet<&str> = HashSet::new();
    for (mi, st) in msgs.iter().enumerate() {
        let topic = st.msg.topic.as_str();
        if needed[mi] && st.msg.retain && latest_retained.get(topic) != Some(&mi) {
            held.insert(topic);
        }
    }
    for (topic, &mi) in &latest_retained {
        if held.contains(topic.as_str()) {
            needed[mi] = true;
        }
    }
    for (mi, st) in msgs.iter().enumerate() {
        if needed[mi] {
            let mut r = records[st.rec].clone();
            if let Record::Msg {
                client,
                in_pid,
                sid,
                ..
            } = &mut r
            {
                if *in_pid != 0 && !pending_in.contains(&(client.clone(), *in_pid, *sid)) {
                    *in_pid = 0;
                }
            }
            out.compacted.push(r);
        }
    }
    let kept_sid = |sid: &u64| sid_index.get(sid).is_some_and(|&mi| needed[mi]);
    for r in &records {
        let keep = match r {
            Record::Ack { client, sid, .. }
            | Record::Sent { client, sid, .. }
            | Record::Rel { client, sid, .. } => match sid_index.get(sid) {
                Some(_) => live_ids.contains(client) && kept_sid(sid),
                None => runtime,
            },
            _ => false,
        };
        if keep {
            out.compacted.push(r.clone());
        }
    }
    if runtime {
        let mut next_seq: Vec<(u16, u64)> =
            out.next_seq.iter().map(|(&o, &n)| (o as u16, n)).collect();
        next_seq.sort_unstable();
        out.compacted.push(Record::Mark {
            ts: out.max_ts,
            client: ByteString::new(),
            next_seq,
        });
    }
    out.compacted.sort_by_key(Record::ts);
    out
}

/// A `$share` group member: session index, filter, options byte, subscription id, since.
type Member = (usize, TopicFilter, u8, u32, u64);

#[allow(clippy::too_many_arguments)]
fn place(
    inflight: &mut Vec<(u64, RecoveredDelivery)>,
    queue: &mut Vec<RecoveredDelivery>,
    m: &Message,
    qos: QoS,
    retain: bool,
    sub_ids: SmallVec<[u32; 2]>,
    sent: &HashMap<(ByteString, u64), u16>,
    rel: &HashSet<(ByteString, u64)>,
    key: (ByteString, u64),
) {
    let pid = if qos == QoS::ExactlyOnce {
        sent.get(&key).copied()
    } else {
        None
    };
    let d = RecoveredDelivery {
        msg: m.clone(),
        qos,
        retain,
        sub_ids,
        packet_id: pid,
        released: rel.contains(&key),
    };
    match pid {
        Some(_) => inflight.push((inflight.len() as u64, d)),
        None => queue.push(d),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::codec::TopicName;
    use crate::session::InflightState;
    use bytes::Bytes;

    fn msg_rec(ts: u64, seq: u64, topic: &str, qos: QoS, retain: bool, body: &str) -> Record {
        let m = Message {
            topic: TopicName::new(ByteString::from(topic)).unwrap(),
            payload: Bytes::from(body.to_string()),
            qos,
            retain,
            properties: None,
            expires_at: None,
            origin: "pub".into(),
            sid: record::sid(1, seq),
        };
        Record::Msg {
            ts,
            sid: m.sid,
            client: "pub".into(),
            in_pid: 0,
            expires: 0,
            publish: record::encode_publish(&m),
        }
    }

    fn start(ts: u64, c: &str, clean: bool) -> Record {
        Record::Start {
            ts,
            client: c.into(),
            clean,
            expiry: EXPIRY_NEVER,
        }
    }

    fn sub(ts: u64, c: &str, f: &str, qos: u8) -> Record {
        Record::Sub {
            ts,
            client: c.into(),
            filter: f.into(),
            options: qos,
            sub_id: 0,
        }
    }

    fn bodies(s: &SessionState) -> Vec<String> {
        s.inflight
            .iter()
            .map(|f| &f.out.msg)
            .chain(s.queue.iter().map(|o| &o.msg))
            .map(|m| String::from_utf8_lossy(&m.payload).to_string())
            .collect()
    }

    #[test]
    fn unacknowledged_messages_are_requeued_once_in_order() {
        let now = Instant::now();
        let recs = vec![
            start(10, "s", false),
            sub(11, "s", "a/#", 1),
            msg_rec(5, 1, "a/x", QoS::AtLeastOnce, false, "before-sub"),
            msg_rec(12, 2, "a/x", QoS::AtLeastOnce, false, "m2"),
            msg_rec(13, 3, "a/x", QoS::AtLeastOnce, false, "m3"),
            msg_rec(14, 4, "b/x", QoS::AtLeastOnce, false, "other"),
            msg_rec(15, 5, "a/y", QoS::AtLeastOnce, false, "m5"),
            Record::Ack {
                ts: 16,
                client: "s".into(),
                sid: record::sid(1, 3),
            },
            Record::Disc {
                ts: 17,
                client: "s".into(),
                expiry: EXPIRY_NEVER,
            },
            msg_rec(18, 6, "a/z", QoS::AtMostOnce, true, "kept"),
            msg_rec(19, 7, "a/z", QoS::AtMostOnce, true, "latest"),
        ];
        // Any input order (shards' logs are merged by timestamp).
        let mut shuffled = recs.clone();
        shuffled.reverse();
        let r = rebuild(shuffled, now, 1_000);
        assert_eq!(r.sessions.len(), 1);
        assert_eq!(bodies(&r.sessions[0]), ["m2", "m5"]);
        assert_eq!(r.retained.len(), 1);
        assert_eq!(r.retained[0].payload.as_ref(), b"latest");
        assert_eq!(r.next_seq.get(&1), Some(&8));
        // The compacted records stand for the same state.
        let again = rebuild(r.compacted.clone(), now, 1_000);
        assert_eq!(bodies(&again.sessions[0]), ["m2", "m5"]);
        assert_eq!(again.retained[0].payload.as_ref(), b"latest");
    }

    #[test]
    fn qos2_in_flight_keeps_its_packet_id_and_clean_start_forgets() {
        let now = Instant::now();
        let recs = vec![
            start(1, "s", false),
            sub(2, "s", "q", 2),
            start(3, "gone", false),
            sub(4, "gone", "q", 2),
            msg_rec(5, 1, "q", QoS::ExactlyOnce, false, "released"),
            Record::Sent {
                ts: 6,
                client: "s".into(),
                sid: record::sid(1, 1),
                pid: 77,
            },
            Record::Rel {
                ts: 7,
                client: "s".into(),
                sid: record::sid(1, 1),
            },
            start(8, "gone", true),
            Record::End {
                ts: 9,
                client: "gone".into(),
            },
            Record::InRel {
                ts: 10,
                client: "s".into(),
                pid: 5,
            },
        ];
        let r = rebuild(recs, now, 1_000);
        assert_eq!(r.sessions.len(), 1, "the ended session is gone");
        let s = &r.sessions[0];
        assert_eq!(s.inflight.len(), 1);
        assert_eq!(s.inflight[0].packet_id, 77);
        assert_eq!(s.inflight[0].state, InflightState::AwaitingPubComp);
    }

    #[test]
    fn sessions_expire_while_down() {
        let now = Instant::now();
        let recs = vec![
            Record::Start {
                ts: 1,
                client: "short".into(),
                clean: true,
                expiry: 1,
            },
            Record::Disc {
                ts: 2,
                client: "short".into(),
                expiry: 1,
            },
            start(3, "long", true),
        ];
        // 10 s of wall time later.
        let r = rebuild(recs, now, 10_000_000_000);
        assert_eq!(r.sessions.len(), 1);
        assert_eq!(&**r.sessions[0].client_id(), "long");
        assert_eq!(r.stats.sessions_expired, 1);
    }

    fn will_rec(ts: u64, c: &str, delay: u32) -> Record {
        let w = crate::codec::LastWill {
            topic: TopicName::new(ByteString::from(format!("{c}/status"))).unwrap(),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: crate::codec::WillProperties {
                will_delay_interval: Some(delay),
                ..Default::default()
            },
        };
        Record::Will {
            ts,
            client: c.into(),
            delay,
            listener: record::NO_LISTENER,
            username: None,
            publish: record::encode_will(&w),
        }
    }

    #[test]
    fn a_will_with_delay_is_pending_after_a_restart_unless_it_went() {
        let now = Instant::now();
        let s = 1_000_000_000u64;
        let recs = vec![
            // Lost at 10 s (Disc), delay 30 s: due at 40 s; the broker restarts at 25 s.
            start(s, "lost", false),
            will_rec(s + 1, "lost", 30),
            Record::Disc {
                ts: 10 * s,
                client: "lost".into(),
                expiry: EXPIRY_NEVER,
            },
            // Connected when the broker died (no Disc): due its delay after the log's end.
            start(2 * s, "crashed", false),
            will_rec(2 * s + 1, "crashed", 60),
            // Published, or discarded by a DISCONNECT: gone.
            start(3 * s, "gone", false),
            will_rec(3 * s + 1, "gone", 5),
            Record::WillGone {
                ts: 4 * s,
                client: "gone".into(),
            },
            // A later connection cancelled it.
            start(5 * s, "back", false),
            will_rec(5 * s + 1, "back", 5),
            start(6 * s, "back", false),
            // The log ends at 20 s.
            Record::Ack {
                ts: 20 * s,
                client: "lost".into(),
                sid: 99,
            },
        ];
        let check = |r: &Recovered| {
            let due = |c: &str| {
                r.sessions
                    .iter()
                    .find(|x| &**x.client_id() == c)
                    .unwrap()
                    .pending_will
                    .as_ref()
                    .map(|w| w.due.duration_since(now).as_secs())
            };
            assert_eq!(due("lost"), Some(15), "10 s + 30 s, seen at 25 s");
            assert_eq!(due("crashed"), Some(55), "20 s + 60 s, seen at 25 s");
            assert_eq!(due("gone"), None);
            assert_eq!(due("back"), None);
            assert_eq!(r.stats.wills, 2);
        };
        let r = rebuild(recs, now, 25 * s);
        check(&r);
        let w = r
            .sessions
            .iter()
            .find(|x| &**x.client_id() == "lost")
            .unwrap();
        let pw = w.pending_will.as_ref().unwrap();
        assert_eq!(pw.will.payload.as_ref(), b"offline");
        assert_eq!(pw.will.properties.will_delay_interval, Some(30));
        // Compaction keeps the wills (and the crashed session's disconnect time).
        let again = rebuild(r.compacted.clone(), now, 25 * s);
        check(&again);
    }

    /// What a rebuild decided, in a form two rebuilds can be compared by.
    pub(crate) fn digest(r: &Recovered) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut sessions: Vec<&SessionState> = r.sessions.iter().collect();
        sessions.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        for s in sessions {
            let mut subs: Vec<String> = s
                .subscriptions
                .iter()
                .map(|(f, o)| format!("{}={:?}", f.as_str(), o))
                .collect();
            subs.sort();
            let mut incoming: Vec<u16> = s.incoming_qos2.iter().copied().collect();
            incoming.sort_unstable();
            let will = s.pending_will.as_ref().map(|w| {
                (
                    w.due,
                    w.will.topic.as_str().to_string(),
                    w.will.properties.will_delay_interval,
                )
            });
            let _ = writeln!(
                out,
                "session {} expiry {} expires {:?} subs {subs:?} incoming {incoming:?} will \
                 {will:?}",
                s.client_id, s.session_expiry, s.expires_at
            );
            for f in &s.inflight {
                let _ = writeln!(
                    out,
                    "  inflight {} {:?} {} {:?} {} {:?}",
                    f.packet_id, f.state, f.out.msg.sid, f.out.qos, f.out.retain, f.out.sub_ids
                );
            }
            for o in &s.queue {
                let _ = writeln!(
                    out,
                    "  queued {} {:?} {} {:?} {:?}",
                    o.msg.sid, o.qos, o.retain, o.sub_ids, o.msg.expires_at
                );
            }
        }
        let mut retained: Vec<(String, u64)> = r
            .retained
            .iter()
            .map(|m| (m.topic.as_str().to_string(), m.sid))
            .collect();
        retained.sort();
        let mut seqs: Vec<(usize, u64)> = r.next_seq.iter().map(|(&a, &b)| (a, b)).collect();
        seqs.sort_unstable();
        let _ = writeln!(
            out,
            "retained {retained:?}\nnext_seq {seqs:?}\nmax_ts {}\nexpired {}",
            r.max_ts, r.stats.sessions_expired
        );
        out
    }

    /// xorshift64*: seeded, no crate.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        /// A generator for test seed `seed` (spread over the state; never 0).
        pub fn seeded(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const SEC: u64 = 1_000_000_000;

    /// A random history: a few clients, overlapping filters (one `$share` group), QoS 0-2,
    /// retained sets and deletes, QoS 2 ids, expiring sessions and messages, acknowledgements
    /// of messages that exist, do not exist yet, or never will. Timestamps are distinct and
    /// increasing (in seconds-ish steps so that expiry matters), returned in order.
    pub(crate) fn random_history(rng: &mut Rng, n: usize) -> Vec<Record> {
        let clients = ["c0", "c1", "c2", "c3"];
        let filters = ["a/+", "a/b", "#", "b", "$share/g/a/#"];
        let topics = ["a/b", "a/c", "b"];
        let mut ts = SEC;
        let mut seq = 0u64;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            ts += 1 + rng.below(SEC / 2);
            let c: ByteString = clients[rng.below(4) as usize].into();
            let any_sid = |rng: &mut Rng, seq: u64| {
                // Mostly a message that exists, sometimes one later in the log.
                record::sid(1 + rng.below(2) as usize, 1 + rng.below(seq + 3))
            };
            let r = match rng.below(22) {
                0..=5 => {
                    seq += 1;
                    let qos = match rng.below(3) {
                        0 => QoS::AtMostOnce,
                        1 => QoS::AtLeastOnce,
                        _ => QoS::ExactlyOnce,
                    };
                    let retain = rng.below(4) == 0;
                    let body = if retain && rng.below(3) == 0 { "" } else { "x" };
                    let origin = 1 + rng.below(2) as usize;
                    let m = Message {
                        topic: TopicName::new(ByteString::from(topics[rng.below(3) as usize]))
                            .unwrap(),
                        payload: Bytes::from(body),
                        qos,
                        retain,
                        properties: None,
                        expires_at: None,
                        origin: c.clone(),
                        sid: record::sid(origin, seq),
                    };
                    Record::Msg {
                        ts,
                        sid: m.sid,
                        client: c,
                        in_pid: if qos == QoS::ExactlyOnce && rng.below(2) == 0 {
                            1 + rng.below(3) as u16
                        } else {
                            0
                        },
                        expires: if rng.below(5) == 0 {
                            ts + rng.below(20 * SEC)
                        } else {
                            0
                        },
                        publish: record::encode_publish(&m),
                    }
                }
                6 | 7 => Record::Start {
                    ts,
                    client: c,
                    clean: rng.below(3) == 0,
                    expiry: if rng.below(2) == 0 {
                        EXPIRY_NEVER
                    } else {
                        rng.below(10) as u32
                    },
                },
                8..=10 => Record::Sub {
                    ts,
                    client: c,
                    filter: filters[rng.below(5) as usize].into(),
                    options: (rng.below(3) as u8) | if rng.below(4) == 0 { 4 } else { 0 },
                    sub_id: rng.below(3) as u32,
                },
                11 => Record::Unsub {
                    ts,
                    client: c,
                    filter: filters[rng.below(5) as usize].into(),
                },
                12 | 13 => Record::Disc {
                    ts,
                    client: c,
                    expiry: if rng.below(2) == 0 {
                        EXPIRY_NEVER
                    } else {
                        rng.below(10) as u32
                    },
                },
                14 => Record::End { ts, client: c },
                15 | 16 => Record::Ack {
                    ts,
                    client: c,
                    sid: any_sid(rng, seq),
                },
                17 => Record::Sent {
                    ts,
                    client: c,
                    sid: any_sid(rng, seq),
                    pid: 1 + rng.below(5) as u16,
                },
                18 => Record::Rel {
                    ts,
                    client: c,
                    sid: any_sid(rng, seq),
                },
                19 => Record::InRel {
                    ts,
                    client: c,
                    pid: 1 + rng.below(3) as u16,
                },
                20 => will_rec(ts, &c, 1 + rng.below(20) as u32),
                _ => Record::WillGone { ts, client: c },
            };
            out.push(r);
        }
        out
    }

    /// The runtime compaction property: for a history cut anywhere, compacting the part up to
    /// the cut (once, or in several steps, each step's input holding the previous output)
    /// and recovering from that plus the rest rebuilds exactly what recovering from the
    /// whole history does, at any later start-up time.
    #[test]
    fn runtime_compaction_is_invisible_to_any_later_recovery() {
        let now = Instant::now();
        for seed in 1..3000u64 {
            let mut rng = Rng::seeded(seed);
            let n = 5 + rng.below(120) as usize;
            let all = random_history(&mut rng, n);
            let last_ts = all.last().map_or(0, Record::ts);
            let now_ns = last_ts + rng.below(15 * SEC);
            let want = digest(&rebuild(all.clone(), now, now_ns));
            // One to three compactions at increasing cuts.
            let mut cuts: Vec<usize> = (0..1 + rng.below(3))
                .map(|_| rng.below(n as u64 + 1) as usize)
                .collect();
            cuts.sort_unstable();
            let mut compacted: Vec<Record> = Vec::new();
            let mut done = 0;
            for &cut in &cuts {
                let mut input = std::mem::take(&mut compacted);
                input.extend_from_slice(&all[done..cut]);
                compacted = compact_runtime(input);
                done = cut;
            }
            let mut again = compacted.clone();
            again.extend_from_slice(&all[done..]);
            // The shards' logs come in any order.
            again.reverse();
            let got = digest(&rebuild(again, now, now_ns));
            assert_eq!(got, want, "seed {seed}: cuts {cuts:?} of {n}");
            assert!(
                compacted.len() <= done + 1,
                "seed {seed}: compaction grew the log"
            );
        }
    }

    /// Start-up compaction treats the end as a crash; runtime compaction must not: an online
    /// session stays online (its offline time is the log's end, whenever that comes), and a
    /// session whose expiry passed on the wall clock is kept (the broker ends it itself).
    #[test]
    fn runtime_compaction_keeps_online_sessions_online() {
        let recs = vec![
            Record::Start {
                ts: SEC,
                client: "on".into(),
                clean: true,
                expiry: 5,
            },
            Record::Start {
                ts: SEC + 1,
                client: "off".into(),
                clean: true,
                expiry: 5,
            },
            Record::Disc {
                ts: SEC + 2,
                client: "off".into(),
                expiry: 5,
            },
        ];
        let c = compact_runtime(recs);
        assert!(
            !c.iter()
                .any(|r| matches!(r, Record::Disc { client, .. } if client == "on")),
            "{c:?}"
        );
        assert!(c
            .iter()
            .any(|r| matches!(r, Record::Disc { client, .. } if client == "off")));
        // Later, the online one disconnects at 100 s: it expires 5 s after that, not 5 s
        // after the compaction.
        let mut later = c.clone();
        later.push(Record::Disc {
            ts: 100 * SEC,
            client: "on".into(),
            expiry: 5,
        });
        let r = rebuild(later, Instant::now(), 103 * SEC);
        let ids: Vec<&str> = r.sessions.iter().map(|s| &**s.client_id()).collect();
        assert_eq!(ids, ["on"]);
        assert_eq!(r.stats.sessions_expired, 1);
    }

    /// Start-up compaction, by the same measure: the next generation's log rebuilds what the
    /// old one did (the sessions, queues and retained set; the clock and sequences are
    /// carried by the driver instead).
    #[test]
    fn startup_compaction_rebuilds_the_same_state() {
        let now = Instant::now();
        let strip = |d: String| -> String {
            d.lines()
                .filter(|l| {
                    !l.starts_with("next_seq")
                        && !l.starts_with("max_ts")
                        && !l.starts_with("expired")
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        for seed in 1..3000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
            let n = 5 + rng.below(120) as usize;
            let all = random_history(&mut rng, n);
            let now_ns = all.last().map_or(0, Record::ts) + rng.below(15 * SEC);
            let first = rebuild(all, now, now_ns);
            let again = rebuild(first.compacted.clone(), now, now_ns);
            assert_eq!(strip(digest(&again)), strip(digest(&first)), "seed {seed}");
        }
    }
}
