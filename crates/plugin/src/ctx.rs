//! One request as plugins see it, and the facts its variables come from.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, COOKIE};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::StatusCode;
use turnpike_router::{cookie, query_arg, Var, VarSource};

use crate::Chain;

/// Facts about the downstream connection, computed once per connection.
#[derive(Debug)]
pub struct Conn {
    pub remote: SocketAddr,
    /// The client's IP as text, for `X-Forwarded-For` and `remote_addr`.
    pub remote_ip: HeaderValue,
    pub local: SocketAddr,
    pub local_port: HeaderValue,
    pub scheme: &'static str,
}

impl Conn {
    pub fn new(remote: SocketAddr, local: SocketAddr, scheme: &'static str) -> Conn {
        let remote = SocketAddr::new(canonical(remote.ip()), remote.port());
        Conn {
            remote_ip: header_text(&remote.ip().to_string()),
            local_port: header_text(&local.port().to_string()),
            remote,
            local,
            scheme,
        }
    }
}

/// An IPv4 client on a dual-stack socket shows as `::ffff:a.b.c.d`; CIDR
/// rules are written for `a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Text made of digits, dots and colons is always a valid header value.
fn header_text(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A consumer, as the compiled snapshot holds it.
#[derive(Debug)]
pub struct Consumer {
    pub username: Arc<str>,
    /// The username as sent upstream in `X-Consumer-Username`.
    pub header: HeaderValue,
    pub group_id: Option<Arc<str>>,
    /// The consumer's plugins other than its credentials; they join the
    /// route's chain once the consumer is known, winning over the route's
    /// own config of the same plugin.
    pub chain: Chain,
}

/// One request on its way through the plugin phases.
///
/// Built before routing, so the router reads its variables from here too.
pub struct Ctx {
    /// The client's request line and headers; what is here when the request
    /// leaves is what the upstream gets (plus the gateway's own headers).
    pub req: Parts,
    pub conn: Arc<Conn>,
    pub request_id: HeaderValue,
    /// The client's `Host` (or the authority of an absolute URI).
    pub host: Option<HeaderValue>,
    /// The normalised, decoded path when it differs from `req.uri`'s path.
    pub(crate) decoded: Option<Box<str>>,
    /// The path and query the upstream gets; `proxy-rewrite` changes it.
    pub upstream_uri: PathAndQuery,
    /// Replaces the upstream's `Host` whatever `pass_host` says.
    pub upstream_host: Option<HeaderValue>,
    pub route_id: Option<Arc<str>>,
    pub service_id: Option<Arc<str>>,
    /// The route's and service's `name`, when they have one.
    pub route_name: Option<Arc<str>>,
    pub service_name: Option<Arc<str>>,
    /// Set by the authentication plugin that recognised the client.
    pub consumer: Option<Arc<Consumer>>,
    /// The request body, read whole when a plugin on the chain asked for it;
    /// a plugin may replace it.
    pub body: Option<Bytes>,
    /// Headers added to whatever response the client gets (CORS,
    /// `request-id`), applied before `header_filter` runs.
    pub response_headers: HeaderMap,
    /// The response status, once there is one (`header_filter`, `log`).
    pub status: Option<StatusCode>,
    /// Response body bytes sent to the client (for `log`).
    pub response_bytes: u64,
    /// Whether the whole response body was sent (for `log`): false when
    /// the client went away or the upstream failed part-way.
    pub response_complete: bool,
    /// What plugins keep for their own later phases (`limit-conn` the key
    /// it counted a request under, for `log`), by type. Empty, and free,
    /// unless a plugin uses it.
    pub stash: http::Extensions,
    /// Sends the request to this upstream instead of the route's (set by
    /// traffic-split, api-breaker's fallback; from [`crate::Env::upstream`]).
    pub upstream_override: Option<crate::Index>,
    /// When the request arrived (for latencies in `log`).
    pub started: Instant,
    /// The node the request was last sent to (`upstream_addr`).
    pub upstream_addr: Option<Arc<str>>,
    /// From sending the request upstream to its response head.
    pub upstream_latency: Option<Duration>,
    /// The upstream's status (`$upstream_status`): its answer's, or the
    /// gateway's 502/504 when it failed to give one. Unlike `status`, no
    /// plugin changes it.
    pub upstream_status: Option<StatusCode>,
    /// Bytes of the response head sent (status line and headers).
    pub response_head_bytes: u64,
}

impl Ctx {
    pub fn new(req: Parts, conn: Arc<Conn>, request_id: HeaderValue) -> Ctx {
        let host = req.headers.get(http::header::HOST).cloned().or_else(|| {
            req.uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let upstream_uri = req
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Ctx {
            req,
            conn,
            request_id,
            host,
            decoded: None,
            upstream_uri,
            upstream_host: None,
            route_id: None,
            service_id: None,
            route_name: None,
            service_name: None,
            consumer: None,
            body: None,
            response_headers: HeaderMap::new(),
            status: None,
            response_bytes: 0,
            response_complete: false,
            stash: http::Extensions::new(),
            upstream_override: None,
            started: Instant::now(),
            upstream_addr: None,
            upstream_latency: None,
            upstream_status: None,
            response_head_bytes: 0,
        }
    }

    /// Records the normalised path (when it differs from the one sent) and
    /// the upstream path that goes with it.
    pub fn set_path(&mut self, decoded: Box<str>, upstream_uri: PathAndQuery) {
        self.decoded = Some(decoded);
        self.upstream_uri = upstream_uri;
    }

    /// The normalised, decoded path: `$uri`.
    pub fn path(&self) -> &str {
        self.decoded
            .as_deref()
            .unwrap_or_else(|| self.req.uri.path())
    }

    /// The client's `Host` as sent, port included (see [`host_only`]).
    pub fn host_str(&self) -> &str {
        self.host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
    }

    /// A request header as text, when it is valid text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.req.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A query argument of the client's request.
    pub fn query_arg(&self, name: &str) -> Option<Cow<'_, str>> {
        self.req.uri.query().and_then(|q| query_arg(q, name))
    }

    /// A cookie of the client's request.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.req
            .headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|h| h.to_str().ok())
            .find_map(|h| cookie(h, name))
    }

    /// A template filled in with this request's variables; an unset
    /// variable gives nothing, as in nginx.
    pub fn render(&self, template: &Template) -> String {
        let mut out = String::new();
        for part in template.0.iter() {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(var) => out.push_str(&self.var(var).unwrap_or_default()),
            }
        }
        out
    }
}

