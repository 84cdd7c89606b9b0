//! One listener's security policy: the CONNECT decision and the per-message access check.
//!
//! Owns: mosquitto's admission rules (`allow_anonymous`, `password_file`, certificate identity)
//! as a sans-IO step function, the verification job handed to a blocking thread, the
//! `$SYS`/`$share` write rule, and the per-shard view of a listener's ACL. Must not touch:
//! sockets, timers, sessions: the connection path calls [`ListenerSecurity::begin_connect`],
//! runs the returned job off the shard, sends the CONNACK the answer names.
//!
//! # CONNECT, as mosquitto 2.0.11 decides it (src/handle_connect.c, src/security.c
//! `mosquitto_unpwd_check`, src/security_default.c `mosquitto_unpwd_check_default`)
//!
//! 1. (Midge) `require_client_id_match_identity`: the client id must be the certificate
//!    identity ([`super::identity`]); otherwise v5 0x85 / 3.1.1 2 "identifier rejected".
//! 2. A listener that takes the username from the certificate (`use_identity_as_username`,
//!    `use_subject_as_username`) ignores the CONNECT's username and password: the verified
//!    certificate authenticated the client. (No usable certificate identity is refused
//!    earlier, by `tls::resolve_username`, with 0x86 / 4.)
//! 3. Without a `password_file` for the listener: `allow_anonymous` decides for every client,
//!    with or without a username.
//! 4. With one: a client without a username is admitted only if `allow_anonymous`; a client
//!    with one must be in the file with a matching password (whatever `allow_anonymous` says).
//!
//! Every refusal in 3 and 4 is CONNACK v5 0x87 / 3.1.1 5 "not authorized": that is what
//! mosquitto 2.0.11 sends for a wrong password too (checked with mosquitto_pub against the
//! Debian package: exit code 5, and 135 with `-V mqttv5`), not 0x86/4.
//!
//! # Per message (src/security.c `mosquitto_acl_check`)
//!
//! [`AccessView::authorize`] first applies mosquitto's fixed rule (`acl__check_dollar`): no
//! client may publish to a topic starting with `$SYS` (except
//! `$SYS/broker/connection/+/state`, bridge status, which then goes to the ACL) or with
//! `$share`, ACL or not. Then the listener's ACL, if it has one; without one everything else is
//! allowed.

use std::sync::Arc;

use super::acl::{AclSubject, TopicLevels};
use super::cache::CacheKey;
use super::identity::{CertIdentity, ClientIdRule, IdMismatch};
use super::reload::Reloadable;
use super::{
    AclFile, Action, Authenticator, Authorizer, Client, Decision, DenyReason, PasswordFile,
    Verdict, VerifyCache,
};
use crate::codec::ReasonCode;

/// What the client presented, after the TLS layer applied the listener's username rule
/// (`tls::resolve_username`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCredentials<'a> {
    /// The username was taken from the verified client certificate; the CONNECT's username
    /// and password were discarded.
    Certificate { username: &'a str },
    /// The CONNECT's username and password fields.
    Client {
        username: Option<&'a str>,
        password: Option<&'a [u8]>,
    },
}

/// Why a CONNECT is refused, and the CONNACK that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No username, and the listener does not allow anonymous clients.
    AnonymousNotAllowed,
    /// A username, but the listener has no password file and does not allow anonymous
    /// clients (mosquitto 2.0: then only certificate identities can connect).
    NoPasswordFile,
    /// The username is not in the password file.
    UnknownUser,
    /// The user exists; the password is wrong.
    WrongPassword,
    /// The user exists; the CONNECT has no password.
    PasswordMissing,
    /// The will's topic may not be written by this client (checked at CONNECT).
    WillNotAuthorized,
    /// `require_client_id_match_identity`: the client id is not the certificate's.
    ClientId(IdMismatch),
}

impl Refusal {
    /// The CONNACK reason code (the codec maps it to the 3.1.1 return code: 0x87 → 5,
    /// 0x85 → 2).
    pub fn reason_code(self) -> ReasonCode {
        match self {
            Refusal::ClientId(_) => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            _ => ReasonCode::NOT_AUTHORIZED,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::AnonymousNotAllowed => {
                f.write_str("anonymous clients are not allowed on this listener")
            }
            Refusal::NoPasswordFile => f.write_str(
                "the listener has no password_file and does not allow anonymous clients",
            ),
            Refusal::UnknownUser => f.write_str("unknown username"),
            Refusal::WrongPassword => f.write_str("wrong password"),
            Refusal::PasswordMissing => f.write_str("no password"),
            Refusal::WillNotAuthorized => {
                f.write_str("the client may not publish to its will topic")
            }
            Refusal::ClientId(e) => e.fmt(f),
        }
    }
}

/// The next step of a CONNECT.
#[derive(Debug)]
pub enum ConnectStep {
    /// Authenticated: go on (will check, session, CONNACK 0).
    Accept,
    /// Send a CONNACK with [`Refusal::reason_code`] and close.
    Refuse(Refusal),
    /// Run the job on a blocking thread (glommio `spawn_blocking`), then
    /// [`Verified::finish`] on the shard.
    Verify(VerifyJob),
}

