//! The status listener: `/healthz` (the process is up), `/readyz` (a
//! config is loaded and the gateway is not draining) and `/metrics`
//! (Prometheus; also at APISIX's `/apisix/prometheus/metrics`). It runs apart from the
//! workers, so a probe answers even when proxy traffic is heavy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use turnpike_plugin::metrics;

use crate::Shared;

/// Binds the status listener and serves it on the current runtime.
pub async fn serve_status(addr: &str, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("gateway.status.listen: cannot listen on {addr}: {e}"),
        )
    })?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause, don't spin.
                    tracing::warn!("status listener: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &shared)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn answer(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let revision = shared.snapshot.load().revision;
    match req.uri().path() {
        "/metrics" | "/apisix/prometheus/metrics" => {
            crate::metrics::gateway().revision.set(revision as i64);
            let mut resp = Response::new(Full::new(Bytes::from(metrics::render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            resp
        }
        "/healthz" => json(StatusCode::OK, "{\"status\":\"ok\"}".into()),
        "/readyz" => {
            // A Shared always holds a loaded snapshot (the process does not
            // start without one), so only a drain makes the gateway unready.
            if shared.draining.load(Ordering::Acquire) {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "{\"status\":\"not ready\",\"reason\":\"draining\"}".into(),
                )
            } else {
                json(
                    StatusCode::OK,
                    format!("{{\"status\":\"ready\",\"revision\":{revision}}}"),
                )
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            "{\"error_msg\":\"404 Not Found\"}".into(),
        ),
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
