//! Health checks end to end: real nodes stopped and started on their
//! ports while the gateway probes them (active) or sends them traffic
//! (passive).

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Response;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::harness::*;

/// A node answering 200 with its name; it can be stopped (listener and
/// connections closed) and started again on the same port.
struct Node {
    server: Stoppable,
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl Node {
    async fn start(name: &'static str) -> Node {
        let hits: Arc<AtomicUsize> = Arc::default();
        let counter = hits.clone();
        let server = Stoppable::start(Arc::new(move |_req| {
            counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Response::new(full(name)) })
        }))
        .await;
        Node {
            port: server.port,
            server,
            hits,
        }
    }

    fn addr(&self) -> String {
        self.server.addr()
    }

    async fn resume(&mut self) {
        self.server.resume().await;
    }

    async fn stop(&mut self) {
        self.server.stop().await;
    }
}

async fn node_state(gw: &Gateway, addr: &str) -> (String, String) {
    let url = format!("http://127.0.0.1:{}/gateway/health", gw.status_port);
    let health = get(&url).await.unwrap().json();
    let nodes = health["upstreams"][0]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let node = nodes
        .iter()
        .find(|n| n["address"] == addr)
        .cloned()
        .unwrap_or_default();
    let text = |k: &str| node[k].as_str().unwrap_or_default().to_owned();
    (text("state"), text("reason"))
}

