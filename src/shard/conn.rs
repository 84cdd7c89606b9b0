//! The connection task: bytes in, packets to the session, packets out, bytes out.
//!
//! Owns: one client connection from accept to close: the CONNECT phase (timeout, version,
//! anonymous policy, client-id rules, registration with the home shard), then the loop that
//! reads into a buffer, decodes every complete packet, drives the session, and writes
//! everything the session queued in one batched write per wake-up. Must not touch: protocol
//! rules beyond CONNECT admission (the session decides), routing decisions (the shard does).

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::runtime::{ConnLink, Shard, Slot};
use crate::codec::{
    self, ConnAck, ConnAckProperties, Connect, DecodeError, Limits, Packet, ProtocolVersion,
    ReasonCode,
};
use crate::session::Session;

/// Bytes asked of the socket per read. Small on purpose: an idle connection keeps no read
/// buffer at all (see `serve`), and MQTT device traffic is mostly small packets.
const READ_CHUNK: usize = 4096;

/// A peer that accepts none of our bytes for this long is dropped: a subscriber that stopped
/// reading must not pin its queue (and its socket buffers) forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a write waits for peers to apply this shard's route/retained updates.
const SYNC_WAIT_MAX: Duration = Duration::from_secs(1);

enum Wake {
    Read(std::io::Result<usize>),
    Notified,
    Timer,
    Stop,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => {
            let now = Instant::now();
            if t > now {
                glommio::timer::sleep(t - now).await;
            }
        }
        None => future::pending::<()>().await,
    }
}

async fn write_all<S: AsyncWrite + Unpin>(io: &mut S, buf: &[u8]) -> std::io::Result<()> {
    let w = async {
        io.write_all(buf).await?;
        io.flush().await
    };
    future::or(w, async {
        glommio::timer::sleep(WRITE_TIMEOUT).await;
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "peer stopped reading",
        ))
    })
    .await
}

/// Read more bytes into `buf`; `Ok(0)` is end of stream.
async fn read_some<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> std::io::Result<usize> {
    let start = grow(buf);
    let r = io.read(&mut buf[start..]).await;
    buf.truncate(start + *r.as_ref().unwrap_or(&0));
    r
}

/// Make room for one read; returns where the new bytes go. The caller truncates to what was
/// read, also when the read was abandoned (cancelled reads must not leave zeros behind).
fn grow(buf: &mut BytesMut) -> usize {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
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

/// Serve one accepted connection until it closes.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shard: Rc<Shard>,
    mut io: S,
    allow_anonymous: bool,
) {
    let mut rbuf = BytesMut::new();
    let mut wbuf = BytesMut::new();
    shard.connecting.set(shard.connecting.get() + 1);
    let connect = read_connect(&shard, &mut io, &mut rbuf).await;
    shard.connecting.set(shard.connecting.get() - 1);
    let connect = match connect {
        Ok(c) => c,
        Err(refused) => {
            refuse(&mut io, &mut wbuf, refused).await;
            return;
        }
    };
    let version = connect.protocol;
    let cfg = &shard.shared.cfg.session;

    // Admission: anonymous policy, limits, client-id rules.
    if !allow_anonymous && connect.username.is_none() {
        let r = Refused::ConnAck(version, ReasonCode::NOT_AUTHORIZED, "anonymous not allowed");
        refuse(&mut io, &mut wbuf, r).await;
        return;
    }
    if let Err(reason) = cfg.check_connect(&connect) {
        refuse(
            &mut io,
            &mut wbuf,
            Refused::ConnAck(version, reason, "CONNECT outside limits"),
        )
        .await;
        return;
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
            refuse(&mut io, &mut wbuf, r).await;
            return;
        }
        ByteString::from(format!("auto-{key:016x}"))
    } else {
        connect.client_id.clone()
    };

    // The home shard orders this connect against any other with the same id.
    let Some(previous) = shard.register(client_id.clone(), key).await else {
        return; // shutting down
    };
    let now = Instant::now();
    let session = Session::accept(cfg, &connect, client_id, previous.map(|b| *b), now);
    drop(connect);
    let link = Rc::new(ConnLink::default());
    {
        let mut st = shard.st.borrow_mut();
        st.sessions.insert(
            key,
            Slot {
                session,
                link: Some(link.clone()),
            },
        );
        shard.pump(&mut st, key, now);
    }

    let limits = Limits {
        max_packet_size: cfg.max_packet_size,
    };
    loop {
        // 1. Everything the session wants sent, in one write.
        let mut deadline = None;
        {
            let mut st = shard.st.borrow_mut();
            if link.detached.get() {
                for p in link.last_words.borrow_mut().drain(..) {
                    codec::encode(&p, version, &mut wbuf);
                }
            } else if let Some(slot) = st.sessions.get_mut(&key) {
                while let Some(p) = slot.session.poll_transmit() {
                    codec::encode(&p, version, &mut wbuf);
                }
                deadline = slot.session.poll_timeout();
            }
        }
        if !wbuf.is_empty() {
            // See `ConnLink::sync_to`: microseconds normally; bounded so a stopping or stuck
            // peer cannot hold the connection.
            let since = Instant::now();
            while !shard.synced(link.sync_to.get())
                && !shard.stopping.get()
                && since.elapsed() < SYNC_WAIT_MAX
            {
                glommio::timer::sleep(Duration::from_micros(50)).await;
            }
            let res = write_all(&mut io, &wbuf).await;
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
        // An idle connection holds no read buffer: memory per idle client stays small.
        if rbuf.is_empty() && rbuf.capacity() > 0 {
            rbuf = BytesMut::new();
        }

        // 2. Wait for bytes, a notification, a timer or shutdown.
        let start = grow(&mut rbuf);
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
            }
            Wake::Timer => {
                let mut st = shard.st.borrow_mut();
                if let Some(slot) = st.sessions.get_mut(&key) {
                    slot.session.handle_timeout(now);
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

async fn refuse<S: AsyncWrite + Unpin>(io: &mut S, wbuf: &mut BytesMut, refused: Refused) {
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
            let _ = write_all(io, wbuf).await;
        }
    }
}
