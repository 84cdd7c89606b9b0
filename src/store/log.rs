//! The append log's bytes: record framing, the write planner, and the segment scanner.
//!
//! Owns: the on-disk frame `[len u32][crc32c u32][seq u64][kind u8][payload]` (little endian;
//! `len` counts seq + kind + payload, the CRC covers the same bytes), batch markers, the
//! sans-IO [`LogWriter`] that turns a batch of records into one aligned write, and
//! [`scan_segment`] / [`classify_damage`], which tell a torn tail from corruption. Must not
//! touch: what a record means (`record.rs`), files (the driver, or [`LogFile`] in tests and
//! at start-up).
//!
//! # Why a batch marker
//! Each group commit starts with a `Batch{n}` record, and batch n+1 is written only after
//! batch n's fdatasync returned. So damage followed (anywhere later in the shard's log) by a
//! valid marker of a *later* batch than the last intact one cannot be a torn write: the batch
//! it hit had been made durable before the next one began. That is corruption, a named
//! start-up error. Damage with no later marker after it is the batch that was being written
//! when the process or machine died: a torn tail, truncated (its records were never
//! acknowledged). One case cannot be told apart: bit rot inside the very last batch looks
//! like a torn write of it.
//!
//! Writes rewrite the last partial block (direct I/O writes whole blocks); the bytes after the
//! records are zero, so nothing stale can look like a record. A failed write is retried from
//! the same offset with the same frames (plus any records added since), so a retry rewrites
//! exactly what a failed attempt may have left.

use super::crc32c::crc32c;

/// Bytes before the payload: len, crc, seq, kind.
pub const HEADER: usize = 4 + 4 + 8 + 1;
/// Largest frame accepted (a 256 MiB MQTT payload plus its record fields).
pub const MAX_FRAME: usize = 300 << 20;
/// Record kind of the batch marker (payload: batch number, u64).
pub const KIND_BATCH: u8 = 1;

/// Append one frame to `out`.
pub fn frame(out: &mut Vec<u8>, seq: u64, kind: u8, payload: &[u8]) {
    let len = (8 + 1 + payload.len()) as u32;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    let crc = crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A frame parsed at some offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub seq: u64,
    pub kind: u8,
    /// Payload position in the segment.
    pub payload: (usize, usize),
    /// Offset just past the frame.
    pub end: usize,
}

/// Why bytes at an offset are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    Short,
    Length,
    Checksum,
}

impl Bad {
    pub fn describe(self) -> &'static str {
        match self {
            Bad::Short => "record cut short",
            Bad::Length => "impossible record length",
            Bad::Checksum => "checksum mismatch",
        }
    }
}

/// Parse the frame at `at`.
pub fn parse_frame(buf: &[u8], at: usize) -> Result<Frame, Bad> {
    let rest = buf.len().saturating_sub(at);
    if rest < HEADER {
        return Err(Bad::Short);
    }
    let len = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
    if !(9..=MAX_FRAME).contains(&len) {
        return Err(Bad::Length);
    }
    if rest < 8 + len {
        return Err(Bad::Short);
    }
    let crc = u32::from_le_bytes(buf[at + 4..at + 8].try_into().unwrap_or_default());
    let body = &buf[at + 8..at + 8 + len];
    if crc32c(body) != crc {
        return Err(Bad::Checksum);
    }
    let seq = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
    Ok(Frame {
        seq,
        kind: body[8],
        payload: (at + HEADER, at + 8 + len),
        end: at + 8 + len,
    })
}

/// What scanning one segment found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Intact frames in order (batch markers included).
    pub frames: Vec<Frame>,
    pub last_seq: u64,
    /// The last batch number seen among intact frames.
    pub last_batch: u64,
    /// Where the intact frames end and why (None: the segment ends cleanly, possibly with
    /// zero padding after the last frame).
    pub damage: Option<(usize, String)>,
}

