//! The Redis queue: the shared twin of [`flowcore::ports::memory::MemoryQueue`].
//!
//! Design (see ARCHITECTURE.md): per worker group, a sorted set `due` holds every job once,
//! scored by when it is next due (its ready time, or its lease expiry while leased); a hash per
//! job holds the run id, the delivery count and the current lease token; `leased` tracks live
//! leases for the depth metric; `dead` lists dead-lettered jobs. Every operation is one Lua
//! script, so it is atomic and one round trip: enqueue + lease = 2 round trips per dispatched
//! job. Redis' own clock (`TIME`) decides expiry, so worker clocks do not matter. Enqueues
//! publish on a channel that one subscriber per process turns into a wake-up for waiting
//! leases; a lost message only delays a waiter to its next poll.
//!
//! Connections come from a bb8 pool with our own manager: bb8-redis pings on every checkout
//! (a round trip per command) and never reports a broken connection, so after a Redis restart its
//! pool would hand out dead connections. Ours marks a connection broken on an I/O error, bb8
//! drops it, and the next checkout reconnects. Every command has a timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use flowcore::ports::{Job, LeasedJob, MAX_PRIORITY, NewJob, Queue, QueueDepth, StoreResult, Take};
use flowcore::{RunId, StoreError};
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Script};
use tokio::sync::Notify;

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `REDIS_URL`.
    pub url: String,
    /// `FLOWCORE_REDIS_PREFIX`: every key starts with it.
    pub prefix: String,
    /// The longest a command may take.
    pub command_timeout: Duration,
    /// Connections in the pool.
    pub pool_size: u32,
    /// Deliveries of a job before it is dead-lettered (never one that holds a concurrency slot).
    pub max_deliveries: u32,
    /// Whether this process hears that jobs were enqueued (its leases wake at once instead of
    /// at their next poll): off in a process that never leases, so that it is not sent a
    /// message for every enqueue.
    pub hear_enqueues: bool,
    /// Whether this process hears that runs finished (its [`RunSignals::watch_finished`]
    /// watches wake at once instead of when their waiter next reads the store, within a
    /// second): off in a process that answers no waiting requests, so that it is not sent every
    /// run's end.
    ///
    /// [`RunSignals::watch_finished`]: flowcore::ports::RunSignals::watch_finished
    pub hear_finished_runs: bool,
}

impl RedisConfig {
    /// Defaults: prefix `flowcore`, 5 s command timeout, 8 connections, 5 deliveries, hearing
    /// enqueues and finished runs.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "flowcore".into(),
            command_timeout: Duration::from_secs(5),
            pool_size: 8,
            max_deliveries: 5,
            hear_enqueues: true,
            hear_finished_runs: true,
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &crate::sql::redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("hear_enqueues", &self.hear_enqueues)
            .field("hear_finished_runs", &self.hear_finished_runs)
            .finish()
    }
}

/// A pooled connection that remembers whether it failed.
pub(crate) struct Conn {
    inner: MultiplexedConnection,
    broken: bool,
}

pub(crate) struct Manager {
    client: Client,
    timeout: Duration,
}

/// The last error of the pool's own connection attempts: a checkout that times out says why
/// the pool could not connect ("Connection refused"), which bb8's timeout alone does not.
#[derive(Debug, Clone, Default)]
struct LastError(Arc<std::sync::Mutex<Option<String>>>);

