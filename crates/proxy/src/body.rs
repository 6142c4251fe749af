//! The one body type of the request path, so no body is boxed.
//!
//! An upstream response body carries its connection back to the pool when
//! it ends, and enforces the read timeout between two reads, as nginx's
//! `proxy_read_timeout` does.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;

use turnpike_plugin::{run_log, Chain, Ctx};

use crate::clock::IdleTimer;
use crate::h1::InlineBody;
use crate::handler::LoadGuard;
use crate::pool::Pooled;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub enum ProxyBody {
    Empty,
    Full(Option<Bytes>),
    /// A client's request body on its way upstream.
    Incoming(Incoming),
    /// The same, announcing when it has been sent whole.
    Request(RequestBody),
    /// An upstream's response body on its way to the client.
    Upstream(UpstreamBody),
    /// The same, read by Turnpike's own HTTP/1.1 client (see `h1`).
    Inline(InlineBody),
    /// A response on a route with plugins: runs their `log` phase once the
    /// body has been sent or abandoned.
    Logged(Box<Logged>),
    /// Chunks the gateway pushes as they come (Server-Sent Events); the
    /// body ends when the sender is dropped.
    Pushed(tokio::sync::mpsc::Receiver<Bytes>),
}

/// A request on a route with plugins, from the first phase to the last
/// byte of its response: when dropped, it runs the plugins' `log` phase,
/// once. It holds the request while the phases run; then it becomes the
/// response body, which hyper drops once the last byte is written. If the
/// client goes away first, at any point, it is dropped then.
pub struct Logged {
    pub(crate) ctx: Ctx,
    body: ProxyBody,
    global: Chain,
    route: Chain,
    /// The body reached its end.
    finished: bool,
    /// A response that has no body (to HEAD, or 1xx/204/304) counts as whole.
    bodyless: bool,
}

impl Logged {
    pub(crate) fn start(ctx: Ctx, global: Chain, route: Chain) -> Box<Logged> {
        Box::new(Logged {
            ctx,
            body: ProxyBody::Empty,
            global,
            route,
            finished: false,
            bodyless: false,
        })
    }

    /// Becomes the body of the response, `body`.
    pub(crate) fn into_body(mut self: Box<Self>, body: ProxyBody, bodyless: bool) -> ProxyBody {
        self.body = body;
        self.bodyless = bodyless;
        ProxyBody::Logged(self)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.ctx.response_complete = self.finished || self.bodyless;
        run_log(&self.global, &self.route, &mut self.ctx);
    }
}

/// Request trailers must not say who the consumer is either: only
/// authentication does (see `handler::remove_consumer_claims`).
fn without_claims(frame: Frame<Bytes>) -> Frame<Bytes> {
    match frame.into_trailers() {
        Ok(mut trailers) => {
            crate::handler::remove_consumer_claims(&mut trailers);
            Frame::trailers(trailers)
        }
        Err(frame) => frame,
    }
}

/// Whether a request body has been handed over whole: the upstream's read
/// timeout starts then, and only then may its connection go back to a pool
/// (hyper keeps writing a body after an early response).
#[derive(Default)]
pub(crate) struct BodySent {
    notify: Notify,
    done: AtomicBool,
}

impl BodySent {
    /// For a body already in memory: nothing is left to wait for.
    pub(crate) fn done() -> Arc<BodySent> {
        let sent = Arc::new(BodySent::default());
        sent.mark();
        sent
    }

    fn mark(&self) {
        self.done.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Resolves once the body has been sent (or dropped).
    pub(crate) async fn wait(&self) {
        if !self.is_done() {
            self.notify.notified().await;
        }
    }
}

/// The client stopped sending its request body.
#[derive(Debug)]
pub struct ClientBodyTimeout;

impl std::fmt::Display for ClientBodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("client body timed out")
    }
}

impl std::error::Error for ClientBodyTimeout {}

/// A request body that reports when it has been sent whole.
pub struct RequestBody {
    body: Incoming,
    sent: Option<Arc<BodySent>>,
    idle: IdleTimer,
}

impl RequestBody {
    /// `idle`: how long the client may pause (`gateway.client_body_timeout`):
    /// a stalled upload must not hold an upstream connection for ever.
    pub(crate) fn new(body: Incoming, sent: Arc<BodySent>, idle: Duration) -> Self {
        RequestBody {
            body,
            sent: Some(sent),
            idle: IdleTimer::new(idle),
        }
    }

