//! The metrics listener (`metrics_listener PORT [ADDRESS]`): a deliberately small HTTP/1.x
//! server on its own threads, never on a shard (plain std sockets: no glommio here, and
//! `crate::metrics` stays free of I/O because the shard core uses it).
//!
//! Owns: accepting on the metrics socket, reading one request per connection within bounds,
//! and answering `GET /metrics` (Prometheus text, or OpenMetrics when `Accept` asks for it),
//! `GET /healthz` (200, or 503 naming the shards that do not answer), 404 for other paths,
//! 405 for other methods, 431 for oversized heads, 408 for requests that take too long, 503
//! when too many scrapes are already being served. Must not touch: what the figures are
//! (the [`Endpoints`] the runtime hands in render them) or the shards (nothing here waits on
//! a shard: a stalled shard cannot stall a scrape, and a slow scraper cannot slow a shard).
//!
//! # Bounds (slowloris and friends)
//! A request head larger than [`MAX_HEAD_BYTES`] is refused with 431; a connection that has
//! not sent a complete head within [`REQUEST_TIMEOUT`] (in total, however slowly it trickles)
//! gets 408; at most [`MAX_ACTIVE`] connections are served at once, each on its own short-lived
//! thread; the next ones get an immediate 503 and are closed. One request per connection
//! (`Connection: close`); a request body is never read.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::metrics::expose::Format;

/// Largest request head read (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8 << 10;
/// A request's whole head must arrive within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are answered 503 at accept.
pub const MAX_ACTIVE: usize = 8;
/// How long a response may take to leave.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop looks at the stop flag.
const STOP_POLL_MS: i32 = 200;

/// What the server answers with (the runtime reads its shards' counters in these).
pub struct Endpoints {
    /// The body of `/metrics` in the given format.
    pub metrics: Box<dyn Fn(Format) -> String + Send + Sync>,
    /// `Ok(body)` for 200, `Err(body)` for 503.
    pub health: Box<dyn Fn() -> Result<String, String> + Send + Sync>,
    /// True once the server must stop.
    pub stopped: Box<dyn Fn() -> bool + Send + Sync>,
}

/// Bind the metrics socket (plain std: this runs on its own threads).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sk = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_address(true)?;
    sk.bind(&addr.into())?;
    sk.listen(64)?;
    Ok(sk.into())
}

/// Serve `listener` on a new thread until `endpoints.stopped()`.
pub fn spawn(listener: TcpListener, endpoints: Arc<Endpoints>) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("midge-metrics".into())
        .spawn(move || accept_loop(listener, endpoints))
}

fn accept_loop(listener: TcpListener, endpoints: Arc<Endpoints>) {
    let active = Arc::new(AtomicUsize::new(0));
    while !(endpoints.stopped)() {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for a socket we own, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, STOP_POLL_MS) };
        if n <= 0 {
            continue; // timeout (look at the stop flag) or EINTR
        }
        loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("metrics listener: accept failed: {e}");
                    // EMFILE and friends: back off instead of spinning on poll.
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            if active.load(Ordering::Acquire) >= MAX_ACTIVE {
                busy(stream);
                continue;
            }
            active.fetch_add(1, Ordering::AcqRel);
            let (e, a) = (endpoints.clone(), active.clone());
            let spawned = std::thread::Builder::new()
                .name("midge-scrape".into())
                .spawn(move || {
                    serve(stream, &e);
                    a.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// Too many connections: answer 503 without reading, never blocking the accept loop.
fn busy(stream: TcpStream) {
    let _ = stream.set_nonblocking(true);
    let mut s = stream;
    let _ = s.write_all(&response(
        503,
        "Service Unavailable",
        "text/plain; charset=utf-8",
        &[("Retry-After", "1")],
        b"too many metrics requests at once\n",
        false,
    ));
}

/// The parts of a request head this server looks at.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub accept: Option<&'a str>,
}

/// Parse a complete request head (up to and including the blank line). `None` if it is not
/// HTTP/1.x.
pub fn parse_head(head: &str) -> Option<Request<'_>> {
    let mut lines = head.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let mut accept = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("accept") {
                accept = Some(v.trim());
            }
        }
    }
    Some(Request {
        method,
        path,
        accept,
    })
}

