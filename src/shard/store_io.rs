//! The shard's log writer: the glommio task that makes the core's records durable.
//!
//! Owns: one shard's live log files (segments under `gen-N/shard-K/`, through glommio's DMA
//! file API: no blocking file I/O on the shard), group commit (everything the core produced
//! since the last write goes out as one aligned write and one fdatasync, then one
//! `handle_durable` releases every acknowledgement that waited for it), segment rotation,
//! what a failing disk does (keep the records, log once, retry with a back-off; the core
//! keeps acknowledgements held meanwhile, and bounds what it makes), the log's figures
//! (fdatasync latency, bytes written, failed writes, failing now: `ShardCounters::store_*`),
//! and sealing for runtime compaction (a segment that holds records is sealed once per
//! `autosave_interval` by moving to the next one; the seal is published on the `SealBoard`
//! for the compactor thread, see `crate::store::compact`). Must not touch: what is recorded
//! (the core) or the format (`crate::store::log` plans every write; this task only carries
//! the plan out).

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::io::{Directory, DmaFile};
use tracing::{debug, warn};

use super::driver::Shard;
use super::notify::Notify;
use crate::config::SyncMode;
use crate::store::compact::SealBoard;
use crate::store::{self, LogWriter};

/// Wait between retries of a failed write.
const RETRY: Duration = Duration::from_millis(200);

/// The driver's side of one shard's log.
pub(crate) struct StoreIo {
    pub dir: PathBuf,
    pub sync: SyncMode,
    /// `persistence_sync batch`: how long a batch may wait to grow.
    pub batch_delay: Duration,
    pub wake: Notify,
    /// Nothing taken from the core is unwritten.
    pub idle: Cell<bool>,
    pub batches: Cell<u64>,
    pub bytes: Cell<u64>,
    /// Runtime compaction: where seals are published, and how often a segment is sealed.
    pub seal: Option<(Arc<SealBoard>, Duration)>,
    /// The seal ticker fired: seal the segment at the next chance.
    pub seal_due: Cell<bool>,
}

impl StoreIo {
    pub fn new(dir: PathBuf, sync: SyncMode, batch_delay: Duration) -> StoreIo {
        StoreIo {
            dir,
            sync,
            batch_delay,
            wake: Notify::default(),
            idle: Cell::new(true),
            batches: Cell::new(0),
            bytes: Cell::new(0),
            seal: None,
            seal_due: Cell::new(false),
        }
    }

    pub fn with_seal(mut self, seal: Option<(Arc<SealBoard>, Duration)>) -> StoreIo {
        self.seal = seal;
        self
    }
}

/// One timer per seal interval (not per batch): marks the seal due and wakes the writer.
async fn seal_ticker(shard: Rc<Shard>, every: Duration) {
    let Some(io) = shard.store.as_ref() else {
        return;
    };
    while !shard.stopping.get() {
        glommio::timer::sleep(every).await;
        io.seal_due.set(true);
        io.wake.notify();
    }
}

async fn open_segment(dir: &Directory, path: &std::path::Path) -> glommio::Result<DmaFile, ()> {
    // Read and write: glommio probes a new device for the poll ring with a read of the first
    // file it opens there; on a write-only file that read fails with EBADF and glommio logs
    // an alarming "unexpected error" at start-up.
    let f = glommio::io::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .dma_open(path)
        .await?;
    // The new file's directory entry must be durable before its records count.
    dir.sync().await?;
    Ok(f)
}

/// Close the current segment (its last batch is synced) and move on to the next one.
async fn next_segment(file: &mut Option<DmaFile>, seg: &mut u64, w: &mut LogWriter) {
    if let Some(f) = file.take() {
        if let Err(e) = f.close().await {
            debug!("persistence: closing a segment: {e}");
        }
    }
    *seg += 1;
    *w = w.next_segment();
}

