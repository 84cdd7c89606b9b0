//! Mutual TLS for Midge: everything between PEM files on disk and an `Arc<rustls::ServerConfig>`
//! that every shard hands to [`accept`], and the server TLS stream itself ([`ServerTlsStream`]).
//!
//! Owns: the mosquitto-compatible TLS options ([`TlsOptions`]), loading and validating the
//! certificate material with plain-words errors ([`TlsError`]), the rustls server config
//! (aws-lc-rs provider, client verifier with CRLs, versions, cipher suites, key-exchange
//! groups, one shared session ticketer), the reasons a handshake failed
//! ([`HandshakeFailure`]) with per-reason counters and a log rate limiter, the client
//! certificate identity used as MQTT username ([`client_identity`], [`resolve_username`]),
//! hot reload ([`TlsReloader`]), the `midge certs` tool ([`certs`]), and the server stream on
//! rustls' unbuffered API that holds no TLS buffers while a connection is idle
//! ([`ServerTlsStream`], generic over any `futures_lite` reader/writer).
//!
//! Must not touch: sockets, glommio, or MQTT state. The shard runtime drives the handshake
//! over its own streams and consults this module; nothing here blocks a shard except
//! [`build_server_config`] / [`TlsReloader::reload`], which read files and must run off the
//! shard executors (at start-up or on a reload thread).

pub mod certs;
mod error;
mod failure;
mod identity;
mod material;
mod options;
mod reload;
mod server;
mod stream;

pub use error::{LegacyIssue, TlsError};
pub use failure::{
    HandshakeFailure, HandshakeSlot, HandshakeStats, HandshakeStatsSnapshot, LogRateLimiter,
};
pub use identity::{
    client_identity, format_subject_rfc2253, resolve_username, ClientIdentity, UsernameOutcome,
    UsernameRefused, UsernameRule,
};
pub use options::{KxGroup, TlsOptions, TlsVersion};
pub use reload::{ShardTlsConfig, TlsReloader};
pub use server::{
    build_server_config, build_server_config_with_warnings, supported_cipher_names, verify_resumed,
    BuiltConfig, MaterialDates,
};
pub use stream::{accept, AcceptError, ServerTlsStream};
