//! The embedded queue: redb in `data_dir/queue.redb`, this node alone.
//!
//! Durability: a job and its body are one redb transaction (fsync) before
//! [`Embedded::submit`] returns. A job is *done* only once its result is
//! stored. At open, every job that is neither done nor expired is queued
//! again, in its original order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Notify};

use crate::{
    fail, idempotency, metrics, now_ms, Accepted, Answer, Executor, Found, Job, Outcome, Refused,
    Status,
};

/// Job id → JSON of [`Record`].
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// Job id → the request body.
const BODIES: TableDefinition<&str, &[u8]> = TableDefinition::new("bodies");
/// Job id → the result body.
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
/// `consumer\n key` → job id.
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
/// (keep until, job id) → the job's idempotency entry (or ""): ended jobs
/// in the order they are swept.
const ENDS: TableDefinition<(u64, &str), &str> = TableDefinition::new("ends");
/// Job id → its webhook's failed attempts and when the next is due.
const DELIVERIES: TableDefinition<&str, (u32, u64)> = TableDefinition::new("deliveries");
/// `seq` → the last sequence number given.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The most ended jobs one sweep removes.
const SWEEP_MAX: usize = 10_000;

/// The most jobs taken (read and marked running) together.
const TAKE_BATCH: usize = 64;

/// How often finished jobs past their `result_ttl` are removed.
const SWEEP: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    job: Job,
    /// Order of submission, across routes.
    seq: u64,
    status: Status,
    answer: Option<Answer>,
    /// Unix milliseconds.
    finished: Option<u64>,
}

impl Record {
    fn keep_until(&self) -> u64 {
        self.finished.unwrap_or(self.job.expires) + self.job.result_ttl * 1000
    }
}

#[derive(Default)]
struct Lane {
    /// Jobs waiting, oldest first.
    waiting: VecDeque<Waiting>,
    running: usize,
    concurrency: usize,
}

struct Waiting {
    id: String,
    /// Unix milliseconds.
    expires: u64,
    /// Taken by a worker before a crash: it runs again whatever its ttl,
    /// since its call may have reached the upstream.
    taken: bool,
}

/// The queue's file, in its directory.
pub(crate) const FILE: &str = "queue.redb";

/// A submission waiting for its group's commit.
struct Pending {
    job: Job,
    body: Bytes,
    max_queue: usize,
    reply: std::sync::mpsc::SyncSender<Result<Accepted, Refused>>,
}

/// A job's end waiting for its group's commit.
struct Ending {
    record: Record,
    outcome: Option<Outcome>,
    reply: std::sync::mpsc::SyncSender<Result<(), Refused>>,
}

/// Group commit: each kind of write has a thread of its own that takes
/// every item waiting, commits them in one transaction (one fsync for all),
/// and answers each through the item's reply. Ends with the queue.
struct Grouped<T> {
    tx: std::sync::mpsc::Sender<T>,
}

/// The most items one transaction takes.
const GROUP_MAX: usize = 1024;

impl<T: Send + 'static> Grouped<T> {
    fn start(name: &str, commit: impl Fn(Vec<T>) + Send + 'static) -> Grouped<T> {
        let (tx, rx) = std::sync::mpsc::channel::<T>();
        let spawned = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    while group.len() < GROUP_MAX {
                        match rx.try_recv() {
                            Ok(more) => group.push(more),
                            Err(_) => break,
                        }
                    }
                    commit(group);
                }
            });
        if let Err(e) = spawned {
            // Items then go unanswered, and each caller reports the loss.
            tracing::error!("async queue: cannot start the {name} thread: {e}");
        }
        Grouped { tx }
    }

    /// Hands the thread the item `make` builds around a reply channel, and
    /// waits for that reply; `what` names it if the thread drops it.
    fn ask<R>(
        &self,
        what: &str,
        make: impl FnOnce(std::sync::mpsc::SyncSender<Result<R, Refused>>) -> T,
    ) -> Result<R, Refused> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let _ = self.tx.send(make(reply));
        answer
            .recv()
            .unwrap_or_else(|_| Err(Refused::Store(format!("the {what} was lost"))))
    }
}

