//! The protocol between shard cores: what one shard tells another through the mailboxes.
//!
//! Owns: [`PeerMsg`] and the payloads it carries ([`Transfer`], [`ParkedMsg`]). Must not
//! touch: how messages travel (the driver's mailboxes) or what a shard does with them (the
//! rest of `shardcore`). Everything here is `Send`: payloads are refcounted `Bytes`/`Arc`.
//!
//! Ordering: messages between one ordered pair of shards arrive in the order they were sent
//! (the mailbox is FIFO). The takeover protocol (see `takeover.rs`) and per-publisher order
//! across shards rely on it; nothing relies on an order between different pairs.

use bytestring::ByteString;
use smallvec::SmallVec;

use super::registry::ConnKey;
use crate::codec::{SubscriptionOptions, TopicFilter};
use crate::message::Message;
use crate::routing::{Forward, RouteDelta};
use crate::session::SessionState;

/// A session moving to another shard, with the key it had here: its old shard parks what
/// still arrives for it until every shard routes to the new host.
#[derive(Debug)]
pub struct Transfer {
    pub from: ConnKey,
    pub state: Box<SessionState>,
    /// The session's identity on its old host (for its will if the new host discards it).
    pub authz: Option<Box<super::Authz>>,
}

/// A message kept for a moving session, with the options and subscription ids it matched.
pub type ParkedMsg = (Message, SubscriptionOptions, SmallVec<[u32; 2]>);

/// Messages between shards.
#[derive(Debug)]
pub enum PeerMsg {
    /// The sender gained its first / lost its last subscriber on a filter. `seq` is the
    /// sender's broadcast sequence number, acknowledged with `Applied`.
    Route { delta: RouteDelta, seq: u64 },
    /// A retained message (or its deletion) for this shard's retained replica.
    Retain { msg: Message, seq: u64 },
    /// The receiver applied the sender's broadcasts up to `seq`.
    Applied { seq: u64 },
    /// Deliver to this shard's subscribers as routing planned (`plain`, one member of each
    /// group). `publisher` is the publishing connection's key (0: none, e.g. a will), so a
    /// full subscriber here can pause it.
    Forward { fwd: Forward, publisher: ConnKey },
    /// To the home shard: `conn` is connecting with `client_id`.
    Register {
        client_id: ByteString,
        conn: ConnKey,
        clean_start: bool,
    },
    /// To the shard hosting `previous`: close it (if live) and hand its session to `conn`,
    /// or end it if `conn` starts clean.
    Takeover {
        previous: ConnKey,
        conn: ConnKey,
        clean_start: bool,
    },
    /// To the shard of `conn`: registration done; here is the previous session, if any.
    Handover {
        conn: ConnKey,
        state: Option<Transfer>,
    },
    /// From the new host of a moved session (`old` → `new`) to every other shard, after its
    /// route deltas: "switch now". Each shard answers `Cutover` to the old host and
    /// `CutoverAck` to the new one at the same moment, so both agree, per sending shard,
    /// which of its messages reach the session through the old host (parked) and which
    /// directly.
    CutoverRequest { old: ConnKey, new: ConnKey },
    /// To the old host: the sender's later messages for the session go to `new` directly.
    Cutover { old: ConnKey, new: ConnKey },
    /// To the new host: the sender's later messages for `new` are to be delivered.
    CutoverAck { new: ConnKey },
    /// To the new host: every shard has switched; here is what the old host kept meanwhile
    /// (possibly nothing).
    ParkDone { conn: ConnKey, msgs: Vec<ParkedMsg> },
    /// To the old host: the moved session was discarded by a clean start; drop what is parked.
    ParkAbandon { old: ConnKey },
    /// To the home shard: the session of `conn` ended for good.
    Unregister {
        client_id: ByteString,
        conn: ConnKey,
    },
    /// A subscriber on the sender is full: stop accepting publishes from `conn` (flow
    /// control). Always followed, later, by one `Resume` for the same connection.
    Pause { conn: ConnKey },
    /// The subscriber that sent `Pause` drained, went away or was cut loose.
    Resume { conn: ConnKey },
}

impl PeerMsg {
    /// Data (a forwarded publish) rather than control: subject to the per-peer data bound.
    pub fn is_data(&self) -> bool {
        matches!(self, PeerMsg::Forward { .. })
    }

    /// A short name for traces.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerMsg::Route { .. } => "Route",
            PeerMsg::Retain { .. } => "Retain",
            PeerMsg::Applied { .. } => "Applied",
            PeerMsg::Forward { .. } => "Forward",
            PeerMsg::Register { .. } => "Register",
            PeerMsg::Takeover { .. } => "Takeover",
            PeerMsg::Handover { .. } => "Handover",
            PeerMsg::CutoverRequest { .. } => "CutoverRequest",
            PeerMsg::Cutover { .. } => "Cutover",
            PeerMsg::CutoverAck { .. } => "CutoverAck",
            PeerMsg::ParkDone { .. } => "ParkDone",
            PeerMsg::ParkAbandon { .. } => "ParkAbandon",
            PeerMsg::Unregister { .. } => "Unregister",
            PeerMsg::Pause { .. } => "Pause",
            PeerMsg::Resume { .. } => "Resume",
        }
    }
}

/// A forward's topic filter list, as routing plans it.
pub type Groups = SmallVec<[TopicFilter; 1]>;
