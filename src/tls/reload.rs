//! Hot reload of a listener's TLS material (renewed server certificate, new CA, fresh CRL)
//! without dropping connections: new handshakes use the new config, established sessions
//! keep the config they were made with.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::ServerConfig;

use super::error::TlsError;
use super::options::TlsOptions;
use super::server::{build_server_config_with_warnings, MaterialDates};

/// Holds the current `Arc<ServerConfig>` of one listener for all shards.
///
/// Shards call [`current`](Self::current) at each accept (a lock-free `ArcSwap` load) and
/// pass it to [`accept`](super::accept); a reload thread calls
/// [`reload`](Self::reload) on SIGHUP. A reload builds a fresh config with a fresh session
/// ticketer: resumption tickets issued before it stop working, on purpose, because a resumed
/// session skips client-certificate verification and would let a client revoked by the new
/// CRL (or of a removed CA) back in.
pub struct TlsReloader {
    options: Mutex<TlsOptions>,
    current: ArcSwap<ServerConfig>,
    /// The client verifier inside `current` (rustls does not expose it), for resumed
    /// sessions.
    verifier: ArcSwap<Verifier>,
    generation: AtomicU64,
    /// The dates of the material in `current` (for the expiry metrics).
    dates: ArcSwap<MaterialDates>,
}

struct Verifier(Arc<dyn rustls::server::danger::ClientCertVerifier>);

impl std::fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReloader")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl TlsReloader {
    /// Builds the first config; fails (so the broker does not start) if the material is bad.
    pub fn new(options: TlsOptions) -> Result<Self, TlsError> {
        let built = build_server_config_with_warnings(&options)?;
        for w in &built.warnings {
            tracing::warn!("{w}");
        }
        Ok(Self {
            options: Mutex::new(options),
            current: ArcSwap::new(built.config),
            verifier: ArcSwap::from_pointee(Verifier(built.verifier)),
            generation: AtomicU64::new(0),
            dates: ArcSwap::from_pointee(built.dates),
        })
    }

    /// The config for a new handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-verifies a resumed session's client certificates against the current material
    /// and time (see [`super::verify_resumed`]); `Err` is the refusal, as a full handshake
    /// would have reported it.
    pub fn verify_resumed(
        &self,
        certs: Option<&[rustls::pki_types::CertificateDer<'static>]>,
    ) -> Result<(), rustls::Error> {
        super::server::verify_resumed(&*self.verifier.load().0, certs)
    }

    /// Bumped by every successful reload; a shard may cache `current()` and re-fetch only
    /// when this changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// When the material in force stops working (server certificate, earliest CA, CRL).
    pub fn dates(&self) -> MaterialDates {
        **self.dates.load()
    }

    /// The options in force.
    pub fn options(&self) -> TlsOptions {
        self.lock_options().clone()
    }

    fn lock_options(&self) -> std::sync::MutexGuard<'_, TlsOptions> {
        // A panic while holding this lock cannot leave the options half-written (they are
        // replaced whole), so a poisoned lock is still usable.
        self.options.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads and re-validates every file of the current options. On success the new
    /// config is swapped in and its warnings returned; on failure the old config stays and
    /// the error says why. Blocking file I/O: call it off the shard executors.
    pub fn reload(&self) -> Result<Vec<String>, TlsError> {
        let opts = self.options();
        self.install(opts)
    }

    /// Like [`reload`](Self::reload) with new options (the config file changed too).
    pub fn reload_with(&self, options: TlsOptions) -> Result<Vec<String>, TlsError> {
        self.install(options)
    }

    fn install(&self, options: TlsOptions) -> Result<Vec<String>, TlsError> {
        let built = build_server_config_with_warnings(&options)?;
        *self.lock_options() = options;
        self.current.store(built.config);
        self.verifier.store(Arc::new(Verifier(built.verifier)));
        self.dates.store(Arc::new(built.dates));
        self.generation.fetch_add(1, Ordering::AcqRel);
        for w in &built.warnings {
            tracing::warn!("{w}");
        }
        Ok(built.warnings)
    }
}

/// One shard's handle on a [`TlsReloader`]: caches the `Arc<ServerConfig>` and fetches it
/// again only when the reload generation changed, so an accept costs one atomic load and no
/// reference-count traffic on a cache line shared by all shards.
#[derive(Debug, Clone)]
pub struct ShardTlsConfig {
    reloader: Arc<TlsReloader>,
    generation: u64,
    cached: Arc<ServerConfig>,
}

impl ShardTlsConfig {
    pub fn new(reloader: Arc<TlsReloader>) -> Self {
        // Generation first: if a reload lands in between, the next `get` fetches again.
        let generation = reloader.generation();
        let cached = reloader.current();
        Self {
            reloader,
            generation,
            cached,
        }
    }

    /// The config for the next handshake (clone it into `TlsAcceptor::from`).
    pub fn get(&mut self) -> &Arc<ServerConfig> {
        let g = self.reloader.generation();
        if g != self.generation {
            self.generation = g;
            self.cached = self.reloader.current();
        }
        &self.cached
    }
}
