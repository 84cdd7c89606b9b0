//! The persistent half of a session: what survives a network connection and is shipped between
//! shards on takeover.
//!
//! Owns: [`SessionState`] and the outgoing-message bookkeeping inside it (inflight window
//! entries, the bounded queue, packet-id allocation). Must not touch: per-connection state
//! (keepalive, topic aliases, the peer's limits) — that lives in `Session` and is rebuilt from
//! each CONNECT. Everything here is `Send` (refcounted `Bytes`/`Arc`, no `Rc`).

use std::collections::VecDeque;
use std::time::Instant;

use ahash::{AHashMap, AHashSet};
use bytestring::ByteString;
use smallvec::SmallVec;

use crate::codec::{LastWill, QoS, SubscriptionOptions, TopicFilter};
use crate::message::Message;

/// Session expiry interval meaning "never expires" (MQTT 5 §3.1.2.11.2).
pub const EXPIRY_NEVER: u32 = u32::MAX;

/// One subscription as granted: options (QoS already capped) and the v5 subscription id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    pub options: SubscriptionOptions,
    pub subscription_id: Option<u32>,
}

/// A message on its way to this client, before a packet id is attached.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub msg: Message,
    /// Effective QoS: min(published, granted).
    pub qos: QoS,
    /// RETAIN flag to send (already resolved from retain-as-published / retained delivery).
    pub retain: bool,
    /// v5 subscription identifiers to attach [MQTT-3.3.4-3].
    pub sub_ids: SmallVec<[u32; 2]>,
}

/// Where an outgoing QoS 1/2 message stands in its acknowledgement flow (MQTT 5 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// QoS 1 PUBLISH sent, waiting for PUBACK.
    AwaitingPubAck,
    /// QoS 2 PUBLISH sent, waiting for PUBREC.
    AwaitingPubRec,
    /// PUBREL sent, waiting for PUBCOMP (the message itself is released).
    AwaitingPubComp,
}

#[derive(Debug, Clone)]
pub(crate) struct Inflight {
    pub packet_id: u16,
    pub state: InflightState,
    pub out: Outgoing,
    /// Carried over from an earlier connection and not yet re-sent on this one (re-sends
    /// wait for room in this connection's window).
    pub resend: bool,
}

/// One message of a session rebuilt from the persistent log.
#[derive(Debug, Clone)]
pub struct RecoveredDelivery {
    pub msg: Message,
    /// min(published, granted).
    pub qos: QoS,
    pub retain: bool,
    pub sub_ids: SmallVec<[u32; 2]>,
    /// QoS 2 in flight: the packet id it was first sent with.
    pub packet_id: Option<u16>,
    pub released: bool,
}

impl RecoveredDelivery {
    fn outgoing(self) -> Outgoing {
        Outgoing {
            msg: self.msg,
            qos: self.qos,
            retain: self.retain,
            sub_ids: self.sub_ids,
        }
    }
}

/// A will whose delay is running after the connection closed [MQTT-3.1.3-9].
#[derive(Debug, Clone)]
pub(crate) struct PendingWill {
    pub will: Box<LastWill>,
    pub due: Instant,
    /// Whom the ACL checks when it is published, for a will rebuilt from the persistent log
    /// (a live session's will is checked with its connection's identity instead).
    pub auth: Option<WillAuth>,
}

/// The identity a recovered will is published under: its listener and username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillAuth {
    pub listener: usize,
    pub username: Option<ByteString>,
}

/// The exportable, `Send` persistent state of one client's session (MQTT 5 §4.1).
///
/// Obtained with `Session::into_state` and given back to `Session::accept` on the next
/// connection of the same client id (possibly on another shard).
#[derive(Debug, Clone)]
pub struct SessionState {
    pub(crate) client_id: ByteString,
    pub(crate) subscriptions: AHashMap<TopicFilter, Subscription>,
    /// Outgoing QoS 1/2 messages with a packet id, in the order they were first sent (the
    /// order they must be re-sent in, MQTT 5 §4.6).
    pub(crate) inflight: VecDeque<Inflight>,
    /// Messages waiting for room in the inflight window or for the client to come back.
    pub(crate) queue: VecDeque<Outgoing>,
    pub(crate) queued_bytes: usize,
    /// Client packet ids of QoS 2 PUBLISHes already routed, waiting for PUBREL.
    pub(crate) incoming_qos2: AHashSet<u16>,
    pub(crate) next_packet_id: u16,
    /// Seconds; [`EXPIRY_NEVER`] never expires, 0 ends with the connection.
    pub(crate) session_expiry: u32,
    pub(crate) pending_will: Option<PendingWill>,
    /// Set while no connection is attached and the session expiry is finite.
    pub(crate) expires_at: Option<Instant>,
}

impl SessionState {
    pub(crate) fn new(client_id: ByteString) -> Self {
        SessionState {
            client_id,
            subscriptions: AHashMap::new(),
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            incoming_qos2: AHashSet::new(),
            next_packet_id: 1,
            session_expiry: 0,
            pending_will: None,
            expires_at: None,
        }
    }

    pub fn client_id(&self) -> &ByteString {
        &self.client_id
    }

    /// A will the persistent log says was pending: published at `due` (or when the session
    /// ends, if sooner) unless a connection resumes the session first.
    pub fn set_recovered_will(&mut self, will: LastWill, due: Instant, auth: Option<WillAuth>) {
        self.pending_will = Some(PendingWill {
            will: Box::new(will),
            due,
            auth,
        });
    }

