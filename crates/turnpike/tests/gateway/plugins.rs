//! Plugins end to end: the real binary, real upstreams, real auth service.
//! Each plugin's own cases live beside it in `turnpike-plugins`; these pin
//! what only the whole request path shows: phases, consumers reaching the
//! upstream, bodies read and rewritten, answers that still pass through
//! `header_filter`, and refused configs.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::harness::*;

/// A route `uri` with `plugins`; its id is the URI's letters (`/old/*` → `old`).
fn route(node: &str, uri: &str, plugins: &str) -> String {
    let id: String = uri.chars().filter(char::is_ascii_alphanumeric).collect();
    format!("  - {{id: {id}, uri: \"{uri}\", plugins: {plugins}, upstream: {{nodes: {{\"{node}\": 1}}}}}}\n")
}

async fn post_json(url: &str, body: &str) -> Reply {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(full(body.to_owned()))
        .unwrap();
    send(&client(), req).await.unwrap()
}

#[tokio::test]
async fn key_auth_names_the_consumer_upstream_and_consumer_plugins_win() {
    let up = Upstream::start("up").await;
    let n = up.node();
    let gw = Gateway::start(&format!(
        r#"
consumers:
  - username: jack
    plugins:
      key-auth: {{key: jack-key}}
      proxy-rewrite: {{uri: /for-jack}}
  - username: rose
    plugins:
      key-auth: {{key: rose-key}}
routes:
{}{}"#,
        route(
            &n,
            "/private/*",
            "{key-auth: {hide_credentials: true}, proxy-rewrite: {uri: /for-everyone}}"
        ),
        route(&n, "/open", "{}"),
    ))
    .await;

    let r = get(&gw.url("/private/x")).await.unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json(),
        serde_json::json!({"message": "Missing API key in request"})
    );
    assert!(r.headers.contains_key("x-request-id"));
    let r = get_with(&gw.url("/private/x"), &[("apikey", "wrong")]).await;
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (401, Some("Invalid API key in request"))
    );

    let r = get_with(&gw.url("/private/x"), &[("apikey", "jack-key")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen("x-consumer-username").as_deref(), Some("jack"));
    assert_eq!(r.seen("apikey"), None, "hide_credentials");
    assert_eq!(
        r.json()["uri"],
        "/for-jack",
        "the consumer's proxy-rewrite wins over the route's"
    );

    let r = get_with(&gw.url("/private/x"), &[("apikey", "rose-key")]).await;
    assert_eq!(r.json()["uri"], "/for-everyone");
    assert_eq!(r.seen("x-consumer-username").as_deref(), Some("rose"));

    // A client cannot claim to be a consumer, in either spelling, nor
    // remove the gateway's claim by naming it in `Connection`.
    let r = get_with(
        &gw.url("/open"),
        &[
            ("x-consumer-username", "jack"),
            ("x_consumer_username", "jack"),
        ],
    )
    .await;
    assert_eq!(r.seen("x-consumer-username"), None);
    assert_eq!(r.seen("x_consumer_username"), None);
    let r = get_with(
        &gw.url("/private/x"),
        &[
            ("apikey", "rose-key"),
            ("connection", "x-consumer-username"),
        ],
    )
    .await;
    assert_eq!(r.seen("x-consumer-username").as_deref(), Some("rose"));
}

#[tokio::test]
async fn basic_auth_and_consumer_restriction() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&format!(
        r#"
consumers:
  - {{username: jack, plugins: {{basic-auth: {{username: jack, password: pw1}}}}}}
  - {{username: rose, plugins: {{basic-auth: {{username: rose, password: pw2}}}}}}
routes:
{}"#,
        route(
            &up.node(),
            "/r",
            "{basic-auth: {}, consumer-restriction: {whitelist: [jack]}}"
        ),
    ))
    .await;
    let r = get(&gw.url("/r")).await.unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["www-authenticate"], "Basic realm='.'");
    // jack:pw1, rose:pw2
    let r = get_with(&gw.url("/r"), &[("authorization", "Basic amFjazpwdzE=")]).await;
    assert_eq!(r.status, 200);
    let r = get_with(&gw.url("/r"), &[("authorization", "Basic cm9zZTpwdzI=")]).await;
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (403, Some("The consumer_name is forbidden."))
    );
}

