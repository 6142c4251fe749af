use std::sync::Arc;

use super::*;
use crate::parse;

fn registry() -> Arc<Registry> {
    turnpike_plugins::registry()
}

fn compile_text(text: &str) -> Result<Snapshot, Vec<ConfigError>> {
    compile(
        &parse(text).expect("parses").resources,
        &registry(),
        None,
        1,
    )
}

fn errors(text: &str) -> Vec<String> {
    compile_text(text)
        .unwrap_err()
        .iter()
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn references_resolve_as_apisix() {
    let s = compile_text(
        r#"
upstreams:
  - id: u1
    nodes: {"127.0.0.1:8001": 1}
services:
  - id: s1
    upstream_id: u1
    hosts: ["svc.example.com"]
  - id: s2
    upstream: {nodes: {"127.0.0.1:8002": 1}}
routes:
  - {id: inline, uri: /a, upstream: {nodes: {"127.0.0.1:8003": 1}}}
  - {id: by-id, uri: /b, upstream_id: u1}
  - {id: via-service, uri: /c, service_id: s1}
  - {id: own-wins, uri: /d, service_id: s2, upstream_id: u1}
  - {id: off, uri: /e, upstream_id: u1, status: 0}
"#,
    )
    .unwrap();
    let ids: Vec<&str> = s.routes.iter().map(|r| &*r.id).collect();
    assert_eq!(
        ids,
        vec!["inline", "by-id", "via-service", "own-wins"],
        "disabled routes are left out"
    );
    assert_eq!(&*s.routes[0].upstream.key, "routes/inline");
    assert_eq!(&*s.routes[1].upstream.key, "upstreams/u1");
    assert!(Arc::ptr_eq(&s.routes[1].upstream, &s.routes[2].upstream));
    assert_eq!(&*s.routes[3].upstream.key, "upstreams/u1");
    assert_eq!(s.routes[2].service_id.as_deref(), Some("s1"));
}

#[test]
fn service_hosts_apply_to_routes_without_their_own() {
    let s = compile_text(
        r#"
services:
  - {id: s1, hosts: ["svc.example.com"], upstream: {nodes: {"127.0.0.1:1": 1}}}
routes:
  - {id: 1, uri: /x, service_id: s1}
"#,
    )
    .unwrap();
    let vars = std::collections::HashMap::<&str, &str>::new();
    let req = |host| turnpike_router::Request {
        path: "/x",
        host,
        method: "GET",
        remote: None,
        vars: &vars,
    };
    assert_eq!(s.router.find(&req("svc.example.com")), Some(0));
    assert_eq!(s.router.find(&req("other")), None);
}

#[test]
fn missing_references_are_refused() {
    let errs = errors(
        r#"
routes:
  - {id: 1, uri: /a, upstream_id: nope}
  - {id: 2, uri: /b, service_id: gone}
  - {id: 3, uri: /c}
  - {id: 4, uri: /d, upstream_id: nope, plugin_config_id: pc9}
"#,
    );
    assert_eq!(
        errs,
        vec![
            "route 1: upstream_id: upstream `nope` does not exist",
            "route 2: service_id: service `gone` does not exist",
            "route 3: upstream: no upstream: set `upstream`, `upstream_id`, or a `service_id` whose service has one",
            "route 4: plugin_config_id: plugin config `pc9` does not exist",
            "route 4: upstream_id: upstream `nope` does not exist",
        ]
    );
}

#[test]
fn upstream_fields_are_checked_with_paths() {
    let errs = errors(
        r#"
upstreams:
  - id: 1
    type: random
    scheme: tcp
    pass_host: rewrite
    nodes: {"127.0.0.1:0": 1, "bad host": 1}
    timeout: {connect: 0, read: -1}
    keepalive_pool: {size: 0}
  - id: 2
    type: chash
    nodes: [{host: "127.0.0.1", port: 80, weight: 1}]
  - id: 3
    type: chash
    key: nope_var
    nodes: [{host: "", port: 80, weight: 1}]
"#,
    );
    assert_eq!(
        errs,
        vec![
            "upstream 1: type: must be one of roundrobin, chash, least_conn, ewma",
            "upstream 1: scheme: must be one of http, https, grpc, grpcs",
            "upstream 1: nodes.127.0.0.1:0: expected host:port",
            "upstream 1: nodes.bad host: expected host:port",
            "upstream 1: upstream_host: required when pass_host is `rewrite`",
            "upstream 1: timeout.connect: must be more than 0 and at most 31536000 seconds",
            "upstream 1: timeout.read: must be more than 0 and at most 31536000 seconds",
            "upstream 1: keepalive_pool.size: must be at least 1",
            "upstream 2: key: required for type chash (what to hash on)",
            "upstream 3: nodes[0].host: expected an IP address or a host name",
            "upstream 3: key: unknown variable `nope_var` (known: uri, request_uri, host, request_method, scheme, remote_addr, remote_port, server_addr, server_port, args, arg_*, http_*, cookie_*, route_id, service_id, consumer_name, upstream_addr, status, request_id)",
        ]
    );
}

#[test]
fn inline_upstream_errors_carry_the_upstream_prefix() {
    let errs =
        errors("routes:\n  - {id: 1, uri: /a, upstream: {type: x, nodes: {\"127.0.0.1:1\": 1}}}\n");
    assert_eq!(
        errs,
        vec!["route 1: upstream.type: must be one of roundrobin, chash, least_conn, ewma"]
    );
}

#[test]
fn router_errors_name_the_route() {
    let errs = errors(
        r#"
routes:
  - {id: 7, uri: "/a/*/b", upstream: {nodes: {"127.0.0.1:1": 1}}}
  - {id: 8, uris: ["/x"], uri: "/y", upstream: {nodes: {"127.0.0.1:1": 1}}}
  - {id: 9, uri: "/z", vars: [["arg_a", "=~", "1"]], upstream: {nodes: {"127.0.0.1:1": 1}}}
"#,
    );
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(
        errs[0].starts_with("route 8: uris: set `uri` or `uris`, not both"),
        "{errs:?}"
    );
    assert!(errs[1].starts_with("route 7: uri: `/a/*/b`"), "{errs:?}");
    assert!(
        errs[2].starts_with("route 9: vars[0][1]: unknown operator"),
        "{errs:?}"
    );
}

#[test]
fn duplicate_and_missing_ids() {
    let errs = errors(
        r#"
upstreams:
  - {nodes: {"127.0.0.1:1": 1}}
routes:
  - {id: 1, uri: /a, upstream: {nodes: {"127.0.0.1:1": 1}}}
  - {id: 1, uri: /b, upstream: {nodes: {"127.0.0.1:1": 1}}}
"#,
    );
    assert_eq!(
        errs[0],
        "upstream #1: id: missing: this resource is referred to by id"
    );
    assert!(errs[1].starts_with("route 1: id: duplicate id"));
}

#[test]
fn plugin_errors_name_resource_plugin_and_field() {
    let errs = errors(
        r#"
services:
  - {id: s1, plugins: {cors: {max_age: "long"}}}
global_rules:
  - {id: g1, plugins: {no-such-plugin: {}}}
routes:
  - {id: 1, uri: /a, plugins: {key-auth: {header: 7}, proxy-rewrite: {regex_uri: ["(", "/x"]}}, upstream: {nodes: {"127.0.0.1:1": 1}}}
  - {id: 2, uri: /b, plugins: {ip-restriction: {whitelist: ["1.1.1.1"], _meta: {filter: [["nope_var", "==", 1]]}}}, upstream: {nodes: {"127.0.0.1:1": 1}}}
"#,
    );
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(
        errs[0].starts_with("global rule g1: plugins.no-such-plugin: unknown plugin"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("service s1: plugins.cors.max_age: "),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("route 1: plugins.key-auth.header: "),
        "{errs:#?}"
    );
    assert!(
        errs[3].starts_with("route 1: plugins.proxy-rewrite.regex_uri[0]: "),
        "{errs:#?}"
    );
    assert!(
        errs[4].starts_with("route 2: plugins.ip-restriction._meta.filter[0][0]: unknown variable"),
        "{errs:#?}"
    );
}

fn names(chain: &turnpike_plugin::Chain) -> Vec<(&'static str, i32)> {
    chain
        .entries()
        .iter()
        .map(|e| (e.name, e.priority))
        .collect()
}

#[test]
fn chains_merge_by_precedence_and_sort_by_priority() {
    let s = compile_text(
        r#"
services:
  - id: s
    plugins:
      proxy-rewrite: {uri: /from-service}
      cors: {}
      request-id: {}
plugin_configs:
  - id: pc
    plugins:
      proxy-rewrite: {uri: /from-plugin-config}
      ip-restriction: {whitelist: ["0.0.0.0/0"]}
routes:
  - id: 1
    uri: /a
    service_id: s
    plugin_config_id: pc
    upstream: {nodes: {"127.0.0.1:1": 1}}
    plugins:
      key-auth: {}
      request-id: {_meta: {disable: true}}
      cors: {_meta: {priority: 1}}
"#,
    )
    .unwrap();
    let route = &s.routes[0];
    assert_eq!(
        names(&route.chain),
        vec![
            ("ip-restriction", 3000),
            ("key-auth", 2500),
            ("proxy-rewrite", 1008),
            ("cors", 1)
        ]
    );
}

#[test]
fn consumers_credentials_groups_and_global_rules() {
    let s = compile_text(
        r#"
consumer_groups:
  - {id: gold, plugins: {response-rewrite: {headers: {set: {x-tier: gold}}}}}
consumers:
  - username: jack
    group_id: gold
    plugins:
      key-auth: {key: jack-key}
      proxy-rewrite: {uri: /jack}
  - id: jack/credentials/second
    plugins:
      basic-auth: {username: jack, password: pw}
global_rules:
  - {id: 1, plugins: {request-id: {}}}
routes:
  - {id: 1, uri: /a, plugins: {key-auth: {}}, upstream: {nodes: {"127.0.0.1:1": 1}}}
"#,
    )
    .unwrap();
    let jack = &s.consumers["jack"];
    assert_eq!(&*jack.group_id.clone().unwrap(), "gold");
    assert_eq!(
        names(&jack.chain),
        vec![("proxy-rewrite", 1008), ("response-rewrite", 899)]
    );
    assert_eq!(names(&s.global), vec![("request-id", 12015)]);
}

#[test]
fn bad_consumers_and_credentials_are_refused() {
    let errs = errors(
        r#"
consumers:
  - {username: "bad name"}
  - {username: a, plugins: {key-auth: {}}}
  - {username: b, plugins: {key-auth: {key: same}}}
  - {username: c, plugins: {key-auth: {key: same}}}
  - {username: d, group_id: none}
  - {id: zed/credentials/1, plugins: {key-auth: {key: z}}}
  - {id: a/credentials/1, plugins: {cors: {}}}
"#,
    );
    assert_eq!(
        errs,
        vec![
            "consumer bad name: username: must be letters, digits, `_` and `-`",
            "consumer a: plugins.key-auth: \"key\" is a required property",
            "consumer d: group_id: consumer group `none` does not exist",
            "credential zed/credentials/1: id: consumer `zed` does not exist",
            "credential a/credentials/1: plugins.cors: `cors` is not an authentication plugin; credentials hold only authentication plugins",
            "consumer c: plugins.key-auth.key: duplicate key: another consumer has it",
        ]
    );
}

#[test]
fn unchanged_upstreams_are_carried_over_and_changed_ones_rebuilt() {
    let v1 = "upstreams:\n  - {id: a, nodes: {\"127.0.0.1:1\": 1}}\n  - {id: b, nodes: {\"127.0.0.1:2\": 1}}\nroutes:\n  - {id: 1, uri: /a, upstream_id: a}\n  - {id: 2, uri: /b, upstream_id: b}\n";
    let v2 = v1.replace("127.0.0.1:2\": 1", "127.0.0.1:2\": 5");
    let first = compile_text(v1).unwrap();
    let second = compile(&parse(&v2).unwrap().resources, &registry(), Some(&first), 2).unwrap();
    assert!(Arc::ptr_eq(
        &first.upstreams["upstreams/a"],
        &second.upstreams["upstreams/a"]
    ));
    assert!(!Arc::ptr_eq(
        &first.upstreams["upstreams/b"],
        &second.upstreams["upstreams/b"]
    ));
    assert_eq!(second.revision, 2);
}

#[test]
fn node_priorities_form_fallback_groups() {
    let s = compile_text(
        r#"
routes:
  - id: 1
    uri: /a
    upstream:
      nodes:
        - {host: 127.0.0.1, port: 1, weight: 1, priority: 0}
        - {host: 127.0.0.1, port: 2, weight: 1, priority: 10}
        - {host: 127.0.0.1, port: 3, weight: 1, priority: -1}
"#,
    )
    .unwrap();
    let up = &s.routes[0].upstream;
    assert_eq!(up.pick(None, &[]), Some(1));
    assert_eq!(up.pick(None, &[1]), Some(0));
    assert_eq!(up.pick(None, &[1, 0]), Some(2));
    assert_eq!(up.pick(None, &[0, 1, 2]), None);
    assert_eq!(up.max_attempts(), 3);
}

#[test]
fn node_addresses_and_authorities() {
    let s = compile_text(
        r#"
routes:
  - {id: 1, uri: /a, upstream: {scheme: https, nodes: {"[::1]:8443": 1, "example.com": 1, "10.0.0.1:443": 1}}}
"#,
    )
    .unwrap();
    let nodes = &s.routes[0].upstream.nodes;
    let view: Vec<(&str, &str)> = nodes.iter().map(|n| (&*n.addr, &*n.authority)).collect();
    assert_eq!(
        view,
        vec![
            ("10.0.0.1:443", "10.0.0.1"),
            ("[::1]:8443", "[::1]:8443"),
            ("example.com:443", "example.com")
        ]
    );
}

#[test]
fn route_timeout_overrides_upstream_timeout() {
    let s = compile_text("routes:\n  - {id: 1, uri: /a, timeout: {read: 2}, upstream: {timeout: {connect: 1, read: 5}, nodes: {\"127.0.0.1:1\": 1}}}\n").unwrap();
    let t = s.routes[0].timeouts;
    assert_eq!(t.connect, Duration::from_secs(1));
    assert_eq!(t.read, Duration::from_secs(2));
    assert_eq!(t.send, Duration::from_secs(60));
}

#[test]
fn vars_combination_templates() {
    assert_eq!(
        combination("$host-$uri").unwrap(),
        vec![
            KeyPart::Var(Var::Host),
            KeyPart::Literal("-".into()),
            KeyPart::Var(Var::Uri)
        ]
    );
    assert!(combination("plain").is_err());
    assert!(combination("$nope").is_err());
}

#[test]
fn ten_thousand_routes_compile() {
    let mut text = String::from("routes:\n");
    for i in 0..10_000 {
        text.push_str(&format!(
            "  - {{id: {i}, uri: \"/svc/{i}/*\", upstream: {{nodes: {{\"127.0.0.1:{}\": 1}}}}}}\n",
            1000 + i % 50
        ));
    }
    let s = compile_text(&text).unwrap();
    assert_eq!(s.routes.len(), 10_000);
}

#[test]
fn absurd_durations_are_refused_not_fatal() {
    let errs = errors(
        "routes:\n  - {id: 1, uri: /a, timeout: {read: 1e20}, upstream: {retry_timeout: -1, keepalive_pool: {idle_timeout: 1e300}, nodes: {\"127.0.0.1:1\": 1}}}\n",
    );
    assert_eq!(
        errs,
        vec![
            "route 1: upstream.retry_timeout: must be 0 to 31536000 seconds",
            "route 1: upstream.keepalive_pool.idle_timeout: must be 0 to 31536000 seconds",
        ],
        "the route's own timeout is checked once its upstream compiles"
    );
    let errs = errors("routes:\n  - {id: 1, uri: /a, timeout: {read: 1e20}, upstream: {nodes: {\"127.0.0.1:1\": 1}}}\n");
    assert_eq!(
        errs,
        vec!["route 1: timeout.read: must be more than 0 and at most 31536000 seconds"]
    );
}

#[test]
fn upstream_id_wins_over_an_inline_upstream_as_in_apisix() {
    let s = compile_text(
        "upstreams:\n  - {id: u1, nodes: {\"127.0.0.1:1\": 1}}\nroutes:\n  - {id: 1, uri: /a, upstream_id: u1, upstream: {nodes: {\"127.0.0.1:2\": 1}}}\n",
    )
    .unwrap();
    assert_eq!(&*s.routes[0].upstream.key, "upstreams/u1");
    let errs = errors("routes:\n  - {id: 1, uri: /a, upstream_id: nope, upstream: {nodes: {\"127.0.0.1:2\": 1}}}\n");
    assert_eq!(
        errs,
        vec!["route 1: upstream_id: upstream `nope` does not exist"]
    );
}

#[test]
fn route_code_and_malformed_plugin_lists_are_refused() {
    let errs = errors(
        r#"
plugin_configs:
  - {id: pc, plugins: [key-auth]}
routes:
  - {id: 1, uri: /a, filter_func: "function(vars) return true end", upstream: {nodes: {"127.0.0.1:1": 1}}}
  - {id: 2, uri: /b, hosts: ["example.com:8080"], upstream: {pass_host: rewrite, upstream_host: "bad\nhost", nodes: {"127.0.0.1:1": 1}}}
"#,
    );
    assert_eq!(
        errs,
        vec![
            "plugin config pc: plugins: must be a map of plugin name to configuration",
            "route 1: filter_func: Lua functions are not supported; use `vars` expressions",
            "route 2: upstream.upstream_host: must be a host name, with an optional port",
            "route 2: hosts[0]: `example.com:8080` is not a host name or a wildcard such as *.example.com (no port)",
        ]
    );
}

#[test]
fn duplicate_ids_are_caught_even_when_the_first_is_broken() {
    let errs = errors(
        r#"
upstreams:
  - {id: u1, type: bogus, nodes: {"127.0.0.1:1": 1}}
  - {id: u1, nodes: {"127.0.0.1:2": 1}}
plugin_configs:
  - {id: pc}
  - {id: pc}
"#,
    );
    assert_eq!(
        errs,
        vec![
            "upstream u1: type: must be one of roundrobin, chash, least_conn, ewma",
            "upstream u1: id: duplicate id",
            "plugin config pc: id: duplicate id",
        ]
    );
}
