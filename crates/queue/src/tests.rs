use super::*;

/// The facade over an embedded queue (for its waits).
fn facade(q: &Arc<Embedded>) -> Queue {
    Queue {
        backend: Backend::Embedded(q.clone()),
    }
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("turnpike-queue-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Opens the queue again once the last one has let go of the file (its
/// commit threads may hold it for the end of a commit).
fn reopen(d: &std::path::Path) -> Arc<Embedded> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Embedded::open(d) {
            Ok(q) => return q,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn job(route: &str, ttl_ms: u64) -> Job {
    let now = now_ms();
    Job {
        id: new_id(),
        route: route.into(),
        consumer: Some("jack".into()),
        public: false,
        method: "POST".into(),
        uri: "/slow".into(),
        host: None,
        upstream_host: None,
        remote: Some("127.0.0.1:5000".into()),
        scheme: None,
        headers: vec![("content-type".into(), b"text/plain".to_vec())],
        submitted: now,
        expires: now + ttl_ms,
        result_ttl: 60,
        max_result_bytes: 1 << 20,
        concurrency: 2,
        idempotency_key: None,
        callback: None,
    }
}

/// An executor that echoes the body after `delay`, counting calls in flight.
fn echo(delay: Duration, peak: Arc<std::sync::atomic::AtomicUsize>) -> Executor {
    let now = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Arc::new(move |_job, body| {
        let (peak, now) = (peak.clone(), now.clone());
        Box::pin(async move {
            let n = now.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            peak.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            Outcome {
                answer: Answer {
                    status: 200,
                    headers: vec![],
                    truncated: false,
                },
                body,
            }
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_in_order_within_the_route_concurrency() {
    let d = dir("order");
    let q = Embedded::open(&d).unwrap();
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut ids = Vec::new();
    for i in 0..6 {
        let a = q
            .submit(job("r1", 60_000), Bytes::from(format!("body {i}")), 100)
            .unwrap();
        ids.push(a.id);
    }
    match q.find(&ids[5]).unwrap() {
        Found::Waiting {
            status: Status::Queued,
            ahead,
            ..
        } => assert_eq!(ahead, 5),
        other => panic!("{other:?}"),
    }
    tokio::spawn(q.clone().run(echo(Duration::from_millis(50), peak.clone())));
    for (i, id) in ids.iter().enumerate() {
        match facade(&q).wait(id, Duration::from_secs(5)).await.unwrap() {
            Found::Done { answer, body, .. } => {
                assert_eq!(answer.status, 200);
                assert_eq!(body, format!("body {i}"));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        peak.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "at most the route's concurrency at once"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_jobs_never_run_and_full_queues_refuse() {
    let d = dir("expiry");
    let q = Embedded::open(&d).unwrap();
    let late = q.submit(job("r1", 1), Bytes::new(), 100).unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(matches!(q.find(&late.id).unwrap(), Found::Expired { .. }));
    q.submit(job("r2", 60_000), Bytes::new(), 1).unwrap();
    assert_eq!(
        q.submit(job("r2", 60_000), Bytes::new(), 1),
        Err(Refused::Full)
    );
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(q.clone().run(echo(Duration::ZERO, calls.clone())));
    let found = facade(&q)
        .wait(&late.id, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(matches!(found, Found::Expired { .. }), "{found:?}");
    assert_eq!(q.find("nope").unwrap(), Found::Unknown);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_return_the_first_job() {
    let d = dir("idem");
    let q = Embedded::open(&d).unwrap();
    let mut first = job("r1", 60_000);
    first.idempotency_key = Some("order-7".into());
    let a = q.submit(first.clone(), Bytes::new(), 100).unwrap();
    let mut again = job("r1", 60_000);
    again.idempotency_key = Some("order-7".into());
    let b = q.submit(again.clone(), Bytes::new(), 100).unwrap();
    assert_eq!((b.id.clone(), b.repeated), (a.id.clone(), true));
    // Another consumer's key is its own.
    again.consumer = Some("rose".into());
    assert!(!q.submit(again, Bytes::new(), 100).unwrap().repeated);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_jobs_survive_a_reopen_in_order() {
    let d = dir("reopen");
    let ids: Vec<String> = {
        let q = Embedded::open(&d).unwrap();
        (0..3)
            .map(|i| {
                q.submit(job("r1", 60_000), Bytes::from(format!("b{i}")), 100)
                    .unwrap()
                    .id
            })
            .collect()
    };
    let q = reopen(&d);
    assert_eq!(q.waiting("r1"), 3);
    tokio::spawn(q.clone().run(echo(Duration::ZERO, Arc::default())));
    for (i, id) in ids.iter().enumerate() {
        match facade(&q).wait(id, Duration::from_secs(5)).await.unwrap() {
            Found::Done { body, .. } => assert_eq!(body, format!("b{i}")),
            other => panic!("{other:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_is_per_route_and_per_client() {
    let d = dir("idem-scope");
    let q = Embedded::open(&d).unwrap();
    let keyed = |route: &str, consumer: Option<&str>, remote: &str| {
        let mut j = job(route, 60_000);
        j.consumer = consumer.map(str::to_owned);
        j.remote = Some(remote.into());
        j.idempotency_key = Some("k".into());
        j
    };
    let first = q
        .submit(keyed("r1", None, "10.0.0.1:1000"), Bytes::new(), 100)
        .unwrap();
    // The same client (any port) repeats; another client or route does not.
    assert!(
        q.submit(keyed("r1", None, "10.0.0.1:2000"), Bytes::new(), 100)
            .unwrap()
            .repeated
    );
    assert!(
        !q.submit(keyed("r1", None, "10.0.0.2:1000"), Bytes::new(), 100)
            .unwrap()
            .repeated
    );
    assert!(
        !q.submit(keyed("r2", None, "10.0.0.1:1000"), Bytes::new(), 100)
            .unwrap()
            .repeated
    );
    assert_eq!(
        q.submit(keyed("r1", None, "10.0.0.1:3000"), Bytes::new(), 100)
            .unwrap()
            .id,
        first.id
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_waiting_jobs_stop_counting_against_the_queue() {
    let d = dir("expire-waiting");
    let q = Embedded::open(&d).unwrap();
    q.submit(job("r1", 1), Bytes::new(), 1).unwrap();
    assert_eq!(
        q.submit(job("r1", 60_000), Bytes::new(), 1),
        Err(Refused::Full)
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    q.expire_waiting();
    assert_eq!(q.waiting("r1"), 0);
    assert!(q.submit(job("r1", 60_000), Bytes::new(), 1).is_ok());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn concurrent_submissions_commit_in_groups_and_lose_nothing() {
    let d = dir("group");
    let q = Embedded::open(&d).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let q = q.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| {
                        let mut j = job("r1", 60_000);
                        // Every thread also sends one shared key.
                        if i == 0 {
                            j.idempotency_key = Some("shared".into());
                        }
                        let a = q
                            .submit(j, Bytes::from(format!("{t}-{i}")), 10_000)
                            .unwrap();
                        (a.id, a.repeated)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let all: Vec<(String, bool)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let fresh: std::collections::HashSet<&String> =
        all.iter().filter(|(_, r)| !r).map(|(id, _)| id).collect();
    assert_eq!(
        fresh.len(),
        8 * 49 + 1,
        "one job for the shared key, one for each other"
    );
    assert_eq!(q.waiting("r1"), fresh.len());
    drop(q);
    assert_eq!(reopen(&d).waiting("r1"), 8 * 49 + 1, "all durable");
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_removes_only_results_past_their_ttl_with_their_keys() {
    let d = dir("sweep");
    let q = Embedded::open(&d).unwrap();
    let keyed = |result_ttl: u64, key: &str| {
        let mut j = job("r1", 60_000);
        j.result_ttl = result_ttl;
        j.idempotency_key = Some(key.into());
        j
    };
    let short = q.submit(keyed(0, "a"), Bytes::new(), 100).unwrap();
    let long = q.submit(keyed(60, "b"), Bytes::new(), 100).unwrap();
    tokio::spawn(q.clone().run(echo(Duration::ZERO, Arc::default())));
    // Done at once past its ttl, the short one reads as unknown already.
    let found = facade(&q).wait(&long.id, Duration::from_secs(5)).await;
    assert!(matches!(found, Ok(Found::Done { .. })), "{found:?}");
    let found = facade(&q).wait(&short.id, Duration::from_secs(5)).await;
    assert_eq!(found, Ok(Found::Unknown));
    assert_eq!(q.sweep().unwrap(), 1, "only the result past its ttl");
    assert_eq!(q.find(&short.id).unwrap(), Found::Unknown);
    assert!(matches!(q.find(&long.id).unwrap(), Found::Done { .. }));
    // Its key is free again; the kept job's is not.
    assert!(!q.submit(keyed(0, "a"), Bytes::new(), 100).unwrap().repeated);
    assert!(
        q.submit(keyed(60, "b"), Bytes::new(), 100)
            .unwrap()
            .repeated
    );
    assert_eq!(q.sweep().unwrap(), 0);
    let _ = std::fs::remove_dir_all(&d);
}

/// A `redis-server` of the test's own on a free port; killed on drop.
struct RedisServer {
    child: std::process::Child,
    port: u16,
}

impl RedisServer {
    fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// With more `redis-server` arguments.
    fn start_with(args: &[&str]) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("`redis-server` is not installed: `apt-get install redis-server` (scripts/test does it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer { child, port }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_queue_runs_each_route_in_order_within_its_concurrency_cluster_wide() {
    let redis = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let nodes: Vec<Arc<Queue>> = (0..2).map(|_| Queue::open_shared(&url).unwrap()).collect();
    // Both nodes count calls in flight together, and note the start order.
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Arc::new(Mutex::new(Vec::<Bytes>::new()));
    let mut ids = Vec::new();
    for i in 0..8 {
        let a = nodes[i % 2]
            .submit(job("r1", 60_000), Bytes::from(format!("body {i}")), 100)
            .await
            .unwrap();
        ids.push(a.id);
    }
    for n in &nodes {
        let (run, started) = (
            echo(Duration::from_millis(100), peak.clone()),
            started.clone(),
        );
        let noting: Executor = Arc::new(move |job, body: Bytes| {
            started.lock().unwrap().push(body.clone());
            run(job, body)
        });
        tokio::spawn(n.clone().run(noting));
    }
    for (i, id) in ids.iter().enumerate() {
        // Each node reads every result.
        match nodes[(i + 1) % 2]
            .wait(id, Duration::from_secs(10))
            .await
            .unwrap()
        {
            Found::Done { body, .. } => assert_eq!(body, format!("body {i}")),
            other => panic!("{other:?}"),
        }
    }
    // FIFO across the nodes: each job starts with, at the latest, the
    // job one slot (concurrency 2) after it; jobs taken together race.
    let started = started.lock().unwrap().clone();
    for (i, body) in started.iter().enumerate() {
        let n: usize = std::str::from_utf8(&body[5..]).unwrap().parse().unwrap();
        assert!(n.abs_diff(i) <= 1, "FIFO across the nodes: {started:?}");
    }
    assert_eq!(
        peak.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the route's concurrency holds across the nodes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_a_command_is_still_up() {
    // Managed Redis services often disable CONFIG.
    let redis = RedisServer::start_with(&["--rename-command", "CONFIG", ""]);
    let node = Cluster::open(&format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    assert!(node.routes().await.unwrap().is_empty());
    assert!(node.up());
    node.check_eviction().await;
    assert!(node.up(), "an error reply is an answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_nodes_keep_dying_ends_failed_after_three_takeovers() {
    let redis = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let lease = Duration::from_millis(200);
    // Nodes whose calls never end and that never renew (`run` is not
    // called): each dies with the job, as far as the others can tell.
    let node = || Cluster::open_with_lease(&url, lease).unwrap();
    let hang: Executor = Arc::new(|_, _| Box::pin(std::future::pending()));
    let first = node();
    let id = first
        .submit(job("r1", 60_000), Bytes::new(), 100)
        .await
        .unwrap()
        .id;
    first.hint("r1".into());
    first.take_hinted(&hang).await.unwrap();
    let mut nodes = vec![first];
    for takeover in 1..=4 {
        tokio::time::sleep(lease * 2).await;
        let next = node();
        next.tend(&hang, "r1", false, true).await.unwrap();
        nodes.push(next);
        if takeover <= 3 {
            let found = nodes[0].find(&id).await.unwrap();
            assert!(
                matches!(
                    found,
                    Found::Waiting {
                        status: Status::Running,
                        ..
                    }
                ),
                "taken over {takeover} times, it runs again: {found:?}"
            );
        }
    }
    // Three takeovers ran it again; the fourth ends it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match nodes[0].find(&id).await.unwrap() {
            Found::Done { answer, body, .. } => {
                assert_eq!(answer.status, 502);
                assert!(String::from_utf8_lossy(&body).contains("started several times"));
                break;
            }
            other => assert!(std::time::Instant::now() < deadline, "{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
