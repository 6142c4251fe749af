//! Traffic control end to end: traffic-split to real upstreams, and the
//! breaker against an upstream that fails on demand.

use std::process::Command;

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
    let bad = gw.config.with_extension("bad.yaml");
    std::fs::write(
        &bad,
        format!(
            "{}routes:\n  - {{id: r, uri: /r, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{traffic-split: {{rules: [{{weighted_upstreams: [{{upstream_id: gone}}]}}]}}}}}}\n",
            settings(gw.port, gw.status_port),
            stable.node()
        ),
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["check", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("route r: plugins.traffic-split.rules[0].weighted_upstreams[0].upstream_id: upstream `gone` does not exist"),
        "{err}"
    );
}

async fn name_of(gw: &Gateway, headers: &[(&str, &str)]) -> String {
    let r = get_with(&gw.url("/api/x"), headers).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["name"].as_str().unwrap_or_default().to_owned()
}
