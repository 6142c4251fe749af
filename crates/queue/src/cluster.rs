//! The shared queue (`gateway.queue: redis`): every gateway node submits
//! to, works from and reads results in one Redis.
//!
//! - A job is a hash `turnpike:async:job:{id}` (`job` JSON, `body`,
//!   `state`, `exp`, `sid`, then `ans`, `res`, `fin`), expiring with its
//!   `ttl` and `result_ttl`.
//! - Each route is a stream `turnpike:async:q:{route}` of job ids with one
//!   consumer group, `workers`; every node is a consumer. An entry delivered
//!   but not acknowledged is a job running somewhere, so a route's running
//!   count is its group's pending count, cluster-wide: a node takes a job
//!   only while that count is under the route's `concurrency`.
//! - Every change is one Lua script, so checks and writes are atomic:
//!   idempotency, `max_queue` and the store on submission; concurrency,
//!   expiry and the take; the result and the acknowledgement.
//! - A node renews its running jobs every [`HEARTBEAT`] (`XCLAIM … JUSTID`
//!   resets their idle time). An entry idle past [`LEASE`] belonged to a
//!   node that died (or lost Redis): another node claims it
//!   (`XAUTOCLAIM`) and runs the job again (at-least-once).
//! - Nodes learn of work and of ends on two pub/sub channels, never by
//!   polling; a one-second tick expires waiting jobs, reclaims, renews and
//!   catches anything a broken subscription missed.
//!
//! Durability is Redis's: `appendonly yes` with `appendfsync always`
//! matches the embedded queue's (see docs/plugins/async-request.md).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;
use tokio::sync::{broadcast, Notify};

use crate::{
    idempotency, metrics, Accepted, Executor, Found, Job, Outcome, Refused, Status, EVERYONE,
};

/// How often a node renews the jobs it runs.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);
/// A job not renewed for this long is taken over by another node.
pub(crate) const LEASE: Duration = Duration::from_secs(5);
/// A job taken over this many times (its node died each time) ends as
/// failed rather than run again: it may be what kills the nodes.
const MAX_TAKEOVERS: u32 = 3;
/// Each call to Redis gets this long, reconnection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A subscription silent this long (the nodes publish every second) is
/// taken for dead and made again.
const SILENCE: Duration = Duration::from_secs(3);
/// The most jobs a node takes from a route in one call.
const TAKE_BATCH: usize = 64;
/// How many a node claims from a dead node's work per route and round.
const RECLAIM_BATCH: usize = 16;
/// Every this many ticks, consumers of nodes gone for an hour are removed.
const FORGET_EVERY: u64 = 60;
/// Every this many ticks (and at the first), Redis's eviction policy is
/// checked.
const CHECK_EVERY: u64 = 3600;
/// Published with a route name when it has work or a free slot (and
/// empty, every second, by each node: a live subscription hears it).
const WORK: &str = "turnpike:async:work";
/// Published with a job id when it starts or ends.
const ENDED: &str = "turnpike:async:ended";
/// Every route that has had a job.
const ROUTES: &str = "turnpike:async:routes";

fn job_key(id: &str) -> String {
    format!("turnpike:async:job:{id}")
}

fn stream_key(route: &str) -> String {
    format!("turnpike:async:q:{route}")
}

/// Lua shared by the scripts. Time is Redis's (`TIME`), so nodes whose
/// clocks differ still agree on what expired.
const COMMON: &str = r#"
local ROUTES, CONCURRENCY = 'turnpike:async:routes', 'turnpike:async:concurrency'
local WORK, ENDED = 'turnpike:async:work', 'turnpike:async:ended'
local DELIVERIES = 'turnpike:async:deliveries'
local function job_key(id) return 'turnpike:async:job:' .. id end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The group's last delivered entry and pending count (XINFO is O(1) per
-- group; the XPENDING summary walks every consumer).
local function group(stream)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == 'workers' then return f['last-delivered-id'], f['pending'] end
  end
  return '0-0', 0
end
local function waiting(stream)
  local _, pending = group(stream)
  return redis.call('XLEN', stream) - pending
end
-- A job's hash and its idempotency key live `ms` more (or, with nil, until ended).
local function live(key, ms)
  local idem = redis.call('HGET', key, 'idem')
  for _, k in ipairs({key, idem or nil}) do
    if ms then redis.call('PEXPIRE', k, ms) else redis.call('PERSIST', k) end
  end
