//! `midge::tls::ServerTlsStream` (rustls' unbuffered API with our own buffers) against a
//! regular rustls client (futures-rustls) over an in-memory pipe: mutual-TLS handshakes with
//! the client identity, TLS 1.2 and 1.3, resumption through one shared config, refused client
//! certificates with the rustls reason, bulk data both ways through a small pipe, records
//! split into tiny reads, close_notify versus a cut stream, garbage, and no buffers held
//! once a connection is idle.

mod tls_support;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_lite::future::{self, block_on};
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use midge::tls::certs::{CertsDir, KeyType, Validity};
use midge::tls::{
    accept, build_server_config, AcceptError, HandshakeFailure, ServerTlsStream, TlsOptions,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, HandshakeKind, ProtocolVersion};
use tls_support::{client_config, load_certs, load_key};

// ---------- an in-memory, bounded, single-threaded duplex pipe ----------

#[derive(Default)]
struct Half {
    buf: VecDeque<u8>,
    /// Successful writes into this direction (a socket's send calls).
    writes: usize,
    closed: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

/// One end of a pipe: reads from `rx`, writes to `tx`. `cap` bounds each direction
/// (backpressure); `max_read` bounds each read (splits records across reads).
struct End {
    rx: Rc<RefCell<Half>>,
    tx: Rc<RefCell<Half>>,
    cap: usize,
    max_read: usize,
}

fn pipe(cap: usize, max_read: usize) -> (End, End) {
    let a = Rc::new(RefCell::new(Half::default()));
    let b = Rc::new(RefCell::new(Half::default()));
    (
        End {
            rx: a.clone(),
            tx: b.clone(),
            cap,
            max_read,
        },
        End {
            rx: b,
            tx: a,
            cap,
            max_read,
        },
    )
}

impl End {
    /// Ends the stream abruptly (no TLS close_notify): the peer's reads see EOF.
    fn cut(&self) {
        let mut tx = self.tx.borrow_mut();
        tx.closed = true;
        if let Some(w) = tx.reader.take() {
            w.wake();
        }
    }
}

impl Drop for End {
    fn drop(&mut self) {
        self.cut();
    }
}

impl AsyncRead for End {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut rx = self.rx.borrow_mut();
        if rx.buf.is_empty() {
            if rx.closed {
                return Poll::Ready(Ok(0));
            }
            rx.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = out.len().min(rx.buf.len()).min(self.max_read);
        for (o, b) in out[..n].iter_mut().zip(rx.buf.drain(..n)) {
            *o = b;
        }
        if let Some(w) = rx.writer.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for End {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let mut tx = self.tx.borrow_mut();
        if tx.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let room = self.cap - tx.buf.len();
        if room == 0 {
            tx.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(b.len());
        tx.buf.extend(&b[..n]);
        tx.writes += 1;
        if let Some(w) = tx.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.cut();
        Poll::Ready(Ok(()))
    }
}

// ---------- certificates ----------

struct Pki {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

fn pki() -> Pki {
    pki_named("Test CA")
}

fn pki_named(ca: &str) -> Pki {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let certs = CertsDir::new(&dir);
    certs
        .create_ca(ca, Validity::days(30), KeyType::EcdsaP256, false)
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
    Pki { _tmp: tmp, dir }
}

impl Pki {
    fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn server(&self) -> Arc<rustls::ServerConfig> {
        let mut o = TlsOptions::new(self.p("server.crt"), self.p("server.key"));
        o.cafile = Some(self.p("ca.crt"));
        o.require_certificate = true;
        build_server_config(&o).unwrap()
    }
    fn client(&self) -> Arc<ClientConfig> {
        client_config(
            &self.p("ca.crt"),
            Some((&self.p("device-1.crt"), &self.p("device-1.key"))),
        )
    }
    fn client12(&self) -> Arc<ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(&self.p("ca.crt")) {
            roots.add(c).unwrap();
        }
        Arc::new(
            ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    load_certs(&self.p("device-1.crt")),
                    load_key(&self.p("device-1.key")),
                )
                .unwrap(),
        )
    }
}

type Client = futures_rustls::client::TlsStream<End>;

async fn connect(cfg: &Arc<ClientConfig>, io: End) -> io::Result<Client> {
    futures_rustls::TlsConnector::from(cfg.clone())
        .connect(ServerName::try_from("localhost").unwrap(), io)
        .await
}

/// Handshake both sides concurrently over a pipe.
fn handshake(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<ClientConfig>,
    cap: usize,
    max_read: usize,
) -> (
    Result<ServerTlsStream<End>, AcceptError>,
    io::Result<Client>,
) {
    let (s_io, c_io) = pipe(cap, max_read);
    block_on(future::zip(
        accept(server.clone(), s_io),
        connect(client, c_io),
    ))
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// 100 KB each way (one direction at a time: each side is one task with one stream, so it
/// cannot read while it is blocked writing), then a small request/response.
fn exchange(s: &mut ServerTlsStream<End>, c: &mut Client) {
    let up = payload(100_000, 1);
    let down = payload(100_000, 2);
    let (_, got_up) = block_on(future::zip(
        async {
            c.write_all(&up).await.unwrap();
            c.flush().await.unwrap();
        },
        async {
            let mut got = vec![0; up.len()];
            s.read_exact(&mut got).await.unwrap();
            got
        },
    ));
    assert!(got_up == up, "client→server payload corrupted");
    let (_, got_down) = block_on(future::zip(
        async {
            s.write_all(&down).await.unwrap();
            s.flush().await.unwrap();
        },
        async {
            let mut got = vec![0; down.len()];
            c.read_exact(&mut got).await.unwrap();
            got
        },
    ));
    assert!(got_down == down, "server→client payload corrupted");

    // A small ping/pong, as an MQTT client would do, which also lets a TLS 1.3 client
    // take in the session tickets.
    block_on(async {
        c.write_all(b"\xc0\x00").await.unwrap();
        c.flush().await.unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"\xc0\x00");
        s.write_all(b"\xd0\x00").await.unwrap();
        s.flush().await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"\xd0\x00");
    });
}

fn check_session(client: &Arc<ClientConfig>, version: ProtocolVersion) {
    let pki_server = PKI.with(|p| p.server());
    let (s, c) = handshake(&pki_server, client, 4096, usize::MAX);
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    assert_eq!(s.protocol_version(), Some(version));
    assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
    let id = s.client_identity().expect("client identity");
    assert_eq!(id.common_name.as_deref(), Some("device-1"));
    assert_eq!(s.peer_certificates().map(|c| c.len()), Some(1));
    // Tickets (TLS 1.3) or the handshake's last flight are sent; nothing is left behind.
    assert_eq!(s.idle_memory(), 0, "buffers held right after the handshake");
    exchange(&mut s, &mut c);
    assert_eq!(s.idle_memory(), 0, "buffers held by an idle connection");
}

thread_local! {
    static PKI: Pki = pki();
}

#[test]
fn mutual_tls13_handshake_identity_and_bulk_data_then_no_buffers() {
    let client = PKI.with(|p| p.client());
    check_session(&client, ProtocolVersion::TLSv1_3);
}

#[test]
fn mutual_tls12_handshake_identity_and_bulk_data_then_no_buffers() {
    let client = PKI.with(|p| p.client12());
    check_session(&client, ProtocolVersion::TLSv1_2);
}

#[test]
fn records_split_into_tiny_reads_still_work() {
    let server = PKI.with(|p| p.server());
    let client = PKI.with(|p| p.client());
    // 7 bytes per read: every record arrives in pieces. (The pipe must hold the server's
    // tickets, ~1.3 KB, which it sends before `accept` returns while the client, already
    // done, does not read — a socket's buffer does that in real life.)
    let (s, c) = handshake(&server, &client, 4096, 7);
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    exchange(&mut s, &mut c);
    assert_eq!(s.idle_memory(), 0);
}

fn resumes(server: &Arc<rustls::ServerConfig>, client: &Arc<ClientConfig>) {
    let (s, c) = handshake(server, client, 65536, usize::MAX);
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
    exchange(&mut s, &mut c);
    drop((s, c));
    // Same client config (its session cache), another connection from the shared config.
    let (s, c) = handshake(server, client, 65536, usize::MAX);
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    assert_eq!(s.handshake_kind(), Some(HandshakeKind::Resumed));
    let id = s.client_identity().expect("identity on a resumed session");
    assert_eq!(id.common_name.as_deref(), Some("device-1"));
    exchange(&mut s, &mut c);
    assert_eq!(s.idle_memory(), 0);
}

/// A client that sends its first packet right behind its Finished (as an MQTT client sends
/// CONNECT): the session tickets wait for the server's first reply and leave in the same
/// transport write, and the client can still resume with them.
#[test]
fn tickets_leave_with_the_first_reply_when_the_client_spoke_first() {
    let server = PKI.with(|p| p.server());
    let client = PKI.with(|p| p.client());
    let (s_io, c_io) = pipe(65536, usize::MAX);
    let to_client = c_io.rx.clone();
    let (s, c) = block_on(future::zip(accept(server.clone(), s_io), async {
        let mut c = connect(&client, c_io).await?;
        // Written in the same poll as the Finished: the server reads both at once.
        c.write_all(b"\x10\x00").await?;
        c.flush().await?;
        io::Result::Ok(c)
    }));
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    let before = to_client.borrow().writes;
    assert_eq!(before, 1, "only the server's handshake flight was sent");
    assert!(s.idle_memory() > 0, "the tickets wait for the reply");
    block_on(async {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"\x10\x00");
        s.write_all(b"\x20\x00").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(
            to_client.borrow().writes,
            2,
            "tickets and reply in one write"
        );
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"\x20\x00");
    });
    assert_eq!(s.idle_memory(), 0);
    drop((s, c));
    let (s, c) = handshake(&server, &client, 65536, usize::MAX);
    let (s, _c) = (s.unwrap(), c.unwrap());
    assert_eq!(s.handshake_kind(), Some(HandshakeKind::Resumed));
}

