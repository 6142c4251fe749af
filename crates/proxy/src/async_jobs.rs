//! The asynchronous mode's ends in the proxy: a worker sends a queued job
//! upstream through its route ([`execute`]); a client reads the result at
//! `/turnpike/async/{id}` ([`result`]), by polling, long polling or
//! Server-Sent Events; and a route's webhook gets each outcome
//! ([`deliver`]), signed with HMAC-SHA256 (the queue keeps the deliveries
//! due and retries them with backoff).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use turnpike_config::Snapshot;
use turnpike_plugin::{authenticate, Conn, Ctx};
use turnpike_queue::{Answer, Found, Job, Outcome};

use crate::body::ProxyBody;
use crate::Shared;

/// Names the job on a result, and travels upstream as `X-Request-Id`.
static X_ASYNC_REQUEST_ID: HeaderName = HeaderName::from_static("x-async-request-id");

/// The longest `?wait=` a client may ask for, in seconds.
const MAX_WAIT: u64 = 60;

/// Sends `job` upstream with its route's balancer, timeouts and retries,
/// through the phases it has left (before_proxy, then the response phases
/// and log), and keeps the answer (its body cut at the job's
/// `max_result_bytes`).
pub async fn execute(shared: &Shared, job: Job, body: Bytes) -> Outcome {
    let snapshot = shared.snapshot.load_full();
    let Some(route) = snapshot.route(&job.route) else {
        return gateway_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "the route of this request no longer exists",
        );
    };
    let Some(mut ctx) = job_ctx(&job) else {
        return gateway_answer(
            StatusCode::BAD_REQUEST,
            "the stored request cannot be rebuilt",
        );
    };
    ctx.body = Some(body);
    // Its plugins join the later phases, as they would have.
    ctx.consumer = job
        .consumer
        .as_deref()
        .and_then(|c| snapshot.consumers.get(c).cloned());
    let resp = crate::phases::serve_queued(&snapshot, route, ctx, shared.client_body_timeout).await;
    let (parts, body) = resp.into_parts();
    let (body, truncated) = read_at_most(body, job.max_result_bytes).await;
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    Outcome {
        answer: Answer {
            status: parts.status.as_u16(),
            headers,
            truncated,
        },
        body,
    }
}

/// The request as the gateway accepted it, with the job id as its
/// request id (and `X-Request-Id`), so a service can tell a repeat.
fn job_ctx(job: &Job) -> Option<Ctx> {
    let mut builder = http::Request::builder()
        .method(job.method.as_str())
        .uri(job.uri.as_str());
    for (k, v) in &job.headers {
        builder = builder.header(k.as_str(), v.as_slice());
    }
    let (mut parts, ()) = builder.body(()).ok()?.into_parts();
    if let Some(host) = job
        .host
        .as_deref()
        .and_then(|h| HeaderValue::from_str(h).ok())
    {
        parts.headers.insert(http::header::HOST, host);
    }
    let id = HeaderValue::from_str(&job.id).ok()?;
    parts
        .headers
        .insert(crate::X_REQUEST_ID.clone(), id.clone());
    // Authentication ran when the request was accepted: the upstream
    // still learns who sent it.
    if let Some(consumer) = job
        .consumer
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        parts
            .headers
            .insert(HeaderName::from_static("x-consumer-username"), consumer);
    }
    // The client's address and scheme, for X-Forwarded-*.
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let remote = job
        .remote
        .as_deref()
        .and_then(|r| r.parse().ok())
        .unwrap_or(loopback);
    let scheme = if job.scheme.as_deref() == Some("https") {
        "https"
    } else {
        "http"
    };
    let conn = Arc::new(Conn::new(remote, loopback, scheme));
    let mut ctx = Ctx::new(parts, conn, id);
    ctx.upstream_host = job
        .upstream_host
        .as_deref()
        .and_then(|h| HeaderValue::from_str(h).ok());
    Some(ctx)
}

/// The body, at most `max` bytes of it; whether it was cut.
async fn read_at_most(mut body: ProxyBody, max: usize) -> (Bytes, bool) {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // Cut short by the upstream: say so rather than pass it as whole.
            return (buf.freeze(), true);
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                buf.extend_from_slice(&data[..max - buf.len()]);
                return (buf.freeze(), true);
            }
            buf.extend_from_slice(&data);
        }
    }
    (buf.freeze(), false)
}

fn gateway_answer(status: StatusCode, message: &str) -> Outcome {
    Outcome::error(status.as_u16(), message)
}

/// `GET /turnpike/async/{id}[?wait=N]`: 202 with the state while the job
/// waits or runs, then the upstream's answer as it was (with
/// `X-Async-Request-Id`); 404 when unknown (or another consumer's), 410
/// when it expired unexecuted. `wait` holds the answer up to N seconds
/// (at most 60) for the job to end.
pub(crate) async fn result(
    snapshot: &Snapshot,
    id: &str,
    parts: Parts,
    conn: Arc<Conn>,
    request_id: HeaderValue,
) -> Response<ProxyBody> {
    let mut resp = read_result(snapshot, id, parts, conn, request_id.clone()).await;
    // The gateway's own answers name this request; a stored answer keeps
    // the id it had (the job's).
    resp.headers_mut()
        .entry(crate::X_REQUEST_ID.clone())
        .or_insert(request_id);
    resp
}