end
local function kept(key) return tonumber(redis.call('HGET', key, 'rttl')) * 1000 end
-- A job that ends with a webhook leaves its delivery due, at once.
local function ended(key, id, now)
  if redis.call('HGET', key, 'cb') == '1' then redis.call('ZADD', DELIVERIES, now, id) end
  redis.call('PUBLISH', ENDED, id)
end
-- Marks a queued job expired; returns its job JSON.
local function expire(id, now)
  local key = job_key(id)
  redis.call('HSET', key, 'state', 'expired', 'fin', now)
  redis.call('HDEL', key, 'body')
  live(key, kept(key))
  ended(key, id, now)
  return redis.call('HGET', key, 'job')
end
"#;

/// KEYS: stream, job hash, idempotency key (or the job hash again).
/// ARGV: id, job JSON, body, ttl ms, max_queue, result_ttl s, route,
/// has key ("1"), concurrency, has a webhook ("1"). Returns {id, 0 new |
/// 1 repeated | 2 full}.
const SUBMIT: &str = r#"
if ARGV[8] == '1' then
  local first = redis.call('GET', KEYS[3])
  if first and redis.call('EXISTS', job_key(first)) == 1 then return {first, 1} end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], 'workers', '0', 'MKSTREAM')
end
if waiting(KEYS[1]) >= tonumber(ARGV[5]) then return {'', 2} end
local sid = redis.call('XADD', KEYS[1], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[2], 'job', ARGV[2], 'body', ARGV[3], 'state', 'queued',
  'exp', now_ms() + tonumber(ARGV[4]), 'sid', sid, 'route', ARGV[7], 'rttl', ARGV[6], 'cb', ARGV[10])
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[2], 'idem', KEYS[3])
  redis.call('SET', KEYS[3], ARGV[1])
end
live(KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[6]) * 1000)
redis.call('SADD', ROUTES, ARGV[7])
redis.call('HSET', CONCURRENCY, ARGV[7], ARGV[9])
redis.call('PUBLISH', WORK, ARGV[7])
return {ARGV[1], 0}
"#;

/// KEYS: stream. ARGV: route, node, batch. Takes the next jobs while the
/// route runs fewer than its concurrency (cluster-wide), expiring the
/// stale ones on the way. Returns {{{sid, job JSON, body}, …}, {expired
/// job JSON, …}, waiting, {ids whose hash was gone, …}}.
const TAKE: &str = r#"
local taken, expired, lost = {}, {}, {}
if redis.call('EXISTS', KEYS[1]) == 0 then return {taken, expired, 0, lost} end
local now = now_ms()
local limit = tonumber(redis.call('HGET', CONCURRENCY, ARGV[1]) or '1')
for _ = 1, 100 do
  local _, pending = group(KEYS[1])
  local want = math.min(limit - pending, tonumber(ARGV[3]) - #taken)
  if want <= 0 then break end
  local r = redis.call('XREADGROUP', 'GROUP', 'workers', ARGV[2], 'COUNT', want, 'STREAMS', KEYS[1], '>')
  if not r then break end
  for _, e in ipairs(r[1][2]) do
    local sid, id = e[1], e[2][2]
    local key = job_key(id)
    local f = redis.call('HMGET', key, 'exp', 'state', 'job', 'body')
    if f[2] == 'queued' and tonumber(f[1]) > now then
      redis.call('HSET', key, 'state', 'running', 'node', ARGV[2])
      live(key, nil)
      redis.call('PUBLISH', ENDED, id)
      table.insert(taken, {sid, f[3], f[4] or ''})
    else
      if f[2] == 'queued' then table.insert(expired, expire(id, now)) end
      if not f[2] then table.insert(lost, id) end
      redis.call('XACK', KEYS[1], 'workers', sid)
      redis.call('XDEL', KEYS[1], sid)
    end
  end
  if #r[1][2] < want then break end
end
return {taken, expired, waiting(KEYS[1]), lost}
"#;

/// KEYS: stream. ARGV: route, forget ("1": remove consumers idle an hour
/// with nothing pending). Expires the waiting jobs past their ttl at the
/// head of the route, and forgets a route with nothing in it (a
/// submission makes it again). Returns {{expired job JSON, …}, waiting}.
const EXPIRE: &str = r#"
local expired = {}
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SREM', ROUTES, ARGV[1])
  return {expired, 0}
end
local last, pending = group(KEYS[1])
if redis.call('XLEN', KEYS[1]) == 0 and pending == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', ROUTES, ARGV[1])
  redis.call('HDEL', CONCURRENCY, ARGV[1])
  return {expired, 0}
end
local now = now_ms()
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 256)) do
  local f = redis.call('HMGET', job_key(e[2][2]), 'exp', 'state')
  if f[2] == 'queued' and tonumber(f[1]) > now then break end
  if f[2] == 'queued' then table.insert(expired, expire(e[2][2], now)) end
  redis.call('XDEL', KEYS[1], e[1])
