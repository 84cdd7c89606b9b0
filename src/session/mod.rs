//! Sans-IO per-client MQTT session state machine (server side).
//!
//! Owns: everything one client's session needs between "the runtime accepted this CONNECT" and
//! "drop the session": the CONNACK, QoS 1/2 flows in both directions, packet ids, the outgoing
//! inflight window and bounded queue, topic aliases both ways, keepalive, the will (with v5
//! delay), session expiry, SUBSCRIBE/UNSUBSCRIBE bookkeeping. Must not touch: sockets, bytes,
//! glommio, rustls, authentication, the routing tables — it never sees bytes (the runtime
//! decodes/encodes with `crate::codec`) and never reads a clock (time comes in as `Instant`).
//!
//! # Contract (modelled on quinn-proto's `Connection`)
//!
//! * **Create**: the runtime decodes CONNECT, authenticates, checks
//!   [`SessionConfig::check_connect`], resolves takeover, generates a client id if the client
//!   sent an empty one, and calls [`Session::accept`] with the previous [`SessionState`] if it
//!   has one. The CONNACK is the first packet from [`Session::poll_transmit`]; on resume it is
//!   followed by the re-sent unacknowledged PUBLISHes (DUP=1, original ids) and PUBRELs
//!   [MQTT-4.4.0-1], in their original order and as far as the new connection's window allows
//!   (the rest follow as acks arrive), then queued messages.
//! * **Input**: [`Session::handle_packet`] for every decoded packet, [`Session::handle_timeout`]
//!   whenever `now >= poll_timeout()`, [`Session::deliver`] / [`Session::deliver_retained`]
//!   from the router, [`Session::connection_lost`] when the socket dies without DISCONNECT,
//!   [`Session::disconnect`] when the server kicks the client (takeover 0x8E, shutdown 0x8B).
//! * **Output** — after every input, drain both queues:
//!   - [`Session::poll_transmit`]: packets to encode and write, in order.
//!   - [`Session::poll_event`]: [`SessionEvent`]s for the runtime/router.
//!   - [`Session::poll_timeout`]: when to call `handle_timeout` next.
//! * **Close**: every way a connection ends emits exactly one [`SessionEvent::Close`], followed
//!   by `Will` if the will is due now and, if the session ends with the connection,
//!   `Unsubscribe`… and `Ended`. If the
//!   session sent a DISCONNECT (v5 only) it is the last packet in `poll_transmit`: flush the
//!   transmit queue, then close the socket. A protocol violation returns `Err` from
//!   `handle_packet` *and* has already done all of this (DISCONNECT queued, will handled,
//!   Close emitted); the `Err` is for logging. Packets handed in after Close are ignored.
//! * **Offline**: after Close the `Session` stays usable offline: `deliver` queues QoS 1/2
//!   (QoS 0 only if `queue_qos0_offline`), timers still run (will delay, session expiry).
//!   When the session ends (expiry reached, or at close if the expiry interval is 0) it emits
//!   `Unsubscribe` for each of its filters, then [`SessionEvent::Ended`]; drop it then.
//! * **Takeover / reconnect**: `disconnect(0x8E)` (if still connected), drain, then
//!   [`Session::into_state`] gives the `Send` persistent state to ship to the shard that
//!   accepts the new connection. The exporting shard removes `state.subscriptions()` from its
//!   local table itself; the importing session re-announces them as
//!   `Subscribe { resumed: true, .. }` (update tables only, send no retained messages).
//!
//! The router's local subscriber table is maintained exactly from `Subscribe`/`Unsubscribe`.
//!
//! # Policies (where the spec leaves a choice)
//!
//! * Outgoing window = min(client's Receive Maximum, `max_inflight`) for v5, `max_inflight`
//!   for v3. QoS 0 bypasses the window and the queue while connected.
//! * Queue full (count or bytes): the new message is dropped and reported as
//!   [`DropReason::QueueFull`] (mosquitto's policy); queued messages are never evicted.
//! * Outgoing topic aliases: the first N distinct topics (N = client's Topic Alias Maximum)
//!   of a connection keep their alias for its life; topics of 3 bytes or less get none.
//! * Expired queued messages are dropped when dequeued and on each `handle_timeout`; they do
//!   not arm a timer of their own. Inflight messages are re-sent even if expired (delivery
//!   had started).
//! * PUBACK/PUBREC are sent as soon as a PUBLISH is accepted (before routing); a v5 PUBACK
//!   never says 0x10 "no matching subscribers".
//! * Authorization is not the session's: [`Session::handle_packet_checked`] asks a
//!   [`PublishCheck`] (a pure hook the shard core answers from its ACL) once per PUBLISH,
//!   after topic aliases are resolved and before anything is acknowledged. A refused
//!   PUBLISH is answered as mosquitto 2.0.11 answers it (src/handle_publish.c
//!   `process_bad_message`): QoS 0 dropped; QoS 1 PUBACK, QoS 2 PUBREC, with 0x87 in v5 and
//!   plain in 3.1.1 (which has no reason codes; a 3.1.1 PUBREL then gets its PUBCOMP); never
//!   routed, retained or remembered.
//!
//! Reason strings are only ever put on the DISCONNECT of a protocol violation (the spec allows
//! that whatever Request Problem Information says [MQTT-3.1.2-29]), so that property needs no
//! state here.

mod state;
#[cfg(test)]
mod tests;

pub use state::{
    InflightState, RecoveredDelivery, SessionState, Subscription, WillAuth, EXPIRY_NEVER,
};

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytestring::ByteString;
use thiserror::Error;

use crate::codec::{
    AckProperties, ConnAck, ConnAckProperties, Connect, Disconnect, LastWill, Packet,
    ProtocolVersion, PubResp, Publish, PublishProperties, QoS, ReasonCode, SubAck, Subscribe,
    SubscriptionOptions, TopicFilter, TopicName, UnsubAck, Unsubscribe,
};
use crate::message::Message;
use state::{Inflight, Outgoing, PendingWill};

/// A will in its own allocations: it lives as long as the connection, and the CONNECT it came
/// in shares a read buffer that would otherwise stay pinned.
fn detached_will(w: &LastWill) -> LastWill {
    let p = &w.properties;
    let s = |v: &ByteString| ByteString::from(&**v);
    LastWill {
        topic: w.topic.detached(),
        payload: bytes::Bytes::copy_from_slice(&w.payload),
        qos: w.qos,
        retain: w.retain,
        properties: crate::codec::WillProperties {
            will_delay_interval: p.will_delay_interval,
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            content_type: p.content_type.as_ref().map(s),
            response_topic: p.response_topic.as_ref().map(TopicName::detached),
            correlation_data: p
                .correlation_data
                .as_ref()
                .map(|b| bytes::Bytes::copy_from_slice(b)),
            user_properties: p
                .user_properties
                .iter()
                .map(|(k, v)| (s(k), s(v)))
                .collect(),
        },
    }
}

/// Largest packet the protocol can express: 268,435,455 bytes of body plus a 5-byte header.
const PROTOCOL_MAX_PACKET_SIZE: u32 = 268_435_455 + 5;

/// Most packets a session keeps waiting in `poll_transmit` before QoS 0 deliveries to it are
/// dropped and retained messages wait for the client to drain (QoS 1/2 are bounded by the
/// inflight window and queue): one subscriber that does not read must not grow memory.
pub const MAX_PENDING_TRANSMIT: usize = 1000;

/// Topics only the broker may publish to (mosquitto's `acl__check_dollar`): `$SYS…` (its
/// statistics) and `$share…` (not a topic name but the shared-subscription prefix). A client's
/// PUBLISH there is refused (v5: PUBACK/PUBREC 0x87) and neither routed nor retained; a will
/// there is never published.
pub fn is_broker_only_topic(topic: &str) -> bool {
    topic.starts_with("$SYS") || topic.starts_with("$share")
}

/// Whether this client may publish to a topic: the shard core's authorization, asked by the
/// session once per PUBLISH (topic alias resolved, before any acknowledgement). A pure hook:
/// it answers from memory and must not call back into the session.
pub trait PublishCheck {
    fn allow_publish(&mut self, topic: &TopicName, qos: QoS, retain: bool) -> bool;
}

