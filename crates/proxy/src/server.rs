//! Listeners and workers.
//!
//! Each worker is a thread with its own single-threaded tokio runtime and
//! its own listening socket per address (`SO_REUSEPORT`, so the kernel spreads
//! connections), and its own upstream pools: nothing on the request path is
//! shared between cores but the snapshot pointer and balancer counters.
//! A connection speaks HTTP/1.1 or, when it opens with the HTTP/2 preface,
//! h2c (prior knowledge).

use std::convert::Infallible;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::handler::handle;
use crate::Shared;
use turnpike_plugin::Conn;

/// The running data plane.
pub struct Server {
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    addrs: Vec<SocketAddr>,
}

impl Server {
    /// Binds every address for every worker, then starts the workers.
    /// Binding happens here so a port in use is reported before anything runs.
    pub fn start(
        listen: &[String],
        workers: usize,
        grace: Duration,
        shared: Arc<Shared>,
    ) -> io::Result<Server> {
        let workers = if workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            workers
        };
        let mut addrs = Vec::new();
        let mut sockets: Vec<Vec<StdListener>> = (0..workers).map(|_| Vec::new()).collect();
        for text in listen {
            let addr: SocketAddr = text.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("gateway.listen: `{text}` is not ip:port"),
                )
            })?;
            // Port 0 picks a free port once; every worker then shares it.
            let first = bind(addr)?;
            let bound = first.local_addr()?;
            addrs.push(bound);
            sockets[0].push(first);
            for list in sockets.iter_mut().skip(1) {
                list.push(bind(bound)?);
            }
        }
        let (stop, stopped) = watch::channel(false);
        let mut handles = Vec::new();
        for (i, listeners) in sockets.into_iter().enumerate() {
            let shared = shared.clone();
            let stopped = stopped.clone();
            let handle = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a worker runtime can be built");
                    rt.block_on(worker(listeners, shared, stopped, grace));
                })?;
            handles.push(handle);
        }
        Ok(Server {
            stop,
            workers: handles,
            addrs,
        })
    }

    /// The bound addresses, in `listen` order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops accepting, lets in-flight requests finish within the grace
    /// period, and returns when every worker is done.
    pub fn shutdown(self) {
        let _ = self.stop.send(true);
        for w in self.workers {
            if w.join().is_err() {
                tracing::error!("a worker panicked during shutdown");
            }
        }
    }
}

fn bind(addr: SocketAddr) -> io::Result<StdListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

async fn worker(
    listeners: Vec<StdListener>,
    shared: Arc<Shared>,
    stopped: watch::Receiver<bool>,
    grace: Duration,
) {
    let ticker = tokio::spawn(crate::clock::tick());
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let mut accepting = Vec::new();
    for l in listeners {
        match TcpListener::from_std(l) {
            Ok(listener) => accepting.push(accept_loop(
                listener,
                &builder,
                &shared,
                &graceful,
                stopped.clone(),
            )),
            Err(e) => tracing::error!("cannot use listener: {e}"),
        }
    }
    futures_util::future::join_all(accepting).await;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over: closing the connections still open");
    }
    ticker.abort();
}

async fn accept_loop(
    listener: TcpListener,
    builder: &auto::Builder<TokioExecutor>,
    shared: &Arc<Shared>,
    graceful: &GracefulShutdown,
    mut stopped: watch::Receiver<bool>,
) {
    let local = listener.local_addr().ok();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause, don't spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok().or(local).unwrap_or(remote);
        let info = Arc::new(Conn::new(remote, local, "http"));
        let shared = shared.clone();
        let service = service_fn(move |req| {
            let info = info.clone();
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(req, info, shared).await) }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        let counted = crate::metrics::gateway().connection();
        tokio::spawn(async move {
            let _counted = counted;
            if let Err(e) = conn.await {
                tracing::debug!("connection from {remote} ended: {e}");
            }
        });
    }
}
