//! `limit-req`: a leaky bucket per key. Requests drain at `rate` per
//! second; up to `burst` more may queue, each delayed until its turn
//! (or passed at once with `nodelay`); beyond the burst they are rejected.
//! The algorithm is nginx's `limit_req`, as APISIX uses it.
//!
//! `policy: redis` (beyond APISIX) keeps each bucket in Redis, so every
//! gateway sharing the config drains one bucket; the script reads Redis's
//! own clock, so the gateways' clocks do not matter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin};

use crate::limits::{self, Common, Key, Outcome, Rejection, Store, Table};

pub(crate) const NAME: &str = "limit-req";
pub(crate) const PRIORITY: i32 = 1001;

fn schema() -> Value {
    let mut props = limits::common_properties(503);
    let own = json!({
        "rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000000000},
        "burst": {"type": "number", "minimum": 0, "maximum": 1000000000},
        "nodelay": {"type": "boolean", "default": false},
    });
    props.extend(own.as_object().cloned().unwrap_or_default());
    json!({
        "type": "object",
        "properties": props,
        "required": ["rate", "burst"],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    rate: f64,
    burst: f64,
    nodelay: bool,
    #[serde(flatten)]
    common: Common,
}

/// The bucket in Redis: answers `{admitted (0/1), excess as text}`.
const DRIP: &str = r"
local rate, burst, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local rec = redis.call('HMGET', KEYS[1], 'excess', 'last')
local excess = 0
if rec[1] then
    local elapsed = math.abs(now - tonumber(rec[2]))
    excess = math.max(tonumber(rec[1]) - rate * elapsed / 1000 + 1, 0)
    if excess > burst then
        return {0, tostring(excess)}
    end
end
redis.call('HSET', KEYS[1], 'excess', tostring(excess), 'last', now)
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, tostring(excess)}
";

struct LimitReq {
    key: Key,
    bucket: Bucket,
    rejection: Arc<Rejection>,
    store: Store<Level>,
}

#[derive(Clone, Copy)]
struct Bucket {
    rate: f64,
    burst: f64,
    nodelay: bool,
}

/// One key's bucket in this process: requests in excess of the rate, as
/// of `last`.
struct Level {
    excess: f64,
    last: Instant,
}

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let scope = crate::state_key(NAME, env, None, &config);
    let c: Config = typed(config)?;
    Ok(Arc::new(LimitReq {
        key: c.common.key(env)?,
        bucket: Bucket {
            rate: c.rate,
            burst: c.burst,
            nodelay: c.nodelay,
        },
        rejection: Arc::new(c.common.rejection()?),
        store: c.common.store(env, &scope, DRIP)?,
    }))
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build).with_secrets(&["redis_password"])
}

impl Plugin for LimitReq {
    fn access(&self, ctx: &mut Ctx) -> Flow {
        let key = self.key.of(ctx);
        match &self.store {
            Store::Local(levels) => {
                let outcome = self.bucket.drip(levels, &key, Instant::now());
                outcome.flow(&self.rejection)
            }
            Store::Redis(remote) => {
                let (bucket, rejection) = (self.bucket, self.rejection.clone());
                // Kept a while after it would have drained, then dropped.
                let drained_ms = ((bucket.burst + 1.0) / bucket.rate * 1000.0).ceil();
                let ttl = (drained_ms.min(86_400_000.0) as u64).saturating_add(1000);
                let args = vec![
                    bucket.rate.to_string(),
                    bucket.burst.to_string(),
                    ttl.to_string(),
                ];
                remote.run(&key, args, move |_, (admitted, excess): (i64, String)| {
                    let excess = excess.parse().unwrap_or(0.0);
                    bucket.outcome(admitted == 1, excess).flow(&rejection)
                })
            }
        }
    }
}

impl Bucket {
    /// Lets one request into `key`'s bucket in this process.
    fn drip(&self, levels: &Table<Level>, key: &str, now: Instant) -> Outcome {
        let rate = self.rate;
        let drained = move |l: &Level, now: Instant| {
            l.excess + 1.0 - rate * now.saturating_duration_since(l.last).as_secs_f64()
        };
        let fresh = || Level {
            excess: -1.0,
            last: now,
        };
        levels.with(
            key,
            now,
            fresh,
            |l, now| drained(l, now) <= 0.0,
            |level| {
                // A new key starts empty: its first request has no excess.
                let excess = if level.excess < 0.0 {
                    0.0
                } else {
                    drained(level, now).max(0.0)
                };
                let admitted = excess <= self.burst;
                if admitted {
                    *level = Level { excess, last: now };
                }
                self.outcome(admitted, excess)
            },
        )
    }

    fn outcome(&self, admitted: bool, excess: f64) -> Outcome {
        // At most an hour, whatever a tiny `rate` with a large `burst` says.
        let delay = (excess / self.rate).min(3600.0);
        match admitted {
            false => Outcome::Reject,
            true if self.nodelay || delay < 0.001 => Outcome::Pass,
            true => Outcome::Wait(Duration::from_secs_f64(delay)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{ctx, entry, errors, run_now};
    use turnpike_plugin::Phase;

    fn bucket(rate: f64, burst: f64, nodelay: bool) -> Bucket {
        Bucket {
            rate,
            burst,
            nodelay,
        }
    }

    #[test]
    fn bursts_wait_their_turn_and_beyond_are_rejected() {
        let levels = Table::default();
        let b = bucket(10.0, 2.0, false);
        let t0 = Instant::now();
        assert_eq!(b.drip(&levels, "k", t0), Outcome::Pass);
        assert_eq!(
            b.drip(&levels, "k", t0),
            Outcome::Wait(Duration::from_millis(100))
        );
        assert_eq!(
            b.drip(&levels, "k", t0),
            Outcome::Wait(Duration::from_millis(200))
        );
        assert_eq!(
            b.drip(&levels, "k", t0),
            Outcome::Reject,
            "burst of 2 is full"
        );
        assert_eq!(b.drip(&levels, "other", t0), Outcome::Pass, "per key");
        let later = t0 + Duration::from_millis(200);
        assert_eq!(
            b.drip(&levels, "k", later),
            Outcome::Wait(Duration::from_millis(100)),
            "two requests drained in 200 ms at 10/s"
        );
        let idle = t0 + Duration::from_secs(5);
        assert_eq!(b.drip(&levels, "k", idle), Outcome::Pass, "drained whole");
    }

    #[test]
    fn nodelay_passes_the_burst_at_once() {
        let levels = Table::default();
        let b = bucket(1.0, 1.0, true);
        let t0 = Instant::now();
        assert_eq!(b.drip(&levels, "k", t0), Outcome::Pass);
        assert_eq!(b.drip(&levels, "k", t0), Outcome::Pass);
        assert_eq!(b.drip(&levels, "k", t0), Outcome::Reject);
    }

    #[test]
    fn the_plugin_rejects_with_the_configured_answer() {
        let e = entry(
            NAME,
            json!({"rate": 1, "burst": 0, "rejected_code": 429, "rejected_msg": "easy"}),
        );
        assert!(run_now(Phase::Access, &e, &mut ctx("/")).is_none());
        let reply = run_now(Phase::Access, &e, &mut ctx("/")).unwrap();
        assert_eq!(reply.status, 429);
        assert_eq!(crate::test_util::body(&reply)["error_msg"], "easy");
        assert_eq!(errors(NAME, json!({"rate": 0, "burst": 1}))[0].path, "rate");
        assert_eq!(errors(NAME, json!({"rate": 1}))[0].path, "");
    }
}
