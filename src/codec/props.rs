//! MQTT 5 properties [MQTT-2.2.2]: identifiers, and their decoding and encoding per packet type.
//!
//! Owns: which property may appear in which packet, duplicate detection, value checks, and the
//! wire form of every property. Decoding fills the typed property structs of `packet.rs`;
//! encoding writes them back through a [`Sink`] so that size computation and writing are one
//! piece of code. Must not touch: anything but properties.

use bytes::Bytes;
use bytestring::ByteString;

use super::decode::Reader;
use super::encode::Sink;
use super::error::DecodeError;
use super::packet::*;
use super::topic::TopicName;

pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub const CONTENT_TYPE: u8 = 0x03;
pub const RESPONSE_TOPIC: u8 = 0x08;
pub const CORRELATION_DATA: u8 = 0x09;
pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
pub const SERVER_KEEP_ALIVE: u8 = 0x13;
pub const AUTHENTICATION_METHOD: u8 = 0x15;
pub const AUTHENTICATION_DATA: u8 = 0x16;
pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub const WILL_DELAY_INTERVAL: u8 = 0x18;
pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub const RESPONSE_INFORMATION: u8 = 0x1A;
pub const SERVER_REFERENCE: u8 = 0x1C;
pub const REASON_STRING: u8 = 0x1F;
pub const RECEIVE_MAXIMUM: u8 = 0x21;
pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub const TOPIC_ALIAS: u8 = 0x23;
pub const MAXIMUM_QOS: u8 = 0x24;
pub const RETAIN_AVAILABLE: u8 = 0x25;
pub const USER_PROPERTY: u8 = 0x26;
pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// Largest value of a variable byte integer [MQTT-1.5.5].
pub const MAX_VAR_INT: u32 = 268_435_455;

/// The spec's name of a property, for error messages.
pub fn name(id: u8) -> &'static str {
    match id {
        PAYLOAD_FORMAT_INDICATOR => "Payload Format Indicator",
        MESSAGE_EXPIRY_INTERVAL => "Message Expiry Interval",
        CONTENT_TYPE => "Content Type",
        RESPONSE_TOPIC => "Response Topic",
        CORRELATION_DATA => "Correlation Data",
        SUBSCRIPTION_IDENTIFIER => "Subscription Identifier",
        SESSION_EXPIRY_INTERVAL => "Session Expiry Interval",
        ASSIGNED_CLIENT_IDENTIFIER => "Assigned Client Identifier",
        SERVER_KEEP_ALIVE => "Server Keep Alive",
        AUTHENTICATION_METHOD => "Authentication Method",
        AUTHENTICATION_DATA => "Authentication Data",
        REQUEST_PROBLEM_INFORMATION => "Request Problem Information",
        WILL_DELAY_INTERVAL => "Will Delay Interval",
        REQUEST_RESPONSE_INFORMATION => "Request Response Information",
        RESPONSE_INFORMATION => "Response Information",
        SERVER_REFERENCE => "Server Reference",
        REASON_STRING => "Reason String",
        RECEIVE_MAXIMUM => "Receive Maximum",
        TOPIC_ALIAS_MAXIMUM => "Topic Alias Maximum",
        TOPIC_ALIAS => "Topic Alias",
        MAXIMUM_QOS => "Maximum QoS",
        RETAIN_AVAILABLE => "Retain Available",
        USER_PROPERTY => "User Property",
        MAXIMUM_PACKET_SIZE => "Maximum Packet Size",
        WILDCARD_SUBSCRIPTION_AVAILABLE => "Wildcard Subscription Available",
        SUBSCRIPTION_IDENTIFIER_AVAILABLE => "Subscription Identifier Available",
        SHARED_SUBSCRIPTION_AVAILABLE => "Shared Subscription Available",
        _ => "unknown",
    }
}

/// Iterates the properties of one packet: reads the property length, then hands out
/// identifiers; typed getters read the value and reject a second occurrence.
pub struct PropReader {
    r: Reader,
    /// Bit `id` is set once property `id` was seen (all identifiers are below 64).
    seen: u64,
    packet: &'static str,
}

