//! etcd as the config store of a cluster, spoken to through etcd's v3
//! JSON gateway (`/v3/kv/range`, `/v3/kv/txn`, `/v3/watch`), as APISIX's
//! lua-resty-etcd does. That keeps gRPC and a protobuf compiler out of the
//! build; the calls are few and plain.
//!
//! The mirror is filled by a range over `{prefix}/` and then kept by a
//! watch from the listed revision + 1. When the watch breaks (etcd down,
//! a compacted revision), the store is marked down and, once etcd answers
//! again, listed afresh and watched from there: no update is missed and
//! the node keeps serving its last state meanwhile.
//!
//! Commits are one transaction: the resources' compare-and-set, a
//! compare-and-set on a guard key every Admin API commit writes (so two
//! nodes never both commit against the same state: a write that relied on
//! a resource another node just deleted is checked again), their puts and
//! deletes, and a history record whose revision is the commit's. History
//! lives under `{prefix}-turnpike/history/`, outside the watched range, so
//! it never weighs on a list or the watch.
//!
//! A watch that goes quiet is probed: every [`PROBE`] the node asks etcd
//! for its status, and a probe that fails ends the watch, as a broken
//! stream does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::{now, Change, Commit, Expect, Item, State, StoreError, Write};

/// The guard key, under the prefix (watched, never a resource).
const GUARD: &str = "turnpike/guard";

/// How often a watching node checks that etcd still answers.
const PROBE: Duration = Duration::from_secs(2);

/// A watch message larger than this is refused (and the watch restarted).
const MAX_MESSAGE: usize = 64 << 20;

/// Wait between attempts while etcd does not answer.
const RETRY: Duration = Duration::from_millis(500);

/// The most history records one pruning deletes.
const PRUNE_MAX: u64 = 1_000;

#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// `http://host:port`, tried in order.
    pub endpoints: Vec<String>,
    /// `/apisix`.
    pub prefix: String,
    /// For each request but the watch.
    pub timeout: Duration,
    /// Commit records kept; older ones are deleted after each commit.
    pub history_kept: u64,
}

pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    settings: EtcdSettings,
    client: Client<HttpConnector, Full<Bytes>>,
    /// The endpoint that answered last.
    endpoint: AtomicUsize,
    mirror: ArcSwap<State>,
    changes: watch::Sender<u64>,
    up: AtomicBool,
    /// The guard key's mod_revision as last seen (0: never written).
    guard: AtomicU64,
}

