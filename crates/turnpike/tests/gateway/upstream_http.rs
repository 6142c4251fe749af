//! The gateway's own HTTP/1.1 client against a hand-written upstream that
//! answers in every framing RFC 9112 allows, and closes connections at
//! awkward moments.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// Serves scripted answers by path; returns its address and a count of
/// accepted connections.
async fn raw_upstream() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let line = head.lines().next().unwrap_or("");
                    let method = line.split(' ').next().unwrap_or("");
                    let path = line.split(' ').nth(1).unwrap_or("");
                    let (answer, close): (&[u8], bool) = match (method, path) {
                        (_, "/close-after") => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true),
                        ("HEAD", "/head") => (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", false),
                        (_, "/204") => (b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n", false),
                        (_, "/http10") => (b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil close", true),
                        (_, "/interim") => (b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal", false),
                        (_, "/chunked") => (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-trailer: t\r\n\r\n", false),
                        (_, "/garbage") => (b"NOT HTTP AT ALL\r\n\r\n", true),
                        (_, "/short") => (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this", true),
                        _ => (b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\ndefault", false),
                    };
                    if s.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

async fn gateway(addr: &str) -> Gateway {
    Gateway::proxying(addr).await
}

#[tokio::test]
async fn every_response_framing_arrives_whole() {
    let (addr, _) = raw_upstream().await;
    let gw = gateway(&addr).await;
    let c = client();
    let call = |method: &str, path: &str| {
        let req = http::Request::builder()
            .method(method)
            .uri(gw.url(path))
            .body(full(Bytes::new()))
            .unwrap();
        send(&c, req)
    };
    let r = call("GET", "/chunked").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "hello world"));
    let r = call("HEAD", "/head").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    assert_eq!(r.headers["content-length"], "100");
    let r = call("GET", "/204").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (204, ""));
    assert_eq!(r.headers["x-a"], "1");
    let r = call("GET", "/http10").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "until close"));
    let r = call("GET", "/interim").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "final"));
    // The connection stayed usable through all of it.
    for _ in 0..3 {
        assert_eq!(call("GET", "/").await.unwrap().body, "default");
    }
}

#[tokio::test]
async fn a_pooled_connection_closed_by_the_node_is_replaced_unseen() {
    let (addr, conns) = raw_upstream().await;
    let gw = gateway(&addr).await;
    let c = client();
    for _ in 0..5 {
        // The node answers, then closes the connection the gateway pooled.
        let req = http::Request::get(gw.url("/close-after"))
            .body(full(Bytes::new()))
            .unwrap();
        let r = send(&c, req).await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(conns.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn broken_upstream_answers_are_502() {
    let (addr, _) = raw_upstream().await;
    let gw = gateway(&addr).await;
    let r = get(&gw.url("/garbage")).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.json()["error_msg"], "502 Bad Gateway");
    // A body cut short after the head was sent: the client sees an aborted
    // response, never a complete-looking one.
    let short = get(&gw.url("/short")).await;
    assert!(
        short.is_err() || short.as_ref().unwrap().body.len() < 100,
        "{short:?}"
    );
    assert_eq!(
        get(&gw.url("/")).await.unwrap().body,
        "default",
        "the gateway lives on"
    );
}

/// A node that answers `/early` at once, without reading the request body,
/// then only drains that connection; other paths get 200.
async fn early_answering_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if buf.starts_with(b"POST /early") {
                    let _ = s
                        .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 4\r\n\r\nnope")
                        .await;
                    while let Ok(n) = s.read(&mut chunk).await {
                        if n == 0 {
                            return;
                        }
                    }
                } else {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_early_answer_does_not_lend_a_busy_connection() {
    let addr = early_answering_upstream().await;
    // One worker, so both requests meet the same pool.
    let (port, status) = (free_port(), free_port());
    let text = settings(port, status).replace("workers: 2", "workers: 1") + &one_route(&addr);
    let gw = Gateway::start_raw(&text, port, status).await;
    // A slow upload the node refuses before reading it.
    let slow = futures_util::stream::unfold(0, |i| async move {
        if i == 5 {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        Some((
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                Bytes::from_static(b"data"),
            )),
            i + 1,
        ))
    });
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(slow));
    let c = client();
    let r = send(
        &c,
        http::Request::post(gw.url("/early")).body(body).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    // The next request with a body must not wait for (or land on) the
    // connection still carrying the first one's body.
    let started = std::time::Instant::now();
    let r = send(
        &c,
        http::Request::post(gw.url("/ok")).body(full("x")).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    assert!(
        started.elapsed() < std::time::Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn get_with_a_streamed_body_reaches_the_node_and_times_out_normally() {
    let up = Upstream::start("u").await;
    let gw = Gateway::proxying(&up.node()).await;
    let chunks = futures_util::stream::iter((0..3).map(|_| {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
            Bytes::from_static(b"abc"),
        ))
    }));
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(chunks));
    let req = http::Request::get(gw.url("/upload"))
        .header("transfer-encoding", "chunked")
        .body(body)
        .unwrap();
    let r = send(&client(), req).await.unwrap();
    assert_eq!(r.json()["bytes"], 9, "a GET's body is forwarded, chunked");
}
