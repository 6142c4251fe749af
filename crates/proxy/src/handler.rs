//! The request path: normalise, route, run the plugins, pick a node,
//! forward, stream back.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, COOKIE, HOST, TE, TRANSFER_ENCODING,
};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme as UriScheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use turnpike_config::{HashOn, KeyPart, PassHost, Route, Scheme, Snapshot, Timeouts, Upstream};
use turnpike_plugin::{host_only, Conn, Ctx};
use turnpike_router::{encode_path, normalize_path, VarSource};
use turnpike_upstream::Outcome;

use crate::body::{BodySent, ProxyBody};
use crate::error::Failure;
use crate::headers::{
    new_request_id, set_forwarded, strip_hop_by_hop, usable_request_id, wants_upgrade,
};
use crate::health;
use crate::pool::{self, ConnectError, SendError, Target};
use crate::{Shared, X_REQUEST_ID};

/// Sent upstream with the authenticated consumer's name; never taken from
/// the client.
static X_CONSUMER_USERNAME: HeaderName = HeaderName::from_static("x-consumer-username");

/// Serves one request. Never fails: every problem becomes a JSON answer.
pub(crate) async fn handle(
    req: Request<Incoming>,
    conn: Arc<Conn>,
    shared: Arc<Shared>,
) -> Response<ProxyBody> {
    let snapshot = shared.snapshot.load_full();
    crate::metrics::gateway().requests.inc();
    let (mut parts, body) = req.into_parts();
    let request_id = match parts.headers.get(&X_REQUEST_ID) {
        Some(id) if usable_request_id(id) => id.clone(),
        _ => {
            let id = new_request_id();
            parts.headers.insert(X_REQUEST_ID.clone(), id.clone());
            id
        }
    };
    remove_consumer_claims(&mut parts.headers);
    if let Some(id) = parts.uri.path().strip_prefix(turnpike_queue::RESULT_PREFIX) {
        let id = id.to_owned();
        return crate::async_jobs::result(&snapshot, &id, parts, conn, request_id).await;
    }
    let mut ctx = Ctx::new(parts, conn, request_id);
    let route = match route(&snapshot, &mut ctx) {
        Ok(index) => &snapshot.routes[index],
        Err(failure) => return failure.respond(&ctx.request_id),
    };
    let timeout = shared.client_body_timeout;
    // A route that reads bodies without plugins (`retry_non_idempotent`)
    // takes the plugin path, which reads them.
    if route.chain.is_empty() && snapshot.global.is_empty() && !route.reads_body {
        return forward(route, &mut ctx, Some(body), timeout, false).await;
    }
    // Boxed so the plugin path's larger state does not grow every
    // request's future, plugins or not.
    Box::pin(crate::phases::serve(&snapshot, route, ctx, body, timeout)).await
}

/// Only authentication says who the consumer is: a client's
/// `X-Consumer-Username` goes, and so does `X_Consumer_Username`, which
/// CGI-style frameworks read as the same header.
pub(crate) fn remove_consumer_claims(headers: &mut HeaderMap) {
    headers.remove(&X_CONSUMER_USERNAME);
    let claims = |name: &HeaderName| {
        let n = name.as_str().as_bytes();
        n.contains(&b'_')
            && n.len() == X_CONSUMER_USERNAME.as_str().len()
            && n.iter()
                .zip(X_CONSUMER_USERNAME.as_str().bytes())
                .all(|(&a, b)| a == b || (a == b'_' && b == b'-'))
    };
    let spoofed: Vec<HeaderName> = headers.keys().filter(|n| claims(n)).cloned().collect();
    for name in spoofed {
        headers.remove(name);
    }
}

/// Finds the route, recording on the request the normalised path and the
/// route's ids; returns the route's index.
fn route(snapshot: &Snapshot, ctx: &mut Ctx) -> Result<usize, Failure> {
    let path = normalize_path(ctx.req.uri.path()).map_err(|_| Failure::BadRequest)?;
    if let Cow::Owned(decoded) = path {
        let encoded = encode_path(&decoded);
        let text = match ctx.req.uri.query() {
            Some(q) => format!("{encoded}?{q}"),
            None => encoded.into_owned(),
        };
        let pq = PathAndQuery::from_maybe_shared(text).map_err(|_| Failure::BadRequest)?;
        ctx.set_path(decoded.into_boxed_str(), pq);
    }
    let req = turnpike_router::Request {
        path: ctx.path(),
        host: ctx.host_str(),
        method: ctx.req.method.as_str(),
        remote: Some(ctx.conn.remote.ip()),
        vars: &*ctx,
    };
    let index = snapshot.router.find(&req).ok_or(Failure::NoRoute)?;
    let route = &snapshot.routes[index];
    ctx.route_id = Some(route.id.clone());
    ctx.service_id = route.service_id.clone();
    ctx.route_name = route.name.clone();
    ctx.service_name = route.service_name.clone();
    Ok(index)
}

