//! Reading an auth file line by line, with the line number of every problem.

use std::path::Path;

use super::AuthFileError;

/// The file's lines (1-based numbers), each checked to be UTF-8. mosquitto reads bytes; a
/// username or topic that is not UTF-8 can never match an MQTT client's (MQTT strings are
/// UTF-8), so such a line is an error naming it rather than an entry that silently never works.
pub(crate) fn lines<'a>(
    path: &'a Path,
    bytes: &'a [u8],
) -> impl Iterator<Item = Result<(usize, &'a str), AuthFileError>> + 'a {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(move |(i, raw)| {
            let n = i + 1;
            if raw.contains(&0) {
                return Err(AuthFileError::line(path, n, "contains a NUL byte"));
            }
            std::str::from_utf8(raw)
                .map(|s| (n, s))
                .map_err(|_| AuthFileError::line(path, n, "is not valid UTF-8"))
        })
}

/// C's `isspace` in the "C" locale: what mosquitto trims.
pub(crate) fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r')
}

/// mosquitto's `misc__trimblanks`.
pub(crate) fn trim_blanks(s: &str) -> &str {
    s.trim_matches(is_c_space)
}

pub(crate) fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, AuthFileError> {
    let meta = std::fs::metadata(path).map_err(|source| AuthFileError::Read {
        path: path.to_path_buf(),
        what,
        source,
    })?;
    if meta.is_dir() {
        return Err(AuthFileError::Read {
            path: path.to_path_buf(),
            what,
            source: std::io::Error::other("is a directory"),
        });
    }
    std::fs::read(path).map_err(|source| AuthFileError::Read {
        path: path.to_path_buf(),
        what,
        source,
    })
}

/// Peer- or file-supplied text for a message: quoted, control characters escaped.
pub(crate) fn quoted(s: &str) -> String {
    format!("{:?}", s)
}
