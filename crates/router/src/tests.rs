use std::collections::HashMap;

use serde_json::json;

use super::*;

fn spec(uri: &str) -> RouteSpec {
    RouteSpec {
        uris: vec![uri.into()],
        ..RouteSpec::default()
    }
}

struct Case<'a> {
    path: &'a str,
    host: &'a str,
    method: &'a str,
    remote: Option<&'a str>,
    vars: HashMap<&'a str, &'a str>,
}

impl<'a> Case<'a> {
    fn get(path: &'a str) -> Self {
        Case {
            path,
            host: "localhost",
            method: "GET",
            remote: Some("127.0.0.1"),
            vars: HashMap::new(),
        }
    }

    fn find(&self, router: &Router) -> Option<usize> {
        let req = Request {
            path: self.path,
            host: self.host,
            method: self.method,
            remote: self.remote.map(|r| r.parse().unwrap()),
            vars: &self.vars,
        };
        router.find(&req)
    }
}

fn build(specs: Vec<RouteSpec>) -> Router {
    Router::build(&specs).expect("routes compile")
}

fn find(router: &Router, path: &str) -> Option<usize> {
    Case::get(path).find(router)
}

#[test]
fn exact_paths_match_only_themselves() {
    let r = build(vec![spec("/blog/foo")]);
    assert_eq!(find(&r, "/blog/foo"), Some(0));
    assert_eq!(find(&r, "/blog/foo/"), None);
    assert_eq!(find(&r, "/blog/fo"), None);
    assert_eq!(find(&r, "/blog/foobar"), None);
}

#[test]
fn trailing_star_is_a_raw_prefix() {
    let r = build(vec![spec("/blog/bar*")]);
    for p in [
        "/blog/bar",
        "/blog/bar/a",
        "/blog/bar/a/b/c",
        "/blog/barrrr",
    ] {
        assert_eq!(find(&r, p), Some(0), "{p}");
    }
    assert_eq!(find(&r, "/blog/ba"), None);
}

#[test]
fn slash_star_needs_the_slash() {
    let r = build(vec![spec("/foo/*")]);
    assert_eq!(find(&r, "/foo/"), Some(0));
    assert_eq!(find(&r, "/foo/x/y"), Some(0));
    assert_eq!(find(&r, "/foo"), None);
}

#[test]
fn full_match_beats_deep_prefix_and_deeper_prefix_beats_shallower() {
    // The example from APISIX's router-radixtree documentation.
    let r = build(vec![
        spec("/blog/foo/*"),
        spec("/blog/foo/a/*"),
        spec("/blog/foo/c/*"),
        spec("/blog/foo/bar"),
    ]);
    assert_eq!(find(&r, "/blog/foo/bar"), Some(3));
    assert_eq!(find(&r, "/blog/foo/a/b/c"), Some(1));
    assert_eq!(find(&r, "/blog/foo/c/d"), Some(2));
    assert_eq!(find(&r, "/blog/foo/gloo"), Some(0));
    assert_eq!(find(&r, "/blog/bar"), None);
}

#[test]
fn params_match_one_non_empty_segment() {
    let r = build(vec![spec("/user/:id/profile"), spec("/blog/:name")]);
    assert_eq!(find(&r, "/blog/dog"), Some(1));
    assert_eq!(find(&r, "/blog/"), None);
    assert_eq!(find(&r, "/blog/dog/cat"), None);
    assert_eq!(find(&r, "/user/42/profile"), Some(0));
    assert_eq!(find(&r, "/user/42/profile/x"), None);
    assert_eq!(find(&r, "/user//profile"), None);
}

#[test]
fn params_with_trailing_wildcard() {
    let r = build(vec![spec("/files/:bucket/*path")]);
    assert_eq!(find(&r, "/files/b/"), Some(0));
    assert_eq!(find(&r, "/files/b/x/y.txt"), Some(0));
    assert_eq!(find(&r, "/files/b"), None);
}