/// Text with `$name` / `${name}` request variables, parsed once when the
/// config is loaded (an unknown name is refused then), rendered per request
/// with [`Ctx::render`].
#[derive(Debug, Clone)]
pub struct Template(Box<[Part]>);

#[derive(Debug, Clone)]
enum Part {
    Text(Box<str>),
    Var(Var),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut error = None;
        scan(text, |piece| match piece {
            Piece::Text("") => {}
            Piece::Text(t) => parts.push(Part::Text(t.into())),
            Piece::Var(name) => match Var::parse(name) {
                Ok(var) => parts.push(Part::Var(var)),
                Err(e) => {
                    error.get_or_insert(e);
                }
            },
        });
        match error {
            Some(e) => Err(e),
            None => Ok(Template(parts.into())),
        }
    }

    /// The text, when it holds no variable.
    pub fn fixed(&self) -> Option<String> {
        let mut out = String::new();
        for part in self.0.iter() {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(_) => return None,
            }
        }
        Some(out)
    }
}

enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

/// Splits a template into text and `$name` / `${name}` variables; a `$`
/// followed by no name is text.
fn scan<'a>(template: &'a str, mut each: impl FnMut(Piece<'a>)) {
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        each(Piece::Text(&rest[..at]));
        let after = &rest[at + 1..];
        let (name, tail) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(end) => (&inner[..end], &inner[end + 1..]),
                None => ("", after),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        if name.is_empty() {
            each(Piece::Text("$"));
        } else {
            each(Piece::Var(name));
        }
        rest = tail;
    }
    each(Piece::Text(rest));
}