end
if ARGV[2] == '1' then
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], 'workers')) do
    local f = {}
    for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
    if f['pending'] == 0 and f['idle'] > 3600000 then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], 'workers', f['name'])
    end
  end
end
return {expired, waiting(KEYS[1])}
"#;

/// KEYS: stream. ARGV: node, lease ms, count, most takeovers. Claims the
/// entries of nodes silent past the lease. Returns {{{sid, job JSON,
/// body}, …}, {{sid, job JSON}, …} taken over too often}.
const RECLAIM: &str = r#"
local out, failed = {}, {}
if redis.call('EXISTS', KEYS[1]) == 0 then return {out, failed} end
local cursor = '0-0'
for _ = 1, 10 do
  local r = redis.call('XAUTOCLAIM', KEYS[1], 'workers', ARGV[1], ARGV[2], cursor, 'COUNT', ARGV[3])
  for _, e in ipairs(r[2]) do
    local key = job_key(e[2][2])
    local f = redis.call('HMGET', key, 'state', 'job', 'body')
    if f[1] == 'running' or f[1] == 'queued' then
      redis.call('HSET', key, 'state', 'running', 'node', ARGV[1])
      live(key, nil)
      if redis.call('HINCRBY', key, 'takeovers', 1) > tonumber(ARGV[4]) then
        table.insert(failed, {e[1], f[2]})
      else
        table.insert(out, {e[1], f[2], f[3] or ''})
      end
    else
      redis.call('XACK', KEYS[1], 'workers', e[1])
      redis.call('XDEL', KEYS[1], e[1])
    end
  end
  cursor = r[1]
  if cursor == '0-0' or #out + #failed >= tonumber(ARGV[3]) then break end
end
return {out, failed}
"#;

/// KEYS: job hash, stream. ARGV: sid, answer JSON, body, id, route, node.
/// Returns 1 if this call (or this node's earlier one for the same
/// delivery, whose reply was lost) stored the end, 0 if another node had,
/// 2 if the job is gone from Redis.
const END: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'ender')
redis.call('XACK', KEYS[2], 'workers', ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
redis.call('PUBLISH', WORK, ARGV[5])
local ender = ARGV[6] .. ' ' .. ARGV[1]
if not f[1] then return 2 end
if f[1] == 'done' and f[2] == ender then return 1 end
if f[1] ~= 'running' then return 0 end
local now = now_ms()
redis.call('HSET', KEYS[1], 'state', 'done', 'ans', ARGV[2], 'res', ARGV[3], 'fin', now, 'ender', ender)
redis.call('HDEL', KEYS[1], 'body')
live(KEYS[1], kept(KEYS[1]))
ended(KEYS[1], ARGV[4], now)
return 1
"#;

/// KEYS: job hash. Returns {} or {job, state, answer, body, fin, ahead}
/// (`ahead` counts at most 1,000).
const FIND: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'job', 'state', 'exp', 'ans', 'res', 'fin', 'sid', 'route')
if not f[1] then return {} end
local state, ahead = f[2], 0
if state == 'queued' and tonumber(f[3]) <= now_ms() then state = 'expired' end
if state == 'queued' then
  local stream = 'turnpike:async:q:' .. f[8]
  if redis.call('EXISTS', stream) == 1 then
    local last = group(stream)
    ahead = #redis.call('XRANGE', stream, '(' .. last, '(' .. f[7], 'COUNT', 1000)
  end
end
return {f[1], state, f[4] or '', f[5] or '', f[6] or '0', ahead}
"#;

/// ARGV: lease ms, count. Takes the webhook deliveries due (each due
/// again after the lease unless settled). Returns {{id, failed}, …}.
const DUE: &str = r#"
local now = now_ms()
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', DELIVERIES, '-inf', now, 'LIMIT', 0, ARGV[2])) do
  redis.call('ZADD', DELIVERIES, now + tonumber(ARGV[1]), id)
  table.insert(out, {id, tonumber(redis.call('HGET', job_key(id), 'attempts') or '0')})
end
return out
"#;

/// ARGV: id, failed attempts ("" when done), wait ms. Settles a delivery.
const SETTLE: &str = r#"
if ARGV[2] == '' then
  redis.call('ZREM', DELIVERIES, ARGV[1])
  return 0
