//! The loadgen's message payload: which run and publisher sent it, its sequence number and
//! when it was meant to be sent. Owns that 16-byte header layout; must not touch I/O.
//!
//! Layout (big endian): publisher id u32 | sequence u32 | run nonce u16 | intended send time
//! u48 (ns since the run's clock base: 78 hours of range, runs are capped at 1 h). Padding up
//! to the requested size is zeros. 16 bytes so that the smallest realistic telemetry payloads
//! can be measured. The run nonce rejects messages of an earlier run that a broker is still
//! delivering (e.g. the backlog of a saturating QoS 0 run) instead of counting them.

/// Smallest payload the loadgen sends.
pub const HEADER_LEN: usize = 16;

const TIME_MASK: u64 = (1 << 48) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub publisher: u32,
    /// Sequence number; 32 bits on the wire (the loadgen caps messages per publisher below).
    pub seq: u64,
    pub nonce: u16,
    /// Intended send time; 48 bits on the wire.
    pub intended_ns: u64,
}

/// A run nonce that differs between runs (time and pid mixed).
pub fn new_nonce() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let x = t ^ (u64::from(std::process::id()) << 17);
    let x = x ^ (x >> 29) ^ (x >> 47);
    (x as u16) | 1 // never 0, so an all-zero payload is never "ours"
}

/// Write the header into the first bytes of `buf` (which must be ≥ [`HEADER_LEN`]).
#[inline]
pub fn write(buf: &mut [u8], h: Header) {
    buf[0..4].copy_from_slice(&h.publisher.to_be_bytes());
    buf[4..8].copy_from_slice(&(h.seq as u32).to_be_bytes());
    let t = (u64::from(h.nonce) << 48) | (h.intended_ns & TIME_MASK);
    buf[8..16].copy_from_slice(&t.to_be_bytes());
}

/// Read a header; `None` if the payload is too short to be one of ours.
#[inline]
pub fn read(buf: &[u8]) -> Option<Header> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let u32_at = |o: usize| u32::from_be_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
    let mut a = [0u8; 8];
    a.copy_from_slice(&buf[8..16]);
    let t = u64::from_be_bytes(a);
    Some(Header {
        publisher: u32_at(0),
        seq: u32_at(4) as u64,
        nonce: (t >> 48) as u16,
        intended_ns: t & TIME_MASK,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut b = vec![0u8; 64];
        let h = Header {
            publisher: 7,
            seq: (1 << 32) - 1,
            nonce: 0xBEEF,
            intended_ns: 3_600_000_000_000,
        };
        write(&mut b, h);
        assert_eq!(read(&b), Some(h));
    }

    #[test]
    fn short_payloads_are_rejected() {
        let mut b = vec![0u8; HEADER_LEN];
        write(
            &mut b,
            Header {
                publisher: 1,
                seq: 2,
                nonce: 9,
                intended_ns: 3,
            },
        );
        assert!(read(&b).is_some());
        assert_eq!(read(&b[..HEADER_LEN - 1]), None);
    }

    #[test]
    fn nonces_are_never_zero() {
        assert_ne!(new_nonce(), 0);
    }
}
