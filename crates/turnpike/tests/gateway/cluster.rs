//! A cluster: gateway nodes sharing a real etcd. Changes through any
//! node's Admin API, or written into etcd as APISIX writes them, reach
//! every node by watch; etcd may go away without traffic failing.

use std::time::{Duration, Instant};

use http::Method;
use serde_json::json;

use crate::admin::{managed_settings, mock_route, serves, Managed};
use crate::harness::*;
use crate::services::Etcd;

fn provider(etcd: &Etcd) -> String {
    format!(
        "  config_provider: etcd\n  etcd: {{endpoints: [\"{}\"], prefix: /apisix, timeout: 2s}}\n",
        etcd.endpoint()
    )
}

async fn nodes(etcd: &Etcd, n: usize) -> Vec<Managed> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Managed::start(&provider(etcd), "").await);
    }
    out
}

/// A node on `etcd`, started without waiting for it to be ready; with its
/// Admin API port.
fn spawn_node(etcd: &Etcd) -> (Gateway, u16) {
    let (port, status, admin) = (free_port(), free_port(), free_port());
    let dir = TempDir::new();
    let config = dir.path.join("turnpike.yaml");
    std::fs::write(
        &config,
        managed_settings(port, status, admin, &provider(etcd)),
    )
    .unwrap();
    (Gateway::spawn(dir, config, port, status), admin)
}

async fn health(node: &Managed) -> serde_json::Value {
    get(&format!(
        "http://127.0.0.1:{}/gateway/health",
        node.gw.status_port
    ))
    .await
    .unwrap()
    .json()
}

