//! The effective configuration as mosquitto.conf-style text (`--check-config`). The output is
//! itself a valid Midge configuration that loads to the same [`Config`].

use std::fmt::Write;

use super::value::format_mosquitto_duration;
use super::{Config, ListenerConfig, LogDest, LogFormat, Origin};

/// Render `config` with every default filled in; warnings come first as comments.
pub fn render_effective(config: &Config) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(s, "# Midge effective configuration (defaults filled in)");
    match &config.source {
        Some(p) => {
            let _ = writeln!(s, "# read from {}", p.display());
        }
        None => {
            let _ = writeln!(
                s,
                "# no configuration file: built-in defaults and command line"
            );
        }
    }
    for w in &config.warnings {
        let kind = if w.info { "note" } else { "warning" };
        let _ = writeln!(s, "# {kind}: {w}");
    }

    let _ = writeln!(s, "\n# general");
    let _ = writeln!(s, "shards {}", config.shards);
    let _ = writeln!(s, "per_listener_settings {}", config.per_listener_settings);
    if !config.per_listener_settings {
        // Global: every listener has the same files; write them once, before any listener.
        if let Some(l) = config.listeners.first() {
            render_security_files(&mut s, l);
        }
    }
    if let Some(p) = &config.pid_file {
        let _ = writeln!(s, "pid_file {}", p.display());
    }
    let _ = writeln!(
        s,
        "sys_interval {}",
        config.sys_interval.map(|d| d.as_secs()).unwrap_or(0)
    );
    match &config.persistence {
        None => {
            let _ = writeln!(s, "persistence false");
        }
        Some(p) => {
            let _ = writeln!(s, "persistence true");
            let _ = writeln!(s, "# persistence directory: {}", p.dir.display());
            let sync = match p.sync {
                super::SyncMode::Always => "always",
                super::SyncMode::Batch => "batch",
                super::SyncMode::None => "none",
            };
            let _ = writeln!(s, "persistence_sync {sync}");
            let _ = writeln!(s, "persistence_timeout {}", p.timeout.as_secs());
            let _ = writeln!(s, "persistence_max_backlog {}", p.max_backlog);
        }
    }
    let _ = writeln!(
        s,
        "autosave_interval {}",
        config.autosave_interval.as_secs()
    );
    if let Some(p) = &config.persistence {
        if matches!(
            p.compaction,
            Some(crate::store::compact::Cadence::Changes(_))
        ) {
            let _ = writeln!(s, "autosave_on_changes true");
        }
    }
    let dest = match config.log.dest {
        LogDest::Stderr => "stderr",
        LogDest::Stdout => "stdout",
        LogDest::None => "none",
    };
    let _ = writeln!(s, "log_dest {dest}");
    let _ = writeln!(s, "log_timestamp {}", config.log.timestamp);
    if let Some(f) = &config.log.timestamp_format {
        let _ = writeln!(s, "log_timestamp_format {f}");
    }
    for t in config.log.types.names() {
        let _ = writeln!(s, "log_type {t}");
    }
    let _ = writeln!(s, "connection_messages {}", config.log.connection_messages);
    let _ = writeln!(
        s,
        "log_format {}",
        match config.log.format {
            LogFormat::Mosquitto => "mosquitto",
            LogFormat::Json => "json",
        }
    );
    match config.metrics_listener {
        Some(a) => {
            let _ = writeln!(s, "metrics_listener {} {}", a.port(), a.ip());
        }
        None => {
            let _ = writeln!(s, "# metrics_listener: off");
        }
    }

    let l = &config.limits;
    let _ = writeln!(s, "\n# per-client limits and sessions");
    let _ = writeln!(s, "max_inflight_messages {}", l.max_inflight_messages);
    let _ = writeln!(s, "max_queued_messages {}", l.max_queued_messages);
    let _ = writeln!(s, "max_queued_bytes {}", l.max_queued_bytes);
    let _ = writeln!(s, "message_size_limit {}", l.message_size_limit);
    let _ = writeln!(s, "max_packet_size {}", l.max_packet_size);
    let _ = writeln!(s, "max_keepalive {}", l.max_keepalive);
    let _ = writeln!(
        s,
        "max_subscriptions_per_client {}",
        l.max_subscriptions_per_client
    );
    let _ = writeln!(s, "retain_available {}", l.retain_available);
    match l.persistent_client_expiration {
        Some(d) => {
            let _ = writeln!(
                s,
                "persistent_client_expiration {}",
                format_mosquitto_duration(d)
            );
        }
        None => {
            let _ = writeln!(s, "# persistent_client_expiration: never");
        }
    }
    let _ = writeln!(s, "queue_qos0_messages {}", l.queue_qos0_messages);

    for listener in &config.listeners {
        render_listener(&mut s, listener, config.per_listener_settings);
    }
    s
}

