//! `api-breaker`: a circuit breaker per route. After `unhealthy.failures`
//! answers with an unhealthy status, the breaker opens: requests are
//! answered at once (`break_response_code`) without touching the upstream,
//! for 2 s, then 4 s, 8 s... as failures keep coming (2^(failures seen /
//! `unhealthy.failures`) seconds, at most `max_breaker_sec`), exactly as
//! APISIX counts. When the open time is over the breaker is half-open:
//! requests go through again; `healthy.successes` healthy answers close it,
//! further failures open it for longer.
//!
//! Beyond APISIX, `fallback` answers better than the break response while
//! the breaker is open: the last good response to the same request
//! (`fallback.cache`), or another upstream (`fallback.upstream_id` /
//! `fallback.upstream`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{
    typed, Ctx, Env, Factory, FieldError, Flow, Head, Index, Plugin, Reply, Template,
};

use crate::headers::HeaderOps;
use crate::response_store::{self, Store, Stored};

pub(crate) const NAME: &str = "api-breaker";
pub(crate) const PRIORITY: i32 = 1005;

static FALLBACK: HeaderName = HeaderName::from_static("x-turnpike-fallback");

fn schema() -> Value {
    let statuses = |min: u16, max: u16, default: u16| {
        json!({
            "type": "array", "minItems": 1, "uniqueItems": true, "default": [default],
            "items": {"type": "integer", "minimum": min, "maximum": max}
        })
    };
    json!({
        "type": "object",
        "properties": {
            "break_response_code": {"type": "integer", "minimum": 200, "maximum": 599},
            "break_response_body": {"type": "string"},
            "break_response_headers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "key": {"type": "string", "minLength": 1},
                        "value": {"type": "string", "minLength": 1}
                    },
                    "required": ["key", "value"]
                }
            },
            "max_breaker_sec": {"type": "integer", "minimum": 3, "default": 300},
            "unhealthy": {
                "type": "object",
                "properties": {
                    "http_statuses": statuses(500, 599, 500),
                    "failures": {"type": "integer", "minimum": 1, "default": 3}
                },
                "default": {"http_statuses": [500], "failures": 3}
            },
            "healthy": {
                "type": "object",
                "properties": {
                    "http_statuses": statuses(200, 499, 200),
                    "successes": {"type": "integer", "minimum": 1, "default": 3}
                },
                "default": {"http_statuses": [200], "successes": 3}
            },
            "fallback": {
                "type": "object",
                "properties": {
                    "cache": {"type": "boolean", "default": false},
                    "cache_key": {"type": "string", "minLength": 1, "default": "$request_method $host $request_uri"},
                    "cache_max_body_size": {"type": "integer", "minimum": 1, "maximum": 8388608, "default": 1048576},
                    "cache_max_bytes": {"type": "integer", "minimum": 1048576, "maximum": 4294967296u64, "default": 16777216},
                    "cache_ttl": {"type": "integer", "minimum": 1, "default": 3600},
                    "upstream_id": {"type": ["string", "integer"]},
                    "upstream": {"type": "object"}
                },
                "additionalProperties": false
            }
        },
        "required": ["break_response_code"],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    break_response_code: u16,
    break_response_body: Option<String>,
    #[serde(default)]
    break_response_headers: Vec<KeyValue>,
    max_breaker_sec: u64,
    unhealthy: Unhealthy,
    healthy: Healthy,
    fallback: Option<FallbackConf>,
}

#[derive(Deserialize)]
struct KeyValue {
    key: String,
    value: String,
}

#[derive(Deserialize)]
struct Unhealthy {
    http_statuses: Vec<u16>,
    failures: u64,
}

#[derive(Deserialize)]
struct Healthy {
    http_statuses: Vec<u16>,
    successes: u64,
}

#[derive(Deserialize)]
struct FallbackConf {
    cache: bool,
    cache_key: String,
    cache_max_body_size: usize,
    cache_max_bytes: usize,
    cache_ttl: u64,
    upstream_id: Option<Value>,
    upstream: Option<Value>,
}

