//! Idle keep-alive connections, per worker thread and per destination:
//! the warmest connection is taken first, the oldest evicted first. One
//! piece serves both of the gateway's HTTP/1.1 clients (hyper's, for
//! requests with bodies and TLS, and `h1`, for the rest).

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use turnpike_config::Keepalive;

use crate::clock;

pub(crate) struct IdlePool<K, C> {
    by_key: HashMap<K, VecDeque<Entry<C>>>,
}

struct Entry<C> {
    conn: C,
    since: Instant,
    idle_timeout: Duration,
}

impl<K: Hash + Eq, C> Default for IdlePool<K, C> {
    fn default() -> Self {
        IdlePool {
            by_key: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq, C> IdlePool<K, C> {
    /// Keeps `conn` for reuse, within `keepalive.size` per destination;
    /// connections past `idle_timeout` are dropped on the way.
    pub(crate) fn put(&mut self, key: K, conn: C, keepalive: &Keepalive) {
        let now = clock::now();
        let list = self.by_key.entry(key).or_default();
        while list
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.since) >= keepalive.idle_timeout)
        {
            list.pop_front();
        }
        if list.len() >= keepalive.size {
            list.pop_front();
        }
        list.push_back(Entry {
            conn,
            since: now,
            idle_timeout: keepalive.idle_timeout,
        });
    }

    /// Drops every idle connection to `key` (the node closed one: it has
    /// likely closed the others too).
    pub(crate) fn clear<Q>(&mut self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.by_key.remove(key);
    }

    /// Closes connections past their idle time and forgets empty
    /// destinations, so a node that no longer gets traffic holds no sockets.
    pub(crate) fn sweep(&mut self) {
        let now = clock::now();
        self.by_key.retain(|_, list| {
            list.retain(|e| now.saturating_duration_since(e.since) < e.idle_timeout);
            !list.is_empty()
        });
    }

    /// The warmest connection idle for less than `idle_timeout` that
    /// `usable` accepts (it is told how long the connection has been idle);
    /// the ones it refuses are dropped.
    pub(crate) fn take<Q>(
        &mut self,
        key: &Q,
        idle_timeout: Duration,
        usable: impl Fn(&C, Duration) -> bool,
    ) -> Option<C>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let list = self.by_key.get_mut(key)?;
        let now = clock::now();
        while let Some(e) = list.pop_back() {
            let idle_for = now.saturating_duration_since(e.since);
            if idle_for < idle_timeout && usable(&e.conn, idle_for) {
                return Some(e.conn);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keepalive(size: usize, idle_ms: u64) -> Keepalive {
        Keepalive {
            size,
            idle_timeout: Duration::from_millis(idle_ms),
            requests: 100,
        }
    }

    #[test]
    fn warmest_first_and_size_bounded() {
        let mut pool = IdlePool::default();
        let k = keepalive(2, 60_000);
        for conn in 1..=3 {
            pool.put("a", conn, &k);
        }
        assert_eq!(pool.take(&"a", k.idle_timeout, |_, _| true), Some(3));
        assert_eq!(pool.take(&"a", k.idle_timeout, |_, _| true), Some(2));
        assert_eq!(
            pool.take(&"a", k.idle_timeout, |_, _| true),
            None,
            "the oldest was evicted"
        );
        assert_eq!(pool.take(&"b", k.idle_timeout, |_, _| true), None);
    }

    #[test]
    fn sweep_closes_expired_and_forgets_empty_keys() {
        let mut pool = IdlePool::default();
        pool.put("old", 1, &keepalive(8, 1));
        pool.put("new", 2, &keepalive(8, 60_000));
        std::thread::sleep(Duration::from_millis(5));
        pool.sweep();
        assert_eq!(pool.by_key.len(), 1);
        assert_eq!(
            pool.take(&"new", Duration::from_secs(60), |_, _| true),
            Some(2)
        );
        pool.clear(&"new");
        assert!(pool.by_key.is_empty());
    }

    #[test]
    fn refused_and_expired_connections_are_dropped() {
        let mut pool = IdlePool::default();
        let k = keepalive(8, 60_000);
        pool.put("a", 1, &k);
        pool.put("a", 2, &k);
        assert_eq!(pool.take(&"a", k.idle_timeout, |c, _| *c == 1), Some(1));
        assert_eq!(pool.take(&"a", k.idle_timeout, |_, _| true), None);
        pool.put("a", 3, &k);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(pool.take(&"a", Duration::from_millis(1), |_, _| true), None);
    }
}
