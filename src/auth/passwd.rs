//! mosquitto_passwd 2.x password files: parse, verify, and make new hashes.
//!
//! Owns: the `USERNAME:HASH` line format, the `$7$` (PBKDF2-HMAC-SHA512) and legacy `$6$`
//! (salted SHA-512) hashes, constant-time verification. Must not touch: where the file comes
//! from (config), caching (see [`super::cache`]), writing files (see [`super::passwd_cmd`]).
//!
//! # The format (mosquitto 2.0.11: src/password_mosq.c, src/security_default.c,
//! apps/mosquitto_passwd/mosquitto_passwd.c)
//!
//! * One `username:hash` per line; whitespace around either is trimmed. Lines whose first
//!   character is `#` and blank lines are skipped.
//! * `$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512 of the password with the salt, ITERATIONS
//!   rounds, 64-byte output; SALT and HASH in standard base64 with padding. mosquitto_passwd
//!   2.0.11 writes 101 iterations ([`DEFAULT_ITERATIONS`], `-I` changes it) and a 12-byte salt
//!   ([`SALT_LEN`]). 64-byte salts (newer tools) verify too.
//! * `$6$SALT$HASH`: SHA-512(password ‖ salt), mosquitto 1.x's default, still verified.
//!
//! # Where Midge is stricter than mosquitto's broker, on purpose
//!
//! mosquitto logs a bad line and drops that user (or silently skips a line without `:`);
//! Midge refuses the whole file with `FILE:LINE: why`, so a typo cannot lock a user out (or
//! leave an old entry in force after a reload) unnoticed. Refused too: a plain-text password
//! (mosquitto 2.0 with TLS support refuses those entries as well; hash the file with
//! `midge passwd -U`), a username defined twice, a third `:` field, an iteration count that is
//! not a plain number. The whole client password is compared: `secret\0x` does not match
//! `secret` (mosquitto compares only up to the first NUL byte).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use aws_lc_rs::{constant_time, digest, pbkdf2, rand};
use base64::engine::general_purpose::{STANDARD, STANDARD_PAD_INDIFFERENT};
use base64::Engine as _;

use super::text::{self, quoted, trim_blanks};
use super::{AuthFileError, Authenticator};

/// mosquitto_passwd 2.0.11's iteration count (`PW_DEFAULT_ITERATIONS`).
pub const DEFAULT_ITERATIONS: u32 = 101;
/// mosquitto_passwd 2.0.11's salt length in bytes (`SALT_LEN`).
pub const SALT_LEN: usize = 12;
/// Salt lengths accepted when verifying: mosquitto 2.0's and the 64 bytes newer tools write.
pub const ACCEPTED_SALT_LENS: [usize; 2] = [12, 64];
/// SHA-512 output, the length of every stored hash.
pub const HASH_LEN: usize = 64;
/// mosquitto refuses usernames and passwords above this length.
pub const MAX_FIELD_LEN: usize = 65_535;

/// One stored password hash.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordHash {
    /// `$6$SALT$HASH`: SHA-512(password ‖ salt).
    Sha512 {
        salt: Box<[u8]>,
        hash: [u8; HASH_LEN],
    },
    /// `$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        iterations: NonZeroU32,
        salt: Box<[u8]>,
        hash: [u8; HASH_LEN],
    },
}

impl std::fmt::Debug for PasswordHash {
    // The hash is secret-derived: keep it out of debug output and logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PasswordHash::Sha512 { salt, .. } => write!(f, "$6$ ({}-byte salt)", salt.len()),
            PasswordHash::Pbkdf2Sha512 {
                iterations, salt, ..
            } => write!(f, "$7$ ({iterations} iterations, {}-byte salt)", salt.len()),
        }
    }
}

/// Which hash `midge passwd -H` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    /// `sha512-pbkdf2`, the default: `$7$`.
    Pbkdf2Sha512,
    /// `sha512`: `$6$`, mosquitto 1.6's weak default; only for old tooling.
    Sha512,
}

/// The outcome of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// The user exists; the password does not match.
    WrongPassword,
    /// The user exists; the client sent no password.
    PasswordMissing,
    /// No such user in the file.
    UnknownUser,
}

impl Verdict {
    pub fn is_accepted(self) -> bool {
        matches!(self, Verdict::Accepted)
    }
}

