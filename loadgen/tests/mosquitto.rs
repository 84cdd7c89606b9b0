//! Integration: run midge-loadgen against a real mosquitto (Debian package `mosquitto`)
//! started by the test on a free 127.0.0.1 port, and check the reported counts against what a
//! mosquitto user would expect: QoS 1 pairs deliver every message exactly once, connections
//! all succeed, TLS with per-device minted certificates works, bad targets fail cleanly, and
//! a small mutual-TLS fleet split over two worker processes loses nothing at QoS 1.
//! Skips (with a message) only when mosquitto is not installed.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_midge-loadgen");

fn mosquitto_bin() -> Option<PathBuf> {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return Some(p.into());
        }
    }
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Broker {
    child: Child,
    port: u16,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_mosquitto(dir: &Path, extra: &str) -> Option<Broker> {
    let Some(bin) = mosquitto_bin() else {
        eprintln!("SKIP: mosquitto is not installed (apt-get install -y mosquitto)");
        return None;
    };
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings true\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n{extra}\n"
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto");
    let b = Broker { child, port };
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "mosquitto did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(b)
}

fn first_cpu() -> String {
    // The test machine may restrict CPUs; use one we are allowed on.
    let out = Command::new("sh")
        .arg("-c")
        .arg("taskset -pc $$ 2>/dev/null | sed 's/.*: //'")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let first = out
        .trim()
        .split([',', '-'])
        .next()
        .unwrap_or("0")
        .to_string();
    if first.is_empty() {
        "0".into()
    } else {
        first
    }
}

/// Every CPU we may use, as a --cores list ("0,1"): a fleet with --procs 2 then gives each
/// worker process its own CPU (where there are two).
fn all_cpus() -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("taskset -pc $$ 2>/dev/null | sed 's/.*: //'")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let l = out.trim();
    if l.is_empty() {
        first_cpu()
    } else {
        l.to_string()
    }
}

