//! Router match cost at 10,000 mixed routes, beside a linear scan.
//!
//! `cargo bench -p turnpike-router --bench router`

use std::collections::HashMap;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use turnpike_router::{Request, RouteSpec, Router};

/// 4,000 static paths, 3,000 with a parameter, 2,000 prefixes, 1,000 hosts.
fn specs() -> Vec<RouteSpec> {
    let mut out = Vec::new();
    for i in 0..4000 {
        out.push(RouteSpec {
            uris: vec![format!("/api/v1/service{i}/resource")],
            ..RouteSpec::default()
        });
    }
    for i in 0..3000 {
        out.push(RouteSpec {
            uris: vec![format!("/users{i}/:id/profile")],
            ..RouteSpec::default()
        });
    }
    for i in 0..2000 {
        out.push(RouteSpec {
            uris: vec![format!("/static{i}/*")],
            ..RouteSpec::default()
        });
    }
    for i in 0..1000 {
        out.push(RouteSpec {
            uris: vec!["/*".into()],
            hosts: vec![format!("svc{i}.example.com")],
            ..RouteSpec::default()
        });
    }
    out
}

const PROBES: [(&str, &str); 5] = [
    ("/api/v1/service3999/resource", "gw.local"),
    ("/users2500/42/profile", "gw.local"),
    ("/static1999/css/site.css", "gw.local"),
    ("/anything", "svc999.example.com"),
    ("/nothing/here", "gw.local"),
];

/// The baseline: test every route in turn, as a naive gateway would.
fn linear(specs: &[RouteSpec], path: &str, host: &str) -> Option<usize> {
    specs.iter().position(|s| {
        let host_ok = s.hosts.is_empty() || s.hosts.iter().any(|h| h == host);
        host_ok && s.uris.iter().any(|u| pattern_matches(u, path))
    })
}

fn pattern_matches(pattern: &str, path: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix('*') {
        return path.starts_with(prefix);
    }
    let (mut p, mut q) = (pattern.split('/'), path.split('/'));
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.starts_with(':') && !b.is_empty() => continue,
            (Some(a), Some(b)) if a == b => continue,
            _ => return false,
        }
    }
}

fn bench(c: &mut Criterion) {
    let specs = specs();
    let router = Router::build(&specs).unwrap();
    let vars: HashMap<&str, &str> = HashMap::new();
    let mut group = c.benchmark_group("match_10k_routes");
    for (path, host) in PROBES {
        let name = path.split('/').nth(1).unwrap_or("root");
        group.bench_function(format!("radix/{name}"), |b| {
            b.iter(|| {
                let req = Request {
                    path: black_box(path),
                    host: black_box(host),
                    method: "GET",
                    remote: None,
                    vars: &vars,
                };
                black_box(router.find(&req))
            })
        });
        group.bench_function(format!("linear/{name}"), |b| {
            b.iter(|| black_box(linear(&specs, black_box(path), black_box(host))))
        });
    }
    group.finish();
    c.bench_function("build_10k_routes", |b| {
        b.iter(|| black_box(Router::build(&specs).unwrap()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
