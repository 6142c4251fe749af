//! Rate limiting end to end: counters kept across reloads, one counter in
//! a real Redis for two gateways, and a Redis outage.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::services::Redis;

fn limited_route(node: &str, id: &str, limit: &str) -> String {
    format!(
        "  - {{id: {id}, uri: /{id}, plugins: {{limit-count: {{{limit}}}}}, upstream: {{nodes: {{\"{node}\": 1}}}}}}\n"
    )
}

/// Sends `n` GETs at once, spread over `urls`; returns the statuses.
async fn burst(urls: &[String], n: usize) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            tokio::spawn(async move { get(&url).await.map(|r| r.status).unwrap_or(0) })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

#[tokio::test]
async fn local_counters_survive_a_reload() {
    let up = Upstream::start("up").await;
    let limit = "count: 2, time_window: 60, rejected_code: 429";
    let routes = |extra: &str| format!("routes:\n{}{extra}", limited_route(&up.node(), "a", limit));
    let gw = Gateway::start(&routes("")).await;
    let first = burst(&[gw.url("/a")], 2).await;
    assert_eq!(first, [200, 200]);
    let r = get(&gw.url("/a")).await.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["x-ratelimit-remaining"], "0");

    gw.rewrite(&routes(&format!(
        "  - {{id: b, uri: /b, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        up.node()
    )));
    gw.wait_log("configuration reloaded", 1).await;
    assert_eq!(get(&gw.url("/b")).await.unwrap().status, 200);
    assert_eq!(
        get(&gw.url("/a")).await.unwrap().status,
        429,
        "a reload that leaves the route alone keeps its counter"
    );
}

#[tokio::test]
async fn two_gateways_share_one_counter_in_redis() {
    let redis = Redis::start();
    let up = Upstream::start("up").await;
    let limit = format!(
        "count: 30, time_window: 60, key_type: constant, key: all, rejected_code: 429, \
         policy: redis, redis_host: 127.0.0.1, redis_port: {}, redis_password: \"\"",
        redis.port
    );
    let routes = format!("routes:\n{}", limited_route(&up.node(), "shared", &limit));
    let one = Gateway::start(&routes).await;
    let two = Gateway::start(&routes).await;
    let statuses = burst(&[one.url("/shared"), two.url("/shared")], 100).await;
    assert_eq!(count(&statuses, 200), 30, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 70, "{statuses:?}");
    assert_eq!(up.hits(), 30, "rejected requests never reach the upstream");
}

#[tokio::test]
async fn redis_outage_follows_allow_degradation_then_limiting_resumes() {
    let mut redis = Redis::start();
    let up = Upstream::start("up").await;
    let limit = |degrade: bool| {
        format!(
            "count: 2, time_window: 60, key_type: constant, key: k, rejected_code: 429, \
             policy: redis, redis_host: 127.0.0.1, redis_port: {}, redis_timeout: 300, \
             allow_degradation: {degrade}",
            redis.port
        )
    };
    let gw = Gateway::start(&format!(
        "routes:\n{}{}",
        limited_route(&up.node(), "strict", &limit(false)),
        limited_route(&up.node(), "lenient", &limit(true)),
    ))
    .await;
    let strict = gw.url("/strict");
    let first = burst(std::slice::from_ref(&strict), 3).await;
    assert_eq!(count(&first, 429), 1, "{first:?}");

    redis.stop();
    let r = get(&strict).await.unwrap();
    assert_eq!(r.status, 503, "no Redis, no degradation: refused");
    assert_eq!(r.json()["message"], "rate limit store unreachable");
    let lenient = burst(&[gw.url("/lenient")], 5).await;
    assert_eq!(lenient, [200; 5], "allow_degradation lets traffic through");
    gw.wait_log("redis", 1).await;
    let health = get(&format!(
        "http://127.0.0.1:{}/gateway/health",
        gw.status_port
    ))
    .await
    .unwrap()
    .json();
    assert_eq!(health["status"], "degraded", "{health}");
    let redis_dep = &health["dependencies"][0];
    assert_eq!(redis_dep["kind"], "redis");
    assert_eq!(redis_dep["state"], "down");
    assert_eq!(redis_dep["address"], format!("127.0.0.1:{}/0", redis.port));

    redis.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = 503;
    while status == 503 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = get(&strict).await.unwrap().status;
    }
    assert_eq!(status, 200, "limiting resumed with Redis back (empty)");
    assert_eq!(get(&strict).await.unwrap().status, 200);
    assert_eq!(get(&strict).await.unwrap().status, 429, "and counts again");
    let health = get(&format!(
        "http://127.0.0.1:{}/gateway/health",
        gw.status_port
    ))
    .await
    .unwrap()
    .json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["dependencies"][0]["state"], "up");
}

