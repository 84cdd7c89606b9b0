//! Decoding: bytes → [`Packet`].
//!
//! Owns: the fixed header (type, flags, remaining length), the size limit, and the variable
//! header and payload of every packet type. The decoder is resumable: it consumes nothing from
//! the caller's buffer until a whole packet is there, and it checks the announced size against
//! [`Limits`] as soon as the fixed header is readable, before any body is buffered. The body is
//! split off and frozen once; every string and binary field of the result is a slice of it
//! (zero copy). Must not touch: session rules that need state (packet-id reuse, topic-alias
//! resolution, a second CONNECT) — those belong to the session.

use bytes::{Buf, Bytes, BytesMut};
use bytestring::ByteString;

use super::error::DecodeError;
use super::packet::*;
use super::props;
use super::reason::ReasonCode;
use super::topic::{TopicFilter, TopicName};
use super::Limits;

/// A bounds-checked cursor over a frozen packet body. Every read reports which field ran past
/// the end, so truncated packets get a precise error rather than a panic.
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(DecodeError::UnexpectedEnd { field });
        }
        Ok(self.buf.get_u8())
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(DecodeError::UnexpectedEnd { field });
        }
        Ok(self.buf.get_u16())
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(DecodeError::UnexpectedEnd { field });
        }
        Ok(self.buf.get_u32())
    }

    /// A variable byte integer [MQTT-1.5.5]: at most 4 bytes.
    pub fn var_int(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8(field)?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::VarIntTooLong { field })
    }

    /// The next `n` bytes as a shared slice of the body (no copy).
    pub fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::UnexpectedEnd { field });
        }
        Ok(self.buf.split_to(n))
    }

    /// Everything left (the PUBLISH payload, the reason codes of SUBACK/UNSUBACK).
    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Binary Data: two-byte length then bytes [MQTT-1.5.6].
    pub fn binary(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let n = self.u16(field)?;
        self.take(n.into(), field)
    }

    /// UTF-8 Encoded String [MQTT-1.5.4]: well-formed UTF-8 (which already excludes the
    /// surrogates U+D800..U+DFFF) and no U+0000.
    pub fn string(&mut self, field: &'static str) -> Result<ByteString, DecodeError> {
        let b = self.binary(field)?;
        if b.contains(&0) {
            return Err(DecodeError::NullCharacter { field });
        }
        ByteString::try_from(b).map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    fn finish(&self, packet: &'static str) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                packet,
                extra: self.buf.len(),
            })
        }
    }
}

/// Name of a packet type for errors.
fn type_name(t: u8) -> &'static str {
    match t {
        1 => "CONNECT",
        2 => "CONNACK",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        8 => "SUBSCRIBE",
        9 => "SUBACK",
        10 => "UNSUBSCRIBE",
        11 => "UNSUBACK",
        12 => "PINGREQ",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        15 => "AUTH",
        _ => "reserved",
    }
}

/// Checks the first byte of the fixed header [MQTT-2.1.2, MQTT-2.1.3] so a bad stream fails on
/// its first byte, not after a body has been buffered.
fn check_header(byte: u8, version: ProtocolVersion) -> Result<(), DecodeError> {
    let t = byte >> 4;
    let flags = byte & 0x0F;
    let (expected, clause) = match t {
        0 => return Err(DecodeError::ReservedPacketType),
        3 => {
            let qos = (flags >> 1) & 3;
            if qos == 3 {
                return Err(DecodeError::PublishQos3);
            }
            if qos == 0 && flags & 0x08 != 0 {
                return Err(DecodeError::DupOnQos0);
            }
            return Ok(());
        }
        15 if !version.is_v5() => return Err(DecodeError::AuthBeforeV5),
        6 => (0b0010, "[MQTT-3.6.1-1]"),
        8 => (0b0010, "[MQTT-3.8.1-1]"),
        10 => (0b0010, "[MQTT-3.10.1-1]"),
        14 => (0, "[MQTT-3.14.1-1]"),
        _ => (0, "[MQTT-2.1.3-1]"),
    };
    // MQTT 3.1 clients set DUP on retransmitted PUBREL/SUBSCRIBE/UNSUBSCRIBE (3.1 had no
    // reserved flags), and mosquitto accepts that; only the QoS bits are checked there.
    // CONNECT is exempt: its version is not known until it is read.
    let ok = if version == ProtocolVersion::V31 && t != 1 {
        expected == 0 || flags & 0b0110 == 0b0010
    } else {
        flags == expected
    };
    if ok {
        Ok(())
    } else {
        Err(DecodeError::BadFlags {
            packet: type_name(t),
            expected,
            got: flags,
            clause,
        })
    }
}

