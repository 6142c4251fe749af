//! `limit-conn`: at most `conn` requests in flight per key; up to `burst`
//! more are delayed, each by `default_conn_delay` seconds for every
//! `conn` requests ahead of it, and beyond that they are rejected. A
//! request counts from `access` until its response is over (the `log`
//! phase), however it ends.
//!
//! `policy: redis` (beyond APISIX) counts in Redis for every gateway
//! sharing the config. A gateway that dies with requests in flight leaves
//! its counts behind; `key_ttl` bounds how long.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin};

use crate::limits::{self, Key, KeyConfig, Outcome, Rejection, Remote, Table};
use crate::redis::RedisConfig;

pub(crate) const NAME: &str = "limit-conn";
pub(crate) const PRIORITY: i32 = 1003;

fn schema() -> Value {
    let mut props = limits::common_properties(503);
    let own = json!({
        "conn": {"type": "integer", "exclusiveMinimum": 0},
        "burst": {"type": "integer", "minimum": 0},
        "default_conn_delay": {"type": "number", "exclusiveMinimum": 0},
        "only_use_default_delay": {"type": "boolean", "default": false},
        "key_ttl": {"type": "integer", "minimum": 1, "default": 3600},
        "policy": {"type": "string", "enum": ["local", "redis"], "default": "local"},
    });
    props.extend(own.as_object().cloned().unwrap_or_default());
    crate::redis::schema_properties(&mut props);
    json!({
        "type": "object",
        "properties": props,
        "required": ["conn", "burst", "default_conn_delay"],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    conn: u64,
    burst: u64,
    default_conn_delay: f64,
    key_ttl: u64,
    policy: String,
    rejected_code: u16,
    rejected_msg: Option<String>,
    allow_degradation: bool,
    #[serde(flatten)]
    key: KeyConfig,
    #[serde(flatten)]
    redis: RedisConfig,
}

/// Takes a slot: the count in flight with this request, or -1 (and
/// nothing taken) beyond `ARGV[1]`.
const ENTER: &str = r"
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if n > tonumber(ARGV[1]) then
    redis.call('DECR', KEYS[1])
    return -1
end
return n
";

/// Gives a slot back.
const LEAVE: &str = r"
if redis.call('DECR', KEYS[1]) <= 0 then redis.call('DEL', KEYS[1]) end
return 0
";

struct LimitConn {
    key: Key,
    slots: Slots,
    rejection: Arc<Rejection>,
    store: Store,
}

#[derive(Clone, Copy)]
struct Slots {
    conn: u64,
    burst: u64,
    delay: Duration,
    key_ttl: u64,
}

enum Store {
    Local(Arc<Table<u64>>),
    Redis { enter: Remote, leave: Remote },
}

/// The keys a request holds slots under, for `log` to give them back;
/// each instance finds its own by its table or Redis prefix.
#[derive(Clone, Default)]
struct Held(Vec<(usize, Box<str>)>);

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let scope = limits::scope(NAME, env, None, &config);
    let c: Config = typed(config)?;
    let store = if c.policy == "redis" {
        let remote = |script| Remote::new(env, &c.redis, &scope, script, c.allow_degradation);
        Store::Redis {
            enter: remote(ENTER)?,
            leave: remote(LEAVE)?,
        }
    } else {
        Store::Local(env.state(&scope, Table::default))
    };
    Ok(Arc::new(LimitConn {
        key: Key::new(&c.key)?,
        slots: Slots {
            conn: c.conn,
            burst: c.burst,
            delay: Duration::from_secs_f64(c.default_conn_delay),
            key_ttl: c.key_ttl,
        },
        rejection: Arc::new(Rejection::new(c.rejected_code, c.rejected_msg.as_deref())?),
        store,
    }))
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

impl LimitConn {
    /// Tells this instance's slots apart from another's in [`Held`].
    fn id(&self) -> usize {
        self as *const LimitConn as usize
    }
}

impl Plugin for LimitConn {
    fn access(&self, ctx: &mut Ctx) -> Flow {
        let key = self.key.of(ctx).into_owned();
        let (slots, id) = (self.slots, self.id());
        match &self.store {
            Store::Local(table) => {
                let n = table.with(
                    &key,
                    std::time::Instant::now(),
                    || 0,
                    |n, _| *n == 0,
                    |n| {
                        if *n >= slots.conn + slots.burst {
                            return None;
                        }
                        *n += 1;
                        Some(*n)
                    },
                );
                slots.enter(ctx, n, id, key).flow(&self.rejection)
            }
            Store::Redis { enter, .. } => {
                let rejection = self.rejection.clone();
                let args = vec![
                    (slots.conn + slots.burst).to_string(),
                    slots.key_ttl.to_string(),
                ];
                enter.run(&key.clone(), args, move |ctx, n: i64| {
                    let n = u64::try_from(n).ok();
                    slots.enter(ctx, n, id, key).flow(&rejection)
                })
            }
        }
    }

    fn log(&self, ctx: &Ctx) {
        let Some(held) = ctx.stash.get::<Held>() else {
            return;
        };
        for (_, key) in held.0.iter().filter(|(id, _)| *id == self.id()) {
            match &self.store {
                Store::Local(table) => {
                    table.existing(key, |n| *n = n.saturating_sub(1));
                }
                Store::Redis { leave, .. } => leave.spawn(key),
            }
        }
    }
}

impl Slots {
    /// What taking slot `n` (or none, `None`) means for the request; a
    /// slot taken is recorded for `log` to give back.
    fn enter(&self, ctx: &mut Ctx, n: Option<u64>, id: usize, key: String) -> Outcome {
        let Some(n) = n else {
            return Outcome::Reject;
        };
        let mut held = ctx.stash.remove::<Held>().unwrap_or_default();
        held.0.push((id, key.into()));
        ctx.stash.insert(held);
        if n <= self.conn {
            return Outcome::Pass;
        }
        // As nginx's limit_conn in APISIX: one delay per `conn` ahead.
        Outcome::Wait(self.delay * ((n - 1) / self.conn) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{ctx, entry, errors, run_now};
    use turnpike_plugin::Phase;

    #[tokio::test]
    async fn slots_are_held_until_log_and_burst_waits() {
        let e = entry(
            NAME,
            json!({"conn": 1, "burst": 1, "default_conn_delay": 0.01, "rejected_code": 429}),
        );
        let mut first = ctx("/");
        assert!(run_now(Phase::Access, &e, &mut first).is_none());
        let mut second = ctx("/");
        let waited = std::time::Instant::now();
        assert!(crate::test_util::run(Phase::Access, &e, &mut second)
            .await
            .is_none());
        assert!(
            waited.elapsed() >= Duration::from_millis(10),
            "the burst slot waits"
        );
        let reply = run_now(Phase::Access, &e, &mut ctx("/")).expect("no slot left");
        assert_eq!(reply.status, 429);
        e.plugin.log(&first);
        let mut third = ctx("/");
        assert!(
            crate::test_util::run(Phase::Access, &e, &mut third)
                .await
                .is_none(),
            "a finished request gives its slot back"
        );
        e.plugin.log(&ctx("/"));
        assert!(
            run_now(Phase::Access, &e, &mut ctx("/")).is_some(),
            "a request that held no slot gives none back"
        );
        e.plugin.log(&second);
        e.plugin.log(&third);
        assert!(
            run_now(Phase::Access, &e, &mut ctx("/")).is_none(),
            "all free again"
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let e = errors(
            NAME,
            json!({"conn": 0, "burst": 0, "default_conn_delay": 1}),
        );
        assert_eq!(e[0].path, "conn");
    }
}
