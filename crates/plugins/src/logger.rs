//! What `file-logger` and `http-logger` share: the log entry (APISIX's
//! fields, or `log_format`), the request and response bodies when asked
//! for, and the batch processor that takes entries off the request path.
//!
//! `log` only formats the entry and hands it to a bounded queue; a
//! background task batches and sends. A logger that is slow or down
//! therefore never slows a request: when the queue is full, entries are
//! dropped and counted in `turnpike_logger_dropped_total`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderMap;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use turnpike_plugin::metrics::{register, IntCounterVec, Opts};
use turnpike_plugin::{Ctx, Env, FieldError, Flow, Head, Plugin, Template};
use turnpike_router::{Expr, VarSource};

/// Schema properties every logger has: format, bodies, batching.
pub(crate) fn properties() -> Map<String, Value> {
    let props = json!({
        "log_format": {"type": "object", "additionalProperties": {"type": "string"}},
        "include_req_body": {"type": "boolean", "default": false},
        "include_req_body_expr": {"type": "array"},
        "include_resp_body": {"type": "boolean", "default": false},
        "include_resp_body_expr": {"type": "array"},
        "max_req_body_bytes": {"type": "integer", "minimum": 1, "maximum": 8388608, "default": 524288},
        "max_resp_body_bytes": {"type": "integer", "minimum": 1, "maximum": 8388608, "default": 524288},
        "name": {"type": "string"},
        "batch_max_size": {"type": "integer", "minimum": 1, "default": 1000},
        "inactive_timeout": {"type": "integer", "minimum": 1, "default": 5},
        "buffer_duration": {"type": "integer", "minimum": 1, "default": 60},
        "max_retry_count": {"type": "integer", "minimum": 0, "default": 0},
        "retry_delay": {"type": "integer", "minimum": 0, "default": 1},
        "max_pending_entries": {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 10000}
    });
    props.as_object().cloned().unwrap_or_default()
}

/// The shared fields, as configured.
#[derive(Deserialize)]
pub(crate) struct LogConfig {
    log_format: Option<Map<String, Value>>,
    include_req_body: bool,
    include_req_body_expr: Option<Value>,
    include_resp_body: bool,
    include_resp_body_expr: Option<Value>,
    max_req_body_bytes: usize,
    max_resp_body_bytes: usize,
    #[serde(flatten)]
    pub batch: BatchConfig,
}

#[derive(Deserialize, Clone)]
pub(crate) struct BatchConfig {
    batch_max_size: usize,
    inactive_timeout: u64,
    buffer_duration: u64,
    max_retry_count: u32,
    retry_delay: u64,
    max_pending_entries: usize,
}

/// How a logger turns a request into a line.
pub(crate) struct Format {
    fields: Option<Vec<(String, Template)>>,
    req_body: Option<Option<Expr>>,
    resp_body: Option<Option<Expr>>,
    /// Logged bodies are cut at these lengths.
    max_req_body: usize,
    max_resp_body: usize,
}

impl Format {
    pub(crate) fn new(c: &LogConfig) -> Result<Format, FieldError> {
        let fields = match &c.log_format {
            Some(map) => Some(
                map.iter()
                    .map(|(k, v)| {
                        let text = v.as_str().unwrap_or_default();
                        Ok((
                            k.clone(),
                            crate::template(text, &format!("log_format.{k}"))?,
                        ))
                    })
                    .collect::<Result<_, FieldError>>()?,
            ),
            None => None,
        };
        let when = |on: bool, expr: &Option<Value>, field: &str| -> Result<_, FieldError> {
            if !on {
                return Ok(None);
            }
            let expr = match expr {
                Some(v) => {
                    Some(Expr::parse(v, field).map_err(|e| FieldError::new(e.path, e.message))?)
                }
                None => None,
            };
            Ok(Some(expr))
        };
        Ok(Format {
            fields,
            req_body: when(
                c.include_req_body,
                &c.include_req_body_expr,
                "include_req_body_expr",
            )?,
            resp_body: when(
                c.include_resp_body,
                &c.include_resp_body_expr,
                "include_resp_body_expr",
            )?,
            max_req_body: c.max_req_body_bytes,
            max_resp_body: c.max_resp_body_bytes,
        })
    }

    pub(crate) fn reads_request_body(&self) -> bool {
        self.req_body.is_some()
    }

