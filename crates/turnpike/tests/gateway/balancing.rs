//! Load balancing, retries and timeouts against real upstream servers.

use std::collections::HashMap;

use crate::harness::*;

async fn names(
    gw: &Gateway,
    path: &str,
    n: usize,
    header: Option<(&str, String)>,
) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let value = header.as_ref().map(|(_, v)| format!("{v}{i}"));
        let headers: Vec<(&str, &str)> = match (&header, &value) {
            (Some((k, _)), Some(v)) => vec![(*k, v.as_str())],
            _ => vec![],
        };
        let r = get_with(&gw.url(path), &headers).await;
        assert_eq!(r.status, 200, "{}", r.body);
        *counts
            .entry(r.json()["name"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn roundrobin_follows_weights_and_zero_weight_gets_nothing() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: 1, uri: \"/*\", upstream: {{type: roundrobin, nodes: {{\"{}\": 3, \"{}\": 1, \"{}\": 0}}}}}}\n",
        a.node(),
        b.node(),
        c.node()
    ))
    .await;
    // Two workers each run the same smooth sequence; over whole periods the
    // split is exact.
    let counts = names(&gw, "/", 40, None).await;
    assert_eq!(counts.get("a"), Some(&30), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("c"), None);
}

#[tokio::test]
async fn chash_keeps_a_key_on_one_node() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: 1, uri: \"/*\", upstream: {{type: chash, hash_on: header, key: x-user, nodes: {{\"{}\": 1, \"{}\": 1, \"{}\": 1}}}}}}\n",
        a.node(),
        b.node(),
        c.node()
    ))
    .await;
    for user in ["alice", "bob", "carol", "dave"] {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let r = get_with(&gw.url("/"), &[("x-user", user)]).await;
            seen.insert(r.json()["name"].as_str().unwrap().to_owned());
        }
        assert_eq!(seen.len(), 1, "{user} moved between {seen:?}");
    }
    // Different keys spread over the nodes.
    let spread = names(&gw, "/", 60, Some(("x-user", "user-".into()))).await;
    assert_eq!(spread.len(), 3, "{spread:?}");
}

