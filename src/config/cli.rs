//! The `midge` command line (clap derive) and `midge reload`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use super::file::{Builder, RawListener};
use super::{defaults, ConfigError, Origin};

/// Midge: a thread-per-core MQTT broker for device fleets with mutual TLS.
///
/// Reads a mosquitto.conf-compatible file (`-c`); options given here override it. With no
/// arguments Midge listens on 127.0.0.1:1883 and allows anonymous clients there only.
#[derive(Parser, Debug, Clone, Default)]
#[command(name = "midge", version, about, long_about = None)]
pub struct Cli {
    /// mosquitto.conf-style configuration file.
    #[arg(
        short = 'c',
        long = "config",
        visible_alias = "config-file",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// Port of the default listener (like mosquitto's -p). Without a listener in the file it
    /// binds 127.0.0.1 unless --bind says otherwise.
    #[arg(short = 'p', long = "port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,

    /// Address of the default listener (like the file's bind_address).
    #[arg(long = "bind", value_name = "ADDRESS")]
    pub bind: Option<IpAddr>,

    /// Number of shards (one per core); default: all available CPUs.
    #[arg(long = "shards", value_name = "N")]
    pub shards: Option<usize>,

    /// Validate the configuration, print it with defaults filled in, and exit (0 if valid).
    #[arg(long = "check-config")]
    pub check_config: bool,

    /// Log everything (log_type all).
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,

    /// Add a TLS listener at ADDR:PORT (needs --certfile and --keyfile).
    #[arg(long = "tls-listen", value_name = "ADDR:PORT", requires_all = ["certfile", "keyfile"])]
    pub tls_listen: Option<SocketAddr>,

    /// CA certificates (PEM) trusted for client certificates on the --tls-listen listener.
    #[arg(long = "cafile", value_name = "FILE", requires = "tls_listen")]
    pub cafile: Option<PathBuf>,

    /// Server certificate chain (PEM) for the --tls-listen listener.
    #[arg(long = "certfile", value_name = "FILE", requires = "tls_listen")]
    pub certfile: Option<PathBuf>,

    /// Server private key (PEM) for the --tls-listen listener.
    #[arg(long = "keyfile", value_name = "FILE", requires = "tls_listen")]
    pub keyfile: Option<PathBuf>,

    /// Certificate revocation list (PEM) checked against client certificates.
    #[arg(long = "crlfile", value_name = "FILE", requires = "tls_listen")]
    pub crlfile: Option<PathBuf>,

    /// Clients of the --tls-listen listener must present a certificate signed by --cafile.
    #[arg(long = "require-certificate", requires = "tls_listen")]
    pub require_certificate: bool,

    /// Use the client certificate's Common Name as the MQTT username.
    #[arg(long = "use-identity-as-username", requires = "tls_listen")]
    pub use_identity_as_username: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands. Without one, `midge` runs the broker.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Ask a running broker to reload (sends SIGHUP, as `systemctl reload` does).
    Reload(ReloadArgs),
    /// Make and manage certificates: CA, server, device clients, revocation (CRL).
    #[command(subcommand)]
    Certs(crate::tls::certs::CertsCommand),
    /// Manage a password file, as mosquitto_passwd does (same flags, same $7$ format).
    Passwd(crate::auth::passwd_cmd::PasswdArgs),
}

/// `midge reload`: which process to signal.
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct ReloadArgs {
    /// Process id of the broker.
    #[arg(long = "pid", value_name = "PID", conflicts_with = "pid_file")]
    pub pid: Option<u32>,
    /// File holding the broker's process id (the config's pid_file).
    #[arg(long = "pid-file", value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Configuration file whose pid_file names the broker.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Signal the process even if it is not named `midge` (e.g. renamed binary).
    #[arg(long = "force")]
    pub force: bool,
}

