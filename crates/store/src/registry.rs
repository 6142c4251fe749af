//! The service registry: instances that announce themselves
//! (`PUT /turnpike/registry/{service}/{instance}`) and stay while they
//! renew within their TTL. Upstreams with `discovery_type: registry`
//! balance over a service's live instances.
//!
//! On one node the registry lives in memory, with each instance's
//! registration also kept in a redb file under `data_dir`, so a restart
//! serves the instances it knew (each counted as renewed at the start)
//! instead of none until their next renewal. In a cluster it lives in
//! Redis, so every node sees the same instances: each instance is a member
//! of a sorted set scored by its expiry (Redis's clock) with its data in a
//! hash, and every change is published on a channel that each node
//! subscribes to, re-reading the service named. Each node drops expired
//! instances from its copy by itself, every [`SWEEP`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::StoreError;

/// How often expired instances are dropped.
pub const SWEEP: Duration = Duration::from_millis(200);
/// The TTL of an instance that does not give one.
pub const DEFAULT_TTL: u64 = 30;
/// The longest TTL accepted (a day).
pub const MAX_TTL: u64 = 86_400;

const CHANNEL: &str = "turnpike:registry:changes";
const SERVICES: &str = "turnpike:registry:services";

/// What an instance says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// IP address or host name.
    pub address: String,
    pub port: u16,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub metadata: Value,
    /// Seconds without a renewal before the instance drops out.
    #[serde(default = "default_ttl")]
    pub ttl: u64,
}

fn one() -> u32 {
    1
}
fn default_ttl() -> u64 {
    DEFAULT_TTL
}

impl Registration {
    /// Why the registration cannot be taken, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if self.address.is_empty() || self.address.len() > 253 || self.address.contains(['/', ' '])
        {
            return Some("address must be an IP address or a host name".into());
        }
        if self.port == 0 {
            return Some("port must be 1 to 65535".into());
        }
        if !(1..=MAX_TTL).contains(&self.ttl) {
            return Some(format!("ttl must be 1 to {MAX_TTL} seconds"));
        }
        None
    }
}

/// A live instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    #[serde(flatten)]
    pub registration: Registration,
    /// Unix milliseconds after which it is gone unless renewed.
    pub expires: u64,
}

/// Services by name, each with its live instances by id.
type Services = BTreeMap<String, BTreeMap<String, Instance>>;

/// Called with a service's name when its set of instances (not just their
/// expiry) changed.
type OnChange = Box<dyn Fn(&str) + Send + Sync>;

/// Registrations of a one-node registry: `service/instance` → JSON.
const SAVED: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("instances");

pub struct Registry {
    services: Mutex<Services>,
    /// Where a one-node registry keeps its registrations.
    saved: Option<redb::Database>,
    on_change: Mutex<Option<OnChange>>,
    redis: Option<redis::Client>,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    /// `redis://host:port/db`, without credentials.
    address: String,
    up: std::sync::atomic::AtomicBool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What decides where traffic goes: instances without their expiry.
fn shape(instances: Option<&BTreeMap<String, Instance>>) -> Vec<(&str, &Registration)> {
    instances
        .into_iter()
        .flatten()
        .map(|(id, i)| (id.as_str(), &i.registration))
        .collect()
}

impl Registry {
    /// A registry in this process, keeping registrations in `dir` (when
    /// given) across restarts.
    pub fn local(dir: Option<&std::path::Path>) -> Result<Arc<Registry>, StoreError> {
        let saved = dir.map(open_saved).transpose()?;
        let services = match &saved {
            Some(db) => read_saved(db)?,
            None => Services::new(),
        };
        Ok(Arc::new(Registry {
            services: Mutex::new(services),
            saved,
            on_change: Mutex::default(),
            redis: None,
            conn: tokio::sync::OnceCell::new(),
            address: String::new(),
            up: std::sync::atomic::AtomicBool::new(true),
        }))
    }

