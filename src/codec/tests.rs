//! Codec tests: byte-exact spec encodings, resumability, limits, malformed input, and property
//! round trips. Hex strings are the bytes a reader of the spec would write down by hand.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

use super::encode::Sink;
use super::*;

use ProtocolVersion::{V31, V311, V5};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test hex"))
        .collect()
}

fn dec(bytes: &[u8], v: ProtocolVersion) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let r = decode(&mut buf, v, &Limits::default());
    if let Ok(Some(_)) = r {
        assert!(buf.is_empty(), "decode must consume exactly one packet");
    }
    r
}

fn dec_err(bytes: &[u8], v: ProtocolVersion) -> DecodeError {
    match dec(bytes, v) {
        Err(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn enc(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(p, v, &mut buf);
    assert_eq!(
        buf.len(),
        encoded_len(p, v),
        "encoded_len disagrees with encode"
    );
    buf.to_vec()
}

/// `p` encodes to exactly `wire`, and `wire` decodes to exactly `p`.
fn both_ways(p: &Packet, v: ProtocolVersion, wire: &str) {
    let wire = hex(wire);
    assert_eq!(enc(p, v), wire, "encoding of {p:?}");
    assert_eq!(
        dec(&wire, v),
        Ok(Some(p.clone())),
        "decoding of {wire:02X?}"
    );
}

fn bs(s: &str) -> ByteString {
    ByteString::from(s)
}
fn topic(s: &str) -> TopicName {
    TopicName::new(s.to_string()).unwrap()
}
fn filter(s: &str) -> TopicFilter {
    TopicFilter::new(s.to_string()).unwrap()
}

fn connect(protocol: ProtocolVersion) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        client_id: bs("c1"),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

fn publish(qos: QoS, packet_id: u16, t: &str, payload: &'static [u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic(t),
        packet_id,
        payload: Bytes::from_static(payload),
        properties: PublishProps::none(),
    }
}

// ------------------------------------------------------------------------------------------
// Byte-exact encodings.

#[test]
fn connect_311_with_will_and_credentials() {
    let mut c = connect(V311);
    c.will = Some(LastWill {
        topic: topic("w/t"),
        payload: Bytes::from_static(b"bye"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: WillProperties::default(),
    });
    c.username = Some(bs("u"));
    c.password = Some(Bytes::from_static(b"p"));
    // Flags 0xEE: user name, password, will retain, will QoS 1, will, clean session.
    both_ways(
        &Packet::Connect(Box::new(c)),
        V311,
        "10 1E 0004 4D515454 04 EE 003C 0002 6331 0003 772F74 0003 627965 0001 75 0001 70",
    );
}

#[test]
fn connect_31_uses_mqisdp_level_3() {
    both_ways(
        &Packet::Connect(Box::new(connect(V31))),
        V31,
        "10 10 0006 4D5149736470 03 02 003C 0002 6331",
    );
    // 3.1 clients that set the user name and password flags but send neither field are
    // accepted as if the flags were clear (mosquitto does the same); 3.1.1 ones are not.
    assert_eq!(
        dec(&hex("10 10 0006 4D5149736470 03 C2 003C 0002 6331"), V31),
        Ok(Some(Packet::Connect(Box::new(connect(V31)))))
    );
    assert_eq!(
        dec_err(&hex("10 0E 0004 4D515454 04 C2 003C 0002 6331"), V311),
        DecodeError::UnexpectedEnd { field: "user name" }
    );
    // A 3.1 client id longer than 23 bytes is accepted, as mosquitto does.
    let mut c = connect(V31);
    c.client_id = bs(&"x".repeat(40));
    let wire = enc(&Packet::Connect(Box::new(c.clone())), V31);
    assert_eq!(dec(&wire, V31), Ok(Some(Packet::Connect(Box::new(c)))));
}

#[test]
fn connect_is_decoded_whatever_the_connection_version_says() {
    let wire = hex("10 0F 0004 4D515454 05 02 003C 00 0002 6331");
    for v in [V31, V311, V5] {
        assert_eq!(
            dec(&wire, v),
            Ok(Some(Packet::Connect(Box::new(connect(V5))))),
            "{v:?}"
        );
    }
}

#[test]
fn connect_v5_with_properties_will_properties_and_password_only() {
    let mut c = connect(V5);
    c.properties.session_expiry_interval = Some(10);
    c.properties.receive_maximum = Some(20);
    c.will = Some(LastWill {
        topic: topic("w"),
        payload: Bytes::new(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: Some(5),
            ..Default::default()
        },
    });
    // v5 allows a password without a user name [MQTT-3.1.2.9].
    c.password = Some(Bytes::from_static(b"pw"));
    both_ways(
        &Packet::Connect(Box::new(c)),
        V5,
        "10 26 0004 4D515454 05 46 003C
         08 11 0000000A 21 0014
         0002 6331
         05 18 00000005 0001 77 0000
         0002 7077",
    );
}

#[test]
fn connack_v3_return_codes_and_v5_properties() {
    let ack = |sp, r| {
        Packet::ConnAck(Box::new(ConnAck {
            session_present: sp,
            reason: r,
            properties: ConnAckProperties::default(),
        }))
    };
    both_ways(&ack(false, ReasonCode::SUCCESS), V311, "20 02 00 00");
    both_ways(&ack(true, ReasonCode::SUCCESS), V311, "20 02 01 00");
    for (reason, rc) in [
        (ReasonCode::UNSUPPORTED_PROTOCOL_VERSION, 1),
        (ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, 2),
        (ReasonCode::SERVER_UNAVAILABLE, 3),
        (ReasonCode::BAD_USER_NAME_OR_PASSWORD, 4),
        (ReasonCode::NOT_AUTHORIZED, 5),
    ] {
        both_ways(&ack(false, reason), V311, &format!("20 02 00 {rc:02X}"));
    }
    // A v5-only failure has no 3.1.1 code: "server unavailable" is the closest.
    assert_eq!(
        enc(&ack(false, ReasonCode::BANNED), V311),
        hex("20 02 00 03")
    );
    assert_eq!(
        enc(&ack(false, ReasonCode::QUOTA_EXCEEDED), V31),
        hex("20 02 00 03")
    );
    // v3 return code 6 does not exist.
    assert_eq!(
        dec_err(&hex("20 02 00 06"), V311),
        DecodeError::InvalidReturnCode { code: 6 }
    );

    // v5: reason byte as is, then properties.
    both_ways(&ack(false, ReasonCode::BANNED), V5, "20 03 00 8A 00");
    let mut props = ConnAckProperties {
        receive_maximum: Some(10),
        maximum_qos: Some(QoS::AtLeastOnce),
        retain_available: Some(false),
        ..Default::default()
    };
    both_ways(
        &Packet::ConnAck(Box::new(ConnAck {
            session_present: false,
            reason: ReasonCode::SUCCESS,
            properties: props.clone(),
        })),
        V5,
        "20 0A 00 00 07 21 000A 24 01 25 00",
    );
    props.assigned_client_identifier = Some(bs("auto-1"));
    props.user_properties = vec![(bs("k"), bs("v")), (bs("k"), bs("v2"))];
    let p = Packet::ConnAck(Box::new(ConnAck {
        session_present: true,
        reason: ReasonCode::SUCCESS,
        properties: props,
    }));
    assert_eq!(dec(&enc(&p, V5), V5), Ok(Some(p)));
}

#[test]
fn publish_qos0_and_qos1_with_properties() {
    both_ways(
        &Packet::Publish(publish(QoS::AtMostOnce, 0, "a/b", b"hi")),
        V311,
        "30 07 0003 612F62 6869",
    );
    // v5 QoS 0 without properties still carries a zero property length.
    both_ways(
        &Packet::Publish(publish(QoS::AtMostOnce, 0, "a/b", b"hi")),
        V5,
        "30 08 0003 612F62 00 6869",
    );
    let mut p = publish(QoS::AtLeastOnce, 10, "a/b", b"hi");
    p.retain = true;
    p.dup = true;
    both_ways(
        &Packet::Publish(p.clone()),
        V311,
        "3B 09 0003 612F62 000A 6869",
    );
    p.properties.payload_format_indicator = Some(1);
    p.properties.topic_alias = Some(5);
    both_ways(
        &Packet::Publish(p),
        V5,
        "3B 0F 0003 612F62 000A 05 01 01 23 0005 6869",
    );
    let mut q = publish(QoS::ExactlyOnce, 0xFFFF, "x", b"");
    q.properties.subscription_identifiers = vec![1, 268_435_455];
    q.properties.response_topic = Some(topic("reply/to"));
    q.properties.correlation_data = Some(Bytes::from_static(b"\x00\x01"));
    q.properties.user_properties = vec![(bs("a"), bs("b"))];
    q.properties.content_type = Some(bs("text/plain"));
    q.properties.message_expiry_interval = Some(3600);
    let q = Packet::Publish(q);
    assert_eq!(dec(&enc(&q, V5), V5), Ok(Some(q)));
}

#[test]
fn publish_v5_empty_topic_needs_alias() {
    let got = dec(&hex("30 07 0000 03 23 0001 78"), V5).unwrap().unwrap();
    let Packet::Publish(p) = got else {
        panic!("{got:?}")
    };
    assert_eq!(p.topic, TopicName::alias_placeholder());
    assert_eq!(p.properties.topic_alias, Some(1));
    assert_eq!(&p.payload[..], b"x");
    let e = dec_err(&hex("30 04 0000 00 78"), V5);
    assert_eq!(e, DecodeError::EmptyTopicWithoutAlias);
    assert_eq!(e.reason_code(), ReasonCode::PROTOCOL_ERROR);
    // MQTT 3 has no aliases: an empty topic is just an invalid topic name [MQTT-4.7.3-1].
    let e = dec_err(&hex("30 03 0000 78"), V311);
    assert!(matches!(
        e,
        DecodeError::InvalidTopicName {
            source: TopicError::Empty,
            ..
        }
    ));
    assert_eq!(
        dec_err(&hex("30 07 0000 03 23 0000 78"), V5),
        DecodeError::TopicAliasZero
    );
    assert_eq!(
        DecodeError::TopicAliasZero.reason_code(),
        ReasonCode::TOPIC_ALIAS_INVALID
    );
}

#[test]
fn publish_fields_are_slices_of_the_read_buffer() {
    let mut buf = BytesMut::from(&hex("32 0C 0003 612F62 0001 68656C6C6F")[..]);
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let Some(Packet::Publish(p)) = decode(&mut buf, V311, &Limits::default()).unwrap() else {
        panic!()
    };
    assert_eq!(&p.payload[..], b"hello");
    assert!(
        range.contains(&(p.payload.as_ptr() as usize)),
        "payload copied"
    );
    assert!(
        range.contains(&(p.topic.as_str().as_ptr() as usize)),
        "topic copied"
    );
}

#[test]
fn subscribe_options_byte_and_suback() {
    let sub = |filters, properties| {
        Packet::Subscribe(Subscribe {
            packet_id: 10,
            filters,
            properties,
        })
    };
    let o = |q| SubscriptionOptions {
        qos: q,
        ..Default::default()
    };
    both_ways(
        &sub(
            vec![
                (filter("a/b"), o(QoS::AtLeastOnce)),
                (filter("c/#"), o(QoS::ExactlyOnce)),
            ],
            SubscribeProperties::default(),
        ),
        V311,
        "82 0E 000A 0003 612F62 01 0003 632F23 02",
    );
    // QoS 1 | no local | retain as published | retain handling 2 = 0x2D.
    let opts = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        no_local: true,
        retain_as_published: true,
        retain_handling: RetainHandling::Never,
    };
    both_ways(
        &sub(
            vec![(filter("a/b"), opts)],
            SubscribeProperties {
                subscription_identifier: Some(5),
                user_properties: vec![],
            },
        ),
        V5,
        "82 0B 000A 02 0B 05 0003 612F62 2D",
    );
    // A two-byte subscription identifier (variable byte integer).
    both_ways(
        &sub(
            vec![(filter("$share/g/x"), o(QoS::AtMostOnce))],
            SubscribeProperties {
                subscription_identifier: Some(128),
                user_properties: vec![],
            },
        ),
        V5,
        "82 13 000A 03 0B 8001 000A 2473686172652F672F78 00",
    );

    let suback = |codes: Vec<u8>| {
        Packet::SubAck(SubAck {
            packet_id: 10,
            reason_codes: codes.into_iter().map(ReasonCode).collect(),
            properties: AckProperties::default(),
        })
    };
    both_ways(&suback(vec![1, 0x80]), V311, "90 04 000A 01 80");
    // Any v5 failure code becomes 0x80 for v3.
    assert_eq!(
        enc(&suback(vec![2, 0x87, 0xA2]), V311),
        hex("90 05 000A 02 80 80")
    );
    both_ways(&suback(vec![2, 0x87, 0xA2]), V5, "90 06 000A 00 02 87 A2");
    // v3 SUBACK codes are only 0, 1, 2 and 0x80.
    assert!(matches!(
        dec_err(&hex("90 03 000A 87"), V311),
        DecodeError::InvalidReasonCode { code: 0x87, .. }
    ));
}

#[test]
fn unsubscribe_and_unsuback() {
    let unsub = Packet::Unsubscribe(Unsubscribe {
        packet_id: 11,
        filters: vec![filter("a/b")],
        user_properties: vec![],
    });
    both_ways(&unsub, V311, "A2 07 000B 0003 612F62");
    both_ways(&unsub, V5, "A2 08 000B 00 0003 612F62");
    let unsuback = Packet::UnsubAck(UnsubAck {
        packet_id: 11,
        reason_codes: vec![ReasonCode::NO_SUBSCRIPTION_EXISTED],
        properties: AckProperties::default(),
    });
    // v3 UNSUBACK has no payload: the reason codes are dropped.
    assert_eq!(enc(&unsuback, V311), hex("B0 02 000B"));
    both_ways(&unsuback, V5, "B0 04 000B 00 11");
    assert!(matches!(
        dec_err(&hex("B0 03 000B 00"), V311),
        DecodeError::TrailingBytes { .. }
    ));
}

#[test]
fn ping_and_disconnect() {
    for v in [V31, V311, V5] {
        both_ways(&Packet::PingReq, v, "C0 00");
        both_ways(&Packet::PingResp, v, "D0 00");
        both_ways(&Packet::Disconnect(Disconnect::default()), v, "E0 00");
    }
    // v5 with a reason code: we always write the property length (as mosquitto does; rumqttc
    // 0.25 cannot parse the legal 1-byte form), and still read the 1-byte form
    // [MQTT-3.14.2.1].
    let with_will = Disconnect {
        reason: ReasonCode::DISCONNECT_WITH_WILL,
        properties: DisconnectProperties::default(),
    };
    both_ways(&Packet::Disconnect(with_will.clone()), V5, "E0 02 04 00");
    assert_eq!(
        dec(&hex("E0 01 04"), V5),
        Ok(Some(Packet::Disconnect(with_will.clone())))
    );
    // v3 DISCONNECT has no reason code.
    assert_eq!(enc(&Packet::Disconnect(with_will), V311), hex("E0 00"));
    both_ways(
        &Packet::Disconnect(Disconnect {
            reason: ReasonCode::SUCCESS,
            properties: DisconnectProperties {
                session_expiry_interval: Some(0),
                ..Default::default()
            },
        }),
        V5,
        "E0 07 00 05 11 00000000",
    );
    // A reason code DISCONNECT may not carry.
    assert!(matches!(
        dec_err(&hex("E0 01 01"), V5),
        DecodeError::InvalidReasonCode { code: 1, .. }
    ));
}

#[test]
fn puback_family_short_forms() {
    for v in [V31, V311, V5] {
        both_ways(&Packet::PubAck(PubResp::new(1)), v, "40 02 0001");
        both_ways(&Packet::PubRec(PubResp::new(1)), v, "50 02 0001");
        both_ways(&Packet::PubRel(PubResp::new(1)), v, "62 02 0001");
        both_ways(&Packet::PubComp(PubResp::new(1)), v, "70 02 0001");
    }
    let mut r = PubResp::new(1);
    r.reason = ReasonCode::NO_MATCHING_SUBSCRIBERS;
    both_ways(&Packet::PubAck(r.clone()), V5, "40 03 0001 10");
    assert_eq!(enc(&Packet::PubAck(r.clone()), V311), hex("40 02 0001"));
    r.properties.reason_string = Some(bs("ok"));
    both_ways(&Packet::PubAck(r), V5, "40 09 0001 10 05 1F 0002 6F6B");
    // Explicit success with an empty property list decodes like the short form.
    assert_eq!(
        dec(&hex("40 04 0001 00 00"), V5),
        Ok(Some(Packet::PubAck(PubResp::new(1))))
    );
    let mut rel = PubResp::new(7);
    rel.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
    both_ways(&Packet::PubRel(rel), V5, "62 03 0007 92");
    // 0x10 is a PUBACK code, not a PUBCOMP one.
    assert!(matches!(
        dec_err(&hex("70 03 0007 10"), V5),
        DecodeError::InvalidReasonCode { code: 0x10, .. }
    ));
    // v3 PUBACK is exactly two bytes.
    assert!(matches!(
        dec_err(&hex("40 03 0001 00"), V311),
        DecodeError::TrailingBytes { .. }
    ));
}

#[test]
fn auth_is_v5_only() {
    both_ways(&Packet::Auth(Box::default()), V5, "F0 00");
    both_ways(
        &Packet::Auth(Box::new(Auth {
            reason: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: AuthProperties {
                authentication_method: Some(bs("X")),
                ..Default::default()
            },
        })),
        V5,
        "F0 06 18 04 15 0001 58",
    );
    for v in [V31, V311] {
        assert_eq!(dec_err(&hex("F0 00"), v), DecodeError::AuthBeforeV5);
    }
}

#[test]
fn remaining_length_boundaries() {
    // [MQTT-1.5.5] table: the smallest and largest value of each encoded length.
    for (value, wire) in [
        (0u32, "00"),
        (127, "7F"),
        (128, "8001"),
        (16_383, "FF7F"),
        (16_384, "808001"),
        (2_097_151, "FFFF7F"),
        (2_097_152, "80808001"),
        (268_435_455, "FFFFFF7F"),
    ] {
        let mut b = BytesMut::new();
        Sink::var_int(&mut b, value);
        assert_eq!(b.to_vec(), hex(wire), "{value}");
        assert_eq!(encode::var_int_len(value), b.len());
        // The decoder reads the same header: with a limit one byte too small it reports the
        // exact total size, without needing the body.
        let mut header = BytesMut::from(&hex(&format!("30 {wire}"))[..]);
        let total = 1 + b.len() as u64 + u64::from(value);
        let limits = Limits {
            max_packet_size: (total - 1) as u32,
        };
        assert_eq!(
            decode(&mut header, V311, &limits),
            Err(DecodeError::PacketTooLarge {
                size: total,
                max: (total - 1) as u32
            })
        );
    }
    // Whole PUBLISH packets at each boundary up to 2 MiB round-trip with that header.
    for (value, wire) in [
        (127u32, "7F"),
        (128, "8001"),
        (16_383, "FF7F"),
        (16_384, "808001"),
        (2_097_151, "FFFF7F"),
        (2_097_152, "80808001"),
    ] {
        let payload = Bytes::from(vec![0xAB; value as usize - 3]);
        let p = Packet::Publish(Publish {
            payload,
            ..publish(QoS::AtMostOnce, 0, "t", b"")
        });
        let bytes = enc(&p, V311);
        assert_eq!(bytes[1..1 + wire.len() / 2], hex(wire)[..], "{value}");
        assert_eq!(bytes.len(), 1 + wire.len() / 2 + value as usize);
        assert_eq!(dec(&bytes, V311), Ok(Some(p)));
    }
}

#[test]
fn v5_only_fields_are_dropped_for_v3_peers() {
    let mut p = publish(QoS::AtLeastOnce, 9, "a", b"x");
    p.properties.message_expiry_interval = Some(5);
    p.properties.subscription_identifiers = vec![3];
    let wire = enc(&Packet::Publish(p.clone()), V311);
    assert_eq!(wire, hex("32 06 0001 61 0009 78"));
    p.properties = PublishProps::none();
    assert_eq!(dec(&wire, V311), Ok(Some(Packet::Publish(p))));
    let sub = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            filter("a"),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::Never,
            },
        )],
        properties: SubscribeProperties {
            subscription_identifier: Some(4),
            user_properties: vec![],
        },
    });
    // Only the QoS bits of the options byte exist in 3.1.1.
    assert_eq!(enc(&sub, V311), hex("82 06 0001 0001 61 01"));
}

