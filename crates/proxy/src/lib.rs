//! Turnpike's data plane: listeners, the request path, upstream connections,
//! and the status listener.
//!
//! The binary builds a [`Shared`] holding the current [`Snapshot`], starts a
//! [`Server`] and the status listener, and swaps new snapshots into
//! `Shared::snapshot` as the configuration changes; each request loads the
//! snapshot once and keeps it to the end, so a swap never disturbs traffic.
//! See `crates/turnpike/src/main.rs` for the wiring.

mod async_jobs;
mod body;
mod clock;
mod dns;
mod error;
mod h1;
mod handler;
mod headers;
mod health;
mod idle;
mod metrics;
mod phases;
mod pool;
mod server;
mod status;
mod timed;
mod upgrade;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderName;
use turnpike_config::Snapshot;

pub use async_jobs::{deliver, execute};
pub use body::ProxyBody;
pub use dns::{Dns, DnsNode};
pub use health::start_health_checks;
pub use server::Server;
pub use status::serve_status;

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// State shared by the workers and the control plane.
pub struct Shared {
    /// The configuration being served; replaced whole on each change.
    pub snapshot: ArcSwap<Snapshot>,
    /// Shutdown has begun (for `/readyz`).
    pub draining: AtomicBool,
    /// Why the gateway serves no configuration yet (for `/readyz`): the
    /// stored one does not compile.
    pub unready: std::sync::Mutex<Option<String>>,
    /// `gateway.client_body_timeout`.
    pub client_body_timeout: Duration,
}

impl Shared {
    pub fn new(snapshot: Snapshot, client_body_timeout: Duration) -> Arc<Shared> {
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            draining: AtomicBool::new(false),
            unready: std::sync::Mutex::new(None),
            client_body_timeout,
        })
    }
}
