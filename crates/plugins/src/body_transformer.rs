//! `body-transformer`: reshapes JSON request and response bodies, for API
//! versioning: rename, remove and add fields, so old clients and new
//! services (or the reverse) understand each other.
//!
//! Turnpike's own fields (APISIX's plugin of this name uses Lua templates,
//! which Turnpike does not run):
//!
//! ```yaml
//! body-transformer:
//!   request:
//!     rename: {user_data: user}        # dotted paths reach into objects
//!     remove: [debug]
//!     add: {api_version: v2, client: $remote_addr}
//!   response:
//!     rename: {user: user_data}
//!   reject_invalid_json: false
//! ```
//!
//! Operations apply in the order rename, remove, add. Bodies that are not
//! JSON (by `Content-Type`) pass untouched; a JSON request body that does
//! not parse gets 400 only with `reject_invalid_json`.

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Head, Plugin, Reply, Template};

pub(crate) const NAME: &str = "body-transformer";
pub(crate) const PRIORITY: i32 = 1080;

fn schema() -> Value {
    let ops = json!({
        "type": "object",
        "properties": {
            "rename": {"type": "object", "additionalProperties": {"type": "string", "minLength": 1}},
            "remove": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "add": {"type": "object"}
        },
        "additionalProperties": false
    });
    json!({
        "type": "object",
        "properties": {
            "request": ops,
            "response": ops,
            "reject_invalid_json": {"type": "boolean", "default": false}
        },
        "anyOf": [{"required": ["request"]}, {"required": ["response"]}],
        "additionalProperties": false
    })
}

#[derive(Deserialize, Default)]
struct Ops {
    #[serde(default)]
    rename: Map<String, Value>,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    add: Map<String, Value>,
}

#[derive(Deserialize)]
struct Config {
    request: Option<Ops>,
    response: Option<Ops>,
    reject_invalid_json: bool,
}

/// One side's operations, ready to run: `add`'s strings with variables
/// parsed once.
struct Edits {
    rename: Vec<(String, String)>,
    remove: Vec<String>,
    add: Vec<(String, Added)>,
}

/// A value `add` puts in.
enum Added {
    Json(Value),
    Text(Template),
}

struct BodyTransformer {
    request: Option<Edits>,
    response: Option<Edits>,
    reject_invalid_json: bool,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    Ok(Arc::new(BodyTransformer {
        request: c.request.map(|o| edits(o, "request")).transpose()?,
        response: c.response.map(|o| edits(o, "response")).transpose()?,
        reject_invalid_json: c.reject_invalid_json,
    }))
}

fn edits(ops: Ops, side: &str) -> Result<Edits, FieldError> {
    let rename = ops
        .rename
        .into_iter()
        .map(|(from, to)| (from, to.as_str().unwrap_or_default().to_owned()))
        .collect();
    let mut add = Vec::new();
    for (path, v) in ops.add {
        let value = match v {
            Value::String(s) => Added::Text(crate::template(&s, &format!("{side}.add.{path}"))?),
            v => Added::Json(v),
        };
        add.push((path, value));
    }
    Ok(Edits {
        rename,
        remove: ops.remove,
        add,
    })
}

fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|t| {
        let t = t
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        t == "application/json" || t.ends_with("+json")
    })
}

impl Edits {
    fn apply(&self, ctx: &Ctx, doc: &mut Value) {
        for (from, to) in &self.rename {
            if let Some(v) = take(doc, from) {
                put(doc, to, v);
            }
        }
        for path in &self.remove {
            take(doc, path);
        }
        for (path, v) in &self.add {
            let v = match v {
                Added::Text(t) => Value::String(ctx.render(t)),
                Added::Json(v) => v.clone(),
            };
            put(doc, path, v);
        }
    }

    /// The body transformed; `Err` when it is not JSON.
    fn transform(&self, ctx: &Ctx, body: &[u8]) -> Result<Bytes, serde_json::Error> {
        let mut doc: Value = serde_json::from_slice(body)?;
        self.apply(ctx, &mut doc);
        Ok(Bytes::from(doc.to_string()))
    }
}

/// Removes the value at a dotted path.
fn take(doc: &mut Value, path: &str) -> Option<Value> {
    let (parent, last) = match path.rsplit_once('.') {
        Some((p, l)) => (walk(doc, p, false)?, l),
        None => (doc, path),
    };
    parent.as_object_mut()?.remove(last)
}

/// Sets the value at a dotted path, making the objects on the way.
fn put(doc: &mut Value, path: &str, v: Value) {
    let (parent, last) = match path.rsplit_once('.') {
        Some((p, l)) => match walk(doc, p, true) {
            Some(parent) => (parent, l),
            None => return,
        },
        None => (doc, path),
    };
    if let Some(map) = parent.as_object_mut() {
        map.insert(last.to_owned(), v);
    }
}

