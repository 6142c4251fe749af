//! `limit-count`: at most `count` requests per `time_window` seconds for
//! each key (client address, consumer, header...), in fixed windows that
//! start with a key's first request.
//!
//! `policy: local` counts in this process. `policy: redis` keeps one
//! counter in Redis for every gateway that shares the config: a Lua script
//! takes a request and reads what is left in one atomic round trip, so the
//! gateways together admit exactly `count`. While Redis cannot be reached,
//! `allow_degradation` lets requests through, else they get 503; counting
//! resumes by itself when Redis is back. Counters survive reloads that do
//! not change the config; routes with the same `group` share them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin};

use crate::limits::{self, Common, Key, Outcome, Rejection, Store, Table};

pub(crate) const NAME: &str = "limit-count";
pub(crate) const PRIORITY: i32 = 1002;

static LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

fn schema() -> Value {
    let mut props = limits::common_properties(503);
    let own = json!({
        "count": {"type": "integer", "exclusiveMinimum": 0},
        "time_window": {"type": "integer", "exclusiveMinimum": 0, "maximum": 31536000},
        "group": {"type": "string", "minLength": 1},
        "show_limit_quota_header": {"type": "boolean", "default": true},
    });
    props.extend(own.as_object().cloned().unwrap_or_default());
    json!({
        "type": "object",
        "properties": props,
        "required": ["count", "time_window"],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    count: u64,
    time_window: u64,
    show_limit_quota_header: bool,
    #[serde(flatten)]
    common: Common,
}

/// Takes one request from a window in Redis and returns what is left of
/// it (negative when over) and the milliseconds until it resets.
const TAKE: &str = r"
local ttl = redis.call('pttl', KEYS[1])
if ttl < 0 then
    redis.call('set', KEYS[1], ARGV[1] - 1, 'PX', ARGV[2])
    return {ARGV[1] - 1, tonumber(ARGV[2])}
end
return {redis.call('decr', KEYS[1]), ttl}
";

struct LimitCount {
    key: Key,
    verdict: Arc<Verdict>,
    length: Duration,
    store: Store<Window>,
}

/// What a count left means for the request.
struct Verdict {
    count: u64,
    /// `count` as the `X-RateLimit-Limit` value, made once.
    limit: HeaderValue,
    headers: bool,
    rejection: Rejection,
}

/// A fixed window of one key, in this process.
struct Window {
    ends: Instant,
    left: u64,
}

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let group = config["group"].as_str();
    if let Some(g) = group {
        let digest = u64::from(crate::config_digest(&config));
        if !env.agree(&format!("{NAME}:group:{g}"), digest) {
            return Err(FieldError::new(
                "group",
                format!("group `{g}` has another limit-count config elsewhere: a group's routes must share one config"),
            ));
        }
    }
    let scope = crate::state_key(NAME, env, group, &config);
    let grouped = group.is_some();
    let c: Config = typed(config)?;
    Ok(Arc::new(LimitCount {
        key: match grouped {
            true => c.common.key(env)?.shared(),
            false => c.common.key(env)?,
        },
        verdict: Arc::new(Verdict {
            count: c.count,
            limit: HeaderValue::from(c.count),
            headers: c.show_limit_quota_header,
            rejection: c.common.rejection()?,
        }),
        length: Duration::from_secs(c.time_window),
        store: c.common.store(env, &scope, TAKE)?,
    }))
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build).with_secrets(&["redis_password"])
}

impl Plugin for LimitCount {
    fn access(&self, ctx: &mut Ctx) -> Flow {
        let key = self.key.of(ctx);
        match &self.store {
            Store::Local(windows) => {
                let (left, reset) = take_local(windows, &key, self.verdict.count, self.length);
                self.verdict.apply(ctx, left, reset)
            }
            Store::Redis(remote) => {
                let verdict = self.verdict.clone();
                let args = vec![
                    verdict.count.to_string(),
                    self.length.as_millis().to_string(),
                ];
                remote.run(&key, args, move |ctx, (left, ttl_ms): (i64, i64)| {
                    let reset = Duration::from_millis(ttl_ms.max(0) as u64);
                    verdict.apply(ctx, left, reset)
                })
            }
        }
    }
}

/// Takes one request from `key`'s window: what is left (negative when
/// over) and the time until the window resets.
fn take_local(windows: &Table<Window>, key: &str, count: u64, length: Duration) -> (i64, Duration) {
    let now = Instant::now();
    let fresh = || Window {
        ends: now + length,
        left: count,
    };
    windows.with(
        key,
        now,
        fresh,
        |w, now| w.ends <= now,
        |w| {
            if w.ends <= now {
                *w = fresh();
            }
            let left = if w.left == 0 {
                -1
            } else {
                w.left -= 1;
                w.left as i64
            };
            (left, w.ends - now)
        },
    )
}

