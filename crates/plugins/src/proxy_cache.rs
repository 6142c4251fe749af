//! `proxy-cache`: keeps upstream responses in memory and answers repeated
//! requests from there. `Apisix-Cache-Status` tells what happened: `HIT`,
//! `MISS`, `EXPIRED`, `BYPASS`, or `STALE` (an expired copy served because
//! the upstream failed, within `stale_if_error`).
//!
//! The store is bounded by `cache_max_bytes` per `cache_zone`, shared by
//! every route naming the zone and kept across reloads; when full, the
//! oldest entries go first. With `cache_control: true`, `Cache-Control`
//! from the upstream (`no-store`, `no-cache`, `private`, `max-age`,
//! `s-maxage`) and the client (`no-cache`, `no-store`, `max-age`) is
//! honoured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, AGE, CACHE_CONTROL, EXPIRES};
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{
    typed, Ctx, Env, Factory, FieldError, Flow, Head, Plugin, Reply, Template, MAX_BUFFERED_BODY,
};

use crate::response_store::{self, Store, Stored};

pub(crate) const NAME: &str = "proxy-cache";
pub(crate) const PRIORITY: i32 = 1085;

static CACHE_STATUS: HeaderName = HeaderName::from_static("apisix-cache-status");

fn schema() -> Value {
    let vars = json!({"type": "array", "minItems": 1, "items": {"type": "string"}});
    json!({
        "type": "object",
        "properties": {
            "cache_strategy": {"type": "string", "enum": ["disk", "memory"], "default": "memory"},
            "cache_zone": {"type": "string", "minLength": 1, "maxLength": 100, "default": "memory_cache"},
            "cache_key": {"type": "array", "minItems": 1, "items": {"type": "string"}, "default": ["$host", "$request_uri"]},
            "cache_bypass": vars,
            "cache_method": {
                "type": "array", "minItems": 1, "uniqueItems": true,
                "items": {"type": "string", "enum": ["GET", "POST", "HEAD"]},
                "default": ["GET", "HEAD"]
            },
            "cache_http_status": {
                "type": "array", "minItems": 1, "uniqueItems": true,
                "items": {"type": "integer", "minimum": 200, "maximum": 599},
                "default": [200, 301, 404]
            },
            "hide_cache_headers": {"type": "boolean", "default": false},
            "cache_control": {"type": "boolean", "default": false},
            "no_cache": vars,
            "cache_ttl": {"type": "integer", "minimum": 1, "default": 300},
            "stale_if_error": {"type": "integer", "minimum": 0, "default": 0},
            "cache_max_bytes": {"type": "integer", "minimum": 1048576, "default": 67108864},
            "cache_max_body_size": {"type": "integer", "minimum": 1, "maximum": MAX_BUFFERED_BODY, "default": 1048576}
        },
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    cache_zone: String,
    cache_key: Vec<String>,
    cache_bypass: Option<Vec<String>>,
    cache_method: Vec<String>,
    cache_http_status: Vec<u16>,
    hide_cache_headers: bool,
    cache_control: bool,
    no_cache: Option<Vec<String>>,
    cache_ttl: u64,
    stale_if_error: u64,
    cache_max_bytes: usize,
    cache_max_body_size: usize,
}

struct ProxyCache {
    key: Vec<Template>,
    bypass: Vec<Template>,
    no_cache: Vec<Template>,
    methods: Vec<Method>,
    statuses: Vec<u16>,
    hide_cache_headers: bool,
    cache_control: bool,
    ttl: Duration,
    stale_if_error: Duration,
    max_body: usize,
    store: Arc<Store>,
}

/// What this request found, kept for the response phases.
#[derive(Clone)]
struct Lookup {
    cache: usize,
    key: Arc<str>,
    status: &'static str,
    /// The expired copy, to serve if the upstream fails.
    stale: Option<Arc<Stored>>,
    /// Whether the response may be stored.
    store: bool,
}

/// Left by `header_filter` for `body_filter`: store this response.
#[derive(Clone)]
struct Keep {
    cache: usize,
    status: StatusCode,
    headers: HeaderMap,
    ttl: Duration,
}

fn templates(list: &[String], field: &str) -> Result<Vec<Template>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, t)| crate::template(t, &format!("{field}[{i}]")))
        .collect()
}

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    let methods = c
        .cache_method
        .iter()
        .map(|m| {
            Method::from_bytes(m.as_bytes())
                .map_err(|e| FieldError::new("cache_method", e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let zone = format!("{NAME}:zone:{}:{}", c.cache_zone, c.cache_max_bytes);
    Ok(Arc::new(ProxyCache {
        key: templates(&c.cache_key, "cache_key")?,
        bypass: templates(
            c.cache_bypass.as_deref().unwrap_or_default(),
            "cache_bypass",
        )?,
        no_cache: templates(c.no_cache.as_deref().unwrap_or_default(), "no_cache")?,
        methods,
        statuses: c.cache_http_status,
        hide_cache_headers: c.hide_cache_headers,
        cache_control: c.cache_control,
        ttl: Duration::from_secs(c.cache_ttl),
        stale_if_error: Duration::from_secs(c.stale_if_error),
        max_body: c.cache_max_body_size,
        store: env.state(&zone, || Store::new(c.cache_max_bytes)),
    }))
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

/// Whether any of `vars` renders to something other than empty or `0`
/// (nginx's rule for `proxy_cache_bypass` and `proxy_no_cache`).
fn any_set(ctx: &Ctx, vars: &[Template]) -> bool {
    vars.iter().any(|t| {
        let v = ctx.render(t);
        !v.is_empty() && v != "0"
    })
}

/// `max-age`-like directives and flags of a `Cache-Control` header.
struct Directives {
    no_store: bool,
    no_cache: bool,
    max_age: Option<u64>,
}

fn directives(headers: &HeaderMap) -> Directives {
    let mut d = Directives {
        no_store: false,
        no_cache: false,
        max_age: None,
    };
    for value in headers.get_all(CACHE_CONTROL) {
        for part in value.to_str().unwrap_or_default().split(',') {
            let part = part.trim().to_ascii_lowercase();
            let (name, arg) = part.split_once('=').unwrap_or((&part, ""));
            match name {
                "no-store" => d.no_store = true,
                "no-cache" | "private" => d.no_cache = true,
                "s-maxage" => d.max_age = arg.trim_matches('"').parse().ok(),
                "max-age" => d.max_age = d.max_age.or(arg.trim_matches('"').parse().ok()),
                _ => {}
            }
        }
    }
    d
}

impl ProxyCache {
    fn id(&self) -> usize {
        self as *const ProxyCache as usize
    }

    fn lookup(&self, ctx: &Ctx) -> Result<Reply, Lookup> {
        let key: String = self.key.iter().map(|t| ctx.render(t)).collect();
        let mut found = Lookup {
            cache: self.id(),
            key: key.into(),
            status: "MISS",
            stale: None,
            store: !any_set(ctx, &self.no_cache),
        };
        let client = directives(&ctx.req.headers);
        if any_set(ctx, &self.bypass)
            || (self.cache_control && (client.no_cache || client.no_store))
        {
            found.status = "BYPASS";
            found.store &= !(self.cache_control && client.no_store);
            return Err(found);
        }
        let Some(stored) = self.store.get(&found.key) else {
            return Err(found);
        };
        let now = Instant::now();
        let mut fresh_for = stored.ttl;
        if let Some(max) = client.max_age.filter(|_| self.cache_control) {
            fresh_for = fresh_for.min(Duration::from_secs(max));
        }
        if stored.age(now) < fresh_for {
            return Ok(self.hit(&stored, now));
        }
        found.status = "EXPIRED";
        if stored.age(now) < stored.ttl + self.stale_if_error {
            found.stale = Some(stored);
        }
        Err(found)
    }

    fn hit(&self, stored: &Stored, now: Instant) -> Reply {
        let mut reply = stored.reply(&CACHE_STATUS, "HIT");
        reply
            .headers
            .insert(AGE, HeaderValue::from(stored.age(now).as_secs()));
        if self.hide_cache_headers {
            reply.headers.remove(CACHE_CONTROL);
            reply.headers.remove(EXPIRES);
        }
        reply
    }

    /// How long this upstream response may be kept, if at all.
    fn keep_for(&self, ctx: &Ctx, head: &Head, lookup: &Lookup) -> Option<Duration> {
        let cacheable = lookup.store
            && ctx.req.method != Method::HEAD
            && ctx.upstream_status.is_some()
            && self.statuses.contains(&head.status.as_u16())
            && response_store::storable(head, self.max_body);
        if !cacheable {
            return None;
        }
        if !self.cache_control {
            return Some(self.ttl);
        }
        let d = directives(&head.headers);
        match (d.no_store || d.no_cache, d.max_age) {
            (true, _) | (false, Some(0)) => None,
            (false, Some(secs)) => Some(Duration::from_secs(secs)),
            (false, None) => Some(self.ttl),
        }
    }
}

impl Plugin for ProxyCache {
    fn access(&self, ctx: &mut Ctx) -> Flow {
        if !self.methods.contains(&ctx.req.method) {
            return Flow::Continue;
        }
        match self.lookup(ctx) {
            Ok(reply) => Flow::Respond(reply),
            Err(lookup) => {
                ctx.stash.insert(lookup);
                Flow::Continue
            }
        }
    }

    fn header_filter(&self, ctx: &mut Ctx, head: &mut Head) {
        let Some(lookup) = ctx
            .stash
            .get::<Lookup>()
            .filter(|l| l.cache == self.id())
            .cloned()
        else {
            return;
        };
        let failed = ctx.upstream_status.is_some_and(|s| s.is_server_error());
        if let Some(stale) = lookup.stale.as_ref().filter(|_| failed) {
            response_store::replace(head, stale);
            if self.hide_cache_headers {
                head.headers.remove(CACHE_CONTROL);
                head.headers.remove(EXPIRES);
            }
            head.headers
                .insert(CACHE_STATUS.clone(), HeaderValue::from_static("STALE"));
            ctx.status = Some(stale.status);
            return;
        }
        if let Some(ttl) = self.keep_for(ctx, head, &lookup) {
            ctx.stash.insert(Keep {
                cache: self.id(),
                status: head.status,
                headers: response_store::stored_headers(&head.headers),
                ttl,
            });
        }
        if self.hide_cache_headers {
            head.headers.remove(CACHE_CONTROL);
            head.headers.remove(EXPIRES);
        }
        head.headers.insert(
            CACHE_STATUS.clone(),
            HeaderValue::from_static(lookup.status),
        );
    }

    fn wants_response_body(&self, ctx: &Ctx, _head: &Head) -> bool {
        ctx.stash
            .get::<Keep>()
            .is_some_and(|k| k.cache == self.id())
    }

    fn body_filter(&self, ctx: &mut Ctx, body: &mut Bytes) {
        let (Some(keep), Some(lookup)) = (ctx.stash.get::<Keep>(), ctx.stash.get::<Lookup>())
        else {
            return;
        };
        if keep.cache != self.id() || body.len() > self.max_body {
            return;
        }
        let stored = Stored {
            status: keep.status,
            headers: keep.headers.clone(),
            body: body.clone(),
            stored: Instant::now(),
            ttl: keep.ttl,
        };
        self.store.put(lookup.key.clone(), stored);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{ctx, entry, request, run_now};
    use turnpike_plugin::Phase;

    /// Runs a request through the cache: its answer if it hit, else the
    /// head the client got from an upstream answering `status`/`body`.
    fn exchange(
        e: &turnpike_plugin::Entry,
        mut c: Ctx,
        status: u16,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (Head, Option<Reply>) {
        if let Some(reply) = run_now(Phase::Access, e, &mut c) {
            return (Head::default(), Some(reply));
        }
        c.upstream_addr = Some("10.0.0.2:80".into());
        c.upstream_status = Some(StatusCode::from_u16(status).unwrap());
        let mut head = Head {
            status: StatusCode::from_u16(status).unwrap(),
            ..Head::default()
        };
        head.headers
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        for (k, v) in headers {
            head.headers.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        e.plugin.header_filter(&mut c, &mut head);
        if head.body.is_none() && e.plugin.wants_response_body(&c, &head) {
            let mut bytes = Bytes::from(body.to_owned());
            e.plugin.body_filter(&mut c, &mut bytes);
        }
        (head, None)
    }

    fn status(head: &Head) -> &str {
        head.headers[&CACHE_STATUS].to_str().unwrap()
    }

    #[test]
    fn miss_then_hit_then_expired_and_stale_on_error() {
        let e = entry(
            NAME,
            json!({"cache_ttl": 1, "stale_if_error": 60, "cache_zone": "t1"}),
        );
        let (head, _) = exchange(&e, ctx("/a"), 200, &[("etag", "\"v1\"")], "one");
        assert_eq!(status(&head), "MISS");
        let (_, hit) = exchange(&e, ctx("/a"), 200, &[], "two");
        let hit = hit.expect("a hit");
        assert_eq!(hit.body, "one");
        assert_eq!(hit.headers[&CACHE_STATUS], "HIT");
        assert_eq!(hit.headers["etag"], "\"v1\"");
        let (head, _) = exchange(&e, ctx("/other"), 200, &[], "x");
        assert_eq!(status(&head), "MISS", "the key holds the URI");

        std::thread::sleep(Duration::from_millis(1100));
        let (head, _) = exchange(&e, ctx("/a"), 502, &[], "");
        assert_eq!(status(&head), "STALE", "expired, and the upstream failed");
        assert_eq!(head.body.as_deref(), Some(&b"one"[..]));
        assert!(head.whole);
        let (head, _) = exchange(&e, ctx("/a"), 200, &[], "three");
        assert_eq!(status(&head), "EXPIRED");
        let (_, hit) = exchange(&e, ctx("/a"), 200, &[], "four");
        assert_eq!(hit.unwrap().body, "three", "refreshed");
    }

    #[test]
    fn methods_statuses_bypass_and_no_cache() {
        let e = entry(
            NAME,
            json!({"cache_zone": "t2", "cache_bypass": ["$arg_fresh"], "no_cache": ["$http_x_private"]}),
        );
        let post = request(http::Request::post("/m"));
        let (head, _) = exchange(&e, post, 200, &[], "p");
        assert!(
            head.headers.get(&CACHE_STATUS).is_none(),
            "POST is not cached by default"
        );
        exchange(&e, ctx("/s"), 500, &[], "err");
        let (head, _) = exchange(&e, ctx("/s"), 200, &[], "ok");
        assert_eq!(status(&head), "MISS", "500 was not kept");
        let (head, _) = exchange(&e, ctx("/s?fresh=1"), 200, &[], "ok");
        assert_eq!(status(&head), "BYPASS");
        let private = request(http::Request::get("/p").header("x-private", "1"));
        exchange(&e, private, 200, &[], "mine");
        let (head, _) = exchange(&e, ctx("/p"), 200, &[], "ok");
        assert_eq!(status(&head), "MISS", "no_cache kept it out");
    }

    #[test]
    fn cache_control_is_honoured_when_asked() {
        let e = entry(
            NAME,
            json!({"cache_zone": "t3", "cache_control": true, "hide_cache_headers": true}),
        );
        let (head, _) = exchange(&e, ctx("/n"), 200, &[("cache-control", "no-store")], "n");
        assert!(head.headers.get(CACHE_CONTROL).is_none(), "hidden");
        let (head, _) = exchange(&e, ctx("/n"), 200, &[], "n");
        assert_eq!(status(&head), "MISS", "no-store was not kept");
        exchange(
            &e,
            ctx("/y"),
            200,
            &[("cache-control", "public, max-age=60")],
            "y",
        );
        let hit = exchange(&e, ctx("/y"), 200, &[], "")
            .1
            .expect("kept for max-age");
        assert!(
            hit.headers.get(CACHE_CONTROL).is_none(),
            "hidden on a HIT too"
        );
        let nocache = request(http::Request::get("/y").header("cache-control", "no-cache"));
        let (head, _) = exchange(&e, nocache, 200, &[], "y2");
        assert_eq!(
            status(&head),
            "BYPASS",
            "the client asked for a fresh answer"
        );
    }
}
