//! The Admin API: APISIX v3's paths, verbs, bodies and answers over the
//! config store, plus revision history, diff and rollback under
//! `/turnpike/admin/`.
//!
//! Every write is checked before it is committed: the whole configuration
//! with the change applied is compiled by the caller's [`Validate`], so a
//! write the gateway could not serve is refused (400, with the resource and
//! field path) and nothing is stored. A commit compares-and-sets each key
//! it changes on the revision it was validated against; a concurrent edit
//! makes it validate again, or answers 409 when the client sent `If-Match`.
//!
//! Security: keys are compared in constant time; `allow_admin` limits the
//! client addresses; bodies are bounded; secret fields of plugins are
//! masked in every read and never echoed in errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, State as Extract};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ipnet::IpNet;
use serde_json::{json, Value};
use turnpike_store::{Registry, State, Store};

mod history;
mod mask;
mod registry;
mod resources;

/// Compiles a whole configuration (values by key); the errors name the
/// resource and field path.
pub type Validate = Arc<dyn Fn(&BTreeMap<String, Value>) -> Result<(), Vec<String>> + Send + Sync>;

/// Where reads come from, and whether writes are allowed.
pub enum Backend {
    /// `config_provider: file`: the file's resources, read when asked.
    ReadOnly(Arc<dyn Fn() -> Arc<State> + Send + Sync>),
    Store(Arc<Store>),
}

impl Backend {
    fn state(&self) -> Arc<State> {
        match self {
            Backend::ReadOnly(read) => read(),
            Backend::Store(s) => s.state(),
        }
    }
}

/// An Admin API key, as APISIX's `deployment.admin.admin_key` entries.
#[derive(Debug, Clone)]
pub struct Key {
    /// Named in the history as who made a change.
    pub name: String,
    pub key: String,
    /// `viewer` keys read only.
    pub viewer: bool,
}

pub struct Settings {
    pub keys: Vec<Key>,
    /// Client networks allowed; empty: any.
    pub allow: Vec<IpNet>,
    /// The largest request body accepted.
    pub body_limit: usize,
    /// The etcd prefix shown in item keys (`/apisix`).
    pub prefix: String,
}

pub struct Admin {
    pub settings: Settings,
    pub backend: Backend,
    pub validate: Validate,
    pub plugins: &'static turnpike_plugin::Registry,
    /// The service registry, if this gateway has one.
    pub registry: Option<Arc<Registry>>,
    /// One write at a time on this node: validation and commit in order.
    writing: tokio::sync::Mutex<()>,
}

impl Admin {
    pub fn new(
        settings: Settings,
        backend: Backend,
        validate: Validate,
        plugins: &'static turnpike_plugin::Registry,
        registry: Option<Arc<Registry>>,
    ) -> Admin {
        Admin {
            settings,
            backend,
            validate,
            plugins,
            registry,
            writing: tokio::sync::Mutex::new(()),
        }
    }
}

/// Binds the Admin API on `addr` and serves it on the current runtime.
pub async fn serve(addr: &str, admin: Admin) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("gateway.admin.listen: cannot listen on {addr}: {e}"),
        )
    })?;
    let bound = listener.local_addr()?;
    let limit = admin.settings.body_limit;
    let admin = Arc::new(admin);
    let app = axum::Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(limit))
        // Before the body is read: a client without a key, or from outside
        // allow_admin, makes the gateway hold nothing.
        .layer(axum::middleware::from_fn_with_state(admin.clone(), guard))
        .with_state(admin);
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, service).await {
            tracing::error!("admin API stopped: {e}");
        }
    });
    Ok(bound)
}

/// An answer: a status and a JSON body.
#[derive(Debug)]
pub(crate) struct Answer(StatusCode, Value);

impl Answer {
    pub(crate) fn ok(body: Value) -> Answer {
        Answer(StatusCode::OK, body)
    }

    pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Answer {
        Answer(status, json!({"error_msg": message.into()}))
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

/// What a handler knows of the request.
pub(crate) struct Call<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: BTreeMap<String, String>,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    /// The key's name, for the history.
    pub actor: String,
}

/// Checks the client's address and key before anything else, and hands
/// the key on to [`handle`].
async fn guard(
    Extract(admin): Extract<Arc<Admin>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let ip = peer.ip().to_canonical();
    if !admin.settings.allow.is_empty() && !admin.settings.allow.iter().any(|n| n.contains(&ip)) {
        let why = format!("{ip} is not allowed (gateway.admin.allow_admin)");
        return Answer::error(StatusCode::FORBIDDEN, why).into_response();
    }
    let query = Query(query_pairs(req.uri()));
    let offered = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or(query.0.get("api_key").map(String::as_str));
    let Some(key) = admin.authorize(offered).cloned() else {
        return Answer::error(StatusCode::UNAUTHORIZED, "failed to check token").into_response();
    };
    if key.viewer && req.method() != Method::GET {
        let why = "this key only reads (role: viewer)";
        return Answer::error(StatusCode::UNAUTHORIZED, why).into_response();
    }
    // Read once here; `handle` takes it as it is.
    req.extensions_mut().insert(key);
    req.extensions_mut().insert(query);
    next.run(req).await
}

async fn handle(
    Extract(admin): Extract<Arc<Admin>>,
    axum::Extension(key): axum::Extension<Key>,
    axum::Extension(Query(query)): axum::Extension<Query>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Answer {
    let body = match body {
        Ok(b) => b,
        Err(e) => return Answer::error(e.status(), e.body_text()),
    };
    let call = Call {
        method: &method,
        path: uri.path(),
        query,
        headers: &headers,
        body,
        actor: key.name.clone(),
    };
    let path = call.path.trim_end_matches('/');
    if let Some(rest) = path.strip_prefix("/turnpike/admin/") {
        return history::handle(&admin, &call, rest).await;
    }
    if let Some(rest) = path.strip_prefix("/turnpike/registry") {
        if rest.is_empty() || rest.starts_with('/') {
            return registry::handle(&admin, &call, rest).await;
        }
    }
    match path.strip_prefix("/apisix/admin/") {
        Some("plugins/list") if method == Method::GET => plugin_list(&admin),
        Some(rest) if rest.starts_with("plugins/") && method == Method::GET => {
            plugin_schema(&admin, &rest["plugins/".len()..])
        }
        Some(rest) => resources::handle(&admin, &call, rest).await,
        None => Answer::error(StatusCode::NOT_FOUND, "not found"),
    }
}

impl Admin {
    /// The key offered, if it is one of ours (constant time per key).
    fn authorize(&self, offered: Option<&str>) -> Option<&Key> {
        // No key is allowed on a loopback address only (checked at start).
        static ANONYMOUS: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key {
            name: "admin (no key)".into(),
            key: String::new(),
            viewer: false,
        });
        if self.settings.keys.is_empty() {
            return Some(&ANONYMOUS);
        }
        let offered = offered?;
        let mut found = None;
        for k in &self.settings.keys {
            if turnpike_plugin::same_secret(k.key.as_bytes(), offered.as_bytes()) && found.is_none()
            {
                found = Some(k);
            }
        }
        found
    }

    fn store(&self) -> Result<&Store, Answer> {
        match &self.backend {
            Backend::Store(s) => Ok(s),
            Backend::ReadOnly(_) => Err(Answer::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "the configuration comes from the config file (config_provider: file): edit the file, \
                 or run with config_provider: embedded or etcd to write through the Admin API",
            )),
        }
    }

    /// Runs the validator off the async threads (a large config takes a
    /// while to compile).
    async fn check(&self, values: BTreeMap<String, Value>) -> Result<(), Vec<String>> {
        let validate = self.validate.clone();
        tokio::task::spawn_blocking(move || validate(&values))
            .await
            .unwrap_or_else(|e| Err(vec![format!("validation failed: {e}")]))
    }
}

/// The request's query arguments, read once by [`guard`].
#[derive(Clone)]
struct Query(BTreeMap<String, String>);

/// Query arguments, decoded by axum's own reader; an unreadable query
/// reads as none.
fn query_pairs(uri: &Uri) -> BTreeMap<String, String> {
    axum::extract::Query::try_from_uri(uri).map_or_else(|_| BTreeMap::new(), |q| q.0)
}

fn plugin_list(admin: &Admin) -> Answer {
    let mut names: Vec<&str> = admin.plugins.factories().map(|f| f.name).collect();
    names.sort_unstable();
    Answer::ok(json!(names))
}

fn plugin_schema(admin: &Admin, name: &str) -> Answer {
    let Some(schema) = admin.plugins.schema(name) else {
        return Answer::error(
            StatusCode::NOT_FOUND,
            format!("plugin `{name}` is not in this build"),
        );
    };
    let mut schema = schema.clone();
    if let Some(consumer) = admin.plugins.consumer_schema(name) {
        schema["consumer_schema"] = consumer.clone();
    }
    Answer::ok(schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_split_and_decode() {
        let q = query_pairs(&Uri::from_static(
            "/apisix/admin/routes?api_key=k%2Fy&page=2&x",
        ));
        assert_eq!(q["api_key"], "k/y");
        assert_eq!(q["x"], "");
    }
}
