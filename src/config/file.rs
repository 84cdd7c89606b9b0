//! The mosquitto.conf reader and the [`Builder`] that both the file and the command line feed.
//! Reading rules are documented on the parent module.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::value::{
    parse_bool, parse_host, parse_mosquitto_duration, parse_number, parse_port, parse_seconds,
};
use super::{
    defaults, ClientIdBinding, Config, ConfigError, ConfigWarning, KxGroup, Limits, ListenerConfig,
    LogDest, LogFormat, LogSettings, LogTypes, Origin, Protocol, SecurityFile, TlsSettings,
    TlsVersion,
};
use crate::auth::{ClientIdRule, IdentitySource};
use crate::codec::packet::QoS;

/// Keys accepted with a warning because ignoring them cannot weaken security or change
/// delivery: `(key, why it is harmless)`.
pub static HARMLESS_KEYS: &[(&str, &str)] = &[
    ("log_facility", "only used by log_dest syslog"),
    ("websockets_log_level", "Midge has no WebSockets listener"),
    (
        "websockets_headers_size",
        "Midge has no WebSockets listener",
    ),
    ("packet_buffer_size", "Midge sizes its read buffers itself"),
    ("allow_duplicate_messages", "deprecated since mosquitto 2.0"),
    (
        "auto_id_prefix",
        "Midge chooses the prefix of the client ids it generates",
    ),
    (
        "dhparamfile",
        "rustls offers no finite-field DHE suites; ECDHE is always used",
    ),
    (
        "user",
        "Midge does not change user; this has no effect when not started as root (as in mosquitto)",
    ),
];

/// Known mosquitto keys that Midge refuses because ignoring them could weaken security or
/// change delivery: `(key, explanation and what to do)`.
static UNSUPPORTED_KEYS: &[(&str, &str)] = &[
    (
        "psk_file",
        "pre-shared-key TLS is not supported; use certificates",
    ),
    (
        "psk_hint",
        "pre-shared-key TLS is not supported; use certificates",
    ),
    ("auth_plugin", "plugins are not supported"),
    ("plugin", "plugins are not supported"),
    ("global_plugin", "plugins are not supported"),
    (
        "auth_plugin_deny_special_chars",
        "plugins are not supported",
    ),
    (
        "allow_zero_length_clientid",
        "Midge applies the MQTT rules for empty client ids itself; remove it",
    ),
    (
        "clientid_prefixes",
        "it restricts which clients may connect",
    ),
    ("use_username_as_clientid", "it changes client identity"),
    ("mount_point", "it rewrites topics"),
    (
        "max_inflight_bytes",
        "it changes delivery; use max_inflight_messages",
    ),
    (
        "memory_limit",
        "Midge has no global heap limit; bound queues with max_queued_messages / max_queued_bytes",
    ),
    ("global_max_clients", "use max_connections on each listener"),
    (
        "global_max_connections",
        "use max_connections on each listener",
    ),
    (
        "max_topic_alias_broker",
        "topic alias limits are not configurable",
    ),
    (
        "retain_expiry_interval",
        "it changes retained-message lifetime",
    ),
    (
        "accept_protocol_versions",
        "Midge accepts MQTT 3.1, 3.1.1 and 5.0 on every listener",
    ),
    (
        "bind_interface",
        "bind an address instead: listener PORT ADDRESS",
    ),
    (
        "socket_domain",
        "Midge binds exactly the address given: listener PORT ADDRESS (IPv4 or IPv6)",
    ),
    (
        "enable_proxy_protocol",
        "the PROXY protocol is not supported",
    ),
    (
        "proxy_protocol_v2_require_tls",
        "the PROXY protocol is not supported",
    ),
    ("http_dir", "Midge serves no HTTP"),
    ("websockets_origin", "MQTT over WebSockets is not supported"),
    (
        "tls_engine",
        "OpenSSL engines are not supported; use a PEM keyfile",
    ),
    (
        "tls_engine_kpass_sha1",
        "OpenSSL engines are not supported; use a PEM keyfile",
    ),
    (
        "tls_keyform",
        "OpenSSL engines are not supported; use a PEM keyfile",
    ),
    (
        "disable_client_cert_date_checks",
        "Midge always checks certificate validity dates",
    ),
    ("mptcp", "Multipath TCP is not supported"),
    ("enable_control_api", "the $CONTROL API is not supported"),
    ("connection", "bridges are not supported"),
    ("address", "bridges are not supported"),
    ("addresses", "bridges are not supported"),
    ("topic", "bridges are not supported"),
    ("cleansession", "bridges are not supported"),
    ("local_cleansession", "bridges are not supported"),
    ("remote_clientid", "bridges are not supported"),
    ("remote_username", "bridges are not supported"),
    ("remote_password", "bridges are not supported"),
    ("local_clientid", "bridges are not supported"),
    ("local_username", "bridges are not supported"),
    ("local_password", "bridges are not supported"),
    ("notifications", "bridges are not supported"),
    ("notifications_local_only", "bridges are not supported"),
    ("notification_topic", "bridges are not supported"),
    ("keepalive_interval", "bridges are not supported"),
    ("restart_timeout", "bridges are not supported"),
    ("round_robin", "bridges are not supported"),
    ("start_type", "bridges are not supported"),
    ("idle_timeout", "bridges are not supported"),
    ("threshold", "bridges are not supported"),
    ("try_private", "bridges are not supported"),
];

static UNSUPPORTED_PREFIXES: &[(&str, &str)] = &[
    ("auth_opt_", "plugins are not supported"),
    ("plugin_opt_", "plugins are not supported"),
    ("bridge_", "bridges are not supported"),
];

/// A listener as read, before defaults and validation.
#[derive(Debug, Clone)]
pub(crate) struct RawListener {
    pub(crate) port: Option<u16>,
    pub(crate) host: Option<IpAddr>,
    pub(crate) origin: Origin,
    /// `allow_anonymous` inside this section with `per_listener_settings true`.
    pub(crate) allow_anonymous: Option<bool>,
    pub(crate) listener_allow_anonymous: Option<bool>,
    pub(crate) max_connections: Option<u32>,
    pub(crate) max_qos: QoS,
    pub(crate) max_topic_alias: u16,
    pub(crate) tls: RawTls,
    /// `password_file` / `acl_file` in this section with `per_listener_settings true`.
    pub(crate) password_file: At<PathBuf>,
    pub(crate) acl_file: At<PathBuf>,
    /// Midge's `require_client_id_match_identity` and `client_id_identity_pattern`.
    pub(crate) require_client_id_match_identity: At<bool>,
    pub(crate) client_id_identity_pattern: At<String>,
}

/// A setting with where it was written.
pub(crate) type At<T> = Option<(T, Origin)>;

#[derive(Debug, Clone, Default)]
pub(crate) struct RawTls {
    pub(crate) certfile: At<PathBuf>,
    pub(crate) keyfile: At<PathBuf>,
    pub(crate) cafile: At<PathBuf>,
    pub(crate) capath: At<PathBuf>,
    pub(crate) crlfile: At<PathBuf>,
    pub(crate) require_certificate: At<bool>,
    pub(crate) use_identity_as_username: At<bool>,
    pub(crate) use_subject_as_username: At<bool>,
    pub(crate) tls_version: At<TlsVersion>,
    pub(crate) ciphers: At<String>,
    pub(crate) ciphers_tls13: At<String>,
    pub(crate) kx_groups: At<Vec<KxGroup>>,
    pub(crate) handshake_timeout: At<Duration>,
    pub(crate) max_handshakes: At<usize>,
}

