//! The request path of a route with plugins: the request phases, then the
//! upstream (or a plugin's answer), then the response phases.
//!
//! Routes without plugins never come here (see `handler::handle`), so they
//! pay nothing for the runtime.

use std::time::Duration;

use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, ETAG, LAST_MODIFIED, TE,
    TRANSFER_ENCODING, VARY,
};
use http::{Method, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use turnpike_config::{Route, Snapshot};
use turnpike_plugin::{
    run_body_filter, run_header_filter, run_phase, Chain, Ctx, Head, Phase, Reply,
    MAX_BUFFERED_BODY,
};

use crate::body::{BodySent, Logged, ProxyBody, RequestBody};
use crate::error::Failure;
use crate::handler::forward;
use crate::headers::{strip_hop_by_hop, wants_upgrade};
use crate::X_REQUEST_ID;

/// Serves a request on a route with plugins (its own or global rules').
pub(crate) async fn serve(
    snapshot: &Snapshot,
    route: &Route,
    mut ctx: Ctx,
    body: Incoming,
    client_body_timeout: Duration,
) -> Response<ProxyBody> {
    let (global, chain) = (&snapshot.global, &route.chain);
    // Before any plugin: a client's `Connection` header must not name, and
    // so remove, headers the plugins set.
    let upgrade =
        route.websocket && ctx.req.version == Version::HTTP_11 && wants_upgrade(&ctx.req.headers);
    let trailers = ctx
        .req
        .headers
        .get(TE)
        .filter(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
        .cloned();
    strip_hop_by_hop(&mut ctx.req.headers, upgrade);
    // `TE: trailers` stays for the upstream's turn to decide on: gRPC needs
    // it end to end (see `handler::upstream_headers`).
    if let Some(te) = trailers {
        ctx.req.headers.insert(TE, te);
    }
    // From here on, `log` runs whatever happens, even if the client leaves.
    let mut logged = Logged::start(ctx, global.clone(), chain.clone());
    let ctx = &mut logged.ctx;
    let mut body = Some(body);
    let answer = match request_phases(
        global,
        chain,
        route.reads_body,
        ctx,
        &mut body,
        client_body_timeout,
    )
    .await
    {
        Ok(None) => {
            // The response phases still read the request's headers (`http_*`
            // in filters, templates, loggers): forward hands them back.
            Answer::Upstream(forward(route, ctx, body, client_body_timeout, true).await)
        }
        Ok(Some(reply)) => Answer::Plugin(reply),
        // The gateway's own answers (413, 408) go through the response
        // phases too: CORS headers and logging apply to them as well.
        Err(failure) => Answer::Upstream(failure.respond(&ctx.request_id)),
    };
    response_phases(global, chain, logged, answer).await
}

/// A queued request's turn (the asynchronous mode's workers): the phase
/// left after `access` (before_proxy), the upstream, then the response
/// phases and `log`, as the request would have had them. The request
/// phases up to `access` ran when it was accepted.
pub(crate) async fn serve_queued(
    snapshot: &Snapshot,
    route: &Route,
    ctx: Ctx,
    client_body_timeout: Duration,
) -> Response<ProxyBody> {
    let (global, chain) = (&snapshot.global, &route.chain);
    let mut logged = Logged::start(ctx, global.clone(), chain.clone());
    let ctx = &mut logged.ctx;
    let answer = match run_phase(Phase::BeforeProxy, global, chain, ctx).await {
        Some(reply) => Answer::Plugin(reply),
        None => Answer::Upstream(forward(route, ctx, None, client_body_timeout, true).await),
    };
    response_phases(global, chain, logged, answer).await
}

enum Answer {
    Upstream(Response<ProxyBody>),
    Plugin(Reply),
}

/// rewrite, access, before_proxy; `Some` when a plugin answered.
async fn request_phases(
    global: &Chain,
    chain: &Chain,
    reads_body: bool,
    ctx: &mut Ctx,
    body: &mut Option<Incoming>,
    client_body_timeout: Duration,
) -> Result<Option<Reply>, Failure> {
    if reads_body {
        read_body(ctx, body, client_body_timeout).await?;
    }
    if let Some(reply) = run_phase(Phase::Rewrite, global, chain, ctx).await {
        return Ok(Some(reply));
    }
    for phase in [Phase::Access, Phase::BeforeProxy] {
        if let Some(reply) = run_phase(phase, global, chain, ctx).await {
            return Ok(Some(reply));
        }
    }
    Ok(None)
}

/// Reads the client's body into `ctx.body` (once), within
/// [`MAX_BUFFERED_BODY`] and the client body timeout.
async fn read_body(
    ctx: &mut Ctx,
    body: &mut Option<Incoming>,
    client_body_timeout: Duration,
) -> Result<(), Failure> {
    let Some(incoming) = body.take() else {
        return Ok(());
    };
    let declared = ctx
        .header(CONTENT_LENGTH.as_str())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BUFFERED_BODY) {
        return Err(Failure::TooLarge);
    }
    let timed = RequestBody::new(incoming, BodySent::done(), client_body_timeout);
    match Limited::new(ProxyBody::Request(timed), MAX_BUFFERED_BODY)
        .collect()
        .await
    {
        Ok(collected) => {
            ctx.body = Some(collected.to_bytes());
            Ok(())
        }
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Failure::TooLarge),
        Err(e) if e.is::<crate::body::ClientBodyTimeout>() => Err(Failure::ClientTimeout),
        Err(e) => {
            tracing::debug!(request_id = ?ctx.request_id, "reading the request body failed: {e}");
            Err(Failure::BadRequest)
        }
    }
}

