//! The operator's log lines about a client's connection, in mosquitto's words.
//!
//! Owns: the text of the disconnect lines (mosquitto 2.0 `do_disconnect` in src/loop.c, with
//! the v5 reasons worded as mosquitto 2.1 words them), the takeover line, and the `log_type
//! subscribe` / `unsubscribe` lines; each names its client (escaped) in the message itself,
//! because the core often writes about another connection than the one whose input it is
//! handling. Must not touch: when a connection closes (the session and `conn.rs` decide), or
//! which lines are written (`log_type`, `connection_messages`: the subscriber filters by
//! target, see `crate::logging`).

use tracing::{debug, info};

use crate::codec::{QoS, ReasonCode};
use crate::logging::{escape, CONNECTION, SUBSCRIBE, UNSUBSCRIBE};
use crate::session::CloseReason;

/// The line for a session's connection ending with `reason`. `server_closed`: the core cut a
/// lost connection itself (write stall, unconfirmed routes) and already said why, so the
/// session's "connection lost" is not the client closing it.
pub(super) fn closed(client: &str, reason: CloseReason, server_closed: bool) {
    let id = escape(client);
    match reason {
        CloseReason::ClientDisconnect(rc) if rc == ReasonCode::NORMAL_DISCONNECTION => {
            info!(target: CONNECTION, "Client {id} disconnected.")
        }
        CloseReason::ClientDisconnect(rc) => info!(
            target: CONNECTION,
            "Client {id} disconnected: {} (reason 0x{:02X}).",
            rc.name(),
            rc.0
        ),
        CloseReason::ConnectionLost if server_closed => {}
        CloseReason::ConnectionLost => {
            info!(target: CONNECTION, "Client {id} closed its connection.")
        }
        CloseReason::KeepAliveTimeout => info!(
            target: CONNECTION,
            "Client {id} has exceeded timeout, disconnecting."
        ),
        CloseReason::ProtocolViolation(rc) | CloseReason::Server(rc) => match rc {
            ReasonCode::MALFORMED_PACKET => info!(
                target: CONNECTION,
                "Client {id} disconnected due to malformed packet."
            ),
            ReasonCode::PROTOCOL_ERROR => info!(
                target: CONNECTION,
                "Client {id} disconnected due to protocol error."
            ),
            ReasonCode::PACKET_TOO_LARGE => info!(
                target: CONNECTION,
                "Client {id} disconnected due to oversize packet."
            ),
            ReasonCode::SESSION_TAKEN_OVER => info!(
                target: CONNECTION,
                "Client {id} disconnected, session taken over."
            ),
            ReasonCode::ADMINISTRATIVE_ACTION => info!(
                target: CONNECTION,
                "Client {id} been disconnected by administrative action."
            ),
            // Every client at once: mosquitto writes nothing for them either.
            ReasonCode::SERVER_SHUTTING_DOWN => debug!(
                target: CONNECTION,
                "Client {id} disconnected: server shutting down."
            ),
            rc => info!(
                target: CONNECTION,
                "Client {id} disconnected: {} (reason 0x{:02X}).",
                rc.name(),
                rc.0
            ),
        },
    }
}

/// A newer connection takes over the live session of `client` (mosquitto's line, written
/// when the old connection is closed).
pub(super) fn taken_over(client: &str) {
    info!(
        target: CONNECTION,
        "Client {} already connected, closing old connection.",
        escape(client)
    );
}

/// `log_type subscribe`: `CLIENT QOS FILTER`, as mosquitto writes it.
pub(super) fn subscribed(client: &str, qos: QoS, filter: &str) {
    info!(
        target: SUBSCRIBE,
        "{} {} {}",
        escape(client),
        qos as u8,
        escape(filter)
    );
}

/// `log_type unsubscribe`: `CLIENT FILTER`, as mosquitto writes it.
pub(super) fn unsubscribed(client: &str, filter: &str) {
    info!(target: UNSUBSCRIBE, "{} {}", escape(client), escape(filter));
}
