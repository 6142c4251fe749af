//! The queue on `/metrics`: depth, wait and run times, expired and failed
//! counts.

use std::sync::OnceLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Opts};
use turnpike_plugin::metrics::register;

use crate::{now_ms, Job, Outcome, Status};

struct Metrics {
    depth: IntGauge,
    wait: Histogram,
    run: Histogram,
    done: IntCounter,
    expired: IntCounter,
    failed: IntCounter,
}

fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let buckets = vec![0.005, 0.05, 0.25, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0];
        let histogram = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.clone());
            register(Histogram::with_opts(opts).expect("valid histogram options"))
        };
        let counter = |name: &str, help: &str| {
            register(IntCounter::with_opts(Opts::new(name, help)).expect("valid counter options"))
        };
        Metrics {
            depth: register(
                IntGauge::with_opts(Opts::new(
                    "turnpike_async_queue_depth",
                    "Asynchronous requests waiting for a worker",
                ))
                .expect("valid gauge options"),
            ),
            wait: histogram(
                "turnpike_async_wait_seconds",
                "Time from acceptance to a worker taking the request",
            ),
            run: histogram(
                "turnpike_async_run_seconds",
                "Time from a worker taking the request to its answer",
            ),
            done: counter(
                "turnpike_async_done_total",
                "Asynchronous requests answered",
            ),
            expired: counter(
                "turnpike_async_expired_total",
                "Asynchronous requests whose ttl passed before a worker took them",
            ),
            failed: counter(
                "turnpike_async_failed_total",
                "Asynchronous requests answered 5xx (by the upstream or the gateway)",
            ),
        }
    })
}

pub(crate) fn depth(n: usize) {
    metrics().depth.set(n as i64);
}

pub(crate) fn ran(took: std::time::Duration) {
    metrics().run.observe(took.as_secs_f64());
}

pub(crate) fn started(job: &Job) {
    metrics()
        .wait
        .observe(now_ms().saturating_sub(job.submitted) as f64 / 1000.0);
}

pub(crate) fn ended(status: &Status, outcome: Option<&Outcome>) {
    let m = metrics();
    match (status, outcome) {
        (Status::Expired, _) => m.expired.inc(),
        (_, Some(o)) => {
            m.done.inc();
            if o.answer.status >= 500 {
                m.failed.inc();
            }
        }
        _ => {}
    }
}
