//! Mutual TLS with material made by `midge certs` (the library behind the subcommand):
//! accepted and refused clients with the reason a broker operator would see, identity
//! extraction, CRLs, reload, and cross-shard resumption with one shared config.

mod tls_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use midge::tls::certs::{CertsDir, KeyType, Validity};
use midge::tls::{
    build_server_config, client_identity, HandshakeFailure, KxGroup, TlsError, TlsOptions,
    TlsReloader, TlsVersion,
};
use rustls::HandshakeKind;
use time::{Duration, OffsetDateTime};
use tls_support::{client_config, handshake};

struct Pki {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    certs: CertsDir,
}

fn pki() -> Pki {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let certs = CertsDir::new(&dir);
    certs
        .create_ca("Test CA", Validity::days(30), KeyType::EcdsaP256, false)
        .unwrap();
    certs
        .issue_server(
            "server",
            "localhost",
            &["localhost".into()],
            &["127.0.0.1".parse().unwrap()],
            Validity::days(30),
            KeyType::EcdsaP256,
            false,
        )
        .unwrap();
    certs
        .issue_client("device-1", Validity::days(30), KeyType::EcdsaP256, false)
        .unwrap();
    Pki {
        _tmp: tmp,
        dir,
        certs,
    }
}

impl Pki {
    fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn options(&self) -> TlsOptions {
        let mut o = TlsOptions::new(self.p("server.crt"), self.p("server.key"));
        o.cafile = Some(self.p("ca.crt"));
        o.require_certificate = true;
        o
    }
    fn client(&self, name: &str) -> Arc<rustls::ClientConfig> {
        client_config(
            &self.p("ca.crt"),
            Some((
                &self.p(&format!("{name}.crt")),
                &self.p(&format!("{name}.key")),
            )),
        )
    }
}

fn refused(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> HandshakeFailure {
    let err = handshake(server, client)
        .expect_err("handshake should be refused")
        .server();
    HandshakeFailure::classify(&err)
}

#[test]
fn valid_client_is_accepted_and_identified() {
    let pki = pki();
    let server = build_server_config(&pki.options()).unwrap();
    let (s, c) = handshake(&server, &pki.client("device-1")).unwrap();
    assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let id = client_identity(s.peer_certificates().unwrap()).unwrap();
    assert_eq!(id.common_name.as_deref(), Some("device-1"));
    assert_eq!(id.subject, "CN=device-1");
}

#[test]
fn default_groups_do_not_cost_a_hello_retry_with_a_default_rustls_client() {
    // rustls clients offer X25519MLKEM768 first but also send an X25519 share, so the
    // X25519-first server default must not force a HelloRetryRequest round trip.
    let pki = pki();
    let server = build_server_config(&pki.options()).unwrap();
    let (s, _) = handshake(&server, &pki.client("device-1")).unwrap();
    assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(
        s.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519)
    );
}

