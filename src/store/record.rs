//! What a log record means: the events a shard makes durable, and their byte encoding.
//!
//! Owns: [`Record`] and its payload encoding (little endian, strings and byte strings with a
//! u32 length). Must not touch: framing (`log.rs`), what recovery makes of records
//! (`recover.rs`), when records are written (the shard core).
//!
//! Every record names the client it concerns and carries a timestamp (`ts`, nanoseconds of
//! wall time, strictly increasing per shard), so records of all shards can be merged in one
//! order whatever shard wrote them: a session that moved between shards, or a shard count
//! that changed, needs no rewriting. A stored message is identified by `sid` = origin shard
//! (top 16 bits) and a per-origin sequence (48 bits), never 0.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

use crate::codec::{
    self, LastWill, Limits, Packet, ProtocolVersion, Publish, PublishProperties, QoS,
    RetainHandling, SubscriptionOptions, TopicFilter, WillProperties,
};

pub const KIND_MSG: u8 = 2;
pub const KIND_START: u8 = 3;
pub const KIND_SUB: u8 = 4;
pub const KIND_UNSUB: u8 = 5;
pub const KIND_DISC: u8 = 6;
pub const KIND_END: u8 = 7;
pub const KIND_ACK: u8 = 8;
pub const KIND_SENT: u8 = 9;
pub const KIND_REL: u8 = 10;
pub const KIND_INREL: u8 = 11;
pub const KIND_WILL: u8 = 12;
pub const KIND_WILL_GONE: u8 = 13;

/// `Will::listener` of a will whose listener checks nothing (no ACL, no password file).
pub const NO_LISTENER: u16 = u16::MAX;
pub const KIND_MARK: u8 = 14;
/// The first frame of a compacted file (`crate::store::compact`): which segments it covers.
pub const KIND_COVER: u8 = 15;
/// Every frame kind of the log, in one place so two can never share a number (the batch
/// marker is `log::KIND_BATCH`).
pub const ALL_KINDS: [u8; 15] = [
    super::log::KIND_BATCH,
    KIND_MSG,
    KIND_START,
    KIND_SUB,
    KIND_UNSUB,
    KIND_DISC,
    KIND_END,
    KIND_ACK,
    KIND_SENT,
    KIND_REL,
    KIND_INREL,
    KIND_WILL,
    KIND_WILL_GONE,
    KIND_MARK,
    KIND_COVER,
];

/// `sid` of a message: origin shard and sequence.
pub fn sid(origin: usize, seq: u64) -> u64 {
    ((origin as u64) << 48) | (seq & ((1 << 48) - 1))
}

pub fn sid_origin(sid: u64) -> usize {
    (sid >> 48) as usize
}

pub fn sid_seq(sid: u64) -> u64 {
    sid & ((1 << 48) - 1)
}

