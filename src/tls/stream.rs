//! A server-side TLS stream on rustls' *unbuffered* API, where this module owns the TLS byte
//! buffers so that an idle connection holds none of them.
//!
//! Why: the buffered `rustls::ServerConnection` keeps a ≥4 KiB deframer buffer allocated for
//! the life of the connection, even when empty; with a boxed `futures_rustls` stream around it
//! an idle mutual-TLS connection cost ~14 KiB. Here the incoming TLS bytes are read into a
//! stack buffer and processed from there; only an incomplete record (or handshake message) is
//! copied to the heap, and that buffer is released as soon as it is consumed. Outgoing TLS bytes
//! and decrypted plaintext the caller has not read yet are likewise held only until they are
//! sent or read. The write side accepts at most one record's worth of plaintext while earlier
//! TLS bytes are still unsent (backpressure).
//!
//! Owns: driving an `UnbufferedServerConnection` over any `futures_lite` `AsyncRead +
//! AsyncWrite` (the handshake in [`accept`], then records both ways in [`ServerTlsStream`]),
//! sending alerts and close_notify. Must not touch: sockets or the runtime (no glommio here —
//! the shard hands in its socket), MQTT, or TLS policy (that is [`super::build_server_config`]).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};
use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    AppDataRecord, ConnectionState, EncodeError, EncryptError, InsufficientSizeError,
    UnbufferedStatus,
};
use rustls::{HandshakeKind, ServerConfig};

use super::identity::{client_identity, ClientIdentity};

/// Bytes asked of the transport per read. They land on the stack, so the size costs nothing
/// while a connection is idle; it is large enough for most records in one read.
const READ_CHUNK: usize = 8 * 1024;

/// Plaintext encrypted per write call: one maximum-size TLS record.
const MAX_PLAINTEXT_PER_WRITE: usize = 16 * 1024;

/// Largest TLS record on the wire (TLS 1.2 allows 2048 bytes of expansion over the 16 KiB
/// plaintext limit), plus its 5-byte header.
const MAX_RECORD: usize = 5 + 16 * 1024 + 2048;

/// Incoming bytes we keep while waiting for the rest of a record. rustls rejects an
/// oversized record header as soon as it sees it, so this is only a backstop.
const MAX_INCOMING: usize = MAX_RECORD + READ_CHUNK;

/// Why [`accept`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The TLS handshake failed (the alert, if any, was sent); classify it with
    /// [`super::HandshakeFailure::classify`].
    #[error("TLS handshake failed: {0}")]
    Tls(rustls::Error),
    /// The transport failed or ended before the handshake completed.
    #[error("transport failed during the TLS handshake: {0}")]
    Io(io::Error),
}

impl AcceptError {
    /// The rustls error, if the handshake itself failed.
    pub fn tls_error(&self) -> Option<&rustls::Error> {
        match self {
            AcceptError::Tls(e) => Some(e),
            AcceptError::Io(_) => None,
        }
    }
}

/// A server TLS connection after its handshake: plaintext in and out via `AsyncRead` /
/// `AsyncWrite`.
pub struct ServerTlsStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// Received TLS bytes not yet consumed by rustls (an incomplete record). Empty when idle.
    incoming: Vec<u8>,
    /// Encrypted TLS bytes not yet written to `io`; `out_sent` of them are already written.
    outgoing: Vec<u8>,
    out_sent: usize,
    /// Decrypted plaintext not yet read by the caller; `plain_pos` of it already read.
    plain: Vec<u8>,
    plain_pos: usize,
    identity: Option<ClientIdentity>,
    /// A fatal TLS error; the connection is unusable (its alert is in `outgoing`).
    failed: Option<rustls::Error>,
    /// The peer sent close_notify.
    peer_closed: bool,
    /// The transport reached end of stream.
    eof: bool,
    close_queued: bool,
    /// `outgoing` holds post-handshake messages (at most a few hundred bytes) that the next
    /// write may join instead of waiting for them to be sent first.
    join_queued: bool,
}