/// header_filter, body_filter (when a plugin asked for the body), then the
/// body, which runs `log` when it is over.
async fn response_phases(
    global: &Chain,
    chain: &Chain,
    mut logged: Box<Logged>,
    answer: Answer,
) -> Response<ProxyBody> {
    let ctx = &mut logged.ctx;
    let resp = match filter(global, chain, ctx, answer).await {
        Ok(resp) => resp,
        Err(reason) => {
            tracing::warn!(request_id = ?ctx.request_id, "response body for body_filter: {reason}");
            ctx.status = Some(StatusCode::BAD_GATEWAY);
            Failure::BadGateway.respond(&ctx.request_id)
        }
    };
    let bodyless = !may_have_body(ctx, resp.status());
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, logged.into_body(body, bodyless))
}

/// header_filter and body_filter; `Err` when the body a plugin asked for
/// could not be read.
async fn filter(
    global: &Chain,
    chain: &Chain,
    ctx: &mut Ctx,
    answer: Answer,
) -> Result<Response<ProxyBody>, String> {
    let (mut head, mut body) = match answer {
        Answer::Upstream(resp) => {
            let (parts, body) = resp.into_parts();
            let head = Head {
                status: parts.status,
                headers: parts.headers,
                body: None,
                whole: false,
            };
            (head, Some(body))
        }
        Answer::Plugin(reply) => {
            let mut head = Head::from(reply);
            head.headers
                .insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
            (head, None)
        }
    };
    let from_upstream = body.is_some();
    ctx.status = Some(head.status);
    add_headers(&mut head.headers, std::mem::take(&mut ctx.response_headers));
    let wants_body = run_header_filter(global, chain, ctx, &mut head);
    // Plugins may have added headers of the connection (an auth service's
    // `Connection: close`, say): they are not the client's to receive.
    strip_hop_by_hop(
        &mut head.headers,
        head.status == StatusCode::SWITCHING_PROTOCOLS,
    );
    if head.body.is_none() && wants_body && may_have_body(ctx, head.status) {
        if let Some(upstream) = body.take() {
            match buffer(upstream, &head).await {
                Buffered::Whole(mut bytes) => {
                    run_body_filter(global, chain, ctx, &mut bytes);
                    head.body = Some(bytes);
                }
                Buffered::TooLarge(unread) => body = Some(unread),
                Buffered::Failed(reason) => return Err(reason),
            }
        }
    }
    let body = match head.body {
        Some(bytes) => {
            if from_upstream && !head.whole {
                // The upstream's validators and encoding describe a body
                // the client no longer gets.
                for name in [CONTENT_ENCODING, ETAG, LAST_MODIFIED] {
                    head.headers.remove(name);
                }
            }
            head.headers.remove(TRANSFER_ENCODING);
            head.headers
                .insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            ProxyBody::full(bytes)
        }
        None => body.unwrap_or(ProxyBody::Empty),
    };
    ctx.response_head_bytes = head_bytes(&head.headers);
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
    Ok(resp)
}

/// Plugins' response headers over the upstream's: each replaces the
/// upstream's header of that name, except `Vary`, which is added to.
fn add_headers(headers: &mut HeaderMap, extra: HeaderMap) {
    // Further values of the same name come with no name.
    let mut current: Option<HeaderName> = None;
    for (name, value) in extra {
        match name {
            Some(name) => {
                if name == VARY {
                    headers.append(&name, value);
                } else {
                    headers.insert(&name, value);
                }
                current = Some(name);
            }
            None => {
                if let Some(name) = &current {
                    headers.append(name, value);
                }
            }
        }
    }
}

