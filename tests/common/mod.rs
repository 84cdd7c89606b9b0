//! Shared helpers for integration tests: an in-process broker on ephemeral loopback ports.
#![allow(dead_code)]

pub mod bin;
pub mod proc;
pub mod v311;

use std::net::SocketAddr;
use std::time::Duration;

use midge::shard::{Broker, ListenerSpec, RuntimeConfig};

/// A broker for one test; shut down and joined on drop.
pub struct TestBroker {
    broker: Option<Broker>,
    /// The shared (REUSEPORT) listener.
    pub addr: SocketAddr,
    /// Each shard's own listener, to place a client on a chosen shard deterministically.
    pub shard_addrs: Vec<SocketAddr>,
    /// The metrics listener, when the test configured one.
    pub metrics_addr: Option<SocketAddr>,
}

impl TestBroker {
    pub fn start(shards: usize) -> TestBroker {
        Self::start_with(shards, |_| {})
    }

    pub fn start_with(shards: usize, tweak: impl FnOnce(&mut RuntimeConfig)) -> TestBroker {
        let mut cfg = RuntimeConfig {
            shards,
            listeners: vec![ListenerSpec {
                addr: "127.0.0.1:0".parse().unwrap(),
                allow_anonymous: true,
                max_connections: 0,
                max_qos: midge::codec::QoS::ExactlyOnce,
                topic_alias_maximum: 10,
                tls: None,
                security: Default::default(),
            }],
            shard_listeners: true,
            ..RuntimeConfig::default()
        };
        tweak(&mut cfg);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let broker = midge::shard::start(cfg).expect("broker starts");
        TestBroker {
            addr: broker.listen_addrs[0],
            shard_addrs: broker.shard_addrs.clone(),
            metrics_addr: broker.metrics_addr,
            broker: Some(broker),
        }
    }

    /// Each shard's counters (a snapshot at most one control tick old).
    pub fn stats(&self) -> Vec<midge::shard::Stats> {
        self.broker.as_ref().map(|b| b.stats()).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn shard_port(&self, shard: usize) -> u16 {
        self.shard_addrs[shard].port()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(b) = self.broker.take() {
            b.shutdown();
            b.join();
        }
    }
}

pub const WAIT: Duration = Duration::from_secs(5);

/// Hand-written MQTT bytes over a blocking `TcpStream`: what these tests send cannot be
/// "fixed" by a client library or hidden by a shared codec bug.
pub mod raw {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::{Duration, Instant};

    pub const V31: u8 = 3;
    pub const V311: u8 = 4;
    pub const V5: u8 = 5;

    fn varint(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
    }

    fn string(s: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    /// Fixed header + remaining length + body.
    pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        varint(body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    /// A will: topic, payload, QoS, retain.
    pub struct Will<'a> {
        pub topic: &'a str,
        pub payload: &'a [u8],
        pub qos: u8,
        pub retain: bool,
    }

    pub fn connect(version: u8, client_id: &str, keepalive: u16, clean: bool) -> Vec<u8> {
        connect_full(version, client_id, keepalive, clean, None, None)
    }

    pub fn connect_full(
        version: u8,
        client_id: &str,
        keepalive: u16,
        clean: bool,
        will: Option<Will>,
        session_expiry: Option<u32>,
    ) -> Vec<u8> {
        let mut b = Vec::new();
        string(if version == V31 { b"MQIsdp" } else { b"MQTT" }, &mut b);
        b.push(version);
        let mut flags = if clean { 0x02 } else { 0 };
        if let Some(w) = &will {
            flags |= 0x04 | (w.qos << 3) | if w.retain { 0x20 } else { 0 };
        }
        b.push(flags);
        b.extend_from_slice(&keepalive.to_be_bytes());
        if version == V5 {
            let mut props = Vec::new();
            if let Some(e) = session_expiry {
                props.push(0x11);
                props.extend_from_slice(&e.to_be_bytes());
            }
            varint(props.len(), &mut b);
            b.extend_from_slice(&props);
        }
        string(client_id.as_bytes(), &mut b);
        if let Some(w) = &will {
            if version == V5 {
                b.push(0); // no will properties
            }
            string(w.topic.as_bytes(), &mut b);
            string(w.payload, &mut b);
        }
        packet(0x10, &b)
    }

    pub fn publish(version: u8, topic: &str, payload: &[u8], qos: u8, pid: u16) -> Vec<u8> {
        let mut b = Vec::new();
        string(topic.as_bytes(), &mut b);
        if qos > 0 {
            b.extend_from_slice(&pid.to_be_bytes());
        }
        if version == V5 {
            b.push(0);
        }
        b.extend_from_slice(payload);
        packet(0x30 | (qos << 1), &b)
    }

    pub fn subscribe(version: u8, pid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        let mut b = pid.to_be_bytes().to_vec();
        if version == V5 {
            b.push(0);
        }
        for (f, q) in filters {
            string(f.as_bytes(), &mut b);
            b.push(*q);
        }
        packet(0x82, &b)
    }

    pub fn disconnect() -> Vec<u8> {
        vec![0xE0, 0x00]
    }

    /// One packet read from the broker: first byte and body.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Pkt {
        pub first: u8,
        pub body: Vec<u8>,
    }