impl LastError {
    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl bb8::ErrorSink<RedisError> for LastError {
    fn sink(&self, error: RedisError) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<RedisError>> {
        Box::new(self.clone())
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = Conn;
    type Error = RedisError;

    async fn connect(&self) -> Result<Conn, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let inner = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(Conn {
            inner,
            broken: false,
        })
    }

    async fn is_valid(&self, conn: &mut Conn) -> Result<(), RedisError> {
        redis::cmd("PING").query_async::<()>(&mut conn.inner).await
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.broken
    }
}

/// Redis-backed [`Queue`].
#[derive(Clone)]
pub struct RedisQueue {
    pool: bb8::Pool<Manager>,
    client: Client,
    prefix: Arc<str>,
    /// The URL, its password hidden, for errors.
    shown: Arc<str>,
    /// Why the pool's last connection attempt failed.
    last_error: LastError,
    timeout: Duration,
    max_deliveries: u32,
    wake: Arc<Notify>,
    subscriber_up: Arc<AtomicBool>,
    flow_changes: tokio::sync::broadcast::Sender<String>,
    cancels: tokio::sync::broadcast::Sender<RunId>,
    finish_waiters: Arc<flowcore::ports::FinishWaiters>,
    losses: tokio::sync::watch::Sender<u64>,
    _subscriber: Arc<tokio_util::task::AbortOnDropHandle<()>>,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A Lua script with `now` first set to the Redis server's clock in milliseconds: every
/// process's scripts read one clock, whatever the processes' own clocks say.
macro_rules! with_now {
    ($body:expr) => {
        concat!(
            "local t = redis.call('TIME')\n",
            "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n",
            $body
        )
    };
}

/// The queue scripts' common part: `P` (ARGV[1]) is the group's key prefix; under it `due` (the
/// delayed and the leased jobs by time), `ready` (by rank: priority, then arrival), `leased`
/// (lease expiries, for the depth), `dead`, `seq`, `held` (slots taken per concurrency key),
/// `backlog:<key>` (the jobs held back behind a key, by rank), `held_back` (their count),
/// `runs` (each run's latest job) and `job:<id>` (a hash: run_id, deliveries, token, rank, key,
/// limit, admitted).
macro_rules! queue_script {
    ($body:literal) => {
        with_now!(concat!(
            r#"
local P = ARGV[1]
local function rank_of(jk)
  local r = redis.call('HGET', jk, 'rank')
  if r then return r end
  r = string.format('%.0f', 4 * 1e12 + redis.call('INCR', P .. 'seq'))
  redis.call('HSET', jk, 'rank', r)
  return r
end
local function admit(key)
  local bk = P .. 'backlog:' .. key
  local held = tonumber(redis.call('HGET', P .. 'held', key) or '0')
  if held < 0 then held = 0 end
  local moved = 0
  while true do
    local head = redis.call('ZRANGE', bk, 0, 0, 'WITHSCORES')
    if not head[1] then break end
    local jk = P .. 'job:' .. head[1]
    local limit = tonumber(redis.call('HGET', jk, 'limit') or '1') or 1
    if held >= limit then break end
    redis.call('ZREM', bk, head[1])
    redis.call('DECR', P .. 'held_back')
    if redis.call('EXISTS', jk) == 1 then
      held = held + 1
      redis.call('HSET', jk, 'admitted', '1')
      redis.call('ZADD', P .. 'ready', head[2], head[1])
      moved = moved + 1
    end
  end
  if held > 0 then redis.call('HSET', P .. 'held', key, held) else redis.call('HDEL', P .. 'held', key) end
  return moved
end
local function make_ready(id)
  local jk = P .. 'job:' .. id
  local key = redis.call('HGET', jk, 'key')
  local rank = rank_of(jk)
  if key and key ~= '' and redis.call('HGET', jk, 'admitted') ~= '1' then
    redis.call('ZADD', P .. 'backlog:' .. key, rank, id)
    redis.call('INCR', P .. 'held_back')
    return admit(key)
  end
  redis.call('ZADD', P .. 'ready', rank, id)
  return 1
end
local function forget(id)
  local run = redis.call('HGET', P .. 'job:' .. id, 'run_id')
  if run and redis.call('HGET', P .. 'runs', run) == id then redis.call('HDEL', P .. 'runs', run) end
end
local function release(id)
  local jk = P .. 'job:' .. id
  local key = redis.call('HGET', jk, 'key')
  if key and key ~= '' and redis.call('HGET', jk, 'admitted') == '1' then
    redis.call('HSET', jk, 'admitted', '0')
    redis.call('HINCRBY', P .. 'held', key, -1)
    return admit(key)
  end
  return 0
end
"#,
            $body
        ))
    };
}

const ENQUEUE: &str = queue_script!(
    r#"
-- The run has a job that no worker holds: that one will do.
local prev = redis.call('HGET', P .. 'runs', ARGV[3])
if prev and redis.call('HGET', P .. 'job:' .. prev, 'token') == '' then return prev end
local id = ARGV[2]
redis.call('HSET', P .. 'runs', ARGV[3], id)
local jk = P .. 'job:' .. id
local rank = string.format('%.0f', (9 - tonumber(ARGV[6])) * 1e12 + redis.call('INCR', P .. 'seq'))
redis.call('HSET', jk, 'run_id', ARGV[3], 'deliveries', 0, 'token', '', 'rank', rank,
  'key', ARGV[7], 'limit', ARGV[8], 'admitted', '0')
local due = tonumber(ARGV[4])
if due and due > now then
  redis.call('ZADD', P .. 'due', due, id)
  return id
end
if make_ready(id) > 0 then redis.call('PUBLISH', ARGV[5], '1') end
return id
"#
);

const LEASE: &str = queue_script!(
    r#"
local came = redis.call('ZRANGEBYSCORE', P .. 'due', '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(came) do
  redis.call('ZREM', P .. 'due', id)
  redis.call('ZREM', P .. 'leased', id)
  if redis.call('EXISTS', P .. 'job:' .. id) == 1 then make_ready(id) end
end
local out = {tostring(now), ''}
local max, taken, looked = tonumber(ARGV[2]), 0, 0
-- A job that holds its key's slot is never dead-lettered: its run is unfinished, and a dead
-- letter would give the slot to the next run of the key while this one still has steps to go
-- (its run comes back through the sweeps, behind the key). The run's own guard bounds it:
-- a run lost by too many workers is failed, and its job then acked.
while taken < max and looked < max + 1000 do
  local head = redis.call('ZRANGE', P .. 'ready', 0, 0)
  local id = head[1]
  if not id then break end
  looked = looked + 1
  redis.call('ZREM', P .. 'ready', id)
  local jk = P .. 'job:' .. id
  local d = redis.call('HINCRBY', jk, 'deliveries', 1)
  if d > tonumber(ARGV[4]) and redis.call('HGET', jk, 'admitted') ~= '1' then
    redis.call('HINCRBY', jk, 'deliveries', -1)
    redis.call('HSET', jk, 'token', '')
    release(id)
    forget(id)
    redis.call('RPUSH', P .. 'dead', id)
  else
    local token = ARGV[5] .. ':' .. id .. ':' .. d
    local expires = now + tonumber(ARGV[3])
    redis.call('HSET', jk, 'token', token)
    redis.call('ZADD', P .. 'due', expires, id)
    redis.call('ZADD', P .. 'leased', expires, id)
    table.insert(out, id)
    table.insert(out, redis.call('HGET', jk, 'run_id'))
    table.insert(out, tostring(d))
    table.insert(out, token)
    taken = taken + 1
  end
end
local nxt = redis.call('ZRANGE', P .. 'due', 0, 0, 'WITHSCORES')
if nxt[2] then out[2] = nxt[2] end
return out
"#
);

const HEARTBEAT: &str = queue_script!(
    r#"
local id = ARGV[3]
if redis.call('HGET', P .. 'job:' .. id, 'token') ~= ARGV[2] then return 0 end
local expires = now + tonumber(ARGV[4])
redis.call('ZREM', P .. 'ready', id)
redis.call('ZADD', P .. 'due', expires, id)
redis.call('ZADD', P .. 'leased', expires, id)
return 1
"#
);

const ACK: &str = queue_script!(
    r#"
local id = ARGV[3]
local jk = P .. 'job:' .. id
local token = redis.call('HGET', jk, 'token')
if not token then return 1 end
if token ~= ARGV[2] then return -1 end
redis.call('ZREM', P .. 'due', id)
redis.call('ZREM', P .. 'ready', id)
redis.call('ZREM', P .. 'leased', id)
local moved = release(id)
forget(id)
redis.call('DEL', jk)
if moved > 0 then redis.call('PUBLISH', ARGV[4], '1') end
return 1
"#
);

const NACK: &str = queue_script!(
    r#"
local id = ARGV[3]
local jk = P .. 'job:' .. id
if redis.call('HGET', jk, 'token') ~= ARGV[2] then return -1 end
local at = tonumber(ARGV[4]) or now
redis.call('HSET', jk, 'token', '')
redis.call('ZREM', P .. 'leased', id)
redis.call('ZREM', P .. 'due', id)
redis.call('ZREM', P .. 'ready', id)
local moved
if at > now then
  moved = release(id)
  redis.call('ZADD', P .. 'due', at, id)
else
  moved = make_ready(id)
end
if moved > 0 then redis.call('PUBLISH', ARGV[5], '1') end
return 1
"#
);

const DEPTH: &str = with_now!(
    r#"
local P = ARGV[1]
local came = redis.call('ZCOUNT', P .. 'due', '-inf', now)
local leased = redis.call('ZCOUNT', P .. 'leased', '(' .. now, '+inf')
local later = redis.call('ZCOUNT', P .. 'due', '(' .. now, '+inf')
return {redis.call('ZCARD', P .. 'ready') + came, math.max(0, later - leased), leased,
  redis.call('LLEN', P .. 'dead'), tonumber(redis.call('GET', P .. 'held_back') or '0')}
"#
);

/// GCRA (see `flowcore::ports::memory::gcra`): one "theoretical arrival time" per key, which
/// expires when it is in the past.
const RATE: &str = with_now!(
    r#"
local n = tonumber(ARGV[1])
local interval = math.floor(60000 / n)
local burst = interval * n
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst
if allow_at > now then return {0, allow_at - now, 0} end
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return {1, 0, math.floor((now - allow_at) / interval)}
"#
);

struct Scripts {
    enqueue: Script,
    lease: Script,
    heartbeat: Script,
    ack: Script,
    nack: Script,
    depth: Script,
    rate: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        enqueue: Script::new(ENQUEUE),
        lease: Script::new(LEASE),
        heartbeat: Script::new(HEARTBEAT),
        ack: Script::new(ACK),
        nack: Script::new(NACK),
        depth: Script::new(DEPTH),
        rate: Script::new(RATE),
    })
}

fn check_group(group: &str) -> StoreResult<()> {
    if flowcore::model::is_valid_id(group) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid worker group `{group}`"
        )))
    }
}