/// Waits until every node serves `revision`.
async fn all_at(nodes: &[Managed], revision: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in nodes {
        while health(node).await["revision"] != revision {
            assert!(
                Instant::now() < deadline,
                "a node never reached revision {revision}: {}",
                health(node).await
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_from_any_node_or_etcdctl_reach_every_node() {
    let etcd = Etcd::start();
    let nodes = nodes(&etcd, 3).await;
    // Through node 0's Admin API.
    let r = nodes[0]
        .put("/apisix/admin/routes/1", mock_route("/one", "v1"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let first = r.json()["modifiedIndex"].as_u64().unwrap();
    for n in &nodes {
        n.serves("/one", 200, Some("v1")).await;
    }
    // Written into etcd directly, as APISIX writes it.
    let route = json!({"uri": "/two", "plugins": {"mocking": {"response_example": "two"}}, "upstream": {"nodes": {"127.0.0.1:1": 1}}});
    etcd.ctl(&["put", "/apisix/routes/2", &route.to_string()]);
    for n in &nodes {
        n.serves("/two", 200, Some("two")).await;
    }
    // Every node reads what any node wrote, and serves the same revision.
    let r = nodes[2].get("/apisix/admin/routes/1").await;
    assert_eq!(r.json()["value"]["uri"], "/one");
    let r = nodes[1]
        .put("/apisix/admin/routes/1", mock_route("/one", "v2"))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let latest = r.json()["modifiedIndex"].as_u64().unwrap();
    all_at(&nodes, latest).await;
    for n in &nodes {
        n.serves("/one", 200, Some("v2")).await;
    }
    // A broken value written directly is refused by every node, which keep
    // serving; the Admin API still takes good writes.
    etcd.ctl(&["put", "/apisix/routes/3", "{not json"]);
    nodes[0].gw.wait_log("config refused", 1).await;
    nodes[0].serves("/two", 200, Some("two")).await;
    etcd.ctl(&["del", "/apisix/routes/3"]);
    let r = nodes[0]
        .put("/apisix/admin/routes/4", mock_route("/four", "4"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // The history shows writes through any node; a direct write shows as a diff.
    let h = nodes[2].get("/turnpike/admin/history").await.json();
    assert!(h["list"].as_array().unwrap().len() >= 3, "{h}");
    let direct = first + 1;
    let d = nodes[2]
        .get(&format!("/turnpike/admin/history/{direct}"))
        .await
        .json();
    assert_eq!(d["actor"], "written to etcd directly", "{d}");
    assert_eq!(d["changes"][0]["key"], "/apisix/routes/2");
    // Rollback through one node: all follow.
    let r = nodes[1]
        .call(
            Method::POST,
            "/turnpike/admin/rollback",
            Some(json!({"revision": first})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for n in &nodes {
        n.serves("/one", 200, Some("v1")).await;
        n.serves("/two", 404, None).await;
        n.serves("/four", 404, None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_for_10s_under_load_fails_no_request() {
    let mut etcd = Etcd::start();
    let nodes = nodes(&etcd, 2).await;
    nodes[0]
        .put("/apisix/admin/routes/1", mock_route("/steady", "ok"))
        .await;
    for n in &nodes {
        n.serves("/steady", 200, Some("ok")).await;
    }
    let urls = nodes.iter().map(|n| n.gw.url("/steady")).collect();
    let load = Load::start(urls, |r| r.status == 200 && r.body == "ok");
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.stop();
    // Both nodes say the store is down, and stay ready.
    let deadline = Instant::now() + Duration::from_secs(5);
    for n in &nodes {
        loop {
            let h = health(n).await;
            if h["dependencies"][0]["state"] == "down" {
                assert_eq!(h["status"], "degraded", "{h}");
                break;
            }
            assert!(Instant::now() < deadline, "etcd never reported down: {h}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ready = get(&format!("http://127.0.0.1:{}/readyz", n.gw.status_port))
            .await
            .unwrap();
        assert_eq!(ready.status, 200);
        assert_eq!(ready.json()["store"], "down", "{}", ready.body);
    }
    // Writes need the store: 503, and nothing changes.
    let r = nodes[0]
        .put("/apisix/admin/routes/9", mock_route("/nine", "9"))
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    tokio::time::sleep(Duration::from_secs(10)).await;
    etcd.resume();
    // A write made while the nodes reconnect reaches both.
    let route = json!({"uri": "/after", "plugins": {"mocking": {"response_example": "after"}}, "upstream": {"nodes": {"127.0.0.1:1": 1}}});
    etcd.ctl(&["put", "/apisix/routes/2", &route.to_string()]);
    for n in &nodes {
        n.serves("/after", 200, Some("after")).await;
        assert_eq!(health(n).await["dependencies"][0]["state"], "up");
    }
    let (sent, failed) = load.finish().await;
    assert!(sent > 1000, "only {sent} requests were sent");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed while etcd was down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waits_for_etcd_and_a_compaction_loses_nothing() {
    let mut etcd = Etcd::start();
    let route = json!({"uri": "/first", "plugins": {"mocking": {"response_example": "first"}}, "upstream": {"nodes": {"127.0.0.1:1": 1}}});
    etcd.ctl(&["put", "/apisix/routes/1", &route.to_string()]);
    etcd.stop();
    // Started while etcd is down: waits, says why, serves nothing yet.
    let (gw, _) = spawn_node(&etcd);
    gw.wait_log("waiting for etcd before serving", 1).await;
    assert!(
        get(&gw.url("/first")).await.is_err(),
        "served before etcd answered"
    );
    etcd.resume();
    gw.wait_ready().await;
    serves(&gw, "/first", 200, Some("first")).await;
    // Many revisions, compacted away; then etcd restarts: the node lists
    // again and has every change.
    for i in 0..20 {
        etcd.ctl(&["put", "/apisix/routes/1", &json!({"uri": "/first", "plugins": {"mocking": {"response_example": format!("v{i}")}}, "upstream": {"nodes": {"127.0.0.1:1": 1}}}).to_string()]);
    }
    let status_line = etcd.ctl(&["endpoint", "status", "--write-out=json"]);
    let revision = serde_json::from_str::<serde_json::Value>(&status_line).unwrap()[0]["Status"]
        ["header"]["revision"]
        .as_u64()
        .unwrap();
    etcd.ctl(&["compact", &revision.to_string()]);
    serves(&gw, "/first", 200, Some("v19")).await;
    etcd.stop();
    gw.wait_log("etcd watch ended", 1).await;
    etcd.resume();
    etcd.ctl(&["put", "/apisix/routes/2", &json!({"uri": "/second", "plugins": {"mocking": {"response_example": "second"}}, "upstream": {"nodes": {"127.0.0.1:1": 1}}}).to_string()]);
    serves(&gw, "/second", 200, Some("second")).await;
    serves(&gw, "/first", 200, Some("v19")).await;
    gw.wait_log("configuration listed afresh", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stored_config_is_mended_through_the_admin_api() {
    let etcd = Etcd::start();
    let broken = json!({"uri": "/bad", "upstream_id": "missing"});
    etcd.ctl(&["put", "/apisix/routes/bad", &broken.to_string()]);
    // A kind this build does not read is left alone, never an error.
    etcd.ctl(&["put", "/apisix/stream_routes/1", r#"{"server_port": 9100}"#]);
    let (gw, admin) = spawn_node(&etcd);
    let status = gw.status_port;
    gw.wait_log("does not compile", 1).await;
    let ready = get(&format!("http://127.0.0.1:{status}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(
        ready.body.contains("mend it through the Admin API"),
        "{}",
        ready.body
    );
    let key = [("x-api-key", crate::admin::KEY)];
    let r = crate::admin::admin_call(
        admin,
        Method::DELETE,
        "/apisix/admin/routes/bad",
        None,
        &key,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    gw.wait_ready().await;
    let route = mock_route("/good", "good").to_string();
    let r = crate::admin::admin_call(
        admin,
        Method::PUT,
        "/apisix/admin/routes/good",
        Some(route),
        &key,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    serves(&gw, "/good", 200, Some("good")).await;
    assert!(etcd
        .ctl(&["get", "/apisix/stream_routes/1"])
        .contains("9100"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_keeps_only_the_newest_history_records() {
    let etcd = Etcd::start();
    let provider = format!(
        "  config_provider: etcd\n  etcd: {{endpoints: [\"{}\"], prefix: /apisix, timeout: 2s, history_kept: 3}}\n",
        etcd.endpoint()
    );
    let node = Managed::start(&provider, "").await;
    for i in 0..6 {
        let r = node
            .put(
                &format!("/apisix/admin/routes/{i}"),
                mock_route(&format!("/{i}"), "x"),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    // Pruning follows each commit: the three newest records stay.
    let records = || {
        etcd.ctl(&[
            "get",
            "/apisix-turnpike/history/",
            "--prefix",
            "--keys-only",
        ])
        .lines()
        .filter(|l| !l.is_empty())
        .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while records() != 3 {
        assert!(Instant::now() < deadline, "{} records", records());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let history = node.get("/turnpike/admin/history").await.json();
    let keys: Vec<String> = history["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["keys"][0].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(keys.len(), 3, "{history}");
    assert!(keys[0].ends_with("/routes/5"), "newest first: {keys:?}");
}

#[test]
fn etcd_settings_this_build_cannot_use_are_refused_with_the_field() {
    let (ok, err) = check(
        "gateway:\n  config_provider: etcd\n  etcd: {endpoints: [\"https://e:2379\"], history_kept: 0}\n",
    );
    assert!(!ok);
    assert!(
        err.contains("gateway: etcd.endpoints[0]: `https://e:2379` must start with `http://`"),
        "{err}"
    );
    assert!(
        err.contains("gateway: etcd.history_kept: must be at least 1"),
        "{err}"
    );
    let (ok, err) = check("gateway:\n  config_provider: etcd\n  etcd: {endpoints: []}\n");
    assert!(!ok);
    assert!(
        err.contains("etcd.endpoints: at least one endpoint is needed"),
        "{err}"
    );
}
