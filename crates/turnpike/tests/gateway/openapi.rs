//! docs/admin-api.openapi.json against the running Admin API: every
//! operation it documents is called, and every answer's status and body
//! must be what the document says. An operation the document has and the
//! test does not call fails the test too, so the two cannot drift apart.

use std::collections::BTreeSet;

use http::Method;
use serde_json::{json, Value};

use crate::admin::{mock_route, Managed, KEY};

fn spec() -> Value {
    let text = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/admin-api.openapi.json"
    ));
    serde_json::from_str(text).expect("the OpenAPI document is JSON")
}

/// The document's path template that `path` matches: literal segments
/// first; `{subpath}` takes the rest of the path.
fn template<'s>(spec: &'s Value, path: &str) -> Option<&'s str> {
    let parts: Vec<&str> = path.split('/').collect();
    let mut candidates: Vec<&str> = spec["paths"]
        .as_object()?
        .keys()
        .map(String::as_str)
        .filter(|t| matches(t, &parts))
        .collect();
    candidates
        .sort_by_key(|t| std::cmp::Reverse(t.split('/').filter(|s| !s.starts_with('{')).count()));
    candidates.first().copied()
}

fn matches(template: &str, parts: &[&str]) -> bool {
    let segs: Vec<&str> = template.split('/').collect();
    if segs.last() == Some(&"{subpath}") {
        return parts.len() >= segs.len()
            && segs[..segs.len() - 1]
                .iter()
                .zip(parts)
                .all(|(s, p)| s.starts_with('{') || s == p);
    }
    segs.len() == parts.len()
        && segs
            .iter()
            .zip(parts)
            .all(|(s, p)| s.starts_with('{') || s == p)
}

fn conforms(
    spec: &Value,
    method: &Method,
    path: &str,
    status: u16,
    body: &Value,
) -> Result<String, String> {
    let template = template(spec, path).ok_or_else(|| format!("{path} is not in the document"))?;
    let op = &spec["paths"][template][method.as_str().to_lowercase()];
    if op.is_null() {
        return Err(format!("{method} {template} is not in the document"));
    }
    let response = &op["responses"][status.to_string()];
    if response.is_null() {
        return Err(format!(
            "{method} {template}: status {status} is not documented"
        ));
    }
    let mut schema = response["content"]["application/json"]["schema"].clone();
    schema["components"] = spec["components"].clone();
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| format!("schema of {method} {template} {status}: {e}"))?;
    if let Err(e) = validator.validate(body) {
        return Err(format!(
            "{method} {path} {status}: body does not match: {e}: {body}"
        ));
    }
    Ok(format!("{} {template}", method.as_str().to_lowercase()))
}

