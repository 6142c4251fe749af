//! `/apisix/admin/{kind}[/{id}[/sub/path]]` and
//! `/apisix/admin/consumers/{username}/credentials[/{id}]`: GET, PUT,
//! POST, PATCH and DELETE as APISIX v3 answers them.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{Method, StatusCode};
use serde_json::{json, Map, Value};
use turnpike_store::{values, Expect, Item, State, StoreError, Write};

use crate::mask::{masked, redact, secrets, unmask};
use crate::{Admin, Answer, Call};

use turnpike_config::KINDS;

/// Tries a write again when another node changed a key meanwhile.
const ATTEMPTS: usize = 3;

/// What a path names.
struct Target {
    kind: &'static str,
    singular: &'static str,
    /// `routes`, or `consumers/jack/credentials`.
    collection: String,
    id: Option<String>,
    /// A PATCH's sub-path (`plugins/limit-count`).
    sub: Vec<String>,
}

impl Target {
    fn parse(rest: &str) -> Result<Target, Answer> {
        let parts: Vec<&str> = rest.split('/').collect();
        let kind = KINDS.iter().find(|k| k.0 == parts[0]).ok_or_else(|| {
            Answer::error(
                StatusCode::NOT_FOUND,
                format!("unknown resource kind `{}`", parts[0]),
            )
        })?;
        let mut target = Target {
            kind: kind.0,
            singular: kind.1,
            collection: kind.0.to_owned(),
            id: parts.get(1).map(|s| (*s).to_owned()),
            sub: parts.iter().skip(2).map(|s| (*s).to_owned()).collect(),
        };
        if kind.0 == "consumers" && parts.get(2) == Some(&"credentials") {
            let user = parts[1];
            target = Target {
                kind: "credentials",
                singular: "credential",
                collection: format!("consumers/{user}/credentials"),
                id: parts.get(3).map(|s| (*s).to_owned()),
                sub: parts.iter().skip(4).map(|s| (*s).to_owned()).collect(),
            };
        }
        if let Some(id) = &target.id {
            check_id(target.singular, id)?;
        }
        Ok(target)
    }

    fn key(&self, id: &str) -> String {
        format!("{}/{id}", self.collection)
    }

    /// Whether `key` is one of this collection's items.
    fn holds(&self, key: &str) -> bool {
        key.strip_prefix(&self.collection)
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|id| !id.is_empty() && !id.contains('/'))
    }
}

/// A resource id (or registry name): 1 to 64 of `A-Za-z0-9-_.`.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn check_id(singular: &str, id: &str) -> Result<(), Answer> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(Answer::error(
            StatusCode::BAD_REQUEST,
            format!("invalid {singular} id: 1 to 64 characters from a-z A-Z 0-9 - _ ."),
        ))
    }
}

pub(crate) async fn handle(admin: &Admin, call: &Call<'_>, rest: &str) -> Answer {
    let target = match Target::parse(rest) {
        Ok(t) => t,
        Err(a) => return a,
    };
    let op = match *call.method {
        Method::GET if target.sub.is_empty() => return get(admin, call, &target),
        Method::PUT => Op::Put,
        Method::POST => Op::Post,
        Method::PATCH => Op::Patch,
        Method::DELETE => Op::Delete,
        _ => {
            return Answer::error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not allowed here", call.method),
            )
        }
    };
    if !target.sub.is_empty() && op != Op::Patch {
        return Answer::error(StatusCode::BAD_REQUEST, "a sub-path is for PATCH only");
    }
    write(admin, call, &target, op).await
}

fn item(admin: &Admin, key: &str, item: &Item) -> Value {
    json!({
        "key": format!("{}/{key}", admin.settings.prefix),
        "value": masked(admin.plugins, &item.value),
        "createdIndex": item.created,
        "modifiedIndex": item.modified,
    })
}

fn get(admin: &Admin, call: &Call<'_>, target: &Target) -> Answer {
    let state = admin.backend.state();
    if let Some(id) = &target.id {
        let key = target.key(id);
        return match state.items.get(&key) {
            Some(i) => Answer::ok(item(admin, &key, i)),
            None => Answer::error(StatusCode::NOT_FOUND, "Key not found"),
        };
    }
    let all: Vec<(&String, &Item)> = state
        .items
        .iter()
        .filter(|(k, _)| target.holds(k))
        .collect();
    let total = all.len();
    let size = call
        .query
        .get("page_size")
        .and_then(|s| s.parse().ok())
        .filter(|n: &usize| *n > 0);
    let page = call
        .query
        .get("page")
        .and_then(|s| s.parse().ok())
        .filter(|n: &usize| *n > 0);
    let list: Vec<Value> = match (page, size) {
        (Some(p), Some(s)) => all
            .iter()
            .skip((p - 1) * s)
            .take(s)
            .map(|(k, i)| item(admin, k, i))
            .collect(),
        (None, Some(s)) => all.iter().take(s).map(|(k, i)| item(admin, k, i)).collect(),
        _ => all.iter().map(|(k, i)| item(admin, k, i)).collect(),
    };
    Answer::ok(json!({"total": total, "list": list}))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Post,
    Patch,
    Delete,
}