#[test]
fn uris_list_matches_any() {
    let r = build(vec![RouteSpec {
        uris: vec!["/a".into(), "/b/*".into()],
        ..RouteSpec::default()
    }]);
    assert_eq!(find(&r, "/a"), Some(0));
    assert_eq!(find(&r, "/b/c"), Some(0));
    assert_eq!(find(&r, "/c"), None);
}

#[test]
fn priority_orders_routes_on_the_same_path_and_ties_keep_config_order() {
    let low = RouteSpec {
        priority: 1,
        ..spec("/p/*")
    };
    let high = RouteSpec {
        priority: 10,
        ..spec("/p/*")
    };
    let tie = RouteSpec {
        priority: 10,
        ..spec("/p/*")
    };
    let r = build(vec![low, high, tie]);
    assert_eq!(find(&r, "/p/x"), Some(1));

    let a = RouteSpec {
        priority: 5,
        ..spec("/same")
    };
    let b = RouteSpec {
        priority: 5,
        ..spec("/same")
    };
    let r = build(vec![a, b]);
    assert_eq!(find(&r, "/same"), Some(0));
}

#[test]
fn priority_does_not_override_path_specificity() {
    let broad = RouteSpec {
        priority: 100,
        ..spec("/api/*")
    };
    let narrow = spec("/api/v1/*");
    let r = build(vec![broad, narrow]);
    assert_eq!(find(&r, "/api/v1/x"), Some(1));
    assert_eq!(find(&r, "/api/v2/x"), Some(0));
}

#[test]
fn lower_priority_route_is_used_when_the_higher_one_fails_its_conditions() {
    let post_only = RouteSpec {
        priority: 10,
        methods: vec!["POST".into()],
        ..spec("/x")
    };
    let any = spec("/x");
    let r = build(vec![post_only, any]);
    assert_eq!(find(&r, "/x"), Some(1));
    let post = Case {
        method: "POST",
        ..Case::get("/x")
    };
    assert_eq!(post.find(&r), Some(0));
}

#[test]
fn shallower_prefix_is_tried_when_deeper_routes_fail_their_conditions() {
    let deep = RouteSpec {
        methods: vec!["PUT".into()],
        ..spec("/a/b/*")
    };
    let r = build(vec![deep, spec("/a/*")]);
    assert_eq!(find(&r, "/a/b/c"), Some(1));
}

#[test]
fn hosts_exact_wildcard_and_fallback() {
    let exact = RouteSpec {
        hosts: vec!["api.example.com".into()],
        ..spec("/*")
    };
    let wild = RouteSpec {
        hosts: vec!["*.example.com".into()],
        ..spec("/*")
    };
    let none = spec("/*");
    let r = build(vec![exact, wild, none]);
    let with_host = |host| {
        Case {
            host,
            ..Case::get("/x")
        }
        .find(&r)
    };
    assert_eq!(with_host("api.example.com"), Some(0));
    assert_eq!(with_host("API.Example.COM:8080"), Some(0));
    assert_eq!(with_host("www.example.com"), Some(1));
    assert_eq!(with_host("a.b.example.com"), Some(1));
    assert_eq!(with_host("example.com"), Some(2));
    assert_eq!(with_host("other.org"), Some(2));
}

#[test]
fn longer_wildcard_suffix_wins() {
    let broad = RouteSpec {
        hosts: vec!["*.example.com".into()],
        ..spec("/*")
    };
    let narrow = RouteSpec {
        hosts: vec!["*.eu.example.com".into()],
        ..spec("/*")
    };
    let r = build(vec![broad, narrow]);
    let c = Case {
        host: "x.eu.example.com",
        ..Case::get("/")
    };
    assert_eq!(c.find(&r), Some(1));
}

