//! Test harness: real upstream servers on ephemeral ports, and the real
//! `turnpike` binary started on a config written for the test.

use std::convert::Infallible;
use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Waits up to `within` for `done` to hold, looking every 20 ms; fails
/// with `why()` (asked only then).
pub async fn wait_for(within: Duration, mut done: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{}", why());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port nothing listens on right now, for a process the test starts
/// to listen on. Taken below Linux's ephemeral range (32768 and up), so no
/// outgoing connection of another test's gateway can take it first as its
/// local port, and never the same twice in this process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = fastrand::u16(20_000..32_000);
        if given.contains(&port) {
            continue;
        }
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    // Crowded: let the OS choose.
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

/// An upstream that describes each request it gets, in JSON:
/// `{"name", "method", "uri", "version", "headers"}`. Paths with meaning:
/// `/slow?ms=N` waits first; `/big?bytes=N` streams N bytes; `/upload`
/// counts the request body's bytes; `/echo-body` answers with the request
/// body and its content type; `/ws` echoes WebSocket messages;
/// `/status/N` answers N.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// Connections accepted.
    pub conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Upstream::serve(listener, name).await
    }

    pub async fn serve(listener: TcpListener, name: &str) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(AtomicUsize::new(0));
        let name: Arc<str> = name.into();
        let counter = hits.clone();
        let accepted = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let name = name.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        answer(name.clone(), req)
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            hits,
            conns,
            task,
        }
    }

    pub fn node(&self) -> String {
        self.addr.to_string()
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{name}="))?.parse().ok())
}