/// Parses the remaining length after the first byte. `Ok(None)`: more bytes needed.
/// Returns (value, number of length bytes).
fn remaining_length(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value = 0u32;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::RemainingLengthTooLong)
}

/// See [`super::decode()`].
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    limits: &Limits,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // CONNECT announces its own version; check its flags the strict way.
    let header_version = if first >> 4 == 1 {
        ProtocolVersion::V311
    } else {
        version
    };
    check_header(first, header_version)?;
    let Some((remaining, len_bytes)) = remaining_length(buf)? else {
        return Ok(None);
    };
    let total = 1 + len_bytes as u64 + u64::from(remaining);
    if total > u64::from(limits.max_packet_size) {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: limits.max_packet_size,
        });
    }
    if (buf.len() as u64) < total {
        return Ok(None);
    }
    buf.advance(1 + len_bytes);
    let body = buf.split_to(remaining as usize).freeze();
    if first >> 4 == 3 {
        // The hot path: build the PUBLISH in place rather than moving a large `Packet` through
        // the generic dispatcher (measurably cheaper; see benches/codec.rs).
        let mut r = Reader::new(body);
        let p = publish(&mut r, first, version)?;
        return Ok(Some(Packet::Publish(p)));
    }
    decode_body(first, body, version).map(Some)
}

fn decode_body(first: u8, body: Bytes, version: ProtocolVersion) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    let t = first >> 4;
    let v5 = version.is_v5();
    let packet = match t {
        1 => Packet::Connect(Box::new(connect(&mut r)?)),
        2 => Packet::ConnAck(Box::new(connack(&mut r, version)?)),
        3 => Packet::Publish(publish(&mut r, first, version)?),
        4 => Packet::PubAck(pub_resp(&mut r, "PUBACK", v5, PUBACK_CODES)?),
        5 => Packet::PubRec(pub_resp(&mut r, "PUBREC", v5, PUBACK_CODES)?),
        6 => Packet::PubRel(pub_resp(&mut r, "PUBREL", v5, PUBREL_CODES)?),
        7 => Packet::PubComp(pub_resp(&mut r, "PUBCOMP", v5, PUBREL_CODES)?),
        8 => Packet::Subscribe(subscribe(&mut r, version)?),
        9 => Packet::SubAck(suback(&mut r, v5)?),
        10 => Packet::Unsubscribe(unsubscribe(&mut r, v5)?),
        11 => Packet::UnsubAck(unsuback(&mut r, v5)?),
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => Packet::Disconnect(disconnect(&mut r, v5)?),
        15 => Packet::Auth(Box::new(auth(&mut r)?)),
        // check_header rejected 0; a nibble cannot exceed 15.
        _ => return Err(DecodeError::ReservedPacketType),
    };
    r.finish(type_name(t))?;
    Ok(packet)
}

fn packet_id(r: &mut Reader, packet: &'static str) -> Result<u16, DecodeError> {
    match r.u16("packet identifier")? {
        0 => Err(DecodeError::ZeroPacketId { packet }),
        id => Ok(id),
    }
}

fn check_reason(code: u8, allowed: &[u8], packet: &'static str) -> Result<ReasonCode, DecodeError> {
    if allowed.contains(&code) {
        Ok(ReasonCode(code))
    } else {
        Err(DecodeError::InvalidReasonCode { packet, code })
    }
}

// Reason codes each packet may carry [MQTT-3.x.2.1 tables].
const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_CODES: &[u8] = &[0x00, 0x92];
const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

