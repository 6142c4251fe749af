//! A minimal HTTP/1.1 client for the hot path: requests without a body to
//! plain-HTTP nodes (most API traffic).
//!
//! hyper's client runs each upstream connection as a task of its own and
//! talks to it through channels: a request crosses three tasks and two
//! channels before its response body reaches the client. Here the request
//! task writes the request head itself, parses the response head (httparse,
//! as hyper does), and the response body is read straight from the socket by
//! whoever polls it, which is the client connection's task. No extra task,
//! no channel, header values sliced from the read buffer without copying.
//!
//! Requests with a body, TLS, HTTP/2 and upgrades keep using hyper, which
//! reads an early response while it is still sending.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING,
};
use http::{Method, Request, Response, StatusCode, Version};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use turnpike_config::Keepalive;

use crate::body::{ProxyBody, ReadTimeout};
use crate::clock::{self, IdleTimer};
use crate::handler::LoadGuard;
use crate::idle::IdlePool;
use crate::pool::{ConnectError, Target};

/// Longest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
const READ_CHUNK: usize = 16 * 1024;

/// A plain TCP connection to a node, with what has been read and not used.
pub(crate) struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    key: Box<str>,
    served: u32,
    keepalive: Keepalive,
}

thread_local! {
    static IDLE: RefCell<IdlePool<Box<str>, Conn>> = RefCell::new(IdlePool::default());
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum Error {
    Connect(ConnectError),
    /// A reused connection was closed by the node before any response byte.
    Stale,
    Timeout(&'static str),
    Protocol(String),
    Io(io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Connect(e) => e.fmt(f),
            Error::Stale => f.write_str("pooled connection closed by the upstream"),
            Error::Timeout(what) => write!(f, "upstream {what} timed out"),
            Error::Protocol(e) => write!(f, "upstream sent an invalid response: {e}"),
            Error::Io(e) => write!(f, "upstream connection failed: {e}"),
        }
    }
}

/// Sends a body-less request and reads the response head. The body follows
/// in the returned response, read from the socket as the client takes it.
pub(crate) async fn send(
    target: &Target<'_>,
    req: &Request<ProxyBody>,
    read_timeout: Duration,
    load: &mut Option<LoadGuard>,
) -> Result<Response<ProxyBody>, Error> {
    let head = encode_head(req, &target.node.authority);
    let no_body = req.method() == Method::HEAD;
    // A reused connection may have been closed by the node just now; an
    // idempotent request that got no answer at all goes again on a new one.
    let resend = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE | Method::TRACE
    );
    for _ in 0..4 {
        let (mut conn, reused) = checkout(target).await.map_err(Error::Connect)?;
        match conn
            .exchange(&head, no_body, read_timeout, target.send_timeout)
            .await
        {
            Ok((parts, framing)) => {
                let body = InlineBody::new(conn, framing, read_timeout, load.take());
                return Ok(Response::from_parts(parts, ProxyBody::Inline(body)));
            }
            Err(Error::Stale) if reused && resend => {
                // The node has likely closed its other idle connections too.
                IDLE.with(|pool| pool.borrow_mut().clear(&*target.node.addr));
                continue;
            }
            Err(Error::Stale) => return Err(Error::Io(io::ErrorKind::ConnectionReset.into())),
            Err(e) => return Err(e),
        }
    }
    Err(Error::Protocol("every pooled connection was closed".into()))
}

