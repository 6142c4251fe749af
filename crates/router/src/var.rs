//! Request variables by name, as APISIX (and nginx) spell them.
//!
//! A name is parsed once into a [`Var`]; the request side implements
//! [`VarSource`] and resolves a variable only when an expression, a hash key or
//! a log format asks for it.

use std::borrow::Cow;

/// A request variable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Var {
    /// The normalised path, without the query string.
    Uri,
    /// The path and query as the client sent them.
    RequestUri,
    /// The request's host, lower-cased, without the port.
    Host,
    RequestMethod,
    Scheme,
    RemoteAddr,
    RemotePort,
    ServerAddr,
    ServerPort,
    /// The query string without `?` (`args` and `query_string`).
    QueryString,
    /// `arg_NAME`: the first query argument named NAME.
    Arg(Box<str>),
    /// `http_NAME`: the request header NAME, with `_` read as `-`.
    Http(Box<str>),
    /// `cookie_NAME`: the cookie NAME.
    Cookie(Box<str>),
    RouteId,
    ServiceId,
    ConsumerName,
    UpstreamAddr,
    /// The response status, once known.
    Status,
    RequestId,
}

impl Var {
    /// Parses a variable name, refusing names the gateway does not know so a
    /// typo is caught when the config is loaded rather than never matching.
    pub fn parse(name: &str) -> Result<Var, String> {
        let var = match name {
            "uri" => Var::Uri,
            "request_uri" => Var::RequestUri,
            "host" => Var::Host,
            "request_method" => Var::RequestMethod,
            "scheme" => Var::Scheme,
            "remote_addr" => Var::RemoteAddr,
            "remote_port" => Var::RemotePort,
            "server_addr" => Var::ServerAddr,
            "server_port" => Var::ServerPort,
            "args" | "query_string" => Var::QueryString,
            "route_id" => Var::RouteId,
            "service_id" => Var::ServiceId,
            "consumer_name" => Var::ConsumerName,
            "upstream_addr" => Var::UpstreamAddr,
            "status" => Var::Status,
            "request_id" => Var::RequestId,
            _ => return Var::parse_prefixed(name),
        };
        Ok(var)
    }

    fn parse_prefixed(name: &str) -> Result<Var, String> {
        let pick = |prefix: &str| name.strip_prefix(prefix).filter(|rest| !rest.is_empty());
        if let Some(arg) = pick("arg_") {
            Ok(Var::Arg(arg.into()))
        } else if let Some(header) = pick("http_") {
            Ok(Var::Http(
                header.to_ascii_lowercase().replace('_', "-").into(),
            ))
        } else if let Some(cookie) = pick("cookie_") {
            Ok(Var::Cookie(cookie.into()))
        } else {
            Err(format!(
                "unknown variable `{name}` (known: uri, request_uri, host, request_method, scheme, \
                 remote_addr, remote_port, server_addr, server_port, args, arg_*, http_*, cookie_*, \
                 route_id, service_id, consumer_name, upstream_addr, status, request_id)"
            ))
        }
    }

    /// The variable's name as written in a config.
    pub fn name(&self) -> Cow<'static, str> {
        let fixed = match self {
            Var::Uri => "uri",
            Var::RequestUri => "request_uri",
            Var::Host => "host",
            Var::RequestMethod => "request_method",
            Var::Scheme => "scheme",
            Var::RemoteAddr => "remote_addr",
            Var::RemotePort => "remote_port",
            Var::ServerAddr => "server_addr",
            Var::ServerPort => "server_port",
            Var::QueryString => "args",
            Var::RouteId => "route_id",
            Var::ServiceId => "service_id",
            Var::ConsumerName => "consumer_name",
            Var::UpstreamAddr => "upstream_addr",
            Var::Status => "status",
            Var::RequestId => "request_id",
            Var::Arg(n) => return Cow::Owned(format!("arg_{n}")),
            Var::Http(n) => return Cow::Owned(format!("http_{}", n.replace('-', "_"))),
            Var::Cookie(n) => return Cow::Owned(format!("cookie_{n}")),
        };
        Cow::Borrowed(fixed)
    }
}

/// Where variables come from: the request being served.
pub trait VarSource {
    /// The variable's value, or `None` when the request has none.
    fn var(&self, var: &Var) -> Option<Cow<'_, str>>;
}

/// Finds the first `name=value` pair in a query string, percent-decoded.
pub fn query_arg<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode_component(k) == name).then(|| decode_component(v))
    })
}

/// Finds a cookie by name in a `Cookie` header value.
pub fn cookie<'c>(header: &'c str, name: &str) -> Option<&'c str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// A query argument's name or value decoded: `+` is a space, `%XX` a byte.
pub fn decode_component(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let plus = s.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&plus)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in [
            "uri",
            "host",
            "arg_name",
            "http_x_user_id",
            "cookie_sid",
            "route_id",
        ] {
            assert_eq!(Var::parse(name).unwrap().name(), name);
        }
        assert_eq!(Var::parse("http_X_Api").unwrap(), Var::Http("x-api".into()));
    }

    #[test]
    fn unknown_and_empty_names_are_refused() {
        assert!(Var::parse("nope").is_err());
        assert!(Var::parse("arg_").is_err());
        assert!(Var::parse("http_").is_err());
    }

    #[test]
    fn query_args_and_cookies() {
        assert_eq!(
            query_arg("a=1&name=jack&name=x", "name").as_deref(),
            Some("jack")
        );
        assert_eq!(query_arg("q=a%20b+c", "q").as_deref(), Some("a b c"));
        assert_eq!(query_arg("flag&x=1", "flag").as_deref(), Some(""));
        assert_eq!(query_arg("x=1", "y"), None);
        assert_eq!(cookie("a=1; sid=xyz; b=2", "sid"), Some("xyz"));
        assert_eq!(cookie("a=1", "sid"), None);
    }
}