    fn done(&mut self) {
        if let Some(sent) = self.sent.take() {
            sent.mark();
        }
    }
}

/// A body dropped unread (hyper drops a GET's body it will not send, or the
/// exchange failed) counts as sent: nothing more will be written.
impl Drop for RequestBody {
    fn drop(&mut self) {
        self.done();
    }
}

pub struct UpstreamBody {
    body: Incoming,
    /// Tells `least_conn` and `ewma` when the response is over.
    _load: Option<LoadGuard>,
    /// Given back to the pool once the body has been read to its end.
    conn: Option<Pooled>,
    read_timeout: IdleTimer,
}

/// The upstream stopped sending for longer than the read timeout.
#[derive(Debug)]
pub struct ReadTimeout;

impl std::fmt::Display for ReadTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream read timed out")
    }
}

impl std::error::Error for ReadTimeout {}

impl ProxyBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(data.into()))
    }

    pub(crate) fn upstream(
        body: Incoming,
        conn: Option<Pooled>,
        read_timeout: Duration,
        load: Option<LoadGuard>,
    ) -> Self {
        let mut up = UpstreamBody {
            body,
            _load: load,
            conn,
            read_timeout: IdleTimer::new(read_timeout),
        };
        if up.body.is_end_stream() {
            up.release();
        }
        ProxyBody::Upstream(up)
    }
}

impl UpstreamBody {
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.release();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Incoming(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Request(req) => {
                let polled = Pin::new(&mut req.body).poll_frame(cx);
                if polled.is_pending() {
                    return match req.idle.poll_expired(cx) {
                        Poll::Ready(()) => {
                            req.done();
                            Poll::Ready(Some(Err(ClientBodyTimeout.into())))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
                req.idle.progress();
                if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_))))
                    || req.body.is_end_stream()
                {
                    req.done();
                }
                polled.map(|f| f.map(|r| r.map(without_claims).map_err(Into::into)))
            }
            ProxyBody::Inline(body) => body.poll_data(cx).map(|d| d.map(|d| d.map(Frame::data))),
            ProxyBody::Pushed(rx) => rx.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d)))),
            ProxyBody::Logged(logged) => {
                let polled = Pin::new(&mut logged.body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                        logged.ctx.response_bytes += n;
                        logged.finished |= logged.body.is_end_stream();
                    }
                    Poll::Ready(None) => logged.finished = true,
                    _ => {}
                }
                polled
            }
            ProxyBody::Upstream(up) => match Pin::new(&mut up.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    up.read_timeout.progress();
                    if up.body.is_end_stream() {
                        up.release();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(None) => {
                    up.release();
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    up.conn = None;
                    Poll::Ready(Some(Err(e.into())))
                }
                Poll::Pending => match up.read_timeout.poll_expired(cx) {
                    Poll::Ready(()) => {
                        up.conn = None;
                        Poll::Ready(Some(Err(ReadTimeout.into())))
                    }
                    Poll::Pending => Poll::Pending,
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(data) => data.is_none(),
            ProxyBody::Incoming(body) => body.is_end_stream(),
            ProxyBody::Request(req) => req.body.is_end_stream(),
            ProxyBody::Upstream(up) => up.body.is_end_stream(),
            ProxyBody::Inline(body) => body.is_end_stream(),
            ProxyBody::Logged(logged) => logged.body.is_end_stream(),
            ProxyBody::Pushed(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Incoming(body) => body.size_hint(),
            ProxyBody::Request(req) => req.body.size_hint(),
            ProxyBody::Upstream(up) => up.body.size_hint(),
            ProxyBody::Inline(body) => body.size_hint(),
            ProxyBody::Logged(logged) => logged.body.size_hint(),
            ProxyBody::Pushed(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_lose_consumer_claims_and_data_passes() {
        let mut t = http::HeaderMap::new();
        t.insert(
            "x-consumer-username",
            http::HeaderValue::from_static("admin"),
        );
        t.insert(
            "x-consumer_username",
            http::HeaderValue::from_static("admin"),
        );
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        let out = without_claims(Frame::trailers(t)).into_trailers().unwrap();
        assert!(!out.contains_key("x-consumer-username"));
        assert!(!out.contains_key("x-consumer_username"));
        assert_eq!(out["grpc-status"], "0");
        let data = without_claims(Frame::data(Bytes::from_static(b"x")));
        assert_eq!(data.into_data().unwrap(), "x");
    }
}
