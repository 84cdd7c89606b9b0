//! Reading PEM material from disk and checking it before rustls sees it, so that every
//! problem an operator can fix is reported as a one-line [`TlsError`] at start-up or reload
//! instead of as an opaque handshake failure later.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use super::error::{LegacyIssue, Role, TlsError};
use super::identity::format_subject_rfc2253;

// Signature algorithm OIDs (RFC 3279 / RFC 5758) that rustls/webpki never accept.
const SHA1_SIG_OIDS: &[&str] = &[
    "1.2.840.113549.1.1.5", // sha1WithRSAEncryption
    "1.3.14.3.2.29",        // sha1WithRSA (OIW)
    "1.2.840.10045.4.1",    // ecdsa-with-SHA1
    "1.2.840.10040.4.3",    // dsa-with-sha1
];
const MD_SIG_OIDS: &[&str] = &[
    "1.2.840.113549.1.1.4", // md5WithRSAEncryption
    "1.2.840.113549.1.1.2", // md2WithRSAEncryption
    "1.2.840.113549.1.1.3", // md4WithRSAEncryption
];

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Unreadable {
        path: path.to_path_buf(),
        source,
    })
}

fn pem_error(path: &Path, e: pem::Error) -> TlsError {
    TlsError::Malformed {
        path: path.to_path_buf(),
        detail: format!("invalid PEM ({e:?})"),
    }
}

/// All certificates in a PEM file; at least one.
pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NothingFound {
            path: path.to_path_buf(),
            what: "certificate",
            label: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// The CA certificates of a `capath` directory, with the file each came from. Files that hold
/// no certificate (README, CRLs, keys) are skipped, as OpenSSL's lookup would never load them.
pub(crate) fn load_ca_dir(dir: &Path) -> Result<Vec<(PathBuf, CertificateDer<'static>)>, TlsError> {
    let unreadable = |source| TlsError::Unreadable {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(unreadable)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let data = read_file(&file)?;
        for cert in CertificateDer::pem_slice_iter(&data) {
            let cert = cert.map_err(|e| pem_error(&file, e))?;
            out.push((file.clone(), cert));
        }
    }
    if out.is_empty() {
        return Err(TlsError::NothingFound {
            path: dir.to_path_buf(),
            what: "CA certificate in any file of this capath directory",
            label: "CERTIFICATE",
        });
    }
    Ok(out)
}

pub(crate) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = read_file(path)?;
    if memchr_str(&data, b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || memchr_str(&data, b"Proc-Type: 4,ENCRYPTED")
    {
        return Err(TlsError::EncryptedKey {
            path: path.to_path_buf(),
        });
    }
    match PrivateKeyDer::from_pem_slice(&data) {
        Ok(k) => Ok(k),
        Err(pem::Error::NoItemsFound) => Err(TlsError::NothingFound {
            path: path.to_path_buf(),
            what: "private key",
            label: "PRIVATE KEY",
        }),
        Err(e) => Err(pem_error(path, e)),
    }
}

pub(crate) fn load_crls(
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let data = read_file(path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if crls.is_empty() {
        return Err(TlsError::NothingFound {
            path: path.to_path_buf(),
            what: "certificate revocation list",
            label: "X509 CRL",
        });
    }
    Ok(crls)
}

fn memchr_str(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The first legacy property of a parsed certificate that rustls refuses, if any.
/// `check_signature` false skips the certificate's own signature (a root's self-signature,
/// which rustls never verifies).
pub(crate) fn legacy_issue_of(
    cert: &X509Certificate<'_>,
    check_signature: bool,
) -> Option<LegacyIssue> {
    let sig_oid = cert.signature_algorithm.algorithm.to_id_string();
    if check_signature && SHA1_SIG_OIDS.contains(&sig_oid.as_str()) {
        return Some(LegacyIssue::Sha1Signature);
    }
    if check_signature && MD_SIG_OIDS.contains(&sig_oid.as_str()) {
        return Some(LegacyIssue::Md5Signature);
    }
    if let Ok(PublicKey::RSA(rsa)) = cert.public_key().parsed() {
        let bits = rsa.key_size();
        if bits < 2048 {
            return Some(LegacyIssue::RsaKeyTooSmall(bits));
        }
    }
    if cert.version().0 == 0 {
        return Some(LegacyIssue::X509V1);
    }
    None
}

/// [`legacy_issue_of`] on DER; `None` if it does not parse (another check reports that).
pub(crate) fn legacy_issue(der: &[u8]) -> Option<(LegacyIssue, String)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    legacy_issue_of(&cert, true).map(|i| (i, format_subject_rfc2253(cert.subject())))
}

pub(crate) fn fmt_unix(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("@{secs}"),
    }
}

/// Parses one certificate from `path` and refuses legacy material and (for the server's own
/// leaf and for CAs) a validity window that does not contain `now`.
pub(crate) fn check_cert(
    path: &Path,
    der: &CertificateDer<'_>,
    role: Role,
    check_dates: bool,
    now: UnixTime,
) -> Result<(), TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::Malformed {
        path: path.to_path_buf(),
        detail: format!("certificate does not parse ({e})"),
    })?;
    let subject = format_subject_rfc2253(cert.subject());
    // A root's self-signature is never checked by rustls, so SHA-1 there is harmless; its
    // key size and version, and how it signs others, are what matter.
    let self_signed_root = role == Role::Ca && cert.subject().as_raw() == cert.issuer().as_raw();
    if let Some(issue) = legacy_issue_of(&cert, !self_signed_root) {
        return Err(TlsError::Legacy {
            path: path.to_path_buf(),
            subject,
            issue,
            hint: role.reissue_hint(),
        });
    }
    if check_dates {
        let now_s = now.as_secs() as i64;
        let nb = cert.validity().not_before.timestamp();
        let na = cert.validity().not_after.timestamp();
        if now_s > na {
            return Err(TlsError::Expired {
                path: path.to_path_buf(),
                subject,
                not_after: fmt_unix(na),
                now: fmt_unix(now_s),
                cmd: match role {
                    Role::Ca => "ca",
                    Role::Server => "server",
                },
            });
        }
        if now_s < nb {
            return Err(TlsError::NotYetValid {
                path: path.to_path_buf(),
                subject,
                not_before: fmt_unix(nb),
                now: fmt_unix(now_s),
            });
        }
    }
    Ok(())
}

