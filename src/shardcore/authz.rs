//! Authorization inside the core: who a session is to the ACL, and the checks on its messages.
//!
//! Owns: [`Authz`] (a session's listener, its [`AclSubject`], the password-file version it
//! logged in against), the per-listener [`AccessView`]s of this shard, and every check the
//! core makes with them — the write check of an incoming PUBLISH, the read check per
//! subscriber (live fan-out, retained messages on SUBSCRIBE, a resumed session's queued and
//! in-flight messages), the write check of a will when it is published — plus the SIGHUP
//! refresh (new subjects; clients whose password entry changed are disconnected). Must not
//! touch: parsing or loading files (`crate::auth`), the CONNECT decision (the driver makes it
//! before `handle_connect`), fan-out decisions (`fanout.rs` asks [`ShardCore::may_read`]).
//!
//! A session has an `Authz` only if its listener has an `acl_file` or a `password_file`, so a
//! broker without them pays one `None` test per delivery. The `$SYS`/`$share` write rule is
//! the session's (it applies without any file, as in mosquitto).
//!
//! Rules, as mosquitto 2.0.11 applies them (see /work/notes/auth-integration.md):
//! * PUBLISH denied: v5 PUBACK/PUBREC 0x87, 3.1.1 plain acknowledgement; never routed,
//!   retained or remembered (src/handle_publish.c); counted as `publish_not_authorized`.
//! * Delivery denied: that subscriber is skipped, nothing queued (src/subs.c); counted.
//! * Retained messages on SUBSCRIBE: each checked (src/retain.c).
//! * Resumed session: queued and not yet received in-flight messages re-checked with the new
//!   connection's identity, failures dropped (src/handle_connect.c `connection_check_acl`).
//! * Will: checked when published (src/context.c); denied → not published, counted.
//! * SUBSCRIBE: granted, as mosquitto 2.0's acl_file does (src/security_default.c returns
//!   success for `MOSQ_ACL_SUBSCRIBE`); the read check per message decides what arrives.
//!   Refusing "filters no message could ever be read through" was not chosen: fleets
//!   subscribe to broad filters (`#`, `devices/+/cmd`) and expect their own messages, so such
//!   filters are rare; deciding it needs a filter-versus-rules intersection that changes on
//!   every reload (a refused subscription would stay refused after access is granted); and
//!   mosquitto users' clients rely on the grant.

use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info};

use super::registry::ConnKey;
use super::ShardCore;
use crate::auth::{
    AccessView, AclSubject, Action, Client, ListenerSecurity, PasswordFile, TopicLevels,
};
use crate::codec::{QoS, ReasonCode, TopicName};
use crate::logging::escape;
use crate::message::Message;
use crate::metrics::DropCause;
use crate::session::{PublishCheck, SessionState};

/// How a connection authenticated, as the driver hands it over in the `ConnectRequest`.
#[derive(Debug, Clone)]
pub struct ConnAuth {
    /// Index of the listener in `CoreConfig::security`.
    pub listener: usize,
    /// The password file version the password was checked against (a password login only):
    /// after a reload, the client stays connected only if its entry did not change.
    pub password: Option<Arc<PasswordFile>>,
}

/// A session's identity for authorization. Moves with the session (in a `Transfer`).
#[derive(Debug, Clone)]
pub struct Authz {
    pub(crate) listener: usize,
    pub(crate) subject: AclSubject,
    /// Some check can deny (the listener has an ACL); false: only the password matters.
    pub(crate) restricted: bool,
    pub(crate) password: Option<Arc<PasswordFile>>,
    /// A denied PUBLISH was logged at info level already (later ones at debug).
    pub(crate) logged: bool,
}

impl Authz {
    fn client(&self) -> Client<'_> {
        self.subject.client()
    }
}

/// The session's PUBLISH hook, answering from the listener's ACL.
struct WriteCheck<'a> {
    view: &'a AccessView,
    subject: &'a AclSubject,
    denied: Option<(TopicName, crate::auth::DenyReason)>,
}

