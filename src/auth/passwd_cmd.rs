//! `midge passwd`: mosquitto_passwd's command line, writing the same file format.
//!
//! Owns: the flags (`-c`, `-b`, `-D`, `-U`, `-H`, `-I`, as mosquitto_passwd 2.0.11), the
//! password prompt without echo, and rewriting the file atomically. Must not touch: the broker
//! (a running broker picks the new file up on SIGHUP / `midge reload`).
//!
//! ```text
//! midge passwd [-H sha512-pbkdf2 | -H sha512] [-I ITERATIONS] [-c | -D] FILE USER
//! midge passwd [-H …] [-I …] [-c] -b FILE USER PASSWORD
//! midge passwd -U FILE
//! ```
//!
//! * New hashes are `$7$` with 101 PBKDF2 iterations and a 12-byte salt, mosquitto_passwd
//!   2.0.11's defaults (apps/mosquitto_passwd/mosquitto_passwd.c, src/password_mosq.h); `-I`
//!   sets the iteration count, `-H sha512` writes the legacy `$6$` (not recommended).
//! * Without `-b` the password is read twice from standard input, with echo off when it is a
//!   terminal ("Password: ", "Reenter password: ").
//! * The file is written to a temporary file in the same directory and renamed over the old
//!   one, so the broker (or a crash) never sees half a file. A new file gets mode 0600 (what
//!   mosquitto_passwd 2.0.16 and later create); a rewritten file keeps its mode and owner.
//! * Comment and blank lines are kept as they are (mosquitto_passwd refuses them; its broker
//!   skips them).
//! * `-U` hashes plain-text passwords; entries that are already `$6$`/`$7$` hashes are kept
//!   (mosquitto_passwd 2.0.11 would hash the hash, locking the user out).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::num::NonZeroU32;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::Args;

use super::passwd::{split_entry, HashKind, PasswordHash, DEFAULT_ITERATIONS, MAX_FIELD_LEN};

/// Manage a password file (mosquitto_passwd's format and flags).
#[derive(Args, Debug, Clone, Default, PartialEq)]
#[command(
    override_usage = "midge passwd [-H sha512-pbkdf2 | -H sha512] [-I ITERATIONS] [-c | -D] FILE USER\n       \
                      midge passwd [-H …] [-I …] [-c] -b FILE USER PASSWORD\n       \
                      midge passwd -U FILE"
)]
pub struct PasswdArgs {
    /// Create a new password file; an existing file is overwritten.
    #[arg(short = 'c')]
    pub create: bool,
    /// Batch mode: the password is the last argument (it will be visible to other users in
    /// the process list).
    #[arg(short = 'b')]
    pub batch: bool,
    /// Delete USER instead of setting its password.
    #[arg(short = 'D')]
    pub delete: bool,
    /// Hash every plain-text password of FILE in place.
    #[arg(short = 'U')]
    pub update: bool,
    /// Hash for new passwords: sha512-pbkdf2 ($7$, the default) or sha512 ($6$, legacy).
    #[arg(short = 'H', value_name = "HASH")]
    pub hash: Option<String>,
    /// PBKDF2 iterations for new passwords (default 101, as mosquitto_passwd 2.0).
    #[arg(short = 'I', value_name = "ITERATIONS", allow_negative_numbers = true)]
    pub iterations: Option<i64>,
    /// FILE [USER [PASSWORD]]
    #[arg(
        value_name = "ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub args: Vec<String>,
}

/// Where interactive passwords come from.
pub trait PasswordPrompt {
    /// Show `prompt`, read one line without echo; `None` at end of input.
    fn read_password(&mut self, prompt: &str) -> Result<Option<String>, String>;
}

/// The terminal (standard input with echo off, as mosquitto_passwd's `get_password`).
pub struct TerminalPrompt;

impl PasswordPrompt for TerminalPrompt {
    fn read_password(&mut self, prompt: &str) -> Result<Option<String>, String> {
        let mut out = std::io::stdout();
        let _ = write!(out, "{prompt}");
        let _ = out.flush();
        let echo = EchoOff::new();
        let mut line = String::new();
        let n = std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password: {e}"))?;
        drop(echo);
        let _ = writeln!(out);
        if n == 0 {
            return Ok(None);
        }
        while line.ends_with(['\n', '\r']) {
            line.pop();
        }
        Ok(Some(line))
    }
}

