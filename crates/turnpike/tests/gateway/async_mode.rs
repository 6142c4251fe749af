//! The asynchronous request mode (`async-request`): 202 at once, results
//! read later, TTLs, idempotency, back-pressure, consumers, kill -9; and
//! a cluster of nodes sharing one queue in a real Redis.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;

use crate::harness::*;
use crate::services::Redis;

/// A gateway whose `data_dir` (where the queue lives) is its own.
async fn gateway(resources: &str) -> (Gateway, TempDir) {
    let data = TempDir::new();
    let (port, status) = (free_port(), free_port());
    let text = format!(
        "{}  data_dir: \"{}\"\n{resources}",
        settings(port, status),
        data.path.display()
    );
    (Gateway::start_raw(&text, port, status).await, data)
}

fn route(node: &str, plugin: &str, extra: &str) -> String {
    format!(
        "routes:\n  - {{id: jobs, uri: /*, plugins: {{async-request: {plugin}{extra}}}, upstream: {{nodes: {{\"{node}\": 1}}}}}}\n"
    )
}

async fn submit(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::post(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(
        &client(),
        req.body(full(Bytes::from_static(b"payload"))).unwrap(),
    )
    .await
    .unwrap()
}

/// Reads the result, waiting for it server-side.
async fn result(gw: &Gateway, id: &str, headers: &[(&str, &str)]) -> Reply {
    get_with(&gw.url(&format!("/turnpike/async/{id}?wait=30")), headers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_slow_requests_are_accepted_at_once_and_all_answered() {
    let up = Upstream::start("slow").await;
    let (gw, _data) = gateway(&route(&up.node(), "{concurrency: 50}", "")).await;
    let started = Instant::now();
    let submissions: Vec<_> = (0..100)
        .map(|i| {
            let url = format!("/slow/{i}?ms=2000");
            let gw = &gw;
            async move { submit(gw, &url, &[]).await }
        })
        .collect();
    let replies = futures_util::future::join_all(submissions).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "100 submissions took {took:?}"
    );
    let mut ids = Vec::new();
    for r in &replies {
        assert_eq!(r.status, 202, "{}", r.body);
        let body = r.json();
        assert_eq!(body["status"], "queued");
        let id = body["request_id"].as_str().unwrap().to_owned();
        assert_eq!(r.headers["location"], format!("/turnpike/async/{id}"));
        ids.push(id);
    }
    // While they run: 202 with the state.
    let r = get(&gw.url(&format!("/turnpike/async/{}", ids[99])))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    for (i, id) in ids.iter().enumerate() {
        let r = result(&gw, id, &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.headers["x-async-request-id"], id.as_str());
        let echo = r.json();
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["uri"], format!("/slow/{i}?ms=2000"));
        // The job id travels as X-Request-Id, for services to spot repeats.
        assert_eq!(echo["headers"]["x-request-id"], id.as_str());
    }
    assert_eq!(up.hits(), 100, "each accepted request ran once");
    let metrics = get(&format!("http://127.0.0.1:{}/metrics", gw.status_port))
        .await
        .unwrap()
        .body;
    for line in [
        "turnpike_async_done_total 100",
        "turnpike_async_queue_depth 0",
        "turnpike_async_wait_seconds_count 100",
    ] {
        assert!(metrics.contains(line), "no `{line}` in:\n{metrics}");
    }
    assert_eq!(
        get(&gw.url("/turnpike/async/0123")).await.unwrap().status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_idempotency_and_a_full_queue() {
    let up = Upstream::start("slow").await;
    let (gw, _data) = gateway(&route(
        &up.node(),
        "{concurrency: 1, ttl: 1, max_queue: 2, retry_after: 7}",
        "",
    ))
    .await;
    // One runs (2 s); the next two wait past their 1 s TTL.
    let first = submit(&gw, "/slow?ms=2000", &[]).await.json()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late: Vec<String> = [
        submit(&gw, "/slow?ms=10", &[("idempotency-key", "k1")]).await,
        submit(&gw, "/slow?ms=10", &[]).await,
    ]
    .iter()
    .map(|r| r.json()["request_id"].as_str().unwrap().to_owned())
    .collect();
    // The same key again: the first id, not a new job.
    let again = submit(&gw, "/slow?ms=10", &[("idempotency-key", "k1")])
        .await
        .json();
    assert_eq!(
        (
            again["request_id"].as_str().unwrap(),
            again["repeated"].as_bool()
        ),
        (late[0].as_str(), Some(true))
    );
    // max_queue 2 waiting: the next is refused, with Retry-After.
    let full = submit(&gw, "/slow?ms=10", &[]).await;
    assert_eq!(full.status, 503, "{}", full.body);
    assert_eq!(full.headers["retry-after"], "7");
    assert_eq!(result(&gw, &first, &[]).await.status, 200);
    for id in &late {
        let r = result(&gw, id, &[]).await;
        assert_eq!(r.status, 410, "{}", r.body);
        assert_eq!(r.json()["status"], "expired");
    }
    assert_eq!(up.hits(), 1, "expired requests never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_consumer_that_asked_reads_the_result() {
    let up = Upstream::start("a").await;
    // Jack's own plugins apply when his queued request runs, too.
    let consumers = "consumers:\n  - {username: jack, plugins: {key-auth: {key: jack-key}, response-rewrite: {headers: {set: {x-for: jack}}}}}\n  - {username: rose, plugins: {key-auth: {key: rose-key}}}\n";
    let routes = format!(
        "routes:\n  - {{id: jobs, uri: /*, plugins: {{key-auth: {{}}, async-request: {{}}}}, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        up.node()
    );
    let (gw, _data) = gateway(&format!("{consumers}{routes}")).await;
    // Authentication runs first: refused requests are never queued.
    assert_eq!(submit(&gw, "/x", &[]).await.status, 401);
    let r = submit(&gw, "/x", &[("apikey", "jack-key")]).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["request_id"].as_str().unwrap().to_owned();
    let mine = result(&gw, &id, &[("apikey", "jack-key")]).await;
    assert_eq!(mine.status, 200, "{}", mine.body);
    assert_eq!(mine.json()["headers"]["x-consumer-username"], "jack");
    assert_eq!(mine.headers["x-for"], "jack");
    assert_eq!(
        result(&gw, &id, &[("apikey", "rose-key")]).await.status,
        404
    );
    assert_eq!(result(&gw, &id, &[]).await.status, 401);
    // The gateway's own answers carry this request's id.
    let unknown = result(&gw, "no-such-id", &[]).await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.headers.contains_key("x-request-id"));
    let bad_wait = get_with(&gw.url(&format!("/turnpike/async/{id}?wait=soon")), &[]).await;
    assert_eq!(bad_wait.status, 400, "{}", bad_wait.body);
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_accepted_requests_survive_kill_9() {
    let up = Upstream::start("a").await;
    // Slow calls and a 3 s ttl: at the kill, most are still waiting.
    let (mut gw, _data) = gateway(&route(&up.node(), "{concurrency: 8, ttl: 3}", "")).await;
    let mut ids = Vec::new();
    for batch in 0..20 {
        let posts: Vec<_> = (0..50)
            .map(|i| {
                let gw = &gw;
                async move { submit(gw, &format!("/slow/{batch}/{i}?ms=1000"), &[]).await }
            })
            .collect();
        for r in futures_util::future::join_all(posts).await {
            assert_eq!(r.status, 202, "{}", r.body);
            ids.push(r.json()["request_id"].as_str().unwrap().to_owned());
        }
    }
    gw.kill_and_restart().await;
    gw.wait_log("queued again", 1).await;
    // Every accepted request ends executed or expired: none is lost.
    let (mut done, mut expired) = (0, 0);
    for id in &ids {
        let r = result(&gw, id, &[]).await;
        match r.status {
            200 => done += 1,
            410 => expired += 1,
            other => panic!("{id}: {other} {}", r.body),
        }
    }
    assert_eq!(done + expired, 1000);
    assert!(expired > 0 && done > 0, "{done} done, {expired} expired");
    assert!(up.hits() >= done, "each result came from a call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_push_the_result() {
    let up = Upstream::start("a").await;
    // One at a time: the second waits behind the first, then runs.
    let (gw, _data) = gateway(&route(&up.node(), "{concurrency: 1}", "")).await;
    submit(&gw, "/slow?ms=500", &[]).await;
    let id = submit(&gw, "/slow?ms=300", &[]).await.json()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = get_with(
        &gw.url(&format!("/turnpike/async/{id}")),
        &[("accept", "text/event-stream")],
    )
    .await;
    assert_eq!(r.status, 200);
    let queued = r
        .body
        .find("\"status\":\"queued\"")
        .expect("a queued event");
    let running = r
        .body
        .find("\"status\":\"running\"")
        .expect("a running event");
    assert!(queued < running, "{}", r.body);
    assert_eq!(r.headers["content-type"], "text/event-stream");
    assert!(r.body.starts_with("event: status\ndata: "), "{}", r.body);
    let result = r
        .body
        .split("event: result\ndata: ")
        .nth(1)
        .expect("a result event");
    let result: serde_json::Value = serde_json::from_str(result.trim()).unwrap();
    assert_eq!(result["status"], "done");
    assert_eq!(result["response"]["status"], 200);
    let echoed: serde_json::Value =
        serde_json::from_str(result["response"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(echoed["uri"], "/slow?ms=300");
}

/// A webhook receiver: answers 500 to the first call, 200 after; keeps
/// each call's headers and body.
/// A webhook receiver, over TLS (self-signed) with `tls`: its URL and the
/// calls it got. It answers the first `failures` calls 500, then 200.
async fn receiver(
    tls: bool,
    failures: usize,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(http::HeaderMap, Bytes)>>>,
) {
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = calls.clone();
    let acceptor = tls.then(self_signed_acceptor);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = http_body_util::BodyExt::collect(body)
                                .await
                                .unwrap()
                                .to_bytes();
                            let mut calls = seen.lock().unwrap();
                            calls.push((parts.headers, body));
                            let status = if calls.len() <= failures { 500 } else { 200 };
                            let mut resp = http::Response::new(full(Bytes::new()));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await;
                    }
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                            .await;
                    }
                }
            });
        }
    });
    let scheme = if tls { "https" } else { "http" };
    (format!("{scheme}://{addr}/hook"), calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_and_retried() {
    let up = Upstream::start("a").await;
    let (url, calls) = receiver(false, 1).await;
    let secret = "a-secret-of-enough-length";
    let plugin = format!("{{callback_url: \"{url}\", callback_secret: {secret}}}");
    let (gw, _data) = gateway(&route(&up.node(), &plugin, "")).await;
    let id = submit(&gw, "/job", &[]).await.json()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The first delivery gets 500; the next, a second later, 200.
    wait_for(
        Duration::from_secs(10),
        || calls.lock().unwrap().len() >= 2,
        || "the webhook was not retried".into(),
    )
    .await;
    let (headers, body) = calls.lock().unwrap()[1].clone();
    assert_eq!(headers["x-turnpike-request-id"], id.as_str());
    let timestamp = headers["x-turnpike-timestamp"].to_str().unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(&body);
    let tag = ring::hmac::sign(&key, &signed);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        headers["x-turnpike-signature"],
        format!("sha256={hex}").as_str()
    );
    let outcome: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (outcome["request_id"].as_str(), outcome["status"].as_str()),
        (Some(id.as_str()), Some("done"))
    );
    assert_eq!(outcome["response"]["status"], 200);
    assert_eq!(
        calls.lock().unwrap().len(),
        2,
        "delivered once it was taken"
    );
}

