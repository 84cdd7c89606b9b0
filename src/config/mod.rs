//! Configuration: the `midge` command line and a mosquitto.conf-compatible file, turned into one
//! validated [`Config`].
//!
//! Owns: CLI parsing ([`Cli`]), the file reader, every default ([`defaults`] is the one place
//! they are written down), validation with `FILE:LINE: key 'k': …` errors, the effective
//! configuration printed by `--check-config`, and `midge reload` (SIGHUP to a running broker).
//! Must not touch: sockets, TLS material (paths are only checked to exist; `tls` parses them),
//! logging setup (main installs the subscriber from [`LogSettings`]), glommio.
//!
//! # How a mosquitto.conf is read
//!
//! * One `key value` per line. Lines whose first non-blank character is `#` are comments;
//!   blank lines are skipped. A trailing `# …` after a value is an error (mosquitto does not
//!   support it either), so a mistyped value is never half-read.
//! * `listener PORT [ADDRESS]` opens a listener section: the per-listener keys that follow
//!   (`max_connections`, `max_qos`, `max_topic_alias`, `protocol`, `listener_allow_anonymous`,
//!   the TLS keys and Midge's `tls_*` keys) apply to it. Without ADDRESS the listener binds
//!   `0.0.0.0`. A host name is resolved once at startup and its first address is bound.
//!   Repeating an identical `listener` line reopens that section, as in mosquitto.
//! * Legacy default listener: `port` and `bind_address` configure mosquitto's *default
//!   listener*, which then exists in addition to the `listener` sections; `port` alone binds
//!   all IPv4 interfaces. A per-listener key written before the first `listener` line applies
//!   to that default listener, and creates it exactly when mosquitto 2.0 would: when its value
//!   differs from the listener default (`max_connections` other than -1, `max_qos` other than
//!   2, `require_certificate`/`use_identity_as_username`/`use_subject_as_username` true, or
//!   any of `cafile`, `capath`, `certfile`, `keyfile`, `ciphers`, `ciphers_tls13`,
//!   `crlfile`, `dhparamfile`). Others (`max_topic_alias`, `tls_version`, `protocol mqtt`,
//!   Midge's `tls_*` keys) do not create it; Midge warns that they have no effect there.
//! * `include_dir DIR` (main file only) reads `DIR/*.conf` in mosquitto's order (case-sensitive
//!   alphabetical, upper case before lower case of the same letter).
//! * `allow_anonymous`, `password_file`, `acl_file` and `per_listener_settings`, as mosquitto
//!   2.0 (src/conf.c `conf__set_cur_security_options`):
//!   - With `per_listener_settings false` (the default) they are global: each applies to every
//!     listener wherever the line appears; a second `password_file` or `acl_file` line is an
//!     error (mosquitto: "Duplicate … value").
//!   - With `per_listener_settings true` each applies to the listener section it appears in
//!     (before the first `listener` line: to the default listener, which a `password_file`
//!     brings into existence, as in mosquitto). A listener without its own `allow_anonymous`
//!     denies anonymous clients; one without its own `password_file` / `acl_file` has none.
//!   - `per_listener_settings true` must come before any `allow_anonymous`, `password_file`,
//!     `acl_file` or `check_retain_source` line (mosquitto refuses it otherwise, and so does
//!     Midge).
//!   - `listener_allow_anonymous` (mosquitto 2.1) overrides `allow_anonymous` for its listener.
//!   - `allow_anonymous` not set at all: `false` on every listener, except in *local-only mode*.
//!   - Both files are parsed at load (and by `--check-config`): a bad line is an error naming
//!     the configuration line and `FILE:LINE` of the file (see the `auth` module for the
//!     formats). SIGHUP reloads them (a file that no longer parses keeps its old version).
//! * `require_client_id_match_identity true` (Midge, per listener, needs `require_certificate
//!   true`): the client id must be the certificate's common name (or its subject with
//!   `use_subject_as_username`), through `client_id_identity_pattern` (default `%u`, the
//!   identity itself; e.g. `%u-ota`). See `auth::identity`.
//! * Local-only mode (mosquitto 2.0's "no listener configured" behaviour): when neither the
//!   file nor the command line defines any listener, Midge listens on 127.0.0.1:1883 and allows
//!   anonymous clients there (unless the file says `allow_anonymous false`). `-p PORT` without
//!   a file listener also binds loopback only, as mosquitto 2.0 does. Anonymous access is
//!   never enabled implicitly on a non-loopback address.
//! * Keys are sorted into: supported (validated, stored here), harmless (accepted with a
//!   warning in [`Config::warnings`], listed in [`HARMLESS_KEYS`]), and everything else — any
//!   key that could change security or delivery (`psk_file`, plugins, bridges, `persistence
//!   true`, `check_retain_source true` with an `acl_file`, …) or that Midge does not know —
//!   which is a startup error naming the file, line and key.
//!
//! Command-line flags override the file.
//!
//! # Where Midge differs from mosquitto 2.0, on purpose
//!
//! * One address per listener: `listener PORT` binds `0.0.0.0` only (mosquitto also binds
//!   IPv6; write `listener PORT ::` for that), and local-only mode binds 127.0.0.1 (mosquitto
//!   also ::1).
//! * Listeners whose addresses overlap on one port are refused: with SO_REUSEPORT they would
//!   silently share the port instead of failing to bind.
//! * `use_identity_as_username` / `use_subject_as_username` need `require_certificate true`:
//!   otherwise a client without a certificate could pick any username.
//! * A per-client queue with no bound (`max_queued_messages 0` and `max_queued_bytes 0`) is
//!   refused: one slow subscriber could exhaust memory.
//! * `max_packet_size` defaults to 2,000,000 bytes (mosquitto 2.1's default; 2.0 had none).
//! * `log_dest` takes one of `stderr`, `stdout`, `none`; `file`, `syslog` and `topic` are
//!   refused (run under systemd and journald keeps the log).
//! * In local-only mode an explicit `allow_anonymous false` is honoured.
//! * `-p PORT` together with file listeners adds the default listener (on 127.0.0.1 unless
//!   `--bind` or `bind_address` says otherwise) beside them.
//! * With `per_listener_settings true`, an `acl_file` before the first `listener` line when no
//!   default listener exists is an error (mosquitto attaches it to no listener and so protects
//!   nothing).
//! * A password file readable by other users is a warning (as in mosquitto 2.0.16+).

