//! `request-id`: makes sure every request carries an id, upstream and back
//! to the client.
//!
//! Turnpike gives every request an id (a UUID v4) whether or not this
//! plugin is on; the plugin names the header and returns it to the client.
//! A client's own id in that header is kept.

use std::sync::Arc;

use http::header::HeaderName;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin};

pub(crate) const NAME: &str = "request-id";
pub(crate) const PRIORITY: i32 = 12015;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "header_name": {"type": "string", "minLength": 1, "default": "X-Request-Id"},
            "include_in_response": {"type": "boolean", "default": true},
            "algorithm": {"type": "string", "enum": ["uuid"], "default": "uuid"}
        },
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    header_name: String,
    include_in_response: bool,
}

struct RequestId {
    header: HeaderName,
    in_response: bool,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    let header = HeaderName::from_bytes(c.header_name.as_bytes())
        .map_err(|_| FieldError::new("header_name", "not a valid header name"))?;
    Ok(Arc::new(RequestId {
        header,
        in_response: c.include_in_response,
    }))
}

impl Plugin for RequestId {
    fn rewrite(&self, ctx: &mut Ctx) -> Flow {
        let id = match ctx.req.headers.get(&self.header) {
            Some(v) => v.clone(),
            None => {
                let id = ctx.request_id.clone();
                ctx.req.headers.insert(self.header.clone(), id.clone());
                id
            }
        };
        if self.in_response {
            ctx.response_headers.insert(self.header.clone(), id);
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use turnpike_plugin::Phase;

    #[test]
    fn gateway_id_goes_both_ways() {
        let e = entry(NAME, json!({"header_name": "X-Trace"}));
        let mut c = ctx("/");
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
        assert_eq!(c.req.headers["x-trace"], "rid-1");
        assert_eq!(c.response_headers["x-trace"], "rid-1");
    }

    #[test]
    fn client_id_is_kept_and_response_can_skip_it() {
        let e = entry(
            NAME,
            json!({"header_name": "X-Trace", "include_in_response": false}),
        );
        let mut c = request(http::Request::get("/").header("x-trace", "mine"));
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
        assert_eq!(c.req.headers["x-trace"], "mine");
        assert!(c.response_headers.is_empty());
    }

    #[test]
    fn other_algorithms_are_refused() {
        assert_eq!(
            errors(NAME, json!({"algorithm": "nanoid"}))[0].path,
            "algorithm"
        );
    }
}
