//! Connections to upstream nodes: connect (TCP, then TLS when the scheme says
//! so), HTTP/1.1 keep-alive pools and shared HTTP/2 connections.
//!
//! Pools are per worker thread (each worker runs its own single-threaded
//! runtime), so a checkout never contends with another core. They are keyed
//! by destination, not by upstream id, so a reload that does not move a node
//! keeps its warm connections. `keepalive_pool` of the upstream making the
//! request decides how many idle connections stay, for how long, and after
//! how many requests a connection retires.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use turnpike_config::{Keepalive, Node, Scheme};

use crate::body::{BodySent, ProxyBody};
use crate::idle::IdlePool;
use crate::timed::Timed;
use turnpike_plugin::tls;

/// Where a connection goes, and how.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    addr: Arc<str>,
    scheme: Scheme,
    server_name: Option<Arc<str>>,
    verify: bool,
}

struct Idle {
    tx: http1::SendRequest<ProxyBody>,
    served: u32,
}

thread_local! {
    static IDLE: RefCell<IdlePool<PoolKey, Idle>> = RefCell::new(IdlePool::default());
    static H2: RefCell<HashMap<PoolKey, http2::SendRequest<ProxyBody>>> = RefCell::new(HashMap::new());
}

/// What the request path needs to reach one node.
pub(crate) struct Target<'a> {
    pub node: &'a Node,
    pub scheme: Scheme,
    pub verify: bool,
    /// The TLS server name (the `Host` sent upstream), when TLS is used.
    pub server_name: Option<&'a str>,
    pub keepalive: Keepalive,
    pub connect_timeout: Duration,
    /// Applies to the whole life of a new connection (see `timed`).
    pub send_timeout: Duration,
}

impl Target<'_> {
    fn key(&self) -> PoolKey {
        PoolKey {
            addr: self.node.addr.clone(),
            scheme: self.scheme,
            server_name: self
                .server_name
                .filter(|_| self.scheme.is_tls())
                .map(Arc::from),
            verify: self.verify,
        }
    }
}

/// An HTTP/1.1 connection lent to one request; see [`Pooled::release`].
pub struct Pooled {
    key: PoolKey,
    tx: http1::SendRequest<ProxyBody>,
    served: u32,
    keepalive: Keepalive,
    /// The request's body, if it had one: the connection is reusable only
    /// once it has been written whole.
    body: Option<Arc<BodySent>>,
}

impl Pooled {
    /// Gives the connection back once its response has been read whole.
    /// Ties the connection to the request body being written on it.
    pub(crate) fn watch_body(&mut self, body: Option<Arc<BodySent>>) {
        self.body = body;
    }

    pub(crate) fn release(self) {
        let body_pending = self.body.as_ref().is_some_and(|b| !b.is_done());
        if self.served >= self.keepalive.requests || self.tx.is_closed() || body_pending {
            return;
        }
        let idle = Idle {
            tx: self.tx,
            served: self.served,
        };
        IDLE.with(|pool| pool.borrow_mut().put(self.key, idle, &self.keepalive));
    }
}

/// A connection ready for one request.
pub(crate) enum Sender {
    H1 {
        pooled: Pooled,
        reused: bool,
    },
    H2 {
        tx: http2::SendRequest<ProxyBody>,
        key: PoolKey,
    },
}

/// Why a node could not be reached.
#[derive(Debug)]
pub(crate) enum ConnectError {
    Timeout,
    Io(std::io::Error),
    Handshake(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout => f.write_str("connect timed out"),
            ConnectError::Io(e) => write!(f, "connect failed: {e}"),
            ConnectError::Handshake(e) => write!(f, "handshake failed: {e}"),
        }
    }
}

/// How sending on a connection failed.
pub(crate) enum SendError {
    /// A pooled connection turned out to be closed before the request went
    /// out; the request comes back untouched and may go on a fresh one.
    NotSent(Box<Request<ProxyBody>>),
    Failed(hyper::Error),
}

/// Closes this worker's expired idle connections.
pub(crate) fn sweep() {
    IDLE.with(|pool| pool.borrow_mut().sweep());
}

/// The longest wait for a pooled connection to become ready.
const READY_WAIT: Duration = Duration::from_millis(250);