mod cli;
pub mod defaults;
mod file;
mod render;
mod value;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use tracing::level_filters::LevelFilter;

use crate::codec::packet::QoS;
/// The log settings' types are the logging module's own.
pub use crate::logging::{LogFormat, LogTypes};
/// The TLS enums are the `tls` module's own: one definition of each name list.
pub use crate::tls::{KxGroup, TlsVersion};

pub use cli::{run_reload, Cli, Command, ReloadArgs};
pub use file::HARMLESS_KEYS;
pub use render::render_effective;
pub use value::parse_mosquitto_duration;

/// The validated configuration the broker runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Number of shards (one glommio executor pinned per core). Default: the number of CPUs
    /// this process may run on.
    pub shards: usize,
    /// Listeners in the order they were declared: the legacy default listener (`port` /
    /// `bind_address`) first, then `listener` sections, then `--tls-listen`.
    pub listeners: Vec<ListenerConfig>,
    /// Per-client limits and session behaviour (all global in mosquitto).
    pub limits: Limits,
    /// Where and how much to log.
    pub log: LogSettings,
    /// `sys_interval`: period of `$SYS` updates; `None` (= `sys_interval 0`) disables them.
    pub sys_interval: Option<Duration>,
    /// `metrics_listener PORT [ADDRESS]` (Midge): where `GET /metrics` (Prometheus) and
    /// `GET /healthz` are served, plain HTTP; `None` (the default) serves nothing. ADDRESS
    /// defaults to 127.0.0.1.
    pub metrics_listener: Option<SocketAddr>,
    /// `autosave_interval` as read (seconds, or a count of changes with
    /// `autosave_on_changes true`). Midge makes every acknowledged change durable as it
    /// happens (see [`Persistence`]); this is its compaction cadence
    /// ([`Persistence::compaction`]).
    pub autosave_interval: Duration,
    /// `persistence true` and its settings; `None` = everything lives in memory.
    pub persistence: Option<Persistence>,
    /// `pid_file`: main writes the process id here after the listeners are bound (see
    /// [`write_pid_file`]); `midge reload` reads it.
    pub pid_file: Option<PathBuf>,
    /// `per_listener_settings`, as read (it only changes how `allow_anonymous` was resolved).
    pub per_listener_settings: bool,
    /// The configuration file that was read, if any.
    pub source: Option<PathBuf>,
    /// Accepted-but-ignored keys and other notes, for main to log at startup.
    pub warnings: Vec<ConfigWarning>,
}

