//! Log output: how peer-supplied text appears in log lines, the line formats, and which
//! lines are written.
//!
//! Owns: [`escape`], the one way any log line quotes text a client or a certificate chose
//! (client ids, usernames, certificate subjects, topics, reason strings); [`MosquittoFormat`],
//! the line layout mosquitto writes (`TIMESTAMP: message`, with `log_timestamp` /
//! `log_timestamp_format`), and [`JsonFormat`] (`log_format json`: one JSON object per line);
//! [`LogTypes`] (mosquitto's `log_type` set) and the targets that give a line its mosquitto
//! type ([`CONNECTION`], [`NOTICE`], [`SUBSCRIBE`], [`UNSUBSCRIBE`]); [`init`], which installs
//! the subscriber main asks for (colour only on a terminal). Must not touch: what is logged
//! (each module decides).
//!
//! # Log types
//! A line's mosquitto type comes from its target when it is one of the targets above, and
//! from its level otherwise: ERROR → `error`, WARN → `warning`, INFO → `information`, DEBUG →
//! `debug`, TRACE → only with `log_type all`. [`CONNECTION`] lines are `notice` lines that
//! `connection_messages false` also turns off (mosquitto's connect and disconnect lines).
//! `RUST_LOG`, when set, replaces the type filter (a developer's override); it does not
//! bring back what `connection_messages false` turned off.
//!
//! # Connection spans
//! The connection task gives its own lines a span as explicit parent (`conn`, with `shard`,
//! `peer` and, once CONNECT is read, `client`; made for the line, not held per connection); both
//! formats print the span's fields with the line (`[conn shard=0 peer=… client=…]`, or a
//! `"span"` object), so `grep` on a client id or an address finds one device's story. The
//! shard core's lines name their client in the message itself: they are often about another
//! connection than the one whose input is being handled.

use std::ffi::CString;
use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Target of mosquitto's connection lines (`New connection from …`, `New client connected
/// from …`, `Client … disconnected.` …): type `notice`, and off with `connection_messages
/// false`.
pub const CONNECTION: &str = "midge::connection";
/// Target of other `notice` lines (start-up, shutdown, reload).
pub const NOTICE: &str = "midge::notice";
/// Target of `log_type subscribe` lines (`CLIENT QOS FILTER`, as mosquitto).
pub const SUBSCRIBE: &str = "midge::subscribe";
/// Target of `log_type unsubscribe` lines (`CLIENT FILTER`, as mosquitto).
pub const UNSUBSCRIBE: &str = "midge::unsubscribe";

/// A set of mosquitto log types (`log_type`, repeatable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogTypes(u16);

impl LogTypes {
    pub const NONE: LogTypes = LogTypes(0);
    pub const ERROR: LogTypes = LogTypes(1);
    pub const WARNING: LogTypes = LogTypes(1 << 1);
    pub const NOTICE: LogTypes = LogTypes(1 << 2);
    pub const INFORMATION: LogTypes = LogTypes(1 << 3);
    pub const DEBUG: LogTypes = LogTypes(1 << 4);
    pub const SUBSCRIBE: LogTypes = LogTypes(1 << 5);
    pub const UNSUBSCRIBE: LogTypes = LogTypes(1 << 6);
    /// Accepted for mosquitto compatibility; Midge has no WebSockets listener.
    pub const WEBSOCKETS: LogTypes = LogTypes(1 << 7);
    /// Accepted for mosquitto compatibility; nothing is logged as `internal`.
    pub const INTERNAL: LogTypes = LogTypes(1 << 8);
    /// TRACE-level lines: only part of `all`.
    const TRACE: LogTypes = LogTypes(1 << 15);
    pub const ALL: LogTypes = LogTypes(u16::MAX);
    /// mosquitto's default: `error warning notice information`.
    pub const DEFAULT: LogTypes = LogTypes(0b1111);

    const NAMES: [(&'static str, LogTypes); 9] = [
        ("error", LogTypes::ERROR),
        ("warning", LogTypes::WARNING),
        ("notice", LogTypes::NOTICE),
        ("information", LogTypes::INFORMATION),
        ("debug", LogTypes::DEBUG),
        ("subscribe", LogTypes::SUBSCRIBE),
        ("unsubscribe", LogTypes::UNSUBSCRIBE),
        ("websockets", LogTypes::WEBSOCKETS),
        ("internal", LogTypes::INTERNAL),
    ];

    /// A `log_type` value (`none` and `all` included).
    pub fn from_name(name: &str) -> Option<LogTypes> {
        match name {
            "none" => Some(LogTypes::NONE),
            "all" => Some(LogTypes::ALL),
            n => Self::NAMES.iter().find(|(k, _)| *k == n).map(|(_, t)| *t),
        }
    }

    /// The `log_type` lines that give this set (`none`, `all`, or one per type).
    pub fn names(self) -> Vec<&'static str> {
        if self == LogTypes::NONE {
            return vec!["none"];
        }
        if self == LogTypes::ALL {
            return vec!["all"];
        }
        Self::NAMES
            .iter()
            .filter(|(_, t)| self.contains(*t))
            .map(|(n, _)| *n)
            .collect()
    }

