//! The MQTT packet model shared by every protocol version.
//!
//! Owns: the in-memory shape of all 15 control packets of MQTT 3.1, 3.1.1 and 5.0 and their v5
//! properties. One representation serves all versions: v3 CONNACK return codes and SUBACK
//! return codes are stored as their v5 reason-code equivalents and mapped by the encoder.
//! Must not touch: I/O, sessions, routing. Strings that came off the wire are `ByteString`
//! (UTF-8 validated once, at decode) and binary fields are `Bytes` slices of the read buffer.

use std::fmt;

use bytes::Bytes;
use bytestring::ByteString;

use super::reason::ReasonCode;
use super::topic::{TopicFilter, TopicName};

/// Protocol version announced in CONNECT. The decoder and encoder of every later packet on a
/// connection need it (v5 packets carry properties, v3 ones do not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1: protocol name "MQIsdp", level 3.
    V31,
    /// MQTT 3.1.1: protocol name "MQTT", level 4.
    V311,
    /// MQTT 5.0: protocol name "MQTT", level 5.
    V5,
}

impl ProtocolVersion {
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V31 => 3,
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }
}

/// Quality of service levels [MQTT-4.3].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// A v5 user property: a UTF-8 string pair, order preserved, duplicates allowed [MQTT-3.1.3-10].
pub type UserProperty = (ByteString, ByteString);

/// Every MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    /// Boxed, like `Connect` and `Auth`: once per connection, and their property sets would
    /// otherwise make every `Packet` (moved by value several times per message) 264 bytes.
    ConnAck(Box<ConnAck>),
    Publish(Publish),
    PubAck(PubResp),
    PubRec(PubResp),
    PubRel(PubResp),
    PubComp(PubResp),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Box<Auth>),
}

impl Packet {
    /// The fixed-header packet type number (1..=15).
    pub fn packet_type(&self) -> u8 {
        match self {
            Packet::Connect(_) => 1,
            Packet::ConnAck(_) => 2,
            Packet::Publish(_) => 3,
            Packet::PubAck(_) => 4,
            Packet::PubRec(_) => 5,
            Packet::PubRel(_) => 6,
            Packet::PubComp(_) => 7,
            Packet::Subscribe(_) => 8,
            Packet::SubAck(_) => 9,
            Packet::Unsubscribe(_) => 10,
            Packet::UnsubAck(_) => 11,
            Packet::PingReq => 12,
            Packet::PingResp => 13,
            Packet::Disconnect(_) => 14,
            Packet::Auth(_) => 15,
        }
    }
}

/// CONNECT [MQTT-3.1].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    /// "Clean Session" in v3, "Clean Start" in v5.
    pub clean_start: bool,
    /// Seconds; 0 disables keepalive.
    pub keep_alive: u16,
    /// May be empty (the server assigns one where allowed).
    pub client_id: ByteString,
    pub will: Option<LastWill>,
    pub username: Option<ByteString>,
    pub password: Option<Bytes>,
    pub properties: ConnectProperties,
}

/// The will message carried in CONNECT [MQTT-3.1.2.5].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: WillProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    pub request_response_information: Option<bool>,
    pub request_problem_information: Option<bool>,
    pub user_properties: Vec<UserProperty>,
    pub authentication_method: Option<ByteString>,
    pub authentication_data: Option<Bytes>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WillProperties {
    pub will_delay_interval: Option<u32>,
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<ByteString>,
    pub response_topic: Option<TopicName>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
}

/// CONNACK [MQTT-3.2]. For v3 the reason code is mapped to/from the 3.1.1 return codes
/// (0x00 accepted, 0x84→1, 0x85→2, 0x88→3, 0x86→4, 0x87→5) by the codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub reason: ReasonCode,
    pub properties: ConnAckProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAckProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_qos: Option<QoS>,
    pub retain_available: Option<bool>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_identifier: Option<ByteString>,
    pub topic_alias_maximum: Option<u16>,
    pub reason_string: Option<ByteString>,
    pub user_properties: Vec<UserProperty>,
    pub wildcard_subscription_available: Option<bool>,
    pub subscription_identifiers_available: Option<bool>,
    pub shared_subscription_available: Option<bool>,
    pub server_keep_alive: Option<u16>,
    pub response_information: Option<ByteString>,
    pub server_reference: Option<ByteString>,
    pub authentication_method: Option<ByteString>,
    pub authentication_data: Option<Bytes>,
}

/// PUBLISH [MQTT-3.3]. `topic` may be empty only in a v5 PUBLISH that carries a topic alias
/// [MQTT-3.3.2-8]; the session resolves the alias before anything is routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: TopicName,
    /// 0 for QoS 0 (absent on the wire); non-zero otherwise [MQTT-2.3.1-1].
    pub packet_id: u16,
    pub payload: Bytes,
    pub properties: PublishProps,
}

/// A PUBLISH's v5 properties, boxed only when there are any.
///
/// Why: a `Publish` moves by value through decode, the session and the core several times per
/// message, and the full property set is 160 bytes that almost every PUBLISH leaves empty
/// (callgrind: those moves were the largest single cost per message). Empty properties are
/// `None` here and allocate nothing; reads go through `Deref` (an empty set when `None`),
/// writes through `DerefMut` (which allocates the set on first write).
#[derive(Clone, Default)]
pub struct PublishProps(Option<Box<PublishProperties>>);