/// The check that allows everything ([`Session::handle_packet`]).
pub struct AllowAll;

impl PublishCheck for AllowAll {
    #[inline]
    fn allow_publish(&mut self, _: &TopicName, _: QoS, _: bool) -> bool {
        true
    }
}

/// Server-side limits, one copy per listener (mosquitto option names in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Our Receive Maximum for client→server QoS 1/2 (v5) and the cap on server→client
    /// inflight messages; the v5 send window is min(this, the client's Receive Maximum), as
    /// EMQX does, so memory per session stays bounded. 0 = 65535. [`max_inflight_messages`]
    pub max_inflight: u16,
    /// QoS 1/2 messages held beyond the inflight window. 0 = no limit (not recommended).
    /// When full, new messages are dropped (mosquitto's policy). [`max_queued_messages`]
    pub max_queued_messages: usize,
    /// Bytes (topic + payload) held in the queue; 0 = no limit. [`max_queued_bytes`]
    pub max_queued_bytes: usize,
    /// Largest packet we accept; the runtime passes it to the decoder's `Limits`, and v5
    /// clients learn it from CONNACK. [`max_packet_size`]
    pub max_packet_size: u32,
    /// Topic aliases a v5 client may use towards us; 0 disables them.
    pub topic_alias_maximum: u16,
    /// v5 clients asking for a longer keepalive (or none) are told this one in CONNACK's
    /// Server Keep Alive; v3 clients asking for more are refused. 0 = no limit.
    /// [`max_keepalive`]
    pub max_keepalive: u16,
    /// [`retain_available`]
    pub retain_available: bool,
    /// Highest QoS granted or accepted. [`max_qos`]
    pub maximum_qos: QoS,
    /// Cap on the session expiry interval in seconds, also for v3 persistent sessions;
    /// `None` = never forced. [`persistent_client_expiration`]
    pub max_session_expiry: Option<u32>,
    /// Queue QoS 0 messages for offline persistent clients. [`queue_qos0_messages`]
    pub queue_qos0_offline: bool,
    pub shared_subscriptions_available: bool,
    pub subscription_identifiers_available: bool,
    pub wildcard_subscriptions_available: bool,
    /// Most subscriptions one session may hold (each costs a route on every shard); a
    /// SUBSCRIBE for a new filter beyond it is refused with 0x97 (3.1.1: 0x80). Replacing an
    /// existing subscription is always allowed. 0 = no limit. [`max_subscriptions_per_client`]
    pub max_subscriptions: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        // mosquitto 2.0 defaults, except topic aliases (mosquitto: 10 as well).
        SessionConfig {
            max_inflight: 20,
            max_queued_messages: 1000,
            max_queued_bytes: 0,
            max_packet_size: PROTOCOL_MAX_PACKET_SIZE,
            topic_alias_maximum: 10,
            max_keepalive: 65_535,
            retain_available: true,
            maximum_qos: QoS::ExactlyOnce,
            max_session_expiry: None,
            queue_qos0_offline: false,
            shared_subscriptions_available: true,
            subscription_identifiers_available: true,
            wildcard_subscriptions_available: true,
            max_subscriptions: 10_000,
        }
    }
}

impl SessionConfig {
    /// Checks a CONNECT against these limits before it is accepted; `Err` is the CONNACK
    /// reason code to refuse with (the codec maps it to a v3 return code).
    pub fn check_connect(&self, connect: &Connect) -> Result<(), ReasonCode> {
        if let Some(will) = &connect.will {
            if will.qos > self.maximum_qos {
                return Err(ReasonCode::QOS_NOT_SUPPORTED); // MQTT 5 §3.2.2.3.4
            }
            if will.retain && !self.retain_available {
                return Err(ReasonCode::RETAIN_NOT_SUPPORTED); // MQTT 5 §3.2.2.3.5
            }
        }
        // v3 has no Server Keep Alive to negotiate with; mosquitto refuses with "identifier
        // rejected" (return code 2 = 0x85).
        if !connect.protocol.is_v5()
            && self.max_keepalive != 0
            && connect.keep_alive > self.max_keepalive
        {
            return Err(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        }
        Ok(())
    }

    /// The decoder limits that go with this configuration (oversize packets are refused
    /// before buffering; the runtime answers v5 clients with DISCONNECT 0x95).
    pub fn decode_limits(&self) -> crate::codec::Limits {
        crate::codec::Limits {
            max_packet_size: self.max_packet_size,
        }
    }

    fn receive_maximum(&self) -> u16 {
        if self.max_inflight == 0 {
            u16::MAX
        } else {
            self.max_inflight
        }
    }

    fn cap_expiry(&self, requested: u32) -> u32 {
        self.max_session_expiry
            .map_or(requested, |max| requested.min(max))
    }
}

/// A client broke the protocol: send `reason` in a v5 DISCONNECT and close. By the time the
/// caller sees this, the session has already queued the DISCONNECT and emitted `Close`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{reason}: {detail}")]
pub struct ProtocolViolation {
    pub reason: ReasonCode,
    /// What was wrong, citing the spec clause.
    pub detail: &'static str,
}

fn violation(reason: ReasonCode, detail: &'static str) -> ProtocolViolation {
    ProtocolViolation { reason, detail }
}

/// Why a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT with this reason (0x04 = publish the will).
    ClientDisconnect(ReasonCode),
    /// The client broke the protocol; a v5 client was sent DISCONNECT with this reason.
    ProtocolViolation(ReasonCode),
    /// Nothing received within 1.5 × keepalive ([MQTT-3.1.2-22]; 3.1.1: [MQTT-3.1.2-24]); v5 got DISCONNECT 0x8D.
    KeepAliveTimeout,
    /// The runtime called [`Session::disconnect`] (takeover, shutdown, administrative).
    Server(ReasonCode),
    /// The runtime called [`Session::connection_lost`].
    ConnectionLost,
}

/// What the session asks of the runtime and router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// Route this message (topic alias already resolved; a QoS 2 message appears once).
    Publish(Message),
    /// Add/replace the subscription in the local table. Retained messages are the session's
    /// own business: it asks for them with [`Session::next_retained_request`] (per
    /// `options.retain_handling` — 0: always, 1: only if `!existed`, 2: never — and never for
    /// `resumed`, which only re-announces a subscription carried over in a resumed
    /// `SessionState`).
    Subscribe {
        filter: TopicFilter,
        options: SubscriptionOptions,
        subscription_id: Option<u32>,
        existed: bool,
        resumed: bool,
    },
    /// Remove the subscription from the local table (UNSUBSCRIBE, or the session ended).
    Unsubscribe { filter: TopicFilter },
    /// Route the client's will message now.
    Will(Message),
    /// The connection is over: flush `poll_transmit`, then close the socket.
    Close { reason: CloseReason },
    /// The session ended (expired, or closed with expiry 0): drop the `Session`.
    Ended,
    /// Something the operator may want to hear about; the runtime logs it (peer text
    /// escaped). Nothing to act on.
    Notice(Notice),
}

/// See [`SessionEvent::Notice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Filters of one SUBSCRIBE were refused in its SUBACK: `too_deep` had more than
    /// [`crate::routing::MAX_FILTER_LEVELS`] levels (0x8F), `over_limit` would have exceeded
    /// `max_subscriptions` (0x97). `first` is the first refused filter. One per packet.
    SubscribeRefused {
        too_deep: usize,
        over_limit: usize,
        first: TopicFilter,
    },
    /// A PUBLISH to a broker-only topic ([`is_broker_only_topic`]) was refused.
    BrokerOnlyTopic { topic: TopicName },
}

/// Result of offering a message to this session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// A PUBLISH was queued on `poll_transmit`.
    Sent,
    /// Held in the session queue (inflight window full or client offline).
    Queued,
    /// Not delivered; the runtime counts these.
    Dropped(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The subscriber is the publisher and asked for no-local [MQTT-3.8.3-3] (not a loss).
    NoLocal,
    /// The message expiry interval has passed [MQTT-3.3.2-5].
    Expired,
    /// Larger than the client's Maximum Packet Size [MQTT-3.1.2-25].
    PacketTooLarge,
    /// The queue is at `max_queued_messages` or `max_queued_bytes`.
    QueueFull,
    /// QoS 0 for an offline client (`queue_qos0_offline` is off), or the session ended.
    Offline,
}

