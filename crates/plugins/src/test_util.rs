//! Requests and registries for plugin unit tests.

use std::sync::Arc;

use http::HeaderValue;
use serde_json::Value;
use turnpike_plugin::{Conn, Ctx, Entry, Env, Flow, Phase, Reply};

/// A GET for `uri` from 10.0.0.1, with a Host header.
pub(crate) fn ctx(uri: &str) -> Ctx {
    request(http::Request::get(uri))
}

pub(crate) fn request(b: http::request::Builder) -> Ctx {
    let (parts, ()) = b
        .header("host", "example.com")
        .body(())
        .unwrap()
        .into_parts();
    let conn = Arc::new(Conn::new(
        "10.0.0.1:5000".parse().unwrap(),
        "127.0.0.1:9080".parse().unwrap(),
        "http",
    ));
    Ctx::new(parts, conn, HeaderValue::from_static("rid-1"))
}

/// Builds plugin `name` with `config` through the real registry.
pub(crate) fn entry(name: &str, config: Value) -> Entry {
    entry_with(name, config, &Env::default())
}

pub(crate) fn entry_with(name: &str, config: Value, env: &Env) -> Entry {
    crate::registry()
        .entry(name, &config, env)
        .unwrap_or_else(|e| panic!("{e:?}"))
}

/// The errors building `name` with `config` gives.
pub(crate) fn errors(name: &str, config: Value) -> Vec<turnpike_plugin::FieldError> {
    match crate::registry().entry(name, &config, &Env::default()) {
        Ok(_) => panic!("config was accepted"),
        Err(e) => e,
    }
}

/// Runs one request phase of one entry, waiting for any I/O.
pub(crate) async fn run(phase: Phase, e: &Entry, ctx: &mut Ctx) -> Option<Reply> {
    let chain = turnpike_plugin::Chain::new(vec![e.clone()]);
    turnpike_plugin::run_phase(phase, &Default::default(), &chain, ctx).await
}

/// Runs a request phase without I/O.
pub(crate) fn run_now(phase: Phase, e: &Entry, ctx: &mut Ctx) -> Option<Reply> {
    let flow = match phase {
        Phase::Rewrite => e.plugin.rewrite(ctx),
        Phase::Access => e.plugin.access(ctx),
        Phase::BeforeProxy => e.plugin.before_proxy(ctx),
    };
    match flow {
        Flow::Continue => None,
        Flow::Respond(r) => Some(r),
        Flow::Await(_) => panic!("hook waited; use `run`"),
    }
}

/// A reply's body as JSON.
pub(crate) fn body(r: &Reply) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

/// A consumer with no plugins of its own.
pub(crate) fn consumer(name: &str) -> Arc<turnpike_plugin::Consumer> {
    Arc::new(turnpike_plugin::Consumer {
        username: name.into(),
        header: HeaderValue::from_str(name).unwrap(),
        group_id: None,
        chain: Default::default(),
    })
}

/// The build environment with these consumers' credentials for `plugin`.
pub(crate) fn env(plugin: &str, creds: &[(&str, Value)]) -> Env {
    let r = crate::registry();
    let list = creds
        .iter()
        .map(|(user, c)| (consumer(user), r.check_credential(plugin, c).unwrap()))
        .collect();
    let mut all = std::collections::HashMap::new();
    all.insert(plugin, list);
    let (env, errors) = r.indexes(all);
    assert!(
        errors.is_empty(),
        "{:?}",
        errors.iter().map(|x| &x.2).collect::<Vec<_>>()
    );
    env
}