impl Verdict {
    fn apply(&self, ctx: &mut Ctx, left: i64, reset: Duration) -> Flow {
        if self.headers {
            let h = &mut ctx.response_headers;
            h.insert(LIMIT.clone(), self.limit.clone());
            h.insert(REMAINING.clone(), HeaderValue::from(left.max(0)));
            // Whole seconds, rounded up: a client that waits this long
            // finds a new window.
            let secs = reset.as_millis().div_ceil(1000) as u64;
            h.insert(RESET.clone(), HeaderValue::from(secs));
        }
        let outcome = if left < 0 {
            Outcome::Reject
        } else {
            Outcome::Pass
        };
        outcome.flow(&self.rejection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{ctx, entry, entry_with, errors, request, run_now};
    use turnpike_plugin::Phase;

    fn admitted(e: &turnpike_plugin::Entry, n: usize, from: &str) -> usize {
        (0..n)
            .filter(|_| {
                let mut c = request(http::Request::get("/").header("x-user", from));
                run_now(Phase::Access, e, &mut c).is_none()
            })
            .count()
    }

    #[test]
    fn counts_per_key_and_rejects_beyond() {
        let e = entry(
            NAME,
            json!({"count": 3, "time_window": 60, "key": "http_x_user",
                   "rejected_code": 429, "rejected_msg": "slow down"}),
        );
        assert_eq!(admitted(&e, 5, "ann"), 3);
        assert_eq!(admitted(&e, 5, "bob"), 3, "each key has its own window");
        let mut c = request(http::Request::get("/").header("x-user", "ann"));
        let reply = run_now(Phase::Access, &e, &mut c).expect("over the limit");
        assert_eq!(reply.status, 429);
        assert_eq!(crate::test_util::body(&reply)["error_msg"], "slow down");
        assert_eq!(c.response_headers["x-ratelimit-limit"], "3");
        assert_eq!(c.response_headers["x-ratelimit-remaining"], "0");
        let reset: u64 = c.response_headers["x-ratelimit-reset"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((59..=60).contains(&reset), "reset {reset}");
    }

    #[test]
    fn quota_headers_count_down_and_can_be_hidden() {
        let e = entry(NAME, json!({"count": 2, "time_window": 10}));
        let mut c = ctx("/");
        assert!(run_now(Phase::Access, &e, &mut c).is_none());
        assert_eq!(c.response_headers["x-ratelimit-remaining"], "1");
        let hidden = entry(
            NAME,
            json!({"count": 2, "time_window": 10, "show_limit_quota_header": false}),
        );
        let mut c = ctx("/");
        run_now(Phase::Access, &hidden, &mut c);
        assert!(c.response_headers.is_empty());
        let mut c = ctx("/");
        run_now(Phase::Access, &hidden, &mut c);
        let reply = run_now(Phase::Access, &hidden, &mut ctx("/")).unwrap();
        assert_eq!(reply.status, 503, "the default rejected_code");
        assert!(reply.body.is_empty(), "no rejected_msg, no body");
    }

    #[test]
    fn windows_reset_after_time_window() {
        let windows = Table::default();
        let length = Duration::from_millis(30);
        assert_eq!(take_local(&windows, "k", 1, length).0, 0);
        assert_eq!(take_local(&windows, "k", 1, length).0, -1);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(take_local(&windows, "k", 1, length).0, 0, "a new window");
    }

    #[test]
    fn counters_survive_a_rebuild_and_groups_share_them() {
        let env = Env::default();
        let config = json!({"count": 2, "time_window": 60, "key_type": "constant", "key": "all"});
        let first = entry_with(NAME, config.clone(), &env);
        assert_eq!(admitted(&first, 1, "x"), 1);
        let rebuilt = entry_with(NAME, config.clone(), &env);
        assert_eq!(admitted(&rebuilt, 5, "x"), 1, "the reload kept the count");
        let changed = entry_with(NAME, json!({"count": 3, "time_window": 60}), &env);
        assert_eq!(
            admitted(&changed, 5, "x"),
            3,
            "a changed config starts afresh"
        );

        let grouped = json!({"count": 2, "time_window": 60, "group": "g"});
        let mut env = Env::default();
        env.set_owner("route 1");
        let a = entry_with(NAME, grouped.clone(), &env);
        env.set_owner("route 2");
        let b = entry_with(NAME, grouped, &env);
        assert_eq!(admitted(&a, 1, "x") + admitted(&b, 5, "x"), 2);
        env.set_owner("route 3");
        let other = json!({"count": 5, "time_window": 60, "group": "g"});
        let mismatch = crate::registry().entry(NAME, &other, &env);
        assert_eq!(
            mismatch.err().unwrap()[0].path,
            "group",
            "one group, one config"
        );

        let mut on_service = Env::default();
        on_service.set_owner("service s");
        let config = json!({"count": 1, "time_window": 60, "key_type": "constant", "key": "k"});
        let per_route = entry_with(NAME, config.clone(), &on_service);
        let mut grouped = config;
        grouped["group"] = json!("g2");
        let shared = entry_with(NAME, grouped, &on_service);
        let on_route = |e: &turnpike_plugin::Entry, route: &str| {
            let mut c = ctx("/");
            c.route_id = Some(route.into());
            run_now(Phase::Access, e, &mut c).is_none()
        };
        assert!(
            on_route(&per_route, "a") && on_route(&per_route, "b"),
            "a service's routes count apart"
        );
        assert!(
            on_route(&shared, "a") && !on_route(&shared, "b"),
            "unless they share a group"
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        assert_eq!(
            errors(NAME, json!({"count": 0, "time_window": 1}))[0].path,
            "count"
        );
        assert_eq!(
            errors(NAME, json!({"count": 1, "time_window": 1, "key": "nope"}))[0].path,
            "key"
        );
        assert_eq!(
            errors(
                NAME,
                json!({"count": 1, "time_window": 1, "policy": "redis"})
            )[0]
            .path,
            "redis_host"
        );
    }
}