// ------------------------------------------------------------------------------------------
// Resumability and limits.

#[test]
fn one_byte_at_a_time_yields_none_until_the_last_byte() {
    let mut c = connect(V5);
    c.properties.user_properties = vec![(bs("k"), bs("v"))];
    let mut p = publish(QoS::AtLeastOnce, 3, "a/b", &[7; 300]);
    p.properties.message_expiry_interval = Some(9);
    for (packet, v) in [
        (Packet::Connect(Box::new(c)), V5),
        (Packet::Publish(p), V5),
        (Packet::PingReq, V311),
    ] {
        let wire = enc(&packet, v);
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let r = decode(&mut buf, v, &Limits::default()).unwrap();
            if i + 1 < wire.len() {
                assert_eq!(r, None, "byte {i} of {}", wire.len());
                assert_eq!(buf.len(), i + 1, "partial bytes must stay buffered");
            } else {
                assert_eq!(r, Some(packet.clone()));
                assert!(buf.is_empty());
            }
        }
    }
}

#[test]
fn back_to_back_packets_decode_in_order() {
    let mut buf = BytesMut::new();
    encode(&Packet::PingReq, V311, &mut buf);
    encode(
        &Packet::Publish(publish(QoS::AtMostOnce, 0, "t", b"x")),
        V311,
        &mut buf,
    );
    buf.extend_from_slice(&[0x30]); // start of a third
    let l = Limits::default();
    assert_eq!(decode(&mut buf, V311, &l), Ok(Some(Packet::PingReq)));
    assert!(matches!(
        decode(&mut buf, V311, &l),
        Ok(Some(Packet::Publish(_)))
    ));
    assert_eq!(decode(&mut buf, V311, &l), Ok(None));
    assert_eq!(&buf[..], &[0x30]);
}

