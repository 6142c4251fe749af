//! Where the resources come from: the config file (`config_provider:
//! file`), or a store the Admin API edits (`embedded`, `etcd`). Node
//! settings always come from the file.

use std::path::Path;
use std::sync::Arc;

use turnpike_config::{ConfigError, ConfigFile, Gateway, Provider, Snapshot};
use turnpike_plugin::deps::{self, Dependency, Reachability};
use turnpike_store::{
    file_state, resource_lists, sweep_local, values, Embedded, Etcd, EtcdSettings, Expect,
    Registry, State, Store, Write,
};

/// Opens the store the settings name (none for `file`). An empty embedded
/// store takes the file's resources once; etcd waits until it answers.
pub async fn open(file: &ConfigFile, path: &Path) -> Result<Option<Arc<Store>>, String> {
    let g = &file.gateway;
    let store = match g.config_provider {
        Provider::File => return Ok(None),
        Provider::Embedded => {
            let dir = Path::new(&g.data_dir);
            let store = Embedded::open(dir).map_err(|e| format!("gateway.data_dir: {e}"))?;
            Store::Embedded(store)
        }
        Provider::Etcd => {
            tracing::info!(endpoints = ?g.etcd.endpoints, prefix = %g.etcd.prefix, "listing the configuration from etcd");
            Store::Etcd(
                Etcd::connect(EtcdSettings {
                    endpoints: g.etcd.endpoints.clone(),
                    prefix: g.etcd.prefix.clone(),
                    timeout: g.etcd.timeout,
                    history_kept: g.etcd.history_kept,
                })
                .await,
            )
        }
    };
    let store = Arc::new(store);
    // The file's resources as a store holds them (read again here: only a
    // store needs them this way).
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let raw = turnpike_config::parse_raw(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let in_file = file_state(&raw, 1);
    if !in_file.items.is_empty() {
        if matches!(*store, Store::Embedded(_)) && store.state().revision == 0 {
            // A file that does not compile is refused, not imported.
            let (mut res, mut warnings) = (file.resources.clone(), Vec::new());
            if let Err(errors) = crate::compile(&mut res, g, &mut warnings, None, 1) {
                let lines: Vec<String> = errors
                    .iter()
                    .map(|e| format!("{}: {e}", path.display()))
                    .collect();
                return Err(format!(
                    "not imported into the embedded store:\n{}",
                    lines.join("\n")
                ));
            }
            import(&store, in_file, path).await?;
        } else {
            tracing::warn!(
                "{}: its resources are ignored: the configuration is in the {} store (`turnpike` imports a file only into an empty embedded store)",
                path.display(),
                if matches!(*store, Store::Etcd(_)) { "etcd" } else { "embedded" }
            );
        }
    }
    Ok(Some(store))
}

/// Writes the file's resources into an empty store, as its first revision.
async fn import(store: &Store, from: State, path: &Path) -> Result<(), String> {
    let count = from.items.len();
    let writes = from
        .items
        .into_iter()
        .map(|(key, item)| Write {
            key,
            value: Some(item.value),
            expect: Expect::Absent,
        })
        .collect();
    let revision = store
        .commit(writes, "config file import")
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        revision,
        "imported {count} resources from {} into the empty embedded store; from now on the store holds the configuration and the file's resources are not read again",
        path.display()
    );
    Ok(())
}

/// Compiles a store's state; the snapshot's revision is the store's.
pub fn compile(
    state: &State,
    gateway: &Gateway,
    previous: Option<&Snapshot>,
) -> Result<(Snapshot, Vec<String>), Vec<ConfigError>> {
    let mut all = values(state);
    all.retain(|k, _| turnpike_config::known_kind(k));
    let (mut res, mut warnings) = turnpike_config::read_resources(resource_lists(&all))?;
    let snapshot = crate::compile(&mut res, gateway, &mut warnings, previous, state.revision)?;
    Ok((snapshot, warnings))
}

