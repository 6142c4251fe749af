//! Where resources live when the Admin API edits them: the embedded store
//! (one node, redb under `data_dir`) or etcd (a cluster, keys as APISIX
//! writes them). Both keep every resource with its created and modified
//! revision, commit a batch of writes atomically with compare-and-set, keep
//! a history of commits for diff and rollback, and hold a mirror of the
//! whole state in memory that follows every change (etcd: by watch).
//!
//! The gateway never reads the store on the request path: a change wakes
//! the [`Store::changes`] receiver, and the control plane compiles the new
//! [`State`] into a snapshot.
//!
//! Keys are relative to the prefix: `routes/1`,
//! `consumers/jack/credentials/c1`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

mod embedded;
mod etcd;
mod layout;
mod registry;

pub use embedded::Embedded;
pub use etcd::{Etcd, EtcdSettings};
pub use layout::{file_state, resource_lists, values};
pub use registry::{sweep_local, Instance, Registration, Registry};

/// One resource as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub value: Value,
    /// The revision that created the key (APISIX's `createdIndex`).
    pub created: u64,
    /// The revision that last wrote it (`modifiedIndex`).
    pub modified: u64,
}

/// Every resource at one revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub revision: u64,
    pub items: BTreeMap<String, Item>,
}

/// One write of a commit.
#[derive(Debug, Clone)]
pub struct Write {
    pub key: String,
    /// `None` deletes.
    pub value: Option<Value>,
    pub expect: Expect,
}

/// What the key must be for the commit to apply (compare-and-set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Any,
    Absent,
    /// Present, last written at this revision.
    Modified(u64),
}