struct ApiBreaker {
    status: StatusCode,
    body: Bytes,
    headers: HeaderOps,
    max_open: Duration,
    unhealthy: (Vec<u16>, u64),
    healthy: (Vec<u16>, u64),
    state: Arc<State>,
    fallback: Option<Fallback>,
}

/// Counts kept across reloads that do not change the config.
struct State {
    epoch: Instant,
    /// Unhealthy answers since the breaker last closed (0: closed).
    unhealthy: AtomicU64,
    /// Healthy answers since the first unhealthy one.
    healthy: AtomicU64,
    /// When the breaker last opened, in ms since `epoch`.
    opened_ms: AtomicU64,
}

struct Fallback {
    cache: Option<Cache>,
    upstream: Option<Index>,
}

/// The last good response per request, to answer with while open.
struct Cache {
    key: Template,
    max_body: usize,
    ttl: Duration,
    store: Arc<Store>,
}

/// Left by `header_filter` for `body_filter`: this response is worth
/// keeping for the fallback.
#[derive(Clone)]
struct Keep {
    breaker: usize,
    status: StatusCode,
    headers: HeaderMap,
}

/// The request went to the fallback upstream: its answer says nothing
/// about the route's upstream.
#[derive(Clone)]
struct FellBack;

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    Ok(Arc::new(breaker(config, env)?))
}

fn breaker(config: Value, env: &Env) -> Result<ApiBreaker, FieldError> {
    let scope = crate::state_key(NAME, env, None, &config);
    let c: Config = typed(config)?;
    let status = StatusCode::from_u16(c.break_response_code)
        .map_err(|e| FieldError::new("break_response_code", e.to_string()))?;
    // Checked item by item first, so an error names the array entry the
    // user wrote, not the `set` map it becomes.
    for (i, kv) in c.break_response_headers.iter().enumerate() {
        crate::header_name(&kv.key, &format!("break_response_headers[{i}].key"))?;
        crate::template(&kv.value, &format!("break_response_headers[{i}].value"))?;
    }
    let set: serde_json::Map<String, Value> = c
        .break_response_headers
        .iter()
        .map(|kv| (kv.key.clone(), Value::String(kv.value.clone())))
        .collect();
    let headers = HeaderOps::parse(Some(&json!({ "set": set })), "break_response_headers")?;
    let fallback = match &c.fallback {
        Some(f) => Some(fallback(env, &scope, f)?),
        None => None,
    };
    Ok(ApiBreaker {
        status,
        body: c.break_response_body.unwrap_or_default().into(),
        headers,
        max_open: Duration::from_secs(c.max_breaker_sec),
        unhealthy: (c.unhealthy.http_statuses, c.unhealthy.failures),
        healthy: (c.healthy.http_statuses, c.healthy.successes),
        state: env.state(&scope, || State {
            epoch: Instant::now(),
            unhealthy: AtomicU64::new(0),
            healthy: AtomicU64::new(0),
            opened_ms: AtomicU64::new(0),
        }),
        fallback,
    })
}

fn fallback(env: &Env, scope: &str, f: &FallbackConf) -> Result<Fallback, FieldError> {
    let upstream = match (&f.upstream_id, &f.upstream) {
        (Some(id), _) => {
            let id = id.as_str().map_or_else(|| id.to_string(), str::to_owned);
            Some(env.upstream(NAME, Some(&id), "", "fallback.upstream_id")?)
        }
        (None, Some(_)) => {
            Some(env.upstream(NAME, None, "/fallback/upstream", "fallback.upstream")?)
        }
        (None, None) => None,
    };
    let cache = match f.cache {
        true => Some(Cache {
            key: crate::template(&f.cache_key, "fallback.cache_key")?,
            max_body: f.cache_max_body_size,
            ttl: Duration::from_secs(f.cache_ttl),
            store: env.state(&format!("{scope}:cache"), || Store::new(f.cache_max_bytes)),
        }),
        false => None,
    };
    if cache.is_none() && upstream.is_none() {
        return Err(FieldError::new(
            "fallback",
            "set `cache: true`, `upstream_id` or `upstream`",
        ));
    }
    Ok(Fallback { cache, upstream })
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build).with_upstreams(&["/fallback/upstream"])
}