/// Scan a segment whose first frame must carry `prev_seq + 1` (any seq if `prev_seq` is 0).
pub fn scan_segment(buf: &[u8], prev_seq: u64, prev_batch: u64) -> Scan {
    let mut s = Scan {
        last_seq: prev_seq,
        last_batch: prev_batch,
        ..Scan::default()
    };
    let mut at = 0;
    while at < buf.len() {
        match parse_frame(buf, at) {
            Ok(f) => {
                if s.last_seq != 0 && f.seq != s.last_seq + 1 {
                    s.damage = Some((at, format!("sequence {} after {}", f.seq, s.last_seq)));
                    return s;
                }
                if f.kind == KIND_BATCH {
                    if let Some(n) = buf
                        .get(f.payload.0..f.payload.1)
                        .and_then(|p| p.try_into().ok())
                        .map(u64::from_le_bytes)
                    {
                        s.last_batch = n;
                    }
                }
                s.last_seq = f.seq;
                s.frames.push(f);
                at = f.end;
            }
            Err(why) => {
                // Zero padding after the last frame of a synced batch is the normal end.
                if buf[at..].iter().all(|&b| b == 0) {
                    return s;
                }
                s.damage = Some((at, why.describe().to_string()));
                return s;
            }
        }
    }
    s
}

/// Whether `buf` holds, after `from`, an intact batch marker numbered above `batch`.
/// (Byte by byte: this only runs on damage.)
pub fn later_batch_after(buf: &[u8], from: usize, batch: u64) -> Option<usize> {
    let mut at = from;
    while at + HEADER + 8 <= buf.len() {
        if buf[at..at + 4] == 17u32.to_le_bytes() && buf[at + 16] == KIND_BATCH {
            if let Ok(f) = parse_frame(buf, at) {
                let n = u64::from_le_bytes(buf[f.payload.0..f.payload.0 + 8].try_into().ok()?);
                if n > batch {
                    return Some(at);
                }
            }
        }
        at += 1;
    }
    None
}

/// One aligned write that appends a batch.
#[derive(Debug)]
pub struct Planned {
    pub offset: u64,
    /// Whole blocks: the rewritten partial block, the frames, zero padding.
    pub buf: Vec<u8>,
    /// Logical end of the log after this batch.
    pub end: u64,
    pub last_seq: u64,
    pub batch: u64,
}

/// Turns batches of records into aligned writes (sans-IO). Record input is a buffer of
/// `[len u32][kind u8][payload]` entries, as the shard core emits them.
#[derive(Debug, Clone)]
pub struct LogWriter {
    align: usize,
    /// Logical end of what is written and synced.
    end: u64,
    /// Bytes from `align_down(end)` to `end`.
    tail: Vec<u8>,
    next_seq: u64,
    next_batch: u64,
}

impl LogWriter {
    /// A writer for a new, empty segment; `next_seq` and `next_batch` continue the shard's
    /// numbering (both start at 1).
    pub fn new(align: usize, next_seq: u64, next_batch: u64) -> LogWriter {
        LogWriter {
            align: align.max(1),
            end: 0,
            tail: Vec::new(),
            next_seq,
            next_batch,
        }
    }

    /// Logical size of the segment.
    pub fn len(&self) -> u64 {
        self.end
    }

    pub fn is_empty(&self) -> bool {
        self.end == 0
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn next_batch(&self) -> u64 {
        self.next_batch
    }

    /// A writer for the next segment, continuing the numbering.
    pub fn next_segment(&self) -> LogWriter {
        LogWriter::new(self.align, self.next_seq, self.next_batch)
    }

    /// Plan the write of `records` (the core's encoding). Nothing changes until
    /// [`LogWriter::commit`]: a failed write is planned again, byte for byte the same.
    pub fn plan(&self, records: &[u8]) -> Planned {
        let mut buf = Vec::with_capacity(self.tail.len() + records.len() + 64 + self.align);
        buf.extend_from_slice(&self.tail);
        let mut seq = self.next_seq;
        frame(&mut buf, seq, KIND_BATCH, &self.next_batch.to_le_bytes());
        seq += 1;
        let mut at = 0;
        while at + 5 <= records.len() {
            let len = u32::from_le_bytes(records[at..at + 4].try_into().unwrap_or_default());
            let kind = records[at + 4];
            let end = (at + 5 + len as usize).min(records.len());
            frame(&mut buf, seq, kind, &records[at + 5..end]);
            seq += 1;
            at = end;
        }
        let offset = self.end - self.tail.len() as u64;
        let end = offset + buf.len() as u64;
        let padded = buf.len().div_ceil(self.align) * self.align;
        buf.resize(padded, 0);
        Planned {
            offset,
            buf,
            end,
            last_seq: seq - 1,
            batch: self.next_batch,
        }
    }

    /// The planned write is durable.
    pub fn commit(&mut self, p: &Planned) {
        let keep_from = (p.end / self.align as u64) * self.align as u64;
        let a = (keep_from - p.offset) as usize;
        let b = (p.end - p.offset) as usize;
        self.tail = p.buf[a..b].to_vec();
        self.end = p.end;
        self.next_seq = p.last_seq + 1;
        self.next_batch = p.batch + 1;
    }
}

/// A log file as the start-up code and the tests use it (the runtime writes through glommio's
/// DMA files in `crate::shard`, following the same plan/write/sync/commit steps).
pub trait LogFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
}

