//! The Admin API's settings, checked at start, and its wiring to the
//! config source.

use std::sync::Arc;

use turnpike_admin::{Admin, Backend, Key, Settings};
use turnpike_config::{ConfigError, Gateway};
use turnpike_store::{State, Store};

/// Refuses an Admin API on a non-loopback address without a key, and
/// `allow_admin` entries that are not networks.
pub fn settings_errors(g: &Gateway) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let Some(admin) = &g.admin else {
        return errors;
    };
    match admin.listen.parse::<std::net::SocketAddr>() {
        Err(_) => errors.push(ConfigError::new(
            "gateway",
            "admin.listen",
            format!("`{}` is not ip:port", admin.listen),
        )),
        Ok(addr) if !addr.ip().is_loopback() && keys(admin).is_empty() => {
            errors.push(ConfigError::new(
                "gateway",
                "admin.key",
                format!(
                    "the Admin API listens on {addr}, beyond this host: set a key (or listen on 127.0.0.1)"
                ),
            ))
        }
        Ok(_) => {}
    }
    for (i, k) in admin.admin_key.iter().enumerate() {
        if k.key.is_empty() || !matches!(k.role.as_str(), "admin" | "viewer") {
            errors.push(ConfigError::new(
                "gateway",
                format!("admin.admin_key[{i}]"),
                "needs a non-empty key and a role of `admin` or `viewer`",
            ));
        }
    }
    for (i, net) in admin.allow_admin.iter().flatten().enumerate() {
        if parse_net(net).is_none() {
            errors.push(ConfigError::new(
                "gateway",
                format!("admin.allow_admin[{i}]"),
                format!("`{net}` is not an address or a network (CIDR)"),
            ));
        }
    }
    errors
}

fn keys(admin: &turnpike_config::Admin) -> Vec<Key> {
    let single = admin.key.iter().filter(|k| !k.is_empty()).map(|k| Key {
        name: "admin".into(),
        key: k.clone(),
        viewer: false,
    });
    let listed = admin.admin_key.iter().map(|k| Key {
        name: k.name.clone(),
        key: k.key.clone(),
        viewer: k.role == "viewer",
    });
    single.chain(listed).collect()
}

fn parse_net(s: &str) -> Option<ipnet::IpNet> {
    s.parse()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// The config file's resources as the Admin API shows them, read when
/// asked (so reloads and memory never pay for it), at the revision served.
fn file_view(
    path: &std::path::Path,
    shared: Arc<turnpike_proxy::Shared>,
) -> Arc<dyn Fn() -> Arc<State> + Send + Sync> {
    let path = path.to_path_buf();
    Arc::new(move || {
        let revision = shared.snapshot.load().revision;
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let raw = turnpike_config::parse_raw(&text).unwrap_or_default();
        Arc::new(turnpike_store::file_state(&raw, revision))
    })
}

/// Starts the Admin API when `gateway.admin` is set.
pub async fn start(
    g: &Gateway,
    store: Option<&Arc<Store>>,
    path: &std::path::Path,
    shared: &Arc<turnpike_proxy::Shared>,
    registry: &Arc<turnpike_store::Registry>,
) -> std::io::Result<()> {
    let Some(admin) = &g.admin else {
        if store.is_some() {
            tracing::warn!("gateway.admin is not set: the configuration store can only be changed from outside (etcdctl), or after a restart with an Admin API");
        }
        return Ok(());
    };
    let settings = Settings {
        keys: keys(admin),
        allow: admin
            .allow_admin
            .iter()
            .flatten()
            .filter_map(|n| parse_net(n))
            .collect(),
        body_limit: admin.max_body_bytes,
        prefix: g.etcd.prefix.trim_end_matches('/').to_owned(),
    };
    let backend = match store {
        Some(s) => Backend::Store(s.clone()),
        None => Backend::ReadOnly(file_view(path, shared.clone())),
    };
    let validate = crate::source::validator(shared.clone());
    let api = Admin::new(
        settings,
        backend,
        validate,
        crate::registry(),
        Some(registry.clone()),
    );
    let addr = turnpike_admin::serve(&admin.listen, api).await?;
    tracing::info!(admin = %addr, "admin API is serving");
    Ok(())
}
