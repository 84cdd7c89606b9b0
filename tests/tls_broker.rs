//! Mutual TLS against the real `midge` binary over sockets, as an operator checks it:
//! certificates made with `midge certs` and with the usual `openssl` recipe, mosquitto clients
//! at MQTT 3.1.1 and 5, handshake refusals with their reason in the broker's log, the
//! certificate identity as the username, session resumption across two shards, hot reload on
//! SIGHUP / `midge reload`, and `--check-config` / start-up errors for TLS material.
//!
//! Every child process is bounded (mosquitto_sub `-W`, `timeout` on openssl, kill on drop) and
//! every broker listens on free 127.0.0.1 ports. Needs mosquitto-clients and openssl
//! (scripts/test.sh installs them); each test fails with a clear message without them.
mod common;

use common::bin::free_port;
use common::proc::{collect_stderr, Eof};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIDGE: &str = env!("CARGO_BIN_EXE_midge");

// ---------------------------------------------------------------- tools and files

fn need_tools() {
    for (tool, arg, pkg) in [
        ("mosquitto_pub", "--help", "mosquitto-clients"),
        ("mosquitto_sub", "--help", "mosquitto-clients"),
        ("openssl", "version", "openssl"),
        ("timeout", "--version", "coreutils"),
        ("stdbuf", "--version", "coreutils"),
    ] {
        if let Err(e) = Command::new(tool).arg(arg).output() {
            panic!("`{tool}` is not runnable ({e}): install Debian's {pkg} (scripts/test.sh does)");
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `midge certs SUB --dir DIR ARGS...`
fn midge_certs(dir: &Path, sub: &str, args: &[&str]) {
    run_ok(
        Command::new(MIDGE)
            .args(["certs", sub, "--dir"])
            .arg(dir)
            .args(args),
    );
}

/// `openssl ARGS...` run in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}

/// Files of one client identity.
#[derive(Clone, Debug)]
struct Device {
    cert: PathBuf,
    key: PathBuf,
}

/// A CA directory: its certificate, the broker's certificate and key.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Pki {
    /// CA + server certificate (localhost, 127.0.0.1) made by `midge certs`.
    fn midge(dir: &Path) -> Pki {
        Pki::midge_named(dir, "Midge CA")
    }

    fn midge_named(dir: &Path, ca_cn: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        midge_certs(dir, "ca", &["--cn", ca_cn]);
        midge_certs(dir, "server", &["--dns", "localhost", "--ip", "127.0.0.1"]);
        Pki {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        }
    }

    fn midge_client(&self, cn: &str) -> Device {
        midge_certs(&self.dir, "client", &["--cn", cn]);
        Device {
            cert: self.dir.join(format!("{cn}.crt")),
            key: self.dir.join(format!("{cn}.key")),
        }
    }

    /// The usual two-way-auth guide recipe (mosquitto-tls(7) style), RSA 2048 / SHA-256.
    fn openssl(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-sha256",
                "-days",
                "365",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-subj",
                "/CN=Example Test CA",
            ],
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "365",
                "-sha256",
                "-extfile",
                "server.ext",
            ],
        );
        Pki {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        }
    }

    /// Client certificate signed with openssl by this CA (ca.crt/ca.key in its directory,
    /// from either recipe); `subj` like `/C=DE/O=Acme/CN=device-1`.
    /// `legacy`: RSA-1024 key signed with SHA-1, what old tutorials produce.
    fn openssl_client(&self, stem: &str, subj: &str, legacy: bool) -> Device {
        let (bits, md) = if legacy {
            ("rsa:1024", "-sha1")
        } else {
            ("rsa:2048", "-sha256")
        };
        let (key, csr, crt) = (
            format!("{stem}.key"),
            format!("{stem}.csr"),
            format!("{stem}.crt"),
        );
        openssl(
            &self.dir,
            &[
                "req", "-newkey", bits, "-nodes", "-keyout", &key, "-out", &csr, "-subj", subj,
            ],
        );
        std::fs::write(self.dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "365",
                md,
                "-extfile",
                "client.ext",
            ],
        );
        Device {
            cert: self.dir.join(crt),
            key: self.dir.join(key),
        }
    }
}