end
redis.call('ZADD', DELIVERIES, now_ms() + tonumber(ARGV[3]), ARGV[1])
local key = job_key(ARGV[1])
if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'attempts', ARGV[2]) end
return 0
"#;

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{COMMON}{body}"))
}

static SCRIPTS: LazyLock<[redis::Script; 8]> =
    LazyLock::new(|| [SUBMIT, TAKE, EXPIRE, RECLAIM, END, FIND, DUE, SETTLE].map(script));

#[derive(Clone, Copy)]
enum Lua {
    Submit,
    Take,
    Expire,
    Reclaim,
    End,
    Find,
    Due,
    Settle,
}

/// A job taken by this node: its stream entry, the job and its body.
type Taken = (String, Vec<u8>, Vec<u8>);

/// TAKE's answer: jobs taken, jobs expired, jobs waiting, ids gone.
type TakeReply = (Vec<Taken>, Vec<Vec<u8>>, usize, Vec<String>);

pub struct Cluster {
    client: redis::Client,
    address: String,
    conn: tokio::sync::OnceCell<ConnectionManager>,
    /// This node's consumer name in every route's group.
    node: String,
    pub(crate) ended: broadcast::Sender<String>,
    /// Told when this node ends a job with a webhook.
    pub(crate) delivery: Notify,
    /// Jobs this node runs: id → (route, stream entry).
    running: Mutex<HashMap<String, (String, String)>>,
    /// Routes told to have work since the last round.
    hinted: Mutex<HashSet<String>>,
    /// Jobs waiting per route, as last seen (the depth metric's parts).
    depths: Mutex<HashMap<String, usize>>,
    wake: Notify,
    up: AtomicBool,
    /// When Redis last answered after not answering: other nodes get a
    /// lease to renew their jobs before this one takes any over.
    back: Mutex<std::time::Instant>,
    /// [`LEASE`], shorter in tests.
    pub(crate) lease: Duration,
}

impl Cluster {
    /// A node of the queue shared through the Redis at `url`. Connects on
    /// first use: a node started while Redis is down serves, and answers
    /// submissions 503, until it is back.
    pub fn open(url: &str) -> Result<Arc<Cluster>, String> {
        Cluster::open_with_lease(url, LEASE)
    }

