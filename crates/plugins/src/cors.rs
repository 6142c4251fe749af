//! `cors`: Cross-Origin Resource Sharing headers, and answers to preflight
//! requests.
//!
//! As in APISIX, every `OPTIONS` request on the route is answered 200 by
//! the gateway; CORS headers go on any response whose `Origin` is allowed,
//! and on none otherwise (the browser then refuses it).

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use regex::Regex;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin, Reply};

pub(crate) const NAME: &str = "cors";
pub(crate) const PRIORITY: i32 = 4000;

const ALL_METHODS: &str = "GET,POST,PUT,DELETE,PATCH,HEAD,OPTIONS,CONNECT,TRACE";

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "allow_origins": {"type": "string", "pattern": "^(\\*|\\*\\*|null|\\w+://[^,]+(,\\w+://[^,]+)*)$", "default": "*"},
            "allow_methods": {"type": "string", "default": "*"},
            "allow_headers": {"type": "string", "default": "*"},
            "expose_headers": {"type": "string"},
            "max_age": {"type": "integer", "default": 5},
            "allow_credential": {"type": "boolean", "default": false},
            "allow_origins_by_regex": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}
        },
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    allow_origins: String,
    allow_methods: String,
    allow_headers: String,
    expose_headers: Option<String>,
    max_age: i64,
    allow_credential: bool,
    allow_origins_by_regex: Option<Vec<String>>,
}

struct Cors {
    origins: Origins,
    regexes: Vec<Regex>,
    methods: HeaderValue,
    /// `None` echoes the request's `Access-Control-Request-Headers` (`**`).
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: HeaderValue,
    credential: bool,
}

enum Origins {
    /// `*`: any origin, answered with `*`.
    Any,
    /// `**`: any origin, echoed (allowed with credentials).
    Echo,
    List(Vec<String>),
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

fn value(field: &str, s: &str) -> Result<HeaderValue, FieldError> {
    HeaderValue::from_str(s).map_err(|_| FieldError::new(field, "not a valid header value"))
}

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    if c.allow_credential {
        let stars = [
            ("allow_origins", Some(&c.allow_origins)),
            ("allow_methods", Some(&c.allow_methods)),
            ("allow_headers", Some(&c.allow_headers)),
            ("expose_headers", c.expose_headers.as_ref()),
        ];
        if let Some((field, _)) = stars.iter().find(|(_, v)| v.is_some_and(|v| v == "*")) {
            return Err(FieldError::new(
                *field,
                "you can not set '*' for other option when 'allow_credential' is true",
            ));
        }
    }
    let origins = match c.allow_origins.as_str() {
        "*" => Origins::Any,
        "**" => Origins::Echo,
        list => Origins::List(list.split(',').map(|s| s.trim().to_owned()).collect()),
    };
    let regexes = c
        .allow_origins_by_regex
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            env.regex(r)
                .map_err(|e| FieldError::new(format!("allow_origins_by_regex[{i}]"), e))
        })
        .collect::<Result<_, _>>()?;
    let methods = if c.allow_methods == "**" {
        ALL_METHODS
    } else {
        &c.allow_methods
    };
    Ok(Arc::new(Cors {
        origins,
        regexes,
        methods: value("allow_methods", methods)?,
        headers: match c.allow_headers.as_str() {
            "**" => None,
            h => Some(value("allow_headers", h)?),
        },
        expose: c
            .expose_headers
            .as_deref()
            .map(|e| value("expose_headers", e))
            .transpose()?,
        max_age: HeaderValue::from(c.max_age),
        credential: c.allow_credential,
    }))
}

impl Cors {
    /// The `Access-Control-Allow-Origin` for this request, if it is allowed.
    fn allowed(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        match (&self.origins, origin) {
            (Origins::Any, _) => Some(HeaderValue::from_static("*")),
            (Origins::Echo, Some(o)) => Some(o.clone()),
            (Origins::Echo, None) => Some(HeaderValue::from_static("*")),
            (Origins::List(list), Some(o)) => {
                let text = o.to_str().ok()?;
                let listed =
                    list.iter().any(|l| l == text) || self.regexes.iter().any(|r| r.is_match(text));
                listed.then(|| o.clone())
            }
            (Origins::List(_), None) => None,
        }
    }
}

