//! Exponentially weighted moving average of response time, with the power of
//! two choices (as APISIX's `ewma`): two random candidates, the one with the
//! lower `ewma × (active + 1) / weight` wins. A new node starts at zero, so it
//! is tried soon; the average decays with a 10 s time constant.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const DECAY_SECONDS: f64 = 10.0;

#[derive(Debug)]
pub(crate) struct Ewma {
    weights: Box<[u32]>,
    nodes: Box<[Stat]>,
}

#[derive(Debug, Default)]
struct Stat {
    /// Average latency in microseconds, as f64 bits.
    ewma: AtomicU64,
    /// When `ewma` was last updated, in microseconds since `epoch()`.
    stamp: AtomicU64,
    active: AtomicU32,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since the process's epoch; never 0, which marks "no sample yet".
fn now_micros() -> u64 {
    epoch().elapsed().as_micros() as u64 + 1
}

fn decay(idle_micros: u64) -> f64 {
    (-(idle_micros as f64 / 1e6) / DECAY_SECONDS).exp()
}

impl Ewma {
    pub(crate) fn new(weights: &[u32]) -> Self {
        Ewma {
            weights: weights.into(),
            nodes: weights.iter().map(|_| Stat::default()).collect(),
        }
    }

    /// The node's cost at `now`. The average decays toward zero while a node
    /// gets no samples, so one slow answer cannot starve a node for good.
    fn score_at(&self, i: usize, now: u64) -> f64 {
        let stat = &self.nodes[i];
        let ewma = f64::from_bits(stat.ewma.load(Ordering::Relaxed));
        let idle = now.saturating_sub(stat.stamp.load(Ordering::Relaxed));
        let decayed = ewma * decay(idle);
        let active = stat.active.load(Ordering::Relaxed) as f64;
        (decayed + 1.0) * (active + 1.0) / self.weights[i] as f64
    }

    pub(crate) fn pick(&self, skip: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.weights.len();
        let eligible = |i: usize| self.weights[i] > 0 && !skip(i);
        let first = fastrand::usize(..n.max(1));
        let a = (0..n).map(|k| (first + k) % n).find(|&i| eligible(i))?;
        let offset = 1 + fastrand::usize(..n.max(2) - 1);
        let b = (0..n)
            .map(|k| (a + offset + k) % n)
            .find(|&i| i != a && eligible(i));
        Some(match b {
            Some(b) => {
                let now = now_micros();
                if self.score_at(b, now) < self.score_at(a, now) {
                    b
                } else {
                    a
                }
            }
            None => a,
        })
    }

    pub(crate) fn start(&self, i: usize) {
        self.nodes[i].active.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finish(&self, i: usize, elapsed: Duration) {
        let stat = &self.nodes[i];
        let _ = stat
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        let now = epoch().elapsed().as_micros() as u64;
        let last = stat.stamp.swap(now, Ordering::Relaxed);
        let rtt = elapsed.as_micros() as f64;
        let old = f64::from_bits(stat.ewma.load(Ordering::Relaxed));
        let weight = (-((now.saturating_sub(last)) as f64 / 1e6) / DECAY_SECONDS).exp();
        let new = if last == 0 {
            rtt
        } else {
            old * weight + rtt * (1.0 - weight)
        };
        // Racing updates may drop one sample; an average tolerates that.
        stat.ewma.store(new.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Ewma {
        fn score(&self, i: usize) -> f64 {
            self.score_at(i, now_micros())
        }
    }

    #[test]
    fn slow_node_gets_less_traffic() {
        let e = Ewma::new(&[1, 1, 1]);
        e.finish(0, Duration::from_millis(200));
        e.finish(1, Duration::from_millis(5));
        e.finish(2, Duration::from_millis(5));
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[e.pick(&|_| false).unwrap()] += 1;
        }
        // With two choices, the slow node wins only when drawn against itself,
        // which it never is: it is picked only when it is the only candidate.
        assert!(counts[0] < 300, "{counts:?}");
        // The two fast nodes share the rest. Their scores differ only by how
        // long ago each was sampled, which decides their head-to-head draws.
        assert!(counts[1] > 500 && counts[2] > 500, "{counts:?}");
    }

    #[test]
    fn an_old_slow_sample_fades() {
        let e = Ewma::new(&[1, 1]);
        e.finish(0, Duration::from_millis(500));
        e.finish(1, Duration::from_millis(5));
        assert!(e.score(0) > e.score(1) * 50.0);
        // A minute later, with no new samples, the old slow one has faded below
        // the fast node's fresh sample, so it gets tried again.
        let later = now_micros() + 60_000_000;
        assert!(
            e.score_at(0, later) < e.score(1),
            "{}",
            e.score_at(0, later)
        );
    }

    #[test]
    fn in_flight_requests_count() {
        let e = Ewma::new(&[1, 1]);
        e.finish(0, Duration::from_millis(10));
        e.finish(1, Duration::from_millis(10));
        for _ in 0..5 {
            e.start(0);
        }
        for _ in 0..100 {
            assert_eq!(e.pick(&|_| false), Some(1));
        }
    }

    #[test]
    fn skipped_and_zero_weight_nodes_are_never_picked() {
        let e = Ewma::new(&[1, 0, 1]);
        for _ in 0..100 {
            assert_eq!(e.pick(&|i| i == 0), Some(2));
        }
        assert_eq!(e.pick(&|_| true), None);
    }
}
