//! Routing end to end: each rule decides which upstream answers.

use crate::harness::*;

#[tokio::test]
async fn routes_by_path_host_method_address_and_vars() {
    let (a, b, c, d, e) = (
        Upstream::start("exact").await,
        Upstream::start("param").await,
        Upstream::start("host").await,
        Upstream::start("post").await,
        Upstream::start("canary").await,
    );
    let gw = Gateway::start(&format!(
        r#"
routes:
  - {{id: exact, uri: /api/users, upstream: {{nodes: {{"{a}": 1}}}}}}
  - {{id: param, uri: /api/users/:id, upstream: {{nodes: {{"{b}": 1}}}}}}
  - {{id: host, uri: "/*", hosts: ["*.example.com"], upstream: {{nodes: {{"{c}": 1}}}}}}
  - {{id: post, uri: /api/*, methods: [POST], upstream: {{nodes: {{"{d}": 1}}}}}}
  - {{id: canary, uri: /api/*, priority: 10, vars: [["http_x_canary", "==", "1"]], upstream: {{nodes: {{"{e}": 1}}}}}}
  - {{id: nowhere, uri: /private/*, remote_addrs: ["10.0.0.0/8"], upstream: {{nodes: {{"{a}": 1}}}}}}
  - {{id: off, uri: /off, status: 0, upstream: {{nodes: {{"{a}": 1}}}}}}
"#,
        a = a.node(),
        b = b.node(),
        c = c.node(),
        d = d.node(),
        e = e.node()
    ))
    .await;
    let name = |r: &Reply| r.json()["name"].as_str().unwrap().to_owned();

    assert_eq!(name(&get(&gw.url("/api/users")).await.unwrap()), "exact");
    assert_eq!(name(&get(&gw.url("/api/users/42")).await.unwrap()), "param");
    assert_eq!(
        name(&get_with(&gw.url("/x"), &[("host", "shop.example.com")]).await),
        "host"
    );
    assert_eq!(
        name(&get_with(&gw.url("/api/other"), &[("x-canary", "1")]).await),
        "canary"
    );

    let post = http::Request::post(gw.url("/api/orders"))
        .body(full("{}"))
        .unwrap();
    assert_eq!(name(&send(&client(), post).await.unwrap()), "post");

    for path in ["/api/other", "/private/x", "/off", "/"] {
        let r = get(&gw.url(path)).await.unwrap();
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        let body = r.json();
        assert_eq!(body["error_msg"], "404 Route Not Found");
        assert_eq!(
            body["request_id"].as_str().unwrap(),
            r.headers["x-request-id"].to_str().unwrap()
        );
    }
}

#[tokio::test]
async fn path_spellings_cannot_bypass_a_route() {
    let (public, admin) = (
        Upstream::start("public").await,
        Upstream::start("admin").await,
    );
    let gw = Gateway::start(&format!(
        r#"
routes:
  - {{id: public, uri: "/public/*", upstream: {{nodes: {{"{p}": 1}}}}}}
  - {{id: admin, uri: "/admin/*", remote_addrs: ["10.0.0.0/8"], upstream: {{nodes: {{"{a}": 1}}}}}}
"#,
        p = public.node(),
        a = admin.node()
    ))
    .await;
    // Every spelling of /admin/x is judged as /admin/x: refused for 127.0.0.1.
    for path in [
        "/public/../admin/x",
        "/public/%2e%2e/admin/x",
        "//admin/x",
        "/public/..%2Fadmin/x",
        "/%61dmin/x",
    ] {
        let r = get(&gw.url(path)).await.unwrap();
        assert_eq!(r.status, 404, "{path} reached {}", r.body);
    }
    assert_eq!(admin.hits(), 0);
    // A path that resolves inside /public goes there, normalised.
    let r = get(&gw.url("/public/a/./b/../c?q=1")).await.unwrap();
    assert_eq!(r.json()["uri"], "/public/a/c?q=1");
    // Climbing above the root, or a broken escape, is a bad request.
    for path in ["/public/../../etc", "/public/%zz"] {
        let r = get(&gw.url(path)).await.unwrap();
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(r.json()["error_msg"], "400 Bad Request");
    }
}

#[tokio::test]
async fn service_and_upstream_references_resolve() {
    let (u1, u2) = (Upstream::start("u1").await, Upstream::start("u2").await);
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  - {{id: 1, nodes: {{"{u1}": 1}}}}
services:
  - {{id: s1, upstream: {{nodes: {{"{u2}": 1}}}}}}
routes:
  - {{id: by-upstream-id, uri: /one, upstream_id: 1}}
  - {{id: by-service, uri: /two, service_id: s1}}
  - {{id: own-over-service, uri: /three, service_id: s1, upstream_id: 1}}
"#,
        u1 = u1.node(),
        u2 = u2.node()
    ))
    .await;
    let name = |path: &'static str| {
        let url = gw.url(path);
        async move {
            get(&url).await.unwrap().json()["name"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    assert_eq!(name("/one").await, "u1");
    assert_eq!(name("/two").await, "u2");
    assert_eq!(name("/three").await, "u1");
}
