//! Nodes of upstreams with a `discovery_type`: filled in before each
//! compile from DNS (`dns`) or the service registry (`registry`). When what
//! they found changes, the configuration is compiled again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use turnpike_config::model::{Node, Nodes, Upstream};
use turnpike_config::{ConfigError, Resources};
use turnpike_proxy::Dns;
use turnpike_store::Registry;

/// Why a reload runs when discovered nodes changed.
pub const CHANGED: &str = "discovered nodes changed";

/// The DNS resolver of `discovery_type: dns` upstreams, made when first
/// needed with the `gateway.dns` of that moment (a change applies on
/// restart, like the other node settings).
static DNS: OnceLock<Arc<Dns>> = OnceLock::new();

/// The service registry, set once at start.
static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();

/// Registry services some upstream balances over: a change to another
/// service reloads nothing.
static WANTED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// What a change calls, once the gateway serves.
static RELOAD: OnceLock<Box<dyn Fn() + Send + Sync>> = OnceLock::new();

/// A reload asked for and not started yet: a burst of changes makes one.
static PENDING: AtomicBool = AtomicBool::new(false);

pub fn on_change(reload: impl Fn() + Send + Sync + 'static) {
    let _ = RELOAD.set(Box::new(reload));
}

/// Reloads on a thread of its own (the caller may be async), once for
/// any number of changes that come before it starts.
fn changed() {
    if RELOAD.get().is_none() || PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    std::thread::spawn(|| {
        PENDING.store(false, Ordering::Release);
        if let Some(reload) = RELOAD.get() {
            reload();
        }
    });
}

/// Compiles again now if the registry is shared: instances read from Redis
/// after the first compile reach the snapshot.
pub fn refresh() {
    if REGISTRY.get().is_some_and(|r| r.is_shared()) {
        changed();
    }
}

pub fn set_registry(registry: Arc<Registry>) {
    registry.on_change(|service| {
        let wanted = WANTED.lock().unwrap_or_else(|e| e.into_inner());
        if wanted.as_ref().is_some_and(|w| w.contains(service)) {
            changed();
        }
    });
    let _ = REGISTRY.set(registry);
}

/// Fills discovered upstreams' nodes with what DNS and the registry say now.
pub fn fill(
    res: &mut Resources,
    dns: &turnpike_config::Dns,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let all = res
        .upstreams
        .iter_mut()
        .chain(res.routes.iter_mut().filter_map(|r| r.upstream.as_mut()))
        .chain(res.services.iter_mut().filter_map(|s| s.upstream.as_mut()));
    let (mut by_dns, mut by_registry) = (Vec::new(), Vec::new());
    for u in all {
        match u.discovery_type.as_deref() {
            Some("dns") => by_dns.push(u),
            Some("registry") => by_registry.push(u),
            _ => {}
        }
    }
    from_registry(by_registry, warnings);
    from_dns(by_dns, dns, warnings)
}

fn set_nodes(u: &mut Upstream, kind: &str, found: Vec<Node>, warnings: &mut Vec<String>) {
    let name = u.service_name.as_deref().unwrap_or_default();
    if u.nodes.is_some() {
        warnings.push(format!(
            "service_name `{name}`: `nodes` is ignored with `discovery_type: {kind}`"
        ));
    }
    u.nodes = Some(Nodes::List(found));
}

/// Nodes from the registry's live instances.
fn from_registry(upstreams: Vec<&mut Upstream>, warnings: &mut Vec<String>) {
    let names: HashSet<String> = upstreams
        .iter()
        .filter_map(|u| u.service_name.clone())
        .collect();
    *WANTED.lock().unwrap_or_else(|e| e.into_inner()) = Some(names);
    for u in upstreams {
        let name = u.service_name.clone().unwrap_or_default();
        let instances = REGISTRY
            .get()
            .map(|r| r.instances(&name))
            .unwrap_or_default();
        if instances.is_empty() {
            warnings.push(format!(
                "service_name `{name}`: no instance registered yet; requests get 503 until one is"
            ));
        }
        let nodes = instances
            .into_iter()
            .map(|i| Node {
                host: i.registration.address,
                port: Some(i.registration.port),
                weight: i.registration.weight,
                priority: 0,
                metadata: Some(i.registration.metadata).filter(|m| !m.is_null()),
            })
            .collect();
        set_nodes(u, "registry", nodes, warnings);
    }
}

/// Nodes from DNS, watching names not seen before (and waiting a few
/// seconds for their first answer, so the gateway starts with its nodes).
fn from_dns(
    upstreams: Vec<&mut Upstream>,
    settings: &turnpike_config::Dns,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    if upstreams.is_empty() {
        if let Some(dns) = DNS.get() {
            // No name is wanted any more: their watchers stop.
            dns.watch(&[], Duration::ZERO);
        }
        return Ok(());
    }
    let dns = match DNS.get() {
        Some(d) => d,
        None => {
            let dns = Dns::new(&settings.nameservers)
                .map_err(|e| ConfigError::new("gateway", "dns", e.to_string()))?;
            dns.on_change(changed);
            DNS.get_or_init(|| dns)
        }
    };
    let names: Vec<String> = upstreams
        .iter()
        .filter_map(|u| u.service_name.clone())
        .collect();
    dns.watch(&names, Duration::from_secs(5));
    for u in upstreams {
        let name = u.service_name.clone().unwrap_or_default();
        let found = dns.nodes(&name).unwrap_or_else(|| {
            warnings.push(format!(
                "service_name `{name}`: no DNS answer yet; no nodes (requests get 503) until DNS answers"
            ));
            Vec::new()
        });
        let nodes = found
            .into_iter()
            .map(|n| Node {
                host: n.host,
                port: Some(n.port),
                weight: n.weight,
                priority: n.priority,
                metadata: None,
            })
            .collect();
        set_nodes(u, "dns", nodes, warnings);
    }
    Ok(())
}
