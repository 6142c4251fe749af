//! The plugins Turnpike ships, one file per plugin, named as in APISIX
//! (`key-auth` lives in `key_auth.rs`). Each file holds, in order: the
//! name, the priority, the config schema, the consumer schema if any, the
//! typed config, and the phase hooks.
//!
//! [`registry`] lists them all; the binary hands it to the config compiler.

use std::sync::Arc;

use turnpike_plugin::{Factory, Registry};

mod api_breaker;
pub mod async_request;
mod basic_auth;
mod body_transformer;
mod consumer_restriction;
mod cors;
mod fault_injection;
mod file_logger;
mod forward_auth;
mod headers;
mod http_logger;
mod ip_restriction;
mod jwt_auth;
mod key_auth;
mod limit_conn;
mod limit_count;
mod limit_req;
mod limits;
mod logger;
mod mocking;
mod prometheus;
mod proxy_cache;
mod proxy_mirror;
mod proxy_rewrite;
mod redirect;
mod redis;
mod request_id;
mod request_validation;
mod response_rewrite;
mod response_store;
mod traffic_split;

/// Every plugin this build ships.
pub fn factories() -> Vec<Factory> {
    vec![
        request_id::factory(),
        fault_injection::factory(),
        mocking::factory(),
        cors::factory(),
        ip_restriction::factory(),
        request_validation::factory(),
        basic_auth::factory(),
        jwt_auth::factory(),
        key_auth::factory(),
        consumer_restriction::factory(),
        forward_auth::factory(),
        proxy_cache::factory(),
        body_transformer::factory(),
        proxy_mirror::factory(),
        proxy_rewrite::factory(),
        api_breaker::factory(),
        limit_conn::factory(),
        limit_count::factory(),
        limit_req::factory(),
        traffic_split::factory(),
        async_request::factory(),
        redirect::factory(),
        response_rewrite::factory(),
        prometheus::factory(),
        http_logger::factory(),
        file_logger::factory(),
    ]
}

/// The registry of every plugin this build ships.
pub fn registry() -> Arc<Registry> {
    Arc::new(Registry::new(factories()))
}

/// The key a plugin's state goes by, in [`turnpike_plugin::Env::state`]
/// and in Redis: the plugin, and `group` when set (resources sharing a
/// group share state), else the resource and a hash of the config, so
/// state survives reloads that do not change the config and starts afresh
/// when it changes. Two gateways with the same config agree on it.
pub(crate) fn state_key(
    plugin: &str,
    env: &turnpike_plugin::Env,
    group: Option<&str>,
    config: &serde_json::Value,
) -> String {
    let digest = config_digest(config);
    match group {
        Some(g) => format!("{plugin}:group:{g}:{digest:08x}"),
        None => format!("{plugin}:{}:{digest:08x}", env.owner()),
    }
}

/// A hash of a plugin's config, `_meta` left out.
pub(crate) fn config_digest(config: &serde_json::Value) -> u32 {
    let mut config = config.clone();
    if let serde_json::Value::Object(map) = &mut config {
        map.remove("_meta");
    }
    crc32fast::hash(config.to_string().as_bytes())
}

/// An address a plugin calls out to (`http://` or `https://`: each
/// caller's schema checks the scheme, see `turnpike_plugin::outbound`).
pub(crate) fn http_url(url: &str, field: &str) -> Result<http::Uri, turnpike_plugin::FieldError> {
    url.parse()
        .map_err(|_| turnpike_plugin::FieldError::new(field, "not a valid URI"))
}

/// Checks a configured header name, so a typo is refused at load rather
/// than never matching.
pub(crate) fn header_name(
    name: &str,
    field: &str,
) -> Result<http::HeaderName, turnpike_plugin::FieldError> {
    http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        turnpike_plugin::FieldError::new(field, format!("`{name}` is not a valid header name"))
    })
}

