//! What the limiters (`limit-count`, `limit-req`, `limit-conn`) share: the
//! key a request is counted under, the rejection, the local tables of
//! counters, and their scripts in Redis.

use std::borrow::Cow;
use std::collections::hash_map::{HashMap, RandomState};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use redis::{FromRedisValue, Script};
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{Ctx, Env, FieldError, Flow, Reply, Resume, Template};

use crate::redis::{Redis, RedisConfig};
use turnpike_router::{Var, VarSource};

/// `key_type` and `key`, as APISIX's limiters take them.
#[derive(Deserialize)]
pub(crate) struct KeyConfig {
    pub key_type: String,
    pub key: String,
}

/// Schema properties of [`Common`]: the key, the rejection, the policy and
/// Redis.
pub(crate) fn common_properties(default_code: u16) -> serde_json::Map<String, Value> {
    let props = json!({
        "policy": {"type": "string", "enum": ["local", "redis"], "default": "local"},
        "key_type": {
            "type": "string",
            "enum": ["var", "var_combination", "constant"],
            "default": "var"
        },
        "key": {"type": "string", "minLength": 1, "default": "remote_addr"},
        "rejected_code": {"type": "integer", "minimum": 200, "maximum": 599, "default": default_code},
        "rejected_msg": {"type": "string", "minLength": 1},
        "allow_degradation": {"type": "boolean", "default": false},
    });
    let mut props = props.as_object().cloned().unwrap_or_default();
    crate::redis::schema_properties(&mut props);
    props
}

/// The fields every limiter has: where it counts, under which key, and
/// how it refuses.
#[derive(Deserialize)]
pub(crate) struct Common {
    policy: String,
    rejected_code: u16,
    rejected_msg: Option<String>,
    allow_degradation: bool,
    #[serde(flatten)]
    key: KeyConfig,
    #[serde(flatten)]
    redis: RedisConfig,
}

/// Where a limiter counts: in this process, or in Redis by a script.
pub(crate) enum Store<T> {
    Local(Arc<Table<T>>),
    Redis(Remote),
}

impl Common {
    pub(crate) fn key(&self, env: &Env) -> Result<Key, FieldError> {
        Key::new(&self.key, env)
    }

    pub(crate) fn rejection(&self) -> Result<Rejection, FieldError> {
        Rejection::new(self.rejected_code, self.rejected_msg.as_deref())
    }

    /// The counters under `scope`: a table kept across reloads, or
    /// `script` in Redis.
    pub(crate) fn store<T: Send + Sync + 'static>(
        &self,
        env: &Env,
        scope: &str,
        script: &'static str,
    ) -> Result<Store<T>, FieldError> {
        if self.policy == "redis" {
            return Ok(Store::Redis(self.remote(env, scope, script)?));
        }
        Ok(Store::Local(env.state(scope, Table::default)))
    }

    /// `script` in the configured Redis, counting under `scope`.
    pub(crate) fn remote(
        &self,
        env: &Env,
        scope: &str,
        script: &'static str,
    ) -> Result<Remote, FieldError> {
        Remote::new(env, &self.redis, scope, script, self.allow_degradation)
    }
}

/// What a request is counted under.
pub(crate) struct Key {
    source: Source,
    /// Counters are per route: the limiter is configured on a service or
    /// plugin config, and APISIX gives each route using it its own.
    per_route: bool,
}

enum Source {
    /// One variable (`remote_addr`, `http_x_api_key`, `consumer_name`).
    Var(Var),
    /// Variables and text (`$remote_addr $http_x_user`).
    Combination(Template),
    /// One counter for every request.
    Constant(Box<str>),
}

impl Key {
    pub(crate) fn new(config: &KeyConfig, env: &Env) -> Result<Key, FieldError> {
        let key = &config.key;
        let source = match config.key_type.as_str() {
            "var" => Var::parse(key.trim_start_matches('$'))
                .map(Source::Var)
                .map_err(|e| FieldError::new("key", e))?,
            "var_combination" => Source::Combination(crate::template(key, "key")?),
            _ => Source::Constant(key.as_str().into()),
        };
        let owner = env.owner();
        let per_route = owner.starts_with("service ") || owner.starts_with("plugin config ");
        Ok(Key { source, per_route })
    }

    /// One counter for every route using the config, whatever resource
    /// it is on (a `group`).
    pub(crate) fn shared(mut self) -> Key {
        self.per_route = false;
        self
    }