impl RawTls {
    /// The first TLS key set other than certfile/keyfile, for "TLS key without TLS" errors.
    fn first_other_key(&self) -> Option<(&'static str, &Origin)> {
        fn o<'a, T>(name: &'static str, v: &'a At<T>) -> Option<(&'static str, &'a Origin)> {
            v.as_ref().map(|x| (name, &x.1))
        }
        o("cafile", &self.cafile)
            .or_else(|| o("capath", &self.capath))
            .or_else(|| o("crlfile", &self.crlfile))
            .or_else(|| o("require_certificate", &self.require_certificate))
            .or_else(|| o("use_identity_as_username", &self.use_identity_as_username))
            .or_else(|| o("use_subject_as_username", &self.use_subject_as_username))
            .or_else(|| o("tls_version", &self.tls_version))
            .or_else(|| o("ciphers", &self.ciphers))
            .or_else(|| o("ciphers_tls1.3", &self.ciphers_tls13))
            .or_else(|| o("tls_kx_groups", &self.kx_groups))
            .or_else(|| o("tls_handshake_timeout", &self.handshake_timeout))
            .or_else(|| o("max_handshakes_in_progress", &self.max_handshakes))
    }
}

impl RawListener {
    pub(crate) fn new(port: Option<u16>, host: Option<IpAddr>, origin: Origin) -> RawListener {
        RawListener {
            port,
            host,
            origin,
            allow_anonymous: None,
            listener_allow_anonymous: None,
            max_connections: None,
            max_qos: QoS::ExactlyOnce,
            max_topic_alias: defaults::MAX_TOPIC_ALIAS,
            tls: RawTls::default(),
            password_file: None,
            acl_file: None,
            require_client_id_match_identity: None,
            client_id_identity_pattern: None,
        }
    }
}

/// Accumulates settings from the file(s) and the command line; [`Builder::finish`] validates.
pub(crate) struct Builder {
    pub(crate) shards: At<usize>,
    pub(crate) limits: Limits,
    /// Where the queue bounds were last set, for the "unbounded queue" error.
    queue_origin: Option<Origin>,
    log_dest: At<LogDest>,
    /// `log_type` lines so far (`None`: the default set).
    log_types: Option<LogTypes>,
    /// Where the set lost its error and warning lines, for a note.
    log_types_origin: Option<Origin>,
    connection_messages: bool,
    log_format: LogFormat,
    metrics_listener: At<SocketAddr>,
    log_timestamp: bool,
    log_timestamp_format: Option<String>,
    pub(crate) verbose: bool,
    sys_interval: Option<Duration>,
    autosave_interval: Duration,
    persistence: Option<bool>,
    persistence_location: Option<PathBuf>,
    persistence_file: Option<String>,
    persistence_sync: Option<super::SyncMode>,
    persistence_timeout: Option<Duration>,
    persistence_max_backlog: Option<u64>,
    autosave_on_changes: bool,
    pid_file: Option<PathBuf>,
    per_listener_settings: bool,
    /// First security line (`allow_anonymous`, `password_file`, `acl_file`,
    /// `check_retain_source`): `per_listener_settings true` must precede it.
    security_seen: Option<Origin>,
    global_allow_anonymous: Option<bool>,
    /// `password_file` / `acl_file` with `per_listener_settings false`: every listener's.
    global_password_file: At<PathBuf>,
    global_acl_file: At<PathBuf>,
    check_retain_source: At<bool>,
    /// mosquitto's default listener (`port`, `bind_address`, per-listener keys before the
    /// first `listener` line, or `-p`/`--bind`).
    pub(crate) default_listener: RawListener,
    /// Set by `port` / `bind_address` (the other keys count at the end, by value).
    default_from_file: bool,
    /// The first per-listener key written before any `listener` line, for messages.
    default_keys: Option<(String, Origin)>,
    /// `dhparamfile` before any `listener` line (ignored by Midge, but mosquitto creates the
    /// default listener for it).
    dhparamfile_before_listener: bool,
    /// Set when `-p`/`--bind` created or changed it.
    pub(crate) default_from_cli: bool,
    listeners: Vec<RawListener>,
    /// Index into `listeners` of the open section; `None` = the default listener.
    current: Option<usize>,
    /// Listeners made by command-line options (`--tls-listen`).
    pub(crate) cli_listeners: Vec<RawListener>,
    pub(crate) warnings: Vec<ConfigWarning>,
}

fn split_value<'a>(key: &str, value: &'a str, origin: &Origin) -> Result<&'a str, ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::key(origin, key, "missing value"));
    }
    if let Some(pos) = value.find(char::is_whitespace) {
        let rest = value[pos..].trim_start();
        let hint = if rest.starts_with('#') {
            " (comments must be on their own line)"
        } else {
            ""
        };
        return Err(ConfigError::key(
            origin,
            key,
            format!("expected one value, got '{value}'{hint}"),
        ));
    }
    Ok(value)
}

fn here<T>(v: T, origin: &Origin) -> At<T> {
    Some((v, origin.clone()))
}

fn map<T>(key: &str, origin: &Origin, r: Result<T, String>) -> Result<T, ConfigError> {
    r.map_err(|m| ConfigError::key(origin, key, m))
}

fn path_value(key: &str, value: &str, origin: &Origin) -> Result<PathBuf, ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::key(origin, key, "missing file path"));
    }
    Ok(PathBuf::from(value))
}

