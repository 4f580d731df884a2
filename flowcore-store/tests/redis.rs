//! The queue kit against the machine's Redis (a key prefix per test run), and fault tests
//! against a throwaway `redis-server` on a free port that is killed and restarted. Redis
//! missing is a failure, not a skip.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowcore::RunId;
use flowcore::ports::{NewJob, Queue, Take};
use flowcore_store::{RedisConfig, RedisQueue};

fn redis_url() -> String {
    std::env::var("FLOWCORE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn unique_prefix() -> String {
    format!(
        "flowcore-test-{}-{}",
        std::process::id(),
        flowcore::ids::new_id()
    )
}

/// The shared Redis, keys under `prefix`.
fn config(prefix: &str) -> RedisConfig {
    let mut config = RedisConfig::new(redis_url());
    config.prefix = prefix.to_owned();
    config
}

/// Deletes every key under `prefix` from the shared Redis.
async fn clean(prefix: &str) {
    let queue = RedisQueue::connect(config(prefix)).await.expect("connect");
    queue.delete_prefix().await.expect("delete the test's keys");
}

/// Every port Redis implements, through the kit's one entry point: the queue (dead letters
/// after 3 deliveries, as configured), events, rate limits, signals, and flow changes heard by
/// two connections as two processes would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_passes_the_kit() {
    let prefix = unique_prefix();
    let connect = || {
        RedisQueue::connect(RedisConfig {
            max_deliveries: 3,
            ..config(&prefix)
        })
    };
    let (first, second) = (
        connect()
            .await
            .expect("Redis must run on 127.0.0.1:6379 (or FLOWCORE_TEST_REDIS_URL)"),
        connect().await.expect("connect"),
    );
    subscribed(&[&first, &second]).await;
    let backend = flowcore::testkit::Backend {
        name: "redis",
        queue: Some(Arc::new(first.clone())),
        events: Some(Arc::new(first.event_bus())),
        limiter: Some(Arc::new(first.rate_limiter())),
        signals: Some(Arc::new(first.run_signals())),
        flow_changes: Some((
            Arc::new(flowcore::ports::memory::MemoryFlowStore::new()),
            [
                Arc::new(first.flow_changes()),
                Arc::new(second.flow_changes()),
            ],
        )),
        capabilities: flowcore::testkit::Capabilities {
            max_deliveries: Some(3),
        },
        ..Default::default()
    };
    flowcore::testkit::check(&backend).await;
    // Cleaning a prefix deletes its keys and no other prefix's, even one its glob characters
    // would match.
    let other = format!("{}x", unique_prefix());
    let starry = format!("{}*", &other[..other.len() - 1]);
    let queue_of = async |prefix: &str| RedisQueue::connect(config(prefix)).await.expect("connect");
    let neighbour = queue_of(&other).await;
    neighbour
        .enqueue("g", NewJob::run(RunId::new()))
        .await
        .expect("enqueue");
    assert!(first.delete_prefix().await.expect("delete") > 0);
    assert_eq!(first.depth("kit").await.expect("depth").ready, 0);
    queue_of(&starry)
        .await
        .delete_prefix()
        .await
        .expect("delete");
    assert_eq!(neighbour.depth("g").await.expect("depth").ready, 1);
    clean(&other).await;
}

