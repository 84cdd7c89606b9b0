//! The connection task: bytes in, packets to the core, packets out, bytes out.
//!
//! Owns: one client connection from accept to close: the CONNECT phase (timeout, version,
//! anonymous policy, client-id rules), then the loop that reads into a buffer, decodes every
//! complete packet for the shard core, and writes everything the core releases for this
//! connection in one write per wake-up. Must not touch: protocol rules beyond CONNECT
//! admission (the session decides), routing or takeover (the core decides).
//!
//! The session loop never spins: each turn awaits the socket (readable, or writable while a
//! write is pending) or the connection's wake-up, and nothing else; there is no timer per
//! connection (keepalive and every other timeout live in the core's one timer per shard).
//! A read is only attempted while the core accepts input from this connection (a paused
//! publisher is not read: TCP pushes back on it), and the read buffer is released whenever
//! it holds no partial packet, so an idle connection keeps no buffers.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use bytestring::ByteString;
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use super::driver::{ConnHandle, Shard};
use crate::codec::{
    self, ConnAck, ConnAckProperties, Connect, DecodeError, Limits, Packet, ProtocolVersion,
    ReasonCode,
};
use crate::metrics::RefuseCause;
use crate::shardcore::{ConnKey, ConnectRequest};
use crate::tls::{resolve_username, ClientIdentity, UsernameOutcome, UsernameRule};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 4096;

/// Read size of the CONNECT phase (CONNECT packets are small: start small, grow if needed).
const CONNECT_READ_CHUNK: usize = 128;

/// Refusal CONNACKs get this long to reach a client that does not read.
const REFUSE_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Read more bytes into `buf` (CONNECT phase); `Ok(0)` is end of stream.
async fn read_some<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> std::io::Result<usize> {
    let chunk = if buf.is_empty() {
        CONNECT_READ_CHUNK
    } else {
        READ_CHUNK
    };
    let start = grow(buf, chunk);
    let r = io.read(&mut buf[start..]).await;
    buf.truncate(start + *r.as_ref().unwrap_or(&0));
    r
}

/// Make room for one read of `chunk` bytes; returns where the new bytes go. The caller
/// truncates to what was read, also when the read did not complete (a pending read must not
/// leave zeros behind).
fn grow(buf: &mut BytesMut, chunk: usize) -> usize {
    let start = buf.len();
    buf.resize(start + chunk, 0);
    start
}

/// Why the CONNECT phase ended without a session.
enum Refused {
    /// Close silently (garbage, timeout, not a CONNECT [MQTT-3.1.0-1]).
    Close(RefuseCause, &'static str),
    /// Answer with a CONNACK carrying this reason, then close.
    ConnAck(ProtocolVersion, ReasonCode, &'static str),
}

async fn read_connect<S: AsyncRead + Unpin>(
    shard: &Shard,
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<Box<Connect>, Refused> {
    let limits = Limits {
        max_packet_size: shard.shared.cfg.session.max_packet_size,
    };
    let read = async {
        loop {
            match codec::decode(buf, ProtocolVersion::V311, &limits) {
                Ok(Some(Packet::Connect(c))) => return Ok(c),
                Ok(Some(_)) => {
                    return Err(Refused::Close(
                        RefuseCause::BadConnect,
                        "first packet is not CONNECT",
                    ))
                }
                Ok(None) => {}
                Err(DecodeError::UnsupportedProtocolVersion { .. }) => {
                    // [MQTT-3.1.2-2]: CONNACK return code 1 / reason 0x84, in the v3 form
                    // every client version can read.
                    return Err(Refused::ConnAck(
                        ProtocolVersion::V311,
                        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                        "unsupported protocol version",
                    ));
                }
                Err(e) => {
                    debug!("bad CONNECT: {e}");
                    return Err(Refused::Close(RefuseCause::BadConnect, "malformed CONNECT"));
                }
            }
            match read_some(io, buf).await {
                Ok(0) | Err(_) => {
                    return Err(Refused::Close(
                        RefuseCause::BadConnect,
                        "closed before CONNECT",
                    ))
                }
                Ok(_) => {}
            }
        }
    };
    future::or(read, async {
        glommio::timer::sleep(shard.shared.cfg.connect_timeout).await;
        Err(Refused::Close(
            RefuseCause::ConnectTimeout,
            "no CONNECT within the connect timeout",
        ))
    })
    .await
}

/// A peer address as a span field (`-` if the socket had none).
struct PeerAddr(Option<SocketAddr>);

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("-"),
        }
    }
}

