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
    idempotency, metrics, now_ms, Accepted, Executor, Found, Job, OnEnd, Outcome, Refused, Status,
    EVERYONE,
};

/// How often a node renews the jobs it runs.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);
/// A job not renewed for this long is taken over by another node.
pub(crate) const LEASE: Duration = Duration::from_secs(5);
/// Published with a route name when it has work or a free slot.
const WORK: &str = "turnpike:async:work";
/// Published with a job id when it starts or ends.
const ENDED: &str = "turnpike:async:ended";
/// Every route that has had a job.
const ROUTES: &str = "turnpike:async:routes";
/// How many a node claims from a dead node's work per route and round.
const RECLAIM_BATCH: usize = 16;

fn job_key(id: &str) -> String {
    format!("turnpike:async:job:{id}")
}

fn stream_key(route: &str) -> String {
    format!("turnpike:async:q:{route}")
}

/// Lua shared by the scripts: key names and how a job expires.
const COMMON: &str = r#"
local function job_key(id) return 'turnpike:async:job:' .. id end
local function last_delivered(stream)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name, last
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] end
      if g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if name == 'workers' then return last end
  end
  return '0-0'
end
local function waiting(stream)
  return redis.call('XLEN', stream) - redis.call('XPENDING', stream, 'workers')[1]
end
-- Marks a queued job expired; returns its job JSON.
local function expire(id, now)
  local key = job_key(id)
  local job = redis.call('HGET', key, 'job')
  redis.call('HSET', key, 'state', 'expired', 'fin', now)
  redis.call('HDEL', key, 'body')
  redis.call('PEXPIRE', key, cjson.decode(job).result_ttl * 1000)
  redis.call('PUBLISH', 'turnpike:async:ended', id)
  return job
end
"#;

/// KEYS: stream, job hash, idempotency key (or the job hash again).
/// ARGV: id, job JSON, body, expires, max_queue, keep ms, route,
/// has key ("1"), concurrency. Returns {id, 0 new | 1 repeated | 2 full}.
const SUBMIT: &str = r#"
if ARGV[8] == '1' then
  local first = redis.call('GET', KEYS[3])
  if first and redis.call('EXISTS', job_key(first)) == 1 then return {first, 1} end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.pcall('XGROUP', 'CREATE', KEYS[1], 'workers', '0', 'MKSTREAM')
end
if waiting(KEYS[1]) >= tonumber(ARGV[5]) then return {'', 2} end
local sid = redis.call('XADD', KEYS[1], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[2], 'job', ARGV[2], 'body', ARGV[3], 'state', 'queued', 'exp', ARGV[4], 'sid', sid)
redis.call('PEXPIRE', KEYS[2], ARGV[6])
if ARGV[8] == '1' then redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[6]) end
redis.call('SADD', 'turnpike:async:routes', ARGV[7])
redis.call('HSET', 'turnpike:async:concurrency', ARGV[7], ARGV[9])
redis.call('PUBLISH', 'turnpike:async:work', ARGV[7])
return {ARGV[1], 0}
"#;

