//! The connection task: bytes in, packets to the core, packets out, bytes out.
//!
//! Owns: one client connection from accept to close: the CONNECT phase (timeout, version,
//! authentication — `crate::auth` decides, PBKDF2 runs on the blocking pool —, the will's
//! write check, client-id rules), then the loop that reads into a buffer, decodes every
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
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use bytestring::ByteString;
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::driver::{ConnHandle, Shard};
use crate::auth::{ConnectCredentials, ConnectStep, ListenerSecurity, PasswordFile};
use crate::codec::{
    self, ConnAck, ConnAckProperties, Connect, DecodeError, Limits, Packet, ProtocolVersion,
    ReasonCode,
};
use crate::metrics::RefuseCause;
use crate::shardcore::{ConnAuth, ConnKey, ConnectRequest};
use crate::tls::{resolve_username, ClientIdentity, UsernameOutcome, UsernameRule};

/// Bytes asked of the socket per read in the session loop (the shard's read scratch size).
pub(crate) const READ_CHUNK: usize = 16 * 1024;

/// Read size of the CONNECT phase (CONNECT packets are small: start small, grow if needed).
const CONNECT_READ_CHUNK: usize = 128;

/// Read size of the CONNECT phase once a CONNECT turned out bigger than the first read.
const CONNECT_MORE_CHUNK: usize = 4096;

