//! The Admin API on the embedded store: every verb on every resource, the
//! error paths, secrets, history and rollback, restarts and kill -9; and
//! on the file source, reads only.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use serde_json::{json, Value};

use crate::harness::*;

pub const KEY: &str = "test-admin-key";
pub const VIEWER: &str = "test-viewer-key";

/// A gateway with an Admin API.
pub struct Managed {
    pub gw: Gateway,
    pub admin_port: u16,
    /// The embedded store's directory (dropped after the gateway).
    _data: Option<TempDir>,
}

/// The `gateway:` block of a gateway with an Admin API and `provider`
/// lines (`config_provider: …`, `data_dir: …`, `etcd: …`).
pub fn managed_settings(port: u16, status: u16, admin: u16, provider: &str) -> String {
    format!(
        "{}  admin:\n    listen: \"127.0.0.1:{admin}\"\n    key: {KEY}\n    admin_key: [{{name: auditor, key: {VIEWER}, role: viewer}}]\n    max_body_bytes: 65536\n{provider}",
        settings(port, status)
    )
}

impl Managed {
    pub async fn start(provider: &str, resources: &str) -> Managed {
        let (port, status, admin_port) = (free_port(), free_port(), free_port());
        let text = format!(
            "{}{resources}",
            managed_settings(port, status, admin_port, provider)
        );
        let gw = Gateway::start_raw(&text, port, status).await;
        Managed {
            gw,
            admin_port,
            _data: None,
        }
    }

    /// An embedded store in the gateway's own directory.
    pub async fn embedded(resources: &str) -> Managed {
        let data = TempDir::new();
        let provider = format!(
            "  config_provider: embedded\n  data_dir: \"{}\"\n",
            data.path.display()
        );
        let mut m = Managed::start(&provider, resources).await;
        m._data = Some(data);
        m
    }

    /// Sends an Admin API request with the admin key.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        self.call_with(method, path, body, &[("x-api-key", KEY)])
            .await
    }

    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        admin_call(
            self.admin_port,
            method,
            path,
            body.map(|b| b.to_string()),
            headers,
        )
        .await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PUT, path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None).await
    }

    /// Waits until `path` on the proxy answers `status` (and `body`, when given).
    pub async fn serves(&self, path: &str, status: u16, body: Option<&str>) {
        serves(&self.gw, path, status, body).await;
    }
}

pub async fn admin_call(
    port: u16,
    method: Method,
    path: &str,
    body: Option<String>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map_or_else(Bytes::new, Bytes::from);
    send(&client(), req.body(full(body)).unwrap())
        .await
        .unwrap()
}

/// Waits until the proxy answers `path` with `status` (and `body`).
pub async fn serves(gw: &Gateway, path: &str, status: u16, body: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(r) = get(&gw.url(path)).await {
            if r.status == status && body.is_none_or(|b| r.body == b) {
                return;
            }
            last = Some((r.status, r.body));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{path} never answered {status} {body:?}; last {last:?}\n{}",
        gw.log_text()
    );
}

