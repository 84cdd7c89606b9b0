//! Sans-IO MQTT 3.1 / 3.1.1 / 5.0 codec.
//!
//! Owns: turning bytes into [`Packet`]s and back, the packet model, reason codes, validated
//! topic newtypes, and decode errors that cite the spec. Must not touch: sockets, sessions,
//! routing, glommio or rustls (enforced by `tests/layering.rs`).

pub mod packet;
pub mod reason;
pub mod topic;

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

/// Decode one packet from the front of `buf`. Returns `Ok(None)` until a whole packet is
/// buffered. CONNECT is decoded whatever `version` says (it announces the version itself).
pub fn decode(
    _buf: &mut BytesMut,
    _version: ProtocolVersion,
    _limits: &Limits,
) -> Result<Option<Packet>, std::convert::Infallible> {
    unimplemented!("codec branch")
}

/// Encode `packet` for a peer speaking `version`, appending to `buf`.
pub fn encode(_packet: &Packet, _version: ProtocolVersion, _buf: &mut BytesMut) {
    unimplemented!("codec branch")
}

/// The exact number of bytes `encode` would write (to honour a peer's maximum packet size).
pub fn encoded_len(_packet: &Packet, _version: ProtocolVersion) -> usize {
    unimplemented!("codec branch")
}
