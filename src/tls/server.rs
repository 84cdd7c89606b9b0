//! Assembles the rustls `ServerConfig` of a listener from [`TlsOptions`]: aws-lc-rs provider
//! restricted to the configured suites and key-exchange groups, the client-certificate
//! verifier (CA roots, CRLs, optional/required), the server certificate, and one session
//! ticketer plus one session cache for all shards.
//!
//! Resumption across shards: every shard must be given the *same* `Arc<ServerConfig>` (clone
//! the Arc, never rebuild per shard). The ticketer inside it encrypts tickets with keys shared
//! by all shards, so a client whose reconnect is hashed to another core still resumes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::aws_lc_rs::{self, cipher_suite as cs, kx_group};
use rustls::crypto::hash::HashAlgorithm;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme, SupportedCipherSuite,
};

use super::error::{Role, TlsError};
use super::failure::{CrlExpired, LegacyCertificate};
use super::material;
use super::options::{KxGroup, TlsOptions, TlsVersion};

/// A built configuration plus the non-fatal findings worth a log line each.
#[derive(Debug, Clone)]
pub struct BuiltConfig {
    /// Share this one Arc with every shard.
    pub config: Arc<ServerConfig>,
    /// The client-certificate verifier inside `config`, to re-verify resumed sessions with
    /// (see [`verify_resumed`]).
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// Plain-words warnings (one line each), e.g. "server.crt does not chain to cafile".
    pub warnings: Vec<String>,
    /// When the material stops working, for the expiry metrics.
    pub dates: MaterialDates,
}

/// The dates after which a listener's TLS material stops working, in seconds since the Unix
/// epoch (what an operator must renew before; exported as metrics and refreshed on reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MaterialDates {
    /// notAfter of the server's own (leaf) certificate.
    pub server_not_after: i64,
    /// The earliest notAfter among the CA certificates trusted for clients; `None` without
    /// cafile/capath.
    pub ca_not_after: Option<i64>,
    /// The earliest nextUpdate among the CRLs; `None` without crlfile (or a CRL without one).
    pub crl_next_update: Option<i64>,
}

fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    x509_parser::parse_x509_certificate(der.as_ref())
        .ok()
        .map(|(_, c)| c.validity().not_after.timestamp())
}

/// Builds the listener's `ServerConfig`, logging warnings with `tracing::warn!`.
pub fn build_server_config(opts: &TlsOptions) -> Result<Arc<ServerConfig>, TlsError> {
    let built = build_server_config_with_warnings(opts)?;
    for w in &built.warnings {
        tracing::warn!("{w}");
    }
    Ok(built.config)
}