#[test]
fn host_route_wins_over_hostless_route_even_with_shorter_path() {
    let hostless = spec("/exact");
    let with_host = RouteSpec {
        hosts: vec!["a.com".into()],
        ..spec("/*")
    };
    let r = build(vec![hostless, with_host]);
    assert_eq!(
        Case {
            host: "a.com",
            ..Case::get("/exact")
        }
        .find(&r),
        Some(1)
    );
    assert_eq!(
        Case {
            host: "b.com",
            ..Case::get("/exact")
        }
        .find(&r),
        Some(0)
    );
}

#[test]
fn host_route_falls_back_when_its_path_does_not_match() {
    let with_host = RouteSpec {
        hosts: vec!["a.com".into()],
        ..spec("/only")
    };
    let r = build(vec![with_host, spec("/*")]);
    assert_eq!(
        Case {
            host: "a.com",
            ..Case::get("/other")
        }
        .find(&r),
        Some(1)
    );
}

#[test]
fn ipv6_host_with_port() {
    let r = build(vec![RouteSpec {
        hosts: vec!["[::1]".into()],
        ..spec("/")
    }]);
    assert_eq!(
        Case {
            host: "[::1]:9080",
            ..Case::get("/")
        }
        .find(&r),
        Some(0)
    );
}

#[test]
fn methods_filter() {
    let r = build(vec![RouteSpec {
        methods: vec!["GET".into(), "PURGE".into()],
        ..spec("/m")
    }]);
    assert_eq!(find(&r, "/m"), Some(0));
    assert_eq!(
        Case {
            method: "PURGE",
            ..Case::get("/m")
        }
        .find(&r),
        Some(0)
    );
    assert_eq!(
        Case {
            method: "POST",
            ..Case::get("/m")
        }
        .find(&r),
        None
    );
    assert_eq!(
        Case {
            method: "BREW",
            ..Case::get("/m")
        }
        .find(&r),
        None
    );
    let any = build(vec![spec("/m")]);
    assert_eq!(
        Case {
            method: "BREW",
            ..Case::get("/m")
        }
        .find(&any),
        Some(0)
    );
}

#[test]
fn remote_addrs_ipv4_and_ipv6() {
    let r = build(vec![RouteSpec {
        remote_addrs: vec!["10.0.0.0/8".into(), "192.168.1.7".into(), "fd00::/8".into()],
        ..spec("/r")
    }]);
    let from = |ip| {
        Case {
            remote: Some(ip),
            ..Case::get("/r")
        }
        .find(&r)
    };
    assert_eq!(from("10.1.2.3"), Some(0));
    assert_eq!(from("192.168.1.7"), Some(0));
    assert_eq!(from("192.168.1.8"), None);
    assert_eq!(from("fd12::1"), Some(0));
    assert_eq!(from("fe80::1"), None);
    assert_eq!(
        Case {
            remote: None,
            ..Case::get("/r")
        }
        .find(&r),
        None
    );
}

#[test]
fn vars_condition_the_match() {
    let r = build(vec![RouteSpec {
        vars: Some(json!([
            ["arg_name", "==", "jack"],
            ["http_x_v", "~~", "^v2"]
        ])),
        ..spec("/v")
    }]);
    let mut c = Case::get("/v");
    assert_eq!(c.find(&r), None);
    c.vars.insert("arg_name", "jack");
    assert_eq!(c.find(&r), None);
    c.vars.insert("http_x_v", "v2.1");
    assert_eq!(c.find(&r), Some(0));
}

#[test]
fn build_errors_name_the_route_and_field() {
    let specs = vec![
        spec("/fine"),
        RouteSpec {
            uris: vec!["/ok".into(), "/a*b".into()],
            hosts: vec!["bad host".into()],
            methods: vec!["FETCH".into()],
            remote_addrs: vec!["10.0.0.0/33".into()],
            vars: Some(json!([["arg_a", "=~", "x"]])),
            ..RouteSpec::default()
        },
        RouteSpec {
            uris: vec!["no-slash".into()],
            fields: ["uri", "host", "remote_addr"],
            ..RouteSpec::default()
        },
        RouteSpec::default(),
    ];
    let errors = Router::build(&specs).unwrap_err();
    let paths: Vec<(usize, &str)> = errors.iter().map(|(i, e)| (*i, e.path.as_str())).collect();
    assert_eq!(
        paths,
        vec![
            (1, "uris[1]"),
            (1, "hosts[0]"),
            (1, "methods[0]"),
            (1, "remote_addrs[0]"),
            (1, "vars[0][1]"),
            (2, "uri"),
            (3, "uris"),
        ]
    );
}

