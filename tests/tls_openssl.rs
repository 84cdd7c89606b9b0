//! Mutual TLS with material made by the `openssl` command line, the way mosquitto tutorials
//! make it: Midge must accept modern openssl material, print the subject exactly like
//! mosquitto's `use_subject_as_username` (OpenSSL RFC 2253), and refuse legacy material
//! (SHA-1, RSA-1024) with the reason in plain words.

mod tls_support;

use std::path::Path;

use midge::tls::{build_server_config, client_identity, HandshakeFailure, TlsError, TlsOptions};
use tls_support::{client_config, handshake, openssl, openssl_out};

const SERVER_EXT: &str = "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n";
const CLIENT_EXT: &str =
    "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n";

fn ec_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "30",
            "-subj",
            &format!("/CN={name}"),
            "-sha256",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// Issues `name` from `ca` with the given key spec (`ec` or `rsa:N`), digest and subject.
fn issue(dir: &Path, ca: &str, name: &str, key: &str, md: &str, subj: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    let mut args = vec![
        "req",
        "-new",
        "-newkey",
        key,
        "-nodes",
        "-utf8",
        "-multivalue-rdn",
    ];
    if key == "ec" {
        args.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]);
    }
    let keyout = format!("{name}.key");
    let csr = format!("{name}.csr");
    args.extend(["-keyout", &keyout, "-out", &csr, "-subj", subj]);
    openssl(dir, &args);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "30",
            &format!("-{md}"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

fn options(dir: &Path) -> TlsOptions {
    let mut o = TlsOptions::new(dir.join("server.crt"), dir.join("server.key"));
    o.cafile = Some(dir.join("ca.crt"));
    o.require_certificate = true;
    o
}

fn setup() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ec_ca(d, "ca");
    issue(
        d,
        "ca",
        "server",
        "ec",
        "sha256",
        "/CN=localhost",
        SERVER_EXT,
    );
    tmp
}

#[test]
fn openssl_client_is_accepted_and_subject_matches_openssl_rfc2253() {
    let tmp = setup();
    let d = tmp.path();
    // Multi-valued RDN, repeated OU, characters RFC 2253 escapes, non-ASCII, emailAddress.
    let subj = r#"/C=GB/ST=Some, State/O=Acme \+ Co; "Ltd" <x>\\y=z/OU=Fleet/OU=Ops/CN=device-1+UID=42/emailAddress=d1@example.com/L=Zoë #1 /DC=#5"#;
    issue(d, "ca", "client", "ec", "sha256", subj, CLIENT_EXT);
    let server = build_server_config(&options(d)).unwrap();
    let client = client_config(
        &d.join("ca.crt"),
        Some((&d.join("client.crt"), &d.join("client.key"))),
    );
    let (s, _) = handshake(&server, &client).unwrap();
    let id = client_identity(s.peer_certificates().unwrap()).unwrap();
    assert_eq!(id.common_name.as_deref(), Some("device-1"));
    let expected = openssl_out(
        d,
        &[
            "x509",
            "-in",
            "client.crt",
            "-noout",
            "-subject",
            "-nameopt",
            "RFC2253",
        ],
    );
    let expected = expected
        .trim_end_matches('\n')
        .strip_prefix("subject=")
        .unwrap();
    assert_eq!(id.subject, expected);
    // Spot-check the shape mosquitto users know (reverse order, short names).
    assert_eq!(
        id.subject,
        r#"DC=\#5,L=Zo\C3\AB #1\ ,emailAddress=d1@example.com,UID=42+CN=device-1,OU=Ops,OU=Fleet,O=Acme \+ Co\; \"Ltd\" \<x\>\\y=z,ST=Some\, State,C=GB"#
    );
}

#[test]
fn simple_subject_is_printed_like_mosquitto() {
    let tmp = setup();
    let d = tmp.path();
    issue(
        d,
        "ca",
        "client",
        "ec",
        "sha256",
        "/C=GB/O=Acme/CN=device-1",
        CLIENT_EXT,
    );
    let server = build_server_config(&options(d)).unwrap();
    let client = client_config(
        &d.join("ca.crt"),
        Some((&d.join("client.crt"), &d.join("client.key"))),
    );
    let (s, _) = handshake(&server, &client).unwrap();
    let id = client_identity(s.peer_certificates().unwrap()).unwrap();
    assert_eq!(id.subject, "CN=device-1,O=Acme,C=GB");
}

#[test]
fn openssl_crl_revokes() {
    let tmp = setup();
    let d = tmp.path();
    issue(
        d,
        "ca",
        "client",
        "ec",
        "sha256",
        "/CN=device-9",
        CLIENT_EXT,
    );
    // Minimal `openssl ca` database to revoke and produce a CRL.
    std::fs::write(d.join("index.txt"), "").unwrap();
    std::fs::write(d.join("crlnumber"), "01\n").unwrap();
    std::fs::write(
        d.join("ca.cnf"),
        "[ca]\ndefault_ca=c\n[c]\ndatabase=index.txt\ncrlnumber=crlnumber\ndefault_md=sha256\ndefault_crl_days=30\ncertificate=ca.crt\nprivate_key=ca.key\n",
    )
    .unwrap();
    openssl(d, &["ca", "-config", "ca.cnf", "-revoke", "client.crt"]);
    openssl(
        d,
        &["ca", "-config", "ca.cnf", "-gencrl", "-out", "crl.pem"],
    );
    let mut o = options(d);
    o.crlfile = Some(d.join("crl.pem"));
    let server = build_server_config(&o).unwrap();
    let client = client_config(
        &d.join("ca.crt"),
        Some((&d.join("client.crt"), &d.join("client.key"))),
    );
    let err = handshake(&server, &client).err().unwrap().server();
    assert_eq!(HandshakeFailure::classify(&err), HandshakeFailure::Revoked);
}

