//! The routed application message: what travels from a publisher's session, through the
//! routing tables and cross-shard mailboxes, to each subscriber's session.
//!
//! Owns: the `Message` type only. It is `Send` and cheap to clone (refcounted `Bytes` and an
//! optional `Arc` for the rarely-present v5 properties), so fan-out shares the payload instead
//! of copying it. Must not touch: I/O, encoding, per-subscriber state (packet ids, DUP flags
//! and subscription identifiers are added by the subscriber's session when it sends).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use bytestring::ByteString;

use crate::codec::{PublishProperties, QoS, TopicName};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: TopicName,
    pub payload: Bytes,
    /// QoS as published; each subscriber gets min(this, its granted QoS).
    pub qos: QoS,
    /// The RETAIN flag as published (subscribers see it per retain-as-published rules).
    pub retain: bool,
    /// v5 properties forwarded to subscribers (payload format, content type, response topic,
    /// correlation data, user properties). `None` when there are none, the common case.
    /// Topic alias and subscription identifiers are never stored here: they are per-hop.
    pub properties: Option<Arc<PublishProperties>>,
    /// When the v5 message expiry interval runs out; the remaining interval is sent on.
    pub expires_at: Option<Instant>,
    /// Client id of the publisher, for the v5 no-local option [MQTT-3.8.3-3].
    pub origin: ByteString,
    /// Its identity in the persistent log (`crate::store::record::sid`: origin shard and
    /// sequence), so a subscriber's shard can record its delivery; 0 = not stored.
    pub sid: u64,
}

impl Message {
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// A copy whose topic and payload have their own allocations, for messages kept long
    /// (retained): a decoded message shares the publisher's whole read buffer.
    pub fn detached(&self) -> Message {
        Message {
            topic: self.topic.detached(),
            payload: Bytes::copy_from_slice(&self.payload),
            ..self.clone()
        }
    }

    /// Bytes this message holds in a queue, for the `max_queued_bytes` bound.
    pub fn queued_size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }

    /// Heap bytes this message keeps alive when stored: topic, payload and its v5 properties
    /// (the `Message` itself is counted by whoever holds it).
    pub fn heap_size(&self) -> usize {
        let props = self.properties.as_deref().map_or(0, |p| {
            let s = |v: &bytestring::ByteString| v.len();
            std::mem::size_of::<PublishProperties>()
                + p.response_topic.as_ref().map_or(0, |t| t.len())
                + p.correlation_data.as_ref().map_or(0, |b| b.len())
                + p.content_type.as_ref().map_or(0, s)
                + p.user_properties
                    .iter()
                    .map(|(k, v)| std::mem::size_of::<(ByteString, ByteString)>() + s(k) + s(v))
                    .sum::<usize>()
                + p.subscription_identifiers.len() * 4
        });
        self.topic.len() + self.payload.len() + props
    }
}
