//! The connection task: bytes in, packets to the session, packets out, bytes out.
//!
//! Owns: one client connection from accept to close: the CONNECT phase (timeout, version,
//! anonymous policy, client-id rules, registration with the home shard), then the loop that
//! reads into a buffer, decodes every complete packet, drives the session, and writes
//! everything the session queued in one batched write per wake-up. Must not touch: protocol
//! rules beyond CONNECT admission (the session decides), routing decisions (the shard does).

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::runtime::{ConnLink, Shard, Slot};
use crate::codec::{
    self, ConnAck, ConnAckProperties, Connect, DecodeError, Limits, Packet, ProtocolVersion,
    ReasonCode,
};
use crate::logging::escape;
use crate::session::Session;
use crate::tls::{resolve_username, ClientIdentity, UsernameOutcome, UsernameRule};

/// Bytes asked of the socket per read. Small on purpose: an idle connection keeps no read
/// buffer at all (see `serve`), and MQTT device traffic is mostly small packets.
const READ_CHUNK: usize = 4096;

/// Read size of an idle connection (and of the CONNECT phase).
const IDLE_READ_CHUNK: usize = 128;

/// A connection with no traffic for this long releases its buffers.
const IDLE_TRIM_AFTER: Duration = Duration::from_secs(1);

enum Wake {
    Read(std::io::Result<usize>),
    Notified,
    Timer,
    Stop,
}

/// Shortest timer a connection task ever waits on. A deadline already in the past still
/// costs one real timer of this length, so the task always goes back to the reactor: a
/// deadline that fails to move forward degrades into a slow poll instead of a loop that never
/// yields and freezes the whole shard (glommio does not preempt tasks).
const MIN_TIMER: Duration = Duration::from_millis(1);

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => {
            let left = t.saturating_duration_since(Instant::now());
            glommio::timer::sleep(left.max(MIN_TIMER)).await;
        }
        None => future::pending::<()>().await,
    }
}

/// `fut`, or `TimedOut` if it does not finish within `limit`.
async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    future::or(fut, async {
        glommio::timer::sleep(limit).await;
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "peer stopped reading",
        ))
    })
    .await
}

/// Write all of `buf`. The timeout is on lack of progress: each write that the peer accepts
/// some bytes of restarts it, so a slow but steady reader gets a batch of any size, while one
/// that accepts nothing for `limit` is dropped. No timer is armed when the socket takes the
/// bytes at once (the common case).
async fn write_all<S: AsyncWrite + Unpin>(
    io: &mut S,
    buf: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let n = match future::poll_once(io.write(&buf[off..])).await {
            Some(r) => r?,
            None => within(limit, io.write(&buf[off..])).await?,
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        off += n;
    }
    match future::poll_once(io.flush()).await {
        Some(r) => r,
        None => within(limit, io.flush()).await,
    }
}

/// Read more bytes into `buf`; `Ok(0)` is end of stream.
async fn read_some<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> std::io::Result<usize> {
    // CONNECT packets are small: start small, grow only if a big one arrives.
    let chunk = if buf.is_empty() {
        IDLE_READ_CHUNK
    } else {
        READ_CHUNK
    };
    let start = grow(buf, chunk);
    let r = io.read(&mut buf[start..]).await;
    buf.truncate(start + *r.as_ref().unwrap_or(&0));
    r
}

/// Make room for one read of `chunk` bytes; returns where the new bytes go. The caller
/// truncates to what was read, also when the read was abandoned (cancelled reads must not
/// leave zeros behind).
fn grow(buf: &mut BytesMut, chunk: usize) -> usize {
    let start = buf.len();
    buf.resize(start + chunk, 0);
    start
}

/// Why the CONNECT phase ended without a session.
enum Refused {
    /// Close silently (garbage, timeout, not a CONNECT [MQTT-3.1.0-1]).
    Close(&'static str),
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
                Ok(Some(_)) => return Err(Refused::Close("first packet is not CONNECT")),
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
                    return Err(Refused::Close("malformed CONNECT"));
                }
            }
            match read_some(io, buf).await {
                Ok(0) | Err(_) => return Err(Refused::Close("closed before CONNECT")),
                Ok(_) => {}
            }
        }
    };
    future::or(read, async {
        glommio::timer::sleep(shard.shared.cfg.connect_timeout).await;
        Err(Refused::Close("no CONNECT within the connect timeout"))
    })
    .await
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
    // Boxed: the CONNECT phase's state is large and short-lived; keeping it out of this
    // future keeps every idle connection small.
    let admitted = Box::pin(admit(&shard, &mut io, &mut rbuf, auth, peer)).await;
    let Some(a) = admitted else { return };
    run_session(shard, &mut io, rbuf, a).await;
}