/// A commit as the history keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    pub revision: u64,
    /// Unix seconds.
    pub time: u64,
    /// Who made it: the Admin API key's name, `config file import`, ….
    pub actor: String,
    pub changes: Vec<Change>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub key: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// A write's expectation did not hold: the key named changed meanwhile.
    Conflict(String),
    /// The store cannot be reached or failed; the message says why.
    Unavailable(String),
    /// The revision asked for is older than the history kept.
    Compacted(u64),
    /// The store refused the change as too large (etcd's limits on a
    /// transaction); nothing was written.
    Refused(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Conflict(key) => write!(f, "`{key}` was changed by another writer"),
            StoreError::Unavailable(why) => write!(f, "the config store is unavailable: {why}"),
            StoreError::Compacted(rev) => {
                write!(
                    f,
                    "revision {rev} is older than the history the store keeps"
                )
            }
            StoreError::Refused(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for StoreError {}

/// The configuration store behind the Admin API.
pub enum Store {
    Embedded(Embedded),
    Etcd(Etcd),
}

impl Store {
    /// The mirror of the current state.
    pub fn state(&self) -> Arc<State> {
        match self {
            Store::Embedded(s) => s.state(),
            Store::Etcd(s) => s.state(),
        }
    }

    /// Wakes with the revision each time the state changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        match self {
            Store::Embedded(s) => s.changes(),
            Store::Etcd(s) => s.changes(),
        }
    }

    /// Applies `writes` as one revision, or none of them. Returns once the
    /// mirror holds the commit, so a read that follows sees it.
    pub async fn commit(&self, writes: Vec<Write>, actor: &str) -> Result<u64, StoreError> {
        match self {
            Store::Embedded(s) => s.commit(writes, actor).await,
            Store::Etcd(s) => s.commit(writes, actor).await,
        }
    }

    /// Commits, newest first, older than `before` (all when `None`).
    pub async fn history(
        &self,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<Commit>, StoreError> {
        match self {
            Store::Embedded(s) => s.history(limit, before).await,
            Store::Etcd(s) => s.history(limit, before).await,
        }
    }

    /// One commit with its changes; `None` when no such revision was made.
    pub async fn commit_at(&self, revision: u64) -> Result<Option<Commit>, StoreError> {
        match self {
            Store::Embedded(s) => s.commit_at(revision).await,
            Store::Etcd(s) => s.commit_at(revision).await,
        }
    }

    /// Every resource's value as it was at `revision`.
    pub async fn values_at(&self, revision: u64) -> Result<BTreeMap<String, Value>, StoreError> {
        match self {
            Store::Embedded(s) => s.values_at(revision).await,
            Store::Etcd(s) => s.values_at(revision).await,
        }
    }

    /// Whether the store answered its last use (always, for the embedded one).
    pub fn up(&self) -> bool {
        match self {
            Store::Embedded(_) => true,
            Store::Etcd(s) => s.up(),
        }
    }

    /// `embedded /path/to/data` or `etcd http://…`, for logs and health.
    pub fn describe(&self) -> String {
        match self {
            Store::Embedded(s) => format!("embedded {}", s.path().display()),
            Store::Etcd(s) => format!("etcd {}", s.endpoints().join(",")),
        }
    }
}

/// The writes that turn `current` into `target`, each expecting the key
/// as it is now (a rollback's commit).
pub fn writes_to(current: &State, target: &BTreeMap<String, Value>) -> Vec<Write> {
    let expect = |key: &str| match current.items.get(key) {
        Some(item) => Expect::Modified(item.modified),
        None => Expect::Absent,
    };
    let mut writes: Vec<Write> = current
        .items
        .keys()
        .filter(|k| !target.contains_key(*k))
        .map(|k| Write {
            key: k.clone(),
            value: None,
            expect: expect(k),
        })
        .collect();
    for (key, value) in target {
        if current.items.get(key).map(|i| &i.value) != Some(value) {
            writes.push(Write {
                key: key.clone(),
                value: Some(value.clone()),
                expect: expect(key),
            });
        }
    }
    writes
}

/// Checks `writes` against `items` and applies them at `revision`,
/// returning the changes; the first failed expectation is a conflict.
fn apply(
    items: &mut BTreeMap<String, Item>,
    writes: Vec<Write>,
    revision: u64,
) -> Result<Vec<Change>, StoreError> {
    for w in &writes {
        let holds = match (w.expect, items.get(&w.key)) {
            (Expect::Any, _) | (Expect::Absent, None) => true,
            (Expect::Modified(m), Some(item)) => item.modified == m,
            _ => false,
        };
        if !holds {
            return Err(StoreError::Conflict(w.key.clone()));
        }
    }
    let mut changes = Vec::with_capacity(writes.len());
    for w in writes {
        let before = match &w.value {
            Some(value) => {
                let created = items.get(&w.key).map_or(revision, |i| i.created);
                let item = Item {
                    value: value.clone(),
                    created,
                    modified: revision,
                };
                items.insert(w.key.clone(), item)
            }
            None => items.remove(&w.key),
        };
        changes.push(Change {
            key: w.key,
            before: before.map(|i| i.value),
            after: w.value,
        });
    }
    Ok(changes)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(key: &str, value: Value, expect: Expect) -> Write {
        Write {
            key: key.into(),
            value: Some(value),
            expect,
        }
    }

    #[test]
    fn apply_checks_every_expectation_before_writing() {
        let mut items = BTreeMap::new();
        apply(
            &mut items,
            vec![put("routes/1", json!(1), Expect::Absent)],
            1,
        )
        .unwrap();
        let err = apply(
            &mut items,
            vec![
                put("routes/2", json!(2), Expect::Absent),
                put("routes/1", json!(3), Expect::Absent),
            ],
            2,
        )
        .unwrap_err();
        assert_eq!(err, StoreError::Conflict("routes/1".into()));
        assert!(!items.contains_key("routes/2"), "nothing applied");
        let changes = apply(
            &mut items,
            vec![put("routes/1", json!(4), Expect::Modified(1))],
            3,
        )
        .unwrap();
        assert_eq!(changes[0].before, Some(json!(1)));
        assert_eq!(items["routes/1"].created, 1);
        assert_eq!(items["routes/1"].modified, 3);
    }

    #[test]
    fn writes_to_reaches_the_target() {
        let mut state = State::default();
        apply(
            &mut state.items,
            vec![
                put("a", json!(1), Expect::Any),
                put("b", json!(2), Expect::Any),
            ],
            1,
        )
        .unwrap();
        let target = BTreeMap::from([("b".to_string(), json!(3)), ("c".to_string(), json!(4))]);
        let writes = writes_to(&state, &target);
        apply(&mut state.items, writes, 2).unwrap();
        let now: BTreeMap<_, _> = state
            .items
            .iter()
            .map(|(k, i)| (k.clone(), i.value.clone()))
            .collect();
        assert_eq!(now, target);
    }
}
