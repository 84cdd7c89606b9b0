//! Sans-IO MQTT 3.1 / 3.1.1 / 5.0 codec.
//!
//! Owns: turning bytes into [`Packet`]s and back, the packet model, reason codes, validated
//! topic newtypes, and decode errors that cite the spec. Must not touch: sockets, sessions,
//! routing, glommio or rustls (enforced by `tests/layering.rs`).

mod decode;
mod encode;
mod error;
pub mod packet;
mod props;
pub mod reason;
pub mod topic;

#[cfg(test)]
mod tests;

pub use error::DecodeError;
pub use packet::*;
pub use reason::ReasonCode;
pub use topic::{TopicError, TopicFilter, TopicName};

use bytes::BytesMut;

/// Limits the decoder enforces before buffering a packet body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole packet (fixed header included) accepted [MQTT-3.1.2.4 Maximum Packet Size].
    pub max_packet_size: u32,
}

impl Default for Limits {
    fn default() -> Self {
        // The largest size the remaining-length encoding allows, plus a 5-byte fixed header.
        Limits {
            max_packet_size: 268_435_455 + 5,
        }
    }
}

/// Decode one packet from the front of `buf`.
///
/// Returns `Ok(None)` until a whole packet is buffered, leaving partial bytes in `buf` (call
/// again after reading more). As soon as the fixed header is readable its type and flags are
/// checked and the announced size is compared with `limits.max_packet_size`, so an oversize
/// packet fails with [`DecodeError::PacketTooLarge`] before its body is buffered. On success the
/// packet's bytes are removed from `buf`; strings, topics and payloads in the result are slices
/// of that one frozen body (no copies). CONNECT is decoded whatever `version` says (it announces
/// the version itself). Never panics; any error is fatal for the connection (see
/// [`DecodeError::reason_code`] for what to tell the peer).
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    limits: &Limits,
) -> Result<Option<Packet>, DecodeError> {
    decode::decode(buf, version, limits)
}

/// Encode `packet` for a peer speaking `version`, appending to `buf` (which is reserved once,
/// for the exact size). Infallible: see the `encode` module docs for what happens to fields the
/// version cannot carry (v5-only fields are dropped for v3, v3 CONNACK/SUBACK codes are mapped,
/// v5 acks use their short forms when the reason is success and there are no properties).
pub fn encode(packet: &Packet, version: ProtocolVersion, buf: &mut BytesMut) {
    encode::encode(packet, version, buf)
}

/// The exact number of bytes `encode` would write (to honour a peer's maximum packet size).
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    encode::encoded_len(packet, version)
}