impl ApiBreaker {
    fn id(&self) -> usize {
        self as *const ApiBreaker as usize
    }

    fn now_ms(&self) -> u64 {
        self.state.epoch.elapsed().as_millis() as u64
    }

    /// Whether the breaker is open at `now_ms`.
    fn is_open(&self, now_ms: u64) -> bool {
        let failures = self.state.unhealthy.load(Ordering::Acquire);
        let threshold = self.unhealthy.1;
        if failures < threshold {
            return false;
        }
        // APISIX: 2^(failures / threshold) seconds, at most max_breaker_sec.
        let doublings = (failures / threshold).min(63) as u32;
        let open_for = Duration::from_secs(1u64 << doublings).min(self.max_open);
        let opened = self.state.opened_ms.load(Ordering::Acquire);
        now_ms < opened + open_for.as_millis() as u64
    }

    fn break_response(&self, ctx: &Ctx) -> Reply {
        let mut reply = Reply::new(self.status).body(self.body.clone());
        self.headers.apply(ctx, &mut reply.headers);
        reply
    }

    /// What to answer while open.
    fn open(&self, ctx: &mut Ctx) -> Flow {
        let Some(fallback) = &self.fallback else {
            return Flow::Respond(self.break_response(ctx));
        };
        if let Some(reply) = fallback.cache.as_ref().and_then(|c| c.reply(ctx)) {
            return Flow::Respond(reply);
        }
        if let Some(upstream) = &fallback.upstream {
            ctx.upstream_override = Some(upstream.clone());
            ctx.stash.insert(FellBack);
            ctx.response_headers
                .insert(FALLBACK.clone(), HeaderValue::from_static("upstream"));
            return Flow::Continue;
        }
        Flow::Respond(self.break_response(ctx))
    }

    /// Counts an answer of the upstream's, at `now_ms`.
    fn record(&self, status: u16, now_ms: u64) {
        let s = &self.state;
        if self.unhealthy.0.contains(&status) {
            let failures = s.unhealthy.fetch_add(1, Ordering::AcqRel) + 1;
            // As APISIX: a failure starts the count of successes again.
            s.healthy.store(0, Ordering::Release);
            if failures.is_multiple_of(self.unhealthy.1) {
                s.opened_ms.store(now_ms, Ordering::Release);
                tracing::warn!("api-breaker open after {failures} unhealthy answers");
            }
        } else if self.healthy.0.contains(&status) && s.unhealthy.load(Ordering::Acquire) > 0 {
            let successes = s.healthy.fetch_add(1, Ordering::AcqRel) + 1;
            if successes >= self.healthy.1 {
                s.unhealthy.store(0, Ordering::Release);
                s.healthy.store(0, Ordering::Release);
            }
        }
    }
}

impl Plugin for ApiBreaker {
    fn access(&self, ctx: &mut Ctx) -> Flow {
        if self.is_open(self.now_ms()) {
            return self.open(ctx);
        }
        Flow::Continue
    }

    fn header_filter(&self, ctx: &mut Ctx, head: &mut Head) {
        let Some(cache) = self.fallback.as_ref().and_then(|f| f.cache.as_ref()) else {
            return;
        };
        let worth = ctx.upstream_status.is_some()
            && ctx.stash.get::<FellBack>().is_none()
            && self.healthy.0.contains(&head.status.as_u16())
            && response_store::storable(head, cache.max_body);
        if worth {
            ctx.stash.insert(Keep {
                breaker: self.id(),
                status: head.status,
                headers: response_store::stored_headers(&head.headers),
            });
        }
    }

    fn wants_response_body(&self, ctx: &Ctx, _head: &Head) -> bool {
        ctx.stash
            .get::<Keep>()
            .is_some_and(|k| k.breaker == self.id())
    }

    fn body_filter(&self, ctx: &mut Ctx, body: &mut Bytes) {
        let Some(keep) = ctx.stash.get::<Keep>().filter(|k| k.breaker == self.id()) else {
            return;
        };
        if let Some(cache) = self.fallback.as_ref().and_then(|f| f.cache.as_ref()) {
            cache.store(ctx, keep.clone(), body.clone());
        }
    }

