//! Interop with the mosquitto command-line clients (Debian `mosquitto-clients`): what a
//! mosquitto user would type. Every invocation is bounded (`-W`, `-C`, a kill deadline).
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::TestBroker;

/// The program, or a failure that says how to get it (never a silent skip).
fn tool(name: &str) -> Command {
    match Command::new(name).arg("--help").output() {
        Ok(_) => Command::new(name),
        Err(e) => panic!(
            "{name} is not runnable ({e}): install Debian's mosquitto-clients \
             (scripts/test.sh does: apt-get install mosquitto-clients)"
        ),
    }
}

fn pubcmd(port: u16, args: &[&str]) {
    let out = tool("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running mosquitto_sub whose stdout lines arrive on a channel.
struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Sub {
    fn spawn(port: u16, args: &[&str]) -> Sub {
        let mut child = tool("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mosquitto_sub");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Sub { child, lines }
    }

    fn line(&self, within: Duration) -> String {
        self.lines
            .recv_timeout(within)
            .unwrap_or_else(|e| panic!("no line from mosquitto_sub within {within:?}: {e}"))
    }

    /// Wait for the process to exit (it has `-C`/`-W`); kill it after `within`.
    fn finish(mut self, within: Duration) -> (Vec<String>, Output) {
        let deadline = Instant::now() + within;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = self.child.wait_with_output().unwrap();
        let mut rest = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            rest.push(l);
        }
        (rest, out)
    }
}

/// A subscriber known to be subscribed: it also subscribes to a retained "probe" topic, and
/// the retained probe is delivered only once its SUBSCRIBE was processed (one SUBSCRIBE
/// packet carries all `-t` filters).
fn ready_sub(port: u16, id: &str, version: &str, args: &[&str], count: usize) -> Sub {
    let probe = format!("probe/{id}");
    pubcmd(
        port,
        &["-V", version, "-t", &probe, "-m", "ready", "-r", "-q", "1"],
    );
    let mut all = vec!["-V", version, "-t", &probe, "-v", "-W", "10"];
    let c = (count + 1).to_string();
    all.extend_from_slice(&["-C", &c]);
    all.extend_from_slice(args);
    let sub = Sub::spawn(port, &all);
    assert_eq!(sub.line(Duration::from_secs(5)), format!("{probe} ready"));
    sub
}

fn pub_sub_round_trip(sub_version: &str, pub_version: &str) {
    let b = TestBroker::start(2);
    let id = format!("{sub_version}-{pub_version}");
    let topic = format!("data/{id}");
    let sub = ready_sub(b.port(), &id, sub_version, &["-t", "data/#", "-q", "2"], 3);
    for q in ["0", "1", "2"] {
        pubcmd(
            b.port(),
            &[
                "-V",
                pub_version,
                "-t",
                &topic,
                "-q",
                q,
                "-m",
                &format!("hello q{q}"),
            ],
        );
    }
    let (lines, out) = sub.finish(Duration::from_secs(5));
    assert!(out.status.success(), "mosquitto_sub: {out:?}");
    assert_eq!(
        lines,
        [
            format!("{topic} hello q0"),
            format!("{topic} hello q1"),
            format!("{topic} hello q2")
        ]
    );
}

#[test]
fn pub_sub_mqttv311() {
    pub_sub_round_trip("mqttv311", "mqttv311");
}

#[test]
fn pub_sub_mqttv5() {
    pub_sub_round_trip("mqttv5", "mqttv5");
}

#[test]
fn pub_sub_mqttv31() {
    pub_sub_round_trip("mqttv31", "mqttv31");
}

#[test]
fn pub_sub_mixed_versions() {
    pub_sub_round_trip("mqttv5", "mqttv31");
    pub_sub_round_trip("mqttv31", "mqttv5");
}

#[test]
fn wildcard_plus_and_hash() {
    let b = TestBroker::start(2);
    let sub = ready_sub(
        b.port(),
        "wild",
        "mqttv311",
        &["-t", "w/+/temp", "-t", "w/alarm/#"],
        3,
    );
    for t in [
        "w/a/temp",
        "w/a/b/temp",
        "w/alarm",
        "w/alarm/x/y",
        "w/b/hum",
    ] {
        pubcmd(b.port(), &["-t", t, "-m", t, "-q", "1"]);
    }
    let (lines, out) = sub.finish(Duration::from_secs(5));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        lines,
        [
            "w/a/temp w/a/temp",
            "w/alarm w/alarm",
            "w/alarm/x/y w/alarm/x/y"
        ]
    );
}

#[test]
fn retained_then_cleared() {
    let b = TestBroker::start(2);
    for v in ["mqttv311", "mqttv5", "mqttv31"] {
        let t = format!("ret/{v}");
        pubcmd(
            b.port(),
            &["-V", v, "-t", &t, "-m", "kept", "-r", "-q", "1"],
        );
        let out = tool("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &b.port().to_string()])
            .args(["-V", v, "-t", &t, "-v", "-C", "1", "-W", "3"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{t} kept\n"));

        // `-r -n`: a zero-length retained message deletes it.
        pubcmd(b.port(), &["-V", v, "-t", &t, "-r", "-n", "-q", "1"]);
        let out = tool("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &b.port().to_string()])
            .args(["-V", v, "-t", &t, "-v", "-C", "1", "-W", "1"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "",
            "retained not cleared ({v})"
        );
        assert!(
            !out.status.success(),
            "mosquitto_sub should time out: {out:?}"
        );
    }
}

#[test]
fn persistent_session_queues_qos1_while_offline() {
    let b = TestBroker::start(2);
    let port = b.port().to_string();
    let base = ["-h", "127.0.0.1", "-p", port.as_str()];
    // -c: clean session off; -E: exit once the subscription is acknowledged.
    let out = tool("mosquitto_sub")
        .args(base)
        .args(["-c", "-i", "mosq-persist", "-q", "1", "-t", "pq/#", "-E"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for i in 0..3 {
        pubcmd(b.port(), &["-t", "pq/x", "-q", "1", "-m", &format!("m{i}")]);
    }
    let out = tool("mosquitto_sub")
        .args(base)
        .args([
            "-c",
            "-i",
            "mosq-persist",
            "-q",
            "1",
            "-t",
            "pq/#",
            "-C",
            "3",
            "-W",
            "3",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "m0\nm1\nm2\n");
}
