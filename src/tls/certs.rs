//! `midge certs`: a small CA for a device fleet, replacing mosquitto's makefile/openssl
//! recipes. Creates a CA, server and client certificates (ECDSA P-256 by default, RSA 2048/3072
//! on request, always SHA-256), revokes them and maintains the CRL.
//!
//! Layout of the directory (default `./certs`):
//! - `ca.key` `ca.crt` `ca.der`: the CA (key mode 0600);
//! - `<name>.key` `<name>.crt` `<name>.der`: server (`server` by default) and client
//!   certificates (named after their CN, with characters outside `[A-Za-z0-9._-]` as `_`);
//! - `crl.pem` `crl.der`: the CRL, re-written on every `revoke`/`crl`;
//! - `index.txt`: one line per issued certificate, tab-separated:
//!   `status(V|R) serial_hex not_after_unix revoked_unix|- name cn`;
//! - `crlnumber`: the last CRL number;
//! - `.midge-certs`: every file this tool created, so `clean` removes those and nothing else.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Key algorithm for new keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256: small and the fastest handshakes (default).
    #[default]
    EcdsaP256,
    /// RSA 2048 with SHA-256, for clients without ECDSA.
    Rsa2048,
    /// RSA 3072 with SHA-256.
    Rsa3072,
}

impl KeyType {
    fn generate(self) -> Result<KeyPair, CertsError> {
        let kp = match self {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            }
            KeyType::Rsa3072 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_3072)
            }
        };
        kp.map_err(|e| CertsError::Crypto(format!("key generation failed: {e}")))
    }
    fn is_rsa(self) -> bool {
        !matches!(self, KeyType::EcdsaP256)
    }
}

/// Errors of `midge certs`, one plain line each.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: already exists; pass --force to overwrite it (a new CA invalidates every certificate it signed)", .0.display())]
    Exists(PathBuf),
    #[error("{}: no CA here; create one first with `midge certs ca --dir {}`", .0.display(), .0.display())]
    NoCa(PathBuf),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Crypto(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertsError + '_ {
    move |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn crypto(e: rcgen::Error) -> CertsError {
    CertsError::Crypto(e.to_string())
}

/// `--dir` shared by all subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct DirArg {
    /// Directory holding the CA and the generated material.
    #[arg(long, default_value = "certs")]
    pub dir: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CaArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Common name of the CA.
    #[arg(long, default_value = "Midge CA")]
    pub cn: String,
    /// Validity in days.
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
    #[arg(long, value_enum, default_value_t = KeyType::EcdsaP256)]
    pub key_type: KeyType,
    /// Overwrite an existing CA.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// DNS name clients connect to (repeatable). Default: localhost (and 127.0.0.1) when
    /// neither --dns nor --ip is given.
    #[arg(long = "dns", value_name = "NAME")]
    pub dns: Vec<String>,
    /// IP address clients connect to (repeatable).
    #[arg(long = "ip", value_name = "IP")]
    pub ip: Vec<IpAddr>,
    /// Common name (default: the first DNS name or IP).
    #[arg(long)]
    pub cn: Option<String>,
    /// File name stem: writes NAME.key, NAME.crt, NAME.der.
    #[arg(long, default_value = "server")]
    pub name: String,
    #[arg(long, default_value_t = 825)]
    pub days: u32,
    #[arg(long, value_enum, default_value_t = KeyType::EcdsaP256)]
    pub key_type: KeyType,
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Common name of one client (used as username with use_identity_as_username).
    #[arg(long, conflicts_with = "count")]
    pub cn: Option<String>,
    /// Issue this many clients named PREFIX0001, PREFIX0002, …
    #[arg(long)]
    pub count: Option<u32>,
    /// Name prefix for --count.
    #[arg(long, default_value = "device-")]
    pub prefix: String,
    /// First number for --count.
    #[arg(long, default_value_t = 1)]
    pub start: u32,
    #[arg(long, default_value_t = 825)]
    pub days: u32,
    #[arg(long, value_enum, default_value_t = KeyType::EcdsaP256)]
    pub key_type: KeyType,
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Certificate file to revoke (PEM or DER, issued by this CA).
    #[arg(long, conflicts_with = "cn")]
    pub cert: Option<PathBuf>,
    /// Revoke every valid certificate issued with this common name.
    #[arg(long)]
    pub cn: Option<String>,
    /// Days until the CRL's nextUpdate (OpenSSL-based clients and brokers refuse an
    /// expired CRL; re-run `midge certs crl` before then).
    #[arg(long, default_value_t = 365)]
    pub crl_days: u32,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CrlArgs {
    #[command(flatten)]
    pub dir: DirArg,
    #[arg(long, default_value_t = 365)]
    pub crl_days: u32,
}

/// `midge certs …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CertsCommand {
    /// Create the CA (ca.key, ca.crt, ca.der) and an empty CRL.
    Ca(CaArgs),
    /// Issue the broker's certificate (serverAuth, with DNS/IP subject alternative names).
    Server(ServerArgs),
    /// Issue client certificates (clientAuth), one or --count of them.
    Client(ClientArgs),
    /// Revoke a certificate and re-write crl.pem.
    Revoke(RevokeArgs),
    /// Re-generate crl.pem (e.g. before its nextUpdate).
    Crl(CrlArgs),
    /// Remove every file this tool created in --dir (and nothing else).
    Clean(DirArg),
}

