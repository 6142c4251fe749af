//! `proxy-rewrite`: changes what the upstream is asked: path (fixed, with
//! variables, or by regex with captures), host, method and headers.

use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{Method, StatusCode};
use regex::Regex;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin, Reply, Template};

use crate::headers::HeaderOps;

pub(crate) const NAME: &str = "proxy-rewrite";
pub(crate) const PRIORITY: i32 = 1008;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "uri": {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": "^\\/.*"},
            "method": {"type": "string", "enum": ["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "MKCOL", "COPY", "MOVE", "PROPFIND", "LOCK", "UNLOCK", "PATCH", "TRACE"]},
            "regex_uri": {"type": "array", "minItems": 2, "items": {"type": "string"}},
            "host": {"type": "string", "pattern": "^[0-9a-zA-Z-.]+(:\\d{1,5})?$"},
            "headers": crate::headers::schema(),
            "use_real_request_uri_unsafe": {"type": "boolean", "default": false}
        },
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    uri: Option<String>,
    method: Option<String>,
    regex_uri: Option<Vec<String>>,
    host: Option<String>,
    headers: Option<Value>,
    use_real_request_uri_unsafe: bool,
}

/// `uri`, split at its own `?` before any variable is filled in.
struct UriTemplate {
    path: Template,
    query: Option<Template>,
}

struct ProxyRewrite {
    uri: Option<UriTemplate>,
    regex: Vec<RegexUri>,
    method: Option<Method>,
    host: Option<http::HeaderValue>,
    headers: HeaderOps,
    raw: bool,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

/// One `regex_uri` pair: the pattern, and the replacement split at its own
/// `?` into path and query, so a `?` that comes from the client's (decoded)
/// path stays part of the path.
pub(crate) struct RegexUri {
    re: Regex,
    path: String,
    query: Option<String>,
}

/// `regex_uri`: pairs of pattern and replacement, first match wins.
pub(crate) fn regex_pairs(
    list: &[String],
    field: &str,
    env: &Env,
) -> Result<Vec<RegexUri>, FieldError> {
    if !list.len().is_multiple_of(2) {
        return Err(FieldError::new(
            field,
            "must hold pairs: pattern, replacement, …",
        ));
    }
    list.chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            let re = env
                .regex(&pair[0])
                .map_err(|e| FieldError::new(format!("{field}[{}]", i * 2), e))?;
            let with = replacement(&pair[1]);
            let (path, query) = match with.split_once('?') {
                Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                None => (with, None),
            };
            Ok(RegexUri { re, path, query })
        })
        .collect()
}

/// An APISIX (PCRE) replacement in Rust's regex syntax: `$1s` means
/// capture 1 then `s` in APISIX, but a group named `1s` to `regex`, so
/// numbered captures are braced: `${1}s`.
fn replacement(apisix: &str) -> String {
    let mut out = String::with_capacity(apisix.len() + 4);
    let mut chars = apisix.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '$' || !chars.peek().is_some_and(char::is_ascii_digit) {
            continue;
        }
        out.push('{');
        while let Some(d) = chars.next_if(char::is_ascii_digit) {
            out.push(d);
        }
        out.push('}');
    }
    out
}

/// The first pattern that matches `path`, with its replacement applied:
/// the new path, and the replacement's own query if it has one.
pub(crate) fn regex_rewrite(pairs: &[RegexUri], path: &str) -> Option<(String, Option<String>)> {
    pairs.iter().find_map(|p| {
        // One search, as `Regex::replace` would do after `is_match`.
        let caps = p.re.captures(path)?;
        let whole = caps.get(0)?;
        let mut out = String::with_capacity(path.len() + p.path.len());
        out.push_str(&path[..whole.start()]);
        caps.expand(&p.path, &mut out);
        out.push_str(&path[whole.end()..]);
        let query = p.query.as_ref().map(|q| {
            let mut text = String::new();
            caps.expand(q, &mut text);
            text
        });
        Some((out, query))
    })
}

