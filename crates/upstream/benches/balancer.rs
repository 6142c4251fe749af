//! One pick per balancer over 10 weighted nodes.
//!
//! `cargo bench -p turnpike-upstream --bench balancer`

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use turnpike_upstream::{Balancer, Kind};

fn bench(c: &mut Criterion) {
    let keys: Vec<String> = (0..10).map(|i| format!("10.0.0.{i}:8080")).collect();
    let nodes: Vec<(&str, u32)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), 1 + i as u32 % 3))
        .collect();
    let mut group = c.benchmark_group("pick_10_nodes");
    for (name, kind) in [
        ("roundrobin", Kind::RoundRobin),
        ("chash", Kind::Chash),
        ("least_conn", Kind::LeastConn),
        ("ewma", Kind::Ewma),
    ] {
        let b = Balancer::new(kind, &nodes);
        group.bench_function(name, |bench| {
            bench.iter(|| {
                let i = b.pick(Some(black_box(b"user-42")), |_| false).unwrap();
                if b.tracks_load() {
                    b.start(i);
                    b.finish(i, Duration::from_micros(300));
                }
                black_box(i)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