/// By content: an allocated but emptied set equals `None`.
impl PartialEq for PublishProps {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for PublishProps {}

/// What an absent property set reads as.
static NO_PUBLISH_PROPERTIES: PublishProperties = PublishProperties {
    payload_format_indicator: None,
    message_expiry_interval: None,
    topic_alias: None,
    response_topic: None,
    correlation_data: None,
    user_properties: Vec::new(),
    subscription_identifiers: Vec::new(),
    content_type: None,
};

impl PublishProps {
    /// No properties (allocates nothing).
    pub const fn none() -> PublishProps {
        PublishProps(None)
    }

    /// Remove and return the topic alias, without allocating a property set to clear it in.
    pub fn take_topic_alias(&mut self) -> Option<u16> {
        self.0.as_mut().and_then(|p| p.topic_alias.take())
    }

    /// The properties by value (empty when there are none).
    pub fn into_inner(self) -> PublishProperties {
        self.0.map(|b| *b).unwrap_or_default()
    }
}

impl From<PublishProperties> for PublishProps {
    fn from(p: PublishProperties) -> Self {
        if p.is_empty() {
            PublishProps(None)
        } else {
            PublishProps(Some(Box::new(p)))
        }
    }
}

impl std::ops::Deref for PublishProps {
    type Target = PublishProperties;
    fn deref(&self) -> &PublishProperties {
        self.0.as_deref().unwrap_or(&NO_PUBLISH_PROPERTIES)
    }
}

impl std::ops::DerefMut for PublishProps {
    fn deref_mut(&mut self) -> &mut PublishProperties {
        self.0.get_or_insert_with(Default::default)
    }
}

impl fmt::Debug for PublishProps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProperties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub topic_alias: Option<u16>,
    pub response_topic: Option<TopicName>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
    /// Several may be present on a PUBLISH sent to a client [MQTT-3.3.4-4]; none from a client.
    pub subscription_identifiers: Vec<u32>,
    pub content_type: Option<ByteString>,
}

impl PublishProperties {
    /// Field by field (not `== default()`): checked for every PUBLISH encoded, and most have
    /// no properties at all.
    pub fn is_empty(&self) -> bool {
        let PublishProperties {
            payload_format_indicator,
            message_expiry_interval,
            topic_alias,
            response_topic,
            correlation_data,
            user_properties,
            subscription_identifiers,
            content_type,
        } = self;
        payload_format_indicator.is_none()
            && message_expiry_interval.is_none()
            && topic_alias.is_none()
            && response_topic.is_none()
            && correlation_data.is_none()
            && user_properties.is_empty()
            && subscription_identifiers.is_empty()
            && content_type.is_none()
    }
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape [MQTT-3.4..3.7].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubResp {
    pub packet_id: u16,
    /// Always `ReasonCode::SUCCESS` for v3.
    pub reason: ReasonCode,
    pub properties: AckProperties,
}

impl PubResp {
    pub fn new(packet_id: u16) -> Self {
        PubResp {
            packet_id,
            reason: ReasonCode::SUCCESS,
            properties: AckProperties::default(),
        }
    }
}

/// Properties of the acknowledgement packets: PUBACK/PUBREC/PUBREL/PUBCOMP, SUBACK, UNSUBACK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckProperties {
    pub reason_string: Option<ByteString>,
    pub user_properties: Vec<UserProperty>,
}

/// Retain handling option of a v5 subscription [MQTT-3.8.3.1].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    OnSubscribe,
    /// 1: send retained messages only if the subscription did not already exist.
    OnNewSubscribe,
    /// 2: do not send retained messages.
    Never,
}

/// Per-filter options of SUBSCRIBE. For v3 only `qos` is on the wire; the rest are defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

/// SUBSCRIBE [MQTT-3.8].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    pub filters: Vec<(TopicFilter, SubscriptionOptions)>,
    pub properties: SubscribeProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeProperties {
    /// 1..=268,435,455 [MQTT-3.8.2.1.2].
    pub subscription_identifier: Option<u32>,
    pub user_properties: Vec<UserProperty>,
}

/// SUBACK [MQTT-3.9]. v3 return codes 0, 1, 2 and 0x80 are the v5 codes of the same value;
/// the encoder maps any other failure code to 0x80 for v3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    pub reason_codes: Vec<ReasonCode>,
    pub properties: AckProperties,
}

/// UNSUBSCRIBE [MQTT-3.10].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub filters: Vec<TopicFilter>,
    pub user_properties: Vec<UserProperty>,
}

/// UNSUBACK [MQTT-3.11]. `reason_codes` is empty for v3 (the packet has no payload there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub reason_codes: Vec<ReasonCode>,
    pub properties: AckProperties,
}

/// DISCONNECT [MQTT-3.14]. v3 DISCONNECT has no variable header: reason is SUCCESS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub properties: DisconnectProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisconnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub reason_string: Option<ByteString>,
    pub user_properties: Vec<UserProperty>,
    pub server_reference: Option<ByteString>,
}

/// AUTH [MQTT-3.15] (v5 only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    pub reason: ReasonCode,
    pub properties: AuthProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthProperties {
    pub authentication_method: Option<ByteString>,
    pub authentication_data: Option<Bytes>,
    pub reason_string: Option<ByteString>,
    pub user_properties: Vec<UserProperty>,
}