fn uri_template(uri: &str) -> Result<UriTemplate, FieldError> {
    let (path, query) = match uri.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (uri, None),
    };
    Ok(UriTemplate {
        path: crate::template(path, "uri")?,
        query: query.map(|q| crate::template(q, "uri")).transpose()?,
    })
}

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    let regex = regex_pairs(c.regex_uri.as_deref().unwrap_or_default(), "regex_uri", env)?;
    let host = c
        .host
        .map(|h| {
            http::HeaderValue::from_str(&h).map_err(|_| FieldError::new("host", "not a valid host"))
        })
        .transpose()?;
    Ok(Arc::new(ProxyRewrite {
        uri: c.uri.as_deref().map(uri_template).transpose()?,
        regex,
        method: c
            .method
            .map(|m| Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET)),
        host,
        headers: HeaderOps::parse(c.headers.as_ref(), "headers")?,
        raw: c.use_real_request_uri_unsafe,
    }))
}

impl ProxyRewrite {
    /// The new path and the template's own query: the template is split at
    /// its own `?` before variables are expanded, so a `?` in a variable's
    /// value is encoded into the path, never a query separator.
    fn new_path(&self, ctx: &Ctx) -> Option<(String, Option<String>)> {
        if let Some(uri) = &self.uri {
            let query = uri.query.as_ref().map(|q| query_text(&ctx.render(q)));
            return Some((ctx.render(&uri.path), query));
        }
        regex_rewrite(&self.regex, ctx.path())
    }

    /// The rewritten path, encoded, with its own query and then the query
    /// the request has so far (which authentication may have trimmed).
    fn upstream_uri(&self, ctx: &Ctx, path: &str, own_query: Option<&str>) -> Option<PathAndQuery> {
        let path = if self.raw {
            std::borrow::Cow::Borrowed(path)
        } else {
            turnpike_router::encode_path(path)
        };
        let mut text = String::with_capacity(path.len() + 64);
        if !path.starts_with('/') {
            text.push('/');
        }
        text.push_str(&path);
        let mut sep = '?';
        for q in [own_query, ctx.upstream_uri.query()].into_iter().flatten() {
            if !q.is_empty() {
                text.push(sep);
                text.push_str(q);
                sep = '&';
            }
        }
        PathAndQuery::try_from(text).ok()
    }
}

/// An expanded query: variables come decoded, so what would break the
/// request line (spaces, `#`) is encoded again.
fn query_text(q: &str) -> String {
    q.replace(' ', "%20").replace('#', "%23")
}