impl PropReader {
    /// Reads the property length and splits that many bytes off `r`.
    pub fn new(r: &mut Reader, packet: &'static str) -> Result<Self, DecodeError> {
        let len = r.var_int("property length")?;
        let inner = r.take(len as usize, "properties")?;
        Ok(PropReader {
            r: Reader::new(inner),
            seen: 0,
            packet,
        })
    }

    /// The next property identifier, or `None` at the end of the properties.
    pub fn next_id(&mut self) -> Result<Option<u8>, DecodeError> {
        if self.r.is_empty() {
            return Ok(None);
        }
        // Identifiers are variable byte integers, but all defined ones fit in one byte.
        let id = self.r.var_int("property identifier")?;
        match u8::try_from(id) {
            Ok(id) if name(id) != "unknown" => Ok(Some(id)),
            _ => Err(DecodeError::UnknownProperty { id }),
        }
    }

    /// The error for a known property that this packet type may not carry.
    pub fn not_allowed(&self, id: u8) -> DecodeError {
        DecodeError::PropertyNotAllowed {
            id,
            packet: self.packet,
        }
    }

    fn once(&mut self, id: u8) -> Result<(), DecodeError> {
        let bit = 1u64 << id;
        if self.seen & bit != 0 {
            return Err(DecodeError::DuplicateProperty { name: name(id) });
        }
        self.seen |= bit;
        Ok(())
    }

    pub fn u8(&mut self, id: u8) -> Result<u8, DecodeError> {
        self.once(id)?;
        self.r.u8(name(id))
    }

    /// A byte property whose only valid values are 0 and 1.
    pub fn bool(&mut self, id: u8, clause: &'static str) -> Result<bool, DecodeError> {
        match self.u8(id)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::InvalidPropertyValue {
                name: name(id),
                value: v.into(),
                clause,
            }),
        }
    }

    pub fn u16(&mut self, id: u8) -> Result<u16, DecodeError> {
        self.once(id)?;
        self.r.u16(name(id))
    }

    /// A two-byte property where 0 is a protocol error (Receive Maximum, Topic Alias).
    pub fn nonzero_u16(&mut self, id: u8, clause: &'static str) -> Result<u16, DecodeError> {
        match self.u16(id)? {
            0 => Err(DecodeError::InvalidPropertyValue {
                name: name(id),
                value: 0,
                clause,
            }),
            v => Ok(v),
        }
    }

    pub fn u32(&mut self, id: u8) -> Result<u32, DecodeError> {
        self.once(id)?;
        self.r.u32(name(id))
    }

    pub fn string(&mut self, id: u8) -> Result<ByteString, DecodeError> {
        self.once(id)?;
        self.r.string(name(id))
    }

    pub fn binary(&mut self, id: u8) -> Result<Bytes, DecodeError> {
        self.once(id)?;
        self.r.binary(name(id))
    }

    pub fn response_topic(&mut self) -> Result<TopicName, DecodeError> {
        let s = self.string(RESPONSE_TOPIC)?;
        TopicName::new(s).map_err(|source| DecodeError::InvalidTopicName {
            field: "Response Topic",
            source,
        })
    }

    pub fn payload_format(&mut self) -> Result<u8, DecodeError> {
        let v = self.u8(PAYLOAD_FORMAT_INDICATOR)?;
        if v > 1 {
            return Err(DecodeError::InvalidPropertyValue {
                name: name(PAYLOAD_FORMAT_INDICATOR),
                value: v.into(),
                clause: "MQTT-3.3.2.3.2",
            });
        }
        Ok(v)
    }

    /// A Subscription Identifier: 1..=268,435,455; 0 is a protocol error [MQTT-3.8.2.1.2].
    /// Not checked for duplicates: a PUBLISH may carry several [MQTT-3.3.4-4].
    pub fn subscription_id(&mut self) -> Result<u32, DecodeError> {
        let v = self.r.var_int(name(SUBSCRIPTION_IDENTIFIER))?;
        if v == 0 {
            return Err(DecodeError::InvalidPropertyValue {
                name: name(SUBSCRIPTION_IDENTIFIER),
                value: 0,
                clause: "MQTT-3.8.2.1.2",
            });
        }
        Ok(v)
    }

    /// A User Property; may appear any number of times [MQTT-3.1.2-?, MQTT-2.2.2.2].
    pub fn user_property(&mut self) -> Result<UserProperty, DecodeError> {
        let k = self.r.string("User Property name")?;
        let v = self.r.string("User Property value")?;
        Ok((k, v))
    }

    /// Authentication Data without Authentication Method is a protocol error.
    fn check_auth(&self) -> Result<(), DecodeError> {
        let data = 1u64 << AUTHENTICATION_DATA;
        let method = 1u64 << AUTHENTICATION_METHOD;
        if self.seen & data != 0 && self.seen & method == 0 {
            return Err(DecodeError::AuthDataWithoutMethod);
        }
        Ok(())
    }
}

