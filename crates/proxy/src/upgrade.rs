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
                let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!("upgraded connection ended: {e}");
                }
            }
            Err(e) => tracing::debug!("upgrade did not complete: {e}"),
        }
    });
    Ok((resp, None))
}