/// A node of a cluster whose queue is shared in `redis` (`queue: redis`).
async fn node(redis: &Redis, resources: &str) -> Gateway {
    let (port, status) = (free_port(), free_port());
    let text = format!(
        "{}  queue: redis\n  redis: {{url: \"redis://127.0.0.1:{}\"}}\n{resources}",
        settings(port, status),
        redis.port
    );
    Gateway::start_raw(&text, port, status).await
}

/// Reads the result without waiting: its status and `status` field.
async fn state(gw: &Gateway, id: &str) -> (u16, String) {
    let r = get_with(&gw.url(&format!("/turnpike/async/{id}")), &[]).await;
    let status = r.json()["status"].as_str().unwrap_or_default().to_owned();
    (r.status, status)
}

/// Waits until job `id` is running.
async fn until_running(gw: &Gateway, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(gw, id).await != (202, "running".to_owned()) {
        assert!(Instant::now() < deadline, "{id} never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_shares_one_queue_and_takes_over_a_dead_nodes_work() {
    let redis = Redis::start();
    let up = Upstream::start("a").await;
    let routes = route(&up.node(), "{concurrency: 4}", "");
    let mut a = node(&redis, &routes).await;
    // A alone takes four 6 s calls…
    let mut ids = Vec::new();
    for i in 0..4 {
        let r = submit(&a, &format!("/slow/{i}?ms=6000"), &[]).await;
        assert_eq!(r.status, 202, "{}", r.body);
        ids.push(r.json()["request_id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        until_running(&a, id).await;
    }
    // …B, started now, reads what A accepted…
    let b = node(&redis, &routes).await;
    assert_eq!(state(&b, &ids[0]).await, (202, "running".to_owned()));
    // …and A dies in the middle of its calls: B runs them again.
    a.kill();
    for (i, id) in ids.iter().enumerate() {
        let r = result(&b, id, &[]).await;
        assert_eq!(r.status, 200, "{id}: {}", r.body);
        assert_eq!(r.json()["uri"], format!("/slow/{i}?ms=6000"));
    }
    assert!(
        b.log_text().contains("taken over from a silent node"),
        "{}",
        b.log_text()
    );
    assert!(up.hits() >= 8, "A's calls and B's again: {}", up.hits());
    // The survivor takes new work too.
    let r = submit(&b, "/after", &[]).await;
    let id = r.json()["request_id"].as_str().unwrap().to_owned();
    assert_eq!(result(&b, &id, &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_back_pressure_and_expiry_hold_across_the_cluster() {
    let redis = Redis::start();
    let up = Upstream::start("a").await;
    let routes = route(&up.node(), "{concurrency: 1, max_queue: 2, ttl: 1}", "");
    let (a, b) = (node(&redis, &routes).await, node(&redis, &routes).await);
    let key = [("Idempotency-Key", "order-1")];
    let first = submit(&a, "/slow/first?ms=2000", &key).await;
    let id = first.json()["request_id"].as_str().unwrap().to_owned();
    // The same key through the other node is the same request.
    let again = submit(&b, "/slow/first?ms=2000", &key).await;
    assert_eq!(again.json()["request_id"], id.as_str());
    assert_eq!(again.json()["repeated"], true);
    // One runs (concurrency 1, cluster-wide); two may wait; the third is refused.
    until_running(&b, &id).await;
    let waiting: Vec<String> = {
        let mut w = Vec::new();
        for n in 0..2 {
            let r = submit([&a, &b][n], &format!("/w{n}"), &[]).await;
            assert_eq!(r.status, 202, "{}", r.body);
            w.push(r.json()["request_id"].as_str().unwrap().to_owned());
        }
        w
    };
    let full = submit(&b, "/w3", &[]).await;
    assert_eq!(full.status, 503, "{}", full.body);
    assert_eq!(full.headers.get("retry-after").unwrap(), "5");
    // Their 1 s ttl passes while the first runs: expired, never run.
    for w in &waiting {
        assert_eq!(result(&a, w, &[]).await.status, 410);
    }
    let done = result(&a, &id, &[]).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(up.hits(), 1, "only the first request reached the upstream");
    let health = get_with(
        &format!("http://127.0.0.1:{}/gateway/health", a.status_port),
        &[],
    )
    .await;
    assert!(health.body.contains("async queue"), "{}", health.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_refuses_submissions_clearly_and_the_queue_resumes() {
    let mut redis = Redis::start();
    let up = Upstream::start("a").await;
    let gw = node(&redis, &route(&up.node(), "{}", "")).await;
    let health = || async {
        let url = format!("http://127.0.0.1:{}/gateway/health", gw.status_port);
        get_with(&url, &[]).await.json()
    };
    // The queue's Redis as /gateway/health lists it.
    let queue_up = |h: serde_json::Value| {
        h["dependencies"].as_array().unwrap().iter().any(|d| {
            d["address"].as_str().unwrap().ends_with("(async queue)") && d["state"] == "up"
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !queue_up(health().await) {
        assert!(Instant::now() < deadline, "{}", health().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An empty registry in the same Redis counts as up too.
    assert!(
        !gw.log_text().contains("does not answer yet"),
        "{}",
        gw.log_text()
    );
    redis.stop();
    let refused = submit(&gw, "/during", &[]).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.body.contains("cannot store"), "{}", refused.body);
    assert!(!queue_up(health().await), "{}", health().await);
    redis.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    let accepted = loop {
        let r = submit(&gw, "/after", &[]).await;
        if r.status == 202 {
            break r;
        }
        assert!(Instant::now() < deadline, "{} {}", r.status, r.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let id = accepted.json()["request_id"].as_str().unwrap().to_owned();
    let r = result(&gw, &id, &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["uri"], "/after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhooks_are_delivered_and_their_certificates_checked() {
    let up = Upstream::start("a").await;
    let (unchecked, got) = receiver(true, 1).await;
    let (checked, never) = receiver(true, 1).await;
    let node = up.node();
    let routes = format!(
        "routes:\n  - {{id: a, uri: /a, plugins: {{async-request: {{callback_url: \"{unchecked}\", callback_ssl_verify: false}}}}, upstream: {{nodes: {{\"{node}\": 1}}}}}}\n  - {{id: b, uri: /b, plugins: {{async-request: {{callback_url: \"{checked}\"}}}}, upstream: {{nodes: {{\"{node}\": 1}}}}}}\n"
    );
    let (gw, _data) = gateway(&routes).await;
    assert_eq!(submit(&gw, "/a", &[]).await.status, 202);
    assert_eq!(submit(&gw, "/b", &[]).await.status, 202);
    // Unchecked: delivered over TLS (the first answer is 500, then 200).
    wait_for(
        Duration::from_secs(10),
        || got.lock().unwrap().len() >= 2,
        || gw.log_text(),
    )
    .await;
    let outcome: serde_json::Value = serde_json::from_slice(&got.lock().unwrap()[1].1).unwrap();
    assert_eq!(outcome["status"], "done");
    // Checked (the default): a self-signed certificate is refused.
    gw.wait_log(&format!("async webhook to {checked}"), 1).await;
    assert!(gw.log_text().contains("certificate"), "{}", gw.log_text());
    assert!(never.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_being_retried_is_delivered_after_kill_9() {
    let up = Upstream::start("a").await;
    // Two failures: the retries are 1 s and then 2 s apart.
    let (url, calls) = receiver(false, 2).await;
    let plugin = format!("{{callback_url: \"{url}\"}}");
    let (mut gw, _data) = gateway(&route(&up.node(), &plugin, "")).await;
    let id = submit(&gw, "/job", &[]).await.json()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for(
        Duration::from_secs(10),
        || !calls.lock().unwrap().is_empty(),
        || "no first delivery".into(),
    )
    .await;
    // Killed before its first retry (due 1 s after the failure)…
    gw.kill_and_restart().await;
    // …the delivery is still due, and goes on after the restart.
    wait_for(
        Duration::from_secs(15),
        || calls.lock().unwrap().len() >= 3,
        || gw.log_text(),
    )
    .await;
    let (headers, body) = calls.lock().unwrap()[2].clone();
    assert_eq!(headers["x-turnpike-request-id"], id.as_str());
    let outcome: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(outcome["status"], "done");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        calls.lock().unwrap().len(),
        3,
        "nothing sent once delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusters_webhook_is_delivered_once_by_one_node() {
    let redis = Redis::start();
    let up = Upstream::start("a").await;
    let (url, calls) = receiver(false, 1).await;
    let routes = route(&up.node(), &format!("{{callback_url: \"{url}\"}}"), "");
    let (a, _b) = (node(&redis, &routes).await, node(&redis, &routes).await);
    let id = submit(&a, "/job", &[]).await.json()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // One failure, then the retry (by either node) succeeds.
    wait_for(
        Duration::from_secs(10),
        || calls.lock().unwrap().len() >= 2,
        || a.log_text(),
    )
    .await;
    assert_eq!(
        calls.lock().unwrap()[1].0["x-turnpike-request-id"],
        id.as_str()
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        calls.lock().unwrap().len(),
        2,
        "delivered once across the nodes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_runs_the_phases_it_has_left() {
    let up = Upstream::start("a").await;
    let mirror = Upstream::start("mirror").await;
    // before_proxy (proxy-mirror) and header_filter (response-rewrite) run
    // when the worker sends the request, as they would have synchronously.
    let routes = format!(
        "routes:\n  - {{id: jobs, uri: /*, plugins: {{async-request: {{}}, proxy-mirror: {{host: \"http://{}\"}}, response-rewrite: {{headers: {{set: {{x-rewritten: yes}}}}}}}}, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        mirror.node(),
        up.node()
    );
    let (gw, _data) = gateway(&routes).await;
    let id = submit(&gw, "/job", &[]).await.json()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = result(&gw, &id, &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["x-rewritten"], "yes");
    assert_eq!(r.json()["uri"], "/job");
    wait_for(
        Duration::from_secs(5),
        || mirror.hits() > 0,
        || "the queued request was not mirrored".into(),
    )
    .await;
    assert_eq!(up.hits(), 1);
}