/// A write worked out against one state.
struct Plan {
    key: String,
    value: Option<Value>,
    writes: Vec<Write>,
    created: bool,
}

async fn write(admin: &Admin, call: &Call<'_>, target: &Target, op: Op) -> Answer {
    let store = match admin.store() {
        Ok(s) => s,
        Err(a) => return a,
    };
    let if_match = match if_match(call) {
        Ok(m) => m,
        Err(a) => return a,
    };
    let _one = admin.writing.lock().await;
    for _ in 0..ATTEMPTS {
        let state = store.state();
        let plan = match plan(admin, call, target, op, &state, if_match) {
            Ok(p) => p,
            Err(a) => return a,
        };
        if let Err(a) = validate(admin, &state, &plan).await {
            return a;
        }
        match store.commit(plan.writes.clone(), &call.actor).await {
            Ok(revision) => return done(admin, op, &plan, revision, &store.state()),
            Err(StoreError::Conflict(key)) if if_match.is_some() => {
                return Answer::error(
                    StatusCode::CONFLICT,
                    format!("`{key}` was changed by another writer"),
                );
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(e @ StoreError::Unavailable(_)) => {
                return Answer::error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            Err(e @ StoreError::Refused(_)) => {
                return Answer::error(StatusCode::BAD_REQUEST, e.to_string())
            }
            Err(e) => return Answer::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
    Answer::error(
        StatusCode::CONFLICT,
        "other writers kept changing the configuration; try again",
    )
}

/// `If-Match: <modifiedIndex>`: the write applies only to that version.
fn if_match(call: &Call<'_>) -> Result<Option<u64>, Answer> {
    let Some(v) = call.headers.get("if-match") else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .map(|s| s.trim().trim_matches('"'))
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            Answer::error(
                StatusCode::BAD_REQUEST,
                "If-Match must be the modifiedIndex read",
            )
        })
}

fn plan(
    admin: &Admin,
    call: &Call<'_>,
    target: &Target,
    op: Op,
    state: &State,
    if_match: Option<u64>,
) -> Result<Plan, Answer> {
    let body = || parse_body(&call.body);
    let (id, value) = match op {
        Op::Put => {
            let value = body()?;
            let id = put_id(target, &value)?;
            (id, Some(value))
        }
        Op::Post => {
            if target.id.is_some() || matches!(target.kind, "consumers" | "plugin_metadata") {
                return Err(Answer::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!(
                        "POST makes a new {} with a generated id; use PUT with the id",
                        target.singular
                    ),
                ));
            }
            (new_id(), Some(body()?))
        }
        Op::Patch | Op::Delete => {
            let id = target.id.clone().ok_or_else(|| {
                Answer::error(
                    StatusCode::BAD_REQUEST,
                    format!("missing {} id", target.singular),
                )
            })?;
            let Some(old) = state.items.get(&target.key(&id)) else {
                return Err(Answer::error(StatusCode::NOT_FOUND, "Key not found"));
            };
            let value = match op {
                Op::Patch => Some(patched(&old.value, &target.sub, body_any(&call.body)?)?),
                _ => None,
            };
            (id, value)
        }
    };
    let key = target.key(&id);
    let old = state.items.get(&key);
    if let (Some(m), Some(old)) = (if_match, old) {
        if old.modified != m {
            return Err(Answer::error(
                StatusCode::CONFLICT,
                format!("`{key}` is at modifiedIndex {}, not {m}", old.modified),
            ));
        }
    } else if if_match.is_some() {
        return Err(Answer::error(
            StatusCode::CONFLICT,
            format!("`{key}` does not exist"),
        ));
    }
    let expect = old.map_or(Expect::Absent, |o| Expect::Modified(o.modified));
    let mut writes = Vec::new();
    let value = match value {
        Some(mut v) => {
            unmask(admin.plugins, &mut v, old.map(|o| &o.value));
            stamp(target, &id, &mut v, old.map(|o| &o.value));
            Some(v)
        }
        None => {
            if let Some(why) = in_use(target, &id, state) {
                return Err(Answer::error(StatusCode::BAD_REQUEST, why));
            }
            // A consumer's credentials go with it.
            let under = format!("{key}/credentials/");
            for (k, i) in state
                .items
                .range(under.clone()..)
                .take_while(|(k, _)| k.starts_with(&under))
            {
                writes.push(Write {
                    key: k.clone(),
                    value: None,
                    expect: Expect::Modified(i.modified),
                });
            }
            None
        }
    };
    writes.insert(
        0,
        Write {
            key: key.clone(),
            value: value.clone(),
            expect,
        },
    );
    Ok(Plan {
        key,
        value,
        writes,
        created: old.is_none(),
    })
}

fn parse_body(body: &[u8]) -> Result<Value, Answer> {
    match body_any(body)? {
        v @ Value::Object(_) => Ok(v),
        _ => Err(Answer::error(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        )),
    }
}

fn body_any(body: &[u8]) -> Result<Value, Answer> {
    serde_json::from_slice(body).map_err(|e| {
        Answer::error(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON in the body: {e}"),
        )
    })
}

/// The id a PUT writes: the path's, else the body's; both must agree.
fn put_id(target: &Target, value: &Value) -> Result<String, Answer> {
    let field = if target.kind == "consumers" {
        "username"
    } else {
        "id"
    };
    let in_body = match value.get(field) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => {
            return Err(Answer::error(
                StatusCode::BAD_REQUEST,
                format!("{field} must be a string or a number"),
            ))
        }
        None => None,
    };
    let id = match (&target.id, in_body) {
        (Some(p), Some(b)) if *p != b => {
            return Err(Answer::error(
                StatusCode::BAD_REQUEST,
                format!(
                    "wrong {} {field}: the path says `{p}`, the body `{b}`",
                    target.singular
                ),
            ));
        }
        (Some(p), _) => p.clone(),
        (None, Some(b)) => b,
        (None, None) => {
            return Err(Answer::error(
                StatusCode::BAD_REQUEST,
                format!("missing {} {field}", target.singular),
            ))
        }
    };
    check_id(target.singular, &id)?;
    Ok(id)
}