/// What a request gets: status, reason phrase, content type, body.
pub fn answer(req: &Request<'_>, endpoints: &Endpoints) -> (u16, &'static str, String, String) {
    let text = "text/plain; charset=utf-8".to_string();
    if req.method != "GET" && req.method != "HEAD" {
        return (
            405,
            "Method Not Allowed",
            text,
            "only GET and HEAD are served\n".into(),
        );
    }
    match req.path {
        "/metrics" => {
            let format = Format::from_accept(req.accept);
            (
                200,
                "OK",
                format.content_type().into(),
                (endpoints.metrics)(format),
            )
        }
        "/healthz" => match (endpoints.health)() {
            Ok(body) => (200, "OK", text, body),
            Err(body) => (503, "Service Unavailable", text, body),
        },
        _ => (
            404,
            "Not Found",
            text,
            "not found: try /metrics or /healthz\n".into(),
        ),
    }
}

fn response(
    code: u16,
    reason: &str,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n",
        body.len()
    );
    if code == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// Serve one connection: read one head within the bounds, answer, close.
fn serve(mut stream: TcpStream, endpoints: &Endpoints) {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let text = "text/plain; charset=utf-8";
    let reply = loop {
        if let Some(end) = find_head_end(&buf) {
            let head = String::from_utf8_lossy(&buf[..end]);
            let Some(req) = parse_head(&head) else {
                break response(400, "Bad Request", text, &[], b"bad request\n", false);
            };
            let (code, reason, ctype, body) = answer(&req, endpoints);
            break response(
                code,
                reason,
                &ctype,
                &[],
                body.as_bytes(),
                req.method == "HEAD",
            );
        }
        if buf.len() > MAX_HEAD_BYTES {
            break response(
                431,
                "Request Header Fields Too Large",
                text,
                &[],
                b"request head too large\n",
                false,
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break response(
                408,
                "Request Timeout",
                text,
                &[],
                b"request timeout\n",
                false,
            );
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) => return, // closed before a complete request: nothing to answer
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                // The next turn answers 408.
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    };
    let _ = stream.write_all(&reply);
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Let the client read the answer before the socket closes: a close with unread request
    // bytes pending would reset the connection and could discard the response. Bounded.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 1024];
    for _ in 0..16 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(healthy: bool) -> Endpoints {
        Endpoints {
            metrics: Box::new(|f| format!("{f:?}\n")),
            health: Box::new(move || {
                if healthy {
                    Ok("ok\n".into())
                } else {
                    Err("shard 1 has not answered\n".into())
                }
            }),
            stopped: Box::new(|| false),
        }
    }

    #[test]
    fn heads_are_parsed_and_routed() {
        let r = parse_head(
            "GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nACCEPT: application/openmetrics-text\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.path, "/metrics");
        assert_eq!(r.accept, Some("application/openmetrics-text"));
        let e = endpoints(true);
        let (code, _, ctype, body) = answer(&r, &e);
        assert_eq!(code, 200);
        assert!(ctype.starts_with("application/openmetrics-text"));
        assert_eq!(body, "OpenMetrics\n");
        assert!(parse_head("GET /metrics\r\n\r\n").is_none(), "HTTP/0.9");
        assert!(parse_head("GET  /metrics HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_head("\u{0}\u{1} garbage\r\n\r\n").is_none());
        for (head, code) in [
            ("POST /metrics HTTP/1.1\r\n\r\n", 405),
            ("DELETE /healthz HTTP/1.0\r\n\r\n", 405),
            ("GET / HTTP/1.1\r\n\r\n", 404),
            ("GET /metrics/ HTTP/1.1\r\n\r\n", 404),
            ("HEAD /healthz HTTP/1.1\r\n\r\n", 200),
        ] {
            let r = parse_head(head).unwrap();
            assert_eq!(answer(&r, &e).0, code, "{head}");
        }
        let r = parse_head("GET /healthz HTTP/1.1\r\n\r\n").unwrap();
        let (code, _, _, body) = answer(&r, &endpoints(false));
        assert_eq!(code, 503);
        assert!(body.contains("shard 1"));
    }

    #[test]
    fn responses_are_complete_http() {
        let r = response(405, "Method Not Allowed", "text/plain", &[], b"no\n", false);
        let t = String::from_utf8(r).unwrap();
        assert!(t.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(t.contains("Content-Length: 3\r\n"));
        assert!(t.contains("Allow: GET, HEAD\r\n"));
        assert!(t.ends_with("\r\n\r\nno\n"));
        let h = response(200, "OK", "text/plain", &[], b"body", true);
        assert!(String::from_utf8(h).unwrap().ends_with(
            "Content-Length: 4\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n"
        ));
    }
}