/// A request (method, path, body, headers) and the status it must get.
type Call<'a> = (
    Method,
    &'a str,
    Option<Value>,
    &'a [(&'a str, &'a str)],
    u16,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_matches_its_openapi_document() {
    let spec = spec();
    let m = Managed::embedded("").await;
    let key = [("x-api-key", KEY)];
    let calls: Vec<Call> = vec![
        (Method::GET, "/apisix/admin/plugins/list", None, &key, 200),
        (
            Method::GET,
            "/apisix/admin/plugins/key-auth",
            None,
            &key,
            200,
        ),
        (Method::GET, "/apisix/admin/plugins/nope", None, &key, 404),
        (
            Method::PUT,
            "/apisix/admin/upstreams",
            Some(json!({"id": "u1", "nodes": {"127.0.0.1:1": 1}})),
            &key,
            201,
        ),
        (
            Method::POST,
            "/apisix/admin/routes",
            Some(mock_route("/posted", "p")),
            &key,
            201,
        ),
        (
            Method::POST,
            "/apisix/admin/consumers",
            Some(json!({"username": "x"})),
            &key,
            405,
        ),
        (
            Method::PUT,
            "/apisix/admin/routes/r1",
            Some(json!({"uri": "/r1", "upstream_id": "u1"})),
            &key,
            201,
        ),
        (
            Method::PUT,
            "/apisix/admin/routes/r1",
            Some(json!({"uri": "/r1", "upstream_id": "u1"})),
            &key,
            200,
        ),
        (
            Method::PUT,
            "/apisix/admin/routes/r9",
            Some(json!({"uri": "/r9", "upstream_id": "none"})),
            &key,
            400,
        ),
        (Method::GET, "/apisix/admin/routes", None, &key, 200),
        (
            Method::GET,
            "/apisix/admin/routes?page=1&page_size=1",
            None,
            &key,
            200,
        ),
        (Method::GET, "/apisix/admin/routes/r1", None, &key, 200),
        (Method::GET, "/apisix/admin/routes/r404", None, &key, 404),
        (Method::GET, "/apisix/admin/routes/r1", None, &[], 401),
        (
            Method::PATCH,
            "/apisix/admin/routes/r1",
            Some(json!({"desc": "patched"})),
            &key,
            200,
        ),
        (
            Method::PATCH,
            "/apisix/admin/routes/r1/desc",
            Some(json!("sub-path")),
            &key,
            200,
        ),
        (
            Method::PUT,
            "/apisix/admin/routes/r1",
            Some(json!({"uri": "/r1", "upstream_id": "u1"})),
            &[("x-api-key", KEY), ("if-match", "1")],
            409,
        ),
        (
            Method::DELETE,
            "/apisix/admin/upstreams/u1",
            None,
            &key,
            400,
        ),
        (
            Method::PUT,
            "/apisix/admin/consumers/jack",
            Some(json!({"plugins": {}})),
            &key,
            201,
        ),
        (
            Method::PUT,
            "/apisix/admin/consumers/jack/credentials/c1",
            Some(json!({"plugins": {"key-auth": {"key": "k-123456"}}})),
            &key,
            201,
        ),
        (
            Method::GET,
            "/apisix/admin/consumers/jack/credentials",
            None,
            &key,
            200,
        ),
        (
            Method::GET,
            "/apisix/admin/consumers/jack/credentials/c1",
            None,
            &key,
            200,
        ),
        (
            Method::PATCH,
            "/apisix/admin/consumers/jack/credentials/c1",
            Some(json!({"desc": "second"})),
            &key,
            200,
        ),
        (
            Method::DELETE,
            "/apisix/admin/consumers/jack/credentials/c1",
            None,
            &key,
            200,
        ),
        (Method::GET, "/turnpike/admin/history", None, &key, 200),
        (Method::GET, "/turnpike/admin/history/1", None, &key, 200),
        (Method::GET, "/turnpike/admin/history/999", None, &key, 404),
        (
            Method::POST,
            "/turnpike/admin/rollback",
            Some(json!({"revision": 999})),
            &key,
            400,
        ),
        (
            Method::POST,
            "/turnpike/admin/rollback",
            Some(json!({"revision": 1})),
            &key,
            200,
        ),
        (Method::DELETE, "/apisix/admin/routes/r1", None, &key, 404),
        (
            Method::PUT,
            "/turnpike/registry/users/a",
            Some(json!({"address": "127.0.0.1", "port": 8080, "ttl": 30})),
            &key,
            200,
        ),
        (
            Method::PUT,
            "/turnpike/registry/users/b",
            Some(json!({"address": "127.0.0.1"})),
            &key,
            400,
        ),
        (Method::GET, "/turnpike/registry", None, &key, 200),
        (Method::GET, "/turnpike/registry/users", None, &key, 200),
        (
            Method::DELETE,
            "/turnpike/registry/users/a",
            None,
            &key,
            200,
        ),
        (
            Method::DELETE,
            "/turnpike/registry/users/a",
            None,
            &key,
            404,
        ),
    ];
    let mut covered = BTreeSet::new();
    let mut problems = Vec::new();
    for (method, path, body, headers, want) in calls {
        let r = m.call_with(method.clone(), path, body, headers).await;
        if r.status != want {
            problems.push(format!(
                "{method} {path}: {} (wanted {want}): {}",
                r.status, r.body
            ));
            continue;
        }
        let doc_path = path.split('?').next().unwrap_or(path);
        match conforms(&spec, &method, doc_path, r.status, &r.json()) {
            Ok(op) => {
                covered.insert(op);
            }
            Err(e) => problems.push(e),
        }
    }
    assert!(
        problems.is_empty(),
        "the Admin API and its OpenAPI document disagree:\n{}",
        problems.join("\n")
    );
    let documented: BTreeSet<String> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "parameters")
                .map(move |m| format!("{m} {p}"))
        })
        .collect();
    let missed: Vec<&String> = documented.difference(&covered).collect();
    assert!(
        missed.is_empty(),
        "documented operations the test never called: {missed:?}"
    );
}