    fn log(&self, ctx: &Ctx) {
        // Only the route's upstream's own answers count, as it gave them
        // (`$upstream_status`), whatever plugins made of them.
        if ctx.stash.get::<FellBack>().is_some() {
            return;
        }
        if let Some(status) = ctx.upstream_status {
            self.record(status.as_u16(), self.now_ms());
        }
    }
}

impl Cache {
    fn reply(&self, ctx: &Ctx) -> Option<Reply> {
        let stored = self.store.get(&ctx.render(&self.key))?;
        if stored.age(Instant::now()) >= self.ttl {
            return None;
        }
        Some(stored.reply(&FALLBACK, "cache"))
    }

    fn store(&self, ctx: &Ctx, keep: Keep, body: Bytes) {
        let stored = Stored {
            status: keep.status,
            headers: keep.headers,
            body,
            stored: Instant::now(),
            ttl: self.ttl,
        };
        self.store.put(ctx.render(&self.key).into(), stored);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{ctx, entry, errors, run_now};
    use turnpike_plugin::Phase;

    fn answered(e: &turnpike_plugin::Entry, status: u16) {
        let mut c = ctx("/");
        c.upstream_status = Some(StatusCode::from_u16(status).unwrap());
        e.plugin.log(&c);
    }

    fn is_open(e: &turnpike_plugin::Entry) -> bool {
        run_now(Phase::Access, e, &mut ctx("/")).is_some()
    }

    #[test]
    fn opens_after_failures_and_closes_after_successes() {
        let e = entry(
            NAME,
            json!({"break_response_code": 502, "break_response_body": "down",
                   "break_response_headers": [{"key": "x-why", "value": "breaker $route_id"}],
                   "unhealthy": {"http_statuses": [500, 503], "failures": 2}}),
        );
        answered(&e, 500);
        assert!(!is_open(&e), "one failure is not enough");
        answered(&e, 503);
        let mut c = ctx("/");
        c.route_id = Some("r1".into());
        let reply = run_now(Phase::Access, &e, &mut c).expect("open");
        assert_eq!(reply.status, 502);
        assert_eq!(reply.body, "down");
        assert_eq!(reply.headers["x-why"], "breaker r1");
        answered(&e, 404);
        assert!(is_open(&e), "other statuses change nothing");
    }

    #[test]
    fn open_time_doubles_and_successes_reset() {
        let config = json!({"break_response_code": 503, "max_breaker_sec": 5,
                            "unhealthy": {"failures": 1}});
        let mut config = config;
        turnpike_plugin::fill_defaults(&schema(), &mut config);
        let b = breaker(config, &Env::default()).unwrap();
        b.record(500, 10_000);
        assert!(b.is_open(10_000) && b.is_open(11_999), "open 2 s");
        assert!(!b.is_open(12_000), "then half-open");
        b.record(500, 12_000);
        assert!(b.is_open(15_999), "the second opening lasts 4 s");
        assert!(!b.is_open(16_000));
        b.record(500, 16_000);
        assert!(
            b.is_open(20_999) && !b.is_open(21_000),
            "8 s, capped at max_breaker_sec 5"
        );
        b.record(200, 21_000);
        b.record(500, 21_000);
        b.record(200, 21_000);
        b.record(200, 21_001);
        assert_eq!(
            b.state.unhealthy.load(Ordering::Acquire),
            4,
            "a failure restarted the count of successes"
        );
        b.record(200, 21_002);
        assert_eq!(
            b.state.unhealthy.load(Ordering::Acquire),
            0,
            "three close it"
        );
        assert!(!b.is_open(21_003));
    }

    #[test]
    fn a_fallback_needs_somewhere_to_go() {
        let e = errors(NAME, json!({"break_response_code": 503, "fallback": {}}));
        assert_eq!(e[0].path, "fallback");
        let e = errors(
            NAME,
            json!({"break_response_code": 503, "fallback": {"upstream_id": "x"}}),
        );
        assert_eq!(e[0].path, "fallback.upstream_id");
    }
}