/// Per-connection state, rebuilt from each CONNECT.
#[derive(Debug)]
struct Conn {
    version: ProtocolVersion,
    /// 1.5 × keepalive ([MQTT-3.1.2-22]; 3.1.1: [MQTT-3.1.2-24]); `None` when keepalive is 0.
    keepalive_grace: Option<Duration>,
    last_rx: Instant,
    /// Max outgoing QoS 1/2 unacknowledged (see `SessionConfig::max_inflight`).
    send_window: usize,
    /// Carried-over inflight entries not yet re-sent on this connection.
    resend_pending: usize,
    client_max_packet_size: Option<u32>,
    client_alias_max: u16,
    out_aliases: AHashMap<TopicName, u16>,
    next_out_alias: u16,
    /// Index = alias - 1; allocated on first use.
    in_aliases: Vec<Option<TopicName>>,
    /// [MQTT-3.14.2-2]: expiry 0 at CONNECT may not become non-zero at DISCONNECT.
    connect_expiry_zero: bool,
    /// Boxed: most devices have no will, and an inline one would double the session's size.
    will: Option<Box<LastWill>>,
}

enum AliasUse {
    None,
    Existing(TopicName),
    New(TopicName),
}

impl Conn {
    fn keepalive_deadline(&self) -> Option<Instant> {
        self.keepalive_grace.map(|g| self.last_rx + g)
    }

    /// Outgoing topic alias: the first `client_alias_max` distinct topics get one, for the
    /// life of the connection (simple, no eviction; the spec allows any policy).
    fn apply_alias(&mut self, p: &mut Publish) -> AliasUse {
        // An alias costs 3 bytes; topics that short gain nothing.
        if self.client_alias_max == 0 || p.topic.len() <= 3 {
            return AliasUse::None;
        }
        if let Some(&a) = self.out_aliases.get(&p.topic) {
            p.properties.topic_alias = Some(a);
            let topic = std::mem::replace(&mut p.topic, TopicName::alias_placeholder());
            return AliasUse::Existing(topic);
        }
        if self.next_out_alias <= self.client_alias_max {
            let a = self.next_out_alias;
            self.next_out_alias += 1;
            // Copied, for the same reason: the message's topic points into its publisher's
            // read buffer.
            self.out_aliases.insert(p.topic.detached(), a);
            p.properties.topic_alias = Some(a);
            return AliasUse::New(p.topic.clone());
        }
        AliasUse::None
    }

    fn undo_alias(&mut self, p: &mut Publish, used: AliasUse) {
        p.properties.take_topic_alias();
        match used {
            AliasUse::None => {}
            AliasUse::Existing(topic) => p.topic = topic,
            AliasUse::New(topic) => {
                self.out_aliases.remove(&topic);
                self.next_out_alias -= 1;
            }
        }
    }
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn secs(s: u32) -> Duration {
    Duration::from_secs(u64::from(s))
}

fn has_delay(w: &LastWill) -> bool {
    w.properties.will_delay_interval.unwrap_or(0) > 0
}

/// The will as a routable message; its expiry starts when it is published.
fn will_message(client_id: &ByteString, will: LastWill, now: Instant) -> Message {
    let p = will.properties;
    let expires_at = p.message_expiry_interval.map(|s| now + secs(s));
    let props = PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        content_type: p.content_type,
        ..PublishProperties::default()
    };
    Message {
        topic: will.topic,
        payload: will.payload,
        qos: will.qos,
        retain: will.retain,
        properties: (!props.is_empty()).then(|| Arc::new(props)),
        expires_at,
        origin: client_id.clone(),
        sid: 0,
    }
}

/// One client's session: persistent state plus, while connected, the connection's state.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: SessionState,
    conn: Option<Conn>,
    transmit: VecDeque<Packet>,
    events: VecDeque<SessionEvent>,
    /// Retained messages due to this connection because of its SUBSCRIBEs, not yet sent:
    /// filters whose messages the runtime has not looked up yet (in order, each at most once
    /// while waiting), and messages looked up but not yet in `transmit` / the window.
    retained_requests: VecDeque<TopicFilter>,
    retained_waiting: ahash::AHashSet<TopicFilter>,
    retained_backlog: VecDeque<Outgoing>,
    ended: bool,
    /// Spec citation of a violation being closed on, for the DISCONNECT reason string.
    detail: Option<&'static str>,
    /// The queue may grow past `max_queued_*` (up to [`Session::queue_hard_limit`]): set by the
    /// shard core while this subscriber is live and making progress, so an acknowledged
    /// message is never dropped for it; the core pauses the publishers feeding it instead.
    overflow: bool,
    /// Delivery notes for the persistent log (`None`: this session is not journaled).
    journal: Option<Vec<Note>>,
    /// Packet id of the last QoS 2 PUBLISH accepted from the client (0 after QoS 0/1).
    last_in_pid: u16,
}

/// What a journaled session tells the persistent log about its QoS 1/2 flows (drained by
/// the shard core with [`Session::take_notes`]). `sid` is the message's `Message::sid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// A QoS 2 message was first sent with packet id `pid` (a re-send must keep it).
    Sent { sid: u64, pid: u16 },
    /// The client answered PUBREC: only PUBREL/PUBCOMP is left for it.
    Released { sid: u64 },
    /// Delivery is over (PUBACK, PUBCOMP, refused, or discarded as too large).
    Done { sid: u64 },
    /// The client released its QoS 2 packet id `pid` (PUBREL).
    InRel { pid: u16 },
    /// The will the log holds (one with a delay, see [`Session::durable_will`]) is gone:
    /// published, or discarded by a normal DISCONNECT.
    WillGone,
}

/// Pushes onto a session queue (`transmit`, `events`), which mostly holds one item at a time:
/// the first push allocates one slot, not the four a `VecDeque` takes on its first push (a
/// packet is 104 bytes, an event 144). An idle device then keeps one packet slot (PINGRESP).
fn push_one_slot<T>(q: &mut VecDeque<T>, item: T) {
    if q.capacity() == 0 {
        q.reserve_exact(1);
    }
    q.push_back(item);
}