fn random_salt(len: usize) -> Result<Box<[u8]>, String> {
    let mut salt = vec![0u8; len].into_boxed_slice();
    rand::fill(&mut salt).map_err(|_| "the system random number generator failed".to_string())?;
    Ok(salt)
}

impl PasswordHash {
    /// A new `$7$` hash with a fresh random salt of [`SALT_LEN`] bytes (what mosquitto_passwd
    /// 2.0.11 writes).
    pub fn new_pbkdf2(password: &[u8], iterations: NonZeroU32) -> Result<Self, String> {
        let salt = random_salt(SALT_LEN)?;
        let mut hash = [0u8; HASH_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA512,
            iterations,
            &salt,
            password,
            &mut hash,
        );
        Ok(PasswordHash::Pbkdf2Sha512 {
            iterations,
            salt,
            hash,
        })
    }

    /// A new `$6$` hash (mosquitto_passwd `-H sha512`).
    pub fn new_sha512(password: &[u8]) -> Result<Self, String> {
        let salt = random_salt(SALT_LEN)?;
        let hash = sha512_salted(password, &salt);
        Ok(PasswordHash::Sha512 { salt, hash })
    }

    /// A new hash of the given kind.
    pub fn new(kind: HashKind, password: &[u8], iterations: NonZeroU32) -> Result<Self, String> {
        match kind {
            HashKind::Pbkdf2Sha512 => Self::new_pbkdf2(password, iterations),
            HashKind::Sha512 => Self::new_sha512(password),
        }
    }

    /// Parse the part after `username:`. The error says why, without the line prefix.
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some(body) = s.strip_prefix('$') else {
            return Err(
                "the password is not hashed (mosquitto_passwd writes $7$…); hash a plain-text \
                 file with `midge passwd -U FILE`"
                    .into(),
            );
        };
        let fields: Vec<&str> = body.split('$').collect();
        let (iterations, salt, hash) = match fields.as_slice() {
            ["7", iter, salt, hash] => {
                let n: u32 = iter
                    .parse()
                    .ok()
                    .filter(|n| (1..=i32::MAX as u32).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "$7$ iteration count {} is not a number from 1 to {}",
                            quoted(iter),
                            i32::MAX
                        )
                    })?;
                (NonZeroU32::new(n), *salt, *hash)
            }
            ["7", ..] => {
                return Err("a $7$ hash has the form $7$ITERATIONS$SALT$HASH".into());
            }
            ["6", salt, hash] => (None, *salt, *hash),
            ["6", ..] => return Err("a $6$ hash has the form $6$SALT$HASH".into()),
            [kind, ..] => {
                return Err(format!(
                    "unknown hash type ${}$ (mosquitto 2.0 and Midge know $6$ and $7$)",
                    kind.chars().take(8).collect::<String>()
                ))
            }
            [] => unreachable!("split yields at least one field"),
        };
        let salt = STANDARD_PAD_INDIFFERENT
            .decode(salt)
            .map_err(|e| format!("the salt is not valid base64: {e}"))?;
        if !ACCEPTED_SALT_LENS.contains(&salt.len()) {
            return Err(format!(
                "the salt is {} bytes; mosquitto writes 12-byte salts (64 bytes are accepted too)",
                salt.len()
            ));
        }
        let hash = STANDARD_PAD_INDIFFERENT
            .decode(hash)
            .map_err(|e| format!("the hash is not valid base64: {e}"))?;
        let hash: [u8; HASH_LEN] = hash.as_slice().try_into().map_err(|_| {
            format!(
                "the hash is {} bytes; a SHA-512 hash is {HASH_LEN}",
                hash.len()
            )
        })?;
        let salt = salt.into_boxed_slice();
        Ok(match iterations {
            Some(iterations) => PasswordHash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            },
            None => PasswordHash::Sha512 { salt, hash },
        })
    }

    /// The text after `username:`, as mosquitto_passwd writes it.
    pub fn encode(&self) -> String {
        match self {
            PasswordHash::Sha512 { salt, hash } => {
                format!("$6${}${}", STANDARD.encode(salt), STANDARD.encode(hash))
            }
            PasswordHash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => format!(
                "$7${iterations}${}${}",
                STANDARD.encode(salt),
                STANDARD.encode(hash)
            ),
        }
    }

    /// Does `password` produce this hash? Constant time in the hash comparison. CPU-heavy for
    /// `$7$` (one PBKDF2 run): not on a shard thread.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordHash::Sha512 { salt, hash } => {
                constant_time::verify_slices_are_equal(&sha512_salted(password, salt), hash).is_ok()
            }
            PasswordHash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => pbkdf2::verify(
                pbkdf2::PBKDF2_HMAC_SHA512,
                *iterations,
                salt,
                password,
                hash,
            )
            .is_ok(),
        }
    }
}

