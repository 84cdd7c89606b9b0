//! Runtime compaction: bounds the log while the broker runs (`autosave_interval`).
//!
//! Owns: the [`SealBoard`] through which shards say what they have sealed, the compacted files
//! `gen-N/compact-E.log` with the coverage they record, the cut, and the compactor thread.
//! Must not touch: glommio or any shard (this is a plain std thread: its blocking file I/O
//! stalls nobody), what records mean (`recover::compact_runtime` decides what to keep).
//!
//! # Sealing and the cut
//! A shard seals a segment by moving to the next one, after the segment's last batch was
//! synced; it then publishes `(first_unsealed, horizon)`: every record of that shard with a
//! timestamp ≤ `horizon` is in a segment below `first_unsealed`, and every later record has a
//! larger timestamp. Recovery merges all shards' records by timestamp and a message's fate
//! depends on subscriptions and acknowledgements in other shards' records, so a compaction
//! may only fold records up to a cut `T` that every shard has sealed past: `T` = min over
//! shards of `horizon`. Records of the sealed inputs after `T` are carried over verbatim.
//! Then nothing after the compacted file (a shard's later segments, any future record) has a
//! timestamp ≤ `T`, which is what `compact_runtime` needs.
//!
//! # Coverage and crash safety
//! `compact-E.log` starts with a cover frame: epoch `E`, and per shard the first segment it
//! does not stand for. It stands for `compact.log`, every `compact-e.log` with `e < E`, and
//! the covered segments. It is written as `compact-E.tmp`, fsynced, renamed, the directory
//! fsynced; only then are its inputs deleted. Recovery reads the highest `compact-E.log`
//! and the segments it does not cover, and ignores everything covered that a crash left
//! behind, so no record counts twice and none is lost. A shard's first remaining segment then
//! starts mid-numbering: the scanner accepts any first sequence, and the torn-tail rule
//! (damage only in the last segment's last batch) is unchanged for what remains.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{io_err, log, read_files, record, recover, Record, StoreError};

/// Frame kind of the cover (first record of a compacted file).
pub const KIND_COVER: u8 = record::KIND_COVER;

/// What one shard has sealed (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    pub first_unsealed: u64,
    pub horizon: u64,
}

/// Shards write, the compactor reads: one uncontended lock per seal.
#[derive(Debug)]
pub struct SealBoard {
    seals: Vec<Mutex<Seal>>,
    /// Records each shard has written (for `autosave_on_changes`).
    pub written: Vec<AtomicU64>,
}

