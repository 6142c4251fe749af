//! Smooth weighted round robin, as nginx does it, precomputed.
//!
//! nginx walks "current weights" under a lock on every pick. The sequence it
//! produces is periodic (its period is the sum of the reduced weights), so we
//! compute one period when the upstream is compiled and step through it with
//! an atomic counter: the same order, no lock.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Past this many entries the weights are scaled down to keep the schedule
/// small; the proportions stay within one part in this many.
const MAX_SCHEDULE: u64 = 4096;

#[derive(Debug)]
pub(crate) struct RoundRobin {
    schedule: Box<[u32]>,
    next: AtomicUsize,
    nodes: usize,
}

impl RoundRobin {
    pub(crate) fn new(weights: &[u32]) -> Self {
        let weights = scaled(&super::reduced(weights));
        RoundRobin {
            schedule: smooth_sequence(&weights).into(),
            next: AtomicUsize::new(0),
            nodes: weights.len(),
        }
    }

    pub(crate) fn pick(&self, skip: &impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Try each entry of one period at most once; stop early once every
        // node has been looked at.
        (0..len)
            .map(|k| self.schedule[(start + k) % len] as usize)
            .take(len.max(self.nodes))
            .find(|&i| !skip(i))
    }
}

fn scaled(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    if total <= MAX_SCHEDULE {
        return weights.to_vec();
    }
    weights
        .iter()
        .map(|&w| {
            if w == 0 {
                0
            } else {
                ((w as u64 * MAX_SCHEDULE / total) as u32).max(1)
            }
        })
        .collect()
}

/// One period of nginx's smooth weighted round robin.
fn smooth_sequence(weights: &[u32]) -> Vec<u32> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] || weights[best] == 0 {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_is_smooth_like_nginx() {
        // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
        assert_eq!(smooth_sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn distribution_follows_weights() {
        let rr = RoundRobin::new(&[30, 20, 10, 0]);
        let mut counts = [0usize; 4];
        for _ in 0..6000 {
            counts[rr.pick(&|_| false).unwrap()] += 1;
        }
        assert_eq!(counts, [3000, 2000, 1000, 0]);
    }

    #[test]
    fn skipped_nodes_are_passed_over() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        for _ in 0..10 {
            assert_ne!(rr.pick(&|i| i == 1), Some(1));
        }
        assert_eq!(rr.pick(&|_| true), None);
    }

    #[test]
    fn huge_weights_are_scaled() {
        let rr = RoundRobin::new(&[1_000_000, 1, 999_999]);
        assert!(rr.schedule.len() as u64 <= MAX_SCHEDULE + 3);
        let mut counts = [0usize; 3];
        for _ in 0..rr.schedule.len() {
            counts[rr.pick(&|_| false).unwrap()] += 1;
        }
        assert!(counts[1] >= 1, "a node with weight keeps at least one slot");
        assert!((counts[0] as i64 - counts[2] as i64).abs() <= 2);
    }

    #[test]
    fn all_zero_weights_pick_nothing() {
        let rr = RoundRobin::new(&[0, 0]);
        assert_eq!(rr.pick(&|_| false), None);
    }
}