async fn answer(name: Arc<str>, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(ms) = query(&req, "ms").filter(|_| path.starts_with("/slow")) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if path == "/ws" {
        return Ok(websocket_echo(&mut req));
    }
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
    {
        let mut resp = Response::new(full(format!("status {code} from {name}")));
        *resp.status_mut() = StatusCode::from_u16(code).unwrap();
        return Ok(resp);
    }
    if path == "/big" {
        let total = query(&req, "bytes").unwrap_or(0);
        return Ok(Response::new(stream_bytes(total)));
    }
    if path == "/echo-body" {
        let content_type = req.headers().get("content-type").cloned();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let mut resp = Response::new(full(body));
        if let Some(t) = content_type {
            resp.headers_mut().insert("content-type", t);
        }
        return Ok(resp);
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        return Ok(Response::new(full(format!("{{\"bytes\":{n}}}"))));
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").into()))
        .collect();
    let body = serde_json::json!({
        "name": &*name,
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    let mut resp = Response::new(full(body.to_string()));
    resp.headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    resp.headers_mut()
        .insert("keep-alive", "timeout=5".parse().unwrap());
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(resp)
}

fn stream_bytes(total: u64) -> Body {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let stream = futures_util::stream::unfold(total, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(CHUNK as u64);
            let frame: Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>> =
                Ok(Frame::data(chunk.slice(..n as usize)));
            Some((frame, left - n))
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

fn websocket_echo(req: &mut Request<Incoming>) -> Response<Body> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .cloned()
        .unwrap_or_else(|| "".parse().unwrap());
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let (mut tx, mut rx) = ws.split();
        while let Some(Ok(msg)) = rx.next().await {
            if (msg.is_text() || msg.is_binary()) && tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert("upgrade", "websocket".parse().unwrap());
    h.insert("connection", "Upgrade".parse().unwrap());
    h.insert("sec-websocket-accept", accept.parse().unwrap());
    resp
}

/// A running `turnpike run` process.
pub struct Gateway {
    pub child: Option<Child>,
    pub port: u16,
    pub status_port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    _dir: TempDir,
}

/// The gateway's settings block for a test: its listen and status ports.
pub fn settings(port: u16, status_port: u16) -> String {
    format!(
        "gateway:\n  listen: [\"127.0.0.1:{port}\"]\n  status: {{listen: \"127.0.0.1:{status_port}\"}}\n  workers: 2\n  shutdown_timeout: 5\n  log_level: info\n"
    )
}

/// Resources for one route, `/*`, to `node`.
pub fn one_route(node: &str) -> String {
    format!("routes:\n  - {{id: 1, uri: \"/*\", upstream: {{nodes: {{\"{node}\": 1}}}}}}\n")
}

/// Runs `turnpike check` on `resources`: whether it passed, and its stderr.
pub fn check(resources: &str) -> (bool, String) {
    let dir = TempDir::new();
    let file = dir.path.join("check.yaml");
    std::fs::write(&file, resources).unwrap();
    let out = Command::new(binary())
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), err)
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_turnpike")
}

impl Gateway {
    /// Starts the gateway with `resources` (YAML resource lists) and
    /// generated ports; waits until `/readyz` answers 200.
    pub async fn start(resources: &str) -> Gateway {
        let (port, status_port) = (free_port(), free_port());
        Gateway::start_raw(
            &format!("{}{resources}", settings(port, status_port)),
            port,
            status_port,
        )
        .await
    }

    /// A gateway with one route, `/*`, to `node`.
    pub async fn proxying(node: &str) -> Gateway {
        Gateway::start(&one_route(node)).await
    }

    pub async fn start_raw(text: &str, port: u16, status_port: u16) -> Gateway {
        let dir = TempDir::new();
        let config = dir.path.join("turnpike.yaml");
        std::fs::write(&config, text).unwrap();
        Gateway::launch(dir, config, port, status_port).await
    }

    /// Starts the gateway on a config file already in place in `dir`.
    pub async fn launch(dir: TempDir, config: PathBuf, port: u16, status_port: u16) -> Gateway {
        let gw = Gateway::spawn(dir, config, port, status_port);
        gw.wait_ready().await;
        gw
    }

    /// Starts the gateway without waiting for it to be ready.
    pub fn spawn(dir: TempDir, config: PathBuf, port: u16, status_port: u16) -> Gateway {
        let log = dir.path.join("turnpike.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary())
            .args(["run", "-c"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log_file.try_clone().unwrap()))
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("turnpike starts");
        Gateway {
            child: Some(child),
            port,
            status_port,
            config,
            log,
            _dir: dir,
        }
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(resp) = get(&format!("http://127.0.0.1:{}/readyz", self.status_port)).await {
                if resp.status == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway did not become ready; log:\n{}", self.log_text());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Rewrites the config file in place (as an editor would).
    pub fn rewrite(&self, resources: &str) {
        let text = format!("{}{resources}", settings(self.port, self.status_port));
        let tmp = self.config.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Waits until the log has `needle` `times` times.
    pub async fn wait_log(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log_text().matches(needle).count() >= times {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("log never had {times}× {needle:?}:\n{}", self.log_text());
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we spawned and own.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Kills the process (SIGKILL, nothing flushed).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the process (SIGKILL, nothing flushed) and starts it again on
    /// the same config file and directory.
    pub async fn kill_and_restart(&mut self) {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(binary())
            .args(["run", "-c"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("turnpike starts");
        self.child = Some(child);
        self.wait_ready().await;
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "gateway did not exit in {within:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "turnpike-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A node whose connects hang: a listener that never accepts, with its
/// accept queue filled, so the kernel drops further SYNs. Keep the returned
/// value alive for as long as the node should hang.
pub struct HangingNode {
    pub addr: SocketAddr,
    _socket: StdListener,
    _fillers: Vec<tokio::net::TcpStream>,
}

pub async fn hanging_node() -> HangingNode {
    let socket = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    // SAFETY: listen(2) on a socket we own, to shrink its backlog.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&socket), 0) };
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let attempt = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        if let Ok(Ok(s)) = attempt {
            fillers.push(s);
        }
    }
    HangingNode {
        addr,
        _socket: socket,
        _fillers: fillers,
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
    pub version: http::Version,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// A header the upstream saw, from the echo body.
    pub fn seen(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_owned)
    }
}

pub type Client =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub async fn send(client: &Client, req: Request<Body>) -> Result<Reply, String> {
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        version: parts.version,
    })
}

pub async fn get(url: &str) -> Result<Reply, String> {
    send(
        &client(),
        Request::get(url).body(full(Bytes::new())).unwrap(),
    )
    .await
}

/// GET with extra headers.
pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(&client(), req.body(full(Bytes::new())).unwrap())
        .await
        .unwrap()
}

/// GETs sent in a loop (one task per URL) until [`Load::finish`], counting
/// answers that are not `good`.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(urls: Vec<String>, good: fn(&Reply) -> bool) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = urls
            .into_iter()
            .map(|url| {
                let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
                tokio::spawn(async move {
                    let client = client();
                    while !stop.load(Ordering::Relaxed) {
                        let req = Request::get(&url).body(full(Bytes::new())).unwrap();
                        let answer = send(&client, req).await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        if !answer.as_ref().is_ok_and(good) {
                            eprintln!("failed under load: {answer:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            sent,
            failed,
            tasks,
        }
    }

    /// Stops; returns (sent, failed).
    pub async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// An HTTPS server with a self-signed certificate for `localhost`.
/// Accepts TLS with a fresh self-signed certificate for `localhost`.
pub fn self_signed_acceptor() -> tokio_rustls::TlsAcceptor {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

/// A node that answers "over tls" over TLS (self-signed); its address.
pub async fn tls_upstream() -> String {
    let acceptor = self_signed_acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(full("over tls")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr.to_string()
}

/// What a [`Stoppable`] server answers each request with.
pub type Handler = Arc<
    dyn Fn(
            Request<Incoming>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>
        + Send
        + Sync,
>;

/// An HTTP/1.1 server on a fixed port that can be stopped (listener and
/// every connection closed, as a crash would) and started again there.
pub struct Stoppable {
    pub port: u16,
    serve: Handler,
    tasks: Option<tokio::task::JoinSet<()>>,
}

impl Stoppable {
    pub async fn start(serve: Handler) -> Stoppable {
        let mut s = Stoppable {
            port: free_port(),
            serve,
            tasks: None,
        };
        s.resume().await;
        s
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn resume(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let serve = self.serve.clone();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            // Held by the accept loop: stopping it closes every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let serve = serve.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let answer = serve(req);
                        async move { Ok::<_, Infallible>(answer.await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        self.tasks = Some(tasks);
    }

    pub async fn stop(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.shutdown().await;
        }
    }
}
