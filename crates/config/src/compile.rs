//! Resources → [`Snapshot`]: resolve references, validate what serde cannot,
//! build the router, and carry over upstreams a reload did not change.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use turnpike_plugin::{Chain, Consumer, Entry, Env, Registry};
use turnpike_router::{RouteSpec, Router, Var};
use turnpike_upstream::{Checks, Health, Kind};

use crate::file::Resources;
use crate::gateway::seconds;
use crate::model::{self, Id, Plugins};
use crate::snapshot::{
    HashOn, Keepalive, KeyPart, Node, PassHost, Route, Scheme, Snapshot, TimeoutOverride, Timeouts,
    Upstream,
};
use crate::ConfigError;

mod consumers;

/// Compiles resources into a snapshot. `registry` holds the plugins this
/// build knows; `previous` lends its upstreams (and so their balancer
/// state) to those that did not change. Every problem is reported, each
/// with its resource and field path.
pub fn compile(
    res: &Resources,
    registry: &Registry,
    previous: Option<&Snapshot>,
    revision: u64,
) -> Result<Snapshot, Vec<ConfigError>> {
    let mut c = Compiler {
        errors: Vec::new(),
        warnings: Vec::new(),
        previous,
        upstreams: HashMap::new(),
        unrouted: Vec::new(),
        registry,
        env: registry.env(),
    };
    let upstream_ids = c.upstreams(res);
    for (id, upstream) in &upstream_ids {
        c.env
            .add_upstream(format!("upstreams/{id}"), upstream.clone());
    }
    let consumers = c.consumers(res);
    let global = c.global_rules(res);
    let services = c.services(res, &upstream_ids);
    let plugin_configs = c.plugin_sets(&res.plugin_configs, "plugin config");
    let (mut routes, specs) = c.routes(res, &upstream_ids, &services, &plugin_configs);
    c.body_readers(&mut routes, &global, &consumers);
    c.opaque(res);
    c.check_unrouted();
    let router = match Router::build(&specs) {
        Ok(r) => Some(r),
        Err(errors) => {
            for (i, e) in errors {
                c.errors.push(ConfigError::new(
                    format!("route {}", routes[i].id),
                    e.path,
                    e.message,
                ));
            }
            None
        }
    };
    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    Ok(Snapshot {
        revision,
        // Set whenever the list of errors is empty; checked just above.
        router: router.expect("router built when there are no errors"),
        routes,
        upstreams: c.upstreams,
        global,
        consumers,
        warnings: c.warnings,
    })
}

struct Compiler<'p> {
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
    previous: Option<&'p Snapshot>,
    upstreams: HashMap<Arc<str>, Arc<Upstream>>,
    /// Matching rules of routes left out of the router (disabled, or with
    /// another error), checked so every error is reported at once.
    unrouted: Vec<(String, RouteSpec)>,
    registry: &'p Registry,
    /// What plugins are built with: the process's plugin state, the
    /// upstreams, and the credential lookups of the authentication plugins
    /// (built from the consumers before any route's plugins are).
    env: Env,
}

struct ServiceRef {
    name: Option<Arc<str>>,
    upstream: Option<Arc<Upstream>>,
    hosts: Vec<String>,
    websocket: bool,
    plugins: Vec<Entry>,
}