/// When a persistent change counts as stored (`persistence_sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Every PUBACK/PUBREC/SUBACK/PUBCOMP/CONNACK-with-session leaves only after its record
    /// is on disk (fdatasync). Records of one reactor turn share one fdatasync (group
    /// commit). Nothing acknowledged is lost on kill -9 or power loss.
    #[default]
    Always,
    /// The same promise; a batch may wait up to `persistence_batch_delay` (2 ms) to grow,
    /// trading latency for fewer fdatasyncs under light load.
    Batch,
    /// Records are written without fdatasync and acknowledgements are not held: a kill -9
    /// loses nothing the kernel already has, a power loss may lose recent acknowledged
    /// messages (mosquitto's kind of risk, over milliseconds instead of mosquitto's
    /// `autosave_interval`).
    None,
}

/// `persistence true`: where and how Midge stores sessions, subscriptions, queued and
/// in-flight QoS 1/2 messages and retained messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persistence {
    /// The directory Midge keeps its logs in: `persistence_location` joined with
    /// `persistence_file` (default `midge.db`; mosquitto names a file there, Midge a
    /// directory).
    pub dir: PathBuf,
    pub sync: SyncMode,
    /// `persistence_timeout` (default 30 s): a connection whose acknowledgement (or input)
    /// waited this long for the disk is closed (v5: DISCONNECT 0x97) instead of acknowledged.
    pub timeout: std::time::Duration,
    /// `persistence_max_backlog` (default 64 MiB): bytes of records per shard waiting for the
    /// disk at which input that would add more is held and persistent CONNECTs are refused.
    pub max_backlog: u64,
    /// How often the log is compacted while the broker runs (`autosave_interval`,
    /// `autosave_on_changes`); `None` (`autosave_interval 0`): only at start-up.
    pub compaction: Option<crate::store::compact::Cadence>,
}

/// One network listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// Address to bind.
    pub addr: SocketAddr,
    /// Whether a client may connect without a username (`allow_anonymous`, resolved for this
    /// listener; see [`ListenerConfig::can_authenticate`]).
    pub allow_anonymous: bool,
    /// `max_connections`; `None` = unlimited (mosquitto's `-1`).
    pub max_connections: Option<u32>,
    /// `max_qos`: highest QoS a client may use on this listener (per-listener in mosquitto).
    pub max_qos: QoS,
    /// `max_topic_alias`: topic aliases an MQTT v5 client may create (0 disables them).
    pub max_topic_alias: u16,
    /// `protocol`: only `mqtt` is supported.
    pub protocol: Protocol,
    /// Certificate-based TLS; `Some` when `certfile` and `keyfile` are set.
    pub tls: Option<TlsSettings>,
    /// `password_file` for this listener: the global one, or with `per_listener_settings
    /// true` the one in this listener's section. Parsed and validated at load.
    pub password_file: Option<SecurityFile>,
    /// `acl_file` for this listener, scoped like `password_file`.
    pub acl_file: Option<SecurityFile>,
    /// `require_client_id_match_identity true` (Midge): client ids bound to the certificate.
    pub client_id_binding: Option<ClientIdBinding>,
    /// Where the listener was declared, for messages.
    pub origin: Origin,
}

/// A password or ACL file, and the configuration line that named it.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityFile {
    pub path: PathBuf,
    pub origin: Origin,
}