impl PublishCheck for WriteCheck<'_> {
    fn allow_publish(&mut self, topic: &TopicName, qos: QoS, retain: bool) -> bool {
        let t = topic.as_str();
        let action = Action::Publish {
            topic: t,
            qos,
            retain,
        };
        match self
            .view
            .authorize_subject(self.subject, &action, &TopicLevels::new(t))
        {
            crate::auth::Decision::Allow => true,
            crate::auth::Decision::Deny(r) => {
                self.denied = Some((topic.detached(), r));
                false
            }
        }
    }
}

/// The views of each listener's ACL, one per listener (index = `CoreConfig::security`).
pub(crate) fn views(security: &[ListenerSecurity]) -> Vec<AccessView> {
    security.iter().map(ListenerSecurity::access_view).collect()
}

/// Per listener, the password file generation last seen (0: none).
pub(crate) fn password_generations(security: &[ListenerSecurity]) -> Vec<u64> {
    security
        .iter()
        .map(|s| s.password_file.as_ref().map_or(0, |f| f.generation()))
        .collect()
}

impl ShardCore {
    /// The `Authz` of a new session from what the driver decided at CONNECT (`None` when its
    /// listener has neither an ACL nor a password file: nothing to check later).
    pub(super) fn make_authz(
        &self,
        auth: Option<&ConnAuth>,
        client_id: &str,
        username: Option<&str>,
    ) -> Option<Box<Authz>> {
        let a = auth?;
        let sec = self.cfg.security.get(a.listener)?;
        if sec.acl_file.is_none() && sec.password_file.is_none() {
            return None;
        }
        let view = &self.views[a.listener];
        Some(Box::new(Authz {
            listener: a.listener,
            subject: view.subject(Client {
                client_id,
                username,
            }),
            restricted: !view.is_unrestricted(),
            password: a.password.clone(),
            logged: false,
        }))
    }

    /// Hand `packet` to the session of `key`, with the listener's write check on PUBLISH.
    pub(super) fn session_input(
        &mut self,
        key: ConnKey,
        packet: crate::codec::Packet,
        now: Instant,
    ) -> Result<(), crate::session::ProtocolViolation> {
        let Some(e) = self.sessions.get_mut(&key) else {
            return Ok(());
        };
        let Some(a) = e.authz.as_deref_mut().filter(|a| a.restricted) else {
            return e.session.handle_packet(packet, now);
        };
        let mut check = WriteCheck {
            view: &self.views[a.listener],
            subject: &a.subject,
            denied: None,
        };
        let r = e.session.handle_packet_checked(packet, now, &mut check);
        if let Some((topic, reason)) = check.denied {
            self.counters.count_drop(DropCause::PublishNotAuthorized);
            let c = a.subject.client();
            let line = format!(
                "Denied PUBLISH from {} (u'{}') to '{}': {reason}",
                escape(c.client_id),
                escape(c.username.unwrap_or("")),
                escape(topic.as_str()),
            );
            if std::mem::replace(&mut a.logged, true) {
                debug!(shard = self.id, "{line}");
            } else {
                info!(
                    shard = self.id,
                    "{line} (further denials of this client at debug level)"
                );
            }
        }
        r
    }

