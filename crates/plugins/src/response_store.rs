//! Stored copies of upstream responses, for `proxy-cache` and
//! api-breaker's cached fallback: what may be stored, and a store bounded
//! in bytes.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, CACHE_CONTROL, CONTENT_LENGTH, SET_COOKIE, VARY};
use http::StatusCode;
use turnpike_plugin::{Head, Reply};

/// A stored response.
pub(crate) struct Stored {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stored: Instant,
    pub ttl: Duration,
}

impl Stored {
    pub(crate) fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored)
    }

    /// The copy as an answer, marked with `header: value`.
    pub(crate) fn reply(&self, header: &HeaderName, value: &'static str) -> Reply {
        let mut reply = Reply {
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
        };
        reply
            .headers
            .insert(header.clone(), http::HeaderValue::from_static(value));
        reply
    }

    fn size(&self, key: &str) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        key.len() + headers + self.body.len() + 128
    }
}

/// Whether a response may be stored for other clients at all, whatever
/// the plugin's settings: never one that sets a cookie, is marked
/// `private` or `no-store`, or varies on everything. Its body must have a
/// declared length within `max_body`, so a stream (server-sent events, a
/// download) is never held back to be copied.
pub(crate) fn storable(head: &Head, max_body: usize) -> bool {
    let declared = head
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let control = head
        .headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .any(|d| d == "private" || d == "no-store" || d.starts_with("private="));
    let varies_on_all = head.headers.get_all(VARY).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|f| f.trim() == "*"))
    });
    head.body.is_none()
        && declared.is_some_and(|n| n <= max_body)
        && !head.headers.contains_key(SET_COOKIE)
        && !control
        && !varies_on_all
}

/// Whether a header belongs to one exchange rather than to the resource:
/// the request id, rate-limit quotas, CORS answers, the cache status.
/// Such headers are neither stored nor replaced by a stored copy's.
pub(crate) fn per_request(name: &HeaderName) -> bool {
    let n = name.as_str();
    n == "x-request-id"
        || n.starts_with("x-ratelimit-")
        || n.starts_with("access-control-")
        || n == "apisix-cache-status"
        || n == "x-turnpike-fallback"
        || n == "age"
}

