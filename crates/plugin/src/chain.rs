//! A route's plugins, merged and sorted once per snapshot, and the phase
//! runners the proxy calls.

use std::sync::Arc;

use bytes::Bytes;
use turnpike_router::Expr;

use crate::{Ctx, Flow, Head, Plugin, Reply};

/// One plugin configured on one resource, ready to run.
#[derive(Clone)]
pub struct Entry {
    pub name: &'static str,
    /// The plugin's priority, or `_meta.priority` when set.
    pub priority: i32,
    pub plugin: Arc<dyn Plugin>,
    /// `_meta.filter`: the plugin runs only for requests it matches.
    pub filter: Option<Arc<Expr>>,
    /// `_meta.disable`: kept through merging, so a route can switch off a
    /// plugin its service enables, then left out of the chain.
    pub disabled: bool,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.name, self.priority)
    }
}

impl Entry {
    fn applies(&self, ctx: &Ctx) -> bool {
        self.filter.as_ref().is_none_or(|f| f.eval(ctx))
    }
}

/// Plugins in the order they run: priority descending, ties by name.
#[derive(Clone, Default, Debug)]
pub struct Chain {
    entries: Arc<[Entry]>,
    /// Plugins switched off with `_meta.disable`: kept by name so a
    /// consumer's disable still wins over the route's config.
    disabled: Arc<[&'static str]>,
}

impl Chain {
    pub fn new(mut entries: Vec<Entry>) -> Chain {
        let disabled = entries
            .iter()
            .filter(|e| e.disabled)
            .map(|e| e.name)
            .collect();
        entries.retain(|e| !e.disabled);
        entries.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(b.name)));
        Chain {
            entries: entries.into(),
            disabled,
        }
    }

    /// Merges layers of plugins by name, later layers winning (service, then
    /// plugin config, then route), and sorts the result.
    pub fn merge<'a>(layers: impl IntoIterator<Item = &'a [Entry]>) -> Chain {
        let mut merged: Vec<Entry> = Vec::new();
        for layer in layers {
            for e in layer {
                match merged.iter_mut().find(|m| m.name == e.name) {
                    Some(m) => *m = e.clone(),
                    None => merged.push(e.clone()),
                }
            }
        }
        Chain::new(merged)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Whether some plugin here reads request bodies.
    pub fn reads_body(&self) -> bool {
        self.entries.iter().any(|e| e.plugin.reads_request_body())
    }

    /// Whether the chain configures `name`, switched on or off.
    fn has(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name) || self.disabled.contains(&name)
    }
}

/// The request phases, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Rewrite,
    Access,
    BeforeProxy,
}

/// Runs one request phase: the global rules' plugins, then the route's
/// merged with the consumer's (which join as soon as a plugin sets
/// [`Ctx::consumer`], and win over the route's config of the same plugin).
/// Returns the answer a plugin made, if one did.
pub async fn run_phase(
    phase: Phase,
    global: &Chain,
    route: &Chain,
    ctx: &mut Ctx,
) -> Option<Reply> {
    for e in global.entries.iter() {
        if let Some(reply) = run_entry(phase, e, ctx).await {
            return Some(reply);
        }
    }
    let mut order = Order::new(route, ctx);
    while let Some(e) = order.next(ctx) {
        if let Some(reply) = run_entry(phase, e, ctx).await {
            return Some(reply);
        }
    }
    None
}

/// Runs `rewrite` and `access` of the authentication plugins alone (the
/// global rules', then the route's): who is asking, without the rest of
/// the route's work. Returns their refusal, if one refused.
pub async fn authenticate(global: &Chain, route: &Chain, ctx: &mut Ctx) -> Option<Reply> {
    for phase in [Phase::Rewrite, Phase::Access] {
        let auth = global.entries.iter().chain(route.entries.iter());
        for e in auth.filter(|e| e.plugin.authenticates()) {
            if let Some(reply) = run_entry(phase, e, ctx).await {
                return Some(reply);
            }
        }
    }
    None
}

async fn run_entry(phase: Phase, e: &Entry, ctx: &mut Ctx) -> Option<Reply> {
    if !e.applies(ctx) {
        return None;
    }
    let mut flow = match phase {
        Phase::Rewrite => e.plugin.rewrite(ctx),
        Phase::Access => e.plugin.access(ctx),
        Phase::BeforeProxy => e.plugin.before_proxy(ctx),
    };
    loop {
        match flow {
            Flow::Continue => return None,
            Flow::Respond(reply) => return Some(reply),
            Flow::Await(pending) => flow = pending.await(ctx),
        }
    }
}

