//! Why a packet could not be decoded.
//!
//! Owns: [`DecodeError`], whose `Display` says what was wrong and cites the spec clause it breaks
//! (`[MQTT-x.y.z-n]` normative statements where the spec numbers one, otherwise the section;
//! MQTT 5 numbering, with the 3.1.1 number added where it differs and matters), and
//! its mapping to the MQTT 5 reason code a broker sends back in CONNACK or DISCONNECT.
//! Must not touch: anything that decides *whether* to send that packet (that is the session's).

use thiserror::Error;

use super::reason::ReasonCode;
use super::topic::TopicError;

/// A packet the decoder rejected. Every variant is fatal for the connection: MQTT has no way to
/// skip a bad packet and resynchronise the stream.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("packet type 0 is reserved [MQTT-2.1.2]")]
    ReservedPacketType,

    #[error("AUTH packet is only defined in MQTT 5 [MQTT-2.1.2]")]
    AuthBeforeV5,

    #[error("reserved flags of {packet} must be {expected:04b}, got {got:04b} {clause}")]
    BadFlags {
        packet: &'static str,
        expected: u8,
        got: u8,
        clause: &'static str,
    },

    #[error("QoS 3 in PUBLISH [MQTT-3.3.1-4]")]
    PublishQos3,

    #[error("DUP flag set on a QoS 0 PUBLISH [MQTT-3.3.1-2]")]
    DupOnQos0,

    #[error("remaining length exceeds 4 bytes [MQTT-1.5.5]")]
    RemainingLengthTooLong,

    #[error("variable byte integer in {field} exceeds 4 bytes [MQTT-1.5.5]")]
    VarIntTooLong { field: &'static str },

    #[error("packet too large: {size} bytes exceeds the maximum of {max} [MQTT-3.1.2.11.4]")]
    PacketTooLarge { size: u64, max: u32 },

    #[error("packet ends inside {field}: remaining length too short [MQTT-2.1.4]")]
    UnexpectedEnd { field: &'static str },

    #[error("{packet} has {extra} unexpected trailing bytes [MQTT-2.1.4]")]
    TrailingBytes { packet: &'static str, extra: usize },

    #[error("invalid UTF-8 in {field} [MQTT-1.5.4-1] (3.1.1: [MQTT-1.5.3-1])")]
    InvalidUtf8 { field: &'static str },

    #[error("{field} contains the null character U+0000 [MQTT-1.5.4-2] (3.1.1: [MQTT-1.5.3-2])")]
    NullCharacter { field: &'static str },

    #[error("packet identifier 0 on {packet} [MQTT-2.3.1-1]")]
    ZeroPacketId { packet: &'static str },

    #[error("protocol name {name:?} is neither \"MQTT\" nor \"MQIsdp\" [MQTT-3.1.2-1]")]
    BadProtocolName { name: String },

    #[error("unsupported protocol level {level} [MQTT-3.1.2-2]")]
    UnsupportedProtocolVersion { level: u8 },

    #[error("reserved flag in CONNECT flags must be 0 [MQTT-3.1.2-3]")]
    ConnectReservedFlag,

    #[error("will QoS and will retain must be 0 when the will flag is 0 [MQTT-3.1.2-11] [MQTT-3.1.2-13]")]
    WillFlagsWithoutWill,

    #[error("will QoS 3 in CONNECT [MQTT-3.1.2-14]")]
    WillQos3,

    #[error("password flag set without user name flag [MQTT-3.1.2-22]")]
    PasswordWithoutUsername,

    #[error("reserved bits of the CONNACK acknowledge flags must be 0 [MQTT-3.2.2-1]")]
    ConnAckReservedFlags,

    #[error("invalid {field}: {source}")]
    InvalidTopicName {
        field: &'static str,
        #[source]
        source: TopicError,
    },

    #[error("invalid topic filter: {0}")]
    InvalidTopicFilter(#[source] TopicError),

    #[error("PUBLISH with an empty topic name and no topic alias [MQTT-3.3.2.3.4]")]
    EmptyTopicWithoutAlias,

    #[error("topic alias 0 is not permitted [MQTT-3.3.2.3.4]")]
    TopicAliasZero,

    #[error("SUBSCRIBE with no topic filters [MQTT-3.8.3-3]")]
    SubscribeWithoutFilters,

    #[error("UNSUBSCRIBE with no topic filters [MQTT-3.10.3-2]")]
    UnsubscribeWithoutFilters,

    #[error(
        "reserved bits of subscription options must be 0 [MQTT-3.8.3-5] (3.1.1: [MQTT-3-8.3-4])"
    )]
    SubscriptionOptionsReserved,

    #[error("QoS 3 in subscription options [MQTT-3.8.3-4]")]
    SubscriptionQos3,

    #[error("retain handling 3 in subscription options [MQTT-3.8.3.1]")]
    RetainHandling3,

    #[error("no local set on a shared subscription [MQTT-3.8.3-4]")]
    NoLocalOnSharedSubscription,

    #[error("property identifier 0x{id:02X} is not defined [MQTT-2.2.2.2]")]
    UnknownProperty { id: u32 },

    #[error("property 0x{id:02X} is not allowed in {packet} [MQTT-2.2.2.2]")]
    PropertyNotAllowed { id: u8, packet: &'static str },

    #[error("property {name} appears more than once [MQTT-2.2.2.2]")]
    DuplicateProperty { name: &'static str },

    #[error("invalid value {value} for property {name} [{clause}]")]
    InvalidPropertyValue {
        name: &'static str,
        value: u32,
        clause: &'static str,
    },

    #[error("authentication data without authentication method [MQTT-3.1.2.11.10]")]
    AuthDataWithoutMethod,

    #[error("reason code 0x{code:02X} is not valid in {packet} [MQTT-2.4]")]
    InvalidReasonCode { packet: &'static str, code: u8 },

    #[error("CONNACK return code {code} is not defined [MQTT-3.2.2.3]")]
    InvalidReturnCode { code: u8 },
}

impl DecodeError {
    /// The MQTT 5 reason code a broker reports for this error (in CONNACK if it happened in
    /// CONNECT, otherwise in DISCONNECT). For MQTT 3 peers, map 0x84 to CONNACK return code 1
    /// and close without a reply for everything else.
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            UnsupportedProtocolVersion { .. } => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            InvalidTopicName { .. } => ReasonCode::TOPIC_NAME_INVALID,
            InvalidTopicFilter(_) => ReasonCode::TOPIC_FILTER_INVALID,
            TopicAliasZero => ReasonCode::TOPIC_ALIAS_INVALID,
            // "It is a Protocol Error to ..." in the spec's wording.
            AuthBeforeV5
            | BadProtocolName { .. }
            | ZeroPacketId { .. }
            | EmptyTopicWithoutAlias
            | SubscribeWithoutFilters
            | UnsubscribeWithoutFilters
            | RetainHandling3
            | NoLocalOnSharedSubscription
            | DuplicateProperty { .. }
            | InvalidPropertyValue { .. }
            | AuthDataWithoutMethod
            | InvalidReasonCode { .. } => ReasonCode::PROTOCOL_ERROR,
            // Everything else is a Malformed Packet.
            _ => ReasonCode::MALFORMED_PACKET,
        }
    }
}
