//! The process's Prometheus metrics: one registry that the gateway, the
//! `prometheus` plugin and any other plugin register into, served as text
//! at `/metrics` on the status listener.
//!
//! Names follow APISIX's (`apisix_http_status`, ...) where Turnpike has the
//! same measure, so existing dashboards work; measures of Turnpike's own
//! start with `turnpike_`. Label values come from ids in the configuration
//! (route, service, consumer, node) and status codes, never from request
//! paths, so the number of series stays bounded.

use std::sync::OnceLock;

use prometheus::{Encoder, Registry, TextEncoder};

pub use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

/// The registry every metric of this process is in.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::new)
}

/// Registers `metric`, which must be new; metrics are made once per
/// process (in a `OnceLock`), so a clash is a bug.
pub fn register<M: prometheus::core::Collector + Clone + 'static>(metric: M) -> M {
    if let Err(e) = registry().register(Box::new(metric.clone())) {
        // Only possible when two pieces of code pick the same name.
        tracing::error!("metric not registered: {e}");
    }
    metric
}

/// Every metric, in Prometheus's text format.
pub fn render() -> Vec<u8> {
    let families = registry().gather();
    let mut out = Vec::with_capacity(16 * 1024);
    // Writing text into a Vec cannot fail.
    let _ = TextEncoder::new().encode(&families, &mut out);
    out
}

/// This machine's host name (`apisix_node_info`, log entries), read once.
pub fn hostname() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    })
}

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";
