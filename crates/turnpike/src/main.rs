//! The `turnpike` binary: `run`, `check` and `version`.
//!
//! `run` loads the config file, compiles it into a snapshot, starts the
//! workers and the status listener, then reloads the snapshot whenever the
//! file changes (or on SIGHUP) until SIGTERM or SIGINT starts a drain.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use turnpike_config::{ConfigError, ConfigFile, Gateway, Provider, QueueKind, Snapshot};
use turnpike_proxy::{serve_status, start_health_checks, Server, Shared};
use turnpike_queue::Place;
use turnpike_store::Store;

mod admin;
mod discovery;
mod source;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "turnpike",
    about = "Turnpike API gateway",
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve traffic with the given config file.
    Run {
        #[arg(short, long, default_value = "conf/turnpike.yaml")]
        config: PathBuf,
    },
    /// Validate a config file; exits 1 naming each bad resource and field.
    Check {
        #[arg(short, long, default_value = "conf/turnpike.yaml")]
        config: PathBuf,
    },
    /// List the plugins this build ships, with their priorities; with a
    /// name, print that plugin's config schema (and consumer schema) as JSON.
    Plugins { name: Option<String> },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Version => {
            println!("turnpike {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check { config } => check(&config),
        Command::Plugins { name } => plugins(name.as_deref()),
        Command::Run { config } => run(&config),
    }
}

fn plugins(name: Option<&str>) -> ExitCode {
    let registry = registry();
    let Some(name) = name else {
        let mut all: Vec<_> = registry.factories().collect();
        all.sort_by_key(|f| std::cmp::Reverse(f.priority));
        for f in all {
            let kind = if f.consumer_schema.is_some() {
                "  (authentication)"
            } else {
                ""
            };
            println!("{:<22} {:>6}{kind}", f.name, f.priority);
        }
        return ExitCode::SUCCESS;
    };
    let Some(schema) = registry.schema(name) else {
        eprintln!("unknown plugin `{name}`; `turnpike plugins` lists them");
        return ExitCode::FAILURE;
    };
    let doc = serde_json::json!({
        "name": name,
        "priority": registry.get(name).map(|f| f.priority),
        "schema": schema,
        "consumer_schema": registry.consumer_schema(name),
    });
    println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    ExitCode::SUCCESS
}

/// The plugins this build ships, registered once.
fn registry() -> &'static turnpike_plugin::Registry {
    static REGISTRY: std::sync::OnceLock<turnpike_plugin::Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(|| turnpike_plugin::Registry::new(turnpike_plugins::factories()))
}

/// Loads and compiles the file; `previous` lends unchanged upstreams.
fn load(
    path: &Path,
    previous: Option<&Snapshot>,
) -> Result<(ConfigFile, Snapshot), Vec<ConfigError>> {
    let mut file = turnpike_config::load(path)?;
    let mut errors = settings_errors(&file.gateway);
    let revision = previous.map_or(1, |p| p.revision + 1);
    match compile(
        &mut file.resources,
        &file.gateway,
        &mut file.warnings,
        previous,
        revision,
    ) {
        Ok(snapshot) if errors.is_empty() => Ok((file, snapshot)),
        Ok(_) => Err(errors),
        Err(e) => {
            errors.extend(e);
            Err(errors)
        }
    }
}

/// Fills discovered nodes in, then compiles.
fn compile(
    res: &mut turnpike_config::Resources,
    gateway: &Gateway,
    warnings: &mut Vec<String>,
    previous: Option<&Snapshot>,
    revision: u64,
) -> Result<Snapshot, Vec<ConfigError>> {
    discovery::fill(res, &gateway.dns, warnings).map_err(|e| vec![e])?;
    turnpike_config::compile(res, registry(), previous, revision)
}

/// The serving gateway's reloader, for discovery changes to reach.
static RELOADER: std::sync::OnceLock<std::sync::Weak<Reloader>> = std::sync::OnceLock::new();

