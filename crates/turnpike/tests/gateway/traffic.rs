//! Traffic control end to end: traffic-split to real upstreams, and the
//! breaker against an upstream that fails on demand.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Response;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::harness::*;

#[tokio::test]
async fn traffic_split_routes_by_header_and_weight() {
    let (stable, canary, v2) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
        Upstream::start("v2").await,
    );
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  - {{id: v2, nodes: {{"{v2}": 1}}}}
routes:
  - id: api
    uri: /api/*
    upstream: {{nodes: {{"{stable}": 1}}}}
    plugins:
      traffic-split:
        rules:
          - match: [{{vars: [["http_x_api_version", "==", "2"]]}}]
            weighted_upstreams: [{{upstream_id: v2}}]
          - weighted_upstreams:
              - upstream: {{nodes: {{"{canary}": 1}}, timeout: {{connect: 1, send: 1, read: 1}}}}
                weight: 1
              - weight: 3
"#,
        v2 = v2.node(),
        stable = stable.node(),
        canary = canary.node(),
    ))
    .await;
    let mut seen = std::collections::HashMap::new();
    for _ in 0..8 {
        *seen.entry(name_of(&gw, &[]).await).or_insert(0) += 1;
    }
    assert_eq!(seen.get("canary"), Some(&2), "weight 1 of 4: {seen:?}");
    assert_eq!(
        seen.get("stable"),
        Some(&6),
        "the route's own upstream, 3 of 4"
    );
    for _ in 0..3 {
        assert_eq!(name_of(&gw, &[("x-api-version", "2")]).await, "v2");
    }
    assert_eq!(v2.hits(), 3);

    // A reference to a missing upstream is refused, naming the field.
    let route = |plugins: &str| {
        let node = stable.node();
        format!("routes:\n  - {{id: r, uri: /r, upstream: {{nodes: {{\"{node}\": 1}}}}, plugins: {plugins}}}\n")
    };
    let (ok, err) = check(&route(
        "{traffic-split: {rules: [{weighted_upstreams: [{upstream_id: gone}]}]}}",
    ));
    assert!(!ok);
    assert!(
        err.contains("route r: plugins.traffic-split.rules[0].weighted_upstreams[0].upstream_id: upstream `gone` does not exist"),
        "{err}"
    );

    // Only where a plugin declares upstreams is an `upstream` object one:
    // a body schema with a field named `upstream` is just a schema.
    let (ok, err) = check(&route(
        "{request-validation: {body_schema: {type: object, properties: {upstream: {type: object}}}}}",
    ));
    assert!(ok, "{err}");
}

async fn name_of(gw: &Gateway, headers: &[(&str, &str)]) -> String {
    let r = get_with(&gw.url("/api/x"), headers).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["name"].as_str().unwrap_or_default().to_owned()
}

/// An upstream that answers 200 `good <n>` or, while `failing`, 500.
struct Toggle {
    node: String,
    failing: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
}

impl Toggle {
    async fn start() -> Toggle {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = listener.local_addr().unwrap().to_string();
        let (failing, hits) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (f, h) = (failing.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (f, h) = (f.clone(), h.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                        let resp = if f.load(Ordering::SeqCst) {
                            Response::builder().status(500).body(full("broken"))
                        } else {
                            Response::builder().body(full(format!("good {n}")))
                        };
                        async move { Ok::<_, Infallible>(resp.unwrap()) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Toggle {
            node,
            failing,
            hits,
        }
    }

    fn fail(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn api_breaker_opens_half_opens_and_closes() {
    let svc = Toggle::start().await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - id: svc
    uri: /svc
    upstream: {{nodes: {{"{}": 1}}}}
    plugins:
      api-breaker:
        break_response_code: 503
        break_response_body: "breaker open"
        unhealthy: {{failures: 2}}
        healthy: {{successes: 1}}
"#,
        svc.node
    ))
    .await;
    let url = gw.url("/svc");
    svc.fail(true);
    assert_eq!(get(&url).await.unwrap().status, 500);
    assert_eq!(get(&url).await.unwrap().status, 500);
    let r = get(&url).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (503, "breaker open"), "open");
    assert_eq!(svc.hits(), 2, "an open breaker does not touch the upstream");

    tokio::time::sleep(Duration::from_millis(2100)).await;
    svc.fail(false);
    assert_eq!(get(&url).await.unwrap().status, 200, "half-open after 2 s");
    svc.fail(true);
    assert_eq!(
        get(&url).await.unwrap().status,
        500,
        "one success closed it: the next request reaches the upstream"
    );
    assert_eq!(svc.hits(), 4);
}

#[tokio::test]
async fn api_breaker_fallbacks_serve_the_cached_response_or_another_upstream() {
    let svc = Toggle::start().await;
    let backup = Upstream::start("backup").await;
    let breaker = |fallback: &str| {
        format!("{{api-breaker: {{break_response_code: 503, unhealthy: {{failures: 1}}, fallback: {fallback}}}}}")
    };
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  - {{id: backup, nodes: {{"{backup}": 1}}}}
routes:
  - {{id: cached, uri: /cached, upstream: {{nodes: {{"{svc}": 1}}}}, plugins: {cached}}}
  - {{id: other, uri: /other, upstream: {{nodes: {{"{svc}": 1}}}}, plugins: {other}}}
"#,
        backup = backup.node(),
        svc = svc.node,
        cached = breaker("{cache: true}"),
        other = breaker("{upstream_id: backup}"),
    ))
    .await;
    let good = get(&gw.url("/cached?page=1")).await.unwrap();
    assert_eq!(good.status, 200);
    svc.fail(true);
    assert_eq!(get(&gw.url("/cached?page=1")).await.unwrap().status, 500);
    let hits = svc.hits();
    let r = get(&gw.url("/cached?page=1")).await.unwrap();
    assert_eq!(
        (r.status, &r.body),
        (200, &good.body),
        "the last good response"
    );
    assert_eq!(r.headers["x-turnpike-fallback"], "cache");
    let r = get(&gw.url("/cached?page=2")).await.unwrap();
    assert_eq!(
        r.status, 503,
        "nothing cached for this request: the break response"
    );
    assert_eq!(svc.hits(), hits, "the upstream was left alone");

    assert_eq!(get(&gw.url("/other")).await.unwrap().status, 500);
    let r = get(&gw.url("/other")).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "backup", "sent to the fallback upstream");
    assert_eq!(r.headers["x-turnpike-fallback"], "upstream");
}

#[tokio::test]
async fn proxy_cache_hits_and_serves_stale_while_the_upstream_fails() {
    let svc = Toggle::start().await;
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: c, uri: /c, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{proxy-cache: \
         {{cache_ttl: 1, stale_if_error: 30}}}}}}\n",
        svc.node
    ))
    .await;
    let url = gw.url("/c");
    let first = get(&url).await.unwrap();
    assert_eq!(first.headers["apisix-cache-status"], "MISS");
    let again = get(&url).await.unwrap();
    assert_eq!(again.headers["apisix-cache-status"], "HIT");
    assert_eq!(again.body, first.body);
    assert_eq!(svc.hits(), 1, "the hit never reached the upstream");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    svc.fail(true);
    let stale = get(&url).await.unwrap();
    assert_eq!(stale.status, 200);
    assert_eq!(stale.headers["apisix-cache-status"], "STALE");
    assert_eq!(stale.body, first.body);
    svc.fail(false);
    let fresh = get(&url).await.unwrap();
    assert_eq!(fresh.headers["apisix-cache-status"], "EXPIRED");
    assert_ne!(fresh.body, first.body, "a new copy: {}", fresh.body);
}