/// A durable event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A message accepted from `client` (QoS 1/2, or retained): the publisher's PUBACK /
    /// PUBREC waits for it. `in_pid`: the client's QoS 2 packet id (0: none), pending until
    /// an `InRel`. `expires`: wall ns, 0 = never. `publish`: the message as a v5 PUBLISH.
    Msg {
        ts: u64,
        sid: u64,
        client: ByteString,
        in_pid: u16,
        expires: u64,
        publish: Bytes,
    },
    /// A persistent session of `client` started on a connection (`clean`: nothing carried
    /// over). `expiry`: its session expiry interval in seconds.
    Start {
        ts: u64,
        client: ByteString,
        clean: bool,
        expiry: u32,
    },
    Sub {
        ts: u64,
        client: ByteString,
        filter: ByteString,
        options: u8,
        sub_id: u32,
    },
    Unsub {
        ts: u64,
        client: ByteString,
        filter: ByteString,
    },
    /// The connection closed; the session stays with this expiry interval.
    Disc {
        ts: u64,
        client: ByteString,
        expiry: u32,
    },
    /// The session ended (expired, clean start, expiry 0).
    End { ts: u64, client: ByteString },
    /// Delivery of message `sid` to `client` is complete (PUBACK, PUBCOMP, refused).
    Ack {
        ts: u64,
        client: ByteString,
        sid: u64,
    },
    /// QoS 2 message `sid` was first sent to `client` with packet id `pid`.
    Sent {
        ts: u64,
        client: ByteString,
        sid: u64,
        pid: u16,
    },
    /// `client` answered PUBREC for `sid`: only the PUBREL/PUBCOMP exchange is left.
    Rel {
        ts: u64,
        client: ByteString,
        sid: u64,
    },
    /// `client` released its QoS 2 packet id `pid` (PUBREL).
    InRel {
        ts: u64,
        client: ByteString,
        pid: u16,
    },
    /// The connection of persistent session `client` carries a will with a delay (`delay`
    /// seconds): if the connection is lost, it is published after the delay or when the
    /// session ends, restart or not. `publish`: the will as a v5 PUBLISH (its message expiry
    /// as a property). `listener`/`username`: whom the ACL checks when it is published
    /// (`NO_LISTENER`: nothing to check).
    Will {
        ts: u64,
        client: ByteString,
        delay: u32,
        listener: u16,
        username: Option<ByteString>,
        publish: Bytes,
    },
    /// The will of `client` is gone: published, or discarded by a normal DISCONNECT.
    WillGone { ts: u64, client: ByteString },
    /// Written by runtime compaction (`crate::store::compact`), never by a shard: what the
    /// records it dropped still told recovery, the latest timestamp (`ts`) and the next message
    /// sequence of each origin shard. `client` is empty.
    Mark {
        ts: u64,
        client: ByteString,
        next_seq: Vec<(u16, u64)>,
    },
}

pub fn options_byte(o: SubscriptionOptions) -> u8 {
    let rh = match o.retain_handling {
        RetainHandling::OnSubscribe => 0,
        RetainHandling::OnNewSubscribe => 1,
        RetainHandling::Never => 2,
    };
    (o.qos as u8) | (u8::from(o.no_local) << 2) | (u8::from(o.retain_as_published) << 3) | (rh << 4)
}

pub fn options_from(b: u8) -> SubscriptionOptions {
    SubscriptionOptions {
        qos: qos_from(b & 3),
        no_local: b & 4 != 0,
        retain_as_published: b & 8 != 0,
        retain_handling: match (b >> 4) & 3 {
            0 => RetainHandling::OnSubscribe,
            1 => RetainHandling::OnNewSubscribe,
            _ => RetainHandling::Never,
        },
    }
}

pub fn qos_from(b: u8) -> QoS {
    match b {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

struct W<'a>(&'a mut Vec<u8>);

impl W<'_> {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
}

/// A record payload that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record of kind {kind}: {why}")]
pub struct BadRecord {
    pub kind: u8,
    pub why: &'static str,
}

struct R<'a> {
    b: &'a [u8],
    kind: u8,
}

impl R<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], BadRecord> {
        if self.b.len() < n {
            return Err(BadRecord {
                kind: self.kind,
                why: "payload too short",
            });
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, BadRecord> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, BadRecord> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, BadRecord> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, BadRecord> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn bytes(&mut self) -> Result<&[u8], BadRecord> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<ByteString, BadRecord> {
        let kind = self.kind;
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(ByteString::from)
            .map_err(|_| BadRecord {
                kind,
                why: "string is not UTF-8",
            })
    }
}

impl Record {
    pub fn kind(&self) -> u8 {
        match self {
            Record::Msg { .. } => KIND_MSG,
            Record::Start { .. } => KIND_START,
            Record::Sub { .. } => KIND_SUB,
            Record::Unsub { .. } => KIND_UNSUB,
            Record::Disc { .. } => KIND_DISC,
            Record::End { .. } => KIND_END,
            Record::Ack { .. } => KIND_ACK,
            Record::Sent { .. } => KIND_SENT,
            Record::Rel { .. } => KIND_REL,
            Record::InRel { .. } => KIND_INREL,
            Record::Will { .. } => KIND_WILL,
            Record::WillGone { .. } => KIND_WILL_GONE,
            Record::Mark { .. } => KIND_MARK,
        }
    }

