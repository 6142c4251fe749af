//! Node health: APISIX's `checks` (active probes and passive observation of
//! real traffic), and the state they keep per node of one upstream.
//!
//! [`Health`] is pure state and rules: the proxy reports what each probe
//! or proxied request found with [`Health::report`], and skips nodes for
//! which [`Health::is_healthy`] is false. A node turns unhealthy after
//! `unhealthy.http_failures` bad statuses, `tcp_failures` connection
//! failures or `timeouts` timeouts in a row, and healthy again after
//! `healthy.successes` good statuses in a row, as lua-resty-healthcheck
//! counts (a threshold of 0 never trips).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// An upstream's `checks`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    pub active: Option<Active>,
    pub passive: Option<Passive>,
}

/// `checks.active`: probes sent by the gateway.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Active {
    #[serde(rename = "type")]
    pub kind: String,
    /// Seconds.
    pub timeout: f64,
    pub concurrency: u32,
    pub http_path: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub https_verify_certificate: bool,
    pub req_headers: Vec<String>,
    pub healthy: ActiveHealthy,
    pub unhealthy: ActiveUnhealthy,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActiveHealthy {
    /// Seconds between probes of a healthy node; 0 probes none.
    pub interval: u64,
    pub http_statuses: Vec<u16>,
    pub successes: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActiveUnhealthy {
    /// Seconds between probes of an unhealthy node; 0 probes none.
    pub interval: u64,
    pub http_statuses: Vec<u16>,
    pub http_failures: u32,
    pub tcp_failures: u32,
    pub timeouts: u32,
}

/// `checks.passive`: what proxied requests show.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Passive {
    #[serde(rename = "type")]
    pub kind: String,
    pub healthy: PassiveHealthy,
    pub unhealthy: PassiveUnhealthy,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PassiveHealthy {
    pub http_statuses: Vec<u16>,
    pub successes: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PassiveUnhealthy {
    pub http_statuses: Vec<u16>,
    pub http_failures: u32,
    pub tcp_failures: u32,
    pub timeouts: u32,
}

impl Default for Active {
    fn default() -> Self {
        Active {
            kind: "http".into(),
            timeout: 1.0,
            concurrency: 10,
            http_path: "/".into(),
            host: None,
            port: None,
            https_verify_certificate: true,
            req_headers: Vec::new(),
            healthy: ActiveHealthy::default(),
            unhealthy: ActiveUnhealthy::default(),
        }
    }
}

impl Default for ActiveHealthy {
    fn default() -> Self {
        ActiveHealthy {
            interval: 1,
            http_statuses: vec![200, 302],
            successes: 2,
        }
    }
}

impl Default for ActiveUnhealthy {
    fn default() -> Self {
        ActiveUnhealthy {
            interval: 1,
            http_statuses: vec![429, 404, 500, 501, 502, 503, 504, 505],
            http_failures: 5,
            tcp_failures: 2,
            timeouts: 3,
        }
    }
}

impl Default for Passive {
    fn default() -> Self {
        Passive {
            kind: "http".into(),
            healthy: PassiveHealthy::default(),
            unhealthy: PassiveUnhealthy::default(),
        }
    }
}

impl Default for PassiveHealthy {
    fn default() -> Self {
        PassiveHealthy {
            http_statuses: (200..=208).chain([226]).chain(300..=308).collect(),
            successes: 5,
        }
    }
}

impl Default for PassiveUnhealthy {
    fn default() -> Self {
        PassiveUnhealthy {
            http_statuses: vec![429, 500, 503],
            http_failures: 5,
            tcp_failures: 2,
            timeouts: 7,
        }
    }
}

/// What one probe or proxied request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    /// A TCP probe connected.
    Connected,
    /// The connection could not be made, or broke before an answer.
    TcpFailure,
    Timeout,
}

/// Who found it: the thresholds differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Active,
    Passive,
}

/// How long a node marked down by passive checks alone (no active probes
/// to bring it back) stays out before it gets traffic again.
pub const PASSIVE_PROBATION: Duration = Duration::from_secs(10);

/// Health of every node of one upstream.
#[derive(Debug)]
pub struct Health {
    pub checks: Checks,
    nodes: Box<[NodeHealth]>,
    epoch: Instant,
    /// An active checker runs for this state (so a reload that keeps the
    /// upstream does not start a second one).
    checker: AtomicBool,
    /// When "every node is down" was last logged, in ms since the epoch.
    all_down_logged_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct NodeHealth {
    down: AtomicBool,
    successes: AtomicU32,
    http_failures: AtomicU32,
    tcp_failures: AtomicU32,
    timeouts: AtomicU32,
    /// When it went down, in ms since the epoch.
    down_since_ms: AtomicU64,
    /// Why it is down (or last went down).
    reason: Mutex<String>,
}

impl Health {
    pub fn new(checks: Checks, nodes: usize) -> Health {
        Health {
            checks,
            nodes: (0..nodes).map(|_| NodeHealth::default()).collect(),
            epoch: Instant::now(),
            checker: AtomicBool::new(false),
            all_down_logged_ms: AtomicU64::new(0),
        }
    }

