//! Request variables for expressions and hash keys, resolved lazily from the
//! request being served.

use std::borrow::Cow;
use std::net::SocketAddr;

use http::header::{HeaderValue, COOKIE};
use http::request::Parts;
use turnpike_router::{cookie, query_arg, Var, VarSource};

/// Facts about the downstream connection, computed once per connection.
pub(crate) struct ConnInfo {
    pub remote: SocketAddr,
    /// The client's IP as text, for `X-Forwarded-For` and `remote_addr`.
    pub remote_ip: HeaderValue,
    pub local: SocketAddr,
    pub local_port: HeaderValue,
    pub scheme: &'static str,
}

impl ConnInfo {
    pub(crate) fn new(remote: SocketAddr, local: SocketAddr, scheme: &'static str) -> ConnInfo {
        let remote = SocketAddr::new(canonical(remote.ip()), remote.port());
        ConnInfo {
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
fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// Text made of digits, dots and colons is always a valid header value.
fn header_text(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// One request's variables.
pub(crate) struct RequestVars<'a> {
    pub parts: &'a Parts,
    pub path: &'a str,
    pub host: &'a str,
    pub conn: &'a ConnInfo,
    pub request_id: &'a HeaderValue,
    pub route_id: Option<&'a str>,
    pub service_id: Option<&'a str>,
}

impl VarSource for RequestVars<'_> {
    fn var(&self, var: &Var) -> Option<Cow<'_, str>> {
        match var {
            Var::Uri => Some(Cow::Borrowed(self.path)),
            Var::RequestUri => self
                .parts
                .uri
                .path_and_query()
                .map(|pq| Cow::Borrowed(pq.as_str())),
            Var::Host => Some(Cow::Owned(host_only(self.host).to_ascii_lowercase())),
            Var::RequestMethod => Some(Cow::Borrowed(self.parts.method.as_str())),
            Var::Scheme => Some(Cow::Borrowed(self.conn.scheme)),
            Var::RemoteAddr => text(&self.conn.remote_ip),
            Var::RemotePort => Some(Cow::Owned(self.conn.remote.port().to_string())),
            Var::ServerAddr => Some(Cow::Owned(self.conn.local.ip().to_string())),
            Var::ServerPort => text(&self.conn.local_port),
            Var::QueryString => self.parts.uri.query().map(Cow::Borrowed),
            Var::Arg(name) => self.parts.uri.query().and_then(|q| query_arg(q, name)),
            Var::Http(name) => self.parts.headers.get(name.as_ref()).and_then(text),
            Var::Cookie(name) => self
                .parts
                .headers
                .get_all(COOKIE)
                .iter()
                .filter_map(|h| h.to_str().ok())
                .find_map(|h| cookie(h, name))
                .map(Cow::Borrowed),
            Var::RouteId => self.route_id.map(Cow::Borrowed),
            Var::ServiceId => self.service_id.map(Cow::Borrowed),
            Var::RequestId => text(self.request_id),
            // Known only later in the request (authentication, balancing,
            // response); the phases that see them resolve them there.
            Var::ConsumerName | Var::UpstreamAddr | Var::Status => None,
        }
    }
}

fn text(v: &HeaderValue) -> Option<Cow<'_, str>> {
    v.to_str().ok().map(Cow::Borrowed)
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub(crate) fn host_only(host: &str) -> &str {
    if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    }
}
