//! The broker's TLS listener end to end (in-process broker, real loopback sockets, a blocking
//! rustls client): mutual TLS with the certificate CN as username, a 100 KB message through
//! the TLS stream both ways (publisher → broker → subscriber), a resumed reconnect counted as
//! resumed, and a client without a certificate refused and counted with its reason.

mod common;
mod tls_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::{connect, packet, publish, subscribe, V311};
use common::TestBroker;
use midge::shard::TlsListener;
use midge::tls::certs::{CertsDir, KeyType, Validity};
use midge::tls::{HandshakeFailure, HandshakeStats, TlsOptions, TlsReloader, UsernameRule};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use tls_support::client_config;

fn make_certs(dir: &Path) {
    let certs = CertsDir::new(dir);
    certs
        .create_ca(
            "Broker Test CA",
            Validity::days(30),
            KeyType::EcdsaP256,
            false,
        )
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
    for name in ["device-1", "device-2"] {
        certs
            .issue_client(name, Validity::days(30), KeyType::EcdsaP256, false)
            .unwrap();
    }
}

fn tls_broker(dir: &Path) -> (TestBroker, Arc<TlsListener>) {
    let mut o = TlsOptions::new(dir.join("server.crt"), dir.join("server.key"));
    o.cafile = Some(dir.join("ca.crt"));
    o.require_certificate = true;
    o.use_identity_as_username = true;
    let listener = Arc::new(TlsListener {
        reloader: Arc::new(TlsReloader::new(o).unwrap()),
        username_rule: UsernameRule::CertificateCommonName,
        handshake_timeout: Duration::from_secs(5),
        max_handshakes_in_progress: 64,
        stats: vec![HandshakeStats::new()],
    });
    let l = listener.clone();
    let broker = TestBroker::start_with(1, move |cfg| {
        cfg.shard_listeners = false;
        cfg.listeners[0].tls = Some(l);
    });
    (broker, listener)
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn open(port: u16, cfg: &Arc<ClientConfig>) -> Tls {
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn =
        ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
    StreamOwned::new(conn, sock)
}

/// Reads one MQTT packet: (first byte, body).
fn read_packet(s: &mut Tls) -> std::io::Result<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    s.read_exact(&mut first)?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        len |= ((b[0] & 0x7f) as usize) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body)?;
    Ok((first[0], body))
}

fn mqtt_connect(s: &mut Tls, id: &str) {
    s.write_all(&connect(V311, id, 30, true)).unwrap();
    let (first, body) = read_packet(s).unwrap();
    assert_eq!((first, body), (0x20, vec![0, 0]), "CONNACK accepted");
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn mutual_tls_clients_exchange_a_large_message_resume_and_are_refused_without_a_cert() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    make_certs(&dir);
    let (broker, listener) = tls_broker(&dir);
    let port = broker.port();
    let ca = dir.join("ca.crt");
    let dev1 = client_config(
        &ca,
        Some((&dir.join("device-1.crt"), &dir.join("device-1.key"))),
    );
    let dev2 = client_config(
        &ca,
        Some((&dir.join("device-2.crt"), &dir.join("device-2.key"))),
    );

    let mut sub = open(port, &dev1);
    mqtt_connect(&mut sub, "sub");
    sub.write_all(&subscribe(V311, 1, &[("t/#", 0)])).unwrap();
    let (first, body) = read_packet(&mut sub).unwrap();
    assert_eq!((first, body), (0x90, vec![0, 1, 0]), "SUBACK granted QoS 0");

    let mut publ = open(port, &dev2);
    mqtt_connect(&mut publ, "pub");
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
    publ.write_all(&publish(V311, "t/big", &payload, 0, 0))
        .unwrap();
    publ.write_all(&publish(V311, "t/small", b"x", 0, 0))
        .unwrap();

    let (first, body) = read_packet(&mut sub).unwrap();
    assert_eq!(first >> 4, 3, "PUBLISH");
    assert_eq!(&body[..7], b"\x00\x05t/big");
    assert!(body[7..] == payload[..], "100 KB payload corrupted");
    let (_, body) = read_packet(&mut sub).unwrap();
    assert_eq!(&body[..], b"\x00\x07t/smallx");

    // A clean MQTT DISCONNECT and a TLS close_notify.
    publ.write_all(&packet(0xE0, &[])).unwrap();
    publ.conn.send_close_notify();
    publ.flush().unwrap();
    drop(publ);

    // Same client config again: its session cache holds a ticket from the first handshake.
    let mut again = open(port, &dev2);
    mqtt_connect(&mut again, "pub-2");
    assert_eq!(
        again.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );

    // No certificate: refused during the handshake, counted with its reason.
    let anon = client_config(&ca, None);
    let mut bad = open(port, &anon);
    let refused = bad
        .write_all(&connect(V311, "anon", 30, true))
        .and_then(|_| read_packet(&mut bad).map(|_| ()));
    assert!(
        refused.is_err(),
        "a client without a certificate got a CONNACK"
    );

    let stats = &listener.stats[0];
    wait_for("handshake counters", || {
        let s = stats.snapshot();
        s.full >= 2 && s.resumed >= 1 && s.failures_for(HandshakeFailure::NoCertificate) == 1
    });
    let s = stats.snapshot();
    assert_eq!((s.full, s.resumed), (2, 1), "{s:?}");
}