/// `require_client_id_match_identity true` on a listener, with its `client_id_identity_pattern`
/// (see `auth::identity`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientIdBinding {
    /// The identity source (common name, or the subject with `use_subject_as_username`) and
    /// the pattern (`%u` standing for the identity; default `%u`).
    pub rule: crate::auth::ClientIdRule,
    pub origin: Origin,
}

impl ListenerConfig {
    /// True if some client can be admitted: anonymous clients are allowed, a password file can
    /// admit users, or a verified client certificate supplies the username.
    pub fn can_authenticate(&self) -> bool {
        self.allow_anonymous
            || self.password_file.is_some()
            || self.tls.as_ref().is_some_and(|t| {
                t.require_certificate && (t.use_identity_as_username || t.use_subject_as_username)
            })
    }
}

/// Listener protocol. MQTT over WebSockets is not supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Mqtt,
}

/// Certificate-based TLS settings of one listener (mosquitto's names, plus Midge's `tls_*`).
/// Field names and types follow `tls::TlsOptions` so the mapping is one to one.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    /// PEM server certificate chain.
    pub certfile: PathBuf,
    /// PEM private key.
    pub keyfile: PathBuf,
    /// PEM CA certificates trusted for client certificates.
    pub cafile: Option<PathBuf>,
    /// Directory of PEM CA certificates trusted for client certificates.
    pub capath: Option<PathBuf>,
    /// PEM certificate revocation list(s) checked against client certificates.
    pub crlfile: Option<PathBuf>,
    /// Clients must present a certificate that chains to `cafile`/`capath`.
    pub require_certificate: bool,
    /// Use the certificate's Common Name as the MQTT username.
    pub use_identity_as_username: bool,
    /// Use the certificate's full subject as the MQTT username.
    pub use_subject_as_username: bool,
    /// `tls_version`: minimum TLS version (1.2 and 1.3 are both allowed by default).
    pub tls_version: TlsVersion,
    /// `ciphers`: TLS 1.2 cipher suites, OpenSSL names, `:`-separated; `None` = default. The
    /// `tls` module maps the names and rejects unknown ones.
    pub ciphers: Option<String>,
    /// `ciphers_tls1.3`: TLS 1.3 cipher suites, `:`-separated; `None` = default.
    pub ciphers_tls13: Option<String>,
    /// `tls_kx_groups`: key-exchange groups in preference order; empty = the `tls` module's
    /// default (x25519, secp256r1: the post-quantum hybrid costs ~15-20% per full handshake
    /// and is opt-in).
    pub kx_groups: Vec<KxGroup>,
    /// `tls_handshake_timeout`: a handshake not finished in this time is dropped.
    pub handshake_timeout: Duration,
    /// `max_handshakes_in_progress`: per shard; further accepted sockets wait in the kernel
    /// backlog. Bounds the memory and CPU a reconnect storm can claim.
    pub max_handshakes_in_progress: usize,
}

/// Per-client limits and session behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// `max_inflight_messages`: outgoing QoS 1/2 messages in flight per client; 0 = no limit
    /// other than the 65535 packet identifiers (see [`Limits::inflight_window`]).
    pub max_inflight_messages: u16,
    /// `max_queued_messages`: QoS 1/2 messages queued per client beyond those in flight;
    /// 0 = no count limit (then `max_queued_bytes` must bound the queue).
    pub max_queued_messages: u32,
    /// `max_queued_bytes`: bytes queued per client beyond those in flight; 0 = no byte limit.
    pub max_queued_bytes: u64,
    /// `message_size_limit`: largest PUBLISH payload accepted; 0 = no limit beyond
    /// `max_packet_size`.
    pub message_size_limit: u32,
    /// `max_packet_size`: largest MQTT packet accepted (whole packet); sent to v5 clients.
    /// 0 = the protocol maximum.
    pub max_packet_size: u32,
    /// `max_keepalive`: highest keepalive (seconds) a client may use; v5 clients are told the
    /// value, v3 clients above it are refused. 0 = no limit (keepalive 0 allowed).
    pub max_keepalive: u16,
    /// `retain_available`: retained messages supported.
    pub retain_available: bool,
    /// `persistent_client_expiration`: disconnected persistent sessions are removed after
    /// this; `None` = never (mosquitto's default).
    pub persistent_client_expiration: Option<Duration>,
    /// `queue_qos0_messages`: also queue QoS 0 messages for disconnected persistent clients.
    pub queue_qos0_messages: bool,
    /// `max_subscriptions_per_client` (Midge): subscriptions one client session may hold;
    /// a SUBSCRIBE for a new filter beyond it is refused (v5 0x97, 3.1.1 0x80). 0 = no limit.
    pub max_subscriptions_per_client: u32,
}