/// Who may connect on this connection's listener, and what TLS said about the client.
pub(crate) struct Auth {
    pub allow_anonymous: bool,
    /// The listener's `max_qos`.
    pub max_qos: crate::codec::QoS,
    pub topic_alias_maximum: u16,
    pub rule: UsernameRule,
    /// The verified client certificate's identity, if the client sent one.
    pub identity: Option<ClientIdentity>,
}

/// Serve one accepted connection until it closes.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shard: Rc<Shard>,
    mut io: S,
    auth: Auth,
    peer: Option<SocketAddr>,
) {
    let mut rbuf = BytesMut::new();
    // The connection's span: the explicit parent of this task's lines (not entered on every
    // poll: that would cost on the message path), so grep on a client id or an address finds
    // one device's story. `client` is filled in once CONNECT is read, escaped.
    let span = tracing::info_span!(
        "conn",
        shard = shard.id,
        peer = tracing::field::display(PeerAddr(peer)),
        client = tracing::field::Empty
    );
    // Boxed: the CONNECT phase's state is large and short-lived; keeping it out of this
    // future keeps every idle connection small.
    let admitted = Box::pin(admit(&shard, &mut io, &mut rbuf, auth, peer, &span)).await;
    let Some(a) = admitted else { return };
    run_session(&shard, &mut io, rbuf, &a).await;
    let now = Instant::now();
    shard.forget_conn(a.key);
    shard.core.borrow_mut().handle_conn_closed(a.key, now);
    shard.after_input();
}

/// What the CONNECT phase hands to the session loop.
struct Admitted {
    key: ConnKey,
    version: ProtocolVersion,
    max_packet_size: u32,
    handle: Rc<ConnHandle>,
    span: tracing::Span,
}

/// What woke the session loop.
enum Wake {
    /// Bytes arrived (already appended to the read buffer).
    Read,
    /// The peer closed, or the socket failed.
    Gone,
    /// Everything is written and the core wants the connection closed.
    Done,
    /// The core has something new for this connection (output, input resumed).
    Notified,
}