    /// May the session `authz` read `msg` (`levels`: its topic split, made on first use and
    /// shared by the message's other subscribers)? Counts a denial.
    pub(super) fn may_read<'m>(
        views: &[AccessView],
        counters: &crate::metrics::ShardCounters,
        authz: Option<&Authz>,
        msg: &'m Message,
        levels: &mut Option<TopicLevels<'m>>,
    ) -> bool {
        let Some(a) = authz.filter(|a| a.restricted) else {
            return true;
        };
        let t = msg.topic.as_str();
        let lv = levels.get_or_insert_with(|| TopicLevels::new(t));
        let action = Action::Deliver {
            topic: t,
            qos: msg.qos,
            retain: msg.retain,
        };
        if views[a.listener]
            .authorize_subject(&a.subject, &action, lv)
            .is_allowed()
        {
            true
        } else {
            counters.count_drop(DropCause::ReadNotAuthorized);
            false
        }
    }

    /// Publish a will if its client may still write its topic (checked again here, after
    /// the CONNECT check, because the ACL may have been reloaded since).
    pub(super) fn route_will(&mut self, authz: Option<&Authz>, will: Message, now: Instant) {
        if let Some(a) = authz.filter(|a| a.restricted) {
            let t = will.topic.as_str();
            let action = Action::Will {
                topic: t,
                qos: will.qos,
                retain: will.retain,
            };
            let d =
                self.views[a.listener].authorize_subject(&a.subject, &action, &TopicLevels::new(t));
            if let crate::auth::Decision::Deny(reason) = d {
                self.counters.count_drop(DropCause::PublishNotAuthorized);
                info!(
                    shard = self.id,
                    "will of {} to '{}' not published: {reason}",
                    escape(a.client().client_id),
                    escape(t)
                );
                return;
            }
        }
        self.route(will, 0, now);
    }

    /// A session resumes with `state` on a connection whose identity is `authz`: drop its
    /// queued and unreceived in-flight messages that identity may not read.
    pub(super) fn recheck_resumed(&self, authz: Option<&Authz>, state: &mut SessionState) {
        if authz.is_none_or(|a| !a.restricted) {
            return;
        }
        let dropped = state.retain_outgoing(|m| {
            let mut levels = None;
            Self::may_read(&self.views, &self.counters, authz, m, &mut levels)
        });
        if dropped > 0 {
            info!(
                shard = self.id,
                "{dropped} queued message(s) of {} dropped: the client may not read them",
                escape(state.client_id())
            );
        }
    }

    /// Pick up reloaded password and ACL files (the driver calls this periodically; cheap
    /// when nothing changed: one atomic load per file). Sessions on a listener whose ACL
    /// changed get new subjects (every later check uses the new rules: a revoked client
    /// stops receiving at the next message); live clients whose password entry changed or
    /// was removed are disconnected with 0x98, as mosquitto's `mosquitto_security_apply`.
    pub fn refresh_security(&mut self, now: Instant) -> bool {
        let mut acl_changed = vec![false; self.views.len()];
        for (i, v) in self.views.iter_mut().enumerate() {
            acl_changed[i] = v.refresh();
        }
        let mut pw_changed: Vec<Option<Arc<PasswordFile>>> = vec![None; self.views.len()];
        for (i, s) in self.cfg.security.iter().enumerate() {
            if let Some(f) = &s.password_file {
                let g = f.generation();
                if g != self.password_generations[i] {
                    self.password_generations[i] = g;
                    pw_changed[i] = Some(f.current());
                }
            }
        }
        if !acl_changed.contains(&true) && pw_changed.iter().all(Option::is_none) {
            return false;
        }
        for (i, changed) in acl_changed.iter().enumerate() {
            if *changed {
                info!(
                    shard = self.id,
                    "listener {i}: ACL generation {} in force on shard {}",
                    self.views[i].generation(),
                    self.id
                );
            }
        }
        for (i, f) in pw_changed.iter().enumerate() {
            if let Some(f) = f {
                info!(
                    shard = self.id,
                    "listener {i}: password file generation {} in force on shard {}",
                    f.generation(),
                    self.id
                );
            }
        }
        let mut revoked = Vec::new();
        for (key, e) in self.sessions.iter_mut() {
            let Some(a) = e.authz.as_deref_mut() else {
                continue;
            };
            if acl_changed[a.listener] {
                let subject = self.views[a.listener].subject(a.subject.client());
                a.subject = subject;
            }
            if let (Some(new), Some(old)) = (&pw_changed[a.listener], &a.password) {
                let user = a.subject.client().username.unwrap_or("");
                if new.entry_unchanged(old, user) {
                    a.password = Some(new.clone());
                } else if e.live {
                    info!(
                        shard = self.id,
                        "disconnecting {} (u'{}'): its password_file entry changed or was removed",
                        escape(a.subject.client().client_id),
                        escape(user)
                    );
                    revoked.push(*key);
                }
            }
        }
        for key in revoked {
            if let Some(e) = self.sessions.get_mut(&key) {
                e.session.disconnect(ReasonCode::ADMINISTRATIVE_ACTION, now);
            }
            self.pump(key, now);
            self.after_session_input(key);
        }
        true
    }
}