pub struct Embedded {
    db: Database,
    submissions: Grouped<Pending>,
    endings: Grouped<Ending>,
    lanes: Mutex<HashMap<String, Lane>>,
    running: Mutex<HashSet<String>>,
    work: Notify,
    pub(crate) ended: broadcast::Sender<String>,
    /// Told when a job with a webhook ends.
    pub(crate) delivery: Notify,
    /// Deliveries being sent now (not due again meanwhile).
    sending: Mutex<HashSet<String>>,
}

impl Embedded {
    /// Opens (or creates) the queue in `dir`; jobs that had not ended are
    /// queued again, in their order.
    pub fn open(dir: &Path) -> Result<Arc<Embedded>, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(FILE);
        let db =
            Database::create(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        for table in [RECORDS, BODIES, RESULTS] {
            txn.open_table(table).map_err(|e| e.to_string())?;
        }
        txn.open_table(IDEMPOTENCY).map_err(|e| e.to_string())?;
        txn.open_table(META).map_err(|e| e.to_string())?;
        txn.open_table(DELIVERIES).map_err(|e| e.to_string())?;
        let indexed = txn
            .list_tables()
            .map_err(|e| e.to_string())?
            .any(|t| t.name() == "ends");
        if !indexed {
            // A file from before the index: index what had ended.
            index_ends(&txn).map_err(|e| format!("{e:?}"))?;
        }
        txn.commit().map_err(|e| e.to_string())?;
        let queue = Arc::new_cyclic(|me: &std::sync::Weak<Embedded>| {
            let (submit, end) = (me.clone(), me.clone());
            Embedded {
                db,
                submissions: Grouped::start("async-accept", move |group| {
                    if let Some(q) = submit.upgrade() {
                        q.commit_group(group);
                    }
                }),
                endings: Grouped::start("async-result", move |group| {
                    if let Some(q) = end.upgrade() {
                        q.store_ends(group);
                    }
                }),
                lanes: Mutex::default(),
                running: Mutex::default(),
                work: Notify::new(),
                ended: broadcast::channel(1024).0,
                delivery: Notify::new(),
                sending: Mutex::default(),
            }
        });
        let requeued = queue.recover().map_err(|e| format!("{e:?}"))?;
        if requeued > 0 {
            tracing::info!("async queue: {requeued} accepted requests not finished before the last stop are queued again");
        }
        Ok(queue)
    }

    /// Rebuilds the lanes from the records not ended.
    fn recover(&self) -> Result<usize, Refused> {
        let txn = self.db.begin_read().map_err(fail)?;
        let records = txn.open_table(RECORDS).map_err(fail)?;
        let mut open: Vec<Record> = Vec::new();
        for entry in records.iter().map_err(fail)? {
            let (_, bytes) = entry.map_err(fail)?;
            let record: Record = serde_json::from_slice(bytes.value()).map_err(fail)?;
            if matches!(record.status, Status::Queued | Status::Running) {
                open.push(record);
            }
        }
        open.sort_by_key(|r| r.seq);
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        for r in &open {
            let lane = lanes.entry(r.job.route.clone()).or_default();
            lane.concurrency = r.job.concurrency.max(1) as usize;
            lane.waiting.push_back(Waiting {
                id: r.job.id.clone(),
                expires: r.job.expires,
                taken: r.status == Status::Running,
            });
        }
        Ok(open.len())
    }

    /// Stores a job; returns its id once it is durable. The same
    /// idempotency key from the same consumer on the same route returns
    /// the first job's id while that job is kept: the check and the store
    /// are one transaction.
    ///
    /// Submissions are committed in groups (see `Grouped`).
    pub fn submit(&self, job: Job, body: Bytes, max_queue: usize) -> Result<Accepted, Refused> {
        self.submissions.ask("submission", |reply| Pending {
            job,
            body,
            max_queue,
            reply,
        })
    }