fn walk<'a>(doc: &'a mut Value, path: &str, create: bool) -> Option<&'a mut Value> {
    let mut at = doc;
    for key in path.split('.') {
        let map = at.as_object_mut()?;
        if create && !map.contains_key(key) {
            map.insert(key.to_owned(), Value::Object(Map::new()));
        }
        at = map.get_mut(key)?;
    }
    Some(at)
}

impl Plugin for BodyTransformer {
    fn rewrite(&self, ctx: &mut Ctx) -> Flow {
        let Some(ops) = &self.request else {
            return Flow::Continue;
        };
        if !is_json(ctx.header(CONTENT_TYPE.as_str())) {
            return Flow::Continue;
        }
        let Some(body) = ctx.body.as_ref().filter(|b| !b.is_empty()) else {
            return Flow::Continue;
        };
        match ops.transform(ctx, body) {
            Ok(b) => ctx.body = Some(b),
            Err(e) if self.reject_invalid_json => {
                return Flow::Respond(Reply::message(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid JSON in request body: {e}"),
                ))
            }
            Err(_) => {}
        }
        Flow::Continue
    }

    fn reads_request_body(&self) -> bool {
        self.request.is_some()
    }

    fn wants_response_body(&self, _ctx: &Ctx, head: &Head) -> bool {
        let content_type = head.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
        // A compressed body is left alone: Turnpike does not decompress.
        let encoded = head.headers.contains_key(http::header::CONTENT_ENCODING);
        self.response.is_some() && is_json(content_type) && !encoded
    }

    fn body_filter(&self, ctx: &mut Ctx, body: &mut Bytes) {
        if let Some(ops) = &self.response {
            if let Ok(b) = ops.transform(ctx, body) {
                *body = b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use turnpike_plugin::Phase;

    fn post(body: &str, content_type: &str) -> Ctx {
        let mut c = request(http::Request::post("/").header("content-type", content_type));
        c.body = Some(Bytes::from(body.to_owned()));
        c
    }

    fn doc(c: &Ctx) -> Value {
        serde_json::from_slice(c.body.as_ref().unwrap()).unwrap()
    }

    #[test]
    fn request_rename_remove_add() {
        let e = entry(
            NAME,
            json!({"request": {
                "rename": {"user_data": "user", "meta.old": "meta.new"},
                "remove": ["debug"],
                "add": {"api_version": "v2", "client.ip": "$remote_addr", "n": 3}
            }}),
        );
        let mut c = post(
            r#"{"user_data":{"id":1},"debug":true,"meta":{"old":1}}"#,
            "application/json",
        );
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
        assert_eq!(
            doc(&c),
            json!({"user": {"id": 1}, "meta": {"new": 1}, "api_version": "v2", "client": {"ip": "10.0.0.1"}, "n": 3})
        );
    }

    #[test]
    fn non_json_passes_and_invalid_json_only_refused_when_asked() {
        let lenient = entry(NAME, json!({"request": {"remove": ["a"]}}));
        let mut c = post("a=1", "application/x-www-form-urlencoded");
        assert!(run_now(Phase::Rewrite, &lenient, &mut c).is_none());
        assert_eq!(c.body.as_deref().unwrap(), b"a=1");
        let mut c = post("{bad", "application/json");
        assert!(run_now(Phase::Rewrite, &lenient, &mut c).is_none());
        assert_eq!(c.body.as_deref().unwrap(), b"{bad");
        let strict = entry(
            NAME,
            json!({"request": {"remove": ["a"]}, "reject_invalid_json": true}),
        );
        let r = run_now(
            Phase::Rewrite,
            &strict,
            &mut post("{bad", "application/json"),
        )
        .unwrap();
        assert_eq!(r.status, 400);
    }

    #[test]
    fn response_bodies() {
        let e = entry(NAME, json!({"response": {"rename": {"user": "user_data"}}}));
        let mut c = ctx("/");
        let mut head = Head::default();
        head.headers.insert(
            "content-type",
            http::HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(e.plugin.wants_response_body(&c, &head));
        let mut body = Bytes::from_static(br#"{"user":"ann"}"#);
        e.plugin.body_filter(&mut c, &mut body);
        assert_eq!(&body[..], br#"{"user_data":"ann"}"#);
        head.headers
            .insert("content-type", http::HeaderValue::from_static("text/html"));
        assert!(!e.plugin.wants_response_body(&c, &head));
    }
}
