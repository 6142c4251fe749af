//! Health checks' I/O: reporting what proxied requests found (passive
//! checks) and probing nodes (active checks). The rules and state are
//! `turnpike_upstream::Health`'s.
//!
//! One active checker runs per upstream `Health` for the whole process: a
//! reload that keeps the upstream keeps its `Health` (and so its checker);
//! a changed upstream gets a new `Health` and checker, and the old checker
//! ends once no snapshot holds the old `Health`.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use turnpike_config::{Snapshot, Upstream};
use turnpike_upstream::health::Active;
use turnpike_upstream::{Health, Outcome, Source};

/// Counts what a proxied request found at node `i` of `upstream`.
pub(crate) fn observed(upstream: &Upstream, i: usize, outcome: Outcome) {
    if let Some(health) = &upstream.health {
        let changed = health.report(i, Source::Passive, outcome);
        log_change(upstream, health, i, changed);
    }
}

fn log_change(upstream: &Upstream, health: &Health, i: usize, changed: Option<bool>) {
    let node = &upstream.nodes[i].addr;
    match changed {
        Some(true) => tracing::info!(upstream = %upstream.key, %node, "node is healthy again"),
        Some(false) => {
            let why = health.down_reason(i).unwrap_or_default();
            tracing::warn!(upstream = %upstream.key, %node, "node is unhealthy: {why}");
        }
        None => {}
    }
}

/// Starts the active checkers of `snapshot`'s upstreams that have none yet.
pub fn start_health_checks(snapshot: &Snapshot, runtime: &tokio::runtime::Handle) {
    for upstream in snapshot.upstreams.values() {
        let Some(health) = &upstream.health else {
            continue;
        };
        if health.claim_checker() {
            runtime.spawn(check(Arc::downgrade(upstream)));
        }
    }
}

/// Probes the nodes of one upstream while some snapshot still has it.
async fn check(upstream: Weak<Upstream>) {
    let mut last: Vec<Option<Instant>> = Vec::new();
    loop {
        let Some(up) = upstream.upgrade() else {
            return;
        };
        let Some(health) = up.health.as_deref() else {
            return;
        };
        let Some(active) = health.checks.active.as_ref() else {
            return;
        };
        last.resize(up.nodes.len(), None);
        let due: Vec<usize> = (0..up.nodes.len())
            .filter(|&i| {
                let every = match health.is_healthy(i) {
                    true => active.healthy.interval,
                    false => active.unhealthy.interval,
                };
                every > 0 && last[i].is_none_or(|t| t.elapsed() >= Duration::from_secs(every))
            })
            .collect();
        for chunk in due.chunks(active.concurrency.max(1) as usize) {
            let probes = chunk.iter().map(|&i| probe(&up, i, active));
            let outcomes = futures_util::future::join_all(probes).await;
            for (&i, outcome) in chunk.iter().zip(outcomes) {
                last[i] = Some(Instant::now());
                let changed = health.report(i, Source::Active, outcome);
                log_change(&up, health, i, changed);
            }
        }
        drop(up);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One probe of node `i`: a TCP connection, or an HTTP/1.1 `GET` in the
/// clear or over TLS.
async fn probe(up: &Upstream, i: usize, active: &Active) -> Outcome {
    let node = &up.nodes[i];
    let port = active.port.unwrap_or(node.port);
    let timeout = Duration::from_secs_f64(active.timeout);
    let run = async {
        let tcp = match TcpStream::connect((&*node.host, port)).await {
            Ok(s) => s,
            Err(_) => return Outcome::TcpFailure,
        };
        if active.kind == "tcp" {
            return Outcome::Connected;
        }
        let host = active.host.as_deref().unwrap_or(&node.authority);
        let mut stream = if active.kind == "https" {
            // The name the certificate must carry: the probe's host, else the node's.
            let name = turnpike_plugin::host_only(host);
            match turnpike_plugin::tls::connect(tcp, name, active.https_verify_certificate, false)
                .await
            {
                Ok(tls) => tls,
                Err(_) => return Outcome::TcpFailure,
            }
        } else {
            turnpike_plugin::tls::MaybeTls::Plain(tcp)
        };
        let mut request = format!("GET {} HTTP/1.1\r\nHost: {host}\r\n", active.http_path);
        for h in &active.req_headers {
            request.push_str(h);
            request.push_str("\r\n");
        }
        request.push_str("User-Agent: turnpike-health-check\r\nConnection: close\r\n\r\n");
        if stream.write_all(request.as_bytes()).await.is_err() {
            return Outcome::TcpFailure;
        }
        status(&mut stream).await
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or(Outcome::Timeout)
}

/// Reads the status code of the answer's status line.
async fn status(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Outcome {
    let mut buf = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return Outcome::TcpFailure,
            Ok(n) => len += n,
        }
    }
    // "HTTP/1.1 200 ..."
    let code = std::str::from_utf8(&buf[9..12])
        .ok()
        .and_then(|c| c.parse().ok());
    match (buf.starts_with(b"HTTP/1."), code) {
        (true, Some(code)) => Outcome::Status(code),
        _ => Outcome::TcpFailure,
    }
}
