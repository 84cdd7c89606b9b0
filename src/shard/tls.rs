//! The TLS handshake on a shard: rustls via futures-rustls over the accepted glommio socket.
//!
//! Owns: running one server handshake with its timeout, counting it (started, full, resumed,
//! failed by reason) in the shard's counters, one rate-limited log line per refused client,
//! and extracting the client certificate identity. Must not touch: TLS policy and material
//! (that is `crate::tls`), MQTT (that is `conn`).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_lite::future;
use futures_rustls::server::TlsStream;
use futures_rustls::TlsAcceptor;
use glommio::net::TcpStream;
use rustls::HandshakeKind;
use tracing::{info, warn};

use super::runtime::Shard;
use super::TlsListener;
use crate::tls::{client_identity, ClientIdentity, HandshakeFailure, LogRateLimiter};

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
) -> Option<(Box<TlsStream<TcpStream>>, Option<ClientIdentity>)> {
    let stats = &t.stats[shard.id];
    // The shard's semaphore already bounds concurrency; this only counts.
    let slot = stats.try_begin(usize::MAX)?;
    let acceptor = TlsAcceptor::from(t.reloader.current());
    let res = future::or(async { Some(acceptor.accept(stream).await) }, async {
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
        Some(Err(e)) => {
            let rustls_err = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            match rustls_err {
                Some(err) => {
                    slot.failed(HandshakeFailure::classify(err));
                    log_refusal(peer, &HandshakeFailure::describe(err));
                }
                None => {
                    // The client went away mid-handshake (reset, EOF): not worth a warning.
                    slot.failed(HandshakeFailure::Other);
                    info!(peer = ?peer, "TLS handshake aborted: {e}");
                }
            }
            None
        }
        Some(Ok(tls)) => {
            let (_, conn) = tls.get_ref();
            let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
            let identity = conn.peer_certificates().and_then(client_identity);
            slot.succeeded(resumed);
            // Boxed: the TLS state is large, and moving it by value would cost that much
            // again in every future that holds it.
            Some((Box::new(tls), identity))
        }
    }
}
