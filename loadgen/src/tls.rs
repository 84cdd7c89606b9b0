//! Client-side TLS for simulated devices.
//!
//! Owns: building rustls `ClientConfig`s — trust roots from `--cafile`, the device identity
//! (none; one shared `--cert/--key`; one cert per device from a directory; or minted on the fly
//! from a CA so every device has its own identity), session resumption (disabled for "full"
//! handshakes, one store shared by all devices for "resumed"), and the key-exchange groups.
//! Must not touch: sockets (the connection module drives the handshake).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Where device identities come from.
#[derive(Debug, Clone)]
pub enum IdentitySource {
    /// No client certificate (server-auth-only TLS).
    None,
    /// All devices present the same certificate.
    Shared { cert: PathBuf, key: PathBuf },
    /// `NAME.crt` + `NAME.key` pairs in a directory; device i uses pair i mod count.
    Dir(PathBuf),
    /// Mint `CN=<client id>` certificates signed by this CA (ECDSA P-256).
    Mint { ca_cert: PathBuf, ca_key: PathBuf },
}

/// Options from the command line.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub cafile: PathBuf,
    pub identity: IdentitySource,
    pub resume: bool,
    /// "default" (provider's list), "x25519", "p256", "mlkem" (X25519MLKEM768).
    pub kx: String,
    pub server_name: String,
}

/// Everything needed to make a `ClientConfig` for any device; `Send + Sync`, shared by cores.
pub struct TlsSetup {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    store: Arc<dyn ClientSessionStore>,
    resume: bool,
    pub server_name: ServerName<'static>,
    /// Configs that do not depend on the device (no identity, shared identity, dir identities).
    fixed: Vec<Arc<ClientConfig>>,
    mint: Option<(String, String)>,
}

