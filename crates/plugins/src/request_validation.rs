//! `request-validation`: checks request headers and body against JSON
//! Schemas before the request goes anywhere; a request that fails gets the
//! reason (or `rejected_msg`) with `rejected_code`.

use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin, Reply};
use turnpike_router::decode_component;

pub(crate) const NAME: &str = "request-validation";
pub(crate) const PRIORITY: i32 = 2800;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "header_schema": {"type": "object"},
            "body_schema": {"type": "object"},
            "rejected_code": {"type": "integer", "minimum": 200, "maximum": 599, "default": 400},
            "rejected_msg": {"type": "string", "minLength": 1, "maxLength": 256}
        },
        "anyOf": [{"required": ["header_schema"]}, {"required": ["body_schema"]}],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    header_schema: Option<Value>,
    body_schema: Option<Value>,
    rejected_code: u16,
    rejected_msg: Option<String>,
}

struct RequestValidation {
    headers: Option<jsonschema::Validator>,
    body: Option<jsonschema::Validator>,
    status: StatusCode,
    message: Option<String>,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

fn validator(
    schema: Option<Value>,
    field: &str,
) -> Result<Option<jsonschema::Validator>, FieldError> {
    schema
        .map(|s| {
            turnpike_plugin::validator(&s)
                .map_err(|e| FieldError::new(field, format!("not a valid JSON Schema: {e}")))
        })
        .transpose()
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    Ok(Arc::new(RequestValidation {
        headers: validator(c.header_schema, "header_schema")?,
        body: validator(c.body_schema, "body_schema")?,
        status: StatusCode::from_u16(c.rejected_code)
            .map_err(|_| FieldError::new("rejected_code", "not an HTTP status"))?,
        message: c.rejected_msg,
    }))
}

/// The request headers as a JSON object, names lower-cased.
fn header_object(ctx: &Ctx) -> Value {
    let mut map = Map::new();
    for (name, value) in &ctx.req.headers {
        if let Ok(v) = value.to_str() {
            map.entry(name.as_str())
                .or_insert_with(|| Value::String(v.to_owned()));
        }
    }
    Value::Object(map)
}

/// The body as JSON: form fields for a urlencoded form, JSON otherwise;
/// nothing sent is `null`.
fn body_value(ctx: &Ctx) -> Result<Value, String> {
    let body = ctx.body.as_deref().unwrap_or_default();
    if body.is_empty() {
        return Ok(Value::Null);
    }
    let form = ctx.header(CONTENT_TYPE.as_str()).is_some_and(|t| {
        t.to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded")
    });
    if form {
        let text =
            std::str::from_utf8(body).map_err(|_| "the form body is not UTF-8".to_owned())?;
        let mut map = Map::new();
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let value = Value::String(decode_component(v).into_owned());
            map.entry(decode_component(k).into_owned()).or_insert(value);
        }
        return Ok(Value::Object(map));
    }
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

impl RequestValidation {
    fn reject(&self, reason: String) -> Flow {
        let text = self.message.clone().unwrap_or(reason);
        Flow::Respond(
            Reply::new(self.status)
                .header(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                )
                .body(text),
        )
    }
}

fn first_error(v: &jsonschema::Validator, value: &Value) -> Option<String> {
    v.iter_errors(value).next().map(|e| {
        let at = e.instance_path.to_string();
        if at.is_empty() {
            e.to_string()
        } else {
            format!("{at}: {e}")
        }
    })
}

impl Plugin for RequestValidation {
    fn rewrite(&self, ctx: &mut Ctx) -> Flow {
        if let Some(v) = &self.headers {
            if let Some(e) = first_error(v, &header_object(ctx)) {
                return self.reject(format!("header does not match the schema: {e}"));
            }
        }
        if let Some(v) = &self.body {
            let body = match body_value(ctx) {
                Ok(b) => b,
                Err(e) => return self.reject(e),
            };
            if let Some(e) = first_error(v, &body) {
                return self.reject(format!("body does not match the schema: {e}"));
            }
        }
        Flow::Continue
    }

    fn reads_request_body(&self) -> bool {
        self.body.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use turnpike_plugin::Phase;

    fn post(body: &str, content_type: &str) -> Ctx {
        let mut c = request(http::Request::post("/").header("content-type", content_type));
        c.body = Some(bytes::Bytes::from(body.to_owned()));
        c
    }

    fn body_rule() -> turnpike_plugin::Entry {
        entry(
            NAME,
            json!({"body_schema": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}
            }}),
        )
    }

    fn text(r: &Reply) -> String {
        String::from_utf8(r.body.to_vec()).unwrap()
    }

    #[test]
    fn valid_body_passes() {
        assert!(run_now(
            Phase::Rewrite,
            &body_rule(),
            &mut post(r#"{"name":"a","age":3}"#, "application/json")
        )
        .is_none());
        assert!(body_rule().plugin.reads_request_body());
    }

    #[test]
    fn invalid_bodies_get_400_with_the_reason() {
        let r = run_now(
            Phase::Rewrite,
            &body_rule(),
            &mut post(r#"{"age":-1}"#, "application/json"),
        )
        .unwrap();
        assert_eq!(r.status, 400);
        assert!(
            text(&r).contains("body does not match the schema"),
            "{}",
            text(&r)
        );
        let r = run_now(
            Phase::Rewrite,
            &body_rule(),
            &mut post("{oops", "application/json"),
        )
        .unwrap();
        assert!(text(&r).starts_with("invalid JSON body"));
        let r = run_now(Phase::Rewrite, &body_rule(), &mut ctx("/")).unwrap();
        assert_eq!(r.status, 400);
    }

    #[test]
    fn form_bodies_are_fields() {
        assert!(run_now(
            Phase::Rewrite,
            &body_rule(),
            &mut post("name=a+b&x=%21", "application/x-www-form-urlencoded")
        )
        .is_none());
    }

    #[test]
    fn headers_and_custom_answer() {
        let e = entry(
            NAME,
            json!({
                "header_schema": {"type": "object", "required": ["x-token"]},
                "rejected_code": 422, "rejected_msg": "bad request headers"
            }),
        );
        let r = run_now(Phase::Rewrite, &e, &mut ctx("/")).unwrap();
        assert_eq!(
            (r.status.as_u16(), text(&r).as_str()),
            (422, "bad request headers")
        );
        let mut c = request(http::Request::get("/").header("x-token", "t"));
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
    }

    #[test]
    fn bad_schemas_are_refused() {
        assert_eq!(
            errors(NAME, json!({"body_schema": {"type": 12}}))[0].path,
            "body_schema"
        );
    }
}