#[test]
fn bad_uri_patterns_are_refused() {
    for bad in ["/a/*/b", "/a/:/b", "relative", "/x*y/z"] {
        assert!(Router::build(&[spec(bad)]).is_err(), "{bad}");
    }
    for good in ["/a/*", "/a*", "/a/*rest", "/v1:batch", "/a/:b/c"] {
        assert!(Router::build(&[spec(good)]).is_ok(), "{good}");
    }
}

#[test]
fn literal_colon_inside_a_segment_is_not_a_param() {
    let r = build(vec![spec("/v1:batch")]);
    assert_eq!(find(&r, "/v1:batch"), Some(0));
    assert_eq!(find(&r, "/v1:other"), None);
}

#[test]
fn many_routes_match_by_path_not_by_scan() {
    let specs: Vec<RouteSpec> = (0..5000).map(|i| spec(&format!("/svc{i}/*"))).collect();
    let r = build(specs);
    assert_eq!(find(&r, "/svc4999/x"), Some(4999));
    assert_eq!(find(&r, "/svc42/"), Some(42));
    assert_eq!(find(&r, "/svc5000/"), None);
    assert_eq!(r.len(), 5000);
}

mod expressions {
    use super::*;

    fn holds(expr: serde_json::Value, vars: &[(&str, &str)]) -> bool {
        let e = Expr::parse(&expr, "vars").unwrap_or_else(|e| panic!("{expr}: {e}"));
        let map: HashMap<&str, &str> = vars.iter().copied().collect();
        e.eval(&map)
    }

    #[test]
    fn equality_and_inequality() {
        assert!(holds(json!(["arg_a", "==", "x"]), &[("arg_a", "x")]));
        assert!(!holds(json!(["arg_a", "==", "x"]), &[("arg_a", "y")]));
        assert!(!holds(json!(["arg_a", "==", "x"]), &[]));
        assert!(holds(json!(["arg_a", "~=", "x"]), &[("arg_a", "y")]));
        assert!(
            holds(json!(["arg_a", "~=", "x"]), &[]),
            "a missing value differs from any string"
        );
        assert!(holds(json!(["arg_n", "==", 5]), &[("arg_n", "5.0")]));
        assert!(holds(json!(["arg_b", "==", true]), &[("arg_b", "true")]));
        assert!(holds(json!(["arg_a", "==", null]), &[]));
    }

    #[test]
    fn numeric_comparisons() {
        let v = [("arg_n", "10")];
        assert!(holds(json!(["arg_n", ">", 9]), &v));
        assert!(!holds(json!(["arg_n", ">", 10]), &v));
        assert!(holds(json!(["arg_n", ">=", 10]), &v));
        assert!(holds(json!(["arg_n", "<", "11"]), &v));
        assert!(holds(json!(["arg_n", "<=", 10]), &v));
        assert!(!holds(json!(["arg_n", ">", 1]), &[("arg_n", "ten")]));
        assert!(!holds(json!(["arg_n", ">", 1]), &[]));
    }

    #[test]
    fn regex_operators() {
        assert!(holds(
            json!(["http_x_v", "~~", "^v2"]),
            &[("http_x_v", "v2.1")]
        ));
        assert!(!holds(
            json!(["http_x_v", "~~", "^v2"]),
            &[("http_x_v", "V2")]
        ));
        assert!(holds(
            json!(["http_x_v", "~*", "^v2"]),
            &[("http_x_v", "V2")]
        ));
        assert!(!holds(json!(["http_x_v", "~~", ".*"]), &[]));
    }