    /// Keeps what `log` will need but will no longer find: the request body
    /// (sent upstream by then), the response head. Called from `rewrite`
    /// and `header_filter`.
    pub(crate) fn keep_request(&self, ctx: &mut Ctx) {
        if self.req_body.is_some() && ctx.stash.get::<RequestBody>().is_none() {
            if let Some(body) = &ctx.body {
                let cut = body.slice(..body.len().min(self.max_req_body));
                ctx.stash.insert(RequestBody(cut));
            }
        }
    }

    pub(crate) fn keep_response(&self, ctx: &mut Ctx, head: &Head) {
        if self.fields.is_none() && ctx.stash.get::<ResponseHeaders>().is_none() {
            ctx.stash.insert(ResponseHeaders(head.headers.clone()));
        }
    }

    /// Whether to read this response's body for the entry: only one of
    /// declared length, so a stream (server-sent events, a download) is
    /// never held back to be logged.
    pub(crate) fn wants_response_body(&self, head: &Head) -> bool {
        let declared = head
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        self.resp_body.is_some()
            && declared.is_some_and(|n| n <= turnpike_plugin::MAX_BUFFERED_BODY)
    }

    pub(crate) fn keep_response_body(&self, ctx: &mut Ctx, body: &Bytes) {
        if self.resp_body.is_some() {
            let cut = body.slice(..body.len().min(self.max_resp_body));
            ctx.stash.insert(ResponseBody(cut));
        }
    }

    /// The entry for a finished request, as one line of JSON.
    pub(crate) fn line(&self, ctx: &Ctx) -> String {
        if let Some(fields) = &self.fields {
            let rendered: Vec<(&str, String)> = fields
                .iter()
                .map(|(k, t)| (k.as_str(), ctx.render(t)))
                .collect();
            return serde_json::to_string(&Pairs(&rendered)).unwrap_or_default();
        }
        let body = |wanted: &Option<Option<Expr>>, body: Option<&Bytes>| -> Option<String> {
            let when = wanted.as_ref()?;
            if when.as_ref().is_some_and(|e| !e.eval(ctx)) {
                return None;
            }
            body.map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let req_body = body(&self.req_body, ctx.stash.get::<RequestBody>().map(|b| &b.0));
        let resp_body = body(
            &self.resp_body,
            ctx.stash.get::<ResponseBody>().map(|b| &b.0),
        );
        serde_json::to_string(&entry(ctx, req_body, resp_body)).unwrap_or_default()
    }
}

#[derive(Clone)]
struct RequestBody(Bytes);
#[derive(Clone)]
struct ResponseBody(Bytes);
#[derive(Clone)]
struct ResponseHeaders(HeaderMap);

/// APISIX's default log entry.
#[derive(Serialize)]
struct Entry<'a> {
    request: RequestLog<'a>,
    response: ResponseLog<'a>,
    upstream: Option<&'a str>,
    route_id: Option<&'a str>,
    service_id: Option<&'a str>,
    consumer: Option<Consumer<'a>>,
    client_ip: String,
    start_time: u64,
    latency: f64,
    upstream_latency: Option<f64>,
    apisix_latency: f64,
    server: Server,
}

#[derive(Serialize)]
struct RequestLog<'a> {
    url: String,
    uri: &'a str,
    method: &'a str,
    headers: Headers<'a>,
    querystring: Query<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<String>,
}

#[derive(Serialize)]
struct ResponseLog<'a> {
    status: u16,
    headers: Option<Headers<'a>>,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<String>,
}

#[derive(Serialize)]
struct Consumer<'a> {
    username: &'a str,
}

#[derive(Serialize)]
struct Server {
    hostname: &'static str,
    version: &'static str,
}