    /// Stores a group of submissions in one transaction and answers each.
    fn commit_group(&self, group: Vec<Pending>) {
        let mut answers: Vec<(Pending, Result<Accepted, Refused>)> =
            Vec::with_capacity(group.len());
        let stored = self.store_group(group, &mut answers);
        for (p, answer) in answers {
            let answer = match (&stored, answer) {
                (Err(e), Ok(a)) if !a.repeated => Err(e.clone()),
                (_, answer) => answer,
            };
            if matches!(&answer, Ok(a) if !a.repeated) {
                let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
                let lane = lanes.entry(p.job.route.clone()).or_default();
                lane.concurrency = p.job.concurrency.max(1) as usize;
                let (id, expires) = (p.job.id.clone(), p.job.expires);
                lane.waiting.push_back(Waiting {
                    id,
                    expires,
                    taken: false,
                });
            }
            let _ = p.reply.send(answer);
        }
        self.work.notify_one();
        metrics::depth(self.depth());
    }

    /// Writes the group's jobs (answering repeats and full lanes at once);
    /// the error is the commit's.
    fn store_group(
        &self,
        group: Vec<Pending>,
        answers: &mut Vec<(Pending, Result<Accepted, Refused>)>,
    ) -> Result<(), Refused> {
        let txn = self.db.begin_write().map_err(fail)?;
        {
            let mut meta = txn.open_table(META).map_err(fail)?;
            let mut records = txn.open_table(RECORDS).map_err(fail)?;
            let mut bodies = txn.open_table(BODIES).map_err(fail)?;
            let mut idem = txn.open_table(IDEMPOTENCY).map_err(fail)?;
            let mut seq = meta.get("seq").map_err(fail)?.map_or(0, |v| v.value());
            let mut added: HashMap<String, usize> = HashMap::new();
            for p in group {
                let key = idempotency(&p.job);
                if let Some(key) = &key {
                    let first = idem
                        .get(key.as_str())
                        .map_err(fail)?
                        .map(|v| v.value().to_owned());
                    let kept = match &first {
                        Some(id) => records.get(id.as_str()).map_err(fail)?.is_some(),
                        None => false,
                    };
                    if let (Some(id), true) = (first, kept) {
                        answers.push((p, Ok(Accepted { id, repeated: true })));
                        continue;
                    }
                }
                let route_added = added.entry(p.job.route.clone()).or_default();
                if self.waiting(&p.job.route) + *route_added >= p.max_queue {
                    answers.push((p, Err(Refused::Full)));
                    continue;
                }
                *route_added += 1;
                seq += 1;
                let record = Record {
                    job: p.job.clone(),
                    seq,
                    status: Status::Queued,
                    answer: None,
                    finished: None,
                };
                let bytes = serde_json::to_vec(&record).map_err(fail)?;
                records
                    .insert(p.job.id.as_str(), bytes.as_slice())
                    .map_err(fail)?;
                bodies
                    .insert(p.job.id.as_str(), p.body.as_ref())
                    .map_err(fail)?;
                if let Some(key) = &key {
                    idem.insert(key.as_str(), p.job.id.as_str()).map_err(fail)?;
                }
                let id = p.job.id.clone();
                answers.push((
                    p,
                    Ok(Accepted {
                        id,
                        repeated: false,
                    }),
                ));
            }
            meta.insert("seq", seq).map_err(fail)?;
        }
        txn.commit().map_err(fail)
    }

    /// Jobs of `route` waiting for a worker.
    pub fn waiting(&self, route: &str) -> usize {
        let lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes.get(route).map_or(0, |l| l.waiting.len())
    }

    /// Jobs waiting, over every route.
    pub fn depth(&self) -> usize {
        let lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes.values().map(|l| l.waiting.len()).sum()
    }

    fn record(&self, id: &str) -> Result<Option<Record>, Refused> {
        let txn = self.db.begin_read().map_err(fail)?;
        let table = txn.open_table(RECORDS).map_err(fail)?;
        let found = table.get(id).map_err(fail)?;
        found
            .map(|b| serde_json::from_slice(b.value()).map_err(fail))
            .transpose()
    }