    pub fn contains(self, other: LogTypes) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    #[must_use]
    pub fn with(self, other: LogTypes) -> LogTypes {
        LogTypes(self.0 | other.0)
    }

    /// The most verbose tracing level some type in the set needs.
    pub fn max_level(self) -> LevelFilter {
        if self.contains(LogTypes::TRACE) {
            LevelFilter::TRACE
        } else if self.contains(LogTypes::DEBUG) {
            LevelFilter::DEBUG
        } else if self.0 & (0b1100 | LogTypes::SUBSCRIBE.0 | LogTypes::UNSUBSCRIBE.0) != 0 {
            LevelFilter::INFO
        } else if self.contains(LogTypes::WARNING) {
            LevelFilter::WARN
        } else if self.contains(LogTypes::ERROR) {
            LevelFilter::ERROR
        } else {
            LevelFilter::OFF
        }
    }

    /// The mosquitto type of a line (see the module doc).
    pub fn of(meta: &Metadata<'_>) -> LogTypes {
        match meta.target() {
            CONNECTION | NOTICE => return LogTypes::NOTICE,
            SUBSCRIBE => return LogTypes::SUBSCRIBE,
            UNSUBSCRIBE => return LogTypes::UNSUBSCRIBE,
            _ => {}
        }
        match *meta.level() {
            Level::ERROR => LogTypes::ERROR,
            Level::WARN => LogTypes::WARNING,
            Level::INFO => LogTypes::INFORMATION,
            Level::DEBUG => LogTypes::DEBUG,
            Level::TRACE => LogTypes::TRACE,
        }
    }

    /// The name a JSON line gives its type.
    fn name_of(meta: &Metadata<'_>) -> &'static str {
        match Self::of(meta) {
            LogTypes::ERROR => "error",
            LogTypes::WARNING => "warning",
            LogTypes::NOTICE => "notice",
            LogTypes::INFORMATION => "information",
            LogTypes::SUBSCRIBE => "subscribe",
            LogTypes::UNSUBSCRIBE => "unsubscribe",
            _ => "debug",
        }
    }
}

/// `log_format`: mosquitto's lines, or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Mosquitto,
    Json,
}

/// Which lines are written: the `log_type` set, `connection_messages`, and rustls' own
/// warnings kept out (it warns about every client that sends an IP address as SNI, as
/// mosquitto_pub does: not the operator's problem; its errors still show).
#[derive(Debug, Clone, Copy)]
pub struct LineFilter {
    pub types: LogTypes,
    pub connection_messages: bool,
}

impl LineFilter {
    pub fn enabled(&self, meta: &Metadata<'_>) -> bool {
        if meta.is_span() {
            // Spans only carry context; they are "on" whenever anything may be logged.
            return self.types != LogTypes::NONE;
        }
        if meta.target() == CONNECTION && !self.connection_messages {
            return false;
        }
        if meta.target().starts_with("rustls") && *meta.level() > Level::ERROR {
            return false;
        }
        self.types.contains(LogTypes::of(meta))
    }
}

/// Where [`init`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    Stdout,
    Stderr,
}

/// Everything [`init`] needs (main maps the configuration onto it).
#[derive(Debug, Clone)]
pub struct LogSetup {
    pub dest: Dest,
    pub filter: LineFilter,
    pub format: LogFormat,
    pub timestamp: bool,
    pub timestamp_format: Option<String>,
}

/// Install the process's subscriber. Colour (for field names) only on a terminal: journald
/// and files get plain text.
pub fn init(setup: &LogSetup) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let ansi = match setup.dest {
        Dest::Stdout => std::io::stdout().is_terminal(),
        Dest::Stderr => std::io::stderr().is_terminal(),
    } && setup.format == LogFormat::Mosquitto;
    let dest = setup.dest;
    let make_writer = move || -> Box<dyn std::io::Write> {
        match dest {
            Dest::Stdout => Box::new(std::io::stdout()),
            Dest::Stderr => Box::new(std::io::stderr()),
        }
    };
    let f = setup.filter;
    let env = std::env::var_os("RUST_LOG").is_some();
    let env_filter = env.then(tracing_subscriber::EnvFilter::from_default_env);
    let filter = tracing_subscriber::filter::filter_fn(move |m| {
        if env {
            m.target() != CONNECTION || f.connection_messages
        } else {
            f.enabled(m)
        }
    });
    let filter = if env {
        filter
    } else {
        filter.with_max_level_hint(f.types.max_level())
    };
    let fmt = setup.timestamp_format.as_deref();
    match setup.format {
        LogFormat::Mosquitto => {
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(make_writer)
                .event_format(MosquittoFormat::new(setup.timestamp, fmt))
                .with_filter(filter);
            let _ = tracing_subscriber::registry()
                .with(env_filter)
                .with(layer)
                .try_init();
        }
        LogFormat::Json => {
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(make_writer)
                .fmt_fields(JsonFields)
                .event_format(JsonFormat::new(setup.timestamp, fmt))
                .with_filter(filter);
            let _ = tracing_subscriber::registry()
                .with(env_filter)
                .with(layer)
                .try_init();
        }
    }
}