/// The `chash` key; an empty key falls back to the client address, as APISIX does.
fn hash_key(on: &HashOn, ctx: &Ctx) -> Vec<u8> {
    let key: Option<Cow<'_, str>> = match on {
        HashOn::Vars(v) => ctx.var(v),
        HashOn::Header(name) => ctx.header(name).map(Cow::Borrowed),
        HashOn::Cookie(name) => ctx.cookie(name).map(Cow::Borrowed),
        HashOn::Consumer => ctx.consumer.as_ref().map(|c| Cow::Borrowed(&*c.username)),
        HashOn::Combination(parts) => {
            let mut out = String::new();
            for part in parts.iter() {
                match part {
                    KeyPart::Literal(s) => out.push_str(s),
                    KeyPart::Var(v) => out.push_str(&ctx.var(v).unwrap_or_default()),
                }
            }
            Some(Cow::Owned(out))
        }
    };
    match key.filter(|k| !k.is_empty()) {
        Some(k) => k.into_owned().into_bytes(),
        None => ctx.conn.remote_ip.as_bytes().to_vec(),
    }
}

/// At most this many attempts are remembered; beyond it retries stop.
const MAX_TRIED: usize = 16;

/// Sends the request upstream, trying other nodes while they cannot be
/// reached. The body is `ctx.body` when a plugin read it, else `incoming`.
/// With `for_plugins`, the request's headers (as sent) are back in `ctx`
/// afterwards, for the response phases, with the node and the upstream's
/// latency (`log` reads them).
pub(crate) async fn forward(
    route: &Route,
    ctx: &mut Ctx,
    incoming: Option<Incoming>,
    client_body_timeout: Duration,
    for_plugins: bool,
) -> Response<ProxyBody> {
    // A plugin (traffic-split, api-breaker) may have chosen another
    // upstream: its timeouts apply, with the route's own `timeout` over
    // them, as APISIX does.
    let chosen = ctx
        .upstream_override
        .take()
        .and_then(|u| u.downcast::<Upstream>().ok());
    let (upstream_arc, timeouts) = match &chosen {
        Some(u) => (u, route.own_timeouts.over(u.timeouts)),
        None => (&route.upstream, route.timeouts),
    };
    let upstream: &Upstream = upstream_arc;
    let upgrade =
        route.websocket && ctx.req.version == Version::HTTP_11 && wants_upgrade(&ctx.req.headers);
    let mut client_upgrade = if upgrade {
        ctx.req.extensions.remove::<OnUpgrade>()
    } else {
        None
    };
    // A body read whole can be sent again, when the upstream allows it.
    let replay = ctx.body.clone().filter(|_| upstream.retry_non_idempotent);
    let resend = || replay.clone().map(ProxyBody::full);
    let (body, sent) = request_body(ctx, incoming, client_body_timeout);
    let mut body = Some(body);
    let has_body = sent.is_some();
    upstream_headers(ctx, upstream, upgrade, has_body);
    // After hop-by-hop removal, so `Connection: x-consumer-username` from
    // the client cannot take it away again.
    if let Some(consumer) = &ctx.consumer {
        let name = X_CONSUMER_USERNAME.clone();
        ctx.req.headers.insert(name, consumer.header.clone());
    }
    let hash_key = upstream.hash_on.as_ref().map(|h| hash_key(h, ctx));
    let deadline = upstream.retry_timeout.map(|t| Instant::now() + t);
    let mut tried = [0usize; MAX_TRIED];
    let mut attempts = 0;
    let mut last = Failure::Unavailable;
    // An answer in `retry_on_statuses`, kept while another node is tried.
    let mut kept: Option<Response<ProxyBody>> = None;
    while attempts < upstream.max_attempts().min(MAX_TRIED)
        && deadline.is_none_or(|d| Instant::now() < d)
    {
        let Some(node) = upstream.pick(hash_key.as_deref(), &tried[..attempts]) else {
            break;
        };
        tried[attempts] = node;
        attempts += 1;
        let host = upstream_host(ctx, upstream, node);
        let target = target(upstream, &timeouts, node, host.as_ref());
        let req = build_request(ctx, upstream, node, host.clone(), body.take());
        let mut tracked = upstream
            .tracks_load()
            .then(|| LoadGuard::new(upstream_arc, node));
        let read = timeouts.read;
        let sent_at = Instant::now();
        if for_plugins {
            ctx.upstream_addr = Some(upstream.nodes[node].addr.clone());
        }
        // A request without a body and with an idempotent method may go
        // again to another node if its connection breaks after it was sent
        // (before any answer), as nginx's `proxy_next_upstream error`
        // allows: it needs its headers back for that.
        let replayable = (sent.is_none() || replay.is_some())
            && client_upgrade.is_none()
            && (ctx.req.method.is_idempotent() || upstream.retry_non_idempotent)
            && attempts < upstream.max_attempts().min(MAX_TRIED);
        // The response phases, and a replayed request, need the request's
        // headers back: our own client hands them back, the others need a
        // copy.
        let copy = ((for_plugins || replayable)
            && !goes_inline(&target, &client_upgrade, sent.as_ref()))
        .then(|| req.headers().clone());
        let result = exchange(
            &target,
            req,
            read,
            &mut client_upgrade,
            sent.as_ref(),
            &mut tracked,
        )
        .await;
        match result {
            Ok((resp, back)) => {
                let status = resp.status().as_u16();
                health::observed(upstream, node, Outcome::Status(status));
                let mut headers = back.or(copy);
                if replayable && upstream.retry_on_statuses.contains(&status) {
                    if let Some(headers) = headers.take() {
                        tracing::warn!(request_id = ?ctx.request_id, route = %route.id, node = %upstream.nodes[node].addr, "upstream answered {status}; trying another node");
                        ctx.req.headers = headers;
                        // Passed on if no other node can be tried.
                        kept = Some(resp);
                        body = resend();
                        continue;
                    }
                }
                if for_plugins {
                    ctx.req.headers = headers.unwrap_or_default();
                    ctx.upstream_latency = Some(sent_at.elapsed());
                    ctx.upstream_status = Some(resp.status());
                }
                return resp;
            }
            Err(Attempt::Connect(e, req)) => {
                // A node that cannot be reached must not look fast to ewma.
                if let Some(guard) = tracked {
                    guard.failed(timeouts.connect);
                }
                tracing::warn!(request_id = ?ctx.request_id, route = %route.id, node = %upstream.nodes[node].addr, "{e}");
                let timed_out = matches!(e, ConnectError::Timeout);
                let outcome = if timed_out {
                    Outcome::Timeout
                } else {
                    Outcome::TcpFailure
                };
                health::observed(upstream, node, outcome);
                last = if timed_out {
                    Failure::Timeout
                } else {
                    Failure::BadGateway
                };
                let (back, returned) = (*req).into_parts();
                ctx.req.headers = back.headers;
                body = Some(returned);
            }
            Err(Attempt::Broken(reason, req)) => {
                tracing::warn!(request_id = ?ctx.request_id, route = %route.id, node = %upstream.nodes[node].addr, "{reason}");
                health::observed(upstream, node, Outcome::TcpFailure);
                ctx.req.headers = (*req).into_parts().0.headers;
                if replayable {
                    last = Failure::BadGateway;
                    body = resend();
                    continue;
                }
                if for_plugins {
                    ctx.upstream_status = Some(Failure::BadGateway.status());
                }
                return Failure::BadGateway.respond(&ctx.request_id);
            }
            Err(Attempt::Failed(failure, reason)) => {
                tracing::warn!(request_id = ?ctx.request_id, route = %route.id, node = %upstream.nodes[node].addr, "{reason}");
                // Only the node's own failures count against it.
                match failure {
                    Failure::Timeout => health::observed(upstream, node, Outcome::Timeout),
                    Failure::BadGateway => health::observed(upstream, node, Outcome::TcpFailure),
                    _ => {}
                }
                if failure == Failure::BadGateway && replayable {
                    if let Some(headers) = copy {
                        ctx.req.headers = headers;
                        last = failure;
                        body = resend();
                        continue;
                    }
                }
                if for_plugins {
                    ctx.req.headers = copy.unwrap_or_default();
                    ctx.upstream_status = Some(failure.status());
                }
                return failure.respond(&ctx.request_id);
            }
        }
    }
    if let Some(resp) = kept {
        if for_plugins {
            ctx.upstream_status = Some(resp.status());
        }
        return resp;
    }
    if attempts == 0 {
        tracing::warn!(request_id = ?ctx.request_id, route = %route.id, "no node available in upstream {}", upstream.key);
    } else if for_plugins {
        // As nginx's `$upstream_status` for a node that never answered.
        ctx.upstream_status = Some(last.status());
    }
    last.respond(&ctx.request_id)
}

