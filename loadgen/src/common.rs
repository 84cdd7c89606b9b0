//! Shared plumbing of every scenario: command-line options common to all, the run clock,
//! safety checks (loopback only unless allowed, caps), and one pinned glommio executor per
//! `--cores` entry.
//!
//! Owns: `CommonArgs`, `Clock`, `spawn_cores`, duration parsing. Must not touch: MQTT or
//! scenario logic.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use midge::codec::ProtocolVersion;
use serde::{Deserialize, Serialize};

use crate::net::Target;
use crate::tls::{IdentitySource, TlsOptions, TlsSetup};

/// Hard caps: every run is bounded whatever the flags say.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
pub const MAX_CONNECTIONS: u64 = 1_000_000;
pub const MAX_MESSAGES: u64 = 1_000_000_000;

/// Parse "250ms", "5s", "2m", "1.5s" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix("us") {
        (v, 1e-6)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 500ms, 10s, 2m)"))?;
    if !(0.0..=1e7).contains(&v) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

fn parse_cores(s: &str) -> Result<Vec<usize>, String> {
    let mut v = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if let Some((a, b)) = part.split_once('-') {
            let a: usize = a.parse().map_err(|_| format!("bad core list {s:?}"))?;
            let b: usize = b.parse().map_err(|_| format!("bad core list {s:?}"))?;
            v.extend(a..=b);
        } else {
            v.push(part.parse().map_err(|_| format!("bad core list {s:?}"))?);
        }
    }
    if v.is_empty() {
        return Err("empty --cores".into());
    }
    Ok(v)
}

/// The CPUs this process may use (honours taskset), read once before any thread is pinned:
/// pinning the orchestrating thread would otherwise shrink what later runs (compare rounds,
/// fleet workers) see. A Mutex, not a OnceLock: a fleet worker process replaces the value
/// (clap computes `--cores` defaults, and so this, while parsing any subcommand).
static ALLOWED_CPUS: std::sync::Mutex<Option<Vec<usize>>> = std::sync::Mutex::new(None);

pub fn allowed_cpus() -> Vec<usize> {
    let mut g = ALLOWED_CPUS.lock().unwrap_or_else(|e| e.into_inner());
    g.get_or_insert_with(|| {
        core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect()
    })
    .clone()
}

/// A fleet worker process: widen this thread's CPU mask back to the coordinator's (it
/// inherited the mask of the pinned thread that spawned it) and remember it.
pub fn set_allowed_cpus(cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    // SAFETY: zeroed cpu_set_t is the empty set; CPU_SET on indices below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus.iter().filter(|c| **c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    *ALLOWED_CPUS.lock().unwrap_or_else(|e| e.into_inner()) = Some(cpus.to_vec());
}

fn default_cores() -> String {
    // With several CPUs, take the last one: on a 2-core machine the broker gets CPU 0 and
    // the loadgen CPU 1.
    allowed_cpus().last().map_or("0".into(), |c| c.to_string())
}

/// How a connection hands MQTT packets to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WriteMode {
    /// Exactly one write syscall per MQTT packet (one TLS record per packet with TLS), as
    /// device libraries do (rumqttc, paho, mosquitto_pub, MQTT.js never coalesce packets of
    /// different messages into one write).
    #[default]
    PerPacket,
    /// Everything due at once (catch-up publishes, the acknowledgements of one read) in one
    /// write of up to 64 KiB: cheaper for the loadgen and the broker, not how devices send.
    Coalesced,
}

impl WriteMode {
    pub fn label(self) -> &'static str {
        match self {
            WriteMode::PerPacket => "per-packet writes",
            WriteMode::Coalesced => "coalesced writes",
        }
    }
    pub fn per_packet(self) -> bool {
        self == WriteMode::PerPacket
    }
}

