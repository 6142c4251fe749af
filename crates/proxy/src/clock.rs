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

/// Keeps this thread's cached time fresh, and once a second closes the
/// worker's expired idle upstream connections; run once per worker runtime.
pub(crate) async fn tick() {
    let mut ticks = 0u32;
    loop {
        NOW.with(|c| c.set(Some(Instant::now())));
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(100) {
            crate::h1::sweep();
            crate::pool::sweep();
        }
        tokio::time::sleep(TICK).await;
    }
}

/// A deadline `after` from the cached time, for `tokio::time::timeout_at`.
pub(crate) fn deadline(after: Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(now() + after)
}

/// A timeout between two events of a stream (nginx's read and send
/// timeouts): [`IdleTimer::poll_expired`] is called when the stream has to
/// wait, [`IdleTimer::progress`] when it moves. The timer is allocated only
/// the first time a wait happens, then reset and reused, so a stream that
/// never waits never touches the timer wheel.
pub(crate) struct IdleTimer {
    limit: Duration,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl IdleTimer {
    pub(crate) fn new(limit: Duration) -> IdleTimer {
        IdleTimer {
            limit,
            sleep: None,
            armed: false,
        }
    }

    /// The stream moved: the next wait starts a new period.
    pub(crate) fn progress(&mut self) {
        self.armed = false;
    }

    /// The stream has to wait: ready once it has waited longer than the limit.
    pub(crate) fn poll_expired(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use std::future::Future;
        let at = deadline(self.limit);
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if !self.armed {
            sleep.as_mut().reset(at);
            self.armed = true;
        }
        sleep.as_mut().poll(cx)
    }
}