/// The body to send and, when there is one, what tells that it has gone:
/// a body a plugin read (framed anew with its length) or the client's,
/// streamed.
fn request_body(
    ctx: &mut Ctx,
    incoming: Option<Incoming>,
    client_body_timeout: Duration,
) -> (ProxyBody, Option<Arc<BodySent>>) {
    if let Some(bytes) = ctx.body.take() {
        let headers = &mut ctx.req.headers;
        headers.remove(TRANSFER_ENCODING);
        if bytes.is_empty() {
            // A POST of nothing still says so; some servers want a length.
            if headers.contains_key(CONTENT_LENGTH) {
                headers.insert(CONTENT_LENGTH, HeaderValue::from(0));
            }
            return (ProxyBody::Empty, None);
        }
        headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        return (ProxyBody::full(bytes), Some(BodySent::done()));
    }
    match incoming {
        Some(body) if !hyper::body::Body::is_end_stream(&body) => {
            let sent = Arc::new(BodySent::default());
            let body = crate::body::RequestBody::new(body, sent.clone(), client_body_timeout);
            (ProxyBody::Request(body), Some(sent))
        }
        Some(body) => (ProxyBody::Incoming(body), None),
        None => (ProxyBody::Empty, None),
    }
}

/// The `Host` the upstream gets, by `pass_host`.
fn upstream_host(ctx: &Ctx, upstream: &Upstream, node: usize) -> Option<HeaderValue> {
    if let Some(host) = &ctx.upstream_host {
        return Some(host.clone());
    }
    match &upstream.pass_host {
        PassHost::Pass => ctx.host.clone(),
        PassHost::Node => HeaderValue::from_str(&upstream.nodes[node].authority).ok(),
        PassHost::Rewrite(h) => HeaderValue::from_str(h).ok(),
    }
}