impl SealBoard {
    pub fn new(shards: usize) -> SealBoard {
        SealBoard {
            seals: (0..shards)
                .map(|_| {
                    Mutex::new(Seal {
                        first_unsealed: 1,
                        horizon: 0,
                    })
                })
                .collect(),
            written: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Shard `k` sealed everything below `first_unsealed`, up to `horizon` (both only grow).
    pub fn publish(&self, k: usize, first_unsealed: u64, horizon: u64) {
        if let Some(m) = self.seals.get(k) {
            let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
            s.first_unsealed = s.first_unsealed.max(first_unsealed);
            s.horizon = s.horizon.max(horizon);
        }
    }

    pub fn snapshot(&self) -> Vec<Seal> {
        self.seals
            .iter()
            .map(|m| *m.lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    fn written(&self) -> u64 {
        self.written.iter().map(|w| w.load(Ordering::Relaxed)).sum()
    }
}

/// What a compacted file stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cover {
    pub epoch: u64,
    /// (shard, first segment not covered).
    pub segs: Vec<(u32, u64)>,
}

impl Cover {
    fn first_uncovered(&self, shard: usize) -> u64 {
        self.segs
            .iter()
            .find(|(k, _)| *k as usize == shard)
            .map_or(1, |&(_, s)| s)
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(12 + 12 * self.segs.len());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&(self.segs.len() as u32).to_le_bytes());
        for &(k, s) in &self.segs {
            b.extend_from_slice(&k.to_le_bytes());
            b.extend_from_slice(&s.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Cover> {
        let epoch = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
        let n = u32::from_le_bytes(b.get(8..12)?.try_into().ok()?) as usize;
        let mut segs = Vec::with_capacity(n.min(b.len() / 12));
        for i in 0..n {
            let at = 12 + i * 12;
            let k = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?);
            let s = u64::from_le_bytes(b.get(at + 4..at + 12)?.try_into().ok()?);
            segs.push((k, s));
        }
        Some(Cover { epoch, segs })
    }
}

pub fn compact_name(epoch: u64) -> String {
    format!("compact-{epoch:08}.log")
}

/// A generation's files as recovery must read them.
#[derive(Debug, Default)]
pub struct GenFiles {
    /// The compacted file in force (`compact-E.log`, else `compact.log`), and its cover.
    pub base: Option<PathBuf>,
    pub cover: Cover,
    /// Per shard directory (by number): the segments not covered, in order.
    pub shards: Vec<(usize, Vec<(u64, PathBuf)>)>,
    /// Files covered (or unfinished temporaries) that a crash may have left.
    pub stale: Vec<PathBuf>,
}

impl GenFiles {
    pub fn bytes(&self) -> u64 {
        let size = |p: &PathBuf| fs::metadata(p).map_or(0, |m| m.len());
        self.base.iter().map(size).sum::<u64>()
            + self
                .shards
                .iter()
                .flat_map(|(_, v)| v.iter().map(|(_, p)| size(p)))
                .sum::<u64>()
    }
}

fn read_cover(path: &Path) -> Result<Cover, StoreError> {
    // The cover is the second frame (after the batch marker): the first block holds it
    // unless the shard count is in the hundreds; read a little more to be sure.
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    let mut buf = Vec::new();
    f.by_ref()
        .take(1 << 20)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    let scan = log::scan_segment(&buf, 0, 0);
    scan.frames
        .iter()
        .find(|fr| fr.kind == KIND_COVER)
        .and_then(|fr| Cover::decode(&buf[fr.payload.0..fr.payload.1]))
        .ok_or_else(|| StoreError::Corrupt {
            file: path.to_path_buf(),
            offset: 0,
            why: "a compacted file without its cover".into(),
        })
}

/// List what recovery reads in `gen` (and what it must ignore).
pub fn gen_files(gen: &Path) -> Result<GenFiles, StoreError> {
    let mut out = GenFiles::default();
    let mut compacts: Vec<(u64, PathBuf)> = Vec::new();
    let mut shard_dirs: Vec<(usize, PathBuf)> = Vec::new();
    for e in fs::read_dir(gen).map_err(io_err(gen))? {
        let e = e.map_err(io_err(gen))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("compact-")
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            compacts.push((n, e.path()));
        } else if name.starts_with("compact-") && name.ends_with(".tmp") {
            out.stale.push(e.path());
        } else if let Some(k) = name
            .strip_prefix("shard-")
            .and_then(|k| k.parse::<usize>().ok())
        {
            shard_dirs.push((k, e.path()));
        }
    }
    compacts.sort();
    let startup = gen.join("compact.log");
    if let Some((_, latest)) = compacts.pop() {
        out.cover = read_cover(&latest)?;
        out.base = Some(latest);
        out.stale.extend(compacts.into_iter().map(|(_, p)| p));
        if startup.exists() {
            out.stale.push(startup);
        }
    } else if startup.exists() {
        out.base = Some(startup);
    }
    shard_dirs.sort();
    for (k, dir) in shard_dirs {
        let first = out.cover.first_uncovered(k);
        let mut keep = Vec::new();
        for (n, p) in super::segments_numbered(&dir)? {
            if n < first {
                out.stale.push(p);
            } else {
                keep.push((n, p));
            }
        }
        out.shards.push((k, keep));
    }
    Ok(out)
}

/// What one compaction did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub epoch: u64,
    pub cut: u64,
    pub records_in: usize,
    pub records_out: usize,
    pub carried: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub took: Duration,
}

/// Fold what `seals` says is sealed into a new compacted file of `gen`, then delete what it
/// replaced. `None`: nothing new was sealed.
pub fn compact_once(gen: &Path, seals: &[Seal]) -> Result<Option<Outcome>, StoreError> {
    let started = Instant::now();
    let g = gen_files(gen)?;
    let mut inputs: Vec<(usize, Vec<PathBuf>)> = Vec::new();
    let mut cover = Cover {
        epoch: g.cover.epoch + 1,
        segs: g.cover.segs.clone(),
    };
    for (k, seal) in seals.iter().enumerate() {
        let segs: Vec<PathBuf> = g
            .shards
            .iter()
            .find(|(d, _)| *d == k)
            .map(|(_, v)| {
                v.iter()
                    .filter(|(n, _)| *n < seal.first_unsealed)
                    .map(|(_, p)| p.clone())
                    .collect()
            })
            .unwrap_or_default();
        let first = seal.first_unsealed.max(g.cover.first_uncovered(k));
        match cover.segs.iter_mut().find(|(d, _)| *d as usize == k) {
            Some(e) => e.1 = first,
            None => cover.segs.push((k as u32, first)),
        }
        if !segs.is_empty() {
            inputs.push((k, segs));
        }
    }
    if inputs.is_empty() {
        return Ok(None);
    }
    let cut = seals.iter().map(|s| s.horizon).min().unwrap_or(0);
    let size = |p: &PathBuf| fs::metadata(p).map_or(0, |m| m.len());
    let mut bytes_before = 0;
    let mut records: Vec<Record> = Vec::new();
    if let Some(b) = &g.base {
        bytes_before += size(b);
        records.append(&mut read_files(std::slice::from_ref(b), true)?);
    }
    for (_, segs) in &inputs {
        bytes_before += segs.iter().map(size).sum::<u64>();
        records.append(&mut read_files(segs, true)?);
    }
    let records_in = records.len();
    let (fold, carry): (Vec<Record>, Vec<Record>) =
        records.into_iter().partition(|r| r.ts() <= cut);
    let carried = carry.len();
    let mut out = recover::compact_runtime(fold);
    out.extend(carry);
    out.sort_by_key(Record::ts);

    let tmp = gen.join(format!("compact-{:08}.tmp", cover.epoch));
    let path = gen.join(compact_name(cover.epoch));
    super::write_compacted(&tmp, Some(&cover), &out)?;
    fs::rename(&tmp, &path).map_err(io_err(&tmp))?;
    super::sync_dir(gen)?;
    // Now the new file stands for its inputs: deleting them is tidying (a crash before or
    // during it leaves covered files that recovery ignores and the next compaction deletes).
    let mut gone = g.stale;
    gone.extend(g.base);
    gone.extend(inputs.into_iter().flat_map(|(_, v)| v));
    for p in &gone {
        if let Err(e) = fs::remove_file(p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("persistence: could not remove {}: {e}", p.display());
            }
        }
    }
    super::sync_dir(gen)?;
    Ok(Some(Outcome {
        epoch: cover.epoch,
        cut,
        records_in,
        records_out: out.len(),
        carried,
        bytes_before,
        bytes_after: size(&path),
        took: started.elapsed(),
    }))
}

/// When the compactor runs (`autosave_interval`, `autosave_on_changes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cadence {
    /// Every interval; shards seal their segments on the same interval.
    Every(Duration),
    /// Once this many records were written since the last compaction (checked every
    /// second; shards seal every second).
    Changes(u64),
}