/// The TLS 1.3 suite a default rustls client (which lists TLS13_AES_256_GCM_SHA384 first)
/// gets from a server built from `opts`.
fn suite_chosen(opts: &TlsOptions) -> rustls::CipherSuite {
    let server = build_server_config(opts).unwrap();
    let client = PKI.with(|p| p.client());
    let first = client.crypto_provider().cipher_suites[0].suite();
    assert_eq!(first, rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    let (s, c) = handshake(&server, &client, 65536, usize::MAX);
    let (_s, c) = (s.unwrap(), c.unwrap());
    c.get_ref().1.negotiated_cipher_suite().unwrap().suite()
}

/// By default the server picks a SHA-256 suite (a cheaper key schedule than SHA-384) over the
/// client's first choice; a configured `ciphers_tls1.3` list leaves the choice to the client.
#[test]
fn default_suites_prefer_sha256_and_a_configured_list_follows_the_client() {
    let dir = PKI.with(|p| p.dir.clone());
    let mut o = TlsOptions::new(dir.join("server.crt"), dir.join("server.key"));
    o.cafile = Some(dir.join("ca.crt"));
    o.require_certificate = true;
    assert_eq!(
        suite_chosen(&o),
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    o.ciphers_tls13 = Some("TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384".into());
    assert_eq!(
        suite_chosen(&o),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    );
}

#[test]
fn tls13_resumption_with_tickets_from_a_shared_config() {
    let server = PKI.with(|p| p.server());
    resumes(&server, &PKI.with(|p| p.client()));
}

#[test]
fn tls12_resumption_from_a_shared_config() {
    let server = PKI.with(|p| p.server());
    resumes(&server, &PKI.with(|p| p.client12()));
}

#[test]
fn client_without_certificate_is_refused_with_the_rustls_reason() {
    let server = PKI.with(|p| p.server());
    let no_cert = PKI.with(|p| client_config(&p.p("ca.crt"), None));
    let (s_io, c_io) = pipe(65536, usize::MAX);
    let (s, client_saw) = block_on(future::zip(accept(server, s_io), async {
        // TLS 1.3: the client thinks it is done before the server checked its certificate;
        // the refusal reaches it as an alert on its first read.
        let mut c = connect(&no_cert, c_io).await?;
        let mut b = [0u8; 1];
        c.read(&mut b).await
    }));
    let err = s.err().expect("server must refuse");
    let tls = err.tls_error().expect("a TLS error, not I/O");
    assert_eq!(tls, &rustls::Error::NoCertificatesPresented);
    assert_eq!(
        HandshakeFailure::classify(tls),
        HandshakeFailure::classify(&rustls::Error::NoCertificatesPresented)
    );
    let client_err = client_saw
        .expect_err("client must see the alert")
        .to_string();
    assert!(client_err.contains("CertificateRequired"), "{client_err}");
}

#[test]
fn client_from_another_ca_is_refused_with_unknown_issuer() {
    let server = PKI.with(|p| p.server());
    let other = pki_named("Rogue CA");
    let rogue = client_config(
        &PKI.with(|p| p.p("ca.crt")),
        Some((&other.p("device-1.crt"), &other.p("device-1.key"))),
    );
    let (s_io, c_io) = pipe(65536, usize::MAX);
    let (s, client_saw) = block_on(future::zip(accept(server, s_io), async {
        let mut c = connect(&rogue, c_io).await?;
        let mut b = [0u8; 1];
        c.read(&mut b).await
    }));
    let err = s.err().expect("server must refuse");
    assert_eq!(
        err.tls_error(),
        Some(&rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer
        ))
    );
    let client_err = client_saw
        .expect_err("client must see the alert")
        .to_string();
    assert!(client_err.contains("UnknownCA"), "{client_err}");
}

#[test]
fn close_notify_reads_as_end_of_stream_and_a_cut_stream_as_an_error() {
    let server = PKI.with(|p| p.server());
    let client = PKI.with(|p| p.client());

    let (s, c) = handshake(&server, &client, 65536, usize::MAX);
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    block_on(async {
        c.write_all(b"last words").await.unwrap();
        c.close().await.unwrap();
        let mut got = Vec::new();
        // Data before close_notify is delivered, then a clean end of stream.
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
        assert_eq!(s.read(&mut [0u8; 8]).await.unwrap(), 0);
    });
    // The server's own close sends close_notify, which the client reads as a clean end.
    let (s, c) = handshake(&server, &client, 65536, usize::MAX);
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    block_on(async {
        s.close().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
    });

    let (s, c) = handshake(&server, &client, 65536, usize::MAX);
    let (mut s, c) = (s.unwrap(), c.unwrap());
    c.get_ref().0.cut();
    let err = block_on(s.read(&mut [0u8; 8])).expect_err("EOF without close_notify");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn garbage_instead_of_a_client_hello_fails_the_handshake_without_panic() {
    let server = PKI.with(|p| p.server());
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01][..],
        &[
            0x17, 0x03, 0x03, 0x00, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ][..],
        &[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00][..],
    ] {
        let (s_io, mut c_io) = pipe(65536, usize::MAX);
        let res = block_on(future::zip(accept(server.clone(), s_io), async {
            c_io.write_all(junk).await.unwrap();
            let mut back = Vec::new();
            // The server answers with an alert (or nothing) and we stop there.
            let mut b = [0u8; 64];
            if let Ok(n) = future::or(c_io.read(&mut b), async {
                futures_lite::future::yield_now().await;
                futures_lite::future::yield_now().await;
                Ok(0)
            })
            .await
            {
                back.extend_from_slice(&b[..n]);
            }
            c_io.cut();
            back
        }));
        match res.0 {
            Err(AcceptError::Tls(_)) | Err(AcceptError::Io(_)) => {}
            Ok(_) => panic!("garbage {junk:?} accepted"),
        }
        if let Err(AcceptError::Tls(_)) = res.0 {
            assert_eq!(res.1.first(), Some(&0x15), "no alert record for {junk:?}");
        }
    }
}