/// Checks a CRL file's entries: signature algorithm, that some configured CA issued it, and
/// whether it is past its nextUpdate (a warning: rustls does not enforce it, OpenSSL does).
/// Returns the CRL's issuer name (DER).
pub(crate) fn check_crl(
    path: &Path,
    crl: &CertificateRevocationListDer<'_>,
    ca_certs: &[CertificateDer<'_>],
    now: UnixTime,
    warnings: &mut Vec<String>,
) -> Result<Vec<u8>, TlsError> {
    let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(
        crl.as_ref(),
    )
    .map_err(|e| TlsError::BadCrl {
        path: path.to_path_buf(),
        detail: format!("CRL does not parse ({e}); regenerate it with `midge certs crl`"),
    })?;
    let sig_oid = parsed.signature_algorithm.algorithm.to_id_string();
    if SHA1_SIG_OIDS.contains(&sig_oid.as_str()) || MD_SIG_OIDS.contains(&sig_oid.as_str()) {
        return Err(TlsError::BadCrl {
            path: path.to_path_buf(),
            detail: "CRL is signed with SHA-1/MD5, which rustls refuses (every client would be refused); regenerate it with `midge certs crl` or `openssl ca -gencrl -md sha256`".into(),
        });
    }
    let issuer = parsed.issuer().as_raw();
    let issuer_known = ca_certs.iter().any(|c| {
        X509Certificate::from_der(c.as_ref())
            .map(|(_, c)| c.subject().as_raw() == issuer)
            .unwrap_or(false)
    });
    if !issuer_known {
        return Err(TlsError::BadCrl {
            path: path.to_path_buf(),
            detail: format!(
                "CRL issuer '{}' is none of the configured CAs; use the CRL of the CA in cafile/capath",
                format_subject_rfc2253(parsed.issuer())
            ),
        });
    }
    if let Some(next) = parsed.next_update() {
        if next.timestamp() < now.as_secs() as i64 {
            warnings.push(format!(
                "{}: CRL nextUpdate {} has passed: every client is refused until it is renewed (as mosquitto/OpenSSL do); regenerate it with `midge certs crl` and reload (SIGHUP)",
                path.display(),
                fmt_unix(next.timestamp())
            ));
        }
    }
    Ok(issuer.to_vec())
}
