//! Parsing and compiling a 10,000-route configuration (what a reload costs).
//!
//! `cargo bench -p turnpike-config --bench compile`

use criterion::{black_box, criterion_group, criterion_main, Criterion};

/// `n` routes over 50 upstreams; with `plugins`, each route also has
/// key-auth, proxy-rewrite and cors, and 100 consumers hold keys.
fn config(n: usize, plugins: bool) -> String {
    let mut text = String::from("upstreams:\n");
    for u in 0..50 {
        text.push_str(&format!(
            "  - {{id: u{u}, nodes: {{\"127.0.0.1:{}\": 1, \"127.0.0.2:{}\": 2}}}}\n",
            8000 + u,
            8000 + u
        ));
    }
    text.push_str("routes:\n");
    for i in 0..n {
        let uri = match i % 4 {
            0 => format!("/api/v1/service{i}/resource"),
            1 => format!("/users{i}/:id/profile"),
            2 => format!("/static{i}/*"),
            _ => format!("/host{i}/*"),
        };
        let hosts = if i % 4 == 3 {
            format!(", hosts: [\"svc{i}.example.com\"]")
        } else {
            String::new()
        };
        let with = if plugins {
            ", plugins: {key-auth: {}, proxy-rewrite: {regex_uri: [\"^/(.*)\", \"/v2/$1\"]}, cors: {allow_origins: \"https://app.example\"}}"
        } else {
            ""
        };
        text.push_str(&format!(
            "  - {{id: {i}, uri: \"{uri}\"{hosts}, methods: [GET, POST], upstream_id: u{}{with}}}\n",
            i % 50
        ));
    }
    if plugins {
        text.push_str("consumers:\n");
        for c in 0..100 {
            text.push_str(&format!(
                "  - {{username: c{c}, plugins: {{key-auth: {{key: k{c}}}}}}}\n"
            ));
        }
    }
    text
}

fn bench(c: &mut Criterion) {
    let text = config(10_000, false);
    let parsed = turnpike_config::parse(&text).unwrap();
    let registry = turnpike_plugins::registry();
    let first = turnpike_config::compile(&parsed.resources, &registry, None, 1).unwrap();
    let mut group = c.benchmark_group("10k_routes");
    group.sample_size(20);
    group.bench_function("parse", |b| {
        b.iter(|| black_box(turnpike_config::parse(black_box(&text)).unwrap()))
    });
    group.bench_function("compile", |b| {
        b.iter(|| {
            black_box(turnpike_config::compile(&parsed.resources, &registry, None, 2).unwrap())
        })
    });
    group.bench_function("recompile_with_previous", |b| {
        b.iter(|| {
            black_box(
                turnpike_config::compile(&parsed.resources, &registry, Some(&first), 2).unwrap(),
            )
        })
    });
    let with_plugins = turnpike_config::parse(&config(10_000, true)).unwrap();
    group.bench_function("compile_with_3_plugins_per_route", |b| {
        b.iter(|| {
            black_box(
                turnpike_config::compile(&with_plugins.resources, &registry, None, 2).unwrap(),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