pub fn decode_connect(r: &mut Reader) -> Result<ConnectProperties, DecodeError> {
    let mut p = ConnectProperties::default();
    let mut pr = PropReader::new(r, "CONNECT")?;
    while let Some(id) = pr.next_id()? {
        match id {
            SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(pr.u32(id)?),
            RECEIVE_MAXIMUM => p.receive_maximum = Some(pr.nonzero_u16(id, "MQTT-3.1.2.11.3")?),
            MAXIMUM_PACKET_SIZE => {
                let v = pr.u32(id)?;
                if v == 0 {
                    return Err(DecodeError::InvalidPropertyValue {
                        name: name(id),
                        value: 0,
                        clause: "MQTT-3.1.2.11.4",
                    });
                }
                p.maximum_packet_size = Some(v);
            }
            TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(pr.u16(id)?),
            REQUEST_RESPONSE_INFORMATION => {
                p.request_response_information = Some(pr.bool(id, "MQTT-3.1.2.11.6")?)
            }
            REQUEST_PROBLEM_INFORMATION => {
                p.request_problem_information = Some(pr.bool(id, "MQTT-3.1.2.11.7")?)
            }
            USER_PROPERTY => p.user_properties.push(pr.user_property()?),
            AUTHENTICATION_METHOD => p.authentication_method = Some(pr.string(id)?),
            AUTHENTICATION_DATA => p.authentication_data = Some(pr.binary(id)?),
            _ => return Err(pr.not_allowed(id)),
        }
    }
    pr.check_auth()?;
    Ok(p)
}

pub fn decode_will(r: &mut Reader) -> Result<WillProperties, DecodeError> {
    let mut p = WillProperties::default();
    let mut pr = PropReader::new(r, "CONNECT will properties")?;
    while let Some(id) = pr.next_id()? {
        match id {
            WILL_DELAY_INTERVAL => p.will_delay_interval = Some(pr.u32(id)?),
            PAYLOAD_FORMAT_INDICATOR => p.payload_format_indicator = Some(pr.payload_format()?),
            MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(pr.u32(id)?),
            CONTENT_TYPE => p.content_type = Some(pr.string(id)?),
            RESPONSE_TOPIC => p.response_topic = Some(pr.response_topic()?),
            CORRELATION_DATA => p.correlation_data = Some(pr.binary(id)?),
            USER_PROPERTY => p.user_properties.push(pr.user_property()?),
            _ => return Err(pr.not_allowed(id)),
        }
    }
    Ok(p)
}

