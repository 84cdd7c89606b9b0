//! The TLS settings of one listener, field for field the mosquitto.conf keys (plus Midge's own
//! key-exchange and handshake limits), so the config module can map its parsed listener onto
//! this struct one to one.

use std::path::PathBuf;
use std::time::Duration;

/// Lowest TLS version a listener accepts (mosquitto `tls_version`: in mosquitto 2.x it is the
/// *minimum*, so `tlsv1.2` allows 1.2 and 1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// `tlsv1.2`: TLS 1.2 and 1.3 (the default, as in mosquitto).
    #[default]
    Tls12,
    /// `tlsv1.3`: TLS 1.3 only.
    Tls13,
}

impl TlsVersion {
    /// The mosquitto spelling (`tlsv1.2`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls12 => "tlsv1.2",
            Self::Tls13 => "tlsv1.3",
        }
    }

    /// Parses the mosquitto spelling (`tlsv1.2`, `tlsv1.3`); `tlsv1.1`/`tlsv1` are refused
    /// because rustls does not implement them.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tlsv1.2" => Ok(Self::Tls12),
            "tlsv1.3" => Ok(Self::Tls13),
            "tlsv1.1" | "tlsv1" | "tlsv1.0" => Err(format!(
                "tls_version {s}: TLS below 1.2 is not supported (rustls implements 1.2 and 1.3); use tlsv1.2"
            )),
            _ => Err(format!("tls_version {s}: unknown version; use tlsv1.2 or tlsv1.3")),
        }
    }
}

/// A key-exchange group (Midge key `tls_kx_groups`, comma or colon separated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KxGroup {
    /// `x25519`: fast, universally supported. Default, first choice.
    X25519,
    /// `secp256r1` (`P-256`, `prime256v1`): for clients without X25519 (some embedded TLS stacks).
    Secp256r1,
    /// `secp384r1` (`P-384`).
    Secp384r1,
    /// `x25519mlkem768`: post-quantum hybrid. Costs ~15–20% on full handshakes (and a larger
    /// ClientHello/ServerHello), so it is opt-in for fleets that need harvest-now-decrypt-later
    /// protection.
    X25519Mlkem768,
}

impl KxGroup {
    /// The default list: X25519 then P-256. The post-quantum hybrid is left out by default
    /// because device fleets reconnect in storms and full-handshake CPU is the broker's
    /// bottleneck; list `x25519mlkem768` first in `tls_kx_groups` to prefer it.
    pub const DEFAULT: &'static [KxGroup] = &[KxGroup::X25519, KxGroup::Secp256r1];
    pub const ALL: [KxGroup; 4] = [
        KxGroup::X25519,
        KxGroup::Secp256r1,
        KxGroup::Secp384r1,
        KxGroup::X25519Mlkem768,
    ];

    /// Parses one group name (case-insensitive, OpenSSL and IANA spellings).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "x25519" => Ok(Self::X25519),
            "secp256r1" | "p-256" | "p256" | "prime256v1" => Ok(Self::Secp256r1),
            "secp384r1" | "p-384" | "p384" => Ok(Self::Secp384r1),
            "x25519mlkem768" | "x25519-mlkem768" => Ok(Self::X25519Mlkem768),
            other => Err(format!(
                "tls_kx_groups: unknown group '{other}'; use x25519, secp256r1, secp384r1 or x25519mlkem768"
            )),
        }
    }

    /// Parses a `:`/`,` separated list.
    pub fn parse_list(s: &str) -> Result<Vec<Self>, String> {
        s.split([':', ','])
            .filter(|p| !p.trim().is_empty())
            .map(Self::parse)
            .collect()
    }

    /// Canonical lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X25519 => "x25519",
            Self::Secp256r1 => "secp256r1",
            Self::Secp384r1 => "secp384r1",
            Self::X25519Mlkem768 => "x25519mlkem768",
        }
    }
}

/// Everything needed to build one listener's rustls `ServerConfig`.
///
/// Field names follow mosquitto.conf; see each field for the mosquitto semantics kept.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// `cafile`: PEM file of CA certificates that client certificates must chain to.
    pub cafile: Option<PathBuf>,
    /// `capath`: directory of PEM CA files (every `*.pem`, `*.crt`, `*.cer` and c_rehash
    /// `*.0`-style file in it is read; no hashing needed).
    pub capath: Option<PathBuf>,
    /// `certfile`: the server certificate chain, leaf first (PEM).
    pub certfile: PathBuf,
    /// `keyfile`: the server private key (PEM; PKCS#8, SEC1 or PKCS#1; unencrypted).
    pub keyfile: PathBuf,
    /// `require_certificate`: clients must present a certificate that chains to the CA.
    /// When false and a CA is configured, a certificate is still requested and verified if
    /// sent (mosquitto behaves the same way).
    pub require_certificate: bool,
    /// `use_identity_as_username`: the certificate CN replaces any client username.
    pub use_identity_as_username: bool,
    /// `use_subject_as_username`: the RFC 2253 subject replaces any client username.
    pub use_subject_as_username: bool,
    /// `crlfile`: PEM CRL(s); only the client's own certificate is checked (OpenSSL
    /// `X509_V_FLAG_CRL_CHECK`, as mosquitto sets), and a client whose CA has no CRL in the
    /// file is refused (OpenSSL does the same).
    pub crlfile: Option<PathBuf>,
    /// `tls_version`: minimum TLS version.
    pub tls_version: TlsVersion,
    /// `ciphers`: TLS 1.2 suites, OpenSSL names, `:` separated (None = rustls defaults).
    pub ciphers: Option<String>,
    /// `ciphers_tls1.3`: TLS 1.3 suites, `:` separated (None = rustls defaults).
    pub ciphers_tls13: Option<String>,
    /// `tls_kx_groups` (Midge): key-exchange groups in preference order; empty = [`KxGroup::DEFAULT`].
    pub kx_groups: Vec<KxGroup>,
    /// `tls_handshake_timeout` (Midge): the runtime drops a connection whose handshake is not
    /// done by then (slow-loris protection). Not used by the config builder itself.
    pub handshake_timeout: Duration,
    /// `tls_max_handshakes` (Midge): per-shard cap on handshakes in progress; further
    /// accepted sockets wait or are closed (see [`crate::tls::HandshakeStats::try_begin`]).
    pub max_handshakes_in_progress: usize,
    /// TLS 1.2 session-id cache size shared by all shards (TLS 1.3 uses stateless tickets).
    pub session_cache_size: usize,
}

impl TlsOptions {
    /// Options with mosquitto's defaults for a listener with the given server cert and key.
    pub fn new(certfile: impl Into<PathBuf>, keyfile: impl Into<PathBuf>) -> Self {
        Self {
            cafile: None,
            capath: None,
            certfile: certfile.into(),
            keyfile: keyfile.into(),
            require_certificate: false,
            use_identity_as_username: false,
            use_subject_as_username: false,
            crlfile: None,
            tls_version: TlsVersion::default(),
            ciphers: None,
            ciphers_tls13: None,
            kx_groups: Vec::new(),
            handshake_timeout: Duration::from_secs(10),
            max_handshakes_in_progress: 256,
            session_cache_size: 4096,
        }
    }

    /// The key-exchange groups in effect.
    pub fn effective_kx_groups(&self) -> &[KxGroup] {
        if self.kx_groups.is_empty() {
            KxGroup::DEFAULT
        } else {
            &self.kx_groups
        }
    }
}
