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
