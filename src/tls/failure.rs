//! Why a TLS handshake failed, in words an operator can act on, plus the per-shard counters
//! and the rate limiter behind "one log line per refused client (rate-limited)".
//!
//! The runtime calls [`HandshakeFailure::classify`] on the `rustls::Error` that ended a
//! handshake, bumps [`HandshakeStats::record_failure`], and logs [`HandshakeFailure::describe`]
//! when [`LogRateLimiter::allow`] says so.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{AlertDescription, CertificateError, Error};

use super::error::LegacyIssue;
use crate::metrics::{Histogram, HistogramSnapshot, HANDSHAKE_BUCKETS_NS};

/// The cause attached to a refusal of legacy client material (see the verifier in
/// `server.rs`); recovered by [`HandshakeFailure::classify`] through `OtherError`.
#[derive(Debug, Clone)]
pub struct LegacyCertificate {
    pub issue: LegacyIssue,
    pub subject: String,
}

impl fmt::Display for LegacyCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client certificate '{}' {}", self.subject, self.issue)
    }
}

impl std::error::Error for LegacyCertificate {}

/// The cause attached to a refusal because the CRL is past its nextUpdate: which file, and
/// when it expired, for the one plain-words log line an operator needs.
#[derive(Debug, Clone)]
pub struct CrlExpired {
    pub file: std::path::PathBuf,
    /// The CRL's nextUpdate (RFC 3339, UTC).
    pub next_update: String,
}

impl fmt::Display for CrlExpired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the CRL {} expired at its nextUpdate {}; every client is refused until it is renewed",
            self.file.display(),
            self.next_update
        )
    }
}

impl std::error::Error for CrlExpired {}

/// Why a client's handshake was refused (or failed). One counter per variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// `require_certificate` is set and the client sent no certificate.
    NoCertificate,
    /// The client certificate does not chain to any configured CA.
    UnknownCa,
    /// The client certificate (or its chain) has expired.
    Expired,
    /// The client certificate is not valid yet (often: device clock unset).
    NotYetValid,
    /// The client certificate is listed in the CRL.
    Revoked,
    /// The CRL in crlfile is past its nextUpdate: every client is refused (OpenSSL's rule).
    CrlExpired,
    /// SHA-1/MD5 signature, RSA key under 2048 bits, or X.509 v1.
    LegacyAlgorithm,
    /// No common TLS version/suite/group, malformed messages, or the client aborted
    /// (e.g. it does not trust the broker's certificate).
    Protocol,
    /// The handshake did not finish within `tls_handshake_timeout`.
    Timeout,
    /// Anything else (bad signature, unsupported extension, I/O...).
    Other,
}

impl HandshakeFailure {
    /// All variants, in counter order.
    pub const ALL: [HandshakeFailure; 10] = [
        Self::NoCertificate,
        Self::UnknownCa,
        Self::Expired,
        Self::NotYetValid,
        Self::Revoked,
        Self::CrlExpired,
        Self::LegacyAlgorithm,
        Self::Protocol,
        Self::Timeout,
        Self::Other,
    ];