impl Limits {
    /// Effective outgoing inflight window: `max_inflight_messages`, or 65535 for "no limit".
    pub fn inflight_window(&self) -> u16 {
        if self.max_inflight_messages == 0 {
            u16::MAX
        } else {
            self.max_inflight_messages
        }
    }

    /// Effective maximum packet size in bytes (`max_packet_size`, 0 mapped to the protocol
    /// maximum of 268,435,455 remaining-length bytes plus a 5-byte fixed header).
    pub fn effective_max_packet_size(&self) -> u32 {
        if self.max_packet_size == 0 {
            defaults::PROTOCOL_MAX_PACKET_SIZE
        } else {
            self.max_packet_size
        }
    }
}

/// Where and how much to log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    pub dest: LogDest,
    /// `log_type` lines, as mosquitto reads them: the first one replaces the default set
    /// (`error warning notice information`), later ones add to it, `none` empties it, `all`
    /// (or `-v`) enables everything.
    pub types: LogTypes,
    /// The most verbose level some enabled type needs (derived from `types`): `error` →
    /// ERROR, `warning` → WARN, `notice`/`information`/`subscribe`/`unsubscribe` → INFO,
    /// `debug` → DEBUG, `all` → TRACE, `none` → OFF.
    pub level: LevelFilter,
    /// `connection_messages` (default true): mosquitto's connect and disconnect lines.
    pub connection_messages: bool,
    /// `log_format` (Midge): `mosquitto` (default) or `json`, one object per line.
    pub format: LogFormat,
    /// `log_timestamp` (default true): each line starts with a timestamp and `: `, as
    /// mosquitto writes it.
    pub timestamp: bool,
    /// `log_timestamp_format`: a strftime(3) format for that timestamp, in local time;
    /// `None` (mosquitto's default) = seconds since the Unix epoch.
    pub timestamp_format: Option<String>,
}

/// `log_dest`: Midge writes to one console stream (let journald or the supervisor store it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDest {
    Stderr,
    Stdout,
    /// `log_dest none`.
    None,
}

/// Where a setting or listener came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Built in (local-only mode).
    Default,
    /// A line in a configuration file.
    File { path: PathBuf, line: usize },
    /// A command-line option (e.g. `--tls-listen`).
    Cli(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File { path, line } => write!(f, "{}:{}", path.display(), line),
            Origin::Cli(flag) => write!(f, "command line ({flag})"),
        }
    }
}

/// A note for the operator: a key accepted but ignored, or a setting that has no effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub origin: Origin,
    /// The key or option concerned.
    pub key: String,
    pub message: String,
    /// Informational (e.g. `set_tcp_nodelay`, which Midge always does) rather than a warning.
    pub info: bool,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: key '{}': {}", self.origin, self.key, self.message)
    }
}

/// Why the configuration could not be loaded. Display gives the complete operator message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file (or an `include_dir` directory) could not be read.
    #[error("{}: cannot read {what}: {source}", path.display())]
    Read {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A key's value is invalid, the key is unsupported, or it conflicts with another.
    #[error("{}: {message}", describe_key(origin, key))]
    Key {
        origin: Origin,
        key: String,
        message: String,
    },
    /// A problem not tied to one key (a malformed line, conflicting listeners).
    #[error("{origin}: {message}")]
    At { origin: Origin, message: String },
    /// `midge reload` failed.
    #[error("reload: {0}")]
    Reload(String),
}

/// `FILE:LINE: key 'k'` for file settings, `command line: option '--flag'` for options.
fn describe_key(origin: &Origin, key: &str) -> String {
    match origin {
        Origin::Cli(flag) => format!("command line: option '{flag}'"),
        o => format!("{o}: key '{key}'"),
    }
}

