//! Persistence: the per-shard append logs, their generations, and recovery at start-up.
//!
//! Owns: the directory layout under `persistence_location`, the record format and framing
//! (`record.rs`, `log.rs`), recovery (`recover.rs`), and the start-up sequence: lock the
//! directory, read every shard's log of the current generation (in parallel), rebuild the
//! state, write it as the next generation's compacted log, switch `CURRENT`, delete the old
//! generation; and runtime compaction (`compact.rs`: a compactor thread folds the segments
//! shards have sealed into `gen-N/compact-E.log` while the broker runs, so the log and
//! recovery time stay bounded by what is still needed). Must not touch: glommio (the runtime
//! writes the live logs with glommio's DMA files in `crate::shard`; start-up runs before any
//! shard, and the compactor on its own thread, where blocking file I/O stalls nobody),
//! broker logic (the shard core decides what is recorded).
//!
//! # Layout
//! ```text
//! persistence_location/
//!   LOCK                      flock'ed while a broker uses the directory
//!   CURRENT                   "gen N": the generation in use (replaced by rename)
//!   gen-N/compact.log         everything the previous generation still needed
//!   gen-N/compact-E.log       runtime compaction E: stands for compact.log, earlier
//!                             compact-e.log and the shard segments its cover names
//!   gen-N/shard-K/00000001.log, 00000002.log, …   shard K's live log, in segments
//! ```
//! Records carry their own timestamps and ids, so which file holds a record does not matter
//! to what it means: a changed shard count needs no rewriting (sessions are placed on their
//! home shard under the current count at start).
//!
//! # Promises
//! * Nothing acknowledged is lost: the core releases a PUBACK/PUBREC/SUBACK/CONNACK only once
//!   the records it depends on are durable (`persistence_sync always|batch`).
//! * A torn tail (the batch being written when the process or machine died) is dropped with
//!   one log line; damage anywhere else is a start-up error naming the file and offset.
//! * A crash during start-up leaves either the old generation (CURRENT not yet switched) or
//!   the new one complete.
//! * A crash during a runtime compaction leaves either its inputs in force (the new file not
//!   yet renamed into place) or the new file, whose cover makes recovery skip the inputs a
//!   crash left behind: no record lost, none counted twice.

pub mod compact;
pub mod crc32c;
pub mod log;
pub mod record;
pub mod recover;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use thiserror::Error;
use tracing::{info, warn};

pub use log::{LogFile, LogWriter};
pub use record::Record;
pub use recover::Recovered;

/// Segment size after which a shard starts a new one.
pub const SEGMENT_BYTES: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("persistence: {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "persistence: {file} is corrupt at offset {offset} ({why}); valid records follow, so \
         this is not a torn write. Midge will not start on a damaged log: restore the \
         directory from a backup, or move it away to start empty"
    )]
    Corrupt {
        file: PathBuf,
        offset: usize,
        why: String,
    },
    #[error("persistence: {path} is in use by another process (is another Midge running?)")]
    Locked { path: PathBuf },
    #[error("persistence: {path}: {why}")]
    Layout { path: PathBuf, why: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A persistence directory opened for a run.
pub struct Opened {
    pub recovered: Recovered,
    /// Where shard K writes: `gen_dir/shard-K/`.
    pub gen_dir: PathBuf,
    /// Held for the life of the run (the flock).
    pub lock: fs::File,
}

impl Opened {
    pub fn shard_dir(&self, shard: usize) -> PathBuf {
        shard_dir(&self.gen_dir, shard)
    }
}

pub fn shard_dir(gen_dir: &Path, shard: usize) -> PathBuf {
    gen_dir.join(format!("shard-{shard}"))
}

pub fn segment_name(n: u64) -> String {
    format!("{n:08}.log")
}

fn lock(dir: &Path) -> Result<fs::File, StoreError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("LOCK");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(StoreError::Locked { path });
    }
    Ok(f)
}