fn entry(ctx: &Ctx, req_body: Option<String>, resp_body: Option<String>) -> Entry<'_> {
    let latency = ctx.started.elapsed();
    let upstream = ctx.upstream_latency;
    let started = SystemTime::now()
        .checked_sub(latency)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    let uri = ctx.req.uri.path_and_query().map_or("/", |pq| pq.as_str());
    Entry {
        request: RequestLog {
            url: format!("{}://{}{uri}", ctx.conn.scheme, ctx.host_str()),
            uri,
            method: ctx.req.method.as_str(),
            headers: Headers(&ctx.req.headers),
            querystring: Query(ctx.req.uri.query().unwrap_or_default()),
            body: req_body,
        },
        response: ResponseLog {
            status: ctx.status.map_or(0, |s| s.as_u16()),
            headers: ctx.stash.get::<ResponseHeaders>().map(|h| Headers(&h.0)),
            size: ctx.response_bytes,
            body: resp_body,
        },
        upstream: ctx.upstream_addr.as_deref(),
        route_id: ctx.route_id.as_deref(),
        service_id: ctx.service_id.as_deref(),
        consumer: ctx.consumer.as_ref().map(|c| Consumer {
            username: &c.username,
        }),
        client_ip: ctx
            .var(&turnpike_router::Var::RemoteAddr)
            .unwrap_or_default()
            .into_owned(),
        start_time: started,
        latency: ms(latency),
        upstream_latency: upstream.map(ms),
        apisix_latency: ms(latency.saturating_sub(upstream.unwrap_or_default())),
        server: Server {
            hostname: turnpike_plugin::metrics::hostname(),
            version: env!("CARGO_PKG_VERSION"),
        },
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Headers as a JSON object, values as text; a repeated header's values
/// joined with `, `.
struct Headers<'a>(&'a HeaderMap);

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.keys_len()))?;
        for name in self.0.keys() {
            let mut text = String::new();
            for (i, v) in self.0.get_all(name).iter().enumerate() {
                if i > 0 {
                    text.push_str(", ");
                }
                text.push_str(&String::from_utf8_lossy(v.as_bytes()));
            }
            map.serialize_entry(name.as_str(), &text)?;
        }
        map.end()
    }
}

/// Query arguments as a JSON object, decoded.
struct Query<'a>(&'a str);

impl Serialize for Query<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for pair in self.0.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            map.serialize_entry(
                &turnpike_router::decode_component(k),
                &turnpike_router::decode_component(v),
            )?;
        }
        map.end()
    }
}