#[tokio::test]
async fn least_conn_and_ewma_serve() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: lc, uri: /lc, upstream: {{type: least_conn, nodes: {{\"{a}\": 1, \"{b}\": 1}}}}}}\n  - {{id: ew, uri: /ew, upstream: {{type: ewma, nodes: {{\"{a}\": 1, \"{b}\": 1}}}}}}\n",
        a = a.node(),
        b = b.node()
    ))
    .await;
    assert_eq!(
        names(&gw, "/lc", 10, None).await.values().sum::<usize>(),
        10
    );
    assert_eq!(
        names(&gw, "/ew", 10, None).await.values().sum::<usize>(),
        10
    );
}

#[tokio::test]
async fn connect_failures_retry_on_another_node() {
    let live = Upstream::start("live").await;
    let dead = free_port();
    let gw = Gateway::start(&format!(
        r#"
routes:
  - {{id: retry, uri: /retry, upstream: {{nodes: {{"127.0.0.1:{dead}": 1, "{live}": 1}}}}}}
  - {{id: no-retry, uri: /no-retry, upstream: {{retries: 0, nodes: {{"127.0.0.1:{dead}": 1}}}}}}
  - {{id: all-dead, uri: /all-dead, upstream: {{nodes: {{"127.0.0.1:{dead}": 1, "127.0.0.1:{dead2}": 1}}}}}}
  - {{id: empty, uri: /empty, upstream: {{nodes: {{}}}}}}
"#,
        live = live.node(),
        dead2 = free_port()
    ))
    .await;
    for _ in 0..10 {
        let r = get(&gw.url("/retry")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(live.hits(), 10);
    for (path, status, msg) in [
        ("/no-retry", 502, "502 Bad Gateway"),
        ("/all-dead", 502, "502 Bad Gateway"),
        ("/empty", 503, "503 Service Temporarily Unavailable"),
    ] {
        let r = get(&gw.url(path)).await.unwrap();
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert_eq!(r.json()["error_msg"], msg);
        assert!(r.json()["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()));
    }
    assert!(
        gw.log_text().contains("connect failed"),
        "the failure is logged"
    );
}

#[tokio::test]
async fn read_timeout_is_504_and_route_timeout_overrides() {
    let slow = Upstream::start("slow").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - {{id: fast-timeout, uri: /slow, timeout: {{read: 0.2}}, upstream: {{timeout: {{read: 5}}, nodes: {{"{n}": 1}}}}}}
  - {{id: patient, uri: /slow-ok, upstream: {{timeout: {{read: 5}}, nodes: {{"{n}": 1}}}}}}
"#,
        n = slow.node()
    ))
    .await;
    let r = get(&gw.url("/slow?ms=1000")).await.unwrap();
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.json()["error_msg"], "504 Gateway Time-out");
    let r = get(&gw.url("/slow-ok?ms=300")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn upstream_statuses_pass_through() {
    let up = Upstream::start("s").await;
    let gw = Gateway::proxying(&up.node()).await;
    for code in [201, 404, 500, 503] {
        let r = get(&gw.url(&format!("/status/{code}"))).await.unwrap();
        assert_eq!(r.status, code);
        assert_eq!(r.body, format!("status {code} from s"));
    }
}

#[tokio::test]
async fn keepalive_pool_reuses_and_retires_connections() {
    let (reused, retired, expired) = (
        Upstream::start("r").await,
        Upstream::start("t").await,
        Upstream::start("e").await,
    );
    let gw = Gateway::start(&format!(
        r#"
routes:
  - {{id: reused, uri: /reused, upstream: {{nodes: {{"{r}": 1}}}}}}
  - {{id: retired, uri: /retired, upstream: {{keepalive_pool: {{requests: 2}}, nodes: {{"{t}": 1}}}}}}
  - {{id: expired, uri: /expired, upstream: {{keepalive_pool: {{idle_timeout: 0.1}}, nodes: {{"{e}": 1}}}}}}
"#,
        r = reused.node(),
        t = retired.node(),
        e = expired.node()
    ))
    .await;
    // One client connection, so one worker and one pool serve every request.
    let c = client();
    let hit = |path: &'static str| {
        let req = http::Request::get(gw.url(path))
            .body(full(bytes::Bytes::new()))
            .unwrap();
        send(&c, req)
    };
    for _ in 0..10 {
        assert_eq!(hit("/reused").await.unwrap().status, 200);
        assert_eq!(hit("/retired").await.unwrap().status, 200);
    }
    assert_eq!(reused.conns(), 1, "ten requests, one warm connection");
    assert_eq!(retired.conns(), 5, "two requests per connection");
    for _ in 0..3 {
        assert_eq!(hit("/expired").await.unwrap().status, 200);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert_eq!(
        expired.conns(),
        3,
        "idle connections past idle_timeout are not reused"
    );
}

#[tokio::test]
async fn send_timeout_when_the_upstream_stops_reading() {
    // Accepts connections and never reads from them.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut keep = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            keep.push(s);
        }
    });
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: 1, uri: \"/*\", upstream: {{timeout: {{send: 0.3, read: 30}}, nodes: {{\"{addr}\": 1}}}}}}\n"
    ))
    .await;
    let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
    let chunks = futures_util::stream::iter((0..256).map(move |_| {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(chunk.clone()))
    }));
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(chunks));
    let started = std::time::Instant::now();
    let r = send(
        &client(),
        http::Request::post(gw.url("/upload")).body(body).unwrap(),
    )
    .await;
    // The gateway gives up on the upstream after the send timeout. The client
    // may see the 504, or a reset if it was still sending when it came.
    if let Ok(r) = r {
        assert_eq!(r.status, 504, "{}", r.body);
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    gw.wait_log("upstream send timed out", 1).await;
    held.abort();
}

#[tokio::test]
async fn connect_timeout_is_504() {
    let node = hanging_node().await;
    let addr = node.addr;
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: 1, uri: \"/*\", upstream: {{retries: 0, timeout: {{connect: 0.3}}, nodes: {{\"{addr}\": 1}}}}}}\n"
    ))
    .await;
    let started = std::time::Instant::now();
    let r = get(&gw.url("/")).await.unwrap();
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    assert!(gw.log_text().contains("connect timed out"));
}

#[tokio::test]
async fn retry_timeout_bounds_the_attempts() {
    // Three nodes whose connects hang: each attempt costs the 0.3 s connect
    // timeout; retry_timeout 0.5 s allows two.
    let hanging = [
        hanging_node().await,
        hanging_node().await,
        hanging_node().await,
    ];
    let nodes: Vec<String> = hanging
        .iter()
        .map(|n| format!("\"{}\": 1", n.addr))
        .collect();
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: 1, uri: \"/*\", upstream: {{retry_timeout: 0.5, timeout: {{connect: 0.3}}, nodes: {{{}}}}}}}\n",
        nodes.join(", ")
    ))
    .await;
    let started = std::time::Instant::now();
    let r = get(&gw.url("/")).await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(
        took >= std::time::Duration::from_millis(550)
            && took < std::time::Duration::from_millis(900),
        "{took:?}"
    );
    assert_eq!(
        gw.log_text().matches("connect timed out").count(),
        2,
        "{}",
        gw.log_text()
    );
}