/// KEYS: stream. ARGV: route, node, now. Takes the next job if the route
/// runs fewer than its concurrency, expiring the stale ones on the way.
/// Returns {{sid, job JSON, body} or {}, {expired job JSON, …}}.
const TAKE: &str = r#"
local expired = {}
if redis.call('EXISTS', KEYS[1]) == 0 then return {{}, expired} end
local limit = tonumber(redis.call('HGET', 'turnpike:async:concurrency', ARGV[1]) or '1')
for _ = 1, 1000 do
  if redis.call('XPENDING', KEYS[1], 'workers')[1] >= limit then break end
  local r = redis.call('XREADGROUP', 'GROUP', 'workers', ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
  if not r then break end
  local sid, id = r[1][2][1][1], r[1][2][1][2][2]
  local key = job_key(id)
  local f = redis.call('HMGET', key, 'exp', 'state', 'job', 'body')
  if f[2] == 'queued' and tonumber(f[1]) > tonumber(ARGV[3]) then
    redis.call('HSET', key, 'state', 'running', 'node', ARGV[2])
    redis.call('PERSIST', key)
    redis.call('PUBLISH', 'turnpike:async:ended', id)
    return {{sid, f[3], f[4] or ''}, expired}
  end
  if f[2] == 'queued' then table.insert(expired, expire(id, ARGV[3])) end
  redis.call('XACK', KEYS[1], 'workers', sid)
  redis.call('XDEL', KEYS[1], sid)
end
return {{}, expired}
"#;

/// KEYS: stream. ARGV: now. Expires the waiting jobs past their ttl at
/// the head of the route. Returns {{expired job JSON, …}, waiting}.
const EXPIRE: &str = r#"
local expired = {}
if redis.call('EXISTS', KEYS[1]) == 0 then return {expired, 0} end
local entries = redis.call('XRANGE', KEYS[1], '(' .. last_delivered(KEYS[1]), '+', 'COUNT', 256)
for _, e in ipairs(entries) do
  local f = redis.call('HMGET', job_key(e[2][2]), 'exp', 'state')
  if f[2] == 'queued' and tonumber(f[1]) > tonumber(ARGV[1]) then break end
  if f[2] == 'queued' then table.insert(expired, expire(e[2][2], ARGV[1])) end
  redis.call('XDEL', KEYS[1], e[1])
end
return {expired, waiting(KEYS[1])}
"#;

/// KEYS: stream. ARGV: node, lease ms, count. Claims the entries of
/// nodes silent past the lease. Returns {{sid, job JSON, body}, …}.
const RECLAIM: &str = r#"
local out = {}
if redis.call('EXISTS', KEYS[1]) == 0 then return out end
local r = redis.call('XAUTOCLAIM', KEYS[1], 'workers', ARGV[1], ARGV[2], '0-0', 'COUNT', ARGV[3])
for _, e in ipairs(r[2]) do
  local key = job_key(e[2][2])
  local f = redis.call('HMGET', key, 'state', 'job', 'body')
  if f[1] == 'running' or f[1] == 'queued' then
    redis.call('HSET', key, 'state', 'running', 'node', ARGV[1])
    redis.call('PERSIST', key)
    table.insert(out, {e[1], f[2], f[3] or ''})
  else
    redis.call('XACK', KEYS[1], 'workers', e[1])
    redis.call('XDEL', KEYS[1], e[1])
  end
end
return out
"#;

/// KEYS: job hash, stream, idempotency key (or the job hash again).
/// ARGV: sid, answer JSON, body, now, keep ms, id, route, has key.
/// Returns 1 if this stored the end, 0 if another node had.
const END: &str = r#"
local state = redis.call('HGET', KEYS[1], 'state')
redis.call('XACK', KEYS[2], 'workers', ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
redis.call('PUBLISH', 'turnpike:async:work', ARGV[7])
if state ~= 'running' and state ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'ans', ARGV[2], 'res', ARGV[3], 'fin', ARGV[4])
redis.call('HDEL', KEYS[1], 'body')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if ARGV[8] == '1' then redis.call('PEXPIRE', KEYS[3], ARGV[5]) end
redis.call('PUBLISH', 'turnpike:async:ended', ARGV[6])
return 1
"#;

/// KEYS: job hash. Returns {} or {job, state, exp, answer, body, fin, ahead}.
const FIND: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'job', 'state', 'exp', 'ans', 'res', 'fin', 'sid')
if not f[1] then return {} end
local ahead = 0
if f[2] == 'queued' then
  local stream = 'turnpike:async:q:' .. cjson.decode(f[1]).route
  ahead = #redis.call('XRANGE', stream, '(' .. last_delivered(stream), '(' .. f[7], 'COUNT', 10000)
end
return {f[1], f[2], f[3], f[4] or '', f[5] or '', f[6] or '0', ahead}
"#;

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{COMMON}{body}"))
}

static SCRIPTS: LazyLock<[redis::Script; 6]> =
    LazyLock::new(|| [SUBMIT, TAKE, EXPIRE, RECLAIM, END, FIND].map(script));

#[derive(Clone, Copy)]
enum Lua {
    Submit,
    Take,
    Expire,
    Reclaim,
    End,
    Find,
}

