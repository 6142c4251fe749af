//! Route matching for Turnpike, with APISIX's radixtree semantics, and the
//! expression engine for `vars`. No I/O: the proxy hands in a [`Request`] and
//! gets back the index of the matched route.
//!
//! ```
//! use turnpike_router::{Router, RouteSpec, Request};
//! use std::collections::HashMap;
//!
//! let specs = vec![
//!     RouteSpec { uris: vec!["/users/:id".into()], ..RouteSpec::default() },
//!     RouteSpec { uris: vec!["/*".into()], hosts: vec!["*.example.com".into()], ..RouteSpec::default() },
//! ];
//! let router = Router::build(&specs).unwrap();
//! let vars: HashMap<&str, &str> = HashMap::new();
//! let req = Request { path: "/users/7", host: "localhost", method: "GET", remote: None, vars: &vars };
//! assert_eq!(router.find(&req), Some(0));
//! ```
//!
//! Order of matching, as APISIX's default `radixtree_host_uri` router does it:
//! routes whose host matches exactly, then routes with a wildcard host (the
//! longest suffix first), then routes with no host. Within each group an exact
//! path wins over any prefix, a longer prefix over a shorter one, and routes
//! on the same path are tried by `priority`, highest first, ties in config
//! order. The first route whose methods, `remote_addrs` and `vars` also hold
//! is the match.

mod expr;
mod path;
mod trie;
mod var;

use std::net::IpAddr;

use ipnet::IpNet;
use rustc_hash::FxHashMap;
use serde_json::Value;

pub use expr::{parse_cidr, Expr};
pub use path::{encode as encode_path, normalize as normalize_path, PathError};
pub use var::{cookie, decode_component, query_arg, Var, VarSource};

use trie::Trie;

/// A problem in a route's matching rules, with the field path it sits at
/// (relative to the route, e.g. `uris[1]` or `vars[0][1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError {
    pub path: String,
    pub message: String,
}

impl BuildError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        BuildError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// One route's matching rules, as written in the config.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub uris: Vec<String>,
    pub hosts: Vec<String>,
    pub methods: Vec<String>,
    pub remote_addrs: Vec<String>,
    pub vars: Option<Value>,
    pub priority: i64,
    /// Field names for error paths: `uri` or `uris`, `host` or `hosts`,
    /// `remote_addr` or `remote_addrs`. A singular name means one value.
    pub fields: [&'static str; 3],
}

impl Default for RouteSpec {
    fn default() -> Self {
        RouteSpec {
            uris: Vec::new(),
            hosts: Vec::new(),
            methods: Vec::new(),
            remote_addrs: Vec::new(),
            vars: None,
            priority: 0,
            fields: ["uris", "hosts", "remote_addrs"],
        }
    }
}

/// What the router needs to know about a request.
pub struct Request<'a, V: ?Sized> {
    /// The normalised path (see [`normalize_path`]).
    pub path: &'a str,
    /// The host, without port; any case.
    pub host: &'a str,
    pub method: &'a str,
    pub remote: Option<IpAddr>,
    /// Resolves `vars` conditions.
    pub vars: &'a V,
}

/// A compiled router: build once per snapshot, share between workers.
#[derive(Debug, Default)]
pub struct Router {
    exact_hosts: FxHashMap<Box<str>, PathIndex>,
    /// Keyed by the suffix after `*`, e.g. `.example.com`.
    wildcard_hosts: FxHashMap<Box<str>, PathIndex>,
    any_host: PathIndex,
    conds: Vec<Conds>,
}

#[derive(Debug, Default)]
struct PathIndex {
    exact: FxHashMap<Box<str>, Vec<Entry>>,
    prefix: Trie<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    route: u32,
    priority: i64,
    /// What must follow the static prefix; `None` for a plain prefix (`/a/*`)
    /// or an exact path.
    tail: Option<Box<[Part]>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// `:name`: one non-empty segment.
    Param,
    Literal(Box<str>),
    /// A trailing `*` or `*name`: anything, possibly nothing.
    Rest,
}

#[derive(Debug)]
struct Conds {
    methods: u16,
    remote: Box<[IpNet]>,
    vars: Option<Expr>,
}