/// The size of a response head as HTTP/1.1 frames it: status line,
/// `name: value\r\n` per header, the blank line.
fn head_bytes(headers: &HeaderMap) -> u64 {
    let fields: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    (fields + 17 + 2) as u64
}

/// Whether a response to this request may carry a body at all.
fn may_have_body(ctx: &Ctx, status: StatusCode) -> bool {
    ctx.req.method != Method::HEAD
        && !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED
}

enum Buffered {
    Whole(Bytes),
    /// Declared larger than the limit: streamed as it is, unfiltered.
    TooLarge(ProxyBody),
    Failed(String),
}

/// The upstream's body in memory for `body_filter`. A body that says it is
/// larger than [`MAX_BUFFERED_BODY`] is handed back unread, to stream as it
/// is; one that turns out larger while read (chunked, with no length) fails
/// the response with 502, since its start is gone.
async fn buffer(body: ProxyBody, head: &Head) -> Buffered {
    let declared = head
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BUFFERED_BODY) {
        return Buffered::TooLarge(body);
    }
    match Limited::new(body, MAX_BUFFERED_BODY).collect().await {
        Ok(c) => Buffered::Whole(c.to_bytes()),
        Err(e) => Buffered::Failed(e.to_string()),
    }
}

/// A plugin's answer as a response, without the response phases (the
/// refusal of an authentication run alone).
pub(crate) fn reply_response(reply: turnpike_plugin::Reply) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(reply.body));
    *resp.status_mut() = reply.status;
    *resp.headers_mut() = reply.headers;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use turnpike_plugin::{Conn, Entry, Plugin};

    /// What `log` saw: (status, bytes, complete).
    type Seen = Arc<Mutex<Vec<(u16, u64, bool)>>>;

    struct Recorder(Seen);

    impl Plugin for Recorder {
        fn log(&self, ctx: &Ctx) {
            let status = ctx.status.map_or(0, |s| s.as_u16());
            let seen = (status, ctx.response_bytes, ctx.response_complete);
            self.0.lock().unwrap().push(seen);
        }
    }

    /// A request on a route whose one plugin records what `log` saw.
    fn guard(seen: &Seen, status: Option<StatusCode>) -> Box<Logged> {
        let entry = Entry {
            name: "recorder",
            priority: 1,
            plugin: Arc::new(Recorder(seen.clone())),
            filter: None,
            disabled: false,
        };
        let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
        let conn = Arc::new(Conn::new(
            "10.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            "http",
        ));
        let mut ctx = Ctx::new(parts, conn, HeaderValue::from_static("id"));
        ctx.status = status;
        Logged::start(ctx, Chain::default(), Chain::new(vec![entry]))
    }

    #[tokio::test]
    async fn log_runs_once_the_body_is_sent_with_its_size() {
        let seen = Seen::default();
        let body = guard(&seen, Some(StatusCode::OK)).into_body(ProxyBody::full("hello"), false);
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello");
        assert_eq!(*seen.lock().unwrap(), [(200, 5, true)]);
    }

    #[tokio::test]
    async fn log_runs_when_the_client_goes_away() {
        // Before the response: the request's guard is dropped mid-way.
        let seen = Seen::default();
        drop(guard(&seen, None));
        assert_eq!(*seen.lock().unwrap(), [(0, 0, false)]);
        // During the response, before a byte of the body was sent.
        let seen = Seen::default();
        drop(guard(&seen, Some(StatusCode::OK)).into_body(ProxyBody::full("never sent"), false));
        assert_eq!(*seen.lock().unwrap(), [(200, 0, false)]);
    }

    #[test]
    fn plugin_headers_replace_the_upstreams_but_vary_adds_up() {
        let mut upstream = HeaderMap::new();
        upstream.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
        upstream.insert("x-a", HeaderValue::from_static("up"));
        let mut extra = HeaderMap::new();
        extra.insert(VARY, HeaderValue::from_static("Origin"));
        extra.insert("x-a", HeaderValue::from_static("plugin"));
        extra.append("x-b", HeaderValue::from_static("1"));
        extra.append("x-b", HeaderValue::from_static("2"));
        add_headers(&mut upstream, extra);
        let vary: Vec<_> = upstream.get_all(VARY).iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin"]);
        assert_eq!(upstream["x-a"], "plugin");
        assert_eq!(upstream.get_all("x-b").iter().count(), 2);
    }
}