#[tokio::test]
async fn global_rules_run_first_and_header_filter_sees_plugin_answers() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&format!(
        r#"
global_rules:
  - id: g
    plugins:
      ip-restriction: {{blacklist: ["10.9.9.9"]}}
      response-rewrite: {{headers: {{set: {{x-global: "yes"}}}}}}
routes:
{}"#,
        route(
            &up.node(),
            "/locked",
            "{key-auth: {}, response-rewrite: {headers: {set: {x-route: \"yes\"}}}}"
        ),
    ))
    .await;
    // key-auth answers 401; both header filters still run on that answer.
    let r = get(&gw.url("/locked")).await.unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["x-global"], "yes");
    assert_eq!(r.headers["x-route"], "yes");
    // A global rule applies to routes with no plugins of their own too.
    let r = get(&gw.url("/nothing-here")).await.unwrap();
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn response_phases_still_see_the_request_headers() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route(&up.node(), "/dbg", r#"{response-rewrite: {headers: {set: {x-debug-echo: "$http_x_debug"}}, _meta: {filter: [["http_x_debug", "==", "1"]]}}}"#),
    ))
    .await;
    let r = get_with(&gw.url("/dbg"), &[("x-debug", "1")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-debug-echo"], "1");
    let r = get(&gw.url("/dbg")).await.unwrap();
    assert!(!r.headers.contains_key("x-debug-echo"));
    // With a body, the request goes by hyper's client rather than the own one.
    let req = Request::post(gw.url("/dbg"))
        .header("x-debug", "1")
        .body(full("payload"))
        .unwrap();
    let r = send(&client(), req).await.unwrap();
    assert_eq!(r.headers["x-debug-echo"], "1");
}

#[tokio::test]
async fn cors_preflight_and_actual_requests() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route(&up.node(), "/api", "{cors: {allow_origins: \"http://app.example\", allow_methods: \"GET,POST\", allow_headers: \"x-token\", max_age: 60, expose_headers: \"x-upstream\"}}"),
    ))
    .await;
    let preflight = Request::builder()
        .method("OPTIONS")
        .uri(gw.url("/api"))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .body(full(Bytes::new()))
        .unwrap();
    let r = send(&client(), preflight).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "http://app.example"
    );
    assert_eq!(r.headers["access-control-allow-methods"], "GET,POST");
    assert_eq!(r.headers["access-control-max-age"], "60");
    assert_eq!(up.hits(), 0, "a preflight never reaches the upstream");

    let r = get_with(&gw.url("/api"), &[("origin", "http://app.example")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "http://app.example"
    );
    assert_eq!(r.headers["access-control-expose-headers"], "x-upstream");
    assert_eq!(r.headers["vary"], "Origin");

    let r = get_with(&gw.url("/api"), &[("origin", "http://evil.example")]).await;
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn proxy_rewrite_regex_captures_host_and_headers() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route(&up.node(), "/api/*", "{proxy-rewrite: {regex_uri: [\"^/api/v1/(\\\\w+)/(\\\\d+)$\", \"/$1s/$2\"], host: internal.svc, headers: {set: {x-from: \"$remote_addr\"}, remove: [x-drop]}}}"),
    ))
    .await;
    let r = get_with(&gw.url("/api/v1/user/42?full=1"), &[("x-drop", "1")]).await;
    assert_eq!(r.json()["uri"], "/users/42?full=1");
    assert_eq!(r.seen("host").as_deref(), Some("internal.svc"));
    assert_eq!(r.seen("x-from").as_deref(), Some("127.0.0.1"));
    assert_eq!(r.seen("x-drop"), None);
    // No pattern matches: the path goes as it came.
    let r = get(&gw.url("/api/other")).await.unwrap();
    assert_eq!(r.json()["uri"], "/api/other");
}