/// A route answering `text` by the mocking plugin.
pub fn mock_route(uri: &str, text: &str) -> Value {
    json!({"uri": uri, "plugins": {"mocking": {"response_example": text}}, "upstream": {"nodes": {"127.0.0.1:1": 1}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_on_every_resource() {
    let m = Managed::embedded("").await;
    let node = Upstream::start("a").await;
    // PUT creates (201) and then updates (200); GET reads back with indices.
    let cases: Vec<(&str, Value)> = vec![
        (
            "/apisix/admin/upstreams/u1",
            json!({"nodes": {node.node(): 1}}),
        ),
        ("/apisix/admin/services/s1", json!({"upstream_id": "u1"})),
        (
            "/apisix/admin/plugin_configs/pc1",
            json!({"plugins": {"response-rewrite": {"headers": {"set": {"x-pc": "1"}}}}}),
        ),
        (
            "/apisix/admin/routes/r1",
            json!({"uri": "/r1", "service_id": "s1", "plugin_config_id": "pc1"}),
        ),
        (
            "/apisix/admin/consumer_groups/g1",
            json!({"plugins": {"response-rewrite": {"headers": {"set": {"x-group": "1"}}}}}),
        ),
        (
            "/apisix/admin/consumers/jack",
            json!({"group_id": "g1", "plugins": {"key-auth": {"key": "jack-key"}}}),
        ),
        (
            "/apisix/admin/consumers/jack/credentials/c1",
            json!({"plugins": {"key-auth": {"key": "jack-second-key"}}}),
        ),
        (
            "/apisix/admin/global_rules/gr1",
            json!({"plugins": {"response-rewrite": {"headers": {"set": {"x-global": "1"}}}}}),
        ),
        (
            "/apisix/admin/plugin_metadata/http-logger",
            json!({"log_format": {"host": "$host"}}),
        ),
    ];
    for (path, body) in &cases {
        let r = m.put(path, body.clone()).await;
        assert_eq!(r.status, 201, "PUT {path}: {}", r.body);
        let item = r.json();
        assert_eq!(item["key"], path.replace("/admin", ""), "{path}");
        let created = item["createdIndex"].as_u64().unwrap();
        let r = m.put(path, body.clone()).await;
        assert_eq!(r.status, 200, "PUT again {path}: {}", r.body);
        assert_eq!(r.json()["createdIndex"], created, "{path}");
        assert!(
            r.json()["modifiedIndex"].as_u64().unwrap() > created,
            "{path}"
        );
        let r = m.get(path).await;
        assert_eq!(r.status, 200, "GET {path}");
        assert_eq!(r.json()["modifiedIndex"].as_u64().unwrap(), created + 1);
    }
    // Lists: {"total", "list"}; a consumer's credentials are not consumers.
    for (kind, total) in [
        ("routes", 1),
        ("consumers", 1),
        ("consumers/jack/credentials", 1),
        ("upstreams", 1),
    ] {
        let r = m.get(&format!("/apisix/admin/{kind}")).await;
        assert_eq!(r.json()["total"], total, "{kind}: {}", r.body);
        assert_eq!(r.json()["list"].as_array().unwrap().len(), total, "{kind}");
    }
    // The route serves with all of it: service upstream, plugin config,
    // consumer group and global rule.
    m.serves("/r1", 200, None).await;
    let r = get_with(&m.gw.url("/r1"), &[]).await;
    assert_eq!(r.headers["x-pc"], "1");
    assert_eq!(r.headers["x-global"], "1");

    // PATCH merges; a sub-path PATCH replaces what is there.
    let r = m
        .call(
            Method::PATCH,
            "/apisix/admin/routes/r1",
            Some(json!({"desc": "patched", "plugin_config_id": null})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["value"]["desc"], "patched");
    assert!(r.json()["value"].get("plugin_config_id").is_none());
    assert_eq!(r.json()["value"]["uri"], "/r1");
    let r = m
        .call(
            Method::PATCH,
            "/apisix/admin/routes/r1/uri",
            Some(json!("/r1b")),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    m.serves("/r1b", 200, None).await;
    m.serves("/r1", 404, None).await;

    // POST makes an id; PATCH of a missing resource is 404.
    let r = m
        .call(
            Method::POST,
            "/apisix/admin/routes",
            Some(mock_route("/posted", "posted")),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let key = r.json()["key"].as_str().unwrap().to_owned();
    let id = key.rsplit('/').next().unwrap().to_owned();
    assert_eq!(id.len(), 20, "{key}");
    m.serves("/posted", 200, Some("posted")).await;
    let r = m
        .call(
            Method::PATCH,
            "/apisix/admin/routes/nope",
            Some(json!({"desc": "x"})),
        )
        .await;
    assert_eq!(r.status, 404);

    // DELETE, leaves first; then GET is 404.
    let order = [
        format!("/apisix/admin/routes/{id}"),
        "/apisix/admin/routes/r1".into(),
        "/apisix/admin/plugin_configs/pc1".into(),
        "/apisix/admin/services/s1".into(),
        "/apisix/admin/upstreams/u1".into(),
        "/apisix/admin/consumers/jack/credentials/c1".into(),
        "/apisix/admin/consumers/jack".into(),
        "/apisix/admin/consumer_groups/g1".into(),
        "/apisix/admin/global_rules/gr1".into(),
        "/apisix/admin/plugin_metadata/http-logger".into(),
    ];
    for path in &order {
        let r = m.call(Method::DELETE, path, None).await;
        assert_eq!(r.status, 200, "DELETE {path}: {}", r.body);
        assert_eq!(r.json()["key"], path.replace("/admin", ""));
        assert_eq!(m.get(path).await.status, 404, "{path}");
    }
    m.serves("/posted", 404, None).await;
    // Plugins: the list and a schema.
    let r = m.get("/apisix/admin/plugins/list").await;
    assert!(r.json().as_array().unwrap().iter().any(|p| p == "key-auth"));
    let r = m.get("/apisix/admin/plugins/key-auth").await;
    assert!(r.json()["consumer_schema"].is_object(), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_writes_are_refused_and_nothing_changes() {
    let m = Managed::embedded("").await;
    assert_eq!(
        m.put(
            "/apisix/admin/upstreams/u1",
            json!({"nodes": {"127.0.0.1:1": 1}})
        )
        .await
        .status,
        201
    );
    assert_eq!(
        m.put(
            "/apisix/admin/routes/1",
            json!({"uri": "/a", "upstream_id": "u1"})
        )
        .await
        .status,
        201
    );
    let revision = m.get("/turnpike/admin/history").await.json()["revision"].clone();
    let cases: Vec<(Method, &str, Option<Value>, u16, &str)> = vec![
        (
            Method::PUT,
            "/apisix/admin/routes/2",
            Some(
                json!({"uri": "/b", "upstream_id": "u1", "plugins": {"limit-count": {"count": "x", "time_window": 1}}}),
            ),
            400,
            "route 2: plugins.limit-count.count",
        ),
        (
            Method::PUT,
            "/apisix/admin/routes/2",
            Some(json!({"uri": "/b", "upstream_id": "nope"})),
            400,
            "route 2: upstream_id: upstream `nope` does not exist",
        ),
        (
            Method::PUT,
            "/apisix/admin/routes/2",
            Some(json!({"uri": "/b", "service_id": "nope", "upstream_id": "u1"})),
            400,
            "service_id",
        ),
        (
            Method::PUT,
            "/apisix/admin/routes/2",
            Some(json!({"uri": "/b", "upstream_id": "u1", "plugin_config_id": "nope"})),
            400,
            "plugin_config_id",
        ),
        (
            Method::PUT,
            "/apisix/admin/routes/2",
            Some(json!({"id": "3", "uri": "/b", "upstream_id": "u1"})),
            400,
            "wrong route id",
        ),
        (
            Method::PUT,
            "/apisix/admin/routes/2",
            None,
            400,
            "invalid JSON",
        ),
        (
            Method::PUT,
            "/apisix/admin/routes/a%20b",
            Some(json!({})),
            400,
            "invalid route id",
        ),
        (
            Method::PUT,
            "/apisix/admin/widgets/1",
            Some(json!({})),
            404,
            "unknown resource kind",
        ),
        (
            Method::DELETE,
            "/apisix/admin/upstreams/u1",
            None,
            400,
            "can not delete this upstream, route [1] is still using it now",
        ),
        (
            Method::DELETE,
            "/apisix/admin/routes/9",
            None,
            404,
            "Key not found",
        ),
        (
            Method::POST,
            "/apisix/admin/consumers",
            Some(json!({"username": "x"})),
            405,
            "PUT",
        ),
        (
            Method::PUT,
            "/apisix/admin/consumers/jack/credentials/c1",
            Some(json!({"plugins": {"key-auth": {"key": "k"}}})),
            400,
            "consumer `jack` does not exist",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let r = m.call(method.clone(), path, body).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        let msg = r.json()["error_msg"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(msg.contains(needle), "{method} {path}: {msg}");
    }
    assert_eq!(
        m.get("/turnpike/admin/history").await.json()["revision"],
        revision,
        "nothing was written"
    );
    // Keys: none, wrong, or a viewer's for a write.
    let none = m
        .call_with(Method::GET, "/apisix/admin/routes", None, &[])
        .await;
    assert_eq!(
        (none.status, none.json()["error_msg"].clone()),
        (401, json!("failed to check token"))
    );
    assert_eq!(
        m.call_with(
            Method::GET,
            "/apisix/admin/routes",
            None,
            &[("x-api-key", "test-admin-keX")]
        )
        .await
        .status,
        401
    );
    let viewer = [("x-api-key", VIEWER)];
    assert_eq!(
        m.call_with(Method::GET, "/apisix/admin/routes", None, &viewer)
            .await
            .status,
        200
    );
    assert_eq!(
        m.call_with(Method::DELETE, "/apisix/admin/routes/1", None, &viewer)
            .await
            .status,
        401
    );
    assert_eq!(
        m.call_with(
            Method::GET,
            &format!("/apisix/admin/routes?api_key={KEY}"),
            None,
            &[]
        )
        .await
        .status,
        200
    );
    // Bodies beyond max_body_bytes.
    let big = json!({"uri": "/big", "upstream_id": "u1", "desc": "x".repeat(70_000)});
    assert_eq!(m.put("/apisix/admin/routes/big", big).await.status, 413);
    // If-Match: a stale modifiedIndex is a conflict.
    let at = m.get("/apisix/admin/routes/1").await.json()["modifiedIndex"]
        .as_u64()
        .unwrap();
    let body = Some(json!({"uri": "/a2", "upstream_id": "u1"}));
    let stale = (at - 1).to_string();
    let r = m
        .call_with(
            Method::PUT,
            "/apisix/admin/routes/1",
            body.clone(),
            &[("x-api-key", KEY), ("if-match", &stale)],
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = m
        .call_with(
            Method::PUT,
            "/apisix/admin/routes/1",
            body,
            &[("x-api-key", KEY), ("if-match", &at.to_string())],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_masked_kept_and_never_echoed() {
    let m = Managed::embedded("").await;
    let r = m
        .put(
            "/apisix/admin/consumers/jack",
            json!({"plugins": {"key-auth": {"key": "very-secret-key"}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["value"]["plugins"]["key-auth"]["key"], "******");
    m.put("/apisix/admin/routes/1", json!({"uri": "/k", "plugins": {"key-auth": {}, "mocking": {"response_example": "in"}}, "upstream": {"nodes": {"127.0.0.1:1": 1}}})).await;
    m.serves("/k", 401, None).await;
    let ok = get_with(&m.gw.url("/k"), &[("apikey", "very-secret-key")]).await;
    assert_eq!(ok.status, 200);
    // Every read masks: item, list, history diff.
    for path in [
        "/apisix/admin/consumers/jack",
        "/apisix/admin/consumers",
        "/turnpike/admin/history/1",
    ] {
        let r = m.get(path).await;
        assert!(!r.body.contains("very-secret-key"), "{path}: {}", r.body);
        assert!(r.body.contains("******"), "{path}: {}", r.body);
    }
    // Writing back what was read keeps the secret.
    let mut value = m.get("/apisix/admin/consumers/jack").await.json()["value"].clone();
    value["desc"] = json!("read and written back");
    assert_eq!(
        m.put("/apisix/admin/consumers/jack", value).await.status,
        200
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        get_with(&m.gw.url("/k"), &[("apikey", "very-secret-key")])
            .await
            .status,
        200
    );
    // A refused write does not echo the secret it carried.
    let r = m
        .put(
            "/apisix/admin/consumers/bob",
            json!({"plugins": {"key-auth": {"key": "sh0rt-secret", "extra": 1, "header": 5}}}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(!r.body.contains("sh0rt-secret"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_diff_and_rollback() {
    let m = Managed::embedded("").await;
    m.put("/apisix/admin/routes/1", mock_route("/v", "one"))
        .await;
    m.put("/apisix/admin/routes/1", mock_route("/v", "two"))
        .await;
    m.put("/apisix/admin/routes/2", mock_route("/w", "w")).await;
    m.serves("/v", 200, Some("two")).await;
    let h = m.get("/turnpike/admin/history").await.json();
    assert_eq!(h["revision"], 3);
    let list = h["list"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list[0]["revision"], 3);
    assert_eq!(list[0]["actor"], "admin");
    assert_eq!(list[0]["keys"], json!(["/apisix/routes/2"]));
    let d = m.get("/turnpike/admin/history/2").await.json();
    assert_eq!(d["changes"][0]["action"], "update");
    assert_eq!(
        d["changes"][0]["before"]["plugins"]["mocking"]["response_example"],
        "one"
    );
    assert_eq!(
        d["changes"][0]["after"]["plugins"]["mocking"]["response_example"],
        "two"
    );
    assert_eq!(m.get("/turnpike/admin/history/99").await.status, 404);
    // Viewers read the history too, and see who did it.
    let r = m
        .call_with(
            Method::GET,
            "/turnpike/admin/history?limit=1",
            None,
            &[("x-api-key", VIEWER)],
        )
        .await;
    assert_eq!(r.json()["list"].as_array().unwrap().len(), 1);

    let r = m
        .call(
            Method::POST,
            "/turnpike/admin/rollback",
            Some(json!({"revision": 1})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["revision"], 4);
    m.serves("/v", 200, Some("one")).await;
    m.serves("/w", 404, None).await;
    let h = m.get("/turnpike/admin/history?limit=1").await.json();
    assert_eq!(h["list"][0]["actor"], "admin (rollback to 1)");
    // A rollback is itself a revision: roll it back.
    let r = m
        .call(
            Method::POST,
            "/turnpike/admin/rollback",
            Some(json!({"revision": 3})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    m.serves("/v", 200, Some("two")).await;
    m.serves("/w", 200, Some("w")).await;
    let r = m
        .call(
            Method::POST,
            "/turnpike/admin/rollback",
            Some(json!({"revision": 77})),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    // /gateway/health reports the revision served.
    let health = get(&format!(
        "http://127.0.0.1:{}/gateway/health",
        m.gw.status_port
    ))
    .await
    .unwrap();
    assert_eq!(health.json()["revision"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_and_restarts() {
    let imported =
        "routes:\n  - {id: 1, uri: /imported, upstream: {nodes: {\"127.0.0.1:1\": 1}}}\n";
    let mut m = Managed::embedded(imported).await;
    m.gw.wait_log("imported 1 resources", 1).await;
    for i in 0..40 {
        let r = m
            .put(
                &format!("/apisix/admin/routes/k{i}"),
                mock_route(&format!("/k{i}"), &format!("k{i}")),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = m
        .call(Method::DELETE, "/apisix/admin/routes/k0", None)
        .await;
    assert_eq!(r.status, 200);
    // SIGKILL straight after the last 2xx.
    m.gw.kill_and_restart().await;
    assert_eq!(m.get("/apisix/admin/routes").await.json()["total"], 40);
    m.serves("/k39", 200, Some("k39")).await;
    m.serves("/k0", 404, None).await;
    // The file's resources were imported once: not again on restart.
    assert_eq!(m.gw.log_text().matches("imported 1 resources").count(), 1);
    assert!(
        m.gw.log_text().contains("its resources are ignored"),
        "{}",
        m.gw.log_text()
    );
    let h = m.get("/turnpike/admin/history?limit=100").await.json();
    assert_eq!(h["revision"], 42);
    assert_eq!(
        h["list"].as_array().unwrap().last().unwrap()["actor"],
        "config file import"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_source_reads_and_refuses_writes() {
    let m = Managed::start("", &one_route("127.0.0.1:1")).await;
    let r = m.get("/apisix/admin/routes/1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["value"]["uri"], "/*");
    let r = m.put("/apisix/admin/routes/2", json!({"uri": "/x"})).await;
    assert_eq!(r.status, 405);
    assert!(r.json()["error_msg"]
        .as_str()
        .unwrap()
        .contains("config_provider: file"));
    // Reads follow the file.
    let text = format!(
        "{}{}",
        managed_settings(m.gw.port, m.gw.status_port, m.admin_port, ""),
        "routes:\n  - {id: 7, uri: /seven, upstream: {nodes: {\"127.0.0.1:1\": 1}}}\n"
    );
    std::fs::write(&m.gw.config, text).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.get("/apisix/admin/routes/7").await.status != 200 {
        assert!(
            Instant::now() < deadline,
            "the Admin API never showed the file's new route"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_access_is_guarded() {
    // No key on an address beyond this host: refused at start.
    let (ok, err) = check("gateway:\n  admin: {listen: \"0.0.0.0:9180\"}\n");
    assert!(!ok);
    assert!(err.contains("admin.key"), "{err}");
    let (ok, err) = check(
        "gateway:\n  admin: {listen: \"127.0.0.1:9180\", key: k, allow_admin: [\"10.0.0.0/33\"]}\n",
    );
    assert!(!ok);
    assert!(err.contains("admin.allow_admin[0]"), "{err}");
    // allow_admin leaves 127.0.0.1 out: 403.
    let (port, status, admin_port) = (free_port(), free_port(), free_port());
    let text = format!(
        "{}  admin: {{listen: \"127.0.0.1:{admin_port}\", key: k, allow_admin: [\"10.0.0.0/8\"]}}\n",
        settings(port, status)
    );
    let _gw = Gateway::start_raw(&text, port, status).await;
    let r = admin_call(
        admin_port,
        Method::GET,
        "/apisix/admin/routes",
        None,
        &[("x-api-key", "k")],
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
}
