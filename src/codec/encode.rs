//! Encoding: [`Packet`] → bytes.
//!
//! Owns: the wire form of every packet for each protocol version, and its exact size. One
//! function per packet writes the body through a [`Sink`]; [`encoded_len`] runs it against a
//! counting sink and [`encode`] runs it against the caller's `BytesMut` after reserving once, so
//! the size and the bytes cannot diverge. Must not touch: validation of what the caller asks to
//! send (the session builds packets from already-validated parts).
//!
//! Behaviour on inputs the wire cannot carry (a caller bug, never peer input): fields that do
//! not apply to the version are dropped (v5 properties and reason codes for v3 peers, mapped as
//! the spec's return codes where 3.1.1 has one); `Connect` is written for `connect.protocol`
//! whatever `version` says; AUTH, which has no v3 form, is written in its v5 form; strings and
//! binaries longer than 65,535 bytes are written with their length truncated to 16 bits (debug
//! builds assert).

use bytes::{BufMut, BytesMut};

use super::packet::*;
use super::props;
use super::reason::ReasonCode;

/// Where encoded bytes go: the output buffer, or a counter that only measures.
pub trait Sink {
    fn u8(&mut self, v: u8);
    fn u16(&mut self, v: u16);
    fn u32(&mut self, v: u32);
    fn slice(&mut self, v: &[u8]);

    /// Variable byte integer [MQTT-1.5.5].
    fn var_int(&mut self, mut v: u32) {
        debug_assert!(v <= props::MAX_VAR_INT);
        loop {
            let mut b = (v & 0x7F) as u8;
            v >>= 7;
            if v != 0 {
                b |= 0x80;
            }
            self.u8(b);
            if v == 0 {
                break;
            }
        }
    }

    /// Binary Data: 16-bit length then bytes [MQTT-1.5.6].
    fn binary(&mut self, v: &[u8]) {
        debug_assert!(
            v.len() <= u16::MAX as usize,
            "field longer than 65535 bytes"
        );
        self.u16(v.len() as u16);
        self.slice(v);
    }

    /// UTF-8 Encoded String [MQTT-1.5.4].
    fn string(&mut self, v: &str) {
        self.binary(v.as_bytes());
    }
}

impl Sink for BytesMut {
    #[inline]
    fn u8(&mut self, v: u8) {
        self.put_u8(v);
    }
    #[inline]
    fn u16(&mut self, v: u16) {
        self.put_u16(v);
    }
    #[inline]
    fn u32(&mut self, v: u32) {
        self.put_u32(v);
    }
    #[inline]
    fn slice(&mut self, v: &[u8]) {
        self.extend_from_slice(v);
    }
}

/// A sink that only counts bytes.
pub struct Count(pub usize);

impl Sink for Count {
    #[inline]
    fn u8(&mut self, _: u8) {
        self.0 += 1;
    }
    #[inline]
    fn u16(&mut self, _: u16) {
        self.0 += 2;
    }
    #[inline]
    fn u32(&mut self, _: u32) {
        self.0 += 4;
    }
    #[inline]
    fn slice(&mut self, v: &[u8]) {
        self.0 += v.len();
    }
}

/// Bytes a variable byte integer takes.
pub fn var_int_len(v: u32) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// The first byte of the fixed header.
fn header_byte(packet: &Packet) -> u8 {
    let t = packet.packet_type() << 4;
    match packet {
        Packet::Publish(p) => {
            t | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain)
        }
        // Reserved flags 0010 [MQTT-3.6.1-1, MQTT-3.8.1-1, MQTT-3.10.1-1].
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => t | 0b0010,
        _ => t,
    }
}

/// v3 CONNACK return code for a reason code [MQTT-3.2.2.3].
fn v3_connack_code(r: ReasonCode) -> u8 {
    match r.0 {
        0x00 => 0,
        0x84 => 1,
        0x85 => 2,
        0x88 => 3,
        0x86 => 4,
        0x87 => 5,
        // Any other failure: "Server unavailable" is the closest 3.1.1 has.
        _ => 3,
    }
}

/// v3 SUBACK return code: 0, 1, 2 granted, 0x80 for any failure [MQTT-3.9.3].
fn v3_suback_code(r: ReasonCode) -> u8 {
    match r.0 {
        c @ 0..=2 => c,
        _ => 0x80,
    }
}