fn read_current(dir: &Path) -> Result<Option<u64>, StoreError> {
    let path = dir.join("CURRENT");
    match fs::read_to_string(&path) {
        Ok(s) => s
            .trim()
            .strip_prefix("gen ")
            .and_then(|n| n.parse().ok())
            .map(Some)
            .ok_or_else(|| StoreError::Layout {
                path,
                why: format!("expected 'gen N', found {:?}", s.trim()),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io { path, source: e }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Records of one file sequence (a shard's segments in order, or the compacted log).
/// `strict`: the files are complete (sealed segments, a compacted file), so damage anywhere
/// is corruption; otherwise a torn tail of the last file is dropped.
fn read_files(files: &[PathBuf], strict: bool) -> Result<Vec<Record>, StoreError> {
    let mut out = Vec::new();
    let (mut seq, mut batch) = (0u64, 0u64);
    for (i, path) in files.iter().enumerate() {
        let buf = fs::read(path).map_err(io_err(path))?;
        let scan = log::scan_segment(&buf, seq, batch);
        let last_file = i + 1 == files.len();
        if let Some((at, why)) = &scan.damage {
            let later = strict
                || log::later_batch_after(&buf, at + 1, scan.last_batch).is_some()
                || !last_file;
            if later {
                return Err(StoreError::Corrupt {
                    file: path.clone(),
                    offset: *at,
                    why: why.clone(),
                });
            }
            warn!(
                "persistence: {}: torn tail at offset {at} ({why}): {} bytes of an \
                 unfinished write dropped (never acknowledged)",
                path.display(),
                buf.len() - at
            );
        }
        seq = scan.last_seq;
        batch = scan.last_batch;
        for f in &scan.frames {
            if f.kind == log::KIND_BATCH || f.kind == compact::KIND_COVER {
                continue;
            }
            let payload = &buf[f.payload.0..f.payload.1];
            let rec = Record::decode(f.kind, payload).map_err(|e| StoreError::Corrupt {
                file: path.clone(),
                offset: f.payload.0 - log::HEADER,
                why: e.to_string(),
            })?;
            out.push(rec);
        }
    }
    Ok(out)
}

/// A shard directory's segments, by number.
fn segments_numbered(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut v: Vec<(u64, PathBuf)> = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(StoreError::Io {
                path: dir.into(),
                source: e,
            })
        }
    };
    for e in rd {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_suffix(".log")
            .and_then(|n| n.parse::<u64>().ok())
        {
            v.push((n, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// Open `dir` for a run with `shards` shards: recover, compact into a new generation, and
/// return the state to start with. Blocking: call before the shards start.
pub fn open(dir: &Path, shards: usize, now: Instant, now_ns: u64) -> Result<Opened, StoreError> {
    let started = Instant::now();
    if dir.is_file() {
        return Err(StoreError::Layout {
            path: dir.to_path_buf(),
            why: "is a file (a mosquitto database?). Midge keeps a directory there and does \
                  not read mosquitto's format: set persistence_file to another name"
                .into(),
        });
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let lock = lock(dir)?;
    let current = read_current(dir)?;
    let mut records = Vec::new();
    if let Some(g) = current {
        let gen = dir.join(format!("gen-{g}"));
        // The compacted file in force and the segments it does not cover (runtime
        // compaction); what it covers is ignored, whatever a crash left of it.
        let files = compact::gen_files(&gen)?;
        let mut sources: Vec<(bool, Vec<PathBuf>)> =
            vec![(files.cover.epoch > 0, files.base.iter().cloned().collect())];
        for (_, segs) in files.shards {
            sources.push((false, segs.into_iter().map(|(_, p)| p).collect()));
        }
        // Every shard's log in parallel (start-up time is recovery time).
        let results: Vec<Result<Vec<Record>, StoreError>> = std::thread::scope(|s| {
            let hs: Vec<_> = sources
                .iter()
                .map(|(strict, files)| s.spawn(move || read_files(files, *strict)))
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(StoreError::Layout {
                            path: gen.clone(),
                            why: "a recovery thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        for r in results {
            records.append(&mut r?);
        }
    } else if fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("gen-"))
    {
        return Err(StoreError::Layout {
            path: dir.join("CURRENT"),
            why: "missing, but log generations exist: refusing to start empty".into(),
        });
    }
    let read = started.elapsed();
    let recovered = recover::rebuild(records, now, now_ns);

    // The next generation: the compacted log, empty shard directories, then the switch.
    let next = current.map_or(1, |g| g + 1);
    let gen_dir = dir.join(format!("gen-{next}"));
    if gen_dir.exists() {
        // Left by a start-up that crashed before switching: never in use.
        fs::remove_dir_all(&gen_dir).map_err(io_err(&gen_dir))?;
    }
    fs::create_dir_all(&gen_dir).map_err(io_err(&gen_dir))?;
    write_compacted(&gen_dir.join("compact.log"), None, &recovered.compacted)?;
    for k in 0..shards {
        let d = shard_dir(&gen_dir, k);
        fs::create_dir_all(&d).map_err(io_err(&d))?;
    }
    sync_dir(&gen_dir)?;
    let tmp = dir.join("CURRENT.tmp");
    fs::write(&tmp, format!("gen {next}\n")).map_err(io_err(&tmp))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, dir.join("CURRENT")).map_err(io_err(dir))?;
    sync_dir(dir)?;
    // Old generations are no longer read.
    for e in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("gen-") && name != format!("gen-{next}") {
            if let Err(e) = fs::remove_dir_all(e.path()) {
                warn!("persistence: could not remove {name}: {e}");
            }
        }
    }
    let st = recovered.stats;
    info!(
        "persistence: {} records read in {:.3}s; recovered {} sessions ({} queued, {} in \
         flight, {} expired while down, {} with a will pending), {} retained; ready in {:.3}s",
        st.records,
        read.as_secs_f64(),
        st.sessions,
        st.queued,
        st.inflight,
        st.sessions_expired,
        st.wills,
        st.retained,
        started.elapsed().as_secs_f64()
    );
    Ok(Opened {
        recovered,
        gen_dir,
        lock,
    })
}

fn write_compacted(
    path: &Path,
    cover: Option<&compact::Cover>,
    records: &[Record],
) -> Result<(), StoreError> {
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    let mut w = LogWriter::new(4096, 1, 1);
    let mut buf = Vec::new();
    if let Some(c) = cover {
        compact::cover_frame(c, &mut buf);
    }
    let mut payload = Vec::new();
    let flush = |w: &mut LogWriter, f: &mut fs::File, buf: &mut Vec<u8>| {
        let p = w.plan(buf);
        f.write_at(p.offset, &p.buf)?;
        w.commit(&p);
        buf.clear();
        Ok::<(), io::Error>(())
    };
    for r in records {
        payload.clear();
        r.encode(&mut payload);
        log::push_record(&mut buf, r.kind(), &payload);
        if buf.len() >= 1 << 20 {
            flush(&mut w, &mut f, &mut buf).map_err(io_err(path))?;
        }
    }
    if !buf.is_empty() {
        flush(&mut w, &mut f, &mut buf).map_err(io_err(path))?;
    }
    f.set_len(w.len()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}