impl Etcd {
    /// Lists the resources, waiting (and saying why) until etcd answers,
    /// then keeps them by watch on the current runtime.
    pub async fn connect(settings: EtcdSettings) -> Etcd {
        let inner = Arc::new(Inner::new(settings));
        let mut said = std::time::Instant::now() - Duration::from_secs(60);
        let state = loop {
            match inner.list().await {
                Ok(state) => break state,
                Err(e) => {
                    if said.elapsed() >= Duration::from_secs(5) {
                        tracing::warn!("waiting for etcd before serving: {e}");
                        said = std::time::Instant::now();
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        inner.up.store(true, Ordering::Release);
        inner.publish(state);
        tokio::spawn(inner.clone().follow());
        Etcd { inner }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.inner.settings.endpoints
    }

    pub fn state(&self) -> Arc<State> {
        self.inner.mirror.load_full()
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    pub fn up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    pub async fn commit(&self, writes: Vec<Write>, actor: &str) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let current = self.state();
        let guard = inner.guard.load(Ordering::Acquire);
        let mut compare = vec![
            json!({"key": inner.key(GUARD), "target": "MOD", "result": "EQUAL", "mod_revision": guard.to_string()}),
        ];
        let mut success = Vec::new();
        let mut changes = Vec::new();
        for w in &writes {
            let key = inner.key(&w.key);
            match w.expect {
                Expect::Any => {}
                Expect::Absent => compare.push(json!({"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"})),
                Expect::Modified(m) => compare.push(json!({"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": m.to_string()})),
            }
            success.push(match &w.value {
                Some(v) => json!({"request_put": {"key": key, "value": B64.encode(v.to_string())}}),
                None => json!({"request_delete_range": {"key": key}}),
            });
            changes.push(Change {
                key: w.key.clone(),
                before: current.items.get(&w.key).map(|i| i.value.clone()),
                after: w.value.clone(),
            });
        }
        let record = Commit {
            revision: 0,
            time: now(),
            actor: actor.to_owned(),
            changes,
        };
        let id = format!(
            "{:020}-{:08x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            fastrand::u32(..)
        );
        let record =
            serde_json::to_string(&record).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let record_key = B64.encode(format!("{}{id}", inner.history_prefix()));
        success.push(json!({"request_put": {"key": record_key, "value": B64.encode(record)}}));
        success.push(json!({"request_put": {"key": inner.key(GUARD), "value": B64.encode(&id)}}));
        let txn = json!({"compare": compare, "success": success});
        let answer = match inner.call_once("/v3/kv/txn", &txn).await {
            Ok(answer) => answer,
            Err(e @ StoreError::Refused(_)) => return Err(e),
            // Sent, but no answer: whether it applied is in the record.
            Err(e) => return inner.applied(&record_key, e).await,
        };
        if answer.get("succeeded") != Some(&Value::Bool(true)) {
            // Someone else committed: wait (briefly) for their change to
            // arrive, so the caller checks again against it.
            let mut seen = self.changes();
            let _ = tokio::time::timeout(
                inner.settings.timeout,
                seen.wait_for(|r| *r > current.revision),
            )
            .await;
            let key = writes
                .iter()
                .find(|w| {
                    let now = self.state();
                    let was = current.items.get(&w.key).map(|i| i.modified);
                    now.items.get(&w.key).map(|i| i.modified) != was
                })
                .map_or_else(|| "the configuration".to_owned(), |w| w.key.clone());
            return Err(StoreError::Conflict(key));
        }
        let revision = revision_of(&answer);
        tokio::spawn(inner.clone().prune());
        // Read-your-writes: wait (briefly) for the watch to bring it.
        let mut changes = self.changes();
        let seen =
            tokio::time::timeout(inner.settings.timeout, changes.wait_for(|r| *r >= revision))
                .await;
        if seen.is_err() {
            tracing::warn!(revision, "etcd: a commit is not back through the watch yet");
        }
        Ok(revision)
    }

    pub async fn history(
        &self,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<Commit>, StoreError> {
        self.inner
            .records(limit, None, before.map(|b| b.saturating_sub(1)))
            .await
    }

    /// The commit's record; for a revision written to etcd directly, the
    /// difference between the states before and after it.
    pub async fn commit_at(&self, revision: u64) -> Result<Option<Commit>, StoreError> {
        let records = self
            .inner
            .records(1, Some(revision), Some(revision))
            .await?;
        if let Some(c) = records.into_iter().next() {
            return Ok(Some(c));
        }
        if revision == 0 || revision > self.state().revision {
            return Ok(None);
        }
        let before = self.values_at(revision - 1).await?;
        let after = self.values_at(revision).await?;
        let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
        let changes: Vec<Change> = keys
            .into_iter()
            .filter(|k| before.get(*k) != after.get(*k))
            .map(|k| Change {
                key: k.clone(),
                before: before.get(k).cloned(),
                after: after.get(k).cloned(),
            })
            .collect();
        Ok((!changes.is_empty()).then(|| Commit {
            revision,
            time: 0,
            actor: "written to etcd directly".into(),
            changes,
        }))
    }

    pub async fn values_at(&self, revision: u64) -> Result<BTreeMap<String, Value>, StoreError> {
        if revision == 0 {
            return Ok(BTreeMap::new());
        }
        let state = self.inner.range(Some(revision)).await?;
        Ok(state.items.into_iter().map(|(k, i)| (k, i.value)).collect())
    }
}

impl Inner {
    fn new(mut settings: EtcdSettings) -> Inner {
        settings.prefix = settings.prefix.trim_end_matches('/').to_owned();
        let mut connector = HttpConnector::new();
        // A peer gone without a word (power lost) is found by keepalive.
        connector.set_keepalive(Some(Duration::from_secs(10)));
        connector.set_connect_timeout(Some(settings.timeout));
        Inner {
            client: Client::builder(TokioExecutor::new()).build(connector),
            endpoint: AtomicUsize::new(0),
            mirror: ArcSwap::from_pointee(State::default()),
            changes: watch::channel(0).0,
            up: AtomicBool::new(false),
            guard: AtomicU64::new(0),
            settings,
        }
    }

    fn history_prefix(&self) -> String {
        format!("{}-turnpike/history/", self.settings.prefix)
    }

    /// After a transaction got no answer: applied if its history record
    /// exists; else (or if etcd cannot say) the original error.
    async fn applied(&self, record_key: &str, error: StoreError) -> Result<u64, StoreError> {
        let answer = self.call("/v3/kv/range", json!({"key": record_key})).await;
        match answer.as_ref().map(|a| &a["kvs"][0]["mod_revision"]) {
            Ok(Value::Null) => Err(error),
            Ok(found) => Ok(number(found)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "{error}; whether the write was applied is unknown: read it back"
            ))),
        }
    }

    fn key(&self, relative: &str) -> String {
        B64.encode(format!("{}/{relative}", self.settings.prefix))
    }

    /// The store's own key for an etcd key, `None` outside the resources.
    fn relative<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(&self.settings.prefix)?.strip_prefix('/')?;
        (!rest.is_empty() && !rest.starts_with("turnpike/")).then_some(rest)
    }

    fn publish(&self, state: State) {
        let revision = state.revision;
        self.mirror.store(Arc::new(state));
        self.changes.send_replace(revision);
    }

    async fn list(&self) -> Result<State, StoreError> {
        self.range(None).await
    }

    /// Every resource, now or at `revision`.
    async fn range(&self, revision: Option<u64>) -> Result<State, StoreError> {
        let prefix = format!("{}/", self.settings.prefix);
        let mut body =
            json!({"key": B64.encode(&prefix), "range_end": B64.encode(range_end(&prefix))});
        if let Some(r) = revision {
            body["revision"] = r.to_string().into();
        }
        let answer = self
            .call("/v3/kv/range", body)
            .await
            .map_err(|e| match (&e, revision) {
                (StoreError::Unavailable(m), Some(r)) if m.contains("compacted") => {
                    StoreError::Compacted(r)
                }
                _ => e,
            })?;
        let mut state = State {
            revision: revision_of(&answer),
            items: BTreeMap::new(),
        };
        let mut guard = 0;
        for kv in answer["kvs"].as_array().into_iter().flatten() {
            let key = decode(&kv["key"]).unwrap_or_default();
            if self.is_guard(&key) {
                guard = number(&kv["mod_revision"]);
            } else if let Some((key, item)) = self.item(kv) {
                state.items.insert(key, item);
            }
        }
        if revision.is_none() {
            self.guard.store(guard, Ordering::Release);
        }
        Ok(state)
    }

    fn is_guard(&self, key: &str) -> bool {
        key.strip_prefix(&self.settings.prefix)
            .and_then(|k| k.strip_prefix('/'))
            == Some(GUARD)
    }

    fn item(&self, kv: &Value) -> Option<(String, Item)> {
        let key = decode(&kv["key"])?;
        let relative = self.relative(&key)?.to_owned();
        let raw = decode(&kv["value"]).unwrap_or_default();
        // A value that is not JSON is kept as text: compiling it reports
        // the resource, and the running config stays.
        let value = serde_json::from_str(&raw).unwrap_or(Value::String(raw));
        let item = Item {
            value,
            created: number(&kv["create_revision"]),
            modified: number(&kv["mod_revision"]),
        };
        Some((relative, item))
    }

    /// Deletes the oldest history records beyond `history_kept` (at most
    /// [`PRUNE_MAX`] a time). Record keys sort by time, so the oldest are
    /// a range from the prefix's start. Any node may do it; doing it twice
    /// is harmless.
    async fn prune(self: Arc<Self>) {
        let prefix = self.history_prefix();
        let (start, end) = (B64.encode(&prefix), B64.encode(range_end(&prefix)));
        let count = self
            .call(
                "/v3/kv/range",
                json!({"key": start, "range_end": end, "count_only": true}),
            )
            .await;
        let excess = match count {
            Ok(answer) => number(&answer["count"]).saturating_sub(self.settings.history_kept),
            Err(e) => {
                tracing::debug!("etcd: history not pruned: {e}");
                return;
            }
        };
        if excess == 0 {
            return;
        }
        let oldest = self
            .call(
                "/v3/kv/range",
                json!({"key": start, "range_end": end, "keys_only": true,
                    "sort_order": "ASCEND", "sort_target": "KEY",
                    "limit": excess.min(PRUNE_MAX).to_string()}),
            )
            .await;
        let last = oldest.ok().and_then(|a| {
            a["kvs"]
                .as_array()
                .and_then(|kvs| kvs.last())
                .and_then(|kv| kv["key"].as_str())
                .and_then(|k| B64.decode(k).ok())
        });
        let Some(mut last) = last else { return };
        // Up to and including the last of them.
        last.push(0);
        let deleted = self
            .call(
                "/v3/kv/deleterange",
                json!({"key": start, "range_end": B64.encode(last)}),
            )
            .await;
        if let Err(e) = deleted {
            tracing::debug!("etcd: history not pruned: {e}");
        }
    }

    /// History records, newest first, at most `limit`, with revisions
    /// between `min` and `max`.
    async fn records(
        &self,
        limit: usize,
        min: Option<u64>,
        max: Option<u64>,
    ) -> Result<Vec<Commit>, StoreError> {
        let prefix = self.history_prefix();
        let mut body = json!({"key": B64.encode(&prefix), "range_end": B64.encode(range_end(&prefix)),
            "sort_order": "DESCEND", "sort_target": "MOD", "limit": limit.to_string()});
        if let Some(min) = min {
            body["min_mod_revision"] = min.to_string().into();
        }
        if let Some(max) = max {
            body["max_mod_revision"] = max.to_string().into();
        }
        let answer = self.call("/v3/kv/range", body).await?;
        let mut out = Vec::new();
        for kv in answer["kvs"].as_array().into_iter().flatten() {
            let Some(text) = decode(&kv["value"]) else {
                continue;
            };
            let Ok(mut commit) = serde_json::from_str::<Commit>(&text) else {
                continue;
            };
            commit.revision = number(&kv["mod_revision"]);
            out.push(commit);
        }
        Ok(out)
    }

    /// One request to the first endpoint that answers (reads: safe to
    /// send again elsewhere).
    async fn call(&self, path: &str, body: Value) -> Result<Value, StoreError> {
        let endpoints = &self.settings.endpoints;
        let first = self.endpoint.load(Ordering::Relaxed);
        let mut last = StoreError::Unavailable("no endpoints configured".into());
        for n in 0..endpoints.len() {
            let i = (first + n) % endpoints.len();
            match self.send(i, path, &body).await {
                Err(StoreError::Unavailable(e)) => last = StoreError::Unavailable(e),
                answered => return answered,
            }
        }
        self.up.store(false, Ordering::Release);
        Err(last)
    }

    /// One request to the current endpoint only (a write: sent elsewhere
    /// after a timeout, it could apply twice).
    async fn call_once(&self, path: &str, body: &Value) -> Result<Value, StoreError> {
        let i = self.endpoint.load(Ordering::Relaxed) % self.settings.endpoints.len().max(1);
        self.send(i, path, body).await
    }

    async fn send(&self, i: usize, path: &str, body: &Value) -> Result<Value, StoreError> {
        let endpoint = self
            .settings
            .endpoints
            .get(i)
            .ok_or_else(|| StoreError::Unavailable("no endpoints configured".into()))?;
        let request = self.request(endpoint, path, body)?;
        let sent = tokio::time::timeout(self.settings.timeout, async {
            let resp = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        })
        .await;
        let (status, bytes) = match sent {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(StoreError::Unavailable(format!("{endpoint}: {e}"))),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "{endpoint}: no answer in {:?}",
                    self.settings.timeout
                )))
            }
        };
        self.endpoint.store(i, Ordering::Relaxed);
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let message = value["error"]
            .as_str()
            .or(value["message"].as_str())
            .unwrap_or("");
        // etcd's own limits (--max-txn-ops, --max-request-bytes): the
        // request is too big, not the store down.
        if message.contains("too many operations") || message.contains("request is too large") {
            return Err(StoreError::Refused(format!(
                "etcd refused the change: {message}"
            )));
        }
        Err(StoreError::Unavailable(format!(
            "{endpoint}: {status} {message}"
        )))
    }

    fn request(
        &self,
        endpoint: &str,
        path: &str,
        body: &Value,
    ) -> Result<http::Request<Full<Bytes>>, StoreError> {
        http::Request::post(format!("{}{path}", endpoint.trim_end_matches('/')))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| StoreError::Unavailable(format!("{endpoint}: {e}")))
    }

    /// Keeps the mirror: watch from the mirror's revision + 1; when that
    /// breaks, list again once etcd answers, and watch from there.
    async fn follow(self: Arc<Self>) {
        loop {
            let from = self.mirror.load().revision + 1;
            let why = self.watch(from).await;
            self.up.store(false, Ordering::Release);
            tracing::warn!(
                "etcd watch ended ({why}); serving the last configuration until etcd answers"
            );
            loop {
                tokio::time::sleep(RETRY).await;
                match self.list().await {
                    Ok(state) => {
                        tracing::info!(
                            revision = state.revision,
                            "etcd answers again: configuration listed afresh"
                        );
                        self.up.store(true, Ordering::Release);
                        self.publish(state);
                        break;
                    }
                    Err(e) => tracing::debug!("etcd still unreachable: {e}"),
                }
            }
        }
    }

    /// Applies watch events until the stream ends or etcd stops answering
    /// probes; returns why it stopped.
    async fn watch(&self, from: u64) -> String {
        let endpoints = &self.settings.endpoints;
        let endpoint = &endpoints[self.endpoint.load(Ordering::Relaxed) % endpoints.len()];
        let prefix = format!("{}/", self.settings.prefix);
        let body = json!({"create_request": {
            "key": B64.encode(&prefix), "range_end": B64.encode(range_end(&prefix)),
            "start_revision": from.to_string(),
        }});
        let request = match self.request(endpoint, "/v3/watch", &body) {
            Ok(r) => r,
            Err(e) => return e.to_string(),
        };
        let resp = match self.client.request(request).await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => return format!("{endpoint}: {}", r.status()),
            Err(e) => return format!("{endpoint}: {e}"),
        };
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        let mut probe = tokio::time::interval(PROBE);
        probe.tick().await;
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                _ = probe.tick() => {
                    if let Err(e) = self.call("/v3/maintenance/status", json!({})).await {
                        return format!("etcd does not answer: {e}");
                    }
                    continue;
                }
            };
            let frame = match frame {
                Some(Ok(f)) => f,
                Some(Err(e)) => return e.to_string(),
                None => return "etcd closed the stream".into(),
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            // The gateway ends each message with a newline.
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line = buf.split_to(end + 1);
                let message: Value = match serde_json::from_slice(&line) {
                    Ok(m) => m,
                    Err(e) => return format!("unreadable watch message: {e}"),
                };
                if let Err(why) = self.apply_events(&message["result"]) {
                    return why;
                }
            }
            if buf.len() > MAX_MESSAGE {
                return format!("a watch message is over {MAX_MESSAGE} bytes");
            }
        }
    }

    /// Applies one watch message. Each event is applied by its own
    /// revision: etcd sends a long catch-up in several messages, each with
    /// the newest revision in its header, so the header alone would skip
    /// the later ones.
    fn apply_events(&self, result: &Value) -> Result<(), String> {
        if number(&result["compact_revision"]) > 0 {
            return Err(format!(
                "revision compacted up to {}: listing again",
                number(&result["compact_revision"])
            ));
        }
        if result["canceled"] == Value::Bool(true) {
            return Err(format!("watch canceled: {}", result["cancel_reason"]));
        }
        let events = result["events"].as_array().map_or(&[][..], Vec::as_slice);
        let current = self.mirror.load_full();
        let mut state = State {
            revision: current.revision,
            items: BTreeMap::new(),
        };
        let mut items = None;
        for event in events {
            let kv = &event["kv"];
            let revision = number(&kv["mod_revision"]);
            if revision <= current.revision {
                continue;
            }
            state.revision = state.revision.max(revision);
            let items = items.get_or_insert_with(|| current.items.clone());
            let key = decode(&kv["key"]).unwrap_or_default();
            let deleted = event["type"] == "DELETE";
            if self.is_guard(&key) {
                self.guard
                    .store(if deleted { 0 } else { revision }, Ordering::Release);
            } else if deleted {
                if let Some(relative) = self.relative(&key) {
                    items.remove(relative);
                }
            } else if let Some((key, item)) = self.item(kv) {
                items.insert(key, item);
            }
        }
        let Some(items) = items else {
            return Ok(());
        };
        state.items = items;
        self.up.store(true, Ordering::Release);
        self.publish(state);
        Ok(())
    }
}