fn render_security_files(s: &mut String, l: &ListenerConfig) {
    if let Some(f) = &l.password_file {
        let _ = writeln!(s, "password_file {}", f.path.display());
    }
    if let Some(f) = &l.acl_file {
        let _ = writeln!(s, "acl_file {}", f.path.display());
    }
}

fn render_listener(s: &mut String, l: &ListenerConfig, per_listener_settings: bool) {
    let origin = match &l.origin {
        Origin::Default => "built-in default (no listener configured: local-only mode)".to_string(),
        o => format!("declared at {o}"),
    };
    let _ = writeln!(s, "\n# {origin}");
    let _ = writeln!(s, "listener {} {}", l.addr.port(), l.addr.ip());
    let _ = writeln!(s, "protocol mqtt");
    let _ = writeln!(s, "listener_allow_anonymous {}", l.allow_anonymous);
    let _ = writeln!(
        s,
        "max_connections {}",
        l.max_connections.map(|n| n as i64).unwrap_or(-1)
    );
    let _ = writeln!(s, "max_qos {}", l.max_qos as u8);
    let _ = writeln!(s, "max_topic_alias {}", l.max_topic_alias);
    if per_listener_settings {
        render_security_files(s, l);
    }
    if let Some(b) = &l.client_id_binding {
        let _ = writeln!(s, "require_client_id_match_identity true");
        let _ = writeln!(s, "client_id_identity_pattern {}", b.rule.pattern());
    }
    let Some(t) = &l.tls else {
        return;
    };
    let _ = writeln!(s, "certfile {}", t.certfile.display());
    let _ = writeln!(s, "keyfile {}", t.keyfile.display());
    if let Some(p) = &t.cafile {
        let _ = writeln!(s, "cafile {}", p.display());
    }
    if let Some(p) = &t.capath {
        let _ = writeln!(s, "capath {}", p.display());
    }
    if let Some(p) = &t.crlfile {
        let _ = writeln!(s, "crlfile {}", p.display());
    }
    let _ = writeln!(s, "require_certificate {}", t.require_certificate);
    let _ = writeln!(s, "use_identity_as_username {}", t.use_identity_as_username);
    let _ = writeln!(s, "use_subject_as_username {}", t.use_subject_as_username);
    let _ = writeln!(s, "tls_version {}", t.tls_version.as_str());
    if let Some(c) = &t.ciphers {
        let _ = writeln!(s, "ciphers {c}");
    }
    if let Some(c) = &t.ciphers_tls13 {
        let _ = writeln!(s, "ciphers_tls1.3 {c}");
    }
    if t.kx_groups.is_empty() {
        let _ = writeln!(s, "tls_kx_groups default");
    } else {
        let names: Vec<&str> = t.kx_groups.iter().map(|g| g.as_str()).collect();
        let _ = writeln!(s, "tls_kx_groups {}", names.join(","));
    }
    let _ = writeln!(s, "tls_handshake_timeout {}", t.handshake_timeout.as_secs());
    let _ = writeln!(
        s,
        "max_handshakes_in_progress {}",
        t.max_handshakes_in_progress
    );
}
