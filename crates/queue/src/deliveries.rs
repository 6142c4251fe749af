//! Webhooks that survive a restart: a job with a `callback_url` that
//! ends leaves a delivery due, stored with its end (one transaction on
//! the embedded queue, one script on Redis). Each node sends what is due
//! and stores the outcome: delivered, given up, or due again later.
//! Deliveries are at least once: a node that stops between the receiver's
//! 2xx and storing it sends again (`X-Turnpike-Request-Id` tells).

use std::sync::Arc;
use std::time::Duration;

use crate::{Backend, Deliver, Queue, Refused};

/// Attempts at delivering a webhook; the wait doubles from 1 s between.
pub(crate) const ATTEMPTS: u32 = 6;
/// The most deliveries taken at once (more are taken at once after).
pub(crate) const BATCH: usize = 64;
/// A delivery taken by a node and not settled within this is due again
/// (the node stopped): only the shared queue needs it.
pub(crate) const LEASE: Duration = Duration::from_secs(60);

/// When the next attempt is due after `failed` attempts failed.
pub(crate) fn backoff(failed: u32) -> Duration {
    Duration::from_secs(1 << failed.saturating_sub(1).min(10))
}

impl Queue {
    /// Sends the webhooks due, until the queue is dropped: woken by ends
    /// on this node, and every second for retries and other nodes' ends.
    pub async fn deliveries(self: Arc<Self>, send: Deliver) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.delivery_wake().notified() => {}
            }
            let due = match self.due().await {
                Ok(due) => due,
                Err(e) => {
                    tracing::debug!("async webhooks: {e:?}");
                    continue;
                }
            };
            if due.len() == BATCH {
                self.delivery_wake().notify_one();
            }
            for (id, failed) in due {
                let sending = Sending(self.clone(), id);
                tokio::spawn(sending.deliver(send.clone(), failed));
            }
        }
    }
}

/// A delivery this node took: let go if its task ends unsettled (a panic).
struct Sending(Arc<Queue>, String);

impl Drop for Sending {
    fn drop(&mut self) {
        if let Backend::Embedded(e) = &self.0.backend {
            e.release(&self.1);
        }
    }
}

impl Sending {
    /// One attempt at one delivery, and its outcome stored.
    async fn deliver(self, send: Deliver, failed: u32) {
        let (queue, id) = (&self.0, self.1.as_str());
        let next = match queue.lookup(id).await {
            Ok(found) => match found.job() {
                // Swept: results with a webhook are kept at least as long
                // as its retries (see `async-request`), so this is rare.
                None => {
                    tracing::error!(request_id = %id, "async webhook: the result is gone (past its result_ttl); not sent");
                    None
                }
                Some(job) => {
                    let url = job.callback.as_ref().map_or("", |c| c.url.as_str());
                    match send(job, &found).await {
                        Ok(()) => None,
                        Err(why) if failed + 1 >= ATTEMPTS => {
                            tracing::error!(request_id = %id, "async webhook to {url}: {why}; gave up after {ATTEMPTS} attempts");
                            None
                        }
                        Err(why) => {
                            let pause = backoff(failed + 1);
                            tracing::warn!(request_id = %id, "async webhook to {url}: {why}; again in {pause:?}");
                            Some(failed + 1)
                        }
                    }
                }
            },
            Err(e) => {
                tracing::warn!(request_id = %id, "async webhook: cannot read the result: {e:?}");
                Some(failed)
            }
        };
        if let Err(e) = queue.settle(id, next).await {
            tracing::warn!(request_id = %id, "async webhook: cannot store the delivery's outcome: {e:?}");
        }
    }
}

impl Queue {
    fn delivery_wake(&self) -> &tokio::sync::Notify {
        match &self.backend {
            Backend::Embedded(e) => &e.delivery,
            Backend::Cluster(c) => &c.delivery,
        }
    }

    /// The deliveries due now, each with its failed attempts, taken by
    /// this node.
    async fn due(&self) -> Result<Vec<(String, u32)>, Refused> {
        match &self.backend {
            Backend::Embedded(e) => {
                let e = e.clone();
                tokio::task::spawn_blocking(move || e.due())
                    .await
                    .map_err(crate::fail)?
            }
            Backend::Cluster(c) => c.due().await,
        }
    }

    /// Stores a delivery's outcome: done (`None`), or failed so many
    /// times and due again after [`backoff`].
    async fn settle(&self, id: &str, failed: Option<u32>) -> Result<(), Refused> {
        match &self.backend {
            Backend::Embedded(e) => {
                let (e, id) = (e.clone(), id.to_owned());
                tokio::task::spawn_blocking(move || e.settle(&id, failed))
                    .await
                    .map_err(crate::fail)?
            }
            Backend::Cluster(c) => c.settle(id, failed).await,
        }
    }
}