/// The headers of a response worth storing.
pub(crate) fn stored_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !per_request(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Puts a stored copy in place of `head`, keeping the exchange's own
/// headers (request id, quotas, CORS).
pub(crate) fn replace(head: &mut Head, stored: &Stored) {
    let mut headers = stored.headers.clone();
    for (name, value) in &head.headers {
        if per_request(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    *head = Head {
        status: stored.status,
        headers,
        body: Some(stored.body.clone()),
        whole: true,
    };
}

/// Responses by key, at most `max_bytes` in all, in shards each with its
/// share; the oldest stored entries go first.
pub(crate) struct Store {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Arc<str>, Arc<Stored>>,
    /// Keys in the order stored; a key stored again appears again, and its
    /// older place is skipped. Compacted when it outgrows the map.
    order: VecDeque<(Arc<str>, Instant)>,
    bytes: usize,
    max_bytes: usize,
}

/// Shards at most; each holds at least [`MIN_SHARD_BYTES`], so a store
/// can keep a response of up to that size whatever its total.
const SHARDS: usize = 16;
const MIN_SHARD_BYTES: usize = 4 * 1024 * 1024;

impl Store {
    pub(crate) fn new(max_bytes: usize) -> Store {
        let count = (max_bytes / MIN_SHARD_BYTES).clamp(1, SHARDS);
        let shards = (0..count)
            .map(|_| {
                Mutex::new(Shard {
                    max_bytes: max_bytes / count,
                    ..Shard::default()
                })
            })
            .collect();
        Store {
            shards,
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let i = self.hasher.hash_one(key) as usize % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<Stored>> {
        self.shard(key).map.get(key).cloned()
    }

    pub(crate) fn put(&self, key: Arc<str>, stored: Stored) {
        let size = stored.size(&key);
        let mut shard = self.shard(&key);
        if size > shard.max_bytes {
            return;
        }
        let at = stored.stored;
        if let Some(old) = shard.map.insert(key.clone(), Arc::new(stored)) {
            shard.bytes -= old.size(&key);
        }
        shard.bytes += size;
        shard.order.push_back((key, at));
        shard.evict();
        if shard.order.len() > 2 * shard.map.len() + 16 {
            shard.compact();
        }
    }
}

impl Shard {
    fn is_current(&self, key: &str, at: Instant) -> bool {
        self.map.get(key).is_some_and(|s| s.stored == at)
    }

    /// Drops the oldest entries until the shard fits.
    fn evict(&mut self) {
        while self.bytes > self.max_bytes {
            let Some((oldest, at)) = self.order.pop_front() else {
                break;
            };
            if self.is_current(&oldest, at) {
                if let Some(gone) = self.map.remove(&oldest) {
                    self.bytes -= gone.size(&oldest);
                }
            }
        }
    }

    /// Forgets the places of keys stored again since.
    fn compact(&mut self) {
        let order = std::mem::take(&mut self.order);
        self.order = order
            .into_iter()
            .filter(|(key, at)| self.is_current(key, *at))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn stored(len: usize) -> Stored {
        Stored {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; len]),
            stored: Instant::now(),
            ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn the_store_keeps_within_its_size_and_its_index_compact() {
        let store = Store::new(64 * 1024);
        assert_eq!(store.shards.len(), 1, "small stores are one shard");
        for i in 0..1000 {
            store.put(format!("k{i}").into(), stored(500));
        }
        let total: usize = store.shards.iter().map(|s| s.lock().unwrap().bytes).sum();
        assert!(total <= 64 * 1024, "{total}");
        assert!(store.get("k999").is_some(), "the newest stays");
        assert!(store.get("k0").is_none(), "the oldest went");
        for _ in 0..10_000 {
            store.put("same".into(), stored(10));
        }
        let order: usize = store
            .shards
            .iter()
            .map(|s| s.lock().unwrap().order.len())
            .sum();
        assert!(
            order < 1000,
            "refreshing one key does not grow the index: {order}"
        );
        let big = Store::new(16 * 1024 * 1024);
        big.put("one-mib".into(), stored(1024 * 1024));
        assert!(
            big.get("one-mib").is_some(),
            "a 1 MiB body fits a 16 MiB store"
        );
    }

    #[test]
    fn private_responses_are_never_stored() {
        let head = |pairs: &[(&str, &str)]| {
            let mut h = Head::default();
            h.headers.insert(CONTENT_LENGTH, HeaderValue::from(3));
            for (k, v) in pairs {
                h.headers.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            h
        };
        assert!(storable(&head(&[]), 10));
        assert!(!storable(&head(&[("set-cookie", "sid=1")]), 10));
        assert!(!storable(
            &head(&[("cache-control", "max-age=5, private")]),
            10
        ));
        assert!(!storable(&head(&[("cache-control", "no-store")]), 10));
        assert!(!storable(&head(&[("vary", "accept, *")]), 10));
        assert!(!storable(&head(&[]), 2), "larger than allowed");
        let mut stream = head(&[]);
        stream.headers.remove(CONTENT_LENGTH);
        assert!(!storable(&stream, 10), "no declared length: a stream");
    }

    #[test]
    fn per_request_headers_stay_with_their_exchange() {
        let mut upstream = HeaderMap::new();
        upstream.insert("etag", HeaderValue::from_static("\"1\""));
        upstream.insert("x-ratelimit-remaining", HeaderValue::from_static("4"));
        upstream.insert("x-request-id", HeaderValue::from_static("old"));
        let kept = stored_headers(&upstream);
        assert_eq!(kept.len(), 1);
        let copy = Stored {
            headers: kept,
            ..stored(1)
        };
        let mut head = Head::default();
        head.headers
            .insert("x-request-id", HeaderValue::from_static("new"));
        head.headers
            .insert("server", HeaderValue::from_static("failing"));
        replace(&mut head, &copy);
        assert_eq!(head.headers["x-request-id"], "new");
        assert_eq!(head.headers["etag"], "\"1\"");
        assert!(head.headers.get("server").is_none());
    }
}
