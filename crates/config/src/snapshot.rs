//! The compiled, immutable configuration the proxy serves from.
//!
//! Everything here is typed and precomputed: the proxy never parses JSON or
//! re-validates on a request. A new snapshot replaces the old one whole; a
//! request keeps the snapshot it started with.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use turnpike_plugin::{Chain, Consumer};
use turnpike_router::{Router, Var};
use turnpike_upstream::{Balancer, Health};

use crate::model;

#[derive(Debug)]
pub struct Snapshot {
    /// Increases by one with each configuration applied.
    pub revision: u64,
    pub router: Router,
    /// Enabled routes; the router's indexes point here.
    pub routes: Vec<Route>,
    /// Every upstream in use, by key (`upstreams/1`, or `routes/7` for an
    /// inline one), so state survives reloads that do not change it.
    pub upstreams: HashMap<Arc<str>, Arc<Upstream>>,
    /// The global rules' plugins, run before every route's.
    pub global: Chain,
    /// Consumers by username.
    pub consumers: HashMap<Arc<str>, Arc<Consumer>>,
    /// Unknown fields and unsupported settings that were ignored.
    pub warnings: Vec<String>,
}

impl Snapshot {
    /// A snapshot with no routes: every request gets 404.
    /// The route with `id` (the asynchronous mode's jobs name theirs).
    pub fn route(&self, id: &str) -> Option<&Route> {
        self.routes.iter().find(|r| *r.id == *id)
    }

    pub fn empty() -> Snapshot {
        Snapshot {
            revision: 0,
            router: Router::default(),
            routes: Vec::new(),
            upstreams: HashMap::new(),
            global: Chain::default(),
            consumers: HashMap::new(),
            warnings: Vec::new(),
        }
    }
}

#[derive(Debug)]
pub struct Route {
    pub id: Arc<str>,
    pub service_id: Option<Arc<str>>,
    /// `name` of the route and of its service, for metrics and logs.
    pub name: Option<Arc<str>>,
    pub service_name: Option<Arc<str>>,
    pub upstream: Arc<Upstream>,
    /// The upstream's timeouts with the route's `timeout` over them.
    pub timeouts: Timeouts,
    /// The route's own `timeout`, to lay over another upstream's when a
    /// plugin (traffic-split) sends the request there.
    pub own_timeouts: TimeoutOverride,
    pub websocket: bool,
    /// Some plugin that may run here reads request bodies (the route's,
    /// a global rule's, or — on routes that authenticate — a consumer's).
    pub reads_body: bool,
    /// The route's plugins merged with its service's and plugin config's,
    /// sorted to run.
    pub chain: Chain,
}

#[derive(Debug)]
pub struct Upstream {
    pub key: Arc<str>,
    pub nodes: Box<[Node]>,
    pub(crate) groups: Box<[Group]>,
    /// What `chash` hashes on; `None` for other balancers.
    pub hash_on: Option<HashOn>,
    /// Attempts after the first; `None` means "as many as there are other nodes".
    pub retries: Option<u32>,
    /// Statuses that send a bodyless idempotent request to the next node.
    pub retry_on_statuses: Box<[u16]>,
    /// Non-idempotent requests may be retried; bodies are read whole
    /// first, so the request can be sent again.
    pub retry_non_idempotent: bool,
    pub retry_timeout: Option<Duration>,
    pub timeouts: Timeouts,
    pub pass_host: PassHost,
    pub scheme: Scheme,
    pub tls_verify: bool,
    pub keepalive: Keepalive,
    /// Node health, when the upstream has `checks`; kept with the upstream
    /// across reloads that do not change it.
    pub health: Option<Arc<Health>>,
    /// The config it was compiled from, to tell whether a reload changed it.
    pub(crate) source: model::Upstream,
}

/// Nodes of one `priority`, balanced together. Lower priorities are used
/// only when every node above them has been tried.
#[derive(Debug)]
pub(crate) struct Group {
    members: Box<[usize]>,
    balancer: Balancer,
}

impl Upstream {
    /// `(discovery_type, service_name)` when the nodes are discovered.
    pub fn discovery(&self) -> Option<(&str, &str)> {
        let s = &self.source;
        Some((s.discovery_type.as_deref()?, s.service_name.as_deref()?))
    }

    /// Splits nodes into priority groups (highest first), each with its own
    /// balancer, and tells each node where it sits.
    pub(crate) fn groups(kind: turnpike_upstream::Kind, nodes: &mut [Node]) -> Box<[Group]> {
        let mut priorities: Vec<i32> = nodes.iter().map(|n| n.priority).collect();
        priorities.sort_unstable_by(|a, b| b.cmp(a));
        priorities.dedup();
        priorities
            .iter()
            .enumerate()
            .map(|(g, &p)| {
                let members: Vec<usize> = (0..nodes.len())
                    .filter(|&i| nodes[i].priority == p)
                    .collect();
                for (slot, &i) in members.iter().enumerate() {
                    nodes[i].group = g as u32;
                    nodes[i].slot = slot as u32;
                }
                let weighted: Vec<(&str, u32)> = members
                    .iter()
                    .map(|&i| (&*nodes[i].addr, nodes[i].weight))
                    .collect();
                Group {
                    balancer: Balancer::new(kind, &weighted),
                    members: members.into(),
                }
            })
            .collect()
    }