impl Router {
    /// Compiles routes; returns every problem found, each with the index of
    /// its route.
    pub fn build(specs: &[RouteSpec]) -> Result<Router, Vec<(usize, BuildError)>> {
        let mut router = Router::default();
        let mut errors = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            if let Err(e) = router.add(i, spec) {
                errors.extend(e.into_iter().map(|e| (i, e)));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        router.sort();
        Ok(router)
    }

    fn add(&mut self, index: usize, spec: &RouteSpec) -> Result<(), Vec<BuildError>> {
        let mut errors = Vec::new();
        let [uri_field, host_field, addr_field] = spec.fields;
        let mut patterns = Vec::new();
        if spec.uris.is_empty() {
            errors.push(BuildError::new(uri_field, "a route needs `uri` or `uris`"));
        }
        for (i, uri) in spec.uris.iter().enumerate() {
            match Pattern::parse(uri) {
                Ok(p) => patterns.push(p),
                Err(e) => errors.push(BuildError::new(item_path(uri_field, i), e)),
            }
        }
        let mut hosts = Vec::new();
        for (i, host) in spec.hosts.iter().enumerate() {
            match HostPattern::parse(host) {
                Ok(h) if hosts.contains(&h) => {}
                Ok(h) => hosts.push(h),
                Err(e) => errors.push(BuildError::new(item_path(host_field, i), e)),
            }
        }
        let mut methods = 0u16;
        for (i, m) in spec.methods.iter().enumerate() {
            match method_bit(m) {
                Some(bit) => methods |= bit,
                None => errors.push(BuildError::new(
                    format!("methods[{i}]"),
                    format!(
                        "unknown method `{m}` (expected one of {})",
                        METHODS.join(", ")
                    ),
                )),
            }
        }
        let mut remote = Vec::new();
        for (i, addr) in spec.remote_addrs.iter().enumerate() {
            match parse_cidr(addr) {
                Some(net) => remote.push(net),
                None => errors.push(BuildError::new(
                    item_path(addr_field, i),
                    format!("`{addr}` is not an IP address or CIDR"),
                )),
            }
        }
        let vars = match &spec.vars {
            Some(v) => Expr::parse(v, "vars").map_err(|e| errors.push(e)).ok(),
            None => None,
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        self.conds.push(Conds {
            methods,
            remote: remote.into(),
            vars,
        });
        let route = index as u32;
        if hosts.is_empty() {
            self.any_host.insert_all(&patterns, route, spec.priority);
        }
        for host in hosts {
            let group = match host {
                HostPattern::Exact(h) => self.exact_hosts.entry(h).or_default(),
                HostPattern::Suffix(s) => self.wildcard_hosts.entry(s).or_default(),
            };
            group.insert_all(&patterns, route, spec.priority);
        }
        Ok(())
    }

    fn sort(&mut self) {
        let all = self
            .exact_hosts
            .values_mut()
            .chain(self.wildcard_hosts.values_mut());
        for index in all.chain(std::iter::once(&mut self.any_host)) {
            for list in index.exact.values_mut() {
                sort_entries(list);
            }
            for list in index.prefix.entries_mut() {
                sort_entries(list);
            }
        }
    }

    /// The index of the first matching route, if any.
    pub fn find<V: VarSource + ?Sized>(&self, req: &Request<'_, V>) -> Option<usize> {
        let host = host_key(req.host);
        let method = request_method_bit(req.method);
        let probe = |index: &PathIndex| index.find(req, method, &self.conds);
        if !self.exact_hosts.is_empty() {
            if let Some(found) = self.exact_hosts.get(host.as_ref()).and_then(probe) {
                return Some(found);
            }
        }
        if !self.wildcard_hosts.is_empty() {
            let suffixes = host.match_indices('.').map(|(i, _)| &host[i..]);
            for suffix in suffixes {
                if let Some(found) = self.wildcard_hosts.get(suffix).and_then(probe) {
                    return Some(found);
                }
            }
        }
        probe(&self.any_host)
    }

    /// How many routes the router holds.
    pub fn len(&self) -> usize {
        self.conds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conds.is_empty()
    }
}

fn item_path(field: &str, i: usize) -> String {
    if field.ends_with('s') {
        format!("{field}[{i}]")
    } else {
        field.to_owned()
    }
}

fn sort_entries(list: &mut [Entry]) {
    // Stable: equal priorities keep config order.
    list.sort_by_key(|e| std::cmp::Reverse(e.priority));
}

impl PathIndex {
    fn insert_all(&mut self, patterns: &[Pattern], route: u32, priority: i64) {
        for p in patterns {
            self.insert(p, route, priority);
        }
    }

    fn insert(&mut self, pattern: &Pattern, route: u32, priority: i64) {
        let entry = Entry {
            route,
            priority,
            tail: pattern.tail.clone(),
        };
        match pattern.kind {
            Kind::Exact => self
                .exact
                .entry(pattern.prefix.clone())
                .or_default()
                .push(entry),
            Kind::Prefix => self.prefix.entry(pattern.prefix.as_bytes()).push(entry),
        }
    }

    fn find<V: VarSource + ?Sized>(
        &self,
        req: &Request<'_, V>,
        method: u16,
        conds: &[Conds],
    ) -> Option<usize> {
        if !self.exact.is_empty() {
            if let Some(list) = self.exact.get(req.path) {
                if let Some(found) = first_match(list, "", req, method, conds) {
                    return Some(found);
                }
            }
        }
        self.prefix
            .find_deepest(req.path.as_bytes(), |list, consumed| {
                first_match(list, &req.path[consumed..], req, method, conds)
            })
    }
}

fn first_match<V: VarSource + ?Sized>(
    list: &[Entry],
    rest: &str,
    req: &Request<'_, V>,
    method: u16,
    conds: &[Conds],
) -> Option<usize> {
    list.iter()
        .find(|e| {
            e.tail
                .as_deref()
                .is_none_or(|tail| tail_matches(tail, rest))
                && conds[e.route as usize].hold(req, method)
        })
        .map(|e| e.route as usize)
}

impl Conds {
    fn hold<V: VarSource + ?Sized>(&self, req: &Request<'_, V>, method: u16) -> bool {
        (self.methods == 0 || self.methods & method != 0)
            && (self.remote.is_empty()
                || req
                    .remote
                    .is_some_and(|ip| self.remote.iter().any(|n| n.contains(&ip))))
            && self.vars.as_ref().is_none_or(|e| e.eval(req.vars))
    }
}

fn tail_matches(parts: &[Part], mut rest: &str) -> bool {
    for part in parts {
        match part {
            Part::Literal(lit) => match rest.strip_prefix(lit.as_ref()) {
                Some(r) => rest = r,
                None => return false,
            },
            Part::Param => {
                let end = rest.find('/').unwrap_or(rest.len());
                if end == 0 {
                    return false;
                }
                rest = &rest[end..];
            }
            Part::Rest => return true,
        }
    }
    rest.is_empty()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Exact,
    Prefix,
}

/// A parsed `uri`: the static prefix and what must follow it.
#[derive(Debug)]
struct Pattern {
    kind: Kind,
    prefix: Box<str>,
    tail: Option<Box<[Part]>>,
}

impl Pattern {
    fn parse(uri: &str) -> Result<Pattern, String> {
        if !uri.starts_with('/') {
            return Err(format!("`{uri}` must start with /"));
        }
        if let Some(star) = uri.find('*') {
            let name = &uri[star + 1..];
            let named_ok = name.is_empty() || uri[..star].ends_with('/');
            if !named_ok || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("`{uri}`: `*` may appear only at the end (optionally named, as in /files/*path)"));
            }
        }
        let param_at = uri.match_indices("/:").map(|(i, _)| i + 1).next();
        let star_at = uri.find('*');
        let Some(param_at) = param_at else {
            return Ok(match star_at {
                None => Pattern {
                    kind: Kind::Exact,
                    prefix: uri.into(),
                    tail: None,
                },
                Some(star) => Pattern {
                    kind: Kind::Prefix,
                    prefix: uri[..star].into(),
                    tail: None,
                },
            });
        };
        let body_end = star_at.unwrap_or(uri.len());
        let mut parts = Vec::new();
        let mut literal = String::new();
        for (i, seg) in uri[param_at..body_end].split('/').enumerate() {
            if i > 0 {
                literal.push('/');
            }
            if let Some(name) = seg.strip_prefix(':') {
                if name.is_empty() {
                    return Err(format!(
                        "`{uri}`: a parameter needs a name, as in /users/:id"
                    ));
                }
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal).into()));
                }
                parts.push(Part::Param);
            } else {
                literal.push_str(seg);
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal.into()));
        }
        if star_at.is_some() {
            parts.push(Part::Rest);
        }
        Ok(Pattern {
            kind: Kind::Prefix,
            prefix: uri[..param_at].into(),
            tail: Some(parts.into()),
        })
    }
}