    /// [`Cluster::open`] with another lease (tests).
    pub(crate) fn open_with_lease(url: &str, lease: Duration) -> Result<Arc<Cluster>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("gateway.redis.url: {e}"))?;
        let address = client.get_connection_info().addr.to_string();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let node = format!(
            "{}:{}:{}",
            host.trim(),
            std::process::id(),
            &crate::new_id()[..8]
        );
        Ok(Arc::new(Cluster {
            client,
            address,
            conn: tokio::sync::OnceCell::new(),
            node,
            ended: broadcast::channel(1024).0,
            delivery: Notify::new(),
            running: Mutex::default(),
            hinted: Mutex::default(),
            depths: Mutex::default(),
            wake: Notify::new(),
            up: AtomicBool::new(false),
            back: Mutex::new(std::time::Instant::now()),
            lease,
        }))
    }

    /// Whether the last call to Redis worked.
    pub fn up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    async fn connection(&self) -> Result<ConnectionManager, Refused> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                // One quick retry, not redis-rs's default minute of them:
                // callers answer 503 rather than hang.
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Duration::from_secs(2))
                    .set_response_timeout(Duration::from_secs(2))
                    .set_number_of_retries(1)
                    .set_max_delay(1000);
                ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await;
        conn.cloned().map_err(|e| self.down(e))
    }

    fn down(&self, e: impl std::fmt::Display) -> Refused {
        self.up.store(false, Ordering::Release);
        Refused::Store(format!("async queue Redis {}: {e}", self.address))
    }

    /// Sends one call to Redis within [`CALL_TIMEOUT`], noting whether
    /// Redis answered.
    async fn call<T, F>(&self, send: impl FnOnce(ConnectionManager) -> F) -> Result<T, Refused>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let answered = tokio::time::timeout(CALL_TIMEOUT, async {
            let conn = self.connection().await?;
            send(conn).await.map_err(|e| {
                // An error reply (a refused command, a script's error) is
                // Redis answering: only a failed exchange means it is down.
                if e.kind() == redis::ErrorKind::ResponseError
                    || e.kind() == redis::ErrorKind::ExtensionError
                {
                    Refused::Store(format!("async queue Redis {}: {e}", self.address))
                } else {
                    self.down(e)
                }
            })
        })
        .await
        .unwrap_or_else(|_| Err(self.down(format!("no answer in {CALL_TIMEOUT:?}"))))?;
        if !self.up.swap(true, Ordering::AcqRel) {
            *self.back.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        }
        Ok(answered)
    }

    /// Runs one of the scripts with `keys` and `args`.
    async fn run_script<T: redis::FromRedisValue>(
        &self,
        which: Lua,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, Refused> {
        let mut invocation = SCRIPTS[which as usize].prepare_invoke();
        for k in keys {
            invocation.key(*k);
        }
        for a in args {
            invocation.arg(*a);
        }
        self.call(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await
    }

    pub async fn submit(
        &self,
        job: Job,
        body: Bytes,
        max_queue: usize,
    ) -> Result<Accepted, Refused> {
        let idem = idempotency(&job).map(|k| format!("turnpike:async:idem:{k}"));
        let (stream, key) = (stream_key(&job.route), job_key(&job.id));
        let json = serde_json::to_vec(&job).map_err(crate::fail)?;
        let numbers = [
            job.expires.saturating_sub(job.submitted).max(1),
            max_queue as u64,
            job.result_ttl,
            u64::from(job.concurrency.max(1)),
        ]
        .map(|n| n.to_string());
        let has_key = if idem.is_some() { "1" } else { "0" };
        let has_webhook = if job.callback.is_some() { "1" } else { "0" };
        let (id, answer): (String, u8) = self
            .run_script(
                Lua::Submit,
                &[&stream, &key, idem.as_deref().unwrap_or(&key)],
                &[
                    job.id.as_bytes(),
                    &json,
                    &body,
                    numbers[0].as_bytes(),
                    numbers[1].as_bytes(),
                    numbers[2].as_bytes(),
                    job.route.as_bytes(),
                    has_key.as_bytes(),
                    numbers[3].as_bytes(),
                    has_webhook.as_bytes(),
                ],
            )
            .await?;
        match answer {
            2 => Err(Refused::Full),
            repeated => Ok(Accepted {
                id,
                repeated: repeated == 1,
            }),
        }
    }

    pub async fn find(&self, id: &str) -> Result<Found, Refused> {
        type Row = (Vec<u8>, String, Vec<u8>, Vec<u8>, String, usize);
        let rows: Vec<redis::Value> = self.run_script(Lua::Find, &[&job_key(id)], &[]).await?;
        if rows.is_empty() {
            return Ok(Found::Unknown);
        }
        let (job, state, answer, body, finished, ahead): Row =
            redis::FromRedisValue::from_redis_value(&redis::Value::Array(rows))
                .map_err(crate::fail)?;
        let job: Job = serde_json::from_slice(&job).map_err(crate::fail)?;
        Ok(match state.as_str() {
            "queued" => Found::Waiting {
                job,
                status: Status::Queued,
                ahead,
            },
            "running" => Found::Waiting {
                job,
                status: Status::Running,
                ahead: 0,
            },
            "done" => Found::Done {
                job,
                answer: serde_json::from_slice(&answer).map_err(crate::fail)?,
                body: Bytes::from(body),
                finished: finished.parse().unwrap_or(0),
            },
            _ => Found::Expired { job },
        })
    }

    /// Works for the cluster until the queue is dropped: takes jobs when
    /// told of work, and every second expires, reclaims and takes from
    /// every route. Renewals run on their own (see [`Cluster::renew`]).
    pub async fn run(self: Arc<Self>, exec: Executor) {
        tokio::spawn(follow(Arc::downgrade(&self)));
        tokio::spawn(renewals(Arc::downgrade(&self)));
        let mut tick = tokio::time::interval(HEARTBEAT);
        let (mut said, mut ticks) = (false, 0u64);
        loop {
            let all = tokio::select! {
                _ = self.wake.notified() => false,
                _ = tick.tick() => true,
            };
            let round = async {
                if all {
                    ticks += 1;
                    self.tick(&exec, ticks).await?;
                }
                self.take_hinted(&exec).await
            };
            match round.await {
                Ok(()) if said => {
                    tracing::info!("async queue: Redis {} is back", self.address);
                    said = false;
                }
                Ok(()) => {}
                Err(e) if !said => {
                    tracing::warn!("async queue: {e:?}; jobs wait until it is back");
                    said = true;
                }
                Err(_) => {}
            }
        }
    }

    /// Every route that has had a job.
    pub(crate) async fn routes(&self) -> Result<Vec<String>, Refused> {
        self.call(|mut conn| async move {
            redis::cmd("SMEMBERS")
                .arg(ROUTES)
                .query_async(&mut conn)
                .await
        })
        .await
    }

    /// Once a second: tells the other nodes this one listens, then per
    /// route expires waiting jobs and reclaims dead nodes' work, and marks
    /// every route for taking. A route's failure does not stop the others.
    async fn tick(self: &Arc<Self>, exec: &Executor, ticks: u64) -> Result<(), Refused> {
        self.call(|mut conn| async move {
            redis::cmd("PUBLISH")
                .arg(WORK)
                .arg("")
                .query_async::<()>(&mut conn)
                .await
        })
        .await?;
        let forget = ticks.is_multiple_of(FORGET_EVERY);
        if ticks % CHECK_EVERY == 1 {
            self.check_eviction().await;
        }
        let reclaim = self
            .back
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            > self.lease;
        for route in self.routes().await? {
            if let Err(e) = self.tend(exec, &route, forget, reclaim).await {
                tracing::warn!("async queue: route {route}: {e:?}");
            }
            self.hinted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(route);
        }
        Ok(())
    }

    /// Warns (every [`FORGET_EVERY`] ticks) when Redis may evict keys: a
    /// waiting job's keys expire with its ttl, so the `volatile-*`
    /// policies would drop accepted requests first. A Redis that does not
    /// allow `CONFIG` (managed services) is taken on trust.
    pub(crate) async fn check_eviction(&self) {
        let policy = self
            .call(|mut conn| async move {
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("maxmemory-policy")
                    .query_async::<Vec<String>>(&mut conn)
                    .await
            })
            .await;
        if let Ok(pair) = policy {
            if let Some(policy) = pair.get(1).filter(|p| *p != "noeviction") {
                tracing::warn!("async queue: Redis {} has maxmemory-policy {policy}: it may evict accepted requests; set noeviction", self.address);
            }
        }
    }

    /// Expires a route's stale waiting jobs and, with `reclaim`, takes
    /// over the jobs of nodes silent past the lease.
    pub(crate) async fn tend(
        self: &Arc<Self>,
        exec: &Executor,
        route: &str,
        forget: bool,
        reclaim: bool,
    ) -> Result<(), Refused> {
        let stream = stream_key(route);
        let forget = if forget { "1" } else { "0" };
        let (expired, waiting): (Vec<Vec<u8>>, usize) = self
            .run_script(
                Lua::Expire,
                &[&stream],
                &[route.as_bytes(), forget.as_bytes()],
            )
            .await?;
        self.set_depth(route, waiting);
        self.expired(expired);
        if !reclaim {
            return Ok(());
        }
        let (lease, count, most) = (
            self.lease.as_millis().to_string(),
            RECLAIM_BATCH.to_string(),
            MAX_TAKEOVERS.to_string(),
        );
        let (claimed, failed): (Vec<Taken>, Vec<(String, Vec<u8>)>) = self
            .run_script(
                Lua::Reclaim,
                &[&stream],
                &[
                    self.node.as_bytes(),
                    lease.as_bytes(),
                    count.as_bytes(),
                    most.as_bytes(),
                ],
            )
            .await?;
        if !claimed.is_empty() {
            tracing::warn!(
                "async queue: {} jobs of route {route} taken over from a silent node; they run again",
                claimed.len()
            );
        }
        for taken in claimed {
            self.start(exec, route, taken);
        }
        for (sid, job) in failed {
            self.give_up(route, sid, &job);
        }
        Ok(())
    }

    /// Ends a job whose nodes died under it [`MAX_TAKEOVERS`] times: 502.
    fn give_up(self: &Arc<Self>, route: &str, sid: String, job: &[u8]) {
        let Ok(job) = serde_json::from_slice::<Job>(job) else {
            tracing::error!("async queue: unreadable job in route {route}");
            return;
        };
        // Renewed while its end is stored, like a running job.
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.id.clone(), (route.to_owned(), sid.clone()));
        tracing::error!(
            "async queue: {} was taken over {MAX_TAKEOVERS} times (its node stopped each time); it ends as failed",
            job.id
        );
        let outcome = failure("the request was started several times and never finished: each gateway running it stopped");
        let me = self.clone();
        tokio::spawn(async move {
            let _running = Running(me.clone(), job.id.clone());
            me.finish(job, sid, outcome).await;
        });
    }

    fn set_depth(&self, route: &str, waiting: usize) {
        let mut depths = self.depths.lock().unwrap_or_else(|e| e.into_inner());
        depths.insert(route.to_owned(), waiting);
        metrics::depth(depths.values().sum());
    }

    /// Takes jobs from the routes told to have work: one call per route.
    pub(crate) async fn take_hinted(self: &Arc<Self>, exec: &Executor) -> Result<(), Refused> {
        let routes: Vec<String> = self
            .hinted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        let batch = TAKE_BATCH.to_string();
        for route in routes {
            let took: Result<TakeReply, Refused> = self
                .run_script(
                    Lua::Take,
                    &[&stream_key(&route)],
                    &[route.as_bytes(), self.node.as_bytes(), batch.as_bytes()],
                )
                .await;
            let (taken, expired, waiting, lost) = match took {
                Ok(took) => took,
                // Redis down: the round ends (and says so once).
                Err(e) if !self.up() => return Err(e),
                // This route's trouble is its own.
                Err(e) => {
                    tracing::warn!("async queue: route {route}: {e:?}");
                    continue;
                }
            };
            self.set_depth(&route, waiting);
            self.expired(expired);
            for id in lost {
                tracing::error!("async queue: {id} of route {route} is gone from Redis (evicted, or Redis restarted without its data); it cannot run");
            }
            for t in taken {
                self.start(exec, &route, t);
            }
        }
        Ok(())
    }

    /// Tells of jobs this node marked expired.
    fn expired(&self, jobs: Vec<Vec<u8>>) {
        for json in jobs {
            if let Ok(job) = serde_json::from_slice::<Job>(&json) {
                metrics::ended(&Status::Expired, None);
                if job.callback.is_some() {
                    self.delivery.notify_one();
                }
            }
        }
    }

    /// Runs a taken job on this node (unless it already does: a reclaim
    /// of its own entry after a stall).
    fn start(self: &Arc<Self>, exec: &Executor, route: &str, (sid, job, body): Taken) {
        let job: Job = match serde_json::from_slice(&job) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(
                    "async queue: unreadable job in route {route}: {e}; it ends as failed"
                );
                let id = String::from_utf8_lossy(&job).into_owned();
                tokio::spawn(self.clone().drop_unreadable(route.to_owned(), sid, id));
                return;
            }
        };
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if running.contains_key(&job.id) {
                return;
            }
            running.insert(job.id.clone(), (route.to_owned(), sid.clone()));
        }
        metrics::started(&job);
        let (me, exec) = (self.clone(), exec.clone());
        tokio::spawn(async move {
            // Let go of the job however the call ends (a panic included).
            let _running = Running(me.clone(), job.id.clone());
            let started = std::time::Instant::now();
            let outcome = exec(job.clone(), Bytes::from(body)).await;
            metrics::ran(started.elapsed());
            me.finish(job, sid, outcome).await;
        });
    }

    /// Acknowledges an entry whose job cannot be read, so it does not
    /// hold a slot of its route for ever.
    async fn drop_unreadable(self: Arc<Self>, route: String, sid: String, what: String) {
        let stream = stream_key(&route);
        let acked = self
            .call(|mut conn| async move {
                redis::pipe()
                    .cmd("XACK")
                    .arg(&stream)
                    .arg("workers")
                    .arg(&sid)
                    .cmd("XDEL")
                    .arg(&stream)
                    .arg(&sid)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await;
        if let Err(e) = acked {
            tracing::warn!("async queue: cannot drop {what:.64}: {e:?}");
        }
    }

    /// Stores a job's answer, trying again while Redis is away; then tells
    /// of it. A result never stored lets the job go: the node that claims
    /// it after the lease runs it again.
    async fn finish(self: Arc<Self>, job: Job, sid: String, outcome: Outcome) {
        for attempt in 1..=10 {
            match self.end(&job, &sid, &outcome).await {
                Ok(1) => {
                    metrics::ended(&Status::Done, Some(&outcome));
                    if job.callback.is_some() {
                        self.delivery.notify_one();
                    }
                    return;
                }
                Ok(2) => {
                    tracing::error!("async queue: {} is gone from Redis (evicted, or Redis restarted without its data); its result is dropped", job.id);
                    return;
                }
                // Another node ran it too and stored its result first.
                Ok(_) => return,
                Err(e) if attempt == 10 => {
                    tracing::error!(
                        "async queue: cannot store the result of {}: {e:?}; it will run again",
                        job.id
                    );
                }
                Err(_) => tokio::time::sleep(HEARTBEAT).await,
            }
        }
    }

    /// Stores a job's answer: 1 stored, 0 another node had, 2 job gone.
    async fn end(&self, job: &Job, sid: &str, outcome: &Outcome) -> Result<u8, Refused> {
        let answer = serde_json::to_vec(&outcome.answer).map_err(crate::fail)?;
        self.run_script(
            Lua::End,
            &[&job_key(&job.id), &stream_key(&job.route)],
            &[
                sid.as_bytes(),
                &answer,
                &outcome.body,
                job.id.as_bytes(),
                job.route.as_bytes(),
                self.node.as_bytes(),
            ],
        )
        .await
    }

    /// Tells Redis this node still runs its jobs: `XCLAIM … JUSTID`
    /// restarts their idle time. Each route on its own: one whose stream
    /// is gone (Redis restarted empty) does not stop the others.
    async fn renew(&self) {
        let mut by_route: HashMap<String, Vec<String>> = HashMap::new();
        for (route, sid) in self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            by_route.entry(route.clone()).or_default().push(sid.clone());
        }
        for (route, sids) in by_route {
            let renewed = self
                .call(|mut conn| async move {
                    redis::cmd("XCLAIM")
                        .arg(stream_key(&route))
                        .arg("workers")
                        .arg(&self.node)
                        .arg(0)
                        .arg(&sids)
                        .arg("JUSTID")
                        .query_async::<redis::Value>(&mut conn)
                        .await
                })
                .await;
            if let Err(e) = renewed {
                tracing::debug!("async queue: renewal: {e:?}");
            }
        }
    }

    /// The webhook deliveries due, each with its failed attempts, taken by
    /// this node for [`crate::deliveries::LEASE`].
    pub(crate) async fn due(&self) -> Result<Vec<(String, u32)>, Refused> {
        let lease = crate::deliveries::LEASE.as_millis().to_string();
        let batch = crate::deliveries::BATCH.to_string();
        self.run_script(Lua::Due, &[], &[lease.as_bytes(), batch.as_bytes()])
            .await
    }

    /// Stores a delivery's outcome: done (`None`), or failed so many
    /// times and due again after the backoff.
    pub(crate) async fn settle(&self, id: &str, failed: Option<u32>) -> Result<(), Refused> {
        let (failed, wait) = match failed {
            None => (String::new(), String::new()),
            Some(n) => (
                n.to_string(),
                crate::deliveries::backoff(n).as_millis().to_string(),
            ),
        };
        self.run_script::<()>(
            Lua::Settle,
            &[],
            &[id.as_bytes(), failed.as_bytes(), wait.as_bytes()],
        )
        .await
    }

    /// A route has work (or a free slot): take from it on the next round.
    pub(crate) fn hint(&self, route: String) {
        if route.is_empty() {
            return;
        }
        self.hinted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(route);
        self.wake.notify_one();
    }
}

