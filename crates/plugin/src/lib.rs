//! Turnpike's plugin runtime: what a plugin is, how its config is checked,
//! and how a route's plugins run.
//!
//! A plugin is a [`Factory`] (name, priority, JSON Schema of its config,
//! an optional consumer schema, and `build`) and the [`Plugin`] it builds:
//! an instance with phase hooks that default to doing nothing. The
//! [`Registry`] holds the factories; the config compiler asks it to turn each
//! resource's `plugins` map into [`Entry`]s, merges them by precedence and
//! sorts them into a [`Chain`] once per snapshot. The proxy then runs the
//! phases with [`run_phase`], [`run_header_filter`], [`run_body_filter`]
//! and [`run_log`].
//!
//! A minimal plugin, answering every request itself:
//!
//! ```
//! use std::sync::Arc;
//! use turnpike_plugin::{Ctx, Factory, Flow, Plugin, Reply};
//!
//! struct Teapot;
//! impl Plugin for Teapot {
//!     fn access(&self, _ctx: &mut Ctx) -> Flow {
//!         Flow::Respond(Reply::message(http::StatusCode::IM_A_TEAPOT, "short and stout"))
//!     }
//! }
//!
//! let factory = Factory::new(
//!     "teapot",
//!     1,
//!     || serde_json::json!({"type": "object"}),
//!     |_config, _env| Ok(Arc::new(Teapot)),
//! );
//! let registry = turnpike_plugin::Registry::new(vec![factory]);
//! assert!(registry.get("teapot").is_some());
//! ```

mod chain;
mod ctx;
pub mod deps;
mod flow;
pub mod metrics;
pub mod outbound;
mod registry;
mod schema;
mod state;
pub mod tls;

pub use chain::{
    authenticate, run_body_filter, run_header_filter, run_log, run_phase, Chain, Entry, Phase,
};
pub use ctx::{host_only, Conn, Consumer, Ctx, Template};
pub use flow::{Flow, Head, Pending, Reply, Resume};
pub use registry::{typed, validator, Env, Factory, FieldError, Index, Registry};
pub use schema::{fill_defaults, pointer_to_path};

/// Whether `offered` is `secret` (a password, an API key), in time that
/// depends on the offered length only: neither the secret's bytes nor its
/// length show.
pub fn same_secret(secret: &[u8], offered: &[u8]) -> bool {
    if secret.is_empty() {
        return offered.is_empty();
    }
    let mut diff = u8::from(secret.len() != offered.len());
    for (i, b) in offered.iter().enumerate() {
        diff |= secret[i % secret.len()] ^ b;
    }
    diff == 0
}

/// The most a plugin may make Turnpike hold of a request or response body
/// in memory (request-validation, body-transformer, forward-auth's POST).
/// A larger request body is refused with 413; a response body declared
/// larger passes through unchanged.
pub const MAX_BUFFERED_BODY: usize = 8 * 1024 * 1024;

/// A plugin instance: one per plugin per resource, built from a validated,
/// typed config when a snapshot is compiled and shared by every request the
/// snapshot serves. Every hook defaults to doing nothing.
pub trait Plugin: Send + Sync + 'static {
    /// Runs first, before the upstream is chosen: rewrite the request,
    /// authenticate (set [`Ctx::consumer`]), or answer. By default this
    /// hook does nothing.
    fn rewrite(&self, _ctx: &mut Ctx) -> Flow {
        Flow::Continue
    }

    /// Runs after every plugin's rewrite and after the consumer's plugins
    /// have joined the chain: access control, validation, answering. By
    /// default this hook does nothing.
    fn access(&self, _ctx: &mut Ctx) -> Flow {
        Flow::Continue
    }

    /// Runs just before the request goes upstream, after balancing has been
    /// prepared. By default this hook does nothing.
    fn before_proxy(&self, _ctx: &mut Ctx) -> Flow {
        Flow::Continue
    }

    /// Sees and may change the response head, the upstream's or one a
    /// plugin answered with; setting `head.body` replaces the body. By
    /// default this hook does nothing.
    fn header_filter(&self, _ctx: &mut Ctx, _head: &mut Head) {}

    /// Whether this plugin needs the whole response body in
    /// [`Plugin::body_filter`] for this response. Asked after
    /// `header_filter`; by default it does not.
    fn wants_response_body(&self, _ctx: &Ctx, _head: &Head) -> bool {
        false
    }

    /// Sees the whole response body (at most [`MAX_BUFFERED_BODY`]) when
    /// some plugin in the chain asked for it. By default this hook does
    /// nothing.
    fn body_filter(&self, _ctx: &mut Ctx, _body: &mut bytes::Bytes) {}

    /// Runs once the response is over: its body sent whole, or abandoned
    /// by the client (see [`Ctx::response_bytes`] and
    /// [`Ctx::response_complete`]). For accounting; it must not block, and
    /// cannot change the response. By default this hook does nothing.
    fn log(&self, _ctx: &Ctx) {}

    /// Whether requests' bodies must be read into [`Ctx::body`] before the
    /// rewrite phase. By default they stream and plugins do not see them.
    fn reads_request_body(&self) -> bool {
        false
    }

    /// Whether this plugin says who the consumer is (key-auth, jwt-auth,
    /// …): such plugins alone run when the gateway only needs to know who
    /// asks (reading an asynchronous result). By default it does not.
    fn authenticates(&self) -> bool {
        false
    }
}
