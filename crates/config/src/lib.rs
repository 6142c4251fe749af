//! Turnpike's configuration: the model (APISIX's resources), the config file,
//! validation with resource ids and field paths, and the compiled
//! [`Snapshot`] the proxy serves from.
//!
//! ```
//! let file = turnpike_config::parse(r#"
//! routes:
//!   - id: 1
//!     uri: /hello
//!     upstream: {nodes: {"127.0.0.1:1980": 1}}
//! "#).unwrap();
//! let registry = turnpike_plugin::Registry::new(Vec::new()); // no plugins
//! let snapshot = turnpike_config::compile(&file.resources, &registry, None, 1).unwrap();
//! assert_eq!(snapshot.routes.len(), 1);
//! ```
//!
//! The store never reaches the hot path: a change is parsed and compiled into
//! a new immutable snapshot, which the proxy swaps in whole; an invalid change
//! is refused whole and the old snapshot keeps serving.

mod compile;
mod file;
mod gateway;
pub mod model;
mod snapshot;
mod watch;

pub use compile::compile;
pub use file::{known_kind, load, parse, parse_raw, read_resources, ConfigFile, Resources, KINDS};
pub use gateway::{
    parse_duration, Admin, AdminKey, Dns, Etcd, Gateway, Provider, QueueKind, Redis, Status,
};
pub use snapshot::{
    HashOn, Keepalive, KeyPart, Node, PassHost, Route, Scheme, Snapshot, TimeoutOverride, Timeouts,
    Upstream,
};
pub use watch::watch_file;

/// A problem in the configuration, naming the resource and the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `route 1`, `upstream u1`, `gateway`, `file`.
    pub resource: String,
    /// The field path inside the resource, e.g. `upstream.nodes[0].weight`.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(
        resource: impl Into<String>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            resource: resource.into(),
            path: path.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.resource, self.message)
        } else {
            write!(f, "{}: {}: {}", self.resource, self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}
