//! Log output: how peer-supplied text appears in log lines, and the line format.
//!
//! Owns: [`escape`], the one way any log line quotes text a client or a certificate chose
//! (client ids, usernames, certificate subjects, topics, reason strings), and
//! [`MosquittoFormat`], the line layout mosquitto writes (`TIMESTAMP: message`, with
//! `log_timestamp` / `log_timestamp_format`). Must not touch: what is logged (each module
//! decides) or where it goes (main installs the subscriber, with colour only on a terminal).

use std::ffi::CString;
use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Some(format) = &self.format else {
            return write!(w, "{now}: ");
        };
        let t = now as libc::time_t;
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
        if n == 0 {
            // mosquitto's own fallback.
            return w.write_str("Time error: ");
        }
        write!(w, "{}: ", String::from_utf8_lossy(&buf[..n]))
    }
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
        writeln!(w)
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