    pub fn ts(&self) -> u64 {
        match self {
            Record::Msg { ts, .. }
            | Record::Start { ts, .. }
            | Record::Sub { ts, .. }
            | Record::Unsub { ts, .. }
            | Record::Disc { ts, .. }
            | Record::End { ts, .. }
            | Record::Ack { ts, .. }
            | Record::Sent { ts, .. }
            | Record::Rel { ts, .. }
            | Record::InRel { ts, .. }
            | Record::Will { ts, .. }
            | Record::WillGone { ts, .. }
            | Record::Mark { ts, .. } => *ts,
        }
    }

    pub fn client(&self) -> &ByteString {
        match self {
            Record::Msg { client, .. }
            | Record::Start { client, .. }
            | Record::Sub { client, .. }
            | Record::Unsub { client, .. }
            | Record::Disc { client, .. }
            | Record::End { client, .. }
            | Record::Ack { client, .. }
            | Record::Sent { client, .. }
            | Record::Rel { client, .. }
            | Record::InRel { client, .. }
            | Record::Will { client, .. }
            | Record::WillGone { client, .. }
            | Record::Mark { client, .. } => client,
        }
    }

    /// The payload bytes (without kind).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = W(out);
        match self {
            Record::Msg {
                ts,
                sid,
                client,
                in_pid,
                expires,
                publish,
            } => {
                w.u64(*ts)
                    .u64(*sid)
                    .bytes(client.as_bytes())
                    .u16(*in_pid)
                    .u64(*expires)
                    .bytes(publish);
            }
            Record::Start {
                ts,
                client,
                clean,
                expiry,
            } => {
                w.u64(*ts)
                    .bytes(client.as_bytes())
                    .u8(u8::from(*clean))
                    .u32(*expiry);
            }
            Record::Sub {
                ts,
                client,
                filter,
                options,
                sub_id,
            } => {
                w.u64(*ts)
                    .bytes(client.as_bytes())
                    .bytes(filter.as_bytes())
                    .u8(*options)
                    .u32(*sub_id);
            }
            Record::Unsub { ts, client, filter } => {
                w.u64(*ts).bytes(client.as_bytes()).bytes(filter.as_bytes());
            }
            Record::Disc { ts, client, expiry } => {
                w.u64(*ts).bytes(client.as_bytes()).u32(*expiry);
            }
            Record::End { ts, client } => {
                w.u64(*ts).bytes(client.as_bytes());
            }
            Record::Ack { ts, client, sid } | Record::Rel { ts, client, sid } => {
                w.u64(*ts).bytes(client.as_bytes()).u64(*sid);
            }
            Record::Sent {
                ts,
                client,
                sid,
                pid,
            } => {
                w.u64(*ts).bytes(client.as_bytes()).u64(*sid).u16(*pid);
            }
            Record::InRel { ts, client, pid } => {
                w.u64(*ts).bytes(client.as_bytes()).u16(*pid);
            }
            Record::Will {
                ts,
                client,
                delay,
                listener,
                username,
                publish,
            } => {
                w.u64(*ts)
                    .bytes(client.as_bytes())
                    .u32(*delay)
                    .u16(*listener)
                    .u8(u8::from(username.is_some()))
                    .bytes(username.as_deref().unwrap_or("").as_bytes())
                    .bytes(publish);
            }
            Record::WillGone { ts, client } => {
                w.u64(*ts).bytes(client.as_bytes());
            }
            Record::Mark {
                ts,
                client,
                next_seq,
            } => {
                w.u64(*ts)
                    .bytes(client.as_bytes())
                    .u32(next_seq.len() as u32);
                for &(origin, next) in next_seq {
                    w.u16(origin).u64(next);
                }
            }
        }
    }

