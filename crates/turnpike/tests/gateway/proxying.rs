//! What the upstream receives and what the client gets back.

use bytes::Bytes;
use http::Request;

use crate::harness::*;

#[tokio::test]
async fn forwarded_headers_request_id_and_hop_by_hop() {
    let up = Upstream::start("echo").await;
    let gw = Gateway::proxying(&up.node()).await;

    let r = get_with(
        &gw.url("/hello?a=1&b=two"),
        &[
            ("host", "api.example.com:8080"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-request-id", "client-id-42"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic Zm9v"),
            ("x-custom", "kept"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = r.json();
    assert_eq!(seen["uri"], "/hello?a=1&b=two");
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(
        r.seen("host").as_deref(),
        Some("api.example.com:8080"),
        "pass_host defaults to pass"
    );
    assert_eq!(
        r.seen("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(r.seen("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        r.seen("x-forwarded-host").as_deref(),
        Some("api.example.com:8080")
    );
    assert_eq!(
        r.seen("x-forwarded-port").as_deref(),
        Some(gw.port.to_string().as_str())
    );
    assert_eq!(r.seen("x-request-id").as_deref(), Some("client-id-42"));
    assert_eq!(r.seen("x-custom").as_deref(), Some("kept"));
    for gone in [
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "connection",
    ] {
        assert_eq!(r.seen(gone), None, "{gone} must not reach the upstream");
    }
    // The upstream's own hop-by-hop header does not reach the client.
    assert!(r.headers.get("keep-alive").is_none());
    assert_eq!(r.headers["x-upstream"], "echo");

    // No id, or an unusable one: a fresh UUID, different each time.
    let first = get(&gw.url("/a"))
        .await
        .unwrap()
        .seen("x-request-id")
        .unwrap();
    let second = get_with(&gw.url("/a"), &[("x-request-id", "has spaces!")])
        .await
        .seen("x-request-id")
        .unwrap();
    assert_eq!(first.len(), 36);
    assert_ne!(first, second);
    assert_ne!(second, "has spaces!");
}

#[tokio::test]
async fn pass_host_modes() {
    let up = Upstream::start("echo").await;
    let node = up.node();
    let gw = Gateway::start(&format!(
        r#"
routes:
  - {{id: pass, uri: /pass, upstream: {{pass_host: pass, nodes: {{"{node}": 1}}}}}}
  - {{id: node, uri: /node, upstream: {{pass_host: node, nodes: {{"{node}": 1}}}}}}
  - {{id: rewrite, uri: /rewrite, upstream: {{pass_host: rewrite, upstream_host: internal.svc, nodes: {{"{node}": 1}}}}}}
"#
    ))
    .await;
    let host = |path: &'static str| {
        let url = gw.url(path);
        async move {
            get_with(&url, &[("host", "public.example.com")])
                .await
                .seen("host")
                .unwrap()
        }
    };
    assert_eq!(host("/pass").await, "public.example.com");
    assert_eq!(host("/node").await, node);
    assert_eq!(host("/rewrite").await, "internal.svc");
}

#[tokio::test]
async fn h2c_clients_are_served_and_chunked_bodies_stream() {
    let up = Upstream::start("echo").await;
    let gw = Gateway::proxying(&up.node()).await;

    let r = send(
        &h2c_client(),
        Request::get(gw.url("/h2"))
            .body(full(Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(
        r.json()["version"],
        "HTTP/1.1",
        "the upstream gets HTTP/1.1"
    );
    assert_eq!(
        r.seen("host").as_deref(),
        Some(format!("127.0.0.1:{}", gw.port).as_str())
    );

    // A body of unknown length goes up chunked and arrives whole.
    let chunks = futures_util::stream::iter((0..10).map(|_| {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(Bytes::from(
            vec![b'a'; 1000],
        )))
    }));
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(chunks));
    let r = send(
        &client(),
        Request::post(gw.url("/upload")).body(body).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.json()["bytes"], 10_000);
}

#[tokio::test]
async fn grpc_scheme_speaks_h2c_to_the_upstream() {
    let up = Upstream::start("h2").await;
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: 1, uri: \"/*\", upstream: {{scheme: grpc, nodes: {{\"{n}\": 1}}}}}}\n\
         \x20 - {{id: 2, uri: \"/plugged/*\", plugins: {{request-id: {{}}}}, upstream: {{scheme: grpc, nodes: {{\"{n}\": 1}}}}}}\n",
        n = up.node()
    ))
    .await;
    // gRPC's `te: trailers` reaches the upstream, with plugins on the route too.
    for path in ["/x", "/plugged/x"] {
        let r = get_with(&gw.url(path), &[("te", "trailers")]).await;
        assert_eq!(r.json()["headers"]["te"], "trailers", "{path}: {}", r.body);
    }
    for _ in 0..3 {
        let r = get(&gw.url("/over-h2?x=1")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["version"], "HTTP/2.0");
        assert_eq!(
            r.json()["uri"],
            format!("http://127.0.0.1:{}/over-h2?x=1", gw.port)
        );
    }
}

#[tokio::test]
async fn https_upstreams() {
    let tls = tls_upstream().await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - {{id: plain, uri: /tls, upstream: {{scheme: https, pass_host: rewrite, upstream_host: localhost, nodes: {{"{n}": 1}}}}}}
  - {{id: strict, uri: /verify, upstream: {{scheme: https, tls: {{verify: true}}, nodes: {{"{n}": 1}}}}}}
"#,
        n = tls
    ))
    .await;
    let r = get(&gw.url("/tls")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "over tls");
    // A self-signed certificate fails verification: 502, never the body.
    let r = get(&gw.url("/verify")).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
}
