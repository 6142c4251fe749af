//! The asynchronous request mode's queue: a request is accepted (answered
//! 202 with an id) only once it is stored durably; workers take each
//! route's requests in FIFO order, at most `concurrency` at a time per
//! route, and store the upstream's answer for `result_ttl`.
//!
//! [`Queue`] is the one face of two stores (`gateway.queue`):
//! - `embedded` ([`embedded`]): redb in `data_dir`, this node alone. A job
//!   is fsynced before [`Queue::submit`] returns, and jobs not finished
//!   before a crash run again at the next start.
//! - `redis` ([`cluster`]): one queue shared by every node (Redis Streams
//!   and a consumer group per route); a dead node's running jobs are
//!   taken over by another.
//!
//! Either way a job is *done* only once its result is stored, and a crash
//! in the middle of an upstream call repeats that call (at-least-once; the
//! job id travels as `X-Request-Id` so a service can tell). A job whose
//! `ttl` passes before a worker takes it is marked expired and never
//! executed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use cluster::Cluster;
use embedded::Embedded;

/// Told to every waiter instead of a job id: look again (after a broken
/// subscription, say).
const EVERYONE: &str = "*";

/// Where results are read: `GET {RESULT_PREFIX}{id}` on the proxy.
pub const RESULT_PREFIX: &str = "/turnpike/async/";

/// A request to run later, as the gateway accepted it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub route: String,
    /// The consumer that submitted it, if it authenticated.
    pub consumer: Option<String>,
    /// Whether anyone holding the id may read the result.
    pub public: bool,
    pub method: String,
    /// Path and query, as the plugins before left them.
    pub uri: String,
    /// The client's `Host` (or HTTP/2 authority), and the one a plugin
    /// chose for the upstream.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub upstream_host: Option<String>,
    /// The client's address and scheme, for `X-Forwarded-*`.
    #[serde(default)]
    pub remote: Option<String>,
    #[serde(default)]
    pub scheme: Option<String>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Unix milliseconds.
    pub submitted: u64,
    /// Unix milliseconds after which it is not executed.
    pub expires: u64,
    /// Seconds the result is kept after the job ends.
    pub result_ttl: u64,
    /// The longest result body kept; a longer one is cut (and marked so).
    pub max_result_bytes: usize,
    /// The most requests of this route run at once.
    pub concurrency: u32,
    pub idempotency_key: Option<String>,
    /// Where to POST the outcome when the job ends.
    #[serde(default)]
    pub callback: Option<Callback>,
}

/// A webhook: the outcome is POSTed to `url`, signed with `secret`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Callback {
    pub url: String,
    pub secret: Option<String>,
    /// Whether an `https://` receiver's certificate is checked.
    #[serde(default = "yes")]
    pub verify: bool,
}

fn yes() -> bool {
    true
}

/// A stored answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Whether the body was cut at the route's `max_result_bytes`.
    pub truncated: bool,
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Done,
    Expired,
}

/// A waiting job's status (`None` once it ended).
fn waiting_status(found: &Found) -> Option<Status> {
    match found {
        Found::Waiting { status, .. } => Some(status.clone()),
        _ => None,
    }
}

/// What a status query finds.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    Unknown,
    /// Queued (with the number of jobs before it in its route) or running.
    Waiting {
        job: Job,
        status: Status,
        ahead: usize,
    },
    Done {
        job: Job,
        answer: Answer,
        body: Bytes,
        finished: u64,
    },
    Expired {
        job: Job,
    },
}

impl Found {
    pub fn job(&self) -> Option<&Job> {
        match self {
            Found::Unknown => None,
            Found::Waiting { job, .. } | Found::Done { job, .. } | Found::Expired { job } => {
                Some(job)
            }
        }
    }

    /// Whether the job has ended (done or expired) or is unknown.
    pub fn settled(&self) -> bool {
        !matches!(self, Found::Waiting { .. })
    }
}

/// Why a job was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The route has `max_queue` jobs waiting.
    Full,
    /// The store failed; the message says how.
    Store(String),
}

/// The outcome of [`Queue::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    /// An earlier job with the same idempotency key, returned instead.
    pub repeated: bool,
}

/// What the worker did with a job: the answer and its (possibly cut) body.
pub struct Outcome {
    pub answer: Answer,
    pub body: Bytes,
}