    pub fn decode(kind: u8, b: &[u8]) -> Result<Record, BadRecord> {
        if kind == KIND_MSG {
            // The sid sits before the client in this encoding.
            let mut r = R { b, kind };
            let ts = r.u64()?;
            let sid = r.u64()?;
            let client = r.string()?;
            let in_pid = r.u16()?;
            let expires = r.u64()?;
            let publish = Bytes::copy_from_slice(r.bytes()?);
            return Ok(Record::Msg {
                ts,
                sid,
                client,
                in_pid,
                expires,
                publish,
            });
        }
        let mut r = R { b, kind };
        let ts = r.u64()?;
        let client = r.string()?;
        let rec = match kind {
            KIND_START => Record::Start {
                ts,
                client,
                clean: r.u8()? != 0,
                expiry: r.u32()?,
            },
            KIND_SUB => Record::Sub {
                ts,
                client,
                filter: r.string()?,
                options: r.u8()?,
                sub_id: r.u32()?,
            },
            KIND_UNSUB => Record::Unsub {
                ts,
                client,
                filter: r.string()?,
            },
            KIND_DISC => Record::Disc {
                ts,
                client,
                expiry: r.u32()?,
            },
            KIND_END => Record::End { ts, client },
            KIND_ACK => Record::Ack {
                ts,
                client,
                sid: r.u64()?,
            },
            KIND_SENT => Record::Sent {
                ts,
                client,
                sid: r.u64()?,
                pid: r.u16()?,
            },
            KIND_REL => Record::Rel {
                ts,
                client,
                sid: r.u64()?,
            },
            KIND_INREL => Record::InRel {
                ts,
                client,
                pid: r.u16()?,
            },
            KIND_WILL => {
                let delay = r.u32()?;
                let listener = r.u16()?;
                let has_name = r.u8()? != 0;
                let name = r.string()?;
                Record::Will {
                    ts,
                    client,
                    delay,
                    listener,
                    username: has_name.then_some(name),
                    publish: Bytes::copy_from_slice(r.bytes()?),
                }
            }
            KIND_WILL_GONE => Record::WillGone { ts, client },
            KIND_MARK => {
                let n = r.u32()? as usize;
                // Each entry is 10 bytes: a count beyond the payload is damage, not a size
                // to allocate.
                if n > r.b.len() / 10 {
                    return Err(BadRecord {
                        kind,
                        why: "payload too short",
                    });
                }
                let mut next_seq = Vec::with_capacity(n);
                for _ in 0..n {
                    next_seq.push((r.u16()?, r.u64()?));
                }
                Record::Mark {
                    ts,
                    client,
                    next_seq,
                }
            }
            _ => {
                return Err(BadRecord {
                    kind,
                    why: "unknown record kind",
                })
            }
        };
        Ok(rec)
    }
}

/// A message as the v5 PUBLISH stored in a `Msg` record (packet id 1 for QoS 1/2: the
/// client's own id is `in_pid`; expiry is stored apart, as wall time).
pub fn encode_publish(msg: &crate::message::Message) -> Bytes {
    let p = Publish {
        dup: false,
        qos: msg.qos,
        retain: msg.retain,
        topic: msg.topic.clone(),
        packet_id: u16::from(msg.qos != QoS::AtMostOnce),
        payload: msg.payload.clone(),
        properties: msg
            .properties
            .as_deref()
            .cloned()
            .unwrap_or_default()
            .into(),
    };
    encode_v5(p)
}

fn encode_v5(p: Publish) -> Bytes {
    let mut buf = BytesMut::new();
    codec::encode(&Packet::Publish(p), ProtocolVersion::V5, &mut buf);
    buf.freeze()
}

/// The message a `Msg` record stores (its `expires_at` and `origin` are the caller's).
pub fn decode_publish(b: &[u8]) -> Result<Publish, &'static str> {
    let mut buf = BytesMut::from(b);
    let limits = Limits {
        max_packet_size: u32::MAX,
    };
    match codec::decode(&mut buf, ProtocolVersion::V5, &limits) {
        Ok(Some(Packet::Publish(p))) => Ok(p),
        Ok(Some(_)) => Err("stored message is not a PUBLISH"),
        Ok(None) => Err("stored message is cut short"),
        Err(_) => Err("stored message does not decode"),
    }
}

/// A will as the v5 PUBLISH a `Will` record stores: its properties as PUBLISH properties,
/// its message expiry interval among them (it starts counting when the will is published).
pub fn encode_will(w: &LastWill) -> Bytes {
    let wp = &w.properties;
    let props = PublishProperties {
        payload_format_indicator: wp.payload_format_indicator,
        message_expiry_interval: wp.message_expiry_interval,
        content_type: wp.content_type.clone(),
        response_topic: wp.response_topic.clone(),
        correlation_data: wp.correlation_data.clone(),
        user_properties: wp.user_properties.clone(),
        ..PublishProperties::default()
    };
    let p = Publish {
        dup: false,
        qos: w.qos,
        retain: w.retain,
        topic: w.topic.clone(),
        packet_id: u16::from(w.qos != QoS::AtMostOnce),
        payload: w.payload.clone(),
        properties: props.into(),
    };
    encode_v5(p)
}