/// What the CONNECT phase hands to the session loop.
struct Admitted {
    key: u64,
    version: ProtocolVersion,
    max_packet_size: u32,
    link: Rc<ConnLink>,
    /// Broadcast sequence the first flush must wait for (see `Shard::wait_settled`).
    settle: Option<u64>,
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
    let wt = shard.shared.cfg.write_timeout;
    shard.connecting.set(shard.connecting.get() + 1);
    let connect = read_connect(shard, io, rbuf).await;
    shard.connecting.set(shard.connecting.get() - 1);
    let connect = match connect {
        Ok(c) => c,
        Err(refused) => {
            refuse(io, &mut wbuf, refused, wt).await;
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
                refuse(io, &mut wbuf, r, wt).await;
                return None;
            }
            name.map(str::to_owned)
        }
        Err(e) => {
            // The error quotes the certificate's subject: peer-chosen text.
            warn!(peer = ?peer, "connection refused: {}", escape(&e.to_string()));
            let r = Refused::ConnAck(
                version,
                ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                "no usable certificate identity",
            );
            refuse(io, &mut wbuf, r, wt).await;
            return None;
        }
    };
    if let Err(reason) = cfg.check_connect(&connect) {
        refuse(
            io,
            &mut wbuf,
            Refused::ConnAck(version, reason, "CONNECT outside limits"),
            wt,
        )
        .await;
        return None;
    }
    let key = shard.next_conn_key();
    let client_id = if connect.client_id.is_empty() {
        if !connect.clean_start && !version.is_v5() {
            // [MQTT-3.1.3-8]: a zero-byte id needs clean session in 3.1.1 (and 3.1 has no
            // zero-byte ids at all).
            let r = Refused::ConnAck(
                version,
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                "empty client id without clean session",
            );
            refuse(io, &mut wbuf, r, wt).await;
            return None;
        }
        ByteString::from(format!("auto-{key:016x}"))
    } else {
        // Copied: the id lives as long as the session and must not pin the read buffer.
        ByteString::from(&*connect.client_id)
    };

    // A peer that is not draining its control messages: refuse new work rather than queue
    // more behind it (the bound of the control backlog, see `mailbox`).
    if let Some((peer, backlog)) = shard.control_backlogged() {
        warn!(
            shard = shard.id,
            "CONNECT from {} refused (0x88): shard {peer} has {backlog} control messages \
             queued, above control_backlog_limit {}",
            escape(&client_id),
            shard.shared.cfg.control_backlog_limit
        );
        let r = Refused::ConnAck(version, ReasonCode::SERVER_UNAVAILABLE, "peer backlog");
        refuse(io, &mut wbuf, r, wt).await;
        return None;
    }
    // The home shard orders this connect against any other with the same id.
    let previous = match shard.register(client_id.clone(), key).await {
        Ok(p) => p,
        Err(None) => return None, // shutting down, or taken over by a newer connection
        Err(Some(home)) => {
            warn!(
                shard = shard.id,
                "CONNECT from {} refused (0x88): its home shard {home} did not answer within {:?}",
                escape(&client_id),
                shard.shared.cfg.peer_timeout
            );
            let r = Refused::ConnAck(version, ReasonCode::SERVER_UNAVAILABLE, "home shard");
            refuse(io, &mut wbuf, r, wt).await;
            return None;
        }
    };
    let now = Instant::now();
    // mosquitto's connect line, so operators (and tests) see the identity used.
    info!(
        "New client connected from {} as {} (p{}, c{}, k{}, u'{}') on shard {}",
        peer.map(|p| p.to_string()).unwrap_or_default(),
        escape(&client_id),
        version.level(),
        u8::from(connect.clean_start),
        connect.keep_alive,
        escape(username.as_deref().unwrap_or("")),
        shard.id
    );
    let moved_from = previous.as_ref().map(|t| t.from);
    let session = Session::accept(cfg, &connect, client_id, previous.map(|t| *t.state), now);
    drop(connect);
    let link = Rc::new(ConnLink::default());
    let seq_before = shard.broadcast_seq();
    {
        let mut st = shard.st.borrow_mut();
        st.sessions.insert(
            key,
            Slot {
                session: Box::new(session),
                link: Some(link.clone()),
            },
        );
        shard.pump(&mut st, key, now);
        if let Some(old) = moved_from {
            shard.start_cutover(&mut st, old, key);
        }
    }

    // Resumed subscriptions were broadcast: CONNACK waits until every shard has them.
    let seq_after = shard.broadcast_seq();
    Some(Admitted {
        key,
        version,
        max_packet_size: cfg.max_packet_size,
        link,
        settle: (seq_after != seq_before).then_some(seq_after),
    })
}