/// (OpenSSL name, IANA name, suite). TLS 1.3 suites have one name in both worlds.
fn suite_table() -> [(&'static str, &'static str, SupportedCipherSuite); 9] {
    [
        (
            "TLS_AES_128_GCM_SHA256",
            "TLS13_AES_128_GCM_SHA256",
            cs::TLS13_AES_128_GCM_SHA256,
        ),
        (
            "TLS_AES_256_GCM_SHA384",
            "TLS13_AES_256_GCM_SHA384",
            cs::TLS13_AES_256_GCM_SHA384,
        ),
        (
            "TLS_CHACHA20_POLY1305_SHA256",
            "TLS13_CHACHA20_POLY1305_SHA256",
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ),
        (
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
        (
            "ECDHE-RSA-AES128-GCM-SHA256",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            "ECDHE-RSA-AES256-GCM-SHA384",
            "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            "ECDHE-RSA-CHACHA20-POLY1305",
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ]
}

/// The cipher names accepted in `ciphers` / `ciphers_tls1.3` (OpenSSL spelling).
pub fn supported_cipher_names() -> Vec<&'static str> {
    suite_table().iter().map(|(o, _, _)| *o).collect()
}

fn lookup_suite(name: &str) -> Option<SupportedCipherSuite> {
    suite_table()
        .into_iter()
        .find(|(o, i, _)| name.eq_ignore_ascii_case(o) || name.eq_ignore_ascii_case(i))
        .map(|(_, _, s)| s)
}

/// Parses one mosquitto cipher list (`key` is `ciphers` or `ciphers_tls1.3`) into suites of
/// the wanted TLS version. Explicit names only: OpenSSL keywords (HIGH, DEFAULT...) cannot be
/// mapped faithfully, so they are refused with the list of names that work.
fn parse_cipher_list(
    key: &str,
    list: &str,
    tls13: bool,
    warnings: &mut Vec<String>,
) -> Result<Vec<SupportedCipherSuite>, TlsError> {
    let mut out: Vec<SupportedCipherSuite> = Vec::new();
    let mut excluded: Vec<SupportedCipherSuite> = Vec::new();
    for token in list
        .split([':', ',', ' '])
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        if let Some(rest) = token.strip_prefix(['!', '-']) {
            match lookup_suite(rest) {
                Some(s) => excluded.push(s),
                None => warnings.push(format!(
                    "{key}: ignoring '{token}' (only exact cipher names are understood; nothing outside your list is enabled anyway)"
                )),
            }
            continue;
        }
        if token.starts_with('@') || token.starts_with('+') {
            warnings.push(format!("{key}: ignoring OpenSSL directive '{token}'"));
            continue;
        }
        let Some(suite) = lookup_suite(token) else {
            return Err(TlsError::Config(format!(
                "{key}: unknown or unsupported cipher '{token}' (rustls offers only AEAD suites with ECDHE); use some of: {}",
                supported_cipher_names().join(":")
            )));
        };
        let is13 = matches!(suite, SupportedCipherSuite::Tls13(_));
        if is13 != tls13 {
            return Err(TlsError::Config(format!(
                "{key}: '{token}' is a TLS {} suite; put it in {}",
                if is13 { "1.3" } else { "1.2" },
                if is13 { "ciphers_tls1.3" } else { "ciphers" }
            )));
        }
        if !out.contains(&suite) {
            out.push(suite);
        }
    }
    out.retain(|s| !excluded.contains(s));
    if out.is_empty() {
        return Err(TlsError::Config(format!(
            "{key}: the list '{list}' leaves no cipher suite; use some of: {}",
            supported_cipher_names().join(":")
        )));
    }
    Ok(out)
}

fn kx(group: KxGroup) -> &'static dyn SupportedKxGroup {
    match group {
        KxGroup::X25519 => kx_group::X25519,
        KxGroup::Secp256r1 => kx_group::SECP256R1,
        KxGroup::Secp384r1 => kx_group::SECP384R1,
        KxGroup::X25519Mlkem768 => kx_group::X25519MLKEM768,
    }
}

/// Whether the server, not the client, orders the TLS 1.3 suites: only with the default list
/// (whose order puts SHA-256 suites first). With a `ciphers_tls1.3` or `ciphers` list the
/// client's order wins, as with OpenSSL (mosquitto) by default.
fn server_prefers_sha256(opts: &TlsOptions) -> bool {
    opts.ciphers_tls13.is_none() && opts.ciphers.is_none()
}

