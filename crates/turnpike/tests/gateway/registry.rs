//! The service registry: instances register, renew, expire and leave
//! through the Admin API, and `discovery_type: registry` upstreams follow
//! within a second; gateways sharing a Redis see the same instances.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::json;

use crate::admin::Managed;
use crate::harness::*;
use crate::services::Redis;

const ROUTE: &str =
    "routes:\n  - {id: 1, uri: /*, upstream: {discovery_type: registry, service_name: users}}\n";

async fn register(m: &Managed, id: &str, node: &Upstream, ttl: u64) -> Reply {
    let body = json!({"address": "127.0.0.1", "port": node.addr.port(), "ttl": ttl, "metadata": {"zone": "a"}});
    m.call(
        Method::PUT,
        &format!("/turnpike/registry/users/{id}"),
        Some(body),
    )
    .await
}

/// Which upstreams answer `/` over `tries` requests (503s as "none").
async fn answering(gw: &Gateway, tries: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..tries {
        match get(&gw.url("/")).await {
            Ok(r) if r.status == 200 => {
                seen.insert(r.json()["name"].as_str().unwrap_or_default().to_owned())
            }
            Ok(r) => seen.insert(format!("status {}", r.status)),
            Err(e) => seen.insert(e),
        };
    }
    seen
}

/// Waits (at most `within`) until exactly `names` answer.
async fn follows(gw: &Gateway, names: &[&str], within: Duration) {
    let want: BTreeSet<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let deadline = Instant::now() + within;
    loop {
        let seen = answering(gw, 8).await;
        if seen == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "wanted {want:?} within {within:?}, got {seen:?}\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_register_renew_expire_and_leave() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let m = Managed::start("", ROUTE).await;
    follows(&m.gw, &["status 503"], Duration::from_secs(1)).await;
    let r = register(&m, "a", &a, 30).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["service"], "users");
    follows(&m.gw, &["a"], Duration::from_secs(1)).await;
    register(&m, "b", &b, 2).await;
    follows(&m.gw, &["a", "b"], Duration::from_secs(1)).await;
    // Reads: the service, every service, and /gateway/services.
    let r = m.get("/turnpike/registry/users").await.json();
    assert_eq!(r["total"], 2, "{r}");
    assert_eq!(r["instances"][0]["metadata"]["zone"], "a");
    let r = m.get("/turnpike/registry").await.json();
    assert_eq!(r["services"]["users"].as_array().unwrap().len(), 2);
    let s = get(&format!(
        "http://127.0.0.1:{}/gateway/services",
        m.gw.status_port
    ))
    .await
    .unwrap()
    .json();
    let users = s["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service_name"] == "users")
        .cloned()
        .unwrap();
    assert_eq!(
        (users["discovery_type"].clone(), users["nodes"].clone()),
        (json!("registry"), json!(2)),
        "{s}"
    );
    // Renewals keep b past its 2 s TTL.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(register(&m, "b", &b, 2).await.status, 200);
    }
    follows(&m.gw, &["a", "b"], Duration::from_millis(100)).await;
    // Deregistered: gone within a second.
    let r = m
        .call(Method::DELETE, "/turnpike/registry/users/a", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    follows(&m.gw, &["b"], Duration::from_secs(1)).await;
    assert_eq!(
        m.call(Method::DELETE, "/turnpike/registry/users/a", None)
            .await
            .status,
        404
    );
    // Not renewed: b drops out once its TTL passes.
    follows(&m.gw, &["status 503"], Duration::from_secs(4)).await;
    // Bad registrations, and the key is required.
    let bad = m
        .call(
            Method::PUT,
            "/turnpike/registry/users/c",
            Some(json!({"address": "127.0.0.1", "port": 0})),
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let bad = m
        .call(
            Method::PUT,
            "/turnpike/registry/users/c",
            Some(json!({"address": "127.0.0.1", "port": 80, "colour": 1})),
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let none = m
        .call_with(
            Method::PUT,
            "/turnpike/registry/users/c",
            Some(json!({"address": "127.0.0.1", "port": 80})),
            &[],
        )
        .await;
    assert_eq!(none.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_sharing_redis_see_the_same_instances() {
    let redis = Redis::start();
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let shared = format!("  redis: {{url: \"redis://127.0.0.1:{}\"}}\n", redis.port);
    let one = Managed::start(&shared, ROUTE).await;
    let two = Managed::start(&shared, ROUTE).await;
    // Registered through one, served by both.
    assert_eq!(register(&one, "a", &a, 30).await.status, 200);
    follows(&one.gw, &["a"], Duration::from_secs(1)).await;
    follows(&two.gw, &["a"], Duration::from_secs(1)).await;
    assert_eq!(register(&two, "b", &b, 30).await.status, 200);
    follows(&one.gw, &["a", "b"], Duration::from_secs(1)).await;
    // Deregistered through the other.
    assert_eq!(
        two.call(Method::DELETE, "/turnpike/registry/users/a", None)
            .await
            .status,
        200
    );
    follows(&one.gw, &["b"], Duration::from_secs(1)).await;
    follows(&two.gw, &["b"], Duration::from_secs(1)).await;
    // A TTL that lapses drops the instance on every node.
    assert_eq!(register(&one, "b", &b, 1).await.status, 200);
    follows(&two.gw, &["status 503"], Duration::from_secs(3)).await;
    follows(&one.gw, &["status 503"], Duration::from_secs(1)).await;
    // A gateway started later reads what is registered.
    assert_eq!(register(&one, "a", &a, 30).await.status, 200);
    let three = Managed::start(&shared, ROUTE).await;
    follows(&three.gw, &["a"], Duration::from_secs(2)).await;
    let health = get(&format!(
        "http://127.0.0.1:{}/gateway/health",
        three.gw.status_port
    ))
    .await
    .unwrap()
    .json();
    assert!(
        health["dependencies"]
            .to_string()
            .contains("service registry"),
        "{health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_gateway_keeps_its_registry_across_kill_9() {
    let a = Upstream::start("a").await;
    let mut m = Managed::embedded(ROUTE).await;
    assert_eq!(register(&m, "a", &a, 30).await.status, 200);
    follows(&m.gw, &["a"], Duration::from_secs(1)).await;
    m.gw.kill_and_restart().await;
    follows(&m.gw, &["a"], Duration::from_millis(300)).await;
}