/// The session loop: read, decode, drive the session, write, until the connection ends.
async fn run_session<S: AsyncRead + AsyncWrite + Unpin>(
    shard: Rc<Shard>,
    io: &mut S,
    mut rbuf: BytesMut,
    a: Admitted,
) {
    let Admitted {
        key,
        version,
        max_packet_size,
        link,
        settle,
    } = a;
    // Route deltas or retained updates this connection caused and other shards have not
    // confirmed yet: its acknowledgements (SUBACK, PUBACK, CONNACK) wait for them.
    let mut settle = settle;
    let mut wbuf = BytesMut::new();
    let limits = Limits { max_packet_size };
    let mut last_active = Instant::now();
    // A new connection counts as idle until it sends something: it waits with a small buffer
    // (devices that connect and then sit idle are the common case in a fleet).
    let mut trimmed = true;
    let mut setup_done = false;
    loop {
        // A connection with a long stream of work (a big backlog to write to a fast reader)
        // must not keep its shard's other tasks waiting.
        glommio::yield_if_needed().await;
        if let Some(seq) = settle.take() {
            let missing = shard.wait_settled(seq).await;
            if !missing.is_empty() {
                // What this connection did is not known to every shard: its SUBACK (or
                // CONNACK) cannot be sent, so the connection ends without it.
                warn!(
                    shard = shard.id,
                    "shard(s) {missing:?} did not confirm a route change within {:?}: \
                     connection closed without its acknowledgement",
                    shard.shared.cfg.peer_timeout
                );
                lost(&shard, key, &link);
                break;
            }
        }
        // 1. Everything the session wants sent, in one write (retained messages for its
        // SUBSCRIBEs only as far as its transmit bound allows: the rest after this write).
        let mut deadline = None;
        let mut more_retained = false;
        {
            let mut st = shard.st.borrow_mut();
            if link.detached.get() {
                for p in link.last_words.borrow_mut().drain(..) {
                    codec::encode(&p, version, &mut wbuf);
                }
            } else if st.sessions.contains_key(&key) {
                shard.feed_retained(&mut st, key, Instant::now());
                if let Some(slot) = st.sessions.get_mut(&key) {
                    while let Some(p) = slot.session.poll_transmit() {
                        codec::encode(&p, version, &mut wbuf);
                    }
                    deadline = slot.session.poll_timeout();
                    more_retained = slot.session.retained_pending();
                }
            }
        }
        if more_retained && !wbuf.is_empty() {
            // The client drained what was due: come back for more right after this write
            // (reads and timers are still served first). Only after progress, so a backlog
            // that waits for the window (QoS 1/2) waits for the client's acknowledgements.
            link.notify.notify();
        }
        if !wbuf.is_empty() {
            let res = write_all(io, &wbuf, shard.shared.cfg.write_timeout).await;
            wbuf.clear();
            if let Err(e) = res {
                debug!(shard = shard.id, "write failed: {e}");
                lost(&shard, key, &link);
                break;
            }
        }
        if link.closing.get() {
            break;
        }
        if !setup_done {
            // The CONNACK (and any resumed messages) went out: give back what setting up
            // the session needed.
            setup_done = true;
            wbuf = BytesMut::new();
            if let Some(slot) = shard.st.borrow_mut().sessions.get_mut(&key) {
                slot.session.shrink_idle();
            }
        }
        // An idle connection gives its buffers back, so memory per idle client stays small
        // while a busy one keeps them (no allocation churn per read).
        let trim_at = (!trimmed).then(|| last_active + IDLE_TRIM_AFTER);
        let deadline = match (deadline, trim_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };

        // 2. Wait for bytes, a notification, a timer or shutdown.
        // An idle connection waits with a tiny buffer (a PINGREQ or a small PUBLISH fits);
        // the first read after activity switches to full-size reads.
        let start = grow(
            &mut rbuf,
            if trimmed { IDLE_READ_CHUNK } else { READ_CHUNK },
        );
        let wake = {
            let read = async { Wake::Read(io.read(&mut rbuf[start..]).await) };
            let notified = async {
                link.notify.notified().await;
                Wake::Notified
            };
            let timer = async {
                sleep_until(deadline).await;
                Wake::Timer
            };
            let stop = async {
                while !shard.stopping.get() {
                    shard.stop_notify.notified().await;
                }
                future::pending::<()>().await;
                Wake::Stop
            };
            future::or(future::or(read, notified), future::or(timer, stop)).await
        };
        let got = match &wake {
            Wake::Read(Ok(n)) => *n,
            _ => 0,
        };
        rbuf.truncate(start + got);
        let now = Instant::now();
        match wake {
            Wake::Read(Ok(0)) | Wake::Read(Err(_)) => {
                lost(&shard, key, &link);
                break;
            }
            Wake::Read(Ok(_)) => {
                last_active = now;
                trimmed = false;
                let seq_before = shard.broadcast_seq();
                let mut st = shard.st.borrow_mut();
                loop {
                    if link.detached.get() {
                        break;
                    }
                    match codec::decode(&mut rbuf, version, &limits) {
                        Ok(Some(packet)) => {
                            let Some(slot) = st.sessions.get_mut(&key) else {
                                break;
                            };
                            let res = slot.session.handle_packet(packet, now);
                            shard.pump(&mut st, key, now);
                            if let Err(v) = res {
                                debug!(shard = shard.id, "protocol violation: {v}");
                                break;
                            }
                            if link.closing.get() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            debug!(shard = shard.id, "decode error: {e}");
                            if let Some(slot) = st.sessions.get_mut(&key) {
                                slot.session.disconnect(e.reason_code(), now);
                            }
                            shard.pump(&mut st, key, now);
                            rbuf.clear();
                            break;
                        }
                    }
                }
                let seq_after = shard.broadcast_seq();
                if seq_after != seq_before {
                    settle = Some(seq_after);
                }
            }
            Wake::Timer => {
                let mut st = shard.st.borrow_mut();
                if let Some(slot) = st.sessions.get_mut(&key) {
                    slot.session.handle_timeout(now);
                }
                if !trimmed && now >= last_active + IDLE_TRIM_AFTER {
                    // Also with part of a packet buffered (a slow link, or a peer that went
                    // silent mid-packet): keep just those bytes. The trim deadline must not
                    // outlive its firing, or it stays in the past.
                    rbuf = if rbuf.is_empty() {
                        BytesMut::new()
                    } else {
                        BytesMut::from(&rbuf[..])
                    };
                    wbuf = BytesMut::new();
                    if let Some(slot) = st.sessions.get_mut(&key) {
                        slot.session.shrink_idle();
                    }
                    trimmed = true;
                }
                shard.pump(&mut st, key, now);
            }
            Wake::Notified | Wake::Stop => {}
        }
        // QoS 1/2 forwards a saturated peer refused: hold the publisher (its acks are still
        // unsent) until they are accepted.
        loop {
            let held = std::mem::take(&mut shard.st.borrow_mut().held);
            if held.is_empty() {
                break;
            }
            let mut still = Vec::new();
            for (to, m) in held {
                if let super::mailbox::Forwarded::Full(m) = shard.outbox.send_data(to, m, false) {
                    still.push((to, m));
                }
            }
            if still.is_empty() {
                break;
            }
            shard.st.borrow_mut().held.extend(still);
            if shard.stopping.get() {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }
    // The session stays (offline) if it has not ended; it is no longer linked to a socket.
    let mut st = shard.st.borrow_mut();
    if let Some(slot) = st.sessions.get_mut(&key) {
        if slot.link.as_ref().is_some_and(|l| Rc::ptr_eq(l, &link)) {
            slot.link = None;
            st.offline.insert(key);
            shard.schedule_offline(&mut st, key);
        }
    }
}

/// The socket died without DISCONNECT (or we gave up writing): the will may fire.
fn lost(shard: &Shard, key: u64, link: &ConnLink) {
    if link.detached.get() {
        return;
    }
    let now = Instant::now();
    let mut st = shard.st.borrow_mut();
    if let Some(slot) = st.sessions.get_mut(&key) {
        if slot.session.is_connected() {
            slot.session.connection_lost(now);
        }
    }
    shard.pump(&mut st, key, now);
}

async fn refuse<S: AsyncWrite + Unpin>(
    io: &mut S,
    wbuf: &mut BytesMut,
    refused: Refused,
    write_timeout: Duration,
) {
    match refused {
        Refused::Close(why) => debug!("connection refused: {why}"),
        Refused::ConnAck(version, reason, why) => {
            debug!("connection refused with CONNACK {reason}: {why}");
            let ack = Packet::ConnAck(ConnAck {
                session_present: false,
                reason,
                properties: ConnAckProperties::default(),
            });
            codec::encode(&ack, version, wbuf);
            let _ = write_all(io, wbuf, write_timeout).await;
        }
    }
}