impl Cadence {
    /// How often a shard seals a segment that holds records.
    pub fn seal_every(self) -> Duration {
        match self {
            Cadence::Every(d) => d.max(Duration::from_secs(1)),
            Cadence::Changes(_) => Duration::from_secs(1),
        }
    }
}

/// The compactor thread; stopped (and joined) when dropped.
pub struct Compactor {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Compactor {
    pub fn spawn(
        gen: PathBuf,
        board: Arc<SealBoard>,
        cadence: Cadence,
    ) -> std::io::Result<Compactor> {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("midge-compactor".into())
            .spawn(move || {
                let tick = cadence.seal_every();
                let mut last_written = 0u64;
                let mut failing = false;
                loop {
                    match rx.recv_timeout(tick) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return, // the broker stopped
                    }
                    let written = board.written();
                    if let Cadence::Changes(n) = cadence {
                        if written.saturating_sub(last_written) < n.max(1) {
                            continue;
                        }
                    }
                    match compact_once(&gen, &board.snapshot()) {
                        Ok(Some(o)) => {
                            last_written = written;
                            failing = false;
                            info!(
                                "persistence: compacted {} records ({} bytes) into {} ({} \
                                 bytes, {} carried past the cut) in {:.3}s",
                                o.records_in,
                                o.bytes_before,
                                o.records_out,
                                o.bytes_after,
                                o.carried,
                                o.took.as_secs_f64()
                            );
                        }
                        Ok(None) => {}
                        Err(e) => {
                            if !failing {
                                warn!(
                                    "persistence: compaction failed: {e}. The logs stay as \
                                     they are (nothing is lost; recovery reads them all); \
                                     retrying every {}s",
                                    tick.as_secs()
                                );
                            }
                            failing = true;
                        }
                    }
                }
            })?;
        Ok(Compactor {
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(super) fn cover_frame(cover: &Cover, out: &mut Vec<u8>) {
    log::push_record(out, KIND_COVER, &cover.encode());
}

#[cfg(test)]
mod tests {
    use super::super::recover::tests::{digest, random_history, Rng};
    use super::*;
    use crate::codec::QoS;
    use crate::session::EXPIRY_NEVER;

    const SEC: u64 = 1_000_000_000;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("midge-compact-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// A shard segment holding `recs` in one batch per record; returns the next seq/batch.
    fn write_seg(path: &Path, recs: &[Record], seq: u64, batch: u64) -> (u64, u64) {
        let mut f = fs::File::create(path).unwrap();
        let mut w = log::LogWriter::new(512, seq, batch);
        for r in recs {
            let mut p = Vec::new();
            r.encode(&mut p);
            let mut b = Vec::new();
            log::push_record(&mut b, r.kind(), &p);
            log::write_batch(&mut w, &mut f, &b).unwrap();
        }
        (w.next_seq(), w.next_batch())
    }

    /// A generation `gen-1` with `shards` shard directories, each a list of segments.
    fn layout(dir: &Path, shards: &[Vec<Vec<Record>>]) -> PathBuf {
        fs::write(dir.join("CURRENT"), "gen 1\n").unwrap();
        let gen = dir.join("gen-1");
        fs::create_dir_all(&gen).unwrap();
        super::super::write_compacted(&gen.join("compact.log"), None, &[]).unwrap();
        for (k, segs) in shards.iter().enumerate() {
            let d = super::super::shard_dir(&gen, k);
            fs::create_dir_all(&d).unwrap();
            let (mut seq, mut batch) = (1, 1);
            for (i, recs) in segs.iter().enumerate() {
                let p = d.join(super::super::segment_name(i as u64 + 1));
                (seq, batch) = write_seg(&p, recs, seq, batch);
            }
        }
        gen
    }

    fn copy_dir(from: &Path, to: &Path) {
        let _ = fs::remove_dir_all(to);
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let t = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &t);
            } else if e.file_name() != "LOCK" {
                fs::copy(e.path(), t).unwrap();
            }
        }
    }

    fn recovered(dir: &Path, shards: usize, now: Instant, now_ns: u64) -> String {
        let copy = dir.with_extension("open");
        copy_dir(dir, &copy);
        let o = super::super::open(&copy, shards, now, now_ns).unwrap();
        let d = digest(&o.recovered);
        drop(o);
        let _ = fs::remove_dir_all(&copy);
        d
    }

    fn msg(ts: u64, seq: u64, topic: &str) -> Record {
        let m = crate::message::Message {
            topic: crate::codec::TopicName::new(bytestring::ByteString::from(topic)).unwrap(),
            payload: bytes::Bytes::from_static(b"m"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
            expires_at: None,
            origin: "pub".into(),
            sid: super::super::record::sid(0, seq),
        };
        Record::Msg {
            ts,
            sid: m.sid,
            client: "pub".into(),
            in_pid: 0,
            expires: 0,
            publish: super::super::record::encode_publish(&m),
        }
    }

    fn queued(d: &str) -> usize {
        d.lines().filter(|l| l.contains("queued")).count()
    }

    /// The cut: a SUBSCRIBE in shard 1's live segment (ts 10) comes before a message in shard
    /// 0's sealed segment (ts 20). Shard 1 has only sealed up to ts 6, so the message is past
    /// the cut and carried over; folding it (a cut at shard 0's horizon) would drop it, as
    /// nothing in the sealed records subscribed to it.
    #[test]
    fn a_subscription_in_another_shards_live_segment_keeps_the_message() {
        let now = Instant::now();
        let start = Record::Start {
            ts: 5,
            client: "s".into(),
            clean: true,
            expiry: EXPIRY_NEVER,
        };
        let sub = Record::Sub {
            ts: 10,
            client: "s".into(),
            filter: "t".into(),
            options: 1,
            sub_id: 0,
        };
        let disc = Record::Disc {
            ts: 11,
            client: "s".into(),
            expiry: EXPIRY_NEVER,
        };
        for (horizon1, survives) in [(6, true), (25, false)] {
            let dir = tmpdir(&format!("cut{horizon1}"));
            let gen = layout(
                &dir,
                &[
                    vec![vec![msg(20, 1, "t")], vec![]],
                    vec![vec![start.clone()], vec![sub.clone(), disc.clone()]],
                ],
            );
            let want = recovered(&dir, 2, now, 30);
            assert_eq!(queued(&want), 1, "{want}");
            let seals = [
                Seal {
                    first_unsealed: 2,
                    horizon: 25,
                },
                Seal {
                    first_unsealed: 2,
                    horizon: horizon1,
                },
            ];
            let o = compact_once(&gen, &seals).unwrap().expect("compacted");
            assert_eq!(o.cut, horizon1);
            // The sealed segments are gone, the live one stays.
            assert!(!gen.join("shard-0/00000001.log").exists());
            assert!(!gen.join("shard-1/00000001.log").exists());
            assert!(gen.join("shard-1/00000002.log").exists());
            assert!(!gen.join("compact.log").exists());
            let got = recovered(&dir, 2, now, 30);
            if survives {
                assert_eq!(got, want);
            } else {
                // The wrong cut loses it: what the rule above prevents.
                assert_eq!(queued(&got), 0, "{got}");
            }
            let _ = fs::remove_dir_all(&dir);
        }
    }

    /// Random histories spread over shards and segments, compacted several times at cuts
    /// the seals allow, with crashes at every step (inputs not yet deleted, a temporary left
    /// behind): recovery always rebuilds what the uncompacted log does.
    #[test]
    fn compaction_and_crashes_at_any_step_recover_the_same_state() {
        let now = Instant::now();
        for seed in 1..40u64 {
            let mut rng = Rng::seeded(seed);
            let n = 30 + rng.below(150) as usize;
            let all = random_history(&mut rng, n);
            let now_ns = all.last().map_or(0, Record::ts) + rng.below(10 * SEC);
            // Each shard gets a strictly increasing subsequence, cut into 4 segments.
            let shards = 2 + rng.below(2) as usize;
            let mut per: Vec<Vec<Record>> = vec![Vec::new(); shards];
            for r in &all {
                per[rng.below(shards as u64) as usize].push(r.clone());
            }
            let segs: Vec<Vec<Vec<Record>>> = per
                .iter()
                .map(|recs| {
                    let mut cuts: Vec<usize> = (0..3)
                        .map(|_| rng.below(recs.len() as u64 + 1) as usize)
                        .collect();
                    cuts.sort_unstable();
                    let b = [0, cuts[0], cuts[1], cuts[2], recs.len()];
                    (0..4).map(|i| recs[b[i]..b[i + 1]].to_vec()).collect()
                })
                .collect();
            let dir = tmpdir(&format!("crash{seed}"));
            let gen = layout(&dir, &segs);
            let want = recovered(&dir, shards, now, now_ns);
            for step in 2..=4u64 {
                // Shard k has sealed segments below `step`; its horizon is the last
                // timestamp in them (or the first of the next one, minus one).
                let seals: Vec<Seal> = segs
                    .iter()
                    .map(|s| {
                        let sealed = s[..step as usize - 1].iter().flatten().map(Record::ts);
                        let next = s[step as usize - 1..]
                            .iter()
                            .flatten()
                            .map(Record::ts)
                            .min();
                        Seal {
                            first_unsealed: step,
                            horizon: next
                                .map_or(u64::MAX, |t| t - 1)
                                .max(sealed.max().unwrap_or(0)),
                        }
                    })
                    .collect();
                let before = dir.with_extension("before");
                copy_dir(&dir, &before);
                compact_once(&gen, &seals).unwrap();
                assert_eq!(
                    recovered(&dir, shards, now, now_ns),
                    want,
                    "seed {seed} step {step}"
                );
                // A crash after the rename, before the deletes: the inputs are back.
                let crashed = dir.with_extension("crashed");
                copy_dir(&before, &crashed);
                let g2 = crashed.join("gen-1");
                for e in fs::read_dir(gen.clone()).unwrap().flatten() {
                    let n = e.file_name().to_string_lossy().to_string();
                    if n.starts_with("compact-") {
                        fs::copy(e.path(), g2.join(&n)).unwrap();
                    }
                }
                fs::write(g2.join("compact-99999999.tmp"), b"half written").unwrap();
                assert_eq!(
                    recovered(&crashed, shards, now, now_ns),
                    want,
                    "seed {seed} step {step}: crash before deleting"
                );
                // ... and the next compaction from there tidies and still agrees.
                compact_once(&g2, &seals).unwrap();
                assert_eq!(
                    recovered(&crashed, shards, now, now_ns),
                    want,
                    "seed {seed}"
                );
                // A changed shard count reads the same files.
                assert_eq!(
                    recovered(&dir, 1, now, now_ns),
                    want,
                    "seed {seed}: 1 shard"
                );
                let _ = fs::remove_dir_all(&crashed);
                let _ = fs::remove_dir_all(&before);
            }
            let _ = fs::remove_dir_all(&dir);
        }
    }

    /// The segments that remain after a compaction keep the torn-tail rule: a torn last batch
    /// is dropped, damage before a later batch is a start-up error; a damaged compacted file
    /// is always an error (it was complete before it was renamed into place).
    #[test]
    fn remaining_segments_keep_torn_tail_and_corruption_rules() {
        let now = Instant::now();
        let dir = tmpdir("torn");
        let recs: Vec<Record> = (1..=6).map(|i| msg(i * 10, i, "t")).collect();
        let gen = layout(
            &dir,
            &[vec![
                recs[..2].to_vec(),
                recs[2..4].to_vec(),
                recs[4..].to_vec(),
            ]],
        );
        let seals = [Seal {
            first_unsealed: 2,
            horizon: 25,
        }];
        compact_once(&gen, &seals).unwrap().expect("compacted");
        // Torn tail of the last segment: dropped, recovery works.
        let last = gen.join("shard-0/00000003.log");
        let img = fs::read(&last).unwrap();
        let scan = log::scan_segment(&img, 0, 0);
        let end = scan.frames.last().unwrap().end;
        fs::write(&last, &img[..end - 5]).unwrap();
        let copy = dir.with_extension("t1");
        copy_dir(&dir, &copy);
        assert!(super::super::open(&copy, 1, now, 100).is_ok());
        // A flipped byte in the first remaining segment (later batches follow): corruption.
        fs::write(&last, &img).unwrap();
        let mid = gen.join("shard-0/00000002.log");
        let mut b = fs::read(&mid).unwrap();
        let s = log::scan_segment(&b, 0, 0);
        b[s.frames[1].payload.0 + 2] ^= 0x10;
        fs::write(&mid, &b).unwrap();
        copy_dir(&dir, &copy);
        let e = super::super::open(&copy, 1, now, 100)
            .err()
            .expect("corrupt");
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        // A damaged compacted file.
        let mut b = fs::read(&mid).unwrap();
        b[s.frames[1].payload.0 + 2] ^= 0x10;
        fs::write(&mid, &b).unwrap();
        let c = gen.join(compact_name(1));
        let mut b = fs::read(&c).unwrap();
        let n = b.len();
        let s = log::scan_segment(&b, 0, 0);
        let at = s.frames.last().unwrap().end - 3;
        assert!(at < n);
        b[at] ^= 0x01;
        fs::write(&c, &b).unwrap();
        copy_dir(&dir, &copy);
        let e = super::super::open(&copy, 1, now, 100)
            .err()
            .expect("corrupt");
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        let _ = fs::remove_dir_all(&copy);
        let _ = fs::remove_dir_all(&dir);
    }
}
