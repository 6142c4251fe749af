//! `redirect`: answers with a redirect: to HTTPS, to a fixed URI (with
//! variables), or to one made by a regex with captures.

use std::sync::Arc;

use http::header::{HeaderValue, LOCATION};
use http::StatusCode;
use regex::Regex;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{host_only, typed, Ctx, Env, Factory, FieldError, Flow, Plugin, Reply};

use crate::proxy_rewrite::{regex_pairs, regex_rewrite};

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
        "oneOf": [{"required": ["uri"]}, {"required": ["regex_uri"]}, {"required": ["http_to_https"]}],
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
    uri: Option<String>,
    regex: Vec<(Regex, String)>,
    status: StatusCode,
    encode: bool,
    append_query: bool,
}

pub(crate) fn factory() -> Factory {
    Factory {
        name: NAME,
        priority: PRIORITY,
        schema,
        consumer_schema: None,
        build,
        credentials: None,
    }
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    Ok(Arc::new(Redirect {
        to_https: c.http_to_https.unwrap_or(false),
        regex: regex_pairs(c.regex_uri.as_deref().unwrap_or_default(), "regex_uri")?,
        uri: c.uri,
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
            return Some((StatusCode::MOVED_PERMANENTLY, format!("https://{host}{pq}")));
        }
        let mut to = match &self.uri {
            Some(uri) => ctx.expand(uri),
            None => regex_rewrite(&self.regex, ctx.path())?,
        };
        if self.encode {
            to = turnpike_router::encode_path(&to).into_owned();
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
    fn exactly_one_target() {
        assert!(!errors(NAME, json!({})).is_empty());
        assert!(!errors(NAME, json!({"uri": "/a", "http_to_https": true})).is_empty());
    }
}