    #[test]
    fn in_has_and_ipmatch() {
        assert!(holds(json!(["arg_c", "in", ["a", "b"]]), &[("arg_c", "b")]));
        assert!(!holds(
            json!(["arg_c", "in", ["a", "b"]]),
            &[("arg_c", "c")]
        ));
        assert!(!holds(json!(["arg_c", "in", ["a"]]), &[]));
        assert!(holds(
            json!(["http_tags", "has", "blue"]),
            &[("http_tags", "red, blue")]
        ));
        assert!(!holds(
            json!(["http_tags", "has", "blu"]),
            &[("http_tags", "red, blue")]
        ));
        assert!(holds(
            json!(["remote_addr", "ipmatch", ["10.0.0.0/8", "::1"]]),
            &[("remote_addr", "10.9.9.9")]
        ));
        assert!(holds(
            json!(["remote_addr", "ipmatch", "::1"]),
            &[("remote_addr", "::1")]
        ));
        assert!(!holds(
            json!(["remote_addr", "ipmatch", "10.0.0.0/8"]),
            &[("remote_addr", "11.0.0.1")]
        ));
        assert!(!holds(
            json!(["remote_addr", "ipmatch", "10.0.0.0/8"]),
            &[("remote_addr", "junk")]
        ));
    }

    #[test]
    fn negation_flips_the_result() {
        assert!(holds(json!(["arg_a", "!", "==", "x"]), &[("arg_a", "y")]));
        assert!(!holds(
            json!(["arg_a", "!", "~~", "^x"]),
            &[("arg_a", "xy")]
        ));
        assert!(holds(json!(["arg_a", "!", "in", ["x"]]), &[]));
    }

    #[test]
    fn logical_nesting() {
        let expr = json!([
            "OR",
            ["arg_a", "==", "1"],
            ["AND", ["arg_b", "==", "2"], ["arg_c", "==", "3"]]
        ]);
        assert!(holds(expr.clone(), &[("arg_a", "1")]));
        assert!(holds(expr.clone(), &[("arg_b", "2"), ("arg_c", "3")]));
        assert!(!holds(expr, &[("arg_b", "2")]));
        assert!(holds(
            json!(["!OR", ["arg_a", "==", "1"], ["arg_a", "==", "2"]]),
            &[("arg_a", "3")]
        ));
        assert!(!holds(
            json!(["!AND", ["arg_a", "==", "1"]]),
            &[("arg_a", "1")]
        ));
        assert!(holds(json!([]), &[]));
        assert!(holds(
            json!([
                ["arg_a", "==", "1"],
                ["OR", ["arg_b", "==", "x"], ["arg_b", "==", "y"]]
            ]),
            &[("arg_a", "1"), ("arg_b", "y")]
        ));
    }

    #[test]
    fn bad_expressions_are_refused_with_their_path() {
        let cases = [
            (json!("arg_a"), "vars"),
            (json!([["arg_a", "=~", "x"]]), "vars[0][1]"),
            (json!([["nope", "==", "x"]]), "vars[0][0]"),
            (json!(["arg_a", "==", "x", "y"]), "vars"),
            (json!(["arg_a", ">", "ten"]), "vars[2]"),
            (json!(["arg_a", "~~", "("]), "vars[2]"),
            (json!(["arg_a", "in", "x"]), "vars[2]"),
            (json!(["arg_a", "ipmatch", "300.0.0.1"]), "vars[2]"),
            (json!(["OR"]), "vars"),
            (json!(["OR", ["arg_a", "==", "x"], "junk"]), "vars[2]"),
            (json!([1, 2, 3]), "vars[0]"),
            (json!(["arg_a", "==", {"x": 1}]), "vars[2]"),
        ];
        for (expr, path) in cases {
            let err = Expr::parse(&expr, "vars").expect_err(&expr.to_string());
            assert_eq!(err.path, path, "{expr}: {err}");
        }
    }
}
