//! The plugin chain on one request, without the network: the cost the
//! runtime and the plugins add per request.
//!
//! `cargo bench -p turnpike-plugins --bench chain`

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderValue;
use serde_json::{json, Value};
use turnpike_plugin::{
    run_header_filter, run_log, run_phase, Chain, Conn, Consumer, Ctx, Head, Phase, Registry,
};

/// Runs a future that never waits (no plugin here does I/O).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a bench plugin waited"),
    }
}

fn chain(registry: &Registry, plugins: Value) -> Chain {
    let consumer = Arc::new(Consumer {
        username: "bench".into(),
        header: HeaderValue::from_static("bench"),
        group_id: None,
        chain: Chain::default(),
    });
    let mut creds = HashMap::new();
    let key = registry
        .check_credential("key-auth", &json!({"key": "bench-key"}))
        .unwrap();
    creds.insert("key-auth", vec![(consumer, key)]);
    let (env, errors) = registry.indexes(creds);
    assert!(errors.is_empty());
    let entries = plugins
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, conf)| registry.entry(name, conf, &env).unwrap())
        .collect();
    Chain::new(entries)
}

fn request(conn: &Arc<Conn>) -> Ctx {
    let (parts, ()) = http::Request::get("/api/items?page=2")
        .header("host", "example.com")
        .header("apikey", "bench-key")
        .header("origin", "http://bench.example")
        .header("user-agent", "bench")
        .body(())
        .unwrap()
        .into_parts();
    Ctx::new(
        parts,
        conn.clone(),
        HeaderValue::from_static("0b4f5a7e-1111-4222-8333-944455556666"),
    )
}

/// Every phase a proxied request goes through.
fn serve(global: &Chain, route: &Chain, mut ctx: Ctx) -> Head {
    for phase in [Phase::Rewrite, Phase::Access, Phase::BeforeProxy] {
        assert!(now(run_phase(phase, global, route, &mut ctx)).is_none());
    }
    let mut head = Head::default();
    head.headers
        .extend(std::mem::take(&mut ctx.response_headers));
    run_header_filter(global, route, &mut ctx, &mut head);
    run_log(global, route, &mut ctx);
    head
}

fn bench(c: &mut Criterion) {
    let registry = turnpike_plugins::registry();
    let conn = Arc::new(Conn::new(
        "10.0.0.1:5000".parse().unwrap(),
        "127.0.0.1:9080".parse().unwrap(),
        "http",
    ));
    let global = Chain::default();
    let none = Chain::default();
    let three = chain(
        &registry,
        json!({
            "key-auth": {},
            "proxy-rewrite": {"regex_uri": ["^/api/(.*)$", "/$1"], "headers": {"set": {"x-bench": "1"}}},
            "cors": {"allow_origins": "http://bench.example"}
        }),
    );
    let limits = chain(
        &registry,
        json!({
            "limit-count": {"count": 1_000_000_000u64, "time_window": 3600},
            "prometheus": {}
        }),
    );
    let mut group = c.benchmark_group("chain");
    group.bench_function("request_only", |b| b.iter(|| black_box(request(&conn))));
    group.bench_function("no_plugins", |b| {
        b.iter(|| black_box(serve(&global, &none, request(&conn))))
    });
    group.bench_function("key-auth+proxy-rewrite+cors", |b| {
        b.iter(|| black_box(serve(&global, &three, request(&conn))))
    });
    group.bench_function("limit-count+prometheus", |b| {
        b.iter(|| black_box(serve(&global, &limits, request(&conn))))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