/// The will a `Will` record stores, with its delay.
pub fn decode_will(b: &[u8], delay: u32) -> Result<LastWill, &'static str> {
    let p = decode_publish(b)?;
    let pp = p.properties.into_inner();
    Ok(LastWill {
        topic: p.topic,
        payload: Bytes::copy_from_slice(&p.payload),
        qos: p.qos,
        retain: p.retain,
        properties: WillProperties {
            will_delay_interval: Some(delay),
            payload_format_indicator: pp.payload_format_indicator,
            message_expiry_interval: pp.message_expiry_interval,
            content_type: pp.content_type,
            response_topic: pp.response_topic,
            correlation_data: pp.correlation_data,
            user_properties: pp.user_properties,
        },
    })
}

/// Whether `f` is a valid filter (records are checked before use).
pub fn filter(f: &ByteString) -> Option<TopicFilter> {
    TopicFilter::new(f.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_kinds_are_distinct() {
        let mut k = ALL_KINDS.to_vec();
        k.sort_unstable();
        k.dedup();
        assert_eq!(k.len(), ALL_KINDS.len(), "two frame kinds share a number");
    }

    #[test]
    fn records_round_trip() {
        let c = ByteString::from("dev-1");
        let all = vec![
            Record::Msg {
                ts: 5,
                sid: sid(3, 77),
                client: c.clone(),
                in_pid: 9,
                expires: 0,
                publish: Bytes::from_static(b"xyz"),
            },
            Record::Start {
                ts: 6,
                client: c.clone(),
                clean: true,
                expiry: u32::MAX,
            },
            Record::Sub {
                ts: 7,
                client: c.clone(),
                filter: "a/+".into(),
                options: 0x1A,
                sub_id: 4,
            },
            Record::Unsub {
                ts: 8,
                client: c.clone(),
                filter: "a/+".into(),
            },
            Record::Disc {
                ts: 9,
                client: c.clone(),
                expiry: 60,
            },
            Record::End {
                ts: 10,
                client: c.clone(),
            },
            Record::Ack {
                ts: 11,
                client: c.clone(),
                sid: 1,
            },
            Record::Sent {
                ts: 12,
                client: c.clone(),
                sid: 2,
                pid: 3,
            },
            Record::Rel {
                ts: 13,
                client: c.clone(),
                sid: 2,
            },
            Record::Mark {
                ts: 15,
                client: ByteString::new(),
                next_seq: vec![(0, 12), (3, 78)],
            },
            Record::InRel {
                ts: 14,
                client: c.clone(),
                pid: 3,
            },
            Record::Will {
                ts: 15,
                client: c.clone(),
                delay: 30,
                listener: 1,
                username: Some("u".into()),
                publish: Bytes::from_static(b"will"),
            },
            Record::Will {
                ts: 16,
                client: c.clone(),
                delay: 1,
                listener: NO_LISTENER,
                username: None,
                publish: Bytes::from_static(b"w"),
            },
            Record::WillGone { ts: 17, client: c },
        ];
        for r in all {
            let mut b = Vec::new();
            r.encode(&mut b);
            assert_eq!(Record::decode(r.kind(), &b).unwrap(), r);
            assert!(Record::decode(r.kind(), &b[..b.len() - 1]).is_err());
        }
        assert_eq!(
            options_from(options_byte(options_from(0x2B))),
            options_from(0x2B)
        );
        let will = LastWill {
            topic: crate::codec::TopicName::new("dev/1/status".to_string()).unwrap(),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: WillProperties {
                will_delay_interval: Some(30),
                message_expiry_interval: Some(600),
                content_type: Some("text/plain".into()),
                ..WillProperties::default()
            },
        };
        assert_eq!(decode_will(&encode_will(&will), 30).unwrap(), will);
        assert_eq!(sid_origin(sid(5, 9)), 5);
        assert_eq!(sid_seq(sid(5, 9)), 9);
    }
}
