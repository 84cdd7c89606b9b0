//! SIGHUP reload of password and ACL files: parse the new file, swap it in atomically, keep the
//! old one if the new one does not parse.
//!
//! Owns: the current version of each loaded file and its generation. Must not touch: signals
//! (the shard runtime calls [`SecurityFiles::reload`] from its signal thread), sessions (the
//! core re-checks them when it sees a new generation; see /work/notes/auth-integration.md).
//!
//! * [`Reloadable::reload`] reads and parses the file completely before swapping: readers see
//!   the old file or the new one, never a mix, and a file that fails to parse changes nothing
//!   (the error names `FILE:LINE` and why).
//! * Every load gets a fresh generation from one process-wide counter, so two files, or two
//!   versions of one file, never share a generation: the verification cache keys on it and the
//!   shard core compares it to know that sessions must be re-checked.
//! * mosquitto re-reads the configuration on SIGHUP and so may also pick up a new
//!   `password_file` path; Midge reloads the files named at start-up (a changed path needs a
//!   restart, as every other listener setting does).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{AclFile, AuthFileError, PasswordFile};

static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// A fresh generation: every parsed file and every (re)load gets its own.
pub(crate) fn next_generation() -> u64 {
    NEXT_GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// A file kind that can be (re)loaded.
pub trait AuthFile: Sized + Send + Sync + 'static {
    /// For messages: "password file", "ACL file".
    const WHAT: &'static str;
    fn load_file(path: &Path) -> Result<Self, AuthFileError>;
    fn stamp(&mut self, generation: u64);
    fn loaded_generation(&self) -> u64;
}

impl AuthFile for PasswordFile {
    const WHAT: &'static str = "password file";
    fn load_file(path: &Path) -> Result<Self, AuthFileError> {
        PasswordFile::load(path)
    }
    fn stamp(&mut self, generation: u64) {
        self.set_generation(generation);
    }
    fn loaded_generation(&self) -> u64 {
        self.generation()
    }
}

impl AuthFile for AclFile {
    const WHAT: &'static str = "ACL file";
    fn load_file(path: &Path) -> Result<Self, AuthFileError> {
        AclFile::load(path)
    }
    fn stamp(&mut self, generation: u64) {
        self.set_generation(generation);
    }
    fn loaded_generation(&self) -> u64 {
        self.generation()
    }
}

/// The current version of one file.
pub struct Reloadable<T> {
    path: PathBuf,
    current: ArcSwap<T>,
    /// Mirrors `current`'s generation, so a shard can ask "changed?" with one atomic load.
    generation: AtomicU64,
}

impl<T: AuthFile> std::fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloadable")
            .field("what", &T::WHAT)
            .field("path", &self.path)
            .field("generation", &self.generation())
            .finish()
    }
}

impl<T: AuthFile> Reloadable<T> {
    /// Load `path` (blocking file I/O: at start-up, not on a shard).
    pub fn load(path: &Path) -> Result<Reloadable<T>, AuthFileError> {
        let mut v = T::load_file(path)?;
        let generation = next_generation();
        v.stamp(generation);
        Ok(Reloadable {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(v),
            generation: AtomicU64::new(generation),
        })
    }

    /// Wrap an already parsed file (tests, benchmarks, other backends' adapters).
    pub fn from_value(path: &Path, mut v: T) -> Reloadable<T> {
        let generation = next_generation();
        v.stamp(generation);
        Reloadable {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(v),
            generation: AtomicU64::new(generation),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The version in force. Keep the `Arc` (per shard, per listener) rather than calling this
    /// per message: the check then touches no shared cache line.
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// The generation in force (one atomic load).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Re-read the file. On success the new version is in force for every later
    /// [`Reloadable::current`] and is returned; on error the old one stays.
    pub fn reload(&self) -> Result<Arc<T>, AuthFileError> {
        let mut v = T::load_file(&self.path)?;
        let generation = next_generation();
        v.stamp(generation);
        let v = Arc::new(v);
        self.current.store(v.clone());
        self.generation.store(generation, Ordering::Release);
        Ok(v)
    }
}

/// What one file's reload did.
#[derive(Debug)]
pub struct ReloadOutcome {
    pub what: &'static str,
    pub path: PathBuf,
    /// The new generation, or why the old version stays.
    pub result: Result<u64, AuthFileError>,
}

impl std::fmt::Display for ReloadOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.result {
            Ok(g) => write!(
                f,
                "{} {} reloaded (generation {g})",
                self.what,
                self.path.display()
            ),
            Err(e) => write!(
                f,
                "{} reload failed, keeping the previous version: {e}",
                self.what
            ),
        }
    }
}