/// The provider for this listener: aws-lc-rs with the configured suites and groups.
fn provider_for(opts: &TlsOptions, warnings: &mut Vec<String>) -> Result<CryptoProvider, TlsError> {
    let base = aws_lc_rs::default_provider();
    let defaults = &base.cipher_suites;
    let tls13: Vec<SupportedCipherSuite> = match &opts.ciphers_tls13 {
        Some(l) => parse_cipher_list("ciphers_tls1.3", l, true, warnings)?,
        None => {
            let mut v: Vec<SupportedCipherSuite> = defaults
                .iter()
                .copied()
                .filter(|s| matches!(s, SupportedCipherSuite::Tls13(_)))
                .collect();
            // SHA-256 suites first (stable: AES-128-GCM, ChaCha20, then AES-256-GCM-SHA384).
            // Why the server, not the client, chooses by default: at `ignore_client_order`
            // in `build_server_config_with_warnings`.
            v.sort_by_key(|s| {
                s.tls13().map(|t| t.common.hash_provider.algorithm()) != Some(HashAlgorithm::SHA256)
            });
            v
        }
    };
    let tls12: Vec<SupportedCipherSuite> = match (&opts.ciphers, opts.tls_version) {
        (_, TlsVersion::Tls13) => Vec::new(),
        (Some(l), TlsVersion::Tls12) => parse_cipher_list("ciphers", l, false, warnings)?,
        (None, TlsVersion::Tls12) => defaults
            .iter()
            .copied()
            .filter(|s| matches!(s, SupportedCipherSuite::Tls12(_)))
            .collect(),
    };
    if opts.ciphers.is_some() && opts.tls_version == TlsVersion::Tls13 {
        warnings
            .push("ciphers: ignored because tls_version is tlsv1.3 (use ciphers_tls1.3)".into());
    }
    let mut groups: Vec<&'static dyn SupportedKxGroup> = Vec::new();
    for g in opts.effective_kx_groups() {
        let g = kx(*g);
        if !groups.iter().any(|x| x.name() == g.name()) {
            groups.push(g);
        }
    }
    Ok(CryptoProvider {
        cipher_suites: tls13.into_iter().chain(tls12).collect(),
        kx_groups: groups,
        ..base
    })
}