impl Compiler<'_> {
    fn err(&mut self, resource: &str, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(resource, path, message));
    }

    fn upstreams(&mut self, res: &Resources) -> HashMap<Id, Arc<Upstream>> {
        let mut by_id = HashMap::new();
        let mut seen = HashSet::new();
        for (i, u) in res.upstreams.iter().enumerate() {
            let Some((id, label)) = self.unique_id(&u.id, "upstream", i, &mut seen) else {
                continue;
            };
            if let Some(up) = self.upstream(u, format!("upstreams/{id}"), &label, "") {
                by_id.insert(id, up);
            }
        }
        by_id
    }

    fn services(
        &mut self,
        res: &Resources,
        upstreams: &HashMap<Id, Arc<Upstream>>,
    ) -> HashMap<Id, ServiceRef> {
        let mut by_id = HashMap::new();
        let mut seen = HashSet::new();
        for (i, s) in res.services.iter().enumerate() {
            let Some((id, label)) = self.unique_id(&s.id, "service", i, &mut seen) else {
                continue;
            };
            let plugins = self.entries(&label, s.plugins.as_ref());
            let upstream = match (&s.upstream, &s.upstream_id) {
                (inline, Some(uid)) => {
                    self.validate_only(inline.as_ref(), &format!("services/{id}"), &label);
                    self.reference(upstreams, uid, &label, "upstream_id", "upstream")
                }
                (Some(u), None) => self.upstream(u, format!("services/{id}"), &label, "upstream"),
                (None, None) => None,
            };
            let hosts = s.hosts.clone().unwrap_or_default();
            by_id.insert(
                id,
                ServiceRef {
                    name: s.name.as_deref().map(Arc::from),
                    upstream,
                    hosts,
                    websocket: s.enable_websocket.unwrap_or(false),
                    plugins,
                },
            );
        }
        by_id
    }

    /// Resources that are only a set of plugins with an id (plugin configs,
    /// consumer groups): their built plugins, by id.
    fn plugin_sets(&mut self, list: &[model::Opaque], kind: &str) -> HashMap<Id, Vec<Entry>> {
        let mut by_id = HashMap::new();
        let mut seen = HashSet::new();
        for (i, set) in list.iter().enumerate() {
            let Some((id, label)) = self.unique_id(&set.id, kind, i, &mut seen) else {
                continue;
            };
            let plugins = self.plugin_map(&label, set.rest.get("plugins"));
            let entries = self.entries(&label, plugins.as_ref());
            by_id.insert(id, entries);
        }
        by_id
    }

    fn routes(
        &mut self,
        res: &Resources,
        upstreams: &HashMap<Id, Arc<Upstream>>,
        services: &HashMap<Id, ServiceRef>,
        plugin_configs: &HashMap<Id, Vec<Entry>>,
    ) -> (Vec<Route>, Vec<RouteSpec>) {
        let mut seen = HashSet::new();
        let mut routes = Vec::new();
        let mut specs = Vec::new();
        for (i, r) in res.routes.iter().enumerate() {
            // APISIX's standalone examples leave route ids out: number them by position.
            let id = r.id.clone().unwrap_or_else(|| Id((i + 1).to_string()));
            let label = format!("route {id}");
            if !seen.insert(id.clone()) {
                self.err(
                    &label,
                    "id",
                    "duplicate id (routes without an id are numbered by position)",
                );
                continue;
            }
            if r.status > 1 {
                self.err(&label, "status", "must be 1 (enabled) or 0 (disabled)");
            }
            let own = self.entries(&label, r.plugins.as_ref());
            let shared = match &r.plugin_config_id {
                Some(pc) => match plugin_configs.get(pc) {
                    Some(entries) => &entries[..],
                    None => {
                        self.err(
                            &label,
                            "plugin_config_id",
                            format!("plugin config `{pc}` does not exist"),
                        );
                        &[]
                    }
                },
                None => &[],
            };
            let service = match &r.service_id {
                Some(sid) => match services.get(sid) {
                    Some(s) => Some(s),
                    None => {
                        self.err(
                            &label,
                            "service_id",
                            format!("service `{sid}` does not exist"),
                        );
                        continue;
                    }
                },
                None => None,
            };
            self.no_code(&label, r);
            let upstream = match (&r.upstream, &r.upstream_id) {
                (inline, Some(uid)) => {
                    self.validate_only(inline.as_ref(), &format!("routes/{id}"), &label);
                    self.reference(upstreams, uid, &label, "upstream_id", "upstream")
                }
                (Some(u), None) => self.upstream(u, format!("routes/{id}"), &label, "upstream"),
                (None, None) => match service.and_then(|s| s.upstream.clone()) {
                    Some(u) => Some(u),
                    None => {
                        self.err(&label, "upstream", "no upstream: set `upstream`, `upstream_id`, or a `service_id` whose service has one");
                        None
                    }
                },
            };
            let spec = self.route_spec(r, &label, service);
            let (Some(upstream), Some(spec), 1) = (upstream, spec.clone(), r.status) else {
                // Disabled or broken routes are still checked for their own errors.
                self.unrouted.extend(spec.map(|s| (label, s)));
                continue;
            };
            let own_timeouts = self.timeout_override(&label, "timeout", r.timeout.as_ref());
            let timeouts = own_timeouts.over(upstream.timeouts);
            let service_plugins = service.map_or(&[][..], |s| &s.plugins[..]);
            routes.push(Route {
                own_timeouts,
                chain: Chain::merge([service_plugins, shared, &own[..]]),
                reads_body: false,
                id: id.0.into(),
                service_id: r.service_id.as_ref().map(|s| s.0.as_str().into()),
                name: r.name.as_deref().map(Arc::from),
                service_name: service.and_then(|s| s.name.clone()),
                websocket: r
                    .enable_websocket
                    .or(service.map(|s| s.websocket))
                    .unwrap_or(false),
                upstream,
                timeouts,
            });
            specs.push(spec);
        }
        (routes, specs)
    }

    fn route_spec(
        &mut self,
        r: &model::Route,
        label: &str,
        service: Option<&ServiceRef>,
    ) -> Option<RouteSpec> {
        let uris = self.one_or_many(label, "uri", &r.uri, "uris", &r.uris)?;
        let remote = self.one_or_many(
            label,
            "remote_addr",
            &r.remote_addr,
            "remote_addrs",
            &r.remote_addrs,
        )?;
        let mut hosts = self.one_or_many(label, "host", &r.host, "hosts", &r.hosts)?;
        let host_field = if r.host.is_some() { "host" } else { "hosts" };
        if hosts.is_empty() {
            hosts = service.map(|s| s.hosts.clone()).unwrap_or_default();
        }
        Some(RouteSpec {
            uris,
            hosts,
            methods: r.methods.clone().unwrap_or_default(),
            remote_addrs: remote,
            vars: r.vars.clone(),
            priority: r.priority,
            fields: [
                if r.uri.is_some() { "uri" } else { "uris" },
                host_field,
                if r.remote_addr.is_some() {
                    "remote_addr"
                } else {
                    "remote_addrs"
                },
            ],
        })
    }

    fn one_or_many(
        &mut self,
        label: &str,
        one_name: &str,
        one: &Option<String>,
        many_name: &str,
        many: &Option<Vec<String>>,
    ) -> Option<Vec<String>> {
        match (one, many) {
            (Some(_), Some(_)) => {
                self.err(
                    label,
                    many_name,
                    format!("set `{one_name}` or `{many_name}`, not both"),
                );
                None
            }
            (Some(v), None) => Some(vec![v.clone()]),
            (None, Some(v)) => Some(v.clone()),
            (None, None) => Some(Vec::new()),
        }
    }

    fn reference(
        &mut self,
        map: &HashMap<Id, Arc<Upstream>>,
        id: &Id,
        label: &str,
        field: &str,
        kind: &str,
    ) -> Option<Arc<Upstream>> {
        let found = map.get(id).cloned();
        if found.is_none() {
            self.err(label, field, format!("{kind} `{id}` does not exist"));
        }
        found
    }

    /// The id of a resource others refer to, and its label (`upstream u1`):
    /// refused when missing or already used, whether or not the first one
    /// with that id compiled.
    fn unique_id(
        &mut self,
        id: &Option<Id>,
        kind: &str,
        index: usize,
        seen: &mut HashSet<Id>,
    ) -> Option<(Id, String)> {
        let Some(id) = id.clone() else {
            self.err(
                &format!("{kind} #{}", index + 1),
                "id",
                "missing: this resource is referred to by id",
            );
            return None;
        };
        let label = format!("{kind} {id}");
        if !seen.insert(id.clone()) {
            self.err(&label, "id", "duplicate id");
            return None;
        }
        Some((id, label))
    }

    fn check_unrouted(&mut self) {
        let (labels, specs): (Vec<String>, Vec<RouteSpec>) =
            std::mem::take(&mut self.unrouted).into_iter().unzip();
        if let Err(errors) = Router::build(&specs) {
            for (i, e) in errors {
                self.err(&labels[i], e.path, e.message);
            }
        }
    }

    /// Checks an inline upstream that is overridden by `upstream_id` (as in
    /// APISIX, the id wins), without keeping it.
    fn validate_only(&mut self, inline: Option<&model::Upstream>, key: &str, label: &str) {
        if let Some(u) = inline {
            self.upstream(u, key.to_owned(), label, "upstream");
            self.upstreams.remove(key);
        }
    }

    /// `filter_func` and `script` are Lua in APISIX: refused rather than
    /// served without the filter they describe.
    fn no_code(&mut self, label: &str, r: &model::Route) {
        if r.filter_func.is_some() {
            self.err(
                label,
                "filter_func",
                "Lua functions are not supported; use `vars` expressions",
            );
        }
        if r.script.is_some() {
            self.err(label, "script", "Lua scripts are not supported");
        }
    }

    /// `plugins` of a resource kept as JSON: it must be a map.
    fn plugin_map(&mut self, label: &str, value: Option<&serde_json::Value>) -> Option<Plugins> {
        match value {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Object(map)) => Some(map.clone().into_iter().collect()),
            Some(_) => {
                self.err(
                    label,
                    "plugins",
                    "must be a map of plugin name to configuration",
                );
                None
            }
        }
    }

    /// Checks and builds a resource's plugins; errors are reported at
    /// `plugins.{name}.{field}`.
    fn entries(&mut self, label: &str, plugins: Option<&Plugins>) -> Vec<Entry> {
        let mut out = Vec::new();
        self.env.set_owner(label);
        for (name, config) in plugins.into_iter().flatten() {
            self.plugin_upstreams(label, name, config);
            match self.registry.entry(name, config, &self.env) {
                Ok(e) => out.push(e),
                Err(errors) => self.plugin_errors(label, name, errors),
            }
        }
        out
    }

    /// Compiles the upstreams written inline in a plugin's config, where
    /// the plugin declares them (`Factory::upstreams`, as traffic-split's
    /// `weighted_upstreams[].upstream`), for the plugin to find with
    /// `Env::upstream`.
    fn plugin_upstreams(&mut self, label: &str, name: &str, config: &serde_json::Value) {
        let registry = self.registry;
        let Some(factory) = registry.get(name) else {
            return;
        };
        for pattern in factory.upstreams {
            let segments: Vec<&str> = pattern.split('/').skip(1).collect();
            self.inline_upstreams(label, name, config, &segments, String::new());
        }
    }

    fn inline_upstreams(
        &mut self,
        label: &str,
        name: &str,
        value: &serde_json::Value,
        segments: &[&str],
        pointer: String,
    ) {
        let Some((first, rest)) = segments.split_first() else {
            if value.is_object() {
                self.plugin_upstream(label, name, value, &pointer);
            }
            return;
        };
        match (*first, value) {
            ("*", serde_json::Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    self.inline_upstreams(label, name, item, rest, format!("{pointer}/{i}"));
                }
            }
            (key, serde_json::Value::Object(map)) => {
                if let Some(item) = map.get(key) {
                    self.inline_upstreams(label, name, item, rest, format!("{pointer}/{key}"));
                }
            }
            _ => {}
        }
    }

    fn plugin_upstream(
        &mut self,
        label: &str,
        name: &str,
        value: &serde_json::Value,
        pointer: &str,
    ) {
        let path = format!(
            "plugins.{name}.{}",
            turnpike_plugin::pointer_to_path(pointer)
        );
        match serde_path_to_error::deserialize::<_, model::Upstream>(value) {
            Ok(u) => {
                let key = self.env.inline_key(name, pointer);
                if let Some(up) = self.upstream(&u, key.clone(), label, &path) {
                    self.env.add_upstream(key, up);
                }
            }
            Err(e) => {
                let inner = e.path().to_string();
                self.err(label, format!("{path}.{inner}"), e.into_inner().to_string());
            }
        }
    }

    fn plugin_errors(&mut self, label: &str, name: &str, errors: Vec<turnpike_plugin::FieldError>) {
        for e in errors {
            let path = if e.path.is_empty() {
                format!("plugins.{name}")
            } else {
                format!("plugins.{name}.{}", e.path)
            };
            self.err(label, path, e.message);
        }
    }

    /// Marks the routes whose requests' bodies are read before the plugins
    /// run. A consumer's plugins join right after authentication, so they
    /// count only on routes that authenticate.
    fn body_readers(
        &self,
        routes: &mut [Route],
        global: &Chain,
        consumers: &HashMap<Arc<str>, Arc<Consumer>>,
    ) {
        let consumers_read = consumers.values().any(|c| c.chain.reads_body());
        let authenticates = |chain: &Chain| {
            chain
                .entries()
                .iter()
                .any(|e| self.registry.is_credential(e.name))
        };
        let global_reads = global.reads_body();
        let global_authenticates = authenticates(global);
        for r in routes {
            r.reads_body = global_reads
                || r.chain.reads_body()
                || (consumers_read && (global_authenticates || authenticates(&r.chain)))
                // A body that may be sent again is read whole first.
                || r.upstream.retry_non_idempotent;
        }
    }

    /// Every global rule's plugins, in one chain that runs before each route's.
    fn global_rules(&mut self, res: &Resources) -> Chain {
        let mut all = Vec::new();
        let mut seen = HashSet::new();
        for (i, rule) in res.global_rules.iter().enumerate() {
            let Some((_, label)) = self.unique_id(&rule.id, "global rule", i, &mut seen) else {
                continue;
            };
            let plugins = self.plugin_map(&label, rule.rest.get("plugins"));
            all.extend(self.entries(&label, plugins.as_ref()));
        }
        Chain::new(all)
    }

    fn opaque(&mut self, res: &Resources) {
        let unused = [
            ("ssls", res.ssls.len()),
            ("plugin_metadata", res.plugin_metadata.len()),
        ];
        for (kind, n) in unused.into_iter().filter(|(_, n)| *n > 0) {
            self.warnings
                .push(format!("{n} {kind} read but not used yet by this build"));
        }
    }

    /// Compiles an upstream, or reuses the previous snapshot's when its
    /// config is unchanged (keeping balancer state).
    fn upstream(
        &mut self,
        u: &model::Upstream,
        key: String,
        label: &str,
        base: &str,
    ) -> Option<Arc<Upstream>> {
        let key: Arc<str> = key.into();
        if let Some(prev) = self.previous.and_then(|p| p.upstreams.get(&key)) {
            if prev.source == *u {
                self.upstreams.insert(key, prev.clone());
                return Some(prev.clone());
            }
        }
        let errors_before = self.errors.len();
        let at = |field: &str| {
            if base.is_empty() {
                field.to_owned()
            } else {
                format!("{base}.{field}")
            }
        };
        let kind = Kind::parse(&u.kind).or_else(|| {
            self.err(
                label,
                at("type"),
                "must be one of roundrobin, chash, least_conn, ewma",
            );
            None
        });
        let scheme = match u.scheme.as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            "grpc" => Scheme::Grpc,
            "grpcs" => Scheme::Grpcs,
            _ => {
                self.err(
                    label,
                    at("scheme"),
                    "must be one of http, https, grpc, grpcs",
                );
                Scheme::Http
            }
        };
        let nodes = self.nodes(u, scheme, label, &at("nodes"));
        let pass_host = match (u.pass_host.as_str(), &u.upstream_host) {
            ("pass", _) => PassHost::Pass,
            ("node", _) => PassHost::Node,
            ("rewrite", Some(h)) if valid_authority(h) => PassHost::Rewrite(h.as_str().into()),
            ("rewrite", Some(h)) if !h.is_empty() => {
                self.err(
                    label,
                    at("upstream_host"),
                    "must be a host name, with an optional port",
                );
                PassHost::Pass
            }
            ("rewrite", _) => {
                self.err(
                    label,
                    at("upstream_host"),
                    "required when pass_host is `rewrite`",
                );
                PassHost::Pass
            }
            _ => {
                self.err(label, at("pass_host"), "must be one of pass, node, rewrite");
                PassHost::Pass
            }
        };
        let hash_on = if kind == Some(Kind::Chash) {
            self.hash_on(u, label, &at)
        } else {
            None
        };
        match (u.discovery_type.as_deref(), &u.service_name) {
            (None, None) | (Some("dns" | "registry"), Some(_)) => {}
            (Some(kind @ ("dns" | "registry")), None) => self.err(
                label,
                at("service_name"),
                format!("required with `discovery_type: {kind}`"),
            ),
            (None, Some(_)) => self.err(
                label,
                at("discovery_type"),
                "required with `service_name` (`dns` or `registry`)",
            ),
            (Some(_), _) => self.err(
                label,
                at("discovery_type"),
                "must be `dns` or `registry` (other discovery types are not available in this build)",
            ),
        }
        let checks = self.checks(u, label, &at("checks"));
        let retry_timeout = match u.retry_timeout.map(|t| (t, seconds(t))) {
            Some((_, None)) => {
                self.err(label, at("retry_timeout"), "must be 0 to 31536000 seconds");
                None
            }
            Some((_, Some(d))) if !d.is_zero() => Some(d),
            _ => None,
        };
        let timeouts = self
            .timeout_override(label, &at("timeout"), u.timeout.as_ref())
            .over(Timeouts::default());
        let keepalive = self.keepalive(
            label,
            &at("keepalive_pool"),
            u.keepalive_pool.unwrap_or_default(),
        );
        let tls_verify = match &u.tls {
            Some(tls)
                if tls.client_cert.is_some()
                    || tls.client_key.is_some()
                    || tls.client_cert_id.is_some() =>
            {
                self.err(
                    label,
                    at("tls.client_cert"),
                    "client certificates to upstreams are not available in this build",
                );
                false
            }
            Some(tls) => tls.verify,
            None => false,
        };
        if self.errors.len() > errors_before {
            return None;
        }
        let mut nodes = nodes;
        let health = checks.map(|c| Arc::new(self.health(&key, c, &nodes)));
        let up = Arc::new(Upstream {
            key: key.clone(),
            groups: Upstream::groups(kind?, &mut nodes),
            nodes: nodes.into(),
            hash_on,
            retries: u.retries,
            retry_on_statuses: u.retry_on_statuses.clone().unwrap_or_default().into(),
            retry_non_idempotent: u.retry_non_idempotent.unwrap_or(false),
            retry_timeout,
            timeouts,
            pass_host,
            scheme,
            tls_verify,
            keepalive,
            health,
            source: u.clone(),
        });
        self.upstreams.insert(key, up.clone());
        Some(up)
    }

    /// The health state of a new or changed upstream: nodes it had before
    /// (by address) keep their state when the checks are the same, so a
    /// changed node list (a DNS answer, an edit) does not send traffic to
    /// nodes known to be down.
    fn health(&self, key: &str, checks: Checks, nodes: &[Node]) -> Health {
        let health = Health::new(checks, nodes.len());
        let previous = self.previous.and_then(|p| p.upstreams.get(key));
        if let Some((prev, old)) = previous.and_then(|p| Some((p, p.health.as_ref()?))) {
            if old.checks == health.checks {
                for (i, n) in nodes.iter().enumerate() {
                    if let Some(j) = prev.nodes.iter().position(|o| o.addr == n.addr) {
                        health.inherit(i, old, j);
                    }
                }
            }
        }
        health
    }

    /// Reads `checks` (APISIX's fields), refusing what this build cannot
    /// probe.
    fn checks(&mut self, u: &model::Upstream, label: &str, at: &str) -> Option<Checks> {
        let value = u.checks.as_ref()?;
        let checks: Checks = match serde_path_to_error::deserialize(value) {
            Ok(c) => c,
            Err(e) => {
                let path = e.path().to_string();
                self.err(label, format!("{at}.{path}"), e.into_inner().to_string());
                return None;
            }
        };
        if let Some(a) = &checks.active {
            if !matches!(a.kind.as_str(), "http" | "https" | "tcp") {
                self.err(
                    label,
                    format!("{at}.active.type"),
                    "must be `http`, `https` or `tcp`",
                );
            }
            if !(a.timeout > 0.0 && a.timeout <= 300.0) {
                self.err(
                    label,
                    format!("{at}.active.timeout"),
                    "must be more than 0 and at most 300 seconds",
                );
            }
            if a.healthy.interval == 0 && a.unhealthy.interval == 0 {
                self.err(
                    label,
                    format!("{at}.active.healthy.interval"),
                    "one of the intervals must be more than 0",
                );
            }
        }
        if checks.passive.as_ref().is_some_and(|p| p.kind != "http") {
            self.err(label, format!("{at}.passive.type"), "must be `http`");
        }
        (checks.active.is_some() || checks.passive.is_some()).then_some(checks)
    }

    fn nodes(&mut self, u: &model::Upstream, scheme: Scheme, label: &str, at: &str) -> Vec<Node> {
        let mut out = Vec::new();
        match &u.nodes {
            None => {}
            Some(model::Nodes::Map(map)) => {
                for (addr, &weight) in map {
                    match split_host_port(addr) {
                        Some((host, port)) => out.push(Node::new(
                            host,
                            port.unwrap_or(scheme.default_port()),
                            weight,
                            0,
                            scheme,
                        )),
                        None => self.err(label, format!("{at}.{addr}"), "expected host:port"),
                    }
                }
            }
            Some(model::Nodes::List(list)) => {
                for (i, n) in list.iter().enumerate() {
                    let host = n.host.trim_start_matches('[').trim_end_matches(']');
                    if !valid_host(host) {
                        self.err(
                            label,
                            format!("{at}[{i}].host"),
                            "expected an IP address or a host name",
                        );
                        continue;
                    }
                    let port = n.port.unwrap_or(scheme.default_port());
                    if port == 0 {
                        self.err(label, format!("{at}[{i}].port"), "must be 1 to 65535");
                        continue;
                    }
                    out.push(Node::new(host, port, n.weight, n.priority, scheme));
                }
            }
        }
        out
    }

    fn hash_on(
        &mut self,
        u: &model::Upstream,
        label: &str,
        at: &dyn Fn(&str) -> String,
    ) -> Option<HashOn> {
        let key = u.key.as_deref().filter(|k| !k.is_empty());
        let need_key = |c: &mut Self| {
            c.err(
                label,
                at("key"),
                "required for type chash (what to hash on)",
            );
            None
        };
        match (u.hash_on.as_str(), key) {
            ("consumer", _) => Some(HashOn::Consumer),
            ("vars", Some(k)) => match Var::parse(k) {
                Ok(v) => Some(HashOn::Vars(v)),
                Err(e) => {
                    self.err(label, at("key"), e);
                    None
                }
            },
            ("header", Some(k)) => Some(HashOn::Header(k.to_ascii_lowercase().into())),
            ("cookie", Some(k)) => Some(HashOn::Cookie(k.into())),
            ("vars_combinations", Some(k)) => match combination(k) {
                Ok(parts) => Some(HashOn::Combination(parts.into())),
                Err(e) => {
                    self.err(label, at("key"), e);
                    None
                }
            },
            ("vars" | "header" | "cookie" | "vars_combinations", None) => need_key(self),
            _ => {
                self.err(
                    label,
                    at("hash_on"),
                    "must be one of vars, header, cookie, consumer, vars_combinations",
                );
                None
            }
        }
    }

    /// The timeouts a route or upstream sets itself, each checked; the
    /// others are left to what it sits on.
    fn timeout_override(
        &mut self,
        label: &str,
        at: &str,
        t: Option<&model::Timeout>,
    ) -> TimeoutOverride {
        let Some(t) = t else {
            return TimeoutOverride::default();
        };
        let mut one = |name: &str, v: Option<f64>| {
            let s = v?;
            let d = seconds(s).filter(|d| !d.is_zero());
            if d.is_none() {
                self.err(
                    label,
                    format!("{at}.{name}"),
                    "must be more than 0 and at most 31536000 seconds",
                );
            }
            d
        };
        TimeoutOverride {
            connect: one("connect", t.connect),
            send: one("send", t.send),
            read: one("read", t.read),
        }
    }

    fn keepalive(&mut self, label: &str, at: &str, k: model::KeepalivePool) -> Keepalive {
        if k.size == 0 {
            self.err(label, format!("{at}.size"), "must be at least 1");
        }
        if k.requests == 0 {
            self.err(label, format!("{at}.requests"), "must be at least 1");
        }
        let idle_timeout = seconds(k.idle_timeout).unwrap_or_else(|| {
            self.err(
                label,
                format!("{at}.idle_timeout"),
                "must be 0 to 31536000 seconds",
            );
            Duration::ZERO
        });
        Keepalive {
            size: k.size as usize,
            idle_timeout,
            requests: k.requests,
        }
    }
}

/// `$host$uri` → [Var(host), Var(uri)]; text between variables is kept.
fn combination(template: &str) -> Result<Vec<KeyPart>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        if at > 0 {
            parts.push(KeyPart::Literal(rest[..at].into()));
        }
        let name_len = rest[at + 1..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len() - at - 1);
        let name = &rest[at + 1..at + 1 + name_len];
        parts.push(KeyPart::Var(Var::parse(name)?));
        rest = &rest[at + 1 + name_len..];
    }
    if !rest.is_empty() {
        parts.push(KeyPart::Literal(rest.into()));
    }
    if !parts.iter().any(|p| matches!(p, KeyPart::Var(_))) {
        return Err("expected at least one $variable, as in $host$uri".into());
    }
    Ok(parts)
}

/// `127.0.0.1:80`, `[::1]:80`, `example.com` (no port).
fn split_host_port(addr: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else if addr.matches(':').count() > 1 {
        (addr, None)
    } else {
        match addr.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (addr, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0)?),
        None => None,
    };
    valid_host(host).then_some((host, port))
}

/// `host`, `host:port` or `[v6]:port`, as a `Host` header carries it.
fn valid_authority(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
}

#[cfg(test)]
mod tests;
