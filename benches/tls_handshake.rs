//! In-memory mutual-TLS handshake cost on one core: full (ECDSA P-256 certificates on both
//! sides, TLS 1.3) with X25519 vs X25519MLKEM768 key exchange, and resumed. Both sides run
//! in this thread, so a figure of N handshakes/s means the server share is below 1/N s each.
//!
//! `cargo bench --bench tls_handshake`

#[path = "../tests/tls_support/mod.rs"]
mod tls_support;

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use midge::tls::certs::{CertsDir, KeyType, Validity};
use midge::tls::{build_server_config, KxGroup, TlsOptions};
use rustls::crypto::aws_lc_rs;

fn bench(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let certs = CertsDir::new(d);
    certs
        .create_ca("Bench CA", Validity::days(2), KeyType::EcdsaP256, false)
        .unwrap();
    certs
        .issue_server(
            "server",
            "localhost",
            &["localhost".into()],
            &[],
            Validity::days(2),
            KeyType::EcdsaP256,
            false,
        )
        .unwrap();
    certs
        .issue_client("device-1", Validity::days(2), KeyType::EcdsaP256, false)
        .unwrap();
    let opts = |groups: Vec<KxGroup>| {
        let mut o = TlsOptions::new(d.join("server.crt"), d.join("server.key"));
        o.cafile = Some(d.join("ca.crt"));
        o.require_certificate = true;
        o.kx_groups = groups;
        o
    };
    let client = |groups: &[&'static dyn rustls::crypto::SupportedKxGroup], resume: bool| {
        let provider = rustls::crypto::CryptoProvider {
            kx_groups: groups.to_vec(),
            ..aws_lc_rs::default_provider()
        };
        let cfg = tls_support::client_config_with(
            &d.join("ca.crt"),
            Some((&d.join("device-1.crt"), &d.join("device-1.key"))),
            provider,
        );
        if resume {
            cfg
        } else {
            let mut c = (*cfg).clone();
            c.resumption = rustls::client::Resumption::disabled();
            Arc::new(c)
        }
    };

    let mut g = c.benchmark_group("tls_handshake");
    g.sample_size(20);
    g.measurement_time(std::time::Duration::from_secs(4));

    let x25519 = build_server_config(&opts(vec![KxGroup::X25519])).unwrap();
    let cx = client(&[aws_lc_rs::kx_group::X25519], false);
    g.bench_function("full_x25519_ecdsa_p256_mtls", |b| {
        b.iter(|| tls_support::handshake(&x25519, &cx).unwrap())
    });

    let hybrid = build_server_config(&opts(vec![KxGroup::X25519Mlkem768])).unwrap();
    let ch = client(&[aws_lc_rs::kx_group::X25519MLKEM768], false);
    g.bench_function("full_x25519mlkem768_ecdsa_p256_mtls", |b| {
        b.iter(|| tls_support::handshake(&hybrid, &ch).unwrap())
    });

    let cr = client(&[aws_lc_rs::kx_group::X25519], true);
    let (s, _) = tls_support::handshake(&x25519, &cr).unwrap();
    assert_eq!(s.handshake_kind(), Some(rustls::HandshakeKind::Full));
    g.bench_function("resumed_x25519", |b| {
        b.iter(|| {
            let (s, _) = tls_support::handshake(&x25519, &cr).unwrap();
            assert_eq!(s.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        })
    });

    let crh = client(&[aws_lc_rs::kx_group::X25519MLKEM768], true);
    tls_support::handshake(&hybrid, &crh).unwrap();
    g.bench_function("resumed_x25519mlkem768", |b| {
        b.iter(|| {
            let (s, _) = tls_support::handshake(&hybrid, &crh).unwrap();
            assert_eq!(s.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
