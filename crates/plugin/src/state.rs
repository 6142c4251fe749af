//! State that outlives a snapshot: rate-limit counters, breaker states,
//! caches. Plugin instances are rebuilt on every reload; what they count
//! must not be. An instance asks [`crate::Env::state`] for its state by
//! key while it is built and keeps the `Arc`, so requests never look it
//! up. The store holds only weak references: state lives exactly as long
//! as some snapshot still uses it.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

type Held = Weak<dyn Any + Send + Sync>;

/// Every plugin's state, by key, for the whole process.
#[derive(Default)]
pub(crate) struct States {
    by_key: Mutex<HashMap<String, Held>>,
}

impl States {
    /// The state at `key`, made by `make` if no live snapshot holds one.
    /// A value of another type at the same key is replaced.
    pub fn get<T: Any + Send + Sync>(&self, key: &str, make: impl FnOnce() -> T) -> Arc<T> {
        // Only the config compiler takes this lock, never a request.
        let mut map = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(live) = map.get(key).and_then(Weak::upgrade) {
            if let Ok(state) = live.downcast::<T>() {
                return state;
            }
        }
        let state = Arc::new(make());
        let erased: Arc<dyn Any + Send + Sync> = state.clone();
        map.insert(key.to_owned(), Arc::downgrade(&erased));
        state
    }

    /// Forgets the keys no snapshot holds any more.
    pub fn prune(&self) {
        let mut map = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, held| held.strong_count() > 0);
    }

    /// How many keys are held (live or not yet pruned).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_key.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn state_lives_while_held_and_is_shared_by_key() {
        let states = States::default();
        let a = states.get("k", || AtomicU32::new(1));
        a.fetch_add(1, Ordering::Relaxed);
        let b = states.get("k", || AtomicU32::new(100));
        assert_eq!(
            b.load(Ordering::Relaxed),
            2,
            "the same key gives the same state"
        );
        let other = states.get("other", || AtomicU32::new(7));
        assert_eq!(other.load(Ordering::Relaxed), 7);
        drop((a, b));
        let fresh = states.get("k", || AtomicU32::new(100));
        assert_eq!(
            fresh.load(Ordering::Relaxed),
            100,
            "dropped state is made anew"
        );
        drop(other);
        states.prune();
        assert_eq!(states.len(), 1, "only `k` is still held");
        let typed = states.get("k", || String::from("another type"));
        assert_eq!(*typed, "another type");
    }
}
