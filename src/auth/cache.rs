//! Per-shard cache of successful password verifications, for reconnect storms.
//!
//! Owns: a bounded set of "this username with this password was accepted by that password
//! file" facts. Must not touch: the files, the verification itself, anything shared between
//! shards.
//!
//! When a fleet reconnects at once (a broker restart, a network flap) every device logs in
//! again with the password it used a minute ago. Each `$7$` check costs one PBKDF2 run
//! (~0.1 ms of CPU at 101 iterations, ~1 ms at 1,000; `benches/auth.rs`); the cache answers a
//! repeated login in about a microsecond instead.
//!
//! * One cache per shard, used only on that shard's thread: no lock, no atomics. A client
//!   whose reconnect lands on another shard pays one PBKDF2 there.
//! * Bounded: at most `capacity` entries, replaced in CLOCK order (an entry hit since the hand
//!   last passed survives one more round), so a storm of distinct users cannot grow it.
//! * Keyed by HMAC-SHA256(per-cache random key, generation ‖ username ‖ password). The
//!   generation is the loaded password file's ([`super::Authenticator::generation`]): a reload
//!   gives every entry a new key, so a changed or removed password never matches an old entry,
//!   and nothing needs flushing. No password and no unkeyed password hash is kept: a memory
//!   dump does not give an offline guessing attack cheaper than the file's own PBKDF2 without
//!   also the random key.
//! * Only successes are cached. A failed login is verified every time (as in mosquitto), so a
//!   cache can never turn a wrong password into an accepted one.

use std::collections::HashMap;

use aws_lc_rs::{hmac, rand};

/// The cache key of one login attempt.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheKey(…)")
    }
}

/// Default capacity per shard: 16,384 entries (~1 MiB), enough for the devices that land on
/// one core of a large fleet reconnecting at once.
pub const DEFAULT_CAPACITY: usize = 16_384;

struct Slot {
    key: CacheKey,
    referenced: bool,
}

/// A shard's verification cache. Not `Sync` by intent of use: keep one per shard.
pub struct VerifyCache {
    mac: hmac::Key,
    slots: Vec<Slot>,
    index: HashMap<CacheKey, usize, ahash::RandomState>,
    hand: usize,
    capacity: usize,
    hits: u64,
    misses: u64,
}

impl std::fmt::Debug for VerifyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyCache")
            .field("len", &self.slots.len())
            .field("capacity", &self.capacity)
            .field("hits", &self.hits)
            .field("misses", &self.misses)
            .finish()
    }
}

impl VerifyCache {
    /// An empty cache holding at most `capacity` entries (0 disables it: nothing is stored).
    pub fn new(capacity: usize) -> VerifyCache {
        let mut secret = [0u8; 32];
        // Without randomness the key would be predictable; a fixed key would still be safe
        // against a wrong password (only successes are stored) but not against memory dumps.
        // aws-lc's RNG does not fail on Linux; if it ever did, the cache turns itself off.
        let capacity = if rand::fill(&mut secret).is_ok() {
            capacity
        } else {
            0
        };
        VerifyCache {
            mac: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            slots: Vec::new(),
            index: HashMap::with_capacity_and_hasher(0, ahash::RandomState::new()),
            hand: 0,
            capacity,
            hits: 0,
            misses: 0,
        }
    }

    /// The key of a login against the authenticator of `generation`.
    pub fn key(&self, generation: u64, username: &str, password: &[u8]) -> CacheKey {
        let mut ctx = hmac::Context::with_key(&self.mac);
        ctx.update(&generation.to_be_bytes());
        // Length-prefixed: ("ab", "c") and ("a", "bc") must not collide.
        ctx.update(&(username.len() as u64).to_be_bytes());
        ctx.update(username.as_bytes());
        ctx.update(password);
        let tag = ctx.sign();
        let mut k = [0u8; 32];
        k.copy_from_slice(tag.as_ref());
        CacheKey(k)
    }

    /// Was this login accepted before? Counts a hit or a miss.
    pub fn contains(&mut self, key: &CacheKey) -> bool {
        match self.index.get(key) {
            Some(&i) => {
                self.slots[i].referenced = true;
                self.hits += 1;
                true
            }
            None => {
                self.misses += 1;
                false
            }
        }
    }

    /// Remember an accepted login (call only after [`super::Verdict::Accepted`]).
    pub fn insert(&mut self, key: CacheKey) {
        if self.capacity == 0 {
            return;
        }
        if let Some(&i) = self.index.get(&key) {
            self.slots[i].referenced = true;
            return;
        }
        if self.slots.len() < self.capacity {
            self.index.insert(key, self.slots.len());
            self.slots.push(Slot {
                key,
                referenced: false,
            });
            return;
        }
        // CLOCK: advance past referenced slots (clearing their bit) to the first that is not.
        // Terminates within two turns: the first turn clears every bit it passes.
        loop {
            let slot = &mut self.slots[self.hand];
            if slot.referenced {
                slot.referenced = false;
                self.hand = (self.hand + 1) % self.capacity;
                continue;
            }
            self.index.remove(&slot.key);
            slot.key = key;
            self.index.insert(key, self.hand);
            self.hand = (self.hand + 1) % self.capacity;
            return;
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Lookups that found an entry, for `$SYS` and benchmarks.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Lookups that did not.
    pub fn misses(&self) -> u64 {
        self.misses
    }
}

impl Default for VerifyCache {
    fn default() -> Self {
        VerifyCache::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_generation_user_and_password() {
        let c = VerifyCache::new(8);
        let k = c.key(1, "alice", b"pw");
        assert_eq!(k, c.key(1, "alice", b"pw"));
        assert_ne!(k, c.key(2, "alice", b"pw"));
        assert_ne!(k, c.key(1, "alicf", b"pw"));
        assert_ne!(k, c.key(1, "alice", b"pW"));
        assert_ne!(c.key(1, "ab", b"c"), c.key(1, "a", b"bc"));
        // Two caches (two shards) have different secret keys.
        assert_ne!(k, VerifyCache::new(8).key(1, "alice", b"pw"));
    }

    #[test]
    fn remembers_successes_and_counts() {
        let mut c = VerifyCache::new(4);
        let k = c.key(1, "alice", b"pw");
        assert!(!c.contains(&k));
        c.insert(k);
        assert!(c.contains(&k));
        // A reload (new generation) misses.
        assert!(!c.contains(&c.key(2, "alice", b"pw")));
        assert_eq!((c.hits(), c.misses()), (1, 2));
        c.insert(k);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn bounded_and_clock_keeps_recently_used_entries() {
        let mut c = VerifyCache::new(3);
        let keys: Vec<CacheKey> = (0..10).map(|i| c.key(1, &format!("u{i}"), b"p")).collect();
        for k in &keys[..3] {
            c.insert(*k);
        }
        assert!(c.contains(&keys[0])); // referenced: survives the next eviction
        c.insert(keys[3]);
        assert_eq!(c.len(), 3);
        assert!(c.contains(&keys[0]));
        assert!(c.contains(&keys[3]));
        assert_eq!(
            [&keys[1], &keys[2]]
                .iter()
                .filter(|k| c.index.contains_key(k))
                .count(),
            1
        );
        for k in &keys {
            c.insert(*k);
            assert!(c.len() <= 3);
        }
        assert_eq!(c.index.len(), c.len());
    }

    #[test]
    fn capacity_zero_stores_nothing() {
        let mut c = VerifyCache::new(0);
        let k = c.key(1, "a", b"b");
        c.insert(k);
        assert!(!c.contains(&k));
        assert!(c.is_empty());
    }
}