    /// The node to try next, skipping those already `tried`.
    pub fn pick(&self, hash_key: Option<&[u8]>, tried: &[usize]) -> Option<usize> {
        let Some(health) = &self.health else {
            return self.pick_among(hash_key, |i| tried.contains(&i));
        };
        let healthy = self.pick_among(hash_key, |i| tried.contains(&i) || !health.is_healthy(i));
        if healthy.is_some() || (0..self.nodes.len()).any(|i| health.is_healthy(i)) {
            // Some node is healthy: never a node known to be down, which
            // would cost a failed connection or a timeout.
            return healthy;
        }
        // Every node is down: try them anyway, as APISIX does; a node
        // marked down may have come back.
        let any = self.pick_among(hash_key, |i| tried.contains(&i));
        if any.is_some() && tried.is_empty() && health.log_all_down() {
            tracing::warn!(
                "upstream {}: every node is unhealthy; trying one anyway",
                self.key
            );
        }
        any
    }

    fn pick_among(&self, hash_key: Option<&[u8]>, skip: impl Fn(usize) -> bool) -> Option<usize> {
        self.groups.iter().find_map(|g| {
            g.balancer
                .pick(hash_key, |slot| skip(g.members[slot]))
                .map(|slot| g.members[slot])
        })
    }

    /// A request to node `i` starts (for `least_conn` and `ewma`).
    pub fn start(&self, i: usize) {
        let n = &self.nodes[i];
        self.groups[n.group as usize]
            .balancer
            .start(n.slot as usize);
    }

    /// A request to node `i` ended after `elapsed`.
    pub fn finish(&self, i: usize, elapsed: Duration) {
        let n = &self.nodes[i];
        self.groups[n.group as usize]
            .balancer
            .finish(n.slot as usize, elapsed);
    }

    /// True when [`Upstream::start`] and [`Upstream::finish`] matter.
    pub fn tracks_load(&self) -> bool {
        self.groups.iter().any(|g| g.balancer.tracks_load())
    }

    /// How many attempts a request may make in all.
    pub fn max_attempts(&self) -> usize {
        let others = self.nodes.len().saturating_sub(1);
        1 + self.retries.map_or(others, |r| r as usize)
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub host: Arc<str>,
    pub port: u16,
    pub weight: u32,
    pub priority: i32,
    /// `host:port` (IPv6 in brackets): the pool key and `upstream_addr`.
    pub addr: Arc<str>,
    /// The `Host` header for `pass_host: node`: the port is left out when it
    /// is the scheme's default.
    pub authority: Arc<str>,
    group: u32,
    slot: u32,
}

impl Node {
    pub(crate) fn new(host: &str, port: u16, weight: u32, priority: i32, scheme: Scheme) -> Node {
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let addr: Arc<str> = format!("{bracketed}:{port}").into();
        let authority = if port == scheme.default_port() {
            bracketed.into()
        } else {
            addr.clone()
        };
        Node {
            host: host.into(),
            port,
            weight,
            priority,
            addr,
            authority,
            group: 0,
            slot: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub send: Duration,
    pub read: Duration,
}

/// Some of the timeouts, set over others.
#[derive(Debug, Clone, Copy, Default)]
pub struct TimeoutOverride {
    pub connect: Option<Duration>,
    pub send: Option<Duration>,
    pub read: Option<Duration>,
}

impl TimeoutOverride {
    pub fn over(&self, base: Timeouts) -> Timeouts {
        Timeouts {
            connect: self.connect.unwrap_or(base.connect),
            send: self.send.unwrap_or(base.send),
            read: self.read.unwrap_or(base.read),
        }
    }
}

impl Default for Timeouts {
    /// nginx's defaults, which APISIX keeps: 60 s each.
    fn default() -> Self {
        let minute = Duration::from_secs(60);
        Timeouts {
            connect: minute,
            send: minute,
            read: minute,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle connections kept per destination (node address) per worker.
    pub size: usize,
    pub idle_timeout: Duration,
    /// Requests served on one connection before it is closed.
    pub requests: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassHost {
    /// The client's `Host`.
    Pass,
    /// The chosen node's `host[:port]`.
    Node,
    /// A fixed value (`upstream_host`).
    Rewrite(Arc<str>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
    /// HTTP/2 cleartext.
    Grpc,
    /// HTTP/2 over TLS.
    Grpcs,
}

impl Scheme {
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http | Scheme::Grpc => 80,
            Scheme::Https | Scheme::Grpcs => 443,
        }
    }

    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Https | Scheme::Grpcs)
    }

    pub fn is_h2(self) -> bool {
        matches!(self, Scheme::Grpc | Scheme::Grpcs)
    }
}

/// What `chash` hashes on.
#[derive(Debug, Clone, PartialEq)]
pub enum HashOn {
    Vars(Var),
    /// A header name, lower-case.
    Header(Box<str>),
    Cookie(Box<str>),
    Consumer,
    /// A template such as `$host$uri`.
    Combination(Box<[KeyPart]>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum KeyPart {
    Literal(Box<str>),
    Var(Var),
}
