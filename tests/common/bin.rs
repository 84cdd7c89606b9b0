//! The real `midge` binary under test: spawned with arguments or a config file, its log read
//! line by line as it runs, stopped with SIGTERM, killed if a test fails half-way.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::proc::{read_stderr, Eof};

/// A port nothing listens on now, and never handed out before in this test process. The
/// kernel may give the same free port to two `bind(0)` calls in a row; two brokers (or two
/// listeners of one test) given the same port would then share it (SO_REUSEPORT, or the
/// probe refusing the second broker while its test talks to the first), which made tests
/// fail now and then for reasons that were not theirs.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A running `midge`; killed on drop unless it already exited.
pub struct Midge {
    pub child: Child,
    /// Every stderr line so far (the log goes to stderr by default).
    pub log: Arc<Mutex<Vec<String>>>,
    /// Set once stderr reached end of file: every line the process wrote is in `log`.
    eof: Eof,
}

impl Midge {
    /// `midge ARGS` with `RUST_LOG` unset (the binary's own log settings apply) unless
    /// `rust_log` is given.
    pub fn spawn(args: &[&str], rust_log: Option<&str>) -> Midge {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_midge"));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match rust_log {
            Some(v) => cmd.env("RUST_LOG", v),
            None => cmd.env_remove("RUST_LOG"),
        };
        let mut child = cmd.spawn().expect("spawn midge");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let eof = read_stderr(&mut child, move |line| sink.lock().unwrap().push(line));
        Midge { child, log, eof }
    }

    /// The exit status once the process has exited, and then only after its log has been
    /// read to the end (see `Eof`).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let st = self.child.try_wait().unwrap()?;
        self.eof.wait();
        Some(st)
    }

    /// `midge -c FILE`.
    pub fn with_config(file: &Path, rust_log: Option<&str>) -> Midge {
        Self::spawn(&["-c", file.to_str().unwrap()], rust_log)
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The first log line `pred` accepts, waiting up to `within`.
    pub fn wait_log(&mut self, within: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            if self.exited().is_some() {
                // One last look: every line the process wrote has been read.
                return self.log.lock().unwrap().iter().find(|l| pred(l)).cloned();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait until `addr` accepts TCP connections (panics if midge exits first).
    pub fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if let Some(st) = self.exited() {
                panic!(
                    "midge exited during start-up: {st}\n{}",
                    self.lines().join("\n")
                );
            }
            assert!(Instant::now() < deadline, "midge not listening on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sigterm(&self) {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) },
            0
        );
    }

    pub fn sighup(&self) {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGHUP) },
            0
        );
    }

    /// The exit status, or `None` (and the process killed) if it is still running after
    /// `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the broker process, in KiB (from /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("VmRSS in /proc status")
    }
}

impl Drop for Midge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config file in a fresh temporary directory (kept alive by the returned guard).
pub fn config_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("midge.conf");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}