fn target<'a>(
    upstream: &'a Upstream,
    timeouts: &Timeouts,
    node: usize,
    host: Option<&'a HeaderValue>,
) -> Target<'a> {
    let server_name = host.and_then(|h| h.to_str().ok()).map(host_only);
    Target {
        node: &upstream.nodes[node],
        scheme: upstream.scheme,
        verify: upstream.tls_verify,
        server_name,
        keepalive: upstream.keepalive,
        connect_timeout: timeouts.connect,
        send_timeout: timeouts.send,
    }
}

/// Builds the upstream request, taking the client's headers (a failed
/// attempt hands them back).
fn build_request(
    ctx: &mut Ctx,
    upstream: &Upstream,
    node: usize,
    host: Option<HeaderValue>,
    body: Option<ProxyBody>,
) -> Request<ProxyBody> {
    let node = &upstream.nodes[node];
    let parts = &mut ctx.req;
    let mut req = Request::new(body.unwrap_or(ProxyBody::Empty));
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = std::mem::take(&mut parts.headers);
    if upstream.scheme.is_h2() {
        *req.version_mut() = Version::HTTP_2;
        let scheme = if upstream.scheme.is_tls() {
            UriScheme::HTTPS
        } else {
            UriScheme::HTTP
        };
        let authority = host
            .as_ref()
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .or_else(|| Authority::try_from(&*node.authority).ok());
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(scheme);
        uri.authority = authority;
        uri.path_and_query = Some(ctx.upstream_uri.clone());
        *req.uri_mut() = Uri::from_parts(uri).unwrap_or_default();
        req.headers_mut().remove(HOST);
    } else {
        *req.version_mut() = Version::HTTP_11;
        *req.uri_mut() = Uri::from(ctx.upstream_uri.clone());
        if let Some(host) = host {
            req.headers_mut().insert(HOST, host);
        }
    }
    req
}