    /// Stable snake_case label for counters and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Revoked => "revoked",
            Self::CrlExpired => "crl_expired",
            Self::LegacyAlgorithm => "legacy_algorithm",
            Self::Protocol => "protocol",
            Self::Timeout => "timeout",
            Self::Other => "other",
        }
    }

    /// A plain sentence: what happened and what to do about it.
    pub fn message(self) -> &'static str {
        match self {
            Self::NoCertificate => "client sent no certificate, but require_certificate is true; give the device a client certificate signed by the broker's CA",
            Self::UnknownCa => "client certificate is not signed by a CA in cafile/capath; issue it from the broker's CA (`midge certs client`) or add its CA to cafile",
            Self::Expired => "client certificate has expired; issue a new one (`midge certs client`)",
            Self::NotYetValid => "client certificate is not valid yet; check the device clock (NTP) or the certificate's start date",
            Self::Revoked => "client certificate is revoked by the CRL in crlfile",
            Self::CrlExpired => "the CRL in crlfile is past its nextUpdate, so no client's revocation status is known and every client is refused (as OpenSSL and mosquitto do); regenerate it (`midge certs crl`) and reload (SIGHUP)",
            Self::LegacyAlgorithm => "client certificate uses legacy crypto (SHA-1/MD5 signature, RSA under 2048 bits or X.509 v1) that rustls refuses; re-issue it with `midge certs client` (SHA-256)",
            Self::Protocol => "TLS protocol mismatch or abort (no common version/cipher/group, malformed message, or the client refused the broker's certificate)",
            Self::Timeout => "TLS handshake did not complete in time (tls_handshake_timeout)",
            Self::Other => "TLS handshake failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Maps the error that ended a server-side handshake to a reason.
    pub fn classify(err: &Error) -> Self {
        match err {
            Error::NoCertificatesPresented => Self::NoCertificate,
            Error::InvalidCertificate(ce) => Self::classify_cert(ce),
            Error::PeerIncompatible(_)
            | Error::PeerMisbehaved(_)
            | Error::InappropriateMessage { .. }
            | Error::InappropriateHandshakeMessage { .. }
            | Error::InvalidMessage(_)
            | Error::AlertReceived(_)
            | Error::DecryptError
            | Error::NoApplicationProtocol => Self::Protocol,
            _ => Self::Other,
        }
    }

    #[allow(deprecated)] // UnsupportedSignatureAlgorithm is still produced by older paths.
    fn classify_cert(ce: &CertificateError) -> Self {
        match ce {
            // BadSignature: a CA in cafile has the issuer's name but did not sign it — in
            // practice another CA with the same name (e.g. a regenerated or another site's
            // default "Midge CA"); for the operator that is an unknown CA. (Legacy
            // signatures were already reported as such by the verifier.)
            CertificateError::UnknownIssuer | CertificateError::BadSignature => Self::UnknownCa,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Self::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Self::NotYetValid
            }
            CertificateError::Revoked => Self::Revoked,
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => Self::CrlExpired,
            CertificateError::Other(o) if o.0.downcast_ref::<CrlExpired>().is_some() => {
                Self::CrlExpired
            }
            CertificateError::UnsupportedSignatureAlgorithm
            | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
            | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                Self::LegacyAlgorithm
            }
            CertificateError::Other(o) if o.0.downcast_ref::<LegacyCertificate>().is_some() => {
                Self::LegacyAlgorithm
            }
            _ => Self::Other,
        }
    }

    /// One log line for a refused client: reason, plain message, and rustls' own detail.
    pub fn describe(err: &Error) -> String {
        let reason = Self::classify(err);
        let detail = match err {
            Error::InvalidCertificate(CertificateError::Other(o)) => o.0.to_string(),
            Error::AlertReceived(AlertDescription::BadCertificate | AlertDescription::UnknownCA) => {
                "the client refused the broker's certificate (does the device trust the broker's CA?)".to_string()
            }
            e => e.to_string(),
        };
        format!(
            "TLS handshake refused ({}): {} [{}]",
            reason.as_str(),
            reason.message(),
            detail
        )
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Handshake counters of one shard (the runtime keeps one per shard, in an `Arc` so a
/// metrics reader on another thread can snapshot it). Relaxed atomics: counters, not locks.
#[derive(Debug)]
pub struct HandshakeStats {
    in_progress: AtomicUsize,
    started: AtomicU64,
    full: AtomicU64,
    resumed: AtomicU64,
    refused_busy: AtomicU64,
    failures: [AtomicU64; 10],
    /// Time from accept to a completed handshake, full and resumed. Written only by the shard
    /// these stats belong to ([`HandshakeStats::observe_duration`]).
    full_time: Histogram<{ HANDSHAKE_BUCKETS_NS.len() }>,
    resumed_time: Histogram<{ HANDSHAKE_BUCKETS_NS.len() }>,
}

impl Default for HandshakeStats {
    fn default() -> Self {
        HandshakeStats {
            in_progress: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            full: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            refused_busy: AtomicU64::new(0),
            failures: Default::default(),
            full_time: Histogram::new(&HANDSHAKE_BUCKETS_NS),
            resumed_time: Histogram::new(&HANDSHAKE_BUCKETS_NS),
        }
    }
}

/// A copy of [`HandshakeStats`] at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HandshakeStatsSnapshot {
    pub in_progress: usize,
    pub started: u64,
    pub full: u64,
    pub resumed: u64,
    /// Sockets turned away because `max_handshakes_in_progress` was reached.
    pub refused_busy: u64,
    /// Indexed like [`HandshakeFailure::ALL`].
    pub failures: [u64; 10],
}

impl HandshakeStatsSnapshot {
    /// Failures for one reason.
    pub fn failures_for(&self, reason: HandshakeFailure) -> u64 {
        self.failures[reason.index()]
    }
}

impl HandshakeStats {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Claims a handshake slot if fewer than `max` are in progress; `None` means the shard is
    /// saturated (a reconnect storm): the caller closes or delays the socket, which keeps
    /// handshake CPU bounded instead of letting every handshake time out together.
    pub fn try_begin(self: &Arc<Self>, max: usize) -> Option<HandshakeSlot> {
        let mut cur = self.in_progress.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                self.refused_busy.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self.in_progress.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.started.fetch_add(1, Ordering::Relaxed);
        Some(HandshakeSlot {
            stats: Arc::clone(self),
            done: false,
        })
    }

    /// Counts a failure that happened outside a slot (e.g. a timeout noticed by the runtime).
    pub fn record_failure(&self, reason: HandshakeFailure) {
        self.failures[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long a completed handshake took. Only the shard these stats belong to may
    /// call this (the histogram cells are single-writer).
    pub fn observe_duration(&self, resumed: bool, elapsed: Duration) {
        let h = if resumed {
            &self.resumed_time
        } else {
            &self.full_time
        };
        h.observe_ns(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The handshake-time histogram of full (`false`) or resumed (`true`) handshakes.
    pub fn durations(&self, resumed: bool) -> HistogramSnapshot {
        if resumed {
            self.resumed_time.snapshot()
        } else {
            self.full_time.snapshot()
        }
    }

    pub fn snapshot(&self) -> HandshakeStatsSnapshot {
        let mut failures = [0; 10];
        for (o, a) in failures.iter_mut().zip(&self.failures) {
            *o = a.load(Ordering::Relaxed);
        }
        HandshakeStatsSnapshot {
            in_progress: self.in_progress.load(Ordering::Relaxed),
            started: self.started.load(Ordering::Relaxed),
            full: self.full.load(Ordering::Relaxed),
            resumed: self.resumed.load(Ordering::Relaxed),
            refused_busy: self.refused_busy.load(Ordering::Relaxed),
            failures,
        }
    }
}

/// One handshake in progress; releases its slot when finished or dropped. Dropping it
/// without [`succeeded`](Self::succeeded)/[`failed`](Self::failed) counts as `Other` (the
/// connection task was cancelled mid-handshake).
#[derive(Debug)]
pub struct HandshakeSlot {
    stats: Arc<HandshakeStats>,
    done: bool,
}

impl HandshakeSlot {
    /// The handshake completed; `resumed` from `ServerConnection::handshake_kind()`.
    pub fn succeeded(mut self, resumed: bool) {
        let c = if resumed {
            &self.stats.resumed
        } else {
            &self.stats.full
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.done = true;
    }

    /// The handshake failed for `reason`.
    pub fn failed(mut self, reason: HandshakeFailure) {
        self.stats.record_failure(reason);
        self.done = true;
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        if !self.done {
            self.stats.record_failure(HandshakeFailure::Other);
        }
        self.stats.in_progress.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Token bucket for refusal log lines: `burst` lines at once, then one per `interval`.
/// Time is passed in so the runtime can use its cached clock and tests need no sleeping.
#[derive(Debug, Clone)]
pub struct LogRateLimiter {
    burst: u32,
    interval: Duration,
    tokens: f64,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogRateLimiter {
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst: burst.max(1),
            interval,
            tokens: f64::from(burst.max(1)),
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` if a line may be logged now, where `n` lines were suppressed since the last
    /// allowed one (log it as "… and n more"); `None` to stay quiet.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last);
            let refill = if self.interval.is_zero() {
                f64::from(self.burst)
            } else {
                elapsed.as_secs_f64() / self.interval.as_secs_f64()
            };
            self.tokens = (self.tokens + refill).min(f64::from(self.burst));
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_bursts_then_refills() {
        let t0 = Instant::now();
        let mut rl = LogRateLimiter::new(2, Duration::from_secs(1));
        assert_eq!(rl.allow(t0), Some(0));
        assert_eq!(rl.allow(t0), Some(0));
        assert_eq!(rl.allow(t0), None);
        assert_eq!(rl.allow(t0 + Duration::from_millis(500)), None);
        // 1 s after the start one token is back; two lines were suppressed meanwhile.
        assert_eq!(rl.allow(t0 + Duration::from_millis(1000)), Some(2));
        assert_eq!(rl.allow(t0 + Duration::from_millis(1001)), None);
    }

    #[test]
    fn slots_are_bounded_and_released() {
        let s = HandshakeStats::new();
        let a = s.try_begin(2).expect("first slot");
        let b = s.try_begin(2).expect("second slot");
        assert!(s.try_begin(2).is_none());
        a.succeeded(true);
        b.failed(HandshakeFailure::UnknownCa);
        let c = s.try_begin(2).expect("slot freed");
        drop(c);
        let snap = s.snapshot();
        assert_eq!(snap.in_progress, 0);
        assert_eq!(snap.started, 3);
        assert_eq!(snap.resumed, 1);
        assert_eq!(snap.refused_busy, 1);
        assert_eq!(snap.failures_for(HandshakeFailure::UnknownCa), 1);
        assert_eq!(snap.failures_for(HandshakeFailure::Other), 1);
    }

    #[test]
    fn classify_maps_rustls_errors() {
        assert_eq!(
            HandshakeFailure::classify(&Error::NoCertificatesPresented),
            HandshakeFailure::NoCertificate
        );
        assert_eq!(
            HandshakeFailure::classify(&Error::InvalidCertificate(CertificateError::UnknownIssuer)),
            HandshakeFailure::UnknownCa
        );
        assert_eq!(
            HandshakeFailure::classify(&Error::InvalidCertificate(CertificateError::BadSignature)),
            HandshakeFailure::UnknownCa
        );
        assert_eq!(
            HandshakeFailure::classify(&Error::InvalidCertificate(CertificateError::Revoked)),
            HandshakeFailure::Revoked
        );
        assert_eq!(
            HandshakeFailure::classify(&Error::PeerIncompatible(
                rustls::PeerIncompatible::NoCipherSuitesInCommon
            )),
            HandshakeFailure::Protocol
        );
        let labels: std::collections::HashSet<_> =
            HandshakeFailure::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), HandshakeFailure::ALL.len());
        for (i, r) in HandshakeFailure::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
