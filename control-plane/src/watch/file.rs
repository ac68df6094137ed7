//! Watch step for local mode: reads the mesh file, and reads it again whenever it
//! changes on disk (editors that write in place and those that rename over it alike).
//! It must not decide anything about the content beyond parsing it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::SourceEvent;
use super::mesh_file;

/// Quiet time after the last change notification before the file is read.
const SETTLE: Duration = Duration::from_millis(20);
const MAX_SETTLE: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
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
        // Watch the directory, not the file: an editor's rename-over replaces the inode,
        // which would silently end a watch on the file itself.
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = self.path.file_name().map(|n| n.to_os_string());
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let relevant = match &res {
                Ok(ev) => ev.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == file_name),
                Err(_) => true,
            };
            if relevant {
                // A full channel already holds a pending re-read: dropping is correct.
                let _ = tick_tx.try_send(());
            }
        });
        let _watcher = match watcher.and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w)) {
            Ok(w) => Some(w),
            Err(e) => {
                let msg = format!(
                    "cannot watch {} for changes: {e}; edits will be picked up every 2 s instead",
                    dir.display()
                );
                tracing::warn!("{msg}");
                None
            }
        };
        let poll = if _watcher.is_some() { Duration::from_secs(3600) } else { Duration::from_secs(2) };

        let mut last: Option<Vec<u8>> = None;
        loop {
            match tokio::fs::read(&self.path).await {
                Ok(bytes) if last.as_deref() == Some(bytes.as_slice()) => {}
                Ok(bytes) if bytes.is_empty() => {
                    // Usually a writer that truncated and has not written yet; an
                    // intended empty mesh is spelled `services: []`. Never publish it.
                    last = Some(bytes);
                    let msg = format!(
                        "{}: the file is empty (mid-write?); keeping the last good state. To remove every service write `services: []`",
                        self.path.display()
                    );
                    if events.send(SourceEvent::Failed(msg)).await.is_err() {
                        return;
                    }
                }
                Ok(bytes) => {
                    let event = match mesh_file::parse(&self.path, &bytes) {
                        Ok(mesh) => SourceEvent::Updated(mesh),
                        Err(e) => SourceEvent::Failed(e.to_string()),
                    };
                    last = Some(bytes);
                    if events.send(event).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    last = None;
                    let msg = format!(
                        "reading mesh file {}: {e}; check the path and permissions (keeping the last good state)",
                        self.path.display()
                    );
                    if events.send(SourceEvent::Failed(msg)).await.is_err() {
                        return;
                    }
                }
            }
            tokio::select! {
                t = tick_rx.recv() => if t.is_none() { return },
                () = tokio::time::sleep(poll) => {}
                () = events.closed() => return,
            }
            // Let a writer finish: read once events have been quiet for SETTLE (but no
            // later than MAX_SETTLE), not halfway through an in-place rewrite.
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
}
