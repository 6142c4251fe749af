//! The status listener: `/healthz` (the process is up), `/readyz` (a
//! config is loaded and the gateway is not draining) and `/metrics`
//! (Prometheus; also at APISIX's `/apisix/prometheus/metrics`),
//! `/gateway/health` and `/gateway/services`. It runs apart from the
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

use turnpike_plugin::{deps, metrics};

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
            // One scrape at a time: `upstream_status` is reset and filled
            // again, and a concurrent scrape must not render in between.
            static SCRAPE: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let text = {
                let _one = SCRAPE.lock().unwrap_or_else(|e| e.into_inner());
                crate::metrics::gateway().revision.set(revision as i64);
                upstream_status(shared);
                metrics::render()
            };
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            resp
        }
        "/gateway/health" => json(StatusCode::OK, health(shared).to_string()),
        "/gateway/services" => json(StatusCode::OK, services(shared).to_string()),
        "/healthz" => json(StatusCode::OK, "{\"status\":\"ok\"}".into()),
        "/readyz" => {
            // A Shared always holds a loaded snapshot (the process does not
            // start without one), so only a drain makes the gateway unready.
            let unready = shared
                .unready
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if shared.draining.load(Ordering::Acquire) {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "{\"status\":\"not ready\",\"reason\":\"draining\"}".into(),
                )
            } else if let Some(reason) = unready {
                let body = serde_json::json!({"status": "not ready", "reason": reason});
                json(StatusCode::SERVICE_UNAVAILABLE, body.to_string())
            } else {
                // A config store that is down is reported, but leaves the
                // node ready: it serves its last configuration, and taking
                // every node out of rotation when etcd fails is the outage
                // the cluster is built to avoid.
                let store = deps::all()
                    .iter()
                    .find(|d| d.kind() == "etcd")
                    .map(|d| format!(",\"store\":\"{}\"", d.reachability().as_str()))
                    .unwrap_or_default();
                json(
                    StatusCode::OK,
                    format!("{{\"status\":\"ready\",\"revision\":{revision}{store}}}"),
                )
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            "{\"error_msg\":\"404 Not Found\"}".into(),
        ),
    }
}

/// The gateway's state: the configuration served, the services plugins
/// depend on (as last found), each upstream's nodes. `status` is
/// `degraded` while a dependency is down.
fn health(shared: &Shared) -> serde_json::Value {
    let snapshot = shared.snapshot.load();
    let all = deps::all();
    let dependencies: Vec<_> = all
        .iter()
        .map(|d| {
            serde_json::json!({
                "kind": d.kind(),
                "address": d.address(),
                "state": d.reachability().as_str(),
            })
        })
        .collect();
    let down = all
        .iter()
        .any(|d| d.reachability() == deps::Reachability::Down);
    let mut upstreams: Vec<_> = snapshot
        .upstreams
        .values()
        .map(|u| {
            let nodes: Vec<_> = u
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let mut node = serde_json::json!({"address": &*n.addr, "weight": n.weight, "state": node_state(u, i)});
                    if let Some(why) = u.health.as_ref().and_then(|h| h.down_reason(i)) {
                        node["reason"] = why.into();
                    }
                    node
                })
                .collect();
            serde_json::json!({"key": &*u.key, "nodes": nodes})
        })
        .collect();
    upstreams.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
    serde_json::json!({
        "status": if down { "degraded" } else { "ok" },
        "revision": snapshot.revision,
        "draining": shared.draining.load(Ordering::Acquire),
        "dependencies": dependencies,
        "upstreams": upstreams,
    })
}

/// Every upstream in use with the routes that send to it and its node
/// counts.
fn services(shared: &Shared) -> serde_json::Value {
    let snapshot = shared.snapshot.load();
    let mut by_key: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for u in snapshot.upstreams.values() {
        by_key.entry(&u.key).or_default();
    }
    for r in &snapshot.routes {
        by_key.entry(&r.upstream.key).or_default().push(&r.id);
    }
    let services: Vec<_> = by_key
        .into_iter()
        .filter_map(|(key, routes)| {
            let u = snapshot.upstreams.get(key)?;
            let healthy = (0..u.nodes.len())
                .filter(|&i| node_state(u, i) != "unhealthy")
                .count();
            let mut entry = serde_json::json!({
                "upstream": key,
                "routes": routes,
                "nodes": u.nodes.len(),
                "healthy": healthy,
            });
            if let Some((kind, name)) = u.discovery() {
                entry["discovery_type"] = kind.into();
                entry["service_name"] = name.into();
            }
            Some(entry)
        })
        .collect();
    serde_json::json!({ "services": services })
}

/// `healthy` or `unhealthy` by the upstream's checks; `unchecked` without.
fn node_state(u: &turnpike_config::Upstream, i: usize) -> &'static str {
    match &u.health {
        None => "unchecked",
        Some(h) if h.is_healthy(i) => "healthy",
        Some(_) => "unhealthy",
    }
}

/// `apisix_upstream_status`, made anew from the snapshot at each scrape:
/// 1 for a healthy node, 0 for an unhealthy one, for upstreams with checks.
fn upstream_status(shared: &Shared) {
    let gauge = &crate::metrics::gateway().upstream_status;
    gauge.reset();
    for u in shared.snapshot.load().upstreams.values() {
        if u.health.is_none() {
            continue;
        }
        let name = format!("/apisix/{}", u.key);
        for (i, n) in u.nodes.iter().enumerate() {
            let up = i64::from(node_state(u, i) == "healthy");
            gauge
                .with_label_values(&[&name, &n.host, &n.port.to_string()])
                .set(up);
        }
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
