//! One simulated device's connection: TCP (TCP_NODELAY) with a connect timeout, optional
//! mutual TLS, and the MQTT CONNECT/CONNACK exchange, each phase timed separately.
//!
//! Owns: the byte stream type and small blocking-free MQTT helpers (send a packet, read the
//! next packet with a deadline). Uses `midge::codec` for every byte of MQTT. Must not touch:
//! scenario logic or statistics.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use midge::codec::{self, Connect, ConnectProperties, Limits, Packet, ProtocolVersion, ReasonCode};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;

/// A device's byte stream: plain TCP or TLS over TCP.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

/// Why a connection attempt failed; `Display` is the reason key in reports.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConnError {
    TcpTimeout,
    Tcp(String),
    TlsTimeout,
    Tls(String),
    ConnackTimeout,
    Refused(u8),
    Protocol(String),
    Closed,
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::TcpTimeout => write!(f, "tcp connect timeout"),
            ConnError::Tcp(e) => write!(f, "tcp: {e}"),
            ConnError::TlsTimeout => write!(f, "tls handshake timeout"),
            ConnError::Tls(e) => write!(f, "tls: {e}"),
            ConnError::ConnackTimeout => write!(f, "connack timeout"),
            ConnError::Refused(c) => write!(f, "connack refused: {}", ReasonCode(*c)),
            ConnError::Protocol(e) => write!(f, "protocol: {e}"),
            ConnError::Closed => write!(f, "closed by broker"),
        }
    }
}

/// Phase durations of one successful connection, in nanoseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub tcp_ns: u64,
    pub tls_ns: u64,
    pub connack_ns: u64,
    pub resumed: bool,
}

/// How to reach the broker and speak to it.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub version: ProtocolVersion,
    pub timeout: Duration,
    pub keep_alive: u16,
    pub server_name: Option<ServerName<'static>>,
}

/// An MQTT connection after CONNACK.
pub struct Conn {
    pub stream: Stream,
    /// Bytes read but not yet decoded.
    pub rbuf: BytesMut,
    pub version: ProtocolVersion,
    /// The broker's v5 Receive Maximum (65535 when absent / v3).
    pub receive_maximum: u16,
}

async fn with_timeout<T>(d: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(d).await;
        None
    })
    .await
}

pub fn decode_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// First source address of [`source_addr`]: 127.0.0.1 is left to everything else.
pub const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Addresses from 127.0.0.2 to 127.255.255.254.
pub const MAX_SOURCE_ADDRS: u32 = 0x7fff_fffe - 0x7f00_0002 + 1;

/// Source address of connection `i` spread round robin over `n` loopback addresses from
/// 127.0.0.2: each source address has its own ephemeral port range towards the broker's
/// address and port, so `n` addresses hold `n` times the connections one address can.
/// `None` when `n` is 0 (let the kernel choose, i.e. 127.0.0.1).
pub fn source_addr(i: u64, n: u32) -> Option<Ipv4Addr> {
    if n == 0 {
        return None;
    }
    let n = n.min(MAX_SOURCE_ADDRS);
    Some(Ipv4Addr::from(
        u32::from(FIRST_SOURCE) + (i % u64::from(n)) as u32,
    ))
}

/// TCP connect from `src` (bind before connect). IP_BIND_ADDRESS_NO_PORT defers the choice of
/// the source port to connect, where the kernel only needs the whole 4-tuple to be unique;
/// a plain bind to port 0 would reserve the port for every destination and exhaust the range
/// at ~28k connections whatever the source address.
async fn tcp_connect_from(addr: SocketAddr, src: Ipv4Addr, d: Duration) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own with a valid c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    sock.bind(&SocketAddr::new(src.into(), 0).into())
        .map_err(|e| io::Error::new(e.kind(), format!("bind {src}: {e}")))?;
    sock.set_nonblocking(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // SAFETY: the descriptor is a valid TCP socket whose ownership moves to the stream.
    let mut s = unsafe { TcpStream::from_raw_fd(sock.into_raw_fd()) };
    // A zero-length send fails with EAGAIN until the connection is established (glommio then
    // waits for POLLOUT), returns 0 once it is, and reports the connect error if it failed.
    match with_timeout(d, s.write(&[])).await {
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connection timed out",
        )),
        Some(Err(e)) => Err(e),
        Some(Ok(_)) => Ok(s),
    }
}

/// Open TCP (+TLS) and complete CONNECT/CONNACK.
pub async fn connect(
    t: &Target,
    tls: Option<Arc<ClientConfig>>,
    client_id: &str,
    clean_start: bool,
) -> Result<(Conn, Timings), ConnError> {
    connect_from(t, tls, client_id, clean_start, None).await
}