/// Turns terminal echo off for its lifetime (nothing when stdin is not a terminal). Ctrl-C
/// while it is off restores the terminal before exiting, as mosquitto_passwd does.
struct EchoOff {
    saved: Option<libc::termios>,
}

static mut SAVED_TERMIOS: Option<libc::termios> = None;

extern "C" fn restore_and_exit(_sig: libc::c_int) {
    // SAFETY: tcsetattr and _exit are async-signal-safe; SAVED_TERMIOS is written before the
    // handler is installed and not modified while it is.
    unsafe {
        if let Some(t) = *std::ptr::addr_of!(SAVED_TERMIOS) {
            libc::tcsetattr(0, libc::TCSANOW, &t);
        }
        libc::_exit(130);
    }
}

impl EchoOff {
    fn new() -> EchoOff {
        // SAFETY: plain libc calls on fd 0 with a zeroed termios out-parameter.
        unsafe {
            if libc::isatty(0) != 1 {
                return EchoOff { saved: None };
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return EchoOff { saved: None };
            }
            *std::ptr::addr_of_mut!(SAVED_TERMIOS) = Some(t);
            let handler = restore_and_exit as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::signal(libc::SIGINT, handler);
            libc::signal(libc::SIGTERM, handler);
            let mut quiet = t;
            quiet.c_lflag &= !libc::ECHO;
            libc::tcsetattr(0, libc::TCSANOW, &quiet);
            EchoOff { saved: Some(t) }
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            // SAFETY: restoring the attributes read in `new`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &t);
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
            }
        }
    }
}

enum Op {
    Create {
        user: String,
        password: Option<String>,
    },
    Set {
        user: String,
        password: Option<String>,
    },
    Delete {
        user: String,
    },
    Update,
}

fn check_username(u: &str) -> Result<(), String> {
    if u.len() > MAX_FIELD_LEN {
        return Err("Username must be less than 65536 characters long.".into());
    }
    if u.chars().any(char::is_control) {
        return Err("Username must not contain control characters.".into());
    }
    if u.contains(':') {
        return Err("Username must not contain the ':' character.".into());
    }
    if u.is_empty() {
        return Err("Username must not be empty.".into());
    }
    Ok(())
}

fn ask(prompt: &mut dyn PasswordPrompt) -> Result<String, String> {
    let first = prompt.read_password("Password: ")?.unwrap_or_default();
    if first.is_empty() {
        return Err("Empty password.".into());
    }
    let second = prompt
        .read_password("Reenter password: ")?
        .unwrap_or_default();
    if second.is_empty() {
        return Err("Empty password.".into());
    }
    if first != second {
        return Err("Passwords do not match.".into());
    }
    Ok(first)
}