#[test]
fn a_forged_record_after_the_handshake_is_an_error_not_a_panic() {
    let server = PKI.with(|p| p.server());
    let client = PKI.with(|p| p.client());
    let (s, c) = handshake(&server, &client, 65536, usize::MAX);
    let (mut s, c) = (s.unwrap(), c.unwrap());
    let raw = &c.get_ref().0;
    let before = raw.rx.borrow().buf.len();
    // An application-data record the client never encrypted: its tag cannot verify.
    raw.tx.borrow_mut().buf.extend(
        [0x17, 0x03, 0x03, 0x00, 0x20]
            .iter()
            .chain([0x55u8; 32].iter()),
    );
    let err = block_on(s.read(&mut [0u8; 8])).expect_err("forged record");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    // The server sent the client an alert.
    let back: Vec<u8> = raw.rx.borrow().buf.iter().skip(before).copied().collect();
    // TLS 1.3 encrypts alerts: an application-data record of one alert (2 bytes + type + tag).
    assert_eq!(
        back.len(),
        5 + 2 + 1 + 16,
        "alert record expected: {back:?}"
    );
    assert_eq!(back[0], 0x17);
}

#[test]
fn writes_wait_for_a_peer_that_does_not_read() {
    let server = PKI.with(|p| p.server());
    let client = PKI.with(|p| p.client());
    let (s, c) = handshake(&server, &client, 8192, usize::MAX);
    let (mut s, _c) = (s.unwrap(), c.unwrap());
    let big = payload(1_000_000, 3);
    let mut sent = 0;
    block_on(future::or(
        async {
            while sent < big.len() {
                sent += s.write(&big[sent..]).await.unwrap();
            }
        },
        async {
            for _ in 0..100 {
                future::yield_now().await;
            }
        },
    ));
    // The pipe holds 8 KB and the stream at most one record more: the rest is refused
    // rather than buffered.
    assert!(
        sent < 8192 + 2 * 16384,
        "accepted {sent} bytes the peer never read"
    );
    assert!(s.idle_memory() <= 16384 + 512, "{}", s.idle_memory());
}

#[test]
fn the_stream_is_small() {
    let size = std::mem::size_of::<ServerTlsStream<End>>();
    println!("ServerTlsStream<End>: {size} bytes");
    assert!(size < 2048, "{size}");
}