/// A job taken by this node: its stream entry, the job and its body.
type Taken = (String, Vec<u8>, Vec<u8>);

pub struct Cluster {
    client: redis::Client,
    address: String,
    conn: tokio::sync::OnceCell<ConnectionManager>,
    /// This node's consumer name in every route's group.
    node: String,
    pub(crate) ended: broadcast::Sender<String>,
    on_end: OnEnd,
    /// Jobs this node runs: id → (route, stream entry).
    running: Mutex<HashMap<String, (String, String)>>,
    /// Routes told to have work since the last round.
    hinted: Mutex<HashSet<String>>,
    wake: Notify,
    up: AtomicBool,
}

impl Cluster {
    /// A node of the queue shared through the Redis at `url`. Connects on
    /// first use: a node started while Redis is down serves, and refuses
    /// submissions, until it is back.
    pub fn open(url: &str, on_end: OnEnd) -> Result<Arc<Cluster>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("gateway.redis.url: {e}"))?;
        let info = client.get_connection_info();
        let address = info.addr.to_string();
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
            on_end,
            running: Mutex::default(),
            hinted: Mutex::default(),
            wake: Notify::new(),
            up: AtomicBool::new(false),
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
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Duration::from_secs(2))
                    .set_response_timeout(Duration::from_secs(2));
                ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await;
        conn.cloned().map_err(|e| self.down(e))
    }

    fn down(&self, e: impl std::fmt::Display) -> Refused {
        self.up.store(false, Ordering::Release);
        Refused::Store(format!("async queue Redis {}: {e}", self.address))
    }

    /// Runs one of the scripts with `keys` and `args`.
    async fn run_script<T: redis::FromRedisValue>(
        &self,
        which: Lua,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, Refused> {
        let mut conn = self.connection().await?;
        let mut invocation = SCRIPTS[which as usize].prepare_invoke();
        for k in keys {
            invocation.key(*k);
        }
        for a in args {
            invocation.arg(*a);
        }
        let result = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.down(e))?;
        self.up.store(true, Ordering::Release);
        Ok(result)
    }

    pub async fn submit(
        &self,
        job: Job,
        body: Bytes,
        max_queue: usize,
    ) -> Result<Accepted, Refused> {
        let idem = idempotency(&job).map(|k| format!("turnpike:async:idem:{k}"));
        let (stream, key) = (stream_key(&job.route), job_key(&job.id));
        let keep = job.expires.saturating_sub(now_ms()) + job.result_ttl * 1000;
        let json = serde_json::to_vec(&job).map_err(crate::fail)?;
        let (expires, max_queue, keep, concurrency) = (
            job.expires.to_string(),
            max_queue.to_string(),
            keep.max(1).to_string(),
            job.concurrency.max(1).to_string(),
        );
        let has_key = if idem.is_some() { "1" } else { "0" };
        let (id, answer): (String, u8) = self
            .run_script(
                Lua::Submit,
                &[&stream, &key, idem.as_deref().unwrap_or(&key)],
                &[
                    job.id.as_bytes(),
                    &json,
                    &body,
                    expires.as_bytes(),
                    max_queue.as_bytes(),
                    keep.as_bytes(),
                    job.route.as_bytes(),
                    has_key.as_bytes(),
                    concurrency.as_bytes(),
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
        let row: Vec<redis::Value> = self.run_script(Lua::Find, &[&job_key(id)], &[]).await?;
        if row.len() < 7 {
            return Ok(Found::Unknown);
        }
        let text = |i: usize| -> Result<Vec<u8>, Refused> {
            redis::from_redis_value::<Vec<u8>>(&row[i]).map_err(crate::fail)
        };
        let number = |i: usize| -> u64 {
            redis::from_redis_value::<String>(&row[i])
                .ok()
                .and_then(|s| s.parse().ok())
                .or_else(|| redis::from_redis_value::<u64>(&row[i]).ok())
                .unwrap_or(0)
        };
        let job: Job = serde_json::from_slice(&text(0)?).map_err(crate::fail)?;
        let state = String::from_utf8_lossy(&text(1)?).into_owned();
        Ok(match state.as_str() {
            "queued" if number(2) <= now_ms() => Found::Expired { job },
            "queued" => Found::Waiting {
                job,
                status: Status::Queued,
                ahead: number(6) as usize,
            },
            "running" => Found::Waiting {
                job,
                status: Status::Running,
                ahead: 0,
            },
            "done" => Found::Done {
                job,
                answer: serde_json::from_slice(&text(3)?).map_err(crate::fail)?,
                body: Bytes::from(text(4)?),
                finished: number(5),
            },
            _ => Found::Expired { job },
        })
    }

    /// Works for the cluster until the queue is dropped: takes jobs when
    /// told of work, and every second expires, reclaims and renews.
    pub async fn run(self: Arc<Self>, exec: Executor) {
        tokio::spawn(follow(Arc::downgrade(&self)));
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut said = false;
        loop {
            let all = tokio::select! {
                _ = self.wake.notified() => false,
                _ = tick.tick() => true,
            };
            let round = async {
                if all {
                    self.renew().await?;
                    self.tick(&exec).await?;
                }
                self.take_hinted(&exec, all).await
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
    async fn routes(&self) -> Result<Vec<String>, Refused> {
        let mut conn = self.connection().await?;
        let routes = redis::cmd("SMEMBERS")
            .arg(ROUTES)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.down(e))?;
        self.up.store(true, Ordering::Release);
        Ok(routes)
    }

    /// Expires waiting jobs, reclaims dead nodes' work, sets the depth.
    async fn tick(self: &Arc<Self>, exec: &Executor) -> Result<(), Refused> {
        let now = now_ms().to_string();
        let lease = (LEASE.as_millis() as u64).to_string();
        let count = RECLAIM_BATCH.to_string();
        let mut depth = 0;
        for route in self.routes().await? {
            let stream = stream_key(&route);
            let (expired, waiting): (Vec<Vec<u8>>, usize) = self
                .run_script(Lua::Expire, &[&stream], &[now.as_bytes()])
                .await?;
            depth += waiting;
            self.expired(expired);
            let claimed: Vec<Taken> = self
                .run_script(
                    Lua::Reclaim,
                    &[&stream],
                    &[self.node.as_bytes(), lease.as_bytes(), count.as_bytes()],
                )
                .await?;
            if !claimed.is_empty() {
                tracing::warn!(
                    "async queue: {} jobs of route {route} taken over from a silent node; they run again",
                    claimed.len()
                );
            }
            for taken in claimed {
                self.start(exec, &route, taken);
            }
            self.hinted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(route);
        }
        metrics::depth(depth);
        Ok(())
    }

    /// Takes jobs from the routes told to have work (every route on a tick).
    async fn take_hinted(self: &Arc<Self>, exec: &Executor, all: bool) -> Result<(), Refused> {
        let routes: Vec<String> = {
            let mut hinted = self.hinted.lock().unwrap_or_else(|e| e.into_inner());
            if !all && hinted.is_empty() {
                return Ok(());
            }
            hinted.drain().collect()
        };
        for route in routes {
            let stream = stream_key(&route);
            loop {
                let now = now_ms().to_string();
                let (taken, expired): (Vec<Vec<u8>>, Vec<Vec<u8>>) = self
                    .run_script(
                        Lua::Take,
                        &[&stream],
                        &[route.as_bytes(), self.node.as_bytes(), now.as_bytes()],
                    )
                    .await?;
                self.expired(expired);
                let mut taken = taken.into_iter();
                let (Some(sid), Some(job), Some(body)) = (taken.next(), taken.next(), taken.next())
                else {
                    break;
                };
                self.start(
                    exec,
                    &route,
                    (String::from_utf8_lossy(&sid).into_owned(), job, body),
                );
            }
        }
        Ok(())
    }

    /// Tells of jobs this node marked expired.
    fn expired(&self, jobs: Vec<Vec<u8>>) {
        for json in jobs {
            if let Ok(job) = serde_json::from_slice::<Job>(&json) {
                metrics::ended(&Status::Expired, None);
                (self.on_end)(&job, None);
            }
        }
    }

    /// Runs a taken job on this node.
    fn start(self: &Arc<Self>, exec: &Executor, route: &str, (sid, job, body): Taken) {
        let job: Job = match serde_json::from_slice(&job) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!("async queue: unreadable job in route {route}: {e}");
                return;
            }
        };
        metrics::started(&job);
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.id.clone(), (route.to_owned(), sid.clone()));
        tokio::spawn(self.clone().work(exec.clone(), job, Bytes::from(body), sid));
    }

    /// Runs one job and stores its answer. A result that cannot be stored
    /// (Redis down) is tried for a while; then the job is let go, and the
    /// node that claims it after the lease runs it again.
    async fn work(self: Arc<Self>, exec: Executor, job: Job, body: Bytes, sid: String) {
        let started = std::time::Instant::now();
        let outcome = exec(job.clone(), body).await;
        metrics::ran(started.elapsed());
        let mut tries = 0;
        let stored = loop {
            match self.end(&job, &sid, &outcome).await {
                Ok(stored) => break Some(stored),
                Err(e) if tries >= 10 => {
                    tracing::error!(
                        "async queue: cannot store the result of {}: {e:?}; it will run again",
                        job.id
                    );
                    break None;
                }
                Err(_) => tries += 1,
            }
            tokio::time::sleep(HEARTBEAT).await;
        };
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&job.id);
        if stored == Some(true) {
            metrics::ended(&Status::Done, Some(&outcome));
            (self.on_end)(&job, Some(&outcome));
        }
    }

    /// Stores a job's answer; `false` when another node had already.
    async fn end(&self, job: &Job, sid: &str, outcome: &Outcome) -> Result<bool, Refused> {
        let idem = idempotency(job).map(|k| format!("turnpike:async:idem:{k}"));
        let key = job_key(&job.id);
        let answer = serde_json::to_vec(&outcome.answer).map_err(crate::fail)?;
        let (now, keep) = (
            now_ms().to_string(),
            (job.result_ttl * 1000).max(1).to_string(),
        );
        let has_key = if idem.is_some() { "1" } else { "0" };
        let stored: u8 = self
            .run_script(
                Lua::End,
                &[
                    &key,
                    &stream_key(&job.route),
                    idem.as_deref().unwrap_or(&key),
                ],
                &[
                    sid.as_bytes(),
                    &answer,
                    &outcome.body,
                    now.as_bytes(),
                    keep.as_bytes(),
                    job.id.as_bytes(),
                    job.route.as_bytes(),
                    has_key.as_bytes(),
                ],
            )
            .await?;
        Ok(stored == 1)
    }

    /// Tells Redis this node still runs its jobs (their idle time restarts).
    async fn renew(&self) -> Result<(), Refused> {
        let mut by_route: HashMap<String, Vec<String>> = HashMap::new();
        for (route, sid) in self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            by_route.entry(route.clone()).or_default().push(sid.clone());
        }
        if by_route.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (route, sids) in &by_route {
            pipe.cmd("XCLAIM")
                .arg(stream_key(route))
                .arg("workers")
                .arg(&self.node)
                .arg(0)
                .arg(sids)
                .arg("JUSTID")
                .ignore();
        }
        let mut conn = self.connection().await?;
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.down(e))
    }

    /// A route has work (or a free slot): take from it on the next round.
    fn hint(&self, route: String) {
        self.hinted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(route);
        self.wake.notify_one();
    }
}

/// Follows the two channels: work wakes the taker, ends wake the waiters.
/// After a broken subscription, every waiter looks again and every route
/// is tried, so nothing published meanwhile is missed for long.
async fn follow(cluster: std::sync::Weak<Cluster>) {
    use futures_util::StreamExt;
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let client = c.client.clone();
        drop(c);
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&[WORK, ENDED]).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        let mut pubsub = match subscribed {
            Ok(p) => p,
            Err(_) => {
                // `run` reports Redis being down.
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if let Some(c) = cluster.upgrade() {
            let _ = c.ended.send(EVERYONE.to_owned());
            c.wake.notify_one();
        }
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
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