impl Outcome {
    /// The gateway's own answer: `{"error_msg": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Outcome {
        Outcome {
            answer: Answer {
                status,
                headers: vec![("content-type".into(), b"application/json".to_vec())],
                truncated: false,
            },
            body: Bytes::from(serde_json::json!({ "error_msg": message }).to_string()),
        }
    }
}

/// One webhook attempt for an ended job (what [`Queue::lookup`] found of
/// it): `Err` says why it failed. The queue keeps the deliveries due and
/// calls this (see [`deliveries`]).
pub type Deliver = Arc<
    dyn Fn(
            &Job,
            &Found,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// Runs one job (the gateway sends it upstream).
pub type Executor = Arc<
    dyn Fn(Job, Bytes) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>
        + Send
        + Sync,
>;

fn fail(e: impl std::fmt::Display) -> Refused {
    Refused::Store(e.to_string())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A job id: 32 hex digits from the system's secure random source (the
/// id is what guards results of requests made without a consumer).
pub fn new_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // The OS random source failing is not recoverable in any useful way.
        bytes = fastrand::u128(..).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The idempotency key's entry: per route, and per consumer (or, for
/// requests without one, per client address).
fn idempotency(job: &Job) -> Option<String> {
    let key = job.idempotency_key.as_ref()?;
    let who = match (&job.consumer, &job.remote) {
        (Some(c), _) => format!("consumer {c}"),
        (None, Some(addr)) => format!(
            "client {}",
            addr.rsplit_once(':').map_or(addr.as_str(), |(ip, _)| ip)
        ),
        (None, None) => return None,
    };
    Some(format!("{}\n{who}\n{key}", job.route))
}

/// Where the gateway's queue lives.
#[derive(Debug, Clone, PartialEq)]
pub enum Place {
    /// In `data_dir`, for this node alone (`gateway.queue: embedded`).
    Dir(PathBuf),
    /// In Redis, shared by every node (`gateway.queue: redis`, at
    /// `gateway.redis.url`).
    Redis(String),
}

/// The gateway's queue, once it runs (the plugin finds it here).
static INSTALLED: std::sync::OnceLock<Arc<Queue>> = std::sync::OnceLock::new();

/// Where and how the gateway's queue runs, set at start.
struct Setup {
    place: Place,
    runtime: tokio::runtime::Handle,
    exec: Executor,
    deliver: Deliver,
}

static SETUP: std::sync::OnceLock<Setup> = std::sync::OnceLock::new();

/// Says where the gateway's queue lives and how jobs run. A shared queue
/// opens now (this node works for the cluster and reads its results); an
/// embedded one opens now if it holds jobs from an earlier run (so they
/// run again), else on first use: a gateway without asynchronous routes
/// never creates its file.
pub fn configure(place: Place, runtime: tokio::runtime::Handle, exec: Executor, deliver: Deliver) {
    let now = match &place {
        Place::Dir(dir) => dir.join(embedded::FILE).exists(),
        Place::Redis(_) => true,
    };
    let setup = Setup {
        place,
        runtime,
        exec,
        deliver,
    };
    if SETUP.set(setup).is_ok() && now {
        let _ = installed();
    }
}

/// The gateway's queue if it is open, without opening it (readers: a
/// gateway that never queued has no results).
pub fn running() -> Option<Arc<Queue>> {
    INSTALLED.get().cloned()
}

/// The gateway's queue, opened (and its workers started) on first use;
/// `None` when it is not configured or cannot open (logged).
pub fn installed() -> Option<Arc<Queue>> {
    if let Some(q) = INSTALLED.get() {
        return Some(q.clone());
    }
    static OPENING: Mutex<()> = Mutex::new(());
    let _one = OPENING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(q) = INSTALLED.get() {
        return Some(q.clone());
    }
    let setup = SETUP.get()?;
    let opened = match &setup.place {
        Place::Dir(dir) => Embedded::open(dir).map(Backend::Embedded),
        Place::Redis(url) => Cluster::open(url).map(Backend::Cluster),
    };
    match opened {
        Ok(backend) => {
            let queue = Arc::new(Queue { backend });
            setup.runtime.spawn(queue.clone().run(setup.exec.clone()));
            setup
                .runtime
                .spawn(queue.clone().deliveries(setup.deliver.clone()));
            Some(INSTALLED.get_or_init(|| queue).clone())
        }
        Err(e) => {
            tracing::error!("async queue: {e}");
            None
        }
    }
}

/// The queue, embedded or shared: what the plugin and the proxy use.
pub struct Queue {
    backend: Backend,
}

enum Backend {
    Embedded(Arc<Embedded>),
    Cluster(Arc<Cluster>),
}

impl Queue {
    /// The queue shared through the Redis at `url` (see [`Cluster::open`]).
    pub fn open_shared(url: &str) -> Result<Arc<Queue>, String> {
        Ok(Queue::over(Backend::Cluster(Cluster::open(url)?)))
    }

    fn over(backend: Backend) -> Arc<Queue> {
        Arc::new(Queue { backend })
    }

    /// Stores a job; returns its id once it is durable (the same
    /// idempotency key from the same consumer on the same route returns
    /// the first job's id while that job is kept); `Full` past `max_queue`
    /// jobs waiting in the route.
    pub async fn submit(
        &self,
        job: Job,
        body: Bytes,
        max_queue: usize,
    ) -> Result<Accepted, Refused> {
        match &self.backend {
            Backend::Embedded(e) => {
                let e = e.clone();
                tokio::task::spawn_blocking(move || e.submit(job, body, max_queue))
                    .await
                    .unwrap_or_else(|e| Err(fail(e)))
            }
            Backend::Cluster(c) => c.submit(job, body, max_queue).await,
        }
    }

    /// Where job `id` is.
    pub async fn lookup(&self, id: &str) -> Result<Found, Refused> {
        match &self.backend {
            Backend::Embedded(e) => e.lookup(id).await,
            Backend::Cluster(c) => c.find(id).await,
        }
    }

    /// Runs jobs with `exec` until the queue is dropped.
    pub async fn run(self: Arc<Self>, exec: Executor) {
        match &self.backend {
            Backend::Embedded(e) => e.clone().run(exec).await,
            Backend::Cluster(c) => c.clone().run(exec).await,
        }
    }

    /// The Redis a shared queue lives in (`None` when embedded).
    pub fn redis_address(&self) -> Option<&str> {
        match &self.backend {
            Backend::Embedded(_) => None,
            Backend::Cluster(c) => Some(c.address()),
        }
    }

    /// Whether the queue's store answers (an embedded one always does).
    pub fn up(&self) -> bool {
        match &self.backend {
            Backend::Embedded(_) => true,
            Backend::Cluster(c) => c.up(),
        }
    }

    /// Told the id of each job that starts or ends (on any node).
    fn subscribe(&self) -> broadcast::Receiver<String> {
        match &self.backend {
            Backend::Embedded(e) => e.ended.subscribe(),
            Backend::Cluster(c) => c.ended.subscribe(),
        }
    }

    /// Waits up to `wait` for job `id` to end; returns what is found then.
    pub async fn wait(&self, id: &str, wait: Duration) -> Result<Found, Refused> {
        self.wait_until(id, wait, Found::settled).await
    }

    /// Waits up to `wait` for job `id` to end or to change state from
    /// `from` (queued to running); returns what is found then.
    pub async fn wait_change(
        &self,
        id: &str,
        from: &Found,
        wait: Duration,
    ) -> Result<Found, Refused> {
        let before = waiting_status(from);
        self.wait_until(id, wait, |f| f.settled() || waiting_status(f) != before)
            .await
    }

    /// Waits up to `wait` until what is found of job `id` is `done`, waking
    /// when some job starts or ends (and when a queued one may expire).
    async fn wait_until(
        &self,
        id: &str,
        wait: Duration,
        done: impl Fn(&Found) -> bool,
    ) -> Result<Found, Refused> {
        let mut ended = self.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let found = self.lookup(id).await?;
            if done(&found) {
                return Ok(found);
            }
            // A queued job may expire before any job ends: wake for that.
            let wake = match &found {
                Found::Waiting {
                    job,
                    status: Status::Queued,
                    ..
                } => {
                    let left = Duration::from_millis(job.expires.saturating_sub(now_ms()) + 1);
                    deadline.min(tokio::time::Instant::now() + left)
                }
                _ => deadline,
            };
            loop {
                match tokio::time::timeout_at(wake, ended.recv()).await {
                    Ok(Ok(ended_id)) if ended_id != id && ended_id != EVERYONE => continue,
                    Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => break,
                    Ok(Err(broadcast::error::RecvError::Closed)) => return self.lookup(id).await,
                    Err(_) if tokio::time::Instant::now() >= deadline => {
                        return self.lookup(id).await
                    }
                    Err(_) => break,
                }
            }
        }
    }
}

mod cluster;
mod deliveries;
mod embedded;
mod metrics;
#[cfg(test)]
mod tests;
