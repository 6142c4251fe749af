//! `fault-injection`: delays or aborts a share of requests, to test how
//! clients and services behave when things go wrong (chaos testing).
//!
//! `delay` waits first, then `abort` answers; each applies only to
//! requests matching its `vars` (a list of expressions, any of which may
//! match) and, with `percentage`, only to that share of them.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use turnpike_plugin::{
    typed, Ctx, Env, Factory, FieldError, Flow, Plugin, Reply, Resume, Template,
};
use turnpike_router::Expr;

pub(crate) const NAME: &str = "fault-injection";
pub(crate) const PRIORITY: i32 = 11000;

fn schema() -> Value {
    let percentage = json!({"type": "integer", "minimum": 0, "maximum": 100});
    let vars = json!({"type": "array", "items": {"type": "array"}});
    json!({
        "type": "object",
        "properties": {
            "abort": {
                "type": "object",
                "properties": {
                    "http_status": {"type": "integer", "minimum": 200, "maximum": 599},
                    "body": {"type": "string"},
                    "headers": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
                    "percentage": percentage,
                    "vars": vars
                },
                "required": ["http_status"],
                "additionalProperties": false
            },
            "delay": {
                "type": "object",
                "properties": {
                    "duration": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
                    "percentage": percentage,
                    "vars": vars
                },
                "required": ["duration"],
                "additionalProperties": false
            }
        },
        "minProperties": 1,
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct AbortConf {
    http_status: u16,
    body: Option<String>,
    headers: Option<Map<String, Value>>,
    percentage: Option<u8>,
    vars: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct DelayConf {
    duration: f64,
    percentage: Option<u8>,
    vars: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct Config {
    abort: Option<AbortConf>,
    delay: Option<DelayConf>,
}

/// When a fault applies: the share of requests and the conditions.
struct When {
    percentage: Option<u8>,
    /// Any one matching is enough; none configured means every request.
    vars: Vec<Expr>,
}

impl When {
    fn new(
        percentage: Option<u8>,
        vars: Option<Vec<Value>>,
        field: &str,
    ) -> Result<When, FieldError> {
        let vars = vars
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, v)| {
                Expr::parse(v, &format!("{field}.vars[{i}]"))
                    .map_err(|e| FieldError::new(e.path, e.message))
            })
            .collect::<Result<_, _>>()?;
        Ok(When { percentage, vars })
    }

    fn holds(&self, ctx: &Ctx) -> bool {
        let matched = self.vars.is_empty() || self.vars.iter().any(|v| v.eval(ctx));
        matched && self.percentage.is_none_or(|p| fastrand::u8(0..100) < p)
    }
}

struct Abort {
    status: StatusCode,
    body: Template,
    headers: Vec<(HeaderName, Template)>,
    when: When,
}

struct FaultInjection {
    abort: Option<Abort>,
    delay: Option<(Duration, When)>,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    let abort = c.abort.map(abort).transpose()?;
    let delay = c
        .delay
        .map(|d| {
            Ok::<_, FieldError>((
                Duration::from_secs_f64(d.duration),
                When::new(d.percentage, d.vars, "delay")?,
            ))
        })
        .transpose()?;
    Ok(Arc::new(FaultInjection { abort, delay }))
}

fn abort(a: AbortConf) -> Result<Abort, FieldError> {
    let body = crate::template(a.body.as_deref().unwrap_or_default(), "abort.body")?;
    let mut headers = Vec::new();
    for (k, v) in a.headers.iter().flatten() {
        let at = format!("abort.headers.{k}");
        let name = crate::header_name(k, &at)?;
        let value = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        headers.push((name, crate::template(&value, &at)?));
    }
    Ok(Abort {
        status: StatusCode::from_u16(a.http_status)
            .map_err(|_| FieldError::new("abort.http_status", "not an HTTP status"))?,
        body,
        headers,
        when: When::new(a.percentage, a.vars, "abort")?,
    })
}

impl Abort {
    fn reply(&self, ctx: &Ctx) -> Reply {
        let mut reply = Reply::new(self.status).body(ctx.render(&self.body));
        for (name, template) in &self.headers {
            if let Ok(v) = HeaderValue::from_str(&ctx.render(template)) {
                reply.headers.insert(name.clone(), v);
            }
        }
        reply
    }
}

impl FaultInjection {
    fn abort_now(&self, ctx: &Ctx) -> Flow {
        match &self.abort {
            Some(a) if a.when.holds(ctx) => Flow::Respond(a.reply(ctx)),
            _ => Flow::Continue,
        }
    }
}

impl Plugin for FaultInjection {
    fn rewrite(&self, ctx: &mut Ctx) -> Flow {
        let Some((duration, when)) = &self.delay else {
            return self.abort_now(ctx);
        };
        if !when.holds(ctx) {
            return self.abort_now(ctx);
        }
        // Whether to abort is decided before the wait (the wait cannot
        // borrow the plugin), and carried through it.
        let aborted = self
            .abort
            .as_ref()
            .filter(|a| a.when.holds(ctx))
            .map(|a| a.reply(ctx));
        let duration = *duration;
        Flow::Await(Box::pin(async move {
            tokio::time::sleep(duration).await;
            let resume: Resume = Box::new(move |_ctx: &mut Ctx| match aborted {
                Some(reply) => Flow::Respond(reply),
                None => Flow::Continue,
            });
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
    fn abort_with_variables_in_body_and_headers() {
        let e = entry(
            NAME,
            json!({"abort": {"http_status": 503, "body": "client $remote_addr\n", "headers": {"x-fault": "$arg_case"}}}),
        );
        let r = run_now(Phase::Rewrite, &e, &mut ctx("/?case=7")).unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "client 10.0.0.1\n");
        assert_eq!(r.headers["x-fault"], "7");
    }

    #[test]
    fn vars_any_of_and_percentage() {
        let conf = json!({"abort": {"http_status": 500, "vars": [[["arg_name", "==", "jack"], ["arg_age", "==", 18]], [["arg_name", "==", "allen"]]]}});
        let e = entry(NAME, conf);
        assert!(run_now(Phase::Rewrite, &e, &mut ctx("/?name=jack&age=18")).is_some());
        assert!(run_now(Phase::Rewrite, &e, &mut ctx("/?name=jack&age=3")).is_none());
        assert!(run_now(Phase::Rewrite, &e, &mut ctx("/?name=allen")).is_some());
        let never = entry(
            NAME,
            json!({"abort": {"http_status": 500, "percentage": 0}}),
        );
        let always = entry(
            NAME,
            json!({"abort": {"http_status": 500, "percentage": 100}}),
        );
        for _ in 0..50 {
            assert!(run_now(Phase::Rewrite, &never, &mut ctx("/")).is_none());
            assert!(run_now(Phase::Rewrite, &always, &mut ctx("/")).is_some());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delay_then_abort() {
        let e = entry(
            NAME,
            json!({"delay": {"duration": 1.5}, "abort": {"http_status": 418}}),
        );
        let started = tokio::time::Instant::now();
        let r = run(Phase::Rewrite, &e, &mut ctx("/")).await.unwrap();
        assert_eq!(r.status, 418);
        assert!(started.elapsed() >= Duration::from_millis(1500));
        let only_delay = entry(NAME, json!({"delay": {"duration": 0.2}}));
        assert!(run(Phase::Rewrite, &only_delay, &mut ctx("/"))
            .await
            .is_none());
    }

    #[test]
    fn bad_configs_are_named() {
        assert!(!errors(NAME, json!({})).is_empty());
        assert_eq!(
            errors(
                NAME,
                json!({"abort": {"http_status": 500, "vars": [[["nope", "==", 1]]]}})
            )[0]
            .path,
            "abort.vars[0][0][0]"
        );
        assert_eq!(
            errors(
                NAME,
                json!({"abort": {"http_status": 500, "body": "$nope"}})
            )[0]
            .path,
            "abort.body"
        );
        assert!(!errors(NAME, json!({"delay": {"duration": 0}})).is_empty());
    }
}