/// The session loop: until the connection ends, write what the core releases and feed the
/// core what arrives.
async fn run_session<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Shard,
    io: &mut S,
    mut rbuf: BytesMut,
    a: &Admitted,
) {
    let key = a.key;
    let limits = Limits {
        max_packet_size: a.max_packet_size,
    };
    // Bytes encoded but not yet accepted by the socket; empty (no allocation) most of the time.
    let mut wbuf = BytesMut::new();
    let mut write_stalled = false;
    // More is due once the current batch is written (retained messages paced by progress).
    let mut more = false;
    loop {
        // A connection with a long stream of work (a big backlog to a fast reader) must not
        // keep its shard's other tasks waiting.
        glommio::yield_if_needed().await;
        // 1. Take what the core releases, unless the previous batch is still being written
        //    (the core keeps the rest; its bound on unsent QoS 0 relies on that).
        let (close, paused) = {
            let mut core = shard.core.borrow_mut();
            if wbuf.is_empty() {
                let now = Instant::now();
                let mut out = shard.scratch.borrow_mut();
                while let Some(p) = core.poll_transmit(key, now) {
                    codec::encode(&p, a.version, &mut out);
                }
                if !out.is_empty() {
                    wbuf = out.split();
                }
                more = core.take_more_after_write(key);
            }
            (core.wants_close(key), core.input_paused(key))
        };
        // 2. Decode what is already buffered if input may continue (a pause just ended).
        if !paused && !rbuf.is_empty() && feed(shard, key, a.version, &limits, &mut rbuf) {
            continue;
        }
        // 3. Wait for the socket or a wake-up; write as much as the socket takes meanwhile.
        let wake = poll_fn(|cx| {
            while !wbuf.is_empty() {
                match Pin::new(&mut *io).poll_write(cx, &wbuf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Wake::Gone),
                    Poll::Ready(Ok(n)) => {
                        wbuf.advance(n);
                        if write_stalled {
                            write_stalled = false;
                            stall_changed(shard, key, false);
                        }
                    }
                    Poll::Pending => {
                        if !write_stalled {
                            write_stalled = true;
                            stall_changed(shard, key, true);
                        }
                        break;
                    }
                }
            }
            if wbuf.is_empty() {
                if wbuf.capacity() > 0 {
                    // Written: give the buffer back so the next batch reuses its memory.
                    let mut scratch = shard.scratch.borrow_mut();
                    if scratch.capacity() < wbuf.capacity() {
                        std::mem::swap(&mut *scratch, &mut wbuf);
                        scratch.clear();
                    }
                    wbuf = BytesMut::new();
                }
                if close {
                    return Poll::Ready(Wake::Done);
                }
                if std::mem::take(&mut more) {
                    return Poll::Ready(Wake::Notified);
                }
            }
            if !paused {
                let start = grow(&mut rbuf, READ_CHUNK);
                match Pin::new(&mut *io).poll_read(cx, &mut rbuf[start..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        rbuf.truncate(start);
                        return Poll::Ready(Wake::Gone);
                    }
                    Poll::Ready(Ok(n)) => {
                        rbuf.truncate(start + n);
                        return Poll::Ready(Wake::Read);
                    }
                    Poll::Pending => rbuf.truncate(start),
                }
                if rbuf.is_empty() && rbuf.capacity() > 0 {
                    // No partial packet: an idle connection holds no read buffer.
                    rbuf = BytesMut::new();
                }
            }
            match a.handle.notify.poll_notified(cx) {
                Poll::Ready(()) => Poll::Ready(Wake::Notified),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match wake {
            Wake::Read => {
                feed(shard, key, a.version, &limits, &mut rbuf);
            }
            Wake::Notified => {}
            Wake::Gone => {
                debug!(parent: &a.span, "connection closed by the peer or failed");
                return;
            }
            Wake::Done => {
                let _ = future::or(async { io.close().await.ok() }, async {
                    glommio::timer::sleep(REFUSE_WRITE_TIMEOUT).await;
                    None
                })
                .await;
                return;
            }
        }
    }
}

/// Tell the core the socket stopped (or resumed) accepting bytes.
fn stall_changed(shard: &Shard, key: ConnKey, stalled: bool) {
    shard
        .core
        .borrow_mut()
        .handle_write_stalled(key, stalled, Instant::now());
    shard.after_input();
}

/// Decode every complete packet in `rbuf` for the core, as long as it accepts input; true if
/// any packet was handled.
fn feed(
    shard: &Shard,
    key: ConnKey,
    version: ProtocolVersion,
    limits: &Limits,
    rbuf: &mut BytesMut,
) -> bool {
    let mut handled = false;
    {
        let mut core = shard.core.borrow_mut();
        let now = Instant::now();
        while !core.input_paused(key) {
            match codec::decode(rbuf, version, limits) {
                Ok(Some(packet)) => {
                    core.handle_packet(key, packet, now);
                    handled = true;
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(shard = shard.id, "decode error: {e}");
                    core.handle_decode_error(key, e.reason_code(), now);
                    rbuf.clear();
                    handled = true;
                    break;
                }
            }
        }
    }
    shard.after_input();
    handled
}

/// The CONNECT phase: read CONNECT, apply admission rules, register with the home shard and
/// install the session. `None` if the client was refused or went away.
async fn admit<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Rc<Shard>,
    io: &mut S,
    rbuf: &mut BytesMut,
    auth: Auth,
    peer: Option<SocketAddr>,
    span: &tracing::Span,
) -> Option<Admitted> {
    let mut wbuf = BytesMut::new();
    shard.connecting.set(shard.connecting.get() + 1);
    let connect = read_connect(shard, io, rbuf).await;
    shard.connecting.set(shard.connecting.get() - 1);
    let connect = match connect {
        Ok(c) => c,
        Err(refused) => {
            refuse(shard, io, &mut wbuf, refused).await;
            return None;
        }
    };
    let version = connect.protocol;
    let cfg = &crate::session::SessionConfig {
        maximum_qos: auth.max_qos.min(shard.shared.cfg.session.maximum_qos),
        topic_alias_maximum: auth.topic_alias_maximum,
        ..shard.shared.cfg.session
    };

    // Admission: identity and anonymous policy (mosquitto's rules), limits, client-id rules.
    let username = match resolve_username(
        auth.rule,
        auth.identity.as_ref(),
        connect.username.as_deref(),
    ) {
        Ok(UsernameOutcome::Certificate(name)) => Some(name),
        Ok(UsernameOutcome::Client(name)) => {
            // Midge has no password database: on a listener that does not allow anonymous
            // clients, only a certificate identity admits a client.
            if !auth.allow_anonymous {
                let r = Refused::ConnAck(
                    version,
                    ReasonCode::NOT_AUTHORIZED,
                    "anonymous clients are not allowed on this listener",
                );
                refuse(shard, io, &mut wbuf, r).await;
                return None;
            }
            name.map(str::to_owned)
        }
        Err(e) => {
            // The error quotes the certificate's subject: peer-chosen text.
            warn!(
                parent: span,
                "connection refused: {}",
                crate::logging::escape(&e.to_string())
            );
            let r = Refused::ConnAck(
                version,
                ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                "no usable certificate identity",
            );
            refuse(shard, io, &mut wbuf, r).await;
            return None;
        }
    };
    if let Err(reason) = cfg.check_connect(&connect) {
        refuse(
            shard,
            io,
            &mut wbuf,
            Refused::ConnAck(version, reason, "CONNECT outside limits"),
        )
        .await;
        return None;
    }
    let key = shard.core.borrow_mut().next_conn_key();
    let client_id = if connect.client_id.is_empty() {
        if !connect.clean_start && !version.is_v5() {
            // [MQTT-3.1.3-8]: a zero-byte id needs clean session in 3.1.1 (and 3.1 has no
            // zero-byte ids at all).
            let r = Refused::ConnAck(
                version,
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                "empty client id without clean session",
            );
            refuse(shard, io, &mut wbuf, r).await;
            return None;
        }
        ByteString::from(format!("auto-{key:016x}"))
    } else {
        // Copied: the id lives as long as the session and must not pin the read buffer.
        ByteString::from(&*connect.client_id)
    };

    span.record(
        "client",
        tracing::field::display(crate::logging::escape(&client_id)),
    );
    let req = ConnectRequest {
        connect,
        client_id,
        config: *cfg,
        username: username.map(ByteString::from),
        peer,
    };
    let handle = shard.register_conn(key);
    shard
        .core
        .borrow_mut()
        .handle_connect(key, req, Instant::now());
    shard.after_input();
    Some(Admitted {
        key,
        version,
        max_packet_size: cfg.max_packet_size,
        handle,
        span: span.clone(),
    })
}

async fn refuse<S: AsyncWrite + Unpin>(
    shard: &Shard,
    io: &mut S,
    wbuf: &mut BytesMut,
    refused: Refused,
) {
    match refused {
        Refused::Close(cause, why) => {
            shard.counters().count_refusal(cause);
            debug!("connection refused: {why}");
        }
        Refused::ConnAck(version, reason, why) => {
            shard
                .counters()
                .count_refusal(RefuseCause::of_connack(reason.0));
            debug!("connection refused with CONNACK {reason}: {why}");
            let ack = Packet::ConnAck(ConnAck {
                session_present: false,
                reason,
                properties: ConnAckProperties::default(),
            });
            codec::encode(&ack, version, wbuf);
            let _ = future::or(
                async { io.write_all(wbuf).await.and(io.flush().await) },
                async {
                    glommio::timer::sleep(REFUSE_WRITE_TIMEOUT).await;
                    Ok(())
                },
            )
            .await;
        }
    }
}