/// [`connect`] from source address `src` (None: the kernel's choice).
pub async fn connect_from(
    t: &Target,
    tls: Option<Arc<ClientConfig>>,
    client_id: &str,
    clean_start: bool,
    src: Option<Ipv4Addr>,
) -> Result<(Conn, Timings), ConnError> {
    let mut tm = Timings::default();
    let t0 = Instant::now();
    let tcp = match src {
        None => TcpStream::connect_timeout(t.addr, t.timeout)
            .await
            .map_err(io::Error::from),
        Some(src) => tcp_connect_from(t.addr, src, t.timeout).await,
    };
    let tcp = match tcp {
        Ok(s) => s,
        Err(e) => {
            let msg = e.to_string();
            return Err(if msg.contains("imed out") || msg.contains("canceled") {
                ConnError::TcpTimeout
            } else {
                ConnError::Tcp(short_io(&msg))
            });
        }
    };
    // Without TCP_NODELAY request/response stalls ~40 ms (Nagle + delayed ACK).
    tcp.set_nodelay(true)
        .map_err(|e| ConnError::Tcp(e.to_string()))?;
    tm.tcp_ns = t0.elapsed().as_nanos() as u64;
    let stream = match tls {
        None => Stream::Plain(tcp),
        Some(cfg) => {
            let t1 = Instant::now();
            let name = t
                .server_name
                .clone()
                .ok_or_else(|| ConnError::Tls("no server name".into()))?;
            let conn = futures_rustls::TlsConnector::from(cfg).connect(name, tcp);
            let s = match with_timeout(t.timeout, conn).await {
                None => return Err(ConnError::TlsTimeout),
                Some(Err(e)) => return Err(ConnError::Tls(e.to_string())),
                Some(Ok(s)) => s,
            };
            tm.tls_ns = t1.elapsed().as_nanos() as u64;
            tm.resumed = s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            Stream::Tls(Box::new(s))
        }
    };
    let mut c = Conn {
        stream,
        // Small: idle connections held by the thousand must stay cheap; it grows on demand.
        rbuf: BytesMut::with_capacity(256),
        version: t.version,
        receive_maximum: u16::MAX,
    };
    let t2 = Instant::now();
    let connect = Packet::Connect(Box::new(Connect {
        protocol: t.version,
        clean_start,
        keep_alive: t.keep_alive,
        client_id: ByteString::from(client_id),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }));
    c.send(&connect).await.map_err(|_| ConnError::Closed)?;
    match c.recv(t.timeout).await {
        Err(RecvError::Timeout) => Err(ConnError::ConnackTimeout),
        Err(RecvError::Closed) => Err(ConnError::Closed),
        Err(RecvError::Protocol(e)) => Err(ConnError::Protocol(e)),
        Ok(Packet::ConnAck(ack)) => {
            if ack.reason != ReasonCode::SUCCESS {
                return Err(ConnError::Refused(ack.reason.0));
            }
            if let Some(rm) = ack.properties.receive_maximum {
                c.receive_maximum = rm;
            }
            tm.connack_ns = t2.elapsed().as_nanos() as u64;
            Ok((c, tm))
        }
        Ok(p) => Err(ConnError::Protocol(format!(
            "expected CONNACK, got packet type {}",
            p.packet_type()
        ))),
    }
}

fn short_io(msg: &str) -> String {
    if msg.contains("onnection refused") {
        "connection refused".into()
    } else {
        msg.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_spread_round_robin_from_127_0_0_2() {
        assert_eq!(source_addr(5, 0), None);
        assert_eq!(source_addr(0, 3), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(source_addr(1, 3), Some(Ipv4Addr::new(127, 0, 0, 3)));
        assert_eq!(source_addr(2, 3), Some(Ipv4Addr::new(127, 0, 0, 4)));
        assert_eq!(source_addr(3, 3), Some(Ipv4Addr::new(127, 0, 0, 2)));
        // Past one octet: 127.0.0.2 + 300 = 127.0.1.46.
        assert_eq!(source_addr(300, 1000), Some(Ipv4Addr::new(127, 0, 1, 46)));
        // Every address of 127/8 but .0.0.0, .0.0.1 and the broadcast, never past it.
        assert_eq!(
            source_addr(u64::MAX, u32::MAX),
            source_addr(u64::MAX % u64::from(MAX_SOURCE_ADDRS), MAX_SOURCE_ADDRS)
        );
        assert_eq!(
            source_addr(u64::from(MAX_SOURCE_ADDRS) - 1, MAX_SOURCE_ADDRS),
            Some(Ipv4Addr::new(127, 255, 255, 254))
        );
        for i in 0..10_000u64 {
            let a = source_addr(i * 7919, 40_000).unwrap();
            assert!(a.is_loopback() && a != Ipv4Addr::new(127, 0, 0, 1), "{a}");
        }
    }
}

#[derive(Debug)]
pub enum RecvError {
    Timeout,
    Closed,
    Protocol(String),
}

impl Conn {
    pub async fn send(&mut self, p: &Packet) -> io::Result<()> {
        let mut b = BytesMut::with_capacity(64);
        codec::encode(p, self.version, &mut b);
        self.stream.write_all(&b).await?;
        self.stream.flush().await
    }

    /// Next packet, waiting at most `d`.
    pub async fn recv(&mut self, d: Duration) -> Result<Packet, RecvError> {
        let deadline = Instant::now() + d;
        let mut tmp = [0u8; 4096];
        loop {
            match codec::decode(&mut self.rbuf, self.version, &Limits::default()) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(RecvError::Protocol(decode_err(e))),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RecvError::Timeout);
            }
            match with_timeout(left, self.stream.read(&mut tmp)).await {
                None => return Err(RecvError::Timeout),
                Some(Ok(0)) | Some(Err(_)) => return Err(RecvError::Closed),
                Some(Ok(n)) => self.rbuf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Send DISCONNECT (normal) and close; errors are irrelevant at this point.
    pub async fn disconnect(mut self) {
        let _ = self
            .send(&Packet::Disconnect(codec::Disconnect::default()))
            .await;
        let _ = self.stream.close().await;
    }
}