fn loadgen(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run midge-loadgen");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn qos1_pairs_deliver_every_message_exactly_once() {
    let d = tempfile::tempdir().unwrap();
    let Some(b) = start_mosquitto(d.path(), "") else {
        return;
    };
    let j = d.path().join("r.json");
    let port = b.port.to_string();
    let cpu = first_cpu();
    let pid = b.child.id().to_string();
    let (code, out, err) = loadgen(&[
        "pubsub",
        "--port",
        &port,
        "--cores",
        &cpu,
        "--broker-pid",
        &pid,
        "--qos",
        "1",
        "--rate",
        "600",
        "--publishers",
        "3",
        "--subscribers",
        "3",
        "--warmup",
        "500ms",
        "--duration",
        "1500ms",
        "--json",
        j.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r = json(&j);
    let sent = r["sent"].as_u64().unwrap();
    // 600 msg/s for 2 s in total (warm-up included), open loop: exactly the schedule.
    assert!((1190..=1200).contains(&sent), "sent {sent}");
    assert_eq!(r["expected"].as_u64().unwrap(), sent);
    assert_eq!(r["received"].as_u64().unwrap(), sent, "{out}");
    assert_eq!(r["lost"].as_u64().unwrap(), 0);
    assert_eq!(r["duplicates"].as_u64().unwrap(), 0);
    assert_eq!(r["reordered"].as_u64().unwrap(), 0);
    // Devices write each packet on its own: the default, and said so in the report.
    assert_eq!(r["write_mode"], "per-packet");
    assert!(out.contains("per-packet writes"), "{out}");
    // The measured window excludes the warm-up: ~1.5 s of 2 s.
    let m = r["sent_measured"].as_u64().unwrap();
    assert!((880..=910).contains(&m), "measured {m}");
    assert_eq!(r["latency"]["count"].as_u64().unwrap(), m);
    assert!(r["latency"]["p50_us"].as_f64().unwrap() > 0.0);
    // The broker's CPU over the whole run and over the measured window only.
    assert!(r["broker_cpu_seconds"].as_f64().is_some(), "{out}");
    let (w, whole) = (
        r["broker_cpu_window_seconds"].as_f64().unwrap(),
        r["broker_cpu_seconds"].as_f64().unwrap(),
    );
    assert!(w <= whole, "window {w} within the run {whole}");
    assert!(r["broker_cpu_window_s_per_million"].as_f64().is_some());
}

#[test]
fn fan_out_qos0_mqtt5_every_subscriber_gets_every_message() {
    let d = tempfile::tempdir().unwrap();
    let Some(b) = start_mosquitto(d.path(), "") else {
        return;
    };
    let j = d.path().join("r.json");
    let port = b.port.to_string();
    let hg = d.path().join("hgrm");
    let pl = d.path().join("plot");
    let (code, out, err) = loadgen(&[
        "pubsub",
        "--port",
        &port,
        "--cores",
        &first_cpu(),
        "--mqtt",
        "5",
        "--mode",
        "fan-out",
        "--subscribers",
        "4",
        "--rate",
        "200",
        "--warmup",
        "200ms",
        "--duration",
        "1s",
        "--json",
        j.to_str().unwrap(),
        "--hgrm",
        hg.to_str().unwrap(),
        "--plot",
        pl.to_str().unwrap(),
        "--write-mode",
        "coalesced",
        "-q",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r = json(&j);
    assert_eq!(r["plan"]["write_mode"], "coalesced");
    assert!(out.contains("coalesced writes"), "{out}");
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent >= 230, "sent {sent}");
    assert_eq!(r["expected"].as_u64().unwrap(), sent * 4);
    assert_eq!(r["received"].as_u64().unwrap(), sent * 4);
    assert_eq!(r["lost"].as_u64().unwrap(), 0);
    assert!(hg.join("pubsub_latency.hgrm").exists());
    assert!(pl.join("pubsub_latency_percentiles.svg").exists());
    assert!(pl.join("pubsub_rate.svg").exists());
}

#[test]
fn connect_counts_and_broker_memory() {
    let d = tempfile::tempdir().unwrap();
    let Some(b) = start_mosquitto(d.path(), "") else {
        return;
    };
    let j = d.path().join("c.json");
    let pid = b.child.id().to_string();
    let (code, out, err) = loadgen(&[
        "connect",
        "--port",
        &b.port.to_string(),
        "--cores",
        &first_cpu(),
        "--connections",
        "60",
        "--concurrency",
        "8",
        "--broker-pid",
        &pid,
        "--json",
        j.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r = json(&j);
    assert_eq!(r["succeeded"].as_u64().unwrap(), 60, "{out}");
    assert_eq!(r["failed"].as_u64().unwrap(), 0);
    assert_eq!(r["tcp_connect"]["count"].as_u64().unwrap(), 60);
    assert_eq!(r["connack"]["count"].as_u64().unwrap(), 60);
    assert_eq!(r["tls_handshake"]["count"].as_u64().unwrap(), 0);
    assert!(r["broker_rss_after"].as_u64().unwrap() > 0);
    assert!(r["broker_cpu_ms_per_handshake"].as_f64().is_some());
}

#[test]
fn mutual_tls_with_minted_device_certificates_and_resumption() {
    let d = tempfile::tempdir().unwrap();
    let pki = d.path().join("pki");
    let (code, out, err) = loadgen(&["pki", "--out", pki.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let tls_port = free_port();
    let srv_port = free_port();
    // per_listener_settings so the server-auth-only listener needs no client certificate.
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\nrequire_certificate true\nuse_identity_as_username true\nallow_anonymous true\nlistener {srv_port} 127.0.0.1\ncafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\nallow_anonymous true\n",
        pki.display()
    );
    let Some(_b) = start_mosquitto(d.path(), &extra) else {
        return;
    };
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let ca = pki.join("ca.crt");
    let cak = pki.join("ca.key");
    let cpu = first_cpu();
    // Mutual TLS, one minted identity per device: all full handshakes.
    // (mosquitto 2.0 with OpenSSL does not resume sessions when it verifies client
    // certificates, so resumption is checked on the server-auth-only listener below.)
    let j = d.path().join("mtls.json");
    let port = tls_port.to_string();
    let (code, out, err) = loadgen(&[
        "connect",
        "--port",
        &port,
        "--cores",
        &cpu,
        "--connections",
        "20",
        "--concurrency",
        "4",
        "--cafile",
        ca.to_str().unwrap(),
        "--mint-ca-cert",
        ca.to_str().unwrap(),
        "--mint-ca-key",
        cak.to_str().unwrap(),
        "--servername",
        "localhost",
        "--json",
        j.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r = json(&j);
    assert_eq!(r["succeeded"].as_u64().unwrap(), 20, "{out}");
    assert_eq!(r["tls_handshake"]["count"].as_u64().unwrap(), 20);
    assert_eq!(r["resumed"].as_u64().unwrap(), 0);
    // Resumption with one shared session store: after the first full handshake, sequential
    // connections resume.
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", srv_port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    for resume in [false, true] {
        let j = d.path().join(format!("r{resume}.json"));
        let port = srv_port.to_string();
        let mut args = vec![
            "connect",
            "--port",
            &port,
            "--cores",
            &cpu,
            "--connections",
            "20",
            "--concurrency",
            "1",
            "--cafile",
            ca.to_str().unwrap(),
            "--servername",
            "localhost",
            "--json",
            j.to_str().unwrap(),
            "-q",
        ];
        if resume {
            args.push("--tls-resume");
        }
        let (code, out, err) = loadgen(&args);
        assert_eq!(code, 0, "{out}\n{err}");
        let r = json(&j);
        assert_eq!(r["succeeded"].as_u64().unwrap(), 20, "{out}");
        let resumed = r["resumed"].as_u64().unwrap();
        if resume {
            assert!(resumed >= 15, "resumed {resumed}: {out}");
        } else {
            assert_eq!(resumed, 0);
        }
    }
    // A device without a certificate is refused by require_certificate.
    let (code, out, err) = loadgen(&[
        "connect",
        "--port",
        &tls_port.to_string(),
        "--cores",
        &first_cpu(),
        "--connections",
        "2",
        "--cafile",
        ca.to_str().unwrap(),
        "--servername",
        "localhost",
        "-q",
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("failures 2") || err.contains("no connection"),
        "{out}\n{err}"
    );
}

#[test]
fn refuses_remote_hosts_and_fails_cleanly_on_a_closed_port() {
    let (code, _, err) = loadgen(&["pubsub", "--host", "192.0.2.1", "--duration", "1s"]);
    assert_eq!(code, 2);
    assert!(err.contains("--allow-remote"), "{err}");
    let t0 = Instant::now();
    let port = free_port().to_string();
    let (code, _, err) = loadgen(&["pubsub", "--port", &port, "--cores", &first_cpu(), "-q"]);
    assert_eq!(code, 2);
    assert!(err.contains("connection refused"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let (code, _, err) = loadgen(&["pubsub", "--payload", "8"]);
    assert_eq!(code, 2);
    assert!(err.contains("--payload"), "{err}");
}

#[test]
fn mutual_tls_with_cert_dir_and_shared_cert_pubsub() {
    let d = tempfile::tempdir().unwrap();
    let pki = d.path().join("pki");
    let (code, out, err) = loadgen(&["pki", "--out", pki.to_str().unwrap(), "--devices", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\nrequire_certificate true\nallow_anonymous true\n",
        pki.display()
    );
    let Some(_b) = start_mosquitto(d.path(), &extra) else {
        return;
    };
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let ca = pki.join("ca.crt");
    let devdir = pki.join("devices");
    let cpu = first_cpu();
    let port = tls_port.to_string();
    let j = d.path().join("p.json");
    // QoS 2 pairs over mutual TLS, identities from a directory (3 certs, 8 clients).
    let (code, out, err) = loadgen(&[
        "pubsub",
        "--port",
        &port,
        "--cores",
        &cpu,
        "--qos",
        "2",
        "--mqtt",
        "5",
        "--rate",
        "400",
        "--publishers",
        "4",
        "--subscribers",
        "4",
        "--warmup",
        "0",
        "--duration",
        "1s",
        "--cafile",
        ca.to_str().unwrap(),
        "--cert-dir",
        devdir.to_str().unwrap(),
        "--servername",
        "localhost",
        "--json",
        j.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r = json(&j);
    assert!(r["tls"].as_bool().unwrap());
    assert_eq!(r["sent"].as_u64().unwrap(), 400);
    assert_eq!(r["received"].as_u64().unwrap(), 400, "{out}");
    assert_eq!(r["lost"].as_u64().unwrap(), 0);
    assert_eq!(
        r["duplicates"].as_u64().unwrap(),
        0,
        "QoS 2 is exactly once"
    );
    // One shared identity.
    let (code, out, err) = loadgen(&[
        "connect",
        "--port",
        &port,
        "--cores",
        &cpu,
        "--connections",
        "5",
        "--cafile",
        ca.to_str().unwrap(),
        "--cert",
        devdir.join("lg-d0.crt").to_str().unwrap(),
        "--key",
        devdir.join("lg-d0.key").to_str().unwrap(),
        "--servername",
        "localhost",
        "-q",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("5 of 5 connections up"), "{out}");
}

#[test]
fn storm_brings_every_device_back_and_measures_the_steady_pair() {
    let d = tempfile::tempdir().unwrap();
    let Some(b) = start_mosquitto(d.path(), "") else {
        return;
    };
    let j = d.path().join("s.json");
    let (code, out, err) = loadgen(&[
        "storm",
        "--port",
        &b.port.to_string(),
        "--cores",
        &first_cpu(),
        "--devices",
        "100",
        "--settle",
        "500ms",
        "--after",
        "500ms",
        "--rate",
        "200",
        "--json",
        j.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r = json(&j);
    assert_eq!(r["reconnected"].as_u64().unwrap(), 100);
    assert!(r["all_back_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(r["time_to_reconnect"]["count"].as_u64().unwrap(), 100);
    assert!(r["steady_before"]["count"].as_u64().unwrap() >= 90, "{out}");
    assert!(r["steady_after"]["count"].as_u64().unwrap() >= 1, "{out}");
}

#[test]
fn capacity_steps_until_the_objective_breaks() {
    let d = tempfile::tempdir().unwrap();
    let Some(b) = start_mosquitto(d.path(), "") else {
        return;
    };
    let j = d.path().join("c.json");
    // A generous objective: both low-rate steps pass, and --max-steps bounds the run.
    let (code, out, err) = loadgen(&[
        "capacity",
        "--port",
        &b.port.to_string(),
        "--cores",
        &first_cpu(),
        "--start-rate",
        "100",
        "--step-factor",
        "2",
        "--max-steps",
        "2",
        "--slo-p99",
        "10s",
        "--warmup",
        "0",
        "--duration",
        "1s",
        "--publishers",
        "2",
        "--subscribers",
        "2",
        "--json",
        j.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r = json(&j);
    assert_eq!(r["steps"].as_array().unwrap().len(), 2);
    assert_eq!(
        r["highest_sustainable_rate"].as_f64().unwrap(),
        200.0,
        "{out}"
    );
    // An impossible objective: the first step fails and nothing is sustainable.
    let (code, out, _) = loadgen(&[
        "capacity",
        "--port",
        &b.port.to_string(),
        "--cores",
        &first_cpu(),
        "--start-rate",
        "100",
        "--slo-p99",
        "1us",
        "--warmup",
        "0",
        "--duration",
        "1s",
        "--publishers",
        "1",
        "--subscribers",
        "1",
        "-q",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("no step met the objective"), "{out}");
}

#[test]
fn fleet_over_mutual_tls_in_two_worker_processes_loses_nothing() {
    let d = tempfile::tempdir().unwrap();
    let pki = d.path().join("pki");
    let (code, out, err) = loadgen(&["pki", "--out", pki.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let tls_port = free_port();
    let extra = format!(
        "max_connections -1\nlistener {tls_port} 127.0.0.1\ncafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\nrequire_certificate true\nallow_anonymous true\n",
        pki.display()
    );
    let Some(b) = start_mosquitto(d.path(), &extra) else {
        return;
    };
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let ca = pki.join("ca.crt");
    let cak = pki.join("ca.key");
    let cache = d.path().join("identities");
    let j = d.path().join("fleet.json");
    let pid = b.child.id().to_string();
    // 20 devices split over two worker processes (so the backends of one process receive
    // the other's telemetry through the shared subscription), a keep-alive short enough that
    // every device pings during the idle phase (mosquitto allows 1.5 keep-alives of silence:
    // 2 s leaves a loaded machine a second of slack), commands at 20/s.
    let (code, out, err) = loadgen(&[
        "fleet",
        "--port",
        &tls_port.to_string(),
        "--cores",
        &all_cpus(),
        "--devices",
        "20",
        "--procs",
        "2",
        "--backends",
        "2",
        "--cafile",
        ca.to_str().unwrap(),
        "--mint-ca-cert",
        ca.to_str().unwrap(),
        "--mint-ca-key",
        cak.to_str().unwrap(),
        "--servername",
        "localhost",
        "--cert-cache",
        cache.to_str().unwrap(),
        "--keepalive",
        "2",
        "--ramp-rate",
        "200",
        "--settle",
        "200ms",
        "--idle",
        "2500ms",
        "--interval",
        "500ms",
        "--warmup",
        "300ms",
        "--duration",
        "2s",
        "--drain",
        "5s",
        "--cmd-rate",
        "20",
        "--broker-pid",
        &pid,
        "--json",
        j.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r = json(&j);
    assert_eq!(r["write_mode"], "per-packet");
    assert_eq!(r["connected"].as_u64().unwrap(), 20, "{out}");
    assert_eq!(r["failed"].as_u64().unwrap(), 0, "{out}");
    // 20 devices, 2 backends, 2 commanders: each its own minted identity, cached on disk.
    let ids = r["identities_minted"].as_u64().unwrap() + r["identities_loaded"].as_u64().unwrap();
    assert_eq!(ids, 24, "{out}");
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        1,
        "one directory per CA"
    );
    // Every device published (2.3 s at one message per 0.5 s) and QoS 1 lost nothing.
    let sent = r["tel_sent"].as_u64().unwrap();
    assert!(sent >= 20 * 4, "sent {sent}: {out}");
    assert_eq!(r["tel_expected"].as_u64().unwrap(), sent);
    assert_eq!(r["tel_received"].as_u64().unwrap(), sent, "{out}");
    assert_eq!(r["tel_lost"].as_u64().unwrap(), 0, "{out}");
    assert_eq!(r["tel_duplicates"].as_u64().unwrap(), 0, "{out}");
    assert_eq!(
        r["tel_acked"].as_u64().unwrap(),
        sent,
        "every publish acknowledged"
    );
    let cmds = r["cmd_sent"].as_u64().unwrap();
    assert!(cmds >= 30, "commands {cmds}: {out}");
    assert_eq!(r["cmd_received"].as_u64().unwrap(), cmds, "{out}");
    assert_eq!(r["cmd_lost"].as_u64().unwrap(), 0);
    assert!(r["latency"]["count"].as_u64().unwrap() > 0);
    // Idle devices kept alive with PINGREQ, and mosquitto answered.
    assert!(r["idle_pings"].as_u64().unwrap() >= 20, "{out}");
    assert!(r["pongs"].as_u64().unwrap() >= 20, "{out}");
    assert!(r["broker_rss_after"].as_u64().unwrap() > 0);
    assert!(r["broker_cpu_us_per_msg"].as_f64().is_some(), "{out}");
    assert!(r["connect_total"]["count"].as_u64().unwrap() == 20);
}
