//! Live reloads of the config file.

use std::time::Duration;

use crate::harness::*;

fn routes(nodes: &[&str], extra: usize) -> String {
    let list: Vec<String> = nodes.iter().map(|n| format!("\"{n}\": 1")).collect();
    let mut text = format!(
        "routes:\n  - {{id: main, uri: \"/*\", upstream: {{nodes: {{{}}}}}}}\n",
        list.join(", ")
    );
    for i in 0..extra {
        text.push_str(&format!(
            "  - {{id: extra-{i}, uri: /extra/{i}, upstream: {{nodes: {{{}}}}}}}\n",
            list.join(", ")
        ));
    }
    text
}

#[tokio::test]
async fn reload_under_load_fails_no_request() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = Gateway::start(&routes(&[&a.node()], 0)).await;
    let load = Load::start(vec![gw.url("/load"); 8], |r| r.status == 200);
    // Alternate between configs: one node, the other, both, with more routes.
    let versions = [
        routes(&[&b.node()], 5),
        routes(&[&a.node(), &b.node()], 50),
        routes(&[&a.node()], 0),
    ];
    for (i, version) in versions.iter().cycle().take(9).enumerate() {
        gw.rewrite(version);
        gw.wait_log("configuration reloaded", i + 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sent, failed) = load.finish().await;
    assert!(sent > 100, "too little traffic to prove anything");
    assert_eq!(failed, 0);
    assert!(a.hits() > 0 && b.hits() > 0, "traffic followed the reloads");
}

#[tokio::test]
async fn invalid_edit_is_refused_and_the_old_config_keeps_serving() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = Gateway::start(&routes(&[&a.node()], 0)).await;
    gw.rewrite(&format!(
        "routes:\n  - {{id: main, uri: \"/*\", upstream: {{nodes: {{\"{}\": 1}}}}}}\n  - {{id: broken, uri: /b, upstream: {{type: fastest, nodes: {{\"{}\": 1}}}}}}\n",
        b.node(),
        b.node()
    ));
    gw.wait_log("still serving the previous configuration", 1)
        .await;
    let log = gw.log_text();
    assert!(
        log.contains("route broken: upstream.type: must be one of roundrobin"),
        "{log}"
    );
    let r = get(&gw.url("/x")).await.unwrap();
    assert_eq!(r.json()["name"], "a", "the old config still serves");

    // A syntax error is refused the same way; a good edit then applies.
    gw.rewrite("routes: [ {id: 1, uri: \n");
    gw.wait_log("still serving the previous configuration", 2)
        .await;
    gw.rewrite(&routes(&[&b.node()], 0));
    gw.wait_log("configuration reloaded", 1).await;
    assert_eq!(get(&gw.url("/x")).await.unwrap().json()["name"], "b");

    // SIGHUP reloads too.
    gw.signal(libc::SIGHUP);
    gw.wait_log("configuration reloaded (SIGHUP)", 1).await;
}

#[tokio::test]
async fn kubernetes_style_symlink_swap_is_seen() {
    // A ConfigMap volume: turnpike.yaml -> ..data/turnpike.yaml, and an
    // update re-points ..data at a new directory.
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let (port, status_port) = (free_port(), free_port());
    let dir = TempDir::new();
    for (version, node) in [("v1", a.node()), ("v2", b.node())] {
        std::fs::create_dir(dir.path.join(version)).unwrap();
        let text = format!("{}{}", settings(port, status_port), routes(&[&node], 0));
        std::fs::write(dir.path.join(version).join("turnpike.yaml"), text).unwrap();
    }
    std::os::unix::fs::symlink("v1", dir.path.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/turnpike.yaml", dir.path.join("turnpike.yaml")).unwrap();
    let config = dir.path.join("turnpike.yaml");
    let swap_from = dir.path.join("..data_tmp");
    let swap_to = dir.path.join("..data");
    let gw = Gateway::launch(dir, config, port, status_port).await;
    assert_eq!(get(&gw.url("/")).await.unwrap().json()["name"], "a");

    std::os::unix::fs::symlink("v2", &swap_from).unwrap();
    std::fs::rename(&swap_from, &swap_to).unwrap();
    gw.wait_log("configuration reloaded", 1).await;
    assert_eq!(get(&gw.url("/")).await.unwrap().json()["name"], "b");
}

#[tokio::test]
async fn a_changed_node_setting_is_said_to_apply_on_restart() {
    let up = Upstream::start("a").await;
    let gw = Gateway::proxying(&up.node()).await;
    // Any node setting counts (data_dir was not compared before).
    let text = format!(
        "{}  data_dir: /tmp/elsewhere\n{}",
        settings(gw.port, gw.status_port),
        one_route(&up.node())
    );
    std::fs::write(&gw.config, text).unwrap();
    gw.wait_log("gateway settings changed: they apply on restart", 1)
        .await;
}
