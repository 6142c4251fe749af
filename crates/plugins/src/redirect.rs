//! `redirect`: answers with a redirect: to HTTPS, to a fixed URI (with
//! variables), or to one made by a regex with captures.

use std::sync::Arc;

use http::header::{HeaderValue, LOCATION};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{
    host_only, typed, Ctx, Env, Factory, FieldError, Flow, Plugin, Reply, Template,
};

use crate::proxy_rewrite::{regex_pairs, regex_rewrite, RegexUri};

pub(crate) const NAME: &str = "redirect";
pub(crate) const PRIORITY: i32 = 900;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "http_to_https": {"type": "boolean"},
            "uri": {"type": "string", "minLength": 2},
            "regex_uri": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "string"}},
            "ret_code": {"type": "integer", "minimum": 200, "default": 302},
            "encode_uri": {"type": "boolean", "default": false},
            "append_query_string": {"type": "boolean", "default": false}
        },
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    http_to_https: Option<bool>,
    uri: Option<String>,
    regex_uri: Option<Vec<String>>,
    ret_code: u16,
    encode_uri: bool,
    append_query_string: bool,
}

struct Redirect {
    to_https: bool,
    uri: Option<Template>,
    regex: Vec<RegexUri>,
    status: StatusCode,
    encode: bool,
    append_query: bool,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    let to_https = c.http_to_https == Some(true);
    let targets = [to_https, c.uri.is_some(), c.regex_uri.is_some()];
    if targets.iter().filter(|&&t| t).count() != 1 {
        return Err(FieldError::new(
            "",
            "set exactly one of `uri`, `regex_uri` and `http_to_https: true`",
        ));
    }
    let uri = c
        .uri
        .as_deref()
        .map(|u| crate::template(u, "uri"))
        .transpose()?;
    Ok(Arc::new(Redirect {
        to_https: c.http_to_https.unwrap_or(false),
        regex: regex_pairs(c.regex_uri.as_deref().unwrap_or_default(), "regex_uri", env)?,
        uri,
        status: StatusCode::from_u16(c.ret_code)
            .map_err(|_| FieldError::new("ret_code", "not an HTTP status"))?,
        encode: c.encode_uri,
        append_query: c.append_query_string,
    }))
}

impl Redirect {
    fn target(&self, ctx: &Ctx) -> Option<(StatusCode, String)> {
        if self.to_https {
            if ctx.conn.scheme != "http" {
                return None;
            }
            let pq = ctx.req.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let host = host_only(ctx.host_str());
            // As APISIX: 301 for GET and HEAD, 308 (method kept) otherwise.
            let status = match ctx.req.method {
                http::Method::GET | http::Method::HEAD => StatusCode::MOVED_PERMANENTLY,
                _ => StatusCode::PERMANENT_REDIRECT,
            };
            return Some((status, format!("https://{host}{pq}")));
        }
        let mut to = match &self.uri {
            Some(uri) => ctx.render(uri),
            None => match regex_rewrite(&self.regex, ctx.path())? {
                (path, Some(query)) => format!("{path}?{query}"),
                (path, None) => path,
            },
        };
        if self.encode {
            // Only the path: a query in the target stays as written.
            let (path, query) = to
                .split_once('?')
                .map_or((&to[..], None), |(p, q)| (p, Some(q)));
            let mut encoded = turnpike_router::encode_path(path).into_owned();
            if let Some(q) = query {
                encoded.push('?');
                encoded.push_str(q);
            }
            to = encoded;
        }
        if self.append_query {
            if let Some(q) = ctx.req.uri.query().filter(|q| !q.is_empty()) {
                to.push(if to.contains('?') { '&' } else { '?' });
                to.push_str(q);
            }
        }
        Some((self.status, to))
    }
}

impl Plugin for Redirect {
    fn rewrite(&self, ctx: &mut Ctx) -> Flow {
        if self.to_https && ctx.host_str().is_empty() {
            return Flow::Respond(Reply::message(
                StatusCode::BAD_REQUEST,
                "a request without a Host cannot be redirected to HTTPS",
            ));
        }
        let Some((status, to)) = self.target(ctx) else {
            return Flow::Continue;
        };
        match HeaderValue::from_str(&to) {
            Ok(location) => Flow::Respond(Reply::new(status).header(LOCATION, location)),
            Err(_) => Flow::Respond(Reply::message(
                StatusCode::BAD_REQUEST,
                "the redirect target is not a valid URI",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use turnpike_plugin::Phase;

    fn location(conf: Value, uri: &str) -> Option<(u16, String)> {
        let e = entry(NAME, conf);
        run_now(Phase::Rewrite, &e, &mut ctx(uri)).map(|r| {
            (
                r.status.as_u16(),
                r.headers[LOCATION].to_str().unwrap().to_owned(),
            )
        })
    }

    #[test]
    fn to_https_keeps_path_and_query() {
        assert_eq!(
            location(json!({"http_to_https": true}), "/a?b=1").unwrap(),
            (301, "https://example.com/a?b=1".to_owned())
        );
    }

    #[test]
    fn fixed_uri_with_vars_and_query() {
        let conf = json!({"uri": "/new/$arg_id", "ret_code": 307, "append_query_string": true});
        assert_eq!(
            location(conf, "/old?id=5").unwrap(),
            (307, "/new/5?id=5".to_owned())
        );
    }

    #[test]
    fn regex_with_captures_or_no_redirect() {
        let conf = json!({"regex_uri": ["^/blog/(\\d+)$", "/posts/$1"]});
        assert_eq!(
            location(conf.clone(), "/blog/42").unwrap(),
            (302, "/posts/42".to_owned())
        );
        assert!(location(conf, "/other").is_none());
    }

    #[test]
    fn to_https_keeps_the_method_for_posts_and_encoding_spares_the_query() {
        let e = entry(NAME, json!({"http_to_https": true}));
        let r = run_now(Phase::Rewrite, &e, &mut request(http::Request::post("/a"))).unwrap();
        assert_eq!(r.status, 308);
        let conf = json!({"uri": "/a b?x=1", "encode_uri": true, "append_query_string": true});
        assert_eq!(location(conf, "/old?y=2").unwrap().1, "/a%20b?x=1&y=2");
        assert!(!errors(NAME, json!({"uri": "/$nope"})).is_empty());
        assert!(location(json!({"uri": "/a", "http_to_https": false}), "/").is_some());
    }

    #[test]
    fn exactly_one_target() {
        assert!(!errors(NAME, json!({})).is_empty());
        assert!(!errors(NAME, json!({"uri": "/a", "http_to_https": true})).is_empty());
    }
}
