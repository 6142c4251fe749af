//! `prometheus`: counts the requests of the routes it is on (usually as a
//! global rule) into APISIX's metrics, served at `/metrics` on the status
//! listener:
//!
//! - `apisix_http_status{code, route, service, consumer, node}`: responses;
//! - `apisix_http_latency{type, route, service, consumer, node}`, in ms:
//!   `request` (arrival to the last byte sent), `upstream` (request sent
//!   upstream to its response head), `apisix` (the rest: the gateway's own
//!   time, plugins included);
//! - `apisix_bandwidth{type, route, service, consumer, node}`, in bytes:
//!   `ingress` (request line, headers and body received) and `egress`
//!   (status line, headers and body sent).
//!
//! Label values are ids (or names with `prefer_name`), never paths, so
//! the number of series is bounded by the configuration. Recording is a
//! few atomic additions in the `log` phase, after the response is sent.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::metrics::{
    register, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
};
use turnpike_plugin::{typed, Consumer, Ctx, Env, Factory, FieldError, Plugin};

pub(crate) const NAME: &str = "prometheus";
pub(crate) const PRIORITY: i32 = 500;

/// APISIX's default latency buckets, in milliseconds.
const BUCKETS: [f64; 15] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "prefer_name": {"type": "boolean", "default": false}
        },
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    prefer_name: bool,
}

struct Prometheus {
    prefer_name: bool,
    metrics: &'static Metrics,
}

struct Metrics {
    status: IntCounterVec,
    latency: HistogramVec,
    bandwidth: IntCounterVec,
}

const LABELS: [&str; 4] = ["route", "service", "consumer", "node"];

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        // Names and label sets are constants; `registers` tests them.
        let labels = |first: &'static str| {
            let mut all = vec![first];
            all.extend(LABELS);
            all
        };
        let status = IntCounterVec::new(
            Opts::new("apisix_http_status", "Responses by status code"),
            &labels("code"),
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "apisix_http_latency",
                "Latency in milliseconds: request, upstream, apisix",
            )
            .buckets(BUCKETS.to_vec()),
            &labels("type"),
        )
        .expect("valid metric");
        let bandwidth = IntCounterVec::new(
            Opts::new(
                "apisix_bandwidth",
                "Bytes: ingress (received), egress (sent)",
            ),
            &labels("type"),
        )
        .expect("valid metric");
        Metrics {
            status: register(status),
            latency: register(latency),
            bandwidth: register(bandwidth),
        }
    })
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    Ok(Arc::new(Prometheus {
        prefer_name: c.prefer_name,
        metrics: metrics(),
    }))
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

impl Plugin for Prometheus {
    fn log(&self, ctx: &Ctx) {
        let request = ctx.started.elapsed();
        let upstream = ctx.upstream_latency;
        let (req_bytes, resp_bytes) = (request_bytes(ctx), response_bytes(ctx));
        self.with_series(ctx, |s| {
            s.status.inc();
            s.request.observe(ms(request));
            if let (Some(h), Some(upstream)) = (&s.upstream, upstream) {
                h.observe(ms(upstream));
            }
            s.apisix
                .observe(ms(request.saturating_sub(upstream.unwrap_or_default())));
            s.bandwidth[0].inc_by(req_bytes);
            s.bandwidth[1].inc_by(resp_bytes);
        });
    }
}

/// The metric handles of one combination of labels: finding them in the
/// metric families hashes five label values six times under a lock, so
/// each thread keeps the ones it used.
struct Series {
    status: IntCounter,
    /// `apisix_http_latency` by `type`; `upstream` only where a node was
    /// tried, so requests a plugin answered make no empty series.
    request: Histogram,
    upstream: Option<Histogram>,
    apisix: Histogram,
    /// `ingress`, `egress`.
    bandwidth: [IntCounter; 2],
}

/// What a request's labels come from: the route's, service's, consumer's
/// and node's values as the snapshot holds them (compared by address) and
/// the status. The cache entry holds these `Arc`s, so an address cannot
/// be reused by another value while its entry lives.
#[derive(PartialEq, Eq, Hash)]
struct SeriesKey {
    route: usize,
    service: usize,
    consumer: usize,
    node: usize,
    code: u16,
    prefer_name: bool,
}

/// The values a cached entry's labels came from.
type Held = (
    Option<Arc<str>>,
    Option<Arc<str>>,
    Option<Arc<Consumer>>,
    Option<Arc<str>>,
);

struct Cached {
    _held: Held,
    series: Series,
}

/// Entries per thread at most; past it the cache starts over (reloads
/// leave entries of values no longer served).
const MAX_CACHED: usize = 4096;

thread_local! {
    static SERIES: RefCell<FxHashMap<SeriesKey, Cached>> = RefCell::default();
}

fn address<T: ?Sized>(v: &Option<Arc<T>>) -> usize {
    v.as_ref()
        .map_or(0, |a| Arc::as_ptr(a) as *const () as usize)
}