impl Builder {
    pub(crate) fn new() -> Builder {
        Builder {
            shards: None,
            limits: Limits::default(),
            queue_origin: None,
            log_dest: None,
            log_types: None,
            log_types_origin: None,
            connection_messages: true,
            log_format: LogFormat::Mosquitto,
            metrics_listener: None,
            log_timestamp: true,
            log_timestamp_format: None,
            verbose: false,
            sys_interval: Some(defaults::SYS_INTERVAL),
            autosave_interval: defaults::AUTOSAVE_INTERVAL,
            persistence: None,
            persistence_location: None,
            persistence_file: None,
            persistence_sync: None,
            persistence_timeout: None,
            persistence_max_backlog: None,
            autosave_on_changes: false,
            pid_file: None,
            per_listener_settings: false,
            security_seen: None,
            global_allow_anonymous: None,
            global_password_file: None,
            global_acl_file: None,
            check_retain_source: None,
            default_listener: RawListener::new(None, None, Origin::Default),
            default_from_file: false,
            default_keys: None,
            dhparamfile_before_listener: false,
            default_from_cli: false,
            listeners: Vec::new(),
            current: None,
            cli_listeners: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn warn(&mut self, origin: &Origin, key: &str, message: impl Into<String>, info: bool) {
        self.warnings.push(ConfigWarning {
            origin: origin.clone(),
            key: key.to_string(),
            message: message.into(),
            info,
        });
    }

    pub(crate) fn read_main_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        self.read_file(path, true)
    }

    fn read_file(&mut self, path: &Path, main: bool) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            what: "configuration file",
            source,
        })?;
        // As in mosquitto, every file starts outside any listener section.
        self.current = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_start_matches('\u{feff}').trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let origin = Origin::File {
                path: path.to_path_buf(),
                line: i + 1,
            };
            let (key, value) = match line.find(char::is_whitespace) {
                Some(pos) => (&line[..pos], line[pos..].trim()),
                None => (line, ""),
            };
            if key == "include_dir" {
                if !main {
                    return Err(ConfigError::key(
                        &origin,
                        key,
                        "include_dir is only allowed in the main configuration file",
                    ));
                }
                self.include_dir(value, &origin)?;
                continue;
            }
            self.apply(key, value, &origin)?;
        }
        Ok(())
    }

    fn include_dir(&mut self, value: &str, origin: &Origin) -> Result<(), ConfigError> {
        let dir = path_value("include_dir", value, origin)?;
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            ConfigError::key(
                origin,
                "include_dir",
                format!("cannot read '{}': {e}", dir.display()),
            )
        })?;
        let mut files: Vec<(String, PathBuf)> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| {
                ConfigError::key(
                    origin,
                    "include_dir",
                    format!("cannot read '{}': {e}", dir.display()),
                )
            })?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".conf") && path.is_file() {
                files.push((name, path));
            }
        }
        // mosquitto's order: case-insensitive, upper case before lower case of the same letter.
        files.sort_by(|a, b| {
            a.0.to_lowercase()
                .cmp(&b.0.to_lowercase())
                .then_with(|| a.0.cmp(&b.0))
        });
        for (_, path) in files {
            self.read_file(&path, false)?;
        }
        self.current = None;
        Ok(())
    }

    /// The listener that per-listener keys currently apply to. Before the first `listener`
    /// line that is mosquitto's default listener; whether the file thereby creates it is
    /// decided at the end, by mosquitto's rule (see [`Builder::mosquitto_default_listener`]).
    fn cur(&mut self, key: &str, origin: &Origin) -> &mut RawListener {
        match self.current {
            Some(i) => &mut self.listeners[i],
            None => {
                if self.default_keys.is_none() {
                    self.default_keys = Some((key.to_string(), origin.clone()));
                }
                &mut self.default_listener
            }
        }
    }

    /// mosquitto 2.0's rule (`config__parse_args` in src/conf.c) for whether the file created
    /// the default listener: `port` or `bind_address`, or a per-listener key before the first
    /// `listener` line whose value differs from the listener default: `max_connections`
    /// other than -1, `max_qos` other than 2, `require_certificate` /
    /// `use_identity_as_username` / `use_subject_as_username` true, or any of `cafile`,
    /// `capath`, `certfile`, `keyfile`, `ciphers`, `ciphers_tls13`, `crlfile`,
    /// `dhparamfile`, and (with `per_listener_settings true`) `password_file`. Keys such as `max_topic_alias`, `tls_version`, `protocol mqtt` or
    /// `allow_anonymous` do not create it (mosquitto ignores them there).
    fn mosquitto_default_listener(&self) -> bool {
        let d = &self.default_listener;
        let t = &d.tls;
        let on = |v: &At<bool>| v.as_ref().is_some_and(|(b, _)| *b);
        // `port` and `bind_address` in the file set `default_from_file` themselves (the
        // command line's `-p`/`--bind` make the default listener on their own terms).
        self.default_from_file
            || self.dhparamfile_before_listener
            || d.max_connections.is_some()
            || d.max_qos != QoS::ExactlyOnce
            || t.cafile.is_some()
            || t.capath.is_some()
            || t.certfile.is_some()
            || t.keyfile.is_some()
            || t.ciphers.is_some()
            || t.ciphers_tls13.is_some()
            || t.crlfile.is_some()
            || on(&t.require_certificate)
            || on(&t.use_identity_as_username)
            || on(&t.use_subject_as_username)
            // `per_listener_settings true` puts it in the default listener's security options.
            || d.password_file.is_some()
    }

    /// Apply one `key value` line.
    pub(crate) fn apply(
        &mut self,
        key: &str,
        value: &str,
        origin: &Origin,
    ) -> Result<(), ConfigError> {
        let num = |v: &str, min: u64, max: u64| -> Result<u64, ConfigError> {
            map(
                key,
                origin,
                parse_number(split_value(key, v, origin)?, min, max),
            )
        };
        let boolean = |v: &str| -> Result<bool, ConfigError> {
            map(key, origin, parse_bool(split_value(key, v, origin)?))
        };
        match key {
            // --- listeners -------------------------------------------------------------
            "listener" => {
                let mut parts = value.split_whitespace();
                let port = parts.next().ok_or_else(|| {
                    ConfigError::key(origin, key, "missing port: listener PORT [ADDRESS]")
                })?;
                let port = map(key, origin, parse_port(port))?;
                let host = match parts.next() {
                    Some(h) => Some(map(key, origin, parse_host(h))?),
                    None => None,
                };
                if let Some(extra) = parts.next() {
                    return Err(ConfigError::key(
                        origin,
                        key,
                        format!("unexpected '{extra}': expected listener PORT [ADDRESS]"),
                    ));
                }
                // An identical `listener` line reopens that section (mosquitto does the same).
                let existing = self
                    .listeners
                    .iter()
                    .position(|l| l.port == Some(port) && l.host == host);
                self.current = Some(match existing {
                    Some(i) => i,
                    None => {
                        self.listeners
                            .push(RawListener::new(Some(port), host, origin.clone()));
                        self.listeners.len() - 1
                    }
                });
            }
            "port" => {
                let port = map(key, origin, parse_port(split_value(key, value, origin)?))?;
                self.touch_default(origin);
                self.default_listener.port = Some(port);
            }
            "bind_address" => {
                let host = map(key, origin, parse_host(split_value(key, value, origin)?))?;
                self.touch_default(origin);
                self.default_listener.host = Some(host);
            }
            "max_connections" => {
                let v = split_value(key, value, origin)?;
                let n = if v == "-1" {
                    None
                } else {
                    Some(
                        parse_number(v, 1, i32::MAX as u64)
                            .map(|n| n as u32)
                            .map_err(|_| {
                                ConfigError::key(
                                    origin,
                                    key,
                                    format!(
                                        "expected -1 (unlimited) or a number 1-{}, got '{v}'",
                                        i32::MAX
                                    ),
                                )
                            })?,
                    )
                };
                self.cur(key, origin).max_connections = n;
            }
            "max_topic_alias" => {
                let n = num(value, 0, 65535)? as u16;
                self.cur(key, origin).max_topic_alias = n;
            }
            "max_qos" => {
                let q = num(value, 0, 2)?;
                self.cur(key, origin).max_qos = QoS::from_u8(q as u8).unwrap_or(QoS::ExactlyOnce);
            }
            "protocol" => match split_value(key, value, origin)? {
                "mqtt" => {
                    self.cur(key, origin);
                }
                "websockets" => return Err(ConfigError::key(
                    origin,
                    key,
                    "MQTT over WebSockets is not supported by Midge; terminate WebSockets in a \
                         proxy in front of a plain MQTT listener, or remove this listener",
                )),
                "http_api" => {
                    return Err(ConfigError::key(
                        origin,
                        key,
                        "the HTTP API listener is not supported by Midge",
                    ))
                }
                other => {
                    return Err(ConfigError::key(
                        origin,
                        key,
                        format!("expected mqtt, got '{other}'"),
                    ))
                }
            },
            // --- authentication ----------------------------------------------------------
            "per_listener_settings" => {
                let v = boolean(value)?;
                // mosquitto's rule (conf.c): it cannot be switched on once a security setting
                // was read under the global meaning.
                if let (true, Some(first)) = (v, &self.security_seen) {
                    return Err(ConfigError::key(
                        origin,
                        key,
                        format!(
                            "must be set before any allow_anonymous, password_file, acl_file or \
                             check_retain_source line (first one at {first}), because it changes \
                             what that line applies to"
                        ),
                    ));
                }
                self.per_listener_settings = v;
            }
            "password_file" | "acl_file" => {
                let p = path_value(key, value, origin)?;
                self.security_line(origin);
                let password = key == "password_file";
                let slot = if self.per_listener_settings {
                    // As in mosquitto: before the first `listener` line this is the default
                    // listener's. A password_file brings that listener into existence (it is
                    // in mosquitto's list of keys that do); an acl_file does not, and one that
                    // ends up applying to no listener is refused at the end.
                    let l = if password || self.current.is_some() {
                        self.cur(key, origin)
                    } else {
                        &mut self.default_listener
                    };
                    if password {
                        &mut l.password_file
                    } else {
                        &mut l.acl_file
                    }
                } else if password {
                    &mut self.global_password_file
                } else {
                    &mut self.global_acl_file
                };
                if let Some((_, first)) = slot {
                    return Err(ConfigError::key(
                        origin,
                        key,
                        format!(
                            "duplicate {key} (already set at {first}); mosquitto refuses this too"
                        ),
                    ));
                }
                *slot = here(p, origin);
            }
            "check_retain_source" => {
                let v = boolean(value)?;
                self.security_line(origin);
                self.check_retain_source = here(v, origin);
            }
            "require_client_id_match_identity" => {
                let v = boolean(value)?;
                self.cur(key, origin).require_client_id_match_identity = here(v, origin);
            }
            "client_id_identity_pattern" => {
                let v = split_value(key, value, origin)?.to_string();
                self.cur(key, origin).client_id_identity_pattern = here(v, origin);
            }
            "allow_anonymous" => {
                let v = boolean(value)?;
                self.security_line(origin);
                if self.per_listener_settings {
                    if self.current.is_none() {
                        // Applies to the default listener only, as in mosquitto; whether that
                        // listener exists is decided at the end.
                        self.default_listener.allow_anonymous = Some(v);
                    } else {
                        self.cur(key, origin).allow_anonymous = Some(v);
                    }
                } else {
                    self.global_allow_anonymous = Some(v);
                }
            }
            "listener_allow_anonymous" => {
                let v = boolean(value)?;
                self.cur(key, origin).listener_allow_anonymous = Some(v);
            }
            // --- TLS -----------------------------------------------------------------------
            "certfile" => {
                let p = path_value(key, value, origin)?;
                self.cur(key, origin).tls.certfile = here(p, origin);
            }
            "keyfile" => {
                let p = path_value(key, value, origin)?;
                self.cur(key, origin).tls.keyfile = here(p, origin);
            }
            "cafile" => {
                let p = path_value(key, value, origin)?;
                self.cur(key, origin).tls.cafile = here(p, origin);
            }
            "capath" => {
                let p = path_value(key, value, origin)?;
                self.cur(key, origin).tls.capath = here(p, origin);
            }
            "crlfile" => {
                let p = path_value(key, value, origin)?;
                self.cur(key, origin).tls.crlfile = here(p, origin);
            }
            "require_certificate" => {
                let v = boolean(value)?;
                self.cur(key, origin).tls.require_certificate = here(v, origin);
            }
            "use_identity_as_username" => {
                let v = boolean(value)?;
                self.cur(key, origin).tls.use_identity_as_username = here(v, origin);
            }
            "use_subject_as_username" => {
                let v = boolean(value)?;
                self.cur(key, origin).tls.use_subject_as_username = here(v, origin);
            }
            "tls_version" => {
                let v = match split_value(key, value, origin)? {
                    "tlsv1.2" => TlsVersion::Tls12,
                    "tlsv1.3" => TlsVersion::Tls13,
                    old @ ("tlsv1" | "tlsv1.1") => {
                        return Err(ConfigError::key(
                            origin,
                            key,
                            format!("'{old}' is not supported: Midge (rustls) speaks TLS 1.2 and 1.3 only; use tlsv1.2"),
                        ))
                    }
                    other => {
                        return Err(ConfigError::key(
                            origin,
                            key,
                            format!("expected tlsv1.2 or tlsv1.3, got '{other}'"),
                        ))
                    }
                };
                self.cur(key, origin).tls.tls_version = here(v, origin);
            }
            "ciphers" | "ciphers_tls1.3" => {
                let v = split_value(key, value, origin)?;
                if v.split(':').all(|s| s.is_empty()) {
                    return Err(ConfigError::key(
                        origin,
                        key,
                        "expected a colon-separated cipher list",
                    ));
                }
                let tls = &mut self.cur(key, origin).tls;
                if key == "ciphers" {
                    tls.ciphers = here(v.to_string(), origin);
                } else {
                    tls.ciphers_tls13 = here(v.to_string(), origin);
                }
            }
            "tls_kx_groups" => {
                let v = split_value(key, value, origin)?;
                let mut groups = Vec::new();
                if v != "default" {
                    for name in v.split([',', ':']) {
                        let g = KxGroup::parse(name).map_err(|_| {
                            let known: Vec<&str> = KxGroup::ALL.iter().map(|g| g.as_str()).collect();
                            ConfigError::key(
                                origin,
                                key,
                                format!(
                                    "unknown key-exchange group '{name}'; expected a comma list of {} (or 'default')",
                                    known.join(", ")
                                ),
                            )
                        })?;
                        if !groups.contains(&g) {
                            groups.push(g);
                        }
                    }
                }
                self.cur(key, origin).tls.kx_groups = here(groups, origin);
            }
            "tls_handshake_timeout" => {
                let d = map(
                    key,
                    origin,
                    parse_seconds(split_value(key, value, origin)?, 1, 300),
                )?;
                self.cur(key, origin).tls.handshake_timeout = here(d, origin);
            }
            "max_handshakes_in_progress" => {
                let n = num(value, 1, 1_000_000)? as usize;
                self.cur(key, origin).tls.max_handshakes = here(n, origin);
            }
            // --- limits and sessions -----------------------------------------------------------
            "max_inflight_messages" => {
                self.limits.max_inflight_messages = num(value, 0, 65535)? as u16;
            }
            "max_queued_messages" => {
                self.limits.max_queued_messages = num(value, 0, u32::MAX as u64)? as u32;
                self.queue_origin = Some(origin.clone());
            }
            "max_queued_bytes" => {
                self.limits.max_queued_bytes = num(value, 0, u64::MAX)?;
                self.queue_origin = Some(origin.clone());
            }
            "message_size_limit" => {
                self.limits.message_size_limit =
                    num(value, 0, defaults::PROTOCOL_MAX_PAYLOAD as u64)? as u32;
            }
            "max_packet_size" => {
                let v = split_value(key, value, origin)?;
                let n =
                    parse_number(v, 0, defaults::PROTOCOL_MAX_PACKET_SIZE as u64).map_err(|_| {
                        ConfigError::key(
                            origin,
                            key,
                            format!(
                                "expected 0 (protocol maximum) or a number {}-{}, got '{v}'",
                                defaults::MIN_MAX_PACKET_SIZE,
                                defaults::PROTOCOL_MAX_PACKET_SIZE
                            ),
                        )
                    })? as u32;
                if n != 0 && n < defaults::MIN_MAX_PACKET_SIZE {
                    return Err(ConfigError::key(
                        origin,
                        key,
                        format!(
                            "{n} is below {} bytes, which would refuse ordinary packets",
                            defaults::MIN_MAX_PACKET_SIZE
                        ),
                    ));
                }
                self.limits.max_packet_size = n;
            }
            "max_subscriptions_per_client" => {
                self.limits.max_subscriptions_per_client = num(value, 0, u32::MAX as u64)? as u32;
            }
            "max_keepalive" => {
                self.limits.max_keepalive = num(value, 0, 65535)? as u16;
            }
            "retain_available" => {
                self.limits.retain_available = boolean(value)?;
            }
            "persistent_client_expiration" => {
                let d = map(
                    key,
                    origin,
                    parse_mosquitto_duration(split_value(key, value, origin)?),
                )?;
                self.limits.persistent_client_expiration = Some(d);
            }
            "queue_qos0_messages" => {
                self.limits.queue_qos0_messages = boolean(value)?;
            }
            "upgrade_outgoing_qos" => {
                if boolean(value)? {
                    return Err(ConfigError::key(
                        origin,
                        key,
                        "not supported by Midge (it changes delivery QoS against the MQTT spec); remove it",
                    ));
                }
                self.warn(
                    origin,
                    key,
                    "false is Midge's behaviour; the line can be removed",
                    true,
                );
            }
            "persistence" => self.persistence = Some(boolean(value)?),
            "persistence_location" => {
                self.persistence_location = Some(PathBuf::from(value));
            }
            "persistence_file" => {
                if value.contains('/') {
                    return Err(ConfigError::key(
                        origin,
                        key,
                        "expected a name inside persistence_location, not a path",
                    ));
                }
                self.persistence_file = Some(value.to_string());
            }
            "persistence_sync" => {
                self.persistence_sync = Some(match value {
                    "always" => super::SyncMode::Always,
                    "batch" => super::SyncMode::Batch,
                    "none" => super::SyncMode::None,
                    _ => {
                        return Err(ConfigError::key(
                            origin,
                            key,
                            "expected always, batch or none",
                        ))
                    }
                });
            }
            "persistence_timeout" => {
                let secs = num(value, 1, 86_400)?;
                self.persistence_timeout = Some(Duration::from_secs(secs));
            }
            "persistence_max_backlog" => {
                self.persistence_max_backlog = Some(num(value, 4096, 1 << 40)?);
            }
            // mosquitto's bool (it also takes 0 and 1): count changes instead of seconds.
            "autosave_on_changes" => {
                self.autosave_on_changes = match value {
                    "1" => true,
                    "0" => false,
                    v => boolean(v)?,
                };
            }
            // Midge records every change as it happens; this is how often the log is
            // compacted while running (0: only at start-up).
            "autosave_interval" => {
                let secs = num(value, 0, u32::MAX as u64)?;
                self.autosave_interval = Duration::from_secs(secs);
            }
            "sys_interval" => {
                let secs = num(value, 0, u32::MAX as u64)?;
                self.sys_interval = (secs > 0).then(|| Duration::from_secs(secs));
            }
            "set_tcp_nodelay" => {
                boolean(value)?;
                self.warn(
                    origin,
                    key,
                    "Midge always sets TCP_NODELAY on client sockets; the setting is not needed",
                    true,
                );
            }
            "pid_file" => {
                self.pid_file = Some(path_value(key, value, origin)?);
            }
            // --- logging ---------------------------------------------------------------------
            "log_timestamp" => self.log_timestamp = boolean(value)?,
            "log_timestamp_format" => {
                // The whole rest of the line: strftime formats contain spaces.
                if value.is_empty() {
                    return Err(ConfigError::key(origin, key, "missing strftime format"));
                }
                if value.contains('\0') {
                    return Err(ConfigError::key(origin, key, "NUL in the format"));
                }
                self.log_timestamp_format = Some(value.to_string());
            }
            "log_dest" => {
                let mut parts = value.split_whitespace();
                let dest = match parts.next() {
                    Some("stderr") => LogDest::Stderr,
                    Some("stdout") => LogDest::Stdout,
                    Some("none") => LogDest::None,
                    Some("file") => {
                        return Err(ConfigError::key(
                            origin,
                            key,
                            "'file' is not supported by Midge; use log_dest stderr and let systemd-journald \
                             (or your supervisor) store the log",
                        ))
                    }
                    Some(d @ ("syslog" | "topic" | "dlt" | "android")) => {
                        return Err(ConfigError::key(
                            origin,
                            key,
                            format!(
                                "'{d}' is not supported by Midge; use log_dest stderr or stdout (under systemd, \
                                 journald collects it)"
                            ),
                        ))
                    }
                    Some(other) => {
                        return Err(ConfigError::key(
                            origin,
                            key,
                            format!("expected stderr, stdout or none, got '{other}'"),
                        ))
                    }
                    None => return Err(ConfigError::key(origin, key, "missing value")),
                };
                if let Some(extra) = parts.next() {
                    return Err(ConfigError::key(
                        origin,
                        key,
                        format!("unexpected '{extra}'"),
                    ));
                }
                if let Some((prev, prev_at)) = &self.log_dest {
                    if *prev != dest {
                        return Err(ConfigError::key(
                            origin,
                            key,
                            format!(
                                "Midge writes its log to one destination; this conflicts with log_dest at {prev_at}"
                            ),
                        ));
                    }
                }
                self.log_dest = here(dest, origin);
            }
            "log_type" => {
                // mosquitto's conf.c: the first log_type line replaces the default set,
                // later lines add to it, `none` empties it and `all` fills it.
                let v = split_value(key, value, origin)?;
                let Some(t) = LogTypes::from_name(v) else {
                    return Err(ConfigError::key(
                        origin,
                        key,
                        format!(
                            "expected one of error, warning, notice, information, debug, subscribe, \
                             unsubscribe, websockets, internal, all, none; got '{v}'"
                        ),
                    ));
                };
                let cur = self.log_types.unwrap_or(LogTypes::NONE);
                self.log_types = Some(if t == LogTypes::NONE {
                    LogTypes::NONE
                } else {
                    cur.with(t)
                });
                self.log_types_origin = Some(origin.clone());
                if t == LogTypes::WEBSOCKETS || t == LogTypes::INTERNAL {
                    self.warn(
                        origin,
                        key,
                        format!("Midge writes no '{v}' lines; accepted for compatibility"),
                        true,
                    );
                }
            }
            "connection_messages" => self.connection_messages = boolean(value)?,
            "log_format" => {
                self.log_format = match split_value(key, value, origin)? {
                    "mosquitto" => LogFormat::Mosquitto,
                    "json" => LogFormat::Json,
                    other => {
                        return Err(ConfigError::key(
                            origin,
                            key,
                            format!("expected mosquitto or json, got '{other}'"),
                        ))
                    }
                };
            }
            "metrics_listener" => {
                let mut parts = value.split_whitespace();
                let port = match parts.next() {
                    Some(p) => map(key, origin, parse_port(p))?,
                    None => return Err(ConfigError::key(origin, key, "missing port")),
                };
                let ip = match parts.next() {
                    Some(h) => map(key, origin, parse_host(h))?,
                    None => defaults::METRICS_ADDRESS,
                };
                if let Some(extra) = parts.next() {
                    return Err(ConfigError::key(
                        origin,
                        key,
                        format!("unexpected '{extra}' (metrics_listener PORT [ADDRESS])"),
                    ));
                }
                self.metrics_listener = here(SocketAddr::new(ip, port), origin);
            }
            // --- Midge -----------------------------------------------------------------------
            "shards" => {
                let n = num(value, 1, defaults::MAX_SHARDS as u64)? as usize;
                self.shards = here(n, origin);
            }
            _ => return self.other_key(key, origin),
        }
        Ok(())
    }

    /// Remember the first security line (see `per_listener_settings`).
    fn security_line(&mut self, origin: &Origin) {
        if self.security_seen.is_none() {
            self.security_seen = Some(origin.clone());
        }
    }

    fn touch_default(&mut self, origin: &Origin) {
        if !self.default_from_file {
            self.default_from_file = true;
            self.default_listener.origin = origin.clone();
        }
    }

    /// Keys Midge does not implement: harmless ones warn, everything else is an error.
    fn other_key(&mut self, key: &str, origin: &Origin) -> Result<(), ConfigError> {
        if key == "dhparamfile" && self.current.is_none() {
            self.dhparamfile_before_listener = true;
        }
        if key == "user" && is_root() {
            return Err(ConfigError::key(
                origin,
                key,
                "Midge does not drop privileges; start it as an unprivileged user \
                 (systemd: User=midge) and remove this line",
            ));
        }
        if let Some((_, why)) = HARMLESS_KEYS.iter().find(|(k, _)| *k == key) {
            self.warn(origin, key, format!("accepted and ignored: {why}"), false);
            return Ok(());
        }
        let why = UNSUPPORTED_KEYS
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, w)| *w)
            .or_else(|| {
                UNSUPPORTED_PREFIXES
                    .iter()
                    .find(|(p, _)| key.starts_with(p))
                    .map(|(_, w)| *w)
            });
        Err(match why {
            Some(why) => ConfigError::key(
                origin,
                key,
                format!("not supported by Midge: {why}"),
            ),
            None => ConfigError::key(
                origin,
                key,
                "unknown key (neither a mosquitto key Midge supports nor a Midge key; check the spelling)",
            ),
        })
    }

    /// Resolve `allow_anonymous` for one listener (rules in the module docs).
    fn anonymous(&self, l: &RawListener, local_only: bool) -> bool {
        if let Some(v) = l.listener_allow_anonymous {
            return v;
        }
        if self.per_listener_settings {
            if let Some(v) = l.allow_anonymous {
                return v;
            }
        } else if let Some(v) = self.global_allow_anonymous {
            return v;
        }
        local_only && l.host.is_some_and(|h| h.is_loopback())
    }

    /// Validate and produce the final configuration.
    pub(crate) fn finish(mut self, source: Option<PathBuf>) -> Result<Config, ConfigError> {
        let created = self.mosquitto_default_listener();
        if created && !self.default_from_file {
            if let Some((key, origin)) = self.default_keys.clone() {
                self.default_listener.origin = origin.clone();
                self.warn(
                    &origin,
                    &key,
                    "per-listener key before any `listener` line: as in mosquitto it creates the \
                     default listener (port 1883 on all interfaces unless `port`/`bind_address` \
                     say otherwise); add a `listener` line to be explicit",
                    false,
                );
            }
        } else if !created {
            if let Some((key, origin)) = self.default_keys.clone() {
                self.warn(
                    &origin,
                    &key,
                    "written before any `listener` line, this applies to mosquitto's default \
                     listener, which this file does not create (as in mosquitto): it has no \
                     effect; move it under a `listener` line",
                    false,
                );
            }
        }
        self.default_from_file = created;
        let file_listeners = !self.listeners.is_empty() || self.default_from_file;
        let local_only = !file_listeners && self.cli_listeners.is_empty();

        let mut raw: Vec<RawListener> = Vec::new();
        if self.default_from_file || self.default_from_cli || local_only {
            let mut d = self.default_listener.clone();
            if d.host.is_none() {
                // `port` in a file binds all interfaces (mosquitto); `-p` alone or no listener
                // at all binds loopback only (mosquitto 2.0 local-only mode).
                d.host = Some(if self.default_from_file {
                    defaults::ANY_ADDRESS
                } else {
                    defaults::CLI_PORT_ADDRESS
                });
            }
            if d.port.is_none() {
                d.port = Some(defaults::PORT);
            }
            raw.push(d);
        } else if let (true, Some((_, o))) =
            (self.per_listener_settings, &self.default_listener.acl_file)
        {
            // mosquitto would attach it to a default listener that does not exist and leave
            // every real listener without an ACL: a security setting silently protecting
            // nothing.
            return Err(ConfigError::key(
                o,
                "acl_file",
                "with per_listener_settings true, an acl_file before the first `listener` line \
                 applies only to the default listener (port/bind_address), which is not \
                 configured, so it would protect no listener; move it into the listener sections \
                 it is for",
            ));
        } else if self.per_listener_settings && self.default_listener.allow_anonymous.is_some() {
            self.warnings.push(ConfigWarning {
                origin: Origin::Default,
                key: "allow_anonymous".into(),
                message: "with per_listener_settings true, an allow_anonymous line before the first \
                          `listener` applies only to the default listener (port/bind_address), which \
                          is not configured; it has no effect"
                    .into(),
                info: false,
            });
        }
        raw.extend(self.listeners.iter().cloned());
        raw.extend(self.cli_listeners.iter().cloned());

        let mut listeners = Vec::with_capacity(raw.len());
        for l in &raw {
            let addr = SocketAddr::new(
                l.host.unwrap_or(defaults::ANY_ADDRESS),
                l.port.unwrap_or(defaults::PORT),
            );
            let allow_anonymous = self.anonymous(l, local_only);
            if local_only
                && !allow_anonymous
                && !addr.ip().is_loopback()
                && self.global_allow_anonymous.is_none()
                && l.listener_allow_anonymous.is_none()
            {
                self.warnings.push(ConfigWarning {
                    origin: l.origin.clone(),
                    key: "allow_anonymous".into(),
                    message: format!(
                        "anonymous clients are only allowed implicitly on loopback; {addr} denies them \
                         unless a configuration file sets allow_anonymous true"
                    ),
                    info: false,
                });
            }
            let tls = finish_tls(&l.tls, &l.origin, addr, &mut self.warnings)?;
            let (password_file, acl_file) = if self.per_listener_settings {
                (l.password_file.clone(), l.acl_file.clone())
            } else {
                (
                    self.global_password_file.clone(),
                    self.global_acl_file.clone(),
                )
            };
            let client_id_binding =
                finish_client_id_binding(l, tls.as_ref(), addr, &mut self.warnings)?;
            let lc = ListenerConfig {
                addr,
                allow_anonymous,
                max_connections: l.max_connections,
                max_qos: l.max_qos,
                max_topic_alias: l.max_topic_alias,
                protocol: Protocol::Mqtt,
                tls,
                password_file: password_file.map(|(path, origin)| SecurityFile { path, origin }),
                acl_file: acl_file.map(|(path, origin)| SecurityFile { path, origin }),
                client_id_binding,
                origin: l.origin.clone(),
            };
            if !lc.can_authenticate() {
                self.warnings.push(ConfigWarning {
                    origin: lc.origin.clone(),
                    key: "allow_anonymous".into(),
                    message: format!(
                        "listener {addr} denies anonymous clients and takes no username from client \
                         certificates and has no password_file, so no client can connect. Set \
                         allow_anonymous true, a password_file, or require_certificate true with \
                         use_identity_as_username true"
                    ),
                    info: false,
                });
            }
            listeners.push(lc);
        }
        check_overlaps(&listeners)?;
        self.check_security_files(&listeners)?;

        let limits = self.limits.clone();
        if limits.max_queued_messages == 0 && limits.max_queued_bytes == 0 {
            return Err(ConfigError::key(
                self.queue_origin.as_ref().unwrap_or(&Origin::Default),
                "max_queued_messages",
                "0 (no maximum) together with max_queued_bytes 0 leaves per-client queues unbounded: \
                 one slow subscriber could exhaust memory. Set a bound, e.g. max_queued_messages 1000",
            ));
        }

        if limits.message_size_limit > limits.effective_max_packet_size() {
            self.warnings.push(ConfigWarning {
                origin: Origin::Default,
                key: "message_size_limit".into(),
                message: format!(
                    "{} is above max_packet_size {}, so it never applies",
                    limits.message_size_limit,
                    limits.effective_max_packet_size()
                ),
                info: false,
            });
        }

        let shards = match &self.shards {
            Some((n, origin)) => {
                let cpus = defaults::shards();
                if *n > cpus {
                    self.warnings.push(ConfigWarning {
                        origin: origin.clone(),
                        key: "shards".into(),
                        message: format!(
                            "{n} shards on {cpus} available CPUs: shards will share cores and lose the \
                             thread-per-core benefit"
                        ),
                        info: false,
                    });
                }
                *n
            }
            None => defaults::shards(),
        };

        let types = if self.verbose {
            LogTypes::ALL
        } else {
            self.log_types.unwrap_or(LogTypes::DEFAULT)
        };
        if let Some(origin) = &self.log_types_origin {
            if !self.verbose
                && types != LogTypes::NONE
                && !types.contains(LogTypes::ERROR.with(LogTypes::WARNING))
            {
                self.warnings.push(ConfigWarning {
                    origin: origin.clone(),
                    key: "log_type".into(),
                    message: "error or warning lines are not logged with this log_type set \
                              (as in mosquitto, the first log_type line replaces the default); \
                              add `log_type error` and `log_type warning` to keep them"
                        .into(),
                    info: false,
                });
            }
        }
        if let Some((addr, origin)) = &self.metrics_listener {
            if let Some(l) = listeners.iter().find(|l| {
                l.addr.port() == addr.port()
                    && (l.addr.ip() == addr.ip()
                        || l.addr.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            }) {
                return Err(ConfigError::key(
                    origin,
                    "metrics_listener",
                    format!(
                        "{addr} overlaps the MQTT listener {} declared at {}",
                        l.addr, l.origin
                    ),
                ));
            }
        }
        Ok(Config {
            shards,
            listeners,
            limits,
            log: LogSettings {
                dest: self.log_dest.map(|d| d.0).unwrap_or(LogDest::Stderr),
                types,
                level: types.max_level(),
                connection_messages: self.connection_messages,
                format: self.log_format,
                timestamp: self.log_timestamp,
                timestamp_format: self.log_timestamp_format,
            },
            sys_interval: self.sys_interval,
            metrics_listener: self.metrics_listener.map(|m| m.0),
            autosave_interval: self.autosave_interval,
            persistence: self
                .persistence
                .unwrap_or(false)
                .then(|| super::Persistence {
                    dir: self
                        .persistence_location
                        .clone()
                        .unwrap_or_else(|| PathBuf::from("."))
                        .join(self.persistence_file.as_deref().unwrap_or("midge.db")),
                    sync: self.persistence_sync.unwrap_or_default(),
                    timeout: self
                        .persistence_timeout
                        .unwrap_or(defaults::PERSISTENCE_TIMEOUT),
                    max_backlog: self
                        .persistence_max_backlog
                        .unwrap_or(defaults::PERSISTENCE_MAX_BACKLOG),
                    compaction: match self.autosave_interval.as_secs() {
                        0 => None,
                        n if self.autosave_on_changes => {
                            Some(crate::store::compact::Cadence::Changes(n))
                        }
                        _ => Some(crate::store::compact::Cadence::Every(
                            self.autosave_interval,
                        )),
                    },
                }),
            pid_file: self.pid_file,
            per_listener_settings: self.per_listener_settings,
            source,
            warnings: self.warnings,
        })
    }
}