async fn read_result(
    snapshot: &Snapshot,
    id: &str,
    parts: Parts,
    conn: Arc<Conn>,
    request_id: HeaderValue,
) -> Response<ProxyBody> {
    let Some(queue) = turnpike_queue::running() else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error_msg": "no asynchronous queue on this gateway"}),
        );
    };
    let wait = match parts
        .uri
        .query()
        .and_then(|q| turnpike_router::query_arg(q, "wait"))
    {
        None => 0,
        Some(w) => match w.parse::<u64>() {
            Ok(w) => w.min(MAX_WAIT),
            Err(_) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error_msg": "wait must be a whole number of seconds"}),
                )
            }
        },
    };
    let found = match queue.lookup(id).await {
        Ok(f) => f,
        Err(e) => return unavailable(&format!("{e:?}")),
    };
    let unknown = || answer(id, Found::Unknown);
    let Some(job) = found.job() else {
        return unknown();
    };
    let parts_accept = parts.headers.get(http::header::ACCEPT).cloned();
    if !job.public {
        if let Some(owner) = &job.consumer {
            let mut ctx = Ctx::new(parts, conn, request_id);
            match asker(snapshot, &job.route, &mut ctx).await {
                Err(reply) => return crate::phases::reply_response(reply),
                // Another consumer's request does not exist for this one.
                Ok(who) if who.as_deref() != Some(owner.as_str()) => return unknown(),
                Ok(_) => {}
            }
        }
    }
    if wants_events(&parts_accept) {
        return events(queue, id.to_owned(), found);
    }
    let found = if wait > 0 && !found.settled() {
        match queue.wait(id, Duration::from_secs(wait)).await {
            Ok(f) => f,
            Err(e) => return unavailable(&format!("{e:?}")),
        }
    } else {
        found
    };
    answer(id, found)
}

/// Who is asking, by the authentication plugins of the job's route (and
/// the global rules); `Err` is their refusal.
async fn asker(
    snapshot: &Snapshot,
    route: &str,
    ctx: &mut Ctx,
) -> Result<Option<String>, turnpike_plugin::Reply> {
    let chain = snapshot
        .route(route)
        .map(|r| r.chain.clone())
        .unwrap_or_default();
    if let Some(reply) = authenticate(&snapshot.global, &chain, ctx).await {
        return Err(reply);
    }
    Ok(ctx.consumer.as_ref().map(|c| c.username.to_string()))
}

fn answer(id: &str, found: Found) -> Response<ProxyBody> {
    match found {
        Found::Unknown => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error_msg": "unknown request id", "request_id": id}),
        ),
        Found::Waiting { status, ahead, .. } => {
            let mut resp = json(
                StatusCode::ACCEPTED,
                serde_json::json!({"request_id": id, "status": status, "ahead": ahead}),
            );
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        Found::Expired { .. } => json(
            StatusCode::GONE,
            serde_json::json!({"request_id": id, "status": "expired"}),
        ),
        Found::Done { answer, body, .. } => {
            let mut resp = Response::new(ProxyBody::full(body));
            *resp.status_mut() =
                StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let headers = resp.headers_mut();
            for (k, v) in &answer.headers {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_bytes(v),
                ) {
                    headers.append(k, v);
                }
            }
            // The stored length is the stored body's.
            headers.remove(http::header::CONTENT_LENGTH);
            headers.remove(http::header::TRANSFER_ENCODING);
            if let Ok(v) = HeaderValue::from_str(id) {
                headers.insert(X_ASYNC_REQUEST_ID.clone(), v);
            }
            if answer.truncated {
                headers.insert(
                    HeaderName::from_static("x-async-truncated"),
                    HeaderValue::from_static("true"),
                );
            }
            resp
        }
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn unavailable(why: &str) -> Response<ProxyBody> {
    tracing::error!("async results: {why}");
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        serde_json::json!({"error_msg": "the asynchronous queue cannot be read"}),
    )
}