fn sha512_salted(password: &[u8], salt: &[u8]) -> [u8; HASH_LEN] {
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(password);
    ctx.update(salt);
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[derive(Debug, Clone)]
struct Entry {
    hash: PasswordHash,
    line: usize,
}

/// A parsed password file.
#[derive(Debug)]
pub struct PasswordFile {
    path: PathBuf,
    generation: u64,
    users: HashMap<Box<str>, Entry>,
    /// Verified against when the user is unknown, so that an unknown user costs as long as a
    /// wrong password and response times do not tell which usernames exist.
    decoy: PasswordHash,
}

impl PasswordFile {
    /// Read and parse `path`. Blocking file I/O.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthFileError> {
        let bytes = text::read(path, "password file")?;
        Self::parse(path, &bytes)
    }

    /// Parse the contents of a password file; `path` is for messages.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<PasswordFile, AuthFileError> {
        let mut users: HashMap<Box<str>, Entry> = HashMap::new();
        for line in text::lines(path, bytes) {
            let (n, raw) = line?;
            let Some((user, hash)) =
                parse_line(raw).map_err(|m| AuthFileError::line(path, n, m))?
            else {
                continue;
            };
            let hash = PasswordHash::parse(hash)
                .map_err(|m| AuthFileError::line(path, n, format!("user {}: {m}", quoted(user))))?;
            if let Some(prev) = users.get(user) {
                return Err(AuthFileError::line(
                    path,
                    n,
                    format!(
                        "user {} is already defined at line {}",
                        quoted(user),
                        prev.line
                    ),
                ));
            }
            users.insert(user.into(), Entry { hash, line: n });
        }
        let decoy_iterations = users
            .values()
            .find_map(|e| match &e.hash {
                PasswordHash::Pbkdf2Sha512 { iterations, .. } => Some(*iterations),
                PasswordHash::Sha512 { .. } => None,
            })
            .unwrap_or(NonZeroU32::new(DEFAULT_ITERATIONS).expect("non-zero"));
        let decoy = PasswordHash::Pbkdf2Sha512 {
            iterations: decoy_iterations,
            salt: vec![0u8; SALT_LEN].into_boxed_slice(),
            hash: [0u8; HASH_LEN],
        };
        Ok(PasswordFile {
            path: path.to_path_buf(),
            generation: super::reload::next_generation(),
            users,
            decoy,
        })
    }

    /// Check a login. `password` is the CONNECT's password field (binary in MQTT). CPU-heavy
    /// (one PBKDF2 run, also for an unknown user): never on a shard thread.
    pub fn verify(&self, username: &str, password: Option<&[u8]>) -> Verdict {
        let Some(entry) = self.users.get(username) else {
            let _ = self.decoy.verify(password.unwrap_or_default());
            return Verdict::UnknownUser;
        };
        let Some(password) = password else {
            return Verdict::PasswordMissing;
        };
        if entry.hash.verify(password) {
            Verdict::Accepted
        } else {
            Verdict::WrongPassword
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unique per parsed or loaded instance (see [`super::reload`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn contains(&self, username: &str) -> bool {
        self.users.contains_key(username)
    }

    /// True if `username`'s entry is the same in `self` and `previous` (same hash, salt and
    /// iterations). After a reload, a connected client whose entry is unchanged is still
    /// authenticated without checking its password again; one whose entry changed or was
    /// removed must be disconnected (Midge keeps no passwords to re-verify; see
    /// /work/notes/auth-integration.md).
    pub fn entry_unchanged(&self, previous: &PasswordFile, username: &str) -> bool {
        match (self.users.get(username), previous.users.get(username)) {
            (Some(a), Some(b)) => a.hash == b.hash,
            _ => false,
        }
    }
}

impl Authenticator for PasswordFile {
    fn authenticate(&self, username: &str, password: Option<&[u8]>) -> Verdict {
        self.verify(username, password)
    }

    fn generation(&self) -> u64 {
        self.generation
    }
}

/// One line: `Ok(None)` for comments and blank lines, else the trimmed username and hash.
fn parse_line(raw: &str) -> Result<Option<(&str, &str)>, String> {
    let line = trim_blanks(raw);
    if line.is_empty() || raw.starts_with('#') || line.starts_with('#') {
        return Ok(None);
    }
    let Some((user, hash)) = line.split_once(':') else {
        return Err("expected USERNAME:HASH (no ':' on this line)".into());
    };
    let user = trim_blanks(user);
    let hash = trim_blanks(hash);
    if user.is_empty() {
        return Err("empty username before ':'".into());
    }
    if user.len() > MAX_FIELD_LEN {
        return Err(format!(
            "username longer than {MAX_FIELD_LEN} bytes (MQTT's limit)"
        ));
    }
    if hash.is_empty() {
        return Err(format!(
            "user {} has no password hash after ':'",
            quoted(user)
        ));
    }
    if hash.contains(':') {
        return Err(format!(
            "user {}: unexpected second ':' (usernames may not contain ':'; a hash never does)",
            quoted(user)
        ));
    }
    Ok(Some((user, hash)))
}

/// Split a line of a file being edited by `midge passwd` the way mosquitto_passwd does: `None`
/// for lines it keeps verbatim (comments, blank lines).
pub(crate) fn split_entry(raw: &str) -> Result<Option<(&str, &str)>, String> {
    parse_line(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn parse(text: &str) -> Result<PasswordFile, String> {
        PasswordFile::parse(Path::new("pw"), text.as_bytes()).map_err(|e| e.to_string())
    }

    /// `mosquitto_passwd -c -b pw1 alice secret` (Debian 2.0.11), copied from a real run.
    const MOSQUITTO_7: &str = "alice:$7$101$EebpZWh7zx1TzZh5$GNJvb47b8JcF83DkjXPZj+nqWcsFM4cI4whp23XSs7bPgGhyU+UhND522rrhM42nJ34k4iiqXWz4uTVDWHVyFQ==";
    /// `mosquitto_passwd -H sha512 -b pw1 bob pw2` (Debian 2.0.11).
    const MOSQUITTO_6: &str = "bob:$6$MRNUdCxoMAKU+/lC$AWHL2B5SPhCCfZRn89R/rKf3QtZTLwGtmEjnglpYVuynk1D65gMHNw6dNFvU2nYfpCERZGnrnJayqIb7L5sL7A==";

    #[test]
    fn verifies_hashes_made_by_mosquitto_passwd() {
        let f = parse(&format!("{MOSQUITTO_7}\n{MOSQUITTO_6}\n")).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f.verify("alice", Some(b"secret")), Verdict::Accepted);
        assert_eq!(f.verify("alice", Some(b"Secret")), Verdict::WrongPassword);
        // mosquitto compares up to the first NUL ("secret\0x" would pass there); Midge compares all.
        assert_eq!(
            f.verify("alice", Some(b"secret\0x")),
            Verdict::WrongPassword
        );
        assert_eq!(f.verify("alice", None), Verdict::PasswordMissing);
        assert_eq!(f.verify("bob", Some(b"pw2")), Verdict::Accepted);
        assert_eq!(f.verify("bob", Some(b"pw")), Verdict::WrongPassword);
        assert_eq!(f.verify("carol", Some(b"secret")), Verdict::UnknownUser);
        assert_eq!(f.verify("Alice", Some(b"secret")), Verdict::UnknownUser);
    }

    #[test]
    fn new_hashes_round_trip_and_use_mosquittos_parameters() {
        let h = PasswordHash::new_pbkdf2(b"pw", nz(3)).unwrap();
        let text = h.encode();
        assert!(text.starts_with("$7$3$"), "{text}");
        let PasswordHash::Pbkdf2Sha512 { salt, .. } = &h else {
            panic!()
        };
        assert_eq!(salt.len(), SALT_LEN);
        let back = PasswordHash::parse(&text).unwrap();
        assert_eq!(back, h);
        assert!(back.verify(b"pw"));
        assert!(!back.verify(b"pw "));
        let h6 = PasswordHash::new_sha512(b"pw").unwrap();
        assert!(h6.encode().starts_with("$6$"));
        assert!(PasswordHash::parse(&h6.encode()).unwrap().verify(b"pw"));
        // Fresh salts: the same password hashes differently.
        assert_ne!(PasswordHash::new_pbkdf2(b"pw", nz(3)).unwrap(), h);
        assert_eq!(DEFAULT_ITERATIONS, 101);
    }

    #[test]
    fn sixty_four_byte_salts_verify() {
        let salt = [7u8; 64];
        let mut hash = [0u8; HASH_LEN];
        pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA512, nz(5), &salt, b"pw", &mut hash);
        let text = format!(
            "u:$7$5${}${}\n",
            STANDARD.encode(salt),
            STANDARD.encode(hash)
        );
        let f = parse(&text).unwrap();
        assert_eq!(f.verify("u", Some(b"pw")), Verdict::Accepted);
        assert_eq!(f.verify("u", Some(b"px")), Verdict::WrongPassword);
    }

    #[test]
    fn comments_blank_lines_whitespace_and_crlf() {
        let f = parse(&format!(
            "# users\n\n   \n  {MOSQUITTO_7}  \r\n#bob:$6$x$y\n"
        ))
        .unwrap();
        assert_eq!(f.len(), 1);
        assert!(f.contains("alice"));
        assert_eq!(f.verify("alice", Some(b"secret")), Verdict::Accepted);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_line_and_why() {
        let cases: &[(&str, &str)] = &[
            ("alice\n", "pw:1: expected USERNAME:HASH"),
            (
                "\n\nalice:secret\n",
                "pw:3: user \"alice\": the password is not hashed",
            ),
            (":$6$a$b\n", "pw:1: empty username"),
            ("alice:\n", "pw:1: user \"alice\" has no password hash"),
            (
                "alice:$7$101$x$y$z\n",
                "pw:1: user \"alice\": a $7$ hash has the form",
            ),
            (
                "alice:$7$10x$AAAAAAAAAAAAAAAA$AA==\n",
                "iteration count \"10x\" is not a number",
            ),
            (
                "alice:$7$0$AAAAAAAAAAAAAAAA$AA==\n",
                "iteration count \"0\"",
            ),
            ("alice:$5$abc$def\n", "unknown hash type $5$"),
            ("alice:$6$!!!$AA==\n", "the salt is not valid base64"),
            ("alice:$6$AAAA$AA==\n", "the salt is 3 bytes"),
            ("alice:$6$AAAAAAAAAAAAAAAA$AAAA\n", "the hash is 3 bytes"),
            ("a:b:c\n", "unexpected second ':'"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let dup = format!("{MOSQUITTO_7}\n#\n{MOSQUITTO_7}\n");
        assert_eq!(
            parse(&dup).unwrap_err(),
            "pw:3: user \"alice\" is already defined at line 1"
        );
        assert!(parse("al\u{0}ice:x\n")
            .unwrap_err()
            .contains("pw:1: contains a NUL"));
        let e = PasswordFile::parse(Path::new("pw"), b"\xff:x\n").unwrap_err();
        assert_eq!(e.to_string(), "pw:1: is not valid UTF-8");
    }

    #[test]
    fn load_reports_unreadable_files() {
        let e = PasswordFile::load(Path::new("/nonexistent/midge-pw")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/midge-pw: cannot read password file: "),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let e = PasswordFile::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
    }

    #[test]
    fn entry_unchanged_tracks_the_hash_not_the_line() {
        let a = parse(&format!("{MOSQUITTO_7}\n{MOSQUITTO_6}\n")).unwrap();
        let b = parse(&format!("# moved\n{MOSQUITTO_6}\n{MOSQUITTO_7}\n")).unwrap();
        assert!(b.entry_unchanged(&a, "alice"));
        let h = PasswordHash::new_pbkdf2(b"new", nz(2)).unwrap().encode();
        let c = parse(&format!("alice:{h}\n")).unwrap();
        assert!(!c.entry_unchanged(&a, "alice"));
        assert!(!c.entry_unchanged(&a, "bob"));
        assert!(!a.entry_unchanged(&a, "nobody"));
    }

    #[test]
    fn debug_output_hides_the_hash() {
        let h = PasswordHash::parse(MOSQUITTO_7.split_once(':').unwrap().1).unwrap();
        let d = format!("{h:?}");
        assert_eq!(d, "$7$ (101 iterations, 12-byte salt)");
    }
}
