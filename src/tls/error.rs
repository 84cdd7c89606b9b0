//! Build/reload errors in plain words: each renders as one line naming the file, the cause and
//! the fix, because the reader is an operator looking at a log, not a TLS expert.

use std::fmt;
use std::path::PathBuf;

/// Why a certificate is refused as legacy material (what old tutorials generate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyIssue {
    /// X.509 version 1 (no extensions: no basicConstraints, no SAN, no key usage).
    X509V1,
    /// Signature made with SHA-1.
    Sha1Signature,
    /// Signature made with MD5 or MD2.
    Md5Signature,
    /// RSA key shorter than 2048 bits.
    RsaKeyTooSmall(usize),
}

impl fmt::Display for LegacyIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::X509V1 => f.write_str("is an X.509 version 1 certificate, which rustls refuses"),
            Self::Sha1Signature => f.write_str("is signed with SHA-1, which rustls refuses"),
            Self::Md5Signature => f.write_str("is signed with MD5, which rustls refuses"),
            Self::RsaKeyTooSmall(bits) => write!(
                f,
                "has a {bits}-bit RSA key; rustls refuses RSA keys under 2048 bits"
            ),
        }
    }
}

/// Which role a file plays; picks the `midge certs` command named in the fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Ca,
    Server,
}

impl Role {
    pub(crate) fn reissue_hint(self) -> &'static str {
        match self {
            Role::Ca => "re-issue it with `midge certs ca …` (SHA-256, ECDSA P-256 or RSA ≥ 2048) and re-issue the certificates it signed",
            Role::Server => "re-issue it with `midge certs server …` (SHA-256, ECDSA P-256 or RSA ≥ 2048)",
        }
    }
}

/// An error building or reloading a listener's TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A configured file or directory cannot be read.
    #[error("{}: cannot read ({source}); check the path in the config and that the broker user may read it", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file holds no PEM block of the expected kind.
    #[error("{}: no {what} found; expected a PEM file with a '-----BEGIN {label}-----' block", path.display())]
    NothingFound {
        path: PathBuf,
        what: &'static str,
        label: &'static str,
    },
    /// The private key is encrypted with a passphrase.
    #[error("{}: the private key is encrypted with a passphrase, which Midge cannot prompt for; decrypt it with `openssl pkey -in {} -out key.pem` and protect it with file permissions (0600)", path.display(), path.display())]
    EncryptedKey { path: PathBuf },
    /// PEM or DER is malformed.
    #[error("{}: {detail}; re-export the file as PEM or re-issue it with `midge certs`", path.display())]
    Malformed { path: PathBuf, detail: String },
    /// The private key does not belong to the certificate.
    #[error("{}: the private key does not match the certificate in {}; point keyfile at the key the certificate was issued for", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// The key is of a type rustls cannot sign with.
    #[error("{}: unsupported private key ({detail}); use an ECDSA P-256/P-384, Ed25519 or RSA ≥ 2048 key", path.display())]
    UnsupportedKey { path: PathBuf, detail: String },
    /// A certificate is expired.
    #[error("{}: certificate '{subject}' expired on {not_after} (now {now}); renew it (e.g. `midge certs {cmd} …`)", path.display())]
    Expired {
        path: PathBuf,
        subject: String,
        not_after: String,
        now: String,
        cmd: &'static str,
    },
    /// A certificate is not valid yet.
    #[error("{}: certificate '{subject}' is not valid before {not_before} (now {now}); check the system clock or re-issue it", path.display())]
    NotYetValid {
        path: PathBuf,
        subject: String,
        not_before: String,
        now: String,
    },
    /// Legacy material rustls refuses.
    #[error("{}: '{subject}' {issue}; {hint}", path.display())]
    Legacy {
        path: PathBuf,
        subject: String,
        issue: LegacyIssue,
        hint: &'static str,
    },
    /// A CRL is unusable.
    #[error("{}: {detail}", path.display())]
    BadCrl { path: PathBuf, detail: String },
    /// An option's value is wrong (cipher names, version, missing CA...).
    #[error("{0}")]
    Config(String),
    /// rustls refused the assembled configuration.
    #[error("TLS configuration refused by rustls: {0}")]
    Rustls(String),
}