/// Append `records` durably: plan, write, sync, commit. On error nothing is committed and the
/// same records (plus newer ones) must be written again.
pub fn write_batch<F: LogFile>(
    w: &mut LogWriter,
    f: &mut F,
    records: &[u8],
) -> std::io::Result<u64> {
    let p = w.plan(records);
    f.write_at(p.offset, &p.buf)?;
    f.sync()?;
    w.commit(&p);
    Ok(p.last_seq)
}

impl LogFile for std::fs::File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, data, offset)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }
}

/// Append one core-encoded record entry to `out` (`[len u32][kind u8][payload]`).
pub fn push_record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk that loses what was not synced when it "crashes", and can tear writes: the
    /// fault-injecting file layer for crash-consistency tests.
    #[derive(Default, Clone)]
    struct FaultDisk {
        durable: Vec<u8>,
        /// Written, not yet synced (applied over `durable` in block units at a crash, some
        /// blocks kept and some not: a torn write).
        pending: Vec<(u64, Vec<u8>)>,
        rng: u64,
        /// Percent chance of each fault.
        fail_write: u64,
        short_write: u64,
        fail_sync: u64,
    }

    impl FaultDisk {
        fn roll(&mut self, pct: u64) -> bool {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng % 100 < pct
        }
        fn apply(img: &mut Vec<u8>, off: u64, data: &[u8]) {
            let end = off as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[off as usize..end].copy_from_slice(data);
        }
        /// The image after a power cut: durable data plus a random subset of the unsynced
        /// 512-byte sectors.
        fn crash_image(&mut self) -> Vec<u8> {
            let mut img = self.durable.clone();
            let pending = std::mem::take(&mut self.pending);
            for (off, data) in pending {
                for (i, sector) in data.chunks(512).enumerate() {
                    if self.roll(50) {
                        Self::apply(&mut img, off + (i * 512) as u64, sector);
                    }
                }
            }
            img
        }
    }

    impl LogFile for FaultDisk {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            if self.roll(self.fail_write) {
                return Err(std::io::Error::other("injected write failure"));
            }
            if self.roll(self.short_write) {
                // Part of it reached the cache, then an error (ENOSPC mid-write).
                let n = data.len() / 2;
                self.pending.push((offset, data[..n].to_vec()));
                return Err(std::io::Error::other("injected short write"));
            }
            self.pending.push((offset, data.to_vec()));
            Ok(())
        }
        fn sync(&mut self) -> std::io::Result<()> {
            if self.roll(self.fail_sync) {
                // Linux may drop the dirty pages on a failed fsync: keep a random part.
                let img = self.crash_image();
                self.durable = img;
                return Err(std::io::Error::other("injected fsync failure"));
            }
            for (off, data) in std::mem::take(&mut self.pending) {
                Self::apply(&mut self.durable, off, &data);
            }
            Ok(())
        }
    }

    fn payloads(scan: &Scan, img: &[u8]) -> Vec<Vec<u8>> {
        scan.frames
            .iter()
            .filter(|f| f.kind != KIND_BATCH)
            .map(|f| img[f.payload.0..f.payload.1].to_vec())
            .collect()
    }

    #[test]
    fn frames_round_trip_and_pad_to_blocks() {
        let mut w = LogWriter::new(512, 1, 1);
        let mut disk = FaultDisk::default();
        let mut recs = Vec::new();
        push_record(&mut recs, 7, b"hello");
        push_record(&mut recs, 8, b"");
        write_batch(&mut w, &mut disk, &recs).unwrap();
        assert_eq!(disk.durable.len() % 512, 0);
        let mut recs = Vec::new();
        push_record(&mut recs, 9, &[5u8; 700]);
        write_batch(&mut w, &mut disk, &recs).unwrap();
        let s = scan_segment(&disk.durable, 0, 0);
        assert!(s.damage.is_none(), "{:?}", s.damage);
        assert_eq!(
            payloads(&s, &disk.durable),
            vec![b"hello".to_vec(), vec![], vec![5u8; 700]]
        );
        assert_eq!(s.last_batch, 2);
        assert_eq!(s.last_seq, 5);
    }

    #[test]
    fn torn_tail_is_told_from_corruption() {
        let mut w = LogWriter::new(512, 1, 1);
        let mut disk = FaultDisk::default();
        for i in 0..20u8 {
            let mut recs = Vec::new();
            push_record(&mut recs, 7, &[i; 100]);
            write_batch(&mut w, &mut disk, &recs).unwrap();
        }
        let img = disk.durable.clone();
        let clean = scan_segment(&img, 0, 0);
        let last = clean.frames.last().unwrap().end;
        // Cut mid-record: torn, and no later batch after the damage.
        let cut = &img[..last - 30];
        let s = scan_segment(cut, 0, 0);
        let (at, _) = s.damage.clone().expect("damage seen");
        assert!(later_batch_after(cut, at + 1, s.last_batch).is_none());
        assert_eq!(payloads(&s, cut).len(), 19);
        // A flipped byte in the middle: later batches follow, so it is corruption.
        let mut flipped = img.clone();
        let mid = clean.frames[10].payload.0 + 3;
        flipped[mid] ^= 0x40;
        let s = scan_segment(&flipped, 0, 0);
        let (at, why) = s.damage.clone().expect("damage seen");
        assert_eq!(why, "checksum mismatch");
        assert!(later_batch_after(&flipped, at + 1, s.last_batch).is_some());
    }

    /// Crash consistency under injected faults: every batch reported durable survives a
    /// crash at any point, in order; the damage a crash leaves is always a torn tail.
    #[test]
    fn crash_consistency_under_injected_faults() {
        for seed in 1..400u64 {
            let mut disk = FaultDisk {
                rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                fail_write: 10,
                short_write: 10,
                fail_sync: 10,
                ..FaultDisk::default()
            };
            let mut w = LogWriter::new(512, 1, 1);
            let mut acked: Vec<Vec<u8>> = Vec::new();
            let mut pending: Vec<Vec<u8>> = Vec::new();
            let mut next = 0u32;
            let steps = 5 + seed % 40;
            for _ in 0..steps {
                for _ in 0..(1 + next % 4) {
                    let len = (next as usize * 37) % 900;
                    let mut p = next.to_le_bytes().to_vec();
                    p.resize(4 + len, (next % 251) as u8);
                    pending.push(p);
                    next += 1;
                }
                let mut recs = Vec::new();
                for p in &pending {
                    push_record(&mut recs, 7, p);
                }
                if write_batch(&mut w, &mut disk, &recs).is_ok() {
                    acked.append(&mut pending);
                }
            }
            let img = disk.crash_image();
            let s = scan_segment(&img, 0, 0);
            if let Some((at, why)) = &s.damage {
                assert!(
                    later_batch_after(&img, at + 1, s.last_batch).is_none(),
                    "seed {seed}: damage at {at} ({why}) classified as corruption"
                );
            }
            let got = payloads(&s, &img);
            assert!(
                got.len() >= acked.len(),
                "seed {seed}: {} of {} durable records survived",
                got.len(),
                acked.len()
            );
            assert_eq!(&got[..acked.len()], &acked[..], "seed {seed}");
        }
    }
}