/// Walks the route's chain and the consumer's together by priority. The
/// consumer may become known part-way (authentication runs in `rewrite`);
/// its plugins then join at once, as APISIX's `rewrite_in_consumer` does:
/// those ranked above the point reached run next, except where the route's
/// own config of the same plugin has already had its turn in this phase.
struct Order<'r> {
    route: &'r Chain,
    consumer: Option<Chain>,
    i: usize,
    j: usize,
    /// Route entries handed out before the consumer joined, by index (the
    /// first 128): the consumer's config of one of those has had its turn.
    visited: u128,
}

impl<'r> Order<'r> {
    fn new(route: &'r Chain, ctx: &Ctx) -> Order<'r> {
        Order {
            route,
            consumer: consumer_chain(ctx),
            i: 0,
            j: 0,
            visited: 0,
        }
    }

    fn next(&mut self, ctx: &Ctx) -> Option<&Entry> {
        if self.consumer.is_none() {
            self.consumer = consumer_chain(ctx);
        }
        let consumer = self.consumer.as_ref();
        while let Some(c) = consumer.and_then(|c| c.entries.get(self.j)) {
            if self.had_turn(c.name) {
                self.j += 1;
            } else {
                break;
            }
        }
        while let Some(e) = self.route.entries.get(self.i) {
            if consumer.is_some_and(|c| c.has(e.name)) {
                self.i += 1;
            } else {
                break;
            }
        }
        let r = self.route.entries.get(self.i);
        let c = consumer.and_then(|c| c.entries.get(self.j));
        let e = match (r, c) {
            (Some(r), Some(c)) if c.priority > r.priority => {
                self.j += 1;
                c
            }
            (Some(r), _) => {
                if consumer.is_none() && self.i < 128 {
                    self.visited |= 1 << self.i;
                }
                self.i += 1;
                r
            }
            (None, Some(c)) => {
                self.j += 1;
                c
            }
            (None, None) => return None,
        };
        Some(e)
    }

    /// Whether the route's own config of `name` was handed out before the
    /// consumer joined (so the consumer's does not run again this phase).
    fn had_turn(&self, name: &str) -> bool {
        let at = self.route.entries.iter().position(|e| e.name == name);
        at.is_some_and(|i| i < 128 && self.visited & (1 << i) != 0)
    }
}

fn consumer_chain(ctx: &Ctx) -> Option<Chain> {
    ctx.consumer
        .as_ref()
        .filter(|c| !c.chain.is_empty() || !c.chain.disabled.is_empty())
        .map(|c| c.chain.clone())
}

/// Runs `header_filter` over the chain, global rules first. Returns
/// whether some plugin wants the whole body for [`run_body_filter`].
pub fn run_header_filter(global: &Chain, route: &Chain, ctx: &mut Ctx, head: &mut Head) -> bool {
    let mut wanted = false;
    each(global, route, ctx, |e, ctx| {
        e.plugin.header_filter(ctx, head);
        wanted |= e.plugin.wants_response_body(ctx, head);
    });
    wanted
}

/// Runs `body_filter` over the chain with the whole response body.
pub fn run_body_filter(global: &Chain, route: &Chain, ctx: &mut Ctx, body: &mut Bytes) {
    each(global, route, ctx, |e, ctx| e.plugin.body_filter(ctx, body));
}

/// Runs `log` over the chain.
pub fn run_log(global: &Chain, route: &Chain, ctx: &mut Ctx) {
    each(global, route, ctx, |e, ctx| e.plugin.log(ctx));
}

/// Every plugin that applies to a request once its consumer is known, in
/// order: global rules first.
fn each(global: &Chain, route: &Chain, ctx: &mut Ctx, mut f: impl FnMut(&Entry, &mut Ctx)) {
    for e in global.entries.iter() {
        if e.applies(ctx) {
            f(e, ctx);
        }
    }
    let mut order = Order::new(route, ctx);
    while let Some(e) = order.next(ctx) {
        if e.applies(ctx) {
            f(e, ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The ordering contract: global rules first, then priority descending,
    //! the consumer's plugins joining after authentication and winning over
    //! the route's own config of the same plugin, `_meta` honoured.

    use std::sync::{Arc, Mutex};

    use http::HeaderValue;
    use serde_json::json;

    use super::*;
    use crate::{Conn, Consumer, Env, Factory, FieldError, Registry};

    type Log = Arc<Mutex<Vec<String>>>;

    /// Records `{label}:{phase}`; `auth` sets the consumer in rewrite.
    struct Recorder {
        label: String,
        log: Log,
        auth: Option<Arc<Consumer>>,
    }

    impl Recorder {
        fn note(&self, phase: &str) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{}:{phase}", self.label));
        }
    }

    impl Plugin for Recorder {
        fn rewrite(&self, ctx: &mut Ctx) -> Flow {
            self.note("rewrite");
            if let Some(c) = &self.auth {
                ctx.consumer = Some(c.clone());
            }
            Flow::Continue
        }
        fn access(&self, _ctx: &mut Ctx) -> Flow {
            self.note("access");
            Flow::Continue
        }
        fn log(&self, _ctx: &Ctx) {
            self.note("log");
        }
    }

    fn entry(name: &'static str, priority: i32, label: &str, log: &Log) -> Entry {
        Entry {
            name,
            priority,
            plugin: Arc::new(Recorder {
                label: label.into(),
                log: log.clone(),
                auth: None,
            }),
            filter: None,
            disabled: false,
        }
    }

    fn ctx(uri: &str) -> Ctx {
        let (parts, ()) = http::Request::get(uri).body(()).unwrap().into_parts();
        let conn = Arc::new(Conn::new(
            "10.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            "http",
        ));
        Ctx::new(parts, conn, HeaderValue::from_static("id"))
    }

    fn taken(log: &Log) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[tokio::test]
    async fn global_first_then_priority_with_consumer_merged_after_auth() {
        let log: Log = Default::default();
        let consumer = Arc::new(Consumer {
            username: "jack".into(),
            header: HeaderValue::from_static("jack"),
            group_id: None,
            chain: Chain::new(vec![
                entry("limit", 1000, "consumer-limit", &log),
                entry("early", 5000, "consumer-early", &log),
            ]),
        });
        let auth = Entry {
            plugin: Arc::new(Recorder {
                label: "auth".into(),
                log: log.clone(),
                auth: Some(consumer),
            }),
            ..entry("auth", 2500, "auth", &log)
        };
        let global = Chain::new(vec![entry("g", 1, "global", &log)]);
        let route = Chain::merge([
            &[
                entry("limit", 1000, "route-limit", &log),
                entry("low", 10, "low", &log),
            ][..],
            &[auth, entry("high", 9000, "high", &log)][..],
        ]);
        let mut c = ctx("/");
        assert!(run_phase(Phase::Rewrite, &global, &route, &mut c)
            .await
            .is_none());
        assert_eq!(
            taken(&log),
            // consumer-early (5000) ranks above auth: it runs as soon as the
            // consumer is known; the consumer's limit replaces the route's.
            [
                "global:rewrite",
                "high:rewrite",
                "auth:rewrite",
                "consumer-early:rewrite",
                "consumer-limit:rewrite",
                "low:rewrite"
            ]
        );
        assert!(run_phase(Phase::Access, &global, &route, &mut c)
            .await
            .is_none());
        assert_eq!(
            taken(&log),
            [
                "global:access",
                "high:access",
                "consumer-early:access",
                "auth:access",
                "consumer-limit:access",
                "low:access"
            ]
        );
        run_log(&global, &route, &mut c);
        assert_eq!(taken(&log).len(), 6);
    }

    #[tokio::test]
    async fn a_consumer_plugin_the_route_switched_off_still_runs_for_the_consumer() {
        let log: Log = Default::default();
        let consumer = Arc::new(Consumer {
            username: "jack".into(),
            header: HeaderValue::from_static("jack"),
            group_id: None,
            chain: Chain::new(vec![entry("cors", 4000, "consumer-cors", &log)]),
        });
        let auth = Entry {
            plugin: Arc::new(Recorder {
                label: "auth".into(),
                log: log.clone(),
                auth: Some(consumer),
            }),
            ..entry("auth", 2500, "auth", &log)
        };
        let off = Entry {
            disabled: true,
            ..entry("cors", 4000, "route-cors", &log)
        };
        let route = Chain::new(vec![off, auth]);
        run_phase(Phase::Rewrite, &Chain::default(), &route, &mut ctx("/")).await;
        assert_eq!(taken(&log), ["auth:rewrite", "consumer-cors:rewrite"]);
    }

    #[tokio::test]
    async fn a_consumer_can_switch_off_a_route_plugin() {
        let log: Log = Default::default();
        let off = Entry {
            disabled: true,
            ..entry("limit", 1000, "consumer-limit", &log)
        };
        let consumer = Arc::new(Consumer {
            username: "jack".into(),
            header: HeaderValue::from_static("jack"),
            group_id: None,
            chain: Chain::new(vec![off]),
        });
        let route = Chain::new(vec![
            entry("limit", 1000, "route-limit", &log),
            entry("low", 1, "low", &log),
        ]);
        let mut c = ctx("/");
        c.consumer = Some(consumer);
        run_phase(Phase::Access, &Chain::default(), &route, &mut c).await;
        assert_eq!(taken(&log), ["low:access"]);
    }

    #[tokio::test]
    async fn answering_stops_the_phase() {
        struct Stop;
        impl Plugin for Stop {
            fn rewrite(&self, _ctx: &mut Ctx) -> Flow {
                Flow::Respond(Reply::new(http::StatusCode::FORBIDDEN))
            }
        }
        let log: Log = Default::default();
        let stop = Entry {
            plugin: Arc::new(Stop),
            ..entry("stop", 50, "stop", &log)
        };
        let route = Chain::new(vec![
            entry("a", 100, "a", &log),
            stop,
            entry("b", 1, "b", &log),
        ]);
        let reply = run_phase(Phase::Rewrite, &Chain::default(), &route, &mut ctx("/")).await;
        assert_eq!(reply.unwrap().status, 403);
        assert_eq!(taken(&log), ["a:rewrite"]);
    }

    /// Two test plugins built through a real registry, recording into `LOG`.
    fn meta_registry() -> Registry {
        fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
            let label = config["label"].as_str().unwrap_or_default().to_owned();
            Ok(Arc::new(Recorder {
                label,
                log: LOG.with(|l| l.clone()),
                auth: None,
            }))
        }
        let factory = |name, priority| Factory {
            name,
            priority,
            schema: || json!({"type": "object", "properties": {"label": {"type": "string"}}}),
            consumer_schema: None,
            build,
            credentials: None,
            upstreams: &[],
            secrets: &[],
        };
        Registry::new(vec![factory("one", 10), factory("two", 20)])
    }

    use serde_json::Value;
    thread_local! {
        static LOG: Log = Default::default();
    }

    #[tokio::test]
    async fn meta_priority_disable_and_filter() {
        let log = LOG.with(|l| l.clone());
        let registry = meta_registry();
        let env = Env::default();
        let one = registry
            .entry(
                "one",
                &json!({"label": "one", "_meta": {"priority": 30}}),
                &env,
            )
            .unwrap();
        let two = registry
            .entry(
                "two",
                &json!({"label": "two", "_meta": {"filter": [["arg_x", "==", "1"]]}}),
                &env,
            )
            .unwrap();
        let route = Chain::new(vec![one, two]);
        assert_eq!(
            route.entries()[0].name,
            "one",
            "_meta.priority 30 outranks 20"
        );
        run_phase(Phase::Access, &Chain::default(), &route, &mut ctx("/?x=1")).await;
        assert_eq!(taken(&log), ["one:access", "two:access"]);
        run_phase(Phase::Access, &Chain::default(), &route, &mut ctx("/?x=2")).await;
        assert_eq!(taken(&log), ["one:access"], "filter leaves `two` out");

        let off = registry
            .entry(
                "two",
                &json!({"label": "off", "_meta": {"disable": true}}),
                &env,
            )
            .unwrap();
        let on = registry
            .entry("two", &json!({"label": "on"}), &env)
            .unwrap();
        let merged = Chain::merge([&[on][..], &[off][..]]);
        assert!(
            merged.is_empty(),
            "a later layer's disable switches the plugin off"
        );

        let bad = registry.entry("one", &json!({"_meta": {"priority": "high"}}), &env);
        assert_eq!(bad.err().unwrap()[0].path, "_meta.priority");
        let bad = registry.entry("one", &json!({"label": 5}), &env);
        assert_eq!(bad.err().unwrap()[0].path, "label");
    }
}
