//! Consistent hashing on a ring of virtual points (CRC32, as APISIX's
//! resty.chash). Each node gets points in proportion to its weight, so adding
//! a node moves about 1/(n+1) of the keys.

/// Virtual points per unit of (reduced) weight.
const POINTS_PER_WEIGHT: u32 = 160;
/// Cap on the ring's size; weights are scaled down past it.
const MAX_POINTS: u64 = 160 * 1024;

#[derive(Debug)]
pub(crate) struct Ring {
    /// (hash, node), sorted by hash.
    points: Box<[(u32, u32)]>,
    nodes: usize,
}

impl Ring {
    pub(crate) fn new(nodes: &[(&str, u32)]) -> Self {
        let weights: Vec<u32> = nodes.iter().map(|n| n.1).collect();
        let weights = super::reduced(&weights);
        let total: u64 = weights
            .iter()
            .map(|&w| w as u64 * POINTS_PER_WEIGHT as u64)
            .sum();
        let scale = if total > MAX_POINTS {
            MAX_POINTS as f64 / total as f64
        } else {
            1.0
        };
        let mut points = Vec::new();
        for (i, ((key, _), &w)) in nodes.iter().zip(&weights).enumerate() {
            if w == 0 {
                continue;
            }
            let count = ((w as f64 * POINTS_PER_WEIGHT as f64 * scale) as u32).max(1);
            for j in 0..count {
                let h = crc32fast::hash(format!("{key}#{j}").as_bytes());
                points.push((h, i as u32));
            }
        }
        points.sort_unstable();
        Ring {
            points: points.into(),
            nodes: nodes.len(),
        }
    }

    /// The node owning `key`, walking on past skipped nodes.
    pub(crate) fn pick(&self, key: &[u8], skip: &impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let h = crc32fast::hash(key);
        let start = self.points.partition_point(|p| p.0 < h);
        let len = self.points.len();
        let mut looked = 0;
        let mut last = u32::MAX;
        for k in 0..len {
            let node = self.points[(start + k) % len].1;
            if node == last {
                continue;
            }
            last = node;
            if !skip(node as usize) {
                return Some(node as usize);
            }
            looked += 1;
            if looked > self.nodes * 4 {
                break;
            }
        }
        // Rings with few nodes interleave them; fall back to a plain scan.
        (0..self.nodes).find(|&i| !skip(i) && self.points.iter().any(|p| p.1 as usize == i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<String> {
        (0..10_000).map(|i| format!("user-{i}")).collect()
    }

    #[test]
    fn same_key_same_node() {
        let ring = Ring::new(&[("a:1", 1), ("b:1", 1), ("c:1", 1)]);
        for k in keys().iter().take(100) {
            let first = ring.pick(k.as_bytes(), &|_| false);
            assert_eq!(first, ring.pick(k.as_bytes(), &|_| false));
        }
    }

    #[test]
    fn distribution_follows_weights() {
        let ring = Ring::new(&[("a:1", 1), ("b:1", 2), ("c:1", 1)]);
        let mut counts = [0usize; 3];
        for k in keys() {
            counts[ring.pick(k.as_bytes(), &|_| false).unwrap()] += 1;
        }
        let share = |c: usize| c as f64 / 10_000.0;
        assert!((share(counts[1]) - 0.5).abs() < 0.08, "{counts:?}");
        assert!((share(counts[0]) - 0.25).abs() < 0.08, "{counts:?}");
    }

    #[test]
    fn adding_a_node_moves_few_keys() {
        let before = Ring::new(&[("a:1", 1), ("b:1", 1), ("c:1", 1), ("d:1", 1)]);
        let after = Ring::new(&[("a:1", 1), ("b:1", 1), ("c:1", 1), ("d:1", 1), ("e:1", 1)]);
        let moved = keys()
            .iter()
            .filter(|k| {
                before.pick(k.as_bytes(), &|_| false) != after.pick(k.as_bytes(), &|_| false)
            })
            .count();
        // Ideal is 1/5 of the keys; allow some slack, far below a rehash's ~80%.
        assert!(moved < 3_000, "moved {moved} of 10000");
        assert!(moved > 1_000, "moved {moved} of 10000");
    }

    #[test]
    fn skipped_node_passes_its_keys_to_others_only() {
        let ring = Ring::new(&[("a:1", 1), ("b:1", 1), ("c:1", 1)]);
        for k in keys().iter().take(1000) {
            let normal = ring.pick(k.as_bytes(), &|_| false).unwrap();
            let without_b = ring.pick(k.as_bytes(), &|i| i == 1).unwrap();
            assert_ne!(without_b, 1);
            if normal != 1 {
                assert_eq!(normal, without_b, "keys not on the skipped node stay put");
            }
        }
        assert_eq!(ring.pick(b"x", &|_| true), None);
    }
}