/// Runs one subcommand, printing what it wrote.
pub fn run(cmd: CertsCommand) -> Result<(), CertsError> {
    match cmd {
        CertsCommand::Ca(a) => {
            let d = CertsDir::new(&a.dir.dir);
            let issued = d.create_ca(&a.cn, Validity::days(a.days), a.key_type, a.force)?;
            println!("CA '{}' written: {}", a.cn, issued.cert.display());
            println!("CRL written: {}", d.path().join(CRL_PEM).display());
        }
        CertsCommand::Server(a) => {
            let d = CertsDir::new(&a.dir.dir);
            let (mut dns, ips) = (a.dns.clone(), a.ip.clone());
            let ips = if dns.is_empty() && ips.is_empty() {
                dns.push("localhost".into());
                vec![IpAddr::from([127, 0, 0, 1])]
            } else {
                ips
            };
            let cn =
                a.cn.clone()
                    .or_else(|| dns.first().cloned())
                    .or_else(|| ips.first().map(|i| i.to_string()))
                    .unwrap_or_else(|| "midge".into());
            let issued = d.issue_server(
                &a.name,
                &cn,
                &dns,
                &ips,
                Validity::days(a.days),
                a.key_type,
                a.force,
            )?;
            println!(
                "server certificate '{cn}' written: {}",
                issued.cert.display()
            );
        }
        CertsCommand::Client(a) => {
            let d = CertsDir::new(&a.dir.dir);
            let names: Vec<String> = match (&a.cn, a.count) {
                (Some(cn), None) => vec![cn.clone()],
                (None, Some(n)) => {
                    let last = u64::from(a.start) + u64::from(n.max(1)) - 1;
                    let width = last.to_string().len().max(4);
                    (u64::from(a.start)..=last)
                        .map(|i| format!("{}{:0width$}", a.prefix, i))
                        .collect()
                }
                _ => {
                    return Err(CertsError::Invalid(
                        "midge certs client: give --cn NAME or --count N [--prefix device-]".into(),
                    ))
                }
            };
            for cn in &names {
                let issued = d.issue_client(cn, Validity::days(a.days), a.key_type, a.force)?;
                println!(
                    "client certificate '{cn}' written: {}",
                    issued.cert.display()
                );
            }
        }
        CertsCommand::Revoke(a) => {
            let d = CertsDir::new(&a.dir.dir);
            let serials = match (&a.cert, &a.cn) {
                (Some(f), None) => d.revoke_cert_file(f, a.crl_days)?,
                (None, Some(cn)) => d.revoke_cn(cn, a.crl_days)?,
                _ => {
                    return Err(CertsError::Invalid(
                        "midge certs revoke: give --cert FILE or --cn NAME".into(),
                    ))
                }
            };
            for s in &serials {
                println!("revoked serial {s}");
            }
            println!(
                "CRL written: {} (reload the broker to apply it)",
                d.path().join(CRL_PEM).display()
            );
        }
        CertsCommand::Crl(a) => {
            let d = CertsDir::new(&a.dir.dir);
            let p = d.write_crl(a.crl_days)?;
            println!("CRL written: {}", p.display());
        }
        CertsCommand::Clean(a) => {
            let d = CertsDir::new(&a.dir);
            let n = d.clean()?;
            println!("removed {n} files from {}", a.dir.display());
        }
    }
    Ok(())
}

const CA_KEY: &str = "ca.key";
const CA_CRT: &str = "ca.crt";
const CA_DER: &str = "ca.der";
const CRL_PEM: &str = "crl.pem";
const CRL_DER: &str = "crl.der";
const INDEX: &str = "index.txt";
const CRLNUMBER: &str = "crlnumber";
const MANIFEST: &str = ".midge-certs";

/// Validity window of a new certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one hour ago (tolerates device clocks slightly behind) to `days` from now.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        }
    }
}