/// Run `midge passwd`. Messages (without the program name) go in the error; notes (an
/// already hashed entry kept by `-U`) are printed to stderr.
pub fn run(args: &PasswdArgs, prompt: &mut dyn PasswordPrompt) -> Result<(), String> {
    let kind = match args.hash.as_deref() {
        None | Some("sha512-pbkdf2") => HashKind::Pbkdf2Sha512,
        Some("sha512") => HashKind::Sha512,
        Some(other) => return Err(format!("Unknown hash type '{other}'")),
    };
    let iterations = match args.iterations {
        None => NonZeroU32::new(DEFAULT_ITERATIONS).expect("non-zero"),
        Some(n) if n >= 1 && n <= i64::from(i32::MAX) => {
            NonZeroU32::new(n as u32).expect("checked non-zero")
        }
        Some(_) => return Err("Number of iterations must be > 0.".into()),
    };
    if args.create && args.delete {
        return Err("-c and -D cannot be used together.".into());
    }
    if args.create && args.update {
        return Err("-c and -U cannot be used together.".into());
    }
    if args.delete && args.update {
        return Err("-D and -U cannot be used together.".into());
    }
    if args.delete && args.batch {
        return Err("-b and -D cannot be used together.".into());
    }
    let a = &args.args;
    let usage = || {
        "wrong arguments; usage: midge passwd [-c | -D] FILE USER, midge passwd [-c] -b FILE USER \
         PASSWORD, or midge passwd -U FILE"
            .to_string()
    };
    let (file, op) = match (args.create, args.delete, args.update, args.batch, a.len()) {
        (true, _, _, true, 3) => (
            &a[0],
            Op::Create {
                user: a[1].clone(),
                password: Some(a[2].clone()),
            },
        ),
        (true, _, _, true, _) => {
            return Err(
                "-c argument given but password file, username, or password missing.".into(),
            )
        }
        (true, _, _, false, 2) => (
            &a[0],
            Op::Create {
                user: a[1].clone(),
                password: None,
            },
        ),
        (true, _, _, false, _) => {
            return Err("-c argument given but password file or username missing.".into())
        }
        (_, true, _, _, 2) => (&a[0], Op::Delete { user: a[1].clone() }),
        (_, true, _, _, _) => {
            return Err("-D argument given but password file or username missing.".into())
        }
        (_, _, true, _, 1) => (&a[0], Op::Update),
        (_, _, true, _, _) => return Err("-U argument given but password file missing.".into()),
        (_, _, _, true, 3) => (
            &a[0],
            Op::Set {
                user: a[1].clone(),
                password: Some(a[2].clone()),
            },
        ),
        (_, _, _, false, 2) => (
            &a[0],
            Op::Set {
                user: a[1].clone(),
                password: None,
            },
        ),
        _ => return Err(usage()),
    };
    let path = PathBuf::from(file);
    match &op {
        Op::Create { user, password } | Op::Set { user, password } => {
            check_username(user)?;
            if password.as_ref().is_some_and(|p| p.len() > MAX_FIELD_LEN) {
                return Err("Password must be less than 65536 characters long.".into());
            }
        }
        Op::Delete { user } => check_username(user)?,
        Op::Update => {}
    }
    let new_line = |user: &str, password: &str| -> Result<String, String> {
        let h = PasswordHash::new(kind, password.as_bytes(), iterations)
            .map_err(|e| format!("Unable to hash password: {e}"))?;
        Ok(format!("{user}:{}\n", h.encode()))
    };
    match op {
        Op::Create { user, password } => {
            let password = match password {
                Some(p) => p,
                None => ask(prompt)?,
            };
            write_atomically(&path, &new_line(&user, &password)?, None)
        }
        Op::Set { user, password } => {
            let old = read_existing(&path)?;
            let password = match password {
                Some(p) => p,
                None => ask(prompt)?,
            };
            let mut found = false;
            let text = rewrite(&path, &old, |u, _hash, line| {
                if u == user {
                    found = true;
                    new_line(u, &password)
                } else {
                    Ok(line.to_string())
                }
            })?;
            let mut text = text;
            if !found {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(&new_line(&user, &password)?);
            }
            write_atomically(&path, &text, Some(&old.meta))
        }
        Op::Delete { user } => {
            let old = read_existing(&path)?;
            let mut found = false;
            let text = rewrite(&path, &old, |u, _hash, line| {
                if u == user {
                    found = true;
                    Ok(String::new())
                } else {
                    Ok(line.to_string())
                }
            })?;
            if !found {
                return Err(format!("User {user} not found in password file."));
            }
            write_atomically(&path, &text, Some(&old.meta))
        }
        Op::Update => {
            let old = read_existing(&path)?;
            let text = rewrite(&path, &old, |u, hash, line| {
                if PasswordHash::parse(hash).is_ok() {
                    eprintln!("midge passwd: user {u}: already hashed, kept as it is");
                    Ok(line.to_string())
                } else {
                    new_line(u, hash)
                }
            })?;
            write_atomically(&path, &text, Some(&old.meta))
        }
    }
}

struct Existing {
    text: String,
    meta: std::fs::Metadata,
}

fn read_existing(path: &Path) -> Result<Existing, String> {
    let err = |e: std::io::Error| format!("Unable to open password file {}. {e}.", path.display());
    let meta = std::fs::metadata(path).map_err(err)?;
    if meta.is_dir() {
        return Err(format!(
            "Unable to open password file {}: it is a directory.",
            path.display()
        ));
    }
    let bytes = std::fs::read(path).map_err(err)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("{}: the password file is not UTF-8 text", path.display()))?;
    Ok(Existing { text, meta })
}

