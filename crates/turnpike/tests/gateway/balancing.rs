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
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: 1, uri: \"/*\", upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        up.node()
    ))
    .await;
    for code in [201, 404, 500, 503] {
        let r = get(&gw.url(&format!("/status/{code}"))).await.unwrap();
        assert_eq!(r.status, code);
        assert_eq!(r.body, format!("status {code} from s"));
    }
}
