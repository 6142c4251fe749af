//! Load balancers over an upstream's nodes: `roundrobin` (smooth weighted, as
//! nginx), `chash` (a consistent-hash ring), `least_conn` and `ewma`.
//!
//! A [`Balancer`] is built once per upstream config and shared by every
//! worker; its state is atomics, so picking never takes a lock. The proxy asks
//! for a node with [`Balancer::pick`], skipping nodes it already tried and
//! nodes [`Health`] knows to be down, and reports each attempt's start and end
//! so `least_conn` and `ewma` see the load.
//!
//! [`health`] holds APISIX's `checks` and the per-node state they keep; the
//! proxy does the probing and reports what it and real traffic found.
//!
//! ```
//! use turnpike_upstream::{Balancer, Kind};
//! let b = Balancer::new(Kind::RoundRobin, &[("10.0.0.1:80", 2), ("10.0.0.2:80", 1)]);
//! let picks: Vec<usize> = (0..3).map(|_| b.pick(None, |_| false).unwrap()).collect();
//! assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 2);
//! ```

mod chash;
mod ewma;
pub mod health;
mod least_conn;
mod roundrobin;

use std::time::Duration;

pub use health::{Checks, Health, Outcome, Source};

/// The balancing algorithm, as APISIX's upstream `type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    RoundRobin,
    Chash,
    LeastConn,
    Ewma,
}

impl Kind {
    pub fn parse(name: &str) -> Option<Kind> {
        Some(match name {
            "roundrobin" => Kind::RoundRobin,
            "chash" => Kind::Chash,
            "least_conn" => Kind::LeastConn,
            "ewma" => Kind::Ewma,
            _ => return None,
        })
    }
}

/// Picks nodes for one upstream.
#[derive(Debug)]
pub struct Balancer {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    RoundRobin(roundrobin::RoundRobin),
    Chash(chash::Ring),
    LeastConn(least_conn::LeastConn),
    Ewma(ewma::Ewma),
}

impl Balancer {
    /// `nodes` are (`host:port`, weight); the key feeds the hash ring. A node
    /// of weight 0 is never picked.
    pub fn new(kind: Kind, nodes: &[(&str, u32)]) -> Balancer {
        let weights: Vec<u32> = nodes.iter().map(|n| n.1).collect();
        let inner = match kind {
            Kind::RoundRobin => Inner::RoundRobin(roundrobin::RoundRobin::new(&weights)),
            Kind::Chash => Inner::Chash(chash::Ring::new(nodes)),
            Kind::LeastConn => Inner::LeastConn(least_conn::LeastConn::new(&weights)),
            Kind::Ewma => Inner::Ewma(ewma::Ewma::new(&weights)),
        };
        Balancer { inner }
    }

    /// The index of the node to try, or `None` when every node is skipped.
    /// `hash_key` is used by `chash` only.
    pub fn pick(&self, hash_key: Option<&[u8]>, skip: impl Fn(usize) -> bool) -> Option<usize> {
        match &self.inner {
            Inner::RoundRobin(b) => b.pick(&skip),
            Inner::Chash(b) => b.pick(hash_key.unwrap_or_default(), &skip),
            Inner::LeastConn(b) => b.pick(&skip),
            Inner::Ewma(b) => b.pick(&skip),
        }
    }

    /// A request to node `i` starts.
    pub fn start(&self, i: usize) {
        match &self.inner {
            Inner::LeastConn(b) => b.start(i),
            Inner::Ewma(b) => b.start(i),
            Inner::RoundRobin(_) | Inner::Chash(_) => {}
        }
    }

    /// A request to node `i` ended after `elapsed` (for `ewma`, the whole
    /// exchange; the proxy reports a failure as a long one).
    pub fn finish(&self, i: usize, elapsed: Duration) {
        match &self.inner {
            Inner::LeastConn(b) => b.finish(i),
            Inner::Ewma(b) => b.finish(i, elapsed),
            Inner::RoundRobin(_) | Inner::Chash(_) => {}
        }
    }

    /// True for balancers that need [`Balancer::start`] and [`Balancer::finish`].
    pub fn tracks_load(&self) -> bool {
        matches!(self.inner, Inner::LeastConn(_) | Inner::Ewma(_))
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Weights divided by their greatest common divisor (zeros stay zero).
fn reduced(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    weights.iter().map(|w| w / g).collect()
}
