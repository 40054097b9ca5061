//! What the broker keeps on disk: the retained messages and the persistent sessions, in one
//! append-only file (`broker-state.log`) written by a thread of its own.
//!
//! - Every change of a retained message (set or cleared), and of a persistent session (see
//!   `router::journal`), is appended in the order the router applied it, and gets a sequence
//!   number.
//! - Group commit: at most one `fdatasync` per commit window (`sync`). A change after a quiet
//!   spell is written at once; changes that come within the window are gathered and written
//!   together when it ends, or as soon as 16 are waiting. The writer then says which sequence
//!   number is on disk, and a QoS 1/2 PUBLISH that changed a retained message or was queued
//!   for a persistent session is acknowledged only then.
//! - Nothing arrives while the bus is idle, so nothing is written.
//! - Compaction: once the file holds more than twice the live state (and at least 4 MiB
//!   more), it is rewritten with the live state only, to a new file renamed over the old
//!   one. The live state is read from the router, so it costs no second copy in memory.
//! - Start: the file is read before the listeners accept anyone. A record with a bad
//!   checksum is skipped and counted, never a reason to refuse to start; a file with skipped
//!   bytes is rewritten clean.

mod log;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use crate::router::journal::{Change, Journal};
use crate::stats::Stats;
pub(crate) use log::{Loaded, Record};

/// The file, in the persistence directory.
pub(crate) const FILE: &str = "broker-state.log";
/// Its name before it held sessions too; taken over when found.
const OLD_FILE: &str = "retained.log";

/// Changes waiting that are written without waiting for the rest of the window.
const BATCH_RECORDS: usize = 16;
/// Bytes waiting that are written without waiting for the rest of the window.
const BATCH_BYTES: usize = 64 * 1024;
/// Bytes the file may hold beyond twice the live messages before it is compacted.
const COMPACT_SLACK: u64 = 4 * 1024 * 1024;

/// What a restart found, for the one log line that says it.
#[derive(Debug)]
pub(crate) struct Restored {
    /// The file read.
    pub path: PathBuf,
    /// What reading it found: the live retained messages and sessions.
    pub loaded: Loaded,
    /// How long reading took.
    pub took: Duration,
}

/// The writer's handle: appends, and the sequence number on disk.
pub(crate) struct Store {
    tx: mpsc::Sender<(u64, Record)>,
    next: AtomicU64,
    committed: watch::Receiver<u64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("next", &self.next.load(Relaxed))
            .field("committed", &*self.committed.borrow())
            .finish()
    }
}

/// The live state, read from the router when the writer compacts.
pub(crate) trait Live: Send {
    /// About how many bytes its records take.
    fn bytes(&self) -> u64;
    /// The records that rebuild it.
    fn records(&self) -> Vec<Record>;
}

/// The writer, made by [`Store::open`] and started once what was read is back in the router.
pub(crate) struct Starter {
    writer: Writer,
    /// The file had damage: it is rewritten (from the router) before anything else.
    rewrite: bool,
}

impl Starter {
    /// Starts the writer thread; `live` reads the router's state when it compacts.
    pub fn start(mut self, live: Box<dyn Live>) -> std::io::Result<()> {
        self.writer.live = Some(live);
        if self.rewrite {
            // Before anyone connects, so the next start finds a clean file.
            if let Err(e) = self.writer.compact() {
                tracing::warn!(file = %self.writer.path.display(), error = %e, "cannot rewrite the damaged file; it is read the same way next time");
            }
        }
        std::thread::Builder::new()
            .name("edgebus-store".into())
            .spawn(move || self.writer.run())?;
        Ok(())
    }
}

