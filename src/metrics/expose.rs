//! The Prometheus text exposition format (0.0.4) and OpenMetrics 1.0, and the table of every
//! metric Midge exports.
//!
//! Owns: [`ALL`] (name, type, labels and help of each metric family: the one list that the
//! scrape writes from, that docs/metrics.md is checked against, and that the dashboards and
//! alert rules are checked against), [`Writer`] (families in either format, label values and
//! help text escaped), and content negotiation from an `Accept` header ([`Format::from_accept`]).
//! Must not touch: where the numbers come from (the shard runtime gathers them) or how they
//! are served (`crate::shard::exporter`, on its own thread).

use std::fmt::Write as _;

use super::HistogramSnapshot;

/// Which text format a scrape is answered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: what every Prometheus understands.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`, when the scraper asks for it.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// OpenMetrics if the `Accept` header ranks it at least as high as the classic text
    /// format (Prometheus sends `application/openmetrics-text;version=1.0.0,...;q=0.75,
    /// text/plain;version=0.0.4;q=0.5,*/*;q=0.1`); the classic format otherwise, and when
    /// there is no header.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let (mut om, mut text) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0f32;
            for p in parts {
                if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                    q = v.trim().parse().unwrap_or(0.0);
                }
            }
            match media.as_str() {
                "application/openmetrics-text" => om = om.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if om > 0.0 && om >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family. Counter names end in `_total` (the sample name in both formats; the
/// OpenMetrics family name drops it).
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

macro_rules! families {
    ($($id:ident: $name:literal, $kind:ident, [$($l:literal),*], $help:literal;)*) => {
        $(pub static $id: Family = Family {
            name: $name,
            kind: Kind::$kind,
            labels: &[$($l),*],
            help: $help,
        };)*
        /// Every family Midge exports, in the order a scrape lists them.
        pub static ALL: &[&Family] = &[$(&$id),*];
    };
}

families! {
    BUILD_INFO: "midge_build_info", Gauge, ["version"],
        "Always 1; the version label says which Midge is running.";
    START_TIME: "midge_start_time_seconds", Gauge, [],
        "When the broker started, in seconds since the Unix epoch.";
    SHARDS: "midge_shards", Gauge, [],
        "Number of shards (one pinned thread each).";
    SHARD_UP: "midge_shard_up", Gauge, ["shard"],
        "1 while the shard's control task ran within the health bound, 0 when it did not (what /healthz reports).";
    SHARD_HEARTBEAT_AGE: "midge_shard_heartbeat_age_seconds", Gauge, ["shard"],
        "Seconds since the shard's control task last ran (it runs every 0.2 s on a healthy shard).";
    CONNECTIONS: "midge_connections", Gauge, ["shard"],
        "Client sockets open on the shard, in every phase (TLS handshake, CONNECT, session).";
    LISTENER_CONNECTIONS: "midge_listener_connections", Gauge, ["listener"],
        "Client sockets open on the listener, across shards (what max_connections limits).";
    LISTENER_ACCEPTED: "midge_listener_connections_accepted_total", Counter, ["listener"],
        "Sockets accepted on the listener (before TLS and CONNECT).";
    CONNECTIONS_REFUSED: "midge_connections_refused_total", Counter, ["shard", "reason"],
        "Connections refused before they had a session, by reason (TLS handshake failures are in midge_tls_handshake_failures_total).";
    CONNECTS: "midge_connects_total", Counter, ["shard"],
        "CONNECTs accepted: connections that were given a session.";
    KEEPALIVE_TIMEOUTS: "midge_keepalive_timeouts_total", Counter, ["shard"],
        "Connections closed for sending nothing within 1.5 times their keepalive.";
    TAKEOVERS: "midge_takeovers_total", Counter, ["shard"],
        "Sessions taken over by a newer connection with the same client id.";
    PEER_TIMEOUTS: "midge_peer_timeouts_total", Counter, ["shard"],
        "Waits on another shard that hit peer_timeout (the client was refused or disconnected).";
    SESSIONS: "midge_sessions", Gauge, ["shard", "state"],
        "Sessions hosted on the shard: live (a client is connected) or offline (persistent, waiting for its client).";
    SUBSCRIPTIONS: "midge_subscriptions", Gauge, ["shard"],
        "Subscriptions of the sessions hosted on the shard.";
    RETAINED_MESSAGES: "midge_retained_messages", Gauge, ["shard"],
        "Retained messages in the shard's replica of the retained store (every shard holds all of them: do not sum).";
    RETAINED_BYTES: "midge_retained_bytes", Gauge, ["shard"],
        "Memory the shard's retained replica is charged for (topics, payloads, properties, trie nodes).";
    PUBLISH_RECEIVED: "midge_publish_received_total", Counter, ["shard", "qos"],
        "PUBLISH packets received from clients (retransmissions included).";
    PUBLISH_RECEIVED_BYTES: "midge_publish_received_bytes_total", Counter, ["shard", "qos"],
        "Payload bytes of the PUBLISH packets received from clients.";
    PUBLISH_SENT: "midge_publish_sent_total", Counter, ["shard", "qos"],
        "PUBLISH packets sent to clients (retransmissions and retained messages included).";
    PUBLISH_SENT_BYTES: "midge_publish_sent_bytes_total", Counter, ["shard", "qos"],
        "Payload bytes of the PUBLISH packets sent to clients.";
    MESSAGES_ROUTED: "midge_messages_routed_total", Counter, ["shard"],
        "Messages routed by the shard where they were published (client messages, wills, $SYS).";
    DELIVERIES: "midge_deliveries_total", Counter, ["shard"],
        "Messages handed to a subscriber's session (sent, or queued for it).";
    FORWARDS: "midge_forwards_total", Counter, ["shard"],
        "Messages forwarded to another shard for its subscribers.";
    DROPPED: "midge_dropped_messages_total", Counter, ["shard", "reason"],
        "Messages not delivered to a subscriber (or not routed at all), by reason.";
    PUBLISHER_PAUSES: "midge_publisher_pauses_total", Counter, ["shard"],
        "Times a publisher was paused because a subscriber it feeds was full.";
    PAUSED_PUBLISHERS: "midge_paused_publishers", Gauge, ["shard"],
        "Publishers paused by flow control right now.";
    SUBSCRIBER_STALLS: "midge_subscriber_stalls_total", Counter, ["shard"],
        "Subscribers cut loose after making no progress for stall_timeout with a full queue.";
    STALLED_SUBSCRIBERS: "midge_stalled_subscribers", Gauge, ["shard"],
        "Subscribers declared stalled right now.";
    STORE_FSYNC_DURATION: "midge_store_fsync_duration_seconds", Histogram, ["shard"],
        "Latency of each fdatasync of the shard's persistence log.";
    STORE_WRITTEN_BYTES: "midge_store_written_bytes_total", Counter, ["shard"],
        "Bytes of records written to the shard's persistence log.";
    STORE_WRITE_ERRORS: "midge_store_write_errors_total", Counter, ["shard"],
        "Writes or syncs of the shard's persistence log that failed (disk full, I/O error; each retry counts).";
    STORE_FAILING: "midge_store_failing", Gauge, ["shard"],
        "1 while the shard's persistence log cannot be written: acknowledgements that need it are held.";
    STORE_BACKLOG_BYTES: "midge_store_backlog_bytes", Gauge, ["shard"],
        "Bytes of records made by the shard and not yet confirmed durable.";
    STORE_HELD_INPUTS: "midge_store_held_inputs_total", Counter, ["shard"],
        "Times a connection's input was held because the shard's persistence backlog reached its bound.";
    STORE_HELD_CLOSES: "midge_store_held_closes_total", Counter, ["shard"],
        "Connections closed (v5: DISCONNECT 0x97) because their input waited on the persistence backlog longer than persistence_timeout.";
    TLS_HANDSHAKES: "midge_tls_handshakes_total", Counter, ["listener", "kind"],
        "TLS handshakes completed, full or resumed.";
    TLS_HANDSHAKE_FAILURES: "midge_tls_handshake_failures_total", Counter, ["listener", "reason"],
        "TLS handshakes that failed, by reason.";
    TLS_HANDSHAKES_IN_PROGRESS: "midge_tls_handshakes_in_progress", Gauge, ["listener"],
        "TLS handshakes under way.";
    TLS_HANDSHAKE_DURATION: "midge_tls_handshake_duration_seconds", Histogram, ["listener", "kind"],
        "Time from accept to a completed TLS handshake.";
    TLS_RELOADS: "midge_tls_reloads_total", Counter, ["listener"],
        "Successful reloads of the listener's TLS material (SIGHUP).";
    TLS_CERT_NOT_AFTER: "midge_tls_server_cert_not_after_timestamp_seconds", Gauge, ["listener"],
        "notAfter of the listener's server certificate, in seconds since the Unix epoch.";
    TLS_CA_NOT_AFTER: "midge_tls_ca_not_after_earliest_timestamp_seconds", Gauge, ["listener"],
        "The earliest notAfter among the CA certificates trusted for clients (cafile, capath), in seconds since the Unix epoch.";
    TLS_CRL_NEXT_UPDATE: "midge_tls_crl_next_update_timestamp_seconds", Gauge, ["listener"],
        "The earliest nextUpdate of the listener's CRLs, in seconds since the Unix epoch; every client is refused once it has passed.";
}

/// Escape a label value (`\`, `"`, newline), the same in both formats.
fn escape_label(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A float as both formats want it: `+Inf`, and integers with a `.0` (OpenMetrics' canonical
/// form for `le`).
fn float(v: f64, out: &mut String) {
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{v:.1}");
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Writes one exposition, family by family.
pub struct Writer {
    out: String,
    format: Format,
    family: Option<&'static Family>,
}

impl Writer {
    pub fn new(format: Format) -> Writer {
        Writer {
            out: String::with_capacity(16 << 10),
            format,
            family: None,
        }
    }

    /// Start family `f`: its HELP and TYPE lines. Its samples follow.
    pub fn family(&mut self, f: &'static Family) {
        self.family = Some(f);
        let name = match (self.format, f.kind) {
            (Format::OpenMetrics, Kind::Counter) => f.name.strip_suffix("_total").unwrap_or(f.name),
            _ => f.name,
        };
        let _ = write!(self.out, "# HELP {name} ");
        for c in f.help.chars() {
            match c {
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                c => self.out.push(c),
            }
        }
        let _ = writeln!(self.out, "\n# TYPE {name} {}", f.kind.as_str());
    }

    fn labels(&mut self, labels: &[(&str, &str)], extra: Option<(&str, &str)>) {
        if labels.is_empty() && extra.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        for (k, v) in labels.iter().copied().chain(extra) {
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_label(v, &mut self.out);
            self.out.push('"');
        }
        self.out.push('}');
    }

    fn current(&self) -> &'static Family {
        // Writing a sample before its family is a programming error caught by the tests; it
        // must not take the scrape down, so fall back to a family that cannot be mistaken.
        self.family.unwrap_or(&BUILD_INFO)
    }

    /// One sample of the current (counter or gauge) family.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: u64) {
        let f = self.current();
        debug_assert!(f.kind != Kind::Histogram);
        debug_assert_eq!(labels.len(), f.labels.len(), "{}", f.name);
        self.out.push_str(f.name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// A sample that may be negative (a date before 1970 in a broken certificate).
    pub fn sample_i64(&mut self, labels: &[(&str, &str)], value: i64) {
        let f = self.current();
        debug_assert_eq!(labels.len(), f.labels.len(), "{}", f.name);
        self.out.push_str(f.name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// A sample whose value is not an integer.
    pub fn sample_f64(&mut self, labels: &[(&str, &str)], value: f64) {
        let f = self.current();
        debug_assert_eq!(labels.len(), f.labels.len(), "{}", f.name);
        self.out.push_str(f.name);
        self.labels(labels, None);
        self.out.push(' ');
        float(value, &mut self.out);
        self.out.push('\n');
    }

    /// The buckets, sum and count of one histogram of the current family, in seconds.
    pub fn histogram(&mut self, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let f = self.current();
        debug_assert_eq!(f.kind, Kind::Histogram);
        let mut cumulative = 0u64;
        let mut le = String::new();
        for (bound, n) in h.bounds_ns.iter().zip(&h.buckets) {
            cumulative += n;
            le.clear();
            float(*bound as f64 / 1e9, &mut le);
            let _ = write!(self.out, "{}_bucket", f.name);
            self.labels(labels, Some(("le", &le)));
            let _ = writeln!(self.out, " {cumulative}");
        }
        cumulative += h.above;
        let _ = write!(self.out, "{}_bucket", f.name);
        self.labels(labels, Some(("le", "+Inf")));
        let _ = writeln!(self.out, " {cumulative}");
        let _ = write!(self.out, "{}_sum", f.name);
        self.labels(labels, None);
        self.out.push(' ');
        float(h.sum_ns as f64 / 1e9, &mut self.out);
        self.out.push('\n');
        let _ = write!(self.out, "{}_count", f.name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {cumulative}");
    }

    /// The finished text (OpenMetrics ends with `# EOF`).
    pub fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_negotiation() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                 version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::from_accept(Some(
                "text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5"
            )),
            Format::Prometheus
        );
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text; q=0")),
            Format::Prometheus
        );
        assert_eq!(
            Format::from_accept(Some("APPLICATION/OpenMetrics-Text")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn names_follow_prometheus_conventions_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for f in ALL {
            assert!(seen.insert(f.name), "{} twice", f.name);
            assert!(f.name.starts_with("midge_"), "{}", f.name);
            assert!(
                f.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                f.name
            );
            assert_eq!(
                f.kind == Kind::Counter,
                f.name.ends_with("_total"),
                "{}",
                f.name
            );
            assert!(!f.help.is_empty() && !f.help.contains('\n'), "{}", f.name);
            for l in f.labels {
                assert!(*l != "le" && !l.starts_with("__"), "{}: label {l}", f.name);
            }
        }
    }

    #[test]
    fn both_formats_write_families_samples_and_histograms() {
        static B: [u64; 2] = [1_000_000, 1_000_000_000];
        let h = HistogramSnapshot {
            bounds_ns: &B,
            buckets: vec![2, 1],
            above: 1,
            sum_ns: 2_500_000_000,
        };
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let mut w = Writer::new(format);
            w.family(&CONNECTS);
            w.sample(&[("shard", "0")], 7);
            w.family(&LISTENER_CONNECTIONS);
            w.sample(&[("listener", "a\"b\\c\nd")], 1);
            w.family(&TLS_HANDSHAKE_DURATION);
            w.histogram(&[("listener", "l"), ("kind", "full")], &h);
            let text = w.finish();
            let om = format == Format::OpenMetrics;
            assert_eq!(
                text.contains("# TYPE midge_connects counter\n"),
                om,
                "{text}"
            );
            assert_eq!(
                text.contains("# TYPE midge_connects_total counter\n"),
                !om,
                "{text}"
            );
            assert!(
                text.contains("midge_connects_total{shard=\"0\"} 7\n"),
                "{text}"
            );
            assert!(
                text.contains("midge_listener_connections{listener=\"a\\\"b\\\\c\\nd\"} 1\n"),
                "{text}"
            );
            assert!(text.contains(
                "midge_tls_handshake_duration_seconds_bucket{listener=\"l\",kind=\"full\",le=\"0.001\"} 2\n"
            ));
            assert!(text.contains(
                "midge_tls_handshake_duration_seconds_bucket{listener=\"l\",kind=\"full\",le=\"1.0\"} 3\n"
            ));
            assert!(text.contains(
                "midge_tls_handshake_duration_seconds_bucket{listener=\"l\",kind=\"full\",le=\"+Inf\"} 4\n"
            ));
            assert!(text.contains(
                "midge_tls_handshake_duration_seconds_sum{listener=\"l\",kind=\"full\"} 2.5\n"
            ));
            assert!(text.contains(
                "midge_tls_handshake_duration_seconds_count{listener=\"l\",kind=\"full\"} 4\n"
            ));
            assert_eq!(text.ends_with("# EOF\n"), om);
        }
    }
}
