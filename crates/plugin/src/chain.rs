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
    reads_body: bool,
}

impl Chain {
    pub fn new(mut entries: Vec<Entry>) -> Chain {
        entries.retain(|e| !e.disabled);
        entries.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(b.name)));
        Chain {
            reads_body: entries.iter().any(|e| e.plugin.reads_request_body()),
            entries: entries.into(),
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

    /// Whether some plugin here reads the request body.
    pub fn reads_body(&self) -> bool {
        self.reads_body
    }

    fn has(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
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
        if let Some(reply) = run_entry(phase, &e, ctx).await {
            return Some(reply);
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
/// its plugins then join from below the priority reached so far.
struct Order {
    route: Chain,
    consumer: Option<Chain>,
    i: usize,
    j: usize,
    last: i32,
}

impl Order {
    fn new(route: &Chain, ctx: &Ctx) -> Order {
        Order {
            route: route.clone(),
            consumer: consumer_chain(ctx),
            i: 0,
            j: 0,
            last: i32::MAX,
        }
    }

    fn next(&mut self, ctx: &Ctx) -> Option<Entry> {
        if self.consumer.is_none() {
            if let Some(chain) = consumer_chain(ctx) {
                let last = self.last;
                self.j = chain
                    .entries
                    .iter()
                    .position(|e| e.priority < last)
                    .unwrap_or(chain.entries.len());
                self.consumer = Some(chain);
            }
        }
        let consumer = self.consumer.as_ref();
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
                c.clone()
            }
            (Some(r), _) => {
                self.i += 1;
                r.clone()
            }
            (None, Some(c)) => {
                self.j += 1;
                c.clone()
            }
            (None, None) => return None,
        };
        self.last = e.priority;
        Some(e)
    }
}

fn consumer_chain(ctx: &Ctx) -> Option<Chain> {
    ctx.consumer
        .as_ref()
        .filter(|c| !c.chain.is_empty())
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
            f(&e, ctx);
        }
    }
}
