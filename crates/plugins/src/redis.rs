//! The Redis connection the `policy: redis` limiters share: one
//! multiplexed, self-reconnecting connection per server and database for
//! the whole process, whatever the number of routes and reloads.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script, ToRedisArgs};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::OnceCell;
use turnpike_plugin::deps::{self, Dependency, Reachability};
use turnpike_plugin::{Env, FieldError};

/// The `redis_*` fields of a limiter's config, as APISIX names them.
#[derive(Deserialize)]
pub(crate) struct RedisConfig {
    pub redis_host: Option<String>,
    pub redis_port: u16,
    pub redis_username: Option<String>,
    pub redis_password: Option<String>,
    pub redis_database: i64,
    pub redis_ssl: bool,
    /// Milliseconds.
    pub redis_timeout: u64,
}

/// Schema properties of [`RedisConfig`], to merge into a limiter's schema.
pub(crate) fn schema_properties(props: &mut Map<String, Value>) {
    let fields = json!({
        "redis_host": {"type": "string", "minLength": 2},
        "redis_port": {"type": "integer", "minimum": 1, "maximum": 65535, "default": 6379},
        "redis_username": {"type": "string", "minLength": 1},
        "redis_password": {"type": "string", "minLength": 0},
        "redis_database": {"type": "integer", "minimum": 0, "default": 0},
        "redis_timeout": {"type": "integer", "minimum": 1, "default": 1000},
        "redis_ssl": {"type": "boolean", "default": false},
        "redis_ssl_verify": {"type": "boolean", "default": false}
    });
    if let Value::Object(fields) = fields {
        props.extend(fields);
    }
}

/// One Redis server's connection, shared.
pub(crate) struct Redis {
    client: redis::Client,
    timeout: Duration,
    conn: OnceCell<ConnectionManager>,
    /// Unix second of the last "Redis unreachable" warning, so an outage
    /// logs once a second, not once a request.
    warned: AtomicU64,
    /// What the last round trip found (see [`Reachability`]).
    reachable: AtomicU8,
    address: String,
}

impl Redis {
    /// The connection for `config`, shared with every limiter that names
    /// the same server, database and credentials.
    pub(crate) fn shared(env: &Env, config: &RedisConfig) -> Result<Arc<Redis>, FieldError> {
        let Some(host) = &config.redis_host else {
            return Err(FieldError::new(
                "redis_host",
                "required when `policy` is `redis`",
            ));
        };
        if config.redis_ssl {
            return Err(FieldError::new(
                "redis_ssl",
                "TLS to Redis is not supported yet: reach Redis over a private network",
            ));
        }
        let info = redis::ConnectionInfo {
            addr: redis::ConnectionAddr::Tcp(host.clone(), config.redis_port),
            redis: redis::RedisConnectionInfo {
                db: config.redis_database,
                // An empty name or password means none, as in APISIX: a
                // Redis without auth refuses `AUTH ""`.
                username: config.redis_username.clone().filter(|u| !u.is_empty()),
                password: config.redis_password.clone().filter(|p| !p.is_empty()),
                ..Default::default()
            },
        };
        let client =
            redis::Client::open(info).map_err(|e| FieldError::new("redis_host", e.to_string()))?;
        let key = format!(
            "redis:{host}:{}:{}:{:?}:{:x}:{}",
            config.redis_port,
            config.redis_database,
            config.redis_username,
            crc32fast::hash(config.redis_password.as_deref().unwrap_or("").as_bytes()),
            config.redis_timeout,
        );
        let timeout = Duration::from_millis(config.redis_timeout);
        let address = format!("{host}:{}/{}", config.redis_port, config.redis_database);
        let redis = env.state(&key, || Redis {
            client,
            timeout,
            conn: OnceCell::new(),
            warned: AtomicU64::new(0),
            reachable: AtomicU8::new(0),
            address,
        });
        let dep: Arc<dyn Dependency> = redis.clone();
        deps::register(&dep);
        Ok(redis)
    }

    /// Runs `script` in one round trip, within the configured timeout.
    /// Connects on first use; after a failure the connection reconnects
    /// by itself, so limiting resumes when Redis is back.
    pub(crate) async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[impl ToRedisArgs],
    ) -> Result<T, String> {
        let run = async {
            let mut conn = self.connection().await?.clone();
            let mut call = script.prepare_invoke();
            for k in keys {
                call.key(*k);
            }
            for a in args {
                call.arg(a);
            }
            call.invoke_async::<T>(&mut conn).await
        };
        let result = match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(value)) => {
                self.reachable.store(1, Ordering::Relaxed);
                return Ok(value);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.reachable.store(2, Ordering::Relaxed);
        self.warn(&result);
        Err(result)
    }

    async fn connection(&self) -> redis::RedisResult<&ConnectionManager> {
        self.conn
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await
    }

    fn warn(&self, error: &str) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.warned.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(
                "redis {:?}: {error}",
                self.client.get_connection_info().addr
            );
        }
    }
}

impl Dependency for Redis {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    fn reachability(&self) -> Reachability {
        match self.reachable.load(Ordering::Relaxed) {
            1 => Reachability::Up,
            2 => Reachability::Down,
            _ => Reachability::Unknown,
        }
    }
}