#[tokio::test]
async fn bodies_are_validated_and_transformed_both_ways() {
    let up = Upstream::start("up").await;
    let n = up.node();
    let gw = Gateway::start(&format!(
        "routes:\n{}{}",
        route(&n, "/echo-body", r#"{request-validation: {body_schema: {type: object, required: [user_data]}}, body-transformer: {request: {rename: {user_data: user}, add: {api_version: v2}}, response: {rename: {user: user_data}, remove: [api_version]}}}"#),
        route(&n, "/upload", "{request-validation: {body_schema: {type: object}}}"),
    ))
    .await;
    let r = post_json(&gw.url("/echo-body"), r#"{"nope":1}"#).await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("user_data"), "{}", r.body);
    assert_eq!(up.hits(), 0);

    // The upstream echoes what it got: renamed and versioned on the way up,
    // renamed back on the way down.
    let r = post_json(&gw.url("/echo-body"), r#"{"user_data":{"id":7}}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"user_data": {"id": 7}}));
    assert_eq!(r.headers["content-length"], r.body.len().to_string());

    // Declared over the buffering limit: 413 before a byte of it is read.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let head = "POST /upload HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 9000000\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
        .await
        .unwrap();
    let mut answer = vec![0u8; 256];
    let n = tokio::io::AsyncReadExt::read(&mut stream, &mut answer)
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn redirect_mocking_and_request_id() {
    let up = Upstream::start("up").await;
    let n = up.node();
    let gw = Gateway::start(&format!(
        "routes:\n{}{}{}{}",
        route(
            &n,
            "/chaos",
            r#"{fault-injection: {abort: {http_status: 503, body: "injected", vars: [[["http_x_chaos", "==", "on"]]]}}}"#
        ),
        route(
            &n,
            "/old/*",
            r#"{redirect: {regex_uri: ["^/old/(.*)", "/new/$1"], ret_code: 301}}"#
        ),
        route(
            &n,
            "/mock",
            r#"{mocking: {response_example: "{\"ok\":true}", response_status: 201}}"#
        ),
        route(&n, "/traced", "{request-id: {header_name: X-Trace-Id}}"),
    ))
    .await;
    let r = get_with(&gw.url("/chaos"), &[("x-chaos", "on")]).await;
    assert_eq!((r.status, r.body.as_str()), (503, "injected"));
    assert_eq!(get(&gw.url("/chaos")).await.unwrap().status, 200);
    let r = get(&gw.url("/old/page")).await.unwrap();
    assert_eq!(
        (r.status, r.headers["location"].to_str().unwrap()),
        (301, "/new/page")
    );
    let r = get(&gw.url("/mock")).await.unwrap();
    assert_eq!((r.status, r.json()), (201, serde_json::json!({"ok": true})));
    let r = get(&gw.url("/traced")).await.unwrap();
    let id = r.headers["x-trace-id"].to_str().unwrap().to_owned();
    assert_eq!(r.seen("x-trace-id").as_deref(), Some(id.as_str()));
    assert_eq!(up.hits(), 2);
}

/// An auth service: `Authorization: Bearer good` passes with `X-User-Id`;
/// anything else gets 401 with a reason and `WWW-Authenticate`.
async fn auth_service() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let ok = req
                        .headers()
                        .get("authorization")
                        .is_some_and(|v| v == "Bearer good");
                    let seen_uri = req.headers().get("x-forwarded-uri").cloned();
                    let mut resp = if ok {
                        let mut r = Response::new(full(""));
                        r.headers_mut().insert("x-user-id", "42".parse().unwrap());
                        r
                    } else {
                        let mut r = Response::new(full("{\"error\":\"who are you\"}"));
                        *r.status_mut() = StatusCode::UNAUTHORIZED;
                        r.headers_mut()
                            .insert("www-authenticate", "Bearer".parse().unwrap());
                        r.headers_mut()
                            .insert("x-internal", "secret".parse().unwrap());
                        r
                    };
                    if let Some(u) = seen_uri {
                        resp.headers_mut().insert("x-seen-uri", u);
                    }
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}/auth")
}

#[tokio::test]
async fn forward_auth_allows_denies_and_degrades() {
    let up = Upstream::start("up").await;
    let n = up.node();
    let auth = auth_service().await;
    let dead = format!("http://127.0.0.1:{}/auth", free_port());
    // An auth service over TLS with a self-signed certificate (it allows all).
    let tls = format!("https://{}/auth", tls_upstream().await);
    let gw = Gateway::start(&format!(
        "routes:\n{}{}{}{}{}",
        route(&n, "/fa", &format!("{{forward-auth: {{uri: \"{auth}\", request_headers: [authorization], upstream_headers: [x-user-id], client_headers: [www-authenticate]}}}}")),
        route(&n, "/down", &format!("{{forward-auth: {{uri: \"{dead}\", timeout: 500}}}}")),
        route(&n, "/degraded", &format!("{{forward-auth: {{uri: \"{dead}\", timeout: 500, allow_degradation: true}}}}")),
        route(&n, "/tls", &format!("{{forward-auth: {{uri: \"{tls}\", ssl_verify: false}}}}")),
        route(&n, "/tls-checked", &format!("{{forward-auth: {{uri: \"{tls}\"}}}}")),
    ))
    .await;
    // https: allowed without verification; with it (the default), the
    // self-signed certificate fails the call, and the log says why.
    assert_eq!(get(&gw.url("/tls")).await.unwrap().status, 200);
    assert_eq!(get(&gw.url("/tls-checked")).await.unwrap().status, 403);
    gw.wait_log("certificate", 1).await;
    let r = get_with(&gw.url("/fa?q=1"), &[("authorization", "Bearer good")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen("x-user-id").as_deref(), Some("42"));
    let r = get_with(
        &gw.url("/fa"),
        &[("authorization", "Bearer bad"), ("x-user-id", "1")],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body, "{\"error\":\"who are you\"}");
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert!(
        !r.headers.contains_key("x-internal"),
        "only client_headers are passed on"
    );
    assert_eq!(get(&gw.url("/down")).await.unwrap().status, 403);
    assert_eq!(get(&gw.url("/degraded")).await.unwrap().status, 200);
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn a_bad_plugin_config_is_refused_and_the_old_one_keeps_serving() {
    let up = Upstream::start("up").await;
    let n = up.node();
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route(&n, "/m", r#"{mocking: {response_example: "v1"}}"#)
    ))
    .await;
    gw.rewrite(&format!(
        "routes:\n{}",
        route(&n, "/m", r#"{mocking: {response_example: "v2", response_status: 1000}, cors: {allow_credential: true}}"#)
    ));
    gw.wait_log("still serving the previous configuration", 1)
        .await;
    let log = gw.log_text();
    assert!(
        log.contains("route m: plugins.mocking.response_status:"),
        "{log}"
    );
    assert!(
        log.contains("route m: plugins.cors.allow_origins: you can not set '*'"),
        "{log}"
    );
    assert_eq!(get(&gw.url("/m")).await.unwrap().body, "v1");
}

#[tokio::test]
async fn jwt_auth_with_an_rsa_key_from_the_config_file() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let public = include_str!("../../../plugins/src/testdata/rsa_public.pem");
    let private = include_str!("../../../plugins/src/testdata/rsa_private.pem");
    let pem_block: String = public.lines().map(|l| format!("          {l}\n")).collect();
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&format!(
        "consumers:\n  - username: svc\n    plugins:\n      jwt-auth:\n        key: svc-key\n        algorithm: RS256\n        public_key: |\n{pem_block}routes:\n{}",
        route(&up.node(), "/jwt", "{jwt-auth: {}}"),
    ))
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let claims = serde_json::json!({"key": "svc-key", "exp": exp});
    let key = EncodingKey::from_rsa_pem(private.as_bytes()).unwrap();
    let token = encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap();
    let r = get_with(
        &gw.url("/jwt"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen("x-consumer-username").as_deref(), Some("svc"));
    // The public key used as an HS256 secret: refused.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(public.as_bytes()),
    )
    .unwrap();
    let r = get_with(
        &gw.url("/jwt"),
        &[("authorization", &format!("Bearer {forged}"))],
    )
    .await;
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (401, Some("failed to verify jwt"))
    );
}

#[tokio::test]
async fn proxy_mirror_copies_without_the_client_waiting() {
    let up = Upstream::start("up").await;
    let mirror = Upstream::start("mirror").await;
    let dead = free_port();
    let gw = Gateway::start(&format!(
        "routes:\n{}{}",
        route(
            &up.node(),
            "/m/*",
            &format!("{{proxy-mirror: {{host: \"http://{}\"}}}}", mirror.node())
        ),
        route(
            &up.node(),
            "/dead",
            &format!("{{proxy-mirror: {{host: \"http://127.0.0.1:{dead}\"}}}}")
        ),
    ))
    .await;
    let r = post_json(&gw.url("/m/orders?id=1"), r#"{"a":1}"#).await;
    assert_eq!(
        r.json()["name"],
        "up",
        "the client gets the upstream's answer"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while mirror.hits() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(mirror.hits(), 1);
    // A mirror that is down changes nothing for the client.
    assert_eq!(get(&gw.url("/dead")).await.unwrap().status, 200);
}
