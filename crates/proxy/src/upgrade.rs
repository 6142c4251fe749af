//! WebSocket (and any HTTP/1.1 `Upgrade`) pass-through, on routes with
//! `enable_websocket: true`, as APISIX requires.
//!
//! The upgrade request goes to the node on a fresh connection of its own;
//! if the node answers `101 Switching Protocols`, the client gets that answer
//! and both connections are then spliced byte for byte until either closes.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::body::ProxyBody;
use crate::error::Failure;
use crate::handler::Attempt;
use crate::pool::{self, Pooled, Target};

pub(crate) async fn forward(
    target: &Target<'_>,
    req: Request<ProxyBody>,
    client: &mut Option<OnUpgrade>,
    read_timeout: Duration,
) -> Result<(Response<Incoming>, Option<Pooled>), Attempt> {
    let mut tx = match pool::connect_h1(target, true).await {
        Ok(tx) => tx,
        Err(e) => return Err(Attempt::Connect(e, Box::new(req))),
    };
    let mut resp = match tokio::time::timeout(read_timeout, tx.send_request(req)).await {
        Err(_) => {
            return Err(Attempt::Failed(
                Failure::Timeout,
                "upstream read timed out".into(),
            ))
        }
        Ok(Err(e)) => {
            return Err(Attempt::Failed(
                Failure::BadGateway,
                format!("upgrade request failed: {e}"),
            ))
        }
        Ok(Ok(resp)) => resp,
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The node declined: its answer goes back as any other.
        return Ok((resp, None));
    }
    let Some(client) = client.take() else {
        return Err(Attempt::Failed(
            Failure::BadGateway,
            "client connection cannot be upgraded".into(),
        ));
    };
    let upstream = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => {
                splice(TokioIo::new(client), TokioIo::new(upstream), read_timeout).await
            }
            Err(e) => tracing::debug!("upgrade did not complete: {e}"),
        }
    });
    Ok((resp, None))
}

/// Copies bytes both ways until the node closes, or sends nothing for
/// `idle` (its read timeout, as nginx applies `proxy_read_timeout` to
/// WebSockets). When the client closes first, the node is told (FIN) and
/// its last bytes still reach the client.
async fn splice<C, U>(client: C, upstream: U, idle: Duration)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut node_rd, mut node_wr) = tokio::io::split(upstream);
    let up = async {
        let _ = tokio::io::copy(&mut client_rd, &mut node_wr).await;
        let _ = node_wr.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match tokio::time::timeout(idle, node_rd.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    if client_wr.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                Ok(_) => break,
                Err(_) => {
                    tracing::debug!("upgraded connection idle for {idle:?}: closed");
                    break;
                }
            }
        }
        let _ = client_wr.shutdown().await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        _ = &mut down => {}
        _ = &mut up => down.await,
    }
}
