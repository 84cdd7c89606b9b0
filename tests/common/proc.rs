//! Outside programs under test: run one to completion within a bound, collect a child's
//! stderr as it runs. Shared by the tests that drive mosquitto, openssl and the midge binary
//! by hand.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Run `cmd` to completion (no stdin, output captured); killed, and the test failed with
/// what it printed, if it takes longer than `limit`.
pub fn bounded(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let t0 = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{cmd:?} did not finish within {limit:?}: stdout {:?}, stderr {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Set by a stderr reader thread once the pipe reached end of file: from then on every line
/// the child wrote has been handed on. A child's exit status can be seen before its last
/// lines are read from the pipe; a test that read the log straight after `try_wait` saw it
/// empty (CI, stop 19: 58 of 100 runs under CPU load).
#[derive(Clone, Default)]
pub struct Eof(Arc<(Mutex<bool>, Condvar)>);

impl Eof {
    fn set(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }

    /// Once the child has exited: wait (up to 5 s) until its stderr has been read to the end.
    pub fn wait(&self) {
        let (lock, cv) = &*self.0;
        let guard = lock.lock().unwrap();
        let (_guard, res) = cv
            .wait_timeout_while(guard, Duration::from_secs(5), |eof| !*eof)
            .unwrap();
        assert!(
            !res.timed_out(),
            "the child's stderr stayed open 5 s after it exited"
        );
    }
}

/// Take `child`'s piped stderr and hand it, line by line as it is written, to `push` on a
/// thread of its own.
pub fn read_stderr(child: &mut Child, mut push: impl FnMut(String) + Send + 'static) -> Eof {
    let stderr = child.stderr.take().expect("stderr piped");
    let eof = Eof::default();
    let done = eof.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            push(line);
        }
        done.set();
    });
    eof
}

/// Take `child`'s piped stderr and collect it, line by line, as it is written.
pub fn collect_stderr(child: &mut Child) -> (Arc<Mutex<String>>, Eof) {
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    let eof = read_stderr(child, move |line| {
        let mut l = sink.lock().unwrap();
        l.push_str(&line);
        l.push('\n');
    });
    (log, eof)
}