#[test]
fn hybrid_group_on_request() {
    let pki = pki();
    let mut o = pki.options();
    o.kx_groups = vec![KxGroup::X25519Mlkem768, KxGroup::X25519];
    let server = build_server_config(&o).unwrap();
    let (s, _) = handshake(&server, &pki.client("device-1")).unwrap();
    assert_eq!(
        s.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
}

#[test]
fn no_certificate_is_refused_when_required() {
    let pki = pki();
    let server = build_server_config(&pki.options()).unwrap();
    let anon = client_config(&pki.p("ca.crt"), None);
    assert_eq!(refused(&server, &anon), HandshakeFailure::NoCertificate);
}

#[test]
fn no_certificate_is_allowed_when_not_required_but_a_bad_one_is_still_refused() {
    let pki = pki();
    let mut o = pki.options();
    o.require_certificate = false;
    let server = build_server_config(&o).unwrap();
    let anon = client_config(&pki.p("ca.crt"), None);
    let (s, _) = handshake(&server, &anon).unwrap();
    assert!(s.peer_certificates().is_none());
    assert!(client_identity(s.peer_certificates().unwrap_or(&[])).is_none());

    let other = CertsDir::new(pki.dir.join("other"));
    other
        .create_ca("Other CA", Validity::days(30), KeyType::EcdsaP256, false)
        .unwrap();
    let stranger = other
        .issue_client("stranger", Validity::days(30), KeyType::EcdsaP256, false)
        .unwrap();
    let client = client_config(&pki.p("ca.crt"), Some((&stranger.cert, &stranger.key)));
    assert_eq!(refused(&server, &client), HandshakeFailure::UnknownCa);
}

#[test]
fn client_of_another_ca_is_refused_as_unknown_ca() {
    let pki = pki();
    let server = build_server_config(&pki.options()).unwrap();
    let other = CertsDir::new(pki.dir.join("other"));
    other
        .create_ca("Other CA", Validity::days(30), KeyType::EcdsaP256, false)
        .unwrap();
    let stranger = other
        .issue_client("device-1", Validity::days(30), KeyType::EcdsaP256, false)
        .unwrap();
    let client = client_config(&pki.p("ca.crt"), Some((&stranger.cert, &stranger.key)));
    let err = handshake(&server, &client).err().unwrap().server();
    assert_eq!(
        HandshakeFailure::classify(&err),
        HandshakeFailure::UnknownCa
    );
    let line = HandshakeFailure::describe(&err);
    assert!(
        line.contains("unknown_ca") && line.contains("not signed by a CA"),
        "{line}"
    );
}

#[test]
fn revoked_client_is_refused_and_others_still_pass() {
    let pki = pki();
    pki.certs
        .issue_client("device-2", Validity::days(30), KeyType::EcdsaP256, false)
        .unwrap();
    let serials = pki.certs.revoke_cn("device-2", 30).unwrap();
    assert_eq!(serials.len(), 1);
    let mut o = pki.options();
    o.crlfile = Some(pki.p("crl.pem"));
    let server = build_server_config(&o).unwrap();
    assert_eq!(
        refused(&server, &pki.client("device-2")),
        HandshakeFailure::Revoked
    );
    handshake(&server, &pki.client("device-1")).expect("device-1 is not revoked");
}

#[test]
fn revoke_by_certificate_file() {
    let pki = pki();
    pki.certs
        .revoke_cert_file(&pki.p("device-1.crt"), 30)
        .unwrap();
    let mut o = pki.options();
    o.crlfile = Some(pki.p("crl.pem"));
    let server = build_server_config(&o).unwrap();
    assert_eq!(
        refused(&server, &pki.client("device-1")),
        HandshakeFailure::Revoked
    );
}

#[test]
fn expired_and_not_yet_valid_clients_are_refused() {
    let pki = pki();
    let now = OffsetDateTime::now_utc();
    let past = Validity {
        not_before: now - Duration::days(10),
        not_after: now - Duration::days(1),
    };
    pki.certs
        .issue_client("old", past, KeyType::EcdsaP256, false)
        .unwrap();
    let future = Validity {
        not_before: now + Duration::days(1),
        not_after: now + Duration::days(10),
    };
    pki.certs
        .issue_client("early", future, KeyType::EcdsaP256, false)
        .unwrap();
    let server = build_server_config(&pki.options()).unwrap();
    assert_eq!(
        refused(&server, &pki.client("old")),
        HandshakeFailure::Expired
    );
    assert_eq!(
        refused(&server, &pki.client("early")),
        HandshakeFailure::NotYetValid
    );
}

#[test]
fn rsa_material_works() {
    let pki = pki();
    pki.certs
        .issue_server(
            "rsa-server",
            "localhost",
            &["localhost".into()],
            &[],
            Validity::days(30),
            KeyType::Rsa2048,
            false,
        )
        .unwrap();
    pki.certs
        .issue_client("rsa-device", Validity::days(30), KeyType::Rsa2048, false)
        .unwrap();
    let mut o = pki.options();
    o.certfile = pki.p("rsa-server.crt");
    o.keyfile = pki.p("rsa-server.key");
    let server = build_server_config(&o).unwrap();
    let (s, _) = handshake(&server, &pki.client("rsa-device")).unwrap();
    let id = client_identity(s.peer_certificates().unwrap()).unwrap();
    assert_eq!(id.common_name.as_deref(), Some("rsa-device"));
}

#[test]
fn key_that_does_not_match_the_certificate_is_a_plain_error() {
    let pki = pki();
    let mut o = pki.options();
    o.keyfile = pki.p("device-1.key");
    let err = build_server_config(&o).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("device-1.key")
            && msg.contains("server.crt")
            && msg.contains("does not match"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
}

#[test]
fn missing_and_empty_files_are_plain_errors() {
    let pki = pki();
    let mut o = pki.options();
    o.cafile = Some(pki.p("nope.crt"));
    let msg = build_server_config(&o).unwrap_err().to_string();
    assert!(
        msg.contains("nope.crt") && msg.contains("cannot read"),
        "{msg}"
    );

    std::fs::write(pki.p("empty.pem"), "hello\n").unwrap();
    let mut o = pki.options();
    o.certfile = pki.p("empty.pem");
    let msg = build_server_config(&o).unwrap_err().to_string();
    assert!(
        msg.contains("empty.pem") && msg.contains("no certificate found"),
        "{msg}"
    );

    let mut o = pki.options();
    o.keyfile = pki.p("server.crt");
    let msg = build_server_config(&o).unwrap_err().to_string();
    assert!(msg.contains("no private key found"), "{msg}");
}

#[test]
fn expired_server_certificate_is_refused_at_build_with_dates() {
    let pki = pki();
    let now = OffsetDateTime::now_utc();
    pki.certs
        .issue_server(
            "stale",
            "localhost",
            &["localhost".into()],
            &[],
            Validity {
                not_before: now - Duration::days(400),
                not_after: now - Duration::days(35),
            },
            KeyType::EcdsaP256,
            false,
        )
        .unwrap();
    let mut o = pki.options();
    o.certfile = pki.p("stale.crt");
    o.keyfile = pki.p("stale.key");
    let err = build_server_config(&o).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TlsError::Expired { .. }), "{msg}");
    assert!(
        msg.contains("stale.crt") && msg.contains("expired on") && msg.contains("UTC"),
        "{msg}"
    );
}