/// A 20-digit id, unique in this process and increasing, as APISIX's.
fn new_id() -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let prev = LAST.fetch_max(now, Ordering::Relaxed);
    let id = if prev >= now {
        LAST.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        now
    };
    format!("{id:020}")
}

/// The value after a PATCH: a merge of the body (JSON merge patch: objects
/// merge, anything else replaces, `null` removes), or with a sub-path, the
/// body put at that path.
fn patched(old: &Value, sub: &[String], body: Value) -> Result<Value, Answer> {
    let mut value = old.clone();
    if sub.is_empty() {
        if !body.is_object() {
            return Err(Answer::error(
                StatusCode::BAD_REQUEST,
                "the body must be a JSON object",
            ));
        }
        merge(&mut value, body);
        return Ok(value);
    }
    let mut at = &mut value;
    for part in sub {
        if !at.is_object() {
            return Err(Answer::error(
                StatusCode::BAD_REQUEST,
                format!("`{}` is not an object", sub.join("/")),
            ));
        }
        at = at
            .as_object_mut()
            .expect("checked just above")
            .entry(part.clone())
            .or_insert(Value::Object(Map::new()));
    }
    *at = body;
    Ok(value)
}

fn merge(into: &mut Value, patch: Value) {
    match (into, patch) {
        (Value::Object(into), Value::Object(patch)) => {
            for (k, v) in patch {
                if v.is_null() {
                    into.remove(&k);
                } else {
                    merge(into.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (into, patch) => *into = patch,
    }
}

/// Writes the id (as APISIX stores it) and the create and update times.
fn stamp(target: &Target, id: &str, value: &mut Value, old: Option<&Value>) {
    let Some(fields) = value.as_object_mut() else {
        return;
    };
    let field = if target.kind == "consumers" {
        "username"
    } else {
        "id"
    };
    fields.insert(field.into(), id.into());
    if target.kind == "plugin_metadata" {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let created = old
        .and_then(|o| o.get("create_time"))
        .cloned()
        .unwrap_or(now.into());
    fields.insert("create_time".into(), created);
    fields.insert("update_time".into(), now.into());
}

/// Why a resource may not be deleted: another still refers to it
/// (APISIX's messages).
fn in_use(target: &Target, id: &str, state: &State) -> Option<String> {
    let (field, users, what): (&str, &[&str], &str) = match target.kind {
        "upstreams" => (
            "upstream_id",
            &["routes", "services"],
            "can not delete this upstream",
        ),
        "services" => (
            "service_id",
            &["routes"],
            "can not delete this service directly",
        ),
        "plugin_configs" => (
            "plugin_config_id",
            &["routes"],
            "can not delete this plugin config",
        ),
        "consumer_groups" => (
            "group_id",
            &["consumers"],
            "can not delete this consumer group",
        ),
        _ => return None,
    };
    for (key, item) in &state.items {
        let Some((kind, user)) = key.split_once('/') else {
            continue;
        };
        if !users.contains(&kind) || user.contains('/') {
            continue;
        }
        let refers = match item.value.get(field) {
            Some(Value::String(s)) => s == id,
            Some(Value::Number(n)) => n.to_string() == id,
            _ => false,
        };
        if refers {
            let singular = KINDS.iter().find(|k| k.0 == kind).map_or(kind, |k| k.1);
            return Some(format!("{what}, {singular} [{user}] is still using it now"));
        }
    }
    None
}

/// Compiles the configuration with the plan applied; refuses the write
/// when that finds errors the current configuration does not have (so a
/// resource written broken into etcd directly does not block every write).
async fn validate(admin: &Admin, state: &State, plan: &Plan) -> Result<(), Answer> {
    let current = values(state);
    let mut candidate = current.clone();
    for w in &plan.writes {
        match &w.value {
            Some(v) => candidate.insert(w.key.clone(), v.clone()),
            None => candidate.remove(&w.key),
        };
    }
    let Err(errors) = admin.check(candidate).await else {
        return Ok(());
    };
    let known = admin.check(current).await.err().unwrap_or_default();
    let new: Vec<String> = errors.into_iter().filter(|e| !known.contains(e)).collect();
    if new.is_empty() {
        return Ok(());
    }
    let hidden = plan
        .value
        .as_ref()
        .map(|v| secrets(admin.plugins, v))
        .unwrap_or_default();
    Err(Answer::error(
        StatusCode::BAD_REQUEST,
        redact(&new.join("; "), &hidden),
    ))
}

fn done(admin: &Admin, op: Op, plan: &Plan, revision: u64, state: &State) -> Answer {
    let full = format!("{}/{}", admin.settings.prefix, plan.key);
    if op == Op::Delete {
        let id = plan.key.rsplit('/').next().unwrap_or_default();
        return Answer::ok(json!({"deleted": id, "key": full, "revision": revision}));
    }
    let body = match state.items.get(&plan.key) {
        Some(i) => item(admin, &plan.key, i),
        // Another writer deleted it already; answer with what was written.
        None => {
            json!({"key": full, "value": plan.value.as_ref().map(|v| masked(admin.plugins, v)), "modifiedIndex": revision})
        }
    };
    let status = if plan.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Answer(status, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_merges_objects_and_removes_nulls() {
        let mut v = json!({"uri": "/a", "plugins": {"a": {"x": 1}, "b": {}}, "hosts": ["x"]});
        merge(
            &mut v,
            json!({"plugins": {"a": {"y": 2}, "b": null}, "hosts": ["y"]}),
        );
        assert_eq!(
            v,
            json!({"uri": "/a", "plugins": {"a": {"x": 1, "y": 2}}, "hosts": ["y"]})
        );
    }

    #[test]
    fn sub_path_patch_replaces_the_value_there() {
        let old = json!({"uri": "/a", "plugins": {"a": {"x": 1}}});
        let v = patched(&old, &["plugins".into(), "a".into()], json!({"y": 2})).unwrap();
        assert_eq!(v["plugins"]["a"], json!({"y": 2}));
        let v = patched(&old, &["uri".into()], json!("/b")).unwrap();
        assert_eq!(v["uri"], "/b");
    }

    #[test]
    fn generated_ids_increase() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), 20);
        assert!(b > a);
    }

    #[test]
    fn paths_name_kinds_and_credentials() {
        let t = Target::parse("consumers/jack/credentials/c1").unwrap();
        assert_eq!(t.key("c1"), "consumers/jack/credentials/c1");
        assert!(t.holds("consumers/jack/credentials/c2"));
        assert!(!Target::parse("routes").unwrap().holds("consumers/jack"));
        assert!(Target::parse("consumers").unwrap().holds("consumers/jack"));
        assert!(!Target::parse("consumers")
            .unwrap()
            .holds("consumers/jack/credentials/c1"));
        assert!(Target::parse("widgets/1").is_err());
        assert!(Target::parse("routes/a b").is_err());
    }
}