/// What [`ServerTlsStream::process`] should do once rustls allows sending application data.
enum Action<'a> {
    None,
    Encrypt(&'a [u8]),
    CloseNotify,
}

/// Runs the server handshake over `io` with a connection from `config`. The server's
/// post-handshake messages (TLS 1.3 session tickets) are flushed before returning, unless the
/// client's first application data arrived with its Finished (an MQTT client sends CONNECT at
/// once): then they stay queued and leave in one write with the first reply (CONNACK), which
/// saves a send, and the wake-up of the client it causes, per handshake.
pub async fn accept<IO>(
    config: Arc<ServerConfig>,
    io: IO,
) -> Result<ServerTlsStream<IO>, AcceptError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(AcceptError::Tls)?;
    let mut s = ServerTlsStream {
        io,
        conn,
        incoming: Vec::new(),
        outgoing: Vec::new(),
        out_sent: 0,
        plain: Vec::new(),
        plain_pos: 0,
        identity: None,
        failed: None,
        peer_closed: false,
        eof: false,
        close_queued: false,
        join_queued: false,
    };
    loop {
        if !s.conn.is_handshaking() && s.failed.is_none() && s.plain_pos < s.plain.len() {
            s.join_queued = true;
            break;
        }
        let flushed = poll_fn(|cx| s.poll_flush_out(cx)).await;
        if let Some(e) = s.failed.take() {
            // The alert went out (or the transport failed first); the TLS error is the news.
            return Err(AcceptError::Tls(e));
        }
        flushed.map_err(AcceptError::Io)?;
        if !s.conn.is_handshaking() {
            break;
        }
        if s.peer_closed || s.eof {
            return Err(AcceptError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let n = poll_fn(|cx| s.poll_ingest(cx))
            .await
            .map_err(AcceptError::Io)?;
        if n == 0 {
            s.eof = true;
        }
    }
    s.identity = s.conn.peer_certificates().and_then(client_identity);
    Ok(s)
}

impl<IO> ServerTlsStream<IO> {
    /// The client's certificate identity, extracted once the handshake completed.
    pub fn client_identity(&self) -> Option<&ClientIdentity> {
        self.identity.as_ref()
    }

    /// Moves the client's identity out (the runtime keeps it elsewhere; no second copy).
    pub fn take_client_identity(&mut self) -> Option<ClientIdentity> {
        self.identity.take()
    }

    /// The client's certificate chain, leaf first (kept by rustls for the connection's life).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Whether the handshake was full or resumed.
    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.conn.handshake_kind()
    }

    /// The negotiated protocol version.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// Heap bytes held by this stream's own buffers (not rustls' internals). Zero when idle.
    pub fn idle_memory(&self) -> usize {
        self.incoming.capacity() + self.outgoing.capacity() + self.plain.capacity()
    }

    /// The transport.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Feeds `data` (freshly received TLS bytes) to rustls, appending output and plaintext
    /// to our buffers. A fatal error lands in `self.failed` with its alert queued.
    fn ingest(&mut self, data: &mut [u8]) {
        if self.incoming.is_empty() {
            // Common case: process straight from the caller's (stack) buffer and keep only
            // the incomplete tail.
            let used = self.process(data, Action::None).0;
            self.keep_tail(&data[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.incoming);
            buf.extend_from_slice(data);
            let used = self.process(&mut buf, Action::None).0;
            if used == buf.len() {
                // Consumed: the buffer goes back to the allocator (idle connections hold none).
            } else {
                buf.drain(..used);
                self.incoming = buf;
            }
        }
        if self.incoming.len() > MAX_INCOMING && self.failed.is_none() {
            // Not reachable with rustls' own length checks; never buffer without bound.
            self.failed = Some(rustls::Error::General("TLS record too large".into()));
        }
    }

    /// Keeps an incomplete record, reserving room for all of it when its header says how big.
    fn keep_tail(&mut self, tail: &[u8]) {
        if tail.is_empty() {
            return;
        }
        let want = if tail.len() >= 5 {
            (5 + u16::from_be_bytes([tail[3], tail[4]]) as usize).clamp(tail.len(), MAX_RECORD)
        } else {
            tail.len()
        };
        self.incoming.reserve_exact(want);
        self.incoming.extend_from_slice(tail);
    }

    /// Runs rustls over `buf` until it needs more input, encoding whatever it wants to send
    /// into `outgoing` and moving decrypted records into `plain`. Returns the bytes of `buf`
    /// consumed and whether `action` was carried out.
    fn process(&mut self, buf: &mut [u8], mut action: Action<'_>) -> (usize, bool) {
        let mut used = 0;
        let mut done = false;
        // Each pass either consumes input, moves output, or returns; the bound only guards
        // against a rustls state we do not understand looping forever.
        for _ in 0..10_000 {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut buf[used..]);
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    used += discard;
                    self.fail(e, &mut buf[used..]);
                    return (used, done);
                }
            };
            let mut err = None;
            match state {
                ConnectionState::ReadTraffic(mut r) => {
                    if self.plain_pos == self.plain.len() {
                        self.plain.clear();
                        self.plain_pos = 0;
                    }
                    while let Some(rec) = r.next_record() {
                        match rec {
                            Ok(AppDataRecord { payload, .. }) => {
                                self.plain.extend_from_slice(payload)
                            }
                            Err(e) => {
                                err = Some(e);
                                break;
                            }
                        }
                    }
                }
                ConnectionState::ReadEarlyData(mut r) => {
                    // Early data is off in our configs (max_early_data_size = 0); drop it.
                    while let Some(rec) = r.next_record() {
                        if rec.is_err() {
                            break;
                        }
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    if let Err(x) =
                        grow_and_retry(&mut self.outgoing, |out| e.encode(out), encode_size)
                    {
                        err = Some(x);
                    }
                }
                ConnectionState::TransmitTlsData(t) => {
                    // Sent by the caller's next flush; rustls needs nothing back.
                    t.done();
                }
                ConnectionState::WriteTraffic(mut w) => {
                    used += discard;
                    let r = match std::mem::replace(&mut action, Action::None) {
                        Action::None => return (used, done),
                        Action::Encrypt(data) => grow_and_retry(
                            &mut self.outgoing,
                            |out| w.encrypt(data, out),
                            encrypt_size,
                        ),
                        Action::CloseNotify => grow_and_retry(
                            &mut self.outgoing,
                            |out| w.queue_close_notify(out),
                            encrypt_size,
                        ),
                    };
                    match r {
                        Ok(()) => done = true,
                        Err(e) => {
                            self.fail(e, &mut buf[used..]);
                            return (used, done);
                        }
                    }
                    continue;
                }
                ConnectionState::BlockedHandshake => {
                    used += discard;
                    return (used, done);
                }
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    used += discard;
                    return (used, done);
                }
                _ => err = Some(rustls::Error::General("unexpected TLS state".into())),
            }
            used += discard;
            if let Some(e) = err {
                self.fail(e, &mut buf[used..]);
                return (used, done);
            }
        }
        self.fail(
            rustls::Error::General("TLS state machine did not settle".into()),
            &mut buf[used..],
        );
        (used, done)
    }

    /// Records a fatal error and moves the alert rustls queued for it into `outgoing`.
    fn fail(&mut self, e: rustls::Error, buf: &mut [u8]) {
        if self.failed.is_none() {
            self.failed = Some(e);
        }
        // After an error rustls hands out what it still has to send (the alert) before it
        // looks at input again. Only ask while it has output: a call that reaches the input
        // would process the failed records a second time.
        let mut guard = 0;
        while self.conn.wants_write() && guard < 64 {
            guard += 1;
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(buf);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    if grow_and_retry(&mut self.outgoing, |out| enc.encode(out), encode_size)
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                Ok(ConnectionState::ReadTraffic(mut r)) => while r.next_record().is_some() {},
                _ => return,
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ServerTlsStream<IO> {
    /// Reads once from the transport and processes what arrived. `Ok(0)` is end of stream.
    fn poll_ingest(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut tmp = [0u8; READ_CHUNK];
        let n = ready!(Pin::new(&mut self.io).poll_read(cx, &mut tmp))?;
        if n > 0 {
            self.ingest(&mut tmp[..n]);
        }
        Poll::Ready(Ok(n))
    }

    /// Writes all of `outgoing` to the transport, then releases it.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.out_sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_sent += n;
        }
        if self.out_sent > 0 || self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
            self.out_sent = 0;
        }
        Poll::Ready(Ok(()))
    }

    fn failed_io(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|e| io::Error::new(io::ErrorKind::InvalidData, e.clone()))
    }

    /// Runs `action` once rustls can send application data (processing any buffered input
    /// first, which cannot complete a record: `ingest` already consumed all complete ones).
    fn act(&mut self, action: Action<'_>) -> bool {
        let mut buf = std::mem::take(&mut self.incoming);
        let (used, done) = self.process(&mut buf, action);
        if used < buf.len() {
            buf.drain(..used);
            self.incoming = buf;
        }
        done
    }
}