#[test]
fn server_certificate_from_another_ca_is_only_a_warning() {
    let pki = pki();
    let other = CertsDir::new(pki.dir.join("other"));
    other
        .create_ca("Other CA", Validity::days(30), KeyType::EcdsaP256, false)
        .unwrap();
    let mut o = pki.options();
    o.cafile = Some(pki.dir.join("other/ca.crt"));
    let built = midge::tls::build_server_config_with_warnings(&o).unwrap();
    assert_eq!(built.warnings.len(), 1, "{:?}", built.warnings);
    assert!(
        built.warnings[0].contains("server.crt") && built.warnings[0].contains("does not verify")
    );
}

#[test]
fn cipher_and_version_options() {
    let pki = pki();
    let mut o = pki.options();
    o.ciphers = Some("ECDHE-ECDSA-AES128-GCM-SHA256:DES-CBC3-SHA".into());
    let msg = build_server_config(&o).unwrap_err().to_string();
    assert!(
        msg.contains("ciphers") && msg.contains("DES-CBC3-SHA"),
        "{msg}"
    );

    let mut o = pki.options();
    o.ciphers_tls13 = Some("TLS_CHACHA20_POLY1305_SHA256".into());
    let server = build_server_config(&o).unwrap();
    let (s, _) = handshake(&server, &pki.client("device-1")).unwrap();
    assert_eq!(
        s.negotiated_cipher_suite().unwrap().suite(),
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
    );

    // tlsv1.3 only: a TLS 1.2-only client gets a protocol failure.
    let mut o = pki.options();
    o.tls_version = TlsVersion::Tls13;
    let server = build_server_config(&o).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in tls_support::load_certs(&pki.p("ca.crt")) {
        roots.add(c).unwrap();
    }
    let c12 = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_root_certificates(roots)
        .with_client_auth_cert(
            tls_support::load_certs(&pki.p("device-1.crt")),
            tls_support::load_key(&pki.p("device-1.key")),
        )
        .unwrap();
    assert_eq!(refused(&server, &Arc::new(c12)), HandshakeFailure::Protocol);

    // TLS 1.2 with an explicit suite list works.
    let mut o = pki.options();
    o.ciphers = Some("ECDHE-ECDSA-AES256-GCM-SHA384".into());
    let server = build_server_config(&o).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in tls_support::load_certs(&pki.p("ca.crt")) {
        roots.add(c).unwrap();
    }
    let c12 = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_root_certificates(roots)
        .with_client_auth_cert(
            tls_support::load_certs(&pki.p("device-1.crt")),
            tls_support::load_key(&pki.p("device-1.key")),
        )
        .unwrap();
    let (s, _) = handshake(&server, &Arc::new(c12)).unwrap();
    assert_eq!(
        s.negotiated_cipher_suite().unwrap().suite(),
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
    );
}

#[test]
fn resumption_works_across_connections_sharing_one_config() {
    let pki = pki();
    let shared = build_server_config(&pki.options()).unwrap();
    // Two "shards": distinct ServerConnections from clones of the same Arc.
    let shard_a = Arc::clone(&shared);
    let shard_b = Arc::clone(&shared);
    let client = pki.client("device-1");
    let (s1, _) = handshake(&shard_a, &client).unwrap();
    assert_eq!(s1.handshake_kind(), Some(HandshakeKind::Full));
    let (s2, _) = handshake(&shard_b, &client).unwrap();
    assert_eq!(s2.handshake_kind(), Some(HandshakeKind::Resumed));
    // The resumed session still carries the client's identity.
    let id = client_identity(s2.peer_certificates().unwrap()).unwrap();
    assert_eq!(id.common_name.as_deref(), Some("device-1"));

    // Control: a config built separately (its own ticketer) cannot resume that client,
    // which is why shards must share one Arc rather than build their own.
    let client2 = pki.client("device-1");
    let separate = build_server_config(&pki.options()).unwrap();
    handshake(&shard_a, &client2).unwrap();
    let (s3, _) = handshake(&separate, &client2).unwrap();
    assert_eq!(s3.handshake_kind(), Some(HandshakeKind::Full));
}