fn load_certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(p)
        .map_err(|e| format!("{}: {e}", p.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("{}: {e}", p.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificates found", p.display()));
    }
    Ok(certs)
}

fn load_key(p: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(p)
        .map_err(|e| format!("{}: no usable private key: {e}", p.display()))
}

impl TlsSetup {
    pub fn new(o: &TlsOptions, max_sessions: usize) -> Result<Self, String> {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        let want: Option<rustls::NamedGroup> = match o.kx.as_str() {
            "default" => None,
            "x25519" => Some(rustls::NamedGroup::X25519),
            "p256" => Some(rustls::NamedGroup::secp256r1),
            "mlkem" => Some(rustls::NamedGroup::X25519MLKEM768),
            other => {
                return Err(format!(
                    "--kx {other}: expected default, x25519, p256 or mlkem"
                ))
            }
        };
        if let Some(g) = want {
            provider.kx_groups.retain(|k| k.name() == g);
            if provider.kx_groups.is_empty() {
                return Err(format!(
                    "--kx {}: not supported by the crypto provider",
                    o.kx
                ));
            }
        }
        let mut roots = RootCertStore::empty();
        for c in load_certs(&o.cafile)? {
            roots
                .add(c)
                .map_err(|e| format!("{}: not a usable CA certificate: {e}", o.cafile.display()))?;
        }
        let server_name = ServerName::try_from(o.server_name.clone())
            .map_err(|e| format!("--servername {}: {e}", o.server_name))?;
        let store: Arc<dyn ClientSessionStore> =
            Arc::new(ClientSessionMemoryCache::new(max_sessions.max(256)));
        let mut s = TlsSetup {
            provider: Arc::new(provider),
            roots: Arc::new(roots),
            store,
            resume: o.resume,
            server_name,
            fixed: Vec::new(),
            mint: None,
        };
        match &o.identity {
            IdentitySource::None => {
                let c = s.config(None)?;
                s.fixed.push(c);
            }
            IdentitySource::Shared { cert, key } => {
                let c = s.config(Some((load_certs(cert)?, load_key(key)?)))?;
                s.fixed.push(c);
            }
            IdentitySource::Dir(dir) => {
                let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|e| format!("{}: {e}", dir.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "crt"))
                    .collect();
                names.sort();
                for crt in names {
                    let key = crt.with_extension("key");
                    let c = s.config(Some((load_certs(&crt)?, load_key(&key)?)))?;
                    s.fixed.push(c);
                }
                if s.fixed.is_empty() {
                    return Err(format!("{}: no NAME.crt/NAME.key pairs", dir.display()));
                }
            }
            IdentitySource::Mint { ca_cert, ca_key } => {
                let cert = std::fs::read_to_string(ca_cert)
                    .map_err(|e| format!("{}: {e}", ca_cert.display()))?;
                let key = std::fs::read_to_string(ca_key)
                    .map_err(|e| format!("{}: {e}", ca_key.display()))?;
                // Validate once up front so a bad CA fails before any connection.
                Minter::new(&cert, &key)?;
                s.mint = Some((cert, key));
            }
        }
        Ok(s)
    }

    /// The CA certificate and key PEM devices are minted from (`--mint-ca-*`), if any.
    pub fn mint_ca(&self) -> Option<(&str, &str)> {
        self.mint.as_ref().map(|(c, k)| (c.as_str(), k.as_str()))
    }

    /// A config presenting this identity.
    pub fn config(
        &self,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Arc<ClientConfig>, String> {
        let b = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(self.roots.clone());
        let mut c = match identity {
            None => b.with_no_client_auth(),
            Some((chain, key)) => b
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate/key: {e}"))?,
        };
        c.resumption = if self.resume {
            Resumption::store(self.store.clone())
        } else {
            Resumption::disabled()
        };
        Ok(Arc::new(c))
    }

    /// A minter for this thread (None unless identities are minted). rcgen's issuer is built
    /// per core so no signing key is shared across threads.
    pub fn minter(&self) -> Option<Minter> {
        self.mint
            .as_ref()
            .map(|(c, k)| Minter::new(c, k).expect("validated in TlsSetup::new"))
    }

    /// The config for device `i` with client id `client_id`. Minting happens here (call it
    /// before timing a connection: key generation is not part of the handshake cost).
    pub fn config_for(
        &self,
        i: u64,
        client_id: &str,
        minter: Option<&Minter>,
    ) -> Result<Arc<ClientConfig>, String> {
        if let Some(m) = minter {
            let (chain, key) = m.mint(client_id)?;
            return self.config(Some((chain, key)));
        }
        Ok(self.fixed[(i % self.fixed.len() as u64) as usize].clone())
    }
}

/// A device identity: certificate chain and private key.
pub type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Minted identities kept on disk and reused across runs, so a fleet of 15,000 devices is
/// minted once, not on every run: `ROOT/ca-<hash of the CA certificate>/NAME.crt|.key`, NAME
/// the client id (also the certificate's CN). A different CA gets a different directory; a
/// file that does not parse is minted again. Files are written to a temporary name and
/// renamed, so concurrent worker processes never read half a file.
pub struct IdentityCache {
    dir: PathBuf,
    minter: Minter,
}

/// FNV-1a: a stable file-name key for a CA certificate (not a security boundary: the cache
/// only saves minting time, and the broker verifies every certificate it is shown).
fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Client ids become file names: letters, digits, `.`, `_` and `-` only, no leading dot.
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Where minted identities are cached by default: `$XDG_CACHE_HOME/midge-loadgen/identities`
/// or `$HOME/.cache/midge-loadgen/identities` (else the temporary directory).
pub fn default_cache_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })
        .unwrap_or_else(std::env::temp_dir);
    base.join("midge-loadgen").join("identities")
}

impl IdentityCache {
    pub fn open(root: &Path, ca_cert_pem: &str, ca_key_pem: &str) -> Result<Self, String> {
        let minter = Minter::new(ca_cert_pem, ca_key_pem)?;
        let dir = root.join(format!("ca-{:016x}", fnv64(ca_cert_pem.as_bytes())));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(IdentityCache { dir, minter })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The identity for `name`, from the cache or minted now (and stored). The bool says
    /// whether it was minted.
    pub fn get(&self, name: &str) -> Result<(Identity, bool), String> {
        if !safe_name(name) {
            return Err(format!(
                "{name:?}: client ids used as certificate file names may only hold letters, digits, '.', '_' and '-'"
            ));
        }
        let crt = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        if crt.exists() && key.exists() {
            if let (Ok(c), Ok(k)) = (load_certs(&crt), load_key(&key)) {
                return Ok(((c, k), false));
            }
        }
        let (c_pem, k_pem) = self.minter.mint_pem(name)?;
        let write = |p: &Path, s: &str| {
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, s)
                .and_then(|_| std::fs::rename(&tmp, p))
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        // Key first: a reader that finds the certificate then finds its key.
        write(&key, &k_pem)?;
        write(&crt, &c_pem)?;
        Ok(((load_certs(&crt)?, load_key(&key)?), true))
    }
}

/// Mints device certificates from a CA.
pub struct Minter {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Minter {
    pub fn new(ca_cert_pem: &str, ca_key_pem: &str) -> Result<Self, String> {
        let key =
            rcgen::KeyPair::from_pem(ca_key_pem).map_err(|e| format!("--mint-ca-key: {e}"))?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(ca_cert_pem, key)
            .map_err(|e| format!("--mint-ca-cert: {e}"))?;
        Ok(Minter { issuer })
    }