/// The request line and headers, ready to write.
fn encode_head(req: &Request<ProxyBody>, authority: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(512);
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(
        req.uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !req.headers().contains_key(HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in req.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Closes this worker's expired idle connections.
pub(crate) fn sweep() {
    IDLE.with(|pool| pool.borrow_mut().sweep());
}

async fn checkout(target: &Target<'_>) -> Result<(Conn, bool), ConnectError> {
    let key = &*target.node.addr;
    // Every reuse is probed: bytes that arrived after the last response
    // (a stray body, an unsolicited 408) must never be read as the next one.
    let usable = |conn: &Conn, _: Duration| conn.is_open();
    let warm = IDLE.with(|pool| {
        pool.borrow_mut()
            .take(key, target.keepalive.idle_timeout, usable)
    });
    if let Some(mut conn) = warm {
        conn.keepalive = target.keepalive;
        return Ok((conn, true));
    }
    let stream = Box::pin(connect(target)).await?;
    let conn = Conn {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
        key: key.into(),
        served: 0,
        keepalive: target.keepalive,
    };
    Ok((conn, false))
}

async fn connect(target: &Target<'_>) -> Result<TcpStream, ConnectError> {
    let node = target.node;
    let connect = async {
        let addr = crate::pool::resolve(&node.host, node.port)
            .await
            .map_err(ConnectError::Io)?;
        let stream = TcpStream::connect(addr).await.map_err(ConnectError::Io)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    };
    tokio::time::timeout(target.connect_timeout, connect)
        .await
        .map_err(|_| ConnectError::Timeout)?
}

impl Conn {
    /// An idle connection is usable if the node has neither closed it nor
    /// sent anything unasked.
    fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    async fn exchange(
        &mut self,
        head: &[u8],
        no_body: bool,
        read_timeout: Duration,
        send_timeout: Duration,
    ) -> Result<(http::response::Parts, Framing), Error> {
        self.served += 1;
        tokio::time::timeout_at(clock::deadline(send_timeout), self.stream.write_all(head))
            .await
            .map_err(|_| Error::Timeout("send"))?
            .map_err(stale_or_io)?;
        tokio::time::timeout_at(clock::deadline(read_timeout), self.read_head(no_body))
            .await
            .map_err(|_| Error::Timeout("read"))?
    }

    async fn read_head(
        &mut self,
        no_body: bool,
    ) -> Result<(http::response::Parts, Framing), Error> {
        // Any byte of an answer (a 1xx included) means the request was seen:
        // a close after it is a failure, not a stale connection.
        let mut answered = false;
        // Bytes already searched for the blank line that ends a head, so a
        // node sending a byte at a time costs linear, not quadratic, work.
        let mut scanned: usize = 0;
        loop {
            if ends_head(&self.buf[scanned.saturating_sub(3)..]) {
                if let Some(parsed) = self.parse_head(no_body, &mut answered)? {
                    return Ok(parsed);
                }
            }
            scanned = self.buf.len();
            if self.buf.len() >= MAX_HEAD {
                return Err(Error::Protocol("response head too large".into()));
            }
            self.buf.reserve(READ_CHUNK);
            let fresh = self.buf.is_empty() && !answered;
            match tokio_util::io::read_buf(&mut self.stream, &mut self.buf).await {
                Ok(0) if fresh => return Err(Error::Stale),
                Ok(0) => {
                    return Err(Error::Protocol(
                        "connection closed inside the response head".into(),
                    ))
                }
                Ok(_) => answered = true,
                Err(e) if fresh => return Err(stale_or_io(e)),
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }

    /// Parses a complete head from the buffer, skipping interim (1xx)
    /// responses; `None` when more bytes are needed.
    fn parse_head(
        &mut self,
        no_body: bool,
        answered: &mut bool,
    ) -> Result<Option<(http::response::Parts, Framing)>, Error> {
        loop {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut slots);
            let len = match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(Error::Protocol(e.to_string())),
            };
            let code = resp.code.unwrap_or(0);
            let status = StatusCode::from_u16(code)
                .map_err(|_| Error::Protocol(format!("status {code}")))?;
            *answered = true;
            if status.is_informational() {
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Error::Protocol("unexpected 101 Switching Protocols".into()));
                }
                self.buf.advance(len);
                continue;
            }
            let version = if resp.version == Some(0) {
                Version::HTTP_10
            } else {
                Version::HTTP_11
            };
            let base = self.buf.as_ptr() as usize;
            let spans: Vec<(HeaderName, usize, usize)> = resp
                .headers
                .iter()
                .map(|h| {
                    let name = HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|e| Error::Protocol(e.to_string()))?;
                    let start = h.value.as_ptr() as usize - base;
                    Ok((name, start, start + h.value.len()))
                })
                .collect::<Result<_, Error>>()?;
            let head = self.buf.split_to(len).freeze();
            let mut headers = HeaderMap::with_capacity(spans.len());
            for (name, start, end) in spans {
                let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                headers.append(name, value);
            }
            let framing = framing(status, &headers, version, no_body)?;
            if let Kind::Length(n) = framing.kind {
                // `5, 5` or repeated lines: the client gets one plain value.
                let plain = headers.get_all(CONTENT_LENGTH).iter().count() == 1
                    && !headers[CONTENT_LENGTH].as_bytes().contains(&b',');
                if !plain {
                    headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
                }
            }
            let mut parts = Response::new(()).into_parts().0;
            parts.status = status;
            parts.version = version;
            parts.headers = headers;
            return Ok(Some((parts, framing)));
        }
    }

    fn release(self) {
        if self.served >= self.keepalive.requests || !self.buf.is_empty() {
            return;
        }
        let (key, keepalive) = (self.key.clone(), self.keepalive);
        IDLE.with(|pool| pool.borrow_mut().put(key, self, &keepalive));
    }
}