fn write_file(path: &Path, from: &Path) {
    std::fs::copy(from, path).unwrap();
}

#[test]
fn reload_swaps_the_ca_and_keeps_the_old_config_on_failure() {
    let pki = pki();
    let other = CertsDir::new(pki.dir.join("other"));
    other
        .create_ca("Other CA", Validity::days(30), KeyType::EcdsaP256, false)
        .unwrap();
    let newcomer = other
        .issue_client("newcomer", Validity::days(30), KeyType::EcdsaP256, false)
        .unwrap();
    let live_ca = pki.dir.join("live-ca.crt");
    write_file(&live_ca, &pki.p("ca.crt"));
    let mut o = pki.options();
    o.cafile = Some(live_ca.clone());
    let reloader = Arc::new(TlsReloader::new(o).unwrap());
    let mut shard = midge::tls::ShardTlsConfig::new(Arc::clone(&reloader));
    let newcomer_client = client_config(&pki.p("ca.crt"), Some((&newcomer.cert, &newcomer.key)));

    let before = reloader.current();
    assert_eq!(
        refused(&before, &newcomer_client),
        HandshakeFailure::UnknownCa
    );

    // New CA in place: after reload the newcomer is accepted and the old fleet is not.
    write_file(&live_ca, &pki.dir.join("other/ca.crt"));
    let g0 = reloader.generation();
    reloader.reload().unwrap();
    assert_eq!(reloader.generation(), g0 + 1);
    let after = reloader.current();
    assert!(!Arc::ptr_eq(&before, &after));
    assert!(
        Arc::ptr_eq(shard.get(), &after),
        "the shard handle picks up the reload"
    );
    handshake(&after, &newcomer_client).expect("client of the new CA accepted after reload");
    assert_eq!(
        refused(&after, &pki.client("device-1")),
        HandshakeFailure::UnknownCa
    );
    // Connections built from the old Arc still work with the old CA (no disruption).
    handshake(&before, &pki.client("device-1")).unwrap();

    // A broken file: reload fails with the reason, the current config stays.
    std::fs::write(&live_ca, "not a certificate\n").unwrap();
    let err = reloader.reload().unwrap_err();
    assert!(err.to_string().contains("live-ca.crt"), "{err}");
    assert!(Arc::ptr_eq(&after, &reloader.current()));
    assert!(Arc::ptr_eq(shard.get(), &after));
    assert_eq!(reloader.generation(), g0 + 1);
    handshake(&reloader.current(), &newcomer_client).unwrap();
}