pub fn decode_connack(r: &mut Reader) -> Result<ConnAckProperties, DecodeError> {
    let mut p = ConnAckProperties::default();
    let mut pr = PropReader::new(r, "CONNACK")?;
    while let Some(id) = pr.next_id()? {
        match id {
            SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(pr.u32(id)?),
            RECEIVE_MAXIMUM => p.receive_maximum = Some(pr.nonzero_u16(id, "MQTT-3.2.2.3.3")?),
            MAXIMUM_QOS => {
                p.maximum_qos = Some(if pr.bool(id, "MQTT-3.2.2.3.4")? {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                })
            }
            RETAIN_AVAILABLE => p.retain_available = Some(pr.bool(id, "MQTT-3.2.2.3.5")?),
            MAXIMUM_PACKET_SIZE => {
                let v = pr.u32(id)?;
                if v == 0 {
                    return Err(DecodeError::InvalidPropertyValue {
                        name: name(id),
                        value: 0,
                        clause: "MQTT-3.2.2.3.6",
                    });
                }
                p.maximum_packet_size = Some(v);
            }
            ASSIGNED_CLIENT_IDENTIFIER => p.assigned_client_identifier = Some(pr.string(id)?),
            TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(pr.u16(id)?),
            REASON_STRING => p.reason_string = Some(pr.string(id)?),
            USER_PROPERTY => p.user_properties.push(pr.user_property()?),
            WILDCARD_SUBSCRIPTION_AVAILABLE => {
                p.wildcard_subscription_available = Some(pr.bool(id, "MQTT-3.2.2.3.11")?)
            }
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                p.subscription_identifiers_available = Some(pr.bool(id, "MQTT-3.2.2.3.12")?)
            }
            SHARED_SUBSCRIPTION_AVAILABLE => {
                p.shared_subscription_available = Some(pr.bool(id, "MQTT-3.2.2.3.13")?)
            }
            SERVER_KEEP_ALIVE => p.server_keep_alive = Some(pr.u16(id)?),
            RESPONSE_INFORMATION => p.response_information = Some(pr.string(id)?),
            SERVER_REFERENCE => p.server_reference = Some(pr.string(id)?),
            AUTHENTICATION_METHOD => p.authentication_method = Some(pr.string(id)?),
            AUTHENTICATION_DATA => p.authentication_data = Some(pr.binary(id)?),
            _ => return Err(pr.not_allowed(id)),
        }
    }
    Ok(p)
}

pub fn decode_publish(r: &mut Reader) -> Result<PublishProperties, DecodeError> {
    let mut p = PublishProperties::default();
    let mut pr = PropReader::new(r, "PUBLISH")?;
    while let Some(id) = pr.next_id()? {
        match id {
            PAYLOAD_FORMAT_INDICATOR => p.payload_format_indicator = Some(pr.payload_format()?),
            MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(pr.u32(id)?),
            TOPIC_ALIAS => match pr.u16(id)? {
                0 => return Err(DecodeError::TopicAliasZero),
                v => p.topic_alias = Some(v),
            },
            RESPONSE_TOPIC => p.response_topic = Some(pr.response_topic()?),
            CORRELATION_DATA => p.correlation_data = Some(pr.binary(id)?),
            USER_PROPERTY => p.user_properties.push(pr.user_property()?),
            SUBSCRIPTION_IDENTIFIER => p.subscription_identifiers.push(pr.subscription_id()?),
            CONTENT_TYPE => p.content_type = Some(pr.string(id)?),
            _ => return Err(pr.not_allowed(id)),
        }
    }
    Ok(p)
}

/// Properties of PUBACK/PUBREC/PUBREL/PUBCOMP/SUBACK/UNSUBACK.
pub fn decode_ack(r: &mut Reader, packet: &'static str) -> Result<AckProperties, DecodeError> {
    let mut p = AckProperties::default();
    let mut pr = PropReader::new(r, packet)?;
    while let Some(id) = pr.next_id()? {
        match id {
            REASON_STRING => p.reason_string = Some(pr.string(id)?),
            USER_PROPERTY => p.user_properties.push(pr.user_property()?),
            _ => return Err(pr.not_allowed(id)),
        }
    }
    Ok(p)
}

pub fn decode_subscribe(r: &mut Reader) -> Result<SubscribeProperties, DecodeError> {
    let mut p = SubscribeProperties::default();
    let mut pr = PropReader::new(r, "SUBSCRIBE")?;
    while let Some(id) = pr.next_id()? {
        match id {
            SUBSCRIPTION_IDENTIFIER => {
                // Only one is allowed here, unlike in PUBLISH [MQTT-3.8.2.1.2].
                pr.once(id)?;
                p.subscription_identifier = Some(pr.subscription_id()?);
            }
            USER_PROPERTY => p.user_properties.push(pr.user_property()?),
            _ => return Err(pr.not_allowed(id)),
        }
    }
    Ok(p)
}