/// Builds and validates everything; returns the config and the warnings.
pub fn build_server_config_with_warnings(opts: &TlsOptions) -> Result<BuiltConfig, TlsError> {
    let mut warnings = Vec::new();
    let now = UnixTime::now();
    let provider = Arc::new(provider_for(opts, &mut warnings)?);

    // --- CA roots (cafile + capath) ---
    let mut ca: Vec<(PathBuf, CertificateDer<'static>)> = Vec::new();
    if let Some(f) = &opts.cafile {
        for c in material::load_certs(f)? {
            ca.push((f.clone(), c));
        }
    }
    if let Some(d) = &opts.capath {
        ca.extend(material::load_ca_dir(d)?);
    }
    let mut roots = RootCertStore::empty();
    for (path, der) in &ca {
        material::check_cert(path, der, Role::Ca, true, now)?;
        roots.add(der.clone()).map_err(|e| TlsError::Malformed {
            path: path.clone(),
            detail: format!("CA certificate is not usable as a trust anchor ({e})"),
        })?;
    }

    // --- CRLs ---
    let mut crls = Vec::new();
    let mut crl_files: Vec<(PathBuf, String)> = Vec::new();
    let mut crl_next_update: Option<i64> = None;
    if let Some(f) = &opts.crlfile {
        if ca.is_empty() {
            return Err(TlsError::Config(format!(
                "crlfile {} is set but no cafile/capath: CRLs only apply to verified client certificates; set cafile",
                f.display()
            )));
        }
        let ca_ders: Vec<CertificateDer<'static>> = ca.iter().map(|(_, c)| c.clone()).collect();
        let mut issuers = Vec::new();
        for crl in material::load_crls(f)? {
            issuers.push(material::check_crl(f, &crl, &ca_ders, now, &mut warnings)?);
            let next_update =
                <x509_parser::revocation_list::CertificateRevocationList as x509_parser::prelude::FromDer<_>>::from_der(crl.as_ref())
                    .ok()
                    .and_then(|(_, c)| c.next_update());
            if let Some(t) = &next_update {
                let t = t.timestamp();
                crl_next_update = Some(crl_next_update.map_or(t, |e: i64| e.min(t)));
            }
            let next = next_update
                .and_then(|t| {
                    t.to_datetime()
                        .format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| "(none)".into());
            crl_files.push((f.clone(), next));
            crls.push(crl);
        }
        // As with OpenSSL's CRL_CHECK, a client whose CA has no CRL is refused
        // (unknown revocation status): say so now rather than at the first refusal.
        for (path, der) in &ca {
            if let Ok((_, c)) = x509_parser::parse_x509_certificate(der.as_ref()) {
                if !issuers.iter().any(|i| i.as_slice() == c.subject().as_raw()) {
                    warnings.push(format!(
                        "{}: CA '{}' has no CRL in {}; its clients will be refused (revocation status unknown); add its CRL or remove it",
                        path.display(),
                        super::identity::format_subject_rfc2253(c.subject()),
                        f.display()
                    ));
                }
            }
        }
    }

    // --- client verifier ---
    let wants_identity = opts.use_identity_as_username || opts.use_subject_as_username;
    let verifier: Arc<dyn ClientCertVerifier> = if ca.is_empty() {
        if opts.require_certificate || wants_identity {
            return Err(TlsError::Config(
                "require_certificate/use_identity_as_username/use_subject_as_username need a CA to verify clients against; set cafile (or capath)".into(),
            ));
        }
        WebPkiClientVerifier::no_client_auth()
    } else {
        let mut b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        if !crls.is_empty() {
            // OpenSSL's X509_V_FLAG_CRL_CHECK (what mosquitto sets): the leaf only.
            // And OpenSSL's rule for a CRL past its nextUpdate: every client is refused.
            b = b
                .with_crls(crls)
                .only_check_end_entity_revocation()
                .enforce_revocation_expiration();
        }
        if !opts.require_certificate {
            b = b.allow_unauthenticated();
        }
        let inner = b.build().map_err(|e| TlsError::Rustls(e.to_string()))?;
        Arc::new(LegacyAwareVerifier { inner, crl_files })
    };

    // --- server certificate and key ---
    let chain = material::load_certs(&opts.certfile)?;
    for (i, der) in chain.iter().enumerate() {
        // Only the leaf's dates are fatal here; an expired intermediate shows up in the chain check.
        material::check_cert(&opts.certfile, der, Role::Server, i == 0, now)?;
    }
    let key = material::load_key(&opts.keyfile)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::UnsupportedKey {
            path: opts.keyfile.clone(),
            detail: e.to_string(),
        })?;
    let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch {
                cert: opts.certfile.clone(),
                key: opts.keyfile.clone(),
            })
        }
        // Unknown: the key type cannot report its public key; nothing to compare.
        Err(_) => {}
    }
    if !ca.is_empty() {
        if let Some(w) = chain_warning(&opts.certfile, &chain, &ca, &provider, now) {
            warnings.push(w);
        }
    }

    // --- assemble ---
    let dates = MaterialDates {
        server_not_after: chain.first().and_then(not_after).unwrap_or(0),
        ca_not_after: ca.iter().filter_map(|(_, c)| not_after(c)).min(),
        crl_next_update,
    };
    let versions: &[&'static rustls::SupportedProtocolVersion] = match opts.tls_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    // Without a configured `ciphers_tls1.3` the server picks the suite (from the SHA-256-first
    // default order above) instead of following the client. OpenSSL, rustls and most device
    // stacks list TLS_AES_256_GCM_SHA384 first, and its HKDF-SHA384 key schedule was ~8% of the
    // broker's CPU per full mTLS handshake (SHA-512 compression has no CPU instructions on x86;
    // SHA-256 has SHA-NI). The certificates (P-256) and key exchange (X25519) give 128-bit
    // security either way. A configured list keeps the client's choice.
    config.ignore_client_order = server_prefers_sha256(opts);
    // One ticketer and one cache in the one config that every shard shares: a resumption
    // ticket issued on shard A decrypts on shard B.
    config.ticketer = aws_lc_rs::Ticketer::new().map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.session_storage = ServerSessionMemoryCache::new(opts.session_cache_size.max(1));
    Ok(BuiltConfig {
        config: Arc::new(config),
        verifier,
        warnings,
        dates,
    })
}