/// mosquitto's log line: `TIMESTAMP: message` (mosquitto 2.0 `log__vprintf`), the
/// timestamp being seconds since the Unix epoch, or `strftime(format)` in local time when
/// `log_timestamp_format` is set, or absent with `log_timestamp false`. Warnings and errors
/// start with `Warning: ` / `Error: ` (as mosquitto's own messages do); tracing fields follow
/// the message as `key=value`.
pub struct MosquittoFormat {
    timestamp: bool,
    format: Option<CString>,
}

impl MosquittoFormat {
    /// `format` must not contain NUL (the config refuses it).
    pub fn new(timestamp: bool, format: Option<&str>) -> Self {
        MosquittoFormat {
            timestamp,
            format: format.and_then(|f| CString::new(f).ok()),
        }
    }

    fn write_timestamp(&self, w: &mut Writer<'_>) -> fmt::Result {
        match strftime_now(self.format.as_ref()) {
            Stamp::Epoch(secs, _) => write!(w, "{secs}: "),
            // mosquitto's own fallback.
            Stamp::Text(None) => w.write_str("Time error: "),
            Stamp::Text(Some(t)) => write!(w, "{t}: "),
        }
    }
}

/// The current time as a log line shows it.
enum Stamp {
    /// Seconds since the epoch, and milliseconds.
    Epoch(u64, u32),
    /// `strftime(format)` in local time; `None` if it failed.
    Text(Option<String>),
}

fn strftime_now(format: Option<&CString>) -> Stamp {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let Some(format) = format else {
        return Stamp::Epoch(now.as_secs(), now.subsec_millis());
    };
    let t = now.as_secs() as libc::time_t;
    let mut buf = [0u8; 256];
    // SAFETY: localtime_r and strftime write only into the buffers we pass, bounded by
    // their sizes; `format` is NUL-terminated.
    let n = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            0
        } else {
            libc::strftime(buf.as_mut_ptr().cast(), buf.len(), format.as_ptr(), &tm)
        }
    };
    Stamp::Text((n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned()))
}

impl<S, N> FormatEvent<S, N> for MosquittoFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.timestamp {
            self.write_timestamp(&mut w)?;
        }
        match *event.metadata().level() {
            Level::ERROR => w.write_str("Error: ")?,
            Level::WARN => w.write_str("Warning: ")?,
            _ => {}
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        // The connection span's fields (shard, peer, client), so one device's lines can be
        // found with grep.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<N>>() {
                    if !f.is_empty() {
                        write!(w, " [{} {}]", span.name(), f.fields)?;
                    }
                }
            }
        }
        writeln!(w)
    }
}

/// `log_format json`: one JSON object per line: `time` (seconds since the epoch, or the
/// `log_timestamp_format` text; absent with `log_timestamp false`), `level`, `type` (the
/// mosquitto log type), `message`, the event's other fields, and `span` (the connection's
/// `shard`, `peer`, `client`) when the line belongs to a connection. Every string is JSON-
/// escaped (control characters as `\uXXXX`), on top of the escaping peer text already got.
pub struct JsonFormat {
    timestamp: bool,
    format: Option<CString>,
}

impl JsonFormat {
    /// `format` must not contain NUL (the config refuses it).
    pub fn new(timestamp: bool, format: Option<&str>) -> Self {
        JsonFormat {
            timestamp,
            format: format.and_then(|f| CString::new(f).ok()),
        }
    }
}

/// Writes what it is given as the inside of a JSON string.
struct JsonStr<'a, W: fmt::Write + ?Sized>(&'a mut W);