impl Builder {
    /// Parse every password and ACL file a listener uses (each once), so a bad file is a
    /// start-up and `--check-config` error naming its FILE:LINE; collect their warnings.
    fn check_security_files(&mut self, listeners: &[ListenerConfig]) -> Result<(), ConfigError> {
        let mut seen: Vec<&Path> = Vec::new();
        let mut any_acl = false;
        for l in listeners {
            for (key, file) in [
                ("password_file", &l.password_file),
                ("acl_file", &l.acl_file),
            ] {
                let Some(f) = file else { continue };
                any_acl |= key == "acl_file";
                if seen.contains(&f.path.as_path()) {
                    continue;
                }
                seen.push(&f.path);
                let fail =
                    |e: crate::auth::AuthFileError| ConfigError::key(&f.origin, key, e.to_string());
                if key == "password_file" {
                    crate::auth::PasswordFile::load(&f.path).map_err(fail)?;
                    if let Ok(m) = std::fs::metadata(&f.path) {
                        use std::os::unix::fs::PermissionsExt;
                        if m.permissions().mode() & 0o007 != 0 {
                            self.warn(
                                &f.origin,
                                key,
                                format!(
                                    "{} is readable by other users (mosquitto 2.0.16+ warns too): \
                                     chmod o-rwx it",
                                    f.path.display()
                                ),
                                false,
                            );
                        }
                    }
                } else {
                    let acl = crate::auth::AclFile::load(&f.path).map_err(fail)?;
                    for w in acl.warnings() {
                        self.warn(&f.origin, key, w.to_string(), false);
                    }
                    if acl.grants_nothing() {
                        self.warn(
                            &f.origin,
                            key,
                            format!(
                                "{} grants nothing: every publish and every delivery is denied \
                                 (as in mosquitto)",
                                f.path.display()
                            ),
                            false,
                        );
                    }
                }
            }
        }
        match &self.check_retain_source {
            Some((true, o)) if any_acl => {
                return Err(ConfigError::key(
                    o,
                    "check_retain_source",
                    "not supported by Midge yet: retained messages are checked against the \
                     reader's ACL only, not again against their publisher's; remove it or set it \
                     to false",
                ))
            }
            Some((true, o)) => {
                let o = o.clone();
                self.warn(
                    &o,
                    "check_retain_source",
                    "accepted and ignored: it only matters with an acl_file",
                    false,
                );
            }
            Some((false, o)) => {
                let o = o.clone();
                self.warn(
                    &o,
                    "check_retain_source",
                    "false is Midge's behaviour (and mosquitto 2.0's, whose documented default \
                     of true is not what its code does); the line can be removed",
                    true,
                );
            }
            None => {}
        }
        Ok(())
    }
}