/// Whether the bytes hold a blank line (LF, an optional CR, LF: httparse
/// accepts bare LFs too). Stops at the first one, so a buffer that already
/// holds the body is not scanned to its end.
fn ends_head(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, &b)| {
        b == b'\n'
            && (bytes.get(i + 1) == Some(&b'\n') || bytes.get(i + 1..i + 3) == Some(&b"\r\n"[..]))
    })
}

fn stale_or_io(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => Error::Stale,
        _ => Error::Io(e),
    }
}

/// How the response body is delimited (RFC 9112 §6.3), and whether the
/// connection may be reused after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Framing {
    kind: Kind,
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

fn framing(
    status: StatusCode,
    headers: &HeaderMap,
    version: Version,
    no_body: bool,
) -> Result<Framing, Error> {
    let tokens = |name| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .map(|t| t.trim().to_ascii_lowercase())
    };
    let close = tokens(CONNECTION).any(|t| t == "close");
    let keep_alive = if version == Version::HTTP_10 {
        tokens(CONNECTION).any(|t| t == "keep-alive")
    } else {
        !close
    };
    if no_body || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing {
            kind: Kind::Done,
            keep_alive,
        });
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        // Chunked framing is trusted only from HTTP/1.1, and a message that
        // also claims a length ends its connection (RFC 9112 §6.1, §6.3).
        let chunked = version == Version::HTTP_11
            && tokens(TRANSFER_ENCODING)
                .next_back()
                .is_some_and(|t| t == "chunked");
        let keep_alive = keep_alive && !headers.contains_key(CONTENT_LENGTH);
        let kind = if chunked {
            Kind::Chunked(Chunk::Size)
        } else {
            Kind::UntilClose
        };
        return Ok(Framing {
            kind,
            keep_alive: keep_alive && chunked,
        });
    }
    let mut length: Option<u64> = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.to_str().unwrap_or("x").split(',') {
            let n = digits(part.trim(), 10)
                .ok_or_else(|| Error::Protocol("invalid content-length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Protocol("conflicting content-length".into()));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing {
            kind: Kind::Done,
            keep_alive,
        },
        Some(n) => Framing {
            kind: Kind::Length(n),
            keep_alive,
        },
        None => Framing {
            kind: Kind::UntilClose,
            keep_alive: false,
        },
    })
}

/// A response body read from the node's socket as the client takes it.
pub struct InlineBody {
    conn: Option<Conn>,
    kind: Kind,
    keep_alive: bool,
    read_timeout: IdleTimer,
    _load: Option<LoadGuard>,
}

impl InlineBody {
    fn new(
        conn: Conn,
        framing: Framing,
        read_timeout: Duration,
        load: Option<LoadGuard>,
    ) -> InlineBody {
        let mut body = InlineBody {
            conn: Some(conn),
            kind: framing.kind,
            keep_alive: framing.keep_alive,
            read_timeout: IdleTimer::new(read_timeout),
            _load: load,
        };
        if body.kind == Kind::Done {
            body.finish();
        }
        body
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.kind == Kind::Done
    }

    pub(crate) fn size_hint(&self) -> http_body::SizeHint {
        match self.kind {
            Kind::Length(n) => http_body::SizeHint::with_exact(n),
            Kind::Done => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }

    /// The body ended: the connection goes back to the pool if it may.
    fn finish(&mut self) {
        self.kind = Kind::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive {
                conn.release();
            }
        }
    }

    pub(crate) fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, crate::body::BoxError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match decode(&mut self.kind, &mut conn.buf) {
                Ok(Some(data)) => {
                    if self.kind == Kind::Done {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Ok(None) if self.kind == Kind::Done => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            conn.buf.reserve(READ_CHUNK);
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf);
            match read {
                Poll::Ready(Ok(0)) if self.kind == Kind::UntilClose => {
                    self.kind = Kind::Done;
                    self.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(
                        "upstream closed the connection inside the body".into(),
                    )));
                }
                Poll::Ready(Ok(_)) => self.read_timeout.progress(),
                Poll::Ready(Err(e)) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Pending => {
                    ready!(self.read_timeout.poll_expired(cx));
                    self.conn = None;
                    return Poll::Ready(Some(Err(ReadTimeout.into())));
                }
            }
        }
    }
}

