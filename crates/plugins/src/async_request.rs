//! `async-request` (Turnpike's own): the gateway answers `202 Accepted`
//! with a request id at once, after the request is stored durably; workers
//! send it upstream later, and the client fetches the result at
//! `/turnpike/async/{id}`. Authentication, validation and rate limiting run
//! first (this plugin's `access` hook comes after theirs), so a request
//! they refuse is never queued. See docs/plugins/async-request.md.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin, Reply, Resume};
use turnpike_queue::{new_id, now_ms, Callback, Job, Refused, RESULT_PREFIX};

pub(crate) const NAME: &str = "async-request";
/// After the authentication plugins and the limiters (1001–1005). A
/// traffic-split (966) on the route does not apply to queued requests.
pub(crate) const PRIORITY: i32 = 950;

/// The shortest time, in seconds, a result with a webhook is kept: its
/// six attempts (10 s each at most) and their waits (31 s) fit in it.
const WEBHOOK_KEEP: u64 = 120;

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "ttl": {"type": "integer", "minimum": 1, "maximum": 86400, "default": 60},
            "result_ttl": {"type": "integer", "minimum": 1, "maximum": 2592000, "default": 3600},
            "max_result_bytes": {"type": "integer", "minimum": 0, "maximum": 8388608, "default": 1048576},
            "concurrency": {"type": "integer", "minimum": 1, "maximum": 1024, "default": 4},
            "max_queue": {"type": "integer", "minimum": 1, "maximum": 10000000, "default": 10000},
            "public_results": {"type": "boolean", "default": false},
            "retry_after": {"type": "integer", "minimum": 1, "maximum": 3600, "default": 5},
            "callback_url": {"type": "string", "pattern": "^https?://"},
            "callback_secret": {"type": "string", "minLength": 16},
            "callback_ssl_verify": {"type": "boolean", "default": true}
        },
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    ttl: u64,
    result_ttl: u64,
    max_result_bytes: usize,
    concurrency: u32,
    max_queue: usize,
    public_results: bool,
    retry_after: u64,
    callback_url: Option<String>,
    callback_secret: Option<String>,
    callback_ssl_verify: bool,
}

struct AsyncRequest {
    c: Config,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build).with_secrets(&["callback_secret"])
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    if let Some(url) = &c.callback_url {
        crate::http_url(url, "callback_url")?;
    }
    Ok(Arc::new(AsyncRequest { c }))
}

impl Plugin for AsyncRequest {
    fn reads_request_body(&self) -> bool {
        true
    }

    fn access(&self, ctx: &mut Ctx) -> Flow {
        let now = now_ms();
        let headers: Vec<(String, Vec<u8>)> = ctx
            .req
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let job = Job {
            id: new_id(),
            route: ctx.route_id.as_deref().unwrap_or_default().to_owned(),
            consumer: ctx.consumer.as_ref().map(|c| c.username.to_string()),
            public: self.c.public_results,
            method: ctx.req.method.as_str().to_owned(),
            // As the plugins before left it (proxy-rewrite, …).
            uri: ctx.upstream_uri.as_str().to_owned(),
            host: ctx
                .host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned),
            upstream_host: ctx
                .upstream_host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned),
            remote: Some(ctx.conn.remote.to_string()),
            scheme: Some(ctx.conn.scheme.to_owned()),
            headers,
            submitted: now,
            expires: now + self.c.ttl * 1000,
            // A webhook's retries read the result: kept while they may run.
            result_ttl: match self.c.callback_url {
                Some(_) => self.c.result_ttl.max(WEBHOOK_KEEP),
                None => self.c.result_ttl,
            },
            max_result_bytes: self.c.max_result_bytes,
            callback: self.c.callback_url.as_ref().map(|url| Callback {
                url: url.clone(),
                secret: self.c.callback_secret.clone(),
                verify: self.c.callback_ssl_verify,
            }),
            concurrency: self.c.concurrency,
            idempotency_key: ctx
                .req
                .headers
                .get(&IDEMPOTENCY_KEY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        };
        let body = ctx.body.clone().unwrap_or_default();
        let (max_queue, retry_after) = (self.c.max_queue, self.c.retry_after);
        // The store waits for fsync (or Redis): off the proxy's threads.
        Flow::Await(Box::pin(async move {
            // Opening an embedded queue (on first use) touches the disk.
            let queue = match turnpike_queue::running() {
                Some(queue) => Some(queue),
                None => tokio::task::spawn_blocking(turnpike_queue::installed)
                    .await
                    .ok()
                    .flatten(),
            };
            let stored = match queue {
                Some(queue) => queue.submit(job, body, max_queue).await,
                None => Err(Refused::Store(
                    "the queue is not running (see the log)".into(),
                )),
            };
            let resume: Resume = Box::new(move |ctx: &mut Ctx| match stored {
                Ok(accepted) => Flow::Respond(accepted_reply(&accepted.id, accepted.repeated)),
                Err(Refused::Full) => Flow::Respond(
                    Reply::message(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the asynchronous queue of this route is full",
                    )
                    .header(RETRY_AFTER, HeaderValue::from(retry_after)),
                ),
                Err(Refused::Store(e)) => {
                    tracing::error!(request_id = ?ctx.request_id, "async-request: cannot queue: {e}");
                    Flow::Respond(Reply::message(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the asynchronous queue cannot store requests",
                    ))
                }
            });
            resume
        }))
    }
}

/// `202 Accepted` with the id, its state and where the result will be.
fn accepted_reply(id: &str, repeated: bool) -> Reply {
    let url = format!("{RESULT_PREFIX}{id}");
    let body =
        json!({"request_id": id, "status": "queued", "result_url": url, "repeated": repeated});
    let mut reply = Reply::json(StatusCode::ACCEPTED, body.to_string());
    if let Ok(v) = HeaderValue::from_str(&url) {
        reply = reply.header(LOCATION, v);
    }
    reply
}
