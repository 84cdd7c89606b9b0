//! Authentication and authorization as mosquitto 2.0 does them: the `password_file`
//! (mosquitto_passwd's `$7$`/`$6$` hashes), the `acl_file` (its grammar and matching rules),
//! the per-listener policy that decides a CONNECT, and `midge passwd`.
//!
//! Owns: parsing and verifying password files ([`passwd`]), the per-shard verification cache
//! ([`cache`]), parsing, compiling and checking ACL files ([`acl`]), reloading both atomically
//! with a generation counter ([`reload`]), certificate-bound client ids ([`identity`]), the
//! CONNECT decision and the per-message access check of one listener ([`policy`]), the
//! [`Authenticator`] / [`Authorizer`] traits the file backends implement (an HTTP or plugin
//! backend implements the same traits without touching session code), and the `midge passwd`
//! command ([`passwd_cmd`]).
//!
//! Must not touch: sockets, glommio, rustls (the TLS layer hands over the certificate identity
//! as plain strings), session or routing state (the connection path and the shard core call in
//! here and act on the answer), the configuration file (the `config` module resolves which file
//! applies to which listener and calls [`passwd::PasswordFile::load`] / [`acl::AclFile::load`]
//! to validate them).
//!
//! # Blocking
//!
//! Everything here is synchronous. Two things must not run on a shard's executor thread:
//! loading or reloading a file (disk I/O; done at start-up and on the signal thread), and
//! verifying a password (PBKDF2 costs about 0.1 ms at 101 iterations and 1 ms at 1,000 per
//! attempt: see `benches/auth.rs`). [`policy::ConnectStep::Verify`] hands the driver a `Send`
//! job to run on a blocking thread (glommio's `spawn_blocking`); the per-shard
//! [`cache::VerifyCache`] answers repeated logins of a reconnect storm without PBKDF2.
//!
//! # How mosquitto 2.0.11 decides, and where Midge differs
//!
//! See [`policy`] (CONNECT), [`acl`] (topics) and [`passwd`] (files) for the rules reproduced
//! and the source files they were read from.

pub mod acl;
pub mod cache;
mod error;
pub mod identity;
pub mod passwd;
pub mod passwd_cmd;
pub mod policy;
pub mod reload;
mod text;

use std::fmt;

use crate::codec::packet::QoS;

pub use acl::{AclFile, AclSubject, TopicLevels};
pub use cache::VerifyCache;
pub use error::{AuthFileError, FileWarning};
pub use identity::{ClientIdRule, IdentitySource};
pub use passwd::{PasswordFile, PasswordHash, Verdict};
pub use policy::{
    dollar_rule, AccessView, ConnectCredentials, ConnectStep, ListenerSecurity, Refusal, Verified,
    VerifyJob,
};
pub use reload::{AuthFile, Reloadable, SecurityFiles};

/// The client a check is about: what mosquitto's ACL code reads from the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client<'a> {
    /// The client id in use (assigned ids included).
    pub client_id: &'a str,
    /// The username the connection authenticated with: the client's, or the one taken from
    /// its certificate (`use_identity_as_username` / `use_subject_as_username`); `None` for
    /// an anonymous client.
    pub username: Option<&'a str>,
}

