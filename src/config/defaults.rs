//! Every built-in default, in one place. `--check-config` prints them filled in.
//!
//! | key                           | default                          | note |
//! |-------------------------------|----------------------------------|------|
//! | (no listener configured)      | `listener 1883 127.0.0.1`, anonymous allowed | mosquitto 2.0 local-only mode |
//! | `listener PORT` (no address)  | `0.0.0.0`                        | mosquitto also binds IPv6; Midge binds one address |
//! | `port` / `bind_address`       | 1883 / `0.0.0.0`                 | legacy default listener |
//! | `allow_anonymous`             | `false` once any listener is configured | mosquitto 2.0 |
//! | `per_listener_settings`       | `false`                          | |
//! | `password_file` / `acl_file`  | none                             | global, or per listener with `per_listener_settings true`; reloaded on SIGHUP |
//! | `check_retain_source`         | `false`                          | mosquitto 2.0's code default; `true` with an `acl_file` is refused |
//! | `require_client_id_match_identity` | `false`                     | per listener, Midge; needs `require_certificate true` |
//! | `client_id_identity_pattern`  | `%u`                             | per listener, Midge; `%u` = the certificate identity |
//! | `shards`                      | number of CPUs available          | Midge |
//! | `max_connections`             | `-1` (unlimited)                 | per listener |
//! | `max_qos`                     | `2`                              | per listener |
//! | `max_topic_alias`             | `10`                             | per listener, mosquitto |
//! | `protocol`                    | `mqtt`                           | per listener |
//! | `max_inflight_messages`       | `20`                             | mosquitto |
//! | `max_queued_messages`         | `1000`                           | mosquitto |
//! | `max_queued_bytes`            | `0` (no byte limit)              | mosquitto |
//! | `message_size_limit`          | `0` (no limit but `max_packet_size`) | mosquitto |
//! | `max_packet_size`             | `2000000`                        | mosquitto 2.1 (2.0: no limit) |
//! | `max_keepalive`               | `65535`                          | mosquitto 2.0 |
//! | `max_subscriptions_per_client`| `10000` (`0`: no limit)          | Midge; each subscription is a route on every shard |
//! | `retain_available`            | `true`                           | |
//! | `persistent_client_expiration`| never                            | |
//! | `queue_qos0_messages`         | `false`                          | |
//! | `persistence`                 | `false`                          | `true`: nothing acknowledged is lost on kill -9 or power loss |
//! | `persistence_location`        | `.`                              | the directory is `persistence_location/persistence_file` |
//! | `persistence_file`            | `midge.db`                       | a directory for Midge, a file for mosquitto |
//! | `persistence_sync`            | `always`                         | Midge: `always`, `batch` (same promise, fewer fsyncs) or `none` (no fsync, acks not held) |
//! | `persistence_timeout`         | `30` s                           | Midge: a client whose acknowledgement or input waited this long for the disk is closed (v5 0x97) |
//! | `persistence_max_backlog`     | `67108864` (64 MiB)              | Midge: records per shard waiting for a failing disk before input that adds more is held |
//! | `autosave_interval`           | `1800` s                         | Midge records every change as it happens; this is how often the log is compacted while running (segments sealed, folded into one file, old ones deleted); `0`: only at start-up |
//! | `autosave_on_changes`         | `false`                          | `true`: `autosave_interval` counts records written (checked every second) instead of seconds |
//! | `sys_interval`                | `10` s (`0` disables `$SYS`)     | |
//! | `log_dest`                    | `stderr`                         | |
//! | `log_timestamp`               | `true`                           | mosquitto: `TIMESTAMP: message` |
//! | `log_timestamp_format`        | none: seconds since the epoch    | strftime(3), local time, as mosquitto |
//! | `log_type`                    | `error warning notice information` | the first line replaces the set; `-v`: all |
//! | `connection_messages`         | `true`                           | mosquitto's connect/disconnect lines |
//! | `log_format`                  | `mosquitto` (`json`: one object per line) | Midge |
//! | `metrics_listener`            | off; `metrics_listener PORT` binds 127.0.0.1 | Midge: `/metrics`, `/healthz` |
//! | `tls_version`                 | `tlsv1.2` (1.2 and 1.3 allowed)  | TLS listeners |
//! | `require_certificate`         | `false`                          | TLS listeners |
//! | `tls_kx_groups`               | `x25519,secp256r1` (the tls module's default) | Midge |
//! | `tls_handshake_timeout`       | `10` s                           | Midge |
//! | `max_handshakes_in_progress`  | `256` per shard                  | Midge |

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tracing::level_filters::LevelFilter;

/// The MQTT port.
pub const PORT: u16 = 1883;
/// Local-only mode listener (no listener configured anywhere).
pub const LOCAL_ONLY_LISTENER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PORT);
/// Address of `listener PORT` without an address, and of `port` without `bind_address`.
pub const ANY_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// Address of a default listener made by `-p` alone (mosquitto 2.0: loopback only).
pub const CLI_PORT_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub const MAX_TOPIC_ALIAS: u16 = 10;
pub const MAX_INFLIGHT_MESSAGES: u16 = 20;
pub const MAX_QUEUED_MESSAGES: u32 = 1000;
pub const MAX_QUEUED_BYTES: u64 = 0;
pub const MESSAGE_SIZE_LIMIT: u32 = 0;
/// mosquitto 2.1's default; a bound the decoder checks before buffering a packet.
pub const MAX_PACKET_SIZE: u32 = 2_000_000;
/// Largest MQTT packet: 268,435,455 bytes of remaining length plus a 5-byte fixed header.
pub const PROTOCOL_MAX_PACKET_SIZE: u32 = 268_435_455 + 5;
/// Largest PUBLISH payload the protocol can carry.
pub const PROTOCOL_MAX_PAYLOAD: u32 = 268_435_455;
/// mosquitto refuses `max_packet_size` below 20 bytes: normal packets would not fit.
pub const MIN_MAX_PACKET_SIZE: u32 = 20;
pub const MAX_KEEPALIVE: u16 = 65535;
/// Subscriptions per client session: far above what a device needs, low enough that one
/// client cannot grow every shard's routing table without bound.
pub const MAX_SUBSCRIPTIONS_PER_CLIENT: u32 = 10_000;
pub const RETAIN_AVAILABLE: bool = true;
pub const QUEUE_QOS0_MESSAGES: bool = false;
pub const SYS_INTERVAL: Duration = Duration::from_secs(10);
pub const AUTOSAVE_INTERVAL: Duration = Duration::from_secs(1800);
/// `persistence_timeout`: how long an acknowledgement (or held input) may wait for the disk.
pub const PERSISTENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// `persistence_max_backlog`: bytes of records per shard that may wait for a failing disk.
pub const PERSISTENCE_MAX_BACKLOG: u64 = crate::shardcore::DEFAULT_MAX_BACKLOG as u64;
pub const LOG_LEVEL: LevelFilter = LevelFilter::INFO;
/// Address of `metrics_listener PORT` without an address: the metrics are not for the world.
pub const METRICS_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Per shard. At ~3,000 full handshakes/s per core this is under 0.1 s of work queued: enough
/// to keep a core busy while capping half-open TLS state during a reconnect storm.
pub const MAX_HANDSHAKES_IN_PROGRESS: usize = 256;

/// Upper bound for `shards`: shard sets are bits of a `u64` in the routing replica.
pub const MAX_SHARDS: usize = crate::routing::MAX_SHARDS;

/// Default shard count: the CPUs this process may run on (1 if unknown).
pub fn shards() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