    /// Where job `id` is (reads the store: call it off the async threads,
    /// or use [`Embedded::lookup`]).
    pub fn find(&self, id: &str) -> Result<Found, Refused> {
        let Some(record) = self.record(id)? else {
            return Ok(Found::Unknown);
        };
        if record.keep_until() <= now_ms()
            && matches!(record.status, Status::Done | Status::Expired)
        {
            return Ok(Found::Unknown);
        }
        let (running, ahead) = self.place(&record.job.route, id);
        match record.status {
            Status::Done => {
                let txn = self.db.begin_read().map_err(fail)?;
                let results = txn.open_table(RESULTS).map_err(fail)?;
                let body = results
                    .get(id)
                    .map_err(fail)?
                    .map(|b| Bytes::copy_from_slice(b.value()))
                    .unwrap_or_default();
                let answer = record.answer.clone().unwrap_or(Answer {
                    status: 502,
                    headers: Vec::new(),
                    truncated: false,
                });
                Ok(Found::Done {
                    job: record.job,
                    answer,
                    body,
                    finished: record.finished.unwrap_or(0),
                })
            }
            Status::Expired => Ok(Found::Expired { job: record.job }),
            _ if running => Ok(Found::Waiting {
                job: record.job,
                status: Status::Running,
                ahead: 0,
            }),
            _ if record.job.expires <= now_ms() && record.status == Status::Queued => {
                Ok(Found::Expired { job: record.job })
            }
            _ => Ok(Found::Waiting {
                job: record.job,
                status: Status::Queued,
                ahead,
            }),
        }
    }

    /// [`Embedded::find`] on a blocking thread.
    pub async fn lookup(self: &Arc<Self>, id: &str) -> Result<Found, Refused> {
        let (queue, id) = (self.clone(), id.to_owned());
        tokio::task::spawn_blocking(move || queue.find(&id))
            .await
            .map_err(fail)?
    }

    /// Whether the job runs now, and how many wait before it.
    fn place(&self, route: &str, id: &str) -> (bool, usize) {
        if self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
        {
            return (true, 0);
        }
        let lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let ahead = lanes
            .get(route)
            .and_then(|l| l.waiting.iter().position(|w| w.id == id));
        (false, ahead.unwrap_or(0))
    }