/// Verifies the server chain against the configured CAs. A mismatch is a warning, not an
/// error: `cafile` is the CA for *clients*, and a broker may legitimately present a server
/// certificate from another CA (e.g. a public one) that devices trust separately.
fn chain_warning(
    certfile: &Path,
    chain: &[CertificateDer<'static>],
    ca: &[(PathBuf, CertificateDer<'static>)],
    provider: &CryptoProvider,
    now: UnixTime,
) -> Option<String> {
    let anchors: Vec<_> = ca
        .iter()
        .filter_map(|(_, c)| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&chain[0]).ok()?;
    let res = ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &anchors,
        &chain[1..],
        now,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    );
    match res {
        Ok(_) => None,
        Err(e) => Some(format!(
            "{}: the server certificate does not verify against cafile/capath ({e:?}); fine if devices trust the broker through another CA, otherwise re-issue it with `midge certs server` or append the intermediate certificates to certfile",
            certfile.display()
        )),
    }
}

/// The stock webpki verifier, plus one thing: when it refuses a certificate, look at the
/// presented chain and, if the cause is legacy material (SHA-1/MD5 signature, RSA < 2048,
/// X.509 v1), report that instead of webpki's generic `BadSignature`/`BadEncoding`, so the
/// refusal log and counters say what the operator must fix. Costs nothing on success.
#[derive(Debug)]
struct LegacyAwareVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// Each CRL file with its nextUpdate, to name in an "expired CRL" refusal.
    crl_files: Vec<(PathBuf, String)>,
}

/// Re-verifies, against the listener's current material and the current time, the client
/// certificate chain of a *resumed* TLS session: rustls restores it from the ticket or the
/// session cache without verifying it again, so without this a certificate that expired, or
/// a CRL that passed its nextUpdate since the ticket was issued, would still get in. `certs`
/// is what the session carried (`None`: the client had presented none).
pub fn verify_resumed(
    verifier: &dyn ClientCertVerifier,
    certs: Option<&[CertificateDer<'static>]>,
) -> Result<(), rustls::Error> {
    match certs {
        Some([end_entity, intermediates @ ..]) => verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map(|_| ()),
        _ if verifier.client_auth_mandatory() => Err(rustls::Error::NoCertificatesPresented),
        _ => Ok(()),
    }
}

fn legacy_error(certs: &[&CertificateDer<'_>], err: rustls::Error) -> rustls::Error {
    if matches!(
        err,
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. }
                | CertificateError::Revoked
        )
    ) {
        return err;
    }
    for c in certs {
        if let Some((issue, subject)) = material::legacy_issue(c.as_ref()) {
            return rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                Arc::new(LegacyCertificate { issue, subject }),
            )));
        }
    }
    err
}

impl ClientCertVerifier for LegacyAwareVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(
                    CertificateError::ExpiredRevocationList
                    | CertificateError::ExpiredRevocationListContext { .. },
                ) if !self.crl_files.is_empty() => {
                    // Name the file and its nextUpdate (the earliest: RFC 3339 UTC sorts).
                    let (file, next_update) = self
                        .crl_files
                        .iter()
                        .min_by(|a, b| a.1.cmp(&b.1))
                        .cloned()
                        .unwrap_or_default();
                    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                        Arc::new(CrlExpired { file, next_update }),
                    )))
                }
                e => {
                    let all: Vec<&CertificateDer<'_>> =
                        std::iter::once(end_entity).chain(intermediates).collect();
                    legacy_error(&all, e)
                }
            })
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls12_signature(message, cert, dss)
            .map_err(|e| legacy_error(&[cert], e))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls13_signature(message, cert, dss)
            .map_err(|e| legacy_error(&[cert], e))
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
