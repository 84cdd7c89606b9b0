//! The client-id registry slice a home shard keeps.
//!
//! Owns: which shard hosts each client id's session (live or offline), and the rule that picks
//! a client id's home shard. Must not touch: sessions themselves or I/O; the runtime carries
//! out the actions this returns.
//!
//! Every CONNECT is arbitrated by the client id's home shard, so two connects with the same
//! id racing on different shards are ordered there: the later one always takes over the
//! earlier one, never the reverse.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use bytestring::ByteString;

/// A shard's index, 0..shards.
pub type ShardId = usize;

/// Identifies one connection broker-wide: shard id in the top 16 bits, a per-shard counter
/// below, so a stale message about an old connection can never match a new one.
pub type ConnKey = u64;

pub fn conn_key(shard: ShardId, counter: u64) -> ConnKey {
    ((shard as u64) << 48) | (counter & ((1 << 48) - 1))
}

pub fn conn_shard(key: ConnKey) -> ShardId {
    (key >> 48) as ShardId
}

/// The home shard of a client id. The hash must be the same on every shard and every run:
/// `DefaultHasher::new()` is SipHash with fixed zero keys.
pub fn home_shard(client_id: &str, shards: usize) -> ShardId {
    let mut h = DefaultHasher::new();
    client_id.hash(&mut h);
    (h.finish() % shards.max(1) as u64) as ShardId
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    conn: ConnKey,
}

/// What the home shard must do after a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// No previous session or connection anywhere: the new connection starts fresh.
    Fresh,
    /// `previous` (live or holding an offline session) must be closed/handed over to the new
    /// connection by the shard that hosts it.
    Takeover { previous: ConnKey },
}

#[derive(Debug, Default)]
pub struct Registry {
    entries: HashMap<ByteString, Entry>,
}

impl Registry {
    pub fn register(&mut self, client_id: ByteString, conn: ConnKey) -> Registered {
        match self.entries.insert(client_id, Entry { conn }) {
            None => Registered::Fresh,
            Some(prev) => Registered::Takeover {
                previous: prev.conn,
            },
        }
    }

    /// The session of `conn` ended for good. Ignored if a newer connection owns the id.
    pub fn unregister(&mut self, client_id: &str, conn: ConnKey) -> bool {
        if self.entries.get(client_id).is_some_and(|e| e.conn == conn) {
            self.entries.remove(client_id);
            true
        } else {
            false
        }
    }

    /// The connection key an id currently maps to.
    pub fn lookup(&self, client_id: &str) -> Option<ConnKey> {
        self.entries.get(client_id).map(|e| e.conn)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_keys_carry_their_shard() {
        let k = conn_key(3, 12345);
        assert_eq!(conn_shard(k), 3);
        assert_ne!(conn_key(3, 1), conn_key(2, 1));
    }

    #[test]
    fn home_shard_is_stable_and_spreads() {
        assert_eq!(home_shard("device-1", 4), home_shard("device-1", 4));
        let mut seen = [0usize; 4];
        for i in 0..1000 {
            seen[home_shard(&format!("device-{i}"), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
    }

    #[test]
    fn later_connect_takes_over_and_stale_unregister_is_ignored() {
        let mut r = Registry::default();
        let a = conn_key(0, 1);
        let b = conn_key(1, 1);
        assert_eq!(r.register("c".into(), a), Registered::Fresh);
        assert_eq!(
            r.register("c".into(), b),
            Registered::Takeover { previous: a }
        );
        // The old connection's late "I'm gone" must not remove the new owner.
        assert!(!r.unregister("c", a));
        assert_eq!(r.lookup("c"), Some(b));
        assert!(r.unregister("c", b));
        assert!(r.is_empty());
    }
}
