//! `response-rewrite`: changes the response the client gets: status,
//! headers, body, optionally only when a `vars` condition holds.

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Head, Plugin};
use turnpike_router::Expr;

use crate::headers::HeaderOps;

pub(crate) const NAME: &str = "response-rewrite";
pub(crate) const PRIORITY: i32 = 899;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "status_code": {"type": "integer", "minimum": 200, "maximum": 598},
            "body": {"type": "string"},
            "body_base64": {"type": "boolean", "default": false},
            "headers": crate::headers::schema(),
            "vars": {"type": "array"}
        },
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    status_code: Option<u16>,
    body: Option<String>,
    body_base64: bool,
    headers: Option<Value>,
    vars: Option<Value>,
}

struct ResponseRewrite {
    status: Option<StatusCode>,
    body: Option<Bytes>,
    headers: HeaderOps,
    vars: Option<Expr>,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    let body = match (c.body, c.body_base64) {
        (Some(b), true) => Some(Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|_| FieldError::new("body", "not valid base64 (body_base64 is true)"))?,
        )),
        (Some(b), false) => Some(Bytes::from(b)),
        (None, _) => None,
    };
    let vars = c
        .vars
        .map(|v| Expr::parse(&v, "vars").map_err(|e| FieldError::new(e.path, e.message)))
        .transpose()?;
    Ok(Arc::new(ResponseRewrite {
        status: c.status_code.and_then(|s| StatusCode::from_u16(s).ok()),
        body,
        headers: HeaderOps::parse(c.headers.as_ref(), "headers")?,
        vars,
    }))
}

impl Plugin for ResponseRewrite {
    fn header_filter(&self, ctx: &mut Ctx, head: &mut Head) {
        if self.vars.as_ref().is_some_and(|v| !v.eval(ctx)) {
            return;
        }
        if let Some(s) = self.status {
            head.status = s;
            ctx.status = Some(s);
        }
        self.headers.apply(ctx, &mut head.headers);
        if let Some(b) = &self.body {
            head.body = Some(b.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    fn filter(conf: Value, status: u16) -> Head {
        let e = entry(NAME, conf);
        let mut c = ctx("/");
        c.status = Some(StatusCode::from_u16(status).unwrap());
        let mut head = Head {
            status: StatusCode::from_u16(status).unwrap(),
            ..Head::default()
        };
        head.headers
            .insert("x-old", http::HeaderValue::from_static("1"));
        e.plugin.header_filter(&mut c, &mut head);
        head
    }

    #[test]
    fn status_headers_body() {
        let h = filter(
            json!({"status_code": 201, "body": "{\"ok\":true}", "headers": {"set": {"x-new": "2"}, "remove": ["x-old"]}}),
            200,
        );
        assert_eq!(h.status, 201);
        assert_eq!(h.headers["x-new"], "2");
        assert!(!h.headers.contains_key("x-old"));
        assert_eq!(h.body.unwrap(), "{\"ok\":true}");
    }

    #[test]
    fn base64_body() {
        let h = filter(json!({"body": "aGVsbG8=", "body_base64": true}), 200);
        assert_eq!(h.body.unwrap(), "hello");
        assert_eq!(
            errors(NAME, json!({"body": "!!", "body_base64": true}))[0].path,
            "body"
        );
    }

    #[test]
    fn only_when_vars_match() {
        let conf = json!({"body": "hidden", "vars": [["status", "==", 500]]});
        assert!(filter(conf.clone(), 200).body.is_none());
        assert_eq!(filter(conf, 500).body.unwrap(), "hidden");
    }
}