impl Cli {
    /// Apply the command-line overrides on top of what the file set.
    pub(crate) fn apply(&self, b: &mut Builder) -> Result<(), ConfigError> {
        if let Some(n) = self.shards {
            if n == 0 || n > defaults::MAX_SHARDS {
                return Err(ConfigError::key(
                    &Origin::Cli("--shards"),
                    "--shards",
                    format!("expected a number 1-{}, got '{n}'", defaults::MAX_SHARDS),
                ));
            }
            b.shards = Some((n, Origin::Cli("--shards")));
        }
        if self.verbose {
            b.verbose = true;
        }
        if self.port.is_some() || self.bind.is_some() {
            let flag = if self.port.is_some() { "-p" } else { "--bind" };
            if !b.default_from_cli {
                b.default_listener.origin = Origin::Cli(flag);
            }
            b.default_from_cli = true;
            if let Some(p) = self.port {
                b.default_listener.port = Some(p);
            }
            if let Some(ip) = self.bind {
                b.default_listener.host = Some(ip);
            }
        }
        if let Some(addr) = self.tls_listen {
            let o = |flag: &'static str| Origin::Cli(flag);
            let mut l = RawListener::new(Some(addr.port()), Some(addr.ip()), o("--tls-listen"));
            let t = &mut l.tls;
            t.certfile = self.certfile.clone().map(|p| (p, o("--certfile")));
            t.keyfile = self.keyfile.clone().map(|p| (p, o("--keyfile")));
            t.cafile = self.cafile.clone().map(|p| (p, o("--cafile")));
            t.crlfile = self.crlfile.clone().map(|p| (p, o("--crlfile")));
            if self.require_certificate {
                t.require_certificate = Some((true, o("--require-certificate")));
            }
            if self.use_identity_as_username {
                t.use_identity_as_username = Some((true, o("--use-identity-as-username")));
            }
            b.cli_listeners.push(l);
        }
        Ok(())
    }
}

/// `midge reload`: send SIGHUP to the running broker. Returns the pid signalled.
pub fn run_reload(args: &ReloadArgs) -> Result<u32, ConfigError> {
    let pid = match (args.pid, &args.pid_file, &args.config) {
        (Some(pid), _, _) => pid,
        (None, Some(file), _) => read_pid_file(file)?,
        (None, None, Some(config)) => {
            let cli = Cli {
                config: Some(config.clone()),
                ..Cli::default()
            };
            let cfg = super::load(&cli)?;
            let file = cfg.pid_file.ok_or_else(|| {
                ConfigError::Reload(format!(
                    "{} has no pid_file; pass --pid or --pid-file",
                    config.display()
                ))
            })?;
            read_pid_file(&file)?
        }
        (None, None, None) => {
            return Err(ConfigError::Reload(
                "which broker? pass --pid PID, --pid-file FILE or -c CONFIG (with pid_file)".into(),
            ))
        }
    };
    // kill(0 or -1, ...) would signal whole process groups; pid 1 is init.
    if pid <= 1 || pid > i32::MAX as u32 {
        return Err(ConfigError::Reload(format!("refusing to signal pid {pid}")));
    }
    if !args.force {
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            let comm = comm.trim();
            if comm != "midge" {
                return Err(ConfigError::Reload(format!(
                    "process {pid} is '{comm}', not midge (stale pid file?); use --force to signal it anyway"
                )));
            }
        }
    }
    // SAFETY: kill has no memory-safety preconditions; pid is a positive single process id.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        let why = match err.raw_os_error() {
            Some(libc::ESRCH) => format!("no process with pid {pid} (stale pid file?)"),
            Some(libc::EPERM) => {
                format!("not permitted to signal pid {pid}; run as the broker's user")
            }
            _ => format!("cannot signal pid {pid}: {err}"),
        };
        return Err(ConfigError::Reload(why));
    }
    Ok(pid)
}

fn read_pid_file(path: &Path) -> Result<u32, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        what: "pid file",
        source,
    })?;
    text.trim().parse::<u32>().map_err(|_| {
        ConfigError::Reload(format!(
            "{}: expected a process id, got '{}'",
            path.display(),
            text.trim()
        ))
    })
}