/// The end of a prefix range: the prefix with its last byte + 1.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

fn decode(v: &Value) -> Option<String> {
    let bytes = B64.decode(v.as_str()?).ok()?;
    String::from_utf8(bytes).ok()
}

/// The gateway writes 64-bit numbers as strings.
fn number(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        other => other.as_u64().unwrap_or(0),
    }
}

fn revision_of(answer: &Value) -> u64 {
    number(&answer["header"]["revision"])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inner() -> Inner {
        Inner::new(EtcdSettings {
            endpoints: vec!["http://127.0.0.1:1".into()],
            prefix: "/apisix/".into(),
            timeout: Duration::from_secs(1),
            history_kept: 10,
        })
    }

    fn kv(key: &str, value: &str, revision: u64) -> Value {
        json!({"key": B64.encode(key), "value": B64.encode(value),
            "create_revision": revision.to_string(), "mod_revision": revision.to_string()})
    }

    #[test]
    fn watch_events_keep_the_mirror() {
        let inner = inner();
        let put = json!({"header": {"revision": "5"}, "events": [
            {"kv": kv("/apisix/routes/1", r#"{"uri":"/a"}"#, 5)},
            {"kv": kv("/apisix/turnpike/history/1", "{}", 5)},
        ]});
        inner.apply_events(&put).unwrap();
        let state = inner.mirror.load_full();
        assert_eq!(state.revision, 5);
        assert_eq!(state.items.keys().collect::<Vec<_>>(), ["routes/1"]);
        assert_eq!(state.items["routes/1"].value, json!({"uri": "/a"}));
        let del = json!({"header": {"revision": "6"}, "events": [{"type": "DELETE", "kv": {"key": B64.encode("/apisix/routes/1"), "mod_revision": "6"}}]});
        inner.apply_events(&del).unwrap();
        assert!(inner.mirror.load().items.is_empty());
        assert_eq!(*inner.changes.borrow(), 6);
    }

    #[test]
    fn a_compacted_watch_asks_for_a_new_list() {
        let compacted = json!({"header": {}, "canceled": true, "compact_revision": "9"});
        let why = inner().apply_events(&compacted).unwrap_err();
        assert!(why.contains("compacted up to 9"), "{why}");
    }

    #[test]
    fn prefix_ranges_end_after_the_prefix() {
        assert_eq!(range_end("/apisix/"), b"/apisix0".to_vec());
    }

    #[test]
    fn numbers_come_as_strings_or_numbers() {
        assert_eq!(number(&json!("42")), 42);
        assert_eq!(number(&json!(7)), 7);
        assert_eq!(number(&Value::Null), 0);
    }
}