    /// A fresh P-256 key and a certificate with `CN=cn` for it.
    #[allow(clippy::type_complexity)]
    pub fn mint(
        &self,
        cn: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        let key = rcgen::KeyPair::generate().map_err(|e| format!("mint key: {e}"))?;
        let cert = self
            .params(cn)?
            .signed_by(&key, &self.issuer)
            .map_err(|e| format!("mint cert: {e}"))?;
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok((vec![cert.der().clone()], der))
    }
}

impl Minter {
    /// Like [`Minter::mint`], as PEM (certificate, PKCS#8 key) for writing to files.
    pub fn mint_pem(&self, cn: &str) -> Result<(String, String), String> {
        let key = rcgen::KeyPair::generate().map_err(|e| format!("mint key: {e}"))?;
        let cert = self
            .params(cn)?
            .signed_by(&key, &self.issuer)
            .map_err(|e| format!("mint cert: {e}"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn params(&self, cn: &str) -> Result<rcgen::CertificateParams, String> {
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        Ok(params)
    }
}

/// Test/demo helper: a CA and a server certificate for `names`, as PEM strings
/// (ca_cert, ca_key, server_cert, server_key). Used by the integration tests and compare.sh.
pub fn make_test_pki(names: &[&str]) -> Result<(String, String, String, String), String> {
    let e = |e: rcgen::Error| e.to_string();
    let ca_key = rcgen::KeyPair::generate().map_err(e)?;
    let ca_key_pem = ca_key.serialize_pem();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "midge-loadgen test CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let issuer = rcgen::CertifiedIssuer::self_signed(ca, ca_key).map_err(e)?;
    let ca_pem = issuer.pem();
    let srv_key = rcgen::KeyPair::generate().map_err(e)?;
    let srv =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .map_err(e)?;
    let srv_cert = srv.signed_by(&srv_key, &issuer).map_err(e)?;
    Ok((ca_pem, ca_key_pem, srv_cert.pem(), srv_key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_certificate_carries_the_device_cn_and_client_auth_usage() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, "ca");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let m = Minter::new(&ca_cert.pem(), &ca_key.serialize_pem()).unwrap();
        let (chain, _key) = m.mint("device-42").unwrap();
        let (chain2, _) = m.mint("device-43").unwrap();
        let der: &[u8] = chain[0].as_ref();
        // The CN string appears verbatim in the DER subject.
        assert!(der.windows(9).any(|w| w == b"device-42"));
        assert_ne!(chain[0], chain2[0], "each device gets its own certificate");
        // id-kp-clientAuth OID 1.3.6.1.5.5.7.3.2
        let oid = [0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
        assert!(der.windows(8).any(|w| w == oid));
    }

    #[test]
    fn identity_cache_mints_once_and_reuses_across_opens() {
        let (ca, ca_key, _, _) = make_test_pki(&["localhost"]).unwrap();
        let d = tempfile::tempdir().unwrap();
        let c = IdentityCache::open(d.path(), &ca, &ca_key).unwrap();
        let ((chain, _), minted) = c.get("lg-d7").unwrap();
        assert!(minted);
        let der: &[u8] = chain[0].as_ref();
        assert!(der.windows(5).any(|w| w == b"lg-d7"), "CN is the client id");
        // A second cache on the same root and CA (another run) loads the same certificate.
        let c2 = IdentityCache::open(d.path(), &ca, &ca_key).unwrap();
        let ((chain2, _), minted2) = c2.get("lg-d7").unwrap();
        assert!(!minted2);
        assert_eq!(chain, chain2);
        // A corrupt file is minted again; a different CA uses its own directory.
        std::fs::write(c.dir().join("lg-d7.crt"), "garbage").unwrap();
        assert!(c.get("lg-d7").unwrap().1);
        let (ca_b, ca_b_key, _, _) = make_test_pki(&["localhost"]).unwrap();
        let c3 = IdentityCache::open(d.path(), &ca_b, &ca_b_key).unwrap();
        assert_ne!(c3.dir(), c.dir());
        assert!(c3.get("lg-d7").unwrap().1);
        // Names are file names: no path tricks.
        for bad in ["../x", "a/b", ".hidden", ""] {
            assert!(c.get(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_mint_ca_is_a_clear_error() {
        let e = Minter::new("not a pem", "not a key").err().unwrap();
        assert!(e.contains("--mint-ca"), "{e}");
    }
}