/// Writes the variable header and payload (everything after the remaining length).
fn body(packet: &Packet, version: ProtocolVersion, s: &mut dyn Sink) {
    let v5 = version.is_v5();
    match packet {
        Packet::Connect(c) => connect(c, s),
        Packet::ConnAck(c) => {
            s.u8(u8::from(c.session_present));
            if v5 {
                s.u8(c.reason.0);
                props::write_props(s, |s| props::write_connack(s, &c.properties));
            } else {
                s.u8(v3_connack_code(c.reason));
            }
        }
        Packet::Publish(p) => {
            s.string(p.topic.as_str());
            if p.qos != QoS::AtMostOnce {
                s.u16(p.packet_id);
            }
            if v5 {
                props::write_props(s, |s| props::write_publish(s, &p.properties));
            }
            s.slice(&p.payload);
        }
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            s.u16(r.packet_id);
            if v5 {
                let no_props = r.properties == AckProperties::default();
                // Short forms [MQTT-3.4.2.1]: omit what is default.
                if r.reason != ReasonCode::SUCCESS || !no_props {
                    s.u8(r.reason.0);
                }
                if !no_props {
                    props::write_props(s, |s| props::write_ack(s, &r.properties));
                }
            }
        }
        Packet::Subscribe(sub) => {
            s.u16(sub.packet_id);
            if v5 {
                props::write_props(s, |s| props::write_subscribe(s, &sub.properties));
            }
            for (f, o) in &sub.filters {
                s.string(f.as_str());
                let mut b = o.qos as u8;
                if v5 {
                    b |= u8::from(o.no_local) << 2;
                    b |= u8::from(o.retain_as_published) << 3;
                    b |= match o.retain_handling {
                        RetainHandling::OnSubscribe => 0,
                        RetainHandling::OnNewSubscribe => 1,
                        RetainHandling::Never => 2,
                    } << 4;
                }
                s.u8(b);
            }
        }
        Packet::SubAck(a) => {
            s.u16(a.packet_id);
            if v5 {
                props::write_props(s, |s| props::write_ack(s, &a.properties));
                for r in &a.reason_codes {
                    s.u8(r.0);
                }
            } else {
                for r in &a.reason_codes {
                    s.u8(v3_suback_code(*r));
                }
            }
        }
        Packet::Unsubscribe(u) => {
            s.u16(u.packet_id);
            if v5 {
                props::write_props(s, |s| props::write_users(s, &u.user_properties));
            }
            for f in &u.filters {
                s.string(f.as_str());
            }
        }
        Packet::UnsubAck(a) => {
            s.u16(a.packet_id);
            // v3 UNSUBACK has no payload [MQTT-3.11.3].
            if v5 {
                props::write_props(s, |s| props::write_ack(s, &a.properties));
                for r in &a.reason_codes {
                    s.u8(r.0);
                }
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v5 {
                let no_props = d.properties == DisconnectProperties::default();
                // Remaining length 0 short form [MQTT-3.14.2.1]. With a reason code we
                // always write the property length (as mosquitto does): rumqttc 0.25 cannot
                // parse the legal 1-byte form and reports a bare "connection aborted".
                if d.reason != ReasonCode::NORMAL_DISCONNECTION || !no_props {
                    s.u8(d.reason.0);
                    props::write_props(s, |s| props::write_disconnect(s, &d.properties));
                }
            }
        }
        Packet::Auth(a) => {
            let no_props = a.properties == AuthProperties::default();
            // Same short forms as DISCONNECT [MQTT-3.15.2.1].
            if a.reason != ReasonCode::SUCCESS || !no_props {
                s.u8(a.reason.0);
            }
            if !no_props {
                props::write_props(s, |s| props::write_auth(s, &a.properties));
            }
        }
    }
}

fn connect(c: &Connect, s: &mut dyn Sink) {
    let v5 = c.protocol.is_v5();
    s.string(match c.protocol {
        ProtocolVersion::V31 => "MQIsdp",
        _ => "MQTT",
    });
    s.u8(c.protocol.level());
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | ((w.qos as u8) << 3) | (u8::from(w.retain) << 5);
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    s.u8(flags);
    s.u16(c.keep_alive);
    if v5 {
        props::write_props(s, |s| props::write_connect(s, &c.properties));
    }
    s.string(&c.client_id);
    if let Some(w) = &c.will {
        if v5 {
            props::write_props(s, |s| props::write_will(s, &w.properties));
        }
        s.string(w.topic.as_str());
        s.binary(&w.payload);
    }
    if let Some(u) = &c.username {
        s.string(u);
    }
    if let Some(p) = &c.password {
        s.binary(p);
    }
}

fn body_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let mut count = Count(0);
    body(packet, version, &mut count);
    count.0
}

/// See [`super::encoded_len()`].
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let len = body_len(packet, version);
    1 + var_int_len(len as u32) + len
}

/// See [`super::encode()`].
pub fn encode(packet: &Packet, version: ProtocolVersion, buf: &mut BytesMut) {
    let len = body_len(packet, version);
    buf.reserve(1 + var_int_len(len as u32) + len);
    buf.put_u8(header_byte(packet));
    Sink::var_int(buf, len as u32);
    body(packet, version, buf);
}
