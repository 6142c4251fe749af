//! The process: check, status endpoints, bad input, drain on SIGTERM, and an
//! APISIX standalone file run as it is.

use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

#[test]
fn plugins_lists_the_registry_and_prints_schemas() {
    let out = Command::new(binary()).arg("plugins").output().unwrap();
    assert!(out.status.success());
    let list = String::from_utf8_lossy(&out.stdout);
    let first = list.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("request-id") && first.contains("12015"),
        "{list}"
    );
    assert!(list
        .lines()
        .any(|l| l.starts_with("key-auth") && l.contains("2500") && l.contains("authentication")));
    let out = Command::new(binary())
        .args(["plugins", "key-auth"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["schema"]["properties"]["header"]["default"], "apikey");
    assert_eq!(doc["consumer_schema"]["required"][0], "key");
    let out = Command::new(binary())
        .args(["plugins", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn check_reports_every_bad_resource_and_field_and_exits_1() {
    let dir = TempDir::new();
    let bad = dir.path.join("bad.yaml");
    std::fs::write(
        &bad,
        r#"
routes:
  - {id: r1, uri: /a, upstream_id: missing}
  - {id: r2, uri: /b, methods: [FETCH], upstream: {nodes: {"127.0.0.1:80": 1}}}
upstreams:
  - {id: u1, type: chash, nodes: {"127.0.0.1:80": 1}}
"#,
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["check", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for line in [
        "upstream u1: key: required for type chash",
        "route r1: upstream_id: upstream `missing` does not exist",
        "route r2: methods[0]: unknown method `FETCH`",
    ] {
        assert!(err.contains(line), "missing {line:?} in:\n{err}");
    }

    let settings = dir.path.join("settings.yaml");
    std::fs::write(
        &settings,
        "gateway:\n  listen: [\"localhost:9080\"]\n  admin: {listen: \"0.0.0.0:9180\"}\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["check", "-c"])
        .arg(&settings)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gateway: listen[0]: `localhost:9080` is not ip:port"),
        "{err}"
    );
    assert!(
        err.contains("gateway: admin.key: the Admin API listens on 0.0.0.0:9180"),
        "{err}"
    );

    let good = dir.path.join("good.yaml");
    std::fs::write(
        &good,
        "routes:\n  - {uri: /a, upstream: {nodes: {\"127.0.0.1:80\": 1}}}\n#END\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["check", "-c"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 routes, 1 upstreams)"));

    let out = Command::new(binary())
        .args(["run", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "run refuses a bad file too");
    let out = Command::new(binary()).arg("version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("turnpike "));
}

#[tokio::test]
async fn status_listener_answers_health_and_readiness() {
    let gw = Gateway::start("routes: []\n").await;
    let health = get(&format!("http://127.0.0.1:{}/healthz", gw.status_port))
        .await
        .unwrap();
    assert_eq!(
        (health.status, health.body.as_str()),
        (200, "{\"status\":\"ok\"}")
    );
    let ready = get(&format!("http://127.0.0.1:{}/readyz", gw.status_port))
        .await
        .unwrap();
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["revision"], 1);
}

#[tokio::test]
async fn malformed_http_gets_400_and_the_gateway_lives_on() {
    let up = Upstream::start("u").await;
    let gw = Gateway::proxying(&up.node()).await;
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
            .await
            .unwrap();
        s.write_all(garbage).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    }
    assert_eq!(get(&gw.url("/still-up")).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let up = Upstream::start("slow").await;
    let mut gw = Gateway::proxying(&up.node()).await;
    let url = gw.url("/slow?ms=1000");
    let in_flight = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    gw.signal(libc::SIGTERM);
    let r = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(r.status, 200);
    let code = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, Some(0), "{}", gw.log_text());
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
            .await
            .is_err(),
        "listener closed"
    );
    assert!(gw.log_text().contains("draining"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_exits_without_waiting() {
    let up = Upstream::start("slow").await;
    let mut gw = Gateway::proxying(&up.node()).await;
    let url = gw.url("/slow?ms=4000");
    let _in_flight = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    gw.signal(libc::SIGTERM);
    gw.wait_log("draining", 1).await;
    gw.signal(libc::SIGINT);
    let code = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(3)));
    assert_eq!(code, Some(0), "{}", gw.log_text());
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "waited {:?}",
        t0.elapsed()
    );
    assert!(gw.log_text().contains("second signal"));
}

/// An APISIX `apisix.yaml` has no `gateway:` key and so uses the default
/// ports (9080, status 9090); run only when they are free.
#[tokio::test(flavor = "multi_thread")]
async fn apisix_standalone_file_runs_as_it_is() {
    let up = Upstream::start("apisix").await;
    let text = format!(
        "routes:\n  -\n    uri: /hello\n    upstream:\n      nodes:\n        \"{}\": 1\n      type: roundrobin\n#END\n",
        up.node()
    );
    if std::net::TcpListener::bind("0.0.0.0:9080").is_err()
        || std::net::TcpListener::bind("127.0.0.1:9090").is_err()
    {
        panic!("ports 9080 and 9090 must be free for this test (the APISIX defaults)");
    }
    let gw = Gateway::start_raw(&text, 9080, 9090).await;
    let r = get(&gw.url("/hello")).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "apisix");
}