impl RedisQueue {
    /// Connects (the pool fills lazily) and starts the wake-up subscriber.
    pub async fn connect(config: RedisConfig) -> StoreResult<Self> {
        let client = Client::open(config.url.as_str())
            .map_err(|e| StoreError::Invalid(format!("REDIS_URL: {e}")))?;
        let last_error = LastError::default();
        let pool = bb8::Pool::builder()
            .error_sink(Box::new(last_error.clone()))
            .max_size(config.pool_size.max(1))
            .test_on_check_out(false)
            .connection_timeout(config.command_timeout)
            .build_unchecked(Manager {
                client: client.clone(),
                timeout: config.command_timeout,
            });
        let wake = Arc::new(Notify::new());
        let subscriber_up = Arc::new(AtomicBool::new(false));
        let channel = format!("{}:q:wake", config.prefix);
        let flow_changes = tokio::sync::broadcast::channel(1024).0;
        let cancels = tokio::sync::broadcast::channel(1024).0;
        let finish_waiters = flowcore::ports::FinishWaiters::new();
        let losses = tokio::sync::watch::channel(0).0;
        let channels = Channels {
            hear_enqueues: config.hear_enqueues,
            hear_finished_runs: config.hear_finished_runs,
            wake: channel,
            flows: format!("{}:{FLOWS_CHANNEL}", config.prefix),
            flow_changes: flow_changes.clone(),
            cancel: format!("{}:{CANCEL_CHANNEL}", config.prefix),
            cancels: cancels.clone(),
            finished: format!("{}:{FINISHED_CHANNEL}", config.prefix),
            finish_waiters: finish_waiters.clone(),
            marker: format!("{}:q:marker", config.prefix),
            losses: losses.clone(),
        };
        let task = tokio::spawn(subscribe(
            client.clone(),
            channels,
            wake.clone(),
            subscriber_up.clone(),
        ));
        let queue = Self {
            pool,
            client,
            prefix: config.prefix.into(),
            shown: crate::sql::redact_url(&config.url).into(),
            last_error,
            timeout: config.command_timeout,
            max_deliveries: config.max_deliveries.max(1),
            wake,
            subscriber_up,
            flow_changes,
            cancels,
            finish_waiters,
            losses,
            _subscriber: Arc::new(tokio_util::task::AbortOnDropHandle::new(task)),
        };
        queue.ping().await?;
        Ok(queue)
    }