/// One attempt on one node, by the client that fits the request: the
/// WebSocket path for upgrades, the own HTTP/1.1 client for body-less
/// requests to `http` nodes, hyper's clients for the rest.
async fn exchange(
    target: &Target<'_>,
    req: Request<ProxyBody>,
    read: Duration,
    client_upgrade: &mut Option<OnUpgrade>,
    sent: Option<&Arc<BodySent>>,
    tracked: &mut Option<LoadGuard>,
) -> Result<(Response<ProxyBody>, Option<HeaderMap>), Attempt> {
    if client_upgrade.is_some() {
        let (resp, pooled) =
            Box::pin(crate::upgrade::forward(target, req, client_upgrade, read)).await?;
        return Ok((respond(resp, pooled, read, tracked.take()), None));
    }
    if goes_inline(target, client_upgrade, sent) {
        let (resp, headers) = send_inline(target, req, read, tracked).await?;
        return Ok((resp, Some(headers)));
    }
    let (resp, mut pooled) = send(target, req, read, sent).await?;
    if let Some(p) = pooled.as_mut() {
        p.watch_body(sent.cloned());
    }
    Ok((respond(resp, pooled, read, tracked.take()), None))
}

/// Whether an attempt goes by Turnpike's own HTTP/1.1 client, which hands
/// the request's headers back when done.
fn goes_inline(
    target: &Target<'_>,
    client_upgrade: &Option<OnUpgrade>,
    sent: Option<&Arc<BodySent>>,
) -> bool {
    client_upgrade.is_none() && sent.is_none() && target.scheme == Scheme::Http
}

/// The client's headers made ready for the upstream: hop-by-hop headers out,
/// `X-Forwarded-*` in, and the framing and cookies the upstream's protocol
/// needs.
fn upstream_headers(ctx: &mut Ctx, upstream: &Upstream, upgrade: bool, has_body: bool) {
    let host = ctx.host.clone();
    let parts: &mut Parts = &mut ctx.req;
    let headers = &mut parts.headers;
    let wants_trailers = headers
        .get(TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(headers, upgrade);
    set_forwarded(headers, &ctx.conn, host);
    if upstream.scheme.is_h2() {
        // gRPC needs `te: trailers` end to end.
        if wants_trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
        return;
    }
    if has_body && !headers.contains_key(CONTENT_LENGTH) {
        // A streamed body goes up chunked, whatever the method: left to
        // itself hyper would drop a GET's or HEAD's body without a length.
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    if parts.version == Version::HTTP_2 {
        join_cookies(headers);
    }
}

/// HTTP/2 clients may split `cookie` into several fields; an HTTP/1.1
/// upstream expects one (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<u8> = headers
        .get_all(COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, value);
    }
}

/// How one attempt ended, when it did not produce a response.
pub(crate) enum Attempt {
    /// The node could not be reached; the request comes back for the next node.
    Connect(ConnectError, Box<Request<ProxyBody>>),
    /// The request went out and failed: not retried (its body is gone).
    Failed(Failure, String),
    /// The connection broke after a bodyless request went out, before any
    /// answer; the request comes back (our HTTP/1.1 client only borrows
    /// it), for an idempotent one to go to another node.
    Broken(String, Box<Request<ProxyBody>>),
}

async fn send(
    target: &Target<'_>,
    mut req: Request<ProxyBody>,
    read_timeout: Duration,
    body_sent: Option<&Arc<BodySent>>,
) -> Result<(Response<Incoming>, Option<pool::Pooled>), Attempt> {
    // A pooled connection may have been closed by the upstream while idle;
    // such a request never left and goes again on another connection.
    for _ in 0..4 {
        let sender = match pool::checkout(target).await {
            Ok(s) => s,
            Err(e) => return Err(Attempt::Connect(e, Box::new(req))),
        };
        let exchange = sender.send(req);
        tokio::pin!(exchange);
        // The read timeout runs once the whole request has been sent, as
        // nginx's proxy_read_timeout does.
        let outcome = async {
            if let Some(sent) = body_sent {
                tokio::select! {
                    biased;
                    r = &mut exchange => return Some(r),
                    _ = sent.wait() => {}
                }
            }
            tokio::time::timeout_at(crate::clock::deadline(read_timeout), &mut exchange)
                .await
                .ok()
        };
        match outcome.await {
            None => {
                return Err(Attempt::Failed(
                    Failure::Timeout,
                    "upstream read timed out".into(),
                ))
            }
            Some(Err(SendError::NotSent(r))) => req = *r,
            Some(other) => return finish(other),
        }
    }
    Err(Attempt::Failed(
        Failure::BadGateway,
        "upstream closed every pooled connection".into(),
    ))
}