/// Node settings this build cannot honour are refused, not ignored.
fn settings_errors(g: &Gateway) -> Vec<ConfigError> {
    let mut errors = admin::settings_errors(g);
    if !g.tls_listen.is_empty() {
        errors.push(ConfigError::new(
            "gateway",
            "tls_listen",
            "TLS listeners are not available in this build",
        ));
    }
    if g.config_provider == Provider::Etcd {
        errors.extend(etcd_errors(&g.etcd));
    }
    if g.queue == QueueKind::Redis && g.redis.is_none() {
        errors.push(ConfigError::new(
            "gateway",
            "queue",
            "`redis` needs gateway.redis.url",
        ));
    }
    if g.listen.is_empty() {
        errors.push(ConfigError::new(
            "gateway",
            "listen",
            "at least one address is needed",
        ));
    }
    for (i, addr) in g.listen.iter().enumerate() {
        if addr.parse::<std::net::SocketAddr>().is_err() {
            errors.push(ConfigError::new(
                "gateway",
                format!("listen[{i}]"),
                format!("`{addr}` is not ip:port"),
            ));
        }
    }
    errors
}

/// `gateway.etcd` as this build can use it: plain-HTTP endpoints (TLS to
/// etcd is not supported), at least one, and some history.
fn etcd_errors(etcd: &turnpike_config::Etcd) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if etcd.endpoints.is_empty() {
        errors.push(ConfigError::new(
            "gateway",
            "etcd.endpoints",
            "at least one endpoint is needed",
        ));
    }
    for (i, e) in etcd.endpoints.iter().enumerate() {
        if !e.starts_with("http://") {
            errors.push(ConfigError::new(
                "gateway",
                format!("etcd.endpoints[{i}]"),
                format!("`{e}` must start with `http://` (TLS to etcd is not supported)"),
            ));
        }
    }
    if etcd.history_kept == 0 {
        errors.push(ConfigError::new(
            "gateway",
            "etcd.history_kept",
            "must be at least 1",
        ));
    }
    errors
}