    /// The jobs the lanes may start now (at most [`TAKE_BATCH`]), marked
    /// running together; expired ones are marked on the way. Blocking
    /// (reads and writes the store).
    fn next_batch(&self) -> Vec<(Job, Bytes)> {
        let picked = self.pick();
        if picked.is_empty() {
            return Vec::new();
        }
        let rows = match self.read_taken(&picked) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(
                    "async queue: cannot read taken jobs: {e:?}; they wait for the next round"
                );
                for (route, waiting) in picked.into_iter().rev() {
                    self.put_back(&route, waiting);
                }
                return Vec::new();
            }
        };
        let mut starting = Vec::with_capacity(rows.len());
        for ((route, waiting), (record, body)) in picked.into_iter().zip(rows) {
            let Some(record) = record else {
                self.finish_run(&route, &waiting.id);
                continue;
            };
            if !waiting.taken && record.job.expires <= now_ms() {
                if let Err(e) = self.end(&record, Status::Expired, None) {
                    tracing::warn!("async queue: cannot mark {} expired: {e:?}", waiting.id);
                }
                self.finish_run(&route, &waiting.id);
                continue;
            }
            starting.push((record, body));
        }
        self.mark_running(starting.iter().map(|(r, _)| r));
        starting
            .into_iter()
            .map(|(record, body)| {
                metrics::started(&record.job);
                // Waiters on this job see it run.
                let _ = self.ended.send(record.job.id.clone());
                (record.job, body)
            })
            .collect()
    }

    /// Takes the jobs the lanes may start now off their lanes, as running.
    fn pick(&self) -> Vec<(String, Waiting)> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut picked = Vec::new();
        for (route, lane) in lanes.iter_mut() {
            while lane.running < lane.concurrency && picked.len() < TAKE_BATCH {
                let Some(waiting) = lane.waiting.pop_front() else {
                    break;
                };
                lane.running += 1;
                // Running before the lock is let go: `find` never sees it nowhere.
                running.insert(waiting.id.clone());
                picked.push((route.clone(), waiting));
            }
        }
        picked
    }

    /// The records and bodies of taken jobs, in one read.
    fn read_taken(
        &self,
        picked: &[(String, Waiting)],
    ) -> Result<Vec<(Option<Record>, Bytes)>, Refused> {
        let txn = self.db.begin_read().map_err(fail)?;
        let records = txn.open_table(RECORDS).map_err(fail)?;
        let bodies = txn.open_table(BODIES).map_err(fail)?;
        picked
            .iter()
            .map(|(_, w)| {
                let record = records
                    .get(w.id.as_str())
                    .map_err(fail)?
                    .map(|b| serde_json::from_slice::<Record>(b.value()).map_err(fail))
                    .transpose()?;
                let body = bodies
                    .get(w.id.as_str())
                    .map_err(fail)?
                    .map(|b| Bytes::copy_from_slice(b.value()))
                    .unwrap_or_default();
                Ok((record, body))
            })
            .collect()
    }

    /// Records that jobs were taken, in one transaction, without waiting
    /// for the disk: after a crash they then run again whatever their ttl
    /// (their calls may have been made). Lost in a crash before the next
    /// commit, a job only counts as not taken.
    fn mark_running<'a>(&self, records: impl Iterator<Item = &'a Record>) {
        let write = || -> Result<(), Refused> {
            let mut txn = self.db.begin_write().map_err(fail)?;
            txn.set_durability(redb::Durability::None);
            {
                let mut table = txn.open_table(RECORDS).map_err(fail)?;
                for record in records {
                    let mut record = record.clone();
                    record.status = Status::Running;
                    let bytes = serde_json::to_vec(&record).map_err(fail)?;
                    table
                        .insert(record.job.id.as_str(), bytes.as_slice())
                        .map_err(fail)?;
                }
            }
            txn.commit().map_err(fail)
        };
        if let Err(e) = write() {
            tracing::warn!("async queue: cannot mark jobs running: {e:?}");
        }
    }

    /// Returns a taken job to the front of its lane.
    fn put_back(&self, route: &str, waiting: Waiting) {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&waiting.id);
        if let Some(lane) = lanes.get_mut(route) {
            lane.running = lane.running.saturating_sub(1);
            lane.waiting.push_front(waiting);
        }
    }

    /// A job left its lane's running set.
    fn finish_run(&self, route: &str, id: &str) {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(lane) = lanes.get_mut(route) {
            lane.running = lane.running.saturating_sub(1);
        }
    }

    /// Marks the waiting jobs whose ttl passed as expired, so they stop
    /// counting against `max_queue` and their webhooks go now.
    pub(crate) fn expire_waiting(&self) {
        let now = now_ms();
        let gone: Vec<String> = {
            let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
            let mut gone = Vec::new();
            for lane in lanes.values_mut() {
                lane.waiting.retain(|w| {
                    let expired = !w.taken && w.expires <= now;
                    if expired {
                        gone.push(w.id.clone());
                    }
                    !expired
                });
            }
            lanes.retain(|_, l| !l.waiting.is_empty() || l.running > 0);
            gone
        };
        for id in gone {
            match self.record(&id) {
                Ok(Some(record)) => {
                    if let Err(e) = self.end(&record, Status::Expired, None) {
                        tracing::warn!("async queue: cannot mark {id} expired: {e:?}");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("async queue: cannot read {id}: {e:?}"),
            }
        }
    }

    /// Stores how a job ended: its answer (done) or nothing (expired).
    /// Ends are committed in groups (see `Grouped`).
    fn end(
        &self,
        record: &Record,
        status: Status,
        outcome: Option<&Outcome>,
    ) -> Result<(), Refused> {
        let mut record = record.clone();
        record.status = status;
        record.finished = Some(now_ms());
        record.answer = outcome.map(|o| o.answer.clone());
        let outcome = outcome.map(|o| Outcome {
            answer: o.answer.clone(),
            body: o.body.clone(),
        });
        self.endings.ask("result", |reply| Ending {
            record,
            outcome,
            reply,
        })
    }

    /// Stores a group of ends in one transaction, then tells each.
    fn store_ends(&self, group: Vec<Ending>) {
        let write = || -> Result<(), Refused> {
            let txn = self.db.begin_write().map_err(fail)?;
            {
                let mut records = txn.open_table(RECORDS).map_err(fail)?;
                let mut bodies = txn.open_table(BODIES).map_err(fail)?;
                let mut results = txn.open_table(RESULTS).map_err(fail)?;
                let mut ends = txn.open_table(ENDS).map_err(fail)?;
                let mut deliveries = txn.open_table(DELIVERIES).map_err(fail)?;
                for e in &group {
                    if e.record.job.callback.is_some() {
                        // The webhook is due as the end is stored: both or neither.
                        deliveries
                            .insert(e.record.job.id.as_str(), (0, now_ms()))
                            .map_err(fail)?;
                    }
                    let id = e.record.job.id.as_str();
                    let bytes = serde_json::to_vec(&e.record).map_err(fail)?;
                    records.insert(id, bytes.as_slice()).map_err(fail)?;
                    let idem = idempotency(&e.record.job).unwrap_or_default();
                    ends.insert((e.record.keep_until(), id), idem.as_str())
                        .map_err(fail)?;
                    bodies.remove(id).map_err(fail)?;
                    if let Some(o) = &e.outcome {
                        results.insert(id, o.body.as_ref()).map_err(fail)?;
                    }
                }
            }
            txn.commit().map_err(fail)
        };
        let stored = write();
        for e in group {
            if stored.is_ok() {
                let _ = self.ended.send(e.record.job.id.clone());
                metrics::ended(&e.record.status, e.outcome.as_ref());
                if e.record.job.callback.is_some() {
                    self.delivery.notify_one();
                }
            }
            let _ = e.reply.send(stored.clone());
        }
    }

    /// Runs jobs with `exec` until the queue is dropped: each lane at most
    /// its concurrency at a time. Every second, waiting jobs past their
    /// ttl are expired; every [`SWEEP`], results past theirs are removed.
    /// The store is touched on blocking threads only.
    pub async fn run(self: Arc<Self>, exec: Executor) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks = 0u64;
        loop {
            metrics::depth(self.depth());
            let queue = self.clone();
            let batch = tokio::task::spawn_blocking(move || queue.next_batch())
                .await
                .unwrap_or_default();
            if !batch.is_empty() {
                // More may be startable: come back at once, though a tick
                // that is due goes first (`select!` picks at random).
                self.work.notify_one();
            }
            for (job, body) in batch {
                tokio::spawn(self.clone().work(exec.clone(), job, body));
            }
            tokio::select! {
                _ = self.work.notified() => {}
                _ = tick.tick() => {
                    ticks += 1;
                    let queue = self.clone();
                    let sweep = ticks.is_multiple_of(SWEEP.as_secs());
                    let _ = tokio::task::spawn_blocking(move || {
                        queue.expire_waiting();
                        if sweep {
                            if let Err(e) = queue.sweep() {
                                tracing::warn!("async queue: sweep failed: {e:?}");
                            }
                        }
                    })
                    .await;
                }
            }
        }
    }

    /// Runs one job and stores its answer; a job whose answer cannot be
    /// stored goes back to its lane (and runs again: at-least-once).
    async fn work(self: Arc<Self>, exec: Executor, job: Job, body: Bytes) {
        let (id, route) = (job.id.clone(), job.route.clone());
        let started = std::time::Instant::now();
        let outcome = exec(job.clone(), body).await;
        metrics::ran(started.elapsed());
        let queue = self.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let record = queue
                .record(&job.id)?
                .ok_or_else(|| Refused::Store("the job vanished while it ran".into()))?;
            queue.end(&record, Status::Done, Some(&outcome))
        })
        .await
        .unwrap_or_else(|e| Err(fail(e)));
        match stored {
            Ok(()) => self.finish_run(&route, &id),
            Err(e) => {
                tracing::error!(
                    "async queue: cannot store the result of {id}: {e:?}; it will run again"
                );
                self.put_back(
                    &route,
                    Waiting {
                        id,
                        expires: u64::MAX,
                        taken: true,
                    },
                );
            }
        }
        self.work.notify_one();
    }

    /// Removes ended jobs whose results are past their TTL, with their
    /// idempotency keys: a range of the `ENDS` index, at most
    /// [`SWEEP_MAX`] a time.
    pub fn sweep(&self) -> Result<usize, Refused> {
        let now = now_ms();
        let gone: Vec<(u64, String, String)> = {
            let txn = self.db.begin_read().map_err(fail)?;
            let ends = txn.open_table(ENDS).map_err(fail)?;
            let mut gone = Vec::new();
            for entry in ends.range(..(now + 1, "")).map_err(fail)?.take(SWEEP_MAX) {
                let (key, idem) = entry.map_err(fail)?;
                let (until, id) = key.value();
                gone.push((until, id.to_owned(), idem.value().to_owned()));
            }
            gone
        };
        if gone.is_empty() {
            return Ok(0);
        }
        let txn = self.db.begin_write().map_err(fail)?;
        {
            let mut records = txn.open_table(RECORDS).map_err(fail)?;
            let mut results = txn.open_table(RESULTS).map_err(fail)?;
            let mut idem = txn.open_table(IDEMPOTENCY).map_err(fail)?;
            let mut ends = txn.open_table(ENDS).map_err(fail)?;
            for (until, id, key) in &gone {
                records.remove(id.as_str()).map_err(fail)?;
                results.remove(id.as_str()).map_err(fail)?;
                ends.remove((*until, id.as_str())).map_err(fail)?;
                // Only while it still names this job (a later job may hold it).
                let holder = idem
                    .get(key.as_str())
                    .map_err(fail)?
                    .map(|v| v.value() == id.as_str());
                if holder == Some(true) {
                    idem.remove(key.as_str()).map_err(fail)?;
                }
            }
        }
        txn.commit().map_err(fail)?;
        Ok(gone.len())
    }
}

