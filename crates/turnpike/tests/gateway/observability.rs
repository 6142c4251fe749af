//! Metrics and logs end to end: `/metrics` against the requests sent.

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
}
