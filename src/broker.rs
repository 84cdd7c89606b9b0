//! Glue from a validated [`Config`] to a running broker.
//!
//! Owns: mapping configuration onto the runtime's settings (session limits, listeners, TLS
//! material loaded and validated once at start-up, each listener's security policy with its
//! password and ACL files), and the reload of TLS material and those files on SIGHUP.
//! Must not touch: parsing (that is `config`), sockets and shards (that is `shard`).

use std::sync::Arc;

use crate::auth::{AuthFileError, ListenerSecurity, SecurityFiles};
use crate::config::{Config, ListenerConfig, TlsSettings};
use crate::session::SessionConfig;
use crate::shard::{ListenerSpec, RuntimeConfig, TlsListener};
use crate::tls::{HandshakeStats, TlsError, TlsOptions, TlsReloader, UsernameRule};

/// The TLS options of one listener, field for field.
pub fn tls_options(t: &TlsSettings) -> Result<TlsOptions, TlsError> {
    let mut o = TlsOptions::new(&t.certfile, &t.keyfile);
    o.cafile = t.cafile.clone();
    o.capath = t.capath.clone();
    o.crlfile = t.crlfile.clone();
    o.require_certificate = t.require_certificate;
    o.use_identity_as_username = t.use_identity_as_username;
    o.use_subject_as_username = t.use_subject_as_username;
    o.tls_version = t.tls_version;
    o.ciphers = t.ciphers.clone();
    o.ciphers_tls13 = t.ciphers_tls13.clone();
    o.kx_groups = t.kx_groups.clone();
    o.handshake_timeout = t.handshake_timeout;
    o.max_handshakes_in_progress = t.max_handshakes_in_progress;
    Ok(o)
}

/// Everything needed to start: the runtime settings and the TLS reloaders (for SIGHUP).
pub struct Prepared {
    pub runtime: RuntimeConfig,
    pub reloaders: Vec<Arc<TlsReloader>>,
    /// The password and ACL files of every listener's `ListenerSpec::security`, for SIGHUP.
    pub security_files: SecurityFiles,
}

/// Why the broker cannot be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrepareError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Auth(#[from] AuthFileError),
}

/// One listener's security policy; loads its files into `files` (shared by path).
pub fn listener_security(
    l: &ListenerConfig,
    files: &mut SecurityFiles,
) -> Result<ListenerSecurity, AuthFileError> {
    let password_file = match &l.password_file {
        Some(f) => Some(files.password_file(&f.path)?),
        None => None,
    };
    let acl_file = match &l.acl_file {
        Some(f) => Some(files.acl_file(&f.path)?),
        None => None,
    };
    let client_id_rule = l.client_id_binding.as_ref().map(|b| b.rule.clone());
    Ok(ListenerSecurity {
        allow_anonymous: l.allow_anonymous,
        password_file,
        acl_file,
        client_id_rule,
    })
}

fn listener_spec(
    l: &ListenerConfig,
    shards: usize,
    reloaders: &mut Vec<Arc<TlsReloader>>,
    security: ListenerSecurity,
) -> Result<ListenerSpec, TlsError> {
    let tls = match &l.tls {
        None => None,
        Some(t) => {
            let opts = tls_options(t)?;
            let rule = UsernameRule::from_options(&opts);
            let max = opts.max_handshakes_in_progress.max(1);
            let timeout = opts.handshake_timeout;
            let reloader = Arc::new(TlsReloader::new(opts)?);
            reloaders.push(reloader.clone());
            Some(Arc::new(TlsListener {
                reloader,
                username_rule: rule,
                handshake_timeout: timeout,
                max_handshakes_in_progress: max,
                stats: (0..shards).map(|_| HandshakeStats::new()).collect(),
            }))
        }
    };
    Ok(ListenerSpec {
        addr: l.addr,
        allow_anonymous: l.allow_anonymous,
        max_connections: l.max_connections.map(|n| n as usize).unwrap_or(0),
        max_qos: l.max_qos,
        topic_alias_maximum: l.max_topic_alias,
        tls,
        security,
    })
}

/// Turn the configuration into runtime settings; reads and validates TLS material and the
/// password and ACL files (blocking: call before the shards start).
pub fn prepare(cfg: &Config) -> Result<Prepared, PrepareError> {
    let lim = &cfg.limits;
    let session = SessionConfig {
        max_inflight: lim.max_inflight_messages,
        max_queued_messages: lim.max_queued_messages as usize,
        max_queued_bytes: lim.max_queued_bytes as usize,
        max_packet_size: lim.effective_max_packet_size(),
        max_keepalive: lim.max_keepalive,
        retain_available: lim.retain_available,
        max_session_expiry: lim
            .persistent_client_expiration
            .map(|d| d.as_secs().min(u64::from(u32::MAX - 1)) as u32),
        queue_qos0_offline: lim.queue_qos0_messages,
        max_subscriptions: lim.max_subscriptions_per_client as usize,
        ..SessionConfig::default()
    };
    let mut reloaders = Vec::new();
    let mut security_files = SecurityFiles::new();
    let mut listeners = Vec::with_capacity(cfg.listeners.len());
    for l in &cfg.listeners {
        let security = listener_security(l, &mut security_files)?;
        listeners.push(listener_spec(l, cfg.shards, &mut reloaders, security)?);
    }
    Ok(Prepared {
        runtime: RuntimeConfig {
            shards: cfg.shards,
            listeners,
            session,
            message_size_limit: if lim.message_size_limit == 0 {
                usize::MAX
            } else {
                lim.message_size_limit as usize
            },
            sys_interval: cfg.sys_interval,
            metrics_listener: cfg.metrics_listener,
            persistence: cfg.persistence.clone(),
            ..RuntimeConfig::default()
        },
        reloaders,
        security_files,
    })
}

/// Re-read every password and ACL file; each keeps its old version if the new one does not
/// parse (the log line names FILE:LINE and why). Runs on the signal thread, never on a shard.
pub fn reload_security(files: &SecurityFiles) {
    for outcome in files.reload() {
        match &outcome.result {
            Ok(_) => tracing::info!("{outcome}"),
            Err(_) => tracing::error!("{outcome}"),
        }
    }
}

/// Re-read every TLS listener's material; each listener keeps its old material if its new
/// material fails validation. Runs on the signal thread, never on a shard.
pub fn reload_tls(reloaders: &[Arc<TlsReloader>]) {
    for r in reloaders {
        match r.reload() {
            Ok(warnings) => {
                for w in warnings {
                    tracing::warn!("TLS reload: {w}");
                }
                tracing::info!(
                    "TLS material reloaded ({}): new handshakes use it",
                    r.options().certfile.display()
                );
            }
            Err(e) => tracing::error!("TLS reload failed, keeping the previous material: {e}"),
        }
    }
}