/// Calls `f` on the spare room of `out`, growing it to what rustls says it needs.
fn grow_and_retry<E>(
    out: &mut Vec<u8>,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(E) -> Result<usize, rustls::Error>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    for _ in 0..3 {
        let room = out.capacity() - start;
        out.resize(start + room, 0);
        match f(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => {
                out.truncate(start);
                out.reserve_exact(required(e)?);
            }
        }
    }
    out.truncate(start);
    Err(rustls::Error::General(
        "TLS output buffer sizing failed".into(),
    ))
}

fn encode_size(e: EncodeError) -> Result<usize, rustls::Error> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => Ok(required_size),
        EncodeError::AlreadyEncoded => {
            Err(rustls::Error::General("TLS data already encoded".into()))
        }
    }
}

fn encrypt_size(e: EncryptError) -> Result<usize, rustls::Error> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Ok(required_size)
        }
        _ => Err(rustls::Error::EncryptError),
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerTlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.plain_pos < this.plain.len() {
                let n = buf.len().min(this.plain.len() - this.plain_pos);
                buf[..n].copy_from_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                if this.plain_pos == this.plain.len() {
                    // Read out: release it (an idle connection holds no plaintext buffer).
                    this.plain = Vec::new();
                    this.plain_pos = 0;
                }
                return Poll::Ready(Ok(n));
            }
            // Alerts, key-update replies: send them along without blocking the read.
            if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
                if this.failed.is_none() {
                    return Poll::Ready(Err(e));
                }
            }
            if let Some(e) = this.failed_io() {
                return Poll::Ready(Err(e));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(0));
            }
            if this.eof {
                // No close_notify: the peer (or something in between) cut the stream.
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            if ready!(this.poll_ingest(cx))? == 0 {
                this.eof = true;
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerTlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.failed_io() {
            return Poll::Ready(Err(e));
        }
        // Backpressure: nothing new is accepted until the previous record is on its way;
        // except the tickets `accept` left queued, which go out together with this record.
        if !std::mem::take(&mut this.join_queued) {
            ready!(this.poll_flush_out(cx))?;
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_queued {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(MAX_PLAINTEXT_PER_WRITE);
        if !this.act(Action::Encrypt(&buf[..n])) {
            return Poll::Ready(Err(this.failed_io().unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotConnected, "TLS connection not writable")
            })));
        }
        // Start sending now; if the transport is full, the next write or flush waits.
        if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued && this.failed.is_none() {
            this.close_queued = true;
            this.act(Action::CloseNotify);
        }
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.io).poll_close(cx)
    }
}
