//! Live reload of the route table: on a file change, SIGHUP or `POST /reload`, the file is
//! loaded and validated off the request path, then swapped in atomically. A file that fails
//! keeps the old table serving and records the error for the admin API.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::health::spawn_checkers;
use crate::state::{ActiveTable, ReloadFailure, Shared};

/// How long file events must pause before the file is read.
const SETTLE: Duration = Duration::from_millis(50);

/// What a reload attempt did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum ReloadOutcome {
    /// A new table is active.
    Ok { version: String },
    /// The file parsed to the table already active.
    Unchanged { version: String },
    /// The file is invalid; the previous table stays active.
    Error { errors: Vec<String> },
}

/// One reload attempt, for the console's reload history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadRecord {
    pub at: String,
    /// `start`, `file`, `sighup` or `admin`.
    pub trigger: String,
    #[serde(flatten)]
    pub outcome: ReloadOutcome,
}

/// The last reload attempts, newest last.
#[derive(Default)]
pub struct ReloadLog {
    records: Mutex<std::collections::VecDeque<ReloadRecord>>,
}

impl ReloadLog {
    /// Attempts kept.
    pub const KEEP: usize = 20;

    pub fn record(&self, trigger: &str, outcome: ReloadOutcome) {
        let mut records = self.records.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if records.len() == Self::KEEP {
            records.pop_front();
        }
        records.push_back(ReloadRecord {
            at: now_rfc3339(),
            trigger: trigger.to_string(),
            outcome,
        });
    }

    pub fn records(&self) -> Vec<ReloadRecord> {
        let records = self.records.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        records.iter().cloned().collect()
    }
}

/// Reloads the route table; cheap to clone and safe to call from any task.
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
    /// Serializes reloads so two triggers never race to swap.
    lock: Arc<Mutex<()>>,
}

impl Reloader {
    pub fn new(shared: Arc<Shared>) -> Reloader {
        Reloader { shared, lock: Arc::new(Mutex::new(())) }
    }

    /// Reloads the route file now. `trigger` names the cause, for logs and metrics.
    ///
    /// Runs blocking file and DNS I/O: call it from a blocking-tolerant context.
    pub fn reload(&self, trigger: &str) -> ReloadOutcome {
        let _serialized = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let shared = &self.shared;
        let current = shared.active.load_full();
        let outcome = match ActiveTable::load(
            &shared.routes_path,
            Some(&current),
            &shared.ramps,
            &shared.metrics,
        ) {
            Ok(next) if next.table.version == current.table.version => {
                // A file put back as it was is valid again: the old error no longer applies.
                *lock_failure(shared) = None;
                ReloadOutcome::Unchanged { version: next.table.version }
            }
            Ok(next) => {
                let version = next.table.version.clone();
                let next = Arc::new(next);
                spawn_checkers(&next, shared);
                shared.metrics.prime(&next.table);
                shared.active.store(next);
                *lock_failure(shared) = None;
                tracing::info!(
                    trigger,
                    version,
                    routes = shared.active.load().table.routes.len(),
                    "route table reloaded"
                );
                ReloadOutcome::Ok { version }
            }
            Err(e) => {
                let errors = e.messages();
                for error in &errors {
                    tracing::error!(
                        trigger,
                        error,
                        "route file rejected; the previous table stays active"
                    );
                }
                *lock_failure(shared) =
                    Some(ReloadFailure { at: now_rfc3339(), errors: errors.clone() });
                ReloadOutcome::Error { errors }
            }
        };
        let result = match &outcome {
            ReloadOutcome::Ok { .. } => "ok",
            ReloadOutcome::Unchanged { .. } => "unchanged",
            ReloadOutcome::Error { .. } => "error",
        };
        shared.metrics.reloads.with_label_values(&[trigger, result]).inc();
        shared.reload_log.record(trigger, outcome.clone());
        outcome
    }

    /// Reloads on a blocking thread, for async callers.
    pub async fn reload_async(&self, trigger: &'static str) -> ReloadOutcome {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.reload(trigger)).await {
            Ok(outcome) => outcome,
            Err(e) => ReloadOutcome::Error { errors: vec![format!("reload task failed: {e}")] },
        }
    }
}

fn lock_failure(shared: &Shared) -> std::sync::MutexGuard<'_, Option<ReloadFailure>> {
    shared.last_failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The current time as RFC 3339, UTC, to the millisecond.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Changes to the route file, seen from the moment this is made: made before the file is
/// first read, so that a change between that read and the reload service's start is not
/// missed (it waits in the channel).
///
/// The file's directory is watched, not the file, so that editors that write a new file and
/// rename it, and Kubernetes' atomic swap of a ConfigMap's `..data` symlink, are both seen.
pub struct FileChanges {
    _watcher: RecommendedWatcher,
    changes: tokio::sync::mpsc::Receiver<()>,
}

impl FileChanges {
    /// Starts watching `path`; `None` (logged) when the system cannot watch it.
    pub fn watch(path: &Path) -> Option<FileChanges> {
        let (tx, changes) = tokio::sync::mpsc::channel::<()>(1);
        watch_file(path, tx).map(|watcher| FileChanges { _watcher: watcher, changes })
    }
}

/// Background service: reloads on SIGHUP and on changes to the route file.
pub struct ReloadTriggers {
    pub reloader: Reloader,
    /// Taken when the service starts.
    pub changes: Mutex<Option<FileChanges>>,
}

#[async_trait]
impl BackgroundService for ReloadTriggers {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        spawn_checkers(&self.reloader.shared.active.load(), &self.reloader.shared);
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload by file change or admin API");
                None
            }
        };
        let taken = self.changes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        let (_watcher, mut changes) = match taken {
            Some(FileChanges { _watcher, changes }) => (Some(_watcher), Some(changes)),
            None => (None, None),
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { match hangup.as_mut() { Some(s) => s.recv().await, None => None } } => {
                    self.reloader.reload_async("sighup").await;
                }
                Some(()) = async { match changes.as_mut() { Some(c) => c.recv().await, None => None } } => {
                    // Let a burst of writes (an editor saving, a ConfigMap swap) settle first.
                    tokio::time::sleep(SETTLE).await;
                    if let Some(changes) = changes.as_mut() {
                        while changes.try_recv().is_ok() {}
                    }
                    self.reloader.reload_async("file").await;
                }
            }
        }
    }
}

/// Watches the directory of `path`, sending a unit whenever the route file may have changed:
/// an event names the file itself, or `..data` (the symlink Kubernetes swaps to update a
/// mounted ConfigMap). Other files in the directory are ignored.
fn watch_file(path: &Path, tx: tokio::sync::mpsc::Sender<()>) -> Option<RecommendedWatcher> {
    let dir: PathBuf = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().map(|name| name.to_os_string());
    let handler = move |result: notify::Result<notify::Event>| match result {
        Ok(event) if event.kind.is_access() => {}
        Ok(event) => {
            let relevant = event.paths.iter().any(|changed| {
                let name = changed.file_name();
                name == file_name.as_deref() || name == Some(OsStr::new("..data"))
            });
            // A full channel already holds a pending reload, which will read the latest file.
            if relevant {
                let _ = tx.try_send(());
            }
        }
        Err(e) => tracing::warn!(error = %e, "route file watch error"),
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the route file; reload with SIGHUP or POST /reload");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::error!(dir = %dir.display(), error = %e, "cannot watch the route file's directory");
        return None;
    }
    tracing::info!(dir = %dir.display(), "watching the route file for changes");
    Some(watcher)
}