/// Takes the next piece of body from `buf`, advancing the framing state.
/// `Ok(None)` means more bytes are needed (or the body is done).
fn decode(kind: &mut Kind, buf: &mut BytesMut) -> Result<Option<Bytes>, &'static str> {
    loop {
        match *kind {
            Kind::Done => return Ok(None),
            Kind::UntilClose => return Ok((!buf.is_empty()).then(|| buf.split().freeze())),
            Kind::Length(left) => {
                let Some((data, left)) = take(buf, left) else {
                    return Ok(None);
                };
                *kind = if left == 0 {
                    Kind::Done
                } else {
                    Kind::Length(left)
                };
                return Ok(Some(data));
            }
            Kind::Chunked(Chunk::Size) => {
                let Some(end) = find_crlf(buf) else {
                    return if buf.len() > 1024 {
                        Err("chunk size line too long")
                    } else {
                        Ok(None)
                    };
                };
                let line = std::str::from_utf8(&buf[..end]).map_err(|_| "invalid chunk size")?;
                let hex = line
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim_end_matches([' ', '\t']);
                let size = digits(hex, 16).ok_or("invalid chunk size")?;
                buf.advance(end + 2);
                *kind = Kind::Chunked(if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                });
            }
            Kind::Chunked(Chunk::Data(left)) => {
                let Some((data, left)) = take(buf, left) else {
                    return Ok(None);
                };
                *kind = Kind::Chunked(if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                });
                return Ok(Some(data));
            }
            Kind::Chunked(Chunk::DataEnd) => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("missing CRLF after chunk data");
                }
                buf.advance(2);
                *kind = Kind::Chunked(Chunk::Size);
            }
            Kind::Chunked(Chunk::Trailers) => {
                let Some(end) = find_crlf(buf) else {
                    return if buf.len() > MAX_HEAD {
                        Err("trailers too long")
                    } else {
                        Ok(None)
                    };
                };
                buf.advance(end + 2);
                if end == 0 {
                    *kind = Kind::Done;
                    return Ok(None);
                }
            }
        }
    }
}

/// A number made of digits only: Rust's parsers also take a leading `+`,
/// which HTTP does not.
fn digits(s: &str, radix: u32) -> Option<u64> {
    if s.is_empty() || !s.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(s, radix).ok()
}