#[test]
fn sha1_signed_client_is_refused_as_legacy() {
    let tmp = setup();
    let d = tmp.path();
    // A modern RSA CA that signs a client with SHA-1 (what `-sha1` tutorials do).
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "rsaca.key",
            "-out",
            "rsaca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=RSA CA",
            "-sha256",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    issue(
        d,
        "rsaca",
        "old",
        "rsa:2048",
        "sha1",
        "/CN=old-device",
        CLIENT_EXT,
    );
    let mut o = options(d);
    o.cafile = Some(d.join("rsaca.crt"));
    let server = build_server_config(&o).unwrap();
    let client = client_config(
        &d.join("ca.crt"),
        Some((&d.join("old.crt"), &d.join("old.key"))),
    );
    let err = handshake(&server, &client).err().unwrap().server();
    assert_eq!(
        HandshakeFailure::classify(&err),
        HandshakeFailure::LegacyAlgorithm
    );
    let line = HandshakeFailure::describe(&err);
    assert!(
        line.contains("CN=old-device") && line.contains("SHA-1"),
        "{line}"
    );
}

#[test]
fn rsa1024_in_the_client_chain_is_refused_as_legacy() {
    // rustls' client will not even load an RSA-1024 key, so the weak key sits in the chain:
    // a good root signs a 1024-bit intermediate, which signs the device certificate.
    let tmp = setup();
    let d = tmp.path();
    issue(
        d,
        "ca",
        "weakint",
        "rsa:1024",
        "sha256",
        "/CN=Weak Intermediate",
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    );
    issue(
        d,
        "weakint",
        "client",
        "ec",
        "sha256",
        "/CN=weak-device",
        CLIENT_EXT,
    );
    let chain = std::fs::read_to_string(d.join("client.crt")).unwrap()
        + &std::fs::read_to_string(d.join("weakint.crt")).unwrap();
    std::fs::write(d.join("chain.crt"), chain).unwrap();
    let server = build_server_config(&options(d)).unwrap();
    let client = client_config(
        &d.join("ca.crt"),
        Some((&d.join("chain.crt"), &d.join("client.key"))),
    );
    let err = handshake(&server, &client).err().unwrap().server();
    assert_eq!(
        HandshakeFailure::classify(&err),
        HandshakeFailure::LegacyAlgorithm
    );
    let line = HandshakeFailure::describe(&err);
    assert!(line.contains("1024-bit RSA key"), "{line}");
}

#[test]
fn legacy_server_material_is_refused_at_build_in_plain_words() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // The classic tutorial recipe: RSA-1024, SHA-1, made with openssl at SECLEVEL 0.
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=Old CA",
            "-sha256",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ],
    );
    issue(
        d,
        "ca",
        "server",
        "rsa:1024",
        "sha1",
        "/CN=localhost",
        SERVER_EXT,
    );
    let err = build_server_config(&options(d)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TlsError::Legacy { .. }), "{msg}");
    assert!(msg.contains("server.crt"), "{msg}");
    assert!(
        msg.contains("signed with SHA-1, which rustls refuses"),
        "{msg}"
    );
    assert!(msg.contains("midge certs server"), "{msg}");
    assert!(!msg.contains('\n'));

    // Same key size problem on a SHA-256 certificate: named as such.
    issue(
        d,
        "ca",
        "server",
        "rsa:1024",
        "sha256",
        "/CN=localhost",
        SERVER_EXT,
    );
    let msg = build_server_config(&options(d)).unwrap_err().to_string();
    assert!(msg.contains("1024-bit RSA key"), "{msg}");
}

#[test]
fn legacy_ca_key_is_refused_at_build() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ec_ca(d, "good");
    issue(
        d,
        "good",
        "server",
        "ec",
        "sha256",
        "/CN=localhost",
        SERVER_EXT,
    );
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:1024",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=Weak CA",
            "-sha1",
        ],
    );
    let msg = build_server_config(&options(d)).unwrap_err().to_string();
    assert!(
        msg.contains("ca.crt")
            && msg.contains("1024-bit RSA key")
            && msg.contains("midge certs ca"),
        "{msg}"
    );
}

#[test]
fn encrypted_key_is_a_plain_error() {
    let tmp = setup();
    let d = tmp.path();
    openssl(
        d,
        &[
            "pkey",
            "-in",
            "server.key",
            "-out",
            "enc.key",
            "-aes256",
            "-passout",
            "pass:secret",
        ],
    );
    let mut o = options(d);
    o.keyfile = d.join("enc.key");
    let msg = build_server_config(&o).unwrap_err().to_string();
    assert!(
        msg.contains("enc.key") && msg.contains("encrypted"),
        "{msg}"
    );
}