/// Indexes the ended jobs of a file written before `ENDS` existed.
fn index_ends(txn: &redb::WriteTransaction) -> Result<(), Refused> {
    let ended: Vec<Record> = {
        let records = txn.open_table(RECORDS).map_err(fail)?;
        let mut ended = Vec::new();
        for entry in records.iter().map_err(fail)? {
            let (_, bytes) = entry.map_err(fail)?;
            if let Ok(r) = serde_json::from_slice::<Record>(bytes.value()) {
                if matches!(r.status, Status::Done | Status::Expired) {
                    ended.push(r);
                }
            }
        }
        ended
    };
    let mut ends = txn.open_table(ENDS).map_err(fail)?;
    for r in &ended {
        let idem = idempotency(&r.job).unwrap_or_default();
        ends.insert((r.keep_until(), r.job.id.as_str()), idem.as_str())
            .map_err(fail)?;
    }
    Ok(())
}

impl Embedded {
    /// The webhook deliveries due now and not being sent, each with its
    /// failed attempts; they count as being sent until settled.
    pub(crate) fn due(&self) -> Result<Vec<(String, u32)>, Refused> {
        let now = now_ms();
        // Held across the read: a delivery settled meanwhile is not seen
        // due in a snapshot from before its settling.
        let mut sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        let txn = self.db.begin_read().map_err(fail)?;
        let table = txn.open_table(DELIVERIES).map_err(fail)?;
        let mut due = Vec::new();
        for entry in table.iter().map_err(fail)? {
            let (id, when) = entry.map_err(fail)?;
            let (failed, at) = when.value();
            if at <= now && !sending.contains(id.value()) {
                due.push((id.value().to_owned(), failed));
                if due.len() == crate::deliveries::BATCH {
                    break;
                }
            }
        }
        sending.extend(due.iter().map(|(id, _)| id.clone()));
        Ok(due)
    }

    /// Lets a delivery be due again without settling it (its sender
    /// failed before it could).
    pub(crate) fn release(&self, id: &str) {
        self.sending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Stores a delivery's outcome: done (`None`), or failed so many
    /// times and due again after the backoff.
    pub(crate) fn settle(&self, id: &str, failed: Option<u32>) -> Result<(), Refused> {
        let write = || -> Result<(), Refused> {
            let txn = self.db.begin_write().map_err(fail)?;
            {
                let mut table = txn.open_table(DELIVERIES).map_err(fail)?;
                match failed {
                    None => {
                        table.remove(id).map_err(fail)?;
                    }
                    Some(n) => {
                        let at = now_ms() + crate::deliveries::backoff(n).as_millis() as u64;
                        table.insert(id, (n, at)).map_err(fail)?;
                    }
                }
            }
            txn.commit().map_err(fail)
        };
        let written = write();
        self.sending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        written
    }
}
