//! Fuzz target: arbitrary bytes into `decode` for every protocol version must never panic, and
//! whatever decodes must re-encode to exactly `encoded_len` bytes and decode to the same packet.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use midge::codec::{decode, encode, encoded_len, Limits, ProtocolVersion};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    for version in [
        ProtocolVersion::V31,
        ProtocolVersion::V311,
        ProtocolVersion::V5,
    ] {
        let mut buf = BytesMut::from(data);
        // Decode packet after packet until the input runs out or is rejected.
        while let Ok(Some(packet)) = decode(&mut buf, version, &limits) {
            let mut out = BytesMut::new();
            encode(&packet, version, &mut out);
            assert_eq!(out.len(), encoded_len(&packet, version), "{packet:?}");
            let again = decode(&mut out, version, &limits);
            assert_eq!(again, Ok(Some(packet.clone())), "re-decode of {packet:?}");
            assert!(out.is_empty(), "re-decode left bytes of {packet:?}");
        }
    }
});