impl ConfigError {
    pub(crate) fn key(origin: &Origin, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            origin: origin.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

impl Default for Config {
    /// The embedded defaults, exactly what `midge` with no arguments runs (see [`defaults`]).
    fn default() -> Config {
        Config {
            shards: defaults::shards(),
            listeners: vec![ListenerConfig {
                addr: defaults::LOCAL_ONLY_LISTENER,
                allow_anonymous: true,
                max_connections: None,
                max_qos: QoS::ExactlyOnce,
                max_topic_alias: defaults::MAX_TOPIC_ALIAS,
                protocol: Protocol::Mqtt,
                tls: None,
                password_file: None,
                acl_file: None,
                client_id_binding: None,
                origin: Origin::Default,
            }],
            limits: Limits::default(),
            log: LogSettings::default(),
            sys_interval: Some(defaults::SYS_INTERVAL),
            metrics_listener: None,
            autosave_interval: defaults::AUTOSAVE_INTERVAL,
            persistence: None,
            pid_file: None,
            per_listener_settings: false,
            source: None,
            warnings: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_inflight_messages: defaults::MAX_INFLIGHT_MESSAGES,
            max_queued_messages: defaults::MAX_QUEUED_MESSAGES,
            max_queued_bytes: defaults::MAX_QUEUED_BYTES,
            message_size_limit: defaults::MESSAGE_SIZE_LIMIT,
            max_packet_size: defaults::MAX_PACKET_SIZE,
            max_keepalive: defaults::MAX_KEEPALIVE,
            retain_available: defaults::RETAIN_AVAILABLE,
            persistent_client_expiration: None,
            queue_qos0_messages: defaults::QUEUE_QOS0_MESSAGES,
            max_subscriptions_per_client: defaults::MAX_SUBSCRIPTIONS_PER_CLIENT,
        }
    }
}

impl LogSettings {
    /// What `logging::init` needs to install these settings.
    pub fn setup(&self) -> Option<crate::logging::LogSetup> {
        let dest = match self.dest {
            LogDest::Stdout => crate::logging::Dest::Stdout,
            LogDest::Stderr => crate::logging::Dest::Stderr,
            LogDest::None => return None,
        };
        Some(crate::logging::LogSetup {
            dest,
            filter: crate::logging::LineFilter {
                types: self.types,
                connection_messages: self.connection_messages,
            },
            format: self.format,
            timestamp: self.timestamp,
            timestamp_format: self.timestamp_format.clone(),
        })
    }
}

impl Default for LogSettings {
    fn default() -> LogSettings {
        LogSettings {
            dest: LogDest::Stderr,
            types: LogTypes::DEFAULT,
            level: defaults::LOG_LEVEL,
            connection_messages: true,
            format: LogFormat::Mosquitto,
            timestamp: true,
            timestamp_format: None,
        }
    }
}

/// Build the configuration from the command line: embedded defaults, then the `-c` file if
/// given, then command-line overrides; validate everything.
pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
    let mut b = file::Builder::new();
    if let Some(path) = &cli.config {
        b.read_main_file(path)?;
    }
    cli.apply(&mut b)?;
    b.finish(cli.config.clone())
}

/// What `midge --check-config` prints: the effective configuration (defaults filled in) in
/// mosquitto.conf form, preceded by the warnings as comments. On `Err`, main prints the error
/// to stderr and exits non-zero.
pub fn check_config_report(cli: &Cli) -> Result<String, ConfigError> {
    let config = load(cli)?;
    Ok(render_effective(&config))
}

/// `midge --check-config` for main: print the effective configuration to stdout (exit
/// status 0) or the error to stderr (exit status 1). Returns the exit status.
pub fn run_check_config(cli: &Cli) -> i32 {
    match check_config_report(cli) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("midge: configuration error: {e}");
            1
        }
    }
}

/// Write `pid` to `path` (what mosquitto's `pid_file` does), replacing any old file.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<(), ConfigError> {
    std::fs::write(path, format!("{pid}\n")).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        what: "pid file (writing)",
        source,
    })
}

#[cfg(test)]
mod tests;
