//! A coarse clock for the request path.
//!
//! Reading the clock is not free (on the virtual machines we measured,
//! `clock_gettime` took a tenth of the proxy's CPU at a handful of reads
//! per request). Like nginx's cached time, each worker refreshes one
//! timestamp every few milliseconds and the request path reads that:
//! pool idle times and timeout deadlines are then up to `TICK` late, which
//! no timeout measured in seconds notices.

use std::cell::Cell;
use std::time::{Duration, Instant};

pub(crate) const TICK: Duration = Duration::from_millis(10);

thread_local! {
    static NOW: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The worker's cached time; the real time on a thread without a ticker.
pub(crate) fn now() -> Instant {
    NOW.with(Cell::get).unwrap_or_else(Instant::now)
}

/// Keeps this thread's cached time fresh; run once per worker runtime.
pub(crate) async fn tick() {
    loop {
        NOW.with(|c| c.set(Some(Instant::now())));
        tokio::time::sleep(TICK).await;
    }
}

/// A deadline `after` from the cached time, for `tokio::time::timeout_at`.
pub(crate) fn deadline(after: Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(now() + after)
}