    impl Pkt {
        pub fn kind(&self) -> u8 {
            self.first >> 4
        }
        /// The reason code of a v5 DISCONNECT (0 when the body is empty).
        pub fn disconnect_reason(&self) -> Option<u8> {
            (self.kind() == 14).then(|| self.body.first().copied().unwrap_or(0))
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    pub enum Read1 {
        Packet(Pkt),
        /// The broker closed the connection (EOF or reset).
        Closed,
        /// Nothing within the timeout.
        Timeout,
    }

    pub struct Raw {
        pub s: TcpStream,
        buf: Vec<u8>,
    }

    impl Raw {
        pub fn open(addr: SocketAddr) -> Raw {
            let s = TcpStream::connect(addr).expect("tcp connect");
            s.set_nodelay(true).ok();
            Raw { s, buf: Vec::new() }
        }

        pub fn from_stream(s: TcpStream) -> Raw {
            Raw { s, buf: Vec::new() }
        }

        pub fn send(&mut self, bytes: &[u8]) {
            self.s.write_all(bytes).expect("write to broker");
        }

        /// Send, tolerating a broker that already closed (for bad-input tests).
        pub fn send_lenient(&mut self, bytes: &[u8]) {
            let _ = self.s.write_all(bytes);
        }

        fn parse(&mut self) -> Option<Pkt> {
            let mut len = 0usize;
            let mut mul = 1usize;
            let mut i = 1;
            loop {
                let b = *self.buf.get(i)?;
                len += (b & 0x7f) as usize * mul;
                mul *= 128;
                i += 1;
                if b & 0x80 == 0 {
                    break;
                }
            }
            if self.buf.len() < i + len {
                return None;
            }
            let first = self.buf[0];
            let body = self.buf[i..i + len].to_vec();
            self.buf.drain(..i + len);
            Some(Pkt { first, body })
        }

        pub fn read(&mut self, within: Duration) -> Read1 {
            let deadline = Instant::now() + within;
            loop {
                if let Some(p) = self.parse() {
                    return Read1::Packet(p);
                }
                let now = Instant::now();
                if now >= deadline {
                    return Read1::Timeout;
                }
                self.s
                    .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                    .ok();
                let mut chunk = [0u8; 4096];
                match self.s.read(&mut chunk) {
                    Ok(0) => return Read1::Closed,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return Read1::Closed,
                }
            }
        }

        /// The next packet, or panic naming `what`.
        pub fn expect(&mut self, what: &str, within: Duration) -> Pkt {
            match self.read(within) {
                Read1::Packet(p) => p,
                other => panic!("expected {what}, got {other:?}"),
            }
        }

        /// Connect and check the CONNACK accepts (returns session_present).
        pub fn handshake(&mut self, connect: &[u8]) -> bool {
            self.send(connect);
            let p = self.expect("CONNACK", super::WAIT);
            assert_eq!(p.kind(), 2, "expected CONNACK, got {p:?}");
            assert_eq!(p.body.get(1), Some(&0), "CONNACK refused: {p:?}");
            p.body[0] & 1 == 1
        }

        /// Packets the broker sent before it closed the connection within `within`; panics if
        /// it is still open then.
        pub fn until_closed(&mut self, within: Duration) -> Vec<Pkt> {
            let deadline = Instant::now() + within;
            let mut got = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.read(left) {
                    Read1::Packet(p) => got.push(p),
                    Read1::Closed => return got,
                    Read1::Timeout => {
                        panic!("connection still open after {within:?}; received {got:?}")
                    }
                }
            }
        }
    }

    /// A connected, accepted raw client.
    pub fn client(addr: SocketAddr, version: u8, id: &str) -> Raw {
        let mut r = Raw::open(addr);
        r.handshake(&connect(version, id, 30, true));
        r
    }
}

/// The broker still serves a normal client: subscribe and receive our own QoS 1 publish.
pub fn assert_serves(addr: SocketAddr) {
    use raw::*;
    let mut c = client(addr, V311, "health-check");
    c.send(&subscribe(V311, 1, &[("health/check", 1)]));
    let p = c.expect("SUBACK", WAIT);
    assert_eq!(p.kind(), 9, "expected SUBACK, got {p:?}");
    c.send(&publish(V311, "health/check", b"ok", 1, 2));
    let mut saw_ack = false;
    let mut saw_msg = false;
    while !(saw_ack && saw_msg) {
        let p = c.expect("PUBACK and PUBLISH", WAIT);
        match p.kind() {
            4 => saw_ack = true,
            3 => {
                assert!(p.body.ends_with(b"ok"));
                let pid = &p.body[2 + 12..2 + 12 + 2];
                c.send(&[0x40, 0x02, pid[0], pid[1]]);
                saw_msg = true;
            }
            _ => panic!("unexpected {p:?}"),
        }
    }
    c.send(&raw::disconnect());
}
