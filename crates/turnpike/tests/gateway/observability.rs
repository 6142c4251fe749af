//! Metrics and logs end to end: `/metrics` against the requests sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::harness::*;

/// The value of the series of `name` whose labels include all of `labels`.
fn series(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn scrape(gw: &Gateway) -> String {
    let r = get(&format!("http://127.0.0.1:{}/metrics", gw.status_port))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    r.body
}

#[tokio::test]
async fn metrics_count_the_requests_sent_by_status_and_route() {
    let up = Upstream::start("up").await;
    let n = up.node();
    let gw = Gateway::start(&format!(
        "global_rules:\n  - {{id: 1, plugins: {{prometheus: {{}}}}}}\n\
         routes:\n\
         \x20 - {{id: ok, uri: /ok, upstream: {{nodes: {{\"{n}\": 1}}}}}}\n\
         \x20 - {{id: st, uri: /status/*, service_id: s1}}\n\
         services:\n  - {{id: s1, upstream: {{nodes: {{\"{n}\": 1}}}}}}\n"
    ))
    .await;
    for _ in 0..7 {
        assert_eq!(get(&gw.url("/ok")).await.unwrap().status, 200);
    }
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/status/503")).await.unwrap().status, 503);
    }
    assert_eq!(get(&gw.url("/status/201")).await.unwrap().status, 201);
    assert_eq!(get(&gw.url("/nowhere")).await.unwrap().status, 404);

    let text = scrape(&gw).await;
    let node = format!("node=\"{n}\"");
    let status = |code: &str, route: &str| {
        series(
            &text,
            "apisix_http_status",
            &[
                &format!("code=\"{code}\""),
                &format!("route=\"{route}\""),
                &node,
            ],
        )
    };
    assert_eq!(status("200", "ok"), Some(7.0), "{text}");
    assert_eq!(status("503", "st"), Some(3.0));
    assert_eq!(status("201", "st"), Some(1.0));
    assert_eq!(
        series(
            &text,
            "apisix_http_status",
            &["code=\"503\"", "service=\"s1\""]
        ),
        Some(3.0),
        "the service is a label"
    );
    let count = |route: &str, kind: &str| {
        series(
            &text,
            "apisix_http_latency_count",
            &[&format!("route=\"{route}\""), &format!("type=\"{kind}\"")],
        )
    };
    assert_eq!(count("ok", "request"), Some(7.0));
    assert_eq!(count("ok", "upstream"), Some(7.0));
    assert_eq!(count("ok", "apisix"), Some(7.0));
    let egress = series(
        &text,
        "apisix_bandwidth",
        &["route=\"ok\"", "type=\"egress\""],
    )
    .unwrap();
    assert!(egress > 7.0 * 100.0, "bodies and headers counted: {egress}");
    assert!(
        !text.contains("/nowhere") && !text.contains("/status/503"),
        "paths are never labels"
    );
    let total = series(&text, "apisix_http_requests_total", &[]).or_else(|| {
        text.lines()
            .find(|l| l.starts_with("apisix_http_requests_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    });
    assert_eq!(total, Some(12.0), "every request, routed or not");
    assert!(text.contains("apisix_nginx_http_current_connections{state=\"accepted\"}"));
    assert!(text.contains("turnpike_config_revision 1"));

    let apisix_path = get(&format!(
        "http://127.0.0.1:{}/apisix/prometheus/metrics",
        gw.status_port
    ))
    .await
    .unwrap();
    assert_eq!(apisix_path.status, 200, "APISIX's path works too");

    let status = |path: &str| format!("http://127.0.0.1:{}{path}", gw.status_port);
    let services = get(&status("/gateway/services")).await.unwrap().json();
    let list = services["services"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{services}");
    assert_eq!(list[0]["upstream"], "routes/ok");
    assert_eq!(list[0]["routes"], serde_json::json!(["ok"]));
    assert_eq!(list[1]["upstream"], "services/s1");
    assert_eq!(list[1]["nodes"], 1);
    let health = get(&status("/gateway/health")).await.unwrap().json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["revision"], 1);
    assert_eq!(health["upstreams"][0]["nodes"][0]["address"], n.as_str());
}

/// A log collector: records every POSTed body; answers after `delay_ms`;
/// can go down (listener and connections closed) and come back on the
/// same port.
struct Collector {
    server: Stoppable,
    port: u16,
    bodies: Arc<Mutex<Vec<String>>>,
    delay_ms: Arc<AtomicU64>,
}

impl Collector {
    async fn start() -> Collector {
        let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
        let delay_ms: Arc<AtomicU64> = Arc::default();
        let (kept, delay) = (bodies.clone(), delay_ms.clone());
        let server = Stoppable::start(Arc::new(move |req: Request<Incoming>| {
            let (kept, delay) = (kept.clone(), delay.clone());
            Box::pin(async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                tokio::time::sleep(Duration::from_millis(delay.load(Ordering::SeqCst))).await;
                kept.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                Response::new(full("ok"))
            })
        }))
        .await;
        Collector {
            port: server.port,
            server,
            bodies,
            delay_ms,
        }
    }

    async fn resume(&mut self) {
        self.server.resume().await;
    }

    /// Closes the listener and every connection.
    async fn stop(&mut self) {
        self.server.stop().await;
    }

    fn received(&self) -> String {
        self.bodies.lock().unwrap().join("\n")
    }
}

#[tokio::test]
async fn http_logger_never_slows_requests_while_the_collector_is_slow_down_or_back() {
    let up = Upstream::start("up").await;
    let mut collector = Collector::start().await;
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: logged, uri: /logged, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{http-logger: \
         {{uri: \"http://127.0.0.1:{}/collect\", batch_max_size: 1, max_pending_entries: 5, timeout: 1, \
         inactive_timeout: 1}}}}}}\n",
        up.node(),
        collector.port
    ))
    .await;
    let url = gw.url("/logged");

    assert_eq!(get_with(&url, &[("x-mark", "first")]).await.status, 200);
    wait_for(
        Duration::from_secs(10),
        || collector.received().contains("first"),
        || "never saw the first entry".into(),
    )
    .await;
    let entry: serde_json::Value =
        serde_json::from_str(collector.received().lines().next().unwrap()).unwrap();
    assert_eq!(
        entry[0]["route_id"], "logged",
        "a JSON array of APISIX entries"
    );
    assert_eq!(entry[0]["response"]["status"], 200);

    collector.delay_ms.store(3000, Ordering::SeqCst);
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(get(&url).await.unwrap().status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a collector taking 3 s per batch held up requests: {:?}",
        started.elapsed()
    );

    collector.stop().await;
    for _ in 0..10 {
        assert_eq!(
            get(&url).await.unwrap().status,
            200,
            "collector down, traffic fine"
        );
    }
    let dropped = || async {
        let text = scrape(&gw).await;
        series(
            &text,
            "turnpike_logger_dropped_total",
            &["plugin=\"http-logger\""],
        )
        .unwrap_or(0.0)
    };
    assert!(
        dropped().await > 0.0,
        "entries beyond the queue were dropped and counted"
    );

    collector.delay_ms.store(0, Ordering::SeqCst);
    collector.resume().await;
    wait_for_async(|| async {
        let _ = get_with(&url, &[("x-mark", "back")]).await;
        collector.received().contains("\"back\"")
    })
    .await;
}

#[tokio::test]
async fn file_logger_writes_one_line_per_request() {
    let up = Upstream::start("up").await;
    let dir = TempDir::new();
    let path = dir.path.join("access.log");
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: f, uri: /f, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{file-logger: \
         {{path: \"{}\", include_req_body: true}}}}}}\n",
        up.node(),
        path.display()
    ))
    .await;
    for i in 0..5 {
        let req = Request::post(gw.url("/f"))
            .body(full(format!("body {i}")))
            .unwrap();
        assert_eq!(send(&client(), req).await.unwrap().status, 200);
    }
    let lines = || std::fs::read_to_string(&path).unwrap_or_default();
    wait_for(
        Duration::from_secs(10),
        || lines().lines().count() == 5,
        || "never saw five lines".into(),
    )
    .await;
    for (i, line) in lines().lines().enumerate() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(entry["route_id"], "f");
        assert_eq!(entry["request"]["method"], "POST");
        assert_eq!(entry["request"]["body"], format!("body {i}"));
        assert_eq!(entry["response"]["status"], 200);
    }
}

async fn wait_for_async<F: std::future::Future<Output = bool>>(mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "the collector never got entries again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
