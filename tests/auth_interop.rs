//! Password files both ways with programs we did not write: files made by Debian's
//! `mosquitto_passwd` verify in Midge, and files made by `midge passwd` let the real
//! `/usr/sbin/mosquitto` admit (and refuse) `mosquitto_pub`. Also: `--check-config` validates
//! both files, naming FILE:LINE of a bad one. (The broker's enforcement: tests/auth_broker.rs.)
//!
//! Needs Debian's `mosquitto` and `mosquitto-clients` (scripts/test.sh installs them); a
//! missing program fails the test with that instruction, never a silent skip. Every process is
//! bounded by a deadline and killed on drop; mosquitto listens on a free 127.0.0.1 port.

mod common;

use common::bin::free_port;
use common::proc::bounded;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use midge::auth::{PasswordFile, Verdict};

const MIDGE: &str = env!("CARGO_BIN_EXE_midge");

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: install Debian's mosquitto and mosquitto-clients \
         (scripts/test.sh does: apt-get install mosquitto mosquitto-clients)"
    );
    Command::new(name)
}

fn mosquitto_bin() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("mosquitto is not installed: apt-get install mosquitto (scripts/test.sh does)");
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn midge_passwd(args: &[&str]) -> Output {
    let mut c = Command::new(MIDGE);
    c.arg("passwd").args(args);
    bounded(c, Duration::from_secs(30))
}

// ---- mosquitto_passwd → Midge ----------------------------------------------------------------

#[test]
fn files_made_by_mosquitto_passwd_verify_in_midge() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("passwd");
    let ps = p.to_str().unwrap();
    let t = Duration::from_secs(30);
    let mut c = tool("mosquitto_passwd");
    c.args(["-c", "-b", ps, "alice", "al1ce pass"]);
    ok(&bounded(c, t), "mosquitto_passwd -c");
    let mut c = tool("mosquitto_passwd");
    c.args(["-b", ps, "bob", "b0b"]);
    ok(&bounded(c, t), "mosquitto_passwd add");
    let mut c = tool("mosquitto_passwd");
    c.args(["-H", "sha512", "-b", ps, "legacy", "old-style"]);
    ok(&bounded(c, t), "mosquitto_passwd -H sha512");
    let mut c = tool("mosquitto_passwd");
    c.args(["-I", "1000", "-b", ps, "slow", "many rounds"]);
    ok(&bounded(c, t), "mosquitto_passwd -I 1000");
    let mut c = tool("mosquitto_passwd");
    c.args(["-b", ps, "gone", "x"]);
    ok(&bounded(c, t), "mosquitto_passwd add gone");
    let mut c = tool("mosquitto_passwd");
    c.args(["-D", ps, "gone"]);
    ok(&bounded(c, t), "mosquitto_passwd -D");

    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains("alice:$7$101$"), "{text}");
    assert!(text.contains("legacy:$6$"), "{text}");
    assert!(text.contains("slow:$7$1000$"), "{text}");

    let f = PasswordFile::load(&p).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(f.len(), 4);
    for (u, good, bad) in [
        ("alice", "al1ce pass", "al1ce"),
        ("bob", "b0b", "B0B"),
        ("legacy", "old-style", "old-styl"),
        ("slow", "many rounds", "many rounds "),
    ] {
        assert_eq!(f.verify(u, Some(good.as_bytes())), Verdict::Accepted, "{u}");
        assert_eq!(
            f.verify(u, Some(bad.as_bytes())),
            Verdict::WrongPassword,
            "{u}"
        );
    }
    assert_eq!(f.verify("gone", Some(b"x")), Verdict::UnknownUser);

    // And `midge passwd` edits a mosquitto_passwd file without disturbing the other entries.
    ok(
        &midge_passwd(&["-b", ps, "bob", "n3w"]),
        "midge passwd change",
    );
    let f = PasswordFile::load(&p).unwrap();
    assert_eq!(f.verify("bob", Some(b"n3w")), Verdict::Accepted);
    assert_eq!(f.verify("alice", Some(b"al1ce pass")), Verdict::Accepted);
    assert_eq!(f.verify("legacy", Some(b"old-style")), Verdict::Accepted);
}

// ---- midge passwd → mosquitto ----------------------------------------------------------------

