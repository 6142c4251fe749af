//! The embedded store: one node, resources in a redb file under
//! `data_dir`. A commit is one redb write transaction, made durable
//! (fsync) before [`Embedded::commit`] returns, so an answer the Admin API
//! gave survives kill -9.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use redb::{Database, ReadableTable, TableDefinition};
use serde_json::Value;
use tokio::sync::watch;

use crate::{apply, now, Commit, Item, State, StoreError, Write};

/// Key (`routes/1`) → JSON of [`Item`].
const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
/// Revision → JSON of [`Commit`].
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
/// `revision` → the last revision committed.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Commits kept for diff and rollback; older ones are dropped.
const HISTORY_KEPT: u64 = 10_000;

pub struct Embedded {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    mirror: ArcSwap<State>,
    changes: watch::Sender<u64>,
    /// One commit at a time, so the mirror follows the file in order.
    writing: Mutex<()>,
}

fn fail(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl Embedded {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Embedded, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("config.redb");
        let db = Database::create(&path)
            .map_err(|e| fail(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(fail)?;
        {
            // Tables exist from the first open on, so reads never miss one.
            txn.open_table(RESOURCES).map_err(fail)?;
            txn.open_table(HISTORY).map_err(fail)?;
            txn.open_table(META).map_err(fail)?;
        }
        txn.commit().map_err(fail)?;
        let state = read_state(&db)?;
        let (changes, _) = watch::channel(state.revision);
        let inner = Inner {
            db,
            path,
            mirror: ArcSwap::from_pointee(state),
            changes,
            writing: Mutex::new(()),
        };
        Ok(Embedded {
            inner: Arc::new(inner),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn state(&self) -> Arc<State> {
        self.inner.mirror.load_full()
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    pub async fn commit(&self, writes: Vec<Write>, actor: &str) -> Result<u64, StoreError> {
        // redb's commit waits for fsync: off the async threads.
        let actor = actor.to_owned();
        self.blocking(move |inner| inner.commit(writes, &actor))
            .await
    }

    pub async fn history(
        &self,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<Commit>, StoreError> {
        self.blocking(move |inner| inner.history(limit, before))
            .await
    }

    pub async fn commit_at(&self, revision: u64) -> Result<Option<Commit>, StoreError> {
        self.blocking(move |inner| inner.commit_at(revision)).await
    }

    pub async fn values_at(&self, revision: u64) -> Result<BTreeMap<String, Value>, StoreError> {
        self.blocking(move |inner| inner.values_at(revision)).await
    }

    /// Runs a read of the file off the async threads: reading back many
    /// revisions takes a while.
    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || read(&inner))
            .await
            .map_err(fail)?
    }
}

impl Inner {
    fn commit(&self, writes: Vec<Write>, actor: &str) -> Result<u64, StoreError> {
        let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.mirror.load_full();
        let revision = current.revision + 1;
        let mut items = current.items.clone();
        let changes = apply(&mut items, writes, revision)?;
        let commit = Commit {
            revision,
            time: now(),
            actor: actor.to_owned(),
            changes,
        };
        let txn = self.db.begin_write().map_err(fail)?;
        {
            let mut resources = txn.open_table(RESOURCES).map_err(fail)?;
            for change in &commit.changes {
                match items.get(&change.key) {
                    Some(item) => {
                        let bytes = serde_json::to_vec(item).map_err(fail)?;
                        resources
                            .insert(change.key.as_str(), bytes.as_slice())
                            .map_err(fail)?;
                    }
                    None => {
                        resources.remove(change.key.as_str()).map_err(fail)?;
                    }
                }
            }
            let mut history = txn.open_table(HISTORY).map_err(fail)?;
            let bytes = serde_json::to_vec(&commit).map_err(fail)?;
            history.insert(revision, bytes.as_slice()).map_err(fail)?;
            if revision > HISTORY_KEPT {
                history.remove(revision - HISTORY_KEPT).map_err(fail)?;
            }
            let mut meta = txn.open_table(META).map_err(fail)?;
            meta.insert("revision", revision).map_err(fail)?;
        }
        txn.commit().map_err(fail)?;
        self.mirror.store(Arc::new(State { revision, items }));
        self.changes.send_replace(revision);
        Ok(revision)
    }

    fn history(&self, limit: usize, before: Option<u64>) -> Result<Vec<Commit>, StoreError> {
        let txn = self.db.begin_read().map_err(fail)?;
        let history = txn.open_table(HISTORY).map_err(fail)?;
        let end = before.unwrap_or(u64::MAX);
        let mut out = Vec::new();
        for entry in history.range(..end).map_err(fail)?.rev().take(limit) {
            let (_, bytes) = entry.map_err(fail)?;
            out.push(serde_json::from_slice(bytes.value()).map_err(fail)?);
        }
        Ok(out)
    }

    fn commit_at(&self, revision: u64) -> Result<Option<Commit>, StoreError> {
        let txn = self.db.begin_read().map_err(fail)?;
        let history = txn.open_table(HISTORY).map_err(fail)?;
        let found = history.get(revision).map_err(fail)?;
        found
            .map(|bytes| serde_json::from_slice(bytes.value()).map_err(fail))
            .transpose()
    }

    /// The state at `revision`: today's, with every later commit undone.
    fn values_at(&self, revision: u64) -> Result<BTreeMap<String, Value>, StoreError> {
        let current = self.mirror.load_full();
        let mut values = crate::values(&current);
        let txn = self.db.begin_read().map_err(fail)?;
        let history = txn.open_table(HISTORY).map_err(fail)?;
        let oldest = history
            .first()
            .map_err(fail)?
            .map_or(current.revision + 1, |(k, _)| k.value());
        // Revisions before the oldest kept cannot be rebuilt (0 included,
        // once the first commits are gone).
        if revision > current.revision || revision + 1 < oldest {
            return Err(StoreError::Compacted(revision));
        }
        for entry in history.range(revision + 1..).map_err(fail)?.rev() {
            let (_, bytes) = entry.map_err(fail)?;
            let commit: Commit = serde_json::from_slice(bytes.value()).map_err(fail)?;
            for change in commit.changes.into_iter().rev() {
                match change.before {
                    Some(v) => values.insert(change.key, v),
                    None => values.remove(&change.key),
                };
            }
        }
        Ok(values)
    }
}

fn read_state(db: &Database) -> Result<State, StoreError> {
    let txn = db.begin_read().map_err(fail)?;
    let meta = txn.open_table(META).map_err(fail)?;
    let revision = meta.get("revision").map_err(fail)?.map_or(0, |v| v.value());
    let resources = txn.open_table(RESOURCES).map_err(fail)?;
    let mut items = BTreeMap::new();
    for entry in resources.iter().map_err(fail)? {
        let (key, bytes) = entry.map_err(fail)?;
        let item: Item = serde_json::from_slice(bytes.value())
            .map_err(|e| fail(format!("stored `{}` is not readable: {e}", key.value())))?;
        items.insert(key.value().to_owned(), item);
    }
    Ok(State { revision, items })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Expect;
    use serde_json::json;

    fn put(key: &str, value: Value) -> Write {
        Write {
            key: key.into(),
            value: Some(value),
            expect: Expect::Any,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("turnpike-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn commits_survive_reopening_with_history() {
        let d = dir("reopen");
        {
            let s = Embedded::open(&d).unwrap();
            s.commit(vec![put("routes/1", json!({"uri": "/a"}))], "ops")
                .await
                .unwrap();
            s.commit(vec![put("routes/1", json!({"uri": "/b"}))], "ops")
                .await
                .unwrap();
            s.commit(
                vec![Write {
                    key: "routes/1".into(),
                    value: None,
                    expect: Expect::Modified(2),
                }],
                "ci",
            )
            .await
            .unwrap();
        }
        let s = Embedded::open(&d).unwrap();
        let state = s.state();
        assert_eq!(state.revision, 3);
        assert!(state.items.is_empty());
        let history = s.history(10, None).await.unwrap();
        let revs: Vec<u64> = history.iter().map(|c| c.revision).collect();
        assert_eq!(revs, vec![3, 2, 1]);
        assert_eq!(history[0].actor, "ci");
        assert_eq!(
            s.values_at(1).await.unwrap()["routes/1"],
            json!({"uri": "/a"})
        );
        assert_eq!(
            s.values_at(2).await.unwrap()["routes/1"],
            json!({"uri": "/b"})
        );
        assert!(s.values_at(0).await.unwrap().is_empty());
        assert_eq!(s.values_at(9).await, Err(StoreError::Compacted(9)));
        let c = s.commit_at(2).await.unwrap().unwrap();
        assert_eq!(c.changes[0].before, Some(json!({"uri": "/a"})));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_conflict_writes_nothing() {
        let d = dir("conflict");
        let s = Embedded::open(&d).unwrap();
        s.commit(vec![put("routes/1", json!(1))], "a")
            .await
            .unwrap();
        let stale = Write {
            key: "routes/1".into(),
            value: Some(json!(2)),
            expect: Expect::Absent,
        };
        let err = s.commit(vec![stale], "b").await.unwrap_err();
        assert_eq!(err, StoreError::Conflict("routes/1".into()));
        assert_eq!(s.state().revision, 1);
        drop(s);
        assert_eq!(Embedded::open(&d).unwrap().state().revision, 1);
        let _ = std::fs::remove_dir_all(&d);
    }
}