/// `log_format`'s fields, in the configured order.
struct Pairs<'a>(&'a [(&'a str, String)]);

impl Serialize for Pairs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A logger plugin: keeps what the entry needs as the request goes, and
/// queues the entry in `log`.
pub(crate) struct Logger {
    format: Format,
    batcher: Arc<Batcher>,
}

impl Logger {
    /// `plugin`'s logger for `config` (the plugin's whole config, for the
    /// state key), sending to the sink `make` makes: the queue, its sender
    /// and the sink are kept across reloads that leave the config
    /// unchanged (and then `make` is not called).
    pub(crate) fn build<S: Sink>(
        plugin: &'static str,
        env: &Env,
        config: &Value,
        log: &LogConfig,
        make: impl FnOnce() -> S,
    ) -> Result<Arc<dyn Plugin>, FieldError> {
        let format = Format::new(log)?;
        let batch = log.batch.clone();
        let key = crate::state_key(plugin, env, None, config);
        let batcher = env.state(&key, || Batcher::new(plugin, batch, Arc::new(make())));
        Ok(Arc::new(Logger { format, batcher }))
    }
}

impl Plugin for Logger {
    fn rewrite(&self, ctx: &mut Ctx) -> Flow {
        self.format.keep_request(ctx);
        Flow::Continue
    }

    fn header_filter(&self, ctx: &mut Ctx, head: &mut Head) {
        self.format.keep_response(ctx, head);
    }

    fn wants_response_body(&self, _ctx: &Ctx, head: &Head) -> bool {
        self.format.wants_response_body(head)
    }

    fn body_filter(&self, ctx: &mut Ctx, body: &mut Bytes) {
        self.format.keep_response_body(ctx, body);
    }

    fn log(&self, ctx: &Ctx) {
        self.batcher.push(self.format.line(ctx));
    }

    fn reads_request_body(&self) -> bool {
        self.format.reads_request_body()
    }
}

/// Where batches go.
pub(crate) trait Sink: Send + Sync + 'static {
    fn send<'a>(
        &'a self,
        batch: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

/// A logger's queue and background sender, kept across reloads that do
/// not change its config. The task ends, after a last flush, when the
/// last snapshot using it is gone.
pub(crate) struct Batcher {
    plugin: &'static str,
    config: BatchConfig,
    sink: Arc<dyn Sink>,
    queue: OnceLock<Option<mpsc::Sender<String>>>,
    /// Bytes of the entries queued and not yet taken by the sender.
    pending: Arc<AtomicUsize>,
}

/// Bytes of entries a logger holds waiting, at most (besides the batch
/// being sent): bodies make entries large.
const MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;

impl Batcher {
    pub(crate) fn new(plugin: &'static str, config: BatchConfig, sink: Arc<dyn Sink>) -> Batcher {
        Batcher {
            plugin,
            config,
            sink,
            queue: OnceLock::new(),
            pending: Arc::default(),
        }
    }

    /// Queues a line, never waiting: a full queue drops it, counted.
    pub(crate) fn push(&self, line: String) {
        let queue = self.queue.get_or_init(|| self.start());
        let len = line.len();
        let room = self.pending.fetch_add(len, Ordering::AcqRel) + len <= MAX_PENDING_BYTES;
        let sent = queue.as_ref().filter(|_| room).map(|q| q.try_send(line));
        if !matches!(sent, Some(Ok(()))) {
            self.pending.fetch_sub(len, Ordering::AcqRel);
            counters().dropped.with_label_values(&[self.plugin]).inc();
        }
    }

    /// Starts the sender on the running runtime (the first `log` runs on
    /// one; the config is compiled where there may be none).
    fn start(&self) -> Option<mpsc::Sender<String>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = mpsc::channel(self.config.max_pending_entries);
        let task = Task {
            plugin: self.plugin,
            config: self.config.clone(),
            sink: self.sink.clone(),
            pending: self.pending.clone(),
        };
        runtime.spawn(task.run(rx));
        Some(tx)
    }
}

struct Task {
    plugin: &'static str,
    config: BatchConfig,
    sink: Arc<dyn Sink>,
    pending: Arc<AtomicUsize>,
}

impl Task {
    async fn run(self, mut rx: mpsc::Receiver<String>) {
        let c = &self.config;
        let (inactive, longest) = (
            Duration::from_secs(c.inactive_timeout),
            Duration::from_secs(c.buffer_duration),
        );
        let mut batch = Vec::new();
        let mut first = tokio::time::Instant::now();
        loop {
            let next = if batch.is_empty() {
                rx.recv().await
            } else {
                let wait = inactive.min(longest.saturating_sub(first.elapsed()));
                match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => {
                        self.flush(&mut batch).await;
                        continue;
                    }
                }
            };
            let Some(line) = next else {
                self.flush(&mut batch).await;
                return;
            };
            if batch.is_empty() {
                first = tokio::time::Instant::now();
            }
            self.pending.fetch_sub(line.len(), Ordering::AcqRel);
            batch.push(line);
            if batch.len() >= c.batch_max_size || first.elapsed() >= longest {
                self.flush(&mut batch).await;
            }
        }
    }

    /// Sends the batch, retrying `max_retry_count` times; a batch that
    /// cannot be sent is dropped, counted.
    async fn flush(&self, batch: &mut Vec<String>) {
        if batch.is_empty() {
            return;
        }
        let counters = counters();
        for attempt in 0..=self.config.max_retry_count {
            match self.sink.send(batch).await {
                Ok(()) => {
                    counters
                        .sent
                        .with_label_values(&[self.plugin])
                        .inc_by(batch.len() as u64);
                    batch.clear();
                    return;
                }
                Err(e) => {
                    tracing::warn!(
                        plugin = self.plugin,
                        attempt,
                        "sending {} log entries failed: {e}",
                        batch.len()
                    );
                    if attempt < self.config.max_retry_count {
                        tokio::time::sleep(Duration::from_secs(self.config.retry_delay)).await;
                    }
                }
            }
        }
        counters
            .dropped
            .with_label_values(&[self.plugin])
            .inc_by(batch.len() as u64);
        batch.clear();
    }
}

struct Counters {
    sent: IntCounterVec,
    dropped: IntCounterVec,
}

fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        let vec = |name: &str, help: &str| {
            register(IntCounterVec::new(Opts::new(name, help), &["plugin"]).expect("valid metric"))
        };
        Counters {
            sent: vec("turnpike_logger_sent_total", "Log entries delivered, by logger plugin"),
            dropped: vec(
                "turnpike_logger_dropped_total",
                "Log entries dropped (queue full, or delivery failed after retries), by logger plugin",
            ),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::ctx;
    use std::sync::Mutex;

    fn config(extra: Value) -> LogConfig {
        let schema = json!({"type": "object", "properties": properties()});
        let mut c = extra;
        turnpike_plugin::fill_defaults(&schema, &mut c);
        serde_json::from_value(c).unwrap()
    }

    #[test]
    fn the_default_entry_has_apisix_fields() {
        let f = Format::new(&config(json!({}))).unwrap();
        let mut c = ctx("/orders?id=7&x=a%20b");
        c.route_id = Some("r1".into());
        c.status = Some(http::StatusCode::CREATED);
        c.upstream_addr = Some("10.0.0.9:80".into());
        c.upstream_latency = Some(Duration::from_millis(3));
        let line: Value = serde_json::from_str(&f.line(&c)).unwrap();
        assert_eq!(line["route_id"], "r1");
        assert_eq!(line["response"]["status"], 201);
        assert_eq!(line["request"]["method"], "GET");
        assert_eq!(line["request"]["uri"], "/orders?id=7&x=a%20b");
        assert_eq!(
            line["request"]["url"],
            "http://example.com/orders?id=7&x=a%20b"
        );
        assert_eq!(line["request"]["querystring"]["x"], "a b");
        assert_eq!(line["request"]["headers"]["host"], "example.com");
        assert_eq!(line["upstream"], "10.0.0.9:80");
        assert_eq!(line["client_ip"], "10.0.0.1");
        assert_eq!(line["upstream_latency"], 3.0);
        assert!(line["start_time"].as_u64().unwrap() > 1_700_000_000_000);
    }

    #[test]
    fn log_format_picks_the_fields() {
        let f = Format::new(&config(
            json!({"log_format": {"who": "$remote_addr", "path": "$uri", "st": "$status"}}),
        ))
        .unwrap();
        let mut c = ctx("/p");
        c.status = Some(http::StatusCode::OK);
        assert_eq!(f.line(&c), r#"{"path":"/p","st":"200","who":"10.0.0.1"}"#);
        let bad = Format::new(&config(json!({"log_format": {"x": "$nope"}})));
        assert_eq!(bad.err().unwrap().path, "log_format.x");
    }

    /// Records batches; fails while `down`; takes `delay` per batch.
    #[derive(Default)]
    struct Memory {
        batches: Mutex<Vec<Vec<String>>>,
        down: std::sync::atomic::AtomicBool,
        delay: Duration,
    }

    impl Sink for Arc<Memory> {
        fn send<'a>(
            &'a self,
            batch: &'a [String],
        ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err("down".into());
                }
                self.batches.lock().unwrap().push(batch.to_vec());
                Ok(())
            })
        }
    }

    fn batch_config(extra: Value) -> BatchConfig {
        config(extra).batch
    }

    #[tokio::test(start_paused = true)]
    async fn batches_go_by_size_and_after_inactivity() {
        let memory = Arc::new(Memory::default());
        let b = Batcher::new(
            "test",
            batch_config(json!({"batch_max_size": 3, "inactive_timeout": 2})),
            Arc::new(memory.clone()),
        );
        for i in 0..7 {
            b.push(i.to_string());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            memory.batches.lock().unwrap().len(),
            2,
            "two full batches at once"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let batches = memory.batches.lock().unwrap().clone();
        assert_eq!(
            batches,
            [vec!["0", "1", "2"], vec!["3", "4", "5"], vec!["6"]]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_or_failing_sink_drops_beyond_the_queue_and_retries() {
        let memory = Arc::new(Memory {
            delay: Duration::from_secs(10),
            ..Memory::default()
        });
        let config = json!({"batch_max_size": 1, "max_pending_entries": 2, "max_retry_count": 1});
        let b = Batcher::new("slow-test", batch_config(config), Arc::new(memory.clone()));
        let dropped = || counters().dropped.with_label_values(&["slow-test"]).get();
        for i in 0..10 {
            b.push(i.to_string()); // never waits
        }
        assert!(
            dropped() >= 7,
            "the queue holds 2 and the sender 1: {}",
            dropped()
        );
        memory.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let before = dropped();
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(
            dropped() > before,
            "failed batches are dropped after the retry, counted"
        );
        assert!(memory.batches.lock().unwrap().is_empty());
    }
}
