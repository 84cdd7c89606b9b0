//! Log output: how peer-supplied text appears in log lines, and the line format.
//!
//! Owns: [`escape`], the one way any log line quotes text a client or a certificate chose
//! (client ids, usernames, certificate subjects, topics, reason strings). Must not touch:
//! what is logged (each module decides) or where it goes (main installs the subscriber).

use std::fmt;

/// Longest piece of peer text quoted in a log line, in characters; the rest is summarised.
const MAX_QUOTED_CHARS: usize = 256;

/// `text` as it may appear in a log line: control characters (`\n`, `\r`, ESC, …), Unicode
/// line and paragraph separators and `\` are escaped, so peer text can neither start a
/// forged log line of its own nor drive the operator's terminal; text longer than 256
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
        let long = "é".repeat(300);
        let out = escape(&long).to_string();
        assert!(out.ends_with("…(600 bytes)"), "{out}");
        assert_eq!(out.chars().filter(|&c| c == 'é').count(), 256);
    }
}