fn check(path: &Path) -> ExitCode {
    match load(path, None) {
        Ok((file, snapshot)) => {
            for w in file.warnings.iter().chain(&snapshot.warnings) {
                println!("{}: warning: {w}", path.display());
            }
            println!(
                "{}: ok ({} routes, {} upstreams)",
                path.display(),
                snapshot.routes.len(),
                snapshot.upstreams.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors {
                eprintln!("{}: {e}", path.display());
            }
            ExitCode::from(1)
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let mut file = match turnpike_config::load(path) {
        Ok(file) => file,
        Err(errors) => return refused(path, &errors),
    };
    let errors = settings_errors(&file.gateway);
    if !errors.is_empty() {
        return refused(path, &errors);
    }
    // With the file as the source, refuse a bad one before logging starts.
    let snapshot = if file.gateway.config_provider == Provider::File {
        let (res, gateway, warnings) = (&mut file.resources, &file.gateway, &mut file.warnings);
        match compile(res, gateway, warnings, None, 1) {
            Ok(s) => Some(s),
            Err(errors) => return refused(path, &errors),
        }
    } else {
        None
    };
    init_logging(&file.gateway.log_level);
    for w in &file.warnings {
        tracing::warn!("{w}");
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the control runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let served = rt.block_on(serve(path, file, snapshot));
    // After a second signal the drain may still be running on a blocking
    // thread: do not wait for it, as dropping the runtime would.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("turnpike: {e}");
            ExitCode::from(1)
        }
    }
}

fn refused(path: &Path, errors: &[ConfigError]) -> ExitCode {
    for e in errors {
        eprintln!("{}: {e}", path.display());
    }
    ExitCode::from(1)
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

/// The first snapshot from a store. A stored configuration that does not
/// compile is logged with every error, and the gateway starts with none
/// (not ready, answering 404) so the Admin API can mend it.
fn first_from_store(store: &Store, gateway: &Gateway) -> (Snapshot, Option<String>) {
    match source::compile(&store.state(), gateway, None) {
        Ok((snapshot, warnings)) => {
            // The snapshot's own warnings are logged by `serve`.
            for w in &warnings {
                tracing::warn!("{w}");
            }
            (snapshot, None)
        }
        Err(errors) => {
            for e in &errors {
                tracing::error!("config refused: {e}");
            }
            let why = format!(
                "the configuration in the {} store does not compile ({} errors, logged): mend it through the Admin API",
                store.describe(),
                errors.len()
            );
            tracing::error!("{why}");
            let empty = turnpike_config::Resources::default();
            // Revision 0, so the next stored revision always reloads.
            let snapshot = turnpike_config::compile(&empty, registry(), None, 0)
                .expect("an empty configuration compiles");
            (snapshot, Some(why))
        }
    }
}

async fn serve(path: &Path, file: ConfigFile, snapshot: Option<Snapshot>) -> std::io::Result<()> {
    let registry = source::registry(&file.gateway).await?;
    discovery::set_registry(registry.clone());
    let store = source::open(&file, path)
        .await
        .map_err(std::io::Error::other)?;
    // Subscribed before the first compile: a change in between reloads.
    let changes = store.as_ref().map(|s| s.changes());
    let (snapshot, unready) = match (&store, snapshot) {
        (Some(store), _) => first_from_store(store, &file.gateway),
        (None, Some(snapshot)) => (snapshot, None),
        (None, None) => unreachable!("a file source is compiled before serving"),
    };
    for w in &snapshot.warnings {
        tracing::warn!("{w}");
    }
    let gateway = file.gateway;
    let routes = snapshot.routes.len();
    let runtime = tokio::runtime::Handle::current();
    start_health_checks(&snapshot, &runtime);
    let shared = Shared::new(snapshot, gateway.client_body_timeout);
    *shared.unready.lock().unwrap_or_else(|e| e.into_inner()) = unready;
    start_async_queue(&gateway, &shared);
    let server = Server::start(
        &gateway.listen,
        gateway.workers,
        gateway.shutdown_timeout,
        shared.clone(),
    )?;
    let status = serve_status(&gateway.status.listen, shared.clone()).await?;
    admin::start(&gateway, store.as_ref(), path, &shared, &registry).await?;
    let _store_health = store.as_ref().and_then(source::watch_health);
    let _registry_health = source::registry_health(&registry);
    let _queue_health = source::queue_health();
    let from = store
        .as_ref()
        .map_or_else(|| path.display().to_string(), |s| s.describe());
    tracing::info!(listen = ?server.addrs(), status = %status, routes, "turnpike is serving (configuration from {from})");

    let reloader = Arc::new(Reloader {
        path: path.to_path_buf(),
        shared: shared.clone(),
        gateway,
        last: Mutex::new(std::fs::read_to_string(path).ok()),
        runtime,
        store: store.clone(),
    });
    let _ = RELOADER.set(Arc::downgrade(&reloader));
    discovery::on_change(|| {
        if let Some(r) = RELOADER.get().and_then(std::sync::Weak::upgrade) {
            r.reload(discovery::CHANGED);
        }
    });
    discovery::refresh();
    let _watch = match &store {
        None => {
            let on_change = reloader.clone();
            let watch = turnpike_config::watch_file(path, move || {
                on_change.reload("the config file changed")
            })
            .map_err(|e| std::io::Error::other(format!("cannot watch {}: {e}", path.display())))?;
            Some(watch)
        }
        Some(_) => {
            if let Some(changes) = changes {
                follow(changes, reloader.clone());
            }
            None
        }
    };

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let r = reloader.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload("SIGHUP")).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    shared.draining.store(true, Ordering::Release);
    tracing::info!("draining: no new connections; in-flight requests may finish");
    let drained = tokio::task::spawn_blocking(move || server.shutdown());
    tokio::select! {
        _ = drained => tracing::info!("stopped"),
        // A second signal means: do not wait.
        _ = term.recv() => tracing::warn!("second signal: exiting without waiting for in-flight requests"),
        _ = int.recv() => tracing::warn!("second signal: exiting without waiting for in-flight requests"),
    }
    Ok(())
}

/// The asynchronous mode's queue lives in `data_dir`; its workers run on
/// the control runtime and send jobs through the proxy's own path.
fn start_async_queue(gateway: &Gateway, shared: &Arc<Shared>) {
    let shared = shared.clone();
    let exec: turnpike_queue::Executor = Arc::new(move |job, body| {
        let shared = shared.clone();
        Box::pin(async move { turnpike_proxy::execute(&shared, job, body).await })
    });
    let runtime = tokio::runtime::Handle::current();
    let deliver: turnpike_queue::Deliver = Arc::new(turnpike_proxy::deliver);
    let place = match gateway.queue {
        QueueKind::Embedded => Place::Dir(Path::new(&gateway.data_dir).to_path_buf()),
        // `settings_errors` refused `redis` without a URL.
        QueueKind::Redis => Place::Redis(
            gateway
                .redis
                .as_ref()
                .map_or(String::new(), |r| r.url.clone()),
        ),
    };
    turnpike_queue::configure(place, runtime, exec, deliver);
}

/// Reloads each time the store changes; changes that come while a reload
/// runs are taken together by the next.
fn follow(mut changes: tokio::sync::watch::Receiver<u64>, reloader: Arc<Reloader>) {
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let r = reloader.clone();
            let _ = tokio::task::spawn_blocking(move || r.reload("the config store changed")).await;
        }
    });
}