/// Up to `left` bytes of body from the buffer, and how many remain after them.
fn take(buf: &mut BytesMut, left: u64) -> Option<(Bytes, u64)> {
    if buf.is_empty() {
        return None;
    }
    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
    Some((buf.split_to(n).freeze(), left - n as u64))
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(kind: Kind, input: &[u8]) -> (Vec<u8>, Kind, usize) {
        let mut kind = kind;
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(b) = decode(&mut kind, &mut buf).unwrap() {
            out.extend_from_slice(&b);
        }
        (out, kind, buf.len())
    }

    #[test]
    fn head_ends_at_the_first_blank_line() {
        assert!(ends_head(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody"));
        assert!(ends_head(b"HTTP/1.1 200 OK\nA: b\n\nbody"));
        assert!(!ends_head(b"HTTP/1.1 200 OK\r\nA: b\r\n"));
        assert!(!ends_head(b"HTTP/1.1 200 OK\r\nA: b\r\n\r"));
    }

    #[test]
    fn content_length_body_stops_at_its_length() {
        let (out, kind, left) = drain(Kind::Length(5), b"helloEXTRA");
        assert_eq!(out, b"hello");
        assert_eq!(kind, Kind::Done);
        assert_eq!(
            left, 5,
            "bytes past the body stay (and stop the connection's reuse)"
        );
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let input = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        let (out, kind, left) = drain(Kind::Chunked(Chunk::Size), input);
        assert_eq!(out, b"hello world");
        assert_eq!(kind, Kind::Done);
        assert_eq!(left, 0);
    }

    #[test]
    fn chunked_body_split_anywhere_decodes_the_same() {
        let input: &[u8] = b"a\r\n0123456789\r\n3\r\nabc\r\n0\r\n\r\n";
        for cut in 0..input.len() {
            let mut kind = Kind::Chunked(Chunk::Size);
            let mut buf = BytesMut::from(&input[..cut]);
            let mut out = Vec::new();
            while let Some(b) = decode(&mut kind, &mut buf).unwrap() {
                out.extend_from_slice(&b);
            }
            buf.extend_from_slice(&input[cut..]);
            while let Some(b) = decode(&mut kind, &mut buf).unwrap() {
                out.extend_from_slice(&b);
            }
            assert_eq!(out, b"0123456789abc", "cut at {cut}");
            assert_eq!(kind, Kind::Done, "cut at {cut}");
        }
    }

    #[test]
    fn bad_chunks_are_errors() {
        for bad in [&b"zz\r\n"[..], b"3\r\nabcX\r\n", b"ffffffffffffffffff\r\n"] {
            let mut kind = Kind::Chunked(Chunk::Size);
            let mut buf = BytesMut::from(bad);
            let mut result = Ok(None);
            for _ in 0..4 {
                result = decode(&mut kind, &mut buf);
                if !matches!(result, Ok(Some(_))) {
                    break;
                }
            }
            assert!(result.is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        list.iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn ambiguous_framing_is_not_trusted() {
        let ok = StatusCode::OK;
        let both = framing(
            ok,
            &headers(&[("transfer-encoding", "chunked"), ("content-length", "3")]),
            Version::HTTP_11,
            false,
        )
        .unwrap();
        assert_eq!(both.kind, Kind::Chunked(Chunk::Size));
        assert!(!both.keep_alive, "a message with both ends its connection");
        let old = framing(
            ok,
            &headers(&[("transfer-encoding", "chunked")]),
            Version::HTTP_10,
            false,
        )
        .unwrap();
        assert_eq!(
            old,
            Framing {
                kind: Kind::UntilClose,
                keep_alive: false
            },
            "HTTP/1.0 cannot be chunked"
        );
        for bad in ["+5", " 5x", "0x5", ""] {
            assert!(
                framing(
                    ok,
                    &headers(&[("content-length", bad)]),
                    Version::HTTP_11,
                    false
                )
                .is_err(),
                "{bad:?}"
            );
        }
        let mut kind = Kind::Chunked(Chunk::Size);
        assert!(decode(&mut kind, &mut BytesMut::from(&b"+5\r\nhello\r\n"[..])).is_err());
        let mut kind = Kind::Chunked(Chunk::Size);
        assert!(
            decode(&mut kind, &mut BytesMut::from(&b"5 ;ext\r\nhello\r\n"[..])).is_ok(),
            "BWS before an extension is allowed"
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let ok = StatusCode::OK;
        let f = |h: &[(&str, &str)], v, no_body| framing(ok, &headers(h), v, no_body).ok();
        let v11 = Version::HTTP_11;
        assert_eq!(
            f(&[("content-length", "10")], v11, false),
            Some(Framing {
                kind: Kind::Length(10),
                keep_alive: true
            })
        );
        assert_eq!(
            f(&[("content-length", "10")], v11, true).unwrap().kind,
            Kind::Done,
            "HEAD has no body"
        );
        assert_eq!(
            f(
                &[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "3")
                ],
                v11,
                false
            )
            .unwrap()
            .kind,
            Kind::Chunked(Chunk::Size)
        );
        assert_eq!(
            f(&[("transfer-encoding", "gzip")], v11, false),
            Some(Framing {
                kind: Kind::UntilClose,
                keep_alive: false
            })
        );
        assert_eq!(
            f(&[], v11, false),
            Some(Framing {
                kind: Kind::UntilClose,
                keep_alive: false
            })
        );
        assert!(
            !f(
                &[("content-length", "1"), ("connection", "close")],
                v11,
                false
            )
            .unwrap()
            .keep_alive
        );
        assert!(
            !f(&[("content-length", "1")], Version::HTTP_10, false)
                .unwrap()
                .keep_alive
        );
        assert!(
            f(
                &[("content-length", "1"), ("connection", "keep-alive")],
                Version::HTTP_10,
                false
            )
            .unwrap()
            .keep_alive
        );
        assert_eq!(
            f(
                &[("content-length", "1"), ("content-length", "2")],
                v11,
                false
            ),
            None
        );
        assert_eq!(f(&[("content-length", "-1")], v11, false), None);
        let no_content = framing(StatusCode::NO_CONTENT, &headers(&[]), v11, false).unwrap();
        assert_eq!(no_content.kind, Kind::Done);
    }
}