impl Plugin for ProxyRewrite {
    fn rewrite(&self, ctx: &mut Ctx) -> Flow {
        if let Some((path, query)) = self.new_path(ctx) {
            match self.upstream_uri(ctx, &path, query.as_deref()) {
                Some(pq) => ctx.upstream_uri = pq,
                None => {
                    return Flow::Respond(Reply::message(
                        StatusCode::BAD_REQUEST,
                        "the rewritten URI is not valid",
                    ))
                }
            }
        }
        if let Some(m) = &self.method {
            ctx.req.method = m.clone();
        }
        if let Some(h) = &self.host {
            ctx.upstream_host = Some(h.clone());
        }
        if !self.headers.is_empty() {
            let mut headers = std::mem::take(&mut ctx.req.headers);
            self.headers.apply(ctx, &mut headers);
            ctx.req.headers = headers;
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use turnpike_plugin::Phase;

    fn rewrite(conf: Value, uri: &str) -> Ctx {
        let e = entry(NAME, conf);
        let mut c = ctx(uri);
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
        c
    }

    #[test]
    fn fixed_uri_keeps_the_query() {
        let c = rewrite(json!({"uri": "/v2/items"}), "/items?page=2");
        assert_eq!(c.upstream_uri.as_str(), "/v2/items?page=2");
        let c = rewrite(json!({"uri": "/x?a=1"}), "/items?page=2");
        assert_eq!(c.upstream_uri.as_str(), "/x?a=1&page=2");
    }

    #[test]
    fn uri_with_variables() {
        let c = rewrite(json!({"uri": "/users/$arg_id/$remote_addr"}), "/u?id=7");
        assert_eq!(c.upstream_uri.as_str(), "/users/7/10.0.0.1?id=7");
    }

    #[test]
    fn regex_with_captures_first_match_wins() {
        let conf =
            json!({"regex_uri": ["^/api/v1/(.*)/(.*)$", "/$2/$1", "^/api/(.*)", "/other/$1"]});
        let c = rewrite(conf.clone(), "/api/v1/a/b?q=1");
        assert_eq!(c.upstream_uri.as_str(), "/b/a?q=1");
        let c = rewrite(conf.clone(), "/api/x");
        assert_eq!(c.upstream_uri.as_str(), "/other/x");
        let c = rewrite(conf, "/nomatch");
        assert_eq!(c.upstream_uri.as_str(), "/nomatch");
    }

    #[test]
    fn host_method_headers() {
        let conf = json!({"host": "internal.svc", "method": "POST", "headers": {"set": {"x-api": "v2"}, "remove": ["x-user"]}});
        let mut c = request(http::Request::get("/").header("x-user", "u"));
        let e = entry(NAME, conf);
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
        assert_eq!(c.upstream_host.unwrap(), "internal.svc");
        assert_eq!(c.req.method, Method::POST);
        assert_eq!(c.req.headers["x-api"], "v2");
        assert!(!c.req.headers.contains_key("x-user"));
    }

    #[test]
    fn numbered_captures_may_touch_letters() {
        assert_eq!(replacement("/$1s/$2/${3}x/$$"), "/${1}s/${2}/${3}x/$$");
        let c = rewrite(
            json!({"regex_uri": ["^/(\\w+)/(\\d+)$", "/$1s/$2"]}),
            "/user/42",
        );
        assert_eq!(c.upstream_uri.as_str(), "/users/42");
    }

    #[test]
    fn a_question_mark_from_the_client_stays_in_the_path() {
        // The client sent `%3F`; the proxy decoded it into the path, as
        // `Ctx::set_path` records.
        let decoded = |uri: &str, path: &str| {
            let mut c = ctx(uri);
            let pq = c.upstream_uri.clone();
            c.set_path(path.into(), pq);
            c
        };
        let e = entry(NAME, json!({"regex_uri": ["^/api/(.*)", "/$1"]}));
        let mut c = decoded("/api/orders%3Fuser_id=42", "/api/orders?user_id=42");
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
        assert_eq!(c.upstream_uri.as_str(), "/orders%3Fuser_id=42");
        let e = entry(NAME, json!({"uri": "/v2$uri?from=gw"}));
        let mut c = decoded("/a%3Fb=1?q=2", "/a?b=1");
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
        assert_eq!(c.upstream_uri.as_str(), "/v2/a%3Fb=1?from=gw&q=2");
    }

    #[test]
    fn hidden_credentials_stay_hidden() {
        // key-auth (priority 2500) trimmed the query before proxy-rewrite runs.
        let e = entry(NAME, json!({"uri": "/v2/items"}));
        let mut c = ctx("/items?apikey=SECRET&page=2");
        c.upstream_uri = http::uri::PathAndQuery::from_static("/items?page=2");
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
        assert_eq!(c.upstream_uri.as_str(), "/v2/items?page=2");
    }

    #[test]
    fn spaces_are_encoded() {
        let c = rewrite(json!({"regex_uri": ["^/(.*)", "/a b/$1"]}), "/x");
        assert_eq!(c.upstream_uri.as_str(), "/a%20b/x");
    }

    #[test]
    fn bad_regex_and_odd_pairs_are_named() {
        assert_eq!(
            errors(NAME, json!({"regex_uri": ["(", "/x"]}))[0].path,
            "regex_uri[0]"
        );
        assert_eq!(
            errors(NAME, json!({"regex_uri": ["a", "b", "c"]}))[0].path,
            "regex_uri"
        );
        assert_eq!(errors(NAME, json!({"uri": "no-slash"}))[0].path, "uri");
    }
}