impl VarSource for Ctx {
    fn var(&self, var: &Var) -> Option<Cow<'_, str>> {
        match var {
            Var::Uri => Some(Cow::Borrowed(self.path())),
            Var::RequestUri => self
                .req
                .uri
                .path_and_query()
                .map(|pq| Cow::Borrowed(pq.as_str())),
            Var::Host => Some(Cow::Owned(host_only(self.host_str()).to_ascii_lowercase())),
            Var::RequestMethod => Some(Cow::Borrowed(self.req.method.as_str())),
            Var::Scheme => Some(Cow::Borrowed(self.conn.scheme)),
            Var::RemoteAddr => text(&self.conn.remote_ip),
            Var::RemotePort => Some(Cow::Owned(self.conn.remote.port().to_string())),
            Var::ServerAddr => Some(Cow::Owned(self.conn.local.ip().to_string())),
            Var::ServerPort => text(&self.conn.local_port),
            Var::QueryString => self.req.uri.query().map(Cow::Borrowed),
            Var::Arg(name) => self.query_arg(name),
            Var::Http(name) => self.req.headers.get(name.as_ref()).and_then(text),
            Var::Cookie(name) => self.cookie(name).map(Cow::Borrowed),
            Var::RouteId => self.route_id.as_deref().map(Cow::Borrowed),
            Var::ServiceId => self.service_id.as_deref().map(Cow::Borrowed),
            Var::RequestId => text(&self.request_id),
            Var::ConsumerName => self.consumer.as_ref().map(|c| Cow::Borrowed(&*c.username)),
            Var::Status => self.status.as_ref().map(|s| Cow::Borrowed(s.as_str())),
            Var::UpstreamAddr => self.upstream_addr.as_deref().map(Cow::Borrowed),
        }
    }
}

fn text(v: &HeaderValue) -> Option<Cow<'_, str>> {
    v.to_str().ok().map(Cow::Borrowed)
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub fn host_only(host: &str) -> &str {
    if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn ctx(uri: &str) -> Ctx {
        let (parts, ()) = http::Request::get(uri)
            .header("host", "example.com:8080")
            .header("x-user", "ann")
            .body(())
            .unwrap()
            .into_parts();
        let conn = Arc::new(Conn::new(
            "10.0.0.1:5000".parse().unwrap(),
            "127.0.0.1:9080".parse().unwrap(),
            "http",
        ));
        Ctx::new(parts, conn, HeaderValue::from_static("rid"))
    }

    fn render(c: &Ctx, text: &str) -> String {
        c.render(&Template::parse(text).unwrap())
    }

    #[test]
    fn expands_variables() {
        let c = ctx("/a/b?x=1");
        assert_eq!(
            render(&c, "$uri|${arg_x}|$http_x_user|$host|$cookie_none|$|${"),
            "/a/b|1|ann|example.com||$|${"
        );
        assert_eq!(render(&c, "v=$remote_addr;"), "v=10.0.0.1;");
        assert_eq!(
            Template::parse("/a/$").unwrap().fixed().as_deref(),
            Some("/a/$")
        );
        assert_eq!(Template::parse("/a/$uri").unwrap().fixed(), None);
    }

    #[test]
    fn templates_are_checked() {
        assert!(Template::parse("/u/$arg_id/${remote_addr}$").is_ok());
        assert!(Template::parse("/u/$nope").unwrap_err().contains("nope"));
    }

    #[test]
    fn host_only_strips_ports() {
        assert_eq!(host_only("a.com:80"), "a.com");
        assert_eq!(host_only("[::1]:80"), "[::1]");
        assert_eq!(host_only("a.com"), "a.com");
    }
}
