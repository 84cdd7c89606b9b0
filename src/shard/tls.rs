//! The TLS handshake on a shard: `crate::tls::accept` (rustls' unbuffered API, our own
//! buffers, none held while idle) over the accepted glommio socket.
//!
//! Owns: running one server handshake with its timeout, counting it (started, full, resumed,
//! failed by reason) in the shard's counters, one rate-limited log line per refused client,
//! and extracting the client certificate identity. Must not touch: TLS policy and material
//! (that is `crate::tls`), MQTT (that is `conn`).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::net::TcpStream;
use rustls::HandshakeKind;
use tracing::{info, warn};

use super::driver::Shard;
use super::TlsListener;
use crate::tls::{
    accept, AcceptError, ClientIdentity, HandshakeFailure, LogRateLimiter, ServerTlsStream,
};

thread_local! {
    // Each shard is one thread, so this is per shard: 20 refusal lines at once, then one a
    // second, with a count of what was suppressed.
    static REFUSAL_LOG: RefCell<LogRateLimiter> =
        RefCell::new(LogRateLimiter::new(20, Duration::from_secs(1)));
}

fn log_refusal(peer: Option<SocketAddr>, line: &str) {
    let allowed = REFUSAL_LOG.with(|l| l.borrow_mut().allow(Instant::now()));
    if let Some(suppressed) = allowed {
        let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
        // The detail may quote the client certificate (its subject, a name it claims).
        let line = crate::logging::escape(line);
        if suppressed > 0 {
            warn!("client {peer}: {line} (and {suppressed} more refusals not logged)");
        } else {
            warn!("client {peer}: {line}");
        }
    }
}

/// Run the server handshake; `None` if it failed (already counted and logged).
pub(crate) async fn handshake(
    shard: &Shard,
    t: &TlsListener,
    stream: TcpStream,
    peer: Option<SocketAddr>,
) -> Option<(Box<ServerTlsStream<TcpStream>>, Option<ClientIdentity>)> {
    let stats = &t.stats[shard.id];
    // The shard's semaphore already bounds concurrency; this only counts.
    let slot = stats.try_begin(usize::MAX)?;
    let began = Instant::now();
    let config = t.reloader.current();
    let res = future::or(async { Some(accept(config, stream).await) }, async {
        glommio::timer::sleep(t.handshake_timeout).await;
        None
    })
    .await;
    match res {
        None => {
            slot.failed(HandshakeFailure::Timeout);
            log_refusal(
                peer,
                &format!(
                    "TLS handshake refused (timeout): {}",
                    HandshakeFailure::Timeout.message()
                ),
            );
            None
        }
        Some(Err(AcceptError::Tls(err))) => {
            slot.failed(HandshakeFailure::classify(&err));
            log_refusal(peer, &HandshakeFailure::describe(&err));
            None
        }
        Some(Err(AcceptError::Io(e))) => {
            // The client went away mid-handshake (reset, EOF): not worth a warning.
            slot.failed(HandshakeFailure::Other);
            info!(peer = ?peer, "TLS handshake aborted: {e}");
            None
        }
        Some(Ok(mut tls)) => {
            let resumed = tls.handshake_kind() == Some(HandshakeKind::Resumed);
            if resumed {
                // A resumed session was not verified again by rustls: check its certificate
                // against today's CRL, CA and clock, as a full handshake would.
                if let Err(e) = t.reloader.verify_resumed(tls.peer_certificates()) {
                    slot.failed(HandshakeFailure::classify(&e));
                    log_refusal(
                        peer,
                        &format!("{} (resumed session)", HandshakeFailure::describe(&e)),
                    );
                    return None;
                }
            }
            let identity = tls.take_client_identity();
            stats.observe_duration(resumed, began.elapsed());
            slot.succeeded(resumed);
            // Boxed: the rustls state is ~1 KB, and moving it by value would cost that much
            // again in every future that holds it.
            Some((Box::new(tls), identity))
        }
    }
}