#[test]
fn certs_tool_files_and_clean() {
    use std::os::unix::fs::PermissionsExt;
    let pki = pki();
    for f in ["ca.key", "server.key", "device-1.key"] {
        let mode = std::fs::metadata(pki.p(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    for f in [
        "ca.crt",
        "ca.der",
        "server.crt",
        "server.der",
        "device-1.der",
        "crl.pem",
    ] {
        assert!(pki.p(f).exists(), "{f}");
    }
    // Refuses to overwrite the CA without --force.
    assert!(pki
        .certs
        .create_ca("Again", Validity::days(1), KeyType::EcdsaP256, false)
        .is_err());
    // Serial numbers differ between certificates.
    let a = pki
        .certs
        .issue_client("s-1", Validity::days(1), KeyType::EcdsaP256, false)
        .unwrap();
    let b = pki
        .certs
        .issue_client("s-2", Validity::days(1), KeyType::EcdsaP256, false)
        .unwrap();
    assert_ne!(a.serial, b.serial);
    // A file that is not ours survives clean; ours are gone.
    std::fs::write(pki.p("mine.txt"), "keep").unwrap();
    let removed = pki.certs.clean().unwrap();
    assert!(removed >= 12, "{removed}");
    assert!(pki.p("mine.txt").exists());
    assert!(!pki.p("ca.key").exists() && !pki.p("device-1.crt").exists());
}

#[test]
fn certs_cli_batch_of_clients() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: midge::tls::certs::CertsCommand,
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let d = dir.to_str().unwrap();
    for args in [
        vec!["x", "ca", "--dir", d, "--cn", "Fleet CA"],
        vec![
            "x",
            "server",
            "--dir",
            d,
            "--dns",
            "localhost",
            "--key-type",
            "rsa2048",
        ],
        vec![
            "x", "client", "--dir", d, "--count", "3", "--prefix", "device-",
        ],
        vec!["x", "revoke", "--dir", d, "--cn", "device-0002"],
        vec!["x", "crl", "--dir", d],
    ] {
        midge::tls::certs::run(Cli::parse_from(args).cmd).unwrap();
    }
    for n in ["device-0001", "device-0002", "device-0003"] {
        assert!(dir.join(format!("{n}.crt")).exists(), "{n}");
    }
    let mut o = TlsOptions::new(dir.join("server.crt"), dir.join("server.key"));
    o.cafile = Some(dir.join("ca.crt"));
    o.crlfile = Some(dir.join("crl.pem"));
    o.require_certificate = true;
    let server = build_server_config(&o).unwrap();
    let c = |n: &str| {
        client_config(
            &dir.join("ca.crt"),
            Some((&dir.join(format!("{n}.crt")), &dir.join(format!("{n}.key")))),
        )
    };
    handshake(&server, &c("device-0001")).unwrap();
    assert_eq!(
        refused(&server, &c("device-0002")),
        HandshakeFailure::Revoked
    );
    handshake(&server, &c("device-0003")).unwrap();
    midge::tls::certs::run(Cli::parse_from(["x", "clean", "--dir", d]).cmd).unwrap();
    assert!(!dir.exists());
}

#[test]
fn capath_directory_of_cas_and_crl_checks() {
    let pki = pki();
    let other = CertsDir::new(pki.dir.join("other"));
    other
        .create_ca("Other CA", Validity::days(30), KeyType::EcdsaP256, false)
        .unwrap();
    let stranger = other
        .issue_client("stranger", Validity::days(30), KeyType::EcdsaP256, false)
        .unwrap();
    let capath = pki.dir.join("capath");
    std::fs::create_dir(&capath).unwrap();
    std::fs::copy(pki.p("ca.crt"), capath.join("fleet.pem")).unwrap();
    std::fs::copy(pki.dir.join("other/ca.crt"), capath.join("other.crt")).unwrap();
    std::fs::write(capath.join("README"), "not a certificate").unwrap();
    let mut o = pki.options();
    o.cafile = None;
    o.capath = Some(capath.clone());
    let server = build_server_config(&o).unwrap();
    handshake(&server, &pki.client("device-1")).expect("CA from capath/fleet.pem");
    let sc = client_config(&pki.p("ca.crt"), Some((&stranger.cert, &stranger.key)));
    handshake(&server, &sc).expect("CA from capath/other.crt");

    // A CRL for only one of the two CAs: the other CA's clients are refused (as OpenSSL's
    // CRL_CHECK does), and the build says so in a warning.
    o.crlfile = Some(pki.p("crl.pem"));
    let built = midge::tls::build_server_config_with_warnings(&o).unwrap();
    assert!(
        built
            .warnings
            .iter()
            .any(|w| w.contains("CN=Other CA") && w.contains("no CRL")),
        "{:?}",
        built.warnings
    );
    handshake(&built.config, &pki.client("device-1")).unwrap();
    assert!(handshake(&built.config, &sc).is_err());

    // A CRL from a CA that is not configured is an error naming the file.
    let mut o = pki.options();
    o.crlfile = Some(pki.dir.join("other/crl.pem"));
    let msg = build_server_config(&o).unwrap_err().to_string();
    assert!(
        msg.contains("other/crl.pem") && msg.contains("CN=Other CA"),
        "{msg}"
    );
}

#[test]
fn option_parsing_helpers() {
    assert_eq!(TlsVersion::parse("tlsv1.3"), Ok(TlsVersion::Tls13));
    assert!(TlsVersion::parse("tlsv1.1")
        .unwrap_err()
        .contains("not supported"));
    assert_eq!(
        KxGroup::parse_list("X25519MLKEM768:x25519,prime256v1"),
        Ok(vec![
            KxGroup::X25519Mlkem768,
            KxGroup::X25519,
            KxGroup::Secp256r1
        ])
    );
    assert!(KxGroup::parse("ffdhe2048")
        .unwrap_err()
        .contains("unknown group"));
    assert_eq!(KxGroup::DEFAULT, &[KxGroup::X25519, KxGroup::Secp256r1]);
}