/// What the Admin API checks a write with: the whole configuration as it
/// would be, compiled. Discovered upstreams are checked without their
/// nodes, so a check never changes what DNS watches.
pub fn validator(shared: Arc<turnpike_proxy::Shared>) -> turnpike_admin::Validate {
    Arc::new(move |all| {
        let to_strings =
            |errors: Vec<ConfigError>| errors.iter().map(ToString::to_string).collect::<Vec<_>>();
        let known = all.iter().filter(|(k, _)| turnpike_config::known_kind(k));
        let (mut res, _) =
            turnpike_config::read_resources(resource_lists(known)).map_err(to_strings)?;
        let discovered = res
            .upstreams
            .iter_mut()
            .chain(res.routes.iter_mut().filter_map(|r| r.upstream.as_mut()))
            .chain(res.services.iter_mut().filter_map(|s| s.upstream.as_mut()))
            .filter(|u| u.discovery_type.is_some());
        for u in discovered {
            u.nodes = Some(turnpike_config::model::Nodes::List(Vec::new()));
        }
        let previous = shared.snapshot.load_full();
        turnpike_config::compile(&res, crate::registry(), Some(&previous), 0)
            .map(drop)
            .map_err(to_strings)
    })
}

/// The service registry: in Redis when `gateway.redis` is set (waiting a
/// few seconds for a first read), else in this process (and, with the
/// embedded store, saved in `data_dir`).
pub async fn registry(g: &Gateway) -> std::io::Result<Arc<Registry>> {
    let Some(redis) = &g.redis else {
        // With the embedded store, registrations are kept beside it.
        let dir = (g.config_provider == Provider::Embedded).then(|| Path::new(&g.data_dir));
        let registry = Registry::local(dir)
            .map_err(|e| std::io::Error::other(format!("gateway.data_dir: {e}")))?;
        tokio::spawn(sweep_local(Arc::downgrade(&registry)));
        return Ok(registry);
    };
    let registry = Registry::redis(&redis.url).map_err(std::io::Error::other)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !registry.up() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if !registry.up() {
        tracing::warn!(
            "registry: Redis {} does not answer yet; registered instances appear once it does",
            registry.address()
        );
    }
    Ok(registry)
}

/// Lists a shared registry among the dependencies while the handle lives.
pub fn registry_health(registry: &Arc<Registry>) -> Option<Arc<dyn Dependency>> {
    if !registry.is_shared() {
        return None;
    }
    let r = registry.clone();
    Some(listed(Health {
        kind: "redis",
        address: format!("{} (service registry)", registry.address()),
        up: Box::new(move || r.up()),
    }))
}

/// The shared asynchronous queue's Redis, listed in `/gateway/health`.
pub fn queue_health() -> Option<Arc<dyn Dependency>> {
    let queue = turnpike_queue::running()?;
    let address = format!("{} (async queue)", queue.redis_address()?);
    Some(listed(Health {
        kind: "redis",
        address,
        up: Box::new(move || queue.up()),
    }))
}

/// A store or registry as `/gateway/health` lists it.
struct Health {
    kind: &'static str,
    address: String,
    up: Box<dyn Fn() -> bool + Send + Sync>,
}

impl Dependency for Health {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    fn reachability(&self) -> Reachability {
        if (self.up)() {
            Reachability::Up
        } else {
            Reachability::Down
        }
    }
}

/// Lists `health` among the dependencies while the returned handle lives.
fn listed(health: Health) -> Arc<dyn Dependency> {
    let dep: Arc<dyn Dependency> = Arc::new(health);
    deps::register(&dep);
    dep
}

/// Lists an etcd store among the dependencies while the returned handle lives.
pub fn watch_health(store: &Arc<Store>) -> Option<Arc<dyn Dependency>> {
    if !matches!(**store, Store::Etcd(_)) {
        return None;
    }
    let s = store.clone();
    Some(listed(Health {
        kind: "etcd",
        address: store.describe().trim_start_matches("etcd ").to_owned(),
        up: Box::new(move || s.up()),
    }))
}
