//! `/turnpike/admin/history`, `/turnpike/admin/history/{revision}` and
//! `POST /turnpike/admin/rollback {"revision": N}`.
//!
//! A rollback writes the whole configuration as it was at N as one new
//! revision (validated like any write), so it is itself in the history
//! and can be rolled back.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use turnpike_store::{writes_to, Commit, StoreError};

use crate::mask::{masked, redact, secrets};
use crate::{Admin, Answer, Call};

/// Commits listed when the client does not say.
const DEFAULT_LIMIT: usize = 50;

pub(crate) async fn handle(admin: &Admin, call: &Call<'_>, rest: &str) -> Answer {
    let store =
        match admin.store() {
            Ok(s) => s,
            Err(_) => return Answer::error(
                StatusCode::NOT_FOUND,
                "no history: the configuration comes from the config file (config_provider: file)",
            ),
        };
    let method = call.method;
    let result = match rest {
        "history" if method == Method::GET => list(admin, call, store).await,
        "rollback" if method == Method::POST => rollback(admin, call, store).await,
        _ => match rest.strip_prefix("history/").map(str::parse::<u64>) {
            Some(Ok(revision)) if method == Method::GET => show(admin, store, revision).await,
            Some(Err(_)) => Err(Answer::error(
                StatusCode::BAD_REQUEST,
                "a revision is a number",
            )),
            _ => Err(Answer::error(StatusCode::NOT_FOUND, "not found")),
        },
    };
    result.unwrap_or_else(|a| a)
}

fn failed(e: StoreError) -> Answer {
    match e {
        StoreError::Compacted(_) => Answer::error(StatusCode::GONE, e.to_string()),
        StoreError::Conflict(_) => Answer::error(StatusCode::CONFLICT, e.to_string()),
        StoreError::Unavailable(_) => Answer::error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        StoreError::Refused(_) => Answer::error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn list(
    admin: &Admin,
    call: &Call<'_>,
    store: &turnpike_store::Store,
) -> Result<Answer, Answer> {
    let limit = call
        .query
        .get("limit")
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_LIMIT);
    let before = call.query.get("before").and_then(|s| s.parse().ok());
    let commits = store.history(limit, before).await.map_err(failed)?;
    let list: Vec<Value> = commits
        .iter()
        .map(|c| {
            let keys: Vec<String> = c
                .changes
                .iter()
                .map(|ch| format!("{}/{}", admin.settings.prefix, ch.key))
                .collect();
            json!({"revision": c.revision, "time": c.time, "actor": c.actor, "keys": keys})
        })
        .collect();
    Ok(Answer::ok(
        json!({"revision": store.state().revision, "total": list.len(), "list": list}),
    ))
}

async fn show(
    admin: &Admin,
    store: &turnpike_store::Store,
    revision: u64,
) -> Result<Answer, Answer> {
    let commit = store.commit_at(revision).await.map_err(failed)?;
    let Some(commit) = commit else {
        return Err(Answer::error(
            StatusCode::NOT_FOUND,
            format!("no commit at revision {revision}"),
        ));
    };
    Ok(Answer::ok(diff(admin, &commit)))
}

fn diff(admin: &Admin, c: &Commit) -> Value {
    let show = |v: &Option<Value>| v.as_ref().map(|v| masked(admin.plugins, v));
    let changes: Vec<Value> = c
        .changes
        .iter()
        .map(|ch| {
            let action = match (&ch.before, &ch.after) {
                (None, Some(_)) => "create",
                (Some(_), None) => "delete",
                _ => "update",
            };
            json!({
                "key": format!("{}/{}", admin.settings.prefix, ch.key),
                "action": action,
                "before": show(&ch.before),
                "after": show(&ch.after),
            })
        })
        .collect();
    json!({"revision": c.revision, "time": c.time, "actor": c.actor, "changes": changes})
}

async fn rollback(
    admin: &Admin,
    call: &Call<'_>,
    store: &turnpike_store::Store,
) -> Result<Answer, Answer> {
    let body: Value = serde_json::from_slice(&call.body).map_err(|e| {
        Answer::error(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON in the body: {e}"),
        )
    })?;
    let revision = body["revision"].as_u64().ok_or_else(|| {
        Answer::error(StatusCode::BAD_REQUEST, "`revision` (a number) is required")
    })?;
    let _one = admin.writing.lock().await;
    let current = store.state();
    if revision > current.revision {
        return Err(Answer::error(
            StatusCode::BAD_REQUEST,
            format!(
                "revision {revision} is in the future (now {})",
                current.revision
            ),
        ));
    }
    let target = store.values_at(revision).await.map_err(failed)?;
    if let Err(errors) = admin.check(target.clone()).await {
        let hidden: Vec<String> = target
            .values()
            .flat_map(|v| secrets(admin.plugins, v))
            .collect();
        let why = format!(
            "the configuration at revision {revision} does not compile now: {}",
            errors.join("; ")
        );
        return Err(Answer::error(
            StatusCode::BAD_REQUEST,
            redact(&why, &hidden),
        ));
    }
    // Kinds this build does not read (`stream_routes`, …) stay as they are.
    let mut writes = writes_to(&current, &target);
    writes.retain(|w| turnpike_config::known_kind(&w.key));
    if writes.is_empty() {
        return Ok(Answer::ok(
            json!({"revision": current.revision, "rolled_back_to": revision, "changed": []}),
        ));
    }
    let changed: Vec<String> = writes
        .iter()
        .map(|w| format!("{}/{}", admin.settings.prefix, w.key))
        .collect();
    let actor = format!("{} (rollback to {revision})", call.actor);
    let new = store.commit(writes, &actor).await.map_err(failed)?;
    Ok(Answer::ok(
        json!({"revision": new, "rolled_back_to": revision, "changed": changed}),
    ))
}