impl Prometheus {
    fn pick<'a>(
        &self,
        name: &'a Option<Arc<str>>,
        id: &'a Option<Arc<str>>,
    ) -> &'a Option<Arc<str>> {
        if self.prefer_name && name.is_some() {
            name
        } else {
            id
        }
    }

    fn with_series(&self, ctx: &Ctx, f: impl FnOnce(&Series)) {
        let route = self.pick(&ctx.route_name, &ctx.route_id);
        let service = self.pick(&ctx.service_name, &ctx.service_id);
        let key = SeriesKey {
            route: address(route),
            service: address(service),
            consumer: address(&ctx.consumer),
            node: address(&ctx.upstream_addr),
            code: ctx.status.map_or(0, |s| s.as_u16()),
            prefer_name: self.prefer_name,
        };
        SERIES.with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some(hit) = cache.get(&key) {
                return f(&hit.series);
            }
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            let series = self.series(ctx, route, service);
            let held = (
                route.clone(),
                service.clone(),
                ctx.consumer.clone(),
                ctx.upstream_addr.clone(),
            );
            f(&series);
            cache.insert(
                key,
                Cached {
                    _held: held,
                    series,
                },
            );
        });
    }

    /// Looks the handles up in the metric families (once per thread and
    /// combination of labels).
    fn series(&self, ctx: &Ctx, route: &Option<Arc<str>>, service: &Option<Arc<str>>) -> Series {
        let rest = [
            route.as_deref().unwrap_or(""),
            service.as_deref().unwrap_or(""),
            ctx.consumer.as_ref().map_or("", |c| &c.username),
            ctx.upstream_addr.as_deref().unwrap_or(""),
        ];
        let labels = |first| with_first(first, &rest);
        let code = ctx.status.as_ref().map_or("0", |s| s.as_str());
        let m = self.metrics;
        let latency = |t| m.latency.with_label_values(&labels(t));
        Series {
            status: m.status.with_label_values(&labels(code)),
            request: latency("request"),
            upstream: ctx.upstream_addr.as_ref().map(|_| latency("upstream")),
            apisix: latency("apisix"),
            bandwidth: ["ingress", "egress"].map(|t| m.bandwidth.with_label_values(&labels(t))),
        }
    }
}

fn with_first<'a>(first: &'a str, rest: &[&'a str; 4]) -> [&'a str; 5] {
    [first, rest[0], rest[1], rest[2], rest[3]]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The request's size as received: request line, headers, body.
fn request_bytes(ctx: &Ctx) -> u64 {
    let target = ctx
        .req
        .uri
        .path_and_query()
        .map_or(1, |pq| pq.as_str().len());
    let line = ctx.req.method.as_str().len() + target + 11;
    let body = ctx
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    line as u64 + headers_bytes(&ctx.req.headers) + body
}

/// The response's size as sent: its head and the body bytes sent.
fn response_bytes(ctx: &Ctx) -> u64 {
    ctx.response_head_bytes + ctx.response_bytes
}

fn headers_bytes(headers: &http::HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>() as u64
        + 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{ctx, entry};

    #[test]
    fn registers_and_counts_by_route_and_status() {
        let e = entry(NAME, json!({}));
        let mut c = ctx("/x");
        c.route_id = Some("r-prom".into());
        c.status = Some(http::StatusCode::IM_A_TEAPOT);
        e.plugin.log(&c);
        e.plugin.log(&c);
        let mut other = ctx("/x");
        other.route_id = Some("r-prom-2".into());
        other.status = Some(http::StatusCode::IM_A_TEAPOT);
        e.plugin.log(&other);
        let text = String::from_utf8(turnpike_plugin::metrics::render()).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("apisix_http_status{") && l.contains("route=\"r-prom\""))
            .expect("a series for the route");
        assert!(line.contains("code=\"418\""), "{line}");
        assert!(line.ends_with(" 2"), "{line}");
        let other = text
            .lines()
            .find(|l| l.starts_with("apisix_http_status{") && l.contains("route=\"r-prom-2\""))
            .expect("a series for the other route");
        assert!(other.ends_with(" 1"), "each route its own series: {other}");
        assert!(
            text.contains("apisix_http_latency_bucket{consumer=\"\",node=\"\",route=\"r-prom\"")
        );
        assert!(
            !text.contains("type=\"upstream\",route=\"r-prom\""),
            "no upstream, no upstream latency"
        );
    }

    #[test]
    fn prefer_name_labels_by_name() {
        let e = entry(NAME, json!({"prefer_name": true}));
        let mut c = ctx("/x");
        c.route_id = Some("r-id-9".into());
        c.route_name = Some("orders".into());
        e.plugin.log(&c);
        let text = String::from_utf8(turnpike_plugin::metrics::render()).unwrap();
        assert!(text.contains("route=\"orders\""));
        assert!(!text.contains("route=\"r-id-9\""));
    }
}