fn wants_events(accept: &Option<HeaderValue>) -> bool {
    accept
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// How long an event stream may stay open.
const EVENTS_FOR: Duration = Duration::from_secs(600);

/// Server-Sent Events: `status` events while the job waits (and a comment
/// every 15 s to keep the connection), then one `result`, `expired` or
/// `unknown` event, and the stream ends.
fn events(queue: Arc<turnpike_queue::Queue>, id: String, first: Found) -> Response<ProxyBody> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + EVENTS_FOR;
        let mut found = first;
        let mut said = None;
        loop {
            let event = match &found {
                Found::Waiting { status, ahead, .. } => {
                    let now =
                        serde_json::json!({"request_id": id, "status": status, "ahead": ahead});
                    if said.as_ref() == Some(&now) {
                        Bytes::from_static(b": waiting\n\n")
                    } else {
                        said = Some(now.clone());
                        Bytes::from(format!("event: status\ndata: {now}\n\n"))
                    }
                }
                Found::Done { .. } => Bytes::from(format!(
                    "event: result\ndata: {}\n\n",
                    outcome_json(&id, &found)
                )),
                Found::Expired { .. } => Bytes::from(format!(
                    "event: expired\ndata: {}\n\n",
                    outcome_json(&id, &found)
                )),
                Found::Unknown => Bytes::from(format!(
                    "event: unknown\ndata: {}\n\n",
                    serde_json::json!({"request_id": id})
                )),
            };
            let last = found.settled();
            if tx.send(event).await.is_err() || last || tokio::time::Instant::now() >= deadline {
                return;
            }
            found = match queue
                .wait_change(&id, &found, Duration::from_secs(15))
                .await
            {
                Ok(f) => f,
                Err(_) => return,
            };
        }
    });
    let mut resp = Response::new(ProxyBody::Pushed(rx));
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    resp
}

/// A job's outcome as events and webhooks carry it: the upstream's status,
/// headers and body (as text, or `body_base64` when it is not UTF-8).
fn outcome_json(id: &str, found: &Found) -> serde_json::Value {
    match found {
        Found::Done { answer, body, .. } => {
            let headers: serde_json::Map<String, serde_json::Value> = answer
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned().into()))
                .collect();
            let mut response = serde_json::json!({"status": answer.status, "headers": headers, "truncated": answer.truncated});
            match std::str::from_utf8(body) {
                Ok(text) => response["body"] = text.into(),
                Err(_) => {
                    use base64::Engine;
                    response["body_base64"] = base64::engine::general_purpose::STANDARD
                        .encode(body)
                        .into();
                }
            }
            serde_json::json!({"request_id": id, "status": "done", "response": response})
        }
        Found::Expired { .. } => serde_json::json!({"request_id": id, "status": "expired"}),
        _ => serde_json::json!({"request_id": id, "status": "unknown"}),
    }
}

/// One webhook attempt (the queue keeps the deliveries due and retries,
/// see `turnpike_queue::Deliver`): the outcome as JSON, POSTed to the
/// route's `callback_url`, signed when it has a `callback_secret`.
pub fn deliver(
    job: &Job,
    found: &Found,
) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> {
    let Some(callback) = job.callback.clone() else {
        return Box::pin(async { Ok(()) });
    };
    let payload = outcome_json(&job.id, found).to_string();
    let id = job.id.clone();
    Box::pin(async move { post(&callback, &id, payload).await })
}

/// The webhook clients: with and without certificate checks.
fn webhook_client(verify: bool) -> Client<turnpike_plugin::outbound::Connector, Full<Bytes>> {
    static CLIENTS: OnceLock<[Client<turnpike_plugin::outbound::Connector, Full<Bytes>>; 2]> =
        OnceLock::new();
    CLIENTS.get_or_init(|| {
        [false, true].map(|verify| {
            Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(turnpike_plugin::outbound::connector(verify))
        })
    })[verify as usize]
        .clone()
}

async fn post(
    callback: &turnpike_queue::Callback,
    id: &str,
    payload: String,
) -> Result<(), String> {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut req = http::Request::post(callback.url.as_str())
        .header(CONTENT_TYPE, "application/json")
        .header("x-turnpike-request-id", id)
        .header("x-turnpike-timestamp", timestamp);
    if let Some(secret) = &callback.secret {
        req = req.header(
            "x-turnpike-signature",
            signature(secret, timestamp, &payload),
        );
    }
    let req = req
        .body(Full::new(Bytes::from(payload)))
        .map_err(|_| format!("`{}` is not a usable URL", callback.url))?;
    let sent = tokio::time::timeout(
        Duration::from_secs(10),
        webhook_client(callback.verify).request(req),
    )
    .await;
    match sent {
        Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
        Ok(Ok(resp)) => Err(format!("answered {}", resp.status())),
        Ok(Err(e)) => Err(turnpike_plugin::outbound::describe(&e)),
        Err(_) => Err("no answer in 10 s".into()),
    }
}

/// `sha256=<hex of HMAC-SHA256(secret, "{timestamp}.{payload}")>`: the
/// timestamp is signed too, so a receiver can refuse old replays.
fn signature(secret: &str, timestamp: u64, payload: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("{timestamp}.{payload}").as_bytes());
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_and_payload() {
        // RFC 4231-style check against a value computed independently
        // (python3: hmac.new(b"key", b"1.{}", hashlib.sha256).hexdigest()).
        assert_eq!(
            signature("key", 1, "{}"),
            "sha256=1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224"
        );
    }
}
