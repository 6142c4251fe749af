//! `mocking`: answers with a fixed response instead of calling the
//! upstream, for demos, tests and APIs still being built.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin, Reply};

pub(crate) const NAME: &str = "mocking";
pub(crate) const PRIORITY: i32 = 10900;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "delay": {"type": "integer", "minimum": 0, "default": 0},
            "response_status": {"type": "integer", "minimum": 200, "maximum": 599, "default": 200},
            "content_type": {"type": "string", "default": "application/json;charset=utf8"},
            "response_example": {"type": "string"},
            "response_schema": {"type": "object"},
            "with_mock_header": {"type": "boolean", "default": true},
            "response_headers": {"type": "object", "additionalProperties": {"type": "string"}}
        },
        "anyOf": [{"required": ["response_example"]}, {"required": ["response_schema"]}],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    delay: u64,
    response_status: u16,
    content_type: String,
    response_example: Option<String>,
    response_schema: Option<Value>,
    with_mock_header: bool,
    response_headers: Option<Map<String, Value>>,
}

struct Mocking {
    reply: Reply,
    delay: Duration,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    let status = StatusCode::from_u16(c.response_status)
        .map_err(|_| FieldError::new("response_status", "not an HTTP status"))?;
    let body = match (c.response_example, &c.response_schema) {
        (Some(example), _) => example,
        (None, Some(schema)) => example_of(schema).to_string(),
        (None, None) => String::new(),
    };
    let content_type = HeaderValue::from_str(&c.content_type)
        .map_err(|_| FieldError::new("content_type", "not a valid header value"))?;
    let mut reply = Reply::new(status)
        .header(CONTENT_TYPE, content_type)
        .body(body);
    if c.with_mock_header {
        let by = concat!("Turnpike/", env!("CARGO_PKG_VERSION"));
        reply = reply.header(
            HeaderName::from_static("x-mock-by"),
            HeaderValue::from_static(by),
        );
    }
    for (k, v) in c.response_headers.iter().flatten() {
        let at = format!("response_headers.{k}");
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| FieldError::new(&at, "not a valid header name"))?;
        let value = HeaderValue::from_str(v.as_str().unwrap_or_default())
            .map_err(|_| FieldError::new(&at, "not a valid header value"))?;
        reply.headers.insert(name, value);
    }
    Ok(Arc::new(Mocking {
        reply,
        delay: Duration::from_secs(c.delay),
    }))
}

/// A value that fits `schema`: its `example`, `default` or first `enum`
/// value when it has one, else a plain value of its type. Deterministic, so
/// a demo answers the same every time.
fn example_of(schema: &Value) -> Value {
    if let Some(v) = schema.get("example").or_else(|| schema.get("default")) {
        return v.clone();
    }
    if let Some(first) = schema.get("enum").and_then(|e| e.get(0)) {
        return first.clone();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") | None if schema.get("properties").is_some() => {
            let props = schema["properties"].as_object().into_iter().flatten();
            Value::Object(props.map(|(k, s)| (k.clone(), example_of(s))).collect())
        }
        Some("object") => json!({}),
        Some("array") => match schema.get("items") {
            Some(items) => json!([example_of(items)]),
            None => json!([]),
        },
        Some("string") => json!("string"),
        Some("integer") => json!(0),
        Some("number") => json!(0.0),
        Some("boolean") => json!(true),
        _ => Value::Null,
    }
}

impl Plugin for Mocking {
    fn access(&self, _ctx: &mut Ctx) -> Flow {
        let reply = self.reply.clone();
        if self.delay.is_zero() {
            return Flow::Respond(reply);
        }
        let delay = self.delay;
        Flow::Await(Box::pin(async move {
            tokio::time::sleep(delay).await;
            let resume: turnpike_plugin::Resume =
                Box::new(move |_ctx: &mut Ctx| Flow::Respond(reply));
            resume
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use turnpike_plugin::Phase;

    #[test]
    fn fixed_example() {
        let e = entry(
            NAME,
            json!({"response_example": "{\"a\":1}", "response_status": 201, "response_headers": {"x-a": "b"}}),
        );
        let r = run_now(Phase::Access, &e, &mut ctx("/")).unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(body(&r), json!({"a": 1}));
        assert_eq!(r.headers["x-a"], "b");
        assert!(r.headers["x-mock-by"]
            .to_str()
            .unwrap()
            .starts_with("Turnpike/"));
        assert_eq!(r.headers["content-type"], "application/json;charset=utf8");
    }

    #[test]
    fn example_from_schema() {
        let schema = json!({"type": "object", "properties": {
            "id": {"type": "integer"}, "name": {"type": "string", "example": "ann"},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}}
        }});
        let e = entry(
            NAME,
            json!({"response_schema": schema, "with_mock_header": false}),
        );
        let r = run_now(Phase::Access, &e, &mut ctx("/")).unwrap();
        assert_eq!(body(&r), json!({"id": 0, "name": "ann", "tags": ["x"]}));
        assert!(!r.headers.contains_key("x-mock-by"));
    }

    #[tokio::test(start_paused = true)]
    async fn delay_waits_then_answers() {
        let e = entry(NAME, json!({"response_example": "ok", "delay": 2}));
        let started = tokio::time::Instant::now();
        let r = run(Phase::Access, &e, &mut ctx("/")).await.unwrap();
        assert_eq!(r.body, "ok");
        assert!(started.elapsed() >= Duration::from_secs(2));
    }

    #[test]
    fn needs_an_example_or_schema() {
        assert!(!errors(NAME, json!({})).is_empty());
    }
}