/// Applies configuration changes, one at a time.
struct Reloader {
    path: PathBuf,
    shared: Arc<Shared>,
    gateway: Gateway,
    /// The text last applied or refused, so events that do not change the
    /// file (another file in its directory, a touch) cost nothing. Also the
    /// lock that keeps reloads one at a time.
    last: Mutex<Option<String>>,
    /// Where active health checkers of new upstreams run.
    runtime: tokio::runtime::Handle,
    /// The store, when the file is not the source.
    store: Option<Arc<Store>>,
}

impl Reloader {
    fn reload(&self, why: &str) {
        // One reload at a time. A poisoned lock only means an earlier reload
        // panicked; reloading is still safe because a snapshot is swapped in
        // whole or not at all.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let forced = why == "SIGHUP" || why == discovery::CHANGED;
        let previous = self.shared.snapshot.load_full();
        let started = std::time::Instant::now();
        let loaded = match &self.store {
            Some(store) => {
                let state = store.state();
                if !forced && state.revision == previous.revision {
                    return;
                }
                source::compile(&state, &self.gateway, Some(&previous))
                    .map(|(snapshot, warnings)| (snapshot, warnings, None))
            }
            None => {
                let text = std::fs::read_to_string(&self.path).ok();
                if !forced && text.is_some() && *last == text {
                    return;
                }
                *last = text;
                load(&self.path, Some(&previous)).map(|(mut file, snapshot)| {
                    (snapshot, std::mem::take(&mut file.warnings), Some(file))
                })
            }
        };
        match loaded {
            Ok((snapshot, warnings, file)) => {
                for w in warnings.iter().chain(&snapshot.warnings) {
                    tracing::warn!("{w}");
                }
                if let Some(file) = file {
                    // Node settings are read at start only.
                    if self.gateway != file.gateway {
                        tracing::warn!("gateway settings changed: they apply on restart; routes and upstreams apply now");
                    }
                }
                let (revision, routes) = (snapshot.revision, snapshot.routes.len());
                start_health_checks(&snapshot, &self.runtime);
                self.shared.snapshot.store(Arc::new(snapshot));
                *self
                    .shared
                    .unready
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                let elapsed_ms = started.elapsed().as_millis() as u64;
                tracing::info!(
                    revision,
                    routes,
                    elapsed_ms,
                    "configuration reloaded ({why})"
                );
            }
            Err(errors) => {
                for e in &errors {
                    tracing::error!("config refused: {e}");
                }
                tracing::error!(
                    revision = previous.revision,
                    "{} error(s): still serving the previous configuration",
                    errors.len()
                );
            }
        }
    }
}