/// A password check to run off the shard. `Send`; holds the password only until it runs (the
/// copy is overwritten when the job is dropped).
pub struct VerifyJob {
    authenticator: Arc<dyn Authenticator>,
    username: Box<str>,
    password: Secret,
    key: CacheKey,
}

impl std::fmt::Debug for VerifyJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyJob")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference; a volatile write keeps the
            // compiler from dropping the overwrite of memory that is freed right after.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl VerifyJob {
    /// The check itself: CPU-heavy, blocking. Call on a blocking thread.
    pub fn run(self) -> Verified {
        let verdict = self
            .authenticator
            .authenticate(&self.username, Some(&self.password.0));
        Verified {
            verdict,
            key: self.key,
        }
    }

    pub fn username(&self) -> &str {
        &self.username
    }
}

/// The result of a [`VerifyJob`], to hand back to the shard.
#[derive(Debug)]
pub struct Verified {
    pub verdict: Verdict,
    key: CacheKey,
}

impl Verified {
    /// Complete the CONNECT decision on the shard: remember a success in the shard's cache.
    pub fn finish(self, cache: &mut VerifyCache) -> ConnectStep {
        match self.verdict {
            Verdict::Accepted => {
                cache.insert(self.key);
                ConnectStep::Accept
            }
            Verdict::WrongPassword => ConnectStep::Refuse(Refusal::WrongPassword),
            Verdict::PasswordMissing => ConnectStep::Refuse(Refusal::PasswordMissing),
            Verdict::UnknownUser => ConnectStep::Refuse(Refusal::UnknownUser),
        }
    }
}

/// The security settings of one listener, resolved as mosquitto 2.0 scopes them
/// (`per_listener_settings`): built once at start-up; the files inside reload on SIGHUP.
#[derive(Debug, Clone, Default)]
pub struct ListenerSecurity {
    pub allow_anonymous: bool,
    pub password_file: Option<Arc<Reloadable<PasswordFile>>>,
    pub acl_file: Option<Arc<Reloadable<AclFile>>>,
    /// `require_client_id_match_identity true` (with `client_id_identity_pattern`).
    pub client_id_rule: Option<ClientIdRule>,
}

impl ListenerSecurity {
    /// Decide a CONNECT as far as possible without PBKDF2 (rules in the module docs).
    /// `identity`: the verified client certificate's, if any. `cache`: the shard's.
    pub fn begin_connect(
        &self,
        client_id: &str,
        credentials: ConnectCredentials<'_>,
        identity: Option<CertIdentity<'_>>,
        cache: &mut VerifyCache,
    ) -> ConnectStep {
        if let Some(rule) = &self.client_id_rule {
            if let Err(e) = rule.check(client_id, identity) {
                return ConnectStep::Refuse(Refusal::ClientId(e));
            }
        }
        let (username, password) = match credentials {
            ConnectCredentials::Certificate { .. } => return ConnectStep::Accept,
            ConnectCredentials::Client { username, password } => (username, password),
        };
        let Some(file) = &self.password_file else {
            return match (self.allow_anonymous, username) {
                (true, _) => ConnectStep::Accept,
                (false, None) => ConnectStep::Refuse(Refusal::AnonymousNotAllowed),
                (false, Some(_)) => ConnectStep::Refuse(Refusal::NoPasswordFile),
            };
        };
        let Some(username) = username else {
            return if self.allow_anonymous {
                ConnectStep::Accept
            } else {
                ConnectStep::Refuse(Refusal::AnonymousNotAllowed)
            };
        };
        // The same answer, at once, for known and unknown users: no timing difference.
        let Some(password) = password else {
            return ConnectStep::Refuse(Refusal::PasswordMissing);
        };
        let current = file.current();
        let key = cache.key(current.generation(), username, password);
        if cache.contains(&key) {
            return ConnectStep::Accept;
        }
        ConnectStep::Verify(VerifyJob {
            authenticator: current,
            username: username.into(),
            password: Secret(password.to_vec()),
            key,
        })
    }

    /// A shard's view of this listener's ACL (keep one per shard and listener).
    pub fn access_view(&self) -> AccessView {
        AccessView::new(self.acl_file.clone())
    }
}

/// mosquitto's `acl__check_dollar`: `Some(deny)` for a write to `$SYS…` (bridge state topics
/// excepted) or any non-subscription use of `$share…`; `None` = the ACL decides.
pub fn dollar_rule(action: &Action<'_>) -> Option<Decision> {
    let topic = action.topic();
    if !topic.starts_with('$') {
        return None;
    }
    let write = matches!(action, Action::Publish { .. } | Action::Will { .. });
    // mosquitto compares prefixes (`strncmp(topic, "$SYS", 4)`), so `$SYSTEM/x` counts too.
    if topic.starts_with("$SYS") {
        if write && !is_bridge_state(topic) {
            return Some(Decision::Deny(DenyReason::ReservedTopic));
        }
        return None;
    }
    if topic.starts_with("$share") {
        let subscription = matches!(
            action,
            Action::Subscribe { .. } | Action::Unsubscribe { .. }
        );
        if !subscription {
            return Some(Decision::Deny(DenyReason::ReservedTopic));
        }
    }
    None
}

