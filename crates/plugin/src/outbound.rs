//! The calls plugins make (http-logger, forward-auth, proxy-mirror) and
//! the asynchronous mode's webhooks: `http://` and `https://`, for
//! hyper-util's pooling client.
//!
//! ```ignore
//! let client = Client::builder(TokioExecutor::new()).build(outbound::connector(verify));
//! ```
//!
//! With `verify`, an `https://` peer's certificate must chain to the
//! Mozilla roots and name the URL's host; without, any certificate is
//! taken (the handshake's signatures are still checked), as APISIX's
//! `ssl_verify: false`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;

use crate::tls::{self, MaybeTls};

/// An error with its causes, as in `client error (Connect): invalid peer
/// certificate: UnknownIssuer` (hyper's own message stops at the first).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Opens plain or TLS connections, by the URL's scheme.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    verify: bool,
}

/// A connector for `http://` and `https://` URLs.
pub fn connector(verify: bool) -> Connector {
    let mut http = HttpConnector::new();
    // The scheme is this connector's business: https goes through it too.
    http.enforce_http(false);
    http.set_nodelay(true);
    Connector { http, verify }
}

/// A connection [`Connector`] opened.
pub struct Stream(TokioIo<MaybeTls>);

type Opening = Pin<Box<dyn Future<Output = Result<Stream, io::Error>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = io::Error;
    type Future = Opening;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        self.http.poll_ready(cx).map_err(io::Error::other)
    }

    fn call(&mut self, uri: Uri) -> Opening {
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().unwrap_or_default().to_owned();
        let (mut http, verify) = (self.http.clone(), self.verify);
        Box::pin(async move {
            let tcp = http.call(uri).await.map_err(io::Error::other)?.into_inner();
            let stream = if https {
                tls::connect(tcp, &host, verify, false).await?
            } else {
                MaybeTls::Plain(tcp)
            };
            Ok(Stream(TokioIo::new(stream)))
        })
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