/// Refusal CONNACKs get this long to reach a client that does not read.
const REFUSE_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Read more bytes into `buf` (CONNECT phase); `Ok(0)` is end of stream.
async fn read_some<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> std::io::Result<usize> {
    let chunk = if buf.is_empty() {
        CONNECT_READ_CHUNK
    } else {
        CONNECT_MORE_CHUNK
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

/// The connection's span: the explicit parent of this task's own lines, so grep on a client id
/// or an address finds one device's story. Made when a line is written, not held for the
/// connection's life: a live span cost ~480 bytes per connection (the subscriber's registry
/// slot and its formatted fields), over 5% of an idle TLS device.
fn conn_span(shard: usize, peer: Option<SocketAddr>, client: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        "conn",
        shard,
        peer = tracing::field::display(PeerAddr(peer)),
        client = tracing::field::Empty
    );
    if let Some(c) = client {
        span.record("client", tracing::field::display(crate::logging::escape(c)));
    }
    span
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
    /// Index of the configured listener (`None`: a shard's diagnostic listener, which has
    /// no security files).
    pub listener: Option<usize>,
}

/// Serve one accepted connection until it closes: `start` yields the stream to speak MQTT on
/// (after the TLS handshake, if any) and who may connect on it; `guard` is held until the
/// end (the driver's connection count).
///
/// Not an `async fn`: an async fn keeps its arguments in its future for its whole life, even
/// once they are moved out. Here the start and CONNECT phases own them in one box, freed when
/// the session starts, so the future an idle connection keeps holds only the session loop
/// and a few words; every byte of it is paid per connected device.
pub(crate) fn serve<S, P, G>(
    shard: Rc<Shard>,
    start: P,
    peer: Option<SocketAddr>,
    guard: G,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    P: std::future::Future<Output = Option<(S, Auth)>>,
{
    let connect = Box::pin(async move {
        let (mut io, auth) = start.await?;
        let mut rbuf = BytesMut::new();
        let a = admit(&shard, &mut io, &mut rbuf, auth, peer).await?;
        Some((shard, io, rbuf, a))
    });
    async move {
        let _guard = guard;
        let Some((shard, mut io, rbuf, a)) = connect.await else {
            return;
        };
        run_session(&shard, &mut io, rbuf, &a, peer).await;
        let now = Instant::now();
        shard.forget_conn(a.key);
        shard.core.borrow_mut().handle_conn_closed(a.key, now);
        shard.after_input();
    }
}

/// What the CONNECT phase hands to the session loop.
struct Admitted {
    key: ConnKey,
    version: ProtocolVersion,
    max_packet_size: u32,
    handle: Rc<ConnHandle>,
    /// For this task's own log lines (shares the session's copy of the bytes).
    client_id: ByteString,
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

/// The session loop: until the connection ends, feed the core what arrives and write what it
/// releases.
///
/// Output is encoded into the shard's scratch buffer and written from there in the same poll,
/// so the usual case (the socket takes everything) copies and allocates nothing per write;
/// only bytes the socket refused move to this connection's own buffer (`wbuf`), which is
/// empty, and unallocated, otherwise. Reads land in the shard's read scratch and only the bytes
/// that arrived are appended to `rbuf`. Neither scratch buffer holds anything across an await.
async fn run_session<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Shard,
    io: &mut S,
    mut rbuf: BytesMut,
    a: &Admitted,
    peer: Option<SocketAddr>,
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
    // Complete packets may wait in `rbuf` because the core paused this connection's input.
    let mut undecoded = !rbuf.is_empty();
    loop {
        // A connection with a long stream of work (a big backlog to a fast reader) must not
        // keep its shard's other tasks waiting.
        glommio::yield_if_needed().await;
        // 1. Decode what a pause left buffered, if input may continue now.
        if undecoded && !shard.core.borrow().input_paused(key) {
            undecoded = feed(shard, key, a.version, &limits, &mut rbuf);
        }
        // 2. Take what the core releases, unless the previous batch is still being written
        //    (the core keeps the rest; its bound on unsent QoS 0 relies on that). It is encoded
        //    into the shard's scratch buffer, written in the first poll below.
        let (close, paused, mut encoded) = {
            let mut core = shard.core.borrow_mut();
            let mut encoded = false;
            if wbuf.is_empty() {
                let now = Instant::now();
                let mut out = shard.scratch.borrow_mut();
                debug_assert!(out.is_empty(), "scratch lent across an await");
                while let Some(p) = core.poll_transmit(key, now) {
                    codec::encode(&p, a.version, &mut out);
                }
                encoded = !out.is_empty();
                more = core.take_more_after_write(key);
            }
            (core.wants_close(key), core.input_paused(key), encoded)
        };
        // 3. Wait for the socket or a wake-up; write as much as the socket takes meanwhile.
        let wake = poll_fn(|cx| {
            if std::mem::take(&mut encoded) {
                // First poll, no await since step 2: the scratch holds this connection's
                // bytes. Write them from there; keep only what the socket refused.
                let mut out = shard.scratch.borrow_mut();
                let mut off = 0;
                let mut gone = false;
                while off < out.len() {
                    match Pin::new(&mut *io).poll_write(cx, &out[off..]) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                            gone = true;
                            break;
                        }
                        Poll::Ready(Ok(n)) => off += n,
                        Poll::Pending => break,
                    }
                }
                if !gone && off < out.len() {
                    wbuf.extend_from_slice(&out[off..]);
                }
                out.clear();
                if gone {
                    return Poll::Ready(Wake::Gone);
                }
                if !wbuf.is_empty() && !write_stalled {
                    write_stalled = true;
                    stall_changed(shard, key, true);
                }
            }
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
                    // Written: an idle connection keeps no write buffer.
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
                let mut scratch = shard.read_scratch.borrow_mut();
                match Pin::new(&mut *io).poll_read(cx, &mut scratch[..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Wake::Gone),
                    Poll::Ready(Ok(n)) => {
                        rbuf.extend_from_slice(&scratch[..n]);
                        return Poll::Ready(Wake::Read);
                    }
                    Poll::Pending => {}
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
                undecoded = feed(shard, key, a.version, &limits, &mut rbuf);
            }
            Wake::Notified => {}
            Wake::Gone => {
                debug!(
                    parent: &conn_span(shard.id, peer, Some(&a.client_id)),
                    "connection closed by the peer or failed"
                );
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

/// Decode every complete packet in `rbuf` for the core, as long as it accepts input. True if
/// it stopped because the core paused this connection's input with bytes still buffered (they
/// are decoded once the pause ends).
fn feed(
    shard: &Shard,
    key: ConnKey,
    version: ProtocolVersion,
    limits: &Limits,
    rbuf: &mut BytesMut,
) -> bool {
    let mut stopped_by_pause = false;
    {
        let mut core = shard.core.borrow_mut();
        let now = Instant::now();
        loop {
            if core.input_paused(key) {
                stopped_by_pause = !rbuf.is_empty();
                break;
            }
            match codec::decode(rbuf, version, limits) {
                Ok(Some(packet)) => core.handle_packet(key, packet, now),
                Ok(None) => break,
                Err(e) => {
                    debug!(shard = shard.id, "decode error: {e}");
                    core.handle_decode_error(key, e.reason_code(), now);
                    rbuf.clear();
                    break;
                }
            }
        }
    }
    shard.after_input();
    stopped_by_pause
}

/// The CONNECT phase: read CONNECT, apply admission rules, register with the home shard and
/// install the session. `None` if the client was refused or went away.
async fn admit<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Rc<Shard>,
    io: &mut S,
    rbuf: &mut BytesMut,
    auth: Auth,
    peer: Option<SocketAddr>,
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

    // Admission: identity, password and anonymous policy (mosquitto's rules, crate::auth),
    // limits, client-id rules.
    let security = auth
        .listener
        .and_then(|i| shard.shared.listeners.get(i))
        .map(|l| &l.security);
    let (username, password) = match resolve_username(
        auth.rule,
        auth.identity.as_ref(),
        connect.username.as_deref(),
    ) {
        Ok(outcome) => match authenticate(shard, security, &auth, &connect, &outcome).await {
            Ok(password) => {
                let name = match outcome {
                    UsernameOutcome::Certificate(name) => Some(name),
                    UsernameOutcome::Client(name) => name.map(str::to_owned),
                };
                (name, password)
            }
            Err(why) => {
                refuse(
                    shard,
                    io,
                    &mut wbuf,
                    Refused::ConnAck(version, why.0, why.1),
                )
                .await;
                return None;
            }
        },
        Err(e) => {
            // The error quotes the certificate's subject: peer-chosen text.
            warn!(
                parent: &conn_span(shard.id, peer, None),
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
    // The will, with the id actually used: a client whose will could never be published is
    // told at once (mosquitto checks only at publication, which the core does too).
    if let (Some(sec), Some(w)) = (security, &connect.will) {
        let view = sec.access_view();
        let action = crate::auth::Action::Will {
            topic: w.topic.as_str(),
            qos: w.qos,
            retain: w.retain,
        };
        let client = crate::auth::Client {
            client_id: &client_id,
            username: username.as_deref(),
        };
        if let crate::auth::Decision::Deny(reason) = view.authorize(client, &action) {
            if sec.acl_file.is_some() {
                info!(
                    peer = ?peer,
                    "connection of {} (u'{}') refused: will topic '{}': {reason}",
                    crate::logging::escape(&client_id),
                    crate::logging::escape(username.as_deref().unwrap_or("")),
                    crate::logging::escape(w.topic.as_str())
                );
                let r = Refused::ConnAck(
                    version,
                    ReasonCode::NOT_AUTHORIZED,
                    "will topic not authorized",
                );
                refuse(shard, io, &mut wbuf, r).await;
                return None;
            }
        }
    }

    let req = ConnectRequest {
        connect,
        client_id: client_id.clone(),
        config: *cfg,
        username: username.map(ByteString::from),
        peer,
        auth: auth
            .listener
            .map(|listener| ConnAuth { listener, password }),
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
        client_id,
    })
}

/// The CONNACK reason and the log text of a refused login.
struct LoginRefused(ReasonCode, &'static str);

/// Decide the login (crate::auth::policy): `Ok(password file)` if admitted (the file version a
/// password was checked against, for the reload re-check). PBKDF2 runs on the blocking pool,
/// at most `MAX_VERIFYING` per shard; a success is cached per shard.
async fn authenticate(
    shard: &Shard,
    security: Option<&ListenerSecurity>,
    auth: &Auth,
    connect: &Connect,
    outcome: &UsernameOutcome<'_>,
) -> Result<Option<Arc<PasswordFile>>, LoginRefused> {
    let Some(sec) = security else {
        // A diagnostic shard listener: only the anonymous rule.
        return if auth.allow_anonymous || matches!(outcome, UsernameOutcome::Certificate(_)) {
            Ok(None)
        } else {
            Err(LoginRefused(
                ReasonCode::NOT_AUTHORIZED,
                "anonymous clients are not allowed on this listener",
            ))
        };
    };
    let (credentials, username) = match outcome {
        UsernameOutcome::Certificate(name) => (
            ConnectCredentials::Certificate { username: name },
            name.as_str(),
        ),
        UsernameOutcome::Client(name) => (
            ConnectCredentials::Client {
                username: *name,
                password: connect.password.as_deref(),
            },
            name.unwrap_or(""),
        ),
    };
    let identity = auth
        .identity
        .as_ref()
        .map(|i| crate::auth::identity::CertIdentity {
            common_name: i.common_name.as_deref(),
            subject: &i.subject,
        });
    // Recorded before the check: if a reload lands in between, the re-check compares against
    // the older version and at worst disconnects a client whose entry changed anyway.
    let file = match credentials {
        ConnectCredentials::Client {
            username: Some(_), ..
        } => sec.password_file.as_ref().map(|f| f.current()),
        _ => None,
    };
    let step = sec.begin_connect(
        &connect.client_id,
        credentials,
        identity,
        &mut shard.verify_cache.borrow_mut(),
    );
    let step = match step {
        ConnectStep::Verify(job) => {
            let verify = async {
                let _slot = shard.verify_slots.acquire_permit(1).await.ok()?;
                Some(glommio::executor().spawn_blocking(move || job.run()).await)
            };
            // Bounded like the CONNECT itself: a backlog of checks refuses instead of waiting.
            let verified = future::or(verify, async {
                glommio::timer::sleep(shard.shared.cfg.connect_timeout).await;
                None
            })
            .await;
            let Some(verified) = verified else {
                warn!(
                    shard = shard.id,
                    "connection of {} refused (0x88): password checks backed up past the \
                     connect timeout",
                    crate::logging::escape(&connect.client_id)
                );
                return Err(LoginRefused(
                    ReasonCode::SERVER_UNAVAILABLE,
                    "password check not done in time",
                ));
            };
            verified.finish(&mut shard.verify_cache.borrow_mut())
        }
        step => step,
    };
    match step {
        ConnectStep::Accept => Ok(file),
        ConnectStep::Refuse(r) => {
            info!(
                shard = shard.id,
                "connection of {} (u'{}') refused ({}): {r}",
                crate::logging::escape(&connect.client_id),
                crate::logging::escape(username),
                r.reason_code()
            );
            Err(LoginRefused(r.reason_code(), "not authorized"))
        }
        ConnectStep::Verify(_) => Err(LoginRefused(
            ReasonCode::UNSPECIFIED_ERROR,
            "unexpected verification step",
        )),
    }
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
            let ack = Packet::ConnAck(Box::new(ConnAck {
                session_present: false,
                reason,
                properties: ConnAckProperties::default(),
            }));
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