    /// The request's key. When the variables are all empty the client's
    /// address stands in, as in APISIX, so a missing header does not put
    /// every such client under one counter.
    pub(crate) fn of<'a>(&'a self, ctx: &'a Ctx) -> Cow<'a, str> {
        let key = match &self.source {
            Source::Var(var) => ctx.var(var).filter(|v| !v.is_empty()),
            Source::Combination(t) => {
                Some(Cow::<str>::Owned(ctx.render(t))).filter(|v| !v.trim().is_empty())
            }
            Source::Constant(k) => Some(Cow::Borrowed(&**k)),
        };
        let key =
            key.unwrap_or_else(|| Cow::Borrowed(ctx.conn.remote_ip.to_str().unwrap_or_default()));
        match (self.per_route, ctx.route_id.as_deref()) {
            (true, Some(route)) => Cow::Owned(format!("{route}:{key}")),
            _ => key,
        }
    }
}

/// The answer to a request over the limit: `rejected_code`, with
/// `{"error_msg": rejected_msg}` when a message is configured.
#[derive(Clone)]
pub(crate) struct Rejection {
    status: StatusCode,
    body: Option<Bytes>,
}

impl Rejection {
    pub(crate) fn new(code: u16, message: Option<&str>) -> Result<Rejection, FieldError> {
        let status = StatusCode::from_u16(code)
            .map_err(|e| FieldError::new("rejected_code", e.to_string()))?;
        let body = message.map(|m| Bytes::from(json!({ "error_msg": m }).to_string()));
        Ok(Rejection { status, body })
    }

    pub(crate) fn reply(&self) -> Reply {
        match &self.body {
            Some(body) => Reply::json(self.status, body.clone()),
            None => Reply::new(self.status),
        }
    }
}

/// The answer while Redis cannot be reached and `allow_degradation` is off.
pub(crate) fn store_down() -> Reply {
    Reply::message(
        StatusCode::SERVICE_UNAVAILABLE,
        "rate limit store unreachable",
    )
}

/// What a limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Outcome {
    Pass,
    /// Pass after waiting (a request in a limiter's `burst`).
    Wait(Duration),
    Reject,
}

impl Outcome {
    pub(crate) fn flow(self, rejection: &Rejection) -> Flow {
        match self {
            Outcome::Pass => Flow::Continue,
            Outcome::Reject => Flow::Respond(rejection.reply()),
            Outcome::Wait(delay) => Flow::Await(Box::pin(async move {
                tokio::time::sleep(delay).await;
                Box::new(|_: &mut Ctx| Flow::Continue) as Resume
            })),
        }
    }
}

/// A limiter's script in Redis, and where it counts.
pub(crate) struct Remote {
    pub redis: Arc<Redis>,
    pub script: Arc<Script>,
    /// Prefix of the Redis keys: `plugin-` and the limiter's scope.
    pub prefix: Box<str>,
    pub allow_degradation: bool,
}

impl Remote {
    pub(crate) fn new(
        env: &Env,
        config: &RedisConfig,
        scope: &str,
        script: &'static str,
        allow_degradation: bool,
    ) -> Result<Remote, FieldError> {
        Ok(Remote {
            redis: Redis::shared(env, config)?,
            script: env.state(
                &format!("script:{:08x}", crc32fast::hash(script.as_bytes())),
                || Script::new(script),
            ),
            prefix: format!("plugin-{scope}:").into(),
            allow_degradation,
        })
    }

    /// Runs the script for `key` with `args` in the background, not
    /// waiting for it (giving back what a finished request held).
    pub(crate) fn spawn(&self, key: &str, args: Vec<String>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (redis, script) = (self.redis.clone(), self.script.clone());
        let redis_key = format!("{}{key}", self.prefix);
        runtime.spawn(async move {
            // A failure is logged by `eval`; the key's TTL ends the count.
            let _ = redis.eval::<i64>(&script, &[&redis_key], &args).await;
        });
    }

    /// Runs the script for `key` with `args`, then `then` with its answer.
    /// While Redis cannot be reached, `allow_degradation` lets the request
    /// through, else it gets 503.
    pub(crate) fn run<T, F>(&self, key: &str, args: Vec<String>, then: F) -> Flow
    where
        T: FromRedisValue + Send + 'static,
        F: FnOnce(&mut Ctx, T) -> Flow + Send + 'static,
    {
        let (redis, script) = (self.redis.clone(), self.script.clone());
        let redis_key = format!("{}{key}", self.prefix);
        let degrade = self.allow_degradation;
        Flow::Await(Box::pin(async move {
            let answer = redis.eval::<T>(&script, &[&redis_key], &args).await;
            Box::new(move |ctx: &mut Ctx| match answer {
                Ok(value) => then(ctx, value),
                Err(_) if degrade => Flow::Continue,
                Err(_) => Flow::Respond(store_down()),
            }) as Resume
        }))
    }
}

