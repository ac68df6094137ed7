//! Watch step for local mode: reads the mesh file and the OpenAPI documents it names,
//! and reads them again whenever one changes on disk (editors that write in place and
//! those that rename over it alike). It must not decide anything about the content
//! beyond parsing the mesh file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::SourceEvent;
use super::mesh_file;
use crate::model::MeshState;

/// Quiet time after the last change notification before files are read.
const SETTLE: Duration = Duration::from_millis(20);
const MAX_SETTLE: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
}

/// What was read last time, to skip work when nothing changed.
struct Read {
    mesh: Vec<u8>,
    /// The mesh file parsed, when it parsed: reused while its bytes are unchanged.
    parsed: Option<MeshState>,
    specs: BTreeMap<String, Result<Arc<[u8]>, String>>,
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileSource { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn run(self, events: mpsc::Sender<SourceEvent>) {
        let (tick_tx, mut tick_rx) = mpsc::channel::<()>(1);
        // Watch directories, not files: an editor's rename-over replaces the inode, which
        // would silently end a watch on the file itself. Any event in a watched
        // directory triggers a re-read; unchanged bytes are then skipped.
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Opening or reading a file (our own reads included) changes nothing; only
            // writes, creations, renames and removals call for a re-read.
            if matches!(&res, Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_))) {
                return;
            }
            // A full channel already holds a pending re-read: dropping is correct.
            let _ = tick_tx.try_send(());
        })
        .map_err(|e| tracing::warn!("cannot watch files for changes ({e}); re-reading every 2 s instead"))
        .ok();
        let mut watched = BTreeSet::new();
        let poll = if watcher.is_some() { Duration::from_secs(3600) } else { Duration::from_secs(2) };
        watch_dir(&mut watcher, &mut watched, dir_of(&self.path));

        let mut last: Option<Read> = None;
        loop {
            if let Some(event) = self.read(&mut last).await {
                if let SourceEvent::Updated(mesh) = &event {
                    for origin in mesh.specs.keys() {
                        watch_dir(&mut watcher, &mut watched, dir_of(Path::new(origin)));
                    }
                }
                if events.send(event).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                t = tick_rx.recv() => if t.is_none() { return },
                () = tokio::time::sleep(poll) => {}
                () = events.closed() => return,
            }
            // Let a writer finish: read once notifications have been quiet for SETTLE
            // (but no later than MAX_SETTLE), not halfway through an in-place rewrite.
            let settle_until = tokio::time::Instant::now() + MAX_SETTLE;
            loop {
                tokio::select! {
                    t = tick_rx.recv() => if t.is_none() { return },
                    () = tokio::time::sleep(SETTLE) => break,
                    () = tokio::time::sleep_until(settle_until) => break,
                }
            }
        }
    }

    /// Reads everything; returns the event to send, or None when nothing changed.
    async fn read(&self, last: &mut Option<Read>) -> Option<SourceEvent> {
        let mesh = match tokio::fs::read(&self.path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                *last = None;
                return Some(SourceEvent::Failed(format!(
                    "reading mesh file {}: {e}; check the path and permissions (keeping the last good state)",
                    self.path.display()
                )));
            }
        };
        if mesh.is_empty() {
            // Usually a writer that truncated and has not written yet; an intended empty
            // mesh is spelled `services: []`. Never publish it.
            let changed = last.as_ref().is_none_or(|l| !l.mesh.is_empty());
            *last = Some(Read { mesh, parsed: None, specs: BTreeMap::new() });
            return changed.then(|| {
                SourceEvent::Failed(format!(
                    "{}: the file is empty (mid-write?); keeping the last good state. To remove every service write `services: []`",
                    self.path.display()
                ))
            });
        }
        // Parsing a large mesh file costs far more than comparing its bytes.
        let same_bytes = last.as_ref().is_some_and(|l| l.mesh == mesh);
        let parsed = match last.as_ref().filter(|_| same_bytes) {
            Some(l) => match &l.parsed {
                Some(state) => Ok(state.clone()),
                None => return None, // the same invalid bytes: already reported
            },
            None => mesh_file::parse(&self.path, &mesh),
        };
        let mut state = match parsed {
            Ok(state) => state,
            Err(e) => {
                *last = Some(Read { mesh, parsed: None, specs: BTreeMap::new() });
                return Some(SourceEvent::Failed(e.to_string()));
            }
        };
        state.specs = read_specs(&state).await;
        if same_bytes && last.as_ref().is_some_and(|l| l.specs == state.specs) {
            return None;
        }
        *last = Some(Read {
            mesh,
            parsed: Some(MeshState { specs: BTreeMap::new(), ..state.clone() }),
            specs: state.specs.clone(),
        });
        Some(SourceEvent::Updated(state))
    }
}

async fn read_specs(state: &MeshState) -> BTreeMap<String, Result<Arc<[u8]>, String>> {
    let mut specs = BTreeMap::new();
    for origin in state.services.values().filter_map(|s| s.openapi.clone()) {
        if specs.contains_key(&origin) {
            continue;
        }
        let content = tokio::fs::read(&origin)
            .await
            .map(Arc::from)
            .map_err(|e| format!("reading OpenAPI document {origin}: {e}; check the `openapi:` path in the mesh file"));
        specs.insert(origin, content);
    }
    specs
}

fn watch_dir(watcher: &mut Option<RecommendedWatcher>, watched: &mut BTreeSet<PathBuf>, dir: PathBuf) {
    let Some(w) = watcher.as_mut() else { return };
    if watched.contains(&dir) {
        return;
    }
    match w.watch(&dir, RecursiveMode::NonRecursive) {
        Ok(()) => {
            watched.insert(dir);
        }
        Err(e) => tracing::warn!("cannot watch {} for changes: {e}; edits there need a restart", dir.display()),
    }
}
