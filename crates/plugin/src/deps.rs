//! Services the gateway's plugins depend on (Redis for the limiters), so
//! `/gateway/health` can say whether each is reachable. A dependency
//! reports what its last use found; the health endpoint never probes, so
//! asking never slows anything down.

use std::sync::{Arc, Mutex, OnceLock, Weak};

/// What the last use of a dependency found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    /// Not used yet.
    Unknown,
    Up,
    Down,
}

impl Reachability {
    pub fn as_str(self) -> &'static str {
        match self {
            Reachability::Unknown => "unknown",
            Reachability::Up => "up",
            Reachability::Down => "down",
        }
    }
}

pub trait Dependency: Send + Sync {
    /// `redis`.
    fn kind(&self) -> &'static str;
    /// `host:port/db`, never a password.
    fn address(&self) -> String;
    fn reachability(&self) -> Reachability;
}

fn registry() -> &'static Mutex<Vec<Weak<dyn Dependency>>> {
    static DEPS: OnceLock<Mutex<Vec<Weak<dyn Dependency>>>> = OnceLock::new();
    DEPS.get_or_init(Mutex::default)
}

/// Lists `dep` while it lives (registering it again changes nothing).
pub fn register(dep: &Arc<dyn Dependency>) {
    let mut deps = registry().lock().unwrap_or_else(|e| e.into_inner());
    deps.retain(|d| d.strong_count() > 0);
    let known = deps
        .iter()
        .any(|d| std::ptr::addr_eq(d.as_ptr(), Arc::as_ptr(dep)));
    if !known {
        deps.push(Arc::downgrade(dep));
    }
}

/// Every dependency some snapshot still uses.
pub fn all() -> Vec<Arc<dyn Dependency>> {
    let deps = registry().lock().unwrap_or_else(|e| e.into_inner());
    deps.iter().filter_map(Weak::upgrade).collect()
}