/// Waits until each connection's subscriber is connected (as a process's would be before it
/// serves).
async fn subscribed(queues: &[&RedisQueue]) {
    for q in queues {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !q.subscriber_connected() {
            assert!(Instant::now() < deadline, "subscriber connected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lease_wakes_on_enqueue() {
    let prefix = unique_prefix();
    let config = config(&prefix);
    let queue = Arc::new(RedisQueue::connect(config).await.expect("connect"));
    let waiter = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let jobs = queue
                .lease(
                    "g",
                    Take {
                        max: 1,
                        ttl: Duration::from_secs(30),
                        wait: Duration::from_secs(20),
                    },
                )
                .await
                .expect("lease");
            (jobs, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    queue
        .enqueue("g", NewJob::run(RunId::new()))
        .await
        .expect("enqueue");
    let (jobs, waited) = waiter.await.expect("task");
    clean(&prefix).await;
    assert_eq!(jobs.len(), 1);
    assert!(
        waited < Duration::from_secs(10),
        "woken by the enqueue, not by the 20 s wait"
    );
}

/// A process subscribed to neither enqueues nor finished runs (an api process hears no
/// enqueues, a worker no finished runs) is sent neither, and still works: its leases poll, and
/// cancel requests and flow changes reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_hears_only_what_it_subscribes_to() {
    use flowcore::ports::RunSignals;
    let prefix = unique_prefix();
    let mut config = config(&prefix);
    let hearing = RedisQueue::connect(config.clone()).await.expect("connect");
    config.hear_enqueues = false;
    config.hear_finished_runs = false;
    let deaf = RedisQueue::connect(config).await.expect("connect");

    // Cancel requests reach it (published again until the subscriber is up).
    let mut cancels = deaf.run_signals().cancels();
    let id = RunId::new();
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            hearing.run_signals().cancel(&id).await.expect("publish");
            if let Ok(Ok(got)) =
                tokio::time::timeout(Duration::from_millis(100), cancels.recv()).await
            {
                return got;
            }
        }
    })
    .await
    .expect("a cancel request reaches it");
    assert_eq!(heard, id);

    // A finished run wakes the watch of the process that hears them, not the other's.
    let done = RunId::new();
    let (mut heard, mut unheard) = (
        hearing.run_signals().watch_finished(&done),
        deaf.run_signals().watch_finished(&done),
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            hearing
                .run_signals()
                .finished(&done, None)
                .await
                .expect("publish");
            if tokio::time::timeout(Duration::from_millis(100), heard.finished())
                .await
                .is_ok()
            {
                return;
            }
        }
    })
    .await
    .expect("the subscribed process hears it");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), unheard.finished())
            .await
            .is_err(),
        "the other is not sent it"
    );

    // Its lease still finds a job enqueued elsewhere, at its next poll.
    let run = RunId::new();
    hearing
        .enqueue("g", NewJob::run(run.clone()))
        .await
        .expect("enqueue");
    let jobs = deaf
        .lease(
            "g",
            Take {
                max: 1,
                ttl: Duration::from_secs(30),
                wait: Duration::from_secs(5),
            },
        )
        .await
        .expect("lease");
    clean(&prefix).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].job.run_id, run);
}

#[tokio::test]
async fn bad_urls_and_groups_are_refused() {
    assert!(
        RedisQueue::connect(RedisConfig::new("nope://x"))
            .await
            .is_err()
    );
    let queue = RedisQueue::connect(config(&unique_prefix()))
        .await
        .expect("connect");
    assert!(
        queue
            .enqueue("bad group!", NewJob::run(RunId::new()))
            .await
            .is_err()
    );
}

/// A throwaway redis-server with an append-only file, killed with SIGKILL on demand.
struct Throwaway {
    child: Option<Child>,
    port: u16,
    dir: std::path::PathBuf,
}