impl Session {
    /// Starts a session for an accepted CONNECT. `client_id` is the effective id: the
    /// CONNECT's, or one the runtime generated when it was empty (then a v5 CONNACK carries it
    /// as Assigned Client Identifier). `previous` is the state of an earlier session with this
    /// id: resumed if `clean_start` is false, otherwise discarded (firing its pending will).
    pub fn accept(
        config: &SessionConfig,
        connect: &Connect,
        client_id: ByteString,
        previous: Option<SessionState>,
        now: Instant,
    ) -> Session {
        debug_assert!(previous.as_ref().is_none_or(|p| p.client_id == client_id));
        let version = connect.protocol;
        let v5 = version.is_v5();
        let props = &connect.properties;
        let mut events = VecDeque::new();

        let (mut state, session_present) = match previous {
            Some(mut prev) if !connect.clean_start => {
                // A new connection before the will delay ran out cancels it [MQTT-3.1.3-9].
                prev.pending_will = None;
                prev.expires_at = None;
                (prev, true)
            }
            prev => {
                // The old session ends now: a will still waiting on its delay goes out
                // ("delay passed or session ended, whichever first" [MQTT-3.1.3-9]).
                if let Some(pw) = prev.and_then(|p| p.pending_will) {
                    events.push_back(SessionEvent::Will(will_message(&client_id, *pw.will, now)));
                }
                (SessionState::new(client_id.clone()), false)
            }
        };

        let requested_expiry = if v5 {
            props.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            EXPIRY_NEVER
        };
        state.session_expiry = config.cap_expiry(requested_expiry);

        let mut keep_alive = connect.keep_alive;
        let mut server_keep_alive = None;
        if v5 && config.max_keepalive != 0 && (keep_alive == 0 || keep_alive > config.max_keepalive)
        {
            keep_alive = config.max_keepalive;
            server_keep_alive = Some(keep_alive);
        }

        let our_window = usize::from(config.receive_maximum());
        let send_window = if v5 {
            usize::from(props.receive_maximum.unwrap_or(u16::MAX).max(1)).min(our_window)
        } else {
            our_window
        };

        let conn = Conn {
            version,
            keepalive_grace: (keep_alive != 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            last_rx: now,
            send_window,
            resend_pending: 0,
            client_max_packet_size: if v5 { props.maximum_packet_size } else { None },
            client_alias_max: if v5 {
                props.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
            out_aliases: AHashMap::new(),
            next_out_alias: 1,
            in_aliases: Vec::new(),
            connect_expiry_zero: requested_expiry == 0,
            // mosquitto never publishes a will to a broker-only topic (its ACL check at
            // sending time denies it); keeping it would only cost memory.
            will: connect
                .will
                .as_ref()
                .filter(|w| !is_broker_only_topic(w.topic.as_str()))
                .map(|w| Box::new(detached_will(w))),
        };

        let mut ack = ConnAckProperties::default();
        if v5 {
            if connect.client_id.is_empty() {
                ack.assigned_client_identifier = Some(client_id.clone());
            }
            if state.session_expiry != requested_expiry {
                ack.session_expiry_interval = Some(state.session_expiry);
            }
            if config.receive_maximum() != u16::MAX {
                ack.receive_maximum = Some(config.receive_maximum());
            }
            if config.max_packet_size < PROTOCOL_MAX_PACKET_SIZE {
                ack.maximum_packet_size = Some(config.max_packet_size);
            }
            if config.topic_alias_maximum > 0 {
                ack.topic_alias_maximum = Some(config.topic_alias_maximum);
            }
            // Absent means "available" for these; only say so when not.
            if !config.retain_available {
                ack.retain_available = Some(false);
            }
            if config.maximum_qos < QoS::ExactlyOnce {
                ack.maximum_qos = Some(config.maximum_qos);
            }
            ack.server_keep_alive = server_keep_alive;
            if !config.wildcard_subscriptions_available {
                ack.wildcard_subscription_available = Some(false);
            }
            if !config.subscription_identifiers_available {
                ack.subscription_identifiers_available = Some(false);
            }
            if !config.shared_subscriptions_available {
                ack.shared_subscription_available = Some(false);
            }
        }

        let mut session = Session {
            config: *config,
            state,
            conn: Some(conn),
            transmit: VecDeque::new(),
            events,
            retained_requests: VecDeque::new(),
            retained_waiting: ahash::AHashSet::new(),
            retained_backlog: VecDeque::new(),
            ended: false,
            detail: None,
            overflow: false,
            journal: None,
            last_in_pid: 0,
        };
        session.push_transmit(Packet::ConnAck(Box::new(ConnAck {
            session_present,
            reason: ReasonCode::SUCCESS,
            properties: ack,
        })));
        if session_present {
            for (filter, sub) in &session.state.subscriptions {
                session.events.push_back(SessionEvent::Subscribe {
                    filter: filter.clone(),
                    options: sub.options,
                    subscription_id: sub.subscription_id,
                    existed: true,
                    resumed: true,
                });
            }
            // Re-send what the client has not acknowledged, then queued messages, as the
            // window allows.
            for f in &mut session.state.inflight {
                f.resend = true;
            }
            if let Some(conn) = session.conn.as_mut() {
                conn.resend_pending = session.state.inflight.len();
            }
            session.fill_window(now);
        }
        session
    }

    pub fn client_id(&self) -> &ByteString {
        &self.state.client_id
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Protocol version of the current connection.
    pub fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.conn.as_ref().map(|c| c.version)
    }

    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// When an offline session expires (`handle_timeout` then ends it); `None` while connected
    /// or when it never expires.
    pub fn expiry_deadline(&self) -> Option<Instant> {
        if self.conn.is_some() || self.ended {
            None
        } else {
            self.state.expires_at
        }
    }

    /// The persistent state, to resume on another connection. `None` if the session ended.
    /// Close the connection first (`disconnect`/`connection_lost`) and drain the events.
    pub fn into_state(self) -> Option<SessionState> {
        (!self.ended).then_some(self.state)
    }

    /// Heap bytes held by the session's queues (not its subscriptions or in-flight state).
    pub fn queue_memory(&self) -> usize {
        use std::mem::size_of;
        self.transmit.capacity() * size_of::<Packet>()
            + self.events.capacity() * size_of::<SessionEvent>()
            + self.retained_backlog.capacity() * size_of::<Outgoing>()
            + self.retained_requests.capacity() * size_of::<TopicFilter>()
            + self.retained_waiting.capacity() * size_of::<TopicFilter>()
    }

    /// Queues a packet to send (one slot on the first push, see [`push_one_slot`]).
    fn push_transmit(&mut self, p: Packet) {
        push_one_slot(&mut self.transmit, p);
    }

    /// Queues an event for the runtime (one slot on the first push, see [`push_one_slot`]).
    fn push_event(&mut self, e: SessionEvent) {
        push_one_slot(&mut self.events, e);
    }

    /// Give back the memory of empty queues (the shard core calls this each time the
    /// session's keepalive or expiry timer comes due, so idle sessions stay small).
    pub fn shrink_idle(&mut self) {
        if self.transmit.is_empty() {
            self.transmit.shrink_to_fit();
        }
        if self.events.is_empty() {
            self.events.shrink_to_fit();
        }
        if self.retained_backlog.is_empty() {
            self.retained_backlog.shrink_to_fit();
        }
        self.release_retained_requests();
    }

    /// Gives back the retained-request queue and its set once no request is left.
    fn release_retained_requests(&mut self) {
        if self.retained_requests.is_empty()
            && (self.retained_requests.capacity() > 0 || self.retained_waiting.capacity() > 0)
        {
            self.retained_requests.shrink_to_fit();
            self.retained_waiting.shrink_to_fit();
        }
    }

    /// Packets waiting in `poll_transmit` (the runtime bounds QoS 0 to slow readers by it).
    pub fn pending_transmit(&self) -> usize {
        self.transmit.len()
    }

    pub fn poll_transmit(&mut self) -> Option<Packet> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// The next instant `handle_timeout` has work: keepalive, will delay, session expiry.
    /// (Expired queued messages are purged lazily, on dequeue and in `handle_timeout`.)
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ended {
            return None;
        }
        let keepalive = self.conn.as_ref().and_then(Conn::keepalive_deadline);
        let will = self.state.pending_will.as_ref().map(|w| w.due);
        min_opt(min_opt(keepalive, will), self.expiry_deadline())
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        if let Some(deadline) = self.conn.as_ref().and_then(Conn::keepalive_deadline) {
            if now >= deadline {
                self.close(
                    CloseReason::KeepAliveTimeout,
                    Some(ReasonCode::KEEP_ALIVE_TIMEOUT),
                    true,
                    now,
                );
            }
        }
        if self
            .state
            .pending_will
            .as_ref()
            .is_some_and(|w| w.due <= now)
        {
            self.fire_pending_will(now);
        }
        if self.expiry_deadline().is_some_and(|t| t <= now) {
            self.end_session(now);
            return;
        }
        // While connected the queue drains and skips expired entries itself; offline, free
        // their memory now.
        if self.conn.is_none() {
            self.state.purge_expired(now);
        }
    }

    /// The server ends the connection (takeover 0x8E, shutdown 0x8B, ...): v5 clients get a
    /// DISCONNECT with `reason`; the will is published (after its delay) as for any close the
    /// client did not ask for.
    pub fn disconnect(&mut self, reason: ReasonCode, now: Instant) {
        self.close(CloseReason::Server(reason), Some(reason), true, now);
    }

    /// The network connection closed without DISCONNECT: publish the will (MQTT 5 §3.1.2.5).
    pub fn connection_lost(&mut self, now: Instant) {
        self.close(CloseReason::ConnectionLost, None, true, now);
        // Nothing can be written any more; unacknowledged messages are in `inflight`.
        self.transmit.clear();
    }

    /// Handles one packet from the client. See the module doc for what `Err` means.
    pub fn handle_packet(&mut self, packet: Packet, now: Instant) -> Result<(), ProtocolViolation> {
        self.handle_packet_checked(packet, now, &mut AllowAll)
    }

    /// [`Session::handle_packet`], asking `check` whether a PUBLISH may be accepted (see the
    /// module doc for how a refusal is answered).
    pub fn handle_packet_checked<C: PublishCheck>(
        &mut self,
        packet: Packet,
        now: Instant,
        check: &mut C,
    ) -> Result<(), ProtocolViolation> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        // Any packet counts for keepalive (MQTT 5 §3.1.2.10).
        conn.last_rx = now;
        let result = match packet {
            Packet::Publish(p) => self.on_publish(p, now, check),
            Packet::PubAck(r) => {
                self.on_puback(r.packet_id, now);
                Ok(())
            }
            Packet::PubRec(r) => {
                self.on_pubrec(r, now);
                Ok(())
            }
            Packet::PubRel(r) => {
                self.on_pubrel(r.packet_id);
                Ok(())
            }
            Packet::PubComp(r) => {
                self.on_pubcomp(r.packet_id, now);
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(u);
                Ok(())
            }
            Packet::PingReq => {
                self.push_transmit(Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => self.on_disconnect(d, now),
            Packet::Connect(_) => Err(violation(
                ReasonCode::PROTOCOL_ERROR,
                "second CONNECT on a connection [MQTT-3.1.0-2]",
            )),
            Packet::Auth(_) => Err(violation(
                ReasonCode::PROTOCOL_ERROR,
                "AUTH without an Authentication Method in CONNECT (MQTT 5 §4.12)",
            )),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "server-to-client packet sent by a client",
                ))
            }
        };
        if let Err(v) = &result {
            self.detail = Some(v.detail);
            self.close(
                CloseReason::ProtocolViolation(v.reason),
                Some(v.reason),
                true,
                now,
            );
        }
        result
    }

    /// Offers a message that matched one of this client's subscriptions. `options` are the
    /// matching subscription's (granted) options, `subscription_ids` the identifiers to attach
    /// (v5 [MQTT-3.3.4-3]). With overlapping subscriptions the router may call this once per
    /// matching subscription (one copy each, mosquitto's behaviour) or once with the highest
    /// granted QoS and all their identifiers; the session does not care.
    pub fn deliver(
        &mut self,
        msg: &Message,
        options: SubscriptionOptions,
        subscription_ids: &[u32],
        now: Instant,
    ) -> DeliveryOutcome {
        if options.no_local && msg.origin == self.state.client_id {
            return DeliveryOutcome::Dropped(DropReason::NoLocal);
        }
        // RETAIN is cleared on normal forwarding unless retain-as-published [MQTT-3.3.1-12/13].
        let retain = options.retain_as_published && msg.retain;
        self.offer(msg, options.qos, retain, subscription_ids, now)
    }

    /// Offers a retained message because of a new subscription: always RETAIN=1
    /// (3.1.1: [MQTT-3.3.1-8]). `options`: the new subscription's options. It joins the
    /// retained backlog, which goes out as the client drains: QoS 0 while fewer than
    /// [`MAX_PENDING_TRANSMIT`] packets wait to be written, QoS 1/2 as the inflight window has
    /// room (never dropped for a full queue). Only while connected.
    pub fn deliver_retained(
        &mut self,
        msg: &Message,
        options: SubscriptionOptions,
        subscription_ids: &[u32],
        now: Instant,
    ) -> DeliveryOutcome {
        if self.ended || self.conn.is_none() {
            return DeliveryOutcome::Dropped(DropReason::Offline);
        }
        if msg.is_expired(now) {
            return DeliveryOutcome::Dropped(DropReason::Expired);
        }
        self.retained_backlog.push_back(Outgoing {
            msg: msg.clone(),
            qos: msg.qos.min(options.qos),
            retain: true,
            sub_ids: subscription_ids.into(),
        });
        self.fill_retained(now);
        DeliveryOutcome::Queued
    }

    /// The next filter whose retained messages the runtime should look up (in the retained
    /// store) and hand to [`Session::deliver_retained`], with the subscription's current
    /// options and identifier. Only offered when the backlog is empty and the client can take
    /// more, so at most one filter's worth of retained messages waits here at a time.
    pub fn next_retained_request(
        &mut self,
    ) -> Option<(TopicFilter, SubscriptionOptions, Option<u32>)> {
        if self.conn.is_none()
            || !self.retained_backlog.is_empty()
            || self.transmit.len() >= MAX_PENDING_TRANSMIT
        {
            return None;
        }
        while let Some(filter) = self.retained_requests.pop_front() {
            if !self.retained_waiting.remove(&filter) {
                continue; // unsubscribed meanwhile
            }
            if let Some(sub) = self.state.subscriptions.get(&filter) {
                return Some((filter, sub.options, sub.subscription_id));
            }
        }
        // All asked for: SUBSCRIBE-time memory (~280 bytes per device) need not wait for the
        // next keepalive check.
        self.release_retained_requests();
        None
    }

    /// Retained messages still to be sent because of SUBSCRIBEs (looked up or not).
    pub fn retained_pending(&self) -> bool {
        !self.retained_backlog.is_empty() || !self.retained_requests.is_empty()
    }

    /// Move retained messages from the backlog to `transmit` / the window while the bounds
    /// allow (live traffic queued for the window goes first). The session does this itself
    /// as the window opens; the runtime calls it when the client has drained `transmit`.
    pub fn fill_retained(&mut self, now: Instant) {
        while let Some(qos) = self.retained_backlog.front().map(|o| o.qos) {
            let Some(conn) = self.conn.as_ref() else {
                return;
            };
            if self.transmit.len() >= MAX_PENDING_TRANSMIT {
                return;
            }
            if qos != QoS::AtMostOnce
                && (!self.state.queue.is_empty()
                    || conn.resend_pending > 0
                    || self.state.inflight.len() >= conn.send_window)
            {
                return;
            }
            let Some(out) = self.retained_backlog.pop_front() else {
                return;
            };
            if out.msg.is_expired(now) {
                continue;
            }
            if out.qos == QoS::AtMostOnce {
                // Too large for the client: discarded as if sent [MQTT-3.1.2-25].
                self.emit_publish(&out, 0, false, now);
            } else {
                self.send_inflight(out, now);
            }
        }
    }

    fn offer(
        &mut self,
        msg: &Message,
        granted: QoS,
        retain: bool,
        sub_ids: &[u32],
        now: Instant,
    ) -> DeliveryOutcome {
        if self.ended {
            return DeliveryOutcome::Dropped(DropReason::Offline);
        }
        if msg.is_expired(now) {
            return DeliveryOutcome::Dropped(DropReason::Expired);
        }
        let out = Outgoing {
            msg: msg.clone(),
            qos: msg.qos.min(granted),
            retain,
            sub_ids: sub_ids.into(),
        };
        let Some(conn) = self.conn.as_ref() else {
            if out.qos == QoS::AtMostOnce && !self.config.queue_qos0_offline {
                return DeliveryOutcome::Dropped(DropReason::Offline);
            }
            return self.enqueue(out);
        };
        // Too large is decided here, on the plain topic-name form, so the runtime can count
        // it; the alias form chosen at send time falls back to this one if it is larger.
        if let Some(max) = conn.client_max_packet_size {
            let probe = build_publish(
                &out,
                u16::from(out.qos != QoS::AtMostOnce),
                false,
                now,
                conn.version,
            );
            if crate::codec::encoded_len(&Packet::Publish(probe), conn.version) > max as usize {
                return DeliveryOutcome::Dropped(DropReason::PacketTooLarge);
            }
        }
        if out.qos == QoS::AtMostOnce {
            // QoS 0 is not subject to the window (MQTT 5 §4.9), so it is not held behind it.
            self.emit_publish(&out, 0, false, now);
            return DeliveryOutcome::Sent;
        }
        // Anything already waiting (queued, or carried over and not yet re-sent) goes first.
        if self.state.queue.is_empty()
            && conn.resend_pending == 0
            && self.state.inflight.len() < conn.send_window
        {
            self.send_inflight(out, now);
            DeliveryOutcome::Sent
        } else {
            self.enqueue(out)
        }
    }

    fn enqueue(&mut self, out: Outgoing) -> DeliveryOutcome {
        let size = out.msg.queued_size();
        let (count_limit, bytes_limit) = if self.overflow && self.conn.is_some() {
            self.queue_hard_limit()
        } else {
            (
                self.config.max_queued_messages,
                self.config.max_queued_bytes,
            )
        };
        let full_count = count_limit != 0 && self.state.queue.len() >= count_limit;
        let full_bytes = bytes_limit != 0 && self.state.queued_bytes + size > bytes_limit;
        if full_count || full_bytes {
            // mosquitto's policy: keep what is queued, drop the newcomer.
            return DeliveryOutcome::Dropped(DropReason::QueueFull);
        }
        self.state.push_queued(out);
        DeliveryOutcome::Queued
    }

    /// Keep delivery notes for the persistent log (see [`Note`]).
    pub fn set_journal(&mut self, on: bool) {
        self.journal = on.then(Vec::new);
    }

    pub fn journaled(&self) -> bool {
        self.journal.is_some()
    }

    /// Move the notes kept since the last call to `out`.
    pub fn take_notes(&mut self, out: &mut Vec<Note>) {
        if let Some(j) = self.journal.as_mut() {
            out.append(j);
        }
    }

    /// The connection's will, if the persistent log must hold it: one with a delay, which
    /// may still be due after a restart (a will without one is published when the connection
    /// is lost, or never).
    pub fn durable_will(&self) -> Option<&LastWill> {
        self.conn
            .as_ref()
            .and_then(|c| c.will.as_deref())
            .filter(|w| has_delay(w))
    }

    /// The client's packet id of the last QoS 2 PUBLISH accepted (0 after QoS 0/1).
    pub fn last_in_pid(&self) -> u16 {
        self.last_in_pid
    }

    fn note(&mut self, n: Note) {
        if let Some(j) = self.journal.as_mut() {
            let sid = match n {
                Note::Sent { sid, .. } | Note::Released { sid } | Note::Done { sid } => sid,
                Note::InRel { .. } | Note::WillGone => 1,
            };
            if sid != 0 {
                j.push(n);
            }
        }
    }

    /// Let the queue grow past `max_queued_*` while connected (see the `overflow` field).
    pub fn set_queue_overflow(&mut self, allow: bool) {
        self.overflow = allow;
    }

    /// The last-resort bound of an overflowing queue, `(messages, bytes)` (0 = none): four
    /// times the configured limits plus 4096 messages. Reaching it means the publishers were
    /// not paused in time; what arrives then is dropped and counted as queue-full.
    pub fn queue_hard_limit(&self) -> (usize, usize) {
        Session::hard_limit_for(&self.config)
    }

    /// [`Session::queue_hard_limit`] for a configuration.
    pub fn hard_limit_for(c: &SessionConfig) -> (usize, usize) {
        let count = if c.max_queued_messages == 0 {
            0
        } else {
            c.max_queued_messages.saturating_mul(4).saturating_add(4096)
        };
        let bytes = c.max_queued_bytes.saturating_mul(4);
        (count, bytes)
    }

    /// The queue is at or past `max_queued_messages` / `max_queued_bytes`.
    pub fn queue_congested(&self) -> bool {
        let c = &self.config;
        (c.max_queued_messages != 0 && self.state.queue.len() >= c.max_queued_messages)
            || (c.max_queued_bytes != 0 && self.state.queued_bytes >= c.max_queued_bytes)
    }

    /// The queue drained to half its limits or less: publishers paused on its account may
    /// resume (the gap between the two marks keeps them from flapping).
    pub fn queue_relieved(&self) -> bool {
        let c = &self.config;
        (c.max_queued_messages == 0 || self.state.queue.len() <= c.max_queued_messages / 2)
            && (c.max_queued_bytes == 0 || self.state.queued_bytes <= c.max_queued_bytes / 2)
    }

    /// Answers a SUBSCRIBE without subscribing: every filter gets `reason` (v3: 0x80). The
    /// shard core uses it when it cannot take new subscriptions (a peer shard's backlog is
    /// too long), so nothing is granted that routing cannot carry out.
    pub fn refuse_subscribe(&mut self, s: &Subscribe, reason: ReasonCode) {
        self.push_transmit(Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            reason_codes: vec![reason; s.filters.len()],
            properties: AckProperties::default(),
        }));
    }

    /// An offline session rebuilt from shipped state whose new connection went away before
    /// it could start (the state must not be lost: it is kept here, offline, until it expires
    /// or its client returns).
    pub fn offline(config: &SessionConfig, state: SessionState) -> Session {
        Session {
            config: *config,
            state,
            conn: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            ended: false,
            detail: None,
            overflow: false,
            journal: None,
            last_in_pid: 0,
            retained_backlog: VecDeque::new(),
            retained_requests: VecDeque::new(),
            retained_waiting: Default::default(),
        }
    }

    /// Allocates a packet id and sends a QoS 1/2 message into the window.
    fn send_inflight(&mut self, out: Outgoing, now: Instant) {
        let packet_id = self.state.alloc_packet_id();
        let sid = out.msg.sid;
        if !self.emit_publish(&out, packet_id, false, now) {
            self.note(Note::Done { sid });
        } else {
            let state = if out.qos == QoS::AtLeastOnce {
                InflightState::AwaitingPubAck
            } else {
                self.note(Note::Sent {
                    sid,
                    pid: packet_id,
                });
                InflightState::AwaitingPubRec
            };
            self.state.inflight.push_back(Inflight {
                packet_id,
                state,
                out,
                resend: false,
            });
        }
    }

    /// Builds the PUBLISH (alias, expiry, sub ids) and queues it for transmit. Returns false
    /// when it exceeds the client's Maximum Packet Size: then it is discarded as if sent
    /// [MQTT-3.1.2-25].
    fn emit_publish(&mut self, out: &Outgoing, packet_id: u16, dup: bool, now: Instant) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let mut p = build_publish(out, packet_id, dup, now, conn.version);
        let alias = conn.apply_alias(&mut p);
        if let Some(max) = conn.client_max_packet_size {
            let max = max as usize;
            let mut packet = Packet::Publish(p);
            if crate::codec::encoded_len(&packet, conn.version) > max {
                if let Packet::Publish(p) = &mut packet {
                    conn.undo_alias(p, alias);
                }
                if crate::codec::encoded_len(&packet, conn.version) > max {
                    return false;
                }
            }
            self.push_transmit(packet);
        } else {
            self.push_transmit(Packet::Publish(p));
        }
        true
    }

    /// Fills the window while it has room: first PUBLISH/PUBREL re-sends carried over from
    /// an earlier connection (in their original order), then queued messages.
    fn fill_window(&mut self, now: Instant) {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            let window = conn.send_window;
            let pending = conn.resend_pending;
            debug_assert!(pending <= self.state.inflight.len());
            if pending > 0 {
                // Carried-over entries count against the window only once re-sent.
                if self.state.inflight.len() - pending >= window {
                    return;
                }
                conn.resend_pending -= 1;
                // The client may have answered some out of turn, so look for the next one.
                if let Some(idx) = self.state.inflight.iter().position(|f| f.resend) {
                    self.resend_entry(idx, now);
                }
                continue;
            }
            if self.state.inflight.len() >= window {
                return;
            }
            let Some(out) = self.state.pop_queued() else {
                self.fill_retained(now);
                return;
            };
            if out.msg.is_expired(now) {
                continue;
            }
            if out.qos == QoS::AtMostOnce {
                self.emit_publish(&out, 0, false, now);
            } else {
                self.send_inflight(out, now);
            }
        }
    }

    /// Re-sends one carried-over entry with its original packet id [MQTT-4.4.0-1]: PUBLISH
    /// with DUP=1, or PUBREL for a message the client already acknowledged with PUBREC.
    fn resend_entry(&mut self, idx: usize, now: Instant) {
        let f = &mut self.state.inflight[idx];
        f.resend = false;
        let packet_id = f.packet_id;
        if f.state == InflightState::AwaitingPubComp {
            self.push_transmit(Packet::PubRel(PubResp::new(packet_id)));
            return;
        }
        let out = f.out.clone();
        if !self.emit_publish(&out, packet_id, true, now) {
            // Too large for this connection's limit: discarded as if delivered.
            self.state.inflight.remove(idx);
            self.note(Note::Done { sid: out.msg.sid });
        }
    }

    /// Removes a finished inflight entry, keeping the re-send accounting right if the client
    /// acknowledged an entry we had not re-sent yet.
    fn remove_inflight(&mut self, pos: usize) {
        if let Some(f) = self.state.inflight.remove(pos) {
            self.note(Note::Done { sid: f.out.msg.sid });
            if f.resend {
                if let Some(conn) = self.conn.as_mut() {
                    conn.resend_pending -= 1;
                }
            }
        }
    }

    fn on_publish<C: PublishCheck>(
        &mut self,
        mut p: Publish,
        now: Instant,
        check: &mut C,
    ) -> Result<(), ProtocolViolation> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        if p.qos > self.config.maximum_qos {
            return Err(violation(
                ReasonCode::QOS_NOT_SUPPORTED,
                "PUBLISH QoS above our Maximum QoS (MQTT 5 §3.2.2.3.4)",
            ));
        }
        if p.retain && !self.config.retain_available {
            return Err(violation(
                ReasonCode::RETAIN_NOT_SUPPORTED,
                "RETAIN=1 while Retain Available is 0 (MQTT 5 §3.2.2.3.5)",
            ));
        }
        if p.qos != QoS::AtMostOnce && p.packet_id == 0 {
            return Err(violation(
                ReasonCode::PROTOCOL_ERROR,
                "QoS 1/2 PUBLISH without packet identifier (MQTT 5 §2.2.1)",
            ));
        }
        if let Some(alias) = p.properties.take_topic_alias() {
            if alias == 0 || alias > self.config.topic_alias_maximum {
                return Err(violation(
                    ReasonCode::TOPIC_ALIAS_INVALID,
                    "topic alias 0 or above our Topic Alias Maximum [MQTT-3.3.2-8]/[MQTT-3.3.2-9]",
                ));
            }
            let slot = usize::from(alias - 1);
            if conn.in_aliases.len() <= slot {
                conn.in_aliases
                    .resize(usize::from(self.config.topic_alias_maximum), None);
            }
            if p.topic.is_empty() {
                match &conn.in_aliases[slot] {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Err(violation(
                            ReasonCode::PROTOCOL_ERROR,
                            "empty topic with an unmapped topic alias (MQTT 5 §3.3.2.3.4)",
                        ))
                    }
                }
            } else {
                // Copied: the map outlives the packet, and a topic pointing into the read
                // buffer would keep that whole buffer alive (up to 65,535 of them).
                conn.in_aliases[slot] = Some(p.topic.detached());
            }
        } else if p.topic.is_empty() {
            return Err(violation(
                ReasonCode::PROTOCOL_ERROR,
                "empty topic name without topic alias (MQTT 5 §3.3.2.1)",
            ));
        }

        let v5 = conn.version.is_v5();
        let broker_only = is_broker_only_topic(p.topic.as_str());
        if broker_only || !check.allow_publish(&p.topic, p.qos, p.retain) {
            // mosquitto's answer: acknowledged as not authorized (3.1.1 has no reason code,
            // so a plain acknowledgement), neither routed nor retained, and not remembered
            // for QoS 2 (the error PUBREC ends the v5 flow; a 3.1.1 PUBREL still gets its
            // PUBCOMP).
            let refused = PubResp {
                packet_id: p.packet_id,
                reason: ReasonCode::NOT_AUTHORIZED,
                properties: AckProperties::default(),
            };
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.push_transmit(Packet::PubAck(refused)),
                QoS::ExactlyOnce => self.push_transmit(Packet::PubRec(refused)),
            }
            if broker_only {
                self.events
                    .push_back(SessionEvent::Notice(Notice::BrokerOnlyTopic {
                        topic: p.topic.detached(),
                    }));
            }
            return Ok(());
        }
        self.last_in_pid = 0;
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.push_transmit(Packet::PubAck(PubResp::new(p.packet_id)));
            }
            QoS::ExactlyOnce => {
                if self.state.incoming_qos2.contains(&p.packet_id) {
                    // Retransmission before PUBREL: acknowledge again, do not route twice
                    // [MQTT-4.3.3-10].
                    self.push_transmit(Packet::PubRec(PubResp::new(p.packet_id)));
                    return Ok(());
                }
                if v5
                    && self.state.incoming_qos2.len() >= usize::from(self.config.receive_maximum())
                {
                    return Err(violation(
                        ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                        "more unacknowledged QoS 2 PUBLISHes than our Receive Maximum (MQTT 5 §4.9)",
                    ));
                }
                self.state.incoming_qos2.insert(p.packet_id);
                self.last_in_pid = p.packet_id;
                self.push_transmit(Packet::PubRec(PubResp::new(p.packet_id)));
            }
        }

        let mut props = p.properties.into_inner();
        let expires_at = props.message_expiry_interval.take().map(|s| now + secs(s));
        // Per-hop properties are not routed; the subscriber's session adds its own.
        props.subscription_identifiers.clear();
        let properties = (!props.is_empty()).then(|| Arc::new(props));
        self.push_event(SessionEvent::Publish(Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties,
            expires_at,
            origin: self.state.client_id.clone(),
            sid: 0,
        }));
        Ok(())
    }

    fn on_puback(&mut self, packet_id: u16, now: Instant) {
        if let Some(pos) = self.state.inflight_position(packet_id) {
            if self.state.inflight[pos].state == InflightState::AwaitingPubAck {
                self.remove_inflight(pos);
                self.fill_window(now);
            }
        }
        // Unknown ids: a late duplicate; nothing to do.
    }

    fn on_pubrec(&mut self, r: PubResp, now: Instant) {
        let v5 = self.conn.as_ref().is_some_and(|c| c.version.is_v5());
        match self.state.inflight_position(r.packet_id) {
            Some(pos) => match self.state.inflight[pos].state {
                InflightState::AwaitingPubRec if v5 && r.reason.is_error() => {
                    // The client refused it: the flow ends here and frees the slot (MQTT 5 §4.9).
                    self.remove_inflight(pos);
                    self.fill_window(now);
                }
                InflightState::AwaitingPubRec | InflightState::AwaitingPubComp => {
                    let f = &mut self.state.inflight[pos];
                    let first = f.state == InflightState::AwaitingPubRec;
                    let sid = f.out.msg.sid;
                    f.state = InflightState::AwaitingPubComp;
                    if std::mem::take(&mut f.resend) {
                        // Answered before we re-sent it: this PUBREL is its re-send.
                        if let Some(conn) = self.conn.as_mut() {
                            conn.resend_pending -= 1;
                        }
                    }
                    if first {
                        self.note(Note::Released { sid });
                    }
                    self.push_transmit(Packet::PubRel(PubResp::new(r.packet_id)));
                }
                InflightState::AwaitingPubAck => {}
            },
            None if v5 => self.push_transmit(Packet::PubRel(PubResp {
                packet_id: r.packet_id,
                reason: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
                properties: AckProperties::default(),
            })),
            None => {}
        }
    }

    fn on_pubcomp(&mut self, packet_id: u16, now: Instant) {
        if let Some(pos) = self.state.inflight_position(packet_id) {
            if self.state.inflight[pos].state == InflightState::AwaitingPubComp {
                self.remove_inflight(pos);
                self.fill_window(now);
            }
        }
    }

    fn on_pubrel(&mut self, packet_id: u16) {
        let v5 = self.conn.as_ref().is_some_and(|c| c.version.is_v5());
        let released = self.state.incoming_qos2.remove(&packet_id);
        if released {
            self.note(Note::InRel { pid: packet_id });
        }
        let reason = if released || !v5 {
            ReasonCode::SUCCESS
        } else {
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        };
        self.push_transmit(Packet::PubComp(PubResp {
            packet_id,
            reason,
            properties: AckProperties::default(),
        }));
    }

    fn on_subscribe(&mut self, s: Subscribe) -> Result<(), ProtocolViolation> {
        use crate::codec::RetainHandling;
        let sub_id = s.properties.subscription_identifier;
        if let Some(id) = sub_id {
            if !self.config.subscription_identifiers_available {
                return Err(violation(
                    ReasonCode::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                    "Subscription Identifier while not supported (MQTT 5 §3.8.2.1.2)",
                ));
            }
            if id == 0 {
                return Err(violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "Subscription Identifier 0 (MQTT 5 §3.8.2.1.2)",
                ));
            }
        }
        if s.filters.iter().any(|(f, o)| f.is_shared() && o.no_local) {
            return Err(violation(
                ReasonCode::PROTOCOL_ERROR,
                "No Local on a shared subscription [MQTT-3.8.3-4]",
            ));
        }
        let mut codes = Vec::with_capacity(s.filters.len());
        let (mut too_deep, mut over_limit, mut first_refused) = (0, 0, None);
        for (filter, mut options) in s.filters {
            if filter.levels().count() > crate::routing::MAX_FILTER_LEVELS {
                // Routing could never hold it: refuse it here rather than grant what will
                // never be delivered.
                codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                too_deep += 1;
                first_refused.get_or_insert_with(|| filter.detached());
                continue;
            }
            if filter.is_shared() && !self.config.shared_subscriptions_available {
                codes.push(ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED);
                continue;
            }
            if filter.has_wildcards() && !self.config.wildcard_subscriptions_available {
                codes.push(ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED);
                continue;
            }
            let limit = self.config.max_subscriptions;
            if limit != 0
                && self.state.subscriptions.len() >= limit
                && !self.state.subscriptions.contains_key(&filter)
            {
                codes.push(ReasonCode::QUOTA_EXCEEDED);
                over_limit += 1;
                first_refused.get_or_insert_with(|| filter.detached());
                continue;
            }
            // Kept for the session's life: must not pin the SUBSCRIBE's read buffer.
            let filter = filter.detached();
            options.qos = options.qos.min(self.config.maximum_qos);
            let sub = Subscription {
                options,
                subscription_id: sub_id,
            };
            // A repeated filter replaces the old subscription [MQTT-3.8.4-3].
            let existed = self
                .state
                .subscriptions
                .insert(filter.clone(), sub)
                .is_some();
            codes.push(ReasonCode(options.qos as u8));
            let send_retained = match options.retain_handling {
                RetainHandling::OnSubscribe => true,
                RetainHandling::OnNewSubscribe => !existed,
                RetainHandling::Never => false,
            };
            // Shared subscriptions get no retained messages (MQTT 5.0 §4.8.2). A filter
            // whose retained messages are still waiting is not asked for twice: the client
            // gets them once, after its latest SUBSCRIBE, whatever it repeats meanwhile.
            if send_retained && !filter.is_shared() && self.retained_waiting.insert(filter.clone())
            {
                self.retained_requests.push_back(filter.clone());
            }
            self.push_event(SessionEvent::Subscribe {
                filter,
                options,
                subscription_id: sub_id,
                existed,
                resumed: false,
            });
        }
        if let Some(first) = first_refused {
            self.events
                .push_back(SessionEvent::Notice(Notice::SubscribeRefused {
                    too_deep,
                    over_limit,
                    first,
                }));
        }
        self.push_transmit(Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            reason_codes: codes,
            properties: AckProperties::default(),
        }));
        Ok(())
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let v5 = self.conn.as_ref().is_some_and(|c| c.version.is_v5());
        let mut codes = Vec::with_capacity(if v5 { u.filters.len() } else { 0 });
        for filter in u.filters {
            let existed = self.state.subscriptions.remove(&filter).is_some();
            self.retained_waiting.remove(&filter);
            if v5 {
                codes.push(if existed {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::NO_SUBSCRIPTION_EXISTED
                });
            }
            if existed {
                self.push_event(SessionEvent::Unsubscribe { filter });
            }
        }
        self.push_transmit(Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reason_codes: codes,
            properties: AckProperties::default(),
        }));
    }

    fn on_disconnect(&mut self, d: Disconnect, now: Instant) -> Result<(), ProtocolViolation> {
        let Some(conn) = self.conn.as_ref() else {
            return Ok(());
        };
        if conn.version.is_v5() {
            if let Some(expiry) = d.properties.session_expiry_interval {
                if conn.connect_expiry_zero && expiry != 0 {
                    return Err(violation(
                        ReasonCode::PROTOCOL_ERROR,
                        "non-zero Session Expiry Interval in DISCONNECT after 0 in CONNECT [MQTT-3.14.2-2]",
                    ));
                }
                self.state.session_expiry = self.config.cap_expiry(expiry);
            }
        }
        // Normal disconnection discards the will [MQTT-3.1.2-10]; 0x04 asks for it.
        let publish_will = d.reason == ReasonCode::DISCONNECT_WITH_WILL;
        self.close(
            CloseReason::ClientDisconnect(d.reason),
            None,
            publish_will,
            now,
        );
        Ok(())
    }

    /// Ends the connection: optional v5 DISCONNECT, Close event, will, expiry clock.
    fn close(
        &mut self,
        reason: CloseReason,
        send_disconnect: Option<ReasonCode>,
        publish_will: bool,
        now: Instant,
    ) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Retained messages on SUBSCRIBE are for the connection that asked (the subscription
        // itself stays with the session).
        self.retained_backlog = VecDeque::new();
        self.retained_requests = VecDeque::new();
        self.retained_waiting = ahash::AHashSet::new();
        if let Some(code) = send_disconnect {
            if conn.version.is_v5() {
                let mut d = Disconnect {
                    reason: code,
                    ..Disconnect::default()
                };
                // Tell the client what it did wrong, unless that could break its Maximum
                // Packet Size (details are well under 256 bytes).
                if conn.client_max_packet_size.is_none_or(|m| m >= 256) {
                    d.properties.reason_string = self.detail.take().map(ByteString::from_static);
                }
                self.push_transmit(Packet::Disconnect(d));
            }
        }
        self.push_event(SessionEvent::Close { reason });
        let expiry = self.state.session_expiry;
        if expiry != EXPIRY_NEVER {
            self.state.expires_at = Some(now + secs(expiry));
        }
        if !publish_will && conn.will.as_deref().is_some_and(has_delay) {
            self.note(Note::WillGone);
        }
        if let (true, Some(will)) = (publish_will, conn.will) {
            let delay = will.properties.will_delay_interval.unwrap_or(0);
            let mut due = now + secs(delay);
            if let Some(end) = self.state.expires_at {
                due = due.min(end);
            }
            self.state.pending_will = Some(PendingWill {
                will,
                due,
                auth: None,
            });
            if due <= now {
                self.fire_pending_will(now);
            }
        }
        if expiry == 0 {
            self.end_session(now);
        }
    }

    fn fire_pending_will(&mut self, now: Instant) {
        if let Some(pw) = self.state.pending_will.take() {
            if has_delay(&pw.will) {
                self.note(Note::WillGone);
            }
            let msg = will_message(&self.state.client_id, *pw.will, now);
            self.push_event(SessionEvent::Will(msg));
        }
    }

    fn end_session(&mut self, now: Instant) {
        // The will goes out when the session ends, even if its delay has not run out.
        self.fire_pending_will(now);
        for (filter, _) in self.state.subscriptions.drain() {
            self.events.push_back(SessionEvent::Unsubscribe { filter });
        }
        self.state.inflight.clear();
        self.state.queue.clear();
        self.state.queued_bytes = 0;
        self.state.incoming_qos2.clear();
        self.ended = true;
        self.push_event(SessionEvent::Ended);
    }
}

/// The PUBLISH for `out` as this client sees it (no topic alias yet).
fn build_publish(
    out: &Outgoing,
    packet_id: u16,
    dup: bool,
    now: Instant,
    version: ProtocolVersion,
) -> Publish {
    let mut properties = PublishProperties::default();
    if version.is_v5() {
        if let Some(p) = &out.msg.properties {
            properties = PublishProperties::clone(p);
        }
        if let Some(exp) = out.msg.expires_at {
            // Remaining lifetime, rounded up so a live message never says 0 [MQTT-3.3.2-6].
            let left = exp.saturating_duration_since(now);
            let s = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            properties.message_expiry_interval = Some(s.clamp(1, u64::from(u32::MAX)) as u32);
        }
        properties
            .subscription_identifiers
            .extend_from_slice(&out.sub_ids);
    }
    Publish {
        dup,
        qos: out.qos,
        retain: out.retain,
        topic: out.msg.topic.clone(),
        packet_id,
        payload: out.msg.payload.clone(),
        properties: properties.into(),
    }
}
