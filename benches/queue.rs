//! Queue latency and throughput: `cargo bench -p flowcore-benches --bench queue`.
//!
//! Prints, for the in-process queue and for Redis (`FLOWCORE_BENCH_REDIS_URL`, default the
//! machine's, with a fresh key prefix that is deleted afterwards):
//! - enqueue-to-lease latency (p50, p99, max) of 2,000 jobs enqueued one at a time while a
//!   worker waits in `lease`;
//! - jobs/s of 20,000 jobs through 4 producers and 4 workers (lease up to 64, ack each): without
//!   keys; each with one of 1,000 concurrency keys at limit 1; and without keys while 100,000
//!   jobs wait behind one key of the same group.
//!
//! A custom harness rather than criterion: the figures are percentiles of single events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowcore::RunId;
use flowcore::ports::memory::MemoryQueue;
use flowcore::ports::{JobKey, NewJob, Queue, Take};
use flowcore_store::{RedisConfig, RedisQueue};

const LATENCY_JOBS: usize = 2_000;
const THROUGHPUT_JOBS: usize = 20_000;

async fn latency(queue: Arc<dyn Queue>) -> (Duration, Duration, Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let consumer = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut samples = Vec::with_capacity(LATENCY_JOBS);
            while samples.len() < LATENCY_JOBS {
                let jobs = queue
                    .lease(
                        "lat",
                        Take {
                            max: 1,
                            ttl: Duration::from_secs(60),
                            wait: Duration::from_secs(5),
                        },
                    )
                    .await
                    .expect("lease");
                let now = Instant::now();
                for job in jobs {
                    let sent = rx.recv().await.expect("send time");
                    samples.push(now - sent);
                    queue.ack(&job).await.expect("ack");
                }
            }
            samples
        })
    };
    for _ in 0..LATENCY_JOBS {
        let sent = Instant::now();
        tx.send(sent).expect("channel");
        queue
            .enqueue("lat", NewJob::run(RunId::new()))
            .await
            .expect("enqueue");
        // One job in flight at a time, so that each sample is a wake-up, not a batch.
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let mut samples = consumer.await.expect("consumer");
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    (pct(0.50), pct(0.99), *samples.last().expect("samples"))
}

/// The jobs of a throughput run: with one of `keys` concurrency keys at limit 1 each, or none.
fn job(keys: Option<usize>) -> NewJob {
    let job = NewJob::run(RunId::new());
    match keys {
        // A cheap spread over the keys: the run id's random tail.
        Some(n) => {
            let id = job.run_id.to_string();
            let pick = id
                .bytes()
                .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
                % n;
            job.keyed(JobKey {
                key: format!("k{pick}"),
                limit: 1,
            })
        }
        None => job,
    }
}

async fn throughput(queue: Arc<dyn Queue>, group: &'static str, keys: Option<usize>) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..THROUGHPUT_JOBS / 4 {
                queue.enqueue(group, job(keys)).await.expect("enqueue");
            }
            0usize
        }));
    }
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..4 {
        let (queue, done) = (queue.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = 0;
            while done.load(std::sync::atomic::Ordering::SeqCst) < THROUGHPUT_JOBS {
                let jobs = queue
                    .lease(
                        group,
                        Take {
                            max: 64,
                            ttl: Duration::from_secs(60),
                            wait: Duration::from_millis(50),
                        },
                    )
                    .await
                    .expect("lease");
                for job in &jobs {
                    queue.ack(job).await.expect("ack");
                }
                mine += jobs.len();
                done.fetch_add(jobs.len(), std::sync::atomic::Ordering::SeqCst);
            }
            mine
        }));
    }
    let mut consumed = 0;
    for t in tasks {
        consumed += t.await.expect("task");
    }
    assert_eq!(consumed, THROUGHPUT_JOBS);
    THROUGHPUT_JOBS as f64 / started.elapsed().as_secs_f64()
}

async fn report(name: &str, queue: Arc<dyn Queue>) {
    let (p50, p99, max) = latency(queue.clone()).await;
    let rate = throughput(queue.clone(), "tp", None).await;
    let keyed = throughput(queue.clone(), "tp-keyed", Some(1000)).await;
    // 100,000 jobs behind one key, one of them leased and never acked: the rest stay held back.
    let filling = Instant::now();
    for _ in 0..BACKLOG {
        let job = NewJob::run(RunId::new()).keyed(JobKey {
            key: "busy".into(),
            limit: 1,
        });
        queue.enqueue("tp-backlog", job).await.expect("enqueue");
    }
    let held = queue
        .lease(
            "tp-backlog",
            Take {
                max: 1,
                ttl: Duration::from_secs(600),
                wait: Duration::ZERO,
            },
        )
        .await
        .expect("lease");
    assert_eq!(held.len(), 1);
    let filled = filling.elapsed();
    let behind = throughput(queue.clone(), "tp-backlog", None).await;
    let depth = queue.depth("tp-backlog").await.expect("depth");
    assert_eq!(depth.held_back, BACKLOG as u64 - 1);
    println!(
        "queue/{name}: enqueue-to-lease p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; {rate:.0} jobs/s (enqueue + lease + ack); \
         {keyed:.0} jobs/s over 1,000 keys at limit 1; {behind:.0} jobs/s beside {BACKLOG} jobs behind one key (enqueued in {filled:.1?})",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
}

const BACKLOG: usize = 100_000;

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing: run only as a bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        report("memory", Arc::new(MemoryQueue::new(5))).await;
        let url = std::env::var("FLOWCORE_BENCH_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let mut config = RedisConfig::new(url.clone());
        config.prefix = format!("flowcore-bench-{}", std::process::id());
        let queue = RedisQueue::connect(config)
            .await
            .expect("Redis on 127.0.0.1:6379");
        report("redis", Arc::new(queue.clone())).await;
        queue.delete_prefix().await.expect("clean up");
    });
}
