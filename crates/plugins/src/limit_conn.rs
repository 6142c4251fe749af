//! `limit-conn`: at most `conn` requests in flight per key; up to `burst`
//! more are delayed, each by `default_conn_delay` seconds for every
//! `conn` requests ahead of it, and beyond that they are rejected. A
//! request counts from `access` until it is over, however it ends: the
//! slot is a guard kept with the request, given back when the request's
//! state is dropped (after `log`), so no filter or failure path can keep
//! it.
//!
//! `policy: redis` (beyond APISIX) counts in Redis for every gateway
//! sharing the config: each request in flight is a member of a sorted set,
//! scored by when it entered. A gateway that dies with requests in flight
//! leaves members behind; they stop counting `key_ttl` after they entered.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin};

use crate::limits::{self, Common, Key, Outcome, Rejection, Remote, Store, Table};

pub(crate) const NAME: &str = "limit-conn";
pub(crate) const PRIORITY: i32 = 1003;

fn schema() -> Value {
    let mut props = limits::common_properties(503);
    let own = json!({
        "conn": {"type": "integer", "exclusiveMinimum": 0},
        "burst": {"type": "integer", "minimum": 0},
        "default_conn_delay": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "only_use_default_delay": {"type": "boolean", "default": false},
        "key_ttl": {"type": "integer", "minimum": 1, "maximum": 604800, "default": 3600},
    });
    props.extend(own.as_object().cloned().unwrap_or_default());
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
    #[serde(flatten)]
    common: Common,
}

/// Takes a slot for request `ARGV[3]`: the count in flight with it, or
/// -1 (and nothing taken) at `ARGV[1]` already. Members older than
/// `ARGV[2]` ms are dropped first.
const ENTER: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then
    return -1
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return n + 1
";

/// Gives request `ARGV[1]`'s slot back.
const LEAVE: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
return 0
";

struct LimitConn {
    key: Key,
    slots: Slots,
    rejection: Arc<Rejection>,
    store: Counts,
}

/// In this process, or in Redis: a script to take a slot and one to give
/// it back.
enum Counts {
    Local(Arc<Table<u64>>),
    Redis { enter: Remote, leave: Arc<Remote> },
}

#[derive(Clone, Copy)]
struct Slots {
    conn: u64,
    burst: u64,
    delay: Duration,
    key_ttl: u64,
}

/// The slots a request holds, given back when it is dropped with the
/// request's state.
#[derive(Clone, Default)]
struct Held(Vec<Arc<Slot>>);

enum Slot {
    Local(Arc<Table<u64>>, Box<str>),
    Redis(Arc<Remote>, String, String),
}

impl Drop for Slot {
    fn drop(&mut self) {
        match self {
            Slot::Local(table, key) => {
                table.existing(key, |n| *n = n.saturating_sub(1));
            }
            Slot::Redis(leave, key, token) => leave.spawn(key, vec![std::mem::take(token)]),
        }
    }
}

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let scope = crate::state_key(NAME, env, None, &config);
    let c: Config = typed(config)?;
    let store = match c.common.store(env, &scope, ENTER)? {
        Store::Local(table) => Counts::Local(table),
        Store::Redis(enter) => Counts::Redis {
            enter,
            leave: Arc::new(c.common.remote(env, &scope, LEAVE)?),
        },
    };
    Ok(Arc::new(LimitConn {
        key: c.common.key(env)?,
        slots: Slots {
            conn: c.conn,
            burst: c.burst,
            delay: Duration::try_from_secs_f64(c.default_conn_delay)
                .map_err(|e| FieldError::new("default_conn_delay", e.to_string()))?,
            key_ttl: c.key_ttl,
        },
        rejection: Arc::new(c.common.rejection()?),
        store,
    }))
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build).with_secrets(&["redis_password"])
}

impl Plugin for LimitConn {
    fn access(&self, ctx: &mut Ctx) -> Flow {
        let key = self.key.of(ctx).into_owned();
        let slots = self.slots;
        match &self.store {
            Counts::Local(table) => {
                let now = std::time::Instant::now();
                let n = table.with(
                    &key,
                    now,
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
                let slot = || Slot::Local(table.clone(), key.into());
                slots.enter(ctx, n, slot).flow(&self.rejection)
            }
            Counts::Redis { enter, leave } => {
                let rejection = self.rejection.clone();
                let token = format!(
                    "{}-{:016x}",
                    ctx.request_id.to_str().unwrap_or_default(),
                    fastrand::u64(..)
                );
                let args = vec![
                    (slots.conn + slots.burst).to_string(),
                    (slots.key_ttl * 1000).to_string(),
                    token.clone(),
                ];
                let leave = leave.clone();
                enter.run(&key.clone(), args, move |ctx, n: i64| {
                    let slot = || Slot::Redis(leave, key, token);
                    slots
                        .enter(ctx, u64::try_from(n).ok(), slot)
                        .flow(&rejection)
                })
            }
        }
    }
}

impl Slots {
    /// What taking slot `n` (or none, `None`) means for the request; a
    /// slot taken stays with the request until it is over.
    fn enter(&self, ctx: &mut Ctx, n: Option<u64>, slot: impl FnOnce() -> Slot) -> Outcome {
        let Some(n) = n else {
            return Outcome::Reject;
        };
        let mut held = ctx.stash.remove::<Held>().unwrap_or_default();
        held.0.push(Arc::new(slot()));
        ctx.stash.insert(held);
        if n <= self.conn {
            return Outcome::Pass;
        }
        // As nginx's limit_conn in APISIX: one delay per `conn` ahead.
        let ahead = u32::try_from((n - 1) / self.conn).unwrap_or(u32::MAX);
        Outcome::Wait(self.delay.saturating_mul(ahead))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{ctx, entry, errors, run_now};
    use turnpike_plugin::Phase;

    #[tokio::test]
    async fn slots_are_held_until_the_request_is_over_and_burst_waits() {
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
        drop(first);
        let mut third = ctx("/");
        assert!(
            crate::test_util::run(Phase::Access, &e, &mut third)
                .await
                .is_none(),
            "a finished request gives its slot back"
        );
        assert!(
            run_now(Phase::Access, &e, &mut ctx("/")).is_some(),
            "a rejected request held no slot and gives none back"
        );
        drop((second, third));
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
