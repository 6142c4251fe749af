//! Watching the config file for edits (inotify on Linux, never polling).
//!
//! The file's directory is watched rather than the file itself, because
//! editors and deploy tools often replace a file by renaming a new one over
//! it, which ends a watch on the old inode. Any change in the directory
//! counts: a Kubernetes ConfigMap swaps a symlink (`..data`) and never names
//! the file. The caller compares contents, so unrelated changes cost a read.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

/// Events closer together than this are one change: an editor's save is
/// often a truncate, a few writes and a rename.
const SETTLE: Duration = Duration::from_millis(100);

/// Calls `on_change` on a background thread each time `path` changes.
/// The watch lasts as long as the returned watcher is kept.
pub fn watch_file(
    path: &Path,
    on_change: impl Fn() + Send + 'static,
) -> notify::Result<impl Watcher> {
    let path = absolute(path);
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let (tx, rx) = mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        // The receiver lives as long as the watcher thread; a closed channel
        // only means we are shutting down.
        let _ = tx.send(());
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                while rx.recv_timeout(SETTLE).is_ok() {}
                on_change();
            }
        })
        .map_err(notify::Error::io)?;
    Ok(watcher)
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}