/// An authentication plugin's lookup: each consumer's credential turned
/// into (unique field value, entry) by `entry`. Two credentials with the
/// same value at `field` are refused, naming the second.
pub(crate) fn credential_index<V>(
    list: &[(std::sync::Arc<turnpike_plugin::Consumer>, serde_json::Value)],
    field: &str,
    entry: impl Fn(
        &std::sync::Arc<turnpike_plugin::Consumer>,
        &serde_json::Value,
    ) -> Result<(String, V), turnpike_plugin::FieldError>,
) -> Result<std::collections::HashMap<String, V>, (usize, turnpike_plugin::FieldError)> {
    let mut index = std::collections::HashMap::new();
    for (i, (consumer, cred)) in list.iter().enumerate() {
        let (unique, value) = entry(consumer, cred).map_err(|e| (i, e))?;
        if index.insert(unique, value).is_some() {
            let message = format!("duplicate {field}: another consumer has it");
            return Err((i, turnpike_plugin::FieldError::new(field, message)));
        }
    }
    Ok(index)
}

/// Parses a `$variable` template from a config, naming the field.
pub(crate) fn template(
    text: &str,
    field: &str,
) -> Result<turnpike_plugin::Template, turnpike_plugin::FieldError> {
    turnpike_plugin::Template::parse(text).map_err(|e| turnpike_plugin::FieldError::new(field, e))
}

/// A query string without the argument `name` (for `hide_credentials`).
pub(crate) fn without_arg(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let raw = pair.split('=').next().unwrap_or_default();
            turnpike_router::decode_component(raw) != name
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Drops query argument `name` from the upstream request.
pub(crate) fn hide_query_arg(ctx: &mut turnpike_plugin::Ctx, name: &str) {
    let uri = &ctx.upstream_uri;
    let Some(query) = uri.query() else {
        return;
    };
    let rest = without_arg(query, name);
    let text = if rest.is_empty() {
        uri.path().to_owned()
    } else {
        format!("{}?{rest}", uri.path())
    };
    // Made from a valid path and parts of a valid query.
    if let Ok(pq) = http::uri::PathAndQuery::try_from(text) {
        ctx.upstream_uri = pq;
    }
}

#[cfg(test)]
pub(crate) mod test_util;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_builds_and_priorities_are_unique() {
        let r = registry();
        r.compile_all();
        let mut seen = std::collections::HashSet::new();
        for f in r.factories() {
            assert!(
                seen.insert(f.priority),
                "priority {} used twice",
                f.priority
            );
        }
        assert_eq!(seen.len(), factories().len());
    }

    /// docs/plugins/README.md lists every plugin with its priority, and
    /// each has its own page.
    #[test]
    fn docs_table_matches_the_registry() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/plugins");
        let table = std::fs::read_to_string(docs.join("README.md")).unwrap();
        let mut listed: Vec<(String, i32)> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| ["))
            .map(|l| {
                let name = l.split(']').next().unwrap().to_owned();
                let priority = l.split('|').nth(1).unwrap().trim().parse().unwrap();
                (name, priority)
            })
            .collect();
        let mut shipped: Vec<(String, i32)> = factories()
            .iter()
            .map(|f| (f.name.to_owned(), f.priority))
            .collect();
        listed.sort();
        shipped.sort();
        assert_eq!(
            listed, shipped,
            "docs/plugins/README.md and the registry disagree"
        );
        for (name, _) in &shipped {
            assert!(
                docs.join(format!("{name}.md")).exists(),
                "docs/plugins/{name}.md is missing"
            );
        }
    }

    #[test]
    fn secrets_compare() {
        use turnpike_plugin::same_secret;
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
        assert!(
            !same_secret(b"abc", b"abcabc"),
            "a repeat of the secret is not the secret"
        );
        assert!(same_secret(b"", b""));
    }

    #[test]
    fn query_args_are_hidden() {
        assert_eq!(without_arg("apikey=1&a=2", "apikey"), "a=2");
        assert_eq!(without_arg("a=2&apikey", "apikey"), "a=2");
        assert_eq!(without_arg("apikey=1", "apikey"), "");
        assert_eq!(without_arg("api%6Bey=1&b=2", "apikey"), "b=2");
    }
}