impl Pki {
    /// A client certificate that expired long ago, made the openssl way (`openssl ca` with
    /// `-startdate/-enddate`, in a scratch database beside the CA) and signed by this CA.
    fn openssl_expired_client(&self, cn: &str) -> Device {
        let db = self.dir.join("openssl-ca");
        std::fs::create_dir_all(&db).unwrap();
        std::fs::write(db.join("index.txt"), "").unwrap();
        std::fs::write(db.join("serial"), "1000\n").unwrap();
        std::fs::write(
            db.join("ca.cnf"),
            "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
             default_md = sha256\npolicy = p\nx509_extensions = e\n[p]\ncommonName = supplied\n\
             [e]\nbasicConstraints = CA:FALSE\nextendedKeyUsage = clientAuth\n",
        )
        .unwrap();
        let (key, csr, crt) = (
            format!("{cn}.key"),
            format!("{cn}.csr"),
            format!("{cn}.crt"),
        );
        openssl(
            &db,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        let (ca, ca_key) = (self.ca.display().to_string(), self.dir.join("ca.key"));
        openssl(
            &db,
            &[
                "ca",
                "-batch",
                "-config",
                "ca.cnf",
                "-cert",
                &ca,
                "-keyfile",
                &ca_key.display().to_string(),
                "-in",
                &csr,
                "-out",
                &crt,
                "-notext",
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20210101000000Z",
            ],
        );
        Device {
            cert: db.join(crt),
            key: db.join(key),
        }
    }
}

// ---------------------------------------------------------------- the broker

/// A running `midge` whose stderr (the log) is collected; killed on drop.
struct Broker {
    child: Child,
    log: Arc<Mutex<String>>,
    eof: Eof,
}

impl Broker {
    /// Starts `midge ARGS` and waits until every TLS/plain port in `ports` accepts.
    fn start(args: &[String], ports: &[u16]) -> Broker {
        let mut child = Command::new(MIDGE)
            .args(args)
            .env("RUST_LOG", "info,rustls=error")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn midge");
        let (log, eof) = collect_stderr(&mut child);
        let mut b = Broker { child, log, eof };
        let deadline = Instant::now() + Duration::from_secs(10);
        // Wait for the start-up log line of every shard rather than probing the TLS port
        // (a probe would log an aborted handshake).
        let shards = args
            .iter()
            .position(|a| a == "--shards")
            .map(|i| args[i + 1].parse::<usize>().unwrap())
            .unwrap_or(1);
        loop {
            if let Some(st) = b.child.try_wait().unwrap() {
                b.eof.wait();
                panic!("midge exited during start-up ({st}); log:\n{}", b.log());
            }
            let listening = b.log().matches("listening on").count();
            if listening >= shards && ports.iter().all(|p| b.log().contains(&format!(":{p}"))) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "midge did not start listening; log:\n{}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to 5 s for a log line containing every one of `parts`; returns it.
    fn wait_log(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log();
            if let Some(l) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no broker log line containing {parts:?}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until at least `n` log lines contain every one of `parts`.
    fn wait_count(&self, parts: &[&str], n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.count_log(parts) < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} broker log lines containing {parts:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Number of log lines containing every one of `parts`.
    fn count_log(&self, parts: &[&str]) -> usize {
        self.log()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    fn sighup(&self) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGHUP) };
        assert_eq!(rc, 0, "kill -HUP {}", self.pid());
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// mosquitto.conf text for one TLS listener on 127.0.0.1:`port` with client certificates.
fn tls_conf(port: u16, pki: &Pki, extra: &str) -> String {
    format!(
        "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n{extra}",
        pki.ca.display(),
        pki.server_cert.display(),
        pki.server_key.display()
    )
}

fn start_with_conf(dir: &Path, name: &str, conf: &str, shards: usize, port: u16) -> Broker {
    let path = dir.join(name);
    std::fs::write(&path, conf).unwrap();
    Broker::start(
        &[
            "-c".into(),
            path.display().to_string(),
            "--shards".into(),
            shards.to_string(),
        ],
        &[port],
    )
}

// ---------------------------------------------------------------- clients

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

fn tls_args(port: u16, ca: &Path, dev: Option<&Device>) -> Vec<String> {
    let mut a = vec![
        "-h".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "--cafile".into(),
        ca.display().to_string(),
    ];
    if let Some(d) = dev {
        a.extend([
            "--cert".into(),
            d.cert.display().to_string(),
            "--key".into(),
            d.key.display().to_string(),
        ]);
    }
    a
}

/// A running `mosquitto_sub -d` (debug output shows CONNACK/SUBACK); killed on drop.
struct Sub {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Sub {
    /// Subscribes to `topic` and waits for the SUBACK; `Err(output)` if it never came.
    fn start(
        port: u16,
        ca: &Path,
        dev: Option<&Device>,
        topic: &str,
        extra: &[&str],
    ) -> Result<Sub, String> {
        // stdbuf: mosquitto_sub's stdout is block-buffered into a pipe; lines are needed now.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(tls_args(port, ca, dev))
            .args(["-d", "-t", topic, "-W", "15"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("mosquitto_sub is not runnable ({e}): install mosquitto-clients")
            });
        let (tx, rx) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut s = Sub {
            child,
            lines: rx,
            seen: Vec::new(),
        };
        if s.wait_line(|l| l.contains("received SUBACK"), Duration::from_secs(5)) {
            Ok(s)
        } else {
            Err(s.seen.join("\n"))
        }
    }

    /// Waits for an output line satisfying `pred` (bounded by `within`).
    fn wait_line(&mut self, pred: impl Fn(&str) -> bool, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = pred(&l);
                    self.seen.push(l);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Asserts that `payload` arrives as a message line.
    fn expect_message(&mut self, payload: &str) {
        assert!(
            self.wait_line(|l| l == payload, Duration::from_secs(5)),
            "subscriber did not receive {payload:?}; its output:\n{}",
            self.seen.join("\n")
        );
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_pub` one message at QoS 1; returns its output (bounded by `timeout`).
fn publish(
    port: u16,
    ca: &Path,
    dev: Option<&Device>,
    topic: &str,
    msg: &str,
    extra: &[&str],
) -> Output {
    run(Command::new("timeout")
        .arg("10")
        .arg("mosquitto_pub")
        .args(tls_args(port, ca, dev))
        .args(["-q", "1", "-t", topic, "-m", msg])
        .args(extra))
}

fn publish_ok(port: u16, ca: &Path, dev: &Device, topic: &str, msg: &str, extra: &[&str]) {
    let out = publish(port, ca, Some(dev), topic, msg, extra);
    assert!(
        out.status.success(),
        "mosquitto_pub with {} failed ({}): {}",
        dev.cert.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Subscribe with `dev`, publish with `dev`, and see the message arrive; `version` is
/// mosquitto's -V value.
fn roundtrip(port: u16, ca: &Path, dev: &Device, version: &str) {
    let topic = unique("rt");
    let msg = unique("hello");
    let mut sub = Sub::start(port, ca, Some(dev), &topic, &["-V", version]).unwrap_or_else(|out| {
        panic!(
            "mosquitto_sub -V {version} with {} was not admitted; its output:\n{out}",
            dev.cert.display()
        )
    });
    publish_ok(port, ca, dev, &topic, &msg, &["-V", version]);
    sub.expect_message(&msg);
}

/// `openssl s_client` handshake with stdin `input`; returns (success, combined output).
fn s_client(
    port: u16,
    ca: &Path,
    dev: Option<&Device>,
    extra: &[&str],
    input: &[u8],
) -> (bool, String) {
    let mut cmd = Command::new("timeout");
    cmd.args(["10", "openssl", "s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(ca)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = dev {
        cmd.arg("-cert").arg(&d.cert).arg("-key").arg(&d.key);
    }
    let mut child = cmd.spawn().expect("spawn openssl s_client");
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(input);
    drop(stdin);
    let out = child.wait_with_output().expect("s_client output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// An MQTT 3.1.1 CONNECT (clean session, keepalive 10 s) followed by DISCONNECT.
fn connect_disconnect(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut p = vec![0x10, (10 + 2 + id.len()) as u8];
    p.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10]);
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id);
    p.extend_from_slice(&[0xe0, 0x00]);
    p
}

/// Shard of the connect log line of `client_id` ("... as ID (...) on shard N").
fn shard_of(b: &Broker, client_id: &str) -> usize {
    let line = b.wait_log(&[&format!(" as {client_id} ("), "New client connected"]);
    line.rsplit("on shard ")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no shard number in {line:?}"))
}

// ---------------------------------------------------------------- 1. publish/receive

/// Certificates from `midge certs`, broker configured on the command line.
#[test]
fn midge_certs_material_serves_mosquitto_clients_at_v311_and_v5() {
    need_tools();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::midge(&tmp.path().join("pki"));
    let dev = pki.midge_client("device-1");
    let (plain, port) = (free_port(), free_port());
    let b = Broker::start(
        &[
            "-p".into(),
            plain.to_string(),
            "--shards".into(),
            "2".into(),
            "--tls-listen".into(),
            format!("127.0.0.1:{port}"),
            "--cafile".into(),
            pki.ca.display().to_string(),
            "--certfile".into(),
            pki.server_cert.display().to_string(),
            "--keyfile".into(),
            pki.server_key.display().to_string(),
            "--require-certificate".into(),
            "--use-identity-as-username".into(),
        ],
        &[port],
    );
    roundtrip(port, &pki.ca, &dev, "mqttv311");
    roundtrip(port, &pki.ca, &dev, "mqttv5");
    // The broker saw both protocol levels over TLS with the certificate's CN as username.
    b.wait_log(&["New client connected", "(p4,", "u'device-1'"]);
    b.wait_log(&["New client connected", "(p5,", "u'device-1'"]);
}

/// Certificates from the usual openssl two-way-auth recipe, broker configured by file, and
/// clients connecting by name (`localhost`, checked against the server's SAN).
#[test]
fn openssl_recipe_material_serves_mosquitto_clients_at_v311_and_v5() {
    need_tools();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::openssl(&tmp.path().join("pki"));
    let dev = pki.openssl_client("client", "/CN=device-1", false);
    let port = free_port();
    let b = start_with_conf(
        tmp.path(),
        "tls.conf",
        &tls_conf(port, &pki, "use_identity_as_username true\n"),
        2,
        port,
    );
    roundtrip(port, &pki.ca, &dev, "mqttv311");
    roundtrip(port, &pki.ca, &dev, "mqttv5");
    // By host name: mosquitto verifies the server certificate's SAN DNS:localhost.
    let topic = unique("byname");
    let mut sub = Sub::start(port, &pki.ca, Some(&dev), &topic, &["-h", "localhost"])
        .unwrap_or_else(|o| panic!("mosquitto_sub -h localhost not admitted:\n{o}"));
    publish_ok(port, &pki.ca, &dev, &topic, "by-name", &["-h", "localhost"]);
    sub.expect_message("by-name");
    b.wait_log(&["New client connected", "(p5,", "u'device-1'"]);
}

// ---------------------------------------------------------------- 2. refusals

/// Each bad client is refused at the handshake with the right reason in the log, and a good
/// client is still served afterwards.
#[test]
fn bad_client_certificates_are_refused_with_the_reason_logged() {
    need_tools();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::midge(&tmp.path().join("pki"));
    let good = pki.midge_client("device-1");
    let revoked = pki.midge_client("device-revoked");
    midge_certs(&pki.dir, "revoke", &["--cn", "device-revoked"]);
    // Expired yesterday, issued by the broker's own CA (library API of `midge certs`).
    let now = time::OffsetDateTime::now_utc();
    let issued = midge::tls::certs::CertsDir::new(&pki.dir)
        .issue_client(
            "device-expired",
            midge::tls::certs::Validity {
                not_before: now - time::Duration::days(30),
                not_after: now - time::Duration::days(1),
            },
            midge::tls::certs::KeyType::EcdsaP256,
            false,
        )
        .expect("issue expired certificate");
    let expired = Device {
        cert: issued.cert,
        key: issued.key,
    };
    // Another CA entirely (openssl recipe, its own name).
    let other = Pki::openssl(&tmp.path().join("other"));
    let stranger = other.openssl_client("device-1", "/CN=device-1", false);
    // Another `midge certs` CA: same default name "Midge CA", different key.
    let twin = Pki::midge(&tmp.path().join("twin"));
    let twin_dev = twin.midge_client("device-1");
    // A legacy (RSA-1024 key, SHA-1 signature) device signed by the broker's own CA.
    let legacy = pki.openssl_client("legacy", "/CN=legacy-1", true);

    let port = free_port();
    let b = start_with_conf(
        tmp.path(),
        "tls.conf",
        &format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\ncrlfile {}\n\
             require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n",
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.dir.join("crl.pem").display()
        ),
        2,
        port,
    );

    let expired_openssl = pki.openssl_expired_client("device-expired-2020");
    let cases: [(&str, Option<&Device>); 6] = [
        ("no_certificate", None),
        ("unknown_ca", Some(&stranger)),
        ("unknown_ca", Some(&twin_dev)),
        ("revoked", Some(&revoked)),
        ("expired", Some(&expired)),
        ("expired", Some(&expired_openssl)),
    ];
    for (reason, dev) in cases {
        let before = b.count_log(&[&format!("TLS handshake refused ({reason})")]);
        let id = unique("refused");
        let out = publish(port, &pki.ca, dev, "t/refused", "x", &["-i", &id]);
        assert!(
            !out.status.success(),
            "{reason}: mosquitto_pub succeeded but must be refused"
        );
        // The broker writes its line after it has closed the socket, so a fast client can
        // exit before it is there (a debug build is slow enough to show that): wait for this
        // refusal's own line, not for any line naming the reason (an earlier case's would
        // do). Each refusal of this test is within the limiter's burst (20 per shard), so
        // each is logged; how many lines a burst beyond that gets is not asserted.
        b.wait_count(&[&format!("TLS handshake refused ({reason})")], before + 1);
        assert_eq!(
            b.count_log(&["New client connected", &id]),
            0,
            "{reason}: no MQTT session may start"
        );
    }

    // mosquitto_pub (OpenSSL at its default security level) may refuse to load the legacy
    // key itself, so the legacy client is openssl s_client at SECLEVEL 0, TLS 1.2 (where the
    // server's verdict on the client certificate ends the handshake, so the client sees it).
    let (ok, out) = s_client(
        port,
        &pki.ca,
        Some(&legacy),
        &["-tls1_2", "-cipher", "DEFAULT@SECLEVEL=0"],
        &connect_disconnect("legacy-client"),
    );
    assert!(
        !ok && out.contains("alert"),
        "legacy client must fail with an alert from the broker:\n{out}"
    );
    let line = b.wait_log(&["TLS handshake refused (legacy_algorithm)"]);
    assert!(
        line.contains("midge certs"),
        "the refusal tells the operator how to fix it: {line}"
    );
    // And under TLS 1.3 too (the refusal then arrives after the client's Finished).
    let (_, _) = s_client(
        port,
        &pki.ca,
        Some(&legacy),
        &["-tls1_3", "-cipher", "DEFAULT@SECLEVEL=0"],
        &connect_disconnect("legacy-client-13"),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.count_log(&["TLS handshake refused (legacy_algorithm)"]) < 2 {
        assert!(
            Instant::now() < deadline,
            "TLS 1.3 legacy refusal not logged:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(b.count_log(&["New client connected", "legacy-client"]), 0);

    // The broker keeps serving a good client.
    roundtrip(port, &pki.ca, &good, "mqttv311");
    roundtrip(port, &pki.ca, &good, "mqttv5");
}

// ---------------------------------------------------------------- 3. identity as username

/// `use_identity_as_username`: the username is the certificate's CN, whatever `-u` the client
/// sends; with `allow_anonymous false` + `require_certificate true` exactly the clients with a
/// valid certificate get in.
#[test]
fn certificate_cn_is_the_username_and_only_valid_certificates_are_admitted() {
    need_tools();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::openssl(&tmp.path().join("pki"));
    let dev = pki.openssl_client("device-1", "/C=DE/O=Acme Devices/CN=device-1", false);
    let other = Pki::openssl(&tmp.path().join("other"));
    let stranger = other.openssl_client("device-2", "/CN=device-2", false);
    let port = free_port();
    let b = start_with_conf(
        tmp.path(),
        "tls.conf",
        &tls_conf(
            port,
            &pki,
            "use_identity_as_username true\nallow_anonymous false\n",
        ),
        2,
        port,
    );
    let id = unique("cn-user");
    publish_ok(
        port,
        &pki.ca,
        &dev,
        "t/cn",
        "x",
        &["-u", "someone", "-i", &id],
    );
    let line = b.wait_log(&["New client connected", &format!(" as {id} (")]);
    assert!(
        line.contains("u'device-1'"),
        "username must be the certificate CN, not the client's -u: {line}"
    );
    roundtrip(port, &pki.ca, &dev, "mqttv5");
    // Without a certificate, or with one from another CA: not admitted.
    for (what, d) in [("no certificate", None), ("another CA", Some(&stranger))] {
        let id = unique("anon");
        let out = publish(port, &pki.ca, d, "t/cn", "x", &["-u", "someone", "-i", &id]);
        assert!(!out.status.success(), "{what}: must not be admitted");
        assert_eq!(
            b.count_log(&["New client connected", &id]),
            0,
            "{what}: no session"
        );
    }
    b.wait_log(&["TLS handshake refused (no_certificate)"]);
    b.wait_log(&["TLS handshake refused (unknown_ca)"]);
}

/// `use_subject_as_username`: the username is the subject in mosquitto's RFC 2253 form.
#[test]
fn certificate_subject_is_the_username_in_rfc2253_form() {
    need_tools();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::openssl(&tmp.path().join("pki"));
    let dev = pki.openssl_client("device-1", "/C=DE/O=Acme Devices/CN=device-1", false);
    let port = free_port();
    let b = start_with_conf(
        tmp.path(),
        "tls.conf",
        &tls_conf(
            port,
            &pki,
            "use_subject_as_username true\nallow_anonymous false\n",
        ),
        1,
        port,
    );
    let id = unique("subject-user");
    publish_ok(
        port,
        &pki.ca,
        &dev,
        "t/subj",
        "x",
        &["-u", "someone", "-i", &id],
    );
    let line = b.wait_log(&["New client connected", &format!(" as {id} (")]);
    // What `openssl x509 -subject -nameopt RFC2253` prints, and mosquitto uses.
    let want = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in"])
            .arg(&dev.cert),
    );
    let want = String::from_utf8_lossy(&want.stdout)
        .trim()
        .trim_start_matches("subject=")
        .to_string();
    assert_eq!(want, "CN=device-1,O=Acme Devices,C=DE");
    assert!(
        line.contains(&format!("u'{want}'")),
        "username must be the RFC 2253 subject {want:?}: {line}"
    );
}

// ---------------------------------------------------------------- 4. resumption

/// First connection: full handshake, session saved with `-sess_out` once the broker sent it
/// (TLS 1.3 tickets arrive after the handshake, so stdin stays open until the file exists).
fn save_session(port: u16, ca: &Path, dev: &Device, version: &str, sess: &Path) -> String {
    let mut child = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(ca)
        .arg("-cert")
        .arg(&dev.cert)
        .arg("-key")
        .arg(&dev.key)
        .arg(version)
        .arg("-sess_out")
        .arg(sess)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl s_client");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(sess).map(|m| m.len()).unwrap_or(0) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // A moment more so every ticket the broker sends is read (the file holds the last).
    std::thread::sleep(Duration::from_millis(100));
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("s_client output");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        std::fs::metadata(sess).map(|m| m.len()).unwrap_or(0) > 0,
        "{version}: no session saved by the first connection:\n{text}"
    );
    assert!(
        text.contains("New, TLS"),
        "{version}: first handshake is full:\n{text}"
    );
    text
}

/// Resumes `n` connections from one saved session; each sends an MQTT CONNECT so the broker's
/// log says which shard served it. Returns the set of shards.
fn resume_many(
    b: &Broker,
    port: u16,
    ca: &Path,
    dev: &Device,
    version: &str,
    n: usize,
) -> Vec<usize> {
    let dir = tempfile::tempdir().unwrap();
    let sess = dir.path().join("session.pem");
    save_session(port, ca, dev, version, &sess);
    let sess_arg = sess.display().to_string();
    let mut shards = Vec::new();
    for i in 0..n {
        let id = unique(&format!("resume{}-{i}", version.trim_start_matches('-')));
        let (_, out) = s_client(
            port,
            ca,
            Some(dev),
            &[version, "-sess_in", &sess_arg],
            &connect_disconnect(&id),
        );
        assert!(
            out.contains("Reused, TLS"),
            "{version}: connection {i} was not resumed:\n{out}"
        );
        shards.push(shard_of(b, &id));
    }
    shards.sort_unstable();
    shards.dedup();
    shards
}

/// With 2 shards, a session established on one shard resumes on both (one ticket key / session
/// cache for the whole broker), at TLS 1.3 and TLS 1.2.
#[test]
fn sessions_resume_on_both_shards_at_tls13_and_tls12() {
    need_tools();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::midge(&tmp.path().join("pki"));
    let dev = pki.midge_client("device-1");
    let port = free_port();
    let b = start_with_conf(
        tmp.path(),
        "tls.conf",
        &tls_conf(port, &pki, "use_identity_as_username true\n"),
        2,
        port,
    );
    for version in ["-tls1_3", "-tls1_2"] {
        // 20 connections from random source ports: the REUSEPORT hash puts them on both
        // shards (all on one shard has probability 2^-19).
        let shards = resume_many(&b, port, &pki.ca, &dev, version, 20);
        assert_eq!(
            shards,
            vec![0, 1],
            "{version}: resumed connections must be served by both shards"
        );
    }
}

// ---------------------------------------------------------------- 5. hot reload

fn wait_count(b: &Broker, parts: &[&str], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.count_log(parts) < n {
        assert!(
            Instant::now() < deadline,
            "expected {n} log lines containing {parts:?}; log:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Replace the CA file and reload (SIGHUP, then `midge reload --pid`): new devices are judged
/// by the new CA while an established subscriber stays connected and keeps receiving; a broken
/// key is refused with a logged error and the previous material keeps serving.
#[test]
fn tls_material_reloads_without_dropping_connected_devices() {
    need_tools();
    let tmp = tempfile::tempdir().unwrap();
    let pki1 = Pki::midge_named(&tmp.path().join("ca1"), "Fleet CA 1");
    let pki2 = Pki::midge_named(&tmp.path().join("ca2"), "Fleet CA 2");
    let dev1 = pki1.midge_client("device-1");
    let dev2 = pki2.midge_client("device-2");
    // The files the broker reads; the server certificate stays CA 1's throughout, so every
    // client verifies the broker with ca1.crt.
    let live = tmp.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let (cafile, certfile, keyfile) = (
        live.join("cafile.pem"),
        live.join("server.crt"),
        live.join("server.key"),
    );
    std::fs::copy(&pki1.ca, &cafile).unwrap();
    std::fs::copy(&pki1.server_cert, &certfile).unwrap();
    std::fs::copy(&pki1.server_key, &keyfile).unwrap();
    let port = free_port();
    let b = start_with_conf(
        tmp.path(),
        "tls.conf",
        &format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\nuse_identity_as_username true\n",
            cafile.display(),
            certfile.display(),
            keyfile.display()
        ),
        2,
        port,
    );
    let ca = &pki1.ca;
    let topic = unique("fleet");
    let mut sub1 = Sub::start(port, ca, Some(&dev1), &topic, &["-q", "1"])
        .unwrap_or_else(|o| panic!("CA 1 subscriber not admitted:\n{o}"));
    assert!(
        !publish(port, ca, Some(&dev2), &topic, "early", &[])
            .status
            .success(),
        "a CA 2 device must be refused before the reload"
    );
    b.wait_log(&["TLS handshake refused (unknown_ca)"]);

    // Reload 1 (SIGHUP): the CA file now holds CA 2 only.
    std::fs::copy(&pki2.ca, &cafile).unwrap();
    b.sighup();
    wait_count(&b, &["TLS material reloaded"], 1);
    publish_ok(port, ca, &dev2, &topic, "after-reload-1", &[]);
    sub1.expect_message("after-reload-1");
    assert!(
        sub1.is_running(),
        "the CA 1 subscriber must survive the reload"
    );
    let refused = b.count_log(&["TLS handshake refused (unknown_ca)"]);
    assert!(
        !publish(port, ca, Some(&dev1), &topic, "x", &[])
            .status
            .success(),
        "a new CA 1 connection must be refused once cafile holds only CA 2"
    );
    wait_count(&b, &["TLS handshake refused (unknown_ca)"], refused + 1);

    // Reload 2 (`midge reload --pid`): a bundle of both CAs.
    std::fs::write(
        &cafile,
        [
            std::fs::read(&pki1.ca).unwrap(),
            std::fs::read(&pki2.ca).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let out = run_ok(
        Command::new(MIDGE)
            .args(["reload", "--pid"])
            .arg(b.pid().to_string()),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&b.pid().to_string()),
        "midge reload names the pid it signalled"
    );
    wait_count(&b, &["TLS material reloaded"], 2);
    publish_ok(port, ca, &dev1, &topic, "after-reload-2-ca1", &[]);
    sub1.expect_message("after-reload-2-ca1");
    publish_ok(port, ca, &dev2, &topic, "after-reload-2-ca2", &[]);
    sub1.expect_message("after-reload-2-ca2");

    // Reload 3: a truncated key is refused, and the bundle material keeps serving.
    let key = std::fs::read(&keyfile).unwrap();
    std::fs::write(&keyfile, &key[..key.len() / 2]).unwrap();
    b.sighup();
    let line = b.wait_log(&["TLS reload failed, keeping the previous material"]);
    assert!(
        line.contains("server.key"),
        "the reload error names the broken file: {line}"
    );
    assert_eq!(b.count_log(&["TLS material reloaded"],), 2);
    publish_ok(port, ca, &dev1, &topic, "after-failed-reload-ca1", &[]);
    sub1.expect_message("after-failed-reload-ca1");
    publish_ok(port, ca, &dev2, &topic, "after-failed-reload-ca2", &[]);
    sub1.expect_message("after-failed-reload-ca2");
    assert!(
        sub1.is_running(),
        "the CA 1 subscriber stayed connected through three reloads"
    );
    assert_eq!(
        sub1.seen
            .iter()
            .filter(|l| l.contains("sending CONNECT"))
            .count(),
        1,
        "the subscriber never reconnected (mosquitto_sub would reconnect after a drop):\n{}",
        sub1.seen.join("\n")
    );
}

// ---------------------------------------------------------------- 6. configuration checks

#[test]
fn check_config_shows_tls_keys_and_mismatched_key_fails_in_plain_words() {
    need_tools();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::midge(&tmp.path().join("pki"));
    let other = Pki::midge(&tmp.path().join("other"));
    let port = free_port();
    let good = tmp.path().join("good.conf");
    std::fs::write(
        &good,
        tls_conf(port, &pki, "use_identity_as_username true\n"),
    )
    .unwrap();
    let out = run_ok(
        Command::new(MIDGE)
            .arg("-c")
            .arg(&good)
            .arg("--check-config"),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        format!("listener {port} 127.0.0.1"),
        format!("cafile {}", pki.ca.display()),
        format!("certfile {}", pki.server_cert.display()),
        format!("keyfile {}", pki.server_key.display()),
        "require_certificate true".to_string(),
        "use_identity_as_username true".to_string(),
        "tls_version tlsv1.2".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l.trim() == want),
            "--check-config output lacks {want:?}:\n{text}"
        );
    }

    // The server key of another CA: does not match certfile.
    let bad = tmp.path().join("bad.conf");
    std::fs::write(
        &bad,
        format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
            pki.ca.display(),
            pki.server_cert.display(),
            other.server_key.display()
        ),
    )
    .unwrap();
    let check = run(Command::new(MIDGE)
        .arg("-c")
        .arg(&bad)
        .arg("--check-config"));
    let start = run(Command::new("timeout")
        .args(["10", MIDGE, "-c"])
        .arg(&bad)
        .env("NO_COLOR", "1"));
    for (what, out) in [("--check-config", &check), ("start", &start)] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what} with a mismatched key must fail with exit 1: {err}"
        );
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{what}: one error line, got:\n{err}");
        assert!(
            lines[0].contains(&other.server_key.display().to_string())
                && lines[0].contains("does not match"),
            "{what}: the error names the key file and says it does not match: {}",
            lines[0]
        );
    }
}

// ---------------------------------------------------------------- 6. CRL expiry

/// A CRL past its nextUpdate refuses every client, as OpenSSL (mosquitto) does, with one
/// plain-words line naming the file and its nextUpdate; and a TLS session resumed from a
/// ticket issued while the CRL was valid does not get around it (rustls does not verify a
/// resumed session's certificate again; Midge does).
#[test]
fn an_expired_crl_refuses_every_client_also_through_resumed_sessions() {
    need_tools();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::midge(&tmp.path().join("pki"));
    let dev = pki.midge_client("device-1");
    let next_update = time::OffsetDateTime::now_utc() + time::Duration::seconds(4);
    let crl = midge::tls::certs::CertsDir::new(&pki.dir)
        .write_crl_until(next_update)
        .expect("write a CRL valid for 4 s");
    let port = free_port();
    let b = start_with_conf(
        tmp.path(),
        "tls.conf",
        &tls_conf(
            port,
            &pki,
            &format!(
                "crlfile {}\nuse_identity_as_username true\nallow_anonymous false\n",
                crl.display()
            ),
        ),
        1,
        port,
    );
    // While the CRL is valid: served, and a session ticket saved.
    let dir = tempfile::tempdir().unwrap();
    let sess = dir.path().join("session.pem");
    save_session(port, &pki.ca, &dev, "-tls1_3", &sess);
    let before_id = unique("crl-valid");
    let (_, out) = s_client(
        port,
        &pki.ca,
        Some(&dev),
        &["-tls1_3", "-sess_in", &sess.display().to_string()],
        &connect_disconnect(&before_id),
    );
    assert!(out.contains("Reused, TLS"), "resumed while valid:\n{out}");
    b.wait_log(&["New client connected", &before_id]);

    // The CRL's nextUpdate passes (the scenario's clock: wait for it, bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    while time::OffsetDateTime::now_utc() < next_update + time::Duration::seconds(1) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }

    // A resumed session is refused now.
    let resumed_id = unique("crl-resumed");
    let (_, out) = s_client(
        port,
        &pki.ca,
        Some(&dev),
        &["-tls1_3", "-sess_in", &sess.display().to_string()],
        &connect_disconnect(&resumed_id),
    );
    let line = b.wait_log(&["TLS handshake refused (crl_expired)", "resumed session"]);
    assert!(
        line.contains(&crl.display().to_string()) && line.contains("nextUpdate"),
        "the line names the CRL file and its nextUpdate: {line}"
    );
    // And so is a full handshake, with the same reason.
    let full_id = unique("crl-full");
    let out2 = publish(port, &pki.ca, Some(&dev), "t/crl", "x", &["-i", &full_id]);
    assert!(
        !out2.status.success(),
        "mosquitto_pub admitted with an expired CRL"
    );
    wait_count(&b, &["TLS handshake refused (crl_expired)"], 2);
    for id in [&resumed_id, &full_id] {
        assert_eq!(
            b.count_log(&["New client connected", id]),
            0,
            "{id} was admitted with an expired CRL:\n{out}"
        );
    }
}

/// The fleet set-up of issue 12: client certificates, `use_identity_as_username`, one ACL
/// pattern `readwrite devices/%u/#`. Device A reads and writes its own tree only, reads no
/// `$SYS` without a `$SYS` rule, and cannot leave a will on B's tree; on a second listener
/// `require_client_id_match_identity` binds the client id to the certificate.
/// "Not received" is shown with a marker A may read, sent after the denied message by the
/// same publisher (per-publisher order), never by waiting.
#[test]
fn fleet_acl_with_certificate_identities() {
    need_tools();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::midge(&tmp.path().join("pki"));
    let a = pki.midge_client("dev-a");
    let b_dev = pki.midge_client("dev-b");
    let admin = pki.midge_client("ops");
    let acl = tmp.path().join("acl");
    std::fs::write(
        &acl,
        "user ops\ntopic readwrite #\ntopic read $SYS/#\n\npattern readwrite devices/%u/#\n",
    )
    .unwrap();
    let port = free_port();
    let bound = free_port();
    let conf = format!(
        "acl_file {acl}\n{}\nlistener {bound} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
         require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n\
         require_client_id_match_identity true\n",
        tls_conf(
            port,
            &pki,
            "use_identity_as_username true\nallow_anonymous false\nsys_interval 1\n"
        ),
        pki.ca.display(),
        pki.server_cert.display(),
        pki.server_key.display(),
        acl = acl.display(),
    );
    let path = tmp.path().join("fleet.conf");
    std::fs::write(&path, conf).unwrap();
    let b = Broker::start(
        &[
            "-c".into(),
            path.display().to_string(),
            "--shards".into(),
            "2".into(),
        ],
        &[port, bound],
    );

    // A subscribes to everything (granted, as mosquitto 2.0): it gets its own tree only.
    let mut sub_a = Sub::start(port, &pki.ca, Some(&a), "#", &["-V", "mqttv5", "-v"])
        .unwrap_or_else(|o| panic!("A not admitted: {o}"));
    let mut sub_ops = Sub::start(port, &pki.ca, Some(&admin), "devices/#", &["-v"])
        .unwrap_or_else(|o| panic!("ops not admitted: {o}"));
    publish_ok(
        port,
        &pki.ca,
        &b_dev,
        "devices/dev-b/telemetry",
        "b-secret",
        &[],
    );
    publish_ok(port, &pki.ca, &a, "devices/dev-a/telemetry", "a-own", &[]);
    sub_a.expect_message("devices/dev-a/telemetry a-own");
    // A writes into B's tree: refused (v5 0x87; mosquitto_pub reports it), never delivered.
    let out = publish(
        port,
        &pki.ca,
        Some(&a),
        "devices/dev-b/cmd",
        "a-forged",
        &["-V", "mqttv5"],
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("authorized"),
        "mosquitto_pub -V 5 must see 0x87: {said}"
    );
    publish_ok(port, &pki.ca, &a, "devices/dev-a/marker", "a-marker", &[]);
    sub_ops.expect_message("devices/dev-b/telemetry b-secret");
    sub_ops.expect_message("devices/dev-a/marker a-marker");
    publish_ok(
        port,
        &pki.ca,
        &admin,
        "devices/dev-a/marker2",
        "ops-marker",
        &[],
    );
    sub_a.expect_message("devices/dev-a/marker2 ops-marker");
    // $SYS: A's subscription is granted, but A has no `$SYS` rule and gets nothing, while
    // ops (with one) sees two rounds (published every second, to both in the same fan-out).
    let mut a_sys = Sub::start(port, &pki.ca, Some(&a), "$SYS/broker/uptime", &["-v"])
        .unwrap_or_else(|o| panic!("A not admitted: {o}"));
    let mut ops_sys = Sub::start(port, &pki.ca, Some(&admin), "$SYS/broker/uptime", &["-v"])
        .unwrap_or_else(|o| panic!("ops not admitted: {o}"));
    for _ in 0..2 {
        assert!(
            ops_sys.wait_line(
                |l| l.starts_with("$SYS/broker/uptime "),
                Duration::from_secs(5)
            ),
            "ops got no $SYS round: {:?}",
            ops_sys.seen
        );
    }
    while let Ok(l) = a_sys.lines.try_recv() {
        a_sys.seen.push(l);
    }
    assert!(
        !a_sys.seen.iter().any(|l| l.starts_with("$SYS/")),
        "A must not read $SYS: {:?}",
        a_sys.seen
    );
    for l in &sub_a.seen {
        assert!(!l.contains("b-secret") && !l.contains("a-forged"), "{l}");
        assert!(!l.starts_with("$SYS"), "A must not read $SYS: {l}");
    }
    for l in &sub_ops.seen {
        assert!(!l.contains("a-forged"), "{l}");
    }

    // A will on B's tree: refused at CONNECT (3.1.1 return code 5), so never published.
    let out = publish(
        port,
        &pki.ca,
        Some(&a),
        "devices/dev-a/x",
        "x",
        &[
            "--will-topic",
            "devices/dev-b/cmd",
            "--will-payload",
            "a-will",
        ],
    );
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    b.wait_log(&["refused: will topic 'devices/dev-b/cmd'"]);

    // require_client_id_match_identity: the id must be the CN (3.1.1: 2, v5: 0x85 = 133).
    let out = publish(
        bound,
        &pki.ca,
        Some(&a),
        "devices/dev-a/x",
        "x",
        &["-i", "dev-a"],
    );
    assert!(out.status.success(), "{out:?}");
    let out = publish(
        bound,
        &pki.ca,
        Some(&a),
        "devices/dev-b/x",
        "x",
        &["-i", "dev-b"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = publish(
        bound,
        &pki.ca,
        Some(&a),
        "devices/dev-b/x",
        "x",
        &["-i", "dev-b", "-V", "mqttv5"],
    );
    assert_eq!(out.status.code(), Some(133), "{out:?}");
    assert!(sub_a.is_running());
}

/// `GET path` on the metrics listener; (status, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (code, body.unwrap_or_default())
}

/// The value of the one sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
fn tls_metrics_count_handshakes_and_show_material_dates_refreshed_on_reload() {
    need_tools();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::midge(&tmp.path().join("pki"));
    let dev = pki.midge_client("metrics-dev");
    let day = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let crl = midge::tls::certs::CertsDir::new(&pki.dir)
        .write_crl_until(day)
        .expect("write a CRL");
    let (port, mport) = (free_port(), free_port());
    let b = start_with_conf(
        tmp.path(),
        "tls.conf",
        &tls_conf(
            port,
            &pki,
            &format!(
                "crlfile {}\nuse_identity_as_username true\nmetrics_listener {mport}\n",
                crl.display()
            ),
        ),
        1,
        port,
    );
    let label = format!("{{listener=\"127.0.0.1:{port}\"");
    let (code, t) = http_get(mport, "/metrics");
    assert_eq!(code, 200, "{t}");
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    let crl_gauge = format!("midge_tls_crl_next_update_timestamp_seconds{label}}}");
    assert_eq!(
        sample(&t, &crl_gauge),
        Some(day.unix_timestamp() as f64),
        "{t}"
    );
    let cert = sample(
        &t,
        &format!("midge_tls_server_cert_not_after_timestamp_seconds{label}}}"),
    )
    .unwrap();
    assert!(cert > now + 86_400.0, "{cert}");
    let ca = sample(
        &t,
        &format!("midge_tls_ca_not_after_earliest_timestamp_seconds{label}}}"),
    )
    .unwrap();
    assert!(ca > now + 86_400.0, "{ca}");

    publish_ok(port, &pki.ca, &dev, "m/t", "x", &[]);
    // No client certificate on a listener that requires one: a failed handshake.
    let out = publish(port, &pki.ca, None, "m/t", "x", &[]);
    assert!(!out.status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let t = loop {
        let (_, t) = http_get(mport, "/metrics");
        let full = sample(
            &t,
            &format!("midge_tls_handshakes_total{label},kind=\"full\"}}"),
        );
        let failed: f64 = t
            .lines()
            .filter(|l| l.starts_with(&format!("midge_tls_handshake_failures_total{label}")))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum();
        if full == Some(1.0) && failed >= 1.0 {
            break t;
        }
        assert!(Instant::now() < deadline, "handshakes not counted:\n{t}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        sample(
            &t,
            &format!("midge_tls_handshake_duration_seconds_count{label},kind=\"full\"}}")
        ),
        Some(1.0),
        "{t}"
    );

    // A new CRL with a later nextUpdate: the gauge follows the reload.
    let week = time::OffsetDateTime::now_utc() + time::Duration::days(7);
    midge::tls::certs::CertsDir::new(&pki.dir)
        .write_crl_until(week)
        .expect("write a CRL");
    b.sighup();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, t) = http_get(mport, "/metrics");
        if sample(&t, &crl_gauge) == Some(week.unix_timestamp() as f64) {
            assert_eq!(
                sample(&t, &format!("midge_tls_reloads_total{label}}}")),
                Some(1.0)
            );
            break;
        }
        assert!(Instant::now() < deadline, "CRL gauge not refreshed:\n{t}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