/// `require_client_id_match_identity` / `client_id_identity_pattern` of one listener.
fn finish_client_id_binding(
    l: &RawListener,
    tls: Option<&TlsSettings>,
    addr: SocketAddr,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<Option<ClientIdBinding>, ConfigError> {
    let pattern = l.client_id_identity_pattern.as_ref();
    let Some((true, origin)) = &l.require_client_id_match_identity else {
        if let Some((_, o)) = pattern {
            warnings.push(ConfigWarning {
                origin: o.clone(),
                key: "client_id_identity_pattern".into(),
                message: "has no effect without require_client_id_match_identity true".into(),
                info: false,
            });
        }
        return Ok(None);
    };
    let Some(t) = tls.filter(|t| t.require_certificate) else {
        return Err(ConfigError::key(
            origin,
            "require_client_id_match_identity",
            format!(
                "needs require_certificate true on listener {addr} (a TLS listener): the client id \
                 is bound to the verified client certificate"
            ),
        ));
    };
    let source = if t.use_subject_as_username && !t.use_identity_as_username {
        IdentitySource::Subject
    } else {
        IdentitySource::CommonName
    };
    let rule = ClientIdRule::new(source, pattern.map(|p| p.0.as_str())).map_err(|e| {
        let o = pattern.map(|p| &p.1).unwrap_or(origin);
        ConfigError::key(o, "client_id_identity_pattern", e)
    })?;
    Ok(Some(ClientIdBinding {
        rule,
        origin: origin.clone(),
    }))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Two listeners on one port whose addresses overlap would share the port through
/// SO_REUSEPORT instead of failing: refuse that here.
fn check_overlaps(listeners: &[ListenerConfig]) -> Result<(), ConfigError> {
    for (i, a) in listeners.iter().enumerate() {
        for b in &listeners[i + 1..] {
            if a.addr.port() != b.addr.port() {
                continue;
            }
            let (x, y) = (a.addr.ip(), b.addr.ip());
            let overlap = x == y
                || (x.is_unspecified() && (x.is_ipv6() || y.is_ipv4()))
                || (y.is_unspecified() && (y.is_ipv6() || x.is_ipv4()));
            if overlap {
                return Err(ConfigError::At {
                    origin: b.origin.clone(),
                    message: format!(
                        "listener {} overlaps listener {} declared at {}: both would accept on port {}",
                        b.addr,
                        a.addr,
                        a.origin,
                        a.addr.port()
                    ),
                });
            }
        }
    }
    Ok(())
}

fn check_readable(key: &str, path: &Path, origin: &Origin, dir: bool) -> Result<(), ConfigError> {
    let res = if dir {
        std::fs::read_dir(path).map(|_| ())
    } else {
        std::fs::File::open(path).and_then(|f| {
            if f.metadata()?.is_dir() {
                Err(std::io::Error::other("is a directory"))
            } else {
                Ok(())
            }
        })
    };
    res.map_err(|e| {
        ConfigError::key(
            origin,
            key,
            format!("cannot read '{}': {e}", path.display()),
        )
    })
}

fn finish_tls(
    t: &RawTls,
    listener_origin: &Origin,
    addr: SocketAddr,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<Option<TlsSettings>, ConfigError> {
    let (certfile, keyfile) = match (&t.certfile, &t.keyfile) {
        (Some(c), Some(k)) => (c, k),
        (Some((_, o)), None) => {
            return Err(ConfigError::key(
                o,
                "certfile",
                format!(
                    "certfile is set but keyfile is not (listener {addr}): certificate-based TLS needs \
                     both certfile and keyfile"
                ),
            ))
        }
        (None, Some((_, o))) => {
            return Err(ConfigError::key(
                o,
                "keyfile",
                format!(
                    "keyfile is set but certfile is not (listener {addr}): certificate-based TLS needs \
                     both certfile and keyfile"
                ),
            ))
        }
        (None, None) => {
            if let Some((key, o)) = t.first_other_key() {
                return Err(ConfigError::key(
                    o,
                    key,
                    format!(
                        "is a TLS setting, but listener {addr} (declared at {listener_origin}) has no \
                         certfile and keyfile; add both to make it a TLS listener"
                    ),
                ));
            }
            return Ok(None);
        }
    };
    check_readable("certfile", &certfile.0, &certfile.1, false)?;
    check_readable("keyfile", &keyfile.0, &keyfile.1, false)?;
    for (key, v) in [("cafile", &t.cafile), ("crlfile", &t.crlfile)] {
        if let Some((p, o)) = v {
            check_readable(key, p, o, false)?;
        }
    }
    if let Some((p, o)) = &t.capath {
        check_readable("capath", p, o, true)?;
    }
    let flag = |v: &At<bool>| v.as_ref().is_some_and(|x| x.0);
    let require_certificate = flag(&t.require_certificate);
    if require_certificate && t.cafile.is_none() && t.capath.is_none() {
        let o = &t
            .require_certificate
            .as_ref()
            .map(|x| x.1.clone())
            .unwrap_or(Origin::Default);
        return Err(ConfigError::key(
            o,
            "require_certificate",
            format!("listener {addr} requires client certificates but has no cafile or capath to verify them"),
        ));
    }
    for (key, v) in [
        ("use_identity_as_username", &t.use_identity_as_username),
        ("use_subject_as_username", &t.use_subject_as_username),
    ] {
        if let Some((true, o)) = v {
            if !require_certificate {
                return Err(ConfigError::key(
                    o,
                    key,
                    format!(
                        "needs require_certificate true on listener {addr}: otherwise a client without a \
                         certificate could choose any username"
                    ),
                ));
            }
        }
    }
    if flag(&t.use_identity_as_username) && flag(&t.use_subject_as_username) {
        if let Some((_, o)) = &t.use_subject_as_username {
            warnings.push(ConfigWarning {
                origin: o.clone(),
                key: "use_subject_as_username".into(),
                message: "use_identity_as_username takes priority (as in mosquitto)".into(),
                info: false,
            });
        }
    }
    if t.crlfile.is_some() && !require_certificate {
        if let Some((_, o)) = &t.crlfile {
            warnings.push(ConfigWarning {
                origin: o.clone(),
                key: "crlfile".into(),
                message: "only checked against client certificates; clients may still connect without one \
                          unless require_certificate is true"
                    .into(),
                info: false,
            });
        }
    }
    Ok(Some(TlsSettings {
        certfile: certfile.0.clone(),
        keyfile: keyfile.0.clone(),
        cafile: t.cafile.as_ref().map(|x| x.0.clone()),
        capath: t.capath.as_ref().map(|x| x.0.clone()),
        crlfile: t.crlfile.as_ref().map(|x| x.0.clone()),
        require_certificate,
        use_identity_as_username: flag(&t.use_identity_as_username),
        use_subject_as_username: flag(&t.use_subject_as_username),
        tls_version: t
            .tls_version
            .as_ref()
            .map(|x| x.0)
            .unwrap_or(TlsVersion::Tls12),
        ciphers: t.ciphers.as_ref().map(|x| x.0.clone()),
        ciphers_tls13: t.ciphers_tls13.as_ref().map(|x| x.0.clone()),
        kx_groups: t
            .kx_groups
            .as_ref()
            .map(|x| x.0.clone())
            .unwrap_or_default(),
        handshake_timeout: t
            .handshake_timeout
            .as_ref()
            .map(|x| x.0)
            .unwrap_or(defaults::TLS_HANDSHAKE_TIMEOUT),
        max_handshakes_in_progress: t
            .max_handshakes
            .as_ref()
            .map(|x| x.0)
            .unwrap_or(defaults::MAX_HANDSHAKES_IN_PROGRESS),
    }))
}