#[derive(PartialEq)]
enum HostPattern {
    Exact(Box<str>),
    Suffix(Box<str>),
}

impl HostPattern {
    fn parse(host: &str) -> Result<HostPattern, String> {
        let lower = host.to_ascii_lowercase();
        // A port never matches: the request host is compared without one.
        let bare = if lower.starts_with('[') {
            lower.ends_with(']')
        } else {
            !lower.contains(':')
        };
        let valid = |s: &str| {
            bare && !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b))
        };
        if let Some(rest) = lower.strip_prefix('*') {
            if rest.starts_with('.') && valid(&rest[1..]) {
                return Ok(HostPattern::Suffix(rest.into()));
            }
        } else if valid(&lower) {
            return Ok(HostPattern::Exact(lower.into()));
        }
        Err(format!(
            "`{host}` is not a host name or a wildcard such as *.example.com (no port)"
        ))
    }
}

/// The request host as a lookup key: port removed, lower-cased (borrowed when
/// already lower-case).
fn host_key(host: &str) -> std::borrow::Cow<'_, str> {
    let bare = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    if bare.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(bare.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(bare)
    }
}

const METHODS: [&str; 10] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE",
];

fn method_bit(m: &str) -> Option<u16> {
    METHODS.iter().position(|x| *x == m).map(|i| 1 << i)
}

/// A request's method; one outside the list matches only routes without `methods`.
fn request_method_bit(m: &str) -> u16 {
    method_bit(m).unwrap_or(1 << 15)
}

#[cfg(test)]
mod tests;
