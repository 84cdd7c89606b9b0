//! The loadgen's message payload: who sent it, its sequence number and when it was meant to
//! be sent. Owns that 24-byte header layout; must not touch I/O.
//!
//! Layout (big endian): publisher id u32 | sequence u32 | intended send time u64 (ns since the
//! run's clock base). Padding up to the requested size is zeros. 16 bytes so that the smallest
//! realistic telemetry payloads can be measured.

/// Smallest payload the loadgen sends.
pub const HEADER_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub publisher: u32,
    /// Sequence number; 32 bits on the wire (the loadgen caps messages per publisher below).
    pub seq: u64,
    pub intended_ns: u64,
}

/// Write the header into the first bytes of `buf` (which must be ≥ [`HEADER_LEN`]).
pub fn write(buf: &mut [u8], h: Header) {
    buf[0..4].copy_from_slice(&h.publisher.to_be_bytes());
    buf[4..8].copy_from_slice(&(h.seq as u32).to_be_bytes());
    buf[8..16].copy_from_slice(&h.intended_ns.to_be_bytes());
}

/// Read a header; `None` if the payload is too short to be one of ours.
pub fn read(buf: &[u8]) -> Option<Header> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let u32_at = |o: usize| u32::from_be_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&buf[o..o + 8]);
        u64::from_be_bytes(a)
    };
    Some(Header {
        publisher: u32_at(0),
        seq: u32_at(4) as u64,
        intended_ns: u64_at(8),
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
            intended_ns: 123_456_789,
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
                intended_ns: 3,
            },
        );
        assert_eq!(read(&b[..HEADER_LEN - 1]), None);
    }
}
