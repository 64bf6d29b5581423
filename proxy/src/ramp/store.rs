//! Where ramp states are kept between restarts: a JSON file, written whole and renamed into
//! place, so a crash never leaves half a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::evaluate::State;

/// The ramp states of every route, by route name.
pub type States = BTreeMap<String, State>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read ramp state {path}")]
    Read { path: String, source: std::io::Error },
    #[error("ramp state {path} is not valid JSON: {message}")]
    Garbled { path: String, message: String },
    #[error("cannot write ramp state {path}")]
    Write { path: String, source: std::io::Error },
}

/// A state file.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: PathBuf) -> FileStore {
        FileStore { path }
    }

    /// The default place: beside the route file, `routes.toml` -> `routes.state.json`.
    pub fn beside(routes: &Path) -> FileStore {
        let stem = routes.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        FileStore::new(routes.with_file_name(format!("{stem}.state.json")))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The states saved last; none when there is no file yet.
    pub fn load(&self) -> Result<States, StoreError> {
        let path = self.path.display().to_string();
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Garbled { path, message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(States::new()),
            Err(source) => Err(StoreError::Read { path, source }),
        }
    }

    pub fn save(&self, states: &States) -> Result<(), StoreError> {
        let write = || -> std::io::Result<()> {
            let temporary = self.path.with_extension("json.tmp");
            let bytes = serde_json::to_vec_pretty(states).map_err(std::io::Error::other)?;
            std::fs::write(&temporary, bytes)?;
            std::fs::rename(&temporary, &self.path)
        };
        write()
            .map_err(|source| StoreError::Write { path: self.path.display().to_string(), source })
    }
}