impl Store {
    /// Reads `dir/broker-state.log` (creating `dir` when missing). The writer, which commits
    /// every `window`, is started by the [`Starter`] once what was read is in the router;
    /// changes appended meanwhile wait for it.
    pub fn open(
        dir: &Path,
        window: Duration,
        stats: Arc<Stats>,
    ) -> std::io::Result<(Store, Restored, Starter)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE);
        let old = dir.join(OLD_FILE);
        if !path.exists() && old.exists() {
            std::fs::rename(&old, &path)?;
        }
        let t0 = Instant::now();
        let loaded = log::load(&path)?;
        // A new file starts with its magic line.
        let file_bytes = if loaded.file_bytes == 0 {
            log::write_file(&path, std::iter::empty())?
        } else {
            loaded.file_bytes
        };
        let took = t0.elapsed();
        let file = OpenOptions::new().append(true).open(&path)?;
        let (tx, rx) = mpsc::channel();
        let (done, committed) = watch::channel(0);
        let writer = Writer {
            path: path.clone(),
            file,
            file_bytes,
            window,
            rx,
            done,
            live: None,
            stats,
        };
        let store = Store {
            tx,
            next: AtomicU64::new(1),
            committed,
        };
        let starter = Starter {
            writer,
            rewrite: loaded.skipped_bytes > 0,
        };
        Ok((store, Restored { path, loaded, took }, starter))
    }

    /// Appends a change; returns its sequence number. The caller holds the lock that
    /// ordered the change, so the file's order is the router's.
    pub fn append(&self, record: Record) -> u64 {
        let seq = self.next.fetch_add(1, Relaxed);
        // The writer only stops when the broker does.
        let _ = self.tx.send((seq, record));
        seq
    }

    /// The highest sequence number on disk, and its changes.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Waits (at most `timeout`) until everything appended is on disk: a clean stop loses
    /// nothing, QoS 0 changes included.
    pub fn flush(&self, timeout: Duration) {
        let want = self.next.load(Relaxed).saturating_sub(1);
        let deadline = Instant::now() + timeout;
        while *self.committed.borrow() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

struct Writer {
    path: PathBuf,
    file: File,
    file_bytes: u64,
    window: Duration,
    rx: mpsc::Receiver<(u64, Record)>,
    done: watch::Sender<u64>,
    live: Option<Box<dyn Live>>,
    stats: Arc<Stats>,
}

impl Writer {
    fn run(mut self) {
        let mut buf = Vec::new();
        // So that the first change is written at once.
        let mut last_commit = Instant::now().checked_sub(self.window);
        // Blocks while nothing changes: an idle bus writes nothing.
        while let Ok((mut last, first)) = self.rx.recv() {
            first.encode(&mut buf);
            let mut pending = 1;
            // At most one fdatasync per window: a change after a quiet spell is written at
            // once, changes within the window are gathered, and 16 waiting are written early.
            let due = last_commit.map_or_else(Instant::now, |t| t + self.window);
            while pending < BATCH_RECORDS && buf.len() < BATCH_BYTES {
                let left = due.saturating_duration_since(Instant::now());
                let next = if left.is_zero() {
                    self.rx.try_recv().ok()
                } else {
                    self.rx.recv_timeout(left).ok()
                };
                let Some((seq, r)) = next else { break };
                r.encode(&mut buf);
                last = seq;
                pending += 1;
            }
            if let Err(e) = self.commit(&buf) {
                // Acknowledgements keep waiting: a broker that cannot write says so, and
                // does not pretend.
                tracing::error!(file = %self.path.display(), error = %e, "cannot write the state file; acknowledgements wait");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            last_commit = Some(Instant::now());
            buf.clear();
            if buf.capacity() > 1 << 20 {
                buf = Vec::new();
            }
            let _ = self.done.send(last);
            if let Err(e) = self.compact_if_due() {
                tracing::warn!(file = %self.path.display(), error = %e, "compaction failed; the file keeps growing until the next try");
            }
        }
    }

    fn commit(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.file.write_all(buf)?;
        self.file.sync_data()?;
        self.file_bytes += buf.len() as u64;
        self.stats
            .persisted_bytes
            .fetch_add(buf.len() as u64, Relaxed);
        Ok(())
    }

    /// Rewrites the file with the live state once it holds more than twice it.
    fn compact_if_due(&mut self) -> std::io::Result<()> {
        // Below the slack nothing is due, whatever is live: the router is not asked.
        if self.file_bytes <= COMPACT_SLACK {
            return Ok(());
        }
        let live = self.live.as_ref().map_or(0, |l| l.bytes());
        if self.file_bytes <= 2 * live + COMPACT_SLACK {
            return Ok(());
        }
        self.compact()
    }

    /// Rewrites the file with the live state. Every change the router applied before the
    /// snapshot is in it; changes after it are appended to the new file, in order (each
    /// record states a result, not a step, so one that is already in the snapshot changes
    /// nothing when it is replayed after it).
    fn compact(&mut self) -> std::io::Result<()> {
        let t0 = Instant::now();
        let records = self.live.as_ref().map(|l| l.records()).unwrap_or_default();
        let before = self.file_bytes;
        self.file_bytes = log::write_file(&self.path, records.iter())?;
        self.stats
            .persisted_bytes
            .fetch_add(self.file_bytes, Relaxed);
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        tracing::info!(
            file = %self.path.display(),
            before,
            after = self.file_bytes,
            records = records.len(),
            took_ms = t0.elapsed().as_millis() as u64,
            "state file compacted"
        );
        Ok(())
    }
}

impl Journal for Store {
    fn record(&self, key: &Arc<str>, change: Change) -> u64 {
        self.append(Record::Session(key.clone(), change))
    }
}

/// The topic of a clear record.
pub(crate) fn clear(topic: &Bytes) -> Record {
    Record::Clear(topic.clone())
}