/// `$SYS/broker/connection/+/state`.
fn is_bridge_state(topic: &str) -> bool {
    let mut l = topic.split('/');
    matches!(
        (l.next(), l.next(), l.next(), l.next(), l.next(), l.next()),
        (
            Some("$SYS"),
            Some("broker"),
            Some("connection"),
            Some(_),
            Some("state"),
            None
        )
    )
}

/// One shard's view of one listener's authorizer: holds the loaded version, so a check reads
/// no shared state. Call [`AccessView::refresh`] when the shard hears of a reload (or once
/// per reactor turn: one atomic load); it reports whether the version changed, i.e. whether
/// sessions must be re-checked.
///
/// The per-message path: make an [`AclSubject`] per connection with [`AccessView::subject`]
/// (again after a refresh; a stale one still answers correctly, a little slower), split each
/// message's topic once into [`TopicLevels`], and call [`AccessView::authorize_subject`] for
/// the publisher's write and for every subscriber's read.
#[derive(Clone)]
pub struct AccessView {
    source: Option<Arc<Reloadable<AclFile>>>,
    backend: Backend,
    generation: u64,
}

#[derive(Clone)]
enum Backend {
    None,
    Acl(Arc<AclFile>),
    Other(Arc<dyn Authorizer>),
}

impl std::fmt::Debug for AccessView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessView")
            .field("acl", &self.source)
            .field("generation", &self.generation)
            .finish()
    }
}

impl AccessView {
    /// A view of `acl` (`None`: the listener has no ACL; only the `$` rule applies).
    pub fn new(acl: Option<Arc<Reloadable<AclFile>>>) -> AccessView {
        let backend = match &acl {
            Some(r) => Backend::Acl(r.current()),
            None => Backend::None,
        };
        let generation = acl.as_ref().map_or(0, |r| r.generation());
        AccessView {
            source: acl,
            backend,
            generation,
        }
    }

    /// A view of any authorizer (another backend, tests). It never changes on reload.
    pub fn with_authorizer(authorizer: Arc<dyn Authorizer>) -> AccessView {
        AccessView {
            source: None,
            backend: Backend::Other(authorizer),
            generation: 0,
        }
    }

    /// Pick up a reloaded ACL. True if the version changed: re-check what was decided with
    /// the old one (queued messages, the will) and remake the sessions' subjects.
    pub fn refresh(&mut self) -> bool {
        let Some(src) = &self.source else {
            return false;
        };
        let g = src.generation();
        if g == self.generation {
            return false;
        }
        self.backend = Backend::Acl(src.current());
        self.generation = g;
        true
    }

    /// The generation of the ACL in force (0 without one).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What the checks of `client` need, worked out once (per connection and ACL version).
    pub fn subject(&self, client: Client<'_>) -> AclSubject {
        match &self.backend {
            Backend::Acl(a) => a.subject(client),
            _ => AclSubject::unresolved(client),
        }
    }

    /// May the subject do `action`? `topic` is `action`'s topic split once per message.
    /// No allocation, no shared state.
    pub fn authorize_subject(
        &self,
        subject: &AclSubject,
        action: &Action<'_>,
        topic: &TopicLevels<'_>,
    ) -> Decision {
        debug_assert_eq!(topic.topic(), action.topic());
        if let Some(d) = dollar_rule(action) {
            return d;
        }
        match &self.backend {
            Backend::None => Decision::Allow,
            Backend::Acl(a) => match action.access() {
                Some(access) => a.check_subject(subject, access, topic),
                // mosquitto 2.0's acl_file grants every (un)subscription.
                None => Decision::Allow,
            },
            Backend::Other(b) => b.authorize(subject.client(), action),
        }
    }

    /// No ACL and no other backend: only the fixed `$` rule applies (and the session applies
    /// that one itself), so the per-message path can skip every check.
    pub fn is_unrestricted(&self) -> bool {
        matches!(self.backend, Backend::None)
    }

    /// Does the subject have `access` to every topic `filter` (a subscription's topic part,
    /// without `$share/group/`) can match, in the version in force? Then its deliveries
    /// need no per-message check until the next [`AccessView::refresh`] that returns true.
    /// Another backend is never asked: `false` (check each message).
    pub fn grants_all(&self, subject: &AclSubject, access: super::Access, filter: &str) -> bool {
        match &self.backend {
            Backend::None => true,
            Backend::Acl(a) => a.grants_all(subject, access, filter),
            Backend::Other(_) => false,
        }
    }

    /// May `client` do `action`? A one-off check (CONNECT's will, tests): makes the subject
    /// and splits the topic each time.
    pub fn authorize(&self, client: Client<'_>, action: &Action<'_>) -> Decision {
        if let Some(d) = dollar_rule(action) {
            return d;
        }
        match &self.backend {
            Backend::None => Decision::Allow,
            Backend::Acl(a) => a.authorize(client, action),
            Backend::Other(b) => b.authorize(client, action),
        }
    }
}