impl Throwaway {
    fn start(port: u16, dir: &std::path::Path) -> Self {
        std::fs::create_dir_all(dir).expect("dir");
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "yes",
            ])
            .args([
                "--appendfsync",
                "always",
                "--dir",
                dir.to_str().expect("utf-8"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child: Some(child),
            port,
            dir: dir.to_owned(),
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_nothing_and_clients_reconnect() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let dir = std::env::temp_dir().join(format!(
        "flowcore-redis-fault-{}-{port}",
        std::process::id()
    ));
    let mut server = Throwaway::start(port, &dir);
    let mut config = RedisConfig::new(format!("redis://127.0.0.1:{port}"));
    config.command_timeout = Duration::from_millis(500);
    let queue = RedisQueue::connect(config).await.expect("connect");
    let losses = queue.losses().expect("a Redis queue reports losses");
    let count_becomes = |n: u64, what: &'static str| {
        let mut losses = losses.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(15), losses.wait_for(|l| *l == n))
                .await
                .unwrap_or_else(|_| panic!("{what}"))
                .expect("sender alive");
        }
    };
    // An empty Redis at the first connection counts as one (nothing of ours was there).
    count_becomes(1, "the first connection finds Redis empty").await;
    let mut accepted = Vec::new();
    for _ in 0..20 {
        let run = RunId::new();
        queue
            .enqueue("g", NewJob::run(run.clone()))
            .await
            .expect("enqueue");
        accepted.push(run);
    }

    server.kill();
    let started = Instant::now();
    let err = queue
        .enqueue("g", NewJob::run(RunId::new()))
        .await
        .expect_err("Redis is down");
    assert!(
        err.is_retryable(),
        "an outage is reported as unavailable: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "commands time out instead of hanging"
    );
    assert!(queue.ping().await.is_err(), "readiness sees the outage");

    let _server = Throwaway::start(server.port, &server.dir);
    let deadline = Instant::now() + Duration::from_secs(15);
    while queue.ping().await.is_err() {
        assert!(Instant::now() < deadline, "the queue reconnected by itself");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut leased = Vec::new();
    while leased.len() < accepted.len() {
        let jobs = queue
            .lease(
                "g",
                Take {
                    max: 100,
                    ttl: Duration::from_secs(30),
                    wait: Duration::from_secs(2),
                },
            )
            .await
            .expect("lease");
        assert!(
            !jobs.is_empty(),
            "every accepted job is still there after the restart"
        );
        for job in jobs {
            queue.ack(&job).await.expect("ack");
            leased.push(job.job.run_id);
        }
    }
    leased.sort();
    accepted.sort();
    assert_eq!(leased, accepted, "nothing accepted was lost");
    assert_eq!(
        *losses.borrow(),
        1,
        "a restart that kept the data is no loss"
    );

    // Another process's queue: its first connection finds the marker of the first one.
    let mut other_config = RedisConfig::new(format!("redis://127.0.0.1:{port}"));
    other_config.command_timeout = Duration::from_millis(500);
    let other = RedisQueue::connect(other_config).await.expect("connect");
    let mut other_losses = other.losses().expect("losses");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*other_losses.borrow(), 0, "a second process finds the data");

    // Restarted empty: each queue reports the loss, whichever reconnects first, so that
    // runs are enqueued again wherever a reaper runs.
    drop(_server);
    std::fs::remove_dir_all(&dir).ok();
    let _server = Throwaway::start(server.port, &server.dir);
    count_becomes(2, "a Redis restarted empty is reported").await;
    tokio::time::timeout(Duration::from_secs(15), other_losses.wait_for(|l| *l == 1))
        .await
        .expect("the loss is reported to the second process too")
        .expect("sender alive");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_cross_processes_through_redis() {
    let prefix = unique_prefix();
    let connect = || RedisQueue::connect(config(&prefix));
    // Two connections, two subscribers: as two processes would have.
    let (first, second) = (
        connect().await.expect("connect"),
        connect().await.expect("connect"),
    );
    subscribed(&[&first, &second]).await;
    // A cancel request published by one process reaches the other.
    let mut heard = second.run_signals().cancels();
    let id = flowcore::RunId::new();
    use flowcore::ports::RunSignals;
    first.run_signals().cancel(&id).await.expect("publish");
    tokio::time::timeout(Duration::from_secs(5), async {
        while heard.recv().await.expect("recv") != id {}
    })
    .await
    .expect("the other process hears the request");
    // A run announced finished by one process wakes its watch in the other: what does it hear?
    let announce = |end: flowcore::ports::RunEnd| {
        let (first, second) = (&first, &second);
        async move {
            let id = flowcore::RunId::new();
            let mut watch = second.run_signals().watch_finished(&id);
            first
                .run_signals()
                .finished(&id, Some(&end))
                .await
                .expect("publish");
            tokio::time::timeout(Duration::from_secs(5), watch.finished())
                .await
                .expect("the other process's watch wakes")
        }
    };
    let end = flowcore::ports::RunEnd {
        status: flowcore::RunStatus::Succeeded,
        output: Some(serde_json::json!({"msg": "hello ada"})),
        error: None,
    };
    let heard = announce(end.clone()).await;
    assert_eq!(heard.as_deref(), Some(&end), "with the run's end");
    // A large end is left out of the announcement (every process receives it): the watch
    // wakes without it, and its waiter reads the store.
    let large = flowcore::ports::RunEnd {
        output: Some(serde_json::json!("x".repeat(64 * 1024))),
        ..end
    };
    assert_eq!(
        announce(large).await,
        None,
        "a large end stays out of the announcement"
    );
    clean(&prefix).await;
}

/// A run's event stream lives an hour after its last event, and a minute once the run
/// finished: a busy server keeps a minute of finished runs, not an hour of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_runs_events_expire_within_a_minute() {
    use flowcore::ports::EventBus;
    let prefix = unique_prefix();
    let queue = RedisQueue::connect(config(&prefix)).await.expect("connect");
    let bus = queue.event_bus();
    let run_id = RunId::new();
    let key = format!("{prefix}:ev:{run_id}");
    let mut conn = redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let ttl = async |conn: &mut redis::aio::MultiplexedConnection| -> i64 {
        redis::cmd("TTL")
            .arg(&key)
            .query_async(conn)
            .await
            .expect("TTL")
    };
    bus.publish(&flowcore::RunEvent::RunStarted {
        run_id: run_id.clone(),
    })
    .await
    .expect("publish");
    assert!(
        ttl(&mut conn).await > 3000,
        "a live run's events stay an hour"
    );
    bus.publish_many(&[flowcore::RunEvent::RunFinished {
        run_id: run_id.clone(),
        status: flowcore::RunStatus::Succeeded,
        error: None,
    }])
    .await
    .expect("publish");
    let left = ttl(&mut conn).await;
    assert!(
        (1..=flowcore_store::redis::FINISHED_EVENTS_TTL_SECONDS).contains(&left),
        "a finished run's events stay a minute, not {left} s"
    );
    assert_eq!(
        bus.read(&run_id, None, Duration::ZERO)
            .await
            .expect("read")
            .len(),
        2,
        "and can still be read meanwhile"
    );
    clean(&prefix).await;
}