    /// A registry shared through Redis at `url`; starts following it on
    /// the current runtime.
    pub fn redis(url: &str) -> Result<Arc<Registry>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("gateway.redis.url: {e}"))?;
        let info = client.get_connection_info();
        let address = format!("redis://{}/{}", info.addr, info.redis.db);
        let registry = Arc::new(Registry {
            services: Mutex::default(),
            saved: None,
            on_change: Mutex::default(),
            redis: Some(client),
            conn: tokio::sync::OnceCell::new(),
            address,
            up: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(follow(Arc::downgrade(&registry)));
        Ok(registry)
    }

    pub fn is_shared(&self) -> bool {
        self.redis.is_some()
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Whether Redis answered its last use (always, for a local registry).
    pub fn up(&self) -> bool {
        self.up.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn on_change(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        *self.on_change.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    fn changed(&self, service: &str) {
        if let Some(f) = &*self.on_change.lock().unwrap_or_else(|e| e.into_inner()) {
            f(service);
        }
    }

    /// A service's live instances, by id.
    pub fn instances(&self, service: &str) -> Vec<Instance> {
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_ms();
        services
            .get(service)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|i| i.expires > now)
            .cloned()
            .collect()
    }

    /// The services this node knows of.
    fn names(&self) -> Vec<String> {
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services.keys().cloned().collect()
    }

    /// Every service with its live instances.
    pub fn all(&self) -> BTreeMap<String, Vec<Instance>> {
        self.names()
            .into_iter()
            .map(|s| {
                let live = self.instances(&s);
                (s, live)
            })
            .filter(|(_, live)| !live.is_empty())
            .collect()
    }

    /// Registers or renews an instance; returns it with its expiry.
    pub async fn register(
        &self,
        service: &str,
        id: &str,
        registration: Registration,
    ) -> Result<Instance, StoreError> {
        if self.redis.is_none() {
            let instance = Instance {
                id: id.to_owned(),
                expires: now_ms() + registration.ttl * 1000,
                registration,
            };
            self.replace(service, |m| {
                m.insert(id.to_owned(), instance.clone());
            });
            return Ok(instance);
        }
        let data = serde_json::to_string(&registration)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let expires: u64 = self
            .script(
                REGISTER,
                service,
                &[id, &data, &registration.ttl.to_string()],
            )
            .await?;
        let instance = Instance {
            id: id.to_owned(),
            registration,
            expires,
        };
        // This node sees it at once; the others when the news arrives.
        self.replace(service, |m| {
            m.insert(id.to_owned(), instance.clone());
        });
        Ok(instance)
    }

    /// Removes an instance; whether it was there.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<bool, StoreError> {
        let known = self.instances(service).iter().any(|i| i.id == id);
        if self.redis.is_some() {
            let removed: u64 = self.script(DEREGISTER, service, &[id]).await?;
            self.replace(service, |m| {
                m.remove(id);
            });
            return Ok(removed > 0 || known);
        }
        self.replace(service, |m| {
            m.remove(id);
        });
        Ok(known)
    }

    /// Changes one service's instances, telling when traffic must follow.
    fn replace(&self, service: &str, change: impl FnOnce(&mut BTreeMap<String, Instance>)) {
        let changed = {
            let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
            let entry = services.entry(service.to_owned()).or_default();
            let before: Vec<(String, Registration)> = shape(Some(entry))
                .into_iter()
                .map(|(id, r)| (id.to_owned(), r.clone()))
                .collect();
            change(entry);
            let after = shape(Some(entry));
            let changed = before.len() != after.len()
                || before
                    .iter()
                    .zip(&after)
                    .any(|(b, a)| b.0 != a.0 || &b.1 != a.1);
            if changed {
                self.save(service, entry);
            }
            if entry.is_empty() {
                services.remove(service);
            }
            changed
        };
        if changed {
            self.changed(service);
        }
    }

    /// Drops expired instances; services whose set changed are told.
    pub fn sweep(&self) {
        let now = now_ms();
        let stale: Vec<String> = {
            let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
            services
                .iter()
                .filter(|(_, m)| m.values().any(|i| i.expires <= now))
                .map(|(s, _)| s.clone())
                .collect()
        };
        for service in stale {
            self.replace(&service, |m| m.retain(|_, i| i.expires > now));
        }
    }

    /// Writes one service's registrations (one-node registry only). A
    /// failure is logged: the registry in memory stays right, only a
    /// restart would miss the change.
    fn save(&self, service: &str, instances: &BTreeMap<String, Instance>) {
        use redb::ReadableTable;
        let Some(db) = &self.saved else { return };
        let write = || -> Result<(), Box<redb::Error>> {
            let txn = db.begin_write().map_err(redb::Error::from)?;
            {
                let mut table = txn.open_table(SAVED).map_err(redb::Error::from)?;
                let prefix = format!("{service}/");
                let stale: Vec<String> = table
                    .range(prefix.as_str()..)
                    .map_err(redb::Error::from)?
                    .map_while(|e| e.ok().map(|(k, _)| k.value().to_owned()))
                    .take_while(|k| k.starts_with(&prefix))
                    .collect();
                for k in stale {
                    table.remove(k.as_str()).map_err(redb::Error::from)?;
                }
                for (id, i) in instances {
                    let data = serde_json::to_vec(&i.registration).unwrap_or_default();
                    table
                        .insert(format!("{prefix}{id}").as_str(), data.as_slice())
                        .map_err(redb::Error::from)?;
                }
            }
            txn.commit().map_err(redb::Error::from)?;
            Ok(())
        };
        if let Err(e) = write() {
            tracing::warn!("registry: cannot save `{service}`: {e}");
        }
    }

    async fn connection(&self) -> Result<redis::aio::ConnectionManager, StoreError> {
        let client = self
            .redis
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("no Redis".into()))?;
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Duration::from_secs(2))
                    .set_response_timeout(Duration::from_secs(2));
                redis::aio::ConnectionManager::new_with_config(client.clone(), config).await
            })
            .await;
        conn.cloned().map_err(|e| self.down(e))
    }

    fn down(&self, e: impl std::fmt::Display) -> StoreError {
        self.up.store(false, std::sync::atomic::Ordering::Release);
        StoreError::Unavailable(format!("registry Redis {}: {e}", self.address))
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        script: &str,
        service: &str,
        args: &[&str],
    ) -> Result<T, StoreError> {
        let mut conn = self.connection().await?;
        let script = redis::Script::new(script);
        let mut invocation = script.prepare_invoke();
        invocation.key(format!("turnpike:registry:{{{service}}}:expiry"));
        invocation.key(format!("turnpike:registry:{{{service}}}:data"));
        invocation.arg(service);
        for a in args {
            invocation.arg(*a);
        }
        let result = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.down(e))?;
        self.up.store(true, std::sync::atomic::Ordering::Release);
        Ok(result)
    }

    /// Reads one service's live instances from Redis into this node's copy.
    async fn load(&self, service: &str) -> Result<(), StoreError> {
        let (now, rows): (u64, Vec<(String, String, u64)>) =
            self.script(READ, service, &[]).await?;
        let mut fresh = BTreeMap::new();
        for (id, data, expires) in rows {
            match serde_json::from_str::<Registration>(&data) {
                Ok(registration) if expires > now => {
                    fresh.insert(
                        id.clone(),
                        Instance {
                            id,
                            registration,
                            expires,
                        },
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    "registry: instance {service}/{id} in Redis is not readable: {e}"
                ),
            }
        }
        self.replace(service, |m| *m = fresh);
        Ok(())
    }

    /// Reads every service from Redis (at start and after a reconnect).
    async fn load_all(&self) -> Result<(), StoreError> {
        let mut conn = self.connection().await?;
        let names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(SERVICES)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.down(e))?;
        // Answered: up, even with no service registered yet.
        self.up.store(true, std::sync::atomic::Ordering::Release);
        let known = self.names();
        for service in names
            .iter()
            .chain(known.iter().filter(|k| !names.contains(k)))
        {
            self.load(service).await?;
        }
        Ok(())
    }
}