/// A warm connection from the pool, or a new one.
pub(crate) async fn checkout(target: &Target<'_>) -> Result<Sender, ConnectError> {
    let key = target.key();
    // New connections are the cold path: their futures (TCP, TLS, handshake)
    // are boxed so the request path's own future stays small.
    if target.scheme.is_h2() {
        return Box::pin(h2_sender(key, target)).await;
    }
    while let Some(idle) = take_idle(&key, target.keepalive.idle_timeout) {
        let mut tx = idle.tx;
        // A returned connection is ready as soon as its task has seen the
        // end of the last exchange; waiting longer means it is wedged.
        match tokio::time::timeout(target.connect_timeout.min(READY_WAIT), tx.ready()).await {
            Ok(Ok(())) => {
                let pooled = Pooled {
                    key,
                    tx,
                    served: idle.served + 1,
                    keepalive: target.keepalive,
                    body: None,
                };
                return Ok(Sender::H1 {
                    pooled,
                    reused: true,
                });
            }
            _ => continue,
        }
    }
    let tx = Box::pin(connect_h1(target, false)).await?;
    let pooled = Pooled {
        key,
        tx,
        served: 1,
        keepalive: target.keepalive,
        body: None,
    };
    Ok(Sender::H1 {
        pooled,
        reused: false,
    })
}

fn take_idle(key: &PoolKey, idle_timeout: Duration) -> Option<Idle> {
    IDLE.with(|pool| {
        pool.borrow_mut()
            .take(key, idle_timeout, |c, _| !c.tx.is_closed())
    })
}

async fn h2_sender(key: PoolKey, target: &Target<'_>) -> Result<Sender, ConnectError> {
    let shared = H2.with(|h2| h2.borrow().get(&key).filter(|tx| !tx.is_closed()).cloned());
    if let Some(tx) = shared {
        return Ok(Sender::H2 { tx, key });
    }
    let io = connect_io(target).await?;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30));
    let (tx, conn) = builder
        .handshake(io)
        .await
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("upstream h2 connection ended: {e}");
        }
    });
    H2.with(|h2| h2.borrow_mut().insert(key.clone(), tx.clone()));
    Ok(Sender::H2 { tx, key })
}

/// A new HTTP/1.1 connection; `upgrades` for WebSocket pass-through (such a
/// connection is never pooled).
pub(crate) async fn connect_h1(
    target: &Target<'_>,
    upgrades: bool,
) -> Result<http1::SendRequest<ProxyBody>, ConnectError> {
    let io = connect_io(target).await?;
    let handshake = http1::Builder::new().handshake(io);
    let (tx, conn) = tokio::time::timeout(target.connect_timeout, handshake)
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    tokio::spawn(async move {
        let result = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(e) = result {
            tracing::debug!("upstream connection ended: {e}");
        }
    });
    Ok(tx)
}

type Io = TokioIo<Timed>;

async fn connect_io(target: &Target<'_>) -> Result<Io, ConnectError> {
    let connect = async {
        let addr = resolve(&target.node.host, target.node.port)
            .await
            .map_err(ConnectError::Io)?;
        let tcp = TcpStream::connect(addr).await.map_err(ConnectError::Io)?;
        // Latency over batching: requests and responses are small and paced.
        let _ = tcp.set_nodelay(true);
        if !target.scheme.is_tls() {
            return Ok(tls::MaybeTls::Plain(tcp));
        }
        let name = target.server_name.unwrap_or(&target.node.host);
        tls::connect(tcp, name, target.verify, target.scheme.is_h2())
            .await
            .map_err(|e| ConnectError::Handshake(e.to_string()))
    };
    let stream = tokio::time::timeout(target.connect_timeout, connect)
        .await
        .map_err(|_| ConnectError::Timeout)??;
    Ok(TokioIo::new(Timed::new(stream, target.send_timeout)))
}

pub(crate) async fn resolve(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host} has no address"),
            )
        })
}

impl Sender {
    /// Sends one request. For HTTP/1.1 the connection comes back with the
    /// response, to travel in its body until the body ends.
    pub(crate) async fn send(
        self,
        req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Option<Pooled>), SendError> {
        match self {
            Sender::H1 { mut pooled, reused } => match pooled.tx.try_send_request(req).await {
                Ok(resp) => Ok((resp, Some(pooled))),
                Err(mut e) => match e.take_message() {
                    Some(req) if reused => Err(SendError::NotSent(Box::new(req))),
                    _ => Err(SendError::Failed(e.into_error())),
                },
            },
            Sender::H2 { mut tx, key } => match tx.try_send_request(req).await {
                Ok(resp) => Ok((resp, None)),
                Err(mut e) => match e.take_message() {
                    // The shared connection is gone: the next checkout makes a new one.
                    Some(req) if H2.with(|h2| h2.borrow_mut().remove(&key)).is_some() => {
                        Err(SendError::NotSent(Box::new(req)))
                    }
                    _ => Err(SendError::Failed(e.into_error())),
                },
            },
        }
    }
}