struct Mosquitto {
    child: Child,
    port: u16,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_mosquitto(dir: &Path, password_file: &Path) -> Mosquitto {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    // `user root` keeps a root-started mosquitto from switching to the `mosquitto` user, who
    // could not read the test's private temporary directory; it has no effect otherwise.
    std::fs::write(
        &conf,
        format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n\
             persistence false\n",
            password_file.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("mosquitto.log")).unwrap();
    let child = Command::new(mosquitto_bin())
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn mosquitto");
    let mut m = Mosquitto { child, port };
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = m.child.try_wait().unwrap() {
            panic!(
                "mosquitto exited ({status}): {}",
                std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "mosquitto did not listen on {port} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m
}

/// mosquitto_pub's exit status is the CONNACK return code when the broker refuses.
fn publish(port: u16, v5: bool, user: &str, password: &str) -> Option<i32> {
    let mut c = tool("mosquitto_pub");
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if v5 {
        c.args(["-V", "mqttv5"]);
    }
    c.args(["-u", user, "-P", password, "-t", "auth/test", "-m", "hello"]);
    bounded(c, Duration::from_secs(20)).status.code()
}

#[test]
fn files_made_by_midge_passwd_work_in_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("passwd");
    let ps = p.to_str().unwrap();
    ok(
        &midge_passwd(&["-c", "-b", ps, "alice", "s3cret"]),
        "create",
    );
    ok(
        &midge_passwd(&["-I", "1000", "-b", ps, "slow", "r0unds"]),
        "-I",
    );
    ok(
        &midge_passwd(&["-H", "sha512", "-b", ps, "legacy", "6six"]),
        "-H",
    );
    // Interactive: the password twice on standard input (not a terminal here).
    let mut child = Command::new(MIDGE)
        .args(["passwd", ps, "bob"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn midge passwd");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"b0b pass\nb0b pass\n")
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(30), "midge passwd hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    ok(&out, "interactive midge passwd");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Reenter password: "),
        "{out:?}"
    );
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains("alice:$7$101$") && text.contains("slow:$7$1000$"));

    let m = start_mosquitto(dir.path(), &p);
    for v5 in [false, true] {
        let refused = if v5 { 135 } else { 5 };
        assert_eq!(publish(m.port, v5, "alice", "s3cret"), Some(0), "v5={v5}");
        assert_eq!(publish(m.port, v5, "bob", "b0b pass"), Some(0), "v5={v5}");
        assert_eq!(publish(m.port, v5, "slow", "r0unds"), Some(0), "v5={v5}");
        assert_eq!(publish(m.port, v5, "legacy", "6six"), Some(0), "v5={v5}");
        assert_eq!(
            publish(m.port, v5, "alice", "s3cre"),
            Some(refused),
            "v5={v5}"
        );
        assert_eq!(publish(m.port, v5, "bob", "b0b"), Some(refused), "v5={v5}");
        assert_eq!(
            publish(m.port, v5, "carol", "s3cret"),
            Some(refused),
            "v5={v5}"
        );
    }
    drop(m);

    // A user deleted with midge passwd is refused by mosquitto.
    ok(&midge_passwd(&["-D", ps, "alice"]), "delete");
    let m = start_mosquitto(dir.path(), &p);
    assert_eq!(publish(m.port, false, "alice", "s3cret"), Some(5));
    assert_eq!(publish(m.port, false, "bob", "b0b pass"), Some(0));
}

// ---- the broker and --check-config -----------------------------------------------------------

#[test]
fn check_config_validates_the_security_files() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    ok(
        &midge_passwd(&["-c", "-b", pw.to_str().unwrap(), "alice", "x"]),
        "create",
    );
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "pattern readwrite devices/%u/#\n").unwrap();
    let conf = dir.path().join("midge.conf");
    let port = free_port();
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\npassword_file {}\nacl_file {}\n",
            pw.display(),
            acl.display()
        ),
    )
    .unwrap();

    let mut c = Command::new(MIDGE);
    c.args(["--check-config", "-c"]).arg(&conf);
    let out = bounded(c, Duration::from_secs(30));
    ok(&out, "--check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l == format!("password_file {}", pw.display())),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l == format!("acl_file {}", acl.display())),
        "{stdout}"
    );

    // A bad line is a --check-config error naming both files' lines.
    std::fs::write(&acl, "pattern readwrite devices/%u/#\ntopic rwx a\n").unwrap();
    let mut c = Command::new(MIDGE);
    c.args(["--check-config", "-c"]).arg(&conf);
    let out = bounded(c, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:3: key 'acl_file': {}:2: invalid access type \"rwx\"",
            conf.display(),
            acl.display()
        )),
        "{stderr}"
    );
}