fn connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary("protocol name")?;
    let level = r.u8("protocol level")?;
    // Bit 7 of the level is mosquitto's "bridge" marker (try_private); it does not change
    // the protocol, so it is accepted and dropped.
    let protocol = match (&name[..], level & 0x7F) {
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp", 3) => ProtocolVersion::V31,
        (b"MQTT", l) | (b"MQIsdp", l) => {
            return Err(DecodeError::UnsupportedProtocolVersion { level: l })
        }
        _ => {
            return Err(DecodeError::BadProtocolName {
                name: String::from_utf8_lossy(&name).into_owned(),
            })
        }
    };
    let flags = r.u8("connect flags")?;
    if flags & 0x01 != 0 && protocol != ProtocolVersion::V31 {
        return Err(DecodeError::ConnectReservedFlag);
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::WillFlagsWithoutWill);
    }
    let Some(will_qos) = QoS::from_u8(will_qos) else {
        return Err(DecodeError::WillQos3);
    };
    if password_flag && !username_flag && !protocol.is_v5() {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = r.u16("keep alive")?;
    let properties = if protocol.is_v5() {
        props::decode_connect(r)?
    } else {
        ConnectProperties::default()
    };
    // MQTT 3.1 limits client ids to 23 bytes; mosquitto accepts longer ones and so do we.
    let client_id = r.string("client identifier")?;
    let will = if will_flag {
        let properties = if protocol.is_v5() {
            props::decode_will(r)?
        } else {
            WillProperties::default()
        };
        let topic = r.string("will topic")?;
        let topic = TopicName::new(topic).map_err(|source| DecodeError::InvalidTopicName {
            field: "will topic",
            source,
        })?;
        let payload = r.binary("will payload")?;
        Some(LastWill {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    // Some MQTT 3.1 clients set the user name / password flags and then omit the fields;
    // mosquitto ignores such flags for 3.1, and so do we.
    let lenient = protocol == ProtocolVersion::V31;
    let username = if username_flag && !(lenient && r.is_empty()) {
        Some(r.string("user name")?)
    } else {
        None
    };
    let password = if password_flag && !(lenient && r.is_empty()) {
        Some(r.binary("password")?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn connack(r: &mut Reader, version: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let flags = r.u8("connect acknowledge flags")?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::ConnAckReservedFlags);
    }
    let code = r.u8("connect reason code")?;
    let (reason, properties) = if version.is_v5() {
        let reason = check_reason(code, CONNACK_CODES, "CONNACK")?;
        (reason, props::decode_connack(r)?)
    } else {
        let reason = match code {
            0 => ReasonCode::SUCCESS,
            1 => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            2 => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            3 => ReasonCode::SERVER_UNAVAILABLE,
            4 => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            5 => ReasonCode::NOT_AUTHORIZED,
            code => return Err(DecodeError::InvalidReturnCode { code }),
        };
        (reason, ConnAckProperties::default())
    };
    Ok(ConnAck {
        session_present: flags & 0x01 != 0,
        reason,
        properties,
    })
}

#[inline(always)]
fn publish(r: &mut Reader, first: u8, version: ProtocolVersion) -> Result<Publish, DecodeError> {
    // check_header already rejected QoS 3 and DUP on QoS 0.
    let qos = QoS::from_u8((first >> 1) & 3).unwrap_or_default();
    let topic = r.string("topic name")?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        packet_id(r, "QoS>0 PUBLISH")?
    };
    let properties = if version.is_v5() {
        props::decode_publish(r)?
    } else {
        PublishProperties::default()
    };
    let topic = if topic.is_empty() && version.is_v5() {
        // An empty topic is how a v5 sender uses an established alias [MQTT-3.3.2.3.4].
        if properties.topic_alias.is_none() {
            return Err(DecodeError::EmptyTopicWithoutAlias);
        }
        TopicName::alias_placeholder()
    } else {
        TopicName::new(topic).map_err(|source| DecodeError::InvalidTopicName {
            field: "PUBLISH topic name",
            source,
        })?
    };
    Ok(Publish {
        dup: first & 0x08 != 0,
        qos,
        retain: first & 0x01 != 0,
        topic,
        packet_id,
        payload: r.rest(),
        properties: properties.into(),
    })
}

/// PUBACK/PUBREC/PUBREL/PUBCOMP. In v5 the reason code and properties may be omitted
/// (remaining length 2 → success; 3 → reason only) [MQTT-3.4.2.1, MQTT-3.4.2.2.1].
fn pub_resp(
    r: &mut Reader,
    packet: &'static str,
    v5: bool,
    codes: &[u8],
) -> Result<PubResp, DecodeError> {
    let packet_id = r.u16("packet identifier")?;
    let mut resp = PubResp::new(packet_id);
    if v5 && !r.is_empty() {
        resp.reason = check_reason(r.u8("reason code")?, codes, packet)?;
        if !r.is_empty() {
            resp.properties = props::decode_ack(r, packet)?;
        }
    }
    Ok(resp)
}

fn subscribe(r: &mut Reader, version: ProtocolVersion) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(r, "SUBSCRIBE")?;
    let properties = if version.is_v5() {
        props::decode_subscribe(r)?
    } else {
        SubscribeProperties::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let f = r.string("topic filter")?;
        let filter = TopicFilter::new(f).map_err(DecodeError::InvalidTopicFilter)?;
        let o = r.u8("subscription options")?;
        let reserved = if version.is_v5() { 0xC0 } else { 0xFC };
        if o & reserved != 0 {
            return Err(DecodeError::SubscriptionOptionsReserved);
        }
        let Some(qos) = QoS::from_u8(o & 0x03) else {
            return Err(DecodeError::SubscriptionQos3);
        };
        let no_local = o & 0x04 != 0;
        let retain_handling = match (o >> 4) & 0x03 {
            0 => RetainHandling::OnSubscribe,
            1 => RetainHandling::OnNewSubscribe,
            2 => RetainHandling::Never,
            _ => return Err(DecodeError::RetainHandling3),
        };
        if no_local && filter.is_shared() {
            return Err(DecodeError::NoLocalOnSharedSubscription);
        }
        filters.push((
            filter,
            SubscriptionOptions {
                qos,
                no_local,
                retain_as_published: o & 0x08 != 0,
                retain_handling,
            },
        ));
    }
    if filters.is_empty() {
        return Err(DecodeError::SubscribeWithoutFilters);
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

fn suback(r: &mut Reader, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = r.u16("packet identifier")?;
    let properties = if v5 {
        props::decode_ack(r, "SUBACK")?
    } else {
        AckProperties::default()
    };
    let codes = r.rest();
    let reason_codes = codes
        .iter()
        .map(|&c| {
            if v5 {
                check_reason(c, SUBACK_CODES, "SUBACK")
            } else {
                check_reason(c, &[0x00, 0x01, 0x02, 0x80], "SUBACK")
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SubAck {
        packet_id,
        reason_codes,
        properties,
    })
}

fn unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(r, "UNSUBSCRIBE")?;
    let user_properties = if v5 {
        props::decode_unsubscribe(r)?
    } else {
        Vec::new()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let f = r.string("topic filter")?;
        filters.push(TopicFilter::new(f).map_err(DecodeError::InvalidTopicFilter)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::UnsubscribeWithoutFilters);
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        user_properties,
    })
}

fn unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.u16("packet identifier")?;
    if !v5 {
        // v3 UNSUBACK has no payload [MQTT-3.11.3]; finish() rejects anything more.
        return Ok(UnsubAck {
            packet_id,
            reason_codes: Vec::new(),
            properties: AckProperties::default(),
        });
    }
    let properties = props::decode_ack(r, "UNSUBACK")?;
    let reason_codes = r
        .rest()
        .iter()
        .map(|&c| check_reason(c, UNSUBACK_CODES, "UNSUBACK"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(UnsubAck {
        packet_id,
        reason_codes,
        properties,
    })
}

/// v3 DISCONNECT has no variable header; in v5, remaining length 0 means "normal
/// disconnection, no properties" and 1 means "reason code only" [MQTT-3.14.2.1].
fn disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect, DecodeError> {
    let mut d = Disconnect::default();
    if v5 && !r.is_empty() {
        d.reason = check_reason(r.u8("reason code")?, DISCONNECT_CODES, "DISCONNECT")?;
        if !r.is_empty() {
            d.properties = props::decode_disconnect(r)?;
        }
    }
    Ok(d)
}

/// AUTH (v5 only; check_header rejects it for v3) with the same short forms as DISCONNECT
/// [MQTT-3.15.2.1].
fn auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    let mut a = Auth::default();
    if !r.is_empty() {
        a.reason = check_reason(r.u8("reason code")?, AUTH_CODES, "AUTH")?;
        if !r.is_empty() {
            a.properties = props::decode_auth(r)?;
        }
    }
    Ok(a)
}