/// A route `/slow` with one plugin.
fn slow_route(node: &str, plugin: &str) -> String {
    format!(
        "routes:\n  - {{id: slow, uri: /slow, plugins: {{{plugin}}}, upstream: {{nodes: {{\"{node}\": 1}}}}}}\n"
    )
}

#[tokio::test]
async fn limit_conn_and_limit_req_in_redis_span_two_gateways() {
    let redis = Redis::start();
    let up = Upstream::start("up").await;
    let shared = format!(
        "key_type: constant, key: all, rejected_code: 429, policy: redis, \
         redis_host: 127.0.0.1, redis_port: {}",
        redis.port
    );
    let conn = slow_route(
        &up.node(),
        &format!("limit-conn: {{conn: 2, burst: 0, default_conn_delay: 0.1, {shared}}}"),
    );
    let (one, two) = (Gateway::start(&conn).await, Gateway::start(&conn).await);
    let urls = [one.url("/slow?ms=600"), two.url("/slow?ms=600")];
    let statuses = burst(&urls, 6).await;
    assert_eq!(count(&statuses, 200), 2, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 4, "{statuses:?}");
    // Slots go back as responses end (the release is sent after the
    // response, so allow it a moment).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(burst(&urls, 2).await, [200, 200], "slots were given back");

    let req = slow_route(
        &up.node(),
        &format!("limit-req: {{rate: 1, burst: 0, {shared}}}"),
    );
    let (one, two) = (Gateway::start(&req).await, Gateway::start(&req).await);
    let statuses = burst(&[one.url("/slow"), two.url("/slow")], 10).await;
    assert_eq!(
        count(&statuses, 200),
        1,
        "one bucket for both: {statuses:?}"
    );
    assert_eq!(count(&statuses, 429), 9, "{statuses:?}");
}

#[tokio::test]
async fn limit_req_delays_a_burst_locally() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&slow_route(
        &up.node(),
        "limit-req: {rate: 10, burst: 3, key_type: constant, key: all, rejected_code: 429}",
    ))
    .await;
    let started = Instant::now();
    let statuses = burst(&[gw.url("/slow")], 6).await;
    assert_eq!(
        count(&statuses, 200),
        4,
        "one at once, three in the burst: {statuses:?}"
    );
    assert_eq!(count(&statuses, 429), 2, "{statuses:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the third in the burst waited 300 ms"
    );
}

#[tokio::test]
async fn consumer_group_counters_survive_a_reload() {
    let up = Upstream::start("up").await;
    let resources = |extra: &str| {
        format!(
            r#"
consumer_groups:
  - id: free
    plugins:
      limit-count: {{count: 2, time_window: 60, key_type: constant, key: free, rejected_code: 429}}
consumers:
  - username: ann
    group_id: free
    plugins:
      key-auth: {{key: ann-key}}
routes:
  - {{id: api, uri: /api, plugins: {{key-auth: {{}}}}, upstream: {{nodes: {{"{n}": 1}}}}}}
{extra}"#,
            n = up.node()
        )
    };
    let gw = Gateway::start(&resources("")).await;
    let key = [("apikey", "ann-key")];
    assert_eq!(get_with(&gw.url("/api"), &key).await.status, 200);
    assert_eq!(get_with(&gw.url("/api"), &key).await.status, 200);
    gw.rewrite(&resources(&format!(
        "  - {{id: other, uri: /other, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        up.node()
    )));
    gw.wait_log("configuration reloaded", 1).await;
    assert_eq!(
        get_with(&gw.url("/api"), &key).await.status,
        429,
        "the group's count outlived the reload"
    );
}

#[tokio::test]
async fn limit_conn_gives_the_slot_back_when_the_upstream_times_out() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: slow, uri: /slow, timeout: {{read: 0.3}}, upstream: {{nodes: {{\"{}\": 1}}}}, \
         plugins: {{limit-conn: {{conn: 1, burst: 0, default_conn_delay: 0.1, key_type: constant, key: k, \
         rejected_code: 429, _meta: {{filter: [[\"http_x_tier\", \"==\", \"free\"]]}}}}}}}}\n",
        up.node()
    ))
    .await;
    let tier = [("x-tier", "free")];
    let r = get_with(&gw.url("/slow?ms=2000"), &tier).await;
    assert_eq!(r.status, 504, "{}", r.body);
    let r = get_with(&gw.url("/slow?ms=0"), &tier).await;
    assert_eq!(r.status, 200, "the timed-out request gave its slot back");
}