/// Every password and ACL file the broker loaded, each once however many listeners use it.
#[derive(Debug, Default)]
pub struct SecurityFiles {
    password_files: Vec<Arc<Reloadable<PasswordFile>>>,
    acl_files: Vec<Arc<Reloadable<AclFile>>>,
}

fn get_or_load<T: AuthFile>(
    list: &mut Vec<Arc<Reloadable<T>>>,
    path: &Path,
) -> Result<Arc<Reloadable<T>>, AuthFileError> {
    if let Some(r) = list.iter().find(|r| r.path() == path) {
        return Ok(r.clone());
    }
    let r = Arc::new(Reloadable::load(path)?);
    list.push(r.clone());
    Ok(r)
}

impl SecurityFiles {
    pub fn new() -> SecurityFiles {
        SecurityFiles::default()
    }

    /// The password file at `path`, loaded on first use (listeners naming one path share it).
    pub fn password_file(
        &mut self,
        path: &Path,
    ) -> Result<Arc<Reloadable<PasswordFile>>, AuthFileError> {
        get_or_load(&mut self.password_files, path)
    }

    /// The ACL file at `path`, loaded on first use.
    pub fn acl_file(&mut self, path: &Path) -> Result<Arc<Reloadable<AclFile>>, AuthFileError> {
        get_or_load(&mut self.acl_files, path)
    }

    pub fn is_empty(&self) -> bool {
        self.password_files.is_empty() && self.acl_files.is_empty()
    }

    /// Reload every file (SIGHUP; blocking file I/O: on the signal thread). Each file is
    /// swapped independently: one that fails keeps its old version, the others move on.
    pub fn reload(&self) -> Vec<ReloadOutcome> {
        fn one<T: AuthFile>(r: &Reloadable<T>) -> ReloadOutcome {
            ReloadOutcome {
                what: T::WHAT,
                path: r.path().to_path_buf(),
                result: r.reload().map(|v| v.loaded_generation()),
            }
        }
        self.password_files
            .iter()
            .map(|r| one(&**r))
            .chain(self.acl_files.iter().map(|r| one(&**r)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Access, Client};

    fn client() -> Client<'static> {
        Client {
            client_id: "c",
            username: Some("u"),
        }
    }

    #[test]
    fn reload_swaps_and_a_bad_file_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("acl");
        std::fs::write(&p, "user u\ntopic read a\n").unwrap();
        let r: Reloadable<AclFile> = Reloadable::load(&p).unwrap();
        let g1 = r.generation();
        let old = r.current();
        assert!(old.check(client(), Access::Read, "a").is_allowed());

        std::fs::write(&p, "user u\ntopic read b\n").unwrap();
        let new = r.reload().unwrap();
        let g2 = r.generation();
        assert!(g2 > g1);
        assert_eq!(new.generation(), g2);
        assert!(r.current().check(client(), Access::Read, "b").is_allowed());
        assert!(!r.current().check(client(), Access::Read, "a").is_allowed());
        // A reader holding the old version still sees it whole.
        assert!(old.check(client(), Access::Read, "a").is_allowed());

        std::fs::write(&p, "user u\ntopic read c\ntopic bogus x\n").unwrap();
        let e = r.reload().unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:3: invalid access type \"bogus\" (expected read, write, readwrite or deny)",
                p.display()
            )
        );
        assert_eq!(r.generation(), g2);
        assert!(r.current().check(client(), Access::Read, "b").is_allowed());
        assert!(!r.current().check(client(), Access::Read, "c").is_allowed());

        std::fs::remove_file(&p).unwrap();
        assert!(r.reload().is_err());
        assert_eq!(r.generation(), g2);
    }

    #[test]
    fn files_are_shared_by_path_and_reloaded_independently() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        let acl = dir.path().join("acl");
        std::fs::write(&pw, "").unwrap();
        std::fs::write(&acl, "").unwrap();
        let mut files = SecurityFiles::new();
        assert!(files.is_empty());
        let a = files.password_file(&pw).unwrap();
        let b = files.password_file(&pw).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = files.acl_file(&acl).unwrap();
        assert_ne!(a.generation(), c.generation());

        std::fs::write(&acl, "nonsense\n").unwrap();
        let out = files.reload();
        assert_eq!(out.len(), 2);
        assert!(out[0].result.is_ok(), "{}", out[0]);
        assert!(out[1].result.is_err());
        assert!(out[1]
            .to_string()
            .starts_with("ACL file reload failed, keeping the previous version: "));
        assert!(out[0].to_string().contains("reloaded (generation"));
        assert!(files.acl_file(Path::new("/nonexistent/acl")).is_err());
    }
}
