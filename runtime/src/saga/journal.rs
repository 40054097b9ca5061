//! Where a run's transitions are made durable before it acts on them: the [`Journal`]
//! trait, and [`FileJournal`], an append-only file compacted in place.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::state::Transition;

/// Where transitions are made durable before a run acts on them.
pub trait Journal: Send + Sync {
    /// Records `t` (durably, for a journal that claims durability) before returning.
    fn record(&self, t: &Transition) -> std::io::Result<()>;
}

/// Why a run could not go on (the journal failed): the run stops where it is, to be resumed.
#[derive(Debug, thiserror::Error)]
#[error("saga journal: {0}")]
pub struct JournalError(#[from] pub std::io::Error);

/// An append-only journal file: one JSON transition per line, `fdatasync` after each, and
/// compacted (finished runs dropped, by a write to a new file and a rename) once it passes
/// `max_bytes`, so it stays small on flash.
#[derive(Debug)]
pub struct FileJournal {
    path: PathBuf,
    max_bytes: u64,
    inner: Mutex<JournalFile>,
}

#[derive(Debug)]
struct JournalFile {
    file: std::fs::File,
    bytes: u64,
    written: u64,
    /// Transitions of runs not yet ended, by run, in order.
    open: std::collections::BTreeMap<String, Vec<String>>,
}

impl FileJournal {
    /// Opens (or creates) the journal at `path` and returns it with the transitions of every
    /// run that has not ended, grouped by run in the order they were written. A torn last line
    /// (a crash mid-write) is dropped.
    pub fn open(
        path: impl AsRef<Path>,
        max_bytes: u64,
    ) -> std::io::Result<(FileJournal, Vec<Vec<Transition>>)> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut open: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let mut order: Vec<String> = Vec::new();
        // Whether the file holds anything to drop (finished runs, a torn line).
        let mut stale = false;
        if let Ok(f) = std::fs::File::open(&path) {
            for line in std::io::BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                let Ok(t) = serde_json::from_str::<Transition>(&line) else {
                    tracing::warn!(path = %path.display(), "saga journal: a torn or unreadable line dropped");
                    stale = true;
                    continue;
                };
                let run = t.run().to_owned();
                if matches!(t, Transition::End { .. }) {
                    open.remove(&run);
                    stale = true;
                    continue;
                }
                if !open.contains_key(&run) {
                    order.push(run.clone());
                }
                open.entry(run).or_default().push(line);
            }
        }
        let pending: Vec<Vec<Transition>> = order
            .iter()
            .filter_map(|r| open.get(r))
            .map(|lines| {
                lines
                    .iter()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect()
            })
            .collect();
        // Rewritten (a flash write) only when something is to be dropped.
        let file = if stale || !path.exists() {
            write_compacted(&path, &open)?
        } else {
            std::fs::OpenOptions::new().append(true).open(&path)?
        };
        let bytes = file.metadata()?.len();
        let j = FileJournal {
            path,
            max_bytes: max_bytes.max(4096),
            inner: Mutex::new(JournalFile {
                file,
                bytes,
                written: 0,
                open,
            }),
        };
        Ok((j, pending))
    }

    /// Bytes written since the journal was opened (compactions included).
    pub fn bytes_written(&self) -> u64 {
        self.lock().written
    }

    /// The current size of the file.
    pub fn size(&self) -> u64 {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JournalFile> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn write_compacted(
    path: &Path,
    open: &std::collections::BTreeMap<String, Vec<String>>,
) -> std::io::Result<std::fs::File> {
    let tmp = path.with_extension("compact");
    {
        let mut f = std::fs::File::create(&tmp)?;
        let mut buf = Vec::new();
        for line in open.values().flatten() {
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
        }
        f.write_all(&buf)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    std::fs::OpenOptions::new().append(true).open(path)
}

impl Journal for FileJournal {
    fn record(&self, t: &Transition) -> std::io::Result<()> {
        let line = serde_json::to_string(t).map_err(std::io::Error::other)?;
        let mut j = self.lock();
        let mut buf = line.clone().into_bytes();
        buf.push(b'\n');
        j.file.write_all(&buf)?;
        j.file.sync_data()?;
        j.bytes += buf.len() as u64;
        j.written += buf.len() as u64;
        let run = t.run().to_owned();
        if matches!(t, Transition::End { .. }) {
            j.open.remove(&run);
        } else {
            j.open.entry(run).or_default().push(line);
        }
        if j.bytes > self.max_bytes {
            let file = write_compacted(&self.path, &j.open)?;
            j.bytes = file.metadata()?.len();
            j.written += j.bytes;
            j.file = file;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::random_u64;
    use crate::saga::{RunState, RunStatus, Saga, Step, StepStatus};
    use crate::wire::timestamp;
    use serde_json::{json, Value};

    #[test]
    fn the_journal_keeps_open_runs_across_reopen_and_compacts() {
        let dir = std::env::temp_dir().join(format!("edgebus-journal-{}", random_u64()));
        let path = dir.join("sagas.log");
        let saga = Saga::new("s").step(Step::call("a", "t/a/request"));
        {
            let (j, pending) = FileJournal::open(&path, 4096).expect("open");
            assert!(pending.is_empty());
            for n in 0..100 {
                let run = format!("r{n}");
                j.record(&saga.start_transition(run.clone(), json!({"n": n}), Value::Null))
                    .expect("start");
                j.record(&Transition::StepStarted {
                    run: run.clone(),
                    step: 0,
                    attempt: 1,
                })
                .expect("step");
                if n != 42 {
                    j.record(&Transition::End {
                        run,
                        status: RunStatus::Completed,
                        at: timestamp(),
                    })
                    .expect("end");
                }
            }
            assert!(j.size() <= 4096 + 512, "compacted: {}", j.size());
        }
        // A torn line at the end, as after a crash mid-write.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("append");
        f.write_all(b"{\"t\":\"step_do").expect("torn");
        drop(f);
        let (_, pending) = FileJournal::open(&path, 4096).expect("reopen");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].len(), 2);
        let mut state = RunState::from_start(&pending[0][0], &saga).expect("start");
        state.apply(&pending[0][1]);
        assert_eq!(state.run_id, "r42");
        assert_eq!(state.steps[0].state, StepStatus::Running);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