fn finish(
    result: Result<(Response<Incoming>, Option<pool::Pooled>), SendError>,
) -> Result<(Response<Incoming>, Option<pool::Pooled>), Attempt> {
    match result {
        Ok(ok) => Ok(ok),
        Err(SendError::NotSent(_)) => Err(Attempt::Failed(
            Failure::BadGateway,
            "upstream connection closed".into(),
        )),
        Err(SendError::Failed(e)) => {
            let failure = if client_stalled(&e) {
                Failure::ClientTimeout
            } else if e.is_user() {
                // The client's body stream failed, not the node.
                Failure::ClientAborted
            } else if is_timeout(&e) {
                Failure::Timeout
            } else {
                Failure::BadGateway
            };
            Err(Attempt::Failed(
                failure,
                format!(
                    "upstream request failed: {}",
                    turnpike_plugin::outbound::describe(&e)
                ),
            ))
        }
    }
}

fn client_stalled(e: &hyper::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.is::<crate::body::ClientBodyTimeout>() {
            return true;
        }
        source = s.source();
    }
    false
}

fn is_timeout(e: &hyper::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = s.source();
    }
    e.is_timeout()
}

fn respond(
    resp: Response<Incoming>,
    pooled: Option<pool::Pooled>,
    read_timeout: Duration,
    tracked: Option<LoadGuard>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    response_head(&mut parts);
    let body = ProxyBody::upstream(body, pooled, read_timeout, tracked);
    Response::from_parts(parts, body)
}

/// What every upstream response head goes through on its way to the client.
fn response_head(parts: &mut http::response::Parts) {
    // With both, Transfer-Encoding framed the body and the length is wrong
    // (RFC 9112 §6.3): passing it on would truncate the client's copy.
    if parts.headers.contains_key(TRANSFER_ENCODING) {
        parts.headers.remove(CONTENT_LENGTH);
    }
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(&mut parts.headers, switching);
    // HTTP/2 clients get whatever version hyper speaks to them.
    parts.version = Version::HTTP_11;
}

/// A body-less request to a plain-HTTP node, on Turnpike's own client.
async fn send_inline(
    target: &Target<'_>,
    req: Request<ProxyBody>,
    read_timeout: Duration,
    tracked: &mut Option<LoadGuard>,
) -> Result<(Response<ProxyBody>, HeaderMap), Attempt> {
    match crate::h1::send(target, &req, read_timeout, tracked).await {
        Ok(mut resp) => {
            let (mut parts, body) = resp.into_parts();
            response_head(&mut parts);
            resp = Response::from_parts(parts, body);
            Ok((resp, req.into_parts().0.headers))
        }
        Err(crate::h1::Error::Connect(e)) => Err(Attempt::Connect(e, Box::new(req))),
        Err(e @ crate::h1::Error::Timeout(_)) => {
            Err(Attempt::Failed(Failure::Timeout, e.to_string()))
        }
        Err(e) => Err(Attempt::Broken(e.to_string(), Box::new(req))),
    }
}

/// Reports a request's end to `least_conn`/`ewma` when dropped (with the body).
pub(crate) struct LoadGuard {
    upstream: Arc<Upstream>,
    node: usize,
    started: Instant,
}

impl LoadGuard {
    fn new(upstream: &Arc<Upstream>, node: usize) -> LoadGuard {
        upstream.start(node);
        LoadGuard {
            upstream: upstream.clone(),
            node,
            started: Instant::now(),
        }
    }
}

impl LoadGuard {
    /// Ends the attempt as a failure, costing `penalty`.
    fn failed(mut self, penalty: Duration) {
        self.started = Instant::now().checked_sub(penalty).unwrap_or(self.started);
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.upstream.finish(self.node, self.started.elapsed());
    }
}