/// Rebuild the file line by line: `f(user, hash, line_with_newline)` gives each entry's new
/// text; comments and blank lines are kept.
fn rewrite(
    path: &Path,
    old: &Existing,
    mut f: impl FnMut(&str, &str, &str) -> Result<String, String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(old.text.len() + 256);
    for (i, line) in old.text.split_inclusive('\n').enumerate() {
        let content = line.trim_end_matches(['\n', '\r']);
        match split_entry(content) {
            Ok(None) => out.push_str(line),
            Ok(Some((user, hash))) => {
                let mut new = f(user, hash, line)?;
                if !new.is_empty() && !new.ends_with('\n') {
                    new.push('\n');
                }
                out.push_str(&new);
            }
            Err(why) => {
                return Err(format!(
                    "Corrupt password file at line {}: {}:{}: {why}",
                    i + 1,
                    path.display(),
                    i + 1
                ))
            }
        }
    }
    Ok(out)
}

/// Write `text` to a temporary file next to `path` and rename it over `path`. `like`: the
/// file being replaced, whose mode and owner the new one keeps; a new file gets 0600.
fn write_atomically(
    path: &Path,
    text: &str,
    like: Option<&std::fs::Metadata>,
) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", path.display()))?
        .to_string_lossy()
        .into_owned();
    let mut tmp = None;
    for attempt in 0..100u32 {
        let mut r = [0u8; 6];
        aws_lc_rs::rand::fill(&mut r).map_err(|_| "the random number generator failed")?;
        let suffix: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let candidate = dir.join(format!(".{name}.{suffix}.tmp"));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&candidate)
        {
            Ok(f) => {
                tmp = Some((candidate, f));
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 99 => continue,
            Err(e) => {
                return Err(format!(
                    "Unable to open file {} for writing. {e}.",
                    candidate.display()
                ))
            }
        }
    }
    let (tmp_path, mut f) = tmp.ok_or("could not create a temporary file")?;
    let result = (|| -> std::io::Result<()> {
        f.write_all(text.as_bytes())?;
        if let Some(m) = like {
            f.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
            // Keep the owner when allowed (root editing the broker's file); otherwise the
            // file is ours, as with any editor that writes a new file.
            // SAFETY: fchown on a file descriptor we own.
            let fd = std::os::unix::io::AsRawFd::as_raw_fd(&f);
            unsafe {
                libc::fchown(fd, m.uid(), m.gid());
            }
        }
        f.sync_all()?;
        std::fs::rename(&tmp_path, path)?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp_path);
        format!("Error writing password file {}: {e}.", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{PasswordFile, Verdict};
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: PasswdArgs,
    }

    fn parse(argv: &[&str]) -> PasswdArgs {
        let mut v = vec!["midge-passwd"];
        v.extend_from_slice(argv);
        Cmd::try_parse_from(v).expect("argv").args
    }

    struct Scripted(Vec<&'static str>);

    impl PasswordPrompt for Scripted {
        fn read_password(&mut self, _prompt: &str) -> Result<Option<String>, String> {
            Ok(if self.0.is_empty() {
                None
            } else {
                Some(self.0.remove(0).to_string())
            })
        }
    }

    fn run_batch(argv: &[&str]) -> Result<(), String> {
        run(&parse(argv), &mut Scripted(vec![]))
    }

    fn verify(path: &Path, user: &str, pw: &str) -> Verdict {
        PasswordFile::load(path)
            .unwrap()
            .verify(user, Some(pw.as_bytes()))
    }

    #[test]
    fn create_add_change_delete() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        let ps = p.to_str().unwrap();
        run_batch(&["-c", "-b", ps, "alice", "s1"]).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("alice:$7$101$"), "{text}");
        assert_eq!(text.lines().count(), 1);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(verify(&p, "alice", "s1"), Verdict::Accepted);

        run_batch(&["-b", "-I", "7", ps, "bob", "-starts-with-dash"]).unwrap();
        assert_eq!(verify(&p, "bob", "-starts-with-dash"), Verdict::Accepted);
        assert!(std::fs::read_to_string(&p).unwrap().contains("bob:$7$7$"));

        run_batch(&["-b", ps, "alice", "s2"]).unwrap();
        assert_eq!(verify(&p, "alice", "s2"), Verdict::Accepted);
        assert_eq!(verify(&p, "alice", "s1"), Verdict::WrongPassword);
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 2);

        run_batch(&["-D", ps, "alice"]).unwrap();
        assert_eq!(verify(&p, "alice", "s2"), Verdict::UnknownUser);
        assert_eq!(verify(&p, "bob", "-starts-with-dash"), Verdict::Accepted);
        assert_eq!(
            run_batch(&["-D", ps, "alice"]).unwrap_err(),
            "User alice not found in password file."
        );
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn rewriting_keeps_comments_mode_and_other_lines_verbatim() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        let keep = "carol:$6$MRNUdCxoMAKU+/lC$AWHL2B5SPhCCfZRn89R/rKf3QtZTLwGtmEjnglpYVuynk1D65gMHNw6dNFvU2nYfpCERZGnrnJayqIb7L5sL7A==";
        std::fs::write(&p, format!("# fleet users\n\n{keep}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        run_batch(&["-b", p.to_str().unwrap(), "dave", "x"]).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with(&format!("# fleet users\n\n{keep}\ndave:$7$")),
            "{text}"
        );
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }

    #[test]
    fn update_hashes_plain_text_and_keeps_hashes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        let h = PasswordHash::new_pbkdf2(b"old", NonZeroU32::new(2).unwrap())
            .unwrap()
            .encode();
        std::fs::write(&p, format!("alice:secret\nbob:{h}\n# c\n")).unwrap();
        run_batch(&["-U", p.to_str().unwrap()]).unwrap();
        assert_eq!(verify(&p, "alice", "secret"), Verdict::Accepted);
        assert_eq!(verify(&p, "bob", "old"), Verdict::Accepted);
        assert!(std::fs::read_to_string(&p).unwrap().ends_with("# c\n"));
    }

    #[test]
    fn interactive_prompt_twice() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        let ps = p.to_str().unwrap();
        run(
            &parse(&["-c", ps, "alice"]),
            &mut Scripted(vec!["pw", "pw"]),
        )
        .unwrap();
        assert_eq!(verify(&p, "alice", "pw"), Verdict::Accepted);
        assert_eq!(
            run(&parse(&[ps, "alice"]), &mut Scripted(vec!["a", "b"])).unwrap_err(),
            "Passwords do not match."
        );
        assert_eq!(
            run(&parse(&[ps, "alice"]), &mut Scripted(vec![""])).unwrap_err(),
            "Empty password."
        );
        assert_eq!(
            run(&parse(&[ps, "alice"]), &mut Scripted(vec![])).unwrap_err(),
            "Empty password."
        );
        assert_eq!(verify(&p, "alice", "pw"), Verdict::Accepted);
    }

    #[test]
    fn legacy_sha512() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        run_batch(&["-H", "sha512", "-c", "-b", p.to_str().unwrap(), "u", "p"]).unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().starts_with("u:$6$"));
        assert_eq!(verify(&p, "u", "p"), Verdict::Accepted);
    }

    #[test]
    fn argument_errors_are_mosquitto_passwds() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        let ps = p.to_str().unwrap();
        for (argv, want) in [
            (
                vec!["-c", "-D", ps, "u"],
                "-c and -D cannot be used together.",
            ),
            (vec!["-c", "-U", ps], "-c and -U cannot be used together."),
            (vec!["-D", "-U", ps], "-D and -U cannot be used together."),
            (
                vec!["-b", "-D", ps, "u"],
                "-b and -D cannot be used together.",
            ),
            (
                vec!["-c", "-b", ps, "u"],
                "-c argument given but password file, username, or password missing.",
            ),
            (
                vec!["-D", ps],
                "-D argument given but password file or username missing.",
            ),
            (vec!["-U"], "-U argument given but password file missing."),
            (vec!["-H", "md5", ps, "u"], "Unknown hash type 'md5'"),
            (
                vec!["-I", "0", "-b", ps, "u", "p"],
                "Number of iterations must be > 0.",
            ),
            (
                vec!["-I", "-3", "-b", ps, "u", "p"],
                "Number of iterations must be > 0.",
            ),
            (
                vec!["-c", "-b", ps, "a:b", "p"],
                "Username must not contain the ':' character.",
            ),
            (
                vec!["-c", "-b", ps, "a\tb", "p"],
                "Username must not contain control characters.",
            ),
            (vec![ps], "wrong arguments"),
        ] {
            let e = run_batch(&argv).unwrap_err();
            assert!(e.starts_with(want), "{argv:?}: {e}");
        }
        let e = run_batch(&["-b", ps, "u", "p"]).unwrap_err();
        assert!(
            e.starts_with(&format!("Unable to open password file {ps}.")),
            "{e}"
        );
        std::fs::write(&p, "nocolon\n").unwrap();
        let e = run_batch(&["-b", ps, "u", "p"]).unwrap_err();
        assert!(e.starts_with("Corrupt password file at line 1"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "nocolon\n");
    }
}
