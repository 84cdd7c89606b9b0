//! Midge: a thread-per-core MQTT broker for device fleets with mutual TLS.
//!
//! Layering: `codec`, `session`, `routing` and `shardcore` are sans-IO and must not import
//! glommio or rustls; `shard` is the only module that imports glommio; `tls` owns rustls.
pub mod auth;
pub mod broker;
pub mod codec;
pub mod config;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod routing;
pub mod session;
pub mod shard;
pub mod shardcore;
pub mod store;
pub mod tls;
