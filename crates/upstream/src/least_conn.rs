//! Least connections, weighted: the node with the lowest
//! (active + 1) / weight gets the request; ties rotate so equal nodes share.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

#[derive(Debug)]
pub(crate) struct LeastConn {
    weights: Box<[u32]>,
    active: Box<[AtomicU32]>,
    rotate: AtomicUsize,
}

impl LeastConn {
    pub(crate) fn new(weights: &[u32]) -> Self {
        LeastConn {
            weights: weights.into(),
            active: weights.iter().map(|_| AtomicU32::new(0)).collect(),
            rotate: AtomicUsize::new(0),
        }
    }

    pub(crate) fn pick(&self, skip: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.weights.len();
        let start = self.rotate.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, u64, u64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let w = self.weights[i] as u64;
            if w == 0 || skip(i) {
                continue;
            }
            let load = self.active[i].load(Ordering::Relaxed) as u64 + 1;
            // Compare load/w < best_load/best_w without division.
            if best.is_none_or(|(_, bl, bw)| load * bw < bl * w) {
                best = Some((i, load, w));
            }
        }
        best.map(|b| b.0)
    }

    pub(crate) fn start(&self, i: usize) {
        self.active[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finish(&self, i: usize) {
        // Saturating: a finish without a start must not wrap around.
        let _ =
            self.active[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_node_is_avoided() {
        let lc = LeastConn::new(&[1, 1, 1]);
        lc.start(0);
        lc.start(0);
        lc.start(1);
        for _ in 0..10 {
            assert_eq!(lc.pick(&|_| false), Some(2));
        }
        lc.finish(0);
        lc.finish(0);
        lc.start(2);
        assert_eq!(lc.pick(&|_| false), Some(0));
    }

    #[test]
    fn weights_scale_capacity() {
        let lc = LeastConn::new(&[3, 1]);
        // Open connections as the balancer directs them: node 0 takes three
        // for every one on node 1.
        for _ in 0..40 {
            let i = lc.pick(&|_| false).unwrap();
            lc.start(i);
        }
        let a = lc.active[0].load(Ordering::Relaxed);
        let b = lc.active[1].load(Ordering::Relaxed);
        assert_eq!(a + b, 40);
        assert!((29..=31).contains(&a), "{a} vs {b}");
    }

    #[test]
    fn equal_nodes_share_when_idle() {
        let lc = LeastConn::new(&[1, 1]);
        let picks: Vec<_> = (0..4).map(|_| lc.pick(&|_| false).unwrap()).collect();
        assert!(picks.contains(&0) && picks.contains(&1));
    }

    #[test]
    fn finish_never_underflows() {
        let lc = LeastConn::new(&[1]);
        lc.finish(0);
        assert_eq!(lc.active[0].load(Ordering::Relaxed), 0);
    }
}