/// Files written for one certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub der: PathBuf,
    pub key: PathBuf,
    /// Serial number, lower-case hex.
    pub serial: String,
}

#[derive(Debug, Clone)]
struct IndexEntry {
    revoked_at: Option<i64>,
    serial: String,
    not_after: i64,
    name: String,
    cn: String,
}

/// The certificate directory the subcommands work on; usable as a library (tests, tooling).
#[derive(Debug, Clone)]
pub struct CertsDir {
    dir: PathBuf,
}

fn random_serial() -> Result<SerialNumber, CertsError> {
    let mut b = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| CertsError::Crypto("no system randomness".into()))?;
    // Positive and exactly 16 bytes in DER: clear the sign bit, never a leading zero byte.
    b[0] = (b[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// File-name stem for a CN.
fn stem_for(cn: &str) -> String {
    let s: String = cn
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("_{s}")
    } else {
        s
    }
}

impl CertsDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn ensure_dir(&self) -> Result<(), CertsError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))
    }

    fn record(&self, names: &[&str]) -> Result<(), CertsError> {
        let path = self.p(MANIFEST);
        let mut set: BTreeSet<String> = match fs::read_to_string(&path) {
            Ok(s) => s.lines().map(str::to_owned).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        set.extend(names.iter().map(|s| s.to_string()));
        let body: String = set.into_iter().map(|s| s + "\n").collect();
        fs::write(&path, body).map_err(io_err(&path))
    }

    fn write(&self, name: &str, data: &[u8], private: bool) -> Result<(), CertsError> {
        let path = self.p(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&path)
            .map_err(io_err(&path))?;
        if private {
            // `mode` applies only when the file is created; tighten an existing one too.
            f.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io_err(&path))?;
        }
        f.write_all(data).map_err(io_err(&path))
    }

    fn refuse_existing(&self, name: &str, force: bool) -> Result<(), CertsError> {
        let p = self.p(name);
        if !force && p.exists() {
            return Err(CertsError::Exists(p));
        }
        Ok(())
    }

    fn load_issuer(&self) -> Result<Issuer<'static, KeyPair>, CertsError> {
        let crt = self.p(CA_CRT);
        let key = self.p(CA_KEY);
        if !crt.exists() || !key.exists() {
            return Err(CertsError::NoCa(self.dir.clone()));
        }
        let crt_pem = fs::read_to_string(&crt).map_err(io_err(&crt))?;
        let key_pem = fs::read_to_string(&key).map_err(io_err(&key))?;
        let kp = KeyPair::from_pem(&key_pem)
            .map_err(|e| CertsError::Invalid(format!("{}: {e}", key.display())))?;
        Issuer::from_ca_cert_pem(&crt_pem, kp)
            .map_err(|e| CertsError::Invalid(format!("{}: {e}", crt.display())))
    }

    /// Creates the CA: basicConstraints CA:true (critical), keyCertSign + cRLSign, and an
    /// empty CRL so `crlfile` can be configured from day one.
    pub fn create_ca(
        &self,
        cn: &str,
        validity: Validity,
        key_type: KeyType,
        force: bool,
    ) -> Result<Issued, CertsError> {
        self.ensure_dir()?;
        self.refuse_existing(CA_CRT, force)?;
        self.refuse_existing(CA_KEY, force)?;
        let key = key_type.generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let serial = random_serial()?;
        let serial_hex = hex(serial.as_ref());
        params.serial_number = Some(serial);
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key).map_err(crypto)?;
        self.write(CA_KEY, key.serialize_pem().as_bytes(), true)?;
        self.write(CA_CRT, cert.pem().as_bytes(), false)?;
        self.write(CA_DER, cert.der(), false)?;
        // A new CA starts a new index: old entries belong to the old CA.
        self.write(INDEX, b"", false)?;
        self.write(CRLNUMBER, b"0\n", false)?;
        self.record(&[CA_KEY, CA_CRT, CA_DER, INDEX, CRLNUMBER])?;
        self.write_crl(365)?;
        Ok(Issued {
            cert: self.p(CA_CRT),
            der: self.p(CA_DER),
            key: self.p(CA_KEY),
            serial: serial_hex,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn issue(
        &self,
        stem: &str,
        cn: &str,
        sans: Vec<SanType>,
        server: bool,
        validity: Validity,
        key_type: KeyType,
        force: bool,
    ) -> Result<Issued, CertsError> {
        if matches!(stem, "ca" | "crl") {
            return Err(CertsError::Invalid(format!(
                "'{stem}' is reserved for the CA and CRL files; choose another name"
            )));
        }
        let issuer = self.load_issuer()?;
        let (crt_n, der_n, key_n) = (
            format!("{stem}.crt"),
            format!("{stem}.der"),
            format!("{stem}.key"),
        );
        self.refuse_existing(&crt_n, force)?;
        let key = key_type.generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(cn);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = if server && key_type.is_rsa() {
            // TLS 1.2 RSA key transport needs keyEncipherment in old clients' eyes.
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ]
        } else {
            vec![KeyUsagePurpose::DigitalSignature]
        };
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial()?;
        let serial_hex = hex(serial.as_ref());
        params.serial_number = Some(serial);
        let cert = params.signed_by(&key, &issuer).map_err(crypto)?;
        self.write(&key_n, key.serialize_pem().as_bytes(), true)?;
        self.write(&crt_n, cert.pem().as_bytes(), false)?;
        self.write(&der_n, cert.der(), false)?;
        self.record(&[&key_n, &crt_n, &der_n])?;
        let mut index = self.read_index()?;
        index.push(IndexEntry {
            revoked_at: None,
            serial: serial_hex.clone(),
            not_after: validity.not_after.unix_timestamp(),
            name: stem.to_string(),
            cn: cn.to_string(),
        });
        self.write_index(&index)?;
        Ok(Issued {
            cert: self.p(&crt_n),
            der: self.p(&der_n),
            key: self.p(&key_n),
            serial: serial_hex,
        })
    }

    /// Issues a server certificate (serverAuth, SANs from `dns` and `ips`).
    #[allow(clippy::too_many_arguments)]
    pub fn issue_server(
        &self,
        name: &str,
        cn: &str,
        dns: &[String],
        ips: &[IpAddr],
        validity: Validity,
        key_type: KeyType,
        force: bool,
    ) -> Result<Issued, CertsError> {
        let mut sans = Vec::new();
        for d in dns {
            let ia5 = d.clone().try_into().map_err(|_| {
                CertsError::Invalid(format!("--dns {d}: not a valid DNS name (ASCII only)"))
            })?;
            sans.push(SanType::DnsName(ia5));
        }
        sans.extend(ips.iter().map(|i| SanType::IpAddress(*i)));
        if sans.is_empty() {
            return Err(CertsError::Invalid(
                "a server certificate needs at least one --dns or --ip (clients check it)".into(),
            ));
        }
        self.issue(&stem_for(name), cn, sans, true, validity, key_type, force)
    }

    /// Issues a client certificate (clientAuth, subject CN = `cn`).
    pub fn issue_client(
        &self,
        cn: &str,
        validity: Validity,
        key_type: KeyType,
        force: bool,
    ) -> Result<Issued, CertsError> {
        if cn.is_empty() {
            return Err(CertsError::Invalid("--cn must not be empty".into()));
        }
        self.issue(
            &stem_for(cn),
            cn,
            Vec::new(),
            false,
            validity,
            key_type,
            force,
        )
    }

    fn read_index(&self) -> Result<Vec<IndexEntry>, CertsError> {
        let path = self.p(INDEX);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.splitn(6, '\t').collect();
            let bad =
                || CertsError::Invalid(format!("{}:{}: malformed line", path.display(), n + 1));
            if f.len() != 6 {
                return Err(bad());
            }
            out.push(IndexEntry {
                revoked_at: match (f[0], f[3]) {
                    ("V", _) => None,
                    ("R", t) => Some(t.parse().map_err(|_| bad())?),
                    _ => return Err(bad()),
                },
                serial: f[1].to_string(),
                not_after: f[2].parse().map_err(|_| bad())?,
                name: f[4].to_string(),
                cn: f[5].to_string(),
            });
        }
        Ok(out)
    }

    fn write_index(&self, entries: &[IndexEntry]) -> Result<(), CertsError> {
        let mut s = String::new();
        for e in entries {
            let (st, t) = match e.revoked_at {
                Some(t) => ("R", t.to_string()),
                None => ("V", "-".to_string()),
            };
            s.push_str(&format!(
                "{st}\t{}\t{}\t{t}\t{}\t{}\n",
                e.serial, e.not_after, e.name, e.cn
            ));
        }
        self.write(INDEX, s.as_bytes(), false)?;
        self.record(&[INDEX])
    }

    /// Revokes every valid certificate with this CN; returns their serials.
    pub fn revoke_cn(&self, cn: &str, crl_days: u32) -> Result<Vec<String>, CertsError> {
        let mut index = self.read_index()?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut serials = Vec::new();
        for e in index
            .iter_mut()
            .filter(|e| e.cn == cn && e.revoked_at.is_none())
        {
            e.revoked_at = Some(now);
            serials.push(e.serial.clone());
        }
        if serials.is_empty() {
            return Err(CertsError::Invalid(format!(
                "no valid certificate with CN '{cn}' in {}",
                self.p(INDEX).display()
            )));
        }
        self.write_index(&index)?;
        self.write_crl(crl_days)?;
        Ok(serials)
    }

    /// Revokes the certificate in `file` (PEM or DER), which must be issued by this CA.
    pub fn revoke_cert_file(&self, file: &Path, crl_days: u32) -> Result<Vec<String>, CertsError> {
        let data = fs::read(file).map_err(io_err(file))?;
        let der = {
            use rustls::pki_types::pem::PemObject;
            match rustls::pki_types::CertificateDer::from_pem_slice(&data) {
                Ok(c) => c.as_ref().to_vec(),
                Err(_) => data.clone(), // not PEM: take it as DER
            }
        };
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| {
            CertsError::Invalid(format!("{}: not a certificate ({e})", file.display()))
        })?;
        let ca_path = self.p(CA_DER);
        let ca_der = fs::read(&ca_path).map_err(|_| CertsError::NoCa(self.dir.clone()))?;
        let (_, ca) = X509Certificate::from_der(&ca_der)
            .map_err(|e| CertsError::Invalid(format!("{}: {e}", ca_path.display())))?;
        if cert.issuer().as_raw() != ca.subject().as_raw() {
            return Err(CertsError::Invalid(format!(
                "{}: not issued by the CA in {} (a CRL can only revoke its own CA's certificates)",
                file.display(),
                self.dir.display()
            )));
        }
        let serial = hex(cert.raw_serial());
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .unwrap_or("")
            .to_string();
        let mut index = self.read_index()?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        match index.iter_mut().find(|e| e.serial == serial) {
            Some(e) if e.revoked_at.is_some() => {}
            Some(e) => e.revoked_at = Some(now),
            None => index.push(IndexEntry {
                revoked_at: Some(now),
                serial: serial.clone(),
                not_after: cert.validity().not_after.timestamp(),
                name: file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                cn,
            }),
        }
        self.write_index(&index)?;
        self.write_crl(crl_days)?;
        Ok(vec![serial])
    }

    /// (Re)writes `crl.pem`/`crl.der` from the index, signed by the CA, with a fresh
    /// CRL number and nextUpdate `crl_days` from now.
    pub fn write_crl(&self, crl_days: u32) -> Result<PathBuf, CertsError> {
        let now = OffsetDateTime::now_utc();
        self.write_crl_until(now + Duration::days(i64::from(crl_days.max(1))))
    }

    /// Like [`write_crl`](Self::write_crl) with an exact nextUpdate (tests of CRL expiry).
    pub fn write_crl_until(&self, next_update: OffsetDateTime) -> Result<PathBuf, CertsError> {
        let issuer = self.load_issuer()?;
        let index = self.read_index()?;
        let num_path = self.p(CRLNUMBER);
        let number: u64 = fs::read_to_string(&num_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
            + 1;
        let now = OffsetDateTime::now_utc();
        let mut revoked = Vec::new();
        for e in index.iter() {
            let Some(t) = e.revoked_at else { continue };
            let serial = unhex(&e.serial).ok_or_else(|| {
                CertsError::Invalid(format!(
                    "{}: bad serial '{}'",
                    self.p(INDEX).display(),
                    e.serial
                ))
            })?;
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: OffsetDateTime::from_unix_timestamp(t).unwrap_or(now),
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&issuer).map_err(crypto)?;
        self.write(CRL_PEM, crl.pem().map_err(crypto)?.as_bytes(), false)?;
        self.write(CRL_DER, crl.der(), false)?;
        self.write(CRLNUMBER, format!("{number}\n").as_bytes(), false)?;
        self.record(&[CRL_PEM, CRL_DER, CRLNUMBER])?;
        Ok(self.p(CRL_PEM))
    }

    /// Removes the files listed in the manifest (only those this tool created), then the
    /// manifest, then the directory if it is empty. Returns how many files were removed.
    pub fn clean(&self) -> Result<usize, CertsError> {
        let path = self.p(MANIFEST);
        let list = match fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut n = 0;
        for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            // Names are plain file names we wrote; never follow anything else.
            if name.contains('/') || name == ".." || name == "." {
                continue;
            }
            let f = self.p(name);
            match fs::remove_file(&f) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&f)(e)),
            }
        }
        fs::remove_file(&path).map_err(io_err(&path))?;
        let _ = fs::remove_dir(&self.dir); // only succeeds if empty
        Ok(n)
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d
}