#[test]
fn oversize_packet_is_rejected_from_the_fixed_header_alone() {
    let limits = Limits {
        max_packet_size: 1024,
    };
    // PUBLISH announcing 16,383 bytes: only 3 bytes are buffered.
    let mut buf = BytesMut::from(&hex("30 FF 7F")[..]);
    let e = decode(&mut buf, V311, &limits).unwrap_err();
    assert_eq!(
        e,
        DecodeError::PacketTooLarge {
            size: 16_386,
            max: 1024
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::PACKET_TOO_LARGE);
    // Exactly at the limit is fine (the limit counts the fixed header).
    let p = Packet::Publish(Publish {
        payload: Bytes::from(vec![1; 1024 - 3 - 3]),
        ..publish(QoS::AtMostOnce, 0, "t", b"")
    });
    let mut buf = BytesMut::new();
    encode(&p, V311, &mut buf);
    assert_eq!(buf.len(), 1024);
    assert_eq!(decode(&mut buf, V311, &limits), Ok(Some(p)));
}

// ------------------------------------------------------------------------------------------
// Malformed input.

#[test]
fn fixed_header_errors_fail_on_the_first_byte() {
    let e = dec_err(&hex("80"), V311);
    assert_eq!(
        e,
        DecodeError::BadFlags {
            packet: "SUBSCRIBE",
            expected: 0b0010,
            got: 0,
            clause: "[MQTT-3.8.1-1]"
        }
    );
    assert_eq!(
        e.to_string(),
        "reserved flags of SUBSCRIBE must be 0010, got 0000 [MQTT-3.8.1-1]"
    );
    assert_eq!(e.reason_code(), ReasonCode::MALFORMED_PACKET);
    for first in ["60", "A0", "C1", "E8", "41", "12"] {
        assert!(
            matches!(dec_err(&hex(first), V5), DecodeError::BadFlags { .. }),
            "{first}"
        );
    }
    assert_eq!(dec_err(&hex("36"), V311), DecodeError::PublishQos3);
    assert!(DecodeError::PublishQos3
        .to_string()
        .contains("[MQTT-3.3.1-4]"));
    assert_eq!(dec_err(&hex("38"), V311), DecodeError::DupOnQos0);
    assert_eq!(
        dec_err(&hex("00 00"), V311),
        DecodeError::ReservedPacketType
    );
    // MQTT 3.1 clients may set DUP on a retransmitted SUBSCRIBE.
    assert!(matches!(
        dec(&hex("8A 08 0001 0003 612F62 00"), V31),
        Ok(Some(Packet::Subscribe(_)))
    ));
}

#[test]
fn five_byte_remaining_length_is_malformed() {
    let e = dec_err(&hex("30 80 80 80 80 01"), V311);
    assert_eq!(e, DecodeError::RemainingLengthTooLong);
    assert_eq!(
        e.to_string(),
        "remaining length exceeds 4 bytes [MQTT-1.5.5]"
    );
    // Detected as soon as the fourth length byte says "more follows".
    assert_eq!(dec_err(&hex("30 FF FF FF FF"), V311), e);
    // Three continuation bytes are just incomplete.
    assert_eq!(dec(&hex("30 FF FF FF"), V311), Ok(None));
}

#[test]
fn lengths_inside_the_body_are_bounded_by_the_remaining_length() {
    // Topic length 10 in a 5-byte body.
    assert_eq!(
        dec_err(&hex("30 05 000A 616263"), V311),
        DecodeError::UnexpectedEnd {
            field: "topic name"
        }
    );
    // QoS 1 PUBLISH too short for its packet identifier.
    assert_eq!(
        dec_err(&hex("32 04 0001 61 00"), V311),
        DecodeError::UnexpectedEnd {
            field: "packet identifier"
        }
    );
    // Property length larger than what is left.
    assert_eq!(
        dec_err(&hex("30 06 0001 61 09 01 01"), V5),
        DecodeError::UnexpectedEnd {
            field: "properties"
        }
    );
    // Property value cut short inside the property block.
    assert_eq!(
        dec_err(&hex("30 06 0001 61 02 02 00"), V5),
        DecodeError::UnexpectedEnd {
            field: "Message Expiry Interval"
        }
    );
    // CONNECT whose client id runs past the end.
    assert!(matches!(
        dec_err(&hex("10 0E 0004 4D515454 04 02 003C 0005 6331"), V311),
        DecodeError::UnexpectedEnd { .. }
    ));
    assert_eq!(
        DecodeError::UnexpectedEnd { field: "x" }.reason_code(),
        ReasonCode::MALFORMED_PACKET
    );
    // PINGREQ with a body.
    assert!(matches!(
        dec_err(&hex("C0 01 00"), V311),
        DecodeError::TrailingBytes { .. }
    ));
}

#[test]
fn strings_must_be_utf8_without_nul() {
    let e = dec_err(&hex("30 06 0003 61FF62 78"), V311);
    assert_eq!(
        e,
        DecodeError::InvalidUtf8 {
            field: "topic name"
        }
    );
    assert!(e.to_string().contains("[MQTT-1.5.4-1]"));
    assert_eq!(e.reason_code(), ReasonCode::MALFORMED_PACKET);
    // A UTF-16 surrogate (U+D800) encoded as UTF-8 is ill-formed [MQTT-1.5.4-1].
    assert_eq!(
        dec_err(&hex("30 05 0003 EDA080"), V311),
        DecodeError::InvalidUtf8 {
            field: "topic name"
        }
    );
    let e = dec_err(&hex("30 05 0003 610062"), V311);
    assert_eq!(
        e,
        DecodeError::NullCharacter {
            field: "topic name"
        }
    );
    assert!(e.to_string().contains("[MQTT-1.5.4-2]"));
    // Client identifier with U+0000.
    assert_eq!(
        dec_err(&hex("10 0E 0004 4D515454 04 02 003C 0002 6300"), V311),
        DecodeError::NullCharacter {
            field: "client identifier"
        }
    );
    // User property value with invalid UTF-8.
    assert_eq!(
        dec_err(&hex("30 0C 0001 61 08 26 0001 6B 0002 C328"), V5),
        DecodeError::InvalidUtf8 {
            field: "User Property value"
        }
    );
}

#[test]
fn publish_topic_and_packet_id_rules() {
    let e = dec_err(&hex("30 05 0003 612F23"), V311);
    assert_eq!(
        e,
        DecodeError::InvalidTopicName {
            field: "PUBLISH topic name",
            source: TopicError::WildcardInName
        }
    );
    assert!(e.to_string().contains("[MQTT-3.3.2-2]"), "{e}");
    assert_eq!(e.reason_code(), ReasonCode::TOPIC_NAME_INVALID);
    let e = dec_err(&hex("32 05 0001 61 0000"), V311);
    assert_eq!(
        e,
        DecodeError::ZeroPacketId {
            packet: "QoS>0 PUBLISH"
        }
    );
    assert!(e.to_string().contains("[MQTT-2.3.1-1]"));
    assert!(matches!(
        dec_err(&hex("82 06 0000 0001 61 00"), V311),
        DecodeError::ZeroPacketId { .. }
    ));
}

#[test]
fn subscribe_rules() {
    let e = dec_err(&hex("82 02 0001"), V311);
    assert_eq!(e, DecodeError::SubscribeWithoutFilters);
    assert!(e.to_string().contains("[MQTT-3.8.3-3]"));
    assert_eq!(e.reason_code(), ReasonCode::PROTOCOL_ERROR);
    assert_eq!(
        dec_err(&hex("A2 02 0001"), V311),
        DecodeError::UnsubscribeWithoutFilters
    );
    let e = dec_err(&hex("82 0A 0001 0005 612F232F62 00"), V311);
    assert_eq!(
        e,
        DecodeError::InvalidTopicFilter(TopicError::BadMultiLevelWildcard)
    );
    assert_eq!(e.reason_code(), ReasonCode::TOPIC_FILTER_INVALID);
    // v3: bits 2..7 of the requested-QoS byte are reserved [MQTT-3.8.3-4 in 3.1.1].
    assert_eq!(
        dec_err(&hex("82 06 0001 0001 61 04"), V311),
        DecodeError::SubscriptionOptionsReserved
    );
    // v5: bits 6, 7 reserved; retain handling 3 is a protocol error; QoS 3 malformed.
    assert_eq!(
        dec_err(&hex("82 07 0001 00 0001 61 40"), V5),
        DecodeError::SubscriptionOptionsReserved
    );
    assert_eq!(
        dec_err(&hex("82 07 0001 00 0001 61 30"), V5),
        DecodeError::RetainHandling3
    );
    assert_eq!(
        dec_err(&hex("82 07 0001 00 0001 61 03"), V5),
        DecodeError::SubscriptionQos3
    );
    // No Local on a shared subscription is a protocol error [MQTT-3.8.3-4].
    assert_eq!(
        dec_err(&hex("82 10 0001 00 000A 2473686172652F672F78 04"), V5),
        DecodeError::NoLocalOnSharedSubscription
    );
}

#[test]
fn connect_rules() {
    // Reserved flag bit 0 [MQTT-3.1.2-3].
    let e = dec_err(&hex("10 0E 0004 4D515454 04 03 003C 0002 6331"), V311);
    assert_eq!(e, DecodeError::ConnectReservedFlag);
    assert!(e.to_string().contains("[MQTT-3.1.2-3]"));
    // Will QoS 1 without the will flag [MQTT-3.1.2-11].
    assert_eq!(
        dec_err(&hex("10 0E 0004 4D515454 04 0A 003C 0002 6331"), V311),
        DecodeError::WillFlagsWithoutWill
    );
    // Will retain without the will flag [MQTT-3.1.2-13].
    assert_eq!(
        dec_err(&hex("10 0E 0004 4D515454 04 22 003C 0002 6331"), V311),
        DecodeError::WillFlagsWithoutWill
    );
    // Will QoS 3 [MQTT-3.1.2-14].
    assert_eq!(
        dec_err(&hex("10 0E 0004 4D515454 04 1E 003C 0002 6331"), V311),
        DecodeError::WillQos3
    );
    // Password without user name: malformed in 3.1.1 [MQTT-3.1.2-22]...
    assert_eq!(
        dec_err(
            &hex("10 11 0004 4D515454 04 42 003C 0002 6331 0001 70"),
            V311
        ),
        DecodeError::PasswordWithoutUsername
    );
    // ...but allowed in v5.
    assert!(matches!(
        dec(&hex("10 12 0004 4D515454 05 42 003C 00 0002 6331 0001 70"), V5),
        Ok(Some(Packet::Connect(c))) if c.password.as_deref() == Some(&b"p"[..]) && c.username.is_none()
    ));
    // Unknown protocol level: CONNACK 0x84 / v3 return code 1.
    let e = dec_err(&hex("10 0E 0004 4D515454 06 02 003C 0002 6331"), V311);
    assert_eq!(e, DecodeError::UnsupportedProtocolVersion { level: 6 });
    assert_eq!(e.reason_code(), ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
    // "MQIsdp" is only level 3.
    assert_eq!(
        dec_err(&hex("10 10 0006 4D5149736470 04 02 003C 0002 6331"), V311),
        DecodeError::UnsupportedProtocolVersion { level: 4 }
    );
    assert!(matches!(
        dec_err(&hex("10 0E 0004 4D515458 04 02 003C 0002 6331"), V311),
        DecodeError::BadProtocolName { .. }
    ));
    // A will topic with a wildcard.
    assert!(matches!(
        dec_err(
            &hex("10 13 0004 4D515454 04 06 003C 0002 6331 0001 23 0000"),
            V311
        ),
        DecodeError::InvalidTopicName {
            field: "will topic",
            source: TopicError::WildcardInName
        }
    ));
}

#[test]
fn property_rules() {
    // Duplicate Payload Format Indicator.
    let e = dec_err(&hex("30 08 0001 61 04 01 00 01 01"), V5);
    assert_eq!(
        e,
        DecodeError::DuplicateProperty {
            name: "Payload Format Indicator"
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::PROTOCOL_ERROR);
    // User properties and (in PUBLISH) subscription identifiers may repeat.
    let Some(Packet::Publish(p)) = dec(
        &hex("30 16 0001 61 12 26 0001 6B 0001 76 26 0001 6B 0001 76 0B 01 0B 02"),
        V5,
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(p.properties.user_properties.len(), 2);
    assert_eq!(p.properties.subscription_identifiers, vec![1, 2]);
    // ...but a SUBSCRIBE carries at most one subscription identifier.
    assert!(matches!(
        dec_err(&hex("82 0B 0001 04 0B 01 0B 02 0001 61 00"), V5),
        DecodeError::DuplicateProperty { .. }
    ));
    // Subscription identifier 0 is a protocol error.
    let e = dec_err(&hex("82 09 0001 02 0B 00 0001 61 00"), V5);
    assert!(matches!(
        e,
        DecodeError::InvalidPropertyValue { value: 0, .. }
    ));
    assert_eq!(e.reason_code(), ReasonCode::PROTOCOL_ERROR);
    // Session Expiry Interval is not a PUBLISH property.
    let e = dec_err(&hex("30 09 0001 61 05 11 00000000"), V5);
    assert_eq!(
        e,
        DecodeError::PropertyNotAllowed {
            id: 0x11,
            packet: "PUBLISH"
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::MALFORMED_PACKET);
    // 0x05 is not a property at all.
    assert_eq!(
        dec_err(&hex("30 06 0001 61 02 05 00"), V5),
        DecodeError::UnknownProperty { id: 5 }
    );
    // Receive Maximum 0 and Maximum Packet Size 0 in CONNECT.
    assert!(matches!(
        dec_err(
            &hex("10 12 0004 4D515454 05 02 003C 03 21 0000 0002 6331"),
            V5
        ),
        DecodeError::InvalidPropertyValue {
            name: "Receive Maximum",
            ..
        }
    ));
    assert!(matches!(
        dec_err(
            &hex("10 14 0004 4D515454 05 02 003C 05 27 00000000 0002 6331"),
            V5
        ),
        DecodeError::InvalidPropertyValue {
            name: "Maximum Packet Size",
            ..
        }
    ));
    // Payload format indicator must be 0 or 1.
    assert!(matches!(
        dec_err(&hex("30 06 0001 61 02 01 02"), V5),
        DecodeError::InvalidPropertyValue { value: 2, .. }
    ));
    // Authentication Data without Authentication Method.
    assert_eq!(
        dec_err(
            &hex("10 13 0004 4D515454 05 02 003C 04 16 0001 41 0002 6331"),
            V5
        ),
        DecodeError::AuthDataWithoutMethod
    );
    // A will property that only CONNECT itself may carry.
    assert!(matches!(
        dec_err(
            &hex("10 1A 0004 4D515454 05 06 003C 00 0002 6331 05 11 00000000 0001 77 0000"),
            V5
        ),
        DecodeError::PropertyNotAllowed { id: 0x11, .. }
    ));
}

#[test]
fn every_error_display_cites_the_spec() {
    let samples = [
        dec_err(&hex("00 00"), V311),
        dec_err(&hex("80"), V311),
        dec_err(&hex("36"), V311),
        dec_err(&hex("30 FF FF FF FF"), V311),
        dec_err(&hex("30 05 000A 616263"), V311),
        dec_err(&hex("30 06 0003 61FF62 78"), V311),
        dec_err(&hex("30 05 0003 612F23"), V311),
        dec_err(&hex("82 02 0001"), V311),
        dec_err(&hex("30 08 0001 61 04 01 00 01 01"), V5),
        dec_err(&hex("10 0E 0004 4D515454 06 02 003C 0002 6331"), V311),
        dec_err(&hex("F0 00"), V311),
    ];
    for e in samples {
        let s = e.to_string();
        assert!(s.contains("[MQTT-"), "{s}");
    }
}

// ------------------------------------------------------------------------------------------
// Property-based: arbitrary valid packets round-trip; arbitrary bytes never panic.

mod prop {
    use super::*;
    use proptest::collection::vec;
    use proptest::option;
    use proptest::prelude::*;

    fn string() -> impl Strategy<Value = ByteString> {
        "[a-zA-Z0-9 é/_-]{0,12}".prop_map(ByteString::from)
    }
    fn bytes() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..24).prop_map(Bytes::from)
    }
    fn topic_name() -> impl Strategy<Value = TopicName> {
        "[a-z$]{1,4}(/[a-z0-9 ]{0,4}){0,3}".prop_map(|s| TopicName::new(s).unwrap())
    }
    fn topic_filter() -> impl Strategy<Value = TopicFilter> {
        let level = prop_oneof!["[a-z]{0,4}", Just("+".to_string())];
        (vec(level, 1..4), any::<bool>(), option::of("[a-z]{1,3}")).prop_map(
            |(levels, hash, share)| {
                let mut f = levels.join("/");
                if f.is_empty() {
                    f.push('e');
                }
                if hash {
                    f.push_str("/#");
                }
                if let Some(g) = share {
                    f = format!("$share/{g}/{f}");
                }
                TopicFilter::new(f).unwrap()
            },
        )
    }
    fn qos() -> impl Strategy<Value = QoS> {
        prop_oneof![
            Just(QoS::AtMostOnce),
            Just(QoS::AtLeastOnce),
            Just(QoS::ExactlyOnce)
        ]
    }
    fn users() -> impl Strategy<Value = Vec<UserProperty>> {
        vec((string(), string()), 0..3)
    }
    fn code(codes: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
        proptest::sample::select(codes).prop_map(ReasonCode)
    }
    fn sub_id() -> impl Strategy<Value = u32> {
        1..=268_435_455u32
    }
    fn ack_props(v5: bool) -> BoxedStrategy<AckProperties> {
        if !v5 {
            return Just(AckProperties::default()).boxed();
        }
        (option::of(string()), users())
            .prop_map(|(reason_string, user_properties)| AckProperties {
                reason_string,
                user_properties,
            })
            .boxed()
    }

    fn will(v5: bool) -> impl Strategy<Value = LastWill> {
        let props = (
            option::of(any::<u32>()),
            option::of(0..=1u8),
            option::of(any::<u32>()),
            option::of(string()),
            option::of(topic_name()),
            option::of(bytes()),
            users(),
        )
            .prop_map(|(d, pfi, mei, ct, rt, cd, up)| WillProperties {
                will_delay_interval: d,
                payload_format_indicator: pfi,
                message_expiry_interval: mei,
                content_type: ct,
                response_topic: rt,
                correlation_data: cd,
                user_properties: up,
            });
        (topic_name(), bytes(), qos(), any::<bool>(), props).prop_map(
            move |(topic, payload, qos, retain, properties)| LastWill {
                topic,
                payload,
                qos,
                retain,
                properties: if v5 { properties } else { Default::default() },
            },
        )
    }

    fn connect(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
        let v5 = v.is_v5();
        let props = (
            option::of(any::<u32>()),
            option::of(1..=u16::MAX),
            option::of(1..=u32::MAX),
            option::of(any::<u16>()),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            users(),
            option::of(string()),
            option::of(bytes()),
        )
            .prop_map(|(se, rm, mps, tam, rri, rpi, up, am, ad)| {
                ConnectProperties {
                    session_expiry_interval: se,
                    receive_maximum: rm,
                    maximum_packet_size: mps,
                    topic_alias_maximum: tam,
                    request_response_information: rri,
                    request_problem_information: rpi,
                    user_properties: up,
                    // Data needs a method.
                    authentication_data: ad.filter(|_| am.is_some()),
                    authentication_method: am,
                }
            });
        (
            any::<bool>(),
            any::<u16>(),
            string(),
            option::of(will(v5)),
            option::of(string()),
            option::of(bytes()),
            props,
        )
            .prop_map(
                move |(clean_start, keep_alive, client_id, will, username, password, p)| {
                    Packet::Connect(Box::new(Connect {
                        protocol: v,
                        clean_start,
                        keep_alive,
                        client_id,
                        will,
                        // v3 needs a user name with a password.
                        password: password.filter(|_| v5 || username.is_some()),
                        username,
                        properties: if v5 { p } else { Default::default() },
                    }))
                },
            )
    }

    fn connack(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
        let v5 = v.is_v5();
        let codes: &'static [u8] = if v5 {
            &[
                0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
                0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
            ]
        } else {
            &[0x00, 0x84, 0x85, 0x88, 0x86, 0x87]
        };
        let p1 = (
            option::of(any::<u32>()),
            option::of(1..=u16::MAX),
            option::of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
            option::of(any::<bool>()),
            option::of(1..=u32::MAX),
            option::of(string()),
            option::of(any::<u16>()),
            option::of(string()),
        );
        let p2 = (
            users(),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            option::of(any::<u16>()),
            option::of(string()),
            option::of(string()),
            option::of(string()),
            option::of(bytes()),
        );
        (any::<bool>(), code(codes), p1, p2).prop_map(move |(sp, reason, a, b)| {
            let properties = ConnAckProperties {
                session_expiry_interval: a.0,
                receive_maximum: a.1,
                maximum_qos: a.2,
                retain_available: a.3,
                maximum_packet_size: a.4,
                assigned_client_identifier: a.5,
                topic_alias_maximum: a.6,
                reason_string: a.7,
                user_properties: b.0,
                wildcard_subscription_available: b.1,
                subscription_identifiers_available: b.2,
                shared_subscription_available: b.3,
                server_keep_alive: b.4,
                response_information: b.5,
                server_reference: b.6,
                authentication_method: b.7,
                authentication_data: b.8,
            };
            Packet::ConnAck(Box::new(ConnAck {
                session_present: sp,
                reason,
                properties: if v5 { properties } else { Default::default() },
            }))
        })
    }

    fn publish(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
        let v5 = v.is_v5();
        let props = (
            option::of(0..=1u8),
            option::of(any::<u32>()),
            option::of(1..=u16::MAX),
            option::of(topic_name()),
            option::of(bytes()),
            users(),
            vec(sub_id(), 0..3),
            option::of(string()),
        )
            .prop_map(|(pfi, mei, ta, rt, cd, up, si, ct)| PublishProperties {
                payload_format_indicator: pfi,
                message_expiry_interval: mei,
                topic_alias: ta,
                response_topic: rt,
                correlation_data: cd,
                user_properties: up,
                subscription_identifiers: si,
                content_type: ct,
            });
        (
            any::<bool>(),
            qos(),
            any::<bool>(),
            topic_name(),
            1..=u16::MAX,
            bytes(),
            props,
            any::<bool>(),
        )
            .prop_map(
                move |(dup, qos, retain, topic, id, payload, props, use_alias)| {
                    let properties = if v5 { props } else { Default::default() };
                    let topic = if v5 && use_alias && properties.topic_alias.is_some() {
                        TopicName::alias_placeholder()
                    } else {
                        topic
                    };
                    let q0 = qos == QoS::AtMostOnce;
                    Packet::Publish(Publish {
                        dup: dup && !q0,
                        qos,
                        retain,
                        topic,
                        packet_id: if q0 { 0 } else { id },
                        payload,
                        properties: properties.into(),
                    })
                },
            )
    }

    fn pub_resp(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
        let v5 = v.is_v5();
        (
            0..4u8,
            any::<u16>(),
            code(&[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]),
            code(&[0x00, 0x92]),
            ack_props(v5),
        )
            .prop_map(move |(kind, packet_id, ack_code, rel_code, properties)| {
                let reason = match (v5, kind) {
                    (false, _) => ReasonCode::SUCCESS,
                    (true, 0 | 1) => ack_code,
                    (true, _) => rel_code,
                };
                let r = PubResp {
                    packet_id,
                    reason,
                    properties,
                };
                match kind {
                    0 => Packet::PubAck(r),
                    1 => Packet::PubRec(r),
                    2 => Packet::PubRel(r),
                    _ => Packet::PubComp(r),
                }
            })
    }

    fn subscribe(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
        let v5 = v.is_v5();
        let opts =
            (qos(), any::<bool>(), any::<bool>(), 0..3u8).prop_map(move |(qos, nl, rap, rh)| {
                SubscriptionOptions {
                    qos,
                    no_local: nl && v5,
                    retain_as_published: rap && v5,
                    retain_handling: match rh {
                        _ if !v5 => RetainHandling::OnSubscribe,
                        0 => RetainHandling::OnSubscribe,
                        1 => RetainHandling::OnNewSubscribe,
                        _ => RetainHandling::Never,
                    },
                }
            });
        (
            1..=u16::MAX,
            vec((topic_filter(), opts), 1..4),
            option::of(sub_id()),
            users(),
        )
            .prop_map(move |(packet_id, mut filters, si, up)| {
                for (f, o) in &mut filters {
                    // No Local is a protocol error on shared subscriptions.
                    if f.is_shared() {
                        o.no_local = false;
                    }
                }
                Packet::Subscribe(Subscribe {
                    packet_id,
                    filters,
                    properties: if v5 {
                        SubscribeProperties {
                            subscription_identifier: si,
                            user_properties: up,
                        }
                    } else {
                        Default::default()
                    },
                })
            })
    }

    fn acks(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
        let v5 = v.is_v5();
        let sub_codes: &'static [u8] = if v5 {
            &[
                0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
            ]
        } else {
            &[0x00, 0x01, 0x02, 0x80]
        };
        let suback = (any::<u16>(), vec(code(sub_codes), 1..4), ack_props(v5)).prop_map(
            |(packet_id, reason_codes, properties)| {
                Packet::SubAck(SubAck {
                    packet_id,
                    reason_codes,
                    properties,
                })
            },
        );
        let unsuback = (
            any::<u16>(),
            vec(code(&[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91]), 1..4),
            ack_props(v5),
        )
            .prop_map(move |(packet_id, codes, properties)| {
                Packet::UnsubAck(UnsubAck {
                    packet_id,
                    reason_codes: if v5 { codes } else { vec![] },
                    properties,
                })
            });
        let unsubscribe = (1..=u16::MAX, vec(topic_filter(), 1..4), users()).prop_map(
            move |(packet_id, filters, up)| {
                Packet::Unsubscribe(Unsubscribe {
                    packet_id,
                    filters,
                    user_properties: if v5 { up } else { vec![] },
                })
            },
        );
        prop_oneof![suback, unsuback, unsubscribe]
    }

    fn control(v: ProtocolVersion) -> BoxedStrategy<Packet> {
        let simple = prop_oneof![
            Just(Packet::PingReq),
            Just(Packet::PingResp),
            Just(Packet::Disconnect(Disconnect::default()))
        ];
        if !v.is_v5() {
            return simple.boxed();
        }
        let disconnect = (
            code(&[
                0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
                0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1,
                0xA2,
            ]),
            option::of(any::<u32>()),
            option::of(string()),
            users(),
            option::of(string()),
        )
            .prop_map(|(reason, se, rs, up, sr)| {
                Packet::Disconnect(Disconnect {
                    reason,
                    properties: DisconnectProperties {
                        session_expiry_interval: se,
                        reason_string: rs,
                        user_properties: up,
                        server_reference: sr,
                    },
                })
            });
        let auth = (
            code(&[0x00, 0x18, 0x19]),
            option::of(string()),
            option::of(bytes()),
            option::of(string()),
            users(),
        )
            .prop_map(|(reason, am, ad, rs, up)| {
                Packet::Auth(Box::new(Auth {
                    reason,
                    properties: AuthProperties {
                        authentication_method: am,
                        authentication_data: ad,
                        reason_string: rs,
                        user_properties: up,
                    },
                }))
            });
        prop_oneof![simple, disconnect, auth].boxed()
    }

    fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
        prop_oneof![
            connect(v).boxed(),
            connack(v).boxed(),
            publish(v).boxed(),
            pub_resp(v).boxed(),
            subscribe(v).boxed(),
            acks(v).boxed(),
            control(v),
        ]
        .boxed()
    }

    fn version() -> impl Strategy<Value = ProtocolVersion> {
        prop_oneof![Just(V31), Just(V311), Just(V5)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn valid_packets_round_trip(
            (v, p) in version().prop_flat_map(|v| (Just(v), packet(v)))
        ) {
            let mut buf = BytesMut::new();
            encode(&p, v, &mut buf);
            prop_assert_eq!(buf.len(), encoded_len(&p, v));
            let got = decode(&mut buf, v, &Limits::default());
            prop_assert_eq!(got, Ok(Some(p)));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..256), v in version()) {
            let mut buf = BytesMut::from(&data[..]);
            // Keep decoding until the input is exhausted or rejected.
            while let Ok(Some(_)) = decode(&mut buf, v, &Limits::default()) {}
        }

        #[test]
        fn valid_prefix_with_mutation_never_panics(
            (v, p) in version().prop_flat_map(|v| (Just(v), packet(v))),
            idx in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<proptest::sample::Index>(),
        ) {
            // Start from a valid packet so the mutation reaches deep into the body.
            let mut bytes = enc(&p, v);
            let i = idx.index(bytes.len());
            bytes[i] = byte;
            bytes.truncate(cut.index(bytes.len()) + 1);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut buf, v, &Limits::default()) {}
        }
    }
}