impl<W: fmt::Write + ?Sized> fmt::Write for JsonStr<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, c) in s.char_indices() {
            let esc: Option<&str> = match c {
                '"' => Some("\\\""),
                '\\' => Some("\\\\"),
                '\n' => Some("\\n"),
                '\r' => Some("\\r"),
                '\t' => Some("\\t"),
                _ => None,
            };
            let control = c.is_control() || c == '\u{2028}' || c == '\u{2029}';
            if esc.is_none() && !control {
                continue;
            }
            self.0.write_str(&s[start..i])?;
            match esc {
                Some(e) => self.0.write_str(e)?,
                None => {
                    // Characters beyond the BMP are never control characters here.
                    write!(self.0, "\\u{:04x}", c as u32)?
                }
            }
            start = i + c.len_utf8();
        }
        self.0.write_str(&s[start..])
    }
}

fn json_string<W: fmt::Write + ?Sized>(w: &mut W, v: impl fmt::Display) -> fmt::Result {
    w.write_char('"')?;
    write!(JsonStr(w), "{v}")?;
    w.write_char('"')
}

/// Writes fields as `"name":value` members, separated by commas.
struct JsonVisitor<'a, 'w> {
    w: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl JsonVisitor<'_, '_> {
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.first { "" } else { "," };
        self.first = false;
        self.result = (|| {
            self.w.write_str(sep)?;
            json_string(self.w, field.name())?;
            self.w.write_char(':')?;
            value(self.w)
        })();
    }
}

impl Visit for JsonVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |w| json_string(w, value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |w| write!(w, "{value}"));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |w| write!(w, "{value}"));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |w| write!(w, "{value}"));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |w| {
            w.write_char('"')?;
            write!(JsonStr(w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// Span fields as JSON members (what [`JsonFormat`] puts in `"span"`).
pub struct JsonFields;

impl<'w> FormatFields<'w> for JsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = JsonVisitor {
            w: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut text = std::mem::take(&mut current.fields);
        let mut more = String::new();
        self.format_fields(Writer::new(&mut more), fields)?;
        if !text.is_empty() && !more.is_empty() {
            text.push(',');
        }
        text.push_str(&more);
        current.fields = text;
        Ok(())
    }
}

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        w.write_char('{')?;
        if self.timestamp {
            match strftime_now(self.format.as_ref()) {
                Stamp::Epoch(s, ms) => write!(w, "\"time\":{s}.{ms:03},")?,
                Stamp::Text(t) => {
                    w.write_str("\"time\":")?;
                    json_string(&mut w, t.as_deref().unwrap_or("Time error"))?;
                    w.write_char(',')?;
                }
            }
        }
        let level = match *meta.level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        write!(
            w,
            "\"level\":\"{level}\",\"type\":\"{}\",\"target\":",
            LogTypes::name_of(meta)
        )?;
        json_string(&mut w, meta.target())?;
        let mut v = JsonVisitor {
            w: &mut w,
            first: false,
            result: Ok(()),
        };
        event.record(&mut v);
        v.result?;
        if let Some(scope) = ctx.event_scope() {
            // The innermost span with fields (the connection's).
            for span in scope {
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<N>>() {
                    if !f.is_empty() {
                        write!(w, ",\"span\":{{\"name\":")?;
                        json_string(&mut w, span.name())?;
                        write!(w, ",{}}}", f.fields)?;
                        break;
                    }
                }
            }
        }
        writeln!(w, "}}")
    }
}

/// Longest piece of peer text quoted in a log line, in characters; the rest is summarised.
const MAX_QUOTED_CHARS: usize = 1024;

/// `text` as it may appear in a log line: control characters (`\n`, `\r`, ESC, …), Unicode
/// line and paragraph separators and `\` are escaped, so peer text can neither start a
/// forged log line of its own nor drive the operator's terminal; text longer than 1024
/// characters is cut, with its full length in bytes.
pub fn escape(text: &str) -> Escaped<'_> {
    Escaped(text)
}

/// See [`escape`].
pub struct Escaped<'a>(&'a str);

fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s.len() <= MAX_QUOTED_CHARS && !s.chars().any(needs_escape) {
            return f.write_str(s);
        }
        for (i, c) in s.chars().enumerate() {
            if i == MAX_QUOTED_CHARS {
                return write!(f, "…({} bytes)", s.len());
            }
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => fmt::Write::write_char(f, c)?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_cannot_forge_lines() {
        assert_eq!(escape("dev-1").to_string(), "dev-1");
        assert_eq!(
            escape("x\n2026-01-01 INFO forged\r\x1b[31m\\").to_string(),
            "x\\n2026-01-01 INFO forged\\r\\u{1b}[31m\\\\"
        );
        assert_eq!(escape("a\u{2028}b\u{85}").to_string(), "a\\u{2028}b\\u{85}");
        let long = "é".repeat(1100);
        let out = escape(&long).to_string();
        assert!(out.ends_with("…(2200 bytes)"), "{out}");
        assert_eq!(out.chars().filter(|&c| c == 'é').count(), 1024);
    }
}