impl Plugin for Cors {
    fn rewrite(&self, ctx: &mut Ctx) -> Flow {
        if let Some(allow) = self.allowed(ctx.req.headers.get(header::ORIGIN)) {
            let echo = ctx
                .req
                .headers
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .cloned();
            let h = &mut ctx.response_headers;
            if allow != "*" {
                h.append(header::VARY, HeaderValue::from_static("Origin"));
            }
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
            h.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
            let headers = self
                .headers
                .clone()
                .or(echo)
                .unwrap_or(HeaderValue::from_static("*"));
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, headers);
            if let Some(e) = &self.expose {
                h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
            }
            if self.credential {
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
        }
        if ctx.req.method == Method::OPTIONS {
            return Flow::Respond(Reply::new(StatusCode::OK));
        }
        Flow::Continue
    }
}

/// For tests: the CORS headers a request would get.
#[cfg(test)]
fn cors_headers(
    conf: Value,
    origin: Option<&str>,
    method: &str,
) -> (Option<Reply>, http::HeaderMap) {
    let e = crate::test_util::entry(NAME, conf);
    let mut b = http::Request::builder().method(method).uri("/");
    if let Some(o) = origin {
        b = b.header("origin", o);
    }
    let mut c = crate::test_util::request(b.header("access-control-request-headers", "x-a,x-b"));
    let r = crate::test_util::run_now(turnpike_plugin::Phase::Rewrite, &e, &mut c);
    (r, c.response_headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::errors;

    #[test]
    fn defaults_allow_any_origin() {
        let (r, h) = cors_headers(json!({}), Some("http://a.com"), "GET");
        assert!(r.is_none());
        assert_eq!(h["access-control-allow-origin"], "*");
        assert_eq!(h["access-control-allow-methods"], "*");
        assert_eq!(h["access-control-max-age"], "5");
        assert!(!h.contains_key("vary"));
    }

    #[test]
    fn preflight_is_answered_200() {
        let conf = json!({"allow_origins": "http://a.com", "allow_methods": "GET,POST", "allow_headers": "**", "max_age": 60});
        let (r, h) = cors_headers(conf, Some("http://a.com"), "OPTIONS");
        assert_eq!(r.unwrap().status, 200);
        assert_eq!(h["access-control-allow-origin"], "http://a.com");
        assert_eq!(h["access-control-allow-methods"], "GET,POST");
        assert_eq!(h["access-control-allow-headers"], "x-a,x-b");
        assert_eq!(h["vary"], "Origin");
    }

    #[test]
    fn refused_origin_gets_no_headers() {
        let conf = json!({"allow_origins": "http://a.com,http://b.com"});
        let (_, h) = cors_headers(conf.clone(), Some("http://evil.com"), "GET");
        assert!(h.is_empty());
        let (r, h) = cors_headers(conf, Some("http://evil.com"), "OPTIONS");
        assert_eq!(r.unwrap().status, 200);
        assert!(h.is_empty());
    }

    #[test]
    fn regex_origins_and_credentials() {
        let conf = json!({
            "allow_origins": "http://a.com", "allow_origins_by_regex": ["^https://.*\\.example\\.org$"],
            "allow_methods": "**", "allow_headers": "x-a", "allow_credential": true, "expose_headers": "x-id"
        });
        let (_, h) = cors_headers(conf, Some("https://api.example.org"), "GET");
        assert_eq!(h["access-control-allow-origin"], "https://api.example.org");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["access-control-allow-methods"], ALL_METHODS);
        assert_eq!(h["access-control-expose-headers"], "x-id");
    }

    #[test]
    fn double_star_echoes_the_origin() {
        let conf = json!({"allow_origins": "**", "allow_methods": "GET", "allow_headers": "x", "allow_credential": true});
        let (_, h) = cors_headers(conf, Some("http://any.com"), "GET");
        assert_eq!(h["access-control-allow-origin"], "http://any.com");
    }

    #[test]
    fn star_with_credentials_is_refused() {
        let e = errors(NAME, json!({"allow_credential": true}));
        assert_eq!(e[0].path, "allow_origins");
        assert!(e[0].message.contains("'*'"));
        let e = errors(NAME, json!({"allow_origins_by_regex": ["("]}));
        assert_eq!(e[0].path, "allow_origins_by_regex[0]");
    }
}