/// Options every scenario takes.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct CommonArgs {
    /// Broker host. Non-loopback addresses are refused unless --allow-remote.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port (default 1883, or 8883 with TLS).
    #[arg(long)]
    pub port: Option<u16>,
    /// Allow a non-loopback broker address.
    #[arg(long)]
    pub allow_remote: bool,
    /// CPUs to run on, one pinned executor each: "1", "1,2", "0-3" (default: the last CPU
    /// this process may use).
    #[arg(long, default_value_t = default_cores())]
    pub cores: String,
    /// MQTT version: 3.1.1 or 5.
    #[arg(long = "mqtt", default_value = "3.1.1")]
    pub mqtt: String,
    /// Connect / TLS handshake / CONNACK timeout.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Keep-alive seconds sent in CONNECT (0 disables). Default 0, where the loadgen sends
    /// no PINGREQ; `fleet` defaults to 30 and its devices send PINGREQ when idle that long.
    #[arg(long)]
    pub keepalive: Option<u16>,
    /// Client id prefix; ids are PREFIX-p<N> / PREFIX-s<N> / PREFIX-c<N>.
    #[arg(long, default_value = "lg")]
    pub client_prefix: String,
    /// CA certificate (PEM) that signed the broker's certificate; enables TLS.
    #[arg(long)]
    pub cafile: Option<PathBuf>,
    /// Client certificate (PEM) shared by all devices.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) for --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Directory of NAME.crt/NAME.key pairs, one identity per device (round robin).
    #[arg(long)]
    pub cert_dir: Option<PathBuf>,
    /// Mint a certificate per device (CN = client id) signed by this CA certificate...
    #[arg(long, requires = "mint_ca_key")]
    pub mint_ca_cert: Option<PathBuf>,
    /// ...and this CA key.
    #[arg(long, requires = "mint_ca_cert")]
    pub mint_ca_key: Option<PathBuf>,
    /// TLS server name to verify (default: --host).
    #[arg(long)]
    pub servername: Option<String>,
    /// Key exchange: default, x25519, p256, mlkem.
    #[arg(long, default_value = "default")]
    pub kx: String,
    /// Resume TLS sessions (one session store shared by all devices).
    #[arg(long)]
    pub tls_resume: bool,
    /// No live progress line.
    #[arg(long, short)]
    pub quiet: bool,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write .hgrm percentile distributions into this directory.
    #[arg(long)]
    pub hgrm: Option<PathBuf>,
    /// Write SVG charts into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// Validated form of `CommonArgs`.
pub struct Common {
    pub target: Target,
    pub cores: Vec<usize>,
    pub tls: Option<Arc<TlsSetup>>,
    pub args: CommonArgs,
}