fn open_saved(dir: &std::path::Path) -> Result<redb::Database, StoreError> {
    let fail = |e: &dyn std::fmt::Display| {
        StoreError::Unavailable(format!("registry store in {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    let db = redb::Database::create(dir.join("registry.redb")).map_err(|e| fail(&e))?;
    let txn = db.begin_write().map_err(|e| fail(&e))?;
    txn.open_table(SAVED).map_err(|e| fail(&e))?;
    txn.commit().map_err(|e| fail(&e))?;
    Ok(db)
}

/// The saved registrations, each counted as renewed now.
fn read_saved(db: &redb::Database) -> Result<Services, StoreError> {
    use redb::ReadableTable;
    let fail = |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("registry store: {e}"));
    let txn = db.begin_read().map_err(|e| fail(&e))?;
    let table = txn.open_table(SAVED).map_err(|e| fail(&e))?;
    let mut services = Services::new();
    let now = now_ms();
    for entry in table.iter().map_err(|e| fail(&e))? {
        let (key, data) = entry.map_err(|e| fail(&e))?;
        let Some((service, id)) = key.value().split_once('/') else {
            continue;
        };
        let Ok(registration) = serde_json::from_slice::<Registration>(data.value()) else {
            continue;
        };
        let expires = now + registration.ttl * 1000;
        let instance = Instance {
            id: id.to_owned(),
            registration,
            expires,
        };
        services
            .entry(service.to_owned())
            .or_default()
            .insert(id.to_owned(), instance);
    }
    Ok(services)
}

/// Registers (or renews) with Redis's clock; returns the expiry (ms).
/// KEYS: expiry zset, data hash. ARGV: service, id, data, ttl seconds.
const REGISTER: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = now + tonumber(ARGV[4]) * 1000
redis.call('ZADD', KEYS[1], expires, ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('SADD', 'turnpike:registry:services', ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(gone) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PUBLISH', 'turnpike:registry:changes', ARGV[1])
return expires
"#;

/// KEYS: expiry zset, data hash. ARGV: service, id. Returns 1 if removed.
const DEREGISTER: &str = r#"
local removed = redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('PUBLISH', 'turnpike:registry:changes', ARGV[1])
return removed
"#;

/// KEYS: expiry zset, data hash. Returns {now_ms, {{id, data, expires}, …}}.
const READ: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  local data = redis.call('HGET', KEYS[2], live[i])
  if data then table.insert(out, {live[i], data, tonumber(live[i + 1])}) end
end
return {now, out}
"#;

/// Keeps this node's copy: sweeps expiries and, with Redis, re-reads each
/// service named on the change channel; after a broken subscription,
/// re-reads everything. Ends when the registry is dropped.
async fn follow(registry: std::sync::Weak<Registry>) {
    use futures_util::StreamExt;
    let mut said = false;
    loop {
        let Some(r) = registry.upgrade() else { return };
        let Some(client) = r.redis.clone() else {
            return;
        };
        drop(r);
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        let mut pubsub = match subscribed {
            Ok(p) => p,
            Err(e) => {
                if let Some(r) = registry.upgrade() {
                    r.up.store(false, std::sync::atomic::Ordering::Release);
                    if !said {
                        tracing::warn!("registry: Redis {} unreachable ({e}); instances known stay until their TTL", r.address);
                        said = true;
                    }
                    r.sweep();
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // Subscribed first, then read: nothing published in between is lost.
        match registry.upgrade() {
            Some(r) => match r.load_all().await {
                Ok(()) => {
                    said = false;
                    tracing::info!("registry: following Redis {}", r.address);
                }
                Err(e) => {
                    tracing::warn!("registry: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
            None => return,
        }
        let mut messages = pubsub.on_message();
        let mut sweep = tokio::time::interval(SWEEP);
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { break };
                    let Some(r) = registry.upgrade() else { return };
                    if let Ok(service) = msg.get_payload::<String>() {
                        if let Err(e) = r.load(&service).await {
                            tracing::warn!("registry: {e}");
                        }
                    }
                }
                _ = sweep.tick() => {
                    let Some(r) = registry.upgrade() else { return };
                    r.sweep();
                }
            }
        }
        if let Some(r) = registry.upgrade() {
            r.up.store(false, std::sync::atomic::Ordering::Release);
            tracing::warn!(
                "registry: lost the Redis subscription; reading again once Redis answers"
            );
        }
    }
}

/// Sweeps a local registry's expiries until it is dropped.
pub async fn sweep_local(registry: std::sync::Weak<Registry>) {
    let mut tick = tokio::time::interval(SWEEP);
    loop {
        tick.tick().await;
        match registry.upgrade() {
            Some(r) => r.sweep(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn reg(port: u16, ttl: u64) -> Registration {
        Registration {
            address: "127.0.0.1".into(),
            port,
            weight: 1,
            metadata: Value::Null,
            ttl,
        }
    }

    #[tokio::test]
    async fn registrations_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("turnpike-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let r = Registry::local(Some(&dir)).unwrap();
            r.register("users", "a", reg(1, 30)).await.unwrap();
            r.register("users", "b", reg(2, 30)).await.unwrap();
            r.deregister("users", "a").await.unwrap();
        }
        let r = Registry::local(Some(&dir)).unwrap();
        let ids: Vec<String> = r.instances("users").into_iter().map(|i| i.id).collect();
        assert_eq!(ids, ["b"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn renewals_tell_nobody_changes_do() {
        let r = Registry::local(None).unwrap();
        let told = Arc::new(AtomicUsize::new(0));
        let t = told.clone();
        r.on_change(move |_| {
            t.fetch_add(1, Ordering::Relaxed);
        });
        r.register("users", "a", reg(1, 30)).await.unwrap();
        r.register("users", "a", reg(1, 30)).await.unwrap();
        assert_eq!(told.load(Ordering::Relaxed), 1, "a renewal changes nothing");
        r.register("users", "a", reg(2, 30)).await.unwrap();
        assert_eq!(told.load(Ordering::Relaxed), 2, "a new port does");
        assert!(r.deregister("users", "a").await.unwrap());
        assert!(!r.deregister("users", "a").await.unwrap());
        assert!(r.all().is_empty());
    }

    #[tokio::test]
    async fn expired_instances_drop_out() {
        let r = Registry::local(None).unwrap();
        r.register("users", "a", reg(1, 30)).await.unwrap();
        r.register("users", "b", reg(2, 30)).await.unwrap();
        r.replace("users", |m| m.get_mut("b").unwrap().expires = 1);
        assert_eq!(
            r.instances("users").len(),
            1,
            "expired instances are not served"
        );
        r.sweep();
        assert_eq!(r.all()["users"].len(), 1);
    }

    #[test]
    fn registrations_are_checked() {
        assert!(reg(0, 30).problem().is_some());
        assert!(reg(80, 0).problem().is_some());
        assert!(reg(80, 30).problem().is_none());
    }
}
