//! Streaming: WebSocket pass-through and large bodies with bounded memory.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::BodyExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

#[tokio::test]
async fn websocket_echo_through_the_gateway() {
    let up = Upstream::start("ws").await;
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: ws, uri: /ws, enable_websocket: true, upstream: {{nodes: {{\"{n}\": 1}}}}}}\n  - {{id: no-ws, uri: /ws-off, upstream: {{nodes: {{\"{n}\": 1}}}}}}\n",
        n = up.node()
    ))
    .await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gw.port))
        .await
        .expect("upgrade");
    assert_eq!(resp.status(), 101);
    for text in ["hello", "through", "turnpike"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        &ws.next().await.unwrap().unwrap().into_data()[..],
        &[0u8, 1, 2, 255]
    );
    ws.close(None).await.unwrap();

    // Without enable_websocket the Upgrade header is not passed: no switch.
    let refused =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws-off", gw.port)).await;
    assert!(refused.is_err());
}

const BIG: u64 = 1024 * 1024 * 1024;

#[tokio::test]
async fn large_bodies_stream_both_ways_with_bounded_memory() {
    let up = Upstream::start("big").await;
    let gw = Gateway::proxying(&up.node()).await;

    // Download: read as it arrives, counting bytes.
    let resp = client()
        .request(
            Request::get(gw.url(&format!("/big?bytes={BIG}")))
                .body(full(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        got += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(got, BIG);

    // Upload: generated as it is sent, counted by the upstream.
    const CHUNK: usize = 256 * 1024;
    let chunk = Bytes::from(vec![b'u'; CHUNK]);
    let chunks = futures_util::stream::iter((0..BIG / CHUNK as u64).map(move |_| {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(chunk.clone()))
    }));
    let body = BodyExt::boxed(http_body_util::StreamBody::new(chunks));
    let r = send(
        &client(),
        Request::post(gw.url("/upload")).body(body).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.json()["bytes"], BIG);

    // 2 GiB went through; the gateway never held more than a sliver.
    let peak = gw.peak_rss_kib();
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
}

#[tokio::test]
async fn an_idle_websocket_is_closed_after_the_read_timeout() {
    let up = Upstream::start("ws").await;
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: ws, uri: /ws, enable_websocket: true, timeout: {{read: 0.3}}, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        up.node()
    ))
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gw.port))
        .await
        .unwrap();
    ws.send(Message::text("still here")).await.unwrap();
    assert!(
        ws.next().await.unwrap().is_ok(),
        "an active socket is served"
    );
    // Nothing from the node for longer than the read timeout: closed.
    let next = tokio::time::timeout(std::time::Duration::from_secs(3), ws.next())
        .await
        .expect("closed within 3 s");
    assert!(!matches!(next, Some(Ok(Message::Text(_)))), "{next:?}");
}

#[tokio::test]
async fn a_stalled_upload_gets_408() {
    let up = Upstream::start("u").await;
    let (port, status) = (free_port(), free_port());
    let text = settings(port, status) + "  client_body_timeout: 0.3\n" + &one_route(&up.node());
    let gw = Gateway::start_raw(&text, port, status).await;
    let stalled = futures_util::stream::unfold(0, |i| async move {
        if i > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            return None;
        }
        Some((
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                Bytes::from_static(b"part"),
            )),
            1,
        ))
    });
    let body = BodyExt::boxed(http_body_util::StreamBody::new(stalled));
    let started = std::time::Instant::now();
    let r = send(
        &client(),
        Request::post(gw.url("/upload")).body(body).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 408, "{}", r.body);
    assert_eq!(r.json()["error_msg"], "408 Request Time-out");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}