    /// The identity a recovered pending will is checked with (see [`WillAuth`]).
    pub fn recovered_will_auth(&self) -> Option<&WillAuth> {
        self.pending_will.as_ref().and_then(|w| w.auth.as_ref())
    }

    /// A session rebuilt from the persistent log (`crate::store`): its subscriptions, the
    /// messages it had in flight (QoS 2 ones with the packet id they were first sent with;
    /// `released`: the client answered PUBREC, so a PUBREL is re-sent), the messages still
    /// to deliver in order, and the client's unreleased QoS 2 packet ids. It starts offline.
    #[allow(clippy::too_many_arguments)]
    pub fn recovered(
        client_id: ByteString,
        subscriptions: impl IntoIterator<Item = (TopicFilter, Subscription)>,
        inflight: impl IntoIterator<Item = RecoveredDelivery>,
        queue: impl IntoIterator<Item = RecoveredDelivery>,
        incoming_qos2: impl IntoIterator<Item = u16>,
        session_expiry: u32,
        expires_at: Option<Instant>,
    ) -> SessionState {
        let mut s = SessionState::new(client_id);
        s.subscriptions = subscriptions.into_iter().collect();
        for d in inflight {
            let Some(pid) = d.packet_id else {
                s.push_queued(d.outgoing());
                continue;
            };
            let state = if d.released {
                InflightState::AwaitingPubComp
            } else {
                InflightState::AwaitingPubRec
            };
            s.inflight.push_back(Inflight {
                packet_id: pid,
                state,
                out: d.outgoing(),
                resend: false,
            });
        }
        for d in queue {
            s.push_queued(d.outgoing());
        }
        s.incoming_qos2 = incoming_qos2.into_iter().collect();
        s.session_expiry = session_expiry;
        s.expires_at = expires_at;
        if let Some(max) = s.inflight.iter().map(|f| f.packet_id).max() {
            s.next_packet_id = if max == u16::MAX { 1 } else { max + 1 };
        }
        s
    }

    /// The subscriptions to remove from (or add to) a shard's local table when the state
    /// leaves (or arrives at) it.
    pub fn subscriptions(&self) -> impl Iterator<Item = (&TopicFilter, &Subscription)> {
        self.subscriptions.iter()
    }

    /// Outgoing QoS 1/2 messages sent and not yet fully acknowledged.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Messages held for later delivery.
    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }

    /// Bytes (topic + payload) held for later delivery.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The session expiry interval in seconds ([`EXPIRY_NEVER`] = never).
    pub fn session_expiry_interval(&self) -> u32 {
        self.session_expiry
    }

    /// When the runtime may drop this (offline) session; `None` = never or still connected.
    pub fn expiry_deadline(&self) -> Option<Instant> {
        self.expires_at
    }

    /// Next free packet id: never 0, skipping ids still held by an unacknowledged
    /// message (MQTT 5 §2.2.1), wrapping 65535 → 1. The caller guarantees a free id exists
    /// (the inflight window is below 65535). Linear in the window, which is small by design.
    pub(crate) fn alloc_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.iter().any(|f| f.packet_id == id) {
                return id;
            }
        }
    }

    pub(crate) fn inflight_position(&self, packet_id: u16) -> Option<usize> {
        // Clients acknowledge in order [MQTT-4.6.0-2], so the match is nearly always in front.
        self.inflight.iter().position(|f| f.packet_id == packet_id)
    }

    pub(crate) fn pop_queued(&mut self) -> Option<Outgoing> {
        let out = self.queue.pop_front()?;
        self.queued_bytes -= out.msg.queued_size();
        Some(out)
    }

    pub(crate) fn push_queued(&mut self, out: Outgoing) {
        self.queued_bytes += out.msg.queued_size();
        self.queue.push_back(out);
    }

    /// The will still waiting on its delay, as a message to route now: a session discarded by a
    /// clean start ends, and "delay passed or session ended, whichever first" [MQTT-3.1.3-9].
    pub fn take_pending_will(&mut self, now: Instant) -> Option<Message> {
        let pw = self.pending_will.take()?;
        Some(super::will_message(&self.client_id, *pw.will, now))
    }

    /// Keep only the outgoing messages `keep` accepts (the shard core re-checks a resumed
    /// session's messages against the new connection's read access, as mosquitto's
    /// `connection_check_acl` does); returns how many were dropped. Call before the state is
    /// resumed. Queued messages and in-flight ones the client has not received yet (awaiting
    /// PUBACK or PUBREC) are checked; a QoS 2 message the client already acknowledged with
    /// PUBREC is with the client, so only its PUBREL is left and it stays (mosquitto drops it
    /// too, leaving the client's packet id hanging).
    pub fn retain_outgoing(&mut self, mut keep: impl FnMut(&Message) -> bool) -> usize {
        let before = self.queue.len() + self.inflight.len();
        let mut freed = 0;
        self.queue.retain(|o| {
            let k = keep(&o.msg);
            if !k {
                freed += o.msg.queued_size();
            }
            k
        });
        self.queued_bytes -= freed;
        self.inflight
            .retain(|f| f.state == InflightState::AwaitingPubComp || keep(&f.out.msg));
        before - self.queue.len() - self.inflight.len()
    }

    /// Drop queued messages whose expiry passed [MQTT-3.3.2-5]; returns how many.
    pub(crate) fn purge_expired(&mut self, now: Instant) -> usize {
        let before = self.queue.len();
        let mut freed = 0;
        self.queue.retain(|o| {
            let keep = !o.msg.is_expired(now);
            if !keep {
                freed += o.msg.queued_size();
            }
            keep
        });
        self.queued_bytes -= freed;
        before - self.queue.len()
    }
}