/// What a client wants to do, as mosquitto's `mosquitto_acl_check` is asked about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// An incoming PUBLISH (mosquitto's `MOSQ_ACL_WRITE`, src/handle_publish.c).
    Publish {
        topic: &'a str,
        qos: QoS,
        retain: bool,
    },
    /// The will of a CONNECT, checked at CONNECT and again when it is published
    /// (`MOSQ_ACL_WRITE`; mosquitto 2.0 checks only the latter, in src/context.c).
    Will {
        topic: &'a str,
        qos: QoS,
        retain: bool,
    },
    /// One topic filter of a SUBSCRIBE (`MOSQ_ACL_SUBSCRIBE`, src/handle_subscribe.c). The
    /// filter is the full text, `$share/group/` prefix included.
    Subscribe { filter: &'a str, qos: QoS },
    /// One topic filter of an UNSUBSCRIBE (`MOSQ_ACL_UNSUBSCRIBE`).
    Unsubscribe { filter: &'a str },
    /// Delivering a message to one subscriber: live, retained on SUBSCRIBE, or queued while it
    /// was offline (`MOSQ_ACL_READ`: src/subs.c, src/retain.c, src/handle_connect.c).
    Deliver {
        topic: &'a str,
        qos: QoS,
        retain: bool,
    },
}

impl<'a> Action<'a> {
    /// The topic or filter the action is about.
    pub fn topic(&self) -> &'a str {
        match *self {
            Action::Publish { topic, .. }
            | Action::Will { topic, .. }
            | Action::Deliver { topic, .. } => topic,
            Action::Subscribe { filter, .. } | Action::Unsubscribe { filter } => filter,
        }
    }

    /// The access bit an ACL line must grant for this action (`None`: ACL lines do not govern
    /// it; mosquitto 2.0's acl_file grants every SUBSCRIBE and UNSUBSCRIBE).
    pub fn access(&self) -> Option<Access> {
        match self {
            Action::Publish { .. } | Action::Will { .. } => Some(Access::Write),
            Action::Deliver { .. } => Some(Access::Read),
            Action::Subscribe { .. } | Action::Unsubscribe { .. } => None,
        }
    }
}

/// The two rights an ACL line can grant (`read`, `write`, `readwrite`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    /// mosquitto's bit values (`MOSQ_ACL_READ` = 1, `MOSQ_ACL_WRITE` = 2).
    pub(crate) const fn bit(self) -> u8 {
        match self {
            Access::Read => 1,
            Access::Write => 2,
        }
    }
}

/// The answer to an authorization request. A denial carries why, for the counter and the log
/// line the caller owes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(DenyReason),
}

impl Decision {
    pub fn is_allowed(self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Why an action was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyReason {
    /// No ACL line grants it (mosquitto: no match means deny).
    NoMatch,
    /// A `deny` line matches.
    DenyRule,
    /// Pattern lines exist and the username or client id contains `+` or `#`, which could
    /// otherwise widen a `%u`/`%c` pattern (mosquitto's "dangerous username" rule).
    WildcardInName,
    /// Clients may not publish to `$SYS/…` (except bridge state topics) or to `$share/…`,
    /// whatever the ACL says (mosquitto's `acl__check_dollar`, src/security.c).
    ReservedTopic,
    /// A backend other than the files refused (e.g. an HTTP backend that timed out).
    Backend,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyReason::NoMatch => "no ACL line grants it",
            DenyReason::DenyRule => "an ACL deny line matches",
            DenyReason::WildcardInName => {
                "the username or client id contains '+' or '#' and ACL patterns are in use"
            }
            DenyReason::ReservedTopic => "clients may not publish to $SYS or $share topics",
            DenyReason::Backend => "the authorization backend refused",
        })
    }
}

/// Decides whether a client may do something. Implemented by [`AclFile`]; an HTTP or plugin
/// backend implements the same trait.
///
/// Called on the shard for every PUBLISH and for every delivery to every subscriber: an
/// implementation must answer from memory, without blocking, and should not allocate.
pub trait Authorizer: Send + Sync + 'static {
    fn authorize(&self, client: Client<'_>, action: &Action<'_>) -> Decision;
}

/// Checks a username and password. Implemented by [`PasswordFile`].
///
/// May block for milliseconds (PBKDF2): never call it on a shard's executor thread; run it on
/// a blocking thread through [`VerifyJob`].
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, username: &str, password: Option<&[u8]>) -> Verdict;

    /// Changes whenever the credentials behind this authenticator may have changed (a reload):
    /// part of the [`VerifyCache`] key, so a cached success never outlives the file it was
    /// checked against.
    fn generation(&self) -> u64;
}

#[cfg(test)]
mod tests;