impl CommonArgs {
    pub fn validate(&self, max_sessions: usize) -> Result<Common, String> {
        let version = match self.mqtt.as_str() {
            "3.1.1" | "311" | "4" => ProtocolVersion::V311,
            "5" | "5.0" => ProtocolVersion::V5,
            "3.1" | "31" | "3" => ProtocolVersion::V31,
            o => return Err(format!("--mqtt {o}: expected 3.1.1 or 5")),
        };
        let tls_on = self.cafile.is_some();
        if !tls_on
            && (self.cert.is_some() || self.cert_dir.is_some() || self.mint_ca_cert.is_some())
        {
            return Err("client certificates need --cafile (TLS)".into());
        }
        let port = self.port.unwrap_or(if tls_on { 8883 } else { 1883 });
        let addr: SocketAddr = (self.host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("--host {}: {e}", self.host))?
            .next()
            .ok_or_else(|| format!("--host {}: no address", self.host))?;
        if !addr.ip().is_loopback() && !self.allow_remote {
            return Err(format!(
                "refusing non-loopback broker {addr}: pass --allow-remote if you mean it"
            ));
        }
        let cores = parse_cores(&self.cores)?;
        let avail = allowed_cpus();
        for c in &cores {
            if !avail.is_empty() && !avail.contains(c) {
                return Err(format!(
                    "--cores: CPU {c} is not available (have {avail:?})"
                ));
            }
        }
        let tls = if let Some(cafile) = &self.cafile {
            let identity = if let (Some(c), Some(k)) = (&self.cert, &self.key) {
                IdentitySource::Shared {
                    cert: c.clone(),
                    key: k.clone(),
                }
            } else if let Some(d) = &self.cert_dir {
                IdentitySource::Dir(d.clone())
            } else if let (Some(c), Some(k)) = (&self.mint_ca_cert, &self.mint_ca_key) {
                IdentitySource::Mint {
                    ca_cert: c.clone(),
                    ca_key: k.clone(),
                }
            } else {
                IdentitySource::None
            };
            let o = TlsOptions {
                cafile: cafile.clone(),
                identity,
                resume: self.tls_resume,
                kx: self.kx.clone(),
                server_name: self.servername.clone().unwrap_or_else(|| self.host.clone()),
            };
            Some(Arc::new(TlsSetup::new(&o, max_sessions)?))
        } else {
            None
        };
        // The orchestrating thread mostly sleeps, but pin it too so it never runs on the
        // broker's CPU.
        let _ = core_affinity::set_for_current(core_affinity::CoreId { id: cores[0] });
        if self.connect_timeout.is_zero() {
            return Err("--connect-timeout must be > 0".into());
        }
        Ok(Common {
            target: Target {
                addr,
                version,
                timeout: self.connect_timeout,
                keep_alive: self.keepalive.unwrap_or(0),
                server_name: tls.as_ref().map(|t| t.server_name.clone()),
            },
            cores,
            tls,
            args: self.clone(),
        })
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one time line for every process on the machine (what
/// `Instant` reads on Linux), so a worker process's intended send times compare with another
/// process's receive times.
pub fn monotonic_ns() -> u64 {
    // SAFETY: zeroed timespec is valid; clock_gettime writes into it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer, CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The run's clock: nanoseconds since a base instant of CLOCK_MONOTONIC shared by all cores
/// (and by the worker processes of a `fleet --procs` run), so intended send times written by
/// one core are comparable with receive times on another.
#[derive(Clone, Copy)]
pub struct Clock {
    base_ns: u64,
}

impl Clock {
    pub fn new() -> Self {
        // Never 0 ns, so "time 0" can mean "not set" in the atomics that carry times.
        Clock {
            base_ns: monotonic_ns().saturating_sub(1_000_000),
        }
    }
    /// A clock sharing another process's base (its `base_ns()`).
    pub fn with_base(base_ns: u64) -> Self {
        Clock { base_ns }
    }
    pub fn base_ns(&self) -> u64 {
        self.base_ns
    }
    #[inline]
    pub fn now_ns(&self) -> u64 {
        monotonic_ns().saturating_sub(self.base_ns)
    }
    /// Sleep until the clock reads `t_ns` (returns at once if already past).
    pub async fn sleep_until(&self, t_ns: u64) {
        let now = self.now_ns();
        if t_ns > now {
            glommio::timer::sleep(Duration::from_nanos(t_ns - now)).await;
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Run `f(core_index)` on one glommio executor per CPU in `cores`, each pinned to its CPU,
/// and return their results in core order.
pub fn spawn_cores<T, F, Fut>(cores: &[usize], f: F) -> Result<Vec<T>, String>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Clone + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    let mut handles = Vec::new();
    for (i, &cpu) in cores.iter().enumerate() {
        let f = f.clone();
        let h = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu))
            .name(&format!("loadgen-{cpu}"))
            // glommio's 10 MiB default cannot be locked under the usual 8 MiB memlock limit.
            .io_memory(256 << 10)
            .spawn(move || f(i))
            .map_err(|e| {
                format!("cannot start executor on CPU {cpu}: {e} (memlock limit: `ulimit -l` must be ≥ 512 KiB)")
            })?;
        handles.push(h);
    }
    let mut out = Vec::new();
    for h in handles {
        out.push(h.join().map_err(|e| format!("executor failed: {e}"))?);
    }
    Ok(out)
}

/// CPU time of the calling thread (user + system).
pub fn thread_cpu() -> Duration {
    // SAFETY: zeroed rusage is valid; RUSAGE_THREAD is valid on Linux.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn a_worker_process_replaces_the_inherited_cpu_list() {
        // clap computes the defaults (and so the list) before a worker knows the
        // coordinator's CPUs: setting them must win over the value already computed.
        let before = allowed_cpus();
        assert!(!before.is_empty());
        set_allowed_cpus(&before[..1]);
        assert_eq!(allowed_cpus(), before[..1].to_vec());
        set_allowed_cpus(&before);
        assert_eq!(allowed_cpus(), before);
    }

    #[test]
    fn cores() {
        assert_eq!(parse_cores("1,2").unwrap(), vec![1, 2]);
        assert_eq!(parse_cores("0-2").unwrap(), vec![0, 1, 2]);
        assert!(parse_cores("x").is_err());
    }
}
