//! `consumer-restriction`: lets through, or keeps out, requests by who the
//! consumer is (or by route or service), and limits methods per consumer.

use std::sync::Arc;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin, Reply};

pub(crate) const NAME: &str = "consumer-restriction";
pub(crate) const PRIORITY: i32 = 2400;

fn schema() -> Value {
    let list = json!({"type": "array", "minItems": 1, "items": {"type": "string"}});
    json!({
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": ["consumer_name", "consumer_group_id", "service_id", "route_id"], "default": "consumer_name"},
            "whitelist": list,
            "blacklist": list,
            "rejected_code": {"type": "integer", "minimum": 200, "default": 403},
            "rejected_msg": {"type": "string"},
            "allowed_by_methods": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "user": {"type": "string"},
                        "methods": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE"]}}
                    },
                    "required": ["user", "methods"],
                    "additionalProperties": false
                }
            }
        },
        "anyOf": [{"required": ["whitelist"]}, {"required": ["blacklist"]}, {"required": ["allowed_by_methods"]}],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Methods {
    user: String,
    methods: Vec<String>,
}

#[derive(Deserialize)]
struct Config {
    r#type: String,
    whitelist: Option<Vec<String>>,
    blacklist: Option<Vec<String>>,
    rejected_code: u16,
    rejected_msg: Option<String>,
    allowed_by_methods: Option<Vec<Methods>>,
}

struct ConsumerRestriction {
    conf: Config,
    status: StatusCode,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let conf: Config = typed(config)?;
    let status = StatusCode::from_u16(conf.rejected_code)
        .map_err(|_| FieldError::new("rejected_code", "not an HTTP status"))?;
    Ok(Arc::new(ConsumerRestriction { conf, status }))
}

impl ConsumerRestriction {
    /// What the rule is about for this request, by `type`.
    fn subject<'a>(&self, ctx: &'a Ctx) -> Option<&'a str> {
        match self.conf.r#type.as_str() {
            "consumer_group_id" => ctx.consumer.as_ref().and_then(|c| c.group_id.as_deref()),
            "service_id" => ctx.service_id.as_deref(),
            "route_id" => ctx.route_id.as_deref(),
            _ => ctx.consumer.as_ref().map(|c| &*c.username),
        }
    }

    fn reject(&self) -> Flow {
        let text = format!("The {} is forbidden.", self.conf.r#type);
        let msg = self.conf.rejected_msg.as_deref().unwrap_or(&text);
        Flow::Respond(Reply::message(self.status, msg))
    }

    fn method_allowed(&self, ctx: &Ctx) -> bool {
        let Some(rules) = &self.conf.allowed_by_methods else {
            return true;
        };
        let user = ctx.consumer.as_ref().map(|c| &*c.username);
        match rules.iter().find(|r| Some(r.user.as_str()) == user) {
            Some(r) => r.methods.iter().any(|m| m == ctx.req.method.as_str()),
            None => true,
        }
    }
}

impl Plugin for ConsumerRestriction {
    fn access(&self, ctx: &mut Ctx) -> Flow {
        let Some(subject) = self.subject(ctx) else {
            let text = match self.conf.r#type.as_str() {
                "consumer_name" => "Missing authentication or identity verification.".to_owned(),
                t => format!("The request is rejected, please check the {t} for this request"),
            };
            return Flow::Respond(Reply::message(StatusCode::UNAUTHORIZED, &text));
        };
        let listed = |l: &Option<Vec<String>>| l.as_ref().map(|l| l.iter().any(|x| x == subject));
        if listed(&self.conf.blacklist) == Some(true) || listed(&self.conf.whitelist) == Some(false)
        {
            return self.reject();
        }
        if !self.method_allowed(ctx) {
            return self.reject();
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use turnpike_plugin::Phase;

    fn as_user(user: Option<&str>, method: &str) -> Ctx {
        let mut c = request(http::Request::builder().method(method).uri("/"));
        c.consumer = user.map(consumer);
        c.route_id = Some("r1".into());
        c
    }

    fn status(conf: Value, user: Option<&str>, method: &str) -> Option<(u16, Value)> {
        let e = entry(NAME, conf);
        run_now(Phase::Access, &e, &mut as_user(user, method))
            .map(|r| (r.status.as_u16(), body(&r)))
    }

    #[test]
    fn whitelist_admits_only_its_consumers() {
        let conf = json!({"whitelist": ["jack"]});
        assert!(status(conf.clone(), Some("jack"), "GET").is_none());
        assert_eq!(
            status(conf.clone(), Some("rose"), "GET").unwrap(),
            (403, json!({"message": "The consumer_name is forbidden."}))
        );
        assert_eq!(status(conf, None, "GET").unwrap().0, 401);
    }

    #[test]
    fn blacklist_keeps_out_with_custom_answer() {
        let conf = json!({"blacklist": ["rose"], "rejected_code": 429, "rejected_msg": "go away"});
        assert!(status(conf.clone(), Some("jack"), "GET").is_none());
        assert_eq!(
            status(conf, Some("rose"), "GET").unwrap(),
            (429, json!({"message": "go away"}))
        );
    }

    #[test]
    fn methods_per_consumer() {
        let conf = json!({"allowed_by_methods": [{"user": "jack", "methods": ["GET"]}]});
        assert!(status(conf.clone(), Some("jack"), "GET").is_none());
        assert_eq!(status(conf.clone(), Some("jack"), "POST").unwrap().0, 403);
        assert!(status(conf, Some("rose"), "POST").is_none());
    }

    #[test]
    fn by_route_id() {
        let conf = json!({"type": "route_id", "blacklist": ["r1"]});
        assert_eq!(
            status(conf, Some("jack"), "GET").unwrap(),
            (403, json!({"message": "The route_id is forbidden."}))
        );
    }

    #[test]
    fn a_list_is_required() {
        assert!(!errors(NAME, json!({"type": "consumer_name"})).is_empty());
    }
}
