//! Node settings: the `gateway:` key of the config file.

use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// HTTP/1.1 and h2c listeners.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// HTTPS listeners (certificates from `ssls`).
    #[serde(default)]
    pub tls_listen: Vec<String>,
    pub admin: Option<Admin>,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub config_provider: Provider,
    #[serde(default)]
    pub etcd: Etcd,
    /// Shared state of a cluster of gateways (the service registry, and
    /// the asynchronous queue with `queue: redis`).
    pub redis: Option<Redis>,
    /// Where `async-request` queues requests: `embedded` (in `data_dir`,
    /// this node alone) or `redis` (at `redis.url`, shared by every node).
    #[serde(default)]
    pub queue: QueueKind,
    /// Where `discovery_type: dns` upstreams are resolved.
    #[serde(default)]
    pub dns: Dns,
    #[serde(default = "default_data_dir")]
    pub data_dir: String,
    /// Worker threads, each with its own listeners and pools; 0 = one per core.
    #[serde(default)]
    pub workers: usize,
    /// How long in-flight requests may run after SIGTERM before the process exits.
    #[serde(default = "default_grace", deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// How long a client may pause while sending a request body (nginx's
    /// `client_body_timeout`); then 408 and the upstream request is dropped.
    #[serde(default = "default_client_body", deserialize_with = "duration")]
    pub client_body_timeout: Duration,
    /// Log level filter when RUST_LOG is not set (`info`, `debug`, …).
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

impl Default for Gateway {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Default::default()))
            .expect("every gateway field has a default")
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// The admin key (named `admin` in the history).
    pub key: Option<String>,
    /// More keys, as APISIX's `deployment.admin.admin_key`.
    #[serde(default)]
    pub admin_key: Vec<AdminKey>,
    /// Client networks (CIDR) allowed; unset: any.
    pub allow_admin: Option<Vec<String>>,
    /// The largest request body accepted, in bytes.
    #[serde(default = "default_admin_body")]
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminKey {
    pub name: String,
    pub key: String,
    /// `admin` (the default) or `viewer` (reads only).
    #[serde(default = "default_role")]
    pub role: String,
}

/// `gateway.queue`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    #[default]
    Embedded,
    Redis,
}

/// `gateway.redis`: the Redis a cluster of gateways shares state in.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
}

/// `gateway.etcd`: where `config_provider: etcd` keeps the configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Etcd {
    #[serde(default = "default_etcd_endpoints")]
    pub endpoints: Vec<String>,
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    #[serde(default = "default_etcd_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// How many commit records the Admin API history keeps in etcd.
    #[serde(default = "default_history_kept")]
    pub history_kept: u64,
}

impl Default for Etcd {
    fn default() -> Self {
        Etcd {
            endpoints: default_etcd_endpoints(),
            prefix: default_etcd_prefix(),
            timeout: default_etcd_timeout(),
            history_kept: default_history_kept(),
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9180".into()
}
fn default_admin_body() -> usize {
    4 << 20
}
fn default_role() -> String {
    "admin".into()
}
fn default_etcd_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".into()]
}
fn default_etcd_prefix() -> String {
    "/apisix".into()
}
fn default_etcd_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_history_kept() -> u64 {
    10_000
}

/// `gateway.dns`: the resolvers asked for DNS discovery.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// `ip:port` of each nameserver; empty: the system's (`/etc/resolv.conf`).
    #[serde(default)]
    pub nameservers: Vec<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    #[serde(default = "default_status_listen")]
    pub listen: String,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            listen: default_status_listen(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    #[default]
    File,
    Embedded,
    Etcd,
}

fn default_listen() -> Vec<String> {
    vec!["0.0.0.0:9080".into()]
}
fn default_status_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_data_dir() -> String {
    "./data".into()
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_client_body() -> Duration {
    Duration::from_secs(60)
}
fn default_log_level() -> String {
    "info".into()
}

/// Accepts `10`, `1.5` (seconds) or `"10s"`, `"250ms"`, `"2m"`.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v = Value::deserialize(d)?;
    parse_duration(&v).ok_or_else(|| {
        serde::de::Error::custom("expected a duration such as 10, \"10s\" or \"250ms\"")
    })
}

pub fn parse_duration(v: &Value) -> Option<Duration> {
    match v {
        Value::Number(n) => n.as_f64().and_then(seconds),
        Value::String(s) => {
            let s = s.trim();
            let (num, unit) = s
                .find(|c: char| c.is_ascii_alphabetic())
                .map_or((s, "s"), |i| s.split_at(i));
            let n: f64 = num.trim().parse().ok().filter(|n: &f64| *n >= 0.0)?;
            let secs = match unit {
                "ms" => n / 1000.0,
                "s" => n,
                "m" => n * 60.0,
                "h" => n * 3600.0,
                _ => return None,
            };
            seconds(secs)
        }
        _ => None,
    }
}

/// The longest duration accepted anywhere: a year. Larger values would
/// overflow clock arithmetic on the request path.
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// Seconds as a duration, refusing negative, non-finite and absurd values.
pub fn seconds(s: f64) -> Option<Duration> {
    (s.is_finite() && (0.0..=MAX_SECONDS).contains(&s)).then(|| Duration::from_secs_f64(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_follow_apisix_ports() {
        let g = Gateway::default();
        assert_eq!(g.listen, vec!["0.0.0.0:9080"]);
        assert_eq!(g.status.listen, "127.0.0.1:9090");
        assert_eq!(g.config_provider, Provider::File);
        assert_eq!(g.shutdown_timeout, Duration::from_secs(10));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration(&json!(2)), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_duration(&json!("250ms")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_duration(&json!("1.5s")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_duration(&json!("2m")), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration(&json!("2 weeks")), None);
        assert_eq!(parse_duration(&json!(-1)), None);
        assert_eq!(parse_duration(&json!(1e20)), None);
    }
}