/// Write the core's records until the shard stops.
pub(crate) async fn store_task(shard: Rc<Shard>) {
    let Some(io) = shard.store.as_ref() else {
        return;
    };
    let dir = match Directory::open(&io.dir).await {
        Ok(d) => d,
        Err(e) => {
            warn!(
                shard = shard.id,
                "persistence: cannot open {}: {e}",
                io.dir.display()
            );
            return;
        }
    };
    let mut seg = 1u64;
    let mut file: Option<DmaFile> = None;
    let mut w = LogWriter::new(4096, 1, 1);
    let mut pending: Vec<u8> = Vec::new();
    let mut upto = 0u64;
    let mut failing = false;
    // Runtime compaction: the record clock when the batch being written was taken (its seal
    // horizon), and how many records the board has been told of.
    let mut clock: u64;
    let mut counted = 0u64;
    if let Some((_, every)) = &io.seal {
        glommio::spawn_local(seal_ticker(shard.clone(), *every)).detach();
    }
    loop {
        if pending.is_empty() {
            io.idle.set(true);
            while !shard.core.borrow().store_pending() && !io.seal_due.get() {
                io.wake.notified().await;
            }
            if !shard.core.borrow().store_pending() {
                // Idle at a seal tick: everything taken is written, nothing is waiting, so
                // the clock's next value is a horizon no later record can be at or below.
                io.seal_due.set(false);
                if !w.is_empty() {
                    next_segment(&mut file, &mut seg, &mut w).await;
                }
                if let Some((board, _)) = &io.seal {
                    let h = shard.core.borrow_mut().store_horizon(Instant::now());
                    board.publish(shard.id, seg, h);
                }
                continue;
            }
            io.idle.set(false);
            if io.sync == SyncMode::Batch && !io.batch_delay.is_zero() {
                glommio::timer::sleep(io.batch_delay).await;
            }
        }
        upto = upto.max(shard.core.borrow_mut().take_store_output(&mut pending));
        clock = shard.core.borrow().store_clock();
        let result = async {
            if file.is_none() {
                let path = io.dir.join(store::segment_name(seg));
                let f = open_segment(&dir, &path).await?;
                w = LogWriter::new(
                    f.alignment().max(512) as usize,
                    w.next_seq(),
                    w.next_batch(),
                );
                file = Some(f);
            }
            let f = file.as_ref().expect("opened above");
            let plan = w.plan(&pending);
            let mut buf = f.alloc_dma_buffer(plan.buf.len());
            buf.as_bytes_mut().copy_from_slice(&plan.buf);
            let mut n = f.write_at(buf, plan.offset).await?;
            // A filesystem that runs out of space mid-write returns a short count, not the
            // error: write the aligned rest once more so the error the operator reads is the
            // kernel's ("No space left on device"), not a byte count.
            let align = f.alignment().max(512) as usize;
            if n > 0 && n < plan.buf.len() && n % align == 0 {
                let rest = &plan.buf[n..];
                let mut buf = f.alloc_dma_buffer(rest.len());
                buf.as_bytes_mut().copy_from_slice(rest);
                n += f.write_at(buf, plan.offset + n as u64).await?;
            }
            if n < plan.buf.len() {
                return Err(glommio::GlommioError::IoError(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!(
                        "short write ({n} of {} bytes; is the filesystem full?)",
                        plan.buf.len()
                    ),
                )));
            }
            if io.sync != SyncMode::None {
                let t = Instant::now();
                f.fdatasync().await?;
                shard
                    .counters()
                    .store_fsync
                    .0
                    .observe_ns(t.elapsed().as_nanos() as u64);
            }
            Ok(plan)
        }
        .await;
        match result {
            Ok(plan) => {
                w.commit(&plan);
                io.batches.set(io.batches.get() + 1);
                io.bytes.set(io.bytes.get() + pending.len() as u64);
                shard
                    .counters()
                    .store_written_bytes
                    .add(pending.len() as u64);
                pending.clear();
                if failing {
                    failing = false;
                    shard.counters().store_failing.set(0);
                    warn!(
                        shard = shard.id,
                        "persistence: writing to {} again",
                        io.dir.display()
                    );
                }
                shard.core.borrow_mut().handle_durable(upto, Instant::now());
                shard.after_input();
                if let Some((board, _)) = &io.seal {
                    board.written[shard.id].fetch_add(upto - counted, Ordering::Relaxed);
                    counted = upto;
                }
                let seal = io.seal.is_some() && io.seal_due.replace(false);
                if w.len() >= store::SEGMENT_BYTES || seal {
                    next_segment(&mut file, &mut seg, &mut w).await;
                    // Every record taken up to `clock` is in the segments below `seg`.
                    if let Some((board, _)) = &io.seal {
                        board.publish(shard.id, seg, clock);
                    }
                }
            }
            Err(e) => {
                shard.counters().store_write_errors.inc();
                if !failing {
                    failing = true;
                    shard.counters().store_failing.set(1);
                    // Once per outage, not per retry.
                    warn!(
                        shard = shard.id,
                        "persistence: cannot write to {}: {e}. Acknowledgements of QoS 1/2 \
                         messages, subscriptions and persistent sessions are held until \
                         writes succeed (QoS 0 keeps flowing); retrying",
                        io.dir.display()
                    );
                }
                shard.core.borrow_mut().handle_store_failed(Instant::now());
                shard.after_input();
                if file.is_some() && w.is_empty() {
                    // A segment that never got a record may not exist on disk: reopen it.
                    file = None;
                }
                glommio::timer::sleep(RETRY).await;
            }
        }
    }
}