async fn wait_state(gw: &Gateway, addr: &str, want: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (state, reason) = node_state(gw, addr).await;
        if state == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{addr} still {state} ({reason}) after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn upstream(nodes: &[&Node], checks: &str) -> String {
    let nodes: Vec<String> = nodes
        .iter()
        .map(|n| format!("\"{}\": 1", n.addr()))
        .collect();
    format!(
        "upstreams:\n  - {{id: u, nodes: {{{}}}, checks: {checks}}}\nroutes:\n  - {{id: r, uri: /*, upstream_id: u}}\n",
        nodes.join(", ")
    )
}

#[tokio::test]
async fn active_checks_take_a_stopped_node_out_and_bring_it_back() {
    let (a, mut b, c) = (
        Node::start("a").await,
        Node::start("b").await,
        Node::start("c").await,
    );
    let gw = Gateway::start(&upstream(
        &[&a, &b, &c],
        "{active: {type: http, http_path: /ping, timeout: 0.5, healthy: {interval: 1, successes: 1}, \
         unhealthy: {interval: 1, tcp_failures: 2}}}",
    ))
    .await;
    wait_state(&gw, &b.addr(), "healthy", Duration::from_secs(3)).await;

    b.stop().await;
    let took = wait_state(&gw, &b.addr(), "unhealthy", Duration::from_secs(5)).await;
    assert!(
        took <= Duration::from_secs(4),
        "out within interval × failures: {took:?}"
    );
    let (_, reason) = node_state(&gw, &b.addr()).await;
    assert!(reason.contains("connection failures"), "{reason}");
    let before = b.hits.load(Ordering::SeqCst);
    for _ in 0..30 {
        let r = get(&gw.url("/x")).await.unwrap();
        assert_eq!(r.status, 200);
        assert_ne!(r.body, "b");
    }
    assert_eq!(b.hits.load(Ordering::SeqCst), before);
    let metrics = get(&format!("http://127.0.0.1:{}/metrics", gw.status_port))
        .await
        .unwrap()
        .body;
    assert!(
        metrics.contains(&format!(
            "apisix_upstream_status{{ip=\"127.0.0.1\",name=\"/apisix/upstreams/u\",port=\"{}\"}} 0",
            b.port
        )),
        "{metrics}"
    );

    b.resume().await;
    wait_state(&gw, &b.addr(), "healthy", Duration::from_secs(5)).await;
    let mut saw_b = false;
    for _ in 0..12 {
        saw_b |= get(&gw.url("/x")).await.unwrap().body == "b";
    }
    assert!(saw_b, "traffic reaches the node again");
}

#[tokio::test]
async fn passive_checks_and_retries_lose_no_get_when_a_node_dies() {
    let (a, mut b, c) = (
        Node::start("a").await,
        Node::start("b").await,
        Node::start("c").await,
    );
    let gw = Gateway::start(&upstream(
        &[&a, &b, &c],
        "{passive: {unhealthy: {tcp_failures: 2}}}",
    ))
    .await;
    for _ in 0..9 {
        assert_eq!(get(&gw.url("/x")).await.unwrap().status, 200);
    }
    b.stop().await;
    for i in 0..60 {
        let r = get(&gw.url("/x")).await.unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
    let (state, reason) = node_state(&gw, &b.addr()).await;
    assert_eq!(state, "unhealthy");
    assert!(reason.contains("passive"), "{reason}");
    let failures = gw.log_text().matches("connect failed").count();
    assert!(
        failures <= 3,
        "once down, the node is no longer tried: {failures} failed connects"
    );
}

#[tokio::test]
async fn checks_this_build_cannot_run_are_refused() {
    let (ok, err) = check(
        "upstreams:\n  - {id: u, nodes: {\"127.0.0.1:1\": 1}, checks: {active: {type: grpc}}}\n",
    );
    assert!(!ok);
    assert!(
        err.contains("upstream u: checks.active.type: must be `http`, `https` or `tcp`"),
        "{err}"
    );
    let (ok, err) = check(
        "upstreams:\n  - {id: u, nodes: {\"127.0.0.1:1\": 1}, checks: {active: {healthy: {intervall: 1}}}}\n",
    );
    assert!(!ok);
    assert!(err.contains("checks.active.healthy"), "{err}");
}

#[tokio::test]
async fn https_probes_speak_tls_and_verify_when_asked() {
    let tls = tls_upstream().await;
    let plain = Upstream::start("plain").await;
    let upstream = |verify: bool| {
        format!(
            "upstreams:\n  - {{id: u, nodes: {{\"{tls}\": 1, \"{}\": 1}}, checks: {{active: {{type: https, https_verify_certificate: {verify}, healthy: {{interval: 1, successes: 1}}, unhealthy: {{interval: 1, tcp_failures: 1}}}}}}}}\nroutes:\n  - {{id: r, uri: /*, upstream_id: u}}\n",
            plain.node()
        )
    };
    let gw = Gateway::start(&upstream(false)).await;
    // A node that does not speak TLS fails the handshake: down.
    wait_state(&gw, &plain.node(), "unhealthy", Duration::from_secs(5)).await;
    let (state, _) = node_state(&gw, &tls).await;
    assert_eq!(state, "healthy");
    // Verifying: a self-signed certificate fails too.
    gw.rewrite(&upstream(true));
    gw.wait_log("configuration reloaded", 1).await;
    wait_state(&gw, &tls, "unhealthy", Duration::from_secs(5)).await;
}

/// A node that reads each request and closes the connection unanswered.
async fn dropping_node() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_get_whose_connection_breaks_after_sending_goes_to_another_node() {
    let good = Node::start("good").await;
    let bad = dropping_node().await;
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: r, uri: /*, upstream: {{type: roundrobin, nodes: {{\"{bad}\": 1, \"{}\": 1}}}}}}\n",
        good.addr()
    ))
    .await;
    for _ in 0..6 {
        let r = get(&gw.url("/x")).await.unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "good"),
            "GETs are replayed"
        );
    }
    let mut refused = 0;
    for _ in 0..6 {
        let req = http::Request::post(gw.url("/x"))
            .body(full("order"))
            .unwrap();
        let r = send(&client(), req).await.unwrap();
        if r.status == 502 {
            refused += 1;
        }
    }
    assert!(
        refused > 0,
        "a POST that reached a node is never sent twice"
    );
}

#[tokio::test]
async fn retry_non_idempotent_sends_a_post_and_its_body_again() {
    let good = Upstream::start("good").await;
    let bad = dropping_node().await;
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: r, uri: /*, upstream: {{retry_non_idempotent: true, nodes: {{\"{bad}\": 1, \"{}\": 1}}}}}}\n",
        good.node()
    ))
    .await;
    for i in 0..6 {
        let body = format!("order {i}");
        let req = http::Request::post(gw.url("/echo-body"))
            .body(full(body.clone()))
            .unwrap();
        let r = send(&client(), req).await.unwrap();
        assert_eq!(
            (r.status, r.body),
            (200, body),
            "the POST went again, body and all"
        );
    }
}

/// A node that answers every request with `status`.
async fn status_node(status: u16) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = service_fn(move |_req| async move {
                    let resp = Response::builder().status(status).body(full("busy"));
                    Ok::<_, Infallible>(resp.unwrap())
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn retry_on_statuses_sends_gets_to_the_next_node() {
    let good = Node::start("good").await;
    let busy = status_node(503).await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  - {{id: u, retry_on_statuses: [503], nodes: {{\"{busy}\": 1, \"{}\": 1}}}}\n\
         \x20 - {{id: plain, nodes: {{\"{busy}\": 1, \"{}\": 1}}}}\n\
         \x20 - {{id: solo, retry_on_statuses: [503], retries: 2, nodes: {{\"{busy}\": 1}}}}\n\
         routes:\n  - {{id: r, uri: /r, upstream_id: u}}\n  - {{id: p, uri: /p, upstream_id: plain}}\n\
         \x20 - {{id: s, uri: /s, upstream_id: solo}}\n",
        good.addr(),
        good.addr()
    ))
    .await;
    let solo = get(&gw.url("/s")).await.unwrap();
    assert_eq!(
        (solo.status, solo.body.as_str()),
        (503, "busy"),
        "no other node: the answer itself is passed on"
    );
    for _ in 0..4 {
        assert_eq!(get(&gw.url("/r")).await.unwrap().status, 200);
    }
    let statuses: Vec<u16> = {
        let mut s = Vec::new();
        for _ in 0..4 {
            s.push(get(&gw.url("/p")).await.unwrap().status);
        }
        s
    };
    assert!(
        statuses.contains(&503),
        "without the setting a 503 is an answer: {statuses:?}"
    );
    let mut posts = Vec::new();
    for _ in 0..2 {
        let req = http::Request::post(gw.url("/r")).body(full("x")).unwrap();
        posts.push(send(&client(), req).await.unwrap().status);
    }
    assert!(posts.contains(&503), "a POST is not sent twice: {posts:?}");
}

fn srv(port: u16) -> Vec<String> {
    vec![
        format!("--srv-host=_web._tcp.api.test,node.api.test,{port},0,1"),
        "--host-record=node.api.test,127.0.0.1".into(),
    ]
}

async fn served_by(gw: &Gateway, path: &str) -> String {
    let r = get(&gw.url(path)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

#[tokio::test]
async fn dns_discovery_follows_the_records_and_keeps_the_last_answer() {
    let (a, b) = (Node::start("a").await, Node::start("b").await);
    let mut dns = crate::services::Dnsmasq::start(&srv(a.port));
    let (port, status_port) = (free_port(), free_port());
    let gw = Gateway::start_raw(
        &format!(
            "{}  dns: {{nameservers: [\"127.0.0.1:{}\"]}}\nroutes:\n\
             \x20 - {{id: srv, uri: /srv, upstream: {{discovery_type: dns, service_name: _web._tcp.api.test}}}}\n\
             \x20 - {{id: a, uri: /a, upstream: {{discovery_type: dns, service_name: \"node.api.test:{}\"}}}}\n",
            settings(port, status_port),
            dns.port,
            a.port
        ),
        port,
        status_port,
    )
    .await;
    assert_eq!(served_by(&gw, "/srv").await, "a", "SRV: target and port");
    assert_eq!(
        served_by(&gw, "/a").await,
        "a",
        "A record with the given port"
    );

    dns.restart(&srv(b.port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_by(&gw, "/srv").await != "b" {
        assert!(
            Instant::now() < deadline,
            "the new SRV answer never applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gw.wait_log("discovered nodes changed", 1).await;

    dns.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        served_by(&gw, "/srv").await,
        "b",
        "DNS down: the last answer stays"
    );

    // Names gone from the configuration are no longer watched.
    let reloads = gw.log_text().matches("configuration reloaded").count();
    gw.rewrite(&format!(
        "  dns: {{nameservers: [\"127.0.0.1:{}\"]}}\n{}",
        dns.port,
        one_route(&a.addr())
    ));
    gw.wait_log("configuration reloaded", reloads + 1).await;
    let changes = gw.log_text().matches("DNS answer changed").count();
    dns.restart(&srv(a.port));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        gw.log_text().matches("DNS answer changed").count(),
        changes,
        "a dropped name is not resolved any more"
    );
}