/// UNSUBSCRIBE carries only user properties [MQTT-3.10.2.1].
pub fn decode_unsubscribe(r: &mut Reader) -> Result<Vec<UserProperty>, DecodeError> {
    let mut v = Vec::new();
    let mut pr = PropReader::new(r, "UNSUBSCRIBE")?;
    while let Some(id) = pr.next_id()? {
        match id {
            USER_PROPERTY => v.push(pr.user_property()?),
            _ => return Err(pr.not_allowed(id)),
        }
    }
    Ok(v)
}

pub fn decode_disconnect(r: &mut Reader) -> Result<DisconnectProperties, DecodeError> {
    let mut p = DisconnectProperties::default();
    let mut pr = PropReader::new(r, "DISCONNECT")?;
    while let Some(id) = pr.next_id()? {
        match id {
            SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(pr.u32(id)?),
            REASON_STRING => p.reason_string = Some(pr.string(id)?),
            USER_PROPERTY => p.user_properties.push(pr.user_property()?),
            SERVER_REFERENCE => p.server_reference = Some(pr.string(id)?),
            _ => return Err(pr.not_allowed(id)),
        }
    }
    Ok(p)
}

pub fn decode_auth(r: &mut Reader) -> Result<AuthProperties, DecodeError> {
    let mut p = AuthProperties::default();
    let mut pr = PropReader::new(r, "AUTH")?;
    while let Some(id) = pr.next_id()? {
        match id {
            AUTHENTICATION_METHOD => p.authentication_method = Some(pr.string(id)?),
            AUTHENTICATION_DATA => p.authentication_data = Some(pr.binary(id)?),
            REASON_STRING => p.reason_string = Some(pr.string(id)?),
            USER_PROPERTY => p.user_properties.push(pr.user_property()?),
            _ => return Err(pr.not_allowed(id)),
        }
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// Encoding. Each `write_*` writes the properties *without* their length prefix; `write_props`
// measures them with a counting sink first, then writes length and body. One code path.

/// Writes the property length followed by the properties that `body` writes.
pub fn write_props(s: &mut dyn Sink, body: impl Fn(&mut dyn Sink)) {
    let mut count = super::encode::Count(0);
    body(&mut count);
    s.var_int(count.0 as u32);
    body(s);
}

fn opt_u8(s: &mut dyn Sink, id: u8, v: Option<u8>) {
    if let Some(v) = v {
        s.u8(id);
        s.u8(v);
    }
}
fn opt_bool(s: &mut dyn Sink, id: u8, v: Option<bool>) {
    opt_u8(s, id, v.map(u8::from));
}
fn opt_u16(s: &mut dyn Sink, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        s.u8(id);
        s.u16(v);
    }
}
fn opt_u32(s: &mut dyn Sink, id: u8, v: Option<u32>) {
    if let Some(v) = v {
        s.u8(id);
        s.u32(v);
    }
}
fn opt_str(s: &mut dyn Sink, id: u8, v: Option<&str>) {
    if let Some(v) = v {
        s.u8(id);
        s.string(v);
    }
}
fn opt_bin(s: &mut dyn Sink, id: u8, v: Option<&Bytes>) {
    if let Some(v) = v {
        s.u8(id);
        s.binary(v);
    }
}
fn users(s: &mut dyn Sink, v: &[UserProperty]) {
    for (k, val) in v {
        s.u8(USER_PROPERTY);
        s.string(k);
        s.string(val);
    }
}

pub fn write_connect(s: &mut dyn Sink, p: &ConnectProperties) {
    opt_u32(s, SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    opt_u16(s, RECEIVE_MAXIMUM, p.receive_maximum);
    opt_u32(s, MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    opt_u16(s, TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    opt_bool(
        s,
        REQUEST_RESPONSE_INFORMATION,
        p.request_response_information,
    );
    opt_bool(
        s,
        REQUEST_PROBLEM_INFORMATION,
        p.request_problem_information,
    );
    users(s, &p.user_properties);
    opt_str(s, AUTHENTICATION_METHOD, p.authentication_method.as_deref());
    opt_bin(s, AUTHENTICATION_DATA, p.authentication_data.as_ref());
}

pub fn write_will(s: &mut dyn Sink, p: &WillProperties) {
    opt_u32(s, WILL_DELAY_INTERVAL, p.will_delay_interval);
    opt_u8(s, PAYLOAD_FORMAT_INDICATOR, p.payload_format_indicator);
    opt_u32(s, MESSAGE_EXPIRY_INTERVAL, p.message_expiry_interval);
    opt_str(s, CONTENT_TYPE, p.content_type.as_deref());
    opt_str(
        s,
        RESPONSE_TOPIC,
        p.response_topic.as_ref().map(|t| t.as_str()),
    );
    opt_bin(s, CORRELATION_DATA, p.correlation_data.as_ref());
    users(s, &p.user_properties);
}

pub fn write_connack(s: &mut dyn Sink, p: &ConnAckProperties) {
    opt_u32(s, SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    opt_u16(s, RECEIVE_MAXIMUM, p.receive_maximum);
    opt_u8(s, MAXIMUM_QOS, p.maximum_qos.map(|q| q as u8));
    opt_bool(s, RETAIN_AVAILABLE, p.retain_available);
    opt_u32(s, MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    opt_str(
        s,
        ASSIGNED_CLIENT_IDENTIFIER,
        p.assigned_client_identifier.as_deref(),
    );
    opt_u16(s, TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    opt_str(s, REASON_STRING, p.reason_string.as_deref());
    users(s, &p.user_properties);
    opt_bool(
        s,
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        p.wildcard_subscription_available,
    );
    opt_bool(
        s,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        p.subscription_identifiers_available,
    );
    opt_bool(
        s,
        SHARED_SUBSCRIPTION_AVAILABLE,
        p.shared_subscription_available,
    );
    opt_u16(s, SERVER_KEEP_ALIVE, p.server_keep_alive);
    opt_str(s, RESPONSE_INFORMATION, p.response_information.as_deref());
    opt_str(s, SERVER_REFERENCE, p.server_reference.as_deref());
    opt_str(s, AUTHENTICATION_METHOD, p.authentication_method.as_deref());
    opt_bin(s, AUTHENTICATION_DATA, p.authentication_data.as_ref());
}

pub fn write_publish(s: &mut dyn Sink, p: &PublishProperties) {
    opt_u8(s, PAYLOAD_FORMAT_INDICATOR, p.payload_format_indicator);
    opt_u32(s, MESSAGE_EXPIRY_INTERVAL, p.message_expiry_interval);
    opt_u16(s, TOPIC_ALIAS, p.topic_alias);
    opt_str(
        s,
        RESPONSE_TOPIC,
        p.response_topic.as_ref().map(|t| t.as_str()),
    );
    opt_bin(s, CORRELATION_DATA, p.correlation_data.as_ref());
    users(s, &p.user_properties);
    for &id in &p.subscription_identifiers {
        s.u8(SUBSCRIPTION_IDENTIFIER);
        s.var_int(id);
    }
    opt_str(s, CONTENT_TYPE, p.content_type.as_deref());
}

pub fn write_ack(s: &mut dyn Sink, p: &AckProperties) {
    opt_str(s, REASON_STRING, p.reason_string.as_deref());
    users(s, &p.user_properties);
}

pub fn write_subscribe(s: &mut dyn Sink, p: &SubscribeProperties) {
    if let Some(id) = p.subscription_identifier {
        s.u8(SUBSCRIPTION_IDENTIFIER);
        s.var_int(id);
    }
    users(s, &p.user_properties);
}

pub fn write_users(s: &mut dyn Sink, p: &[UserProperty]) {
    users(s, p);
}

pub fn write_disconnect(s: &mut dyn Sink, p: &DisconnectProperties) {
    opt_u32(s, SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    opt_str(s, REASON_STRING, p.reason_string.as_deref());
    users(s, &p.user_properties);
    opt_str(s, SERVER_REFERENCE, p.server_reference.as_deref());
}

pub fn write_auth(s: &mut dyn Sink, p: &AuthProperties) {
    opt_str(s, AUTHENTICATION_METHOD, p.authentication_method.as_deref());
    opt_bin(s, AUTHENTICATION_DATA, p.authentication_data.as_ref());
    opt_str(s, REASON_STRING, p.reason_string.as_deref());
    users(s, &p.user_properties);
}