/// Counters by key, local to this process, split in shards so that
/// requests with different keys seldom wait for one another. Entries a
/// limiter calls stale are swept out as a shard grows.
pub(crate) struct Table<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    hasher: RandomState,
}

struct Shard<V> {
    map: HashMap<Box<str>, V>,
    /// Sweep when the map grows past this.
    sweep_at: usize,
}

const SHARDS: usize = 64;
const FIRST_SWEEP: usize = 1024;
/// Keys per shard at most: about a million per limiter in all.
const MAX_PER_SHARD: usize = 16 * 1024;

impl<V> Default for Table<V> {
    fn default() -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::new(),
                    sweep_at: FIRST_SWEEP,
                })
            })
            .collect();
        Table {
            shards,
            hasher: RandomState::new(),
        }
    }
}

impl<V> Table<V> {
    /// Runs `f` on the entry for `key`, made by `make` if missing. `stale`
    /// says which entries may go when the shard is swept.
    pub(crate) fn with<R>(
        &self,
        key: &str,
        now: Instant,
        make: impl FnOnce() -> V,
        stale: impl Fn(&V, Instant) -> bool,
        f: impl FnOnce(&mut V) -> R,
    ) -> R {
        let shard = self.hasher.hash_one(key) as usize % SHARDS;
        let mut shard = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        if !shard.map.contains_key(key) && shard.map.len() >= shard.sweep_at {
            shard.map.retain(|_, v| !stale(v, now));
            // Live entries stay: sweep again only once the shard has
            // doubled, so a full shard does not sweep on every new key.
            shard.sweep_at = (shard.map.len() * 2).clamp(FIRST_SWEEP, MAX_PER_SHARD);
            // Still full of live keys (a flood of distinct keys): one
            // goes, as an LRU dictionary would let it, so memory stays
            // bounded.
            if shard.map.len() >= MAX_PER_SHARD {
                if let Some(victim) = shard.map.keys().next().cloned() {
                    shard.map.remove(&victim);
                }
            }
        }
        if let Some(v) = shard.map.get_mut(key) {
            return f(v);
        }
        f(shard.map.entry(key.into()).or_insert_with(make))
    }

    /// Runs `f` on the entry for `key` if there is one.
    pub(crate) fn existing<R>(&self, key: &str, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        let shard = self.hasher.hash_one(key) as usize % SHARDS;
        let mut shard = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        shard.map.get_mut(key).map(f)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap().map.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{ctx, request};

    #[test]
    fn keys_fall_back_to_the_client_address() {
        let var = |k: &str| KeyConfig {
            key_type: "var".into(),
            key: k.into(),
        };
        let env = Env::default();
        let key = Key::new(&var("http_x_user"), &env).unwrap();
        assert_eq!(key.of(&ctx("/")), "10.0.0.1");
        let with = request(http::Request::get("/").header("x-user", "ann"));
        assert_eq!(key.of(&with), "ann");
        let combo = Key::new(
            &KeyConfig {
                key_type: "var_combination".into(),
                key: "$http_x_user $arg_k".into(),
            },
            &env,
        )
        .unwrap();
        assert_eq!(combo.of(&ctx("/?k=1")), " 1");
        assert_eq!(combo.of(&ctx("/")), "10.0.0.1");
        assert!(Key::new(&var("no_such_var"), &env).is_err());
        let mut on_service = Env::default();
        on_service.set_owner("service s1");
        let mut c = ctx("/");
        c.route_id = Some("r7".into());
        let per_route = Key::new(&var("remote_addr"), &on_service).unwrap();
        assert_eq!(
            per_route.of(&c),
            "r7:10.0.0.1",
            "each route of a service counts apart"
        );
    }

    #[test]
    fn tables_sweep_stale_entries_as_they_grow() {
        let table: Table<u32> = Table::default();
        let now = Instant::now();
        for i in 0..(SHARDS * FIRST_SWEEP * 2) {
            table.with(&i.to_string(), now, || 1, |_, _| true, |_| ());
        }
        assert!(
            table.len() < SHARDS * FIRST_SWEEP + SHARDS,
            "stale entries were swept: {}",
            table.len()
        );
        let live: Table<u32> = Table::default();
        for i in 0..5000 {
            live.with(&i.to_string(), now, || 1, |_, _| false, |_| ());
        }
        assert_eq!(live.len(), 5000, "live entries are kept");
    }
}
