//! DNS service discovery: an upstream with `discovery_type: dns` gets its
//! nodes from DNS. `service_name: "host:port"` resolves A/AAAA records, one
//! node per address on that port; a name without a port (`_http._tcp.api`)
//! resolves SRV records, their targets, ports and weights.
//!
//! Each name is watched by one task for the process: re-resolved when its
//! answer's TTL runs out (between 1 and 300 s), its last good answer kept
//! when DNS fails (retried every 5 s). When an answer changes, `on_change`
//! runs (the binary recompiles the configuration with the new nodes, so
//! the change applies like any other, atomically).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::TokioAsyncResolver;

/// One node as DNS gives it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DnsNode {
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub priority: i32,
}

/// The names being watched and their last answers.
pub struct Dns {
    resolver: TokioAsyncResolver,
    answers: Mutex<HashMap<String, Option<Vec<DnsNode>>>>,
    on_change: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Dns {
    /// A resolver asking `nameservers` (`ip:port`), or the system's
    /// (`/etc/resolv.conf`) when there are none.
    pub fn new(nameservers: &[SocketAddr]) -> std::io::Result<Arc<Dns>> {
        let mut opts = ResolverOpts::default();
        opts.cache_size = 0;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 1;
        let resolver = if nameservers.is_empty() {
            let (config, _) = hickory_resolver::system_conf::read_system_conf().map_err(|e| {
                std::io::Error::other(format!("reading the system resolver config: {e}"))
            })?;
            TokioAsyncResolver::tokio(config, opts)
        } else {
            let mut group = NameServerConfigGroup::new();
            for addr in nameservers {
                group.merge(NameServerConfigGroup::from_ips_clear(
                    &[addr.ip()],
                    addr.port(),
                    true,
                ));
            }
            TokioAsyncResolver::tokio(ResolverConfig::from_parts(None, Vec::new(), group), opts)
        };
        runtime()?;
        Ok(Arc::new(Dns {
            resolver,
            answers: Mutex::default(),
            on_change: OnceLock::new(),
        }))
    }

    /// What runs when an answer changes (set once).
    pub fn on_change(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_change.set(Box::new(f));
    }

    /// The nodes last resolved for `service`; `None` before a first answer.
    pub fn nodes(&self, service: &str) -> Option<Vec<DnsNode>> {
        self.answers().get(service).cloned().flatten()
    }

    /// Watches exactly `services`: starts watching the names not watched
    /// yet (waiting up to `wait` for their first answers, so a gateway
    /// starts with its nodes) and stops watching the others.
    pub fn watch(self: &Arc<Self>, services: &[String], wait: Duration) {
        let mut new = Vec::new();
        {
            let mut answers = self.answers();
            answers.retain(|name, _| services.contains(name));
            for s in services {
                if !answers.contains_key(s) {
                    answers.insert(s.clone(), None);
                    new.push(s.clone());
                }
            }
        }
        if let Ok(rt) = runtime() {
            for service in &new {
                rt.spawn(watch(Arc::downgrade(self), service.clone()));
            }
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && new.iter().any(|s| self.nodes(s).is_none()) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Vec<DnsNode>>>> {
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves `service`: its nodes and how long the answer holds.
    async fn resolve(&self, service: &str) -> Result<(Vec<DnsNode>, Duration), String> {
        let port = service
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)));
        let mut answer = match port {
            Some((host, port)) => self.addresses(host, port, 1, 0).await?,
            // As APISIX: SRV first, then A/AAAA on port 80.
            None => match self.srv(service).await {
                Ok(found) if !found.0.is_empty() => found,
                _ => self.addresses(service, 80, 1, 0).await?,
            },
        };
        answer.0.sort();
        Ok(answer)
    }

    /// A/AAAA: one node per address, sharing `weight`.
    async fn addresses(
        &self,
        host: &str,
        port: u16,
        weight: u32,
        priority: i32,
    ) -> Result<(Vec<DnsNode>, Duration), String> {
        let now = std::time::Instant::now();
        let ips = self
            .resolver
            .lookup_ip(host)
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        let ttl = ips.valid_until().saturating_duration_since(now);
        let count = ips.iter().count().max(1) as u32;
        let nodes = ips
            .iter()
            .map(|ip| DnsNode {
                host: ip.to_string(),
                port,
                // A target's weight is split among its addresses, as APISIX does.
                weight: (weight / count).max(1),
                priority,
            })
            .collect();
        Ok((nodes, ttl))
    }

    /// SRV: each target's addresses, with the record's port, weight and
    /// priority (a lower SRV priority is a higher node priority).
    async fn srv(&self, service: &str) -> Result<(Vec<DnsNode>, Duration), String> {
        let now = std::time::Instant::now();
        let srv = self
            .resolver
            .srv_lookup(service)
            .await
            .map_err(|e| e.to_string())?;
        let mut ttl = srv.as_lookup().valid_until().saturating_duration_since(now);
        let mut nodes = Vec::new();
        for record in srv.iter() {
            let target = record.target().to_utf8();
            let weight = u32::from(record.weight().max(1));
            let priority = -i32::from(record.priority());
            let (found, t) = self
                .addresses(&target, record.port(), weight, priority)
                .await?;
            ttl = ttl.min(t);
            nodes.extend(found);
        }
        Ok((nodes, ttl))
    }
}

/// The watchers' own runtime (one thread), so a first answer can be
/// waited for from any thread, the process's start included.
fn runtime() -> std::io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("dns")
        .enable_all()
        .build()?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// Keeps one name's answer fresh while the gateway runs.
async fn watch(dns: Weak<Dns>, service: String) {
    loop {
        let Some(d) = dns.upgrade() else {
            return;
        };
        if !d.answers().contains_key(&service) {
            // No longer in the configuration.
            return;
        }
        let wait = match d.resolve(&service).await {
            Ok((nodes, ttl)) => {
                let changed = {
                    let mut answers = d.answers();
                    match answers.get_mut(&service) {
                        Some(held) => {
                            let old = held.replace(nodes.clone());
                            old.as_ref() != Some(&nodes)
                        }
                        // Dropped from the configuration while resolving.
                        None => return,
                    }
                };
                if changed {
                    tracing::info!(service, nodes = nodes.len(), "DNS answer changed");
                    if let Some(f) = d.on_change.get() {
                        f();
                    }
                }
                ttl.clamp(Duration::from_secs(1), Duration::from_secs(300))
            }
            Err(e) => {
                tracing::warn!(service, "DNS lookup failed, keeping the last answer: {e}");
                Duration::from_secs(5)
            }
        };
        drop(d);
        tokio::time::sleep(wait).await;
    }
}
