//! Midge: a thread-per-core MQTT broker for device fleets with mutual TLS.
//!
//! Layering: `codec`, `session` and `routing` are sans-IO and must not import glommio or
//! rustls; `shard` is the only module that imports glommio; `tls` owns rustls.
pub mod auth;
pub mod broker;
pub mod codec;
pub mod config;
pub mod message;
pub mod routing;
pub mod session;
pub mod shard;
pub mod tls;