/// Removes a job from its node's running set when its task ends.
struct Running(Arc<Cluster>, String);

impl Drop for Running {
    fn drop(&mut self) {
        self.0
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

/// The answer stored for a job the gateway could not run.
fn failure(why: &str) -> Outcome {
    Outcome::error(502, why)
}

/// Renews this node's running jobs every [`HEARTBEAT`], apart from the
/// rounds (which may wait on a slow Redis). Ends with the queue.
async fn renewals(cluster: std::sync::Weak<Cluster>) {
    let mut every = tokio::time::interval(HEARTBEAT);
    loop {
        every.tick().await;
        let Some(c) = cluster.upgrade() else { return };
        c.renew().await;
    }
}

/// Follows the two channels: work wakes the taker, ends wake the waiters.
/// A subscription that hears nothing for [`SILENCE`] (every node publishes
/// each second) is made again; after any new subscription every waiter
/// looks again and every route is tried, so nothing published meanwhile
/// is missed for long.
async fn follow(cluster: std::sync::Weak<Cluster>) {
    use futures_util::StreamExt;
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let client = c.client.clone();
        drop(c);
        let subscribed = tokio::time::timeout(CALL_TIMEOUT, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&[WORK, ENDED]).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let Ok(Ok(mut pubsub)) = subscribed else {
            // `run` reports Redis being down.
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        if let Some(c) = cluster.upgrade() {
            let _ = c.ended.send(EVERYONE.to_owned());
            c.wake.notify_one();
        }
        let mut messages = pubsub.on_message();
        while let Ok(Some(msg)) = tokio::time::timeout(SILENCE, messages.next()).await {
            let Some(c) = cluster.upgrade() else { return };
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            if msg.get_channel_name() == WORK {
                c.hint(payload);
            } else {
                let _ = c.ended.send(payload);
            }
        }
    }
}