    /// Takes node `j`'s state in `old` as node `i`'s.
    pub fn inherit(&self, i: usize, old: &Health, j: usize) {
        let (Some(n), Some(o)) = (self.nodes.get(i), old.nodes.get(j)) else {
            return;
        };
        if o.down.load(Ordering::Acquire) {
            let reason = o.reason.lock().unwrap_or_else(|e| e.into_inner()).clone();
            self.set(i, false, &reason);
        }
        for (mine, theirs) in [
            (&n.successes, &o.successes),
            (&n.http_failures, &o.http_failures),
            (&n.tcp_failures, &o.tcp_failures),
            (&n.timeouts, &o.timeouts),
        ] {
            mine.store(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Whether to log now that every node is down: at most every 10 s.
    pub fn log_all_down(&self) -> bool {
        let now = self.now_ms() + 10_000;
        let last = self.all_down_logged_ms.load(Ordering::Relaxed);
        now >= last + 10_000
            && self
                .all_down_logged_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// Whether node `i` may get traffic.
    pub fn is_healthy(&self, i: usize) -> bool {
        let Some(n) = self.nodes.get(i) else {
            return true;
        };
        if !n.down.load(Ordering::Acquire) {
            return true;
        }
        // Down by passive checks alone: nothing would ever bring it back,
        // so it gets traffic again after a while (and goes down again if
        // it still fails).
        if self.checks.active.is_none() {
            let since = n.down_since_ms.load(Ordering::Acquire);
            if self.now_ms().saturating_sub(since) >= PASSIVE_PROBATION.as_millis() as u64 {
                self.set(i, true, "probation over");
                return true;
            }
        }
        false
    }

    /// Why node `i` is down, if it is.
    pub fn down_reason(&self, i: usize) -> Option<String> {
        let n = self.nodes.get(i)?;
        n.down
            .load(Ordering::Acquire)
            .then(|| n.reason.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Claims the right to run this upstream's active checker: true once.
    pub fn claim_checker(&self) -> bool {
        self.checks.active.is_some() && !self.checker.swap(true, Ordering::AcqRel)
    }

    /// Counts what a probe (`Source::Active`) or a proxied request
    /// (`Source::Passive`) found at node `i`; returns the node's new state
    /// when it changed.
    pub fn report(&self, i: usize, source: Source, outcome: Outcome) -> Option<bool> {
        let rules = self.rules(source)?;
        let n = self.nodes.get(i)?;
        let down = n.down.load(Ordering::Acquire);
        // As lua-resty-healthcheck: a success clears every failure count;
        // a failure clears only the successes, so failures of different
        // kinds add up towards their own thresholds.
        let success = || {
            for c in [&n.http_failures, &n.tcp_failures, &n.timeouts] {
                c.store(0, Ordering::Relaxed);
            }
            n.successes.fetch_add(1, Ordering::AcqRel) + 1
        };
        let failure = |counter: &AtomicU32| {
            n.successes.store(0, Ordering::Relaxed);
            counter.fetch_add(1, Ordering::AcqRel) + 1
        };
        let (count, threshold, goes_down) = match outcome {
            Outcome::Status(s) if !rules.tcp_only && rules.healthy.contains(&s) => {
                (success(), rules.successes, false)
            }
            Outcome::Connected => (success(), rules.successes, false),
            Outcome::Status(s) if !rules.tcp_only && rules.unhealthy.contains(&s) => {
                (failure(&n.http_failures), rules.http_failures, true)
            }
            Outcome::Status(_) => return None,
            Outcome::TcpFailure => (failure(&n.tcp_failures), rules.tcp_failures, true),
            Outcome::Timeout => (failure(&n.timeouts), rules.timeouts, true),
        };
        if goes_down == down || threshold == 0 || count < threshold {
            return None;
        }
        // Worded only when the state changes: reports are per response.
        let what = match outcome {
            Outcome::Status(s) if goes_down => {
                format!("{count} answers {s} since the last success")
            }
            Outcome::Status(s) => format!("{count} answers {s} in a row"),
            Outcome::Connected => format!("{count} connections in a row"),
            Outcome::TcpFailure => format!("{count} connection failures since the last success"),
            Outcome::Timeout => format!("{count} timeouts since the last success"),
        };
        self.set(
            i,
            !goes_down,
            &format!("{what} ({source:?} check)").to_lowercase(),
        );
        Some(!goes_down)
    }

    fn set(&self, i: usize, healthy: bool, why: &str) {
        let n = &self.nodes[i];
        *n.reason.lock().unwrap_or_else(|e| e.into_inner()) = why.to_owned();
        for c in [&n.successes, &n.http_failures, &n.tcp_failures, &n.timeouts] {
            c.store(0, Ordering::Relaxed);
        }
        n.down_since_ms.store(self.now_ms(), Ordering::Release);
        n.down.store(!healthy, Ordering::Release);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn rules(&self, source: Source) -> Option<Rules<'_>> {
        Some(match source {
            Source::Active => {
                let a = self.checks.active.as_ref()?;
                Rules {
                    tcp_only: a.kind == "tcp",
                    healthy: &a.healthy.http_statuses,
                    successes: a.healthy.successes,
                    unhealthy: &a.unhealthy.http_statuses,
                    http_failures: a.unhealthy.http_failures,
                    tcp_failures: a.unhealthy.tcp_failures,
                    timeouts: a.unhealthy.timeouts,
                }
            }
            Source::Passive => {
                let p = self.checks.passive.as_ref()?;
                Rules {
                    tcp_only: p.kind == "tcp",
                    healthy: &p.healthy.http_statuses,
                    successes: p.healthy.successes,
                    unhealthy: &p.unhealthy.http_statuses,
                    http_failures: p.unhealthy.http_failures,
                    tcp_failures: p.unhealthy.tcp_failures,
                    timeouts: p.unhealthy.timeouts,
                }
            }
        })
    }
}

struct Rules<'a> {
    /// `type: tcp`: statuses count for nothing.
    tcp_only: bool,
    healthy: &'a [u16],
    successes: u32,
    unhealthy: &'a [u16],
    http_failures: u32,
    tcp_failures: u32,
    timeouts: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active() -> Health {
        Health::new(
            Checks {
                active: Some(Active::default()),
                passive: None,
            },
            2,
        )
    }

    #[test]
    fn failures_in_a_row_take_a_node_out_and_successes_bring_it_back() {
        let h = active();
        assert_eq!(h.report(0, Source::Active, Outcome::TcpFailure), None);
        assert_eq!(
            h.report(0, Source::Active, Outcome::TcpFailure),
            Some(false)
        );
        assert!(!h.is_healthy(0));
        assert!(h.is_healthy(1), "per node");
        assert!(h.down_reason(0).unwrap().contains("2 connection failures"));
        assert_eq!(h.report(0, Source::Active, Outcome::Status(200)), None);
        assert_eq!(
            h.report(0, Source::Active, Outcome::Status(200)),
            Some(true)
        );
        assert!(h.is_healthy(0));
        assert_eq!(h.down_reason(0), None);
    }

    #[test]
    fn a_success_breaks_a_run_of_failures_and_failures_of_kinds_add_up() {
        let h = active();
        h.report(0, Source::Active, Outcome::Timeout);
        h.report(0, Source::Active, Outcome::Timeout);
        h.report(0, Source::Active, Outcome::Status(200));
        h.report(0, Source::Active, Outcome::Timeout);
        assert!(h.is_healthy(0), "the success cleared the timeouts");
        h.report(0, Source::Active, Outcome::Status(418));
        h.report(0, Source::Active, Outcome::TcpFailure);
        h.report(0, Source::Active, Outcome::Timeout);
        assert!(h.is_healthy(0), "2 timeouts of 3");
        h.report(0, Source::Active, Outcome::Timeout);
        assert!(
            !h.is_healthy(0),
            "a connection failure between them does not clear timeouts; 418 counts neither way"
        );
    }

    #[test]
    fn passive_rules_apply_to_traffic_and_zero_never_trips() {
        let mut checks = Checks {
            active: Some(Active::default()),
            passive: Some(Passive::default()),
        };
        checks.passive.as_mut().unwrap().unhealthy.http_failures = 0;
        let h = Health::new(checks, 1);
        for _ in 0..10 {
            h.report(0, Source::Passive, Outcome::Status(500));
        }
        assert!(h.is_healthy(0), "http_failures 0 disables");
        h.report(0, Source::Passive, Outcome::TcpFailure);
        h.report(0, Source::Passive, Outcome::TcpFailure);
        assert!(!h.is_healthy(0));
        let none = Health::new(Checks::default(), 1);
        assert_eq!(none.report(0, Source::Passive, Outcome::TcpFailure), None);
    }

    #[test]
    fn passive_only_nodes_come_back_after_probation() {
        let h = Health::new(
            Checks {
                active: None,
                passive: Some(Passive::default()),
            },
            1,
        );
        h.report(0, Source::Passive, Outcome::TcpFailure);
        h.report(0, Source::Passive, Outcome::TcpFailure);
        assert!(!h.is_healthy(0));
        h.nodes[0].down_since_ms.store(0, Ordering::Release);
        let later = Health {
            epoch: h.epoch - PASSIVE_PROBATION,
            ..h
        };
        assert!(later.is_healthy(0), "back after the probation");
        assert!(!later.claim_checker(), "no active checks, no checker");
    }
}