    /// Answers when Redis does (for readiness checks).
    pub async fn ping(&self) -> StoreResult<()> {
        self.run(|mut conn| async move { redis::cmd("PING").query_async::<()>(&mut conn).await })
            .await
    }

    /// Deletes every key under this queue's prefix (its jobs, leases, events, limits), in
    /// batches found with `SCAN`, which does not block Redis as `KEYS` would. For tests,
    /// benchmarks and an operator retiring a prefix; never while processes use it. Returns how
    /// many keys went.
    pub async fn delete_prefix(&self) -> StoreResult<usize> {
        // The prefix literally: `*`, `?`, `[` or a backslash in it must not match other prefixes.
        let literal: String = self
            .prefix
            .chars()
            .flat_map(|c| match c {
                '*' | '?' | '[' | ']' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        let pattern = format!("{literal}:*");
        let mut deleted = 0;
        let mut cursor = 0u64;
        loop {
            let pattern = pattern.clone();
            let (next, keys): (u64, Vec<String>) = self
                .run(|mut conn| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            if !keys.is_empty() {
                deleted += keys.len();
                self.run(|mut conn| async move {
                    redis::cmd("DEL")
                        .arg(&keys)
                        .query_async::<()>(&mut conn)
                        .await
                })
                .await?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// Publishes `payload` on the prefixed pub/sub `channel`.
    async fn publish(&self, channel: &str, payload: &str) -> StoreResult<()> {
        let channel = format!("{}:{channel}", self.prefix);
        let payload = payload.to_owned();
        self.run(|mut conn| async move {
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(&payload)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    /// Whether the wake-up subscriber is connected (waiters fall back to polling when not).
    pub fn subscriber_connected(&self) -> bool {
        self.subscriber_up.load(Ordering::Relaxed)
    }

    /// The prefix of every key of `group`'s queue (see the queue scripts).
    fn group_prefix(&self, group: &str) -> String {
        format!("{}:q:{group}:", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:q:wake", self.prefix)
    }

    /// Runs `f` on a pooled connection with the command timeout; an I/O error or a timeout
    /// marks the connection broken so that the pool replaces it.
    async fn run<T, F, Fut>(&self, f: F) -> StoreResult<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let shown = &self.shown;
        let mut conn = self.pool.get().await.map_err(|e| match e {
            bb8::RunError::User(e) => {
                StoreError::unavailable(format!("connecting to Redis at {shown}"), e)
            }
            bb8::RunError::TimedOut => StoreError::Unavailable {
                message: format!(
                    "timed out connecting to Redis at {shown} (after {} ms){}",
                    self.timeout.as_millis(),
                    self.last_error
                        .take()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                source: None,
            },
        })?;
        // A multiplexed connection is a cheap handle: the command runs on a clone.
        match tokio::time::timeout(self.timeout, f(conn.inner.clone())).await {
            Err(_) => {
                conn.broken = true;
                Err(StoreError::Unavailable {
                    message: format!(
                        "Redis at {shown} did not answer in {} ms",
                        self.timeout.as_millis()
                    ),
                    source: None,
                })
            }
            Ok(Err(e))
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_timeout()
                    || e.is_unrecoverable_error() =>
            {
                conn.broken = true;
                Err(StoreError::unavailable(
                    format!("the connection to Redis at {shown} failed"),
                    e,
                ))
            }
            Ok(Err(e)) => Err(StoreError::backend("Redis command failed", e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    async fn script<T: redis::FromRedisValue + Send>(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> StoreResult<T> {
        self.run(|mut conn| async move {
            let mut invocation = script.prepare_invoke();
            for k in &keys {
                invocation.key(k);
            }
            for a in &args {
                invocation.arg(a);
            }
            invocation.invoke_async::<T>(&mut conn).await
        })
        .await
    }
}

/// Forwards wake-up messages to waiting leases; reconnects after an outage.
async fn subscribe(client: Client, channels: Channels, wake: Arc<Notify>, up: Arc<AtomicBool>) {
    // The marker's token at the last connection.
    let mut seen: Option<String> = None;
    loop {
        let mut names = vec![&channels.flows, &channels.cancel];
        if channels.hear_enqueues {
            names.push(&channels.wake);
        }
        if channels.hear_finished_runs {
            names.push(&channels.finished);
        }
        // The marker is a token set by the first process to connect to a Redis; finding
        // another token than the one seen before means Redis restarted empty, and the jobs of
        // runs still waiting went with it. Every process sees it for itself (a `SET NX` alone
        // would tell only the first to reconnect, maybe one that recovers nothing). A marker
        // not read is a connection tried again.
        if let Ok(mut pubsub) = client.get_async_pubsub().await
            && pubsub.subscribe(&names).await.is_ok()
            && let Some(now) = marker_token(&client, &channels.marker).await
        {
            let (lost, first) = match &seen {
                None => (now.mine, true),
                Some(before) => (*before != now.token, false),
            };
            if lost {
                tracing::info!(
                    first,
                    "Redis holds none of the earlier data: the jobs of waiting runs go back into the queue"
                );
                channels.losses.send_modify(|n| *n += 1);
            }
            seen = Some(now.token);
            // While we were away jobs may have been enqueued and flows changed: let waiters
            // look, and tell caches to drop everything.
            wake.notify_waiters();
            let _ = channels.flow_changes.send(ALL_FLOWS.to_owned());
            // Connected only now: whoever waits for it sees no more catch-up after.
            up.store(true, Ordering::Relaxed);
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                if message.get_channel_name() == channels.finished {
                    if let Ok(message) = message.get_payload::<String>() {
                        let (run_id, end) = parse_finished(&message);
                        channels.finish_waiters.notify(&run_id, end);
                    }
                } else if message.get_channel_name() == channels.flows {
                    if let Ok(flow_id) = message.get_payload::<String>() {
                        let _ = channels.flow_changes.send(flow_id);
                    }
                } else if message.get_channel_name() == channels.cancel {
                    if let Ok(run_id) = message.get_payload::<String>() {
                        let _ = channels.cancels.send(RunId::from(run_id));
                    }
                } else {
                    wake.notify_waiters();
                }
            }
        }
        up.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The marker's token, and whether this call set it.
struct Marker {
    token: String,
    mine: bool,
}

/// Sets the marker to a fresh token unless it is set (`SET NX`), and reads it.
async fn marker_token(client: &Client, marker: &str) -> Option<Marker> {
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    // A UUIDv7: unique, whoever sets it.
    let fresh = RunId::new().as_str().to_owned();
    let set: Option<String> = redis::cmd("SET")
        .arg(marker)
        .arg(&fresh)
        .arg("NX")
        .query_async(&mut conn)
        .await
        .ok()?;
    let token: String = redis::cmd("GET")
        .arg(marker)
        .query_async(&mut conn)
        .await
        .ok()?;
    Some(Marker {
        mine: set.is_some() && token == fresh,
        token,
    })
}

struct Channels {
    hear_enqueues: bool,
    hear_finished_runs: bool,
    wake: String,
    flows: String,
    flow_changes: tokio::sync::broadcast::Sender<String>,
    cancel: String,
    cancels: tokio::sync::broadcast::Sender<RunId>,
    finished: String,
    finish_waiters: Arc<flowcore::ports::FinishWaiters>,
    /// A key set once to a random token (`SET NX`): when a (re)connection finds another
    /// token, Redis lost its data.
    marker: String,
    losses: tokio::sync::watch::Sender<u64>,
}

/// The pub/sub channel (after the prefix) of finished runs: messages are the run id, followed
/// by a space and its end as JSON when that is at most [`FINISHED_END_MAX`] bytes.
const FINISHED_CHANNEL: &str = "runs:finished";
/// The largest run end an announcement carries; a waiter of a larger one reads the store (every
/// process receives every announcement).
const FINISHED_END_MAX: usize = 16 * 1024;

fn finished_message(run_id: &RunId, end: Option<&flowcore::ports::RunEnd>) -> String {
    let mut message = run_id.as_str().to_owned();
    if let Some(json) = end.and_then(|e| serde_json::to_string(e).ok())
        && json.len() <= FINISHED_END_MAX
    {
        message.push(' ');
        message.push_str(&json);
    }
    message
}

/// The run and, when carried and readable, its end (else the waiter reads the store).
fn parse_finished(message: &str) -> (RunId, Option<flowcore::ports::RunEnd>) {
    match message.split_once(' ') {
        Some((run_id, end)) => (RunId::from(run_id), serde_json::from_str(end).ok()),
        None => (RunId::from(message), None),
    }
}
/// The pub/sub channel (after the prefix) of flow changes.
const FLOWS_CHANNEL: &str = "flows:changed";
/// The pub/sub channel (after the prefix) of cancel requests.
const CANCEL_CHANNEL: &str = "runs:cancel";

/// Sent to flow-change subscribers when changes may have been missed: drop every cached flow.
pub const ALL_FLOWS: &str = "*";

fn millis(t: DateTime<Utc>) -> String {
    t.timestamp_millis().to_string()
}

/// The longest a waiting lease sleeps between looks when no wake-up comes (a lost message or
/// the subscriber reconnecting).
const MAX_POLL: Duration = Duration::from_millis(500);

#[async_trait]
impl Queue for RedisQueue {
    async fn enqueue(&self, group: &str, job: NewJob) -> StoreResult<String> {
        check_group(group)?;
        let id = flowcore::ids::new_id();
        let (key, limit) = job
            .key
            .map(|k| (k.key, k.limit.max(1).to_string()))
            .unwrap_or_default();
        let args = vec![
            self.group_prefix(group),
            id,
            job.run_id.to_string(),
            job.not_before.map(millis).unwrap_or_default(),
            self.channel(),
            job.priority.min(MAX_PRIORITY).to_string(),
            key,
            limit,
        ];
        // The id of the run's job that was there already, if one was.
        self.script::<String>(&scripts().enqueue, vec![], args)
            .await
    }

    async fn lease(&self, group: &str, take: Take) -> StoreResult<Vec<LeasedJob>> {
        let Take { max, ttl, wait } = take;
        check_group(group)?;
        let until = tokio::time::Instant::now() + wait;
        let token_prefix = flowcore::ids::new_id();
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let args = vec![
                self.group_prefix(group),
                max.clamp(1, 1000).to_string(),
                ttl.as_millis().max(1).to_string(),
                self.max_deliveries.to_string(),
                token_prefix.clone(),
            ];
            let out: Vec<String> = self.script(&scripts().lease, vec![], args).await?;
            let now_ms: i64 = out.first().and_then(|s| s.parse().ok()).unwrap_or(0);
            let next_due: Option<i64> = out
                .get(1)
                .and_then(|s| s.parse::<f64>().ok())
                .map(|f| f as i64);
            let jobs: Vec<LeasedJob> = out[2.min(out.len())..]
                .chunks_exact(4)
                .map(|c| LeasedJob {
                    job: Job {
                        id: c[0].clone(),
                        run_id: RunId::from(c[1].clone()),
                        deliveries: c[2].parse().unwrap_or(0),
                    },
                    group: group.to_owned(),
                    token: c[3].clone(),
                })
                .collect();
            let now = tokio::time::Instant::now();
            if !jobs.is_empty() || now >= until {
                return Ok(jobs);
            }
            let mut sleep = (until - now).min(MAX_POLL);
            if let Some(due) = next_due {
                let until_due = Duration::from_millis(u64::try_from(due - now_ms).unwrap_or(0) + 1);
                sleep = sleep.min(until_due);
            }
            let _ = tokio::time::timeout(sleep, notified).await;
        }
    }

    async fn heartbeat(&self, job: &LeasedJob, ttl: Duration) -> StoreResult<()> {
        let args = vec![
            self.group_prefix(&job.group),
            job.token.clone(),
            job.job.id.clone(),
            ttl.as_millis().max(1).to_string(),
        ];
        match self
            .script::<i64>(&scripts().heartbeat, vec![], args)
            .await?
        {
            1 => Ok(()),
            _ => Err(StoreError::StaleLease(format!(
                "job `{}` was delivered again or finished",
                job.job.id
            ))),
        }
    }

    async fn ack(&self, job: &LeasedJob) -> StoreResult<()> {
        let args = vec![
            self.group_prefix(&job.group),
            job.token.clone(),
            job.job.id.clone(),
            self.channel(),
        ];
        match self.script::<i64>(&scripts().ack, vec![], args).await? {
            1 => Ok(()),
            _ => Err(StoreError::StaleLease(format!(
                "job `{}` was delivered again",
                job.job.id
            ))),
        }
    }

    async fn nack(&self, job: &LeasedJob, retry_at: Option<DateTime<Utc>>) -> StoreResult<()> {
        let args = vec![
            self.group_prefix(&job.group),
            job.token.clone(),
            job.job.id.clone(),
            retry_at.map(millis).unwrap_or_default(),
            self.channel(),
        ];
        match self.script::<i64>(&scripts().nack, vec![], args).await? {
            1 => Ok(()),
            _ => Err(StoreError::StaleLease(format!(
                "job `{}` was delivered again or finished",
                job.job.id
            ))),
        }
    }

    async fn held_back(&self, group: &str, key: &str) -> StoreResult<u64> {
        check_group(group)?;
        let backlog = format!("{}backlog:{key}", self.group_prefix(group));
        let n: u64 = self
            .run(|mut conn| async move {
                redis::cmd("ZCARD")
                    .arg(&backlog)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(n)
    }

    async fn depth(&self, group: &str) -> StoreResult<QueueDepth> {
        check_group(group)?;
        let args = vec![self.group_prefix(group)];
        let v: Vec<i64> = self.script(&scripts().depth, vec![], args).await?;
        let get = |i: usize| v.get(i).copied().unwrap_or(0).max(0) as u64;
        Ok(QueueDepth {
            ready: get(0),
            delayed: get(1),
            leased: get(2),
            dead: get(3),
            held_back: get(4),
        })
    }

    fn losses(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.losses.subscribe())
    }
}

/// The rate limiter shared by all API servers: one atomic script call per request. It uses the
/// queue's connections.
#[derive(Debug, Clone)]
pub struct RedisRateLimiter(RedisQueue);

impl RedisQueue {
    /// A rate limiter over the same connections and key prefix.
    pub fn rate_limiter(&self) -> RedisRateLimiter {
        RedisRateLimiter(self.clone())
    }
}

#[async_trait]
impl flowcore::ports::RateLimiter for RedisRateLimiter {
    async fn check(
        &self,
        key: &str,
        per_minute: u32,
    ) -> StoreResult<flowcore::ports::RateDecision> {
        if per_minute == 0 {
            return Ok(flowcore::ports::RateDecision {
                allowed: true,
                retry_after: Duration::ZERO,
                remaining: u32::MAX,
            });
        }
        let redis_key = format!("{}:rl:{key}", self.0.prefix);
        let v: Vec<i64> = self
            .0
            .script(
                &scripts().rate,
                vec![redis_key],
                vec![per_minute.to_string()],
            )
            .await?;
        let get = |i: usize| v.get(i).copied().unwrap_or(0).max(0);
        Ok(flowcore::ports::RateDecision {
            allowed: get(0) == 1,
            retry_after: Duration::from_millis(get(1) as u64),
            remaining: u32::try_from(get(2)).unwrap_or(u32::MAX),
        })
    }
}

/// Run events in Redis Streams, one stream per run (`{prefix}:ev:{run_id}`), capped in length
/// and expiring an hour after the last event, or a minute after `run_finished`. A read without news blocks (`XREAD BLOCK`) on a
/// connection of its own, so it never holds up the shared ones.
#[derive(Debug, Clone)]
pub struct RedisEventBus {
    queue: RedisQueue,
    client: Client,
}

/// Events kept per run, and how long after its last event.
const EVENTS_PER_RUN: usize = 10_000;
const EVENTS_TTL_SECONDS: i64 = 3600;
/// How long a finished run's events stay: long enough for a client to attach or resume and
/// read the end, short enough that a busy server does not keep an hour of runs. A stream
/// costs about 5 KB in Redis; at 2,000 runs a second an hour of them would be 36 GB, a
/// minute is 600 MB. A client that comes later reads the run (`GET /api/v1/runs/{id}`).
pub const FINISHED_EVENTS_TTL_SECONDS: i64 = 60;

impl RedisQueue {
    /// An event bus over the same Redis (shared connections for writes, one connection per
    /// blocking read).
    pub fn event_bus(&self) -> RedisEventBus {
        RedisEventBus {
            queue: self.clone(),
            client: self.client.clone(),
        }
    }
}

impl RedisEventBus {
    /// Adds the `XADD`s of `events` to `pipe` (their ids are the pipeline's answers), then
    /// one `EXPIRE` per run they belong to (ignored), not one per event: the stream's time to
    /// live starts again with each batch, and shrinks to a minute with `run_finished`.
    fn append(&self, pipe: &mut redis::Pipeline, events: &[flowcore::RunEvent]) -> StoreResult<()> {
        let mut keys: Vec<(String, bool)> = Vec::with_capacity(1);
        for event in events {
            let key = format!("{}:ev:{}", self.queue.prefix, event.run_id());
            Self::add(pipe, &key, event)?;
            let finished = matches!(event, flowcore::RunEvent::RunFinished { .. });
            match keys.iter_mut().find(|(k, _)| *k == key) {
                Some((_, seen)) => *seen |= finished,
                None => keys.push((key, finished)),
            }
        }
        for (key, finished) in keys {
            let ttl = if finished {
                FINISHED_EVENTS_TTL_SECONDS
            } else {
                EVENTS_TTL_SECONDS
            };
            pipe.cmd("EXPIRE").arg(key).arg(ttl).ignore();
        }
        Ok(())
    }

    /// One event's `XADD` to the stream `key`.
    fn add(pipe: &mut redis::Pipeline, key: &str, event: &flowcore::RunEvent) -> StoreResult<()> {
        let data = serde_json::to_string(event)
            .map_err(|e| StoreError::backend("encoding an event", e))?;
        pipe.cmd("XADD")
            .arg(key)
            .arg("MAXLEN")
            .arg("~")
            .arg(EVENTS_PER_RUN)
            .arg("*")
            .arg("name")
            .arg(event.name())
            .arg("data")
            .arg(data);
        Ok(())
    }
}

fn records(reply: redis::streams::StreamReadReply) -> Vec<flowcore::ports::EventRecord> {
    reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids)
        .map(|entry| {
            let name: String = entry.get("name").unwrap_or_default();
            let data: String = entry.get("data").unwrap_or_default();
            flowcore::ports::EventRecord {
                id: entry.id,
                name,
                data,
            }
        })
        .collect()
}

#[async_trait]
impl flowcore::ports::EventBus for RedisEventBus {
    async fn publish(&self, event: &flowcore::RunEvent) -> StoreResult<String> {
        let mut pipe = redis::pipe();
        self.append(&mut pipe, std::slice::from_ref(event))?;
        let (id,): (String,) = self
            .queue
            .run(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await?;
        Ok(id)
    }

    async fn publish_many(&self, events: &[flowcore::RunEvent]) -> StoreResult<()> {
        let mut pipe = redis::pipe();
        self.append(&mut pipe, events)?;
        self.queue
            .run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
            .await
    }

    async fn read(
        &self,
        run_id: &RunId,
        after: Option<&str>,
        wait: Duration,
    ) -> StoreResult<Vec<flowcore::ports::EventRecord>> {
        let after = after.unwrap_or("0-0").to_owned();
        let valid = after.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        });
        if !valid {
            return Err(StoreError::Invalid(format!("invalid event id `{after}`")));
        }
        let key = format!("{}:ev:{run_id}", self.queue.prefix);
        let (k, a) = (key.clone(), after.clone());
        let now: redis::streams::StreamReadReply = self
            .queue
            .run(|mut conn| async move {
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&k)
                    .arg(&a)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let events = records(now);
        if !events.is_empty() || wait.is_zero() {
            return Ok(events);
        }
        // Nothing yet: block on a connection of our own, so the shared ones stay free.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.queue.timeout))
            .set_response_timeout(Some(wait + self.queue.timeout));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| StoreError::unavailable("connecting to Redis", e))?;
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(wait.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&key)
            .arg(&after)
            .query_async(&mut conn)
            .await
            .map_err(|e| StoreError::unavailable("reading events from Redis", e))?;
        Ok(reply.map(records).unwrap_or_default())
    }
}

/// Flow changes over Redis pub/sub: every process's caches hear of every change. After the
/// subscriber reconnects, subscribers receive [`ALL_FLOWS`] (changes may have been missed).
#[derive(Debug, Clone)]
pub struct RedisFlowChanges(RedisQueue);

/// Cancel requests and finished runs to every process over the same Redis (pub/sub); one
/// subscriber per process wakes the requests waiting there.
#[derive(Debug, Clone)]
pub struct RedisRunSignals(RedisQueue);

impl RedisQueue {
    /// Cancel requests over the same Redis.
    pub fn run_signals(&self) -> RedisRunSignals {
        RedisRunSignals(self.clone())
    }

    /// Flow-change announcements over the same Redis.
    pub fn flow_changes(&self) -> RedisFlowChanges {
        RedisFlowChanges(self.clone())
    }
}

#[async_trait]
impl flowcore::ports::RunSignals for RedisRunSignals {
    async fn cancel(&self, run_id: &RunId) -> StoreResult<()> {
        self.0.publish(CANCEL_CHANNEL, run_id.as_str()).await
    }
    fn cancels(&self) -> tokio::sync::broadcast::Receiver<RunId> {
        self.0.cancels.subscribe()
    }
    async fn finished(
        &self,
        run_id: &RunId,
        end: Option<&flowcore::ports::RunEnd>,
    ) -> StoreResult<()> {
        self.0
            .publish(FINISHED_CHANNEL, &finished_message(run_id, end))
            .await
    }
    fn watch_finished(&self, run_id: &RunId) -> flowcore::ports::FinishWatch {
        self.0.finish_waiters.watch(run_id)
    }
}

#[async_trait]
impl flowcore::ports::FlowChanges for RedisFlowChanges {
    async fn publish(&self, flow_id: &str) -> StoreResult<()> {
        self.0.publish(FLOWS_CHANNEL, flow_id).await
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.0.flow_changes.subscribe()
    }
}
