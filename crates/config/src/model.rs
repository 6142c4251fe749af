//! Resources as APISIX writes them (v3), deserialised field by field.
//!
//! These types mirror the JSON/YAML a user writes; [`crate::compile`] turns
//! them into the typed [`crate::Snapshot`] the proxy uses. Fields APISIX has
//! and Turnpike does not act on yet are listed in docs/compatibility.md; an
//! unknown field is reported as a warning, never silently dropped.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// An id: APISIX accepts numbers and strings and treats them alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(pub String);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            N(u64),
        }
        match Raw::deserialize(d) {
            Ok(Raw::S(s)) if !s.is_empty() && s.len() <= 64 && s.bytes().all(id_byte) => Ok(Id(s)),
            Ok(Raw::N(n)) => Ok(Id(n.to_string())),
            _ => Err(serde::de::Error::custom(
                "an id is a number or a string of 1 to 64 characters from a-z A-Z 0-9 - _ .",
            )),
        }
    }
}

fn id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.".contains(&b)
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `plugins` on a route, service, consumer, plugin_config or global rule.
pub type Plugins = BTreeMap<String, Value>;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Route {
    pub id: Option<Id>,
    pub name: Option<String>,
    pub desc: Option<String>,
    pub uri: Option<String>,
    pub uris: Option<Vec<String>>,
    pub host: Option<String>,
    pub hosts: Option<Vec<String>>,
    pub remote_addr: Option<String>,
    pub remote_addrs: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub priority: i64,
    pub vars: Option<Value>,
    pub plugins: Option<Plugins>,
    pub upstream: Option<Upstream>,
    pub upstream_id: Option<Id>,
    pub service_id: Option<Id>,
    pub plugin_config_id: Option<Id>,
    pub labels: Option<BTreeMap<String, String>>,
    pub timeout: Option<Timeout>,
    pub enable_websocket: Option<bool>,
    /// Lua in APISIX; refused here (see docs/compatibility.md).
    pub filter_func: Option<Value>,
    pub script: Option<Value>,
    #[serde(default = "enabled")]
    pub status: u8,
    pub create_time: Option<u64>,
    pub update_time: Option<u64>,
}

fn enabled() -> u8 {
    1
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Service {
    pub id: Option<Id>,
    pub name: Option<String>,
    pub desc: Option<String>,
    pub upstream: Option<Upstream>,
    pub upstream_id: Option<Id>,
    pub plugins: Option<Plugins>,
    pub hosts: Option<Vec<String>>,
    pub labels: Option<BTreeMap<String, String>>,
    pub enable_websocket: Option<bool>,
    pub create_time: Option<u64>,
    pub update_time: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Upstream {
    pub id: Option<Id>,
    pub name: Option<String>,
    pub desc: Option<String>,
    #[serde(rename = "type", default = "roundrobin")]
    pub kind: String,
    pub nodes: Option<Nodes>,
    pub service_name: Option<String>,
    pub discovery_type: Option<String>,
    #[serde(default = "vars")]
    pub hash_on: String,
    pub key: Option<String>,
    pub checks: Option<Value>,
    pub retries: Option<u32>,
    pub retry_timeout: Option<f64>,
    /// Turnpike: answers that send a bodyless idempotent request to the
    /// next node, as nginx's `proxy_next_upstream http_502`.
    pub retry_on_statuses: Option<Vec<u16>>,
    /// Turnpike: non-idempotent requests (POST, PATCH) may go to another
    /// node too; their bodies are read whole first so they can be sent
    /// again (nginx's `proxy_next_upstream non_idempotent`).
    pub retry_non_idempotent: Option<bool>,
    pub timeout: Option<Timeout>,
    #[serde(default = "pass")]
    pub pass_host: String,
    pub upstream_host: Option<String>,
    #[serde(default = "http")]
    pub scheme: String,
    pub labels: Option<BTreeMap<String, String>>,
    pub tls: Option<UpstreamTls>,
    pub keepalive_pool: Option<KeepalivePool>,
    pub create_time: Option<u64>,
    pub update_time: Option<u64>,
}

fn roundrobin() -> String {
    "roundrobin".into()
}
fn vars() -> String {
    "vars".into()
}
fn pass() -> String {
    "pass".into()
}
fn http() -> String {
    "http".into()
}

/// `nodes`: either `{"host:port": weight}` or a list of node objects.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Nodes {
    Map(BTreeMap<String, u32>),
    List(Vec<Node>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub host: String,
    pub port: Option<u16>,
    pub weight: u32,
    #[serde(default)]
    pub priority: i32,
    pub metadata: Option<Value>,
}

/// Seconds, as APISIX writes them (fractions allowed).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Timeout {
    pub connect: Option<f64>,
    pub send: Option<f64>,
    pub read: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub client_cert_id: Option<Id>,
    #[serde(default)]
    pub verify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepalivePool {
    #[serde(default = "pool_size")]
    pub size: u32,
    #[serde(default = "pool_idle")]
    pub idle_timeout: f64,
    #[serde(default = "pool_requests")]
    pub requests: u32,
}

fn pool_size() -> u32 {
    320
}
fn pool_idle() -> f64 {
    60.0
}
fn pool_requests() -> u32 {
    1000
}

impl Default for KeepalivePool {
    fn default() -> Self {
        KeepalivePool {
            size: pool_size(),
            idle_timeout: pool_idle(),
            requests: pool_requests(),
        }
    }
}

/// A consumer, or (APISIX 3.11+) one of its credentials: an entry whose
/// id is `{username}/credentials/{id}` and which holds only authentication
/// plugins.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Consumer {
    pub username: Option<String>,
    /// Only on credentials: `{username}/credentials/{id}`.
    pub id: Option<String>,
    pub desc: Option<String>,
    pub name: Option<String>,
    pub plugins: Option<Plugins>,
    pub group_id: Option<Id>,
    pub labels: Option<BTreeMap<String, String>>,
    pub create_time: Option<u64>,
    pub update_time: Option<u64>,
}

/// Resources the core does not act on yet; kept whole so they are validated
/// as JSON, listed, and ready for the plugin runtime and Admin API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Opaque {
    pub id: Option<Id>,
    pub username: Option<String>,
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}
